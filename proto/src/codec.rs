//! The tonic codec of every lhnet service and client: prost's encoding, with map entries
//! written whole as Go writes them ([`crate::wire`]); decoding is prost's.

use std::marker::PhantomData;

use bytes::BufMut;
use prost::{Message, Name};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use crate::wire;

/// `application/grpc+proto` for messages of lhnet's protos.
#[derive(Debug, Clone)]
pub struct LonghornCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for LonghornCodec<T, U> {
    fn default() -> Self {
        LonghornCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for LonghornCodec<T, U>
where
    T: Message + Name + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = LonghornEncoder<T>;
    type Decoder = LonghornDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        LonghornEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        LonghornDecoder(PhantomData)
    }
}

/// Encodes `T`, completing its map entries when it has any.
#[derive(Debug, Clone)]
pub struct LonghornEncoder<T>(PhantomData<T>);

impl<T: Message + Name> Encoder for LonghornEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let schema = wire::schema();
        let Some(shape) = schema.shape_of(T::PACKAGE, T::NAME) else {
            return item
                .encode(buf)
                .map_err(|e| Status::internal(format!("encoding {}: {e}", T::NAME)));
        };
        let plain = item.encode_to_vec();
        match schema.complete_map_entries(shape, &plain) {
            Some(whole) => buf.put_slice(&whole),
            None => buf.put_slice(&plain),
        }
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decodes `U` with prost.
#[derive(Debug, Clone)]
pub struct LonghornDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for LonghornDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // INTERNAL, as tonic's own codec answers; lhnet's router turns it into
        // INVALID_ARGUMENT for requests it decodes itself.
        Message::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
