//! SMTP plumbing shared by the inbound listeners: the buffered connection (plain or TLS),
//! server TLS configuration from PEM files, and the listener kinds. This module must not make
//! protocol decisions (that is the session's).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which port a session arrived on; decides what is offered and required.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// Port 25 style: relaying from allowed CIDRs or after AUTH (AUTH only over TLS).
    Smtp,
    /// Port 587: STARTTLS first, then AUTH, which is required.
    Submission,
    /// Port 465: implicit TLS, AUTH required.
    Smtps,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Smtps => "smtps",
        }
    }
    pub fn requires_auth(self) -> bool {
        !matches!(self, ListenerKind::Smtp)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {0}: {1}")]
    Read(String, io::Error),
    #[error("{0}: no certificate found")]
    NoCert(String),
    #[error("{0}: no private key found")]
    NoKey(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS 1.2+ server configuration from PEM files.
pub fn server_tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|e| TlsError::Read(cert.display().to_string(), e))?;
    let key_pem = std::fs::read(key).map_err(|e| TlsError::Read(key.display().to_string(), e))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .filter_map(|c| c.ok())
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert.display().to_string()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TlsError::Read(key.display().to_string(), e))?
        .ok_or_else(|| TlsError::NoKey(key.display().to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

pub use mailroute_tls::MaybeTls;

/// An inbound connection.
pub type Stream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// The most one read takes from the socket: the input buffer grows by at most this much per read.
const READ_CHUNK: usize = 16384;

/// What reading a line produced.
pub enum Line {
    /// A whole line, its line ending included.
    Complete(Vec<u8>),
    TooLong,
    Eof,
}

/// A connection with an input buffer (pipelined commands) and an output buffer flushed only
/// before the session would wait for input, so pipelined replies go out in one write.
pub struct Conn {
    pub stream: Stream,
    inbuf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
}

impl Conn {
    pub fn new(stream: Stream) -> Self {
        Conn {
            stream,
            inbuf: Vec::with_capacity(8192),
            pos: 0,
            out: Vec::with_capacity(1024),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, MaybeTls::Tls(_))
    }

    pub fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        self.stream.flush().await
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.inbuf[self.pos..]
    }

    pub fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos >= self.inbuf.len() {
            self.inbuf.clear();
            self.pos = 0;
        }
    }

    /// Drops pipelined input (after STARTTLS, so nothing sent in clear is executed under TLS).
    pub fn discard_buffered(&mut self) {
        self.inbuf.clear();
        self.pos = 0;
    }

    /// Reads more input, flushing pending replies first. Returns 0 at end of stream.
    pub async fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        self.flush().await?;
        if self.pos > 0 {
            self.inbuf.drain(..self.pos);
            self.pos = 0;
        }
        // Read straight into the buffer's spare room: no stack buffer to zero and copy out of,
        // and none carried (and moved) in every future that awaits a read.
        self.inbuf.reserve(READ_CHUNK);
        let mut room = (&mut self.inbuf).limit(READ_CHUNK);
        let n = tokio::time::timeout(timeout, self.stream.read_buf(&mut room))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timeout"))??;
        Ok(n)
    }

    /// One line including its line ending, at most `limit` bytes.
    pub async fn read_line(&mut self, limit: usize, timeout: Duration) -> io::Result<Line> {
        loop {
            let buf = self.buffered();
            if let Some(i) = memchr::memchr(b'\n', buf) {
                if i + 1 > limit {
                    self.consume(i + 1);
                    return Ok(Line::TooLong);
                }
                let line = buf[..=i].to_vec();
                self.consume(i + 1);
                return Ok(Line::Complete(line));
            }
            if buf.len() > limit {
                // Skip the rest of the overlong line.
                let n = buf.len();
                self.consume(n);
                loop {
                    if self.fill(timeout).await? == 0 {
                        return Ok(Line::Eof);
                    }
                    if let Some(i) = memchr::memchr(b'\n', self.buffered()) {
                        self.consume(i + 1);
                        return Ok(Line::TooLong);
                    }
                    let n = self.buffered().len();
                    self.consume(n);
                }
            }
            if self.fill(timeout).await? == 0 {
                return Ok(Line::Eof);
            }
        }
    }

    pub fn into_stream(self) -> Stream {
        self.stream
    }
}
