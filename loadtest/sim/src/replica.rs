//! A simulated longhorn-engine replica (v1.12.1): its state — a real snapshot chain of disk
//! files with metadata and bytes, in memory — and `ReplicaService` on P. The sync agent on
//! P+2 ([`crate::agent`]) works on the same state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lhnet_proto::ptypes::replica_service_server::{ReplicaService, ReplicaServiceServer};
use lhnet_proto::ptypes::sync_agent_service_server::SyncAgentServiceServer;
use lhnet_proto::ptypes::*;
use tonic::{Request, Response, Status};

use super::dataconn::Block;
use super::guard::Record;
use super::{now_rfc3339, ReplicaSpec};

/// Longhorn's limit on disks in a chain and default snapshot count limit
/// (`types.MaximumTotalSnapshotCount`).
pub const MAX_SNAPSHOTS: usize = 250;

/// One replica's state, shared by its services.
#[derive(Clone)]
pub struct SimReplica {
    pub(crate) state: Arc<Mutex<ReplicaState>>,
    /// Where ReplicaService listens (P); receivers open on P+3..=P+12 of the same IP.
    pub(crate) listen: Arc<Mutex<Option<std::net::SocketAddr>>>,
    /// Bytes per second this replica's sync agent sends at (0: as fast as TCP goes).
    pub(crate) sync_rate: Arc<AtomicU64>,
    /// Bytes per second it hashes at (0: as fast as it can).
    pub(crate) hash_rate: Arc<AtomicU64>,
    /// File transfers into this replica running now, and the most at once.
    pub(crate) syncs: Arc<(AtomicUsize, AtomicUsize)>,
    /// Bytes that travelled into this replica in rebuilds (less than the files with fast sync).
    pub(crate) received: Arc<AtomicU64>,
    pub(crate) volume: Arc<str>,
    pub(crate) release: super::Release,
    /// Held while a snapshot of this replica's node is hashed.
    pub(crate) node_lock: super::hash::NodeLock,
    record: Record,
}

/// How many receiver ports follow P+2 (longhorn-engine's `--sync-agent-port-count`).
pub(crate) const RECEIVER_PORTS: u16 = 10;

pub(crate) struct ReplicaState {
    pub size: i64,
    /// Disk file name → metadata; the head is `volume-head-NNN.img`.
    pub disks: BTreeMap<String, DiskInfo>,
    /// Disk file name → the bytes written while that disk was the head, from offset 0.
    pub data: HashMap<String, Vec<u8>>,
    /// Disk file name → when its bytes last changed (a ctime: a counter of this replica).
    pub changed: HashMap<String, u64>,
    pub clock: u64,
    pub head: String,
    pub head_index: u32,
    pub open: bool,
    pub rebuilding: bool,
    pub revision_counter: i64,
    pub snapshot_max_count: i32,
    pub snapshot_max_size: i64,
    pub unmap_mark_disk_chain_removed: bool,
    pub rebuild: RebuildStatus,
    pub purge: TaskStatus,
    pub clone: CloneStatus,
    /// Backups this replica made (name → status), as its sync agent reports them.
    pub backups: HashMap<String, BackupProgress>,
    pub restore: RestoreInfo,
    pub hashes: super::hash::Hashes,
}

/// A background task's status (purge).
#[derive(Clone, Default)]
pub(crate) struct TaskStatus {
    pub running: bool,
    pub progress: i32,
    pub state: String,
    pub error: String,
}

/// This replica's rebuild as a target: bytes received and expected, and from whom.
#[derive(Clone, Default)]
pub(crate) struct RebuildStatus {
    pub running: bool,
    pub done: u64,
    pub total: u64,
    pub error: String,
    pub state: String,
    pub from: Vec<String>,
}

#[derive(Clone, Default)]
pub(crate) struct BackupProgress {
    pub progress: i32,
    pub state: String,
    pub url: String,
    pub error: String,
    pub snapshot: String,
}

#[derive(Clone, Default)]
pub(crate) struct CloneStatus {
    pub running: bool,
    pub progress: i32,
    pub state: String,
    pub error: String,
    pub from: String,
    pub snapshot: String,
}

/// The sync agent's restore record (`RestoreInfo`).
#[derive(Clone, Default)]
pub(crate) struct RestoreInfo {
    pub restoring: bool,
    pub progress: i32,
    pub error: String,
    pub state: String,
    pub backup_url: String,
    /// The snapshot disk the restore ends in (`dest_file_name`).
    pub snapshot_disk: String,
    /// The last backup restored to completion (what an incremental restore starts from).
    pub last_restored: String,
    pub current: String,
}

pub(crate) fn head_file(index: u32) -> String {
    format!("volume-head-{index:03}.img")
}

pub(crate) fn snap_file(name: &str) -> String {
    if name.starts_with("volume-snap-") && name.ends_with(".img") {
        name.to_string()
    } else {
        format!("volume-snap-{name}.img")
    }
}

/// A snapshot's name from its disk file (`volume-snap-X.img` → `X`).
pub(crate) fn snapshot_name(file: &str) -> String {
    file.strip_prefix("volume-snap-")
        .and_then(|f| f.strip_suffix(".img"))
        .unwrap_or(file)
        .to_string()
}

// === impl SimReplica ===

impl SimReplica {
    /// A new replica process: empty head, closed until an engine opens it.
    pub fn new(spec: &ReplicaSpec) -> SimReplica {
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
                size: spec.size,
                disks,
                data: HashMap::new(),
                changed: HashMap::new(),
                clock: 0,
                head,
                head_index: 0,
                open: false,
                rebuilding: false,
                revision_counter: 0,
                snapshot_max_count: MAX_SNAPSHOTS as i32,
                snapshot_max_size: 0,
                unmap_mark_disk_chain_removed: false,
                rebuild: RebuildStatus::default(),
                purge: TaskStatus::default(),
                clone: CloneStatus::default(),
                backups: HashMap::new(),
                restore: RestoreInfo::default(),
                hashes: Default::default(),
            })),
            listen: Arc::new(Mutex::new(None)),
            sync_rate: Arc::new(AtomicU64::new(0)),
            hash_rate: Arc::new(AtomicU64::new(0)),
            syncs: Arc::new((AtomicUsize::new(0), AtomicUsize::new(0))),
            received: Arc::new(AtomicU64::new(0)),
            volume: spec.volume.as_str().into(),
            release: spec.release,
            node_lock: Default::default(),
            record: Record::default(),
        }
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Records the ReplicaService address, which fixes the receiver port range.
    pub(crate) fn set_listen(&self, addr: std::net::SocketAddr) {
        if let Ok(mut l) = self.listen.lock() {
            *l = Some(addr);
        }
    }

    /// Limits how fast this replica's sync agent sends files (0: no limit).
    pub fn set_sync_rate(&self, bytes_per_sec: u64) {
        self.sync_rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Limits how fast this replica hashes snapshots (0: no limit), so a test can watch and
    /// cancel a hash.
    pub fn set_hash_rate(&self, bytes_per_sec: u64) {
        self.hash_rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Rebuild progress as a target: (bytes received, bytes expected).
    pub fn rebuild_progress(&self) -> (u64, u64) {
        self.with(|s| Ok((s.rebuild.done, s.rebuild.total)))
            .unwrap_or_default()
    }

    /// The most file transfers into this replica that ran at once (a rebuild's concurrency).
    pub fn max_parallel_syncs(&self) -> usize {
        self.syncs.1.load(Ordering::SeqCst)
    }

    /// Bytes that came into this replica over rebuild transfers so far.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    pub fn replica_server(&self) -> ReplicaServiceServer<SimReplica> {
        ReplicaServiceServer::new(self.clone())
    }

    pub fn sync_agent_server(&self) -> SyncAgentServiceServer<SimReplica> {
        SyncAgentServiceServer::new(self.clone())
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut ReplicaState) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| Status::internal("replica state lock poisoned"))?;
        f(&mut state)
    }

    pub(crate) fn info(&self) -> Result<Replica, Status> {
        self.with(|s| Ok(s.to_proto()))
    }

    /// Applies a change and answers the replica as it stands after it, under one lock.
    fn changed(
        &self,
        f: impl FnOnce(&mut ReplicaState) -> Result<(), Status>,
    ) -> Result<Option<Replica>, Status> {
        self.with(|s| {
            f(s)?;
            Ok(Some(s.to_proto()))
        })
    }

    /// Writes bytes into the head at `offset`, as the engine's data path does.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), Status> {
        self.with(|s| {
            if !s.open {
                return Err(Status::unavailable("replica is not open"));
            }
            let head = s.head.clone();
            s.write_into(&head, offset, bytes)?;
            s.revision_counter += 1;
            Ok(())
        })
    }

    /// What a reader sees at `offset..offset+len`: the newest layer that holds each byte.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        self.with(|s| {
            let mut out = vec![0u8; len];
            let mut filled = vec![false; len];
            for disk in s.chain() {
                let Some(data) = s.data.get(&disk) else {
                    continue;
                };
                for i in 0..len {
                    if !filled[i] && offset + i < data.len() && data[offset + i] != 0 {
                        out[i] = data[offset + i];
                        filled[i] = true;
                    }
                }
            }
            Ok(out)
        })
        .unwrap_or_default()
    }

    /// What ReplicaGet answers now (for tests).
    pub fn inspect(&self) -> Replica {
        self.info().unwrap_or_default()
    }

    /// A snapshot's hashing state: (state, checksum, error, silently corrupted) (for tests).
    pub fn hash_state(&self, snapshot: &str) -> (String, String, String, bool) {
        super::hash::status(self, snapshot).unwrap_or_default()
    }

    /// Snapshot file names, oldest first (for tests).
    pub fn snapshots(&self) -> Vec<String> {
        self.with(|s| {
            Ok(s.chain()
                .into_iter()
                .filter(|d| d != &s.head)
                .rev()
                .collect())
        })
        .unwrap_or_default()
    }

    /// Changes a byte of a snapshot's file without touching its change time: what silent
    /// corruption on a disk looks like (for tests of snapshot hashing).
    pub fn corrupt(&self, snapshot: &str, offset: usize) {
        let _ = self.with(|s| {
            if let Some(d) = s.data.get_mut(&snap_file(snapshot)) {
                if let Some(b) = d.get_mut(offset) {
                    *b ^= 0xff;
                }
            }
            Ok(())
        });
    }
}

/// The replica's data server (port P+1): block reads and writes on the live chain.
impl Block for SimReplica {
    async fn read_at(&self, offset: i64, len: u32) -> Result<Vec<u8>, String> {
        let size = self
            .with(|s| Ok(s.size))
            .map_err(|e| e.message().to_string())?;
        if offset < 0 || offset.saturating_add(i64::from(len)) > size {
            return Err(format!(
                "read of {len} bytes at {offset} is outside the replica (size {size})"
            ));
        }
        Ok(self.read(offset as usize, len as usize))
    }

    async fn write_at(&self, offset: i64, data: Vec<u8>) -> Result<(), String> {
        let offset = usize::try_from(offset).map_err(|_| format!("negative offset {offset}"))?;
        self.write(offset, &data)
            .map_err(|e| e.message().to_string())
    }
}

// === impl ReplicaState ===

impl ReplicaState {
    /// The chain from the head back to the oldest snapshot.
    pub fn chain(&self) -> Vec<String> {
        let mut chain = vec![self.head.clone()];
        let mut cur = self
            .disks
            .get(&self.head)
            .map(|d| d.parent.clone())
            .unwrap_or_default();
        while !cur.is_empty() && !chain.contains(&cur) {
            chain.push(cur.clone());
            cur = self
                .disks
                .get(&cur)
                .map(|d| d.parent.clone())
                .unwrap_or_default();
        }
        chain
    }

    /// Marks a disk's bytes changed now.
    pub fn touch(&mut self, disk: &str) {
        self.clock += 1;
        self.changed.insert(disk.to_string(), self.clock);
    }

    /// Writes `bytes` at `offset` of disk file `disk`, within the replica's size.
    pub fn write_into(&mut self, disk: &str, offset: usize, bytes: &[u8]) -> Result<(), Status> {
        let end = offset + bytes.len();
        if end as i64 > self.size {
            return Err(Status::out_of_range(format!(
                "write of {} bytes at {offset} is past the volume size {}",
                bytes.len(),
                self.size
            )));
        }
        let data = self.data.entry(disk.to_string()).or_default();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset..end].copy_from_slice(bytes);
        let len = data.len();
        if let Some(d) = self.disks.get_mut(disk) {
            d.size = len.to_string();
        }
        self.touch(disk);
        Ok(())
    }

    /// Snapshots that count against the limit: not removed, not the head.
    fn counted(&self) -> impl Iterator<Item = (&String, &DiskInfo)> {
        self.disks
            .iter()
            .filter(|(k, d)| **k != self.head && !d.removed)
    }

    pub fn state_name(&self) -> &'static str {
        match (self.open, self.rebuilding) {
            (true, true) => "rebuilding",
            (true, false) if self.revision_counter > 0 => "dirty",
            (true, false) => "open",
            (false, _) => "closed",
        }
    }

    pub fn to_proto(&self) -> Replica {
        let chain = self.chain();
        let usage = self.counted().count() as i32;
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
            state: self.state_name().into(),
            chain,
            disks: self
                .disks
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            remain_snapshots: (self.snapshot_max_count - usage).max(0),
            revision_counter: self.revision_counter,
            last_modify_time: 0,
            head_file_size: self.data.get(&self.head).map_or(0, |d| d.len() as i64),
            revision_counter_disabled: false,
            unmap_mark_disk_chain_removed: self.unmap_mark_disk_chain_removed,
            snapshot_count_usage: usage,
            snapshot_size_usage: self
                .counted()
                .map(|(k, _)| self.data.get(k).map_or(0, |d| d.len() as i64))
                .sum(),
            snapshot_count_total: self.disks.len() as i32,
        }
    }

    /// The volume as of a snapshot: that layer and its ancestors, flattened (newer bytes win).
    pub fn flatten(&self, snapshot: &str) -> Result<(DiskInfo, Vec<u8>), Status> {
        let file = snap_file(snapshot);
        let meta = self
            .disks
            .get(&file)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("cannot find snapshot {snapshot}")))?;
        let mut layers = vec![file.clone()];
        let mut cur = meta.parent.clone();
        while !cur.is_empty() && !layers.contains(&cur) {
            layers.push(cur.clone());
            cur = self
                .disks
                .get(&cur)
                .map(|d| d.parent.clone())
                .unwrap_or_default();
        }
        let len = layers
            .iter()
            .filter_map(|l| self.data.get(l))
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let mut flat = vec![0u8; len];
        for layer in layers.iter().rev() {
            if let Some(d) = self.data.get(layer) {
                for (i, b) in d.iter().enumerate() {
                    if *b != 0 {
                        flat[i] = *b;
                    }
                }
            }
        }
        Ok((meta, flat))
    }

    /// Removed snapshots whose child is another snapshot, oldest first: what a purge coalesces
    /// (the snapshot behind the live head stays).
    pub fn purgeable(&self) -> Vec<String> {
        let mut chain = self.chain();
        chain.reverse();
        chain
            .into_iter()
            .filter(|d| self.disks.get(d).is_some_and(|i| i.removed))
            .filter(|d| {
                self.disks
                    .get(d)
                    .is_some_and(|i| i.children.keys().all(|c| *c != self.head))
            })
            .collect()
    }

    /// Folds a removed snapshot into its child: the child's bytes win, the parent's fill gaps.
    pub fn coalesce(&mut self, removed: &str) {
        let Some(info) = self.disks.remove(removed) else {
            return;
        };
        let parent_data = self.data.remove(removed).unwrap_or_default();
        for child in info.children.keys() {
            let child_data = self.data.entry(child.clone()).or_default();
            if child_data.len() < parent_data.len() {
                child_data.resize(parent_data.len(), 0);
            }
            for (i, b) in parent_data.iter().enumerate() {
                if child_data[i] == 0 {
                    child_data[i] = *b;
                }
            }
            let len = child_data.len();
            if let Some(c) = self.disks.get_mut(child) {
                c.parent = info.parent.clone();
                c.size = len.to_string();
            }
            if let Some(p) = self.disks.get_mut(&info.parent) {
                p.children.remove(removed);
                p.children.insert(child.clone(), true);
            }
            self.touch(child);
        }
    }

    /// The head becomes snapshot `name`; a new, empty head follows it.
    pub fn snapshot(
        &mut self,
        name: &str,
        user_created: bool,
        created: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        if name.is_empty() {
            return Err(Status::unknown("cannot accept empty snapshot name"));
        }
        if created.is_empty() {
            return Err(Status::unknown("need to specific created time"));
        }
        let active = self.counted().count() as i32;
        if self.snapshot_max_count - active <= 0 {
            return Err(Status::unknown(format!("too many active disks: {active}")));
        }
        let file = snap_file(name);
        if self.disks.contains_key(&file) {
            return Err(Status::unknown(format!(
                "snapshot {file} is already existing"
            )));
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
        old_head.created = created.to_string();
        old_head.labels = labels;
        old_head.children = HashMap::from([(new_head.clone(), true)]);
        self.disks.insert(file.clone(), old_head);
        let old = self.head.clone();
        if let Some(bytes) = self.data.remove(&old) {
            if let Some(d) = self.disks.get_mut(&file) {
                d.size = bytes.len().to_string();
            }
            self.data.insert(file.clone(), bytes);
        }
        if let Some(at) = self.changed.remove(&old) {
            self.changed.insert(file.clone(), at);
        }
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

    /// A new, empty head whose parent is snapshot disk `file`; the old head goes.
    pub fn revert(&mut self, file: &str) -> Result<(), Status> {
        if !self.disks.contains_key(file) {
            return Err(Status::unknown(format!(
                "cannot find snapshot {file} to revert to"
            )));
        }
        let old_head = self.head.clone();
        self.disks.remove(&old_head);
        self.data.remove(&old_head);
        for d in self.disks.values_mut() {
            d.children.remove(&old_head);
        }
        self.head_index += 1;
        let head = head_file(self.head_index);
        if let Some(p) = self.disks.get_mut(file) {
            p.children.insert(head.clone(), true);
        }
        self.disks.insert(
            head.clone(),
            DiskInfo {
                name: head.clone(),
                parent: file.to_string(),
                created: now_rfc3339(),
                size: "0".into(),
                ..Default::default()
            },
        );
        self.head = head;
        Ok(())
    }

    /// Rebuilds the children links from the parents, as loading the `.meta` files does.
    pub fn reload(&mut self) {
        let parents: Vec<(String, String)> = self
            .disks
            .iter()
            .map(|(k, d)| (k.clone(), d.parent.clone()))
            .collect();
        for d in self.disks.values_mut() {
            d.children.clear();
        }
        for (child, parent) in parents {
            if let Some(p) = self.disks.get_mut(&parent) {
                p.children.insert(child, true);
            }
        }
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
        let replica = self.changed(|s| {
            s.size = size;
            s.open = true;
            Ok(())
        })?;
        Ok(Response::new(ReplicaCreateResponse { replica }))
    }

    async fn replica_delete(&self, _r: Request<()>) -> R<()> {
        Ok(Response::new(()))
    }

    async fn replica_get(&self, _r: Request<()>) -> R<ReplicaGetResponse> {
        Ok(Response::new(ReplicaGetResponse {
            replica: Some(self.info()?),
        }))
    }

    async fn replica_open(&self, _r: Request<ReplicaOpenRequest>) -> R<ReplicaOpenResponse> {
        let replica = self.changed(|s| {
            if s.open {
                return Err(Status::unknown("replica is already open"));
            }
            s.open = true;
            Ok(())
        })?;
        Ok(Response::new(ReplicaOpenResponse { replica }))
    }

    async fn replica_close(&self, _r: Request<()>) -> R<ReplicaCloseResponse> {
        let replica = self.changed(|s| {
            s.open = false;
            Ok(())
        })?;
        Ok(Response::new(ReplicaCloseResponse { replica }))
    }

    async fn replica_reload(&self, _r: Request<()>) -> R<ReplicaReloadResponse> {
        let replica = self.changed(|s| {
            s.reload();
            Ok(())
        })?;
        Ok(Response::new(ReplicaReloadResponse { replica }))
    }

    async fn replica_revert(&self, r: Request<ReplicaRevertRequest>) -> R<ReplicaRevertResponse> {
        let r = r.into_inner();
        if r.name.is_empty() {
            return Err(Status::unknown("cannot accept empty snapshot name"));
        }
        if r.created.is_empty() {
            return Err(Status::unknown("need to specific created time"));
        }
        let replica = self.changed(|s| s.revert(&snap_file(&r.name)))?;
        Ok(Response::new(ReplicaRevertResponse { replica }))
    }

    async fn replica_snapshot(
        &self,
        r: Request<ReplicaSnapshotRequest>,
    ) -> R<ReplicaSnapshotResponse> {
        let r = r.into_inner();
        let replica =
            self.changed(|s| s.snapshot(&r.name, r.user_created, &r.created, r.labels))?;
        Ok(Response::new(ReplicaSnapshotResponse { replica }))
    }

    async fn replica_expand(&self, r: Request<ReplicaExpandRequest>) -> R<ReplicaExpandResponse> {
        let size = r.into_inner().size;
        let replica = self.changed(|s| {
            if size < s.size {
                return Err(Status::internal(format!(
                    "{{\"code\": \"FunctionFailedWithoutRollback\", \"message\": \"cannot shrink replica from {} to {size}\", \"rollbackMessage\": \"\"}}",
                    s.size
                )));
            }
            s.size = size;
            Ok(())
        })?;
        Ok(Response::new(ReplicaExpandResponse { replica }))
    }

    async fn disk_remove(&self, r: Request<DiskRemoveRequest>) -> R<DiskRemoveResponse> {
        let name = r.into_inner().name;
        let replica = self.changed(|s| {
            let file = if s.disks.contains_key(&name) {
                name.clone()
            } else {
                snap_file(&name)
            };
            if file == s.head {
                return Err(Status::unknown("cannot remove the volume head"));
            }
            s.data.remove(&file);
            s.disks
                .remove(&file)
                .map(|_| ())
                .ok_or_else(|| Status::unknown(format!("cannot find disk {name}")))
        })?;
        Ok(Response::new(DiskRemoveResponse { replica }))
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

    /// Marks a snapshot removed (its bytes go at the next purge); an unknown name is no error.
    async fn disk_mark_as_removed(
        &self,
        r: Request<DiskMarkAsRemovedRequest>,
    ) -> R<DiskMarkAsRemovedResponse> {
        let name = r.into_inner().name;
        let replica = self.changed(|s| {
            let file = if s.disks.contains_key(&name) {
                name.clone()
            } else {
                snap_file(&name)
            };
            if file == s.head || name == "volume-head" {
                return Err(Status::unknown(
                    "cannot mark the active differencing disk as removed",
                ));
            }
            if let Some(d) = s.disks.get_mut(&file) {
                d.removed = true;
            }
            Ok(())
        })?;
        Ok(Response::new(DiskMarkAsRemovedResponse { replica }))
    }

    async fn rebuilding_set(&self, r: Request<RebuildingSetRequest>) -> R<RebuildingSetResponse> {
        let rebuilding = r.into_inner().rebuilding;
        let replica = self.changed(|s| {
            let state = s.state_name();
            let ok = if rebuilding {
                matches!(state, "open" | "dirty")
            } else {
                state == "rebuilding" || !s.open
            };
            if !ok {
                return Err(Status::unknown(format!(
                    "cannot set rebuilding={rebuilding} from state {state}"
                )));
            }
            s.rebuilding = rebuilding;
            Ok(())
        })?;
        Ok(Response::new(RebuildingSetResponse { replica }))
    }

    async fn revision_counter_set(
        &self,
        r: Request<RevisionCounterSetRequest>,
    ) -> R<RevisionCounterSetResponse> {
        let counter = r.into_inner().counter;
        let replica = self.changed(|s| {
            s.revision_counter = counter;
            Ok(())
        })?;
        Ok(Response::new(RevisionCounterSetResponse { replica }))
    }

    async fn unmap_mark_disk_chain_removed_set(
        &self,
        r: Request<UnmapMarkDiskChainRemovedSetRequest>,
    ) -> R<UnmapMarkDiskChainRemovedSetResponse> {
        let enabled = r.into_inner().enabled;
        let replica = self.changed(|s| {
            s.unmap_mark_disk_chain_removed = enabled;
            Ok(())
        })?;
        Ok(Response::new(UnmapMarkDiskChainRemovedSetResponse {
            replica,
        }))
    }

    async fn snapshot_max_count_set(
        &self,
        r: Request<SnapshotMaxCountSetRequest>,
    ) -> R<SnapshotMaxCountSetResponse> {
        let count = r.into_inner().count;
        let replica = self.changed(|s| {
            s.snapshot_max_count = count;
            Ok(())
        })?;
        Ok(Response::new(SnapshotMaxCountSetResponse { replica }))
    }

    /// Kept only: the engine enforces the size limit, never the replica.
    async fn snapshot_max_size_set(
        &self,
        r: Request<SnapshotMaxSizeSetRequest>,
    ) -> R<SnapshotMaxSizeSetResponse> {
        let size = r.into_inner().size;
        let replica = self.changed(|s| {
            s.snapshot_max_size = size;
            Ok(())
        })?;
        Ok(Response::new(SnapshotMaxSizeSetResponse { replica }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_chain_and_limit() {
        let r = SimReplica::new(&ReplicaSpec {
            size: 1 << 20,
            ..Default::default()
        });
        let now = now_rfc3339();
        r.with(|s| s.snapshot("a", true, &now, HashMap::new()))
            .unwrap();
        r.with(|s| s.snapshot("b", true, &now, HashMap::new()))
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
        assert_eq!(
            (info.snapshot_count_usage, info.snapshot_count_total),
            (2, 3)
        );
        assert_eq!(
            info.state, "closed",
            "a new replica waits for an engine to open it"
        );
        r.with(|s| {
            s.snapshot_max_count = 2;
            Ok(())
        })
        .unwrap();
        let err = r
            .with(|s| s.snapshot("one-too-many", false, &now, HashMap::new()))
            .unwrap_err();
        assert_eq!(err.message(), "too many active disks: 2");
        assert!(r
            .with(|s| s.snapshot("x", false, "", HashMap::new()))
            .is_err());
        assert!(now_rfc3339().ends_with('Z') && now_rfc3339().len() == 20);
    }
}
