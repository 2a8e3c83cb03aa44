//! Replica calls through the real lhnet-proxy against the simulated v1.12.1 engine and
//! replicas, as v1.12.1 and v1.3.3 managers send them: ReplicaAdd's rebuild (fast sync, the
//! concurrent sync limit, every field reaching the new replica) and restore replicas, the 1:1
//! calls, and what happens when replicas fail.

use std::net::SocketAddr;

use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes::{self, ReplicaMode};
use lhnet_sim as sim;
use tonic::transport::Channel;
use tonic::Code;

mod common;
use common::longhorn::{self, engine_name, identity, replica_name, Manager, Volume, SIZE};

fn add(v: &Volume, m: Manager, url: &str, name: &str, restore: bool) -> EngineReplicaAddRequest {
    let v12 = m == Manager::V1_12_1;
    EngineReplicaAddRequest {
        proxy_engine_request: v.per(m),
        replica_address: url.to_string(),
        restore,
        size: SIZE,
        current_size: SIZE,
        fast_sync: v12,
        file_sync_http_client_timeout: if v12 { 30 } else { 0 },
        replica_name: if v12 { name.to_string() } else { String::new() },
        grpc_timeout_seconds: if v12 { 86400 } else { 0 },
        local_sync: v12.then(|| EngineReplicaLocalSync {
            source_path: "/var/lib/longhorn/replicas/src".into(),
            target_path: "/var/lib/longhorn/replicas/dst".into(),
        }),
        linked_clone_source: None,
    }
}

async fn modes(
    client: &mut ProxyEngineServiceClient<Channel>,
    v: &Volume,
    m: Manager,
) -> Vec<(String, i32)> {
    client
        .replica_list(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .replica_list
        .unwrap()
        .replicas
        .into_iter()
        .map(|r| (r.address.unwrap().address, r.mode))
        .collect()
}

async fn mode_of(
    client: &mut ProxyEngineServiceClient<Channel>,
    v: &Volume,
    url: &str,
) -> Option<i32> {
    modes(client, v, Manager::V1_12_1)
        .await
        .into_iter()
        .find(|(a, _)| a == url)
        .map(|(_, m)| m)
}

async fn rebuild(m: Manager) {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-r", 3).await;
    let block: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    v.write(0, &block);
    p.client
        .volume_snapshot(EngineVolumeSnapshotRequest {
            proxy_engine_request: v.per(m),
            snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                name: "before-add".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    v.write(1 << 20, &block[..4096]);
    // Two of the three RW replicas may serve the rebuild at once.
    p.client
        .replica_rebuild_concurrent_sync_limit_set(
            EngineReplicaRebuildConcurrentSyncLimitSetRequest {
                proxy_engine_request: v.per(m),
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        p.client
            .replica_rebuild_concurrent_sync_limit_get(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .limit,
        2
    );

    let spare = longhorn::replica("vol-r", 3, SIZE).await;
    spare.record().start();
    v.engine.record().start();
    let request = add(&v, m, &spare.url(), &replica_name("vol-r", 3), false);
    p.client.replica_add(request.clone()).await.unwrap();
    let engine_calls = v.engine.record().calls();

    assert_eq!(
        mode_of(&mut p.client, &v, &spare.url()).await,
        Some(ReplicaMode::Rw as i32)
    );
    // The spare holds the same bytes and chain as the sources, copied over TCP.
    assert_eq!(spare.replica.read(0, block.len()), block);
    assert_eq!(
        spare.replica.read(1 << 20, 4096),
        v.replicas[0].replica.read(1 << 20, 4096)
    );
    let source_snaps = v.replicas[0].replica.snapshots();
    assert_eq!(spare.replica.snapshots(), source_snaps);
    assert!(source_snaps.contains(&"volume-snap-before-add.img".to_string()));
    assert!(p
        .client
        .replica_rebuilding_status(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .status
        .is_empty());

    // Every field of the request reached the new replica's sync agent, from at most the
    // limit's number of sources, which it synced from at once.
    let synced = spare.record().of::<ptypes::FilesSyncRequest>("FilesSync");
    assert_eq!(synced.len(), 1);
    let (call, sync) = &synced[0];
    assert_eq!(
        sync.from_address_map.len(),
        2,
        "{:?}",
        sync.from_address_map
    );
    assert!(sync.from_address_map.contains_key(&sync.from_address));
    assert!(spare.replica.max_parallel_syncs() <= 2);
    assert_eq!(
        (
            sync.fast_sync,
            sync.file_sync_http_client_timeout,
            sync.grpc_timeout_seconds,
            sync.local_sync.as_ref().map(|l| l.target_path.as_str())
        ),
        (
            request.fast_sync,
            request.file_sync_http_client_timeout,
            request.grpc_timeout_seconds,
            request.local_sync.as_ref().map(|l| l.target_path.as_str())
        )
    );
    assert_eq!(sync.to_host, "127.0.0.1");
    // Calls to the new replica name it (instance-name) when the manager did.
    let named = m == Manager::V1_12_1;
    assert_eq!(
        identity(call),
        (named.then_some("vol-r"), named.then_some("vol-r-r-3"))
    );
    for call in spare.record().calls() {
        if call.path.contains("ReplicaService/")
            && call.volume_name.is_some()
            && call.instance_name.is_none()
        {
            // The engine's own calls (open, snapshot) name the volume only.
            continue;
        }
        if named {
            assert_eq!(call.volume_name.as_deref(), Some("vol-r"), "{}", call.path);
        }
    }
    let prepared = v
        .engine
        .record()
        .of::<ptypes::ReplicaAddress>("ReplicaPrepareRebuild");
    assert_eq!(prepared[0].1.instance_name, request.replica_name);
    assert_eq!(prepared[0].1.address, spare.url());
    let verified = v
        .engine
        .record()
        .of::<ptypes::ReplicaAddress>("ReplicaVerifyRebuild");
    assert_eq!(verified[0].1.instance_name, request.replica_name);
    let want = named.then(|| engine_name("vol-r"));
    for c in &engine_calls {
        assert_eq!(
            (c.volume_name.as_deref(), c.instance_name.clone()),
            (named.then_some("vol-r"), want.clone()),
            "{}",
            c.path
        );
    }
}

#[tokio::test]
async fn replica_add_rebuild_of_a_v1_12_1_manager() {
    rebuild(Manager::V1_12_1).await;
}

#[tokio::test]
async fn replica_add_rebuild_of_a_v1_3_3_manager() {
    rebuild(Manager::V1_3_3).await;
}

/// A replica that comes back with most of the data: with fast_sync only what changed moves.
#[tokio::test]
async fn fast_sync_moves_only_what_changed() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-f", 2).await;
    let m = Manager::V1_12_1;
    v.write(0, &vec![3u8; 4 << 20]);
    p.client
        .volume_snapshot(EngineVolumeSnapshotRequest {
            proxy_engine_request: v.per(m),
            snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                name: "base".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let spare = longhorn::replica("vol-f", 2, SIZE).await;
    let mut first = add(&v, m, &spare.url(), &replica_name("vol-f", 2), false);
    first.fast_sync = false;
    p.client.replica_add(first.clone()).await.unwrap();
    let full = spare.replica.received_bytes();
    assert!(full >= 4 << 20, "{full}");
    // It leaves, the volume changes a little, it comes back with its old files.
    p.client
        .replica_remove(EngineReplicaRemoveRequest {
            proxy_engine_request: v.per(m),
            replica_address: spare.url(),
            replica_name: replica_name("vol-f", 2),
        })
        .await
        .unwrap();
    v.write(1 << 20, &[9u8; 4096]);
    let mut again = first.clone();
    again.fast_sync = true;
    p.client.replica_add(again).await.unwrap();
    let second = spare.replica.received_bytes() - full;
    assert!(
        second < full / 4,
        "fast sync moved {second} of {full} bytes"
    );
    assert_eq!(spare.replica.read(1 << 20, 4096), vec![9u8; 4096]);
    assert_eq!(
        mode_of(&mut p.client, &v, &spare.url()).await,
        Some(ReplicaMode::Rw as i32)
    );
}

async fn replica_calls(m: Manager) {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-c", 2).await;
    let urls: Vec<String> = v.replicas.iter().map(|r| r.url()).collect();
    let listed = modes(&mut p.client, &v, m).await;
    assert_eq!(
        listed.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(),
        urls
    );
    assert!(listed
        .iter()
        .all(|(_, mode)| *mode == ReplicaMode::Rw as i32));

    for (name, n) in [
        (
            "purge",
            p.client
                .snapshot_purge_status(v.req(m))
                .await
                .unwrap()
                .into_inner()
                .status
                .len(),
        ),
        (
            "clone",
            p.client
                .snapshot_clone_status(v.req(m))
                .await
                .unwrap()
                .into_inner()
                .status
                .len(),
        ),
        (
            "restore",
            p.client
                .backup_restore_status(v.req(m))
                .await
                .unwrap()
                .into_inner()
                .status
                .len(),
        ),
    ] {
        assert_eq!(n, 2, "{name} status has an entry per replica");
    }
    // Only WO replicas are rebuilding.
    assert!(p
        .client
        .replica_rebuilding_status(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .status
        .is_empty());

    // A third replica added WO (as ReplicaAdd does) shows in rebuild status; verify makes it RW.
    let third = longhorn::replica("vol-c", 2, SIZE).await;
    let mut controller = ptypes::controller_service_client::ControllerServiceClient::connect(
        format!("http://{}", v.addr()),
    )
    .await
    .unwrap();
    controller
        .controller_replica_create(ptypes::ControllerReplicaCreateRequest {
            address: third.url(),
            snapshot_required: true,
            mode: ReplicaMode::Wo as i32,
        })
        .await
        .unwrap();
    let rebuilding = p
        .client
        .replica_rebuilding_status(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(rebuilding.keys().collect::<Vec<_>>(), vec![&third.url()]);
    v.record();
    let verify = EngineReplicaVerifyRebuildRequest {
        proxy_engine_request: v.per(m),
        replica_address: third.url(),
        replica_name: if m == Manager::V1_12_1 {
            replica_name("vol-c", 2)
        } else {
            String::new()
        },
    };
    p.client
        .replica_verify_rebuild(verify.clone())
        .await
        .unwrap();
    let sent = v
        .engine
        .record()
        .of::<ptypes::ReplicaAddress>("ReplicaVerifyRebuild");
    assert_eq!(
        (sent[0].1.address.clone(), sent[0].1.instance_name.clone()),
        (third.url(), verify.replica_name.clone())
    );
    assert_eq!(
        mode_of(&mut p.client, &v, &third.url()).await,
        Some(ReplicaMode::Rw as i32)
    );

    // ReplicaModeUpdate: RW and ERR only, as the engine allows.
    let update = |mode: ReplicaMode| EngineReplicaModeUpdateRequest {
        proxy_engine_request: v.per(m),
        replica_address: third.url(),
        mode: mode as i32,
    };
    v.engine.record().start();
    let err = p
        .client
        .replica_mode_update(update(ReplicaMode::Wo))
        .await
        .unwrap_err();
    assert!(err.message().ends_with("cannot set to mode WO"), "{err:?}");
    p.client
        .replica_mode_update(update(ReplicaMode::Err))
        .await
        .unwrap();
    assert_eq!(
        mode_of(&mut p.client, &v, &third.url()).await,
        Some(ReplicaMode::Err as i32)
    );
    p.client
        .replica_mode_update(update(ReplicaMode::Rw))
        .await
        .unwrap();
    assert_eq!(
        mode_of(&mut p.client, &v, &third.url()).await,
        Some(ReplicaMode::Err as i32),
        "ERR stays ERR"
    );
    let updates: Vec<(String, i32)> = v
        .engine
        .record()
        .of::<ptypes::ControllerReplica>("ReplicaUpdate")
        .into_iter()
        .map(|(_, r)| (r.address.unwrap().address, r.mode))
        .collect();
    assert_eq!(
        updates,
        [ReplicaMode::Wo, ReplicaMode::Err, ReplicaMode::Rw]
            .map(|mode| (third.url(), mode as i32))
            .to_vec()
    );

    // QoS is the v2 engine's: Longhorn's proxy refuses it for v1 in these words.
    let err = p
        .client
        .replica_rebuilding_qos_set(EngineReplicaRebuildingQosSetRequest {
            proxy_engine_request: v.per(m),
            qos_limit_mbps: 100,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::Unimplemented,
            "unsupported data engine DATA_ENGINE_V1"
        )
    );

    let err = p
        .client
        .replica_rebuild_concurrent_sync_limit_set(
            EngineReplicaRebuildConcurrentSyncLimitSetRequest {
                proxy_engine_request: v.per(m),
                limit: 0,
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.message()
            .ends_with("invalid concurrent sync limit 0, which should be a positive integer"),
        "{err:?}"
    );

    // A replica whose process is gone: its entry carries the error, the call still succeeds.
    let third_url = third.url();
    drop(third);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let clone = p
        .client
        .snapshot_clone_status(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(clone.len(), 3);
    assert!(
        clone[&third_url].error.starts_with(&format!(
            "failed to get snapshot clone status of {third_url}"
        )),
        "{clone:?}"
    );

    let remove = |a: String| EngineReplicaRemoveRequest {
        proxy_engine_request: v.per(m),
        replica_address: a,
        replica_name: String::new(),
    };
    p.client
        .replica_remove(remove(urls[1].clone()))
        .await
        .unwrap();
    // An address the engine does not have is no error (the engine ignores it).
    p.client
        .replica_remove(remove(urls[1].clone()))
        .await
        .unwrap();
    assert_eq!(
        p.client
            .volume_get(v.req(m))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .replica_count,
        2
    );
}

#[tokio::test]
async fn replica_calls_of_a_v1_12_1_manager() {
    replica_calls(Manager::V1_12_1).await;
}

#[tokio::test]
async fn replica_calls_of_a_v1_3_3_manager() {
    replica_calls(Manager::V1_3_3).await;
}

#[tokio::test]
async fn replica_add_starts_an_empty_volume_and_adds_restore_replicas() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-new", 0).await;
    let m = Manager::V1_12_1;
    let first = longhorn::replica("vol-new", 0, SIZE).await;
    p.client
        .replica_add(add(&v, m, &first.url(), &replica_name("vol-new", 0), false))
        .await
        .unwrap();
    assert_eq!(
        modes(&mut p.client, &v, m).await,
        vec![(first.url(), ReplicaMode::Rw as i32)]
    );

    let small = longhorn::replica("vol-new", 1, SIZE / 2).await;
    let err = p
        .client
        .replica_add(add(&v, m, &small.url(), &replica_name("vol-new", 1), true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(
        err.message().contains(&format!(
            "rebuilding replica size {} is not the same as volume size {SIZE}",
            SIZE / 2
        )),
        "{err:?}"
    );
    let same = longhorn::replica("vol-new", 2, SIZE).await;
    p.client
        .replica_add(add(&v, m, &same.url(), &replica_name("vol-new", 2), true))
        .await
        .unwrap();
    let listed = modes(&mut p.client, &v, m).await;
    assert!(
        listed.contains(&(same.url(), ReplicaMode::Wo as i32)),
        "{listed:?}"
    );
    // A restore replica joins without a rebuild.
    assert!(same.replica.snapshots().is_empty());
}

/// A replica on its own thread and runtime, so that it can die like a process: dropping the
/// runtime cancels every task it runs and closes every socket it holds, mid-call included.
struct ReplicaProcess {
    replica: sim::SimReplica,
    url: String,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReplicaProcess {
    fn start(volume: &'static str, i: usize) -> ReplicaProcess {
        let (ready, started) = std::sync::mpsc::channel();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let r = longhorn::replica(volume, i, SIZE).await;
                ready.send((r.replica.clone(), r.url())).unwrap();
                let _ = killed.await;
                // Leak the handles: no graceful stop, the runtime's drop below is the death.
                std::mem::forget(r);
            });
        });
        let (replica, url) = started.recv().unwrap();
        ReplicaProcess {
            replica,
            url,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_whose_target_dies_mid_sync_fails_and_the_volume_keeps_serving() {
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume("vol-d", 2).await;
    let m = Manager::V1_12_1;
    let block: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8 + 1).collect();
    v.write(0, &block);
    for r in &v.replicas {
        // A disk-speed sender, so that the sync is long enough to be cut in the middle.
        r.replica.set_sync_rate(16 << 20);
    }
    let mut target = ReplicaProcess::start("vol-d", 2);
    let url = target.url.clone();
    let mut client = p.client.clone();
    let request = add(&v, m, &url, &replica_name("vol-d", 2), false);
    let call = tokio::spawn(async move { client.replica_add(request).await });

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (got, total) = target.replica.rebuild_progress();
        if got > 0 && got < total {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rebuild never started moving bytes: {got}/{total}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    target.kill();

    let err = tokio::time::timeout(std::time::Duration::from_secs(15), call)
        .await
        .expect("ReplicaAdd returns once its target is gone")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().starts_with("failed to sync files ["),
        "{err:?}"
    );
    assert!(
        err.message().contains("rpc error: code = Unavailable"),
        "{err:?}"
    );
    // The engine's replica monitor notices the dead data connection and marks it ERR.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while mode_of(&mut p.client, &v, &url).await != Some(ReplicaMode::Err as i32) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "target still {:?}",
            mode_of(&mut p.client, &v, &url).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The volume still serves from its RW replicas, with their bytes intact.
    for r in &v.replicas {
        assert_eq!(
            mode_of(&mut p.client, &v, &r.url()).await,
            Some(ReplicaMode::Rw as i32)
        );
        assert_eq!(r.replica.read(0, block.len()), block);
    }
}

#[tokio::test]
async fn a_replica_in_err_is_left_out_of_reads_and_status_fan_outs() {
    let mut p = longhorn::start_proxy().await;
    let mut v = longhorn::volume("vol-e", 2).await;
    let m = Manager::V1_12_1;
    p.client
        .volume_snapshot(EngineVolumeSnapshotRequest {
            proxy_engine_request: v.per(m),
            snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                name: "before-err".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // The engine marks a replica ERR (as after a failed I/O); its process is then gone.
    let bad = v.replicas.remove(1);
    let bad_url = bad.url();
    p.client
        .replica_mode_update(EngineReplicaModeUpdateRequest {
            proxy_engine_request: v.per(m),
            replica_address: bad_url.clone(),
            mode: ReplicaMode::Err as i32,
        })
        .await
        .unwrap();
    drop(bad);
    assert_eq!(
        mode_of(&mut p.client, &v, &bad_url).await,
        Some(ReplicaMode::Err as i32)
    );
    // SnapshotList reads RW replicas only; purge and restore status skip ERR replicas.
    assert!(p
        .client
        .snapshot_list(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .disks
        .contains_key("before-err"));
    let purge = p
        .client
        .snapshot_purge_status(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(purge.keys().collect::<Vec<_>>(), vec![&v.replicas[0].url()]);
    let restore = p
        .client
        .backup_restore_status(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(!restore.contains_key(&bad_url));
    // Clone status asks every replica, so the dead one reports its error in its entry.
    let clone = p
        .client
        .snapshot_clone_status(v.req(m))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert!(!clone[&bad_url].error.is_empty());
    // A purge checks every replica: the dead one fails it, naming it.
    let err = p
        .client
        .snapshot_purge(EngineSnapshotPurgeRequest {
            proxy_engine_request: v.per(m),
            skip_if_in_progress: false,
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains(&format!(
            "failed to check if replica {bad_url} is rebuilding before purging"
        )),
        "{err:?}"
    );
}

#[tokio::test]
async fn frontend_writes_reach_every_replica_over_its_data_port() {
    let mut p = longhorn::start_proxy().await;
    let mut v = longhorn::volume("vol-w", 2).await;
    let m = Manager::V1_12_1;
    let frontend = sim::start_frontend(
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        &v.engine.engine,
    )
    .await
    .unwrap();
    let mut io = sim::dataconn::DataClient::connect(&frontend.addr.to_string())
        .await
        .unwrap();
    let err = io.write_at(0, &[1; 4096]).await.unwrap_err();
    assert!(err.to_string().contains("frontend is not up"), "{err}");
    p.client
        .volume_frontend_start(EngineVolumeFrontendStartRequest {
            proxy_engine_request: v.per(m),
            frontend_start: Some(ptypes::VolumeFrontendStartRequest {
                frontend: "tgt-blockdev".into(),
            }),
        })
        .await
        .unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8 + 1).collect();
    for i in 0..4 {
        io.write_at(i << 20, &block).await.unwrap();
    }
    assert_eq!(io.read_at(3 << 20, 1 << 20).await.unwrap(), block);
    for r in &v.replicas {
        assert_eq!(r.replica.read(2 << 20, 1 << 20), block);
        assert!(r.data.accepted() >= 1, "the engine dialled {}", r.data.addr);
    }
    let err = io.write_at(SIZE - 10, &[1; 4096]).await.unwrap_err();
    assert!(err.to_string().contains("outside the volume"), "{err}");
    io.ping().await.unwrap();
    // A replica whose data server dies is marked ERR; writes go on to the other one.
    let dead = v.replicas.pop().unwrap();
    let url = dead.url();
    drop(dead);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    io.write_at(0, &block[..4096]).await.unwrap();
    assert_eq!(
        mode_of(&mut p.client, &v, &url).await,
        Some(ReplicaMode::Err as i32)
    );
    assert_eq!(v.replicas[0].replica.read(0, 4096), block[..4096]);
}
