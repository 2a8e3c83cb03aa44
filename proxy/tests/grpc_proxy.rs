//! The real proxy, started in-process on port 0, with real tonic servers behind it and real
//! HTTP/2 clients in front.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use lhnet_proto::echo::echo_client::EchoClient;
use lhnet_proto::echo::{EchoReply, EchoRequest};
use lhnet_proto::echo_server::{self, RunningEcho, ECHO_HEADER, FAIL_AFTER_HEADER};
use lhnet_proxy::app::{self, Options, RunningProxy};
use lhnet_proxy::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;

const ECHO: &str = "/lhnet.echo.v1.Echo/";

async fn echo(name: &str) -> RunningEcho {
    echo_server::spawn("127.0.0.1:0".parse().unwrap(), name)
        .await
        .unwrap()
}

/// A port nothing listens on: bound, then released.
fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Starts the proxy with one listener `m` whose routes and clusters are given as YAML.
async fn proxy(routes: &str, clusters: &str) -> RunningProxy {
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\ndrain_timeout: 2s\n\
         listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n{routes}\nclusters:\n{clusters}\n"
    );
    let config = Config::parse(&yaml, "test").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    app::start(config, Options::default()).await.unwrap()
}

fn echo_route_to(cluster: &str) -> String {
    format!("      - match: {{ prefix: {ECHO} }}\n        cluster: {cluster}\n")
}

fn static_cluster(name: &str, endpoints: &[SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
    format!(
        "  - {{ name: {name}, endpoints: [{}], connect_timeout: 1s, upstream_bind_config: {{ source_address: storage }} }}\n",
        list.join(", ")
    )
}

async fn client(p: &RunningProxy) -> EchoClient<Channel> {
    let addr = p.listener_addr("m").unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    EchoClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn req(payload: &[u8]) -> EchoRequest {
    EchoRequest {
        payload: payload.to_vec(),
        count: 0,
        delay_ms: 0,
    }
}

async fn admin_get(p: &RunningProxy, path: &str) -> (u16, String) {
    admin_request(p.admin_addr(), "GET", path).await
}

async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn every_call_shape_passes_through_with_metadata_and_trailers() {
    let up = echo("up").await;
    let p = proxy(&echo_route_to("up"), &static_cluster("up", &[up.addr])).await;
    let mut c = client(&p).await;

    // Unary, with request metadata echoed back as response metadata.
    let mut r = tonic::Request::new(req(b"hello"));
    r.metadata_mut().insert(ECHO_HEADER, "abc".parse().unwrap());
    let reply = c.unary(r).await.unwrap();
    assert_eq!(reply.metadata().get(ECHO_HEADER).unwrap(), "abc");
    assert_eq!(reply.get_ref().payload, b"hello");
    assert_eq!(reply.get_ref().server, "up");

    // Client streaming.
    let msgs = tokio_stream::iter((0..10).map(|_| req(&[1u8; 1000])));
    let reply = c.client_stream(msgs).await.unwrap().into_inner();
    assert_eq!((reply.messages, reply.payload), (10, b"10000".to_vec()));

    // Server streaming, ending with a non-OK status in the trailers after data.
    let mut r = tonic::Request::new(EchoRequest {
        payload: b"x".to_vec(),
        count: 5,
        delay_ms: 0,
    });
    r.metadata_mut()
        .insert(FAIL_AFTER_HEADER, "3".parse().unwrap());
    let mut stream = c.server_stream(r).await.unwrap().into_inner();
    let mut got = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("stream ended without the server's error"),
            Err(status) => break status,
        }
    };
    assert_eq!(got, 3);
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "stopped after 3 replies, as asked");

    // Bidi: replies interleave with requests.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3u8 {
        tx.send(req(&[i])).await.unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!((reply.payload, reply.messages), (vec![i], u32::from(i) + 1));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    // A 1 MiB message both ways.
    let big = vec![42u8; 1 << 20];
    assert_eq!(
        c.unary(req(&big)).await.unwrap().into_inner().payload.len(),
        1 << 20
    );
}

#[tokio::test]
async fn unknown_route_is_unimplemented() {
    let up = echo("up").await;
    let routes = format!("      - match: {{ path: {ECHO}Unary }}\n        cluster: up\n");
    let p = proxy(&routes, &static_cluster("up", &[up.addr])).await;
    let mut c = client(&p).await;
    assert!(c.unary(req(b"a")).await.is_ok());
    let status = c
        .client_stream(tokio_stream::iter(vec![req(b"a")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(
        status
            .message()
            .contains("no route for /lhnet.echo.v1.Echo/ClientStream on listener m"),
        "{status:?}"
    );
}

#[tokio::test]
async fn dead_upstream_is_unavailable_quickly_and_says_where() {
    let dead = dead_port();
    let p = proxy(&echo_route_to("gone"), &static_cluster("gone", &[dead])).await;
    let mut c = client(&p).await;
    let started = tokio::time::Instant::now();
    let status = c.unary(req(b"a")).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Code::Unavailable);
    let msg = status.message();
    for part in [
        "upstream connect error",
        &dead.to_string(),
        "listener m",
        "route m/0",
        "cluster gone",
    ] {
        assert!(msg.contains(part), "{part:?} missing from {msg:?}");
    }
    let (_, metrics) = admin_get(&p, "/metrics").await;
    assert!(
        metrics
            .contains("lhnet_upstream_connect_errors_total{cluster=\"gone\",reason=\"refused\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn grpc_timeout_gives_deadline_exceeded() {
    let up = echo("slow").await;
    // The client asks for 10 s; the route caps grpc-timeout at 200 ms, so the proxy (not the
    // client's own timer) ends the call.
    let routes = format!(
        "      - match: {{ prefix: {ECHO} }}\n        cluster: up\n        max_stream_duration: {{ grpc_timeout_header_max: 200ms }}\n"
    );
    let p = proxy(&routes, &static_cluster("up", &[up.addr])).await;
    let mut c = client(&p).await;
    let mut r = tonic::Request::new(EchoRequest {
        payload: vec![],
        count: 0,
        delay_ms: 3000,
    });
    r.set_timeout(Duration::from_secs(10));
    let started = tokio::time::Instant::now();
    let status = c.unary(r).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("deadline of 200ms exceeded"),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A bidi call to `upstream` through a route whose timeout is 300 ms, its first message sent:
/// the proxy, the client's sending side (open while held) and the replies.
async fn bidi_past_a_route_timeout(
    upstream: SocketAddr,
) -> (
    RunningProxy,
    tokio::sync::mpsc::Sender<EchoRequest>,
    tonic::Streaming<EchoReply>,
) {
    let routes = format!(
        "      - match: {{ prefix: {ECHO} }}\n        cluster: up\n        timeout: 300ms\n"
    );
    let p = proxy(&routes, &static_cluster("up", &[upstream])).await;
    let mut c = client(&p).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let replies = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(req(b"a")).await.unwrap();
    (p, tx, replies)
}

#[tokio::test]
async fn route_timeout_caps_a_stream_with_trailers() {
    let up = echo("up").await;
    // A bidi stream that stays open: headers arrive, then the route timeout ends it.
    let (_p, tx, mut replies) = bidi_past_a_route_timeout(up.addr).await;
    assert!(replies.message().await.unwrap().is_some());
    let status = replies.message().await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(tx);
}

/// An upstream that answers each request's headers at once and then reads its body, reporting
/// how the body ended: `Ok(bytes)` at its end, `Err(reason)` when the stream was reset.
async fn body_watching_upstream() -> (
    SocketAddr,
    tokio::sync::mpsc::Receiver<Result<usize, String>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let mut conn = h2::server::handshake(tcp).await.unwrap();
        while let Some(Ok((request, mut respond))) = conn.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                let _keep = respond.send_response(response, false).unwrap();
                let mut body = request.into_body();
                let mut read = 0;
                let ended = loop {
                    match body.data().await {
                        Some(Ok(chunk)) => {
                            read += chunk.len();
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        Some(Err(e)) => break Err(format!("{:?}", e.reason())),
                        None => break Ok(read),
                    }
                };
                let _ = tx.send(ended).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn a_stream_past_its_deadline_is_reset_upstream_while_its_client_holds_it_open() {
    let (up, mut ended) = body_watching_upstream().await;
    let (_p, tx, mut replies) = bidi_past_a_route_timeout(up).await;
    let status = replies.message().await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The client keeps its side open; lhnet gave the call up, so the upstream stream must not
    // wait for the client: it is reset (CANCEL) soon after the deadline.
    let seen = tokio::time::timeout(Duration::from_secs(3), ended.recv())
        .await
        .expect("the upstream stream was still open 3 s after the call's deadline")
        .unwrap();
    assert_eq!(seen, Err("Some(CANCEL)".to_string()));
    drop(tx);
}

#[tokio::test]
async fn retry_on_connect_failure_reaches_the_second_endpoint() {
    let live = echo("live").await;
    let dead = dead_port();
    let routes = format!(
        "      - match: {{ prefix: {ECHO} }}\n        cluster: pair\n        retry_policy: {{ retry_on: connect-failure, num_retries: 1 }}\n"
    );
    let p = proxy(&routes, &static_cluster("pair", &[dead, live.addr])).await;
    let mut c = client(&p).await;
    for _ in 0..4 {
        let reply = c.unary(req(b"r")).await.unwrap().into_inner();
        assert_eq!(reply.server, "live");
    }
    // Without the retry policy half of the calls fail.
    let p2 = proxy(
        &echo_route_to("pair"),
        &static_cluster("pair", &[dead, live.addr]),
    )
    .await;
    let mut c2 = client(&p2).await;
    let mut failures = 0;
    for _ in 0..4 {
        if c2.unary(req(b"r")).await.is_err() {
            failures += 1;
        }
    }
    assert_eq!(failures, 2);
}

#[tokio::test]
async fn upstream_connections_are_pooled() {
    let up = echo("up").await;
    let p = proxy(&echo_route_to("up"), &static_cluster("up", &[up.addr])).await;
    let mut c = client(&p).await;
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.unary(req(b"p")).await.map(|_| ()) })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    c.unary(req(b"p")).await.unwrap();
    // At most max_connections_per_endpoint (4) for 200 concurrent calls.
    assert!(
        up.accepted() <= 4,
        "{} upstream connections for 201 calls",
        up.accepted()
    );

    // One call at a time: they all share a single connection.
    let single = echo("single").await;
    let p = proxy(&echo_route_to("s"), &static_cluster("s", &[single.addr])).await;
    let mut c = client(&p).await;
    for _ in 0..100 {
        c.unary(req(b"p")).await.unwrap();
    }
    assert_eq!(single.accepted(), 1);
}

/// A burst of calls past what one upstream connection takes before its task writes
/// (`UNWRITTEN_REQUESTS`, 256): the rest wait for the writes, and every call is answered.
#[tokio::test]
async fn a_burst_past_the_unwritten_request_limit_is_answered_over_one_connection() {
    let up = echo("burst").await;
    let cluster = format!(
        "  - {{ name: b, endpoints: [{}], max_connections_per_endpoint: 1, \
         circuit_breakers: {{ max_requests: 2000, max_requests_per_downstream_connection: 200 }}, \
         upstream_bind_config: {{ source_address: storage }} }}\n",
        up.addr
    );
    let p = proxy(&echo_route_to("b"), &cluster).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(client(&p).await);
    }
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let payload = format!("call {i}");
            tokio::spawn(async move {
                let reply = c.unary(req(payload.as_bytes())).await?;
                Ok::<_, tonic::Status>((payload, reply.into_inner().payload))
            })
        })
        .collect();
    let all = async {
        for call in calls {
            let (sent, got) = call.await.unwrap().unwrap();
            assert_eq!(got, sent.into_bytes(), "a reply went to the wrong call");
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("calls past the limit were never let through");
    assert_eq!(
        up.accepted(),
        1,
        "the calls did not share one upstream connection"
    );
}

#[tokio::test]
async fn metrics_pass_promtool_and_show_the_request() {
    let up = echo("up").await;
    let routes = format!(
        "{}      - match: {{ prefix: /grpc.health.v1.Health/ }}\n        local: health\n",
        echo_route_to("up")
    );
    let p = proxy(&routes, &static_cluster("up", &[up.addr])).await;
    let mut c = client(&p).await;
    c.unary(req(b"m")).await.unwrap();
    // An HTTP/1 client: a limit counted (and the series checked by promtool below).
    let mut h1 = tokio::net::TcpStream::connect(p.listener_addr("m").unwrap())
        .await
        .unwrap();
    h1.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    h1.read_to_end(&mut reply).await.unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 505"));

    let (status, text) = admin_get(&p, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "lhnet_limits_reached_total{limit=\"http2_only\",listener=\"m\"} 1",
        "lhnet_downstream_connections{listener=\"m\"} 1",
        "lhnet_requests_total{grpc_code=\"0\",grpc_method=\"Unary\",grpc_service=\"lhnet.echo.v1.Echo\",listener=\"m\",route=\"m/0\"} 1",
        "lhnet_request_duration_seconds_count{listener=\"m\",route=\"m/0\"} 1",
        "lhnet_upstream_connections{cluster=\"up\",network=\"loopback\"} 1",
        "lhnet_storage_address_info{address=\"127.0.0.1\",device=\"lo\",source=\"interface\"} 1",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    assert!(
        text.contains("lhnet_interface_receive_bytes_total{device=\"lo\",network=\"loopback\"}")
    );
    assert!(text.contains("lhnet_network_transmit_bytes_total{device=\"lo\"}"));

    common::promtool_check(&text);
}

#[tokio::test]
async fn admin_endpoints() {
    let up = echo("up").await;
    let p = proxy(&echo_route_to("up"), &static_cluster("up", &[up.addr])).await;
    assert_eq!(admin_get(&p, "/live").await.0, 200);
    assert_eq!(admin_get(&p, "/ready").await, (200, "ready\n".into()));
    let (_, storage) = admin_get(&p, "/storage").await;
    let storage: serde_json::Value = serde_json::from_str(&storage).unwrap();
    assert_eq!(storage["address"], "127.0.0.1");
    assert_eq!(storage["source"], "interface");
    let (_, dump) = admin_get(&p, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["clusters"][0]["name"], "up");
    assert_eq!(admin_get(&p, "/nope").await.0, 404);
    assert_eq!(admin_get(&p, "/shutdown").await.0, 405);
    let (status, _) = admin_request(p.admin_addr(), "POST", "/shutdown").await;
    assert_eq!(status, 200);
    tokio::time::timeout(Duration::from_secs(5), p.wait())
        .await
        .expect("shutdown finishes");
}

#[tokio::test]
async fn local_health_answers_serving() {
    let routes = "      - match: { prefix: /grpc.health.v1.Health/ }\n        local: health\n";
    let p = proxy(routes, "  []").await;
    let addr = p.listener_addr("m").unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = lhnet_proto::health::health_client::HealthClient::new(channel);
    let r = h
        .check(lhnet_proto::health::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().status, 1);
    let mut w = h
        .watch(lhnet_proto::health::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.message().await.unwrap().unwrap().status, 1);
    let (_, text) = admin_get(&p, "/metrics").await;
    assert!(
        text.contains("grpc_method=\"Check\",grpc_service=\"grpc.health.v1.Health\""),
        "{text}"
    );
}

/// One raw HTTP/2 connection, so several requests can share it on purpose.
async fn raw_h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

fn grpc_frame(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut f = vec![flag];
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    f
}

/// Sends a raw gRPC request and returns (grpc-status, grpc-message) from headers or trailers.
async fn raw_call(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    body: Vec<u8>,
) -> (i32, String) {
    let request = http::Request::post(format!("http://proxy{ECHO}Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    send.ready().await.unwrap();
    let response = send.send_request(request).await.unwrap();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let source = if headers.contains_key("grpc-status") {
        &headers
    } else {
        &trailers
    };
    let code = source["grpc-status"].to_str().unwrap().parse().unwrap();
    let msg = source
        .get("grpc-message")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (code, msg)
}

#[tokio::test]
async fn bad_frames_and_oversized_messages_are_refused_and_the_connection_lives_on() {
    let up = echo("up").await;
    let p = proxy(&echo_route_to("up"), &static_cluster("up", &[up.addr])).await;
    let mut send = raw_h2(p.listener_addr("m").unwrap()).await;
    let good = prost::Message::encode_to_vec(&req(b"fine"));

    let (code, msg) = raw_call(&mut send, grpc_frame(7, &good)).await;
    assert_eq!(code, 3, "{msg}");
    assert!(msg.contains("compressed-flag byte is 7"), "{msg}");

    let mut truncated = grpc_frame(0, &good);
    truncated.truncate(truncated.len() - 2);
    let (code, msg) = raw_call(&mut send, truncated).await;
    assert_eq!(code, 3, "{msg}");
    assert!(msg.contains("ends inside a message"), "{msg}");

    // Over the default 4 MiB limit: RESOURCE_EXHAUSTED, decided from the frame header alone.
    let huge = prost::Message::encode_to_vec(&req(&vec![0u8; 5 << 20]));
    let (code, msg) = raw_call(&mut send, grpc_frame(0, &huge)).await;
    assert_eq!(code, 8, "{msg}");
    assert!(
        msg.contains("larger than max_message_size (4194304 bytes)"),
        "{msg}"
    );

    // The same connection still serves a good request.
    assert_eq!(raw_call(&mut send, grpc_frame(0, &good)).await.0, 0);

    // A request that is not gRPC at all.
    let request = http::Request::post(format!("http://proxy{ECHO}Unary"))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"hi")))
        .unwrap();
    send.ready().await.unwrap();
    let response = send.send_request(request).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "3");
}

#[tokio::test]
async fn a_stalled_client_does_not_hold_others_back() {
    let up = echo("up").await;
    let p = proxy(&echo_route_to("up"), &static_cluster("up", &[up.addr])).await;
    let addr = p.listener_addr("m").unwrap();

    // Open streams that send headers and half a message, then stall.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake::<_, _, http_body_util::StreamBody<_>>(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .unwrap();
        tokio::spawn(conn);
        let (tx, rx) = tokio::sync::mpsc::channel::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >(1);
        tx.send(Ok(http_body::Frame::data(Bytes::from(vec![
            0u8, 0, 0, 1, 0, 1, 2,
        ]))))
        .await
        .unwrap();
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let request = http::Request::post(format!("http://proxy{ECHO}ClientStream"))
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap();
        let pending = tokio::spawn(async move { send.send_request(request).await.map(|_| ()) });
        stalled.push((tx, pending));
    }

    let mut c = client(&p).await;
    let started = tokio::time::Instant::now();
    for _ in 0..50 {
        c.unary(req(b"ok")).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
}

#[tokio::test]
async fn reload_swaps_routes_without_dropping_streams() {
    let a = echo("a").await;
    let b = echo("b").await;
    let clusters = format!(
        "{}{}",
        static_cluster("a", &[a.addr]),
        static_cluster("b", &[b.addr])
    );
    let p = proxy(&echo_route_to("a"), &clusters).await;
    let mut c = client(&p).await;

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut open = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(req(b"1")).await.unwrap();
    assert_eq!(open.message().await.unwrap().unwrap().server, "a");

    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
         listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n{}\nclusters:\n{clusters}\n",
        echo_route_to("b")
    );
    p.reload(Config::parse(&yaml, "new").unwrap()).unwrap();
    assert_eq!(c.unary(req(b"x")).await.unwrap().into_inner().server, "b");
    // The stream opened before the reload still works.
    tx.send(req(b"2")).await.unwrap();
    assert_eq!(open.message().await.unwrap().unwrap().server, "a");

    let moved = yaml.replace(
        "name: m\n    address: 127.0.0.1:0",
        "name: m\n    address: 127.0.0.1:1",
    );
    let err = p
        .reload(Config::parse(&moved, "moved").unwrap())
        .unwrap_err();
    assert!(err.contains("restart"), "{err}");
    let (_, text) = admin_get(&p, "/metrics").await;
    assert!(
        text.contains("lhnet_config_reloads_total{result=\"success\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("lhnet_config_reloads_total{result=\"failure\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn shutdown_drains_in_flight_calls() {
    let up = echo("up").await;
    let p = proxy(&echo_route_to("up"), &static_cluster("up", &[up.addr])).await;
    let mut c = client(&p).await;
    let slow = tokio::spawn(async move {
        c.unary(EchoRequest {
            payload: b"late".to_vec(),
            count: 0,
            delay_ms: 500,
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = p.listener_addr("m").unwrap();
    tokio::time::timeout(Duration::from_secs(5), p.shutdown())
        .await
        .expect("drain within drain_timeout");
    assert_eq!(slow.await.unwrap().unwrap().into_inner().payload, b"late");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still accepting"
    );
}

#[tokio::test]
async fn idle_connections_close_and_dead_addresses_back_off() {
    let up = echo("up").await;
    let dead = dead_port();
    let routes = format!(
        "      - match: {{ path: {ECHO}Unary }}\n        cluster: up\n      - match: {{ path: {ECHO}Bidi }}\n        cluster: gone\n"
    );
    let clusters = format!(
        "  - {{ name: up, endpoints: [{}], idle_timeout: 200ms }}\n{}",
        up.addr,
        static_cluster("gone", &[dead])
    );
    let p = proxy(&routes, &clusters).await;
    let mut c = client(&p).await;
    c.unary(req(b"i")).await.unwrap();
    let gauge = "lhnet_upstream_connections{cluster=\"up\",network=\"loopback\"}";
    assert!(admin_get(&p, "/metrics")
        .await
        .1
        .contains(&format!("{gauge} 1")));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, text) = admin_get(&p, "/metrics").await;
    assert!(
        text.contains(&format!("{gauge} 0")),
        "idle connection still open:\n{text}"
    );

    // A dead address is dialled once; calls right after fail fast without dialling again.
    let call = || {
        let mut c = c.clone();
        async move {
            c.bidi(tokio_stream::iter(vec![req(b"d")]))
                .await
                .unwrap_err()
        }
    };
    assert_eq!(call().await.code(), Code::Unavailable);
    let status = call().await;
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("not dialling again"),
        "{status:?}"
    );
    let (_, text) = admin_get(&p, "/metrics").await;
    assert!(
        text.contains("lhnet_upstream_connect_errors_total{cluster=\"gone\",reason=\"refused\"} 1"),
        "{text}"
    );
}

/// A stand-in instance-manager answering `/ProcessManagerService/VersionGet` with a fixed
/// encoded VersionResponse (a real HTTP/2 server; the message is what Longhorn's IM sends).
async fn fake_instance_manager(message: Vec<u8>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let message = message.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| {
                        let framed = Bytes::from(grpc_frame(0, &message));
                        async move {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            let frames = vec![
                                Ok::<_, std::convert::Infallible>(http_body::Frame::data(framed)),
                                Ok(http_body::Frame::trailers(trailers)),
                            ];
                            let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
                            let mut response = http::Response::new(body);
                            response
                                .headers_mut()
                                .insert("content-type", "application/grpc".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    addr
}

async fn version_get_through(p: &RunningProxy) -> Vec<u8> {
    let mut send = raw_h2(p.listener_addr("m").unwrap()).await;
    let request = http::Request::post("http://proxy/ProcessManagerService/VersionGet")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(grpc_frame(0, &[]))))
        .unwrap();
    send.ready().await.unwrap();
    let response = send.send_request(request).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    let bytes = collected.to_bytes();
    assert_eq!(
        u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize,
        bytes.len() - 5
    );
    bytes[5..].to_vec()
}

#[tokio::test]
async fn process_manager_version_advertises_the_proxy_api() {
    // An instance-manager without a proxy: {1: "v1", 4: 1, 5: 1}.
    let old_im = fake_instance_manager(vec![0x0a, 2, b'v', b'1', 0x20, 1, 0x28, 1]).await;
    let routes = "      - match: { prefix: /ProcessManagerService/ }\n        cluster: im\n";
    let p = proxy(routes, &static_cluster("im", &[old_im])).await;
    let message = version_get_through(&p).await;
    assert_eq!(
        message,
        vec![0x0a, 2, b'v', b'1', 0x20, 1, 0x28, 1, 0x30, 2, 0x38, 1]
    );

    // One that has its own proxy API (6: 3) keeps it; the missing 7 is added.
    let new_im = fake_instance_manager(vec![0x0a, 2, b'v', b'2', 0x30, 3]).await;
    let p = proxy(routes, &static_cluster("im", &[new_im])).await;
    assert_eq!(
        version_get_through(&p).await,
        vec![0x0a, 2, b'v', b'2', 0x30, 3, 0x38, 1]
    );
}

/// `POST /shutdown` trusts loopback peers, and a `kind: tcp` forward to `loopback` arrives
/// from loopback: lhnet never forwards to its own admin port, even when a config that
/// validation refuses is started anyway.
#[tokio::test]
async fn a_tcp_forward_never_reaches_the_admin_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let covering = format!(
        "admin: {{ address: 127.0.0.1:{port} }}\nstorage_network: {{ interface: lo }}\n\
         listeners:\n  - {{ name: t, kind: tcp, address: \"storage:{}-{}\", cluster: loopback }}\n",
        port - 1,
        port + 1
    );
    let refused = Config::parse(&covering, "test").unwrap_err().to_string();
    assert!(
        refused.contains(&format!("cover the admin port {port}")),
        "{refused}"
    );

    // Past validation: the listener moved onto the admin port on another loopback address.
    let mut config = Config::parse(
        &format!(
            "admin: {{ address: 127.0.0.1:{port} }}\nstorage_network: {{ interface: lo }}\n\
             listeners:\n  - {{ name: t, kind: tcp, address: \"10.0.0.1:7000\", cluster: loopback }}\n"
        ),
        "test",
    )
    .unwrap();
    config.listeners[0].address =
        lhnet_proxy::config::ListenAddress::Socket(SocketAddr::from(([127, 0, 0, 2], port)));
    let p = app::start(config, Options::default()).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.2", port))
        .await
        .unwrap();
    let _ = s
        .write_all(b"POST /shutdown HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert_eq!(admin_get(&p, "/live").await.0, 200, "lhnet is still up");
}

/// A reload keeps a cluster whose config did not change, with its upstream connections; a
/// changed cluster is built anew (and dials anew).
#[tokio::test]
async fn reload_keeps_unchanged_clusters_and_their_connections() {
    let up = echo("up").await;
    let p = proxy(&echo_route_to("up"), &static_cluster("up", &[up.addr])).await;
    let mut c = client(&p).await;
    c.unary(req(b"1")).await.unwrap();
    assert_eq!(up.accepted(), 1);
    let yaml = |cluster: String| {
        format!(
            "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
             listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n{}\nclusters:\n{cluster}\n",
            echo_route_to("up")
        )
    };
    // The same cluster (the routes' table is rebuilt): the pooled connection carries on.
    p.reload(Config::parse(&yaml(static_cluster("up", &[up.addr])), "same").unwrap())
        .unwrap();
    c.unary(req(b"2")).await.unwrap();
    assert_eq!(up.accepted(), 1, "an unchanged cluster dialled again");
    // A changed cluster: new pools, a new connection.
    let changed =
        static_cluster("up", &[up.addr]).replace("connect_timeout: 1s", "connect_timeout: 2s");
    p.reload(Config::parse(&yaml(changed), "changed").unwrap())
        .unwrap();
    c.unary(req(b"3")).await.unwrap();
    assert_eq!(
        up.accepted(),
        2,
        "a changed cluster kept its old connections"
    );
}
