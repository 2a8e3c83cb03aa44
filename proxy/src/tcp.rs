//! L4 storage listeners (`kind: tcp`): every accepted connection is forwarded whole to a local
//! process (`loopback`: 127.0.0.1 and the same port) or a static cluster. Bytes move with
//! `splice(2)` through a pipe, never entering user space; where the kernel refuses, a copy loop
//! takes over. A half-close on one side is passed on to the other. Listeners on the storage
//! address follow it: when it changes they rebind on the new one, and connections accepted on
//! the old one run on until they end (or `drain_timeout` at shutdown).

use parking_lot::Mutex;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lhnet_netns::StorageAddress;
use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::cluster::TcpConnectError;
use crate::config::{format_duration, ListenAddress, ListenerConfig};
use crate::metrics::{ByteCounters, ConnectionGuard, Metrics, Network};
use crate::storage::StorageState;

/// How long a `loopback` forward waits for the local process to accept.
const LOOPBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes per splice call (the pipe holds 64 KiB by default).
const CHUNK: usize = 64 << 10;
/// What the pipe of a connection moving bulk data is grown to (`fs.pipe-max-size`'s default).
const BULK_PIPE: usize = 1 << 20;
/// At most this many pipes are grown at once. A user's pipes count against
/// `fs.pipe-user-pages-soft` (16384 pages by default); an unprivileged user past it gets
/// 8 KiB pipes for every new one, lhnet's and its neighbours' alike. 16 grown pipes take a
/// quarter of it.
const MAX_BULK_PIPES: usize = 16;
/// What a connection has moved one way when its pipe is grown.
const GROW_AFTER: u64 = 1 << 20;
static BULK_PIPES: AtomicUsize = AtomicUsize::new(0);
/// How often ports that could not be bound are tried again.
pub(crate) const REBIND_EVERY: Duration = Duration::from_secs(1);

/// Where a tcp listener's connections go.
pub enum Upstream {
    /// 127.0.0.1 (or ::1) and the port the connection arrived on; never the admin port
    /// (`POST /shutdown` trusts loopback peers, and this forward's peer is loopback).
    Loopback {
        admin_port: u16,
    },
    Cluster(Arc<Cluster>),
}

/// One `kind: tcp` listener: its sockets (one per port) and the connections they accepted.
pub struct TcpForwarder {
    name: String,
    address: ListenAddress,
    upstream: Upstream,
    storage: Arc<StorageState>,
    metrics: Arc<Metrics>,
    bound: Arc<Mutex<Vec<SocketAddr>>>,
}

/// What [`TcpForwarder::bind_initial`] bound.
pub struct Initial {
    ip: Option<IpAddr>,
    listeners: Vec<TcpListener>,
    missing: Vec<u16>,
    /// Subscribed before the first bind, so a change while binding is not missed.
    changes: watch::Receiver<Option<StorageAddress>>,
}

/// The bound sockets of a storage listener at one address.
struct Generation {
    ip: Option<IpAddr>,
    stop: CancellationToken,
    missing: Vec<u16>,
}

impl TcpForwarder {
    pub fn new(
        config: &ListenerConfig,
        upstream: Upstream,
        storage: Arc<StorageState>,
        metrics: Arc<Metrics>,
    ) -> Arc<TcpForwarder> {
        Arc::new(TcpForwarder {
            name: config.name.clone(),
            address: config.address,
            upstream,
            storage,
            metrics,
            bound: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The addresses bound right now (they change with the storage address).
    pub fn bound(&self) -> Arc<Mutex<Vec<SocketAddr>>> {
        self.bound.clone()
    }

    /// Binds what can be bound now, so that the listener accepts as soon as `app::start`
    /// returns: a fixed address (a port in use fails the start with a clear error), or the
    /// storage address when there is one (ports that fail are retried by [`TcpForwarder::run`]).
    pub async fn bind_initial(&self) -> Result<Initial, String> {
        let changes = self.storage.subscribe();
        let (ip, listeners, missing) = self.bind_initial_inner().await?;
        self.add_bound(
            listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .collect(),
        );
        Ok(Initial {
            ip,
            listeners,
            missing,
            changes,
        })
    }

    /// The address bound (if any), its listeners and the ports to retry.
    async fn bind_initial_inner(
        &self,
    ) -> Result<(Option<IpAddr>, Vec<TcpListener>, Vec<u16>), String> {
        match self.address.fixed_ip() {
            Some(ip) => {
                let (listeners, failures) = self.bind_ports(ip, self.address.ports()).await;
                if let Some((port, e)) = failures.into_iter().next() {
                    return Err(format!(
                        "listener {}: cannot bind {}: {e}",
                        self.name,
                        SocketAddr::new(ip, port)
                    ));
                }
                Ok((Some(ip), listeners, Vec::new()))
            }
            None => {
                let Some(ip) = self.storage.current().map(|a| a.ip) else {
                    return Ok((None, Vec::new(), Vec::new()));
                };
                let (listeners, missing) = self.bind_storage(ip).await;
                Ok((Some(ip), listeners, missing))
            }
        }
    }

    /// Binds every port on storage address `ip`; ports that fail are logged and returned, to be
    /// retried every [`REBIND_EVERY`].
    async fn bind_storage(&self, ip: IpAddr) -> (Vec<TcpListener>, Vec<u16>) {
        let (listeners, failures) = self.bind_ports(ip, self.address.ports()).await;
        self.log_failures(ip, &failures);
        (listeners, failures.into_iter().map(|(p, _)| p).collect())
    }

    fn log_failures(&self, ip: IpAddr, failures: &[(u16, io::Error)]) {
        for (port, e) in failures {
            tracing::warn!(
                network = "storage", listener = %self.name, address = %SocketAddr::new(ip, *port),
                error = %e, "cannot bind; trying again every {}s", REBIND_EVERY.as_secs()
            );
        }
    }

    async fn bind_ports(
        &self,
        ip: IpAddr,
        ports: impl IntoIterator<Item = u16>,
    ) -> (Vec<TcpListener>, Vec<(u16, io::Error)>) {
        let mut listeners = Vec::new();
        let mut failures = Vec::new();
        for port in ports {
            match TcpListener::bind(SocketAddr::new(ip, port)).await {
                Ok(l) => listeners.push(l),
                Err(e) => failures.push((port, e)),
            }
        }
        (listeners, failures)
    }

    /// Serves until `shutdown`; then waits up to `drain_timeout` for open connections.
    pub async fn run(
        self: Arc<Self>,
        initial: Initial,
        shutdown: CancellationToken,
        drain_timeout: Duration,
    ) {
        let connections = TaskTracker::new();
        let kill = CancellationToken::new();
        let mut changes = initial.changes;
        let mut generation = if initial.ip.is_some() {
            let stop = CancellationToken::new();
            self.serve_all(initial.listeners, &stop, &connections, &kill);
            Generation {
                ip: initial.ip,
                stop,
                missing: initial.missing,
            }
        } else {
            self.start_generation(None, &connections, &kill).await
        };
        loop {
            let retry = !generation.missing.is_empty();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = changes.changed(), if self.address.fixed_ip().is_none() => {
                    if changed.is_err() {
                        shutdown.cancelled().await;
                        break;
                    }
                    let ip = self.storage.current().map(|a| a.ip);
                    if ip == generation.ip {
                        continue;
                    }
                    let show = |ip: Option<IpAddr>| ip.map(|i| i.to_string()).unwrap_or_else(|| "none".into());
                    tracing::info!(
                        network = "storage", listener = %self.name, old = %show(generation.ip), new = %show(ip),
                        "storage address changed; rebinding (connections on the old address run on)"
                    );
                    generation.stop.cancel();
                    generation = self.start_generation(ip, &connections, &kill).await;
                }
                _ = tokio::time::sleep(REBIND_EVERY), if retry => {
                    if let Some(ip) = generation.ip {
                        let (listeners, failures) = self.bind_ports(ip, generation.missing.clone()).await;
                        generation.missing = failures.into_iter().map(|(p, _)| p).collect();
                        self.serve_all(listeners, &generation.stop, &connections, &kill);
                        if generation.missing.is_empty() {
                            tracing::info!(listener = %self.name, address = %ip, "every port bound");
                        }
                    }
                }
            }
        }
        generation.stop.cancel();
        self.set_bound(Vec::new());
        connections.close();
        if !connections.is_empty() {
            tracing::info!(listener = %self.name, connections = connections.len(), "draining");
        }
        if tokio::time::timeout(drain_timeout, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = %self.name,
                "connections still open after drain_timeout {}; closing them",
                format_duration(drain_timeout)
            );
            kill.cancel();
            connections.wait().await;
        }
    }

    async fn start_generation(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        connections: &TaskTracker,
        kill: &CancellationToken,
    ) -> Generation {
        let stop = CancellationToken::new();
        let Some(ip) = ip else {
            self.set_bound(Vec::new());
            tracing::warn!(
                network = "storage", listener = %self.name,
                "no storage address yet; the listener binds when {} gets one: {}",
                self.storage.interface(),
                self.storage.last_error().unwrap_or_default()
            );
            return Generation {
                ip: None,
                stop,
                missing: Vec::new(),
            };
        };
        let (listeners, missing) = self.bind_storage(ip).await;
        self.set_bound(Vec::new());
        self.serve_all(listeners, &stop, connections, kill);
        Generation {
            ip: Some(ip),
            stop,
            missing,
        }
    }

    fn add_bound(&self, addrs: Vec<SocketAddr>) {
        let mut b = self.bound.lock();
        b.extend(addrs);
        b.sort();
        b.dedup();
    }

    fn set_bound(&self, addrs: Vec<SocketAddr>) {
        *self.bound.lock() = addrs;
    }

    fn serve_all(
        self: &Arc<Self>,
        listeners: Vec<TcpListener>,
        stop: &CancellationToken,
        connections: &TaskTracker,
        kill: &CancellationToken,
    ) {
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        if let Some(first) = addrs.first() {
            tracing::info!(
                listener = %self.name, address = %first, ports = addrs.len(),
                "listening (tcp, forwarding to {})", self.upstream_name()
            );
        }
        self.add_bound(addrs);
        for listener in listeners {
            let me = self.clone();
            tokio::spawn(me.accept_loop(listener, stop.clone(), connections.clone(), kill.clone()));
        }
    }

    fn upstream_name(&self) -> &str {
        match &self.upstream {
            Upstream::Loopback { .. } => "loopback",
            Upstream::Cluster(c) => c.name(),
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        connections: TaskTracker,
        kill: CancellationToken,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(listener = %self.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let me = self.clone();
            let kill = kill.clone();
            connections.spawn(async move {
                tokio::select! {
                    _ = kill.cancelled() => {}
                    _ = me.handle(stream, peer) => {}
                }
            });
        }
    }

    async fn handle(&self, down: TcpStream, peer: SocketAddr) {
        let _ = down.set_nodelay(true);
        let Ok(local) = down.local_addr() else {
            return;
        };
        let (device, network) = self.storage.classify(local.ip());
        let down_counters = self.metrics.byte_counters(&device, network);
        let upstream = match &self.upstream {
            Upstream::Loopback { admin_port } if local.port() == *admin_port => {
                self.metrics
                    .upstream_connect_error("loopback", "admin_port");
                Err(TcpUpstreamError::AdminPort { port: *admin_port })
            }
            Upstream::Loopback { .. } => self.connect_loopback(local.port()).await,
            Upstream::Cluster(c) => c
                .connect_tcp()
                .await
                .map(|io| io.into_parts())
                .map_err(TcpUpstreamError::from),
        };
        let (up, up_counters, _guard) = match upstream {
            Ok(parts) => parts,
            Err(e) => {
                tracing::warn!(
                    network = network.as_str(), listener = %self.name, local = %local, peer = %peer,
                    error = %e, "cannot reach the upstream; closing the connection"
                );
                return;
            }
        };
        tracing::debug!(
            network = network.as_str(), listener = %self.name, local = %local, peer = %peer,
            device = %device, "forwarding"
        );
        let (sent, received) = forward(&down, &up, &down_counters, &up_counters).await;
        match (sent, received) {
            (Ok(sent), Ok(received)) => tracing::debug!(
                network = network.as_str(), listener = %self.name, peer = %peer, sent, received,
                "connection closed"
            ),
            (a, b) => tracing::debug!(
                network = network.as_str(), listener = %self.name, peer = %peer,
                error = %a.err().or(b.err()).map(|e| e.to_string()).unwrap_or_default(),
                "connection ended with an error"
            ),
        }
    }

    async fn connect_loopback(
        &self,
        port: u16,
    ) -> Result<(TcpStream, ByteCounters, Option<ConnectionGuard>), TcpUpstreamError> {
        let ip = match self.storage.current().map(|a| a.ip) {
            Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let target = SocketAddr::new(ip, port);
        let stream = match tokio::time::timeout(
            LOOPBACK_CONNECT_TIMEOUT,
            TcpStream::connect(target),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = if e.kind() == io::ErrorKind::ConnectionRefused {
                    "refused"
                } else {
                    "other"
                };
                self.metrics.upstream_connect_error("loopback", reason);
                return Err(TcpUpstreamError::Loopback {
                    target,
                    cause: e.to_string(),
                });
            }
            Err(_) => {
                self.metrics.upstream_connect_error("loopback", "timeout");
                return Err(TcpUpstreamError::Loopback {
                    target,
                    cause: format!(
                        "no answer within {}",
                        format_duration(LOOPBACK_CONNECT_TIMEOUT)
                    ),
                });
            }
        };
        let _ = stream.set_nodelay(true);
        let guard = self
            .metrics
            .upstream_connection("loopback", Network::Loopback);
        Ok((
            stream,
            self.metrics.byte_counters("lo", Network::Loopback),
            Some(guard),
        ))
    }
}

/// Moves bytes both ways until each direction has seen its end of stream (and passed it on as
/// a half-close) or one direction failed (then both sockets are shut down, which ends the
/// other). Returns the bytes moved downstream→upstream and upstream→downstream.
pub async fn forward(
    down: &TcpStream,
    up: &TcpStream,
    down_counters: &ByteCounters,
    up_counters: &ByteCounters,
) -> (io::Result<u64>, io::Result<u64>) {
    let abort = || {
        let _ = SockRef::from(down).shutdown(std::net::Shutdown::Both);
        let _ = SockRef::from(up).shutdown(std::net::Shutdown::Both);
    };
    let to_up = async {
        let r = one_way(down, up, |n| {
            down_counters.received(n);
            up_counters.transmitted(n);
        })
        .await;
        if r.is_err() {
            abort();
        }
        r
    };
    let to_down = async {
        let r = one_way(up, down, |n| {
            up_counters.received(n);
            down_counters.transmitted(n);
        })
        .await;
        if r.is_err() {
            abort();
        }
        r
    };
    tokio::join!(to_up, to_down)
}

/// One direction: splice through a pipe; a copy loop when the kernel cannot splice these sockets.
async fn one_way(from: &TcpStream, to: &TcpStream, count: impl Fn(u64)) -> io::Result<u64> {
    let moved = match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
        Ok(pipe) => splice_loop(from, to, pipe, &count).await?,
        Err(_) => Spliced::Unsupported,
    };
    let total = match moved {
        Spliced::Done(total) => total,
        Spliced::Unsupported => copy_loop(from, to, &count).await?,
    };
    // Pass the end of stream on: the peer may still be sending the other way.
    let _ = SockRef::from(to).shutdown(std::net::Shutdown::Write);
    Ok(total)
}

/// Grows a pipe to [`BULK_PIPE`] while fewer than [`MAX_BULK_PIPES`] are: its capacity then,
/// and the place it holds among them; `None` when none is free or the kernel refuses (past
/// `fs.pipe-max-size`, or `fs.pipe-user-pages-soft` without CAP_SYS_RESOURCE).
fn grow_pipe(pipe: &OwnedFd) -> Option<(usize, BulkPipe)> {
    let place = BulkPipe::take()?;
    Some((set_pipe_size(pipe, BULK_PIPE)?, place))
}

/// The pipe's capacity after asking for `size`, if it grew past the default.
fn set_pipe_size(pipe: &OwnedFd, size: usize) -> Option<usize> {
    let size = i32::try_from(size).ok()?;
    let got = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size)).ok()?;
    usize::try_from(got).ok().filter(|&g| g > CHUNK)
}

/// One of the [`MAX_BULK_PIPES`] places, given back when dropped.
struct BulkPipe(());

impl BulkPipe {
    fn take() -> Option<BulkPipe> {
        BULK_PIPES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_BULK_PIPES).then_some(n + 1)
            })
            .ok()
            .map(|_| BulkPipe(()))
    }
}

impl Drop for BulkPipe {
    fn drop(&mut self) {
        BULK_PIPES.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Spliced {
    Done(u64),
    /// The first splice failed with EINVAL (no splice for these files); nothing was moved.
    Unsupported,
}

async fn splice_loop(
    from: &TcpStream,
    to: &TcpStream,
    (pipe_out, pipe_in): (OwnedFd, OwnedFd),
    count: &impl Fn(u64),
) -> io::Result<Spliced> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    // What one splice asks for; a connection that has moved GROW_AFTER is moving bulk data,
    // and its pipe is grown once (fewer splice calls and wake-ups per byte, more bytes in
    // flight). Not by how full one splice came back: a forwarder that keeps up reads less
    // than the pipe holds at a time.
    let (mut chunk, mut may_grow, mut _bulk) = (CHUNK, true, None);
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe_in, None, chunk, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if total == 0 && e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                    return Ok(Spliced::Unsupported)
                }
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(Spliced::Done(total));
        }
        if may_grow && total >= GROW_AFTER {
            may_grow = false;
            if let Some((grown, place)) = grow_pipe(&pipe_in) {
                (chunk, _bulk) = (grown, Some(place));
            }
        }
        let mut in_pipe = n;
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe_out, None, to, None, in_pipe, flags).map_err(io::Error::from)
            }) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the receiving socket took no bytes",
                    ))
                }
                Ok(m) => in_pipe -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        count(n as u64);
    }
}

async fn copy_loop(from: &TcpStream, to: &TcpStream, count: &impl Fn(u64)) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut written = 0;
        while written < n {
            to.writable().await?;
            match to.try_write(&buf[written..n]) {
                Ok(m) => written += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        count(n as u64);
    }
}

/// Why a `kind: tcp` connection could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum TcpUpstreamError {
    #[error("port {port} is lhnet's admin port; a tcp listener does not forward to it (leave it out of the listener's ports)")]
    AdminPort { port: u16 },
    #[error("connecting to {target}: {cause}")]
    Loopback { target: SocketAddr, cause: String },
    #[error(transparent)]
    Cluster(#[from] TcpConnectError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bulk_pipe_grows_past_the_default_and_holds_what_it_says() {
        let (out, into) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap();
        let grown = set_pipe_size(&into, BULK_PIPE).expect("the kernel refused a 1 MiB pipe");
        assert!(grown >= BULK_PIPE, "{grown}");
        // The whole capacity goes in without blocking, one byte more does not.
        let block = vec![5u8; grown];
        assert_eq!(nix::unistd::write(&into, &block).unwrap(), grown);
        assert_eq!(nix::unistd::write(&into, &[1]), Err(Errno::EAGAIN));
        drop(out);
    }

    #[test]
    fn no_more_than_max_bulk_pipes_are_grown_at_once() {
        // Other tests of this binary may hold places: take what is left, then one more.
        let held: Vec<BulkPipe> = std::iter::from_fn(BulkPipe::take).collect();
        assert!(!held.is_empty() && held.len() <= MAX_BULK_PIPES);
        assert!(BulkPipe::take().is_none(), "a place past MAX_BULK_PIPES");
        drop(held);
        assert!(BulkPipe::take().is_some(), "places are given back");
    }
}
