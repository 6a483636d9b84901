//! Adapts the outbound SMTP client ([`crate::delivery::Deliverer`]) to the worker's
//! [`Transport`]: looks up the route's credentials and DKIM key, caches DKIM signers, and maps
//! the attempt result to the worker's outcome. Policy it adds, on purpose: an AUTH rejection by
//! a smarthost is temporary (our credentials broke, e.g. a changed mailbox password; the mail
//! waits for the fix or its lifetime instead of bouncing to every sender).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use mailroute_api::config::{CompiledRoute, RelaySecrets, Target};

use crate::bounce::BounceClass;
use crate::delivery::{AttemptResult, Deliverer, DeliveryTarget, DkimSigner, Envelope, Stage};
use crate::shaping::Shaping;
use crate::worker::{Attempt, AttemptOutcome, OutEnvelope, Transport};

pub struct SmtpTransport {
    deliverer: Deliverer,
    /// (route id, key PEM hash) → signer; parsing keys per message would dominate signing.
    dkim: Mutex<HashMap<(String, u64), Arc<DkimSigner>>>,
}

impl SmtpTransport {
    pub fn new(deliverer: Deliverer) -> Self {
        SmtpTransport {
            deliverer,
            dkim: Mutex::new(HashMap::new()),
        }
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

/// Connections and messages per connection for MX delivery to `domain`: the stricter of the
/// route's and the destination's.
pub fn mx_connection_limits(route: &CompiledRoute, domain: &str) -> (Option<u32>, Option<u32>) {
    let s = Shaping::resolve(route, domain);
    let conns = match (s.route_max_connections, s.destination.max_connections) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    (conns, s.messages_per_connection(route))
}

/// The worker's view of a delivery attempt.
pub fn outcome_of(r: &AttemptResult) -> AttemptOutcome {
    let Some(v) = r.verdict() else {
        let (code, text) = r
            .reply()
            .map(|x| (x.code, x.text.clone()))
            .unwrap_or((250, String::new()));
        return AttemptOutcome::Delivered { code, text };
    };
    let auth_rejected = r.stage() == Stage::Auth || v.class == BounceClass::AuthFailure;
    AttemptOutcome::Failed {
        code: r.reply().map(|x| x.code),
        text: r.reply().map(|x| x.text.clone()).unwrap_or_else(|| r.summary()),
        permanent: v.is_permanent() && !auth_rejected,
        class: v.class,
    }
}

#[async_trait]
impl Transport for SmtpTransport {
    async fn deliver(
        &self,
        route: &CompiledRoute,
        secrets: &RelaySecrets,
        env: &OutEnvelope<'_>,
        body: &[u8],
    ) -> Attempt {
        let mut target = DeliveryTarget::from_route(route, secrets);
        // MX pools are per recipient domain: apply that destination's connection limits
        // (perDestination or the carrier defaults) to this process's pool.
        if matches!(route.target, Target::Mx)
            && let Some(domain) = mailroute_api::pattern::domain_of(env.rcpt_to)
        {
            (target.max_connections, target.messages_per_connection) = mx_connection_limits(route, &domain);
        }
        let creds = secrets.upstream_credentials.get(&route.id);
        let signer = self.signer(route, secrets);
        let envelope = Envelope {
            mail_from: env.mail_from.to_owned(),
            rcpt_to: env.rcpt_to.to_owned(),
        };
        let r = self
            .deliverer
            .deliver(&target, creds, signer.as_deref(), &envelope, body)
            .await;
        Attempt {
            outcome: outcome_of(&r),
            remote_host: r.remote_host.clone(),
            tls: r.tls,
            rcpt_domain: mailroute_api::pattern::domain_of(env.rcpt_to).map(|d| d.to_ascii_lowercase()),
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
        assert_eq!(mx_connection_limits(mx, "docomo.ne.jp"), (Some(2), Some(10)));
        assert_eq!(mx_connection_limits(mx, "gmail.com"), (None, None));
    }
}
