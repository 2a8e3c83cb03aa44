//! The listener and cluster limits, each met on purpose by a client that misbehaves, while a
//! well-behaved client on the same route is still served.

use std::net::SocketAddr;
use std::time::Duration;

mod common;

use common::limit_count;

use common::raw_h2::{frame, frames, grpc_message, headers_frame, EMPTY_SETTINGS, PREFACE};
use lhnet_proto::echo::echo_client::EchoClient;
use lhnet_proto::echo::EchoRequest;
use lhnet_proto::echo_server::{self, RunningEcho};
use lhnet_proxy::app::{self, Options, RunningProxy};
use lhnet_proxy::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::Code;

const UNARY: &str = "/lhnet.echo.v1.Echo/Unary";

/// lhnet with one listener `m` (plus `listener_keys`) routing the echo service to `echo`.
async fn proxy(listener_keys: &str, breakers: &str) -> (RunningProxy, RunningEcho) {
    let echo = echo_server::spawn("127.0.0.1:0".parse().unwrap(), "up")
        .await
        .unwrap();
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
         listeners:\n  - name: m\n    address: 127.0.0.1:0\n{listener_keys}    routes:\n      \
         - {{ match: {{ prefix: /lhnet.echo.v1.Echo/ }}, cluster: echo }}\n\
         clusters:\n  - {{ name: echo, endpoints: [{}]{breakers} }}\n",
        echo.addr
    );
    let config = Config::parse(&yaml, "test").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    (app::start(config, Options::default()).await.unwrap(), echo)
}

/// A new client connection (tonic opens one per channel).
async fn connection(p: &RunningProxy) -> EchoClient<Channel> {
    let addr = p.listener_addr("m").unwrap();
    EchoClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

fn call(delay_ms: u32) -> EchoRequest {
    EchoRequest {
        payload: b"x".to_vec(),
        count: 0,
        delay_ms,
    }
}

async fn metrics(p: &RunningProxy) -> String {
    let mut s = TcpStream::connect(p.admin_addr()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Reads until lhnet closes the connection (or `within` passes): what it sent.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|_| out)
}

/// Reads until lhnet ends `stream` with a HEADERS frame (its answer's trailers).
async fn stream_ends(raw: &mut TcpStream, stream: u32) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = raw.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
        if frames(&got)
            .iter()
            .any(|(kind, flags, id, _)| *kind == 0x1 && flags & 0x1 != 0 && *id == stream)
        {
            return;
        }
    }
}

/// Starts `n` calls on `client`'s one connection, each answered after `delay_ms`, and gives
/// them time to reach lhnet: their results, to await.
async fn hold(
    client: &EchoClient<Channel>,
    n: usize,
    delay_ms: u32,
) -> Vec<
    tokio::task::JoinHandle<Result<tonic::Response<lhnet_proto::echo::EchoReply>, tonic::Status>>,
> {
    let held = (0..n)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.unary(call(delay_ms)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    held
}

#[tokio::test]
async fn one_connection_cannot_hold_a_whole_cluster() {
    // max_requests 8: one connection may hold a quarter, 2.
    let (p, _echo) = proxy("", ", circuit_breakers: { max_requests: 8 }").await;
    let greedy = connection(&p).await;
    let held = hold(&greedy, 8, 1500).await;
    // Another client is served while the greedy one holds all it may.
    let mut other = connection(&p).await;
    other.unary(call(0)).await.expect("another client's call");
    let mut refused = 0;
    for h in held {
        match h.await.unwrap() {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("max_requests_per_downstream_connection (2) of cluster echo"),
                    "{status:?}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 6, "the greedy connection keeps 2 of 8 slots");
    assert_eq!(
        limit_count(
            &metrics(&p).await,
            "echo",
            "max_requests_per_downstream_connection"
        ),
        6.0
    );
}

#[tokio::test]
async fn without_the_share_one_connection_locks_the_cluster() {
    // The same client with the share raised to the whole cluster: the others are refused,
    // which is what the default share prevents.
    let breakers =
        ", circuit_breakers: { max_requests: 4, max_requests_per_downstream_connection: 4 }";
    let (p, _echo) = proxy("", breakers).await;
    let greedy = connection(&p).await;
    let held = hold(&greedy, 4, 1000).await;
    let status = connection(&p).await.unary(call(0)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains("circuit_breakers.max_requests (4)"),
        "{status:?}"
    );
    for h in held {
        h.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_header_only_stream_takes_no_slot_and_times_out() {
    let (p, _echo) = proxy(
        "    stream_idle_timeout: 300ms\n",
        ", circuit_breakers: { max_requests: 1, max_requests_per_downstream_connection: 1 }",
    )
    .await;
    let addr = p.listener_addr("m").unwrap();
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let mut out = PREFACE.to_vec();
    out.extend_from_slice(&EMPTY_SETTINGS);
    out.extend_from_slice(&headers_frame(1, UNARY));
    raw.write_all(&out).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The cluster's only slot is free: the header-only stream did not take it.
    connection(&p)
        .await
        .unary(call(0))
        .await
        .expect("the slot is free");
    // Its own answer comes when stream_idle_timeout passes: HEADERS ending stream 1.
    let ended = tokio::time::timeout(Duration::from_secs(3), stream_ends(&mut raw, 1)).await;
    assert!(ended.is_ok(), "no answer to the header-only stream");
    assert_eq!(
        limit_count(&metrics(&p).await, "m", "stream_idle_timeout"),
        1.0
    );
}

#[tokio::test]
async fn silent_and_wordless_connections_are_closed_after_request_headers_timeout() {
    let (p, _echo) = proxy("    request_headers_timeout: 300ms\n", "").await;
    let addr = p.listener_addr("m").unwrap();
    // Never a byte.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(
        read_until_closed(&mut silent, Duration::from_secs(3))
            .await
            .is_some(),
        "a silent connection stays open"
    );
    // The preface and SETTINGS, then no request: GOAWAY, then closed.
    let mut wordless = TcpStream::connect(addr).await.unwrap();
    let mut out = PREFACE.to_vec();
    out.extend_from_slice(&EMPTY_SETTINGS);
    wordless.write_all(&out).await.unwrap();
    let sent = read_until_closed(&mut wordless, Duration::from_secs(4))
        .await
        .expect("a connection that sends no request stays open");
    assert!(
        frames(&sent).iter().any(|(kind, ..)| *kind == 0x7),
        "no GOAWAY before closing"
    );
    assert!(limit_count(&metrics(&p).await, "m", "request_headers_timeout") >= 2.0);
    // A real client is unaffected.
    connection(&p).await.unary(call(0)).await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_gets_goaway_after_idle_timeout() {
    let (p, _echo) = proxy("    idle_timeout: 300ms\n", "").await;
    let addr = p.listener_addr("m").unwrap();
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let mut out = PREFACE.to_vec();
    out.extend_from_slice(&EMPTY_SETTINGS);
    out.extend_from_slice(&headers_frame(1, UNARY));
    // One empty message, END_STREAM: a whole unary call.
    out.extend_from_slice(&frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    raw.write_all(&out).await.unwrap();
    let sent = read_until_closed(&mut raw, Duration::from_secs(4))
        .await
        .expect("an idle connection stays open");
    let kinds: Vec<u8> = frames(&sent).iter().map(|(kind, ..)| *kind).collect();
    let answered = kinds
        .iter()
        .position(|k| *k == 0x1)
        .expect("the call was answered");
    let goaway = kinds.iter().position(|k| *k == 0x7).expect("GOAWAY");
    assert!(answered < goaway, "{kinds:?}");
    assert_eq!(limit_count(&metrics(&p).await, "m", "idle_timeout"), 1.0);
}

#[tokio::test]
async fn at_max_connections_a_new_client_takes_a_silent_ones_place() {
    let (p, _echo) = proxy("    max_connections: 3\n", "").await;
    let addr = p.listener_addr("m").unwrap();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(addr).await.unwrap());
        // Accepted in this order: the first is the oldest.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    connection(&p)
        .await
        .unary(call(0))
        .await
        .expect("a real client at max_connections");
    assert!(
        read_until_closed(&mut silent[0], Duration::from_secs(2))
            .await
            .is_some(),
        "the oldest silent connection made room"
    );
    assert!(limit_count(&metrics(&p).await, "m", "max_connections") >= 1.0);
}

#[tokio::test]
async fn past_max_requests_a_listener_refuses_naming_the_limit() {
    let (p, _echo) = proxy("    max_requests: 2\n", "").await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let p_addr = p.listener_addr("m").unwrap();
            tokio::spawn(async move {
                let mut c = EchoClient::connect(format!("http://{p_addr}"))
                    .await
                    .unwrap();
                c.unary(call(1000)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = connection(&p).await.unary(call(0)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("listener m has max_requests (2)"),
        "{status:?}"
    );
    for h in held {
        h.await.unwrap().unwrap();
    }
    connection(&p).await.unary(call(0)).await.unwrap();
}

#[tokio::test]
async fn a_full_listener_gives_a_header_only_streams_place_to_a_real_call() {
    let (p, _echo) = proxy(
        "    max_requests: 6
    stream_idle_timeout: 30s
",
        "",
    )
    .await;
    let addr = p.listener_addr("m").unwrap();
    // Two connections, three header-only streams each: the listener's six places.
    let mut raws = Vec::new();
    for _ in 0..2 {
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let mut out = PREFACE.to_vec();
        out.extend_from_slice(&EMPTY_SETTINGS);
        for stream in [1, 3, 5] {
            out.extend_from_slice(&headers_frame(stream, UNARY));
        }
        raw.write_all(&out).await.unwrap();
        raws.push(raw);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A call that sends its message gets in: the oldest waiting stream gives its place up
    // (once: five wait on, and the next calls fit beside them).
    let mut client = connection(&p).await;
    for _ in 0..3 {
        client
            .unary(call(0))
            .await
            .expect("a waiting stream gives its place up");
    }
    assert_eq!(limit_count(&metrics(&p).await, "m", "max_requests"), 1.0);
    // The first connection's streams were the oldest: they were answered.
    let ended = tokio::time::timeout(Duration::from_secs(3), stream_ends(&mut raws[0], 1)).await;
    assert!(
        ended.is_ok(),
        "the oldest header-only stream was not answered"
    );
}

#[tokio::test]
async fn an_http1_client_is_told_in_http1() {
    let (p, _echo) = proxy("", "").await;
    let addr: SocketAddr = p.listener_addr("m").unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /lhnet.echo.v1.Echo/Unary HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = read_until_closed(&mut s, Duration::from_secs(3))
        .await
        .expect("closed after the reply");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 505 "), "{text}");
    assert!(
        text.contains("listener m speaks gRPC over HTTP/2"),
        "{text}"
    );
}

/// A reload of a 40,000-level nested file is refused (naming the limit, in lhnet's log) while
/// another client's calls go on; the binary, since the file watcher lives in `main`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_reload_is_refused_while_calls_go_on() {
    let echo = echo_server::spawn("127.0.0.1:0".parse().unwrap(), "up")
        .await
        .unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, admin) = (free(), free());
    let good = format!(
        "admin: {{ address: {admin} }}\nstorage_network: {{ interface: lo }}\n\
         listeners:\n  - name: m\n    address: {listen}\n    routes:\n      \
         - {{ match: {{ prefix: /lhnet.echo.v1.Echo/ }}, cluster: echo }}\n\
         clusters:\n  - {{ name: echo, endpoints: [{}] }}\n",
        echo.addr
    );
    let config = common::write_config("deep-reload", &good);
    let log = config.with_file_name("lhnet.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_lhnet-proxy"))
        .arg("--config")
        .arg(&config)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let _child = common::KillOnDrop(child);
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = EchoClient::connect(format!("http://{listen}")).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("lhnet-proxy serves");
    let deep = format!("listeners: {}{}\n", "[".repeat(40_000), "]".repeat(40_000));
    std::fs::write(&config, deep).unwrap();
    // The watcher looks every 2 s; calls go on meanwhile and after. On a loaded machine the
    // look can come late: calls go on until the refusal is logged (at most 20 s), then 1 s more.
    let mut times = Vec::new();
    let read_log = || {
        std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
            + &std::fs::read_to_string(&log).unwrap_or_default()
    };
    let refusal = "nested deeper than 64 levels (the limit on config nesting)";
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut until = give_up;
    while tokio::time::Instant::now() < until {
        let started = tokio::time::Instant::now();
        client
            .unary(call(0))
            .await
            .expect("a call during the reload");
        times.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
        if until == give_up && read_log().contains(refusal) {
            until = tokio::time::Instant::now() + Duration::from_secs(1);
        }
    }
    times.sort();
    let p99 = times[times.len() * 99 / 100];
    eprintln!("{} calls during the reload, p99 {p99:?}", times.len());
    let text = read_log();
    assert!(
        text.contains(refusal),
        "the refusal is not in the log:\n{text}"
    );
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut m = String::new();
    s.read_to_string(&mut m).await.unwrap();
    assert!(
        m.contains("lhnet_config_reloads_total{result=\"failure\"} 1"),
        "{m}"
    );
}

/// The engine proxy answers locally, so no cluster slot bounds it: a header-only VolumeGet
/// ends at stream_idle_timeout too, instead of holding a place among the listener's requests.
#[tokio::test]
async fn a_header_only_engine_call_ends_at_stream_idle_timeout() {
    let yaml = "admin: { address: 127.0.0.1:0 }\nstorage_network: { interface: lo }\n\
         listeners:\n  - name: m\n    address: 127.0.0.1:0\n    stream_idle_timeout: 300ms\n    routes:\n      \
         - { match: { prefix: /imrpc.ProxyEngineService/ }, local: longhorn_engine_proxy }\n\
         clusters:\n  - { name: engines, type: original_dst, allowed_destinations: [127.0.0.1] }\n";
    let p = app::start(Config::parse(yaml, "test").unwrap(), Options::default())
        .await
        .unwrap();
    let mut raw = TcpStream::connect(p.listener_addr("m").unwrap())
        .await
        .unwrap();
    let mut out = PREFACE.to_vec();
    out.extend_from_slice(&EMPTY_SETTINGS);
    out.extend_from_slice(&headers_frame(1, "/imrpc.ProxyEngineService/VolumeGet"));
    raw.write_all(&out).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(3), stream_ends(&mut raw, 1)).await;
    assert!(ended.is_ok(), "no answer to the header-only engine call");
    assert_eq!(
        limit_count(&metrics(&p).await, "m", "stream_idle_timeout"),
        1.0
    );
}

/// A client that reads its socket but grants no HTTP/2 window past the first 64 KiB takes
/// none of its endless reply after that: at `send_timeout` lhnet closes the connection (its
/// call upstream ends with it), where a GOAWAY would only wait behind the reply.
#[tokio::test]
async fn a_client_that_takes_none_of_its_reply_is_closed_after_send_timeout() {
    use prost::Message;
    let (p, _echo) = proxy("    send_timeout: 300ms\n", "").await;
    let mut raw = TcpStream::connect(p.listener_addr("m").unwrap())
        .await
        .unwrap();
    let request = EchoRequest {
        payload: vec![7; 1024],
        count: u32::MAX,
        delay_ms: 0,
    }
    .encode_to_vec();
    let body = grpc_message(&request);
    let mut out = PREFACE.to_vec();
    out.extend_from_slice(&EMPTY_SETTINGS);
    out.extend_from_slice(&headers_frame(1, "/lhnet.echo.v1.Echo/ServerStream"));
    out.extend_from_slice(&frame(0x0, 0x1, 1, &body));
    raw.write_all(&out).await.unwrap();
    let sent = read_until_closed(&mut raw, Duration::from_secs(3))
        .await
        .expect("a client that takes no reply is still connected 3 s on");
    let data: usize = frames(&sent)
        .iter()
        .filter(|(kind, _, id, _)| *kind == 0x0 && *id == 1)
        .map(|(.., payload)| payload.len())
        .sum();
    assert_eq!(
        data, 65_535,
        "the reply filled the client's window, and no more"
    );
    assert_eq!(limit_count(&metrics(&p).await, "m", "send_timeout"), 1.0);
    // Others are unaffected.
    connection(&p).await.unary(call(0)).await.unwrap();
}

/// What `send_timeout` is not: a call waiting on its upstream for longer (a watch with
/// nothing to say), and a long reply read as it comes, keep their connection.
#[tokio::test]
async fn calls_that_wait_on_their_upstream_or_are_read_are_not_cut_by_send_timeout() {
    use tokio_stream::StreamExt;
    let (p, _echo) = proxy("    send_timeout: 300ms\n", "").await;
    let mut client = connection(&p).await;
    let slow = client
        .unary(call(1500))
        .await
        .expect("a call 1.5 s upstream");
    assert_eq!(slow.get_ref().payload, b"x");
    let mut replies = client
        .server_stream(EchoRequest {
            payload: vec![7; 1024],
            count: 2000,
            delay_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(reply) = replies.next().await {
        reply.expect("a reply of the stream");
        n += 1;
        if n % 500 == 0 {
            // A pause shorter than send_timeout, with the window full.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    assert_eq!(n, 2000);
    assert_eq!(limit_count(&metrics(&p).await, "m", "send_timeout"), 0.0);
}
