//! Backup egress (`kind: http_connect` listeners): an HTTP forward proxy on loopback whose
//! upstream connections leave from the storage address (and, if configured, are bound to the
//! storage device), so a replica's backup upload or restore download goes out on `lhnet1`
//! instead of the pod's default route.
//!
//! It serves what HTTP clients send a proxy: `CONNECT HOST:PORT` (https targets: a tunnel, bytes
//! copied both ways) and absolute-form requests `GET http://HOST:PORT/…` (http targets: each
//! request forwarded on a new upstream connection, hop-by-hop headers dropped). Every
//! destination is checked against `backup_target.allowed_endpoints` first, and a name's
//! addresses after it resolves: a refusal is `403` with the reason, nothing dialled. Bytes are
//! counted per target (`lhnet_backup_egress_{receive,transmit}_bytes_total`) and, as every
//! upstream connection, per device (`lhnet_interface_*`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use lhnet_backupstore::endpoints::Destination;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Connector;
use crate::config::{format_duration, ListenAddress, ListenerConfig};
use crate::engine_proxy::BackupTargets;
use crate::metrics::{CountedIo, Metrics};
use crate::storage::StorageState;

/// A client must send its request head within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head read.
const MAX_HEAD: usize = 64 << 10;

type Body = BoxBody<Bytes, hyper::Error>;

/// One `kind: http_connect` listener.
pub struct EgressListener {
    name: Arc<str>,
    listener: TcpListener,
    local_addr: SocketAddr,
    connector: Connector,
    connect_timeout: Duration,
    /// Where the destination policy lives (it follows config reloads).
    backups: Arc<BackupTargets>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    max_connections: usize,
    tasks: TaskTracker,
}

/// Why a request was not forwarded: the status answered, the metric result, the text.
struct Refusal(StatusCode, &'static str, String);

impl EgressListener {
    pub async fn bind(
        config: &ListenerConfig,
        storage: Arc<StorageState>,
        metrics: Arc<Metrics>,
        backups: Arc<BackupTargets>,
    ) -> Result<EgressListener, String> {
        let ListenAddress::Socket(address) = config.address else {
            return Err(format!(
                "listener {}: an http_connect listener binds one loopback address",
                config.name
            ));
        };
        let egress = config.egress.clone().unwrap_or_default();
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| format!("listener {}: cannot bind {address}: {e}", config.name))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| format!("listener {}: {e}", config.name))?;
        Ok(EgressListener {
            name: config.name.as_str().into(),
            listener,
            local_addr,
            connector: Connector::standalone(
                &config.name,
                egress.source_address,
                egress.bind_to_device,
                egress.connect_timeout,
                storage,
                metrics.clone(),
            ),
            connect_timeout: egress.connect_timeout,
            backups,
            metrics,
            slots: Arc::new(Semaphore::new(egress.max_connections)),
            max_connections: egress.max_connections,
            tasks: TaskTracker::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown`; then waits up to `drain_timeout` for open tunnels.
    pub async fn run(self, shutdown: CancellationToken, drain_timeout: Duration) {
        let me = Arc::new(self);
        tracing::info!(listener = %me.name, address = %me.local_addr, "backup egress (http_connect) listening");
        let kill = CancellationToken::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = me.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(listener = %me.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = me.slots.clone().try_acquire_owned() else {
                me.metrics.egress_connection(&me.name, "limit");
                me.metrics.limit_reached(&me.name, "max_connections", || {
                    format!(
                        "backup egress {}: {} connections open (max_connections); refusing {peer}",
                        me.name, me.max_connections
                    )
                });
                drop(stream);
                continue;
            };
            let (conn, kill) = (me.clone(), kill.clone());
            me.tasks.spawn(async move {
                tokio::select! {
                    _ = conn.serve(stream) => {}
                    _ = kill.cancelled() => {}
                }
                drop(slot);
            });
        }
        me.tasks.close();
        if tokio::time::timeout(drain_timeout, me.tasks.wait())
            .await
            .is_err()
        {
            tracing::info!(listener = %me.name, "backup egress connections still open after drain_timeout {}; closing them", format_duration(drain_timeout));
            kill.cancel();
            me.tasks.wait().await;
        }
    }

    /// One client connection: HTTP/1.1 requests until it closes.
    async fn serve(self: &Arc<Self>, stream: TcpStream) {
        let me = self.clone();
        let service = hyper::service::service_fn(move |request| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEAD)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        if let Err(e) = connection.await {
            tracing::debug!(listener = %self.name, error = %e, "backup egress client connection ended");
        }
    }

    async fn handle(self: &Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let outcome = if request.method() == Method::CONNECT {
            self.tunnel(request).await
        } else if request.uri().scheme_str() == Some("http") {
            self.forward(request).await
        } else {
            Err(Refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "{} {}: lhnet's backup egress is a forward proxy; send CONNECT HOST:PORT (https targets) or an absolute http:// URL (http targets)",
                    request.method(),
                    request.uri()
                ),
            ))
        };
        match outcome {
            Ok(response) => {
                self.metrics.egress_connection(&self.name, "ok");
                response
            }
            Err(Refusal(status, result, text)) => {
                self.metrics.egress_connection(&self.name, result);
                tracing::warn!(listener = %self.name, status = status.as_u16(), "backup egress: {text}");
                text_response(status, text)
            }
        }
    }

    /// `CONNECT HOST:PORT`: dial, answer 200, then copy bytes both ways.
    async fn tunnel(
        self: &Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, Refusal> {
        let (host, port) = authority(request.uri(), None).ok_or_else(|| {
            Refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("CONNECT {}: write CONNECT HOST:PORT", request.uri()),
            )
        })?;
        let mut upstream = self.dial("CONNECT to", &host, port).await?;
        let name = self.name.clone();
        self.tasks.spawn(async move {
            match hyper::upgrade::on(request).await {
                Ok(upgraded) => {
                    let mut client = TokioIo::new(upgraded);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                        tracing::debug!(listener = %name, target = %format!("{host}:{port}"), error = %e, "backup egress tunnel ended");
                    }
                }
                Err(e) => {
                    tracing::debug!(listener = %name, error = %e, "backup egress: the client left before the tunnel started")
                }
            }
        });
        Ok(Response::new(empty()))
    }

    /// An absolute-form request: sent on as origin-form over a new upstream connection.
    async fn forward(
        self: &Arc<Self>,
        mut request: Request<Incoming>,
    ) -> Result<Response<Body>, Refusal> {
        let (host, port) = authority(request.uri(), Some(80)).ok_or_else(|| {
            Refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{}: no host in the URL", request.uri()),
            )
        })?;
        let upstream = self.dial("a request to", &host, port).await?;
        let failed = |e: hyper::Error| {
            Refusal(
                StatusCode::BAD_GATEWAY,
                "failed",
                format!("{host}:{port}: {}", crate::cluster::error_chain(&e)),
            )
        };
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(upstream))
                .await
                .map_err(failed)?;
        let name = self.name.clone();
        self.tasks.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(listener = %name, error = %e, "backup egress upstream connection ended");
            }
        });
        let origin = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse::<Uri>()
            .unwrap_or_else(|_| Uri::from_static("/"));
        if !request.headers().contains_key(header::HOST) {
            let shown = if port == 80 {
                host.clone()
            } else {
                format!("{host}:{port}")
            };
            if let Ok(value) = shown.parse() {
                request.headers_mut().insert(header::HOST, value);
            }
        }
        *request.uri_mut() = origin;
        drop_hop_by_hop(request.headers_mut());
        let mut response = sender.send_request(request).await.map_err(failed)?;
        drop_hop_by_hop(response.headers_mut());
        Ok(response.map(|body| body.boxed()))
    }

    /// A connection to `host:port` from the storage address, if the policy allows it there,
    /// counted for that target.
    async fn dial(
        &self,
        key: &str,
        host: &str,
        port: u16,
    ) -> Result<CountedIo<CountedIo<TcpStream>>, Refusal> {
        let policy = self.backups.endpoints();
        let refused = |text: String| Refusal(StatusCode::FORBIDDEN, "refused", text);
        policy
            .check(Destination { key, host, port })
            .map_err(refused)?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addresses: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let unresolved = |why: String| {
                    Refusal(
                        StatusCode::BAD_GATEWAY,
                        "failed",
                        format!("{key} {host}:{port}: cannot resolve {host}: {why}"),
                    )
                };
                let found = tokio::time::timeout(
                    self.connect_timeout,
                    tokio::net::lookup_host((bare, port)),
                )
                .await
                .map_err(|_| {
                    unresolved(format!(
                        "no answer within connect_timeout {}",
                        format_duration(self.connect_timeout)
                    ))
                })?
                .map_err(|e| unresolved(e.to_string()))?;
                policy
                    .check_resolved(bare, found)
                    .map_err(|e| refused(format!("{key} {e}")))?
            }
        };
        let mut failures = Vec::new();
        for address in addresses {
            match self.connector.connect(address).await {
                Ok(io) => {
                    let counters = self
                        .metrics
                        .egress_bytes(&self.name, &format!("{bare}:{port}"));
                    return Ok(CountedIo::new(io, counters, None));
                }
                Err(e) => {
                    self.metrics.upstream_connect_error(&self.name, e.reason);
                    failures.push(e.message);
                }
            }
        }
        Err(Refusal(
            StatusCode::BAD_GATEWAY,
            "failed",
            format!("{key} {host}:{port}: {}", failures.join("; ")),
        ))
    }
}

/// The host (IPv6 in brackets, as written) and port of an authority-form or absolute URI;
/// `default` when the URI has no port.
fn authority(uri: &Uri, default: Option<u16>) -> Option<(String, u16)> {
    let authority = uri.authority()?;
    let host = authority.host();
    if host.is_empty() {
        return None;
    }
    let port = authority.port_u16().or(default)?;
    Some((host.to_string(), port))
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), and the ones a `Connection` header names.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|n| n.trim().to_ascii_lowercase()))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ] {
        headers.remove(name);
    }
    headers.remove(header::CONNECTION);
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(text + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
