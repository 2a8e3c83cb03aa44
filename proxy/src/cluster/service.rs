//! A cluster behind a tower [`Service`]: [`ClusterService`] sends to a static cluster's
//! endpoints round robin, [`EndpointService`] to one address (original destination). Either
//! boxes the request body into the pool's one body type.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tower::Service;

use super::{Cluster, H2Body, Sending, UpstreamError};
use crate::reply::BoxError;

/// A static cluster: each request goes to its next endpoint.
#[derive(Clone, Debug)]
pub struct ClusterService {
    cluster: Arc<Cluster>,
}

/// One address of a cluster (its pool is made on first use).
#[derive(Clone, Debug)]
pub struct EndpointService {
    cluster: Arc<Cluster>,
    destination: SocketAddr,
}

impl ClusterService {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ClusterService { cluster }
    }
}

impl EndpointService {
    pub fn new(cluster: Arc<Cluster>, destination: SocketAddr) -> Self {
        EndpointService {
            cluster,
            destination,
        }
    }
}

impl<B> Service<Request<B>> for ClusterService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<H2Body>;
    type Error = UpstreamError;
    type Future = Sending;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.cluster.pick_endpoint() {
            Some(destination) => {
                EndpointService::new(self.cluster.clone(), destination).call(request)
            }
            None => Sending::failed(UpstreamError::NoEndpoints {
                cluster: self.cluster.name().to_string(),
            }),
        }
    }
}

impl<B> Service<Request<B>> for EndpointService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<H2Body>;
    type Error = UpstreamError;
    type Future = Sending;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let request = request.map(|b| b.map_err(Into::into).boxed_unsync());
        self.cluster.send(self.destination, request)
    }
}
