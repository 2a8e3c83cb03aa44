//! The original design's backup-target RPCs (IM v1_20220602 wire): BackupVolumeList,
//! BackupVolumeGet, BackupGet, BackupConfigMetaGet, BackupRemove. Served from the backupstore
//! itself, never through an engine, with the semantics of `spec/longhorn-backupstore-bim.md`
//! §1.3/§2. Errors are the backupstore's text with code UNKNOWN, as grpc-go reported the Go
//! library's errors; "not found" texts contain `cannot find`, which managers match.
//!
//! `envs` become the credential map of the one call (unknown keys refused) and never touch the
//! process environment. Filesystem work runs on the blocking pool, at most
//! [`MAX_CONCURRENT`] at once, each under [`REQUEST_TIMEOUT`], so a slow target never blocks
//! other RPCs.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use lhnet_proto::imrpc::*;
use tokio::sync::Semaphore;
use tonic::Status;

use super::credential_map;
use crate::backupstore::{self, BackupInfo, Target, VolumeInfo};

/// Backup-target calls running at once; more wait for a slot (within their timeout).
pub const MAX_CONCURRENT: usize = 8;
/// The longest one call may take (the `longhorn backup` CLI's list/inspect limit).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn slots() -> &'static Semaphore {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| Semaphore::new(MAX_CONCURRENT))
}

/// Runs backupstore work off the async threads, bounded and timed.
async fn blocking<T: Send + 'static>(
    what: String,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Status> {
    let run = async {
        let _slot = slots()
            .acquire()
            .await
            .map_err(|_| Status::internal("backup-target slots closed"))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| Status::internal(format!("{what}: {e}")))?
            .map_err(Status::unknown)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "{what}: the backup target did not answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            )))
        })
}

/// Checks `envs` and opens the target named by `url` (its query is ignored).
fn open(envs: &[String], url: &str) -> Result<Target, Status> {
    let credentials = credential_map(envs)?;
    if url.is_empty() {
        return Err(Status::invalid_argument(
            "missing required dest_url parameter",
        ));
    }
    if url.starts_with("s3://") {
        // The credentials would be used here, per call; the S3 driver is not built yet.
        let _ = credentials;
        return Err(Status::unimplemented(format!(
            "backup target {}: s3:// is not supported by this lhnet yet (vfs:// and mounted nfs:// are)",
            url.split('?').next().unwrap_or(url)
        )));
    }
    Target::parse(url).map_err(Status::unknown)
}

fn volume_info(v: VolumeInfo) -> EngineBackupVolumeInfo {
    EngineBackupVolumeInfo {
        name: v.name,
        size: v.size,
        labels: v.labels.into_iter().collect(),
        created: v.created,
        last_backup_name: v.last_backup_name,
        last_backup_at: v.last_backup_at,
        data_stored: v.data_stored,
        messages: v.messages.into_iter().collect(),
        backups: v
            .backups
            .into_iter()
            .map(|b| (b, EngineBackupInfo::default()))
            .collect(),
        backing_image_name: v.backing_image_name,
        backing_image_checksum: v.backing_image_checksum,
    }
}

fn backup_info(b: BackupInfo) -> EngineBackupInfo {
    EngineBackupInfo {
        name: b.name,
        url: b.url,
        snapshot_name: b.snapshot_name,
        snapshot_created: b.snapshot_created,
        created: b.created,
        size: b.size,
        labels: b.labels.into_iter().collect(),
        is_incremental: b.is_incremental,
        volume_name: b.volume_name,
        volume_size: b.volume_size,
        volume_created: b.volume_created,
        volume_backing_image_name: b.volume_backing_image_name,
        messages: HashMap::new(),
    }
}

pub async fn volume_list(
    r: EngineBackupVolumeListRequest,
) -> Result<EngineBackupVolumeListProxyResponse, Status> {
    let target = open(&r.envs, &r.dest_url)?;
    tracing::debug!(dest_url = %target.url, "backup volume list");
    let volume = (!r.volume_name.is_empty()).then_some(r.volume_name);
    let only = r.volume_only;
    let volumes = blocking(format!("list {}", target.url), move || {
        target.list(volume.as_deref(), only)
    })
    .await?;
    Ok(EngineBackupVolumeListProxyResponse {
        volumes: volumes
            .into_iter()
            .map(|(name, v)| (name, volume_info(v)))
            .collect(),
    })
}

pub async fn volume_get(
    r: EngineBackupVolumeGetRequest,
) -> Result<EngineBackupVolumeGetProxyResponse, Status> {
    let target = open(&r.envs, &r.dest_url)?;
    let (_, _, volume) = backupstore::decode_backup_url(&r.dest_url).map_err(Status::unknown)?;
    let volume = blocking(format!("inspect volume {volume}"), move || {
        target.inspect_volume(&volume)
    })
    .await?;
    Ok(EngineBackupVolumeGetProxyResponse {
        volume: Some(volume_info(volume)),
    })
}

pub async fn backup_get(r: EngineBackupGetRequest) -> Result<EngineBackupGetProxyResponse, Status> {
    let target = open(&r.envs, &r.dest_url)?;
    let (_, backup, volume) =
        backupstore::decode_backup_url(&r.dest_url).map_err(Status::unknown)?;
    if backup.is_empty() {
        return Err(Status::unknown(format!(
            "backup URL {} names no backup (?backup=NAME&volume=VOL)",
            r.dest_url
        )));
    }
    let backup = blocking(format!("inspect backup {backup}"), move || {
        target.inspect_backup(&volume, &backup)
    })
    .await?;
    Ok(EngineBackupGetProxyResponse {
        backup: Some(backup_info(backup)),
    })
}

pub async fn config_meta_get(
    r: EngineBackupConfigMetaGetRequest,
) -> Result<EngineBackupConfigMetaGetProxyResponse, Status> {
    let target = open(&r.envs, &r.dest_url)?;
    let (_, backup, volume) =
        backupstore::decode_backup_url(&r.dest_url).map_err(Status::unknown)?;
    let mtime = blocking(format!("config metadata of {volume}"), move || {
        target.config_mtime(&volume, (!backup.is_empty()).then_some(backup.as_str()))
    })
    .await?;
    Ok(EngineBackupConfigMetaGetProxyResponse {
        modification_time: Some(prost_types::Timestamp::from(mtime)),
    })
}

pub async fn remove(r: EngineBackupRemoveRequest) -> Result<(), Status> {
    let target = open(&r.envs, &r.dest_url)?;
    if r.volume_name.is_empty() {
        let (_, backup, volume) =
            backupstore::decode_backup_url(&r.dest_url).map_err(Status::unknown)?;
        if backup.is_empty() {
            return Err(Status::unknown(format!(
                "backup URL {} names no backup; to remove a backup volume, set volume_name",
                r.dest_url
            )));
        }
        tracing::info!(volume = %volume, backup = %backup, "removing backup");
        blocking(format!("remove backup {backup}"), move || {
            target.remove_backup(&volume, &backup)
        })
        .await
    } else {
        let volume = r.volume_name;
        tracing::info!(volume = %volume, "removing backup volume");
        blocking(format!("remove backup volume {volume}"), move || {
            target.remove_volume(&volume)
        })
        .await
    }
}
