//! Clusters: where upstream requests go. Each address has a pool of multiplexed HTTP/2
//! connections ([`pool`]) made by a connector that binds the cluster's source address
//! ([`connect`]).

mod connect;
mod http2;
mod pool;
mod service;

pub use http2::H2Body;

use crate::tls::ClientTls;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::Request;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use connect::{ConnectError, Connector};
pub use pool::Sending;
use pool::{EndpointPool, PoolLimits, Standing};
pub use service::{ClusterService, EndpointService};
use tokio::time::Instant;

use crate::config::{format_duration, ClusterConfig, Destination};
use crate::listener::Downstream;
use crate::metrics::{CountedIo, Metrics};
use crate::reply::ProxyBody;
use crate::storage::StorageState;

/// Original-destination addresses a cluster keeps pools for at most; idle ones are reaped.
const MAX_DYNAMIC_ENDPOINTS: usize = 4096;

/// One upstream cluster.
pub struct Cluster {
    pub config: ClusterConfig,
    connector: Connector,
    limits: PoolLimits,
    /// Pools of a static cluster's endpoints, in config order.
    endpoints: Vec<Arc<EndpointPool>>,
    /// Pools of original-destination addresses, made on first use.
    dynamic: Mutex<HashMap<SocketAddr, Arc<EndpointPool>>>,
    next_endpoint: AtomicUsize,
    in_flight: Arc<Semaphore>,
    storage: Arc<StorageState>,
}

/// One request's place in a cluster's `circuit_breakers`, held until its response ends.
pub struct ClusterSlot {
    _permit: OwnedSemaphorePermit,
    _held: HeldSlot,
}

/// One of the slots a downstream connection holds.
struct HeldSlot(Arc<Downstream>);

impl Drop for HeldSlot {
    fn drop(&mut self) {
        self.0.held_slots.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which circuit breaker refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotLimit {
    Cluster,
    Connection,
}

impl SlotLimit {
    /// The config key, as counted in `lhnet_limits_reached_total`.
    pub fn key(self) -> &'static str {
        match self {
            SlotLimit::Cluster => "max_requests",
            SlotLimit::Connection => "max_requests_per_downstream_connection",
        }
    }
}

/// Why a `kind: tcp` connection found no endpoint of its cluster to forward to.
#[derive(Debug, thiserror::Error)]
pub enum TcpConnectError {
    #[error(
        "cluster {cluster} has no usable endpoints (each was skipped at load; the log says why)"
    )]
    NoEndpoints { cluster: String },
    /// Every endpoint was tried once; each failure names its endpoint.
    #[error("{}", failures.join("; "))]
    Failed { failures: Vec<String> },
}

/// Why a request did not reach (or did not get an answer from) the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting failed: refused, unreachable, timed out, or no source address to bind.
    #[error("upstream connect error to {destination}: {cause}")]
    Connect {
        destination: SocketAddr,
        cause: String,
    },
    /// The upstream refused the stream before processing it (REFUSED_STREAM).
    #[error("upstream {destination} refused the stream: {cause}")]
    Refused {
        destination: SocketAddr,
        cause: String,
    },
    /// The connection or stream broke before a response arrived; `reason` is the HTTP/2 error
    /// code when the break was an HTTP/2 reset or GOAWAY.
    #[error("upstream {destination} reset before responding: {cause}")]
    Reset {
        destination: SocketAddr,
        reason: Option<h2::Reason>,
        cause: String,
    },
    /// A static cluster with no endpoint to send to.
    #[error(
        "cluster {cluster} has no usable endpoints (each was skipped at load; the log says why)"
    )]
    NoEndpoints { cluster: String },
    /// The request body broke while it was buffered for retries.
    #[error("reading the request body failed: {cause}")]
    RequestBody { cause: String },
    /// One attempt took longer than the route's `retry_policy.per_try_timeout`.
    #[error("per_try_timeout {} expired", format_duration(*after))]
    TryTimeout { after: Duration },
    /// A request's future polled after it had given its answer (a bug in lhnet, not input).
    #[error("an upstream request was polled after it had answered (a bug in lhnet: please report it with lhnet's log)")]
    PolledAgain,
}

// === impl Cluster ===

impl Cluster {
    pub fn new(
        config: ClusterConfig,
        storage: Arc<StorageState>,
        metrics: Arc<Metrics>,
    ) -> Arc<Cluster> {
        let connector = Connector {
            cluster: config.name.as_str().into(),
            source: config.source_address,
            bind_to_device: config.bind_to_device.clone(),
            connect_timeout: config.connect_timeout,
            keepalive: config.tcp_keepalive,
            storage: storage.clone(),
            metrics,
            tls: config
                .tls
                .as_ref()
                .map(|t| ClientTls::for_cluster(&config.name, t)),
        };
        let limits = PoolLimits {
            max_connections: config.max_connections_per_endpoint,
            streams_per_connection: config.streams_per_connection,
            idle_timeout: config.idle_timeout,
        };
        let endpoints = config
            .endpoints
            .iter()
            .filter_map(|addr| match EndpointPool::new(*addr, limits) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    tracing::error!(cluster = %config.name, "endpoint skipped: {e}");
                    None
                }
            })
            .collect();
        let cluster = Arc::new(Cluster {
            in_flight: Arc::new(Semaphore::new(config.max_requests)),
            config,
            connector,
            limits,
            endpoints,
            dynamic: Mutex::new(HashMap::new()),
            next_endpoint: AtomicUsize::new(0),
            storage,
        });
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(reap_idle(Arc::downgrade(&cluster)));
            }
            Err(_) => {
                tracing::warn!(cluster = %cluster.config.name, "no runtime: idle connections will not be reaped")
            }
        }
        cluster
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The next endpoint of a static cluster, round robin.
    pub fn pick_endpoint(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        Some(self.endpoints[i % self.endpoints.len()].addr)
    }

    /// A concurrency slot for a request from `downstream`, or the limit that refuses it:
    /// `circuit_breakers.max_requests` in flight, or the connection already holding its share.
    pub fn try_acquire(&self, downstream: &Arc<Downstream>) -> Result<ClusterSlot, SlotLimit> {
        let share = self.config.max_requests_per_downstream_connection;
        if downstream.held_slots.fetch_add(1, Ordering::Relaxed) >= share {
            downstream.held_slots.fetch_sub(1, Ordering::Relaxed);
            return Err(SlotLimit::Connection);
        }
        // From here the slot counts against the connection; dropping it gives it back.
        let held = HeldSlot(downstream.clone());
        match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => Ok(ClusterSlot {
                _permit: permit,
                _held: held,
            }),
            Err(_) => Err(SlotLimit::Cluster),
        }
    }

    /// Whether an original-destination address is allowed by `allowed_destinations` and
    /// `allowed_ports`. An empty list allows everything for that part.
    pub fn allows(&self, destination: SocketAddr) -> bool {
        let c = &self.config;
        let port_ok = c.allowed_ports.is_empty()
            || c.allowed_ports
                .iter()
                .any(|r| r.contains(&destination.port()));
        let ip = destination.ip();
        let ip_ok = c.allowed_destinations.is_empty()
            || c.allowed_destinations.iter().any(|d| match d {
                Destination::Storage => self.is_on_storage_network(ip),
                cidr => cidr.cidr_contains(ip),
            });
        port_ok && ip_ok
    }

    fn is_on_storage_network(&self, ip: IpAddr) -> bool {
        self.storage.on_storage_network(ip)
    }

    /// Sends `request` (whose URI holds only the path) to `destination` over its pool. The
    /// pool's future is the call's (no async block around it to hold the request a second
    /// time).
    pub fn send(self: &Arc<Self>, destination: SocketAddr, request: Request<ProxyBody>) -> Sending {
        match self.pool_for(destination) {
            Ok(pool) => pool.send(self.clone(), request),
            Err(e) => Sending::failed(e),
        }
    }

    fn pool_for(&self, destination: SocketAddr) -> Result<Arc<EndpointPool>, UpstreamError> {
        if let Some(p) = self.endpoints.iter().find(|p| p.addr == destination) {
            return Ok(p.clone());
        }
        let fail = |cause: String| UpstreamError::Connect { destination, cause };
        let mut dynamic = self.dynamic.lock();
        if let Some(p) = dynamic.get(&destination) {
            return Ok(p.clone());
        }
        if dynamic.len() >= MAX_DYNAMIC_ENDPOINTS && !make_room(&mut dynamic) {
            return Err(fail(format!(
                "cluster {} has requests in flight to all of the {MAX_DYNAMIC_ENDPOINTS} addresses it may hold connections to; retry when some finish",
                self.config.name
            )));
        }
        let pool = Arc::new(EndpointPool::new(destination, self.limits).map_err(fail)?);
        dynamic.insert(destination, pool.clone());
        Ok(pool)
    }

    /// A raw TCP connection to a static cluster's endpoints for `kind: tcp` listeners: round
    /// robin, each endpoint tried once; the error names every endpoint that failed.
    pub async fn connect_tcp(&self) -> Result<CountedIo<TcpStream>, TcpConnectError> {
        let mut failures = Vec::new();
        for _ in 0..self.endpoints.len() {
            let Some(endpoint) = self.pick_endpoint() else {
                break;
            };
            match self.connector.connect(endpoint).await {
                Ok(io) => return Ok(io),
                Err(e) => {
                    self.connector
                        .metrics
                        .upstream_connect_error(&self.config.name, e.reason);
                    failures.push(e.message);
                }
            }
        }
        Err(if failures.is_empty() {
            TcpConnectError::NoEndpoints {
                cluster: self.config.name.clone(),
            }
        } else {
            TcpConnectError::Failed { failures }
        })
    }

    /// Open upstream connections to `destination` (for tests and status).
    pub fn connections_to(&self, destination: SocketAddr) -> usize {
        self.pool_for(destination)
            .map(|p| p.connections())
            .unwrap_or(0)
    }

    fn reap(&self) {
        for p in &self.endpoints {
            p.reap();
        }
        {
            let mut dynamic = self.dynamic.lock();
            dynamic.retain(|_, p| !p.reap());
        }
    }
}

/// Frees a place in a full address table: every pool past its idle timeout, or else every
/// dead one (a failed dial holds its place only until the table is full), or else the least
/// recently used idle one. False when every address has a request in flight.
fn make_room(dynamic: &mut HashMap<SocketAddr, Arc<EndpointPool>>) -> bool {
    dynamic.retain(|_, p| !p.reap());
    if dynamic.len() < MAX_DYNAMIC_ENDPOINTS {
        return true;
    }
    let mut oldest_idle: Option<(Instant, SocketAddr)> = None;
    dynamic.retain(|addr, p| match p.standing() {
        Standing::Dead => false,
        Standing::Idle(used) => {
            if oldest_idle.is_none_or(|(t, _)| used < t) {
                oldest_idle = Some((used, *addr));
            }
            true
        }
        Standing::Busy => true,
    });
    if dynamic.len() < MAX_DYNAMIC_ENDPOINTS {
        return true;
    }
    match oldest_idle {
        Some((_, addr)) => {
            tracing::debug!(%addr, "address table full: closing the least recently used idle pool");
            dynamic.remove(&addr);
            true
        }
        None => false,
    }
}

/// Closes idle connections until the cluster is dropped (a reload replaces clusters).
async fn reap_idle(cluster: Weak<Cluster>) {
    let every = match cluster.upgrade() {
        Some(c) => {
            (c.config.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        match cluster.upgrade() {
            Some(c) => c.reap(),
            None => return,
        }
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.config.name)
            .finish()
    }
}

/// An error and its sources, joined with ": " (hyper's Display alone hides the cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::future::Future;

    fn cluster(yaml: &str) -> Arc<Cluster> {
        let text = format!("listeners: []\nclusters:\n  - {yaml}\n");
        let config = Config::parse(&text, "test").unwrap();
        let metrics = Metrics::new();
        let storage = StorageState::new(&config.storage_network, None, metrics.clone());
        Cluster::new(config.clusters[0].clone(), storage, metrics)
    }

    #[test]
    fn an_open_call_does_not_hold_its_request() {
        // bench-footprint: every open call keeps this future. As an async block it kept a
        // place for the request (416 B) for as long as the call was open; the request is now
        // opened before the future is made, which holds the wait for the answer alone.
        let one = std::mem::size_of::<Request<ProxyBody>>();
        let size = std::mem::size_of::<Sending>();
        eprintln!("request {one} B, the call's future {size} B");
        assert!(size <= 64, "{size} B (a request is {one} B)");
    }

    #[tokio::test]
    async fn a_request_is_opened_before_its_answer_is_awaited() {
        // An upstream that takes requests and never answers; it tells each one it sees.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let mut held = Vec::new();
            while let Some(Ok((request, respond))) = conn.accept().await {
                let _ = seen.send(request.uri().path().to_string());
                held.push((request, respond));
            }
        });
        let c = cluster(&format!(
            "{{ name: s, endpoints: [{addr}], upstream_bind_config: {{ source_address: 127.0.0.1 }} }}"
        ));
        let request = |path: &str| {
            Request::builder()
                .uri(path)
                .body(crate::reply::empty_body())
                .unwrap()
        };
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        // The first request waits for the dial (boxed); once opened, the box is gone.
        let mut first = std::pin::pin!(c.send(addr, request("/a.B/First")));
        assert!(!first.is_opened());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !first.is_opened() {
            if let std::task::Poll::Ready(r) = first.as_mut().poll(&mut cx) {
                panic!("answered: {:?}", r.map(|_| ()));
            }
            assert!(tokio::time::Instant::now() < deadline, "never opened");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await;
        assert_eq!(got.unwrap().as_deref(), Some("/a.B/First"));
        // With the connection up, a request is opened as it is made, before any poll.
        let second = c.send(addr, request("/a.B/Second"));
        assert!(second.is_opened());
        let got = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await;
        assert_eq!(got.unwrap().as_deref(), Some("/a.B/Second"));
        assert!(first.as_mut().poll(&mut cx).is_pending());
    }

    #[tokio::test]
    async fn round_robin_over_endpoints() {
        let c = cluster("{ name: s, endpoints: [127.0.0.1:1, 127.0.0.1:2, 127.0.0.1:3] }");
        let picked: Vec<u16> = (0..6).map(|_| c.pick_endpoint().unwrap().port()).collect();
        assert_eq!(picked, vec![1, 2, 3, 1, 2, 3]);
    }

    #[tokio::test]
    async fn allowed_destinations_and_ports() {
        let c = cluster(
            "{ name: e, type: original_dst, allowed_destinations: [127.0.0.0/8, 10.30.0.5], allowed_ports: [9500-9599] }",
        );
        assert!(c.allows("127.0.0.1:9501".parse().unwrap()));
        assert!(c.allows("10.30.0.5:9599".parse().unwrap()));
        assert!(!c.allows("10.30.0.6:9501".parse().unwrap()));
        assert!(!c.allows("127.0.0.1:22".parse().unwrap()));
    }

    #[tokio::test]
    async fn dead_addresses_do_not_keep_a_new_one_out() {
        let c = cluster("{ name: e, type: original_dst, allowed_destinations: [127.0.0.0/8] }");
        // More dead addresses than the table holds: 127.0.x.y port 9 refuses at once.
        let dead = (0..MAX_DYNAMIC_ENDPOINTS + 904)
            .map(|i| SocketAddr::from(([127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8], 9)));
        let mut failed = 0;
        for addr in dead {
            let req = Request::builder()
                .uri("/x.Y/Z")
                .body(crate::reply::empty_body())
                .unwrap();
            failed += usize::from(c.send(addr, req).await.is_err());
        }
        assert_eq!(failed, MAX_DYNAMIC_ENDPOINTS + 904);
        let held = c.dynamic.lock().len();
        assert!(held <= MAX_DYNAMIC_ENDPOINTS, "{held}");
        // A new address still gets a pool (the table made room instead of refusing it).
        assert!(c.pool_for("127.0.0.1:10000".parse().unwrap()).is_ok());
    }

    #[tokio::test]
    async fn missing_storage_address_is_a_clear_connect_error() {
        let c = cluster("{ name: s, endpoints: [127.0.0.1:1], upstream_bind_config: { source_address: storage } }");
        let req = Request::builder()
            .uri("/x.Y/Z")
            .body(crate::reply::empty_body())
            .unwrap();
        let err = c
            .send("127.0.0.1:1".parse().unwrap(), req)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, UpstreamError::Connect { .. }), "{text}");
        assert!(text.contains("no storage address to bind"), "{text}");
        assert!(text.contains("lhnet1"), "{text}");
    }
}
