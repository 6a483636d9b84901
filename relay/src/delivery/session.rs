//! One outbound SMTP session: TCP connect, greeting, EHLO, STARTTLS or implicit TLS, AUTH, and
//! MAIL/RCPT/DATA transactions, driven through mail-send's `SmtpClient`.
//!
//! Where mail-send is wrapped or bypassed, and why:
//! * The stream is a [`Recorder`] around our own plain/TLS [`Stream`]: mail-send's reply parser
//!   (smtp-proto) strips the enhanced status code from the text and stores its parts in `u8`,
//!   so `4.7.500` comes back as `4.7.255`; the recorder keeps the raw reply bytes so the exact
//!   text reaches the delivery log and the bounce classifier.
//! * TLS (implicit and STARTTLS) is set up here with tokio-rustls, not with mail-send's
//!   `start_tls`/`into_tls`, which only exist for a bare `TcpStream` and would give pooled
//!   sessions two different types; the TLS config comes from `tls` (custom CA roots).
//! * STARTTLS is optional for MX delivery; mail-send's builder only knows "required".
//! * With PIPELINING offered, MAIL, RCPT and DATA go in one write (mail-send's `cmds`) and the
//!   content follows once DATA is open; mail-send's own `data` would wait for each reply.
//! * Envelope addresses are written in RFC 5321 form (`smtp::address::wire_form`: a quoted local
//!   part stays quoted, so it cannot add parameters), and the content is dot-stuffed by
//!   `smtp::data::write_dot_stuffed`: mail-send's `write_message` misses a dot on the first line.
//!
//! A session carries the connection slot ([`Lease`]) it was opened under and frees it only
//! after the connection is closed ([`Session::quit`], [`Session::discard`]).
//!
//! This module must not pool, retry or classify; it reports what happened at which [`Stage`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mail_send::SmtpClient;
use mail_send::smtp::AssertReply;
use mail_send::smtp::message::Parameters;
use mailroute_api::route::AuthMechanism;
use rustls::pki_types::ServerName;
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, AUTH_XOAUTH2, EXT_8BIT_MIME, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS,
    EhloResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::gate::Lease;
use super::{SmtpReply, Stage};
use crate::bounce::{BounceClass, Failure};
use crate::smtp::address::{AddressError, wire_form};
use crate::smtp::data::write_dot_stuffed;

/// How TLS is used on a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsUse {
    /// Never (route `tls: none`).
    Plain,
    /// STARTTLS must succeed.
    RequireStartTls,
    /// STARTTLS when offered; a failed handshake is reported so the caller can retry in plain.
    Opportunistic,
    /// TLS from the first byte.
    Implicit,
}

/// Timeouts of one session, per step (the route's `timeouts`, Postfix's by default).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub connect: Duration,
    /// Greeting, EHLO, STARTTLS and the TLS handshake, AUTH.
    pub greeting: Duration,
    /// MAIL FROM, RSET, QUIT.
    pub mail: Duration,
    pub rcpt: Duration,
    pub data_init: Duration,
    pub data_transfer: Duration,
    pub data_done: Duration,
}

impl From<&mailroute_api::config::SessionTimeouts> for Timeouts {
    fn from(t: &mailroute_api::config::SessionTimeouts) -> Self {
        Timeouts {
            connect: Duration::from_millis(t.connect_ms),
            greeting: Duration::from_millis(t.greeting_ms),
            mail: Duration::from_millis(t.mail_ms),
            rcpt: Duration::from_millis(t.rcpt_ms),
            data_init: Duration::from_millis(t.data_init_ms),
            data_transfer: Duration::from_millis(t.data_transfer_ms),
            data_done: Duration::from_millis(t.data_done_ms),
        }
    }
}

/// Everything needed to open a session.
pub(crate) struct OpenSpec<'a> {
    pub host: &'a str,
    pub addr: SocketAddr,
    pub tls: TlsUse,
    pub tls_config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    pub helo: &'a str,
    pub auth: Option<(&'a mailroute_api::config::Credentials, Option<AuthMechanism>)>,
    pub timeouts: Timeouts,
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepErrorKind {
    /// The server answered with a failure (or unexpected) reply.
    Reply(SmtpReply),
    /// No usable reply: connection, timeout, TLS.
    Failure(Failure, String),
    /// The server broke the protocol or lacks something we need.
    Protocol(BounceClass, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepError {
    pub stage: Stage,
    pub kind: StepErrorKind,
    /// Whether TLS was active when it happened.
    pub tls: bool,
}

impl StepError {
    /// The connection can still carry another transaction (after RSET).
    pub fn session_usable(&self) -> bool {
        matches!(&self.kind, StepErrorKind::Reply(r) if r.code != 421)
    }

    /// A TLS handshake that failed for reasons other than certificate verification is worth one
    /// plain-text retry under opportunistic TLS.
    pub fn is_tls_handshake(&self) -> bool {
        self.stage == Stage::StartTls && matches!(self.kind, StepErrorKind::Failure(Failure::Tls, _))
    }
}

/// The transport under mail-send: plain TCP or TLS over TCP.
pub(crate) type Stream = crate::smtp::MaybeTls<TlsStream<TcpStream>>;

/// Upper bound of recorded reply bytes (smtp-proto caps a reply at 4 KiB).
const RECORD_LIMIT: usize = 16 * 1024;

/// Writes held until this many bytes are waiting (or a flush).
const WRITE_BUFFER: usize = 64 * 1024;

/// Keeps the bytes read since the last [`Recorder::clear`], and buffers writes until a flush:
/// mail-send writes a command, or each dot-stuffed piece of a message, with its own `write_all`
/// and flushes after each step, so one step becomes one system call instead of many.
pub(crate) struct Recorder<S> {
    inner: S,
    log: Vec<u8>,
    /// The peer closed the stream (a read returned no bytes).
    eof: bool,
    out: Vec<u8>,
}

impl<S> Recorder<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            log: Vec::new(),
            eof: false,
            out: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.log.clear();
    }

    /// The last complete reply read since the last clear.
    fn last_reply(&self) -> Option<SmtpReply> {
        parse_last_reply(&self.log)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            let new = &buf.filled()[before..];
            if new.is_empty() && buf.remaining() > 0 {
                this.eof = true;
            }
            if this.log.len() + new.len() > RECORD_LIMIT {
                let keep = RECORD_LIMIT.saturating_sub(new.len());
                let cut = this.log.len().saturating_sub(keep);
                this.log.drain(..cut);
            }
            this.log.extend_from_slice(new);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> Recorder<S> {
    /// Hands every buffered byte to the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.len() >= WRITE_BUFFER {
            std::task::ready!(this.poll_drain(cx))?;
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Parses the last complete reply in `raw` (`NNN-...` lines ending with an `NNN ...` line).
/// The enhanced code repeated at the start of continuation lines is dropped; lines are joined
/// with a space.
pub(crate) fn parse_last_reply(raw: &[u8]) -> Option<SmtpReply> {
    parse_replies(raw).pop()
}

/// Every complete reply in `raw`, in order (the answers to pipelined commands).
pub(crate) fn parse_replies(raw: &[u8]) -> Vec<SmtpReply> {
    let text = String::from_utf8_lossy(raw);
    let lines: Vec<&str> = text.split('\n').map(|l| l.trim_end_matches('\r')).collect();
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        let b = line.as_bytes();
        if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
            start = None;
            continue;
        }
        match b.get(3) {
            Some(b'-') => {
                start.get_or_insert(i);
            }
            None | Some(b' ') => {
                out.extend(reply_of(&lines[start.unwrap_or(i)..=i]));
                start = None;
            }
            _ => start = None,
        }
    }
    out
}

/// One reply from its lines (all starting with the same code).
fn reply_of(lines: &[&str]) -> Option<SmtpReply> {
    let code: u16 = lines.first()?.get(..3)?.parse().ok()?;
    let mut enhanced_prefix: Option<String> = None;
    let mut parts: Vec<String> = Vec::new();
    for line in lines {
        let body = line.get(4..).unwrap_or("").trim();
        let body = match &enhanced_prefix {
            None => {
                if let Some(e) = crate::bounce::parse_enhanced(body) {
                    enhanced_prefix = Some(format!("{}.{}.{}", e.0, e.1, e.2));
                }
                body.to_owned()
            }
            Some(prefix) => body.strip_prefix(prefix.as_str()).unwrap_or(body).trim().to_owned(),
        };
        if !body.is_empty() {
            parts.push(body);
        }
    }
    Some(SmtpReply::new(code, parts.join(" ")))
}

type Client = SmtpClient<Recorder<Stream>>;

/// An open, greeted (and, if configured, encrypted and authenticated) session.
pub(crate) struct Session {
    client: Client,
    caps: EhloResponse<String>,
    pub tls: bool,
    pub host: String,
    pub addr: SocketAddr,
    pub messages: u32,
    pub idle_since: Instant,
    /// The cross-relay connection slot held while this connection is open, if a limit applies.
    pub lease: Option<Lease>,
    timeouts: Timeouts,
    /// No transaction is open: the last one ended with a reply to its content (or RSET).
    clean: bool,
}

impl Session {
    /// Connects and prepares a session for transactions.
    pub async fn open(spec: OpenSpec<'_>) -> Result<Session, StepError> {
        let t = spec.timeouts;
        let tcp = match tokio::time::timeout(t.connect, TcpStream::connect(spec.addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(failure(
                    Stage::Connect,
                    Failure::ConnectionRefused,
                    e.to_string(),
                    false,
                ));
            }
            Err(_) => {
                return Err(failure(
                    Stage::Connect,
                    Failure::Timeout,
                    format!("no connection within {:?}", t.connect),
                    false,
                ));
            }
        };
        let _ = tcp.set_nodelay(true);

        let mut tls = false;
        let stream = if spec.tls == TlsUse::Implicit {
            tls = true;
            Stream::Tls(Box::new(handshake(&spec, tcp, Stage::Connect).await?))
        } else {
            Stream::Plain(tcp)
        };
        let mut client = SmtpClient {
            stream: Recorder::new(stream),
            timeout: t.greeting,
        };

        // Greeting.
        match tokio::time::timeout(t.greeting, client.read()).await {
            Err(_) => return Err(failure(Stage::Greeting, Failure::Timeout, "no greeting".into(), tls)),
            Ok(Err(e)) => return Err(map_error(&client, Stage::Greeting, e, tls)),
            Ok(Ok(_)) => {
                if let Some(reply) = client.stream.last_reply().filter(|r| !r.is_positive()) {
                    return Err(StepError {
                        stage: Stage::Greeting,
                        kind: StepErrorKind::Reply(reply),
                        tls,
                    });
                }
            }
        }

        let mut caps = ehlo(&mut client, spec.helo, tls).await?;

        let want_starttls = match spec.tls {
            TlsUse::RequireStartTls => {
                if !caps.has_capability(EXT_START_TLS) {
                    return Err(failure(
                        Stage::StartTls,
                        Failure::Tls,
                        "the server does not offer STARTTLS".into(),
                        false,
                    ));
                }
                true
            }
            TlsUse::Opportunistic => caps.has_capability(EXT_START_TLS),
            TlsUse::Plain | TlsUse::Implicit => false,
        };
        if want_starttls {
            client.stream.clear();
            match client.cmd(b"STARTTLS\r\n").await {
                Ok(_) => {
                    let reply = client.stream.last_reply();
                    match reply {
                        Some(r) if r.is_positive() => {}
                        Some(r) if spec.tls == TlsUse::Opportunistic && r.code != 421 => {
                            // Refused STARTTLS: carry on in plain text on this connection.
                            tracing::debug!(host = spec.host, reply = %r, "STARTTLS refused; continuing without TLS");
                            return Self::finish_open(client, caps, false, &spec).await;
                        }
                        Some(r) => {
                            return Err(StepError {
                                stage: Stage::StartTls,
                                kind: StepErrorKind::Reply(r),
                                tls: false,
                            });
                        }
                        None => {
                            return Err(protocol(
                                Stage::StartTls,
                                BounceClass::Other,
                                "no reply to STARTTLS",
                                false,
                            ));
                        }
                    }
                }
                Err(e) => return Err(map_error(&client, Stage::StartTls, e, false)),
            }
            let Stream::Plain(tcp) = client.stream.inner else {
                return Err(protocol(
                    Stage::StartTls,
                    BounceClass::Other,
                    "STARTTLS on a TLS stream",
                    true,
                ));
            };
            let tls_stream = handshake(&spec, tcp, Stage::StartTls).await?;
            client = SmtpClient {
                stream: Recorder::new(Stream::Tls(Box::new(tls_stream))),
                timeout: t.greeting,
            };
            tls = true;
            caps = ehlo(&mut client, spec.helo, tls).await?;
        }
        Self::finish_open(client, caps, tls, &spec).await
    }

    async fn finish_open(
        mut client: Client,
        caps: EhloResponse<String>,
        tls: bool,
        spec: &OpenSpec<'_>,
    ) -> Result<Session, StepError> {
        if let Some((creds, mechanism)) = spec.auth {
            authenticate(&mut client, &caps, creds, mechanism, tls).await?;
        }
        client.timeout = spec.timeouts.mail;
        Ok(Session {
            client,
            caps,
            tls,
            host: spec.host.to_owned(),
            addr: spec.addr,
            messages: 0,
            idle_since: Instant::now(),
            lease: None,
            timeouts: spec.timeouts,
            clean: true,
        })
    }

    /// One transaction: MAIL, RCPT, DATA. Returns the final reply to the message content.
    pub async fn send(&mut self, mail_from: &str, rcpt_to: &str, message: &[u8]) -> Result<SmtpReply, StepError> {
        let r = self.transaction(mail_from, rcpt_to, message).await;
        self.clean = r.is_ok();
        r
    }

    /// Whether the next transaction may start without RSET: the last one was delivered and the
    /// server pipelines. A connection the server dropped meanwhile then fails at MAIL with no
    /// reply, which the pool retries once on a new connection; without PIPELINING an idle
    /// server's `421` would arrive as the reply to MAIL, so RSET goes first there.
    pub fn ready_without_reset(&self) -> bool {
        self.clean && self.caps.has_capability(EXT_PIPELINING)
    }

    async fn transaction(&mut self, mail_from: &str, rcpt_to: &str, message: &[u8]) -> Result<SmtpReply, StepError> {
        self.messages += 1;
        let tls = self.tls;
        let (mail_from, rcpt_to) = match (wire_form(mail_from), wire_form(rcpt_to)) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) => return Err(unwritable(Stage::MailFrom, "5.1.7", &e, tls)),
            (_, Err(e)) => return Err(unwritable(Stage::RcptTo, "5.1.3", &e, tls)),
        };
        let (mail_from, rcpt_to) = (mail_from.as_ref(), rcpt_to.as_ref());
        let mut params = Parameters::new();
        if self.caps.has_capability(EXT_SIZE) {
            params.add(format!("SIZE={}", message.len()));
        }
        if self.caps.has_capability(EXT_8BIT_MIME) && !message.is_ascii() {
            params.add(("BODY", "8BITMIME"));
        }
        if self.caps.has_capability(EXT_SMTP_UTF8) && !(mail_from.is_ascii() && rcpt_to.is_ascii()) {
            params.add("SMTPUTF8");
        }

        if self.caps.has_capability(EXT_PIPELINING) {
            return self.send_pipelined(mail_from, rcpt_to, &params, message).await;
        }
        self.client.stream.clear();
        self.client.timeout = self.timeouts.mail;
        if let Err(e) = self.client.mail_from(mail_from, &params).await {
            return Err(map_error(&self.client, Stage::MailFrom, e, tls));
        }
        self.client.stream.clear();
        self.client.timeout = self.timeouts.rcpt;
        if let Err(e) = self.client.rcpt_to(rcpt_to, &Parameters::new()).await {
            return Err(map_error(&self.client, Stage::RcptTo, e, tls));
        }

        self.client.stream.clear();
        self.client.timeout = self.timeouts.data_init;
        let opened = self.client.cmd(b"DATA\r\n").await.and_then(|r| r.assert_code(354));
        self.client.timeout = self.timeouts.mail;
        let result = match opened {
            Ok(()) => self
                .send_content(message)
                .await
                .and_then(|r| r.into_positive_completion()),
            Err(e) => Err(e),
        };
        match result {
            Ok(response) => Ok(raw_or(self.client.stream.last_reply(), &response)),
            Err(e) => {
                // "354" is the reply to DATA itself; anything after it is about the content.
                let stage = if self.saw_354() { Stage::Message } else { Stage::Data };
                Err(map_error(&self.client, stage, e, tls))
            }
        }
    }

    /// RFC 2920: MAIL, RCPT and DATA in one write, their replies read together, then the
    /// content: two round trips instead of four.
    async fn send_pipelined(
        &mut self,
        mail_from: &str,
        rcpt_to: &str,
        params: &Parameters<'_>,
        message: &[u8],
    ) -> Result<SmtpReply, StepError> {
        const STAGES: [Stage; 3] = [Stage::MailFrom, Stage::RcptTo, Stage::Data];
        let tls = self.tls;
        let envelope = [
            format!("MAIL FROM:<{mail_from}>{params}\r\n"),
            format!("RCPT TO:<{rcpt_to}>\r\n"),
            "DATA\r\n".to_owned(),
        ];
        self.client.stream.clear();
        // The replies come together: the longest of their timeouts bounds the wait.
        let t = self.timeouts;
        self.client.timeout = t.mail.max(t.rcpt).max(t.data_init);
        let replies = self.client.cmds(&envelope).await;
        self.client.timeout = t.mail;
        let replies = match replies {
            Ok(r) => r,
            Err(e) => {
                // The first command without a complete reply is where it stopped.
                let answered = parse_replies(&self.client.stream.log).len();
                let stage = STAGES.get(answered).copied().unwrap_or(Stage::Data);
                return Err(map_error(&self.client, stage, e, tls));
            }
        };
        let raw = parse_replies(&self.client.stream.log);
        let reply = |i: usize| raw_or(raw.get(i).cloned(), &replies[i]);
        let data_open = replies.get(2).is_some_and(|r| r.code() == 354);
        let refused = (0..2).find(|&i| !replies.get(i).is_some_and(|r| r.is_positive_completion()));
        if let Some(i) = refused {
            if data_open {
                // A server that opened DATA anyway gets an empty message ended at once.
                self.client.stream.clear();
                if let Err(e) = self.client.cmd(b".\r\n").await {
                    return Err(map_error(&self.client, Stage::Message, e, tls));
                }
            }
            return Err(StepError {
                stage: STAGES[i],
                kind: StepErrorKind::Reply(reply(i)),
                tls,
            });
        }
        if !data_open {
            return Err(StepError {
                stage: Stage::Data,
                kind: StepErrorKind::Reply(reply(2)),
                tls,
            });
        }

        self.client.stream.clear();
        match self.send_content(message).await {
            Err(e) => Err(map_error(&self.client, Stage::Message, e, tls)),
            Ok(r) => {
                let reply = raw_or(self.client.stream.last_reply(), &r);
                if r.is_positive_completion() {
                    Ok(reply)
                } else {
                    Err(StepError {
                        stage: Stage::Message,
                        kind: StepErrorKind::Reply(reply),
                        tls,
                    })
                }
            }
        }
    }

    /// Writes the content once DATA is open, dot-stuffed (see the module doc), within the
    /// transfer timeout, and reads the reply to its final dot within the end-of-data timeout.
    async fn send_content(&mut self, message: &[u8]) -> Result<smtp_proto::Response<String>, mail_send::Error> {
        let t = self.timeouts;
        let stream = &mut self.client.stream;
        tokio::time::timeout(t.data_transfer, async {
            write_dot_stuffed(&mut *stream, message).await?;
            tokio::io::AsyncWriteExt::flush(stream).await
        })
        .await
        .map_err(|_| mail_send::Error::Timeout)??;
        tokio::time::timeout(t.data_done, self.client.read())
            .await
            .map_err(|_| mail_send::Error::Timeout)?
    }

    fn saw_354(&self) -> bool {
        let log = String::from_utf8_lossy(&self.client.stream.log);
        log.lines().any(|l| l.starts_with("354"))
    }

    /// RSET before reusing the connection for another message; also proves it is alive.
    pub async fn reset(&mut self) -> Result<(), StepError> {
        self.client.stream.clear();
        self.client
            .rset()
            .await
            .map_err(|e| map_error(&self.client, Stage::Reset, e, self.tls))?;
        self.clean = true;
        Ok(())
    }

    /// Polite QUIT, bounded by the MAIL timeout; errors do not matter any more. The slot is
    /// freed after the connection is closed, so no other relay opens one while this one lasts.
    pub async fn quit(self) {
        let Session {
            client,
            lease,
            timeouts,
            ..
        } = self;
        let _ = tokio::time::timeout(timeouts.mail, client.quit()).await;
        if let Some(l) = lease {
            l.release().await;
        }
    }

    /// Closes without QUIT (the connection is broken or out of step) and frees the slot.
    pub async fn discard(self) {
        let Session { client, lease, .. } = self;
        drop(client);
        if let Some(l) = lease {
            l.release().await;
        }
    }
}

/// An address the relay cannot write safely is refused here, as a server would refuse it: the
/// inbound side refuses such addresses, so only older queue entries can have one.
fn unwritable(stage: Stage, enhanced: &str, e: &AddressError, tls: bool) -> StepError {
    StepError {
        stage,
        kind: StepErrorKind::Reply(SmtpReply::new(553, format!("{enhanced} relay: {e}, not sent"))),
        tls,
    }
}

async fn handshake(spec: &OpenSpec<'_>, tcp: TcpStream, stage: Stage) -> Result<TlsStream<TcpStream>, StepError> {
    let connector = TlsConnector::from(Arc::clone(&spec.tls_config));
    match tokio::time::timeout(spec.timeouts.greeting, connector.connect(spec.server_name.clone(), tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(failure(
            stage,
            Failure::Tls,
            format!("TLS handshake failed: {e}"),
            false,
        )),
        Err(_) => Err(failure(
            stage,
            Failure::Timeout,
            "TLS handshake timed out".into(),
            false,
        )),
    }
}

async fn ehlo(client: &mut Client, helo: &str, tls: bool) -> Result<EhloResponse<String>, StepError> {
    client.stream.clear();
    client
        .ehlo(helo)
        .await
        .map_err(|e| map_error(client, Stage::Ehlo, e, tls))
}

async fn authenticate(
    client: &mut Client,
    caps: &EhloResponse<String>,
    creds: &mailroute_api::config::Credentials,
    mechanism: Option<AuthMechanism>,
    tls: bool,
) -> Result<(), StepError> {
    let (credentials, mask) = match mechanism {
        Some(AuthMechanism::Xoauth2) => (
            mail_send::Credentials::XOauth2 {
                username: creds.username.clone(),
                secret: creds.password.clone(),
            },
            AUTH_XOAUTH2,
        ),
        other => (
            mail_send::Credentials::Plain {
                username: creds.username.clone(),
                secret: creds.password.clone(),
            },
            match other {
                Some(AuthMechanism::Login) => AUTH_LOGIN,
                Some(AuthMechanism::Plain) => AUTH_PLAIN,
                _ => AUTH_PLAIN | AUTH_LOGIN,
            },
        ),
    };
    // Offer mail-send only the configured mechanism, so it cannot pick another one.
    let mut offered = caps.clone();
    offered.auth_mechanisms &= mask;
    if offered.auth_mechanisms == 0 {
        return Err(protocol(
            Stage::Auth,
            BounceClass::AuthFailure,
            &format!("the server does not offer AUTH {}", mechanism_name(mechanism)),
            tls,
        ));
    }
    client.stream.clear();
    match client.authenticate(&credentials, &offered).await {
        Ok(_) => Ok(()),
        Err(e) => Err(map_error(client, Stage::Auth, e, tls)),
    }
}

fn mechanism_name(m: Option<AuthMechanism>) -> &'static str {
    match m {
        Some(AuthMechanism::Login) => "LOGIN",
        Some(AuthMechanism::Xoauth2) => "XOAUTH2",
        Some(AuthMechanism::Plain) => "PLAIN",
        None => "PLAIN or LOGIN",
    }
}

/// The reply as the recorder saw it, else mail-send's parse of it (which mangles enhanced codes,
/// see the module doc).
fn raw_or(recorded: Option<SmtpReply>, r: &smtp_proto::Response<String>) -> SmtpReply {
    recorded.unwrap_or_else(|| SmtpReply::new(r.code(), r.message().to_owned()))
}

fn failure(stage: Stage, f: Failure, detail: String, tls: bool) -> StepError {
    StepError {
        stage,
        kind: StepErrorKind::Failure(f, detail),
        tls,
    }
}

fn protocol(stage: Stage, class: BounceClass, detail: &str, tls: bool) -> StepError {
    StepError {
        stage,
        kind: StepErrorKind::Protocol(class, detail.to_owned()),
        tls,
    }
}

/// Turns a mail-send error into a [`StepError`], preferring the raw reply the recorder saw.
fn map_error(client: &Client, stage: Stage, e: mail_send::Error, tls: bool) -> StepError {
    use mail_send::Error as E;
    let recorded = client.stream.last_reply();
    let kind = match e {
        E::UnexpectedReply(r) | E::AuthenticationFailed(r) => StepErrorKind::Reply(raw_or(recorded, &r)),
        E::Io(io) => match io.kind() {
            io::ErrorKind::TimedOut => StepErrorKind::Failure(Failure::Timeout, io.to_string()),
            _ => StepErrorKind::Failure(Failure::ConnectionLost, io.to_string()),
        },
        E::Tls(t) => StepErrorKind::Failure(Failure::Tls, t.to_string()),
        E::Timeout => StepErrorKind::Failure(Failure::Timeout, format!("no reply during {}", stage.as_str())),
        // mail-send reports end-of-stream as an unparseable reply.
        E::UnparseableReply if client.stream.eof => {
            StepErrorKind::Failure(Failure::ConnectionLost, "connection closed by the server".into())
        }
        E::UnparseableReply => StepErrorKind::Protocol(
            BounceClass::Other,
            format!(
                "unparseable reply: {}",
                String::from_utf8_lossy(&client.stream.log)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        ),
        E::MissingStartTls => StepErrorKind::Failure(Failure::Tls, "the server does not offer STARTTLS".into()),
        E::Auth(_) | E::Base64(_) | E::UnsupportedAuthMechanism | E::MissingCredentials => {
            StepErrorKind::Protocol(BounceClass::AuthFailure, e.to_string())
        }
        other => StepErrorKind::Protocol(BounceClass::Other, other.to_string()),
    };
    StepError { stage, kind, tls }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_reply_of_a_pipelined_exchange_in_order() {
        let raw = b"250 2.1.0 Sender ok\r\n550-5.1.1 No such\r\n550-5.1.1 user here\r\n550 5.1.1 sorry\r\n554 5.5.1 No valid recipients\r\n";
        let got: Vec<(u16, String)> = parse_replies(raw).into_iter().map(|r| (r.code, r.text)).collect();
        assert_eq!(
            got,
            vec![
                (250, "2.1.0 Sender ok".to_string()),
                (550, "5.1.1 No such user here sorry".to_string()),
                (554, "5.5.1 No valid recipients".to_string()),
            ]
        );
        assert!(parse_replies(b"250-incomplete\r\n").is_empty());
    }

    #[test]
    fn parses_single_and_multi_line_replies() {
        let r = parse_last_reply(b"250 2.0.0 OK queued as 7\r\n").expect("reply");
        assert_eq!(
            (r.code, r.enhanced, r.text.as_str()),
            (250, Some((2, 0, 0)), "2.0.0 OK queued as 7")
        );

        let gmail = b"550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n\
550-5.1.1 double-checking the recipient's email address for typos or\r\n\
550 5.1.1  https://support.google.com/mail/?p=NoSuchUser d2-20020a05\r\n";
        let r = parse_last_reply(gmail).expect("reply");
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, Some((5, 1, 1)));
        assert_eq!(
            r.text,
            "5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or https://support.google.com/mail/?p=NoSuchUser d2-20020a05"
        );
    }

    #[test]
    fn keeps_three_digit_enhanced_details_and_takes_the_last_reply() {
        // smtp-proto would report 4.7.255 here.
        let r = parse_last_reply(b"451 4.7.500 Server busy. Please try again later\r\n").expect("reply");
        assert_eq!(r.enhanced, Some((4, 7, 500)));
        assert_eq!(r.to_string(), "451 4.7.500 Server busy. Please try again later");

        let login = b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n535 5.7.8 Username and password not accepted.\r\n";
        let r = parse_last_reply(login).expect("reply");
        assert_eq!((r.code, r.enhanced), (535, Some((5, 7, 8))));

        assert_eq!(parse_last_reply(b"250-PIPELINING\r\n250-SIZE"), None, "incomplete");
        assert_eq!(parse_last_reply(b""), None);
        let bare = parse_last_reply(b"421\r\n").expect("bare code");
        assert_eq!((bare.code, bare.text.as_str()), (421, ""));
    }
}
