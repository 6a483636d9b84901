//! Small SMTP client for tests: [`send`] runs a whole transaction and returns
//! the [`Transcript`] of every reply; [`SmtpClient`] sends arbitrary commands
//! for tests that need odd dialogues. Speaks real SMTP over TCP, optionally
//! with implicit TLS or STARTTLS (rustls).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client};

use super::MAX_LINE;
use super::io::{MaybeTls, read_line, trim_eol};

/// Default time to wait for a connection or a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One SMTP reply, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The raw reply lines without CRLF, e.g. `["250-localhost", "250 SIZE 10"]`.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2xx
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4xx
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The text of each line (after `NNN ` / `NNN-`), joined with `\n`.
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(|line| line.get(4..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether an EHLO reply advertises `keyword` (case-insensitive).
    pub fn has_extension(&self, keyword: &str) -> bool {
        self.lines.iter().skip(1).any(|line| {
            line.get(4..)
                .and_then(|text| text.split_ascii_whitespace().next())
                .is_some_and(|word| word.eq_ignore_ascii_case(keyword))
        })
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines.join("\n"))
    }
}

/// A command and the reply it got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// The command line sent (without CRLF); `None` for the greeting,
    /// `"."` for the end of the message body.
    pub command: Option<String>,
    /// The server's reply.
    pub reply: Reply,
}

/// Every exchange of a [`send`] session, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transcript {
    /// The exchanges, starting with the greeting.
    pub exchanges: Vec<Exchange>,
}

impl Transcript {
    fn push(&mut self, command: Option<&str>, reply: Reply) {
        self.exchanges.push(Exchange {
            command: command.map(str::to_string),
            reply,
        });
    }

    /// Every reply line, in order.
    pub fn lines(&self) -> Vec<String> {
        self.exchanges
            .iter()
            .flat_map(|e| e.reply.lines.iter().cloned())
            .collect()
    }

    /// The greeting.
    pub fn greeting(&self) -> Option<&Reply> {
        self.exchanges.iter().find(|e| e.command.is_none()).map(|e| &e.reply)
    }

    /// The reply to the last command whose verb is `verb` (case-insensitive;
    /// `"."` is the end of the message body).
    pub fn reply_to(&self, verb: &str) -> Option<&Reply> {
        self.exchanges
            .iter()
            .rev()
            .find(|e| {
                e.command
                    .as_deref()
                    .and_then(|c| c.split_ascii_whitespace().next())
                    .is_some_and(|v| v.eq_ignore_ascii_case(verb))
            })
            .map(|e| &e.reply)
    }

    /// The last reply.
    pub fn last(&self) -> Option<&Reply> {
        self.exchanges.last().map(|e| &e.reply)
    }

    /// Whether the message body got a 2xx reply.
    pub fn delivered(&self) -> bool {
        self.reply_to(".").is_some_and(Reply::is_positive)
    }
}

impl fmt::Display for Transcript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.exchanges {
            if let Some(command) = &e.command {
                writeln!(f, "C: {command}")?;
            }
            for line in &e.reply.lines {
                writeln!(f, "S: {line}")?;
            }
        }
        Ok(())
    }
}

type ClientIo = BufReader<MaybeTls<client::TlsStream<TcpStream>>>;

/// A low-level SMTP client connection.
pub struct SmtpClient {
    /// `None` only after a failed TLS upgrade.
    io: Option<ClientIo>,
    greeting: Reply,
    tls: bool,
    timeout: Duration,
}

impl fmt::Debug for SmtpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpClient")
            .field("greeting", &self.greeting)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

async fn tcp_connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = tokio::time::timeout(DEFAULT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("timed out connecting to {addr}"))?
        .with_context(|| format!("connecting to {addr}"))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn tls_connect(
    tcp: TcpStream,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_string())
        .with_context(|| format!("invalid TLS server name {server_name:?}"))?;
    let handshake = TlsConnector::from(config).connect(name, tcp);
    tokio::time::timeout(DEFAULT_TIMEOUT, handshake)
        .await
        .map_err(|_| anyhow!("timed out in TLS handshake"))?
        .context("TLS handshake")
}

/// Dot-stuffs `body`, ends it with CRLF if it does not end with a line
/// break, and appends the `.CRLF` terminator.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut line_start = true;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !body.is_empty() && !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

impl SmtpClient {
    async fn with_stream(stream: MaybeTls<client::TlsStream<TcpStream>>, tls: bool) -> anyhow::Result<Self> {
        let mut client = Self {
            io: Some(BufReader::new(stream)),
            greeting: Reply {
                code: 0,
                lines: Vec::new(),
            },
            tls,
            timeout: DEFAULT_TIMEOUT,
        };
        client.greeting = client.read_reply().await.context("reading greeting")?;
        Ok(client)
    }

    /// Connects over plain TCP and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let tcp = tcp_connect(addr).await?;
        Self::with_stream(MaybeTls::Plain(tcp), false).await
    }

    /// Connects with implicit TLS (verifying `server_name`) and reads the greeting.
    pub async fn connect_tls(
        addr: SocketAddr,
        server_name: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let tcp = tcp_connect(addr).await?;
        let tls = tls_connect(tcp, server_name, config).await?;
        Self::with_stream(MaybeTls::Tls(Box::new(tls)), true).await
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &Reply {
        &self.greeting
    }

    /// Whether the connection is TLS-protected.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Changes how long to wait for each reply (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn io(&mut self) -> anyhow::Result<&mut ClientIo> {
        self.io.as_mut().ok_or_else(|| anyhow!("connection is closed"))
    }

    /// Sends raw bytes as-is (e.g. several pipelined commands).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let io = self.io()?;
        io.write_all(bytes).await.context("sending")?;
        io.flush().await.context("sending")?;
        Ok(())
    }

    /// Reads one (possibly multi-line) reply.
    pub async fn read_reply(&mut self) -> anyhow::Result<Reply> {
        let timeout = self.timeout;
        let io = self.io()?;
        let read = async {
            let mut lines = Vec::new();
            loop {
                let Some(raw) = read_line(io, MAX_LINE).await.context("reading reply")? else {
                    bail!("connection closed by server");
                };
                let line = String::from_utf8_lossy(trim_eol(&raw)).into_owned();
                let code = line
                    .get(..3)
                    .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|c| c.parse::<u16>().ok())
                    .ok_or_else(|| anyhow!("malformed reply line {line:?}"))?;
                let last = match line.as_bytes().get(3) {
                    None | Some(b' ') => true,
                    Some(b'-') => false,
                    Some(_) => bail!("malformed reply line {line:?}"),
                };
                lines.push(line);
                if last {
                    return Ok(Reply { code, lines });
                }
            }
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| anyhow!("timed out after {timeout:?} waiting for a reply"))?
    }

    /// Sends `line` followed by CRLF and reads the reply.
    pub async fn cmd(&mut self, line: &str) -> anyhow::Result<Reply> {
        self.send_raw(format!("{line}\r\n").as_bytes()).await?;
        self.read_reply().await.with_context(|| format!("reply to {line:?}"))
    }

    /// `EHLO name`.
    pub async fn ehlo(&mut self, name: &str) -> anyhow::Result<Reply> {
        self.cmd(&format!("EHLO {name}")).await
    }

    /// Sends STARTTLS; on a 220 reply upgrades the connection (verifying
    /// `server_name`). Returns the STARTTLS reply either way.
    pub async fn starttls(&mut self, server_name: &str, config: Arc<rustls::ClientConfig>) -> anyhow::Result<Reply> {
        let reply = self.cmd("STARTTLS").await?;
        if reply.code != 220 {
            return Ok(reply);
        }
        let io = self.io.take().ok_or_else(|| anyhow!("connection is closed"))?;
        let MaybeTls::Plain(tcp) = io.into_inner() else {
            bail!("STARTTLS on a connection that already uses TLS");
        };
        let tls = tls_connect(tcp, server_name, config).await?;
        self.io = Some(BufReader::new(MaybeTls::Tls(Box::new(tls))));
        self.tls = true;
        Ok(reply)
    }

    /// `AUTH PLAIN` with an initial response.
    pub async fn auth_plain(&mut self, user: &str, pass: &str) -> anyhow::Result<Reply> {
        let token = BASE64.encode(format!("\0{user}\0{pass}"));
        self.cmd(&format!("AUTH PLAIN {token}")).await
    }

    /// Sends the message body (dot-stuffed, see [`dot_stuff`]) after a 354
    /// and reads the final reply.
    pub async fn send_body(&mut self, body: &[u8]) -> anyhow::Result<Reply> {
        self.send_raw(&dot_stuff(body)).await?;
        self.read_reply().await.context("reply to end of DATA")
    }

    /// Sends `DATA`; if the reply is 354, sends `body` and returns the final
    /// reply, otherwise returns the DATA reply.
    pub async fn data(&mut self, body: &[u8]) -> anyhow::Result<Reply> {
        let reply = self.cmd("DATA").await?;
        if reply.code != 354 {
            return Ok(reply);
        }
        self.send_body(body).await
    }

    /// Sends `QUIT` and reads the reply.
    pub async fn quit(mut self) -> anyhow::Result<Reply> {
        let reply = self.cmd("QUIT").await?;
        if let Some(io) = self.io.as_mut() {
            let _ = io.shutdown().await;
        }
        Ok(reply)
    }
}

/// Runs one SMTP transaction against `addr` and returns the transcript.
///
/// * `tls: Some(config)` with `starttls == false`: implicit TLS;
///   with `starttls == true`: STARTTLS after EHLO, then EHLO again.
///   The server certificate is verified for the name `localhost`.
/// * `auth`: `AUTH PLAIN` with an initial response.
/// * Then `MAIL FROM:<from>`, `RCPT TO:<..>` for each recipient, `DATA` with
///   the dot-stuffed `data`, and `QUIT`.
///
/// A non-2xx reply (or 354 for DATA) ends the dialogue with QUIT and
/// `Ok(transcript)`, so tests can assert rejections; recipients are all tried
/// and DATA is sent if at least one was accepted. Errors are I/O or protocol
/// failures (e.g. the server closing the connection); their message includes
/// the transcript so far.
pub async fn send(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    starttls: bool,
    auth: Option<(&str, &str)>,
    from: &str,
    rcpts: &[&str],
    data: &[u8],
) -> anyhow::Result<Transcript> {
    let mut t = Transcript::default();
    let mut client = match (&tls, starttls) {
        (Some(config), false) => SmtpClient::connect_tls(addr, "localhost", Arc::clone(config)).await?,
        (None, true) => bail!("send: starttls requires a client TLS config"),
        _ => SmtpClient::connect(addr).await?,
    };
    t.push(None, client.greeting().clone());
    if !client.greeting().is_positive() {
        return Ok(finish(client, t).await);
    }

    const EHLO: &str = "EHLO client.testkit.localhost";
    if !step(&mut client, &mut t, EHLO).await? {
        return Ok(finish(client, t).await);
    }
    if let (true, Some(config)) = (starttls, tls) {
        let reply = client
            .starttls("localhost", config)
            .await
            .with_context(|| format!("STARTTLS; transcript so far:\n{t}"))?;
        let ok = reply.code == 220;
        t.push(Some("STARTTLS"), reply);
        if !ok || !step(&mut client, &mut t, EHLO).await? {
            return Ok(finish(client, t).await);
        }
    }
    if let Some((user, pass)) = auth {
        let token = BASE64.encode(format!("\0{user}\0{pass}"));
        if !step(&mut client, &mut t, &format!("AUTH PLAIN {token}")).await? {
            return Ok(finish(client, t).await);
        }
    }
    if !step(&mut client, &mut t, &format!("MAIL FROM:<{from}>")).await? {
        return Ok(finish(client, t).await);
    }
    let mut accepted = 0;
    for rcpt in rcpts {
        if step(&mut client, &mut t, &format!("RCPT TO:<{rcpt}>")).await? {
            accepted += 1;
        }
    }
    if accepted == 0 {
        return Ok(finish(client, t).await);
    }
    step(&mut client, &mut t, "DATA").await?;
    if t.last().map(|r| r.code) != Some(354) {
        return Ok(finish(client, t).await);
    }
    let reply = client
        .send_body(data)
        .await
        .with_context(|| format!("transcript so far:\n{t}"))?;
    t.push(Some("."), reply);
    Ok(finish(client, t).await)
}

/// Sends `command`, records the exchange, returns whether the reply was 2xx/3xx.
async fn step(client: &mut SmtpClient, t: &mut Transcript, command: &str) -> anyhow::Result<bool> {
    match client.cmd(command).await {
        Ok(reply) => {
            let ok = reply.is_positive() || reply.is_intermediate();
            t.push(Some(command), reply);
            Ok(ok)
        }
        Err(e) => Err(e.context(format!("transcript so far:\n{t}"))),
    }
}

/// Best-effort QUIT (the server may already have closed the connection).
async fn finish(client: SmtpClient, mut t: Transcript) -> Transcript {
    if let Ok(reply) = client.quit().await {
        t.push(Some("QUIT"), reply);
    }
    t
}
