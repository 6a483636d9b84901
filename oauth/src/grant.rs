//! The grants and what goes over the wire, as pure functions: the form a grant posts to its token
//! endpoint (`Grant::request`), the token or the provider's error a response holds
//! (`parse_response`), and the expiry arithmetic (`Token::remaining`, `Token::needs_refresh`).
//! No I/O and no clock: the caller passes `now` (Unix seconds) and the assertion's id.

use std::fmt;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::jwt::{self, ClientAssertionClaims, JwtAlg, RsaKey, ServiceAccountClaims, Thumbprints};
use crate::secret::SecretString;

/// Why no token: the provider's own words, or what stopped us from asking.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    /// The token endpoint refused: `error` and `error_description` verbatim
    /// (`invalid_client: AADSTS7000215: Invalid client secret provided. ...`, `invalid_grant: Bad Request`).
    #[error("{}", provider_text(.error, .description.as_deref()))]
    Provider {
        status: u16,
        error: String,
        description: Option<String>,
    },
    /// The endpoint could not be reached or did not answer HTTP. Shown with the endpoint's host
    /// only ([`endpoint_name`]): an Entra ID URL carries the tenant, which comes from a Secret.
    #[error("token endpoint {}: {reason}", endpoint_name(.url))]
    Transport { url: String, reason: String },
    /// The endpoint answered something that is neither a token nor an OAuth2 error.
    #[error("token endpoint answered HTTP {status} without a token or an OAuth2 error")]
    Response { status: u16 },
    /// A key or certificate cannot be used (never quotes it).
    #[error("{0}")]
    Key(String),
    /// The shared token cache failed.
    #[error("token cache: {0}")]
    Cache(String),
}

/// A token endpoint as messages and log lines show it: `scheme://host[:port]`, without the path
/// (Entra ID's holds the tenant, a value from the route's Secret).
pub fn endpoint_name(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // Never userinfo.
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if scheme.is_empty() {
        host.to_string()
    } else {
        format!("{scheme}://{host}")
    }
}

fn provider_text(error: &str, description: Option<&str>) -> String {
    match description {
        Some(d) if !d.is_empty() => format!("{error}: {d}"),
        _ => error.to_string(),
    }
}

impl OAuthError {
    /// Whether the provider refused the credentials themselves (`invalid_client`,
    /// `invalid_grant`, `unauthorized_client`): asking again with the same ones will not help.
    pub fn is_credential_error(&self) -> bool {
        matches!(self, Self::Provider { error, .. }
            if matches!(error.as_str(), "invalid_client" | "invalid_grant" | "unauthorized_client"))
    }
}

/// How an Entra ID client proves itself.
#[derive(Debug)]
pub enum ClientCredential {
    /// `client_secret`.
    Secret(SecretString),
    /// A JWT client assertion signed with the certificate's key.
    Certificate {
        key: Box<RsaKey>,
        thumbprints: Thumbprints,
        alg: JwtAlg,
    },
}

/// Microsoft Entra ID client credentials: the app sends as any mailbox it was granted
/// (`SMTP.SendAsApp`); the SMTP user names the mailbox.
#[derive(Debug)]
pub struct ClientCredentials {
    pub token_url: String,
    pub client_id: String,
    pub credential: ClientCredential,
    pub scope: String,
}

/// The refresh-token grant (Google, Microsoft delegated): the provider may answer with a new
/// refresh token, which replaces this one from then on (see `cache`).
#[derive(Debug)]
pub struct RefreshTokenGrant {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub refresh_token: SecretString,
    pub scope: Option<String>,
}

/// A Google service account with domain-wide delegation, acting as `subject`.
#[derive(Debug)]
pub struct ServiceAccount {
    pub token_url: String,
    pub client_email: String,
    pub key: RsaKey,
    pub subject: String,
    pub scope: String,
}

impl ServiceAccount {
    /// From the service account's JSON key file (`client_email`, `private_key`, `token_uri`).
    pub fn from_json_key(json: &str, subject: &str, scope: &str) -> Result<Self, OAuthError> {
        #[derive(Deserialize)]
        struct KeyFile {
            client_email: String,
            private_key: String,
            token_uri: Option<String>,
        }
        let k: KeyFile = serde_json::from_str(json).map_err(|e| {
            // serde's message may quote a value: say where, not what.
            OAuthError::Key(format!(
                "the service account key is not a JSON key file (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        Ok(Self {
            token_url: k.token_uri.unwrap_or_else(|| crate::GOOGLE_TOKEN_URL.to_string()),
            client_email: k.client_email,
            key: RsaKey::from_pem(&k.private_key)?,
            subject: subject.to_string(),
            scope: scope.to_string(),
        })
    }
}

/// One of the three grants.
#[derive(Debug)]
pub enum Grant {
    ClientCredentials(ClientCredentials),
    RefreshToken(RefreshTokenGrant),
    ServiceAccount(ServiceAccount),
}

/// A form to POST to a token endpoint. `Debug` names the fields, never their values.
pub struct TokenRequest {
    pub url: String,
    form: Vec<(&'static str, String)>,
}

impl TokenRequest {
    /// The `application/x-www-form-urlencoded` body.
    pub fn body(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish()
    }

    /// The value of one field (tests).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields: Vec<&str> = self.form.iter().map(|(k, _)| *k).collect();
        f.debug_struct("TokenRequest")
            .field("url", &self.url)
            .field("fields", &fields)
            .finish()
    }
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

impl Grant {
    pub fn token_url(&self) -> &str {
        match self {
            Self::ClientCredentials(g) => &g.token_url,
            Self::RefreshToken(g) => &g.token_url,
            Self::ServiceAccount(g) => &g.token_url,
        }
    }

    /// The form to post at `now`. `jti` identifies a client assertion (a fresh UUID each time);
    /// `refresh_token` replaces the grant's own when the provider rotated it.
    pub fn request(
        &self,
        now: u64,
        jti: &str,
        refresh_token: Option<&SecretString>,
    ) -> Result<TokenRequest, OAuthError> {
        let mut form: Vec<(&'static str, String)> = Vec::new();
        match self {
            Self::ClientCredentials(g) => {
                form.push(("grant_type", "client_credentials".into()));
                form.push(("client_id", g.client_id.clone()));
                form.push(("scope", g.scope.clone()));
                match &g.credential {
                    ClientCredential::Secret(s) => form.push(("client_secret", s.expose().to_string())),
                    ClientCredential::Certificate { key, thumbprints, alg } => {
                        let claims = ClientAssertionClaims::new(&g.token_url, &g.client_id, jti, now);
                        form.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.into()));
                        form.push(("client_assertion", jwt::sign(key, *alg, Some(thumbprints), &claims)?));
                    }
                }
            }
            Self::RefreshToken(g) => {
                form.push(("grant_type", "refresh_token".into()));
                form.push(("client_id", g.client_id.clone()));
                if let Some(s) = &g.client_secret {
                    form.push(("client_secret", s.expose().to_string()));
                }
                let token = refresh_token.unwrap_or(&g.refresh_token);
                form.push(("refresh_token", token.expose().to_string()));
                if let Some(scope) = &g.scope {
                    form.push(("scope", scope.clone()));
                }
            }
            Self::ServiceAccount(g) => {
                let claims = ServiceAccountClaims::new(&g.client_email, &g.subject, &g.scope, &g.token_url, now);
                form.push(("grant_type", JWT_BEARER.into()));
                form.push(("assertion", jwt::sign(&g.key, JwtAlg::Rs256, None, &claims)?));
            }
        }
        Ok(TokenRequest {
            url: self.token_url().to_string(),
            form,
        })
    }

    /// Identifies the grant's settings and credentials (hashed): a changed client, scope, user or
    /// secret gets a token of its own instead of the cached one.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        let mut put = |s: &str| {
            h.update(s.as_bytes());
            h.update([0]);
        };
        match self {
            Self::ClientCredentials(g) => {
                put("cc");
                put(&g.token_url);
                put(&g.client_id);
                put(&g.scope);
                match &g.credential {
                    ClientCredential::Secret(s) => put(s.expose()),
                    ClientCredential::Certificate { thumbprints, alg, .. } => {
                        put(&thumbprints.sha256);
                        put(alg.as_str());
                    }
                }
            }
            Self::RefreshToken(g) => {
                put("rt");
                put(&g.token_url);
                put(&g.client_id);
                put(g.client_secret.as_ref().map(SecretString::expose).unwrap_or(""));
                put(g.scope.as_deref().unwrap_or(""));
                // Not the refresh token: it rotates, and the rotated one is tied to the Secret's
                // by `refresh_origin`.
            }
            Self::ServiceAccount(g) => {
                put("sa");
                put(&g.token_url);
                put(&g.client_email);
                put(&hex::encode(g.key.public_key_der()));
                put(&g.subject);
                put(&g.scope);
            }
        }
        hex::encode(&h.finalize()[..8])
    }

    /// For the refresh-token grant: a hash of the refresh token in the Secret, which a rotated
    /// token descends from. A new token in the Secret (the user consented again) wins over one
    /// the provider rotated from the old.
    pub fn refresh_origin(&self) -> Option<String> {
        match self {
            Self::RefreshToken(g) => Some(hex::encode(&Sha256::digest(g.refresh_token.expose().as_bytes())[..16])),
            _ => None,
        }
    }
}

/// An access token and when it expires (Unix seconds); a rotated refresh token when the provider
/// sent one. `Debug` shows neither token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub access_token: SecretString,
    pub expires_at: u64,
    pub refresh_token: Option<SecretString>,
}

impl Token {
    /// Seconds left at `now`, zero once expired.
    pub fn remaining(&self, now: u64) -> u64 {
        self.expires_at.saturating_sub(now)
    }

    /// Whether it is time to fetch the next one: less than `ahead` seconds left.
    pub fn needs_refresh(&self, now: u64, ahead: u64) -> bool {
        self.remaining(now) < ahead
    }
}

/// How long before expiry a token issued at `issued_at` is replaced: `ahead`, but never more than
/// half its lifetime, so a short-lived token is not refreshed as soon as it arrives.
pub fn refresh_ahead(issued_at: u64, expires_at: u64, ahead: u64) -> u64 {
    ahead.min(expires_at.saturating_sub(issued_at) / 2)
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<ExpiresIn>,
    refresh_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Microsoft once sent `expires_in` as a string; accept both.
#[derive(Deserialize)]
#[serde(untagged)]
enum ExpiresIn {
    Number(u64),
    Text(String),
}

/// When a response gives no `expires_in`: the usual hour, less a margin.
const DEFAULT_EXPIRES_IN: u64 = 3000;

/// The token or the provider's error in a token endpoint's answer received at `now`.
pub fn parse_response(status: u16, body: &[u8], now: u64) -> Result<Token, OAuthError> {
    let parsed: Option<TokenResponse> = serde_json::from_slice(body).ok();
    let Some(r) = parsed else {
        return Err(OAuthError::Response { status });
    };
    if let Some(error) = r.error {
        return Err(OAuthError::Provider {
            status,
            error,
            description: r.error_description,
        });
    }
    match (status, r.access_token) {
        (200..=299, Some(t)) if !t.is_empty() => {
            let expires_in = match r.expires_in {
                Some(ExpiresIn::Number(n)) => n,
                Some(ExpiresIn::Text(s)) => s.trim().parse().unwrap_or(DEFAULT_EXPIRES_IN),
                None => DEFAULT_EXPIRES_IN,
            };
            Ok(Token {
                access_token: SecretString::new(t),
                expires_at: now.saturating_add(expires_in),
                refresh_token: r.refresh_token.filter(|t| !t.is_empty()).map(SecretString::new),
            })
        }
        _ => Err(OAuthError::Response { status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = include_str!("../../testkit/keys/dkim-rsa-2048.pem");

    fn client_secret() -> Grant {
        Grant::ClientCredentials(ClientCredentials {
            token_url: crate::entra_token_url("contoso.onmicrosoft.com"),
            client_id: "app-1".into(),
            credential: ClientCredential::Secret("s3cret-value".into()),
            scope: crate::OFFICE365_SCOPE.into(),
        })
    }

    fn refresh() -> Grant {
        Grant::RefreshToken(RefreshTokenGrant {
            token_url: crate::GOOGLE_TOKEN_URL.into(),
            client_id: "cid".into(),
            client_secret: Some("csecret-value".into()),
            refresh_token: "rtoken-value".into(),
            scope: None,
        })
    }

    #[test]
    fn each_grant_posts_its_form() {
        let r = client_secret().request(100, "j", None).unwrap();
        assert_eq!(
            r.url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            r.body(),
            "grant_type=client_credentials&client_id=app-1&scope=https%3A%2F%2Foutlook.office365.com%2F.default&client_secret=s3cret-value"
        );

        let r = refresh().request(100, "j", None).unwrap();
        assert_eq!(r.field("grant_type"), Some("refresh_token"));
        assert_eq!(r.field("refresh_token"), Some("rtoken-value"));
        let rotated = SecretString::new("rotated-value");
        let r = refresh().request(100, "j", Some(&rotated)).unwrap();
        assert_eq!(r.field("refresh_token"), Some("rotated-value"));

        let key = RsaKey::from_pem(KEY).unwrap();
        let public = key.public_key_der();
        let cert = Grant::ClientCredentials(ClientCredentials {
            token_url: "https://login.example/t/oauth2/v2.0/token".into(),
            client_id: "app-2".into(),
            credential: ClientCredential::Certificate {
                key: Box::new(key),
                thumbprints: Thumbprints::from_der(b"cert"),
                alg: JwtAlg::Ps256,
            },
            scope: crate::OFFICE365_SCOPE.into(),
        });
        let r = cert.request(1_000, "jti-9", None).unwrap();
        assert_eq!(r.field("client_secret"), None);
        assert_eq!(r.field("client_assertion_type"), Some(CLIENT_ASSERTION_TYPE));
        let (h, c) = jwt::verify(r.field("client_assertion").unwrap(), &public).unwrap();
        assert_eq!(h["alg"], "PS256");
        assert_eq!(
            (c["jti"].as_str(), c["aud"].as_str()),
            (Some("jti-9"), Some(r.url.as_str()))
        );

        let json = serde_json::json!({
            "type": "service_account",
            "client_email": "relay@project.iam.gserviceaccount.com",
            "private_key": KEY,
        })
        .to_string();
        let sa = Grant::ServiceAccount(
            ServiceAccount::from_json_key(&json, "alice@example.com", crate::GMAIL_SCOPE).unwrap(),
        );
        let r = sa.request(50, "j", None).unwrap();
        assert_eq!(r.url, crate::GOOGLE_TOKEN_URL);
        assert_eq!(r.field("grant_type"), Some(JWT_BEARER));
        let (_, c) = jwt::verify(r.field("assertion").unwrap(), &public).unwrap();
        assert_eq!(
            (
                c["iss"].as_str(),
                c["sub"].as_str(),
                c["scope"].as_str(),
                c["aud"].as_str()
            ),
            (
                Some("relay@project.iam.gserviceaccount.com"),
                Some("alice@example.com"),
                Some("https://mail.google.com/"),
                Some(crate::GOOGLE_TOKEN_URL)
            )
        );
    }

    #[test]
    fn endpoints_are_named_without_their_path() {
        assert_eq!(
            endpoint_name(&crate::entra_token_url("contoso.onmicrosoft.com")),
            "https://login.microsoftonline.com"
        );
        assert_eq!(
            endpoint_name("https://127.0.0.1:8443/t/token?x=1"),
            "https://127.0.0.1:8443"
        );
        assert_eq!(endpoint_name("https://u:p@idp.example/token"), "https://idp.example");
        let e = OAuthError::Transport {
            url: crate::entra_token_url("tenant-secret-ish"),
            reason: "connect: refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "token endpoint https://login.microsoftonline.com: connect: refused"
        );
    }

    #[test]
    fn responses_give_a_token_with_its_expiry_or_the_providers_words() {
        let t = parse_response(
            200,
            br#"{"token_type":"Bearer","expires_in":3599,"access_token":"at-1"}"#,
            1_000,
        )
        .unwrap();
        assert_eq!(
            (t.access_token.expose(), t.expires_at, t.refresh_token.is_none()),
            ("at-1", 4_599, true)
        );
        assert_eq!(t.remaining(4_000), 599);
        assert!(!t.needs_refresh(4_000, 300));
        assert!(t.needs_refresh(4_300, 300));
        assert_eq!(t.remaining(5_000), 0);
        // An hour-long token is replaced 5 minutes ahead; a 100-second one at half its life.
        assert_eq!(refresh_ahead(1_000, 4_600, 300), 300);
        assert_eq!(refresh_ahead(1_000, 1_100, 300), 50);
        assert_eq!(refresh_ahead(1_000, 900, 300), 0);
        let t = parse_response(
            200,
            br#"{"expires_in":"60","access_token":"a","refresh_token":"r2"}"#,
            0,
        )
        .unwrap();
        assert_eq!(
            (t.expires_at, t.refresh_token.as_ref().map(SecretString::expose)),
            (60, Some("r2"))
        );

        let aad = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.","error_codes":[7000215]}"#;
        let e = parse_response(401, aad, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid_client: AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID."
        );
        assert!(e.is_credential_error());
        let e = parse_response(
            400,
            br#"{"error":"invalid_grant","error_description":"Bad Request"}"#,
            0,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "invalid_grant: Bad Request");
        let e = parse_response(400, br#"{"error":"invalid_grant"}"#, 0).unwrap_err();
        assert_eq!(e.to_string(), "invalid_grant");
        assert_eq!(
            parse_response(502, b"<html>", 0).unwrap_err(),
            OAuthError::Response { status: 502 }
        );
        assert_eq!(
            parse_response(200, b"{}", 0).unwrap_err(),
            OAuthError::Response { status: 200 }
        );
    }

    #[test]
    fn no_secret_in_debug_output() {
        let grants = [client_secret(), refresh()];
        for g in &grants {
            let debug = format!("{g:?} {:?}", g.request(1, "j", None).unwrap());
            for secret in ["s3cret-value", "csecret-value", "rtoken-value"] {
                assert!(!debug.contains(secret), "{debug}");
            }
        }
        let t = parse_response(
            200,
            br#"{"expires_in":60,"access_token":"at-secret","refresh_token":"rt-secret"}"#,
            0,
        )
        .unwrap();
        let shown = format!("{t:?} {}", t.access_token);
        assert!(!shown.contains("at-secret") && !shown.contains("rt-secret"), "{shown}");
        let bad_key = serde_json::json!({"client_email": "x", "private_key": "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n"});
        let e = ServiceAccount::from_json_key(&bad_key.to_string(), "u", "s").unwrap_err();
        assert!(!format!("{e} {e:?}").contains("c2VjcmV0"));
        let e = ServiceAccount::from_json_key(
            r#"{"client_email": "x", "private_key": 5, "secret": "c2VjcmV0"}"#,
            "u",
            "s",
        )
        .unwrap_err();
        assert!(!format!("{e} {e:?}").contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn fingerprints_follow_the_credentials_but_not_the_rotating_refresh_token() {
        assert_eq!(client_secret().fingerprint(), client_secret().fingerprint());
        let Grant::ClientCredentials(mut other) = client_secret() else {
            unreachable!()
        };
        other.credential = ClientCredential::Secret("new".into());
        assert_ne!(
            Grant::ClientCredentials(other).fingerprint(),
            client_secret().fingerprint()
        );
        let Grant::RefreshToken(mut r) = refresh() else {
            unreachable!()
        };
        r.refresh_token = "another".into();
        let r = Grant::RefreshToken(r);
        assert_eq!(r.fingerprint(), refresh().fingerprint());
        assert_ne!(r.refresh_origin(), refresh().refresh_origin());
    }
}
