//! Watches the addresses of one interface over netlink.
//!
//! The socket joins the link and address multicast groups and serves only as a wake-up: after any
//! message the interface's addresses are read again and compared, so a lost or unparsed message
//! (or a socket overrun) can never leave the watcher out of date.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;

use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;

use crate::discovery::interface_addresses;

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// A change to the watched interface's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressEvent {
    Added(IpAddr),
    Removed(IpAddr),
}

/// Reports address changes on one interface. Create it inside a tokio runtime.
pub struct AddressWatcher {
    interface: String,
    socket: AsyncFd<OwnedFd>,
    current: BTreeSet<IpAddr>,
}

impl AddressWatcher {
    /// Starts watching `interface` in the calling thread's network namespace. The addresses it has
    /// now are the baseline (see [`AddressWatcher::current`]); only later changes are events.
    pub fn new(interface: &str) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, groups),
        )?;
        Ok(AddressWatcher {
            interface: interface.to_string(),
            socket: register(fd)?,
            current: interface_addresses(interface).into_iter().collect(),
        })
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The interface's addresses as of the last event.
    pub fn current(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.current.iter().copied()
    }

    /// Waits for the next change and returns it (never an empty list).
    pub async fn next(&mut self) -> io::Result<Vec<AddressEvent>> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = self.socket.readable().await?;
            // Drain everything queued; the content does not matter, only that something changed.
            loop {
                match recv(
                    std::os::fd::AsRawFd::as_raw_fd(guard.get_inner()),
                    &mut buf,
                    MsgFlags::empty(),
                ) {
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    // The kernel dropped messages for us; a re-read below catches up.
                    Err(nix::errno::Errno::ENOBUFS) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let now: BTreeSet<IpAddr> = interface_addresses(&self.interface).into_iter().collect();
            let mut events: Vec<AddressEvent> = self
                .current
                .difference(&now)
                .map(|ip| AddressEvent::Removed(*ip))
                .collect();
            events.extend(
                now.difference(&self.current)
                    .map(|ip| AddressEvent::Added(*ip)),
            );
            self.current = now;
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}

/// Registers the socket with tokio's reactor.
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and names the same
    // socket until the AsyncFd is dropped; OwnedFd::as_raw_fd always returns that descriptor.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{namespace::spawn_in, topology::Topology};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn reports_added_and_removed_addresses() {
        if !Topology::can_build() {
            eprintln!("skipped: building namespaces needs root");
            return;
        }
        let mut topo = Topology::new("watch").unwrap();
        topo.add_bridge("stor").unwrap();
        let ns = topo.add_namespace("pod").unwrap();
        topo.attach(&ns, "lhnet1", "stor", None).unwrap();

        let (ready_tx, ready_rx) = mpsc::channel();
        let (seen_tx, seen_rx) = mpsc::channel();
        let watcher = spawn_in(&ns.name, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut w = AddressWatcher::new("lhnet1").unwrap();
                assert_eq!(w.current().count(), 0);
                ready_tx.send(()).unwrap();
                for _ in 0..2 {
                    let events = tokio::time::timeout(Duration::from_secs(5), w.next())
                        .await
                        .unwrap()
                        .unwrap();
                    seen_tx.send(events).unwrap();
                }
            })
        })
        .unwrap();

        ready_rx.recv().unwrap();
        topo.add_address(&ns, "lhnet1", "10.78.0.1/24").unwrap();
        let ip: IpAddr = "10.78.0.1".parse().unwrap();
        assert_eq!(seen_rx.recv().unwrap(), vec![AddressEvent::Added(ip)]);
        topo.del_address(&ns, "lhnet1", "10.78.0.1/24").unwrap();
        assert_eq!(seen_rx.recv().unwrap(), vec![AddressEvent::Removed(ip)]);
        watcher.join().unwrap().unwrap();
    }
}
