//! `imrpc.ProxyEngineService` for the v1 data engine, as Longhorn v1.12.1's instance-manager
//! serves it (and v1.3.3's, a subset): each call is translated to the engine's
//! `ControllerService` and the replicas' `ReplicaService` / `SyncAgentService` in the order of
//! longhorn-engine's task library (`spec/longhorn-current.md` §3), over the engine cluster's
//! pooled connections bound to the storage address, every call carrying the identity metadata
//! `volume-name` / `instance-name`.
//!
//! One module per area: [`volume`], [`snapshot`], [`backup`] (with [`restore`]), [`replica`];
//! [`dispatch`] decides, from a request's bytes, which calls lhnet answers and which go byte for
//! byte to the instance-manager's own proxy (`data_engine` v2, SPDK, the IM's own mounts).

pub mod address;
mod backup;
mod backup_target;
mod channel;
pub mod dispatch;
mod envs;
pub mod raw;
mod replica;
mod restore;
mod snapshot;
pub mod version;
mod volume;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use lhnet_proto::imrpc::proxy_engine_service_server::ProxyEngineService;
use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::controller_service_client::ControllerServiceClient;
use lhnet_proto::ptypes::replica_service_client::ReplicaServiceClient;
use lhnet_proto::ptypes::sync_agent_service_client::SyncAgentServiceClient;
use lhnet_proto::ptypes::ReplicaMode;
use tonic::{Code, Request, Response, Status};

pub use address::{parse_address, EngineAddr, ReplicaAddr};
pub use backup_target::BackupTargets;
use channel::EngineChannel;
pub use channel::Identity;
pub use envs::{credential_map, target_credentials, CREDENTIAL_KEYS};

use crate::cluster::{Cluster, EndpointService};

type Empty = ();

/// Deadline of every engine and replica call (longhorn-engine's `GRPCServiceCommonTimeout`).
const ENGINE_CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// Deadline of file sync and clone when the request gives none (`GRPCServiceLongTimeout`).
const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The Longhorn engine proxy, answering inside lhnet.
#[derive(Clone)]
pub struct EngineProxy {
    engines: Arc<Cluster>,
    backups: Arc<BackupTargets>,
    /// `backup_egress`: the proxy URL (`http://127.0.0.1:PORT`) replicas' backup and restore
    /// credentials get, so their transfers leave on the storage network.
    egress: Option<String>,
}

/// The engine a request names, and who it is.
#[derive(Debug, Clone)]
pub(crate) struct Engine {
    pub addr: EngineAddr,
    pub id: Identity,
}

/// A replica as the engine lists it: its address as written (`tcp://IP:PORT`, the key of
/// every status map), parsed when it parses, and its mode.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    pub text: String,
    pub addr: Option<ReplicaAddr>,
    pub mode: ReplicaMode,
}

/// longhorn-engine's `TaskError`: per-replica failures of a task, `addr: message` joined by
/// `; ` in its text (code UNKNOWN, as grpc-go reports a plain Go error).
#[derive(Debug, Default)]
pub(crate) struct TaskError(Vec<(String, String)>);

// === impl EngineProxy ===

impl EngineProxy {
    pub fn new(
        engines: Arc<Cluster>,
        backups: Arc<BackupTargets>,
        egress: Option<String>,
    ) -> EngineProxy {
        EngineProxy {
            engines,
            backups,
            egress,
        }
    }

    /// A replica's backup or restore credential with the backup egress as its proxy: for
    /// targets spoken to over HTTP (s3, azblob), when the route sets `backup_egress` and the
    /// caller set no proxy of its own.
    fn through_egress(
        &self,
        target: &str,
        mut credential: HashMap<String, String>,
    ) -> HashMap<String, String> {
        let Some(proxy) = &self.egress else {
            return credential;
        };
        let http = target.starts_with("s3://") || target.starts_with("azblob://");
        let set = |k: &str| credential.get(k).is_some_and(|v| !v.is_empty());
        if http && !set("HTTPS_PROXY") && !set("HTTP_PROXY") {
            credential.insert("HTTPS_PROXY".into(), proxy.clone());
            credential.insert("HTTP_PROXY".into(), proxy.clone());
        }
        credential
    }

    /// Refuses an address outside the cluster's allowed destinations, before any dial.
    fn allow(&self, field: &str, addr: SocketAddr) -> Result<(), Status> {
        if self.engines.allows(addr) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{field} {addr} is outside allowed_destinations/allowed_ports of cluster {}; not dialled",
            self.engines.name()
        )))
    }

    /// The engine of a request: its address, checked, and the identity to send it.
    /// `data_engine` must be v1 here: other values were passed through or refused by
    /// [`dispatch`] before the request was decoded, and are refused again in the same words.
    fn engine(&self, request: Option<&ProxyEngineRequest>) -> Result<Engine, Status> {
        let absent = ProxyEngineRequest::default();
        let request = request.unwrap_or(&absent);
        dispatch::require_v1(request.data_engine)?;
        self.engine_at("address", &request.address, request)
    }

    /// As [`Self::engine`] for an address in another field (a clone's source engine).
    fn engine_at(
        &self,
        field: &str,
        address: &str,
        names: &ProxyEngineRequest,
    ) -> Result<Engine, Status> {
        let addr = EngineAddr::parse(field, address)?;
        self.allow(field, addr.0)?;
        let id = Identity::new(
            ("volume_name", &names.volume_name),
            ("engine_name", &names.engine_name),
        )?;
        Ok(Engine { addr, id })
    }

    fn channel(&self, destination: SocketAddr, identity: Identity) -> EngineChannel {
        EngineChannel {
            endpoint: EndpointService::new(self.engines.clone(), destination),
            identity,
        }
    }

    fn controller(&self, engine: &Engine) -> ControllerServiceClient<EngineChannel> {
        ControllerServiceClient::new(self.channel(engine.addr.0, engine.id.clone()))
            .max_decoding_message_size(usize::MAX)
    }

    /// The ReplicaService of a replica, for the volume of `id` (and its instance, if named).
    fn replica(
        &self,
        addr: ReplicaAddr,
        id: &Identity,
    ) -> Result<ReplicaServiceClient<EngineChannel>, Status> {
        self.allow("replica address", addr.0)?;
        Ok(ReplicaServiceClient::new(self.channel(addr.0, id.clone()))
            .max_decoding_message_size(usize::MAX))
    }

    /// The SyncAgentService of a replica (its port + 2).
    fn agent(
        &self,
        addr: ReplicaAddr,
        id: &Identity,
    ) -> Result<SyncAgentServiceClient<EngineChannel>, Status> {
        let agent = addr.sync_agent()?;
        self.allow("replica sync agent", agent)?;
        Ok(SyncAgentServiceClient::new(self.channel(agent, id.clone()))
            .max_decoding_message_size(usize::MAX))
    }

    /// The engine's replicas, as it lists them.
    async fn replicas(&self, engine: &Engine) -> Result<Vec<Listed>, Status> {
        let list = call(
            &format!("list replicas for volume {}", engine.addr),
            self.controller(engine).replica_list(timed(())),
        )
        .await?;
        Ok(list
            .replicas
            .into_iter()
            .map(|r| {
                let text = r.address.map(|a| a.address).unwrap_or_default();
                let addr = ReplicaAddr::parse("replica address", &text).ok();
                // Longhorn reads any other value as ERR.
                let mode = ReplicaMode::try_from(r.mode).unwrap_or(ReplicaMode::Err);
                Listed { text, addr, mode }
            })
            .collect())
    }
}

// === impl Listed ===

impl Listed {
    /// The parsed address, or the error Longhorn's replica client gives for one it cannot use.
    fn parsed(&self) -> Result<ReplicaAddr, Status> {
        self.addr.ok_or_else(|| {
            Status::unknown(format!(
                "invalid replica address {}, must have a port in it",
                self.text
            ))
        })
    }
}

// === impl TaskError ===

impl TaskError {
    fn push(&mut self, address: &str, message: impl Into<String>) {
        self.0.push((address.to_string(), message.into()));
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn message(&self) -> String {
        if self.0.is_empty() {
            return "Unknown".into();
        }
        self.0
            .iter()
            .map(|(a, m)| format!("{a}: {m}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Ok when no replica failed, else the task's error.
    fn into_result(self) -> Result<(), Status> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(Status::unknown(self.message()))
        }
    }

    /// `{"ReplicaErrors":[{"Address":…,"Message":…}]}`, Go's encoding of the struct (no tags),
    /// which BackupRestore puts in `taskError`.
    fn to_json(&self) -> Vec<u8> {
        let errors: Vec<serde_json::Value> = self
            .0
            .iter()
            .map(|(a, m)| serde_json::json!({ "Address": a, "Message": m }))
            .collect();
        serde_json::to_vec(&serde_json::json!({ "ReplicaErrors": errors })).unwrap_or_default()
    }
}

/// A downstream request with the engine-call deadline (sent as grpc-timeout, and enforced).
fn timed<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.set_timeout(ENGINE_CALL_TIMEOUT);
    r
}

/// The deadline of a long call (file sync, clone): `grpc_timeout_seconds` when the request
/// gives one, else 24 h.
fn long_timeout(grpc_timeout_seconds: i64) -> Duration {
    u64::try_from(grpc_timeout_seconds)
        .ok()
        .filter(|s| *s > 0)
        .map_or(LONG_CALL_TIMEOUT, Duration::from_secs)
}

/// grpc-go's name of a code, as it writes it in `rpc error: code = <Name> desc = …`.
pub fn go_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// `rpc error: code = <Name> desc = <message>`: a downstream status as grpc-go prints it.
fn go_text(status: &Status) -> String {
    format!(
        "rpc error: code = {} desc = {}",
        go_code_name(status.code()),
        status.message()
    )
}

/// A downstream failure as Longhorn's engine client wraps it: the code kept,
/// `failed to <op>: rpc error: code = <Name> desc = <cause>`.
fn wrap(op: &str, status: &Status) -> Status {
    Status::new(
        status.code(),
        format!("failed to {op}: {}", go_text(status)),
    )
}

// These are plain functions building one future from combinators, not `async fn`s calling
// each other: every `async fn` layer keeps its own copy of the downstream future, and the
// engine-call futures are a kilobyte or more (each layer cost VolumeGet about 1.2 KB of memmove
// per call, docs/benchmarks.md).

/// Awaits a downstream call under the engine-call deadline.
fn call<'a, T: 'a, F>(op: &'a str, fut: F) -> impl Future<Output = Result<T, Status>> + 'a
where
    F: Future<Output = Result<Response<T>, Status>> + 'a,
{
    call_within(op, ENGINE_CALL_TIMEOUT, fut)
}

/// Awaits a downstream call under `limit`; a call that outlives it ends DEADLINE_EXCEEDED with
/// grpc-go's text, which managers match (`DeadlineExceeded`).
fn call_within<'a, T: 'a, F>(
    op: &'a str,
    limit: Duration,
    fut: F,
) -> impl Future<Output = Result<T, Status>> + 'a
where
    F: Future<Output = Result<Response<T>, Status>> + 'a,
{
    answer(limit, fut).map(move |r| r.map_err(|s| wrap(op, &s)))
}

/// The downstream answer as it came, under `limit`: for callers that put the status in their
/// own words (status maps, task errors).
fn answer<T, F>(limit: Duration, fut: F) -> impl Future<Output = Result<T, Status>>
where
    F: Future<Output = Result<Response<T>, Status>>,
{
    tokio::time::timeout(limit, fut).map(move |r| match r {
        Ok(r) => r.map(Response::into_inner),
        Err(_) => Err(deadline_passed(limit)),
    })
}

/// A downstream call that did not answer within `limit`, in grpc-go's words.
fn deadline_passed(limit: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "context deadline exceeded (no answer within {} s)",
        limit.as_secs()
    ))
}

/// A long call (file sync, clone): `request` carries the deadline as grpc-timeout too.
fn call_long<'a, T: 'a, R, F>(
    op: &'a str,
    limit: Duration,
    request: R,
    send: impl FnOnce(Request<R>) -> F,
) -> impl Future<Output = Result<T, Status>> + 'a
where
    F: Future<Output = Result<Response<T>, Status>> + 'a,
{
    let mut request = Request::new(request);
    request.set_timeout(limit);
    call_within(op, limit, send(request))
}

fn logged(op: &'static str, engine: &Engine, mutating: bool) {
    if mutating {
        tracing::info!(op, volume = %engine.addr, network = "storage", "engine proxy call");
    } else {
        tracing::debug!(op, volume = %engine.addr, network = "storage", "engine proxy call");
    }
}

/// Longhorn's disk file names to snapshot names: `volume-snap-X.img` → `X`, the head → `volume-head`.
pub fn snapshot_name(disk: &str) -> String {
    if let Some(name) = disk
        .strip_prefix("volume-snap-")
        .and_then(|d| d.strip_suffix(".img"))
    {
        name.to_string()
    } else if disk.starts_with("volume-head-") && disk.ends_with(".img") {
        "volume-head".to_string()
    } else {
        disk.to_string()
    }
}

/// What lhnet answers for a call it never serves itself when no passthrough cluster is set
/// (the route normally forwards it before it gets here).
fn not_served(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is served by the instance-manager's own proxy, not by lhnet; set passthrough_cluster on the longhorn_engine_proxy route to forward it"
    ))
}

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<(), Status>> + Send>>;

/// The trait's methods, each handled by a function of its area module.
macro_rules! serve {
    ($($method:ident($req:ty) -> $resp:ty => $handler:path;)*) => {
        #[tonic::async_trait]
        impl ProxyEngineService for EngineProxy {
            $(async fn $method(&self, request: Request<$req>) -> Result<Response<$resp>, Status> {
                $handler(self, request.into_inner()).await.map(Response::new)
            })*

            type SPDKBackingImageWatchStream = WatchStream;

            async fn spdk_backing_image_watch(
                &self,
                _request: Request<()>,
            ) -> Result<Response<WatchStream>, Status> {
                Err(not_served("SPDKBackingImageWatch"))
            }
        }
    };
}

serve! {
    server_version_get(ProxyEngineRequest) -> EngineVersionProxyResponse => volume::server_version_get;
    volume_get(ProxyEngineRequest) -> EngineVolumeGetProxyResponse => volume::get;
    volume_expand(EngineVolumeExpandRequest) -> Empty => volume::expand;
    volume_frontend_start(EngineVolumeFrontendStartRequest) -> Empty => volume::frontend_start;
    volume_frontend_shutdown(ProxyEngineRequest) -> Empty => volume::frontend_shutdown;
    volume_unmap_mark_snap_chain_removed_set(EngineVolumeUnmapMarkSnapChainRemovedSetRequest) -> Empty => volume::unmap_mark_set;
    volume_snapshot_max_count_set(EngineVolumeSnapshotMaxCountSetRequest) -> Empty => volume::snapshot_max_count_set;
    volume_snapshot_max_size_set(EngineVolumeSnapshotMaxSizeSetRequest) -> Empty => volume::snapshot_max_size_set;
    metrics_get(ProxyEngineRequest) -> EngineMetricsGetProxyResponse => volume::metrics_get;
    remount_read_only_volume(RemountVolumeRequest) -> Empty => volume::remount_read_only;

    volume_snapshot(EngineVolumeSnapshotRequest) -> EngineVolumeSnapshotProxyResponse => snapshot::create;
    snapshot_list(ProxyEngineRequest) -> EngineSnapshotListProxyResponse => snapshot::list;
    snapshot_revert(EngineSnapshotRevertRequest) -> Empty => snapshot::revert;
    snapshot_purge(EngineSnapshotPurgeRequest) -> Empty => snapshot::purge;
    snapshot_purge_status(ProxyEngineRequest) -> EngineSnapshotPurgeStatusProxyResponse => snapshot::purge_status;
    snapshot_clone(EngineSnapshotCloneRequest) -> Empty => snapshot::clone;
    snapshot_clone_status(ProxyEngineRequest) -> EngineSnapshotCloneStatusProxyResponse => snapshot::clone_status;
    snapshot_remove(EngineSnapshotRemoveRequest) -> Empty => snapshot::remove;
    snapshot_hash(EngineSnapshotHashRequest) -> Empty => snapshot::hash;
    snapshot_hash_status(EngineSnapshotHashStatusRequest) -> EngineSnapshotHashStatusProxyResponse => snapshot::hash_status;

    snapshot_backup(EngineSnapshotBackupRequest) -> EngineSnapshotBackupProxyResponse => backup::create;
    snapshot_backup_status(EngineSnapshotBackupStatusRequest) -> EngineSnapshotBackupStatusProxyResponse => backup::status;
    backup_restore(EngineBackupRestoreRequest) -> EngineBackupRestoreProxyResponse => restore::restore;
    backup_restore_status(ProxyEngineRequest) -> EngineBackupRestoreStatusProxyResponse => restore::status;
    backup_restore_finish(EngineBackupRestoreFinishRequest) -> Empty => backup::restore_finish;
    cleanup_backup_mount_points(Empty) -> Empty => backup::cleanup_mount_points;

    replica_add(EngineReplicaAddRequest) -> Empty => replica::add;
    replica_list(ProxyEngineRequest) -> EngineReplicaListProxyResponse => replica::list;
    replica_rebuilding_status(ProxyEngineRequest) -> EngineReplicaRebuildStatusProxyResponse => replica::rebuilding_status;
    replica_rebuilding_qos_set(EngineReplicaRebuildingQosSetRequest) -> Empty => replica::rebuilding_qos_set;
    replica_verify_rebuild(EngineReplicaVerifyRebuildRequest) -> Empty => replica::verify_rebuild;
    replica_remove(EngineReplicaRemoveRequest) -> Empty => replica::remove;
    replica_mode_update(EngineReplicaModeUpdateRequest) -> Empty => replica::mode_update;
    replica_rebuild_concurrent_sync_limit_set(EngineReplicaRebuildConcurrentSyncLimitSetRequest) -> Empty => replica::sync_limit_set;
    replica_rebuild_concurrent_sync_limit_get(ProxyEngineRequest) -> EngineReplicaRebuildConcurrentSyncLimitGetResponse => replica::sync_limit_get;

    spdk_backing_image_create(SpdkBackingImageCreateRequest) -> SpdkBackingImageResponse => backup::spdk_backing_image_create;
    spdk_backing_image_delete(SpdkBackingImageDeleteRequest) -> Empty => backup::spdk_backing_image_delete;
    spdk_backing_image_get(SpdkBackingImageGetRequest) -> SpdkBackingImageResponse => backup::spdk_backing_image_get;
    spdk_backing_image_list(Empty) -> SpdkBackingImageListResponse => backup::spdk_backing_image_list;

    ping(Empty) -> Empty => backup::ping;
    backup_volume_list(EngineBackupVolumeListRequest) -> EngineBackupVolumeListProxyResponse => backup::target_volume_list;
    backup_volume_get(EngineBackupVolumeGetRequest) -> EngineBackupVolumeGetProxyResponse => backup::target_volume_get;
    backup_get(EngineBackupGetRequest) -> EngineBackupGetProxyResponse => backup::target_backup_get;
    backup_config_meta_get(EngineBackupConfigMetaGetRequest) -> EngineBackupConfigMetaGetProxyResponse => backup::target_config_meta_get;
    backup_remove(EngineBackupRemoveRequest) -> Empty => backup::target_remove;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names_become_snapshot_names() {
        assert_eq!(snapshot_name("volume-snap-s1.img"), "s1");
        assert_eq!(snapshot_name("volume-head-003.img"), "volume-head");
        assert_eq!(snapshot_name("backing.qcow2"), "backing.qcow2");
    }

    #[test]
    fn downstream_errors_read_as_grpc_go_prints_them() {
        let s = wrap(
            "get volume 10.30.0.5:10000",
            &Status::unavailable("connection refused"),
        );
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.message(),
            "failed to get volume 10.30.0.5:10000: rpc error: code = Unavailable desc = connection refused"
        );
        assert_eq!(go_code_name(Code::Cancelled), "Canceled");
        let mut t = TaskError::default();
        assert_eq!(t.message(), "Unknown");
        t.push("tcp://1.2.3.4:10000", "boom");
        t.push("tcp://1.2.3.5:10000", "bang");
        assert_eq!(
            t.message(),
            "tcp://1.2.3.4:10000: boom; tcp://1.2.3.5:10000: bang"
        );
        let json: serde_json::Value = serde_json::from_slice(&t.to_json()).unwrap();
        assert_eq!(json["ReplicaErrors"][1]["Message"], "bang");
    }
}
