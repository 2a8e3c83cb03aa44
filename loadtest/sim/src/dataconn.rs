//! longhorn-engine's engine↔replica data connection ("dataconn", replica port P+1): each message
//! is a 26-byte little-endian header (magic 0x1b01, seq, type, offset, size, data length) and
//! then the data. The replica answers Read, Write and Ping with Response, EOF or Error carrying
//! the same seq. The simulated engine uses the same protocol for its local frontend socket.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub const MAGIC: u16 = 0x1b01;
pub const HEADER_LEN: usize = 26;
/// Largest data block one message may carry; larger lengths are refused before allocating.
pub const MAX_DATA: u32 = 16 << 20;

pub const TYPE_READ: u32 = 0;
pub const TYPE_WRITE: u32 = 1;
pub const TYPE_RESPONSE: u32 = 2;
pub const TYPE_ERROR: u32 = 3;
pub const TYPE_EOF: u32 = 4;
pub const TYPE_CLOSE: u32 = 5;
pub const TYPE_PING: u32 = 6;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Message {
    pub seq: u32,
    pub kind: u32,
    pub offset: i64,
    pub size: u32,
    pub data: Vec<u8>,
}

/// Reads one message; `Ok(None)` on a clean end of stream before a header.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Message>> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut h[1..]).await?;
    let magic = u16::from_le_bytes([h[0], h[1]]);
    if magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("wrong API version received: 0x{magic:x} (want 0x{MAGIC:x})"),
        ));
    }
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&h[10..18]);
    let length = u32_at(22);
    if length > MAX_DATA {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message carries {length} bytes, over the {MAX_DATA}-byte limit"),
        ));
    }
    let mut data = vec![0u8; length as usize];
    r.read_exact(&mut data).await?;
    Ok(Some(Message {
        seq: u32_at(2),
        kind: u32_at(6),
        offset: i64::from_le_bytes(offset),
        size: u32_at(18),
        data,
    }))
}

pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> io::Result<()> {
    write_frame(w, m.seq, m.kind, m.offset, m.size, &m.data).await
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    seq: u32,
    kind: u32,
    offset: i64,
    size: u32,
    data: &[u8],
) -> io::Result<()> {
    let length = u32::try_from(data.len())
        .ok()
        .filter(|l| *l <= MAX_DATA)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "message data too large"))?;
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    h[2..6].copy_from_slice(&seq.to_le_bytes());
    h[6..10].copy_from_slice(&kind.to_le_bytes());
    h[10..18].copy_from_slice(&offset.to_le_bytes());
    h[18..22].copy_from_slice(&size.to_le_bytes());
    h[22..26].copy_from_slice(&length.to_le_bytes());
    w.write_all(&h).await?;
    w.write_all(data).await?;
    w.flush().await
}

/// What a data server does with reads and writes.
pub trait Block: Send + Sync + 'static {
    fn read_at(
        &self,
        offset: i64,
        len: u32,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, String>> + Send;
    fn write_at(
        &self,
        offset: i64,
        data: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// Serves one data connection until the peer closes it or sends something unreadable.
pub async fn serve_connection<B: Block>(stream: TcpStream, block: &B) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    while let Some(m) = read_message(&mut r).await? {
        let reply = match m.kind {
            TYPE_READ => match block.read_at(m.offset, m.size).await {
                Ok(data) => Message {
                    kind: TYPE_RESPONSE,
                    size: data.len() as u32,
                    data,
                    ..m
                },
                Err(e) => error_reply(m, e),
            },
            TYPE_WRITE => {
                let size = m.data.len() as u32;
                let offset = m.offset;
                match block.write_at(offset, m.data).await {
                    Ok(()) => Message {
                        seq: m.seq,
                        kind: TYPE_RESPONSE,
                        offset,
                        size,
                        data: Vec::new(),
                    },
                    Err(e) => error_reply(
                        Message {
                            seq: m.seq,
                            offset,
                            ..Default::default()
                        },
                        e,
                    ),
                }
            }
            TYPE_PING => Message {
                kind: TYPE_RESPONSE,
                size: 0,
                data: Vec::new(),
                ..m
            },
            TYPE_CLOSE => return Ok(()),
            other => {
                let text = format!("message type {other} is not supported here");
                error_reply(m, text)
            }
        };
        write_message(&mut w, &reply).await?;
    }
    Ok(())
}

fn error_reply(m: Message, text: String) -> Message {
    Message {
        kind: TYPE_ERROR,
        size: text.len() as u32,
        data: text.into_bytes(),
        ..m
    }
}

/// A client of a data server: one request in flight at a time, answers matched by seq.
pub struct DataClient {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    seq: u32,
    peer: String,
}

impl DataClient {
    pub async fn connect(addr: &str) -> io::Result<DataClient> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(DataClient {
            reader: BufReader::new(r),
            writer: BufWriter::with_capacity(1 << 16, w),
            seq: 0,
            peer: addr.to_string(),
        })
    }

    async fn call(
        &mut self,
        kind: u32,
        offset: i64,
        size: u32,
        data: &[u8],
    ) -> io::Result<Message> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        write_frame(&mut self.writer, seq, kind, offset, size, data).await?;
        let reply = read_message(&mut self.reader).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("data server {} closed the connection", self.peer),
            )
        })?;
        if reply.seq != seq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "data server {} answered seq {} to seq {seq}",
                    self.peer, reply.seq
                ),
            ));
        }
        match reply.kind {
            TYPE_RESPONSE | TYPE_EOF => Ok(reply),
            TYPE_ERROR => Err(io::Error::other(format!(
                "data server {}: {}",
                self.peer,
                String::from_utf8_lossy(&reply.data)
            ))),
            TYPE_CLOSE => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("data server {} is closing", self.peer),
            )),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("data server {} sent message type {other}", self.peer),
            )),
        }
    }

    pub async fn write_at(&mut self, offset: i64, data: &[u8]) -> io::Result<()> {
        let size = data.len() as u32;
        self.call(TYPE_WRITE, offset, size, data).await.map(|_| ())
    }

    pub async fn read_at(&mut self, offset: i64, len: u32) -> io::Result<Vec<u8>> {
        self.call(TYPE_READ, offset, len, &[]).await.map(|m| m.data)
    }

    pub async fn ping(&mut self) -> io::Result<()> {
        self.call(TYPE_PING, 0, 0, &[]).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_is_26_bytes_little_endian() {
        let m = Message {
            seq: 7,
            kind: TYPE_WRITE,
            offset: 4096,
            size: 3,
            data: vec![1, 2, 3],
        };
        let mut buf = Vec::new();
        write_message(&mut buf, &m).await.unwrap();
        assert_eq!(buf.len(), HEADER_LEN + 3);
        assert_eq!(&buf[0..2], &[0x01, 0x1b]);
        assert_eq!(&buf[2..6], &[7, 0, 0, 0]);
        assert_eq!(&buf[10..18], &4096i64.to_le_bytes());
        assert_eq!(&buf[22..26], &[3, 0, 0, 0]);
        let back = read_message(&mut buf.as_slice()).await.unwrap().unwrap();
        assert_eq!(back, m);
    }

    #[tokio::test]
    async fn bad_magic_and_oversized_length_are_refused() {
        let mut buf = vec![0u8; HEADER_LEN];
        let e = read_message(&mut buf.as_slice()).await.unwrap_err();
        assert!(e.to_string().contains("wrong API version"), "{e}");
        buf[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        buf[22..26].copy_from_slice(&(MAX_DATA + 1).to_le_bytes());
        let e = read_message(&mut buf.as_slice()).await.unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }
}
