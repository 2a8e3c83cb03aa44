//! The VersionGet answer of an instance-manager's proxy, completed on its way down.

use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, TryFutureExt};
use http::Response;
use http_body::Body;
use http_body_util::Either;
use tower::Service;

use super::Call;
use crate::engine_proxy::version::{VersionPatchBody, VERSION_GET_PATH};
use crate::reply::{BoxError, LocalReply};

/// On routes that can carry `ProcessManagerService/VersionGet` (`enabled`): the answer of that
/// method goes through [`VersionPatchBody`]; every other answer passes untouched.
#[derive(Clone)]
pub struct VersionPatch<S> {
    inner: S,
    enabled: bool,
}

impl<S> VersionPatch<S> {
    pub fn new(inner: S, enabled: bool) -> Self {
        VersionPatch { inner, enabled }
    }
}

impl<S, B> Service<Call> for VersionPatch<S>
where
    S: Service<Call, Response = Response<B>, Error = LocalReply>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Either<VersionPatchBody<B>, B>>;
    type Error = LocalReply;
    type Future = BoxFuture<'static, Result<Self::Response, LocalReply>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let patch = self.enabled && call.parts.uri.path() == VERSION_GET_PATH;
        self.inner
            .call(call)
            .map_ok(move |response| {
                response.map(|b| match patch {
                    true => Either::Left(VersionPatchBody::new(b)),
                    false => Either::Right(b),
                })
            })
            .boxed()
    }
}
