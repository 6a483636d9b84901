//! AUTH PLAIN and LOGIN (RFC 4954, RFC 4616) over TLS: decoding the credentials, checking them
//! through the auth guard, and the delay and lockout after failures.
//!
//! Must not compare passwords itself or keep per-address counters: that is `auth_guard`'s.

use std::borrow::Cow;

use base64::Engine as _;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};

use super::{Flow, Inbound, Session};
use crate::inbound::auth_guard::Verdict;
use crate::inbound::listener::{Conn, Line};
use crate::inbound::replies;

impl Inbound {
    pub(super) async fn auth(
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
            Verdict::Authenticated { quota, namespace } => {
                s.auth_user = Some(user);
                s.user_quota = Some(quota);
                s.user_namespace = namespace;
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
}
