//! A tonic channel to one engine or replica address over the cluster's pooled, storage-bound
//! connections. Failures become gRPC statuses with their code (UNAVAILABLE for connect errors).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use tonic::Status;

use crate::cluster::Cluster;
use crate::reply::BoxError;

/// Sends gRPC requests to `destination` through `cluster`.
#[derive(Clone)]
pub struct EngineChannel {
    pub cluster: Arc<Cluster>,
    pub destination: SocketAddr,
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for EngineChannel {
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let cluster = self.cluster.clone();
        let destination = self.destination;
        Box::pin(async move {
            let request = request.map(|b| b.map_err(BoxError::from).boxed_unsync());
            cluster
                .send(destination, request)
                .await
                // tonic keeps the code of a boxed Status it gets back as an error.
                .map_err(|e| Box::new(Status::unavailable(e.to_string())) as BoxError)
        })
    }
}
