//! A smarthost route's upstream: host and port (from the route or its provider preset), the TLS
//! mode, the extra CA bundle, pinned certificates and AUTH (OAuth2 clients: `oauth2`). Credentials
//! and the CA bundle go to `RelaySecrets` under the route id; the compiled `Upstream` holds only
//! what is not secret.

use sha2::{Digest, Sha256};

use super::oauth2;
use super::secrets::secret_value;
use super::{Diags, Reason, SecretStore};
use crate::config::{Credentials, RelaySecrets, Upstream};
use crate::provider::{Preset, Provider};
use crate::route::{AuthMechanism, AuthSpec, SmtpRouteSpec, TlsMode, TlsSpec};

/// Where a route's Secret values go and where they come from.
pub(super) struct SecretsCx<'a> {
    pub id: &'a str,
    pub namespace: &'a str,
    pub secrets: &'a SecretStore,
    pub out: &'a mut RelaySecrets,
}

/// The upstream of a `delivery: smarthost` route; `None` when it has no host at all.
pub(super) fn compile_upstream(spec: &SmtpRouteSpec, cx: &mut SecretsCx<'_>, d: &mut Diags<'_>) -> Option<Upstream> {
    if spec.region.is_some() && spec.provider != Some(Provider::Ses) {
        d.error(
            Reason::InvalidSpec,
            "spec.region",
            "region is only used with provider: ses",
        );
    }
    let preset = spec.provider.and_then(|p| p.preset(spec.region.as_deref()));
    let host = spec.host.clone().or_else(|| preset.as_ref().map(|p| p.host.clone()));
    let Some(host) = host else {
        d.error(
            Reason::InvalidSpec,
            "spec.host",
            "`delivery: smarthost` needs a host or a provider preset other than custom",
        );
        return None;
    };
    let host_ok = host.parse::<std::net::IpAddr>().is_ok() || crate::pattern::is_valid_domain(&host);
    if !host_ok && host != "localhost" {
        d.error(
            Reason::InvalidSpec,
            "spec.host",
            format!("`{host}` is not a host name or IP address"),
        );
    }
    let tls_spec = spec.tls.clone().unwrap_or_default();
    let tls = tls_spec
        .mode
        .or(preset.as_ref().map(|p| p.tls))
        .unwrap_or(TlsMode::Starttls);
    let port = port(spec.port, preset.as_ref(), tls, d);
    let auth = spec.auth.as_ref().map(|a| auth(a, tls, spec.provider, cx, d));
    let custom_ca = match &tls_spec.ca_secret_ref {
        None => false,
        Some(r) => {
            if let Some(pem) = secret_value(cx.secrets, cx.namespace, &r.name, &r.key, "spec.tls.caSecretRef", d) {
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    d.error(Reason::InvalidSpec, "spec.tls.caSecretRef", "the CA bundle is not PEM");
                }
                cx.out.upstream_ca.insert(cx.id.to_string(), pem);
            }
            true
        }
    };
    let pinned_sha256 = pins(cx.secrets, cx.namespace, &tls_spec, d);
    if !pinned_sha256.is_empty() && (custom_ca || tls_spec.verify == Some(false)) {
        d.error(
            Reason::InvalidSpec,
            "spec.tls",
            "a pinned certificate replaces verification: set either the pin or `caSecretRef` / `verify: false`",
        );
    }
    Some(Upstream {
        host,
        port,
        tls,
        verify_tls: tls_spec.verify.unwrap_or(true),
        server_name: tls_spec.server_name.clone(),
        auth,
        custom_ca,
        pinned_sha256,
    })
}

/// `spec.port`, else the preset's, else the usual port of the TLS mode.
fn port(spec: Option<i32>, preset: Option<&Preset>, tls: TlsMode, d: &mut Diags<'_>) -> u16 {
    let default_port = preset.map(|p| p.port).unwrap_or(match tls {
        TlsMode::None => 25,
        TlsMode::Starttls => 587,
        TlsMode::Implicit => 465,
    });
    match spec {
        None => default_port,
        Some(p) => match u16::try_from(p) {
            Ok(p) if p > 0 => p,
            _ => {
                d.error(
                    Reason::InvalidSpec,
                    "spec.port",
                    format!("port {p} is not between 1 and 65535"),
                );
                default_port
            }
        },
    }
}

/// `spec.auth`: the mechanism for the config, the credentials (or the OAuth2 client) for the
/// secrets. The provider's preset may fix the user (SendGrid) or refuse passwords (Outlook.com).
fn auth(
    a: &AuthSpec,
    tls: TlsMode,
    provider: Option<Provider>,
    cx: &mut SecretsCx<'_>,
    d: &mut Diags<'_>,
) -> AuthMechanism {
    if tls == TlsMode::None {
        d.error(
            Reason::InvalidSpec,
            "spec.auth",
            "AUTH over `tls: none` would send the password in clear text",
        );
    }
    match (&a.secret_ref, &a.oauth2) {
        (Some(r), None) => {
            if provider == Some(Provider::Outlook) && a.mechanism != AuthMechanism::Xoauth2 {
                d.error(
                    Reason::InvalidSpec,
                    "spec.auth",
                    "Outlook.com accepts OAuth2 only (it refuses passwords since September 2024): use auth.oauth2 with grant: refreshToken, provider: microsoft",
                );
            }
            let fixed_user = provider.and_then(|p| p.preset(None)).and_then(|p| p.fixed_user);
            let field = "spec.auth.secretRef";
            let has_user = cx
                .secrets
                .get(cx.namespace, &r.name)
                .is_some_and(|data| data.contains_key(&r.username_key));
            let user = match fixed_user {
                Some(u) if !has_user => Some(u.to_string()),
                _ => secret_value(cx.secrets, cx.namespace, &r.name, &r.username_key, field, d),
            };
            let pass = secret_value(cx.secrets, cx.namespace, &r.name, &r.password_key, field, d);
            if let (Some(username), Some(password)) = (user, pass) {
                cx.out
                    .upstream_credentials
                    .insert(cx.id.to_string(), Credentials { username, password });
            }
            a.mechanism
        }
        (None, Some(o)) => {
            if let Some(c) = oauth2::compile(o, cx, d) {
                cx.out.upstream_oauth2.insert(cx.id.to_string(), c);
            }
            AuthMechanism::Xoauth2
        }
        _ => {
            d.error(
                Reason::InvalidSpec,
                "spec.auth",
                "auth takes exactly one of secretRef and oauth2",
            );
            a.mechanism
        }
    }
}

/// A SHA-256 fingerprint as 64 lower-case hex digits, from hex with or without `:` separators.
pub fn parse_sha256_fingerprint(s: &str) -> Option<String> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_ascii_lowercase())
}

/// The DER certificates of a PEM bundle (nothing else is read from it).
fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    use base64::Engine as _;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let body = &rest[start + BEGIN.len()..];
        let end = body.find(END).ok_or("a certificate has no END line")?;
        let b64: String = body[..end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("a certificate is not valid base64: {e}"))?;
        out.push(der);
        rest = &body[end + END.len()..];
    }
    Ok(out)
}

/// The fingerprints a route pins: `tls.pinnedSha256` and those of the certificates in
/// `tls.pinnedCertSecretRef`; each bad one is reported.
fn pins(secrets: &SecretStore, ns: &str, tls: &TlsSpec, d: &mut Diags<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, fp) in tls.pinned_sha256.iter().enumerate() {
        match parse_sha256_fingerprint(fp) {
            Some(fp) => out.push(fp),
            None => d.error(
                Reason::InvalidSpec,
                &format!("spec.tls.pinnedSha256[{i}]"),
                format!("`{fp}` is not a SHA-256 fingerprint (64 hex digits, colons allowed)"),
            ),
        }
    }
    if let Some(r) = &tls.pinned_cert_secret_ref {
        let field = "spec.tls.pinnedCertSecretRef";
        if let Some(pem) = secret_value(secrets, ns, &r.name, &r.key, field, d) {
            match pem_certificates(&pem) {
                Ok(certs) if !certs.is_empty() => {
                    out.extend(certs.iter().map(|der| hex::encode(Sha256::digest(der))));
                }
                Ok(_) => d.error(Reason::InvalidSpec, field, "the Secret holds no PEM certificate"),
                Err(e) => d.error(Reason::InvalidSpec, field, e),
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Manifests;
    use crate::compile::Compiled;
    use crate::config::Target;

    // A certificate (not a real one: only its bytes matter here) and its SHA-256.
    const PEM: &str = "-----BEGIN CERTIFICATE-----\nYWJj\n-----END CERTIFICATE-----\n";
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn compile_tls(tls: &str) -> Compiled {
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, namespace: mail}}\ntype: Opaque\nstringData:\n  tls.crt: |\n    {}\n    YWJj\n    {}\n  junk: hello\n---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: r, namespace: mail}}\nspec:\n  host: smtp.example.net\n  tls: {tls}\n",
            PEM.lines().next().unwrap(),
            PEM.lines().nth(2).unwrap()
        );
        let mut m = Manifests::default();
        m.add_yaml(&yaml, "default").unwrap();
        m.compile()
    }

    fn pins(c: &Compiled) -> Vec<String> {
        match &c.config.routes.first().map(|r| &r.target) {
            Some(Target::Smarthost(up)) => up.pinned_sha256.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fingerprints_are_normalised_or_refused() {
        let colons = "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD";
        assert_eq!(parse_sha256_fingerprint(colons).as_deref(), Some(ABC_SHA256));
        assert_eq!(parse_sha256_fingerprint(ABC_SHA256).as_deref(), Some(ABC_SHA256));
        assert_eq!(parse_sha256_fingerprint(&ABC_SHA256[2..]), None);
        assert_eq!(parse_sha256_fingerprint(&ABC_SHA256.replace('b', "g")), None);

        let c = compile_tls(&format!("{{pinnedSha256: [\"{colons}\"]}}"));
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        assert_eq!(pins(&c), vec![ABC_SHA256.to_owned()]);

        let c = compile_tls("{pinnedSha256: [\"sha256:1234\"]}");
        let d = c.diagnostics.first().expect("an error");
        assert_eq!(d.field.as_deref(), Some("spec.tls.pinnedSha256[0]"));
        assert!(d.message.contains("is not a SHA-256 fingerprint"), "{d:?}");
    }

    #[test]
    fn sendgrid_needs_only_the_api_key() {
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata: {name: sg, namespace: mail}\nstringData: {password: SG.key}\n---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {name: sg, namespace: mail}\nspec: {provider: sendgrid, auth: {secretRef: {name: sg}}}\n";
        let c = Manifests::from_yaml(yaml, "default").unwrap().compile();
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let creds = &c.secrets.upstream_credentials["mail/sg"];
        assert_eq!((creds.username.as_str(), creds.password.as_str()), ("apikey", "SG.key"));
        // Another provider still needs the user name.
        let c = Manifests::from_yaml(&yaml.replace("sendgrid", "office365"), "default")
            .unwrap()
            .compile();
        assert_eq!(c.diagnostics[0].message, "Secret mail/sg has no key `username`");
    }

    #[test]
    fn a_pinned_certificate_compiles_to_its_fingerprint() {
        let c = compile_tls("{pinnedCertSecretRef: {name: up, key: tls.crt}}");
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        assert_eq!(pins(&c), vec![ABC_SHA256.to_owned()]);
        // Nothing secret: the fingerprint is in the config, the certificate is not.
        assert!(!c.config.to_canonical_json().contains("YWJj"));

        let c = compile_tls("{pinnedCertSecretRef: {name: up, key: junk}}");
        assert!(
            c.diagnostics
                .iter()
                .any(|d| d.field.as_deref() == Some("spec.tls.pinnedCertSecretRef")
                    && d.message.contains("no PEM certificate")),
            "{:#?}",
            c.diagnostics
        );
        let c = compile_tls(&format!("{{verify: false, pinnedSha256: [\"{ABC_SHA256}\"]}}"));
        assert!(
            c.diagnostics
                .iter()
                .any(|d| d.message.contains("replaces verification")),
            "{:#?}",
            c.diagnostics
        );
    }
}
