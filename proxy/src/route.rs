//! The router: matches each gRPC request to a route (first match wins) and carries it out,
//! forwarding to a cluster or calling a local service, under the route's deadline and retries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use http::request::Parts;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tonic::Code;

use crate::body::{
    buffer_up_to, read_first_message, Buffered, GrpcRequestBody, ObservedBody, Prefixed,
    RequestLog, Verdict,
};
use crate::cluster::{Cluster, ClusterSlot, SlotLimit, UpstreamError};
use crate::config::{
    format_duration, HeaderMatcher, HeaderRule, Http2Options, ListenerConfig, ListenerLimits,
    LocalService, PathMatch, RetryOn, RetryPolicy, RouteAction, RouteConfig,
};
use crate::engine_proxy::dispatch::{self, Decision};
use crate::engine_proxy::version::{VersionPatchBody, VERSION_GET_PATH};
use crate::engine_proxy::{BackupTargets, EngineProxy};
use crate::health::HealthService;
use crate::listener::Downstream;
use crate::metrics::Metrics;
use crate::reply::{
    grpc_status, names, quote_short, undecodable_to_invalid_argument, BoxError, LocalReply,
    ProxyBody, RouteContext,
};
use lhnet_proto::imrpc::proxy_engine_service_server::ProxyEngineServiceServer;

use crate::address_map::{AddressMap, MappedEngineProxy};
use crate::peer::PeerService;

/// One listener's routes, built from config; replaced whole on reload.
pub struct RouteTable {
    listener: Arc<str>,
    max_message_size: usize,
    /// The listener's limits and HTTP/2 settings in this config (new connections take them).
    pub limits: ListenerLimits,
    pub http2: Http2Options,
    routes: Vec<Route>,
    metrics: Arc<Metrics>,
    locals: LocalServices,
}

struct Route {
    name: Arc<str>,
    context: RouteContext,
    config: RouteConfig,
    target: Target,
}

enum Target {
    Cluster(Arc<Cluster>),
    Health,
    EngineProxy(EngineProxyRoute),
    Peer,
}

/// `local: longhorn_engine_proxy`: lhnet's service, and where what it does not serve goes.
struct EngineProxyRoute {
    server: ProxyEngineServiceServer<MappedEngineProxy>,
    passthrough: Option<Arc<Cluster>>,
}

/// How a request was answered, before the response is observed on its way down.
enum Served {
    Local(Response<ProxyBody>),
    Upstream(Response<Incoming>, ClusterSlot),
    Reply(LocalReply),
}

/// The tonic services answered inside the proxy.
#[derive(Clone)]
pub struct LocalServices {
    pub health: lhnet_proto::health::health_server::HealthServer<HealthService>,
    pub peer: lhnet_proto::peer::peer_server::PeerServer<PeerService>,
    pub address_map: Arc<AddressMap>,
    pub backup_targets: Arc<BackupTargets>,
}

/// The cluster `local: longhorn_engine_proxy` dials through unless the route names another.
pub const DEFAULT_ENGINE_CLUSTER: &str = "engines";

/// The request body as it travels up: checked frame by frame.
type CheckedBody = GrpcRequestBody<Incoming>;

// === impl RouteTable ===

impl RouteTable {
    /// Builds the table; every `cluster:` route must name a cluster in `clusters` (config
    /// validation guarantees it, and a missing one is skipped with an error log).
    pub fn new(
        listener: &ListenerConfig,
        clusters: &HashMap<String, Arc<Cluster>>,
        locals: LocalServices,
        metrics: Arc<Metrics>,
    ) -> RouteTable {
        let routes = listener
            .routes
            .iter()
            .filter_map(|r| {
                let target = match &r.action {
                    RouteAction::Local(LocalService::Health) => Target::Health,
                    RouteAction::Local(LocalService::Peer) => Target::Peer,
                    RouteAction::Local(LocalService::LonghornEngineProxy) => {
                        let name = r.upstream_cluster.as_deref().unwrap_or(DEFAULT_ENGINE_CLUSTER);
                        let passthrough = r.passthrough_cluster.as_ref().and_then(|p| {
                            let found = clusters.get(p).cloned();
                            if found.is_none() {
                                tracing::error!(route = %r.name, cluster = %p, "passthrough_cluster names an unknown cluster; calls lhnet does not serve are refused");
                            }
                            found
                        });
                        match clusters.get(name) {
                            Some(c) => Target::EngineProxy(EngineProxyRoute {
                                server: MappedEngineProxy::server(
                                    EngineProxy::new(c.clone(), locals.backup_targets.clone()),
                                    locals.address_map.clone(),
                                )
                                .max_decoding_message_size(listener.max_message_size)
                                .max_encoding_message_size(usize::MAX),
                                passthrough,
                            }),
                            None => {
                                tracing::error!(route = %r.name, cluster = %name, "engine proxy route names an unknown cluster; skipped");
                                return None;
                            }
                        }
                    }
                    RouteAction::Cluster(name) => match clusters.get(name) {
                        Some(c) => Target::Cluster(c.clone()),
                        None => {
                            tracing::error!(route = %r.name, cluster = %name, "route names an unknown cluster; skipped");
                            return None;
                        }
                    },
                };
                let name: Arc<str> = r.name.as_str().into();
                let target_text = match &target {
                    Target::Cluster(c) => format!("cluster {}", c.name()),
                    Target::Health => "local health".to_string(),
                    Target::Peer => "local peer".to_string(),
                    Target::EngineProxy(e) => format!(
                        "local longhorn_engine_proxy (cluster {}{})",
                        r.upstream_cluster.as_deref().unwrap_or(DEFAULT_ENGINE_CLUSTER),
                        e.passthrough
                            .as_ref()
                            .map(|c| format!(", passthrough {}", c.name()))
                            .unwrap_or_default()
                    ),
                };
                Some(Route {
                    context: RouteContext {
                        listener: listener.name.as_str().into(),
                        route: name.clone(),
                        target: target_text.into(),
                    },
                    name,
                    config: r.clone(),
                    target,
                })
            })
            .collect();
        RouteTable {
            listener: listener.name.as_str().into(),
            max_message_size: listener.max_message_size,
            limits: listener.limits.clone(),
            http2: listener.http2.clone(),
            routes,
            metrics,
            locals,
        }
    }

    fn select<B>(&self, request: &Request<B>) -> Option<&Route> {
        let path = request.uri().path();
        self.routes.iter().find(|r| {
            let path_ok = match &r.config.matcher.path {
                PathMatch::Path(p) => path == p,
                PathMatch::Prefix(p) => path.starts_with(p.as_str()),
                PathMatch::SafeRegex(re) => re.is_match(path),
            };
            path_ok
                && r.config
                    .matcher
                    .headers
                    .iter()
                    .all(|h| header_matches(h, request.headers()))
        })
    }

    /// Handles one request from a downstream client; never fails (errors are gRPC replies).
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        downstream: &Arc<Downstream>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        // A cheap clone (shared bytes), kept for the metrics at the end of the stream.
        let path = request.uri().clone();
        let Some(route) = self.select(&request) else {
            let reply = LocalReply::new(
                Code::Unimplemented,
                format!("no route for {} on listener {}", path.path(), self.listener),
            );
            self.metrics.record_request(
                &self.listener,
                "none",
                path.path(),
                reply.code as i32,
                0.0,
            );
            return reply.into_response();
        };
        let log = RequestLog {
            metrics: self.metrics.clone(),
            listener: self.listener.clone(),
            route: route.name.clone(),
            path,
            started,
        };
        let context = route.context.clone();

        let is_grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        if !is_grpc {
            let reply = LocalReply::new(
                Code::InvalidArgument,
                format!("request is not gRPC (content-type must be application/grpc) ({context})"),
            );
            return finish_local(reply, log);
        }

        let deadline = match effective_deadline(&route.config, request.headers()) {
            Ok(d) => d,
            Err(bad) => {
                let reply = LocalReply::new(
                    Code::InvalidArgument,
                    format!(
                        "header grpc-timeout {bad} is not a gRPC timeout (1 to 8 digits and one of H M S m u n) ({context})"
                    ),
                );
                return finish_local(reply, log);
            }
        };
        let deadline_at = deadline.map(|d| started + d);
        let verdict = Verdict::default();
        let compressed_ok = request.headers().contains_key(names::GRPC_ENCODING);
        let (parts, body) = request.into_parts();
        let body =
            GrpcRequestBody::new(body, self.max_message_size, compressed_ok, verdict.clone());
        let deadline_reply = |waited: Duration| {
            LocalReply::new(
                Code::DeadlineExceeded,
                format!(
                    "deadline of {} exceeded ({context})",
                    format_duration(waited)
                ),
            )
        };

        let work = async {
            match &route.target {
                Target::Health => Served::Local(
                    call_service(self.locals.health.clone(), Request::from_parts(parts, body))
                        .await,
                ),
                Target::Peer => Served::Local(
                    call_service(self.locals.peer.clone(), Request::from_parts(parts, body)).await,
                ),
                Target::EngineProxy(engine) => {
                    let call = (route, deadline, &verdict, &context, downstream);
                    self.engine_proxy(engine, call, parts, body).await
                }
                Target::Cluster(cluster) => match self
                    .body_started(Prefixed::new(body), parts.uri.path(), (&verdict, &context))
                    .await
                {
                    Ok(body) => self
                        .forward(
                            cluster,
                            &route.config,
                            parts,
                            body.boxed_unsync(),
                            (deadline, &verdict, &context, downstream),
                        )
                        .await
                        .map_or_else(Served::Reply, |(r, p)| Served::Upstream(r, p)),
                    Err(reply) => Served::Reply(reply),
                },
            }
        };
        let served = match deadline_at {
            Some(at) => match tokio::time::timeout_at(at, work).await {
                Ok(s) => s,
                Err(_) => return finish_local(deadline_reply(deadline.unwrap_or_default()), log),
            },
            None => work.await,
        };
        let deadline = deadline_at.map(|at| (at, deadline_reply(deadline.unwrap_or_default())));
        match served {
            Served::Local(response) => finish(response, &verdict, deadline, context, log, None),
            Served::Upstream(response, permit) if log.path.path() == VERSION_GET_PATH => finish(
                response.map(VersionPatchBody::new),
                &verdict,
                deadline,
                context,
                log,
                Some(permit),
            ),
            Served::Upstream(response, permit) => {
                finish(response, &verdict, deadline, context, log, Some(permit))
            }
            Served::Reply(reply) => finish_local(reply, log),
        }
    }

    /// `local: longhorn_engine_proxy`: lhnet answers what it serves; the rest goes byte for
    /// byte to the passthrough cluster (the instance-manager's own proxy), or is UNIMPLEMENTED
    /// naming the key that would forward it ([`dispatch`]).
    async fn engine_proxy(
        &self,
        engine: &EngineProxyRoute,
        (route, deadline, verdict, context, downstream): (
            &Route,
            Option<Duration>,
            &Verdict,
            &RouteContext,
            &Arc<Downstream>,
        ),
        parts: Parts,
        body: CheckedBody,
    ) -> Served {
        // A clone of the URI (reference-counted) to name the method after `parts` moves on.
        let uri = parts.uri.clone();
        let method = uri.path().rsplit('/').next().unwrap_or("");
        // One concrete body type on every path, so the local call needs no boxing.
        let (decision, body): (Decision, Prefixed<CheckedBody>) = match dispatch::route_of(method) {
            dispatch::Route::Local => {
                // Every ProxyEngineService call is unary (no method lookup needed): its body
                // must start within stream_idle_timeout, so header-only streams do not pile up
                // here either.
                match self
                    .await_body(Prefixed::new(body), (verdict, context))
                    .await
                {
                    Ok(body) => (Decision::Local, body),
                    Err(reply) => return Served::Reply(reply),
                }
            }
            dispatch::Route::Passthrough(why) => {
                (Decision::Passthrough(why.into()), Prefixed::new(body))
            }
            dispatch::Route::ByDataEngine(shape) => {
                // Decided from the first message as soon as it is whole (the checked body
                // bounds it by max_message_size); its bytes travel on unchanged either way.
                let first = read_first_message(body);
                let Ok(read) = tokio::time::timeout(self.limits.stream_idle_timeout, first).await
                else {
                    return Served::Reply(self.body_timeout(context));
                };
                match read {
                    Ok((message, body)) => {
                        let decision = match message {
                            Some(message) => dispatch::decide(method, shape, &message),
                            None => Decision::Local,
                        };
                        (decision, body)
                    }
                    Err(e) => return Served::Reply(body_failed(verdict, &e, context)),
                }
            }
        };
        match decision {
            Decision::Local => Served::Local(
                call_service(engine.server.clone(), Request::from_parts(parts, body)).await,
            ),
            Decision::Refuse(status) => Served::Reply(LocalReply::new(
                status.code(),
                status.message().to_string(),
            )),
            Decision::Passthrough(why) => match &engine.passthrough {
                Some(cluster) => {
                    tracing::debug!(%method, reason = %why, cluster = %cluster.name(), "passing through to the instance-manager's proxy");
                    // Boxed: the rare path, and forward's future is kilobytes that would
                    // otherwise sit in every served call's future.
                    Box::pin(async move {
                        let body = self
                            .body_started(body, uri.path(), (verdict, context))
                            .await?;
                        self.forward(
                            cluster,
                            &route.config,
                            parts,
                            body.boxed_unsync(),
                            (deadline, verdict, context, downstream),
                        )
                        .await
                    })
                    .await
                    .map_or_else(Served::Reply, |(r, p)| Served::Upstream(r, p))
                }
                None => Served::Reply(LocalReply::new(
                    Code::Unimplemented,
                    format!(
                        "imrpc.ProxyEngineService/{method} is not served by lhnet ({why}); set passthrough_cluster on this route to forward it to the instance-manager's own proxy (127.0.0.1:8501) ({context})"
                    ),
                )),
            },
        }
    }

    /// Sends the request to the cluster, retrying as the route's policy allows. Headers pass
    /// as they are: HTTP/2 forbids connection-specific headers (RFC 9113 §8.2.2) and h2 refuses
    /// them on receipt, so there is nothing hop-by-hop to strip.
    async fn forward(
        &self,
        cluster: &Arc<Cluster>,
        route: &RouteConfig,
        mut parts: Parts,
        body: ProxyBody,
        (deadline, verdict, context, downstream): (
            Option<Duration>,
            &Verdict,
            &RouteContext,
            &Arc<Downstream>,
        ),
    ) -> Result<(Response<Incoming>, ClusterSlot), LocalReply> {
        let permit = cluster.try_acquire(downstream).map_err(|limit| {
            let c = &cluster.config;
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
            self.metrics.limit_reached(&c.name, limit.key(), || text.clone());
            LocalReply::new(Code::ResourceExhausted, text)
        })?;
        // The client's grpc-timeout never travels as sent: lhnet re-encodes the deadline it
        // enforces, so a value only some servers accept cannot reach a shared connection.
        parts.headers.remove(names::GRPC_TIMEOUT);
        if let Some(d) = deadline {
            if let Ok(v) = HeaderValue::from_str(&encode_grpc_timeout(d)) {
                parts.headers.insert(names::GRPC_TIMEOUT, v);
            }
        }
        let upstream_reply = |e: UpstreamError| {
            verdict
                .get()
                .cloned()
                .unwrap_or_else(|| LocalReply::new(Code::Unavailable, format!("{e} ({context})")))
        };

        let policy = match &route.retry_policy {
            Some(p) if p.num_retries > 0 => p,
            _ => {
                let destination = self.destination(cluster, context)?;
                let request = Request::from_parts(parts, body);
                return cluster
                    .send(destination, request)
                    .await
                    .map(|r| (r, permit))
                    .map_err(upstream_reply);
            }
        };

        let replayable = match buffer_up_to(body, policy.max_buffered_bytes).await {
            Ok(Buffered::Complete(r)) => r,
            Ok(Buffered::Partial(rest)) => {
                // Too large to replay: one attempt, streamed.
                let destination = self.destination(cluster, context)?;
                let request = Request::from_parts(parts, rest.boxed_unsync());
                return cluster
                    .send(destination, request)
                    .await
                    .map(|r| (r, permit))
                    .map_err(upstream_reply);
            }
            Err(e) => return Err(body_failed(verdict, &e, context)),
        };

        let mut attempt = 0u32;
        loop {
            let destination = self.destination(cluster, context)?;
            let request = rebuild(&parts, replayable.replay().boxed_unsync());
            let sent = cluster.send(destination, request);
            let outcome = match policy.per_try_timeout {
                Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| t),
                None => Ok(sent.await),
            };
            let retry_reason = match &outcome {
                Err(t) => Some(format!("per_try_timeout {} expired", format_duration(*t))),
                Ok(Err(e)) if retryable_error(policy, e) => Some(e.to_string()),
                Ok(Ok(response)) => grpc_status(response.headers())
                    .filter(|code| retryable_code(policy, *code))
                    .map(|code| format!("upstream answered grpc-status {code}")),
                Ok(Err(_)) => None,
            };
            if retry_reason.is_none() || attempt >= policy.num_retries {
                return match outcome {
                    Ok(Ok(response)) => Ok((response, permit)),
                    Ok(Err(e)) => Err(upstream_reply(e)),
                    Err(t) => Err(LocalReply::new(
                        Code::DeadlineExceeded,
                        format!(
                            "per_try_timeout {} expired on every attempt ({context})",
                            format_duration(t)
                        ),
                    )),
                };
            }
            attempt += 1;
            tracing::debug!(attempt, reason = retry_reason.as_deref().unwrap_or(""), %context, "retrying");
            // Envoy's default back-off: 25 ms base, doubling.
            tokio::time::sleep(Duration::from_millis(25u64 << attempt.min(3))).await;
        }
    }

    fn destination(
        &self,
        cluster: &Cluster,
        context: &RouteContext,
    ) -> Result<SocketAddr, LocalReply> {
        cluster.pick_endpoint().ok_or_else(|| {
            LocalReply::new(
                Code::Unavailable,
                format!("cluster {} has no endpoints ({context})", cluster.name()),
            )
        })
    }
}

impl RouteTable {
    /// For a method whose client sends one message (unary, server-streaming: a real client
    /// sends it with the headers), waits up to the listener's `stream_idle_timeout` until the
    /// request body has started (a frame is read ahead, or the body has ended): a stream that
    /// sends headers and nothing more then takes no cluster slot and sends nothing upstream.
    /// Client-streaming and unknown methods go at once: their client may wait for the server's
    /// headers first (tonic's does); the per-connection share of slots bounds those.
    async fn body_started<B>(
        &self,
        body: Prefixed<B>,
        path: &str,
        (verdict, context): (&Verdict, &RouteContext),
    ) -> Result<Prefixed<B>, LocalReply>
    where
        B: Body<Data = bytes::Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if !self.metrics.client_sends_one_message(path) {
            return Ok(body);
        }
        self.await_body(body, (verdict, context)).await
    }

    /// Waits up to `stream_idle_timeout` for the body to start (see [`Self::body_started`]),
    /// for a call known to be unary.
    async fn await_body<B>(
        &self,
        body: Prefixed<B>,
        (verdict, context): (&Verdict, &RouteContext),
    ) -> Result<Prefixed<B>, LocalReply>
    where
        B: Body<Data = bytes::Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let wait = self.limits.stream_idle_timeout;
        match tokio::time::timeout(wait, body.started()).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(e)) => Err(body_failed(verdict, &e, context)),
            Err(_) => Err(self.body_timeout(context)),
        }
    }

    /// The reply (and the count) when a request's body did not come within
    /// `stream_idle_timeout`.
    fn body_timeout(&self, context: &RouteContext) -> LocalReply {
        let text = format!(
            "the request body did not start within stream_idle_timeout {}; a unary call sends its message with its headers ({context})",
            format_duration(self.limits.stream_idle_timeout)
        );
        self.metrics
            .limit_reached(&self.listener, "stream_idle_timeout", || text.clone());
        LocalReply::new(Code::DeadlineExceeded, text)
    }
}

/// The reply when reading the request body failed: the checked body's own verdict when it
/// refused the body, else CANCELLED with the cause.
fn body_failed(verdict: &Verdict, e: &BoxError, context: &RouteContext) -> LocalReply {
    verdict.get().cloned().unwrap_or_else(|| {
        LocalReply::new(
            Code::Cancelled,
            format!("reading the request body failed: {e} ({context})"),
        )
    })
}

/// Calls a tonic service of the proxy's own with the request as it streams in.
async fn call_service<S, B>(mut service: S, request: Request<B>) -> Response<ProxyBody>
where
    S: tonic::codegen::Service<
        Request<B>,
        Response = Response<tonic::body::Body>,
        Error = std::convert::Infallible,
    >,
{
    match service.call(request).await {
        Ok(response) => response.map(|b| b.map_err(BoxError::from).boxed_unsync()),
        Err(never) => match never {},
    }
}

/// Completes a local reply: records it and returns it.
fn finish_local(reply: LocalReply, log: RequestLog) -> Response<ProxyBody> {
    log.finish(reply.code as i32);
    reply.into_response()
}

/// Turns an upstream (or local service) response into the downstream one.
fn finish<B>(
    response: Response<B>,
    verdict: &Verdict,
    deadline: Option<(Instant, LocalReply)>,
    context: RouteContext,
    log: RequestLog,
    permit: Option<ClusterSlot>,
) -> Response<ProxyBody>
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    // The proxy rejected the request body: its status wins over the upstream's reaction.
    if let Some(reply) = verdict.get() {
        return finish_local(reply.clone(), log);
    }
    // A local service's response has no cluster permit; an upstream's always has one.
    let local = permit.is_none();
    let mut response = response;
    if local {
        undecodable_to_invalid_argument(response.headers_mut());
    }
    if let Some(code) = grpc_status(response.headers()) {
        // Trailers-Only: the status is in the headers and the stream has ended.
        log.finish(code);
        return response.map(|b| b.map_err(|e| BoxError::from(e.to_string())).boxed_unsync());
    }
    let (parts, body) = response.into_parts();
    let body = ObservedBody::new(body, deadline, verdict.clone(), context, log, permit, local);
    Response::from_parts(parts, body.boxed_unsync())
}

/// Copies what an upstream request needs from the downstream parts.
fn rebuild(parts: &Parts, body: ProxyBody) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request
}

fn retryable_error(policy: &RetryPolicy, e: &UpstreamError) -> bool {
    let token = match e {
        UpstreamError::Connect { .. } => RetryOn::ConnectFailure,
        UpstreamError::Refused { .. } => RetryOn::RefusedStream,
        UpstreamError::Reset { .. } => RetryOn::Reset,
    };
    policy.retry_on.contains(&token)
}

fn retryable_code(policy: &RetryPolicy, code: i32) -> bool {
    let token = match code {
        1 => RetryOn::Cancelled,
        4 => RetryOn::DeadlineExceeded,
        8 => RetryOn::ResourceExhausted,
        13 => RetryOn::Internal,
        14 => RetryOn::Unavailable,
        _ => return false,
    };
    policy.retry_on.contains(&token)
}

fn header_matches(m: &HeaderMatcher, headers: &HeaderMap) -> bool {
    let value = headers.get(&m.name).and_then(|v| v.to_str().ok());
    let hit = match (&m.rule, value) {
        (HeaderRule::Present(want), v) => v.is_some() == *want,
        (_, None) => false,
        (HeaderRule::Exact(s), Some(v)) => v == s,
        (HeaderRule::Prefix(s), Some(v)) => v.starts_with(s.as_str()),
        (HeaderRule::SafeRegex(re), Some(v)) => re.is_match(v),
    };
    hit != m.invert_match
}

/// The route `timeout` and the client's `grpc-timeout` (capped by
/// `max_stream_duration.grpc_timeout_header_max`), whichever is shorter; a `grpc-timeout`
/// that is not one is an error carrying the value, quoted and shortened for a reply.
fn effective_deadline(
    route: &RouteConfig,
    headers: &HeaderMap,
) -> Result<Option<Duration>, String> {
    let from_header = match headers.get(names::GRPC_TIMEOUT) {
        None => None,
        Some(v) => {
            let parsed = v.to_str().ok().and_then(parse_grpc_timeout);
            let d = parsed.ok_or_else(|| quote_short(&String::from_utf8_lossy(v.as_bytes())))?;
            Some(match route.grpc_timeout_header_max {
                Some(max) => d.min(max),
                None => d,
            })
        }
    };
    Ok(match (route.timeout, from_header) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// gRPC's `grpc-timeout`: 1 to 8 ASCII digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // ASCII first: the unit is split off by bytes (found by fuzz/run addresses: "ӆ" panicked).
    if !value.is_ascii() || value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-timeout` text for a duration: the finest unit that fits in 8 digits, rounded up.
pub fn encode_grpc_timeout(d: Duration) -> String {
    let nanos = d.as_nanos();
    for (unit, per) in [
        ("n", 1u128),
        ("u", 1_000),
        ("m", 1_000_000),
        ("S", 1_000_000_000),
        ("M", 60_000_000_000),
        ("H", 3_600_000_000_000),
    ] {
        let value = nanos.div_ceil(per);
        if value < 100_000_000 {
            return format!("{value}{unit}");
        }
    }
    "99999999H".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_round_trip() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("-5S"), None);
        assert_eq!(parse_grpc_timeout("+5S"), None);
        assert_eq!(parse_grpc_timeout(" 5S"), None);
        assert_eq!(parse_grpc_timeout("ӆ"), None);
        assert_eq!(parse_grpc_timeout("5ӆ"), None);
        assert_eq!(encode_grpc_timeout(Duration::from_millis(1500)), "1500000u");
        assert_eq!(
            encode_grpc_timeout(Duration::from_secs(3600 * 24)),
            "86400000m"
        );
        assert_eq!(
            encode_grpc_timeout(Duration::from_secs(3600 * 24 * 30)),
            "2592000S"
        );
        assert_eq!(
            encode_grpc_timeout(Duration::from_secs(3600 * 24 * 365 * 10)),
            "5256000M"
        );
        for d in [
            Duration::from_nanos(5),
            Duration::from_millis(250),
            Duration::from_secs(86400 * 3),
        ] {
            let back = parse_grpc_timeout(&encode_grpc_timeout(d)).unwrap();
            assert!(
                back >= d && back - d < Duration::from_secs(60),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn deadline_is_the_shortest_and_capped() {
        let config = crate::config::Config::parse(
            r#"
listeners:
  - name: l
    address: 127.0.0.1:0
    routes:
      - match: { prefix: / }
        local: health
        timeout: 5s
        max_stream_duration: { grpc_timeout_header_max: 2s }
"#,
            "t",
        )
        .unwrap();
        let route = &config.listeners[0].routes[0];
        let mut h = HeaderMap::new();
        assert_eq!(
            effective_deadline(route, &h),
            Ok(Some(Duration::from_secs(5)))
        );
        h.insert("grpc-timeout", HeaderValue::from_static("10S"));
        assert_eq!(
            effective_deadline(route, &h),
            Ok(Some(Duration::from_secs(2)))
        );
        h.insert("grpc-timeout", HeaderValue::from_static("300m"));
        assert_eq!(
            effective_deadline(route, &h),
            Ok(Some(Duration::from_millis(300)))
        );
        h.insert("grpc-timeout", HeaderValue::from_static("-5S"));
        assert_eq!(effective_deadline(route, &h), Err("\"-5S\"".to_string()));
        let long = "9".repeat(10_000);
        h.insert("grpc-timeout", HeaderValue::from_str(&long).unwrap());
        let quoted = effective_deadline(route, &h).unwrap_err();
        assert!(
            quoted.len() < 64 && quoted.contains("10000 bytes"),
            "{quoted}"
        );
    }

    #[test]
    fn header_rules() {
        let m = |rule, invert| HeaderMatcher {
            name: http::header::HeaderName::from_static("x-replica"),
            rule,
            invert_match: invert,
        };
        let mut h = HeaderMap::new();
        h.insert("x-replica", HeaderValue::from_static("r-1"));
        assert!(header_matches(
            &m(HeaderRule::Exact("r-1".into()), false),
            &h
        ));
        assert!(!header_matches(
            &m(HeaderRule::Exact("r-1".into()), true),
            &h
        ));
        assert!(header_matches(
            &m(HeaderRule::Prefix("r-".into()), false),
            &h
        ));
        assert!(header_matches(
            &m(
                HeaderRule::SafeRegex(regex::Regex::new("^r-[0-9]$").unwrap()),
                false
            ),
            &h
        ));
        assert!(header_matches(&m(HeaderRule::Present(true), false), &h));
        assert!(header_matches(
            &m(HeaderRule::Present(false), false),
            &HeaderMap::new()
        ));
        assert!(!header_matches(
            &m(HeaderRule::Exact("r-1".into()), false),
            &HeaderMap::new()
        ));
    }
}
