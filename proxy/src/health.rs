//! `grpc.health.v1.Health`, answered by the proxy: SERVING while the proxy is ready.
//!
//! Like Longhorn's instance-manager, the requested service name is not checked: the answer is
//! about the process, which is what `grpc_health_probe` and kubelet probes ask.

use std::pin::Pin;

use lhnet_proto::health::health_check_response::ServingStatus;
use lhnet_proto::health::health_server::{Health, HealthServer};
use lhnet_proto::health::{HealthCheckRequest, HealthCheckResponse};
use tokio::sync::watch;
use tokio_stream::{wrappers::WatchStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

/// Answers health checks from a readiness flag.
#[derive(Clone)]
pub struct HealthService {
    ready: watch::Receiver<bool>,
}

impl HealthService {
    pub fn server(ready: watch::Receiver<bool>) -> HealthServer<HealthService> {
        HealthServer::new(HealthService { ready })
    }
}

fn status(ready: bool) -> HealthCheckResponse {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(status(*self.ready.borrow())))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    /// Sends the current status, then every change.
    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream = WatchStream::new(self.ready.clone()).map(|ready| Ok(status(ready)));
        Ok(Response::new(Box::pin(stream)))
    }
}
