//! MAIL and RCPT: the envelope of a transaction, the sender's namespace (settled at MAIL, where
//! unattributed mail may be refused), the relay-access rule (a relay that is never open) and the
//! sender-quota checks at MAIL and RCPT, and the refusal of suppressed recipients at RCPT.
//!
//! Raw line checks and the RFC 5321 wire form are `address`'s; quota arithmetic is the quota
//! engine's. Must not read the message or touch the queue.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Inbound, Reply, Session};
use crate::inbound::address;
use crate::inbound::identity::{self, Unattributed};
use crate::inbound::listener::{Conn, ListenerKind};
use crate::inbound::quota::SenderCtx;
use crate::inbound::replies;
use crate::observe::telemetry::namespace_label;
use crate::suppress::{self, Mode};

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

/// RFC 6531 §3.5: a non-ASCII address without SMTPUTF8 on MAIL.
const NEEDS_SMTPUTF8: &str = "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter (RFC 6531)";

impl Inbound {
    pub(super) async fn mail(&self, conn: &mut Conn, s: &mut Session, from: &str, size: usize, smtputf8: bool) {
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
        s.identity = identity::resolve(
            s.auth_user.is_some(),
            s.user_namespace.as_deref(),
            s.peer.ip(),
            &*self.identity,
        );
        if s.identity.is_none() && self.settings.unattributed == Unattributed::Refuse {
            let r = identity::unknown_namespace();
            self.observer.rejected(&s.sender(), None, &r);
            s.mail_from = None;
            return conn.reply(&r.to_string());
        }
        s.smtputf8 = smtputf8;
        s.declared_size = size;
        let cfg = self.config.get();
        let namespace = s.identity.as_ref().map(|i| i.namespace.as_str());
        let ctx = SenderCtx {
            auth_user: s.auth_user.as_deref(),
            auth_quota: s.user_quota.as_deref(),
            mail_from: from,
            source_ip: s.peer.ip(),
            namespace,
        };
        match self.quotas.begin(&cfg.config, &ctx) {
            Ok(txn) => s.txn = Some(txn),
            Err(rej) => {
                self.observer.quota_decision(&rej.quota_id, "rejected", namespace);
                let r = rej.reply();
                self.observer.rejected(&s.sender(), None, &r);
                s.mail_from = None;
                return conn.reply(&r.to_string());
            }
        }
        conn.reply(replies::SENDER_OK);
    }

    pub(super) async fn rcpt(&self, conn: &mut Conn, s: &mut Session, to: &str) {
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
        if let Some(r) = self.refuse_suppressed(s, to).await {
            self.observer.rejected(&sender, Some(to), &r);
            return conn.reply(&r.to_string());
        }
        if let Some(txn) = s.txn.as_mut() {
            let decision = self.quotas.rcpt(txn, crate::clock::now_ms()).await;
            let namespace = s.identity.as_ref().map(|i| i.namespace.as_str());
            if let Some(r) = self.quota_reply(txn, namespace, decision) {
                self.observer.rejected(&sender, Some(to), &r);
                return conn.reply(&r.to_string());
            }
        }
        // Store U-label domains as A-labels: the form routes, MX lookups and servers without
        // SMTPUTF8 understand.
        s.rcpts.push(with_ascii_domain(to));
        conn.reply(replies::RECIPIENT_OK);
    }
}

impl Inbound {
    /// In mode `refuse`, the reply to a recipient on a suppression list of the sender's
    /// namespace or the platform. Asks the in-memory copy; only a hit costs a Redis read (it
    /// may be a hash collision or an entry expired since the copy was read). In mode `drop`
    /// the enqueue leaves such recipients out.
    async fn refuse_suppressed(&self, s: &Session, to: &str) -> Option<Reply> {
        let lists = self.suppress.as_ref().filter(|l| l.settings.mode == Mode::Refuse)?;
        let namespace = s.identity.as_ref().map(|i| i.namespace.as_str());
        let key = suppress::core::key(to).ok()?;
        if lists.hits(namespace, &key).is_empty() {
            return None;
        }
        match lists.lookup(namespace, &key, crate::clock::now_ms()).await {
            Ok(Some((scope, _))) => {
                lists
                    .metrics
                    .suppressed
                    .with_label_values(&["refuse", namespace_label(namespace)])
                    .inc();
                Some(suppress::core::refusal(&scope))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "suppression list unreadable");
                Some(Reply::new(
                    451,
                    "4.3.0 Suppression list temporarily unavailable, try again later",
                ))
            }
        }
    }
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
    fn recipient_syntax() {
        assert!(valid_recipient("a@example.com"));
        assert!(valid_recipient("a.b+c@sub.docomo.ne.jp"));
        assert!(!valid_recipient("postmaster"));
        assert!(!valid_recipient("@example.com"));
        assert!(!valid_recipient("a@-bad-.com"));
        assert!(!valid_recipient("a@[127.0.0.1]"));
    }
}
