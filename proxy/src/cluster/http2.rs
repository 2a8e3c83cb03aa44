//! lhnet's HTTP/2 client, on the `h2` crate directly: a request is opened on the connection
//! from the caller's own task, its body sent from there when it is already whole (a unary
//! call's is), and its response awaited there too. hyper's client spent two task spawns, two
//! channels and three wake-ups on every request for the same (its dispatch task, a task per
//! response and, often, one per request body): the cost of an engine call through lhnet was
//! mostly that (docs/benchmarks.md).
//!
//! A body that is not whole when the request opens (client streaming, a large upload) is
//! sent by a task of its own, within the stream's flow-control window, as hyper did. The
//! connection is driven by one task, which also sends a keep-alive PING every 30 s and closes
//! the connection when no PONG comes within 10 s.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::header::{HeaderName, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::reply::ProxyBody;

const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of a body sent from the caller's task before the rest is left to a task of its own
/// (h2 buffers what it cannot send yet, so this bounds what is buffered beyond the window).
const INLINE_BYTES: usize = 64 << 10;

/// Requests a connection takes whose frames its task has not yet written out. On one
/// thread, the connection's task runs only after every task woken before it, so when lhnet
/// falls behind its clients a whole burst can queue its frames in h2's send queue, a slab that
/// keeps its peak size for the connection's life: 9.75 MiB of the heap with 10,000 calls open
/// under valgrind (`loadtest/footprint-massif.sh`; at full speed the queue stays small).
/// Above this many, a request waits for the next write.
pub const UNWRITTEN_REQUESTS: usize = 256;

/// A connection's count of requests opened and not yet written (see [`UNWRITTEN_REQUESTS`]):
/// a request takes a permit before it opens, and every write the connection's task makes
/// gives back all the permits taken since the write before. `taken` counts them apart from
/// the semaphore because `UNWRITTEN_REQUESTS - available_permits()` would race with a
/// request taking one between the read and the refill, and leave the semaphore one over.
pub struct Backlog {
    permits: tokio::sync::Semaphore,
    taken: AtomicUsize,
}

impl Backlog {
    pub fn new() -> Arc<Backlog> {
        Arc::new(Backlog {
            permits: tokio::sync::Semaphore::new(UNWRITTEN_REQUESTS),
            taken: AtomicUsize::new(0),
        })
    }

    /// A permit if one is free now (the usual case: no wait, no allocation).
    pub fn try_take(&self) -> bool {
        match self.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.taken.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(_) => false,
        }
    }

    /// Waits for a permit; returns at once when the connection has ended (the request then
    /// fails on the connection, with h2's reason).
    pub async fn take(&self) {
        if let Ok(permit) = self.permits.acquire().await {
            permit.forget();
            self.taken.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Gives back the permit of a request that queued no frame (h2 refused it).
    pub fn untake(&self) {
        let one_less = self
            .taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if one_less.is_ok() {
            self.permits.add_permits(1);
        }
    }

    fn written(&self) {
        let n = self.taken.swap(0, Ordering::AcqRel);
        if n > 0 {
            self.permits.add_permits(n);
        }
    }

    /// The connection ended: no write will come, so nobody may wait for one.
    fn close(&self) {
        self.permits.close();
    }
}

/// An upstream connection's socket, telling its [`Backlog`] of every write.
pub struct Counted<T> {
    io: T,
    backlog: Arc<Backlog>,
}

impl<T> Counted<T> {
    pub fn new(io: T, backlog: Arc<Backlog>) -> Counted<T> {
        Counted { io, backlog }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.backlog.written();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.backlog.written();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What one upstream stream may have in flight towards lhnet before lhnet takes it: the most a
/// reply whose client stops reading holds in lhnet (one frame; about 36 KB of memory with
/// h2's own state, so the 1024 calls of a full cluster stay well inside the sidecar's 64 MiB).
/// Management replies are a few KiB; 1 MiB echo calls ran no slower than with 2 MiB
/// (docs/benchmarks.md).
pub const STREAM_WINDOW: u32 = 16 << 10;
/// The whole connection's: HTTP/2's largest, so streams whose clients stop reading (each holding
/// at most [`STREAM_WINDOW`]) never use up the window the connection's other calls need.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// The settings of lhnet's upstream connections.
pub fn builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(16 << 10)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        .enable_push(false);
    b
}

/// Drives `connection` until it ends or stops answering keep-alive pings; `closed` is set
/// then, so the pool stops handing it out, and `backlog` closed, so no request waits on it.
pub fn spawn_connection<T>(
    mut connection: Connection<T, Bytes>,
    closed: Arc<AtomicBool>,
    backlog: Arc<Backlog>,
    peer: std::net::SocketAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ping_pong = connection.ping_pong();
    tokio::spawn(async move {
        let keepalive = async move {
            let Some(mut ping_pong) = ping_pong else {
                return std::future::pending::<&'static str>().await;
            };
            loop {
                tokio::time::sleep(KEEPALIVE_INTERVAL).await;
                if ping_pong.send_ping(h2::Ping::opaque()).is_err() {
                    return "a keep-alive ping could not be sent";
                }
                let pong = std::future::poll_fn(|cx| ping_pong.poll_pong(cx));
                match tokio::time::timeout(KEEPALIVE_TIMEOUT, pong).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => {
                        return "the connection failed while waiting for a keep-alive pong"
                    }
                    Err(_) => return "no keep-alive pong in time",
                }
            }
        };
        tokio::select! {
            ended = &mut connection => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %crate::cluster::error_chain(&e), "upstream connection ended with an error");
                }
            }
            why = keepalive => {
                tracing::info!(%peer, why, "closing an upstream connection that stopped answering");
            }
        }
        closed.store(true, Ordering::Release);
        backlog.close();
    });
}

/// Removes the headers HTTP/2 forbids (RFC 9113 §8.2.2), which h2 would refuse the request
/// for; `te` may stay only as `trailers`.
pub fn strip_connection_headers(headers: &mut HeaderMap) {
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    for name in [
        CONNECTION,
        TRANSFER_ENCODING,
        UPGRADE,
        KEEP_ALIVE,
        PROXY_CONNECTION,
    ] {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|v| v != "trailers") {
        headers.remove(TE);
    }
}

/// Opens `request` on `send` (ready: its `poll_ready` said so) and sends its body: from here
/// when it is whole by then, else from a task of its own. A plain function, not an async one:
/// the request moves through it, so no call's future keeps a second copy of it.
pub fn open(
    send: &mut SendRequest<Bytes>,
    request: http::Request<ProxyBody>,
    cx: &mut Context<'_>,
) -> Result<(h2::client::ResponseFuture, Option<BodyTask>), h2::Error> {
    let (parts, body) = request.into_parts();
    let eos = body.is_end_stream();
    let (response, stream) = send.send_request(http::Request::from_parts(parts, ()), eos)?;
    let mut task = None;
    if !eos {
        let mut pipe = Pipe {
            body,
            stream,
            pending: None,
            inline: Some(INLINE_BYTES),
            stop: None,
        };
        if Pin::new(&mut pipe).poll(cx).is_pending() {
            let (keep, stop) = tokio::sync::oneshot::channel();
            pipe.inline = None;
            pipe.stop = Some(stop);
            tokio::spawn(pipe);
            task = Some(BodyTask { _keep: keep });
        }
    }
    Ok((response, task))
}

/// The task sending a request's body, for as long as this is held (by the response future's
/// caller, then by the response body): dropped, the task resets the stream and ends, so a call
/// given up on (its deadline passed, its client gone) does not hold the upstream stream and the
/// downstream body open until the client ends its own side.
pub struct BodyTask {
    _keep: tokio::sync::oneshot::Sender<()>,
}

/// A request body on its way into a stream. While `inline` has room, data is handed to h2 as
/// it comes (h2 sends it as the window allows); after that, each chunk waits for window first.
struct Pipe {
    body: ProxyBody,
    stream: SendStream<Bytes>,
    /// A chunk waiting for window.
    pending: Option<Bytes>,
    inline: Option<usize>,
    /// Closed when the call's [`BodyTask`] is dropped (a spawned pipe only).
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Future for Pipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // The peer reset the stream (or the connection went): stop reading the body.
            if this.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            // The call was given up on: nothing will read the answer.
            if let Some(stop) = this.stop.as_mut() {
                if Pin::new(stop).poll(cx).is_ready() {
                    this.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
            }
            if let Some(chunk) = this.pending.as_mut() {
                if this.stream.capacity() == 0 {
                    this.stream.reserve_capacity(chunk.len());
                    match ready!(this.stream.poll_capacity(cx)) {
                        Some(Ok(_)) => {}
                        None | Some(Err(_)) => return Poll::Ready(()),
                    }
                    continue;
                }
                let n = this.stream.capacity().min(chunk.len());
                let part = chunk.split_to(n);
                if chunk.is_empty() {
                    this.pending = None;
                }
                if this.stream.send_data(part, false).is_err() {
                    return Poll::Ready(());
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => {
                    let _ = this.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed: resetting the upstream stream");
                    this.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = this.body.is_end_stream();
                    match &mut this.inline {
                        Some(room) if data.len() <= *room => {
                            *room -= data.len();
                            if this.stream.send_data(data, end).is_err() || end {
                                return Poll::Ready(());
                            }
                        }
                        _ => {
                            this.inline = None;
                            if !data.is_empty() {
                                this.pending = Some(data);
                            }
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = this.stream.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            }
        }
    }
}

/// The body of an upstream response: its DATA frames (window given back as they are read),
/// then its trailers.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    /// The request body's task, while it runs: stopped when this body is dropped.
    _request_body: Option<BodyTask>,
}

impl H2Body {
    pub fn new(recv: RecvStream, request_body: Option<BodyTask>) -> H2Body {
        H2Body {
            recv,
            data_done: false,
            _request_body: request_body,
        }
    }
}

impl std::fmt::Debug for H2Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Body")
            .field("stream", &self.recv.stream_id())
            .finish()
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_connection_takes_a_bounded_backlog_until_its_task_writes() {
        let backlog = Backlog::new();
        let (near, _far) = tokio::io::duplex(1 << 16);
        let mut io = Counted::new(near, backlog.clone());
        for i in 0..UNWRITTEN_REQUESTS {
            assert!(
                backlog.try_take(),
                "request {i} was refused below the limit"
            );
        }
        assert!(!backlog.try_take(), "a request past the limit was taken");
        let waiting = tokio::spawn({
            let backlog = backlog.clone();
            async move { backlog.take().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "a waiting request went before a write"
        );
        // A write by the connection's task gives back every permit taken since the last.
        io.write_all(b"frames").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting request was not let through by the write")
            .unwrap();
        for i in 1..UNWRITTEN_REQUESTS {
            assert!(backlog.try_take(), "permit {i} was not given back");
        }
        assert!(!backlog.try_take());
        // A request h2 refused gives its permit back at once.
        backlog.untake();
        assert!(backlog.try_take());
    }

    #[tokio::test]
    async fn nobody_waits_on_a_connection_that_ended() {
        let backlog = Backlog::new();
        while backlog.try_take() {}
        let waiting = tokio::spawn({
            let backlog = backlog.clone();
            async move { backlog.take().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        backlog.close();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a request kept waiting on an ended connection")
            .unwrap();
    }
}
