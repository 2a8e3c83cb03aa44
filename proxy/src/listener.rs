//! Management listeners: accept h2c connections and hand every request to the route table.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{format_duration, Http2Options};
use crate::metrics::{CountedIo, Metrics};
use crate::route::RouteTable;
use crate::storage::StorageState;

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
