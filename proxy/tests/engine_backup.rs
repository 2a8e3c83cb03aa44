//! Backups and restores through the real lhnet-proxy against the simulated engine and
//! replicas: SnapshotBackup with every field a v1.12.1 manager sends (and a v1.3.3 manager's
//! against v1.3.3 processes), its status, BackupRestore as longhorn-engine's restore task does
//! it (fresh, then incremental DR restores; the guards), and S3.

use std::collections::HashMap;

use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes;
use lhnet_sim::backupstore::Target;
use tonic::transport::Channel;
use tonic::Code;

mod common;
use common::longhorn::{self, identity, replica_name, wait_for, Manager, Release, Volume, SIZE};
use common::moto;

/// What a v1.12.1 manager sends with a backup by default (`backup-compression-method`,
/// `backup-concurrent-limit`, the backup's mode and block size).
fn parameters() -> HashMap<String, String> {
    [
        ("backup-mode".to_string(), "incremental".to_string()),
        ("backup-block-size".to_string(), "2097152".to_string()),
    ]
    .into()
}

fn backup(
    v: &Volume,
    m: Manager,
    snapshot: &str,
    name: &str,
    target: &str,
) -> EngineSnapshotBackupRequest {
    let v12 = m == Manager::V1_12_1;
    EngineSnapshotBackupRequest {
        proxy_engine_request: v.per(m),
        backup_name: name.into(),
        snapshot_name: snapshot.into(),
        backup_target: target.into(),
        backing_image_name: String::new(),
        backing_image_checksum: String::new(),
        labels: [(
            "longhorn.io/volume-access-mode".to_string(),
            "rwo".to_string(),
        )]
        .into(),
        envs: vec![],
        compression_method: if v12 { "lz4".into() } else { String::new() },
        concurrent_limit: if v12 { 2 } else { 0 },
        storage_class_name: if v12 {
            "longhorn".into()
        } else {
            String::new()
        },
        parameters: if v12 { parameters() } else { HashMap::new() },
    }
}

fn status(
    v: &Volume,
    m: Manager,
    name: &str,
    replica: &str,
    replica_name: &str,
) -> EngineSnapshotBackupStatusRequest {
    EngineSnapshotBackupStatusRequest {
        proxy_engine_request: v.per(m),
        backup_name: name.into(),
        replica_address: replica.into(),
        replica_name: replica_name.into(),
    }
}

fn restore(
    v: &Volume,
    m: Manager,
    url: &str,
    target: &str,
    from: &str,
) -> EngineBackupRestoreRequest {
    EngineBackupRestoreRequest {
        proxy_engine_request: v.per(m),
        envs: vec![],
        url: url.into(),
        target: target.into(),
        volume_name: from.into(),
        concurrent_limit: if m == Manager::V1_12_1 { 2 } else { 0 },
        need_correct_encrypted_volume_size: false,
    }
}

fn snap(v: &Volume, m: Manager, name: &str) -> EngineVolumeSnapshotRequest {
    EngineVolumeSnapshotRequest {
        proxy_engine_request: v.per(m),
        snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
            name: name.into(),
            ..Default::default()
        }),
    }
}

async fn backup_done(
    client: &ProxyEngineServiceClient<Channel>,
    r: EngineSnapshotBackupStatusRequest,
) -> EngineSnapshotBackupStatusProxyResponse {
    wait_for(30, "the backup completes", || {
        let mut c = client.clone();
        let r = r.clone();
        async move {
            c.snapshot_backup_status(r)
                .await
                .is_ok_and(|s| s.into_inner().state == "complete")
        }
    })
    .await;
    client
        .clone()
        .snapshot_backup_status(r)
        .await
        .unwrap()
        .into_inner()
}

async fn restored(
    client: &ProxyEngineServiceClient<Channel>,
    v: &Volume,
    m: Manager,
    backup: &str,
) {
    let n = v.replicas.len();
    wait_for(30, "the restore completes", || {
        let mut c = client.clone();
        let r = v.req(m);
        let backup = backup.to_string();
        async move {
            let st = c
                .backup_restore_status(r)
                .await
                .unwrap()
                .into_inner()
                .status;
            st.len() == n
                && st
                    .values()
                    .all(|s| !s.is_restoring && s.state == "complete" && s.last_restored == backup)
        }
    })
    .await;
}

async fn backup_and_restore(m: Manager) {
    let release = match m {
        Manager::V1_12_1 => Release::V1_12_1,
        Manager::V1_3_3 => Release::V1_3_3,
    };
    let mut p = longhorn::start_proxy().await;
    let v = longhorn::volume_of(release, "vol-b", 2, SIZE).await;
    let dir = longhorn::scratch(&format!("backup-{m:?}"));
    let target = format!("vfs://{}", dir.display());
    let data: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 97) as u8 + 1).collect();
    v.write(0, &data);
    p.client.volume_snapshot(snap(&v, m, "bk1")).await.unwrap();
    v.record();

    // Unknown env keys are refused before anything happens, in Longhorn's words, and never
    // reach the environment.
    let mut bad = backup(&v, m, "bk1", "b0", &target);
    bad.envs = vec!["LD_PRELOAD=/tmp/evil.so".into()];
    let err = p.client.snapshot_backup(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(
        err.message()
            .starts_with("failed to set envs: env key \"LD_PRELOAD\" is not permitted"),
        "{err:?}"
    );
    assert!(std::env::var_os("LD_PRELOAD").is_none());
    let err = p
        .client
        .snapshot_backup(backup(&v, m, "volume-head", "b0", &target))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::Internal,
            "failed to create backup: cannot backup the head disk in the chain"
        )
    );

    let request = backup(&v, m, "bk1", "backup-one", &target);
    let reply = p
        .client
        .snapshot_backup(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            reply.backup_id.as_str(),
            reply.replica.as_str(),
            reply.is_incremental
        ),
        ("backup-one", v.replicas[0].url().as_str(), false)
    );
    // Every field reached the replica's sync agent.
    let created = v.replicas[0]
        .record()
        .of::<ptypes::BackupCreateRequest>("BackupCreate");
    assert_eq!(created.len(), 1);
    let (call, got) = &created[0];
    assert_eq!(
        (
            got.snapshot_file_name.as_str(),
            got.backup_target.as_str(),
            got.volume_name.as_str(),
            got.backup_name.as_str(),
            got.compression_method.as_str(),
            got.concurrent_limit,
            got.storage_class_name.as_str(),
        ),
        (
            "bk1",
            target.as_str(),
            "vol-b",
            "backup-one",
            request.compression_method.as_str(),
            request.concurrent_limit,
            request.storage_class_name.as_str()
        )
    );
    assert_eq!(got.parameters, request.parameters);
    assert_eq!(
        got.labels,
        vec!["longhorn.io/volume-access-mode=rwo".to_string()]
    );
    assert_eq!(
        identity(call),
        ((m == Manager::V1_12_1).then_some("vol-b"), None)
    );

    v.assert_engine_calls_named(m, "SnapshotBackup");

    let rname = replica_name("vol-b", 0);
    let done = backup_done(&p.client, status(&v, m, "backup-one", "", "")).await;
    assert_eq!(
        done.backup_url,
        format!("{target}?backup=backup-one&volume=vol-b")
    );
    assert_eq!((done.progress, done.snapshot_name.as_str()), (100, "bk1"));
    assert_eq!(done.replica_address, v.replicas[0].url());
    // Named: the status call to that replica carries its name.
    v.replicas[0].record().start();
    let named = p
        .client
        .snapshot_backup_status(status(
            &v,
            m,
            "backup-one",
            &v.replicas[0].url(),
            if m == Manager::V1_12_1 { &rname } else { "" },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(named.state, "complete");
    let asked = v.replicas[0]
        .record()
        .of::<ptypes::BackupStatusRequest>("BackupStatus");
    assert_eq!(
        asked.last().unwrap().0.instance_name.as_deref(),
        Some(rname.as_str()).filter(|_| m == Manager::V1_12_1)
    );
    // A backup the replica does not know: OK, with the error in the reply, as Longhorn answers.
    let unknown = p
        .client
        .snapshot_backup_status(status(&v, m, "backup-nope", "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        unknown.error,
        format!(
            "Failed to get backup status on {} for backup-nope: rpc error: code = Unknown desc = backup not found backup-nope",
            v.replicas[0].url()
        )
    );
    assert_eq!(
        (unknown.state.as_str(), unknown.replica_address.as_str()),
        ("", v.replicas[0].url().as_str())
    );

    // Longhorn's layout and JSON, with the compression asked for recorded.
    let store = Target::parse(&target).unwrap();
    let volume_cfg = store.load_volume("vol-b").unwrap();
    let backup_cfg = store.load_backup("vol-b", "backup-one").unwrap();
    assert_eq!(backup_cfg.compression_method, "lz4");
    assert_eq!(volume_cfg.compression_method, "\"lz4\"");
    assert_eq!(volume_cfg.last_backup_name, "backup-one");
    if m == Manager::V1_12_1 {
        assert_eq!(volume_cfg.storage_class_name, "\"longhorn\"");
        assert_eq!(
            backup_cfg
                .parameters
                .unwrap()
                .get("backup-block-size")
                .map(String::as_str),
            Some("2097152")
        );
    }

    // Restore into a fresh volume: the restore task names a new snapshot disk.
    let fresh = longhorn::volume_of(release, "vol-restored", 2, SIZE).await;
    fresh.record();
    let reply = p
        .client
        .backup_restore(restore(&fresh, m, &done.backup_url, &target, "vol-b"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply.task_error.is_empty(),
        "{}",
        String::from_utf8_lossy(&reply.task_error)
    );
    restored(&p.client, &fresh, m, "backup-one").await;
    fresh.assert_engine_calls_named(m, "BackupRestore");
    for r in &fresh.replicas {
        assert_eq!(r.replica.read(0, data.len()), data);
        let asked = r
            .record()
            .of::<ptypes::BackupRestoreRequest>("BackupRestore");
        assert_eq!(asked.len(), 1);
        let (call, req) = &asked[0];
        assert_eq!(req.backup, done.backup_url);
        assert_eq!(
            req.concurrent_limit,
            if m == Manager::V1_12_1 { 2 } else { 0 }
        );
        assert!(
            req.snapshot_disk_name.starts_with("volume-snap-")
                && req.snapshot_disk_name.ends_with(".img")
        );
        assert_eq!(
            identity(call).0,
            (m == Manager::V1_12_1).then_some("vol-restored")
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn backup_and_restore_of_a_v1_12_1_manager() {
    backup_and_restore(Manager::V1_12_1).await;
}

#[tokio::test]
async fn backup_and_restore_of_a_v1_3_3_manager_and_engine() {
    backup_and_restore(Manager::V1_3_3).await;
}

/// The DR volume: backup A restored, the source written on, backup B restored into the same
/// volume incrementally (into the snapshot the first restore made): both complete, and the
/// volume reads as the source did at B.
#[tokio::test]
async fn an_incremental_dr_restore_reuses_the_previous_restore_s_snapshot() {
    let mut p = longhorn::start_proxy().await;
    let m = Manager::V1_12_1;
    let source = longhorn::volume("vol-src", 2).await;
    let dir = longhorn::scratch("dr");
    let target = format!("vfs://{}", dir.display());
    let mut data: Vec<u8> = (0..8 << 20).map(|i| (i % 13) as u8 + 1).collect();
    source.write(0, &data);
    p.client
        .volume_snapshot(snap(&source, m, "a"))
        .await
        .unwrap();
    p.client
        .snapshot_backup(backup(&source, m, "a", "backup-a", &target))
        .await
        .unwrap();
    let a = backup_done(&p.client, status(&source, m, "backup-a", "", "")).await;

    let dr = longhorn::volume("vol-dr", 2).await;
    dr.record();
    let reply = p
        .client
        .backup_restore(restore(&dr, m, &a.backup_url, &target, "vol-src"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply.task_error.is_empty(),
        "{}",
        String::from_utf8_lossy(&reply.task_error)
    );
    restored(&p.client, &dr, m, "backup-a").await;
    let first_disk = dr.replicas[0]
        .record()
        .of::<ptypes::BackupRestoreRequest>("BackupRestore")[0]
        .1
        .snapshot_disk_name
        .clone();

    // The source changes: one block rewritten, one added, one cleared.
    data[(2 << 20) + 7] = 200;
    data.splice(6 << 20..(6 << 20) + 4096, std::iter::repeat_n(0u8, 4096));
    source.write(0, &data);
    source.write(10 << 20, &[42u8; 4096]);
    p.client
        .volume_snapshot(snap(&source, m, "b"))
        .await
        .unwrap();
    p.client
        .snapshot_backup(backup(&source, m, "b", "backup-b", &target))
        .await
        .unwrap();
    let b = backup_done(&p.client, status(&source, m, "backup-b", "", "")).await;

    let reply = p
        .client
        .backup_restore(restore(&dr, m, &b.backup_url, &target, "vol-src"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply.task_error.is_empty(),
        "{}",
        String::from_utf8_lossy(&reply.task_error)
    );
    restored(&p.client, &dr, m, "backup-b").await;
    let second_disk = dr.replicas[0]
        .record()
        .of::<ptypes::BackupRestoreRequest>("BackupRestore")[1]
        .1
        .snapshot_disk_name
        .clone();
    assert_eq!(
        second_disk, first_disk,
        "the incremental restore writes into the first restore's snapshot"
    );
    let want = source.replicas[0].replica.read(0, 12 << 20);
    for r in &dr.replicas {
        assert_eq!(r.replica.read(0, 12 << 20), want, "{}", r.url());
        assert_eq!(r.replica.snapshots(), vec![first_disk.clone()]);
    }
    // The same backup again: each replica says it has it (managers ignore this text).
    let reply = p
        .client
        .backup_restore(restore(&dr, m, &b.backup_url, &target, "vol-src"))
        .await
        .unwrap()
        .into_inner();
    let body: serde_json::Value = serde_json::from_slice(&reply.task_error).unwrap();
    let errors = body["ReplicaErrors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{body}");
    assert!(
        errors.iter().all(|e| e["Message"]
            .as_str()
            .unwrap()
            .contains("already restored backup backup-b")),
        "{body}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn restore_guards_refuse_before_any_replica_starts() {
    let mut p = longhorn::start_proxy().await;
    let m = Manager::V1_12_1;
    let source = longhorn::volume("vol-g", 1).await;
    let dir = longhorn::scratch("guards");
    let target = format!("vfs://{}", dir.display());
    source.write(0, &[1u8; 4096]);
    p.client
        .volume_snapshot(snap(&source, m, "g"))
        .await
        .unwrap();
    p.client
        .snapshot_backup(backup(&source, m, "g", "backup-g", &target))
        .await
        .unwrap();
    let g = backup_done(&p.client, status(&source, m, "backup-g", "", "")).await;
    let text =
        |reply: EngineBackupRestoreProxyResponse| String::from_utf8(reply.task_error).unwrap();

    // A backup that is not there: every replica's entry says so, as longhorn-engine's task
    // answers (InspectBackup fails after the volume checks); nothing started.
    let fresh = longhorn::volume("vol-fresh", 2).await;
    fresh.record();
    let missing = format!("{target}?backup=backup-gone&volume=vol-g");
    let body = text(
        p.client
            .backup_restore(restore(&fresh, m, &missing, &target, "vol-g"))
            .await
            .unwrap()
            .into_inner(),
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let errors = json["ReplicaErrors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{body}");
    for e in errors {
        assert!(
            e["Message"]
                .as_str()
                .unwrap()
                .starts_with("failed to get the current restoring backup info: "),
            "{body}"
        );
        assert!(
            e["Message"].as_str().unwrap().contains("cannot find"),
            "{body}"
        );
    }
    // A backup of another size: plain text.
    let small = longhorn::volume_sized("vol-small", 2, SIZE / 2).await;
    small.record();
    let body = text(
        p.client
            .backup_restore(restore(&small, m, &g.backup_url, &target, "vol-g"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        body,
        format!("BUG: The backup volume vol-g size {SIZE} cannot be larger than normal restore volume vol-small size {}", SIZE / 2)
    );
    // Snapshots beyond a restore's one: a purge starts and the manager is told to come back.
    let busy = longhorn::volume("vol-busy", 2).await;
    for name in ["u1", "u2"] {
        p.client
            .volume_snapshot(snap(&busy, m, name))
            .await
            .unwrap();
    }
    busy.record();
    let body = text(
        p.client
            .backup_restore(restore(&busy, m, &g.backup_url, &target, "vol-g"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(body, "found more than 1 snapshot in the replicas, hence started to purge snapshots before the restore");
    assert!(
        !busy.replicas[0]
            .record()
            .of::<()>("SnapshotPurge")
            .is_empty(),
        "the purge was started"
    );
    // A frontend that is up.
    let up = longhorn::volume("vol-up", 1).await;
    p.client
        .volume_frontend_start(EngineVolumeFrontendStartRequest {
            proxy_engine_request: up.per(m),
            frontend_start: Some(ptypes::VolumeFrontendStartRequest {
                frontend: "tgt-blockdev".into(),
            }),
        })
        .await
        .unwrap();
    up.record();
    let body = text(
        p.client
            .backup_restore(restore(&up, m, &g.backup_url, &target, "vol-g"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(body, "volume frontend enabled, cannot perform restore");
    // None of them started a restore on any replica.
    for v in [&fresh, &small, &busy, &up] {
        for r in &v.replicas {
            assert!(
                r.record()
                    .of::<ptypes::BackupRestoreRequest>("BackupRestore")
                    .is_empty(),
                "{}",
                v.name
            );
        }
    }
    // Bad credentials are RPC errors, as Longhorn's.
    let mut creds = restore(&fresh, m, &g.backup_url, "s3://b@us-east-1/", "vol-g");
    creds.envs = vec!["AWS_ACCESS_KEY_ID=only-the-id".into()];
    let err = p.client.backup_restore(creds).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "failed to get backup credential: s3 credential secret access key not found"
        )
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// 64 MiB of data with what a v1.12.1 manager sends: the backup and the restore complete with
/// 2 workers, the cfgs record lz4; with `concurrent_limit` 0 a v1.12.1 replica starts no worker
/// and the backup never moves (what dropping the field did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_backup_and_restore_with_a_v1_12_1_manager_s_settings() {
    let mut p = longhorn::start_proxy().await;
    let m = Manager::V1_12_1;
    let v = longhorn::volume_sized("vol-big", 2, 128 << 20).await;
    let dir = longhorn::scratch("big");
    let target = format!("vfs://{}", dir.display());
    // Bytes that do not repeat (xorshift), so no two 2 MiB blocks are the same.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..(64 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x | 0x0101_0101_0101_0101).to_le_bytes()
        })
        .collect();
    v.write(0, &data);
    p.client.volume_snapshot(snap(&v, m, "big")).await.unwrap();

    let mut stalled = backup(&v, m, "big", "backup-zero", &target);
    stalled.concurrent_limit = 0;
    p.client.snapshot_backup(stalled).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let zero = p
        .client
        .snapshot_backup_status(status(&v, m, "backup-zero", "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((zero.state.as_str(), zero.progress), ("in_progress", 0));

    let started = tokio::time::Instant::now();
    p.client
        .snapshot_backup(backup(&v, m, "big", "backup-big", &target))
        .await
        .unwrap();
    let done = backup_done(&p.client, status(&v, m, "backup-big", "", "")).await;
    let store = Target::parse(&target).unwrap();
    let cfg = store.load_backup("vol-big", "backup-big").unwrap();
    assert_eq!(
        (cfg.compression_method.as_str(), cfg.blocks.len()),
        ("lz4", 32)
    );
    assert_eq!(cfg.newly_uploaded_data_size, (64i64 << 20).to_string());
    eprintln!("64 MiB backup: {:.1} s", started.elapsed().as_secs_f64());

    let fresh = longhorn::volume_sized("vol-big-restored", 1, 128 << 20).await;
    let reply = p
        .client
        .backup_restore(restore(&fresh, m, &done.backup_url, &target, "vol-big"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply.task_error.is_empty(),
        "{}",
        String::from_utf8_lossy(&reply.task_error)
    );
    restored(&p.client, &fresh, m, "backup-big").await;
    assert!(
        fresh.replicas[0].replica.read(0, data.len()) == data,
        "restored bytes differ"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_to_s3_lists_through_the_backup_target_calls_and_restores() {
    let Some(moto) = moto::start_moto("longhorn") else {
        return;
    };
    let mut p = longhorn::start_proxy().await;
    let m = Manager::V1_12_1;
    let v = longhorn::volume("vol-s3", 2).await;
    let target = "s3://longhorn@us-east-1/cluster-a".to_string();
    let envs = moto::s3_envs(&moto.endpoint);
    let data: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    v.write(0, &data);
    p.client
        .volume_snapshot(snap(&v, m, "s3snap"))
        .await
        .unwrap();
    v.record();
    let mut request = backup(&v, m, "s3snap", "backup-s3", &target);
    request.envs = envs.clone();
    p.client.snapshot_backup(request).await.unwrap();
    // The replica got the S3 credential map, every key of the scheme present.
    let created = v.replicas[0]
        .record()
        .of::<ptypes::BackupCreateRequest>("BackupCreate");
    let credential = &created[0].1.credential;
    assert_eq!(credential["AWS_ENDPOINTS"], moto.endpoint);
    assert_eq!(credential.len(), 8, "{credential:?}");
    let done = backup_done(&p.client, status(&v, m, "backup-s3", "", "")).await;

    // The sidecar's backup-target calls see it, without an engine.
    let mut c = p.client.clone();
    let list = c
        .backup_volume_list(EngineBackupVolumeListRequest {
            envs: envs.clone(),
            dest_url: target.clone(),
            volume_name: String::new(),
            volume_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.volumes["vol-s3"].backups.contains_key("backup-s3"),
        "{list:?}"
    );
    let got = c
        .backup_get(EngineBackupGetRequest {
            proxy_engine_request: None,
            envs: envs.clone(),
            dest_url: done.backup_url.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .backup
        .unwrap();
    assert_eq!(
        (got.snapshot_name.as_str(), got.size),
        ("s3snap", 3 * 2 * 1024 * 1024)
    );

    // Restored from S3 into a fresh volume, byte for byte.
    let fresh = longhorn::volume("vol-from-s3", 1).await;
    let mut r = restore(&fresh, m, &done.backup_url, &target, "vol-s3");
    r.envs = envs.clone();
    let reply = c.backup_restore(r).await.unwrap().into_inner();
    assert!(
        reply.task_error.is_empty(),
        "{}",
        String::from_utf8_lossy(&reply.task_error)
    );
    restored(&p.client, &fresh, m, "backup-s3").await;
    assert_eq!(fresh.replicas[0].replica.read(0, data.len()), data);

    // Removed through the sidecar: gone from the bucket as boto3 sees it.
    c.backup_remove(EngineBackupRemoveRequest {
        envs: envs.clone(),
        dest_url: target.clone(),
        volume_name: "vol-s3".into(),
    })
    .await
    .unwrap();
    let (keys, _) = moto::boto3_look(&moto.endpoint, "longhorn", "cluster-a/", "");
    assert!(keys.is_empty(), "left in the bucket: {keys:?}");
}

/// Bytes no compression shrinks (xorshift), so the bytes a transfer moves are at least these.
fn incompressible(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_back_up_and_restore_through_the_backup_egress_listener() {
    let Some(moto) = moto::start_moto("egress") else {
        return;
    };
    // The engine proxy route hands replicas the egress listener as their proxy.
    let yaml = longhorn::config(None).replace(
        "clusters:\n",
        "        backup_egress: egress\n  - name: egress\n    kind: http_connect\n    address: 127.0.0.1:0\nclusters:\n",
    );
    let mut p = longhorn::start_proxy_from(&yaml).await;
    let egress = format!("http://{}", p.proxy.listener_addr("egress").unwrap());
    let m = Manager::V1_12_1;
    let v = longhorn::volume("vol-egress", 1).await;
    let target = "s3://egress@us-east-1/through".to_string();
    let envs = moto::s3_envs(&moto.endpoint);
    let data = incompressible(3 << 20);
    v.write(0, &data);
    p.client
        .volume_snapshot(snap(&v, m, "esnap"))
        .await
        .unwrap();
    v.record();
    let mut request = backup(&v, m, "esnap", "backup-egress", &target);
    request.envs = envs.clone();
    p.client.snapshot_backup(request).await.unwrap();
    let created = v.replicas[0]
        .record()
        .of::<ptypes::BackupCreateRequest>("BackupCreate");
    let credential = &created[0].1.credential;
    assert_eq!(
        (
            credential["HTTPS_PROXY"].as_str(),
            credential["HTTP_PROXY"].as_str()
        ),
        (egress.as_str(), egress.as_str())
    );
    let done = backup_done(&p.client, status(&v, m, "backup-egress", "", "")).await;
    let target_label = moto.endpoint.trim_start_matches("http://").to_string();
    let counted = |p: &longhorn::Proxy, what: &str| {
        common::metric(
            &p.proxy.metrics().render(),
            &format!(
                "lhnet_backup_egress_{what}_bytes_total{{listener=\"egress\",target=\"{target_label}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    let sent = counted(&p, "transmit");
    assert!(
        sent >= data.len() as f64,
        "the upload went through the egress listener: {sent} bytes of {}",
        data.len()
    );

    // The restore downloads through it too.
    let fresh = longhorn::volume("vol-egress-2", 1).await;
    let mut r = restore(&fresh, m, &done.backup_url, &target, "vol-egress");
    r.envs = envs.clone();
    let reply = p.client.backup_restore(r).await.unwrap().into_inner();
    assert!(
        reply.task_error.is_empty(),
        "{}",
        String::from_utf8_lossy(&reply.task_error)
    );
    restored(&p.client, &fresh, m, "backup-egress").await;
    assert_eq!(fresh.replicas[0].replica.read(0, data.len()), data);
    let received = counted(&p, "receive");
    assert!(
        received >= data.len() as f64,
        "the download went through the egress listener: {received} bytes"
    );

    // A caller's own proxy is kept.
    let mut own = backup(&v, m, "esnap", "backup-own-proxy", &target);
    own.envs = moto::s3_envs(&moto.endpoint)
        .into_iter()
        .map(|e| {
            if e == "HTTPS_PROXY=" {
                "HTTPS_PROXY=http://proxy.corp.example:3128".to_string()
            } else {
                e
            }
        })
        .collect();
    v.record();
    p.client.snapshot_backup(own).await.unwrap();
    let created = v.replicas[0]
        .record()
        .of::<ptypes::BackupCreateRequest>("BackupCreate");
    let credential = &created[0].1.credential;
    assert_eq!(
        (
            credential["HTTPS_PROXY"].as_str(),
            credential["HTTP_PROXY"].as_str()
        ),
        ("http://proxy.corp.example:3128", "")
    );
}
