//! The simulator's backups, written in Longhorn's own backupstore layout (library of 2021-11,
//! Longhorn 1.3): `backupstore/volumes/<h1>/<h2>/<volume>/{volume.cfg, backups/, blocks/, locks/}`,
//! gzip 2 MiB blocks named by SHA-512, cfg JSON with Longhorn's string-typed and double-quoted
//! fields. Only `vfs://` targets (a local directory), which is what the tests use.

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

/// A `vfs:///dir` backup target.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    root: PathBuf,
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
        let dir = url.strip_prefix("vfs://").ok_or_else(|| {
            format!("backup target {url}: the simulator writes vfs:///DIR targets only")
        })?;
        if !dir.starts_with('/') {
            return Err(format!(
                "backup target {url}: vfs needs an absolute directory (vfs:///DIR)"
            ));
        }
        Ok(Target {
            url: url.trim_end_matches('/').to_string(),
            root: PathBuf::from(dir),
        })
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
