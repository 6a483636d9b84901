//! One pooled outbound session: a [`Connection`] of the shared SMTP client (`mailroute_smtp`)
//! with what the pool keeps about it: the messages it carried, since when it is idle, and the
//! connection slot ([`Lease`]) it was opened under, freed only after the connection is closed
//! ([`Session::quit`], [`Session::discard`]).
//!
//! This module must not pool, retry or classify; it reports what happened at which stage.

use std::ops::{Deref, DerefMut};
use std::time::Instant;

use mailroute_smtp::{Connection, OpenSpec, Reply, StepError};

use super::gate::Lease;

/// An open, greeted (and, if configured, encrypted and authenticated) session.
pub(crate) struct Session {
    conn: Connection,
    pub messages: u32,
    pub idle_since: Instant,
    /// The cross-relay connection slot held while this connection is open, if a limit applies.
    pub lease: Option<Lease>,
}

impl Deref for Session {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

impl Session {
    /// Connects and prepares a session for transactions.
    pub async fn open(spec: OpenSpec<'_>) -> Result<Session, StepError> {
        Ok(Session {
            conn: Connection::open(spec).await?,
            messages: 0,
            idle_since: Instant::now(),
            lease: None,
        })
    }

    /// One transaction: MAIL, RCPT, DATA. Returns the final reply to the message content.
    pub async fn send(&mut self, mail_from: &str, rcpt_to: &str, message: &[u8]) -> Result<Reply, StepError> {
        self.messages += 1;
        self.conn.send(mail_from, rcpt_to, message).await
    }

    /// Polite QUIT, bounded by the MAIL timeout; errors do not matter any more. The slot is
    /// freed after the connection is closed, so no other relay opens one while this one lasts.
    pub async fn quit(self) {
        let Session { conn, lease, .. } = self;
        conn.quit().await;
        if let Some(l) = lease {
            l.release().await;
        }
    }

    /// Closes without QUIT (the connection is broken or out of step) and frees the slot.
    pub async fn discard(self) {
        let Session { conn, lease, .. } = self;
        drop(conn);
        if let Some(l) = lease {
            l.release().await;
        }
    }
}
