//! Route selection: which compiled routes may carry a recipient, in the order they are tried.
//! Pure; the worker walks the list, moving to the next route on connection failures and
//! temporary errors.
//!
//! Authority follows the namespace: a route is a candidate only if it governs the message's
//! namespace (a tenant's route: its own namespace only; a platform route: the namespaces it was
//! compiled to serve, and unattributed mail only if it serves every namespace). Precedence:
//! enforced platform routes, when one matches, are the only candidates (tenants cannot bypass
//! them, not even by fallback); otherwise the tenant's own routes come first and the other
//! platform routes after them; within a class, priority and specificity as before.

use mailroute_api::config::{CompiledRoute, RelayConfig};

/// Routes governing `namespace` (`None`: unattributed) and serving `sender` (envelope, empty
/// for bounces) / `auth_user` → `rcpt_domain`, in try order: by precedence class (see the
/// module doc), then lower priority first; at equal priority the more specific recipient
/// pattern (`docomo.ne.jp` before `*.ne.jp` before `*`), then routes that name senders before
/// catch-alls, then by id so every pod picks the same order.
pub fn candidates<'a>(
    cfg: &'a RelayConfig,
    namespace: Option<&str>,
    sender: &str,
    auth_user: Option<&str>,
    rcpt_domain: &str,
) -> Vec<&'a CompiledRoute> {
    let mut v: Vec<(&CompiledRoute, usize)> = cfg
        .routes
        .iter()
        .filter(|r| r.authority.governs(namespace) && r.serves(sender, auth_user, rcpt_domain))
        .map(|r| (r, r.domain_specificity(rcpt_domain).unwrap_or(0)))
        .collect();
    if v.iter().any(|(r, _)| r.authority.class() == 0) {
        v.retain(|(r, _)| r.authority.class() == 0);
    }
    v.sort_by(|(a, sa), (b, sb)| {
        a.authority
            .class()
            .cmp(&b.authority.class())
            .then(a.priority.cmp(&b.priority))
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
            ids(candidates(&c, None, "a@app.example", None, "gmail.com")),
            ["mail/primary", "mail/backup", "mail/default-mx"]
        );
        assert_eq!(
            ids(candidates(&c, None, "a@app.example", None, "docomo.ne.jp")),
            ["mail/carrier", "mail/primary", "mail/backup", "mail/default-mx"]
        );
        assert_eq!(
            ids(candidates(&c, None, "a@app.example", None, "x.softbank.jp"))[0],
            "mail/carrier"
        );
        assert_eq!(
            ids(candidates(&c, None, "a@app.example", None, "softbank.jp"))[0],
            "mail/primary"
        );
    }

    #[test]
    fn sender_selectors_restrict_routes() {
        let c = cfg(ROUTES);
        assert_eq!(
            ids(candidates(&c, None, "news@shop.example", None, "gmail.com"))[0],
            "mail/shop"
        );
        assert!(!ids(candidates(&c, None, "a@app.example", None, "gmail.com")).contains(&"mail/shop"));
        // Bounces (null sender) are not from shop.example.
        assert!(!ids(candidates(&c, None, "", None, "gmail.com")).contains(&"mail/shop"));
    }

    #[test]
    fn idn_domains_route_by_their_a_labels() {
        assert_eq!(
            ascii_domain("B\u{fc}cher.Example").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(ascii_domain("Docomo.NE.jp").as_deref(), Some("docomo.ne.jp"));
    }

    fn tenants() -> RelayConfig {
        let route = |ns: &str, name: &str, extra: &str| {
            format!(
                "---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{host: {name}.test, port: 25, tls: {{mode: none}}{extra}}}\n"
            )
        };
        let yaml = [
            route("team-b", "grab", ", priority: 0, match: {recipientDomains: ['*']}"),
            route("team-a", "own", ", priority: 50"),
            route(
                "team-a",
                "carrier",
                ", priority: 10, match: {recipientDomains: ['docomo.ne.jp']}",
            ),
            route("mailroute", "platform", ", priority: 1"),
            route(
                "mailroute",
                "basic-only",
                ", priority: 2, allowedNamespaces: {from: Selector, selector: {matchLabels: {plan: basic}}}",
            ),
            route(
                "mailroute",
                "compliance",
                ", priority: 500, enforced: true, match: {recipientDomains: ['bank.example']}",
            ),
        ]
        .concat();
        let tenancy = mailroute_api::Tenancy {
            platform_namespaces: Some(["mailroute".to_string()].into()),
            namespace_labels: [
                ("team-a".to_string(), [("plan".to_string(), "basic".to_string())].into()),
                ("team-b".to_string(), Default::default()),
            ]
            .into(),
        };
        let c = Manifests::from_yaml(&yaml, "mail").unwrap().compile_for(&tenancy);
        assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
        c.config
    }

    #[test]
    fn a_tenant_route_never_captures_another_namespaces_mail() {
        let c = tenants();
        // team-b's `*` at priority 0 is not a candidate for team-a's, nor unattributed, mail.
        for ns in [Some("team-a"), None] {
            assert!(!ids(candidates(&c, ns, "a@shop.example", None, "gmail.com")).contains(&"team-b/grab"));
        }
        // Its own namespace's mail takes it first, before platform routes of a lower number.
        assert_eq!(
            ids(candidates(&c, Some("team-b"), "a@b.example", None, "gmail.com")),
            ["team-b/grab", "mailroute/platform"]
        );
    }

    #[test]
    fn tenant_routes_win_over_platform_routes_which_serve_the_namespaces_they_select() {
        let c = tenants();
        assert_eq!(
            ids(candidates(&c, Some("team-a"), "a@shop.example", None, "gmail.com")),
            ["team-a/own", "mailroute/platform", "mailroute/basic-only"]
        );
        assert_eq!(
            ids(candidates(&c, Some("team-a"), "a@shop.example", None, "docomo.ne.jp")),
            [
                "team-a/carrier",
                "team-a/own",
                "mailroute/platform",
                "mailroute/basic-only"
            ]
        );
        // Unattributed mail: only platform routes serving every namespace.
        assert_eq!(
            ids(candidates(&c, None, "a@shop.example", None, "gmail.com")),
            ["mailroute/platform"]
        );
    }

    #[test]
    fn an_enforced_platform_route_beats_tenant_routes_without_fallback() {
        let c = tenants();
        for ns in [Some("team-a"), Some("team-b"), None] {
            assert_eq!(
                ids(candidates(&c, ns, "a@shop.example", None, "bank.example")),
                ["mailroute/compliance"],
                "{ns:?}"
            );
        }
    }

    #[test]
    fn no_route_gives_empty_list() {
        let c = cfg(r#"
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: only-carrier}
spec: {host: carrier.test, port: 25, tls: {mode: none}, match: {recipientDomains: ["docomo.ne.jp"]}}
"#);
        assert!(candidates(&c, None, "a@b.example", None, "gmail.com").is_empty());
    }
}
