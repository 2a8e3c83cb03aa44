//! The 1:1 read calls served without tonic on either side: VolumeGet, ReplicaList and
//! MetricsGet, the calls a manager's engine monitor makes for every volume every few seconds.
//! lhnet's reply is the engine's message as field 1 (MetricsGet: the engine's message as it
//! is, the two messages have the same fields), so the engine's bytes are copied into lhnet's
//! answer behind a field header instead of being decoded and encoded again: every field the
//! engine sent reaches the manager, whether lhnet's protos know it or not.
//!
//! Only the ordinary case is served here: an uncompressed request that decodes, and for
//! ReplicaList one that names the engine by a storage address (a management address would
//! have the replicas' addresses in the reply mapped back, which needs them decoded). The
//! engine's answer is either one uncompressed message with `grpc-status` 0, or an error status,
//! wrapped as the decoding path wraps it. Anything else (a reply that does not parse, a missing
//! status, a reset stream) is asked again on the decoding path ([`super::volume`],
//! [`super::replica`]), which answers it as it always has: these calls change nothing, so asking
//! twice is harmless.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE, TE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use lhnet_proto::imrpc::ProxyEngineRequest;
use prost::Message;
use tonic::{Code, Status};

use super::{deadline_passed, logged, wrap, Engine, EngineProxy, ENGINE_CALL_TIMEOUT};
use crate::address_map::{ip_span, rewrite_one, rewrite_text, AddressMap};

/// A call served here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawRpc {
    VolumeGet,
    ReplicaList,
    MetricsGet,
}

/// An engine reply larger than this goes the decoding path (which has no limit of its own);
/// the three replies are a few hundred bytes.
const MAX_RAW_REPLY: usize = 4 << 20;

/// `ENGINE_CALL_TIMEOUT` as `grpc-timeout` (the decoding path's `timed` sends the same).
const ENGINE_CALL_GRPC_TIMEOUT: &str = "180S";

/// An empty message (google.protobuf.Empty), framed: the three engine calls' request.
static EMPTY_FRAME: [u8; 5] = [0, 0, 0, 0, 0];

impl RawRpc {
    /// The call of `method` (the last path segment), when it is one of these.
    pub fn of(method: &str) -> Option<RawRpc> {
        match method {
            "VolumeGet" => Some(RawRpc::VolumeGet),
            "ReplicaList" => Some(RawRpc::ReplicaList),
            "MetricsGet" => Some(RawRpc::MetricsGet),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RawRpc::VolumeGet => "VolumeGet",
            RawRpc::ReplicaList => "ReplicaList",
            RawRpc::MetricsGet => "MetricsGet",
        }
    }

    fn engine_path(self) -> &'static str {
        match self {
            RawRpc::VolumeGet => "/ptypes.ControllerService/VolumeGet",
            RawRpc::ReplicaList => "/ptypes.ControllerService/ReplicaList",
            RawRpc::MetricsGet => "/ptypes.ControllerService/MetricsGet",
        }
    }

    /// The operation in error texts, as the decoding path words it.
    fn op(self, engine: &Engine) -> String {
        match self {
            RawRpc::VolumeGet => format!("get volume {}", engine.addr),
            RawRpc::ReplicaList => format!("list replicas for volume {}", engine.addr),
            RawRpc::MetricsGet => format!("get metrics for volume {}", engine.addr),
        }
    }

    /// Whether the reply holds addresses (mapped back when the request used management ones).
    fn reply_names_addresses(self) -> bool {
        self == RawRpc::ReplicaList
    }

    /// lhnet's reply message around the engine's: as field 1, or (MetricsGet, whose two
    /// messages are field for field the same) as it is.
    fn framed_reply(self, engine_message: &[u8]) -> Bytes {
        let len = engine_message.len();
        let wrapped = self != RawRpc::MetricsGet;
        let inner = if wrapped {
            1 + prost::encoding::encoded_len_varint(len as u64) + len
        } else {
            len
        };
        let mut out = BytesMut::with_capacity(5 + inner);
        out.put_u8(0);
        out.put_u32(inner as u32);
        if wrapped {
            // Field 1, wire type 2 (length-delimited).
            out.put_u8(0x0a);
            prost::encoding::encode_varint(len as u64, &mut out);
        }
        out.extend_from_slice(engine_message);
        out.freeze()
    }
}

/// What [`RawCalls::serve`] did.
pub enum Served {
    /// The answer, the engine's message inside.
    Answer(Response<RawReply>),
    /// The call's error status, as the decoding path would answer it.
    Refused(Status),
    /// Not the ordinary case: serve it on the decoding path.
    Fallback,
}

/// What the engine answered.
enum Exchange {
    Message(Bytes),
    Status(Status),
    Unusual,
}

/// The engine proxy and the address map, for the calls served here.
#[derive(Clone)]
pub struct RawCalls {
    proxy: EngineProxy,
    map: Arc<AddressMap>,
}

impl RawCalls {
    pub fn new(proxy: EngineProxy, map: Arc<AddressMap>) -> RawCalls {
        RawCalls { proxy, map }
    }

    /// Serves `rpc` whose request message (uncompressed) is `message`.
    pub async fn serve(&self, rpc: RawRpc, message: &[u8]) -> Served {
        let Ok(mut request) = ProxyEngineRequest::decode(message) else {
            return Served::Fallback;
        };
        let named = ip_span(&request.address).map(|(_, _, ip)| ("address", ip));
        let forward = match self.map.forward_table(named).await {
            Ok(forward) => forward,
            Err(status) => return Served::Refused(status),
        };
        if !forward.is_empty() {
            if rpc.reply_names_addresses() {
                return Served::Fallback;
            }
            rewrite_one(&mut request.address, &forward);
        }
        // As the decoding path: errors after the mapping name the management addresses.
        let back = |status: Status| {
            if forward.is_empty() {
                return status;
            }
            let back: HashMap<IpAddr, IpAddr> = forward.iter().map(|(m, s)| (*s, *m)).collect();
            Status::new(status.code(), rewrite_text(status.message(), &back))
        };
        let engine = match self.proxy.engine(Some(&request)) {
            Ok(engine) => engine,
            Err(status) => return Served::Refused(back(status)),
        };
        logged(rpc.name(), &engine, false);
        match tokio::time::timeout(ENGINE_CALL_TIMEOUT, self.exchange(rpc, &engine)).await {
            Ok(Exchange::Message(m)) => Served::Answer(answer(rpc.framed_reply(&m))),
            Ok(Exchange::Status(status)) => Served::Refused(back(wrap(&rpc.op(&engine), &status))),
            Ok(Exchange::Unusual) => Served::Fallback,
            Err(_) => Served::Refused(back(wrap(
                &rpc.op(&engine),
                &deadline_passed(ENGINE_CALL_TIMEOUT),
            ))),
        }
    }

    /// One call to the engine over the cluster's pool, with the request's identity.
    async fn exchange(&self, rpc: RawRpc, engine: &Engine) -> Exchange {
        let body = Full::new(Bytes::from_static(&EMPTY_FRAME))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync();
        let mut request = Request::new(body);
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static(rpc.engine_path());
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert(
            "grpc-timeout",
            HeaderValue::from_static(ENGINE_CALL_GRPC_TIMEOUT),
        );
        engine.id.apply(headers);
        let response = match self.proxy.engines.send(engine.addr.0, request).await {
            Ok(response) => response,
            // As the tonic channel of the decoding path reports a failed send.
            Err(e) => return Exchange::Status(Status::unavailable(e.to_string())),
        };
        let (parts, mut body) = response.into_parts();
        if parts.status != StatusCode::OK {
            return Exchange::Unusual;
        }
        // Trailers-Only: the status is in the headers.
        if let Some(status) = Status::from_header_map(&parts.headers) {
            return match status.code() {
                Code::Ok => Exchange::Unusual,
                _ => Exchange::Status(status),
            };
        }
        // Usually one DATA frame, kept as it came; gathered only when the reply was split.
        let mut whole = Bytes::new();
        let mut gathered: Option<BytesMut> = None;
        let status = loop {
            match body.frame().await {
                None | Some(Err(_)) => return Exchange::Unusual,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let held = gathered.as_ref().map_or(whole.len(), BytesMut::len);
                        if held + chunk.len() > MAX_RAW_REPLY {
                            return Exchange::Unusual;
                        }
                        if whole.is_empty() && gathered.is_none() {
                            whole = chunk;
                        } else {
                            gathered
                                .get_or_insert_with(|| BytesMut::from(&whole[..]))
                                .extend_from_slice(&chunk);
                        }
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => break Status::from_header_map(&trailers),
                        Err(_) => return Exchange::Unusual,
                    },
                },
            }
        };
        match status {
            Some(s) if s.code() == Code::Ok => {}
            Some(s) => return Exchange::Status(s),
            None => return Exchange::Unusual,
        }
        let whole = gathered.map_or(whole, BytesMut::freeze);
        match one_message(&whole) {
            Some(message) => Exchange::Message(whole.slice_ref(message)),
            None => Exchange::Unusual,
        }
    }
}

/// The payload of `data` when it is exactly one uncompressed gRPC message that parses as
/// protobuf at its top level (the fields inside are the engine's, passed on as they are).
fn one_message(data: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = data.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let message = &rest[4..];
    (flag == 0 && message.len() == len && super::dispatch::parses(message)).then_some(message)
}

fn answer(data: Bytes) -> Response<RawReply> {
    let mut response = Response::new(RawReply {
        data: Some(data),
        ended: false,
    });
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// The body of an answer served here: one data frame, then `grpc-status: 0`, then the end.
pub struct RawReply {
    data: Option<Bytes>,
    ended: bool,
}

impl Body for RawReply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        self.ended = true;
        let mut trailers = HeaderMap::with_capacity(1);
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_deadline_header_is_the_engine_call_timeout() {
        assert_eq!(
            ENGINE_CALL_GRPC_TIMEOUT,
            format!("{}S", ENGINE_CALL_TIMEOUT.as_secs())
        );
    }

    #[test]
    fn replies_are_the_engines_message_as_field_1_or_as_it_is() {
        let engine = [0x0a, 0x03, b'v', b'o', b'l'];
        let framed = RawRpc::VolumeGet.framed_reply(&engine);
        assert_eq!(
            &framed[..],
            &[0, 0, 0, 0, 7, 0x0a, 5, 0x0a, 3, b'v', b'o', b'l']
        );
        let framed = RawRpc::MetricsGet.framed_reply(&engine);
        assert_eq!(&framed[..], &[0, 0, 0, 0, 5, 0x0a, 0x03, b'v', b'o', b'l']);
        assert_eq!(one_message(&framed), Some(&engine[..]));
        // Compressed, short, or not protobuf: not served here.
        assert_eq!(one_message(&[1, 0, 0, 0, 0]), None);
        assert_eq!(one_message(&[0, 0, 0, 0, 9, 0x0a]), None);
        assert_eq!(one_message(&[0, 0, 0, 0, 2, 0x0f, 0x01]), None);
    }
}
