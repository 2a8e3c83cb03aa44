//! BackupRestore as longhorn-engine's restore task (`RestoreBackup`) does it, the same in
//! v1.3.3 and v1.12.1: guards on the engine and every replica, the snapshot disk chosen so an
//! incremental (DR) restore keeps writing into the snapshot of the restore before it, the
//! backup inspected through the backupstore and its size checked, then the restore started on
//! every replica at once (it runs there; BackupRestoreStatus follows it).
//!
//! Failures after the request is accepted travel in `taskError` with status OK, as Longhorn's
//! proxy sends them: per-replica failures as Go's JSON of `TaskError`, every other one as its
//! text.

use std::collections::HashMap;

use futures_util::future::join_all;
use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::{self, ReplicaMode};
use tonic::Status;

use super::snapshot::{is_rebuilding, purge_replicas, purge_status_of, snapshots_info};
use super::{
    answer, call, credential_map, go_text, logged, timed, Engine, EngineProxy, Listed, TaskError,
    ENGINE_CALL_TIMEOUT,
};

/// The LUKS2 header an encrypted volume adds to its backup's size (`Luks2EncryptionHeaderSize`).
const LUKS2_HEADER: i64 = 16 << 20;

/// Why a restore did not start: text, or per-replica errors.
enum Refused {
    Text(String),
    Replicas(TaskError),
}

impl From<Status> for Refused {
    fn from(s: Status) -> Self {
        Refused::Text(s.message().to_string())
    }
}

pub(super) async fn restore(
    p: &EngineProxy,
    r: EngineBackupRestoreRequest,
) -> Result<EngineBackupRestoreProxyResponse, Status> {
    let credential = credential_map(&r.envs, &r.target)?;
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("BackupRestore", &engine, true);
    tracing::info!(volume = %engine.addr, backup = %r.url, backup_volume = %r.volume_name, network = "storage", "restoring backup");
    let request = Restore {
        url: r.url,
        credential,
        concurrent_limit: r.concurrent_limit,
        encrypted: r.need_correct_encrypted_volume_size,
    };
    let task_error = match request.run(p, &engine).await {
        Ok(()) => Vec::new(),
        Err(Refused::Text(text)) => text.into_bytes(),
        Err(Refused::Replicas(errors)) => errors.to_json(),
    };
    Ok(EngineBackupRestoreProxyResponse { task_error })
}

struct Restore {
    url: String,
    credential: HashMap<String, String>,
    concurrent_limit: i32,
    /// `need_correct_encrypted_volume_size`: the backup's size plus the LUKS2 header.
    encrypted: bool,
}

impl Restore {
    async fn run(&self, p: &EngineProxy, engine: &Engine) -> Result<(), Refused> {
        let volume = call(
            &format!("get volume {}", engine.addr),
            p.controller(engine).volume_get(timed(())),
        )
        .await
        .map_err(|e| Refused::Text(format!("failed to get volume: {}", e.message())))?;
        if volume.frontend_state == "up" {
            return Err(Refused::Text(
                "volume frontend enabled, cannot perform restore".into(),
            ));
        }
        let replicas = p.replicas(engine).await.map_err(|e| {
            Refused::Text(format!(
                "failed to list replicas before the restore: {}",
                e.message()
            ))
        })?;
        let id = engine.id.volume_only();
        let mut errors = TaskError::default();
        for x in &replicas {
            match is_rebuilding(p, x, &id).await {
                Err(e) => errors.push(&x.text, e.message()),
                Ok(true) => errors.push(&x.text, "cannot do restore for normal rebuilding replica"),
                Ok(false) => {}
            }
        }
        if !errors.is_empty() {
            return Err(Refused::Replicas(errors));
        }
        if purge_status_of(p, engine)
            .await?
            .values()
            .any(|s| s.is_purging)
        {
            return Err(Refused::Text(
                "cannot do restore now since replicas are purging snapshots".into(),
            ));
        }

        // A volume that restored before (a DR volume) restores incrementally; a restore still
        // running names its snapshot disk.
        let statuses = restore_statuses(p, engine, &replicas).await;
        let incremental = statuses.values().any(|s| !s.last_restored.is_empty());
        let mut disk = statuses
            .values()
            .find(|s| s.is_restoring && !s.dest_file_name.is_empty())
            .map(|s| s.dest_file_name.clone())
            .unwrap_or_default();
        let snapshots = snapshots_info(p, engine, &replicas).await.map_err(|e| {
            Refused::Text(format!(
                "failed to get snapshot info before the incremental restore: {}",
                e.message()
            ))
        })?;
        match snapshots.len() {
            0 => {
                return Err(Refused::Text(format!(
                    "BUG: replicas {} do not contain any snapshots and volume head",
                    listed(&replicas)
                )))
            }
            1 if incremental => {
                return Err(Refused::Text(format!(
                    "BUG: replicas {} of DR volume should contains at least 2 disk files: the volume head and a snapshot storing restore data",
                    listed(&replicas)
                )))
            }
            1 => {
                if disk.is_empty() {
                    disk = format!("volume-snap-{}.img", uuid());
                }
            }
            // The head and the snapshot of the previous restore: restore into that snapshot.
            2 => {
                if let Some(head) = snapshots.get("volume-head") {
                    disk = format!("volume-snap-{}.img", head.parent);
                }
            }
            _ => {
                // More snapshots than a restore target has: purge the system ones first, so
                // every replica's chain is the same, and let the manager ask again.
                purge_replicas(p, engine, true)
                    .await
                    .map_err(|e| Refused::Text(e.message().to_string()))?;
                return Err(Refused::Text(
                    "found more than 1 snapshot in the replicas, hence started to purge snapshots before the restore".into(),
                ));
            }
        }

        let backup = match p
            .backups
            .inspect_backup(&self.url, self.credential.clone())
            .await
        {
            Ok(b) => b,
            Err(e) => {
                let mut errors = TaskError::default();
                for x in &replicas {
                    errors.push(
                        &x.text,
                        format!("failed to get the current restoring backup info: {e}"),
                    );
                }
                return Err(Refused::Replicas(errors));
            }
        };
        let backup_size = backup.volume_size + if self.encrypted { LUKS2_HEADER } else { 0 };
        if backup_size < volume.size {
            return Err(Refused::Text(format!(
                "BUG: The backup volume {} size {backup_size} cannot be smaller than the DR volume {} size {}",
                backup.volume_name, volume.name, volume.size
            )));
        }
        if backup_size > volume.size {
            return Err(Refused::Text(if incremental {
                format!(
                    "need to expand the DR volume {} to size {backup_size} before incremental restoration",
                    volume.name
                )
            } else {
                format!(
                    "BUG: The backup volume {} size {backup_size} cannot be larger than normal restore volume {} size {}",
                    backup.volume_name, volume.name, volume.size
                )
            }));
        }

        // lhnet inspected the backup with the caller's credential; the replicas download
        // through their pods' backup egress when the route sets one.
        let replica_credential = p.through_egress(&self.url, self.credential.clone());
        let starts = join_all(replicas.iter().map(|x| {
            let request = ptypes::BackupRestoreRequest {
                backup: self.url.clone(),
                snapshot_disk_name: disk.clone(),
                credential: replica_credential.clone(),
                concurrent_limit: self.concurrent_limit,
            };
            let id = id.clone();
            let disk = disk.clone();
            async move {
                if x.mode == ReplicaMode::Err {
                    return (
                        x,
                        Err("cannot restore backup from replica in mode ERR".to_string()),
                    );
                }
                let started = async {
                    let mut agent = p.agent(x.parsed()?, &id)?;
                    answer(ENGINE_CALL_TIMEOUT, agent.backup_restore(timed(request))).await
                }
                .await;
                (
                    x,
                    started.map(|_| ()).map_err(|e| {
                        format!(
                            "failed to restore backup data {} to snapshot file {disk}: {}",
                            self.url,
                            go_text(&e)
                        )
                    }),
                )
            }
        }))
        .await;
        let mut errors = TaskError::default();
        for (x, result) in starts {
            if let Err(e) = result {
                errors.push(&x.text, e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Refused::Replicas(errors))
        }
    }
}

/// Go's `%+v` of the replica list in the BUG texts, close enough to read.
fn listed(replicas: &[Listed]) -> String {
    let items: Vec<String> = replicas
        .iter()
        .map(|x| {
            format!(
                "{{Address:{} Mode:{}}}",
                x.text,
                super::snapshot::mode_name(x.mode)
            )
        })
        .collect();
    format!("[{}]", items.join(" "))
}

/// A random (v4) UUID for a new restore snapshot, as longhorn-engine names them.
fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The restore status of every non-ERR replica; one that does not answer has its error in
/// its entry.
async fn restore_statuses(
    p: &EngineProxy,
    engine: &Engine,
    replicas: &[Listed],
) -> HashMap<String, ptypes::RestoreStatusResponse> {
    let id = engine.id.volume_only();
    let mut statuses = HashMap::new();
    for x in replicas.iter().filter(|x| x.mode != ReplicaMode::Err) {
        let result = async {
            call(
                "get restore status",
                p.agent(x.parsed()?, &id)?.restore_status(timed(())),
            )
            .await
        }
        .await;
        let entry = result.unwrap_or_else(|e| ptypes::RestoreStatusResponse {
            error: format!(
                "Failed to get restoring status on {}: {}",
                x.text,
                e.message()
            ),
            ..Default::default()
        });
        statuses.insert(x.text.clone(), entry);
    }
    statuses
}

pub(super) async fn status(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineBackupRestoreStatusProxyResponse, Status> {
    let engine = p.engine(Some(&r))?;
    logged("BackupRestoreStatus", &engine, false);
    let replicas = p.replicas(&engine).await?;
    let status = restore_statuses(p, &engine, &replicas)
        .await
        .into_iter()
        .map(|(address, s)| {
            (
                address,
                EngineBackupRestoreStatus {
                    is_restoring: s.is_restoring,
                    last_restored: s.last_restored,
                    current_restoring_backup: s.current_restoring_backup,
                    progress: s.progress,
                    error: s.error,
                    filename: s.dest_file_name,
                    state: s.state,
                    backup_url: s.backup_url,
                },
            )
        })
        .collect();
    Ok(EngineBackupRestoreStatusProxyResponse { status })
}
