//! Route selection: which compiled routes may carry a recipient, in the order they are tried.
//! Pure; the worker walks the list, moving to the next route on connection failures and
//! temporary errors.

use mailroute_api::config::{CompiledRoute, RelayConfig};

/// Routes serving `sender` (envelope, empty for bounces) / `auth_user` → `rcpt_domain`, in try
/// order: lower priority first; at equal priority the more specific recipient pattern
/// (`docomo.ne.jp` before `*.ne.jp` before `*`), then routes that name senders before catch-alls,
/// then by id so every pod picks the same order.
pub fn candidates<'a>(
    cfg: &'a RelayConfig,
    sender: &str,
    auth_user: Option<&str>,
    rcpt_domain: &str,
) -> Vec<&'a CompiledRoute> {
    let mut v: Vec<(&CompiledRoute, usize)> = cfg
        .routes
        .iter()
        .filter(|r| r.serves(sender, auth_user, rcpt_domain))
        .map(|r| (r, r.domain_specificity(rcpt_domain).unwrap_or(0)))
        .collect();
    v.sort_by(|(a, sa), (b, sb)| {
        a.priority
            .cmp(&b.priority)
            .then(sb.cmp(sa))
            .then(a.senders.is_any().cmp(&b.senders.is_any()))
            .then(a.id.cmp(&b.id))
    });
    v.into_iter().map(|(r, _)| r).collect()
}

/// The lower-case A-label form of a domain (`bücher.example` → `xn--bcher-kva.example`), which
/// is what routes match and MX lookups use; `None` if it is not a valid IDN.
pub fn ascii_domain(domain: &str) -> Option<String> {
    if domain.is_ascii() {
        return Some(domain.to_ascii_lowercase());
    }
    idna::domain_to_ascii(domain).ok().map(|d| d.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_api::Manifests;

    fn cfg(yaml: &str) -> RelayConfig {
        let m = Manifests::from_yaml(yaml, "mail").expect("yaml");
        let c = m.compile();
        assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
        c.config
    }

    const ROUTES: &str = r#"
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: default-mx}
spec: {delivery: mx, priority: 1000, match: {recipientDomains: ["*"]}}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: primary}
spec: {host: smtp-a.test, port: 25, tls: {mode: none}, priority: 10, match: {recipientDomains: ["*"]}}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: backup}
spec: {host: smtp-b.test, port: 25, tls: {mode: none}, priority: 20, match: {recipientDomains: ["*"]}}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: carrier}
spec: {host: carrier.test, port: 25, tls: {mode: none}, priority: 10, match: {recipientDomains: ["docomo.ne.jp", "*.softbank.jp"]}}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: shop}
spec: {host: shop.test, port: 25, tls: {mode: none}, priority: 5, match: {recipientDomains: ["*"], senders: {fromDomains: ["shop.example"]}}}
"#;

    fn ids(v: Vec<&CompiledRoute>) -> Vec<&str> {
        v.into_iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn priority_then_specificity() {
        let c = cfg(ROUTES);
        assert_eq!(
            ids(candidates(&c, "a@app.example", None, "gmail.com")),
            ["mail/primary", "mail/backup", "mail/default-mx"]
        );
        assert_eq!(
            ids(candidates(&c, "a@app.example", None, "docomo.ne.jp")),
            ["mail/carrier", "mail/primary", "mail/backup", "mail/default-mx"]
        );
        assert_eq!(
            ids(candidates(&c, "a@app.example", None, "x.softbank.jp"))[0],
            "mail/carrier"
        );
        assert_eq!(
            ids(candidates(&c, "a@app.example", None, "softbank.jp"))[0],
            "mail/primary"
        );
    }

    #[test]
    fn sender_selectors_restrict_routes() {
        let c = cfg(ROUTES);
        assert_eq!(
            ids(candidates(&c, "news@shop.example", None, "gmail.com"))[0],
            "mail/shop"
        );
        assert!(!ids(candidates(&c, "a@app.example", None, "gmail.com")).contains(&"mail/shop"));
        // Bounces (null sender) are not from shop.example.
        assert!(!ids(candidates(&c, "", None, "gmail.com")).contains(&"mail/shop"));
    }

    #[test]
    fn idn_domains_route_by_their_a_labels() {
        assert_eq!(
            ascii_domain("B\u{fc}cher.Example").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(ascii_domain("Docomo.NE.jp").as_deref(), Some("docomo.ne.jp"));
    }

    #[test]
    fn no_route_gives_empty_list() {
        let c = cfg(r#"
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: only-carrier}
spec: {host: carrier.test, port: 25, tls: {mode: none}, match: {recipientDomains: ["docomo.ne.jp"]}}
"#);
        assert!(candidates(&c, "a@b.example", None, "gmail.com").is_empty());
    }
}
