//! Generated protobuf and tonic code for lhnet: Longhorn v1.12.1's `imrpc` / `ptypes` /
//! `ProcessManagerService`, `grpc.health.v1`, and lhnet's own services.
#![deny(rust_2018_idioms)]

pub mod codec;
pub mod wire;

#[allow(clippy::all, rust_2018_idioms)] // generated code
mod generated {
    include!(concat!(env!("OUT_DIR"), "/protos.rs"));
}

/// Longhorn engine services (`ptypes.ControllerService`, `ReplicaService`, `SyncAgentService`).
pub use generated::ptypes;

/// Longhorn's instance-manager APIs: the proxy (`imrpc.ProxyEngineService`), `InstanceService`,
/// `DiskService`.
pub use generated::imrpc;

/// The instance-manager's `ProcessManagerService` (Longhorn declares it without a package).
pub mod process_manager {
    pub use super::generated::{
        process_manager_service_client, process_manager_service_server, LogRequest, LogResponse,
        ProcessCreateRequest, ProcessDeleteRequest, ProcessGetRequest, ProcessListRequest,
        ProcessListResponse, ProcessReplaceRequest, ProcessResponse, ProcessSpec, ProcessStatus,
        VersionResponse,
    };
}

/// The standard gRPC health protocol.
pub use generated::grpc::health::v1 as health;

/// lhnet's echo service, an upstream with every call shape for tests and benchmarks.
pub use generated::lhnet::echo::v1 as echo;

/// lhnet-to-lhnet lookups (`lhnet.v1.Peer`): a pod's storage address by its management IP.
pub use generated::lhnet::v1 as peer;

#[cfg(feature = "echo-server")]
pub mod echo_server;

/// The encoded `FileDescriptorSet` of every proto above, used to bound metric label values to
/// services and methods that exist, and by [`wire`] to know which fields are maps.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
