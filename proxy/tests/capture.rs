//! Root only: capture mode in a real pod namespace. Servers bound on 0.0.0.0:8500-8503 stand
//! for the instance-manager's four services (process manager, proxy, disk, instance); after
//! `lhnet-proxy capture` with the injector's redirects, calls from the manager namespace to the
//! pod's eth0 address on each of them reach lhnet, and calls inside the pod still reach the IM.

use std::process::Command;
use std::time::Duration;

mod common;

use common::{admin_get, runtime, spawn_proxy};
use lhnet_netns::{run_in, spawn_in, Topology};
use lhnet_proto::echo::echo_client::EchoClient;
use lhnet_proto::echo::EchoRequest;
use lhnet_proxy::inject::{apply_patch, document_patch, Decision, InjectOptions, Mode};

/// The instance-manager's ports a manager dials, and lhnet's port for each (the injector's).
const PORTS: [(u16, u16); 4] = [(8500, 8510), (8501, 8511), (8502, 8512), (8503, 8513)];

fn unary(target: String) -> Result<String, String> {
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
                let mut _im = Vec::new();
                for (port, _) in PORTS {
                    let addr = format!("0.0.0.0:{port}").parse().unwrap();
                    _im.push(lhnet_proto::echo_server::spawn(addr, "im").await.unwrap());
                }
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

    let listeners: String = PORTS
        .iter()
        .map(|(_, lhnet)| {
            format!(
                "  - name: l{lhnet}\n    address: 0.0.0.0:{lhnet}\n    routes:\n\
                 \x20     - {{ match: {{ prefix: / }}, cluster: behind }}\n"
            )
        })
        .collect();
    let config = common::write_config(
        "capture",
        &format!(
            "admin: {{ address: 127.0.0.1:9901 }}\n\
             storage_network: {{ interface: lhnet1, fallback: pod_ip }}\n\
             listeners:\n{listeners}\
             clusters:\n  - {{ name: behind, endpoints: [127.0.0.1:7000], upstream_bind_config: {{ source_address: none }} }}\n"
        ),
    );
    let bin = env!("CARGO_BIN_EXE_lhnet-proxy");
    let _proxy = spawn_proxy(&topo, &pod, &config, &[("POD_IP", "10.42.0.2")]);

    let from = |ns: &str, target: String| run_in(ns, move || unary(target)).unwrap().unwrap();
    // Before capture, the manager reaches the instance-manager itself.
    for (port, _) in PORTS {
        assert_eq!(from(&manager.name, format!("10.42.0.2:{port}")), "im");
    }
    // The redirects the injector gives its capture container.
    let mut im_pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "instance-manager-x", "namespace": "longhorn-system",
                     "labels": {"longhorn.io/component": "instance-manager"}},
        "spec": {"containers": [{"name": "instance-manager", "image": "longhornio/longhorn-instance-manager:v1.12.1"}]}
    });
    let opts = InjectOptions {
        mode: Mode::Capture,
        ..Default::default()
    };
    let Decision::Inject { patch, .. } = document_patch(&im_pod, &opts).unwrap() else {
        panic!("an instance-manager pod is injected")
    };
    apply_patch(&mut im_pod, &patch).unwrap();
    let redirects: Vec<String> =
        serde_json::from_value(im_pod["spec"]["initContainers"][0]["args"].clone()).unwrap();
    let expected: Vec<String> = PORTS
        .iter()
        .flat_map(|(im, lhnet)| ["--redirect".to_string(), format!("{im}:{lhnet}")])
        .collect();
    assert_eq!(redirects[1..], expected[..], "capture args: {redirects:?}");

    for _ in 0..2 {
        let out = topo.command(&pod, bin).args(&redirects).output().unwrap();
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
    assert_eq!(rules.matches("redirect to").count(), 4, "{rules}");

    // From outside: lhnet answers every port (through its route), and counts it.
    for (port, _) in PORTS {
        assert_eq!(
            from(&manager.name, format!("10.42.0.2:{port}")),
            "behind-lhnet",
            "port {port} from outside"
        );
    }
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
    for (port, _) in PORTS {
        assert_eq!(from(&pod.name, format!("127.0.0.1:{port}")), "im");
        assert_eq!(from(&pod.name, format!("10.42.0.2:{port}")), "im");
    }

    // --remove takes the rules away again.
    let out = topo
        .command(&pod, bin)
        .args(["capture", "--remove"])
        .output()
        .unwrap();
    assert!(out.status.success());
    for (port, _) in PORTS {
        assert_eq!(from(&manager.name, format!("10.42.0.2:{port}")), "im");
    }
    let _ = stop_tx.send(());
}
