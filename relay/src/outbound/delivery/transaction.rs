//! One SMTP transaction: the outgoing bytes (From override, then DKIM), a connection slot of
//! the pool, a pooled session or a new one admitted by the connection gate, and the send, once
//! more on a fresh connection when a pooled one died before the content went out.
//!
//! Must not choose the next hop or TLS settings (`connect`) nor judge the reply (`outcome`).

use std::borrow::Cow;
use std::time::Duration;

use mailroute_smtp::Timeouts;

use super::connect::Hop;
use super::outcome::no_reply_failure;
use super::pool::Pool;
use super::rewrite;
use super::session::Session;
use super::{
    Admission, AttemptResult, ConnectionGate, Deliverer, DeliveryTarget, DkimSigner, Envelope, NoSlot, Outcome, Stage,
    gate,
};
use crate::outbound::bounce::Failure;

/// How an attempt gets a connection: `gate` is asked before a new one opens; `wait`: wait for
/// a free slot of the pool instead of returning [`NoSlot`].
#[derive(Clone, Copy)]
pub(super) struct Entry<'a> {
    pub(super) gate: &'a dyn ConnectionGate,
    pub(super) wait: bool,
}

/// What goes out on the connection: the envelope after the From override and the prepared
/// message (overridden, signed).
#[derive(Clone, Copy)]
pub(super) struct Outgoing<'a> {
    pub(super) mail_from: &'a str,
    pub(super) rcpt_to: &'a str,
    pub(super) message: &'a [u8],
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

impl Deliverer {
    pub(super) async fn run(
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
                    // Boxed: opening (TLS handshake, AUTH) is the largest state of an attempt and
                    // rare (a connection carries up to 100 messages); inline, it made every
                    // attempt's future ~15 KB, copied on each delivery.
                    let open = Box::pin(self.open(pool, &hop, timeouts));
                    match gate::keep_alive(&mut lease, open).await {
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

    pub(super) async fn check_in(&self, pool: &Pool, session: Session) {
        if let Some(spent) = pool.put_idle(session) {
            close(spent).await;
        }
    }
}

/// Closes a session leaving the pool. One holding a lease is closed before the caller goes on,
/// so its slot is free for the next connection (a QUIT in the background would still hold it);
/// others close in the background.
pub(super) async fn close(s: Session) {
    if s.lease.is_some() {
        s.quit().await;
    } else {
        tokio::spawn(s.quit());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::delivery::dkim;

    fn target(from_override: Option<&str>) -> DeliveryTarget {
        DeliveryTarget {
            from_override: from_override.map(String::from),
            ..DeliveryTarget::direct_mx("mail/r")
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
}
