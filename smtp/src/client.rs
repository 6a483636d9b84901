//! The outbound SMTP client, shared by the relay's delivery and the operator's connection test:
//! TCP connect, greeting, EHLO, STARTTLS or implicit TLS, AUTH, and MAIL/RCPT/DATA
//! transactions, driven through mail-send's `SmtpClient`. Both report the same [`Reply`] for the
//! same exchange, so a route's `Verified` condition quotes what the delivery log would.
//!
//! Where mail-send is wrapped or bypassed, and why:
//! * The stream is a [`Recorder`] around our own plain/TLS [`Stream`]: mail-send's reply parser
//!   (smtp-proto) strips the enhanced status code from the text and stores its parts in `u8`,
//!   so `4.7.500` comes back as `4.7.255`; the recorder keeps the raw reply bytes, which
//!   [`crate::reply`] parses into the [`Reply`] every caller sees.
//! * TLS (implicit and STARTTLS) is set up here with tokio-rustls, not with mail-send's
//!   `start_tls`/`into_tls`, which only exist for a bare `TcpStream` and would give pooled
//!   connections two different types; the caller gives the TLS config (`mailroute_tls`).
//! * STARTTLS is optional for MX delivery; mail-send's builder only knows "required".
//! * With PIPELINING offered, MAIL, RCPT and DATA go in one write (mail-send's `cmds`) and the
//!   content follows once DATA is open; mail-send's own `data` would wait for each reply.
//! * Envelope addresses are written in RFC 5321 form ([`wire_form`]) and the content is
//!   dot-stuffed by [`write_dot_stuffed`].
//! * The commands of a transaction (MAIL, RCPT, DATA, the content, RSET) are written and read
//!   here, each step bounded by the route's limit for it through the connection's one [`Alarm`]
//!   instead of a `timeout` around every command (mail-send's `cmd`/`cmds` start a new timer
//!   each; registering and removing them was a measurable share of the relay's CPU).
//! * AUTH XOAUTH2 is sent here: to a refused token Google answers `334` with an error (base64
//!   JSON) and expects an empty line before its final `535`; mail-send would send the token
//!   again instead.
//!
//! On request ([`Connection::open_recorded`]) it keeps the server's replies while a connection
//! opens ([`Dialogue`]), for the operator's connection test to show; the relay's own opens
//! record nothing.
//!
//! This module must not pool, retry, classify or word errors for people; it reports what
//! happened at which [`Stage`] ([`ErrorKind`]), and each caller says what that means.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mail_send::SmtpClient;
use mail_send::smtp::AssertReply;
use mail_send::smtp::message::Parameters;
use mailroute_api::config::Credentials;
use mailroute_api::route::AuthMechanism;
use rustls::pki_types::ServerName;
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, AUTH_XOAUTH2, EXT_8BIT_MIME, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS,
    EhloResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::reply::{Reply, parse_last_reply, parse_replies};
use crate::wire::{AddressError, wire_form, write_dot_stuffed};

/// Step of an outbound delivery an outcome belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Preparing the attempt (configuration such as an invalid CA bundle); before the client.
    Setup,
    /// Finding the next hop's addresses; before the client.
    Dns,
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Reset,
    MailFrom,
    RcptTo,
    /// The DATA command.
    Data,
    /// The message content and its final reply.
    Message,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::Dns => "dns",
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "ehlo",
            Stage::StartTls => "starttls",
            Stage::Auth => "auth",
            Stage::Reset => "rset",
            Stage::MailFrom => "mail_from",
            Stage::RcptTo => "rcpt_to",
            Stage::Data => "data",
            Stage::Message => "message",
        }
    }

    /// Whether the message content may have reached the server.
    pub fn content_sent(self) -> bool {
        self == Stage::Message
    }
}

/// How TLS is used on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsUse {
    /// Never (route `tls: none`).
    Plain,
    /// STARTTLS must succeed.
    RequireStartTls,
    /// STARTTLS when offered; a failed handshake is reported so the caller can retry in plain.
    Opportunistic,
    /// TLS from the first byte.
    Implicit,
}

/// Timeouts of one connection, per step (the route's `timeouts`, Postfix's by default).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
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

impl Timeouts {
    /// The same limit for every step (the operator's connection test).
    pub fn uniform(d: Duration) -> Self {
        Timeouts {
            connect: d,
            greeting: d,
            mail: d,
            rcpt: d,
            data_init: d,
            data_transfer: d,
            data_done: d,
        }
    }
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

/// Everything needed to open a connection.
pub struct OpenSpec<'a> {
    pub host: &'a str,
    pub addr: SocketAddr,
    pub tls: TlsUse,
    pub tls_config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    pub helo: &'a str,
    /// Credentials and the mechanism to use (`None`: PLAIN or LOGIN, whichever is offered).
    pub auth: Option<(&'a Credentials, Option<AuthMechanism>)>,
    pub timeouts: Timeouts,
}

/// What went wrong at a step. [`ErrorKind::detail`] words it as the delivery log does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server answered with a failure (or unexpected) reply.
    Reply(Reply),
    /// The TCP connection could not be opened (the OS error).
    Connect(String),
    /// No TCP connection within the connect timeout.
    ConnectTimeout(Duration),
    /// The TLS handshake failed (the TLS error, e.g. certificate verification).
    TlsHandshake(String),
    TlsTimeout,
    /// STARTTLS is required and the server does not offer it.
    StartTlsNotOffered,
    NoGreeting,
    /// No reply within the step's timeout.
    Timeout(String),
    /// The connection broke or the server closed it.
    Lost(String),
    /// A TLS error after the handshake.
    Tls(String),
    /// The server does not offer the configured AUTH mechanism (`offered`: smtp-proto's bits).
    AuthNotOffered {
        wanted: Option<AuthMechanism>,
        offered: u64,
    },
    /// The AUTH exchange failed without a reply to quote.
    Auth(String),
    /// The server broke the protocol.
    Protocol(String),
}

impl ErrorKind {
    /// One line for logs and DSNs.
    pub fn detail(&self) -> String {
        match self {
            ErrorKind::Reply(r) => r.to_string(),
            ErrorKind::Connect(e) => e.clone(),
            ErrorKind::ConnectTimeout(d) => format!("no connection within {d:?}"),
            ErrorKind::TlsHandshake(e) => format!("TLS handshake failed: {e}"),
            ErrorKind::TlsTimeout => "TLS handshake timed out".into(),
            ErrorKind::StartTlsNotOffered => "the server does not offer STARTTLS".into(),
            ErrorKind::NoGreeting => "no greeting".into(),
            ErrorKind::AuthNotOffered { wanted, .. } => {
                format!("the server does not offer AUTH {}", mechanism_name(*wanted))
            }
            ErrorKind::Timeout(d)
            | ErrorKind::Lost(d)
            | ErrorKind::Tls(d)
            | ErrorKind::Auth(d)
            | ErrorKind::Protocol(d) => d.clone(),
        }
    }
}

/// A step that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    pub stage: Stage,
    pub kind: ErrorKind,
    /// Whether TLS was active when it happened.
    pub tls: bool,
}

impl StepError {
    fn new(stage: Stage, kind: ErrorKind, tls: bool) -> Self {
        StepError { stage, kind, tls }
    }

    /// The connection can still carry another transaction (after RSET).
    pub fn session_usable(&self) -> bool {
        matches!(&self.kind, ErrorKind::Reply(r) if r.code != 421)
    }

    /// A TLS handshake that failed for reasons other than certificate verification is worth one
    /// plain-text retry under opportunistic TLS.
    pub fn is_tls_handshake(&self) -> bool {
        self.stage == Stage::StartTls
            && matches!(
                self.kind,
                ErrorKind::TlsHandshake(_) | ErrorKind::Tls(_) | ErrorKind::StartTlsNotOffered
            )
    }
}

/// The transport under mail-send: plain TCP or TLS over TCP.
pub type Stream = mailroute_tls::MaybeTls<TlsStream<TcpStream>>;

/// Upper bound of recorded reply bytes (smtp-proto caps a reply at 4 KiB).
const RECORD_LIMIT: usize = 16 * 1024;

/// Writes held until this many bytes are waiting (or a flush).
const WRITE_BUFFER: usize = 64 * 1024;

/// Keeps the bytes read since the last [`Recorder::clear`], and buffers writes until a flush:
/// mail-send writes a command, or each dot-stuffed piece of a message, with its own `write_all`
/// and flushes after each step, so one step becomes one system call instead of many.
pub struct Recorder<S> {
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
    fn last_reply(&self) -> Option<Reply> {
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

type Client = SmtpClient<Recorder<Stream>>;

/// The one timer of a connection's transactions. Each step (the pipelined envelope, a command,
/// the content, the reply to it) keeps its own limit from the route's `timeouts`, but they all
/// share this timer instead of each starting one: the timer is never set more than `shortest`
/// (the smallest of those limits) ahead, so moving it on for the next step only ever moves it
/// later, which tokio does with one atomic update instead of re-registering it in its wheel
/// under a lock. At worst it wakes a step early, and is set again for what remains of it.
struct Alarm {
    sleep: Pin<Box<Sleep>>,
    shortest: Duration,
}

impl Alarm {
    fn new(t: &Timeouts) -> Self {
        let shortest = [t.mail, t.rcpt, t.data_init, t.data_transfer, t.data_done]
            .into_iter()
            .min()
            .unwrap_or(t.mail)
            .max(Duration::from_millis(1));
        Alarm {
            sleep: Box::pin(tokio::time::sleep(shortest)),
            shortest,
        }
    }

    /// Runs `step` for at most `limit`: [`mail_send::Error::Timeout`] when it has not finished
    /// by then (the step is dropped, as a `timeout` would).
    async fn bound<T>(
        &mut self,
        limit: Duration,
        step: impl Future<Output = Result<T, mail_send::Error>>,
    ) -> Result<T, mail_send::Error> {
        let deadline = Instant::now() + limit;
        let mut step = pin!(step);
        poll_fn(|cx| {
            if let Poll::Ready(r) = step.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Poll::Ready(Err(mail_send::Error::Timeout));
                }
                if self.sleep.is_elapsed() || self.sleep.deadline() > deadline {
                    self.sleep.as_mut().reset((now + self.shortest).min(deadline));
                }
                if self.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        })
        .await
    }
}

/// Writes `lines` in one flush and reads one reply per line (no timer of its own: see [`Alarm`]).
async fn exchange(client: &mut Client, lines: &[&[u8]]) -> Result<Vec<smtp_proto::Response<String>>, mail_send::Error> {
    for l in lines {
        client.stream.write_all(l).await?;
    }
    client.stream.flush().await?;
    if lines.len() == 1 {
        Ok(vec![client.read().await?])
    } else {
        client.read_many(lines.len()).await
    }
}

/// One command and its reply (no timer of its own: see [`Alarm`]).
async fn command(client: &mut Client, line: &[u8]) -> Result<smtp_proto::Response<String>, mail_send::Error> {
    client.stream.write_all(line).await?;
    client.stream.flush().await?;
    client.read().await
}

/// An open, greeted (and, if configured, encrypted and authenticated) connection.
pub struct Connection {
    client: Client,
    caps: EhloResponse<String>,
    pub tls: bool,
    pub host: String,
    pub addr: SocketAddr,
    timeouts: Timeouts,
    alarm: Alarm,
    /// No transaction is open: the last one ended with a reply to its content (or RSET).
    clean: bool,
}

/// The server's positive replies while a connection opens (greeting, EHLO, STARTTLS, AUTH), in
/// order, for callers that show the dialogue (the operator's connection test); parsed only
/// when asked for.
#[derive(Debug, Default)]
pub struct Dialogue(Option<Vec<(Stage, Reply)>>);

impl Dialogue {
    /// A dialogue that records.
    pub fn recording() -> Self {
        Self(Some(Vec::new()))
    }

    /// The replies recorded.
    pub fn replies(&self) -> &[(Stage, Reply)] {
        self.0.as_deref().unwrap_or_default()
    }

    fn push(&mut self, stage: Stage, reply: &Reply) {
        if let Some(v) = &mut self.0 {
            v.push((stage, reply.clone()));
        }
    }

    fn note(&mut self, stage: Stage, client: &Client) {
        if let Some(v) = &mut self.0
            && let Some(r) = client.stream.last_reply()
        {
            v.push((stage, r));
        }
    }
}

impl Connection {
    /// Connects and prepares a connection for transactions.
    pub async fn open(spec: OpenSpec<'_>) -> Result<Connection, StepError> {
        Self::open_recorded(spec, &mut Dialogue::default()).await
    }

    /// [`Connection::open`], keeping the server's replies up to the failing step (whose reply is
    /// the error's) in `dialogue`.
    pub async fn open_recorded(spec: OpenSpec<'_>, dialogue: &mut Dialogue) -> Result<Connection, StepError> {
        let t = spec.timeouts;
        let tcp = match tokio::time::timeout(t.connect, TcpStream::connect(spec.addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(StepError::new(Stage::Connect, ErrorKind::Connect(e.to_string()), false)),
            Err(_) => {
                return Err(StepError::new(
                    Stage::Connect,
                    ErrorKind::ConnectTimeout(t.connect),
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
            Err(_) => return Err(StepError::new(Stage::Greeting, ErrorKind::NoGreeting, tls)),
            Ok(Err(e)) => return Err(map_error(&client, Stage::Greeting, e, tls)),
            Ok(Ok(_)) => {
                if let Some(reply) = client.stream.last_reply().filter(|r| !r.is_positive()) {
                    return Err(StepError::new(Stage::Greeting, ErrorKind::Reply(reply), tls));
                }
                dialogue.note(Stage::Greeting, &client);
            }
        }

        let mut caps = ehlo(&mut client, spec.helo, tls).await?;
        dialogue.note(Stage::Ehlo, &client);

        let want_starttls = match spec.tls {
            TlsUse::RequireStartTls => {
                if !caps.has_capability(EXT_START_TLS) {
                    return Err(StepError::new(Stage::StartTls, ErrorKind::StartTlsNotOffered, false));
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
                        Some(r) if r.is_positive() => dialogue.push(Stage::StartTls, &r),
                        Some(r) if spec.tls == TlsUse::Opportunistic && r.code != 421 => {
                            // Refused STARTTLS: carry on in plain text on this connection.
                            tracing::debug!(host = spec.host, reply = %r, "STARTTLS refused; continuing without TLS");
                            dialogue.push(Stage::StartTls, &r);
                            return Self::finish_open(client, caps, false, &spec, dialogue).await;
                        }
                        Some(r) => {
                            return Err(StepError::new(Stage::StartTls, ErrorKind::Reply(r), false));
                        }
                        None => {
                            return Err(protocol(Stage::StartTls, "no reply to STARTTLS", false));
                        }
                    }
                }
                Err(e) => return Err(map_error(&client, Stage::StartTls, e, false)),
            }
            let Stream::Plain(tcp) = client.stream.inner else {
                return Err(protocol(Stage::StartTls, "STARTTLS on a TLS stream", true));
            };
            let tls_stream = handshake(&spec, tcp, Stage::StartTls).await?;
            client = SmtpClient {
                stream: Recorder::new(Stream::Tls(Box::new(tls_stream))),
                timeout: t.greeting,
            };
            tls = true;
            caps = ehlo(&mut client, spec.helo, tls).await?;
            dialogue.note(Stage::Ehlo, &client);
        }
        Self::finish_open(client, caps, tls, &spec, dialogue).await
    }

    async fn finish_open(
        mut client: Client,
        caps: EhloResponse<String>,
        tls: bool,
        spec: &OpenSpec<'_>,
        dialogue: &mut Dialogue,
    ) -> Result<Connection, StepError> {
        if let Some((creds, mechanism)) = spec.auth {
            authenticate(&mut client, &caps, creds, mechanism, tls).await?;
            dialogue.note(Stage::Auth, &client);
        }
        client.timeout = spec.timeouts.mail;
        Ok(Connection {
            client,
            caps,
            tls,
            host: spec.host.to_owned(),
            addr: spec.addr,
            timeouts: spec.timeouts,
            alarm: Alarm::new(&spec.timeouts),
            clean: true,
        })
    }

    /// One transaction: MAIL, RCPT, DATA. Returns the final reply to the message content.
    pub async fn send(&mut self, mail_from: &str, rcpt_to: &str, message: &[u8]) -> Result<Reply, StepError> {
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

    async fn transaction(&mut self, mail_from: &str, rcpt_to: &str, message: &[u8]) -> Result<Reply, StepError> {
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
        let t = self.timeouts;
        self.client.stream.clear();
        let mail = format!("MAIL FROM:<{mail_from}>{params}\r\n");
        let sent = self
            .alarm
            .bound(t.mail, command(&mut self.client, mail.as_bytes()))
            .await;
        if let Err(e) = sent.and_then(|r| r.assert_positive_completion()) {
            return Err(map_error(&self.client, Stage::MailFrom, e, tls));
        }
        self.client.stream.clear();
        let rcpt = format!("RCPT TO:<{rcpt_to}>\r\n");
        let sent = self
            .alarm
            .bound(t.rcpt, command(&mut self.client, rcpt.as_bytes()))
            .await;
        if let Err(e) = sent.and_then(|r| r.assert_positive_completion()) {
            return Err(map_error(&self.client, Stage::RcptTo, e, tls));
        }

        self.client.stream.clear();
        let opened = self
            .alarm
            .bound(t.data_init, command(&mut self.client, b"DATA\r\n"))
            .await
            .and_then(|r| r.assert_code(354));
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
    ) -> Result<Reply, StepError> {
        const STAGES: [Stage; 3] = [Stage::MailFrom, Stage::RcptTo, Stage::Data];
        let tls = self.tls;
        let mail = format!("MAIL FROM:<{mail_from}>{params}\r\n");
        let rcpt = format!("RCPT TO:<{rcpt_to}>\r\n");
        let envelope: [&[u8]; 3] = [mail.as_bytes(), rcpt.as_bytes(), b"DATA\r\n"];
        self.client.stream.clear();
        // The replies come together: the longest of their timeouts bounds the wait.
        let t = self.timeouts;
        let limit = t.mail.max(t.rcpt).max(t.data_init);
        let replies = self.alarm.bound(limit, exchange(&mut self.client, &envelope)).await;
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
                if let Err(e) = self.alarm.bound(t.mail, command(&mut self.client, b".\r\n")).await {
                    return Err(map_error(&self.client, Stage::Message, e, tls));
                }
            }
            return Err(StepError::new(STAGES[i], ErrorKind::Reply(reply(i)), tls));
        }
        if !data_open {
            return Err(StepError::new(Stage::Data, ErrorKind::Reply(reply(2)), tls));
        }

        self.client.stream.clear();
        match self.send_content(message).await {
            Err(e) => Err(map_error(&self.client, Stage::Message, e, tls)),
            Ok(r) => {
                let reply = raw_or(self.client.stream.last_reply(), &r);
                if r.is_positive_completion() {
                    Ok(reply)
                } else {
                    Err(StepError::new(Stage::Message, ErrorKind::Reply(reply), tls))
                }
            }
        }
    }

    /// Writes the content once DATA is open, dot-stuffed (see the module doc), within the
    /// transfer timeout, and reads the reply to its final dot within the end-of-data timeout.
    async fn send_content(&mut self, message: &[u8]) -> Result<smtp_proto::Response<String>, mail_send::Error> {
        let t = self.timeouts;
        let stream = &mut self.client.stream;
        let written = async {
            write_dot_stuffed(&mut *stream, message).await?;
            Ok(stream.flush().await?)
        };
        self.alarm.bound(t.data_transfer, written).await?;
        self.alarm.bound(t.data_done, self.client.read()).await
    }

    fn saw_354(&self) -> bool {
        let log = String::from_utf8_lossy(&self.client.stream.log);
        log.lines().any(|l| l.starts_with("354"))
    }

    /// RSET before reusing the connection for another message; also proves it is alive.
    pub async fn reset(&mut self) -> Result<(), StepError> {
        self.client.stream.clear();
        self.alarm
            .bound(self.timeouts.mail, command(&mut self.client, b"RSET\r\n"))
            .await
            .and_then(|r| r.assert_positive_completion())
            .map_err(|e| map_error(&self.client, Stage::Reset, e, self.tls))?;
        self.clean = true;
        Ok(())
    }

    /// Polite QUIT, bounded by the MAIL timeout; errors do not matter any more.
    pub async fn quit(self) {
        let _ = tokio::time::timeout(self.timeouts.mail, self.client.quit()).await;
    }
}

/// An address the relay cannot write safely is refused here, as a server would refuse it: the
/// inbound side refuses such addresses, so only older queue entries can have one.
fn unwritable(stage: Stage, enhanced: &str, e: &AddressError, tls: bool) -> StepError {
    StepError::new(
        stage,
        ErrorKind::Reply(Reply::new(553, format!("{enhanced} relay: {e}, not sent"))),
        tls,
    )
}

async fn handshake(spec: &OpenSpec<'_>, tcp: TcpStream, stage: Stage) -> Result<TlsStream<TcpStream>, StepError> {
    let connector = TlsConnector::from(Arc::clone(&spec.tls_config));
    match tokio::time::timeout(spec.timeouts.greeting, connector.connect(spec.server_name.clone(), tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(StepError::new(stage, ErrorKind::TlsHandshake(e.to_string()), false)),
        Err(_) => Err(StepError::new(stage, ErrorKind::TlsTimeout, false)),
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
    creds: &Credentials,
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
    if mechanism == Some(AuthMechanism::Xoauth2) && caps.auth_mechanisms & AUTH_XOAUTH2 != 0 {
        return xoauth2(client, creds, tls).await;
    }
    // Offer mail-send only the configured mechanism, so it cannot pick another one.
    let mut offered = caps.clone();
    offered.auth_mechanisms &= mask;
    if offered.auth_mechanisms == 0 {
        return Err(StepError::new(
            Stage::Auth,
            ErrorKind::AuthNotOffered {
                wanted: mechanism,
                offered: caps.auth_mechanisms,
            },
            tls,
        ));
    }
    client.stream.clear();
    match client.authenticate(&credentials, &offered).await {
        Ok(_) => Ok(()),
        Err(e) => Err(map_error(client, Stage::Auth, e, tls)),
    }
}

/// AUTH XOAUTH2 with the initial response (`user=U\x01auth=Bearer T\x01\x01`). A `334` is the
/// server's error challenge: an empty line gets its final reply, which is the one reported.
async fn xoauth2(client: &mut Client, creds: &Credentials, tls: bool) -> Result<(), StepError> {
    use base64::Engine as _;
    let initial = base64::engine::general_purpose::STANDARD.encode(format!(
        "user={}\x01auth=Bearer {}\x01\x01",
        creds.username, creds.password
    ));
    client.stream.clear();
    let mut reply = client
        .cmd(format!("AUTH XOAUTH2 {initial}\r\n"))
        .await
        .map_err(|e| map_error(client, Stage::Auth, e, tls))?;
    if reply.code() == 334 {
        client.stream.clear();
        reply = client
            .cmd(b"\r\n")
            .await
            .map_err(|e| map_error(client, Stage::Auth, e, tls))?;
    }
    if reply.code() == 235 {
        return Ok(());
    }
    let recorded = client.stream.last_reply();
    Err(StepError::new(
        Stage::Auth,
        ErrorKind::Reply(raw_or(recorded, &reply)),
        tls,
    ))
}

/// The mechanism as named in AUTH (`None`: PLAIN or LOGIN, whichever is offered).
pub fn mechanism_name(m: Option<AuthMechanism>) -> &'static str {
    match m {
        Some(AuthMechanism::Login) => "LOGIN",
        Some(AuthMechanism::Xoauth2) => "XOAUTH2",
        Some(AuthMechanism::Plain) => "PLAIN",
        None => "PLAIN or LOGIN",
    }
}

/// The reply as the recorder saw it, else mail-send's parse of it (which mangles enhanced codes,
/// see the module doc).
fn raw_or(recorded: Option<Reply>, r: &smtp_proto::Response<String>) -> Reply {
    recorded.unwrap_or_else(|| Reply::new(r.code(), r.message().to_owned()))
}

fn protocol(stage: Stage, detail: &str, tls: bool) -> StepError {
    StepError::new(stage, ErrorKind::Protocol(detail.to_owned()), tls)
}

/// Turns a mail-send error into a [`StepError`], preferring the raw reply the recorder saw.
fn map_error(client: &Client, stage: Stage, e: mail_send::Error, tls: bool) -> StepError {
    use mail_send::Error as E;
    let recorded = client.stream.last_reply();
    let kind = match e {
        E::UnexpectedReply(r) | E::AuthenticationFailed(r) => ErrorKind::Reply(raw_or(recorded, &r)),
        E::Io(io) => match io.kind() {
            io::ErrorKind::TimedOut => ErrorKind::Timeout(io.to_string()),
            _ => ErrorKind::Lost(io.to_string()),
        },
        E::Tls(t) => ErrorKind::Tls(t.to_string()),
        E::Timeout => ErrorKind::Timeout(format!("no reply during {}", stage.as_str())),
        // mail-send reports end-of-stream as an unparseable reply.
        E::UnparseableReply if client.stream.eof => ErrorKind::Lost("connection closed by the server".into()),
        E::UnparseableReply => ErrorKind::Protocol(format!(
            "unparseable reply: {}",
            String::from_utf8_lossy(&client.stream.log)
                .chars()
                .take(200)
                .collect::<String>()
        )),
        E::MissingStartTls => ErrorKind::StartTlsNotOffered,
        E::Auth(_) | E::Base64(_) | E::UnsupportedAuthMechanism | E::MissingCredentials => {
            ErrorKind::Auth(e.to_string())
        }
        other => ErrorKind::Protocol(other.to_string()),
    };
    StepError { stage, kind, tls }
}
