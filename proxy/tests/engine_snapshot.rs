//! Snapshot calls through the real lhnet-proxy against the simulated v1.12.1 engine and
//! replicas, as v1.12.1 and v1.3.3 managers send them: create, list, revert, remove, purge,
//! clone and hash, and what reached the engine and each replica.

use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes;
use tonic::Code;

mod common;
use common::longhorn::{self, engine_name, identity, wait_for, Manager, Volume};

fn snapshot(v: &Volume, m: Manager, name: &str) -> EngineVolumeSnapshotRequest {
    EngineVolumeSnapshotRequest {
        proxy_engine_request: v.per(m),
        snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
            name: name.into(),
            labels: [("k".to_string(), "v".to_string())].into(),
            freeze_filesystem: m == Manager::V1_12_1,
        }),
    }
}

async fn snapshot_calls(m: Manager) {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-s", 2).await;
    v.record();
    let created = p
        .client
        .volume_snapshot(snapshot(&v, m, "s1"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .name;
    assert_eq!(created, "s1");
    p.client
        .volume_snapshot(snapshot(&v, m, "s2"))
        .await
        .unwrap();
    let generated = p
        .client
        .volume_snapshot(snapshot(&v, m, ""))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .name;
    assert_eq!(
        generated.len(),
        36,
        "engine-generated names are UUIDs: {generated}"
    );
    let sent = v
        .engine
        .record()
        .of::<ptypes::VolumeSnapshotRequest>("VolumeSnapshot");
    assert_eq!(sent.len(), 3);
    assert!(sent
        .iter()
        .all(|(_, r)| r.labels["k"] == "v" && r.freeze_filesystem == (m == Manager::V1_12_1)));

    let disks = p
        .client
        .snapshot_list(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .disks;
    let mut names: Vec<&str> = disks.keys().map(String::as_str).collect();
    names.sort();
    let mut want = vec!["s1", "s2", generated.as_str(), "volume-head"];
    want.sort();
    assert_eq!(names, want);
    assert_eq!(disks["s2"].parent, "s1");
    assert!(disks["s1"].children.contains_key("s2"));
    assert_eq!(disks["volume-head"].parent, generated);
    assert_eq!(disks["s1"].labels["k"], "v");
    assert!(disks["s1"].user_created);

    let revert = |name: &str| EngineSnapshotRevertRequest {
        proxy_engine_request: v.per(m),
        name: name.into(),
    };
    let err = p
        .client
        .snapshot_revert(revert("volume-head"))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("cannot revert to the volume head"),
        "{err:?}"
    );
    p.client.snapshot_revert(revert("s1")).await.unwrap();
    let disks = p
        .client
        .snapshot_list(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .disks;
    assert_eq!(disks["volume-head"].parent, "s1");

    // Removal marks the snapshot on every RW replica; an unknown name is no error (the
    // replica ignores it), the head is; the last error is what comes back.
    let remove = |names: &[&str]| EngineSnapshotRemoveRequest {
        proxy_engine_request: v.per(m),
        names: names.iter().map(|n| n.to_string()).collect(),
    };
    p.client
        .snapshot_remove(remove(&["s2", "nope"]))
        .await
        .unwrap();
    let disks = p
        .client
        .snapshot_list(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .disks;
    assert!(disks["s2"].removed && !disks["s1"].removed);
    let err = p
        .client
        .snapshot_remove(remove(&["volume-head", "s1"]))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("cannot mark the active differencing disk as removed"),
        "{err:?}"
    );
    let disks = p
        .client
        .snapshot_list(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .disks;
    assert!(
        disks["s1"].removed,
        "names after the failing one are still removed"
    );

    // What the replicas got: the removal and the hash-job cancel for each name, under the
    // volume's name (a v1.12.1 manager's) and no instance name (lhnet cannot know it).
    for r in &v.replicas {
        let marked: Vec<String> = r
            .record()
            .of::<ptypes::DiskMarkAsRemovedRequest>("DiskMarkAsRemoved")
            .into_iter()
            .map(|(_, d)| d.name)
            .collect();
        assert!(marked.contains(&"s2".to_string()) && marked.contains(&"nope".to_string()));
        let cancelled = r
            .record()
            .of::<ptypes::SnapshotHashCancelRequest>("SnapshotHashCancel");
        assert!(cancelled.iter().any(|(_, c)| c.snapshot_name == "s2"));
        let want = (m == Manager::V1_12_1).then_some("vol-s");
        for call in r.record().calls() {
            if call.path.starts_with("/ptypes.SyncAgentService")
                || call.path.ends_with("/DiskMarkAsRemoved")
            {
                assert_eq!(identity(&call), (want, None), "{}", call.path);
            }
        }
    }
    let want = match m {
        Manager::V1_12_1 => (Some("vol-s"), Some(engine_name("vol-s"))),
        Manager::V1_3_3 => (None, None),
    };
    for call in v.engine.record().calls() {
        assert_eq!(
            identity(&call),
            (want.0, want.1.as_deref()),
            "{}",
            call.path
        );
    }
}

#[tokio::test]
async fn snapshot_calls_of_a_v1_12_1_manager() {
    snapshot_calls(Manager::V1_12_1).await;
}

#[tokio::test]
async fn snapshot_calls_of_a_v1_3_3_manager() {
    snapshot_calls(Manager::V1_3_3).await;
}

async fn purge_coalesces_removed_snapshots(m: Manager) {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-p", 2).await;
    for (i, name) in ["p1", "p2", "p3"].iter().enumerate() {
        v.write(i * 8192, &[i as u8 + 1; 8192]);
        p.client
            .volume_snapshot(snapshot(&v, m, name))
            .await
            .unwrap();
    }
    let before = v.replicas[0].replica.read(0, 3 * 8192);
    p.client
        .snapshot_remove(EngineSnapshotRemoveRequest {
            proxy_engine_request: v.per(m),
            names: vec!["p1".into(), "p2".into()],
        })
        .await
        .unwrap();

    let purge = |skip| EngineSnapshotPurgeRequest {
        proxy_engine_request: v.per(m),
        skip_if_in_progress: skip,
    };
    p.client.snapshot_purge(purge(false)).await.unwrap();
    // While it runs: skipping is fine, insisting is refused per replica.
    p.client.snapshot_purge(purge(true)).await.unwrap();
    let err = p.client.snapshot_purge(purge(false)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(
        err.message().contains("is already purging snapshots"),
        "{err:?}"
    );

    let mut client = p.client.clone();
    let saw_progress = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    wait_for(10, "the purge completes", || {
        let mut c = client.clone();
        let r = v.req(m);
        let saw = saw_progress.clone();
        async move {
            let status = c
                .snapshot_purge_status(r)
                .await
                .unwrap()
                .into_inner()
                .status;
            if status
                .values()
                .any(|p| p.is_purging && p.state == "in_progress")
            {
                saw.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            status
                .values()
                .all(|p| !p.is_purging && p.state == "complete" && p.progress == 100)
        }
    })
    .await;
    assert!(
        saw_progress.load(std::sync::atomic::Ordering::SeqCst),
        "the purge never showed as in progress"
    );
    let disks = client
        .snapshot_list(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .disks;
    assert!(
        !disks.contains_key("p1") && !disks.contains_key("p2"),
        "{:?}",
        disks.keys()
    );
    assert_eq!(disks["p3"].parent, "");
    for r in &v.replicas {
        assert_eq!(
            r.replica.read(0, 3 * 8192),
            before,
            "purge changed what the volume reads"
        );
    }
}

#[tokio::test]
async fn snapshot_purge_of_a_v1_12_1_manager_coalesces_and_keeps_the_bytes() {
    purge_coalesces_removed_snapshots(Manager::V1_12_1).await;
}

#[tokio::test]
async fn snapshot_purge_of_a_v1_3_3_manager_coalesces_and_keeps_the_bytes() {
    purge_coalesces_removed_snapshots(Manager::V1_3_3).await;
}

async fn clone_between_volumes(m: Manager) {
    let mut p = longhorn::start_proxy().await;
    let source = longhorn::volume("vol-src", 2).await;
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 200) as u8 + 1).collect();
    source.write(4096, &data);
    p.client
        .volume_snapshot(snapshot(&source, m, "golden"))
        .await
        .unwrap();
    // Written after the snapshot: must not travel.
    source.write(0, &[9u8; 4096]);

    let target = longhorn::volume("vol-clone", 2).await;
    source.record();
    target.record();
    let named = m == Manager::V1_12_1;
    let clone = EngineSnapshotCloneRequest {
        proxy_engine_request: target.per(m),
        from_engine_address: source.addr().to_string(),
        snapshot_name: "golden".into(),
        export_backing_image_if_exist: false,
        file_sync_http_client_timeout: if named { 30 } else { 0 },
        from_engine_name: if named {
            engine_name("vol-src")
        } else {
            String::new()
        },
        from_volume_name: if named {
            "vol-src".into()
        } else {
            String::new()
        },
        grpc_timeout_seconds: if named { 86400 } else { 0 },
        clone_mode: 0,
        dst_replica_src_replica_pair_map: Default::default(),
    };
    p.client.snapshot_clone(clone.clone()).await.unwrap();
    for r in &target.replicas {
        assert_eq!(r.replica.read(4096, data.len()), data);
        assert_eq!(
            r.replica.read(0, 4096),
            vec![0u8; 4096],
            "bytes written after the snapshot were cloned"
        );
    }
    assert!(p
        .client
        .snapshot_list(target.req(m))
        .await
        .unwrap()
        .into_inner()
        .disks
        .contains_key("golden"));
    let status = p
        .client
        .snapshot_clone_status(target.req(m))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status.len(), 2);
    for st in status.values() {
        assert_eq!(
            (st.state.as_str(), st.progress, st.snapshot_name.as_str()),
            ("complete", 100, "golden")
        );
        assert_eq!(st.from_replica_address, source.replicas[0].url());
    }
    // The source engine was asked under the source's names; each target replica got every
    // field of the clone.
    let want = named.then(|| ("vol-src".to_string(), engine_name("vol-src")));
    for call in source.engine.record().calls() {
        assert_eq!(
            identity(&call),
            (
                want.as_ref().map(|w| w.0.as_str()),
                want.as_ref().map(|w| w.1.as_str())
            ),
            "{}",
            call.path
        );
    }
    for r in &target.replicas {
        let got = r
            .record()
            .of::<ptypes::SnapshotCloneRequest>("SnapshotClone");
        assert_eq!(got.len(), 1);
        let (call, req) = &got[0];
        assert_eq!(
            (
                req.from_address.as_str(),
                req.snapshot_file_name.as_str(),
                req.file_sync_http_client_timeout,
                req.from_volume_name.as_str()
            ),
            (
                source.replicas[0].url().as_str(),
                "golden",
                clone.file_sync_http_client_timeout,
                clone.from_volume_name.as_str()
            )
        );
        assert_eq!(identity(call).0, named.then_some("vol-clone"));
    }

    // Every target replica must be RW: one rebuilding (WO) stops the clone.
    let third = longhorn::replica("vol-clone", 2, longhorn::SIZE).await;
    let mut controller =
        lhnet_proto::ptypes::controller_service_client::ControllerServiceClient::connect(format!(
            "http://{}",
            target.addr()
        ))
        .await
        .unwrap();
    controller
        .controller_replica_create(ptypes::ControllerReplicaCreateRequest {
            address: third.url(),
            snapshot_required: false,
            mode: ptypes::ReplicaMode::Wo as i32,
        })
        .await
        .unwrap();
    let err = p.client.snapshot_clone(clone).await.unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(
        err.message()
            .contains("in WO mode. All replicas in the target volume must be in RW mode"),
        "{err:?}"
    );
}

#[tokio::test]
async fn snapshot_clone_of_a_v1_12_1_manager() {
    clone_between_volumes(Manager::V1_12_1).await;
}

#[tokio::test]
async fn snapshot_clone_of_a_v1_3_3_manager() {
    clone_between_volumes(Manager::V1_3_3).await;
}

fn hash(v: &Volume, m: Manager, name: &str, rehash: bool) -> EngineSnapshotHashRequest {
    EngineSnapshotHashRequest {
        proxy_engine_request: v.per(m),
        snapshot_name: name.into(),
        rehash,
    }
}

fn hash_status(v: &Volume, m: Manager, name: &str) -> EngineSnapshotHashStatusRequest {
    EngineSnapshotHashStatusRequest {
        proxy_engine_request: v.per(m),
        snapshot_name: name.into(),
    }
}

async fn snapshot_hashing(m: Manager) {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-h", 2).await;
    let data: Vec<u8> = (0..3 << 20).map(|i| (i % 241) as u8 + 1).collect();
    v.write(0, &data);
    p.client
        .volume_snapshot(snapshot(&v, m, "h1"))
        .await
        .unwrap();
    v.record();
    p.client
        .snapshot_hash(hash(&v, m, "h1", false))
        .await
        .unwrap();
    let mut client = p.client.clone();
    wait_for(10, "hashing completes on both replicas", || {
        let mut c = client.clone();
        let r = hash_status(&v, m, "h1");
        async move {
            let st = c.snapshot_hash_status(r).await.unwrap().into_inner().status;
            st.len() == 2 && st.values().all(|s| s.state == "complete")
        }
    })
    .await;
    let status = client
        .snapshot_hash_status(hash_status(&v, m, "h1"))
        .await
        .unwrap()
        .into_inner()
        .status;
    // CRC-64 (ISO) of the snapshot's disk file, the same on both replicas.
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO).checksum(&data);
    for s in status.values() {
        assert_eq!(
            (s.checksum.clone(), s.silently_corrupted),
            (format!("{crc:016x}"), false)
        );
    }
    for r in &v.replicas {
        let asked = r.record().of::<ptypes::SnapshotHashRequest>("SnapshotHash");
        assert_eq!(asked.len(), 1);
        assert_eq!(
            (asked[0].1.snapshot_name.as_str(), asked[0].1.rehash),
            ("h1", false)
        );
        assert_eq!(
            identity(&asked[0].0).0,
            (m == Manager::V1_12_1).then_some("vol-h")
        );
        assert!(
            !r.record().of::<()>("SnapshotHashLockState").is_empty(),
            "the lock was checked"
        );
    }
    v.assert_engine_calls_named(m, "SnapshotHash");
    // An unknown snapshot: an error state, not an RPC error.
    let status = client
        .snapshot_hash_status(hash_status(&v, m, "nope"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(
        status
            .values()
            .all(|s| s.state == "error" && s.error.contains("no such file")),
        "{status:?}"
    );
}

#[tokio::test]
async fn snapshot_hash_of_a_v1_12_1_manager() {
    snapshot_hashing(Manager::V1_12_1).await;
}

#[tokio::test]
async fn snapshot_hash_of_a_v1_3_3_manager() {
    snapshot_hashing(Manager::V1_3_3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_can_be_cancelled_refuses_while_busy_and_finds_silent_corruption() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-hc", 2).await;
    let m = Manager::V1_12_1;
    v.write(0, &vec![5u8; 8 << 20]);
    p.client
        .volume_snapshot(snapshot(&v, m, "big"))
        .await
        .unwrap();
    for r in &v.replicas {
        r.replica.set_hash_rate(2 << 20);
    }
    p.client
        .snapshot_hash(hash(&v, m, "big", true))
        .await
        .unwrap();
    // The node is hashing: another request is refused with the text managers retry on.
    let err = p
        .client
        .snapshot_hash(hash(&v, m, "big", true))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .starts_with("cannot request hashing snapshot because"),
        "{err:?}"
    );
    assert!(err.message().ends_with("is hashing snapshot"), "{err:?}");
    // Removing a replica cancels its hashing jobs.
    let gone = v.replicas[1].url();
    p.client
        .replica_remove(EngineReplicaRemoveRequest {
            proxy_engine_request: v.per(m),
            replica_address: gone.clone(),
            replica_name: longhorn::replica_name("vol-hc", 1),
        })
        .await
        .unwrap();
    let (state, _, error, _) = v.replicas[1].replica.hash_state("big");
    assert!(
        state == "error" && error == "context canceled" || state == "in_progress",
        "{state} {error}"
    );
    let mut client = p.client.clone();
    wait_for(10, "the cancelled job ends", || {
        let r = v.replicas[1].replica.clone();
        async move { r.hash_state("big").0 == "error" }
    })
    .await;
    assert_eq!(
        v.replicas[1].replica.hash_state("big").2,
        "context canceled"
    );
    wait_for(20, "the kept replica's hash completes", || {
        let mut c = client.clone();
        let r = hash_status(&v, m, "big");
        async move {
            let st = c.snapshot_hash_status(r).await.unwrap().into_inner().status;
            st.values().all(|s| s.state == "complete")
        }
    })
    .await;
    // The bytes change under the file system (same change time): a rehash reports it.
    v.replicas[0].replica.set_hash_rate(0);
    v.replicas[0].replica.corrupt("big", 1000);
    client
        .snapshot_hash(hash(&v, m, "big", true))
        .await
        .unwrap();
    wait_for(10, "the rehash completes", || {
        let mut c = client.clone();
        let r = hash_status(&v, m, "big");
        async move {
            let st = c.snapshot_hash_status(r).await.unwrap().into_inner().status;
            st.values().all(|s| s.state == "complete")
        }
    })
    .await;
    let status = client
        .snapshot_hash_status(hash_status(&v, m, "big"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(
        status[&v.replicas[0].url()].silently_corrupted,
        "{status:?}"
    );
}
