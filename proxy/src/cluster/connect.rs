//! The upstream connector: a TCP connection bound to the cluster's source address (the storage
//! address by default), with `IP_BIND_ADDRESS_NO_PORT`, optional `SO_BINDTODEVICE`, keepalive,
//! nodelay and `connect_timeout`, counted in the byte and connection metrics.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
use tokio::net::{TcpSocket, TcpStream};

use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use crate::config::SourceAddress;
use crate::metrics::{CountedIo, Metrics};
use crate::storage::StorageState;
use crate::tls::ClientTls;

/// An upstream connection's bytes: counted on the wire, under TLS when the cluster has it
/// (boxed: 1.2 KiB that plaintext connections do not carry).
pub type UpstreamIo = Either<CountedIo<TcpStream>, Box<TlsStream<CountedIo<TcpStream>>>>;

/// Makes upstream TCP connections for one cluster.
pub struct Connector {
    pub(super) cluster: Arc<str>,
    pub(super) source: SourceAddress,
    pub(super) bind_to_device: Option<String>,
    pub(super) connect_timeout: Duration,
    pub(super) keepalive: Duration,
    pub(super) storage: Arc<StorageState>,
    pub(super) metrics: Arc<Metrics>,
    /// `tls:` of the cluster (gRPC connections only; `kind: tcp` listeners forward bytes).
    pub(super) tls: Option<Arc<ClientTls>>,
}

/// A connect failure, with the reason used as a metric label.
#[derive(Debug)]
pub struct ConnectError {
    pub reason: &'static str,
    pub message: String,
}

// === impl Connector ===

impl Connector {
    /// A connector of its own, not a cluster's (a backup-egress listener's): `name` is its
    /// metric label, as a cluster's name is.
    pub fn standalone(
        name: &str,
        source: SourceAddress,
        bind_to_device: Option<String>,
        connect_timeout: Duration,
        storage: Arc<StorageState>,
        metrics: Arc<Metrics>,
    ) -> Connector {
        Connector {
            cluster: name.into(),
            source,
            bind_to_device,
            connect_timeout,
            keepalive: Duration::from_secs(30),
            storage,
            metrics,
            tls: None,
        }
    }

    /// The source new connections would bind when it follows the storage address: pooled
    /// connections from another one are drained.
    pub(super) fn wanted_source(&self) -> Option<IpAddr> {
        match self.source {
            SourceAddress::Storage => self.storage.current().map(|a| a.ip),
            _ => None,
        }
    }

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

    /// [`Connector::connect`], then the TLS handshake when the cluster has TLS (within
    /// `connect_timeout` too, ServerName `tls.peer_name`).
    pub async fn connect_grpc(&self, destination: SocketAddr) -> Result<UpstreamIo, ConnectError> {
        let io = self.connect(destination).await?;
        let Some(tls) = &self.tls else {
            return Ok(Either::Left(io));
        };
        let config = match tls.for_dial(&self.cluster) {
            Ok(Some(config)) => config,
            Ok(None) => return Ok(Either::Left(io)),
            Err(message) => {
                return Err(ConnectError {
                    reason: "tls",
                    message,
                })
            }
        };
        let failed = |message: String| ConnectError {
            reason: "tls",
            message,
        };
        let name = ServerName::try_from(tls.config.peer_name.clone()).map_err(|e| {
            failed(format!(
                "tls.peer_name {:?} is not a server name: {e}",
                tls.config.peer_name
            ))
        })?;
        let handshake = TlsConnector::from(config).connect(name, io);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Ok(stream)) => Ok(Either::Right(Box::new(stream))),
            Ok(Err(e)) => Err(failed(format!("TLS handshake with {destination}: {e}"))),
            Err(_) => Err(failed(format!(
                "TLS handshake with {destination} not done within connect_timeout {}",
                crate::config::format_duration(self.connect_timeout)
            ))),
        }
    }

    pub async fn connect(
        &self,
        destination: SocketAddr,
    ) -> Result<CountedIo<TcpStream>, ConnectError> {
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
