//! Management listeners: accept h2c connections and hand every request to the route table.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use lhnet_netns::StorageAddress;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{format_duration, Http2Options};
use crate::metrics::{CountedIo, Metrics};
use crate::route::RouteTable;
use crate::storage::StorageState;
use crate::tcp::REBIND_EVERY;

/// A bound gRPC listener, ready to serve.
pub struct GrpcListener {
    pub name: Arc<str>,
    pub local_addr: SocketAddr,
    pub routes: Arc<ArcSwap<RouteTable>>,
    listener: TcpListener,
    http2: Http2Options,
}

impl GrpcListener {
    pub async fn bind(
        name: &str,
        address: SocketAddr,
        routes: Arc<ArcSwap<RouteTable>>,
        http2: Http2Options,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(address).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("listener {name}: cannot bind {address}: {e}"),
            )
        })?;
        Ok(GrpcListener {
            name: name.into(),
            local_addr: listener.local_addr()?,
            routes,
            listener,
            http2,
        })
    }

    /// Serves until `shutdown`, then stops accepting, sends GOAWAY on every connection and waits
    /// up to `drain_timeout` for their streams to finish.
    pub async fn serve(
        self,
        storage: Arc<StorageState>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        drain_timeout: Duration,
    ) {
        let graceful = GracefulShutdown::new();
        tracing::info!(listener = %self.name, address = %self.local_addr, "listening (gRPC, h2c)");
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(listener = %self.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().unwrap_or(self.local_addr);
            let (device, network) = storage.classify(local.ip());
            tracing::debug!(
                network = network.as_str(), listener = %self.name, local = %local, peer = %peer,
                device = %device, "connection accepted"
            );
            let io = TokioIo::new(CountedIo::new(
                stream,
                metrics.byte_counters(&device, network),
                None,
            ));
            let routes = self.routes.clone();
            let service = service_fn(move |request| {
                let table = routes.load_full();
                async move { Ok::<_, Infallible>(table.handle(request).await) }
            });
            let connection = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(self.http2.max_concurrent_streams)
                .initial_stream_window_size(self.http2.initial_stream_window_size)
                .initial_connection_window_size(self.http2.initial_connection_window_size)
                .serve_connection(io, service);
            let connection = graceful.watch(connection);
            let name = self.name.clone();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(listener = %name, peer = %peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(self.listener);
        let open = graceful.count();
        tracing::info!(listener = %self.name, connections = open, "draining");
        if tokio::time::timeout(drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = %self.name,
                "streams still open after drain_timeout {}; closing them", format_duration(drain_timeout)
            );
        }
    }
}

/// A gRPC listener on `storage:PORT` that follows the storage address: bound when the address
/// comes (lhnet starts without one under `fallback: wait`), rebound when it changes. The old
/// address stops accepting and its connections get GOAWAY and drain, so clients move over;
/// a port that cannot be bound is tried again every second.
pub struct StorageGrpcListener {
    pub name: Arc<str>,
    pub port: u16,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub http2: Http2Options,
    /// The address it accepts on now (none while it waits).
    pub bound: Arc<Mutex<Option<SocketAddr>>>,
    /// Subscribed before the first bind, so a change while binding is not missed.
    changes: watch::Receiver<Option<StorageAddress>>,
}

impl StorageGrpcListener {
    pub fn new(
        name: &str,
        port: u16,
        routes: Arc<ArcSwap<RouteTable>>,
        http2: Http2Options,
        storage: &StorageState,
    ) -> StorageGrpcListener {
        StorageGrpcListener {
            name: name.into(),
            port,
            routes,
            http2,
            bound: Arc::new(Mutex::new(None)),
            changes: storage.subscribe(),
        }
    }

    async fn bind(&self, ip: IpAddr) -> std::io::Result<GrpcListener> {
        GrpcListener::bind(
            &self.name,
            SocketAddr::new(ip, self.port),
            self.routes.clone(),
            self.http2.clone(),
        )
        .await
    }

    /// Binds on `ip`; a failure is logged and left to [`StorageGrpcListener::run`] to retry
    /// every [`REBIND_EVERY`].
    async fn bind_or_warn(&self, ip: IpAddr) -> Option<GrpcListener> {
        self.bind(ip)
            .await
            .inspect_err(|e| {
                tracing::warn!(
                    network = "storage", listener = %self.name, error = %e,
                    "cannot bind; trying again every {}s", REBIND_EVERY.as_secs()
                );
            })
            .ok()
    }

    /// Binds on the storage address there is now, if any.
    pub async fn bind_initial(&self, storage: &StorageState) -> Option<GrpcListener> {
        let listener = self.bind_or_warn(storage.current()?.ip).await?;
        self.set_bound(Some(listener.local_addr));
        Some(listener)
    }

    fn set_bound(&self, addr: Option<SocketAddr>) {
        if let Ok(mut b) = self.bound.lock() {
            *b = addr;
        }
    }

    /// Serves until `shutdown`, following the storage address; returns when every generation
    /// has drained.
    pub async fn run(
        self,
        initial: Option<GrpcListener>,
        storage: Arc<StorageState>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        drain_timeout: Duration,
    ) {
        let mut changes = self.changes.clone();
        let mut generations = Vec::new();
        let mut serving: Option<(IpAddr, CancellationToken)> = None;
        let mut pending = initial;
        let mut wanted = storage.current().map(|a| a.ip);
        if pending.is_none() && wanted.is_none() {
            tracing::warn!(
                network = "storage", listener = %self.name, port = self.port,
                "no storage address yet; the listener binds when {} gets one", storage.interface()
            );
        }
        loop {
            if let Some(listener) = pending.take() {
                let stop = shutdown.child_token();
                serving = Some((listener.local_addr.ip(), stop.clone()));
                self.set_bound(Some(listener.local_addr));
                generations.push(tokio::spawn(listener.serve(
                    storage.clone(),
                    metrics.clone(),
                    stop,
                    drain_timeout,
                )));
            }
            let waiting = wanted.is_some() && serving.is_none();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        shutdown.cancelled().await;
                        break;
                    }
                    wanted = storage.current().map(|a| a.ip);
                    if wanted == serving.as_ref().map(|(ip, _)| *ip) {
                        continue;
                    }
                    if let Some((old, stop)) = serving.take() {
                        tracing::info!(
                            network = "storage", listener = %self.name, old = %old,
                            new = %wanted.map(|i| i.to_string()).unwrap_or_else(|| "none".into()),
                            "storage address changed; rebinding (the old address drains)"
                        );
                        stop.cancel();
                        self.set_bound(None);
                    }
                    if let Some(ip) = wanted {
                        pending = self.bind_or_warn(ip).await;
                    }
                }
                _ = tokio::time::sleep(REBIND_EVERY), if waiting => {
                    if let Some(ip) = wanted {
                        pending = self.bind(ip).await.ok();
                    }
                }
            }
            generations.retain(|g| !g.is_finished());
        }
        self.set_bound(None);
        for g in generations {
            let _ = g.await;
        }
    }
}
