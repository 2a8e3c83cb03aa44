//! What the tests share: the lhnet-proxy binary in a namespace, its admin server, and the
//! skip line when not root; Longhorn volumes of the simulator behind an in-process lhnet
//! ([`longhorn`]); moto's S3 server ([`moto`]).
#![allow(dead_code)] // each test file uses its own share

pub mod azurite;
pub mod longhorn;
pub mod moto;
pub mod raw_h2;
pub mod servers;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use lhnet_netns::{run_in, Namespace, Topology};

/// lhnet with the engine proxy on loopback (listener `m`) and a client of it; `extra` is
/// appended to its config (a `backup_target:` section, say).
pub async fn backup_proxy(
    extra: &str,
) -> (
    lhnet_proxy::app::RunningProxy,
    lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient<
        tonic::transport::Channel,
    >,
) {
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
        listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n\
        \x20     - match: {{ prefix: /imrpc.ProxyEngineService/ }}\n        local: longhorn_engine_proxy\n\
        clusters:\n  - name: engines\n    type: original_dst\n    allowed_destinations: [127.0.0.1]\n{extra}"
    );
    let config = lhnet_proxy::config::Config::parse(&yaml, "test").unwrap();
    let proxy = lhnet_proxy::app::start(config, lhnet_proxy::app::Options::default())
        .await
        .unwrap();
    let addr = proxy.listener_addr("m").unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        proxy,
        lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient::new(channel),
    )
}

/// Says why a test skips; under CI (which installs everything) a skip is a failure.
pub fn skip<T>(why: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("{why}: CI is set, so this test must run, not skip");
    }
    eprintln!("SKIP: {why}");
    None
}

/// `promtool check metrics` on a Prometheus text; without promtool a skip, except under CI.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if std::env::var_os("CI").is_some() => panic!("promtool is required in CI: {e}"),
        Err(e) => eprintln!("skipped promtool check: {e} (apt-get install prometheus)"),
    }
}

/// A child process killed (and reaped) when the test ends, also by panic.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// True when the test can build namespaces; otherwise says it skipped.
pub fn root() -> bool {
    if Topology::can_build() {
        return true;
    }
    let why = "this test builds network namespaces and needs root";
    if std::env::var_os("CI").is_some() {
        panic!("{why}: CI is set, so it must run here, not skip");
    }
    eprintln!("skipped: {why} (CI runs it as root)");
    false
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Starts the lhnet-proxy binary in `ns` with `--threads 1` and waits until its admin server
/// (127.0.0.1:9901 in the config) answers; listeners bind before the admin server does.
// Synchronous, like the namespace helpers it uses: std's sleep.
#[allow(clippy::disallowed_methods)]
pub fn spawn_proxy(
    topo: &Topology,
    ns: &Namespace,
    config: &Path,
    env: &[(&str, &str)],
) -> KillOnDrop {
    let mut cmd = topo.command(ns, env!("CARGO_BIN_EXE_lhnet-proxy"));
    cmd.arg("--config")
        .arg(config)
        .arg("--threads")
        .arg("1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let proxy = KillOnDrop(cmd.spawn().unwrap());
    let started = Instant::now();
    while !run_in(&ns.name, || TcpStream::connect("127.0.0.1:9901").is_ok()).unwrap() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "lhnet-proxy did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy
}

/// Writes `yaml` as `<tmp>/lhnet-<tag>-<pid>/pod.yaml` and returns its path.
pub fn write_config(tag: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lhnet-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pod.yaml");
    std::fs::write(&config, yaml).unwrap();
    config
}

/// `GET path` on the admin server inside `ns`: (status code, body).
pub fn admin_get(ns: &str, path: &'static str) -> (u16, String) {
    run_in(ns, move || {
        let mut s = TcpStream::connect("127.0.0.1:9901").unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    })
    .unwrap()
}

/// The value of one series in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// `lhnet_limits_reached_total{listener, limit}` in a `/metrics` text (0 when absent).
pub fn limit_count(metrics: &str, listener: &str, limit: &str) -> f64 {
    let series =
        format!("lhnet_limits_reached_total{{limit=\"{limit}\",listener=\"{listener}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
