//! Backupstore drivers: where the `backupstore/…` tree lives. Every path handed to a driver is
//! relative to the target's root and `/`-separated (`backupstore/volumes/01/9c/vol1/volume.cfg`),
//! the same on a directory and on S3, as in Longhorn's `BackupStoreDriver`.
//!
//! Drivers are synchronous: the backup-target RPCs and the simulator call them on the blocking
//! pool (a hung NFS server holds a blocking thread, never a runtime worker), and the S3 driver
//! drives its requests on the runtime the target was opened on, lhnet's own (see `s3.rs`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
#[allow(clippy::disallowed_types)]
use std::time::Instant;
use std::time::{Duration, SystemTime};

use crate::endpoints::EndpointPolicy;

/// What the backupstore needs from storage (Longhorn's `BackupStoreDriver`, without the
/// single-file upload and download lhnet does not serve).
pub trait Driver: Send + Sync + std::fmt::Debug {
    /// `vfs`, `nfs` or `s3`.
    fn kind(&self) -> &'static str;
    /// Names directly under `dir` (files and sub-directories alike); a missing `dir` is empty.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// Every file below `dir`, as paths relative to `dir`; a missing `dir` is empty.
    fn walk(&self, dir: &str) -> io::Result<Vec<String>>;
    /// The whole file; `ErrorKind::NotFound` when it is missing.
    fn read(&self, path: &str) -> io::Result<Vec<u8>>;
    /// Replaces the file as a whole: readers see the old or the new bytes, never a part.
    fn write(&self, path: &str, data: &[u8]) -> io::Result<()>;
    fn exists(&self, path: &str) -> io::Result<bool>;
    fn modified(&self, path: &str) -> io::Result<SystemTime>;
    /// Removes a file or a whole tree; missing is fine.
    fn remove(&self, path: &str) -> io::Result<()>;
    /// The local directory behind the target, for drivers that have one.
    fn local_root(&self) -> Option<&Path> {
        None
    }
}

/// `a` + `/` + `b`, either may be empty.
pub fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

/// Nanoseconds since the Unix epoch (temporary file and lock names).
pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A process-wide mutex per key (a volume, a mount directory); keys nobody holds are
/// forgotten, so the map stays as small as what is in use.
pub type KeyedGuards = Mutex<Vec<(String, Arc<Mutex<()>>)>>;

/// The guard of `key` in `guards`, made on first use.
pub fn guard_of(guards: &KeyedGuards, key: &str) -> Arc<Mutex<()>> {
    let mut all = guards.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|(_, g)| Arc::strong_count(g) > 1);
    if let Some((_, g)) = all.iter().find(|(k, _)| k == key) {
        return g.clone();
    }
    let g = Arc::new(Mutex::new(()));
    all.push((key.to_string(), g.clone()));
    g
}

/// `vfs:///DIR`, or an NFS export mounted on a local directory.
#[derive(Debug)]
pub struct FsDriver {
    kind: &'static str,
    root: PathBuf,
}

impl FsDriver {
    pub fn new(kind: &'static str, root: PathBuf) -> FsDriver {
        FsDriver { kind, root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

fn create_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

impl Driver for FsDriver {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        match fs::read_dir(self.path(dir)) {
            Ok(entries) => entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn walk(&self, dir: &str) -> io::Result<Vec<String>> {
        fn visit(base: &Path, at: &Path, out: &mut Vec<String>) -> io::Result<()> {
            let entries = match fs::read_dir(at) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    visit(base, &entry.path(), out)?;
                } else if let Ok(rel) = entry.path().strip_prefix(base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
            Ok(())
        }
        let base = self.path(dir);
        let mut out = Vec::new();
        visit(&base, &base, &mut out)?;
        Ok(out)
    }

    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(path))
    }

    /// Longhorn's way: `<dst>.tmp.<unix-nanos>`, then a rename; directories made 0700.
    fn write(&self, path: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path(path);
        if let Some(dir) = path.parent() {
            create_dirs(dir)?;
        }
        let tmp = PathBuf::from(format!("{}.tmp.{}", path.display(), unix_nanos()));
        fs::write(&tmp, data)?;
        fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    fn exists(&self, path: &str) -> io::Result<bool> {
        self.path(path).try_exists()
    }

    fn modified(&self, path: &str) -> io::Result<SystemTime> {
        fs::metadata(self.path(path))?.modified()
    }

    /// `rm -rf`, then the parents left empty, up to 10 levels, stopping at `…/backupstore`.
    fn remove(&self, path: &str) -> io::Result<()> {
        let full = self.path(path);
        let gone = match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&full),
            Ok(_) => fs::remove_file(&full),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => Err(e),
        };
        match gone {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut parent = full.parent();
        for _ in 0..10 {
            let Some(dir) = parent else { break };
            if dir.ends_with("backupstore") || !dir.starts_with(&self.root) || dir == self.root {
                break;
            }
            if fs::remove_dir(dir).is_err() {
                break;
            }
            parent = dir.parent();
        }
        Ok(())
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

/// How lhnet finds the directory of an `nfs://` target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NfsMount {
    /// Use a mount found at the target's directory; otherwise mount the export there with the
    /// system's `mount -t nfs4`, as Longhorn's instance-manager does.
    Auto,
    /// Use the target's directory as it is (a volume mounted into the pod, or a test directory);
    /// never mount.
    Existing,
}

/// Where NFS targets live and whether lhnet mounts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsOptions {
    pub mount_root: PathBuf,
    pub mount: NfsMount,
}

/// Longhorn's mount root: `<root>/<host with '.'→'_'>/<export path>`.
pub const NFS_MOUNT_ROOT: &str = "/var/lib/longhorn-backupstore-mounts";
/// NFS versions tried in order, as Longhorn does.
const NFS_VERSIONS: [&str; 3] = ["4.2", "4.1", "4.0"];
/// The longest one `mount` attempt may take.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(15);

impl Default for NfsOptions {
    fn default() -> Self {
        NfsOptions {
            mount_root: PathBuf::from(NFS_MOUNT_ROOT),
            mount: NfsMount::Auto,
        }
    }
}

/// `nfs://HOST:/PATH` → (`HOST:`, `/PATH`).
pub fn parse_nfs(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("nfs://")
        .ok_or_else(|| format!("backup target {url} is not nfs://"))?;
    let (host, path) = rest
        .split_once(":/")
        .ok_or_else(|| format!("backup target {url}: write nfs://HOST:/PATH"))?;
    let path = path.trim_end_matches('/');
    if host.is_empty() || path.is_empty() {
        return Err(format!("backup target {url}: write nfs://HOST:/PATH"));
    }
    // The path becomes a directory under the mount root: nothing that could leave it.
    let clean = path
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if !clean || host.contains('/') || host.chars().any(char::is_whitespace) {
        return Err(format!(
            "backup target {url}: the export path may not hold '.', '..' or empty segments"
        ));
    }
    Ok((format!("{host}:"), format!("/{path}")))
}

/// The local directory of an NFS target, mounting it first when `options` say so.
pub fn nfs_directory(
    url: &str,
    options: &NfsOptions,
    policy: &EndpointPolicy,
) -> Result<PathBuf, String> {
    let (host, path) = parse_nfs(url)?;
    let dir = options
        .mount_root
        .join(host.trim_end_matches(':').replace('.', "_"))
        .join(path.trim_start_matches('/'));
    if is_mount_point(&dir) {
        return Ok(dir);
    }
    match options.mount {
        NfsMount::Existing if dir.is_dir() => Ok(dir),
        NfsMount::Existing => Err(format!(
            "backup target {url}: cannot find its mount at {} (mount the export there, or set backup_target.nfs_mount: auto)",
            dir.display()
        )),
        NfsMount::Auto => {
            // The server is dialled by the kernel's NFS client: checked as any destination.
            policy
                .check_host_resolving("the NFS server of", host.trim_end_matches(':'), 2049)
                .map_err(|refused| format!("backup target {url}: {refused}"))?;
            mount_nfs(url, &format!("{host}{path}"), &dir).map(|()| dir)
        }
    }
}

/// The parts of `cifs://HOST/SHARE/PATH` (Longhorn's form): the host, the share and path
/// (`/SHARE/PATH`, trailing `/` trimmed), and the `cifsOptions` of its query (comma separated,
/// repeatable), which replace the default `soft`.
#[derive(Debug, PartialEq, Eq)]
pub struct CifsUrl {
    pub host: String,
    pub path: String,
    pub options: Vec<String>,
}

pub fn parse_cifs(url: &str) -> Result<CifsUrl, String> {
    let form = || {
        format!("backup target {url}: CIFS path must follow format: cifs://<server-address>/<share-name>/")
    };
    let rest = url.strip_prefix("cifs://").ok_or_else(form)?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (host, path) = rest.split_once('/').ok_or_else(form)?;
    let path = path.trim_end_matches('/');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(form());
    }
    if path.is_empty() {
        return Err(format!("backup target {url}: cannot find CIFS path"));
    }
    // The path becomes a directory under the mount root: nothing that could leave it.
    if !path
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
    {
        return Err(format!(
            "backup target {url}: the share path may not hold '.', '..' or empty segments"
        ));
    }
    let mut options = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if let Some(value) = pair.strip_prefix("cifsOptions=") {
            for option in value.split(',').filter(|o| !o.is_empty()) {
                // Credentials come from CIFS_USERNAME/CIFS_PASSWORD only; nothing that would
                // put them (or another file) on the command line.
                let name = option.split('=').next().unwrap_or(option);
                if matches!(
                    name,
                    "username" | "user" | "password" | "pass" | "credentials" | "cred"
                ) {
                    return Err(format!(
                        "backup target {url}: cifsOptions may not set {name} (credentials come from CIFS_USERNAME and CIFS_PASSWORD)"
                    ));
                }
                if option.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(format!(
                        "backup target {url}: cifsOptions {option:?} holds white space"
                    ));
                }
                options.push(option.to_string());
            }
        }
    }
    if options.is_empty() {
        options.push("soft".into());
    }
    Ok(CifsUrl {
        host: host.to_string(),
        path: format!("/{path}"),
        options,
    })
}

/// The local directory of a CIFS target, mounting it first when `options` say so, with the
/// call's `CIFS_USERNAME` / `CIFS_PASSWORD` (handed to mount.cifs in its environment, `USER`
/// and `PASSWD`, never on its command line). Longhorn's place: the NFS mount root, the host
/// with `.` as `_`, then the share and path.
pub fn cifs_directory(
    url: &str,
    options: &NfsOptions,
    policy: &EndpointPolicy,
    credentials: &std::collections::HashMap<String, String>,
) -> Result<PathBuf, String> {
    let parsed = parse_cifs(url)?;
    let dir = options
        .mount_root
        .join(parsed.host.trim_end_matches(':').replace('.', "_"))
        .join(parsed.path.trim_start_matches('/'));
    if is_mount_point(&dir) {
        return Ok(dir);
    }
    match options.mount {
        NfsMount::Existing if dir.is_dir() => Ok(dir),
        NfsMount::Existing => Err(format!(
            "backup target {url}: cannot find its mount at {} (mount the share there, or set backup_target.nfs_mount: auto)",
            dir.display()
        )),
        NfsMount::Auto => {
            let port = parsed
                .options
                .iter()
                .find_map(|o| o.strip_prefix("port=")?.parse().ok())
                .unwrap_or(445);
            policy
                .check_host_resolving("the CIFS server of", &parsed.host, port)
                .map_err(|refused| format!("backup target {url}: {refused}"))?;
            mount_cifs(url, &parsed, &dir, credentials).map(|()| dir)
        }
    }
}

/// `mount -t cifs -o OPTIONS //HOST/SHARE/PATH DIR`, one mount at a time per directory.
fn mount_cifs(
    url: &str,
    parsed: &CifsUrl,
    dir: &Path,
    credentials: &std::collections::HashMap<String, String>,
) -> Result<(), String> {
    mount_once(url, dir, || mount_cifs_now(url, parsed, dir, credentials))
}

fn mount_cifs_now(
    url: &str,
    parsed: &CifsUrl,
    dir: &Path,
    credentials: &std::collections::HashMap<String, String>,
) -> Result<(), String> {
    let source = format!("//{}{}", parsed.host, parsed.path);
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "cifs", "-o"])
        .arg(parsed.options.join(","))
        .arg(&source)
        .arg(dir)
        .env_remove("USER")
        .env_remove("PASSWD");
    let set = |k: &str| credentials.get(k).filter(|v| !v.is_empty());
    if let Some(user) = set("CIFS_USERNAME") {
        cmd.env("USER", user);
    }
    if let Some(password) = set("CIFS_PASSWORD") {
        cmd.env("PASSWD", password);
    }
    match run_bounded(cmd, MOUNT_TIMEOUT) {
        Ok(()) => {
            tracing::info!(%url, dir = %dir.display(), "mounted CIFS backup target");
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir(dir);
            let kernel = match fs::read_to_string("/proc/filesystems") {
                Ok(t) if !t.lines().any(|l| l.trim_end().ends_with("cifs")) => {
                    " (this kernel lists no cifs file system in /proc/filesystems)"
                }
                _ => "",
            };
            Err(format!(
                "backup target {url}: cannot mount CIFS share {source}, options {} at {}: {e}{kernel}; lhnet needs CAP_SYS_ADMIN and mount.cifs to mount, or mount the share there yourself",
                parsed.options.join(","),
                dir.display()
            ))
        }
    }
}

/// Whether `dir` is a mount point of this process's mount namespace.
fn is_mount_point(dir: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = dir.to_string_lossy();
    table.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|point| unescape_mountinfo(point) == wanted)
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(n) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(n);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `mount` for the target at `dir` unless something is mounted there by then: one mount
/// at a time per directory (an unreachable server holds up its own target only), the directory
/// made first.
fn mount_once(
    url: &str,
    dir: &Path,
    mount: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    static MOUNTING: KeyedGuards = Mutex::new(Vec::new());
    let guard = guard_of(&MOUNTING, &dir.to_string_lossy());
    let _one = guard.lock().unwrap_or_else(|p| p.into_inner());
    if is_mount_point(dir) {
        return Ok(());
    }
    create_dirs(dir)
        .map_err(|e| format!("backup target {url}: creating {}: {e}", dir.display()))?;
    mount()
}

/// `mount -t nfs4 -o nfsvers=V -o actimeo=1 -o retry=0 SOURCE DIR` for V = 4.2, 4.1, 4.0 (as
/// Longhorn, plus `retry=0`: one try each instead of mount.nfs's two minutes of retries); one
/// mount at a time in this process, so two calls never stack mounts on one directory.
fn mount_nfs(url: &str, source: &str, dir: &Path) -> Result<(), String> {
    mount_once(url, dir, || mount_nfs_now(url, source, dir))
}

fn mount_nfs_now(url: &str, source: &str, dir: &Path) -> Result<(), String> {
    let mut failures = Vec::new();
    for version in NFS_VERSIONS {
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "nfs4", "-o"])
            .arg(format!("nfsvers={version}"))
            .args(["-o", "actimeo=1", "-o", "retry=0", source])
            .arg(dir);
        match run_bounded(cmd, MOUNT_TIMEOUT) {
            Ok(()) => {
                tracing::info!(%url, %version, dir = %dir.display(), "mounted NFS backup target");
                return Ok(());
            }
            Err(e) => failures.push(format!("nfsvers={version}: {e}")),
        }
    }
    let _ = fs::remove_dir(dir);
    Err(format!(
        "backup target {url}: cannot mount {source} at {} ({}); lhnet needs CAP_SYS_ADMIN and the NFS client to mount, or mount the export there yourself",
        dir.display(),
        failures.join("; ")
    ))
}

/// Runs a command to its end or kills it after `limit`; the error holds its stderr. The
/// backup-store drivers are synchronous (they run on blocking threads), hence std's clock.
#[allow(clippy::disallowed_types, clippy::disallowed_methods)]
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<(), String> {
    // Its own process group, so a timeout also ends the mount.nfs helper it starts.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", limit.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = io::Read::read_to_string(&mut err, &mut stderr);
    }
    Err(format!("{status}: {}", stderr.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cifs_urls_as_longhorn_reads_them() {
        let u = parse_cifs("cifs://10.0.0.5/share/bk/").unwrap();
        assert_eq!(
            u,
            CifsUrl {
                host: "10.0.0.5".into(),
                path: "/share/bk".into(),
                options: vec!["soft".into()]
            }
        );
        let u = parse_cifs(
            "cifs://smb/share?cifsOptions=vers=3.0,seal&cifsOptions=port=44500&backup=b",
        )
        .unwrap();
        assert_eq!(u.options, ["vers=3.0", "seal", "port=44500"]);
        assert!(parse_cifs("cifs:///share")
            .unwrap_err()
            .contains("cifs://<server-address>/<share-name>/"));
        assert!(parse_cifs("cifs://h").is_err());
        assert!(parse_cifs("cifs://h/")
            .unwrap_err()
            .contains("cannot find CIFS path"));
        assert!(parse_cifs("cifs://h/../etc").is_err());
        for bad in ["password=x", "credentials=/etc/shadow", "user=root"] {
            let e = parse_cifs(&format!("cifs://h/s?cifsOptions={bad}")).unwrap_err();
            assert!(e.contains("cifsOptions may not set"), "{e}");
        }
        // Longhorn's mount directory, found as it is with `existing`.
        let root = std::env::temp_dir().join(format!("lhnet-cifs-{}", std::process::id()));
        let dir = root.join("10_0_0_5/share/bk");
        fs::create_dir_all(&dir).unwrap();
        let options = NfsOptions {
            mount_root: root.clone(),
            mount: NfsMount::Existing,
        };
        let none = std::collections::HashMap::new();
        let strict = EndpointPolicy::default();
        assert_eq!(
            cifs_directory("cifs://10.0.0.5/share/bk", &options, &strict, &none).unwrap(),
            dir
        );
        let err = cifs_directory("cifs://10.0.0.5/other", &options, &strict, &none).unwrap_err();
        assert!(err.contains("cannot find its mount at"), "{err}");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn nfs_urls_and_directories() {
        assert_eq!(
            parse_nfs("nfs://longhorn-test-nfs-svc.default:/opt/backupstore").unwrap(),
            (
                "longhorn-test-nfs-svc.default:".to_string(),
                "/opt/backupstore".to_string()
            )
        );
        assert!(parse_nfs("nfs://host/opt").is_err());
        assert!(parse_nfs("nfs://:/opt").is_err());
        for escaping in [
            "nfs://h:/../../etc",
            "nfs://h:/a/./b",
            "nfs://h:/a//b",
            "nfs://h/x:/a",
        ] {
            assert!(parse_nfs(escaping).is_err(), "{escaping}");
        }
        let root = std::env::temp_dir().join(format!("lhnet-nfs-{}", std::process::id()));
        let options = NfsOptions {
            mount_root: root.clone(),
            mount: NfsMount::Existing,
        };
        let strict = EndpointPolicy::default();
        let err = nfs_directory("nfs://nfs.example:/exports/b", &options, &strict).unwrap_err();
        assert!(err.contains("cannot find its mount at"), "{err}");
        let dir = root.join("nfs_example/exports/b");
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            nfs_directory("nfs://nfs.example:/exports/b", &options, &strict).unwrap(),
            dir
        );
        // Nothing serves NFS on loopback here: the mount fails, fast and named.
        let auto = NfsOptions {
            mount_root: root.clone(),
            mount: NfsMount::Auto,
        };
        // Mounting a loopback export is refused by the default policy, before the mount runs.
        let err = nfs_directory("nfs://127.0.0.1:/lhnet-test-export", &auto, &strict).unwrap_err();
        assert!(
            err.contains("the NFS server of 127.0.0.1:2049 is")
                && err.contains(crate::REFUSED)
                && err.contains("loopback"),
            "{err}"
        );
        let loopback = EndpointPolicy::new(&["127.0.0.1".to_string()], false).unwrap();
        let err =
            nfs_directory("nfs://127.0.0.1:/lhnet-test-export", &auto, &loopback).unwrap_err();
        assert!(
            err.contains("cannot mount 127.0.0.1:/lhnet-test-export at")
                && err.contains("nfsvers=4.2")
                && err.contains("nfsvers=4.0"),
            "{err}"
        );
        assert!(!root.join("127_0_0_1/lhnet-test-export").exists());
        fs::remove_dir_all(root).unwrap();
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(
            &std::env::temp_dir().join("lhnet-not-a-mount")
        ));
    }

    #[test]
    fn fs_driver_removes_empty_parents_up_to_backupstore() {
        let root = std::env::temp_dir().join(format!("lhnet-fsd-{}", std::process::id()));
        let d = FsDriver::new("vfs", root.clone());
        d.write("backupstore/volumes/01/9c/vol1/volume.cfg", b"{}")
            .unwrap();
        d.write("backupstore/volumes/01/9c/vol1/blocks/aa/bb/x.blk", b"x")
            .unwrap();
        assert_eq!(
            d.walk("backupstore/volumes/01/9c/vol1").unwrap().len(),
            2,
            "walk sees both files"
        );
        d.remove("backupstore/volumes/01/9c/vol1/blocks/aa/bb/x.blk")
            .unwrap();
        assert!(!root.join("backupstore/volumes/01/9c/vol1/blocks").exists());
        assert!(root
            .join("backupstore/volumes/01/9c/vol1/volume.cfg")
            .exists());
        d.remove("backupstore/volumes/01/9c/vol1").unwrap();
        assert!(!root.join("backupstore/volumes").exists());
        assert!(root.join("backupstore").is_dir());
        d.remove("backupstore/volumes/01/9c/vol1").unwrap();
        assert!(d.list("backupstore/nothing").unwrap().is_empty());
        fs::remove_dir_all(root).unwrap();
    }
}
