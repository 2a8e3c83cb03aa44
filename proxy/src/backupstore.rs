//! Longhorn's backupstore on storage (library of 2021-11, Longhorn 1.3):
//! `backupstore/volumes/<h1>/<h2>/<volume>/{volume.cfg, backups/, blocks/, locks/}`, gzip 2 MiB
//! blocks named by SHA-512, cfg JSON with Longhorn's string-typed and double-quoted fields
//! (`spec/longhorn-backupstore-bim.md` §2). lhnet reads it to serve the backup-target RPCs
//! (list, inspect, config metadata, remove); the simulator writes its backups with it.
//!
//! Drivers: `vfs:///DIR` (a local directory) and `nfs://HOST:/PATH` as an already mounted
//! directory under the mount root (`/var/lib/longhorn-backupstore-mounts/<host>/<path>`, as
//! Longhorn mounts it). `s3://` is not built yet.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

pub const BLOCK_SIZE: usize = 2 * 1024 * 1024;

/// `volume.cfg`, keys in Longhorn's order.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// `backups/backup_<name>.cfg`, keys in Longhorn's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct BackupCfg {
    pub name: String,
    pub volume_name: String,
    pub snapshot_name: String,
    pub snapshot_created_at: String,
    /// Empty while the backup is in progress.
    pub created_time: String,
    pub size: String,
    pub labels: Option<BTreeMap<String, String>>,
    pub is_incremental: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<BlockRef>,
    pub single_file: SingleFile,
}

/// A backup target on a directory: `vfs:///DIR`, or `nfs://HOST:/PATH` mounted under
/// [`NFS_MOUNT_ROOT`].
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    root: PathBuf,
}

/// Where Longhorn mounts NFS targets (`<root>/<host with '.'→'_', no ':'>/<path>`).
pub const NFS_MOUNT_ROOT: &str = "/var/lib/longhorn-backupstore-mounts";

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
fn volume_guard(dir: &Path) -> std::sync::Arc<std::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static GUARDS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let guards = GUARDS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = guards.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(dir.to_path_buf()).or_default().clone()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
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

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = PathBuf::from(format!("{}.tmp.{nanos}", path.display()));
    fs::write(&tmp, bytes)?;
    fs::rename(tmp, path)
}

fn to_json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        Target::parse_with(url, Path::new(NFS_MOUNT_ROOT))
    }

    /// As [`Target::parse`], with NFS targets looked up under `nfs_root`.
    pub fn parse_with(url: &str, nfs_root: &Path) -> Result<Target, String> {
        let url = url.split('?').next().unwrap_or(url);
        if let Some(dir) = url.strip_prefix("vfs://") {
            if !dir.starts_with('/') {
                return Err(format!(
                    "backup target {url}: vfs needs an absolute directory (vfs:///DIR)"
                ));
            }
            return Ok(Target {
                url: url.trim_end_matches('/').to_string(),
                root: PathBuf::from(dir),
            });
        }
        if let Some(rest) = url.strip_prefix("nfs://") {
            let (host, path) = rest
                .split_once(":/")
                .ok_or_else(|| format!("backup target {url}: write nfs://HOST:/PATH"))?;
            if host.is_empty() || path.trim_matches('/').is_empty() {
                return Err(format!("backup target {url}: write nfs://HOST:/PATH"));
            }
            let mount = nfs_root.join(host.replace('.', "_")).join(path);
            if !mount.is_dir() {
                return Err(format!(
                    "backup target {url}: cannot find its mount at {} (mount the export there)",
                    mount.display()
                ));
            }
            return Ok(Target {
                url: url.trim_end_matches('/').to_string(),
                root: mount,
            });
        }
        let scheme = url.split("://").next().unwrap_or(url);
        Err(format!(
            "Driver {scheme} is not supported! (lhnet reads vfs:///DIR and mounted nfs://HOST:/PATH targets)"
        ))
    }

    fn store(&self) -> PathBuf {
        self.root.join("backupstore")
    }

    fn display(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| path.display().to_string())
    }

    fn not_found(&self, path: &Path) -> String {
        format!("cannot find {} in backupstore", self.display(path))
    }

    fn read_cfg<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<T, String> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(path)),
            Err(e) => return Err(format!("reading {}: {e}", self.display(path))),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a valid cfg: {e}", self.display(path)))
    }

    /// Every backup volume name (`volumes/*/*/*`); a bad name fails the list, as in Longhorn.
    pub fn volume_names(&self) -> Result<Vec<String>, String> {
        let mut names = Vec::new();
        let dirs = |p: &Path| -> Result<Vec<PathBuf>, String> {
            match fs::read_dir(p) {
                Ok(entries) => Ok(entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(format!("listing {}: {e}", self.display(p))),
            }
        };
        for h1 in dirs(&self.store().join("volumes"))? {
            for h2 in dirs(&h1)? {
                for v in dirs(&h2)? {
                    let name = v
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
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
        let dir = self.volume_dir(volume).join("backups");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("listing {}: {e}", self.display(&dir))),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
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
                    return Err(format!("invalid volume name {v}"));
                }
                vec![v.to_string()]
            }
            None => self.volume_names()?,
        };
        let mut out = BTreeMap::new();
        for name in names {
            let mut info = VolumeInfo::default();
            let cfg_path = self.volume_dir(&name).join("volume.cfg");
            if let Err(e) = self.read_cfg::<VolumeCfg>(&cfg_path) {
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
        let cfg: VolumeCfg = self.read_cfg(&self.volume_dir(volume).join("volume.cfg"))?;
        Ok(VolumeInfo {
            name: cfg.name,
            size: cfg.size.parse().unwrap_or(0),
            labels: cfg.labels.unwrap_or_default(),
            created: cfg.created_time,
            last_backup_name: cfg.last_backup_name,
            last_backup_at: cfg.last_backup_at,
            data_stored: cfg.block_count.parse::<i64>().unwrap_or(0) * BLOCK_SIZE as i64,
            messages: BTreeMap::new(),
            backups: Vec::new(),
            backing_image_name: unquote(&cfg.backing_image_name),
            backing_image_checksum: unquote(&cfg.backing_image_checksum),
        })
    }

    /// `InspectBackup`: a backup still in progress is an error that says so.
    pub fn inspect_backup(&self, volume: &str, backup: &str) -> Result<BackupInfo, String> {
        let v: VolumeCfg = self.read_cfg(&self.volume_dir(volume).join("volume.cfg"))?;
        let b: BackupCfg = self.read_cfg(&self.backup_cfg_path(volume, backup))?;
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
    pub fn config_mtime(
        &self,
        volume: &str,
        backup: Option<&str>,
    ) -> Result<std::time::SystemTime, String> {
        let path = match backup {
            Some(b) => self.backup_cfg_path(volume, b),
            None => self.volume_dir(volume).join("volume.cfg"),
        };
        fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(|_| self.not_found(&path))
    }

    fn lock(&self, volume: &str, kind: u8) -> io::Result<PathBuf> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "lock-{}",
            &sha512_hex(format!("{volume}{nanos}").as_bytes())[..16]
        );
        let path = self
            .volume_dir(volume)
            .join("locks")
            .join(format!("{name}.lck"));
        write_atomic(
            &path,
            format!("{{\"Name\":\"{name}\",\"Type\":{kind},\"Acquired\":true}}").as_bytes(),
        )?;
        Ok(path)
    }

    /// Fails when another process holds a backup or restore lock (type 1) on the volume.
    fn no_backup_locks(&self, volume: &str, own: &Path) -> Result<(), String> {
        let dir = self.volume_dir(volume).join("locks");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            if path == own || path.extension().is_none_or(|x| x != "lck") {
                continue;
            }
            let fresh = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < std::time::Duration::from_secs(150));
            let kind = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("Type").and_then(serde_json::Value::as_u64));
            if fresh && kind == Some(1) {
                return Err(format!(
                    "failed lock {} type 2 acquisition: a backup or restore holds the volume",
                    self.display(&path)
                ));
            }
        }
        Ok(())
    }

    /// `DeleteDeltaBlockBackup`: the cfg first, then blocks no remaining backup references
    /// (skipped while a remaining backup is in progress or unreadable), under a deletion lock.
    pub fn remove_backup(&self, volume: &str, backup: &str) -> Result<(), String> {
        let guard = volume_guard(&self.volume_dir(volume));
        let _held = guard.lock().unwrap_or_else(|p| p.into_inner());
        let lock = self
            .lock(volume, 2)
            .map_err(|e| format!("taking the deletion lock of {volume}: {e}"))?;
        let result = self
            .no_backup_locks(volume, &lock)
            .and_then(|()| self.remove_backup_locked(volume, backup));
        let _ = fs::remove_file(&lock);
        result
    }

    fn remove_backup_locked(&self, volume: &str, backup: &str) -> Result<(), String> {
        let cfg_path = self.backup_cfg_path(volume, backup);
        match fs::remove_file(&cfg_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", self.display(&cfg_path))),
        }
        let vol_path = self.volume_dir(volume).join("volume.cfg");
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
            match self.read_cfg::<BackupCfg>(&self.backup_cfg_path(volume, name)) {
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
        write_atomic(&vol_path, &to_json(&vcfg).map_err(|e| e.to_string())?)
            .map_err(|e| format!("saving {}: {e}", self.display(&vol_path)))?;
        if !safe || self.backup_names(volume)? != remaining {
            return Ok(());
        }
        let blocks_dir = self.volume_dir(volume).join("blocks");
        let mut present = 0i64;
        for c1 in fs::read_dir(&blocks_dir).into_iter().flatten().flatten() {
            for c2 in fs::read_dir(c1.path()).into_iter().flatten().flatten() {
                for blk in fs::read_dir(c2.path()).into_iter().flatten().flatten() {
                    let file = blk.file_name().to_string_lossy().into_owned();
                    let Some(sum) = file.strip_suffix(".blk") else {
                        continue;
                    };
                    if referenced.contains(sum) {
                        present += 1;
                    } else {
                        fs::remove_file(blk.path()).map_err(|e| {
                            format!("removing block {}: {e}", self.display(&blk.path()))
                        })?;
                    }
                }
            }
        }
        vcfg.block_count = present.to_string();
        write_atomic(&vol_path, &to_json(&vcfg).map_err(|e| e.to_string())?)
            .map_err(|e| format!("saving {}: {e}", self.display(&vol_path)))
    }

    /// `DeleteBackupVolume`: everything of the volume, then its empty parent directories.
    pub fn remove_volume(&self, volume: &str) -> Result<(), String> {
        if !valid_name(volume) {
            return Err(format!("invalid backup volume name {volume}"));
        }
        let dir = self.volume_dir(volume);
        let guard = volume_guard(&dir);
        let _held = guard.lock().unwrap_or_else(|p| p.into_inner());
        if !dir.exists() {
            return Ok(());
        }
        let lock = self
            .lock(volume, 2)
            .map_err(|e| format!("taking the deletion lock of {volume}: {e}"))?;
        if let Err(e) = self.no_backup_locks(volume, &lock) {
            let _ = fs::remove_file(&lock);
            return Err(e);
        }
        for sub in ["backups", "blocks", "locks"] {
            let p = dir.join(sub);
            if p.exists() {
                fs::remove_dir_all(&p)
                    .map_err(|e| format!("removing {}: {e}", self.display(&p)))?;
            }
        }
        fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", self.display(&dir)))?;
        let mut parent = dir.parent();
        for _ in 0..2 {
            let Some(p) = parent else { break };
            if fs::remove_dir(p).is_err() {
                break;
            }
            parent = p.parent();
        }
        Ok(())
    }

    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        let h = sha512_hex(volume.as_bytes());
        self.root
            .join("backupstore/volumes")
            .join(&h[0..2])
            .join(&h[2..4])
            .join(volume)
    }

    fn backup_cfg_path(&self, volume: &str, backup: &str) -> PathBuf {
        self.volume_dir(volume)
            .join("backups")
            .join(format!("backup_{backup}.cfg"))
    }

    fn block_path(&self, volume: &str, checksum: &str) -> PathBuf {
        self.volume_dir(volume)
            .join("blocks")
            .join(&checksum[0..2])
            .join(&checksum[2..4])
            .join(format!("{checksum}.blk"))
    }

    pub fn load_volume(&self, volume: &str) -> io::Result<VolumeCfg> {
        let text = fs::read(self.volume_dir(volume).join("volume.cfg"))?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn load_backup(&self, volume: &str, backup: &str) -> io::Result<BackupCfg> {
        let text = fs::read(self.backup_cfg_path(volume, backup))?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Writes one backup of `data` (the volume as of the snapshot) with a lock held, a
    /// placeholder cfg first, new blocks only, then the cfg and volume.cfg. `progress` is told
    /// the percentage as blocks are written.
    #[allow(clippy::too_many_arguments)]
    pub fn write_backup(
        &self,
        volume: &str,
        backup: &str,
        snapshot: &str,
        snapshot_created_at: &str,
        now: &str,
        size: i64,
        labels: BTreeMap<String, String>,
        backing_image: (&str, &str),
        data: &[u8],
        mut progress: impl FnMut(i32),
    ) -> io::Result<bool> {
        if !valid_name(volume) || !valid_name(backup) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid volume {volume:?} or backup {backup:?} name"),
            ));
        }
        let dir = self.volume_dir(volume);
        let lock_name = format!(
            "lock-{}",
            &sha512_hex(format!("{backup}{now}").as_bytes())[..16]
        );
        let lock = dir.join("locks").join(format!("{lock_name}.lck"));
        write_atomic(
            &lock,
            format!("{{\"Name\":\"{lock_name}\",\"Type\":1,\"Acquired\":true}}").as_bytes(),
        )?;
        let result = (|| {
            let placeholder = BackupCfg {
                name: backup.into(),
                volume_name: volume.into(),
                snapshot_name: String::new(),
                snapshot_created_at: String::new(),
                created_time: String::new(),
                size: "0".into(),
                labels: None,
                is_incremental: false,
                blocks: vec![],
                single_file: SingleFile::default(),
            };
            write_atomic(
                &self.backup_cfg_path(volume, backup),
                &to_json(&placeholder)?,
            )?;
            let mut cfg = self.load_volume(volume).unwrap_or_else(|_| VolumeCfg {
                name: volume.into(),
                created_time: now.into(),
                block_count: "0".into(),
                backing_image_name: double_quoted(""),
                backing_image_checksum: double_quoted(""),
                ..Default::default()
            });
            let incremental = !cfg.last_backup_name.is_empty()
                && self.load_backup(volume, &cfg.last_backup_name).is_ok();

            let chunks: Vec<(usize, &[u8])> = data
                .chunks(BLOCK_SIZE)
                .enumerate()
                .filter(|(_, c)| c.iter().any(|b| *b != 0))
                .collect();
            let mut blocks = Vec::new();
            let mut new_blocks = 0i64;
            for (n, (i, chunk)) in chunks.iter().enumerate() {
                let mut block = chunk.to_vec();
                block.resize(BLOCK_SIZE, 0);
                let checksum = sha512_hex(&block)[..64].to_string();
                let path = self.block_path(volume, &checksum);
                if !path.exists() {
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                    gz.write_all(&block)?;
                    write_atomic(&path, &gz.finish()?)?;
                    new_blocks += 1;
                }
                blocks.push(BlockRef {
                    offset: (*i * BLOCK_SIZE) as i64,
                    block_checksum: checksum,
                });
                progress(((n + 1) * 100 / chunks.len().max(1)) as i32);
            }
            let labels = if labels.is_empty() {
                None
            } else {
                Some(labels)
            };
            let full = BackupCfg {
                name: backup.into(),
                volume_name: volume.into(),
                snapshot_name: snapshot.into(),
                snapshot_created_at: snapshot_created_at.into(),
                created_time: now.into(),
                size: ((blocks.len() * BLOCK_SIZE) as i64).to_string(),
                labels: labels.clone(),
                is_incremental: incremental,
                blocks,
                single_file: SingleFile::default(),
            };
            write_atomic(&self.backup_cfg_path(volume, backup), &to_json(&full)?)?;
            cfg.size = size.to_string();
            cfg.labels = labels;
            cfg.last_backup_name = backup.into();
            cfg.last_backup_at = snapshot_created_at.into();
            cfg.block_count =
                (cfg.block_count.parse::<i64>().unwrap_or(0) + new_blocks).to_string();
            cfg.backing_image_name = double_quoted(backing_image.0);
            cfg.backing_image_checksum = double_quoted(backing_image.1);
            write_atomic(&dir.join("volume.cfg"), &to_json(&cfg)?)?;
            progress(100);
            Ok(incremental)
        })();
        let _ = fs::remove_file(&lock);
        result
    }

    /// Reads a backup back: every block decompressed and its checksum verified.
    pub fn read_backup(&self, volume: &str, backup: &str) -> io::Result<(BackupCfg, Vec<u8>)> {
        let cfg = self.load_backup(volume, backup)?;
        if cfg.created_time.is_empty() {
            return Err(io::Error::other(format!(
                "backup {backup} of {volume} is still in progress"
            )));
        }
        let end = cfg
            .blocks
            .iter()
            .map(|b| b.offset as usize + BLOCK_SIZE)
            .max()
            .unwrap_or(0);
        let mut data = vec![0u8; end];
        let mut seen = HashSet::new();
        for b in &cfg.blocks {
            let mut raw = Vec::new();
            flate2::read::GzDecoder::new(fs::File::open(
                self.block_path(volume, &b.block_checksum),
            )?)
            .read_to_end(&mut raw)?;
            if sha512_hex(&raw)[..64] != b.block_checksum {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "block {} of backup {backup} fails its checksum",
                        b.block_checksum
                    ),
                ));
            }
            seen.insert(b.block_checksum.clone());
            let at = b.offset as usize;
            data[at..at + raw.len().min(BLOCK_SIZE)]
                .copy_from_slice(&raw[..raw.len().min(BLOCK_SIZE)]);
        }
        Ok((cfg, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_quirks_match_longhorn() {
        // The spec's examples of the <h1>/<h2> fan-out.
        let t = Target::parse("vfs:///tmp/x").unwrap();
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
        };
        assert_eq!(
            String::from_utf8(to_json(&cfg).unwrap()).unwrap(),
            r#"{"Name":"vol1","Size":"6291456","Labels":null,"CreatedTime":"2022-06-01T00:00:00Z","LastBackupName":"backup-b","LastBackupAt":"2022-06-01T02:00:00Z","BlockCount":"3","BackingImageName":"\"\"","BackingImageChecksum":"\"\""}"#
        );
    }

    #[test]
    fn backups_round_trip_and_share_blocks() {
        let dir = std::env::temp_dir().join(format!("lhnet-bs-{}", std::process::id()));
        let t = Target::parse(&format!("vfs://{}", dir.display())).unwrap();
        let mut data = vec![0u8; 3 * BLOCK_SIZE];
        data[10] = 1;
        data[2 * BLOCK_SIZE + 5] = 2;
        let inc = t
            .write_backup(
                "vol1",
                "backup-a",
                "s1",
                "2022-06-01T00:00:00Z",
                "2022-06-01T00:00:01Z",
                6291456,
                BTreeMap::new(),
                ("", ""),
                &data,
                |_| {},
            )
            .unwrap();
        assert!(!inc);
        let inc = t
            .write_backup(
                "vol1",
                "backup-b",
                "s2",
                "2022-06-01T01:00:00Z",
                "2022-06-01T01:00:01Z",
                6291456,
                BTreeMap::new(),
                ("", ""),
                &data,
                |_| {},
            )
            .unwrap();
        assert!(inc);
        let cfg = t.load_volume("vol1").unwrap();
        assert_eq!(
            (cfg.last_backup_name.as_str(), cfg.block_count.as_str()),
            ("backup-b", "2")
        );
        let (b, read) = t.read_backup("vol1", "backup-b").unwrap();
        assert_eq!(b.blocks.len(), 2);
        assert_eq!(&read[..data.len()], &data[..]);
        assert!(
            !t.volume_dir("vol1")
                .join("locks")
                .read_dir()
                .unwrap()
                .any(|_| true),
            "lock left behind"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
