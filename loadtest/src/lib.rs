//! lhnet's load generator and benchmarks.
#![forbid(unsafe_code)]
// The load tools time synchronous loops and threads with std's clock (clippy.toml steers the
// proxy to tokio::time).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
#![deny(rust_2018_idioms)]

pub mod backup_bench;
pub mod bench;
pub mod cputime;
pub mod demo;
pub mod demo_backup;
pub mod engine_bench;
pub mod footprint;
pub mod im;
pub mod openloop;
pub mod peers;
pub mod steal;
pub mod upgrade;

/// The simulated Longhorn engine, replicas and instance-manager (its own crate, `lhnet-sim`).
pub use lhnet_sim as sim;

/// A size as written on the command line: bytes, or with `Ki`, `Mi`, `Gi`.
pub fn parse_size(text: &str) -> Result<i64, String> {
    let (num, mult) = [("Gi", 1i64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)]
        .iter()
        .find_map(|(suffix, m)| text.strip_suffix(suffix).map(|n| (n, *m)))
        .unwrap_or((text, 1));
    num.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a size; write bytes or use Ki, Mi, Gi"))
}
