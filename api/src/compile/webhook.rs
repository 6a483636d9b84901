//! A DeliveryWebhook: its endpoint URL (https, or http to a loopback host), signing key
//! (`whsec_<base64>`), CA bundle, events, senders and delivery settings (the defaults of
//! `webhook::defaults`). The key and the CA go to `RelaySecrets` only, never the config.

use std::time::Duration;

use base64::Engine;
use kube::ResourceExt;

use super::route::senders;
use super::secrets::secret_value;
use super::{Compiled, Diags, ObjectKind, ObjectRef, ObjectSummary, Reason, SecretStore};
use crate::config::CompiledWebhook;
use crate::webhook::{DeliveryWebhook, DeliveryWebhookSpec, WebhookDeliverySpec, defaults};

/// Compiles `webhooks` into `out` (config, secrets, diagnostics, summaries), after routes and
/// quotas: webhooks depend on nothing else. A webhook with errors is left out and reported.
pub fn compile_webhooks(webhooks: &[DeliveryWebhook], secrets: &SecretStore, out: &mut Compiled) {
    let mut sorted: Vec<&DeliveryWebhook> = webhooks.iter().collect();
    sorted.sort_by_key(|w| (w.namespace().unwrap_or_default(), w.name_any()));
    for w in sorted {
        let object = ObjectRef {
            kind: ObjectKind::DeliveryWebhook,
            namespace: w.namespace().unwrap_or_else(|| "default".into()),
            name: w.name_any(),
        };
        let mut d = Diags {
            object: &object,
            out: &mut out.diagnostics,
            errors: 0,
        };
        let compiled = compile_one(&object, &w.spec, secrets, &mut d);
        out.summaries.insert(object.clone(), ObjectSummary::default());
        if d.errors == 0 {
            let (c, key, ca) = compiled;
            out.secrets.webhook_keys.insert(c.id.clone(), key.unwrap_or_default());
            if let Some(ca) = ca {
                out.secrets.webhook_ca.insert(c.id.clone(), ca);
            }
            out.config.webhooks.push(c);
        }
    }
    out.diagnostics.sort();
}

fn compile_one(
    object: &ObjectRef,
    spec: &DeliveryWebhookSpec,
    secrets: &SecretStore,
    d: &mut Diags<'_>,
) -> (CompiledWebhook, Option<String>, Option<String>) {
    if let Err(e) = check_url(&spec.url) {
        d.error(Reason::InvalidSpec, "spec.url", e);
    }
    let r = &spec.signing_key_secret_ref;
    let key = secret_value(
        secrets,
        &object.namespace,
        &r.name,
        &r.key,
        "spec.signingKeySecretRef",
        d,
    );
    if let Some(k) = &key
        && let Err(e) = decode_signing_key(k)
    {
        d.error(
            Reason::InvalidSpec,
            "spec.signingKeySecretRef",
            format!("key `{}` of Secret {}/{}: {e}", r.key, object.namespace, r.name),
        );
    }
    let ca = spec.ca_secret_ref.as_ref().and_then(|r| {
        let pem = secret_value(secrets, &object.namespace, &r.name, &r.key, "spec.caSecretRef", d)?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            d.error(
                Reason::InvalidSpec,
                "spec.caSecretRef",
                format!(
                    "key `{}` of Secret {}/{} holds no PEM certificate",
                    r.key, object.namespace, r.name
                ),
            );
        }
        Some(pem)
    });
    if spec.events.is_empty() {
        d.error(Reason::InvalidSpec, "spec.events", "name at least one event");
    }
    let mut events: Vec<String> = spec.events.iter().map(|e| e.as_str().to_string()).collect();
    events.sort();
    events.dedup();
    let delivery = spec.delivery.clone().unwrap_or_default();
    let c = CompiledWebhook {
        id: object.id(),
        namespace: object.namespace.clone(),
        url: spec.url.clone(),
        events,
        senders: senders(&spec.senders, "spec.senders", d),
        custom_ca: ca.is_some(),
        max_batch: max_batch(&delivery, d),
        timeout_ms: millis(
            &delivery.timeout,
            defaults::TIMEOUT,
            defaults::TIMEOUT_LIMIT,
            "timeout",
            d,
        ),
        initial_backoff_ms: millis(
            &delivery.initial_backoff,
            defaults::INITIAL_BACKOFF,
            Duration::from_secs(3600),
            "initialBackoff",
            d,
        ),
        max_backoff_ms: millis(
            &delivery.max_backoff,
            defaults::MAX_BACKOFF,
            Duration::from_secs(6 * 3600),
            "maxBackoff",
            d,
        ),
        max_age_secs: millis(
            &delivery.max_age,
            defaults::MAX_AGE,
            defaults::MAX_AGE_LIMIT,
            "maxAge",
            d,
        ) / 1000,
        max_backlog: match delivery.max_backlog {
            None => defaults::MAX_BACKLOG,
            Some(n) if n >= 1 => n as u64,
            Some(n) => {
                d.error(
                    Reason::InvalidSpec,
                    "spec.delivery.maxBacklog",
                    format!("{n} is not a positive number"),
                );
                defaults::MAX_BACKLOG
            }
        },
    };
    (c, key, ca)
}

fn max_batch(spec: &WebhookDeliverySpec, d: &mut Diags<'_>) -> u32 {
    match spec.max_batch {
        None => defaults::MAX_BATCH,
        Some(n) if n >= 1 && n as u32 <= defaults::MAX_BATCH_LIMIT => n as u32,
        Some(n) => {
            d.error(
                Reason::InvalidSpec,
                "spec.delivery.maxBatch",
                format!("{n} is not between 1 and {}", defaults::MAX_BATCH_LIMIT),
            );
            defaults::MAX_BATCH
        }
    }
}

/// A duration field of `spec.delivery` in milliseconds, from 100 ms to `max`.
fn millis(value: &Option<String>, default: Duration, max: Duration, name: &str, d: &mut Diags<'_>) -> u64 {
    let Some(s) = value else {
        return default.as_millis() as u64;
    };
    let field = format!("spec.delivery.{name}");
    match humantime::parse_duration(s) {
        Ok(v) if v < Duration::from_millis(100) => {
            d.error(Reason::InvalidSpec, &field, format!("`{s}` is shorter than 100ms"));
            default.as_millis() as u64
        }
        Ok(v) if v > max => {
            d.error(
                Reason::InvalidSpec,
                &field,
                format!("`{s}` is longer than {}", humantime::format_duration(max)),
            );
            default.as_millis() as u64
        }
        Ok(v) => v.as_millis() as u64,
        Err(e) => {
            d.error(
                Reason::InvalidSpec,
                &field,
                format!("`{s}` is not a duration like `30s` or `5m`: {e}"),
            );
            default.as_millis() as u64
        }
    }
}

/// The HMAC key of a Standard Webhooks secret `whsec_<base64>` (the prefix is optional, as in
/// the reference libraries). The error never contains the key.
pub fn decode_signing_key(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.trim().strip_prefix("whsec_").unwrap_or(secret.trim());
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "the signing key is not `whsec_` followed by base64".to_string())?;
    if key.len() < 24 {
        return Err(format!(
            "the signing key is {} bytes long; use at least 24 (Standard Webhooks: 24 to 64)",
            key.len()
        ));
    }
    Ok(key)
}

/// `https://host[:port][/path]`, or `http://` to a loopback host; no user or password in it
/// (the URL is in the ConfigMap).
fn check_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("`{url}` is not a URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("the URL must not carry a user or password (it is stored in a ConfigMap)".into());
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the URL contains white space".into());
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, rest)) => (h, rest.strip_prefix(':')),
            None => return Err(format!("`{url}` has an invalid host")),
        },
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Err(format!("`{url}` has an invalid port"));
    }
    match scheme {
        "https" => Ok(()),
        "http" if is_loopback(host) => Ok(()),
        "http" => Err(format!(
            "`{url}` is plain http: use https (http only for a loopback host such as 127.0.0.1)"
        )),
        _ => Err(format!("`{url}`: only https URLs are supported")),
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Manifests;

    const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn yaml(url: &str, key: &str, extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: hook, namespace: team-a}}\nstringData: {{key: \"{key}\"}}\n---\napiVersion: mailroute.io/v1alpha1\nkind: DeliveryWebhook\nmetadata: {{name: app, namespace: team-a}}\nspec:\n  url: \"{url}\"\n  signingKeySecretRef: {{name: hook, key: key}}\n  events: [delivered, bounced, received, suppressed]\n{extra}"
        )
    }

    fn compile(text: &str) -> Compiled {
        Manifests::from_yaml(text, "default").unwrap().compile()
    }

    #[test]
    fn a_webhook_compiles_with_its_defaults_and_its_key_only_in_the_secrets() {
        let c = compile(&yaml(
            "https://hooks.example.com/mail",
            KEY,
            "  senders: {fromDomains: ['*.shop.example']}\n",
        ));
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let w = &c.config.webhooks[0];
        assert_eq!(w.id, "team-a/app");
        assert_eq!(w.namespace, "team-a");
        assert_eq!(w.events, ["bounced", "delivered", "received", "suppressed"]);
        assert_eq!(w.max_batch, defaults::MAX_BATCH);
        assert_eq!(w.max_age_secs, 24 * 3600);
        assert_eq!(w.timeout_ms, 10_000);
        assert_eq!(w.max_backlog, defaults::MAX_BACKLOG);
        assert!(w.wants("delivered", Some("team-a"), "app@a.shop.example", None));
        assert!(
            !w.wants("delivered", Some("team-b"), "app@a.shop.example", None),
            "other namespace"
        );
        assert!(!w.wants("delivered", None, "app@a.shop.example", None), "unattributed");
        assert!(!w.wants("deferred", Some("team-a"), "app@a.shop.example", None));
        assert!(!w.wants("delivered", Some("team-a"), "app@other.example", None));
        assert_eq!(c.secrets.webhook_keys["team-a/app"], KEY);
        let config = c.config.to_canonical_json();
        assert!(!config.contains("MfKQ9r8"), "the key stays out of the config");
        assert!(!format!("{:?}", c.secrets).contains("MfKQ9r8"));
    }

    #[test]
    fn bad_urls_keys_and_settings_are_reported_and_the_webhook_left_out() {
        let cases = [
            (yaml("http://hooks.example.com/", KEY, ""), "spec.url", "plain http"),
            (
                yaml("https://user:pw@hooks.example.com/", KEY, ""),
                "spec.url",
                "user or password",
            ),
            (yaml("ftp://hooks.example.com/", KEY, ""), "spec.url", "only https"),
            (
                yaml("https://hooks.example.com/", "whsec_!!!", ""),
                "spec.signingKeySecretRef",
                "base64",
            ),
            (
                yaml("https://hooks.example.com/", "whsec_c2hvcnQ=", ""),
                "spec.signingKeySecretRef",
                "at least 24",
            ),
            (
                yaml("https://h.example/", KEY, "  delivery: {maxBatch: 0}\n"),
                "spec.delivery.maxBatch",
                "between 1",
            ),
            (
                yaml("https://h.example/", KEY, "  delivery: {maxAge: 100h}\n"),
                "spec.delivery.maxAge",
                "longer than",
            ),
            (
                yaml("https://h.example/", KEY, "  caSecretRef: {name: nope, key: ca.crt}\n"),
                "spec.caSecretRef",
                "not found",
            ),
        ];
        for (text, field, words) in cases {
            let c = compile(&text);
            assert!(c.config.webhooks.is_empty(), "{field}");
            assert!(c.secrets.webhook_keys.is_empty(), "{field}");
            let d = &c.diagnostics[0];
            assert_eq!(d.field.as_deref(), Some(field));
            assert!(d.message.contains(words), "{}: {}", field, d.message);
            assert!(!d.message.contains("MfKQ9r8"));
        }
        // Loopback http is accepted, for tests.
        for url in ["http://127.0.0.1:8443/x", "http://localhost/", "http://[::1]:9/"] {
            let c = compile(&yaml(url, KEY, ""));
            assert!(c.diagnostics.is_empty(), "{url}: {:#?}", c.diagnostics);
        }
    }
}
