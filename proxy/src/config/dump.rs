//! The model written back as YAML/JSON for `/config_dump`.

use super::*;

pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

pub(super) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

pub(super) fn ser_opt_duration<S: Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format_duration(*d)),
        None => s.serialize_none(),
    }
}

pub(super) fn ser_regex<S: Serializer>(r: &Regex, s: S) -> Result<S::Ok, S::Error> {
    let text = r.as_str();
    s.serialize_str(
        text.strip_prefix("^(?:")
            .and_then(|t| t.strip_suffix(")$"))
            .unwrap_or(text),
    )
}

pub(super) fn ser_port_ranges<S: Serializer>(
    r: &[RangeInclusive<u16>],
    s: S,
) -> Result<S::Ok, S::Error> {
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

pub(super) fn ser_peers<S: Serializer>(peers: &[Peer], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(peers.len()))?;
    for peer in peers {
        map.serialize_entry(&peer.management.to_string(), &peer.storage.to_string())?;
    }
    map.end()
}

// === the model in the schema operators write ===
//
// Each section is written with the keys its parser reads (see `parse`): a dump read back as a
// config is the same config (tested), and what an operator sees in `/config_dump` is what
// they would write to get it.

use serde::ser::SerializeMap;

/// A `{ regex: ... }` mapping (Envoy's `safe_regex` / `safe_regex_match`).
struct SafeRegex<'a>(&'a Regex);

impl Serialize for SafeRegex<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("regex", &RegexText(self.0))?;
        map.end()
    }
}

struct RegexText<'a>(&'a Regex);

impl Serialize for RegexText<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ser_regex(self.0, s)
    }
}

/// A duration as config text (`1500ms`, `30s`).
struct Dur(Duration);

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ser_duration(&self.0, s)
    }
}

impl Serialize for ListenerConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("kind", &self.kind)?;
        map.serialize_entry("address", &self.address)?;
        if self.kind == ListenerKind::Tcp {
            map.serialize_entry("cluster", &self.cluster)?;
            return map.end();
        }
        if let Some(e) = &self.egress {
            map.serialize_entry("source_address", &e.source_address.to_string())?;
            map.serialize_entry("bind_to_device", &e.bind_to_device)?;
            map.serialize_entry("connect_timeout", &Dur(e.connect_timeout))?;
            map.serialize_entry("max_connections", &e.max_connections)?;
            return map.end();
        }
        map.serialize_entry("routes", &self.routes)?;
        map.serialize_entry("max_message_size", &self.max_message_size)?;
        map.serialize_entry("http2_protocol_options", &self.http2)?;
        let l = &self.limits;
        map.serialize_entry("max_connections", &l.max_connections)?;
        map.serialize_entry("max_requests", &l.max_requests)?;
        map.serialize_entry("request_headers_timeout", &Dur(l.request_headers_timeout))?;
        map.serialize_entry("idle_timeout", &Dur(l.idle_timeout))?;
        map.serialize_entry("stream_idle_timeout", &Dur(l.stream_idle_timeout))?;
        map.serialize_entry("max_request_headers_kb", &l.max_request_headers_kb)?;
        map.serialize_entry("send_timeout", &Dur(l.send_timeout))?;
        if let Some(tls) = &self.tls {
            map.serialize_entry("tls", tls)?;
        }
        map.end()
    }
}

impl Serialize for RouteConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("match", &self.matcher)?;
        match &self.action {
            RouteAction::Cluster(c) => map.serialize_entry("cluster", c)?,
            RouteAction::Local(l) => map.serialize_entry("local", l)?,
        }
        if let Some(t) = self.timeout {
            map.serialize_entry("timeout", &Dur(t))?;
        }
        if let Some(max) = self.grpc_timeout_header_max {
            let mut inner = BTreeMap::new();
            inner.insert("grpc_timeout_header_max", Dur(max));
            map.serialize_entry("max_stream_duration", &inner)?;
        }
        if let Some(r) = &self.retry_policy {
            map.serialize_entry("retry_policy", r)?;
        }
        if let Some(c) = &self.upstream_cluster {
            map.serialize_entry("upstream_cluster", c)?;
        }
        if let Some(c) = &self.passthrough_cluster {
            map.serialize_entry("passthrough_cluster", c)?;
        }
        if let Some(l) = &self.backup_egress {
            map.serialize_entry("backup_egress", l)?;
        }
        map.end()
    }
}

impl Serialize for RouteMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        match &self.path {
            PathMatch::Path(p) => map.serialize_entry("path", p)?,
            PathMatch::Prefix(p) => map.serialize_entry("prefix", p)?,
            PathMatch::SafeRegex(re) => map.serialize_entry("safe_regex", &SafeRegex(re))?,
        }
        if !self.headers.is_empty() {
            map.serialize_entry("headers", &self.headers)?;
        }
        map.end()
    }
}

impl Serialize for HeaderMatcher {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("name", self.name.as_str())?;
        match &self.rule {
            HeaderRule::Exact(v) => map.serialize_entry("exact_match", v)?,
            HeaderRule::Prefix(v) => map.serialize_entry("prefix_match", v)?,
            HeaderRule::SafeRegex(re) => map.serialize_entry("safe_regex_match", &SafeRegex(re))?,
            HeaderRule::Present(p) => map.serialize_entry("present_match", p)?,
        }
        if self.invert_match {
            map.serialize_entry("invert_match", &true)?;
        }
        map.end()
    }
}

impl Serialize for ClusterConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Ports<'a>(&'a [RangeInclusive<u16>]);
        impl Serialize for Ports<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                ser_port_ranges(self.0, s)
            }
        }
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("type", &self.kind)?;
        if !self.endpoints.is_empty() {
            map.serialize_entry("endpoints", &self.endpoints)?;
        }
        let mut bind = BTreeMap::new();
        bind.insert("source_address", self.source_address.to_string());
        if let Some(device) = &self.bind_to_device {
            bind.insert("bind_to_device", device.clone());
        }
        map.serialize_entry("upstream_bind_config", &bind)?;
        if !self.allowed_destinations.is_empty() {
            map.serialize_entry("allowed_destinations", &self.allowed_destinations)?;
        }
        if !self.allowed_ports.is_empty() {
            map.serialize_entry("allowed_ports", &Ports(&self.allowed_ports))?;
        }
        map.serialize_entry("connect_timeout", &Dur(self.connect_timeout))?;
        map.serialize_entry("idle_timeout", &Dur(self.idle_timeout))?;
        map.serialize_entry("tcp_keepalive", &Dur(self.tcp_keepalive))?;
        let mut breakers = BTreeMap::new();
        breakers.insert("max_requests", self.max_requests);
        breakers.insert(
            "max_requests_per_downstream_connection",
            self.max_requests_per_downstream_connection,
        );
        map.serialize_entry("circuit_breakers", &breakers)?;
        map.serialize_entry(
            "max_connections_per_endpoint",
            &self.max_connections_per_endpoint,
        )?;
        map.serialize_entry("streams_per_connection", &self.streams_per_connection)?;
        if let Some(tls) = &self.tls {
            map.serialize_entry("tls", tls)?;
        }
        map.end()
    }
}

impl Serialize for TlsConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("mode", &self.mode)?;
        map.serialize_entry("ca", &self.ca)?;
        map.serialize_entry("cert", &self.cert)?;
        map.serialize_entry("key", &self.key)?;
        map.serialize_entry("peer_name", &self.peer_name)?;
        map.end()
    }
}
