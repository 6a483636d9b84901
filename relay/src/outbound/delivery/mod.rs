//! Outbound delivery: one attempt to hand one recipient's copy of a message to the next hop —
//! a route's smarthost or the recipient domain's MX hosts — reporting exactly what the remote
//! side said ([`AttemptResult`]).
//!
//! Owns: preparing the outgoing bytes (From override, then DKIM), choosing and connecting to the
//! next hop, pooled connection reuse with per-route limits (on the worker's path a stuck full
//! pool answers "come back at T" instead of waiting, so one stuck upstream cannot hold every
//! worker; see `pool`),
//! and the session timeouts the route sets (`DeliveryTarget::timeouts`), and refusing (temporarily)
//! to greet MX hosts with a name that is not fully qualified ([`mx_helo_problem`]). Must not schedule
//! retries, choose between routes, write the delivery log or build DSNs: the worker does that
//! from the [`AttemptResult`] (see [`AttemptResult::verdict`]). Nor does it know pacing: limits
//! shared with other relays (`maxConnections` across pods) reach it as a [`ConnectionGate`]
//! asked before each new connection ([`Deliverer::deliver_gated`]); the lease it grants lives
//! with the pooled session until the connection closes.
//!
//! Submodules: `resolve` (MX/address lookup, injectable), `rewrite` (From override, pure),
//! [`dkim`] (signing), `gate` (connection leases), `session` (a pooled connection of the
//! shared SMTP client, `mailroute_smtp::client`, with its lease), `pool`. TLS client
//! configurations come from `mailroute_tls`.

pub mod dkim;
pub(crate) mod gate;
mod pool;
pub(crate) mod resolve;
pub(crate) mod rewrite;
mod session;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use mailroute_api::config::{CompiledRoute, Credentials, RelaySecrets, SessionTimeouts, Target, Upstream};
use mailroute_api::route::TlsMode;
use sha2::{Digest, Sha256};

pub use self::dkim::{DkimError, DkimSigner};
pub use self::gate::{Admission, ConnectionGate, Lease, Slot, Ungated};
pub use self::resolve::{DnsError, HickoryResolver, MxRecord, MxResolver, StaticResolver};
use mailroute_tls as tls;
pub use mailroute_tls::TlsSetupError;

use self::pool::Pool;
use self::resolve::MxPlan;
use self::session::Session;
use crate::outbound::bounce::{self, BounceClass, Failure, Kind, Verdict};
use mailroute_smtp::{ErrorKind, OpenSpec, StepError, Timeouts, TlsUse};
pub use mailroute_smtp::{Reply, Stage};

pub use crate::queue::message::Envelope;

/// Settings of a [`Deliverer`], fixed for its lifetime.
#[derive(Debug, Clone)]
pub struct DelivererConfig {
    /// Our name in EHLO.
    pub helo_name: String,
    /// Idle pooled connections are closed after this.
    pub idle_timeout: Duration,
    /// Port of MX hosts (25; tests use another).
    pub mx_port: u16,
    /// Verify MX certificates against the system roots (off: opportunistic, any certificate).
    pub verify_mx_tls: bool,
    /// Connections per route (per route and domain for MX) when the route sets no limit.
    pub default_max_connections: u32,
    /// Messages per connection when the route sets no limit.
    pub default_messages_per_connection: u32,
    /// At most this many MX addresses are tried per attempt.
    pub max_mx_addresses: usize,
}

impl Default for DelivererConfig {
    fn default() -> Self {
        Self {
            helo_name: "localhost".into(),
            idle_timeout: Duration::from_secs(30),
            mx_port: 25,
            verify_mx_tls: false,
            default_max_connections: 10,
            default_messages_per_connection: 100,
            max_mx_addresses: 5,
        }
    }
}

/// Where and how one route delivers; built from a [`CompiledRoute`] and the secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryTarget {
    /// Route id `namespace/name` (pool key and log field).
    pub route_id: String,
    pub target: Target,
    /// Sender address forced on mail through this route.
    pub from_override: Option<String>,
    /// Extra CA bundle (PEM) trusted for this route's smarthost.
    pub custom_ca_pem: Option<String>,
    pub max_connections: Option<u32>,
    pub messages_per_connection: Option<u32>,
    /// Smarthost delivery to a recipient domain with connection limits of its own (the route's
    /// `perDestination`): its connections are pooled apart from the route's others, so each
    /// carries only mail the limits were granted for. MX pools are always per domain.
    pub connection_scope: Option<String>,
    /// How long each step of a session may take (the route's `timeouts`).
    pub timeouts: SessionTimeouts,
}

impl DeliveryTarget {
    pub fn from_route(route: &CompiledRoute, secrets: &RelaySecrets) -> Self {
        let custom_ca_pem = match &route.target {
            Target::Smarthost(up) if up.custom_ca => secrets.upstream_ca.get(&route.id).cloned(),
            _ => None,
        };
        Self {
            route_id: route.id.clone(),
            target: route.target.clone(),
            from_override: route.from_override.clone(),
            custom_ca_pem,
            max_connections: route.limits.max_connections,
            messages_per_connection: route.limits.messages_per_connection,
            connection_scope: None,
            timeouts: route.timeouts,
        }
    }

    /// Direct MX delivery with default limits and timeouts, for tests and tools. The relay's own
    /// fallback (`--fallback-mx`) is a compiled route the worker builds, delivered through
    /// [`DeliveryTarget::from_route`].
    pub fn direct_mx(route_id: impl Into<String>) -> Self {
        Self {
            route_id: route_id.into(),
            target: Target::Mx,
            from_override: None,
            custom_ca_pem: None,
            max_connections: None,
            messages_per_connection: None,
            connection_scope: None,
            timeouts: SessionTimeouts::default(),
        }
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The next hop accepted the message (its 2xx reply to the content).
    Delivered { reply: Reply },
    /// The server answered with a failure reply.
    Rejected { stage: Stage, reply: Reply },
    /// No reply: DNS, connection, timeout or TLS failure.
    Failed {
        stage: Stage,
        failure: Failure,
        detail: String,
    },
    /// The server broke the protocol or lacks what the route needs (e.g. the configured AUTH
    /// mechanism), or the route is misconfigured. Always temporary.
    Protocol {
        stage: Stage,
        class: BounceClass,
        detail: String,
    },
}

/// The result of [`Deliverer::deliver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    pub outcome: Outcome,
    /// Host name of the server that produced the outcome (MX host or smarthost).
    pub remote_host: Option<String>,
    pub remote_addr: Option<SocketAddr>,
    /// Whether the session was TLS-protected when the outcome happened.
    pub tls: bool,
    /// Whether a pooled connection carried the attempt.
    pub reused_connection: bool,
}

impl AttemptResult {
    pub fn is_delivered(&self) -> bool {
        matches!(self.outcome, Outcome::Delivered { .. })
    }

    /// The remote reply, if the server answered.
    pub fn reply(&self) -> Option<&Reply> {
        match &self.outcome {
            Outcome::Delivered { reply } | Outcome::Rejected { reply, .. } => Some(reply),
            _ => None,
        }
    }

    pub fn stage(&self) -> Stage {
        match &self.outcome {
            Outcome::Delivered { .. } => Stage::Message,
            Outcome::Rejected { stage, .. } | Outcome::Failed { stage, .. } | Outcome::Protocol { stage, .. } => *stage,
        }
    }

    /// Temporary or permanent, and the bounce class; `None` when delivered.
    pub fn verdict(&self) -> Option<Verdict> {
        match &self.outcome {
            Outcome::Delivered { .. } => None,
            // A 2xx/3xx where a failure was reported means an out-of-sequence reply.
            Outcome::Rejected { reply, .. } => {
                Some(bounce::classify_parsed(reply).unwrap_or(Verdict::new(Kind::Temporary, BounceClass::Other)))
            }
            Outcome::Failed { failure, .. } => Some(failure.verdict()),
            Outcome::Protocol { class, .. } => Some(Verdict::new(Kind::Temporary, *class)),
        }
    }

    /// One line for logs and DSNs: the reply, or what went wrong.
    pub fn summary(&self) -> String {
        match &self.outcome {
            Outcome::Delivered { reply } | Outcome::Rejected { reply, .. } => reply.to_string(),
            Outcome::Failed { stage, detail, .. } | Outcome::Protocol { stage, detail, .. } => {
                format!("{} ({})", detail, stage.as_str())
            }
        }
    }

    fn failed(stage: Stage, failure: Failure, detail: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Failed {
                stage,
                failure,
                detail: detail.into(),
            },
            remote_host: None,
            remote_addr: None,
            tls: false,
            reused_connection: false,
        }
    }

    /// Nothing was sent: the attempt stopped before connecting, for a reason of ours (its
    /// settings), which is always temporary.
    fn not_attempted(class: BounceClass, detail: String, remote_host: Option<String>) -> Self {
        Self {
            outcome: Outcome::Protocol {
                stage: Stage::Setup,
                class,
                detail,
            },
            remote_host,
            remote_addr: None,
            tls: false,
            reused_connection: false,
        }
    }

    fn from_step(e: StepError, host: &str, addr: SocketAddr, reused: bool) -> Self {
        let outcome = match e.kind {
            ErrorKind::Reply(reply) => Outcome::Rejected { stage: e.stage, reply },
            kind => {
                let detail = kind.detail();
                match no_reply_failure(&kind) {
                    Some(failure) => Outcome::Failed {
                        stage: e.stage,
                        failure,
                        detail,
                    },
                    None => Outcome::Protocol {
                        stage: e.stage,
                        class: if matches!(kind, ErrorKind::AuthNotOffered { .. } | ErrorKind::Auth(_)) {
                            BounceClass::AuthFailure
                        } else {
                            BounceClass::Other
                        },
                        detail,
                    },
                }
            }
        };
        Self {
            outcome,
            remote_host: Some(host.to_owned()),
            remote_addr: Some(addr),
            tls: e.tls,
            reused_connection: reused,
        }
    }
}

/// The failure a step error without a reply counts as; `None` for a protocol problem.
fn no_reply_failure(kind: &ErrorKind) -> Option<Failure> {
    Some(match kind {
        ErrorKind::Connect(_) => Failure::ConnectionRefused,
        ErrorKind::ConnectTimeout(_) | ErrorKind::TlsTimeout | ErrorKind::NoGreeting | ErrorKind::Timeout(_) => {
            Failure::Timeout
        }
        ErrorKind::Lost(_) => Failure::ConnectionLost,
        ErrorKind::TlsHandshake(_) | ErrorKind::Tls(_) | ErrorKind::StartTlsNotOffered => Failure::Tls,
        ErrorKind::Reply(_) | ErrorKind::AuthNotOffered { .. } | ErrorKind::Auth(_) | ErrorKind::Protocol(_) => {
            return None;
        }
    })
}

/// How an attempt gets a connection: `gate` is asked before a new one opens; `wait`: wait for
/// a free slot of the pool instead of returning [`NoSlot`].
#[derive(Clone, Copy)]
struct Entry<'a> {
    gate: &'a dyn ConnectionGate,
    wait: bool,
}

/// What goes out on the connection: the envelope after the From override and the prepared
/// message (overridden, signed).
#[derive(Clone, Copy)]
struct Outgoing<'a> {
    mail_from: &'a str,
    rcpt_to: &'a str,
    message: &'a [u8],
}

/// Applies the route's From override and DKIM signature, in that order. Returns the envelope
/// sender and the bytes to send.
pub fn prepare_message<'a>(
    target: &DeliveryTarget,
    dkim: Option<&DkimSigner>,
    env: &Envelope<'_>,
    body: &'a [u8],
) -> (String, Cow<'a, [u8]>) {
    let mut mail_from = env.mail_from.to_owned();
    let mut message = Cow::Borrowed(body);
    if let Some(new_from) = target.from_override.as_deref().filter(|f| !f.is_empty()) {
        mail_from = rewrite::override_envelope_sender(env.mail_from, new_from);
        message = Cow::Owned(rewrite::rewrite_from_header(body, new_from));
    }
    if let Some(signer) = dkim {
        match signer.sign(&message) {
            Ok(signed) => message = Cow::Owned(signed),
            // Only a message without any signable header fails here; it goes out unsigned.
            Err(e) => tracing::warn!(route = %target.route_id, error = %e, "DKIM signing failed; sending unsigned"),
        }
    }
    (mail_from, message)
}

/// [`Deliverer::deliver_gated`] got no connection slot: nothing was sent; try again at `at_ms`
/// (ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoSlot {
    pub at_ms: i64,
}

/// Counts of pooled connections, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub pools: usize,
    pub idle: usize,
    pub in_use: usize,
}

/// The outbound SMTP client with its connection pools. Cheap to clone; clones share pools.
#[derive(Clone)]
pub struct Deliverer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliverer")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

struct Inner {
    config: DelivererConfig,
    resolver: Arc<dyn MxResolver>,
    system_roots: rustls::RootCertStore,
    non_verifying: Arc<rustls::ClientConfig>,
    verifying_system: Arc<rustls::ClientConfig>,
    /// Verifying configs with a route's extra CA, by hash of the PEM.
    with_ca: Mutex<HashMap<String, Arc<rustls::ClientConfig>>>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    /// The refusal of an unqualified EHLO name for MX was logged once.
    warned_helo: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..12])
}

/// Why `helo_name` must not greet MX hosts, if it must not: direct MX delivery needs a fully
/// qualified name (at least two non-empty labels, e.g. the one the outbound IPs' reverse DNS
/// resolves to) or an address literal; a bare pod name or `localhost` is refused.
pub fn mx_helo_problem(helo_name: &str) -> Option<String> {
    let name = helo_name.trim();
    if name.starts_with('[') && name.ends_with(']') {
        return None;
    }
    let labels: Vec<&str> = name.strip_suffix('.').unwrap_or(name).split('.').collect();
    if labels.len() >= 2 && labels.iter().all(|l| !l.is_empty()) {
        return None;
    }
    Some(format!(
        "not delivering to MX hosts: EHLO name `{name}` is not a fully qualified domain name; \
         set --hostname (chart value relay.hostname) to the name the relay's outbound IP addresses resolve to"
    ))
}

/// How to reach the next hop when no pooled connection is available.
enum Hop<'a> {
    Smarthost {
        up: &'a Upstream,
        creds: Option<&'a Credentials>,
    },
    Mx {
        domain: &'a str,
    },
}

impl Deliverer {
    /// Builds a deliverer; reads the system trust anchors once. Inside a tokio runtime it also
    /// starts a task closing idle connections, which ends when the last clone is dropped.
    pub fn new(config: DelivererConfig, resolver: Arc<dyn MxResolver>) -> Result<Self, TlsSetupError> {
        let system_roots = tls::system_roots();
        let verifying_system = tls::verifying(&system_roots, None)?;
        let inner = Arc::new(Inner {
            non_verifying: tls::non_verifying()?,
            verifying_system,
            system_roots,
            resolver,
            with_ca: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            warned_helo: AtomicBool::new(false),
            config,
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(reaper(Arc::downgrade(&inner)));
        }
        Ok(Self { inner })
    }

    pub fn config(&self) -> &DelivererConfig {
        &self.inner.config
    }

    /// One delivery attempt of `body` to `env.rcpt_to` through `target`. `creds` are the route's
    /// upstream credentials and `dkim` its signer, if any. Waits for a free connection slot of
    /// the route in this process when all are busy (tools and tests; the worker uses
    /// [`Deliverer::deliver_gated`], which does not wait).
    pub async fn deliver(
        &self,
        target: &DeliveryTarget,
        creds: Option<&Credentials>,
        dkim: Option<&DkimSigner>,
        env: &Envelope<'_>,
        body: &[u8],
    ) -> AttemptResult {
        match self
            .deliver_with(
                target,
                creds,
                dkim,
                env,
                body,
                Entry {
                    gate: &Ungated,
                    wait: true,
                },
            )
            .await
        {
            Ok(r) => r,
            // `Ungated` never refuses; kept total instead of panicking.
            Err(NoSlot { .. }) => {
                AttemptResult::failed(Stage::Connect, Failure::ConnectionRefused, "no connection slot")
            }
        }
    }

    /// Like [`Deliverer::deliver`], asking `gate` before opening a new connection (a pooled one
    /// is reused without asking), and not waiting for a stuck pool: `Err` when the route's (or
    /// destination's) connections in this process are all in use and none came back lately
    /// (or none within a second), or the gate refuses, with the time to come back. Nothing was
    /// sent then. The worker's path: such a job goes back to the schedule instead of holding a
    /// worker.
    pub async fn deliver_gated(
        &self,
        target: &DeliveryTarget,
        creds: Option<&Credentials>,
        dkim: Option<&DkimSigner>,
        env: &Envelope<'_>,
        body: &[u8],
        gate: &dyn ConnectionGate,
    ) -> Result<AttemptResult, NoSlot> {
        self.deliver_with(target, creds, dkim, env, body, Entry { gate, wait: false })
            .await
    }

    async fn deliver_with(
        &self,
        target: &DeliveryTarget,
        creds: Option<&Credentials>,
        dkim: Option<&DkimSigner>,
        env: &Envelope<'_>,
        body: &[u8],
        entry: Entry<'_>,
    ) -> Result<AttemptResult, NoSlot> {
        let (mail_from, message) = prepare_message(target, dkim, env, body);
        let out = Outgoing {
            mail_from: &mail_from,
            rcpt_to: env.rcpt_to,
            message: &message,
        };
        match &target.target {
            Target::Smarthost(up) => {
                // A route that requires AUTH never sends without it (its credentials may be
                // missing from this relay's Secret, or be of a kind it cannot use yet).
                if let (Some(mechanism), None) = (up.auth, creds) {
                    return Ok(AttemptResult::not_attempted(
                        BounceClass::AuthFailure,
                        format!(
                            "route {}: no {mechanism:?} credentials for it in this relay's secrets; not sending without AUTH",
                            target.route_id
                        ),
                        Some(up.host.clone()),
                    ));
                }
                let key = self.smarthost_key(target, up, creds);
                let config = if up.pinned_sha256.is_empty() {
                    self.verifying_config(target.custom_ca_pem.as_deref())
                } else {
                    self.pinned_config(&up.pinned_sha256)
                };
                let tls_config = if up.verify_tls || !up.pinned_sha256.is_empty() {
                    match config {
                        Ok(c) => c,
                        Err(e) => {
                            return Ok(AttemptResult::not_attempted(
                                BounceClass::TlsFailure,
                                format!("route {}: {e}", target.route_id),
                                Some(up.host.clone()),
                            ));
                        }
                    }
                } else {
                    Arc::clone(&self.inner.non_verifying)
                };
                let pool = self.pool(&key, target, tls_config);
                let hop = Hop::Smarthost { up, creds };
                self.run(target, &pool, hop, entry, out).await
            }
            Target::Mx => {
                // Receivers check the EHLO name against our reverse DNS; a bare pod name gets
                // the mail rejected or scored as spam. Keep the mail queued until it is set.
                if let Some(problem) = mx_helo_problem(&self.inner.config.helo_name) {
                    if !self.inner.warned_helo.swap(true, Ordering::Relaxed) {
                        tracing::error!(route = %target.route_id, "{problem}");
                    }
                    return Ok(AttemptResult::not_attempted(
                        BounceClass::Other,
                        format!("route {}: {problem}", target.route_id),
                        None,
                    ));
                }
                let Some(domain) = mailroute_api::pattern::domain_of(env.rcpt_to) else {
                    return Ok(AttemptResult::failed(
                        Stage::Dns,
                        Failure::DnsNoSuchDomain,
                        format!("recipient `{}` has no domain", env.rcpt_to),
                    ));
                };
                let key = format!("{}|mx|{}", target.route_id, domain);
                let tls_config = if self.inner.config.verify_mx_tls {
                    Arc::clone(&self.inner.verifying_system)
                } else {
                    Arc::clone(&self.inner.non_verifying)
                };
                let pool = self.pool(&key, target, tls_config);
                let hop = Hop::Mx { domain: &domain };
                self.run(target, &pool, hop, entry, out).await
            }
        }
    }

    /// Pooled connection counts.
    pub fn stats(&self) -> PoolStats {
        let pools = lock(&self.inner.pools);
        PoolStats {
            pools: pools.len(),
            idle: pools.values().map(|p| p.idle_count()).sum(),
            in_use: pools.values().map(|p| p.in_use()).sum(),
        }
    }

    /// Closes idle connections older than the idle timeout now (the background task does this
    /// periodically, and renews the leases of the others) and forgets unused pools.
    pub async fn close_expired(&self) {
        let expired = self.inner.reap();
        for s in expired {
            s.quit().await;
        }
    }

    /// Sends QUIT on every idle connection and frees their connection slots (graceful shutdown).
    /// In-flight attempts finish normally.
    pub async fn close_idle(&self) {
        let sessions: Vec<Session> = lock(&self.inner.pools).values().flat_map(|p| p.drain()).collect();
        futures::future::join_all(sessions.into_iter().map(Session::quit)).await;
    }

    fn smarthost_key(&self, target: &DeliveryTarget, up: &Upstream, creds: Option<&Credentials>) -> String {
        // Everything that changes the session is in the key, so a reloaded route never reuses a
        // connection made with old settings. Credentials only as a digest.
        let fingerprint = digest(&[
            &up.host,
            &up.port.to_string(),
            &format!("{:?}", up.tls),
            &up.verify_tls.to_string(),
            up.server_name.as_deref().unwrap_or(""),
            &format!("{:?}", up.auth),
            creds.map(|c| c.username.as_str()).unwrap_or(""),
            creds.map(|c| c.password.as_str()).unwrap_or(""),
            target.custom_ca_pem.as_deref().unwrap_or(""),
            &up.pinned_sha256.join(","),
        ]);
        match &target.connection_scope {
            Some(scope) => format!("{}|smarthost|{}|{}", target.route_id, fingerprint, scope),
            None => format!("{}|smarthost|{}", target.route_id, fingerprint),
        }
    }

    fn verifying_config(&self, ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
        let Some(pem) = ca_pem else {
            return Ok(Arc::clone(&self.inner.verifying_system));
        };
        let id = digest(&[pem]);
        if let Some(c) = lock(&self.inner.with_ca).get(&id) {
            return Ok(Arc::clone(c));
        }
        let config = tls::verifying(&self.inner.system_roots, Some(pem))?;
        lock(&self.inner.with_ca).insert(id, Arc::clone(&config));
        Ok(config)
    }

    /// A config accepting only the certificates with these SHA-256 fingerprints (hex).
    fn pinned_config(&self, pins: &[String]) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
        let id = format!("pin|{}", pins.join(","));
        if let Some(c) = lock(&self.inner.with_ca).get(&id) {
            return Ok(Arc::clone(c));
        }
        let config = tls::pinned_hex(pins)?;
        lock(&self.inner.with_ca).insert(id, Arc::clone(&config));
        Ok(config)
    }

    fn pool(&self, key: &str, target: &DeliveryTarget, tls_config: Arc<rustls::ClientConfig>) -> Arc<Pool> {
        let c = &self.inner.config;
        let max = target.max_connections.unwrap_or(c.default_max_connections);
        let per_conn = target
            .messages_per_connection
            .unwrap_or(c.default_messages_per_connection);
        // Limits and timeouts are part of the key: a change starts a fresh pool.
        let timeouts = digest(&[&format!("{:?}", target.timeouts)]);
        let key = format!("{key}|{max}|{per_conn}|{timeouts}");
        let mut pools = lock(&self.inner.pools);
        Arc::clone(
            pools
                .entry(key)
                .or_insert_with(|| Arc::new(Pool::new(max, per_conn, tls_config))),
        )
    }

    async fn run(
        &self,
        target: &DeliveryTarget,
        pool: &Pool,
        hop: Hop<'_>,
        entry: Entry<'_>,
        out: Outgoing<'_>,
    ) -> Result<AttemptResult, NoSlot> {
        let Entry { gate, wait } = entry;
        let Outgoing {
            mail_from,
            rcpt_to,
            message,
        } = out;
        let slot = if wait {
            pool.acquire().await
        } else {
            Some(pool.acquire_or_come_back().await.map_err(|at_ms| NoSlot { at_ms })?)
        };
        let Some(_slot) = slot else {
            return Ok(AttemptResult::failed(
                Stage::Setup,
                Failure::ConnectionLost,
                "connection pool closed",
            ));
        };
        let idle_timeout = self.inner.config.idle_timeout;
        let mut fresh_only = false;
        loop {
            let (mut session, reused) = match self.checkout(pool, idle_timeout, fresh_only).await {
                Some(s) => (s, true),
                None => {
                    let mut lease = match gate.admit().await {
                        Admission::Open(lease) => lease,
                        Admission::Wait { at_ms } => {
                            // The slot may be held by an idle connection of this route in
                            // another of our pools (another MX domain): close one, ask again.
                            let Some(idle) = self.inner.take_leased(&target.route_id) else {
                                return Err(NoSlot { at_ms });
                            };
                            idle.quit().await;
                            match gate.admit().await {
                                Admission::Open(lease) => lease,
                                Admission::Wait { at_ms } => return Err(NoSlot { at_ms }),
                            }
                        }
                    };
                    let timeouts = Timeouts::from(&target.timeouts);
                    match gate::keep_alive(&mut lease, self.open(pool, &hop, timeouts)).await {
                        Ok(mut s) => {
                            s.lease = lease;
                            (s, false)
                        }
                        Err(result) => {
                            if let Some(l) = lease {
                                l.release().await;
                            }
                            return Ok(result);
                        }
                    }
                }
            };
            let mut lease = session.lease.take();
            let sent = gate::keep_alive(&mut lease, session.send(mail_from, rcpt_to, message)).await;
            session.lease = lease;
            match sent {
                Ok(reply) => {
                    let result = AttemptResult {
                        outcome: Outcome::Delivered { reply },
                        remote_host: Some(session.host.clone()),
                        remote_addr: Some(session.addr),
                        tls: session.tls,
                        reused_connection: reused,
                    };
                    self.check_in(pool, session).await;
                    return Ok(result);
                }
                Err(e) => {
                    let broken = no_reply_failure(&e.kind) == Some(Failure::ConnectionLost);
                    if reused && broken && !e.stage.content_sent() && !fresh_only {
                        // A pooled connection died under us before the content went out:
                        // once more on a fresh connection (its slot freed first).
                        tracing::debug!(host = %session.host, stage = e.stage.as_str(), "pooled connection broken; retrying on a new one");
                        session.discard().await;
                        fresh_only = true;
                        continue;
                    }
                    let result = AttemptResult::from_step(e.clone(), &session.host, session.addr, reused);
                    if e.session_usable() {
                        self.check_in(pool, session).await;
                    } else {
                        session.discard().await;
                    }
                    return Ok(result);
                }
            }
        }
    }

    /// An idle session, reset and alive (or clean and pipelining, see
    /// [`mailroute_smtp::Connection::ready_without_reset`]), unless `fresh_only`.
    async fn checkout(&self, pool: &Pool, idle_timeout: Duration, fresh_only: bool) -> Option<Session> {
        if fresh_only {
            return None;
        }
        loop {
            let (session, expired) = pool.take_idle(idle_timeout);
            for s in expired {
                close(s).await;
            }
            let mut session = session?;
            if session.ready_without_reset() {
                return Some(session);
            }
            match session.reset().await {
                Ok(()) => return Some(session),
                Err(e) => {
                    tracing::debug!(host = %session.host, error = ?e.kind, "dropping stale pooled connection");
                    session.discard().await;
                }
            }
        }
    }

    async fn check_in(&self, pool: &Pool, session: Session) {
        if let Some(spent) = pool.put_idle(session) {
            close(spent).await;
        }
    }

    async fn open(&self, pool: &Pool, hop: &Hop<'_>, timeouts: Timeouts) -> Result<Session, AttemptResult> {
        match hop {
            Hop::Smarthost { up, creds } => self.open_smarthost(pool, up, *creds, timeouts).await,
            Hop::Mx { domain } => self.open_mx(pool, domain, timeouts).await,
        }
    }

    async fn open_smarthost(
        &self,
        pool: &Pool,
        up: &Upstream,
        creds: Option<&Credentials>,
        timeouts: Timeouts,
    ) -> Result<Session, AttemptResult> {
        let name = up.server_name.as_deref().unwrap_or(&up.host);
        let server_name = tls::server_name(name)
            .map_err(|e| AttemptResult::not_attempted(BounceClass::TlsFailure, e.to_string(), Some(up.host.clone())))?;
        // Smarthost names go through the system resolver (getaddrinfo): /etc/hosts and the
        // cluster's search domains apply, as for any in-cluster client. Only MX delivery uses
        // the injected resolver.
        let addrs: Vec<SocketAddr> = match up.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, up.port)],
            Err(_) => {
                let lookup = tokio::net::lookup_host((up.host.as_str(), up.port));
                match tokio::time::timeout(timeouts.connect, lookup).await {
                    Ok(Ok(addrs)) => addrs.collect(),
                    Ok(Err(e)) => {
                        let mut r =
                            AttemptResult::failed(Stage::Dns, Failure::DnsTemporary, format!("{}: {e}", up.host));
                        r.remote_host = Some(up.host.clone());
                        return Err(r);
                    }
                    Err(_) => {
                        let mut r = AttemptResult::failed(
                            Stage::Dns,
                            Failure::DnsTemporary,
                            format!("{}: lookup timed out", up.host),
                        );
                        r.remote_host = Some(up.host.clone());
                        return Err(r);
                    }
                }
            }
        };
        let tls_use = match up.tls {
            TlsMode::None => TlsUse::Plain,
            TlsMode::Starttls => TlsUse::RequireStartTls,
            TlsMode::Implicit => TlsUse::Implicit,
        };
        let mut last = None;
        for addr in addrs {
            let spec = OpenSpec {
                host: &up.host,
                addr,
                tls: tls_use,
                tls_config: Arc::clone(&pool.tls_config),
                server_name: server_name.clone(),
                helo: &self.inner.config.helo_name,
                auth: creds.map(|c| (c, up.auth)),
                timeouts,
            };
            match Session::open(spec).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    // Another address only helps when this one could not be reached.
                    let unreachable = matches!(
                        no_reply_failure(&e.kind),
                        Some(Failure::ConnectionRefused | Failure::Timeout)
                    ) && e.stage == Stage::Connect;
                    last = Some(AttemptResult::from_step(e, &up.host, addr, false));
                    if !unreachable {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            let mut r = AttemptResult::failed(Stage::Dns, Failure::DnsTemporary, format!("{}: no address", up.host));
            r.remote_host = Some(up.host.clone());
            r
        }))
    }

    async fn open_mx(&self, pool: &Pool, domain: &str, timeouts: Timeouts) -> Result<Session, AttemptResult> {
        let resolver = &self.inner.resolver;
        let records = match resolver.mx(domain).await {
            Ok(r) => r,
            Err(DnsError::NoRecords(_)) => vec![],
            Err(e @ DnsError::NoSuchDomain(_)) => {
                return Err(AttemptResult::failed(
                    Stage::Dns,
                    Failure::DnsNoSuchDomain,
                    e.to_string(),
                ));
            }
            Err(e @ DnsError::Temporary { .. }) => {
                return Err(AttemptResult::failed(Stage::Dns, Failure::DnsTemporary, e.to_string()));
            }
        };
        let hosts = match resolve::mx_hosts(domain, records) {
            MxPlan::NullMx => {
                return Err(AttemptResult::failed(
                    Stage::Dns,
                    Failure::DnsNoSuchDomain,
                    format!("{domain} accepts no mail (null MX)"),
                ));
            }
            MxPlan::Hosts(h) => h,
        };
        let config = &self.inner.config;
        let mut tried = 0usize;
        let mut last: Option<AttemptResult> = None;
        let mut dns_temporary = false;
        'hosts: for host in &hosts {
            let ips = match resolver.ips(host).await {
                Ok(ips) => ips,
                Err(e) => {
                    dns_temporary |= matches!(e, DnsError::Temporary { .. });
                    continue;
                }
            };
            let server_name = match tls::server_name(host) {
                Ok(n) => n,
                Err(_) => continue,
            };
            for ip in ips {
                if tried >= config.max_mx_addresses {
                    break 'hosts;
                }
                tried += 1;
                let addr = SocketAddr::new(ip, config.mx_port);
                let spec = |tls| OpenSpec {
                    host,
                    addr,
                    tls,
                    tls_config: Arc::clone(&pool.tls_config),
                    server_name: server_name.clone(),
                    helo: &config.helo_name,
                    auth: None,
                    timeouts,
                };
                match Session::open(spec(TlsUse::Opportunistic)).await {
                    Ok(s) => return Ok(s),
                    Err(e) if e.is_tls_handshake() && !config.verify_mx_tls => {
                        // Opportunistic TLS: a broken handshake falls back to plain text.
                        tracing::debug!(host, error = ?e.kind, "STARTTLS handshake failed; retrying without TLS");
                        match Session::open(spec(TlsUse::Plain)).await {
                            Ok(s) => return Ok(s),
                            Err(e) => last = Some(AttemptResult::from_step(e, host, addr, false)),
                        }
                    }
                    Err(e) => last = Some(AttemptResult::from_step(e, host, addr, false)),
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            let failure = if dns_temporary {
                Failure::DnsTemporary
            } else {
                Failure::DnsNoSuchDomain
            };
            AttemptResult::failed(
                Stage::Dns,
                failure,
                format!("no address for the mail hosts of {domain}: {}", hosts.join(", ")),
            )
        }))
    }
}

/// Closes a session leaving the pool. One holding a lease is closed before the caller goes on,
/// so its slot is free for the next connection (a QUIT in the background would still hold it);
/// others close in the background.
async fn close(s: Session) {
    if s.lease.is_some() {
        s.quit().await;
    } else {
        tokio::spawn(s.quit());
    }
}

impl Inner {
    /// Expired idle sessions of every pool; forgets pools unused for a while.
    fn reap(&self) -> Vec<Session> {
        let idle_timeout = self.config.idle_timeout;
        let mut pools = lock(&self.pools);
        let expired: Vec<Session> = pools.values().flat_map(|p| p.reap(idle_timeout)).collect();
        pools.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_unused_for(idle_timeout * 2));
        expired
    }

    /// An idle session of `route_id` holding a lease, from any of its pools.
    fn take_leased(&self, route_id: &str) -> Option<Session> {
        let pools = lock(&self.pools);
        pools
            .iter()
            .filter(|(key, _)| key.split('|').next() == Some(route_id))
            .find_map(|(_, p)| p.take_leased())
    }

    /// Idle sessions whose lease is due for renewal, with their pools.
    fn due_leases(&self, now_ms: i64) -> Vec<(Arc<Pool>, Session)> {
        let pools = lock(&self.pools);
        pools
            .values()
            .flat_map(|p| p.take_due(now_ms).into_iter().map(|s| (Arc::clone(p), s)))
            .collect()
    }
}

async fn reaper(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        // At least every minute, so idle connections' leases are renewed in time.
        Some(i) => (i.config.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(60)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let expired = inner.reap();
        let due = inner.due_leases(crate::clock::now_ms());
        drop(inner);
        for s in expired {
            tokio::spawn(s.quit());
        }
        // Idle connections keep their slot: renew before the lease runs out.
        for (pool, mut s) in due {
            if let Some(l) = s.lease.as_mut() {
                l.renew_if_due(crate::clock::now_ms()).await;
            }
            pool.put_back(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(from_override: Option<&str>) -> DeliveryTarget {
        DeliveryTarget {
            from_override: from_override.map(String::from),
            ..DeliveryTarget::direct_mx("mail/r")
        }
    }

    #[test]
    fn mx_needs_a_fully_qualified_helo_name() {
        for ok in ["mail.example.com", "relay.test.", "[192.0.2.1]", "[IPv6:2001:db8::1]"] {
            assert_eq!(mx_helo_problem(ok), None, "{ok}");
        }
        for bad in ["mailroute-relay-7d9f8c-x2k4q", "localhost", "", ".", "a..b", ".example"] {
            let p = mx_helo_problem(bad).expect(bad);
            assert!(p.contains("relay.hostname"), "{p}");
        }
    }

    #[test]
    fn prepare_applies_override_then_dkim() {
        let env = Envelope {
            mail_from: "app@shop.example",
            rcpt_to: "a@b.example",
        };
        let body = b"From: Shop <app@shop.example>\r\nSubject: s\r\n\r\nhi\r\n";
        let (from, msg) = prepare_message(&target(None), None, &env, body);
        assert_eq!(from, "app@shop.example");
        assert_eq!(&*msg, body.as_slice());

        let signer = DkimSigner::new("relay.example", "sel", dkim::tests::ED25519_PEM).expect("key");
        let (from, msg) = prepare_message(&target(Some("noreply@relay.example")), Some(&signer), &env, body);
        assert_eq!(from, "noreply@relay.example");
        let text = String::from_utf8_lossy(&msg);
        assert!(text.starts_with("DKIM-Signature: "), "{text}");
        assert!(text.contains("From: Shop <noreply@relay.example>\r\nReply-To: Shop <app@shop.example>\r\n"));

        let bounce = Envelope {
            mail_from: "",
            rcpt_to: "a@b.example",
        };
        let (from, _) = prepare_message(&target(Some("noreply@relay.example")), None, &bounce, body);
        assert_eq!(from, "", "a bounce keeps the null sender");
    }

    #[test]
    fn verdicts_follow_the_outcome() {
        let base = AttemptResult::failed(Stage::Connect, Failure::ConnectionRefused, "refused");
        assert_eq!(base.verdict(), Some(Verdict::new(Kind::Temporary, BounceClass::Other)));
        let rejected = AttemptResult {
            outcome: Outcome::Rejected {
                stage: Stage::RcptTo,
                reply: Reply::new(550, "5.1.1 User unknown"),
            },
            ..base.clone()
        };
        assert_eq!(
            rejected.verdict(),
            Some(Verdict::new(Kind::Permanent, BounceClass::InvalidRecipient))
        );
        assert_eq!(rejected.summary(), "550 5.1.1 User unknown");
        let auth = AttemptResult {
            outcome: Outcome::Rejected {
                stage: Stage::Auth,
                reply: Reply::new(535, "5.7.8 Username and password not accepted."),
            },
            ..base.clone()
        };
        assert_eq!(auth.verdict().map(|v| v.class), Some(BounceClass::AuthFailure));
        let delivered = AttemptResult {
            outcome: Outcome::Delivered {
                reply: Reply::new(250, "2.0.0 OK"),
            },
            ..base.clone()
        };
        assert_eq!(delivered.verdict(), None);
        assert!(delivered.is_delivered());
        let odd = AttemptResult {
            outcome: Outcome::Rejected {
                stage: Stage::Data,
                reply: Reply::new(250, "OK"),
            },
            ..base
        };
        assert_eq!(odd.verdict(), Some(Verdict::new(Kind::Temporary, BounceClass::Other)));
    }

    #[test]
    fn target_from_route_takes_the_ca_only_when_flagged() {
        let up = Upstream {
            host: "smtp.example".into(),
            port: 587,
            tls: TlsMode::Starttls,
            verify_tls: true,
            server_name: None,
            auth: None,
            custom_ca: true,
            pinned_sha256: Vec::new(),
        };
        let route = CompiledRoute {
            id: "mail/r".into(),
            priority: 1,
            target: Target::Smarthost(up.clone()),
            recipient_domains: vec![mailroute_api::pattern::DomainPattern::Any],
            senders: Default::default(),
            from_override: Some("x@y.example".into()),
            limits: mailroute_api::config::RouteLimits {
                max_connections: Some(3),
                messages_per_connection: Some(7),
                ..Default::default()
            },
            retry: Default::default(),
            dkim: None,
            test_recipient: None,
            timeouts: Default::default(),
        };
        let mut secrets = RelaySecrets::default();
        secrets.upstream_ca.insert("mail/r".into(), "PEM".into());
        let t = DeliveryTarget::from_route(&route, &secrets);
        assert_eq!(t.custom_ca_pem.as_deref(), Some("PEM"));
        assert_eq!((t.max_connections, t.messages_per_connection), (Some(3), Some(7)));
        assert_eq!(t.from_override.as_deref(), Some("x@y.example"));
        let mut plain = route.clone();
        plain.target = Target::Smarthost(Upstream { custom_ca: false, ..up });
        assert_eq!(DeliveryTarget::from_route(&plain, &secrets).custom_ca_pem, None);
    }
}
