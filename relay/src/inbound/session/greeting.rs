//! EHLO, HELO/LHLO and STARTTLS: the greeting exchange and the capabilities the relay advertises.
//!
//! Owns what a greeting resets and which extensions are offered in which state (STARTTLS before
//! TLS, AUTH only over TLS). Must not read from the connection: the TLS upgrade itself is the
//! command loop's (`Flow::StartTls`).

use super::{Inbound, Session};
use crate::inbound::listener::Conn;
use crate::inbound::replies;

impl Inbound {
    pub(super) async fn ehlo(&self, conn: &mut Conn, s: &mut Session, host: String) {
        s.helo = Some(host);
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

    pub(super) async fn helo(&self, conn: &mut Conn, s: &mut Session, host: String) {
        s.helo = Some(host);
        s.esmtp = false;
        let t = s.reset_transaction();
        self.abort(t).await;
        conn.reply(&format!("250 {}", self.settings.hostname));
    }

    /// Answers STARTTLS; true when the upgrade should follow (`Flow::StartTls`).
    pub(super) fn starttls(&self, conn: &mut Conn, s: &Session) -> bool {
        if s.tls {
            conn.reply(replies::TLS_ALREADY_ACTIVE);
        } else if self.tls.is_none() {
            conn.reply(replies::STARTTLS_UNAVAILABLE);
        } else {
            conn.reply(replies::READY_FOR_TLS);
            conn.discard_buffered();
            return true;
        }
        false
    }
}
