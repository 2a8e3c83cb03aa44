//! Prometheus metrics with the names and labels of DESIGN §7, and the socket wrapper that counts
//! the bytes the proxy moves.

use std::collections::{HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The network a socket's local address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Network {
    Management,
    Storage,
    Loopback,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Management => "management",
            Network::Storage => "storage",
            Network::Loopback => "loopback",
        }
    }
}

/// All of lhnet's metrics, registered in one registry.
pub struct Metrics {
    registry: Registry,
    interface_receive: IntCounterVec,
    interface_transmit: IntCounterVec,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_connections: IntGaugeVec,
    upstream_connect_errors: IntCounterVec,
    storage_address: IntGaugeVec,
    config_reloads: IntCounterVec,
    limits_reached: IntCounterVec,
    tls_refused: IntCounterVec,
    egress_receive: IntCounterVec,
    egress_transmit: IntCounterVec,
    egress_connections: IntCounterVec,
    /// The `target` label values in use, at most [`MAX_EGRESS_TARGETS`] (then `other`).
    egress_targets: parking_lot::Mutex<HashSet<String>>,
    downstream_connections: IntGaugeVec,
    /// When each (listener, limit) was last logged, and how often it was reached since.
    limit_log: parking_lot::Mutex<HashMap<&'static str, HashMap<String, LimitLog>>>,
}

/// A listener (or cluster) and the config key of one of its limits.
/// When a limit was last logged for a listener (never: `None`), and how often it was reached
/// since.
type LimitLog = (Option<Instant>, u64);

/// A limit is logged at most this often per listener; the line says how often it was reached.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The gRPC services and methods that may appear as label values; anything else is `other`,
/// so a client cannot grow the label set without bound.
pub struct KnownMethods {
    services: HashMap<String, HashSet<String>>,
    /// `/pkg.Service/Method` of the methods whose client sends exactly one message (unary and
    /// server-streaming): a real client sends it with the headers.
    one_message: HashSet<String>,
}

/// Labels of one gRPC request path, bounded by [`KnownMethods`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcLabels<'a> {
    pub service: &'a str,
    pub method: &'a str,
}

const OTHER: &str = "other";

/// The methods of lhnet's compiled-in descriptors, decoded once per process: the same for
/// every [`Metrics`], and `'static`, so a call can hold its labels from its start to its end.
static KNOWN_METHODS: std::sync::LazyLock<KnownMethods> =
    std::sync::LazyLock::new(|| KnownMethods::from_descriptors(lhnet_proto::FILE_DESCRIPTOR_SET));

/// One route's request metrics: its duration histogram resolved once, its names for the
/// request counter's labels. A cheap clone (one reference count), held by every call.
#[derive(Clone)]
pub struct RouteMetrics(Arc<RouteHandles>);

struct RouteHandles {
    metrics: Arc<Metrics>,
    listener: Arc<str>,
    route: Arc<str>,
    duration: Histogram,
}

impl RouteMetrics {
    /// Records one call of `method` that ended with `grpc_code` after `seconds`.
    pub fn record(&self, method: &GrpcLabels<'_>, grpc_code: i32, seconds: f64) {
        let h = &*self.0;
        h.metrics
            .count_request(&h.listener, &h.route, method, grpc_code);
        h.duration.observe(seconds);
    }
}

/// Distinct `target` label values of the backup-egress byte counters.
const MAX_EGRESS_TARGETS: usize = 64;

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        // Decoded now, not by the first request.
        std::sync::LazyLock::force(&KNOWN_METHODS);
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let interface_receive = counter(
            "lhnet_interface_receive_bytes_total",
            "Bytes the proxy received on its own sockets, by the device and network of the local address.",
            &["device", "network"],
        );
        let interface_transmit = counter(
            "lhnet_interface_transmit_bytes_total",
            "Bytes the proxy sent on its own sockets, by the device and network of the local address.",
            &["device", "network"],
        );
        let requests = counter(
            "lhnet_requests_total",
            "gRPC requests handled, by listener, route, service, method and final grpc-status.",
            &[
                "listener",
                "route",
                "grpc_service",
                "grpc_method",
                "grpc_code",
            ],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "lhnet_request_duration_seconds",
                "Time from request headers to the end of the response, by listener and route.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["listener", "route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_duration.clone()))
            .expect("unique metric");
        let upstream_connections = gauge(
            "lhnet_upstream_connections",
            "Open upstream connections, by cluster and the network of their source address.",
            &["cluster", "network"],
        );
        let upstream_connect_errors = counter(
            "lhnet_upstream_connect_errors_total",
            "Upstream connection attempts that failed, by cluster and reason.",
            &["cluster", "reason"],
        );
        let storage_address = gauge(
            "lhnet_storage_address_info",
            "The storage address in use (value 1), its device and where it came from.",
            &["device", "address", "source"],
        );
        let config_reloads = counter(
            "lhnet_config_reloads_total",
            "Config reloads, by result (success or failure).",
            &["result"],
        );
        let limits_reached = counter(
            "lhnet_limits_reached_total",
            "Times a listener or cluster limit refused or closed something, by listener (or cluster) and the config key of the limit.",
            &["listener", "limit"],
        );
        let tls_refused = counter(
            "lhnet_tls_refused_total",
            "Client connections a listener with mTLS closed before HTTP/2, by listener and reason (plaintext: the client did not start TLS; handshake: the handshake failed, e.g. no or a wrong client certificate).",
            &["listener", "reason"],
        );
        let egress_receive = counter(
            "lhnet_backup_egress_receive_bytes_total",
            "Bytes an http_connect (backup egress) listener received from backup targets, by listener and target (HOST:PORT as requested).",
            &["listener", "target"],
        );
        let egress_transmit = counter(
            "lhnet_backup_egress_transmit_bytes_total",
            "Bytes an http_connect (backup egress) listener sent to backup targets, by listener and target (HOST:PORT as requested).",
            &["listener", "target"],
        );
        let egress_connections = counter(
            "lhnet_backup_egress_connections_total",
            "Tunnels and forwarded requests of an http_connect listener, by listener and result (ok; refused: not in backup_target.allowed_endpoints; failed: the target could not be reached; bad_request; limit).",
            &["listener", "result"],
        );
        let downstream_connections = gauge(
            "lhnet_downstream_connections",
            "Open client connections, by listener.",
            &["listener"],
        );
        registry
            .register(Box::new(KernelCounters::new()))
            .expect("unique metric");
        Arc::new(Metrics {
            registry,
            interface_receive,
            interface_transmit,
            requests,
            request_duration,
            upstream_connections,
            upstream_connect_errors,
            storage_address,
            config_reloads,
            limits_reached,
            tls_refused,
            egress_receive,
            egress_transmit,
            egress_connections,
            egress_targets: parking_lot::Mutex::new(HashSet::new()),
            downstream_connections,
            limit_log: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which registration rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Byte counters for one socket, to hand to [`CountedIo`].
    pub fn byte_counters(&self, device: &str, network: Network) -> ByteCounters {
        let labels = [device, network.as_str()];
        ByteCounters {
            received: self.interface_receive.with_label_values(&labels),
            transmitted: self.interface_transmit.with_label_values(&labels),
        }
    }

    pub fn grpc_labels(&self, path: &str) -> GrpcLabels<'static> {
        KNOWN_METHODS.labels(path)
    }

    /// One route's request metrics, resolved once (when the route is built).
    pub fn route_metrics(self: &Arc<Self>, listener: &Arc<str>, route: &Arc<str>) -> RouteMetrics {
        RouteMetrics(Arc::new(RouteHandles {
            duration: self.request_duration.with_label_values(&[listener, route]),
            metrics: self.clone(),
            listener: listener.clone(),
            route: route.clone(),
        }))
    }

    pub fn record_request(
        &self,
        listener: &str,
        route: &str,
        path: &str,
        grpc_code: i32,
        seconds: f64,
    ) {
        self.count_request(listener, route, &self.grpc_labels(path), grpc_code);
        self.request_duration
            .with_label_values(&[listener, route])
            .observe(seconds);
    }

    /// `lhnet_requests_total` for one call.
    fn count_request(&self, listener: &str, route: &str, method: &GrpcLabels<'_>, grpc_code: i32) {
        let code = grpc_code_label(grpc_code);
        self.requests
            .with_label_values(&[listener, route, method.service, method.method, code])
            .inc();
    }

    /// A gauge of open upstream connections; [`ConnectionGuard`] keeps it right.
    pub fn upstream_connection(&self, cluster: &str, network: Network) -> ConnectionGuard {
        let gauge = self
            .upstream_connections
            .with_label_values(&[cluster, network.as_str()]);
        gauge.inc();
        ConnectionGuard { gauge }
    }

    /// Counts a limit reached on `listener` (or a cluster) and logs it, at most once per
    /// [`LIMIT_LOG_EVERY`] for each listener and limit: under abuse the log stays readable.
    pub fn limit_reached(
        &self,
        listener: &str,
        limit: &'static str,
        detail: impl FnOnce() -> String,
    ) {
        self.limits_reached
            .with_label_values(&[listener, limit])
            .inc();
        self.log_rate_limited(listener, limit, detail);
    }

    /// Byte counters of one backup-egress target; past [`MAX_EGRESS_TARGETS`] distinct
    /// targets, new ones count as `other`, so callers cannot grow the label set without bound.
    pub fn egress_bytes(&self, listener: &str, target: &str) -> ByteCounters {
        let target = {
            let mut known = self.egress_targets.lock();
            if known.contains(target) || known.len() < MAX_EGRESS_TARGETS {
                known.insert(target.to_string());
                target
            } else {
                OTHER
            }
        };
        let labels = [listener, target];
        ByteCounters {
            received: self.egress_receive.with_label_values(&labels),
            transmitted: self.egress_transmit.with_label_values(&labels),
        }
    }

    /// Counts one tunnel or forwarded request of a backup-egress listener by its result.
    pub fn egress_connection(&self, listener: &str, result: &'static str) {
        self.egress_connections
            .with_label_values(&[listener, result])
            .inc();
    }

    /// Counts a client connection a listener's mTLS refused, with a rate-limited log line.
    pub fn tls_refused(
        &self,
        listener: &str,
        reason: &'static str,
        detail: impl FnOnce() -> String,
    ) {
        self.tls_refused
            .with_label_values(&[listener, reason])
            .inc();
        self.log_rate_limited(listener, reason, detail);
    }

    /// Logs `detail` at most once per [`LIMIT_LOG_EVERY`] for each (listener, key), with how
    /// often it happened since.
    fn log_rate_limited(
        &self,
        listener: &str,
        limit: &'static str,
        detail: impl FnOnce() -> String,
    ) {
        let now = Instant::now();
        let mut log = self.limit_log.lock();
        let by_listener = log.entry(limit).or_default();
        // Looked up by &str: a listener's name is copied once, not on every event.
        let entry = match by_listener.get_mut(listener) {
            Some(entry) => entry,
            None => by_listener.entry(listener.to_string()).or_insert((None, 0)),
        };
        entry.1 += 1;
        if entry
            .0
            .is_none_or(|at| now.duration_since(at) >= LIMIT_LOG_EVERY)
        {
            let times = std::mem::take(&mut entry.1);
            entry.0 = Some(now);
            drop(log);
            tracing::warn!(%listener, limit, times, "{} (reached {times} time(s) in the last {}s)", detail(), LIMIT_LOG_EVERY.as_secs());
        }
    }

    /// Counts an open client connection on `listener` until the guard drops.
    pub fn downstream_connection(&self, listener: &str) -> ConnectionGuard {
        let gauge = self.downstream_connections.with_label_values(&[listener]);
        gauge.inc();
        ConnectionGuard { gauge }
    }

    /// See [`KnownMethods::client_sends_one_message`].
    pub fn client_sends_one_message(&self, path: &str) -> bool {
        KNOWN_METHODS.client_sends_one_message(path)
    }

    pub fn upstream_connect_error(&self, cluster: &str, reason: &str) {
        self.upstream_connect_errors
            .with_label_values(&[cluster, reason])
            .inc();
    }

    /// Replaces the storage-address info series with the current one (or none).
    pub fn set_storage_address(&self, current: Option<(&str, &str, &str)>) {
        self.storage_address.reset();
        if let Some((device, address, source)) = current {
            self.storage_address
                .with_label_values(&[device, address, source])
                .set(1);
        }
    }

    pub fn config_reload(&self, success: bool) {
        self.config_reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }
}

/// gRPC codes as label values; anything outside 0..=16 is `other`.
fn grpc_code_label(code: i32) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|c| CODES.get(c))
        .copied()
        .unwrap_or(OTHER)
}

// === impl KnownMethods ===

impl KnownMethods {
    pub fn from_descriptors(encoded: &[u8]) -> KnownMethods {
        let mut services = HashMap::new();
        let mut one_message = HashSet::new();
        if let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) {
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    let full = if package.is_empty() {
                        name
                    } else {
                        format!("{package}.{name}")
                    };
                    for m in &service.method {
                        if let (Some(method), false) = (&m.name, m.client_streaming()) {
                            one_message.insert(format!("/{full}/{method}"));
                        }
                    }
                    let methods = service.method.into_iter().filter_map(|m| m.name).collect();
                    services.insert(full, methods);
                }
            }
        }
        KnownMethods {
            services,
            one_message,
        }
    }

    /// Whether `path` is a method lhnet knows whose client sends one message (unary or
    /// server-streaming). Unknown and client-streaming methods may wait for the server first.
    pub fn client_sends_one_message(&self, path: &str) -> bool {
        self.one_message.contains(path)
    }

    /// Splits `/pkg.Service/Method` into bounded label values.
    pub fn labels(&self, path: &str) -> GrpcLabels<'_> {
        let other = GrpcLabels {
            service: OTHER,
            method: OTHER,
        };
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return other;
        };
        match self.services.get_key_value(service) {
            Some((service, methods)) => GrpcLabels {
                service,
                method: methods.get(method).map(String::as_str).unwrap_or(OTHER),
            },
            None => other,
        }
    }
}

// === kernel counters ===

/// `lhnet_network_{receive,transmit}_bytes_total`: the kernel's per-device counters of the pod's
/// namespace, read at scrape time.
struct KernelCounters {
    template_rx: IntCounterVec,
    template_tx: IntCounterVec,
}

impl KernelCounters {
    fn new() -> Self {
        let (rx, tx) = Self::families();
        KernelCounters {
            template_rx: rx,
            template_tx: tx,
        }
    }

    fn families() -> (IntCounterVec, IntCounterVec) {
        let rx = IntCounterVec::new(
            Opts::new(
                "lhnet_network_receive_bytes_total",
                "Bytes the kernel received on each device of the pod's network namespace.",
            ),
            &["device"],
        )
        .expect("valid metric");
        let tx = IntCounterVec::new(
            Opts::new(
                "lhnet_network_transmit_bytes_total",
                "Bytes the kernel sent on each device of the pod's network namespace.",
            ),
            &["device"],
        )
        .expect("valid metric");
        (rx, tx)
    }
}

impl Collector for KernelCounters {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.template_rx.desc();
        d.extend(self.template_tx.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (rx, tx) = Self::families();
        match lhnet_netns::read_device_counters() {
            Ok(devices) => {
                for (device, c) in devices {
                    rx.with_label_values(&[device.as_str()]).inc_by(c.rx_bytes);
                    tx.with_label_values(&[device.as_str()]).inc_by(c.tx_bytes);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read kernel device counters"),
        }
        let mut families = rx.collect();
        families.extend(tx.collect());
        families
    }
}

// === impl ConnectionGuard ===

/// Decrements the upstream-connection gauge when the connection is dropped.
pub struct ConnectionGuard {
    gauge: IntGauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

// === impl CountedIo ===

/// The receive and transmit counters of one socket.
#[derive(Clone)]
pub struct ByteCounters {
    received: IntCounter,
    transmitted: IntCounter,
}

pin_project_lite::pin_project! {
    /// Wraps a socket and counts every byte read and written into its [`ByteCounters`]; an
    /// optional guard lives as long as the socket (e.g. an upstream-connection gauge).
    pub struct CountedIo<T> {
        #[pin]
        inner: T,
        counters: ByteCounters,
        guard: Option<ConnectionGuard>,
    }
}

impl<T> CountedIo<T> {
    pub fn new(inner: T, counters: ByteCounters, guard: Option<ConnectionGuard>) -> Self {
        CountedIo {
            inner,
            counters,
            guard,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The socket, its counters and its guard, for code that moves bytes without
    /// `AsyncRead`/`AsyncWrite` (splice) and counts them itself.
    pub fn into_parts(self) -> (T, ByteCounters, Option<ConnectionGuard>) {
        (self.inner, self.counters, self.guard)
    }
}

impl ByteCounters {
    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }

    pub fn transmitted(&self, n: u64) {
        self.transmitted.inc_by(n);
    }
}

impl<T: AsyncRead> AsyncRead for CountedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            this.counters.received.inc_by(n as u64);
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for CountedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            this.counters.transmitted.inc_by(*n as u64);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            this.counters.transmitted.inc_by(*n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn method_labels_are_bounded() {
        let m = Metrics::new();
        assert_eq!(
            m.grpc_labels("/imrpc.ProxyEngineService/VolumeGet"),
            GrpcLabels {
                service: "imrpc.ProxyEngineService",
                method: "VolumeGet"
            }
        );
        assert_eq!(
            m.grpc_labels("/imrpc.ProxyEngineService/NoSuch"),
            GrpcLabels {
                service: "imrpc.ProxyEngineService",
                method: OTHER
            }
        );
        assert_eq!(m.grpc_labels("/evil.Service/X").service, OTHER);
        assert_eq!(m.grpc_labels("garbage").method, OTHER);
        assert_eq!(grpc_code_label(14), "14");
        assert_eq!(grpc_code_label(99), OTHER);
    }

    #[tokio::test]
    async fn counted_io_counts_both_directions() {
        let m = Metrics::new();
        let (a, mut b) = tokio::io::duplex(1024);
        let mut counted = CountedIo::new(a, m.byte_counters("lo", Network::Loopback), None);
        counted.write_all(b"hello").await.unwrap();
        b.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 3];
        counted.read_exact(&mut buf).await.unwrap();
        let text = m.render();
        assert!(
            text.contains(
                "lhnet_interface_transmit_bytes_total{device=\"lo\",network=\"loopback\"} 5"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "lhnet_interface_receive_bytes_total{device=\"lo\",network=\"loopback\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("lhnet_network_receive_bytes_total{device=\"lo\"}"),
            "{text}"
        );
    }

    #[test]
    fn connection_guard_tracks_the_gauge() {
        let m = Metrics::new();
        let g1 = m.upstream_connection("engines", Network::Storage);
        let g2 = m.upstream_connection("engines", Network::Storage);
        assert!(m
            .render()
            .contains("lhnet_upstream_connections{cluster=\"engines\",network=\"storage\"} 2"));
        drop(g1);
        drop(g2);
        assert!(m
            .render()
            .contains("lhnet_upstream_connections{cluster=\"engines\",network=\"storage\"} 0"));
    }
}
