//! Root only: the two-network topology built from real namespaces, veth pairs and bridges.
//!
//! manager ──mgmt bridge── pod (eth0 10.42.0.2, lhnet1 10.30.0.2) ──storage bridge── replica
//! (10.30.0.3). The lhnet-proxy binary runs in the pod namespace; the manager can only reach
//! the pod's eth0, and the replica only the storage bridge.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

mod common;

use common::{admin_get, metric, runtime, spawn_proxy};
use lhnet_netns::{read_device_counters, run_in, spawn_in, Topology};
use lhnet_proto::echo::echo_client::EchoClient;
use lhnet_proto::echo::EchoRequest;

#[test]
// A synchronous test driving namespaces: std's sleep between polls.
#[allow(clippy::disallowed_methods)]
fn storage_traffic_leaves_on_lhnet1_from_the_lhnet1_address() {
    if !common::root() {
        return;
    }
    let mut topo = Topology::new("core").unwrap();
    topo.add_bridge("mgmt").unwrap();
    topo.add_bridge("stor").unwrap();
    let manager = topo.add_namespace("manager").unwrap();
    let pod = topo.add_namespace("pod").unwrap();
    let replica = topo.add_namespace("replica").unwrap();
    topo.attach(&manager, "eth0", "mgmt", Some("10.42.0.1/24"))
        .unwrap();
    topo.attach(&pod, "eth0", "mgmt", Some("10.42.0.2/24"))
        .unwrap();
    topo.attach(&pod, "lhnet1", "stor", Some("10.30.0.2/24"))
        .unwrap();
    topo.attach(&replica, "lhnet1", "stor", Some("10.30.0.3/24"))
        .unwrap();

    // The replica: an echo server reachable only over the storage bridge.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let replica_thread = spawn_in(&replica.name, move || {
        runtime().block_on(async move {
            let echo = lhnet_proto::echo_server::spawn("10.30.0.3:0".parse().unwrap(), "replica")
                .await
                .unwrap();
            addr_tx.send(echo.addr).unwrap();
            let _ = stop_rx.await;
        })
    })
    .unwrap();
    let replica_addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    // The manager cannot reach the replica directly.
    let direct = run_in(&manager.name, move || {
        std::net::TcpStream::connect_timeout(&replica_addr, Duration::from_millis(300)).is_ok()
    })
    .unwrap();
    assert!(
        !direct,
        "the manager namespace must not reach the storage network"
    );

    let config = common::write_config(
        "core",
        &format!(
            "admin: {{ address: 127.0.0.1:9901 }}\n\
             storage_network: {{ interface: lhnet1, fallback: wait }}\n\
             listeners:\n  - name: management\n    address: 0.0.0.0:8501\n    routes:\n\
             \x20     - match: {{ prefix: /lhnet.echo.v1.Echo/ }}\n        cluster: replica\n\
             clusters:\n  - name: replica\n    endpoints: [{replica_addr}]\n\
             \x20   upstream_bind_config: {{ source_address: storage }}\n"
        ),
    );
    // Ready once the admin server answers (it needs lhnet1's address, found on its own).
    let _proxy = spawn_proxy(&topo, &pod, &config, &[]);
    let storage: serde_json::Value =
        serde_json::from_str(&admin_get(&pod.name, "/storage").1).unwrap();
    assert_eq!(storage["address"], "10.30.0.2");
    assert_eq!(storage["source"], "interface");
    assert_eq!(storage["device"], "lhnet1");

    let before = run_in(&pod.name, read_device_counters).unwrap().unwrap()["lhnet1"];
    let metrics_before = admin_get(&pod.name, "/metrics").1;
    let tx_series = "lhnet_interface_transmit_bytes_total{device=\"lhnet1\",network=\"storage\"}";
    let proxy_tx_before = metric(&metrics_before, tx_series).unwrap_or(0.0);

    // From the manager, through the pod's management address: 32 MiB upstream in 64 KiB messages.
    let (peer, server, bytes) = run_in(&manager.name, || {
        runtime().block_on(async {
            let mut c = EchoClient::connect("http://10.42.0.2:8501").await.unwrap();
            let first = c
                .unary(EchoRequest {
                    payload: b"hi".to_vec(),
                    count: 0,
                    delay_ms: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let msgs = tokio_stream::iter((0..512).map(|_| EchoRequest {
                payload: vec![7u8; 64 << 10],
                count: 0,
                delay_ms: 0,
            }));
            let summary = c.client_stream(msgs).await.unwrap().into_inner();
            (
                first.peer,
                first.server,
                String::from_utf8(summary.payload).unwrap(),
            )
        })
    })
    .unwrap();
    assert_eq!(server, "replica");
    assert_eq!(bytes, (512u64 * (64 << 10)).to_string());
    assert!(
        peer.starts_with("10.30.0.2:"),
        "replica saw the connection from {peer}, not lhnet1's address"
    );

    let after = run_in(&pod.name, read_device_counters).unwrap().unwrap()["lhnet1"];
    let kernel_tx = (after.tx_bytes - before.tx_bytes) as f64;
    let sent = 512.0 * 65536.0;
    assert!(
        kernel_tx >= sent,
        "lhnet1 carried only {kernel_tx} bytes of {sent}"
    );

    let metrics_after = admin_get(&pod.name, "/metrics").1;
    let proxy_tx = metric(&metrics_after, tx_series)
        .unwrap_or_else(|| panic!("no {tx_series} in\n{metrics_after}"))
        - proxy_tx_before;
    let ratio = proxy_tx / kernel_tx;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "proxy counted {proxy_tx} B, kernel {kernel_tx} B on lhnet1 (ratio {ratio:.3})"
    );
    assert!(
        metrics_after
            .contains("lhnet_upstream_connections{cluster=\"replica\",network=\"storage\"} 1"),
        "{metrics_after}"
    );
    assert!(metrics_after.contains("lhnet_storage_address_info{address=\"10.30.0.2\",device=\"lhnet1\",source=\"interface\"} 1"));
    assert!(metrics_after
        .contains("lhnet_interface_receive_bytes_total{device=\"eth0\",network=\"management\"}"));

    // lhnet1 changes address: new upstream connections leave from the new one, and the pooled
    // connection from the old address takes no more requests.
    topo.del_address(&pod, "lhnet1", "10.30.0.2/24").unwrap();
    topo.add_address(&pod, "lhnet1", "10.30.0.7/24").unwrap();
    let changed = Instant::now();
    let peer = loop {
        let peer = run_in(&manager.name, || {
            runtime().block_on(async {
                let mut c = EchoClient::connect("http://10.42.0.2:8501").await.ok()?;
                let r = c
                    .unary(EchoRequest {
                        payload: b"after".to_vec(),
                        count: 0,
                        delay_ms: 0,
                    })
                    .await
                    .ok()?;
                Some(r.into_inner().peer)
            })
        })
        .unwrap();
        if let Some(p) = peer.clone().filter(|p| p.starts_with("10.30.0.7:")) {
            break p;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "5 s after the change the replica still sees {peer:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(peer.starts_with("10.30.0.7:"), "{peer}");

    let _ = stop_tx.send(());
    replica_thread.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}
