//! The sink's sockets: an SMTP listener running [`crate::sink::SinkSession`] per connection and a
//! tiny HTTP endpoint (`GET /stats`) exposing the counters as JSON, so the harness can measure
//! delivered messages per second end to end. Discards every message.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::sink::{GREETING, SinkSession};

/// Read buffer per session; DATA is consumed in chunks of up to this size.
const READ_BUF: usize = 64 * 1024;

/// Counters shared by every session.
#[derive(Debug, Default)]
pub struct SinkCounters {
    messages: AtomicU64,
    recipients: AtomicU64,
    bytes: AtomicU64,
    sessions_total: AtomicU64,
    sessions_active: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

/// A snapshot of [`SinkCounters`], the body of `GET /stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkStats {
    pub messages: u64,
    pub recipients: u64,
    pub bytes: u64,
    pub sessions_total: u64,
    pub sessions_active: u64,
    /// Wall-clock time of the first and the latest accepted message, Unix nanoseconds (0: none yet).
    pub first_ns: u64,
    pub last_ns: u64,
}

impl SinkCounters {
    pub fn snapshot(&self) -> SinkStats {
        SinkStats {
            messages: self.messages.load(Ordering::Relaxed),
            recipients: self.recipients.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            sessions_total: self.sessions_total.load(Ordering::Relaxed),
            sessions_active: self.sessions_active.load(Ordering::Relaxed),
            first_ns: self.first_ns.load(Ordering::Relaxed),
            last_ns: self.last_ns.load(Ordering::Relaxed),
        }
    }

    fn add(&self, messages: u64, recipients: u64, bytes: u64) {
        let now = unix_ns();
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.recipients.fetch_add(recipients, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let _ = self
            .first_ns
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.last_ns.fetch_max(now, Ordering::Relaxed);
    }
}

/// Wall-clock now in Unix nanoseconds (0 if the clock is before 1970).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Accepts SMTP sessions on `listener` forever.
pub async fn serve_smtp(listener: TcpListener, counters: Arc<SinkCounters>) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let counters = counters.clone();
        tokio::spawn(async move {
            counters.sessions_total.fetch_add(1, Ordering::Relaxed);
            counters.sessions_active.fetch_add(1, Ordering::Relaxed);
            // A peer that vanishes mid-session is normal under load; nothing to report.
            let _ = session(stream, &counters).await;
            counters.sessions_active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn session(mut stream: TcpStream, counters: &SinkCounters) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.write_all(GREETING).await?;
    let mut proto = SinkSession::default();
    let mut buf = vec![0u8; READ_BUF];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out = Vec::with_capacity(1024);
    loop {
        if end == buf.len() {
            // Compact; the protocol never leaves more than a command line or 4 bytes unconsumed.
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
        let fed = proto.feed(&buf[start..end], &mut out);
        start += fed.consumed;
        if start == end {
            start = 0;
            end = 0;
        }
        if fed.messages > 0 {
            counters.add(fed.messages, fed.recipients, fed.bytes);
        }
        // Replies to everything read so far go out together: this is what makes pipelining pay.
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if fed.close {
            return Ok(());
        }
    }
}

/// Serves `GET /stats` (JSON [`SinkStats`]) and `GET /healthz` forever.
pub async fn serve_http(listener: TcpListener, counters: Arc<SinkCounters>) -> io::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(512);
            let mut chunk = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&chunk[..n]),
                }
            }
            let (status, body) = if req.starts_with(b"GET /stats ") {
                (
                    "200 OK",
                    serde_json::to_string(&counters.snapshot()).unwrap_or_default(),
                )
            } else if req.starts_with(b"GET /healthz ") {
                ("200 OK", "ok".to_string())
            } else {
                ("404 Not Found", "not found".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}
