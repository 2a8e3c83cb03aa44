//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same entry points
//! the cargo-fuzz targets call, on stable: every input a fuzzer found interesting (and every
//! crash it ever found, once fixed) must still return without panicking. The fuzzers
//! themselves run with `fuzz/run` (nightly); see docs/fuzzing.md.

use std::path::PathBuf;

use lhnet_proxy::fuzzing;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{}: no corpus", dir.display());
    for input in &inputs {
        run(&std::fs::read(input).unwrap());
    }
    eprintln!("{target}: {} inputs replayed", inputs.len());
}

#[test]
fn config() {
    replay("config", fuzzing::config);
}

#[test]
fn network_status() {
    replay("network_status", fuzzing::network_status);
}

#[test]
fn addresses() {
    replay("addresses", fuzzing::addresses);
}

#[test]
fn grpc_frames() {
    replay("grpc_frames", fuzzing::grpc_frames);
}

#[test]
fn engine_request() {
    replay("engine_request", fuzzing::engine_request);
}

#[test]
fn admission_review() {
    replay("admission_review", fuzzing::admission_review);
}

#[test]
fn backupstore_cfg() {
    replay("backupstore_cfg", fuzzing::backupstore_cfg);
}

#[test]
fn instance_messages() {
    replay("instance_messages", fuzzing::instance_messages);
}
