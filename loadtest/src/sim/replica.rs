//! A simulated longhorn-engine replica: `ReplicaService` on P and `SyncAgentService` on P+2,
//! holding a real snapshot chain (disk files with metadata) in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lhnet_proto::ptypes::replica_service_server::{ReplicaService, ReplicaServiceServer};
use lhnet_proto::ptypes::sync_agent_service_client::SyncAgentServiceClient;
use lhnet_proto::ptypes::sync_agent_service_server::{SyncAgentService, SyncAgentServiceServer};
use lhnet_proto::ptypes::*;
use tonic::{Request, Response, Status};

use super::dataconn::Block;

/// Longhorn refuses a snapshot beyond this many (`types.MaximumTotalSnapshotCount`).
pub const MAX_SNAPSHOTS: usize = 250;

/// One replica's state, shared by its two services.
#[derive(Clone)]
pub struct SimReplica {
    state: Arc<Mutex<ReplicaState>>,
    /// Where ReplicaService listens (P); receivers open on P+3..=P+12 of the same IP.
    listen: Arc<Mutex<Option<std::net::SocketAddr>>>,
    /// Bytes per second this replica's sync agent sends at (0: as fast as TCP goes).
    sync_rate: Arc<AtomicU64>,
}

/// How many receiver ports follow P+2 (longhorn-engine's `--sync-agent-port-count`).
const RECEIVER_PORTS: u16 = 10;

struct ReplicaState {
    size: i64,
    /// Disk file name → metadata; the head is `volume-head-NNN.img`.
    disks: BTreeMap<String, DiskInfo>,
    /// Disk file name → the bytes written while that disk was the head, from offset 0.
    data: HashMap<String, Vec<u8>>,
    /// Rebuild progress of this replica as a target: bytes received and expected.
    rebuild: (u64, u64),
    rebuild_error: String,
    purge: PurgeStatus,
    clone: CloneStatus,
    /// Backups this replica made (name → status), as its sync agent reports them.
    backups: HashMap<String, BackupProgress>,
    restore: RestoreStatusResponse,
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

#[derive(Clone, Default)]
struct PurgeStatus {
    running: bool,
    progress: i32,
    state: String,
    error: String,
}

#[derive(Clone, Default)]
struct BackupProgress {
    progress: i32,
    state: String,
    url: String,
    error: String,
    snapshot: String,
}

#[derive(Clone, Default)]
struct CloneStatus {
    running: bool,
    progress: i32,
    state: String,
    error: String,
    from: String,
    snapshot: String,
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
                data: HashMap::new(),
                rebuild: (0, 0),
                rebuild_error: String::new(),
                purge: PurgeStatus::default(),
                clone: CloneStatus::default(),
                backups: HashMap::new(),
                restore: RestoreStatusResponse::default(),
                head,
                head_index: 0,
                open: true,
                rebuilding: false,
                revision_counter: 0,
            })),
            listen: Arc::new(Mutex::new(None)),
            sync_rate: Arc::new(AtomicU64::new(0)),
        }
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

    /// Rebuild progress as a target: (bytes received, bytes expected).
    pub fn rebuild_progress(&self) -> (u64, u64) {
        self.with(|s| Ok(s.rebuild)).unwrap_or_default()
    }

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
        let mut last = None;
        for offset in 3..3 + RECEIVER_PORTS {
            let Some(port) = listen.port().checked_add(offset) else {
                break;
            };
            match tokio::net::TcpListener::bind((listen.ip(), port)).await {
                Ok(l) => return Ok(l),
                Err(e) => last = Some(e),
            }
        }
        Err(Status::resource_exhausted(format!(
            "no free receiver port in {}+3..={}+12 on {}: {}",
            listen.port(),
            listen.port(),
            listen.ip(),
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
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

    /// Writes bytes into the head at `offset`, as the engine's data path does.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), Status> {
        self.with(|s| {
            let end = offset + bytes.len();
            if end as i64 > s.size {
                return Err(Status::out_of_range(format!(
                    "write of {} bytes at {offset} is past the volume size {}",
                    bytes.len(),
                    s.size
                )));
            }
            let head = s.head.clone();
            let data = s.data.entry(head.clone()).or_default();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[offset..end].copy_from_slice(bytes);
            let len = data.len();
            if let Some(d) = s.disks.get_mut(&head) {
                d.size = len.to_string();
            }
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

    /// Snapshot file names, oldest first (for tests).
    pub fn snapshots(&self) -> Vec<String> {
        self.with(|s| Ok(s.chain().into_iter().filter(|d| d != &s.head).collect()))
            .unwrap_or_default()
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

    /// The volume as of a snapshot: that layer and its ancestors, flattened (newer bytes win).
    fn flatten(&self, snapshot: &str) -> Result<(DiskInfo, Vec<u8>), Status> {
        let file = snap_file(snapshot);
        let meta = self
            .disks
            .get(&file)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("cannot find snapshot {snapshot}")))?;
        let mut layers = vec![file.clone()];
        let mut cur = meta.parent.clone();
        while !cur.is_empty() {
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

    /// Removed snapshots whose child is another snapshot, oldest first: what a purge coalesces.
    fn purgeable(&self) -> Vec<String> {
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
    fn coalesce(&mut self, removed: &str) {
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
        if let Some(bytes) = self.data.remove(&self.head) {
            if let Some(d) = self.disks.get_mut(&file) {
                d.size = bytes.len().to_string();
            }
            self.data.insert(file.clone(), bytes);
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
        // Rebuild the children links from the parents, as loading the .meta files does.
        self.with(|s| {
            let parents: Vec<(String, String)> = s
                .disks
                .iter()
                .map(|(k, d)| (k.clone(), d.parent.clone()))
                .collect();
            for d in s.disks.values_mut() {
                d.children.clear();
            }
            for (child, parent) in parents {
                if let Some(p) = s.disks.get_mut(&parent) {
                    p.children.insert(child, true);
                }
            }
            Ok(())
        })?;
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

    /// Pulls every listed file from the source replica's sync agent into this replica.
    async fn files_sync(&self, r: Request<FilesSyncRequest>) -> R<()> {
        let r = r.into_inner();
        let total: u64 = r
            .sync_file_info_list
            .iter()
            .map(|f| f.actual_size.max(0) as u64)
            .sum();
        self.with(|s| {
            s.rebuild = (0, total);
            s.rebuild_error.clear();
            Ok(())
        })?;
        let source = r
            .from_address
            .strip_prefix("tcp://")
            .unwrap_or(&r.from_address);
        let source: std::net::SocketAddr = source.parse().map_err(|_| {
            Status::invalid_argument(format!("bad from_address {}", r.from_address))
        })?;
        let agent = std::net::SocketAddr::new(source.ip(), source.port() + 2);
        let result = async {
            let mut client = SyncAgentServiceClient::connect(format!("http://{agent}"))
                .await
                .map_err(|e| {
                    Status::unavailable(format!("cannot reach source sync agent {agent}: {e}"))
                })?;
            for file in &r.sync_file_info_list {
                let receiver = self.receiver(&r.to_host).await?;
                let port = receiver
                    .local_addr()
                    .map_err(|e| Status::internal(e.to_string()))?
                    .port();
                let base = self.with(|s| Ok(s.rebuild.0))?;
                let me = self.clone();
                let receive = tokio::spawn(super::sync::receive_disk(receiver, move |got, _| {
                    let _ = me.with(|s| {
                        s.rebuild.0 = base + got;
                        Ok(())
                    });
                }));
                client
                    .file_send(FileSendRequest {
                        from_file_name: file.from_file_name.clone(),
                        host: r.to_host.clone(),
                        port: i32::from(port),
                    })
                    .await?;
                let (mut meta, data) = receive
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| {
                        Status::data_loss(format!("receiving {}: {e}", file.from_file_name))
                    })?;
                meta.name = file.to_file_name.clone();
                self.with(|s| {
                    s.rebuild.0 = base + data.len() as u64;
                    s.disks.insert(file.to_file_name.clone(), meta);
                    s.data.insert(file.to_file_name.clone(), data);
                    Ok(())
                })?;
            }
            Ok::<(), Status>(())
        }
        .await;
        if let Err(e) = &result {
            let _ = self.with(|s| {
                s.rebuild_error = e.message().to_string();
                Ok(())
            });
        }
        result?;
        Ok(Response::new(()))
    }
    /// Pulls the source's volume as of a snapshot and keeps it here as a snapshot of that name.
    async fn snapshot_clone(&self, r: Request<SnapshotCloneRequest>) -> R<()> {
        let r = r.into_inner();
        let source = r
            .from_address
            .strip_prefix("tcp://")
            .unwrap_or(&r.from_address);
        let source: std::net::SocketAddr = source.parse().map_err(|_| {
            Status::invalid_argument(format!("bad from_address {}", r.from_address))
        })?;
        self.with(|s| {
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
            let agent = std::net::SocketAddr::new(source.ip(), source.port() + 2);
            let mut client = SyncAgentServiceClient::connect(format!("http://{agent}"))
                .await
                .map_err(|e| {
                    Status::unavailable(format!("cannot reach source sync agent {agent}: {e}"))
                })?;
            let receiver = self.receiver(&r.to_host).await?;
            let port = receiver
                .local_addr()
                .map_err(|e| Status::internal(e.to_string()))?
                .port();
            let me = self.clone();
            let receive = tokio::spawn(super::sync::receive_disk(receiver, move |got, total| {
                let _ = me.with(|s| {
                    s.clone.progress = (got * 99 / total.max(1)) as i32;
                    Ok(())
                });
            }));
            client
                .volume_export(VolumeExportRequest {
                    snapshot_file_name: r.snapshot_file_name.clone(),
                    host: r.to_host.clone(),
                    port: i32::from(port),
                    export_backing_image_if_exist: r.export_backing_image_if_exist,
                })
                .await?;
            let (_, data) = receive
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::data_loss(format!("receiving the clone: {e}")))?;
            self.write(0, &data)?;
            self.with(|s| s.snapshot(&r.snapshot_file_name, true, "", HashMap::new()))
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
    async fn receiver_launch(
        &self,
        _r: Request<ReceiverLaunchRequest>,
    ) -> R<ReceiverLaunchResponse> {
        Err(not_yet("ReceiverLaunch"))
    }
    /// Starts a backup of a snapshot to a vfs://, nfs:// or s3:// target (with the request's
    /// credential map) in Longhorn's layout; runs in the background.
    async fn backup_create(&self, r: Request<BackupCreateRequest>) -> R<BackupCreateResponse> {
        let r = r.into_inner();
        let (meta, data, size) = self.with(|s| {
            let (meta, data) = s.flatten(&r.snapshot_file_name)?;
            Ok((meta, data, s.size))
        })?;
        let name = if r.backup_name.is_empty() {
            super::backupstore::generate_backup_name(&format!(
                "{}{}",
                r.snapshot_file_name,
                now_rfc3339()
            ))
        } else {
            r.backup_name.clone()
        };
        let (url, credential, volume) = (
            r.backup_target.clone(),
            r.credential.clone(),
            r.volume_name.clone(),
        );
        let (target, incremental) = tokio::task::spawn_blocking(move || {
            let target = open_target(&url, credential)?;
            let incremental = target.load_volume(&volume).ok().is_some_and(|v| {
                !v.last_backup_name.is_empty()
                    && target.load_backup(&volume, &v.last_backup_name).is_ok()
            });
            Ok::<_, Status>((target, incremental))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        let url = super::backupstore::encode_backup_url(&target.url, &name, &r.volume_name);
        self.with(|s| {
            if s.backups
                .get(&name)
                .is_some_and(|b| b.state == "in_progress")
            {
                return Err(Status::already_exists(format!(
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
        let labels = r
            .labels
            .iter()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let replica = self.clone();
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
            let result = target.write_backup(
                &r.volume_name,
                &backup,
                &r.snapshot_file_name,
                &meta.created,
                &now_rfc3339(),
                size,
                labels,
                (&r.backing_image_name, &r.backing_image_checksum),
                &data,
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
                Ok(())
            });
        });
        Ok(Response::new(BackupCreateResponse {
            backup: name,
            is_incremental: incremental,
        }))
    }
    async fn backup_remove(&self, _r: Request<BackupRemoveRequest>) -> R<()> {
        Err(not_yet("BackupRemove"))
    }
    /// Starts restoring a backup into this replica; runs in the background.
    async fn backup_restore(&self, r: Request<BackupRestoreRequest>) -> R<()> {
        let r = r.into_inner();
        let (target_url, backup, volume) =
            super::backupstore::decode_backup_url(&r.backup).map_err(Status::invalid_argument)?;
        let credential = r.credential.clone();
        let target = tokio::task::spawn_blocking(move || open_target(&target_url, credential))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        self.with(|s| {
            if s.restore.is_restoring {
                return Err(Status::unknown(
                    "a restore is already in progress on this replica",
                ));
            }
            s.restore = RestoreStatusResponse {
                is_restoring: true,
                last_restored: s.restore.last_restored.clone(),
                progress: 0,
                error: String::new(),
                dest_file_name: r.snapshot_disk_name.clone(),
                state: "in_progress".into(),
                backup_url: r.backup.clone(),
                current_restoring_backup: backup.clone(),
            };
            Ok(())
        })?;
        let replica = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = target
                .read_backup(&volume, &backup)
                .map_err(|e| format!("failed to restore {backup}: {e}"));
            let written = result.and_then(|(_, data)| {
                for (i, chunk) in data.chunks(super::backupstore::BLOCK_SIZE).enumerate() {
                    if chunk.iter().any(|b| *b != 0) {
                        replica
                            .write(i * super::backupstore::BLOCK_SIZE, chunk)
                            .map_err(|e| e.message().to_string())?;
                    }
                }
                Ok(())
            });
            let _ = replica.with(|s| {
                s.restore.is_restoring = false;
                s.restore.current_restoring_backup.clear();
                match &written {
                    Ok(()) => {
                        s.restore.progress = 100;
                        s.restore.state = "complete".into();
                        s.restore.last_restored = backup.clone();
                    }
                    Err(e) => {
                        s.restore.state = "error".into();
                        s.restore.error = e.clone();
                    }
                }
                Ok(())
            });
        });
        Ok(Response::new(()))
    }

    async fn backup_status(&self, r: Request<BackupStatusRequest>) -> R<BackupStatusResponse> {
        let name = r.into_inner().backup;
        let b = self.with(|s| {
            s.backups.get(&name).cloned().ok_or_else(|| {
                Status::not_found(format!("cannot find backup {name} in this replica"))
            })
        })?;
        Ok(Response::new(BackupStatusResponse {
            progress: b.progress,
            backup_url: b.url,
            error: b.error,
            snapshot_name: b.snapshot,
            state: b.state,
        }))
    }
    async fn reset(&self, _r: Request<()>) -> R<()> {
        Ok(Response::new(()))
    }
    async fn restore_status(&self, _r: Request<()>) -> R<RestoreStatusResponse> {
        Ok(Response::new(self.with(|s| Ok(s.restore.clone()))?))
    }
    /// Starts coalescing removed snapshots in the background, one disk at a time.
    async fn snapshot_purge(&self, _r: Request<()>) -> R<()> {
        let todo = self.with(|s| {
            if s.purge.running {
                return Err(Status::unknown("snapshot purge is already in progress"));
            }
            if s.rebuilding {
                return Err(Status::unknown(
                    "cannot purge snapshots while the replica is rebuilding",
                ));
            }
            s.purge = PurgeStatus {
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
                s.purge = PurgeStatus {
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
        let (rebuilding, (done, total), error) =
            self.with(|s| Ok((s.rebuilding, s.rebuild, s.rebuild_error.clone())))?;
        let progress = match (done * 100).checked_div(total) {
            Some(p) => p as i32,
            None if rebuilding => 0,
            None => 100,
        };
        let state = match (error.is_empty(), rebuilding, total > 0 && done == total) {
            (false, _, _) => "error",
            (true, true, _) => "in_progress",
            (true, false, true) => "complete",
            (true, false, false) => "",
        };
        Ok(Response::new(ReplicaRebuildStatusResponse {
            is_rebuilding: rebuilding,
            progress,
            error,
            state: state.into(),
            ..Default::default()
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
}

/// Opens a backup target as the sync agent does: the request's credential map for S3, NFS
/// exports at their existing directory under Longhorn's mount root.
fn open_target(
    url: &str,
    credential: std::collections::HashMap<String, String>,
) -> Result<super::backupstore::Target, Status> {
    let options = super::backupstore::TargetOptions {
        credentials: credential,
        nfs: super::backupstore::NfsOptions {
            mount: super::backupstore::NfsMount::Existing,
            ..Default::default()
        },
    };
    super::backupstore::Target::open(url, &options).map_err(Status::invalid_argument)
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
