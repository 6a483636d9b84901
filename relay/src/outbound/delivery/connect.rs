//! The next hop of an attempt: the TLS client configuration a route asks for, the pool its
//! connections live in (keyed by everything that changes a session; the key parts are
//! remembered with their inputs, so an unchanged route is not hashed again on every attempt),
//! and opening a new connection to a smarthost or to the recipient domain's MX hosts, address
//! after address.
//!
//! Must not send a message: the transaction on the opened connection is `transaction`'s.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mailroute_api::config::{Credentials, Upstream};
use mailroute_api::route::TlsMode;
use mailroute_smtp::{OpenSpec, Timeouts, TlsUse};

use super::outcome::no_reply_failure;
use super::pool::Pool;
use super::resolve::{self, MxPlan};
use super::session::Session;
use super::{AttemptResult, Deliverer, DeliveryTarget, DnsError, Stage, TlsSetupError, digest, lock, tls};
use crate::outbound::bounce::{BounceClass, Failure};

/// The rule for the EHLO name MX hosts see, shared with the operator's route status.
pub use mailroute_smtp::helo::mx_helo_problem;

/// How to reach the next hop when no pooled connection is available.
pub(super) enum Hop<'a> {
    Smarthost {
        up: &'a Upstream,
        creds: Option<&'a Credentials>,
    },
    Mx {
        domain: &'a str,
    },
}

/// Most pool key parts remembered of each kind; past that the memory starts over.
const MEMO_MAX: usize = 256;

/// Pool key parts already computed, each with everything it was computed from: an attempt
/// through a route whose settings did not change takes them from here instead of hashing them
/// again (two SHA-256 digests and several `format!`s per attempt otherwise). A changed setting
/// (a reload, new credentials) matches no entry and computes a new key.
#[derive(Default)]
pub(super) struct KeyMemo {
    smarthost: Vec<(SmarthostInputs, String)>,
    limits: Vec<(PoolLimits, String)>,
}

/// What a smarthost pool key is computed from.
struct SmarthostInputs {
    route_id: String,
    up: Upstream,
    creds: Option<Credentials>,
    ca: Option<String>,
    scope: Option<String>,
}

impl SmarthostInputs {
    fn matches(&self, target: &DeliveryTarget, up: &Upstream, creds: Option<&Credentials>) -> bool {
        self.route_id == target.route_id
            && self.up == *up
            && self.creds.as_ref() == creds
            && self.ca == target.custom_ca_pem
            && self.scope == target.connection_scope
    }
}

/// The pool settings in a pool key besides the hop.
#[derive(PartialEq)]
struct PoolLimits {
    max: u32,
    per_conn: u32,
    timeouts: mailroute_api::config::SessionTimeouts,
}

/// `v` with `entry` added, emptied first when full.
fn remember<K>(v: &mut Vec<(K, String)>, entry: (K, String)) {
    if v.len() >= MEMO_MAX {
        v.clear();
    }
    v.push(entry);
}

impl Deliverer {
    pub(super) fn smarthost_key(&self, target: &DeliveryTarget, up: &Upstream, creds: Option<&Credentials>) -> String {
        if let Some((_, key)) = lock(&self.inner.key_memo)
            .smarthost
            .iter()
            .find(|(inputs, _)| inputs.matches(target, up, creds))
        {
            return key.clone();
        }
        let key = Self::smarthost_key_of(target, up, creds);
        let inputs = SmarthostInputs {
            route_id: target.route_id.clone(),
            up: up.clone(),
            creds: creds.cloned(),
            ca: target.custom_ca_pem.clone(),
            scope: target.connection_scope.clone(),
        };
        remember(&mut lock(&self.inner.key_memo).smarthost, (inputs, key.clone()));
        key
    }

    pub(super) fn smarthost_key_of(target: &DeliveryTarget, up: &Upstream, creds: Option<&Credentials>) -> String {
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

    pub(super) fn verifying_config(&self, ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
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
    pub(super) fn pinned_config(&self, pins: &[String]) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
        let id = format!("pin|{}", pins.join(","));
        if let Some(c) = lock(&self.inner.with_ca).get(&id) {
            return Ok(Arc::clone(c));
        }
        let config = tls::pinned_hex(pins)?;
        lock(&self.inner.with_ca).insert(id, Arc::clone(&config));
        Ok(config)
    }

    pub(super) fn pool(&self, key: &str, target: &DeliveryTarget, tls_config: Arc<rustls::ClientConfig>) -> Arc<Pool> {
        let c = &self.inner.config;
        let max = target.max_connections.unwrap_or(c.default_max_connections);
        let per_conn = target
            .messages_per_connection
            .unwrap_or(c.default_messages_per_connection);
        // Limits and timeouts are part of the key: a change starts a fresh pool.
        let limits = PoolLimits {
            max,
            per_conn,
            timeouts: target.timeouts,
        };
        let memo = lock(&self.inner.key_memo)
            .limits
            .iter()
            .find(|(l, _)| *l == limits)
            .map(|(_, suffix)| suffix.clone());
        let suffix = memo.unwrap_or_else(|| {
            let timeouts = digest(&[&format!("{:?}", target.timeouts)]);
            let suffix = format!("{max}|{per_conn}|{timeouts}");
            remember(&mut lock(&self.inner.key_memo).limits, (limits, suffix.clone()));
            suffix
        });
        let key = format!("{key}|{suffix}");
        let mut pools = lock(&self.inner.pools);
        Arc::clone(
            pools
                .entry(key)
                .or_insert_with(|| Arc::new(Pool::new(max, per_conn, tls_config))),
        )
    }

    pub(super) async fn open(&self, pool: &Pool, hop: &Hop<'_>, timeouts: Timeouts) -> Result<Session, AttemptResult> {
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
