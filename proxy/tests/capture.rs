//! Root only: capture mode in a real pod namespace. A server bound on 0.0.0.0:8501 stands for
//! the instance-manager; after `lhnet-proxy capture`, calls from the manager namespace to the
//! pod's eth0 address on 8501 reach lhnet, and calls inside the pod still reach the server.

use std::process::Command;
use std::time::Duration;

mod common;

use common::{admin_get, runtime, spawn_proxy};
use lhnet_netns::{run_in, spawn_in, Topology};
use lhnet_proto::echo::echo_client::EchoClient;
use lhnet_proto::echo::EchoRequest;

fn unary(target: &'static str) -> Result<String, String> {
    runtime().block_on(async move {
        let mut c = EchoClient::connect(format!("http://{target}"))
            .await
            .map_err(|e| e.to_string())?;
        c.unary(EchoRequest {
            payload: b"who".to_vec(),
            count: 0,
            delay_ms: 0,
        })
        .await
        .map(|r| r.into_inner().server)
        .map_err(|e| e.to_string())
    })
}

#[test]
fn capture_sends_outside_connections_to_lhnet_and_leaves_in_pod_ones() {
    if !common::root() {
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        panic!("nft is not installed (apt-get install nftables; .ci/run installs it)");
    }
    let mut topo = Topology::new("cap").unwrap();
    topo.add_bridge("mgmt").unwrap();
    let manager = topo.add_namespace("manager").unwrap();
    let pod = topo.add_namespace("pod").unwrap();
    topo.attach(&manager, "eth0", "mgmt", Some("10.42.0.1/24"))
        .unwrap();
    topo.attach(&pod, "eth0", "mgmt", Some("10.42.0.2/24"))
        .unwrap();

    // In the pod: the instance-manager stand-in on 0.0.0.0:8501, and what lhnet forwards to.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    spawn_in(&pod.name, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let _im = lhnet_proto::echo_server::spawn("0.0.0.0:8501".parse().unwrap(), "im")
                    .await
                    .unwrap();
                let _behind = lhnet_proto::echo_server::spawn(
                    "127.0.0.1:7000".parse().unwrap(),
                    "behind-lhnet",
                )
                .await
                .unwrap();
                ready_tx.send(()).unwrap();
                let _ = stop_rx.await;
            })
    })
    .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let config = common::write_config(
        "capture",
        "admin: { address: 127.0.0.1:9901 }\n\
         storage_network: { interface: lhnet1, fallback: pod_ip }\n\
         listeners:\n  - name: management\n    address: 0.0.0.0:8511\n    routes:\n\
         \x20     - { match: { prefix: / }, cluster: behind }\n\
         clusters:\n  - { name: behind, endpoints: [127.0.0.1:7000], upstream_bind_config: { source_address: none } }\n",
    );
    let bin = env!("CARGO_BIN_EXE_lhnet-proxy");
    let _proxy = spawn_proxy(&topo, &pod, &config, &[("POD_IP", "10.42.0.2")]);

    // Before capture, the manager reaches the instance-manager itself.
    assert_eq!(
        run_in(&manager.name, || unary("10.42.0.2:8501"))
            .unwrap()
            .unwrap(),
        "im"
    );

    for _ in 0..2 {
        let out = topo
            .command(&pod, bin)
            .args([
                "capture",
                "--redirect",
                "8500:8510",
                "--redirect",
                "8501:8511",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = topo
        .command(&pod, "nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert_eq!(
        rules.matches("table inet lhnet_capture").count(),
        1,
        "{rules}"
    );
    assert_eq!(rules.matches("redirect to").count(), 2, "{rules}");

    // From outside: lhnet answers (through its route), and counts it.
    assert_eq!(
        run_in(&manager.name, || unary("10.42.0.2:8501"))
            .unwrap()
            .unwrap(),
        "behind-lhnet"
    );
    let (_, metrics) = admin_get(&pod.name, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lhnet_requests_total{")
                && l.contains("grpc_method=\"Unary\"")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Inside the pod: the instance-manager, as before.
    assert_eq!(
        run_in(&pod.name, || unary("127.0.0.1:8501"))
            .unwrap()
            .unwrap(),
        "im"
    );
    assert_eq!(
        run_in(&pod.name, || unary("10.42.0.2:8501"))
            .unwrap()
            .unwrap(),
        "im"
    );

    // --remove takes the rules away again.
    let out = topo
        .command(&pod, bin)
        .args(["capture", "--remove"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        run_in(&manager.name, || unary("10.42.0.2:8501"))
            .unwrap()
            .unwrap(),
        "im"
    );
    let _ = stop_tx.send(());
}
