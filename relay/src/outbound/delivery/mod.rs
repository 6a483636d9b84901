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
//! from the [`AttemptResult`] (see [`AttemptResult::verdict`] and [`AttemptResult::is_permanent`]),
//! the relay's one attempt-outcome type. Nor does it know pacing: limits
//! shared with other relays (`maxConnections` across pods) reach it as a [`ConnectionGate`]
//! asked before each new connection ([`Deliverer::deliver_gated`]); the lease it grants lives
//! with the pooled session until the connection closes.
//!
//! Submodules: `resolve` (MX/address lookup, injectable), `rewrite` (From override, pure),
//! [`dkim`] (signing), `gate` (connection leases), `session` (a pooled connection of the
//! shared SMTP client, `mailroute_smtp::client`, with its lease), `pool`, `outcome` (what an
//! attempt came to and its verdict), `connect` (the next hop: TLS configuration, pool choice,
//! opening a smarthost or MX connection), `transaction` (preparing the bytes and running one
//! transaction on a pooled or new connection), `idle` (idle connections: reaping, lease
//! renewal, closing at shutdown). This file keeps the deliverer, its settings and its entry
//! points. TLS client configurations come from `mailroute_tls`.

mod connect;
pub mod dkim;
pub(crate) mod gate;
mod idle;
mod outcome;
mod pool;
pub(crate) mod resolve;
pub(crate) mod rewrite;
mod session;
mod transaction;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mailroute_api::config::{CompiledRoute, Credentials, RelaySecrets, SessionTimeouts, Target};
use sha2::{Digest, Sha256};

pub use self::dkim::{DkimError, DkimSigner};
pub use self::gate::{Admission, ConnectionGate, Lease, Slot, Ungated};
pub use self::resolve::{DnsError, HickoryResolver, MxRecord, MxResolver, StaticResolver};
use mailroute_tls as tls;
pub use mailroute_tls::TlsSetupError;

use self::connect::Hop;
use self::idle::reaper;
use self::pool::Pool;
use self::transaction::{Entry, Outgoing};
use crate::outbound::bounce::{BounceClass, Failure};
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

pub use self::connect::mx_helo_problem;
pub use self::outcome::{AttemptResult, Outcome};
pub use self::transaction::prepare_message;

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
    /// Pool key parts already computed (see `connect::KeyMemo`).
    key_memo: Mutex<connect::KeyMemo>,
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
            key_memo: Mutex::default(),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_api::config::Upstream;
    use mailroute_api::route::TlsMode;

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
            authority: Default::default(),
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
            suspended: false,
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

    /// The pool key parts are remembered, never stale: the same settings give the same key as
    /// computed afresh, and any change that alters a session (credentials, TLS, timeouts,
    /// limits, the destination scope) gives another key and so another pool.
    #[tokio::test]
    async fn remembered_pool_keys_follow_every_setting() {
        let d = Deliverer::new(DelivererConfig::default(), Arc::new(StaticResolver::new())).unwrap();
        let up = Upstream {
            host: "smtp.example".into(),
            port: 587,
            tls: TlsMode::Starttls,
            verify_tls: true,
            server_name: None,
            auth: None,
            custom_ca: false,
            pinned_sha256: Vec::new(),
        };
        let target = DeliveryTarget {
            route_id: "mail/r".into(),
            target: Target::Smarthost(up.clone()),
            from_override: None,
            custom_ca_pem: None,
            max_connections: Some(3),
            messages_per_connection: None,
            connection_scope: None,
            timeouts: Default::default(),
        };
        let creds = mailroute_api::config::Credentials {
            username: "u".into(),
            password: "p1".into(),
        };
        let first = d.smarthost_key(&target, &up, Some(&creds));
        assert_eq!(first, Deliverer::smarthost_key_of(&target, &up, Some(&creds)));
        assert_eq!(d.smarthost_key(&target, &up, Some(&creds)), first, "remembered");
        let new_password = mailroute_api::config::Credentials {
            password: "p2".into(),
            ..creds.clone()
        };
        let other_up = Upstream {
            port: 465,
            ..up.clone()
        };
        let scoped = DeliveryTarget {
            connection_scope: Some("example.org".into()),
            ..target.clone()
        };
        let with_ca = DeliveryTarget {
            custom_ca_pem: Some("PEM".into()),
            ..target.clone()
        };
        for key in [
            d.smarthost_key(&target, &up, Some(&new_password)),
            d.smarthost_key(&target, &up, None),
            d.smarthost_key(&target, &other_up, Some(&creds)),
            d.smarthost_key(&scoped, &up, Some(&creds)),
            d.smarthost_key(&with_ca, &up, Some(&creds)),
        ] {
            assert_ne!(key, first);
        }
        assert_eq!(d.smarthost_key(&target, &up, Some(&creds)), first);

        let tls = Arc::clone(&d.inner.non_verifying);
        let pool = d.pool(&first, &target, Arc::clone(&tls));
        assert!(Arc::ptr_eq(&pool, &d.pool(&first, &target, Arc::clone(&tls))));
        let mut slower = target.clone();
        slower.timeouts.data_done_ms += 1;
        let more = DeliveryTarget {
            max_connections: Some(4),
            ..target.clone()
        };
        assert!(!Arc::ptr_eq(&pool, &d.pool(&first, &slower, Arc::clone(&tls))));
        assert!(!Arc::ptr_eq(&pool, &d.pool(&first, &more, Arc::clone(&tls))));
        assert!(Arc::ptr_eq(&pool, &d.pool(&first, &target, tls)));
    }
}
