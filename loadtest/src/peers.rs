//! The benchmark peers (nginx `grpc_pass`, HAProxy) started from the shared config templates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process stopped when dropped: asked to (SIGTERM, so nginx's master takes its workers
/// down with it; SIGKILL left them running, one more after every bench), then killed.
pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    _rundir: TempDir,
}

impl Peer {
    /// The peer's process (nginx's master; its workers are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the templates are: `--peers-dir`, else `../shared/peers` from the workspace or the
/// current directory.
pub fn find_templates(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let from_workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers");
    [from_workspace, PathBuf::from("../shared/peers")]
        .into_iter()
        .find(|p| p.join("nginx-grpc.conf.tmpl").exists())
}

/// Starts a gRPC peer (`nginx` or `haproxy`) forwarding `listen` to `upstream`, pinned with
/// `taskset` when `cpus` is given. Returns why not, when it cannot.
pub fn start_grpc_peer(
    name: &str,
    templates: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    bind: &str,
    threads: usize,
    cpus: Option<&str>,
) -> Result<Peer, String> {
    let rundir = std::env::temp_dir().join(format!("lhnet-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(rundir.join("body"))
        .map_err(|e| format!("{}: {e}", rundir.display()))?;
    let rundir = TempDir(rundir);
    let (template, program, args): (&str, &str, Vec<String>) = match name {
        "nginx" => (
            "nginx-grpc.conf.tmpl",
            "nginx",
            vec![
                "-c".into(),
                "CONF".into(),
                "-p".into(),
                rundir.0.display().to_string(),
                "-e".into(),
                rundir.0.join("error.log").display().to_string(),
            ],
        ),
        "haproxy" => (
            "haproxy-grpc.cfg.tmpl",
            "haproxy",
            vec!["-db".into(), "-f".into(), "CONF".into()],
        ),
        other => return Err(format!("unknown peer {other}; use nginx or haproxy")),
    };
    if which(program).is_none() {
        let package = if name == "nginx" {
            "nginx-light"
        } else {
            "haproxy"
        };
        return Err(format!(
            "{program} is not installed (apt-get install {package})"
        ));
    }
    let text = std::fs::read_to_string(templates.join(template))
        .map_err(|e| format!("{}: {e}", templates.join(template).display()))?;
    let conf = text
        .replace("@LISTEN@", &listen.to_string())
        .replace("@UPSTREAM@", &upstream.to_string())
        .replace("@BIND@", bind)
        .replace("@RUNDIR@", &rundir.0.display().to_string())
        .replace("@WORKERS@", &threads.to_string())
        .replace("@THREADS@", &threads.to_string());
    let conf_path = rundir.0.join(template.trim_end_matches(".tmpl"));
    std::fs::write(&conf_path, conf).map_err(|e| format!("{}: {e}", conf_path.display()))?;
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            if a == "CONF" {
                conf_path.display().to_string()
            } else {
                a
            }
        })
        .collect();
    let mut cmd = match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c, program]);
            cmd
        }
        None => Command::new(program),
    };
    let child = cmd
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let mut peer = Peer {
        name: name.to_string(),
        addr: listen,
        child,
        _rundir: rundir,
    };
    wait_for_port(listen, &mut peer.child, program)?;
    Ok(peer)
}

/// Starts HAProxy as an L4 forwarder (`haproxy-tcp.cfg.tmpl`) from `listen` to `upstream`.
pub fn start_tcp_peer(
    templates: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    threads: usize,
    cpus: Option<&str>,
) -> Result<Peer, String> {
    if which("haproxy").is_none() {
        return Err("haproxy is not installed (apt-get install haproxy)".into());
    }
    let template = templates.join("haproxy-tcp.cfg.tmpl");
    let text =
        std::fs::read_to_string(&template).map_err(|e| format!("{}: {e}", template.display()))?;
    let rundir =
        std::env::temp_dir().join(format!("lhnet-bench-haproxy-tcp-{}", std::process::id()));
    std::fs::create_dir_all(&rundir).map_err(|e| format!("{}: {e}", rundir.display()))?;
    let rundir = TempDir(rundir);
    let conf = text
        .replace("@LISTEN@", &listen.to_string())
        .replace("@UPSTREAM@", &upstream.to_string())
        .replace("@THREADS@", &threads.to_string());
    let conf_path = rundir.0.join("haproxy-tcp.cfg");
    std::fs::write(&conf_path, conf).map_err(|e| format!("{}: {e}", conf_path.display()))?;
    let mut cmd = match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c, "haproxy"]);
            cmd
        }
        None => Command::new("haproxy"),
    };
    let child = cmd
        .arg("-db")
        .arg("-f")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting haproxy: {e}"))?;
    let mut peer = Peer {
        name: "haproxy".into(),
        addr: listen,
        child,
        _rundir: rundir,
    };
    wait_for_port(listen, &mut peer.child, "haproxy")?;
    Ok(peer)
}

fn wait_for_port(addr: SocketAddr, child: &mut Child, program: &str) -> Result<(), String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return Err(format!("{program} exited ({status}): {}", err.trim()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{program} did not listen on {addr} within 5 s"))
}

/// The path of a program on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// A free loopback port (bound, then released for a peer to take).
pub fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}
