//! Compiles the protos with protox (pure Rust), so building needs no `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "ptypes/common.proto",
    "ptypes/controller.proto",
    "ptypes/replica.proto",
    "ptypes/syncagent.proto",
    "imrpc/proxy.proto",
    "grpc/health/v1/health.proto",
    "lhnet/echo.proto",
    "lhnet/peer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
