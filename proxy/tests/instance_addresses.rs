//! Engines created through lhnet with management addresses start on storage addresses: the
//! instance-manager behind lhnet (here a ProcessManagerService that keeps what it is given)
//! receives the replicas' storage IPs, and the manager's answers (create, get, list) show the
//! management IPs it sent. An address lhnet cannot map fails the call, naming it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use lhnet_proto::process_manager::process_manager_service_client::ProcessManagerServiceClient;
use lhnet_proto::process_manager::process_manager_service_server::{
    ProcessManagerService, ProcessManagerServiceServer,
};
use lhnet_proto::process_manager::{
    LogRequest, LogResponse, ProcessCreateRequest, ProcessDeleteRequest, ProcessGetRequest,
    ProcessListRequest, ProcessListResponse, ProcessReplaceRequest, ProcessResponse, ProcessSpec,
    ProcessStatus, VersionResponse,
};
use lhnet_proxy::app::{self, Options, RunningProxy};
use lhnet_proxy::config::Config;
use parking_lot::Mutex;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// An instance-manager's process table: what it was asked to run, as it was asked.
#[derive(Clone, Default)]
struct Processes(Arc<Mutex<HashMap<String, ProcessSpec>>>);

fn answer(spec: ProcessSpec) -> ProcessResponse {
    ProcessResponse {
        spec: Some(spec),
        status: Some(ProcessStatus {
            state: "running".into(),
            ..Default::default()
        }),
        deleted: false,
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ProcessManagerService for Processes {
    async fn process_create(
        &self,
        request: Request<ProcessCreateRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let spec = request.into_inner().spec.unwrap_or_default();
        self.0.lock().insert(spec.name.clone(), spec.clone());
        Ok(Response::new(answer(spec)))
    }

    async fn process_delete(
        &self,
        request: Request<ProcessDeleteRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let name = request.into_inner().name;
        let spec = self.0.lock().remove(&name);
        let mut reply = answer(spec.ok_or_else(|| Status::not_found(name))?);
        reply.deleted = true;
        Ok(Response::new(reply))
    }

    async fn process_get(
        &self,
        request: Request<ProcessGetRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let name = request.into_inner().name;
        let spec = self.0.lock().get(&name).cloned();
        Ok(Response::new(answer(
            spec.ok_or_else(|| Status::not_found(name))?,
        )))
    }

    async fn process_list(
        &self,
        _: Request<ProcessListRequest>,
    ) -> Result<Response<ProcessListResponse>, Status> {
        let processes = self
            .0
            .lock()
            .iter()
            .map(|(name, spec)| (name.clone(), answer(spec.clone())))
            .collect();
        Ok(Response::new(ProcessListResponse { processes }))
    }

    type ProcessLogStream = Stream_<LogResponse>;

    async fn process_log(
        &self,
        _: Request<LogRequest>,
    ) -> Result<Response<Self::ProcessLogStream>, Status> {
        Err(Status::unimplemented("not kept here"))
    }

    type ProcessWatchStream = Stream_<ProcessResponse>;

    async fn process_watch(
        &self,
        _: Request<()>,
    ) -> Result<Response<Self::ProcessWatchStream>, Status> {
        Err(Status::unimplemented("not kept here"))
    }

    async fn process_replace(
        &self,
        request: Request<ProcessReplaceRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let spec = request.into_inner().spec.unwrap_or_default();
        self.0.lock().insert(spec.name.clone(), spec.clone());
        Ok(Response::new(answer(spec)))
    }

    async fn version_get(&self, _: Request<()>) -> Result<Response<VersionResponse>, Status> {
        Err(Status::unimplemented("not kept here"))
    }
}

async fn instance_manager() -> (SocketAddr, Processes) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let processes = Processes::default();
    let server = ProcessManagerServiceServer::new(processes.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, processes)
}

async fn proxy(im: SocketAddr) -> RunningProxy {
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nstorage_network: {{ interface: lo }}\n\
         peers: {{ 10.42.0.7: 10.30.0.7, 10.42.0.8: 10.30.0.8 }}\npeer_lookup: {{ enabled: false }}\n\
         listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n\
         \x20     - {{ match: {{ prefix: /ProcessManagerService/ }}, cluster: im }}\n\
         clusters:\n  - {{ name: im, endpoints: [{im}], upstream_bind_config: {{ source_address: none }} }}\n"
    );
    app::start(Config::parse(&yaml, "t").unwrap(), Options::default())
        .await
        .unwrap()
}

fn engine(name: &str, replicas: &[&str]) -> ProcessSpec {
    let mut args: Vec<String> = ["controller", "vol", "--frontend", "tgt-blockdev"]
        .map(String::from)
        .into();
    args.extend(["--listen".into(), "0.0.0.0:10000".into()]);
    for r in replicas {
        args.extend(["--replica".into(), format!("tcp://{r}")]);
    }
    ProcessSpec {
        name: name.into(),
        binary: "/engine-binaries/longhorn".into(),
        args,
        port_count: 1,
        port_args: vec!["--listen,0.0.0.0:".into()],
    }
}

#[tokio::test]
async fn an_engine_created_with_management_addresses_starts_on_storage_addresses() {
    let (im, processes) = instance_manager().await;
    let p = proxy(im).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", p.listener_addr("m").unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut manager = ProcessManagerServiceClient::new(channel);

    let sent = engine("vol-e-0", &["10.42.0.7:10010", "10.42.0.8:10020"]);
    let created = manager
        .process_create(ProcessCreateRequest {
            spec: Some(sent.clone()),
        })
        .await
        .expect("created through lhnet")
        .into_inner();

    // What the instance-manager runs: the replicas' storage addresses, every other arg as sent.
    let ran = processes.0.lock()["vol-e-0"].clone();
    let mut expected = sent.clone();
    expected.args[7] = "tcp://10.30.0.7:10010".into();
    expected.args[9] = "tcp://10.30.0.8:10020".into();
    assert_eq!(ran, expected);

    // What the manager sees: what it sent, in every answer.
    assert_eq!(created.spec.as_ref(), Some(&sent));
    let got = manager
        .process_get(ProcessGetRequest {
            name: "vol-e-0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.spec.as_ref(), Some(&sent));
    let listed = manager
        .process_list(ProcessListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.processes["vol-e-0"].spec.as_ref(), Some(&sent));

    // A replica address with no storage address known: refused, naming it; nothing started.
    let status = manager
        .process_create(ProcessCreateRequest {
            spec: Some(engine("vol2-e-0", &["10.42.0.99:10010"])),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("10.42.0.99"), "{status:?}");
    assert!(!processes.0.lock().contains_key("vol2-e-0"));

    // A replica process (no replica addresses in its args) passes as it is.
    let replica = ProcessSpec {
        name: "vol-r-1".into(),
        binary: "/engine-binaries/longhorn".into(),
        args: vec![
            "replica".into(),
            "/host/var/lib/longhorn/replicas/vol-1".into(),
        ],
        port_count: 15,
        port_args: vec!["--listen,0.0.0.0:".into()],
    };
    manager
        .process_create(ProcessCreateRequest {
            spec: Some(replica.clone()),
        })
        .await
        .unwrap();
    assert_eq!(processes.0.lock()["vol-r-1"], replica);
    p.shutdown().await;
}

#[tokio::test]
async fn a_malformed_process_create_is_refused_and_others_are_served() {
    let (im, processes) = instance_manager().await;
    let p = proxy(im).await;
    let addr = p.listener_addr("m").unwrap();
    // Garbage as a ProcessCreateRequest, sent by hand over HTTP/2.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.unwrap();
    let status = raw
        .unary::<_, Vec<u8>, _>(
            Request::new(vec![0x0a, 0x7f, 0x01]),
            http::uri::PathAndQuery::from_static("/ProcessManagerService/ProcessCreate"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("ProcessCreate"), "{status:?}");
    assert!(processes.0.lock().is_empty());
    let mut manager = ProcessManagerServiceClient::new(channel);
    manager
        .process_create(ProcessCreateRequest {
            spec: Some(engine("vol-e-0", &["10.42.0.7:10010"])),
        })
        .await
        .expect("the next client is served");
    p.shutdown().await;
}

/// Bytes in, bytes out.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

#[tokio::test]
async fn garbage_on_an_instance_manager_port_is_refused_and_the_manager_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (im, processes) = instance_manager().await;
    let p = proxy(im).await;
    let addr = p.listener_addr("m").unwrap();
    let garbage: [&[u8]; 4] = [
        b"\x16\x03\x01\x00\x05hello",
        b"GET /ProcessManagerService/ProcessList HTTP/1.1\r\nHost: x\r\n\r\n",
        // The HTTP/2 preface, then a frame of an unknown type with a length past the limit.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xee\x00\x00\x00\x00\x01",
        &[0u8; 4096],
    ];
    for bytes in garbage {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(bytes).await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            s.read_to_end(&mut answer),
        )
        .await;
        assert!(
            read.is_ok(),
            "lhnet closes a connection that sent {:?}",
            &bytes[..8]
        );
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ProcessManagerServiceClient::new(channel)
        .process_create(ProcessCreateRequest {
            spec: Some(engine("vol-e-0", &["10.42.0.7:10010"])),
        })
        .await
        .expect("the manager is served after the garbage");
    assert!(processes.0.lock().contains_key("vol-e-0"));
    p.shutdown().await;
}
