//! An SmtpRoute: its target (MX, or a smarthost compiled by `upstream`), which mail it matches,
//! its limits, retry schedule, DKIM key and session timeouts; and the conflicts between routes
//! (same priority, same senders, a shared recipient domain).

use std::collections::BTreeSet;
use std::time::Duration;

use super::secrets::secret_value;
use super::upstream::{SecretsCx, compile_upstream};
use super::{Diagnostic, Diags, ObjectKind, ObjectRef, Reason, SecretStore, Severity};
use crate::config::{
    Authority, CompiledRoute, CompiledSenderMatch, DestinationLimits, DkimConfig, RelaySecrets, RetryConfig,
    RouteLimits, SessionTimeouts, Target,
};
use crate::pattern::{DomainPattern, split_address};
use crate::route::{
    Backoff, DeliveryMode, DestinationLimitSpec, DkimSpec, RetrySpec, SenderMatch, SmtpRouteSpec, TimeoutsSpec,
};

/// One route; `None` when it cannot be compiled at all. Its Secret values go to `out`.
pub(super) fn compile_route(
    object: &ObjectRef,
    spec: &SmtpRouteSpec,
    authority: Authority,
    secrets: &SecretStore,
    d: &mut Diags<'_>,
    out: &mut RelaySecrets,
) -> Option<CompiledRoute> {
    let id = object.id();
    let mut cx = SecretsCx {
        id: &id,
        namespace: &object.namespace,
        secrets,
        out,
    };
    let target = match spec.delivery {
        DeliveryMode::Mx => {
            if spec.host.is_some() || spec.provider.is_some() || spec.auth.is_some() {
                d.error(
                    Reason::InvalidSpec,
                    "spec.delivery",
                    "`delivery: mx` takes no host, provider or auth",
                );
            }
            Target::Mx
        }
        DeliveryMode::Smarthost => Target::Smarthost(compile_upstream(spec, &mut cx, d)?),
    };
    let recipient_domains = recipient_domains(&spec.matches.recipient_domains, d);
    let senders = senders(&spec.matches.senders, d);
    if let Some(f) = &spec.from_override
        && let Err(e) = split_address(f)
    {
        d.error(Reason::InvalidSpec, "spec.fromOverride", e.to_string());
    }
    if let Some(t) = &spec.test_recipient
        && let Err(e) = split_address(t)
    {
        d.error(Reason::InvalidSpec, "spec.testRecipient", e.to_string());
    }
    let limits = limits(spec, d);
    let retry = retry(spec.retry.as_ref(), d);
    let dkim = spec.dkim.as_ref().map(|k| dkim(k, &mut cx, d));
    Some(CompiledRoute {
        id,
        authority,
        priority: spec.priority,
        target,
        recipient_domains,
        senders,
        from_override: spec.from_override.clone(),
        limits,
        retry,
        dkim,
        test_recipient: spec.test_recipient.clone(),
        timeouts: compile_timeouts(spec.timeouts.as_ref(), d),
        suspended: spec.suspended,
    })
}

/// `spec.match.recipientDomains`, sorted; none given means every domain.
fn recipient_domains(patterns: &[String], d: &mut Diags<'_>) -> Vec<DomainPattern> {
    let mut out = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        match DomainPattern::parse(p) {
            Ok(p) => out.push(p),
            Err(e) => d.error(
                Reason::InvalidSpec,
                &format!("spec.match.recipientDomains[{i}]"),
                e.to_string(),
            ),
        }
    }
    if out.is_empty() && patterns.is_empty() {
        out.push(DomainPattern::Any);
    }
    out.sort();
    out.dedup();
    out
}

/// `spec.match.senders`, each list sorted and without duplicates.
fn senders(s: &SenderMatch, d: &mut Diags<'_>) -> CompiledSenderMatch {
    let mut from_domains = Vec::new();
    for (i, p) in s.from_domains.iter().enumerate() {
        match DomainPattern::parse(p) {
            Ok(p) => from_domains.push(p),
            Err(e) => d.error(
                Reason::InvalidSpec,
                &format!("spec.match.senders.fromDomains[{i}]"),
                e.to_string(),
            ),
        }
    }
    let mut from_addresses = Vec::new();
    for (i, a) in s.from_addresses.iter().enumerate() {
        match split_address(a) {
            Ok(_) => from_addresses.push(a.to_ascii_lowercase()),
            Err(e) => d.error(
                Reason::InvalidSpec,
                &format!("spec.match.senders.fromAddresses[{i}]"),
                e.to_string(),
            ),
        }
    }
    let mut auth_users = s.auth_users.clone();
    for v in [&mut auth_users, &mut from_addresses] {
        v.sort();
        v.dedup();
    }
    from_domains.sort();
    from_domains.dedup();
    CompiledSenderMatch {
        auth_users,
        from_domains,
        from_addresses,
    }
}

/// `spec.limits`, the provider preset's filling those not set.
fn limits(spec: &SmtpRouteSpec, d: &mut Diags<'_>) -> RouteLimits {
    let preset = spec.provider.and_then(|p| p.preset(spec.region.as_deref()));
    let l = spec.limits.clone().unwrap_or_default();
    let limits = RouteLimits {
        messages_per_minute: l
            .messages_per_minute
            .or(preset.as_ref().and_then(|p| p.messages_per_minute)),
        recipients_per_day: l
            .recipients_per_day
            .or(preset.as_ref().and_then(|p| p.recipients_per_day)),
        max_connections: l.max_connections,
        messages_per_connection: l.messages_per_connection,
        per_destination: compile_destination_limits(&l.per_destination, d),
    };
    for (name, v) in [
        ("messagesPerMinute", limits.messages_per_minute),
        ("recipientsPerDay", limits.recipients_per_day),
        ("maxConnections", limits.max_connections),
        ("messagesPerConnection", limits.messages_per_connection),
    ] {
        if v == Some(0) {
            d.error(
                Reason::InvalidSpec,
                &format!("spec.limits.{name}"),
                format!("{name} must be at least 1"),
            );
        }
    }
    limits
}

/// `spec.retry`, defaults from [`RetryConfig::default`].
fn retry(spec: Option<&RetrySpec>, d: &mut Diags<'_>) -> RetryConfig {
    let defaults = RetryConfig::default();
    let r = spec.cloned().unwrap_or_default();
    let retry = RetryConfig {
        interval_secs: parse_duration(&r.interval, defaults.interval_secs, "spec.retry.interval", d),
        lifetime_secs: parse_duration(&r.lifetime, defaults.lifetime_secs, "spec.retry.lifetime", d),
        backoff: r.backoff.unwrap_or(Backoff::Fixed),
        max_interval_secs: parse_duration(&r.max_interval, defaults.max_interval_secs, "spec.retry.maxInterval", d),
    };
    if retry.interval_secs > retry.lifetime_secs {
        d.error(
            Reason::InvalidSpec,
            "spec.retry.interval",
            "the retry interval is longer than the lifetime",
        );
    }
    retry
}

/// `spec.dkim`: the domain and selector for the config, the key (checked) for the secrets.
fn dkim(k: &DkimSpec, cx: &mut SecretsCx<'_>, d: &mut Diags<'_>) -> DkimConfig {
    if !crate::pattern::is_valid_domain(&k.domain) {
        d.error(
            Reason::InvalidSpec,
            "spec.dkim.domain",
            format!("`{}` is not a domain", k.domain),
        );
    }
    let field = "spec.dkim.keySecretRef";
    let r = &k.key_secret_ref;
    if let Some(pem) = secret_value(cx.secrets, cx.namespace, &r.name, &r.key, field, d) {
        // A key the relay cannot sign with would send every message unsigned.
        match crate::dkim_key::check_signing_key(&pem) {
            Ok(_) => {
                cx.out.dkim_keys.insert(cx.id.to_string(), pem);
            }
            Err(reason) => d.error(Reason::InvalidSpec, field, reason),
        }
    }
    DkimConfig {
        domain: k.domain.to_ascii_lowercase(),
        selector: k.selector.clone(),
    }
}

fn parse_duration(value: &Option<String>, default: u64, field: &str, d: &mut Diags<'_>) -> u64 {
    let Some(s) = value else { return default };
    match humantime::parse_duration(s) {
        Ok(dur) if dur >= Duration::from_secs(1) => dur.as_secs(),
        Ok(_) => {
            d.error(Reason::InvalidSpec, field, format!("`{s}` is shorter than one second"));
            default
        }
        Err(e) => {
            d.error(
                Reason::InvalidSpec,
                field,
                format!("`{s}` is not a duration like `1m` or `30m`: {e}"),
            );
            default
        }
    }
}

/// Longest accepted session timeout: longer waits only hold a connection slot.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// `spec.timeouts`: each given field replaces its default from [`SessionTimeouts::default`].
fn compile_timeouts(spec: Option<&TimeoutsSpec>, d: &mut Diags<'_>) -> SessionTimeouts {
    let mut t = SessionTimeouts::default();
    let Some(spec) = spec else { return t };
    let fields = [
        ("connect", &spec.connect, &mut t.connect_ms),
        ("greeting", &spec.greeting, &mut t.greeting_ms),
        ("mail", &spec.mail, &mut t.mail_ms),
        ("rcpt", &spec.rcpt, &mut t.rcpt_ms),
        ("dataInit", &spec.data_init, &mut t.data_init_ms),
        ("dataTransfer", &spec.data_transfer, &mut t.data_transfer_ms),
        ("dataDone", &spec.data_done, &mut t.data_done_ms),
    ];
    for (name, value, out) in fields {
        let Some(s) = value else { continue };
        let field = format!("spec.timeouts.{name}");
        match humantime::parse_duration(s) {
            Ok(dur) if dur < Duration::from_secs(1) => {
                d.error(Reason::InvalidSpec, &field, format!("`{s}` is shorter than one second"));
            }
            Ok(dur) if dur > MAX_TIMEOUT => {
                d.error(Reason::InvalidSpec, &field, format!("`{s}` is longer than one hour"));
            }
            Ok(dur) => *out = dur.as_millis() as u64,
            Err(e) => d.error(
                Reason::InvalidSpec,
                &field,
                format!("`{s}` is not a duration like `30s` or `5m`: {e}"),
            ),
        }
    }
    t
}

/// `spec.limits.perDestination`, in the route's order (the order decides ties).
fn compile_destination_limits(specs: &[DestinationLimitSpec], d: &mut Diags<'_>) -> Vec<DestinationLimits> {
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let field = format!("spec.limits.perDestination[{i}]");
        let mut domains = Vec::new();
        for (j, p) in spec.domains.iter().enumerate() {
            match DomainPattern::parse(p) {
                Ok(p) => domains.push(p),
                Err(e) => d.error(Reason::InvalidSpec, &format!("{field}.domains[{j}]"), e.to_string()),
            }
        }
        if spec.domains.is_empty() {
            d.error(
                Reason::InvalidSpec,
                &format!("{field}.domains"),
                "domains must not be empty",
            );
        }
        domains.sort();
        domains.dedup();
        for (name, v) in [
            ("messagesPerMinute", spec.messages_per_minute),
            ("maxConnections", spec.max_connections),
            ("messagesPerConnection", spec.messages_per_connection),
        ] {
            if v == Some(0) {
                d.error(
                    Reason::InvalidSpec,
                    &format!("{field}.{name}"),
                    format!("{name} must be at least 1"),
                );
            }
        }
        if !domains.is_empty() {
            out.push(DestinationLimits {
                domains,
                messages_per_minute: spec.messages_per_minute,
                max_connections: spec.max_connections,
                messages_per_connection: spec.messages_per_connection,
            });
        }
    }
    out
}

/// Two routes are ambiguous: same precedence class and a shared governed namespace, same
/// priority, same senders, a shared domain pattern. Routes of different tenants never clash.
pub(super) fn clashes(a: &CompiledRoute, b: &CompiledRoute) -> bool {
    a.authority.overlaps(&b.authority)
        && a.priority == b.priority
        && a.senders == b.senders
        && a.recipient_domains.iter().any(|p| b.recipient_domains.contains(p))
}

/// Routes with the same priority, the same senders and a shared domain pattern are ambiguous: the
/// first by id stays (with a warning), the others are left out.
pub(super) fn resolve_conflicts(
    mut routes: Vec<CompiledRoute>,
    diagnostics: &mut Vec<Diagnostic>,
    secrets: &mut RelaySecrets,
) -> Vec<CompiledRoute> {
    routes.sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
    let mut kept: Vec<CompiledRoute> = Vec::new();
    for r in routes {
        let clash = kept.iter().find(|k| clashes(k, &r));
        if let Some(k) = clash {
            let shared: BTreeSet<String> = k
                .recipient_domains
                .iter()
                .filter(|p| r.recipient_domains.contains(p))
                .map(|p| p.to_string())
                .collect();
            let shared = shared.into_iter().collect::<Vec<_>>().join(", ");
            let (kn, rn) = (route_ref(&k.id), route_ref(&r.id));
            diagnostics.push(Diagnostic {
                object: rn.clone(),
                severity: Severity::Error,
                reason: Reason::Conflict,
                field: Some("spec.priority".into()),
                message: format!(
                    "SmtpRoute {} has the same priority {} for {shared} and the same senders; this route is not used",
                    k.id, r.priority
                ),
            });
            diagnostics.push(Diagnostic {
                object: kn,
                severity: Severity::Warning,
                reason: Reason::Conflict,
                field: Some("spec.priority".into()),
                message: format!(
                    "SmtpRoute {} has the same priority {} for {shared}; it is left out",
                    rn.id(),
                    r.priority
                ),
            });
            secrets.upstream_credentials.remove(&r.id);
            secrets.upstream_ca.remove(&r.id);
            secrets.dkim_keys.remove(&r.id);
            secrets.upstream_oauth2.remove(&r.id);
            continue;
        }
        kept.push(r);
    }
    kept
}

fn route_ref(id: &str) -> ObjectRef {
    let (namespace, name) = id.split_once('/').unwrap_or(("default", id));
    ObjectRef {
        kind: ObjectKind::SmtpRoute,
        namespace: namespace.into(),
        name: name.into(),
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;
    use crate::Manifests;
    use crate::compile::Compiled;
    use crate::config::RelayConfig;

    fn compile_with(timeouts: &str) -> Compiled {
        let yaml = format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata:\n  name: up\n  namespace: mail\nspec:\n  host: smtp.example.com\n{timeouts}"
        );
        let mut m = Manifests::default();
        m.add_yaml(&yaml, "default").unwrap();
        m.compile()
    }

    #[test]
    fn postfix_defaults_unless_overridden() {
        let c = compile_with("");
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let t = c.config.routes[0].timeouts;
        assert_eq!(
            (t.connect_ms, t.greeting_ms, t.mail_ms, t.rcpt_ms),
            (30_000, 300_000, 300_000, 300_000)
        );
        assert_eq!(
            (t.data_init_ms, t.data_transfer_ms, t.data_done_ms),
            (120_000, 180_000, 600_000)
        );
        // Default timeouts leave the compiled JSON as it was.
        assert!(!c.config.to_canonical_json().contains("timeouts"));

        let c = compile_with("  timeouts: {connect: 5s, greeting: 1m, dataDone: 20m}\n");
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let t = c.config.routes[0].timeouts;
        assert_eq!(
            t,
            SessionTimeouts {
                connect_ms: 5_000,
                greeting_ms: 60_000,
                data_done_ms: 1_200_000,
                ..SessionTimeouts::default()
            }
        );
        let json = c.config.to_canonical_json();
        let back: RelayConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.routes[0].timeouts, t, "{json}");
    }

    #[test]
    fn suspended_compiles_into_the_relay_config_and_defaults_to_off() {
        let c = compile_with("  suspended: true\n");
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        assert!(c.config.routes[0].suspended);
        assert!(!compile_with("").config.routes[0].suspended);
        // Configurations written before the field read as not suspended.
        let json = serde_json::to_value(&compile_with("").config.routes[0]).unwrap();
        assert!(json.get("suspended").is_none(), "{json}");
    }

    #[test]
    fn broken_timeouts_are_reported_and_leave_the_route_out() {
        let c = compile_with("  timeouts: {connect: soon, mail: 500ms, rcpt: 2h, dataInit: 30s}\n");
        let fields: BTreeSet<&str> = c.diagnostics.iter().filter_map(|d| d.field.as_deref()).collect();
        assert_eq!(
            fields,
            BTreeSet::from(["spec.timeouts.connect", "spec.timeouts.mail", "spec.timeouts.rcpt"])
        );
        assert!(c.config.routes.is_empty());
    }
}

#[cfg(test)]
mod per_destination_tests {
    use super::*;
    use crate::Manifests;
    use crate::compile::Compiled;

    fn compile_route_yaml(limits: &str) -> Compiled {
        let yaml = format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata:\n  name: mx\n  namespace: mail\nspec:\n  delivery: mx\n  limits:\n{limits}"
        );
        let mut m = Manifests::default();
        m.add_yaml(&yaml, "default").unwrap();
        m.compile()
    }

    #[test]
    fn per_destination_limits_compile_in_order() {
        let c = compile_route_yaml(
            "    messagesPerMinute: 100\n    perDestination:\n    - domains: [DoCoMo.ne.jp, '*.softbank.jp']\n      messagesPerMinute: 20\n      maxConnections: 1\n    - domains: ['*']\n      messagesPerConnection: 50\n",
        );
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let l = &c.config.routes[0].limits;
        assert_eq!(l.messages_per_minute, Some(100));
        assert_eq!(l.per_destination.len(), 2);
        let first = &l.per_destination[0];
        assert_eq!(
            first.domains,
            vec![
                DomainPattern::parse("docomo.ne.jp").unwrap(),
                DomainPattern::parse("*.softbank.jp").unwrap()
            ]
        );
        assert_eq!(
            (
                first.messages_per_minute,
                first.max_connections,
                first.messages_per_connection
            ),
            (Some(20), Some(1), None)
        );
        assert_eq!(l.destination("docomo.ne.jp"), Some(first));
        assert_eq!(l.destination("i.softbank.jp"), Some(first));
        assert_eq!(l.destination("example.com"), Some(&l.per_destination[1]));
        // The JSON of a route without perDestination is unchanged (the field is omitted).
        let plain = compile_route_yaml("    messagesPerMinute: 5\n");
        assert!(!plain.config.to_canonical_json().contains("perDestination"));
        assert!(c.config.to_canonical_json().contains("perDestination"));
    }

    #[test]
    fn broken_per_destination_entries_are_reported() {
        let c = compile_route_yaml(
            "    perDestination:\n    - domains: ['bad domain']\n      messagesPerMinute: 0\n    - domains: []\n      maxConnections: 2\n",
        );
        let fields: BTreeSet<&str> = c.diagnostics.iter().filter_map(|d| d.field.as_deref()).collect();
        assert!(
            fields.contains("spec.limits.perDestination[0].domains[0]"),
            "{fields:?}"
        );
        assert!(
            fields.contains("spec.limits.perDestination[0].messagesPerMinute"),
            "{fields:?}"
        );
        assert!(fields.contains("spec.limits.perDestination[1].domains"), "{fields:?}");
    }
}

#[cfg(test)]
mod dkim_key_tests {
    use super::*;
    use crate::Manifests;
    use crate::compile::Compiled;

    fn compile_with_key(pem: &str) -> Compiled {
        let key: String = pem.lines().map(|l| format!("    {l}\n")).collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: dkim\n  namespace: mail\nstringData:\n  private.key: |\n{key}---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata:\n  name: mx\n  namespace: mail\nspec:\n  delivery: mx\n  dkim:\n    domain: example.com\n    selector: s1\n    keySecretRef:\n      name: dkim\n"
        );
        let mut m = Manifests::default();
        m.add_yaml(&yaml, "default").unwrap();
        m.compile()
    }

    #[test]
    fn a_key_the_relay_signs_with_compiles() {
        for pem in [
            include_str!("../../../testkit/keys/dkim-rsa-2048.pem"),
            include_str!("../../../testkit/keys/dkim-rsa-4096.pem"),
            include_str!("../../../testkit/keys/dkim-ed25519.pem"),
        ] {
            let c = compile_with_key(pem);
            assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
            assert_eq!(c.config.routes.len(), 1);
            assert!(c.secrets.dkim_keys.contains_key("mail/mx"));
        }
    }

    #[test]
    fn a_1024_bit_rsa_key_is_refused_when_compiled() {
        let c = compile_with_key(include_str!("../../../testkit/keys/dkim-rsa-1024.pem"));
        let [d] = c.diagnostics.as_slice() else {
            panic!("{:#?}", c.diagnostics)
        };
        assert_eq!(
            (d.severity, d.reason, d.field.as_deref()),
            (Severity::Error, Reason::InvalidSpec, Some("spec.dkim.keySecretRef"))
        );
        assert_eq!(
            d.message,
            "the DKIM key is a 1024-bit RSA key; the relay signs with RSA keys of 2048 to 4096 bits or Ed25519 keys"
        );
        // Left out, with its key: never a route that sends unsigned mail.
        assert!(c.config.routes.is_empty());
        assert!(c.secrets.dkim_keys.is_empty());
        let not_a_key = compile_with_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----");
        assert_eq!(not_a_key.diagnostics.len(), 1, "{:#?}", not_a_key.diagnostics);
        assert!(not_a_key.config.routes.is_empty());
    }
}
