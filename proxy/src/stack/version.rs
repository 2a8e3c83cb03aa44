//! The VersionGet answer of an instance-manager's proxy, completed on its way down.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::Body;
use http_body_util::Either;
use tower::Service;

use super::Call;
use crate::engine_proxy::version::{version_patch_body, VersionPatchBody, VERSION_GET_PATHS};
use crate::reply::{BoxError, LocalReply};

/// On routes that can carry an instance-manager `VersionGet` (`enabled`): the answer of that
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
    type Future = PatchFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let patch = self.enabled && VERSION_GET_PATHS.contains(&call.parts.uri.path());
        PatchFuture {
            inner: self.inner.call(call),
            patch,
        }
    }
}

pin_project_lite::pin_project! {
    /// The call below, its response body patched when `patch` (a named future: no box).
    pub struct PatchFuture<F> {
        #[pin]
        inner: F,
        patch: bool,
    }
}

impl<F, B> Future for PatchFuture<F>
where
    F: Future<Output = Result<Response<B>, LocalReply>>,
{
    type Output = Result<Response<Either<VersionPatchBody<B>, B>>, LocalReply>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let patch = *this.patch;
        this.inner.poll(cx).map_ok(|response| {
            response.map(|b| match patch {
                true => Either::Left(version_patch_body(b)),
                false => Either::Right(b),
            })
        })
    }
}
