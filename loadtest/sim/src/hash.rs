//! Snapshot hashing as a replica's sync agent does it: a background job per snapshot that
//! takes the node's hashing lock, computes the CRC-64 (ISO) of the snapshot's disk file,
//! reuses a checksum recorded for the same change time unless asked to rehash, finds silent
//! corruption (the bytes changed, the change time did not), and can be cancelled.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::Status;

use super::replica::{snap_file, SimReplica};

/// longhorn-engine takes one lock per node (`/host/var/lib/longhorn/.lock/hash`), shared by
/// the replicas on it; each simulated replica is a node of its own, so that tests running at
/// once do not share one.
pub(crate) type NodeLock = std::sync::Arc<tokio::sync::Mutex<()>>;

/// Finished jobs kept per state (`MaxSnapshotHashJobSize`).
const KEPT_JOBS: usize = 10;
/// Bytes hashed between checks for cancellation and pacing.
const CHUNK: usize = 1 << 20;

/// A replica's hashing jobs, by snapshot name, and the recorded checksums, by disk file (the
/// `.checksum` files next to the disks).
#[derive(Default)]
pub(crate) struct Hashes {
    jobs: BTreeMap<String, Job>,
    checksums: HashMap<String, Recorded>,
    order: u64,
}

#[derive(Clone)]
struct Job {
    state: &'static str,
    checksum: String,
    error: String,
    silently_corrupted: bool,
    cancelled: Arc<AtomicBool>,
    /// When it finished, for keeping the newest.
    finished: u64,
}

#[derive(Clone)]
struct Recorded {
    checksum: String,
    change: u64,
    silently_corrupted: bool,
}

/// CRC-64 with the ISO polynomial, as Go's `crc64.MakeTable(crc64.ISO)`.
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO);

/// Starts hashing `name`; a job already running for it is left alone (Longhorn only logs it).
pub(crate) fn start(replica: &SimReplica, name: &str, rehash: bool) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::unknown("snapshot name is required"));
    }
    let cancelled = Arc::new(AtomicBool::new(false));
    let fresh = replica.with(|s| {
        if s.hashes
            .jobs
            .get(name)
            .is_some_and(|j| j.state == "in_progress")
        {
            return Ok(false);
        }
        s.hashes.jobs.insert(
            name.to_string(),
            Job {
                state: "in_progress",
                checksum: String::new(),
                error: String::new(),
                silently_corrupted: false,
                cancelled: cancelled.clone(),
                finished: 0,
            },
        );
        Ok(true)
    })?;
    if !fresh {
        return Ok(());
    }
    let replica = replica.clone();
    let name = name.to_string();
    tokio::spawn(async move {
        let result = hash(&replica, &name, rehash, &cancelled).await;
        let _ = replica.with(|s| {
            s.hashes.order += 1;
            let order = s.hashes.order;
            if let Some(job) = s.hashes.jobs.get_mut(&name) {
                job.finished = order;
                match result {
                    Ok((checksum, corrupted)) => {
                        job.state = "complete";
                        job.checksum = checksum;
                        job.silently_corrupted = corrupted;
                    }
                    Err(e) => {
                        job.state = "error";
                        job.error = e;
                    }
                }
            }
            prune(&mut s.hashes.jobs);
            Ok(())
        });
    });
    Ok(())
}

/// Keeps the newest [`KEPT_JOBS`] complete and error jobs.
fn prune(jobs: &mut BTreeMap<String, Job>) {
    for state in ["complete", "error"] {
        let mut done: Vec<(u64, String)> = jobs
            .iter()
            .filter(|(_, j)| j.state == state)
            .map(|(n, j)| (j.finished, n.clone()))
            .collect();
        done.sort();
        let excess = done.len().saturating_sub(KEPT_JOBS);
        for (_, name) in done.into_iter().take(excess) {
            jobs.remove(&name);
        }
    }
}

/// The job itself: (checksum, silently corrupted) or why it failed.
async fn hash(
    replica: &SimReplica,
    name: &str,
    rehash: bool,
    cancelled: &AtomicBool,
) -> Result<(String, bool), String> {
    let _node = replica.node_lock.lock().await;
    let file = snap_file(name);
    let (bytes, change, recorded) = replica
        .with(|s| {
            if !s.disks.contains_key(&file) {
                return Err(Status::not_found(format!("file {file} no longer exists")));
            }
            Ok((
                s.data.get(&file).cloned().unwrap_or_default(),
                s.changed.get(&file).copied().unwrap_or(0),
                s.hashes.checksums.get(&file).cloned(),
            ))
        })
        .map_err(|e| e.message().to_string())?;
    if let Some(r) = &recorded {
        if r.change == change && (r.silently_corrupted || (!rehash && !r.checksum.is_empty())) {
            return Ok((r.checksum.clone(), r.silently_corrupted));
        }
    }
    let rate = replica.hash_rate.load(Ordering::Relaxed);
    let started = tokio::time::Instant::now();
    let mut digest = CRC64.digest();
    for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
        if cancelled.load(Ordering::SeqCst) {
            return Err("context canceled".into());
        }
        digest.update(chunk);
        if rate > 0 {
            let done = ((i + 1) * CHUNK).min(bytes.len()) as f64;
            tokio::time::sleep_until(
                started + std::time::Duration::from_secs_f64(done / rate as f64),
            )
            .await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    let checksum = format!("{:016x}", digest.finalize());
    replica
        .with(|s| {
            let now = s.changed.get(&file).copied().unwrap_or(0);
            if !s.disks.contains_key(&file) {
                return Err(Status::not_found(format!("file {file} no longer exists")));
            }
            if now != change {
                s.hashes.checksums.remove(&file);
                return Err(Status::aborted(format!(
                    "snapshot {name} modification time is changed"
                )));
            }
            // Same change time, other bytes: the disk changed under the file system.
            if let Some(r) = recorded
                .as_ref()
                .filter(|r| r.change == change && r.checksum != checksum)
            {
                let corrupted = Recorded {
                    silently_corrupted: true,
                    ..r.clone()
                };
                let kept = corrupted.checksum.clone();
                s.hashes.checksums.insert(file.clone(), corrupted);
                return Ok((kept, true));
            }
            s.hashes.checksums.insert(
                file.clone(),
                Recorded {
                    checksum: checksum.clone(),
                    change,
                    silently_corrupted: false,
                },
            );
            Ok((checksum, false))
        })
        .map_err(|e| e.message().to_string())
}

/// (state, checksum, error, silently corrupted) of a snapshot: its job, else its recorded
/// checksum, else an error state (never an RPC error, as in longhorn-engine).
pub(crate) fn status(
    replica: &SimReplica,
    name: &str,
) -> Result<(String, String, String, bool), Status> {
    replica.with(|s| {
        if let Some(j) = s.hashes.jobs.get(name) {
            return Ok((
                j.state.into(),
                j.checksum.clone(),
                j.error.clone(),
                j.silently_corrupted,
            ));
        }
        let file = snap_file(name);
        Ok(match s.hashes.checksums.get(&file) {
            Some(r) if s.changed.get(&file).copied().unwrap_or(0) != r.change => (
                "error".into(),
                String::new(),
                format!("snapshot {name} is changed"),
                false,
            ),
            Some(r) => (
                "complete".into(),
                r.checksum.clone(),
                String::new(),
                r.silently_corrupted,
            ),
            None => (
                "error".into(),
                String::new(),
                format!("open {file}.checksum: no such file or directory"),
                false,
            ),
        })
    })
}

/// Cancels a running job; one that does not exist is no error.
pub(crate) fn cancel(replica: &SimReplica, name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::unknown("snapshot name is required"));
    }
    replica.with(|s| {
        if let Some(j) = s.hashes.jobs.get(name) {
            j.cancelled.store(true, Ordering::SeqCst);
        }
        Ok(())
    })
}

/// Whether this replica's node is hashing now.
pub(crate) fn node_locked(replica: &SimReplica) -> bool {
    replica.node_lock.try_lock().is_err()
}
