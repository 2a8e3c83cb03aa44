//! Services answered inside the proxy, as route services: a tonic server ([`Local`]), and the
//! engine proxy, which serves what it can and forwards the rest ([`EngineDispatch`]).

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::combinators::MapFrame;
use http_body_util::{BodyExt, Either};
use tonic::Code;
use tower::{Service, ServiceExt};

use super::body_start::{await_body, wait_for_body};
use super::{body_failed, Call, ListenerInfo, PassthroughService, RequestBody};
use crate::engine_proxy::dispatch::{self, Decision};
use crate::engine_proxy::raw::{RawCalls, RawReply, RawRpc, Served};
use crate::reply::{undecodable_to_invalid_argument, LocalReply, ProxyBody, RouteContext};

/// A tonic server of the proxy's own, called with the request as it streams in. A message it
/// cannot decode is the caller's malformed request: its INTERNAL becomes INVALID_ARGUMENT.
#[derive(Clone)]
pub struct Local<S> {
    server: S,
}

impl<S> Local<S> {
    pub fn new(server: S) -> Self {
        Local { server }
    }
}

/// The response body of a [`Local`] service: tonic's, with decode failures in the trailers
/// made INVALID_ARGUMENT.
pub type LocalBody = MapFrame<tonic::body::Body, fn(Frame<Bytes>) -> Frame<Bytes>>;

fn undecodable_in_trailers(mut frame: Frame<Bytes>) -> Frame<Bytes> {
    if let Some(trailers) = frame.trailers_mut() {
        undecodable_to_invalid_argument(trailers);
    }
    frame
}

impl<S> Service<Call> for Local<S>
where
    S: Service<Request<RequestBody>, Response = Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<LocalBody>;
    type Error = LocalReply;
    type Future = BoxFuture<'static, Result<Response<LocalBody>, LocalReply>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let request = Request::from_parts(call.parts, call.body);
        // tonic servers are always ready; `oneshot` on a clone keeps this service reusable.
        self.server
            .clone()
            .oneshot(request)
            .map(|answered| {
                let Ok(mut response) = answered;
                undecodable_to_invalid_argument(response.headers_mut());
                let trailers: fn(Frame<Bytes>) -> Frame<Bytes> = undecodable_in_trailers;
                Ok(response.map(|body| body.map_frame(trailers)))
            })
            .boxed()
    }
}

/// `local: longhorn_engine_proxy`: lhnet answers what it serves; the rest goes byte for byte
/// to the passthrough cluster (the instance-manager's own proxy), or is UNIMPLEMENTED naming
/// the key that would forward it ([`dispatch`]).
pub struct EngineDispatch<S> {
    inner: std::sync::Arc<DispatchInner<S>>,
}

impl<S> Clone for EngineDispatch<S> {
    fn clone(&self) -> Self {
        EngineDispatch {
            inner: self.inner.clone(),
        }
    }
}

struct DispatchInner<S> {
    local: Local<S>,
    /// VolumeGet, ReplicaList and MetricsGet, answered without decoding the engine's reply.
    raw: RawCalls,
    /// The forwarding stack of `passthrough_cluster`, when the route names one.
    passthrough: Option<PassthroughService>,
    listener: ListenerInfo,
    context: RouteContext,
}

impl<S> EngineDispatch<S> {
    pub fn new(
        local: Local<S>,
        raw: RawCalls,
        passthrough: Option<PassthroughService>,
        listener: ListenerInfo,
        context: RouteContext,
    ) -> Self {
        EngineDispatch {
            inner: std::sync::Arc::new(DispatchInner {
                local,
                raw,
                passthrough,
                listener,
                context,
            }),
        }
    }
}

impl<S> Service<Call> for EngineDispatch<S>
where
    Local<S>: Service<Call, Response = Response<LocalBody>, Error = LocalReply>
        + Clone
        + Send
        + Sync
        + 'static,
    <Local<S> as Service<Call>>::Future: Send + 'static,
{
    type Response = Response<Either<LocalBody, Either<RawReply, ProxyBody>>>;
    type Error = LocalReply;
    type Future = BoxFuture<'static, Result<Self::Response, LocalReply>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let this = self.inner.clone();
        Box::pin(async move {
            let (body, rest) = call.take_body();
            let (waiters, verdict) = (&rest.downstream.waiters, &rest.verdict);
            let method = rest.parts.uri.path().rsplit('/').next().unwrap_or("");
            let (decision, body) = match dispatch::route_of(method) {
                // Every ProxyEngineService call is unary: its body must start within
                // stream_idle_timeout, so header-only streams do not pile up here either.
                dispatch::Route::Local => (
                    Decision::Local,
                    await_body(body, verdict, waiters, &this.listener, &this.context).await?,
                ),
                dispatch::Route::Passthrough(why) => (Decision::Passthrough(why.into()), body),
                dispatch::Route::ByDataEngine(shape) => {
                    // Decided from the first message as soon as it is whole (the checked body
                    // bounds it by max_message_size); its bytes travel on unchanged either way.
                    let reading = body.first_message();
                    let read =
                        wait_for_body(reading, waiters, &this.listener, &this.context).await?;
                    match read {
                        Ok((Some(message), body)) => {
                            let decision = dispatch::decide(method, shape, &message);
                            let raw = RawRpc::of(method).filter(|_| {
                                matches!(decision, Decision::Local) && body.first_message_is_plain()
                            });
                            if let Some(rpc) = raw {
                                match this.raw.serve(rpc, &message).await {
                                    Served::Answer(r) => {
                                        return Ok(r.map(|b| Either::Right(Either::Left(b))))
                                    }
                                    Served::Refused(status) => return Err(status.into()),
                                    Served::Fallback => {}
                                }
                            }
                            (decision, body)
                        }
                        Ok((None, body)) => (Decision::Local, body),
                        Err(e) => return Err(body_failed(verdict, &e, &this.context)),
                    }
                }
            };
            let call = rest.with_body(body);
            match decision {
                Decision::Local => Ok(this
                    .local
                    .clone()
                    .oneshot(call)
                    .await?
                    .map(Either::Left)),
                Decision::Refuse(status) => Err(status.into()),
                Decision::Passthrough(why) => match &this.passthrough {
                    Some(passthrough) => {
                        tracing::debug!(path = %call.parts.uri.path(), reason = %why, "passing through to the instance-manager's proxy");
                        Ok(passthrough
                            .clone()
                            .oneshot(call)
                            .await?
                            .map(|b| Either::Right(Either::Right(b))))
                    }
                    None => Err(LocalReply::new(
                        Code::Unimplemented,
                        format!(
                            "{} is not served by lhnet ({why}); set passthrough_cluster on this route to forward it to the instance-manager's own proxy (127.0.0.1:8501) ({})",
                            call.parts.uri.path().trim_start_matches('/'),
                            this.context
                        ),
                    )),
                },
            }
        })
    }
}
