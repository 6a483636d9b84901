//! Keeping the last good version of a route whose Secret is broken for a moment (a rotation in
//! progress): the operator calls `keep_last_good` after `compile` with the configuration in use.

use std::collections::BTreeSet;

use super::route::clashes;
use super::{Compiled, Diagnostic, ObjectKind, ObjectRef, Reason, Severity};
use crate::config::{RelayConfig, RelaySecrets};

/// Whether `d` is about a Secret an object references (missing, a key missing, empty, not text,
/// not PEM): most often a rotation in progress, not a broken spec.
pub fn is_secret_error(d: &Diagnostic) -> bool {
    d.severity == Severity::Error
        && (d.reason == Reason::SecretNotFound
            || d.field
                .as_deref()
                .is_some_and(|f| f.to_ascii_lowercase().ends_with("secretref")))
}

/// Puts back the last good version of every route left out only because of a Secret error:
/// a working configuration is never replaced by one that drops a route because one object is
/// broken for a moment (a Secret missing or mistyped during a rotation). `last`/`last_secrets`
/// are the configuration in use; a route is kept only if it is there and clashes with no route
/// of `compiled`. It governs the namespaces the route governs now (`Compiled::route_authorities`),
/// not those of the configuration in use. Its diagnostics stay (its status says it runs on its
/// last good version). Returns the ids of the routes kept.
pub fn keep_last_good(compiled: &mut Compiled, last: &RelayConfig, last_secrets: &RelaySecrets) -> BTreeSet<String> {
    let failed: BTreeSet<ObjectRef> = compiled
        .diagnostics
        .iter()
        .filter(|d| d.object.kind == ObjectKind::SmtpRoute && d.severity == Severity::Error)
        .map(|d| d.object.clone())
        .collect();
    let mut kept = BTreeSet::new();
    for object in failed {
        let id = object.id();
        let only_secrets = compiled
            .diagnostics_for(&object)
            .filter(|d| d.severity == Severity::Error)
            .all(is_secret_error);
        let Some(mut good) = last.routes.iter().find(|r| r.id == id).cloned() else {
            continue;
        };
        if let Some(a) = compiled.route_authorities.get(&object) {
            good.authority = a.clone();
        }
        let taken = compiled.config.routes.iter().any(|r| r.id == id || clashes(r, &good));
        if !only_secrets || taken {
            continue;
        }
        compiled.config.routes.push(good);
        if let Some(c) = last_secrets.upstream_credentials.get(&id) {
            compiled.secrets.upstream_credentials.insert(id.clone(), c.clone());
        }
        if let Some(ca) = last_secrets.upstream_ca.get(&id) {
            compiled.secrets.upstream_ca.insert(id.clone(), ca.clone());
        }
        if let Some(o) = last_secrets.upstream_oauth2.get(&id) {
            compiled.secrets.upstream_oauth2.insert(id.clone(), o.clone());
        }
        if let Some(k) = last_secrets.dkim_keys.get(&id) {
            compiled.secrets.dkim_keys.insert(id.clone(), k.clone());
        }
        kept.insert(id);
    }
    compiled
        .config
        .routes
        .sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Manifests;
    use crate::config::CONFIG_VERSION;

    const ROUTES: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: gmail-credentials, namespace: mail}
stringData: {username: app@example.com, password: app-password}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: gmail, namespace: mail}
spec:
  host: smtp.gmail.com
  port: 465
  tls: {mode: implicit}
  priority: 10
  auth: {secretRef: {name: gmail-credentials}}
  match: {recipientDomains: ["*"]}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: local, namespace: mail}
spec:
  host: 127.0.0.1
  port: 2525
  tls: {mode: none}
  priority: 5
  match: {recipientDomains: [local.example]}
"#;

    fn compile_yaml(yaml: &str) -> Compiled {
        Manifests::from_yaml(yaml, "default").unwrap().compile()
    }

    /// The routes with the Secret replaced (or removed when `secret` is empty).
    fn with_secret(secret: &str) -> String {
        let rest = ROUTES.split_once("---\n").unwrap().1;
        format!("{secret}{rest}")
    }

    fn ids(c: &Compiled) -> Vec<&str> {
        c.config.routes.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn a_route_whose_secret_is_missing_or_mistyped_keeps_its_last_good_version() {
        let good = compile_yaml(ROUTES);
        assert_eq!(ids(&good), ["mail/local", "mail/gmail"]);
        let broken = [
            with_secret(""),
            // Mistyped key: `user` instead of `username`.
            with_secret(
                "apiVersion: v1\nkind: Secret\nmetadata: {name: gmail-credentials, namespace: mail}\nstringData: {user: app@example.com, password: new}\n---\n",
            ),
            with_secret(
                "apiVersion: v1\nkind: Secret\nmetadata: {name: gmail-credentials, namespace: mail}\nstringData: {username: app@example.com, password: \"\"}\n---\n",
            ),
        ];
        for yaml in broken {
            let mut c = compile_yaml(&yaml);
            assert_eq!(ids(&c), ["mail/local"], "the broken route alone is left out: {yaml}");
            let kept = keep_last_good(&mut c, &good.config, &good.secrets);
            assert_eq!(kept.into_iter().collect::<Vec<_>>(), ["mail/gmail"]);
            assert_eq!(c.config, good.config, "{yaml}");
            assert_eq!(c.secrets, good.secrets);
            assert_eq!(c.config.content_hash(), good.config.content_hash());
            // The diagnostics stay, for the route's status.
            assert!(
                c.diagnostics
                    .iter()
                    .any(|d| d.object.name == "gmail" && is_secret_error(d))
            );
        }
    }

    #[test]
    fn nothing_is_kept_for_a_broken_spec_a_new_route_or_a_clash() {
        let good = compile_yaml(ROUTES);
        // A spec error is the author's to fix: the route goes.
        let bad_spec = ROUTES.replace("port: 465", "port: 0");
        let mut c = compile_yaml(&bad_spec);
        assert!(keep_last_good(&mut c, &good.config, &good.secrets).is_empty());
        assert_eq!(ids(&c), ["mail/local"]);
        // No last good version: nothing to keep.
        let mut c = compile_yaml(&with_secret(""));
        let empty = RelayConfig {
            version: CONFIG_VERSION,
            routes: Vec::new(),
            quotas: Vec::new(),
            webhooks: Vec::new(),
        };
        assert!(keep_last_good(&mut c, &empty, &RelaySecrets::default()).is_empty());
        assert_eq!(ids(&c), ["mail/local"]);
        // A route that took its place (same priority and domains) wins over the old version.
        let taken = format!(
            "{}---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: other, namespace: mail}}\nspec: {{host: other.example, tls: {{mode: none}}, priority: 10, match: {{recipientDomains: [\"*\"]}}}}\n",
            with_secret("")
        );
        let mut c = compile_yaml(&taken);
        assert!(keep_last_good(&mut c, &good.config, &good.secrets).is_empty());
        assert_eq!(ids(&c), ["mail/local", "mail/other"]);
    }

    #[test]
    fn a_kept_route_governs_what_its_namespace_may_govern_now() {
        // Compiled when `mail` was a platform namespace: it served everyone.
        let good = compile_yaml(ROUTES);
        assert_eq!(good.config.routes[1].authority.namespaces, None);
        // `mail` is a tenant namespace now and the route's Secret is missing for a moment.
        let tenancy = crate::compile::Tenancy {
            platform_namespaces: Some(["mailroute".to_string()].into()),
            ..Default::default()
        };
        let mut c = Manifests::from_yaml(&with_secret(""), "default")
            .unwrap()
            .compile_for(&tenancy);
        let kept = keep_last_good(&mut c, &good.config, &good.secrets);
        assert_eq!(kept.into_iter().collect::<Vec<_>>(), ["mail/gmail"]);
        let gmail = c.config.routes.iter().find(|r| r.id == "mail/gmail").unwrap();
        assert!(gmail.authority.tenant);
        assert_eq!(gmail.authority.namespaces, Some(vec!["mail".to_string()]));
    }
}
