//! Adapts the outbound SMTP client ([`crate::outbound::delivery::Deliverer`]) to the worker's
//! `Transport`: looks up the route's credentials (for `auth.oauth2`, a token from
//! [`crate::outbound::oauth2`], and after a 535 to it one more AUTH with the next token; no token
//! is a temporary `auth_failure` in the provider's words) and DKIM key, caches DKIM signers, applies
//! the route's and the destination's connection limits to the pools and, with a pacer, to the
//! connections of all relays together (a [`ConnectionSlots`] gate per attempt). The attempt's
//! result goes to the worker as the deliverer returned it (`AttemptResult`, whose
//! `is_permanent` holds the relay's policy on AUTH rejections).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use mailroute_api::config::{CompiledRoute, Credentials, RelaySecrets, Target};

use crate::outbound::bounce::BounceClass;
use crate::outbound::delivery::{
    AttemptResult, ConnectionGate, Deliverer, DeliveryTarget, DkimSigner, Envelope, NoSlot, Outcome, Stage, Ungated,
};
use crate::outbound::oauth2::{HeldToken, OAuth2Tokens};
use crate::outbound::pacing::ConnectionSlots;
use crate::outbound::shaping::{PaceReason, Pacer, Shaping};
use crate::outbound::worker::{Delivery, Transport};

pub struct SmtpTransport {
    deliverer: Deliverer,
    /// (route id, key PEM hash) → signer; parsing keys per message would dominate signing.
    dkim: Mutex<HashMap<(String, u64), Arc<DkimSigner>>>,
    /// Connection leases shared by all relays; `None`: limits per process only.
    slots: Option<Pacer>,
    /// Tokens of `auth.oauth2` routes.
    oauth2: OAuth2Tokens,
}

impl SmtpTransport {
    pub fn new(deliverer: Deliverer) -> Self {
        SmtpTransport {
            deliverer,
            dkim: Mutex::new(HashMap::new()),
            slots: None,
            oauth2: OAuth2Tokens::new(None),
        }
    }

    /// Tokens for `auth.oauth2` routes come from `tokens` (shared through Redis); without it such
    /// routes defer their mail.
    pub fn with_oauth2_tokens(mut self, tokens: OAuth2Tokens) -> Self {
        self.oauth2 = tokens;
        self
    }

    /// Every new connection through a route or to a destination with `maxConnections` first
    /// takes a lease from `pacer` (shared by all relays) and holds it while it is open.
    pub fn with_connection_slots(mut self, pacer: Pacer) -> Self {
        self.slots = Some(pacer);
        self
    }

    fn signer(&self, route: &CompiledRoute, secrets: &RelaySecrets) -> Option<Arc<DkimSigner>> {
        let cfg = route.dkim.as_ref()?;
        let pem = secrets.dkim_keys.get(&route.id)?;
        let key = (route.id.clone(), key_hash(pem.as_bytes()));
        if let Ok(m) = self.dkim.lock()
            && let Some(s) = m.get(&key)
        {
            return Some(s.clone());
        }
        match DkimSigner::from_config(cfg, pem) {
            Ok(s) => {
                let s = Arc::new(s);
                if let Ok(mut m) = self.dkim.lock() {
                    m.insert(key, s.clone());
                }
                Some(s)
            }
            Err(e) => {
                tracing::error!(route = %route.id, error = %e, "DKIM key unusable; sending unsigned");
                None
            }
        }
    }
}

fn key_hash(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Connections and messages per connection for delivery to `domain` with limits of its own (any
/// MX domain; a `perDestination` domain through a smarthost): the stricter of the route's and
/// the destination's.
pub fn connection_limits(route: &CompiledRoute, domain: &str) -> (Option<u32>, Option<u32>) {
    let s = Shaping::resolve(route, domain);
    let conns = match (s.route_max_connections, s.destination.max_connections) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    (conns, s.messages_per_connection(route))
}

/// Applies the connection limits for a recipient in `domain` to `target`: MX pools are per
/// domain and take the stricter of the route's and the destination's limits; a smarthost route
/// keeps one pool unless the domain has connection limits of its own (`perDestination`), which
/// then get a pool of their own (so a connection and its lease carry only that domain's mail).
pub fn apply_connection_limits(target: &mut DeliveryTarget, route: &CompiledRoute, domain: &str) {
    let s = Shaping::resolve(route, domain);
    let own = s.destination.max_connections.is_some() || s.destination.messages_per_connection.is_some();
    if s.mx || own {
        (target.max_connections, target.messages_per_connection) = connection_limits(route, domain);
    }
    if !s.mx && own {
        target.connection_scope = Some(s.domain);
    }
}

/// Whether the upstream refused the credentials at AUTH with 535 (a token it should have taken).
fn refused_at_auth(r: &AttemptResult) -> bool {
    r.stage() == Stage::Auth && r.reply().is_some_and(|reply| reply.code == 535)
}

/// No token, so nothing was sent: a temporary AUTH failure with the token endpoint's words.
fn no_token(host: Option<&str>, detail: String) -> AttemptResult {
    AttemptResult {
        outcome: Outcome::Protocol {
            stage: Stage::Auth,
            class: BounceClass::AuthFailure,
            detail,
        },
        remote_host: host.map(str::to_owned),
        remote_addr: None,
        tls: false,
        reused_connection: false,
    }
}

#[async_trait]
impl Transport for SmtpTransport {
    async fn deliver(
        &self,
        route: &CompiledRoute,
        secrets: &RelaySecrets,
        env: &Envelope<'_>,
        body: &[u8],
    ) -> Delivery {
        let mut target = DeliveryTarget::from_route(route, secrets);
        let domain = mailroute_api::pattern::domain_of(env.rcpt_to).map(|d| d.to_ascii_lowercase());
        if let Some(domain) = &domain {
            apply_connection_limits(&mut target, route, domain);
        }
        let host = match &route.target {
            Target::Smarthost(up) => Some(up.host.as_str()),
            Target::Mx => None,
        };
        let mut held: Option<HeldToken> = None;
        let mut token_failure = None;
        if let (Some(client), Some(_)) = (secrets.upstream_oauth2.get(&route.id), host) {
            match self.oauth2.credentials(&route.id, client).await {
                Ok(h) => held = Some(h),
                Err(detail) => token_failure = Some(no_token(host, detail)),
            }
        }
        let creds: Option<&Credentials> = match &held {
            Some(h) => Some(&h.credentials),
            None => secrets.upstream_credentials.get(&route.id),
        };
        let signer = self.signer(route, secrets);
        let slots = self.slots.as_ref().map(|pacer| ConnectionSlots {
            pacer,
            route,
            rcpt_domain: domain.as_deref().unwrap_or(""),
        });
        let gate: &dyn ConnectionGate = match &slots {
            Some(slots) => slots,
            None => &Ungated,
        };
        let mut r = match token_failure {
            Some(failed) => Ok(failed),
            None => {
                self.deliverer
                    .deliver_gated(&target, creds, signer.as_deref(), env, body, gate)
                    .await
            }
        };
        // A 535 to a token the cache holds as valid (revoked, or the provider's clock): drop it
        // and authenticate once more with the next one.
        if let (Ok(attempt), Some(stale)) = (&r, &held)
            && refused_at_auth(attempt)
        {
            tracing::info!(route = %route.id, user = %stale.credentials.username, "upstream refused the OAuth2 token; trying once with a new one");
            match self.oauth2.replace(stale).await {
                Ok(Some(fresh)) => {
                    r = self
                        .deliverer
                        .deliver_gated(&target, Some(&fresh.credentials), signer.as_deref(), env, body, gate)
                        .await;
                }
                Ok(None) => {}
                Err(detail) => r = Ok(no_token(host, detail)),
            }
        }
        match r {
            Ok(result) => Delivery::Attempted {
                result,
                rcpt_domain: domain,
            },
            Err(NoSlot { at_ms }) => Delivery::Paced {
                at_ms,
                reason: PaceReason::Connections.as_str(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carrier_domains_get_strict_connection_limits_on_mx_routes() {
        let (cfg, _, _) = crate::config::load(&crate::config::Source::Embedded).unwrap();
        let mx = &cfg.routes[0];
        assert_eq!(connection_limits(mx, "docomo.ne.jp"), (Some(2), Some(10)));
        assert_eq!(connection_limits(mx, "gmail.com"), (None, None));
    }

    #[test]
    fn destinations_with_connection_limits_get_their_own_smarthost_pool() {
        use mailroute_api::config::{DestinationLimits, RouteLimits};
        use mailroute_api::pattern::DomainPattern;

        use crate::outbound::shaping::limits::tests::route;
        let limits = RouteLimits {
            max_connections: Some(4),
            messages_per_connection: Some(50),
            per_destination: vec![DestinationLimits {
                domains: vec![DomainPattern::parse("docomo.ne.jp").unwrap()],
                max_connections: Some(1),
                ..Default::default()
            }],
            ..Default::default()
        };
        let secrets = RelaySecrets::default();
        let smarthost = route("mail/o365", false, limits.clone());
        let target_for = |r: &CompiledRoute, domain: &str| {
            let mut t = DeliveryTarget::from_route(r, &secrets);
            apply_connection_limits(&mut t, r, domain);
            (t.max_connections, t.messages_per_connection, t.connection_scope)
        };
        assert_eq!(
            target_for(&smarthost, "docomo.ne.jp"),
            (Some(1), Some(50), Some("docomo.ne.jp".into()))
        );
        assert_eq!(target_for(&smarthost, "gmail.com"), (Some(4), Some(50), None));
        // Carrier defaults are for MX delivery only: through a smarthost au.com shares the pool.
        assert_eq!(target_for(&smarthost, "au.com"), (Some(4), Some(50), None));
        // MX pools are per domain anyway: limits change, the key needs no scope.
        let mx = route("mail/mx", true, limits);
        assert_eq!(target_for(&mx, "docomo.ne.jp"), (Some(1), Some(50), None));
        assert_eq!(target_for(&mx, "au.com"), (Some(2), Some(10), None));
        assert_eq!(target_for(&mx, "gmail.com"), (Some(4), Some(50), None));
    }
}
