//! A simulated longhorn-engine replica: `ReplicaService` on P and `SyncAgentService` on P+2,
//! holding a real snapshot chain (disk files with metadata) in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use lhnet_proto::ptypes::replica_service_server::{ReplicaService, ReplicaServiceServer};
use lhnet_proto::ptypes::sync_agent_service_server::{SyncAgentService, SyncAgentServiceServer};
use lhnet_proto::ptypes::*;
use tonic::{Request, Response, Status};

/// Longhorn refuses a snapshot beyond this many (`types.MaximumTotalSnapshotCount`).
pub const MAX_SNAPSHOTS: usize = 250;

/// One replica's state, shared by its two services.
#[derive(Clone)]
pub struct SimReplica {
    state: Arc<Mutex<ReplicaState>>,
}

struct ReplicaState {
    size: i64,
    /// Disk file name → metadata; the head is `volume-head-NNN.img`.
    disks: BTreeMap<String, DiskInfo>,
    head: String,
    head_index: u32,
    open: bool,
    rebuilding: bool,
    revision_counter: i64,
}

pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn head_file(index: u32) -> String {
    format!("volume-head-{index:03}.img")
}

fn snap_file(name: &str) -> String {
    format!("volume-snap-{name}.img")
}

impl SimReplica {
    pub fn new(size: i64) -> SimReplica {
        let head = head_file(0);
        let mut disks = BTreeMap::new();
        disks.insert(
            head.clone(),
            DiskInfo {
                name: head.clone(),
                created: now_rfc3339(),
                size: "0".into(),
                ..Default::default()
            },
        );
        SimReplica {
            state: Arc::new(Mutex::new(ReplicaState {
                size,
                disks,
                head,
                head_index: 0,
                open: true,
                rebuilding: false,
                revision_counter: 0,
            })),
        }
    }

    pub fn replica_server(&self) -> ReplicaServiceServer<SimReplica> {
        ReplicaServiceServer::new(self.clone())
    }

    pub fn sync_agent_server(&self) -> SyncAgentServiceServer<SimReplica> {
        SyncAgentServiceServer::new(self.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&mut ReplicaState) -> Result<T, Status>) -> Result<T, Status> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| Status::internal("replica state lock poisoned"))?;
        f(&mut state)
    }

    fn info(&self) -> Result<Replica, Status> {
        self.with(|s| Ok(s.to_proto()))
    }

    /// Snapshot file names, oldest first (for tests).
    pub fn snapshots(&self) -> Vec<String> {
        self.with(|s| Ok(s.chain().into_iter().filter(|d| d != &s.head).collect()))
            .unwrap_or_default()
    }
}

impl ReplicaState {
    /// The chain from the head back to the oldest snapshot.
    fn chain(&self) -> Vec<String> {
        let mut chain = vec![self.head.clone()];
        let mut cur = self
            .disks
            .get(&self.head)
            .map(|d| d.parent.clone())
            .unwrap_or_default();
        while !cur.is_empty() {
            chain.push(cur.clone());
            cur = self
                .disks
                .get(&cur)
                .map(|d| d.parent.clone())
                .unwrap_or_default();
        }
        chain
    }

    fn to_proto(&self) -> Replica {
        let chain = self.chain();
        let snapshots = self.disks.len() - 1;
        Replica {
            dirty: self.revision_counter > 0,
            rebuilding: self.rebuilding,
            head: self.head.clone(),
            parent: self
                .disks
                .get(&self.head)
                .map(|d| d.parent.clone())
                .unwrap_or_default(),
            size: self.size.to_string(),
            sector_size: 512,
            backing_file: String::new(),
            state: match (self.open, self.rebuilding) {
                (_, true) => "rebuilding",
                (true, false) => "open",
                (false, false) => "closed",
            }
            .into(),
            chain,
            disks: self
                .disks
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            remain_snapshots: (MAX_SNAPSHOTS - snapshots.min(MAX_SNAPSHOTS)) as i32,
            revision_counter: self.revision_counter,
            last_modify_time: 0,
            head_file_size: 0,
            revision_counter_disabled: false,
        }
    }

    fn snapshot(
        &mut self,
        name: &str,
        user_created: bool,
        created: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        if self.disks.len() > MAX_SNAPSHOTS {
            return Err(Status::unknown(format!(
                "too many snapshots created: {} snapshots, the limit is {MAX_SNAPSHOTS}",
                self.disks.len() - 1
            )));
        }
        let file = snap_file(name);
        if self.disks.contains_key(&file) {
            return Err(Status::unknown(format!("snapshot {name} already exists")));
        }
        let mut old_head = self.disks.remove(&self.head).unwrap_or_default();
        let parent = old_head.parent.clone();
        if let Some(p) = self.disks.get_mut(&parent) {
            p.children.remove(&self.head);
            p.children.insert(file.clone(), true);
        }
        self.head_index += 1;
        let new_head = head_file(self.head_index);
        old_head.name = file.clone();
        old_head.user_created = user_created;
        old_head.created = if created.is_empty() {
            now_rfc3339()
        } else {
            created.to_string()
        };
        old_head.labels = labels;
        old_head.children = HashMap::from([(new_head.clone(), true)]);
        self.disks.insert(file.clone(), old_head);
        self.disks.insert(
            new_head.clone(),
            DiskInfo {
                name: new_head.clone(),
                parent: file,
                created: now_rfc3339(),
                size: "0".into(),
                ..Default::default()
            },
        );
        self.head = new_head;
        Ok(())
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl ReplicaService for SimReplica {
    async fn replica_create(&self, r: Request<ReplicaCreateRequest>) -> R<ReplicaCreateResponse> {
        let size: i64 = r
            .into_inner()
            .size
            .parse()
            .map_err(|_| Status::invalid_argument("size is not a number"))?;
        self.with(|s| {
            s.size = size;
            Ok(())
        })?;
        Ok(Response::new(ReplicaCreateResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn replica_delete(&self, _r: Request<()>) -> R<()> {
        Ok(Response::new(()))
    }

    async fn replica_get(&self, _r: Request<()>) -> R<ReplicaGetResponse> {
        Ok(Response::new(ReplicaGetResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn replica_open(&self, _r: Request<()>) -> R<ReplicaOpenResponse> {
        self.with(|s| {
            s.open = true;
            Ok(())
        })?;
        Ok(Response::new(ReplicaOpenResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn replica_close(&self, _r: Request<()>) -> R<ReplicaCloseResponse> {
        self.with(|s| {
            s.open = false;
            Ok(())
        })?;
        Ok(Response::new(ReplicaCloseResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn replica_reload(&self, _r: Request<()>) -> R<ReplicaReloadResponse> {
        Ok(Response::new(ReplicaReloadResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn replica_revert(&self, r: Request<ReplicaRevertRequest>) -> R<ReplicaRevertResponse> {
        let name = r.into_inner().name;
        self.with(|s| {
            let file = snap_file(&name);
            if !s.disks.contains_key(&file) {
                return Err(Status::unknown(format!(
                    "cannot find snapshot {name} to revert to"
                )));
            }
            let old_head = s.head.clone();
            s.disks.remove(&old_head);
            for d in s.disks.values_mut() {
                d.children.remove(&old_head);
            }
            s.head_index += 1;
            let head = head_file(s.head_index);
            if let Some(p) = s.disks.get_mut(&file) {
                p.children.insert(head.clone(), true);
            }
            s.disks.insert(
                head.clone(),
                DiskInfo {
                    name: head.clone(),
                    parent: file,
                    created: now_rfc3339(),
                    size: "0".into(),
                    ..Default::default()
                },
            );
            s.head = head;
            Ok(())
        })?;
        Ok(Response::new(ReplicaRevertResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn replica_snapshot(
        &self,
        r: Request<ReplicaSnapshotRequest>,
    ) -> R<ReplicaSnapshotResponse> {
        let r = r.into_inner();
        self.with(|s| s.snapshot(&r.name, r.user_created, &r.created, r.labels))?;
        Ok(Response::new(ReplicaSnapshotResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn replica_expand(&self, r: Request<ReplicaExpandRequest>) -> R<ReplicaExpandResponse> {
        let size = r.into_inner().size;
        self.with(|s| {
            if size < s.size {
                return Err(Status::internal(format!(
                    "{{\"code\": \"FunctionFailedWithoutRollback\", \"message\": \"cannot shrink replica from {} to {size}\", \"rollbackMessage\": \"\"}}",
                    s.size
                )));
            }
            s.size = size;
            Ok(())
        })?;
        Ok(Response::new(ReplicaExpandResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn disk_remove(&self, r: Request<DiskRemoveRequest>) -> R<DiskRemoveResponse> {
        let name = r.into_inner().name;
        self.with(|s| {
            let file = if s.disks.contains_key(&name) {
                name.clone()
            } else {
                snap_file(&name)
            };
            if file == s.head {
                return Err(Status::unknown("cannot remove the volume head"));
            }
            s.disks
                .remove(&file)
                .map(|_| ())
                .ok_or_else(|| Status::unknown(format!("cannot find disk {name}")))
        })?;
        Ok(Response::new(DiskRemoveResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn disk_replace(&self, _r: Request<DiskReplaceRequest>) -> R<DiskReplaceResponse> {
        Err(Status::unimplemented(
            "the simulated replica does not replace disks",
        ))
    }

    async fn disk_prepare_remove(
        &self,
        _r: Request<DiskPrepareRemoveRequest>,
    ) -> R<DiskPrepareRemoveResponse> {
        Ok(Response::new(DiskPrepareRemoveResponse {
            operations: vec![],
        }))
    }

    async fn disk_mark_as_removed(
        &self,
        r: Request<DiskMarkAsRemovedRequest>,
    ) -> R<DiskMarkAsRemovedResponse> {
        let name = r.into_inner().name;
        self.with(|s| {
            let file = if s.disks.contains_key(&name) {
                name.clone()
            } else {
                snap_file(&name)
            };
            if file == s.head || name == "volume-head" {
                return Err(Status::unknown("cannot mark the volume head as removed"));
            }
            match s.disks.get_mut(&file) {
                Some(d) => {
                    d.removed = true;
                    Ok(())
                }
                None => Err(Status::unknown(format!(
                    "cannot find snapshot {name} in replica"
                ))),
            }
        })?;
        Ok(Response::new(DiskMarkAsRemovedResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn rebuilding_set(&self, r: Request<RebuildingSetRequest>) -> R<RebuildingSetResponse> {
        let rebuilding = r.into_inner().rebuilding;
        self.with(|s| {
            s.rebuilding = rebuilding;
            Ok(())
        })?;
        Ok(Response::new(RebuildingSetResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn revision_counter_set(
        &self,
        r: Request<RevisionCounterSetRequest>,
    ) -> R<RevisionCounterSetResponse> {
        let counter = r.into_inner().counter;
        self.with(|s| {
            s.revision_counter = counter;
            Ok(())
        })?;
        Ok(Response::new(RevisionCounterSetResponse {
            replica: Some(self.info()?),
        }))
    }
}

fn not_yet(op: &str) -> Status {
    Status::unimplemented(format!("the simulated sync agent does not do {op} yet"))
}

#[tonic::async_trait]
impl SyncAgentService for SimReplica {
    async fn file_remove(&self, _r: Request<FileRemoveRequest>) -> R<()> {
        Err(not_yet("FileRemove"))
    }
    async fn file_rename(&self, _r: Request<FileRenameRequest>) -> R<()> {
        Err(not_yet("FileRename"))
    }
    async fn file_send(&self, _r: Request<FileSendRequest>) -> R<()> {
        Err(not_yet("FileSend"))
    }
    async fn files_sync(&self, _r: Request<FilesSyncRequest>) -> R<()> {
        Err(not_yet("FilesSync"))
    }
    async fn snapshot_clone(&self, _r: Request<SnapshotCloneRequest>) -> R<()> {
        Err(not_yet("SnapshotClone"))
    }
    async fn volume_export(&self, _r: Request<VolumeExportRequest>) -> R<()> {
        Err(not_yet("VolumeExport"))
    }
    async fn receiver_launch(
        &self,
        _r: Request<ReceiverLaunchRequest>,
    ) -> R<ReceiverLaunchResponse> {
        Err(not_yet("ReceiverLaunch"))
    }
    async fn backup_create(&self, _r: Request<BackupCreateRequest>) -> R<BackupCreateResponse> {
        Err(not_yet("BackupCreate"))
    }
    async fn backup_remove(&self, _r: Request<BackupRemoveRequest>) -> R<()> {
        Err(not_yet("BackupRemove"))
    }
    async fn backup_restore(&self, _r: Request<BackupRestoreRequest>) -> R<()> {
        Err(not_yet("BackupRestore"))
    }
    async fn backup_status(&self, _r: Request<BackupStatusRequest>) -> R<BackupStatusResponse> {
        Err(not_yet("BackupStatus"))
    }
    async fn reset(&self, _r: Request<()>) -> R<()> {
        Ok(Response::new(()))
    }
    /// No restore has run on this replica.
    async fn restore_status(&self, _r: Request<()>) -> R<RestoreStatusResponse> {
        Ok(Response::new(RestoreStatusResponse::default()))
    }
    async fn snapshot_purge(&self, _r: Request<()>) -> R<()> {
        Err(not_yet("SnapshotPurge"))
    }
    /// No purge has run: idle.
    async fn snapshot_purge_status(&self, _r: Request<()>) -> R<SnapshotPurgeStatusResponse> {
        Ok(Response::new(SnapshotPurgeStatusResponse::default()))
    }
    async fn replica_rebuild_status(&self, _r: Request<()>) -> R<ReplicaRebuildStatusResponse> {
        let rebuilding = self.with(|s| Ok(s.rebuilding))?;
        Ok(Response::new(ReplicaRebuildStatusResponse {
            is_rebuilding: rebuilding,
            ..Default::default()
        }))
    }
    async fn snapshot_clone_status(&self, _r: Request<()>) -> R<SnapshotCloneStatusResponse> {
        Ok(Response::new(SnapshotCloneStatusResponse::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_chain_and_limit() {
        let r = SimReplica::new(1 << 20);
        r.with(|s| s.snapshot("a", true, "", HashMap::new()))
            .unwrap();
        r.with(|s| s.snapshot("b", true, "", HashMap::new()))
            .unwrap();
        let info = r.info().unwrap();
        assert_eq!(info.head, "volume-head-002.img");
        assert_eq!(
            info.chain,
            vec![
                "volume-head-002.img",
                "volume-snap-b.img",
                "volume-snap-a.img"
            ]
        );
        assert_eq!(info.disks["volume-snap-b.img"].parent, "volume-snap-a.img");
        assert!(info.disks["volume-snap-a.img"]
            .children
            .contains_key("volume-snap-b.img"));
        for i in 2..MAX_SNAPSHOTS {
            r.with(|s| s.snapshot(&format!("s{i}"), false, "", HashMap::new()))
                .unwrap();
        }
        let err = r
            .with(|s| s.snapshot("one-too-many", false, "", HashMap::new()))
            .unwrap_err();
        assert!(err.message().contains("too many snapshots"), "{err:?}");
        assert!(now_rfc3339().ends_with('Z') && now_rfc3339().len() == 20);
    }
}
