//! Root only: the simulated instance-manager behind lhnet in a pod namespace (eth0 on the
//! management bridge, lhnet1 on the storage bridge). A manager in its own namespace creates
//! engines through lhnet with management addresses only, as Longhorn does in management-only
//! mode, once with ProcessManagerService/ProcessCreate and once with InstanceService/
//! InstanceCreate: the instance-manager starts them with the replicas' storage addresses, the
//! engines reach their replicas over lhnet1 (the replicas' connections all come from the engine
//! pod's storage address), and the manager's view (ProcessGet, InstanceGet, lists) shows the
//! management addresses it sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use lhnet_netns::{read_device_counters, run_in, spawn_in, DeviceCounters, Topology};
use lhnet_proto::imrpc::instance_service_client::InstanceServiceClient;
use lhnet_proto::imrpc::{
    InstanceCreateRequest, InstanceGetRequest, InstanceSpec, ProcessInstanceSpec,
};
use lhnet_proto::process_manager::process_manager_service_client::ProcessManagerServiceClient;
use lhnet_proto::process_manager::{
    ProcessCreateRequest, ProcessDeleteRequest, ProcessGetRequest, ProcessListRequest, ProcessSpec,
};
use tonic::transport::Channel;

/// A child process killed (and reaped) when the test ends, also by panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn counters(ns: &str) -> BTreeMap<String, DeviceCounters> {
    run_in(ns, read_device_counters).unwrap().unwrap()
}

async fn channel(addr: &str) -> Channel {
    for _ in 0..100 {
        if let Ok(c) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing answers at {addr}")
}

fn engine_args(volume: &str, replica: &str) -> Vec<String> {
    [
        "controller",
        volume,
        "--frontend",
        "",
        "--size",
        "16Mi",
        "--replica",
    ]
    .map(String::from)
    .into_iter()
    .chain([format!("tcp://{replica}")])
    .collect()
}

#[test]
// The namespace helpers are synchronous: std's sleep while waiting for the instance-manager.
#[allow(clippy::disallowed_methods)]
fn engines_created_through_lhnet_with_management_addresses_use_the_storage_network() {
    if !Topology::can_build() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test builds network namespaces and needs root: CI is set, so it must run here"
        );
        eprintln!(
            "skipped: this test builds network namespaces and needs root (CI runs it as root)"
        );
        return;
    }
    let mut topo = Topology::new("imsim").unwrap();
    topo.add_bridge("mgmt").unwrap();
    topo.add_bridge("stor").unwrap();
    let manager = topo.add_namespace("manager").unwrap();
    topo.attach(&manager, "eth0", "mgmt", Some("10.42.0.1/24"))
        .unwrap();
    let pod = topo.add_namespace("engine").unwrap();
    let replicas = topo.add_namespace("replica").unwrap();
    for (ns, host) in [(&pod, 2), (&replicas, 3)] {
        topo.attach(ns, "eth0", "mgmt", Some(&format!("10.42.0.{host}/24")))
            .unwrap();
        topo.attach(ns, "lhnet1", "stor", Some(&format!("10.30.0.{host}/24")))
            .unwrap();
    }

    // The replica pod: two simulated replica processes, listening on every address as
    // Longhorn's do.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    spawn_in(&replicas.name, move || {
        runtime().block_on(async move {
            let mut running = Vec::new();
            for port in [10000u16, 10020] {
                let addr = SocketAddr::from(([0, 0, 0, 0], port));
                running.push(lhnet_sim::start_replica(addr, 16 << 20).await.unwrap());
            }
            ready_tx.send(()).unwrap();
            let _ = stop_rx.await;
        })
    })
    .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    // The engine pod: the instance-manager (a process, as in Longhorn's pod) and lhnet.
    let bin = env!("CARGO_BIN_EXE_lhnet-loadtest");
    let _im = KillOnDrop(
        topo.command(&pod, bin)
            .args([
                "instance-manager",
                "--listen",
                "127.0.0.1:8500",
                "--instance-listen",
                "127.0.0.1:8503",
                "--port-range",
                "10100-10199",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let im_up = run_in(&pod.name, || {
        (0..100).any(|_| {
            let up = std::net::TcpStream::connect("127.0.0.1:8500").is_ok()
                && std::net::TcpStream::connect("127.0.0.1:8503").is_ok();
            if !up {
                std::thread::sleep(Duration::from_millis(100));
            }
            up
        })
    })
    .unwrap();
    assert!(im_up, "the instance-manager did not start within 10 s");
    let config = "admin: { address: 127.0.0.1:0 }\n\
        storage_network: { interface: lhnet1 }\n\
        peers: { 10.42.0.3: 10.30.0.3 }\npeer_lookup: { enabled: false }\n\
        listeners:\n\
        \x20 - name: process_manager\n    address: 0.0.0.0:8510\n    routes:\n\
        \x20     - { match: { prefix: / }, cluster: instance_manager }\n\
        \x20 - name: instance\n    address: 0.0.0.0:8513\n    routes:\n\
        \x20     - { match: { prefix: / }, cluster: instance_service }\n\
        clusters:\n\
        \x20 - { name: instance_manager, endpoints: [127.0.0.1:8500], upstream_bind_config: { source_address: none } }\n\
        \x20 - { name: instance_service, endpoints: [127.0.0.1:8503], upstream_bind_config: { source_address: none } }\n";
    let (lhnet_tx, lhnet_rx) = std::sync::mpsc::channel();
    let (lhnet_stop_tx, lhnet_stop_rx) = tokio::sync::oneshot::channel::<()>();
    spawn_in(&pod.name, move || {
        runtime().block_on(async move {
            let config = lhnet_proxy::config::Config::parse(config, "pod").unwrap();
            let options = lhnet_proxy::app::Options {
                pod_ip: Some("10.42.0.2".parse().unwrap()),
            };
            let proxy = lhnet_proxy::app::start(config, options).await.unwrap();
            lhnet_tx.send(()).unwrap();
            let _ = lhnet_stop_rx.await;
            proxy.shutdown().await;
        })
    })
    .unwrap();
    lhnet_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let before = counters(&replicas.name);

    // The manager: management addresses only.
    let seen = run_in(&manager.name, || {
        runtime().block_on(async {
            let mut pm = ProcessManagerServiceClient::new(channel("10.42.0.2:8510").await);
            let spec = ProcessSpec {
                name: "vol-a-e-0".into(),
                binary: "/engine-binaries/longhornio-longhorn-engine-v1.12.1/longhorn".into(),
                args: engine_args("vol-a", "10.42.0.3:10000"),
                port_count: 1,
                port_args: vec!["--listen,0.0.0.0:".into()],
            };
            let created = pm
                .process_create(ProcessCreateRequest {
                    spec: Some(spec.clone()),
                })
                .await
                .expect("ProcessCreate through lhnet")
                .into_inner();
            let mut instances = InstanceServiceClient::new(channel("10.42.0.2:8513").await);
            let instance = InstanceSpec {
                name: "vol-b-e-0".into(),
                r#type: "engine".into(),
                volume_name: "vol-b".into(),
                port_count: 1,
                port_args: vec!["--listen,0.0.0.0:".into()],
                process_instance_spec: Some(ProcessInstanceSpec {
                    binary: "/engine-binaries/longhornio-longhorn-engine-v1.12.1/longhorn".into(),
                    args: engine_args("vol-b", "10.42.0.3:10020"),
                }),
                ..Default::default()
            };
            instances
                .instance_create(InstanceCreateRequest {
                    spec: Some(instance),
                    ..Default::default()
                })
                .await
                .expect("InstanceCreate through lhnet");
            // Both engines running (their port answers once they opened their replicas).
            let mut states = Vec::new();
            for _ in 0..150 {
                let a = pm
                    .process_get(ProcessGetRequest {
                        name: "vol-a-e-0".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let b = instances
                    .instance_get(InstanceGetRequest {
                        name: "vol-b-e-0".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                states = vec![
                    a.status.clone().unwrap().state,
                    b.status.clone().unwrap().state,
                ];
                if states.iter().all(|s| s == "running") {
                    let listed = pm
                        .process_list(ProcessListRequest {})
                        .await
                        .unwrap()
                        .into_inner();
                    return (created, a, b, listed, spec);
                }
                assert!(
                    !states.iter().any(|s| s == "error"),
                    "an engine failed: {a:?} {b:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("engines not running after 15 s: {states:?}")
        })
    })
    .unwrap();
    let (created, got_a, got_b, listed, sent) = seen;

    // The manager sees the management addresses it sent, in every answer.
    let has = |args: &[String], what: &str| args.iter().any(|a| a == what);
    let a_args = &got_a.spec.as_ref().unwrap().args;
    assert!(has(a_args, "tcp://10.42.0.3:10000"), "{a_args:?}");
    assert!(!a_args.iter().any(|a| a.contains("10.30.0.")), "{a_args:?}");
    assert_eq!(
        created.spec.as_ref().unwrap().args[..sent.args.len()],
        sent.args[..]
    );
    let b_args = &got_b.spec.unwrap().process_instance_spec.unwrap().args;
    assert!(has(b_args, "tcp://10.42.0.3:10020"), "{b_args:?}");
    assert!(has(
        &listed.processes["vol-b-e-0"].spec.as_ref().unwrap().args,
        "tcp://10.42.0.3:10020"
    ));

    // The instance-manager itself (asked inside the pod, not through lhnet) runs them with
    // the storage addresses.
    let inside = run_in(&pod.name, || {
        runtime().block_on(async {
            let mut pm = ProcessManagerServiceClient::new(channel("127.0.0.1:8500").await);
            pm.process_list(ProcessListRequest {})
                .await
                .unwrap()
                .into_inner()
        })
    })
    .unwrap();
    assert!(has(
        &inside.processes["vol-a-e-0"].spec.as_ref().unwrap().args,
        "tcp://10.30.0.3:10000"
    ));
    assert!(has(
        &inside.processes["vol-b-e-0"].spec.as_ref().unwrap().args,
        "tcp://10.30.0.3:10020"
    ));

    // And the engines reached their replicas over lhnet1: the replica pod's eth0 stayed flat.
    let after = counters(&replicas.name);
    let grew = |dev: &str| after[dev].rx_bytes - before[dev].rx_bytes;
    eprintln!(
        "replica pod rx while the engines started: lhnet1 {} bytes, eth0 {} bytes",
        grew("lhnet1"),
        grew("eth0")
    );
    assert!(
        grew("lhnet1") > grew("eth0"),
        "lhnet1 rx grew {} bytes, eth0 {}",
        grew("lhnet1"),
        grew("eth0")
    );
    // Who the replicas' connections come from: the engine pod's storage address, only.
    let ss = topo
        .command(&replicas, "ss")
        .args([
            "-Htn",
            "state",
            "established",
            "( sport = :10000 or sport = :10020 )",
        ])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    let peers: Vec<&str> = ss
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    for port in ["10.30.0.3:10000", "10.30.0.3:10020"] {
        assert!(ss.contains(port), "no engine connection to {port}:\n{ss}");
    }
    assert!(
        !peers.is_empty() && peers.iter().all(|p| p.starts_with("10.30.0.2:")),
        "the replicas' connections come from {peers:?}, not only the engine pod's storage address"
    );

    // Deleting through lhnet stops the process.
    run_in(&manager.name, || {
        runtime().block_on(async {
            let mut pm = ProcessManagerServiceClient::new(channel("10.42.0.2:8510").await);
            let deleted = pm
                .process_delete(ProcessDeleteRequest {
                    name: "vol-a-e-0".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(deleted.deleted);
            for _ in 0..100 {
                let listed = pm
                    .process_list(ProcessListRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                if !listed.processes.contains_key("vol-a-e-0") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("vol-a-e-0 still listed 10 s after its delete");
        })
    })
    .unwrap();
    let _ = lhnet_stop_tx.send(());
    let _ = stop_tx.send(());
}
