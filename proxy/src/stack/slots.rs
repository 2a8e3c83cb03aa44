//! Load shedding at a cluster's concurrency limit (`circuit_breakers`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use tower::Service;

use super::Call;
use crate::cluster::{Cluster, ClusterSlot, SlotLimit};
use crate::metrics::Metrics;
use crate::reply::{BoxError, LocalReply, RouteContext};

/// Takes one of the cluster's `circuit_breakers.max_requests` slots for the call, within the
/// downstream connection's share (`max_requests_per_downstream_connection`), and holds it
/// until the response body ends. Past either limit the call is shed at once with
/// RESOURCE_EXHAUSTED naming the limit (Envoy's circuit breakers queue nothing either):
/// tower's own `ConcurrencyLimit` waits for a permit and knows nothing of connections.
#[derive(Clone)]
pub struct Slots<S> {
    inner: S,
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    context: RouteContext,
}

impl<S> Slots<S> {
    pub fn new(
        inner: S,
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        context: RouteContext,
    ) -> Self {
        Slots {
            inner,
            cluster,
            metrics,
            context,
        }
    }

    fn refused(&self, limit: SlotLimit) -> LocalReply {
        let c = &self.cluster.config;
        let context = &self.context;
        let text = match limit {
            SlotLimit::Cluster => format!(
                "cluster {} has circuit_breakers.max_requests ({}) requests in flight ({context})",
                c.name, c.max_requests
            ),
            SlotLimit::Connection => format!(
                "this connection holds circuit_breakers.max_requests_per_downstream_connection ({}) of cluster {}'s requests in flight; wait for some to finish or spread calls over more connections ({context})",
                c.max_requests_per_downstream_connection, c.name
            ),
        };
        self.metrics
            .limit_reached(&c.name, limit.key(), || text.clone());
        LocalReply::new(tonic::Code::ResourceExhausted, text)
    }
}

impl<S, B> Service<Call> for Slots<S>
where
    S: Service<Call, Response = Response<B>, Error = LocalReply>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<WithSlot<B>>;
    type Error = LocalReply;
    type Future = SlotFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        match self.cluster.try_acquire(&call.downstream) {
            Ok(slot) => SlotFuture::Called {
                inner: self.inner.call(call),
                slot: Some(slot),
            },
            Err(limit) => SlotFuture::Refused {
                reply: Some(self.refused(limit)),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The call below holding its slot, or the refusal (a named future: no box).
    #[project = SlotFutureProj]
    pub enum SlotFuture<F> {
        Called {
            #[pin]
            inner: F,
            slot: Option<ClusterSlot>,
        },
        Refused {
            reply: Option<LocalReply>,
        },
    }
}

impl<F, B> Future for SlotFuture<F>
where
    F: Future<Output = Result<Response<B>, LocalReply>>,
{
    type Output = Result<Response<WithSlot<B>>, LocalReply>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            SlotFutureProj::Called { inner, slot } => {
                let response = std::task::ready!(inner.poll(cx))?;
                let Some(slot) = slot.take() else {
                    return Poll::Ready(Err(LocalReply::polled_again()));
                };
                Poll::Ready(Ok(response.map(|inner| WithSlot { inner, _slot: slot })))
            }
            SlotFutureProj::Refused { reply } => {
                Poll::Ready(Err(reply.take().unwrap_or_else(LocalReply::polled_again)))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that gives its cluster slot back when it is dropped.
    pub struct WithSlot<B> {
        #[pin]
        inner: B,
        _slot: ClusterSlot,
    }
}

impl<B> Body for WithSlot<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project()
            .inner
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
