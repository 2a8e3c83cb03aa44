//! `lhnet-loadtest bench-footprint`: the lhnet-proxy binary's start-up time and memory, in a
//! network namespace of its own whose storage interface is a real `lhnet1` (a veth on a bridge,
//! root only):
//! - from spawning the process to its admin `/ready` answering 200, over several starts;
//! - its resident memory idle and with STREAMS gRPC calls open at once through it (100 per
//!   HTTP/2 connection, as its default `max_concurrent_streams`), to an upstream that holds
//!   each call for a few seconds and then answers it; every call must then succeed, so all of
//!   them were open together when the memory was read.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use lhnet_netns::Topology;
use serde::Serialize;

/// How long the upstream holds each call.
const HOLD: Duration = Duration::from_secs(8);
const STREAMS_PER_CONNECTION: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct FootprintReport {
    pub storage_interface: String,
    pub start_to_ready_ms: Vec<f64>,
    pub start_to_ready_median_ms: f64,
    pub streams: usize,
    pub rss_idle_mib: f64,
    /// The median of readings every 100 ms while the calls are open.
    pub rss_with_streams_mib: f64,
    /// The lowest and highest of those readings.
    pub rss_with_streams_range_mib: (f64, f64),
    pub peak_rss_mib: f64,
    pub calls_ok: usize,
    pub calls_failed: usize,
    pub first_error: Option<String>,
}

/// The lhnet-proxy binary beside this one (`cargo build --release` builds both).
fn proxy_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = me
        .parent()
        .map(|d| d.join("lhnet-proxy"))
        .ok_or("no directory")?;
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it first (cargo build --release -p lhnet-proxy)",
            path.display()
        ))
    }
}

/// Measures the lhnet-proxy binary at `binary` (default: the one beside this program).
pub fn run(
    binary: Option<PathBuf>,
    streams: usize,
    starts: usize,
) -> Result<FootprintReport, String> {
    if !Topology::can_build() {
        return Err(
            "bench-footprint needs root: it gives lhnet a network namespace with a real lhnet1"
                .into(),
        );
    }
    let binary = match binary {
        Some(b) => b,
        None => proxy_binary()?,
    };
    let mut topology = Topology::new("fp").map_err(|e| format!("namespace: {e}"))?;
    topology
        .add_bridge("fpbr")
        .map_err(|e| format!("bridge: {e}"))?;
    let pod = topology
        .add_namespace("pod")
        .map_err(|e| format!("namespace: {e}"))?;
    topology
        .attach(&pod, "lhnet1", "fpbr", Some("10.79.0.2/24"))
        .map_err(|e| format!("lhnet1: {e}"))?;
    lhnet_netns::namespace::run_in(&pod.name, move || inside(&binary, streams, starts.max(1)))
        .map_err(|e| format!("in the namespace: {e}"))?
}

fn inside(binary: &Path, streams: usize, starts: usize) -> Result<FootprintReport, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let upstream = rt
        .block_on(grpc_server(HOLD, "0"))
        .map_err(|e| format!("upstream: {e}"))?;
    // Inside the namespace nothing else binds.
    let port = || {
        crate::peers::free_port()
            .map(|a| a.port())
            .map_err(|e| e.to_string())
    };
    // Two bind(0)s in a row may hand out the same port; lhnet would then fail to start.
    let admin = port()?;
    let mut listen = port()?;
    while listen == admin {
        listen = port()?;
    }
    let dir = std::env::temp_dir().join(format!("lhnet-footprint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("lhnet.yaml");
    let limit = streams + 1000;
    std::fs::write(
        &config,
        format!(
            "admin: {{ address: 127.0.0.1:{admin} }}\nstorage_network: {{ interface: lhnet1 }}\n\
             listeners:\n  - name: m\n    address: 127.0.0.1:{listen}\n    max_requests: {limit}\n\
             \x20   routes:\n      - match: {{ prefix: / }}\n        cluster: up\n\
             clusters:\n  - name: up\n    endpoints: [{upstream}]\n\
             \x20   upstream_bind_config: {{ source_address: 127.0.0.1 }}\n\
             \x20   circuit_breakers: {{ max_requests: {limit}, max_requests_per_downstream_connection: {STREAMS_PER_CONNECTION} }}\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();

    let log = dir.join("lhnet.log");
    // What lhnet-proxy said last, for an error when it does not start.
    let said = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut last: Vec<&str> = text.lines().rev().take(3).collect();
        last.reverse();
        if last.is_empty() {
            format!("it wrote nothing to {}", log.display())
        } else {
            format!("its last words: {}", last.join(" | "))
        }
    };
    let mut times = Vec::new();
    let mut child = None;
    for i in 0..starts {
        let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let started = Instant::now();
        let mut c = Command::new(binary)
            .args(["-c"])
            .arg(&config)
            .args(["--threads", "1", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {}: {e} (give --proxy an executable lhnet-proxy, or build the \
                     one beside lhnet-loadtest: cargo build --release -p lhnet-proxy)",
                    binary.display()
                )
            })?;
        loop {
            if ready(admin_addr) {
                break;
            }
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!(
                    "lhnet-proxy ({}) exited before /ready ({status}); {}",
                    binary.display(),
                    said()
                ));
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = c.kill();
                return Err(format!(
                    "lhnet-proxy ({}) was not ready on http://{admin_addr}/ready within 10 s; {}",
                    binary.display(),
                    said()
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if i + 1 < starts {
            stop(&mut c);
        } else {
            child = Some(c);
        }
    }
    let mut child = child.ok_or("no process")?;
    let pid = child.id();
    let idle = rss_kib(pid, "VmRSS").unwrap_or(0);

    let proxy: SocketAddr = ([127, 0, 0, 1], listen).into();
    let started_calls = Instant::now();
    let calls = rt.spawn(open_streams(proxy, streams));
    // All sent well within HOLD; read the memory while they are open.
    // Sampled every 100 ms from a quarter to three quarters of HOLD (all calls are open by
    // then, and none has been answered): the median, since one reading moved by several MiB
    // between runs of one build (the allocator returns freed pages to the system lazily).
    std::thread::sleep(HOLD / 4);
    let mut samples = Vec::new();
    while started_calls.elapsed() < HOLD * 3 / 4 {
        samples.extend(rss_kib(pid, "VmRSS"));
        std::thread::sleep(Duration::from_millis(100));
    }
    samples.sort_unstable();
    let with = samples.get(samples.len() / 2).copied().unwrap_or(0);
    let (with_min, with_max) = (
        samples.first().copied().unwrap_or(0),
        samples.last().copied().unwrap_or(0),
    );
    let (ok, failed, first_error) = rt
        .block_on(calls)
        .map_err(|e| format!("the client task failed: {e}"))?;
    let peak = rss_kib(pid, "VmHWM").unwrap_or(0);
    stop(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(FootprintReport {
        storage_interface: "lhnet1 (veth in its own network namespace, 10.79.0.2/24)".into(),
        start_to_ready_median_ms: sorted[sorted.len() / 2],
        start_to_ready_ms: times,
        streams,
        rss_idle_mib: idle as f64 / 1024.0,
        rss_with_streams_mib: with as f64 / 1024.0,
        rss_with_streams_range_mib: (with_min as f64 / 1024.0, with_max as f64 / 1024.0),
        peak_rss_mib: peak as f64 / 1024.0,
        calls_ok: ok,
        calls_failed: failed,
        first_error,
    })
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `GET /ready` answered 200.
fn ready(admin: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(admin) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /ready HTTP/1.1\r\nhost: lhnet\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

/// A field of /proc/PID/status in KiB.
fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// An HTTP/2 server answering every request after `delay` with one empty gRPC message and
/// `grpc-status: status` (bench-footprint holds calls open with it; tests time the generator).
pub async fn grpc_server(delay: Duration, status: &'static str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    let body =
                        Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])).with_trailers(async move {
                            let mut t = http::HeaderMap::new();
                            t.insert("grpc-status", http::HeaderValue::from_static(status));
                            Some(Ok::<_, std::convert::Infallible>(t))
                        });
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(u32::MAX)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    Ok(addr)
}

/// Opens `streams` unary calls through `proxy`, 100 per connection, and waits for them all.
async fn open_streams(proxy: SocketAddr, streams: usize) -> (usize, usize, Option<String>) {
    let mut calls = tokio::task::JoinSet::new();
    let connections = streams.div_ceil(STREAMS_PER_CONNECTION);
    for c in 0..connections {
        let n = STREAMS_PER_CONNECTION.min(streams - c * STREAMS_PER_CONNECTION);
        let Ok(tcp) = tokio::net::TcpStream::connect(proxy).await else {
            calls.spawn(async { Err("cannot connect to lhnet".to_string()) });
            continue;
        };
        let Ok((send, connection)) = h2::client::handshake(tcp).await else {
            calls.spawn(async { Err("HTTP/2 handshake with lhnet failed".to_string()) });
            continue;
        };
        tokio::spawn(connection);
        for _ in 0..n {
            let send = send.clone();
            calls.spawn(async move { one_call(send, proxy).await });
        }
    }
    let (mut ok, mut failed, mut first) = (0, 0, None);
    while let Some(done) = calls.join_next().await {
        match done {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                failed += 1;
                first.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first.get_or_insert(e.to_string());
            }
        }
    }
    (ok, failed, first)
}

async fn one_call(send: h2::client::SendRequest<Bytes>, proxy: SocketAddr) -> Result<(), String> {
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::post(format!("http://{proxy}/bench.Hold/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut body) = send
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .map_err(|e| e.to_string())?;
    let (parts, mut recv) = response.await.map_err(|e| e.to_string())?.into_parts();
    if let Some(status) = parts.headers.get("grpc-status") {
        return Err(format!(
            "grpc-status {status:?}: {:?}",
            parts.headers.get("grpc-message")
        ));
    }
    while let Some(data) = recv.data().await {
        let data = data.map_err(|e| e.to_string())?;
        let _ = recv.flow_control().release_capacity(data.len());
    }
    match recv.trailers().await.map_err(|e| e.to_string())? {
        Some(t) if t.get("grpc-status").is_some_and(|s| s == "0") => Ok(()),
        other => Err(format!("trailers {other:?}")),
    }
}

pub fn print(r: &FootprintReport) {
    println!(
        "bench-footprint: lhnet-proxy --threads 1, storage interface {}",
        r.storage_interface
    );
    println!(
        "start to /ready: median {:.1} ms over {} starts ({})",
        r.start_to_ready_median_ms,
        r.start_to_ready_ms.len(),
        r.start_to_ready_ms
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "resident memory: idle {:.1} MiB; with {} calls open {:.1} MiB (median of 100 ms readings from {:.1} to {:.1}; peak {:.1} MiB); calls ok {}, failed {}{}",
        r.rss_idle_mib,
        r.streams,
        r.rss_with_streams_mib,
        r.rss_with_streams_range_mib.0,
        r.rss_with_streams_range_mib.1,
        r.peak_rss_mib,
        r.calls_ok,
        r.calls_failed,
        r.first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
}
