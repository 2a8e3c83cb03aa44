//! The simulated sync agents' file transfer: one TCP connection per disk file, carrying a JSON
//! header line (the disk's metadata and byte count) and then the bytes.

use std::collections::HashMap;
use std::io;

use lhnet_proto::ptypes::DiskInfo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The `.img.meta` of a disk, as it travels.
#[derive(Serialize, Deserialize)]
struct Header {
    name: String,
    parent: String,
    removed: bool,
    user_created: bool,
    created: String,
    labels: HashMap<String, String>,
    bytes: u64,
}

/// Largest disk the simulator moves in one file.
const MAX_FILE: u64 = 1 << 34;
/// Bytes per write and per progress report.
const CHUNK: usize = 256 << 10;

/// Sends one disk file; with `rate` > 0, no faster than that many bytes per second (a disk's
/// read speed, so that rebuild progress can be watched).
pub async fn send_disk(
    host: &str,
    port: u16,
    meta: &DiskInfo,
    data: &[u8],
    rate: u64,
) -> io::Result<()> {
    let mut stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    let header = Header {
        name: meta.name.clone(),
        parent: meta.parent.clone(),
        removed: meta.removed,
        user_created: meta.user_created,
        created: meta.created.clone(),
        labels: meta.labels.clone(),
        bytes: data.len() as u64,
    };
    let mut line = serde_json::to_vec(&header).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    for chunk in data.chunks(CHUNK) {
        stream.write_all(chunk).await?;
        sent += chunk.len() as u64;
        if rate > 0 {
            let due = started + std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
    }
    stream.shutdown().await
}

/// Accepts one sender and reads one disk file, reporting (bytes so far, bytes expected).
pub async fn receive_disk(
    listener: TcpListener,
    progress: impl Fn(u64, u64) + Send + 'static,
) -> io::Result<(DiskInfo, Vec<u8>)> {
    let (stream, _) = tokio::time::timeout(std::time::Duration::from_secs(30), listener.accept())
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, "no sender connected within 30 s")
        })??;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let header: Header = serde_json::from_str(&line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad file header: {e}")))?;
    if header.bytes > MAX_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file of {} bytes is over the limit", header.bytes),
        ));
    }
    let mut data = vec![0u8; header.bytes as usize];
    let mut received = 0usize;
    for chunk in data.chunks_mut(CHUNK) {
        reader.read_exact(chunk).await?;
        received += chunk.len();
        progress(received as u64, header.bytes);
    }
    let meta = DiskInfo {
        name: header.name,
        parent: header.parent,
        children: HashMap::new(),
        removed: header.removed,
        user_created: header.user_created,
        created: header.created,
        size: header.bytes.to_string(),
        labels: header.labels,
    };
    Ok((meta, data))
}
