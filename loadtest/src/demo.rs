//! `lhnet-loadtest demo`: the two-network topology, built for real from network namespaces,
//! with lhnet in every pod and a Longhorn-shaped load from a manager that knows only
//! management IPs.
//!
//! ```text
//!  manager 10.42.0.1 ──mgmt bridge (eth0)──┬── engine pod   10.42.0.10 │ 10.30.0.10 ──┐
//!                                          ├── replica-a    10.42.0.11 │ 10.30.0.11 ──┤
//!                                          ├── replica-b    10.42.0.12 │ 10.30.0.12 ──┼─ storage bridge (lhnet1)
//!                                          └── spare        10.42.0.13 │ 10.30.0.13 ──┘
//! ```
//!
//! Every pod runs lhnet-proxy (in-process, entered into the pod's namespace) and its part of
//! the simulator: the engine pod runs one simulated engine per volume on its storage address;
//! replica pods run replicas bound to 127.0.0.1, exposed on `lhnet1` by lhnet's `tcp`
//! listeners. The manager drives an engine-monitor-shaped control load through the engine
//! pod's lhnet; block writes go through the engines' frontends to every replica's data port;
//! a ReplicaAdd rebuilds a volume onto the spare pod.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lhnet_netns::{read_device_counters, spawn_in, Namespace, Topology};
use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes;
use lhnet_proxy::app::{self, Options};
use lhnet_proxy::config::Config;
use lhnet_proxy::metrics::Metrics;
use serde::Serialize;
use tonic::transport::Channel;

use crate::demo_backup::{BackupReport, EGRESS_PORT, S3_HOST, S3_PORT};
use crate::sim::{self, SimReplica};

const MGMT_NET: &str = "10.42.0";
const STORAGE_NET: &str = "10.30.0";
const MANAGER_HOST: u8 = 1;
/// First instance port, as the instance-manager allocates them (`--port-range 10000-30000`).
const BASE_PORT: u16 = 10000;
/// Ports per replica process (ReplicaService, data, sync agent, 10 receivers, spare).
const REPLICA_PORTS: u16 = 15;
/// The engines' frontend sockets (127.0.0.1 inside the engine pod).
const FRONTEND_PORT: u16 = 9600;
/// The upgrade pod's host number (`--upgrade`).
const UPGRADE_HOST: u8 = 14;
/// lhnet's management listener in every pod (Longhorn's proxy port).
const LHNET_PORT: u16 = 8501;
/// The engine pod's instance-manager (on 127.0.0.1: a manager reaches it through lhnet) and
/// lhnet's InstanceService listener in front of it.
const IM_PORT: u16 = 8500;
const IM_INSTANCE_PORT: u16 = 8503;
const LHNET_INSTANCE_PORT: u16 = 8513;
/// A block write through the frontend.
const BLOCK: usize = 256 << 10;
/// How often each volume's monitor polls, like longhorn-manager's engine monitor.
const MONITOR_EVERY: Duration = Duration::from_secs(2);
/// How often the data volumes get a snapshot.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(4);
/// A pod passes when its eth0 carried less than this share of what lhnet1 carried.
const SEGREGATION_THRESHOLD: f64 = 0.05;

#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub duration: Duration,
    /// Volumes the manager monitors (one engine each, two replicas each).
    pub volumes: usize,
    /// Volumes that also take block writes (the first ones; volume 0 is rebuilt).
    pub data_volumes: usize,
    /// Size of every volume in bytes.
    pub volume_size: i64,
    /// Block writes per second over all data volumes, in bytes (0: as fast as they go). Paced
    /// by default so that the control latency measures lhnet, not a CPU the data load saturates.
    pub data_rate: u64,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// The program the engine pod's instance-manager runs for Longhorn's `longhorn` binary
    /// (`lhnet-loadtest longhorn ...`); `None`: this executable.
    pub longhorn: Option<PathBuf>,
    /// Also the upgrade story ([`crate::upgrade`]).
    pub upgrade: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            duration: Duration::from_secs(20),
            volumes: 24,
            data_volumes: 2,
            volume_size: 32 << 20,
            data_rate: 64 << 20,
            json: None,
            plot: None,
            longhorn: None,
            upgrade: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub duration_s: f64,
    pub volumes: usize,
    pub control: ControlReport,
    pub data: DataReport,
    pub rebuild: RebuildReport,
    pub pods: Vec<PodReport>,
    pub segregation: Segregation,
    /// `--upgrade`: the instance-manager pod that got lhnet midway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<crate::upgrade::UpgradeReport>,
    /// The backup of vol-00 to S3 on the storage bridge, after the load.
    pub backup: BackupReport,
    /// (seconds since start, milliseconds) of every control call, for `--plot`.
    #[serde(skip)]
    pub latencies: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlReport {
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// The first few errors, verbatim.
    pub error_samples: Vec<String>,
    /// Proxy clients the manager dialled for the engine pod's instance-manager: 1 when the
    /// first stayed alive (health-checked every tick) for the whole run.
    pub proxy_dials: u64,
    /// Latency per call type.
    pub by_call: BTreeMap<String, CallStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CallStats {
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataReport {
    pub bytes: u64,
    pub mib_per_s: f64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    pub bytes: u64,
    pub seconds: f64,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Bytes {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl Bytes {
    fn total(&self) -> u64 {
        self.rx_bytes + self.tx_bytes
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PodReport {
    pub name: String,
    pub management_ip: String,
    pub storage_ip: String,
    /// Kernel counter deltas over the run, per device.
    pub devices: BTreeMap<String, Bytes>,
    /// lhnet's own byte counters, per network (management / storage / loopback).
    pub lhnet: BTreeMap<String, Bytes>,
    /// eth0 bytes / lhnet1 bytes.
    pub eth0_share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Segregation {
    pub ok: bool,
    pub threshold: f64,
    pub worst_pod: String,
    pub worst_share: f64,
}

/// What runs in a pod besides lhnet.
#[derive(Clone)]
enum Role {
    /// The instance-manager (on 127.0.0.1, reached through lhnet), which starts the engines
    /// the manager creates, running `longhorn` as this program.
    Engine {
        longhorn: PathBuf,
    },
    Replicas {
        count: usize,
    },
}

struct Pod {
    name: &'static str,
    ns: Namespace,
    mgmt: Ipv4Addr,
    storage: Ipv4Addr,
    metrics: Arc<Metrics>,
    replicas: Vec<SimReplica>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ip(net: &str, host: u8) -> Ipv4Addr {
    format!("{net}.{host}")
        .parse()
        .unwrap_or(Ipv4Addr::UNSPECIFIED)
}

fn lhnet_config(tcp_ports: Option<(u16, u16)>, instance_manager: bool) -> String {
    let mut yaml = format!(
        "admin: {{ address: 127.0.0.1:9901 }}\n\
         storage_network: {{ interface: lhnet1, fallback: wait }}\n\
         drain_timeout: 1s\n\
         peer_lookup: {{ port: {LHNET_PORT}, timeout: 1s }}\n\
         listeners:\n\
         \x20 - name: management\n\
         \x20   address: 0.0.0.0:{LHNET_PORT}\n\
         \x20   routes:\n\
         \x20     - {{ match: {{ prefix: /imrpc.ProxyEngineService/ }}, local: longhorn_engine_proxy, backup_egress: backup_egress }}\n\
         \x20     - {{ match: {{ prefix: /lhnet.v1.Peer/ }}, local: peer }}\n\
         \x20     - {{ match: {{ prefix: /grpc.health.v1.Health/ }}, local: health }}\n\
         \x20 - name: backup_egress\n\
         \x20   kind: http_connect\n\
         \x20   address: 127.0.0.1:{EGRESS_PORT}\n\
         \x20   upstream_bind_config: {{ source_address: storage, bind_to_device: storage }}\n"
    );
    if instance_manager {
        // The instance-manager's InstanceService, passed through (lhnet maps the replica
        // addresses of the engines it starts to storage addresses).
        yaml.push_str(&format!(
            "\x20 - name: instance\n\
             \x20   address: 0.0.0.0:{LHNET_INSTANCE_PORT}\n\
             \x20   routes:\n\
             \x20     - {{ match: {{ prefix: /grpc.health.v1.Health/ }}, local: health }}\n\
             \x20     - {{ match: {{ prefix: / }}, cluster: instance_service }}\n"
        ));
    }
    if let Some((first, last)) = tcp_ports {
        yaml.push_str(&format!(
            "\x20 - {{ name: replica_data, kind: tcp, address: \"storage:{first}-{last}\", cluster: loopback }}\n"
        ));
    }
    yaml.push_str(&format!(
        "backup_target: {{ allowed_endpoints: [\"{STORAGE_NET}.{S3_HOST}:{S3_PORT}\"] }}\n"
    ));
    yaml.push_str(
        "clusters:\n\
         \x20 - name: engines\n\
         \x20   type: original_dst\n\
         \x20   upstream_bind_config: { source_address: storage }\n\
         \x20   allowed_destinations: [storage]\n\
         \x20   allowed_ports: [10000-30000]\n",
    );
    if instance_manager {
        yaml.push_str(&format!(
            "\x20 - {{ name: instance_service, endpoints: [127.0.0.1:{IM_INSTANCE_PORT}], upstream_bind_config: {{ source_address: none }} }}\n"
        ));
    }
    yaml
}

fn replica_port(volume: usize) -> u16 {
    BASE_PORT + REPLICA_PORTS * volume as u16
}

/// Starts a pod's simulator part and lhnet inside its namespace; returns once lhnet has its
/// storage address and its listeners are bound.
fn start_pod(
    name: &'static str,
    ns: Namespace,
    host: u8,
    role: Role,
    size: i64,
) -> Result<Pod, String> {
    let mgmt = ip(MGMT_NET, host);
    let storage = ip(STORAGE_NET, host);
    let (ready_tx, ready_rx) =
        std::sync::mpsc::channel::<Result<(Arc<Metrics>, Vec<SimReplica>), String>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = spawn_in(&ns.name, move || {
        // Two runtimes, as two processes would have: the simulator's, and lhnet's with one
        // worker thread (`--threads 1`). Their threads start here, inside the pod's namespace.
        let build = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
        };
        let (runtime, lhnet_runtime) = match (build(), build()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                let _ = ready_tx.send(Err(format!("{name}: cannot start a runtime: {e}")));
                return;
            }
        };
        let lhnet = lhnet_runtime.handle().clone();
        runtime.block_on(async move {
            let started = async {
                let mut engines = Vec::new();
                let mut replicas = Vec::new();
                let tcp_ports = match &role {
                    Role::Engine { longhorn } => {
                        let bind = |port: u16| async move {
                            tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
                                .await
                                .map_err(|e| format!("{name}: instance-manager port {port}: {e}"))
                        };
                        let (pm, instances) = (bind(IM_PORT).await?, bind(IM_INSTANCE_PORT).await?);
                        let binaries = crate::im::Binaries {
                            longhorn: (longhorn.clone(), vec!["longhorn".into()]),
                        };
                        let im = crate::im::InstanceManager::new(binaries, (BASE_PORT, 30000));
                        engines.push(tokio::spawn(im.serve(pm, instances)));
                        None
                    }
                    Role::Replicas { count } => {
                        for v in 0..*count {
                            let at = SocketAddr::from(([127, 0, 0, 1], replica_port(v)));
                            let spec = sim::ReplicaSpec {
                                volume: volume_name(v),
                                instance: replica_name(v, name),
                                size,
                                ..Default::default()
                            };
                            replicas.push(
                                sim::start_replica_with(at, spec)
                                    .await
                                    .map_err(|e| format!("{name}: replica {at}: {e}"))?,
                            );
                        }
                        Some((BASE_PORT, replica_port(*count) - 1))
                    }
                };
                let is_engine = matches!(role, Role::Engine { .. });
                let config = Config::parse(&lhnet_config(tcp_ports, is_engine), name)
                    .map_err(|e| format!("{name}: lhnet config: {e}"))?;
                let options = Options {
                    pod_ip: Some(IpAddr::V4(mgmt)),
                };
                let proxy = lhnet
                    .spawn(app::start(config, options))
                    .await
                    .map_err(|e| format!("{name}: lhnet-proxy: {e}"))?
                    .map_err(|e| format!("{name}: lhnet-proxy: {e}"))?;
                // Storage listeners bind once lhnet sees lhnet1's address.
                let deadline = Instant::now() + Duration::from_secs(10);
                while tcp_ports.is_some() && proxy.tcp_listener_addrs("replica_data").is_empty() {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "{name}: lhnet's storage listeners did not bind in 10 s \
                             (see lhnet's bind warnings above: a port in use, or no lhnet1 address)"
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok((engines, replicas, proxy))
            }
            .await;
            match started {
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
                Ok((engines, replicas, proxy)) => {
                    let handles = replicas.iter().map(|r| r.replica.clone()).collect();
                    let _ = ready_tx.send(Ok((proxy.metrics().clone(), handles)));
                    let _ = stop_rx.await;
                    let _ = lhnet.spawn(proxy.shutdown()).await;
                    // The instance-manager stops; the processes it started die with it.
                    for im in &engines {
                        im.abort();
                    }
                    drop((engines, replicas));
                }
            }
        });
    })
    .map_err(|e| format!("{name}: cannot start its thread: {e}"))?;
    let (metrics, replicas) = ready_rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| format!("{name}: did not start within 30 s (its lhnet and simulator errors are in the log lines above)"))??;
    Ok(Pod {
        name,
        ns,
        mgmt,
        storage,
        metrics,
        replicas,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// The `--upgrade` pod: the instance-manager on its own ports from the start (no lhnet), and
/// lhnet once [`UpgradePod::start_lhnet`] ran (with capture's redirect of 8503, as an
/// injection in capture mode would set it up).
struct UpgradePod {
    ns: Namespace,
    threads: Vec<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<std::io::Result<()>>,
    )>,
}

impl UpgradePod {
    fn start(ns: Namespace, longhorn: &std::path::Path) -> Result<UpgradePod, String> {
        let longhorn = longhorn.to_path_buf();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = spawn_in(&ns.name, move || {
            let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            else {
                let _ = ready_tx.send(Err("upgrade pod: cannot start a runtime".into()));
                return;
            };
            runtime.block_on(async move {
                let bind = |port: u16| async move {
                    tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
                        .await
                        .map_err(|e| format!("upgrade pod: instance-manager port {port}: {e}"))
                };
                let (pm, instances) = match (
                    bind(crate::upgrade::IM_PORT).await,
                    bind(crate::upgrade::IM_INSTANCE_PORT).await,
                ) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let binaries = crate::im::Binaries {
                    longhorn: (longhorn, vec!["longhorn".into()]),
                };
                let im = crate::im::InstanceManager::new(binaries, (BASE_PORT, 30000));
                let served = tokio::spawn(im.serve(pm, instances));
                let _ = ready_tx.send(Ok(()));
                let _ = stop_rx.await;
                served.abort();
            });
        })
        .map_err(|e| format!("upgrade pod: {e}"))?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "upgrade pod: the instance-manager did not start in 10 s".to_string())??;
        Ok(UpgradePod {
            ns,
            threads: vec![(stop_tx, thread)],
        })
    }

    fn has_lhnet(&self) -> bool {
        self.threads.len() > 1
    }

    /// lhnet in the pod (the instance-manager's InstanceService behind it on 8513, the proxy on
    /// 8501), then capture's redirect of 8503 from outside the pod to it.
    fn start_lhnet(&mut self) -> Result<(), String> {
        let mgmt = ip(MGMT_NET, UPGRADE_HOST);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = spawn_in(&self.ns.name, move || {
            let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            else {
                let _ = ready_tx.send(Err("upgrade pod: cannot start lhnet's runtime".into()));
                return;
            };
            runtime.block_on(async move {
                let started = async {
                    let config = Config::parse(&lhnet_config(None, true), "upgrade")
                        .map_err(|e| format!("upgrade pod: lhnet config: {e}"))?;
                    let options = Options {
                        pod_ip: Some(IpAddr::V4(mgmt)),
                    };
                    let proxy = app::start(config, options)
                        .await
                        .map_err(|e| format!("upgrade pod: lhnet-proxy: {e}"))?;
                    let redirect = lhnet_proxy::inject::capture::parse_redirect(&format!(
                        "{}:{}",
                        crate::upgrade::IM_INSTANCE_PORT,
                        crate::upgrade::LHNET_INSTANCE_PORT
                    ))?;
                    lhnet_proxy::inject::capture::install(&[redirect])
                        .map_err(|e| format!("upgrade pod: capture: {e}"))?;
                    Ok::<_, String>(proxy)
                }
                .await;
                match started {
                    Ok(proxy) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stop_rx.await;
                        proxy.shutdown().await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(|e| format!("upgrade pod: {e}"))?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "upgrade pod: lhnet did not start in 10 s".to_string())??;
        self.threads.push((stop_tx, thread));
        Ok(())
    }
}

impl Drop for UpgradePod {
    fn drop(&mut self) {
        for (stop, thread) in self.threads.drain(..).rev() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

/// Live counters the progress line reads.
#[derive(Default)]
struct Live {
    control: AtomicU64,
    control_errors: AtomicU64,
    /// Proxy clients the manager's handler dialled for the engine pod (1: never re-dialled).
    proxy_dials: AtomicU64,
    data_bytes: AtomicU64,
    data_errors: AtomicU64,
}

struct ManagerResult {
    latencies: Vec<(f64, f64)>,
    by_call: BTreeMap<&'static str, Vec<f64>>,
    error_samples: Vec<String>,
    rebuild: RebuildReport,
}

/// Volume `v`'s names: the volume, its engine, and its replica on `pod`, as Longhorn names
/// them (`<volume>-e-0`, `<volume>-r-<pod>`).
fn volume_name(v: usize) -> String {
    format!("vol-{v:02}")
}

fn engine_name(v: usize) -> String {
    format!("vol-{v:02}-e-0")
}

fn replica_name(v: usize, pod: &str) -> String {
    format!("vol-{v:02}-r-{pod}")
}

/// What a v1.12.1 manager puts in every ProxyEngineRequest for volume `v`'s engine.
fn engine_request(v: usize, engine: SocketAddr) -> Option<ProxyEngineRequest> {
    Some(ProxyEngineRequest {
        address: engine.to_string(),
        engine_name: engine_name(v),
        volume_name: volume_name(v),
        ..Default::default()
    })
}

/// One round of longhorn-manager's engine monitor for one volume.
async fn monitor_round(
    client: &mut ProxyEngineServiceClient<Channel>,
    v: usize,
    engine: SocketAddr,
) -> Vec<(&'static str, Duration, Result<(), String>)> {
    let req = || engine_request(v, engine).unwrap_or_default();
    let mut out = Vec::with_capacity(7);
    macro_rules! timed {
        ($name:literal, $call:expr) => {{
            let t = Instant::now();
            let r = $call
                .await
                .map(|_| ())
                .map_err(|s| format!("{}: {:?}: {}", $name, s.code(), s.message()));
            out.push(($name, t.elapsed(), r));
        }};
    }
    timed!("VolumeGet", client.volume_get(req()));
    timed!("ReplicaList", client.replica_list(req()));
    timed!("SnapshotList", client.snapshot_list(req()));
    timed!(
        "ReplicaRebuildingStatus",
        client.replica_rebuilding_status(req())
    );
    timed!("SnapshotPurgeStatus", client.snapshot_purge_status(req()));
    timed!("SnapshotCloneStatus", client.snapshot_clone_status(req()));
    timed!("BackupRestoreStatus", client.backup_restore_status(req()));
    out
}

/// Creates every volume's engine as a v1.12 manager does in management-only mode:
/// `InstanceCreate` on the engine pod's instance-manager (through lhnet's InstanceService
/// listener), its replicas named by their pods' management IPs; then waits until every engine
/// runs. lhnet gives the engines the replicas' storage addresses on the way. The
/// instance-manager allocates ports from 10000 in order, so engine `v` is on 10000 + v, as
/// its answer says (checked).
async fn create_engines(args: &DemoArgs, engine_pod: Ipv4Addr) -> Result<(), String> {
    use lhnet_proto::imrpc::instance_service_client::InstanceServiceClient;
    let endpoint = format!("http://{engine_pod}:{LHNET_INSTANCE_PORT}");
    let channel = Channel::from_shared(endpoint.clone())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("manager cannot reach the instance-manager at {endpoint}: {e}"))?;
    let mut instances = InstanceServiceClient::new(channel);
    // The replica pods (replica-a, replica-b), by their management IPs only.
    let homes = [ip(MGMT_NET, 11), ip(MGMT_NET, 12)];
    for v in 0..args.volumes {
        let mut process_args: Vec<String> = vec![
            "controller".into(),
            volume_name(v),
            "--frontend".into(),
            "tgt-blockdev".into(),
            "--size".into(),
            args.volume_size.to_string(),
            "--engine-instance-name".into(),
            engine_name(v),
        ];
        for home in homes {
            process_args.push("--replica".into());
            process_args.push(format!("tcp://{home}:{}", replica_port(v)));
        }
        if v < args.data_volumes {
            process_args.push("--frontend-listen".into());
            process_args.push(format!("127.0.0.1:{}", FRONTEND_PORT + v as u16));
        }
        let spec = InstanceSpec {
            name: engine_name(v),
            r#type: "engine".into(),
            volume_name: volume_name(v),
            port_count: 1,
            port_args: vec!["--listen,0.0.0.0:".into()],
            process_instance_spec: Some(ProcessInstanceSpec {
                binary: "/engine-binaries/longhornio-longhorn-engine-v1.12.1/longhorn".into(),
                args: process_args,
            }),
            ..Default::default()
        };
        let created = instances
            .instance_create(InstanceCreateRequest {
                spec: Some(spec),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("InstanceCreate {}: {}", engine_name(v), s.message()))?
            .into_inner();
        let port = created.status.map_or(0, |s| s.port_start);
        if port != i32::from(BASE_PORT) + v as i32 {
            return Err(format!(
                "the instance-manager gave {} port {port}, not {}",
                engine_name(v),
                BASE_PORT as usize + v
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = instances
            .instance_list(())
            .await
            .map_err(|s| format!("InstanceList: {}", s.message()))?
            .into_inner();
        let mut waiting = Vec::new();
        for (name, i) in &listed.instances {
            let status = i.status.clone().unwrap_or_default();
            match status.state.as_str() {
                "running" => {}
                "error" => return Err(format!("engine {name} failed: {}", status.error_msg)),
                other => waiting.push(format!("{name} {other}")),
            }
        }
        if waiting.is_empty() && listed.instances.len() == args.volumes {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "engines not running after 30 s: {}",
                waiting.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The manager: control load on every volume, frontends and snapshots on the data volumes,
/// and the rebuild onto the spare, all by management IPs.
async fn manager(
    args: DemoArgs,
    engine_pod: Ipv4Addr,
    spare_pod: Ipv4Addr,
    live: Arc<Live>,
    frontends_up: Arc<AtomicBool>,
    cancel: Arc<AtomicBool>,
) -> Result<ManagerResult, String> {
    let endpoint = format!("http://{engine_pod}:{LHNET_PORT}");
    let channel = Channel::from_shared(endpoint.clone())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("manager cannot reach lhnet at {endpoint}: {e}"))?;
    let client = ProxyEngineServiceClient::new(channel);
    create_engines(&args, engine_pod).await?;
    // One proxy client for the engine pod's instance-manager, checked alive every tick and
    // re-dialled when dead (longhorn-manager's proxy handler); the monitors take the current one.
    let current = Arc::new(Mutex::new(client.clone()));
    let mut handler = crate::upgrade::ProxyHandler::new(engine_pod, LHNET_INSTANCE_PORT);
    let engine_at = move |v: usize| SocketAddr::new(IpAddr::V4(engine_pod), BASE_PORT + v as u16);

    for v in 0..args.data_volumes {
        let start = EngineVolumeFrontendStartRequest {
            proxy_engine_request: engine_request(v, engine_at(v)),
            frontend_start: Some(ptypes::VolumeFrontendStartRequest {
                frontend: "tgt-blockdev".into(),
            }),
        };
        client
            .clone()
            .volume_frontend_start(start)
            .await
            .map_err(|s| format!("VolumeFrontendStart vol-{v:02}: {}", s.message()))?;
    }
    frontends_up.store(true, Ordering::SeqCst);

    let started = Instant::now();
    let deadline = started + args.duration;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let by_call = Arc::new(Mutex::new(BTreeMap::<&'static str, Vec<f64>>::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let record = {
        let latencies = latencies.clone();
        let by_call = by_call.clone();
        let errors = errors.clone();
        let live = live.clone();
        move |results: Vec<(&'static str, Duration, Result<(), String>)>| {
            let at = started.elapsed().as_secs_f64();
            for (name, took, r) in results {
                live.control.fetch_add(1, Ordering::Relaxed);
                let ms = took.as_secs_f64() * 1000.0;
                if let Ok(mut l) = latencies.lock() {
                    l.push((at, ms));
                }
                if let Ok(mut b) = by_call.lock() {
                    b.entry(name).or_default().push(ms);
                }
                if let Err(e) = r {
                    live.control_errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut errs) = errors.lock() {
                        if errs.len() < 5 {
                            errs.push(e);
                        }
                    }
                }
            }
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    {
        let (current, cancel, live) = (current.clone(), cancel.clone(), live.clone());
        tasks.spawn(async move {
            loop {
                if Instant::now() >= deadline || cancel.load(Ordering::Relaxed) {
                    break;
                }
                match handler.live_proxy().await {
                    Some(alive) => {
                        if let Ok(mut c) = current.lock() {
                            *c = alive.clone();
                        }
                    }
                    None => {
                        live.control_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                live.proxy_dials.store(handler.dials, Ordering::Relaxed);
                tokio::time::sleep(MONITOR_EVERY).await;
            }
        });
    }
    for v in 0..args.volumes {
        let current = current.clone();
        let record = record.clone();
        let cancel = cancel.clone();
        let offset = MONITOR_EVERY.mul_f64(v as f64 / args.volumes.max(1) as f64);
        tasks.spawn(async move {
            let mut next = tokio::time::Instant::now() + offset;
            loop {
                tokio::time::sleep_until(next).await;
                if Instant::now() >= deadline || cancel.load(Ordering::Relaxed) {
                    break;
                }
                let mut client = match current.lock() {
                    Ok(c) => c.clone(),
                    Err(_) => break,
                };
                record(monitor_round(&mut client, v, engine_at(v)).await);
                next += MONITOR_EVERY;
            }
        });
    }
    // Snapshots of the data volumes, as recurring jobs would take them.
    {
        let client = client.clone();
        let record = record.clone();
        let cancel = cancel.clone();
        let data_volumes = args.data_volumes;
        tasks.spawn(async move {
            let mut n = 0;
            loop {
                tokio::time::sleep(SNAPSHOT_EVERY).await;
                if Instant::now() >= deadline || cancel.load(Ordering::Relaxed) {
                    break;
                }
                n += 1;
                for v in 0..data_volumes {
                    let t = Instant::now();
                    let r = client
                        .clone()
                        .volume_snapshot(EngineVolumeSnapshotRequest {
                            proxy_engine_request: engine_request(v, engine_at(v)),
                            snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                                name: format!("demo-{n}"),
                                ..Default::default()
                            }),
                        })
                        .await
                        .map(|_| ())
                        .map_err(|s| format!("VolumeSnapshot: {:?}: {}", s.code(), s.message()));
                    record(vec![("VolumeSnapshot", t.elapsed(), r)]);
                }
            }
        });
    }

    // The rebuild: volume 0 gets a third replica on the spare pod, a third into the run.
    tokio::time::sleep(args.duration / 3).await;
    let spare_url = format!("tcp://{spare_pod}:{}", replica_port(0));
    let t = Instant::now();
    let added = client
        .clone()
        .replica_add(EngineReplicaAddRequest {
            proxy_engine_request: engine_request(0, engine_at(0)),
            replica_address: spare_url.clone(),
            restore: false,
            size: args.volume_size,
            current_size: args.volume_size,
            replica_name: replica_name(0, "spare"),
            ..Default::default()
        })
        .await;
    let seconds = t.elapsed().as_secs_f64();
    let mut rebuild = RebuildReport {
        bytes: 0,
        seconds,
        ok: added.is_ok(),
        error: added
            .err()
            .map(|s| format!("{:?}: {}", s.code(), s.message())),
    };
    if rebuild.ok {
        // The manager sees the new replica RW, under its management address.
        let list = client
            .clone()
            .replica_list(engine_request(0, engine_at(0)).unwrap_or_default())
            .await
            .map_err(|s| format!("ReplicaList after the rebuild: {}", s.message()))?
            .into_inner();
        let listed = list
            .replica_list
            .map(|l| l.replicas)
            .unwrap_or_default()
            .into_iter()
            .any(|r| {
                r.address.map(|a| a.address).as_deref() == Some(spare_url.as_str())
                    && r.mode == ptypes::ReplicaMode::Rw as i32
            });
        if !listed {
            rebuild.ok = false;
            rebuild.error = Some(format!(
                "ReplicaList does not show {spare_url} as RW after the rebuild"
            ));
        }
    }
    while tasks.join_next().await.is_some() {}
    let latencies = std::mem::take(&mut *latencies.lock().map_err(|_| "lock poisoned")?);
    let error_samples = std::mem::take(&mut *errors.lock().map_err(|_| "lock poisoned")?);
    let by_call = std::mem::take(&mut *by_call.lock().map_err(|_| "lock poisoned")?);
    Ok(ManagerResult {
        latencies,
        by_call,
        error_samples,
        rebuild,
    })
}

/// Block writes through each data volume's frontend, until the deadline.
async fn data_load(
    args: DemoArgs,
    live: Arc<Live>,
    frontends_up: Arc<AtomicBool>,
    cancel: Arc<AtomicBool>,
) {
    while !frontends_up.load(Ordering::SeqCst) && !cancel.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + args.duration;
    let mut writers = tokio::task::JoinSet::new();
    for v in 0..args.data_volumes {
        let live = live.clone();
        let cancel = cancel.clone();
        let size = args.volume_size as usize;
        let rate = args.data_rate / args.data_volumes.max(1) as u64;
        writers.spawn(async move {
            let paced_from = tokio::time::Instant::now();
            let at = format!("127.0.0.1:{}", FRONTEND_PORT + v as u16);
            let mut block = vec![0u8; BLOCK];
            let mut offset = 0usize;
            let mut n = 0u64;
            let mut conn = None;
            while Instant::now() < deadline && !cancel.load(Ordering::Relaxed) {
                if conn.is_none() {
                    match sim::dataconn::DataClient::connect(&at).await {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            live.data_errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
                n += 1;
                // Bytes no compression shrinks (xorshift), as a database's pages would be:
                // the backup phase then uploads what the volume holds.
                let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for chunk in block.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
                }
                let Some(c) = conn.as_mut() else { continue };
                match c.write_at(offset as i64, &block).await {
                    Ok(()) => {
                        live.data_bytes.fetch_add(BLOCK as u64, Ordering::Relaxed);
                        if rate > 0 {
                            let due =
                                Duration::from_secs_f64((n * BLOCK as u64) as f64 / rate as f64);
                            tokio::time::sleep_until(paced_from + due).await;
                        }
                    }
                    Err(_) => {
                        live.data_errors.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                offset = (offset + BLOCK) % size.max(BLOCK);
            }
        });
    }
    while writers.join_next().await.is_some() {}
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// lhnet's interface byte counters per network, from its Prometheus text.
fn lhnet_bytes(metrics: &Metrics) -> BTreeMap<String, Bytes> {
    let mut out: BTreeMap<String, Bytes> = BTreeMap::new();
    for line in metrics.render().lines() {
        let (rx, rest) = if let Some(r) = line.strip_prefix("lhnet_interface_receive_bytes_total{")
        {
            (true, r)
        } else if let Some(r) = line.strip_prefix("lhnet_interface_transmit_bytes_total{") {
            (false, r)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let network = labels
            .split(',')
            .find_map(|l| l.strip_prefix("network=\""))
            .map(|n| n.trim_end_matches('"').to_string())
            .unwrap_or_default();
        let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        let entry = out.entry(network).or_default();
        if rx {
            entry.rx_bytes += value;
        } else {
            entry.tx_bytes += value;
        }
    }
    out
}

fn kernel_bytes(ns: &str) -> Result<BTreeMap<String, Bytes>, String> {
    let counters = lhnet_netns::run_in(ns, read_device_counters)
        .and_then(|r| r)
        .map_err(|e| format!("reading counters in {ns}: {e}"))?;
    Ok(counters
        .into_iter()
        .filter(|(d, _)| d == "eth0" || d == "lhnet1")
        .map(|(d, c)| {
            (
                d,
                Bytes {
                    rx_bytes: c.rx_bytes,
                    tx_bytes: c.tx_bytes,
                },
            )
        })
        .collect())
}

fn delta(
    after: &BTreeMap<String, Bytes>,
    before: &BTreeMap<String, Bytes>,
) -> BTreeMap<String, Bytes> {
    after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k).copied().unwrap_or_default();
            (
                k.clone(),
                Bytes {
                    rx_bytes: a.rx_bytes.saturating_sub(b.rx_bytes),
                    tx_bytes: a.tx_bytes.saturating_sub(b.tx_bytes),
                },
            )
        })
        .collect()
}

fn progress(live: &Live, started: Instant, total: Duration, spare: Option<&SimReplica>, tty: bool) {
    let (got, expected) = spare.map(|s| s.rebuild_progress()).unwrap_or_default();
    let rebuild = match (got * 100).checked_div(expected) {
        Some(percent) => format!("{percent}%"),
        None => "waiting".into(),
    };
    let line = format!(
        "[{:>3.0}/{:.0} s] control {} calls ({} errors), data {} MiB, rebuild {rebuild}",
        started.elapsed().as_secs_f64().min(total.as_secs_f64()),
        total.as_secs_f64(),
        live.control.load(Ordering::Relaxed),
        live.control_errors.load(Ordering::Relaxed),
        live.data_bytes.load(Ordering::Relaxed) >> 20,
    );
    if tty {
        eprint!("\r{line}   ");
    } else {
        eprintln!("{line}");
    }
}

/// Builds the topology, runs the load, tears everything down (also on error or when
/// `cancel` is set) and reports.
pub fn run(args: &DemoArgs, cancel: Arc<AtomicBool>) -> Result<DemoReport, String> {
    if !Topology::can_build() {
        return Err(
            "the demo builds network namespaces, veth pairs and bridges and needs root: run it with sudo"
                .into(),
        );
    }
    let args = DemoArgs {
        volumes: args.volumes.max(1),
        data_volumes: args.data_volumes.clamp(1, args.volumes.max(1)),
        ..args.clone()
    };
    let longhorn = match &args.longhorn {
        Some(p) => p.clone(),
        None => {
            std::env::current_exe().map_err(|e| format!("the engine binary (this program): {e}"))?
        }
    };
    if replica_port(args.volumes) > 30000 {
        return Err(format!(
            "{} volumes do not fit the port range 10000-30000",
            args.volumes
        ));
    }
    eprintln!("building the topology: manager, engine, replica-a, replica-b, spare (namespaces, veth, two bridges)");
    let mut topo = Topology::new("demo").map_err(|e| format!("topology: {e}"))?;
    type Built = (Namespace, Vec<(&'static str, Namespace, u8)>);
    let built = (|| -> std::io::Result<Built> {
        topo.add_bridge("mgmt")?;
        topo.add_bridge("stor")?;
        let manager = topo.add_namespace("manager")?;
        topo.attach(
            &manager,
            "eth0",
            "mgmt",
            Some(&format!("{MGMT_NET}.{MANAGER_HOST}/24")),
        )?;
        let mut pods = Vec::new();
        for (name, host) in [
            ("engine", 10u8),
            ("replica-a", 11),
            ("replica-b", 12),
            ("spare", 13),
        ] {
            let ns = topo.add_namespace(name)?;
            topo.attach(&ns, "eth0", "mgmt", Some(&format!("{MGMT_NET}.{host}/24")))?;
            topo.attach(
                &ns,
                "lhnet1",
                "stor",
                Some(&format!("{STORAGE_NET}.{host}/24")),
            )?;
            pods.push((name, ns, host));
        }
        Ok((manager, pods))
    })();
    let (manager_ns, pod_specs) = built.map_err(|e| format!("topology: {e}"))?;
    // The backup target: an S3 server on the storage bridge only (no management address).
    let s3 = topo
        .add_namespace("backupstore")
        .and_then(|ns| {
            topo.attach(
                &ns,
                "eth0",
                "stor",
                Some(&format!("{STORAGE_NET}.{S3_HOST}/24")),
            )?;
            Ok(ns)
        })
        .map_err(|e| format!("topology: {e}"))
        .map(|ns| {
            crate::demo_backup::start_s3(topo.command(&ns, "python3"), ip(STORAGE_NET, S3_HOST))
        })?;
    let upgrade_pod = if args.upgrade {
        let ns = (|| -> std::io::Result<Namespace> {
            let ns = topo.add_namespace("upgrade")?;
            topo.attach(
                &ns,
                "eth0",
                "mgmt",
                Some(&format!("{MGMT_NET}.{UPGRADE_HOST}/24")),
            )?;
            topo.attach(
                &ns,
                "lhnet1",
                "stor",
                Some(&format!("{STORAGE_NET}.{UPGRADE_HOST}/24")),
            )?;
            Ok(ns)
        })()
        .map_err(|e| format!("topology: {e}"))?;
        Some(UpgradePod::start(ns, &longhorn)?)
    } else {
        None
    };

    eprintln!(
        "starting lhnet and the simulator in each pod: {} volumes ({} with block writes), {} MiB each",
        args.volumes,
        args.data_volumes,
        args.volume_size >> 20
    );
    let mut pods = Vec::new();
    // Replica pods first: an engine opens its replicas when it starts, as Longhorn's does.
    for (name, ns, host) in pod_specs.into_iter().rev() {
        let role = match name {
            "engine" => Role::Engine {
                longhorn: longhorn.clone(),
            },
            "spare" => Role::Replicas { count: 1 },
            _ => Role::Replicas {
                count: args.volumes,
            },
        };
        pods.push(start_pod(name, ns, host, role, args.volume_size)?);
    }
    pods.reverse();

    let before: Vec<_> = pods
        .iter()
        .map(|p| Ok((kernel_bytes(&p.ns.name)?, lhnet_bytes(&p.metrics))))
        .collect::<Result<_, String>>()?;
    let live = Arc::new(Live::default());
    let frontends_up = Arc::new(AtomicBool::new(false));

    eprintln!(
        "running for {} s: engine-monitor calls from the manager (management IPs only), block writes, snapshots, a rebuild onto the spare",
        args.duration.as_secs()
    );
    let started = Instant::now();
    let engine_pod = pods[0].mgmt;
    let spare_pod = pods[3].mgmt;
    let manager_thread = {
        let (args, live, up, cancel) = (
            args.clone(),
            live.clone(),
            frontends_up.clone(),
            cancel.clone(),
        );
        spawn_in(&manager_ns.name, move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(manager(args, engine_pod, spare_pod, live, up, cancel))
        })
        .map_err(|e| format!("manager thread: {e}"))?
    };
    let data_thread = {
        let (args, live, up, cancel) = (
            args.clone(),
            live.clone(),
            frontends_up.clone(),
            cancel.clone(),
        );
        spawn_in(&pods[0].ns.name, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(data_load(args, live, up, cancel)))
        })
        .map_err(|e| format!("data thread: {e}"))?
    };
    let lhnet_started = Arc::new(Mutex::new(None::<f64>));
    let upgrade_thread = match &upgrade_pod {
        Some(_) => {
            let (cancel, lhnet_started, size) =
                (cancel.clone(), lhnet_started.clone(), args.volume_size);
            let until = started + args.duration;
            let im = ip(MGMT_NET, UPGRADE_HOST);
            Some(
                spawn_in(&manager_ns.name, move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?
                        .block_on(async move {
                            crate::upgrade::create_volume(im, size).await?;
                            Ok::<_, String>(
                                crate::upgrade::manage(im, started, until, lhnet_started, cancel)
                                    .await,
                            )
                        })
                })
                .map_err(|e| format!("upgrade manager thread: {e}"))?,
            )
        }
        None => None,
    };
    let mut upgrade_pod = upgrade_pod;
    let tty = std::io::stderr().is_terminal();
    let spare = pods[3].replicas.first().cloned();
    let mut last_line = Instant::now();
    while !(manager_thread.is_finished()
        && data_thread.is_finished()
        && upgrade_thread.as_ref().is_none_or(|t| t.is_finished()))
    {
        std::thread::sleep(Duration::from_millis(250));
        if let Some(pod) = upgrade_pod.as_mut() {
            if !pod.has_lhnet() && started.elapsed() >= args.duration / 2 {
                // The moment the start began: the manager may move its calls as soon as lhnet
                // answers, before start_lhnet returns here.
                let at = started.elapsed().as_secs_f64();
                pod.start_lhnet()?;
                *lhnet_started.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
                eprintln!("[{at:5.1} s] upgrade pod: lhnet started, capture redirects 8503 to it");
            }
        }
        let every = if tty {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        if last_line.elapsed() >= every {
            progress(&live, started, args.duration, spare.as_ref(), tty);
            last_line = Instant::now();
        }
    }
    progress(&live, started, args.duration, spare.as_ref(), tty);
    if tty {
        eprintln!();
    }
    let elapsed = started.elapsed();
    let managed = manager_thread
        .join()
        .map_err(|_| "the manager thread panicked".to_string())?
        .map_err(|e| format!("manager namespace: {e}"))??;
    let _ = data_thread.join();
    let upgrade = match upgrade_thread {
        Some(t) => Some(
            t.join()
                .map_err(|_| "the upgrade manager thread panicked".to_string())?
                .map_err(|e| format!("manager namespace: {e}"))??,
        ),
        None => None,
    };
    drop(upgrade_pod);

    let mut pod_reports = Vec::new();
    for (pod, (k0, l0)) in pods.iter().zip(&before) {
        let devices = delta(&kernel_bytes(&pod.ns.name)?, k0);
        let lhnet = delta(&lhnet_bytes(&pod.metrics), l0);
        let eth0 = devices.get("eth0").map(Bytes::total).unwrap_or(0);
        let lhnet1 = devices.get("lhnet1").map(Bytes::total).unwrap_or(0);
        pod_reports.push(PodReport {
            name: pod.name.to_string(),
            management_ip: pod.mgmt.to_string(),
            storage_ip: pod.storage.to_string(),
            devices,
            lhnet,
            eth0_share: if lhnet1 == 0 {
                f64::INFINITY
            } else {
                eth0 as f64 / lhnet1 as f64
            },
        });
    }
    let mut rebuild = managed.rebuild;
    rebuild.bytes = spare.map(|s| s.rebuild_progress().0).unwrap_or(0);

    let backup = match &s3 {
        Ok(server) => {
            eprintln!(
                "backing vol-00 up to S3 on the storage bridge ({}), through lhnet",
                server.endpoint
            );
            backup_phase(&pods, &manager_ns, &server.endpoint)?
        }
        Err(why) => BackupReport {
            skipped: Some(why.clone()),
            ..Default::default()
        },
    };
    drop(s3);

    // Tear down: lhnet and the simulator stop in each pod, then the namespaces go.
    drop(pods);
    drop(topo);

    let mut sorted: Vec<f64> = managed.latencies.iter().map(|(_, ms)| *ms).collect();
    sorted.sort_by(f64::total_cmp);
    let requests = live.control.load(Ordering::Relaxed);
    let worst = pod_reports
        .iter()
        .max_by(|a, b| a.eth0_share.total_cmp(&b.eth0_share))
        .map(|p| (p.name.clone(), p.eth0_share))
        .unwrap_or_default();
    let seconds = elapsed.as_secs_f64().max(1e-9);
    Ok(DemoReport {
        duration_s: seconds,
        volumes: args.volumes,
        control: ControlReport {
            requests,
            errors: live.control_errors.load(Ordering::Relaxed),
            rps: requests as f64 / seconds,
            p50_ms: percentile(&sorted, 0.50),
            p99_ms: percentile(&sorted, 0.99),
            p999_ms: percentile(&sorted, 0.999),
            error_samples: managed.error_samples,
            proxy_dials: live.proxy_dials.load(Ordering::Relaxed),
            by_call: managed
                .by_call
                .into_iter()
                .map(|(name, mut ms)| {
                    ms.sort_by(f64::total_cmp);
                    (
                        name.to_string(),
                        CallStats {
                            requests: ms.len() as u64,
                            p50_ms: percentile(&ms, 0.50),
                            p99_ms: percentile(&ms, 0.99),
                        },
                    )
                })
                .collect(),
        },
        data: DataReport {
            bytes: live.data_bytes.load(Ordering::Relaxed),
            mib_per_s: live.data_bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64 / seconds,
            errors: live.data_errors.load(Ordering::Relaxed),
        },
        rebuild,
        segregation: Segregation {
            ok: worst.1 < SEGREGATION_THRESHOLD,
            threshold: SEGREGATION_THRESHOLD,
            worst_pod: worst.0,
            worst_share: worst.1,
        },
        pods: pod_reports,
        upgrade,
        backup,
        latencies: managed.latencies,
    })
}

/// The backup phase (`demo_backup`): counters of the replica pods before and after a backup
/// of vol-00 the manager asks for through the engine pod's lhnet.
fn backup_phase(
    pods: &[Pod],
    manager_ns: &Namespace,
    endpoint: &str,
) -> Result<BackupReport, String> {
    use crate::demo_backup as b;
    let counters = || -> Result<Vec<b::PodCounters>, String> {
        pods.iter()
            .filter(|p| p.name != "engine")
            .map(|p| {
                let kernel = kernel_bytes(&p.ns.name)?
                    .into_iter()
                    .map(|(d, bytes)| (d, bytes.total()))
                    .collect();
                Ok((
                    p.name.to_string(),
                    kernel,
                    b::egress_sent(&p.metrics.render()),
                ))
            })
            .collect()
    };
    let target = "s3://demo-backups@us-east-1/demo".to_string();
    let engine_pod = pods[0].mgmt;
    let before = counters()?;
    let (endpoint, request_target) = (endpoint.to_string(), target.clone());
    let done = spawn_in(&manager_ns.name, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(b::back_up(
                SocketAddr::new(IpAddr::V4(engine_pod), LHNET_PORT),
                engine_request(0, SocketAddr::new(IpAddr::V4(engine_pod), BASE_PORT)),
                &endpoint,
                &request_target,
            ))
    })
    .map_err(|e| format!("backup manager thread: {e}"))?
    .join()
    .map_err(|_| "the backup manager thread panicked".to_string())?
    .map_err(|e| format!("manager namespace: {e}"))?;
    let after = counters()?;
    let mut report = BackupReport {
        target,
        volume: volume_name(0),
        pods: b::pods_report(&before, &after),
        ..Default::default()
    };
    match done {
        Ok((seconds, bytes)) => {
            report.seconds = seconds;
            report.backup_bytes = bytes;
        }
        Err(e) => report.error = Some(e),
    }
    b::judge(&mut report, SEGREGATION_THRESHOLD);
    Ok(report)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

pub fn print(r: &DemoReport) {
    println!(
        "lhnet demo: {} volumes, {:.1} s, manager on the management network only",
        r.volumes, r.duration_s
    );
    println!();
    println!(
        "control   {} requests, {} errors, {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms",
        r.control.requests,
        r.control.errors,
        r.control.rps,
        r.control.p50_ms,
        r.control.p99_ms,
        r.control.p999_ms
    );
    println!(
        "          one proxy client for the engine pod's instance-manager, health-checked every {} s: {} dialled",
        MONITOR_EVERY.as_secs(),
        r.control.proxy_dials
    );
    for (name, c) in &r.control.by_call {
        println!(
            "          {name:<24} {:>6} calls  p50 {:>7.2} ms  p99 {:>7.2} ms",
            c.requests, c.p50_ms, c.p99_ms
        );
    }
    for e in &r.control.error_samples {
        println!("          error: {e}");
    }
    println!(
        "data      {} MiB written through the frontends, {:.1} MiB/s, {} errors",
        mib(r.data.bytes),
        r.data.mib_per_s,
        r.data.errors
    );
    println!(
        "rebuild   {} MiB onto the spare in {:.2} s{}",
        mib(r.rebuild.bytes),
        r.rebuild.seconds,
        match &r.rebuild.error {
            Some(e) => format!(" FAILED: {e}"),
            None => String::new(),
        }
    );
    println!();
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14} {:>9}",
        "pod",
        "eth0 rx MiB",
        "eth0 tx MiB",
        "lhnet1 rx",
        "lhnet1 tx",
        "lhnet mgmt",
        "lhnet storage",
        "eth0 %"
    );
    for p in &r.pods {
        let d = |name: &str| p.devices.get(name).copied().unwrap_or_default();
        let l = |name: &str| p.lhnet.get(name).map(Bytes::total).unwrap_or(0);
        println!(
            "{:<10} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14} {:>8.2}%",
            p.name,
            mib(d("eth0").rx_bytes),
            mib(d("eth0").tx_bytes),
            mib(d("lhnet1").rx_bytes),
            mib(d("lhnet1").tx_bytes),
            mib(l("management")),
            mib(l("storage")),
            p.eth0_share * 100.0
        );
    }
    println!();
    println!(
        "segregation: {} (every pod's eth0 under {:.0}% of its lhnet1 bytes; worst: {} at {:.2}%)",
        if r.segregation.ok { "PASS" } else { "FAIL" },
        r.segregation.threshold * 100.0,
        r.segregation.worst_pod,
        r.segregation.worst_share * 100.0
    );
    print_backup(&r.backup);
    if let Some(u) = &r.upgrade {
        print_upgrade(u);
    }
}

fn print_backup(b: &BackupReport) {
    println!();
    if let Some(why) = &b.skipped {
        println!("backup: skipped: {why}");
        return;
    }
    println!(
        "backup: {} (backup-demo of {} to {}, S3 on the storage bridge only, asked by management IP: {} in {:.1} s; the replica pods' egress listeners sent {} (lz4), their eth0 carried {} = {:.2}% of it){}",
        if b.ok { "PASS" } else { "FAIL" },
        b.volume,
        b.target,
        human_bytes(b.backup_bytes as f64),
        b.seconds,
        human_bytes(b.uploaded_bytes as f64),
        human_bytes(b.eth0_bytes as f64),
        b.eth0_share * 100.0,
        match &b.error {
            Some(e) => format!(": {e}"),
            None => String::new(),
        }
    );
    for p in &b.pods {
        println!(
            "        {:<10} lhnet1 {:>10}  eth0 {:>10}  egress sent {:>10}",
            p.name,
            human_bytes(p.lhnet1_bytes as f64),
            human_bytes(p.eth0_bytes as f64),
            human_bytes(p.egress_sent_bytes as f64)
        );
    }
}

fn print_upgrade(u: &crate::upgrade::UpgradeReport) {
    let at = |t: Option<f64>| t.map_or("never".to_string(), |t| format!("{t:.1} s"));
    println!();
    println!(
        "upgrade: {} (an instance-manager pod without lhnet, then with it: lhnet up at {}, the manager's calls moved to the proxy at {}; {} calls straight to the engine, {} through the proxy, {} failed)",
        if u.ok { "PASS" } else { "FAIL" },
        at(u.lhnet_started_s),
        at(u.switched_s),
        u.calls.get("fallback").copied().unwrap_or(0),
        u.calls.get("proxy").copied().unwrap_or(0),
        u.failed
    );
    let mut per: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for (t, path) in &u.timeline {
        let e = per.entry(*t as u64 / 2 * 2).or_default();
        match *path {
            "proxy" => e.1 += 1,
            _ => e.0 += 1,
        }
    }
    let line: Vec<String> = per
        .iter()
        .map(|(s, (f, p))| format!("{s}-{}s {f}/{p}", s + 2))
        .collect();
    println!(
        "         calls per 2 s (fallback/proxy): {}",
        line.join("  ")
    );
    for e in &u.error_samples {
        println!("         error: {e}");
    }
}

/// Latency over time (every call, and the p50 / p99 of each second) and bytes per network per
/// pod, as one SVG with legends and byte axes in KiB / MiB / GiB.
pub fn plot(r: &DemoReport, path: &std::path::Path) -> Result<(), String> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (top, bottom) = root.split_vertically(400);

    let max_ms = r.latencies.iter().map(|(_, ms)| *ms).fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "control call latency through lhnet (manager → engine pod)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..r.duration_s.max(1.0), 0f64..max_ms * 1.05)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start")
        .y_desc("ms")
        .draw()
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(
            r.latencies
                .iter()
                .map(|(t, ms)| Circle::new((*t, *ms), 2, BLUE.mix(0.25).filled())),
        )
        .map_err(|e| fail(&e))?
        .label("a call")
        .legend(|(x, y)| Circle::new((x + 10, y), 3, BLUE.mix(0.5).filled()));
    let seconds = per_second_percentiles(&r.latencies);
    for (which, color, name) in [
        (0usize, GREEN, "p50 of each second"),
        (1, RED, "p99 of each second"),
    ] {
        let line = seconds.iter().map(|(t, p)| (*t, p[which]));
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if let Some(u) = &r.upgrade {
        let marks = [
            (
                u.lhnet_started_s,
                RGBColor(230, 140, 0),
                "upgrade pod: lhnet started",
            ),
            (
                u.switched_s,
                MAGENTA,
                "upgrade pod: manager moved to the proxy",
            ),
        ];
        for (at, color, name) in marks {
            let Some(at) = at else { continue };
            chart
                .draw_series(LineSeries::new(
                    [(at, 0.0), (at, max_ms * 1.05)],
                    color.stroke_width(2),
                ))
                .map_err(|e| fail(&e))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| fail(&e))?;

    let max_bytes = r
        .pods
        .iter()
        .flat_map(|p| p.devices.values().map(Bytes::total))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let n = r.pods.len().max(1);
    let names: Vec<String> = r.pods.iter().map(|p| p.name.clone()).collect();
    let mut bars = ChartBuilder::on(&bottom)
        .caption(
            "bytes per network per pod (kernel counters)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(
            0f64..n as f64,
            (1f64..max_bytes * 4.0).log_scale().base(1024.0),
        )
        .map_err(|e| fail(&e))?;
    bars.configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|b| human_bytes(*b))
        .y_desc("bytes (log scale)")
        .draw()
        .map_err(|e| fail(&e))?;
    let grey = RGBColor(150, 150, 150);
    for (device, color, offset, name) in [
        ("eth0", grey, 0.1, "eth0: management network"),
        ("lhnet1", BLUE, 0.55, "lhnet1: storage network"),
    ] {
        let series = r.pods.iter().enumerate().map(|(i, p)| {
            let total = p.devices.get(device).map(Bytes::total).unwrap_or(0).max(1) as f64;
            let x = i as f64 + offset;
            Rectangle::new([(x, 1.0), (x + 0.35, total)], color.filled())
        });
        bars.draw_series(series)
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    bars.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

/// Bytes as an operator reads them: `512 B`, `1.5 KiB`, `20 MiB`, `3.2 GiB`.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes.max(0.0);
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match (unit, value < 10.0 && value.fract() > 0.05) {
        (0, _) => format!("{value:.0} B"),
        (_, true) => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.0} {}", UNITS[unit]),
    }
}

/// The p50 and p99 of the calls in each whole second, at the second's middle.
fn per_second_percentiles(latencies: &[(f64, f64)]) -> Vec<(f64, [f64; 2])> {
    let mut by_second: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (t, ms) in latencies {
        by_second.entry(t.max(0.0) as u64).or_default().push(*ms);
    }
    by_second
        .into_iter()
        .map(|(second, mut ms)| {
            ms.sort_by(f64::total_cmp);
            let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
            (second as f64 + 0.5, [at(0.5), at(0.99)])
        })
        .collect()
}

#[cfg(test)]
mod plot_tests {
    use super::*;

    #[test]
    fn byte_axes_read_in_binary_units() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(20.0 * 1024.0 * 1024.0), "20 MiB");
        assert_eq!(human_bytes(1e9), "954 MiB");
        assert_eq!(human_bytes(3.2 * (1u64 << 30) as f64), "3.2 GiB");
    }

    #[test]
    fn each_second_gets_its_p50_and_p99() {
        let mut calls: Vec<(f64, f64)> = (0..100).map(|i| (0.3, f64::from(i))).collect();
        calls.push((1.2, 7.0));
        let seconds = per_second_percentiles(&calls);
        assert_eq!(seconds.len(), 2);
        assert_eq!(seconds[0], (0.5, [50.0, 98.0]));
        assert_eq!(seconds[1], (1.5, [7.0, 7.0]));
    }
}
