//! A simulated longhorn-engine controller (v1.12.1): `ControllerService` with a volume's real
//! state, driving its replicas over gRPC (`ReplicaService`) and their data connections as the
//! real engine does: snapshot limits checked before a snapshot, flags pushed to the replicas,
//! frontend I/O measured for MetricsGet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use lhnet_proto::ptypes::controller_service_server::{ControllerService, ControllerServiceServer};
use lhnet_proto::ptypes::replica_service_client::ReplicaServiceClient;
use lhnet_proto::ptypes::*;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::dataconn::{Block, DataClient};
use super::guard::Record;
use super::replica::MAX_SNAPSHOTS;
use super::{named, EngineSpec};

/// The engine's volume and replica set.
#[derive(Clone)]
pub struct SimEngine {
    state: Arc<Mutex<EngineState>>,
    clients: Arc<Mutex<HashMap<String, ReplicaServiceClient<Channel>>>>,
    /// One data connection (replica port P+1) per replica, opened on first use.
    data: Arc<Mutex<HashMap<String, DataSlot>>>,
    record: Record,
}

type DataSlot = Arc<tokio::sync::Mutex<Option<DataClient>>>;

struct EngineState {
    volume: Volume,
    /// `tcp://IP:PORT` → mode, in the order they were added.
    replicas: Vec<(String, ReplicaMode)>,
    /// `--rebuild-sync-concurrent-limit` (1), set by ReplicaRebuildConcurrentSyncLimitSet.
    sync_limit: i32,
    release: super::Release,
    /// Frontend I/O of the second being counted, and of the last whole one.
    io: IoWindow,
    last_io: Metrics,
}

/// Frontend I/O counted over one second.
#[derive(Default)]
struct IoWindow {
    read_bytes: u64,
    write_bytes: u64,
    reads: u64,
    writes: u64,
    read_nanos: u64,
    write_nanos: u64,
}

type R<T> = Result<Response<T>, Status>;

/// longhorn-engine's `pkg/meta` versions: (version, cli, cli min, controller, controller min).
fn versions(release: super::Release) -> (&'static str, i64, i64, i64, i64) {
    match release {
        super::Release::V1_3_3 => ("v1.3.3-lhnet-sim", 6, 3, 3, 3),
        super::Release::V1_12_1 => ("v1.12.1-lhnet-sim", 12, 8, 6, 4),
    }
}

impl SimEngine {
    pub fn new(spec: &EngineSpec) -> SimEngine {
        SimEngine {
            state: Arc::new(Mutex::new(EngineState {
                volume: Volume {
                    name: spec.volume.clone(),
                    size: spec.size,
                    frontend_state: "down".into(),
                    snapshot_max_count: MAX_SNAPSHOTS as i32,
                    ..Default::default()
                },
                replicas: spec
                    .replicas
                    .iter()
                    .map(|r| (r.clone(), ReplicaMode::Rw))
                    .collect(),
                sync_limit: 1,
                release: spec.release,
                io: IoWindow::default(),
                last_io: Metrics::default(),
            })),
            clients: Arc::new(Mutex::new(HashMap::new())),
            data: Arc::new(Mutex::new(HashMap::new())),
            record: Record::default(),
        }
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// What VolumeGet answers now (for tests).
    pub fn inspect(&self) -> Volume {
        self.volume().unwrap_or_default()
    }

    /// Opens the replicas the engine starts with, as `longhorn controller --replica …` does;
    /// one that does not answer is ERR.
    pub(crate) async fn open_replicas(&self) {
        let Ok(replicas) = self.replicas_in(ReplicaMode::Rw) else {
            return;
        };
        for address in replicas {
            if let Err(e) = self.open_replica(&address).await {
                eprintln!("engine: replica {address} not opened: {}", e.message());
                self.fail_replica(&address);
            }
        }
    }

    /// What the engine's backend factory does: the replica must be closed, and is opened.
    async fn open_replica(&self, address: &str) -> Result<(), Status> {
        let mut client = self.client(address)?;
        let info = client
            .replica_get(self.req(()))
            .await?
            .into_inner()
            .replica
            .unwrap_or_default();
        if info.state != "closed" {
            return Err(Status::unknown(format!(
                "replica must be closed, cannot add in state: {}",
                info.state
            )));
        }
        let size = self.with(|s| Ok(s.volume.size))?;
        client
            .replica_open(self.req(ReplicaOpenRequest {
                is_upgrade: false,
                expected_backend_size: size,
            }))
            .await
            .map_err(|e| {
                Status::unknown(format!(
                    "failed to open replica {address} from remote: {}",
                    e.message()
                ))
            })?;
        Ok(())
    }

    /// The replica monitor: pings each replica's data connection every second while anything
    /// else holds the engine, and marks the ones that stop answering ERR. The same tick closes
    /// the second of frontend I/O MetricsGet reports.
    pub(crate) fn spawn_monitor(&self) {
        let weak = Arc::downgrade(&self.state);
        let clients = self.clients.clone();
        let data = self.data.clone();
        let record = self.record.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let Some(state) = weak.upgrade() else {
                    break;
                };
                let engine = SimEngine {
                    state,
                    clients: clients.clone(),
                    data: data.clone(),
                    record: record.clone(),
                };
                engine.close_io_window();
                engine.monitor_once().await;
            }
        });
    }

    fn close_io_window(&self) {
        let _ = self.with(|s| {
            let w = std::mem::take(&mut s.io);
            s.last_io = Metrics {
                read_throughput: w.read_bytes,
                write_throughput: w.write_bytes,
                read_latency: w.read_nanos.checked_div(w.reads).unwrap_or(0),
                write_latency: w.write_nanos.checked_div(w.writes).unwrap_or(0),
                read_iops: w.reads,
                write_iops: w.writes,
            };
            Ok(())
        });
    }

    /// The data connection slot of a replica (`tcp://IP:P` → IP:P+1).
    fn data_slot(&self, address: &str) -> Result<DataSlot, String> {
        let mut data = self
            .data
            .lock()
            .map_err(|_| "engine data lock poisoned".to_string())?;
        Ok(data.entry(address.to_string()).or_default().clone())
    }

    /// Runs one call on a replica's data connection, connecting first if needed; a failure
    /// drops the connection and marks the replica ERR, as the engine's data path does.
    async fn data_call<T>(
        &self,
        address: &str,
        call: impl AsyncFnOnce(&mut DataClient) -> std::io::Result<T>,
    ) -> Result<T, String> {
        let slot = self.data_slot(address)?;
        let mut conn = slot.lock().await;
        let result = async {
            if conn.is_none() {
                *conn = Some(DataClient::connect(&data_address(address)?).await?);
            }
            match conn.as_mut() {
                Some(c) => call(c).await,
                None => Err(std::io::Error::other("no data connection")),
            }
        }
        .await;
        result.map_err(|e| {
            *conn = None;
            self.fail_replica(address);
            format!("replica {address} data connection: {e}")
        })
    }

    /// Replicas that take writes: RW and the WO ones being rebuilt.
    fn writable(&self) -> Result<Vec<String>, String> {
        self.with(|s| {
            Ok(s.replicas
                .iter()
                .filter(|(_, m)| matches!(m, ReplicaMode::Rw | ReplicaMode::Wo))
                .map(|(a, _)| a.clone())
                .collect())
        })
        .map_err(|e| e.message().to_string())
    }

    fn frontend_up(&self) -> Result<(), String> {
        let up = self
            .with(|s| Ok(s.volume.frontend_state == "up"))
            .map_err(|e| e.message().to_string())?;
        if up {
            Ok(())
        } else {
            Err("volume frontend is not up (VolumeFrontendStart first)".into())
        }
    }

    /// Pings every RW and WO replica over its data connection; one that does not answer is
    /// marked ERR (the engine's replica monitor).
    pub async fn monitor_once(&self) {
        let Ok(replicas) = self.writable() else {
            return;
        };
        for address in replicas {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                self.data_call(&address, async |c| c.ping().await),
            )
            .await;
        }
    }

    pub fn server(&self) -> ControllerServiceServer<SimEngine> {
        ControllerServiceServer::new(self.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&mut EngineState) -> Result<T, Status>) -> Result<T, Status> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| Status::internal("engine state lock poisoned"))?;
        f(&mut s)
    }

    fn volume(&self) -> Result<Volume, Status> {
        self.with(|s| {
            let mut v = s.volume.clone();
            v.replica_count = s.replicas.len() as i32;
            Ok(v)
        })
    }

    /// Replicas in a mode, for fan-out.
    fn replicas_in(&self, mode: ReplicaMode) -> Result<Vec<String>, Status> {
        self.with(|s| {
            Ok(s.replicas
                .iter()
                .filter(|(_, m)| *m == mode)
                .map(|(a, _)| a.clone())
                .collect())
        })
    }

    /// Replicas that are not ERR.
    fn healthy(&self) -> Result<Vec<String>, Status> {
        self.with(|s| {
            Ok(s.replicas
                .iter()
                .filter(|(_, m)| *m != ReplicaMode::Err)
                .map(|(a, _)| a.clone())
                .collect())
        })
    }

    /// A request to a replica, carrying the engine's volume name as its clients do.
    fn req<T>(&self, message: T) -> Request<T> {
        let volume = self.with(|s| Ok(s.volume.name.clone())).unwrap_or_default();
        named(message, &volume, "")
    }

    fn client(&self, address: &str) -> Result<ReplicaServiceClient<Channel>, Status> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| Status::internal("engine client lock poisoned"))?;
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let host = address.strip_prefix("tcp://").unwrap_or(address);
        let channel = Channel::from_shared(format!("http://{host}"))
            .map_err(|e| Status::invalid_argument(format!("bad replica address {address}: {e}")))?
            .connect_lazy();
        let client = ReplicaServiceClient::new(channel);
        clients.insert(address.to_string(), client.clone());
        Ok(client)
    }

    /// Marks a replica ERR after a failed call, as the engine does.
    fn fail_replica(&self, address: &str) {
        let _ = self.with(|s| {
            for (a, m) in s.replicas.iter_mut() {
                if a == address {
                    *m = ReplicaMode::Err;
                }
            }
            Ok(())
        });
    }

    /// Every non-ERR replica's ReplicaGet; one that does not answer is left out.
    async fn replica_infos(&self) -> Result<Vec<(String, Replica)>, Status> {
        let mut infos = Vec::new();
        for address in self.healthy()? {
            if let Ok(r) = self.client(&address)?.replica_get(self.req(())).await {
                infos.push((address, r.into_inner().replica.unwrap_or_default()));
            }
        }
        Ok(infos)
    }

    /// The controller's `canDoSnapshot`: the volume's snapshot count and size limits.
    async fn can_snapshot(&self) -> Result<(), Status> {
        let (max_count, max_size) =
            self.with(|s| Ok((s.volume.snapshot_max_count, s.volume.snapshot_max_size)))?;
        let infos = self.replica_infos().await?;
        let usage = infos
            .iter()
            .map(|(_, r)| r.snapshot_count_usage)
            .max()
            .unwrap_or(0);
        let total = infos
            .iter()
            .map(|(_, r)| r.snapshot_count_total)
            .max()
            .unwrap_or(0);
        if usage >= max_count {
            return Err(Status::unknown(format!(
                "snapshot count usage {usage} is equal or larger than snapshotMaxCount {max_count}"
            )));
        }
        if total >= MAX_SNAPSHOTS as i32 {
            return Err(Status::unknown(format!(
                "snapshot count total is already too big: {total}"
            )));
        }
        if max_size != 0 {
            let used = infos
                .iter()
                .map(|(_, r)| r.snapshot_size_usage)
                .max()
                .unwrap_or(0);
            let head = infos
                .iter()
                .map(|(_, r)| r.head_file_size)
                .max()
                .unwrap_or(0);
            let remain = max_size - used;
            if head > remain {
                return Err(Status::unknown(format!(
                    "snapshot free space {remain} is not enough for head file {head}"
                )));
            }
        }
        Ok(())
    }

    fn reply(v: Volume) -> R<Volume> {
        Ok(Response::new(v))
    }
}

/// `tcp://IP:P` → `IP:P+1`.
fn data_address(address: &str) -> std::io::Result<String> {
    let host = address.strip_prefix("tcp://").unwrap_or(address);
    let addr: std::net::SocketAddr = host.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad replica address {address}"),
        )
    })?;
    let port = addr.port().checked_add(1).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "replica port too high")
    })?;
    Ok(std::net::SocketAddr::new(addr.ip(), port).to_string())
}

/// The engine's frontend: block reads and writes of the volume, spread over the replicas'
/// data connections. Writes go to every RW and WO replica; reads come from the first RW one.
/// Each one that succeeds counts for MetricsGet.
impl Block for SimEngine {
    async fn write_at(&self, offset: i64, data: Vec<u8>) -> Result<(), String> {
        self.frontend_up()?;
        let started = Instant::now();
        let size = self
            .with(|s| Ok(s.volume.size))
            .map_err(|e| e.message().to_string())?;
        if offset < 0 || offset.saturating_add(data.len() as i64) > size {
            return Err(format!(
                "write of {} bytes at {offset} is outside the volume (size {size})",
                data.len()
            ));
        }
        let targets = self.writable()?;
        let len = data.len() as u64;
        let data = Arc::new(data);
        let writes = targets.iter().map(|address| {
            let data = data.clone();
            async move {
                self.data_call(address, async |c| c.write_at(offset, &data).await)
                    .await
            }
        });
        let results = futures_util::future::join_all(writes).await;
        if results.iter().any(|r| r.is_ok()) {
            let nanos = started.elapsed().as_nanos() as u64;
            let _ = self.with(|s| {
                s.io.write_bytes += len;
                s.io.writes += 1;
                s.io.write_nanos += nanos;
                Ok(())
            });
            return Ok(());
        }
        let causes: Vec<String> = results.into_iter().filter_map(|r| r.err()).collect();
        Err(if causes.is_empty() {
            "volume has no RW or WO replica".into()
        } else {
            format!("no replica took the write: {}", causes.join("; "))
        })
    }

    async fn read_at(&self, offset: i64, len: u32) -> Result<Vec<u8>, String> {
        self.frontend_up()?;
        let started = Instant::now();
        let sources = self
            .replicas_in(ReplicaMode::Rw)
            .map_err(|e| e.message().to_string())?;
        let mut last = "volume has no RW replica".to_string();
        for address in sources {
            match self
                .data_call(&address, async |c| c.read_at(offset, len).await)
                .await
            {
                Ok(data) => {
                    let nanos = started.elapsed().as_nanos() as u64;
                    let _ = self.with(|s| {
                        s.io.read_bytes += data.len() as u64;
                        s.io.reads += 1;
                        s.io.read_nanos += nanos;
                        Ok(())
                    });
                    return Ok(data);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

fn listed(address: &str, mode: ReplicaMode) -> ControllerReplica {
    ControllerReplica {
        address: Some(ReplicaAddress {
            address: address.to_string(),
            instance_name: String::new(),
        }),
        mode: mode as i32,
    }
}

fn mode_name(mode: ReplicaMode) -> &'static str {
    match mode {
        ReplicaMode::Rw => "RW",
        ReplicaMode::Wo => "WO",
        ReplicaMode::Err => "ERR",
    }
}

#[tonic::async_trait]
impl ControllerService for SimEngine {
    async fn volume_get(&self, _r: Request<()>) -> R<Volume> {
        Self::reply(self.volume()?)
    }

    async fn volume_start(&self, r: Request<VolumeStartRequest>) -> R<Volume> {
        let r = r.into_inner();
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = r.replica_addresses.iter().find(|a| !seen.insert(*a)) {
            return Err(Status::unknown(format!(
                "invalid ReplicaAddress: duplicate replica addresses {dup}"
            )));
        }
        self.with(|s| {
            if !s.replicas.is_empty() {
                return Err(Status::unknown("volume is already started"));
            }
            if r.size > 0 {
                s.volume.size = r.size;
            }
            Ok(())
        })?;
        let mut opened = Vec::new();
        for address in &r.replica_addresses {
            match self.open_replica(address).await {
                Ok(()) => opened.push((address.clone(), ReplicaMode::Rw)),
                Err(e) => {
                    eprintln!("engine: replica {address} not opened: {}", e.message());
                    opened.push((address.clone(), ReplicaMode::Err));
                }
            }
        }
        if opened.iter().all(|(_, m)| *m == ReplicaMode::Err) {
            return Err(Status::unknown(format!(
                "no available backend due to service unavailable from the addresses {:?}",
                r.replica_addresses
            )));
        }
        self.with(|s| {
            s.replicas = opened;
            Ok(())
        })?;
        Self::reply(self.volume()?)
    }

    async fn volume_shutdown(&self, _r: Request<()>) -> R<Volume> {
        self.with(|s| {
            s.volume.frontend_state = "down".into();
            Ok(())
        })?;
        Self::reply(self.volume()?)
    }

    /// A snapshot of every RW replica at once, within the volume's limits.
    async fn volume_snapshot(&self, r: Request<VolumeSnapshotRequest>) -> R<VolumeSnapshotReply> {
        let r = r.into_inner();
        let name = if r.name.is_empty() {
            super::uuid()
        } else {
            r.name
        };
        self.can_snapshot().await?;
        let created = super::now_rfc3339();
        for address in self.replicas_in(ReplicaMode::Rw)? {
            let mut client = self.client(&address)?;
            let req = ReplicaSnapshotRequest {
                name: name.clone(),
                user_created: true,
                created: created.clone(),
                labels: r.labels.clone(),
            };
            if let Err(e) = client.replica_snapshot(self.req(req)).await {
                if e.message().contains("already existing")
                    || e.message().contains("too many active disks")
                {
                    return Err(Status::unknown(format!(
                        "failed to snapshot replica {address}: {}",
                        e.message()
                    )));
                }
                self.fail_replica(&address);
            }
        }
        Ok(Response::new(VolumeSnapshotReply { name }))
    }

    async fn volume_revert(&self, r: Request<VolumeRevertRequest>) -> R<Volume> {
        let name = r.into_inner().name;
        if name == "volume-head" {
            return Err(Status::unknown(
                "invalid snapshot name volume-head: cannot revert to the volume head",
            ));
        }
        if self.with(|s| Ok(s.volume.frontend_state == "up"))? {
            return Err(Status::unknown(
                "volume frontend is up; shut it down before reverting",
            ));
        }
        for address in self.replicas_in(ReplicaMode::Rw)? {
            let mut client = self.client(&address)?;
            client
                .replica_revert(self.req(ReplicaRevertRequest {
                    name: name.clone(),
                    created: super::now_rfc3339(),
                }))
                .await
                .map_err(|e| {
                    Status::unknown(format!(
                        "failed to revert replica {address}: {}",
                        e.message()
                    ))
                })?;
        }
        Self::reply(self.volume()?)
    }

    async fn volume_expand(&self, r: Request<VolumeExpandRequest>) -> R<Volume> {
        let size = r.into_inner().size;
        let current = self.with(|s| Ok(s.volume.size))?;
        if size < current {
            return Err(Status::unknown(format!(
                "controller cannot be expanded to a smaller size {size}"
            )));
        }
        if size % 4096 != 0 {
            return Err(Status::unknown(format!(
                "requested expansion size {size} not multiple of volume sector size 4096"
            )));
        }
        for address in self.replicas_in(ReplicaMode::Rw)? {
            let mut client = self.client(&address)?;
            if let Err(e) = client
                .replica_expand(self.req(ReplicaExpandRequest { size }))
                .await
            {
                self.with(|s| {
                    s.volume.last_expansion_error = e.message().to_string();
                    s.volume.last_expansion_failed_at = super::now_rfc3339();
                    Ok(())
                })?;
                return Err(Status::unknown(format!(
                    "failed to expand replica {address}: {}",
                    e.message()
                )));
            }
        }
        self.with(|s| {
            s.volume.size = size;
            Ok(())
        })?;
        Self::reply(self.volume()?)
    }

    async fn volume_frontend_start(&self, r: Request<VolumeFrontendStartRequest>) -> R<Volume> {
        let frontend = r.into_inner().frontend;
        if frontend.is_empty() {
            return Err(Status::unknown("cannot start empty frontend"));
        }
        if frontend != "tgt-blockdev" && frontend != "tgt-iscsi" {
            return Err(Status::unknown(format!(
                "unsupported frontend {frontend:?}; use tgt-blockdev or tgt-iscsi"
            )));
        }
        self.with(|s| {
            if s.volume.frontend_state == "up" {
                return Err(Status::unknown(format!(
                    "frontend {} is already started, cannot be set as {frontend}",
                    s.volume.frontend
                )));
            }
            s.volume.endpoint = format!("/dev/longhorn/{}", s.volume.name);
            s.volume.frontend = frontend;
            s.volume.frontend_state = "up".into();
            Ok(())
        })?;
        Self::reply(self.volume()?)
    }

    async fn volume_frontend_shutdown(&self, _r: Request<()>) -> R<Volume> {
        self.with(|s| {
            s.volume.frontend_state = "down".into();
            s.volume.endpoint = String::new();
            Ok(())
        })?;
        Self::reply(self.volume()?)
    }

    /// Sets the flag and pushes it to each non-ERR replica whose own flag differs; a replica
    /// that refuses is ERR.
    async fn volume_unmap_mark_snap_chain_removed_set(
        &self,
        r: Request<VolumeUnmapMarkSnapChainRemovedSetRequest>,
    ) -> R<Volume> {
        let enabled = r.into_inner().enabled;
        self.with(|s| {
            s.volume.unmap_mark_snap_chain_removed = enabled;
            Ok(())
        })?;
        let mut all_failed = true;
        for (address, info) in self.replica_infos().await? {
            if info.unmap_mark_disk_chain_removed == enabled {
                all_failed = false;
                continue;
            }
            match self
                .client(&address)?
                .unmap_mark_disk_chain_removed_set(
                    self.req(UnmapMarkDiskChainRemovedSetRequest { enabled }),
                )
                .await
            {
                Ok(_) => all_failed = false,
                Err(_) => self.fail_replica(&address),
            }
        }
        if all_failed {
            return Err(Status::unknown(format!(
                "failed to correct Unmatched flag UnmapMarkSnapChainRemoved for all replicas, expect {enabled}"
            )));
        }
        Self::reply(self.volume()?)
    }

    async fn volume_snapshot_max_count_set(
        &self,
        r: Request<VolumeSnapshotMaxCountSetRequest>,
    ) -> R<Volume> {
        let count = r.into_inner().count;
        let infos = self.replica_infos().await?;
        if infos.is_empty() && !self.healthy()?.is_empty() {
            return Err(Status::unknown(
                "cannot get an valid result for snapshot usage",
            ));
        }
        let usage = infos
            .iter()
            .map(|(_, i)| i.snapshot_count_usage)
            .max()
            .unwrap_or(0);
        if count < usage {
            return Err(Status::unknown(format!(
                "cannot set snapshotMaxCount={count} smaller than current snapshot count usage={usage}, please purge snapshots first"
            )));
        }
        self.with(|s| {
            s.volume.snapshot_max_count = count;
            Ok(())
        })?;
        for (address, _) in infos {
            self.client(&address)?
                .snapshot_max_count_set(self.req(SnapshotMaxCountSetRequest { count }))
                .await
                .map_err(|e| {
                    Status::unknown(format!(
                        "failed to set flag SnapshotMaxCount to {count} in replica {address}, err: {}",
                        e.message()
                    ))
                })?;
        }
        Self::reply(self.volume()?)
    }

    async fn volume_snapshot_max_size_set(
        &self,
        r: Request<VolumeSnapshotMaxSizeSetRequest>,
    ) -> R<Volume> {
        let size = r.into_inner().size;
        let infos = self.replica_infos().await?;
        let usage = infos
            .iter()
            .map(|(_, i)| i.snapshot_size_usage)
            .max()
            .unwrap_or(0);
        if size != 0 && size < usage {
            return Err(Status::unknown(format!(
                "cannot set snapshotMaxSize={size} smaller than current snapshot size usage={usage}, please purge snapshots first"
            )));
        }
        self.with(|s| {
            s.volume.snapshot_max_size = size;
            Ok(())
        })?;
        for (address, _) in infos {
            self.client(&address)?
                .snapshot_max_size_set(self.req(SnapshotMaxSizeSetRequest { size }))
                .await
                .map_err(|e| {
                    Status::unknown(format!(
                        "failed to set flag SnapshotMaxSize to {size} in replica {address}, err: {}",
                        e.message()
                    ))
                })?;
        }
        Self::reply(self.volume()?)
    }

    /// Declared in the proto, served by no longhorn-engine release.
    async fn volume_io(&self, _r: Request<VolumeIoRequest>) -> R<VolumeIoResponse> {
        Err(Status::unimplemented("method VolumeIO not implemented"))
    }

    async fn replica_list(&self, _r: Request<()>) -> R<ReplicaListReply> {
        self.with(|s| {
            Ok(Response::new(ReplicaListReply {
                replicas: s.replicas.iter().map(|(a, m)| listed(a, *m)).collect(),
            }))
        })
    }

    async fn replica_get(&self, r: Request<ReplicaAddress>) -> R<ControllerReplica> {
        let address = r.into_inner().address;
        self.with(|s| {
            s.replicas
                .iter()
                .find(|(a, _)| *a == address)
                .map(|(a, m)| Response::new(listed(a, *m)))
                .ok_or_else(|| Status::unknown(format!("cannot find replica {address}")))
        })
    }

    /// Adds a replica: it must be closed and is opened; with `snapshot_required` every RW
    /// replica and the new one first take the same system snapshot, so the rebuild has a
    /// fixed point to copy up to. A replica the engine already has is answered as it is.
    async fn controller_replica_create(
        &self,
        r: Request<ControllerReplicaCreateRequest>,
    ) -> R<ControllerReplica> {
        let r = r.into_inner();
        let mode = ReplicaMode::try_from(r.mode).unwrap_or(ReplicaMode::Err);
        let existing = self.with(|s| {
            if mode == ReplicaMode::Wo && s.replicas.iter().any(|(_, m)| *m == ReplicaMode::Wo) {
                return Err(Status::unknown("can only have one WO replica at a time"));
            }
            Ok(s.replicas.iter().find(|(a, _)| *a == r.address).cloned())
        })?;
        if let Some((a, m)) = existing {
            return Ok(Response::new(listed(&a, m)));
        }
        self.open_replica(&r.address).await?;
        if r.snapshot_required && mode != ReplicaMode::Err && !self.healthy()?.is_empty() {
            self.can_snapshot().await?;
            let name = super::uuid();
            let created = super::now_rfc3339();
            let mut targets = self.replicas_in(ReplicaMode::Rw)?;
            targets.push(r.address.clone());
            for address in targets {
                let req = ReplicaSnapshotRequest {
                    name: name.clone(),
                    user_created: false,
                    created: created.clone(),
                    labels: HashMap::new(),
                };
                self.client(&address)?
                    .replica_snapshot(self.req(req))
                    .await
                    .map_err(|e| {
                        Status::unknown(format!(
                            "failed to snapshot replica {address} before adding {}: {}",
                            r.address,
                            e.message()
                        ))
                    })?;
            }
        }
        self.with(|s| {
            s.replicas.push((r.address.clone(), mode));
            Ok(())
        })?;
        Ok(Response::new(listed(&r.address, mode)))
    }

    async fn replica_delete(&self, r: Request<ReplicaAddress>) -> R<()> {
        let address = r.into_inner().address;
        let had = self.with(|s| {
            let last = s.replicas.len() == 1 && s.replicas[0].0 == address;
            if last && s.volume.frontend_state == "up" {
                return Err(Status::unknown(
                    "cannot remove last replica if volume is up",
                ));
            }
            // An address the engine does not have is no error.
            let before = s.replicas.len();
            s.replicas.retain(|(a, _)| *a != address);
            Ok(s.replicas.len() != before)
        })?;
        if let Ok(mut data) = self.data.lock() {
            data.remove(&address);
        }
        if had {
            // Closing its backend closes the replica, which can join again later.
            if let Ok(mut client) = self.client(&address) {
                let _ = client.replica_close(self.req(())).await;
            }
        }
        Ok(Response::new(()))
    }

    /// Only RW and ERR can be set; an ERR replica stays ERR.
    async fn replica_update(&self, r: Request<ControllerReplica>) -> R<ControllerReplica> {
        let r = r.into_inner();
        let address = r.address.clone().map(|a| a.address).unwrap_or_default();
        let mode = ReplicaMode::try_from(r.mode).unwrap_or(ReplicaMode::Err);
        if mode == ReplicaMode::Wo {
            return Err(Status::unknown("cannot set to mode WO"));
        }
        self.with(|s| {
            let volume = s.volume.name.clone();
            match s.replicas.iter_mut().find(|(a, _)| *a == address) {
                Some(entry) => {
                    if entry.1 != ReplicaMode::Err {
                        entry.1 = mode;
                    }
                    Ok(Response::new(listed(&entry.0, entry.1)))
                }
                None => Err(Status::not_found(format!(
                    "cannot find the replica with address {address} in the controller server of volume {volume}"
                ))),
            }
        })
    }

    /// The files a new WO replica needs: the snapshot files of the last RW replica.
    async fn replica_prepare_rebuild(
        &self,
        r: Request<ReplicaAddress>,
    ) -> R<ReplicaPrepareRebuildReply> {
        let address = r.into_inner().address;
        let mode = self.with(|s| {
            s.replicas
                .iter()
                .find(|(a, _)| *a == address)
                .map(|(_, m)| *m)
                .ok_or_else(|| Status::unknown(format!("cannot find replica {address}")))
        })?;
        if mode != ReplicaMode::Wo {
            return Err(Status::unknown(format!(
                "invalid mode {} for replica {address} to prepare rebuild",
                mode_name(mode)
            )));
        }
        let source = self
            .replicas_in(ReplicaMode::Rw)?
            .into_iter()
            .next_back()
            .ok_or_else(|| Status::unknown("cannot find any healthy replica"))?;
        let info = self
            .client(&source)?
            .replica_get(self.req(()))
            .await
            .map_err(|e| {
                Status::unknown(format!("cannot get replica for {source}: {}", e.message()))
            })?
            .into_inner()
            .replica
            .unwrap_or_default();
        let sync_file_info_list = info
            .chain
            .iter()
            .filter(|f| **f != info.head && **f != info.backing_file)
            .map(|f| SyncFileInfo {
                from_file_name: f.clone(),
                to_file_name: f.clone(),
                actual_size: info
                    .disks
                    .get(f)
                    .and_then(|d| d.size.parse().ok())
                    .unwrap_or(0),
            })
            .collect();
        Ok(Response::new(ReplicaPrepareRebuildReply {
            replica: Some(listed(&address, mode)),
            sync_file_info_list,
        }))
    }

    async fn replica_verify_rebuild(&self, r: Request<ReplicaAddress>) -> R<ControllerReplica> {
        let address = r.into_inner().address;
        self.with(
            |s| match s.replicas.iter_mut().find(|(a, _)| *a == address) {
                Some((_, mode)) if *mode == ReplicaMode::Rw => Ok(()),
                Some((_, mode)) if *mode == ReplicaMode::Wo => {
                    *mode = ReplicaMode::Rw;
                    Ok(())
                }
                Some((_, mode)) => Err(Status::unknown(format!(
                    "invalid mode {} for replica {address} to check",
                    mode_name(*mode)
                ))),
                None => Err(Status::unknown(format!("cannot find replica {address}"))),
            },
        )?;
        Ok(Response::new(listed(&address, ReplicaMode::Rw)))
    }

    async fn replica_rebuild_concurrent_sync_limit_set(
        &self,
        r: Request<ReplicaRebuildConcurrentSyncLimitSetRequest>,
    ) -> R<()> {
        let limit = r.into_inner().limit;
        if limit <= 0 {
            return Err(Status::unknown(format!(
                "invalid concurrent sync limit {limit}, which should be a positive integer"
            )));
        }
        self.with(|s| {
            s.sync_limit = limit;
            Ok(())
        })?;
        Ok(Response::new(()))
    }

    async fn replica_rebuild_concurrent_sync_limit_get(
        &self,
        _r: Request<()>,
    ) -> R<ReplicaRebuildConcurrentSyncLimitGetReply> {
        let limit = self.with(|s| Ok(s.sync_limit))?;
        Ok(Response::new(ReplicaRebuildConcurrentSyncLimitGetReply {
            limit,
        }))
    }

    async fn journal_list(&self, _r: Request<JournalListRequest>) -> R<()> {
        Ok(Response::new(()))
    }

    async fn version_detail_get(&self, _r: Request<()>) -> R<VersionDetailGetReply> {
        let (version, cli, cli_min, controller, controller_min) =
            versions(self.with(|s| Ok(s.release))?);
        Ok(Response::new(VersionDetailGetReply {
            version: Some(VersionOutput {
                version: version.into(),
                git_commit: "simulated".into(),
                build_date: "2026-11-27T00:00:00Z".into(),
                cli_api_version: cli,
                cli_api_min_version: cli_min,
                controller_api_version: controller,
                controller_api_min_version: controller_min,
                data_format_version: 1,
                data_format_min_version: 1,
            }),
        }))
    }

    /// The last whole second of frontend I/O: bytes/s, average latency (ns) and ops/s.
    async fn metrics_get(&self, _r: Request<()>) -> R<MetricsGetReply> {
        let metrics = self.with(|s| Ok(s.last_io))?;
        Ok(Response::new(MetricsGetReply {
            metrics: Some(metrics),
        }))
    }
}
