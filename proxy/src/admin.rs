//! The admin server, on its own thread and runtime so a busy data plane cannot starve it:
//! `/metrics`, `/ready`, `/live`, `/config_dump`, `/storage`, and `POST /shutdown` (loopback only).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::storage::StorageState;

/// What the admin endpoints report on.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub storage: Arc<StorageState>,
    pub config: Arc<ArcSwap<Config>>,
    pub ready: watch::Receiver<bool>,
    pub shutdown: CancellationToken,
}

/// Binds the admin address (first, so errors surface at start and the listeners know the
/// port they must never forward to).
pub fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| std::io::Error::new(e.kind(), format!("admin: cannot bind {address}: {e}")))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the bound admin listener on a new thread.
pub fn spawn(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let local = listener.local_addr()?;
    let handle = std::thread::Builder::new()
        .name("lhnet-admin".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin: cannot start its runtime");
                    return;
                }
            };
            runtime.block_on(serve(listener, state));
        })?;
    Ok((local, handle))
}

async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin: cannot register the listener");
            return;
        }
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin: accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, req, peer)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn respond(state: &AdminState, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics" | "/stats/prometheus") => {
            let mut r = text(StatusCode::OK, state.metrics.render());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if *state.ready.borrow() {
                text(StatusCode::OK, "ready\n")
            } else {
                let why = state
                    .storage
                    .last_error()
                    .unwrap_or_else(|| "listeners are not serving".into());
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n"))
            }
        }
        (&Method::GET, "/config_dump") => json(&serde_json::to_value(&**state.config.load()).unwrap_or_default()),
        (&Method::GET, "/storage") => {
            let current = state.storage.current();
            json(&serde_json::json!({
                "interface": state.storage.interface(),
                "address": current.as_ref().map(|a| a.ip.to_string()),
                "device": current.as_ref().and_then(|a| a.device.clone()),
                "source": current.as_ref().map(|a| a.source.as_str()),
                "error": state.storage.last_error(),
            }))
        }
        (&Method::POST, "/shutdown") => {
            if !peer.ip().is_loopback() {
                return text(StatusCode::FORBIDDEN, format!("shutdown is only accepted from loopback, not {peer}\n"));
            }
            tracing::info!(%peer, "shutdown requested on the admin server");
            state.shutdown.cancel();
            text(StatusCode::OK, "shutting down\n")
        }
        (_, "/metrics" | "/live" | "/ready" | "/config_dump" | "/storage" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        (_, path) => text(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint {path}; try /metrics, /ready, /live, /config_dump, /storage, POST /shutdown\n"),
        ),
    }
}
