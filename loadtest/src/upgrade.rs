//! The seed's upgrade story (`demo --upgrade`): an instance-manager pod that starts without
//! lhnet, then gets it, as an injection would. The manager keeps one [`ProxyHandler`] per
//! instance-manager as longhorn-manager does: every tick it asks the IM's own `VersionGet` for
//! the proxy API version; at 0 (no proxy) it calls the engine directly, as the `longhorn` binary
//! would; above 0 it uses its proxy client, checking it alive (health Check) first and dropping
//! and re-dialling a dead one. Midway, lhnet starts in the pod with capture's redirect of the
//! IM's ports (8500-8503 from outside to lhnet): the next `VersionGet` is lhnet's answer, with
//! its proxy API version, and the manager moves over. Every call is counted per path and second;
//! the verdict: no call failed, both paths served, the switch came after lhnet started.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lhnet_proto::health::health_client::HealthClient;
use lhnet_proto::health::HealthCheckRequest;
use lhnet_proto::imrpc::instance_service_client::InstanceServiceClient;
use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::{
    InstanceCreateRequest, InstanceSpec, ProcessInstanceSpec, ProxyEngineRequest,
};
use lhnet_proto::ptypes::controller_service_client::ControllerServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

/// The upgrade pod's volume.
pub const VOLUME: &str = "vol-up";
/// The instance-manager's ports, as Longhorn's (the pod's own, reached directly until lhnet).
pub const IM_PORT: u16 = 8500;
pub const IM_INSTANCE_PORT: u16 = 8503;
/// lhnet's proxy port in that pod (Longhorn's proxy port: the IM has no proxy of its own here).
pub const PROXY_PORT: u16 = 8501;
/// lhnet's InstanceService listener, where capture sends 8503.
pub const LHNET_INSTANCE_PORT: u16 = 8513;
/// The replica process gets the IM's first ports (15), the engine the next one.
const REPLICA_PORT: u16 = 10000;
const ENGINE_PORT: u16 = 10015;

#[derive(Debug, Clone, Serialize)]
pub struct UpgradeReport {
    pub ok: bool,
    /// When lhnet started in the pod, and when the manager's calls moved to it (seconds since
    /// the start of the run).
    pub lhnet_started_s: Option<f64>,
    pub switched_s: Option<f64>,
    /// Calls by path: `fallback` (straight to the engine) and `proxy` (through lhnet).
    pub calls: BTreeMap<String, u64>,
    pub failed: u64,
    pub error_samples: Vec<String>,
    /// (second, path) of every call, for the plot.
    #[serde(skip)]
    pub timeline: Vec<(f64, &'static str)>,
}

/// What the manager keeps for one instance-manager.
pub struct ProxyHandler {
    im: Ipv4Addr,
    /// Where the IM's InstanceService answers `VersionGet` for the manager, and the proxy.
    instance_port: u16,
    proxy_port: u16,
    proxy: Option<(ProxyEngineServiceClient<Channel>, HealthClient<Channel>)>,
    /// Proxy clients dialled so far (the first one, and every re-dial of a dead one).
    pub dials: u64,
}

async fn connect(addr: SocketAddr) -> Result<Channel, String> {
    Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{addr}: {e}"))
}

impl ProxyHandler {
    pub fn new(im: Ipv4Addr, instance_port: u16) -> ProxyHandler {
        ProxyHandler::with_proxy_port(im, instance_port, PROXY_PORT)
    }

    pub fn with_proxy_port(im: Ipv4Addr, instance_port: u16, proxy_port: u16) -> ProxyHandler {
        ProxyHandler {
            im,
            instance_port,
            proxy_port,
            proxy: None,
            dials: 0,
        }
    }

    fn at(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.im), port)
    }

    /// The proxy API version the IM advertises (its InstanceService `VersionGet`, IM API 4 on),
    /// on a new connection each time, as the manager's instance-manager sync asks it.
    async fn proxy_api_version(&self) -> Result<i64, String> {
        let mut im = InstanceServiceClient::new(connect(self.at(self.instance_port)).await?);
        let version = im
            .version_get(())
            .await
            .map_err(|s| format!("VersionGet: {}", s.message()))?
            .into_inner();
        Ok(version.instance_manager_proxy_api_version)
    }

    /// The proxy client, alive (health Check just answered SERVING), dialled if there is none;
    /// `None` (and the old one dropped) when it cannot be had.
    pub async fn live_proxy(&mut self) -> Option<&mut ProxyEngineServiceClient<Channel>> {
        if let Some((_, health)) = &mut self.proxy {
            let check = health.check(HealthCheckRequest::default()).await;
            if !matches!(check, Ok(ref r) if r.get_ref().status == 1) {
                self.proxy = None;
            }
        }
        if self.proxy.is_none() {
            self.dials += 1;
            let channel = connect(self.at(self.proxy_port)).await.ok()?;
            let mut health = HealthClient::new(channel.clone());
            let check = health.check(HealthCheckRequest::default()).await.ok()?;
            if check.get_ref().status != 1 {
                return None;
            }
            self.proxy = Some((ProxyEngineServiceClient::new(channel), health));
        }
        self.proxy.as_mut().map(|(p, _)| p)
    }

    /// One engine-monitor call for the volume: through the proxy when the IM offers one and
    /// it is alive, else straight to the engine. The path it took.
    async fn volume_get(&mut self) -> Result<&'static str, String> {
        let engine = self.at(ENGINE_PORT);
        if self.proxy_api_version().await? > 0 {
            if let Some(proxy) = self.live_proxy().await {
                let request = ProxyEngineRequest {
                    address: engine.to_string(),
                    engine_name: format!("{VOLUME}-e-0"),
                    volume_name: VOLUME.into(),
                    ..Default::default()
                };
                proxy
                    .volume_get(request)
                    .await
                    .map_err(|s| format!("VolumeGet through the proxy: {}", s.message()))?;
                return Ok("proxy");
            }
        }
        let mut direct = ControllerServiceClient::new(connect(engine).await?);
        direct
            .volume_get(())
            .await
            .map_err(|s| format!("VolumeGet on the engine: {}", s.message()))?;
        Ok("fallback")
    }
}

/// Creates the pod's replica and engine through the IM itself (no lhnet yet: the replica is
/// named by the pod's management IP, so this engine uses the management network).
pub async fn create_volume(im: Ipv4Addr, size: i64) -> Result<(), String> {
    let mut instances = InstanceServiceClient::new(
        connect(SocketAddr::new(IpAddr::V4(im), IM_INSTANCE_PORT)).await?,
    );
    let binary = "/engine-binaries/longhornio-longhorn-engine-v1.12.1/longhorn";
    let specs = [
        (
            format!("{VOLUME}-r-0"),
            "replica",
            15,
            vec![
                "replica".to_string(),
                format!("/host/var/lib/longhorn/replicas/{VOLUME}"),
                "--size".into(),
                size.to_string(),
                "--volume-name".into(),
                VOLUME.into(),
                "--replica-instance-name".into(),
                format!("{VOLUME}-r-0"),
            ],
            REPLICA_PORT,
        ),
        (
            format!("{VOLUME}-e-0"),
            "engine",
            1,
            vec![
                "controller".to_string(),
                VOLUME.into(),
                "--size".into(),
                size.to_string(),
                "--engine-instance-name".into(),
                format!("{VOLUME}-e-0"),
                "--replica".into(),
                format!("tcp://{im}:{REPLICA_PORT}"),
            ],
            ENGINE_PORT,
        ),
    ];
    for (name, kind, ports, args, expected) in specs {
        let created = instances
            .instance_create(InstanceCreateRequest {
                spec: Some(InstanceSpec {
                    name: name.clone(),
                    r#type: kind.into(),
                    volume_name: VOLUME.into(),
                    port_count: ports,
                    port_args: vec!["--listen,0.0.0.0:".into()],
                    process_instance_spec: Some(ProcessInstanceSpec {
                        binary: binary.into(),
                        args,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("InstanceCreate {name}: {}", s.message()))?
            .into_inner();
        let port = created.status.map_or(0, |s| s.port_start);
        if port != i32::from(expected) {
            return Err(format!(
                "the instance-manager gave {name} port {port}, not {expected}"
            ));
        }
        // The engine opens its replica at start: the replica must be up first.
        wait_port(SocketAddr::new(IpAddr::V4(im), expected)).await?;
    }
    Ok(())
}

async fn wait_port(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens at {addr} after 20 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The manager's side for the upgrade pod: a call a second until `until`; `lhnet_started`
/// says (as seconds since `started`) when lhnet came up in the pod.
pub async fn manage(
    im: Ipv4Addr,
    started: Instant,
    until: Instant,
    lhnet_started: std::sync::Arc<std::sync::Mutex<Option<f64>>>,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> UpgradeReport {
    let mut handler = ProxyHandler::new(im, IM_INSTANCE_PORT);
    let mut calls = BTreeMap::new();
    let mut timeline = Vec::new();
    let (mut failed, mut errors, mut switched) = (0u64, Vec::new(), None);
    let mut next = tokio::time::Instant::now();
    while Instant::now() < until && !cancel.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep_until(next).await;
        next += Duration::from_millis(500);
        let at = started.elapsed().as_secs_f64();
        match handler.volume_get().await {
            Ok(path) => {
                *calls.entry(path.to_string()).or_insert(0) += 1;
                if path == "proxy" && switched.is_none() {
                    switched = Some(at);
                }
                timeline.push((at, path));
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("{at:.1} s: {e}"));
                }
            }
        }
    }
    let lhnet_started_s = *lhnet_started.lock().unwrap_or_else(|e| e.into_inner());
    let ok = failed == 0
        && calls.get("fallback").is_some_and(|n| *n > 0)
        && calls.get("proxy").is_some_and(|n| *n > 0)
        && matches!((lhnet_started_s, switched), (Some(l), Some(s)) if s >= l);
    UpgradeReport {
        ok,
        lhnet_started_s,
        switched_s: switched,
        calls,
        failed,
        error_samples: errors,
        timeline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn proxy_on(port: u16) -> lhnet_proxy::app::RunningProxy {
        let yaml = format!(
            "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
             listeners:\n  - name: m\n    address: 127.0.0.1:{port}\n    routes:\n\
             \x20     - {{ match: {{ prefix: /grpc.health.v1.Health/ }}, local: health }}\n"
        );
        let config = lhnet_proxy::config::Config::parse(&yaml, "t").unwrap();
        lhnet_proxy::app::start(config, lhnet_proxy::app::Options::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_dead_proxy_client_is_dropped_and_dialled_again() {
        let first = proxy_on(0).await;
        let port = first.listener_addr("m").unwrap().port();
        let mut handler = ProxyHandler::with_proxy_port(Ipv4Addr::LOCALHOST, 1, port);
        assert!(handler.live_proxy().await.is_some());
        assert!(handler.live_proxy().await.is_some(), "alive: kept");
        assert_eq!(handler.dials, 1);

        first.shutdown().await;
        assert!(handler.live_proxy().await.is_none(), "dead: dropped");
        assert_eq!(handler.dials, 2, "and dialled again, in vain");

        let _second = proxy_on(port).await;
        assert!(handler.live_proxy().await.is_some(), "back: dialled again");
        assert_eq!(handler.dials, 3);
    }
}
