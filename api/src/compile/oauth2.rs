//! `spec.auth.oauth2`: an OAuth2 client for upstream XOAUTH2, read from its Secret into
//! `RelaySecrets::upstream_oauth2` (never into the configuration document). Which values each
//! grant needs, the provider's token endpoint and scope, and the checks a relay would otherwise
//! fail on later (a certificate that is not PEM, a service-account key that is not a key file).

use super::secrets::secret_value;
use super::upstream::SecretsCx;
use super::{Diags, Reason};
use crate::config::OAuth2Credentials;
use crate::route::{ClientAuth, OAuth2Grant, OAuth2Provider, OAuth2Spec};

/// Microsoft Entra ID's token endpoint of a tenant.
pub fn entra_token_url(tenant: &str) -> String {
    format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token")
}
/// Google's token endpoint.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// SMTP AUTH to Exchange Online.
pub const OFFICE365_SCOPE: &str = "https://outlook.office365.com/.default";
/// SMTP AUTH to Gmail.
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";

const FIELD: &str = "spec.auth.oauth2.secretRef";

/// The client, or `None` (with diagnostics) when a value is missing or unusable.
pub(super) fn compile(o: &OAuth2Spec, cx: &mut SecretsCx<'_>, d: &mut Diags<'_>) -> Option<OAuth2Credentials> {
    let provider = match (o.grant, o.provider) {
        (OAuth2Grant::ClientCredentials, Some(OAuth2Provider::Google)) => {
            d.error(
                Reason::InvalidSpec,
                "spec.auth.oauth2.provider",
                "clientCredentials is Microsoft Entra ID's grant (provider: microsoft)",
            );
            return None;
        }
        (OAuth2Grant::ServiceAccount, Some(OAuth2Provider::Microsoft)) => {
            d.error(
                Reason::InvalidSpec,
                "spec.auth.oauth2.provider",
                "serviceAccount is Google's grant (provider: google)",
            );
            return None;
        }
        (OAuth2Grant::ClientCredentials, _) => Some(OAuth2Provider::Microsoft),
        (OAuth2Grant::ServiceAccount, _) => Some(OAuth2Provider::Google),
        (OAuth2Grant::RefreshToken, p) => p,
    };
    if o.grant == OAuth2Grant::RefreshToken && provider.is_none() && o.token_url.is_none() {
        d.error(
            Reason::InvalidSpec,
            "spec.auth.oauth2.provider",
            "refreshToken needs a provider (google or microsoft) or a tokenUrl",
        );
        return None;
    }
    if o.client_auth.is_some() && o.grant != OAuth2Grant::ClientCredentials {
        d.error(
            Reason::InvalidSpec,
            "spec.auth.oauth2.clientAuth",
            "clientAuth is for the clientCredentials grant",
        );
    }
    let certificate_auth = o.client_auth == Some(ClientAuth::Certificate);
    if o.assertion_algorithm.is_some() && !certificate_auth {
        d.error(
            Reason::InvalidSpec,
            "spec.auth.oauth2.assertionAlgorithm",
            "assertionAlgorithm is for clientAuth: certificate",
        );
    }
    if let Some(url) = &o.token_url
        && !url.starts_with("https://")
    {
        d.error(
            Reason::InvalidSpec,
            "spec.auth.oauth2.tokenUrl",
            "tokenUrl must be an https URL",
        );
    }

    let r = &o.secret_ref;
    let (ns, name) = (cx.namespace, r.name.as_str());
    let secrets = cx.secrets;
    let mut required = |key: &str| secret_value(secrets, ns, name, key, FIELD, d);
    let user = required(&r.user_key);
    let mut out = OAuth2Credentials {
        grant: o.grant,
        token_url: String::new(),
        scope: o.scope.clone().unwrap_or_else(|| {
            match provider {
                Some(OAuth2Provider::Google) => GMAIL_SCOPE,
                _ => OFFICE365_SCOPE,
            }
            .to_string()
        }),
        user: String::new(),
        client_id: None,
        client_secret: None,
        certificate: None,
        private_key: None,
        assertion_algorithm: None,
        refresh_token: None,
        service_account_key: None,
    };
    let mut tenant = None;
    match o.grant {
        OAuth2Grant::ClientCredentials => {
            // A tokenUrl names the tenant itself (another cloud, a test endpoint).
            if o.token_url.is_none() {
                tenant = required(&r.tenant_key);
            }
            out.client_id = required(&r.client_id_key);
            if certificate_auth {
                out.certificate = required(&r.certificate_key);
                out.private_key = required(&r.private_key_key);
                out.assertion_algorithm = Some(o.assertion_algorithm.unwrap_or_default());
            } else {
                out.client_secret = required(&r.client_secret_key);
            }
        }
        OAuth2Grant::RefreshToken => {
            out.client_id = required(&r.client_id_key);
            out.refresh_token = required(&r.refresh_token_key);
            // Optional: public clients have no secret; Microsoft's `common` tenant serves any.
            let has = |key: &str| secrets.get(ns, name).is_some_and(|data| data.contains_key(key));
            if has(&r.client_secret_key) {
                out.client_secret = secret_value(secrets, ns, name, &r.client_secret_key, FIELD, d);
            }
            if provider == Some(OAuth2Provider::Microsoft) {
                tenant = if has(&r.tenant_key) {
                    secret_value(secrets, ns, name, &r.tenant_key, FIELD, d)
                } else {
                    Some("common".into())
                };
            }
        }
        OAuth2Grant::ServiceAccount => {
            out.service_account_key = secret_value(secrets, ns, name, &r.service_account_key, FIELD, d);
        }
    }
    check_values(&out, d);
    out.user = user?;
    out.token_url = match (&o.token_url, provider) {
        (Some(url), _) => url.clone(),
        (None, Some(OAuth2Provider::Google)) => GOOGLE_TOKEN_URL.into(),
        (None, _) => entra_token_url(&tenant?),
    };
    let complete = match o.grant {
        OAuth2Grant::ClientCredentials => {
            out.client_id.is_some()
                && (out.client_secret.is_some() || (out.certificate.is_some() && out.private_key.is_some()))
        }
        OAuth2Grant::RefreshToken => out.client_id.is_some() && out.refresh_token.is_some(),
        OAuth2Grant::ServiceAccount => out.service_account_key.is_some(),
    };
    complete.then_some(out)
}

/// What the relay would refuse later: said now, without quoting the values.
fn check_values(c: &OAuth2Credentials, d: &mut Diags<'_>) {
    if c.certificate
        .as_ref()
        .is_some_and(|p| !p.contains("-----BEGIN CERTIFICATE-----"))
    {
        d.error(Reason::InvalidSpec, FIELD, "the client certificate is not PEM");
    }
    if c.private_key.as_ref().is_some_and(|p| !p.contains("PRIVATE KEY-----")) {
        d.error(
            Reason::InvalidSpec,
            FIELD,
            "the client certificate's key is not a PEM private key",
        );
    }
    if let Some(json) = &c.service_account_key {
        let file: Option<serde_json::Value> = serde_json::from_str(json).ok();
        let ok = file.is_some_and(|f| {
            f["client_email"].is_string()
                && f["private_key"]
                    .as_str()
                    .is_some_and(|k| k.contains("PRIVATE KEY-----"))
        });
        if !ok {
            d.error(
                Reason::InvalidSpec,
                FIELD,
                "the service account key is not a JSON key file with client_email and private_key",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Compiled, Severity};
    use crate::config::Target;
    use crate::route::{AssertionAlgorithm, AuthMechanism};
    use crate::{Manifests, SmtpRoute};

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleQ==\n-----END PRIVATE KEY-----";
    const CERT: &str = "-----BEGIN CERTIFICATE-----\nY2VydA==\n-----END CERTIFICATE-----";

    fn yaml_block(s: &str) -> String {
        s.lines().map(|l| format!("    {l}\n")).collect()
    }

    fn manifests(secret: &[(&str, &str)], oauth2: &str) -> Manifests {
        let data: String = secret
            .iter()
            .map(|(k, v)| {
                format!(
                    "  {k}: |-\n{}",
                    yaml_block(v)
                        .replace("\n    ", "\n      ")
                        .replacen("    ", "      ", 1)
                )
            })
            .collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: oauth, namespace: mail}}\nstringData:\n{data}---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: o365, namespace: mail}}\nspec:\n  host: smtp.example.com\n  auth:\n    oauth2:\n{}",
            yaml_block(&format!("  {}", oauth2.replace('\n', "\n  ")))
        );
        Manifests::from_yaml(&yaml, "default").unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    fn compile(secret: &[(&str, &str)], oauth2: &str) -> Compiled {
        manifests(secret, oauth2).compile()
    }

    const SECRET_VALUES: [&str; 5] = [
        "app-secret-value",
        "rt-secret-value",
        "c2VjcmV0LWtleQ",
        "Y2VydA",
        "tenant-xyz",
    ];

    /// No value of the Secret in the config document, the diagnostics or any Debug output.
    fn assert_no_secret_outside_the_secret(c: &Compiled) {
        let shown = format!(
            "{} {:?} {:?} {:?}",
            c.config.to_canonical_json(),
            c.diagnostics,
            c.secrets,
            c.secrets.upstream_oauth2
        );
        for v in SECRET_VALUES {
            assert!(!shown.contains(v), "{v} in {shown}");
        }
    }

    #[test]
    fn client_credentials_with_a_secret_compile_into_the_secret_only() {
        let c = compile(
            &[
                ("user", "relay@contoso.com"),
                ("tenant", "tenant-xyz"),
                ("client-id", "app-1"),
                ("client-secret", "app-secret-value"),
            ],
            "grant: clientCredentials\nsecretRef: {name: oauth}",
        );
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let Target::Smarthost(up) = &c.config.routes[0].target else {
            panic!()
        };
        assert_eq!(up.auth, Some(AuthMechanism::Xoauth2));
        let o = &c.secrets.upstream_oauth2["mail/o365"];
        assert_eq!(
            o.token_url,
            "https://login.microsoftonline.com/tenant-xyz/oauth2/v2.0/token"
        );
        assert_eq!(o.scope, OFFICE365_SCOPE);
        assert_eq!(
            (o.user.as_str(), o.client_id.as_deref()),
            ("relay@contoso.com", Some("app-1"))
        );
        assert_eq!(o.client_secret.as_deref(), Some("app-secret-value"));
        assert!(c.secrets.upstream_credentials.is_empty());
        assert!(c.secrets.to_canonical_json().contains("app-secret-value"));
        assert_no_secret_outside_the_secret(&c);
    }

    #[test]
    fn a_certificate_a_refresh_token_and_a_service_account_compile() {
        let c = compile(
            &[
                ("user", "relay@contoso.com"),
                ("tenant", "tenant-xyz"),
                ("client-id", "app-1"),
                ("tls.crt", CERT),
                ("tls.key", KEY),
            ],
            "grant: clientCredentials\nclientAuth: certificate\nassertionAlgorithm: PS256\nsecretRef: {name: oauth}",
        );
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let o = &c.secrets.upstream_oauth2["mail/o365"];
        assert_eq!(
            (o.certificate.as_deref(), o.private_key.as_deref()),
            (Some(CERT), Some(KEY))
        );
        assert_eq!(
            (o.assertion_algorithm, o.client_secret.as_deref()),
            (Some(AssertionAlgorithm::Ps256), None)
        );
        assert_no_secret_outside_the_secret(&c);

        let c = compile(
            &[
                ("user", "me@gmail.com"),
                ("client-id", "cid"),
                ("client-secret", "app-secret-value"),
                ("refresh-token", "rt-secret-value"),
            ],
            "grant: refreshToken\nprovider: google\nsecretRef: {name: oauth}",
        );
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let o = &c.secrets.upstream_oauth2["mail/o365"];
        assert_eq!(
            (o.token_url.as_str(), o.scope.as_str()),
            (GOOGLE_TOKEN_URL, GMAIL_SCOPE)
        );
        assert_eq!(o.refresh_token.as_deref(), Some("rt-secret-value"));
        assert_no_secret_outside_the_secret(&c);

        // Microsoft delegated, a public client: no secret, the `common` tenant.
        let c = compile(
            &[
                ("user", "me@outlook.com"),
                ("client-id", "cid"),
                ("refresh-token", "rt-secret-value"),
            ],
            "grant: refreshToken\nprovider: microsoft\nsecretRef: {name: oauth}",
        );
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let o = &c.secrets.upstream_oauth2["mail/o365"];
        assert_eq!(o.token_url, entra_token_url("common"));
        assert_eq!(o.client_secret, None);

        let sa = format!(
            r#"{{"type": "service_account", "client_email": "relay@p.iam.gserviceaccount.com", "private_key": "{}"}}"#,
            KEY.replace('\n', "\\n")
        );
        let c = compile(
            &[("user", "alice@example.com"), ("service-account.json", &sa)],
            "grant: serviceAccount\nsecretRef: {name: oauth}",
        );
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let o = &c.secrets.upstream_oauth2["mail/o365"];
        assert_eq!(
            (o.user.as_str(), o.token_url.as_str(), o.scope.as_str()),
            ("alice@example.com", GOOGLE_TOKEN_URL, GMAIL_SCOPE)
        );
        assert_eq!(o.service_account_key.as_deref(), Some(sa.as_str()));
        assert_no_secret_outside_the_secret(&c);
    }

    #[test]
    fn missing_values_and_wrong_combinations_are_reported_and_leave_the_route_out() {
        let c = compile(
            &[("user", "relay@contoso.com"), ("tenant", "tenant-xyz")],
            "grant: clientCredentials\nsecretRef: {name: oauth}",
        );
        let messages: Vec<&str> = c.diagnostics.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "Secret mail/oauth has no key `client-id`",
                "Secret mail/oauth has no key `client-secret`"
            ]
        );
        assert!(c.diagnostics.iter().all(|d| d.severity == Severity::Error
            && d.field.as_deref() == Some("spec.auth.oauth2.secretRef")
            && crate::compile::is_secret_error(d)));
        assert!(c.config.routes.is_empty() && c.secrets.upstream_oauth2.is_empty());

        for (spec, message) in [
            (
                "grant: clientCredentials\nprovider: google\nsecretRef: {name: oauth}",
                "clientCredentials is Microsoft Entra ID's grant (provider: microsoft)",
            ),
            (
                "grant: serviceAccount\nprovider: microsoft\nsecretRef: {name: oauth}",
                "serviceAccount is Google's grant (provider: google)",
            ),
            (
                "grant: refreshToken\nsecretRef: {name: oauth}",
                "refreshToken needs a provider (google or microsoft) or a tokenUrl",
            ),
            (
                "grant: refreshToken\nprovider: google\nclientAuth: secret\nsecretRef: {name: oauth}",
                "clientAuth is for the clientCredentials grant",
            ),
            (
                "grant: clientCredentials\nassertionAlgorithm: PS256\nsecretRef: {name: oauth}",
                "assertionAlgorithm is for clientAuth: certificate",
            ),
            (
                "grant: clientCredentials\ntokenUrl: http://login.example/token\nsecretRef: {name: oauth}",
                "tokenUrl must be an https URL",
            ),
        ] {
            let m = manifests(
                &[
                    ("user", "u@example.com"),
                    ("tenant", "t"),
                    ("client-id", "c"),
                    ("client-secret", "s"),
                    ("refresh-token", "r"),
                ],
                spec,
            );
            let c = m.compile();
            assert!(
                c.diagnostics.iter().any(|d| d.message == message),
                "{spec}: {:#?}",
                c.diagnostics
            );
            assert!(c.config.routes.is_empty(), "{spec}");
            // The API server refuses it already, with the same words.
            let err = m.routes[0].validate_cel().unwrap_err();
            assert!(format!("{err:?}").contains(message), "{spec}: {err:?}");
        }

        let c = compile(
            &[
                ("user", "alice@example.com"),
                ("service-account.json", "{\"private_key\": \"c2VjcmV0LWtleQ\"}"),
            ],
            "grant: serviceAccount\nsecretRef: {name: oauth}",
        );
        assert_eq!(
            c.diagnostics.iter().map(|d| d.message.as_str()).collect::<Vec<_>>(),
            ["the service account key is not a JSON key file with client_email and private_key"]
        );
        assert_no_secret_outside_the_secret(&c);
    }

    #[test]
    fn client_credentials_with_a_token_url_need_no_tenant() {
        let secret = [
            ("user", "relay@contoso.com"),
            ("client-id", "app-1"),
            ("client-secret", "app-secret-value"),
        ];
        let url = "https://login.microsoftonline.us/tenant-xyz/oauth2/v2.0/token";
        let c = compile(
            &secret,
            &format!("grant: clientCredentials\ntokenUrl: \"{url}\"\nsecretRef: {{name: oauth}}"),
        );
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        assert_eq!(c.secrets.upstream_oauth2["mail/o365"].token_url, url);
        // Without one, the tenant makes the URL: it is required.
        let c = compile(&secret, "grant: clientCredentials\nsecretRef: {name: oauth}");
        assert!(
            c.diagnostics.iter().any(|d| d.message.contains("has no key `tenant`")),
            "{:#?}",
            c.diagnostics
        );
    }

    #[test]
    fn auth_takes_exactly_one_of_secret_ref_and_oauth2() {
        let yaml = "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {name: r, namespace: mail}\nspec:\n  host: smtp.example.com\n  auth:\n    secretRef: {name: a}\n    oauth2: {grant: clientCredentials, secretRef: {name: b}}\n";
        let m = Manifests::from_yaml(yaml, "default").unwrap();
        let c = m.compile();
        assert!(
            c.diagnostics
                .iter()
                .any(|d| d.message == "auth takes exactly one of secretRef and oauth2"),
            "{:#?}",
            c.diagnostics
        );
        let r: &SmtpRoute = &m.routes[0];
        assert!(
            format!("{:?}", r.validate_cel().unwrap_err()).contains("auth takes exactly one of secretRef and oauth2")
        );
    }
}
