//! `lhnet-loadtest`: the two-network demo, benchmarks, and the simulated Longhorn engine and
//! replicas.
#![forbid(unsafe_code)]
// The load tools time synchronous loops and threads with std's clock (clippy.toml steers the
// proxy to tokio::time).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
#![deny(rust_2018_idioms)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lhnet_loadtest::bench::{self, BenchArgs};
use lhnet_loadtest::{parse_size, sim};

#[derive(Parser)]
#[command(
    name = "lhnet-loadtest",
    version,
    about = "lhnet's load generator and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The two-network demo (root): namespaces, lhnet in every pod, a Longhorn-shaped load.
    Demo {
        /// How long the load runs (e.g. 20s, 1m).
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        duration: Duration,
        /// Volumes the manager monitors (one engine and two replicas each).
        #[arg(long, default_value_t = 24)]
        volumes: usize,
        /// Volumes that also take block writes (volume 0 is rebuilt onto the spare).
        #[arg(long, default_value_t = 2)]
        data_volumes: usize,
        /// Size of each volume: bytes or 16Mi / 1Gi.
        #[arg(long, default_value = "32Mi", value_parser = parse_size)]
        volume_size: i64,
        /// Block writes per second over all data volumes (64Mi; 0 = unpaced).
        #[arg(long, default_value = "64Mi", value_parser = parse_rate)]
        data_rate: u64,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw latency over time and bytes per network per pod as SVG here.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Also the upgrade story: an instance-manager pod without lhnet (the manager calls its
        /// engine directly), then lhnet started in it midway (the manager moves to the proxy).
        #[arg(long)]
        upgrade: bool,
    },
    /// BackupVolumeList over a large vfs target through lhnet vs a plain directory walk; Ping.
    BenchBackups {
        #[arg(long, default_value_t = 1000)]
        volumes: usize,
        #[arg(long, default_value_t = 10)]
        backups: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// lhnet-proxy's time from start to /ready with a real lhnet1, and its memory with
    /// STREAMS calls open through it (root: a network namespace is made for it).
    BenchFootprint {
        /// Calls held open at once through lhnet.
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        /// Starts timed (the median is reported).
        #[arg(long, default_value_t = 5)]
        starts: usize,
        /// The lhnet-proxy to measure (default: the one beside lhnet-loadtest); any program
        /// that runs it with the arguments given, such as a valgrind wrapper script.
        #[arg(long)]
        proxy: Option<PathBuf>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Longhorn VolumeGet and ReplicaList through lhnet's engine proxy vs straight to the
    /// simulated engine: saturated rates (h2load) and open-loop tails.
    BenchEngine {
        /// Concurrent streams of the saturating client (h2load -c 1 -m STREAMS).
        #[arg(long, default_value_t = 64)]
        streams: usize,
        /// Seconds per measurement (each RPC: two saturated runs and six open-loop runs).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// The RPCs to measure (comma-separated): VolumeGet, ReplicaList.
        #[arg(long, value_delimiter = ',', default_value = "VolumeGet,ReplicaList")]
        rpcs: Vec<String>,
        /// The open-loop rates, as percentages of lhnet's saturated rate (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "25,50,75")]
        loads: Vec<u32>,
        /// Put lhnet on the load CPU too: no cross-CPU wake-ups (shows what they cost; not
        /// the benchmark's layout).
        #[arg(long)]
        same_cpu: bool,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write each open-loop run's calls to this directory (RPC-TARGET-PERCENT.txt, one
        /// line per call: scheduled time and latency in microseconds from the run's start).
        #[arg(long)]
        trace_dir: Option<PathBuf>,
    },
    /// A simulated instance-manager in the foreground: ProcessManagerService (and health) on
    /// --listen, InstanceService on --instance-listen; it starts the processes it is asked for
    /// (a binary named `longhorn` runs `lhnet-loadtest longhorn`, the simulated engine).
    InstanceManager {
        #[arg(long, default_value = "0.0.0.0:8500")]
        listen: SocketAddr,
        #[arg(long, default_value = "0.0.0.0:8503")]
        instance_listen: SocketAddr,
        /// Ports for the processes, FIRST-LAST.
        #[arg(long, default_value = "10000-30000", value_parser = parse_port_range)]
        port_range: (u16, u16),
    },
    /// The simulated `longhorn` binary an instance-manager runs: `controller VOLUME --listen
    /// IP:PORT --replica tcp://IP:PORT … --size N` or `replica DIR --listen IP:PORT --size N`.
    #[command(disable_help_flag = true)]
    Longhorn {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a simulated Longhorn engine and replicas in the foreground (Ctrl-C stops them).
    /// They are named as Longhorn names them (`<volume>-e-0`, `<volume>-r-<i>`, spares after
    /// the attached replicas) and refuse calls for other names, as v1.12.1's do.
    Sim {
        /// Volume name.
        #[arg(long)]
        volume: String,
        /// Which engine release to behave as: v1.12.1, or v1.3.3 (no identity check,
        /// controller API 3, backups without `concurrent_limit`).
        #[arg(long, default_value = "v1.12.1", value_parser = parse_release)]
        release: sim::Release,
        /// Volume size: bytes or 64Ki / 64Mi / 1Gi.
        #[arg(long, default_value = "64Mi", value_parser = parse_size)]
        size: i64,
        /// Engine ControllerService address.
        #[arg(long)]
        engine: SocketAddr,
        /// Replicas attached RW: ReplicaService on P, data on P+1, SyncAgentService on P+2,
        /// file receivers on P+3..=P+12.
        #[arg(long = "replica")]
        replicas: Vec<SocketAddr>,
        /// Replicas that run but are not attached (targets for ReplicaAdd).
        #[arg(long = "spare")]
        spares: Vec<SocketAddr>,
        /// Also serve the engine's frontend here: block reads and writes in the dataconn
        /// protocol, while the volume frontend is up (keep it on 127.0.0.1).
        #[arg(long)]
        frontend: Option<SocketAddr>,
    },
    /// gRPC unary and 1 MiB calls: direct, through lhnet, and through nginx / HAProxy.
    Bench {
        /// Peers to compare with (skipped with a note when not installed).
        #[arg(long, value_delimiter = ',', default_value = "nginx,haproxy")]
        peers: Vec<String>,
        /// Worker threads for every proxy.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// h2load connections (-c) and streams per connection (-m).
        #[arg(long, default_value_t = 8)]
        connections: u32,
        #[arg(long, default_value_t = 8)]
        streams: u32,
        /// Folder with the peer config templates (default: ../shared/peers).
        #[arg(long)]
        peers_dir: Option<PathBuf>,
        /// Request payload sizes in bytes (one workload each).
        #[arg(long, value_delimiter = ',', default_value = "16,1048576")]
        payloads: Vec<usize>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

// glibc's malloc spent ~10% of the proxy's CPU in malloc_consolidate under small-call load
// (perf, lhnet-loadtest bench); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{text:?} is not a port range; write FIRST-LAST, e.g. 10000-30000");
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

fn run_instance_manager(
    listen: SocketAddr,
    instance_listen: SocketAddr,
    ports: (u16, u16),
) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lhnet-loadtest instance-manager: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lhnet-loadtest instance-manager: where am I? {e}");
            return ExitCode::FAILURE;
        }
    };
    let binaries = lhnet_loadtest::im::Binaries {
        longhorn: (program, vec!["longhorn".into()]),
    };
    runtime.block_on(async move {
        let bind = |a: SocketAddr| async move {
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| format!("lhnet-loadtest instance-manager: cannot bind {a}: {e}"))
        };
        let (pm, instance) = match (bind(listen).await, bind(instance_listen).await) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let (pm_addr, instance_addr) = (pm.local_addr().ok(), instance.local_addr().ok());
        println!(
            "instance-manager: process manager {}, instance service {}",
            pm_addr.map(|a| a.to_string()).unwrap_or_default(),
            instance_addr.map(|a| a.to_string()).unwrap_or_default()
        );
        let im = lhnet_loadtest::im::InstanceManager::new(binaries, ports);
        tokio::select! {
            served = im.serve(pm, instance) => match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lhnet-loadtest instance-manager: {e}");
                    ExitCode::FAILURE
                }
            },
            _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        }
    })
}

fn parse_rate(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    parse_size(text).map(|n| n as u64)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    lhnet_proxy::config::parse_duration(text).and_then(|d| {
        if d.is_zero() {
            Err("the duration must be above zero".into())
        } else {
            Ok(d)
        }
    })
}

fn run_demo(args: lhnet_loadtest::demo::DemoArgs) -> ExitCode {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let cancel = Arc::new(AtomicBool::new(false));
    // Ctrl-C stops the load early; the run then tears the topology down as usual.
    {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        eprintln!("\ninterrupted: stopping the load and tearing the topology down");
                        cancel.store(true, Ordering::SeqCst);
                    }
                });
            }
        });
    }
    let report = match lhnet_loadtest::demo::run(&args, cancel.clone()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lhnet-loadtest demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    lhnet_loadtest::demo::print(&report);
    if args
        .json
        .as_ref()
        .is_some_and(|path| !write_json(&report, path))
    {
        return ExitCode::FAILURE;
    }
    if let Some(path) = &args.plot {
        if let Err(e) = lhnet_loadtest::demo::plot(&report, path) {
            eprintln!("lhnet-loadtest: {e}");
            return ExitCode::FAILURE;
        }
    }
    if cancel.load(Ordering::SeqCst) {
        return ExitCode::from(130);
    }
    let upgrade_failed = report.upgrade.as_ref().is_some_and(|u| !u.ok);
    // A skipped backup (moto not installed) says so in the report; a failed one fails the run.
    let backup_failed = report.backup.skipped.is_none() && !report.backup.ok;
    if !report.segregation.ok
        || report.control.errors > 0
        || !report.rebuild.ok
        || upgrade_failed
        || backup_failed
    {
        eprintln!("lhnet-loadtest demo: the run did not pass (segregation, control errors, rebuild, backup or upgrade above)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn parse_release(text: &str) -> Result<sim::Release, String> {
    match text {
        "v1.12.1" => Ok(sim::Release::V1_12_1),
        "v1.3.3" => Ok(sim::Release::V1_3_3),
        other => Err(format!(
            "{other:?} is not a release the simulator knows: v1.12.1 or v1.3.3"
        )),
    }
}

fn run_sim(
    volume: String,
    release: sim::Release,
    size: i64,
    engine: SocketAddr,
    replicas: Vec<SocketAddr>,
    spares: Vec<SocketAddr>,
    frontend: Option<SocketAddr>,
) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lhnet-loadtest sim: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut running = Vec::new();
        for (i, (addr, attached)) in replicas
            .iter()
            .map(|a| (a, true))
            .chain(spares.iter().map(|a| (a, false)))
            .enumerate()
        {
            let spec = sim::ReplicaSpec {
                release,
                volume: volume.clone(),
                instance: format!("{volume}-r-{i}"),
                size,
            };
            match sim::start_replica_with(*addr, spec).await {
                Ok(r) => {
                    println!(
                        "replica {} {volume}-r-{i} (data {}, sync agent {}){}",
                        r.url(),
                        r.data.addr,
                        r.sync_agent.addr,
                        if attached { "" } else { " spare" }
                    );
                    running.push(r);
                }
                Err(e) => {
                    eprintln!(
                        "lhnet-loadtest sim: replica {addr}: {e} (P, P+1 and P+2 must be free)"
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
        let attached = running
            .iter()
            .take(replicas.len())
            .map(|r| r.url())
            .collect();
        let spec = sim::EngineSpec {
            release,
            volume: volume.clone(),
            instance: format!("{volume}-e-0"),
            size,
            replicas: attached,
        };
        let engine = match sim::start_engine_with(engine, spec).await {
            Ok(e) => e,
            Err(e) => {
                eprintln!("lhnet-loadtest sim: engine {engine}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let _frontend = match frontend {
            Some(addr) => match sim::start_frontend(addr, &engine.engine).await {
                Ok(f) => {
                    println!(
                        "frontend {} (dataconn; VolumeFrontendStart opens it)",
                        f.addr
                    );
                    Some(f)
                }
                Err(e) => {
                    eprintln!("lhnet-loadtest sim: frontend {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        println!(
            "engine {} {volume}-e-0 volume {volume} size {size}; Ctrl-C stops",
            engine.served.addr
        );
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    })
}

/// Prints a benchmark's report and writes it as JSON when asked; the exit code says whether
/// it ran.
fn report<R: serde::Serialize>(
    command: &str,
    result: Result<R, String>,
    print: impl FnOnce(&R),
    json: Option<PathBuf>,
) -> ExitCode {
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lhnet-loadtest {command}: {e}");
            return ExitCode::FAILURE;
        }
    };
    print(&report);
    if json.is_some_and(|path| !write_json(&report, &path)) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Writes `report` as pretty JSON to `path`; false (after saying why) when it cannot.
fn write_json<R: serde::Serialize>(report: &R, path: &std::path::Path) -> bool {
    let text = serde_json::to_string_pretty(report).unwrap_or_default();
    match std::fs::write(path, text) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("lhnet-loadtest: cannot write {}: {e}", path.display());
            false
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::BenchBackups {
            volumes,
            backups,
            runs,
            json,
        } => report(
            "bench-backups",
            lhnet_loadtest::backup_bench::run(volumes.max(1), backups, runs),
            lhnet_loadtest::backup_bench::print,
            json,
        ),
        Cmd::Demo {
            duration,
            volumes,
            data_volumes,
            volume_size,
            data_rate,
            json,
            plot,
            upgrade,
        } => run_demo(lhnet_loadtest::demo::DemoArgs {
            duration,
            volumes,
            data_volumes,
            volume_size,
            data_rate,
            json,
            plot,
            longhorn: None,
            upgrade,
        }),
        Cmd::BenchFootprint {
            streams,
            starts,
            proxy,
            json,
        } => report(
            "bench-footprint",
            lhnet_loadtest::footprint::run(proxy, streams.max(1), starts),
            lhnet_loadtest::footprint::print,
            json,
        ),
        Cmd::BenchEngine {
            streams,
            seconds,
            rpcs,
            loads,
            same_cpu,
            json,
            trace_dir,
        } => report(
            "bench-engine",
            lhnet_loadtest::engine_bench::run(
                streams.max(1),
                Duration::from_secs(seconds.max(1)),
                &rpcs,
                &loads,
                same_cpu,
                trace_dir.as_deref(),
            ),
            lhnet_loadtest::engine_bench::print,
            json,
        ),
        Cmd::InstanceManager {
            listen,
            instance_listen,
            port_range,
        } => run_instance_manager(listen, instance_listen, port_range),
        Cmd::Longhorn { args } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("longhorn: cannot start a runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(lhnet_loadtest::im::run_longhorn(&args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Sim {
            volume,
            release,
            size,
            engine,
            replicas,
            spares,
            frontend,
        } => run_sim(volume, release, size, engine, replicas, spares, frontend),
        Cmd::Bench {
            peers,
            threads,
            seconds,
            connections,
            streams,
            peers_dir,
            payloads,
            json,
        } => {
            let args = BenchArgs {
                peers: peers.into_iter().filter(|p| !p.is_empty()).collect(),
                threads: threads.max(1),
                duration: Duration::from_secs(seconds.max(1)),
                connections,
                streams,
                peers_dir,
                payloads,
            };
            report("bench", bench::run(&args), bench::print, json)
        }
    }
}
