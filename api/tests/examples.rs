//! The YAML in `examples/` compiles cleanly; every file in `examples/broken/` yields exactly the
//! diagnostics its `# expect:` lines name; the CEL rules in the schema agree where they overlap.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mailroute_api::config::{Period, QuotaSelector, Target, verify_password};
use mailroute_api::route::{AuthMechanism, OAuth2Grant, TlsMode};
use mailroute_api::{Manifests, Severity};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn all_examples() -> Manifests {
    let mut m = Manifests::default();
    for f in yaml_files(&examples_dir()) {
        m.add_yaml(&std::fs::read_to_string(&f).unwrap(), "default").unwrap();
    }
    m
}

#[test]
fn examples_compile_without_diagnostics() {
    let m = all_examples();
    assert_eq!(m.routes.len(), 4);
    assert_eq!(m.quotas.len(), 2);
    let c = m.compile();
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    assert_eq!(c.config.routes.len(), 4);
    assert_eq!(c.config.quotas.len(), 2);

    // Routes come out in priority order.
    let ids: Vec<&str> = c.config.routes.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["mail/carriers", "mail/gmail", "mail/office365", "mail/direct-mx"]);

    let o365 = c.config.routes.iter().find(|r| r.id == "mail/office365").unwrap();
    let Target::Smarthost(up) = &o365.target else {
        panic!("office365 is a smarthost")
    };
    assert_eq!(
        (up.host.as_str(), up.port, up.tls),
        ("smtp.office365.com", 587, TlsMode::Starttls)
    );
    assert_eq!(o365.limits.messages_per_minute, Some(30));
    assert_eq!(o365.limits.recipients_per_day, Some(10_000));
    assert_eq!(o365.from_override.as_deref(), Some("noreply@contoso.example"));

    let gmail = c.config.routes.iter().find(|r| r.id == "mail/gmail").unwrap();
    let Target::Smarthost(up) = &gmail.target else {
        panic!("gmail is a smarthost")
    };
    assert_eq!(
        (up.host.as_str(), up.port, up.tls),
        ("smtp.gmail.com", 465, TlsMode::Implicit)
    );
    assert!(gmail.serves("a@example.com", None, "anything.org"));
    assert!(!gmail.serves("a@other.org", None, "anything.org"));

    let carriers = c.config.routes.iter().find(|r| r.id == "mail/carriers").unwrap();
    for domain in [
        "docomo.ne.jp",
        "ezweb.ne.jp",
        "au.com",
        "softbank.ne.jp",
        "i.softbank.jp",
    ] {
        assert!(carriers.serves("x@y.org", None, domain), "{domain}");
    }
    assert!(
        !carriers.serves("x@y.org", None, "softbank.jp"),
        "no carrier's mail domain"
    );
    assert!(!carriers.serves("x@y.org", None, "gmail.com"));
    assert_eq!(carriers.retry.lifetime_secs, 4 * 3600);
    assert_eq!(carriers.retry.interval_secs, 300);

    let mx = c.config.routes.iter().find(|r| r.id == "mail/direct-mx").unwrap();
    assert_eq!(mx.target, Target::Mx);
    assert_eq!(mx.retry.interval_secs, 60);
    assert_eq!(mx.retry.lifetime_secs, 1800);
    assert!(c.secrets.dkim_keys.contains_key("mail/direct-mx"));

    let shop = c.config.quotas.iter().find(|q| q.id == "mail/shop-42").unwrap();
    assert_eq!(shop.selector, QuotaSelector::AuthUser("shop-42".into()));
    assert_eq!(shop.limits.len(), 1);
    assert_eq!((shop.limits[0].period, shop.limits[0].max), (Period::Month, 10_000));
    let user = &c.secrets.inbound_users["shop-42"];
    assert_eq!(user.quota, "mail/shop-42");
    assert!(verify_password(&user.password_hash, "s3cret-shop-password"));
    assert!(!verify_password(&user.password_hash, "wrong"));
}

#[test]
fn examples_pass_the_crd_cel_rules() {
    let m = all_examples();
    for r in &m.routes {
        r.validate_cel()
            .unwrap_or_else(|e| panic!("{:?}: {e:?}", r.metadata.name));
    }
    for q in &m.quotas {
        q.validate_cel()
            .unwrap_or_else(|e| panic!("{:?}: {e:?}", q.metadata.name));
    }
}

#[test]
fn secrets_never_reach_the_config_document() {
    let c = all_examples().compile();
    let json = c.config.to_canonical_json();
    for secret in [
        "change-me",
        "abcd efgh",
        "s3cret-shop-password",
        "PRIVATE KEY",
        "$argon2",
    ] {
        assert!(!json.contains(secret), "config contains {secret:?}");
    }
    assert!(c.secrets.to_canonical_json().contains("change-me"));
}

#[test]
fn compile_is_deterministic_whatever_the_input_order() {
    let m = all_examples();
    let a = m.compile();
    let mut r = m.clone();
    r.routes.reverse();
    r.quotas.reverse();
    let b = r.compile();
    assert_eq!(a.config.to_canonical_json(), b.config.to_canonical_json());
    assert_eq!(a.secrets.to_canonical_json(), b.secrets.to_canonical_json());
    assert_eq!(a.config.content_hash(), b.config.content_hash());
    // And a change of content changes the hash.
    let mut changed = m.clone();
    changed.routes[0].spec.priority += 1;
    assert_ne!(changed.compile().config.content_hash(), a.config.content_hash());
}

type Expected = BTreeSet<(Severity, String, String, String)>;

fn expectations(text: &str) -> Expected {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let (sev, rest) = if let Some(r) = line.strip_prefix("# expect: ") {
            (Severity::Error, r)
        } else if let Some(r) = line.strip_prefix("# expect-warning: ") {
            (Severity::Warning, r)
        } else {
            continue;
        };
        let parts: Vec<&str> = rest.split_whitespace().collect();
        assert_eq!(parts.len(), 4, "bad expect line {line:?}");
        out.insert((
            sev,
            format!("{} {}", parts[0], parts[1]),
            parts[2].to_string(),
            parts[3].to_string(),
        ));
    }
    out
}

#[test]
fn broken_examples_yield_the_expected_diagnostics() {
    let files = yaml_files(&examples_dir().join("broken"));
    assert!(files.len() >= 7);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expected = expectations(&text);
        assert!(!expected.is_empty(), "{} has no # expect: line", f.display());
        let c = Manifests::from_yaml(&text, "default").unwrap().compile();
        let got: Expected = c
            .diagnostics
            .iter()
            .map(|d| {
                let object = format!("{:?} {}", d.object.kind, d.object.id());
                (
                    d.severity,
                    object,
                    d.reason.as_str().to_string(),
                    d.field.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(got, expected, "{}: {:#?}", f.display(), c.diagnostics);
        for d in &c.diagnostics {
            assert!(!d.message.is_empty());
            if d.severity == Severity::Error {
                assert!(
                    !c.is_included(&d.object),
                    "{} is in the config despite {:?}",
                    d.object,
                    d.reason
                );
            }
        }
    }
}

#[test]
fn cel_rules_catch_what_compile_catches() {
    for (file, name) in [
        ("mx-with-host.yaml", "mx-and-host"),
        ("bad-domain.yaml", "bad-domain"),
        ("bad-port.yaml", "bad-port"),
        ("oauth2-wrong-provider.yaml", "entra-at-google"),
    ] {
        let text = std::fs::read_to_string(examples_dir().join("broken").join(file)).unwrap();
        let m = Manifests::from_yaml(&text, "default").unwrap();
        let r = m
            .routes
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .unwrap();
        assert!(r.validate_cel().is_err(), "{file}: CEL accepted {name}");
    }
    let text = std::fs::read_to_string(examples_dir().join("broken/bad-quota.yaml")).unwrap();
    let m = Manifests::from_yaml(&text, "default").unwrap();
    let two = m
        .quotas
        .iter()
        .find(|q| q.metadata.name.as_deref() == Some("two-selectors"))
        .unwrap();
    assert!(two.validate_cel().is_err());
}

/// `examples/oauth2/`: one route per OAuth2 grant. Kept apart from the top-level examples, which
/// the operator's tests run connection tests against, until the relays fetch tokens themselves.
#[test]
fn oauth2_examples_compile_with_every_value_in_the_secret_only() {
    let mut m = Manifests::default();
    for f in yaml_files(&examples_dir().join("oauth2")) {
        m.add_yaml(&std::fs::read_to_string(&f).unwrap(), "default").unwrap();
    }
    assert_eq!(m.routes.len(), 3);
    for r in &m.routes {
        r.validate_cel()
            .unwrap_or_else(|e| panic!("{:?}: {e:?}", r.metadata.name));
    }
    let c = m.compile();
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let grants: Vec<(&str, OAuth2Grant)> = c
        .secrets
        .upstream_oauth2
        .iter()
        .map(|(id, o)| (id.as_str(), o.grant))
        .collect();
    assert_eq!(
        grants,
        [
            ("mail/gmail-oauth", OAuth2Grant::RefreshToken),
            ("mail/office365-oauth", OAuth2Grant::ClientCredentials),
            ("mail/workspace-oauth", OAuth2Grant::ServiceAccount),
        ]
    );
    let o365 = &c.secrets.upstream_oauth2["mail/office365-oauth"];
    assert_eq!(
        o365.token_url,
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(o365.scope, "https://outlook.office365.com/.default");
    assert_eq!(
        c.secrets.upstream_oauth2["mail/workspace-oauth"].user,
        "notifications@example.org"
    );
    for r in &c.config.routes {
        let Target::Smarthost(up) = &r.target else { panic!() };
        assert_eq!(up.auth, Some(AuthMechanism::Xoauth2));
    }
    let config = c.config.to_canonical_json();
    for secret in [
        "change-me",
        "contoso.onmicrosoft.com",
        "00000000-0000-0000-0000-000000000000",
        "apps.googleusercontent.com",
        "PRIVATE KEY",
    ] {
        assert!(!config.contains(secret), "the config contains {secret:?}");
    }
}
