//! Replica calls: ReplicaAdd as longhorn-engine's `AddReplica` / `AddRestoreReplica` tasks do
//! it (expand, reset a failed rebuild, create WO, sync from the RW replicas up to the
//! concurrent sync limit, reload, verify), and the 1:1 translations.

use std::collections::HashMap;

use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::{self, ReplicaMode};
use tonic::Status;

use super::snapshot::{cancel_hash, snapshots_info};
use super::{
    call, call_long, dispatch, logged, long_timeout, timed, Empty, Engine, EngineProxy, Identity,
    ReplicaAddr,
};

/// The controller API version from which the engine has a concurrent sync limit.
const SYNC_LIMIT_API: i64 = 6;

pub(super) async fn add(p: &EngineProxy, r: EngineReplicaAddRequest) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    let target = ReplicaAddr::parse("replica_address", &r.replica_address)?;
    p.allow("replica_address", target.0)?;
    p.allow("replica sync agent", target.sync_agent()?)?;
    let id = engine.id.for_instance("replica_name", &r.replica_name)?;
    logged("ReplicaAdd", &engine, true);
    tracing::info!(volume = %engine.addr, replica = %r.replica_address, restore = r.restore, network = "storage", "adding replica");
    let add = Add {
        engine: &engine,
        url: &r.replica_address,
        target,
        id,
        request: &r,
    };
    if r.restore {
        add.restore_replica(p).await
    } else {
        add.rebuild(p).await
    }
}

/// One ReplicaAdd: the engine, the new replica (as the manager wrote it, parsed) and who it is.
struct Add<'a> {
    engine: &'a Engine,
    url: &'a str,
    target: ReplicaAddr,
    /// The volume and the new replica's name: calls to it carry both.
    id: Identity,
    request: &'a EngineReplicaAddRequest,
}

impl Add<'_> {
    /// Starts the volume with this replica when it has none yet; `true` when it did.
    async fn start_if_empty(&self, p: &EngineProxy) -> Result<(bool, ptypes::Volume), Status> {
        let volume = call(
            &format!("get volume {}", self.engine.addr),
            p.controller(self.engine).volume_get(timed(())),
        )
        .await?;
        if volume.replica_count != 0 {
            return Ok((false, volume));
        }
        let start = ptypes::VolumeStartRequest {
            replica_addresses: vec![self.url.to_string()],
            size: self.request.size,
            current_size: self.request.current_size,
        };
        call(
            &format!(
                "start volume {} with replica {}",
                self.engine.addr, self.url
            ),
            p.controller(self.engine).volume_start(timed(start)),
        )
        .await?;
        Ok((true, volume))
    }

    async fn info(&self, p: &EngineProxy) -> Result<ptypes::Replica, Status> {
        super::snapshot::replica_info(p, self.target, &self.id).await
    }

    /// ReplicaOpen / ReplicaClose / RebuildingSet / ReplicaExpand / ReplicaReload on the new
    /// replica, under its name.
    fn client(
        &self,
        p: &EngineProxy,
    ) -> Result<
        lhnet_proto::ptypes::replica_service_client::ReplicaServiceClient<super::EngineChannel>,
        Status,
    > {
        p.replica(self.target, &self.id)
    }

    async fn open(&self, p: &EngineProxy) -> Result<(), Status> {
        call(
            &format!("open replica {} with IsUpgrade false", self.target.0),
            self.client(p)?
                .replica_open(timed(ptypes::ReplicaOpenRequest::default())),
        )
        .await
        .map(|_| ())
    }

    async fn close(&self, p: &EngineProxy) -> Result<(), Status> {
        call(
            &format!("close replica {}", self.target.0),
            self.client(p)?.replica_close(timed(())),
        )
        .await
        .map(|_| ())
    }

    async fn set_rebuilding(&self, p: &EngineProxy, rebuilding: bool) -> Result<(), Status> {
        call(
            &format!(
                "set rebuilding to {rebuilding} for replica {}",
                self.target.0
            ),
            self.client(p)?
                .rebuilding_set(timed(ptypes::RebuildingSetRequest { rebuilding })),
        )
        .await
        .map(|_| ())
    }

    async fn create(&self, p: &EngineProxy, snapshot_required: bool) -> Result<(), Status> {
        let create = ptypes::ControllerReplicaCreateRequest {
            address: self.url.to_string(),
            snapshot_required,
            mode: ReplicaMode::Wo as i32,
        };
        call(
            &format!(
                "create replica {} for volume {}",
                self.url, self.engine.addr
            ),
            p.controller(self.engine)
                .controller_replica_create(timed(create)),
        )
        .await
        .map(|_| ())
    }

    /// `AddRestoreReplica`: a replica of a restoring (DR) volume joins WO, of the volume's
    /// size, without a rebuild; the restore fills it.
    async fn restore_replica(&self, p: &EngineProxy) -> Result<(), Status> {
        let (started, volume) = self.start_if_empty(p).await?;
        if started {
            return Ok(());
        }
        let size = self
            .info(p)
            .await
            .map(|i| i.size.parse::<i64>().unwrap_or(0));
        // Longhorn closes the replica after the check, whatever it found.
        let closed = self.close(p).await;
        let size = size?;
        if size != volume.size {
            let e = format!(
                "rebuilding replica size {size} is not the same as volume size {}",
                volume.size
            );
            return Err(match closed {
                Ok(()) => Status::unknown(e),
                Err(c) => {
                    Status::unknown(format!("original error: {e}, close error: {}", c.message()))
                }
            });
        }
        closed?;
        self.create(p, false).await
    }

    /// `AddReplica`: a rebuild of the new replica from the RW ones.
    async fn rebuild(&self, p: &EngineProxy) -> Result<(), Status> {
        let (started, volume) = self.start_if_empty(p).await?;
        if started {
            return Ok(());
        }
        self.expand_to(p, volume.size).await?;
        self.reset_failed_rebuild(p).await?;
        self.create(p, true).await?;
        let sources = self.sources(p).await?;
        self.set_rebuilding(p, true).await?;
        let prepared = call(
            &format!(
                "prepare rebuilding replica {} for volume {}",
                self.url, self.engine.addr
            ),
            p.controller(self.engine)
                .replica_prepare_rebuild(timed(ptypes::ReplicaAddress {
                    address: self.url.to_string(),
                    instance_name: self.request.replica_name.clone(),
                })),
        )
        .await?;
        if prepared
            .sync_file_info_list
            .iter()
            .any(|f| f.from_file_name.contains("volume-head"))
        {
            return Err(Status::unknown(
                "sync file list shouldn't contain volume head",
            ));
        }
        let from_address = sources.keys().next().cloned().unwrap_or_default();
        let files: Vec<&str> = prepared
            .sync_file_info_list
            .iter()
            .map(|f| f.from_file_name.as_str())
            .collect();
        let mut from: Vec<&String> = sources.keys().collect();
        from.sort();
        let op = format!("sync files {files:?} from {from:?}");
        let sync = ptypes::FilesSyncRequest {
            from_address,
            to_host: self.target.0.ip().to_string(),
            sync_file_info_list: prepared.sync_file_info_list,
            fast_sync: self.request.fast_sync,
            file_sync_http_client_timeout: self.request.file_sync_http_client_timeout,
            grpc_timeout_seconds: self.request.grpc_timeout_seconds,
            local_sync: self
                .request
                .local_sync
                .as_ref()
                .map(|l| ptypes::FileLocalSync {
                    source_path: l.source_path.clone(),
                    target_path: l.target_path.clone(),
                }),
            from_address_map: sources,
        };
        let mut agent = p.agent(self.target, &self.id)?;
        call_long(
            &op,
            long_timeout(self.request.grpc_timeout_seconds),
            sync,
            |req| agent.files_sync(req),
        )
        .await?;
        call(
            &format!("reload replica {}", self.target.0),
            self.client(p)?.replica_reload(timed(())),
        )
        .await?;
        call(
            &format!(
                "verify rebuilt replica {} for volume {}",
                self.url, self.engine.addr
            ),
            p.controller(self.engine)
                .replica_verify_rebuild(timed(ptypes::ReplicaAddress {
                    address: self.url.to_string(),
                    instance_name: self.request.replica_name.clone(),
                })),
        )
        .await?;
        self.set_rebuilding(p, false).await
    }

    /// A smaller replica grows to the volume's size first; a larger one cannot join.
    async fn expand_to(&self, p: &EngineProxy, size: i64) -> Result<(), Status> {
        let info = self.info(p).await?;
        let have: i64 = info.size.parse().unwrap_or(0);
        if have > size {
            return Err(Status::unknown(format!(
                "cannot add new replica larger than size {size}"
            )));
        }
        if have == size {
            return Ok(());
        }
        let opened = info.state == "closed";
        if opened {
            self.open(p).await?;
        }
        call(
            &format!("expand replica {}", self.target.0),
            self.client(p)?
                .replica_expand(timed(ptypes::ReplicaExpandRequest { size })),
        )
        .await?;
        if opened {
            self.close(p).await?;
        }
        Ok(())
    }

    /// A rebuild that failed earlier left the replica closed with its flag set: clear it.
    async fn reset_failed_rebuild(&self, p: &EngineProxy) -> Result<(), Status> {
        let info = self.info(p).await?;
        if info.state != "closed" || !info.rebuilding {
            return Ok(());
        }
        self.open(p).await?;
        self.set_rebuilding(p, false).await?;
        self.close(p).await
    }

    /// The RW replicas to copy from (`from_address_map`), at most the engine's concurrent sync
    /// limit of them when it has one; the new replica must be listed WO.
    async fn sources(&self, p: &EngineProxy) -> Result<HashMap<String, bool>, Status> {
        let replicas = p.replicas(self.engine).await?;
        let mut sources: Vec<String> = Vec::new();
        let mut found = false;
        for x in &replicas {
            if x.mode == ReplicaMode::Rw {
                sources.push(x.text.clone());
            }
            if x.addr == Some(self.target) {
                if x.mode != ReplicaMode::Wo {
                    return Err(Status::unknown(format!(
                        "replica {} is not in mode WO: {}",
                        self.url,
                        super::snapshot::mode_name(x.mode)
                    )));
                }
                found = true;
            }
        }
        if sources.is_empty() {
            return Err(Status::unknown("no available RW replica to rebuild from"));
        }
        if !found {
            return Err(Status::unknown(format!(
                "cannot find the WO replica client from address {}",
                self.url
            )));
        }
        for s in &sources {
            let addr = ReplicaAddr::parse("source replica", s)?;
            p.allow("source replica", addr.0)?;
        }
        let version = call(
            &format!("get version detail of {}", self.engine.addr),
            p.controller(self.engine).version_detail_get(timed(())),
        )
        .await?
        .version
        .unwrap_or_default();
        if version.controller_api_version >= SYNC_LIMIT_API {
            let limit = call(
                &format!(
                    "get rebuild concurrent sync limit for volume {}",
                    self.engine.addr
                ),
                p.controller(self.engine)
                    .replica_rebuild_concurrent_sync_limit_get(timed(())),
            )
            .await?
            .limit;
            sources.truncate(usize::try_from(limit).unwrap_or(0).max(1));
        }
        Ok(sources.into_iter().map(|s| (s, true)).collect())
    }
}

pub(super) async fn list(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineReplicaListProxyResponse, Status> {
    let engine = p.engine(Some(&r))?;
    logged("ReplicaList", &engine, false);
    let list = call(
        &format!("list replicas for volume {}", engine.addr),
        p.controller(&engine).replica_list(timed(())),
    )
    .await?;
    Ok(EngineReplicaListProxyResponse {
        replica_list: Some(list),
    })
}

/// The rebuild progress of every WO replica. A restoring (DR) volume's WO replicas restore,
/// they do not rebuild: the map stops at the first.
pub(super) async fn rebuilding_status(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineReplicaRebuildStatusProxyResponse, Status> {
    let engine = p.engine(Some(&r))?;
    logged("ReplicaRebuildingStatus", &engine, false);
    let id = engine.id.volume_only();
    let mut status = HashMap::new();
    for x in p.replicas(&engine).await? {
        if x.mode != ReplicaMode::Wo {
            continue;
        }
        let addr = x.parsed()?;
        let mut agent = p.agent(addr, &id)?;
        let restore = call("get restore status", agent.restore_status(timed(())))
            .await
            .map_err(|e| {
                Status::new(
                    e.code(),
                    format!(
                        "failed to check the restore status before fetching the rebuild status: {}",
                        e.message()
                    ),
                )
            })?;
        if !restore.dest_file_name.is_empty() {
            break;
        }
        let entry = match call(
            "get replica rebuild status",
            agent.replica_rebuild_status(timed(())),
        )
        .await
        {
            Ok(mut s) => {
                // v1.12 managers read the list, older ones the single address: fill both.
                if s.from_replica_address_list.is_empty() && !s.from_replica_address.is_empty() {
                    s.from_replica_address_list = vec![s.from_replica_address.clone()];
                }
                if s.from_replica_address.is_empty() {
                    if let Some(first) = s.from_replica_address_list.first() {
                        s.from_replica_address = first.clone();
                    }
                }
                s
            }
            Err(e) => ptypes::ReplicaRebuildStatusResponse {
                error: format!(
                    "failed to get replica rebuild status of {}: {}",
                    x.text,
                    e.message()
                ),
                ..Default::default()
            },
        };
        status.insert(x.text, entry);
    }
    Ok(EngineReplicaRebuildStatusProxyResponse { status })
}

/// v2 only: Longhorn's proxy refuses it for v1 as for an unknown engine.
pub(super) async fn rebuilding_qos_set(
    p: &EngineProxy,
    r: EngineReplicaRebuildingQosSetRequest,
) -> Result<Empty, Status> {
    p.engine(r.proxy_engine_request.as_ref())?;
    Err(dispatch::unsupported(dispatch::DATA_ENGINE_V1))
}

pub(super) async fn verify_rebuild(
    p: &EngineProxy,
    r: EngineReplicaVerifyRebuildRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("ReplicaVerifyRebuild", &engine, true);
    call(
        &format!(
            "verify rebuilt replica {} for volume {}",
            r.replica_address, engine.addr
        ),
        p.controller(&engine)
            .replica_verify_rebuild(timed(ptypes::ReplicaAddress {
                address: r.replica_address.clone(),
                instance_name: r.replica_name.clone(),
            })),
    )
    .await?;
    Ok(())
}

/// Cancels the replica's snapshot hashing jobs (best effort, as Longhorn's proxy), then removes
/// it from the engine.
pub(super) async fn remove(
    p: &EngineProxy,
    r: EngineReplicaRemoveRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("ReplicaRemove", &engine, true);
    if let Err(e) = cancel_hashes(p, &engine, &r.replica_address).await {
        tracing::warn!(volume = %engine.addr, replica = %r.replica_address, error = %e.message(), "failed to stop snapshot hash");
    }
    call(
        &format!(
            "delete replica {} for volume {}",
            r.replica_address, engine.addr
        ),
        p.controller(&engine)
            .replica_delete(timed(ptypes::ReplicaAddress {
                address: r.replica_address.clone(),
                instance_name: String::new(),
            })),
    )
    .await?;
    Ok(())
}

/// Every snapshot's hashing job on `replica`, cancelled one by one; the failures joined.
async fn cancel_hashes(p: &EngineProxy, engine: &Engine, replica: &str) -> Result<(), Status> {
    let replicas = p.replicas(engine).await?;
    let names = snapshots_info(p, engine, &replicas).await?;
    let addr = ReplicaAddr::parse("replica_address", replica)?;
    let id = engine.id.volume_only();
    let mut failures = Vec::new();
    let mut names: Vec<&String> = names.keys().collect();
    names.sort();
    for name in names {
        if let Err(e) = cancel_hash(p, addr, &id, name).await {
            failures.push(format!(
                "failed to stop snapshot {name} hash: {}",
                e.message()
            ));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Status::unknown(failures.join("; ")))
    }
}

/// The engine's ReplicaUpdate: only RW and ERR can be set (the engine refuses WO), and an
/// ERR replica stays ERR.
pub(super) async fn mode_update(
    p: &EngineProxy,
    r: EngineReplicaModeUpdateRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("ReplicaModeUpdate", &engine, true);
    let mode = ReplicaMode::try_from(r.mode).unwrap_or(ReplicaMode::Err);
    call(
        &format!(
            "update replica {} for volume {}",
            r.replica_address, engine.addr
        ),
        p.controller(&engine)
            .replica_update(timed(ptypes::ControllerReplica {
                address: Some(ptypes::ReplicaAddress {
                    address: r.replica_address.clone(),
                    instance_name: String::new(),
                }),
                mode: mode as i32,
            })),
    )
    .await?;
    Ok(())
}

pub(super) async fn sync_limit_set(
    p: &EngineProxy,
    r: EngineReplicaRebuildConcurrentSyncLimitSetRequest,
) -> Result<Empty, Status> {
    let engine = p.engine(r.proxy_engine_request.as_ref())?;
    logged("ReplicaRebuildConcurrentSyncLimitSet", &engine, true);
    call(
        &format!(
            "set rebuild concurrent sync limit to {} for volume {}",
            r.limit, engine.addr
        ),
        p.controller(&engine)
            .replica_rebuild_concurrent_sync_limit_set(timed(
                ptypes::ReplicaRebuildConcurrentSyncLimitSetRequest { limit: r.limit },
            )),
    )
    .await?;
    Ok(())
}

pub(super) async fn sync_limit_get(
    p: &EngineProxy,
    r: ProxyEngineRequest,
) -> Result<EngineReplicaRebuildConcurrentSyncLimitGetResponse, Status> {
    let engine = p.engine(Some(&r))?;
    logged("ReplicaRebuildConcurrentSyncLimitGet", &engine, false);
    let reply = call(
        &format!(
            "get rebuild concurrent sync limit for volume {}",
            engine.addr
        ),
        p.controller(&engine)
            .replica_rebuild_concurrent_sync_limit_get(timed(())),
    )
    .await?;
    Ok(EngineReplicaRebuildConcurrentSyncLimitGetResponse { limit: reply.limit })
}
