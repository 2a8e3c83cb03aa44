//! The router: matches each gRPC request to a route (first match wins) and calls the route's
//! service, built once from config as a stack of tower layers ([`crate::stack`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tonic::Code;

use crate::body::{GrpcRequestBody, Prefixed, RequestLog, Verdict};
use crate::cluster::Cluster;
use crate::config::{
    HeaderMatcher, HeaderRule, Http2Options, ListenerConfig, ListenerLimits, LocalService,
    PathMatch, RouteAction, RouteConfig,
};
use crate::engine_proxy::raw::RawCalls;
use crate::engine_proxy::{BackupTargets, EngineProxy};
use crate::health::HealthService;
use crate::listener::Downstream;
use crate::metrics::{Metrics, RouteMetrics};
use crate::reply::{names, quote_short, LocalReply, ProxyBody, RouteContext};
use crate::stack::{
    self, finish_local, Call, CallDeadline, EngineDispatch, ListenerInfo, Local, RouteRequest,
    RouteService,
};

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
}

struct Route {
    context: RouteContext,
    /// Its request metrics, resolved once.
    metrics: RouteMetrics,
    config: RouteConfig,
    service: RouteService,
}

/// The tonic services answered inside the proxy.
#[derive(Clone)]
pub struct LocalServices {
    pub health: lhnet_proto::health::health_server::HealthServer<HealthService>,
    pub peer: lhnet_proto::peer::peer_server::PeerServer<PeerService>,
    pub address_map: Arc<AddressMap>,
    pub backup_targets: Arc<BackupTargets>,
    /// The `kind: http_connect` listeners and where they listen (`backup_egress` of engine
    /// proxy routes names one).
    pub egress: Arc<HashMap<String, SocketAddr>>,
}

/// The cluster `local: longhorn_engine_proxy` dials through unless the route names another.
pub const DEFAULT_ENGINE_CLUSTER: &str = "engines";

// === impl RouteTable ===

impl RouteTable {
    /// Builds the table, each route into its service; every `cluster:` route must name a
    /// cluster in `clusters` (config validation guarantees it, and a missing one is skipped
    /// with an error log).
    pub fn new(
        listener: &ListenerConfig,
        clusters: &HashMap<String, Arc<Cluster>>,
        locals: LocalServices,
        metrics: Arc<Metrics>,
    ) -> RouteTable {
        let info = ListenerInfo {
            name: listener.name.as_str().into(),
            stream_idle_timeout: listener.limits.stream_idle_timeout,
            metrics: metrics.clone(),
        };
        let routes = listener
            .routes
            .iter()
            .filter_map(|r| build_route(r, listener, clusters, &locals, &info))
            .collect();
        RouteTable {
            listener: listener.name.as_str().into(),
            max_message_size: listener.max_message_size,
            limits: listener.limits.clone(),
            http2: listener.http2.clone(),
            routes,
            metrics,
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
    /// A plain function: what it decides before the route's stack takes the call is decided
    /// here, and the future it returns holds only that stack's (boxed) future, not the request
    /// too (bench-footprint: memory per open call).
    pub fn handle(&self, request: Request<Incoming>, downstream: &Arc<Downstream>) -> Handled {
        let started = Instant::now();
        let Some(route) = self.select(&request) else {
            let path = request.uri().path();
            let reply = LocalReply::new(
                Code::Unimplemented,
                format!("no route for {path} on listener {}", self.listener),
            );
            self.metrics
                .record_request(&self.listener, "none", path, reply.code as i32, 0.0);
            return Box::pin(std::future::ready(reply.into_response()));
        };
        let log = RequestLog {
            route: route.metrics.clone(),
            method: self.metrics.grpc_labels(request.uri().path()),
            started,
        };
        let context = &route.context;

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
            return Box::pin(std::future::ready(finish_local(reply, log)));
        }

        let deadline = match effective_deadline(&route.config, request.headers()) {
            Ok(d) => d.map(|total| CallDeadline {
                at: started + total,
                total,
            }),
            Err(bad) => {
                let reply = LocalReply::new(Code::InvalidArgument, format!("{bad} ({context})"));
                return Box::pin(std::future::ready(finish_local(reply, log)));
            }
        };
        let verdict = Verdict::default();
        let compressed_ok = request.headers().contains_key(names::GRPC_ENCODING);
        let (parts, body) = request.into_parts();
        let body =
            GrpcRequestBody::new(body, self.max_message_size, compressed_ok, verdict.clone());
        let call = Call {
            parts,
            body: Prefixed::new(body),
            downstream: downstream.clone(),
            deadline,
            verdict,
        };
        route.service.serve(RouteRequest { call, log })
    }
}

/// What [`RouteTable::handle`] returns: the route's stack at work, or the answer at once
/// (boxed too: a response kept inline would make every open call's future the larger).
pub type Handled = BoxFuture<'static, Response<ProxyBody>>;

/// Builds one route's service; `None` (logged) when it names a cluster that does not exist.
fn build_route(
    r: &RouteConfig,
    listener: &ListenerConfig,
    clusters: &HashMap<String, Arc<Cluster>>,
    locals: &LocalServices,
    info: &ListenerInfo,
) -> Option<Route> {
    let name: Arc<str> = r.name.as_str().into();
    let context = |target: String| RouteContext::new(&listener.name, name.clone(), &target);
    let cluster = |wanted: &str, what: &str| {
        let found = clusters.get(wanted).cloned();
        if found.is_none() {
            tracing::error!(route = %r.name, cluster = %wanted, "{what}");
        }
        found
    };
    let (context, service) = match &r.action {
        RouteAction::Local(LocalService::Health) => {
            let context = context("local health".into());
            let service = stack::route(Local::new(locals.health.clone()), &context);
            (context, service)
        }
        RouteAction::Local(LocalService::Peer) => {
            let context = context("local peer".into());
            let service = stack::route(Local::new(locals.peer.clone()), &context);
            (context, service)
        }
        RouteAction::Local(LocalService::LonghornEngineProxy) => {
            let engines_name = r
                .upstream_cluster
                .as_deref()
                .unwrap_or(DEFAULT_ENGINE_CLUSTER);
            let engines = cluster(
                engines_name,
                "engine proxy route names an unknown cluster; skipped",
            )?;
            let passthrough = r.passthrough_cluster.as_deref().and_then(|p| {
                cluster(
                    p,
                    "passthrough_cluster names an unknown cluster; calls lhnet does not serve are refused",
                )
            });
            let context = context(format!(
                "local longhorn_engine_proxy (cluster {engines_name}{})",
                passthrough
                    .as_ref()
                    .map(|c| format!(", passthrough {}", c.name()))
                    .unwrap_or_default()
            ));
            let egress = r.backup_egress.as_deref().and_then(|name| {
                let found = locals.egress.get(name).map(|a| format!("http://{a}"));
                if found.is_none() {
                    tracing::warn!(route = %r.path, listener = name, "backup_egress names no http_connect listener; replicas' backups go out as the caller set them");
                }
                found
            });
            let proxy = EngineProxy::new(engines, locals.backup_targets.clone(), egress);
            let raw = RawCalls::new(proxy.clone(), locals.address_map.clone());
            let server = MappedEngineProxy::server(proxy, locals.address_map.clone())
                .max_decoding_message_size(listener.max_message_size)
                .max_encoding_message_size(usize::MAX);
            let passthrough = passthrough.map(|c| stack::passthrough(&c, r, &context, info));
            let dispatch = EngineDispatch::new(
                Local::new(server),
                raw,
                passthrough,
                info.clone(),
                context.clone(),
            );
            let service = stack::route(dispatch, &context);
            (context, service)
        }
        RouteAction::Cluster(wanted) => {
            let c = cluster(wanted, "route names an unknown cluster; skipped")?;
            let context = context(format!("cluster {}", c.name()));
            let service = stack::route(
                stack::forwarding(&c, r, &context, info, Some(&locals.address_map)),
                &context,
            );
            (context, service)
        }
    };
    Some(Route {
        service,
        context,
        metrics: info.metrics.route_metrics(&info.name, &name),
        config: r.clone(),
    })
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

/// A `grpc-timeout` header that is not one; the value is quoted and shortened for a reply.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "header grpc-timeout {quoted} is not a gRPC timeout (1 to 8 digits and one of H M S m u n)"
)]
pub struct BadGrpcTimeout {
    quoted: String,
}

/// The route `timeout` and the client's `grpc-timeout` (capped by
/// `max_stream_duration.grpc_timeout_header_max`), whichever is shorter.
fn effective_deadline(
    route: &RouteConfig,
    headers: &HeaderMap,
) -> Result<Option<Duration>, BadGrpcTimeout> {
    let from_header = match headers.get(names::GRPC_TIMEOUT) {
        None => None,
        Some(v) => {
            let parsed = v.to_str().ok().and_then(parse_grpc_timeout);
            let d = parsed.ok_or_else(|| BadGrpcTimeout {
                quoted: quote_short(&String::from_utf8_lossy(v.as_bytes())),
            })?;
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
    use http::header::HeaderValue;

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
        assert_eq!(effective_deadline(route, &h).unwrap_err().quoted, "\"-5S\"");
        let long = "9".repeat(10_000);
        h.insert("grpc-timeout", HeaderValue::from_str(&long).unwrap());
        let quoted = effective_deadline(route, &h).unwrap_err().quoted;
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
