//! The connections to one upstream address: HTTP/2, multiplexed, reused, bounded in number,
//! closed when idle, and dialled again only after a back-off when dialling fails.

use parking_lot::Mutex;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;
use tokio_util::either::Either;

use bytes::Bytes;
use h2::client::SendRequest;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connect::{ConnectError, Connector};
use super::http2::{self, H2Body};
use super::{Cluster, UpstreamError};
use crate::cluster::error_chain;
use crate::reply::ProxyBody;

/// Limits of one endpoint's pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub max_connections: usize,
    /// A new connection opens when every open one has this many requests awaiting headers.
    pub streams_per_connection: usize,
    pub idle_timeout: Duration,
}

/// The pool for one address.
pub struct EndpointPool {
    pub addr: SocketAddr,
    authority: Authority,
    limits: PoolLimits,
    state: Mutex<State>,
    dialled: Notify,
    /// Milliseconds since `epoch` of the last request (for reaping idle pools).
    last_used: AtomicU64,
    epoch: Instant,
}

#[derive(Default)]
struct State {
    conns: Vec<Arc<Conn>>,
    dialling: usize,
    /// After a failed dial: no new dial before this instant; requests fail fast with `cause`.
    backoff: Option<Backoff>,
}

struct Backoff {
    until: Instant,
    failures: u32,
    cause: String,
}

struct Conn {
    send: SendRequest<Bytes>,
    /// Set when the connection's task ended (closed, failed, or stopped answering pings).
    closed: Arc<AtomicBool>,
    /// The local address it was bound to; when the storage address moves, connections from
    /// the old one take no new requests and close once their streams end.
    source: Option<IpAddr>,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
    /// Requests opened whose frames the connection's task has not yet written.
    backlog: Arc<http2::Backlog>,
}

/// A pool's worth when the address table is full: dead ones (no connection, none being
/// dialled: the address never answered or went away) go first, then the idle ones, least
/// recently used first; busy ones stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Dead,
    Idle(Instant),
    Busy,
}

/// What to do after looking at the pool.
enum Pick {
    Use(Arc<Conn>),
    Dial,
    Wait,
    Fail(String),
}

/// A connection just opened: its requests, its closed flag, its backlog, its local address.
type Opened = (
    SendRequest<Bytes>,
    Arc<AtomicBool>,
    Arc<http2::Backlog>,
    Option<IpAddr>,
);

const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Counts a request as in flight on a connection until its response headers arrive.
struct InFlight<'a> {
    conn: &'a Conn,
    pool: &'a EndpointPool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.conn
                .idle_since_ms
                .store(self.pool.now_ms(), Ordering::Relaxed);
        }
    }
}

impl EndpointPool {
    pub fn new(addr: SocketAddr, limits: PoolLimits) -> Result<EndpointPool, String> {
        let authority = Authority::try_from(addr.to_string().as_str())
            .map_err(|e| format!("{addr} is not a usable authority: {e}"))?;
        Ok(EndpointPool {
            addr,
            authority,
            limits,
            state: Mutex::new(State::default()),
            dialled: Notify::new(),
            last_used: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sends a request over a pooled connection, dialling one when needed. The request is held
    /// here once (the argument); the wait for its response holds little more than the
    /// connection (bench-footprint: memory per open call).
    // Written out on purpose (see the comment in the body).
    #[allow(clippy::manual_async_fn)]
    pub fn send(
        self: Arc<Self>,
        cluster: Arc<Cluster>,
        mut request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<H2Body>, UpstreamError>> + Send + 'static {
        // An async block, not an async fn: an async fn copies its arguments into locals, and
        // the request would then take two places in every open call's future.
        async move {
            self.last_used.store(self.now_ms(), Ordering::Relaxed);
            // The usual case, a connection with room, is decided here; waiting and dialling
            // are boxed, so their futures do not sit in every open call's.
            let connector = &cluster.connector;
            let conn = match self.pick(connector.wanted_source()) {
                Pick::Use(conn) => conn,
                picked => Box::pin(self.checkout(connector, picked)).await?,
            };
            *request.uri_mut() = self.upstream_uri(request.uri());
            http2::strip_connection_headers(request.headers_mut());
            conn.in_flight.fetch_add(1, Ordering::Relaxed);
            let _counted = InFlight {
                conn: &conn,
                pool: &self,
            };
            if !conn.backlog.try_take() {
                Box::pin(conn.backlog.take()).await;
            }
            let mut send = conn.send.clone();
            // The request is opened from this task (its waker, so a body that waits wakes
            // it), by a plain call: moved into a closure instead, it would take a second place
            // in this future.
            let ready =
                std::future::poll_fn(|cx| send.poll_ready(cx).map_ok(|()| cx.waker().clone()));
            let opened = match ready.await {
                Ok(waker) => http2::open(&mut send, request, &mut Context::from_waker(&waker)),
                Err(e) => Err(e),
            };
            let (response, body_task) = match opened {
                Ok((response, body_task)) => (response.await, body_task),
                Err(e) => {
                    conn.backlog.untake();
                    // The connection takes no new streams (GOAWAY, or it failed): no more
                    // requests go to it. A request h2 refuses for itself leaves it as it is.
                    if e.is_go_away() || e.is_io() || e.is_library() {
                        conn.closed.store(true, Ordering::Release);
                    }
                    (Err(e), None)
                }
            };
            match response {
                Ok(response) => Ok(response.map(|recv| H2Body::new(recv, body_task))),
                Err(e) => Err(self.failed(&e)),
            }
        }
    }

    /// A request that failed on its stream or connection, with the HTTP/2 reason.
    fn failed(&self, e: &h2::Error) -> UpstreamError {
        let cause = error_chain(e);
        let reason = e.reason();
        if reason == Some(h2::Reason::REFUSED_STREAM) {
            UpstreamError::Refused {
                destination: self.addr,
                cause,
            }
        } else {
            UpstreamError::Reset {
                destination: self.addr,
                reason,
                cause,
            }
        }
    }

    fn upstream_uri(&self, original: &Uri) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = original.path_and_query().cloned();
        Uri::from_parts(parts).unwrap_or_else(|_| original.clone())
    }

    /// A connection, from what `pick` said first: one with room, one dialled now, or the one a
    /// dial in progress gives. (Boxed by its caller, so the dial's future, over a kilobyte,
    /// does not sit in every open call's.)
    async fn checkout(
        &self,
        connector: &Connector,
        mut picked: Pick,
    ) -> Result<Arc<Conn>, UpstreamError> {
        let wanted = connector.wanted_source();
        loop {
            match picked {
                Pick::Use(conn) => return Ok(conn),
                Pick::Fail(cause) => {
                    return Err(UpstreamError::Connect {
                        destination: self.addr,
                        cause,
                    })
                }
                Pick::Dial => return self.dial(connector).await,
                Pick::Wait => {
                    // Registered before looking again, so a dial that ends meanwhile is seen.
                    let dialled = self.dialled.notified();
                    picked = self.pick(wanted);
                    if matches!(picked, Pick::Wait) {
                        dialled.await;
                    }
                }
            }
        }
    }

    fn pick(&self, wanted: Option<IpAddr>) -> Pick {
        let mut state = self.state.lock();
        let addr = self.addr;
        state.conns.retain(|c| {
            let moved = matches!((wanted, c.source), (Some(w), Some(s)) if w != s);
            if moved {
                tracing::info!(
                    network = "storage", peer = %addr, old_source = ?c.source, new_source = ?wanted,
                    "storage address changed: draining an upstream connection from the old one"
                );
            }
            !c.closed.load(Ordering::Acquire) && !moved
        });
        let soft = self.limits.streams_per_connection;
        if let Some(c) = state
            .conns
            .iter()
            .find(|c| c.in_flight.load(Ordering::Relaxed) < soft)
        {
            return Pick::Use(c.clone());
        }
        let room = state.conns.len() + state.dialling < self.limits.max_connections.max(1);
        let backing_off = state.backoff.as_ref().filter(|b| Instant::now() < b.until);
        if room && backing_off.is_none() && (state.dialling == 0 || !state.conns.is_empty()) {
            state.dialling += 1;
            return Pick::Dial;
        }
        if let Some(c) = state
            .conns
            .iter()
            .min_by_key(|c| c.in_flight.load(Ordering::Relaxed))
        {
            return Pick::Use(c.clone());
        }
        if state.dialling > 0 {
            return Pick::Wait;
        }
        match backing_off {
            Some(b) => Pick::Fail(format!(
                "{} (not dialling again for {} ms after {} failed attempt(s))",
                b.cause,
                b.until
                    .saturating_duration_since(Instant::now())
                    .as_millis(),
                b.failures
            )),
            None => Pick::Fail("no connection available".into()),
        }
    }

    async fn dial(&self, connector: &Connector) -> Result<Arc<Conn>, UpstreamError> {
        let result = self.open(connector).await;
        let mut state = self.state.lock();
        state.dialling -= 1;
        let outcome = match result {
            Ok((send, closed, backlog, source)) => {
                state.backoff = None;
                let conn = Arc::new(Conn {
                    send,
                    closed,
                    source,
                    in_flight: AtomicUsize::new(0),
                    idle_since_ms: AtomicU64::new(self.now_ms()),
                    backlog,
                });
                state.conns.push(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                connector
                    .metrics
                    .upstream_connect_error(&connector.cluster, e.reason);
                let failures = state.backoff.as_ref().map_or(0, |b| b.failures) + 1;
                let wait = BACKOFF_BASE
                    .saturating_mul(1 << (failures - 1).min(10))
                    .min(BACKOFF_MAX);
                state.backoff = Some(Backoff {
                    until: Instant::now() + wait,
                    failures,
                    cause: e.message.clone(),
                });
                Err(UpstreamError::Connect {
                    destination: self.addr,
                    cause: e.message,
                })
            }
        };
        drop(state);
        self.dialled.notify_waiters();
        outcome
    }

    async fn open(&self, connector: &Connector) -> Result<Opened, ConnectError> {
        let io = connector.connect_grpc(self.addr).await?;
        let tcp = match &io {
            Either::Left(plain) => plain.get_ref(),
            Either::Right(tls) => tls.get_ref().0.get_ref(),
        };
        let source = tcp.local_addr().ok().map(|a| a.ip());
        let backlog = http2::Backlog::new();
        let (send, connection) = http2::builder()
            .handshake(http2::Counted::new(io, backlog.clone()))
            .await
            .map_err(|e| ConnectError {
                reason: "handshake",
                message: format!("HTTP/2 handshake with {}: {}", self.addr, error_chain(&e)),
            })?;
        let closed = Arc::new(AtomicBool::new(false));
        http2::spawn_connection(connection, closed.clone(), backlog.clone(), self.addr);
        Ok((send, closed, backlog, source))
    }

    /// Drops connections idle for longer than the idle timeout; their tasks then close them.
    /// Returns true when the pool holds nothing and has not been used for that long.
    pub fn reap(&self) -> bool {
        let now = self.now_ms();
        let idle_ms = self.limits.idle_timeout.as_millis() as u64;
        let mut state = self.state.lock();
        state.conns.retain(|c| {
            let busy = c.in_flight.load(Ordering::Relaxed) > 0;
            let fresh = now.saturating_sub(c.idle_since_ms.load(Ordering::Relaxed)) < idle_ms;
            !c.closed.load(Ordering::Acquire) && (busy || fresh)
        });
        state.conns.is_empty()
            && state.dialling == 0
            && now.saturating_sub(self.last_used.load(Ordering::Relaxed)) >= idle_ms
    }

    /// How much the pool is worth keeping when the address table is full.
    pub fn standing(&self) -> Standing {
        let mut state = self.state.lock();
        state.conns.retain(|c| !c.closed.load(Ordering::Acquire));
        if state.dialling > 0
            || state
                .conns
                .iter()
                .any(|c| c.in_flight.load(Ordering::Relaxed) > 0)
        {
            return Standing::Busy;
        }
        if state.conns.is_empty() {
            return Standing::Dead;
        }
        Standing::Idle(self.epoch + Duration::from_millis(self.last_used.load(Ordering::Relaxed)))
    }

    /// Open connections (for tests and status).
    pub fn connections(&self) -> usize {
        self.state.lock().conns.len()
    }
}
