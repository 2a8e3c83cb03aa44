//! Root only: management-only addressing when the peer lhnet never answers.
//!
//! manager (10.42.0.1) ──mgmt bridge── pod (eth0 10.42.0.2, lhnet1 10.30.0.2)
//!                                  └── silent (10.42.0.9: accepts on 8501, never answers)

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;
use tokio::time::Instant;

mod common;

use common::{runtime, spawn_proxy};
use lhnet_netns::{run_in, spawn_in, Topology};
use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::ProxyEngineRequest;

#[test]
fn a_peer_that_never_answers_is_a_clear_error_within_the_lookup_timeout() {
    if !common::root() {
        return;
    }
    let mut topo = Topology::new("peer").unwrap();
    topo.add_bridge("mgmt").unwrap();
    topo.add_bridge("stor").unwrap();
    let manager = topo.add_namespace("manager").unwrap();
    let pod = topo.add_namespace("pod").unwrap();
    let silent = topo.add_namespace("silent").unwrap();
    topo.attach(&manager, "eth0", "mgmt", Some("10.42.0.1/24"))
        .unwrap();
    topo.attach(&pod, "eth0", "mgmt", Some("10.42.0.2/24"))
        .unwrap();
    topo.attach(&pod, "lhnet1", "stor", Some("10.30.0.2/24"))
        .unwrap();
    topo.attach(&silent, "eth0", "mgmt", Some("10.42.0.9/24"))
        .unwrap();

    // A peer that takes the connection and then says nothing, ever.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let _silent = spawn_in(&silent.name, move || {
        let listener = TcpListener::bind("10.42.0.9:8501").unwrap();
        ready_tx.send(()).unwrap();
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            let mut s2 = s;
            let mut buf = [0u8; 1024];
            let _ = s2.set_read_timeout(Some(Duration::from_millis(10)));
            let _ = s2.read(&mut buf);
            held.push(s2);
        }
    })
    .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let config = common::write_config(
        "peer",
        "admin: { address: 127.0.0.1:9901 }\n\
         storage_network: { interface: lhnet1, fallback: wait }\n\
         peer_lookup: { timeout: 500ms, failure_ttl: 1s }\n\
         listeners:\n  - name: management\n    address: 0.0.0.0:8501\n    routes:\n\
         \x20     - { match: { prefix: /imrpc.ProxyEngineService/ }, local: longhorn_engine_proxy }\n\
         \x20     - { match: { prefix: /lhnet.v1.Peer/ }, local: peer }\n\
         clusters:\n  - name: engines\n    type: original_dst\n    upstream_bind_config: { source_address: storage }\n\
         \x20   allowed_destinations: [storage]\n",
    );
    let _proxy = spawn_proxy(&topo, &pod, &config, &[]);

    let (elapsed, status, own, again) = run_in(&manager.name, || {
        runtime().block_on(async {
            let mut client = ProxyEngineServiceClient::connect("http://10.42.0.2:8501")
                .await
                .unwrap();
            let asked = Instant::now();
            let status = client
                .volume_get(ProxyEngineRequest {
                    address: "10.42.0.9:10000".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            let elapsed = asked.elapsed();
            // Asked again at once: the last failure is repeated without another wait.
            let again_at = Instant::now();
            let again = client
                .volume_get(ProxyEngineRequest {
                    address: "10.42.0.9:10000".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            let again = (again_at.elapsed(), again);
            // After failure_ttl the peer is asked again (and, still silent, waited for).
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let later_at = Instant::now();
            let later = client
                .volume_get(ProxyEngineRequest {
                    address: "10.42.0.9:10000".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert!(
                later_at.elapsed() >= Duration::from_millis(450)
                    && later.message().contains("within 500ms"),
                "after failure_ttl the peer was not asked again: {:?} {later:?}",
                later_at.elapsed()
            );
            // The pod's own management IP maps to its own storage IP (nothing listens
            // there, so the engine is unavailable — and the error names the management IP).
            let own = client
                .volume_get(ProxyEngineRequest {
                    address: "10.42.0.2:10000".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            (elapsed, status, own, again)
        })
    })
    .unwrap();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(
            "no storage address known for 10.42.0.9; peer lhnet did not answer: no answer from 10.42.0.9:8501 within 500ms"
        ),
        "{status:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1500),
        "the lookup took {elapsed:?} with a 500ms timeout"
    );
    let (again_took, again) = again;
    assert_eq!(again.code(), tonic::Code::Unavailable, "{again:?}");
    assert!(
        again.message().contains("peer lhnet did not answer")
            && again.message().contains("peer_lookup.failure_ttl"),
        "{again:?}"
    );
    assert!(
        again_took < Duration::from_millis(400),
        "a peer that just failed was asked again ({again_took:?}, timeout 500ms)"
    );
    assert_eq!(own.code(), tonic::Code::Unavailable, "{own:?}");
    assert!(
        own.message().contains("10.42.0.2:10000") && !own.message().contains("10.30.0.2"),
        "the manager sees only management addresses: {own:?}"
    );
}
