//! The inbound SMTP session: EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA with the limits and
//! replies of a relay that is never open. A message is answered `250` only after the queue
//! acknowledged it.
//!
//! This module owns the protocol state machine and the relay-access decision. Sender policy and
//! quota arithmetic are the quota engine's ([`super::quota`]), consulted at MAIL, RCPT and the end
//! of DATA; logging and metrics go out through [`Observer`]. What a session may cost is bounded
//! outside it: password checks and AUTH failures per address by [`super::auth_guard`], body
//! memory by `super::body_budget`. It must not deliver or route.
//! DATA transparency (a message with a bare CR or LF is refused) is `super::data`'s; raw
//! MAIL/RCPT line checks and the RFC 5321 form of addresses are `super::address`'s.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ipnet::IpNet;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, Error as ProtoError, MAIL_SMTPUTF8, Request};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::address;
use super::auth_guard::{AuthGuard, AuthLimits, Verdict};
use super::body_budget::{self, BodyBudget};
use super::data::DataReceiver;
use super::listener::{Conn, Line, ListenerKind, MaybeTls};
use super::{replies, shutdown};
use crate::config::ConfigHandle;
use crate::inbound::headers;
use crate::inbound::quota::{QuotaDecision, QuotaEngine, QuotaTxn, SenderCtx, UNAVAILABLE_REPLY};
use crate::observe::metrics::Metrics;
use crate::queue::Queue;
use crate::queue::message::{Job, MessageMeta, new_id};

pub use mailroute_smtp::Reply;

/// A reply from a full line `"451 4.7.1 text"` (quota and policy answers); an unparsable line
/// becomes a 451.
fn reply_from_line(line: &str) -> Reply {
    Reply::from_line(line).unwrap_or_else(|| Reply::new(451, line))
}

/// Who is sending, as known at the time of a policy check.
#[derive(Clone, Debug)]
pub struct SenderInfo {
    pub source_ip: IpAddr,
    pub listener: ListenerKind,
    pub auth_user: Option<String>,
    /// Quota bound to the authenticated user's credentials, if any.
    pub user_quota: Option<String>,
    pub tls: bool,
    /// Envelope sender; empty for `<>`.
    pub mail_from: String,
}

/// Where the session reports what happened (delivery log, metrics).
pub trait Observer: Send + Sync {
    fn session_opened(&self, _listener: ListenerKind) {}
    fn session_closed(&self, _listener: ListenerKind) {}
    fn auth_failed(&self, _listener: ListenerKind, _ip: IpAddr) {}
    /// A message was queued (`accept_latency` = end of DATA to the 250).
    fn accepted(&self, _meta: &MessageMeta, _accept_latency: Duration) {}
    /// A recipient or message was refused with `reply` (rcpt None = whole message).
    fn rejected(&self, _s: &SenderInfo, _rcpt: Option<&str>, _reply: &Reply) {}
    /// A quota answered (`accepted`, `deferred`, `rejected`).
    fn quota_decision(&self, _quota: &str, _result: &str) {}
}

pub struct NoopObserver;
impl Observer for NoopObserver {}

/// Limits and identity of the inbound side.
#[derive(Clone, Debug)]
pub struct InboundSettings {
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub max_sessions_per_ip: usize,
    /// AUTH failures before each further attempt is slowed down.
    pub auth_failures_before_delay: u32,
    /// AUTH failures after which the session is dropped.
    pub max_auth_failures: u32,
    /// Bad commands after which the session is dropped.
    pub max_errors: u32,
    /// Sources allowed to relay without AUTH on the plain listener.
    pub relay_cidrs: Vec<IpNet>,
    /// Delay per AUTH failure beyond the threshold (zero in tests that count failures).
    pub auth_delay: Duration,
    /// Concurrent password checks and AUTH failures per client address.
    pub auth_limits: AuthLimits,
    /// Bytes of message bodies held in memory at once; `None`: 4 × `max_message_size`.
    pub max_body_memory: Option<usize>,
}

impl InboundSettings {
    /// The body budget in effect.
    pub fn body_budget(&self) -> usize {
        self.max_body_memory
            .unwrap_or_else(|| self.max_message_size.saturating_mul(4))
    }
}

impl Default for InboundSettings {
    fn default() -> Self {
        InboundSettings {
            hostname: "localhost".into(),
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_line_length: 4096,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            max_sessions_per_ip: 100,
            auth_failures_before_delay: 2,
            max_auth_failures: 5,
            max_errors: 20,
            relay_cidrs: vec!["127.0.0.0/8".parse().expect("cidr"), "::1/128".parse().expect("cidr")],
            auth_delay: Duration::from_secs(1),
            auth_limits: AuthLimits::default(),
            max_body_memory: None,
        }
    }
}

/// Shared by every session of every listener.
pub struct Inbound {
    pub settings: InboundSettings,
    pub config: Arc<ConfigHandle>,
    pub queue: Arc<dyn Queue>,
    pub quotas: QuotaEngine,
    pub observer: Arc<dyn Observer>,
    pub tls: Option<TlsAcceptor>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    auth_guard: AuthGuard,
    body_budget: Arc<BodyBudget>,
    /// Turns true when the relay shuts down: sessions waiting for a command then end.
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

struct IpSlot<'a> {
    inbound: &'a Inbound,
    ip: IpAddr,
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inbound.per_ip.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Whether `source` may relay without authenticating on `listener`.
pub fn may_relay_unauthenticated(listener: ListenerKind, source: IpAddr, cidrs: &[IpNet]) -> bool {
    let source = match source {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    listener == ListenerKind::Smtp && cidrs.iter().any(|n| n.contains(&source))
}

/// Syntax check of a recipient address: local@domain with a valid domain.
/// `local@bücher.example` → `local@xn--bcher-kva.example`; other addresses unchanged.
fn with_ascii_domain(addr: &str) -> String {
    match addr.rsplit_once('@') {
        Some((local, domain)) if !domain.is_ascii() => match crate::outbound::route::ascii_domain(domain) {
            Some(d) => format!("{local}@{d}"),
            None => addr.to_owned(),
        },
        _ => addr.to_owned(),
    }
}

/// U-labels (SMTPUTF8) are checked in their A-label form.
fn valid_recipient(addr: &str) -> bool {
    match addr.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && local.len() <= 64
                && crate::outbound::route::ascii_domain(domain)
                    .is_some_and(|d| mailroute_api::pattern::is_valid_domain(&d))
        }
        None => false,
    }
}

enum Flow {
    Continue,
    Close,
    StartTls,
}

struct Session {
    listener: ListenerKind,
    peer: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    auth_user: Option<String>,
    user_quota: Option<String>,
    auth_failures: u32,
    errors: u32,
    mail_from: Option<String>,
    /// MAIL had the SMTPUTF8 parameter (RFC 6531): non-ASCII addresses are allowed.
    smtputf8: bool,
    /// `SIZE=` of the MAIL command (0: none), reserved from the body budget at DATA.
    declared_size: usize,
    rcpts: Vec<String>,
    /// Quota reservations of the open transaction; given back unless the message is queued.
    txn: Option<QuotaTxn>,
}

impl Session {
    fn reset_transaction(&mut self) -> Option<QuotaTxn> {
        self.mail_from = None;
        self.smtputf8 = false;
        self.rcpts.clear();
        self.txn.take()
    }

    fn sender(&self) -> SenderInfo {
        SenderInfo {
            source_ip: self.peer.ip(),
            listener: self.listener,
            auth_user: self.auth_user.clone(),
            user_quota: self.user_quota.clone(),
            tls: self.tls,
            mail_from: self.mail_from.clone().unwrap_or_default(),
        }
    }
}

impl Inbound {
    pub fn new(
        settings: InboundSettings,
        config: Arc<ConfigHandle>,
        queue: Arc<dyn Queue>,
        quotas: QuotaEngine,
        observer: Arc<dyn Observer>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        Inbound {
            auth_guard: AuthGuard::new(settings.auth_limits.clone(), metrics.clone()),
            body_budget: BodyBudget::new(settings.body_budget(), settings.max_message_size, metrics),
            settings,
            config,
            queue,
            quotas,
            observer,
            tls: tls.map(TlsAcceptor::from),
            per_ip: Mutex::new(HashMap::new()),
            shutdown: None,
        }
    }

    /// Reports the AUTH and body-memory gauges into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.auth_guard = AuthGuard::new(self.settings.auth_limits.clone(), metrics.clone());
        self.body_budget = BodyBudget::new(self.settings.body_budget(), self.settings.max_message_size, metrics);
        self
    }

    /// Sessions waiting for a command end with `421 4.3.2` once `shutdown` turns true.
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    fn take_ip_slot(&self, ip: IpAddr) -> Option<IpSlot<'_>> {
        let mut m = self.per_ip.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= self.settings.max_sessions_per_ip {
            return None;
        }
        *n += 1;
        Some(IpSlot { inbound: self, ip })
    }

    /// Runs one session to its end. Errors are I/O errors of this connection only.
    pub async fn handle(&self, tcp: TcpStream, peer: SocketAddr, listener: ListenerKind) -> std::io::Result<()> {
        let _ = tcp.set_nodelay(true);
        self.observer.session_opened(listener);
        let r = self.handle_inner(tcp, peer, listener).await;
        self.observer.session_closed(listener);
        r
    }

    async fn handle_inner(&self, tcp: TcpStream, peer: SocketAddr, listener: ListenerKind) -> std::io::Result<()> {
        // Count the session before any TLS handshake, so idle handshakes cannot exceed the limit.
        let slot = self.take_ip_slot(peer.ip());
        let stream = if listener == ListenerKind::Smtps {
            let (Some(acceptor), Some(_)) = (&self.tls, &slot) else {
                // Over the limit: a TLS client cannot read a plaintext 421; just close.
                return Ok(());
            };
            let tls = tokio::time::timeout(self.settings.command_timeout, acceptor.accept(tcp))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timeout"))??;
            MaybeTls::Tls(Box::new(tls))
        } else {
            MaybeTls::Plain(tcp)
        };
        let mut conn = Conn::new(stream);
        let Some(_slot) = slot else {
            conn.reply(replies::TOO_MANY_CONNECTIONS);
            return conn.flush().await;
        };
        let mut s = Session {
            listener,
            peer,
            helo: None,
            esmtp: false,
            tls: conn.is_tls(),
            auth_user: None,
            user_quota: None,
            auth_failures: 0,
            errors: 0,
            mail_from: None,
            smtputf8: false,
            declared_size: 0,
            rcpts: Vec::new(),
            txn: None,
        };
        conn.reply(&format!("220 {} ESMTP mailroute ready", self.settings.hostname));
        let r = self.session_loop(conn, &mut s).await;
        // However the session ended, an unfinished transaction gives its quota back.
        self.abort(s.reset_transaction()).await;
        r
    }

    async fn abort(&self, txn: Option<QuotaTxn>) {
        if let Some(txn) = txn
            && let Err(e) = self.quotas.abort(txn).await
        {
            tracing::warn!(error = %e, "releasing quota reservation failed");
        }
    }

    async fn session_loop(&self, mut conn: Conn, s: &mut Session) -> std::io::Result<()> {
        loop {
            match self.command_loop(&mut conn, s).await? {
                Flow::Close => {
                    conn.flush().await?;
                    return Ok(());
                }
                Flow::StartTls => {
                    conn.flush().await?;
                    let (MaybeTls::Plain(tcp), Some(acceptor)) = (conn.into_stream(), &self.tls) else {
                        return Ok(());
                    };
                    let tls = tokio::time::timeout(self.settings.command_timeout, acceptor.accept(tcp))
                        .await
                        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timeout"))??;
                    conn = Conn::new(MaybeTls::Tls(Box::new(tls)));
                    s.tls = true;
                    s.helo = None;
                    s.esmtp = false;
                    let t = s.reset_transaction();
                    self.abort(t).await;
                }
                Flow::Continue => {}
            }
        }
    }

    async fn command_loop(&self, conn: &mut Conn, s: &mut Session) -> std::io::Result<Flow> {
        let mut closing = self.shutdown.clone();
        loop {
            if closing.is_some() && !conn.buffered().contains(&b'\n') {
                // Replies go out before the wait, which shutdown may cut short.
                conn.flush().await?;
            }
            let read = conn.read_line(self.settings.max_line_length, self.settings.command_timeout);
            let read = match closing.as_mut() {
                Some(rx) => match shutdown::between_commands(read, rx).await {
                    Some(r) => r,
                    None => {
                        conn.reply(replies::SHUTTING_DOWN);
                        return Ok(Flow::Close);
                    }
                },
                None => read.await,
            };
            let line = match read {
                Ok(Line::Complete(l)) => l,
                Ok(Line::TooLong) => {
                    conn.reply(replies::LINE_TOO_LONG);
                    if self.count_error(conn, s) {
                        return Ok(Flow::Close);
                    }
                    continue;
                }
                Ok(Line::Eof) => return Ok(Flow::Close),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    conn.reply(replies::COMMAND_TIMEOUT);
                    return Ok(Flow::Close);
                }
                Err(e) => return Err(e),
            };
            let flow = self.command(conn, s, &line).await?;
            if !matches!(flow, Flow::Continue) {
                return Ok(flow);
            }
        }
    }

    /// Counts a protocol error; true when the session should end.
    fn count_error(&self, conn: &mut Conn, s: &mut Session) -> bool {
        s.errors += 1;
        if s.errors >= self.settings.max_errors {
            conn.reply(replies::TOO_MANY_ERRORS);
            return true;
        }
        false
    }

    async fn command(&self, conn: &mut Conn, s: &mut Session, line: &[u8]) -> std::io::Result<Flow> {
        // What smtp-proto's parser would get wrong on MAIL/RCPT (see `address`).
        if let Err(reply) = address::check_envelope_line(line) {
            conn.reply(&reply);
            return Ok(if self.count_error(conn, s) {
                Flow::Close
            } else {
                Flow::Continue
            });
        }
        let req = match Request::parse(&mut line.iter()) {
            Ok(r) => r,
            Err(e) => {
                conn.reply(&parse_error_reply(&e));
                return Ok(if self.count_error(conn, s) {
                    Flow::Close
                } else {
                    Flow::Continue
                });
            }
        };
        match req {
            Request::Ehlo { host } => {
                s.helo = Some(host.into_owned());
                s.esmtp = true;
                let t = s.reset_transaction();
                self.abort(t).await;
                let mut caps = vec![
                    format!("{} greets {}", self.settings.hostname, s.helo.as_deref().unwrap_or("")),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.settings.max_message_size),
                    "8BITMIME".into(),
                    "SMTPUTF8".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ];
                if self.tls.is_some() && !s.tls {
                    caps.push("STARTTLS".into());
                }
                if s.tls && s.auth_user.is_none() {
                    caps.push("AUTH PLAIN LOGIN".into());
                }
                let n = caps.len();
                for (i, c) in caps.iter().enumerate() {
                    conn.reply(&format!("250{}{}", if i + 1 == n { ' ' } else { '-' }, c));
                }
            }
            Request::Helo { host } | Request::Lhlo { host } => {
                s.helo = Some(host.into_owned());
                s.esmtp = false;
                let t = s.reset_transaction();
                self.abort(t).await;
                conn.reply(&format!("250 {}", self.settings.hostname));
            }
            Request::StartTls => {
                if s.tls {
                    conn.reply(replies::TLS_ALREADY_ACTIVE);
                } else if self.tls.is_none() {
                    conn.reply(replies::STARTTLS_UNAVAILABLE);
                } else {
                    conn.reply(replies::READY_FOR_TLS);
                    conn.discard_buffered();
                    return Ok(Flow::StartTls);
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                return self.auth(conn, s, mechanism, initial_response).await;
            }
            Request::Mail { from } => {
                let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
                self.mail(conn, s, from.address.as_ref(), from.size, smtputf8).await
            }
            Request::Rcpt { to } => self.rcpt(conn, s, to.address.as_ref()).await,
            Request::Data => return self.data(conn, s).await,
            Request::Rset => {
                let t = s.reset_transaction();
                self.abort(t).await;
                conn.reply(replies::OK);
            }
            Request::Noop { .. } => conn.reply(replies::OK),
            Request::Quit => {
                conn.reply(replies::BYE);
                return Ok(Flow::Close);
            }
            Request::Vrfy { .. } => conn.reply(replies::CANNOT_VRFY),
            Request::Help { .. } => conn.reply(replies::HELP),
            Request::Expn { .. } | Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                conn.reply(replies::NOT_IMPLEMENTED)
            }
            Request::Bdat { .. } => {
                // CHUNKING is not advertised; the chunk that follows cannot be parsed as commands.
                conn.reply(replies::BDAT_UNSUPPORTED);
                return Ok(Flow::Close);
            }
        }
        Ok(Flow::Continue)
    }

    async fn auth(
        &self,
        conn: &mut Conn,
        s: &mut Session,
        mechanism: u64,
        initial: Cow<'_, str>,
    ) -> std::io::Result<Flow> {
        if s.helo.is_none() || !s.esmtp {
            conn.reply(replies::EHLO_FIRST);
            return Ok(Flow::Continue);
        }
        if !s.tls {
            conn.reply(replies::AUTH_NEEDS_TLS);
            return Ok(Flow::Continue);
        }
        if s.auth_user.is_some() {
            conn.reply(replies::ALREADY_AUTHENTICATED);
            return Ok(Flow::Continue);
        }
        if s.mail_from.is_some() {
            conn.reply(replies::AUTH_IN_TRANSACTION);
            return Ok(Flow::Continue);
        }
        if self.auth_guard.locked_out(s.peer.ip(), crate::clock::now_ms()) {
            conn.reply(replies::ADDRESS_LOCKED_OUT);
            return Ok(Flow::Close);
        }
        let creds = match mechanism {
            AUTH_PLAIN => {
                let resp = if initial.is_empty() {
                    conn.reply(replies::AUTH_CONTINUE);
                    match self.read_auth_line(conn).await? {
                        Some(l) => l,
                        None => return Ok(Flow::Continue),
                    }
                } else {
                    initial.into_owned()
                };
                decode_plain(&resp)
            }
            AUTH_LOGIN => {
                let user = if initial.is_empty() {
                    conn.reply(replies::AUTH_LOGIN_USERNAME);
                    match self.read_auth_line(conn).await? {
                        Some(l) => l,
                        None => return Ok(Flow::Continue),
                    }
                } else {
                    initial.into_owned()
                };
                conn.reply(replies::AUTH_LOGIN_PASSWORD);
                let Some(pass) = self.read_auth_line(conn).await? else {
                    return Ok(Flow::Continue);
                };
                match (b64(&user), b64(&pass)) {
                    (Some(u), Some(p)) => Some((u, p)),
                    _ => None,
                }
            }
            _ => {
                conn.reply(replies::AUTH_MECHANISM_UNKNOWN);
                return Ok(Flow::Continue);
            }
        };
        let Some((user, pass)) = creds else {
            conn.reply(replies::AUTH_UNDECODABLE);
            return Ok(Flow::Continue);
        };
        let snap = self.config.get();
        match self.auth_guard.verify(&snap.secrets.inbound_users, &user, pass).await {
            Verdict::Authenticated { quota } => {
                s.auth_user = Some(user);
                s.user_quota = Some(quota);
                conn.reply(replies::AUTH_OK);
                return Ok(Flow::Continue);
            }
            Verdict::Busy => {
                conn.reply(replies::AUTH_TEMPORARY_FAILURE);
                return Ok(Flow::Continue);
            }
            Verdict::Refused => {}
        }
        s.auth_failures += 1;
        // Counted per address too, so reconnecting does not start afresh.
        let from_address = self.auth_guard.failed(s.peer.ip(), crate::clock::now_ms());
        let failures = s.auth_failures.max(from_address);
        self.observer.auth_failed(s.listener, s.peer.ip());
        if s.auth_failures >= self.settings.max_auth_failures || self.auth_guard.over_limit(from_address) {
            conn.reply(replies::TOO_MANY_AUTH_FAILURES);
            return Ok(Flow::Close);
        }
        if failures > self.settings.auth_failures_before_delay && !self.settings.auth_delay.is_zero() {
            conn.flush().await?;
            tokio::time::sleep(self.settings.auth_delay * (failures - self.settings.auth_failures_before_delay)).await;
        }
        conn.reply(replies::AUTH_INVALID);
        Ok(Flow::Continue)
    }

    /// A continuation line of AUTH; `None` (with the reply written) when cancelled or malformed.
    async fn read_auth_line(&self, conn: &mut Conn) -> std::io::Result<Option<String>> {
        match conn
            .read_line(self.settings.max_line_length, self.settings.command_timeout)
            .await?
        {
            Line::Complete(l) => {
                let l = String::from_utf8_lossy(&l).trim_end().to_owned();
                if l == "*" {
                    conn.reply(replies::AUTH_CANCELLED);
                    return Ok(None);
                }
                Ok(Some(l))
            }
            Line::TooLong => {
                conn.reply(replies::LINE_TOO_LONG);
                Ok(None)
            }
            Line::Eof => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }

    async fn mail(&self, conn: &mut Conn, s: &mut Session, from: &str, size: usize, smtputf8: bool) {
        if s.helo.is_none() {
            return conn.reply(replies::HELO_FIRST);
        }
        if s.mail_from.is_some() {
            return conn.reply(replies::SENDER_ALREADY_GIVEN);
        }
        if s.listener == ListenerKind::Submission && !s.tls {
            return conn.reply(replies::STARTTLS_FIRST);
        }
        if s.listener.requires_auth() && s.auth_user.is_none() {
            return conn.reply(replies::AUTH_REQUIRED);
        }
        if size > self.settings.max_message_size {
            return conn.reply(&format!(
                "552 5.3.4 Message size exceeds fixed maximum message size of {} bytes",
                self.settings.max_message_size
            ));
        }
        if !from.is_empty() && !valid_recipient(from) {
            return conn.reply(replies::BAD_SENDER_SYNTAX);
        }
        if !smtputf8 && !from.is_ascii() {
            return conn.reply(NEEDS_SMTPUTF8);
        }
        if address::wire_form(from).is_err() {
            return conn.reply(replies::SENDER_UNWRITABLE);
        }
        s.mail_from = Some(from.to_owned());
        s.smtputf8 = smtputf8;
        s.declared_size = size;
        let cfg = self.config.get();
        let ctx = SenderCtx {
            auth_user: s.auth_user.as_deref(),
            auth_quota: s.user_quota.as_deref(),
            mail_from: from,
            source_ip: s.peer.ip(),
        };
        match self.quotas.begin(&cfg.config, &ctx) {
            Ok(txn) => s.txn = Some(txn),
            Err(rej) => {
                self.observer.quota_decision(&rej.quota_id, "rejected");
                let r = reply_from_line(&rej.reply());
                self.observer.rejected(&s.sender(), None, &r);
                s.mail_from = None;
                return conn.reply(&r.to_string());
            }
        }
        conn.reply(replies::SENDER_OK);
    }

    async fn rcpt(&self, conn: &mut Conn, s: &mut Session, to: &str) {
        if s.mail_from.is_none() {
            return conn.reply(replies::NEED_MAIL);
        }
        if s.rcpts.len() >= self.settings.max_recipients {
            return conn.reply(replies::TOO_MANY_RECIPIENTS);
        }
        let sender = s.sender();
        if s.auth_user.is_none() && !may_relay_unauthenticated(s.listener, s.peer.ip(), &self.settings.relay_cidrs) {
            let r = Reply::new(554, "5.7.1 Relay access denied: authenticate first");
            self.observer.rejected(&sender, Some(to), &r);
            return conn.reply(&r.to_string());
        }
        if !valid_recipient(to) {
            return conn.reply(replies::BAD_RECIPIENT_SYNTAX);
        }
        if !s.smtputf8 && !to.is_ascii() {
            return conn.reply(NEEDS_SMTPUTF8);
        }
        if address::wire_form(to).is_err() {
            return conn.reply(replies::RECIPIENT_UNWRITABLE);
        }
        if let Some(txn) = s.txn.as_mut() {
            let decision = self.quotas.rcpt(txn, crate::clock::now_ms()).await;
            if let Some(r) = self.quota_reply(txn, decision) {
                self.observer.rejected(&sender, Some(to), &r);
                return conn.reply(&r.to_string());
            }
        }
        // Store U-label domains as A-labels: the form routes, MX lookups and servers without
        // SMTPUTF8 understand.
        s.rcpts.push(with_ascii_domain(to));
        conn.reply(replies::RECIPIENT_OK);
    }

    async fn data(&self, conn: &mut Conn, s: &mut Session) -> std::io::Result<Flow> {
        if s.mail_from.is_none() {
            conn.reply(replies::NEED_MAIL);
            return Ok(Flow::Continue);
        }
        if s.rcpts.is_empty() {
            conn.reply(replies::NO_VALID_RECIPIENTS);
            return Ok(Flow::Continue);
        }
        let max = self.settings.max_message_size;
        let Some(mut body) = self.body_budget.begin(s.declared_size, max) else {
            return Ok(self.refuse_for_memory(conn, s).await);
        };
        conn.reply(replies::START_DATA);
        let mut receiver = DataReceiver::new();
        loop {
            // Only as much as the body budget has room for; the rest on the next round.
            let available = conn.buffered().len();
            let n = body.room(available);
            let (used, done) = receiver.ingest(&conn.buffered()[..n], body.sink());
            conn.consume(used);
            body.check();
            if done {
                break;
            }
            if n < available {
                continue;
            }
            match conn.fill(self.settings.data_timeout).await {
                Ok(0) => return Ok(Flow::Close),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    conn.reply(replies::DATA_TIMEOUT);
                    return Ok(Flow::Close);
                }
                Err(e) => return Err(e),
            }
        }
        let end_of_data = Instant::now();
        let body = match body.finish() {
            Ok(b) => b,
            Err(body_budget::Refused::OverBudget) => return Ok(self.refuse_for_memory(conn, s).await),
            Err(body_budget::Refused::TooBig) => {
                let sender = s.sender();
                let txn = s.reset_transaction();
                self.abort(txn).await;
                let r = Reply::new(
                    552,
                    format!("5.3.4 Message size exceeds fixed maximum message size of {max} bytes"),
                );
                self.observer.rejected(&sender, None, &r);
                conn.reply(&r.to_string());
                return Ok(Flow::Continue);
            }
        };
        // The reservation is held until the body is freed, after the enqueue.
        let (body, _reserved) = body;
        let sender = s.sender();
        let rcpts = std::mem::take(&mut s.rcpts);
        let txn = s.reset_transaction();
        if receiver.saw_bare_line_ending() {
            // Refused, not normalised: see the `data` module.
            self.abort(txn).await;
            let r = Reply::new(
                554,
                "5.6.0 Bare CR or LF in the message: lines must end with CRLF (RFC 5321 section 2.3.8)",
            );
            self.observer.rejected(&sender, None, &r);
            conn.reply(&r.to_string());
            return Ok(Flow::Continue);
        }
        let reply = self.accept_message(s, sender, rcpts, body, end_of_data, txn).await;
        conn.reply(&reply.to_string());
        Ok(Flow::Continue)
    }

    /// `452 4.3.1`: the message does not fit in the body budget; the transaction ends.
    async fn refuse_for_memory(&self, conn: &mut Conn, s: &mut Session) -> Flow {
        let sender = s.sender();
        let txn = s.reset_transaction();
        self.abort(txn).await;
        let r = reply_from_line(body_budget::REPLY);
        self.observer.rejected(&sender, None, &r);
        conn.reply(&r.to_string());
        Flow::Continue
    }

    /// Metrics for a quota answer, and the reply when it refuses (`None`: accepted).
    fn quota_reply(
        &self,
        txn: &QuotaTxn,
        decision: Result<QuotaDecision, crate::inbound::quota::QuotaError>,
    ) -> Option<Reply> {
        let id = txn.quota_id().unwrap_or("none").to_owned();
        match decision {
            Ok(d) => {
                if txn.quota_id().is_some() {
                    self.observer.quota_decision(&id, d.result_label());
                }
                d.reply().map(|line| reply_from_line(&line))
            }
            Err(e) => {
                tracing::error!(error = %e, quota = %id, "quota store unavailable; deferring");
                Some(reply_from_line(UNAVAILABLE_REPLY))
            }
        }
    }

    async fn accept_message(
        &self,
        s: &Session,
        sender: SenderInfo,
        rcpts: Vec<String>,
        mut body: Vec<u8>,
        end_of_data: Instant,
        mut txn: Option<QuotaTxn>,
    ) -> Reply {
        let now = crate::clock::now();
        let options = match headers::extension_options(&body, now) {
            Ok(o) => o,
            Err(e) => {
                let r = Reply::new(550, format!("5.6.0 {e}"));
                self.observer.rejected(&sender, None, &r);
                self.abort(txn).await;
                return r;
            }
        };
        if let Some(t) = txn.as_mut() {
            let decision = self.quotas.data(t, &body, now.timestamp_millis()).await;
            if let Some(r) = self.quota_reply(t, decision) {
                self.observer.rejected(&sender, None, &r);
                self.abort(txn).await;
                return r;
            }
        }
        let quota = txn.as_ref().and_then(|t| t.quota_id().map(str::to_owned));
        let now_ms = now.timestamp_millis();
        let id = new_id(now_ms);
        let with = match (s.esmtp, s.tls, s.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let received = headers::received(
            s.helo.as_deref().unwrap_or("unknown"),
            &sender.source_ip.to_string(),
            &self.settings.hostname,
            with,
            &id,
            (rcpts.len() == 1).then(|| rcpts[0].as_str()),
            now,
        );
        // In place: a second copy of a large body is what the body budget cannot see.
        let message_id = headers::prepare_in_place(&mut body, &received, &self.settings.hostname, &id);
        let stored = body;
        let due = options.deliver_after_ms.filter(|t| *t > now_ms);
        let jobs: Vec<(Job, Option<i64>)> = (0..rcpts.len() as u32).map(|i| (Job::new(&id, i), due)).collect();
        let meta = MessageMeta {
            id: id.clone(),
            received_at_ms: now_ms,
            source_ip: sender.source_ip.to_string(),
            listener: s.listener.as_str().to_owned(),
            auth_user: sender.auth_user.clone(),
            tls: s.tls,
            mail_from: sender.mail_from.clone(),
            rcpts,
            message_id_header: Some(message_id),
            size: stored.len(),
            options,
            quota,
            is_dsn: false,
        };
        let enqueueing = self.body_budget.enqueue_permit(stored.len()).await;
        let enqueued = self.queue.enqueue(&meta, &stored, &jobs).await;
        drop((enqueueing, stored));
        match enqueued {
            Ok(()) => {
                // Accepted mail stays counted, even if it bounces later.
                if let Some(t) = txn {
                    t.commit();
                }
                self.observer.accepted(&meta, end_of_data.elapsed());
                Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
            }
            Err(e) => {
                tracing::error!(error = %e, "enqueue failed; message not accepted");
                let r = Reply::new(451, "4.3.0 Queue temporarily unavailable, try again later");
                self.observer.rejected(&sender, None, &r);
                self.abort(txn).await;
                r
            }
        }
    }
}

/// RFC 6531 §3.5: a non-ASCII address without SMTPUTF8 on MAIL.
const NEEDS_SMTPUTF8: &str = "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter (RFC 6531)";

fn parse_error_reply(e: &ProtoError) -> String {
    match e {
        ProtoError::UnknownCommand => "500 5.5.1 Command unrecognized".into(),
        ProtoError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".into(),
        ProtoError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax".into(),
        ProtoError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
        ProtoError::InvalidParameter { param } => format!("501 5.5.4 Invalid parameter {param}"),
        ProtoError::UnsupportedParameter { param } => {
            format!(
                "555 5.5.4 Unsupported parameter {}",
                param.chars().take(64).collect::<String>()
            )
        }
        ProtoError::ResponseTooLong => "500 5.5.2 Line too long".into(),
        ProtoError::NeedsMoreData { .. } | ProtoError::InvalidResponse { .. } => "500 5.5.2 Syntax error".into(),
    }
}

fn b64(s: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim()).ok()?;
    String::from_utf8(bytes).ok()
}

/// `authzid \0 authcid \0 password` (RFC 4616); the authzid must be empty or the same user.
fn decode_plain(resp: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(resp.trim()).ok()?;
    let mut parts = bytes.split(|&b| b == 0);
    let authz = parts.next()?;
    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
    if parts.next().is_some() || (!authz.is_empty() && authz != user.as_bytes()) {
        return None;
    }
    Some((user, pass))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_access_rule() {
        let cidrs: Vec<IpNet> = vec!["10.42.0.0/16".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(may_relay_unauthenticated(
            ListenerKind::Smtp,
            "10.42.3.4".parse().unwrap(),
            &cidrs
        ));
        assert!(may_relay_unauthenticated(
            ListenerKind::Smtp,
            "::ffff:10.42.3.4".parse().unwrap(),
            &cidrs
        ));
        assert!(!may_relay_unauthenticated(
            ListenerKind::Smtp,
            "10.43.0.1".parse().unwrap(),
            &cidrs
        ));
        assert!(!may_relay_unauthenticated(
            ListenerKind::Submission,
            "10.42.3.4".parse().unwrap(),
            &cidrs
        ));
        assert!(!may_relay_unauthenticated(
            ListenerKind::Smtps,
            "::1".parse().unwrap(),
            &cidrs
        ));
    }

    #[test]
    fn plain_auth_decoding() {
        let enc = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(decode_plain(&enc(b"\0shop\0pw")), Some(("shop".into(), "pw".into())));
        assert_eq!(
            decode_plain(&enc(b"shop\0shop\0pw")),
            Some(("shop".into(), "pw".into()))
        );
        assert_eq!(decode_plain(&enc(b"admin\0shop\0pw")), None);
        assert_eq!(decode_plain(&enc(b"shop-pw")), None);
        assert_eq!(decode_plain("!!!"), None);
    }

    #[test]
    fn recipient_syntax() {
        assert!(valid_recipient("a@example.com"));
        assert!(valid_recipient("a.b+c@sub.docomo.ne.jp"));
        assert!(!valid_recipient("postmaster"));
        assert!(!valid_recipient("@example.com"));
        assert!(!valid_recipient("a@-bad-.com"));
        assert!(!valid_recipient("a@[127.0.0.1]"));
    }

    #[test]
    fn parse_errors_have_enhanced_codes() {
        assert!(parse_error_reply(&ProtoError::UnknownCommand).starts_with("500 5.5.1"));
        assert!(parse_error_reply(&ProtoError::InvalidRecipientAddress).starts_with("501 5.1.3"));
    }
}
