//! imrpc.ProxyEngineService volume calls through the real lhnet-proxy against the simulated
//! v1.12.1 engine, each as a v1.12.1 and as a v1.3.3 manager sends it; the identity metadata on
//! the engine hop; addresses lhnet refuses; what malformed or hostile requests get.

use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes;
use lhnet_sim as sim;
use tonic::Code;

mod common;
use common::longhorn::{self, engine_name, identity, Manager, SIZE};

/// Every volume call, with the fields `m` sends; what reached the engine, from its record.
async fn volume_calls(m: Manager) {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-a", 2).await;
    v.record();
    let named = m == Manager::V1_12_1;

    let version = p
        .client
        .server_version_get(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(
        (
            version.version.as_str(),
            version.cli_api_version,
            version.controller_api_version,
            version.controller_api_min_version
        ),
        ("v1.12.1-lhnet-sim", 12, 6, 4)
    );

    let volume = p
        .client
        .volume_get(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // The v1.12 fields the engine sends come back too (a v1.12.1 manager's monitor reads them).
    assert_eq!(
        (
            volume.name.as_str(),
            volume.size,
            volume.replica_count,
            volume.frontend_state.as_str(),
            volume.snapshot_max_count,
            volume.snapshot_max_size,
            volume.unmap_mark_snap_chain_removed
        ),
        ("vol-a", SIZE, 2, "down", 250, 0, false)
    );

    // The three address forms Longhorn uses all work.
    for form in [
        format!("tcp://{}", v.addr()),
        format!("http://{}/v1", v.addr()),
    ] {
        let mut r = v.req(m);
        r.address = form;
        assert_eq!(
            p.client
                .volume_get(r)
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .name,
            "vol-a"
        );
    }

    let start = EngineVolumeFrontendStartRequest {
        proxy_engine_request: v.per(m),
        frontend_start: Some(ptypes::VolumeFrontendStartRequest {
            frontend: "tgt-blockdev".into(),
        }),
    };
    p.client.volume_frontend_start(start.clone()).await.unwrap();
    // The engine's own error comes back with its text, as grpc-go prints it.
    let err = p.client.volume_frontend_start(start).await.unwrap_err();
    assert_eq!(err.code(), Code::Unknown);
    assert_eq!(
        err.message(),
        format!(
            "failed to start frontend tgt-blockdev for volume {}: rpc error: code = Unknown desc = frontend tgt-blockdev is already started, cannot be set as tgt-blockdev",
            v.addr()
        )
    );
    p.client.volume_frontend_shutdown(v.req(m)).await.unwrap();

    let expand = |size| EngineVolumeExpandRequest {
        proxy_engine_request: v.per(m),
        expand: Some(ptypes::VolumeExpandRequest { size }),
    };
    p.client.volume_expand(expand(2 * SIZE)).await.unwrap();
    let err = p.client.volume_expand(expand(SIZE)).await.unwrap_err();
    assert!(
        err.message()
            .contains("cannot be expanded to a smaller size"),
        "{err:?}"
    );

    p.client
        .volume_unmap_mark_snap_chain_removed_set(EngineVolumeUnmapMarkSnapChainRemovedSetRequest {
            proxy_engine_request: v.per(m),
            unmap_mark_snap: Some(ptypes::VolumeUnmapMarkSnapChainRemovedSetRequest {
                enabled: true,
            }),
        })
        .await
        .unwrap();
    p.client
        .volume_snapshot_max_count_set(EngineVolumeSnapshotMaxCountSetRequest {
            proxy_engine_request: v.per(m),
            count: Some(ptypes::VolumeSnapshotMaxCountSetRequest { count: 7 }),
        })
        .await
        .unwrap();
    p.client
        .volume_snapshot_max_size_set(EngineVolumeSnapshotMaxSizeSetRequest {
            proxy_engine_request: v.per(m),
            size: Some(ptypes::VolumeSnapshotMaxSizeSetRequest { size: 3 << 30 }),
        })
        .await
        .unwrap();
    let volume = p
        .client
        .volume_get(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (
            volume.size,
            volume.unmap_mark_snap_chain_removed,
            volume.snapshot_max_count,
            volume.snapshot_max_size
        ),
        (2 * SIZE, true, 7, 3 << 30)
    );
    // The engine pushed them on to its replicas.
    for r in &v.replicas {
        let info = r.replica.inspect();
        assert_eq!(
            (info.unmap_mark_disk_chain_removed, info.remain_snapshots),
            (true, 7)
        );
    }
    // A count below what the replicas hold is the engine's refusal.
    for name in ["a", "b"] {
        p.client
            .volume_snapshot(EngineVolumeSnapshotRequest {
                proxy_engine_request: v.per(m),
                snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                    name: name.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let err = p
        .client
        .volume_snapshot_max_count_set(EngineVolumeSnapshotMaxCountSetRequest {
            proxy_engine_request: v.per(m),
            count: Some(ptypes::VolumeSnapshotMaxCountSetRequest { count: 1 }),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().ends_with("cannot set snapshotMaxCount=1 smaller than current snapshot count usage=2, please purge snapshots first"),
        "{err:?}"
    );

    let metrics = p
        .client
        .metrics_get(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert_eq!(metrics, ptypes::Metrics::default(), "no frontend I/O yet");

    // What reached the engine: every field, and both names from a v1.12.1 manager only.
    let record = v.engine.record();
    let calls = record.calls();
    assert!(!calls.is_empty());
    for call in &calls {
        let want = if named {
            (Some("vol-a"), Some(engine_name("vol-a")))
        } else {
            (None, None)
        };
        // ServerVersionGet: the IM client sends the address only, whatever the manager.
        if call.path.ends_with("/VersionDetailGet") && m == Manager::V1_12_1 {
            assert_eq!(identity(call), (Some("vol-a"), Some("vol-a-e-0")));
            continue;
        }
        assert_eq!(identity(call), (want.0, want.1.as_deref()), "{}", call.path);
    }
    let sizes: Vec<i64> = record
        .of::<ptypes::VolumeExpandRequest>("VolumeExpand")
        .into_iter()
        .map(|(_, r)| r.size)
        .collect();
    assert_eq!(sizes, vec![2 * SIZE, SIZE]);
    let counts: Vec<i32> = record
        .of::<ptypes::VolumeSnapshotMaxCountSetRequest>("VolumeSnapshotMaxCountSet")
        .into_iter()
        .map(|(_, r)| r.count)
        .collect();
    assert_eq!(counts, vec![7, 1]);
    let max_sizes: Vec<i64> = record
        .of::<ptypes::VolumeSnapshotMaxSizeSetRequest>("VolumeSnapshotMaxSizeSet")
        .into_iter()
        .map(|(_, r)| r.size)
        .collect();
    assert_eq!(max_sizes, vec![3 << 30]);
    let unmap = record.of::<ptypes::VolumeUnmapMarkSnapChainRemovedSetRequest>(
        "VolumeUnmapMarkSnapChainRemovedSet",
    );
    assert!(unmap[0].1.enabled);
    let frontends = record.of::<ptypes::VolumeFrontendStartRequest>("VolumeFrontendStart");
    assert_eq!(frontends[0].1.frontend, "tgt-blockdev");
    // The engine's own calls to its replicas carry the volume name.
    for r in &v.replicas {
        assert!(r
            .record()
            .calls()
            .iter()
            .all(|c| c.volume_name.as_deref() == Some("vol-a")));
    }
}

#[tokio::test]
async fn volume_calls_of_a_v1_12_1_manager() {
    volume_calls(Manager::V1_12_1).await;
}

#[tokio::test]
async fn volume_calls_of_a_v1_3_3_manager() {
    volume_calls(Manager::V1_3_3).await;
}

#[tokio::test]
async fn metrics_get_reports_the_last_second_of_frontend_io() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-io", 2).await;
    let m = Manager::V1_12_1;
    p.client
        .volume_frontend_start(EngineVolumeFrontendStartRequest {
            proxy_engine_request: v.per(m),
            frontend_start: Some(ptypes::VolumeFrontendStartRequest {
                frontend: "tgt-blockdev".into(),
            }),
        })
        .await
        .unwrap();
    let frontend = sim::start_frontend("127.0.0.1:0".parse().unwrap(), &v.engine.engine)
        .await
        .unwrap();
    let mut io = sim::dataconn::DataClient::connect(&frontend.addr.to_string())
        .await
        .unwrap();
    let block = vec![7u8; 1 << 20];
    let mut metrics = ptypes::Metrics::default();
    for _ in 0..60 {
        for i in 0..4 {
            io.write_at(i << 20, &block).await.unwrap();
        }
        io.read_at(0, 1 << 20).await.unwrap();
        metrics = p
            .client
            .metrics_get(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .metrics
            .unwrap();
        if metrics.write_iops > 0 && metrics.read_iops > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(metrics.write_iops >= 4, "{metrics:?}");
    assert_eq!(
        metrics.write_throughput,
        metrics.write_iops << 20,
        "1 MiB per write"
    );
    assert!(
        metrics.write_latency > 0 && metrics.read_latency > 0,
        "{metrics:?}"
    );
}

#[tokio::test]
async fn a_call_naming_another_volume_is_refused_by_the_engine_and_changes_nothing() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-a", 2).await;
    let before = v.engine.engine.inspect();
    // A stale address: the manager means vol-b, whose engine once listened here.
    let mut wrong = v.req(Manager::V1_12_1);
    wrong.volume_name = "vol-b".into();
    wrong.engine_name = engine_name("vol-b");
    let err = p
        .client
        .volume_expand(EngineVolumeExpandRequest {
            proxy_engine_request: Some(wrong.clone()),
            expand: Some(ptypes::VolumeExpandRequest { size: 2 * SIZE }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .ends_with("rpc error: code = FailedPrecondition desc = incorrect volume name vol-b; check controller address"),
        "{err:?}"
    );
    // The right volume with another engine's name: refused on the instance name.
    let mut stale = v.req(Manager::V1_12_1);
    stale.engine_name = "vol-a-e-1".into();
    let err = p
        .client
        .volume_snapshot(EngineVolumeSnapshotRequest {
            proxy_engine_request: Some(stale),
            snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                name: "s1".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("incorrect instance name vol-a-e-1; check controller address"),
        "{err:?}"
    );
    // Replica calls are checked too: SnapshotList reads the replicas under the volume's name.
    let err = p.client.snapshot_list(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(v.engine.engine.inspect(), before, "the engine changed");
    for r in &v.replicas {
        assert!(r.replica.snapshots().is_empty());
    }
}

#[tokio::test]
async fn engine_down_is_unavailable_with_the_go_text_shape() {
    let mut p = longhorn::start_proxy().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = p
        .client
        .volume_get(ProxyEngineRequest {
            address: dead.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().starts_with(&format!(
            "failed to get volume {dead}: rpc error: code = Unavailable desc = "
        )),
        "{err:?}"
    );
}

#[tokio::test]
async fn forbidden_and_malformed_addresses_are_refused_before_any_dial() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-a", 1).await;
    // An engine outside allowed_destinations (127.0.0.1 only).
    let outside = sim::start_engine("127.0.0.2:0".parse().unwrap(), "vol-x", SIZE, vec![])
        .await
        .unwrap();
    let err = p
        .client
        .volume_get(ProxyEngineRequest {
            address: outside.served.addr.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not dialled"), "{err:?}");
    assert_eq!(outside.served.accepted(), 0);

    // A clone source outside the allowed set.
    let err = p
        .client
        .snapshot_clone(EngineSnapshotCloneRequest {
            proxy_engine_request: v.per(Manager::V1_12_1),
            from_engine_address: outside.served.addr.to_string(),
            snapshot_name: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(outside.served.accepted(), 0);

    for bad in ["", "engine-a:9501", "tcp://10.0.0.1", "10.0.0.1 :9501"] {
        let err = p
            .client
            .volume_get(ProxyEngineRequest {
                address: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(err.message().contains("address"), "{err:?}");
    }
}

#[tokio::test]
async fn names_a_manager_cannot_have_are_invalid_argument_and_nothing_is_sent() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-a", 1).await;
    v.record();
    let mut long = v.req(Manager::V1_12_1);
    long.engine_name = "e".repeat(10 * 1024);
    let err = p.client.volume_get(long).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("engine_name is 10240 bytes"),
        "{err:?}"
    );
    assert!(err.message().len() < 200, "the name is not echoed back");
    let mut bad = v.req(Manager::V1_12_1);
    bad.volume_name = "vol\na".into();
    let err = p.client.volume_get(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(v.engine.record().calls().is_empty());
    p.client.volume_get(v.req(Manager::V1_12_1)).await.unwrap();
}

#[tokio::test]
async fn a_thousand_calls_reuse_a_handful_of_engine_connections() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-a", 1).await;
    for i in 0..1000 {
        let m = if i % 2 == 0 {
            Manager::V1_12_1
        } else {
            Manager::V1_3_3
        };
        p.client.volume_get(v.req(m)).await.unwrap();
    }
    let accepted = v.engine.served.accepted();
    assert!(
        accepted <= 4,
        "{accepted} engine connections for 1000 VolumeGet calls"
    );
}

/// Bytes that are not the request the method takes: refused, and the proxy goes on.
#[tokio::test]
async fn malformed_and_mistyped_requests_are_invalid_argument_and_the_proxy_keeps_serving() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-a", 1).await;
    v.record();
    let cases: [(&str, Vec<u8>); 4] = [
        // Field 1 declared as a 100-byte string, 2 given.
        ("VolumeGet", vec![0x0a, 100, b'x', b'y']),
        // data_engine (field 5, an enum) sent as a string: the wrong wire type.
        ("VolumeGet", vec![0x2a, 0x01, b'x']),
        // EngineVolumeExpandRequest whose field 1 is a varint, not a message.
        ("VolumeExpand", vec![0x08, 0x01]),
        // A truncated varint.
        ("ReplicaList", vec![0x28, 0xff]),
    ];
    for (method, bytes) in cases {
        let (headers, _, trailers) = longhorn::raw_call(
            p.addr,
            &format!("/imrpc.ProxyEngineService/{method}"),
            longhorn::frame(&bytes),
            &[],
        )
        .await;
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or(headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status.as_deref(), Some("3"), "{method} {bytes:?}");
    }
    assert!(
        v.engine.record().calls().is_empty(),
        "nothing reached the engine"
    );
    p.client.volume_get(v.req(Manager::V1_12_1)).await.unwrap();
}
