//! Authority follows the namespace: which senders' namespaces a route or quota governs. Objects
//! in a platform namespace serve the namespaces their `allowedNamespaces` picks (all by
//! default); objects anywhere else govern their own namespace only. Label selectors are
//! resolved here against the namespaces the operator knows, so the compiled configuration holds
//! explicit namespace lists and relays never evaluate labels. Pure; no I/O.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{Diags, Reason, Severity};
use crate::config::Authority;
use crate::tenancy::{AllowedNamespaces, FromNamespaces};

/// What `compile` knows about the cluster's namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tenancy {
    /// The platform namespaces; `None`: every namespace is one (a single-tenant install, or
    /// manifests compiled outside a cluster), which is how mailroute behaved before tenancy.
    pub platform_namespaces: Option<BTreeSet<String>>,
    /// The labels of every namespace, for `allowedNamespaces.selector`.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// Every namespace is a platform namespace (for references that must live as long as the program).
pub static SINGLE_TENANT: Tenancy = Tenancy {
    platform_namespaces: None,
    namespace_labels: BTreeMap::new(),
};

impl Tenancy {
    /// Every namespace is a platform namespace.
    pub fn single_tenant() -> Self {
        Self::default()
    }

    pub fn is_platform(&self, namespace: &str) -> bool {
        self.platform_namespaces.as_ref().is_none_or(|p| p.contains(namespace))
    }

    /// The authority of an object in `namespace` with these settings. `enforced` is for routes.
    pub(super) fn authority(
        &self,
        namespace: &str,
        allowed: Option<&AllowedNamespaces>,
        enforced: bool,
        d: &mut Diags<'_>,
    ) -> Authority {
        let own = || Some(vec![namespace.to_string()]);
        if !self.is_platform(namespace) {
            if allowed.is_some_and(|a| a.from != FromNamespaces::Same) {
                d.warn(
                    Reason::NotPlatform,
                    "spec.allowedNamespaces",
                    format!("namespace {namespace} is not a platform namespace: this object governs its own namespace's mail only"),
                );
            }
            if enforced {
                d.warn(
                    Reason::NotPlatform,
                    "spec.enforced",
                    format!("namespace {namespace} is not a platform namespace: `enforced` is ignored"),
                );
            }
            return Authority {
                namespace: namespace.into(),
                tenant: true,
                enforced: false,
                namespaces: own(),
            };
        }
        let namespaces = match allowed {
            None => None,
            Some(a) => match a.from {
                FromNamespaces::All => None,
                FromNamespaces::Same => own(),
                FromNamespaces::Selector => match &a.selector {
                    None => {
                        d.error(
                            Reason::InvalidSpec,
                            "spec.allowedNamespaces.selector",
                            "from: Selector needs a selector",
                        );
                        Some(vec![])
                    }
                    Some(sel) => match self.select(sel) {
                        Ok(list) => Some(list),
                        Err(e) => {
                            d.error(Reason::InvalidSpec, "spec.allowedNamespaces.selector", e);
                            Some(vec![])
                        }
                    },
                },
            },
        };
        Authority {
            namespace: namespace.into(),
            tenant: false,
            enforced,
            namespaces,
        }
    }

    /// The known namespaces whose labels match `sel`, sorted.
    pub fn select(&self, sel: &LabelSelector) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for (ns, labels) in &self.namespace_labels {
            if selector_matches(sel, labels)? {
                out.push(ns.clone());
            }
        }
        Ok(out)
    }
}

/// Kubernetes label selector semantics: every `matchLabels` pair and every `matchExpressions`
/// requirement (`In`, `NotIn`, `Exists`, `DoesNotExist`) must hold; an empty selector matches
/// everything. `Err` for an unknown operator or a requirement with the wrong values.
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    let mut ok = true;
    for (k, v) in sel.match_labels.iter().flatten() {
        ok &= labels.get(k) == Some(v);
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let got = labels.get(&e.key);
        let holds = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!("operator {} on key {} needs values", e.operator, e.key));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!("operator {} on key {} takes no values", e.operator, e.key));
            }
            "In" => got.is_some_and(|g| values.contains(g)),
            "NotIn" => got.is_none_or(|g| !values.contains(g)),
            "Exists" => got.is_some(),
            "DoesNotExist" => got.is_none(),
            other => return Err(format!("unknown operator `{other}` (In, NotIn, Exists, DoesNotExist)")),
        };
        ok &= holds;
    }
    Ok(ok)
}

impl Diags<'_> {
    fn warn(&mut self, reason: Reason, field: &str, message: impl Into<String>) {
        self.out.push(super::Diagnostic {
            object: self.object.clone(),
            severity: Severity::Warning,
            reason,
            field: Some(field.to_string()),
            message: message.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::Compiled;
    use crate::config::{InboundUser, QuotaSelector};
    use crate::{Manifests, Reason, Severity};

    /// Platform namespace `mailroute`; tenants `team-a` (plan basic), `team-b` (plan pro) and
    /// `shop-42` (plan basic).
    pub(crate) fn tenancy() -> Tenancy {
        let ns = |plan: &str| BTreeMap::from([("plan".to_string(), plan.to_string())]);
        Tenancy {
            platform_namespaces: Some(BTreeSet::from(["mailroute".to_string()])),
            namespace_labels: BTreeMap::from([
                ("mailroute".into(), BTreeMap::new()),
                ("team-a".into(), ns("basic")),
                ("team-b".into(), ns("pro")),
                ("shop-42".into(), ns("basic")),
            ]),
        }
    }

    fn compile(yaml: &str) -> Compiled {
        Manifests::from_yaml(yaml, "default").unwrap().compile_for(&tenancy())
    }

    fn route(ns: &str, name: &str, extra: &str) -> String {
        format!(
            "---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: {name}.test\n{extra}\n"
        )
    }

    #[test]
    fn a_tenant_route_governs_only_its_own_namespace_whatever_it_asks_for() {
        let yaml = route(
            "team-b",
            "grab-all",
            "  priority: 0\n  match: {recipientDomains: ['*']}\n  allowedNamespaces: {from: All}\n  enforced: true",
        ) + &route("team-a", "own", "  priority: 0\n  match: {recipientDomains: ['*']}");
        let c = compile(&yaml);
        let grab = c.config.routes.iter().find(|r| r.id == "team-b/grab-all").unwrap();
        assert_eq!(
            grab.authority,
            Authority {
                namespace: "team-b".into(),
                tenant: true,
                enforced: false,
                namespaces: Some(vec!["team-b".into()]),
            }
        );
        assert!(!grab.authority.governs(Some("team-a")));
        assert!(!grab.authority.governs(None), "unattributed mail is not a tenant's");
        // Both of its platform-only settings are reported, as warnings: the route still serves team-b.
        let warnings: Vec<_> = c
            .diagnostics
            .iter()
            .filter(|d| d.object.name == "grab-all")
            .map(|d| (d.severity, d.reason, d.field.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            warnings,
            [
                (Severity::Warning, Reason::NotPlatform, "spec.allowedNamespaces".into()),
                (Severity::Warning, Reason::NotPlatform, "spec.enforced".into()),
            ]
        );
        // Same priority, senders and domains in two tenants' namespaces: no conflict, both kept.
        assert_eq!(c.config.routes.len(), 2, "{:?}", c.diagnostics);
    }

    #[test]
    fn platform_routes_serve_all_the_same_or_the_selected_namespaces() {
        let yaml = route("mailroute", "all", "")
            + &route("mailroute", "same", "  allowedNamespaces: {from: Same}\n  priority: 1")
            + &route(
                "mailroute",
                "basic",
                "  allowedNamespaces: {from: Selector, selector: {matchLabels: {plan: basic}}}\n  priority: 2",
            )
            + &route(
                "mailroute",
                "not-pro",
                "  allowedNamespaces: {from: Selector, selector: {matchExpressions: [{key: plan, operator: NotIn, values: [pro]}]}}\n  priority: 3\n  enforced: true",
            );
        let c = compile(&yaml);
        assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
        let auth = |name: &str| {
            c.config
                .routes
                .iter()
                .find(|r| r.id == format!("mailroute/{name}"))
                .unwrap()
                .authority
                .clone()
        };
        let all = auth("all");
        assert_eq!((all.tenant, all.enforced, all.namespaces.clone()), (false, false, None));
        assert!(all.governs(Some("team-a")) && all.governs(Some("team-b")) && all.governs(None));
        assert_eq!(auth("same").namespaces, Some(vec!["mailroute".into()]));
        assert_eq!(
            auth("basic").namespaces,
            Some(vec!["shop-42".into(), "team-a".into()]),
            "sorted explicit list"
        );
        let not_pro = auth("not-pro");
        assert!(not_pro.enforced);
        assert_eq!(
            not_pro.namespaces,
            Some(vec!["mailroute".into(), "shop-42".into(), "team-a".into()])
        );
        // The relay configuration carries names only: no label, no selector.
        let json = c.config.to_canonical_json();
        assert!(!json.contains("plan"), "{json}");
    }

    #[test]
    fn a_broken_selector_leaves_the_route_out_with_the_reason() {
        let c = compile(&route(
            "mailroute",
            "bad",
            "  allowedNamespaces: {from: Selector, selector: {matchExpressions: [{key: plan, operator: Near, values: [x]}]}}",
        ));
        assert!(c.config.routes.is_empty());
        let d = &c.diagnostics[0];
        assert_eq!((d.severity, d.reason), (Severity::Error, Reason::InvalidSpec));
        assert!(d.message.contains("unknown operator `Near`"), "{}", d.message);
        let c = compile(&route("mailroute", "bad", "  allowedNamespaces: {from: Selector}"));
        assert!(c.config.routes.is_empty());
        assert!(c.diagnostics[0].message.contains("needs a selector"));
    }

    #[test]
    fn selector_semantics_follow_kubernetes() {
        let sel = |y: &str| serde_yaml::from_str::<LabelSelector>(y).unwrap();
        let labels = BTreeMap::from([("plan".to_string(), "basic".to_string())]);
        let none = BTreeMap::new();
        assert!(selector_matches(&sel("{}"), &none).unwrap(), "empty matches everything");
        assert!(selector_matches(&sel("{matchLabels: {plan: basic}}"), &labels).unwrap());
        assert!(!selector_matches(&sel("{matchLabels: {plan: basic}}"), &none).unwrap());
        let expr = |op: &str, vals: &str| sel(&format!("{{matchExpressions: [{{key: plan, operator: {op}{vals}}}]}}"));
        assert!(selector_matches(&expr("In", ", values: [basic, pro]"), &labels).unwrap());
        assert!(!selector_matches(&expr("NotIn", ", values: [basic]"), &labels).unwrap());
        assert!(selector_matches(&expr("NotIn", ", values: [basic]"), &none).unwrap());
        assert!(selector_matches(&expr("Exists", ""), &labels).unwrap());
        assert!(selector_matches(&expr("DoesNotExist", ""), &none).unwrap());
        assert!(selector_matches(&expr("In", ""), &labels).is_err());
        assert!(selector_matches(&expr("Exists", ", values: [x]"), &labels).is_err());
    }

    fn quota(ns: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
        )
    }

    #[test]
    fn namespace_quotas_and_sender_quotas_compile_side_by_side() {
        let yaml = quota(
            "mailroute",
            "plan-basic",
            "  scope: Namespace\n  allowedNamespaces: {from: Selector, selector: {matchLabels: {plan: basic}}}\n  appliesTo: bulk\n  limits: {perMonth: 10000}",
        ) + &quota("team-a", "cap", "  scope: Namespace\n  limits: {perDay: 500}")
            + &quota("team-a", "any", "  sender: {fromDomain: '*'}\n  limits: {perDay: 100}")
            + &quota("team-b", "any", "  sender: {fromDomain: '*'}\n  limits: {perDay: 100}")
            + &quota(
                "mailroute",
                "any",
                "  sender: {fromDomain: '*'}\n  limits: {perDay: 1000}",
            )
            + &quota("team-a", "broken", "  scope: Namespace\n  sender: {fromDomain: '*'}");
        let c = compile(&yaml);
        let errors: Vec<_> = c.diagnostics.iter().filter(|d| d.severity == Severity::Error).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].object.id(), "team-a/broken");
        let q = |id: &str| c.config.quotas.iter().find(|q| q.id == id).unwrap();
        let plan = q("mailroute/plan-basic");
        assert_eq!(plan.selector, QuotaSelector::Namespace);
        assert_eq!(plan.authority.namespaces, Some(vec!["shop-42".into(), "team-a".into()]));
        assert_eq!(q("team-a/cap").authority.namespaces, Some(vec!["team-a".into()]));
        // The same selector in two tenants and the platform: three quotas, no conflict.
        assert_eq!(q("team-b/any").authority.namespaces, Some(vec!["team-b".into()]));
        assert_eq!(q("mailroute/any").authority.namespaces, None);
        assert_eq!(c.config.quotas.len(), 5);
    }

    #[test]
    fn an_auth_user_belongs_to_the_namespace_of_its_sender_quota() {
        let yaml = quota(
            "team-a",
            "shop",
            "  sender: {authUser: shop}\n  credentialsSecretRef: {name: creds}",
        ) + "---\napiVersion: v1\nkind: Secret\nmetadata: {name: creds, namespace: team-a}\nstringData: {username: shop, password: pw}\n";
        let c = compile(&yaml);
        assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
        let u = &c.secrets.inbound_users["shop"];
        assert_eq!((u.quota.as_str(), u.namespace()), ("team-a/shop", Some("team-a")));
        // Secrets compiled before tenancy have no namespace: it is the quota's.
        let old: InboundUser = serde_json::from_str(r#"{"passwordHash":"x","quota":"team-b/q"}"#).unwrap();
        assert_eq!(old.namespace(), Some("team-b"));
    }

    #[test]
    fn without_platform_namespaces_every_object_governs_everyone_as_before() {
        let yaml = route("team-b", "r", "  priority: 0");
        let c = Manifests::from_yaml(&yaml, "default").unwrap().compile();
        let a = &c.config.routes[0].authority;
        assert!(!a.tenant && a.namespaces.is_none() && a.governs(Some("team-a")) && a.governs(None));
    }

    #[test]
    fn version_1_documents_read_as_platform_objects_governing_everyone() {
        let v1 = r#"{"version":1,"routes":[{"id":"mail/r","priority":1,"target":{"kind":"mx"},
            "recipientDomains":["*"],"senders":{},"limits":{},"retry":{"intervalSecs":60,"lifetimeSecs":600,
            "backoff":"fixed","maxIntervalSecs":600}}],"quotas":[{"id":"mail/q","selector":{"kind":"authUser","value":"u"},
            "limits":[],"countBy":"messages","appliesTo":"all","onExceeded":"defer","timeZone":"UTC"}]}"#;
        let cfg: crate::RelayConfig = serde_json::from_str(v1).unwrap();
        assert_eq!(cfg.routes[0].authority, Authority::default());
        assert_eq!(cfg.quotas[0].authority, Authority::default());
        assert!(cfg.routes[0].authority.governs(Some("any")) && cfg.routes[0].authority.governs(None));
    }
}
