//! The call's deadline over the whole stack below.

use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, Either, FutureExt};
use tower::Service;

use super::Call;
use crate::reply::{LocalReply, RouteContext};

/// Ends the call with DEADLINE_EXCEEDED when its deadline passes before a response; the
/// response body is held to the same deadline downstream (`ObservedBody`).
#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    context: RouteContext,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, context: RouteContext) -> Self {
        Deadline { inner, context }
    }
}

impl<S, R> Service<Call> for Deadline<S>
where
    S: Service<Call, Response = R, Error = LocalReply>,
    S::Future: Send + 'static,
{
    type Response = R;
    type Error = LocalReply;
    /// The inner future as it is when there is no deadline (no box).
    type Future = Either<S::Future, BoxFuture<'static, Result<R, LocalReply>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let deadline = call.deadline;
        let served = self.inner.call(call);
        let Some(deadline) = deadline else {
            return Either::Left(served);
        };
        let context = self.context.clone();
        // Mapped, not awaited in an async block (which would hold `served` twice).
        Either::Right(Box::pin(tokio::time::timeout_at(deadline.at, served).map(
            move |timed| match timed {
                Ok(result) => result,
                Err(_) => Err(deadline.reply(&context)),
            },
        )))
    }
}
