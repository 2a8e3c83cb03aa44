//! Root only: `kind: tcp` storage listeners in a pod namespace, reached over a real `lhnet1`.
//!
//! pod (lhnet1 10.31.0.2) ──storage bridge── client (lhnet1 10.31.0.3). A process in the pod
//! listens on 127.0.0.1 only; lhnet-proxy exposes it on the pod's storage address.
// Synchronous tests driving namespaces and threads: std's sleep between polls.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

mod common;

use common::{admin_get, metric, spawn_proxy, KillOnDrop};
use lhnet_netns::{run_in, spawn_in, Namespace, Topology};
use sha2::{Digest, Sha256};

const PORT: u16 = 10000;

/// Deterministic bytes: block `i` of 64 KiB is filled from `seed` and `i`.
fn block(seed: u8, i: usize) -> Vec<u8> {
    (0..64 << 10)
        .map(|j| seed.wrapping_add((i * 31 + j * 7) as u8))
        .collect()
}

/// The local process: for each connection, sends `blocks` blocks while reading until the
/// client's end of stream, then sends the SHA-256 of what it read and closes.
fn loopback_server(ns: &str, blocks: usize) -> std::thread::JoinHandle<std::io::Result<()>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = spawn_in(ns, move || {
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        ready_tx.send(()).unwrap();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            // Probes connect and leave at once: errors end that connection only.
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut writer = stream.try_clone()?;
                let sender = std::thread::spawn(move || -> std::io::Result<TcpStream> {
                    for i in 0..blocks {
                        writer.write_all(&block(2, i))?;
                    }
                    Ok(writer)
                });
                let mut hash = Sha256::new();
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = stream.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                }
                // The client's half-close arrived through lhnet; answer after it.
                let mut writer = sender
                    .join()
                    .map_err(|_| std::io::Error::other("sender panicked"))??;
                writer.write_all(&hash.finalize())
            });
        }
    })
    .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    handle
}

fn start_proxy(topo: &Topology, pod: &Namespace, tag: &str) -> KillOnDrop {
    let config = common::write_config(
        &format!("tcp-{tag}"),
        &format!(
            "admin: {{ address: 127.0.0.1:9901 }}\n\
             storage_network: {{ interface: lhnet1, fallback: wait }}\n\
             listeners:\n  - {{ name: replica_data, kind: tcp, address: \"storage:{PORT}-{}\", cluster: loopback }}\n",
            PORT + 2
        ),
    );
    spawn_proxy(topo, pod, &config, &[])
}

/// From the client namespace: sends `blocks` blocks and half-closes, reads everything the
/// server sends until it closes. Returns (what the client read, without the trailer; the
/// server's digest of what it read).
fn exchange(ns: &str, to: SocketAddr, blocks: usize) -> ([u8; 32], Vec<u8>, u64) {
    run_in(ns, move || {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let mut hash = Sha256::new();
            for i in 0..blocks {
                let b = block(1, i);
                hash.update(&b);
                writer.write_all(&b).unwrap();
            }
            writer.shutdown(Shutdown::Write).unwrap();
            hash.finalize()
        });
        let mut received = Vec::with_capacity(blocks * (64 << 10) + 32);
        stream.read_to_end(&mut received).unwrap();
        let sent_digest = sender.join().unwrap();
        let trailer = received.split_off(received.len().saturating_sub(32));
        let mut hash = Sha256::new();
        hash.update(&received);
        let mut expect = Sha256::new();
        for i in 0..blocks {
            expect.update(block(2, i));
        }
        assert_eq!(
            hash.finalize(),
            expect.finalize(),
            "bytes from the server arrived changed"
        );
        (sent_digest.into(), trailer, received.len() as u64)
    })
    .unwrap()
}

#[test]
fn a_tcp_listener_moves_256_mib_each_way_across_lhnet1_intact_with_half_close() {
    if !common::root() {
        return;
    }
    let mut topo = Topology::new("tcp").unwrap();
    topo.add_bridge("stor").unwrap();
    let pod = topo.add_namespace("pod").unwrap();
    let client = topo.add_namespace("client").unwrap();
    topo.attach(&pod, "lhnet1", "stor", Some("10.31.0.2/24"))
        .unwrap();
    topo.attach(&client, "lhnet1", "stor", Some("10.31.0.3/24"))
        .unwrap();
    let blocks = 4096; // 256 MiB
    let _server = loopback_server(&pod.name, blocks);
    let _proxy = start_proxy(&topo, &pod, "bulk");
    let to: SocketAddr = format!("10.31.0.2:{PORT}").parse().unwrap();

    let (sent_digest, server_digest, received) = exchange(&client.name, to, blocks);
    assert_eq!(received, (blocks as u64) << 16);
    assert_eq!(
        server_digest,
        sent_digest.to_vec(),
        "the server read other bytes than the client sent"
    );

    let (_, metrics) = admin_get(&pod.name, "/metrics");
    let series = |name: &str| metric(&metrics, name).unwrap_or(0.0);
    let rx = series("lhnet_interface_receive_bytes_total{device=\"lhnet1\",network=\"storage\"}");
    let tx = series("lhnet_interface_transmit_bytes_total{device=\"lhnet1\",network=\"storage\"}");
    let lo_tx = series("lhnet_interface_transmit_bytes_total{device=\"lo\",network=\"loopback\"}");
    let total = (blocks as f64) * 65536.0;
    assert_eq!(rx, total, "{metrics}");
    assert_eq!(tx, total + 32.0, "{metrics}");
    assert_eq!(lo_tx, total, "{metrics}");
}

#[test]
fn a_late_lhnet1_makes_the_proxy_ready_and_an_address_change_rebinds() {
    if !common::root() {
        return;
    }
    let mut topo = Topology::new("late").unwrap();
    topo.add_bridge("stor").unwrap();
    let pod = topo.add_namespace("pod").unwrap();
    let client = topo.add_namespace("client").unwrap();
    topo.attach(&client, "lhnet1", "stor", Some("10.31.0.3/24"))
        .unwrap();
    let _server = loopback_server(&pod.name, 16);
    let _proxy = start_proxy(&topo, &pod, "late");

    // No lhnet1 yet: not ready, nothing bound on a storage address.
    let (code, body) = admin_get(&pod.name, "/ready");
    assert_eq!(code, 503, "ready without a storage address: {body}");
    std::thread::sleep(Duration::from_secs(1));
    topo.attach(&pod, "lhnet1", "stor", Some("10.31.0.2/24"))
        .unwrap();
    let attached = Instant::now();
    let first: SocketAddr = format!("10.31.0.2:{PORT}").parse().unwrap();
    loop {
        let ready = admin_get(&pod.name, "/ready").0 == 200;
        let accepts = run_in(&client.name, move || {
            TcpStream::connect_timeout(&first, Duration::from_millis(200)).is_ok()
        })
        .unwrap();
        if ready && accepts {
            break;
        }
        assert!(
            attached.elapsed() < Duration::from_secs(2),
            "2 s after lhnet1 came up: ready={ready}, listener accepts={accepts}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, _, received) = exchange(&client.name, first, 16);
    assert_eq!(received, 16 << 16);

    // (Deleting a primary address also deletes the secondaries of its subnet: delete first.)
    topo.del_address(&pod, "lhnet1", "10.31.0.2/24").unwrap();
    topo.add_address(&pod, "lhnet1", "10.31.0.9/24").unwrap();
    let changed = Instant::now();
    let second: SocketAddr = format!("10.31.0.9:{PORT}").parse().unwrap();
    loop {
        let (_, storage) = admin_get(&pod.name, "/storage");
        let moved = storage.contains("\"10.31.0.9\"");
        let accepts = moved
            && run_in(&client.name, move || {
                TcpStream::connect_timeout(&second, Duration::from_millis(200)).is_ok()
            })
            .unwrap();
        if accepts {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "5 s after the address change: storage={storage}, new address accepts={accepts}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, _, received) = exchange(&client.name, second, 16);
    assert_eq!(received, 16 << 16);
}

/// A one-line TCP echo server on 127.0.0.1:`port` inside `ns` (a BIM socket stand-in).
fn loopback_echo(ns: &str, port: u16) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        ready_tx.send(()).unwrap();
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut stream = stream;
                let mut line = Vec::new();
                stream.read_to_end(&mut line)?;
                stream.write_all(&line)
            });
        }
    })
    .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
}

fn tcp_echo_from(ns: &str, to: SocketAddr) -> std::io::Result<Vec<u8>> {
    run_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.write_all(b"sync")?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back)
    })
    .unwrap()
}

#[test]
fn the_bim_example_serves_grpc_on_both_networks_and_sync_ports_on_lhnet1_only() {
    if !common::root() {
        return;
    }
    let mut topo = Topology::new("bim").unwrap();
    topo.add_bridge("mgmt").unwrap();
    topo.add_bridge("stor").unwrap();
    let manager = topo.add_namespace("manager").unwrap();
    let bim = topo.add_namespace("bim").unwrap();
    let peer = topo.add_namespace("peer").unwrap();
    topo.attach(&manager, "eth0", "mgmt", Some("10.42.0.1/24"))
        .unwrap();
    topo.attach(&bim, "eth0", "mgmt", Some("10.42.0.2/24"))
        .unwrap();
    topo.attach(&bim, "lhnet1", "stor", Some("10.30.0.2/24"))
        .unwrap();
    topo.attach(&peer, "lhnet1", "stor", Some("10.30.0.3/24"))
        .unwrap();

    // The BIM stand-ins, bound to loopback as the example says: gRPC on 18000, the sync
    // service on 8001 and one Sync receiver on 30001.
    let stop_echo = echo_server_in(&bim.name, "bim");
    loopback_echo(&bim.name, 8001);
    loopback_echo(&bim.name, 30001);

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/bim.yaml");
    let _proxy = spawn_proxy(&topo, &bim, Path::new(example), &[]);

    // BIM gRPC through lhnet from the manager (pod IP) and from a peer BIM (storage IP).
    for (ns, target) in [
        (&manager.name, "10.42.0.2:8000"),
        (&peer.name, "10.30.0.2:8000"),
    ] {
        let server = echo_from(ns, target.parse().unwrap()).unwrap();
        assert_eq!(server, "bim", "gRPC to {target}");
    }
    // The sync service and receivers: reachable on lhnet1, not on the management network.
    for port in [8001, 30001] {
        let storage: SocketAddr = format!("10.30.0.2:{port}").parse().unwrap();
        assert_eq!(tcp_echo_from(&peer.name, storage).unwrap(), b"sync");
        let management: SocketAddr = format!("10.42.0.2:{port}").parse().unwrap();
        assert!(
            tcp_echo_from(&manager.name, management).is_err(),
            "port {port} must not be open on the management network"
        );
    }
    let _ = stop_echo.send(());
}

/// lhnet's echo gRPC service on 127.0.0.1:18000 inside `ns`, answering as `name`, until the
/// returned sender is used or dropped.
fn echo_server_in(ns: &str, name: &'static str) -> tokio::sync::oneshot::Sender<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        common::runtime().block_on(async move {
            let _server = lhnet_proto::echo_server::spawn("127.0.0.1:18000".parse().unwrap(), name)
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            let _ = stop_rx.await;
        })
    })
    .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    stop_tx
}

/// One echo call from `ns` to `target`; the server's name, or the error.
fn echo_from(ns: &str, target: SocketAddr) -> Result<String, String> {
    run_in(ns, move || {
        common::runtime().block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_millis(300))
                .timeout(Duration::from_secs(2))
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            lhnet_proto::echo::echo_client::EchoClient::new(channel)
                .unary(lhnet_proto::echo::EchoRequest {
                    payload: b"x".to_vec(),
                    count: 0,
                    delay_ms: 0,
                })
                .await
                .map(|r| r.into_inner().server)
                .map_err(|e| e.to_string())
        })
    })
    .unwrap()
}

#[test]
fn a_grpc_listener_on_the_storage_address_binds_late_and_follows_a_change() {
    if !common::root() {
        return;
    }
    let mut topo = Topology::new("glate").unwrap();
    topo.add_bridge("stor").unwrap();
    let pod = topo.add_namespace("pod").unwrap();
    let client = topo.add_namespace("client").unwrap();
    topo.attach(&client, "lhnet1", "stor", Some("10.31.0.3/24"))
        .unwrap();
    // A gRPC service in the pod on loopback only.
    let stop_echo = echo_server_in(&pod.name, "in-pod");
    let config = common::write_config(
        "grpc-late",
        "admin: { address: 127.0.0.1:9901 }\n\
         storage_network: { interface: lhnet1, fallback: wait }\n\
         listeners:\n  - name: data_grpc\n    address: storage:8000\n    routes:\n\
         \x20     - { match: { prefix: / }, cluster: local }\n\
         clusters: [{ name: local, type: static, endpoints: [127.0.0.1:18000], upstream_bind_config: { source_address: none } }]\n",
    );
    // Starts without lhnet1 (it used to refuse to start with a storage:PORT gRPC listener).
    let _proxy = spawn_proxy(&topo, &pod, &config, &[]);
    assert_eq!(admin_get(&pod.name, "/ready").0, 503);

    topo.attach(&pod, "lhnet1", "stor", Some("10.31.0.2/24"))
        .unwrap();
    let first: SocketAddr = "10.31.0.2:8000".parse().unwrap();
    let attached = Instant::now();
    loop {
        match echo_from(&client.name, first) {
            Ok(server) => {
                assert_eq!(server, "in-pod");
                break;
            }
            Err(e) => assert!(
                attached.elapsed() < Duration::from_secs(3),
                "3 s after lhnet1 came up, gRPC on {first} fails: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    topo.del_address(&pod, "lhnet1", "10.31.0.2/24").unwrap();
    topo.add_address(&pod, "lhnet1", "10.31.0.9/24").unwrap();
    let second: SocketAddr = "10.31.0.9:8000".parse().unwrap();
    let changed = Instant::now();
    loop {
        match echo_from(&client.name, second) {
            Ok(server) => {
                assert_eq!(server, "in-pod");
                break;
            }
            Err(e) => assert!(
                changed.elapsed() < Duration::from_secs(5),
                "5 s after the address change, gRPC on {second} fails: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = stop_echo.send(());
}
