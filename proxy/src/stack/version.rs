//! The VersionGet answer of an instance-manager's proxy, completed on its way down.

use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, FutureExt, TryFutureExt};
use http::Response;
use http_body_util::BodyExt;
use tower::Service;

use super::Call;
use crate::engine_proxy::version::{VersionPatchBody, VERSION_GET_PATH};
use crate::reply::{LocalReply, ProxyBody};

/// On routes that can carry `ProcessManagerService/VersionGet`: the answer of that method goes
/// through [`VersionPatchBody`]; every other method passes untouched.
#[derive(Clone)]
pub struct VersionPatch<S> {
    inner: S,
}

impl<S> VersionPatch<S> {
    pub fn new(inner: S) -> Self {
        VersionPatch { inner }
    }
}

impl<S> Service<Call> for VersionPatch<S>
where
    S: Service<Call, Response = Response<ProxyBody>, Error = LocalReply>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = LocalReply;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, LocalReply>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let patch = call.parts.uri.path() == VERSION_GET_PATH;
        let served = self.inner.call(call);
        if !patch {
            return served.boxed();
        }
        served
            .map_ok(|response| response.map(|b| VersionPatchBody::new(b).boxed_unsync()))
            .boxed()
    }
}
