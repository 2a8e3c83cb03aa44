//! The sync agent's backup calls, as longhorn-engine v1.12.1's: BackupCreate writes the
//! snapshot to the target in Longhorn's layout with `concurrent_limit` workers (none: the
//! backup never progresses, as in Longhorn), the compression asked for (the volume's first
//! one sticks) and the block size of the parameters; BackupRestore restores a backup into the
//! snapshot disk the engine's restore task names — in full the first time, then incrementally
//! (only the blocks that changed since the last restored backup) — and reports through
//! RestoreStatus.

use std::collections::{BTreeMap, HashMap};

use lhnet_proto::ptypes::*;
use tonic::Status;

use super::backupstore::{self, NewBackup, Target, TargetOptions};
use super::now_rfc3339;
use super::replica::{BackupProgress, RestoreInfo, SimReplica};

/// Backup records kept: the newest complete and error ones.
const KEPT_COMPLETE: usize = 5;
const KEPT_ERROR: usize = 10;

/// Opens a backup target as the sync agent does: the request's credential map for S3, NFS
/// exports at their existing directory under Longhorn's mount root.
fn open_target(url: &str, credential: HashMap<String, String>) -> Result<Target, Status> {
    let options = TargetOptions {
        credentials: credential,
        nfs: backupstore::NfsOptions {
            mount: backupstore::NfsMount::Existing,
            ..Default::default()
        },
        // Longhorn's replicas have no destination policy: they dial what they are given.
        endpoints: std::sync::Arc::new(backupstore::EndpointPolicy::unrestricted()),
    };
    Target::open(url, &options).map_err(Status::invalid_argument)
}

pub(crate) async fn create(
    replica: &SimReplica,
    r: BackupCreateRequest,
) -> Result<BackupCreateResponse, Status> {
    if r.volume_name.is_empty() || r.snapshot_file_name.is_empty() || r.backup_target.is_empty() {
        return Err(Status::unknown("missing input parameter"));
    }
    let name = if r.backup_name.is_empty() {
        backupstore::generate_backup_name(&format!("{}{}", r.snapshot_file_name, now_rfc3339()))
    } else {
        r.backup_name.clone()
    };
    let (meta, data, size) = replica.with(|s| {
        let (meta, data) = s.flatten(&r.snapshot_file_name)?;
        Ok((meta, data, s.size))
    })?;
    let (url, credential, volume) = (
        r.backup_target.clone(),
        r.credential.clone(),
        r.volume_name.clone(),
    );
    let full = r
        .parameters
        .get(backupstore::BACKUP_MODE_PARAMETER)
        .is_some_and(|m| m == "full");
    let (target, incremental) = tokio::task::spawn_blocking(move || {
        let target = open_target(&url, credential)?;
        let incremental = !full
            && target.load_volume(&volume).ok().is_some_and(|v| {
                !v.last_backup_name.is_empty()
                    && target.load_backup(&volume, &v.last_backup_name).is_ok()
            });
        Ok::<_, Status>((target, incremental))
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))??;
    let url = backupstore::encode_backup_url(&target.url, &name, &r.volume_name);
    replica.with(|s| {
        if s.backups
            .get(&name)
            .is_some_and(|b| b.state == "in_progress")
        {
            return Err(Status::unknown(format!(
                "backup {name} is already in progress"
            )));
        }
        s.backups.insert(
            name.clone(),
            BackupProgress {
                progress: 0,
                state: "in_progress".into(),
                url: url.clone(),
                error: String::new(),
                snapshot: r.snapshot_file_name.clone(),
            },
        );
        Ok(())
    })?;
    let workers = workers(replica, r.concurrent_limit);
    if workers == 0 {
        // Longhorn starts `concurrent_limit` upload workers: with none the backup stays at 0%.
        return Ok(BackupCreateResponse {
            backup: name,
            is_incremental: incremental,
        });
    }
    let labels: BTreeMap<String, String> = r
        .labels
        .iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let replica = replica.clone();
    let backup = name.clone();
    tokio::task::spawn_blocking(move || {
        let update = |progress: i32| {
            let _ = replica.with(|s| {
                if let Some(b) = s.backups.get_mut(&backup) {
                    b.progress = progress;
                }
                Ok(())
            });
        };
        let now = now_rfc3339();
        let result = target.write_backup(
            &NewBackup {
                volume: &r.volume_name,
                backup: &backup,
                snapshot: &r.snapshot_file_name,
                snapshot_created_at: &meta.created,
                now: &now,
                size,
                labels,
                backing_image: (&r.backing_image_name, &r.backing_image_checksum),
                compression_method: &r.compression_method,
                storage_class_name: &r.storage_class_name,
                parameters: r.parameters.into_iter().collect(),
                concurrent_limit: workers,
                data: &data,
            },
            update,
        );
        let _ = replica.with(|s| {
            if let Some(b) = s.backups.get_mut(&backup) {
                match &result {
                    Ok(_) => {
                        b.progress = 100;
                        b.state = "complete".into();
                    }
                    Err(e) => {
                        b.state = "error".into();
                        b.error = format!("failed to write backup {backup}: {e}");
                    }
                }
            }
            prune(&mut s.backups);
            Ok(())
        });
    });
    Ok(BackupCreateResponse {
        backup: name,
        is_incremental: incremental,
    })
}

/// How many workers a backup or restore runs: the request's `concurrent_limit` (v1.12.1; none
/// when it is 0), one before the field existed (v1.3.3).
fn workers(replica: &SimReplica, concurrent_limit: i32) -> usize {
    match replica.release {
        super::Release::V1_3_3 => 1,
        super::Release::V1_12_1 => usize::try_from(concurrent_limit).unwrap_or(0),
    }
}

fn prune(backups: &mut HashMap<String, BackupProgress>) {
    for (state, keep) in [("complete", KEPT_COMPLETE), ("error", KEPT_ERROR)] {
        let mut done: Vec<String> = backups
            .iter()
            .filter(|(_, b)| b.state == state)
            .map(|(n, _)| n.clone())
            .collect();
        done.sort();
        let excess = done.len().saturating_sub(keep);
        for name in done.into_iter().take(excess) {
            backups.remove(&name);
        }
    }
}

pub(crate) fn status(replica: &SimReplica, name: &str) -> Result<BackupStatusResponse, Status> {
    if name.is_empty() {
        return Err(Status::unknown("bad request: empty backup name"));
    }
    let b = replica.with(|s| {
        s.backups
            .get(name)
            .cloned()
            .ok_or_else(|| Status::unknown(format!("backup not found {name}")))
    })?;
    Ok(BackupStatusResponse {
        progress: b.progress,
        backup_url: b.url,
        error: b.error,
        snapshot_name: super::replica::snapshot_name(&b.snapshot),
        state: b.state,
    })
}

/// Removes a backup from its target (longhorn-engine runs `backup delete <url>`).
pub(crate) async fn remove(r: BackupRemoveRequest) -> Result<(), Status> {
    tokio::task::spawn_blocking(move || {
        let (target_url, backup, volume) =
            backupstore::decode_backup_url(&r.backup).map_err(Status::unknown)?;
        let target = open_target(&target_url, HashMap::new())?;
        target
            .remove_backup(&volume, &backup)
            .map_err(Status::unknown)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
}

/// How a restore fills its snapshot disk.
enum Plan {
    /// Straight into the snapshot disk of a fresh volume, which then becomes the head's parent.
    Full { file: String },
    /// Into a copy beside the snapshot, which then replaces it (the last restored backup can no
    /// longer be read).
    Replace { temp: String },
    /// Only the blocks that differ from the last restored backup, folded into the snapshot.
    Incremental { last: String },
}

pub(crate) async fn restore(replica: &SimReplica, r: BackupRestoreRequest) -> Result<(), Status> {
    if r.snapshot_disk_name.is_empty() {
        return Err(Status::unknown("empty snapshot disk name for the restore"));
    }
    if r.backup.is_empty() {
        return Err(Status::unknown("empty backup URL for the restore"));
    }
    let (target_url, requested, volume) =
        backupstore::decode_backup_url(&r.backup).map_err(|e| {
            Status::unknown(format!(
                "failed to check the type for backup {}: {e}",
                r.backup
            ))
        })?;
    let credential = r.credential.clone();
    let target = tokio::task::spawn_blocking(move || open_target(&target_url, credential))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            Status::unknown(format!(
                "failed to setup credential for backup {}: {}",
                r.backup,
                e.message()
            ))
        })?;
    let started = |e: String| Status::unknown(format!("error starting backup restore: {e}"));
    let (last, previous) = replica.with(|s| {
        let info = &s.restore;
        if info.restoring {
            return Err(started(
                "cannot initiate backup restore as there is one already in progress".into(),
            ));
        }
        if info.state == "error" {
            return Err(started(
                "cannot start backup restore of the previous restore fails".into(),
            ));
        }
        if !info.last_restored.is_empty() && info.last_restored == requested {
            return Err(started(format!("already restored backup {requested}")));
        }
        Ok((info.last_restored.clone(), info.state.clone()))
    })?;
    let plan = if last.is_empty() && previous.is_empty() {
        Plan::Full {
            file: r.snapshot_disk_name.clone(),
        }
    } else {
        let (t, v, l) = (target.clone(), volume.clone(), last.clone());
        let readable = !last.is_empty()
            && tokio::task::spawn_blocking(move || t.inspect_backup(&v, &l).is_ok())
                .await
                .unwrap_or(false);
        if readable {
            Plan::Incremental { last }
        } else {
            Plan::Replace {
                temp: format!("{}.snap_tmp", r.snapshot_disk_name),
            }
        }
    };
    // The backup must be readable now: Longhorn reads its config before it starts.
    let (t, v, b) = (target.clone(), volume.clone(), requested.clone());
    tokio::task::spawn_blocking(move || t.backup_layout(&v, &b))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            let kind = if matches!(plan, Plan::Incremental { .. }) {
                "incremental"
            } else {
                "full"
            };
            started(format!("error initiating {kind} backup restore: {e}"))
        })?;
    replica.with(|s| {
        s.restore = RestoreInfo {
            restoring: true,
            progress: 0,
            error: String::new(),
            state: "in_progress".into(),
            backup_url: r.backup.clone(),
            snapshot_disk: r.snapshot_disk_name.clone(),
            last_restored: match &plan {
                Plan::Replace { .. } => String::new(),
                _ => s.restore.last_restored.clone(),
            },
            current: requested.clone(),
        };
        Ok(())
    })?;
    if workers(replica, r.concurrent_limit) == 0 {
        // No workers: the restore never progresses, as in Longhorn.
        return Ok(());
    }
    let replica = replica.clone();
    let snapshot = r.snapshot_disk_name.clone();
    tokio::task::spawn_blocking(move || {
        let result = apply(&replica, &target, &volume, &requested, &snapshot, plan);
        let _ = replica.with(|s| {
            s.restore.restoring = false;
            match &result {
                Ok(()) => {
                    s.restore.progress = 100;
                    s.restore.state = "complete".into();
                    s.restore.last_restored = std::mem::take(&mut s.restore.current);
                }
                Err(e) => {
                    s.restore.state = "error".into();
                    s.restore.error = e.clone();
                    s.restore.current.clear();
                }
            }
            Ok(())
        });
    });
    Ok(())
}

/// Reads the backup's blocks and puts them into the replica as `plan` says.
fn apply(
    replica: &SimReplica,
    target: &Target,
    volume: &str,
    backup: &str,
    snapshot: &str,
    plan: Plan,
) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("failed to restore {backup}: {e}");
    let (cfg, block_size, compression) = target.backup_layout(volume, backup).map_err(fail)?;
    let blocks = match &plan {
        Plan::Incremental { last } => {
            let (old, _, _) = target.backup_layout(volume, last).map_err(fail)?;
            let old: HashMap<i64, String> = old
                .blocks
                .into_iter()
                .map(|b| (b.offset, b.block_checksum))
                .collect();
            let new: HashMap<i64, &str> = cfg
                .blocks
                .iter()
                .map(|b| (b.offset, b.block_checksum.as_str()))
                .collect();
            // Blocks the last backup had and this one does not are zero now.
            let zeroed: Vec<i64> = old
                .keys()
                .filter(|o| !new.contains_key(o))
                .copied()
                .collect();
            replica
                .with(|s| {
                    for offset in zeroed {
                        let zeros = vec![0u8; block_size];
                        let at = offset as usize;
                        if at < s.size as usize {
                            let len = block_size.min(s.size as usize - at);
                            s.write_into(snapshot, at, &zeros[..len])?;
                        }
                    }
                    Ok(())
                })
                .map_err(|e| e.message().to_string())?;
            cfg.blocks
                .iter()
                .filter(|b| old.get(&b.offset) != Some(&b.block_checksum))
                .cloned()
                .collect::<Vec<_>>()
        }
        _ => cfg.blocks.clone(),
    };
    let file = match &plan {
        Plan::Full { file } => file.clone(),
        Plan::Replace { temp } => temp.clone(),
        Plan::Incremental { .. } => snapshot.to_string(),
    };
    if !matches!(plan, Plan::Incremental { .. }) {
        replica
            .with(|s| {
                s.disks.insert(
                    file.clone(),
                    DiskInfo {
                        name: file.clone(),
                        created: now_rfc3339(),
                        size: "0".into(),
                        ..Default::default()
                    },
                );
                s.data.insert(file.clone(), Vec::new());
                s.touch(&file);
                Ok(())
            })
            .map_err(|e| e.message().to_string())?;
    }
    let total = blocks.len().max(1);
    for (i, block) in blocks.iter().enumerate() {
        let raw = target
            .read_block(volume, block, compression, block_size)
            .map_err(fail)?;
        replica
            .with(|s| {
                s.write_into(&file, block.offset as usize, &raw)?;
                s.restore.progress = ((i + 1) * 99 / total) as i32;
                Ok(())
            })
            .map_err(|e| e.message().to_string())?;
    }
    replica
        .with(|s| {
            match &plan {
                Plan::Full { file } => {
                    s.reload();
                    s.revert(file)?;
                }
                Plan::Replace { temp } => {
                    let data = s.data.remove(temp).unwrap_or_default();
                    s.disks.remove(temp);
                    if let Some(d) = s.disks.get_mut(snapshot) {
                        d.size = data.len().to_string();
                    }
                    s.data.insert(snapshot.to_string(), data);
                    s.touch(snapshot);
                    s.reload();
                }
                Plan::Incremental { .. } => s.reload(),
            }
            Ok(())
        })
        .map_err(|e| e.message().to_string())
}

pub(crate) fn reset(replica: &SimReplica) -> Result<(), Status> {
    replica.with(|s| {
        if s.restore.restoring {
            return Err(Status::unknown(
                "replica is currently restoring, cannot reset",
            ));
        }
        s.backups.clear();
        s.hashes = Default::default();
        s.restore = RestoreInfo::default();
        s.rebuild = Default::default();
        s.purge = Default::default();
        s.clone = Default::default();
        Ok(())
    })
}

pub(crate) fn restore_status(replica: &SimReplica) -> Result<RestoreStatusResponse, Status> {
    replica.with(|s| {
        let i = &s.restore;
        Ok(RestoreStatusResponse {
            is_restoring: i.restoring,
            last_restored: i.last_restored.clone(),
            progress: i.progress,
            error: i.error.clone(),
            dest_file_name: i.snapshot_disk.clone(),
            state: i.state.clone(),
            backup_url: i.backup_url.clone(),
            current_restoring_backup: i.current.clone(),
        })
    })
}
