//! Root only: the real lhnet-proxy binary in a 64 MiB memory cgroup (what the injector gives
//! the sidecar) under the cheap attacks a client on the management network can make, while a
//! fresh client's unary call on the same forwarded route must keep succeeding within 2 s:
//! - 2000 connections that never send a byte, plus 5 connections holding 1000 header-only
//!   streams each, for 20 s;
//! - the same with 2000 slow-headers (slowloris) connections that send one byte a second;
//! - 512, then 1024, server-stream calls asking for endless replies whose clients never read
//!   a byte of them (at 1024 every slot of the cluster is held, and the probe must be refused
//!   by that limit, by name);
//! - the 1024 with the listener's `send_timeout` at 2 s: lhnet closes those connections while
//!   the attackers still hold them, and probes succeed again within twice that.
//! - 512 such calls from clients that grant every window HTTP/2 allows (so only lhnet's own
//!   per-stream send buffer bounds what it holds for them).
//!
//! Everything is on loopback; the upstream is the test's own echo service (outside the cgroup).
// Its synchronous helpers (threads, Drop, the wait before the runtime starts) sleep with std.
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

mod common;

use common::raw_h2::{frame, grpc_message, headers_frame, EMPTY_SETTINGS, PREFACE};
use common::KillOnDrop;
use lhnet_proto::echo::echo_client::EchoClient;
use lhnet_proto::echo::EchoRequest;
use lhnet_proto::echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: u64 = 64 << 20;
const ATTACK: Duration = Duration::from_secs(20);
const SILENT: usize = 2000;
const STREAM_CONNECTIONS: usize = 5;
const STREAMS_EACH: u32 = 1000;
const UNARY: &str = "/lhnet.echo.v1.Echo/Unary";
const SERVER_STREAM: &str = "/lhnet.echo.v1.Echo/ServerStream";
/// `circuit_breakers.max_requests` of the test's cluster (lhnet's default).
const CLUSTER_MAX_REQUESTS: usize = 1024;
/// Calls per never-reading connection: 64 of them ask for about 34 KiB, within the 64 KiB a
/// client may send before lhnet's first WINDOW_UPDATE.
const NEVER_READ_STREAMS: u32 = 64;

/// A memory cgroup (v2 or v1) with a 64 MiB limit, removed when dropped.
struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn new(tag: &str) -> MemoryCgroup {
        let name = format!("lhnet-{tag}-{}", std::process::id());
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let dir = if v2 {
            PathBuf::from("/sys/fs/cgroup").join(&name)
        } else {
            // v1: a child of this process's own memory cgroup.
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
            let path = own
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                    controllers
                        .split(',')
                        .any(|c| c == "memory")
                        .then(|| path.to_string())
                })
                .expect("a memory cgroup (v1) or cgroup v2");
            PathBuf::from("/sys/fs/cgroup/memory")
                .join(path.trim_start_matches('/'))
                .join(&name)
        };
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let (limit, swap) = if v2 {
            ("memory.max", Some("memory.swap.max"))
        } else {
            ("memory.limit_in_bytes", None)
        };
        std::fs::write(dir.join(limit), LIMIT.to_string()).unwrap();
        if let Some(swap) = swap {
            let _ = std::fs::write(dir.join(swap), "0");
        }
        MemoryCgroup { dir, v2 }
    }

    /// The command, run inside the cgroup (a shell moves itself in, then execs it).
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let procs = self.dir.join("cgroup.procs");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > {} && exec \"$0\" \"$@\"",
                procs.display()
            ))
            .arg(program)
            .args(args);
        cmd
    }

    /// The most memory the cgroup has used, in bytes.
    fn peak(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The proxy was killed by its KillOnDrop first; the directory goes once it is empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Enough descriptors for this test's own sockets.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = hard.max(65536);
    let _ = setrlimit(Resource::RLIMIT_NOFILE, want, want)
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard, hard));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One connection opening `streams` header-only streams at once, then reading (and dropping)
/// whatever lhnet sends until the attack ends.
async fn header_only_streams(
    proxy: SocketAddr,
    streams: u32,
    until: Instant,
) -> std::io::Result<()> {
    let mut s = TcpStream::connect(proxy).await?;
    let mut out = PREFACE.to_vec();
    out.extend_from_slice(&EMPTY_SETTINGS);
    for i in 0..streams {
        out.extend_from_slice(&headers_frame(2 * i + 1, UNARY));
    }
    s.write_all(&out).await?;
    let mut buf = vec![0u8; 16 << 10];
    let deadline = until;
    while let Ok(read) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if read? == 0 {
            break;
        }
    }
    Ok(())
}

/// A fresh client's unary call through lhnet: its time, or why it failed.
async fn fresh_call(proxy: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let call = async {
        let mut client = EchoClient::connect(format!("http://{proxy}"))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let reply = client
            .unary(EchoRequest {
                payload: b"probe".to_vec(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("call: {e}"))?;
        if reply.get_ref().payload != b"probe" {
            return Err("wrong payload".to_string());
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(2), call).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no answer within 2 s".into()),
    }
}

/// How the attackers' connections behave.
#[derive(Clone, Copy)]
enum Flood {
    /// Connect and never send a byte.
    Silent,
    /// Send the preface and then one byte of a HEADERS frame per second.
    SlowHeaders,
}

/// One attack on the listener.
#[derive(Clone, Copy)]
enum Attack {
    /// SILENT connections of this kind, plus STREAM_CONNECTIONS connections of header-only
    /// streams.
    Flood(Flood),
    /// `connections` connections of NEVER_READ_STREAMS calls each, asking for endless replies
    /// and never reading a byte of them; `send_timeout` is the listener's, in seconds (`None`:
    /// lhnet's default, 60 s, longer than the attack).
    NeverRead {
        connections: usize,
        send_timeout: Option<u64>,
        /// The clients grant every window HTTP/2 allows (2 GiB − 1, stream and connection)
        /// instead of the default 64 KiB, so only lhnet's own buffers and the socket's bound
        /// what lhnet holds for them.
        open_windows: bool,
    },
}

/// How long the first probes of a never-read attack with `send_timeout` may be refused: the
/// attackers are closed between one and two `send_timeout`s after their replies stall.
fn refused_for(send_timeout: u64) -> Duration {
    Duration::from_secs(2 * send_timeout + 2)
}

/// One connection opening `streams` server-stream calls that ask for endless replies, then
/// holding the connection without reading a byte, with the client's HTTP/2 windows at their
/// defaults (64 KiB), until the attack ends.
async fn never_read(
    proxy: SocketAddr,
    streams: u32,
    open_windows: bool,
    until: Instant,
) -> std::io::Result<()> {
    use prost::Message;
    let mut s = TcpStream::connect(proxy).await?;
    let request = EchoRequest {
        payload: vec![7; 512],
        count: u32::MAX,
        delay_ms: 0,
    }
    .encode_to_vec();
    let body = grpc_message(&request);
    let mut out = PREFACE.to_vec();
    if open_windows {
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        let mut initial_window = vec![0, 4]; // SETTINGS_INITIAL_WINDOW_SIZE
        initial_window.extend_from_slice(&MAX_WINDOW.to_be_bytes());
        out.extend_from_slice(&frame(0x4, 0, 0, &initial_window));
        // WINDOW_UPDATE on the connection, to its largest.
        out.extend_from_slice(&frame(0x8, 0, 0, &(MAX_WINDOW - 65_535).to_be_bytes()));
    } else {
        out.extend_from_slice(&EMPTY_SETTINGS);
    }
    for i in 0..streams {
        out.extend_from_slice(&headers_frame(2 * i + 1, SERVER_STREAM));
        out.extend_from_slice(&frame(0x0, 0x1, 2 * i + 1, &body)); // DATA, END_STREAM
    }
    s.write_all(&out).await?;
    tokio::time::sleep_until(until).await;
    Ok(())
}

async fn flood_connection(proxy: SocketAddr, kind: Flood, until: Instant) {
    let Ok(mut s) = TcpStream::connect(proxy).await else {
        return;
    };
    let deadline = until;
    match kind {
        Flood::Silent => {
            let mut buf = [0u8; 64];
            // Holds the connection (reading only to notice lhnet closing it).
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
            }
        }
        Flood::SlowHeaders => {
            if s.write_all(PREFACE).await.is_err() || s.write_all(&EMPTY_SETTINGS).await.is_err() {
                return;
            }
            for byte in headers_frame(1, UNARY) {
                if tokio::time::Instant::now() >= deadline || s.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn admin_metrics(admin: SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    out
}

/// One attack at a time: each is the whole load the machine should carry.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn survive(tag: &str, attack: Attack) {
    if !common::root() {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let echo = rt
        .block_on(echo_server::spawn("127.0.0.1:0".parse().unwrap(), "up"))
        .unwrap();
    let (listen, admin_port) = (free_port(), free_port());
    let proxy: SocketAddr = ([127, 0, 0, 1], listen).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let send_timeout = match attack {
        Attack::NeverRead {
            send_timeout: Some(secs),
            ..
        } => format!("    send_timeout: {secs}s\n"),
        _ => String::new(),
    };
    let config = common::write_config(
        &format!("abuse-{tag}"),
        &format!(
            "admin: {{ address: {admin} }}\nstorage_network: {{ interface: lo }}\n\
             listeners:\n  - name: management\n    address: {proxy}\n{send_timeout}    routes:\n      \
             - {{ match: {{ prefix: /lhnet.echo.v1.Echo/ }}, cluster: echo }}\n\
             clusters:\n  - {{ name: echo, endpoints: [{}] }}\n",
            echo.addr
        ),
    );
    let cgroup = MemoryCgroup::new(tag);
    let config_arg = config.display().to_string();
    let child = cgroup
        .command(
            env!("CARGO_BIN_EXE_lhnet-proxy"),
            &["--config", &config_arg, "--threads", "1"],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let up = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < up, "lhnet-proxy did not start");
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "lhnet-proxy exited at start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.block_on(async {
        assert!(fresh_call(proxy).await.is_ok(), "a call before the attack");
        let started = Instant::now();
        let until = started + ATTACK;
        let mut attackers = Vec::new();
        match attack {
            Attack::NeverRead {
                connections,
                open_windows,
                ..
            } => {
                for _ in 0..connections {
                    attackers.push(tokio::spawn(async move {
                        let _ = never_read(proxy, NEVER_READ_STREAMS, open_windows, until).await;
                    }));
                }
            }
            Attack::Flood(kind) => {
                for _ in 0..SILENT {
                    attackers.push(tokio::spawn(flood_connection(proxy, kind, until)));
                }
                for _ in 0..STREAM_CONNECTIONS {
                    attackers.push(tokio::spawn(async move {
                        let _ = header_only_streams(proxy, STREAMS_EACH, until).await;
                    }));
                }
            }
        }
        let mut probes = Vec::new();
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let sent = started.elapsed();
            probes.push((sent, fresh_call(proxy).await));
        }
        let (sent, probes): (Vec<Duration>, Vec<_>) = probes.into_iter().unzip();
        for a in attackers {
            let _ = a.await;
        }
        let failed: Vec<&String> = probes.iter().filter_map(|p| p.as_ref().err()).collect();
        let slowest = probes.iter().filter_map(|p| p.as_ref().ok()).max();
        eprintln!(
            "{tag}: {} probes during the attack, {} failed, slowest {slowest:?}; peak memory {:.1} MiB of {} MiB",
            probes.len(),
            failed.len(),
            cgroup.peak() as f64 / (1 << 20) as f64,
            LIMIT >> 20
        );
        assert!(probes.len() >= 20, "{} probes", probes.len());
        let named = "cluster echo has circuit_breakers.max_requests (1024) requests in flight";
        match attack {
            // Every slot of the cluster held, the attackers kept: a new call is refused,
            // naming the limit.
            Attack::NeverRead { connections, send_timeout: None, .. }
                if connections * NEVER_READ_STREAMS as usize >= CLUSTER_MAX_REQUESTS =>
            {
                let other: Vec<_> = failed.iter().filter(|e| !e.contains(named)).collect();
                assert!(other.is_empty(), "calls failed otherwise than by the cluster's limit: {other:?}");
                assert!(!failed.is_empty(), "the cluster's 1024 slots were all held, yet no call was refused");
            }
            // The attackers closed at `send_timeout`, while they still hold their sockets:
            // calls are refused by the cluster's limit at most until then, and succeed after.
            Attack::NeverRead { send_timeout: Some(secs), .. } => {
                let grace = refused_for(secs);
                for (at, probe) in sent.iter().zip(&probes) {
                    match probe {
                        Err(e) if *at < grace => assert!(e.contains(named), "a call {at:?} into the attack failed otherwise than by the cluster's limit: {e}"),
                        Err(e) => panic!("a call {at:?} into the attack, past twice send_timeout ({secs} s), failed: {e}"),
                        Ok(_) => {}
                    }
                }
            }
            _ => assert!(failed.is_empty(), "fresh calls failed during the attack: {failed:?}"),
        }
        // The attackers gone, their calls and slots are too.
        let after = Instant::now() + Duration::from_secs(5);
        while let Err(e) = fresh_call(proxy).await {
            assert!(Instant::now() < after, "5 s after the attack a call still fails: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "lhnet-proxy died during the attack (peak {} bytes of {LIMIT})",
        cgroup.peak()
    );
    if let Attack::NeverRead {
        connections,
        send_timeout: Some(_),
        ..
    } = attack
    {
        let metrics = admin_metrics(admin);
        let closed = common::limit_count(&metrics, "management", "send_timeout");
        assert_eq!(
            closed, connections as f64,
            "every never-reading connection is closed by send_timeout, once:\n{metrics}"
        );
    }
    if let Attack::Flood(_) = attack {
        let metrics = admin_metrics(admin);
        assert!(
            metrics.contains(
                "lhnet_limits_reached_total{limit=\"max_connections\",listener=\"management\"}"
            ) || metrics.contains(
                "lhnet_limits_reached_total{limit=\"request_headers_timeout\",listener=\"management\"}"
            ),
            "no limit was counted:\n{metrics}"
        );
    }
    drop(child);
    drop(cgroup);
}

#[test]
fn silent_connections_and_header_only_streams_do_not_take_lhnet_down() {
    survive("silent", Attack::Flood(Flood::Silent));
}

#[test]
fn slow_headers_do_not_take_lhnet_down() {
    survive("slowloris", Attack::Flood(Flood::SlowHeaders));
}

/// 512 calls (half the cluster's slots) whose clients never read: each holds at most its own
/// upstream stream window, and the upstream connections they share keep carrying everyone
/// else's replies. (With the connection window a few stream windows wide, 16 such calls
/// stalled every call on the cluster.)
#[test]
fn clients_that_never_read_their_replies_do_not_stall_the_others() {
    survive(
        "never-read",
        Attack::NeverRead {
            connections: 8,
            send_timeout: None,
            open_windows: false,
        },
    );
}

/// 1024 such calls, every slot of the cluster: new calls are refused by the cluster's limit,
/// by name, lhnet stays inside its 64 MiB, and the slots come back when the attackers leave.
#[test]
fn a_cluster_full_of_replies_nobody_reads_keeps_lhnet_up_and_names_the_limit() {
    survive(
        "never-read-full",
        Attack::NeverRead {
            connections: 16,
            send_timeout: None,
            open_windows: false,
        },
    );
}

/// The same 1024 calls with `send_timeout: 2s`: lhnet closes the connections whose clients
/// took none of their replies for that long, while the attackers still hold them open, and
/// the cluster's slots are everyone's again.
#[test]
fn clients_that_take_no_reply_for_send_timeout_are_closed_and_free_their_slots() {
    survive(
        "never-read-closed",
        Attack::NeverRead {
            connections: 16,
            send_timeout: Some(2),
            open_windows: false,
        },
    );
}

/// Clients that grant every window HTTP/2 allows and then read nothing: what lhnet holds
/// for each of their calls is bounded by its own send buffer per stream and the socket's,
/// not by the client's window.
#[test]
fn clients_that_grant_every_window_and_read_nothing_stay_inside_the_memory_limit() {
    survive(
        "never-read-open",
        Attack::NeverRead {
            connections: 8,
            send_timeout: None,
            open_windows: true,
        },
    );
}
