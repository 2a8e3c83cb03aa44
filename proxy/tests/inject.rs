//! Injection over AdmissionReview fixtures (written from `spec/kubernetes.md`): the exact patch
//! or none, the injected pod valid for Kubernetes 1.33, malformed input allowed with a warning,
//! and the webhook over real HTTPS with a certificate that is renewed under it.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use lhnet_proxy::inject::webhook;
use lhnet_proxy::inject::{self, InjectOptions, Mode};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/admission")
}

fn opts() -> InjectOptions {
    InjectOptions {
        image: "example.invalid/lhnet-proxy:test".into(),
        storage_network: Some(("kube-system".into(), "demo-10-30-0-0".into())),
        ..Default::default()
    }
}

fn load(name: &str) -> Value {
    let path = fixtures().join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The decoded patch of a review response, or None.
fn patch_of(response: &Value) -> Option<Vec<Value>> {
    let r = &response["response"];
    assert_eq!(r["allowed"], true, "{response}");
    let encoded = r.get("patch")?.as_str()?;
    assert_eq!(r["patchType"], "JSONPatch");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    Some(serde_json::from_slice(&raw).unwrap())
}

fn review(name: &str, opts: &InjectOptions) -> Value {
    let body = serde_json::to_vec(&load(name)).unwrap();
    let response = webhook::review(&body, opts);
    assert_eq!(
        response["response"]["uid"],
        "b7a3c1e2-0f4d-4e8a-9c61-2d5e7f8a9b10"
    );
    response
}

/// `kubernetes-validate --strict -k 1.33.0` on a pod (CI installs it).
fn validate(pod: &Value, name: &str) {
    if lhnet_validate_missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "kubernetes-validate is missing: CI is set, so {name} must be validated"
        );
        eprintln!("kubernetes-validate not installed (pip install kubernetes-validate); {name} not validated");
        return;
    }
    let dir = std::env::temp_dir().join(format!("lhnet-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, serde_yaml_ng::to_string(pod).unwrap()).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.33.0"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} is not a valid 1.33 pod:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lhnet_validate_missing() -> bool {
    Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_err()
}

fn expected_patch(name: &str) -> Vec<Value> {
    let path = fixtures().join(format!("{name}.patch.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn instance_and_backing_image_manager_pods_get_the_exact_patch_and_stay_valid() {
    for name in ["im", "bim", "guaranteed"] {
        let response = review(name, &opts());
        let patch = patch_of(&response).unwrap_or_else(|| panic!("{name}: no patch"));
        assert_eq!(patch, expected_patch(name), "{name}");
        assert!(response["response"].get("warnings").is_none(), "{response}");
        let mut pod = load(name)["request"]["object"].clone();
        let before = pod["spec"]["containers"].clone();
        inject::apply_patch(&mut pod, &patch).unwrap();
        assert_eq!(
            pod["spec"]["containers"], before,
            "{name}: containers changed"
        );
        validate(&pod, name);
    }
}

#[test]
fn the_guaranteed_pod_stays_guaranteed() {
    let patch = patch_of(&review("guaranteed", &opts())).unwrap();
    let mut pod = load("guaranteed")["request"]["object"].clone();
    inject::apply_patch(&mut pod, &patch).unwrap();
    let all: Vec<&Value> = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["spec"]["initContainers"].as_array().unwrap())
        .collect();
    for c in all {
        for r in ["cpu", "memory"] {
            assert_eq!(
                c["resources"]["requests"][r], c["resources"]["limits"][r],
                "{}: {r}",
                c["name"]
            );
        }
    }
}

#[test]
fn injected_opted_out_and_unrelated_pods_get_no_patch() {
    // Already injected: the IM pod with its patch applied.
    let mut injected = load("im");
    let patch = patch_of(&review("im", &opts())).unwrap();
    inject::apply_patch(&mut injected["request"]["object"], &patch).unwrap();
    let again = webhook::review(&serde_json::to_vec(&injected).unwrap(), &opts());
    assert!(patch_of(&again).is_none(), "{again}");

    for name in ["opted-out", "unrelated"] {
        let response = review(name, &opts());
        assert!(patch_of(&response).is_none(), "{name}: {response}");
        assert!(response["response"].get("warnings").is_none());
    }
    // The sidecar recognised in containers too (an older, regular-container injection).
    let mut old_style = load("im");
    old_style["request"]["object"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "lhnet-proxy", "image": "x"}));
    assert!(patch_of(&webhook::review(
        &serde_json::to_vec(&old_style).unwrap(),
        &opts()
    ))
    .is_none());
}

#[test]
fn an_existing_multus_annotation_is_left_with_a_warning() {
    let response = review("multus-existing", &opts());
    let patch = patch_of(&response).unwrap();
    assert!(
        !patch
            .iter()
            .any(|op| op["path"].as_str().unwrap().contains("networks")
                || op["value"].get("k8s.v1.cni.cncf.io/networks").is_some()),
        "{patch:?}"
    );
    let warnings = response["response"]["warnings"].as_array().unwrap();
    assert!(
        warnings[0].as_str().unwrap().contains("other-net"),
        "{warnings:?}"
    );
}

#[test]
fn malformed_reviews_are_allowed_with_a_warning() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"{not json".to_vec()),
        ("no request", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec()),
        (
            "no uid",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"kind":{"kind":"Pod"},"operation":"CREATE","object":{}}}"#.to_vec(),
        ),
        ("10 MB", vec![b' '; 10 << 20]),
    ];
    for (what, body) in cases {
        let response = webhook::review(&body, &opts());
        assert_eq!(response["response"]["allowed"], true, "{what}");
        assert!(response["response"].get("patch").is_none(), "{what}");
        let warning = response["response"]["warnings"][0]
            .as_str()
            .unwrap_or_default();
        assert!(
            warning.starts_with("lhnet: not injected: "),
            "{what}: {response}"
        );
    }
    // A pod whose spec has no containers: allowed, warned.
    let mut broken = load("im");
    broken["request"]["object"]["spec"] = json!({});
    let response = webhook::review(&serde_json::to_vec(&broken).unwrap(), &opts());
    assert!(patch_of(&response).is_none());
    assert!(response["response"]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("no containers"));
}

#[test]
fn capture_mode_adds_the_capture_init_container_with_net_admin_only() {
    let capture = InjectOptions {
        mode: Mode::Capture,
        ..opts()
    };
    let patch = patch_of(&review("im", &capture)).unwrap();
    let inits = patch[0]["value"].as_array().unwrap();
    assert_eq!(inits[0]["name"], "lhnet-capture");
    assert_eq!(
        inits[0]["args"],
        json!([
            "capture",
            "--redirect",
            "8500:8510",
            "--redirect",
            "8501:8511",
            "--redirect",
            "8502:8512",
            "--redirect",
            "8503:8513"
        ])
    );
    assert_eq!(
        inits[0]["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN"])
    );
    assert!(inits[0].get("restartPolicy").is_none(), "capture runs once");
    assert_eq!(inits[1]["name"], "lhnet-proxy");
    let mut pod = load("im")["request"]["object"].clone();
    inject::apply_patch(&mut pod, &patch).unwrap();
    validate(&pod, "im-capture");
}

/// A TLS connection to the webhook, trusting only `ca`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &Path,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    let mut roots = RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("lhnet-injector.longhorn-system.svc").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

/// POSTs `body` to the webhook over TLS, trusting only `ca`.
async fn post_https(addr: std::net::SocketAddr, ca: &Path, body: Vec<u8>) -> Result<Value, String> {
    use http_body_util::{BodyExt, Full};

    let tls = tls_connect(addr, ca).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = http::Request::post("/mutate")
        .header("host", "lhnet-injector.longhorn-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = send
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(response.status(), 200);
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_webhook_answers_over_https_and_picks_up_a_renewed_certificate() {
    let dir = std::env::temp_dir().join(format!("lhnet-webhook-{}", std::process::id()));
    let files = webhook::make_certs("lhnet-injector", "longhorn-system", &dir).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(webhook::serve(
        listener,
        files.cert.clone(),
        files.key.clone(),
        opts(),
        shutdown.clone(),
    ));
    let body = std::fs::read(fixtures().join("im.json")).unwrap();
    let answer = post_https(addr, &files.ca, body.clone()).await.unwrap();
    assert_eq!(patch_of(&answer).unwrap(), expected_patch("im"));
    let not_json = post_https(addr, &files.ca, b"nope".to_vec()).await.unwrap();
    assert_eq!(not_json["response"]["allowed"], true);

    // Renewal: a new CA and certificate written over the files (as a Secret update would).
    let old_ca = dir.join("old-ca.crt");
    std::fs::copy(&files.ca, &old_ca).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // a different mtime
    let renewed = webhook::make_certs("lhnet-injector", "longhorn-system", &dir).unwrap();
    let answer = post_https(addr, &renewed.ca, body).await.unwrap();
    assert!(patch_of(&answer).is_some());
    let stale = post_https(addr, &old_ca, b"{}".to_vec()).await;
    assert!(
        stale.as_ref().is_err_and(|e| e.starts_with("TLS")),
        "the old CA still verifies: {stale:?}"
    );
    // A connection that has done its handshake and then says nothing is closed (10 s).
    let mut idle = tls_connect(addr, &renewed.ca).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        use tokio::io::AsyncReadExt;
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle webhook connection stays open");
    shutdown.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_shipped_configmaps_hold_configs_lhnet_accepts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sidecar-manifests/base");
    let sidecar: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir.join("configmap-sidecar.yaml")).unwrap(),
    )
    .unwrap();
    let text = sidecar["data"]["config.yaml"].as_str().unwrap();
    let config = lhnet_proxy::config::Config::parse(text, "configmap-sidecar.yaml").unwrap();
    let names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "management",
            "process_manager",
            "disk",
            "instance",
            "backup_egress"
        ]
    );
    // The backup egress is on loopback (nothing to declare), from the storage address.
    let egress = &config.listeners[4];
    assert_eq!(
        (egress.kind, egress.address.to_string().as_str()),
        (
            lhnet_proxy::config::ListenerKind::HttpConnect,
            "127.0.0.1:8520"
        )
    );
    // The ports the injected container declares are the ones the config listens on.
    let opts = InjectOptions::default();
    assert_eq!(
        config.listeners[0].address.to_string(),
        format!("0.0.0.0:{}", opts.proxy_port)
    );
    assert_eq!(
        config.listeners[1].address.to_string(),
        format!("0.0.0.0:{}", opts.process_manager_port)
    );
    assert_eq!(
        config.listeners[2].address.to_string(),
        format!("0.0.0.0:{}", opts.disk_port)
    );
    assert_eq!(
        config.listeners[3].address.to_string(),
        format!("0.0.0.0:{}", opts.instance_port)
    );
    // Every gRPC listener and the instance-manager's clusters take Longhorn's mTLS when it is
    // there (the loopback egress proxy speaks plain HTTP proxying; https targets tunnel TLS).
    assert!(config
        .listeners
        .iter()
        .filter(|l| l.kind == lhnet_proxy::config::ListenerKind::Grpc)
        .all(|l| l.tls.is_some()));
    assert_eq!(config.admin.address.port(), opts.admin_port);

    let injector: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir.join("configmap-injector.yaml")).unwrap(),
    )
    .unwrap();
    let file =
        std::env::temp_dir().join(format!("lhnet-inject-settings-{}.yaml", std::process::id()));
    std::fs::write(&file, injector["data"]["inject.yaml"].as_str().unwrap()).unwrap();
    let settings = inject::InjectSettings::load(&file).unwrap();
    assert_eq!(settings.config_map, "lhnet-sidecar");
    std::fs::write(&file, "mode: tap\n").unwrap();
    assert!(inject::InjectSettings::load(&file)
        .unwrap_err()
        .contains("sidecar or capture"));
    std::fs::write(&file, "imag: x\n").unwrap();
    assert!(inject::InjectSettings::load(&file)
        .unwrap_err()
        .contains("unknown field"));
    let _ = std::fs::remove_file(&file);
}
