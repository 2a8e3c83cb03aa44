//! The original design's backup-target RPCs through lhnet-proxy, over a backupstore tree
//! written by the simulator's backup code and over hand-written cfgs with Longhorn's JSON
//! quirks (`spec/longhorn-backupstore-bim.md` §2).
// Its synchronous helpers (threads, Drop, the wait before the runtime starts) sleep with std.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::*;
use lhnet_proxy::app::RunningProxy;
use lhnet_sim::backupstore::{self, NewBackup, Target, BLOCK_SIZE};
use tonic::transport::Channel;
use tonic::Code;

mod common;
use common::azurite::{azblob_envs, azure_look, start_azurite};
use common::moto::{boto3_look, s3_envs, start_moto};

use common::backup_proxy as start_proxy_with;

async fn start_proxy() -> (RunningProxy, ProxyEngineServiceClient<Channel>) {
    start_proxy_with("").await
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lhnet-bt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a backup of `data` as the simulator's SnapshotBackup does.
fn backup(t: &Target, volume: &str, name: &str, at: &str, data: &[u8]) {
    let snapshot = format!("snap-{name}");
    t.write_backup(
        &NewBackup {
            volume,
            backup: name,
            snapshot: &snapshot,
            snapshot_created_at: at,
            now: at,
            size: data.len() as i64,
            labels: BTreeMap::from([("app".to_string(), "db".to_string())]),
            compression_method: "gzip",
            concurrent_limit: 2,
            data,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
}

/// vol1: backup-a and backup-b (3 blocks, 2 shared), vol2: backup-c (1 block). Returns the
/// volume as backup-b holds it.
fn three_backups(t: &Target) -> Vec<u8> {
    let mut data = vec![0u8; 3 * BLOCK_SIZE];
    data[7] = 1;
    data[BLOCK_SIZE + 9] = 2;
    backup(t, "vol1", "backup-a", "2022-06-01T00:00:00Z", &data);
    data[2 * BLOCK_SIZE + 1] = 3;
    backup(t, "vol1", "backup-b", "2022-06-01T01:00:00Z", &data);
    backup(
        t,
        "vol2",
        "backup-c",
        "2022-06-01T02:00:00Z",
        &data[..BLOCK_SIZE],
    );
    data
}

fn list_req(target: &str, volume: &str, volume_only: bool) -> EngineBackupVolumeListRequest {
    EngineBackupVolumeListRequest {
        envs: vec![],
        dest_url: target.into(),
        volume_name: volume.into(),
        volume_only,
    }
}

fn volume_get(target: &str, volume: &str) -> EngineBackupVolumeGetRequest {
    EngineBackupVolumeGetRequest {
        proxy_engine_request: None,
        envs: vec![],
        dest_url: format!("{target}?volume={volume}"),
    }
}

fn backup_get(target: &str, backup: &str, volume: &str) -> EngineBackupGetRequest {
    EngineBackupGetRequest {
        proxy_engine_request: None,
        envs: vec![],
        dest_url: backupstore::encode_backup_url(target, backup, volume),
    }
}

fn remove_backup(target: &str, backup: &str, volume: &str) -> EngineBackupRemoveRequest {
    EngineBackupRemoveRequest {
        envs: vec![],
        dest_url: backupstore::encode_backup_url(target, backup, volume),
        volume_name: String::new(),
    }
}

fn blocks_of(dir: &Path) -> usize {
    walk(dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "blk"))
        .count()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn list_inspect_metadata_and_remove_over_the_simulators_backups() {
    let (_proxy, mut c) = start_proxy().await;
    let dir = scratch("sim");
    let url = format!("vfs://{}", dir.display());
    let t = Target::parse(&url).unwrap();
    let data = three_backups(&t);

    let all = c
        .backup_volume_list(list_req(&url, "", false))
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<_> = all.volumes.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["vol1", "vol2"]);
    let mut backups: Vec<_> = all.volumes["vol1"].backups.keys().cloned().collect();
    backups.sort();
    assert_eq!(backups, ["backup-a", "backup-b"]);
    // As Longhorn: list entries carry only names.
    assert_eq!(all.volumes["vol1"].name, "");
    assert_eq!(
        all.volumes["vol1"].backups["backup-a"],
        EngineBackupInfo::default()
    );
    let only = c
        .backup_volume_list(list_req(&url, "", true))
        .await
        .unwrap()
        .into_inner();
    assert!(only.volumes["vol1"].backups.is_empty());
    let one = c
        .backup_volume_list(list_req(&url, "vol2", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.volumes.keys().collect::<Vec<_>>(), ["vol2"]);

    let vol = c
        .backup_volume_get(volume_get(&url, "vol1"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (
            vol.name.as_str(),
            vol.last_backup_name.as_str(),
            vol.data_stored,
            vol.size
        ),
        ("vol1", "backup-b", 3 * BLOCK_SIZE as i64, data.len() as i64)
    );
    assert_eq!(vol.backing_image_name, "", "double-quoted \"\" decoded");

    let get = |backup: &str, volume: &str| backup_get(&url, backup, volume);
    let b = c
        .backup_get(get("backup-b", "vol1"))
        .await
        .unwrap()
        .into_inner()
        .backup
        .unwrap();
    assert_eq!(
        (
            b.name.as_str(),
            b.snapshot_name.as_str(),
            b.is_incremental,
            b.volume_name.as_str()
        ),
        ("backup-b", "snap-backup-b", true, "vol1")
    );
    assert_eq!(b.url, format!("{url}?backup=backup-b&volume=vol1"));
    assert_eq!(b.labels["app"], "db");
    let missing = c.backup_get(get("backup-x", "vol1")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unknown);
    assert!(missing.message().contains("cannot find"), "{missing:?}");

    let meta = c
        .backup_config_meta_get(EngineBackupConfigMetaGetRequest {
            proxy_engine_request: None,
            envs: vec![],
            dest_url: backupstore::encode_backup_url(&url, "backup-a", "vol1"),
        })
        .await
        .unwrap()
        .into_inner()
        .modification_time
        .unwrap();
    let file = t.volume_dir("vol1").join("backups/backup_backup-a.cfg");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let since = mtime.duration_since(std::time::UNIX_EPOCH).unwrap();
    assert_eq!(
        (meta.seconds, meta.nanos),
        (since.as_secs() as i64, since.subsec_nanos() as i32)
    );

    // Remove backup-a: backup-b's blocks all stay and it reads back whole.
    c.backup_remove(remove_backup(&url, "backup-a", "vol1"))
        .await
        .unwrap();
    let (_, back) = t.read_backup("vol1", "backup-b").unwrap();
    assert_eq!(&back[..data.len()], &data[..]);
    assert_eq!(t.load_volume("vol1").unwrap().block_count, "3");
    // Removing the last backup keeps volume.cfg with no last backup and no blocks.
    c.backup_remove(remove_backup(&url, "backup-b", "vol1"))
        .await
        .unwrap();
    let cfg = t.load_volume("vol1").unwrap();
    assert_eq!(
        (cfg.last_backup_name.as_str(), cfg.block_count.as_str()),
        ("", "0")
    );
    assert_eq!(blocks_of(&t.volume_dir("vol1")), 0);
    // The whole volume.
    c.backup_remove(EngineBackupRemoveRequest {
        envs: vec![],
        dest_url: url.clone(),
        volume_name: "vol2".into(),
    })
    .await
    .unwrap();
    let all = c
        .backup_volume_list(list_req(&url, "", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.volumes.keys().collect::<Vec<_>>(), ["vol1"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn longhorns_json_quirks_in_progress_and_corrupt_cfgs() {
    let (_proxy, mut c) = start_proxy().await;
    let dir = scratch("quirks");
    let url = format!("vfs://{}", dir.display());
    let t = Target::parse(&url).unwrap();
    let write = |volume: &str, rel: &str, text: &str| {
        let p = t.volume_dir(volume).join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    // As the Go library writes them: string sizes, double-quoted backing image, no newline.
    write(
        "vol-q",
        "volume.cfg",
        r#"{"Name":"vol-q","Size":"6291456","Labels":{"tier":"gold"},"CreatedTime":"2022-06-01T00:00:00Z","LastBackupName":"backup-done","LastBackupAt":"2022-06-01T02:00:00Z","BlockCount":"3","BackingImageName":"\"bi1\"","BackingImageChecksum":"\"abc\""}"#,
    );
    write(
        "vol-q",
        "backups/backup_backup-done.cfg",
        r#"{"Name":"backup-done","VolumeName":"vol-q","SnapshotName":"snap2","SnapshotCreatedAt":"2022-06-01T02:00:00Z","CreatedTime":"2022-06-01T02:00:05Z","Size":"6291456","Labels":null,"IsIncremental":true,"SingleFile":{"FilePath":""}}"#,
    );
    write(
        "vol-q",
        "backups/backup_backup-wip.cfg",
        r#"{"Name":"backup-wip","VolumeName":"vol-q","SnapshotName":"","SnapshotCreatedAt":"","CreatedTime":"","Size":"0","Labels":null,"IsIncremental":false,"SingleFile":{"FilePath":""}}"#,
    );
    write(
        "vol-bad",
        "volume.cfg",
        "{\"Name\": \"vol-bad\", \"Size\": 12",
    );

    let vol = c
        .backup_volume_get(volume_get(&url, "vol-q"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.size, 6291456);
    assert_eq!(vol.data_stored, 3 * BLOCK_SIZE as i64);
    assert_eq!(
        (
            vol.backing_image_name.as_str(),
            vol.backing_image_checksum.as_str()
        ),
        ("bi1", "abc")
    );
    assert_eq!(vol.labels["tier"], "gold");

    let b = c
        .backup_get(backup_get(&url, "backup-done", "vol-q"))
        .await
        .unwrap()
        .into_inner()
        .backup
        .unwrap();
    assert_eq!(
        (b.size, b.volume_backing_image_name.as_str()),
        (6291456, "bi1")
    );
    let wip = c
        .backup_get(backup_get(&url, "backup-wip", "vol-q"))
        .await
        .unwrap_err();
    assert!(
        wip.message()
            .contains("backup backup-wip is still in progress"),
        "{wip:?}"
    );

    // A corrupt volume.cfg: named in that volume's messages; the others still listed.
    let all = c
        .backup_volume_list(list_req(&url, "", false))
        .await
        .unwrap()
        .into_inner();
    let bad = &all.volumes["vol-bad"].messages["error"];
    assert!(
        bad.contains("vol-bad/volume.cfg") && bad.contains("not a valid cfg"),
        "{bad}"
    );
    assert_eq!(
        all.volumes["vol-q"].backups.len(),
        2,
        "in-progress backups are listed too"
    );
    let err = c
        .backup_volume_get(volume_get(&url, "vol-bad"))
        .await
        .unwrap_err();
    assert!(err.message().contains("vol-bad/volume.cfg"), "{err:?}");
    // A volume that is not there.
    let none = c
        .backup_volume_list(list_req(&url, "vol-none", false))
        .await
        .unwrap()
        .into_inner();
    assert!(none.volumes["vol-none"].messages["error"].contains("cannot find"));

    // Removing a completed backup while another is in progress: its cfg goes, blocks stay.
    let blk = t.volume_dir("vol-q").join("blocks/aa/bb/aabb.blk");
    std::fs::create_dir_all(blk.parent().unwrap()).unwrap();
    std::fs::write(&blk, b"x").unwrap();
    c.backup_remove(remove_backup(&url, "backup-done", "vol-q"))
        .await
        .unwrap();
    assert!(blk.exists(), "GC ran while a backup was in progress");

    // envs: unknown keys refused; an unknown scheme named.
    let err = c
        .backup_volume_list(EngineBackupVolumeListRequest {
            envs: vec!["LD_PRELOAD=/x".into()],
            ..list_req(&url, "", true)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .backup_volume_list(list_req("ftp://x/y", "", true))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("Driver ftp is not supported!"),
        "{err:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_removes_of_backups_sharing_blocks_lose_no_shared_block() {
    let (_proxy, c) = start_proxy().await;
    let dir = scratch("race");
    let url = format!("vfs://{}", dir.display());
    let t = Target::parse(&url).unwrap();
    let mut data = vec![0u8; 4 * BLOCK_SIZE];
    for (i, name) in ["backup-1", "backup-2", "backup-3"].iter().enumerate() {
        data[i * BLOCK_SIZE + 3] = i as u8 + 1; // each adds one block; all share the first ones
        data[3 * BLOCK_SIZE] = 9;
        backup(&t, "vol1", name, &format!("2022-06-01T0{i}:00:00Z"), &data);
    }
    let remove = |name: &'static str| {
        let mut c = c.clone();
        let url = url.clone();
        tokio::spawn(async move { c.backup_remove(remove_backup(&url, name, "vol1")).await })
    };
    let (a, b) = tokio::join!(remove("backup-1"), remove("backup-2"));
    a.unwrap().unwrap();
    b.unwrap().unwrap();
    let (_, back) = t.read_backup("vol1", "backup-3").unwrap();
    assert_eq!(
        &back[..data.len()],
        &data[..],
        "a block of backup-3 was lost"
    );
    assert_eq!(t.load_volume("vol1").unwrap().block_count, "4");
    assert_eq!(blocks_of(&t.volume_dir("vol1")), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// (keys under a prefix, the text of one key) of a prefix and a key.
type Look = dyn Fn(&str, &str) -> (Vec<String>, String);

/// A real object-store server and how to look at it without lhnet.
struct RealServer {
    kind: &'static str,
    /// The target, its path `prefix/` in the bucket or container.
    url: String,
    prefix: &'static str,
    envs: Vec<String>,
    /// (keys under a prefix, the text of one key), read by the server's own client.
    look: Box<Look>,
    /// A target whose bucket or container is not there, and its name.
    missing: (String, &'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_target_on_a_real_s3_server() {
    let Some(moto) = start_moto("backupbucket") else {
        return;
    };
    let endpoint = moto.endpoint.clone();
    object_target_on_a_real_server(RealServer {
        kind: "s3",
        url: "s3://backupbucket@us-east-1/s3-test".into(),
        prefix: "s3-test/",
        envs: s3_envs(&moto.endpoint),
        look: Box::new(move |prefix, key| boto3_look(&endpoint, "backupbucket", prefix, key)),
        missing: ("s3://nobucket@us-east-1/x".into(), "nobucket"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azblob_target_on_a_real_azure_blob_server() {
    let Some(azurite) = start_azurite("backups") else {
        return;
    };
    let endpoint = azurite.endpoint.clone();
    object_target_on_a_real_server(RealServer {
        kind: "azblob",
        url: "azblob://backups@core.windows.net/az-test".into(),
        prefix: "az-test/",
        envs: azblob_envs(&azurite.endpoint),
        look: Box::new(move |prefix, key| azure_look(&endpoint, "backups", prefix, key)),
        missing: (
            "azblob://nocontainer@core.windows.net/x".into(),
            "nocontainer",
        ),
    })
    .await;
}

/// Backups written through the driver, then listed, inspected, their config times read and
/// removed through lhnet's backup-target calls, each step checked with the server's own
/// client.
async fn object_target_on_a_real_server(server: RealServer) {
    // The server listens on loopback, which lhnet refuses unless the config lists it.
    let (_proxy, mut c) =
        start_proxy_with("backup_target: { allowed_endpoints: [127.0.0.1] }\n").await;
    let url = server.url.as_str();
    let opened = server.url.clone();
    let envs = server.envs.clone();
    let look = &server.look;
    let options = backupstore::TargetOptions {
        credentials: lhnet_proxy::engine_proxy::target_credentials(&envs).unwrap(),
        endpoints: std::sync::Arc::new(backupstore::EndpointPolicy::unrestricted()),
        ..Default::default()
    };
    let kind = server.kind;

    // Backups written through the driver, as the simulator writes them to a directory.
    let (t, expected) = tokio::task::spawn_blocking(move || {
        let t = Target::open(&opened, &options).unwrap();
        assert_eq!(t.kind(), kind);
        let expected = three_backups(&t);
        (t, expected)
    })
    .await
    .unwrap();

    // Longhorn's keys under the URL's path, cfgs byte for byte as Go writes them.
    let vol1_cfg = format!("{}backupstore/volumes/01/9c/vol1/volume.cfg", server.prefix);
    let (keys, cfg) = look(server.prefix, &vol1_cfg);
    assert_eq!(
        keys.iter().filter(|k| k.ends_with(".blk")).count(),
        3 + 1,
        "{keys:?}"
    );
    assert!(
        keys.iter().all(|k| !k.contains("/locks/")),
        "lock left behind: {keys:?}"
    );
    assert!(
        cfg.starts_with(r#"{"Name":"vol1","Size":"6291456","Labels":{"app":"db"},"#)
            && cfg.contains(r#""LastBackupName":"backup-b","#)
            && cfg.contains(r#""BlockCount":"3","BackingImageName":"\"\"""#),
        "{cfg}"
    );

    let with_envs = |mut r: EngineBackupVolumeListRequest| {
        r.envs = envs.clone();
        r
    };
    let all = c
        .backup_volume_list(with_envs(list_req(url, "", false)))
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<_> = all.volumes.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["vol1", "vol2"]);
    let mut backups: Vec<_> = all.volumes["vol1"].backups.keys().cloned().collect();
    backups.sort();
    assert_eq!(backups, ["backup-a", "backup-b"]);

    let vol = c
        .backup_volume_get(EngineBackupVolumeGetRequest {
            envs: envs.clone(),
            ..volume_get(url, "vol1")
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (vol.size, vol.data_stored, vol.last_backup_name.as_str()),
        (6291456, 3 * BLOCK_SIZE as i64, "backup-b")
    );
    let b = c
        .backup_get(EngineBackupGetRequest {
            envs: envs.clone(),
            ..backup_get(url, "backup-a", "vol1")
        })
        .await
        .unwrap()
        .into_inner()
        .backup
        .unwrap();
    assert_eq!(b.url, format!("{url}?backup=backup-a&volume=vol1"));
    assert_eq!((b.size, b.is_incremental), (2 * BLOCK_SIZE as i64, false));
    let meta = c
        .backup_config_meta_get(EngineBackupConfigMetaGetRequest {
            proxy_engine_request: None,
            envs: envs.clone(),
            dest_url: backupstore::encode_backup_url(url, "backup-b", "vol1"),
        })
        .await
        .unwrap()
        .into_inner()
        .modification_time
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - meta.seconds).abs() < 300, "{meta:?} vs {now}");
    let missing = c
        .backup_get(EngineBackupGetRequest {
            envs: envs.clone(),
            ..backup_get(url, "backup-zz", "vol1")
        })
        .await
        .unwrap_err();
    assert!(missing.message().contains("cannot find"), "{missing:?}");

    // Remove backup-a: its one block of its own goes, the two shared with backup-b stay.
    c.backup_remove(EngineBackupRemoveRequest {
        envs: envs.clone(),
        ..remove_backup(url, "backup-a", "vol1")
    })
    .await
    .unwrap();
    let (t, read) = tokio::task::spawn_blocking(move || {
        let read = t.read_backup("vol1", "backup-b").map(|(_, d)| d);
        (t, read)
    })
    .await
    .unwrap();
    assert_eq!(read.unwrap(), expected, "backup-b lost a shared block");
    let (_, cfg) = look(server.prefix, &vol1_cfg);
    assert!(cfg.contains(r#""BlockCount":"3""#), "{cfg}");
    let left = tokio::task::spawn_blocking(move || t.list(Some("vol1"), false))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(left["vol1"].backups, ["backup-b"]);

    // Remove the whole vol2; nothing of it is left in the bucket.
    c.backup_remove(EngineBackupRemoveRequest {
        envs: envs.clone(),
        dest_url: url.into(),
        volume_name: "vol2".into(),
    })
    .await
    .unwrap();
    let all = c
        .backup_volume_list(with_envs(list_req(url, "", true)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.volumes.keys().collect::<Vec<_>>(), ["vol1"]);
    let (keys, _) = look(server.prefix, "");
    assert!(keys.contains(&vol1_cfg), "{keys:?}");
    assert!(
        keys.iter().all(|k| !k.contains("/vol2/")),
        "vol2 left behind: {keys:?}"
    );

    // A bucket or container that is not there: a clear error naming it, code UNKNOWN like
    // grpc-go.
    let err = c
        .backup_volume_list(with_envs(list_req(&server.missing.0, "", true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(err.message().contains(server.missing.1), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_s3_target_times_out_without_holding_up_others() {
    // An "S3 server" that accepts and never answers.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", stall.local_addr().unwrap());
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        stall.set_nonblocking(true).unwrap();
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while tokio::time::Instant::now() < until && stopped.try_recv().is_err() {
            match stall.accept() {
                Ok((c, _)) => conns.push(c),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    });
    let (_proxy, c) = start_proxy_with(
        "backup_target: { timeout: 1500ms, max_concurrent: 2, allowed_endpoints: [127.0.0.1] }\n",
    )
    .await;
    let dir = scratch("stall");
    let vfs = format!("vfs://{}", dir.display());
    let t = Target::parse(&vfs).unwrap();
    backup(&t, "vol1", "backup-a", "2022-06-01T00:00:00Z", &[1u8; 16]);

    let started = tokio::time::Instant::now();
    let stalled: Vec<_> = (0..3)
        .map(|_| {
            let mut c = c.clone();
            let r = EngineBackupVolumeListRequest {
                envs: s3_envs(&endpoint),
                ..list_req("s3://stuck@us-east-1/p", "", true)
            };
            tokio::spawn(async move { c.backup_volume_list(r).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // While they hang: Ping and another target answer.
    let mut c2 = c.clone();
    c2.ping(()).await.unwrap();
    let listed = c2
        .backup_volume_list(list_req(&vfs, "", true))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.volumes.contains_key("vol1"));
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1200),
        "other calls waited for the stalled target ({:?})",
        started.elapsed()
    );
    for call in stalled {
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(
            err.message().contains("s3://stuck@us-east-1/p")
                && err.message().contains("did not answer within 1.5 s"),
            "{err:?}"
        );
    }
    stop.send(()).unwrap();
    held.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cifs_target_on_its_mount_directory() {
    // The share as Longhorn mounts it: <root>/<host with . as _>/<share>/<path>; here a
    // directory standing for the mount (backup_target.nfs_mount: existing).
    let root = scratch("cifs");
    let url = "cifs://smb.example/backups/cluster-a";
    let dir = root.join("smb_example/backups/cluster-a");
    std::fs::create_dir_all(&dir).unwrap();
    let options = backupstore::TargetOptions {
        nfs: backupstore::NfsOptions {
            mount_root: root.clone(),
            mount: backupstore::NfsMount::Existing,
        },
        ..Default::default()
    };
    let t = Target::open(&format!("{url}?cifsOptions=vers=3.0"), &options).unwrap();
    assert_eq!((t.kind(), t.url.as_str()), ("cifs", url));
    let expected = three_backups(&t);
    assert!(dir
        .join("backupstore/volumes/01/9c/vol1/volume.cfg")
        .is_file());

    let (_proxy, mut c) = start_proxy_with(&format!(
        "backup_target: {{ nfs_mount_root: {}, nfs_mount: existing }}\n",
        root.display()
    ))
    .await;
    let envs: Vec<String> = vec!["CIFS_USERNAME=backup".into(), "CIFS_PASSWORD=secret".into()];
    let all = c
        .backup_volume_list(EngineBackupVolumeListRequest {
            envs: envs.clone(),
            ..list_req(url, "", false)
        })
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<_> = all.volumes.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["vol1", "vol2"]);
    let vol = c
        .backup_volume_get(EngineBackupVolumeGetRequest {
            envs: envs.clone(),
            ..volume_get(url, "vol1")
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (vol.size, vol.last_backup_name.as_str()),
        (6291456, "backup-b")
    );
    let b = c
        .backup_get(EngineBackupGetRequest {
            envs: envs.clone(),
            ..backup_get(url, "backup-a", "vol1")
        })
        .await
        .unwrap()
        .into_inner()
        .backup
        .unwrap();
    assert_eq!(b.url, format!("{url}?backup=backup-a&volume=vol1"));
    let meta = c
        .backup_config_meta_get(EngineBackupConfigMetaGetRequest {
            proxy_engine_request: None,
            envs: envs.clone(),
            dest_url: backupstore::encode_backup_url(url, "backup-b", "vol1"),
        })
        .await
        .unwrap()
        .into_inner()
        .modification_time
        .unwrap();
    let cfg_time =
        std::fs::metadata(dir.join("backupstore/volumes/01/9c/vol1/backups/backup_backup-b.cfg"))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert_eq!(meta.seconds, cfg_time);
    c.backup_remove(EngineBackupRemoveRequest {
        envs: envs.clone(),
        ..remove_backup(url, "backup-a", "vol1")
    })
    .await
    .unwrap();
    assert_eq!(
        t.read_backup("vol1", "backup-b").unwrap().1,
        expected,
        "backup-b lost a shared block"
    );
    c.backup_remove(EngineBackupRemoveRequest {
        envs: envs.clone(),
        dest_url: url.into(),
        volume_name: "vol2".into(),
    })
    .await
    .unwrap();
    assert!(!dir.join(t.volume_key("vol2")).exists());

    // Mounting (nfs_mount: auto) dials the server: loopback is refused by the default
    // policy before mount runs, and credentials never go in cifsOptions.
    let (_auto, mut c) = start_proxy_with(&format!(
        "backup_target: {{ nfs_mount_root: {} }}\n",
        root.display()
    ))
    .await;
    let err = c
        .backup_volume_list(EngineBackupVolumeListRequest {
            envs: envs.clone(),
            ..list_req("cifs://127.0.0.1/share/x", "", true)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("the CIFS server of 127.0.0.1:445"),
        "{err:?}"
    );
    let err = c
        .backup_volume_list(EngineBackupVolumeListRequest {
            envs,
            ..list_req(
                "cifs://smb.example/share/x?cifsOptions=password=x",
                "",
                true,
            )
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("cifsOptions may not set password"),
        "{err:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Root only, and only where the kernel has a CIFS client and samba's `smbd` is installed:
/// lhnet mounts a share of a real samba server on loopback itself (`nfs_mount: auto`) with the
/// call's CIFS_USERNAME/CIFS_PASSWORD, then lists it. Elsewhere it says why it skips; this
/// machine type's kernel has no CIFS client (docs/engine-proxy.md), so the listing, inspection
/// and removal on a cifs target are tested on its mount directory above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cifs_target_mounted_from_a_real_samba_server() {
    let kernel = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let cifs = kernel.lines().any(|l| l.trim_end().ends_with("cifs"))
        || std::process::Command::new("modprobe")
            .arg("cifs")
            .status()
            .is_ok_and(|s| s.success());
    let smbd = std::process::Command::new("smbd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let root = nix::unistd::Uid::effective().is_root();
    if !(cifs && smbd && root) {
        eprintln!(
            "SKIP: mounting a real CIFS share needs root ({root}), a kernel CIFS client ({cifs}: no cifs in /proc/filesystems and no module) and samba's smbd ({smbd})"
        );
        return;
    }
    let dir = scratch("samba");
    let share = dir.join("share");
    std::fs::create_dir_all(share.join("backups")).unwrap();
    let conf = dir.join("smb.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nsmb ports = 44500\ninterfaces = lo\nbind interfaces only = yes\nmap to guest = Bad User\nlog file = {0}/log\nlock directory = {0}\nstate directory = {0}\ncache directory = {0}\npid directory = {0}\nprivate dir = {0}\n[share]\npath = {1}\nread only = no\nguest ok = yes\nforce user = root\n",
            dir.display(),
            share.display()
        ),
    )
    .unwrap();
    let mut smbd = common::KillOnDrop(
        std::process::Command::new("smbd")
            .args(["--foreground", "--no-process-group", "-s"])
            .arg(&conf)
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let mounts = dir.join("mounts");
    let (_proxy, mut c) = start_proxy_with(&format!(
        "backup_target: {{ nfs_mount_root: {}, allowed_endpoints: [\"127.0.0.1:44500\"] }}\n",
        mounts.display()
    ))
    .await;
    let url = "cifs://127.0.0.1/share/backups?cifsOptions=port=44500,vers=3.0,soft,guest";
    let listed = c
        .backup_volume_list(EngineBackupVolumeListRequest {
            envs: vec!["CIFS_USERNAME=guest".into(), "CIFS_PASSWORD=".into()],
            ..list_req(url, "", true)
        })
        .await;
    let mounted = mounts.join("127_0_0_1/share/backups");
    let _ = std::process::Command::new("umount").arg(&mounted).status();
    let _ = smbd.0.kill();
    assert!(listed.unwrap().into_inner().volumes.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
