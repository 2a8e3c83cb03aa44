//! Root only: a short run of `lhnet-loadtest demo` (the README's main job).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use lhnet_loadtest::demo::{self, DemoArgs};

#[test]
fn a_short_demo_keeps_storage_bytes_off_eth0_with_no_control_errors() {
    if !lhnet_netns::Topology::can_build() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the demo needs root: CI is set, so it must run here, not skip"
        );
        eprintln!(
            "skipped: the demo builds network namespaces and needs root (CI runs it as root)"
        );
        let err = demo::run(&DemoArgs::default(), Arc::new(AtomicBool::new(false))).unwrap_err();
        assert!(err.contains("needs root"), "{err}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("lhnet-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let args = DemoArgs {
        duration: Duration::from_secs(5),
        volumes: 6,
        data_volumes: 1,
        volume_size: 8 << 20,
        data_rate: 32 << 20,
        json: None,
        plot: None,
        // The engines the engine pod's instance-manager starts run this binary.
        longhorn: Some(env!("CARGO_BIN_EXE_lhnet-loadtest").into()),
        upgrade: true,
    };
    let report = demo::run(&args, Arc::new(AtomicBool::new(false))).unwrap();
    demo::print(&report);

    assert_eq!(
        report.control.errors, 0,
        "{:?}",
        report.control.error_samples
    );
    assert!(
        report.control.requests >= 6 * 7,
        "{} control calls",
        report.control.requests
    );
    assert!(report.segregation.ok, "{:?}", report.segregation);
    // The manager's proxy handler kept its first client: alive at every tick.
    assert_eq!(report.control.proxy_dials, 1, "{:?}", report.control);
    // The upgrade story: no call failed across the switch, both paths served, in that order.
    let upgrade = report.upgrade.as_ref().expect("the upgrade pod's report");
    assert_eq!(upgrade.failed, 0, "{:?}", upgrade.error_samples);
    assert!(upgrade.ok, "{upgrade:?}");
    let first_proxy = upgrade
        .timeline
        .iter()
        .position(|(_, p)| *p == "proxy")
        .unwrap();
    assert!(upgrade.timeline[..first_proxy]
        .iter()
        .all(|(_, p)| *p == "fallback"));
    assert!(
        upgrade.timeline[first_proxy..]
            .iter()
            .all(|(_, p)| *p == "proxy"),
        "{:?}",
        upgrade.timeline
    );
    assert!(report.rebuild.ok, "{:?}", report.rebuild);
    assert!(report.rebuild.bytes > 0, "{:?}", report.rebuild);
    assert!(
        report.data.bytes >= 16 << 20,
        "{} data bytes",
        report.data.bytes
    );
    assert_eq!(report.pods.len(), 4);
    for pod in &report.pods {
        let lhnet1 = pod.devices["lhnet1"];
        assert!(lhnet1.rx_bytes + lhnet1.tx_bytes > 0, "{pod:?}");
        if pod.name.starts_with("replica") {
            // Every written byte reached both replicas over lhnet1, through lhnet.
            assert!(lhnet1.rx_bytes >= report.data.bytes, "{pod:?}");
            assert!(
                pod.lhnet["storage"].rx_bytes >= report.data.bytes,
                "{pod:?}"
            );
        }
    }

    // The backup: moto only on the storage bridge, asked by management IP through lhnet; the
    // upload left the replica pod through its egress listener and over lhnet1, not eth0.
    let backup = &report.backup;
    match &backup.skipped {
        Some(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "the backup phase skipped under CI: {why}"
            );
            eprintln!("backup phase skipped: {why}");
        }
        None => {
            assert!(backup.ok, "{backup:?}");
            assert!(backup.backup_bytes > 0, "{backup:?}");
            assert!(backup.uploaded_bytes > 0, "{backup:?}");
            assert!(backup.eth0_share < 0.05, "{backup:?}");
            let uploader = backup
                .pods
                .iter()
                .find(|p| p.egress_sent_bytes > 0)
                .expect("a pod that uploaded");
            assert!(uploader.name.starts_with("replica") || uploader.name == "spare");
            assert!(
                uploader.lhnet1_bytes >= uploader.egress_sent_bytes,
                "{uploader:?}"
            );
        }
    }

    let plot = dir.join("demo.svg");
    demo::plot(&report, &plot).unwrap();
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("replica-a"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "control",
        "data",
        "rebuild",
        "pods",
        "segregation",
        "backup",
    ] {
        assert!(json.get(key).is_some(), "no {key} in the JSON report");
    }
    assert!(json["pods"][0]["devices"]["eth0"]["rx_bytes"].is_u64());
}
