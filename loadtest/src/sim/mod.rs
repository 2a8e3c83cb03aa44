//! The simulated Longhorn engine and replicas: real gRPC servers on real sockets, laid out like
//! longhorn-engine (engine `ControllerService` on its port; replica `ReplicaService` on P and
//! `SyncAgentService` on P+2), holding real state. They stand in for Longhorn's Go binaries,
//! which cannot be built here, and are not part of the proxy.

pub mod backupstore;
mod engine;
mod replica;
mod sync;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;

pub use engine::SimEngine;
pub use replica::{SimReplica, MAX_SNAPSHOTS};

pub(crate) fn replica_now() -> String {
    replica::now_rfc3339()
}

/// A running simulated process (engine, or one of a replica's two servers).
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

fn serve(
    listener: TcpListener,
    router: tonic::transport::server::Router,
) -> std::io::Result<Served> {
    let addr = listener.local_addr()?;
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |s| {
        counter.fetch_add(1, Ordering::SeqCst);
        s
    });
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

fn health() -> lhnet_proto::health::health_server::HealthServer<lhnet_proxy::health::HealthService>
{
    // Always serving, like the engine's own health service while the process exists.
    let (tx, rx) = watch::channel(true);
    std::mem::forget(tx);
    lhnet_proxy::health::HealthService::server(rx)
}

/// A simulated engine serving on `addr` (port 0 picks one).
pub struct RunningEngine {
    pub engine: SimEngine,
    pub served: Served,
}

pub async fn start_engine(
    addr: SocketAddr,
    volume: &str,
    size: i64,
    replicas: Vec<String>,
) -> std::io::Result<RunningEngine> {
    let engine = SimEngine::new(volume, size, replicas);
    let listener = TcpListener::bind(addr).await?;
    let router = tonic::transport::Server::builder()
        .add_service(engine.server())
        .add_service(health());
    Ok(RunningEngine {
        served: serve(listener, router)?,
        engine,
    })
}

/// A simulated replica: ReplicaService on P, SyncAgentService on P+2.
pub struct RunningReplica {
    pub replica: SimReplica,
    pub service: Served,
    pub sync_agent: Served,
}

impl RunningReplica {
    /// The address the engine and the manager use for it.
    pub fn url(&self) -> String {
        format!("tcp://{}", self.service.addr)
    }
}

/// Starts a replica at `addr`; with port 0, finds a port P whose P+2 is free too.
pub async fn start_replica(addr: SocketAddr, size: i64) -> std::io::Result<RunningReplica> {
    let (service, agent) = if addr.port() == 0 {
        let mut found = None;
        for _ in 0..64 {
            let l = TcpListener::bind(addr).await?;
            let port = l.local_addr()?.port();
            let Some(agent_port) = port.checked_add(2) else {
                continue;
            };
            if let Ok(a) = TcpListener::bind(SocketAddr::new(addr.ip(), agent_port)).await {
                found = Some((l, a));
                break;
            }
        }
        found.ok_or_else(|| std::io::Error::other("no port P with P+2 free after 64 tries"))?
    } else {
        let agent_port = addr
            .port()
            .checked_add(2)
            .ok_or_else(|| std::io::Error::other("replica port too high"))?;
        (
            TcpListener::bind(addr).await?,
            TcpListener::bind(SocketAddr::new(addr.ip(), agent_port)).await?,
        )
    };
    let replica = SimReplica::new(size);
    let service = serve(
        service,
        tonic::transport::Server::builder()
            .add_service(replica.replica_server())
            .add_service(health()),
    )?;
    let sync_agent = serve(
        agent,
        tonic::transport::Server::builder().add_service(replica.sync_agent_server()),
    )?;
    Ok(RunningReplica {
        replica,
        service,
        sync_agent,
    })
}
