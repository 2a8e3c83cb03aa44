//! Compiles the protos with protox (pure Rust), so building needs no `protoc`.
//!
//! Every service uses `crate::codec::LonghornCodec`, which writes each map entry whole (key and
//! value even when empty) as Go's protobuf does; prost alone leaves default values out.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "ptypes/common.proto",
    "ptypes/controller.proto",
    "ptypes/replica.proto",
    "ptypes/syncagent.proto",
    "imrpc/common.proto",
    "imrpc/imrpc.proto",
    "imrpc/instance.proto",
    "imrpc/disk.proto",
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
    let mut config = prost_build::Config::new();
    // `prost::Name` on every message: the codec finds a message's shape by its proto name.
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::LonghornCodec")
        // One module tree for every package, the package-less ProcessManagerService included.
        .include_file("protos.rs")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
