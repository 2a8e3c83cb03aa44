//! `lhnet-loadtest bench-engine`: Longhorn's VolumeGet and ReplicaList through lhnet's engine
//! proxy versus straight to the simulated engine's ControllerService, in one run.
//!
//! lhnet gets one thread on CPU 0. The load comes from `h2load` (`-c 1 -m STREAMS -t 1`, the
//! command Longhorn's engine was measured with) for the saturated rates, and from
//! [`crate::openloop`] (fixed rate, latency from each call's scheduled time) for the tails at
//! 25, 50 and 75% of lhnet's saturated rate. The load and the simulated engine share CPU 1, so
//! "direct" is the engine's ceiling on one core with the client beside it; the open-loop
//! generator runs on the engine's own runtime thread, so the two never preempt each other.

use std::net::SocketAddr;
use std::time::Duration;

use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::ProxyEngineRequest;
use lhnet_proto::ptypes::controller_service_client::ControllerServiceClient;
use prost::Message;
use serde::Serialize;

use crate::bench::{cpu_list, cpu_split, frame, h2load_run, spawn_runtime_thread};
use crate::cputime;
use crate::openloop::{self, Tail};
use crate::steal::{self, StealShare};

const VOLUME: &str = "bench-vol";

/// A saturated (closed-loop) rate.
#[derive(Debug, Clone, Serialize)]
pub struct Saturated {
    pub target: String,
    pub calls_per_second: f64,
    pub succeeded: u64,
    pub failed: u64,
}

/// Both targets at one offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct OpenLoop {
    pub percent_of_saturation: u32,
    pub rate: f64,
    pub direct: Tail,
    pub lhnet: Tail,
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    pub added_p999_ms: f64,
    /// What the host took from each CPU during the direct and the lhnet run.
    pub direct_steal: StealShare,
    pub lhnet_steal: StealShare,
    /// lhnet's thread's CPU time over the lhnet run (its warm-up included), in percent of one
    /// CPU: near 100, lhnet is at its limit for calls arriving this way, whatever the
    /// saturated rate says.
    pub lhnet_busy_percent: f64,
}

/// One RPC's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RpcReport {
    pub rpc: String,
    pub direct: Saturated,
    pub lhnet: Saturated,
    pub ratio: f64,
    /// CPU time of lhnet's one thread per call in the saturated run.
    pub lhnet_cpu_us_per_call: f64,
    /// What the host took from each CPU during the two saturated runs.
    pub direct_steal: StealShare,
    pub lhnet_steal: StealShare,
    pub open_loop: Vec<OpenLoop>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub streams: usize,
    pub seconds: f64,
    pub layout: String,
    /// The CPUs lhnet and the load side ran on (the ones whose steal matters).
    pub cpus: Vec<usize>,
    pub rpcs: Vec<RpcReport>,
    /// VolumeGet's saturated rates and ratio (the figures of earlier runs).
    pub direct: Saturated,
    pub lhnet: Saturated,
    pub ratio: f64,
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// A v1.12.1 manager's request for the bench volume's engine at `engine`: the address and
/// both names.
fn manager_request(engine: SocketAddr) -> ProxyEngineRequest {
    ProxyEngineRequest {
        address: engine.to_string(),
        engine_name: format!("{VOLUME}-e-0"),
        volume_name: VOLUME.into(),
        ..Default::default()
    }
}

/// Runs the comparison for `rpcs` (VolumeGet, ReplicaList).
/// `loads`: the open-loop rates, as percentages of lhnet's saturated rate. `same_cpu`: lhnet on
/// the load CPU too (no cross-CPU wake-ups; to see what they cost, not the benchmark's layout).
/// `trace_dir`: where each open-loop run's calls are written ([`openloop::run`]), as
/// `RPC-TARGET-PERCENT.txt`.
pub fn run(
    streams: usize,
    duration: Duration,
    rpcs: &[String],
    loads: &[u32],
    same_cpu: bool,
    trace_dir: Option<&std::path::Path>,
) -> Result<EngineReport, String> {
    if let Some(dir) = trace_dir {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "--trace-dir {}: cannot create it ({e}); name a directory you can write",
                dir.display()
            )
        })?;
    }
    if crate::peers::which("h2load").is_none() {
        return Err(
            "h2load is not installed (apt-get install nghttp2-client); it is the load generator"
                .into(),
        );
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (mut proxy_cpus, load_cpus) = cpu_split(cpus, 1);
    if same_cpu {
        proxy_cpus = load_cpus.clone();
    }
    let engine = spawn_runtime_thread("sim-engine", 1, load_cpus.clone(), |rt| {
        rt.block_on(async {
            // One real replica, so the engine answers a volume with a replica in it.
            let r = crate::sim::start_replica("127.0.0.1:0".parse().unwrap(), 64 << 20).await?;
            let e = crate::sim::start_engine(
                "127.0.0.1:0".parse().unwrap(),
                VOLUME,
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
        .map(|addr| (addr, rt.handle().clone()))
    })?;
    let (engine, engine_rt) = engine;
    let yaml = "admin: { address: 127.0.0.1:0 }\nstorage_network: { interface: lo }\n\
        listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n\
        \x20     - match: { prefix: /imrpc.ProxyEngineService/ }\n        local: longhorn_engine_proxy\n\
        clusters:\n  - name: engines\n    type: original_dst\n    upstream_bind_config: { source_address: storage }\n\
        \x20   allowed_destinations: [127.0.0.0/8]\n";
    let (proxy, proxy_addr) = crate::bench::start_lhnet_thread(yaml, "m", 1, proxy_cpus.clone())?;
    check(engine, proxy_addr)?;

    let request = frame(&manager_request(engine).encode_to_vec());
    let dir = std::env::temp_dir().join(format!("lhnet-bench-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (direct_body, lhnet_body) = (dir.join("direct.bin"), dir.join("lhnet.bin"));
    std::fs::write(&direct_body, frame(&[])).map_err(|e| e.to_string())?;
    std::fs::write(&lhnet_body, &request).map_err(|e| e.to_string())?;
    let load = load_cpus.as_ref().map(|c| cpu_list(c));

    let mut reports = Vec::new();
    for rpc in rpcs {
        let direct_path = format!("/ptypes.ControllerService/{rpc}");
        let lhnet_path = format!("/imrpc.ProxyEngineService/{rpc}");
        // A saturated run against `addr`, and what the host took meanwhile.
        let saturate = |addr, path: &str, body: &std::path::Path| {
            let (m, steal) = steal::during(|| {
                h2load_run(
                    addr,
                    path,
                    body,
                    (1, streams as u32),
                    duration,
                    load.as_deref(),
                )
            });
            m.map(|m| (m, steal))
        };
        eprintln!("bench-engine: {rpc} saturated, direct ...");
        let (d, direct_steal) = saturate(engine, &direct_path, &direct_body)?;
        eprintln!("bench-engine: {rpc} saturated, via lhnet ...");
        let before = cputime::threads_seconds("lhnet-proxy");
        let (l, lhnet_steal) = saturate(proxy_addr, &lhnet_path, &lhnet_body)?;
        let cpu_us = match (before, cputime::threads_seconds("lhnet-proxy")) {
            (Some(b), Some(a)) if l.succeeded > 0 => {
                // h2load's warm-up second is not in `succeeded`: scale to the measured part.
                let calls = l.rps * (duration.as_secs_f64() + 1.0);
                (a - b) * 1e6 / calls
            }
            _ => 0.0,
        };
        let direct = Saturated {
            target: "direct".into(),
            calls_per_second: d.rps,
            succeeded: d.succeeded,
            failed: d.failed,
        };
        let lhnet = Saturated {
            target: "lhnet".into(),
            calls_per_second: l.rps,
            succeeded: l.succeeded,
            failed: l.failed,
        };
        let mut open_loop = Vec::new();
        for &percent in loads {
            let rate = l.rps * f64::from(percent) / 100.0;
            eprintln!("bench-engine: {rpc} open loop at {rate:.0}/s ({percent}% of lhnet's saturated rate) ...");
            let trace =
                |target: &str| trace_dir.map(|d| d.join(format!("{rpc}-{target}-{percent}.txt")));
            let (dt, direct_steal) = steal::during(|| {
                openloop::run(
                    "direct",
                    engine,
                    &direct_path,
                    frame(&[]),
                    rate,
                    duration,
                    &engine_rt,
                    trace("direct"),
                )
            });
            let (cpu_before, started) = (
                cputime::threads_seconds("lhnet-proxy"),
                std::time::Instant::now(),
            );
            let (lt, lhnet_steal) = steal::during(|| {
                openloop::run(
                    "lhnet",
                    proxy_addr,
                    &lhnet_path,
                    request.clone(),
                    rate,
                    duration,
                    &engine_rt,
                    trace("lhnet"),
                )
            });
            let (dt, lt) = (dt?, lt?);
            let lhnet_busy_percent = match (cpu_before, cputime::threads_seconds("lhnet-proxy")) {
                (Some(b), Some(a)) => (a - b) / started.elapsed().as_secs_f64() * 100.0,
                _ => 0.0,
            };
            open_loop.push(OpenLoop {
                percent_of_saturation: percent,
                rate,
                added_p50_ms: lt.p50_ms - dt.p50_ms,
                added_p99_ms: lt.p99_ms - dt.p99_ms,
                added_p999_ms: lt.p999_ms - dt.p999_ms,
                direct: dt,
                lhnet: lt,
                direct_steal,
                lhnet_steal,
                lhnet_busy_percent,
            });
        }
        reports.push(RpcReport {
            rpc: rpc.clone(),
            ratio: lhnet.calls_per_second / direct.calls_per_second.max(1e-9),
            lhnet_cpu_us_per_call: cpu_us,
            direct,
            lhnet,
            direct_steal,
            lhnet_steal,
            open_loop,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    proxy.shutdown_token().cancel();
    let first = reports
        .first()
        .cloned()
        .ok_or_else(|| "no RPC to measure".to_string())?;
    Ok(EngineReport {
        streams,
        seconds: duration.as_secs_f64(),
        layout: format!(
            "lhnet: 1 thread on CPU {}; load generator and simulated engine: CPU {}",
            proxy_cpus
                .as_deref()
                .map(cpu_list)
                .unwrap_or_else(|| "any".into()),
            load.unwrap_or_else(|| "any".into())
        ),
        cpus: {
            let mut cpus: Vec<usize> = proxy_cpus
                .iter()
                .chain(load_cpus.iter())
                .flatten()
                .copied()
                .collect();
            cpus.sort_unstable();
            cpus.dedup();
            cpus
        },
        direct: first.direct.clone(),
        lhnet: first.lhnet.clone(),
        ratio: first.ratio,
        rpcs: reports,
    })
}

/// One real VolumeGet each way, so a broken proxy cannot post a fast number.
fn check(engine: SocketAddr, proxy: SocketAddr) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut direct = ControllerServiceClient::connect(format!("http://{engine}"))
            .await
            .map_err(|e| format!("direct: {e}"))?;
        let want = direct
            .volume_get(())
            .await
            .map_err(|e| format!("direct VolumeGet: {e}"))?
            .into_inner();
        let mut via = ProxyEngineServiceClient::connect(format!("http://{proxy}"))
            .await
            .map_err(|e| format!("lhnet: {e}"))?;
        let got = via
            .volume_get(manager_request(engine))
            .await
            .map_err(|e| format!("VolumeGet via lhnet: {e}"))?
            .into_inner()
            .volume;
        if got.as_ref() != Some(&want) || want.name != VOLUME {
            return Err(format!(
                "VolumeGet via lhnet answered {got:?}, the engine {want:?}"
            ));
        }
        Ok(())
    })
}

pub fn print(r: &EngineReport) {
    println!(
        "bench-engine: h2load -c 1 -m {} -t 1 (saturated) and an open-loop generator, {} s each; {}\n",
        r.streams, r.seconds, r.layout
    );
    for rpc in &r.rpcs {
        println!(
            "{}: direct {:.0} calls/s (the simulated engine's ceiling on one core), lhnet {:.0} calls/s = {:.2}x direct; lhnet CPU {:.1} us per call",
            rpc.rpc, rpc.direct.calls_per_second, rpc.lhnet.calls_per_second, rpc.ratio, rpc.lhnet_cpu_us_per_call
        );
        println!(
            "  host steal, worst CPU: {:.1}% of the direct run, {:.1}% of the lhnet run",
            rpc.direct_steal.worst(Some(&r.cpus)),
            rpc.lhnet_steal.worst(Some(&r.cpus))
        );
        println!(
            "  {:>5} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>6} | {:>9} | {:>5}",
            "load",
            "calls/s",
            "dir p50",
            "p99",
            "p999",
            "lh p50",
            "p99",
            "p999",
            "+p50",
            "+p99",
            "+p999",
            "errors",
            "steal d/l",
            "lh cpu"
        );
        for o in &rpc.open_loop {
            // Sent over 1 ms behind the schedule: the load side (generator and engine on one
            // CPU) did not keep up, and the row measures it, not lhnet.
            let behind = late_share(&o.direct);
            let (direct_steal, lhnet_steal) = (
                o.direct_steal.worst(Some(&r.cpus)),
                o.lhnet_steal.worst(Some(&r.cpus)),
            );
            let note = if behind > 0.01 {
                format!(
                    "  <- direct sent {:.0}% late: the load side's limit, not lhnet's",
                    behind * 100.0
                )
            } else {
                steal_note(direct_steal, lhnet_steal)
            };
            println!(
                "  {:>4}% {:>8.0} | {:>8.3} {:>8.3} {:>8.3} | {:>8.3} {:>8.3} {:>8.3} | {:>8.3} {:>8.3} {:>8.3} | {:>6} | {:>4.1}/{:<4.1} | {:>4.0}%{note}",
                o.percent_of_saturation,
                o.rate,
                o.direct.p50_ms,
                o.direct.p99_ms,
                o.direct.p999_ms,
                o.lhnet.p50_ms,
                o.lhnet.p99_ms,
                o.lhnet.p999_ms,
                o.added_p50_ms,
                o.added_p99_ms,
                o.added_p999_ms,
                o.direct.errors + o.lhnet.errors,
                direct_steal,
                lhnet_steal,
                o.lhnet_busy_percent
            );
        }
        println!("  (ms; latency from each call's scheduled send time; +: added by lhnet; steal: % of the run the host took from the worse of lhnet's and the load's CPU, direct/lhnet run; lh cpu: lhnet's thread busy over its run)\n");
    }
}

/// A row's warning when the host took over 1% of a CPU in one of its runs: a vCPU the host
/// deschedules stalls for milliseconds, and 1% of the calls in such stalls is the p99.
fn steal_note(direct_percent: f64, lhnet_percent: f64) -> String {
    let worst = direct_percent.max(lhnet_percent);
    if worst <= 1.0 {
        return String::new();
    }
    let run = if lhnet_percent >= direct_percent {
        "lhnet"
    } else {
        "direct"
    };
    format!(
        "  <- the host took {worst:.1}% of a CPU in the {run} run: its stalls are in p99 and p999"
    )
}

/// The share of a run's calls sent more than 1 ms after their scheduled time.
fn late_share(t: &Tail) -> f64 {
    if t.calls == 0 {
        0.0
    } else {
        t.late as f64 / t.calls as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(calls: u64, late: u64) -> Tail {
        Tail {
            target: "direct".into(),
            rate: 1000.0,
            calls,
            errors: 0,
            late,
            p50_ms: 0.1,
            p99_ms: 0.2,
            p999_ms: 0.3,
            max_ms: 0.4,
            first_error: None,
        }
    }

    #[test]
    fn a_run_the_host_took_over_one_percent_of_is_flagged() {
        assert_eq!(steal_note(0.5, 1.0), "");
        assert!(steal_note(0.2, 2.5).contains("2.5% of a CPU in the lhnet run"));
        assert!(steal_note(3.0, 0.0).contains("in the direct run"));
    }

    #[test]
    fn the_late_share_is_of_the_calls_made() {
        assert_eq!(late_share(&tail(200, 10)), 0.05);
        assert_eq!(late_share(&tail(200, 0)), 0.0);
        assert_eq!(late_share(&tail(0, 0)), 0.0);
    }
}
