//! Bounce classification: turns the outcome of one delivery attempt (an SMTP
//! reply, [`classify_parsed`], or a failure that produced no reply,
//! [`Failure::verdict`]) into a [`Verdict`] — whether the failure is temporary
//! or permanent, and which [`BounceClass`] it belongs to.
//!
//! This module owns the classification table and the RFC 3463 enhanced status
//! code fallback. It is pure: no I/O, no async, no clock, no logging, no
//! metrics. It must not decide *when* to retry (that is `retry`) nor build
//! notifications (that is `dsn`).
//!
//! # How a reply is classified
//!
//! 1. Codes 200–399 are not failures: [`classify_reply`] returns `None`.
//! 2. The *kind* comes from the basic code: 4xx is [`Kind::Temporary`], 5xx is
//!    [`Kind::Permanent`]; a code outside 200–599 (a protocol violation) is
//!    temporary. A table row may override the kind (only one row does: RFC
//!    5321 §4.5.3.1.10 "552 too many recipients" is temporary).
//! 3. The *class* comes from the first matching row of the ordered table
//!    (basic-code pattern, enhanced-code pattern, case-insensitive keywords),
//!    then from the RFC 3463 enhanced code, then (only when the reply has no
//!    enhanced code) from the basic code, then [`BounceClass::Other`].
//!
//! [`BounceClass::AuthFailure`] means *our* SMTP AUTH towards a smarthost
//! failed (credentials, send-as rights); sender-domain authentication
//! (SPF/DKIM/DMARC) rejections are [`BounceClass::SpamOrPolicy`]. X.7.0 is
//! "other security status" and is used by providers for blocks and deferrals
//! as much as for authentication, so it is only `AuthFailure` with the
//! RFC 4954 codes 530/534/535 or authentication wording in the text.

use std::fmt;
use std::ops::RangeInclusive;

pub use mailroute_smtp::{EnhancedStatusCode, Reply};

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Temporary,
    Permanent,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Temporary => "temporary",
            Kind::Permanent => "permanent",
        }
    }
}

/// Why delivery failed, coarse enough for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BounceClass {
    InvalidRecipient,
    MailboxFull,
    SpamOrPolicy,
    AuthFailure,
    DnsFailure,
    TlsFailure,
    RateLimited,
    /// No route serves the recipient (a gap in the configuration): ours, not the receiver's.
    NoRoute,
    Expired,
    Other,
}

impl BounceClass {
    /// Every class, in declaration order.
    pub const ALL: [BounceClass; 10] = [
        BounceClass::InvalidRecipient,
        BounceClass::MailboxFull,
        BounceClass::SpamOrPolicy,
        BounceClass::AuthFailure,
        BounceClass::DnsFailure,
        BounceClass::TlsFailure,
        BounceClass::RateLimited,
        BounceClass::NoRoute,
        BounceClass::Expired,
        BounceClass::Other,
    ];

    /// Stable snake_case name for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BounceClass::InvalidRecipient => "invalid_recipient",
            BounceClass::MailboxFull => "mailbox_full",
            BounceClass::SpamOrPolicy => "spam_or_policy",
            BounceClass::AuthFailure => "auth_failure",
            BounceClass::DnsFailure => "dns_failure",
            BounceClass::TlsFailure => "tls_failure",
            BounceClass::RateLimited => "rate_limited",
            BounceClass::NoRoute => "no_route",
            BounceClass::Expired => "expired",
            BounceClass::Other => "other",
        }
    }
}

impl fmt::Display for BounceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The classification of one failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub kind: Kind,
    pub class: BounceClass,
}

impl Verdict {
    pub const fn new(kind: Kind, class: BounceClass) -> Self {
        Verdict { kind, class }
    }

    pub fn is_permanent(self) -> bool {
        self.kind == Kind::Permanent
    }
}

/// Failures that produced no SMTP reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// TCP connection refused / host unreachable.
    ConnectionRefused,
    /// Connection dropped mid-session.
    ConnectionLost,
    /// No answer within the configured timeout.
    Timeout,
    /// DNS lookup failed in a way that may recover (SERVFAIL, timeout).
    DnsTemporary,
    /// The domain does not exist (NXDOMAIN) or has no usable MX/A records.
    DnsNoSuchDomain,
    /// TLS handshake or certificate verification failed.
    Tls,
    /// The message lifetime ran out before delivery succeeded.
    Expired,
}

impl Failure {
    pub fn verdict(self) -> Verdict {
        use BounceClass as C;
        match self {
            Failure::ConnectionRefused | Failure::ConnectionLost | Failure::Timeout => {
                Verdict::new(Kind::Temporary, C::Other)
            }
            Failure::DnsTemporary => Verdict::new(Kind::Temporary, C::DnsFailure),
            Failure::DnsNoSuchDomain => Verdict::new(Kind::Permanent, C::DnsFailure),
            Failure::Tls => Verdict::new(Kind::Temporary, C::TlsFailure),
            Failure::Expired => Verdict::new(Kind::Permanent, C::Expired),
        }
    }
}

/// Classifies a raw reply; `None` means it was not a failure (2xx/3xx).
pub fn classify_reply(code: u16, text: &str) -> Option<Verdict> {
    classify_parsed(&Reply::new(code, text))
}

/// Classifies an already-parsed reply (the enhanced code is taken as given).
pub fn classify_parsed(reply: &Reply) -> Option<Verdict> {
    let code = reply.code;
    let base_kind = match code {
        200..=399 => return None,
        400..=499 => Kind::Temporary,
        500..=599 => Kind::Permanent,
        _ => return Some(Verdict::new(Kind::Temporary, BounceClass::Other)),
    };
    let lower = reply.text.to_ascii_lowercase();
    if let Some(rule) = RULES.iter().find(|r| r.matches(code, reply.enhanced, &lower)) {
        let kind = rule.kind.unwrap_or(base_kind);
        return Some(Verdict::new(kind, rule.class));
    }
    let class = match reply.enhanced {
        Some(e) => class_from_enhanced(e),
        None => class_from_code(code),
    };
    Some(Verdict::new(base_kind, class.unwrap_or(BounceClass::Other)))
}

/// RFC 3463 subject/detail → class, ignoring the class digit.
fn class_from_enhanced(e: EnhancedStatusCode) -> Option<BounceClass> {
    use BounceClass as C;
    Some(match (e.subject, e.detail) {
        (1, 1 | 2 | 3 | 6 | 10) => C::InvalidRecipient,
        (2, 1) => C::InvalidRecipient, // mailbox disabled
        (2, 2) | (3, 1) => C::MailboxFull,
        (4, 3 | 4) => C::DnsFailure,
        (4, 5) => C::RateLimited, // mail system congestion
        (4, 7) => C::Expired,
        (7, 8) => C::AuthFailure,
        (7, 10 | 11) => C::TlsFailure,
        (7, _) => C::SpamOrPolicy,
        _ => return None,
    })
}

/// Basic code → class, used only when the reply has no enhanced code.
fn class_from_code(code: u16) -> Option<BounceClass> {
    match code {
        452 | 552 => Some(BounceClass::MailboxFull),
        _ => None,
    }
}

/// Basic reply code pattern.
#[derive(Debug, Clone)]
enum CodePat {
    Any,
    /// First digit: 4 or 5.
    Class(u16),
    OneOf(&'static [u16]),
}

/// Enhanced status code pattern.
#[derive(Debug, Clone)]
enum EnhPat {
    Any,
    /// `class.subject.detail` with an optional class and a detail range.
    Match {
        class: Option<u8>,
        subject: u16,
        detail: RangeInclusive<u16>,
    },
}

/// One table row. A row matches when the code and enhanced patterns match,
/// `keywords` is empty or one of them occurs in the text, and none of
/// `unless` occurs. Keywords are lowercase; the text is compared lowercased.
#[derive(Debug, Clone)]
struct Rule {
    code: CodePat,
    enhanced: EnhPat,
    keywords: &'static [&'static str],
    unless: &'static [&'static str],
    /// Overrides the kind derived from the basic code.
    kind: Option<Kind>,
    class: BounceClass,
}

impl Rule {
    fn matches(&self, code: u16, enhanced: Option<EnhancedStatusCode>, lower_text: &str) -> bool {
        let code_ok = match &self.code {
            CodePat::Any => true,
            CodePat::Class(c) => code / 100 == *c,
            CodePat::OneOf(list) => list.contains(&code),
        };
        let enh_ok = match (&self.enhanced, enhanced) {
            (EnhPat::Any, _) => true,
            (EnhPat::Match { .. }, None) => false,
            (EnhPat::Match { class, subject, detail }, Some(e)) => {
                class.is_none_or(|x| x == e.class) && *subject == e.subject && detail.contains(&e.detail)
            }
        };
        code_ok
            && enh_ok
            && (self.keywords.is_empty() || self.keywords.iter().any(|k| lower_text.contains(k)))
            && !self.unless.iter().any(|k| lower_text.contains(k))
    }
}

const fn enh(class: Option<u8>, subject: u16, lo: u16, hi: u16) -> EnhPat {
    EnhPat::Match {
        class,
        subject,
        detail: RangeInclusive::new(lo, hi),
    }
}

const fn row(code: CodePat, enhanced: EnhPat, keywords: &'static [&'static str], class: BounceClass) -> Rule {
    Rule {
        code,
        enhanced,
        keywords,
        unless: &[],
        kind: None,
        class,
    }
}

/// The classification table, evaluated top to bottom; first match wins.
const RULES: &[Rule] = &[
    // TLS required / STARTTLS problems (before the AUTH rows: "530 5.7.0 Must
    // issue a STARTTLS command first" is about TLS, not credentials).
    row(
        CodePat::Any,
        EnhPat::Any,
        &[
            "starttls",
            "tls required",
            "tls is required",
            "requires tls",
            "must use tls",
            "tls negotiation failed",
            "encryption required",
        ],
        BounceClass::TlsFailure,
    ),
    // RFC 5321 §4.5.3.1.10: "552 too many recipients" is really a 452.
    Rule {
        code: CodePat::OneOf(&[552]),
        enhanced: EnhPat::Any,
        keywords: &["too many recipients"],
        unless: &[],
        kind: Some(Kind::Temporary),
        class: BounceClass::RateLimited,
    },
    // Gmail X.7.28 (unusual rate of unsolicited mail).
    row(CodePat::Any, enh(None, 7, 28, 28), &[], BounceClass::RateLimited),
    // Microsoft 4.7.500–4.7.699: "Server busy, please try again later" throttling.
    row(
        CodePat::Class(4),
        enh(Some(4), 7, 500, 699),
        &[],
        BounceClass::RateLimited,
    ),
    // Rate limits and sending quotas (before mailbox-quota wording: "Daily
    // sending quota exceeded" is a rate limit, not a full mailbox).
    row(
        CodePat::Any,
        EnhPat::Any,
        &[
            "sending quota",
            "sending limit",
            "rate limit",
            "ratelimit",
            "rate-limit",
            "throttl",
            "unusual rate",
            "thread limit",
            "connection limit",
            "too many connections",
            "too many concurrent",
            "too many messages",
            "too many recipients",
            "too many login",
            "unexpected volume",
            "[tss04]",
            "server busy",
        ],
        BounceClass::RateLimited,
    ),
    row(
        CodePat::Any,
        EnhPat::Any,
        &[
            "quotaexceeded",
            "quota exceeded",
            "over quota",
            "overquota",
            "exceeded its quota",
            "mailbox full",
            "mailbox is full",
            "mailbox size limit",
            "insufficient storage",
            "exceeded storage",
            "out of storage",
        ],
        BounceClass::MailboxFull,
    ),
    // Unknown recipients, whatever the code says (docomo/au/Exim send bare
    // 550 without an enhanced code; Yahoo sends 552/554).
    Rule {
        code: CodePat::Any,
        enhanced: EnhPat::Any,
        keywords: &[
            "user unknown",
            "unknown user",
            "no such user",
            "unknown recipient",
            "recipient unknown",
            "recipientnotfound",
            "recipient not found",
            "user not found",
            "mailbox not found",
            "no such mailbox",
            "mailbox does not exist",
            "does not exist",
            "doesn't exist",
            "doesn't have a",
            "invalid recipient",
            "invalid mailbox",
            "unrouteable address",
            "address not found",
            "account is disabled",
            "account has been disabled",
        ],
        unless: &["sender"],
        kind: None,
        class: BounceClass::InvalidRecipient,
    },
    // RFC 5321 550 text; at 4xx "mailbox unavailable" means busy/locked.
    row(
        CodePat::Class(5),
        EnhPat::Any,
        &["mailbox unavailable"],
        BounceClass::InvalidRecipient,
    ),
    // Office 365 directory-based edge blocking: "550 5.4.1 Recipient address
    // rejected: Access denied" means the recipient does not exist.
    row(
        CodePat::Any,
        enh(None, 4, 1, 1),
        &["recipient address rejected"],
        BounceClass::InvalidRecipient,
    ),
    // Sender-domain authentication is policy, not our credentials.
    row(
        CodePat::Any,
        EnhPat::Any,
        &["dmarc", "spf", "dkim"],
        BounceClass::SpamOrPolicy,
    ),
    // RFC 4954 AUTH replies.
    row(
        CodePat::OneOf(&[530, 534, 535]),
        EnhPat::Any,
        &[],
        BounceClass::AuthFailure,
    ),
    row(
        CodePat::Any,
        EnhPat::Any,
        &[
            "authentication required",
            "authentication failed",
            "authentication failure",
            "authentication unsuccessful",
            "authentication is required",
            "username and password",
            "invalid credentials",
            "sendasdenied",
        ],
        BounceClass::AuthFailure,
    ),
    // Greylisting: a deliberate, self-resolving deferral.
    row(CodePat::Any, EnhPat::Any, &["greylist", "graylist"], BounceClass::Other),
    row(
        CodePat::Any,
        enh(None, 4, 0, 999),
        &["dns", "nonexistentdomain", "host not found"],
        BounceClass::DnsFailure,
    ),
    // Deferrals that ask us to slow down, which is how the back-off (shaping::backoff) reads
    // them: any other 421 ("421 4.7.0 Try again later", service closing) and 450/451 with an
    // X.7.x code. Last, so TLS, authentication, SPF/DKIM/DMARC and greylisting keep their class.
    row(CodePat::OneOf(&[421]), EnhPat::Any, &[], BounceClass::RateLimited),
    row(
        CodePat::OneOf(&[450, 451]),
        enh(None, 7, 0, 999),
        &[],
        BounceClass::RateLimited,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use BounceClass as C;
    use Kind::{Permanent as P, Temporary as T};

    /// Splits "550-5.1.1 text" into (550, text) like a caller holding a raw line.
    fn v(line: &str) -> Verdict {
        let code: u16 = line[..3].parse().expect("test line starts with a code");
        classify_reply(code, &line[4..]).expect("test line is a failure")
    }

    #[track_caller]
    fn check(line: &str, kind: Kind, class: BounceClass) {
        assert_eq!(v(line), Verdict::new(kind, class), "{line}");
    }

    #[test]
    fn gmail_replies() {
        check(
            "550-5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces.",
            P,
            C::InvalidRecipient,
        );
        check(
            "452-4.2.2 The email account that you tried to reach is over quota. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp",
            T,
            C::MailboxFull,
        );
        check(
            "552-5.2.2 The email account that you tried to reach is over quota and inactive.",
            P,
            C::MailboxFull,
        );
        check(
            "421-4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address.",
            T,
            C::RateLimited,
        );
        check(
            "550-5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy.",
            P,
            C::SpamOrPolicy,
        );
        check(
            "535-5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials",
            P,
            C::AuthFailure,
        );
        check(
            "550-5.7.1 [203.0.113.9] Our system has detected that this message is likely unsolicited mail.",
            P,
            C::SpamOrPolicy,
        );
        check(
            "550-5.2.1 The email account that you tried to reach is disabled.",
            P,
            C::InvalidRecipient,
        );
        check("550 5.4.5 Daily user sending quota exceeded.", P, C::RateLimited);
        check(
            "454-4.7.0 Too many login attempts, please try again later.",
            T,
            C::RateLimited,
        );
        check(
            "550-5.7.25 The IP address sending this message does not have a PTR record setup.",
            P,
            C::SpamOrPolicy,
        );
    }

    #[test]
    fn microsoft_replies() {
        check(
            "550 5.5.0 Requested action not taken: mailbox unavailable",
            P,
            C::InvalidRecipient,
        );
        check(
            "554 5.2.0 STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
            P,
            C::MailboxFull,
        );
        check(
            "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
            P,
            C::SpamOrPolicy,
        );
        check(
            "451 4.7.500 Server busy. Please try again later from [203.0.113.9]. (AS761)",
            T,
            C::RateLimited,
        );
        check(
            "554 5.2.252 SendAsDenied; user@contoso.com not allowed to send as other@contoso.com",
            P,
            C::AuthFailure,
        );
        check(
            "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
            T,
            C::RateLimited,
        );
        check("535 5.7.3 Authentication unsuccessful", P, C::AuthFailure);
        check(
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            P,
            C::InvalidRecipient,
        );
        check(
            "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)",
            P,
            C::InvalidRecipient,
        );
        check(
            "554 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain",
            P,
            C::DnsFailure,
        );
        check("451 4.4.0 DNS query failed", T, C::DnsFailure);
        check(
            "550 5.7.606 Access denied, banned sending IP [203.0.113.9].",
            P,
            C::SpamOrPolicy,
        );
    }

    #[test]
    fn yahoo_and_apple_replies() {
        check(
            "421 4.7.0 [TSS04] Messages from 203.0.113.9 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
            T,
            C::RateLimited,
        );
        check(
            "554 delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1234.mail.gq1.yahoo.com",
            P,
            C::InvalidRecipient,
        );
        check(
            "552 1 Requested mail action aborted, mailbox not found",
            P,
            C::InvalidRecipient,
        );
        check(
            "553 5.7.1 [BL21] Connections will not be accepted from 203.0.113.9, because the ip is in Spamhaus's list",
            P,
            C::SpamOrPolicy,
        );
        check("554 5.7.9 Message not accepted for policy reasons.", P, C::SpamOrPolicy);
        check(
            "550 5.7.0 Blocked - see https://support.proofpoint.com/dnsbl-lookup.cgi?ip=203.0.113.9",
            P,
            C::SpamOrPolicy,
        );
    }

    #[test]
    fn postfix_exim_and_japanese_carrier_replies() {
        check("550 Unknown user", P, C::InvalidRecipient);
        check("550 <taro@ezweb.ne.jp>: User unknown", P, C::InvalidRecipient);
        check(
            "450 4.2.0 <x@y.example>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/y.example.html",
            T,
            C::Other,
        );
        check(
            "550 5.1.1 <x@y.example>: Recipient address rejected: User unknown in local recipient table",
            P,
            C::InvalidRecipient,
        );
        check("552 5.2.2 Mailbox full", P, C::MailboxFull);
        check(
            "554 5.7.1 Service unavailable; Client host [203.0.113.9] blocked using zen.spamhaus.org",
            P,
            C::SpamOrPolicy,
        );
        check("530 5.7.0 Must issue a STARTTLS command first", P, C::TlsFailure);
        check("530 5.7.0 Authentication required", P, C::AuthFailure);
        check("454 4.7.0 Temporary authentication failure", T, C::AuthFailure);
        check("550 Unrouteable address", P, C::InvalidRecipient);
        check(
            "450 4.1.8 <bounce@ours.example>: Sender address rejected: Domain not found",
            T,
            C::Other,
        );
        check("554 5.4.7 Delivery time expired", P, C::Expired);
        check("451 4.4.3 Temporary lookup failure", T, C::DnsFailure);
        check(
            "552 5.5.3 Too many recipients",
            T, // RFC 5321 §4.5.3.1.10
            C::RateLimited,
        );
        check(
            "538 5.7.11 Encryption required for requested authentication mechanism",
            P,
            C::TlsFailure,
        );
    }

    #[test]
    fn basic_code_fallbacks_and_non_failures() {
        assert_eq!(classify_reply(250, "2.0.0 OK queued as 12345"), None);
        assert_eq!(classify_reply(354, "End data with <CR><LF>.<CR><LF>"), None);
        check("421 Service not available, closing channel", T, C::RateLimited);
        // A deferral the back-off reads as "slow down" is classed so too (it was spam_or_policy).
        check("421 4.7.0 Try again later", T, C::RateLimited);
        check("450 4.7.1 Client host rejected: too fast", T, C::RateLimited);
        check("554 Transaction failed", P, C::Other);
        check("452 Insufficient system storage", T, C::MailboxFull);
        // With an enhanced code, the basic code fallback does not apply.
        check("552 5.3.4 Message size exceeds fixed limit", P, C::Other);
        // Out-of-range codes are protocol violations: temporary.
        assert_eq!(classify_reply(999, "weird"), Some(Verdict::new(T, C::Other)));
        assert_eq!(classify_reply(0, ""), Some(Verdict::new(T, C::Other)));
    }

    #[test]
    fn kind_follows_basic_code_even_if_enhanced_class_disagrees() {
        assert_eq!(
            classify_reply(550, "4.2.2 mailbox over quota"),
            Some(Verdict::new(P, C::MailboxFull))
        );
        assert_eq!(
            classify_reply(450, "5.1.1 user unknown"),
            Some(Verdict::new(T, C::InvalidRecipient))
        );
    }

    #[test]
    fn enhanced_fallback_without_keywords() {
        let cases = [
            ((5, 1, 1), C::InvalidRecipient),
            ((5, 1, 2), C::InvalidRecipient),
            ((5, 1, 3), C::InvalidRecipient),
            ((5, 1, 10), C::InvalidRecipient),
            ((4, 2, 2), C::MailboxFull),
            ((5, 7, 1), C::SpamOrPolicy),
            ((5, 7, 0), C::SpamOrPolicy),
            ((5, 7, 8), C::AuthFailure),
            ((4, 4, 4), C::DnsFailure),
            ((4, 4, 3), C::DnsFailure),
            ((5, 7, 10), C::TlsFailure),
            ((4, 4, 7), C::Expired),
            ((5, 3, 4), C::Other),
        ];
        for ((c, s, d), class) in cases {
            let code = u16::from(c) * 100 + 50;
            let text = format!("{c}.{s}.{d} no keywords here");
            let r = Reply::new(code, text.clone());
            assert_eq!(r.enhanced, Some(EnhancedStatusCode::new(c, s, d)));
            assert_eq!(classify_parsed(&r).map(|v| v.class), Some(class), "{text}");
        }
    }

    #[test]
    fn non_reply_failures() {
        assert_eq!(Failure::ConnectionRefused.verdict(), Verdict::new(T, C::Other));
        assert_eq!(Failure::Timeout.verdict(), Verdict::new(T, C::Other));
        assert_eq!(Failure::DnsTemporary.verdict(), Verdict::new(T, C::DnsFailure));
        assert_eq!(Failure::DnsNoSuchDomain.verdict(), Verdict::new(P, C::DnsFailure));
        assert_eq!(Failure::Tls.verdict(), Verdict::new(T, C::TlsFailure));
        assert_eq!(Failure::Expired.verdict(), Verdict::new(P, C::Expired));
        assert!(Failure::Expired.verdict().is_permanent());
        assert_eq!(classify_parsed(&Reply::new(250, "OK")), None);
    }

    #[test]
    fn class_names_are_stable_and_unique() {
        let names: Vec<&str> = BounceClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "invalid_recipient",
                "mailbox_full",
                "spam_or_policy",
                "auth_failure",
                "dns_failure",
                "tls_failure",
                "rate_limited",
                "no_route",
                "expired",
                "other"
            ]
        );
        assert_eq!(C::RateLimited.to_string(), "rate_limited");
        assert_eq!(Kind::Permanent.as_str(), "permanent");
    }

    #[test]
    fn table_keywords_are_lowercase() {
        for rule in RULES {
            for k in rule.keywords.iter().chain(rule.unless) {
                assert_eq!(*k, k.to_ascii_lowercase(), "keyword {k:?} must be lowercase");
            }
        }
    }
}
