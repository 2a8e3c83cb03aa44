//! A tonic channel to one engine, replica or sync agent over the cluster's pooled,
//! storage-bound connections, carrying the identity metadata of the call (`volume-name`,
//! `instance-name`) as Longhorn's engine clients do. Failures become gRPC statuses with their
//! code (UNAVAILABLE for connect errors).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::cluster::H2Body;
use http::header::{HeaderName, HeaderValue};
use tonic::Status;
use tower::Service;

use crate::cluster::EndpointService;
use crate::reply::BoxError;

const VOLUME_NAME: HeaderName = HeaderName::from_static("volume-name");
const INSTANCE_NAME: HeaderName = HeaderName::from_static("instance-name");

/// Who a downstream call is for. The engine and replicas refuse a call whose names are not
/// theirs with FAILED_PRECONDITION (Longhorn #5709 / #5845); an empty name is not sent, and
/// the check is then skipped, as with Longhorn's own clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    volume: Option<HeaderValue>,
    instance: Option<HeaderValue>,
}

/// Longer names than a Kubernetes object name cannot be Longhorn's.
const MAX_NAME: usize = 253;

impl Identity {
    /// The identity of `volume` / `instance` as a request names them; `fields` name the request
    /// fields for errors.
    pub fn new(
        (volume_field, volume): (&str, &str),
        (instance_field, instance): (&str, &str),
    ) -> Result<Identity, Status> {
        Ok(Identity {
            volume: header(volume_field, volume)?,
            instance: header(instance_field, instance)?,
        })
    }

    /// The same volume, with another instance (a replica's name, or none).
    pub fn for_instance(&self, field: &str, instance: &str) -> Result<Identity, Status> {
        Ok(Identity {
            volume: self.volume.clone(),
            instance: header(field, instance)?,
        })
    }

    /// Puts the names on a request's metadata (`volume-name`, `instance-name`).
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        if let Some(v) = &self.volume {
            headers.insert(VOLUME_NAME, v.clone());
        }
        if let Some(v) = &self.instance {
            headers.insert(INSTANCE_NAME, v.clone());
        }
    }

    /// The same volume and no instance name: replica calls whose replica lhnet cannot name.
    pub fn volume_only(&self) -> Identity {
        Identity {
            volume: self.volume.clone(),
            instance: None,
        }
    }
}

fn header(field: &str, name: &str) -> Result<Option<HeaderValue>, Status> {
    if name.is_empty() {
        return Ok(None);
    }
    if name.len() > MAX_NAME {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; Longhorn names are Kubernetes object names, at most {MAX_NAME}",
            name.len()
        )));
    }
    match HeaderValue::from_str(name) {
        Ok(v) if name.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(v)),
        _ => Err(Status::invalid_argument(format!(
            "{field} {:?} has characters a Longhorn name cannot have (printable ASCII only)",
            name.chars().take(64).collect::<String>()
        ))),
    }
}

/// Sends gRPC requests to one address through the cluster's [`EndpointService`].
#[derive(Clone)]
pub struct EngineChannel {
    pub endpoint: EndpointService,
    pub identity: Identity,
}

impl Service<http::Request<tonic::body::Body>> for EngineChannel {
    type Response = http::Response<H2Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mut request = request;
        self.identity.apply(request.headers_mut());
        let sent = self.endpoint.call(request);
        Box::pin(async move {
            sent.await
                // tonic keeps the code of a boxed Status it gets back as an error.
                .map_err(|e| Box::new(Status::unavailable(e.to_string())) as BoxError)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_metadata_or_clear_errors() {
        let id = Identity::new(("volume_name", "vol-a"), ("engine_name", "vol-a-e-0")).unwrap();
        assert_eq!(id.volume.as_ref().unwrap(), "vol-a");
        assert_eq!(id.volume_only().instance, None);
        assert_eq!(
            Identity::new(("v", ""), ("i", "")).unwrap(),
            Identity::default()
        );
        let long = "e".repeat(10 * 1024);
        let e = Identity::new(("volume_name", "v"), ("engine_name", &long)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().starts_with("engine_name is 10240 bytes"),
            "{e:?}"
        );
        let e = Identity::new(("volume_name", "a\nb"), ("engine_name", "")).unwrap_err();
        assert!(e.message().contains("volume_name"), "{e:?}");
    }
}
