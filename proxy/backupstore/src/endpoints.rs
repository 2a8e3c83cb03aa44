//! Where a backup target may make lhnet dial: `backup_target.allowed_endpoints`.
//!
//! A backup-target call names its destination in data the caller controls: the target URL,
//! `AWS_ENDPOINTS`, `HTTPS_PROXY` / `HTTP_PROXY`, and whatever a target answers with a redirect.
//! Every one of them is checked here before anything is dialled, and names are checked again
//! after they resolve (so a name cannot point lhnet somewhere its text did not say).
//!
//! The rules (docs/operations.md "Backup targets: where lhnet may dial"):
//! - With no `allowed_endpoints`, any host and port, except the refused classes below.
//! - With a list, only what an entry matches: `HOST[:PORTS]` (exact name or IP), `*.DOMAIN[:PORTS]`
//!   (any name under DOMAIN), `CIDR[:PORTS]`; PORTS is one port or `LOW-HIGH`; IPv6 in brackets
//!   when a port follows (`[fd00::/8]:9000`). Without PORTS, any port.
//! - Refused unless an entry names them at least as narrowly as their class: loopback
//!   (127.0.0.0/8, ::1), link-local (169.254.0.0/16, fe80::/10), "this network" (0.0.0.0/8, ::)
//!   and the cloud instance-metadata addresses (169.254.169.254, 169.254.170.2, fd00:ec2::254,
//!   100.100.100.200), each only by its own /32 or /128. `0.0.0.0/0` opens none of them, and a name
//!   entry never does: a name that resolves into a refused class needs the address listed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// The text every refusal carries, so callers can tell a refusal from a target's own error.
pub const REFUSED: &str = "refused by lhnet's backup-target policy";

/// The config key an operator changes to allow a refused destination.
const KEY: &str = "backup_target.allowed_endpoints";

/// The destination policy of backup targets.
#[derive(Clone, PartialEq, Eq)]
pub struct EndpointPolicy {
    rules: Vec<Rule>,
    /// `backup_target.instance_metadata`: keyless S3 targets may ask the instance metadata
    /// service for credentials.
    pub instance_metadata: bool,
    /// No checks at all: the simulator's replicas, which stand for Longhorn's own (they dial
    /// whatever they are given).
    unrestricted: bool,
}

impl Default for EndpointPolicy {
    /// lhnet's default: any host and port except the refused classes; no instance metadata.
    fn default() -> EndpointPolicy {
        EndpointPolicy {
            rules: Vec::new(),
            instance_metadata: false,
            unrestricted: false,
        }
    }
}

impl fmt::Debug for EndpointPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unrestricted {
            return f.write_str("EndpointPolicy(unrestricted)");
        }
        let rules: Vec<&str> = self.rules.iter().map(|r| r.text.as_str()).collect();
        write!(
            f,
            "EndpointPolicy({rules:?}, instance_metadata: {})",
            self.instance_metadata
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    host: HostRule,
    /// Inclusive; `None` is any port.
    ports: Option<(u16, u16)>,
    /// As written in the config.
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Name(String),
    /// `*.DOMAIN`: names ending in `.DOMAIN`.
    Under(String),
    Net(IpNet),
}

/// A refused class of addresses and why it is refused.
struct Class {
    net: &'static str,
    why: &'static str,
}

/// Narrowest first: the metadata addresses inside link-local say what they are.
const REFUSED_CLASSES: &[Class] = &[
    Class {
        net: "169.254.169.254/32",
        why: "the cloud instance-metadata address",
    },
    Class {
        net: "169.254.170.2/32",
        why: "the container credentials address (ECS)",
    },
    Class {
        net: "fd00:ec2::254/128",
        why: "the cloud instance-metadata address (IPv6)",
    },
    Class {
        net: "100.100.100.200/32",
        why: "the cloud instance-metadata address (Alibaba)",
    },
    Class {
        net: "127.0.0.0/8",
        why: "a loopback address",
    },
    Class {
        net: "::1/128",
        why: "a loopback address",
    },
    Class {
        net: "169.254.0.0/16",
        why: "a link-local address",
    },
    Class {
        net: "fe80::/10",
        why: "a link-local address",
    },
    Class {
        net: "0.0.0.0/8",
        why: "a \"this network\" address",
    },
    Class {
        net: "::/128",
        why: "the unspecified address",
    },
];

/// The refused class `ip` is in, narrowest first. The classes are parsed once: every request
/// and every resolved address of an object-store target is checked.
fn class_of(ip: IpAddr) -> Option<(IpNet, &'static str)> {
    static PARSED: std::sync::OnceLock<Vec<(IpNet, &'static str)>> = std::sync::OnceLock::new();
    PARSED
        .get_or_init(|| {
            REFUSED_CLASSES
                .iter()
                .filter_map(|c| Some((c.net.parse().ok()?, c.why)))
                .collect()
        })
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .copied()
}

/// `::ffff:a.b.c.d` is `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn parse_ports(text: &str) -> Option<(u16, u16)> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let (low, high) = (low.parse().ok()?, high.parse().ok()?);
    (low >= 1 && low <= high).then_some((low, high))
}

fn host_rule(host: &str) -> Option<HostRule> {
    if let Ok(net) = host.parse::<IpNet>() {
        return Some(HostRule::Net(net.trunc()));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(HostRule::Net(IpNet::from(canonical(ip))));
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            })
    };
    match host.strip_prefix("*.") {
        Some(domain) if name_ok(domain) => Some(HostRule::Under(domain.to_ascii_lowercase())),
        Some(_) => None,
        None if name_ok(host) => Some(HostRule::Name(host.to_ascii_lowercase())),
        None => None,
    }
}

impl Rule {
    fn parse(text: &str) -> Result<Rule, String> {
        let bad = || {
            format!(
                "{text:?} is not HOST[:PORTS], *.DOMAIN[:PORTS] or CIDR[:PORTS] (PORTS: 9000 or 9000-9010; IPv6 in brackets before a port)"
            )
        };
        let (host, ports) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else if text.matches(':').count() > 1 {
            (text, None)
        } else {
            match text.rsplit_once(':') {
                Some((host, ports)) => (host, Some(ports)),
                None => (text, None),
            }
        };
        let ports = match ports {
            Some(p) => Some(parse_ports(p).ok_or_else(bad)?),
            None => None,
        };
        Ok(Rule {
            host: host_rule(host).ok_or_else(bad)?,
            ports,
            text: text.to_string(),
        })
    }

    fn port_ok(&self, port: u16) -> bool {
        self.ports
            .is_none_or(|(low, high)| (low..=high).contains(&port))
    }

    fn names(&self, name: &str) -> bool {
        match &self.host {
            HostRule::Name(n) => n.eq_ignore_ascii_case(name),
            HostRule::Under(domain) => {
                name.len().checked_sub(domain.len() + 1).is_some_and(|cut| {
                    name.as_bytes()[cut] == b'.' && name[cut + 1..].eq_ignore_ascii_case(domain)
                })
            }
            HostRule::Net(_) => false,
        }
    }

    fn net(&self) -> Option<&IpNet> {
        match &self.host {
            HostRule::Net(net) => Some(net),
            _ => None,
        }
    }
}

/// One destination as a caller wrote it: which setting named it, and the host and port.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// `the target URL`, `AWS_ENDPOINTS`, `HTTPS_PROXY`, `a redirect`, …
    pub key: &'a str,
    pub host: &'a str,
    pub port: u16,
}

impl Destination<'_> {
    fn refused(&self, why: impl fmt::Display) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.to_string()
        };
        format!(
            "{} {host}:{} is {REFUSED}: {why}; to allow it, list it in {KEY} of lhnet's config",
            self.key, self.port
        )
    }
}

impl EndpointPolicy {
    /// `allowed_endpoints` and `instance_metadata` as the config gives them; the error names
    /// the entry that is not understood.
    pub fn new(entries: &[String], instance_metadata: bool) -> Result<EndpointPolicy, String> {
        let rules = entries
            .iter()
            .map(|e| Rule::parse(e.trim()))
            .collect::<Result<_, _>>()?;
        Ok(EndpointPolicy {
            rules,
            instance_metadata,
            unrestricted: false,
        })
    }

    /// No checks: for the simulator's replicas, which stand for Longhorn's own.
    pub fn unrestricted() -> EndpointPolicy {
        EndpointPolicy {
            unrestricted: true,
            instance_metadata: true,
            ..EndpointPolicy::default()
        }
    }

    pub fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    /// The entries as written.
    pub fn entries(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.text.clone()).collect()
    }

    /// Why the address `ip` (port `port`, `port` 0 for any) may not be dialled, if it may not.
    fn address_refusal(&self, ip: IpAddr, port: u16, by_name: bool) -> Option<String> {
        let ip = canonical(ip);
        let class = class_of(ip);
        // Entries naming the address (inside its refused class, if it has one).
        let mut naming = self.rules.iter().filter(|r| {
            r.net().is_some_and(|net| {
                net.contains(&ip) && class.as_ref().is_none_or(|(c, _)| c.contains(net))
            })
        });
        let mut named = false;
        if naming.any(|r| {
            named = true;
            port == 0 || r.port_ok(port)
        }) {
            return None;
        }
        if named {
            return Some(format!("port {port} is not allowed for {ip}"));
        }
        if let Some((_, why)) = class {
            return Some(format!("{ip} is {why}"));
        }
        if self.rules.is_empty() || by_name {
            return None;
        }
        Some(format!("{ip} is not in [{}]", self.entries().join(", ")))
    }

    /// Checks a destination before anything is resolved or dialled: an IP literal as an
    /// address; a name against the name entries (or, failing that, whether any address entry
    /// could let its addresses through, decided by [`EndpointPolicy::check_resolved`]).
    pub fn check(&self, to: Destination<'_>) -> Result<(), String> {
        if self.unrestricted {
            return Ok(());
        }
        let host = to.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return match self.address_refusal(ip, to.port, false) {
                Some(why) => Err(to.refused(why)),
                None => Ok(()),
            };
        }
        if self.rules.is_empty() {
            return Ok(());
        }
        let named: Vec<&Rule> = self.rules.iter().filter(|r| r.names(host)).collect();
        if named.iter().any(|r| r.port_ok(to.port)) {
            return Ok(());
        }
        if !named.is_empty() {
            return Err(to.refused(format!("port {} is not allowed for {host}", to.port)));
        }
        if self
            .rules
            .iter()
            .any(|r| r.net().is_some() && r.port_ok(to.port))
        {
            return Ok(());
        }
        Err(to.refused(format!("{host} is not in [{}]", self.entries().join(", "))))
    }

    /// Whether `name` was let through by a name entry (then its addresses are not matched
    /// against address entries, only against the refused classes).
    fn named(&self, name: &str) -> bool {
        self.rules.iter().any(|r| r.names(name))
    }

    /// The addresses `name` resolved to that may be dialled (port checks were made on the
    /// destination already); an error naming the first refused one when none may.
    pub fn check_resolved(
        &self,
        name: &str,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = addrs.into_iter().collect();
        if self.unrestricted {
            return Ok(addrs);
        }
        let by_name = self.named(name);
        let mut first_refusal = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.address_refusal(a.ip(), a.port(), by_name) {
                None => true,
                Some(why) => {
                    first_refusal.get_or_insert(why);
                    false
                }
            })
            .collect();
        match (allowed.is_empty(), first_refusal) {
            (true, Some(why)) => Err(format!(
                "{name} resolves to a destination {REFUSED}: {why}; to allow it, list the address in {KEY} of lhnet's config"
            )),
            (true, None) => Err(format!(
                "{name} resolves to no address; check the name, or write the target's IP address"
            )),
            (false, _) => Ok(allowed),
        }
    }

    /// Checks `url` (`http(s)://HOST[:PORT]…`) as `key` names it.
    pub fn check_url(&self, key: &str, url: &url::Url) -> Result<(), String> {
        if self.unrestricted {
            return Ok(());
        }
        let (host, port) = host_and_port(key, url)?;
        self.check(Destination {
            key,
            host: &host,
            port,
        })
    }

    /// [`EndpointPolicy::check_url`], then, for a name, its addresses as the system resolves
    /// them now (blocking): said before anything is sent. The dial itself checks again.
    pub fn check_url_resolving(&self, key: &str, url: &url::Url) -> Result<(), String> {
        if self.unrestricted {
            return Ok(());
        }
        let (host, port) = host_and_port(key, url)?;
        self.check_host_resolving(key, &host, port)
    }

    /// A host and port that is not a URL (an NFS server), checked as
    /// [`EndpointPolicy::check_url_resolving`] does.
    pub fn check_host_resolving(&self, key: &str, host: &str, port: u16) -> Result<(), String> {
        self.check(Destination { key, host, port })?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if self.unrestricted || bare.parse::<IpAddr>().is_ok() {
            return Ok(());
        }
        self.check_name_resolving(key, bare, port)
    }

    fn check_name_resolving(&self, key: &str, name: &str, port: u16) -> Result<(), String> {
        use std::net::ToSocketAddrs;
        let found = (name, port)
            .to_socket_addrs()
            .map_err(|e| format!("{key} {name}: cannot resolve it: {e}"))?;
        self.check_resolved(name, found)
            .map(|_| ())
            .map_err(|refused| format!("{key}: {refused}"))
    }

    /// The metadata addresses a keyless S3 target's credential lookup dials, when
    /// `instance_metadata` allows it.
    pub fn metadata_address(ip: IpAddr) -> bool {
        const METADATA: [IpAddr; 4] = [
            IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
            IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
            IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
        ];
        METADATA.contains(&canonical(ip))
    }
}

/// The host (an IPv6 one without brackets) and port (the scheme's default if none) of `url`.
fn host_and_port(key: &str, url: &url::Url) -> Result<(String, u16), String> {
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(format!("{key} {} has no host", redact(url))),
    };
    Ok((host, url.port_or_known_default().unwrap_or(0)))
}

/// `url` with any user name and password replaced by `***`, for messages.
pub fn redact(url: &url::Url) -> String {
    if url.username().is_empty() && url.password().is_none() {
        return url.as_str().to_string();
    }
    let mut shown = url.clone();
    let _ = shown.set_password(None);
    let _ = shown.set_username("***");
    shown.as_str().to_string()
}

/// At most `limit` characters of `text` from a target, printable: control characters and
/// runs of white space become one space, and a cut is marked with `…`. A target's reply goes
/// into an error only through this.
pub fn excerpt(text: &str, limit: usize) -> String {
    let mut out = String::with_capacity(limit.min(text.len()) + 3);
    let mut count = 0;
    let mut space = false;
    for c in text.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' {
            if space {
                continue;
            }
            space = true;
        } else {
            space = false;
        }
        if count == limit {
            out.push('…');
            return out;
        }
        out.push(c);
        count += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> EndpointPolicy {
        EndpointPolicy::new(
            &entries.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            false,
        )
        .unwrap()
    }

    fn check(p: &EndpointPolicy, host: &str, port: u16) -> Result<(), String> {
        p.check(Destination {
            key: "AWS_ENDPOINTS",
            host,
            port,
        })
    }

    #[test]
    fn the_default_refuses_loopback_link_local_and_metadata_only() {
        let p = EndpointPolicy::default();
        for (host, why) in [
            ("127.0.0.1", "loopback"),
            ("127.9.9.9", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("169.254.169.254", "instance-metadata"),
            ("169.254.170.2", "container credentials"),
            ("fd00:ec2::254", "instance-metadata"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "this network"),
        ] {
            let e = check(&p, host, 80).unwrap_err();
            assert!(e.contains(why) && e.contains(REFUSED), "{host}: {e}");
            assert!(e.contains("AWS_ENDPOINTS") && e.contains(KEY), "{e}");
        }
        for host in [
            "10.1.2.3",
            "192.168.1.1",
            "8.8.8.8",
            "s3.amazonaws.com",
            "2001:db8::1",
        ] {
            check(&p, host, 443).unwrap();
        }
    }

    #[test]
    fn refused_classes_open_only_by_entries_as_narrow_as_the_class() {
        let p = policy(&["0.0.0.0/0", "::/0"]);
        assert!(check(&p, "127.0.0.1", 9000).is_err());
        assert!(check(&p, "169.254.169.254", 80).is_err());
        check(&p, "10.0.0.1", 9000).unwrap();
        let p = policy(&["127.0.0.1:9000", "169.254.0.0/16"]);
        check(&p, "127.0.0.1", 9000).unwrap();
        let e = check(&p, "127.0.0.1", 9001).unwrap_err();
        assert!(e.contains("port 9001 is not allowed for 127.0.0.1"), "{e}");
        check(&p, "169.254.3.4", 80).unwrap();
        let e = check(&p, "169.254.169.254", 80).unwrap_err();
        assert!(e.contains("instance-metadata"), "{e}");
        check(&policy(&["169.254.169.254"]), "169.254.169.254", 80).unwrap();
    }

    #[test]
    fn a_list_allows_only_what_it_names() {
        let p = policy(&[
            "minio.storage.svc:9000",
            "*.amazonaws.com:443",
            "10.20.0.0/16:9000-9010",
            "[fd00::/8]:9000",
        ]);
        check(&p, "minio.storage.svc", 9000).unwrap();
        let e = check(&p, "minio.storage.svc", 9001).unwrap_err();
        assert!(e.contains("port 9001 is not allowed"), "{e}");
        check(&p, "bucket.s3.us-east-1.amazonaws.com", 443).unwrap();
        assert!(check(&p, "amazonaws.com.evil.example", 443).is_err());
        assert!(check(&p, "evilamazonaws.com", 443).is_err());
        check(&p, "10.20.1.1", 9005).unwrap();
        let e = check(&p, "10.20.1.1", 9011).unwrap_err();
        assert!(e.contains("port 9011 is not allowed"), "{e}");
        assert!(check(&p, "10.21.1.1", 9000).is_err());
        check(&p, "fd00::5", 9000).unwrap();
        // A name no entry names may still pass by its addresses (checked after resolving).
        check(&p, "other.example", 9000).unwrap();
        assert!(check(&p, "other.example", 80).is_err());
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            p.check_resolved("other.example", [a("10.20.0.7:0"), a("10.99.0.7:0")])
                .unwrap(),
            vec![a("10.20.0.7:0")]
        );
        assert!(p
            .check_resolved("other.example", [a("10.99.0.7:0")])
            .is_err());
        // A name entry lets its addresses through, but never into a refused class.
        p.check_resolved("minio.storage.svc", [a("10.99.0.7:0")])
            .unwrap();
        let e = p
            .check_resolved("minio.storage.svc", [a("127.0.0.1:0")])
            .unwrap_err();
        assert!(e.contains("loopback") && e.contains(KEY), "{e}");
    }

    #[test]
    fn entries_are_checked() {
        for bad in [
            "",
            "a b",
            "host:0",
            "host:99999",
            "host:9-1",
            "*.",
            "[::1",
            "1.2.3.4/40",
        ] {
            let e = EndpointPolicy::new(&[bad.to_string()], false).unwrap_err();
            assert!(e.contains("is not HOST"), "{bad}: {e}");
        }
        assert!(EndpointPolicy::unrestricted()
            .check(Destination {
                key: "k",
                host: "169.254.169.254",
                port: 80
            })
            .is_ok());
    }

    #[test]
    fn urls_are_redacted_and_replies_cut() {
        let u = url::Url::parse("http://user:secret@proxy.example:3128").unwrap();
        assert_eq!(redact(&u), "http://***@proxy.example:3128/");
        assert_eq!(excerpt("a\n\n\u{1b}[31mb   c", 100), "a [31mb c");
        assert_eq!(
            excerpt(&"x".repeat(500), 10),
            format!("{}…", "x".repeat(10))
        );
    }
}
