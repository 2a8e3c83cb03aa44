//! The demo's backup phase: after the load, the manager backs one volume up to S3 through the
//! engine pod's lhnet (management IPs only), to an S3 server (moto) that lives only on the
//! storage bridge. lhnet's engine proxy gives the replica its pod's backup egress listener as
//! the proxy, so the upload leaves the replica pod on `lhnet1`; the report says how the
//! replica pods' bytes split between `lhnet1` and `eth0` meanwhile.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::*;
use lhnet_proto::ptypes;
use serde::Serialize;
use tonic::transport::Channel;

/// The S3 server's host on the storage network, its port and bucket.
pub const S3_HOST: u8 = 20;
pub const S3_PORT: u16 = 9000;
const BUCKET: &str = "demo-backups";
/// The backup egress listener of every pod (127.0.0.1).
pub const EGRESS_PORT: u16 = 8520;
/// The longest the backup may take.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(120);

/// What the backup phase did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupReport {
    /// The backup completed, its bytes went through a replica pod's egress listener, and no
    /// replica pod's eth0 carried 5% of its lhnet1 bytes meanwhile.
    pub ok: bool,
    /// Why the phase did not run (moto not installed), or why it failed.
    pub skipped: Option<String>,
    pub error: Option<String>,
    pub target: String,
    pub volume: String,
    pub seconds: f64,
    /// The backup's size (its data blocks) as the backup cfg says.
    pub backup_bytes: u64,
    /// What the replica pods' egress listeners sent to the target, their eth0 bytes over
    /// the phase, and eth0 / uploaded.
    pub uploaded_bytes: u64,
    pub eth0_bytes: u64,
    pub eth0_share: f64,
    /// Per replica pod over the phase: kernel bytes on lhnet1 and eth0, what lhnet's egress
    /// listener sent to the target, and eth0 / lhnet1.
    pub pods: Vec<BackupPod>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupPod {
    pub name: String,
    pub lhnet1_bytes: u64,
    pub eth0_bytes: u64,
    pub egress_sent_bytes: u64,
}

/// moto's S3 server in a namespace of its own; killed when dropped.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MOTO: &str = r#"
import logging, sys, time, urllib.request
logging.getLogger("werkzeug").setLevel(logging.ERROR)
try:
    from moto.server import ThreadedMotoServer
except ImportError as e:
    print("missing", e, flush=True)
    sys.exit(3)
ip, port, bucket = sys.argv[1], int(sys.argv[2]), sys.argv[3]
server = ThreadedMotoServer(ip_address=ip, port=port, verbose=False)
server.start()
for _ in range(100):
    try:
        urllib.request.urlopen(urllib.request.Request(f"http://{ip}:{port}/{bucket}", method="PUT"))
        break
    except OSError:
        time.sleep(0.1)
print("ready", flush=True)
sys.stdin.read()
"#;

/// Starts moto in `ns` (by `command`, which runs a program there) at `ip`; `Err` says why
/// it cannot (moto not installed, or it did not come up).
pub fn start_s3(mut command: Command, ip: Ipv4Addr) -> Result<S3Server, String> {
    use std::io::BufRead;
    let mut child = command
        .args(["-c", MOTO, &ip.to_string(), &S3_PORT.to_string(), BUCKET])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run python3 for moto's S3 server: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    let server = S3Server {
        child,
        endpoint: format!("http://{ip}:{S3_PORT}"),
    };
    match line.trim() {
        "ready" => Ok(server),
        other => Err(format!(
            "moto's S3 server is not available ({}); `pip install 'moto[server]'` (.ci/run does)",
            if other.is_empty() { "it exited" } else { other }
        )),
    }
}

/// The envs a manager sends for an S3 target (every key, some empty).
fn s3_envs(endpoint: &str) -> Vec<String> {
    [
        ("AWS_ACCESS_KEY_ID", "demo-access-key"),
        ("AWS_SECRET_ACCESS_KEY", "demo-secret-key"),
        ("AWS_ENDPOINTS", endpoint),
        ("AWS_CERT", ""),
        ("HTTPS_PROXY", ""),
        ("HTTP_PROXY", ""),
        ("NO_PROXY", ""),
        ("VIRTUAL_HOSTED_STYLE", ""),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect()
}

/// The manager's part, from its namespace: a snapshot of the volume, SnapshotBackup to the
/// S3 target through the engine pod's lhnet, then SnapshotBackupStatus until it completes.
/// Returns the seconds it took and the backup's size.
pub async fn back_up(
    lhnet: SocketAddr,
    request: Option<ProxyEngineRequest>,
    endpoint: &str,
    target: &str,
) -> Result<(f64, u64), String> {
    let channel = Channel::from_shared(format!("http://{lhnet}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("manager cannot reach lhnet at {lhnet}: {e}"))?;
    let mut client = ProxyEngineServiceClient::new(channel);
    let started = Instant::now();
    client
        .volume_snapshot(EngineVolumeSnapshotRequest {
            proxy_engine_request: request.clone(),
            snapshot_volume: Some(ptypes::VolumeSnapshotRequest {
                name: "demo-backup".into(),
                ..Default::default()
            }),
        })
        .await
        .map_err(|s| format!("VolumeSnapshot: {}", s.message()))?;
    client
        .snapshot_backup(EngineSnapshotBackupRequest {
            proxy_engine_request: request.clone(),
            envs: s3_envs(endpoint),
            backup_name: "backup-demo".into(),
            snapshot_name: "demo-backup".into(),
            backup_target: target.into(),
            labels: [(
                "longhorn.io/volume-access-mode".to_string(),
                "rwo".to_string(),
            )]
            .into(),
            compression_method: "lz4".into(),
            concurrent_limit: 2,
            storage_class_name: "longhorn".into(),
            parameters: [
                ("backup-mode".to_string(), "incremental".to_string()),
                ("backup-block-size".to_string(), "2097152".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("SnapshotBackup: {}", s.message()))?;
    let status = EngineSnapshotBackupStatusRequest {
        proxy_engine_request: request,
        backup_name: "backup-demo".into(),
        replica_address: String::new(),
        replica_name: String::new(),
    };
    loop {
        let s = client
            .snapshot_backup_status(status.clone())
            .await
            .map_err(|s| format!("SnapshotBackupStatus: {}", s.message()))?
            .into_inner();
        match s.state.as_str() {
            "complete" => break,
            "error" => return Err(format!("the backup failed: {}", s.error)),
            _ if started.elapsed() > BACKUP_TIMEOUT => {
                return Err(format!(
                    "the backup did not complete in {} s ({}%, {})",
                    BACKUP_TIMEOUT.as_secs(),
                    s.progress,
                    s.state
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let got = client
        .backup_get(EngineBackupGetRequest {
            proxy_engine_request: None,
            envs: s3_envs(endpoint),
            dest_url: crate::sim::backupstore::encode_backup_url(target, "backup-demo", "vol-00"),
        })
        .await
        .map_err(|s| format!("BackupGet: {}", s.message()))?
        .into_inner();
    Ok((seconds, got.backup.map_or(0, |b| b.size.max(0) as u64)))
}

/// What lhnet's egress listener sent, over all targets, from its Prometheus text.
pub fn egress_sent(metrics_text: &str) -> u64 {
    metrics_text
        .lines()
        .filter(|l| l.starts_with("lhnet_backup_egress_transmit_bytes_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One pod's counters at one moment: its name, kernel bytes per device, egress bytes sent.
pub type PodCounters = (String, BTreeMap<String, u64>, u64);

/// The pods' part of the report from counters taken before and after.
pub fn pods_report(before: &[PodCounters], after: &[PodCounters]) -> Vec<BackupPod> {
    before
        .iter()
        .zip(after)
        .map(|((name, b, e0), (_, a, e1))| {
            let moved = |d: &str| {
                a.get(d)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(b.get(d).copied().unwrap_or(0))
            };
            BackupPod {
                name: name.clone(),
                lhnet1_bytes: moved("lhnet1"),
                eth0_bytes: moved("eth0"),
                egress_sent_bytes: e1.saturating_sub(*e0),
            }
        })
        .collect()
}

/// The verdict: the backup completed, its bytes went out through the replica pods' egress
/// listeners and over their lhnet1, and their eth0 carried under `threshold` of those bytes.
pub fn judge(report: &mut BackupReport, threshold: f64) {
    report.uploaded_bytes = report.pods.iter().map(|p| p.egress_sent_bytes).sum();
    report.eth0_bytes = report.pods.iter().map(|p| p.eth0_bytes).sum();
    let lhnet1: u64 = report
        .pods
        .iter()
        .filter(|p| p.egress_sent_bytes > 0)
        .map(|p| p.lhnet1_bytes)
        .sum();
    report.eth0_share = match report.uploaded_bytes {
        0 => f64::INFINITY,
        sent => report.eth0_bytes as f64 / sent as f64,
    };
    if report.error.is_none() && report.uploaded_bytes == 0 {
        report.error = Some("no bytes went through a replica pod's backup egress listener".into());
    }
    if report.error.is_none() && lhnet1 < report.uploaded_bytes {
        report.error = Some(format!(
            "the uploading pods' lhnet1 carried {lhnet1} bytes, less than the {} their egress listeners sent",
            report.uploaded_bytes
        ));
    }
    report.ok = report.error.is_none() && report.eth0_share < threshold;
}
