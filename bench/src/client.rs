//! One SMTP client session of the load generator: greeting, EHLO, then any number of
//! transactions on the same connection, pipelined (RFC 2920) when the server offers it. Measures
//! the accept latency of each message: from the moment the end of DATA is written to the final
//! reply. Owns nothing but its socket; scheduling and statistics live in `loadgen`.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::reply::{ReplyError, ehlo_line_has, parse_reply_line};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("server closed the connection")]
    Closed,
    #[error("server refused the session with {0}")]
    Refused(u16),
}

/// What happened to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Final 2xx; `latency` runs from the end of DATA to the reply.
    Accepted { latency: Duration, at: Instant },
    /// Some reply of the transaction was not positive; `code` is the first such reply.
    Rejected { code: u16 },
}

/// An open SMTP session.
pub struct Session {
    stream: BufReader<TcpStream>,
    line: Vec<u8>,
    pipelining: bool,
}

impl Session {
    /// Connects, reads the greeting and says EHLO. Uses pipelining only when `allow_pipelining`
    /// and the server announces it.
    pub async fn connect(addr: SocketAddr, helo: &str, allow_pipelining: bool) -> Result<Self, ClientError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut s = Self {
            stream: BufReader::with_capacity(16 * 1024, tcp),
            line: Vec::with_capacity(512),
            pipelining: false,
        };
        let greeting = s.read_reply(|_| {}).await?;
        if greeting != 220 {
            return Err(ClientError::Refused(greeting));
        }
        s.stream
            .get_mut()
            .write_all(format!("EHLO {helo}\r\n").as_bytes())
            .await?;
        let mut pipelining = false;
        let code = s
            .read_reply(|line| pipelining |= ehlo_line_has(line, "PIPELINING"))
            .await?;
        if code != 250 {
            return Err(ClientError::Refused(code));
        }
        s.pipelining = allow_pipelining && pipelining;
        Ok(s)
    }

    /// Whether transactions on this session are pipelined.
    pub fn pipelining(&self) -> bool {
        self.pipelining
    }

    /// Sends one message. `envelope` is the MAIL/RCPT…/DATA group from
    /// [`crate::message::envelope_commands`] for `rcpts` recipients; `data` is the message with its
    /// terminator from [`crate::message::MessageTemplate::render_data`].
    pub async fn send(&mut self, envelope: &[u8], rcpts: usize, data: &[u8]) -> Result<Outcome, ClientError> {
        // The first negative reply of MAIL, or of DATA when no recipient was accepted.
        let mut first_failure = None;
        let data_code;
        if self.pipelining {
            self.stream.get_mut().write_all(envelope).await?;
            let mail = self.read_reply(|_| {}).await?;
            if !is_positive(mail) {
                first_failure = Some(mail);
            }
            let mut accepted_rcpts = 0;
            for _ in 0..rcpts {
                let rcpt = self.read_reply(|_| {}).await?;
                accepted_rcpts += usize::from(is_positive(rcpt));
            }
            data_code = self.read_reply(|_| {}).await?;
            if accepted_rcpts == 0 && first_failure.is_none() {
                first_failure = Some(data_code);
            }
        } else {
            let mut lines = envelope.split_inclusive(|&b| b == b'\n');
            let mail_cmd = lines.next().unwrap_or_default();
            self.stream.get_mut().write_all(mail_cmd).await?;
            let mail = self.read_reply(|_| {}).await?;
            if !is_positive(mail) {
                return Ok(Outcome::Rejected { code: mail });
            }
            let mut accepted_rcpts = 0;
            let mut last_rcpt = 0;
            for cmd in lines.by_ref().take(rcpts) {
                self.stream.get_mut().write_all(cmd).await?;
                last_rcpt = self.read_reply(|_| {}).await?;
                accepted_rcpts += usize::from(is_positive(last_rcpt));
            }
            if accepted_rcpts == 0 {
                self.reset().await?;
                return Ok(Outcome::Rejected { code: last_rcpt });
            }
            self.stream
                .get_mut()
                .write_all(lines.next().unwrap_or(b"DATA\r\n"))
                .await?;
            data_code = self.read_reply(|_| {}).await?;
        }
        if data_code != 354 {
            self.reset().await?;
            return Ok(Outcome::Rejected {
                code: first_failure.unwrap_or(data_code),
            });
        }
        self.stream.get_mut().write_all(data).await?;
        let sent = Instant::now();
        let done = self.read_reply(|_| {}).await?;
        let at = Instant::now();
        match first_failure {
            None if is_positive(done) => Ok(Outcome::Accepted { latency: at - sent, at }),
            None => Ok(Outcome::Rejected { code: done }),
            Some(code) => Ok(Outcome::Rejected { code }),
        }
    }

    /// Says QUIT and waits for the reply (errors ignored: the session is over either way).
    pub async fn quit(mut self) {
        if self.stream.get_mut().write_all(b"QUIT\r\n").await.is_ok() {
            let _ = self.read_reply(|_| {}).await;
        }
    }

    async fn reset(&mut self) -> Result<(), ClientError> {
        self.stream.get_mut().write_all(b"RSET\r\n").await?;
        self.read_reply(|_| {}).await?;
        Ok(())
    }

    /// Reads one complete reply, handing every line to `on_line`; returns its code.
    async fn read_reply(&mut self, mut on_line: impl FnMut(&[u8])) -> Result<u16, ClientError> {
        loop {
            self.line.clear();
            let n = self.stream.read_until(b'\n', &mut self.line).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            let parsed = parse_reply_line(&self.line)?;
            on_line(&self.line);
            if parsed.last {
                return Ok(parsed.code);
            }
        }
    }
}

fn is_positive(code: u16) -> bool {
    (200..300).contains(&code)
}
