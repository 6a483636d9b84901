//! The inbound SMTP session: EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA with the limits and
//! replies of a relay that is never open. A message is answered `250` only after the queue
//! acknowledged it.
//!
//! This module owns the protocol state machine and the relay-access decision. Sender policy and
//! quota arithmetic are the quota engine's ([`super::quota`]), consulted at MAIL, RCPT and the end
//! of DATA; logging and metrics go out through [`Observer`]. What a session may cost is bounded
//! outside it: password checks and AUTH failures per address by [`super::auth_guard`], body
//! memory by `super::body_budget`. It must not deliver or route. Who the sender is in
//! Kubernetes terms (its namespace) is settled at MAIL by `super::identity`. Whether a
//! recipient is suppressed is `crate::suppress`'s answer (in memory), asked at RCPT and once
//! more by the enqueue.
//! DATA transparency (a message with a bare CR or LF is refused) is `super::data`'s; raw
//! MAIL/RCPT line checks and the RFC 5321 form of addresses are `super::address`'s.
//!
//! Submodules, one per SMTP verb group: `greeting` (EHLO, HELO, STARTTLS), `auth` (AUTH),
//! `envelope` (MAIL, RCPT and the relay-access rule), `message` (DATA and the hand-off to the
//! queue). This file keeps the session state, the connection's life and the command loop.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use smtp_proto::{Error as ProtoError, MAIL_SMTPUTF8, Request};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

mod auth;
mod envelope;
mod greeting;
mod message;

use crate::config::ConfigHandle;
use crate::inbound::address;
use crate::inbound::auth_guard::{AuthGuard, AuthLimits};
use crate::inbound::body_budget::BodyBudget;
use crate::inbound::identity::{IdentitySource, Nobody, SenderIdentity, Unattributed};
use crate::inbound::listener::{Conn, Line, ListenerKind, MaybeTls};
use crate::inbound::quota::{QuotaDecision, QuotaEngine, QuotaTxn, unavailable_reply};
use crate::inbound::{proxy, replies, shutdown};
use crate::observe::metrics::Metrics;
use crate::queue::Queue;
use crate::queue::message::MessageMeta;

/// How long a connection from a PROXY protocol source may take to send its header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub use mailroute_smtp::Reply;

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
    /// The sender's namespace, once MAIL settled it; `None`: unattributed (or not yet known).
    pub namespace: Option<String>,
    /// The sender's ServiceAccount, where known.
    pub service_account: Option<String>,
}

/// Where the session reports what happened (delivery log, metrics).
pub trait Observer: Send + Sync {
    fn session_opened(&self, _listener: ListenerKind) {}
    fn session_closed(&self, _listener: ListenerKind) {}
    fn auth_failed(&self, _listener: ListenerKind, _ip: IpAddr) {}
    /// A message was queued (`accept_latency` = end of DATA to the 250).
    fn accepted(&self, _meta: &MessageMeta, _accept_latency: Duration) {}
    /// The `received`/`scheduled` records of a message about to be queued, for a queue that
    /// stores them with its commit ([`Queue::stores_log`]); empty: [`Observer::accepted`] stores them.
    fn accept_records(&self, _meta: &MessageMeta) -> Vec<crate::observe::dlog::Encoded> {
        Vec::new()
    }
    /// [`Observer::accepted`] for a message whose `records` the queue's commit stored: reported
    /// (line, metrics) but not stored again.
    fn accepted_stored(
        &self,
        _meta: &MessageMeta,
        _accept_latency: Duration,
        _records: &[crate::observe::dlog::Encoded],
    ) {
    }
    /// A recipient or message was refused with `reply` (rcpt None = whole message).
    fn rejected(&self, _s: &SenderInfo, _rcpt: Option<&str>, _reply: &Reply) {}
    /// A quota answered (`accepted`, `deferred`, `rejected`) for a sender of `namespace`.
    fn quota_decision(&self, _quota: &str, _result: &str, _namespace: Option<&str>) {}
    /// Recipient `rcpt_index` of an accepted message was not queued: it is on the list of
    /// `scope` (reported after [`Observer::accepted`]).
    fn suppressed(&self, _meta: &MessageMeta, _rcpt_index: usize, _scope: &crate::suppress::Scope) {}
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
    /// What happens to mail whose sender's namespace is unknown.
    pub unattributed: Unattributed,
    /// Load balancers whose connections begin with a PROXY protocol header (v1 or v2) naming
    /// the client, whose address then replaces theirs for every rule. Connections from other
    /// addresses are taken as direct; a header is accepted from nobody else.
    pub proxy_protocol_from: Vec<IpNet>,
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
            unattributed: Unattributed::default(),
            proxy_protocol_from: Vec::new(),
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
    /// Who an unauthenticated client's address belongs to.
    identity: Arc<dyn IdentitySource>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    auth_guard: AuthGuard,
    body_budget: Arc<BodyBudget>,
    /// Turns true when the relay shuts down: sessions waiting for a command then end.
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
    /// The suppression lists (none with the memory queue).
    suppress: Option<Arc<crate::suppress::Suppressions>>,
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

pub use envelope::may_relay_unauthenticated;

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
    /// The namespace of the authenticated user (its SenderQuota's).
    user_namespace: Option<String>,
    /// The sender of the open transaction, settled at MAIL; `None`: unattributed.
    identity: Option<SenderIdentity>,
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
        self.identity = None;
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
            namespace: self.identity.as_ref().map(|i| i.namespace.clone()),
            service_account: self.identity.as_ref().and_then(|i| i.service_account.clone()),
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
            identity: Arc::new(Nobody),
            per_ip: Mutex::new(HashMap::new()),
            shutdown: None,
            suppress: None,
        }
    }

    /// Reports the AUTH and body-memory gauges into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.auth_guard = AuthGuard::new(self.settings.auth_limits.clone(), metrics.clone());
        self.body_budget = BodyBudget::new(self.settings.body_budget(), self.settings.max_message_size, metrics);
        self
    }

    /// Attributes unauthenticated clients to namespaces with `source` (default: nobody is known).
    pub(crate) fn with_identity(mut self, source: Arc<dyn IdentitySource>) -> Self {
        self.identity = source;
        self
    }

    /// Checks recipients against the suppression lists (RCPT, and the enqueue's backstop).
    pub fn with_suppressions(mut self, lists: Arc<crate::suppress::Suppressions>) -> Self {
        self.suppress = Some(lists);
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

    async fn handle_inner(&self, mut tcp: TcpStream, peer: SocketAddr, listener: ListenerKind) -> std::io::Result<()> {
        let peer = if self.settings.proxy_protocol_from.iter().any(|n| n.contains(&peer.ip())) {
            let header = tokio::time::timeout(PROXY_HEADER_TIMEOUT, proxy::read_header(&mut tcp)).await;
            match header.map(|h| h.and_then(|h| proxy::source_of(&h))) {
                Ok(Ok(source)) => source.peer(),
                Ok(Err(e)) => {
                    tracing::warn!(proxy = %peer, error = %e, "connection from a PROXY protocol source refused");
                    if listener != ListenerKind::Smtps {
                        let _ = tcp
                            .write_all(format!("{}\r\n", replies::PROXY_HEADER_REQUIRED).as_bytes())
                            .await;
                    }
                    return Ok(());
                }
                Err(_) => {
                    tracing::warn!(proxy = %peer, "no PROXY protocol header in time; connection closed");
                    return Ok(());
                }
            }
        } else {
            peer
        };
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
            user_namespace: None,
            identity: None,
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
            Request::Ehlo { host } => self.ehlo(conn, s, host.into_owned()).await,
            Request::Helo { host } | Request::Lhlo { host } => self.helo(conn, s, host.into_owned()).await,
            Request::StartTls => {
                if self.starttls(conn, s) {
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

    /// Metrics for a quota answer, and the reply when it refuses (`None`: accepted).
    fn quota_reply(
        &self,
        txn: &QuotaTxn,
        namespace: Option<&str>,
        decision: Result<QuotaDecision, crate::inbound::quota::QuotaError>,
    ) -> Option<Reply> {
        let id = txn.quota_id().unwrap_or("none").to_owned();
        match decision {
            Ok(d) => {
                // A refusal is the refusing quota's; an acceptance the transaction's first.
                let quota = match &d {
                    QuotaDecision::Defer(x) | QuotaDecision::Reject(x) => Some(x.quota_id.as_str()),
                    QuotaDecision::Accept => txn.quota_id(),
                };
                if let Some(q) = quota {
                    self.observer.quota_decision(q, d.result_label(), namespace);
                }
                d.reply()
            }
            Err(e) => {
                tracing::error!(error = %e, quota = %id, "quota store unavailable; deferring");
                Some(unavailable_reply())
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole session over TCP with a source that knows the client's address: the queued
    /// message carries the pod's namespace and ServiceAccount; an authenticated session would
    /// carry its user's (see `identity::resolve`).
    #[tokio::test]
    async fn an_unauthenticated_client_is_attributed_by_the_identity_source() {
        use crate::inbound::quota::MemoryQuotaStore;
        use crate::queue::memory::MemoryQueue;

        struct Pods;
        impl IdentitySource for Pods {
            fn identify(&self, ip: IpAddr) -> Option<SenderIdentity> {
                ip.is_loopback().then(|| SenderIdentity {
                    namespace: "team-b".into(),
                    service_account: Some("mailer".into()),
                })
            }
        }
        let queue = Arc::new(MemoryQueue::new());
        let config = mailroute_api::Manifests::from_yaml(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {name: mx, namespace: mailroute}\nspec: {delivery: mx}\n",
            "mailroute",
        )
        .unwrap()
        .compile();
        let inbound = Arc::new(
            Inbound::new(
                InboundSettings {
                    unattributed: Unattributed::Refuse,
                    ..InboundSettings::default()
                },
                Arc::new(ConfigHandle::fixed(config.config, config.secrets)),
                queue.clone(),
                QuotaEngine::new(Arc::new(MemoryQuotaStore::new())),
                Arc::new(NoopObserver),
                None,
            )
            .with_identity(Arc::new(Pods)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = {
            let inbound = inbound.clone();
            tokio::spawn(async move {
                let (tcp, peer) = listener.accept().await.unwrap();
                inbound.handle(tcp, peer, ListenerKind::Smtp).await
            })
        };
        let t = mailroute_testkit::smtp::client::send(
            addr,
            None,
            false,
            None,
            "app@b.example",
            &["x@example.com"],
            b"Subject: hi\r\n\r\nhi\r\n",
        )
        .await
        .unwrap();
        assert!(t.delivered(), "{:?}", t.lines());
        server.await.unwrap().unwrap();
        let id = t
            .lines()
            .iter()
            .find_map(|l| l.strip_prefix("250 2.0.0 Ok: queued as ").map(str::to_owned))
            .expect("a queue id");
        let stored = queue.load(&id).await.unwrap().expect("queued");
        assert_eq!(stored.meta.namespace.as_deref(), Some("team-b"));
        assert_eq!(stored.meta.service_account.as_deref(), Some("mailer"));
    }

    #[test]
    fn parse_errors_have_enhanced_codes() {
        assert!(parse_error_reply(&ProtoError::UnknownCommand).starts_with("500 5.5.1"));
        assert!(parse_error_reply(&ProtoError::InvalidRecipientAddress).starts_with("501 5.1.3"));
    }
}
