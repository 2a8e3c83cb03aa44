//! Replies the proxy makes itself: gRPC Trailers-Only responses with a status and a message.

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::{BodyExt, Empty};
use tonic::Code;

/// gRPC header names, parsed once (looking a header up by `&str` parses the name each time).
pub mod names {
    use http::header::HeaderName;
    pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
    pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    pub const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
}

/// The body type of every response the proxy sends downstream.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A gRPC status made by the proxy. `message` says what failed and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub code: Code,
    pub message: String,
}

impl LocalReply {
    /// What a call future answers if polled after it completed (futures must not be; an
    /// error, never a panic).
    pub fn polled_again() -> Self {
        LocalReply::new(
            Code::Internal,
            "lhnet polled a finished call future again (a bug in lhnet)",
        )
    }

    pub fn new(code: Code, message: impl Into<String>) -> Self {
        LocalReply {
            code,
            message: message.into(),
        }
    }

    /// A Trailers-Only response: HTTP 200, `content-type: application/grpc`, `grpc-status` and
    /// `grpc-message` in the only HEADERS frame, which ends the stream.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = Response::new(empty_body());
        self.write_to(response.headers_mut());
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        response
    }

    /// Puts `grpc-status` and `grpc-message` into a header (or trailer) map.
    pub fn write_to(&self, headers: &mut HeaderMap) {
        headers.insert(names::GRPC_STATUS, HeaderValue::from(self.code as i32));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&self.message)) {
            headers.insert(names::GRPC_MESSAGE, v);
        }
    }
}

/// A status lhnet answers as it is (its code and message).
impl From<tonic::Status> for LocalReply {
    fn from(status: tonic::Status) -> Self {
        LocalReply::new(status.code(), status.message())
    }
}

impl fmt::Display for LocalReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Where a request went, for error messages: "listener L, route R, cluster C". One `Arc`:
/// the layers clone it per call.
#[derive(Debug, Clone)]
pub struct RouteContext(std::sync::Arc<RouteNames>);

/// The names a [`RouteContext`] carries.
#[derive(Debug)]
pub struct RouteNames {
    pub listener: std::sync::Arc<str>,
    pub route: std::sync::Arc<str>,
    /// `cluster NAME` or `local SERVICE`.
    pub target: std::sync::Arc<str>,
}

impl RouteContext {
    pub fn new(listener: &str, route: std::sync::Arc<str>, target: &str) -> Self {
        RouteContext(std::sync::Arc::new(RouteNames {
            listener: listener.into(),
            route,
            target: target.into(),
        }))
    }
}

impl std::ops::Deref for RouteContext {
    type Target = RouteNames;

    fn deref(&self) -> &RouteNames {
        &self.0
    }
}

impl fmt::Display for RouteContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listener {}, route {}, {}",
            self.listener, self.route, self.target
        )
    }
}

pub fn empty_body() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, become `%XX`.
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.trim_end_matches('\n').bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// tonic answers a request message it cannot decode with INTERNAL; for the caller that is a
/// malformed request, which lhnet reports as INVALID_ARGUMENT (DESIGN §3). Rewrites the status
/// in a local service's headers or trailers.
pub fn undecodable_to_invalid_argument(headers: &mut HeaderMap) {
    if grpc_status(headers) != Some(Code::Internal as i32) {
        return;
    }
    let Some(message) = headers
        .get(names::GRPC_MESSAGE)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    if !message.starts_with("failed%20to%20decode%20Protobuf%20message")
        && !message.starts_with("failed to decode Protobuf message")
    {
        return;
    }
    let decoded = percent_decode(message);
    LocalReply::new(
        Code::InvalidArgument,
        format!("malformed request: {decoded}"),
    )
    .write_to(headers);
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `grpc-status` in a header map, if there is a valid one.
pub fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers
        .get(names::GRPC_STATUS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `text` in quotes, cut to its first 32 characters: what a client sent, fit for an error
/// (a hostile 10 KB value must not make the reply itself too large to send).
pub fn quote_short(text: &str) -> String {
    const KEEP: usize = 32;
    match text.char_indices().nth(KEEP) {
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
        None => format!("{text:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_only_shape() {
        let r = LocalReply::new(Code::Unavailable, "upstream connect error: 100% down\n")
            .into_response();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(
            r.headers()["grpc-message"],
            "upstream connect error: 100%25 down"
        );
        assert!(http_body::Body::is_end_stream(r.body()));
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(grpc_status(r.headers()), Some(14));
        assert_eq!(percent_decode("100%25 d%C3%A9j%C3%A0"), "100% déjà");

        let mut h = HeaderMap::new();
        LocalReply::new(
            Code::Internal,
            "failed to decode Protobuf message: x: buffer underflow",
        )
        .write_to(&mut h);
        undecodable_to_invalid_argument(&mut h);
        assert_eq!(grpc_status(&h), Some(3));
        assert_eq!(
            h[names::GRPC_MESSAGE],
            "malformed request: failed to decode Protobuf message: x: buffer underflow"
        );
    }
}
