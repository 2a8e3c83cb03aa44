//! Finding the storage address: the storage interface, then Multus' network-status, then the pod IP.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::network_status::{parse_network_status, pick_ip};

/// What to do when neither the interface nor network-status gives an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Use the pod IP (Longhorn's own behaviour when the storage network is missing).
    PodIp,
    /// Wait for the storage interface; not ready until it has an address.
    Wait,
}

/// Where to look for the storage address. Built from config; `pod_ip` is injected by the caller
/// (the binary reads `POD_IP`), so tests never touch the process environment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StorageNetworkSpec {
    pub interface: String,
    pub network: Option<String>,
    pub network_status_file: Option<PathBuf>,
    pub fallback: Fallback,
    pub pod_ip: Option<IpAddr>,
}

/// Which source the storage address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressSource {
    Interface,
    NetworkStatus,
    PodIp,
}

/// The storage address and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StorageAddress {
    pub ip: IpAddr,
    /// The device that holds `ip` in this namespace, when known.
    pub device: Option<String>,
    pub source: AddressSource,
}

/// No source gave a storage address; `reasons` says what each source said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryError {
    pub interface: String,
    pub fallback: Fallback,
    pub reasons: Vec<String>,
}

// === impl AddressSource ===

impl AddressSource {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressSource::Interface => "interface",
            AddressSource::NetworkStatus => "network_status",
            AddressSource::PodIp => "pod_ip",
        }
    }
}

impl fmt::Display for AddressSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl DiscoveryError ===

impl fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no storage address yet: {}", self.reasons.join("; "))?;
        match self.fallback {
            Fallback::Wait => write!(
                f,
                ". Waiting for {} (fallback: wait); set storage_network.fallback: pod_ip to start without it",
                self.interface
            ),
            Fallback::PodIp => write!(
                f,
                ". Set POD_IP (downward API status.podIP) or attach {} to the pod",
                self.interface
            ),
        }
    }
}

impl std::error::Error for DiscoveryError {}

/// Finds the storage address now, in DESIGN §5 order.
pub fn discover(spec: &StorageNetworkSpec) -> Result<StorageAddress, DiscoveryError> {
    let mut reasons = Vec::new();

    let on_interface = interface_addresses(&spec.interface);
    if let Some(ip) = preferred(&on_interface) {
        return Ok(StorageAddress {
            ip,
            device: Some(spec.interface.clone()),
            source: AddressSource::Interface,
        });
    }
    reasons.push(format!(
        "storage interface {} has no IP address",
        spec.interface
    ));

    match (&spec.network, &spec.network_status_file) {
        (Some(network), Some(path)) => match from_network_status(network, path) {
            Ok(found) => return Ok(found),
            Err(reason) => reasons.push(reason),
        },
        (None, Some(_)) => reasons.push(
            "network_status_file is set but storage_network.network is not, so no entry can be picked".into(),
        ),
        _ => {}
    }

    if spec.fallback == Fallback::PodIp {
        match spec.pod_ip {
            Some(ip) => {
                return Ok(StorageAddress {
                    ip,
                    device: device_for_ip(ip),
                    source: AddressSource::PodIp,
                })
            }
            None => reasons.push("POD_IP is not set".into()),
        }
    }

    Err(DiscoveryError {
        interface: spec.interface.clone(),
        fallback: spec.fallback,
        reasons,
    })
}

fn from_network_status(network: &str, path: &PathBuf) -> Result<StorageAddress, String> {
    let contents = std::fs::read_to_string(path)
        .map_err(|e| format!("network-status file {}: {e}", path.display()))?;
    let entries = parse_network_status(&contents)
        .map_err(|e| format!("network-status file {}: {e}", path.display()))?;
    let (entry, ip) = pick_ip(&entries, network).ok_or_else(|| {
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        format!(
            "network-status file {} has no entry named {network} with an IP (entries: {names:?})",
            path.display()
        )
    })?;
    let ip: IpAddr = ip.parse().map_err(|e| {
        format!(
            "network-status file {}: entry {network} has a bad IP {ip:?}: {e}",
            path.display()
        )
    })?;
    Ok(StorageAddress {
        ip,
        device: entry.interface.clone().or_else(|| device_for_ip(ip)),
        source: AddressSource::NetworkStatus,
    })
}

/// Every IP address on the named interface in this namespace (IPv4 first, then IPv6).
pub fn interface_addresses(interface: &str) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.name == interface)
        .map(|i| i.ip())
        .collect();
    ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    ips
}

/// The name of the device that holds `ip` in this namespace.
pub fn device_for_ip(ip: IpAddr) -> Option<String> {
    if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .find(|i| i.ip() == ip)
        .map(|i| i.name)
}

/// Whether `ip` is inside one of the subnets configured on `interface`.
pub fn on_interface_subnet(interface: &str, ip: IpAddr) -> bool {
    interface_subnets(interface).iter().any(|s| s.contains(ip))
}

/// One address of an interface with its netmask: the subnet it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub addr: IpAddr,
    pub mask: IpAddr,
}

impl Subnet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, self.mask, ip) {
            (IpAddr::V4(a), IpAddr::V4(m), IpAddr::V4(x)) => {
                u32::from(x) & u32::from(m) == u32::from(a) & u32::from(m)
            }
            (IpAddr::V6(a), IpAddr::V6(m), IpAddr::V6(x)) => {
                u128::from(x) & u128::from(m) == u128::from(a) & u128::from(m)
            }
            _ => false,
        }
    }
}

/// The subnets of every address `interface` has now.
pub fn interface_subnets(interface: &str) -> Vec<Subnet> {
    if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.name == interface)
        .map(|i| match i.addr {
            if_addrs::IfAddr::V4(v4) => Subnet {
                addr: IpAddr::V4(v4.ip),
                mask: IpAddr::V4(v4.netmask),
            },
            if_addrs::IfAddr::V6(v6) => Subnet {
                addr: IpAddr::V6(v6.ip),
                mask: IpAddr::V6(v6.netmask),
            },
        })
        .collect()
}

/// Names of every interface except loopback and `except` (the storage interface).
pub fn other_interfaces(except: &str) -> Vec<String> {
    let mut names: Vec<String> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.name != except && !i.is_loopback())
        .map(|i| i.name)
        .collect();
    names.dedup();
    names
}

/// Addresses of every interface except loopback and `except` (the storage interface): the
/// pod's management addresses.
pub fn other_addresses(except: &str) -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.name != except && !i.is_loopback())
        .map(|i| i.ip())
        .collect()
}

/// IPv4 before IPv6; IPv6 link-local addresses cannot be bound without a scope, so skip them.
fn preferred(ips: &[IpAddr]) -> Option<IpAddr> {
    ips.iter().copied().find(|ip| match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(fallback: Fallback) -> StorageNetworkSpec {
        StorageNetworkSpec {
            interface: "lhnet-test-none".into(),
            network: None,
            network_status_file: None,
            fallback,
            pod_ip: None,
        }
    }

    #[test]
    fn loopback_interface_is_found() {
        let mut s = spec(Fallback::Wait);
        s.interface = "lo".into();
        let found = discover(&s).unwrap();
        assert_eq!(found.ip, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(found.source, AddressSource::Interface);
        assert_eq!(found.device.as_deref(), Some("lo"));
    }

    #[test]
    fn network_status_then_pod_ip() {
        let dir = std::env::temp_dir().join(format!("lhnet-ns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("annotations");
        std::fs::write(
            &file,
            r#"[{"name":"ns/net","interface":"lhnet1","ips":["10.30.0.7"]}]"#,
        )
        .unwrap();

        let mut s = spec(Fallback::PodIp);
        s.network = Some("ns/net".into());
        s.network_status_file = Some(file.clone());
        s.pod_ip = Some("10.42.0.5".parse().unwrap());
        let found = discover(&s).unwrap();
        assert_eq!(
            (found.ip.to_string(), found.source),
            ("10.30.0.7".into(), AddressSource::NetworkStatus)
        );
        assert_eq!(found.device.as_deref(), Some("lhnet1"));

        s.network = Some("ns/other".into());
        let found = discover(&s).unwrap();
        assert_eq!(
            (found.ip.to_string(), found.source),
            ("10.42.0.5".into(), AddressSource::PodIp)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wait_reports_every_reason() {
        let mut s = spec(Fallback::Wait);
        s.network = Some("ns/net".into());
        s.network_status_file = Some("/nonexistent/annotations".into());
        s.pod_ip = Some("10.42.0.5".parse().unwrap());
        let err = discover(&s).unwrap_err().to_string();
        assert!(
            err.contains("storage interface lhnet-test-none has no IP address"),
            "{err}"
        );
        assert!(err.contains("/nonexistent/annotations"), "{err}");
        assert!(err.contains("fallback: wait"), "{err}");
    }

    #[test]
    fn subnet_of_loopback() {
        assert!(on_interface_subnet("lo", "127.9.9.9".parse().unwrap()));
        assert!(!on_interface_subnet("lo", "10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn skips_link_local_v6() {
        let ll: IpAddr = "fe80::1".parse().unwrap();
        let global: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(preferred(&[ll, global]), Some(global));
        assert_eq!(preferred(&[ll]), None);
    }
}
