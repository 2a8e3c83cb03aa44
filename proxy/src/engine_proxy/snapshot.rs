//! Snapshot calls: create and revert on the engine; list, purge, clone, remove and hash as
//! longhorn-engine's task library does them over the replicas (`spec/longhorn-current.md` §3).

use std::collections::HashMap;

use futures_util::future::join_all;
use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::{self, ReplicaMode};
use tonic::Status;

use super::{
    call, call_long, logged, long_timeout, snapshot_name, timed, Empty, Engine, EngineProxy,
    Identity, Listed, ReplicaAddr, TaskError,
};

/// Go's `types.Mode` text of a replica mode.
pub(super) fn mode_name(mode: ReplicaMode) -> &'static str {
    match mode {
        ReplicaMode::Rw => "RW",
        ReplicaMode::Wo => "WO",
        ReplicaMode::Err => "ERR",
    }
}

/// A replica's ReplicaGet (`Replica` itself), for the volume only: lhnet cannot name replicas
/// the engine lists.
pub(super) async fn replica_info(
    p: &EngineProxy,
    addr: ReplicaAddr,
    id: &Identity,
) -> Result<ptypes::Replica, Status> {
    Ok(call(
        &format!("get replica {}", addr.0),
        p.replica(addr, id)?.replica_get(timed(())),
    )
    .await?
    .replica
    .unwrap_or_default())
}

/// longhorn-engine's `GetSnapshotsInfo`: the disks of the RW replica with the most of them
/// (removed ones included, the backing file left out), named as snapshots.
pub(super) async fn snapshots_info(
    p: &EngineProxy,
    engine: &Engine,
    replicas: &[Listed],
) -> Result<HashMap<String, EngineSnapshotDiskInfo>, Status> {
    let id = engine.id.volume_only();
    let mut best: Option<ptypes::Replica> = None;
    for r in replicas.iter().filter(|r| r.mode == ReplicaMode::Rw) {
        let info = async { replica_info(p, r.parsed()?, &id).await }
            .await
            .map_err(|e| {
                Status::new(
                    e.code(),
                    format!("BUG: cannot get snapshot info: {}", e.message()),
                )
            })?;
        if best
            .as_ref()
            .is_none_or(|b| info.disks.len() > b.disks.len())
        {
            best = Some(info);
        }
    }
    let mut disks = HashMap::new();
    let Some(replica) = best else {
        return Ok(disks);
    };
    for (file, d) in replica.disks {
        if file == replica.backing_file {
            continue;
        }
        let name = snapshot_name(&file);
        let parent = if d.parent.is_empty() {
            String::new()
        } else {
            snapshot_name(&d.parent)
        };
        disks.insert(
            name.clone(),
            EngineSnapshotDiskInfo {
                name,
                parent,
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
    Ok(disks)
}

pub(super) async fn create(
    p: &EngineProxy,
    r: EngineVolumeSnapshotRequest,
) -> Result<EngineVolumeSnapshotProxyResponse, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("VolumeSnapshot", &engine, true);
    let snapshot = r.snapshot_volume.unwrap_or_default();
    let reply = call(
        &format!(
            "create snapshot {} for volume {}",
            snapshot.name, engine.addr
        ),
        p.controller(&engine).volume_snapshot(timed(snapshot)),
    )
    .await?;
    Ok(EngineVolumeSnapshotProxyResponse {
        snapshot: Some(reply),
    })
}

pub(super) async fn list(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineSnapshotListProxyResponse, Status> {
    let engine = p.engine(Some(&r))?;
    logged("SnapshotList", &engine, false);
    let replicas = p.replicas(&engine).await?;
    let disks = snapshots_info(p, &engine, &replicas).await?;
    Ok(EngineSnapshotListProxyResponse { disks })
}

pub(super) async fn revert(
    p: &EngineProxy,
    r: EngineSnapshotRevertRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("SnapshotRevert", &engine, true);
    call(
        &format!("revert to snapshot {} for volume {}", r.name, engine.addr),
        p.controller(&engine)
            .volume_revert(timed(ptypes::VolumeRevertRequest {
                name: r.name.clone(),
            })),
    )
    .await?;
    Ok(())
}

/// Whether a replica is rebuilding (its ReplicaGet says so).
pub(super) async fn is_rebuilding(
    p: &EngineProxy,
    r: &Listed,
    id: &Identity,
) -> Result<bool, Status> {
    Ok(replica_info(p, r.parsed()?, id).await?.rebuilding)
}

/// Whether a replica's sync agent is purging snapshots.
async fn is_purging(p: &EngineProxy, r: &Listed, id: &Identity) -> Result<bool, Status> {
    let status = call(
        "get snapshot purge status",
        p.agent(r.parsed()?, id)?.snapshot_purge_status(timed(())),
    )
    .await?;
    Ok(status.is_purging)
}

/// longhorn-engine's `PurgeSnapshots`: every replica checked (none rebuilding, none purging
/// unless `skip`), then the purge started on all of them at once (it runs on each replica).
pub(super) async fn purge_replicas(
    p: &EngineProxy,
    engine: &Engine,
    skip_if_in_progress: bool,
) -> Result<(), Status> {
    let replicas = p.replicas(engine).await.map_err(|e| {
        Status::new(
            e.code(),
            format!("failed to list replicas before purging: {}", e.message()),
        )
    })?;
    let id = engine.id.volume_only();
    let mut errors = TaskError::default();
    for r in &replicas {
        match is_rebuilding(p, r, &id).await {
            Err(e) => errors.push(
                &r.text,
                format!(
                    "failed to check if replica {} is rebuilding before purging: {}",
                    r.text,
                    e.message()
                ),
            ),
            Ok(true) => errors.push(
                &r.text,
                format!("cannot purge snapshots because {} is rebuilding", r.text),
            ),
            Ok(false) => {}
        }
        match is_purging(p, r, &id).await {
            Err(e) => errors.push(
                &r.text,
                format!(
                    "failed to check if replica {} is purging before purging: {}",
                    r.text,
                    e.message()
                ),
            ),
            Ok(true) if skip_if_in_progress => {
                tracing::info!(volume = %engine.addr, replica = %r.text, "snapshot purge already in progress; skipped as asked");
                return Ok(());
            }
            Ok(true) => errors.push(
                &r.text,
                format!(
                    "cannot purge snapshots because {} is already purging snapshots",
                    r.text
                ),
            ),
            Ok(false) => {}
        }
    }
    errors.into_result()?;
    let started = join_all(replicas.iter().map(|r| {
        let id = id.clone();
        async move {
            let result = async {
                call(
                    "start snapshot purge",
                    p.agent(r.parsed()?, &id)?.snapshot_purge(timed(())),
                )
                .await
            }
            .await;
            (r, result)
        }
    }))
    .await;
    let mut errors = TaskError::default();
    for (r, result) in started {
        if let Err(e) = result {
            if skip_if_in_progress && e.message().contains("already purging") {
                continue;
            }
            errors.push(
                &r.text,
                format!(
                    "replica {} failed to execute snapshot purge: {}",
                    r.text,
                    e.message()
                ),
            );
        }
    }
    errors.into_result()
}

pub(super) async fn purge(p: &EngineProxy, r: EngineSnapshotPurgeRequest) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("SnapshotPurge", &engine, true);
    purge_replicas(p, &engine, r.skip_if_in_progress).await
}

/// Every replica but ERR ones; a replica that does not answer has its error in its entry.
pub(super) async fn purge_status(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineSnapshotPurgeStatusProxyResponse, Status> {
    let engine = p.engine(Some(&r))?;
    logged("SnapshotPurgeStatus", &engine, false);
    let status = purge_status_of(p, &engine).await?;
    Ok(EngineSnapshotPurgeStatusProxyResponse { status })
}

/// The purge status of every non-ERR replica, keyed as the engine lists them.
pub(super) async fn purge_status_of(
    p: &EngineProxy,
    engine: &Engine,
) -> Result<HashMap<String, ptypes::SnapshotPurgeStatusResponse>, Status> {
    let id = engine.id.volume_only();
    let mut status = HashMap::new();
    for r in p.replicas(engine).await? {
        if r.mode == ReplicaMode::Err {
            continue;
        }
        let result = async {
            call(
                "get snapshot purge status",
                p.agent(r.parsed()?, &id)?.snapshot_purge_status(timed(())),
            )
            .await
        }
        .await;
        let entry = result.unwrap_or_else(|e| ptypes::SnapshotPurgeStatusResponse {
            error: format!(
                "failed to get snapshot purge status of {}: {}",
                r.text,
                e.message()
            ),
            ..Default::default()
        });
        status.insert(r.text, entry);
    }
    Ok(status)
}

/// Copies a snapshot of another volume (the source engine at `from_engine_address`, named by
/// `from_volume_name` / `from_engine_name`) into every replica of this one, as longhorn-engine's
/// `CloneSnapshot` does. `clone_mode` and the replica pair map are v2's (SPDK linked clones):
/// the v1 path copies in full, as Longhorn's does.
pub(super) async fn clone(p: &EngineProxy, r: EngineSnapshotCloneRequest) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    let source_names = ProxyEngineRequest {
        volume_name: r.from_volume_name.clone(),
        engine_name: r.from_engine_name.clone(),
        ..Default::default()
    };
    let source = p.engine_at("from_engine_address", &r.from_engine_address, &source_names)?;
    logged("SnapshotClone", &engine, true);
    let from = p
        .replicas(&source)
        .await?
        .into_iter()
        .find(|x| x.mode == ReplicaMode::Rw)
        .ok_or_else(|| {
            Status::unknown("cannot find a RW replica in the source volume for cloning")
        })?;
    let from_addr = from.parsed()?;
    p.allow("source replica", from_addr.0)?;
    let targets = p.replicas(&engine).await?;
    if let Some(bad) = targets.iter().find(|x| x.mode != ReplicaMode::Rw) {
        return Err(Status::unknown(format!(
            "cannot do snapshot clone because replica {} in {} mode. All replicas in the target volume must be in RW mode",
            bad.text,
            mode_name(bad.mode)
        )));
    }
    let limit = long_timeout(r.grpc_timeout_seconds);
    let id = engine.id.volume_only();
    let clones = targets.iter().map(|t| {
        let request = ptypes::SnapshotCloneRequest {
            from_address: from.text.clone(),
            to_host: String::new(),
            snapshot_file_name: r.snapshot_name.clone(),
            export_backing_image_if_exist: r.export_backing_image_if_exist,
            file_sync_http_client_timeout: r.file_sync_http_client_timeout,
            from_volume_name: r.from_volume_name.clone(),
        };
        let id = id.clone();
        let (name, from_text) = (r.snapshot_name.clone(), from.text.clone());
        async move {
            let result = async {
                let addr = t.parsed()?;
                let request = ptypes::SnapshotCloneRequest {
                    to_host: addr.0.ip().to_string(),
                    ..request
                };
                let mut agent = p.agent(addr, &id)?;
                call_long(
                    &format!(
                        "clone snapshot {name} from replica {from_text} to host {}",
                        addr.0.ip()
                    ),
                    limit,
                    request,
                    |req| agent.snapshot_clone(req),
                )
                .await
            }
            .await;
            (t, result)
        }
    });
    let mut errors = TaskError::default();
    for (t, result) in join_all(clones).await {
        if let Err(e) = result {
            errors.push(&t.text, e.message());
        }
    }
    errors.into_result()
}

/// Every replica, whatever its mode.
pub(super) async fn clone_status(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineSnapshotCloneStatusProxyResponse, Status> {
    let engine = p.engine(Some(&r))?;
    logged("SnapshotCloneStatus", &engine, false);
    let id = engine.id.volume_only();
    let mut status = HashMap::new();
    for x in p.replicas(&engine).await? {
        let result = async {
            call(
                "get snapshot clone status",
                p.agent(x.parsed()?, &id)?.snapshot_clone_status(timed(())),
            )
            .await
        }
        .await;
        let entry = result.unwrap_or_else(|e| ptypes::SnapshotCloneStatusResponse {
            error: format!(
                "failed to get snapshot clone status of {}: {}",
                x.text,
                e.message()
            ),
            ..Default::default()
        });
        status.insert(x.text, entry);
    }
    Ok(EngineSnapshotCloneStatusProxyResponse { status })
}

/// Marks each name removed on every replica (the bytes go at the next purge); a failure is
/// logged and the last one returned, as Longhorn's proxy does.
pub(super) async fn remove(
    p: &EngineProxy,
    r: EngineSnapshotRemoveRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("SnapshotRemove", &engine, true);
    let mut last_error = None;
    for name in &r.names {
        if let Err(e) = remove_one(p, &engine, name).await {
            tracing::warn!(volume = %engine.addr, snapshot = %name, error = %e.message(), "failed to delete snapshot");
            last_error = Some(e);
        }
    }
    match last_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn remove_one(p: &EngineProxy, engine: &Engine, name: &str) -> Result<(), Status> {
    let replicas = p.replicas(engine).await?;
    let id = engine.id.volume_only();
    for x in &replicas {
        if is_rebuilding(p, x, &id).await? {
            return Err(Status::unknown(format!(
                "cannot remove a snapshot because {} is rebuilding",
                x.text
            )));
        }
    }
    for x in &replicas {
        if x.mode != ReplicaMode::Rw {
            return Err(Status::unknown(format!(
                "can only mark snapshot as removed from replica in mode RW, got {}",
                mode_name(x.mode)
            )));
        }
        let addr = x.parsed()?;
        call(
            &format!("mark disk {name} as removed for replica {}", addr.0),
            p.replica(addr, &id)?
                .disk_mark_as_removed(timed(ptypes::DiskMarkAsRemovedRequest {
                    name: name.to_string(),
                })),
        )
        .await?;
        cancel_hash(p, addr, &id, name).await.map_err(|e| {
            Status::new(
                e.code(),
                format!("failed to stop snapshot {name} hash: {}", e.message()),
            )
        })?;
    }
    Ok(())
}

/// Cancels a replica's hashing job of one snapshot (a job that does not exist is no error).
pub(super) async fn cancel_hash(
    p: &EngineProxy,
    addr: ReplicaAddr,
    id: &Identity,
    name: &str,
) -> Result<(), Status> {
    call(
        &format!("cancel snapshot {name} hash task"),
        p.agent(addr, id)?
            .snapshot_hash_cancel(timed(ptypes::SnapshotHashCancelRequest {
                snapshot_name: name.to_string(),
            })),
    )
    .await
}

/// Starts hashing a snapshot on every replica; refused (texts starting "cannot request
/// hashing snapshot", which managers retry on) while a replica is not RW, rebuilds, or its
/// node already hashes.
pub(super) async fn hash(p: &EngineProxy, r: EngineSnapshotHashRequest) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("SnapshotHash", &engine, true);
    let replicas = p.replicas(&engine).await?;
    let id = engine.id.volume_only();
    for x in &replicas {
        if x.mode != ReplicaMode::Rw {
            return Err(Status::unknown(format!(
                "cannot request hashing snapshot because {} is in {} mode",
                x.text,
                mode_name(x.mode)
            )));
        }
        if is_rebuilding(p, x, &id).await? {
            return Err(Status::unknown(format!(
                "cannot request hashing snapshot because {} is rebuilding",
                x.text
            )));
        }
        let lock = call(
            "get snapshot hash lock state",
            p.agent(x.parsed()?, &id)?
                .snapshot_hash_lock_state(timed(())),
        )
        .await?;
        if lock.is_locked {
            return Err(Status::unknown(format!(
                "cannot request hashing snapshot because {} is hashing snapshot",
                x.text
            )));
        }
    }
    let started = join_all(replicas.iter().map(|x| {
        let id = id.clone();
        let request = ptypes::SnapshotHashRequest {
            snapshot_name: r.snapshot_name.clone(),
            rehash: r.rehash,
        };
        async move {
            let result = async {
                call(
                    "start hashing snapshot",
                    p.agent(x.parsed()?, &id)?.snapshot_hash(timed(request)),
                )
                .await
            }
            .await;
            (x, result)
        }
    }))
    .await;
    let mut errors = TaskError::default();
    for (x, result) in started {
        if let Err(e) = result {
            errors.push(&x.text, e.message());
        }
    }
    errors.into_result()
}

/// Every replica's hashing state of one snapshot, asked at once. A replica that is not RW, is
/// rebuilding or does not answer has `state: error` and why.
pub(super) async fn hash_status(
    p: &EngineProxy,
    r: EngineSnapshotHashStatusRequest,
) -> Result<EngineSnapshotHashStatusProxyResponse, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("SnapshotHashStatus", &engine, false);
    let replicas = p.replicas(&engine).await?;
    let id = engine.id.volume_only();
    let entries = join_all(replicas.iter().map(|x| {
        let id = id.clone();
        let name = r.snapshot_name.clone();
        async move {
            let failed = |error: String| ptypes::SnapshotHashStatusResponse {
                state: "error".into(),
                error,
                ..Default::default()
            };
            if x.mode != ReplicaMode::Rw {
                return (
                    x,
                    failed(format!(
                        "replica {} since it is in {} mode",
                        x.text,
                        mode_name(x.mode)
                    )),
                );
            }
            match is_rebuilding(p, x, &id).await {
                Err(e) => {
                    return (
                        x,
                        failed(format!(
                            "cannot get snapshot hashing status of {}: {}",
                            x.text,
                            e.message()
                        )),
                    )
                }
                Ok(true) => return (x, failed(format!("replica {} is rebuilding", x.text))),
                Ok(false) => {}
            }
            let result = async {
                call(
                    "get snapshot hash status",
                    p.agent(x.parsed()?, &id)?.snapshot_hash_status(timed(
                        ptypes::SnapshotHashStatusRequest {
                            snapshot_name: name,
                        },
                    )),
                )
                .await
            }
            .await;
            let entry = result.unwrap_or_else(|e| {
                failed(format!(
                    "failed to get snapshot hashing status of {}: {}",
                    x.text,
                    e.message()
                ))
            });
            (x, entry)
        }
    }))
    .await;
    let status = entries
        .into_iter()
        .map(|(x, entry)| (x.text.clone(), entry))
        .collect();
    Ok(EngineSnapshotHashStatusProxyResponse { status })
}
