//! Management listeners: accept h2c connections and hand every request to the route table,
//! within the listener's limits ([`ListenerLimits`]): connections, the time a new connection
//! has to send its first request, idle connections, requests in progress.
//!
//! A connection that has sent nothing costs a socket and a small task: the HTTP/2 state is
//! made only once the client's preface has arrived. At `max_connections` a new connection
//! takes the place of the oldest that has not yet sent a whole request, or else of the
//! longest idle one, so a flood of silent or slow clients cannot keep a real one out.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lhnet_netns::StorageAddress;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;

use crate::config::{format_duration, Http2Options, ListenerLimits, TCP_KEEPALIVE};
use crate::metrics::{CountedIo, Metrics};
use crate::reply::{BoxError, LocalReply, ProxyBody};
use crate::route::RouteTable;
use crate::storage::StorageState;
use crate::tcp::REBIND_EVERY;
use crate::tls::ServerTls;

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// After GOAWAY for an idle or evicted connection, how long its last streams may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Reply data HTTP/2 may hold for one stream before hyper waits to hand it more: hyper's
/// default is 400 KB, which a client granting every window and reading nothing makes lhnet
/// hold for each of its calls (512 such calls took the sidecar past 64 MiB). At this size a
/// stream holds at most 16 KiB and the upstream frame (up to 16 KiB) that went past it, and
/// hyper one more frame.
pub const REPLY_SEND_BUFFER: usize = 16 << 10;

/// A bound gRPC listener, ready to serve.
pub struct GrpcListener {
    pub name: Arc<str>,
    pub local_addr: SocketAddr,
    pub routes: Arc<ArcSwap<RouteTable>>,
    /// `tls:`: Longhorn's mTLS (`None`: h2c).
    pub tls: Option<Arc<ServerTls>>,
    listener: TcpListener,
}

/// A client connection's bytes as the listener reads them: counted on the wire, under TLS
/// when the listener has it. The TLS state (1.2 KiB) is boxed: a plaintext connection, and a
/// silent one above all, does not carry it.
type ClientIo = Either<CountedIo<TcpStream>, Box<TlsStream<CountedIo<TcpStream>>>>;

/// One client connection, as its requests and the listener see it.
pub struct Downstream {
    id: u64,
    accepted: Instant,
    /// Set when the first request's headers have arrived.
    established: AtomicBool,
    /// Requests in progress (until their response body ends), and since when there are none.
    activity: Activity,
    /// Cluster slots this connection's requests hold (all clusters together).
    pub held_slots: AtomicUsize,
    /// Cancelled when the listener needs the place for a new connection, or drains (a child
    /// of the listener's shutdown token: one future to watch on every wake-up, not two).
    evict: CancellationToken,
    /// The listener's streams waiting for their request body.
    pub waiters: Arc<Waiters>,
    /// Reply frames handed to HTTP/2 so far. A frame is taken when HTTP/2 has sent it and
    /// asks for the next one (or drops the body); handed less taken are the frames waiting,
    /// which a client that grants no window, or reads nothing, leaves there.
    replies_handed: AtomicU64,
    /// Reply frames taken so far: unchanged between two looks `send_timeout` apart while
    /// replies wait, the client has taken none of them in that time.
    replies_taken: AtomicU64,
}

/// A listener's streams that have sent their headers and are waiting (up to
/// `stream_idle_timeout`) for their body, oldest first. A listener at `max_requests` evicts
/// the oldest of them to admit a new request: header-only streams, from however many
/// connections, cannot keep calls that send their message out.
#[derive(Default)]
pub struct Waiters {
    queue: Mutex<VecDeque<(u64, CancellationToken)>>,
    next_id: AtomicU64,
}

/// One waiting stream's place in [`Waiters`]; `evicted` is cancelled when the place is taken.
pub struct Waiting {
    waiters: Arc<Waiters>,
    id: u64,
    pub evicted: CancellationToken,
}

/// Requests in progress on one connection, and since when there have been none: what an idle
/// timeout is measured from (the listener's connections and the webhook's).
pub struct Activity {
    since: Instant,
    active: AtomicUsize,
    /// Milliseconds after `since` when `active` last fell to 0.
    idle_since_ms: AtomicU64,
}

/// One request counted in an [`Activity`] until it drops.
pub struct Active(Arc<Activity>);

/// What the listener's connections share.
struct Shared {
    name: Arc<str>,
    metrics: Arc<Metrics>,
    /// Open connections, by id.
    open: Mutex<HashMap<u64, Arc<Downstream>>>,
    next_id: AtomicU64,
    /// Requests in progress on the listener.
    requests: AtomicUsize,
    waiters: Arc<Waiters>,
}

/// Removes its connection from the open set when the connection's task ends.
struct Admitted {
    shared: Arc<Shared>,
    conn: Arc<Downstream>,
}

/// Counts one request in progress until its response body is done (or dropped).
struct InProgress {
    shared: Arc<Shared>,
    conn: Arc<Downstream>,
    /// A frame of the response was handed to HTTP/2, which has not asked for the next yet.
    handed: bool,
}

/// A response body that keeps its request counted while it streams.
pub struct TrackedBody {
    inner: ProxyBody,
    counted: Option<InProgress>,
}

/// Why a connection was closed before HTTP/2 began.
enum Refused {
    /// A listener with TLS, and a client that spoke plaintext.
    Plaintext,
    Handshake(io::Error),
    Io,
}

/// How a connection began.
enum Preface {
    Http2,
    /// An HTTP/1.x request line: answered in HTTP/1.1 that only HTTP/2 is spoken here.
    Http1,
    /// Neither, or closed before the preface was whole.
    Other,
}

// === impl GrpcListener ===

impl GrpcListener {
    pub async fn bind(
        name: &str,
        address: SocketAddr,
        routes: Arc<ArcSwap<RouteTable>>,
        tls: Option<Arc<ServerTls>>,
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
            tls,
            listener,
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
        let tasks = TaskTracker::new();
        let shared = Arc::new(Shared {
            name: self.name.clone(),
            metrics: metrics.clone(),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
            waiters: Arc::default(),
        });
        let transport = match &self.tls {
            Some(tls) => format!("gRPC, mTLS, tls.mode {}", tls.config.mode.as_str()),
            None => "gRPC, h2c".into(),
        };
        tracing::info!(listener = %self.name, address = %self.local_addr, "listening ({transport})");
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
            // The limits of the config in force when the connection came.
            let (limits, h2) = {
                let table = self.routes.load();
                (table.limits.clone(), table.http2.clone())
            };
            let Some(admitted) = shared.admit(&limits, &shutdown) else {
                metrics.limit_reached(&self.name, "max_connections", || {
                    format!(
                        "listener {}: {} connections are open and every one has a request in progress; refusing {peer}",
                        self.name, limits.max_connections
                    )
                });
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (idle, interval, retries) = TCP_KEEPALIVE;
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(idle)
                    .with_interval(interval)
                    .with_retries(retries),
            );
            let local = stream.local_addr().unwrap_or(self.local_addr);
            let (device, network) = storage.classify(local.ip());
            tracing::debug!(
                network = network.as_str(), listener = %self.name, local = %local, peer = %peer,
                device = %device, "connection accepted"
            );
            let counters = metrics.byte_counters(&device, network);
            let routes = self.routes.clone();
            let drain = shutdown.clone();
            // The files in force when the connection came (re-read when they changed).
            let tls = self.tls.as_ref().map(|t| t.for_accept(&self.name));
            tasks.spawn(async move {
                let stream = CountedIo::new(stream, counters, None);
                let Some(stream) = admitted.preface(stream, peer, &limits, tls).await else {
                    return;
                };
                let io = TokioIo::new(Replayed::new(stream));
                // Boxed: the HTTP/2 state lives only on connections that have spoken.
                let served =
                    admitted.serve_http2(io, peer, routes, (&limits, &h2), &drain, drain_timeout);
                Box::pin(served).await;
            });
        }
        drop(self.listener);
        tasks.close();
        tracing::info!(listener = %self.name, connections = tasks.len(), "draining");
        if tokio::time::timeout(drain_timeout + CLOSE_GRACE, tasks.wait())
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

// === impl Shared ===

impl Shared {
    /// A place for a new connection: free, or taken from the oldest connection that has not
    /// sent a whole request yet, or else from the longest idle one. `None` when every open
    /// connection has a request in progress.
    fn admit(
        self: &Arc<Self>,
        limits: &ListenerLimits,
        shutdown: &CancellationToken,
    ) -> Option<Admitted> {
        let mut open = self.open.lock();
        if open.len() >= limits.max_connections {
            let victim = open
                .values()
                .filter(|c| !c.established.load(Ordering::Relaxed))
                .min_by_key(|c| c.accepted)
                .or_else(|| {
                    open.values()
                        .filter(|c| c.activity.is_idle())
                        .min_by_key(|c| c.activity.idle_since())
                })
                .cloned()?;
            open.remove(&victim.id);
            victim.evict.cancel();
            let why = if victim.established.load(Ordering::Relaxed) {
                "the longest idle connection gets GOAWAY"
            } else {
                "the oldest connection that has not sent a request is closed"
            };
            self.metrics
                .limit_reached(&self.name, "max_connections", || {
                    format!(
                        "listener {}: {} connections are open; {why} to make room",
                        self.name, limits.max_connections
                    )
                });
        }
        let conn = Arc::new(Downstream {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            accepted: Instant::now(),
            established: AtomicBool::new(false),
            activity: Activity::new(),
            held_slots: AtomicUsize::new(0),
            evict: shutdown.child_token(),
            waiters: self.waiters.clone(),
            replies_handed: AtomicU64::new(0),
            replies_taken: AtomicU64::new(0),
        });
        open.insert(conn.id, conn.clone());
        Some(Admitted {
            shared: self.clone(),
            conn,
        })
    }
}

// === impl Activity ===

impl Activity {
    pub fn new() -> Activity {
        Activity {
            since: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// Counts one request in progress until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> Active {
        self.start();
        Active(self.clone())
    }

    fn start(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            let ms = self.since.elapsed().as_millis() as u64;
            self.idle_since_ms.store(ms, Ordering::Relaxed);
        }
    }

    pub fn is_idle(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0
    }

    pub fn idle_since(&self) -> Instant {
        self.since + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed))
    }

    /// When to look at an idle timeout of `after` next: when it falls due if there is nothing
    /// in progress, else `after` from now (a request may end meanwhile), so a connection is
    /// closed between one and two `after`s after its last request, and a busy one never
    /// wakes its task more often than every `after`.
    pub fn next_idle_check(&self, after: Duration) -> Instant {
        if self.is_idle() {
            self.idle_since() + after
        } else {
            Instant::now() + after
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.end();
    }
}

// === impl Waiters ===

impl Waiters {
    /// Registers a stream that starts waiting for its body.
    pub fn wait(self: &Arc<Self>) -> Waiting {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        self.queue.lock().push_back((id, evicted.clone()));
        Waiting {
            waiters: self.clone(),
            id,
            evicted,
        }
    }

    /// Evicts the stream that has waited longest; false when none waits.
    fn evict_oldest(&self) -> bool {
        let oldest = self.queue.lock().pop_front();
        match oldest {
            Some((_, evicted)) => {
                evicted.cancel();
                true
            }
            None => false,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut queue = self.waiters.queue.lock();
        if let Some(i) = queue.iter().position(|(id, _)| *id == self.id) {
            queue.remove(i);
        }
    }
}

// === impl Downstream ===

impl Downstream {
    /// The limit that closes this connection if nothing changes, and when: the first request's
    /// headers while none has come, else the idle timeout while nothing is in progress.
    fn due(&self, limits: &ListenerLimits) -> Option<(&'static str, Duration, Instant)> {
        if !self.established.load(Ordering::Relaxed) {
            let after = limits.request_headers_timeout;
            Some(("request_headers_timeout", after, self.accepted + after))
        } else if self.activity.is_idle() {
            let after = limits.idle_timeout;
            Some(("idle_timeout", after, self.activity.idle_since() + after))
        } else {
            None
        }
    }

    /// Reply frames handed to HTTP/2 and not yet taken, and the count of those taken.
    fn replies(&self) -> (u64, u64) {
        // Taken first: a frame is handed before it is taken, so this never counts one taken
        // that was not handed (saturating all the same: the two are read apart).
        let taken = self.replies_taken.load(Ordering::Relaxed);
        let handed = self.replies_handed.load(Ordering::Relaxed);
        (handed.saturating_sub(taken), taken)
    }

    /// Whether replies have waited for this connection's client, none of them taken, since a
    /// look at least `after` ago (so for longer than `after`); else looks again from `now`.
    fn replies_stalled(
        &self,
        look: &mut Option<(u64, Instant)>,
        after: Duration,
        now: Instant,
    ) -> bool {
        let (waiting, taken) = self.replies();
        if waiting == 0 {
            *look = None;
            return false;
        }
        match *look {
            Some((seen, since)) if seen == taken => now.duration_since(since) >= after,
            _ => {
                *look = Some((taken, now));
                false
            }
        }
    }
}

// === impl Admitted ===

impl Admitted {
    /// Waits for the client's TLS handshake (on a listener with TLS files loaded: `tls` is
    /// `Some(Some(_))`) and HTTP/2 preface, both within `request_headers_timeout`. `None` when
    /// the connection is done with: timed out, evicted, draining, refused by TLS, HTTP/1
    /// (answered), or not HTTP.
    async fn preface(
        &self,
        stream: CountedIo<TcpStream>,
        peer: SocketAddr,
        limits: &ListenerLimits,
        tls: Option<Option<Arc<tokio_rustls::rustls::ServerConfig>>>,
    ) -> Option<ClientIo> {
        let name = &self.shared.name;
        let metrics = &self.shared.metrics;
        let read = tokio::select! {
            read = open(stream, tls) => read,
            _ = tokio::time::sleep(limits.request_headers_timeout) => {
                metrics.limit_reached(name, "request_headers_timeout", || format!(
                    "listener {name}: {peer} sent no HTTP/2 preface (or did not finish its TLS handshake) within request_headers_timeout {}; closed",
                    format_duration(limits.request_headers_timeout)
                ));
                return None;
            }
            _ = self.conn.evict.cancelled() => return None,
        };
        match read {
            Ok((stream, Preface::Http2)) => Some(stream),
            Ok((mut stream, Preface::Http1)) => {
                metrics.limit_reached(name, "http2_only", || {
                    format!("listener {name}: {peer} spoke HTTP/1; answered 505 and closed")
                });
                let text = format!(
                    "listener {name} speaks gRPC over HTTP/2 (h2c, prior knowledge) only\n"
                );
                let reply = format!(
                    "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    stream.write_all(reply.as_bytes()),
                )
                .await;
                let _ = stream.shutdown().await;
                None
            }
            Ok((_, Preface::Other)) | Err(Refused::Io) => None,
            Err(Refused::Plaintext) => {
                metrics.tls_refused(name, "plaintext", || {
                    format!("listener {name}: {peer} did not start TLS (the listener requires mTLS: tls.mode with its files loaded); closed")
                });
                None
            }
            Err(Refused::Handshake(e)) => {
                metrics.tls_refused(name, "handshake", || {
                    format!(
                        "listener {name}: TLS handshake with {peer} failed: {}; closed",
                        crate::tls::handshake_error(&e)
                    )
                });
                None
            }
        }
    }

    /// Serves HTTP/2 on the connection until it ends, the listener drains, the listener needs
    /// its place, it has not sent a whole request in `request_headers_timeout`, or it has been
    /// idle for `idle_timeout`.
    async fn serve_http2<I>(
        self,
        io: TokioIo<I>,
        peer: SocketAddr,
        routes: Arc<ArcSwap<RouteTable>>,
        (limits, h2): (&ListenerLimits, &Http2Options),
        drain: &CancellationToken,
        drain_timeout: Duration,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let name = self.shared.name.clone();
        let _gauge = self.shared.metrics.downstream_connection(&name);
        let conn = self.conn.clone();
        let shared = self.shared.clone();
        let service = service_fn(move |request| {
            // Decided here, not in the future: the future of each open call then holds the
            // route stack's future and the count, not the request and the table as well.
            let table = routes.load();
            let counted = InProgress::start(&shared, &conn);
            let handled = {
                let shared = &counted.shared;
                // At the limit, a stream still waiting for its body gives its place up.
                let over = shared.requests.load(Ordering::Relaxed) > table.limits.max_requests
                    && !shared.waiters.evict_oldest();
                if over {
                    let max = table.limits.max_requests;
                    shared
                        .metrics
                        .limit_reached(&shared.name, "max_requests", || {
                            format!(
                                "listener {}: {max} requests in progress; refusing more",
                                shared.name
                            )
                        });
                    let reply = LocalReply::new(
                        Code::ResourceExhausted,
                        format!(
                            "listener {} has max_requests ({max}) requests in progress; retry when some finish (operators: listeners[].max_requests)",
                            shared.name
                        ),
                    )
                    .into_response();
                    Box::pin(std::future::ready(reply))
                } else {
                    table.handle(request, &counted.conn)
                }
            };
            async move {
                let response = handled.await;
                Ok::<_, Infallible>(response.map(|inner| TrackedBody {
                    inner,
                    counted: Some(counted),
                }))
            }
        });
        let connection = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_concurrent_streams)
            .initial_stream_window_size(h2.initial_stream_window_size)
            .initial_connection_window_size(h2.initial_connection_window_size)
            .keep_alive_interval(h2.connection_keepalive.map(|k| k.interval))
            .keep_alive_timeout(
                h2.connection_keepalive
                    .map_or(Duration::from_secs(20), |k| k.timeout),
            )
            .max_header_list_size(limits.max_request_headers_kb.saturating_mul(1024))
            .max_send_buf_size(REPLY_SEND_BUFFER)
            .serve_connection(io, service);
        tokio::pin!(connection);
        let conn = &self.conn;
        let mut closing: Option<Instant> = None;
        let mut look = None;
        loop {
            // When to look again: when a limit falls due, and within `idle_timeout` anyway,
            // since requests come and go meanwhile (Activity::next_idle_check), and within
            // `send_timeout`, for replies their client does not take (requests may start
            // any time: one wake-up per `send_timeout` is what an idle connection costs).
            let recheck = conn
                .activity
                .next_idle_check(limits.idle_timeout)
                .min(Instant::now() + limits.send_timeout);
            let wake = closing.unwrap_or_else(|| {
                conn.due(limits)
                    .map_or(recheck, |(_, _, at)| at.min(recheck))
            });
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(listener = %name, peer = %peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = conn.evict.cancelled(), if closing.is_none() => {
                    connection.as_mut().graceful_shutdown();
                    let grace = if drain.is_cancelled() { drain_timeout } else { CLOSE_GRACE };
                    closing = Some(Instant::now() + grace);
                }
                _ = tokio::time::sleep_until(wake) => {
                    if closing.is_some() {
                        // GOAWAY was sent and the grace is over: dropping closes the socket.
                        return;
                    }
                    let now = Instant::now();
                    if let Some((key, after, _)) = conn.due(limits).filter(|(_, _, at)| now >= *at) {
                        self.shared.metrics.limit_reached(&name, key, || format!(
                            "listener {name}: {peer} reached {key} {}; GOAWAY", format_duration(after)
                        ));
                        connection.as_mut().graceful_shutdown();
                        closing = Some(now + CLOSE_GRACE);
                    } else if conn.replies_stalled(&mut look, limits.send_timeout, now) {
                        // A GOAWAY would wait behind the replies: the connection is dropped,
                        // and with it its calls, their upstream streams and cluster slots.
                        let (waiting, _) = conn.replies();
                        self.shared.metrics.limit_reached(&name, "send_timeout", || format!(
                            "listener {name}: {peer} took no reply data for send_timeout {} ({waiting} replies waiting for its window or its reads); closed (a client that is only slow: raise listeners[].send_timeout)",
                            format_duration(limits.send_timeout)
                        ));
                        return;
                    }
                }
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock();
        // An evicted connection was removed when it was evicted.
        if open
            .get(&self.conn.id)
            .is_some_and(|c| Arc::ptr_eq(c, &self.conn))
        {
            open.remove(&self.conn.id);
        }
    }
}

// === impl InProgress ===

impl InProgress {
    fn start(shared: &Arc<Shared>, conn: &Arc<Downstream>) -> InProgress {
        conn.established.store(true, Ordering::Relaxed);
        conn.activity.start();
        shared.requests.fetch_add(1, Ordering::Relaxed);
        InProgress {
            shared: shared.clone(),
            conn: conn.clone(),
            handed: false,
        }
    }

    /// A frame of the response goes to HTTP/2: it waits there until the client's window
    /// lets it out.
    fn hand(&mut self) {
        self.handed = true;
        self.conn.replies_handed.fetch_add(1, Ordering::Relaxed);
    }

    /// HTTP/2 asks for the next frame, or is done with the body: the last frame went out.
    fn taken(&mut self) {
        if std::mem::take(&mut self.handed) {
            self.conn.replies_taken.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.taken();
        self.shared.requests.fetch_sub(1, Ordering::Relaxed);
        self.conn.activity.end();
    }
}

// === impl TrackedBody ===

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(counted) = &mut self.counted {
            counted.taken();
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            // The response is done: the request no longer counts as in progress.
            Poll::Ready(None) => self.counted = None,
            // HTTP/2 holds a DATA frame until the client's window has room for it, and asks
            // for the next one only then (trailers go out at once).
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                if let Some(counted) = &mut self.counted {
                    counted.hand();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Starts a connection: the TLS handshake when the listener has TLS (`tls` is `Some`; its
/// `None` inside: files not loaded, `mode: optional`, plaintext), then the preface.
async fn open(
    stream: CountedIo<TcpStream>,
    tls: Option<Option<Arc<tokio_rustls::rustls::ServerConfig>>>,
) -> Result<(ClientIo, Preface), Refused> {
    let mut stream: ClientIo = match tls.flatten() {
        None => Either::Left(stream),
        Some(config) => {
            // A TLS connection begins with a handshake record (type 22).
            let mut first = [0u8; 1];
            match stream.get_ref().peek(&mut first).await {
                Ok(1) if first[0] == 0x16 => {}
                Ok(1) => return Err(Refused::Plaintext),
                _ => return Err(Refused::Io),
            }
            // Boxed: the handshake's state lives only on connections that start one.
            let accepted = Box::pin(TlsAcceptor::from(config).accept(stream)).await;
            Either::Right(Box::new(accepted.map_err(Refused::Handshake)?))
        }
    };
    let preface = read_preface(&mut stream).await.map_err(|_| Refused::Io)?;
    Ok((stream, preface))
}

/// Reads the first bytes of a connection: the HTTP/2 preface, or enough to tell it is not.
async fn read_preface<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Preface> {
    let mut buf = [0u8; PREFACE.len()];
    let mut n = 0;
    while n < buf.len() {
        let read = stream.read(&mut buf[n..]).await?;
        if read == 0 {
            return Ok(Preface::Other);
        }
        n += read;
        if buf[..n] != PREFACE[..n] {
            // An HTTP/1 request line starts with an upper-case method and a space.
            let method = buf[..n]
                .iter()
                .take_while(|b| b.is_ascii_uppercase())
                .count();
            let http1 = method > 0 && buf.get(method) == Some(&b' ');
            return Ok(if http1 {
                Preface::Http1
            } else {
                Preface::Other
            });
        }
    }
    Ok(Preface::Http2)
}

/// A stream whose HTTP/2 preface was read (and checked) before hyper saw it: hyper reads the
/// preface again from here, then the stream.
struct Replayed {
    stream: ClientIo,
    /// Preface bytes still to give back.
    replay: usize,
}

impl Replayed {
    fn new(stream: ClientIo) -> Replayed {
        Replayed {
            stream,
            replay: PREFACE.len(),
        }
    }
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.replay > 0 {
            let from = PREFACE.len() - self.replay;
            let n = self.replay.min(buf.remaining());
            buf.put_slice(&PREFACE[from..from + n]);
            self.replay -= n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
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
    pub tls: Option<Arc<ServerTls>>,
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
        tls: Option<Arc<ServerTls>>,
        storage: &StorageState,
    ) -> StorageGrpcListener {
        StorageGrpcListener {
            name: name.into(),
            port,
            routes,
            tls,
            bound: Arc::new(Mutex::new(None)),
            changes: storage.subscribe(),
        }
    }

    async fn bind(&self, ip: IpAddr) -> std::io::Result<GrpcListener> {
        GrpcListener::bind(
            &self.name,
            SocketAddr::new(ip, self.port),
            self.routes.clone(),
            self.tls.clone(),
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
        *self.bound.lock() = addr;
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
