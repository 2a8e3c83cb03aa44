//! Kernel byte and packet counters for every device in the caller's network namespace.

use std::collections::BTreeMap;
use std::io;

/// One device's kernel counters, as `/proc/net/dev` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// Reads the counters of every device in the calling *thread's* network namespace.
///
/// `/proc/thread-self/net/dev` is used rather than `/sys/class/net`: sysfs shows the namespace it
/// was mounted in, while this file follows `setns` on the current thread.
pub fn read_device_counters() -> io::Result<BTreeMap<String, DeviceCounters>> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    parse_proc_net_dev(&text)
}

fn parse_proc_net_dev(text: &str) -> io::Result<BTreeMap<String, DeviceCounters>> {
    let mut devices = BTreeMap::new();
    // The first two lines are column headers.
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("/proc/net/dev: bad number in line {line:?}: {e}"),
                )
            })?;
        if fields.len() < 16 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "/proc/net/dev: expected 16 counters, got {} in {line:?}",
                    fields.len()
                ),
            ));
        }
        devices.insert(
            name.trim().to_string(),
            DeviceCounters {
                rx_bytes: fields[0],
                rx_packets: fields[1],
                tx_bytes: fields[8],
                tx_packets: fields[9],
            },
        );
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:  1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\nlhnet1: 123456   789    0    0    0     0          0         0   654321     987    0    0    0     0       0          0\n";
        let devices = parse_proc_net_dev(text).unwrap();
        assert_eq!(devices.len(), 2);
        let d = devices["lhnet1"];
        assert_eq!(
            (d.rx_bytes, d.rx_packets, d.tx_bytes, d.tx_packets),
            (123456, 789, 654321, 987)
        );
    }

    #[test]
    fn rejects_short_lines() {
        let text = "h1\nh2\neth0: 1 2 3\n";
        let err = parse_proc_net_dev(text).unwrap_err();
        assert!(err.to_string().contains("expected 16 counters"), "{err}");
    }

    #[test]
    fn reads_this_namespace() {
        let devices = read_device_counters().unwrap();
        assert!(devices.contains_key("lo"), "{devices:?}");
    }
}
