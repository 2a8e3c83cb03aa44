//! Wiring only: builds metrics, the storage address, clusters, route tables, listeners and the
//! admin server from a config, and runs them until shutdown.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::address_map::AddressMap;
use crate::admin::{self, AdminState};
use crate::cluster::Cluster;
use crate::config::{Config, ListenAddress, ListenerKind, LOOPBACK_CLUSTER};
use crate::egress::EgressListener;
use crate::engine_proxy::BackupTargets;
use crate::health::HealthService;
use crate::listener::{GrpcListener, StorageGrpcListener};
use crate::metrics::Metrics;
use crate::peer::PeerService;
use crate::route::{LocalServices, RouteTable};
use crate::storage::StorageState;
use crate::tcp::{TcpForwarder, Upstream};
use crate::tls::ServerTls;

/// What the process supplies that is not in the config file.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The pod IP (`POD_IP` from the downward API): management source address and fallback.
    pub pod_ip: Option<IpAddr>,
}

/// A started proxy.
pub struct RunningProxy {
    listeners: Vec<(String, SocketAddr)>,
    /// gRPC listeners on `storage:PORT` and the address they accept on right now.
    storage_grpc: Vec<(String, Arc<Mutex<Option<SocketAddr>>>)>,
    /// `kind: tcp` listeners and the addresses they have bound right now.
    tcp_bound: Vec<(String, Arc<Mutex<Vec<SocketAddr>>>)>,
    admin: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    admin_thread: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// Applies new configs to a running proxy; cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
}

struct Shared {
    metrics: Arc<Metrics>,
    storage: Arc<StorageState>,
    config: Arc<ArcSwap<Config>>,
    tables: HashMap<String, Arc<ArcSwap<RouteTable>>>,
    locals: LocalServices,
    /// The clusters in use, so a reload keeps the unchanged ones and their connections.
    clusters: Mutex<HashMap<String, Arc<Cluster>>>,
}

/// Starts everything the config describes. Errors say which part could not start.
pub async fn start(config: Config, options: Options) -> Result<RunningProxy, String> {
    let metrics = Metrics::new();
    let storage = StorageState::new(&config.storage_network, options.pod_ip, metrics.clone());
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = watch::channel(false);
    let backup_targets = BackupTargets::new(&config.backup_target);
    // Backup egress first: engine proxy routes hand its address to replicas.
    let mut egress = Vec::new();
    for l in config
        .listeners
        .iter()
        .filter(|l| l.kind == ListenerKind::HttpConnect)
    {
        egress.push(
            EgressListener::bind(l, storage.clone(), metrics.clone(), backup_targets.clone())
                .await?,
        );
    }
    let locals = LocalServices {
        health: HealthService::server(ready_rx.clone()),
        peer: PeerService::server(storage.clone()),
        address_map: AddressMap::new(storage.clone(), &config),
        backup_targets,
        egress: Arc::new(
            egress
                .iter()
                .map(|e| (e.name().to_string(), e.local_addr()))
                .collect(),
        ),
    };
    let clusters = reuse_clusters(&HashMap::new(), &config, &storage, &metrics);
    let admin_listener = admin::bind(config.admin.address).map_err(|e| e.to_string())?;
    let admin_port = admin_listener
        .local_addr()
        .map_err(|e| format!("admin: {e}"))?
        .port();

    let mut bound = Vec::new();
    let mut tables = HashMap::new();
    let mut forwarders = Vec::new();
    let mut storage_grpc = Vec::new();
    for l in &config.listeners {
        if l.kind == ListenerKind::HttpConnect {
            continue;
        }
        if l.kind == ListenerKind::Tcp {
            let cluster = l.cluster.as_deref().unwrap_or(LOOPBACK_CLUSTER);
            let upstream = match clusters.get(cluster) {
                Some(c) => Upstream::Cluster(c.clone()),
                None => Upstream::Loopback { admin_port },
            };
            let forwarder = TcpForwarder::new(l, upstream, storage.clone(), metrics.clone());
            let initial = forwarder.bind_initial().await?;
            forwarders.push((forwarder, initial));
            continue;
        }
        let table = Arc::new(ArcSwap::from_pointee(RouteTable::new(
            l,
            &clusters,
            locals.clone(),
            metrics.clone(),
        )));
        tables.insert(l.name.clone(), table.clone());
        let tls = match &l.tls {
            Some(t) => Some(
                ServerTls::for_listener(&l.name, t)
                    .map_err(|e| format!("listener {}: tls (mode required): {e}", l.name))?,
            ),
            None => None,
        };
        let address = match l.address {
            ListenAddress::Socket(a) => a,
            ListenAddress::Range { .. } => {
                return Err(format!(
                    "listener {}: port ranges are for kind: tcp listeners",
                    l.name
                ))
            }
            ListenAddress::Storage(port) => {
                let follower =
                    StorageGrpcListener::new(&l.name, port, table.clone(), tls, &storage);
                let initial = follower.bind_initial(&storage).await;
                storage_grpc.push((follower, initial));
                continue;
            }
        };
        let listener = GrpcListener::bind(&l.name, address, table, tls)
            .await
            .map_err(|e| e.to_string())?;
        bound.push(listener);
    }

    let config = Arc::new(ArcSwap::from_pointee(config));
    let admin_state = Arc::new(AdminState {
        metrics: metrics.clone(),
        storage: storage.clone(),
        config: config.clone(),
        ready: ready_rx,
        shutdown: shutdown.clone(),
    });
    let (admin, admin_thread) =
        admin::spawn(admin_listener, admin_state).map_err(|e| e.to_string())?;
    tracing::info!(address = %admin, "admin server listening");

    let drain_timeout = config.load().drain_timeout;
    let listeners = bound
        .iter()
        .map(|l| (l.name.to_string(), l.local_addr))
        .chain(
            egress
                .iter()
                .map(|e| (e.name().to_string(), e.local_addr())),
        )
        .collect();
    let mut tasks = Vec::new();
    let storage_grpc_bound = storage_grpc
        .iter()
        .map(|(f, _)| (f.name.to_string(), f.bound.clone()))
        .collect();
    for (follower, initial) in storage_grpc {
        tasks.push(tokio::spawn(follower.run(
            initial,
            storage.clone(),
            metrics.clone(),
            shutdown.clone(),
            drain_timeout,
        )));
    }
    let tcp_bound = forwarders
        .iter()
        .map(|(f, _)| (f.name().to_string(), f.bound()))
        .collect();
    for (forwarder, initial) in forwarders {
        tasks.push(tokio::spawn(forwarder.run(
            initial,
            shutdown.clone(),
            drain_timeout,
        )));
    }
    for e in egress {
        tasks.push(tokio::spawn(e.run(shutdown.clone(), drain_timeout)));
    }
    for l in bound {
        tasks.push(tokio::spawn(l.serve(
            storage.clone(),
            metrics.clone(),
            shutdown.clone(),
            drain_timeout,
        )));
    }
    let follow = tokio::spawn(storage.clone().follow());
    tasks.push(tokio::spawn(track_readiness(
        storage.clone(),
        ready_tx,
        shutdown.clone(),
        follow,
    )));

    Ok(RunningProxy {
        listeners,
        storage_grpc: storage_grpc_bound,
        tcp_bound,
        admin,
        shutdown,
        tasks,
        admin_thread: Some(admin_thread),
        shared: Arc::new(Shared {
            metrics,
            storage,
            config,
            tables,
            locals,
            clusters: Mutex::new(clusters),
        }),
    })
}

/// The clusters of `config`: one of `old` whose config is unchanged (same name, every key the
/// same) is kept with its pools and connections; the others are built anew (all of them at
/// start, from an empty `old`).
fn reuse_clusters(
    old: &HashMap<String, Arc<Cluster>>,
    config: &Config,
    storage: &Arc<StorageState>,
    metrics: &Arc<Metrics>,
) -> HashMap<String, Arc<Cluster>> {
    let same = |a: &crate::config::ClusterConfig, b: &crate::config::ClusterConfig| {
        // The config dump's form: every key, and not the place in the file.
        serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
    };
    config
        .clusters
        .iter()
        .map(|c| {
            let cluster = match old.get(&c.name) {
                Some(kept) if same(&kept.config, c) => kept.clone(),
                _ => Cluster::new(c.clone(), storage.clone(), metrics.clone()),
            };
            (c.name.clone(), cluster)
        })
        .collect()
}

/// Ready follows the storage address (with `fallback: wait`); ends at shutdown, stopping the
/// address watcher too.
async fn track_readiness(
    storage: Arc<StorageState>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
    follow: JoinHandle<()>,
) {
    let mut changes = storage.subscribe();
    loop {
        ready.send_replace(storage.is_ready());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
    }
    ready.send_replace(false);
    follow.abort();
}

// === impl RunningProxy ===

impl RunningProxy {
    /// A gRPC listener's address (now, for one on `storage:PORT`), or the first port a tcp
    /// listener has bound now.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .or_else(|| {
                self.storage_grpc
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, b)| *b.lock())
            })
            .or_else(|| self.tcp_listener_addrs(name).into_iter().next())
    }

    /// Every address a tcp listener has bound now (none while it waits for a storage address).
    pub fn tcp_listener_addrs(&self, name: &str) -> Vec<SocketAddr> {
        self.tcp_bound
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.lock().clone())
            .unwrap_or_default()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Cancelling this token starts a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
        }
    }

    /// See [`Reloader::reload`].
    pub fn reload(&self, new: Config) -> Result<(), String> {
        self.reloader().reload(new)
    }

    /// Waits until shutdown is requested (token or `POST /shutdown`) and the listeners drained.
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(admin) = self.admin_thread.take() {
            let _ = tokio::task::spawn_blocking(move || admin.join()).await;
        }
    }

    /// Starts a graceful shutdown and waits for it.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

// === impl Reloader ===

impl Reloader {
    /// Applies a new config's routes and clusters without dropping in-flight streams (they keep
    /// the table they started with). Listener addresses and the admin address need a restart;
    /// such changes are refused so the running config stays whole.
    pub fn reload(&self, new: Config) -> Result<(), String> {
        let result = self.try_reload(new);
        self.shared.metrics.config_reload(result.is_ok());
        result
    }

    /// Counts a reload that failed before it got here (the new file did not parse).
    pub fn reject(&self) {
        self.shared.metrics.config_reload(false);
    }

    fn try_reload(&self, new: Config) -> Result<(), String> {
        let old = self.shared.config.load();
        let shape = |c: &Config| -> Vec<(String, String)> {
            c.listeners
                .iter()
                .map(|l| {
                    (
                        l.name.clone(),
                        format!(
                            "{} {:?} {:?} {:?} {:?}",
                            l.address, l.kind, l.cluster, l.tls, l.egress
                        ),
                    )
                })
                .collect()
        };
        if shape(&old) != shape(&new) || old.admin.address != new.admin.address {
            return Err("listeners (names, kinds, addresses, tls, tcp clusters or http_connect settings) or the admin address changed; restart lhnet-proxy to apply".into());
        }
        let clusters = {
            let mut in_use = self.shared.clusters.lock();
            let clusters =
                reuse_clusters(&in_use, &new, &self.shared.storage, &self.shared.metrics);
            *in_use = clusters.clone();
            clusters
        };
        self.shared.locals.address_map.update(&new);
        self.shared
            .locals
            .backup_targets
            .reconfigure(&new.backup_target);
        for l in &new.listeners {
            if let Some(table) = self.shared.tables.get(&l.name) {
                table.store(Arc::new(RouteTable::new(
                    l,
                    &clusters,
                    self.shared.locals.clone(),
                    self.shared.metrics.clone(),
                )));
            }
        }
        self.shared.config.store(Arc::new(new));
        Ok(())
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
