//! Engines started on storage addresses (spec §6). In management-only mode a manager names
//! replicas by their pods' management IPs when it creates an engine
//! (`ProcessManagerService/ProcessCreate` / `ProcessReplace`: `--replica tcp://IP:PORT` in the
//! args; `imrpc.InstanceService/InstanceCreate` / `InstanceReplace`: the same in
//! `process_instance_spec.args`, `spdk_instance_spec.replica_address_map`, `initiator_address`,
//! `target_address`), so the engine would dial its replicas over `eth0`. On its way to the
//! instance-manager this layer puts each such address's storage IP in its place (the address
//! map of the engine proxy), and on the way back it puts the management IPs back into every
//! spec the instance-manager answers (create, replace, get, delete, list, ProcessWatch; an
//! InstanceWatch message carries no spec), so the
//! manager sees what it sent. An address with no storage IP fails the call with UNAVAILABLE
//! naming it: an engine is never started on the management network unseen.
//!
//! Messages are rewritten on the wire, field by field: every byte this code does not rewrite
//! (fields of newer releases included) passes as it came.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::Response;
use http_body::Body;
use http_body_util::Either;
use parking_lot::Mutex;
use tonic::Code;
use tower::Service;

use super::{body_failed, Call};
use crate::address_map::{ip_span, AddressMap};
use crate::body::{MapMessages, RewriteMessage};
use crate::reply::{LocalReply, RouteContext};

/// What a length-delimited field holds, for the rewrite.
#[derive(Clone, Copy)]
pub enum Holds {
    /// A whole address: `IP`, `IP:PORT`, `tcp://IP:PORT`.
    Address,
    /// One process argument: rewritten when it is a replica address (`tcp://IP:PORT`, or
    /// `--replica=tcp://IP:PORT`); every other argument is left.
    Arg,
    /// A `map<string, string>` entry whose value is an address.
    AddressEntry,
    /// A message, with these fields of its own.
    Message(&'static [(u32, Holds)]),
    /// A `map<string, M>` entry whose value is a message with these fields.
    MessageEntry(&'static [(u32, Holds)]),
}

const PROCESS_SPEC: &[(u32, Holds)] = &[(3, Holds::Arg)];
/// `ProcessCreateRequest`, `ProcessReplaceRequest`, `ProcessResponse`: the spec is field 1.
const PROCESS: &[(u32, Holds)] = &[(1, Holds::Message(PROCESS_SPEC))];
const PROCESS_LIST: &[(u32, Holds)] = &[(1, Holds::MessageEntry(PROCESS))];
const INSTANCE_SPEC: &[(u32, Holds)] = &[
    (7, Holds::Message(&[(2, Holds::Arg)])),
    (8, Holds::Message(&[(1, Holds::AddressEntry)])),
    (11, Holds::Address),
    (12, Holds::Address),
];
/// `InstanceCreateRequest`, `InstanceReplaceRequest`, `InstanceResponse`: the spec is field 1.
const INSTANCE: &[(u32, Holds)] = &[(1, Holds::Message(INSTANCE_SPEC))];
const INSTANCE_LIST: &[(u32, Holds)] = &[(1, Holds::MessageEntry(INSTANCE))];

/// The methods this layer rewrites: (path, request fields, response fields).
type Method = (
    &'static str,
    Option<&'static [(u32, Holds)]>,
    &'static [(u32, Holds)],
);

pub const METHODS: &[Method] = &[
    (
        "/ProcessManagerService/ProcessCreate",
        Some(PROCESS),
        PROCESS,
    ),
    (
        "/ProcessManagerService/ProcessReplace",
        Some(PROCESS),
        PROCESS,
    ),
    ("/ProcessManagerService/ProcessGet", None, PROCESS),
    ("/ProcessManagerService/ProcessDelete", None, PROCESS),
    ("/ProcessManagerService/ProcessList", None, PROCESS_LIST),
    ("/ProcessManagerService/ProcessWatch", None, PROCESS),
    (
        "/imrpc.InstanceService/InstanceCreate",
        Some(INSTANCE),
        INSTANCE,
    ),
    (
        "/imrpc.InstanceService/InstanceReplace",
        Some(INSTANCE),
        INSTANCE,
    ),
    ("/imrpc.InstanceService/InstanceGet", None, INSTANCE),
    ("/imrpc.InstanceService/InstanceDelete", None, INSTANCE),
    ("/imrpc.InstanceService/InstanceList", None, INSTANCE_LIST),
];

/// The IP inside an address as this layer meets it: its byte range and the IP.
fn address_ip(text: &str, holds: Holds) -> Option<(usize, usize, IpAddr)> {
    match holds {
        Holds::Arg => {
            let (skip, rest) = match text.strip_prefix("--replica=") {
                Some(rest) => (text.len() - rest.len(), rest),
                None => (0, text),
            };
            if !rest.starts_with("tcp://") {
                return None;
            }
            ip_span(rest).map(|(from, to, ip)| (skip + from, skip + to, ip))
        }
        _ => match text.parse::<IpAddr>() {
            Ok(ip) => Some((0, text.len(), ip)),
            Err(_) => ip_span(text),
        },
    }
}

/// Walks `message`, calling `f` with each address string the fields hold and its kind;
/// `f` returns the replacement (or `None`: keep). The rewritten message, or `None` when it is
/// not well-formed protobuf.
pub fn rewrite(
    message: &[u8],
    fields: &[(u32, Holds)],
    f: &mut dyn FnMut(&str, Holds) -> Option<String>,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let mut rest = message;
    while !rest.is_empty() {
        let start = rest;
        let key = read_varint(&mut rest)?;
        let (field, wire_type) = (key >> 3, key & 7);
        let holds = fields
            .iter()
            .find(|(n, _)| u64::from(*n) == field)
            .map(|(_, h)| *h);
        match (wire_type, holds) {
            (2, Some(holds)) => {
                let len = usize::try_from(read_varint(&mut rest)?).ok()?;
                let payload = rest.get(..len)?;
                rest = &rest[len..];
                let new = rewrite_value(payload, holds, f)?;
                if new == payload {
                    // Unchanged: the field's own bytes (its varints may not be minimal).
                    out.extend_from_slice(&start[..start.len() - rest.len()]);
                } else {
                    put_varint(&mut out, key);
                    put_varint(&mut out, new.len() as u64);
                    out.extend_from_slice(&new);
                }
            }
            _ => {
                skip_value(&mut rest, wire_type)?;
                out.extend_from_slice(&start[..start.len() - rest.len()]);
            }
        }
    }
    Some(out)
}

fn rewrite_value(
    payload: &[u8],
    holds: Holds,
    f: &mut dyn FnMut(&str, Holds) -> Option<String>,
) -> Option<Vec<u8>> {
    match holds {
        Holds::Address | Holds::Arg => {
            let text = std::str::from_utf8(payload).ok()?;
            Some(f(text, holds).map_or_else(|| payload.to_vec(), String::into_bytes))
        }
        Holds::AddressEntry => rewrite(payload, &[(2, Holds::Address)], f),
        Holds::Message(inner) => rewrite(payload, inner, f),
        Holds::MessageEntry(inner) => rewrite(payload, &[(2, Holds::Message(inner))], f),
    }
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn skip_value(buf: &mut &[u8], wire_type: u64) -> Option<()> {
    match wire_type {
        0 => read_varint(buf).map(drop),
        1 => buf.get(8..).map(|r| *buf = r),
        2 => {
            let len = usize::try_from(read_varint(buf)?).ok()?;
            buf.get(len..).map(|r| *buf = r)
        }
        5 => buf.get(4..).map(|r| *buf = r),
        _ => None,
    }
}

/// Storage IPs this lhnet put into instance specs, and the management IPs they replaced: how
/// answers are mapped back exactly. Bounded; what it forgot, the address map's knowledge
/// (peers, lookups) maps back.
#[derive(Default)]
pub struct Learned(Mutex<HashMap<IpAddr, IpAddr>>);

const LEARNED_MAX: usize = 4096;

impl Learned {
    fn remember(&self, storage: IpAddr, management: IpAddr) {
        let mut map = self.0.lock();
        if map.len() >= LEARNED_MAX && !map.contains_key(&storage) {
            map.clear();
        }
        map.insert(storage, management);
    }

    fn management_of(&self, storage: IpAddr) -> Option<IpAddr> {
        self.0.lock().get(&storage).copied()
    }
}

/// Replaces the IP inside `text` by `to`.
fn with_ip(text: &str, (from, to): (usize, usize), ip: IpAddr) -> String {
    let mut out = text.to_string();
    out.replace_range(from..to, &ip.to_string());
    out
}

/// The layer: on routes that can carry one of [`METHODS`] (`enabled`).
#[derive(Clone)]
pub struct InstanceAddresses<S> {
    inner: S,
    shared: Option<Arc<Shared>>,
}

pub struct Shared {
    map: Arc<AddressMap>,
    learned: Learned,
    context: RouteContext,
}

impl<S> InstanceAddresses<S> {
    /// `map`: `None` when the route cannot carry an instance call.
    pub fn new(inner: S, map: Option<Arc<AddressMap>>, context: RouteContext) -> Self {
        InstanceAddresses {
            inner,
            shared: map.map(|map| {
                Arc::new(Shared {
                    map,
                    learned: Learned::default(),
                    context,
                })
            }),
        }
    }
}

impl<S, B> Service<Call> for InstanceAddresses<S>
where
    S: Service<Call, Response = Response<B>, Error = LocalReply> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<Either<MappedBack<B>, B>>;
    type Error = LocalReply;
    type Future = InstanceFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LocalReply>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let path = call.parts.uri.path();
        let method = self.shared.as_ref().and_then(|s| {
            METHODS
                .iter()
                .find(|m| m.0 == path)
                .map(|m| (s.clone(), *m))
        });
        let Some((shared, (_, request, response))) = method else {
            return InstanceFuture::Direct {
                inner: self.inner.call(call),
            };
        };
        // The clone is ready (the layers below always are); it serves this call alone.
        let mut inner = self.inner.clone();
        InstanceFuture::Mapped {
            future: Box::pin(async move {
                let call = match request {
                    Some(fields) => shared.to_storage(call, fields).await?,
                    None => call,
                };
                let answer = inner.call(call).await?;
                let back = MapBack {
                    fields: response,
                    shared,
                };
                Ok(answer.map(|body| Either::Left(MapMessages::new(body, back, MAX_MAPPED))))
            }),
        }
    }
}

impl Shared {
    /// The call with its request message's management addresses replaced by storage ones.
    async fn to_storage(
        &self,
        call: Call,
        fields: &'static [(u32, Holds)],
    ) -> Result<Call, LocalReply> {
        let context = &self.context;
        let (body, call) = call.take_body();
        let (message, mut body) = body
            .first_message()
            .await
            .map_err(|e| body_failed(&call.verdict, &e, context))?;
        let Some(message) = message else {
            return Ok(call.with_body(body));
        };
        let what = call.parts.uri.path().to_string();
        let invalid = |why: &str| {
            LocalReply::new(Code::InvalidArgument, format!("{what}: {why} ({context})"))
        };
        let mut found = Vec::new();
        rewrite(&message, fields, &mut |text, holds| {
            found.extend(address_ip(text, holds).map(|(_, _, ip)| ip));
            None
        })
        .ok_or_else(|| invalid("the request is not a well-formed protobuf message"))?;
        let mut storage_of = HashMap::new();
        for ip in found {
            if storage_of.contains_key(&ip) {
                continue;
            }
            match self.map.to_storage(ip).await {
                Ok(Some(storage)) => {
                    storage_of.insert(ip, storage.ip());
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(LocalReply::new(
                        Code::Unavailable,
                        format!(
                            "{what} names {ip}, and {e}: lhnet does not start an engine that would reach its replicas over the management network ({context})"
                        ),
                    ))
                }
            }
        }
        if storage_of.is_empty() {
            return Ok(call.with_body(body));
        }
        let rewritten = rewrite(&message, fields, &mut |text, holds| {
            let (from, to, ip) = address_ip(text, holds)?;
            storage_of.get(&ip).map(|s| with_ip(text, (from, to), *s))
        })
        .ok_or_else(|| invalid("the request is not a well-formed protobuf message"))?;
        if !body.replace_first_message(message.len(), &rewritten) {
            return Err(invalid(
                "a compressed request cannot have its addresses mapped; send it uncompressed",
            ));
        }
        for (management, storage) in storage_of {
            self.learned.remember(storage, management);
        }
        tracing::debug!(method = %what, "replica addresses mapped to storage addresses");
        Ok(call.with_body(body))
    }

    /// `message` with the storage IPs this layer (or the address map) knows replaced by the
    /// management IPs the manager used; `None`: unchanged.
    fn to_management(&self, message: &[u8], fields: &[(u32, Holds)]) -> Option<Vec<u8>> {
        let mut changed = false;
        let out = rewrite(message, fields, &mut |text, holds| {
            let (from, to, ip) = address_ip(text, holds)?;
            let management = self
                .learned
                .management_of(ip)
                .or_else(|| self.map.known_management(ip).map(|m| m.ip()))?;
            changed = true;
            Some(with_ip(text, (from, to), management))
        })?;
        changed.then_some(out)
    }
}

pin_project_lite::pin_project! {
    /// An unmapped call as it is, or a mapped one (boxed: instance calls are rare).
    #[project = InstanceFutureProj]
    pub enum InstanceFuture<F, B> {
        Direct {
            #[pin]
            inner: F,
        },
        Mapped {
            future: BoxFuture<'static, Result<Response<Either<MappedBack<B>, B>>, LocalReply>>,
        },
    }
}

impl<F, B> Future for InstanceFuture<F, B>
where
    F: Future<Output = Result<Response<B>, LocalReply>>,
{
    type Output = Result<Response<Either<MappedBack<B>, B>>, LocalReply>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            InstanceFutureProj::Direct { inner } => inner.poll(cx).map_ok(|r| r.map(Either::Right)),
            InstanceFutureProj::Mapped { future } => future.as_mut().poll(cx),
        }
    }
}

/// The largest answer message mapped back; a larger one passes as it is.
const MAX_MAPPED: usize = 16 << 20;

/// An instance-manager's answer with management IPs put back, message by message.
pub type MappedBack<B> = MapMessages<B, MapBack>;

/// The rewrite of [`MappedBack`]: a method's answer fields, mapped to management IPs.
pub struct MapBack {
    fields: &'static [(u32, Holds)],
    shared: Arc<Shared>,
}

impl RewriteMessage for MapBack {
    fn rewrite(&mut self, message: &[u8]) -> Option<Vec<u8>> {
        self.shared.to_management(message, self.fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length-delimited field.
    fn field(n: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, u64::from(n) << 3 | 2);
        put_varint(&mut out, payload.len() as u64);
        out.extend_from_slice(payload);
        out
    }

    fn process_create(args: &[&str], extra: &[u8]) -> Vec<u8> {
        let mut spec = field(1, b"vol-e-0");
        spec.extend(field(2, b"/engine-binaries/longhorn"));
        for a in args {
            spec.extend(field(3, a.as_bytes()));
        }
        spec.extend_from_slice(extra);
        field(1, &spec)
    }

    fn map<'a>(table: &'a [(&'a str, &'a str)]) -> impl FnMut(&str, Holds) -> Option<String> + 'a {
        move |text, holds| {
            let (from, to, ip) = address_ip(text, holds)?;
            let new = table.iter().find(|(m, _)| ip.to_string() == *m)?.1;
            Some(with_ip(text, (from, to), new.parse().unwrap()))
        }
    }

    #[test]
    fn replica_addresses_in_engine_args_are_mapped_and_nothing_else_changes() {
        // Field 4 (port_count, a varint) and field 9 (unknown to this code) must pass as they are.
        let extra = [0x20, 0x01, 0x4a, 0x02, b'h', b'i'];
        let args = [
            "controller",
            "vol",
            "--frontend",
            "tgt-blockdev",
            "--listen",
            "0.0.0.0:10000",
            "--replica",
            "tcp://10.42.0.7:10010",
            "--replica=tcp://10.42.0.8:10020",
            "--size",
            "1073741824",
        ];
        let message = process_create(&args, &extra);
        let out = rewrite(
            &message,
            PROCESS,
            &mut map(&[("10.42.0.7", "10.30.0.7"), ("10.42.0.8", "10.30.0.8")]),
        )
        .unwrap();
        let mut expected_args = args;
        expected_args[7] = "tcp://10.30.0.7:10010";
        expected_args[8] = "--replica=tcp://10.30.0.8:10020";
        assert_eq!(out, process_create(&expected_args, &extra));
        // And back.
        let back = rewrite(
            &out,
            PROCESS,
            &mut map(&[("10.30.0.7", "10.42.0.7"), ("10.30.0.8", "10.42.0.8")]),
        )
        .unwrap();
        assert_eq!(back, message);
    }

    #[test]
    fn instance_specs_map_args_the_spdk_map_and_the_initiator_and_target() {
        let mut process = field(1, b"/engine-binaries/longhorn");
        process.extend(field(2, b"tcp://10.42.0.7:10010"));
        let entry = {
            let mut e = field(1, b"vol-r-1");
            e.extend(field(2, b"10.42.0.7:20001"));
            e
        };
        let mut spec = field(2, b"vol-e-0");
        spec.extend(field(7, &process));
        spec.extend(field(8, &field(1, &entry)));
        spec.extend(field(11, b"10.42.0.7"));
        spec.extend(field(12, b"10.42.0.7:3260"));
        let list = field(1, &{
            let mut e = field(1, b"vol-e-0");
            e.extend(field(2, &field(1, &spec)));
            e
        });
        let mut seen = Vec::new();
        rewrite(&list, INSTANCE_LIST, &mut |text, holds| {
            seen.push((
                text.to_string(),
                address_ip(text, holds).map(|a| a.2.to_string()),
            ));
            None
        })
        .unwrap();
        let ips: Vec<_> = seen.iter().filter_map(|(_, ip)| ip.clone()).collect();
        assert_eq!(ips, ["10.42.0.7"; 4], "{seen:?}");
        let out = rewrite(
            &list,
            INSTANCE_LIST,
            &mut map(&[("10.42.0.7", "10.30.0.7")]),
        )
        .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("10.42.0.7"), "{text}");
        assert_eq!(text.matches("10.30.0.7").count(), 4);
    }

    #[test]
    fn a_field_left_as_it_is_keeps_its_bytes_even_when_its_length_is_not_minimal() {
        // Field 1, length 13 written in two bytes (0x8d 0x00): valid protobuf.
        let message = [
            10, 141, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 10, 120, 255, 54, 0, 0, 0, 120,
        ];
        assert_eq!(
            rewrite(&message, PROCESS, &mut |_, _| None).as_deref(),
            Some(&message[..])
        );
    }

    #[test]
    fn malformed_messages_are_refused_not_guessed() {
        assert!(rewrite(&[0x0a, 0x05, 1, 2], PROCESS, &mut |_, _| None).is_none());
        assert!(rewrite(&[0x0b], PROCESS, &mut |_, _| None).is_none());
        assert!(rewrite(&[0xff; 11], PROCESS, &mut |_, _| None).is_none());
        // Arguments that are not UTF-8 cannot be addresses: refused too.
        assert!(
            rewrite(&field(1, &field(3, &[0xff, 0xfe])), PROCESS, &mut |_, _| {
                None
            })
            .is_none()
        );
    }
}
