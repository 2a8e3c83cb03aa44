//! The request path as tower layers. Each route is built once, when its config is loaded, into
//! one boxed [`RouteService`]; `RouteTable::handle` only picks the route, checks the request is
//! gRPC, reads its deadline and calls the route's service.
//!
//! A forwarding route (`cluster:`; also the engine proxy's `passthrough_cluster`), outermost
//! first:
//!
//! | layer | does |
//! |---|---|
//! | [`Observe`] | the route `timeout` / `grpc-timeout`, whichever is shorter, over the whole call (one timer, for the answer and its body); error mapping: a status from any layer becomes its Trailers-Only answer; metrics at the stream's end; the one box of the response body |
//! | [`BodyStart`] | unary and server-streaming calls wait (up to `stream_idle_timeout`) for their message before taking anything upstream |
//! | [`VersionPatch`] | routes that can carry the instance-manager's `VersionGet` (`ProcessManagerService`, `imrpc.InstanceService`; response layer: lhnet's proxy API version) |
//! | [`Slots`] | load shedding at the cluster's `circuit_breakers` and the connection's share of them: a call past either is refused at once, RESOURCE_EXHAUSTED naming the limit |
//! | [`Upstream`] | upstream errors become statuses naming the route; `grpc-timeout` re-encoded |
//! | [`Replay`] | buffers a body up to `retry_policy.max_buffered_bytes` so it can be sent again (this and the next two only on routes with a `retry_policy`) |
//! | `tower::retry::Retry` with [`RetryPolicy`] | `retry_on` (HTTP/2 reasons from `h2::Error`), `num_retries`, jittered back-off, a retry budget |
//! | [`PerTryTimeout`] | `retry_policy.per_try_timeout` |
//! | [`ClusterService`](crate::cluster::ClusterService) | the cluster's endpoints, round robin, over the multi-connection HTTP/2 pool |
//!
//! A local route: [`Observe`], then [`Local`] (a tonic server). The engine
//! proxy: [`Observe`], then [`EngineDispatch`], which calls its [`Local`] server
//! or the forwarding stack of `passthrough_cluster`.
//!
//! Bodies stay concrete types down the stack (the request body is boxed once, for the pool;
//! the response body once, in [`Observe`]): a body is polled per frame, and a box per layer
//! cost 1 MiB calls 6% (docs/benchmarks.md).

mod body_start;
pub mod instances;
mod local;
mod observe;
mod retry;
mod slots;
mod upstream;
mod version;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http::request::Parts;
use http::Response;
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

pub use body_start::BodyStart;
pub use local::{EngineDispatch, Local, LocalBody};
pub use observe::{finish_local, Observe};
pub use retry::{PerTryTimeout, Replay, RetryPolicy};
pub use slots::{Slots, WithSlot};
pub use upstream::Upstream;
pub use version::VersionPatch;

use crate::address_map::AddressMap;
use crate::body::{GrpcRequestBody, Prefixed, RequestLog, Verdict};
use crate::cluster::{Cluster, ClusterService, H2Body};
use crate::config::{format_duration, PathMatch, RouteConfig};
use crate::engine_proxy::version::{VersionPatchBody, VERSION_GET_PATHS};
use crate::listener::Downstream;
use crate::metrics::Metrics;
use crate::reply::{BoxError, LocalReply, ProxyBody, RouteContext};

/// The request body on the route stack: checked frame by frame, with what a layer read ahead
/// (the first frame, the first message) yielded first.
pub type RequestBody = Prefixed<GrpcRequestBody<Incoming>>;

/// A route, built: one gRPC call in, its response (the upstream's, a local service's, or the
/// status the proxy answers) out. Shared by every connection of the listener: a call is
/// served by a clone of the stack (reference counts, no allocation) and costs one box, its
/// future.
pub type RouteService = Arc<dyn RouteHandler>;

/// A route's stack as the route table calls it, by shared reference.
pub trait RouteHandler: Send + Sync {
    fn serve(&self, request: RouteRequest) -> BoxFuture<'static, Response<ProxyBody>>;
}

/// A stack of tower layers as a [`RouteHandler`].
struct Shared<S>(S);

impl<S> RouteHandler for Shared<S>
where
    S: Service<RouteRequest, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    fn serve(&self, request: RouteRequest) -> BoxFuture<'static, Response<ProxyBody>> {
        // Observe, the outermost layer, is always ready: no poll_ready is needed.
        // Mapped, not awaited in an async block: that would hold the stack's future twice
        // (captured, and again while awaited) in every call's box.
        let served = self.0.clone().call(request);
        Box::pin(served.map(|result| match result {
            Ok(response) => response,
            Err(never) => match never {},
        }))
    }
}

/// The forwarding stack of `passthrough_cluster`, as the engine proxy's dispatch holds it.
pub type PassthroughService = BoxCloneSyncService<Call, Response<ProxyBody>, LocalReply>;

/// The response body of the forwarding stack: the upstream's, holding its cluster slot,
/// patched when it is a VersionGet answer on a route that can carry one, and mapped back when
/// it is an instance-manager's instance answer.
pub type ForwardBody = Either<instances::MappedBack<UpstreamBody>, UpstreamBody>;
type UpstreamBody = Either<VersionPatchBody<WithSlot<H2Body>>, WithSlot<H2Body>>;

/// What a route's service takes: the call, and what its metrics record at the end.
pub struct RouteRequest {
    pub call: Call,
    pub log: RequestLog,
}

/// One gRPC call as the route stack carries it.
pub struct Call<B = RequestBody> {
    pub parts: Parts,
    pub body: B,
    /// The downstream connection, whose share of a cluster's slots the call counts against.
    pub downstream: Arc<Downstream>,
    pub deadline: Option<CallDeadline>,
    /// Set when the checked body refuses the request; its status wins over the upstream's.
    pub verdict: Verdict,
}

/// When a call must be over, and the timeout it came from (for messages).
#[derive(Debug, Clone, Copy)]
pub struct CallDeadline {
    pub at: Instant,
    pub total: Duration,
}

impl<B> Call<B> {
    /// The body, and the rest of the call to put it (or what was read of it) back into.
    pub fn take_body(self) -> (B, Call<()>) {
        let Call {
            parts,
            body,
            downstream,
            deadline,
            verdict,
        } = self;
        let rest = Call {
            parts,
            body: (),
            downstream,
            deadline,
            verdict,
        };
        (body, rest)
    }
}

impl Call<()> {
    /// The call again, with `body`.
    pub fn with_body<B>(self, body: B) -> Call<B> {
        Call {
            parts: self.parts,
            body,
            downstream: self.downstream,
            deadline: self.deadline,
            verdict: self.verdict,
        }
    }
}

impl CallDeadline {
    /// The DEADLINE_EXCEEDED reply for this deadline.
    pub fn reply(&self, context: &RouteContext) -> LocalReply {
        LocalReply::new(
            tonic::Code::DeadlineExceeded,
            format!(
                "deadline of {} exceeded ({context})",
                format_duration(self.total)
            ),
        )
    }
}

/// What the layers that wait for a request body, or count a limit, need of the listener.
#[derive(Clone)]
pub struct ListenerInfo {
    pub name: Arc<str>,
    pub stream_idle_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

/// The forwarding stack of a `cluster:` route or of `passthrough_cluster`, below [`Observe`].
/// `map`: the address map, for the instance calls a route to an instance-manager carries.
pub fn forwarding(
    cluster: &Arc<Cluster>,
    route: &RouteConfig,
    context: &RouteContext,
    listener: &ListenerInfo,
    map: Option<&Arc<AddressMap>>,
) -> impl Service<Call, Response = Response<ForwardBody>, Error = LocalReply, Future: Send>
       + Clone
       + Send
       + Sync
       + 'static {
    let retry = RetryPolicy::new(
        route.retry_policy.as_ref(),
        cluster.name(),
        &listener.metrics,
    );
    let patch = carries_version_get(route);
    let paths: Vec<&str> = instances::METHODS.iter().map(|m| m.0).collect();
    let instance_map = map.filter(|_| carries(route, &paths)).cloned();
    let cluster_service = ClusterService::new(cluster.clone());
    // A route without a retry policy has no replay, retry or per-try timeout layers at all.
    let attempts = match retry.buffered_bytes() {
        Some(limit) => tower::util::Either::Left(
            ServiceBuilder::new()
                .layer_fn(|s| Replay::new(s, limit))
                .layer(tower::retry::RetryLayer::new(retry.clone()))
                .layer_fn(|s| PerTryTimeout::new(s, retry.per_try_timeout()))
                .service(cluster_service),
        ),
        None => tower::util::Either::Right(cluster_service),
    };
    ServiceBuilder::new()
        .layer_fn(|s| BodyStart::new(s, listener.clone(), context.clone(), false))
        .layer_fn(|s| instances::InstanceAddresses::new(s, instance_map.clone(), context.clone()))
        .layer_fn(|s| VersionPatch::new(s, patch))
        .layer_fn(|s| {
            Slots::new(
                s,
                cluster.clone(),
                listener.metrics.clone(),
                context.clone(),
            )
        })
        .layer_fn(|s| Upstream::new(s, context.clone()))
        .service(attempts)
}

/// [`forwarding`] for the engine proxy's dispatch (a rare path: its body is boxed here).
pub fn passthrough(
    cluster: &Arc<Cluster>,
    route: &RouteConfig,
    context: &RouteContext,
    listener: &ListenerInfo,
) -> PassthroughService {
    let stack = forwarding(cluster, route, context, listener, None);
    BoxCloneSyncService::new(
        stack.map_response(|r: Response<ForwardBody>| r.map(|b| b.boxed_unsync())),
    )
}

/// A route's whole stack: [`Observe`] over `inner`, boxed once.
pub fn route<S, B>(inner: S, context: &RouteContext) -> RouteService
where
    S: Service<Call, Response = Response<B>, Error = LocalReply> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    Arc::new(Shared(Observe::new(inner, context.clone())))
}

/// Whether a route's path match can select an instance-manager `VersionGet` (whose answer
/// the [`VersionPatch`] layer completes).
fn carries_version_get(route: &RouteConfig) -> bool {
    carries(route, &VERSION_GET_PATHS)
}

/// Whether a route's path match can select one of `paths`.
fn carries(route: &RouteConfig, paths: &[&str]) -> bool {
    match &route.matcher.path {
        PathMatch::Path(p) => paths.contains(&p.as_str()),
        PathMatch::Prefix(p) => paths.iter().any(|v| v.starts_with(p.as_str())),
        PathMatch::SafeRegex(re) => paths.iter().any(|v| re.is_match(v)),
    }
}

/// The reply when reading the request body failed: the checked body's own verdict when it
/// refused the body, else CANCELLED with the cause.
pub fn body_failed(verdict: &Verdict, e: &BoxError, context: &RouteContext) -> LocalReply {
    verdict.get().cloned().unwrap_or_else(|| {
        LocalReply::new(
            tonic::Code::Cancelled,
            format!("reading the request body failed: {e} ({context})"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_routes_that_can_carry_version_get_get_the_patch() {
        let config = crate::config::Config::parse(
            r#"
listeners:
  - name: l
    address: 127.0.0.1:0
    routes:
      - { match: { path: /ProcessManagerService/VersionGet }, local: health }
      - { match: { prefix: /ProcessManagerService/ }, local: health }
      - { match: { prefix: / }, local: health }
      - { match: { safe_regex: "^/Process[A-Za-z]+/Version.*" }, local: health }
      - { match: { prefix: /ProcessManagerService/Process }, local: health }
      - { match: { path: /ProcessManagerService/ProcessGet }, local: health }
      - { match: { safe_regex: "^/lhnet\\..*" }, local: health }
      - { match: { prefix: /imrpc.InstanceService/ }, local: health }
      - { match: { path: /imrpc.InstanceService/VersionGet }, local: health }
      - { match: { prefix: /imrpc.ProxyEngineService/ }, local: health }
"#,
            "t",
        )
        .unwrap();
        let carries: Vec<bool> = config.listeners[0]
            .routes
            .iter()
            .map(carries_version_get)
            .collect();
        assert_eq!(
            carries,
            [true, true, true, true, false, false, false, true, true, false]
        );
    }
}
