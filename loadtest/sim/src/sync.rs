//! The simulated sync agents' file transfer: one TCP connection per disk file, carrying a JSON
//! header line (the disk's metadata and byte count), then the file in numbered chunks. With
//! `fast` (longhorn-engine's fast_sync), the receiver first answers with the checksums of the
//! copy it already has and only the chunks that differ travel.

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
    #[serde(default)]
    fast: bool,
}

/// The receiver's copy, chunk by chunk, for a fast sync.
#[derive(Serialize, Deserialize, Default)]
struct Have {
    chunks: Vec<u64>,
}

/// Largest disk the simulator moves in one file.
const MAX_FILE: u64 = 1 << 34;
/// Bytes per chunk, per checksum and per progress report.
const CHUNK: usize = 256 << 10;
const END: u32 = u32::MAX;

const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO);

fn checksums(data: &[u8]) -> Vec<u64> {
    data.chunks(CHUNK).map(|c| CRC64.checksum(c)).collect()
}

/// Sends one disk file; with `rate` > 0, no faster than that many bytes per second (a disk's
/// read speed, so that rebuild progress can be watched). Returns the bytes that travelled.
pub async fn send_disk(
    host: &str,
    port: u16,
    meta: &DiskInfo,
    data: &[u8],
    rate: u64,
    fast: bool,
) -> io::Result<u64> {
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(stream);
    let header = Header {
        name: meta.name.clone(),
        parent: meta.parent.clone(),
        removed: meta.removed,
        user_created: meta.user_created,
        created: meta.created.clone(),
        labels: meta.labels.clone(),
        bytes: data.len() as u64,
        fast,
    };
    let mut line = serde_json::to_vec(&header).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.get_mut().write_all(&line).await?;
    let have = if fast {
        let mut answer = String::new();
        stream.read_line(&mut answer).await?;
        serde_json::from_str::<Have>(&answer).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad fast-sync answer: {e}"),
            )
        })?
    } else {
        Have::default()
    };
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let stream = stream.get_mut();
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        // Disk files are sparse: a hole is not sent (the receiver's copy starts empty), and
        // with fast sync neither is a chunk the receiver already has.
        let skip = match have.chunks.get(i) {
            Some(theirs) if fast => *theirs == CRC64.checksum(chunk),
            _ => chunk.iter().all(|b| *b == 0),
        };
        if skip {
            continue;
        }
        stream.write_all(&(i as u32).to_le_bytes()).await?;
        stream
            .write_all(&(chunk.len() as u32).to_le_bytes())
            .await?;
        stream.write_all(chunk).await?;
        sent += chunk.len() as u64;
        if rate > 0 {
            let due = started + std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
    }
    stream.write_all(&END.to_le_bytes()).await?;
    stream.shutdown().await?;
    Ok(sent)
}

/// Accepts one sender and reads one disk file into a copy of `existing` (what the receiver
/// has of it), reporting (bytes so far, bytes expected). Returns the file and the bytes that
/// travelled.
pub async fn receive_disk(
    listener: TcpListener,
    existing: Option<Vec<u8>>,
    progress: impl Fn(u64, u64) + Send + 'static,
) -> io::Result<(DiskInfo, Vec<u8>, u64)> {
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
    let mut data = if header.fast {
        existing.unwrap_or_default()
    } else {
        Vec::new()
    };
    if header.fast {
        let have = Have {
            chunks: checksums(&data),
        };
        let mut answer = serde_json::to_vec(&have).map_err(io::Error::other)?;
        answer.push(b'\n');
        reader.get_mut().write_all(&answer).await?;
    }
    data.resize(header.bytes as usize, 0);
    let mut received = 0u64;
    loop {
        let index = reader.read_u32_le().await?;
        if index == END {
            break;
        }
        let len = reader.read_u32_le().await? as usize;
        let at = index as usize * CHUNK;
        if len > CHUNK || at + len > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {index} of {len} bytes is outside the file"),
            ));
        }
        reader.read_exact(&mut data[at..at + len]).await?;
        received += len as u64;
        progress(((at + len) as u64).min(header.bytes), header.bytes);
    }
    progress(header.bytes, header.bytes);
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
    Ok((meta, data, received))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fast_sync_sends_only_the_chunks_that_differ() {
        let mut data = vec![7u8; 4 * CHUNK];
        let old = data.clone();
        data[2 * CHUNK + 5] = 9;
        let meta = DiskInfo {
            name: "volume-snap-a.img".into(),
            ..Default::default()
        };
        for (fast, want) in [(false, 4 * CHUNK as u64), (true, CHUNK as u64)] {
            // (A hole in the middle travels in neither mode.)
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let receive = tokio::spawn(receive_disk(listener, Some(old.clone()), |_, _| {}));
            let sent = send_disk("127.0.0.1", port, &meta, &data, 0, fast)
                .await
                .unwrap();
            let (_, got, received) = receive.await.unwrap().unwrap();
            assert_eq!((sent, received), (want, want), "fast={fast}");
            assert_eq!(got, data);
        }
    }
}
