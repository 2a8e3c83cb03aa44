//! HTTP/2 frames written by hand, for clients that misbehave on purpose (no library would
//! send them): header-only streams, slow bytes, requests without a body.

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A SETTINGS frame with no settings.
pub const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// A HEADERS frame opening `stream` for a gRPC call to `path`, END_HEADERS and no END_STREAM:
/// HPACK by hand (indexed :method POST and :scheme http, literals without indexing).
pub fn headers_frame(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86];
    let mut literal = |prefix: &[u8], value: &[u8]| {
        block.extend_from_slice(prefix);
        block.push(value.len() as u8);
        block.extend_from_slice(value);
    };
    literal(&[0x04], path.as_bytes()); // :path (static index 4)
    literal(&[0x01], b"lhnet"); // :authority (static index 1)
    literal(&[0x0f, 0x10], b"application/grpc"); // content-type (static index 31)
    literal(&[0x00, 0x02, b't', b'e'], b"trailers");
    frame(0x1, 0x4, stream, &block)
}

/// A gRPC message as a DATA frame's payload: uncompressed, its length, then `message`.
pub fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// One frame: type, flags, stream and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The frames in `bytes` (whole ones only): (type, flags, stream, payload).
pub fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}
