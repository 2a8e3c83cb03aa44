//! Management-only addressing: a manager may name engines and replicas by management IPs;
//! the engine and replicas only ever see storage IPs. Each address in an
//! `imrpc.ProxyEngineService` request is mapped to the storage IP of the same pod (this pod from
//! its own interfaces, a peer from the `peers:` map or by asking the peer's lhnet over
//! `lhnet.v1.Peer`, with a short-lived cache), and when the request used management addresses the
//! replies are mapped back. An address that maps to nothing is an error that says so; there is
//! never a silent fallback to the management network.

use crate::tls::ClientTls;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::time::Instant;

use arc_swap::ArcSwap;
use lhnet_proto::imrpc::proxy_engine_service_server::{
    ProxyEngineService, ProxyEngineServiceServer,
};
use lhnet_proto::imrpc::*;
use tonic::{Request, Response, Status};

use crate::addr::{ManagementIp, Peer, StorageIp};
use crate::config::{Config, PeerLookupConfig};
use crate::engine_proxy::EngineProxy;
use crate::peer;
use crate::storage::StorageState;

/// Maps between this and other pods' management and storage addresses.
pub struct AddressMap {
    storage: Arc<StorageState>,
    settings: ArcSwap<Settings>,
    /// Learned pairs, both ways, and when.
    cache: Mutex<Learned>,
    /// Lookups a peer's lhnet did not answer: when, and the error. Not asked again within
    /// `failure_ttl` (forward: the error is repeated at once) or `cache_ttl` (reverse: the
    /// storage address is shown, without another warning).
    failed: Mutex<HashMap<(Direction, IpAddr), (Instant, String)>>,
}

/// What lookups taught: management → storage and storage → management.
#[derive(Default)]
struct Learned {
    storage_of: HashMap<ManagementIp, (StorageIp, Instant)>,
    management_of: HashMap<StorageIp, (ManagementIp, Instant)>,
}

/// Why an address the manager named has no storage address.
#[derive(Debug, thiserror::Error)]
#[error("no storage address known for {ip}; {why}")]
pub struct NoStorageAddress {
    ip: IpAddr,
    why: String,
}

struct Settings {
    peers: Vec<Peer>,
    lookup: PeerLookupConfig,
    /// `peer_lookup.tls`, loaded.
    tls: Option<Arc<ClientTls>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Direction {
    ToStorage,
    ToManagement,
}

impl AddressMap {
    pub fn new(storage: Arc<StorageState>, config: &Config) -> Arc<AddressMap> {
        Arc::new(AddressMap {
            storage,
            settings: ArcSwap::from_pointee(Settings::from(config)),
            cache: Mutex::new(Learned::default()),
            failed: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a reloaded config's `peers` and `peer_lookup`; forgets what was learned.
    pub fn update(&self, config: &Config) {
        self.settings.store(Arc::new(Settings::from(config)));
        *self.cache.lock() = Learned::default();
        self.failed.lock().clear();
    }

    /// Management IP → storage IP for each IP a request names (by field), for the ones that
    /// are management addresses; an IP with no storage address is UNAVAILABLE naming the field.
    pub(crate) async fn forward_table(
        &self,
        named: impl IntoIterator<Item = (&'static str, IpAddr)>,
    ) -> Result<HashMap<IpAddr, IpAddr>, Status> {
        let mut forward = HashMap::new();
        for (field, ip) in named {
            if forward.contains_key(&ip) {
                continue;
            }
            match self.to_storage(ip).await {
                Ok(Some(storage)) => {
                    forward.insert(ip, storage.ip());
                }
                Ok(None) => {}
                Err(e) => return Err(Status::unavailable(format!("{field}: {e}"))),
            }
        }
        Ok(forward)
    }

    fn cached_storage(&self, ip: ManagementIp) -> Option<StorageIp> {
        let ttl = self.settings.load().lookup.cache_ttl;
        let cache = self.cache.lock();
        let (to, at) = cache.storage_of.get(&ip)?;
        (at.elapsed() < ttl).then_some(*to)
    }

    fn cached_management(&self, ip: StorageIp) -> Option<ManagementIp> {
        let ttl = self.settings.load().lookup.cache_ttl;
        let cache = self.cache.lock();
        let (to, at) = cache.management_of.get(&ip)?;
        (at.elapsed() < ttl).then_some(*to)
    }

    /// How long ago a lookup of `ip` failed, and its error, when that was within `ttl`.
    fn recent_failure(
        &self,
        direction: Direction,
        ip: IpAddr,
        ttl: std::time::Duration,
    ) -> Option<(std::time::Duration, String)> {
        let failed = self.failed.lock();
        failed
            .get(&(direction, ip))
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(at, e)| (at.elapsed(), e.clone()))
    }

    /// Records a failed lookup; entries older than both TTLs are dropped on the way.
    fn remember_failure(&self, direction: Direction, ip: IpAddr, error: String) {
        let lookup = &self.settings.load().lookup;
        let keep = lookup.cache_ttl.max(lookup.failure_ttl);
        let mut failed = self.failed.lock();
        failed.retain(|_, (at, _)| at.elapsed() < keep);
        failed.insert((direction, ip), (Instant::now(), error));
    }

    fn learn(&self, peer: Peer) {
        {
            let mut cache = self.cache.lock();
            let now = Instant::now();
            cache
                .storage_of
                .insert(peer.management, (peer.storage, now));
            cache
                .management_of
                .insert(peer.storage, (peer.management, now));
        }
        let mut failed = self.failed.lock();
        failed.remove(&(Direction::ToStorage, peer.management.ip()));
        failed.remove(&(Direction::ToManagement, peer.storage.ip()));
    }

    /// The storage IP for `ip`; `Ok(None)` when it needs no mapping (loopback, or already on
    /// the storage network).
    pub async fn to_storage(&self, ip: IpAddr) -> Result<Option<StorageIp>, NoStorageAddress> {
        if ip.is_loopback() || ip.is_unspecified() || self.storage.on_storage_network(ip) {
            return Ok(None);
        }
        let fail = |why: String| NoStorageAddress { ip, why };
        let management = ManagementIp::new(ip);
        let settings = self.settings.load_full();
        if let Some(peer) = settings.peers.iter().find(|p| p.management == management) {
            return Ok(Some(peer.storage));
        }
        if let Some(s) = self.cached_storage(management) {
            return Ok(Some(s));
        }
        if self.storage.is_own_management_address(ip) {
            let current = self.storage.current().ok_or_else(|| {
                fail(format!(
                    "this pod has none: {}",
                    self.storage.last_error().unwrap_or_default()
                ))
            })?;
            let storage = StorageIp::new(current.ip);
            self.learn(Peer {
                management,
                storage,
            });
            return Ok(Some(storage));
        }
        if !settings.lookup.enabled {
            return Err(fail(
                "it is not in peers and peer_lookup is disabled (add it to peers: or enable peer_lookup)".into(),
            ));
        }
        if !self.may_ask(&settings, ip) {
            return Err(fail(format!(
                "it is not in peers and outside peer_lookup.networks ({}); add it to peers: or widen peer_lookup.networks",
                if settings.lookup.networks.is_empty() {
                    "default: this pod's management subnets".to_string()
                } else {
                    settings
                        .lookup
                        .networks
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        }
        let failure_ttl = settings.lookup.failure_ttl;
        if let Some((ago, e)) = self.recent_failure(Direction::ToStorage, ip, failure_ttl) {
            return Err(fail(format!(
                "peer lhnet did not answer {:.1} s ago: {e} (not asked again within peer_lookup.failure_ttl, {:.1} s)",
                ago.as_secs_f64(),
                failure_ttl.as_secs_f64()
            )));
        }
        let at = SocketAddr::new(ip, settings.lookup.port);
        // Boxed: the lookup's future is kilobytes and only a cache miss needs it; unboxed it
        // would sit in every engine-proxy call's future.
        match Box::pin(peer::ask(
            at,
            settings.lookup.timeout,
            settings.tls.as_deref(),
        ))
        .await
        {
            Ok(answer) => {
                tracing::debug!(management = %ip, storage = %answer.storage, "peer storage address learned");
                self.learn(Peer {
                    management,
                    storage: answer.storage,
                });
                Ok(Some(answer.storage))
            }
            Err(e) => {
                let e = e.to_string();
                self.remember_failure(Direction::ToStorage, ip, e.clone());
                Err(fail(format!("peer lhnet did not answer: {e}")))
            }
        }
    }

    /// Whether `ip` is on a management network lhnet may send peer lookups to.
    fn may_ask(&self, settings: &Settings, ip: IpAddr) -> bool {
        if settings.lookup.networks.is_empty() {
            return self.storage.on_management_network(ip);
        }
        settings.lookup.networks.iter().any(|n| n.cidr_contains(ip))
    }

    /// The management IP of the pod that holds storage IP `ip`, from what is known already
    /// (this pod, `peers`, what lookups taught): never asks anyone.
    pub fn known_management(&self, ip: IpAddr) -> Option<ManagementIp> {
        if !self.storage.on_storage_network(ip) {
            return None;
        }
        let storage = StorageIp::new(ip);
        if self.storage.current().is_some_and(|a| a.ip == ip) {
            return self.storage.own_management_address().map(ManagementIp::new);
        }
        let settings = self.settings.load();
        if let Some(peer) = settings.peers.iter().find(|p| p.storage == storage) {
            return Some(peer.management);
        }
        self.cached_management(storage)
    }

    /// The management IP of the pod that holds storage IP `ip`, when it can be known.
    pub async fn to_management(&self, ip: IpAddr) -> Option<ManagementIp> {
        if !self.storage.on_storage_network(ip) {
            return None;
        }
        if let Some(m) = self.known_management(ip) {
            return Some(m);
        }
        let storage = StorageIp::new(ip);
        let settings = self.settings.load_full();
        if !settings.lookup.enabled {
            return None;
        }
        let ttl = settings.lookup.cache_ttl;
        if self
            .recent_failure(Direction::ToManagement, ip, ttl)
            .is_some()
        {
            return None;
        }
        // The peer's management listener binds every address, its storage one included.
        let at = SocketAddr::new(ip, settings.lookup.port);
        // Boxed: the lookup's future is kilobytes and only a cache miss needs it; unboxed it
        // would sit in every engine-proxy call's future.
        match Box::pin(peer::ask(
            at,
            settings.lookup.timeout,
            settings.tls.as_deref(),
        ))
        .await
        {
            Ok(peer::PeerAddresses {
                management: Some(m),
                ..
            }) => {
                self.learn(Peer {
                    management: m,
                    storage,
                });
                Some(m)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(storage = %ip, error = %e, "cannot learn the management address of a peer; its storage address is shown");
                self.remember_failure(Direction::ToManagement, ip, e.to_string());
                None
            }
        }
    }
}

impl From<&Config> for Settings {
    fn from(config: &Config) -> Settings {
        Settings {
            peers: config.peers.clone(),
            lookup: config.peer_lookup.clone(),
            tls: config
                .peer_lookup
                .tls
                .as_ref()
                .map(|t| ClientTls::for_cluster("peer_lookup", t)),
        }
    }
}

/// Where the IP sits in an address as Longhorn writes it (`IP:PORT`, `tcp://IP:PORT`,
/// `http://IP:PORT/v1`, `[V6]:PORT`): the byte range of the IP and the IP. Host names: `None`.
pub(crate) fn ip_span(text: &str) -> Option<(usize, usize, IpAddr)> {
    let start = ["tcp://", "http://", "https://"]
        .iter()
        .find(|p| text.starts_with(*p))
        .map_or(0, |p| p.len());
    let rest = &text[start..];
    let (from, to) = if let Some(v6) = rest.strip_prefix('[') {
        (start + 1, start + 1 + v6.find(']')?)
    } else {
        (start, start + rest.find([':', '/']).unwrap_or(rest.len()))
    };
    let ip = text[from..to].parse().ok()?;
    // Only whole addresses (a port follows): anything else is for the engine proxy to refuse.
    let after = text[to..].strip_prefix(']').unwrap_or(&text[to..]);
    let port = after.strip_prefix(':')?;
    let digits = port.find('/').map_or(port, |i| &port[..i]);
    digits.parse::<u16>().ok()?;
    Some((from, to, ip))
}

/// Replaces the IP of an address by its entry in `table`, keeping the form.
pub(crate) fn rewrite_one(text: &mut String, table: &HashMap<IpAddr, IpAddr>) {
    if let Some((from, to, ip)) = ip_span(text) {
        if let Some(new) = table.get(&ip) {
            text.replace_range(from..to, &new.to_string());
        }
    }
}

/// Replaces whole-IP occurrences in free text (error messages).
pub(crate) fn rewrite_text(text: &str, table: &HashMap<IpAddr, IpAddr>) -> String {
    let mut out = text.to_string();
    for (from, to) in table {
        let from = from.to_string();
        let to = to.to_string();
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(&from) {
            let before = rest[..i].chars().last();
            let after = rest[i + from.len()..].chars().next();
            let boundary = |c: Option<char>| c.is_none_or(|c| !(c.is_ascii_hexdigit() || c == '.'));
            result.push_str(&rest[..i]);
            result.push_str(if boundary(before) && boundary(after) {
                &to
            } else {
                &from
            });
            rest = &rest[i + from.len()..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// The address fields of a message, by field name.
pub trait Addresses {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String));
}

macro_rules! no_addresses {
    ($($t:ty),* $(,)?) => {
        $(impl Addresses for $t {
            fn each(&mut self, _f: &mut dyn FnMut(&'static str, &mut String)) {}
        })*
    };
}

no_addresses!(
    (),
    EngineVersionProxyResponse,
    EngineVolumeGetProxyResponse,
    EngineVolumeSnapshotProxyResponse,
    EngineSnapshotListProxyResponse,
    EngineBackupRestoreProxyResponse,
    EngineMetricsGetProxyResponse,
    EngineReplicaRebuildConcurrentSyncLimitGetResponse,
);

impl Addresses for ProxyEngineRequest {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        f("address", &mut self.address);
    }
}

impl Addresses for Option<ProxyEngineRequest> {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        if let Some(r) = self {
            r.each(f);
        }
    }
}

macro_rules! engine_request {
    ($($t:ty $(=> $($field:ident),+)?);* $(;)?) => {
        $(impl Addresses for $t {
            fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
                self.proxy_engine_request.each(f);
                $($(f(stringify!($field), &mut self.$field);)+)?
            }
        })*
    };
}

engine_request!(
    EngineVolumeExpandRequest;
    EngineVolumeFrontendStartRequest;
    EngineVolumeUnmapMarkSnapChainRemovedSetRequest;
    EngineVolumeSnapshotMaxCountSetRequest;
    EngineVolumeSnapshotMaxSizeSetRequest;
    EngineVolumeSnapshotRequest;
    EngineSnapshotRevertRequest;
    EngineSnapshotPurgeRequest;
    EngineSnapshotCloneRequest => from_engine_address;
    EngineSnapshotRemoveRequest;
    EngineSnapshotHashRequest;
    EngineSnapshotHashStatusRequest;
    EngineSnapshotBackupRequest;
    EngineSnapshotBackupStatusRequest => replica_address;
    EngineBackupRestoreRequest;
    EngineBackupRestoreFinishRequest;
    EngineReplicaAddRequest => replica_address;
    EngineReplicaRebuildingQosSetRequest;
    EngineReplicaVerifyRebuildRequest => replica_address;
    EngineReplicaRemoveRequest => replica_address;
    EngineReplicaModeUpdateRequest => replica_address;
    EngineReplicaRebuildConcurrentSyncLimitSetRequest;
);

/// Map keys are addresses; values may hold one more.
fn each_key<V>(
    map: &mut HashMap<String, V>,
    f: &mut dyn FnMut(&'static str, &mut String),
    mut value: impl FnMut(&mut V, &mut dyn FnMut(&'static str, &mut String)),
) {
    let old = std::mem::take(map);
    for (mut k, mut v) in old {
        f("status key", &mut k);
        value(&mut v, f);
        map.insert(k, v);
    }
}

impl Addresses for EngineSnapshotPurgeStatusProxyResponse {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        each_key(&mut self.status, f, |_, _| {});
    }
}

impl Addresses for EngineSnapshotCloneStatusProxyResponse {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        each_key(&mut self.status, f, |v, f| {
            f("from_replica_address", &mut v.from_replica_address)
        });
    }
}

impl Addresses for EngineReplicaRebuildStatusProxyResponse {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        each_key(&mut self.status, f, |v, f| {
            f("from_replica_address", &mut v.from_replica_address);
            for a in &mut v.from_replica_address_list {
                f("from_replica_address_list", a);
            }
        });
    }
}

impl Addresses for EngineSnapshotHashStatusProxyResponse {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        each_key(&mut self.status, f, |_, _| {});
    }
}

impl Addresses for EngineBackupRestoreStatusProxyResponse {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        each_key(&mut self.status, f, |_, _| {});
    }
}

impl Addresses for EngineSnapshotBackupProxyResponse {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        f("replica", &mut self.replica);
    }
}

impl Addresses for EngineSnapshotBackupStatusProxyResponse {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        f("replica_address", &mut self.replica_address);
    }
}

impl Addresses for EngineReplicaListProxyResponse {
    fn each(&mut self, f: &mut dyn FnMut(&'static str, &mut String)) {
        for r in self
            .replica_list
            .iter_mut()
            .flat_map(|l| l.replicas.iter_mut())
        {
            if let Some(a) = r.address.as_mut() {
                f("replica address", &mut a.address);
            }
        }
    }
}

/// `imrpc.ProxyEngineService` with management-only addressing in front of [`EngineProxy`].
#[derive(Clone)]
pub struct MappedEngineProxy {
    inner: EngineProxy,
    map: Arc<AddressMap>,
}

impl MappedEngineProxy {
    pub fn server(
        inner: EngineProxy,
        map: Arc<AddressMap>,
    ) -> ProxyEngineServiceServer<MappedEngineProxy> {
        ProxyEngineServiceServer::new(MappedEngineProxy { inner, map })
    }

    /// Maps the request's addresses to storage ones, runs `call`, and, when anything was
    /// mapped, maps the reply (or the error text) back to management addresses.
    async fn run<Req, Resp, Fut>(
        &self,
        request: Request<Req>,
        call: impl FnOnce(Request<Req>) -> Fut,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Addresses,
        Resp: Addresses,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let (meta, extensions, mut message) = request.into_parts();
        let mut named = Vec::new();
        message.each(&mut |field, text| {
            if let Some((_, _, ip)) = ip_span(text) {
                named.push((field, ip));
            }
        });
        let forward = self.map.forward_table(named).await?;
        if forward.is_empty() {
            return call(Request::from_parts(meta, extensions, message)).await;
        }
        message.each(&mut |_, text| rewrite_one(text, &forward));
        let result = call(Request::from_parts(meta, extensions, message)).await;
        let mut back: HashMap<IpAddr, IpAddr> = forward.iter().map(|(m, s)| (*s, *m)).collect();
        let mut response = match result {
            Ok(r) => r,
            Err(status) => {
                return Err(Status::new(
                    status.code(),
                    rewrite_text(status.message(), &back),
                ))
            }
        };
        let mut shown = Vec::new();
        response.get_mut().each(&mut |_, text| {
            if let Some((_, _, ip)) = ip_span(text) {
                shown.push(ip);
            }
        });
        for ip in shown {
            if back.contains_key(&ip) {
                continue;
            }
            if let Some(m) = self.map.to_management(ip).await {
                back.insert(ip, m.ip());
            }
        }
        response
            .get_mut()
            .each(&mut |_, text| rewrite_one(text, &back));
        Ok(response)
    }
}

macro_rules! mapped {
    ($($method:ident($req:ty) -> $resp:ty;)* ; $($plain:ident($preq:ty) -> $presp:ty;)*) => {
        #[tonic::async_trait]
        impl ProxyEngineService for MappedEngineProxy {
            $(async fn $method(&self, request: Request<$req>) -> Result<Response<$resp>, Status> {
                self.run(request, |r| self.inner.$method(r)).await
            })*

            $(async fn $plain(&self, request: Request<$preq>) -> Result<Response<$presp>, Status> {
                self.inner.$plain(request).await
            })*

            type SPDKBackingImageWatchStream =
                <EngineProxy as ProxyEngineService>::SPDKBackingImageWatchStream;

            async fn spdk_backing_image_watch(
                &self,
                request: Request<()>,
            ) -> Result<Response<Self::SPDKBackingImageWatchStream>, Status> {
                self.inner.spdk_backing_image_watch(request).await
            }
        }
    };
}

mapped! {
    server_version_get(ProxyEngineRequest) -> EngineVersionProxyResponse;
    volume_get(ProxyEngineRequest) -> EngineVolumeGetProxyResponse;
    volume_expand(EngineVolumeExpandRequest) -> ();
    volume_frontend_start(EngineVolumeFrontendStartRequest) -> ();
    volume_frontend_shutdown(ProxyEngineRequest) -> ();
    volume_snapshot(EngineVolumeSnapshotRequest) -> EngineVolumeSnapshotProxyResponse;
    snapshot_list(ProxyEngineRequest) -> EngineSnapshotListProxyResponse;
    snapshot_revert(EngineSnapshotRevertRequest) -> ();
    snapshot_purge(EngineSnapshotPurgeRequest) -> ();
    snapshot_purge_status(ProxyEngineRequest) -> EngineSnapshotPurgeStatusProxyResponse;
    snapshot_clone(EngineSnapshotCloneRequest) -> ();
    snapshot_clone_status(ProxyEngineRequest) -> EngineSnapshotCloneStatusProxyResponse;
    snapshot_remove(EngineSnapshotRemoveRequest) -> ();
    snapshot_backup(EngineSnapshotBackupRequest) -> EngineSnapshotBackupProxyResponse;
    snapshot_backup_status(EngineSnapshotBackupStatusRequest) -> EngineSnapshotBackupStatusProxyResponse;
    backup_restore(EngineBackupRestoreRequest) -> EngineBackupRestoreProxyResponse;
    backup_restore_status(ProxyEngineRequest) -> EngineBackupRestoreStatusProxyResponse;
    replica_add(EngineReplicaAddRequest) -> ();
    replica_list(ProxyEngineRequest) -> EngineReplicaListProxyResponse;
    replica_rebuilding_status(ProxyEngineRequest) -> EngineReplicaRebuildStatusProxyResponse;
    replica_verify_rebuild(EngineReplicaVerifyRebuildRequest) -> ();
    replica_remove(EngineReplicaRemoveRequest) -> ();
    volume_unmap_mark_snap_chain_removed_set(EngineVolumeUnmapMarkSnapChainRemovedSetRequest) -> ();
    volume_snapshot_max_count_set(EngineVolumeSnapshotMaxCountSetRequest) -> ();
    volume_snapshot_max_size_set(EngineVolumeSnapshotMaxSizeSetRequest) -> ();
    snapshot_hash(EngineSnapshotHashRequest) -> ();
    snapshot_hash_status(EngineSnapshotHashStatusRequest) -> EngineSnapshotHashStatusProxyResponse;
    backup_restore_finish(EngineBackupRestoreFinishRequest) -> ();
    replica_rebuilding_qos_set(EngineReplicaRebuildingQosSetRequest) -> ();
    replica_mode_update(EngineReplicaModeUpdateRequest) -> ();
    replica_rebuild_concurrent_sync_limit_set(EngineReplicaRebuildConcurrentSyncLimitSetRequest) -> ();
    replica_rebuild_concurrent_sync_limit_get(ProxyEngineRequest) -> EngineReplicaRebuildConcurrentSyncLimitGetResponse;
    metrics_get(ProxyEngineRequest) -> EngineMetricsGetProxyResponse;
    ;
    // These name no engine or replica: nothing to map.
    ping(()) -> ();
    cleanup_backup_mount_points(()) -> ();
    remount_read_only_volume(RemountVolumeRequest) -> ();
    spdk_backing_image_create(SpdkBackingImageCreateRequest) -> SpdkBackingImageResponse;
    spdk_backing_image_delete(SpdkBackingImageDeleteRequest) -> ();
    spdk_backing_image_get(SpdkBackingImageGetRequest) -> SpdkBackingImageResponse;
    spdk_backing_image_list(()) -> SpdkBackingImageListResponse;
    backup_volume_list(EngineBackupVolumeListRequest) -> EngineBackupVolumeListProxyResponse;
    backup_volume_get(EngineBackupVolumeGetRequest) -> EngineBackupVolumeGetProxyResponse;
    backup_get(EngineBackupGetRequest) -> EngineBackupGetProxyResponse;
    backup_config_meta_get(EngineBackupConfigMetaGetRequest) -> EngineBackupConfigMetaGetProxyResponse;
    backup_remove(EngineBackupRemoveRequest) -> ();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_keep_their_form() {
        let table: HashMap<IpAddr, IpAddr> =
            [("10.42.0.12".parse().unwrap(), "10.30.0.12".parse().unwrap())].into();
        for (before, after) in [
            ("10.42.0.12:10000", "10.30.0.12:10000"),
            ("tcp://10.42.0.12:10000", "tcp://10.30.0.12:10000"),
            ("http://10.42.0.12:9501/v1", "http://10.30.0.12:9501/v1"),
            ("10.42.0.1:10000", "10.42.0.1:10000"),
            ("replica-a:10000", "replica-a:10000"),
            ("tcp://10.42.0.12", "tcp://10.42.0.12"),
            ("10.42.0.12:x", "10.42.0.12:x"),
        ] {
            let mut text = before.to_string();
            rewrite_one(&mut text, &table);
            assert_eq!(text, after);
        }
        let v6: HashMap<IpAddr, IpAddr> =
            [("fd00::1".parse().unwrap(), "fd30::1".parse().unwrap())].into();
        let mut text = "tcp://[fd00::1]:10000".to_string();
        rewrite_one(&mut text, &v6);
        assert_eq!(text, "tcp://[fd30::1]:10000");
    }

    #[test]
    fn error_text_maps_whole_addresses_only() {
        let back: HashMap<IpAddr, IpAddr> =
            [("10.30.0.1".parse().unwrap(), "10.42.0.1".parse().unwrap())].into();
        assert_eq!(
            rewrite_text(
                "failed to get volume 10.30.0.1:10000 (not 10.30.0.12 or 110.30.0.1)",
                &back
            ),
            "failed to get volume 10.42.0.1:10000 (not 10.30.0.12 or 110.30.0.1)"
        );
    }
}
