//! Retries: the body buffered so it can be sent again ([`Replay`]), tower's `Retry` driven by
//! the route's `retry_policy` ([`RetryPolicy`]: reasons, attempts, jittered back-off, a retry
//! budget), and each attempt's own timeout ([`PerTryTimeout`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::cluster::H2Body;
use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::HasherRng;
use tower::Service;

use super::RequestBody;
use crate::body::{buffer_up_to, Buffered, Prefixed, ReplayBody};
use crate::cluster::UpstreamError;
use crate::config::{self, RetryOn};
use crate::metrics::Metrics;
use crate::reply::{grpc_status, BoxError};

/// Envoy's default back-off: 25 ms base; at most ten times that; full jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// The retry budget: retries may add 20% to a route's calls (counted over 10 s), and 10 a
/// second whatever the traffic (Envoy's `retry_budget` default is 20% too).
const BUDGET_PERCENT: f32 = 0.2;
const BUDGET_MIN_PER_SECOND: u32 = 10;
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// A request body on its way to an attempt: replayable, or streamed (sent once, never retried):
/// as it came, or after the part read while trying to buffer it.
pub enum AttemptBody {
    Replay(ReplayBody),
    Stream(RequestBody),
    Partial(Prefixed<RequestBody>),
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
            AttemptBody::Partial(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AttemptBody::Replay(b) => b.is_end_stream(),
            AttemptBody::Stream(b) => b.is_end_stream(),
            AttemptBody::Partial(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AttemptBody::Replay(b) => b.size_hint(),
            AttemptBody::Stream(b) => b.size_hint(),
            AttemptBody::Partial(b) => b.size_hint(),
        }
    }
}

/// Buffers a request body of up to `limit` bytes so the retry layer can send it again; a larger
/// one is streamed on (one attempt). Only on routes with a retry policy.
#[derive(Clone)]
pub struct Replay<S> {
    inner: S,
    limit: usize,
}

impl<S> Replay<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        Replay { inner, limit }
    }
}

impl<S> Service<Request<RequestBody>> for Replay<S>
where
    S: Service<Request<AttemptBody>, Response = Response<H2Body>, Error = UpstreamError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<H2Body>;
    type Error = UpstreamError;
    type Future = BoxFuture<'static, Result<Response<H2Body>, UpstreamError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let limit = self.limit;
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = match buffer_up_to(body, limit).await {
                Ok(Buffered::Complete(whole)) => AttemptBody::Replay(whole.replay()),
                Ok(Buffered::Partial(rest)) => AttemptBody::Partial(rest),
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
/// back-off are the call's); the budget is the route's. Without retries configured it holds
/// nothing and buffers nothing.
#[derive(Clone)]
pub struct RetryPolicy {
    route: Option<Arc<RouteRetries>>,
    backoff: ExponentialBackoff,
    attempts: u32,
}

/// What every call of a route shares: its policy, its budget, where a spent budget is counted.
struct RouteRetries {
    config: config::RetryPolicy,
    budget: TpsBudget,
    cluster: Arc<str>,
    metrics: Arc<Metrics>,
}

impl RetryPolicy {
    pub fn new(
        config: Option<&config::RetryPolicy>,
        cluster: &str,
        metrics: &Arc<Metrics>,
    ) -> RetryPolicy {
        let mut maker =
            ExponentialBackoffMaker::new(BACKOFF_BASE, BACKOFF_MAX, 1.0, HasherRng::default())
                .expect("the back-off constants are valid");
        RetryPolicy {
            route: config.filter(|c| c.num_retries > 0).map(|c| {
                Arc::new(RouteRetries {
                    config: c.clone(),
                    budget: TpsBudget::new(BUDGET_WINDOW, BUDGET_MIN_PER_SECOND, BUDGET_PERCENT),
                    cluster: cluster.into(),
                    metrics: metrics.clone(),
                })
            }),
            backoff: maker.make_backoff(),
            attempts: 0,
        }
    }

    /// How much of a body [`Replay`] buffers: `None` when the route does not retry.
    pub fn buffered_bytes(&self) -> Option<usize> {
        self.route.as_ref().map(|r| r.config.max_buffered_bytes)
    }

    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.route.as_ref().and_then(|r| r.config.per_try_timeout)
    }

    /// Why this outcome may be retried under the policy, if it may.
    fn reason(
        config: &config::RetryPolicy,
        result: &Result<Response<H2Body>, UpstreamError>,
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

impl tower::retry::Policy<Request<AttemptBody>, Response<H2Body>, UpstreamError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut Request<AttemptBody>,
        result: &mut Result<Response<H2Body>, UpstreamError>,
    ) -> Option<tokio::time::Sleep> {
        let route = self.route.as_ref()?;
        let reason = Self::reason(&route.config, result)?;
        if self.attempts >= route.config.num_retries {
            return None;
        }
        if !route.budget.withdraw() {
            route.metrics.limit_reached(&route.cluster, "retry_budget", || {
                format!(
                    "cluster {}: not retried ({reason}): retries already add {}% to this route's calls",
                    route.cluster,
                    BUDGET_PERCENT * 100.0
                )
            });
            return None;
        }
        self.attempts += 1;
        tracing::debug!(attempt = self.attempts, %reason, "retrying");
        Some(self.backoff.next_backoff())
    }

    fn clone_request(&mut self, request: &Request<AttemptBody>) -> Option<Request<AttemptBody>> {
        let route = self.route.as_ref()?;
        if self.attempts == 0 {
            // Each call (not each attempt) earns the budget its share of retries.
            route.budget.deposit();
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
    S: Service<R, Response = Response<H2Body>, Error = UpstreamError>,
    S::Future: Send + 'static,
{
    type Response = Response<H2Body>;
    type Error = UpstreamError;
    type Future = BoxFuture<'static, Result<Response<H2Body>, UpstreamError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let sent = self.inner.call(request);
        let Some(after) = self.timeout else {
            return sent.boxed();
        };
        Box::pin(
            tokio::time::timeout(after, sent)
                .map(move |timed| timed.unwrap_or(Err(UpstreamError::TryTimeout { after }))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Cluster, ClusterService};
    use crate::metrics::Metrics;
    use crate::storage::StorageState;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    /// What the raw HTTP/2 upstream does with its first stream; later ones get grpc-status 0.
    #[derive(Clone, Copy)]
    enum First {
        Refuse,
        Hang,
    }

    /// An HTTP/2 server (h2 directly, so it can reset a stream with any code) counting the
    /// streams it sees.
    async fn upstream(first: First) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    let mut held = Vec::new();
                    while let Some(Ok((_request, mut respond))) = conn.accept().await {
                        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                            match first {
                                First::Refuse => respond.send_reset(h2::Reason::REFUSED_STREAM),
                                First::Hang => held.push(respond),
                            }
                            continue;
                        }
                        let ok = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "0")
                            .body(())
                            .unwrap();
                        let _ = respond.send_response(ok, true);
                    }
                });
            }
        });
        (addr, seen)
    }

    fn cluster(addr: std::net::SocketAddr) -> Arc<Cluster> {
        let text = format!("storage_network: {{ interface: lo }}\nlisteners: []\nclusters:\n  - {{ name: c, endpoints: [{addr}] }}\n");
        let config = crate::config::Config::parse(&text, "test").unwrap();
        let metrics = Metrics::new();
        let storage = StorageState::new(&config.storage_network, None, metrics.clone());
        Cluster::new(config.clusters[0].clone(), storage, metrics)
    }

    fn policy(retry_on: Vec<RetryOn>, per_try_timeout: Option<Duration>) -> RetryPolicy {
        let config = config::RetryPolicy {
            retry_on,
            num_retries: 1,
            per_try_timeout,
            max_buffered_bytes: 1024,
        };
        RetryPolicy::new(Some(&config), "c", &Metrics::new())
    }

    async fn send(
        policy: RetryPolicy,
        addr: std::net::SocketAddr,
    ) -> Result<Response<H2Body>, UpstreamError> {
        let stack = tower::retry::Retry::new(
            policy.clone(),
            PerTryTimeout::new(ClusterService::new(cluster(addr)), policy.per_try_timeout()),
        );
        let request = Request::builder()
            .uri("/x.Y/Z")
            .header("content-type", "application/grpc")
            .body(AttemptBody::Replay(
                crate::body::Replayable::default().replay(),
            ))
            .unwrap();
        stack.oneshot(request).await
    }

    #[tokio::test]
    async fn a_refused_stream_is_known_by_its_http2_reason_and_retried() {
        let (addr, seen) = upstream(First::Refuse).await;
        let answered = send(policy(vec![RetryOn::RefusedStream], None), addr).await;
        assert_eq!(grpc_status(answered.unwrap().headers()), Some(0));
        assert_eq!(seen.load(Ordering::SeqCst), 2);

        // Not asked for: the REFUSED_STREAM reset is not taken for a plain `reset`.
        let (addr, seen) = upstream(First::Refuse).await;
        let failed = send(policy(vec![RetryOn::Reset], None), addr).await;
        assert!(
            matches!(failed, Err(UpstreamError::Refused { .. })),
            "{failed:?}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_attempt_past_per_try_timeout_is_retried() {
        let (addr, seen) = upstream(First::Hang).await;
        let timeout = Some(Duration::from_millis(200));
        let answered = send(policy(Vec::new(), timeout), addr).await;
        assert_eq!(grpc_status(answered.unwrap().headers()), Some(0));
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_retry_budget_bounds_retries_when_every_call_fails() {
        let config = config::RetryPolicy {
            retry_on: vec![RetryOn::ConnectFailure],
            num_retries: 3,
            per_try_timeout: None,
            max_buffered_bytes: 1024,
        };
        let metrics = Metrics::new();
        let base = RetryPolicy::new(Some(&config), "c", &metrics);
        let failing = || {
            Err(UpstreamError::Connect {
                destination: ([127, 0, 0, 1], 9).into(),
                cause: "refused".into(),
            })
        };
        let (calls, mut retried) = (2000, 0);
        for _ in 0..calls {
            // As tower's Retry does: clone_request on the route's policy, retry on the call's.
            let mut route = base.clone();
            let mut request = Request::new(AttemptBody::Replay(
                crate::body::Replayable::default().replay(),
            ));
            assert!(tower::retry::Policy::clone_request(&mut route, &request).is_some());
            let mut call = route.clone();
            while tower::retry::Policy::retry(&mut call, &mut request, &mut failing()).is_some() {
                retried += 1;
            }
        }
        // Unbudgeted, 3 retries of each of 2000 calls; the budget allows 20% of the calls plus
        // its reserve of 10 a second over 10 s.
        assert!(retried <= calls / 5 + 100 + 10, "{retried} retries");
        assert!(retried >= 100, "{retried} retries");
        // Each call the budget cut short is counted once.
        let text = metrics.render();
        let spent: usize = text
            .lines()
            .find(|l| l.starts_with("lhnet_limits_reached_total") && l.contains("retry_budget"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no retry_budget count in:\n{text}"));
        assert!(spent > 0 && spent <= calls, "{spent} calls refused a retry");
    }
}
