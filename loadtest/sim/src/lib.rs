//! A simulated Longhorn v1.12.1 engine and replicas: real gRPC servers on real sockets, laid out
//! like longhorn-engine (engine `ControllerService` on its port; replica `ReplicaService` on P,
//! the dataconn data server on P+1, `SyncAgentService` on P+2 and file receivers on P+3..=P+12),
//! holding real state and moving real bytes. They stand in for Longhorn's Go binaries, which
//! cannot be built here; lhnet's proxy does not depend on them.
//!
//! Each server checks the identity metadata as longhorn-engine does and can record the requests
//! it gets ([`guard`]), so tests can see what reached it.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

/// Longhorn's backupstore format, shared with lhnet-proxy (which serves the backup-target RPCs
/// from it); the simulated sync agents write and read their backups with it.
pub use lhnet_backupstore as backupstore;

mod agent;
mod backup;
pub mod dataconn;
mod engine;
pub mod guard;
mod hash;
mod health;
mod replica;
mod sync;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;

pub use engine::SimEngine;
pub use guard::{Call, Names, Record};

pub use replica::{SimReplica, MAX_SNAPSHOTS};

/// A running simulated process (engine, or one of a replica's servers).
pub struct Served {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Served {
    /// TCP connections accepted so far (tests use it to prove reuse and no-dial).
    pub fn accepted(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// Dropping a server stops it like a process that exits: no new connections, GOAWAY on the
/// open ones.
impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves gRPC services on `listener` behind the identity check and the record.
fn serve(
    listener: TcpListener,
    guard: guard::Guard,
    add: impl FnOnce(
        tonic::transport::Server<tower_layer::Stack<guard::Guard, tower_layer::Identity>>,
    ) -> tonic::transport::server::Router<
        tower_layer::Stack<guard::Guard, tower_layer::Identity>,
    >,
) -> std::io::Result<Served> {
    let addr = listener.local_addr()?;
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |s| {
        counter.fetch_add(1, Ordering::SeqCst);
        // Go sets TCP_NODELAY on every connection; without it a reply written as several
        // HTTP/2 frames waits out the peer's delayed ACK (~40 ms).
        if let Ok(stream) = &s {
            let _ = stream.set_nodelay(true);
        }
        s
    });
    // Windows as large as grpc-go's grow to (its BDP estimator): with tonic's 64 KiB the h2
    // server's small-frame budget (half the window) closes a connection that has a few hundred
    // small calls waiting, which Longhorn's engine never does.
    let router = add(tonic::transport::Server::builder()
        .initial_connection_window_size(Some(4 << 20))
        .initial_stream_window_size(Some(1 << 20))
        .layer(guard));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let signal = async {
            let _ = stopped.await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
            eprintln!("simulator server on {addr} stopped: {e}");
        }
    });
    Ok(Served {
        addr,
        accepts,
        stop: Some(stop),
    })
}

/// Serves a raw TCP protocol: `handle` runs once per accepted connection.
fn serve_tcp<F, Fut>(listener: TcpListener, handle: F) -> std::io::Result<Served>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr()?;
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                        connections.spawn(handle(stream));
                    }
                    Err(e) => {
                        eprintln!("simulator server on {addr}: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        // Stopping drops the open connections too, like a process that exits.
        connections.abort_all();
    });
    Ok(Served {
        addr,
        accepts,
        stop: Some(stop),
    })
}

/// A dataconn server on `listener` over `block`.
fn serve_data<B: dataconn::Block + Clone>(
    listener: TcpListener,
    block: B,
) -> std::io::Result<Served> {
    let addr = listener.local_addr()?;
    serve_tcp(listener, move |stream| {
        let block = block.clone();
        async move {
            if let Err(e) = dataconn::serve_connection(stream, &block).await {
                eprintln!("data server {addr}: connection closed: {e}");
            }
        }
    })
}

/// Which longhorn-engine release a simulated process behaves as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Release {
    /// v1.3.3: no identity check (v1.5.2 added it), controller API 3 (no concurrent sync
    /// limit), and backups and restores without a `concurrent_limit` field (one worker).
    V1_3_3,
    /// v1.12.1: every check and field of today's engine.
    #[default]
    V1_12_1,
}

/// How an engine process is started (`longhorn controller <volume> --engine-instance-name …
/// --replica …`).
#[derive(Debug, Clone, Default)]
pub struct EngineSpec {
    pub release: Release,
    pub volume: String,
    /// Its instance name; empty: the engine checks no instance name.
    pub instance: String,
    pub size: i64,
    /// `tcp://IP:PORT` of each replica it starts with (opened at start, RW).
    pub replicas: Vec<String>,
}

/// A simulated engine serving on `addr` (port 0 picks one).
pub struct RunningEngine {
    pub engine: SimEngine,
    pub served: Served,
}

impl RunningEngine {
    /// What the engine received, once [`Record::start`] was called.
    pub fn record(&self) -> &Record {
        self.engine.record()
    }
}

/// An engine named `volume` (no instance name) with `replicas`.
pub async fn start_engine(
    addr: SocketAddr,
    volume: &str,
    size: i64,
    replicas: Vec<String>,
) -> std::io::Result<RunningEngine> {
    start_engine_with(
        addr,
        EngineSpec {
            volume: volume.into(),
            size,
            replicas,
            ..Default::default()
        },
    )
    .await
}

pub async fn start_engine_with(
    addr: SocketAddr,
    spec: EngineSpec,
) -> std::io::Result<RunningEngine> {
    let listener = TcpListener::bind(addr).await?;
    let engine = SimEngine::new(&spec);
    engine.open_replicas().await;
    engine.spawn_monitor();
    let guard = guard::Guard {
        names: Arc::new(names(
            spec.release,
            &spec.volume,
            &spec.instance,
            "controller",
        )),
        record: engine.record().clone(),
    };
    let server = engine.server();
    let served = serve(listener, guard, move |mut b| {
        b.add_service(server).add_service(health::server())
    })?;
    Ok(RunningEngine { served, engine })
}

/// The engine's frontend as a local block socket speaking dataconn (the real engine's is a
/// tgt block device): writes reach every RW and WO replica over their data connections.
/// Answers only while the volume's frontend is up.
pub async fn start_frontend(addr: SocketAddr, engine: &SimEngine) -> std::io::Result<Served> {
    serve_data(TcpListener::bind(addr).await?, engine.clone())
}

/// How a replica process is started (`longhorn replica <dir> --size … --volume-name …
/// --replica-instance-name …`). Empty names turn their checks off.
#[derive(Debug, Clone, Default)]
pub struct ReplicaSpec {
    pub release: Release,
    pub volume: String,
    pub instance: String,
    pub size: i64,
}

/// A simulated replica: ReplicaService on P, data on P+1, SyncAgentService on P+2.
pub struct RunningReplica {
    pub replica: SimReplica,
    pub service: Served,
    pub data: Served,
    pub sync_agent: Served,
}

impl RunningReplica {
    /// The address the engine and the manager use for it.
    pub fn url(&self) -> String {
        format!("tcp://{}", self.service.addr)
    }

    /// What the replica and its sync agent received, once [`Record::start`] was called.
    pub fn record(&self) -> &Record {
        self.replica.record()
    }
}

/// A replica without names (its identity checks are off), started closed as a new replica
/// process is.
pub async fn start_replica(addr: SocketAddr, size: i64) -> std::io::Result<RunningReplica> {
    start_replica_with(
        addr,
        ReplicaSpec {
            size,
            ..Default::default()
        },
    )
    .await
}

/// Starts a replica at `addr`; with port 0, finds a port P whose P+1 and P+2 are free too.
pub async fn start_replica_with(
    addr: SocketAddr,
    spec: ReplicaSpec,
) -> std::io::Result<RunningReplica> {
    let [service, data, agent] = if addr.port() == 0 {
        let mut found = None;
        for _ in 0..64 {
            let l = TcpListener::bind(addr).await?;
            let port = l.local_addr()?.port();
            if let Ok(rest) = bind_after(addr.ip(), port).await {
                let [d, a] = rest;
                found = Some([l, d, a]);
                break;
            }
        }
        found.ok_or_else(|| {
            std::io::Error::other("no port P with P+1 and P+2 free after 64 tries")
        })?
    } else {
        let [d, a] = bind_after(addr.ip(), addr.port()).await?;
        [TcpListener::bind(addr).await?, d, a]
    };
    let replica = SimReplica::new(&spec);
    replica.set_listen(service.local_addr()?);
    let guard = guard::Guard {
        names: Arc::new(names(spec.release, &spec.volume, &spec.instance, "replica")),
        record: replica.record().clone(),
    };
    let replica_server = replica.replica_server();
    let service = serve(service, guard.clone(), move |mut b| {
        b.add_service(replica_server).add_service(health::server())
    })?;
    let data = serve_data(data, replica.clone())?;
    let agent_server = replica.sync_agent_server();
    let sync_agent = serve(agent, guard, move |mut b| b.add_service(agent_server))?;
    Ok(RunningReplica {
        replica,
        service,
        data,
        sync_agent,
    })
}

/// The names a server checks: none before v1.5.2.
fn names(release: Release, volume: &str, instance: &str, server: &'static str) -> Names {
    match release {
        Release::V1_3_3 => Names {
            server,
            ..Default::default()
        },
        Release::V1_12_1 => Names {
            volume: volume.into(),
            instance: instance.into(),
            server,
        },
    }
}

/// Binds P+1 and P+2 on `ip`.
async fn bind_after(ip: std::net::IpAddr, port: u16) -> std::io::Result<[TcpListener; 2]> {
    let next = |n: u16| {
        port.checked_add(n)
            .ok_or_else(|| std::io::Error::other(format!("replica port {port} too high")))
    };
    Ok([
        TcpListener::bind(SocketAddr::new(ip, next(1)?)).await?,
        TcpListener::bind(SocketAddr::new(ip, next(2)?)).await?,
    ])
}

/// RFC 3339 UTC, second precision, as Longhorn writes disk and backup times.
pub fn now_rfc3339() -> String {
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

/// A random (v4) UUID, as the engine names snapshots it is not given a name for.
pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `tcp://IP:PORT` (or `IP:PORT`) of a replica, parsed.
pub(crate) fn replica_socket(address: &str) -> Result<SocketAddr, tonic::Status> {
    let host = address.strip_prefix("tcp://").unwrap_or(address);
    host.parse().map_err(|_| {
        tonic::Status::unknown(format!(
            "invalid replica address {address}, must have a port in it"
        ))
    })
}

/// A request carrying `volume-name` (and `instance-name` when given), as longhorn-engine's
/// clients send them.
pub(crate) fn named<T>(message: T, volume: &str, instance: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    for (key, value) in [("volume-name", volume), ("instance-name", instance)] {
        if let (false, Ok(v)) = (value.is_empty(), value.parse()) {
            r.metadata_mut().insert(key, v);
        }
    }
    r
}
