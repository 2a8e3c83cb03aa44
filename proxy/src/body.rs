//! Bodies the proxy streams: requests checked frame by frame on their way up, replayable request
//! buffers for retries, and responses observed on their way down (status, deadline, metrics).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::Code;

use crate::metrics::{GrpcLabels, RouteMetrics};
use crate::reply::{grpc_status, BoxError, LocalReply, RouteContext};

/// Set once when the proxy itself decides how a request ends (a bad request body, a deadline).
/// The response path reads it to answer with that status instead of the upstream's reaction.
pub type Verdict = Arc<OnceLock<LocalReply>>;

pin_project_lite::pin_project! {
    /// Checks a gRPC request body's length-prefixed messages as they stream through, without
    /// buffering them: a message over `max` ends the request with RESOURCE_EXHAUSTED, a bad
    /// frame or a body that ends mid-message with INVALID_ARGUMENT.
    pub struct GrpcRequestBody<B> {
        #[pin]
        inner: B,
        max: usize,
        compressed_ok: bool,
        header: [u8; 5],
        header_len: usize,
        payload_left: usize,
        payload_total: usize,
        verdict: Verdict,
        failed: bool,
    }
}

#[derive(Debug)]
struct Rejected(String);

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

impl<B> GrpcRequestBody<B> {
    /// `compressed_ok` is whether the request declared a `grpc-encoding`, which allows the
    /// compressed flag on messages.
    pub fn new(inner: B, max: usize, compressed_ok: bool, verdict: Verdict) -> Self {
        GrpcRequestBody {
            inner,
            max,
            compressed_ok,
            header: [0; 5],
            header_len: 0,
            payload_left: 0,
            payload_total: 0,
            verdict,
            failed: false,
        }
    }
}

/// Walks `chunk` through the frame parser; returns the reply when the data breaks a rule.
fn scan_frames(
    chunk: &[u8],
    max: usize,
    compressed_ok: bool,
    header: &mut [u8; 5],
    header_len: &mut usize,
    payload_left: &mut usize,
    payload_total: &mut usize,
) -> Option<LocalReply> {
    let mut rest = chunk;
    while !rest.is_empty() {
        if *payload_left > 0 {
            let n = (*payload_left).min(rest.len());
            *payload_left -= n;
            rest = &rest[n..];
            continue;
        }
        let n = (5 - *header_len).min(rest.len());
        header[*header_len..*header_len + n].copy_from_slice(&rest[..n]);
        *header_len += n;
        rest = &rest[n..];
        if *header_len < 5 {
            break;
        }
        *header_len = 0;
        let flag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if flag > 1 || (flag == 1 && !compressed_ok) {
            let why = if flag > 1 {
                format!("compressed-flag byte is {flag}, must be 0 or 1")
            } else {
                "message is marked compressed but the request has no grpc-encoding header".into()
            };
            return Some(LocalReply::new(
                Code::InvalidArgument,
                format!("malformed gRPC request frame: {why}"),
            ));
        }
        if len > max {
            return Some(LocalReply::new(
                Code::ResourceExhausted,
                format!(
                    "request message of {len} bytes is larger than max_message_size ({max} bytes)"
                ),
            ));
        }
        *payload_left = len;
        *payload_total = len;
    }
    None
}

impl<B> Body for GrpcRequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let reject = |reply: LocalReply, failed: &mut bool, verdict: &Verdict| {
            *failed = true;
            let msg = reply.message.clone();
            let _ = verdict.set(reply);
            Poll::Ready(Some(Err(Box::new(Rejected(msg)) as BoxError)))
        };
        match this.inner.poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(reply) = scan_frames(
                        data,
                        *this.max,
                        *this.compressed_ok,
                        this.header,
                        this.header_len,
                        this.payload_left,
                        this.payload_total,
                    ) {
                        return reject(reply, this.failed, this.verdict);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                if *this.header_len > 0 || *this.payload_left > 0 {
                    let got = *this.payload_total - *this.payload_left;
                    let reply = if *this.header_len > 0 {
                        LocalReply::new(
                            Code::InvalidArgument,
                            format!(
                                "malformed gRPC request: body ends inside a message header ({} of 5 bytes)",
                                this.header_len
                            ),
                        )
                    } else {
                        LocalReply::new(
                            Code::InvalidArgument,
                            format!(
                                "malformed gRPC request: body ends inside a message ({got} of {} bytes)",
                                this.payload_total
                            ),
                        )
                    };
                    return reject(reply, this.failed, this.verdict);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Mid-message, the end of the inner body is an error still to be reported.
        let mid_message = self.header_len > 0 || self.payload_left > 0;
        self.failed || (!mid_message && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body read into memory so it can be sent more than once.
#[derive(Clone, Default)]
pub struct Replayable {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
}

/// The result of trying to buffer a body up to a bound.
pub enum Buffered<B> {
    /// The whole body fit.
    Complete(Replayable),
    /// It did not; the prefix read so far comes first, then the rest of the stream.
    Partial(Prefixed<B>),
}

/// Reads `body` until it ends or `limit` bytes are buffered.
pub async fn buffer_up_to<B>(mut body: B, limit: usize) -> Result<Buffered<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    let mut buffered = Replayable::default();
    let mut size = 0usize;
    while size <= limit {
        match body.frame().await {
            None => return Ok(Buffered::Complete(buffered)),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    size += data.len();
                    buffered.chunks.push(data);
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        buffered.trailers = Some(trailers);
                    }
                }
            },
        }
    }
    Ok(Buffered::Partial(Prefixed {
        head: None,
        prefix: buffered.chunks.into(),
        trailers: None,
        inner: body,
    }))
}

/// Reads `body` until its first gRPC message is whole (see [`Prefixed::first_message`]).
pub async fn read_first_message<B>(body: B) -> Result<(Option<Bytes>, Prefixed<B>), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    Prefixed::new(body).first_message().await
}

/// The first message's payload once `chunks` (`read` bytes in all) hold it whole; sliced, not
/// copied, when the first chunk holds it.
fn whole_first_message(chunks: &VecDeque<Bytes>, read: usize) -> Option<Bytes> {
    if read < 5 {
        return None;
    }
    let mut header = [0u8; 5];
    for (slot, byte) in header.iter_mut().zip(chunks.iter().flat_map(|c| c.iter())) {
        *slot = *byte;
    }
    let end = 5 + u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if read < end {
        return None;
    }
    match chunks.front() {
        Some(first) if first.len() >= end => Some(first.slice(5..end)),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(end);
            for c in chunks {
                all.extend_from_slice(c);
            }
            Some(all.freeze().slice(5..end))
        }
    }
}

impl Replayable {
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A fresh body with the same bytes and trailers.
    pub fn replay(&self) -> ReplayBody {
        ReplayBody {
            chunks: self.chunks.clone().into(),
            trailers: self.trailers.clone(),
        }
    }
}

/// One replay of a [`Replayable`]; a clone of one not yet read is a fresh replay.
#[derive(Clone)]
pub struct ReplayBody {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.chunks.iter().map(|c| c.remaining() as u64).sum())
    }
}

pin_project_lite::pin_project! {
    /// Buffered chunks first, then the rest of the original body.
    pub struct Prefixed<B> {
        // The first frame read by `started` (no allocation for the common one-frame case).
        head: Option<Bytes>,
        prefix: VecDeque<Bytes>,
        // Trailers read while buffering (the inner body has ended then).
        trailers: Option<HeaderMap>,
        #[pin]
        inner: B,
    }
}

impl<B> Prefixed<B> {
    /// `inner` with nothing read ahead of it.
    pub fn new(inner: B) -> Prefixed<B> {
        Prefixed {
            head: None,
            prefix: VecDeque::new(),
            trailers: None,
            inner,
        }
    }
}

impl<B> Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Returns once the body has started: a frame is read ahead (and will be yielded first),
    /// or the body has ended.
    pub async fn started(mut self) -> Result<Prefixed<B>, BoxError> {
        std::future::poll_fn(|cx| self.poll_started(cx)).await?;
        Ok(self)
    }

    /// [`Self::started`] as a poll: ready once a frame is read ahead or the body has ended.
    pub fn poll_started(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.head.is_some()
            || !self.prefix.is_empty()
            || self.trailers.is_some()
            || self.inner.is_end_stream()
        {
            return Poll::Ready(Ok(()));
        }
        let frame = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            None => return Poll::Ready(Ok(())),
            Some(frame) => frame.map_err(Into::into)?,
        };
        match frame.into_data() {
            Ok(data) => self.head = Some(data),
            Err(frame) => self.trailers = frame.into_trailers().ok(),
        }
        Poll::Ready(Ok(()))
    }

    /// Reads on until the first gRPC message is whole, and no further: the message's payload
    /// (after its 5-byte header; `None` when the body ends first), and the body, which yields
    /// every byte read and then the rest of the stream. The caller bounds the message's size
    /// (a checked body refuses an oversized one as it arrives).
    pub async fn first_message(mut self) -> Result<(Option<Bytes>, Prefixed<B>), BoxError> {
        use http_body_util::BodyExt;
        if let Some(head) = self.head.take() {
            self.prefix.push_front(head);
        }
        let mut read: usize = self.prefix.iter().map(Bytes::len).sum();
        let message = loop {
            if let Some(message) = whole_first_message(&self.prefix, read) {
                break Some(message);
            }
            if self.trailers.is_some() {
                break None;
            }
            match self.inner.frame().await {
                None => break None,
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        read += data.len();
                        self.prefix.push_back(data);
                    }
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        break None;
                    }
                },
            }
        };
        Ok((message, self))
    }
}

impl<B> Prefixed<B> {
    /// After [`Prefixed::first_message`] found a message: whether it was sent uncompressed.
    pub fn first_message_is_plain(&self) -> bool {
        self.prefix.front().and_then(|c| c.first()) == Some(&0)
    }

    /// After [`Prefixed::first_message`] found a message of `old_len` bytes: that message
    /// replaced by `payload` (uncompressed); what followed it is kept. `false` (and nothing
    /// changed) when the message read was compressed.
    pub fn replace_first_message(&mut self, old_len: usize, payload: &[u8]) -> bool {
        if self.prefix.front().and_then(|c| c.first()) != Some(&0) {
            return false;
        }
        let mut drop = 5 + old_len;
        while drop > 0 {
            let Some(front) = self.prefix.front_mut() else {
                break;
            };
            if front.len() <= drop {
                drop -= front.len();
                self.prefix.pop_front();
            } else {
                front.advance(drop);
                drop = 0;
            }
        }
        let mut frame = BytesMut::with_capacity(5 + payload.len());
        frame.put_u8(0);
        frame.put_u32(payload.len() as u32);
        frame.extend_from_slice(payload);
        self.prefix.push_front(frame.freeze());
        true
    }
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(chunk) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(chunk) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        this.inner
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && self.prefix.is_empty()
            && self.trailers.is_none()
            && self.inner.is_end_stream()
    }
}

/// What the metrics need to know about a request once it ends.
pub struct RequestLog {
    /// The route's handles, resolved when it was built.
    pub route: RouteMetrics,
    /// The method's labels, resolved when the call started.
    pub method: GrpcLabels<'static>,
    pub started: Instant,
}

impl RequestLog {
    pub fn finish(self, grpc_code: i32) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.route.record(&self.method, grpc_code, seconds);
    }
}

pin_project_lite::pin_project! {
    /// A response body on its way downstream. It records the final grpc-status in the metrics,
    /// ends the stream with DEADLINE_EXCEEDED trailers when the deadline passes, turns an
    /// upstream reset into proper gRPC trailers.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        // The call's own timer, from its start (one per call; boxed, so a body without a
        // deadline holds no room for one).
        deadline: Option<Pin<Box<Sleep>>>,
        deadline_reply: Option<LocalReply>,
        verdict: Verdict,
        context: RouteContext,
        log: Option<RequestLog>,
        done: bool,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // The client went away before the end of the stream.
            if let Some(log) = this.project().log.take() {
                log.finish(Code::Cancelled as i32);
            }
        }
    }
}

impl<B> ObservedBody<B> {
    /// `context` names the route in the message sent if the upstream resets the stream mid-way.
    pub fn new(
        inner: B,
        deadline: Option<(Pin<Box<Sleep>>, LocalReply)>,
        verdict: Verdict,
        context: RouteContext,
        log: RequestLog,
    ) -> Self {
        let (deadline, deadline_reply) = match deadline {
            Some((timer, reply)) => (Some(timer), Some(reply)),
            None => (None, None),
        };
        ObservedBody {
            inner,
            deadline,
            deadline_reply,
            verdict,
            context,
            log: Some(log),
            done: false,
        }
    }
}

fn trailers_frame(reply: &LocalReply) -> Frame<Bytes> {
    let mut trailers = HeaderMap::new();
    reply.write_to(&mut trailers);
    Frame::trailers(trailers)
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let end_with = |reply: LocalReply, this_log: &mut Option<RequestLog>, done: &mut bool| {
            *done = true;
            if let Some(log) = this_log.take() {
                log.finish(reply.code as i32);
            }
            Poll::Ready(Some(Ok(trailers_frame(&reply))))
        };
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                let reply = this.deadline_reply.take().unwrap_or_else(|| {
                    LocalReply::new(Code::DeadlineExceeded, "deadline exceeded")
                });
                return end_with(reply, this.log, this.done);
            }
        }
        match this.inner.poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    *this.done = true;
                    if let Some(log) = this.log.take() {
                        log.finish(grpc_status(trailers).unwrap_or(Code::Unknown as i32));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let reply = this.verdict.get().cloned().unwrap_or_else(|| {
                    LocalReply::new(
                        Code::Unavailable,
                        format!("upstream stream failed ({}): {e}", this.context),
                    )
                });
                end_with(reply, this.log, this.done)
            }
            Poll::Ready(None) => {
                *this.done = true;
                // A stream that ends without trailers has no grpc-status: that is an error for
                // the client, and is counted as UNKNOWN.
                if let Some(log) = this.log.take() {
                    log.finish(Code::Unknown as i32);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// What [`MapMessages`] does to each whole gRPC message of a response: the new message, or
/// `None` to send it as it came.
pub trait RewriteMessage {
    fn rewrite(&mut self, message: &[u8]) -> Option<Vec<u8>>;
}

pin_project_lite::pin_project! {
    /// A response body rewritten message by message (the version fill of `VersionGet`, the
    /// instance specs mapped back): bytes are buffered until a message is whole, then it goes
    /// out rewritten. A compressed message, or one larger than `max`, and everything after it
    /// pass as they came; so does a partial message at the end.
    pub struct MapMessages<B, R> {
        #[pin]
        inner: B,
        rewrite: R,
        max: usize,
        buffered: BytesMut,
        passthrough: bool,
        trailers: Option<HeaderMap>,
    }
}

impl<B, R> MapMessages<B, R> {
    pub fn new(inner: B, rewrite: R, max: usize) -> Self {
        MapMessages {
            inner,
            rewrite,
            max,
            buffered: BytesMut::new(),
            passthrough: false,
            trailers: None,
        }
    }
}

impl<B, R> Body for MapMessages<B, R>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    R: RewriteMessage,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if !*this.passthrough && this.buffered.len() >= 5 {
                let compressed = this.buffered[0] != 0;
                let len = u32::from_be_bytes([
                    this.buffered[1],
                    this.buffered[2],
                    this.buffered[3],
                    this.buffered[4],
                ]) as usize;
                if compressed || len > *this.max {
                    *this.passthrough = true;
                } else if this.buffered.len() >= 5 + len {
                    let mut frame = this.buffered.split_to(5 + len);
                    if let Some(message) = this.rewrite.rewrite(&frame[5..]) {
                        let mut out = BytesMut::with_capacity(5 + message.len());
                        out.put_u8(0);
                        out.put_u32(message.len() as u32);
                        out.extend_from_slice(&message);
                        frame = out;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(frame.freeze()))));
                }
            }
            if *this.passthrough && !this.buffered.is_empty() {
                let rest = this.buffered.split().freeze();
                return Poll::Ready(Some(Ok(Frame::data(rest))));
            }
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                None if this.buffered.is_empty() => return Poll::Ready(None),
                // A partial message at the end: sent as it came.
                None => *this.passthrough = true,
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if *this.passthrough && this.buffered.is_empty() => {
                        return Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Ok(data) => this.buffered.extend_from_slice(&data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            *this.passthrough = true;
                            *this.trailers = Some(trailers);
                        }
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && self.trailers.is_none() && self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    async fn run(chunks: Vec<Vec<u8>>, max: usize) -> (Result<usize, String>, Option<LocalReply>) {
        let verdict: Verdict = Default::default();
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(c)))),
        );
        let body = GrpcRequestBody::new(StreamBody::new(stream), max, false, verdict.clone());
        let res = body
            .collect()
            .await
            .map(|c| c.to_bytes().len())
            .map_err(|e| e.to_string());
        (res, verdict.get().cloned())
    }

    #[tokio::test]
    async fn passes_good_frames_split_anywhere() {
        let mut all = frame(0, b"hello");
        all.extend(frame(0, &[1u8; 300]));
        let split: Vec<Vec<u8>> = all.chunks(3).map(|c| c.to_vec()).collect();
        let (res, verdict) = run(split, 1024).await;
        assert_eq!(res, Ok(all.len()));
        assert!(verdict.is_none());
    }

    #[tokio::test]
    async fn rejects_oversized_bad_flag_and_truncated() {
        let (res, v) = run(vec![frame(0, &[0u8; 100])], 10).await;
        assert!(res.is_err());
        assert_eq!(v.unwrap().code, Code::ResourceExhausted);

        let (_, v) = run(vec![frame(7, b"x")], 10).await;
        let v = v.unwrap();
        assert_eq!(v.code, Code::InvalidArgument);
        assert!(v.message.contains("compressed-flag byte is 7"), "{v}");

        let mut cut = frame(0, b"abcdef");
        cut.truncate(8);
        let (_, v) = run(vec![cut], 10).await;
        let v = v.unwrap();
        assert!(
            v.message.contains("ends inside a message (3 of 6 bytes)"),
            "{v}"
        );
    }

    #[tokio::test]
    async fn buffers_small_bodies_and_streams_large_ones() {
        let small = Full::new(Bytes::from_static(b"0123456789"));
        let Buffered::Complete(r) = buffer_up_to(small, 64).await.unwrap() else {
            panic!("small body should be complete");
        };
        assert_eq!(r.replay().collect().await.unwrap().to_bytes(), "0123456789");
        assert_eq!(r.replay().collect().await.unwrap().to_bytes().len(), 10);

        let stream =
            futures_util::stream::iter((0..10).map(|_| {
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![1u8; 10])))
            }));
        let Buffered::Partial(p) = buffer_up_to(StreamBody::new(stream), 25).await.unwrap() else {
            panic!("large body should be partial");
        };
        assert_eq!(p.collect().await.unwrap().to_bytes().len(), 100);
    }

    /// A body of these frames, and whether it has ended (the test reads only what it needs).
    fn frames(
        frames: Vec<Frame<Bytes>>,
    ) -> (
        StreamBody<
            impl futures_util::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>>,
        >,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let pulled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = pulled.clone();
        let stream = futures_util::stream::iter(frames.into_iter().map(move |f| {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(f)
        }));
        (StreamBody::new(stream), pulled)
    }

    #[tokio::test]
    async fn first_message_is_read_and_no_more() {
        let mut two = frame(0, b"first");
        two.extend(frame(0, b"second"));
        // The header split from its payload, and a message after it that is not waited for.
        let (body, pulled) = frames(vec![
            Frame::data(Bytes::copy_from_slice(&two[..3])),
            Frame::data(Bytes::copy_from_slice(&two[3..8])),
            Frame::data(Bytes::copy_from_slice(&two[8..])),
            Frame::data(Bytes::from_static(b"tail")),
        ]);
        let (message, rest) = read_first_message(body).await.unwrap();
        assert_eq!(message.as_deref(), Some(&b"first"[..]));
        assert_eq!(pulled.load(std::sync::atomic::Ordering::SeqCst), 3);
        let mut expected = two.clone();
        expected.extend_from_slice(b"tail");
        assert_eq!(rest.collect().await.unwrap().to_bytes(), expected);

        // Whole in the first chunk: a slice of it.
        let one = Bytes::from(frame(0, b"whole"));
        let (body, _) = frames(vec![Frame::data(one.clone())]);
        let (message, _) = read_first_message(body).await.unwrap();
        let message = message.unwrap();
        assert_eq!(message, "whole");
        assert_eq!(message.as_ptr(), one[5..].as_ptr());
    }

    #[tokio::test]
    async fn a_body_that_ends_early_keeps_its_bytes_and_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-end", http::HeaderValue::from_static("1"));
        let partial = frame(0, b"cut short");
        let (body, _) = frames(vec![
            Frame::data(Bytes::copy_from_slice(&partial[..7])),
            Frame::trailers(trailers.clone()),
        ]);
        let (message, rest) = read_first_message(body).await.unwrap();
        assert_eq!(message, None);
        let collected = rest.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), &partial[..7]);

        let (body, _) = frames(vec![]);
        let (message, rest) = read_first_message(body).await.unwrap();
        assert_eq!(message, None);
        assert!(rest.collect().await.unwrap().to_bytes().is_empty());
    }
}
