//! lhnet's load generator and benchmarks.
#![forbid(unsafe_code)]
// The load tools time synchronous loops and threads with std's clock (clippy.toml steers the
// proxy to tokio::time).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
#![deny(rust_2018_idioms)]

pub mod backup_bench;
pub mod bench;
pub mod demo;
pub mod engine_bench;
pub mod peers;

/// The simulated Longhorn engine, replicas and instance-manager (its own crate, `lhnet-sim`).
pub use lhnet_sim as sim;
