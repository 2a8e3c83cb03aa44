//! Longhorn volumes of the simulator (an engine and its replicas, each a real gRPC server)
//! behind an in-process lhnet-proxy, and requests shaped as a v1.3.3 or a v1.12.1 manager
//! shapes them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use lhnet_proto::imrpc::proxy_engine_service_client::ProxyEngineServiceClient;
use lhnet_proto::imrpc::*;
use lhnet_proxy::app::{self, Options, RunningProxy};
use lhnet_proxy::config::Config;
pub use lhnet_sim::Release;
use lhnet_sim::{self as sim, EngineSpec, ReplicaSpec, RunningEngine, RunningReplica};
use tonic::transport::Channel;

pub const SIZE: i64 = 64 << 20;

/// Which manager a request imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    /// `ProxyEngineRequest { address }` only; no identity metadata follows.
    V1_3_3,
    /// Every field a v1.12.1 manager fills: engine and volume names, data engine v1.
    V1_12_1,
}

/// lhnet in front of the engines, and a client of its management listener.
pub struct Proxy {
    pub proxy: RunningProxy,
    pub client: ProxyEngineServiceClient<Channel>,
    pub addr: SocketAddr,
}

/// The config of an engine-proxy pod on loopback; `passthrough` is the instance-manager's
/// own proxy, when there is one.
/// The tests' S3 server (moto) listens on loopback, which lhnet's backup-target policy refuses
/// unless it is listed: the config lists it.
pub fn config(passthrough: Option<SocketAddr>) -> String {
    let (route, cluster) = match passthrough {
        Some(addr) => (
            "        passthrough_cluster: instance_manager_proxy\n".to_string(),
            format!(
                "  - name: instance_manager_proxy\n    type: static\n    endpoints: [{addr}]\n    upstream_bind_config: {{ source_address: none }}\n"
            ),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
         listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n\
         \x20     - match: {{ prefix: /imrpc.ProxyEngineService/ }}\n        local: longhorn_engine_proxy\n{route}\
         clusters:\n  - name: engines\n    type: original_dst\n    upstream_bind_config: {{ source_address: storage }}\n\
         \x20   allowed_destinations: [127.0.0.1]\n    connect_timeout: 1s\n{cluster}\
         backup_target: {{ allowed_endpoints: [127.0.0.1] }}\n"
    )
}

pub async fn start_proxy_with(passthrough: Option<SocketAddr>) -> Proxy {
    start_proxy_from(&config(passthrough)).await
}

/// lhnet from a whole config (its gRPC listener named `m`).
pub async fn start_proxy_from(yaml: &str) -> Proxy {
    let config = Config::parse(yaml, "test").unwrap();
    let proxy = app::start(config, Options::default()).await.unwrap();
    let addr = proxy.listener_addr("m").unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Proxy {
        proxy,
        client: ProxyEngineServiceClient::new(channel),
        addr,
    }
}

pub async fn start_proxy() -> Proxy {
    start_proxy_with(None).await
}

/// A volume: its engine and replicas, named as Longhorn names them (`<volume>-e-0`,
/// `<volume>-r-<i>`) and checking those names, as v1.12.1 processes do.
pub struct Volume {
    pub name: String,
    pub engine: RunningEngine,
    pub replicas: Vec<RunningReplica>,
}

pub fn engine_name(volume: &str) -> String {
    format!("{volume}-e-0")
}

pub fn replica_name(volume: &str, i: usize) -> String {
    format!("{volume}-r-{i}")
}

const LOCAL: &str = "127.0.0.1:0";

/// A replica process of `volume` named `<volume>-r-<i>`.
pub async fn replica(volume: &str, i: usize, size: i64) -> RunningReplica {
    replica_of(Release::V1_12_1, volume, i, size).await
}

pub async fn replica_of(release: Release, volume: &str, i: usize, size: i64) -> RunningReplica {
    sim::start_replica_with(
        LOCAL.parse().unwrap(),
        ReplicaSpec {
            release,
            volume: volume.into(),
            instance: replica_name(volume, i),
            size,
        },
    )
    .await
    .unwrap()
}

/// A volume of `replicas` replicas, its engine started with them (RW).
pub async fn volume(name: &str, replicas: usize) -> Volume {
    volume_sized(name, replicas, SIZE).await
}

pub async fn volume_sized(name: &str, replicas: usize, size: i64) -> Volume {
    volume_of(Release::V1_12_1, name, replicas, size).await
}

/// A volume whose engine and replicas behave as `release`'s.
pub async fn volume_of(release: Release, name: &str, replicas: usize, size: i64) -> Volume {
    let mut started = Vec::new();
    for i in 0..replicas {
        started.push(replica_of(release, name, i, size).await);
    }
    let engine = sim::start_engine_with(
        LOCAL.parse().unwrap(),
        EngineSpec {
            release,
            volume: name.into(),
            instance: engine_name(name),
            size,
            replicas: started.iter().map(|r| r.url()).collect(),
        },
    )
    .await
    .unwrap();
    Volume {
        name: name.into(),
        engine,
        replicas: started,
    }
}

impl Volume {
    pub fn addr(&self) -> SocketAddr {
        self.engine.served.addr
    }

    /// The ProxyEngineRequest of this volume's engine as `m` sends it.
    pub fn req(&self, m: Manager) -> ProxyEngineRequest {
        match m {
            Manager::V1_3_3 => ProxyEngineRequest {
                address: self.addr().to_string(),
                ..Default::default()
            },
            Manager::V1_12_1 => ProxyEngineRequest {
                address: self.addr().to_string(),
                backend_store_driver: 0,
                engine_name: engine_name(&self.name),
                volume_name: self.name.clone(),
                data_engine: 0,
                engine_frontend_name: String::new(),
            },
        }
    }

    pub fn per(&self, m: Manager) -> Option<ProxyEngineRequest> {
        Some(self.req(m))
    }

    /// Starts recording what the engine and every replica receive.
    pub fn record(&self) {
        self.engine.record().start();
        for r in &self.replicas {
            r.record().start();
        }
    }

    /// Every call the engine recorded carried this volume's and engine's names when `m` sends
    /// them (v1.12.1), and no identity when it does not (v1.3.3); at least one call came.
    pub fn assert_engine_calls_named(&self, m: Manager, what: &str) {
        let calls = self.engine.record().calls();
        assert!(!calls.is_empty(), "{what}: nothing reached the engine");
        let instance = engine_name(&self.name);
        let want = match m {
            Manager::V1_12_1 => (Some(self.name.as_str()), Some(instance.as_str())),
            Manager::V1_3_3 => (None, None),
        };
        for call in &calls {
            assert_eq!(identity(call), want, "{what}: engine call {}", call.path);
        }
    }

    /// Writes `data` at `offset` into every replica, as the engine's data path does.
    pub fn write(&self, offset: usize, data: &[u8]) {
        for r in &self.replicas {
            r.replica.write(offset, data).unwrap();
        }
    }
}

/// What a call that reached a simulated process carried as identity metadata.
pub fn identity(call: &sim::Call) -> (Option<&str>, Option<&str>) {
    (call.volume_name.as_deref(), call.instance_name.as_deref())
}

/// Polls `done` every 20 ms for up to `seconds`.
pub async fn wait_for<F, Fut>(seconds: u64, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while tokio::time::Instant::now() < deadline {
        if done().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {seconds} s");
}

/// A scratch directory for a vfs:// backup target, empty.
pub fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lhnet-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One request as the stand-in instance-manager proxy got it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

/// A stand-in for the instance-manager's own proxy (127.0.0.1:8501 in an IM pod): an HTTP/2
/// server that records every request as raw bytes and answers each with the same reply.
pub struct ImProxy {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

/// The stand-in's reply: body bytes (gRPC frames) and trailers (status and any others).
#[derive(Clone)]
pub struct Reply {
    pub body: Bytes,
    pub trailers: Vec<(&'static str, String)>,
}

pub async fn im_proxy(reply: Reply) -> ImProxy {
    let listener = tokio::net::TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (record, reply) = (record.clone(), reply.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (record, reply) = (record.clone(), reply.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let collected = body.collect().await?;
                            let trailers = collected.trailers().cloned();
                            record.lock().unwrap().push(Seen {
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body: collected.to_bytes(),
                                trailers,
                            });
                            let mut t = http::HeaderMap::new();
                            for (k, v) in &reply.trailers {
                                t.insert(*k, v.parse().unwrap());
                            }
                            let body = Full::new(reply.body.clone()).with_trailers(async move {
                                Some(Ok::<_, std::convert::Infallible>(t))
                            });
                            let response = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .header("x-from", "instance-manager")
                                .body(body)
                                .unwrap();
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    ImProxy { addr, seen }
}

/// One gRPC message frame (uncompressed) around `message`.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

/// Sends raw request bytes to `path` on lhnet and returns (headers, body, trailers) as they
/// came back.
pub async fn raw_call(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    extra: &[(&'static str, &str)],
) -> (http::HeaderMap, Bytes, Option<http::HeaderMap>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let response = send
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (parts.headers, collected.to_bytes(), trailers)
}

/// The string map of labels, sorted, for comparing.
pub fn sorted(map: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}
