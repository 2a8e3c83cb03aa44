//! CPU time a proxy spent, from `/proc`: lhnet's runtime threads inside this process, or a
//! peer's process with its children (nginx's master and workers). A rate says how fast the
//! load went through a proxy; when the load side is the limit (lhnet at 1.00x direct), only
//! the proxy's CPU time per call says how much more it could take.

use crate::steal;

/// Whose CPU time a run is charged to.
#[derive(Debug, Clone)]
pub enum Whose {
    /// The threads of this process with this name (`comm`).
    Threads(&'static str),
    /// A process and its descendants.
    Process(u32),
}

/// utime + stime (in clock ticks) and the parent pid of one `/proc/.../stat` text.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    // The command is in parentheses and may hold spaces: the fields start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // state ppid ...: ppid is the 2nd field here, utime the 12th, stime the 13th.
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((ppid, ticks))
}

fn seconds(ticks: u64) -> f64 {
    ticks as f64 / steal::clock_ticks_per_second()
}

/// CPU time (user + system) of this process's threads named `name`, in seconds; `None` when
/// there is none.
pub fn threads_seconds(name: &str) -> Option<f64> {
    let mut ticks = None;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        *ticks.get_or_insert(0) += parse_stat(&stat)?.1;
    }
    ticks.map(seconds)
}

/// CPU time of process `root` and its live descendants (all their threads), in seconds;
/// `None` when `root` is gone.
pub fn tree_seconds(root: u32) -> Option<f64> {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that ended since the listing is simply not counted.
        if let Some((ppid, ticks)) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            procs.push((pid, ppid, ticks));
        }
    }
    tree_ticks(root, &procs).map(seconds)
}

/// The ticks of `root` and everything below it in `procs` (pid, ppid, ticks).
fn tree_ticks(root: u32, procs: &[(u32, u32, u64)]) -> Option<u64> {
    let mut total = procs.iter().find(|p| p.0 == root)?.2;
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for &(pid, _, ticks) in procs.iter().filter(|p| p.1 == parent && p.0 != root) {
            total += ticks;
            parents.push(pid);
        }
    }
    Some(total)
}

impl Whose {
    /// The CPU seconds so far; `None` when they cannot be read.
    pub fn seconds(&self) -> Option<f64> {
        match self {
            Whose::Threads(name) => threads_seconds(name),
            Whose::Process(pid) => tree_seconds(*pid),
        }
    }
}

/// Runs `f` and returns its result with the CPU seconds `whose` spent meanwhile.
pub fn during<T>(whose: Option<&Whose>, f: impl FnOnce() -> T) -> (T, Option<f64>) {
    let before = whose.and_then(Whose::seconds);
    let out = f();
    let spent = match (before, whose.and_then(Whose::seconds)) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    (out, spent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ppid_and_cpu_ticks_past_a_command_with_spaces_and_parentheses() {
        let stat = "4242 (nginx: worker (x)) S 4240 4240 4240 0 -1 4194624 \
                    100 0 0 0 37 5 0 0 20 0 1 0 123 1000 10 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((4240, 42)));
        assert_eq!(parse_stat("4242 (cut"), None);
    }

    #[test]
    fn a_tree_sums_the_root_and_its_descendants_only() {
        // 10 is the root, 11 and 12 its children, 13 a grandchild; 20 and 21 are not below it.
        let procs = [
            (1, 0, 1000),
            (10, 1, 5),
            (11, 10, 7),
            (12, 10, 11),
            (13, 12, 13),
            (20, 1, 17),
            (21, 20, 19),
        ];
        assert_eq!(tree_ticks(10, &procs), Some(5 + 7 + 11 + 13));
        assert_eq!(tree_ticks(12, &procs), Some(11 + 13));
        assert_eq!(tree_ticks(99, &procs), None);
    }

    #[test]
    fn this_threads_busy_loop_is_counted() {
        let name = "cputime-spin";
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let before = threads_seconds(name).expect("this thread");
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < std::time::Duration::from_millis(300) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                threads_seconds(name).expect("this thread") - before
            })
            .unwrap();
        let spent = t.join().unwrap();
        // 300 ms of spinning, in 10 ms ticks; the host may take some of it.
        assert!((0.1..1.0).contains(&spent), "{spent}");
        assert_eq!(threads_seconds("no-such-thread"), None);
        assert!(tree_seconds(std::process::id()).is_some_and(|s| s > 0.0));
    }
}
