//! An open-loop gRPC load generator that does not lie about tails: calls are sent at a fixed
//! rate on a schedule made before the run, each call's latency is counted from the moment the
//! schedule says it should have been sent (the coordinated-omission correction of wrk2), and
//! the schedule is kept with a timerfd to the microsecond, not tokio's millisecond timer, so
//! calls do not leave in bursts.
//!
//! One HTTP/2 connection (as `h2load -c 1`), driven from a task on the runtime it is given. A
//! call that has to wait for a stream slot still counts from its scheduled time.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

/// The generator's shortest sleep: waking for every call at tens of thousands a second would
/// cost the shared CPU more than the calls.
const TICK: Duration = Duration::from_micros(50);

/// What one open-loop run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Tail {
    pub target: String,
    /// The offered rate.
    pub rate: f64,
    pub calls: u64,
    pub errors: u64,
    /// Calls sent more than 1 ms after their scheduled time (the generator or the connection
    /// could not keep up; their latency still counts from the schedule).
    pub late: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// What the first failed call said.
    pub first_error: Option<String>,
}

/// One run: `path` on `addr` with request `body` (a framed gRPC message) at `rate` calls/s for
/// `duration`, as a task on the runtime of `on` (in `bench-engine`, the simulated engine's: one
/// thread runs both, so neither preempts the other mid-call as two busy threads on one CPU do).
/// With `trace`, every call is also written there as a line `SCHEDULED_US LATENCY_US` (from the
/// run's start, in the order the calls ended): stalls of the machine show as runs of slow calls
/// scheduled together.
#[allow(clippy::too_many_arguments)]
pub fn run(
    target: &str,
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    rate: f64,
    duration: Duration,
    on: &tokio::runtime::Handle,
    trace: Option<PathBuf>,
) -> Result<Tail, String> {
    let (target, path) = (target.to_string(), path.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    on.spawn(async move {
        let _ = tx.send(drive(target, addr, path, body, rate, duration).await);
    });
    let (tail, calls) = rx
        .recv()
        .map_err(|_| "the load task ended without a result".to_string())??;
    if let Some(file) = trace {
        let text: String = calls
            .iter()
            .map(|(at, latency)| format!("{} {}\n", at.as_micros(), latency.as_micros()))
            .collect();
        std::fs::write(&file, text).map_err(|e| {
            format!(
                "cannot write the open-loop trace {} ({e}); check the trace directory",
                file.display()
            )
        })?;
    }
    Ok(tail)
}

/// A timerfd tokio can wait on.
struct Tick(TimerFd);

impl AsRawFd for Tick {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

struct Pacer {
    fd: AsyncFd<Tick>,
}

impl Pacer {
    fn new() -> io::Result<Pacer> {
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK)
            .map_err(io::Error::from)?;
        // `AsyncFd::new` is deprecated because an `AsRawFd` could name a descriptor it does
        // not own; `Tick` owns its timerfd, which stays open until the AsyncFd drops it.
        #[allow(deprecated)]
        let fd = AsyncFd::new(Tick(fd))?;
        Ok(Pacer { fd })
    }

    /// Waits until `at` (to the microsecond).
    async fn until(&self, at: Instant) -> io::Result<()> {
        let wait = at.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Ok(());
        }
        self.fd
            .get_ref()
            .0
            .set(
                Expiration::OneShot(TimeSpec::from_duration(wait)),
                TimerSetTimeFlags::empty(),
            )
            .map_err(io::Error::from)?;
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

async fn drive(
    target: String,
    addr: SocketAddr,
    path: String,
    body: Bytes,
    rate: f64,
    duration: Duration,
) -> Result<(Tail, Vec<(Duration, Duration)>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{target} {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    // Large windows: h2 closes a connection holding more small unread DATA frames than half
    // its window allows (ENHANCE_YOUR_CALM), and a burst of replies can be that.
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake(tcp)
        .await
        .map_err(|e| format!("{target} {addr}: HTTP/2 handshake: {e}"))?;
    tokio::spawn(connection);
    let uri: http::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| format!("{path}: {e}"))?;
    // Warm up: the connection, and the target's own to its upstream.
    for _ in 0..200 {
        if let Err(e) = call(&send, &uri, &body).await {
            return Err(format!("{target}: warm-up call failed: {e}"));
        }
    }
    let pacer = Pacer::new().map_err(|e| format!("timerfd: {e}"))?;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let total = (rate * duration.as_secs_f64()).max(1.0) as u64;
    let start = Instant::now() + Duration::from_millis(5);
    let mut in_flight = FuturesUnordered::new();
    // (scheduled time from `start`, latency) of each call, in the order they ended.
    let mut calls: Vec<(Duration, Duration)> = Vec::with_capacity(total as usize);
    let (mut next, mut errors, mut late) = (0u64, 0u64, 0u64);
    let mut first_error = None;
    let scheduled = |n: u64| start + interval.mul_f64(n as f64);
    loop {
        let now = Instant::now();
        while next < total && scheduled(next) <= now {
            let at = scheduled(next);
            if now.duration_since(at) > Duration::from_millis(1) {
                late += 1;
            }
            let (send, uri, body) = (&send, &uri, &body);
            in_flight.push(async move {
                let result = call(send, uri, body).await;
                (at, at.elapsed(), result)
            });
            next += 1;
        }
        if next >= total && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            Some((at, latency, result)) = in_flight.next(), if !in_flight.is_empty() => {
                calls.push((at.duration_since(start), latency));
                if let Err(e) = result {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
            // At most one wake-up per TICK: the calls due by then leave together (their
            // latency still counts from their own scheduled times).
            waited = pacer.until(scheduled(next).max(Instant::now() + TICK)), if next < total => {
                waited.map_err(|e| format!("timerfd: {e}"))?;
            }
        }
    }
    let mut latencies: Vec<Duration> = calls.iter().map(|(_, latency)| *latency).collect();
    latencies.sort_unstable();
    let at = |p: f64| crate::engine_bench::percentile(&latencies, p);
    let tail = Tail {
        target,
        rate,
        calls: latencies.len() as u64,
        errors,
        late,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        first_error,
    };
    Ok((tail, calls))
}

/// One unary call; `Err` unless it ended with grpc-status 0.
async fn call(
    send: &h2::client::SendRequest<Bytes>,
    uri: &http::Uri,
    body: &Bytes,
) -> Result<(), String> {
    let mut send = send.clone().ready().await.map_err(|e| e.to_string())?;
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri.clone();
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    let (response, mut stream) = send
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    stream
        .send_data(body.clone(), true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    let (parts, mut recv) = response.into_parts();
    if let Some(status) = parts.headers.get("grpc-status") {
        // Trailers-Only: an error (or an empty success).
        return (status == "0")
            .then_some(())
            .ok_or_else(|| format!("grpc-status {status:?}"));
    }
    while let Some(data) = recv.data().await {
        let data = data.map_err(|e| e.to_string())?;
        let _ = recv.flow_control().release_capacity(data.len());
    }
    let trailers = recv.trailers().await.map_err(|e| e.to_string())?;
    match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
        Some(s) if s == "0" => Ok(()),
        other => Err(format!("grpc-status {other:?}")),
    }
}
