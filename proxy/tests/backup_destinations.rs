//! Where the backup-target calls may make lhnet dial (`backup_target.allowed_endpoints`): a
//! caller's `AWS_ENDPOINTS`, `HTTPS_PROXY` / `HTTP_PROXY` and a target's redirects at loopback,
//! link-local, the metadata address or a port not allowed are refused with PERMISSION_DENIED
//! before anything is dialled (listeners here count their accepts), and a hostile target's
//! answers cost bounded time and memory and show only in part.
// The test servers are plain threads with std sockets and sleeps.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lhnet_proto::imrpc::*;
use tonic::Code;

mod common;
use common::backup_proxy;
use common::servers::{Answer, Server};

fn envs(pairs: &[(&str, &str)]) -> Vec<String> {
    let mut all: Vec<(String, String)> = [
        ("AWS_ACCESS_KEY_ID", "test-access-key"),
        ("AWS_SECRET_ACCESS_KEY", "test-secret-key"),
        ("AWS_ENDPOINTS", ""),
        ("AWS_CERT", ""),
        ("HTTPS_PROXY", ""),
        ("HTTP_PROXY", ""),
        ("NO_PROXY", ""),
        ("VIRTUAL_HOSTED_STYLE", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in pairs {
        match all.iter_mut().find(|(key, _)| key == k) {
            Some(entry) => entry.1 = v.to_string(),
            None => all.push((k.to_string(), v.to_string())),
        }
    }
    all.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn list(envs: Vec<String>) -> EngineBackupVolumeListRequest {
    EngineBackupVolumeListRequest {
        envs,
        dest_url: "s3://backups@us-east-1/cluster".into(),
        volume_name: String::new(),
        volume_only: true,
    }
}

async fn refused(extra: &str, pairs: &[(&str, &str)], wanted: &[&str]) -> String {
    let (_proxy, mut c) = backup_proxy(extra).await;
    let err = c
        .backup_volume_list(list(envs(pairs)))
        .await
        .expect_err("a refused destination");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for w in wanted {
        assert!(
            err.message().contains(w),
            "{w:?} not in {:?}",
            err.message()
        );
    }
    assert!(
        err.message().contains("backup_target."),
        "names the key to change: {:?}",
        err.message()
    );
    err.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_proxies_at_refused_addresses_are_never_dialled() {
    let watch = Server::counting();
    let loopback = format!("http://127.0.0.1:{}", watch.port);
    let named = format!("http://localhost:{}", watch.port);
    for (key, value, wanted) in [
        ("AWS_ENDPOINTS", loopback.as_str(), "loopback"),
        ("AWS_ENDPOINTS", named.as_str(), "loopback"),
        (
            "AWS_ENDPOINTS",
            "http://169.254.169.254",
            "instance-metadata",
        ),
        (
            "AWS_ENDPOINTS",
            "http://[::ffff:169.254.169.254]",
            "instance-metadata",
        ),
        ("AWS_ENDPOINTS", "http://169.254.7.7:9000", "link-local"),
        ("HTTPS_PROXY", loopback.as_str(), "loopback"),
        (
            "HTTP_PROXY",
            "http://169.254.169.254:80",
            "instance-metadata",
        ),
    ] {
        // The proxy case has a lawful-looking endpoint that would never be reached.
        let mut pairs = vec![(key, value)];
        if key != "AWS_ENDPOINTS" {
            pairs.push(("AWS_ENDPOINTS", "http://10.255.255.1:9000"));
        }
        let text = refused(
            "",
            &pairs,
            &[key, wanted, "backup_target.allowed_endpoints"],
        )
        .await;
        assert!(
            text.contains(&format!(":{}", watch.port)) || !value.contains("127.0.0.1"),
            "names the address: {text}"
        );
    }
    // Keyless: the metadata service is not asked unless the config says so.
    let mut keyless = envs(&[("AWS_ENDPOINTS", "http://10.255.255.1:9000")]);
    keyless.retain(|e| !e.starts_with("AWS_ACCESS_KEY_ID") && !e.starts_with("AWS_SECRET"));
    let (_proxy, mut c) = backup_proxy("").await;
    let err = c.backup_volume_list(list(keyless)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("backup_target.instance_metadata: true"),
        "{err:?}"
    );
    // A proxy URL with credentials: refused like any other, its password never shown.
    let with_password = format!("http://operator:hunter2@127.0.0.1:{}", watch.port);
    let text = refused(
        "",
        &[
            ("HTTPS_PROXY", &with_password),
            ("AWS_ENDPOINTS", "https://10.255.255.1:9000"),
        ],
        &["HTTPS_PROXY"],
    )
    .await;
    assert!(!text.contains("hunter2"), "{text}");
    assert_eq!(watch.accepts(), 0, "a refused destination was dialled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_address_opens_only_its_own_ports() {
    let watch = Server::counting();
    let other = Server::counting();
    let config = format!(
        "backup_target: {{ allowed_endpoints: [\"127.0.0.1:{}\"] }}\n",
        other.port
    );
    let endpoint = format!("http://127.0.0.1:{}", watch.port);
    refused(
        &config,
        &[("AWS_ENDPOINTS", &endpoint)],
        &[&format!("port {} is not allowed for 127.0.0.1", watch.port)],
    )
    .await;
    // A wide entry does not open loopback or the metadata address.
    let wide = "backup_target: { allowed_endpoints: [0.0.0.0/0] }\n";
    refused(wide, &[("AWS_ENDPOINTS", &endpoint)], &["loopback"]).await;
    refused(
        wide,
        &[("AWS_ENDPOINTS", "http://169.254.169.254")],
        &["instance-metadata"],
    )
    .await;
    // A name no entry names.
    let names = "backup_target: { allowed_endpoints: [\"minio.backup.svc:9000\"] }\n";
    refused(
        names,
        &[("AWS_ENDPOINTS", "http://s3.elsewhere.example:9000")],
        &["s3.elsewhere.example is not in [minio.backup.svc:9000]"],
    )
    .await;
    assert_eq!(watch.accepts() + other.accepts(), 0);
}

/// `HTTP/1.1 307` to `location`, for every request.
fn redirect_to(location: String) -> Answer {
    Arc::new(move |conn: &mut TcpStream| {
        let _ = write!(
            conn,
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_refused_address_is_not_followed() {
    let watch = Server::counting();
    for location in [
        format!("http://127.0.0.1:{}/backups", watch.port),
        format!("http://localhost:{}/backups", watch.port),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        let target = Server::start(Some(redirect_to(location.clone())));
        let config = format!(
            "backup_target: {{ allowed_endpoints: [\"127.0.0.1:{}\"], timeout: 20s }}\n",
            target.port
        );
        let endpoint = format!("http://127.0.0.1:{}", target.port);
        let (_proxy, mut c) = backup_proxy(&config).await;
        let err = c
            .backup_volume_list(list(envs(&[("AWS_ENDPOINTS", &endpoint)])))
            .await
            .expect_err(&location);
        assert_eq!(err.code(), Code::PermissionDenied, "{location}: {err:?}");
        assert!(
            err.message().contains("a redirect to")
                && err.message().contains("backup_target.allowed_endpoints"),
            "{location}: {err:?}"
        );
        assert!(target.accepts() >= 1, "the target itself was asked");
    }
    assert_eq!(watch.accepts(), 0, "a redirect was followed");
}

/// A 200 whose body never ends: `announce` says 1 GiB in Content-Length, otherwise the
/// body runs until the connection closes; at most 1 GiB is written either way.
fn garbage(announce: bool) -> Answer {
    Arc::new(move |conn: &mut TcpStream| {
        let length = if announce {
            format!("Content-Length: {}\r\n", 1u64 << 30)
        } else {
            String::new()
        };
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\n{length}Connection: close\r\n\r\n"
        );
        let chunk = vec![b'<'; 1 << 20];
        for _ in 0..1024 {
            if conn.write_all(&chunk).is_err() {
                return;
            }
        }
    })
}

fn vm_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_answering_a_gigabyte_of_garbage_costs_bounded_time_and_memory() {
    let before = vm_kib("VmRSS:");
    for announce in [true, false] {
        let target = Server::start(Some(garbage(announce)));
        let config = format!(
            "backup_target: {{ allowed_endpoints: [\"127.0.0.1:{}\"], timeout: 60s }}\n",
            target.port
        );
        let endpoint = format!("http://127.0.0.1:{}", target.port);
        let (_proxy, mut c) = backup_proxy(&config).await;
        let started = Instant::now();
        let err = c
            .backup_volume_list(list(envs(&[("AWS_ENDPOINTS", &endpoint)])))
            .await
            .expect_err("garbage is not a listing");
        let took = started.elapsed();
        assert_eq!(err.code(), Code::Unknown, "{err:?}");
        let wanted = if announce {
            "announced"
        } else {
            "more than 64 MiB"
        };
        assert!(err.message().contains(wanted), "{err:?}");
        assert!(err.message().len() < 1200, "a short error: {err:?}");
        assert!(
            !err.message().contains("<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<"),
            "the garbage is not quoted at length: {err:?}"
        );
        // Bounded, not timed: well inside the call's own 60 s.
        assert!(took < Duration::from_secs(45), "took {took:?}");
    }
    // At most one answer's limit (64 MiB) held at once, plus what the runtime keeps.
    let peak = vm_kib("VmHWM:");
    assert!(
        peak.saturating_sub(before) < 400 << 10,
        "memory grew from {before} KiB to a peak of {peak} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_s_error_is_quoted_only_in_part() {
    let answer: Answer = Arc::new(|conn: &mut TcpStream| {
        let mut body = String::from("<Error><Code>AccessDenied</Code><Message>");
        body.push_str(&"\u{1b}[2J\r\nSET-COOKIE: evil\r\n".repeat(500));
        body.push_str("</Message></Error>");
        let _ = write!(
            conn,
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    let target = Server::start(Some(answer));
    let config = format!(
        "backup_target: {{ allowed_endpoints: [\"127.0.0.1:{}\"] }}\n",
        target.port
    );
    let endpoint = format!("http://127.0.0.1:{}", target.port);
    let (_proxy, mut c) = backup_proxy(&config).await;
    let err = c
        .backup_volume_list(list(envs(&[("AWS_ENDPOINTS", &endpoint)])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    let text = err.message();
    assert!(text.len() < 1200, "{} chars: {text}", text.len());
    assert!(
        !text.chars().any(|c| c.is_control()),
        "control characters passed: {text:?}"
    );
    assert!(text.contains("403"), "{text}");
}
