//! Scriptable SMTP server playing an upstream smarthost / destination MX in
//! tests, plus (in [`client`]) a small SMTP client for driving SMTP servers.
//!
//! The server owns: listening on `127.0.0.1:0`, the SMTP dialogue (EHLO/HELO,
//! STARTTLS, implicit TLS, AUTH PLAIN/LOGIN and XOAUTH2 (tokens checked by a [`TokenCheck`]),
//! MAIL/RCPT/DATA, RSET, NOOP, QUIT,
//! pipelining), applying the scripted per-message [`Behaviour`]s, recording
//! every accepted message as a [`Received`], and counting open sessions (now
//! and at most at once). It stops when dropped.

pub mod client;
mod io;

use std::collections::VecDeque;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::{TlsAcceptor, server};

pub use client::{Exchange, Reply, SmtpClient, Transcript, send};

use self::io::{MaybeTls, read_line, trim_eol};

/// Gmail's XOAUTH2 error challenge (before base64).
pub const XOAUTH2_ERROR: &str = r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#;
/// Default reply to wrong AUTH credentials.
pub const DEFAULT_AUTH_FAIL_REPLY: &str = "535 5.7.8 Username and password not accepted.";
/// Default reply used by [`Behaviour::temp_fail`] and [`Script::fail_then_accept`].
pub const DEFAULT_TEMP_FAIL_REPLY: &str = "451 4.3.0 Try again later";
/// Default reply used by [`Behaviour::perm_fail`].
pub const DEFAULT_PERM_FAIL_REPLY: &str = "550 5.1.1 User unknown";
/// Reply sent (before closing) by [`Behaviour::RateLimit`].
pub const RATE_LIMIT_REPLY: &str = "421 4.7.0 Too many messages, slow down";
/// Reply to MAIL before STARTTLS when [`Script::require_starttls`] is set.
pub const STARTTLS_REQUIRED_REPLY: &str = "530 5.7.0 Must issue a STARTTLS command first";
/// Reply to MAIL without AUTH when [`Script::auth`] is set.
pub const AUTH_REQUIRED_REPLY: &str = "530 5.7.0 Authentication required";

/// Longest accepted command line (bytes, including CRLF).
pub const MAX_LINE: usize = 10_000;
/// Longest accepted line inside DATA.
const MAX_DATA_LINE: usize = 1 << 20;
const MAX_RCPTS: usize = 1000;

/// TLS mode of the server.
#[derive(Clone, Debug, Default)]
pub enum Tls {
    /// Plain text only; STARTTLS is not offered.
    #[default]
    None,
    /// Plain text with STARTTLS offered in EHLO.
    StartTls(Arc<rustls::ServerConfig>),
    /// TLS from the first byte (SMTPS, "port 465" style).
    Implicit(Arc<rustls::ServerConfig>),
}

/// What the server does with one message (or one RCPT, see [`Stage`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Accept (250).
    Accept,
    /// Reply with this (4xx) line, e.g. `451 4.3.0 Try again later`.
    TempFail(String),
    /// Reply with this (5xx) line, e.g. `550 5.1.1 User unknown`.
    PermFail(String),
    /// Close the TCP connection without replying.
    Drop,
    /// Reply [`RATE_LIMIT_REPLY`] and close the connection.
    RateLimit,
    /// Accept, but only after this long (a slow upstream).
    AcceptAfter(Duration),
    /// Accept, but hold the reply until the [`Gate`] is opened (the test decides when).
    AcceptWhenOpen(Gate),
}

/// A gate that holds [`Behaviour::AcceptWhenOpen`] replies until [`Gate::open`]; clones share it.
#[derive(Clone, Debug)]
pub struct Gate {
    open: Arc<watch::Sender<bool>>,
    waiting: Arc<AtomicUsize>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            open: Arc::new(watch::channel(false).0),
            waiting: Arc::default(),
        }
    }
}

impl PartialEq for Gate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.open, &other.open)
    }
}

impl Eq for Gate {}

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets every held and future reply through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Replies held at the gate now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    async fn pass(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| *open).await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Behaviour {
    /// `TempFail` with [`DEFAULT_TEMP_FAIL_REPLY`].
    pub fn temp_fail() -> Self {
        Self::TempFail(DEFAULT_TEMP_FAIL_REPLY.to_string())
    }

    /// `PermFail` with [`DEFAULT_PERM_FAIL_REPLY`].
    pub fn perm_fail() -> Self {
        Self::PermFail(DEFAULT_PERM_FAIL_REPLY.to_string())
    }
}

/// Decides whether an XOAUTH2 token is valid now for a user (see
/// [`crate::token_endpoint::Endpoint::token_check`]). `Debug` shows nothing of it.
#[derive(Clone)]
pub struct TokenCheck(Arc<CheckFn>);

/// `(user, token) -> accepted`.
type CheckFn = dyn Fn(&str, &str) -> bool + Send + Sync;

impl TokenCheck {
    pub fn new(check: impl Fn(&str, &str) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(check))
    }

    pub fn accepts(&self, user: &str, token: &str) -> bool {
        (self.0)(user, token)
    }
}

impl fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenCheck")
    }
}

/// Where the scripted [`Behaviour`]s apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stage {
    /// Each RCPT command consumes one behaviour (so recipients can fail
    /// individually); DATA then accepts the message for the accepted recipients.
    Rcpt,
    /// Each message consumes one behaviour at the end of DATA.
    #[default]
    Data,
}

/// The server's script. Use `Script::default()` / [`Script::new`] and the
/// builder methods, or fill the public fields directly.
#[derive(Clone, Debug)]
pub struct Script {
    /// TLS mode (default: none).
    pub tls: Tls,
    /// MAIL before STARTTLS gets [`STARTTLS_REQUIRED_REPLY`].
    pub require_starttls: bool,
    /// `(username, password)`; when set, `AUTH PLAIN LOGIN` is advertised
    /// (after TLS if TLS is configured) and MAIL requires authentication.
    pub auth: Option<(String, String)>,
    /// Reply to wrong credentials (default [`DEFAULT_AUTH_FAIL_REPLY`]).
    pub auth_fail_reply: String,
    /// When set, `AUTH XOAUTH2` is advertised (after TLS if TLS is configured), MAIL requires
    /// authentication, and a token is accepted when the check says so.
    pub xoauth2: Option<TokenCheck>,
    /// A refused XOAUTH2 token gets Google's error challenge (`334` and base64 JSON); only an
    /// empty line then gets `auth_fail_reply`, anything else `501`.
    pub xoauth2_error_challenge: bool,
    /// Behaviours consumed in order, one per message (or per RCPT).
    pub behaviours: Vec<Behaviour>,
    /// Behaviour once `behaviours` is exhausted (default `Accept`).
    pub default_behaviour: Behaviour,
    /// Where behaviours apply (default end of DATA).
    pub stage: Stage,
    /// Full greeting line (default `220 <hostname> ESMTP mailroute-testkit`).
    /// A `421` greeting closes the connection; any other non-2xx greeting
    /// answers everything but QUIT with `503`.
    pub greeting: Option<String>,
    /// Host name used in the greeting and EHLO reply (default `localhost`).
    pub hostname: String,
    /// Static EHLO extensions (default PIPELINING, 8BITMIME, SMTPUTF8,
    /// ENHANCEDSTATUSCODES, SIZE). A bare `SIZE` is rendered as
    /// `SIZE <max_size>`. STARTTLS and AUTH are added automatically.
    pub ehlo_extensions: Vec<String>,
    /// Largest accepted message in bytes (default 10 MiB); larger gets `552`.
    pub max_size: usize,
    /// QUIT gets no reply and the connection stays open (an upstream that never answers it).
    pub ignore_quit: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            tls: Tls::None,
            require_starttls: false,
            auth: None,
            auth_fail_reply: DEFAULT_AUTH_FAIL_REPLY.to_string(),
            xoauth2: None,
            xoauth2_error_challenge: false,
            behaviours: Vec::new(),
            default_behaviour: Behaviour::Accept,
            stage: Stage::Data,
            greeting: None,
            hostname: "localhost".to_string(),
            ehlo_extensions: ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "SIZE"]
                .map(String::from)
                .to_vec(),
            max_size: 10 << 20,
            ignore_quit: false,
        }
    }
}

impl Script {
    /// Same as `Script::default()`: plain text, no auth, accept everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the TLS mode.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = tls;
        self
    }

    /// Offers STARTTLS with `config`.
    pub fn starttls(self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls(Tls::StartTls(config))
    }

    /// Speaks TLS from the first byte with `config`.
    pub fn implicit_tls(self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls(Tls::Implicit(config))
    }

    /// Rejects MAIL before STARTTLS.
    pub fn require_starttls(mut self, required: bool) -> Self {
        self.require_starttls = required;
        self
    }

    /// Requires AUTH with these credentials.
    pub fn auth(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some((username.into(), password.into()));
        self
    }

    /// Requires AUTH XOAUTH2 with a token `check` accepts (any user).
    pub fn xoauth2(mut self, check: TokenCheck) -> Self {
        self.xoauth2 = Some(check);
        self
    }

    /// Answers refused XOAUTH2 tokens as Gmail does (see [`Script::xoauth2_error_challenge`]).
    pub fn xoauth2_error_challenge(mut self, on: bool) -> Self {
        self.xoauth2_error_challenge = on;
        self
    }

    /// Reply to wrong credentials.
    pub fn auth_fail_reply(mut self, reply: impl Into<String>) -> Self {
        self.auth_fail_reply = reply.into();
        self
    }

    /// Appends one behaviour to the queue.
    pub fn then(mut self, behaviour: Behaviour) -> Self {
        self.behaviours.push(behaviour);
        self
    }

    /// Appends behaviours to the queue.
    pub fn behaviours(mut self, behaviours: impl IntoIterator<Item = Behaviour>) -> Self {
        self.behaviours.extend(behaviours);
        self
    }

    /// Behaviour once the queue is exhausted.
    pub fn default_behaviour(mut self, behaviour: Behaviour) -> Self {
        self.default_behaviour = behaviour;
        self
    }

    /// Fails the next `n` messages with `reply` (a 4xx line, e.g.
    /// [`DEFAULT_TEMP_FAIL_REPLY`]), then accepts everything.
    pub fn fail_then_accept(mut self, n: usize, reply: impl Into<String>) -> Self {
        let reply = reply.into();
        self.behaviours
            .extend(std::iter::repeat_n(Behaviour::TempFail(reply), n));
        self.default_behaviour = Behaviour::Accept;
        self
    }

    /// Where behaviours apply.
    pub fn stage(mut self, stage: Stage) -> Self {
        self.stage = stage;
        self
    }

    /// Overrides the greeting line (e.g. `554 No service`).
    pub fn greeting(mut self, greeting: impl Into<String>) -> Self {
        self.greeting = Some(greeting.into());
        self
    }

    /// Host name used in the greeting and EHLO reply.
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = hostname.into();
        self
    }

    /// Replaces the static EHLO extensions (see [`Script::ehlo_extensions`](Script#structfield.ehlo_extensions)).
    pub fn ehlo_extensions<S: Into<String>>(mut self, extensions: impl IntoIterator<Item = S>) -> Self {
        self.ehlo_extensions = extensions.into_iter().map(Into::into).collect();
        self
    }

    /// Largest accepted message in bytes.
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.max_size = max_size;
        self
    }

    /// Never answer QUIT and keep the connection open.
    pub fn ignore_quit(mut self, ignore: bool) -> Self {
        self.ignore_quit = ignore;
        self
    }
}

/// A message the server accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Reverse path without angle brackets (`""` for the null sender).
    pub mail_from: String,
    /// Accepted recipients, without angle brackets, in order.
    pub rcpts: Vec<String>,
    /// Message content, dot-unstuffed, without the final `.CRLF`
    /// (the CRLF ending the last line is kept).
    pub data: Vec<u8>,
    /// Whether the session was TLS-protected.
    pub tls: bool,
    /// The authenticated user, if any.
    pub auth_user: Option<String>,
    /// The accepted MAIL and RCPT command lines exactly as they came over the wire.
    pub envelope_lines: Vec<Vec<u8>>,
    /// The content exactly as it came over the wire: dot-stuffed, up to and including the
    /// terminating `.` line.
    pub wire_data: Vec<u8>,
}

impl Received {
    /// `data` as (lossy) UTF-8.
    pub fn data_str(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

struct Queue {
    pending: VecDeque<Behaviour>,
    default: Behaviour,
}

struct Shared {
    script: Script,
    /// The credentials AUTH accepts now: the script's, until [`SmtpServer::set_auth`].
    auth: Mutex<Option<(String, String)>>,
    queue: Mutex<Queue>,
    received: Mutex<Vec<Received>>,
    connections: AtomicUsize,
    /// Sessions open now, and the most ever open at once (see [`SmtpServer::open_sessions`]).
    open: AtomicUsize,
    peak_open: AtomicUsize,
    attempts: AtomicUsize,
    resets: AtomicUsize,
    /// The XOAUTH2 tokens presented, in order (accepted or not).
    xoauth2_tokens: Mutex<Vec<String>>,
    /// Bumped on every observable change; waiters re-check their condition.
    changed: watch::Sender<u64>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn next_behaviour(&self) -> Behaviour {
        let behaviour = {
            let mut queue = lock(&self.queue);
            queue.pending.pop_front().unwrap_or_else(|| queue.default.clone())
        };
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.bump();
        behaviour
    }

    /// Counts a session as open until the guard is dropped.
    fn open_session(self: &Arc<Self>) -> OpenSession {
        let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_open.fetch_max(now, Ordering::SeqCst);
        self.bump();
        OpenSession(Arc::clone(self))
    }

    fn record(&self, message: Received) -> usize {
        let n = {
            let mut received = lock(&self.received);
            received.push(message);
            received.len()
        };
        self.bump();
        n
    }
}

/// One open session, counted in [`SmtpServer::open_sessions`] while it lives.
struct OpenSession(Arc<Shared>);

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.bump();
    }
}

/// A running scriptable SMTP server on `127.0.0.1:<random port>`.
/// Stops accepting and closes all connections when dropped.
pub struct SmtpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for SmtpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpServer")
            .field("addr", &self.addr)
            .field("connections", &self.connections())
            .field("attempts", &self.attempts())
            .field("received", &lock(&self.shared.received).len())
            .finish()
    }
}

impl SmtpServer {
    /// Binds `127.0.0.1:0` and serves `script` on the current tokio runtime.
    /// Must be called from within a runtime.
    pub fn start(script: Script) -> anyhow::Result<Self> {
        let handle = tokio::runtime::Handle::try_current()
            .context("SmtpServer::start must be called from within a tokio runtime")?;
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding SMTP test server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let queue = Queue {
            pending: script.behaviours.iter().cloned().collect(),
            default: script.default_behaviour.clone(),
        };
        let shared = Arc::new(Shared {
            auth: Mutex::new(script.auth.clone()),
            script,
            queue: Mutex::new(queue),
            received: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            peak_open: AtomicUsize::new(0),
            resets: AtomicUsize::new(0),
            attempts: AtomicUsize::new(0),
            xoauth2_tokens: Mutex::new(Vec::new()),
            changed: watch::Sender::new(0),
        });
        let task = handle.spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            task: Mutex::new(Some(task)),
        })
    }

    /// The listening address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Messages accepted so far, in order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// Number of RSET commands received.
    pub fn resets(&self) -> usize {
        self.shared.resets.load(Ordering::SeqCst)
    }

    /// Number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Sessions open now. A session counts from the TCP accept until the client's `QUIT`
    /// arrives (before the reply) or the connection ends, so a client that waits for the `221`
    /// before another connection opens is never seen with both open.
    pub fn open_sessions(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// The most sessions ever open at once (see [`open_sessions`](Self::open_sessions)).
    pub fn max_open_sessions(&self) -> usize {
        self.shared.peak_open.load(Ordering::SeqCst)
    }

    /// Number of delivery attempts seen (ends of DATA, or RCPTs with
    /// [`Stage::Rcpt`]), including failed ones.
    pub fn attempts(&self) -> usize {
        self.shared.attempts.load(Ordering::SeqCst)
    }

    /// The XOAUTH2 tokens presented so far, in order, accepted or not.
    pub fn xoauth2_tokens(&self) -> Vec<String> {
        lock(&self.shared.xoauth2_tokens).clone()
    }

    /// Appends a behaviour to the queue of the running server.
    pub fn push_behaviour(&self, behaviour: Behaviour) {
        lock(&self.shared.queue).pending.push_back(behaviour);
    }

    /// Changes the credentials AUTH accepts from now on (a password rotated at the upstream); the
    /// old ones get the script's `auth_fail_reply`. Only for a server scripted with
    /// [`Script::auth`].
    pub fn set_auth(&self, username: impl Into<String>, password: impl Into<String>) {
        *lock(&self.shared.auth) = Some((username.into(), password.into()));
    }

    /// Changes the behaviour used once the queue is exhausted.
    pub fn set_default_behaviour(&self, behaviour: Behaviour) {
        lock(&self.shared.queue).default = behaviour;
    }

    /// Waits until at least `n` messages were accepted, returning all of them;
    /// errors after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Received>> {
        self.wait_until(timeout, |s| lock(&s.received).len() >= n)
            .await
            .with_context(|| format!("waiting for {n} message(s)"))?;
        Ok(self.received())
    }

    /// Waits until at least `n` attempts were seen (see [`attempts`](Self::attempts)).
    pub async fn wait_for_attempts(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(timeout, |s| s.attempts.load(Ordering::SeqCst) >= n)
            .await
            .with_context(|| format!("waiting for {n} attempt(s)"))
    }

    /// Waits until at least `n` connections were accepted.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(timeout, |s| s.connections.load(Ordering::SeqCst) >= n)
            .await
            .with_context(|| format!("waiting for {n} connection(s)"))
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&Shared) -> bool) -> anyhow::Result<()> {
        let mut rx = self.shared.changed.subscribe();
        let wait = async {
            loop {
                if done(&self.shared) {
                    return;
                }
                // The sender lives in `self.shared`, so this cannot fail.
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            bail!(
                "timed out after {timeout:?} (received {}, attempts {}, connections {})",
                lock(&self.shared.received).len(),
                self.attempts(),
                self.connections()
            );
        }
        Ok(())
    }

    /// Stops listening and aborts all connections; returns once the listener is closed.
    pub async fn shutdown(&self) {
        let task = lock(&self.task).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the JoinSet (when this task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    let open = shared.open_session();
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        // Errors just end the connection.
                        let _ = serve(shared, tcp, open).await;
                    });
                }
                Err(_) => tokio::task::yield_now().await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

type ServerIo = BufReader<MaybeTls<server::TlsStream<TcpStream>>>;

enum Flow {
    Continue,
    Close,
}

async fn reply(io: &mut ServerIo, text: &str) -> std::io::Result<Flow> {
    io.write_all(text.as_bytes()).await?;
    io.write_all(b"\r\n").await?;
    io.flush().await?;
    Ok(Flow::Continue)
}

async fn reply_and_close(io: &mut ServerIo, text: &str) -> std::io::Result<Flow> {
    reply(io, text).await?;
    let _ = io.shutdown().await;
    Ok(Flow::Close)
}

/// Splits `VERB rest` into an upper-cased verb and the (trimmed) rest.
fn split_command(line: &str) -> (String, &str) {
    let line = line.trim_start();
    match line.split_once(|c: char| c.is_ascii_whitespace()) {
        Some((verb, rest)) => (verb.to_ascii_uppercase(), rest.trim()),
        None => (line.trim_end().to_ascii_uppercase(), ""),
    }
}

/// Parses `FROM:<addr> params` / `TO:<addr> params` leniently; returns the address.
fn parse_path<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg.get(keyword.len()..)?.trim_start();
    if let Some(rest) = rest.strip_prefix('<') {
        let end = rest.find('>')?;
        Some(&rest[..end])
    } else {
        rest.split_ascii_whitespace().next()
    }
}

async fn serve(shared: Arc<Shared>, tcp: TcpStream, open: OpenSession) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let (stream, tls) = match &shared.script.tls {
        Tls::Implicit(config) => {
            let tls = TlsAcceptor::from(Arc::clone(config)).accept(tcp).await?;
            (MaybeTls::Tls(Box::new(tls)), true)
        }
        Tls::None | Tls::StartTls(_) => (MaybeTls::Plain(tcp), false),
    };
    let mut io = BufReader::new(stream);
    let mut session = Session {
        shared: Arc::clone(&shared),
        open: Some(open),
        tls,
        helo: None,
        auth_user: None,
        mail_from: None,
        rcpts: Vec::new(),
        raw_line: Vec::new(),
        envelope_lines: Vec::new(),
    };

    let script = &shared.script;
    let greeting = match &script.greeting {
        Some(greeting) => greeting.clone(),
        None => format!("220 {} ESMTP mailroute-testkit", script.hostname),
    };
    if greeting.starts_with("421") {
        reply_and_close(&mut io, &greeting).await?;
        return Ok(());
    }
    reply(&mut io, &greeting).await?;
    let refused = !greeting.starts_with('2');

    loop {
        let line = match read_line(&mut io, MAX_LINE).await {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                reply_and_close(&mut io, "500 5.5.2 Line too long").await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let line_bytes = line;
        let line = String::from_utf8_lossy(trim_eol(&line_bytes)).into_owned();
        let (verb, arg) = split_command(&line);

        let flow = if refused && verb != "QUIT" {
            reply(&mut io, "503 5.5.1 Bad sequence of commands").await?
        } else if verb == "STARTTLS" {
            let config = match &script.tls {
                Tls::StartTls(config) if !session.tls => Arc::clone(config),
                Tls::StartTls(_) | Tls::Implicit(_) => {
                    reply(&mut io, "503 5.5.1 TLS already active").await?;
                    continue;
                }
                Tls::None => {
                    reply(&mut io, "502 5.5.1 STARTTLS not supported").await?;
                    continue;
                }
            };
            reply(&mut io, "220 2.0.0 Ready to start TLS").await?;
            // Anything pipelined after STARTTLS is discarded with the buffer.
            let MaybeTls::Plain(tcp) = io.into_inner() else {
                return Ok(());
            };
            let tls = TlsAcceptor::from(config).accept(tcp).await?;
            io = BufReader::new(MaybeTls::Tls(Box::new(tls)));
            session.tls = true;
            session.helo = None;
            session.auth_user = None;
            session.reset_transaction();
            Flow::Continue
        } else {
            session.raw_line = line_bytes;
            session.command(&mut io, &verb, arg).await?
        };
        if let Flow::Close = flow {
            return Ok(());
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    /// Dropped at `QUIT` or when the connection ends.
    open: Option<OpenSession>,
    tls: bool,
    helo: Option<String>,
    auth_user: Option<String>,
    mail_from: Option<String>,
    rcpts: Vec<String>,
    /// The command line being handled, as received.
    raw_line: Vec<u8>,
    /// The accepted MAIL and RCPT lines of the open transaction, as received.
    envelope_lines: Vec<Vec<u8>>,
}

enum AuthOutcome {
    Credentials(String, String),
    /// XOAUTH2: the user and the bearer token.
    Token(String, String),
    Reply(&'static str),
    Closed,
}

impl Session {
    fn script(&self) -> &Script {
        &self.shared.script
    }

    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
        self.envelope_lines.clear();
    }

    fn ehlo_reply(&self) -> String {
        let script = self.script();
        let mut lines = vec![script.hostname.clone()];
        for ext in &script.ehlo_extensions {
            if ext.eq_ignore_ascii_case("SIZE") {
                lines.push(format!("SIZE {}", script.max_size));
            } else {
                lines.push(ext.clone());
            }
        }
        if matches!(script.tls, Tls::StartTls(_)) && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        if matches!(script.tls, Tls::None) || self.tls {
            match (script.auth.is_some(), script.xoauth2.is_some()) {
                (true, true) => lines.push("AUTH PLAIN LOGIN XOAUTH2".to_string()),
                (true, false) => lines.push("AUTH PLAIN LOGIN".to_string()),
                (false, true) => lines.push("AUTH XOAUTH2".to_string()),
                (false, false) => {}
            }
        }
        let last = lines.len() - 1;
        lines
            .iter()
            .enumerate()
            .map(|(i, line)| format!("250{}{line}", if i == last { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    async fn command(&mut self, io: &mut ServerIo, verb: &str, arg: &str) -> std::io::Result<Flow> {
        match verb {
            "EHLO" | "HELO" => {
                if arg.is_empty() {
                    return reply(io, &format!("501 5.5.4 Syntax: {verb} hostname")).await;
                }
                self.helo = Some(arg.to_string());
                self.reset_transaction();
                if verb == "EHLO" {
                    reply(io, &self.ehlo_reply()).await
                } else {
                    reply(io, &format!("250 {}", self.script().hostname)).await
                }
            }
            "AUTH" => self.auth(io, arg).await,
            "MAIL" => self.mail(io, arg).await,
            "RCPT" => self.rcpt(io, arg).await,
            "DATA" => self.data(io).await,
            "RSET" => {
                self.shared.resets.fetch_add(1, Ordering::SeqCst);
                self.reset_transaction();
                reply(io, "250 2.0.0 OK").await
            }
            "NOOP" => reply(io, "250 2.0.0 OK").await,
            "VRFY" => reply(io, "252 2.5.2 Cannot VRFY user").await,
            "QUIT" if self.script().ignore_quit => Ok(Flow::Continue),
            "QUIT" => {
                self.open = None;
                reply_and_close(io, "221 2.0.0 Bye").await
            }
            _ => reply(io, "500 5.5.2 Syntax error, command unrecognized").await,
        }
    }

    async fn mail(&mut self, io: &mut ServerIo, arg: &str) -> std::io::Result<Flow> {
        let script = self.script();
        if self.helo.is_none() {
            return reply(io, "503 5.5.1 Send EHLO/HELO first").await;
        }
        if script.require_starttls && !self.tls {
            return reply(io, STARTTLS_REQUIRED_REPLY).await;
        }
        if (script.auth.is_some() || script.xoauth2.is_some()) && self.auth_user.is_none() {
            return reply(io, AUTH_REQUIRED_REPLY).await;
        }
        if self.mail_from.is_some() {
            return reply(io, "503 5.5.1 Sender already specified").await;
        }
        let Some(from) = parse_path(arg, "FROM:") else {
            return reply(io, "501 5.5.4 Syntax: MAIL FROM:<address>").await;
        };
        self.mail_from = Some(from.to_string());
        self.envelope_lines = vec![std::mem::take(&mut self.raw_line)];
        reply(io, "250 2.1.0 OK").await
    }

    async fn rcpt(&mut self, io: &mut ServerIo, arg: &str) -> std::io::Result<Flow> {
        if self.mail_from.is_none() {
            return reply(io, "503 5.5.1 Need MAIL command").await;
        }
        let Some(to) = parse_path(arg, "TO:").filter(|to| !to.is_empty()) else {
            return reply(io, "501 5.5.4 Syntax: RCPT TO:<address>").await;
        };
        if self.rcpts.len() >= MAX_RCPTS {
            return reply(io, "452 4.5.3 Too many recipients").await;
        }
        let behaviour = match self.script().stage {
            Stage::Rcpt => self.shared.next_behaviour(),
            Stage::Data => Behaviour::Accept,
        };
        match &behaviour {
            Behaviour::AcceptAfter(delay) => tokio::time::sleep(*delay).await,
            Behaviour::AcceptWhenOpen(gate) => gate.pass().await,
            _ => {}
        }
        match behaviour {
            Behaviour::Accept | Behaviour::AcceptAfter(_) | Behaviour::AcceptWhenOpen(_) => {
                self.rcpts.push(to.to_string());
                self.envelope_lines.push(std::mem::take(&mut self.raw_line));
                reply(io, "250 2.1.5 OK").await
            }
            Behaviour::TempFail(text) | Behaviour::PermFail(text) => reply(io, &text).await,
            Behaviour::Drop => Ok(Flow::Close),
            Behaviour::RateLimit => reply_and_close(io, RATE_LIMIT_REPLY).await,
        }
    }

    async fn data(&mut self, io: &mut ServerIo) -> std::io::Result<Flow> {
        if self.mail_from.is_none() {
            return reply(io, "503 5.5.1 Need MAIL command").await;
        }
        if self.rcpts.is_empty() {
            return reply(io, "554 5.5.1 No valid recipients").await;
        }
        reply(io, "354 Start mail input; end with <CRLF>.<CRLF>").await?;

        let max_size = self.script().max_size;
        let mut data = Vec::new();
        let mut wire_data = Vec::new();
        let mut oversized = false;
        loop {
            let line = match read_line(io, MAX_DATA_LINE).await {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(Flow::Close),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return reply_and_close(io, "500 5.5.2 Line too long").await;
                }
                Err(e) => return Err(e),
            };
            if !oversized {
                wire_data.extend_from_slice(&line);
            }
            if line == b".\r\n" || line == b".\n" {
                break;
            }
            let content = line.strip_prefix(b".").unwrap_or(&line);
            if data.len() + content.len() > max_size {
                oversized = true;
            }
            if !oversized {
                data.extend_from_slice(content);
            }
        }

        let mail_from = self.mail_from.take().unwrap_or_default();
        let rcpts = std::mem::take(&mut self.rcpts);
        let envelope_lines = std::mem::take(&mut self.envelope_lines);
        if oversized {
            return reply(io, "552 5.3.4 Message size exceeds fixed maximum message size").await;
        }
        let behaviour = match self.script().stage {
            Stage::Data => self.shared.next_behaviour(),
            Stage::Rcpt => Behaviour::Accept,
        };
        match &behaviour {
            Behaviour::AcceptAfter(delay) => tokio::time::sleep(*delay).await,
            Behaviour::AcceptWhenOpen(gate) => gate.pass().await,
            _ => {}
        }
        match behaviour {
            Behaviour::Accept | Behaviour::AcceptAfter(_) | Behaviour::AcceptWhenOpen(_) => {
                let id = self.shared.record(Received {
                    mail_from,
                    rcpts,
                    data,
                    tls: self.tls,
                    auth_user: self.auth_user.clone(),
                    envelope_lines,
                    wire_data,
                });
                reply(io, &format!("250 2.0.0 OK queued as {id}")).await
            }
            Behaviour::TempFail(text) | Behaviour::PermFail(text) => reply(io, &text).await,
            Behaviour::Drop => Ok(Flow::Close),
            Behaviour::RateLimit => reply_and_close(io, RATE_LIMIT_REPLY).await,
        }
    }

    async fn auth(&mut self, io: &mut ServerIo, arg: &str) -> std::io::Result<Flow> {
        let script = self.script();
        let password = script.auth.as_ref().and_then(|_| lock(&self.shared.auth).clone());
        if password.is_none() && script.xoauth2.is_none() {
            return reply(io, "502 5.5.1 AUTH not supported").await;
        }
        if !matches!(script.tls, Tls::None) && !self.tls {
            return reply(io, STARTTLS_REQUIRED_REPLY).await;
        }
        if self.helo.is_none() {
            return reply(io, "503 5.5.1 Send EHLO first").await;
        }
        if self.auth_user.is_some() {
            return reply(io, "503 5.5.1 Already authenticated").await;
        }
        if self.mail_from.is_some() {
            return reply(io, "503 5.5.1 AUTH not permitted during a mail transaction").await;
        }
        let mut words = arg.split_ascii_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        let outcome = match mechanism.as_str() {
            "PLAIN" if password.is_some() => auth_plain(io, initial).await?,
            "LOGIN" if password.is_some() => auth_login(io, initial).await?,
            "XOAUTH2" if script.xoauth2.is_some() => auth_xoauth2(io, initial).await?,
            _ => AuthOutcome::Reply("504 5.5.4 Unrecognized authentication type"),
        };
        let accepted = |u: &str, p: &str| match &outcome {
            AuthOutcome::Token(..) => script.xoauth2.as_ref().is_some_and(|c| c.accepts(u, p)),
            _ => password.as_ref().is_some_and(|(user, pass)| u == user && p == pass),
        };
        if let AuthOutcome::Token(_, token) = &outcome {
            lock(&self.shared.xoauth2_tokens).push(token.clone());
            self.shared.bump();
        }
        match outcome {
            AuthOutcome::Credentials(u, p) | AuthOutcome::Token(u, p) if accepted(&u, &p) => {
                self.auth_user = Some(u);
                reply(io, "235 2.7.0 Authentication successful").await
            }
            AuthOutcome::Token(..) if script.xoauth2_error_challenge => {
                // Google: the error as a challenge; an empty line gets the final reply.
                reply(io, &format!("334 {}", BASE64.encode(XOAUTH2_ERROR))).await?;
                match read_line(io, MAX_LINE).await {
                    Ok(Some(line)) if trim_eol(&line).is_empty() => reply(io, &script.auth_fail_reply).await,
                    Ok(Some(_)) => reply(io, "501 5.5.2 Cannot Decode response").await,
                    Ok(None) => Ok(Flow::Close),
                    Err(e) => Err(e),
                }
            }
            AuthOutcome::Credentials(..) | AuthOutcome::Token(..) => {
                let text = self.script().auth_fail_reply.clone();
                reply(io, &text).await
            }
            AuthOutcome::Reply(text) => reply(io, text).await,
            AuthOutcome::Closed => Ok(Flow::Close),
        }
    }
}

enum Response {
    Value(String),
    Reply(&'static str),
    Closed,
}

/// Gets one base64 SASL response (the initial one if given, else after `prompt`).
async fn sasl_response(io: &mut ServerIo, initial: Option<String>, prompt: &str) -> std::io::Result<Response> {
    let raw = match initial {
        Some(raw) => raw,
        None => {
            reply(io, prompt).await?;
            match read_line(io, MAX_LINE).await {
                Ok(Some(line)) => String::from_utf8_lossy(trim_eol(&line)).trim().to_string(),
                Ok(None) => return Ok(Response::Closed),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    reply_and_close(io, "500 5.5.2 Line too long").await?;
                    return Ok(Response::Closed);
                }
                Err(e) => return Err(e),
            }
        }
    };
    if raw == "*" {
        return Ok(Response::Reply("501 5.7.0 Authentication cancelled"));
    }
    if raw == "=" {
        return Ok(Response::Value(String::new()));
    }
    match BASE64.decode(raw.as_bytes()) {
        Ok(bytes) => Ok(Response::Value(String::from_utf8_lossy(&bytes).into_owned())),
        Err(_) => Ok(Response::Reply("501 5.5.2 Cannot decode response")),
    }
}

async fn auth_plain(io: &mut ServerIo, initial: Option<String>) -> std::io::Result<AuthOutcome> {
    let decoded = match sasl_response(io, initial, "334 ").await? {
        Response::Value(value) => value,
        Response::Reply(text) => return Ok(AuthOutcome::Reply(text)),
        Response::Closed => return Ok(AuthOutcome::Closed),
    };
    let mut parts = decoded.split('\0');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_authzid), Some(user), Some(pass), None) => {
            Ok(AuthOutcome::Credentials(user.to_string(), pass.to_string()))
        }
        _ => Ok(AuthOutcome::Reply("501 5.5.2 Malformed PLAIN response")),
    }
}

/// XOAUTH2 (`user=U\x01auth=Bearer T\x01\x01`, base64): the user and the token.
async fn auth_xoauth2(io: &mut ServerIo, initial: Option<String>) -> std::io::Result<AuthOutcome> {
    let decoded = match sasl_response(io, initial, "334 ").await? {
        Response::Value(value) => value,
        Response::Reply(text) => return Ok(AuthOutcome::Reply(text)),
        Response::Closed => return Ok(AuthOutcome::Closed),
    };
    let mut user = None;
    let mut token = None;
    for field in decoded.split('\x01') {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u.to_string());
        } else if let Some(t) = field.strip_prefix("auth=Bearer ") {
            token = Some(t.to_string());
        }
    }
    match (user, token) {
        (Some(u), Some(t)) if decoded.ends_with("\x01\x01") => Ok(AuthOutcome::Token(u, t)),
        _ => Ok(AuthOutcome::Reply("501 5.5.2 Malformed XOAUTH2 response")),
    }
}

async fn auth_login(io: &mut ServerIo, initial: Option<String>) -> std::io::Result<AuthOutcome> {
    let user = match sasl_response(io, initial, "334 VXNlcm5hbWU6").await? {
        Response::Value(value) => value,
        Response::Reply(text) => return Ok(AuthOutcome::Reply(text)),
        Response::Closed => return Ok(AuthOutcome::Closed),
    };
    let pass = match sasl_response(io, None, "334 UGFzc3dvcmQ6").await? {
        Response::Value(value) => value,
        Response::Reply(text) => return Ok(AuthOutcome::Reply(text)),
        Response::Closed => return Ok(AuthOutcome::Closed),
    };
    Ok(AuthOutcome::Credentials(user, pass))
}

#[cfg(test)]
mod tests {
    use super::{parse_path, split_command};

    #[test]
    fn parses_commands_leniently() {
        assert_eq!(
            split_command("mail FROM:<a@b> SIZE=123"),
            ("MAIL".into(), "FROM:<a@b> SIZE=123")
        );
        assert_eq!(split_command("quit"), ("QUIT".into(), ""));
        assert_eq!(parse_path("FROM:<a@b> SIZE=123", "FROM:"), Some("a@b"));
        assert_eq!(parse_path("from: <>", "FROM:"), Some(""));
        assert_eq!(parse_path("To:c@d", "TO:"), Some("c@d"));
        assert_eq!(parse_path("TO:<c@d", "TO:"), None);
        assert_eq!(parse_path("é", "TO:"), None);
        assert_eq!(parse_path("FRO", "FROM:"), None);
    }
}
