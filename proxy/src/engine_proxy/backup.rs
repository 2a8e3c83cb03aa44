//! Backup calls: SnapshotBackup and its status through a replica's sync agent, as
//! longhorn-engine's `CreateBackup` / `FetchBackupStatus`; the original design's backup-target
//! calls, served from the backupstore; and the calls only the instance-manager serves.

use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::{self, ReplicaMode};
use tonic::Status;

use super::{
    answer, call, credential_map, go_text, logged, not_served, timed, Empty, EngineProxy,
    ReplicaAddr, ENGINE_CALL_TIMEOUT,
};

/// Starts a backup of a snapshot on the engine's first RW replica; the backup itself runs
/// there. Every failure is INTERNAL "failed to create backup: …", as Longhorn's proxy answers.
pub(super) async fn create(
    p: &EngineProxy,
    r: EngineSnapshotBackupRequest,
) -> Result<EngineSnapshotBackupProxyResponse, Status> {
    let credential = credential_map(&r.envs, &r.backup_target)?;
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("SnapshotBackup", &engine, true);
    let failed = |e: String| Status::internal(format!("failed to create backup: {e}"));
    if r.snapshot_name == "volume-head" {
        return Err(failed("cannot backup the head disk in the chain".into()));
    }
    let volume = call(
        &format!("get volume {}", engine.addr),
        p.controller(&engine).volume_get(timed(())),
    )
    .await
    .map_err(|e| failed(e.message().into()))?;
    let replicas = p.replicas(&engine).await.map_err(|e| {
        failed(format!(
            "failed to list replicas for backup: {}",
            e.message()
        ))
    })?;
    let replica = replicas
        .iter()
        .find(|x| x.mode == ReplicaMode::Rw)
        .ok_or_else(|| failed("cannot find an available replica for backup".into()))?;
    let addr = replica.parsed().map_err(|e| failed(e.message().into()))?;
    let id = engine.id.volume_only();
    let info = super::snapshot::replica_info(p, addr, &id)
        .await
        .map_err(|e| failed(e.message().into()))?;
    let disk = format!("volume-snap-{}.img", r.snapshot_name);
    if !info.disks.contains_key(&disk) {
        return Err(failed(format!(
            "snapshot disk {disk} not found on replica {}",
            replica.text
        )));
    }
    // Go ranges over the map: the order is not fixed; sorted here so runs repeat.
    let mut labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let request = ptypes::BackupCreateRequest {
        snapshot_file_name: r.snapshot_name.clone(),
        backup_target: r.backup_target.clone(),
        volume_name: volume.name.clone(),
        labels,
        credential: p.through_egress(&r.backup_target, credential),
        backing_image_name: r.backing_image_name,
        backing_image_checksum: r.backing_image_checksum,
        backup_name: r.backup_name,
        compression_method: r.compression_method,
        concurrent_limit: r.concurrent_limit,
        storage_class_name: r.storage_class_name,
        parameters: r.parameters,
    };
    let reply = call(
        &format!(
            "create backup to {} for volume {}",
            r.backup_target, volume.name
        ),
        p.agent(addr, &id)
            .map_err(|e| failed(e.message().into()))?
            .backup_create(timed(request)),
    )
    .await
    .map_err(|e| failed(e.message().into()))?;
    Ok(EngineSnapshotBackupProxyResponse {
        backup_id: reply.backup,
        replica: replica.text.clone(),
        is_incremental: reply.is_incremental,
    })
}

/// The status of a backup on the replica that took it (the first RW replica when the request
/// names none). A replica that does not know the backup, or does not answer, is not an RPC
/// error: the reply says so in `error`, as Longhorn's does.
pub(super) async fn status(
    p: &EngineProxy,
    r: EngineSnapshotBackupStatusRequest,
) -> Result<EngineSnapshotBackupStatusProxyResponse, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("SnapshotBackupStatus", &engine, false);
    let replicas = p.replicas(&engine).await?;
    let address = if r.replica_address.is_empty() {
        replicas
            .iter()
            .find(|x| x.mode == ReplicaMode::Rw && x.addr.is_some())
            .map(|x| x.text.clone())
            .ok_or_else(|| {
                Status::unknown(format!(
                    "failed to find a replica with backup {}",
                    r.backup_name
                ))
            })?
    } else {
        r.replica_address.clone()
    };
    if replicas
        .iter()
        .any(|x| x.text == address && x.mode != ReplicaMode::Rw)
    {
        return Err(Status::unknown(format!(
            "failed to get backup {} status on unknown replica {address}",
            r.backup_name
        )));
    }
    let addr = ReplicaAddr::parse("replica_address", &address).map_err(|e| {
        Status::unknown(format!(
            "failed to create Replica client with {address}: {}",
            e.message()
        ))
    })?;
    let id = engine.id.for_instance("replica_name", &r.replica_name)?;
    let mut agent = p.agent(addr, &id)?;
    let asked = answer(
        ENGINE_CALL_TIMEOUT,
        agent.backup_status(timed(ptypes::BackupStatusRequest {
            backup: r.backup_name.clone(),
        })),
    )
    .await;
    let status = match asked {
        Ok(s) => s,
        Err(e) => ptypes::BackupStatusResponse {
            error: format!(
                "Failed to get backup status on {address} for {}: {}",
                r.backup_name,
                go_text(&e)
            ),
            ..Default::default()
        },
    };
    Ok(EngineSnapshotBackupStatusProxyResponse {
        backup_url: status.backup_url,
        error: status.error,
        progress: status.progress,
        snapshot_name: status.snapshot_name,
        state: status.state,
        replica_address: address,
    })
}

/// Deprecated, and unimplemented by Longhorn's proxy since 1.8; the route passes it to the
/// instance-manager, which answers as its release does.
pub(super) async fn restore_finish(
    _p: &EngineProxy,
    _r: EngineBackupRestoreFinishRequest,
) -> Result<Empty, Status> {
    Err(not_served("BackupRestoreFinish"))
}

/// Unmounts the instance-manager's own backupstore mounts: only it can.
pub(super) async fn cleanup_mount_points(_p: &EngineProxy, _r: Empty) -> Result<Empty, Status> {
    Err(not_served("CleanupBackupMountPoints"))
}

pub(super) async fn spdk_backing_image_create(
    _p: &EngineProxy,
    _r: SpdkBackingImageCreateRequest,
) -> Result<SpdkBackingImageResponse, Status> {
    Err(not_served("SPDKBackingImageCreate"))
}

pub(super) async fn spdk_backing_image_delete(
    _p: &EngineProxy,
    _r: SpdkBackingImageDeleteRequest,
) -> Result<Empty, Status> {
    Err(not_served("SPDKBackingImageDelete"))
}

pub(super) async fn spdk_backing_image_get(
    _p: &EngineProxy,
    _r: SpdkBackingImageGetRequest,
) -> Result<SpdkBackingImageResponse, Status> {
    Err(not_served("SPDKBackingImageGet"))
}

pub(super) async fn spdk_backing_image_list(
    _p: &EngineProxy,
    _r: Empty,
) -> Result<SpdkBackingImageListResponse, Status> {
    Err(not_served("SPDKBackingImageList"))
}

/// The original design's liveness call, answered by lhnet itself.
pub(super) async fn ping(_p: &EngineProxy, _r: Empty) -> Result<Empty, Status> {
    Ok(())
}

pub(super) async fn target_volume_list(
    p: &EngineProxy,
    r: EngineBackupVolumeListRequest,
) -> Result<EngineBackupVolumeListProxyResponse, Status> {
    p.backups.volume_list(r).await
}

pub(super) async fn target_volume_get(
    p: &EngineProxy,
    r: EngineBackupVolumeGetRequest,
) -> Result<EngineBackupVolumeGetProxyResponse, Status> {
    p.backups.volume_get(r).await
}

pub(super) async fn target_backup_get(
    p: &EngineProxy,
    r: EngineBackupGetRequest,
) -> Result<EngineBackupGetProxyResponse, Status> {
    p.backups.backup_get(r).await
}

pub(super) async fn target_config_meta_get(
    p: &EngineProxy,
    r: EngineBackupConfigMetaGetRequest,
) -> Result<EngineBackupConfigMetaGetProxyResponse, Status> {
    p.backups.config_meta_get(r).await
}

pub(super) async fn target_remove(
    p: &EngineProxy,
    r: EngineBackupRemoveRequest,
) -> Result<Empty, Status> {
    p.backups.remove(r).await
}
