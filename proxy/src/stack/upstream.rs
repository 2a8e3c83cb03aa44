//! The boundary between the route and the cluster: the call becomes an HTTP/2 request, and
//! what goes wrong upstream becomes a gRPC status naming the route.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::cluster::H2Body;
use http::header::HeaderValue;
use http::{Request, Response};
use tokio::time::Instant;
use tonic::Code;
use tower::Service;

use super::{Call, RequestBody};
use crate::body::Verdict;
use crate::cluster::UpstreamError;
use crate::reply::{names, LocalReply, RouteContext};
use crate::route::encode_grpc_timeout;

/// Sends the call's request to the stack below. The client's `grpc-timeout` never travels as
/// sent: lhnet re-encodes the time left of the deadline it enforces, so a value only some
/// servers accept cannot reach a connection shared by every client. Headers otherwise pass as
/// they are: HTTP/2 forbids connection-specific headers (RFC 9113 §8.2.2) and h2 refuses them
/// on receipt, so there is nothing hop-by-hop to strip.
#[derive(Clone)]
pub struct Upstream<S> {
    inner: S,
    context: RouteContext,
}

impl<S> Upstream<S> {
    pub fn new(inner: S, context: RouteContext) -> Self {
        Upstream { inner, context }
    }
}

impl<S> Service<Call> for Upstream<S>
where
    S: Service<Request<RequestBody>, Response = Response<H2Body>, Error = UpstreamError>,
    S::Future: Send + 'static,
{
    type Response = Response<H2Body>;
    type Error = LocalReply;
    type Future = UpstreamFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| upstream_reply(&e, None, &self.context))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let Call {
            mut parts,
            body,
            deadline,
            verdict,
            ..
        } = call;
        parts.headers.remove(names::GRPC_TIMEOUT);
        if let Some(d) = deadline {
            let left = d.at.saturating_duration_since(Instant::now());
            if let Ok(v) = HeaderValue::from_str(&encode_grpc_timeout(left)) {
                parts.headers.insert(names::GRPC_TIMEOUT, v);
            }
        }
        let request = Request::from_parts(parts, body);
        UpstreamFuture {
            inner: self.inner.call(request),
            verdict,
            context: self.context.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The call below, its error turned into the route's status (a named future: no box).
    pub struct UpstreamFuture<F> {
        #[pin]
        inner: F,
        verdict: Verdict,
        context: RouteContext,
    }
}

impl<F, R> Future for UpstreamFuture<F>
where
    F: Future<Output = Result<R, UpstreamError>>,
{
    type Output = Result<R, LocalReply>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.inner
            .poll(cx)
            .map_err(|e| upstream_reply(&e, Some(this.verdict), this.context))
    }
}

/// The status for an upstream failure: the checked body's verdict when it refused the request
/// (the upstream only saw the stream cut), else what failed, where.
fn upstream_reply(
    e: &UpstreamError,
    verdict: Option<&Verdict>,
    context: &RouteContext,
) -> LocalReply {
    if let Some(reply) = verdict.and_then(|v| v.get()) {
        return reply.clone();
    }
    let code = match e {
        UpstreamError::TryTimeout { .. } => Code::DeadlineExceeded,
        UpstreamError::RequestBody { .. } => Code::Cancelled,
        UpstreamError::PolledAgain => Code::Internal,
        _ => Code::Unavailable,
    };
    LocalReply::new(code, format!("{e} ({context})"))
}
