//! `imrpc.ProxyEngineService`, wire-compatible with Longhorn v1.3.3: each call is translated to
//! the engine's `ControllerService` and the replicas' `ReplicaService` / `SyncAgentService`, in
//! the order of `spec/longhorn-v1.3-wire.md` §3, over the engine cluster's pooled connections
//! bound to the storage address.

mod address;
mod backup_target;
mod channel;
mod envs;
pub mod version;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lhnet_proto::imrpc::proxy_engine_service_server::ProxyEngineService;
use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::controller_service_client::ControllerServiceClient;
use lhnet_proto::ptypes::replica_service_client::ReplicaServiceClient;
use lhnet_proto::ptypes::sync_agent_service_client::SyncAgentServiceClient;
use lhnet_proto::ptypes::{self, ControllerReplica, ReplicaMode};
use tonic::{Request, Response, Status};

pub use address::{parse_address, EngineAddr, ReplicaAddr};
pub use backup_target::BackupTargets;
use channel::EngineChannel;
pub use envs::{credential_map, target_credentials, CREDENTIAL_KEYS};

use crate::cluster::Cluster;

type Empty = ();

/// Deadline of every engine and replica call (longhorn-engine's `GRPCServiceCommonTimeout`).
const ENGINE_CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// Deadline of file sync and clone (`GRPCServiceLongTimeout`).
const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The Longhorn engine proxy, answering inside lhnet.
#[derive(Clone)]
pub struct EngineProxy {
    engines: Arc<Cluster>,
    backups: Arc<BackupTargets>,
}

impl EngineProxy {
    pub fn new(engines: Arc<Cluster>, backups: Arc<BackupTargets>) -> EngineProxy {
        EngineProxy { engines, backups }
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

    fn engine(&self, request: Option<&ProxyEngineRequest>) -> Result<EngineAddr, Status> {
        let text = request.map(|r| r.address.as_str()).unwrap_or_default();
        let addr = EngineAddr::parse("address", text)?;
        self.allow("address", addr.0)?;
        Ok(addr)
    }

    fn channel(&self, destination: SocketAddr) -> EngineChannel {
        EngineChannel {
            cluster: self.engines.clone(),
            destination,
        }
    }

    fn controller(&self, addr: EngineAddr) -> ControllerServiceClient<EngineChannel> {
        ControllerServiceClient::new(self.channel(addr.0))
    }

    fn replica(&self, addr: ReplicaAddr) -> Result<ReplicaServiceClient<EngineChannel>, Status> {
        self.allow("replica address", addr.0)?;
        Ok(ReplicaServiceClient::new(self.channel(addr.0)))
    }

    fn sync_agent(
        &self,
        addr: ReplicaAddr,
    ) -> Result<SyncAgentServiceClient<EngineChannel>, Status> {
        let agent = addr.sync_agent()?;
        self.allow("replica sync agent", agent)?;
        Ok(SyncAgentServiceClient::new(self.channel(agent)))
    }

    /// The sync agent of a replica the engine reported; `text` is its address as reported.
    fn agent_of(
        &self,
        text: &str,
        addr: Option<ReplicaAddr>,
    ) -> Result<SyncAgentServiceClient<EngineChannel>, Status> {
        let addr = addr.ok_or_else(|| {
            Status::internal(format!(
                "the engine reported a replica address that is not IP:PORT: {text:?}"
            ))
        })?;
        self.sync_agent(addr)
    }

    /// The engine's replicas, each with its parsed address and mode.
    async fn replicas(
        &self,
        engine: EngineAddr,
    ) -> Result<Vec<(String, Option<ReplicaAddr>, ReplicaMode)>, Status> {
        let list = call(
            &format!("list replicas for volume {engine}"),
            self.controller(engine).replica_list(timed(())),
        )
        .await?;
        Ok(list
            .replicas
            .into_iter()
            .map(|r| {
                let text = r.address.map(|a| a.address).unwrap_or_default();
                let parsed = ReplicaAddr::parse("replica address", &text).ok();
                let mode = ReplicaMode::try_from(r.mode).unwrap_or(ReplicaMode::Err);
                (text, parsed, mode)
            })
            .collect())
    }
}

/// A downstream request with the engine-call deadline (sent as grpc-timeout, and enforced).
fn timed<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.set_timeout(ENGINE_CALL_TIMEOUT);
    r
}

/// Awaits a downstream call under the deadline; errors keep their code, with the Go proxy's
/// text shape: `failed to <op>: <cause>`.
async fn call<T, F>(op: &str, fut: F) -> Result<T, Status>
where
    F: Future<Output = Result<Response<T>, Status>>,
{
    match tokio::time::timeout(ENGINE_CALL_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(Status::new(
            s.code(),
            format!("failed to {op}: {}", s.message()),
        )),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "failed to {op}: no answer within {} s",
            ENGINE_CALL_TIMEOUT.as_secs()
        ))),
    }
}

fn logged(op: &'static str, engine: EngineAddr, mutating: bool) {
    if mutating {
        tracing::info!(op, volume = %engine, network = "storage", "engine proxy call");
    } else {
        tracing::debug!(op, volume = %engine, network = "storage", "engine proxy call");
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

#[tonic::async_trait]
impl ProxyEngineService for EngineProxy {
    async fn server_version_get(
        &self,
        request: Request<ProxyEngineRequest>,
    ) -> Result<Response<EngineVersionProxyResponse>, Status> {
        let engine = self.engine(Some(request.get_ref()))?;
        logged("ServerVersionGet", engine, false);
        let reply = call(
            &format!("get version of {engine}"),
            self.controller(engine).version_detail_get(timed(())),
        )
        .await?;
        Ok(Response::new(EngineVersionProxyResponse {
            version: reply.version,
        }))
    }

    async fn volume_get(
        &self,
        request: Request<ProxyEngineRequest>,
    ) -> Result<Response<EngineVolumeGetProxyResponse>, Status> {
        let engine = self.engine(Some(request.get_ref()))?;
        logged("VolumeGet", engine, false);
        let volume = call(
            &format!("get volume {engine}"),
            self.controller(engine).volume_get(timed(())),
        )
        .await?;
        Ok(Response::new(EngineVolumeGetProxyResponse {
            volume: Some(volume),
        }))
    }

    async fn volume_expand(
        &self,
        request: Request<EngineVolumeExpandRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        logged("VolumeExpand", engine, true);
        let size = r.expand.map(|e| e.size).unwrap_or_default();
        call(
            &format!("expand volume {engine}"),
            self.controller(engine)
                .volume_expand(timed(ptypes::VolumeExpandRequest { size })),
        )
        .await?;
        Ok(Response::new(()))
    }

    async fn volume_frontend_start(
        &self,
        request: Request<EngineVolumeFrontendStartRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        let frontend = r.frontend_start.map(|f| f.frontend).unwrap_or_default();
        if frontend.is_empty() {
            return Err(Status::invalid_argument(
                "missing required frontend_start.frontend parameter",
            ));
        }
        logged("VolumeFrontendStart", engine, true);
        call(
            &format!("start frontend {frontend} of volume {engine}"),
            self.controller(engine)
                .volume_frontend_start(timed(ptypes::VolumeFrontendStartRequest { frontend })),
        )
        .await?;
        Ok(Response::new(()))
    }

    async fn volume_frontend_shutdown(
        &self,
        request: Request<ProxyEngineRequest>,
    ) -> Result<Response<Empty>, Status> {
        let engine = self.engine(Some(request.get_ref()))?;
        logged("VolumeFrontendShutdown", engine, true);
        call(
            &format!("shut down the frontend of volume {engine}"),
            self.controller(engine).volume_frontend_shutdown(timed(())),
        )
        .await?;
        Ok(Response::new(()))
    }

    async fn volume_snapshot(
        &self,
        request: Request<EngineVolumeSnapshotRequest>,
    ) -> Result<Response<EngineVolumeSnapshotProxyResponse>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        logged("VolumeSnapshot", engine, true);
        let snapshot = r.snapshot_volume.unwrap_or_default();
        let reply = call(
            &format!("snapshot volume {engine}"),
            self.controller(engine).volume_snapshot(timed(snapshot)),
        )
        .await?;
        Ok(Response::new(EngineVolumeSnapshotProxyResponse {
            snapshot: Some(reply),
        }))
    }

    async fn snapshot_list(
        &self,
        request: Request<ProxyEngineRequest>,
    ) -> Result<Response<EngineSnapshotListProxyResponse>, Status> {
        let engine = self.engine(Some(request.get_ref()))?;
        logged("SnapshotList", engine, false);
        let mut best: Option<ptypes::Replica> = None;
        for (text, addr, mode) in self.replicas(engine).await? {
            if mode != ReplicaMode::Rw {
                continue;
            }
            let addr = addr.ok_or_else(|| {
                Status::internal(format!(
                    "engine {engine} reported a bad replica address {text:?}"
                ))
            })?;
            let replica = call(
                &format!("get replica {addr}"),
                self.replica(addr)?.replica_get(timed(())),
            )
            .await?;
            let Some(replica) = replica.replica else {
                continue;
            };
            if best
                .as_ref()
                .is_none_or(|b| replica.disks.len() > b.disks.len())
            {
                best = Some(replica);
            }
        }
        let mut disks = HashMap::new();
        if let Some(replica) = best {
            for (file, d) in replica.disks {
                if file == replica.backing_file {
                    continue;
                }
                let name = snapshot_name(&file);
                disks.insert(
                    name.clone(),
                    EngineSnapshotDiskInfo {
                        name,
                        parent: if d.parent.is_empty() {
                            String::new()
                        } else {
                            snapshot_name(&d.parent)
                        },
                        children: d
                            .children
                            .into_iter()
                            .map(|(c, v)| (snapshot_name(&c), v))
                            .collect(),
                        removed: d.removed,
                        user_created: d.user_created,
                        created: d.created,
                        size: d.size,
                        labels: d.labels,
                    },
                );
            }
        }
        Ok(Response::new(EngineSnapshotListProxyResponse { disks }))
    }

    async fn snapshot_revert(
        &self,
        request: Request<EngineSnapshotRevertRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        if r.name.is_empty() {
            return Err(Status::invalid_argument("missing required name parameter"));
        }
        logged("SnapshotRevert", engine, true);
        call(
            &format!("revert volume {engine} to snapshot {}", r.name),
            self.controller(engine)
                .volume_revert(timed(ptypes::VolumeRevertRequest {
                    name: r.name.clone(),
                })),
        )
        .await?;
        Ok(Response::new(()))
    }

    async fn snapshot_purge(
        &self,
        request: Request<EngineSnapshotPurgeRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        logged("SnapshotPurge", engine, true);
        let mut agents = Vec::new();
        for (text, addr, mode) in self.replicas(engine).await? {
            if mode == ReplicaMode::Err {
                continue;
            }
            let addr = addr.ok_or_else(|| {
                Status::internal(format!(
                    "engine {engine} reported a bad replica address {text:?}"
                ))
            })?;
            let replica = call(
                &format!("get replica {addr}"),
                self.replica(addr)?.replica_get(timed(())),
            )
            .await?;
            if replica.replica.is_some_and(|r| r.rebuilding) {
                return Err(Status::failed_precondition(format!(
                    "failed to purge snapshots of volume {engine}: replica {addr} is rebuilding"
                )));
            }
            let mut agent = self.sync_agent(addr)?;
            let status = call(
                &format!("get snapshot purge status of {addr}"),
                agent.snapshot_purge_status(timed(())),
            )
            .await?;
            if status.is_purging {
                if r.skip_if_in_progress {
                    tracing::info!(volume = %engine, replica = %addr, "snapshot purge already in progress; skipped as asked");
                    return Ok(Response::new(()));
                }
                return Err(Status::failed_precondition(format!(
                    "failed to purge snapshots of volume {engine}: replica {addr} is already purging"
                )));
            }
            agents.push((addr, agent));
        }
        // The purge runs asynchronously on each replica; start them all at once.
        let started = futures_util::future::join_all(agents.into_iter().map(
            |(addr, mut agent)| async move {
                (
                    addr,
                    call(
                        &format!("start snapshot purge on {addr}"),
                        agent.snapshot_purge(timed(())),
                    )
                    .await,
                )
            },
        ))
        .await;
        for (addr, result) in started {
            match result {
                Err(e) if r.skip_if_in_progress && e.message().contains("already in progress") => {
                    tracing::info!(volume = %engine, replica = %addr, "snapshot purge already in progress; skipped as asked");
                }
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
        Ok(Response::new(()))
    }

    async fn snapshot_purge_status(
        &self,
        request: Request<ProxyEngineRequest>,
    ) -> Result<Response<EngineSnapshotPurgeStatusProxyResponse>, Status> {
        let engine = self.engine(Some(request.get_ref()))?;
        logged("SnapshotPurgeStatus", engine, false);
        let mut status = HashMap::new();
        for (text, addr, mode) in self.replicas(engine).await? {
            if mode == ReplicaMode::Err {
                continue;
            }
            let result = match self.agent_of(&text, addr) {
                Ok(mut agent) => {
                    call(
                        &format!("get snapshot purge status of {text}"),
                        agent.snapshot_purge_status(timed(())),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            status.insert(
                text,
                result.unwrap_or_else(|e| ptypes::SnapshotPurgeStatusResponse {
                    error: e.message().to_string(),
                    ..Default::default()
                }),
            );
        }
        Ok(Response::new(EngineSnapshotPurgeStatusProxyResponse {
            status,
        }))
    }

    async fn snapshot_clone(
        &self,
        request: Request<EngineSnapshotCloneRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        let from = EngineAddr::parse("from_controller", &r.from_controller)?;
        self.allow("from_controller", from.0)?;
        if r.snapshot_name.is_empty() {
            return Err(Status::invalid_argument(
                "missing required snapshot_name parameter",
            ));
        }
        logged("SnapshotClone", engine, true);
        let source = self
            .replicas(from)
            .await?
            .into_iter()
            .find(|(_, _, mode)| *mode == ReplicaMode::Rw)
            .and_then(|(_, a, _)| a)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "failed to clone snapshot {}: source volume {from} has no RW replica",
                    r.snapshot_name
                ))
            })?;
        self.allow("source replica", source.sync_agent()?)?;
        let mut targets = Vec::new();
        for (text, addr, mode) in self.replicas(engine).await? {
            let addr = addr.ok_or_else(|| {
                Status::internal(format!(
                    "engine {engine} reported a bad replica address {text:?}"
                ))
            })?;
            if mode != ReplicaMode::Rw {
                return Err(Status::failed_precondition(format!(
                    "failed to clone snapshot {} into volume {engine}: replica {text} is {mode:?}, not RW",
                    r.snapshot_name
                )));
            }
            targets.push(addr);
        }
        let clones = targets.into_iter().map(|target| {
            let request = ptypes::SnapshotCloneRequest {
                from_address: source.url(),
                to_host: target.0.ip().to_string(),
                snapshot_file_name: r.snapshot_name.clone(),
                export_backing_image_if_exist: r.export_backing_image_if_exist,
            };
            async move {
                let mut agent = self.sync_agent(target)?;
                let mut req = Request::new(request);
                req.set_timeout(LONG_CALL_TIMEOUT);
                match tokio::time::timeout(LONG_CALL_TIMEOUT, agent.snapshot_clone(req)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(Status::new(
                        e.code(),
                        format!(
                            "failed to clone snapshot into replica {target}: {}",
                            e.message()
                        ),
                    )),
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "failed to clone snapshot into replica {target}: over 24 h"
                    ))),
                }
            }
        });
        for result in futures_util::future::join_all(clones).await {
            result?;
        }
        Ok(Response::new(()))
    }

    async fn snapshot_clone_status(
        &self,
        request: Request<ProxyEngineRequest>,
    ) -> Result<Response<EngineSnapshotCloneStatusProxyResponse>, Status> {
        let engine = self.engine(Some(request.get_ref()))?;
        logged("SnapshotCloneStatus", engine, false);
        let mut status = HashMap::new();
        for (text, addr, _mode) in self.replicas(engine).await? {
            let result = match self.agent_of(&text, addr) {
                Ok(mut agent) => {
                    call(
                        &format!("get snapshot clone status of {text}"),
                        agent.snapshot_clone_status(timed(())),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            status.insert(
                text,
                result.unwrap_or_else(|e| ptypes::SnapshotCloneStatusResponse {
                    error: e.message().to_string(),
                    ..Default::default()
                }),
            );
        }
        Ok(Response::new(EngineSnapshotCloneStatusProxyResponse {
            status,
        }))
    }

    async fn snapshot_remove(
        &self,
        request: Request<EngineSnapshotRemoveRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        logged("SnapshotRemove", engine, true);
        let mut last_error = None;
        for name in &r.names {
            if let Err(e) = self.remove_one_snapshot(engine, name).await {
                tracing::warn!(volume = %engine, snapshot = %name, error = %e.message(), "snapshot remove failed");
                last_error = Some(e);
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => Ok(Response::new(())),
        }
    }

    async fn snapshot_backup(
        &self,
        request: Request<EngineSnapshotBackupRequest>,
    ) -> Result<Response<EngineSnapshotBackupProxyResponse>, Status> {
        let r = request.into_inner();
        let credential = credential_map(&r.envs)?;
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        if r.snapshot_name.is_empty() || r.snapshot_name == "volume-head" {
            return Err(Status::invalid_argument(format!(
                "cannot back up snapshot {:?}: name a snapshot, not the volume head",
                r.snapshot_name
            )));
        }
        if r.backup_target.is_empty() {
            return Err(Status::invalid_argument(
                "missing required backup_target parameter",
            ));
        }
        logged("SnapshotBackup", engine, true);
        let volume = call(
            &format!("get volume {engine}"),
            self.controller(engine).volume_get(timed(())),
        )
        .await?;
        let replica = self
            .replicas(engine)
            .await?
            .into_iter()
            .find(|(_, _, mode)| *mode == ReplicaMode::Rw)
            .and_then(|(_, a, _)| a)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "failed to back up volume {engine}: no RW replica"
                ))
            })?;
        let info = call(
            &format!("get replica {replica}"),
            self.replica(replica)?.replica_get(timed(())),
        )
        .await?
        .replica
        .unwrap_or_default();
        let disk = format!("volume-snap-{}.img", r.snapshot_name);
        if !info.disks.contains_key(&disk) {
            return Err(Status::not_found(format!(
                "failed to back up volume {engine}: snapshot {} is not on replica {replica}",
                r.snapshot_name
            )));
        }
        let mut labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let create = ptypes::BackupCreateRequest {
            snapshot_file_name: r.snapshot_name.clone(),
            backup_target: r.backup_target.clone(),
            volume_name: volume.name,
            labels,
            credential,
            backing_image_name: r.backing_image_name,
            backing_image_checksum: r.backing_image_checksum,
            backup_name: r.backup_name,
        };
        let reply = call(
            &format!(
                "back up snapshot {} of volume {engine} on replica {replica}",
                r.snapshot_name
            ),
            self.sync_agent(replica)?.backup_create(timed(create)),
        )
        .await?;
        Ok(Response::new(EngineSnapshotBackupProxyResponse {
            backup_id: reply.backup,
            replica: replica.url(),
            is_incremental: reply.is_incremental,
        }))
    }

    async fn snapshot_backup_status(
        &self,
        request: Request<EngineSnapshotBackupStatusRequest>,
    ) -> Result<Response<EngineSnapshotBackupStatusProxyResponse>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        if r.backup_name.is_empty() {
            return Err(Status::invalid_argument(
                "missing required backup_name parameter",
            ));
        }
        logged("SnapshotBackupStatus", engine, false);
        let replicas = self.replicas(engine).await?;
        let ask = |replica: ReplicaAddr| {
            let backup = r.backup_name.clone();
            async move {
                let mut agent = self.sync_agent(replica)?;
                call(
                    &format!("get status of backup {backup} on replica {replica}"),
                    agent.backup_status(timed(ptypes::BackupStatusRequest { backup })),
                )
                .await
            }
        };
        let (replica, status) = if r.replica_address.is_empty() {
            let mut found = None;
            let mut last_error = None;
            for (_, addr, mode) in &replicas {
                let (Some(addr), ReplicaMode::Rw) = (addr, mode) else {
                    continue;
                };
                match ask(*addr).await {
                    Ok(s) => {
                        found = Some((*addr, s));
                        break;
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            found.ok_or_else(|| {
                last_error.unwrap_or_else(|| {
                    Status::failed_precondition(format!(
                        "failed to get {} backup status: volume {engine} has no RW replica",
                        r.backup_name
                    ))
                })
            })?
        } else {
            let wanted = ReplicaAddr::parse("replica_address", &r.replica_address)?;
            let rw = replicas
                .iter()
                .any(|(_, a, m)| *a == Some(wanted) && *m == ReplicaMode::Rw);
            if !rw {
                return Err(Status::failed_precondition(format!(
                    "failed to get {} backup status on unknown replica {}",
                    r.backup_name, r.replica_address
                )));
            }
            (wanted, ask(wanted).await?)
        };
        Ok(Response::new(EngineSnapshotBackupStatusProxyResponse {
            backup_url: status.backup_url,
            error: status.error,
            progress: status.progress,
            snapshot_name: status.snapshot_name,
            state: status.state,
            replica_address: replica.url(),
        }))
    }

    /// Failures after validation travel in `taskError` with status OK, as Longhorn's proxy does.
    async fn backup_restore(
        &self,
        request: Request<EngineBackupRestoreRequest>,
    ) -> Result<Response<EngineBackupRestoreProxyResponse>, Status> {
        let r = request.into_inner();
        let credential = credential_map(&r.envs)?;
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        for (field, value) in [
            ("url", &r.url),
            ("target", &r.target),
            ("volume_name", &r.volume_name),
        ] {
            if value.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "missing required {field} parameter"
                )));
            }
        }
        logged("BackupRestore", engine, true);
        tracing::info!(volume = %engine, backup = %r.url, backup_volume = %r.volume_name, network = "storage", "restoring backup");
        let task_error = match self.restore(engine, &r.url, credential).await {
            Ok(()) => Vec::new(),
            Err(RestoreError::Task(text)) => text.into_bytes(),
            Err(RestoreError::Replicas(errors)) => {
                let replica_errors: Vec<serde_json::Value> = errors
                    .into_iter()
                    .map(|(address, message)| serde_json::json!({ "Address": address, "Message": message }))
                    .collect();
                serde_json::to_vec(&serde_json::json!({ "ReplicaErrors": replica_errors }))
                    .unwrap_or_default()
            }
        };
        Ok(Response::new(EngineBackupRestoreProxyResponse {
            task_error,
        }))
    }

    async fn backup_restore_status(
        &self,
        request: Request<ProxyEngineRequest>,
    ) -> Result<Response<EngineBackupRestoreStatusProxyResponse>, Status> {
        let engine = self.engine(Some(request.get_ref()))?;
        logged("BackupRestoreStatus", engine, false);
        let mut status = HashMap::new();
        for (text, addr, mode) in self.replicas(engine).await? {
            if mode == ReplicaMode::Err {
                continue;
            }
            let result = match self.agent_of(&text, addr) {
                Ok(mut agent) => {
                    call(
                        &format!("get restore status of {text}"),
                        agent.restore_status(timed(())),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let entry = match result {
                Ok(s) => EngineBackupRestoreStatus {
                    is_restoring: s.is_restoring,
                    last_restored: s.last_restored,
                    current_restoring_backup: s.current_restoring_backup,
                    progress: s.progress,
                    error: s.error,
                    filename: s.dest_file_name,
                    state: s.state,
                    backup_url: s.backup_url,
                },
                Err(e) => EngineBackupRestoreStatus {
                    error: e.message().to_string(),
                    ..Default::default()
                },
            };
            status.insert(text, entry);
        }
        Ok(Response::new(EngineBackupRestoreStatusProxyResponse {
            status,
        }))
    }

    async fn replica_add(
        &self,
        request: Request<EngineReplicaAddRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        let replica = ReplicaAddr::parse("replica_address", &r.replica_address)?;
        self.allow("replica_address", replica.0)?;
        replica
            .sync_agent()
            .and_then(|a| self.allow("replica sync agent", a))?;
        logged("ReplicaAdd", engine, true);
        tracing::info!(volume = %engine, replica = %replica, restore = r.restore, network = "storage", "adding replica");
        self.add_replica(engine, replica, r.restore, r.size, r.current_size)
            .await?;
        Ok(Response::new(()))
    }

    async fn replica_list(
        &self,
        request: Request<ProxyEngineRequest>,
    ) -> Result<Response<EngineReplicaListProxyResponse>, Status> {
        let engine = self.engine(Some(request.get_ref()))?;
        logged("ReplicaList", engine, false);
        let list = call(
            &format!("list replicas for volume {engine}"),
            self.controller(engine).replica_list(timed(())),
        )
        .await?;
        let replicas = list
            .replicas
            .into_iter()
            .map(|r| ControllerReplica {
                address: r.address,
                mode: r.mode,
            })
            .collect();
        Ok(Response::new(EngineReplicaListProxyResponse {
            replica_list: Some(ptypes::ReplicaListReply { replicas }),
        }))
    }

    async fn replica_rebuilding_status(
        &self,
        request: Request<ProxyEngineRequest>,
    ) -> Result<Response<EngineReplicaRebuildStatusProxyResponse>, Status> {
        let engine = self.engine(Some(request.get_ref()))?;
        logged("ReplicaRebuildingStatus", engine, false);
        let mut status = HashMap::new();
        for (text, addr, mode) in self.replicas(engine).await? {
            if mode != ReplicaMode::Wo {
                continue;
            }
            let mut agent = match addr.map(|a| self.sync_agent(a)) {
                Some(Ok(agent)) => agent,
                Some(Err(e)) => {
                    status.insert(
                        text,
                        ptypes::ReplicaRebuildStatusResponse {
                            error: e.message().to_string(),
                            ..Default::default()
                        },
                    );
                    continue;
                }
                None => {
                    status.insert(
                        text.clone(),
                        ptypes::ReplicaRebuildStatusResponse {
                            error: format!("bad replica address {text:?}"),
                            ..Default::default()
                        },
                    );
                    continue;
                }
            };
            // A restore (DR) volume's WO replicas restore, they do not rebuild: stop there.
            if let Ok(restore) = call(
                &format!("get restore status of {text}"),
                agent.restore_status(timed(())),
            )
            .await
            {
                if !restore.dest_file_name.is_empty() {
                    break;
                }
            }
            let result = call(
                &format!("get rebuild status of {text}"),
                agent.replica_rebuild_status(timed(())),
            )
            .await;
            status.insert(
                text,
                result.unwrap_or_else(|e| ptypes::ReplicaRebuildStatusResponse {
                    error: e.message().to_string(),
                    ..Default::default()
                }),
            );
        }
        Ok(Response::new(EngineReplicaRebuildStatusProxyResponse {
            status,
        }))
    }

    async fn replica_verify_rebuild(
        &self,
        request: Request<EngineReplicaVerifyRebuildRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        let replica = ReplicaAddr::parse("replica_address", &r.replica_address)?;
        self.allow("replica_address", replica.0)?;
        logged("ReplicaVerifyRebuild", engine, true);
        call(
            &format!("verify rebuild of replica {replica} for volume {engine}"),
            self.controller(engine)
                .replica_verify_rebuild(timed(ptypes::ReplicaAddress {
                    address: replica.url(),
                })),
        )
        .await?;
        Ok(Response::new(()))
    }

    async fn replica_remove(
        &self,
        request: Request<EngineReplicaRemoveRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let engine = self.engine(r.proxy_engine_request.as_ref())?;
        let replica = ReplicaAddr::parse("replica_address", &r.replica_address)?;
        logged("ReplicaRemove", engine, true);
        call(
            &format!("remove replica {replica} from volume {engine}"),
            self.controller(engine)
                .replica_delete(timed(ptypes::ReplicaAddress {
                    address: replica.url(),
                })),
        )
        .await?;
        Ok(Response::new(()))
    }

    async fn ping(&self, _request: Request<()>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }

    async fn backup_volume_list(
        &self,
        request: Request<EngineBackupVolumeListRequest>,
    ) -> Result<Response<EngineBackupVolumeListProxyResponse>, Status> {
        self.backups
            .volume_list(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn backup_volume_get(
        &self,
        request: Request<EngineBackupVolumeGetRequest>,
    ) -> Result<Response<EngineBackupVolumeGetProxyResponse>, Status> {
        self.backups
            .volume_get(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn backup_get(
        &self,
        request: Request<EngineBackupGetRequest>,
    ) -> Result<Response<EngineBackupGetProxyResponse>, Status> {
        self.backups
            .backup_get(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn backup_config_meta_get(
        &self,
        request: Request<EngineBackupConfigMetaGetRequest>,
    ) -> Result<Response<EngineBackupConfigMetaGetProxyResponse>, Status> {
        self.backups
            .config_meta_get(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn backup_remove(
        &self,
        request: Request<EngineBackupRemoveRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.backups
            .remove(request.into_inner())
            .await
            .map(Response::new)
    }
}

/// Why a restore did not start: a plain task error, or per-replica errors (Longhorn's
/// `TaskError{ReplicaErrors}`).
enum RestoreError {
    Task(String),
    Replicas(Vec<(String, String)>),
}

impl From<Status> for RestoreError {
    fn from(s: Status) -> Self {
        RestoreError::Task(s.message().to_string())
    }
}

impl EngineProxy {
    /// BackupRestore's checks, then the restore started on every non-ERR replica in parallel.
    async fn restore(
        &self,
        engine: EngineAddr,
        url: &str,
        credential: HashMap<String, String>,
    ) -> Result<(), RestoreError> {
        let volume = call(
            &format!("get volume {engine}"),
            self.controller(engine).volume_get(timed(())),
        )
        .await?;
        if volume.frontend_state == "up" {
            return Err(RestoreError::Task(format!(
                "cannot restore backup {url} into volume {engine}: its frontend is up"
            )));
        }
        let mut agents = Vec::new();
        for (text, addr, mode) in self.replicas(engine).await? {
            if mode == ReplicaMode::Err {
                continue;
            }
            let addr = addr.ok_or_else(|| {
                RestoreError::Task(format!(
                    "engine {engine} reported a bad replica address {text:?}"
                ))
            })?;
            let info = call(
                &format!("get replica {addr}"),
                self.replica(addr)?.replica_get(timed(())),
            )
            .await?;
            if info.replica.is_some_and(|r| r.rebuilding) {
                return Err(RestoreError::Task(format!(
                    "cannot restore backup {url}: replica {addr} is rebuilding"
                )));
            }
            let mut agent = self.sync_agent(addr)?;
            let purge = call(
                &format!("get snapshot purge status of {addr}"),
                agent.snapshot_purge_status(timed(())),
            )
            .await?;
            if purge.is_purging {
                return Err(RestoreError::Task(format!(
                    "cannot restore backup {url}: replica {addr} is purging snapshots; retry later"
                )));
            }
            agents.push((text, addr, agent));
        }
        let snapshot_disk_name = format!(
            "volume-snap-restore-{}.img",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        );
        let starts = agents.into_iter().map(|(text, addr, mut agent)| {
            let request = ptypes::BackupRestoreRequest {
                backup: url.to_string(),
                snapshot_disk_name: snapshot_disk_name.clone(),
                credential: credential.clone(),
            };
            async move {
                (
                    text,
                    call(
                        &format!("restore backup {url} on replica {addr}"),
                        agent.backup_restore(timed(request)),
                    )
                    .await,
                )
            }
        });
        let errors: Vec<(String, String)> = futures_util::future::join_all(starts)
            .await
            .into_iter()
            .filter_map(|(text, result)| result.err().map(|e| (text, e.message().to_string())))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RestoreError::Replicas(errors))
        }
    }

    /// ReplicaAdd, in the order of longhorn-engine's `sync.Task.AddReplica` (v1.3.3).
    async fn add_replica(
        &self,
        engine: EngineAddr,
        replica: ReplicaAddr,
        restore: bool,
        size: i64,
        current_size: i64,
    ) -> Result<(), Status> {
        let url = replica.url();
        let volume = call(
            &format!("get volume {engine}"),
            self.controller(engine).volume_get(timed(())),
        )
        .await?;
        if volume.replica_count == 0 {
            let start = ptypes::VolumeStartRequest {
                replica_addresses: vec![url.clone()],
                size,
                current_size,
            };
            call(
                &format!("start volume {engine} with replica {url}"),
                self.controller(engine).volume_start(timed(start)),
            )
            .await?;
            return Ok(());
        }
        let mut target = self.replica(replica)?;
        let info = call(&format!("get replica {url}"), target.replica_get(timed(())))
            .await?
            .replica
            .unwrap_or_default();
        let replica_size: i64 = info.size.parse().unwrap_or(0);

        if restore {
            if replica_size != volume.size {
                return Err(Status::failed_precondition(format!(
                    "failed to add restore replica {url}: its size {replica_size} differs from the volume's {}",
                    volume.size
                )));
            }
            let create = ptypes::ControllerReplicaCreateRequest {
                address: url.clone(),
                snapshot_required: false,
                mode: ReplicaMode::Wo as i32,
            };
            let result = call(
                &format!("create replica {url} for volume {engine}"),
                self.controller(engine)
                    .controller_replica_create(timed(create)),
            )
            .await;
            // longhorn-engine closes the restore replica afterwards, whatever happened.
            let _ = target.replica_close(timed(())).await;
            result?;
            return Ok(());
        }

        if replica_size < volume.size {
            if info.state == "closed" {
                call(
                    &format!("open replica {url}"),
                    target.replica_open(timed(())),
                )
                .await?;
            }
            call(
                &format!("expand replica {url}"),
                target.replica_expand(timed(ptypes::ReplicaExpandRequest { size: volume.size })),
            )
            .await?;
            call(
                &format!("close replica {url}"),
                target.replica_close(timed(())),
            )
            .await?;
        }
        if info.rebuilding {
            // A rebuild that failed earlier left the flag set: reset it before starting over.
            call(
                &format!("open replica {url}"),
                target.replica_open(timed(())),
            )
            .await?;
            call(
                &format!("reset rebuilding flag of replica {url}"),
                target.rebuilding_set(timed(ptypes::RebuildingSetRequest { rebuilding: false })),
            )
            .await?;
            call(
                &format!("close replica {url}"),
                target.replica_close(timed(())),
            )
            .await?;
        }

        let create = ptypes::ControllerReplicaCreateRequest {
            address: url.clone(),
            snapshot_required: true,
            mode: ReplicaMode::Wo as i32,
        };
        call(
            &format!("create replica {url} for volume {engine}"),
            self.controller(engine)
                .controller_replica_create(timed(create)),
        )
        .await?;

        let replicas = self.replicas(engine).await?;
        let source = replicas
            .iter()
            .find(|(_, _, mode)| *mode == ReplicaMode::Rw)
            .and_then(|(_, a, _)| *a)
            .ok_or_else(|| Status::failed_precondition(format!("failed to add replica {url}: volume {engine} has no RW replica to rebuild from")))?;
        self.allow("source replica", source.0)?;
        match replicas.iter().find(|(_, a, _)| *a == Some(replica)) {
            Some((_, _, ReplicaMode::Wo)) => {}
            Some((_, _, mode)) => {
                return Err(Status::failed_precondition(format!(
                    "failed to add replica {url}: it is {mode:?} after creation, not WO"
                )))
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "failed to add replica {url}: the engine does not list it after creation"
                )))
            }
        }

        call(
            &format!("set rebuilding flag of replica {url}"),
            target.rebuilding_set(timed(ptypes::RebuildingSetRequest { rebuilding: true })),
        )
        .await?;
        let prepared = call(
            &format!("prepare rebuild of replica {url}"),
            self.controller(engine)
                .replica_prepare_rebuild(timed(ptypes::ReplicaAddress {
                    address: url.clone(),
                })),
        )
        .await?;
        let sync = ptypes::FilesSyncRequest {
            from_address: source.url(),
            to_host: replica.0.ip().to_string(),
            sync_file_info_list: prepared.sync_file_info_list,
        };
        let mut files_sync = Request::new(sync);
        files_sync.set_timeout(LONG_CALL_TIMEOUT);
        let mut agent = self.sync_agent(replica)?;
        match tokio::time::timeout(LONG_CALL_TIMEOUT, agent.files_sync(files_sync)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Status::new(
                    e.code(),
                    format!(
                        "failed to sync files from {} to {url}: {}",
                        source.url(),
                        e.message()
                    ),
                ))
            }
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "failed to sync files from {} to {url}: over 24 h",
                    source.url()
                )))
            }
        }
        call(
            &format!("reload replica {url}"),
            target.replica_reload(timed(())),
        )
        .await?;
        call(
            &format!("verify rebuild of replica {url}"),
            self.controller(engine)
                .replica_verify_rebuild(timed(ptypes::ReplicaAddress {
                    address: url.clone(),
                })),
        )
        .await?;
        call(
            &format!("clear rebuilding flag of replica {url}"),
            target.rebuilding_set(timed(ptypes::RebuildingSetRequest { rebuilding: false })),
        )
        .await?;
        Ok(())
    }

    /// One name of SnapshotRemove: no replica may be rebuilding; every RW replica marks the disk.
    async fn remove_one_snapshot(&self, engine: EngineAddr, name: &str) -> Result<(), Status> {
        let replicas = self.replicas(engine).await?;
        let mut targets = Vec::new();
        for (text, addr, mode) in &replicas {
            let addr = addr.ok_or_else(|| {
                Status::internal(format!(
                    "engine {engine} reported a bad replica address {text:?}"
                ))
            })?;
            let replica = call(
                &format!("get replica {addr}"),
                self.replica(addr)?.replica_get(timed(())),
            )
            .await?;
            if replica.replica.is_some_and(|r| r.rebuilding) {
                return Err(Status::failed_precondition(format!(
                    "failed to remove snapshot {name}: replica {addr} is rebuilding"
                )));
            }
            if *mode == ReplicaMode::Rw {
                targets.push(addr);
            }
        }
        for addr in targets {
            call(
                &format!("mark snapshot {name} as removed on replica {addr}"),
                self.replica(addr)?
                    .disk_mark_as_removed(timed(ptypes::DiskMarkAsRemovedRequest {
                        name: name.to_string(),
                    })),
            )
            .await?;
        }
        Ok(())
    }
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
}
