//! DATA: receiving the body within the body budget, the end-of-data quota check, the trace and
//! Message-ID headers, and the hand-off to the queue. The `250` goes out only after the queue
//! acknowledged the message. Recipients the enqueue found suppressed are reported as such. With
//! a queue that stores log records ([`crate::queue::Queue::stores_log`]), the `received` and
//! `scheduled` records go into the queue's commit, so they precede every worker's record.
//!
//! DATA transparency is `crate::inbound::data`'s, header work `crate::inbound::headers`'. Must
//! not deliver or route.

use std::time::Instant;

use super::{Flow, Inbound, Reply, SenderInfo, Session};
use crate::inbound::body_budget;
use crate::inbound::data::DataReceiver;
use crate::inbound::headers;
use crate::inbound::listener::Conn;
use crate::inbound::quota::QuotaTxn;
use crate::inbound::replies;
use crate::observe::telemetry::namespace_label;
use crate::queue::message::{Job, MessageMeta, new_id};

impl Inbound {
    pub(super) async fn data(&self, conn: &mut Conn, s: &mut Session) -> std::io::Result<Flow> {
        if s.mail_from.is_none() {
            conn.reply(replies::NEED_MAIL);
            return Ok(Flow::Continue);
        }
        if s.rcpts.is_empty() {
            conn.reply(replies::NO_VALID_RECIPIENTS);
            return Ok(Flow::Continue);
        }
        let max = self.settings.max_message_size;
        let Some(mut body) = self.body_budget.begin(s.declared_size, max) else {
            return Ok(self.refuse_for_memory(conn, s).await);
        };
        conn.reply(replies::START_DATA);
        let mut receiver = DataReceiver::new();
        loop {
            // Only as much as the body budget has room for; the rest on the next round.
            let available = conn.buffered().len();
            let n = body.room(available);
            let (used, done) = receiver.ingest(&conn.buffered()[..n], body.sink());
            conn.consume(used);
            body.check();
            if done {
                break;
            }
            if n < available {
                continue;
            }
            match conn.fill(self.settings.data_timeout).await {
                Ok(0) => return Ok(Flow::Close),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    conn.reply(replies::DATA_TIMEOUT);
                    return Ok(Flow::Close);
                }
                Err(e) => return Err(e),
            }
        }
        let end_of_data = Instant::now();
        let body = match body.finish() {
            Ok(b) => b,
            Err(body_budget::Refused::OverBudget) => return Ok(self.refuse_for_memory(conn, s).await),
            Err(body_budget::Refused::TooBig) => {
                let sender = s.sender();
                let txn = s.reset_transaction();
                self.abort(txn).await;
                let r = Reply::new(
                    552,
                    format!("5.3.4 Message size exceeds fixed maximum message size of {max} bytes"),
                );
                self.observer.rejected(&sender, None, &r);
                conn.reply(&r.to_string());
                return Ok(Flow::Continue);
            }
        };
        // The reservation is held until the body is freed, after the enqueue.
        let (body, _reserved) = body;
        let sender = s.sender();
        let rcpts = std::mem::take(&mut s.rcpts);
        let txn = s.reset_transaction();
        if receiver.saw_bare_line_ending() {
            // Refused, not normalised: see the `data` module.
            self.abort(txn).await;
            let r = Reply::new(
                554,
                "5.6.0 Bare CR or LF in the message: lines must end with CRLF (RFC 5321 section 2.3.8)",
            );
            self.observer.rejected(&sender, None, &r);
            conn.reply(&r.to_string());
            return Ok(Flow::Continue);
        }
        let reply = self.accept_message(s, sender, rcpts, body, end_of_data, txn).await;
        conn.reply(&reply.to_string());
        Ok(Flow::Continue)
    }

    /// `452 4.3.1`: the message does not fit in the body budget; the transaction ends.
    async fn refuse_for_memory(&self, conn: &mut Conn, s: &mut Session) -> Flow {
        let sender = s.sender();
        let txn = s.reset_transaction();
        self.abort(txn).await;
        let r = body_budget::reply();
        self.observer.rejected(&sender, None, &r);
        conn.reply(&r.to_string());
        Flow::Continue
    }

    async fn accept_message(
        &self,
        s: &Session,
        sender: SenderInfo,
        rcpts: Vec<String>,
        mut body: Vec<u8>,
        end_of_data: Instant,
        mut txn: Option<QuotaTxn>,
    ) -> Reply {
        let now = crate::clock::now();
        let options = match headers::extension_options(&body, now) {
            Ok(o) => o,
            Err(e) => {
                let r = Reply::new(550, format!("5.6.0 {e}"));
                self.observer.rejected(&sender, None, &r);
                self.abort(txn).await;
                return r;
            }
        };
        if let Some(t) = txn.as_mut() {
            let decision = self.quotas.data(t, &body, now.timestamp_millis()).await;
            if let Some(r) = self.quota_reply(t, sender.namespace.as_deref(), decision) {
                self.observer.rejected(&sender, None, &r);
                self.abort(txn).await;
                return r;
            }
        }
        let quota = txn.as_ref().and_then(|t| t.quota_id().map(str::to_owned));
        let now_ms = now.timestamp_millis();
        let id = new_id(now_ms);
        let with = match (s.esmtp, s.tls, s.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let received = headers::received(
            s.helo.as_deref().unwrap_or("unknown"),
            &sender.source_ip.to_string(),
            &self.settings.hostname,
            with,
            &id,
            (rcpts.len() == 1).then(|| rcpts[0].as_str()),
            now,
        );
        // In place: a second copy of a large body is what the body budget cannot see.
        let message_id = headers::prepare_in_place(&mut body, &received, &self.settings.hostname, &id);
        let stored = body;
        let due = options.deliver_after_ms.filter(|t| *t > now_ms);
        let jobs: Vec<(Job, Option<i64>)> = (0..rcpts.len() as u32).map(|i| (Job::new(&id, i), due)).collect();
        let meta = MessageMeta {
            id: id.clone(),
            received_at_ms: now_ms,
            source_ip: sender.source_ip.to_string(),
            listener: s.listener.into(),
            auth_user: sender.auth_user.clone(),
            namespace: sender.namespace.clone(),
            service_account: sender.service_account.clone(),
            tls: s.tls,
            mail_from: sender.mail_from.clone(),
            rcpts,
            message_id_header: Some(message_id),
            size: stored.len(),
            options,
            quota,
            is_dsn: false,
        };
        // Stored by the commit itself where the queue can: a worker may deliver the message
        // before this session is back, and its record must not precede the `received`.
        let log = if self.queue.stores_log() {
            self.observer.accept_records(&meta)
        } else {
            Vec::new()
        };
        let enqueueing = self.body_budget.enqueue_permit(stored.len()).await;
        // The copy's generations go with the commit, which drops what the copy missed.
        let screen = self
            .suppress
            .as_ref()
            .map(|lists| lists.screen(meta.namespace.as_deref(), &meta.rcpts, now_ms));
        let enqueued = self
            .queue
            .enqueue_logged(&meta, &stored, &jobs, screen.as_ref(), &log)
            .await;
        drop((enqueueing, stored));
        match enqueued {
            Ok(suppressed) => {
                // Accepted mail stays counted, even if it bounces later.
                if let Some(t) = txn {
                    t.commit();
                }
                if log.is_empty() {
                    self.observer.accepted(&meta, end_of_data.elapsed());
                } else {
                    self.observer.accepted_stored(&meta, end_of_data.elapsed(), &log);
                }
                if let Some(lists) = &self.suppress {
                    for (idx, scope) in &suppressed {
                        lists
                            .metrics
                            .suppressed
                            .with_label_values(&["drop", namespace_label(meta.namespace.as_deref())])
                            .inc();
                        self.observer
                            .suppressed(&meta, *idx as usize, &crate::suppress::scope_of_id(scope));
                    }
                }
                Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
            }
            Err(e) => {
                tracing::error!(error = %e, "enqueue failed; message not accepted");
                let r = Reply::new(451, "4.3.0 Queue temporarily unavailable, try again later");
                self.observer.rejected(&sender, None, &r);
                self.abort(txn).await;
                r
            }
        }
    }
}
