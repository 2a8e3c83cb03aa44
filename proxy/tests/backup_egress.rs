//! The backup egress listener (`kind: http_connect`): CONNECT tunnels and absolute-form
//! requests to destinations `backup_target.allowed_endpoints` allows, refusals before any dial
//! (listeners here count their accepts), bad requests and its connection limit.
// The test's client and servers are plain std sockets.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use lhnet_proxy::app::{self, Options, RunningProxy};
use lhnet_proxy::config::Config;

mod common;
use common::metric;
use common::servers::{Answer, Server};

async fn egress_proxy(allowed: &str, max_connections: usize) -> (RunningProxy, SocketAddr) {
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
         listeners:\n  - name: egress\n    kind: http_connect\n    address: 127.0.0.1:0\n    max_connections: {max_connections}\n\
         backup_target: {{ allowed_endpoints: [{allowed}] }}\n"
    );
    let proxy = app::start(Config::parse(&yaml, "test").unwrap(), Options::default())
        .await
        .unwrap();
    let addr = proxy.listener_addr("egress").unwrap();
    (proxy, addr)
}

/// Sends `request` on a new connection and reads one answer: its head and, when it has a
/// Content-Length, its body ("" when the server closes without answering).
fn exchange(proxy: SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let mut c = TcpStream::connect(proxy).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let mut wanted = None;
    loop {
        if wanted.is_some_and(|n| got.len() >= n) {
            break;
        }
        match c.read(&mut byte) {
            Ok(0) | Err(_) => break,
            Ok(_) => got.push(byte[0]),
        }
        if wanted.is_none() && got.ends_with(b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            wanted = Some(got.len() + length);
        }
    }
    (c, String::from_utf8_lossy(&got).into_owned())
}

fn connect(host_port: &str) -> Vec<u8> {
    format!("CONNECT {host_port} HTTP/1.1\r\nHost: {host_port}\r\n\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_go_only_where_the_policy_allows() {
    let pong: Answer = Arc::new(|conn: &mut TcpStream| {
        let _ = conn.write_all(b"PONG");
    });
    let target = Server::start(Some(pong));
    let watch = Server::counting();
    let (proxy, addr) = egress_proxy(&format!("\"127.0.0.1:{}\"", target.port), 8).await;

    // Allowed: 200, then the tunnel carries bytes both ways.
    let (mut tunnel, head) = exchange(addr, &connect(&format!("127.0.0.1:{}", target.port)));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tokio::task::spawn_blocking(move || {
        tunnel.write_all(b"PING\r\n\r\n").unwrap();
        let mut pong = [0u8; 4];
        tunnel.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"PONG");
    })
    .await
    .unwrap();

    // Refused: loopback at a port not listed, the metadata address; nothing dialled.
    for to in [
        format!("127.0.0.1:{}", watch.port),
        "169.254.169.254:80".to_string(),
        format!("localhost:{}", watch.port),
    ] {
        let (_, answer) = exchange(addr, &connect(&to));
        assert!(answer.starts_with("HTTP/1.1 403"), "{to}: {answer}");
        assert!(
            answer.contains("refused by lhnet's backup-target policy")
                && answer.contains("backup_target.allowed_endpoints"),
            "{to}: {answer}"
        );
    }
    // An absolute-form request to a refused address: the same.
    let get = format!(
        "GET http://127.0.0.1:{}/bucket HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        watch.port
    );
    let (_, answer) = exchange(addr, get.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(watch.accepts(), 0, "a refused destination was dialled");

    // Not a proxy request: 400 saying what to send; garbage: closed.
    let (_, answer) = exchange(addr, b"GET /bucket HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("CONNECT HOST:PORT"),
        "{answer}"
    );
    let (_, answer) = exchange(addr, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );

    let text = proxy.metrics().render();
    let series = |result: &str| {
        metric(
            &text,
            &format!(
                "lhnet_backup_egress_connections_total{{listener=\"egress\",result=\"{result}\"}}"
            ),
        )
    };
    assert_eq!(series("ok"), Some(1.0), "{text}");
    assert_eq!(series("refused"), Some(4.0), "{text}");
    let sent = metric(
        &text,
        &format!(
            "lhnet_backup_egress_transmit_bytes_total{{listener=\"egress\",target=\"127.0.0.1:{}\"}}",
            target.port
        ),
    );
    let received = metric(
        &text,
        &format!(
            "lhnet_backup_egress_receive_bytes_total{{listener=\"egress\",target=\"127.0.0.1:{}\"}}",
            target.port
        ),
    );
    assert_eq!((sent, received), (Some(8.0), Some(4.0)), "{text}");
    common::promtool_check(&text);
    // The dashboard's backup panels ask for series lhnet really has.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sidecar-manifests/examples/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .filter(|e| e.contains("lhnet_backup_egress"))
        .collect();
    assert!(exprs.len() >= 3, "{exprs:?}");
    for expr in exprs {
        let name = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .find(|w| w.starts_with("lhnet_backup_egress"))
            .unwrap();
        assert!(
            text.contains(&format!("{name}{{")),
            "the dashboard asks for {name}, which lhnet does not export"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_hold_at_most_max_connections() {
    let (_proxy, addr) = egress_proxy("127.0.0.1", 2).await;
    let silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third is closed at once.
    let (_, answer) = exchange(addr, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n");
    assert!(answer.is_empty(), "{answer}");
    drop(silent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Once they leave, clients are served again (the refusal is an answer).
    let watch = Server::counting();
    let (_, answer) = exchange(addr, &connect(&format!("127.0.0.2:{}", watch.port)));
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}

#[test]
fn an_http_connect_listener_binds_loopback_only() {
    let yaml = "listeners:\n  - name: egress\n    kind: http_connect\n    address: 0.0.0.0:8520\n";
    let text = Config::parse(yaml, "x").unwrap_err().to_string();
    assert!(
        text.contains("listeners[0].address") && text.contains("bind it on loopback"),
        "{text}"
    );
    let yaml = "listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n      - { match: { prefix: / }, local: longhorn_engine_proxy, backup_egress: nope }\n";
    let text = Config::parse(yaml, "x").unwrap_err().to_string();
    assert!(
        text.contains("backup_egress: no listener named \"nope\""),
        "{text}"
    );
}
