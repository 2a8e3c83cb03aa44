//! Advertising lhnet's proxy API on the instance-manager's `VersionGet` responses that pass
//! through lhnet (`ProcessManagerService` on 8500, `imrpc.InstanceService` on 8503; both answer
//! `VersionResponse`): a manager uses the gRPC proxy only when fields 6/7
//! (`instanceManagerProxyAPIVersion` / `MinVersion`) are non-zero (spec §4, §7), and it reads
//! them from whichever of the two its IM API version says (InstanceService from API 4 on).
//!
//! The message is patched on the wire, not decoded and re-encoded, so fields this code does not
//! know (newer instance-managers) pass through untouched.

use crate::body::{MapMessages, RewriteMessage};

/// The paths whose responses are patched.
pub const VERSION_GET_PATHS: [&str; 2] = [
    "/ProcessManagerService/VersionGet",
    "/imrpc.InstanceService/VersionGet",
];
/// Longhorn v1.3.2+ proxy API (ReplicaAdd fields 4/5), and the oldest one lhnet serves.
pub const PROXY_API_VERSION: u64 = 2;
pub const PROXY_API_MIN_VERSION: u64 = 1;
/// A VersionResponse is a few hundred bytes; anything larger passes through unpatched.
const MAX_BUFFERED: usize = 64 * 1024;

/// Adds fields 6 and 7 to an encoded `VersionResponse` when they are absent (proto3 omits
/// zeros, so absent means 0). Returns `None` when the bytes are not a well-formed message.
pub fn patch_version_response(message: &[u8]) -> Option<Vec<u8>> {
    let mut seen = [false; 2];
    let mut rest = message;
    while !rest.is_empty() {
        let (key, n) = read_varint(rest)?;
        rest = &rest[n..];
        let (field, wire_type) = (key >> 3, key & 7);
        let nonzero = match wire_type {
            0 => {
                let (v, n) = read_varint(rest)?;
                rest = &rest[n..];
                v != 0
            }
            1 => {
                rest = rest.get(8..)?;
                true
            }
            2 => {
                let (len, n) = read_varint(rest)?;
                rest = rest.get(n + usize::try_from(len).ok()?..)?;
                true
            }
            5 => {
                rest = rest.get(4..)?;
                true
            }
            _ => return None,
        };
        if (field == 6 || field == 7) && nonzero {
            seen[(field - 6) as usize] = true;
        }
    }
    let mut out = message.to_vec();
    for (i, (field, value)) in [(6u64, PROXY_API_VERSION), (7, PROXY_API_MIN_VERSION)]
        .into_iter()
        .enumerate()
    {
        if !seen[i] {
            write_varint(&mut out, field << 3);
            write_varint(&mut out, value);
        }
    }
    Some(out)
}

fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Patches one uncompressed gRPC message frame; anything else is returned as it was.
/// A `VersionGet` answer with lhnet's proxy API version filled in.
pub type VersionPatchBody<B> = MapMessages<B, VersionFill>;

/// The rewrite of [`VersionPatchBody`]: [`patch_version_response`].
pub struct VersionFill;

impl RewriteMessage for VersionFill {
    fn rewrite(&mut self, message: &[u8]) -> Option<Vec<u8>> {
        patch_version_response(message)
    }
}

/// `inner` with its `VersionResponse` patched (a larger message passes unpatched).
pub fn version_patch_body<B>(inner: B) -> VersionPatchBody<B> {
    MapMessages::new(inner, VersionFill, MAX_BUFFERED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_missing_fields_and_keeps_the_rest() {
        // {1: "v1_20230407", 4: 2, 5: 1, 99: "future"}
        let mut msg = vec![0x0a, 11];
        msg.extend_from_slice(b"v1_20230407");
        msg.extend_from_slice(&[0x20, 2, 0x28, 1]);
        msg.extend_from_slice(&[0x9a, 0x06, 6]);
        msg.extend_from_slice(b"future");
        let patched = patch_version_response(&msg).unwrap();
        assert!(
            patched.starts_with(&msg),
            "existing bytes kept as they were"
        );
        assert_eq!(&patched[msg.len()..], &[0x30, 2, 0x38, 1]);

        // An instance-manager that already advertises a proxy API keeps its values.
        let mut with = msg.clone();
        with.extend_from_slice(&[0x30, 3, 0x38, 1]);
        assert_eq!(patch_version_response(&with).unwrap(), with);
        // Not protobuf: left alone.
        assert!(patch_version_response(&[0xff]).is_none());
    }
}
