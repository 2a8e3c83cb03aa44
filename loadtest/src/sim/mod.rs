//! The simulated Longhorn engine and replicas: real gRPC servers on real sockets, laid out like
//! longhorn-engine (engine `ControllerService` on its port; replica `ReplicaService` on P, the
//! dataconn data server on P+1, `SyncAgentService` on P+2 and file receivers on P+3..=P+12),
//! holding real state. They stand in for Longhorn's Go binaries,
//! which cannot be built here, and are not part of the proxy.

/// The backupstore format lives in lhnet-proxy (it serves the backup-target RPCs from it); the
/// simulator writes its backups with it.
pub use lhnet_proxy::backupstore;
pub mod dataconn;
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
        // Go sets TCP_NODELAY on every connection; without it a reply written as several
        // HTTP/2 frames waits out the peer's delayed ACK (~40 ms).
        if let Ok(stream) = &s {
            let _ = stream.set_nodelay(true);
        }
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
    engine.spawn_monitor();
    let router = tonic::transport::Server::builder()
        .add_service(engine.server())
        .add_service(health());
    Ok(RunningEngine {
        served: serve(listener, router)?,
        engine,
    })
}

/// The engine's frontend as a local block socket speaking dataconn (the real engine's is a
/// tgt block device): writes reach every RW and WO replica over their data connections.
/// Answers only while the volume's frontend is up.
pub async fn start_frontend(addr: SocketAddr, engine: &SimEngine) -> std::io::Result<Served> {
    serve_data(TcpListener::bind(addr).await?, engine.clone())
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
}

/// Starts a replica at `addr`; with port 0, finds a port P whose P+1 and P+2 are free too.
pub async fn start_replica(addr: SocketAddr, size: i64) -> std::io::Result<RunningReplica> {
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
    let replica = SimReplica::new(size);
    replica.set_listen(service.local_addr()?);
    let service = serve(
        service,
        tonic::transport::Server::builder()
            .add_service(replica.replica_server())
            .add_service(health()),
    )?;
    let data = serve_data(data, replica.clone())?;
    let sync_agent = serve(
        agent,
        tonic::transport::Server::builder().add_service(replica.sync_agent_server()),
    )?;
    Ok(RunningReplica {
        replica,
        service,
        data,
        sync_agent,
    })
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
