//! What lhnet puts on the wire for a Longhorn client, read as raw bytes: map entries whole,
//! calls lhnet does not serve passed byte for byte to the instance-manager's own proxy, data
//! engines it has no path for refused as Longhorn refuses them; and a v1.12.1 manager's engine
//! monitor cycle, several times over.

use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::{self, ReplicaMode};
use prost::Message;
use tonic::Code;

mod common;
use common::longhorn::{self, frame, raw_call, Manager, Reply, SIZE};

/// The fields of one encoded message: (number, wire type, body of a length-delimited field).
fn fields(mut bytes: &[u8]) -> Vec<(u64, u8, Vec<u8>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for i in 0..10 {
            let x = b[0];
            *b = &b[1..];
            v |= u64::from(x & 0x7f) << (7 * i);
            if x & 0x80 == 0 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes);
        let wire = (key & 7) as u8;
        let body = match wire {
            0 => {
                varint(&mut bytes);
                Vec::new()
            }
            2 => {
                let n = varint(&mut bytes) as usize;
                let b = bytes[..n].to_vec();
                bytes = &bytes[n..];
                b
            }
            1 => {
                bytes = &bytes[8..];
                Vec::new()
            }
            5 => {
                bytes = &bytes[4..];
                Vec::new()
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, wire, body));
    }
    out
}

/// The payload of the one message of a unary reply.
fn payload(body: &[u8]) -> &[u8] {
    assert!(
        body.len() >= 5 && body[0] == 0,
        "not one uncompressed message: {body:?}"
    );
    let n = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    &body[5..5 + n]
}

/// Asserts every entry of map field `number` in `message` has its key and its value.
fn entries_whole(message: &[u8], number: u64, what: &str) -> Vec<Vec<u8>> {
    let mut values = Vec::new();
    for (n, _, entry) in fields(message).into_iter().filter(|(n, _, _)| *n == number) {
        let parts: Vec<u64> = fields(&entry).iter().map(|(n, _, _)| *n).collect();
        assert_eq!(
            parts,
            vec![1, 2],
            "{what}: map field {n} entry without its key or value"
        );
        values.push(
            fields(&entry)
                .into_iter()
                .find(|(n, _, _)| *n == 2)
                .unwrap()
                .2,
        );
    }
    assert!(!values.is_empty(), "{what}: no entries");
    values
}

#[tokio::test]
async fn status_maps_carry_a_value_in_every_entry_even_an_empty_one() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-m", 2).await;
    let m = Manager::V1_12_1;
    // A third replica WO, so ReplicaRebuildingStatus has an (all-default) entry too.
    let third = longhorn::replica("vol-m", 2, SIZE).await;
    let mut controller = ptypes::controller_service_client::ControllerServiceClient::connect(
        format!("http://{}", v.addr()),
    )
    .await
    .unwrap();
    controller
        .controller_replica_create(ptypes::ControllerReplicaCreateRequest {
            address: third.url(),
            snapshot_required: false,
            mode: ReplicaMode::Wo as i32,
        })
        .await
        .unwrap();
    let request = frame(&v.req(m).encode_to_vec());
    // Fresh replicas: every status is all defaults, which prost alone would leave off.
    for method in [
        "SnapshotPurgeStatus",
        "SnapshotCloneStatus",
        "BackupRestoreStatus",
        "ReplicaRebuildingStatus",
    ] {
        let (_, body, trailers) = raw_call(
            p.addr,
            &format!("/imrpc.ProxyEngineService/{method}"),
            request.clone(),
            &[],
        )
        .await;
        assert_eq!(trailers.unwrap()["grpc-status"], "0", "{method}");
        let values = entries_whole(payload(&body), 1, method);
        if method != "ReplicaRebuildingStatus" {
            assert!(
                values.iter().all(Vec::is_empty),
                "{method}: the statuses are empty messages"
            );
        }
    }
    let hash = EngineSnapshotHashStatusRequest {
        proxy_engine_request: v.per(m),
        snapshot_name: "nope".into(),
    };
    let (_, body, _) = raw_call(
        p.addr,
        "/imrpc.ProxyEngineService/SnapshotHashStatus",
        frame(&hash.encode_to_vec()),
        &[],
    )
    .await;
    entries_whole(payload(&body), 1, "SnapshotHashStatus");
    // SnapshotList: a snapshot whose child is the head (children {volume-head: true}) and a
    // label with an empty value.
    p.client
        .volume_snapshot(EngineVolumeSnapshotRequest {
            proxy_engine_request: v.per(m),
            snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                name: "s".into(),
                labels: [("empty".to_string(), String::new())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let (_, body, _) = raw_call(
        p.addr,
        "/imrpc.ProxyEngineService/SnapshotList",
        request.clone(),
        &[],
    )
    .await;
    let disks = entries_whole(payload(&body), 1, "SnapshotList.disks");
    let s = disks
        .iter()
        .find(|d| fields(d).iter().any(|(n, _, b)| *n == 1 && b == b"s"))
        .expect("snapshot s listed");
    entries_whole(s, 3, "EngineSnapshotDiskInfo.children");
    let labels = entries_whole(s, 8, "EngineSnapshotDiskInfo.labels");
    assert_eq!(
        labels,
        vec![Vec::<u8>::new()],
        "the empty label value is written"
    );
}

fn im_reply() -> Reply {
    // One message (field 1 = "from the IM") and a status with details in the trailers.
    let message = {
        let mut m = vec![0x0a, 11];
        m.extend_from_slice(b"from the IM");
        m
    };
    Reply {
        body: frame(&message),
        trailers: vec![
            ("grpc-status", "5".into()),
            ("grpc-message", "engine%20vol-v2%20not%20found".into()),
            ("x-im-trailer", "kept".into()),
        ],
    }
}

#[tokio::test]
async fn what_lhnet_does_not_serve_goes_byte_for_byte_to_the_instance_manager_s_proxy() {
    let im = longhorn::im_proxy(im_reply()).await;
    let p = longhorn::start_proxy_with(Some(im.addr)).await;
    let v = longhorn::volume("vol-v1", 1).await;
    v.record();
    let v2 = ProxyEngineRequest {
        address: v.addr().to_string(),
        engine_name: "vol-v2-e-0".into(),
        volume_name: "vol-v2".into(),
        data_engine: 1,
        engine_frontend_name: "vol-v2-ef-0".into(),
        backend_store_driver: 1,
    };
    let expand_v2 = EngineVolumeExpandRequest {
        proxy_engine_request: Some(v2.clone()),
        expand: Some(ptypes::VolumeExpandRequest { size: 1 << 30 }),
    };
    let calls: Vec<(&str, Vec<u8>)> = vec![
        ("VolumeGet", v2.encode_to_vec()),
        ("VolumeExpand", expand_v2.encode_to_vec()),
        (
            "ReplicaRebuildingQosSet",
            EngineReplicaRebuildingQosSetRequest {
                proxy_engine_request: Some(v2.clone()),
                qos_limit_mbps: 50,
            }
            .encode_to_vec(),
        ),
        ("SPDKBackingImageList", vec![]),
        (
            "SPDKBackingImageCreate",
            SpdkBackingImageCreateRequest {
                name: "bi".into(),
                backing_image_uuid: "u".into(),
                disk_uuid: "d".into(),
                size: 1 << 30,
                checksum: "c".into(),
                from_address: "10.30.0.9:8002".into(),
                src_lvs_uuid: "l".into(),
            }
            .encode_to_vec(),
        ),
        (
            "SPDKBackingImageDelete",
            SpdkBackingImageDeleteRequest {
                name: "bi".into(),
                disk_uuid: "d".into(),
            }
            .encode_to_vec(),
        ),
        // The one server-streaming call: the stream comes back as the IM sends it.
        ("SPDKBackingImageWatch", vec![]),
        (
            "SPDKBackingImageGet",
            SpdkBackingImageGetRequest {
                name: "bi".into(),
                disk_uuid: "d".into(),
            }
            .encode_to_vec(),
        ),
        (
            "RemountReadOnlyVolume",
            RemountVolumeRequest {
                volume_name: "vol-v1".into(),
            }
            .encode_to_vec(),
        ),
        ("CleanupBackupMountPoints", vec![]),
        (
            "BackupRestoreFinish",
            EngineBackupRestoreFinishRequest {
                proxy_engine_request: Some(v2.clone()),
            }
            .encode_to_vec(),
        ),
        // A method of a Longhorn newer than lhnet, with a field lhnet has never heard of.
        ("VolumeTeleport", vec![0xfa, 0x7f, 0x03, b'n', b'e', b'w']),
    ];
    for (i, (method, message)) in calls.iter().enumerate() {
        let path = format!("/imrpc.ProxyEngineService/{method}");
        let sent = frame(message);
        let (headers, body, trailers) = raw_call(
            p.addr,
            &path,
            sent.clone(),
            &[("x-manager", "v1.12.1"), ("grpc-timeout", "30S")],
        )
        .await;
        // The instance-manager got the path, the bytes and the headers as sent.
        let seen = im.seen.lock().unwrap()[i].clone();
        assert_eq!(seen.path, path);
        assert_eq!(seen.body, sent, "{method}: body changed on the way");
        assert_eq!(seen.headers["x-manager"], "v1.12.1", "{method}");
        // The deadline goes on: what is left of the caller's 30 s (re-encoded, not dropped).
        let timeout = seen.headers["grpc-timeout"].to_str().unwrap();
        assert!(
            (25_000..=30_000).contains(&timeout_ms(timeout)),
            "{method}: grpc-timeout {timeout}"
        );
        // Its reply came back as it sent it: body, headers, status and other trailers.
        assert_eq!(body, im_reply().body, "{method}");
        assert_eq!(headers["x-from"], "instance-manager", "{method}");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["grpc-status"], "5", "{method}");
        assert_eq!(
            trailers["grpc-message"], "engine%20vol-v2%20not%20found",
            "{method}"
        );
        assert_eq!(trailers["x-im-trailer"], "kept", "{method}");
    }
    // None of them touched the v1 engine at that address.
    assert!(v.engine.record().calls().is_empty());
    // ServerVersionGet is answered by the v1 path whatever the data engine, as by Longhorn's
    // (its client sends the address only).
    let version_v2 = ProxyEngineRequest {
        address: v.addr().to_string(),
        data_engine: 1,
        ..Default::default()
    };
    let (_, body, trailers) = raw_call(
        p.addr,
        "/imrpc.ProxyEngineService/ServerVersionGet",
        frame(&version_v2.encode_to_vec()),
        &[],
    )
    .await;
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let version = EngineVersionProxyResponse::decode(payload(&body))
        .unwrap()
        .version
        .unwrap();
    assert_eq!(version.version, "v1.12.1-lhnet-sim");
    assert_eq!(im.seen.lock().unwrap().len(), calls.len());
}

/// A `grpc-timeout` value in milliseconds (the units grpc-go and lhnet write).
fn timeout_ms(v: &str) -> u64 {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "H" => n * 3_600_000,
        "M" => n * 60_000,
        "S" => n * 1000,
        "m" => n,
        "u" => n / 1000,
        "n" => n / 1_000_000,
        other => panic!("grpc-timeout unit {other}"),
    }
}

#[tokio::test]
async fn a_passed_through_call_that_succeeds_comes_back_as_the_instance_manager_sent_it() {
    let reply = Reply {
        body: {
            let mut b = frame(b"\x0a\x02ok").to_vec();
            b.extend_from_slice(&frame(b"\x0a\x04more"));
            b.into()
        },
        trailers: vec![("grpc-status", "0".into()), ("x-im-trailer", "kept".into())],
    };
    let im = longhorn::im_proxy(reply.clone()).await;
    let p = longhorn::start_proxy_with(Some(im.addr)).await;
    let v2 = ProxyEngineRequest {
        address: "127.0.0.1:1".into(),
        engine_name: "vol-v2-e-0".into(),
        volume_name: "vol-v2".into(),
        data_engine: 1,
        ..Default::default()
    };
    let sent = frame(&v2.encode_to_vec());
    let (headers, body, trailers) = raw_call(
        p.addr,
        "/imrpc.ProxyEngineService/VolumeGet",
        sent.clone(),
        &[],
    )
    .await;
    assert_eq!(im.seen.lock().unwrap()[0].body, sent);
    assert_eq!(body, reply.body, "both messages, byte for byte");
    assert_eq!(headers["x-from"], "instance-manager");
    let trailers = trailers.expect("trailers");
    assert_eq!(
        (
            trailers["grpc-status"].to_str().unwrap(),
            trailers["x-im-trailer"].to_str().unwrap()
        ),
        ("0", "kept")
    );
    assert!(!trailers.contains_key("grpc-message"), "{trailers:?}");
}

#[tokio::test]
async fn without_a_passthrough_cluster_they_are_unimplemented_naming_the_key() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-np", 1).await;
    v.record();
    let mut v2 = v.req(Manager::V1_12_1);
    v2.data_engine = 1;
    let err = p.client.volume_get(v2).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(err.message().starts_with("imrpc.ProxyEngineService/VolumeGet is not served by lhnet (data_engine is DATA_ENGINE_V2 (SPDK))"), "{err:?}");
    assert!(err.message().contains("set passthrough_cluster"), "{err:?}");
    let err = p.client.spdk_backing_image_list(()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().contains("SPDKBackingImageList")
            && err.message().contains("passthrough_cluster"),
        "{err:?}"
    );
    // A method lhnet does not know: Trailers-Only, in the headers.
    let (headers, _, _) = raw_call(
        p.addr,
        "/imrpc.ProxyEngineService/VolumeTeleport",
        frame(&[]),
        &[],
    )
    .await;
    assert_eq!(headers["grpc-status"], "12");
    let message = headers["grpc-message"].to_str().unwrap();
    assert!(
        message.contains("VolumeTeleport") && message.contains("passthrough_cluster"),
        "{message}"
    );
    // An unknown data engine: Longhorn's own words, never the v1 path.
    let mut seven = v.req(Manager::V1_12_1);
    seven.data_engine = 7;
    let err = p.client.volume_get(seven).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unimplemented, "unsupported data engine 7")
    );
    let mut negative = v.req(Manager::V1_12_1);
    negative.data_engine = -3;
    let err = p.client.snapshot_list(negative).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unimplemented, "unsupported data engine -3")
    );
    assert!(
        v.engine.record().calls().is_empty(),
        "nothing reached the engine"
    );
    // An unknown replica mode is ERR to Longhorn.
    p.client
        .replica_mode_update(EngineReplicaModeUpdateRequest {
            proxy_engine_request: v.per(Manager::V1_12_1),
            replica_address: v.replicas[0].url(),
            mode: 9,
        })
        .await
        .unwrap();
    let list = p
        .client
        .replica_list(v.req(Manager::V1_12_1))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas;
    assert_eq!(list[0].mode, ReplicaMode::Err as i32);
}

/// What a v1.12.1 manager's engine monitor does every cycle for a running v1 volume
/// (`spec/longhorn-current.md` §7): read the engine, correct the flags that differ from the
/// engine's spec, read the statuses. Several cycles: none fails, the second needs no
/// correction, and the values set are the ones VolumeGet reports.
#[tokio::test]
async fn a_v1_12_1_managers_engine_monitor_cycle_runs_clean() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-mon", 3).await;
    let m = Manager::V1_12_1;
    // The engine's spec as the manager holds it.
    let (max_count, max_size, unmap, limit) = (100, 4i64 << 30, true, 3);
    let mut corrections = Vec::new();
    for cycle in 0..4 {
        let c = &mut p.client;
        let replicas = c.replica_list(v.req(m)).await.unwrap().into_inner();
        assert_eq!(replicas.replica_list.unwrap().replicas.len(), 3);
        c.snapshot_list(v.req(m)).await.unwrap();
        let info = c
            .volume_get(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(
            info.size, SIZE,
            "a size mismatch would make the monitor expand and stop"
        );
        if info.endpoint.is_empty() {
            c.volume_frontend_start(EngineVolumeFrontendStartRequest {
                proxy_engine_request: v.per(m),
                frontend_start: Some(ptypes::VolumeFrontendStartRequest {
                    frontend: "tgt-blockdev".into(),
                }),
            })
            .await
            .unwrap();
            corrections.push((cycle, "VolumeFrontendStart"));
        }
        c.replica_rebuilding_status(v.req(m)).await.unwrap();
        if info.unmap_mark_snap_chain_removed != unmap {
            c.volume_unmap_mark_snap_chain_removed_set(
                EngineVolumeUnmapMarkSnapChainRemovedSetRequest {
                    proxy_engine_request: v.per(m),
                    unmap_mark_snap: Some(ptypes::VolumeUnmapMarkSnapChainRemovedSetRequest {
                        enabled: unmap,
                    }),
                },
            )
            .await
            .unwrap();
            corrections.push((cycle, "VolumeUnmapMarkSnapChainRemovedSet"));
        }
        if info.snapshot_max_count != max_count {
            c.volume_snapshot_max_count_set(EngineVolumeSnapshotMaxCountSetRequest {
                proxy_engine_request: v.per(m),
                count: Some(ptypes::VolumeSnapshotMaxCountSetRequest { count: max_count }),
            })
            .await
            .unwrap();
            corrections.push((cycle, "VolumeSnapshotMaxCountSet"));
        }
        if info.snapshot_max_size != max_size {
            c.volume_snapshot_max_size_set(EngineVolumeSnapshotMaxSizeSetRequest {
                proxy_engine_request: v.per(m),
                size: Some(ptypes::VolumeSnapshotMaxSizeSetRequest { size: max_size }),
            })
            .await
            .unwrap();
            corrections.push((cycle, "VolumeSnapshotMaxSizeSet"));
        }
        let got = c
            .replica_rebuild_concurrent_sync_limit_get(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .limit;
        if got != limit {
            c.replica_rebuild_concurrent_sync_limit_set(
                EngineReplicaRebuildConcurrentSyncLimitSetRequest {
                    proxy_engine_request: v.per(m),
                    limit,
                },
            )
            .await
            .unwrap();
            corrections.push((cycle, "ReplicaRebuildConcurrentSyncLimitSet"));
        }
        c.snapshot_purge_status(v.req(m)).await.unwrap();
        c.backup_restore_status(v.req(m)).await.unwrap();
    }
    assert!(
        corrections.iter().all(|(cycle, _)| *cycle == 0),
        "corrections after the first cycle: {corrections:?}"
    );
    assert_eq!(corrections.len(), 5, "{corrections:?}");
    let info = p
        .client
        .volume_get(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (
            info.snapshot_max_count,
            info.snapshot_max_size,
            info.unmap_mark_snap_chain_removed
        ),
        (max_count, max_size, unmap)
    );
    assert_eq!(
        p.client
            .replica_rebuild_concurrent_sync_limit_get(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .limit,
        limit
    );
}

#[tokio::test]
async fn ping_and_the_backup_target_calls_answer_without_an_engine() {
    let mut p = longhorn::start_proxy().await;
    p.client.ping(()).await.unwrap();
    let dir = longhorn::scratch("wire-bt");
    let target = format!("vfs://{}", dir.display());
    let list = p
        .client
        .backup_volume_list(EngineBackupVolumeListRequest {
            envs: vec![],
            dest_url: target.clone(),
            volume_name: String::new(),
            volume_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.volumes.is_empty());
    let err = p
        .client
        .backup_volume_get(EngineBackupVolumeGetRequest {
            proxy_engine_request: None,
            envs: vec![],
            dest_url: format!("{target}?volume=nope"),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("cannot find"), "{err:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// An engine's reply message with a field lhnet's protos do not have (number 99): only a reply
/// passed on byte for byte keeps it.
fn with_unknown_field(message: Vec<u8>) -> Vec<u8> {
    let mut m = message;
    // Field 99, wire type 2, 3 bytes.
    m.extend_from_slice(&[0x9a, 0x06, 3, b'n', b'e', b'w']);
    m
}

#[tokio::test]
async fn volume_get_replica_list_and_metrics_get_pass_the_engines_reply_byte_for_byte() {
    let volume = with_unknown_field(
        ptypes::Volume {
            name: "vol-raw".into(),
            size: 1 << 30,
            replica_count: 2,
            snapshot_max_count: 250,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let list = with_unknown_field(
        ptypes::ReplicaListReply {
            replicas: vec![ptypes::ControllerReplica {
                address: Some(ptypes::ReplicaAddress {
                    address: "tcp://127.0.0.1:10000".into(),
                    instance_name: "vol-raw-r-0".into(),
                }),
                mode: ReplicaMode::Rw as i32,
            }],
        }
        .encode_to_vec(),
    );
    let metrics = with_unknown_field(
        ptypes::MetricsGetReply {
            metrics: Some(ptypes::Metrics {
                read_throughput: 7,
                ..Default::default()
            }),
        }
        .encode_to_vec(),
    );
    for (method, engine_message, wrapped) in [
        ("VolumeGet", volume, true),
        ("ReplicaList", list, true),
        ("MetricsGet", metrics, false),
    ] {
        // A stand-in engine answering with that message.
        let engine = longhorn::im_proxy(Reply {
            body: frame(&engine_message),
            trailers: vec![("grpc-status", "0".into())],
        })
        .await;
        let p = longhorn::start_proxy().await;
        let request = ProxyEngineRequest {
            address: engine.addr.to_string(),
            engine_name: "vol-raw-e-0".into(),
            volume_name: "vol-raw".into(),
            ..Default::default()
        };
        let (_, body, trailers) = raw_call(
            p.addr,
            &format!("/imrpc.ProxyEngineService/{method}"),
            frame(&request.encode_to_vec()),
            &[],
        )
        .await;
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0", "{method}");
        let expected = if wrapped {
            // Field 1 (length-delimited) around the engine's message.
            let mut m = vec![0x0a, engine_message.len() as u8];
            m.extend_from_slice(&engine_message);
            m
        } else {
            engine_message.clone()
        };
        assert_eq!(payload(&body), expected.as_slice(), "{method}");
        // One call reached the engine: its path, an empty message, the identity, a deadline.
        let seen = engine.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{method}");
        assert_eq!(seen[0].path, format!("/ptypes.ControllerService/{method}"));
        assert_eq!(seen[0].body, frame(&[]));
        assert_eq!(seen[0].headers["volume-name"], "vol-raw");
        assert_eq!(seen[0].headers["instance-name"], "vol-raw-e-0");
        assert_eq!(seen[0].headers["grpc-timeout"], "180S");
    }
}

#[tokio::test]
async fn an_engine_reply_that_does_not_parse_is_answered_as_the_decoding_path_answers_it() {
    // Not protobuf: a key with wire type 7.
    let engine = longhorn::im_proxy(Reply {
        body: frame(&[0x0f, 0x01]),
        trailers: vec![("grpc-status", "0".into())],
    })
    .await;
    let mut p = longhorn::start_proxy().await;
    let err = p
        .client
        .volume_get(ProxyEngineRequest {
            address: engine.addr.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().starts_with(&format!(
            "failed to get volume {}: rpc error: code = Internal desc = ",
            engine.addr
        )),
        "{err:?}"
    );
    // Asked once by the fast path, once more by the decoding path, which judged the reply.
    assert_eq!(engine.seen.lock().unwrap().len(), 2);

    // An engine's error status is wrapped as the decoding path wraps it, asked once.
    let failing = longhorn::im_proxy(Reply {
        body: bytes::Bytes::new(),
        trailers: vec![
            ("grpc-status", "9".into()),
            ("grpc-message", "incorrect volume name vol-x".into()),
        ],
    })
    .await;
    let err = p
        .client
        .volume_get(ProxyEngineRequest {
            address: failing.addr.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::FailedPrecondition,
            format!(
                "failed to get volume {}: rpc error: code = FailedPrecondition desc = incorrect volume name vol-x",
                failing.addr
            )
            .as_str()
        )
    );
    assert_eq!(failing.seen.lock().unwrap().len(), 1);
}
