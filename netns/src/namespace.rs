//! Running code inside a named network namespace (`/run/netns/NAME`, as `ip netns` makes them).

use std::fs::File;
use std::io;
use std::thread::JoinHandle;

use nix::sched::{setns, CloneFlags};

/// Moves the *calling thread* into the named network namespace, for good.
pub fn enter(name: &str) -> io::Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("setns into {path}: {e} (needs root)")))
}

/// Starts a thread inside the namespace and runs `f` there. Sockets made in `f` belong to that
/// namespace, also when they are used from other threads later.
pub fn spawn_in<F, T>(name: &str, f: F) -> io::Result<JoinHandle<io::Result<T>>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            enter(&name)?;
            Ok(f())
        })
}

/// Runs `f` inside the namespace and waits for its result.
pub fn run_in<F, T>(name: &str, f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_in(name, f)?
        .join()
        .map_err(|_| io::Error::other(format!("thread in namespace {name} panicked")))?
}
