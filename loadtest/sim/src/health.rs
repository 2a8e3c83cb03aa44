//! `grpc.health.v1.Health` as the engine and replica processes answer it: SERVING for any
//! service name while the process runs.

use std::pin::Pin;

use lhnet_proto::health::health_check_response::ServingStatus;
use lhnet_proto::health::health_server::{Health, HealthServer};
use lhnet_proto::health::{HealthCheckRequest, HealthCheckResponse};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysServing;

pub fn server() -> HealthServer<AlwaysServing> {
    HealthServer::new(AlwaysServing)
}

fn serving() -> HealthCheckResponse {
    HealthCheckResponse {
        status: ServingStatus::Serving as i32,
    }
}

#[tonic::async_trait]
impl Health for AlwaysServing {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(serving()))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    /// One SERVING, then the stream stays open (the status never changes while it runs).
    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream = tokio_stream::iter([Ok(serving())]).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
}
