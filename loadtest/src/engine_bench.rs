//! `lhnet-loadtest bench-engine`: Longhorn's VolumeGet through lhnet's engine proxy versus
//! straight to the simulated engine's ControllerService, in one run, with the same client.
//!
//! lhnet gets one thread on CPU 0; the engine and the client share the other CPU.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::ProxyEngineRequest;
use lhnet_proto::ptypes::controller_service_client::ControllerServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::bench::{cpu_split, spawn_runtime_thread};

/// One side of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct EngineSample {
    pub target: String,
    pub calls: u64,
    pub errors: u64,
    pub calls_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub streams: usize,
    pub seconds: f64,
    pub direct: EngineSample,
    pub lhnet: EngineSample,
    pub ratio: f64,
    pub added_p99_ms: f64,
    /// The paced (open-loop) phase: both targets at the same offered rate, half of what lhnet
    /// sustained closed-loop.
    pub paced_calls_per_second: f64,
    pub paced_direct: EngineSample,
    pub paced_lhnet: EngineSample,
    pub paced_added_p99_ms: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

async fn drive<F, Fut>(
    name: &str,
    streams: usize,
    duration: Duration,
    rate: Option<f64>,
    call: F,
) -> EngineSample
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    // Warm up connections first.
    for i in 0..streams {
        call(i).await;
    }
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                // Paced: stream i calls at its slots of a fixed schedule. Latency counts from
                // the send, not the slot: tokio's timer is millisecond-grained, and each
                // stream's slots are ~7 ms apart, far longer than a call, so no call waits for
                // the one before it (no coordinated omission to correct).
                let every = rate.map(|r| Duration::from_secs_f64(streams as f64 / r));
                let mut slot = Instant::now()
                    + every.map_or(Duration::ZERO, |e| e.mul_f64(i as f64 / streams as f64));
                while Instant::now() < deadline {
                    if every.is_some() {
                        tokio::time::sleep_until(slot.into()).await;
                    }
                    let started = Instant::now();
                    if !call(i).await {
                        errors += 1;
                    }
                    latencies.push(started.elapsed());
                    if let Some(every) = every {
                        slot += every;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    all.sort();
    EngineSample {
        target: name.into(),
        calls: all.len() as u64,
        errors,
        calls_per_second: all.len() as f64 / duration.as_secs_f64(),
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
    }
}

/// Runs the comparison.
pub fn run(streams: usize, duration: Duration) -> Result<EngineReport, String> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (proxy_cpus, load_cpus) = cpu_split(cpus, 1);
    let engine = spawn_runtime_thread("sim-engine", 1, load_cpus.clone(), |rt| {
        rt.block_on(async {
            // One real replica, so the engine answers a volume with a replica in it.
            let r = crate::sim::start_replica("127.0.0.1:0".parse().unwrap(), 64 << 20).await?;
            let e = crate::sim::start_engine(
                "127.0.0.1:0".parse().unwrap(),
                "bench-vol",
                64 << 20,
                vec![r.url()],
            )
            .await?;
            let addr = e.served.addr;
            // Both live for the rest of the process.
            std::mem::forget(r);
            std::mem::forget(e);
            Ok::<SocketAddr, std::io::Error>(addr)
        })
    })?;
    let yaml = "admin: { address: 127.0.0.1:0 }\nstorage_network: { interface: lo }\n\
        listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n\
        \x20     - match: { prefix: /imrpc.ProxyEngineService/ }\n        local: longhorn_engine_proxy\n\
        clusters:\n  - name: engines\n    type: original_dst\n    upstream_bind_config: { source_address: storage }\n\
        \x20   allowed_destinations: [127.0.0.0/8]\n";
    let (proxy, proxy_addr) = crate::bench::start_lhnet_thread(yaml, "m", 1, proxy_cpus)?;

    let client_rt = {
        let mut b = tokio::runtime::Builder::new_current_thread();
        b.enable_all();
        b.build().map_err(|e| e.to_string())?
    };
    if let Some(c) = &load_cpus {
        crate::bench::pin_current_thread(c);
    }
    let report = client_rt.block_on(async move {
        let channels = |addr: SocketAddr| async move {
            let mut v = Vec::new();
            for _ in 0..8 {
                v.push(
                    Channel::from_shared(format!("http://{addr}"))
                        .map_err(|e| e.to_string())?
                        .connect()
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            Ok::<_, String>(v)
        };
        let direct_channels = channels(engine).await?;
        let direct_call = move |i: usize| {
            let mut c = ControllerServiceClient::new(direct_channels[i % 8].clone());
            async move { c.volume_get(()).await.is_ok() }
        };
        let proxy_channels = channels(proxy_addr).await?;
        let address = engine.to_string();
        let lhnet_call = move |i: usize| {
            let mut c = ProxyEngineServiceClient::new(proxy_channels[i % 8].clone());
            // A v1.3.3 manager's request (the address only), as the runs before v1.12 measured.
            let req = ProxyEngineRequest {
                address: address.clone(),
                ..Default::default()
            };
            async move { c.volume_get(req).await.is_ok() }
        };
        let direct = drive("direct", streams, duration, None, direct_call.clone()).await;
        let lhnet = drive("lhnet", streams, duration, None, lhnet_call.clone()).await;
        let rate = (lhnet.calls_per_second / 2.0).max(1.0);
        let paced_direct = drive("direct", streams, duration, Some(rate), direct_call).await;
        let paced_lhnet = drive("lhnet", streams, duration, Some(rate), lhnet_call).await;
        Ok::<_, String>(EngineReport {
            streams,
            seconds: duration.as_secs_f64(),
            ratio: lhnet.calls_per_second / direct.calls_per_second.max(1e-9),
            added_p99_ms: lhnet.p99_ms - direct.p99_ms,
            direct,
            lhnet,
            paced_calls_per_second: rate,
            paced_added_p99_ms: paced_lhnet.p99_ms - paced_direct.p99_ms,
            paced_direct,
            paced_lhnet,
        })
    })?;
    proxy.shutdown_token().cancel();
    Ok(report)
}

pub fn print(r: &EngineReport) {
    println!(
        "VolumeGet, {} concurrent streams, {} s each, lhnet on 1 thread\n",
        r.streams, r.seconds
    );
    println!(
        "{:<8} {:>10} {:>12} {:>9} {:>9} {:>7}",
        "target", "calls", "calls/s", "p50 ms", "p99 ms", "errors"
    );
    for s in [&r.direct, &r.lhnet] {
        println!(
            "{:<8} {:>10} {:>12.0} {:>9.3} {:>9.3} {:>7}",
            s.target, s.calls, s.calls_per_second, s.p50_ms, s.p99_ms, s.errors
        );
    }
    println!(
        "\nlhnet / direct = {:.2}x; p99 added by lhnet = {:.3} ms (saturated, closed loop)",
        r.ratio, r.added_p99_ms
    );
    println!(
        "\npaced at {:.0} calls/s on both (half of lhnet's closed-loop rate), latency from each send:",
        r.paced_calls_per_second
    );
    for s in [&r.paced_direct, &r.paced_lhnet] {
        println!(
            "{:<8} {:>10} {:>12.0} {:>9.3} {:>9.3} {:>7}",
            s.target, s.calls, s.calls_per_second, s.p50_ms, s.p99_ms, s.errors
        );
    }
    println!(
        "p99 added by lhnet = {:.3} ms (paced)",
        r.paced_added_p99_ms
    );
}
