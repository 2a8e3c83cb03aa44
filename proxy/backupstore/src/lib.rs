//! Longhorn's backupstore on storage (library of 2021-11, Longhorn 1.3):
//! `backupstore/volumes/<h1>/<h2>/<volume>/{volume.cfg, backups/, blocks/, locks/}`, gzip 2 MiB
//! blocks named by SHA-512, cfg JSON with Longhorn's string-typed and double-quoted fields
//! (`spec/longhorn-backupstore-bim.md` §2). lhnet reads it to serve the backup-target RPCs
//! (list, inspect, config metadata, remove); the simulator writes its backups with it.
//!
//! Drivers ([`driver::Driver`]): `vfs:///DIR` (a local directory), `nfs://HOST:/PATH` (mounted
//! at `/var/lib/longhorn-backupstore-mounts/<host>/<path>` as Longhorn mounts it, or found
//! there already) and `s3://BUCKET@REGION/PATH` (through `object_store`, credentials per call).

pub mod azblob;
pub mod driver;
pub mod endpoints;
pub mod http;
pub mod object;
pub mod s3;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use driver::{guard_of, unix_nanos, FsDriver, KeyedGuards};
pub use driver::{Driver, NfsMount, NfsOptions, NFS_MOUNT_ROOT};
pub use endpoints::{EndpointPolicy, REFUSED};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

pub const BLOCK_SIZE: usize = 2 * 1024 * 1024;

/// `volume.cfg`, keys in Longhorn's order. Missing keys read as empty, as Go's decoder does.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub struct VolumeCfg {
    pub name: String,
    pub size: String,
    pub labels: Option<BTreeMap<String, String>>,
    pub created_time: String,
    pub last_backup_name: String,
    pub last_backup_at: String,
    pub block_count: String,
    /// Go's `json:",string"` on a string field: a JSON string holding a JSON string (`"\"\""`).
    pub backing_image_name: String,
    pub backing_image_checksum: String,
    /// Longhorn 1.4+ (`json:",string"` too): the method of the volume's first backup, kept for
    /// every later one; empty in older volumes, which are gzip.
    pub compression_method: String,
    pub storage_class_name: String,
    pub data_engine: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct BlockRef {
    #[serde(rename = "Offset")]
    pub offset: i64,
    #[serde(rename = "BlockChecksum")]
    pub block_checksum: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SingleFile {
    #[serde(rename = "FilePath")]
    pub file_path: String,
}

/// `backups/backup_<name>.cfg`, keys in Longhorn's order. Missing keys read as empty.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub struct BackupCfg {
    pub name: String,
    pub volume_name: String,
    pub snapshot_name: String,
    pub snapshot_created_at: String,
    /// Empty while the backup is in progress.
    pub created_time: String,
    pub size: String,
    pub labels: Option<BTreeMap<String, String>>,
    /// Longhorn 1.6+: `backup-mode` (incremental / full) and `backup-block-size` (bytes).
    pub parameters: Option<BTreeMap<String, String>>,
    pub is_incremental: bool,
    /// Longhorn 1.4+: how this backup's blocks are compressed (empty: gzip).
    pub compression_method: String,
    pub newly_uploaded_data_size: String,
    pub re_uploaded_data_size: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<BlockRef>,
    pub single_file: SingleFile,
}

/// A backup to write ([`Target::write_backup`]): the volume as of a snapshot and what the
/// request asked for.
#[derive(Debug, Clone, Default)]
pub struct NewBackup<'a> {
    pub volume: &'a str,
    pub backup: &'a str,
    pub snapshot: &'a str,
    pub snapshot_created_at: &'a str,
    pub now: &'a str,
    pub size: i64,
    pub labels: BTreeMap<String, String>,
    pub backing_image: (&'a str, &'a str),
    /// `none`, `lz4` or `gzip` (empty: lz4, Longhorn's default); a volume keeps the method of
    /// its first backup.
    pub compression_method: &'a str,
    pub storage_class_name: &'a str,
    /// `backup-mode: full` uploads every block again; `backup-block-size` sets the block size.
    pub parameters: BTreeMap<String, String>,
    /// Blocks uploaded at once (the request's `concurrent_limit`; at least one).
    pub concurrent_limit: usize,
    pub data: &'a [u8],
}

/// How blocks are compressed on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Lz4,
}

impl Compression {
    /// A cfg's method; empty is gzip (backups made before Longhorn 1.4).
    pub fn parse(method: &str) -> Result<Compression, String> {
        match method {
            "" | "gzip" => Ok(Compression::Gzip),
            "lz4" => Ok(Compression::Lz4),
            "none" => Ok(Compression::None),
            other => Err(format!(
                "unsupported compression method {other:?}; use none, lz4 or gzip"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
        }
    }

    fn compress(self, block: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(block.to_vec()),
            Compression::Gzip => {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(block)?;
                gz.finish()
            }
            Compression::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
                enc.write_all(block)?;
                enc.finish().map_err(io::Error::other)
            }
        }
    }

    /// Decompresses at most `limit` bytes (more means the block is not what it claims).
    fn decompress(self, packed: &[u8], limit: usize) -> io::Result<Vec<u8>> {
        let mut raw = Vec::with_capacity(limit.min(1 << 24));
        let take = limit as u64 + 1;
        match self {
            Compression::None => raw.extend_from_slice(&packed[..packed.len().min(limit + 1)]),
            Compression::Gzip => {
                flate2::read::GzDecoder::new(packed)
                    .take(take)
                    .read_to_end(&mut raw)?;
            }
            Compression::Lz4 => {
                lz4_flex::frame::FrameDecoder::new(packed)
                    .take(take)
                    .read_to_end(&mut raw)?;
            }
        }
        Ok(raw)
    }
}

/// The parameter naming the block size, and the sizes Longhorn allows (2 MiB, 16 MiB).
pub const BLOCK_SIZE_PARAMETER: &str = "backup-block-size";
pub const BACKUP_MODE_PARAMETER: &str = "backup-mode";

/// A backup's block size from its parameters (2 MiB when unset, as before Longhorn 1.8).
pub fn block_size_of(parameters: Option<&BTreeMap<String, String>>) -> Result<usize, String> {
    match parameters.and_then(|p| p.get(BLOCK_SIZE_PARAMETER)) {
        None => Ok(BLOCK_SIZE),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n == BLOCK_SIZE || n == 8 * BLOCK_SIZE => Ok(n),
            _ => Err(format!(
                "invalid {BLOCK_SIZE_PARAMETER} {v:?}: Longhorn takes 2097152 or 16777216"
            )),
        },
    }
}

/// An open backup target: its normalised URL and the driver behind it.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    driver: Arc<dyn Driver>,
}

/// How targets are opened: the call's credentials (S3) and where NFS targets live.
#[derive(Debug, Clone, Default)]
pub struct TargetOptions {
    pub credentials: HashMap<String, String>,
    pub nfs: NfsOptions,
    /// Where the target may make lhnet dial (the default refuses loopback, link-local and the
    /// metadata addresses).
    pub endpoints: Arc<EndpointPolicy>,
}

/// A lock file older than this no longer holds (Longhorn's expiry).
const LOCK_EXPIRY: Duration = Duration::from_secs(150);
/// How often a held lock is saved again, so it never expires while its work runs (Longhorn's).
const LOCK_REFRESH: Duration = Duration::from_secs(60);
/// The largest backup [`Target::read_backup`] restores into memory.
const MAX_RESTORE_BYTES: i64 = 16 << 30;

/// What a backup volume holds (`InspectVolume`, `List`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: i64,
    pub labels: BTreeMap<String, String>,
    pub created: String,
    pub last_backup_name: String,
    pub last_backup_at: String,
    pub data_stored: i64,
    pub messages: BTreeMap<String, String>,
    /// Backup names (List leaves the values empty, as Longhorn does).
    pub backups: Vec<String>,
    pub backing_image_name: String,
    pub backing_image_checksum: String,
}

/// One backup (`InspectBackup`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackupInfo {
    pub name: String,
    pub url: String,
    pub snapshot_name: String,
    pub snapshot_created: String,
    pub created: String,
    pub size: i64,
    pub labels: BTreeMap<String, String>,
    pub is_incremental: bool,
    pub volume_name: String,
    pub volume_size: i64,
    pub volume_created: String,
    pub volume_backing_image_name: String,
}

/// Go's `json:",string"` on a string field, read tolerantly: `"\"bi1\""` → `bi1`, and a
/// plain `"bi1"` (which Go itself would refuse) → `bi1`.
pub fn unquote(value: &str) -> String {
    serde_json::from_str::<String>(value).unwrap_or_else(|_| value.to_string())
}

/// Per-volume serialisation of removals inside this process (the lock files order them
/// against other processes).
fn volume_guard(volume: &str) -> Arc<Mutex<()>> {
    static GUARDS: KeyedGuards = Mutex::new(Vec::new());
    guard_of(&GUARDS, volume)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn sha512_hex(data: &[u8]) -> String {
    hex(&Sha512::digest(data))
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-';
    name.len() >= 2 && chars.next().is_some_and(|c| c.is_ascii_alphanumeric()) && chars.all(ok_char)
}

/// `backup-<16 hex>`, the form the backupstore library generates when no name is given.
pub fn generate_backup_name(seed: &str) -> String {
    let nanos = unix_nanos();
    format!(
        "backup-{}",
        &sha512_hex(format!("{seed}{nanos}").as_bytes())[..16]
    )
}

/// Go's `json:",string"` form of a string: the value quoted inside the JSON string.
pub fn double_quoted(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into())
}

/// `<target>?backup=<b>&volume=<v>` (keys sorted, `backup` omitted when empty), as Longhorn encodes it.
pub fn encode_backup_url(target: &str, backup: &str, volume: &str) -> String {
    if backup.is_empty() {
        format!("{target}?volume={volume}")
    } else {
        format!("{target}?backup={backup}&volume={volume}")
    }
}

/// Splits a backup URL into (target, backup, volume).
pub fn decode_backup_url(url: &str) -> Result<(String, String, String), String> {
    let (target, query) = url
        .split_once('?')
        .ok_or_else(|| format!("backup URL {url} has no ?volume= query"))?;
    let mut backup = String::new();
    let mut volume = String::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("backup", v)) => backup = v.to_string(),
            Some(("volume", v)) => volume = v.to_string(),
            _ => {}
        }
    }
    if !valid_name(&volume) {
        return Err(format!("backup URL {url}: invalid volume name {volume:?}"));
    }
    if !backup.is_empty() && !valid_name(&backup) {
        return Err(format!("backup URL {url}: invalid backup name {backup:?}"));
    }
    Ok((target.to_string(), backup, volume))
}

fn to_json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

impl Target {
    /// A directory target: `vfs:///DIR`, or `nfs://HOST:/PATH` whose directory under
    /// [`NFS_MOUNT_ROOT`] is used as it is. The simulator and tests open targets this way.
    pub fn parse(url: &str) -> Result<Target, String> {
        Target::parse_with(url, Path::new(NFS_MOUNT_ROOT))
    }

    /// As [`Target::parse`], with NFS targets looked up under `nfs_root`.
    pub fn parse_with(url: &str, nfs_root: &Path) -> Result<Target, String> {
        if url.starts_with("s3://") {
            return Err(format!(
                "backup target {url}: s3 targets need the call's credentials (Target::open)"
            ));
        }
        let options = TargetOptions {
            nfs: NfsOptions {
                mount_root: nfs_root.to_path_buf(),
                mount: NfsMount::Existing,
            },
            ..TargetOptions::default()
        };
        Target::open(url, &options)
    }

    /// Opens any target: vfs, nfs (mounted as `options.nfs` says) or s3 (with the call's
    /// credentials). The URL's query is ignored.
    pub fn open(url: &str, options: &TargetOptions) -> Result<Target, String> {
        // cifs:// reads its query (`cifsOptions`); the others ignore it.
        let with_query = url;
        let url = url.split('?').next().unwrap_or(url);
        if let Some(dir) = url.strip_prefix("vfs://") {
            if !dir.starts_with('/') {
                return Err(format!(
                    "backup target {url}: vfs needs an absolute directory (vfs:///DIR)"
                ));
            }
            // Longhorn's vfs driver lists its root when opened: a mistyped target fails here
            // instead of listing empty.
            if !Path::new(dir).is_dir() {
                return Err(format!(
                    "backup target {url}: cannot find directory {dir} (vfs:///DIR names an existing directory)"
                ));
            }
            let trimmed = dir.trim_end_matches('/');
            return Ok(Target {
                url: format!("vfs://{}", if trimmed.is_empty() { "/" } else { trimmed }),
                driver: Arc::new(FsDriver::new("vfs", PathBuf::from(dir))),
            });
        }
        if url.starts_with("nfs://") {
            let dir = driver::nfs_directory(url, &options.nfs, &options.endpoints)?;
            return Ok(Target {
                url: url.trim_end_matches('/').to_string(),
                driver: Arc::new(FsDriver::new("nfs", dir)),
            });
        }
        if url.starts_with("cifs://") {
            let parsed = driver::parse_cifs(with_query)?;
            let dir = driver::cifs_directory(
                with_query,
                &options.nfs,
                &options.endpoints,
                &options.credentials,
            )?;
            return Ok(Target {
                url: format!("cifs://{}{}", parsed.host, parsed.path),
                driver: Arc::new(FsDriver::new("cifs", dir)),
            });
        }
        if url.starts_with("s3://") {
            let driver = s3::open(url, &options.credentials, &options.endpoints)?;
            return Ok(Target {
                url: driver.url().to_string(),
                driver: Arc::new(driver),
            });
        }
        if url.starts_with("azblob://") {
            let driver = azblob::open(url, &options.credentials, &options.endpoints)?;
            return Ok(Target {
                url: driver.url().to_string(),
                driver: Arc::new(driver),
            });
        }
        let scheme = url.split("://").next().unwrap_or(url);
        Err(format!(
            "Driver {scheme} is not supported! (lhnet reads vfs:///DIR, nfs://HOST:/PATH, cifs://HOST/SHARE/PATH, s3://BUCKET@REGION/PATH and azblob://CONTAINER@SUFFIX/PATH targets)"
        ))
    }

    /// `vfs`, `nfs` or `s3`.
    pub fn kind(&self) -> &'static str {
        self.driver.kind()
    }

    fn not_found(&self, path: &str) -> String {
        format!("cannot find {path} in backupstore")
    }

    fn read_cfg<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let bytes = match self.driver.read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(path)),
            Err(e) => return Err(format!("reading {path} in {}: {e}", self.url)),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("{path} in {} is not a valid cfg: {e}", self.url))
    }

    fn list_dir(&self, dir: &str) -> Result<Vec<String>, String> {
        self.driver
            .list(dir)
            .map_err(|e| format!("listing {dir} in {}: {e}", self.url))
    }

    fn write(&self, path: &str, bytes: &[u8]) -> io::Result<()> {
        self.driver
            .write(path, bytes)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {path} in {}: {e}", self.url)))
    }

    /// Every backup volume name (`volumes/*/*/*`); a bad name fails the list, as in Longhorn.
    pub fn volume_names(&self) -> Result<Vec<String>, String> {
        let mut names = Vec::new();
        let volumes = "backupstore/volumes";
        for h1 in self.list_dir(volumes)? {
            let h1 = driver::join(volumes, &h1);
            for h2 in self.list_dir(&h1)? {
                for name in self.list_dir(&driver::join(&h1, &h2))? {
                    if !valid_name(&name) {
                        return Err(format!("invalid volume name {name} in backupstore"));
                    }
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Backup names of a volume, from `backups/backup_<name>.cfg` (cfgs not read).
    pub fn backup_names(&self, volume: &str) -> Result<Vec<String>, String> {
        let mut names: Vec<String> = self
            .list_dir(&format!("{}/backups", self.volume_key(volume)))?
            .into_iter()
            .filter_map(|file| {
                file.strip_prefix("backup_")
                    .and_then(|f| f.strip_suffix(".cfg"))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// `List`: one volume or all; with `volume_only`, names only. A volume whose volume.cfg
    /// is missing or corrupt carries the error in its messages; the others are still listed.
    pub fn list(
        &self,
        volume: Option<&str>,
        volume_only: bool,
    ) -> Result<BTreeMap<String, VolumeInfo>, String> {
        let names = match volume {
            Some(v) => {
                if !valid_name(v) {
                    return Err(format!("invalid volume name {v} (names are 2+ letters, digits, '_', '.' or '-', starting with a letter or digit)"));
                }
                vec![v.to_string()]
            }
            None => self.volume_names()?,
        };
        let mut out = BTreeMap::new();
        for name in names {
            let mut info = VolumeInfo::default();
            if let Err(e) = self.read_cfg::<VolumeCfg>(&self.volume_cfg_key(&name)) {
                info.messages.insert("error".into(), e);
            } else if !volume_only {
                info.backups = self.backup_names(&name)?;
            }
            out.insert(name, info);
        }
        Ok(out)
    }

    /// `InspectVolume`.
    pub fn inspect_volume(&self, volume: &str) -> Result<VolumeInfo, String> {
        let cfg: VolumeCfg = self.read_cfg(&self.volume_cfg_key(volume))?;
        Ok(VolumeInfo {
            name: cfg.name,
            size: cfg.size.parse().unwrap_or(0),
            labels: cfg.labels.unwrap_or_default(),
            created: cfg.created_time,
            last_backup_name: cfg.last_backup_name,
            last_backup_at: cfg.last_backup_at,
            data_stored: cfg
                .block_count
                .parse::<i64>()
                .unwrap_or(0)
                .saturating_mul(BLOCK_SIZE as i64),
            messages: BTreeMap::new(),
            backups: Vec::new(),
            backing_image_name: unquote(&cfg.backing_image_name),
            backing_image_checksum: unquote(&cfg.backing_image_checksum),
        })
    }

    /// `InspectBackup`: a backup still in progress is an error that says so.
    pub fn inspect_backup(&self, volume: &str, backup: &str) -> Result<BackupInfo, String> {
        let v: VolumeCfg = self.read_cfg(&self.volume_cfg_key(volume))?;
        let b: BackupCfg = self.read_cfg(&self.backup_cfg_key(volume, backup))?;
        if b.created_time.is_empty() {
            return Err(format!("backup {backup} is still in progress"));
        }
        Ok(BackupInfo {
            url: encode_backup_url(&self.url, &b.name, volume),
            name: b.name,
            snapshot_name: b.snapshot_name,
            snapshot_created: b.snapshot_created_at,
            created: b.created_time,
            size: b.size.parse().unwrap_or(0),
            labels: b.labels.unwrap_or_default(),
            is_incremental: b.is_incremental,
            volume_name: v.name,
            volume_size: v.size.parse().unwrap_or(0),
            volume_created: v.created_time,
            volume_backing_image_name: unquote(&v.backing_image_name),
        })
    }

    /// `GetConfigMetadata`: the mtime of the backup cfg (with a backup) or of volume.cfg.
    pub fn config_mtime(&self, volume: &str, backup: Option<&str>) -> Result<SystemTime, String> {
        let path = match backup {
            Some(b) => self.backup_cfg_key(volume, b),
            None => self.volume_cfg_key(volume),
        };
        self.driver.modified(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                self.not_found(&path)
            } else {
                format!("reading the time of {path}: {e}")
            }
        })
    }

    /// Writes `locks/lock-<16 hex>.lck` of `kind` (1 backup/restore, 2 deletion): its path and
    /// name.
    fn lock(&self, volume: &str, kind: u8) -> io::Result<(String, String)> {
        let name = format!(
            "lock-{}",
            &sha512_hex(format!("{volume}{}", unix_nanos()).as_bytes())[..16]
        );
        let path = format!("{}/locks/{name}.lck", self.volume_key(volume));
        self.save_lock(&path, &name, kind)?;
        Ok((path, name))
    }

    fn save_lock(&self, path: &str, name: &str, kind: u8) -> io::Result<()> {
        self.write(
            path,
            format!("{{\"Name\":\"{name}\",\"Type\":{kind},\"Acquired\":true}}").as_bytes(),
        )
    }

    fn unlock(&self, lock: &str) {
        if let Err(e) = self.driver.remove(lock) {
            tracing::warn!(%lock, error = %e, "cannot remove a backupstore lock; it expires in 150 s");
        }
    }

    /// Runs `work` holding a lock of `kind` on the volume: fails at once when another process
    /// holds a fresh lock of the other kind (deletions exclude backups and restores), and saves
    /// the lock again every [`LOCK_REFRESH`] so that long work never outlives it.
    fn with_lock<T>(
        &self,
        volume: &str,
        kind: u8,
        work: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        let (lock, name) = self
            .lock(volume, kind)
            .map_err(|e| format!("taking the lock of {volume} in {}: {e}", self.url))?;
        let result = self
            .no_conflicting_locks(volume, &lock, kind)
            .and_then(|()| {
                let (stop, stopped) = std::sync::mpsc::channel::<()>();
                let (lock, name) = (&lock, &name);
                std::thread::scope(|scope| {
                    scope.spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(LOCK_REFRESH)
                    {
                        if let Err(e) = self.save_lock(lock, name, kind) {
                            tracing::warn!(%lock, error = %e, "cannot refresh a backupstore lock");
                        }
                    }
                });
                    let result = work();
                    drop(stop);
                    result
                })
            });
        self.unlock(&lock);
        result
    }

    /// Fails when another process holds a fresh lock that excludes one of `kind`.
    fn no_conflicting_locks(&self, volume: &str, own: &str, kind: u8) -> Result<(), String> {
        let other = if kind == 2 { 1 } else { 2 };
        let dir = format!("{}/locks", self.volume_key(volume));
        for file in self.list_dir(&dir)? {
            let path = driver::join(&dir, &file);
            if path == own || !file.ends_with(".lck") {
                continue;
            }
            let fresh = self
                .driver
                .modified(&path)
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < LOCK_EXPIRY);
            let held = self
                .driver
                .read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("Type").and_then(serde_json::Value::as_u64));
            if fresh && held == Some(other) {
                let holder = if other == 1 {
                    "a backup or restore"
                } else {
                    "a deletion"
                };
                return Err(format!(
                    "failed lock {own} type {kind} acquisition: {holder} holds {volume} ({path}); try again when it ends (a lock its holder stopped refreshing expires after 150 s)"
                ));
            }
        }
        Ok(())
    }

    /// `DeleteDeltaBlockBackup`: the cfg first, then blocks no remaining backup references
    /// (skipped while a remaining backup is in progress or unreadable), under a deletion lock.
    pub fn remove_backup(&self, volume: &str, backup: &str) -> Result<(), String> {
        let guard = volume_guard(&format!("{}/{}", self.url, self.volume_key(volume)));
        let _held = guard.lock().unwrap_or_else(|p| p.into_inner());
        self.with_lock(volume, 2, || self.remove_backup_locked(volume, backup))
    }

    fn remove_backup_locked(&self, volume: &str, backup: &str) -> Result<(), String> {
        let cfg_path = self.backup_cfg_key(volume, backup);
        self.driver
            .remove(&cfg_path)
            .map_err(|e| format!("removing {cfg_path}: {e}"))?;
        let vol_path = self.volume_cfg_key(volume);
        let mut vcfg: VolumeCfg = self
            .read_cfg(&vol_path)
            .map_err(|e| format!("Cannot find volume in backupstore due to: {e}"))?;
        let was_last = vcfg.last_backup_name == backup;
        if was_last {
            vcfg.last_backup_name.clear();
            vcfg.last_backup_at.clear();
        }
        let remaining = self.backup_names(volume)?;
        let mut referenced = HashSet::new();
        let mut safe = true;
        let mut newest: Option<(String, String)> = None;
        for name in &remaining {
            match self.read_cfg::<BackupCfg>(&self.backup_cfg_key(volume, name)) {
                Ok(b) if !b.created_time.is_empty() => {
                    if newest
                        .as_ref()
                        .is_none_or(|(_, at)| b.snapshot_created_at > *at)
                    {
                        newest = Some((b.name.clone(), b.snapshot_created_at.clone()));
                    }
                    referenced.extend(b.blocks.into_iter().map(|r| r.block_checksum));
                }
                _ => safe = false,
            }
        }
        if was_last && safe {
            if let Some((name, at)) = newest {
                vcfg.last_backup_name = name;
                vcfg.last_backup_at = at;
            }
        }
        let save = |cfg: &VolumeCfg| {
            to_json(cfg)
                .and_then(|json| self.write(&vol_path, &json))
                .map_err(|e| format!("saving {vol_path}: {e}"))
        };
        save(&vcfg)?;
        if !safe || self.backup_names(volume)? != remaining {
            return Ok(());
        }
        let blocks_dir = format!("{}/blocks", self.volume_key(volume));
        let mut present = 0i64;
        let files = self
            .driver
            .walk(&blocks_dir)
            .map_err(|e| format!("listing {blocks_dir}: {e}"))?;
        for file in files {
            let Some(sum) = file.rsplit('/').next().and_then(|f| f.strip_suffix(".blk")) else {
                continue;
            };
            if referenced.contains(sum) {
                present += 1;
            } else {
                let path = driver::join(&blocks_dir, &file);
                self.driver
                    .remove(&path)
                    .map_err(|e| format!("removing block {path}: {e}"))?;
            }
        }
        vcfg.block_count = present.to_string();
        save(&vcfg)
    }

    /// `DeleteBackupVolume`: everything of the volume, then its empty parent directories.
    pub fn remove_volume(&self, volume: &str) -> Result<(), String> {
        if !valid_name(volume) {
            return Err(format!("invalid backup volume name {volume}"));
        }
        let dir = self.volume_key(volume);
        let guard = volume_guard(&format!("{}/{dir}", self.url));
        let _held = guard.lock().unwrap_or_else(|p| p.into_inner());
        if self.list_dir(&dir)?.is_empty() {
            return Ok(());
        }
        self.with_lock(volume, 2, || {
            self.driver
                .remove(&dir)
                .map_err(|e| format!("removing {dir}: {e}"))
        })
    }

    /// `backupstore/volumes/<h1>/<h2>/<volume>`, relative to the target's root.
    pub fn volume_key(&self, volume: &str) -> String {
        let h = sha512_hex(volume.as_bytes());
        format!("backupstore/volumes/{}/{}/{volume}", &h[0..2], &h[2..4])
    }

    /// The volume's directory on a vfs or nfs target (on S3: its key as a relative path).
    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        self.driver
            .local_root()
            .unwrap_or(Path::new(""))
            .join(self.volume_key(volume))
    }

    fn volume_cfg_key(&self, volume: &str) -> String {
        format!("{}/volume.cfg", self.volume_key(volume))
    }

    fn backup_cfg_key(&self, volume: &str, backup: &str) -> String {
        format!("{}/backups/backup_{backup}.cfg", self.volume_key(volume))
    }

    fn block_key(&self, volume: &str, checksum: &str) -> String {
        format!(
            "{}/blocks/{}/{}/{checksum}.blk",
            self.volume_key(volume),
            &checksum[0..2],
            &checksum[2..4]
        )
    }

    fn load<T: serde::de::DeserializeOwned>(&self, path: &str) -> io::Result<T> {
        let text = self.driver.read(path)?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn load_volume(&self, volume: &str) -> io::Result<VolumeCfg> {
        self.load(&self.volume_cfg_key(volume))
    }

    pub fn load_backup(&self, volume: &str, backup: &str) -> io::Result<BackupCfg> {
        self.load(&self.backup_cfg_key(volume, backup))
    }

    /// Writes one backup (the volume as of a snapshot) with a lock held: a placeholder cfg
    /// first, then the blocks (new ones only, unless `backup-mode: full`), `concurrent_limit` at
    /// a time, compressed with the volume's method, then the cfg and volume.cfg. `progress` is
    /// told the percentage as blocks are written. Returns whether the backup is incremental.
    pub fn write_backup(
        &self,
        b: &NewBackup<'_>,
        mut progress: impl FnMut(i32),
    ) -> io::Result<bool> {
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        if !valid_name(b.volume) || !valid_name(b.backup) {
            return Err(invalid(format!(
                "invalid volume {:?} or backup {:?} name",
                b.volume, b.backup
            )));
        }
        let block_size = block_size_of(Some(&b.parameters)).map_err(invalid)?;
        let requested = Compression::parse(match b.compression_method {
            "" => "lz4",
            m => m,
        })
        .map_err(invalid)?;
        let full = b
            .parameters
            .get(BACKUP_MODE_PARAMETER)
            .is_some_and(|m| m == "full");
        let mut write = || -> io::Result<bool> {
            let placeholder = BackupCfg {
                name: b.backup.into(),
                volume_name: b.volume.into(),
                size: "0".into(),
                ..Default::default()
            };
            self.write(
                &self.backup_cfg_key(b.volume, b.backup),
                &to_json(&placeholder)?,
            )?;
            let mut cfg = self.load_volume(b.volume).unwrap_or_else(|_| VolumeCfg {
                name: b.volume.into(),
                created_time: b.now.into(),
                block_count: "0".into(),
                compression_method: double_quoted(requested.name()),
                ..Default::default()
            });
            // The method of the volume's first backup sticks, as in Longhorn.
            let compression =
                Compression::parse(&unquote(&cfg.compression_method)).map_err(io::Error::other)?;
            let incremental = !full
                && !cfg.last_backup_name.is_empty()
                && self.load_backup(b.volume, &cfg.last_backup_name).is_ok();

            let chunks: Vec<(usize, &[u8])> = b
                .data
                .chunks(block_size)
                .enumerate()
                .filter(|(_, c)| c.iter().any(|x| *x != 0))
                .collect();
            let uploaded = self.upload_blocks(
                b.volume,
                &chunks,
                block_size,
                compression,
                full,
                b.concurrent_limit,
                &mut progress,
            )?;
            let labels = (!b.labels.is_empty()).then(|| b.labels.clone());
            let done = BackupCfg {
                name: b.backup.into(),
                volume_name: b.volume.into(),
                snapshot_name: b.snapshot.into(),
                snapshot_created_at: b.snapshot_created_at.into(),
                created_time: b.now.into(),
                size: ((uploaded.blocks.len() * block_size) as i64).to_string(),
                labels: labels.clone(),
                parameters: (!b.parameters.is_empty()).then(|| b.parameters.clone()),
                is_incremental: incremental,
                compression_method: compression.name().into(),
                newly_uploaded_data_size: uploaded.new_bytes.to_string(),
                re_uploaded_data_size: uploaded.re_uploaded_bytes.to_string(),
                blocks: uploaded.blocks,
                single_file: SingleFile::default(),
            };
            self.write(&self.backup_cfg_key(b.volume, b.backup), &to_json(&done)?)?;
            cfg.size = b.size.to_string();
            cfg.labels = labels;
            cfg.last_backup_name = b.backup.into();
            cfg.last_backup_at = b.snapshot_created_at.into();
            cfg.block_count =
                (cfg.block_count.parse::<i64>().unwrap_or(0) + uploaded.new_blocks).to_string();
            cfg.backing_image_name = double_quoted(b.backing_image.0);
            cfg.backing_image_checksum = double_quoted(b.backing_image.1);
            cfg.storage_class_name = double_quoted(b.storage_class_name);
            cfg.data_engine = double_quoted("v1");
            self.write(&self.volume_cfg_key(b.volume), &to_json(&cfg)?)?;
            progress(100);
            Ok(incremental)
        };
        self.with_lock(b.volume, 1, || write().map_err(|e| e.to_string()))
            .map_err(io::Error::other)
    }

    /// Writes the blocks of `chunks` (index, bytes) with `workers` threads; a block the
    /// target already has is skipped unless `again` (a full backup).
    #[allow(clippy::too_many_arguments)]
    fn upload_blocks(
        &self,
        volume: &str,
        chunks: &[(usize, &[u8])],
        block_size: usize,
        compression: Compression,
        again: bool,
        workers: usize,
        progress: &mut impl FnMut(i32),
    ) -> io::Result<Uploaded> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let next = AtomicUsize::new(0);
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<(BlockRef, Written)>>();
        let mut out = Uploaded::default();
        std::thread::scope(|scope| {
            for _ in 0..workers.clamp(1, 64) {
                let tx = tx.clone();
                let next = &next;
                scope.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((index, chunk)) = chunks.get(i) else {
                        break;
                    };
                    let result = (|| {
                        let mut block = chunk.to_vec();
                        block.resize(block_size, 0);
                        let checksum = sha512_hex(&block)[..64].to_string();
                        let path = self.block_key(volume, &checksum);
                        let existed = self.driver.exists(&path)?;
                        let written = match (existed, again) {
                            (true, false) => Written::Skipped,
                            (existed, _) => {
                                self.write(&path, &compression.compress(&block)?)?;
                                if existed {
                                    Written::Again(block.len())
                                } else {
                                    Written::New(block.len())
                                }
                            }
                        };
                        let reference = BlockRef {
                            offset: (*index * block_size) as i64,
                            block_checksum: checksum,
                        };
                        Ok((reference, written))
                    })();
                    let failed = result.is_err();
                    if tx.send(result).is_err() || failed {
                        break;
                    }
                });
            }
            drop(tx);
            let mut first_error = None;
            for (n, result) in rx.iter().enumerate() {
                match result {
                    Ok((reference, written)) => {
                        match written {
                            Written::Again(n) => out.re_uploaded_bytes += n as i64,
                            Written::New(n) => {
                                out.new_bytes += n as i64;
                                out.new_blocks += 1;
                            }
                            Written::Skipped => {}
                        }
                        out.blocks.push(reference);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
                progress(((n + 1) * 100 / chunks.len().max(1)).min(99) as i32);
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })?;
        out.blocks.sort_by_key(|b| b.offset);
        Ok(out)
    }

    /// One block of a backup, decompressed and checked against its checksum.
    pub fn read_block(
        &self,
        volume: &str,
        block: &BlockRef,
        compression: Compression,
        block_size: usize,
    ) -> io::Result<Vec<u8>> {
        let packed = self
            .driver
            .read(&self.block_key(volume, &block.block_checksum))?;
        let raw = compression.decompress(&packed, block_size)?;
        if raw.len() > block_size || sha512_hex(&raw)[..64] != block.block_checksum {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("block {} fails its checksum", block.block_checksum),
            ));
        }
        Ok(raw)
    }

    /// A backup's blocks (offset order), its block size and compression, checked: offsets
    /// aligned and below the restore limit, checksums hex. A backup still in progress is an
    /// error.
    pub fn backup_layout(
        &self,
        volume: &str,
        backup: &str,
    ) -> io::Result<(BackupCfg, usize, Compression)> {
        let cfg = self.load_backup(volume, backup)?;
        if cfg.created_time.is_empty() {
            return Err(io::Error::other(format!(
                "backup {backup} of {volume} is still in progress"
            )));
        }
        let block_size = block_size_of(cfg.parameters.as_ref()).map_err(io::Error::other)?;
        let compression = Compression::parse(&cfg.compression_method).map_err(io::Error::other)?;
        for b in &cfg.blocks {
            let aligned = b.offset >= 0 && b.offset % block_size as i64 == 0;
            let named = b.block_checksum.len() >= 4
                && b.block_checksum.bytes().all(|c| c.is_ascii_hexdigit());
            if !aligned || b.offset >= MAX_RESTORE_BYTES || !named {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "backup {backup} of {volume}: block at offset {} ({:?}) is not a {block_size}-byte block below {MAX_RESTORE_BYTES}",
                        b.offset, b.block_checksum
                    ),
                ));
            }
        }
        Ok((cfg, block_size, compression))
    }

    /// Reads a backup back: every block decompressed and its checksum verified.
    pub fn read_backup(&self, volume: &str, backup: &str) -> io::Result<(BackupCfg, Vec<u8>)> {
        let (cfg, block_size, compression) = self.backup_layout(volume, backup)?;
        let end = cfg
            .blocks
            .iter()
            .map(|b| b.offset as usize + block_size)
            .max()
            .unwrap_or(0);
        let mut data = vec![0u8; end];
        for b in &cfg.blocks {
            let raw = self.read_block(volume, b, compression, block_size)?;
            let at = b.offset as usize;
            data[at..at + raw.len()].copy_from_slice(&raw);
        }
        Ok((cfg, data))
    }
}

/// What one block upload did.
enum Written {
    New(usize),
    /// Written again though the target had it (a full backup).
    Again(usize),
    Skipped,
}

/// What [`Target::upload_blocks`] wrote.
#[derive(Debug, Default)]
struct Uploaded {
    blocks: Vec<BlockRef>,
    new_blocks: i64,
    new_bytes: i64,
    re_uploaded_bytes: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backup of `data` to vol1, snapshot taken at `at`, written a second later.
    fn backup_of(t: &Target, name: &str, at: &str, data: &[u8]) -> io::Result<bool> {
        let done = at.replace(":00Z", ":01Z");
        let snapshot = format!("snap-{name}");
        t.write_backup(
            &NewBackup {
                volume: "vol1",
                backup: name,
                snapshot: &snapshot,
                snapshot_created_at: at,
                now: &done,
                size: data.len() as i64,
                compression_method: "gzip",
                concurrent_limit: 1,
                data,
                ..Default::default()
            },
            |_| {},
        )
    }

    #[test]
    fn layout_and_quirks_match_longhorn() {
        // The spec's examples of the <h1>/<h2> fan-out.
        let t = Target::parse(&format!("vfs://{}", std::env::temp_dir().display())).unwrap();
        assert!(t
            .volume_dir("vol1")
            .ends_with("backupstore/volumes/01/9c/vol1"));
        assert!(t
            .volume_dir("pvc-0123abcd-test")
            .ends_with("backupstore/volumes/a7/9b/pvc-0123abcd-test"));
        assert_eq!(double_quoted(""), "\"\"");
        assert_eq!(
            encode_backup_url("vfs:///data/b", "backup-a", "vol1"),
            "vfs:///data/b?backup=backup-a&volume=vol1"
        );
        assert_eq!(
            decode_backup_url("vfs:///data/b?backup=backup-a&volume=vol1")
                .unwrap()
                .1,
            "backup-a"
        );
        assert!(decode_backup_url("vfs:///data/b?volume=x").is_err());
        let cfg = VolumeCfg {
            name: "vol1".into(),
            size: "6291456".into(),
            created_time: "2022-06-01T00:00:00Z".into(),
            last_backup_name: "backup-b".into(),
            last_backup_at: "2022-06-01T02:00:00Z".into(),
            block_count: "3".into(),
            backing_image_name: double_quoted(""),
            backing_image_checksum: double_quoted(""),
            labels: None,
            compression_method: double_quoted("lz4"),
            storage_class_name: double_quoted(""),
            data_engine: double_quoted("v1"),
        };
        assert_eq!(
            String::from_utf8(to_json(&cfg).unwrap()).unwrap(),
            r#"{"Name":"vol1","Size":"6291456","Labels":null,"CreatedTime":"2022-06-01T00:00:00Z","LastBackupName":"backup-b","LastBackupAt":"2022-06-01T02:00:00Z","BlockCount":"3","BackingImageName":"\"\"","BackingImageChecksum":"\"\"","CompressionMethod":"\"lz4\"","StorageClassName":"\"\"","DataEngine":"\"v1\""}"#
        );
    }

    #[test]
    fn each_compression_and_block_size_round_trips_and_the_first_method_sticks() {
        let dir = std::env::temp_dir().join(format!("lhnet-bs-c-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t = Target::parse(&format!("vfs://{}", dir.display())).unwrap();
        let mut data = vec![0u8; 20 << 20];
        for (i, b) in data.iter_mut().enumerate().step_by(4093) {
            *b = (i % 251) as u8 + 1;
        }
        for (i, (method, block, mode)) in [
            ("none", "2097152", "incremental"),
            ("gzip", "2097152", "incremental"),
            ("lz4", "16777216", "full"),
        ]
        .into_iter()
        .enumerate()
        {
            let volume = format!("vol-{method}");
            let parameters = BTreeMap::from([
                (BLOCK_SIZE_PARAMETER.to_string(), block.to_string()),
                (BACKUP_MODE_PARAMETER.to_string(), mode.to_string()),
            ]);
            for (n, asked) in [method, "gzip"].into_iter().enumerate() {
                let name = format!("backup-{i}-{n}");
                let incremental = t
                    .write_backup(
                        &NewBackup {
                            volume: &volume,
                            backup: &name,
                            snapshot: "s",
                            snapshot_created_at: "2026-12-01T00:00:00Z",
                            now: "2026-12-01T00:00:01Z",
                            size: data.len() as i64,
                            compression_method: asked,
                            parameters: parameters.clone(),
                            concurrent_limit: 3,
                            data: &data,
                            ..Default::default()
                        },
                        |_| {},
                    )
                    .unwrap();
                assert_eq!(incremental, n == 1 && mode == "incremental", "{name}");
                let (cfg, back) = t.read_backup(&volume, &name).unwrap();
                assert_eq!(
                    cfg.compression_method, method,
                    "the volume's first method sticks"
                );
                assert_eq!(&back[..data.len()], &data[..], "{name}");
                let size: usize = block.parse().unwrap();
                assert!(cfg
                    .blocks
                    .iter()
                    .all(|b| (b.offset as usize).is_multiple_of(size)));
                if mode == "full" && n == 1 {
                    assert_eq!(cfg.newly_uploaded_data_size, "0");
                    assert_ne!(
                        cfg.re_uploaded_data_size, "0",
                        "a full backup writes every block again"
                    );
                }
            }
        }
        assert!(Compression::parse("zstd").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn backups_round_trip_and_share_blocks() {
        let dir = std::env::temp_dir().join(format!("lhnet-bs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Target::parse(&format!("vfs://{}/missing", dir.display()))
            .unwrap_err()
            .contains("cannot find directory"));
        let t = Target::parse(&format!("vfs://{}", dir.display())).unwrap();
        let mut data = vec![0u8; 3 * BLOCK_SIZE];
        data[10] = 1;
        data[2 * BLOCK_SIZE + 5] = 2;
        let inc = backup_of(&t, "backup-a", "2022-06-01T00:00:00Z", &data).unwrap();
        assert!(!inc);
        let inc = backup_of(&t, "backup-b", "2022-06-01T01:00:00Z", &data).unwrap();
        assert!(inc);
        let cfg = t.load_volume("vol1").unwrap();
        assert_eq!(
            (cfg.last_backup_name.as_str(), cfg.block_count.as_str()),
            ("backup-b", "2")
        );
        let (b, read) = t.read_backup("vol1", "backup-b").unwrap();
        assert_eq!(b.blocks.len(), 2);
        assert_eq!(&read[..data.len()], &data[..]);
        // The lock is gone, and with it the locks directory (empty parents are removed).
        assert!(
            !t.volume_dir("vol1").join("locks").exists(),
            "lock left behind"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn deletions_and_backups_exclude_each_other_and_old_cfgs_read() {
        let dir = std::env::temp_dir().join(format!("lhnet-bs-locks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Target::parse(&format!("vfs://{}", dir.display())).unwrap();
        let data = vec![1u8; BLOCK_SIZE];
        backup_of(&t, "backup-a", "2022-06-01T00:00:00Z", &data).unwrap();
        let locks = t.volume_dir("vol1").join("locks");
        std::fs::create_dir_all(&locks).unwrap();
        // Another process's deletion: a backup may not start.
        let other = locks.join("lock-0000000000000002.lck");
        std::fs::write(
            &other,
            r#"{"Name":"lock-0000000000000002","Type":2,"Acquired":true}"#,
        )
        .unwrap();
        let err = backup_of(&t, "backup-b", "2022-06-01T01:00:00Z", &data)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("type 1 acquisition: a deletion holds vol1"),
            "{err}"
        );
        // Another process's backup: a deletion may not start.
        std::fs::write(
            &other,
            r#"{"Name":"lock-0000000000000002","Type":1,"Acquired":true}"#,
        )
        .unwrap();
        let err = t.remove_backup("vol1", "backup-a").unwrap_err();
        assert!(
            err.contains("type 2 acquisition: a backup or restore holds vol1"),
            "{err}"
        );
        assert!(t.load_backup("vol1", "backup-a").is_ok(), "removed anyway");
        std::fs::remove_file(&other).unwrap();
        t.remove_backup("vol1", "backup-a").unwrap();

        // A cfg from an older writer, keys missing: read as empty values, as Go does.
        let old = r#"{"Name":"vol2","Size":"2097152","CreatedTime":"2021-01-01T00:00:00Z","LastBackupName":"","LastBackupAt":"","BlockCount":"0"}"#;
        let vdir = t.volume_dir("vol2");
        std::fs::create_dir_all(&vdir).unwrap();
        std::fs::write(vdir.join("volume.cfg"), old).unwrap();
        let v = t.inspect_volume("vol2").unwrap();
        assert_eq!((v.size, v.backing_image_name.as_str()), (2097152, ""));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
