//! A minimal blocking HTTP/1.1 GET for the harness (sink `/stats`, relay `/readyz` and
//! `/metrics`). Response parsing is pure; the request is one short-lived connection.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("response has no header/body separator")]
    NoSeparator,
    #[error("bad status line {0:?}")]
    BadStatus(String),
    #[error("bad chunked encoding")]
    BadChunk,
}

/// Status code and body of a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Parses a complete response (read until the server closed the connection).
pub fn parse_response(raw: &[u8]) -> Result<Response, HttpError> {
    let sep = memchr::memmem::find(raw, b"\r\n\r\n").ok_or(HttpError::NoSeparator)?;
    let head = String::from_utf8_lossy(&raw[..sep]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::BadStatus(status_line.to_string()))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let v = v.trim();
        if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        }
    }
    let mut body = &raw[sep + 4..];
    let decoded;
    if chunked {
        decoded = dechunk(body)?;
        body = &decoded;
    } else if let Some(n) = length {
        body = &body[..n.min(body.len())];
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    loop {
        let nl = memchr::memmem::find(raw, b"\r\n").ok_or(HttpError::BadChunk)?;
        let size_text = String::from_utf8_lossy(&raw[..nl]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| HttpError::BadChunk)?;
        raw = &raw[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = raw.get(..size).ok_or(HttpError::BadChunk)?;
        out.extend_from_slice(chunk);
        raw = raw.get(size + 2..).ok_or(HttpError::BadChunk)?;
    }
}

/// `GET path` on `addr` with a 10-second timeout.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: "ok".into()
            }
        );
        let r = parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\nredis down").unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "redis down"));
    }

    #[test]
    fn decodes_chunked_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nmail\r\n6;x=y\r\nroute!\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap().body, "mailroute!");
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            Err(HttpError::BadChunk)
        );
    }

    #[test]
    fn rejects_truncated_responses() {
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n"), Err(HttpError::NoSeparator));
        assert!(matches!(
            parse_response(b"garbage\r\n\r\n"),
            Err(HttpError::BadStatus(_))
        ));
    }
}
