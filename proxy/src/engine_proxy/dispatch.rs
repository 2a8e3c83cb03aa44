//! Which `imrpc.ProxyEngineService` calls lhnet answers and which it hands, byte for byte, to
//! the instance-manager's own proxy, decided from the method name and, for calls that name an
//! engine, the request's `ProxyEngineRequest.data_engine` read off the wire (no decoding, so
//! the forwarded bytes are the ones the manager sent).
//!
//! Longhorn's proxy serves `DATA_ENGINE_V1` (0, also when absent) and `DATA_ENGINE_V2` (1) and
//! answers any other value UNIMPLEMENTED "unsupported data engine N"; ServerVersionGet always
//! takes the v1 path. lhnet serves v1; v2 (SPDK), the SPDKBackingImage calls, the calls that act
//! on the instance-manager's own mounts, the deprecated BackupRestoreFinish, and any method name
//! it does not know (a newer Longhorn) go to the route's `passthrough_cluster`.

use prost::encoding::decode_varint;
use tonic::Status;

/// How a method's request carries the engine it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The request is a `ProxyEngineRequest` (`data_engine` is its field 5).
    Bare,
    /// The request's field 1 is the `ProxyEngineRequest`.
    Wrapped,
}

/// What to do with a call, before its body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Served by lhnet whatever the request says (no engine, or v1 always).
    Local,
    /// Served by lhnet for `data_engine` v1, passed through for v2, refused otherwise.
    ByDataEngine(Shape),
    /// Never served by lhnet: the instance-manager's proxy answers it.
    Passthrough(&'static str),
}

/// What to do with one call, once its first message is known.
#[derive(Debug, Clone)]
pub enum Decision {
    Local,
    /// Forward to the passthrough cluster; the text says why (for logs and errors).
    Passthrough(String),
    /// Refuse with this status (an unknown data engine), as Longhorn's proxy does.
    Refuse(Status),
}

/// `DATA_ENGINE_V1` / `DATA_ENGINE_V2` (imrpc `DataEngine`).
pub const DATA_ENGINE_V1: i32 = 0;
pub const DATA_ENGINE_V2: i32 = 1;

/// The route of `method` (the last path segment) of `imrpc.ProxyEngineService`.
pub fn route_of(method: &str) -> Route {
    use Route::*;
    use Shape::*;
    match method {
        "ServerVersionGet"
        | "Ping"
        | "BackupVolumeList"
        | "BackupVolumeGet"
        | "BackupGet"
        | "BackupConfigMetaGet"
        | "BackupRemove" => Local,
        "VolumeGet"
        | "VolumeFrontendShutdown"
        | "SnapshotList"
        | "SnapshotPurgeStatus"
        | "SnapshotCloneStatus"
        | "BackupRestoreStatus"
        | "ReplicaList"
        | "ReplicaRebuildingStatus"
        | "ReplicaRebuildConcurrentSyncLimitGet"
        | "MetricsGet" => ByDataEngine(Bare),
        "VolumeExpand"
        | "VolumeFrontendStart"
        | "VolumeUnmapMarkSnapChainRemovedSet"
        | "VolumeSnapshotMaxCountSet"
        | "VolumeSnapshotMaxSizeSet"
        | "VolumeSnapshot"
        | "SnapshotRevert"
        | "SnapshotPurge"
        | "SnapshotClone"
        | "SnapshotRemove"
        | "SnapshotHash"
        | "SnapshotHashStatus"
        | "SnapshotBackup"
        | "SnapshotBackupStatus"
        | "BackupRestore"
        | "ReplicaAdd"
        | "ReplicaRebuildingQosSet"
        | "ReplicaVerifyRebuild"
        | "ReplicaRemove"
        | "ReplicaModeUpdate"
        | "ReplicaRebuildConcurrentSyncLimitSet" => ByDataEngine(Wrapped),
        "CleanupBackupMountPoints" | "RemountReadOnlyVolume" => {
            Passthrough("it acts on the instance-manager's own mounts")
        }
        "SPDKBackingImageCreate"
        | "SPDKBackingImageDelete"
        | "SPDKBackingImageGet"
        | "SPDKBackingImageList"
        | "SPDKBackingImageWatch" => {
            Passthrough("it is served by the instance-manager's SPDK service")
        }
        "BackupRestoreFinish" => {
            Passthrough("it is deprecated and answered by the instance-manager as its release does")
        }
        _ => Passthrough("lhnet does not know this method (a newer Longhorn)"),
    }
}

/// The decision for a call whose route is [`Route::ByDataEngine`], from its first message
/// (the gRPC payload, without the 5-byte frame header). Bytes that do not parse are served
/// locally, where decoding refuses them with a clear error.
pub fn decide(method: &str, shape: Shape, message: &[u8]) -> Decision {
    let data_engine = match shape {
        Shape::Bare => last_varint(message, 5),
        Shape::Wrapped => {
            // A repeated message field is merged: its last field 5 wins.
            let mut found = None;
            for inner in len_fields(message, 1) {
                if let Some(v) = last_varint(inner, 5) {
                    found = Some(v);
                }
            }
            found
        }
    }
    .unwrap_or(0);
    // Protobuf's int32 enums travel as 64-bit varints; the low 32 bits are the value.
    let data_engine = data_engine as i32;
    match data_engine {
        DATA_ENGINE_V1 => {
            if method == "ReplicaRebuildingQosSet" {
                // Longhorn's v1 path has no QoS: it answers as for an unknown engine.
                Decision::Refuse(unsupported(DATA_ENGINE_V1))
            } else {
                Decision::Local
            }
        }
        DATA_ENGINE_V2 => Decision::Passthrough("data_engine is DATA_ENGINE_V2 (SPDK)".into()),
        other => Decision::Refuse(unsupported(other)),
    }
}

/// Longhorn's refusal of a data engine its proxy has no path for.
pub fn unsupported(data_engine: i32) -> Status {
    let name = match data_engine {
        DATA_ENGINE_V1 => "DATA_ENGINE_V1".to_string(),
        DATA_ENGINE_V2 => "DATA_ENGINE_V2".to_string(),
        n => n.to_string(),
    };
    Status::unimplemented(format!("unsupported data engine {name}"))
}

/// For handlers: a request that reached lhnet must be for the v1 engine.
pub fn require_v1(data_engine: i32) -> Result<(), Status> {
    match data_engine {
        DATA_ENGINE_V1 => Ok(()),
        DATA_ENGINE_V2 => Err(Status::unimplemented(
            "data_engine DATA_ENGINE_V2 (SPDK) is served by the instance-manager's own proxy, not by lhnet; set passthrough_cluster on the longhorn_engine_proxy route to forward it",
        )),
        other => Err(unsupported(other)),
    }
}

/// Whether `message` parses as protobuf at its top level (keys, wire types, lengths).
pub fn parses(message: &[u8]) -> bool {
    for_each_field(message, |_, _, _| {}).is_some()
}

/// The last varint of field `number` in `message`, if the message parses.
fn last_varint(message: &[u8], number: u64) -> Option<u64> {
    let mut found = None;
    for_each_field(message, |n, wire_type, value| {
        if n == number && wire_type == 0 {
            found = Some(value.varint);
        }
    })?;
    found
}

/// The bodies of every length-delimited field `number` in `message`.
fn len_fields(message: &[u8], number: u64) -> Vec<&[u8]> {
    let mut found = Vec::new();
    let _ = for_each_field(message, |n, wire_type, value| {
        if n == number && wire_type == 2 {
            found.push(value.bytes);
        }
    });
    found
}

struct Value<'a> {
    varint: u64,
    bytes: &'a [u8],
}

/// Walks the top-level fields of a protobuf message; `None` when it does not parse.
fn for_each_field<'a>(mut input: &'a [u8], mut f: impl FnMut(u64, u8, Value<'a>)) -> Option<()> {
    while !input.is_empty() {
        let key = decode_varint(&mut input).ok()?;
        let wire_type = (key & 7) as u8;
        let mut value = Value {
            varint: 0,
            bytes: &[],
        };
        match wire_type {
            0 => value.varint = decode_varint(&mut input).ok()?,
            1 => input = input.get(8..)?,
            2 => {
                let len = usize::try_from(decode_varint(&mut input).ok()?).ok()?;
                value.bytes = input.get(..len)?;
                input = &input[len..];
            }
            5 => input = input.get(4..)?,
            _ => return None,
        }
        f(key >> 3, wire_type, value);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lhnet_proto::imrpc::{EngineVolumeExpandRequest, ProxyEngineRequest};
    use prost::Message;

    fn per(data_engine: i32) -> ProxyEngineRequest {
        ProxyEngineRequest {
            address: "10.30.0.5:10000".into(),
            volume_name: "v".into(),
            data_engine,
            ..Default::default()
        }
    }

    #[test]
    fn data_engine_picks_the_path() {
        let bare = |d| decide("VolumeGet", Shape::Bare, &per(d).encode_to_vec());
        assert!(matches!(bare(0), Decision::Local));
        assert!(matches!(bare(1), Decision::Passthrough(_)));
        match bare(7) {
            Decision::Refuse(s) => {
                assert_eq!(s.code(), tonic::Code::Unimplemented);
                assert_eq!(s.message(), "unsupported data engine 7");
            }
            d => panic!("{d:?}"),
        }
        let wrapped = |d| {
            let r = EngineVolumeExpandRequest {
                proxy_engine_request: Some(per(d)),
                expand: None,
            };
            decide("VolumeExpand", Shape::Wrapped, &r.encode_to_vec())
        };
        assert!(matches!(wrapped(0), Decision::Local));
        assert!(matches!(wrapped(1), Decision::Passthrough(_)));
        assert!(matches!(wrapped(-1), Decision::Refuse(_)));
        // A v1.3.3 request (one field) and garbage are served locally; decoding judges them.
        let local = |m: &[u8]| matches!(decide("VolumeGet", Shape::Bare, m), Decision::Local);
        assert!(local(&[0x0a, 0x01, b'x']));
        assert!(local(&[0xff, 0xff]));
        match decide("ReplicaRebuildingQosSet", Shape::Wrapped, &[]) {
            Decision::Refuse(s) => {
                assert_eq!(s.message(), "unsupported data engine DATA_ENGINE_V1")
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn methods_lhnet_does_not_serve_pass_through() {
        assert_eq!(route_of("ServerVersionGet"), Route::Local);
        assert_eq!(route_of("ReplicaAdd"), Route::ByDataEngine(Shape::Wrapped));
        assert!(matches!(
            route_of("SPDKBackingImageList"),
            Route::Passthrough(_)
        ));
        assert!(matches!(
            route_of("RemountReadOnlyVolume"),
            Route::Passthrough(_)
        ));
        assert!(matches!(
            route_of("SomethingFromV1_13"),
            Route::Passthrough(_)
        ));
    }
}
