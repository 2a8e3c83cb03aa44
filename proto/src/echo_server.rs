//! A real implementation of `lhnet.echo.v1.Echo`, served on a real socket, for tests and
//! benchmarks. It counts accepted connections so tests can check connection reuse.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::echo::echo_server::{Echo, EchoServer};
use crate::echo::{EchoReply, EchoRequest};

/// Request metadata key whose value the server sends back as response metadata.
pub const ECHO_HEADER: &str = "x-echo";
/// Request metadata: server-stream calls end with ABORTED after this many replies.
pub const FAIL_AFTER_HEADER: &str = "x-fail-after";

/// The echo service; `name` tells endpoints apart in replies.
#[derive(Clone)]
pub struct EchoService {
    name: Arc<str>,
}

/// A running echo server.
pub struct RunningEcho {
    pub addr: SocketAddr,
    pub accepts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningEcho {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

impl Drop for RunningEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the echo service on `addr` (use port 0) in the current runtime.
pub async fn spawn(addr: SocketAddr, name: &str) -> std::io::Result<RunningEcho> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |s| {
        counter.fetch_add(1, Ordering::SeqCst);
        s
    });
    let service = EchoServer::new(EchoService { name: name.into() })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(RunningEcho {
        addr,
        accepts,
        task,
    })
}

fn peer<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

fn echo_metadata<T>(from: &Request<T>, to: &mut tonic::metadata::MetadataMap) {
    if let Some(v) = from.metadata().get(ECHO_HEADER) {
        to.insert(ECHO_HEADER, v.clone());
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let peer = peer(&request);
        let delay = request.get_ref().delay_ms;
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
        }
        let mut reply = Response::new(EchoReply {
            payload: request.get_ref().payload.clone(),
            server: self.name.to_string(),
            peer,
            messages: 1,
        });
        echo_metadata(&request, reply.metadata_mut());
        Ok(reply)
    }

    /// Counts the messages and bytes; replies with no payload, so data flows one way.
    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let peer = peer(&request);
        let mut meta = tonic::metadata::MetadataMap::new();
        echo_metadata(&request, &mut meta);
        let mut stream = request.into_inner();
        let (mut messages, mut bytes) = (0u32, 0u64);
        while let Some(msg) = stream.message().await? {
            messages += 1;
            bytes += msg.payload.len() as u64;
        }
        let mut reply = Response::new(EchoReply {
            payload: bytes.to_string().into_bytes(),
            server: self.name.to_string(),
            peer,
            messages,
        });
        *reply.metadata_mut() = meta;
        Ok(reply)
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let fail_after: Option<u32> = request
            .metadata()
            .get(FAIL_AFTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let name = self.name.to_string();
        let peer = peer(&request);
        let req = request.into_inner();
        // Stop at the error, as a real server does.
        let count = fail_after.map_or(req.count, |f| req.count.min(f.saturating_add(1)));
        let stream = tokio_stream::iter(0..count).map(move |i| {
            if fail_after == Some(i) {
                return Err(Status::aborted(format!(
                    "stopped after {i} replies, as asked"
                )));
            }
            Ok(EchoReply {
                payload: req.payload.clone(),
                server: name.clone(),
                peer: peer.clone(),
                messages: i + 1,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let name = self.name.to_string();
        let peer = peer(&request);
        let mut n = 0u32;
        let stream = request.into_inner().map(move |msg| {
            n += 1;
            msg.map(|m| EchoReply {
                payload: m.payload,
                server: name.clone(),
                peer: peer.clone(),
                messages: n,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
