//! The live storage address: discovered at start, re-checked on netlink address events and
//! periodically (for network-status file refreshes), and used to label local addresses.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use lhnet_netns::discovery::{
    interface_subnets, other_addresses, other_interfaces as if_names_except, Subnet,
};
use lhnet_netns::{discover, AddressWatcher, Fallback, StorageAddress, StorageNetworkSpec};
use tokio::sync::watch;

use crate::config::StorageNetworkConfig;
use crate::metrics::{Metrics, Network};

/// How often discovery runs even without netlink events (network-status is a file).
const RECHECK_EVERY: Duration = Duration::from_secs(10);

/// The storage address as it is now, shared by everything that binds or labels sockets.
pub struct StorageState {
    spec: StorageNetworkSpec,
    current: watch::Sender<Option<StorageAddress>>,
    last_error: Mutex<Option<String>>,
    device_cache: Mutex<HashMap<IpAddr, (String, Network)>>,
    /// The subnets of the storage address's device, re-read on every refresh; read without a
    /// lock, as every engine-proxy request checks its addresses against them.
    subnets: ArcSwap<Vec<Subnet>>,
    metrics: Arc<Metrics>,
}

impl StorageState {
    /// Discovers the address once. `pod_ip` comes from the caller (the binary reads `POD_IP`).
    pub fn new(
        config: &StorageNetworkConfig,
        pod_ip: Option<IpAddr>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let spec = StorageNetworkSpec {
            interface: config.interface.clone(),
            network: config.network.clone(),
            network_status_file: config.network_status_file.clone(),
            fallback: config.fallback,
            pod_ip,
        };
        let state = Arc::new(StorageState {
            spec,
            current: watch::channel(None).0,
            last_error: Mutex::new(None),
            device_cache: Mutex::new(HashMap::new()),
            subnets: ArcSwap::from_pointee(Vec::new()),
            metrics,
        });
        state.refresh();
        state
    }

    pub fn current(&self) -> Option<StorageAddress> {
        self.current.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<StorageAddress>> {
        self.current.subscribe()
    }

    pub fn interface(&self) -> &str {
        &self.spec.interface
    }

    /// The pod's management address (`POD_IP`), used for `source_address: management`.
    pub fn management_address(&self) -> Option<IpAddr> {
        self.spec.pod_ip
    }

    /// Why there is no storage address, when there is none.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// Ready unless `fallback: wait` and the storage interface has no address yet.
    pub fn is_ready(&self) -> bool {
        self.spec.fallback != Fallback::Wait || self.current.borrow().is_some()
    }

    /// Runs discovery again; logs once when the address changes.
    pub fn refresh(&self) {
        let found = discover(&self.spec);
        let next = match &found {
            Ok(addr) => Some(addr.clone()),
            Err(_) => None,
        };
        {
            let mut last = self.last_error.lock();
            let err = found.as_ref().err().map(|e| e.to_string());
            if err.is_some() && *last != err {
                tracing::warn!(interface = %self.spec.interface, "{}", err.as_deref().unwrap_or_default());
            }
            *last = err;
        }
        let subnets = next
            .as_ref()
            .and_then(|a| a.device.as_deref())
            .map(interface_subnets)
            .unwrap_or_default();
        self.subnets.store(Arc::new(subnets));
        let changed = self.current.send_if_modified(|cur| {
            if *cur == next {
                return false;
            }
            let old = cur.as_ref().map(|a| a.ip.to_string()).unwrap_or_else(|| "none".into());
            let new = next.as_ref().map(|a| a.ip.to_string()).unwrap_or_else(|| "none".into());
            let source = next.as_ref().map(|a| a.source.as_str()).unwrap_or("none");
            tracing::info!(network = "storage", old = %old, new = %new, source, "storage address changed");
            *cur = next.clone();
            true
        });
        if changed {
            self.device_cache.lock().clear();
            let labels = next.as_ref().map(|a| {
                (
                    a.device.clone().unwrap_or_else(|| "unknown".into()),
                    a.ip.to_string(),
                    a.source.as_str(),
                )
            });
            self.metrics.set_storage_address(
                labels
                    .as_ref()
                    .map(|(d, a, s)| (d.as_str(), a.as_str(), *s)),
            );
        }
    }

    /// Follows netlink address events on the storage interface until the task is dropped.
    pub async fn follow(self: Arc<Self>) {
        let mut watcher = match AddressWatcher::new(&self.spec.interface) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    interface = %self.spec.interface, error = %e,
                    "cannot watch addresses over netlink; re-checking every {}s instead",
                    RECHECK_EVERY.as_secs()
                );
                None
            }
        };
        loop {
            match watcher.as_mut() {
                Some(w) => {
                    tokio::select! {
                        events = w.next() => match events {
                            Ok(events) => tracing::debug!(?events, "storage interface address events"),
                            Err(e) => {
                                tracing::warn!(error = %e, "netlink watch failed; re-checking periodically");
                                watcher = None;
                            }
                        },
                        _ = tokio::time::sleep(RECHECK_EVERY) => {}
                    }
                }
                None => tokio::time::sleep(RECHECK_EVERY).await,
            }
            self.refresh();
        }
    }

    /// Whether `ip` is the storage address or on one of its device's subnets (a peer on the
    /// storage network). Cached: no system call per check.
    pub fn on_storage_network(&self, ip: IpAddr) -> bool {
        if self.current.borrow().as_ref().is_some_and(|a| a.ip == ip) {
            return true;
        }
        self.subnets.load().iter().any(|s| s.contains(ip))
    }

    /// The pod's management address: `POD_IP`, else the first address of an interface other
    /// than loopback and the storage interface (IPv4 first).
    pub fn own_management_address(&self) -> Option<IpAddr> {
        if let Some(ip) = self.spec.pod_ip {
            return Some(ip);
        }
        let others = other_addresses(&self.spec.interface);
        others
            .iter()
            .copied()
            .find(IpAddr::is_ipv4)
            .or_else(|| others.first().copied())
    }

    /// Whether `ip` is on a subnet of one of this pod's management interfaces (any interface
    /// but loopback and the storage one).
    pub fn on_management_network(&self, ip: IpAddr) -> bool {
        if_names_except(&self.spec.interface)
            .iter()
            .any(|name| interface_subnets(name).iter().any(|s| s.contains(ip)))
    }

    /// Whether `ip` is one of this pod's own management addresses.
    pub fn is_own_management_address(&self, ip: IpAddr) -> bool {
        self.spec.pod_ip == Some(ip) || other_addresses(&self.spec.interface).contains(&ip)
    }

    /// The device and network of a local address, for byte metrics and connection logs.
    pub fn classify(&self, local: IpAddr) -> (String, Network) {
        if local.is_loopback() {
            return ("lo".into(), Network::Loopback);
        }
        if let Some(hit) = self.device_cache.lock().get(&local).cloned() {
            return hit;
        }
        let device =
            lhnet_netns::discovery::device_for_ip(local).unwrap_or_else(|| "unknown".into());
        let is_storage = device == self.spec.interface
            || self
                .current
                .borrow()
                .as_ref()
                .is_some_and(|a| a.ip == local);
        let network = if is_storage {
            Network::Storage
        } else {
            Network::Management
        };
        self.device_cache
            .lock()
            .insert(local, (device.clone(), network));
        (device, network)
    }
}
