//! A simulated replica's sync agent (`SyncAgentService` on P+2), v1.12.1: file transfer for
//! rebuilds (one worker per source replica, so the engine's concurrent sync limit bounds it)
//! and clones, snapshot purge, snapshot hashing, and the backup calls ([`crate::backup`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use lhnet_proto::ptypes::sync_agent_service_client::SyncAgentServiceClient;
use lhnet_proto::ptypes::sync_agent_service_server::SyncAgentService;
use lhnet_proto::ptypes::*;
use tonic::{Request, Response, Status};

use super::replica::{CloneStatus, RebuildStatus, SimReplica, TaskStatus, RECEIVER_PORTS};
use super::{hash, named, replica_socket};

type R<T> = Result<Response<T>, Status>;

impl SimReplica {
    /// A receiver for one incoming file: the first free port of P+3..=P+12 on the replica's IP,
    /// like longhorn-engine's sync agent; a replica started without a known port uses any.
    async fn receiver(&self, to_host: &str) -> Result<tokio::net::TcpListener, Status> {
        let listen = self.listen.lock().ok().and_then(|l| *l);
        let Some(listen) = listen else {
            return tokio::net::TcpListener::bind((to_host, 0))
                .await
                .map_err(|e| {
                    Status::internal(format!("cannot open a receiver on {to_host}: {e}"))
                });
        };
        for offset in 3..3 + RECEIVER_PORTS {
            let Some(port) = listen.port().checked_add(offset) else {
                break;
            };
            if let Ok(l) = tokio::net::TcpListener::bind((listen.ip(), port)).await {
                return Ok(l);
            }
        }
        Err(Status::unknown("out of ports"))
    }

    /// The sync agent of another replica, asked with `volume` as its volume name.
    async fn remote_agent(
        &self,
        from_address: &str,
    ) -> Result<SyncAgentServiceClient<tonic::transport::Channel>, Status> {
        let source = replica_socket(from_address)?;
        let agent = SocketAddr::new(source.ip(), source.port() + 2);
        SyncAgentServiceClient::connect(format!("http://{agent}"))
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "cannot connect to any remote replica for file sync: {agent}: {e}"
                ))
            })
    }

    /// Pulls one file from the sync agent at `from` into this replica as `to_file`.
    async fn pull_file(
        &self,
        from: &str,
        file: &SyncFileInfo,
        to_host: &str,
        fast: bool,
        volume: &str,
        timeout: i32,
    ) -> Result<(), Status> {
        let mut client = self.remote_agent(from).await?;
        let receiver = self.receiver(to_host).await?;
        let port = receiver
            .local_addr()
            .map_err(|e| Status::internal(e.to_string()))?
            .port();
        let existing = self.with(|s| Ok(s.data.get(&file.to_file_name).cloned()))?;
        let me = self.clone();
        // Files move in parallel: each adds what it received since its last report.
        let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let receive = tokio::spawn(super::sync::receive_disk(
            receiver,
            existing,
            move |got, _| {
                let before = counted.swap(got, Ordering::SeqCst);
                let _ = me.with(|s| {
                    s.rebuild.done += got.saturating_sub(before);
                    Ok(())
                });
            },
        ));
        client
            .file_send(named(
                FileSendRequest {
                    from_file_name: file.from_file_name.clone(),
                    host: to_host.to_string(),
                    port: i32::from(port),
                    fast_sync: fast,
                    file_sync_http_client_timeout: timeout,
                },
                volume,
                "",
            ))
            .await?;
        let (mut meta, data, travelled) = receive
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::data_loss(format!("receiving {}: {e}", file.from_file_name)))?;
        self.received.fetch_add(travelled, Ordering::SeqCst);
        meta.name = file.to_file_name.clone();
        self.with(|s| {
            s.disks.insert(file.to_file_name.clone(), meta);
            s.data.insert(file.to_file_name.clone(), data);
            s.touch(&file.to_file_name);
            Ok(())
        })
    }
}

/// Counts one running transfer into a replica while it lives.
struct Running<'a>(
    &'a (
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    ),
);

impl<'a> Running<'a> {
    fn start(
        counters: &'a (
            std::sync::atomic::AtomicUsize,
            std::sync::atomic::AtomicUsize,
        ),
    ) -> Self {
        let now = counters.0.fetch_add(1, Ordering::SeqCst) + 1;
        counters.1.fetch_max(now, Ordering::SeqCst);
        Running(counters)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl SyncAgentService for SimReplica {
    async fn file_remove(&self, r: Request<FileRemoveRequest>) -> R<()> {
        let name = r.into_inner().file_name;
        self.with(|s| {
            if s.disks.remove(&name).is_none() {
                return Err(Status::unknown(format!(
                    "remove {name}: no such file or directory"
                )));
            }
            s.data.remove(&name);
            Ok(())
        })?;
        Ok(Response::new(()))
    }

    async fn file_rename(&self, r: Request<FileRenameRequest>) -> R<()> {
        let r = r.into_inner();
        self.with(|s| {
            let mut meta = s.disks.remove(&r.old_file_name).ok_or_else(|| {
                Status::unknown(format!(
                    "rename {} {}: no such file or directory",
                    r.old_file_name, r.new_file_name
                ))
            })?;
            meta.name = r.new_file_name.clone();
            s.disks.insert(r.new_file_name.clone(), meta);
            if let Some(d) = s.data.remove(&r.old_file_name) {
                s.data.insert(r.new_file_name.clone(), d);
            }
            Ok(())
        })?;
        Ok(Response::new(()))
    }

    /// Sends one disk file (metadata and bytes) to a receiver at host:port over TCP.
    async fn file_send(&self, r: Request<FileSendRequest>) -> R<()> {
        let r = r.into_inner();
        let (meta, data) = self.with(|s| {
            let meta = s.disks.get(&r.from_file_name).cloned().ok_or_else(|| {
                Status::not_found(format!("cannot find disk file {}", r.from_file_name))
            })?;
            Ok((
                meta,
                s.data.get(&r.from_file_name).cloned().unwrap_or_default(),
            ))
        })?;
        let port = u16::try_from(r.port)
            .map_err(|_| Status::invalid_argument(format!("bad port {}", r.port)))?;
        super::sync::send_disk(
            &r.host,
            port,
            &meta,
            &data,
            self.sync_rate.load(Ordering::Relaxed),
            r.fast_sync,
        )
        .await
        .map_err(|e| {
            Status::unavailable(format!(
                "failed to send {} to {}:{port}: {e}",
                r.from_file_name, r.host
            ))
        })?;
        Ok(Response::new(()))
    }

    /// Pulls every listed file from the source replicas: one worker per source (at most one
    /// per file), each taking the next file, so the sources the engine allows bound how many
    /// files move at once.
    async fn files_sync(&self, r: Request<FilesSyncRequest>) -> R<()> {
        let r = r.into_inner();
        let mut sources: Vec<String> = r.from_address_map.keys().cloned().collect();
        sources.sort();
        if sources.is_empty() && !r.from_address.is_empty() {
            sources.push(r.from_address.clone());
        }
        let total: u64 = r
            .sync_file_info_list
            .iter()
            .map(|f| f.actual_size.max(0) as u64)
            .sum();
        self.with(|s| {
            if s.purge.running {
                return Err(Status::unknown("replica is purging snapshots"));
            }
            if s.rebuild.running {
                return Err(Status::unknown("replica is already rebuilding"));
            }
            s.rebuild = RebuildStatus {
                running: true,
                done: 0,
                total,
                error: String::new(),
                state: "in_progress".into(),
                from: sources.clone(),
            };
            Ok(())
        })?;
        // A local copy (same node) is tried first in Longhorn; the simulator's replicas share
        // no host path, so it falls back to the remote sync, as Longhorn does when it fails.
        let workers = sources.len().min(r.sync_file_info_list.len());
        let result = if workers < 1 {
            Err(Status::unknown("no files or remote replicas for sync"))
        } else {
            let queue = Arc::new(Mutex::new(
                r.sync_file_info_list
                    .iter()
                    .cloned()
                    .collect::<VecDeque<_>>(),
            ));
            let failures = Arc::new(Mutex::new(Vec::new()));
            let volume = self.volume.to_string();
            let runs = sources.iter().take(workers).map(|from| {
                let queue = queue.clone();
                let failures = failures.clone();
                let (to_host, volume) = (r.to_host.clone(), volume.clone());
                async move {
                    loop {
                        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                        let Some(file) = next else { break };
                        let _running = Running::start(&self.syncs);
                        if let Err(e) = self
                            .pull_file(
                                from,
                                &file,
                                &to_host,
                                r.fast_sync,
                                &volume,
                                r.file_sync_http_client_timeout,
                            )
                            .await
                        {
                            if let Ok(mut f) = failures.lock() {
                                f.push(format!(
                                    "{} from {from}: {}",
                                    file.from_file_name,
                                    e.message()
                                ));
                            }
                        }
                    }
                }
            });
            futures_util::future::join_all(runs).await;
            let failures = failures.lock().map(|f| f.clone()).unwrap_or_default();
            if failures.is_empty() {
                Ok(())
            } else {
                Err(Status::unknown(format!(
                    "some files failed to sync: {failures:?}"
                )))
            }
        };
        self.with(|s| {
            s.rebuild.running = false;
            match &result {
                Ok(()) => {
                    s.rebuild.done = s.rebuild.total;
                    s.rebuild.state = "complete".into();
                }
                Err(e) => {
                    s.rebuild.state = "error".into();
                    s.rebuild.error = e.message().to_string();
                }
            }
            Ok(())
        })?;
        result?;
        Ok(Response::new(()))
    }

    /// Pulls the source's volume as of a snapshot and keeps it here as that snapshot, the new
    /// head on top of it.
    async fn snapshot_clone(&self, r: Request<SnapshotCloneRequest>) -> R<()> {
        let r = r.into_inner();
        self.with(|s| {
            if s.clone.running {
                return Err(Status::unknown(format!(
                    "replica is cloning snapshot {} from replica address {}",
                    s.clone.snapshot, s.clone.from
                )));
            }
            s.clone = CloneStatus {
                running: true,
                progress: 0,
                state: "in_progress".into(),
                error: String::new(),
                from: r.from_address.clone(),
                snapshot: r.snapshot_file_name.clone(),
            };
            Ok(())
        })?;
        let result = async {
            let mut client = self.remote_agent(&r.from_address).await?;
            let receiver = self.receiver(&r.to_host).await?;
            let port = receiver
                .local_addr()
                .map_err(|e| Status::internal(e.to_string()))?
                .port();
            let me = self.clone();
            let receive = tokio::spawn(super::sync::receive_disk(
                receiver,
                None,
                move |got, total| {
                    let _ = me.with(|s| {
                        s.clone.progress = (got * 99 / total.max(1)) as i32;
                        Ok(())
                    });
                },
            ));
            client
                .volume_export(named(
                    VolumeExportRequest {
                        snapshot_file_name: r.snapshot_file_name.clone(),
                        host: r.to_host.clone(),
                        port: i32::from(port),
                        export_backing_image_if_exist: r.export_backing_image_if_exist,
                        file_sync_http_client_timeout: r.file_sync_http_client_timeout,
                    },
                    &r.from_volume_name,
                    "",
                ))
                .await
                .map_err(|e| {
                    Status::unknown(format!(
                        "failed to export snapshot {} from replica {} to {}:{port}: {}",
                        r.snapshot_file_name,
                        r.from_address,
                        r.to_host,
                        e.message()
                    ))
                })?;
            let (_, data, _) = receive
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::data_loss(format!("receiving the clone: {e}")))?;
            self.with(|s| {
                let file = super::replica::snap_file(&r.snapshot_file_name);
                s.disks.insert(
                    file.clone(),
                    DiskInfo {
                        name: file.clone(),
                        created: super::now_rfc3339(),
                        size: data.len().to_string(),
                        ..Default::default()
                    },
                );
                s.data.insert(file.clone(), data);
                s.touch(&file);
                s.reload();
                s.revert(&file)
            })
        }
        .await;
        self.with(|s| {
            s.clone.running = false;
            s.clone.progress = if result.is_ok() {
                100
            } else {
                s.clone.progress
            };
            s.clone.state = if result.is_ok() { "complete" } else { "error" }.into();
            s.clone.error = result
                .as_ref()
                .err()
                .map(|e| e.message().to_string())
                .unwrap_or_default();
            Ok(())
        })?;
        result?;
        Ok(Response::new(()))
    }

    /// Sends the volume as it was at a snapshot (that layer and its ancestors, flattened).
    async fn volume_export(&self, r: Request<VolumeExportRequest>) -> R<()> {
        let r = r.into_inner();
        let (meta, data) = self.with(|s| s.flatten(&r.snapshot_file_name))?;
        let port = u16::try_from(r.port)
            .map_err(|_| Status::invalid_argument(format!("bad port {}", r.port)))?;
        super::sync::send_disk(
            &r.host,
            port,
            &meta,
            &data,
            self.sync_rate.load(Ordering::Relaxed),
            false,
        )
        .await
        .map_err(|e| {
            Status::unavailable(format!(
                "failed to export {} to {}:{port}: {e}",
                r.snapshot_file_name, r.host
            ))
        })?;
        Ok(Response::new(()))
    }

    /// Opens a receiver for one file and answers its port; the file lands as `to_file_name`.
    async fn receiver_launch(
        &self,
        r: Request<ReceiverLaunchRequest>,
    ) -> R<ReceiverLaunchResponse> {
        let to = r.into_inner().to_file_name;
        let listen = self.listen.lock().ok().and_then(|l| *l);
        let host = listen
            .map(|l| l.ip().to_string())
            .unwrap_or_else(|| "127.0.0.1".into());
        let receiver = self.receiver(&host).await?;
        let port = receiver
            .local_addr()
            .map_err(|e| Status::internal(e.to_string()))?
            .port();
        let me = self.clone();
        tokio::spawn(async move {
            match super::sync::receive_disk(receiver, None, |_, _| {}).await {
                Ok((mut meta, data, _)) => {
                    meta.name = to.clone();
                    let _ = me.with(|s| {
                        s.disks.insert(to.clone(), meta);
                        s.data.insert(to.clone(), data);
                        s.touch(&to);
                        Ok(())
                    });
                }
                Err(e) => eprintln!("sync agent receiver for {to}: {e}"),
            }
        });
        Ok(Response::new(ReceiverLaunchResponse {
            port: i32::from(port),
        }))
    }

    async fn backup_create(&self, r: Request<BackupCreateRequest>) -> R<BackupCreateResponse> {
        super::backup::create(self, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn backup_remove(&self, r: Request<BackupRemoveRequest>) -> R<()> {
        super::backup::remove(r.into_inner())
            .await
            .map(Response::new)
    }

    async fn backup_restore(&self, r: Request<BackupRestoreRequest>) -> R<()> {
        super::backup::restore(self, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn backup_status(&self, r: Request<BackupStatusRequest>) -> R<BackupStatusResponse> {
        super::backup::status(self, &r.into_inner().backup).map(Response::new)
    }

    async fn reset(&self, _r: Request<()>) -> R<()> {
        super::backup::reset(self).map(Response::new)
    }

    async fn restore_status(&self, _r: Request<()>) -> R<RestoreStatusResponse> {
        super::backup::restore_status(self).map(Response::new)
    }

    /// Marks the system snapshots removed, then coalesces the removed ones in the background,
    /// one disk at a time.
    async fn snapshot_purge(&self, _r: Request<()>) -> R<()> {
        let todo = self.with(|s| {
            if s.purge.running {
                return Err(Status::unknown("replica is already purging snapshots"));
            }
            if s.rebuilding {
                return Err(Status::unknown(
                    "cannot purge snapshots while the replica is rebuilding",
                ));
            }
            let head = s.head.clone();
            for (name, d) in s.disks.iter_mut() {
                if *name != head && !d.user_created {
                    d.removed = true;
                }
            }
            s.purge = TaskStatus {
                running: true,
                progress: 0,
                state: "in_progress".into(),
                error: String::new(),
            };
            Ok(s.purgeable())
        })?;
        let replica = self.clone();
        tokio::spawn(async move {
            let total = todo.len().max(1);
            for (i, disk) in todo.iter().enumerate() {
                // Coalescing takes time on a real disk; progress shows it.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let _ = replica.with(|s| {
                    s.coalesce(disk);
                    s.purge.progress = ((i + 1) * 100 / total) as i32;
                    Ok(())
                });
            }
            let _ = replica.with(|s| {
                s.purge = TaskStatus {
                    running: false,
                    progress: 100,
                    state: "complete".into(),
                    error: String::new(),
                };
                Ok(())
            });
        });
        Ok(Response::new(()))
    }

    async fn snapshot_purge_status(&self, _r: Request<()>) -> R<SnapshotPurgeStatusResponse> {
        let p = self.with(|s| Ok(s.purge.clone()))?;
        Ok(Response::new(SnapshotPurgeStatusResponse {
            is_purging: p.running,
            error: p.error,
            progress: p.progress,
            state: p.state,
        }))
    }

    async fn replica_rebuild_status(&self, _r: Request<()>) -> R<ReplicaRebuildStatusResponse> {
        let b = self.with(|s| Ok(s.rebuild.clone()))?;
        let progress = match (b.done * 100).checked_div(b.total) {
            Some(p) => p.min(100) as i32,
            None if b.running => 0,
            None => 100,
        };
        Ok(Response::new(ReplicaRebuildStatusResponse {
            is_rebuilding: b.running,
            progress,
            error: b.error,
            state: b.state,
            from_replica_address: String::new(),
            from_replica_address_list: b.from,
        }))
    }

    async fn snapshot_clone_status(&self, _r: Request<()>) -> R<SnapshotCloneStatusResponse> {
        let c = self.with(|s| Ok(s.clone.clone()))?;
        Ok(Response::new(SnapshotCloneStatusResponse {
            is_cloning: c.running,
            error: c.error,
            progress: c.progress,
            state: c.state,
            from_replica_address: c.from,
            snapshot_name: c.snapshot,
        }))
    }

    async fn snapshot_hash(&self, r: Request<SnapshotHashRequest>) -> R<()> {
        let r = r.into_inner();
        hash::start(self, &r.snapshot_name, r.rehash)?;
        Ok(Response::new(()))
    }

    async fn snapshot_hash_status(
        &self,
        r: Request<SnapshotHashStatusRequest>,
    ) -> R<SnapshotHashStatusResponse> {
        let (state, checksum, error, silently_corrupted) =
            hash::status(self, &r.into_inner().snapshot_name)?;
        Ok(Response::new(SnapshotHashStatusResponse {
            state,
            checksum,
            error,
            silently_corrupted,
        }))
    }

    async fn snapshot_hash_cancel(&self, r: Request<SnapshotHashCancelRequest>) -> R<()> {
        hash::cancel(self, &r.into_inner().snapshot_name)?;
        Ok(Response::new(()))
    }

    async fn snapshot_hash_lock_state(&self, _r: Request<()>) -> R<SnapshotHashLockStateResponse> {
        Ok(Response::new(SnapshotHashLockStateResponse {
            is_locked: hash::node_locked(self),
        }))
    }
}
