//! The benchmark tools measure what they say: the open-loop generator counts latency from each
//! call's scheduled time and counts failed calls; bench-footprint holds every call open at once
//! through the real lhnet-proxy binary in a namespace with lhnet1 (root).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use lhnet_loadtest::openloop;

async fn server(delay: Duration, status: &'static str) -> SocketAddr {
    lhnet_loadtest::footprint::grpc_server(delay, status)
        .await
        .unwrap()
}

#[test]
fn open_loop_latency_counts_from_the_schedule_and_failures_are_counted() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let slow = rt.block_on(server(Duration::from_millis(3), "0"));
    let trace =
        std::env::temp_dir().join(format!("lhnet-openloop-trace-{}.txt", std::process::id()));
    let tail = openloop::run(
        "slow",
        slow,
        "/x.Y/Z",
        Bytes::from_static(&[0, 0, 0, 0, 0]),
        400.0,
        Duration::from_secs(1),
        rt.handle(),
        Some(trace.clone()),
    )
    .unwrap();
    // The warm-up calls are not counted; the 400 scheduled ones are, each at least the delay.
    assert_eq!((tail.calls, tail.errors), (400, 0), "{tail:?}");
    assert!(tail.p50_ms >= 3.0 && tail.p50_ms < 100.0, "{tail:?}");
    assert!(tail.p999_ms >= tail.p99_ms && tail.p99_ms >= tail.p50_ms);
    // The trace has every scheduled call: when it was due (every 2.5 ms from the start) and
    // how long it took from then.
    let text = std::fs::read_to_string(&trace).unwrap();
    let _ = std::fs::remove_file(&trace);
    let mut due: Vec<u64> = Vec::new();
    for line in text.lines() {
        let (at, latency) = line.split_once(' ').unwrap();
        due.push(at.parse().unwrap());
        assert!(latency.parse::<u64>().unwrap() >= 3000, "{line}");
    }
    due.sort_unstable();
    assert_eq!(due.len(), 400);
    for (n, at) in due.iter().enumerate() {
        assert!(at.abs_diff(n as u64 * 2500) <= 1, "call {n} due at {at} us");
    }

    let failing = rt.block_on(server(Duration::ZERO, "13"));
    let err = openloop::run(
        "failing",
        failing,
        "/x.Y/Z",
        Bytes::from_static(&[0, 0, 0, 0, 0]),
        100.0,
        Duration::from_secs(1),
        rt.handle(),
        None,
    )
    .unwrap_err();
    assert!(err.contains("warm-up call failed"), "{err}");
}

#[test]
fn bench_footprint_holds_every_call_open_through_lhnet_with_lhnet1() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "bench-footprint needs root: CI is set, so it must run here, not skip"
        );
        eprintln!("skipped: bench-footprint builds a network namespace and needs root");
        return;
    }
    // The proxy binary cargo built for the workspace's tests (target/<profile>/lhnet-proxy).
    let me = std::env::current_exe().unwrap();
    let binary = me.parent().unwrap().parent().unwrap().join("lhnet-proxy");
    assert!(binary.exists(), "{} not built", binary.display());
    let r = lhnet_loadtest::footprint::run(Some(binary), 300, 2).unwrap();
    assert_eq!((r.calls_ok, r.calls_failed), (300, 0), "{r:?}");
    assert_eq!(r.start_to_ready_ms.len(), 2);
    assert!(r
        .start_to_ready_ms
        .iter()
        .all(|t| *t > 0.0 && *t < 10_000.0));
    assert!(
        r.rss_idle_mib > 1.0 && r.rss_with_streams_mib > r.rss_idle_mib,
        "{r:?}"
    );
}
