//! Time the host took from this machine's CPUs while a run was measured: the `steal` column of
//! `/proc/stat`, per CPU. On a virtual machine a vCPU the host deschedules stops for
//! milliseconds at a time, and every call in flight on it waits that long: when the host
//! takes more than 1% of a CPU during a run, its p99 holds those stalls whatever the code under
//! test does. The benchmarks print this beside their tails so a reader can tell the two apart.

use serde::Serialize;

/// Steal counters of every CPU at one moment, in clock ticks (`USER_HZ`).
#[derive(Debug, Clone)]
pub struct Steal {
    ticks: Vec<u64>,
}

/// What the host took from each CPU between two readings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StealShare {
    /// Milliseconds taken, per CPU (index = CPU number).
    pub ms: Vec<f64>,
    /// The same as a percentage of the time between the readings.
    pub percent: Vec<f64>,
}

impl StealShare {
    /// The largest share taken from one of `cpus` (all when `None`), in percent.
    pub fn worst(&self, cpus: Option<&[usize]>) -> f64 {
        self.percent
            .iter()
            .enumerate()
            .filter(|(cpu, _)| cpus.is_none_or(|c| c.contains(cpu)))
            .map(|(_, p)| *p)
            .fold(0.0, f64::max)
    }
}

/// The `steal` counters of the per-CPU lines (`cpuN ...`) of `/proc/stat` text, in CPU order;
/// `None` when a line does not have the column (kernels before 2.6.11) or does not parse.
fn parse(stat: &str) -> Option<Vec<u64>> {
    let mut ticks = Vec::new();
    for line in stat.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(name) = fields.next() else { continue };
        let Some(cpu) = name.strip_prefix("cpu").filter(|n| !n.is_empty()) else {
            continue;
        };
        let cpu: usize = cpu.parse().ok()?;
        // user nice system idle iowait irq softirq steal
        let steal: u64 = fields.nth(7)?.parse().ok()?;
        if ticks.len() <= cpu {
            ticks.resize(cpu + 1, 0);
        }
        ticks[cpu] = steal;
    }
    (!ticks.is_empty()).then_some(ticks)
}

impl Steal {
    /// The counters now; `None` where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<Steal> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        parse(&text).map(|ticks| Steal { ticks })
    }

    /// What the host took since `self`, over `elapsed`.
    pub fn share_until(&self, later: &Steal, elapsed: std::time::Duration) -> StealShare {
        let tick_ms = 1000.0 / clock_ticks_per_second();
        let wall_ms = elapsed.as_secs_f64() * 1000.0;
        let ms: Vec<f64> = later
            .ticks
            .iter()
            .enumerate()
            .map(|(cpu, after)| {
                let before = self.ticks.get(cpu).copied().unwrap_or(*after);
                after.saturating_sub(before) as f64 * tick_ms
            })
            .collect();
        let percent = ms
            .iter()
            .map(|m| {
                if wall_ms > 0.0 {
                    m / wall_ms * 100.0
                } else {
                    0.0
                }
            })
            .collect();
        StealShare { ms, percent }
    }
}

/// `USER_HZ`, the unit of `/proc/stat` and of `/proc/*/stat`'s CPU times (100 on every Linux
/// this runs on).
pub(crate) fn clock_ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(n)) if n > 0 => n as f64,
        _ => 100.0,
    }
}

/// Measures what the host took while `f` ran.
pub fn during<T>(f: impl FnOnce() -> T) -> (T, StealShare) {
    let before = Steal::now();
    let start = std::time::Instant::now();
    let out = f();
    let share = match (before, Steal::now()) {
        (Some(b), Some(a)) => b.share_until(&a, start.elapsed()),
        _ => StealShare::default(),
    };
    (out, share)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const STAT: &str = "cpu  100 0 50 900 0 0 3 40 0 0\n\
        cpu0 60 0 30 400 0 0 1 10 0 0\n\
        cpu1 40 0 20 500 0 0 2 30 0 0\n\
        intr 12345\n";

    #[test]
    fn steal_is_read_per_cpu_and_the_total_line_is_skipped() {
        assert_eq!(parse(STAT), Some(vec![10, 30]));
        assert_eq!(
            parse("cpu0 1 2 3\n"),
            None,
            "a line without the steal column"
        );
        assert_eq!(parse("intr 1\n"), None);
    }

    #[test]
    fn the_share_is_of_the_time_between_readings() {
        let before = Steal {
            ticks: vec![10, 30],
        };
        let after = Steal {
            ticks: vec![12, 30],
        };
        let tick_ms = 1000.0 / clock_ticks_per_second();
        let share = before.share_until(&after, Duration::from_secs(1));
        assert_eq!(share.ms, vec![2.0 * tick_ms, 0.0]);
        assert!((share.percent[0] - 2.0 * tick_ms / 10.0).abs() < 1e-9);
        assert_eq!(share.worst(Some(&[1])), 0.0);
        assert_eq!(share.worst(None), share.percent[0]);
    }

    #[test]
    fn this_machine_reports_steal_for_every_cpu() {
        // Linux has had the column since 2.6.11; CI and the benchmarks run on Linux.
        let now = Steal::now().expect("/proc/stat has per-CPU steal counters");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(now.ticks.len() >= cpus, "{:?} for {cpus} CPUs", now.ticks);
    }
}
