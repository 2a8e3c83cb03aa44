//! YAML text into the [model](super): every mistake reported with its path, unknown keys
//! with the nearest known one.

use super::validate::{check_addresses, check_references};
use super::*;

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
}

/// The first line (from 1) where `pattern` starts a key or value, outside comments.
pub(super) fn first_line_with(text: &str, pattern: &str) -> Option<usize> {
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
pub(super) fn check_nesting(text: &str) -> Result<(), String> {
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

// === parsing ===

// === key tables: one per section ===

pub(super) const CONFIG_KEYS: &[&str] = &[
    "admin",
    "storage_network",
    "drain_timeout",
    "listeners",
    "clusters",
    "peers",
    "peer_lookup",
    "backup_target",
];
pub(super) const ADMIN_KEYS: &[&str] = &["address"];
pub(super) const STORAGE_NETWORK_KEYS: &[&str] =
    &["interface", "network", "network_status_file", "fallback"];
pub(super) const PEER_LOOKUP_KEYS: &[&str] = &[
    "enabled",
    "networks",
    "port",
    "timeout",
    "cache_ttl",
    "failure_ttl",
    "tls",
];
pub(super) const BACKUP_TARGET_KEYS: &[&str] = &[
    "nfs_mount_root",
    "nfs_mount",
    "max_concurrent",
    "timeout",
    "allowed_endpoints",
    "instance_metadata",
];
/// A `kind: tcp` listener's keys.
pub(super) const TCP_LISTENER_KEYS: &[&str] =
    &["name", "kind", "address", "cluster", "stat_prefix"];
/// A `kind: http_connect` listener's keys.
pub(super) const HTTP_CONNECT_LISTENER_KEYS: &[&str] = &[
    "name",
    "kind",
    "address",
    "upstream_bind_config",
    "connect_timeout",
    "max_connections",
];
/// A gRPC listener's keys: its own and its limits ([`parse_listener_limits`]).
pub(super) const GRPC_LISTENER_KEYS: &[&str] = &[
    "name",
    "kind",
    "address",
    "routes",
    "max_message_size",
    "http2_protocol_options",
    "stat_prefix",
    "max_connections",
    "max_requests",
    "request_headers_timeout",
    "idle_timeout",
    "stream_idle_timeout",
    "max_request_headers_kb",
    "send_timeout",
    "tls",
];
/// What a listener may be asked for before its `kind` is known: both tables.
pub(super) const LISTENER_KEYS: &[&str] = &[
    "name",
    "kind",
    "address",
    "cluster",
    "stat_prefix",
    "connect_timeout",
    "upstream_bind_config",
    "routes",
    "max_message_size",
    "http2_protocol_options",
    "max_connections",
    "max_requests",
    "request_headers_timeout",
    "idle_timeout",
    "stream_idle_timeout",
    "max_request_headers_kb",
    "send_timeout",
    "tls",
];
pub(super) const TLS_KEYS: &[&str] = &["mode", "ca", "cert", "key", "peer_name"];
const HTTP2_KEYS: &[&str] = &[
    "max_concurrent_streams",
    "initial_stream_window_size",
    "initial_connection_window_size",
    "connection_keepalive",
];
pub(super) const KEEPALIVE_KEYS: &[&str] = &["interval", "timeout"];
pub(super) const ROUTE_KEYS: &[&str] = &[
    "name",
    "match",
    "cluster",
    "local",
    "timeout",
    "max_stream_duration",
    "retry_policy",
    "upstream_cluster",
    "passthrough_cluster",
    "backup_egress",
];
pub(super) const MAX_STREAM_DURATION_KEYS: &[&str] = &["grpc_timeout_header_max"];
pub(super) const MATCH_KEYS: &[&str] = &["path", "prefix", "safe_regex", "headers", "grpc"];
pub(super) const REGEX_KEYS: &[&str] = &["regex"];
pub(super) const HEADER_MATCHER_KEYS: &[&str] = &[
    "name",
    "exact_match",
    "exact",
    "prefix_match",
    "prefix",
    "safe_regex_match",
    "safe_regex",
    "present_match",
    "invert_match",
];
pub(super) const RETRY_KEYS: &[&str] = &[
    "retry_on",
    "num_retries",
    "per_try_timeout",
    "max_buffered_bytes",
];
pub(super) const CLUSTER_KEYS: &[&str] = &[
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
    "max_connections_per_endpoint",
    "streams_per_connection",
    "typed_extension_protocol_options",
    "tls",
];
pub(super) const CIRCUIT_BREAKER_KEYS: &[&str] =
    &["max_requests", "max_requests_per_downstream_connection"];
pub(super) const BIND_KEYS: &[&str] = &["source_address", "bind_to_device"];
pub(super) const SOCKET_ADDRESS_KEYS: &[&str] = &["address", "port_value"];

#[derive(Default)]
pub(super) struct Cx {
    pub(super) errors: Vec<ConfigError>,
}

impl Cx {
    pub(super) fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            message: message.into(),
        });
    }
}

/// A mapping being read: hands out fields by key and reports the keys nobody asked for. Each
/// section has one key table: what `take` may ask for (checked in debug builds) is what
/// "unknown key" and "did you mean" know.
pub(super) struct Fields<'a> {
    path: String,
    keys: &'static [&'static str],
    entries: Vec<(String, &'a Value)>,
    taken: Vec<bool>,
}

impl<'a> Fields<'a> {
    fn new(
        value: &'a Value,
        path: &str,
        keys: &'static [&'static str],
        cx: &mut Cx,
    ) -> Option<Self> {
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
            keys,
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
        debug_assert!(
            self.keys.contains(&key),
            "{key} is not in the key table of {}",
            self.path
        );
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

    /// Reports every key that was never taken, suggesting the nearest one of the section's.
    fn finish(self, cx: &mut Cx) {
        let keys = self.keys;
        self.finish_as(keys, cx)
    }

    /// [`Self::finish`] for a section whose keys depend on a choice made in it (a listener's
    /// `kind`): `known` is the table of what was chosen.
    fn finish_as(self, known: &[&str], cx: &mut Cx) {
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

pub(super) fn kind(v: &Value) -> &'static str {
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

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
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

pub(super) fn string(v: &Value, path: &str, cx: &mut Cx) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        other => {
            cx.err(path, format!("expected a string, got {}", kind(other)));
            None
        }
    }
}

pub(super) fn boolean(v: &Value, path: &str, cx: &mut Cx) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        other => {
            cx.err(path, format!("expected true or false, got {}", kind(other)));
            None
        }
    }
}

pub(super) fn unsigned(v: &Value, path: &str, max: u64, cx: &mut Cx) -> Option<u64> {
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

pub(super) fn list<'a>(v: &'a Value, path: &str, cx: &mut Cx) -> Vec<(String, &'a Value)> {
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

pub(super) fn duration(v: &Value, path: &str, cx: &mut Cx) -> Option<Duration> {
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
pub(super) fn positive(v: &Value, path: &str, max: u64, cx: &mut Cx) -> Option<u64> {
    match unsigned(v, path, max, cx)? {
        0 => {
            cx.err(path, "must be at least 1");
            None
        }
        n => Some(n),
    }
}

/// A duration longer than 0.
pub(super) fn nonzero_duration(v: &Value, path: &str, cx: &mut Cx) -> Option<Duration> {
    match duration(v, path, cx)? {
        d if d.is_zero() => {
            cx.err(path, "must be more than 0");
            None
        }
        d => Some(d),
    }
}

/// Bytes: an integer, or `64Ki`, `4Mi`, `1Gi`.
pub(super) fn size(v: &Value, path: &str, cx: &mut Cx) -> Option<usize> {
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

pub(super) fn parse_config(root: &Value, cx: &mut Cx) -> Option<Config> {
    let mut f = Fields::new(root, "", CONFIG_KEYS, cx)?;

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
    f.finish(cx);

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

pub(super) fn ip_addr(v: &Value, path: &str, cx: &mut Cx) -> Option<IpAddr> {
    let s = string(v, path, cx)?;
    s.parse()
        .map_err(|_| cx.err(path, format!("\"{s}\" is not an IP address")))
        .ok()
}

/// `peers: { MANAGEMENT_IP: STORAGE_IP, ... }`.
pub(super) fn parse_peers(v: &Value, path: &str, cx: &mut Cx) -> Option<Vec<Peer>> {
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
            (Some(m), Some(st)) if m.is_ipv4() == st.is_ipv4() => peers.push(Peer {
                management: ManagementIp::new(m),
                storage: StorageIp::new(st),
            }),
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

pub(super) fn parse_peer_lookup(v: &Value, path: &str, cx: &mut Cx) -> Option<PeerLookupConfig> {
    let mut f = Fields::new(v, path, PEER_LOOKUP_KEYS, cx)?;
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
    let tls = match f.take("tls") {
        Some((p, v)) => parse_tls(v, &p, cx),
        None => Some(None),
    };
    f.finish(cx);
    Some(PeerLookupConfig {
        tls: tls?,
        enabled: enabled?,
        networks: networks?,
        port: port?,
        timeout: timeout?,
        cache_ttl: cache_ttl?,
        failure_ttl: failure_ttl?,
    })
}

pub(super) fn parse_backup_target(
    v: &Value,
    path: &str,
    cx: &mut Cx,
) -> Option<BackupTargetConfig> {
    use lhnet_backupstore::NfsMount;
    let mut f = Fields::new(v, path, BACKUP_TARGET_KEYS, cx)?;
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
    let mut allowed_endpoints = Some(Vec::new());
    if let Some((p, v)) = f.take("allowed_endpoints") {
        for (p, v) in list(v, &p, cx) {
            let entry =
                string(v, &p, cx).and_then(|e| {
                    match lhnet_backupstore::EndpointPolicy::new(std::slice::from_ref(&e), false) {
                        Ok(_) => Some(e),
                        Err(why) => {
                            cx.err(&p, why);
                            None
                        }
                    }
                });
            match (entry, allowed_endpoints.as_mut()) {
                (Some(e), Some(all)) => all.push(e),
                _ => allowed_endpoints = None,
            }
        }
    }
    let instance_metadata = match f.take("instance_metadata") {
        Some((p, v)) => boolean(v, &p, cx),
        None => Some(d.instance_metadata),
    };
    f.finish(cx);
    let (allowed_endpoints, instance_metadata) = (allowed_endpoints?, instance_metadata?);
    let endpoints = lhnet_backupstore::EndpointPolicy::new(&allowed_endpoints, instance_metadata)
        .map_err(|why| cx.err(&format!("{path}.allowed_endpoints"), why))
        .ok()?;
    Some(BackupTargetConfig {
        nfs_mount_root: nfs_mount_root?,
        nfs_mount: nfs_mount?,
        max_concurrent: max_concurrent?,
        timeout: timeout?,
        allowed_endpoints,
        instance_metadata,
        endpoints: std::sync::Arc::new(endpoints),
    })
}

pub(super) fn parse_admin(v: &Value, path: &str, cx: &mut Cx) -> Option<AdminConfig> {
    let mut f = Fields::new(v, path, ADMIN_KEYS, cx)?;
    let address = f
        .required("address", cx)
        .and_then(|(p, v)| socket_addr(v, &p, cx));
    f.finish(cx);
    Some(AdminConfig { address: address? })
}

pub(super) fn socket_addr(v: &Value, path: &str, cx: &mut Cx) -> Option<SocketAddr> {
    let s = string(v, path, cx)?;
    s.parse()
        .map_err(|_| cx.err(path, format!("\"{s}\" is not an IP:PORT address")))
        .ok()
}

pub(super) fn parse_storage_network(
    v: &Value,
    path: &str,
    cx: &mut Cx,
) -> Option<StorageNetworkConfig> {
    let mut f = Fields::new(v, path, STORAGE_NETWORK_KEYS, cx)?;
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
    f.finish(cx);
    Some(StorageNetworkConfig {
        interface: interface?,
        network,
        network_status_file,
        fallback: fallback?,
    })
}

pub(super) fn parse_listen_address(
    v: &Value,
    path: &str,
    tcp: bool,
    cx: &mut Cx,
) -> Option<ListenAddress> {
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

pub(super) fn parse_listener(v: &Value, path: &str, cx: &mut Cx) -> Option<ListenerConfig> {
    let mut f = Fields::new(v, path, LISTENER_KEYS, cx)?;
    let name = f.required("name", cx).and_then(|(p, v)| string(v, &p, cx));
    let kind = match f.take("kind") {
        Some((p, v)) => match string(v, &p, cx).as_deref() {
            Some("grpc") => Some(ListenerKind::Grpc),
            Some("tcp") => Some(ListenerKind::Tcp),
            Some("http_connect") => Some(ListenerKind::HttpConnect),
            Some(other) => {
                cx.err(
                    &p,
                    format!("\"{other}\" is not a listener kind; use grpc, tcp or http_connect"),
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
        f.finish_as(TCP_LISTENER_KEYS, cx);
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
            tls: None,
            egress: None,
        });
    }
    if kind == Some(ListenerKind::HttpConnect) {
        let egress = parse_egress(&mut f, cx);
        f.finish_as(HTTP_CONNECT_LISTENER_KEYS, cx);
        let address = address?;
        let loopback = match address {
            ListenAddress::Socket(a) => a.ip().is_loopback(),
            _ => false,
        };
        if !loopback {
            cx.err(
                &format!("{path}.address"),
                "an http_connect listener forwards for whoever reaches it: bind it on loopback (127.0.0.1:PORT), where only its own pod's processes reach it",
            );
        }
        return Some(ListenerConfig {
            path: path.to_string(),
            name: name?,
            kind: ListenerKind::HttpConnect,
            address,
            cluster: None,
            routes: Vec::new(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            http2: Http2Options::default(),
            limits: ListenerLimits::default(),
            tls: None,
            egress: Some(egress?),
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
    let tls = match f.take("tls") {
        Some((p, v)) => parse_tls(v, &p, cx),
        None => Some(None),
    };
    // Envoy's stat_prefix is accepted for familiarity; the listener name is the metric label.
    let _ = f.take("stat_prefix");
    f.finish_as(GRPC_LISTENER_KEYS, cx);
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
        tls: tls?,
        egress: None,
    })
}

/// The upstream keys of a `kind: http_connect` listener.
fn parse_egress(f: &mut Fields<'_>, cx: &mut Cx) -> Option<EgressConfig> {
    let d = EgressConfig::default();
    let (source_address, bind_to_device) = match f.take("upstream_bind_config") {
        Some((p, v)) => parse_bind(v, &p, cx)?,
        None => (d.source_address, d.bind_to_device),
    };
    let connect_timeout = match f.take("connect_timeout") {
        Some((p, v)) => nonzero_duration(v, &p, cx),
        None => Some(d.connect_timeout),
    };
    let max_connections = match f.take("max_connections") {
        Some((p, v)) => positive(v, &p, 65536, cx).map(|n| n as usize),
        None => Some(d.max_connections),
    };
    Some(EgressConfig {
        source_address,
        bind_to_device,
        connect_timeout: connect_timeout?,
        max_connections: max_connections?,
    })
}

/// `tls:` of a listener or a cluster: every key optional (Longhorn's paths and name by
/// default); `None` inside when `mode: off`.
pub(super) fn parse_tls(v: &Value, path: &str, cx: &mut Cx) -> Option<Option<TlsConfig>> {
    let mut f = Fields::new(v, path, TLS_KEYS, cx)?;
    let mut tls = TlsConfig::default();
    let mut ok = true;
    if let Some((p, v)) = f.take("mode") {
        match string(v, &p, cx).as_deref() {
            Some("optional") => tls.mode = TlsMode::Optional,
            Some("required") => tls.mode = TlsMode::Required,
            Some("off") => tls.mode = TlsMode::Off,
            Some(other) => {
                cx.err(
                    &p,
                    format!("\"{other}\" is not a TLS mode; use optional, required or off"),
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    for (key, slot) in [
        ("ca", &mut tls.ca),
        ("cert", &mut tls.cert),
        ("key", &mut tls.key),
    ] {
        if let Some((p, v)) = f.take(key) {
            match string(v, &p, cx) {
                Some(s) if s.is_empty() => {
                    cx.err(&p, "must name a file");
                    ok = false;
                }
                Some(s) => *slot = s.into(),
                None => ok = false,
            }
        }
    }
    if let Some((p, v)) = f.take("peer_name") {
        match string(v, &p, cx) {
            Some(s) if s.is_empty() => {
                cx.err(&p, "must not be empty");
                ok = false;
            }
            Some(s) => tls.peer_name = s,
            None => ok = false,
        }
    }
    f.finish(cx);
    ok.then_some((tls.mode != TlsMode::Off).then_some(tls))
}

pub(super) fn parse_listener_limits(f: &mut Fields<'_>, cx: &mut Cx) -> Option<ListenerLimits> {
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
        ("send_timeout", &mut limits.send_timeout),
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

pub(super) fn parse_http2(v: &Value, path: &str, cx: &mut Cx) -> Option<Http2Options> {
    let mut f = Fields::new(v, path, HTTP2_KEYS, cx)?;
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
        match Fields::new(v, &p, KEEPALIVE_KEYS, cx) {
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
                k.finish(cx);
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
    f.finish(cx);
    ok.then_some(opts)
}

pub(super) fn parse_route(
    v: &Value,
    path: &str,
    listener: &str,
    index: usize,
    cx: &mut Cx,
) -> Option<RouteConfig> {
    let mut f = Fields::new(v, path, ROUTE_KEYS, cx)?;
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
        let mut m = Fields::new(v, &p, MAX_STREAM_DURATION_KEYS, cx)?;
        let max = m
            .take("grpc_timeout_header_max")
            .and_then(|(p, v)| duration(v, &p, cx))
            .filter(|d| !d.is_zero());
        m.finish(cx);
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
    let backup_egress = f.take("backup_egress").and_then(|(p, v)| string(v, &p, cx));
    f.finish(cx);
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
        backup_egress,
    })
}

pub(super) fn regex(v: &Value, path: &str, cx: &mut Cx) -> Option<Regex> {
    // Envoy writes `safe_regex: { regex: "..." }`; a bare string is accepted too.
    let (text, p) = match v {
        Value::Mapping(_) => {
            let mut f = Fields::new(v, path, REGEX_KEYS, cx)?;
            let r = f
                .required("regex", cx)
                .and_then(|(p, v)| string(v, &p, cx).map(|s| (s, p)));
            f.finish(cx);
            r?
        }
        other => (string(other, path, cx)?, path.to_string()),
    };
    // Anchored like Envoy: the whole value must match.
    Regex::new(&format!("^(?:{text})$"))
        .map_err(|e| cx.err(&p, format!("bad regex: {e}")))
        .ok()
}

pub(super) fn parse_match(v: &Value, path: &str, cx: &mut Cx) -> Option<RouteMatch> {
    let mut f = Fields::new(v, path, MATCH_KEYS, cx)?;
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
    f.finish(cx);
    Some(RouteMatch {
        path: path_match?,
        headers,
    })
}

pub(super) fn parse_header_matcher(v: &Value, path: &str, cx: &mut Cx) -> Option<HeaderMatcher> {
    let mut f = Fields::new(v, path, HEADER_MATCHER_KEYS, cx)?;
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
    f.finish(cx);
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

pub(super) fn parse_retry(v: &Value, path: &str, cx: &mut Cx) -> Option<RetryPolicy> {
    let mut f = Fields::new(v, path, RETRY_KEYS, cx)?;
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
    f.finish(cx);
    Some(RetryPolicy {
        retry_on: retry_on?,
        num_retries: num_retries?,
        per_try_timeout,
        max_buffered_bytes: max_buffered_bytes?,
    })
}

pub(super) fn parse_cluster(v: &Value, path: &str, cx: &mut Cx) -> Option<ClusterConfig> {
    let mut f = Fields::new(v, path, CLUSTER_KEYS, cx)?;
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
            let mut cb = Fields::new(v, &p, CIRCUIT_BREAKER_KEYS, cx)?;
            let mut take = |key: &str, cx: &mut Cx| {
                cb.take(key)
                    .and_then(|(p, v)| positive(v, &p, 1 << 20, cx))
                    .map(|n| n as usize)
            };
            let n = take("max_requests", cx);
            let per = take("max_requests_per_downstream_connection", cx);
            cb.finish(cx);
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
    let tls = match f.take("tls") {
        Some((p, v)) => parse_tls(v, &p, cx),
        None => Some(None),
    };
    f.finish(cx);
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
        tls: tls?,
    })
}

pub(super) fn parse_bind(
    v: &Value,
    path: &str,
    cx: &mut Cx,
) -> Option<(SourceAddress, Option<String>)> {
    let mut f = Fields::new(v, path, BIND_KEYS, cx)?;
    let source = match f.take("source_address") {
        Some((p, v)) => {
            // Envoy writes `source_address: { address: IP, port_value: 0 }`; a string is the short form.
            let text = match v {
                Value::Mapping(_) => {
                    let mut sf = Fields::new(v, &p, SOCKET_ADDRESS_KEYS, cx)?;
                    let a = sf
                        .required("address", cx)
                        .and_then(|(p, v)| string(v, &p, cx));
                    let _ = sf.take("port_value");
                    sf.finish(cx);
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
    f.finish(cx);
    Some((source?, device))
}

pub(super) fn parse_destination(v: &Value, path: &str, cx: &mut Cx) -> Option<Destination> {
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

pub(super) fn parse_port_range(v: &Value, path: &str, cx: &mut Cx) -> Option<RangeInclusive<u16>> {
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
