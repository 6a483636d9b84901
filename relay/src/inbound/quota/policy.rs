//! Which quotas apply to a sender, whether that sender may use its envelope-from domain, and
//! whether a message is bulk. Pure functions over the compiled configuration; no I/O, no
//! counters (those are in `store`).
//!
//! Authority follows the namespace: only quotas governing the sender's namespace apply. Of the
//! per-sender quotas, the most specific of the platform's and the most specific of the tenant's
//! own both count (a tenant can tighten a platform limit, never loosen it); every namespace
//! quota (`scope: Namespace`) governing the namespace counts beside them.

use std::net::IpAddr;

use mailroute_api::config::{CompiledQuota, QuotaSelector};
use mailroute_api::pattern::domain_of;

/// Who is sending, as known at `MAIL FROM`.
#[derive(Clone, Copy, Debug)]
pub struct SenderCtx<'a> {
    /// SMTP AUTH user name, when the session authenticated.
    pub auth_user: Option<&'a str>,
    /// The quota the authenticated user's credentials come from
    /// (`RelaySecrets::inbound_users[user].quota`), when known.
    pub auth_quota: Option<&'a str>,
    /// Envelope sender without angle brackets; empty for the null sender `<>`.
    pub mail_from: &'a str,
    /// The client's address (IPv4-mapped IPv6 addresses are treated as IPv4).
    pub source_ip: IpAddr,
    /// The sender's namespace; `None`: unattributed.
    pub namespace: Option<&'a str>,
}

/// The sender may not use its envelope-from domain: answer `550 5.7.1`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct PolicyRejection {
    /// The quota whose domain policy refused the sender (a metric label).
    pub quota_id: String,
    /// Reply text without code.
    pub text: String,
}

impl PolicyRejection {
    /// The reply: `550 5.7.1 …`.
    pub fn reply(&self) -> mailroute_smtp::Reply {
        mailroute_smtp::Reply::with_code(550, mailroute_smtp::EnhancedStatusCode::new(5, 7, 1), &self.text)
    }
}

/// Rank of a quota for a sender: (selector class, specificity within it). Higher wins.
fn rank(
    q: &CompiledQuota,
    ctx: &SenderCtx<'_>,
    from_lc: &str,
    from_domain: Option<&str>,
    ip: IpAddr,
) -> Option<(u8, usize)> {
    match &q.selector {
        QuotaSelector::AuthUser(u) if ctx.auth_user == Some(u.as_str()) => Some((4, 1)),
        _ if ctx.auth_user.is_some() && ctx.auth_quota == Some(q.id.as_str()) => Some((4, 0)),
        QuotaSelector::FromAddress(a) if !from_lc.is_empty() && a == from_lc => Some((3, 0)),
        QuotaSelector::FromDomain(p) => from_domain.filter(|d| p.matches(d)).map(|_| (2, p.specificity())),
        QuotaSelector::SourceCidrs(nets) => nets
            .iter()
            .filter(|n| n.contains(&ip))
            .map(|n| usize::from(n.prefix_len()))
            .max()
            .map(|len| (1, len)),
        _ => None,
    }
}

/// The most specific per-sender quota governing the sender: auth user (by selector, then by the
/// user's credentials) over from-address over from-domain (more specific pattern first) over
/// source CIDRs (longer prefix first). Ties go to the first quota in `quotas` (compiled sorted
/// by id). Platform and tenant quotas compete here; [`applicable`] keeps one of each.
pub fn select<'a>(quotas: &'a [CompiledQuota], ctx: &SenderCtx<'_>) -> Option<&'a CompiledQuota> {
    select_where(quotas, ctx, |_| true)
}

/// Every quota that counts a sender's mail: the platform's most specific per-sender quota, the
/// tenant's own most specific per-sender quota, then each namespace quota governing the
/// sender's namespace (none for unattributed mail), in configuration order.
pub fn applicable<'a>(quotas: &'a [CompiledQuota], ctx: &SenderCtx<'_>) -> Vec<&'a CompiledQuota> {
    let mut out = Vec::new();
    out.extend(select_where(quotas, ctx, |q| q.authority.tenant));
    out.extend(select_where(quotas, ctx, |q| !q.authority.tenant));
    if ctx.namespace.is_some() {
        out.extend(
            quotas
                .iter()
                .filter(|q| q.selector == QuotaSelector::Namespace && q.authority.governs(ctx.namespace)),
        );
    }
    out
}

fn select_where<'a>(
    quotas: &'a [CompiledQuota],
    ctx: &SenderCtx<'_>,
    keep: impl Fn(&CompiledQuota) -> bool,
) -> Option<&'a CompiledQuota> {
    let from_lc = ctx.mail_from.to_ascii_lowercase();
    let from_domain = domain_of(&from_lc);
    let ip = ctx.source_ip.to_canonical();
    let mut best: Option<((u8, usize), &CompiledQuota)> = None;
    let candidates = quotas
        .iter()
        .filter(|q| q.selector != QuotaSelector::Namespace && keep(q) && q.authority.governs(ctx.namespace));
    for q in candidates {
        if let Some(r) = rank(q, ctx, &from_lc, from_domain.as_deref(), ip)
            && best.is_none_or(|(b, _)| r > b)
        {
            best = Some((r, q));
        }
    }
    best.map(|(_, q)| q)
}

/// The quota's envelope-from domain policy. The null sender (bounces) always passes; a sender
/// without a usable domain fails an allow-list.
pub fn check_from_domain(q: &CompiledQuota, mail_from: &str) -> Result<(), PolicyRejection> {
    if mail_from.is_empty() {
        return Ok(());
    }
    let domain = domain_of(mail_from);
    let refuse = |text: String| {
        Err(PolicyRejection {
            quota_id: q.id.clone(),
            text,
        })
    };
    if let Some(d) = &domain
        && q.denied_from_domains.iter().any(|p| p.matches(d))
    {
        return refuse(format!("Sender domain {d} may not be used by this sender"));
    }
    if !q.allowed_from_domains.is_empty() {
        match &domain {
            Some(d) if q.allowed_from_domains.iter().any(|p| p.matches(d)) => {}
            Some(d) => return refuse(format!("Sender domain {d} is not one this sender may use")),
            None => return refuse("Sender address has no domain this sender may use".into()),
        }
    }
    Ok(())
}

/// Whether a message is bulk: `Precedence: bulk`, `list` or `junk`, or `bulk_header` present with
/// a value other than `0`, `false`, `no` or `off`. Reads only the header block (up to the first
/// empty line) of `message`; folded header lines are joined.
pub fn is_bulk(message: &[u8], bulk_header: Option<&str>) -> bool {
    headers(message).any(|(name, value)| {
        if name.eq_ignore_ascii_case("precedence") {
            let word = value.split(['(', ' ', '\t', ';']).find(|w| !w.is_empty()).unwrap_or("");
            ["bulk", "list", "junk"].iter().any(|b| word.eq_ignore_ascii_case(b))
        } else if bulk_header.is_some_and(|h| name.eq_ignore_ascii_case(h)) {
            let v = value.trim();
            !["0", "false", "no", "off"].iter().any(|f| v.eq_ignore_ascii_case(f))
        } else {
            false
        }
    })
}

/// `(name, unfolded value)` of each header field, stopping at the end of the header block.
fn headers(message: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    let mut lines = message
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.is_empty())
        .peekable();
    std::iter::from_fn(move || {
        loop {
            let line = lines.next()?;
            if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                continue; // continuation of a field we skipped (or a stray one)
            }
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let name = String::from_utf8_lossy(&line[..colon]).trim().to_string();
            let mut value = String::from_utf8_lossy(&line[colon + 1..]).into_owned();
            while let Some(next) = lines.next_if(|l| l.first().is_some_and(|b| *b == b' ' || *b == b'\t')) {
                value.push(' ');
                value.push_str(String::from_utf8_lossy(next).trim());
            }
            return Some((name, value.trim().to_string()));
        }
    })
}

#[cfg(test)]
mod tests {
    use mailroute_api::pattern::DomainPattern;
    use mailroute_api::quota::{AppliesTo, CountBy, OnExceeded};

    use super::*;

    fn quota(id: &str, selector: QuotaSelector) -> CompiledQuota {
        CompiledQuota {
            id: id.into(),
            authority: Default::default(),
            selector,
            limits: vec![],
            count_by: CountBy::Messages,
            applies_to: AppliesTo::All,
            bulk_header: None,
            on_exceeded: OnExceeded::Defer,
            time_zone: "UTC".into(),
            allowed_from_domains: vec![],
            denied_from_domains: vec![],
        }
    }

    fn pat(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    fn all_quotas() -> Vec<CompiledQuota> {
        vec![
            quota("ns/addr", QuotaSelector::FromAddress("ceo@shop.example".into())),
            quota(
                "ns/cidr16",
                QuotaSelector::SourceCidrs(vec!["10.1.0.0/16".parse().unwrap()]),
            ),
            quota(
                "ns/cidr8",
                QuotaSelector::SourceCidrs(vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()]),
            ),
            quota("ns/dom-exact", QuotaSelector::FromDomain(pat("mail.shop.example"))),
            quota("ns/dom-sub", QuotaSelector::FromDomain(pat("*.shop.example"))),
            quota("ns/dom-any", QuotaSelector::FromDomain(pat("*"))),
            quota("ns/user", QuotaSelector::AuthUser("shop-42".into())),
            quota("ns/user-cred", QuotaSelector::FromDomain(pat("creds.example"))),
        ]
    }

    fn pick(auth: Option<&str>, auth_quota: Option<&str>, from: &str, ip: &str) -> Option<String> {
        let qs = all_quotas();
        let ctx = SenderCtx {
            auth_user: auth,
            auth_quota,
            mail_from: from,
            source_ip: ip.parse().unwrap(),
            namespace: None,
        };
        select(&qs, &ctx).map(|q| q.id.clone())
    }

    #[test]
    fn most_specific_quota_wins() {
        let ip = "10.1.2.3";
        assert_eq!(
            pick(Some("shop-42"), None, "CEO@shop.example", ip).as_deref(),
            Some("ns/user")
        );
        // Credentials linked to a quota count as an auth-user match, below a selector match.
        assert_eq!(
            pick(Some("other"), Some("ns/user-cred"), "x@a.example", ip).as_deref(),
            Some("ns/user-cred")
        );
        assert_eq!(
            pick(Some("shop-42"), Some("ns/user-cred"), "x@a.example", ip).as_deref(),
            Some("ns/user")
        );
        // The credential link needs an authenticated session.
        assert_eq!(
            pick(None, Some("ns/user-cred"), "x@a.example", ip).as_deref(),
            Some("ns/dom-any")
        );
        assert_eq!(pick(None, None, "CEO@shop.example", ip).as_deref(), Some("ns/addr"));
        assert_eq!(
            pick(None, None, "a@mail.shop.example", ip).as_deref(),
            Some("ns/dom-exact")
        );
        assert_eq!(
            pick(None, None, "a@news.shop.example", ip).as_deref(),
            Some("ns/dom-sub")
        );
        assert_eq!(pick(None, None, "a@other.example", ip).as_deref(), Some("ns/dom-any"));
        // Null sender: no from-domain quota applies, the longest matching prefix does.
        assert_eq!(pick(None, None, "", ip).as_deref(), Some("ns/cidr16"));
        assert_eq!(pick(None, None, "", "10.9.9.9").as_deref(), Some("ns/cidr8"));
        assert_eq!(pick(None, None, "", "::ffff:10.1.0.1").as_deref(), Some("ns/cidr16"));
        assert_eq!(pick(None, None, "", "2001:db8::1").as_deref(), Some("ns/cidr8"));
        assert_eq!(pick(None, None, "", "192.0.2.1"), None);
        assert_eq!(pick(None, None, "not-an-address", "192.0.2.1"), None);
    }

    #[test]
    fn ties_go_to_the_first_quota_by_id() {
        let qs = vec![
            quota("a/first", QuotaSelector::FromDomain(pat("x.example"))),
            quota("b/second", QuotaSelector::FromDomain(pat("x.example"))),
        ];
        let ctx = SenderCtx {
            auth_user: None,
            auth_quota: None,
            mail_from: "u@x.example",
            source_ip: "127.0.0.1".parse().unwrap(),
            namespace: None,
        };
        assert_eq!(select(&qs, &ctx).unwrap().id, "a/first");
    }

    #[test]
    fn from_domain_policy() {
        let mut q = quota("ns/q", QuotaSelector::AuthUser("u".into()));
        q.denied_from_domains = vec![pat("platform.example"), pat("*.platform.example")];
        assert!(check_from_domain(&q, "shop@customer.example").is_ok());
        let e = check_from_domain(&q, "noreply@Mail.Platform.example").unwrap_err();
        assert_eq!(
            e.reply().to_string(),
            "550 5.7.1 Sender domain mail.platform.example may not be used by this sender"
        );
        assert_eq!(e.quota_id, "ns/q");
        assert!(check_from_domain(&q, "").is_ok());

        q.allowed_from_domains = vec![pat("customer.example")];
        assert!(check_from_domain(&q, "shop@customer.example").is_ok());
        assert_eq!(
            check_from_domain(&q, "shop@elsewhere.example")
                .unwrap_err()
                .reply()
                .to_string(),
            "550 5.7.1 Sender domain elsewhere.example is not one this sender may use"
        );
        assert!(check_from_domain(&q, "shop@[192.0.2.1]").is_err());
        assert!(check_from_domain(&q, "").is_ok());
        // Denied wins over allowed.
        q.allowed_from_domains.push(pat("platform.example"));
        assert!(check_from_domain(&q, "a@platform.example").is_err());
    }

    #[test]
    fn bulk_detection_reads_headers_only() {
        let m = |h: &str| format!("{h}Subject: hi\r\n\r\nbody\r\nPrecedence: bulk\r\n").into_bytes();
        assert!(!is_bulk(&m(""), None));
        assert!(is_bulk(&m("Precedence: bulk\r\n"), None));
        assert!(is_bulk(&m("precedence:List\r\n"), None));
        assert!(is_bulk(&m("Precedence: junk (auto)\r\n"), None));
        assert!(is_bulk(&m("Precedence:\r\n bulk\r\n"), None), "folded value");
        assert!(!is_bulk(&m("Precedence: first-class\r\n"), None));
        assert!(!is_bulk(&m("X-Precedence: bulk\r\n"), None));
        assert!(is_bulk(&m("X-Campaign-Id: 2025-spring\r\n"), Some("x-campaign-id")));
        assert!(is_bulk(&m("X-Campaign-Id:\r\n"), Some("X-Campaign-Id")), "present");
        assert!(!is_bulk(&m("X-Campaign-Id: false\r\n"), Some("X-Campaign-Id")));
        assert!(!is_bulk(&m("X-Campaign-Id: 0\r\n"), Some("X-Campaign-Id")));
        assert!(!is_bulk(&m("X-Campaign-Id: yes\r\n"), None), "not configured");
        // LF-only line endings and a header block without body.
        assert!(is_bulk(b"From: a@b.c\nPrecedence: list\n", None));
        // A body line that looks like a header is not a header.
        assert!(!is_bulk(b"Subject: x\r\n\r\nPrecedence: bulk\r\n", None));
    }
}
