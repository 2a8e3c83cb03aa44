//! Test topologies made of real network namespaces, bridges and veth pairs (via iproute2).
//!
//! All bridges live in a private "hub" namespace, so nothing is added to the host's namespace and
//! deleting the namespaces removes every link. Everything is deleted on drop, also while a
//! panicking test unwinds.

use std::io;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(0);

/// A set of namespaces and bridges that is torn down on drop.
pub struct Topology {
    prefix: String,
    hub: Namespace,
    namespaces: Vec<Namespace>,
    next_link: u32,
}

/// A network namespace made by a [`Topology`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
}

// === impl Topology ===

impl Topology {
    /// True when this process can build topologies (it is root).
    pub fn can_build() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Creates the hub namespace. `tag` is a short word that shows up in namespace names.
    pub fn new(tag: &str) -> io::Result<Self> {
        let seq = NEXT_TOPOLOGY.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("lh{}x{seq}-{tag}", std::process::id());
        let hub = Namespace {
            name: format!("{prefix}-hub"),
        };
        ip(&["netns", "add", &hub.name])?;
        let topology = Topology {
            prefix,
            hub,
            namespaces: Vec::new(),
            next_link: 0,
        };
        topology.ip_in(&topology.hub, &["link", "set", "lo", "up"])?;
        Ok(topology)
    }

    /// Adds a bridge (a network segment) in the hub.
    pub fn add_bridge(&mut self, bridge: &str) -> io::Result<()> {
        self.ip_in(&self.hub, &["link", "add", bridge, "type", "bridge"])?;
        self.ip_in(&self.hub, &["link", "set", bridge, "up"])
    }

    /// Adds a namespace with loopback up. `name` is a short role (`manager`, `pod-a`).
    pub fn add_namespace(&mut self, name: &str) -> io::Result<Namespace> {
        let ns = Namespace {
            name: format!("{}-{name}", self.prefix),
        };
        ip(&["netns", "add", &ns.name])?;
        self.namespaces.push(ns.clone());
        self.ip_in(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Plugs `ns` into `bridge` with a veth pair whose end inside `ns` is named `ifname`, brings
    /// it up, and gives it `cidr` (`10.30.0.2/24`) when one is given.
    pub fn attach(
        &mut self,
        ns: &Namespace,
        ifname: &str,
        bridge: &str,
        cidr: Option<&str>,
    ) -> io::Result<()> {
        self.next_link += 1;
        let hub_end = format!("vh{}", self.next_link);
        let pod_end = format!("vp{}", self.next_link);
        self.ip_in(
            &self.hub,
            &[
                "link", "add", &hub_end, "type", "veth", "peer", "name", &pod_end, "netns",
                &ns.name,
            ],
        )?;
        self.ip_in(
            &self.hub,
            &["link", "set", &hub_end, "master", bridge, "up"],
        )?;
        self.ip_in(ns, &["link", "set", &pod_end, "name", ifname])?;
        self.ip_in(ns, &["link", "set", ifname, "up"])?;
        if let Some(cidr) = cidr {
            self.add_address(ns, ifname, cidr)?;
        }
        Ok(())
    }

    /// Adds an address to a device; `nodad` makes IPv6 addresses usable at once.
    pub fn add_address(&self, ns: &Namespace, ifname: &str, cidr: &str) -> io::Result<()> {
        if cidr.contains(':') {
            self.ip_in(ns, &["addr", "add", cidr, "dev", ifname, "nodad"])
        } else {
            self.ip_in(ns, &["addr", "add", cidr, "dev", ifname])
        }
    }

    pub fn del_address(&self, ns: &Namespace, ifname: &str, cidr: &str) -> io::Result<()> {
        self.ip_in(ns, &["addr", "del", cidr, "dev", ifname])
    }

    /// Adds a route in `ns`, e.g. `add_route(ns, "10.30.0.0/16", "via 10.30.0.1")`.
    pub fn add_route(&self, ns: &Namespace, destination: &str, how: &str) -> io::Result<()> {
        let mut args = vec!["route", "add", destination];
        args.extend(how.split_whitespace());
        self.ip_in(ns, &args)
    }

    /// Sets a device in `ns` down or up.
    pub fn set_link(&self, ns: &Namespace, ifname: &str, up: bool) -> io::Result<()> {
        self.ip_in(ns, &["link", "set", ifname, if up { "up" } else { "down" }])
    }

    /// A command that runs `program` inside `ns` (`ip netns exec`).
    pub fn command(&self, ns: &Namespace, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(&ns.name).arg(program);
        cmd
    }

    /// Runs `ip -n NS ARGS…`.
    pub fn ip_in(&self, ns: &Namespace, args: &[&str]) -> io::Result<()> {
        let mut full = vec!["-n", ns.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self
            .namespaces
            .iter()
            .rev()
            .chain(std::iter::once(&self.hub))
        {
            if let Err(e) = ip(&["netns", "del", &ns.name]) {
                tracing::warn!(namespace = %ns.name, error = %e, "could not delete test namespace");
            }
        }
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out: Output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running ip (iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        counters::read_device_counters, discovery::interface_addresses, namespace::run_in,
    };

    #[test]
    fn builds_and_tears_down() {
        if !Topology::can_build() {
            eprintln!("skipped: building namespaces needs root");
            return;
        }
        let names;
        {
            let mut topo = Topology::new("unit").unwrap();
            topo.add_bridge("stor").unwrap();
            let a = topo.add_namespace("a").unwrap();
            let b = topo.add_namespace("b").unwrap();
            topo.attach(&a, "lhnet1", "stor", Some("10.77.0.1/24"))
                .unwrap();
            topo.attach(&b, "lhnet1", "stor", Some("10.77.0.2/24"))
                .unwrap();
            names = vec![a.name.clone(), b.name.clone()];

            let addrs = run_in(&a.name, || interface_addresses("lhnet1")).unwrap();
            assert_eq!(
                addrs,
                vec!["10.77.0.1".parse::<std::net::IpAddr>().unwrap()]
            );

            // A TCP round trip from a to b crosses the bridge and shows in a's lhnet1 counters.
            let listener = run_in(&b.name, || std::net::TcpListener::bind("10.77.0.2:0"))
                .unwrap()
                .unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = std::thread::spawn(move || {
                use std::io::Read;
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).unwrap();
                buf.len()
            });
            let before = run_in(&a.name, read_device_counters).unwrap().unwrap()["lhnet1"];
            run_in(&a.name, move || {
                use std::io::Write;
                let mut s = std::net::TcpStream::connect(("10.77.0.2", port)).unwrap();
                s.write_all(&vec![7u8; 100_000]).unwrap();
            })
            .unwrap();
            assert_eq!(server.join().unwrap(), 100_000);
            let after = run_in(&a.name, read_device_counters).unwrap().unwrap()["lhnet1"];
            assert!(
                after.tx_bytes - before.tx_bytes >= 100_000,
                "{before:?} -> {after:?}"
            );
        }
        let list = String::from_utf8(
            Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        for name in names {
            assert!(!list.contains(&name), "{name} left behind");
        }
    }
}
