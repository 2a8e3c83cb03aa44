//! `lhnet-loadtest`: benchmarks (and, later, the demo and the simulator).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lhnet_loadtest::bench::{self, BenchArgs};

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

fn main() -> ExitCode {
    match Cli::parse().command {
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
            match bench::run(&args) {
                Ok(report) => {
                    bench::print(&report);
                    if let Some(path) = json {
                        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                        if let Err(e) = std::fs::write(&path, text) {
                            eprintln!("lhnet-loadtest: cannot write {}: {e}", path.display());
                            return ExitCode::FAILURE;
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lhnet-loadtest bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
