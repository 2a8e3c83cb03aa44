//! The outermost layer of every route: the call's deadline (the route `timeout` or
//! `grpc-timeout`, whichever is shorter, over the whole call), the call's end observed
//! (metrics, the checked body's verdict) and every error answered as a gRPC status.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Sleep;
use tower::Service;

use super::{Call, CallDeadline, RouteRequest};
use crate::body::{ObservedBody, RequestLog, Verdict};
use crate::reply::{grpc_status, BoxError, LocalReply, ProxyBody, RouteContext};

/// Deadline, error mapping and observation: the call ends with DEADLINE_EXCEEDED when its
/// deadline passes before a response, and a response body is held to the same deadline (one
/// timer per call, for both); a [`LocalReply`] from any layer becomes its Trailers-Only
/// response; a response is recorded when its stream ends (`ObservedBody`). The one place a
/// response body is boxed.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    context: RouteContext,
}

impl<S> Observe<S> {
    pub fn new(inner: S, context: RouteContext) -> Self {
        Observe { inner, context }
    }
}

impl<S, B> Service<RouteRequest> for Observe<S>
where
    S: Service<Call, Response = Response<B>, Error = LocalReply>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every layer below is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RouteRequest) -> Self::Future {
        let RouteRequest { call, log } = request;
        let end = End {
            verdict: call.verdict.clone(),
            deadline: call
                .deadline
                .map(|d| (d, Box::pin(tokio::time::sleep_until(d.at)))),
            context: self.context.clone(),
            log,
        };
        ObserveFuture {
            inner: self.inner.call(call),
            end: Some(end),
        }
    }
}

/// What [`Observe`] needs when the call below has answered.
struct End {
    verdict: Verdict,
    /// The deadline and the call's one timer for it (boxed: a call without one holds no
    /// room for it), handed on to the response body.
    deadline: Option<(CallDeadline, Pin<Box<Sleep>>)>,
    context: RouteContext,
    log: RequestLog,
}

pin_project_lite::pin_project! {
    /// The call below, its answer turned into the downstream response (a named future: the
    /// route's one box holds it).
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        end: Option<End>,
    }
}

impl<F, B> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<B>, LocalReply>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answered = match this.inner.poll(cx) {
            Poll::Ready(answered) => answered,
            // The inner future first, as tokio's timeout does: an answer and the deadline in
            // the same turn is the answer.
            Poll::Pending => {
                let Some(End {
                    deadline: Some((deadline, timer)),
                    context,
                    ..
                }) = this.end.as_mut()
                else {
                    return Poll::Pending;
                };
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                Err(deadline.reply(context))
            }
        };
        let Some(end) = this.end.take() else {
            return Poll::Ready(Ok(LocalReply::polled_again().into_response()));
        };
        Poll::Ready(Ok(match answered {
            Ok(response) => finish(response, &end.verdict, end.deadline, end.context, end.log),
            Err(reply) => finish_local(reply, end.log),
        }))
    }
}

/// Completes a reply of the proxy's own: records it and returns it.
pub fn finish_local(reply: LocalReply, log: RequestLog) -> Response<ProxyBody> {
    log.finish(reply.code as i32);
    reply.into_response()
}

/// Turns the route's response into the downstream one, observed to its end.
fn finish<B>(
    response: Response<B>,
    verdict: &Verdict,
    deadline: Option<(CallDeadline, Pin<Box<Sleep>>)>,
    context: RouteContext,
    log: RequestLog,
) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    // The proxy rejected the request body: its status wins over the upstream's reaction.
    if let Some(reply) = verdict.get() {
        return finish_local(reply.clone(), log);
    }
    if let Some(code) = grpc_status(response.headers()) {
        // Trailers-Only: the status is in the headers and the stream has ended.
        log.finish(code);
        return response.map(|b| b.map_err(|e| BoxError::from(e.to_string())).boxed_unsync());
    }
    let deadline = deadline.map(|(d, timer)| (timer, d.reply(&context)));
    let (parts, body) = response.into_parts();
    let body = ObservedBody::new(body, deadline, verdict.clone(), context, log);
    Response::from_parts(parts, body.boxed_unsync())
}
