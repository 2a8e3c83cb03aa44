//! A simulated longhorn-engine controller: `ControllerService` with a volume's real state, which
//! drives its replicas over gRPC (`ReplicaService`) as the real engine does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lhnet_proto::ptypes::controller_service_server::{ControllerService, ControllerServiceServer};
use lhnet_proto::ptypes::replica_service_client::ReplicaServiceClient;
use lhnet_proto::ptypes::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::dataconn::{Block, DataClient};

/// The engine's volume and replica set.
#[derive(Clone)]
pub struct SimEngine {
    state: Arc<Mutex<EngineState>>,
    clients: Arc<Mutex<HashMap<String, ReplicaServiceClient<Channel>>>>,
    /// One data connection (replica port P+1) per replica, opened on first use.
    data: Arc<Mutex<HashMap<String, DataSlot>>>,
}

type DataSlot = Arc<tokio::sync::Mutex<Option<DataClient>>>;

struct EngineState {
    volume: Volume,
    /// `tcp://IP:PORT` → mode, in the order they were added.
    replicas: Vec<(String, ReplicaMode)>,
}

type R<T> = Result<Response<T>, Status>;

impl SimEngine {
    pub fn new(name: &str, size: i64, replicas: Vec<String>) -> SimEngine {
        SimEngine {
            state: Arc::new(Mutex::new(EngineState {
                volume: Volume {
                    name: name.to_string(),
                    size,
                    replica_count: 0,
                    endpoint: String::new(),
                    frontend: String::new(),
                    frontend_state: "down".into(),
                    is_expanding: false,
                    last_expansion_error: String::new(),
                    last_expansion_failed_at: String::new(),
                },
                replicas: replicas.into_iter().map(|r| (r, ReplicaMode::Rw)).collect(),
            })),
            clients: Arc::new(Mutex::new(HashMap::new())),
            data: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The replica monitor: pings each replica's data connection every second while anything
    /// else holds the engine, and marks the ones that stop answering ERR.
    pub(crate) fn spawn_monitor(&self) {
        let weak = Arc::downgrade(&self.state);
        let clients = self.clients.clone();
        let data = self.data.clone();
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
                };
                engine.monitor_once().await;
            }
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
impl Block for SimEngine {
    async fn write_at(&self, offset: i64, data: Vec<u8>) -> Result<(), String> {
        self.frontend_up()?;
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
        let sources = self
            .replicas_in(ReplicaMode::Rw)
            .map_err(|e| e.message().to_string())?;
        let mut last = "volume has no RW replica".to_string();
        for address in sources {
            match self
                .data_call(&address, async |c| c.read_at(offset, len).await)
                .await
            {
                Ok(data) => return Ok(data),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

fn replica_list(s: &EngineState) -> ReplicaListReply {
    ReplicaListReply {
        replicas: s
            .replicas
            .iter()
            .map(|(a, m)| ControllerReplica {
                address: Some(ReplicaAddress { address: a.clone() }),
                mode: *m as i32,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl ControllerService for SimEngine {
    async fn volume_get(&self, _r: Request<()>) -> R<Volume> {
        Self::reply(self.volume()?)
    }

    async fn volume_start(&self, r: Request<VolumeStartRequest>) -> R<Volume> {
        let r = r.into_inner();
        self.with(|s| {
            if !s.replicas.is_empty() {
                return Err(Status::unknown("volume is already started"));
            }
            s.replicas = r
                .replica_addresses
                .into_iter()
                .map(|a| (a, ReplicaMode::Rw))
                .collect();
            if r.size > 0 {
                s.volume.size = r.size;
            }
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

    async fn volume_snapshot(&self, r: Request<VolumeSnapshotRequest>) -> R<VolumeSnapshotReply> {
        let r = r.into_inner();
        let name = if r.name.is_empty() {
            uuid_like()
        } else {
            r.name
        };
        let created = super::replica_now();
        for address in self.replicas_in(ReplicaMode::Rw)? {
            let mut client = self.client(&address)?;
            let req = ReplicaSnapshotRequest {
                name: name.clone(),
                user_created: true,
                created: created.clone(),
                labels: r.labels.clone(),
            };
            if let Err(e) = client.replica_snapshot(req).await {
                if e.message().contains("too many snapshots") {
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
                .replica_revert(ReplicaRevertRequest {
                    name: name.clone(),
                    created: super::replica_now(),
                })
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
                "cannot shrink volume from {current} to {size}"
            )));
        }
        for address in self.replicas_in(ReplicaMode::Rw)? {
            let mut client = self.client(&address)?;
            if let Err(e) = client.replica_expand(ReplicaExpandRequest { size }).await {
                self.with(|s| {
                    s.volume.last_expansion_error = e.message().to_string();
                    s.volume.last_expansion_failed_at = super::replica_now();
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
        if frontend != "tgt-blockdev" && frontend != "tgt-iscsi" {
            return Err(Status::unknown(format!(
                "unsupported frontend {frontend:?}; use tgt-blockdev or tgt-iscsi"
            )));
        }
        self.with(|s| {
            if s.volume.frontend_state == "up" {
                return Err(Status::unknown("frontend is already up"));
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

    async fn replica_list(&self, _r: Request<()>) -> R<ReplicaListReply> {
        self.with(|s| Ok(Response::new(replica_list(s))))
    }

    async fn replica_get(&self, r: Request<ReplicaAddress>) -> R<ControllerReplica> {
        let address = r.into_inner().address;
        self.with(|s| {
            s.replicas
                .iter()
                .find(|(a, _)| *a == address)
                .map(|(a, m)| {
                    Response::new(ControllerReplica {
                        address: Some(ReplicaAddress { address: a.clone() }),
                        mode: *m as i32,
                    })
                })
                .ok_or_else(|| Status::unknown(format!("cannot find replica {address}")))
        })
    }

    /// Adds a replica; with `snapshot_required` every RW replica and the new one first take the
    /// same snapshot, so the rebuild has a fixed point to copy up to.
    async fn controller_replica_create(
        &self,
        r: Request<ControllerReplicaCreateRequest>,
    ) -> R<ControllerReplica> {
        let r = r.into_inner();
        let mode = ReplicaMode::try_from(r.mode).unwrap_or(ReplicaMode::Wo);
        if self.with(|s| Ok(s.replicas.iter().any(|(a, _)| *a == r.address)))? {
            return Err(Status::unknown(format!(
                "replica {} is already in the volume",
                r.address
            )));
        }
        if r.snapshot_required {
            let name = uuid_like();
            let created = super::replica_now();
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
                    .replica_snapshot(req)
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
        Ok(Response::new(ControllerReplica {
            address: Some(ReplicaAddress { address: r.address }),
            mode: mode as i32,
        }))
    }

    async fn replica_delete(&self, r: Request<ReplicaAddress>) -> R<()> {
        let address = r.into_inner().address;
        self.with(|s| {
            let before = s.replicas.len();
            s.replicas.retain(|(a, _)| *a != address);
            if s.replicas.len() == before {
                return Err(Status::unknown(format!("cannot find replica {address}")));
            }
            Ok(())
        })?;
        Ok(Response::new(()))
    }

    async fn replica_update(&self, r: Request<ControllerReplica>) -> R<ControllerReplica> {
        let r = r.into_inner();
        let address = r.address.clone().map(|a| a.address).unwrap_or_default();
        let mode =
            ReplicaMode::try_from(r.mode).map_err(|_| Status::invalid_argument("bad mode"))?;
        self.with(
            |s| match s.replicas.iter_mut().find(|(a, _)| *a == address) {
                Some(entry) => {
                    entry.1 = mode;
                    Ok(())
                }
                None => Err(Status::unknown(format!("cannot find replica {address}"))),
            },
        )?;
        Ok(Response::new(r))
    }

    /// The files a new WO replica needs: the first RW replica's snapshot files.
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
                "replica {address} is {mode:?}, not WO: nothing to rebuild"
            )));
        }
        let source = self
            .replicas_in(ReplicaMode::Rw)?
            .into_iter()
            .next()
            .ok_or_else(|| Status::unknown("no RW replica to rebuild from"))?;
        let info = self
            .client(&source)?
            .replica_get(())
            .await
            .map_err(|e| {
                Status::unknown(format!(
                    "failed to get source replica {source}: {}",
                    e.message()
                ))
            })?
            .into_inner()
            .replica
            .unwrap_or_default();
        let sync_file_info_list = info
            .chain
            .iter()
            .filter(|f| **f != info.head)
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
            replica: Some(ControllerReplica {
                address: Some(ReplicaAddress { address }),
                mode: mode as i32,
            }),
            sync_file_info_list,
        }))
    }

    async fn replica_verify_rebuild(&self, r: Request<ReplicaAddress>) -> R<ControllerReplica> {
        let address = r.into_inner().address;
        self.with(
            |s| match s.replicas.iter_mut().find(|(a, _)| *a == address) {
                Some((_, mode)) if *mode == ReplicaMode::Wo => {
                    *mode = ReplicaMode::Rw;
                    Ok(())
                }
                Some((_, mode)) => Err(Status::unknown(format!(
                    "replica {address} is in mode {mode:?}, not WO: nothing to verify"
                ))),
                None => Err(Status::unknown(format!("cannot find replica {address}"))),
            },
        )?;
        Ok(Response::new(ControllerReplica {
            address: Some(ReplicaAddress { address }),
            mode: ReplicaMode::Rw as i32,
        }))
    }

    async fn journal_list(&self, _r: Request<JournalListRequest>) -> R<()> {
        Ok(Response::new(()))
    }

    async fn version_detail_get(&self, _r: Request<()>) -> R<VersionDetailGetReply> {
        Ok(Response::new(VersionDetailGetReply {
            version: Some(VersionOutput {
                version: "v1.3.3-lhnet-sim".into(),
                git_commit: "simulated".into(),
                build_date: "2026-11-27T00:00:00Z".into(),
                cli_api_version: 5,
                cli_api_min_version: 3,
                controller_api_version: 3,
                controller_api_min_version: 3,
                data_format_version: 1,
                data_format_min_version: 1,
            }),
        }))
    }

    type MetricGetStream = ReceiverStream<Result<MetricGetReply, Status>>;

    async fn metric_get(&self, _r: Request<()>) -> R<Self::MetricGetStream> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx
            .send(Ok(MetricGetReply {
                metric: Some(Metric::default()),
            }))
            .await;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A random-looking snapshot name like the engine's UUIDs.
fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let a = h.finish();
    h.write_u64(a);
    let b = h.finish();
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}
