//! Generated protobuf and tonic code for lhnet: Longhorn's `imrpc`/`ptypes`, `grpc.health.v1`,
//! and lhnet's own test service.
#![deny(rust_2018_idioms)]
#![allow(clippy::all)] // generated code

/// Longhorn engine services (`ptypes.ControllerService`, `ReplicaService`, `SyncAgentService`).
pub mod ptypes {
    tonic::include_proto!("ptypes");
}

/// Longhorn's instance-manager proxy API (`imrpc.ProxyEngineService`).
pub mod imrpc {
    tonic::include_proto!("imrpc");
}

/// The standard gRPC health protocol.
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

/// lhnet's echo service, an upstream with every call shape for tests and benchmarks.
pub mod echo {
    tonic::include_proto!("lhnet.echo.v1");
}

/// lhnet-to-lhnet lookups (`lhnet.v1.Peer`): a pod's storage address by its management IP.
pub mod peer {
    tonic::include_proto!("lhnet.v1");
}

#[cfg(feature = "echo-server")]
pub mod echo_server;

/// The encoded `FileDescriptorSet` of every proto above, used to bound metric label values to
/// services and methods that exist.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
