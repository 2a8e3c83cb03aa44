//! Retries: the body buffered so it can be sent again ([`Replay`]), tower's `Retry` driven by
//! the route's `retry_policy` ([`RetryPolicy`]: reasons, attempts, jittered back-off, a retry
//! budget), and each attempt's own timeout ([`PerTryTimeout`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::HasherRng;
use tower::Service;

use crate::body::{buffer_up_to, Buffered, ReplayBody};
use crate::cluster::UpstreamError;
use crate::config::{self, RetryOn};
use crate::reply::{grpc_status, BoxError, ProxyBody};

/// Envoy's default back-off: 25 ms base; at most ten times that; full jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// The retry budget: retries may add 20% to a route's calls (counted over 10 s), and 10 a
/// second whatever the traffic (Envoy's `retry_budget` default is 20% too).
const BUDGET_PERCENT: f32 = 0.2;
const BUDGET_MIN_PER_SECOND: u32 = 10;
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// A request body on its way to an attempt: replayable, or streamed (sent once, never retried).
pub enum AttemptBody {
    Replay(ReplayBody),
    Stream(ProxyBody),
}

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            AttemptBody::Replay(b) => Pin::new(b).poll_frame(cx),
            AttemptBody::Stream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AttemptBody::Replay(b) => b.is_end_stream(),
            AttemptBody::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AttemptBody::Replay(b) => b.size_hint(),
            AttemptBody::Stream(b) => b.size_hint(),
        }
    }
}

/// Buffers a request body of up to `limit` bytes so the retry layer can send it again; a larger
/// one is streamed on (one attempt). With no retries configured (`limit` 0), nothing is read.
#[derive(Clone)]
pub struct Replay<S> {
    inner: S,
    limit: Option<usize>,
}

impl<S> Replay<S> {
    pub fn new(inner: S, limit: Option<usize>) -> Self {
        Replay { inner, limit }
    }
}

impl<S> Service<Request<ProxyBody>> for Replay<S>
where
    S: Service<Request<AttemptBody>, Response = Response<Incoming>, Error = UpstreamError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Incoming>;
    type Error = UpstreamError;
    type Future = BoxFuture<'static, Result<Response<Incoming>, UpstreamError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let Some(limit) = self.limit else {
            return self.inner.call(request.map(AttemptBody::Stream)).boxed();
        };
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = match buffer_up_to(body, limit).await {
                Ok(Buffered::Complete(whole)) => AttemptBody::Replay(whole.replay()),
                Ok(Buffered::Partial(rest)) => {
                    AttemptBody::Stream(http_body_util::BodyExt::boxed_unsync(rest))
                }
                // The checked body's verdict (if it refused the body) is what the client gets.
                Err(e) => {
                    return Err(UpstreamError::RequestBody {
                        cause: e.to_string(),
                    })
                }
            };
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

/// A route's `retry_policy` for tower's `Retry`. One is cloned per call (its attempt count and
/// back-off are the call's); the budget is the route's.
#[derive(Clone)]
pub struct RetryPolicy {
    config: Option<Arc<config::RetryPolicy>>,
    budget: Arc<TpsBudget>,
    backoff: ExponentialBackoff,
    attempts: u32,
}

impl RetryPolicy {
    pub fn new(config: Option<&config::RetryPolicy>) -> RetryPolicy {
        let mut maker =
            ExponentialBackoffMaker::new(BACKOFF_BASE, BACKOFF_MAX, 1.0, HasherRng::default())
                .expect("the back-off constants are valid");
        RetryPolicy {
            config: config
                .filter(|c| c.num_retries > 0)
                .map(|c| Arc::new(c.clone())),
            budget: Arc::new(TpsBudget::new(
                BUDGET_WINDOW,
                BUDGET_MIN_PER_SECOND,
                BUDGET_PERCENT,
            )),
            backoff: maker.make_backoff(),
            attempts: 0,
        }
    }

    /// How much of a body [`Replay`] buffers: `None` when the route does not retry.
    pub fn buffered_bytes(&self) -> Option<usize> {
        self.config.as_ref().map(|c| c.max_buffered_bytes)
    }

    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.config.as_ref().and_then(|c| c.per_try_timeout)
    }

    /// Why this outcome may be retried under the policy, if it may.
    fn reason(
        config: &config::RetryPolicy,
        result: &Result<Response<Incoming>, UpstreamError>,
    ) -> Option<String> {
        let wanted = |token| config.retry_on.contains(&token);
        match result {
            Err(e @ UpstreamError::TryTimeout { .. }) => Some(e.to_string()),
            Err(e @ UpstreamError::Connect { .. }) if wanted(RetryOn::ConnectFailure) => {
                Some(e.to_string())
            }
            Err(e @ UpstreamError::Refused { .. }) if wanted(RetryOn::RefusedStream) => {
                Some(e.to_string())
            }
            Err(e @ UpstreamError::Reset { .. }) if wanted(RetryOn::Reset) => Some(e.to_string()),
            Err(_) => None,
            Ok(response) => {
                let code = grpc_status(response.headers())?;
                let token = match code {
                    1 => RetryOn::Cancelled,
                    4 => RetryOn::DeadlineExceeded,
                    8 => RetryOn::ResourceExhausted,
                    13 => RetryOn::Internal,
                    14 => RetryOn::Unavailable,
                    _ => return None,
                };
                wanted(token).then(|| format!("upstream answered grpc-status {code}"))
            }
        }
    }
}

impl tower::retry::Policy<Request<AttemptBody>, Response<Incoming>, UpstreamError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut Request<AttemptBody>,
        result: &mut Result<Response<Incoming>, UpstreamError>,
    ) -> Option<tokio::time::Sleep> {
        let config = self.config.as_ref()?;
        let reason = Self::reason(config, result)?;
        if self.attempts >= config.num_retries {
            return None;
        }
        if !self.budget.withdraw() {
            tracing::debug!(%reason, "not retried: the route's retry budget is spent");
            return None;
        }
        self.attempts += 1;
        tracing::debug!(attempt = self.attempts, %reason, "retrying");
        Some(self.backoff.next_backoff())
    }

    fn clone_request(&mut self, request: &Request<AttemptBody>) -> Option<Request<AttemptBody>> {
        self.config.as_ref()?;
        if self.attempts == 0 {
            // Each call (not each attempt) earns the budget its share of retries.
            self.budget.deposit();
        }
        let AttemptBody::Replay(body) = request.body() else {
            return None;
        };
        let mut copy = Request::new(AttemptBody::Replay(body.clone()));
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        Some(copy)
    }
}

/// `retry_policy.per_try_timeout`: one attempt that takes longer fails with
/// [`UpstreamError::TryTimeout`] (which the policy retries).
#[derive(Clone)]
pub struct PerTryTimeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S> PerTryTimeout<S> {
    pub fn new(inner: S, timeout: Option<Duration>) -> Self {
        PerTryTimeout { inner, timeout }
    }
}

impl<S, R> Service<R> for PerTryTimeout<S>
where
    S: Service<R, Response = Response<Incoming>, Error = UpstreamError>,
    S::Future: Send + 'static,
{
    type Response = Response<Incoming>;
    type Error = UpstreamError;
    type Future = BoxFuture<'static, Result<Response<Incoming>, UpstreamError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let sent = self.inner.call(request);
        let Some(after) = self.timeout else {
            return sent.boxed();
        };
        Box::pin(async move {
            tokio::time::timeout(after, sent)
                .await
                .unwrap_or(Err(UpstreamError::TryTimeout { after }))
        })
    }
}
