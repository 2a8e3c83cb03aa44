//! Unary and server-streaming calls take nothing upstream until their message has started.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::Body;
use tower::Service;

use super::{body_failed, Call, ListenerInfo};
use crate::body::{Prefixed, Verdict};
use crate::config::format_duration;
use crate::listener::Waiters;
use crate::reply::{BoxError, LocalReply, RouteContext};
use tokio::time::Instant;

/// For a method whose client sends one message (unary, server-streaming: a real client sends
/// it with the headers), waits up to the listener's `stream_idle_timeout` until the request
/// body has started (a frame is read ahead, or the body has ended): a stream that sends
/// headers and nothing more then takes no cluster slot and sends nothing upstream.
/// Client-streaming and unknown methods go at once (their client may wait for the server's
/// headers first, as tonic's does); the per-connection share of slots bounds those.
#[derive(Clone)]
pub struct BodyStart<S> {
    inner: S,
    /// One `Arc`: a waiting call clones it.
    names: Arc<(ListenerInfo, RouteContext)>,
    /// Every call is unary here (the engine proxy): no method lookup.
    always: bool,
}

impl<S> BodyStart<S> {
    pub fn new(inner: S, listener: ListenerInfo, context: RouteContext, always: bool) -> Self {
        BodyStart {
            inner,
            names: Arc::new((listener, context)),
            always,
        }
    }
}

impl<S, R> Service<Call> for BodyStart<S>
where
    S: Service<Call, Response = R, Error = LocalReply> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = R;
    type Error = LocalReply;
    type Future = BodyStartFuture<S::Future, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let waits = self.always
            || self
                .names
                .0
                .metrics
                .client_sends_one_message(call.parts.uri.path());
        if !waits {
            return BodyStartFuture::Now {
                inner: self.inner.call(call),
            };
        }
        // A real client sends its message with its headers: it is usually here already, and
        // the call goes on at once (no timer, no box). The waker is replaced by the real one
        // when the waiting path polls again.
        let (mut body, call) = call.take_body();
        let mut now = Context::from_waker(futures_util::task::noop_waker_ref());
        match body.poll_started(&mut now) {
            Poll::Ready(Ok(())) => {
                return BodyStartFuture::Now {
                    inner: self.inner.call(call.with_body(body)),
                }
            }
            Poll::Ready(Err(e)) => {
                let reply = body_failed(&call.verdict, &e, &self.names.1);
                return BodyStartFuture::Failed { reply: Some(reply) };
            }
            Poll::Pending => {}
        }
        // The clone is ready (Slots and below always are); it serves this call alone.
        let mut inner = self.inner.clone();
        let names = self.names.clone();
        BodyStartFuture::Waiting {
            waiting: Box::pin(async move {
                let (listener, context) = &*names;
                let waiters = &call.downstream.waiters;
                let body = await_body(body, &call.verdict, waiters, listener, context).await?;
                inner.call(call.with_body(body)).await
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The call below at once, a refusal, or the wait for the body (boxed: the rare path).
    #[project = BodyStartProj]
    pub enum BodyStartFuture<F, R> {
        Now {
            #[pin]
            inner: F,
        },
        Failed {
            reply: Option<LocalReply>,
        },
        Waiting {
            waiting: BoxFuture<'static, Result<R, LocalReply>>,
        },
    }
}

impl<F, R> Future for BodyStartFuture<F, R>
where
    F: Future<Output = Result<R, LocalReply>>,
{
    type Output = Result<R, LocalReply>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BodyStartProj::Now { inner } => inner.poll(cx),
            BodyStartProj::Failed { reply } => {
                Poll::Ready(Err(reply.take().unwrap_or_else(LocalReply::polled_again)))
            }
            BodyStartProj::Waiting { waiting } => waiting.as_mut().poll(cx),
        }
    }
}

/// Waits up to `stream_idle_timeout` for the body to start; the reply (and the count in
/// `lhnet_limits_reached_total`) when it does not, or when the listener gave its place away.
pub async fn await_body<B>(
    body: Prefixed<B>,
    verdict: &Verdict,
    waiters: &Arc<Waiters>,
    listener: &ListenerInfo,
    context: &RouteContext,
) -> Result<Prefixed<B>, LocalReply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    wait_for_body(body.started(), waiters, listener, context)
        .await?
        .map_err(|e| body_failed(verdict, &e, context))
}

/// Runs `reading` (a read of the request body) up to `stream_idle_timeout`. A read not done
/// within [`EVICTABLE_AFTER`] (a real client sends its message right after its headers) waits
/// among the listener's [`Waiters`], which a full listener evicts, oldest first, to admit new
/// requests; a call whose message comes at once costs one timer, as a plain timeout would.
pub async fn wait_for_body<F: Future>(
    reading: F,
    waiters: &Arc<Waiters>,
    listener: &ListenerInfo,
    context: &RouteContext,
) -> Result<F::Output, LocalReply> {
    let idle_until = Instant::now() + listener.stream_idle_timeout;
    let mut reading = std::pin::pin!(reading);
    let grace = EVICTABLE_AFTER.min(listener.stream_idle_timeout);
    if let Ok(read) = tokio::time::timeout(grace, &mut reading).await {
        return Ok(read);
    }
    let waiting = waiters.wait();
    tokio::select! {
        read = &mut reading => Ok(read),
        () = tokio::time::sleep_until(idle_until) => Err(body_timeout(listener, context)),
        () = waiting.evicted.cancelled() => Err(evicted(listener, context)),
    }
}

/// How long a stream may wait for its body before a full listener may evict it.
pub const EVICTABLE_AFTER: Duration = Duration::from_millis(10);

/// The reply when a full listener gave a waiting stream's place to a new request.
fn evicted(listener: &ListenerInfo, context: &RouteContext) -> LocalReply {
    let text = format!(
        "listener {} is at max_requests and this stream had not sent its request body: its place went to a request that had; a unary call sends its message with its headers ({context})",
        listener.name
    );
    listener
        .metrics
        .limit_reached(&listener.name, "max_requests", || text.clone());
    LocalReply::new(tonic::Code::ResourceExhausted, text)
}

/// The reply (and the count) when a request's body did not come within `stream_idle_timeout`.
pub fn body_timeout(listener: &ListenerInfo, context: &RouteContext) -> LocalReply {
    let text = format!(
        "the request body did not start within stream_idle_timeout {}; a unary call sends its message with its headers ({context})",
        format_duration(listener.stream_idle_timeout)
    );
    listener
        .metrics
        .limit_reached(&listener.name, "stream_idle_timeout", || text.clone());
    LocalReply::new(tonic::Code::DeadlineExceeded, text)
}
