//! The YAML config (Envoy vocabulary), parsed once with every error reported by its path.
//!
//! This module is the model: the types a config becomes, with their defaults. [`parse`] reads
//! YAML into it (one key table per section), [`validate`] checks what spans sections
//! (references, addresses), [`dump`] writes it back for `/config_dump` in the schema operators
//! write.
//!
//! Parsing walks a generic YAML tree instead of deriving `Deserialize`, so that one pass can
//! report *all* mistakes (`listeners[0].routes[2].match: unknown key "prefx"`), not just the first.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use lhnet_netns::Fallback;

pub use crate::addr::Peer;
use crate::addr::{ManagementIp, StorageIp};
use regex::Regex;
use serde::{Serialize, Serializer};
use serde_yaml_ng::{Mapping, Value};

mod dump;
mod parse;
#[cfg(test)]
mod tests;
mod validate;

pub use dump::{format_duration, summary};
use dump::{ser_duration, ser_opt_duration, ser_peers};
pub use parse::{parse_duration, MAX_CONFIG_BYTES, MAX_FLOW_NESTING};

/// The whole configuration file.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub admin: AdminConfig,
    pub storage_network: StorageNetworkConfig,
    pub listeners: Vec<ListenerConfig>,
    pub clusters: Vec<ClusterConfig>,
    /// `peers`: management IP → storage IP of other pods, known without asking them.
    #[serde(serialize_with = "ser_peers")]
    pub peers: Vec<Peer>,
    pub peer_lookup: PeerLookupConfig,
    /// How the backup-target RPCs reach backup targets.
    pub backup_target: BackupTargetConfig,
    /// How long shutdown waits for in-flight streams after GOAWAY.
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
}

/// How lhnet asks a peer pod's lhnet for its storage address (`lhnet.v1.Peer`).
#[derive(Debug, Clone, Serialize)]
pub struct PeerLookupConfig {
    pub enabled: bool,
    /// Management networks lhnet may ask; empty: the subnets of this pod's own
    /// management interfaces.
    pub networks: Vec<Destination>,
    /// The port of the peers' management listener (the one with `local: peer`).
    pub port: u16,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub cache_ttl: Duration,
    /// After a peer did not answer, requests naming it fail at once with that error for this
    /// long instead of each waiting `timeout` again.
    #[serde(serialize_with = "ser_duration")]
    pub failure_ttl: Duration,
    /// `tls:`: lookups use Longhorn's mTLS (the peers' management listener has it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl Default for PeerLookupConfig {
    fn default() -> Self {
        PeerLookupConfig {
            enabled: true,
            networks: Vec::new(),
            port: 8501,
            timeout: Duration::from_secs(1),
            cache_ttl: Duration::from_secs(30),
            failure_ttl: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// `backup_target`: how the backup-target RPCs (BackupVolumeList …) reach targets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackupTargetConfig {
    /// Where `nfs://HOST:/PATH` targets are found or mounted (`<root>/<host>/<path>`).
    pub nfs_mount_root: std::path::PathBuf,
    /// `auto`: mount the export when nothing is mounted there; `existing`: use the directory
    /// as it is.
    pub nfs_mount: lhnet_backupstore::NfsMount,
    /// Calls running at once against one target; more wait for a slot within their timeout.
    pub max_concurrent: usize,
    /// The longest one call may take, waiting for a slot included.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Where a target may make lhnet dial (and the egress listeners connect), as written:
    /// `HOST[:PORTS]`, `*.DOMAIN[:PORTS]`, `CIDR[:PORTS]`. Empty: anywhere but loopback,
    /// link-local and the metadata addresses.
    pub allowed_endpoints: Vec<String>,
    /// Keyless S3 targets may ask the cloud instance metadata service for credentials.
    pub instance_metadata: bool,
    /// The two above, checked and ready.
    #[serde(skip)]
    pub endpoints: std::sync::Arc<lhnet_backupstore::EndpointPolicy>,
}

impl Default for BackupTargetConfig {
    fn default() -> Self {
        BackupTargetConfig {
            nfs_mount_root: lhnet_backupstore::NFS_MOUNT_ROOT.into(),
            nfs_mount: lhnet_backupstore::NfsMount::Auto,
            max_concurrent: 8,
            timeout: Duration::from_secs(60),
            allowed_endpoints: Vec::new(),
            instance_metadata: false,
            endpoints: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Serialize)]
pub struct StorageNetworkConfig {
    pub interface: String,
    /// `<namespace>/<nad>`: the network-status entry to use (matched on name, as Longhorn does).
    pub network: Option<String>,
    pub network_status_file: Option<PathBuf>,
    pub fallback: Fallback,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Where it is in the file (`listeners[0]`), for error messages.
    pub path: String,
    pub name: String,
    pub kind: ListenerKind,
    pub address: ListenAddress,
    /// `kind: tcp`: where accepted connections go (`loopback` or a static cluster).
    pub cluster: Option<String>,
    pub routes: Vec<RouteConfig>,
    /// Largest gRPC message a client may send, in bytes.
    pub max_message_size: usize,
    pub http2: Http2Options,
    pub limits: ListenerLimits,
    /// `tls:` (gRPC listeners): Longhorn's mTLS; absent is plaintext.
    pub tls: Option<TlsConfig>,
    /// `kind: http_connect`: how its upstream connections are made.
    pub egress: Option<EgressConfig>,
}

/// A `kind: http_connect` listener's upstream side: backup traffic out on the storage network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressConfig {
    /// `upstream_bind_config.source_address` (default `storage`).
    #[serde(skip)]
    pub source_address: SourceAddress,
    /// `upstream_bind_config.bind_to_device` (`storage`: the storage interface).
    pub bind_to_device: Option<String>,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Tunnels and forwarded requests open at once at most; more are answered 503.
    pub max_connections: usize,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            source_address: SourceAddress::Storage,
            bind_to_device: None,
            connect_timeout: Duration::from_secs(5),
            max_connections: 256,
        }
    }
}

/// `tls:` of a gRPC listener or a cluster: Longhorn's mTLS (spec §5, `crate::tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A listener: the name a client certificate must carry (DNS SAN or CN). A cluster: the
    /// name the server's certificate must carry.
    pub peer_name: String,
}

/// `tls.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// TLS when the files load, else plaintext with a log line (Longhorn's instance-manager).
    Optional,
    /// TLS only: files that do not load are an error, plaintext clients are refused.
    Required,
    /// Plaintext, whatever the files.
    Off,
}

impl TlsMode {
    /// As the config writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Optional => "optional",
            TlsMode::Required => "required",
            TlsMode::Off => "off",
        }
    }
}

impl Default for TlsConfig {
    /// Longhorn's: the `longhorn-grpc-tls` secret as instance-manager pods mount it.
    fn default() -> Self {
        let dir = Path::new(crate::tls::LONGHORN_TLS_DIR);
        TlsConfig {
            mode: TlsMode::Optional,
            ca: dir.join("ca.crt"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            peer_name: crate::tls::LONGHORN_TLS_NAME.to_string(),
        }
    }
}

/// What one listener grants its clients at most (gRPC listeners). The defaults keep the
/// sidecar inside the 64 MiB the injector gives it whatever clients do: a connection that
/// never speaks costs no HTTP/2 state, one that has spoken costs ~24 KiB, a stream waiting
/// for its body a few KiB.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerLimits {
    /// Open connections at most. At the limit, a new connection takes the place of the oldest
    /// one that has not yet sent a whole request, or else of the longest idle one; when every
    /// connection has a stream in progress, the new one is refused.
    pub max_connections: usize,
    /// Requests in progress on the listener (all connections together) at most; past it a
    /// request is answered RESOURCE_EXHAUSTED naming the limit.
    pub max_requests: usize,
    /// A new connection must send its HTTP/2 preface and first request headers within this.
    #[serde(serialize_with = "ser_duration")]
    pub request_headers_timeout: Duration,
    /// A connection with no stream in progress for this long gets GOAWAY.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// A request whose body has not started after this long is answered DEADLINE_EXCEEDED
    /// (it holds no cluster slot meanwhile: slots are taken when the body starts).
    #[serde(serialize_with = "ser_duration")]
    pub stream_idle_timeout: Duration,
    /// Largest request header block, in KiB (Envoy's `max_request_headers_kb`).
    pub max_request_headers_kb: u32,
    /// A connection with replies waiting for its client, none of which the client has taken
    /// for this long (it grants no HTTP/2 window, or reads nothing), is closed: its calls end
    /// and their cluster slots are freed.
    #[serde(serialize_with = "ser_duration")]
    pub send_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 1024,
            max_requests: 2048,
            request_headers_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            stream_idle_timeout: Duration::from_secs(30),
            max_request_headers_kb: 60,
            send_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// HTTP/2 gRPC with routes.
    Grpc,
    /// L4: each connection forwarded whole to `cluster`.
    Tcp,
    /// An HTTP forward proxy (CONNECT tunnels and absolute-form requests) on loopback whose
    /// upstream connections leave from the storage address: backup uploads and downloads.
    HttpConnect,
}

/// The built-in cluster of `kind: tcp` listeners: 127.0.0.1 and the port the connection came in on.
pub const LOOPBACK_CLUSTER: &str = "loopback";

/// Most ports one `kind: tcp` listener may bind.
pub const MAX_LISTENER_PORTS: usize = 1024;

/// Where a listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenAddress {
    Socket(SocketAddr),
    /// `storage:PORT`: the storage address, whatever it is.
    Storage(u16),
    /// `IP:FIRST-LAST` or `storage:FIRST-LAST` (`ip: None`), one socket per port (`kind: tcp`).
    Range {
        ip: Option<IpAddr>,
        first: u16,
        last: u16,
    },
}

impl ListenAddress {
    /// The fixed IP, or `None` when it is the storage address.
    pub fn fixed_ip(&self) -> Option<IpAddr> {
        match self {
            ListenAddress::Socket(a) => Some(a.ip()),
            ListenAddress::Storage(_) => None,
            ListenAddress::Range { ip, .. } => *ip,
        }
    }

    pub fn ports(&self) -> RangeInclusive<u16> {
        match self {
            ListenAddress::Socket(a) => a.port()..=a.port(),
            ListenAddress::Storage(p) => *p..=*p,
            ListenAddress::Range { first, last, .. } => *first..=*last,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Http2Options {
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
    /// HTTP/2 PING every `interval`; no answer within `timeout` closes the connection. Off
    /// unless set, as in Envoy: hyper then times every frame it reads. Accepted sockets always
    /// have TCP keepalive ([`TCP_KEEPALIVE`]), which finds a vanished peer at no cost per frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_keepalive: Option<Keepalive>,
}

/// TCP keepalive of accepted client connections: first probe after `.0` idle, then every
/// `.1`, closed after `.2` unanswered probes (a vanished peer is found within about a minute).
pub const TCP_KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(30), Duration::from_secs(10), 3);

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Keepalive {
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub path: String,
    /// Metric label; `<listener>/<index>` unless the config names it.
    pub name: String,
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub timeout: Option<Duration>,
    /// `max_stream_duration.grpc_timeout_header_max`: caps the client's `grpc-timeout`.
    pub grpc_timeout_header_max: Option<Duration>,
    pub retry_policy: Option<RetryPolicy>,
    /// For `local: longhorn_engine_proxy`: the original_dst cluster it dials through
    /// (default `engines`).
    pub upstream_cluster: Option<String>,
    /// For `local: longhorn_engine_proxy`: the static cluster (the instance-manager's own proxy)
    /// that gets, byte for byte, every call lhnet does not serve itself: `data_engine` v2, the
    /// SPDKBackingImage calls, RemountReadOnlyVolume, CleanupBackupMountPoints,
    /// BackupRestoreFinish and methods it does not know. Unset: those are UNIMPLEMENTED.
    pub passthrough_cluster: Option<String>,
    /// For `local: longhorn_engine_proxy`: a `kind: http_connect` listener that replicas'
    /// backup and restore credentials get as `HTTPS_PROXY`/`HTTP_PROXY` (unless the caller set
    /// its own), so their transfers leave their pods on the storage network.
    pub backup_egress: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatcher>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Path(String),
    Prefix(String),
    SafeRegex(Regex),
}

#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    pub name: HeaderName,
    pub rule: HeaderRule,
    pub invert_match: bool,
}

#[derive(Debug, Clone)]
pub enum HeaderRule {
    Exact(String),
    Prefix(String),
    SafeRegex(Regex),
    Present(bool),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAction {
    Cluster(String),
    Local(LocalService),
}

/// Services answered inside the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalService {
    Health,
    LonghornEngineProxy,
    /// `lhnet.v1.Peer`: this pod's storage and management addresses, for other lhnets.
    Peer,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    pub retry_on: Vec<RetryOn>,
    pub num_retries: u32,
    #[serde(serialize_with = "ser_opt_duration")]
    pub per_try_timeout: Option<Duration>,
    /// Request bodies up to this size are buffered so they can be replayed; larger ones are
    /// streamed and never retried.
    pub max_buffered_bytes: usize,
}

/// Envoy's `retry_on` tokens that make sense for gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    ConnectFailure,
    RefusedStream,
    Reset,
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub path: String,
    pub name: String,
    pub kind: ClusterKind,
    pub endpoints: Vec<SocketAddr>,
    pub source_address: SourceAddress,
    /// `SO_BINDTODEVICE` on upstream sockets (needs CAP_NET_RAW).
    pub bind_to_device: Option<String>,
    pub allowed_destinations: Vec<Destination>,
    pub allowed_ports: Vec<RangeInclusive<u16>>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub tcp_keepalive: Duration,
    /// `circuit_breakers.max_requests`: concurrent requests before RESOURCE_EXHAUSTED.
    pub max_requests: usize,
    /// `circuit_breakers.max_requests_per_downstream_connection`: how many of those one
    /// client connection may hold (default a quarter), so no one client locks the rest out.
    pub max_requests_per_downstream_connection: usize,
    /// HTTP/2 connections per endpoint at most; a new one opens when every open one carries
    /// `streams_per_connection` requests awaiting their response.
    pub max_connections_per_endpoint: usize,
    pub streams_per_connection: usize,
    /// `tls:`: connections to the endpoints use Longhorn's mTLS; absent is plaintext.
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterKind {
    Static,
    OriginalDst,
}

/// `upstream_bind_config.source_address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAddress {
    Storage,
    Management,
    None,
    Ip(IpAddr),
}

/// An entry of `allowed_destinations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Whatever the storage address's subnet is: the storage address itself and peers on the
    /// same interface's network.
    Storage,
    Cidr {
        network: IpAddr,
        prefix: u8,
    },
}

/// One problem in the file, with the path of the value at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub source: String,
    pub errors: Vec<ConfigError>,
}

pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
const DEFAULT_RETRY_BUFFER: usize = 64 * 1024;

// === impl Config ===

impl Config {
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

// === impl ConfigErrors ===

impl ConfigErrors {
    /// One error about the whole of `source` (it could not be read or parsed at all).
    fn one(source: &str, message: String) -> ConfigErrors {
        ConfigErrors {
            source: source.to_string(),
            errors: vec![ConfigError {
                path: String::new(),
                message,
            }],
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} error(s):", self.source, self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

// === impl ListenAddress, SourceAddress, Destination ===

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Socket(addr) => write!(f, "{addr}"),
            ListenAddress::Storage(port) => write!(f, "storage:{port}"),
            ListenAddress::Range {
                ip: None,
                first,
                last,
            } => write!(f, "storage:{first}-{last}"),
            ListenAddress::Range {
                ip: Some(ip),
                first,
                last,
            } => match ip {
                IpAddr::V4(v4) => write!(f, "{v4}:{first}-{last}"),
                IpAddr::V6(v6) => write!(f, "[{v6}]:{first}-{last}"),
            },
        }
    }
}

impl fmt::Display for SourceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceAddress::Storage => f.write_str("storage"),
            SourceAddress::Management => f.write_str("management"),
            SourceAddress::None => f.write_str("none"),
            SourceAddress::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Storage => f.write_str("storage"),
            Destination::Cidr { network, prefix } => write!(f, "{network}/{prefix}"),
        }
    }
}

impl Destination {
    /// Whether `ip` is inside this CIDR (`Storage` is resolved by the caller).
    pub fn cidr_contains(&self, ip: IpAddr) -> bool {
        match (*self, ip) {
            (
                Destination::Cidr {
                    network: IpAddr::V4(n),
                    prefix,
                },
                IpAddr::V4(ip),
            ) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(ip) & mask
            }
            (
                Destination::Cidr {
                    network: IpAddr::V6(n),
                    prefix,
                },
                IpAddr::V6(ip),
            ) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

macro_rules! display_serialize {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
display_serialize!(ListenAddress, SourceAddress, Destination);

impl Default for Http2Options {
    fn default() -> Self {
        Http2Options {
            max_concurrent_streams: 100,
            initial_stream_window_size: 1 << 20,
            initial_connection_window_size: 4 << 20,
            connection_keepalive: None,
        }
    }
}
