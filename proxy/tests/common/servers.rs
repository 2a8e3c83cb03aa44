//! Plain TCP servers for tests of what lhnet dials: they count the connections they accept.
// Threads with std sockets and sleeps.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A TCP server on 127.0.0.1 that counts the connections it accepts and answers each with
/// `answer` (after reading the request head), or holds it silent when `answer` is `None`.
/// Stops when dropped, or after 60 s.
pub struct Server {
    pub port: u16,
    accepts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

pub type Answer = Arc<dyn Fn(&mut TcpStream) + Send + Sync>;

impl Server {
    pub fn start(answer: Option<Answer>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (accepts.clone(), stop.clone());
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(60);
            let mut held = Vec::new();
            while Instant::now() < until && !stopped.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                match &answer {
                    Some(answer) => {
                        let answer = answer.clone();
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                            read_head(&mut conn);
                            answer(&mut conn);
                        });
                    }
                    None => held.push(conn),
                }
            }
        });
        Server {
            port,
            accepts,
            stop,
        }
    }

    /// Counts and says nothing.
    pub fn counting() -> Server {
        Server::start(None)
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn read_head(conn: &mut TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
}
