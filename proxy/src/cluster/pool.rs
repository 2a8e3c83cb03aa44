//! The connections to one upstream address: HTTP/2, multiplexed, reused, bounded in number,
//! closed when idle, and dialled again only after a back-off when dialling fails.

use parking_lot::Mutex;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio_util::either::Either;

use bytes::Bytes;
use futures_util::future::BoxFuture;
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
struct InFlight {
    conn: Arc<Conn>,
    pool: Arc<EndpointPool>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.conn
                .idle_since_ms
                .store(self.pool.now_ms(), Ordering::Relaxed);
        }
    }
}

/// What [`http2::open`] gives: the response to wait for, and the request body's task.
type Open = Result<(h2::client::ResponseFuture, Option<http2::BodyTask>), h2::Error>;

/// A request sent on a pooled connection, until its response headers arrive. In the usual
/// case (a connection with room, a free backlog permit) the request is opened when this is
/// made, and from then on it holds only what the wait for the answer needs: every open call
/// keeps one (bench-footprint: memory per open call). Dialling and waiting for a permit are
/// boxed, and the box is dropped once the request is opened.
pub struct Sending(Stage);

enum Stage {
    /// Dialling, waiting for a dial or a backlog permit, or failed before a stream opened.
    Opening(BoxFuture<'static, Result<Waiting, UpstreamError>>),
    Opened(Waiting),
    Done,
}

/// An opened request: its response headers to wait for.
struct Waiting {
    response: h2::client::ResponseFuture,
    body_task: Option<http2::BodyTask>,
    counted: InFlight,
}

impl Sending {
    /// A request that fails before reaching a connection.
    pub fn failed(e: UpstreamError) -> Sending {
        Sending::opening(std::future::ready(Err(e)))
    }

    /// Whether the request is opened on a connection and only its answer is awaited.
    #[cfg(test)]
    pub fn is_opened(&self) -> bool {
        matches!(self.0, Stage::Opened(_))
    }

    fn opening(
        f: impl Future<Output = Result<Waiting, UpstreamError>> + Send + 'static,
    ) -> Sending {
        Sending(Stage::Opening(Box::pin(f)))
    }
}

impl Waiting {
    /// The request as [`http2::open`] left it on `counted`'s connection.
    fn new(counted: InFlight, opened: Open) -> Result<Waiting, UpstreamError> {
        match opened {
            Ok((response, body_task)) => Ok(Waiting {
                response,
                body_task,
                counted,
            }),
            Err(e) => {
                counted.conn.backlog.untake();
                // The connection takes no new streams (GOAWAY, or it failed): no more
                // requests go to it. A request h2 refuses for itself leaves it as it is.
                if e.is_go_away() || e.is_io() || e.is_library() {
                    counted.conn.closed.store(true, Ordering::Release);
                }
                Err(counted.pool.failed(&e))
            }
        }
    }
}

impl Future for Sending {
    type Output = Result<Response<H2Body>, UpstreamError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let answer = match &mut self.0 {
                Stage::Opening(opening) => match ready!(opening.as_mut().poll(cx)) {
                    Ok(waiting) => {
                        self.0 = Stage::Opened(waiting);
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Stage::Opened(w) => match ready!(Pin::new(&mut w.response).poll(cx)) {
                    Ok(response) => {
                        let body_task = w.body_task.take();
                        Ok(response.map(|recv| H2Body::new(recv, body_task)))
                    }
                    Err(e) => Err(w.counted.pool.failed(&e)),
                },
                Stage::Done => Err(UpstreamError::PolledAgain),
            };
            // Ends the in-flight count as the headers arrive, not when this is dropped.
            self.0 = Stage::Done;
            return Poll::Ready(answer);
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

    /// Sends a request over a pooled connection, dialling one when needed: opened here when a
    /// connection has room, so the returned future does not hold the request.
    pub fn send(
        self: Arc<Self>,
        cluster: Arc<Cluster>,
        mut request: Request<ProxyBody>,
    ) -> Sending {
        self.last_used.store(self.now_ms(), Ordering::Relaxed);
        let picked = self.pick(cluster.connector.wanted_source());
        let Pick::Use(conn) = picked else {
            return Sending::opening(async move {
                let conn = self.checkout(&cluster.connector, picked).await?;
                let counted = self.count(conn, &mut request);
                let permit = counted.conn.backlog.try_take();
                Self::open_later(counted, request, permit).await
            });
        };
        let counted = self.count(conn, &mut request);
        if !counted.conn.backlog.try_take() {
            return Sending::opening(Self::open_later(counted, request, false));
        }
        // No task's waker is at hand here, and none is needed: a stream h2 cannot take yet
        // (never on a fresh handle; h2 queues a stream past the peer's limit itself) goes to
        // the boxed path, which polls again with its own, and a body not whole yet is sent by
        // a task of its own (`http2::open`).
        let mut send = counted.conn.send.clone();
        let mut now = Context::from_waker(futures_util::task::noop_waker_ref());
        match send.poll_ready(&mut now) {
            Poll::Ready(ready) => {
                let opened = ready.and_then(|()| http2::open(&mut send, request, &mut now));
                match Waiting::new(counted, opened) {
                    Ok(waiting) => Sending(Stage::Opened(waiting)),
                    Err(e) => Sending::failed(e),
                }
            }
            Poll::Pending => Sending::opening(Self::open_later(counted, request, true)),
        }
    }

    /// Readies `request` for `conn` and counts it in flight there.
    fn count(self: &Arc<Self>, conn: Arc<Conn>, request: &mut Request<ProxyBody>) -> InFlight {
        *request.uri_mut() = self.upstream_uri(request.uri());
        http2::strip_connection_headers(request.headers_mut());
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            conn,
            pool: self.clone(),
        }
    }

    /// Opens `request` on `counted`'s connection once it has a backlog permit (waited for
    /// unless `has_permit`) and h2 takes a stream.
    async fn open_later(
        counted: InFlight,
        request: Request<ProxyBody>,
        has_permit: bool,
    ) -> Result<Waiting, UpstreamError> {
        if !has_permit {
            counted.conn.backlog.take().await;
        }
        let mut send = counted.conn.send.clone();
        let ready = std::future::poll_fn(|cx| send.poll_ready(cx).map_ok(|()| cx.waker().clone()));
        let opened = match ready.await {
            Ok(waker) => http2::open(&mut send, request, &mut Context::from_waker(&waker)),
            Err(e) => Err(e),
        };
        Waiting::new(counted, opened)
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
