//! `lhnet-loadtest bench`: gRPC unary and 1 MiB calls direct, through lhnet, and through nginx
//! and HAProxy, in one run, with the same upstream, load generator and thread count.
//!
//! Each proxy gets `threads` worker threads pinned to the first CPUs; the upstream and the load
//! generator (`h2load`) share the remaining CPU, so every proxy meets the same load.

use std::net::SocketAddr;

use bytes::Bytes;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use lhnet_proto::echo::echo_client::EchoClient;
use lhnet_proto::echo::EchoRequest;
use serde::Serialize;

use crate::cputime::{self, Whose};
use crate::peers::{self, which};
use crate::steal::StealShare;

/// What `bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub peers: Vec<String>,
    pub threads: usize,
    pub duration: Duration,
    pub connections: u32,
    pub streams: u32,
    pub peers_dir: Option<PathBuf>,
    /// Request payload sizes in bytes, one workload each.
    pub payloads: Vec<usize>,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub workload: String,
    pub target: String,
    pub requests_per_second: f64,
    pub mean_latency_ms: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub ratio_to_direct: f64,
    /// The proxy's CPU time per call over the run (its warm-up second included), in
    /// microseconds; `None` for direct. When a proxy keeps up with the load side (a ratio near
    /// 1.00x), this is what shows how much more it could take: one CPU does 1e6 / this calls a
    /// second through it.
    pub proxy_cpu_us_per_call: Option<f64>,
    /// What the host took from each CPU during this run ([`crate::steal`]).
    pub steal: StealShare,
}

/// One TCP forwarding measurement: bulk bytes over `connections` connections.
#[derive(Debug, Clone, Serialize)]
pub struct TcpSample {
    pub target: String,
    pub mib_per_second: f64,
    pub ratio_to_direct: f64,
    /// The forwarder's CPU seconds per GiB moved; `None` for direct.
    pub proxy_cpu_seconds_per_gib: Option<f64>,
    pub steal: StealShare,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub threads: usize,
    pub connections: u32,
    pub streams_per_connection: u32,
    pub seconds_per_run: f64,
    pub samples: Vec<Sample>,
    /// TCP forwarding (storage listeners): direct, lhnet (`kind: tcp`), HAProxy (`mode tcp`).
    pub tcp: Vec<TcpSample>,
    pub skipped: Vec<String>,
}

struct Target {
    name: String,
    addr: SocketAddr,
    /// Whose CPU time the proxy's is (none for direct).
    cpu: Option<Whose>,
}

/// lhnet's runtime threads in this process ([`start_lhnet_thread`]).
const LHNET_THREADS: Whose = Whose::Threads("lhnet-proxy");

const UPSTREAM_NAME: &str = "bench-upstream";

/// Runs the benchmark and returns its report.
pub fn run(args: &BenchArgs) -> Result<Report, String> {
    if which("h2load").is_none() {
        return Err(
            "h2load is not installed (apt-get install nghttp2-client); it is the load generator"
                .into(),
        );
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (proxy_cpus, load_cpus) = cpu_split(cpus, args.threads);

    let upstream = spawn_runtime_thread("bench-upstream", 1, load_cpus.clone(), |rt| {
        rt.block_on(lhnet_proto::echo_server::spawn(
            "127.0.0.1:0".parse().unwrap(),
            UPSTREAM_NAME,
        ))
    })?;
    let upstream_addr = upstream.addr;

    let mut targets = vec![Target {
        name: "direct".into(),
        addr: upstream_addr,
        cpu: None,
    }];
    let proxy = start_lhnet(upstream_addr, args.threads, proxy_cpus.clone())?;
    targets.push(Target {
        name: "lhnet".into(),
        addr: proxy.1,
        cpu: Some(LHNET_THREADS),
    });

    let mut skipped = Vec::new();
    let mut running_peers = Vec::new();
    let templates = peers::find_templates(args.peers_dir.as_deref());
    for name in &args.peers {
        let Some(dir) = templates.as_deref() else {
            skipped.push(format!(
                "{name}: peer config templates not found (pass --peers-dir ../shared/peers)"
            ));
            continue;
        };
        let listen = peers::free_port().map_err(|e| e.to_string())?;
        let pin = proxy_cpus.as_ref().map(|c| cpu_list(c));
        match peers::start_grpc_peer(
            name,
            dir,
            listen,
            upstream_addr,
            "127.0.0.1",
            args.threads,
            pin.as_deref(),
        ) {
            Ok(p) => {
                targets.push(Target {
                    name: name.clone(),
                    addr: p.addr,
                    cpu: Some(Whose::Process(p.pid())),
                });
                running_peers.push(p);
            }
            Err(e) => skipped.push(format!("{name}: {e}")),
        }
    }
    for note in &skipped {
        eprintln!("skipped {note}");
    }

    for t in &targets {
        check_target(t)?;
    }

    let dir = std::env::temp_dir().join(format!("lhnet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut samples = Vec::new();
    for &payload in &args.payloads {
        let workload = workload_name(payload);
        let workload = workload.as_str();
        let body = dir.join(format!("req-{payload}.bin"));
        std::fs::write(&body, grpc_frame(payload)).map_err(|e| e.to_string())?;
        let mut direct_rps = None;
        for t in &targets {
            eprintln!("bench: {workload} via {} ...", t.name);
            let ((m, cpu), steal) = crate::steal::during(|| {
                cputime::during(t.cpu.as_ref(), || {
                    h2load(
                        t.addr,
                        &body,
                        args,
                        load_cpus.as_ref().map(|c| cpu_list(c)).as_deref(),
                    )
                })
            });
            let m = m?;
            // h2load's warm-up second is not in its rate's calls: count it at the same rate.
            let calls = m.rps * (args.duration.as_secs().max(1) + 1) as f64;
            let direct = *direct_rps.get_or_insert(m.rps);
            samples.push(Sample {
                workload: workload.into(),
                target: t.name.clone(),
                requests_per_second: m.rps,
                mean_latency_ms: m.mean_ms,
                succeeded: m.succeeded,
                failed: m.failed,
                ratio_to_direct: if direct > 0.0 { m.rps / direct } else { 0.0 },
                proxy_cpu_us_per_call: cpu.filter(|_| calls > 0.0).map(|c| c * 1e6 / calls),
                steal,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(running_peers);
    proxy.0.shutdown_token().cancel();
    let tcp = tcp_bench(
        args,
        &proxy_cpus,
        &load_cpus,
        templates.as_deref(),
        &mut skipped,
    )?;
    Ok(Report {
        threads: args.threads,
        connections: args.connections,
        streams_per_connection: args.streams,
        seconds_per_run: args.duration.as_secs_f64(),
        samples,
        tcp,
        skipped,
    })
}

/// Prints the report as a table, with each peer's ratio and lhnet's lead over the best peer.
pub fn print(report: &Report) {
    println!(
        "gRPC through proxies: {} thread(s) each, h2load -c {} -m {}, {} s per run\n",
        report.threads, report.connections, report.streams_per_connection, report.seconds_per_run
    );
    println!(
        "{:<12} {:<8} {:>12} {:>12} {:>10} {:>8} {:>8} {:>12}",
        "workload", "target", "req/s", "mean ms", "vs direct", "failed", "steal", "cpu us/call"
    );
    for s in &report.samples {
        println!(
            "{:<12} {:<8} {:>12.0} {:>12.2} {:>9.2}x {:>8} {:>7.1}% {:>12}",
            s.workload,
            s.target,
            s.requests_per_second,
            s.mean_latency_ms,
            s.ratio_to_direct,
            s.failed,
            s.steal.worst(None),
            cpu_column(s.proxy_cpu_us_per_call, 1),
        );
    }
    let workloads: Vec<&str> = {
        let mut w: Vec<&str> = report.samples.iter().map(|s| s.workload.as_str()).collect();
        w.dedup();
        w
    };
    if !report.tcp.is_empty() {
        println!(
            "\nTCP forwarding (storage listeners), {} connections, {} s per run\n",
            report.connections, report.seconds_per_run
        );
        println!(
            "{:<8} {:>12} {:>10} {:>8} {:>12}",
            "target", "MiB/s", "vs direct", "steal", "cpu s/GiB"
        );
        for t in &report.tcp {
            println!(
                "{:<8} {:>12.0} {:>9.2}x {:>7.1}% {:>12}",
                t.target,
                t.mib_per_second,
                t.ratio_to_direct,
                t.steal.worst(None),
                cpu_column(t.proxy_cpu_seconds_per_gib, 3),
            );
        }
    }
    for w in workloads {
        let of = |t: &str| {
            report
                .samples
                .iter()
                .find(|s| s.workload == w && s.target == t)
        };
        let best_peer = report
            .samples
            .iter()
            .filter(|s| s.workload == w && s.target != "direct" && s.target != "lhnet")
            .max_by(|a, b| a.requests_per_second.total_cmp(&b.requests_per_second));
        if let (Some(l), Some(p)) = (of("lhnet"), best_peer) {
            let per_cpu = match (l.proxy_cpu_us_per_call, p.proxy_cpu_us_per_call) {
                (Some(l), Some(p)) if l > 0.0 => format!("; calls per CPU second {:.2}x", p / l),
                _ => String::new(),
            };
            println!(
                "{w}: lhnet / best peer ({}) = {:.2}x{per_cpu}",
                p.target,
                l.requests_per_second / p.requests_per_second
            );
        }
    }
    println!("(steal: the largest share of the run the host took from one CPU; over 1%, the run's figure moved with the host)");
    println!("(cpu: the proxy's CPU time per call or per GiB over its run; a proxy that keeps up with the load side shows its headroom here, not in req/s)");
}

/// Bulk TCP through each forwarder: `connections` clients push bytes for `duration` into a
/// sink that counts what arrives. The sink and the clients share the load CPUs.
fn tcp_bench(
    args: &BenchArgs,
    proxy_cpus: &Option<Vec<usize>>,
    load_cpus: &Option<Vec<usize>>,
    templates: Option<&std::path::Path>,
    skipped: &mut Vec<String>,
) -> Result<Vec<TcpSample>, String> {
    let sink = TcpSink::start(load_cpus.clone()).map_err(|e| format!("tcp sink: {e}"))?;
    let mut targets = vec![("direct".to_string(), sink.addr, None)];
    let lhnet = start_lhnet_tcp(sink.addr, args.threads, proxy_cpus.clone())?;
    targets.push(("lhnet".into(), lhnet.1, Some(LHNET_THREADS)));
    let mut haproxy = None;
    if args.peers.iter().any(|p| p == "haproxy") {
        match templates {
            Some(dir) => {
                let listen = peers::free_port().map_err(|e| e.to_string())?;
                let pin = proxy_cpus.as_ref().map(|c| cpu_list(c));
                match peers::start_tcp_peer(dir, listen, sink.addr, args.threads, pin.as_deref()) {
                    Ok(p) => {
                        targets.push(("haproxy".into(), p.addr, Some(Whose::Process(p.pid()))));
                        haproxy = Some(p);
                    }
                    Err(e) => skipped.push(format!("haproxy (tcp): {e}")),
                }
            }
            None => skipped.push("haproxy (tcp): peer config templates not found".into()),
        }
    }
    let mut samples = Vec::new();
    let mut direct = None;
    for (name, addr, whose) in targets {
        eprintln!("bench: tcp stream via {name} ...");
        let ((mib, cpu), steal) = crate::steal::during(|| {
            cputime::during(whose.as_ref(), || {
                tcp_push(
                    addr,
                    &sink,
                    args.connections.max(1) as usize,
                    args.duration,
                    load_cpus,
                )
            })
        });
        let mib = mib?;
        // The measured part (the 4 MiB warm-up is in the CPU time, not in this).
        let gib = mib * args.duration.as_secs_f64() / 1024.0;
        let base = *direct.get_or_insert(mib);
        samples.push(TcpSample {
            target: name,
            mib_per_second: mib,
            ratio_to_direct: if base > 0.0 { mib / base } else { 0.0 },
            proxy_cpu_seconds_per_gib: cpu.filter(|_| gib > 0.0).map(|c| c / gib),
            steal,
        });
    }
    drop(haproxy);
    lhnet.0.shutdown_token().cancel();
    Ok(samples)
}

/// Accepts connections and counts the bytes that arrive, closing each at its end of stream.
struct TcpSink {
    addr: SocketAddr,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl TcpSink {
    fn start(cpus: Option<Vec<usize>>) -> std::io::Result<TcpSink> {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = received.clone();
        std::thread::Builder::new()
            .name("bench-tcp-sink".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let counter = counter.clone();
                    let cpus = cpus.clone();
                    std::thread::spawn(move || {
                        if let Some(c) = &cpus {
                            pin_current_thread(c);
                        }
                        let mut stream = stream;
                        let mut buf = vec![0u8; 1 << 20];
                        while let Ok(n) = stream.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                    });
                }
            })?;
        Ok(TcpSink { addr, received })
    }
}

/// Pushes bytes to `addr` from `connections` clients for `duration`; MiB/s the sink got.
fn tcp_push(
    addr: SocketAddr,
    sink: &TcpSink,
    connections: usize,
    duration: Duration,
    cpus: &Option<Vec<usize>>,
) -> Result<f64, String> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    // Warm up: one connection, a few MiB.
    {
        let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
        s.write_all(&vec![1u8; 4 << 20])
            .map_err(|e| format!("{addr}: {e}"))?;
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = sink.received.load(Ordering::Relaxed);
    let started = std::time::Instant::now();
    let deadline = started + duration;
    let clients: Vec<_> = (0..connections)
        .map(|_| {
            let cpus = cpus.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                if let Some(c) = &cpus {
                    pin_current_thread(c);
                }
                let mut s = std::net::TcpStream::connect(addr)?;
                let chunk = vec![7u8; 256 << 10];
                while std::time::Instant::now() < deadline {
                    s.write_all(&chunk)?;
                }
                Ok(())
            })
        })
        .collect();
    for c in clients {
        c.join()
            .map_err(|_| "a tcp client panicked".to_string())?
            .map_err(|e| format!("tcp client to {addr}: {e}"))?;
    }
    let got = sink.received.load(Ordering::Relaxed) - before;
    Ok(got as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64())
}

fn start_lhnet_tcp(
    upstream: SocketAddr,
    threads: usize,
    cpus: Option<Vec<usize>>,
) -> Result<(lhnet_proxy::app::RunningProxy, SocketAddr), String> {
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
         listeners:\n  - {{ name: tcp, kind: tcp, address: \"127.0.0.1:0\", cluster: up }}\n\
         clusters:\n  - name: up\n    endpoints: [{upstream}]\n    upstream_bind_config: {{ source_address: 127.0.0.1 }}\n"
    );
    start_lhnet_thread(&yaml, "tcp", threads, cpus)
}

/// A CPU figure with `decimals`, or `-` where there is none (direct).
fn cpu_column(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

fn workload_name(payload: usize) -> String {
    match payload {
        p if p >= 1 << 20 && p % (1 << 20) == 0 => format!("unary {} MiB", p >> 20),
        p if p >= 1 << 10 && p % (1 << 10) == 0 => format!("unary {} KiB", p >> 10),
        p => format!("unary {p} B"),
    }
}

/// Proxy CPUs and load CPUs: the proxy gets the first `threads` CPUs, the rest carry the load.
pub(crate) fn cpu_split(cpus: usize, threads: usize) -> (Option<Vec<usize>>, Option<Vec<usize>>) {
    if cpus < 2 || threads >= cpus {
        return (None, None);
    }
    (
        (Some((0..threads).collect())),
        Some((threads..cpus).collect()),
    )
}

pub(crate) fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn pin_current_thread(cpus: &[usize]) {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        let _ = set.set(c);
    }
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
}

/// Starts a multi-thread runtime (pinned when `cpus` is given) on a background thread, runs
/// `setup` on it, and keeps the runtime alive for the rest of the process.
pub(crate) fn spawn_runtime_thread<T, F>(
    name: &str,
    threads: usize,
    cpus: Option<Vec<usize>>,
    setup: F,
) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(&tokio::runtime::Runtime) -> std::io::Result<T> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let name = name.to_string();
    let thread = std::thread::Builder::new().name(name.clone());
    let spawned = thread.spawn(move || {
        // One thread: a current-thread runtime, as `lhnet-proxy --threads 1` uses.
        let mut builder = if threads == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        };
        builder.thread_name(name.as_str()).enable_all();
        if let Some(c) = &cpus {
            let c = c.clone();
            builder.on_thread_start(move || pin_current_thread(&c));
        }
        let rt = match builder.build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        if let Some(c) = &cpus {
            // A current-thread runtime runs on this thread.
            pin_current_thread(c);
        }
        let _ = tx.send(setup(&rt).map_err(|e| e.to_string()));
        rt.block_on(std::future::pending::<()>());
    });
    spawned.map_err(|e| format!("cannot start a thread: {e}"))?;
    rx.recv().map_err(|e| e.to_string())?
}

fn start_lhnet(
    upstream: SocketAddr,
    threads: usize,
    cpus: Option<Vec<usize>>,
) -> Result<(lhnet_proxy::app::RunningProxy, SocketAddr), String> {
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
         listeners:\n  - name: bench\n    address: 127.0.0.1:0\n    routes:\n\
         \x20     - match: {{ prefix: / }}\n        cluster: up\n\
         clusters:\n  - name: up\n    endpoints: [{upstream}]\n    upstream_bind_config: {{ source_address: 127.0.0.1 }}\n"
    );
    start_lhnet_thread(&yaml, "bench", threads, cpus)
}

/// Starts lhnet-proxy from `yaml` on its own runtime thread(s) (pinned when `cpus` is given)
/// and returns it with the address of its listener `listener`.
pub(crate) fn start_lhnet_thread(
    yaml: &str,
    listener: &'static str,
    threads: usize,
    cpus: Option<Vec<usize>>,
) -> Result<(lhnet_proxy::app::RunningProxy, SocketAddr), String> {
    let config = lhnet_proxy::config::Config::parse(yaml, "bench").map_err(|e| e.to_string())?;
    spawn_runtime_thread("lhnet-proxy", threads, cpus, move |rt| {
        let proxy = rt
            .block_on(lhnet_proxy::app::start(
                config,
                lhnet_proxy::app::Options::default(),
            ))
            .map_err(std::io::Error::other)?;
        let addr = proxy
            .listener_addr(listener)
            .ok_or_else(|| std::io::Error::other(format!("no listener {listener}")))?;
        Ok((proxy, addr))
    })
}

/// One real gRPC call through the target, so a broken proxy cannot post a fast number.
fn check_target(t: &Target) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut c = EchoClient::connect(format!("http://{}", t.addr))
            .await
            .map_err(|e| format!("{}: cannot connect: {e}", t.name))?;
        let reply = c
            .unary(EchoRequest {
                payload: b"check".to_vec(),
                count: 0,
                delay_ms: 0,
            })
            .await
            .map_err(|e| format!("{}: check call failed: {e}", t.name))?
            .into_inner();
        if reply.server != UPSTREAM_NAME || reply.payload != b"check" {
            return Err(format!(
                "{}: wrong answer to the check call: {reply:?}",
                t.name
            ));
        }
        Ok(())
    })
}

fn grpc_frame(payload: usize) -> Bytes {
    frame(&prost::Message::encode_to_vec(&EchoRequest {
        payload: vec![7u8; payload],
        count: 0,
        delay_ms: 0,
    }))
}

/// One uncompressed gRPC message frame around `message`.
pub(crate) fn frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

pub(crate) struct Measured {
    pub rps: f64,
    pub mean_ms: f64,
    pub succeeded: u64,
    pub failed: u64,
}

fn h2load(
    addr: SocketAddr,
    body: &std::path::Path,
    args: &BenchArgs,
    cpus: Option<&str>,
) -> Result<Measured, String> {
    h2load_run(
        addr,
        "/lhnet.echo.v1.Echo/Unary",
        body,
        (args.connections, args.streams),
        args.duration,
        cpus,
    )
}

/// `h2load -t 1 -c C -m M -D SECONDS --warm-up-time 1` posting `body` (a framed gRPC message)
/// to `path`, pinned with taskset to `cpus`.
pub(crate) fn h2load_run(
    addr: SocketAddr,
    path: &str,
    body: &std::path::Path,
    (connections, streams): (u32, u32),
    duration: Duration,
    cpus: Option<&str>,
) -> Result<Measured, String> {
    let mut cmd = match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c, "h2load"]);
            cmd
        }
        None => Command::new("h2load"),
    };
    let out = cmd
        .args([
            "-t",
            "1",
            "-c",
            &connections.to_string(),
            "-m",
            &streams.to_string(),
        ])
        .args([
            "-D",
            &format!("{}", duration.as_secs().max(1)),
            "--warm-up-time",
            "1",
        ])
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .map_err(|e| format!("running h2load: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&text).ok_or_else(|| {
        format!(
            "cannot read h2load's output:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn parse_h2load(text: &str) -> Option<Measured> {
    let finished = text.lines().find(|l| l.starts_with("finished in"))?;
    let rps: f64 = finished
        .split(',')
        .nth(1)?
        .trim()
        .strip_suffix(" req/s")?
        .parse()
        .ok()?;
    let requests = text.lines().find(|l| l.starts_with("requests:"))?;
    let field = |name: &str| -> Option<u64> {
        requests
            .split(',')
            .find(|p| p.trim().ends_with(name))?
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
    };
    let latency = text.lines().find(|l| l.starts_with("time for request:"))?;
    let mean = latency.split_whitespace().nth(5)?;
    Some(Measured {
        rps,
        mean_ms: parse_time_ms(mean)?,
        succeeded: field("succeeded")?,
        failed: field("failed")? + field("errored")?,
    })
}

fn parse_time_ms(t: &str) -> Option<f64> {
    if let Some(v) = t.strip_suffix("us") {
        v.parse::<f64>().ok().map(|v| v / 1000.0)
    } else if let Some(v) = t.strip_suffix("ms") {
        v.parse().ok()
    } else if let Some(v) = t.strip_suffix('s') {
        v.parse::<f64>().ok().map(|v| v * 1000.0)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_h2load_output() {
        let text = "\nfinished in 5.00s, 23456.20 req/s, 2.34MB/s\nrequests: 117281 total, 117281 started, 117281 done, 117270 succeeded, 11 failed, 0 errored, 0 timeout\nstatus codes: 117281 2xx\n                     min         max         mean         sd        +/- sd\ntime for request:      123us      4.56ms      1.23ms       234us    68.50%\n";
        let m = parse_h2load(text).unwrap();
        assert_eq!(m.rps, 23456.20);
        assert_eq!((m.succeeded, m.failed), (117270, 11));
        assert!((m.mean_ms - 1.23).abs() < 1e-9);
        assert_eq!(parse_time_ms("250us"), Some(0.25));
        assert_eq!(parse_time_ms("1.5s"), Some(1500.0));
    }

    #[test]
    fn cpu_split_leaves_load_cpus() {
        assert_eq!(cpu_split(2, 1), (Some(vec![0]), Some(vec![1])));
        assert_eq!(cpu_split(1, 1), (None, None));
        assert_eq!(cpu_split(4, 2), (Some(vec![0, 1]), Some(vec![2, 3])));
    }
}
