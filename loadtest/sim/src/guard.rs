//! What every simulated server does to a request before its service sees it, as longhorn-engine's
//! servers do: the identity check of the `volume-name` / `instance-name` metadata
//! (longhorn-engine `pkg/interceptor`), and, for tests, a record of each request as it arrived.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use tonic::body::Body;
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

/// The names a server was started with and what it calls itself in refusals (`controller` or
/// `replica`). An empty name turns its check off, as in longhorn-engine.
#[derive(Debug, Clone, Default)]
pub struct Names {
    pub volume: String,
    pub instance: String,
    pub server: &'static str,
}

/// One request as a simulated process received it.
#[derive(Debug, Clone)]
pub struct Call {
    /// `/ptypes.SyncAgentService/FilesSync`.
    pub path: String,
    pub volume_name: Option<String>,
    pub instance_name: Option<String>,
    /// The request message (the gRPC frame's payload).
    pub message: Bytes,
}

/// The requests a simulated process received, kept while recording is on (tests turn it on;
/// load runs leave it off and nothing is buffered).
#[derive(Debug, Clone, Default)]
pub struct Record {
    on: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<Call>>>,
}

// === impl Record ===

impl Record {
    /// Starts keeping requests (and forgets earlier ones).
    pub fn start(&self) {
        self.clear();
        self.on.store(true, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        if let Ok(mut c) = self.calls.lock() {
            c.clear();
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The requests of one method (`FilesSync`), decoded as `M`.
    pub fn of<M: prost::Message + Default>(&self, method: &str) -> Vec<(Call, M)> {
        let suffix = format!("/{method}");
        self.calls()
            .into_iter()
            .filter(|c| c.path.ends_with(&suffix))
            .filter_map(|c| M::decode(c.message.clone()).ok().map(|m| (c, m)))
            .collect()
    }

    fn push(&self, call: Call) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(call);
        }
    }
}

/// The layer that puts [`Guarded`] in front of a server's services.
#[derive(Clone)]
pub struct Guard {
    pub names: Arc<Names>,
    pub record: Record,
}

impl<S> Layer<S> for Guard {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            names: self.names.clone(),
            record: self.record.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    names: Arc<Names>,
    record: Record,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> Service<Request<Body>> for Guarded<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone that was made ready is the one that is called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let names = self.names.clone();
        let record = self.record.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            // Streaming calls (health Watch) are not checked, as longhorn-engine's unary
            // interceptor does not see them.
            if !path.ends_with("/Watch") {
                if let Err(status) = check(&names, request.headers()) {
                    return Ok(status.into_http());
                }
            }
            let request = if record.on.load(Ordering::SeqCst) {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await?.to_bytes();
                record.push(Call {
                    volume_name: single(&parts.headers, "volume-name"),
                    instance_name: single(&parts.headers, "instance-name"),
                    message: bytes
                        .get(5..)
                        .map(Bytes::copy_from_slice)
                        .unwrap_or_default(),
                    path,
                });
                Request::from_parts(parts, Body::new(Full::new(bytes)))
            } else {
                request
            };
            inner.call(request).await.map_err(Into::into)
        })
    }
}

/// A metadata key's value when it has exactly one (longhorn-engine ignores zero or several).
fn single(headers: &HeaderMap, key: &str) -> Option<String> {
    let mut values = headers.get_all(key).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok().map(str::to_string)
}

/// longhorn-engine's identity check: a name the client sent that is not the server's is
/// refused FAILED_PRECONDITION; a name either side leaves empty is not checked.
fn check(names: &Names, headers: &HeaderMap) -> Result<(), Status> {
    for (key, own, what) in [
        ("volume-name", &names.volume, "volume"),
        ("instance-name", &names.instance, "instance"),
    ] {
        let Some(sent) = single(headers, key).filter(|s| !s.is_empty()) else {
            continue;
        };
        if !own.is_empty() && sent != *own {
            return Err(Status::failed_precondition(format!(
                "incorrect {what} name {sent}; check {} address",
                names.server
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_only_when_both_sides_have_one() {
        let names = Names {
            volume: "vol-a".into(),
            instance: String::new(),
            server: "controller",
        };
        let mut h = HeaderMap::new();
        assert!(check(&names, &h).is_ok());
        h.insert("volume-name", "vol-a".parse().unwrap());
        h.insert("instance-name", "anything".parse().unwrap());
        assert!(check(&names, &h).is_ok(), "no instance name of its own");
        h.insert("volume-name", "vol-b".parse().unwrap());
        let e = check(&names, &h).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            e.message(),
            "incorrect volume name vol-b; check controller address"
        );
        h.append("volume-name", "vol-a".parse().unwrap());
        assert!(check(&names, &h).is_ok(), "two values count as none");
    }
}
