//! The YAML config (Envoy vocabulary), parsed once with every error reported by its path.
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
use regex::Regex;
use serde::{Serialize, Serializer};
use serde_yaml_ng::{Mapping, Value};

/// The whole configuration file.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub admin: AdminConfig,
    pub storage_network: StorageNetworkConfig,
    pub listeners: Vec<ListenerConfig>,
    pub clusters: Vec<ClusterConfig>,
    /// `peers`: management IP → storage IP of other pods, known without asking them.
    #[serde(serialize_with = "ser_peers")]
    pub peers: Vec<(IpAddr, IpAddr)>,
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
}

impl Default for BackupTargetConfig {
    fn default() -> Self {
        BackupTargetConfig {
            nfs_mount_root: lhnet_backupstore::NFS_MOUNT_ROOT.into(),
            nfs_mount: lhnet_backupstore::NfsMount::Auto,
            max_concurrent: 8,
            timeout: Duration::from_secs(60),
        }
    }
}

fn ser_peers<S: Serializer>(peers: &[(IpAddr, IpAddr)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(peers.len()))?;
    for (m, st) in peers {
        map.serialize_entry(&m.to_string(), &st.to_string())?;
    }
    map.end()
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

#[derive(Debug, Clone, Serialize)]
pub struct ListenerConfig {
    /// Where it is in the file (`listeners[0]`), for error messages.
    #[serde(skip)]
    pub path: String,
    pub name: String,
    pub kind: ListenerKind,
    pub address: ListenAddress,
    /// `kind: tcp`: where accepted connections go (`loopback` or a static cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub routes: Vec<RouteConfig>,
    /// Largest gRPC message a client may send, in bytes.
    pub max_message_size: usize,
    #[serde(rename = "http2_protocol_options")]
    pub http2: Http2Options,
    #[serde(flatten)]
    pub limits: ListenerLimits,
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

#[derive(Debug, Clone, Serialize)]
pub struct RouteConfig {
    #[serde(skip)]
    pub path: String,
    /// Metric label; `<listener>/<index>` unless the config names it.
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    #[serde(flatten)]
    pub action: RouteAction,
    #[serde(serialize_with = "ser_opt_duration")]
    pub timeout: Option<Duration>,
    /// `max_stream_duration.grpc_timeout_header_max`: caps the client's `grpc-timeout`.
    #[serde(serialize_with = "ser_opt_duration")]
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
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatcher>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Path(String),
    Prefix(String),
    SafeRegex(#[serde(serialize_with = "ser_regex")] Regex),
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatcher {
    #[serde(serialize_with = "ser_header_name")]
    pub name: HeaderName,
    pub rule: HeaderRule,
    pub invert_match: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderRule {
    Exact(String),
    Prefix(String),
    SafeRegex(#[serde(serialize_with = "ser_regex")] Regex),
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

#[derive(Debug, Clone, Serialize)]
pub struct ClusterConfig {
    #[serde(skip)]
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ClusterKind,
    pub endpoints: Vec<SocketAddr>,
    pub source_address: SourceAddress,
    /// `SO_BINDTODEVICE` on upstream sockets (needs CAP_NET_RAW).
    pub bind_to_device: Option<String>,
    pub allowed_destinations: Vec<Destination>,
    #[serde(serialize_with = "ser_port_ranges")]
    pub allowed_ports: Vec<RangeInclusive<u16>>,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
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
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        use std::io::Read;
        let source = path.display().to_string();
        // At most one byte past the limit is read: a huge file is refused without loading it.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES as u64 + 1).read_to_end(&mut bytes))
            .map_err(|e| ConfigErrors::one(&source, format!("cannot read the file: {e}")))?;
        Config::from_bytes(bytes, &source)
    }

    /// Parses a file's bytes: refused when not UTF-8 (naming the line and column of the first
    /// bad byte), or as [`Config::parse`] refuses the text.
    pub fn from_bytes(bytes: Vec<u8>, source: &str) -> Result<Config, ConfigErrors> {
        let fail = |message| ConfigErrors::one(source, message);
        let text = String::from_utf8(bytes).map_err(|e| {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
            let column =
                good.len() - good.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
            fail(format!(
                "line {line} column {column}: not UTF-8 text (YAML must be UTF-8)"
            ))
        })?;
        Config::parse(&text, source)
    }

    /// Parses YAML text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigErrors> {
        let fail = |message| ConfigErrors::one(source, message);
        if text.len() > MAX_CONFIG_BYTES {
            return Err(fail(format!(
                "the config is {} bytes; the limit is {MAX_CONFIG_BYTES} (a ConfigMap holds 1 MiB): split it or leave out what is not needed",
                text.len()
            )));
        }
        check_nesting(text).map_err(fail)?;
        let mut value: Value = serde_yaml_ng::from_str(text).map_err(|e| {
            // The parser gives most errors a place; alias expansion it cannot place.
            let text_of = e.to_string();
            match (e.location(), first_line_with(text, "*")) {
                (None, Some(line)) if text_of.contains("repetition limit") => fail(format!(
                    "not valid YAML: {text_of}: aliases expand to too many nodes (the first alias is on line {line})"
                )),
                _ => fail(format!("not valid YAML: {text_of}")),
            }
        })?;
        value.apply_merge().map_err(|e| {
            let place = first_line_with(text, "<<")
                .map(|l| format!(" (the first merge key, <<, is on line {l})"))
                .unwrap_or_default();
            fail(format!("bad YAML merge key: {e}{place}"))
        })?;
        let mut cx = Cx::default();
        let config = parse_config(&value, &mut cx);
        match config {
            Some(config) if cx.errors.is_empty() => Ok(config),
            _ => Err(ConfigErrors {
                source: source.to_string(),
                errors: cx.errors,
            }),
        }
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

/// The first line (from 1) where `pattern` starts a key or value, outside comments.
fn first_line_with(text: &str, pattern: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let code = line.split(" #").next().unwrap_or(line);
            code.split([' ', '[', '{', ',', '-'])
                .any(|token| token.starts_with(pattern))
        })
        .map(|i| i + 1)
}

/// Largest config text lhnet reads.
pub const MAX_CONFIG_BYTES: usize = 4 << 20;
/// Deepest `[` / `{` nesting a config may have. The YAML parser takes time quadratic in this
/// depth (40,000 levels: seconds) before its own recursion limit (128) refuses the text, so
/// deeper text is refused first, by this linear scan.
pub const MAX_FLOW_NESTING: usize = 64;

/// Refuses flow collections nested deeper than [`MAX_FLOW_NESTING`], naming the line and
/// column, in one pass over the text. It follows quotes and comments closely enough to count
/// only real indicators: inside a flow collection every bracket outside quotes is one; in
/// block context only a bracket that starts a value is.
fn check_nesting(text: &str) -> Result<(), String> {
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    // The last character that was not a space: decides whether a bracket or quote starts a
    // token (line start counts as a token start).
    let mut prev = b'\n';
    let (mut line, mut column) = (1usize, 0usize);
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        column += 1;
        if b == b'\n' {
            line += 1;
            column = 0;
        }
        if let Some(q) = quote {
            match (q, b) {
                (b'"', b'\\') => {
                    i += 1;
                    column += 1;
                }
                (b'\'', b'\'') if bytes.get(i) == Some(&b'\'') => {
                    i += 1;
                    column += 1;
                }
                _ if b == q => {
                    quote = None;
                    prev = b;
                }
                _ => {}
            }
            continue;
        }
        let token_start = matches!(
            prev,
            b'\n' | b' ' | b'\t' | b'[' | b'{' | b',' | b':' | b'-' | b'?'
        );
        match b {
            b'#' if matches!(prev, b'\n' | b' ' | b'\t') || column == 1 => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' if token_start => quote = Some(b),
            b'[' | b'{' if depth > 0 || token_start => {
                depth += 1;
                if depth > MAX_FLOW_NESTING {
                    return Err(format!(
                        "line {line} column {column}: [ and {{ nested deeper than {MAX_FLOW_NESTING} levels (the limit on config nesting)"
                    ));
                }
            }
            b']' | b'}' if depth > 0 => depth -= 1,
            _ => {}
        }
        if b == b'\n' {
            prev = b'\n';
        } else if b != b' ' && b != b'\t' {
            prev = b;
        } else if prev != b'\n' {
            prev = b' ';
        }
    }
    Ok(())
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

// === parsing ===

#[derive(Default)]
struct Cx {
    errors: Vec<ConfigError>,
}

impl Cx {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            message: message.into(),
        });
    }
}

/// A mapping being read: hands out fields by key and reports the keys nobody asked for.
struct Fields<'a> {
    path: String,
    entries: Vec<(String, &'a Value)>,
    taken: Vec<bool>,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, path: &str, cx: &mut Cx) -> Option<Self> {
        let map: &Mapping = match value {
            Value::Mapping(m) => m,
            other => {
                cx.err(path, format!("expected a mapping, got {}", kind(other)));
                return None;
            }
        };
        let mut entries = Vec::new();
        for (k, v) in map {
            match k {
                Value::String(s) => entries.push((s.clone(), v)),
                other => cx.err(path, format!("keys must be strings, got {}", kind(other))),
            }
        }
        let taken = vec![false; entries.len()];
        Some(Fields {
            path: path.to_string(),
            entries,
            taken,
        })
    }

    fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value under `key` (null counts as absent) and its path.
    fn take(&mut self, key: &str) -> Option<(String, &'a Value)> {
        let idx = self.entries.iter().position(|(k, _)| k == key)?;
        self.taken[idx] = true;
        let value = self.entries[idx].1;
        if value.is_null() {
            return None;
        }
        Some((self.child(key), value))
    }

    fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, v)| k == key && !v.is_null())
    }

    fn required(&mut self, key: &str, cx: &mut Cx) -> Option<(String, &'a Value)> {
        let found = self.take(key);
        if found.is_none() {
            cx.err(&self.path, format!("missing required key \"{key}\""));
        }
        found
    }

    /// Reports every key that was never taken, suggesting the nearest known one.
    fn finish(self, known: &[&str], cx: &mut Cx) {
        for (idx, (key, _)) in self.entries.iter().enumerate() {
            if self.taken[idx] {
                continue;
            }
            let hint = known
                .iter()
                .map(|k| (edit_distance(k, key), *k))
                .filter(|(d, _)| *d <= 2)
                .min()
                .map(|(_, k)| format!(" (did you mean \"{k}\"?)"))
                .unwrap_or_default();
            cx.err(&self.path, format!("unknown key \"{key}\"{hint}"));
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn string(v: &Value, path: &str, cx: &mut Cx) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        other => {
            cx.err(path, format!("expected a string, got {}", kind(other)));
            None
        }
    }
}

fn boolean(v: &Value, path: &str, cx: &mut Cx) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        other => {
            cx.err(path, format!("expected true or false, got {}", kind(other)));
            None
        }
    }
}

fn unsigned(v: &Value, path: &str, max: u64, cx: &mut Cx) -> Option<u64> {
    match v.as_u64() {
        Some(n) if n <= max => Some(n),
        Some(n) => {
            cx.err(path, format!("{n} is too large (at most {max})"));
            None
        }
        None => {
            cx.err(
                path,
                format!("expected a non-negative integer, got {}", kind(v)),
            );
            None
        }
    }
}

fn list<'a>(v: &'a Value, path: &str, cx: &mut Cx) -> Vec<(String, &'a Value)> {
    match v {
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| (format!("{path}[{i}]"), item))
            .collect(),
        other => {
            cx.err(path, format!("expected a list, got {}", kind(other)));
            Vec::new()
        }
    }
}

/// `2s`, `500ms`, `1.5s`, `1m`, `1h`, `250us`; `0` means zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("\"{t}\" has no unit; write it like 2s, 500ms, 1m"))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("\"{t}\" is not a duration; write it like 2s, 500ms, 1m"))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "\"{t}\": unknown unit \"{unit}\" (use us, ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("\"{t}\" is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn duration(v: &Value, path: &str, cx: &mut Cx) -> Option<Duration> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.as_u64() == Some(0) => "0".into(),
        other => {
            cx.err(
                path,
                format!("expected a duration like 2s, got {}", kind(other)),
            );
            return None;
        }
    };
    parse_duration(&text).map_err(|e| cx.err(path, e)).ok()
}

/// An integer from 1 to `max`.
fn positive(v: &Value, path: &str, max: u64, cx: &mut Cx) -> Option<u64> {
    match unsigned(v, path, max, cx)? {
        0 => {
            cx.err(path, "must be at least 1");
            None
        }
        n => Some(n),
    }
}

/// A duration longer than 0.
fn nonzero_duration(v: &Value, path: &str, cx: &mut Cx) -> Option<Duration> {
    match duration(v, path, cx)? {
        d if d.is_zero() => {
            cx.err(path, "must be more than 0");
            None
        }
        d => Some(d),
    }
}

/// Bytes: an integer, or `64Ki`, `4Mi`, `1Gi`.
fn size(v: &Value, path: &str, cx: &mut Cx) -> Option<usize> {
    if let Some(n) = v.as_u64() {
        return usize::try_from(n).ok();
    }
    let Value::String(s) = v else {
        cx.err(path, format!("expected a size like 4Mi, got {}", kind(v)));
        return None;
    };
    let (num, mult) = if let Some(n) = s.strip_suffix("Ki") {
        (n, 1usize << 10)
    } else if let Some(n) = s.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("Gi") {
        (n, 1 << 30)
    } else {
        (s.as_str(), 1)
    };
    match num
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
    {
        Some(n) => Some(n),
        None => {
            cx.err(
                path,
                format!("\"{s}\" is not a size; write bytes or use Ki, Mi, Gi"),
            );
            None
        }
    }
}

fn parse_config(root: &Value, cx: &mut Cx) -> Option<Config> {
    let mut f = Fields::new(root, "", cx)?;

    let admin = match f.take("admin") {
        Some((path, v)) => parse_admin(v, &path, cx),
        None => Some(AdminConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 9901)),
        }),
    };
    let storage_network = match f.take("storage_network") {
        Some((path, v)) => parse_storage_network(v, &path, cx),
        None => Some(StorageNetworkConfig {
            interface: "lhnet1".into(),
            network: None,
            network_status_file: None,
            fallback: Fallback::PodIp,
        }),
    };
    let drain_timeout = match f.take("drain_timeout") {
        Some((path, v)) => duration(v, &path, cx),
        None => Some(Duration::from_secs(30)),
    };
    let clusters: Vec<ClusterConfig> = f
        .take("clusters")
        .map(|(path, v)| {
            list(v, &path, cx)
                .into_iter()
                .filter_map(|(p, item)| parse_cluster(item, &p, cx))
                .collect()
        })
        .unwrap_or_default();
    let listeners: Vec<ListenerConfig> = match f.required("listeners", cx) {
        Some((path, v)) => list(v, &path, cx)
            .into_iter()
            .filter_map(|(p, item)| parse_listener(item, &p, cx))
            .collect(),
        None => Vec::new(),
    };
    let peers = match f.take("peers") {
        Some((p, v)) => parse_peers(v, &p, cx),
        None => Some(Vec::new()),
    };
    let peer_lookup = match f.take("peer_lookup") {
        Some((p, v)) => parse_peer_lookup(v, &p, cx),
        None => Some(PeerLookupConfig::default()),
    };
    let backup_target = match f.take("backup_target") {
        Some((p, v)) => parse_backup_target(v, &p, cx),
        None => Some(BackupTargetConfig::default()),
    };
    f.finish(
        &[
            "admin",
            "storage_network",
            "drain_timeout",
            "listeners",
            "clusters",
            "peers",
            "peer_lookup",
            "backup_target",
        ],
        cx,
    );

    check_references(&listeners, &clusters, cx);
    if let Some(admin) = &admin {
        check_addresses(admin, &listeners, &clusters, cx);
    }
    Some(Config {
        admin: admin?,
        storage_network: storage_network?,
        listeners,
        clusters,
        peers: peers?,
        peer_lookup: peer_lookup?,
        backup_target: backup_target?,
        drain_timeout: drain_timeout?,
    })
}

fn ip_addr(v: &Value, path: &str, cx: &mut Cx) -> Option<IpAddr> {
    let s = string(v, path, cx)?;
    s.parse()
        .map_err(|_| cx.err(path, format!("\"{s}\" is not an IP address")))
        .ok()
}

/// `peers: { MANAGEMENT_IP: STORAGE_IP, ... }`.
fn parse_peers(v: &Value, path: &str, cx: &mut Cx) -> Option<Vec<(IpAddr, IpAddr)>> {
    let Value::Mapping(map) = v else {
        cx.err(
            path,
            format!(
                "expected a mapping of management IP to storage IP, got {}",
                kind(v)
            ),
        );
        return None;
    };
    let mut peers = Vec::new();
    let mut ok = true;
    for (k, val) in map {
        let key_path = format!("{path}.{}", k.as_str().unwrap_or("?"));
        match (ip_addr(k, path, cx), ip_addr(val, &key_path, cx)) {
            (Some(m), Some(st)) if m.is_ipv4() == st.is_ipv4() => peers.push((m, st)),
            (Some(_), Some(_)) => {
                cx.err(
                    &key_path,
                    "management and storage addresses must be the same IP family",
                );
                ok = false;
            }
            _ => ok = false,
        }
    }
    ok.then_some(peers)
}

fn parse_peer_lookup(v: &Value, path: &str, cx: &mut Cx) -> Option<PeerLookupConfig> {
    let mut f = Fields::new(v, path, cx)?;
    let d = PeerLookupConfig::default();
    let enabled = match f.take("enabled") {
        Some((p, v)) => boolean(v, &p, cx),
        None => Some(d.enabled),
    };
    let port = match f.take("port") {
        Some((p, v)) => unsigned(v, &p, u64::from(u16::MAX), cx).map(|n| n as u16),
        None => Some(d.port),
    };
    let timeout = match f.take("timeout") {
        Some((p, v)) => duration(v, &p, cx),
        None => Some(d.timeout),
    };
    let cache_ttl = match f.take("cache_ttl") {
        Some((p, v)) => duration(v, &p, cx),
        None => Some(d.cache_ttl),
    };
    let failure_ttl = match f.take("failure_ttl") {
        Some((p, v)) => duration(v, &p, cx),
        None => Some(d.failure_ttl),
    };
    let networks = match f.take("networks") {
        Some((p, v)) => {
            let mut ok = true;
            let mut out = Vec::new();
            for (ip, item) in list(v, &p, cx) {
                match parse_destination(item, &ip, cx) {
                    Some(d @ Destination::Cidr { .. }) => out.push(d),
                    Some(Destination::Storage) => {
                        cx.err(&ip, "peer lookups go to management networks; name a CIDR");
                        ok = false;
                    }
                    None => ok = false,
                }
            }
            ok.then_some(out)
        }
        None => Some(d.networks.clone()),
    };
    f.finish(
        &[
            "enabled",
            "networks",
            "port",
            "timeout",
            "cache_ttl",
            "failure_ttl",
        ],
        cx,
    );
    Some(PeerLookupConfig {
        enabled: enabled?,
        networks: networks?,
        port: port?,
        timeout: timeout?,
        cache_ttl: cache_ttl?,
        failure_ttl: failure_ttl?,
    })
}

fn parse_backup_target(v: &Value, path: &str, cx: &mut Cx) -> Option<BackupTargetConfig> {
    use lhnet_backupstore::NfsMount;
    let mut f = Fields::new(v, path, cx)?;
    let d = BackupTargetConfig::default();
    let nfs_mount_root = match f.take("nfs_mount_root") {
        Some((p, v)) => string(v, &p, cx).and_then(|s| {
            if s.starts_with('/') {
                Some(std::path::PathBuf::from(s))
            } else {
                cx.err(&p, format!("\"{s}\" is not an absolute directory"));
                None
            }
        }),
        None => Some(d.nfs_mount_root.clone()),
    };
    let nfs_mount = match f.take("nfs_mount") {
        Some((p, v)) => match string(v, &p, cx).as_deref() {
            Some("auto") => Some(NfsMount::Auto),
            Some("existing") => Some(NfsMount::Existing),
            Some(other) => {
                cx.err(&p, format!("\"{other}\" is not auto or existing"));
                None
            }
            None => None,
        },
        None => Some(d.nfs_mount),
    };
    let max_concurrent = match f.take("max_concurrent") {
        Some((p, v)) => unsigned(v, &p, 1024, cx).and_then(|n| {
            if n == 0 {
                cx.err(&p, "must be at least 1");
                None
            } else {
                Some(n as usize)
            }
        }),
        None => Some(d.max_concurrent),
    };
    let timeout = match f.take("timeout") {
        Some((p, v)) => duration(v, &p, cx),
        None => Some(d.timeout),
    };
    f.finish(
        &["nfs_mount_root", "nfs_mount", "max_concurrent", "timeout"],
        cx,
    );
    Some(BackupTargetConfig {
        nfs_mount_root: nfs_mount_root?,
        nfs_mount: nfs_mount?,
        max_concurrent: max_concurrent?,
        timeout: timeout?,
    })
}

fn check_references(listeners: &[ListenerConfig], clusters: &[ClusterConfig], cx: &mut Cx) {
    let mut seen = HashSet::new();
    for c in clusters {
        if !seen.insert(c.name.as_str()) {
            cx.err(
                &format!("{}.name", c.path),
                format!("duplicate cluster name \"{}\"", c.name),
            );
        }
    }
    let mut seen_listeners = HashSet::new();
    for l in listeners {
        if !seen_listeners.insert(l.name.as_str()) {
            cx.err(
                &format!("{}.name", l.path),
                format!("duplicate listener name \"{}\"", l.name),
            );
        }
        if let Some(name) = &l.cluster {
            let path = format!("{}.cluster", l.path);
            match clusters.iter().find(|c| &c.name == name) {
                None if name == LOOPBACK_CLUSTER => {
                    if l.address.fixed_ip().is_some_and(|ip| ip.is_loopback()) {
                        cx.err(
                            &format!("{}.address", l.path),
                            "a loopback address forwarded to cluster loopback would connect to itself",
                        );
                    }
                }
                None => {
                    let known: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
                    cx.err(
                        &path,
                        format!("no cluster named \"{name}\" (clusters: {known:?}; \"{LOOPBACK_CLUSTER}\" is built in)"),
                    )
                }
                Some(c) if c.kind == ClusterKind::OriginalDst => cx.err(
                    &path,
                    format!("cluster \"{name}\" is original_dst; a tcp listener needs loopback or a static cluster"),
                ),
                Some(_) => {}
            }
        }
        for r in &l.routes {
            if r.action == RouteAction::Local(LocalService::LonghornEngineProxy) {
                let name = r.upstream_cluster.as_deref().unwrap_or("engines");
                let path = format!("{}.upstream_cluster", r.path);
                match clusters.iter().find(|c| c.name == name) {
                    None => cx.err(
                        &path,
                        format!("longhorn_engine_proxy dials through cluster \"{name}\", which does not exist; add an original_dst cluster named {name}"),
                    ),
                    Some(c) if c.kind != ClusterKind::OriginalDst => cx.err(
                        &path,
                        format!("cluster \"{name}\" must be type: original_dst for longhorn_engine_proxy"),
                    ),
                    Some(_) => {}
                }
            }
            if r.upstream_cluster.is_some()
                && r.action != RouteAction::Local(LocalService::LonghornEngineProxy)
            {
                cx.err(
                    &format!("{}.upstream_cluster", r.path),
                    "only local: longhorn_engine_proxy routes take upstream_cluster",
                );
            }
            if let Some(name) = &r.passthrough_cluster {
                let path = format!("{}.passthrough_cluster", r.path);
                if r.action != RouteAction::Local(LocalService::LonghornEngineProxy) {
                    cx.err(
                        &path,
                        "only local: longhorn_engine_proxy routes take passthrough_cluster",
                    );
                }
                match clusters.iter().find(|c| &c.name == name) {
                    None => {
                        let known: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
                        cx.err(
                            &path,
                            format!("no cluster named \"{name}\" (clusters: {known:?}); the instance-manager's own proxy is a static cluster at 127.0.0.1:8501"),
                        )
                    }
                    Some(c) if c.kind == ClusterKind::OriginalDst => cx.err(
                        &path,
                        format!("cluster \"{name}\" is original_dst; passthrough needs a static cluster (the instance-manager's proxy, 127.0.0.1:8501)"),
                    ),
                    Some(_) => {}
                }
            }
            let RouteAction::Cluster(name) = &r.action else {
                continue;
            };
            let path = format!("{}.cluster", r.path);
            match clusters.iter().find(|c| &c.name == name) {
                None => {
                    let known: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
                    cx.err(&path, format!("no cluster named \"{name}\" (clusters: {known:?})"))
                }
                Some(c) if c.kind == ClusterKind::OriginalDst => cx.err(
                    &path,
                    format!(
                        "cluster \"{name}\" is original_dst; its destinations come from local services \
                         (longhorn_engine_proxy), so a route cannot forward to it"
                    ),
                ),
                Some(_) => {}
            }
        }
    }
}

/// Whether two binds could take the same socket: their ports meet and their IPs may be one
/// (equal, either the wildcard of the other's family, or both the storage address). A storage
/// address against a fixed one cannot be judged before the storage address is known.
fn binds_meet(a: &ListenAddress, b: &ListenAddress) -> bool {
    let (pa, pb) = (a.ports(), b.ports());
    // Port 0 is a fresh port from the kernel each time: it never collides.
    let ephemeral = |p: &RangeInclusive<u16>| *p == (0..=0);
    if ephemeral(&pa) || ephemeral(&pb) || pa.start() > pb.end() || pb.start() > pa.end() {
        return false;
    }
    match (a.fixed_ip(), b.fixed_ip()) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            x == y
                || (x.is_unspecified() && x.is_ipv4() == y.is_ipv4())
                || (y.is_unspecified() && x.is_ipv4() == y.is_ipv4())
        }
        (Some(x), None) | (None, Some(x)) => x.is_unspecified(),
    }
}

/// Listeners may not share a socket with each other or with the admin server, and nothing
/// lhnet forwards raw bytes for may reach the admin port: `POST /shutdown` trusts loopback
/// peers, and a forward through lhnet arrives from loopback.
fn check_addresses(
    admin: &AdminConfig,
    listeners: &[ListenerConfig],
    clusters: &[ClusterConfig],
    cx: &mut Cx,
) {
    let admin_bind = ListenAddress::Socket(admin.address);
    let admin_local = admin.address.ip().is_loopback() || admin.address.ip().is_unspecified();
    for (i, l) in listeners.iter().enumerate() {
        let path = format!("{}.address", l.path);
        if admin.address.port() != 0 && binds_meet(&l.address, &admin_bind) {
            cx.err(
                &path,
                format!(
                    "{} overlaps the admin address {}; give the listener another port",
                    l.address, admin.address
                ),
            );
        }
        for other in &listeners[..i] {
            if binds_meet(&l.address, &other.address) {
                cx.err(
                    &path,
                    format!(
                        "{} overlaps listener \"{}\" ({}: {}); two listeners cannot share a socket",
                        l.address, other.name, other.path, other.address
                    ),
                );
            }
        }
        if l.kind != ListenerKind::Tcp || !admin_local {
            continue;
        }
        match l.cluster.as_deref() {
            Some(LOOPBACK_CLUSTER) if l.address.ports().contains(&admin.address.port()) => cx.err(
                &path,
                format!(
                    "ports {} cover the admin port {}: cluster loopback would forward callers to the admin server (POST /shutdown); leave that port out",
                    l.address, admin.address.port()
                ),
            ),
            Some(name) => {
                let reaches_admin = clusters.iter().find(|c| c.name == name).is_some_and(|c| {
                    c.endpoints.iter().any(|e| {
                        e.port() == admin.address.port()
                            && (e.ip() == admin.address.ip()
                                || (admin.address.ip().is_unspecified() && e.ip().is_loopback()))
                    })
                });
                if reaches_admin {
                    cx.err(
                        &format!("{}.cluster", l.path),
                        format!("cluster \"{name}\" has the admin address {} as an endpoint; a tcp listener would forward callers to the admin server (POST /shutdown)", admin.address),
                    );
                }
            }
            None => {}
        }
    }
}

fn parse_admin(v: &Value, path: &str, cx: &mut Cx) -> Option<AdminConfig> {
    let mut f = Fields::new(v, path, cx)?;
    let address = f
        .required("address", cx)
        .and_then(|(p, v)| socket_addr(v, &p, cx));
    f.finish(&["address"], cx);
    Some(AdminConfig { address: address? })
}

fn socket_addr(v: &Value, path: &str, cx: &mut Cx) -> Option<SocketAddr> {
    let s = string(v, path, cx)?;
    s.parse()
        .map_err(|_| cx.err(path, format!("\"{s}\" is not an IP:PORT address")))
        .ok()
}

fn parse_storage_network(v: &Value, path: &str, cx: &mut Cx) -> Option<StorageNetworkConfig> {
    let mut f = Fields::new(v, path, cx)?;
    let interface = match f.take("interface") {
        Some((p, v)) => string(v, &p, cx).filter(|s| {
            let ok = !s.is_empty()
                && s.len() <= 15
                && !s.contains('/')
                && !s.contains(char::is_whitespace);
            if !ok {
                cx.err(
                    &p,
                    format!("\"{s}\" is not an interface name (1-15 characters, no '/' or spaces)"),
                );
            }
            ok
        }),
        None => Some("lhnet1".into()),
    };
    let network = f.take("network").and_then(|(p, v)| {
        let s = string(v, &p, cx)?;
        if s.split('/').count() != 2 || s.starts_with('/') || s.ends_with('/') {
            cx.err(
                &p,
                format!("\"{s}\" must be <namespace>/<network-attachment-definition>"),
            );
            return None;
        }
        Some(s)
    });
    let network_status_file = f
        .take("network_status_file")
        .and_then(|(p, v)| string(v, &p, cx))
        .map(PathBuf::from);
    let fallback = match f.take("fallback") {
        Some((p, v)) => match string(v, &p, cx).as_deref() {
            Some("pod_ip") => Some(Fallback::PodIp),
            Some("wait") => Some(Fallback::Wait),
            Some(other) => {
                cx.err(
                    &p,
                    format!("\"{other}\" is not a fallback; use pod_ip or wait"),
                );
                None
            }
            None => None,
        },
        None => Some(Fallback::PodIp),
    };
    f.finish(
        &["interface", "network", "network_status_file", "fallback"],
        cx,
    );
    Some(StorageNetworkConfig {
        interface: interface?,
        network,
        network_status_file,
        fallback: fallback?,
    })
}

fn parse_listen_address(v: &Value, path: &str, tcp: bool, cx: &mut Cx) -> Option<ListenAddress> {
    let s = string(v, path, cx)?;
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, p),
        None => {
            cx.err(path, format!("\"{s}\" is not IP:PORT or storage:PORT"));
            return None;
        }
    };
    let ip = if host == "storage" {
        None
    } else {
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => Some(ip),
            Err(_) => {
                cx.err(path, format!("\"{s}\" is not IP:PORT or storage:PORT"));
                return None;
            }
        }
    };
    if let Some((a, b)) = port.split_once('-') {
        if !tcp {
            cx.err(
                path,
                format!("\"{s}\": port ranges are for kind: tcp listeners"),
            );
            return None;
        }
        let (Ok(first), Ok(last)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>()) else {
            cx.err(
                path,
                format!("\"{s}\": \"{port}\" is not a port range like 10000-10030"),
            );
            return None;
        };
        if first == 0 || first > last {
            cx.err(
                path,
                format!("\"{s}\": the range must go up from a port above 0"),
            );
            return None;
        }
        if usize::from(last - first) >= MAX_LISTENER_PORTS {
            cx.err(
                path,
                format!(
                    "\"{s}\": {} ports; one listener binds at most {MAX_LISTENER_PORTS}",
                    last - first + 1
                ),
            );
            return None;
        }
        return Some(ListenAddress::Range { ip, first, last });
    }
    let Ok(port) = port.parse::<u16>() else {
        cx.err(path, format!("\"{s}\": \"{port}\" is not a port"));
        return None;
    };
    Some(match ip {
        Some(ip) => ListenAddress::Socket(SocketAddr::new(ip, port)),
        None => ListenAddress::Storage(port),
    })
}

fn parse_listener(v: &Value, path: &str, cx: &mut Cx) -> Option<ListenerConfig> {
    let mut f = Fields::new(v, path, cx)?;
    let name = f.required("name", cx).and_then(|(p, v)| string(v, &p, cx));
    let kind = match f.take("kind") {
        Some((p, v)) => match string(v, &p, cx).as_deref() {
            Some("grpc") => Some(ListenerKind::Grpc),
            Some("tcp") => Some(ListenerKind::Tcp),
            Some(other) => {
                cx.err(
                    &p,
                    format!("\"{other}\" is not a listener kind; use grpc or tcp"),
                );
                None
            }
            None => None,
        },
        None => Some(ListenerKind::Grpc),
    };
    let tcp = kind == Some(ListenerKind::Tcp);
    let address = f
        .required("address", cx)
        .and_then(|(p, v)| parse_listen_address(v, &p, tcp, cx));
    if tcp {
        let cluster = f
            .required("cluster", cx)
            .and_then(|(p, v)| string(v, &p, cx));
        let _ = f.take("stat_prefix");
        f.finish(&["name", "kind", "address", "cluster", "stat_prefix"], cx);
        return Some(ListenerConfig {
            path: path.to_string(),
            name: name?,
            kind: ListenerKind::Tcp,
            address: address?,
            cluster: Some(cluster?),
            routes: Vec::new(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            http2: Http2Options::default(),
            limits: ListenerLimits::default(),
        });
    }
    let listener_name = name.clone().unwrap_or_else(|| path.to_string());
    let routes = match f.required("routes", cx) {
        Some((p, v)) => list(v, &p, cx)
            .into_iter()
            .enumerate()
            .filter_map(|(i, (rp, item))| parse_route(item, &rp, &listener_name, i, cx))
            .collect(),
        None => Vec::new(),
    };
    let max_message_size = match f.take("max_message_size") {
        Some((p, v)) => size(v, &p, cx),
        None => Some(DEFAULT_MAX_MESSAGE_SIZE),
    };
    let http2 = match f.take("http2_protocol_options") {
        Some((p, v)) => parse_http2(v, &p, cx),
        None => Some(Http2Options::default()),
    };
    let limits = parse_listener_limits(&mut f, cx);
    // Envoy's stat_prefix is accepted for familiarity; the listener name is the metric label.
    let _ = f.take("stat_prefix");
    let mut known = vec![
        "name",
        "kind",
        "address",
        "routes",
        "max_message_size",
        "http2_protocol_options",
        "stat_prefix",
    ];
    known.extend(LISTENER_LIMIT_KEYS);
    f.finish(&known, cx);
    Some(ListenerConfig {
        path: path.to_string(),
        name: name?,
        kind: kind?,
        address: address?,
        cluster: None,
        routes,
        max_message_size: max_message_size?,
        http2: http2?,
        limits: limits?,
    })
}

/// The listener keys [`parse_listener_limits`] takes: `parse_listener` hands them to
/// `finish`, so "unknown key" and "did you mean" know them.
const LISTENER_LIMIT_KEYS: [&str; 6] = [
    "max_connections",
    "max_requests",
    "request_headers_timeout",
    "idle_timeout",
    "stream_idle_timeout",
    "max_request_headers_kb",
];

fn parse_listener_limits(f: &mut Fields<'_>, cx: &mut Cx) -> Option<ListenerLimits> {
    let mut limits = ListenerLimits::default();
    let mut ok = true;
    for (key, slot) in [
        ("max_connections", &mut limits.max_connections),
        ("max_requests", &mut limits.max_requests),
    ] {
        if let Some((p, v)) = f.take(key) {
            match positive(v, &p, 1 << 20, cx) {
                Some(n) => *slot = n as usize,
                None => ok = false,
            }
        }
    }
    for (key, slot) in [
        (
            "request_headers_timeout",
            &mut limits.request_headers_timeout,
        ),
        ("idle_timeout", &mut limits.idle_timeout),
        ("stream_idle_timeout", &mut limits.stream_idle_timeout),
    ] {
        if let Some((p, v)) = f.take(key) {
            match nonzero_duration(v, &p, cx) {
                Some(d) => *slot = d,
                None => ok = false,
            }
        }
    }
    if let Some((p, v)) = f.take("max_request_headers_kb") {
        match positive(v, &p, 8192, cx) {
            Some(n) => limits.max_request_headers_kb = n as u32,
            None => ok = false,
        }
    }
    ok.then_some(limits)
}

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

fn parse_http2(v: &Value, path: &str, cx: &mut Cx) -> Option<Http2Options> {
    let mut f = Fields::new(v, path, cx)?;
    let mut opts = Http2Options::default();
    let mut ok = true;
    for (key, slot) in [
        ("max_concurrent_streams", &mut opts.max_concurrent_streams),
        (
            "initial_stream_window_size",
            &mut opts.initial_stream_window_size,
        ),
        (
            "initial_connection_window_size",
            &mut opts.initial_connection_window_size,
        ),
    ] {
        if let Some((p, v)) = f.take(key) {
            match unsigned(v, &p, i32::MAX as u64, cx) {
                Some(n) => *slot = n as u32,
                None => ok = false,
            }
        }
    }
    if let Some((p, v)) = f.take("connection_keepalive") {
        match Fields::new(v, &p, cx) {
            Some(mut k) => {
                // Envoy's defaults for what is not given: timeout 20 s; interval required there,
                // 30 s here.
                let keepalive = opts.connection_keepalive.insert(Keepalive {
                    interval: Duration::from_secs(30),
                    timeout: Duration::from_secs(20),
                });
                for (key, slot) in [
                    ("interval", &mut keepalive.interval),
                    ("timeout", &mut keepalive.timeout),
                ] {
                    if let Some((p, v)) = k.take(key) {
                        match nonzero_duration(v, &p, cx) {
                            Some(d) => *slot = d,
                            None => ok = false,
                        }
                    }
                }
                k.finish(&["interval", "timeout"], cx);
            }
            None => ok = false,
        }
    }
    if opts.max_concurrent_streams == 0 {
        cx.err(
            &format!("{path}.max_concurrent_streams"),
            "must be at least 1",
        );
        ok = false;
    }
    f.finish(
        &[
            "max_concurrent_streams",
            "initial_stream_window_size",
            "initial_connection_window_size",
            "connection_keepalive",
        ],
        cx,
    );
    ok.then_some(opts)
}

fn parse_route(
    v: &Value,
    path: &str,
    listener: &str,
    index: usize,
    cx: &mut Cx,
) -> Option<RouteConfig> {
    let mut f = Fields::new(v, path, cx)?;
    let name = f
        .take("name")
        .and_then(|(p, v)| string(v, &p, cx))
        .unwrap_or_else(|| format!("{listener}/{index}"));
    let matcher = f
        .required("match", cx)
        .and_then(|(p, v)| parse_match(v, &p, cx));
    let action = match (f.take("cluster"), f.take("local")) {
        (Some((p, v)), None) => string(v, &p, cx).map(RouteAction::Cluster),
        (None, Some((p, v))) => match string(v, &p, cx).as_deref() {
            Some("health") => Some(RouteAction::Local(LocalService::Health)),
            Some("peer") => Some(RouteAction::Local(LocalService::Peer)),
            Some("longhorn_engine_proxy") => {
                Some(RouteAction::Local(LocalService::LonghornEngineProxy))
            }
            Some(other) => {
                cx.err(
                    &p,
                    format!("\"{other}\" is not a local service; use health, longhorn_engine_proxy or peer"),
                );
                None
            }
            None => None,
        },
        (Some(_), Some(_)) => {
            cx.err(
                path,
                "a route has either \"cluster\" or \"local\", not both",
            );
            None
        }
        (None, None) => {
            cx.err(
                path,
                "a route needs \"cluster: NAME\" or \"local: SERVICE\"",
            );
            None
        }
    };
    let timeout = f
        .take("timeout")
        .and_then(|(p, v)| duration(v, &p, cx))
        .filter(|d| !d.is_zero());
    let grpc_timeout_header_max = f.take("max_stream_duration").and_then(|(p, v)| {
        let mut m = Fields::new(v, &p, cx)?;
        let max = m
            .take("grpc_timeout_header_max")
            .and_then(|(p, v)| duration(v, &p, cx))
            .filter(|d| !d.is_zero());
        m.finish(&["grpc_timeout_header_max"], cx);
        max
    });
    let retry_policy = f
        .take("retry_policy")
        .and_then(|(p, v)| parse_retry(v, &p, cx));
    let upstream_cluster = f
        .take("upstream_cluster")
        .and_then(|(p, v)| string(v, &p, cx));
    let passthrough_cluster = f
        .take("passthrough_cluster")
        .and_then(|(p, v)| string(v, &p, cx));
    f.finish(
        &[
            "name",
            "match",
            "cluster",
            "local",
            "timeout",
            "max_stream_duration",
            "retry_policy",
            "upstream_cluster",
            "passthrough_cluster",
        ],
        cx,
    );
    Some(RouteConfig {
        path: path.to_string(),
        name,
        matcher: matcher?,
        action: action?,
        timeout,
        grpc_timeout_header_max,
        retry_policy,
        upstream_cluster,
        passthrough_cluster,
    })
}

fn regex(v: &Value, path: &str, cx: &mut Cx) -> Option<Regex> {
    // Envoy writes `safe_regex: { regex: "..." }`; a bare string is accepted too.
    let (text, p) = match v {
        Value::Mapping(_) => {
            let mut f = Fields::new(v, path, cx)?;
            let r = f
                .required("regex", cx)
                .and_then(|(p, v)| string(v, &p, cx).map(|s| (s, p)));
            f.finish(&["regex"], cx);
            r?
        }
        other => (string(other, path, cx)?, path.to_string()),
    };
    // Anchored like Envoy: the whole value must match.
    Regex::new(&format!("^(?:{text})$"))
        .map_err(|e| cx.err(&p, format!("bad regex: {e}")))
        .ok()
}

fn parse_match(v: &Value, path: &str, cx: &mut Cx) -> Option<RouteMatch> {
    let mut f = Fields::new(v, path, cx)?;
    let specifiers = ["path", "prefix", "safe_regex"];
    let given: Vec<&str> = specifiers.iter().copied().filter(|k| f.has(k)).collect();
    if given.len() > 1 {
        cx.err(
            path,
            format!(
                "use one of path, prefix, safe_regex (found {})",
                given.join(", ")
            ),
        );
    }
    let route_path = |s: String, p: &str, cx: &mut Cx| {
        if s.starts_with('/') {
            Some(s)
        } else {
            cx.err(
                p,
                format!(
                    "\"{s}\" must start with '/' (gRPC paths look like /package.Service/Method)"
                ),
            );
            None
        }
    };
    let mut path_match = None;
    if let Some((p, v)) = f.take("path") {
        path_match = string(v, &p, cx)
            .and_then(|s| route_path(s, &p, cx))
            .map(PathMatch::Path);
    }
    if let Some((p, v)) = f.take("prefix") {
        path_match = string(v, &p, cx)
            .and_then(|s| route_path(s, &p, cx))
            .map(PathMatch::Prefix);
    }
    if let Some((p, v)) = f.take("safe_regex") {
        path_match = regex(v, &p, cx).map(PathMatch::SafeRegex);
    }
    if given.is_empty() {
        cx.err(
            path,
            "missing path, prefix or safe_regex (use prefix: / to match everything)",
        );
    }
    let headers = f
        .take("headers")
        .map(|(p, v)| {
            list(v, &p, cx)
                .into_iter()
                .filter_map(|(hp, item)| parse_header_matcher(item, &hp, cx))
                .collect()
        })
        .unwrap_or_default();
    // Envoy's `grpc: {}` matcher: every request on a gRPC listener is gRPC, so it always holds.
    let _ = f.take("grpc");
    f.finish(&["path", "prefix", "safe_regex", "headers", "grpc"], cx);
    Some(RouteMatch {
        path: path_match?,
        headers,
    })
}

fn parse_header_matcher(v: &Value, path: &str, cx: &mut Cx) -> Option<HeaderMatcher> {
    let mut f = Fields::new(v, path, cx)?;
    let name = f.required("name", cx).and_then(|(p, v)| {
        let s = string(v, &p, cx)?;
        HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
            .map_err(|_| cx.err(&p, format!("\"{s}\" is not a header name")))
            .ok()
    });
    let mut rules = Vec::new();
    if let Some((p, v)) = f.take("exact_match").or_else(|| f.take("exact")) {
        rules.push(string(v, &p, cx).map(HeaderRule::Exact));
    }
    if let Some((p, v)) = f.take("prefix_match").or_else(|| f.take("prefix")) {
        rules.push(string(v, &p, cx).map(HeaderRule::Prefix));
    }
    if let Some((p, v)) = f.take("safe_regex_match").or_else(|| f.take("safe_regex")) {
        rules.push(regex(v, &p, cx).map(HeaderRule::SafeRegex));
    }
    if let Some((p, v)) = f.take("present_match") {
        rules.push(boolean(v, &p, cx).map(HeaderRule::Present));
    }
    let invert_match = f
        .take("invert_match")
        .and_then(|(p, v)| boolean(v, &p, cx))
        .unwrap_or(false);
    f.finish(
        &[
            "name",
            "exact_match",
            "exact",
            "prefix_match",
            "prefix",
            "safe_regex_match",
            "safe_regex",
            "present_match",
            "invert_match",
        ],
        cx,
    );
    let rule = match rules.len() {
        0 => Some(HeaderRule::Present(true)),
        1 => rules.pop().flatten(),
        _ => {
            cx.err(
                path,
                "use one of exact_match, prefix_match, safe_regex_match, present_match",
            );
            None
        }
    };
    Some(HeaderMatcher {
        name: name?,
        rule: rule?,
        invert_match,
    })
}

fn parse_retry(v: &Value, path: &str, cx: &mut Cx) -> Option<RetryPolicy> {
    let mut f = Fields::new(v, path, cx)?;
    let retry_on = match f.required("retry_on", cx) {
        Some((p, v)) => {
            // Envoy writes a comma-separated string; a YAML list is accepted too.
            let tokens: Vec<(String, String)> = match v {
                Value::String(s) => s
                    .split(',')
                    .map(|t| (t.trim().to_string(), p.clone()))
                    .collect(),
                _ => list(v, &p, cx)
                    .into_iter()
                    .filter_map(|(ip, item)| string(item, &ip, cx).map(|s| (s, ip)))
                    .collect(),
            };
            let mut out = Vec::new();
            for (token, tp) in tokens {
                let parsed = match token.as_str() {
                    "connect-failure" => RetryOn::ConnectFailure,
                    "refused-stream" => RetryOn::RefusedStream,
                    "reset" => RetryOn::Reset,
                    "cancelled" => RetryOn::Cancelled,
                    "deadline-exceeded" => RetryOn::DeadlineExceeded,
                    "internal" => RetryOn::Internal,
                    "resource-exhausted" => RetryOn::ResourceExhausted,
                    "unavailable" => RetryOn::Unavailable,
                    other => {
                        cx.err(
                            &tp,
                            format!(
                                "\"{other}\" is not a retry_on token; use connect-failure, refused-stream, \
                                 reset, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable"
                            ),
                        );
                        continue;
                    }
                };
                out.push(parsed);
            }
            Some(out)
        }
        None => None,
    };
    let num_retries = match f.take("num_retries") {
        Some((p, v)) => unsigned(v, &p, 10, cx).map(|n| n as u32),
        None => Some(1),
    };
    let per_try_timeout = f
        .take("per_try_timeout")
        .and_then(|(p, v)| duration(v, &p, cx))
        .filter(|d| !d.is_zero());
    let max_buffered_bytes = match f.take("max_buffered_bytes") {
        Some((p, v)) => size(v, &p, cx),
        None => Some(DEFAULT_RETRY_BUFFER),
    };
    f.finish(
        &[
            "retry_on",
            "num_retries",
            "per_try_timeout",
            "max_buffered_bytes",
        ],
        cx,
    );
    Some(RetryPolicy {
        retry_on: retry_on?,
        num_retries: num_retries?,
        per_try_timeout,
        max_buffered_bytes: max_buffered_bytes?,
    })
}

fn parse_cluster(v: &Value, path: &str, cx: &mut Cx) -> Option<ClusterConfig> {
    let mut f = Fields::new(v, path, cx)?;
    let name = f.required("name", cx).and_then(|(p, v)| string(v, &p, cx));
    let kind = match f.take("type") {
        Some((p, v)) => match string(v, &p, cx).map(|s| s.to_ascii_lowercase()).as_deref() {
            Some("static") => Some(ClusterKind::Static),
            Some("original_dst") => Some(ClusterKind::OriginalDst),
            Some(other) => {
                cx.err(
                    &p,
                    format!("\"{other}\" is not a cluster type; use static or original_dst"),
                );
                None
            }
            None => None,
        },
        None => Some(ClusterKind::Static),
    };
    let endpoints: Vec<SocketAddr> = f
        .take("endpoints")
        .map(|(p, v)| {
            list(v, &p, cx)
                .into_iter()
                .filter_map(|(ep, item)| socket_addr(item, &ep, cx))
                .collect()
        })
        .unwrap_or_default();
    match kind {
        Some(ClusterKind::Static) if endpoints.is_empty() && !f.has("endpoints") => {
            cx.err(path, "a static cluster needs endpoints: [IP:PORT, ...]")
        }
        Some(ClusterKind::OriginalDst) if !endpoints.is_empty() => cx.err(
            &f.child("endpoints"),
            "an original_dst cluster takes its destination from each request; remove endpoints",
        ),
        _ => {}
    }
    let (source_address, bind_to_device) = match f.take("upstream_bind_config") {
        Some((p, v)) => parse_bind(v, &p, cx)?,
        None => (SourceAddress::Storage, None),
    };
    let allowed_destinations = f
        .take("allowed_destinations")
        .map(|(p, v)| {
            list(v, &p, cx)
                .into_iter()
                .filter_map(|(dp, item)| parse_destination(item, &dp, cx))
                .collect()
        })
        .unwrap_or_default();
    let allowed_ports = f
        .take("allowed_ports")
        .map(|(p, v)| {
            list(v, &p, cx)
                .into_iter()
                .filter_map(|(pp, item)| parse_port_range(item, &pp, cx))
                .collect()
        })
        .unwrap_or_default();
    let mut timeouts = [
        Duration::from_secs(5),
        Duration::from_secs(90),
        Duration::from_secs(30),
    ];
    for (i, key) in ["connect_timeout", "idle_timeout", "tcp_keepalive"]
        .iter()
        .enumerate()
    {
        if let Some((p, v)) = f.take(key) {
            if let Some(d) = duration(v, &p, cx) {
                timeouts[i] = d;
            }
        }
    }
    let (max_requests, per_connection) = f
        .take("circuit_breakers")
        .and_then(|(p, v)| {
            let mut cb = Fields::new(v, &p, cx)?;
            let mut take = |key: &str, cx: &mut Cx| {
                cb.take(key)
                    .and_then(|(p, v)| positive(v, &p, 1 << 20, cx))
                    .map(|n| n as usize)
            };
            let n = take("max_requests", cx);
            let per = take("max_requests_per_downstream_connection", cx);
            cb.finish(
                &["max_requests", "max_requests_per_downstream_connection"],
                cx,
            );
            Some((n, per))
        })
        .unwrap_or((None, None));
    let max_requests = max_requests.unwrap_or(1024);
    let max_requests_per_downstream_connection = per_connection
        .unwrap_or(max_requests / 4)
        .clamp(1, max_requests);
    let mut pool = [4usize, 16];
    for (i, key) in ["max_connections_per_endpoint", "streams_per_connection"]
        .iter()
        .enumerate()
    {
        if let Some((p, v)) = f.take(key) {
            match unsigned(v, &p, 1 << 16, cx) {
                Some(0) => cx.err(&p, "must be at least 1"),
                Some(n) => pool[i] = n as usize,
                None => {}
            }
        }
    }
    // Envoy's protocol options: lhnet is HTTP/2 upstream only, so the key is accepted and ignored.
    let _ = f.take("typed_extension_protocol_options");
    f.finish(
        &[
            "name",
            "type",
            "endpoints",
            "upstream_bind_config",
            "allowed_destinations",
            "allowed_ports",
            "connect_timeout",
            "idle_timeout",
            "tcp_keepalive",
            "circuit_breakers",
            "typed_extension_protocol_options",
        ],
        cx,
    );
    Some(ClusterConfig {
        path: path.to_string(),
        name: name?,
        kind: kind?,
        endpoints,
        source_address,
        bind_to_device,
        allowed_destinations,
        allowed_ports,
        connect_timeout: timeouts[0],
        idle_timeout: timeouts[1],
        tcp_keepalive: timeouts[2],
        max_requests,
        max_requests_per_downstream_connection,
        max_connections_per_endpoint: pool[0],
        streams_per_connection: pool[1],
    })
}

fn parse_bind(v: &Value, path: &str, cx: &mut Cx) -> Option<(SourceAddress, Option<String>)> {
    let mut f = Fields::new(v, path, cx)?;
    let source = match f.take("source_address") {
        Some((p, v)) => {
            // Envoy writes `source_address: { address: IP, port_value: 0 }`; a string is the short form.
            let text = match v {
                Value::Mapping(_) => {
                    let mut sf = Fields::new(v, &p, cx)?;
                    let a = sf
                        .required("address", cx)
                        .and_then(|(p, v)| string(v, &p, cx));
                    let _ = sf.take("port_value");
                    sf.finish(&["address", "port_value"], cx);
                    a
                }
                other => string(other, &p, cx),
            };
            match text.as_deref() {
                Some("storage") => Some(SourceAddress::Storage),
                Some("management") => Some(SourceAddress::Management),
                Some("none") => Some(SourceAddress::None),
                Some(other) => match other.parse::<IpAddr>() {
                    Ok(ip) => Some(SourceAddress::Ip(ip)),
                    Err(_) => {
                        cx.err(
                            &p,
                            format!(
                                "\"{other}\" is not storage, management, none or an IP address"
                            ),
                        );
                        None
                    }
                },
                None => None,
            }
        }
        None => Some(SourceAddress::Storage),
    };
    let device = f.take("bind_to_device").and_then(|(p, v)| match v {
        Value::Bool(false) => None,
        Value::Bool(true) => Some("storage".to_string()),
        other => string(other, &p, cx),
    });
    f.finish(&["source_address", "bind_to_device"], cx);
    Some((source?, device))
}

fn parse_destination(v: &Value, path: &str, cx: &mut Cx) -> Option<Destination> {
    let s = string(v, path, cx)?;
    if s == "storage" {
        return Some(Destination::Storage);
    }
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, prefix)) => (ip, prefix.parse::<u8>().ok()),
        None => (s.as_str(), None),
    };
    let Ok(network) = ip.parse::<IpAddr>() else {
        cx.err(
            path,
            format!("\"{s}\" is not storage, an IP or a CIDR like 10.30.0.0/16"),
        );
        return None;
    };
    let max = if network.is_ipv4() { 32 } else { 128 };
    let prefix = match (s.contains('/'), prefix) {
        (false, _) => max,
        (true, Some(p)) if p <= max => p,
        _ => {
            cx.err(path, format!("\"{s}\": bad prefix length (0-{max})"));
            return None;
        }
    };
    Some(Destination::Cidr { network, prefix })
}

fn parse_port_range(v: &Value, path: &str, cx: &mut Cx) -> Option<RangeInclusive<u16>> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => {
            cx.err(
                path,
                format!(
                    "expected a port or range like 10000-30000, got {}",
                    kind(other)
                ),
            );
            return None;
        }
    };
    let (lo, hi) = text.split_once('-').unwrap_or((&text, &text));
    match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
        (Ok(lo), Ok(hi)) if lo <= hi && lo > 0 => Some(lo..=hi),
        _ => {
            cx.err(
                path,
                format!("\"{text}\" is not a port or a range like 10000-30000"),
            );
            None
        }
    }
}

// === serialization helpers (for /config_dump) ===

pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format_duration(*d)),
        None => s.serialize_none(),
    }
}

fn ser_regex<S: Serializer>(r: &Regex, s: S) -> Result<S::Ok, S::Error> {
    let text = r.as_str();
    s.serialize_str(
        text.strip_prefix("^(?:")
            .and_then(|t| t.strip_suffix(")$"))
            .unwrap_or(text),
    )
}

fn ser_header_name<S: Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(h.as_str())
}

fn ser_port_ranges<S: Serializer>(r: &[RangeInclusive<u16>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(r.iter().map(|r| format!("{}-{}", r.start(), r.end())))
}

/// A summary of config values for log lines and `/config_dump`.
pub fn summary(config: &Config) -> BTreeMap<&'static str, usize> {
    BTreeMap::from([
        ("listeners", config.listeners.len()),
        (
            "routes",
            config.listeners.iter().map(|l| l.routes.len()).sum(),
        ),
        ("clusters", config.clusters.len()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
admin:
  address: 127.0.0.1:9901
storage_network:
  interface: lhnet1
  network: kube-system/demo-10-30-0-0
  network_status_file: /etc/podinfo/annotations
  fallback: pod_ip
listeners:
  - name: management
    address: 0.0.0.0:8501
    kind: grpc
    routes:
      - match: { prefix: /imrpc.ProxyEngineService/ }
        local: longhorn_engine_proxy
      - match: { prefix: /ProcessManagerService/ }
        cluster: instance_manager
        retry_policy: { retry_on: "connect-failure,unavailable", num_retries: 2, per_try_timeout: 1s }
      - match:
          safe_regex: { regex: "/grpc\\.health\\.v1\\.Health/.*" }
          headers: [{ name: x-lhnet, exact_match: "1", invert_match: true }]
        local: health
        timeout: 10s
        max_stream_duration: { grpc_timeout_header_max: 30s }
clusters:
  - name: engines
    type: original_dst
    upstream_bind_config: { source_address: storage }
    allowed_destinations: [storage, 127.0.0.0/8]
    allowed_ports: [9500-9599, 10000-30000]
    connect_timeout: 2s
  - name: instance_manager
    type: static
    endpoints: [127.0.0.1:8500]
    upstream_bind_config: { source_address: none }
"#;

    #[test]
    fn parses_the_design_example() {
        let c = Config::parse(EXAMPLE, "example").unwrap();
        assert_eq!(c.listeners.len(), 1);
        let routes = &c.listeners[0].routes;
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[0].name, "management/0");
        assert_eq!(
            routes[0].action,
            RouteAction::Local(LocalService::LonghornEngineProxy)
        );
        assert_eq!(
            routes[1].action,
            RouteAction::Cluster("instance_manager".into())
        );
        let retry = routes[1].retry_policy.as_ref().unwrap();
        assert_eq!(
            retry.retry_on,
            vec![RetryOn::ConnectFailure, RetryOn::Unavailable]
        );
        assert_eq!(
            (retry.num_retries, retry.per_try_timeout),
            (2, Some(Duration::from_secs(1)))
        );
        assert_eq!(routes[2].timeout, Some(Duration::from_secs(10)));
        assert_eq!(
            routes[2].grpc_timeout_header_max,
            Some(Duration::from_secs(30))
        );
        let engines = c.cluster("engines").unwrap();
        assert_eq!(engines.kind, ClusterKind::OriginalDst);
        assert_eq!(engines.allowed_ports, vec![9500..=9599, 10000..=30000]);
        assert!(engines.allowed_destinations[1].cidr_contains("127.1.2.3".parse().unwrap()));
        assert!(!engines.allowed_destinations[1].cidr_contains("10.0.0.1".parse().unwrap()));
        assert_eq!(
            c.cluster("instance_manager").unwrap().source_address,
            SourceAddress::None
        );
        assert_eq!(c.storage_network.fallback, Fallback::PodIp);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        // The dump is valid JSON and keeps the Envoy names.
        let dump = serde_json::to_value(&c).unwrap();
        assert_eq!(
            dump["listeners"][0]["routes"][2]["match"]["path"]["safe_regex"],
            "/grpc\\.health\\.v1\\.Health/.*"
        );
        assert_eq!(dump["clusters"][0]["allowed_destinations"][0], "storage");
    }

    #[test]
    fn reports_all_five_mistakes_with_paths() {
        let bad = r#"
admin: { address: "localhost" }
listeners:
  - name: management
    address: 0.0.0.0:8501
    routes:
      - match: { prefx: /imrpc.ProxyEngineService/ }
        local: longhorn_engine_proxy
      - match: { prefix: /ProcessManagerService/ }
        cluster: instance_manger
        timeout: 5 seconds
clusters:
  - name: instance_manager
    endpoints: [127.0.0.1:8500]
    connect_timeout: 2s
    upstream_bind_config: { source_address: lhnet9 }
"#;
        let errs = Config::parse(bad, "bad.yaml").unwrap_err();
        let text: Vec<String> = errs.errors.iter().map(|e| e.to_string()).collect();
        let expect = [
            "admin.address: \"localhost\" is not an IP:PORT address",
            "listeners[0].routes[0].match: unknown key \"prefx\" (did you mean \"prefix\"?)",
            "listeners[0].routes[1].cluster: no cluster named \"instance_manger\"",
            "listeners[0].routes[1].timeout: \"5 seconds\"",
            "clusters[0].upstream_bind_config.source_address: \"lhnet9\" is not storage",
        ];
        for e in expect {
            assert!(
                text.iter().any(|t| t.starts_with(e)),
                "missing {e:?} in {text:#?}"
            );
        }
        assert!(errs.to_string().starts_with("bad.yaml: "), "{errs}");
    }

    #[test]
    fn tcp_listeners_parse_and_bad_ones_are_named() {
        let good = r#"
listeners:
  - { name: data, kind: tcp, address: "storage:10000-10030", cluster: loopback }
  - { name: one, kind: tcp, address: "10.30.0.5:9502", cluster: loopback }
  - { name: fwd, kind: tcp, address: "127.0.0.1:0", cluster: local }
clusters: [{ name: local, type: static, endpoints: [127.0.0.1:7000] }]
"#;
        let c = Config::parse(good, "x").unwrap();
        assert_eq!(c.listeners[0].kind, ListenerKind::Tcp);
        assert_eq!(c.listeners[0].address.to_string(), "storage:10000-10030");
        assert_eq!(c.listeners[0].address.ports().count(), 31);
        assert_eq!(c.listeners[0].address.fixed_ip(), None);
        assert_eq!(c.listeners[1].address.to_string(), "10.30.0.5:9502");

        let bad = r#"
listeners:
  - { name: data, kind: tcp, address: "storage:10030-10000", routes: [] }
  - name: m
    address: 127.0.0.1:9000-9001
    routes: [{ match: { prefix: / }, cluster: engines }]
  - { name: t, kind: tcp, address: "127.0.0.1:7000", cluster: loopback }
  - { name: u, kind: tcp, address: "storage:7000", cluster: engines }
  - { name: v, kind: udp, address: "storage:7000" }
clusters: [{ name: engines, type: original_dst }]
"#;
        let text = Config::parse(bad, "x").unwrap_err().to_string();
        for want in [
            "listeners[0].address: \"storage:10030-10000\": the range must go up",
            "listeners[0]: missing required key \"cluster\"",
            "listeners[0]: unknown key \"routes\"",
            "listeners[1].address: \"127.0.0.1:9000-9001\": port ranges are for kind: tcp",
            "listeners[2].address: a loopback address forwarded to cluster loopback",
            "listeners[3].cluster: cluster \"engines\" is original_dst",
            "listeners[4].kind: \"udp\" is not a listener kind",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_at_once_with_its_place() {
        let deep = format!("listeners: {}{}\n", "[".repeat(40_000), "]".repeat(40_000));
        // The scan's words, not the parser's "recursion limit exceeded": the parser never ran.
        let text = Config::parse(&deep, "deep.yaml").unwrap_err().to_string();
        assert!(
            text.contains("line 1 column 76: [ and { nested deeper than 64 levels"),
            "{text}"
        );
        // Mappings count too (the parser's own error would also name a line: the scan's words).
        let mapping = format!("x: {}1{}\n", "{a: ".repeat(100), "}".repeat(100));
        let text = Config::parse(&mapping, "x").unwrap_err().to_string();
        assert!(text.contains("nested deeper than 64 levels"), "{text}");
        // Brackets inside quotes, comments and plain scalars are not nesting.
        let fine = format!(
            "# {}\nlisteners:\n  - name: \"{}\"\n    address: 127.0.0.1:0 # {}\n    routes:\n      - match: {{ safe_regex: '^/a{}$' }}\n        local: health\n",
            "[".repeat(100),
            "{".repeat(100),
            "[".repeat(100),
            "[x]".repeat(100)
        );
        Config::parse(&fine, "fine").unwrap();
        let dir = std::env::temp_dir().join(format!("lhnet-utf8-{}", std::process::id()));
        std::fs::write(&dir, b"listeners: []\nadmin:\n  address: \"1\xff\"\n").unwrap();
        let text = Config::load(&dir).unwrap_err().to_string();
        let _ = std::fs::remove_file(&dir);
        assert!(text.contains("line 3 column 14: not UTF-8"), "{text}");
        let mut laughs = vec!["a0: &a0 [x, x, x, x, x, x, x, x, x, x]".to_string()];
        for i in 1..9 {
            laughs.push(format!(
                "a{i}: &a{i} [{}]",
                vec![format!("*a{}", i - 1); 10].join(", ")
            ));
        }
        laughs.push("listeners: *a8".into());
        let text = Config::parse(&laughs.join("\n"), "x")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("repetition limit") && text.contains("on line 2"),
            "{text}"
        );
        let merge = "listeners:\n  # a comment\n  - <<: 5\n    name: x\n";
        let text = Config::parse(merge, "x").unwrap_err().to_string();
        assert!(
            text.contains("bad YAML merge key") && text.contains("on line 3"),
            "{text}"
        );
        let big = format!("listeners: []\n#{}\n", "x".repeat(MAX_CONFIG_BYTES));
        assert!(Config::parse(&big, "big")
            .unwrap_err()
            .to_string()
            .contains("the limit is"));
    }

    #[test]
    fn listeners_cannot_share_a_socket_or_reach_the_admin_port() {
        let bad = r#"
admin: { address: 127.0.0.1:9901 }
listeners:
  - { name: a, address: 0.0.0.0:8501, routes: [] }
  - { name: b, address: 10.0.0.5:8501, routes: [] }
  - { name: data, kind: tcp, address: "storage:9000-9999", cluster: loopback }
  - { name: c, address: 127.0.0.1:9901, routes: [] }
  - { name: d, kind: tcp, address: "10.0.0.5:7000", cluster: adm }
  - { name: e, address: "storage:9500", routes: [] }
clusters: [{ name: adm, type: static, endpoints: [127.0.0.1:9901] }]
"#;
        let text = Config::parse(bad, "x").unwrap_err().to_string();
        for want in [
            "listeners[1].address: 10.0.0.5:8501 overlaps listener \"a\" (listeners[0]: 0.0.0.0:8501)",
            "listeners[2].address: ports storage:9000-9999 cover the admin port 9901",
            "listeners[3].address: 127.0.0.1:9901 overlaps the admin address 127.0.0.1:9901",
            "listeners[4].cluster: cluster \"adm\" has the admin address 127.0.0.1:9901 as an endpoint",
            "listeners[5].address: storage:9500 overlaps listener \"data\"",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Different ports, different fixed IPs, and port 0 (a fresh port each time) are fine.
        let good = r#"
admin: { address: 127.0.0.1:9901 }
listeners:
  - { name: a, address: 10.0.0.5:8501, routes: [] }
  - { name: b, address: 10.0.0.6:8501, routes: [] }
  - { name: c, address: 127.0.0.1:0, routes: [] }
  - { name: d, address: 127.0.0.1:0, routes: [] }
  - { name: data, kind: tcp, address: "storage:10000-10030", cluster: loopback }
"#;
        Config::parse(good, "x").unwrap();
    }

    #[test]
    fn passthrough_cluster_is_a_static_cluster_on_an_engine_proxy_route() {
        let clusters = "clusters:\n  - { name: engines, type: original_dst }\n  - { name: im, type: static, endpoints: [127.0.0.1:8501] }\n";
        let route = |extra: &str| {
            format!(
                "listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n      - {{ match: {{ prefix: / }}, local: longhorn_engine_proxy, {extra} }}\n      - {{ match: {{ prefix: /h }}, local: health, passthrough_cluster: im }}\n{clusters}"
            )
        };
        let text = Config::parse(&route("passthrough_cluster: im"), "x")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("listeners[0].routes[1].passthrough_cluster: only local: longhorn_engine_proxy routes take passthrough_cluster"),
            "{text}"
        );
        for (extra, want) in [
            (
                "passthrough_cluster: nope",
                "listeners[0].routes[0].passthrough_cluster: no cluster named \"nope\"",
            ),
            (
                "passthrough_cluster: engines",
                "listeners[0].routes[0].passthrough_cluster: cluster \"engines\" is original_dst",
            ),
        ] {
            let text = Config::parse(&route(extra), "x").unwrap_err().to_string();
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        let good = format!(
            "listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n      - {{ match: {{ prefix: / }}, local: longhorn_engine_proxy, passthrough_cluster: im }}\n{clusters}"
        );
        let c = Config::parse(&good, "x").unwrap();
        assert_eq!(
            c.listeners[0].routes[0].passthrough_cluster.as_deref(),
            Some("im")
        );
    }

    #[test]
    fn backup_target_settings_and_mistakes() {
        let listeners = "listeners: [{ name: h, address: 127.0.0.1:0, routes: [{ match: { prefix: / }, local: health }] }]\n";
        let c = Config::parse(listeners, "x").unwrap();
        assert_eq!(c.backup_target, BackupTargetConfig::default());
        let good = format!(
            "{listeners}backup_target: {{ nfs_mount_root: /mnt/bs, nfs_mount: existing, max_concurrent: 2, timeout: 5s }}\n"
        );
        let c = Config::parse(&good, "x").unwrap();
        assert_eq!(
            c.backup_target.nfs_mount_root,
            std::path::Path::new("/mnt/bs")
        );
        assert_eq!(
            c.backup_target.nfs_mount,
            lhnet_backupstore::NfsMount::Existing
        );
        assert_eq!(
            (c.backup_target.max_concurrent, c.backup_target.timeout),
            (2, Duration::from_secs(5))
        );
        let bad = format!(
            "{listeners}backup_target: {{ nfs_mount_root: mnt, nfs_mount: maybe, max_concurrent: 0, timeout: 5, s3: x }}\n"
        );
        let text = Config::parse(&bad, "x").unwrap_err().to_string();
        for want in [
            "backup_target.nfs_mount_root: \"mnt\" is not an absolute directory",
            "backup_target.nfs_mount: \"maybe\" is not auto or existing",
            "backup_target.max_concurrent: must be at least 1",
            "backup_target.timeout",
            "backup_target: unknown key \"s3\"",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("3d").unwrap_err().contains("unknown unit"));
        let mut cx = Cx::default();
        assert_eq!(
            size(&Value::String("4Mi".into()), "x", &mut cx),
            Some(4 << 20)
        );
        assert_eq!(size(&Value::String("4Xi".into()), "x", &mut cx), None);
        assert_eq!(cx.errors.len(), 1);
    }

    #[test]
    fn not_yaml_is_one_clear_error() {
        let err = Config::parse("listeners: [", "broken.yaml").unwrap_err();
        assert_eq!(err.errors.len(), 1);
        assert!(err.errors[0].message.starts_with("not valid YAML"), "{err}");
    }
}
