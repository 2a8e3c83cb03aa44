//! The original design's backup-target RPCs (IM v1_20220602 wire): BackupVolumeList,
//! BackupVolumeGet, BackupGet, BackupConfigMetaGet, BackupRemove. Served from the backupstore
//! itself, never through an engine, with the semantics of `spec/longhorn-backupstore-bim.md`
//! §1.3/§2. Errors are the backupstore's text with code UNKNOWN, as grpc-go reported the Go
//! library's errors; "not found" texts contain `cannot find`, which managers match.
//!
//! `envs` become the credential map of the one call (unknown keys refused) and never touch the
//! process environment. Driver work runs on the blocking pool, at most
//! `backup_target.max_concurrent` at once per target (the slot is held until the work really
//! ends, also after a timeout), each call under `backup_target.timeout`, so a slow target never
//! blocks other RPCs or other targets.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use lhnet_proto::imrpc::*;
use tokio::sync::Semaphore;
use tonic::Status;

use super::target_credentials;
use crate::config::BackupTargetConfig;
use lhnet_backupstore::{
    self as backupstore, BackupInfo, NfsOptions, Target, TargetOptions, VolumeInfo,
};

/// Targets whose slots are kept; beyond this, idle ones are forgotten.
const KEPT_TARGETS: usize = 64;

/// The backup-target side of the engine proxy: settings and per-target slots.
#[derive(Debug)]
pub struct BackupTargets {
    config: ArcSwap<BackupTargetConfig>,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl BackupTargets {
    pub fn new(config: &BackupTargetConfig) -> Arc<BackupTargets> {
        Arc::new(BackupTargets {
            config: ArcSwap::from_pointee(config.clone()),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a reloaded config. Slots are kept (so calls still running on a hung target keep
    /// counting) unless `max_concurrent` changed.
    pub fn reconfigure(&self, config: &BackupTargetConfig) {
        let old = self.config.load_full();
        if *old != *config {
            self.config.store(Arc::new(config.clone()));
            if old.max_concurrent != config.max_concurrent {
                self.slots.lock().clear();
            }
        }
    }

    /// Where targets (and the backup-egress listeners) may dial, as the config says now.
    pub fn endpoints(&self) -> Arc<backupstore::EndpointPolicy> {
        self.config.load().endpoints.clone()
    }

    fn slots_of(&self, target: &str, size: usize) -> Arc<Semaphore> {
        let mut map = self.slots.lock();
        if map.len() >= KEPT_TARGETS {
            map.retain(|_, s| s.available_permits() < size);
        }
        map.entry(target.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(size)))
            .clone()
    }

    /// Checks `envs`, opens the target named by `url` (its query is ignored) and runs `work`
    /// on it off the async threads, bounded and timed.
    async fn run<T: Send + 'static>(
        &self,
        envs: &[String],
        url: &str,
        what: String,
        work: impl FnOnce(Target) -> Result<T, String> + Send + 'static,
    ) -> Result<T, Status> {
        let credentials = target_credentials(envs)?;
        if url.is_empty() {
            return Err(Status::invalid_argument(
                "missing required dest_url parameter",
            ));
        }
        self.run_with(credentials, url, what, work)
            .await
            .map_err(|e| match e {
                // A destination the policy refuses: said as such, naming the key to change.
                Failed::Work(text) if text.contains(backupstore::REFUSED) => {
                    Status::permission_denied(text)
                }
                Failed::Work(text) => Status::unknown(text),
                Failed::Other(status) => status,
            })
    }

    /// As [`Self::run`], with the credential map already made.
    async fn run_with<T: Send + 'static>(
        &self,
        credentials: HashMap<String, String>,
        url: &str,
        what: String,
        work: impl FnOnce(Target) -> Result<T, String> + Send + 'static,
    ) -> Result<T, Failed> {
        let config = self.config.load_full();
        let target_url = url.split('?').next().unwrap_or(url).to_string();
        // Opened with its query: cifs:// reads its cifsOptions there (the others ignore it).
        let opened = url.to_string();
        let slots = self.slots_of(&slot_key(&target_url), config.max_concurrent);
        let options = TargetOptions {
            credentials,
            nfs: NfsOptions {
                mount_root: config.nfs_mount_root.clone(),
                mount: config.nfs_mount,
            },
            endpoints: config.endpoints.clone(),
        };
        let run = async move {
            let slot = slots
                .acquire_owned()
                .await
                .map_err(|_| Failed::Other(Status::internal("backup-target slots closed")))?;
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                // Opening may mount NFS or build an S3 client: also off the async threads.
                work(Target::open(&opened, &options)?)
            })
            .await
            .map_err(|e| Failed::Other(Status::internal(format!("{what}: {e}"))))?
            .map_err(Failed::Work)
        };
        tokio::time::timeout(config.timeout, run)
            .await
            .unwrap_or_else(|_| {
                Err(Failed::Other(Status::deadline_exceeded(format!(
                    "{}: the backup target did not answer within {} s (backup_target.timeout; work already started on the target, such as a removal, runs on to its end)",
                    url.split('?').next().unwrap_or(url),
                    config.timeout.as_secs_f64()
                ))))
            })
    }

    /// longhorn-engine's `InspectBackup` of a backup URL (`<target>?backup=B&volume=V`), run by
    /// lhnet itself before a restore, with the restore's credential map. The error is the text
    /// Longhorn's restore task puts after "failed to get the current restoring backup info".
    pub async fn inspect_backup(
        &self,
        url: &str,
        credentials: HashMap<String, String>,
    ) -> Result<BackupInfo, String> {
        let backup_url = url.to_string();
        self.run_with(
            credentials,
            url,
            format!("inspect backup {url}"),
            move |target| {
                let (_, backup, volume) = backupstore::decode_backup_url(&backup_url)?;
                if volume.is_empty() {
                    return Err(format!("invalid volume name parsed, got {volume}"));
                }
                if backup.is_empty() {
                    return Err(format!("invalid backup name parsed, got {backup}"));
                }
                target.inspect_backup(&volume, &backup)
            },
        )
        .await
        .map_err(|e| match e {
            Failed::Work(text) => text,
            Failed::Other(status) => status.message().to_string(),
        })
    }
}

/// Why backup-target work did not give a result: the work's own error (the backupstore's
/// text), or lhnet's (slots, timeout).
enum Failed {
    Work(String),
    Other(Status),
}

/// One target however its URL is spelled: `vfs:///x`, `vfs:///x/` and `vfs:////x` share slots.
fn slot_key(target: &str) -> String {
    let (scheme, rest) = target.split_once("://").unwrap_or(("", target));
    let mut path = String::with_capacity(rest.len());
    for c in rest.chars() {
        if !(c == '/' && path.ends_with('/')) {
            path.push(c);
        }
    }
    format!("{scheme}://{}", path.trim_end_matches('/'))
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

impl BackupTargets {
    pub async fn volume_list(
        &self,
        r: EngineBackupVolumeListRequest,
    ) -> Result<EngineBackupVolumeListProxyResponse, Status> {
        tracing::debug!(dest_url = %r.dest_url, "backup volume list");
        let volume = (!r.volume_name.is_empty()).then_some(r.volume_name);
        let only = r.volume_only;
        let what = format!("list {}", r.dest_url);
        let volumes = self
            .run(&r.envs, &r.dest_url, what, move |target| {
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
        &self,
        r: EngineBackupVolumeGetRequest,
    ) -> Result<EngineBackupVolumeGetProxyResponse, Status> {
        let url = r.dest_url.clone();
        let what = format!("inspect volume {url}");
        let volume = self
            .run(&r.envs, &r.dest_url, what, move |target| {
                let (_, _, volume) = backupstore::decode_backup_url(&url)?;
                target.inspect_volume(&volume)
            })
            .await?;
        Ok(EngineBackupVolumeGetProxyResponse {
            volume: Some(volume_info(volume)),
        })
    }

    pub async fn backup_get(
        &self,
        r: EngineBackupGetRequest,
    ) -> Result<EngineBackupGetProxyResponse, Status> {
        let url = r.dest_url.clone();
        let what = format!("inspect backup {url}");
        let backup = self
            .run(&r.envs, &r.dest_url, what, move |target| {
                let (_, backup, volume) = backupstore::decode_backup_url(&url)?;
                if backup.is_empty() {
                    return Err(format!(
                        "backup URL {url} names no backup (?backup=NAME&volume=VOL)"
                    ));
                }
                target.inspect_backup(&volume, &backup)
            })
            .await?;
        Ok(EngineBackupGetProxyResponse {
            backup: Some(backup_info(backup)),
        })
    }

    pub async fn config_meta_get(
        &self,
        r: EngineBackupConfigMetaGetRequest,
    ) -> Result<EngineBackupConfigMetaGetProxyResponse, Status> {
        let url = r.dest_url.clone();
        let what = format!("config metadata of {url}");
        let mtime = self
            .run(&r.envs, &r.dest_url, what, move |target| {
                let (_, backup, volume) = backupstore::decode_backup_url(&url)?;
                target.config_mtime(&volume, (!backup.is_empty()).then_some(backup.as_str()))
            })
            .await?;
        Ok(EngineBackupConfigMetaGetProxyResponse {
            modification_time: Some(prost_types::Timestamp::from(mtime)),
        })
    }

    pub async fn remove(&self, r: EngineBackupRemoveRequest) -> Result<(), Status> {
        let url = r.dest_url.clone();
        let what = format!("remove {url}");
        let volume_name = r.volume_name;
        self.run(&r.envs, &r.dest_url, what, move |target| {
            if !volume_name.is_empty() {
                tracing::info!(volume = %volume_name, target = %target.url, "removing backup volume");
                return target.remove_volume(&volume_name);
            }
            let (_, backup, volume) = backupstore::decode_backup_url(&url)?;
            if backup.is_empty() {
                return Err(format!(
                    "backup URL {url} names no backup; to remove a backup volume, set volume_name"
                ));
            }
            tracing::info!(%volume, %backup, target = %target.url, "removing backup");
            target.remove_backup(&volume, &backup)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_target_share_slots() {
        assert_eq!(slot_key("vfs:///x"), slot_key("vfs:///x/"));
        assert_eq!(slot_key("vfs:///x"), slot_key("vfs:////x"));
        assert_ne!(slot_key("vfs:///x"), slot_key("vfs:///y"));
        assert_eq!(slot_key("s3://b@r/p/"), "s3://b@r/p");
    }
}
