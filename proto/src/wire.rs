//! Map entries written whole, as Go's protobuf writes them. A proto3 map is a repeated entry
//! message `{1: key, 2: value}`; Go always encodes both fields, even empty ones, while prost
//! leaves a default key or value out. A Go client on golang/protobuf 1.3 (the instance-manager's
//! own tree) decodes an entry without its value as a nil message and dereferences it, so every
//! message lhnet sends goes through [`Schema::complete_map_entries`] when its type holds a map.
//!
//! Which fields are maps comes from the descriptors of the protos themselves
//! ([`crate::FILE_DESCRIPTOR_SET`]), so a field added to a proto is covered without code.

use std::collections::HashMap;
use std::sync::OnceLock;

use fnv::FnvHashMap;
use prost::encoding::encode_varint;
use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};

/// How a field is laid out on the wire, as far as completing map entries needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Varint,
    Fixed64,
    Fixed32,
    /// Strings and bytes.
    Bytes,
    /// A message, by its index in [`Schema::shapes`].
    Message(usize),
}

#[derive(Debug, Clone, Copy)]
enum Field {
    Message(usize),
    Map { key: Kind, value: Kind },
}

#[derive(Debug, Default)]
struct Shape {
    /// Only the fields that are messages or maps; everything else is copied as it is.
    fields: HashMap<u32, Field>,
    /// Whether this message or one it holds has a map field.
    has_maps: bool,
}

/// Every message of lhnet's protos, with the fields that matter for map entries.
#[derive(Debug, Default)]
pub struct Schema {
    /// Package → message name within it (`Outer.Inner` for nested ones) → shape index. FNV:
    /// every message lhnet encodes is looked up here, and SipHash on these short names showed
    /// in the engine proxy's profile.
    names: FnvHashMap<String, FnvHashMap<String, usize>>,
    shapes: Vec<Shape>,
}

/// A message type that holds maps; see [`Schema::shape_of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape(usize);

/// The schema of lhnet's own protos, built once.
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        // The descriptors are built into the crate: failing to decode them is a build bug, and
        // an empty schema only means map entries go out as prost writes them.
        FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET)
            .map(|fds| Schema::new(&fds))
            .unwrap_or_default()
    })
}

// === impl Schema ===

impl Schema {
    pub fn new(fds: &FileDescriptorSet) -> Schema {
        // Pass 1: an index for every message, by full name (`.pkg.Outer.Inner`).
        let mut all: Vec<(String, String, String, &DescriptorProto)> = Vec::new();
        for file in &fds.file {
            let package = file.package().to_string();
            let mut stack: Vec<(String, &DescriptorProto)> = file
                .message_type
                .iter()
                .map(|m| (m.name().to_string(), m))
                .collect();
            while let Some((name, message)) = stack.pop() {
                for nested in &message.nested_type {
                    stack.push((format!("{name}.{}", nested.name()), nested));
                }
                let full = if package.is_empty() {
                    format!(".{name}")
                } else {
                    format!(".{package}.{name}")
                };
                all.push((full, package.clone(), name, message));
            }
        }
        let index: HashMap<&str, usize> = all
            .iter()
            .enumerate()
            .map(|(i, (full, ..))| (full.as_str(), i))
            .collect();
        let kind_of = |field: &prost_types::FieldDescriptorProto| -> Option<Kind> {
            Some(match field.r#type() {
                Type::Double | Type::Fixed64 | Type::Sfixed64 => Kind::Fixed64,
                Type::Float | Type::Fixed32 | Type::Sfixed32 => Kind::Fixed32,
                Type::String | Type::Bytes => Kind::Bytes,
                Type::Message => Kind::Message(*index.get(field.type_name())?),
                Type::Group => return None,
                _ => Kind::Varint,
            })
        };

        // Pass 2: the message and map fields of each.
        let mut schema = Schema::default();
        for (_, package, name, message) in &all {
            let mut shape = Shape::default();
            for field in &message.field {
                let Some(Kind::Message(target)) = kind_of(field) else {
                    continue;
                };
                let entry = all[target].3;
                let is_map = entry.options.as_ref().is_some_and(|o| o.map_entry());
                let number = u32::try_from(field.number()).unwrap_or(0);
                if is_map {
                    let part = |n: i32| entry.field.iter().find(|f| f.number() == n);
                    if let (Some(key), Some(value)) =
                        (part(1).and_then(kind_of), part(2).and_then(kind_of))
                    {
                        shape.fields.insert(number, Field::Map { key, value });
                        shape.has_maps = true;
                    }
                } else {
                    shape.fields.insert(number, Field::Message(target));
                }
            }
            schema
                .names
                .entry(package.clone())
                .or_default()
                .insert(name.clone(), schema.shapes.len());
            schema.shapes.push(shape);
        }
        // A message holds maps when any message it holds does: propagate to a fixed point
        // (recursive types end it, since each pass only turns flags on).
        loop {
            let mut changed = false;
            for i in 0..schema.shapes.len() {
                if schema.shapes[i].has_maps {
                    continue;
                }
                let holds = schema.shapes[i].fields.values().any(|f| match f {
                    Field::Message(t) => schema.shapes[*t].has_maps,
                    Field::Map { .. } => true,
                });
                if holds {
                    schema.shapes[i].has_maps = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        schema
    }

    /// The shape of message `name` of `package` (prost's `Name::PACKAGE` / `Name::NAME`) when
    /// it holds a map; `None` for every other message, which needs no rewriting.
    pub fn shape_of(&self, package: &str, name: &str) -> Option<MapShape> {
        let i = *self.names.get(package)?.get(name)?;
        self.shapes[i].has_maps.then_some(MapShape(i))
    }

    /// `message` (an encoding of the type `shape` names) with every map entry carrying both
    /// its key and its value. `None` when the bytes are not a well-formed message of that shape;
    /// the caller then sends them as they are.
    pub fn complete_map_entries(&self, shape: MapShape, message: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(message.len() + message.len() / 8 + 8);
        self.rewrite(shape.0, message, &mut out)?;
        Some(out)
    }

    fn rewrite(&self, shape: usize, mut input: &[u8], out: &mut Vec<u8>) -> Option<()> {
        let fields = &self.shapes[shape].fields;
        while !input.is_empty() {
            let start = input;
            let key = read_varint(&mut input)?;
            let number = u32::try_from(key >> 3).ok()?;
            let wire_type = (key & 7) as u8;
            match (wire_type, fields.get(&number)) {
                (2, Some(Field::Message(t))) if self.shapes[*t].has_maps => {
                    let body = read_len(&mut input)?;
                    let mut inner = Vec::with_capacity(body.len() + 8);
                    self.rewrite(*t, body, &mut inner)?;
                    put_len_delimited(out, key, &inner);
                }
                (2, Some(Field::Map { key: k, value: v })) => {
                    let body = read_len(&mut input)?;
                    let entry = self.entry(*k, *v, body)?;
                    put_len_delimited(out, key, &entry);
                }
                _ => {
                    skip_value(&mut input, wire_type)?;
                    out.extend_from_slice(&start[..start.len() - input.len()]);
                }
            }
        }
        Some(())
    }

    /// One map entry with field 1 (key) and field 2 (value) always present, in that order.
    fn entry(&self, key: Kind, value: Kind, mut body: &[u8]) -> Option<Vec<u8>> {
        let mut parts: [Option<(u64, &[u8])>; 2] = [None, None];
        while !body.is_empty() {
            let tag = read_varint(&mut body)?;
            let wire_type = (tag & 7) as u8;
            let before = body;
            skip_value(&mut body, wire_type)?;
            let raw = &before[..before.len() - body.len()];
            // The last occurrence wins, as in every protobuf decoder.
            if let n @ (1 | 2) = tag >> 3 {
                parts[(n - 1) as usize] = Some((tag, raw));
            }
        }
        let mut out = Vec::with_capacity(body.len() + 4);
        for (i, kind) in [key, value].into_iter().enumerate() {
            let number = i as u64 + 1;
            match (parts[i], kind) {
                (Some((tag, raw)), Kind::Message(t)) if self.shapes[t].has_maps && tag & 7 == 2 => {
                    let mut inner_input = raw;
                    let inner = read_len(&mut inner_input)?;
                    let mut rewritten = Vec::with_capacity(inner.len() + 8);
                    self.rewrite(t, inner, &mut rewritten)?;
                    put_len_delimited(&mut out, tag, &rewritten);
                }
                (Some((tag, raw)), _) => {
                    encode_varint(tag, &mut out);
                    out.extend_from_slice(raw);
                }
                (None, kind) => put_default(&mut out, number, kind),
            }
        }
        Some(out)
    }
}

/// The encoding of a field at its default value: what Go writes for an empty key or value.
fn put_default(out: &mut Vec<u8>, number: u64, kind: Kind) {
    let (wire_type, zeros) = match kind {
        Kind::Varint => (0, 1),
        Kind::Fixed64 => (1, 8),
        Kind::Fixed32 => (5, 4),
        // A length of 0.
        Kind::Bytes | Kind::Message(_) => (2, 1),
    };
    encode_varint(number << 3 | wire_type, out);
    out.extend(std::iter::repeat_n(0u8, zeros));
}

fn put_len_delimited(out: &mut Vec<u8>, tag: u64, body: &[u8]) {
    encode_varint(tag, out);
    encode_varint(body.len() as u64, out);
    out.extend_from_slice(body);
}

fn read_varint(input: &mut &[u8]) -> Option<u64> {
    prost::encoding::decode_varint(input).ok()
}

fn read_len<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(read_varint(input)?).ok()?;
    let body = input.get(..len)?;
    *input = &input[len..];
    Some(body)
}

fn skip_value(input: &mut &[u8], wire_type: u8) -> Option<()> {
    match wire_type {
        0 => {
            read_varint(input)?;
        }
        1 => *input = input.get(8..)?,
        2 => {
            read_len(input)?;
        }
        5 => *input = input.get(4..)?,
        // Groups (3, 4) are proto2 only; anything else is not protobuf.
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imrpc::{EngineSnapshotDiskInfo, EngineSnapshotListProxyResponse};
    use crate::ptypes::SnapshotPurgeStatusResponse;
    use prost::Name;

    /// Decodes `bytes` as a repeated map field 1 and returns each entry's field numbers.
    fn entry_fields(mut bytes: &[u8]) -> Vec<Vec<u64>> {
        let mut entries = Vec::new();
        while !bytes.is_empty() {
            let tag = read_varint(&mut bytes).unwrap();
            assert_eq!(tag, 1 << 3 | 2);
            let mut entry = read_len(&mut bytes).unwrap();
            let mut fields = Vec::new();
            while !entry.is_empty() {
                let t = read_varint(&mut entry).unwrap();
                skip_value(&mut entry, (t & 7) as u8).unwrap();
                fields.push(t >> 3);
            }
            entries.push(fields);
        }
        entries
    }

    #[test]
    fn empty_values_and_keys_are_written() {
        let status = crate::imrpc::EngineSnapshotPurgeStatusProxyResponse {
            status: [
                (
                    "tcp://10.0.0.1:10000".to_string(),
                    SnapshotPurgeStatusResponse::default(),
                ),
                (
                    String::new(),
                    SnapshotPurgeStatusResponse {
                        progress: 5,
                        ..Default::default()
                    },
                ),
            ]
            .into(),
        };
        let prost_bytes = status.encode_to_vec();
        let mut seen = entry_fields(&prost_bytes);
        seen.sort();
        assert_eq!(seen, vec![vec![1], vec![2]], "prost drops the defaults");

        type M = crate::imrpc::EngineSnapshotPurgeStatusProxyResponse;
        let shape = schema().shape_of(M::PACKAGE, M::NAME).unwrap();
        let whole = schema().complete_map_entries(shape, &prost_bytes).unwrap();
        assert_eq!(entry_fields(&whole), vec![vec![1, 2], vec![1, 2]]);
        let back = M::decode(whole.as_slice()).unwrap();
        assert_eq!(back, status);
    }

    /// The fields of one message: (number, body of a length-delimited field, or empty).
    fn fields(mut bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let tag = read_varint(&mut bytes).unwrap();
            let body = if tag & 7 == 2 {
                read_len(&mut bytes).unwrap().to_vec()
            } else {
                skip_value(&mut bytes, (tag & 7) as u8).unwrap();
                Vec::new()
            };
            out.push((tag >> 3, body));
        }
        out
    }

    #[test]
    fn nested_maps_are_completed_and_other_messages_are_left_alone() {
        let list = EngineSnapshotListProxyResponse {
            disks: [(
                "s1".to_string(),
                EngineSnapshotDiskInfo {
                    name: "s1".into(),
                    children: [("volume-head".to_string(), false)].into(),
                    labels: [("k".to_string(), String::new())].into(),
                    ..Default::default()
                },
            )]
            .into(),
        };
        type L = EngineSnapshotListProxyResponse;
        let shape = schema().shape_of(L::PACKAGE, L::NAME).unwrap();
        let whole = schema()
            .complete_map_entries(shape, &list.encode_to_vec())
            .unwrap();
        assert_eq!(L::decode(whole.as_slice()).unwrap(), list);
        let entry = &fields(&whole)[0].1;
        let info = &fields(entry)[1];
        assert_eq!(info.0, 2, "the disk info is the entry's value");
        let maps: Vec<Vec<u64>> = fields(&info.1)
            .into_iter()
            .filter(|(n, _)| *n == 3 || *n == 8)
            .map(|(_, e)| fields(&e).into_iter().map(|(n, _)| n).collect())
            .collect();
        assert_eq!(
            maps,
            vec![vec![1, 2], vec![1, 2]],
            "children and labels whole"
        );

        type V = crate::ptypes::Volume;
        assert!(schema().shape_of(V::PACKAGE, V::NAME).is_none());
        type P = crate::process_manager::ProcessListResponse;
        assert!(schema().shape_of(P::PACKAGE, P::NAME).is_some());
    }

    #[test]
    fn malformed_bytes_are_refused_not_rewritten() {
        type M = crate::imrpc::EngineSnapshotPurgeStatusProxyResponse;
        let shape = schema().shape_of(M::PACKAGE, M::NAME).unwrap();
        assert!(schema()
            .complete_map_entries(shape, &[0x0a, 0x05, 0x01])
            .is_none());
        assert!(schema().complete_map_entries(shape, &[0xff]).is_none());
        assert_eq!(schema().complete_map_entries(shape, &[]), Some(vec![]));
    }
}
