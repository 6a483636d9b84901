//! Delivery Status Notifications: builds the RFC 3464 `multipart/report` message sent to the
//! envelope sender when a recipient failed permanently, expired, or (optionally) is delayed, and
//! decides whether a sender may receive one at all ([`should_bounce`]).
//!
//! This module owns the DSN's wire format only. It is pure: no I/O, no clock (the caller passes
//! `now` and a unique id), no queueing. It must not decide *when* a DSN is due (that is the worker
//! with `bounce`/`retry`) and never copies the original body: only its header block is returned,
//! as `text/rfc822-headers`.

use chrono::{DateTime, Utc};

use crate::inbound::headers;
use crate::outbound::bounce::{EnhancedStatusCode, Failure, Reply};

/// What happened to one recipient (RFC 3464 §2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Final: the message will not be delivered.
    Failed,
    /// Not delivered yet; still being retried.
    Delayed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        }
    }
}

/// One recipient's entry in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReport {
    /// The recipient address (without angle brackets).
    pub recipient: String,
    pub action: Action,
    /// RFC 3463 status, e.g. `5.1.1`; see [`status_for_reply`] and [`status_for_failure`].
    pub status: EnhancedStatusCode,
    /// Host that produced the diagnostic, e.g. `mx.example.com`.
    pub remote_mta: Option<String>,
    /// The remote reply, when a server answered (`Diagnostic-Code: smtp; ...`).
    pub diagnostic: Option<Reply>,
    /// One human sentence saying why, e.g. "the recipient's server rejected it".
    pub reason: String,
    pub last_attempt: Option<DateTime<Utc>>,
    /// For [`Action::Delayed`]: when the relay gives up.
    pub will_retry_until: Option<DateTime<Utc>>,
}

/// Everything needed to build one report about one original message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRequest<'a> {
    /// Our host name (`Reporting-MTA`, the `MAILER-DAEMON@` domain and the Message-ID domain).
    pub reporting_mta: &'a str,
    /// Envelope sender of the original message: the DSN's recipient.
    pub original_sender: &'a str,
    /// When the relay accepted the original message.
    pub arrival_date: DateTime<Utc>,
    /// Queue id of the original message, reported as `X-Mailroute-Queue-ID`.
    pub queue_id: Option<&'a str>,
    pub recipients: &'a [RecipientReport],
    /// The original message; only its header block is used.
    pub original: &'a [u8],
}

/// A ready-to-queue DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    /// Always empty: a DSN is sent with the null reverse path `MAIL FROM:<>` (RFC 3464 §2).
    pub mail_from: String,
    /// The original envelope sender.
    pub rcpt_to: String,
    /// The complete RFC 5322 message with CRLF line endings.
    pub message: Vec<u8>,
}

/// Whether a failure report may be sent to `envelope_from`: never to the null sender (a bounce
/// must not bounce) nor to a `MAILER-DAEMON` address, and only to something that looks like an
/// address.
pub fn should_bounce(envelope_from: &str) -> bool {
    let addr = envelope_from.trim();
    let addr = addr
        .strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(addr)
        .trim();
    if addr.is_empty() {
        return false;
    }
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return false;
    };
    !local.is_empty() && !domain.is_empty() && !local.eq_ignore_ascii_case("mailer-daemon")
}

/// The RFC 3463 status for a reply: its enhanced code if it has one (with the class forced to the
/// basic code's class, as receivers sometimes disagree), else `X.0.0` from the basic code.
pub fn status_for_reply(reply: &Reply) -> EnhancedStatusCode {
    let class = match reply.code / 100 {
        5 => 5,
        2 => 2,
        _ => 4,
    };
    match reply.enhanced {
        Some(e) => e.with_class(class),
        None => EnhancedStatusCode::new(class, 0, 0),
    }
}

/// The RFC 3463 status for a failure that produced no reply.
pub fn status_for_failure(failure: Failure) -> EnhancedStatusCode {
    let (class, subject, detail) = match failure {
        // X.4.1 no answer from host, X.4.2 bad connection.
        Failure::ConnectionRefused | Failure::Timeout => (4, 4, 1),
        Failure::ConnectionLost => (4, 4, 2),
        // X.4.3 directory server failure; X.1.2 bad destination system address.
        Failure::DnsTemporary => (4, 4, 3),
        Failure::DnsNoSuchDomain => (5, 1, 2),
        // X.7.5 cryptographic failure.
        Failure::Tls => (4, 7, 5),
        // X.4.7 delivery time expired.
        Failure::Expired => (4, 4, 7),
    };
    EnhancedStatusCode::new(class, subject, detail)
}

/// Builds the DSN. `now` becomes the Date; `unique` (e.g. a fresh queue id) makes the
/// Message-ID and the MIME boundary unique.
pub fn build(req: &DsnRequest<'_>, now: DateTime<Utc>, unique: &str) -> Dsn {
    let host = one_line(req.reporting_mta);
    let unique: String = unique
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    let boundary = format!("=_mailroute_{unique}");
    let any_failed = req.recipients.iter().any(|r| r.action == Action::Failed);
    let subject = if any_failed {
        "Undelivered Mail Returned to Sender"
    } else {
        "Delayed Mail (still being retried)"
    };
    let original_id = headers::get(req.original, "Message-ID").map(|v| one_line(&v));
    let original_subject = headers::get(req.original, "Subject").map(|v| one_line(&v));

    let mut m = String::with_capacity(2048);
    push_header(&mut m, "From", &format!("Mail Delivery System <MAILER-DAEMON@{host}>"));
    push_header(&mut m, "To", &format!("<{}>", mailbox(req.original_sender)));
    push_header(&mut m, "Subject", subject);
    push_header(&mut m, "Date", &now.to_rfc2822());
    push_header(&mut m, "Message-ID", &format!("<{unique}.dsn@{host}>"));
    if let Some(id) = &original_id {
        push_header(&mut m, "In-Reply-To", id);
        push_header(&mut m, "References", id);
    }
    push_header(&mut m, "Auto-Submitted", "auto-replied");
    push_header(&mut m, "MIME-Version", "1.0");
    push_header(
        &mut m,
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
    m.push_str("\r\nThis is a MIME-encapsulated delivery status notification.\r\n");

    // 1. Human-readable part.
    m.push_str(&format!("\r\n--{boundary}\r\n"));
    m.push_str("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
    m.push_str(&human_text(req, &host, original_subject.as_deref(), any_failed));

    // 2. Machine-readable part.
    m.push_str(&format!("\r\n--{boundary}\r\n"));
    m.push_str("Content-Type: message/delivery-status\r\n\r\n");
    m.push_str(&delivery_status(req, &host));

    // 3. The original's header block, never its body.
    m.push_str(&format!("\r\n--{boundary}\r\n"));
    m.push_str("Content-Type: text/rfc822-headers\r\n\r\n");
    m.push_str(&original_headers(req.original));
    m.push_str(&format!("\r\n--{boundary}--\r\n"));

    Dsn {
        mail_from: String::new(),
        rcpt_to: one_line(req.original_sender),
        message: m.into_bytes(),
    }
}

fn human_text(req: &DsnRequest<'_>, host: &str, subject: Option<&str>, any_failed: bool) -> String {
    let mut t = format!("This is the mail system at host {host}.\r\n\r\n");
    if any_failed {
        t.push_str("Your message could not be delivered to one or more recipients.\r\n");
        t.push_str("It has not been delivered and will not be retried.\r\n");
    } else {
        t.push_str("Your message has not been delivered yet to one or more recipients.\r\n");
        t.push_str("Delivery is still being attempted; you do not need to resend it.\r\n");
    }
    if let Some(s) = subject {
        t.push_str(&format!("\r\nSubject of your message: {s}\r\n"));
    }
    for r in req.recipients {
        t.push_str(&format!("\r\n<{}>: {}\r\n", mailbox(&r.recipient), one_line(&r.reason)));
        match (&r.diagnostic, &r.remote_mta) {
            (Some(d), Some(mta)) => t.push_str(&format!(
                "    {} replied: {} {}\r\n",
                one_line(mta),
                d.code,
                one_line(&d.text)
            )),
            (Some(d), None) => t.push_str(&format!(
                "    The remote server replied: {} {}\r\n",
                d.code,
                one_line(&d.text)
            )),
            (None, Some(mta)) => t.push_str(&format!("    Remote host: {}\r\n", one_line(mta))),
            (None, None) => {}
        }
        if let Some(until) = r.will_retry_until {
            t.push_str(&format!(
                "    Delivery will be retried until {}.\r\n",
                until.to_rfc2822()
            ));
        }
    }
    t
}

fn delivery_status(req: &DsnRequest<'_>, host: &str) -> String {
    let mut s = String::new();
    push_header(&mut s, "Reporting-MTA", &format!("dns; {host}"));
    if let Some(id) = req.queue_id {
        push_header(&mut s, "X-Mailroute-Queue-ID", &one_line(id));
    }
    push_header(&mut s, "Arrival-Date", &req.arrival_date.to_rfc2822());
    for r in req.recipients {
        s.push_str("\r\n");
        push_header(&mut s, "Final-Recipient", &address_field(&r.recipient));
        push_header(&mut s, "Action", r.action.as_str());
        push_header(&mut s, "Status", &r.status.to_string());
        if let Some(mta) = &r.remote_mta {
            push_header(&mut s, "Remote-MTA", &format!("dns; {}", ascii_only(&one_line(mta))));
        }
        if let Some(d) = &r.diagnostic {
            push_header(
                &mut s,
                "Diagnostic-Code",
                &format!("smtp; {} {}", d.code, ascii_only(&one_line(&d.text))),
            );
        }
        if let Some(t) = r.last_attempt {
            push_header(&mut s, "Last-Attempt-Date", &t.to_rfc2822());
        }
        if let Some(t) = r.will_retry_until {
            push_header(&mut s, "Will-Retry-Until", &t.to_rfc2822());
        }
    }
    s
}

/// The header block of `original` with CRLF line endings and without the blank separator line.
fn original_headers(original: &[u8]) -> String {
    let block = &original[..headers::header_len(original)];
    let text = String::from_utf8_lossy(block);
    let mut out = String::with_capacity(block.len() + 16);
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out
}

/// `rfc822; addr` for ASCII addresses, RFC 6533 `utf-8; ...` with `\x{HEX}` escapes otherwise.
fn address_field(addr: &str) -> String {
    let addr = mailbox(addr);
    if addr.is_ascii() {
        return format!("rfc822; {addr}");
    }
    let mut out = String::from("utf-8; ");
    for c in addr.chars() {
        if c.is_ascii() && c != '\\' {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
        }
    }
    out
}

/// An address as written in a header field: one line, in RFC 5321 form (a local part that needs
/// quotes keeps them, so it reads as the same address; see `inbound::address`).
fn mailbox(addr: &str) -> String {
    let addr = one_line(addr);
    crate::inbound::address::wire_form(&addr)
        .map(std::borrow::Cow::into_owned)
        .unwrap_or(addr)
}

/// Collapses CR/LF and other control characters (header injection, multi-line replies) into spaces.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            if !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
    out.trim().to_owned()
}

/// The machine-readable part is ASCII (RFC 3464 §2.1.1); anything else becomes `?`.
fn ascii_only(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii() { c } else { '?' }).collect()
}

/// Appends `Name: value` folded at spaces to lines of at most 78 characters where possible.
fn push_header(out: &mut String, name: &str, value: &str) {
    const LIMIT: usize = 78;
    let mut line_len = name.len() + 1;
    out.push_str(name);
    out.push(':');
    let mut first = true;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        if !first && line_len + 1 + word.len() > LIMIT {
            out.push_str("\r\n ");
            line_len = 1;
        } else {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word.len();
        first = false;
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use mail_parser::{MessageParser, MimeHeaders, PartType};

    const ORIGINAL: &[u8] = b"Received: from app (10.0.0.7) by relay\r\n\
From: Shop <shop@example.com>\r\n\
To: alice@example.net\r\n\
Subject: Your order\r\n\
\x20#1234\r\n\
Message-ID: <order-1234@example.com>\r\n\
\r\n\
SECRET BODY LINE\r\n\
More body.\r\n";

    fn t(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, h, m, 0).single().expect("valid time")
    }

    fn failed_rcpt() -> RecipientReport {
        RecipientReport {
            recipient: "alice@example.net".into(),
            action: Action::Failed,
            status: status_for_reply(&Reply::new(550, "5.1.1 x")),
            remote_mta: Some("mx.example.net".into()),
            diagnostic: Some(Reply::new(
                550,
                "5.1.1 <alice@example.net>: Recipient address rejected: User unknown in local recipient table",
            )),
            reason: "the recipient's mail server rejected the message".into(),
            last_attempt: Some(t(10, 5)),
            will_retry_until: None,
        }
    }

    fn request(recipients: &[RecipientReport]) -> DsnRequest<'_> {
        DsnRequest {
            reporting_mta: "relay.mailroute.test",
            original_sender: "shop@example.com",
            arrival_date: t(10, 0),
            queue_id: Some("0000abc"),
            recipients,
            original: ORIGINAL,
        }
    }

    fn part_text(part: &mail_parser::MessagePart<'_>) -> String {
        match &part.body {
            PartType::Text(t) | PartType::Html(t) => t.to_string(),
            PartType::Binary(b) | PartType::InlineBinary(b) => String::from_utf8_lossy(b).into_owned(),
            PartType::Message(m) => String::from_utf8_lossy(m.raw_message()).into_owned(),
            PartType::Multipart(_) => String::new(),
        }
    }

    #[test]
    fn failed_dsn_has_rfc3464_structure() {
        let rcpts = [failed_rcpt()];
        let dsn = build(&request(&rcpts), t(10, 6), "0000def");
        assert_eq!(dsn.mail_from, "", "DSNs use the null reverse path");
        assert_eq!(dsn.rcpt_to, "shop@example.com");

        let msg = MessageParser::default().parse(&dsn.message).expect("parses");
        let ct = msg.root_part().content_type().expect("content type");
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(msg.header_raw("Auto-Submitted").map(str::trim), Some("auto-replied"));
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        let from = msg
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .expect("from");
        assert_eq!(from, "MAILER-DAEMON@relay.mailroute.test");
        assert_eq!(msg.in_reply_to().as_text(), Some("order-1234@example.com"));
        assert_eq!(msg.message_id(), Some("0000def.dsn@relay.mailroute.test"));

        let PartType::Multipart(children) = &msg.root_part().body else {
            panic!("root is not multipart");
        };
        assert_eq!(children.len(), 3);
        let parts: Vec<_> = children.iter().map(|&i| &msg.parts[i as usize]).collect();
        let types: Vec<String> = parts
            .iter()
            .map(|p| {
                let ct = p.content_type().expect("part content type");
                format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
            })
            .collect();
        assert_eq!(types, ["text/plain", "message/delivery-status", "text/rfc822-headers"]);

        let human = part_text(parts[0]);
        assert!(
            human.contains("<alice@example.net>: the recipient's mail server rejected"),
            "{human}"
        );
        assert!(human.contains("mx.example.net replied: 550 5.1.1"), "{human}");
        assert!(human.contains("Subject of your message: Your order #1234"), "{human}");

        let status = part_text(parts[1]);
        let unfolded = status.replace("\r\n ", " ");
        for line in [
            "Reporting-MTA: dns; relay.mailroute.test",
            "Arrival-Date: Sun, 1 Mar 2026 10:00:00 +0000",
            "Final-Recipient: rfc822; alice@example.net",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; mx.example.net",
            "Diagnostic-Code: smtp; 550 5.1.1 <alice@example.net>: Recipient address rejected: User unknown in local recipient table",
            "Last-Attempt-Date: Sun, 1 Mar 2026 10:05:00 +0000",
        ] {
            assert!(
                unfolded.lines().any(|l| l.trim_end() == line),
                "missing {line:?} in\n{status}"
            );
        }
        // The per-message block and the per-recipient block are separated by a blank line.
        assert!(unfolded.contains("\r\n\r\nFinal-Recipient:"), "{status}");
        // Folded to 78 columns.
        assert!(status.lines().all(|l| l.len() <= 78), "{status}");

        let hdrs = part_text(parts[2]);
        assert!(hdrs.contains("Message-ID: <order-1234@example.com>"), "{hdrs}");
        assert!(hdrs.contains("Subject: Your order\r\n #1234"), "{hdrs}");
        let whole = String::from_utf8_lossy(&dsn.message);
        assert!(
            !whole.contains("SECRET BODY LINE"),
            "the original body must never be copied"
        );
    }

    #[test]
    fn delayed_dsn_says_until_when() {
        let mut r = failed_rcpt();
        r.action = Action::Delayed;
        r.diagnostic = Some(Reply::new(451, "4.3.0 Try again later"));
        r.status = status_for_reply(r.diagnostic.as_ref().expect("set"));
        r.will_retry_until = Some(t(10, 30));
        r.reason = "the recipient's mail server is deferring it".into();
        let rcpts = [r];
        let dsn = build(&request(&rcpts), t(10, 10), "x1");
        let msg = MessageParser::default().parse(&dsn.message).expect("parses");
        assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
        let text = String::from_utf8_lossy(&dsn.message);
        assert!(text.contains("Action: delayed\r\n"));
        assert!(text.contains("Status: 4.3.0\r\n"));
        assert!(text.contains("Will-Retry-Until: Sun, 1 Mar 2026 10:30:00 +0000\r\n"));
        assert!(text.contains("retried until Sun, 1 Mar 2026 10:30:00 +0000"));
    }

    #[test]
    fn failure_without_reply_and_several_recipients() {
        let expired = RecipientReport {
            recipient: "bob@example.org".into(),
            action: Action::Failed,
            status: status_for_failure(Failure::Expired),
            remote_mta: None,
            diagnostic: None,
            reason: "delivery kept failing until the message expired".into(),
            last_attempt: None,
            will_retry_until: None,
        };
        let rcpts = [failed_rcpt(), expired];
        let dsn = build(&request(&rcpts), t(11, 0), "x2");
        let text = String::from_utf8_lossy(&dsn.message);
        assert_eq!(text.matches("Final-Recipient:").count(), 2);
        assert!(text.contains("Final-Recipient: rfc822; bob@example.org\r\nAction: failed\r\nStatus: 4.4.7\r\n"));
        assert_eq!(text.matches("Diagnostic-Code:").count(), 1);
        assert!(MessageParser::default().parse(&dsn.message).is_some());
    }

    #[test]
    fn hostile_values_cannot_inject_headers() {
        let mut r = failed_rcpt();
        r.recipient = "eve@example.net\r\nBcc: victim@example.org".into();
        r.diagnostic = Some(Reply::new(550, "no\r\nX-Injected: yes"));
        let rcpts = [r];
        let mut req = request(&rcpts);
        req.original_sender = "shop@example.com\r\nBcc: x@y";
        let dsn = build(&req, t(10, 6), "x3\r\nBcc: z");
        let text = String::from_utf8_lossy(&dsn.message);
        for bad in ["\r\nBcc:", "\r\nX-Injected:", "\nBcc:"] {
            assert!(!text.contains(bad), "{bad:?} injected:\n{text}");
        }
    }

    #[test]
    fn quoted_local_parts_stay_quoted() {
        let mut r = failed_rcpt();
        r.recipient = "x y@example.net".into();
        let rcpts = [r];
        let mut req = request(&rcpts);
        req.original_sender = "a> AUTH=<ceo@corp.example>@good.example";
        let dsn = build(&req, t(10, 6), "q1");
        // The envelope keeps the stored form; the session writes it out quoted.
        assert_eq!(dsn.rcpt_to, req.original_sender);
        let text = String::from_utf8_lossy(&dsn.message).replace("\r\n ", " ");
        assert!(
            text.contains("\r\nTo: <\"a> AUTH=<ceo@corp.example>\"@good.example>\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Final-Recipient: rfc822; \"x y\"@example.net\r\n"),
            "{text}"
        );
        assert!(text.contains("<\"x y\"@example.net>: the recipient's"), "{text}");
    }

    #[test]
    fn utf8_recipient_uses_rfc6533_form() {
        assert_eq!(address_field("a@b.example"), "rfc822; a@b.example");
        assert_eq!(address_field("jö@b.example"), "utf-8; j\\x{F6}@b.example");
    }

    #[test]
    fn header_folding_respects_the_limit_and_keeps_words() {
        let mut s = String::new();
        let long = "word ".repeat(40);
        push_header(&mut s, "Diagnostic-Code", &long);
        assert!(s.lines().all(|l| l.len() <= 78), "{s}");
        assert_eq!(
            s.replace("\r\n ", " ").trim_end(),
            format!("Diagnostic-Code: {}", long.trim_end())
        );
    }

    #[test]
    fn status_mapping() {
        let status = |code, text| status_for_reply(&Reply::new(code, text)).to_string();
        assert_eq!(status(550, "5.1.1 unknown"), "5.1.1");
        assert_eq!(status(550, "unknown"), "5.0.0");
        assert_eq!(status(451, "later"), "4.0.0");
        // The class follows the basic code.
        assert_eq!(status(550, "4.2.2 full"), "5.2.2");
        assert_eq!(status_for_failure(Failure::DnsNoSuchDomain).to_string(), "5.1.2");
        assert_eq!(status_for_failure(Failure::Expired).to_string(), "4.4.7");
        assert_eq!(status_for_failure(Failure::Tls).to_string(), "4.7.5");
    }

    #[test]
    fn never_bounce_a_bounce() {
        assert!(should_bounce("shop@example.com"));
        assert!(should_bounce("<shop@example.com>"));
        assert!(!should_bounce(""));
        assert!(!should_bounce("<>"));
        assert!(!should_bounce("  "));
        assert!(!should_bounce("MAILER-DAEMON@relay.example"));
        assert!(!should_bounce("<mailer-daemon@relay.example>"));
        assert!(!should_bounce("not-an-address"));
        assert!(!should_bounce("@example.com"));
    }
}
