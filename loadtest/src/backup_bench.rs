//! `lhnet-loadtest bench-backups`: BackupVolumeList over a vfs target with many volumes and
//! backups, through lhnet (one thread), next to a plain directory walk of the same tree; and
//! Ping's round trip through lhnet.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::EngineBackupVolumeListRequest;
use serde::Serialize;
use tonic::transport::Channel;

use crate::sim::backupstore::Target;

#[derive(Debug, Clone, Serialize)]
pub struct BackupBenchReport {
    pub volumes: usize,
    pub backups_per_volume: usize,
    pub runs: usize,
    pub lhnet_list_ms: f64,
    pub directory_walk_ms: f64,
    pub ratio: f64,
    pub ping_p50_us: f64,
    pub ping_p99_us: f64,
}

/// Writes the cfgs of `volumes` × `backups` (List reads names only; no blocks are needed).
fn build_tree(root: &Path, volumes: usize, backups: usize) -> Result<String, String> {
    std::fs::create_dir_all(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let url = format!("vfs://{}", root.display());
    let t = Target::parse(&url)?;
    for v in 0..volumes {
        let name = format!("pvc-{v:06}");
        let dir = t.volume_dir(&name);
        std::fs::create_dir_all(dir.join("backups")).map_err(|e| e.to_string())?;
        let cfg = format!(
            r#"{{"Name":"{name}","Size":"1073741824","Labels":null,"CreatedTime":"2022-06-01T00:00:00Z","LastBackupName":"backup-{last:04}","LastBackupAt":"2022-06-01T02:00:00Z","BlockCount":"{backups}","BackingImageName":"\"\"","BackingImageChecksum":"\"\""}}"#,
            last = backups.saturating_sub(1)
        );
        std::fs::write(dir.join("volume.cfg"), cfg).map_err(|e| e.to_string())?;
        for b in 0..backups {
            let cfg = format!(
                r#"{{"Name":"backup-{b:04}","VolumeName":"{name}","SnapshotName":"s{b}","SnapshotCreatedAt":"2022-06-01T02:00:00Z","CreatedTime":"2022-06-01T02:00:01Z","Size":"2097152","Labels":null,"IsIncremental":true,"SingleFile":{{"FilePath":""}}}}"#
            );
            std::fs::write(dir.join(format!("backups/backup_backup-{b:04}.cfg")), cfg)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(url)
}

/// The same information by hand: every volume directory and its backup file names.
fn walk(root: &Path) -> usize {
    let list = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let mut n = 0;
    for h1 in list(&root.join("backupstore/volumes")) {
        for h2 in list(&h1) {
            for v in list(&h2) {
                n += 1 + list(&v.join("backups")).len();
            }
        }
    }
    n
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(volumes: usize, backups: usize, runs: usize) -> Result<BackupBenchReport, String> {
    let root = std::env::temp_dir().join(format!("lhnet-bench-backups-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    eprintln!("bench-backups: writing {volumes} volumes x {backups} backups ...");
    let url = build_tree(&root, volumes, backups)?;

    let yaml = "admin: { address: 127.0.0.1:0 }\nstorage_network: { interface: lo }\n\
        listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n\
        \x20     - match: { prefix: /imrpc.ProxyEngineService/ }\n        local: longhorn_engine_proxy\n\
        clusters:\n  - name: engines\n    type: original_dst\n";
    let (proxy, addr) = crate::bench::start_lhnet_thread(yaml, "m", 1, None)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let report = rt.block_on(async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut c = ProxyEngineServiceClient::new(channel).max_decoding_message_size(256 << 20);
        let mut lhnet = Vec::new();
        let mut direct = Vec::new();
        for i in 0..runs.max(1) + 1 {
            let t = Instant::now();
            let listed = c
                .backup_volume_list(EngineBackupVolumeListRequest {
                    envs: vec![],
                    dest_url: url.clone(),
                    volume_name: String::new(),
                    volume_only: false,
                })
                .await
                .map_err(|s| format!("BackupVolumeList: {}", s.message()))?
                .into_inner();
            let took = t.elapsed().as_secs_f64() * 1000.0;
            let t = Instant::now();
            let walked = walk(&root);
            let walk_ms = t.elapsed().as_secs_f64() * 1000.0;
            let entries: usize = listed.volumes.values().map(|v| 1 + v.backups.len()).sum();
            if entries != walked || listed.volumes.len() != volumes {
                return Err(format!(
                    "lhnet listed {entries} entries, the walk found {walked}"
                ));
            }
            if i > 0 {
                // The first round warms the page cache for both.
                lhnet.push(took);
                direct.push(walk_ms);
            }
        }
        let mut pings = Vec::new();
        for _ in 0..2000 {
            let t = Instant::now();
            c.ping(()).await.map_err(|s| s.message().to_string())?;
            pings.push(t.elapsed().as_secs_f64() * 1e6);
        }
        pings.sort_by(f64::total_cmp);
        let (l, d) = (median(lhnet), median(direct));
        Ok::<_, String>(BackupBenchReport {
            volumes,
            backups_per_volume: backups,
            runs,
            lhnet_list_ms: l,
            directory_walk_ms: d,
            ratio: l / d.max(1e-9),
            ping_p50_us: pings[pings.len() / 2],
            ping_p99_us: pings[pings.len() * 99 / 100],
        })
    });
    proxy.shutdown_token().cancel();
    std::thread::sleep(Duration::from_millis(50));
    let _ = std::fs::remove_dir_all(&root);
    report
}

pub fn print(r: &BackupBenchReport) {
    println!(
        "BackupVolumeList over {} volumes x {} backups (vfs), median of {} runs",
        r.volumes, r.backups_per_volume, r.runs
    );
    println!("  through lhnet (1 thread): {:>9.1} ms", r.lhnet_list_ms);
    println!(
        "  plain directory walk:     {:>9.1} ms",
        r.directory_walk_ms
    );
    println!("  lhnet / walk = {:.2}x", r.ratio);
    println!(
        "Ping through lhnet: p50 {:.0} us, p99 {:.0} us",
        r.ping_p50_us, r.ping_p99_us
    );
}
