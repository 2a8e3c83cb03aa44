//! Clusters: pooled, multiplexed HTTP/2 connections per destination, made by a connector that
//! binds the cluster's source address (the storage address by default) before connecting.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{ClusterConfig, Destination, SourceAddress};
use crate::metrics::{CountedIo, Metrics};
use crate::reply::{BoxError, ProxyBody};
use crate::storage::StorageState;

/// One upstream cluster.
pub struct Cluster {
    pub config: ClusterConfig,
    client: Client<Connector, ProxyBody>,
    next_endpoint: AtomicUsize,
    in_flight: Arc<Semaphore>,
    storage: Arc<StorageState>,
}

/// Why a request did not reach (or did not get an answer from) the upstream.
#[derive(Debug)]
pub enum UpstreamError {
    /// Connecting failed: refused, unreachable, timed out, or no source address to bind.
    Connect {
        destination: SocketAddr,
        cause: String,
    },
    /// The upstream refused the stream before processing it (REFUSED_STREAM).
    Refused {
        destination: SocketAddr,
        cause: String,
    },
    /// The connection or stream broke before a response arrived.
    Reset {
        destination: SocketAddr,
        cause: String,
    },
}

/// Makes upstream TCP connections for one cluster.
#[derive(Clone)]
pub struct Connector {
    cluster: Arc<str>,
    source: SourceAddress,
    bind_to_device: Option<String>,
    connect_timeout: Duration,
    keepalive: Duration,
    storage: Arc<StorageState>,
    metrics: Arc<Metrics>,
}

/// A connect failure, with the reason used as a metric label.
#[derive(Debug)]
pub struct ConnectError {
    pub reason: &'static str,
    pub message: String,
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
        };
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.idle_timeout)
            .http2_initial_stream_window_size(1 << 20)
            .http2_initial_connection_window_size(4 << 20)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .build(connector);
        Arc::new(Cluster {
            in_flight: Arc::new(Semaphore::new(config.max_requests)),
            config,
            client,
            next_endpoint: AtomicUsize::new(0),
            storage,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The next endpoint of a static cluster, round robin.
    pub fn pick_endpoint(&self) -> Option<SocketAddr> {
        let endpoints = &self.config.endpoints;
        if endpoints.is_empty() {
            return None;
        }
        let i = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        Some(endpoints[i % endpoints.len()])
    }

    /// A concurrency slot, or `None` when `circuit_breakers.max_requests` are in flight.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().ok()
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
        let Some(storage) = self.storage.current() else {
            return false;
        };
        if storage.ip == ip {
            return true;
        }
        // Peers on the storage interface's subnets.
        storage
            .device
            .as_deref()
            .is_some_and(|device| lhnet_netns::discovery::on_interface_subnet(device, ip))
    }

    /// Sends `request` (whose URI holds only the path) to `destination` over the pool.
    pub async fn send(
        &self,
        destination: SocketAddr,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri: Uri =
            format!("http://{destination}{path}")
                .parse()
                .map_err(|e| UpstreamError::Connect {
                    destination,
                    cause: format!("bad upstream URI: {e}"),
                })?;
        *request.uri_mut() = uri;
        self.client
            .request(request)
            .await
            .map_err(|e| classify_error(destination, e))
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.config.name)
            .finish()
    }
}

fn classify_error(destination: SocketAddr, e: hyper_util::client::legacy::Error) -> UpstreamError {
    let cause = error_chain(&e);
    if e.is_connect() {
        UpstreamError::Connect { destination, cause }
    } else if cause.contains("refused stream") {
        // hyper does not expose h2's reason code; h2 words REFUSED_STREAM this way.
        UpstreamError::Refused { destination, cause }
    } else {
        UpstreamError::Reset { destination, cause }
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

// === impl UpstreamError ===

impl UpstreamError {
    pub fn destination(&self) -> SocketAddr {
        match self {
            UpstreamError::Connect { destination, .. }
            | UpstreamError::Refused { destination, .. }
            | UpstreamError::Reset { destination, .. } => *destination,
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect { destination, cause } => {
                write!(f, "upstream connect error to {destination}: {cause}")
            }
            UpstreamError::Refused { destination, cause } => {
                write!(f, "upstream {destination} refused the stream: {cause}")
            }
            UpstreamError::Reset { destination, cause } => {
                write!(f, "upstream {destination} reset before responding: {cause}")
            }
        }
    }
}

// === impl Connector ===

impl Connector {
    fn source_ip(&self) -> Result<Option<IpAddr>, ConnectError> {
        match self.source {
            SourceAddress::None => Ok(None),
            SourceAddress::Ip(ip) => Ok(Some(ip)),
            SourceAddress::Storage => match self.storage.current() {
                Some(addr) => Ok(Some(addr.ip)),
                None => Err(ConnectError {
                    reason: "no_source_address",
                    message: format!(
                        "no storage address to bind (source_address: storage): {}",
                        self.storage.last_error().unwrap_or_else(|| format!(
                            "{} has no address",
                            self.storage.interface()
                        ))
                    ),
                }),
            },
            SourceAddress::Management => self
                .storage
                .management_address()
                .map(Some)
                .ok_or(ConnectError {
                reason: "no_source_address",
                message:
                    "no management address to bind (source_address: management): POD_IP is not set"
                        .into(),
            }),
        }
    }

    async fn connect(self, destination: SocketAddr) -> Result<CountedIo<TcpStream>, ConnectError> {
        let source = self.source_ip()?;
        let socket = self.socket(destination, source).map_err(|e| ConnectError {
            reason: "bind",
            message: format!(
                "cannot bind source {} for {destination}: {e}",
                source
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "(any)".into())
            ),
        })?;
        let stream =
            match tokio::time::timeout(self.connect_timeout, socket.connect(destination)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    let reason = match e.kind() {
                        io::ErrorKind::ConnectionRefused => "refused",
                        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                            "unreachable"
                        }
                        _ => "other",
                    };
                    return Err(ConnectError {
                        reason,
                        message: format!("connecting to {destination}: {e}"),
                    });
                }
                Err(_) => {
                    return Err(ConnectError {
                        reason: "timeout",
                        message: format!(
                            "connecting to {destination}: no answer within connect_timeout {}",
                            crate::config::format_duration(self.connect_timeout)
                        ),
                    })
                }
            };
        let local = stream.local_addr().map_err(|e| ConnectError {
            reason: "other",
            message: format!("local address of connection to {destination}: {e}"),
        })?;
        let (device, network) = self.storage.classify(local.ip());
        tracing::debug!(
            network = network.as_str(), cluster = %self.cluster, local = %local, peer = %destination,
            device = %device, "upstream connection"
        );
        let guard = self.metrics.upstream_connection(&self.cluster, network);
        Ok(CountedIo::new(
            stream,
            self.metrics.byte_counters(&device, network),
            Some(guard),
        ))
    }

    fn socket(&self, destination: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpSocket> {
        let socket = Socket::new(
            Domain::for_address(destination),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.set_tcp_keepalive(
            &TcpKeepalive::new().with_time(self.keepalive).with_interval(
                self.keepalive
                    .min(Duration::from_secs(10))
                    .max(Duration::from_secs(1)),
            ),
        )?;
        if let Some(device) = &self.bind_to_device {
            let name = if device == "storage" {
                self.storage.interface().to_string()
            } else {
                device.clone()
            };
            socket.bind_device(Some(name.as_bytes())).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("SO_BINDTODEVICE {name}: {e} (needs CAP_NET_RAW)"),
                )
            })?;
        }
        if let Some(ip) = source {
            if ip.is_ipv4() != destination.is_ipv4() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("source {ip} and destination {destination} are different IP families"),
                ));
            }
            // Share ephemeral ports across destinations: the port is picked at connect time.
            if ip.is_ipv4() {
                setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
            }
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        let std_stream: std::net::TcpStream = socket.into();
        Ok(TcpSocket::from_std_stream(std_stream))
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConnectError {}

fn destination_of(uri: &Uri) -> Result<SocketAddr, ConnectError> {
    let authority = uri.authority().ok_or_else(|| ConnectError {
        reason: "other",
        message: format!("upstream URI {uri} has no address"),
    })?;
    authority.as_str().parse().map_err(|_| ConnectError {
        reason: "other",
        message: format!("upstream address {authority} is not IP:PORT"),
    })
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<CountedIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move {
            let destination = destination_of(&uri)?;
            let cluster = connector.cluster.clone();
            let metrics = connector.metrics.clone();
            match connector.connect(destination).await {
                Ok(io) => Ok(TokioIo::new(io)),
                Err(e) => {
                    metrics.upstream_connect_error(&cluster, e.reason);
                    Err(Box::new(e) as BoxError)
                }
            }
        })
    }
}

impl Connection for CountedIo<TcpStream> {
    fn connected(&self) -> Connected {
        self.get_ref().connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cluster(yaml: &str) -> Arc<Cluster> {
        let text = format!("listeners: []\nclusters:\n  - {yaml}\n");
        let config = Config::parse(&text, "test").unwrap();
        let metrics = Metrics::new();
        let storage = StorageState::new(&config.storage_network, None, metrics.clone());
        Cluster::new(config.clusters[0].clone(), storage, metrics)
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
