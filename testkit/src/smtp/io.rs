//! Transport plumbing shared by the SMTP server and client: bounded line reading (the
//! plain-or-TLS stream is `mailroute_tls::MaybeTls`, the one the relay uses).

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _};

pub(crate) use mailroute_tls::MaybeTls;

/// Error kind/message used when a line exceeds its limit.
pub(crate) fn line_too_long() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "line too long")
}

/// Reads one line including its terminating `\n`, never buffering more than
/// `limit` bytes. Returns `Ok(None)` at end of stream (a trailing partial line
/// is discarded) and an `InvalidData` error if the line is longer than `limit`.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, limit: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(None);
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > limit {
            return Err(line_too_long());
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            return Ok(Some(line));
        }
    }
}

/// Strips a trailing `\r\n` or `\n`.
pub(crate) fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}
