//! JWT assertions signed with an RSA key: the Entra ID client assertion (a certificate's key
//! proves the client, RS256 or PS256, with the certificate's thumbprints in the header) and the
//! Google service-account assertion (RS256, `sub` = the user to impersonate). Pure apart from the
//! random padding of PS256; the caller passes the time and the token id.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, RsaKeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use crate::grant::OAuthError;

/// The signature algorithm of an assertion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum JwtAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[default]
    Rs256,
    /// RSASSA-PSS with SHA-256.
    Ps256,
}

impl JwtAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Ps256 => "PS256",
        }
    }
}

/// An RSA private key (PKCS#8 or PKCS#1 PEM). `Debug` shows its size only.
pub struct RsaKey(RsaKeyPair);

impl RsaKey {
    /// Reads the first private key of a PEM document. The error never quotes the PEM.
    pub fn from_pem(pem: &str) -> Result<Self, OAuthError> {
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| OAuthError::Key("no PEM private key found".into()))?;
        let pair = match &der {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err(OAuthError::Key("the private key is not an RSA key".into())),
        }
        .map_err(|e| OAuthError::Key(format!("the private key is not a usable RSA key: {e}")))?;
        Ok(Self(pair))
    }

    /// The public key (DER `RSAPublicKey`), to verify signatures with.
    pub fn public_key_der(&self) -> Vec<u8> {
        use ring::signature::KeyPair as _;
        self.0.public_key().as_ref().to_vec()
    }

    fn sign(&self, alg: JwtAlg, message: &[u8]) -> Result<Vec<u8>, OAuthError> {
        let padding: &'static dyn signature::RsaEncoding = match alg {
            JwtAlg::Rs256 => &signature::RSA_PKCS1_SHA256,
            JwtAlg::Ps256 => &signature::RSA_PSS_SHA256,
        };
        let mut sig = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(padding, &SystemRandom::new(), message, &mut sig)
            .map_err(|_| OAuthError::Key("signing failed".into()))?;
        Ok(sig)
    }
}

impl fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaKey({} bits, [redacted])", self.0.public().modulus_len() * 8)
    }
}

/// The thumbprints Entra ID identifies a certificate by: `x5t` (SHA-1) and `x5t#S256`, base64url.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thumbprints {
    pub sha1: String,
    pub sha256: String,
}

impl Thumbprints {
    /// From the first certificate of a PEM document.
    pub fn from_pem(pem: &str) -> Result<Self, OAuthError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| OAuthError::Key("no PEM certificate found".into()))?;
        Ok(Self::from_der(&der))
    }

    pub fn from_der(der: &[u8]) -> Self {
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
        let sha256 = ring::digest::digest(&ring::digest::SHA256, der);
        Self {
            sha1: URL_SAFE_NO_PAD.encode(sha1),
            sha256: URL_SAFE_NO_PAD.encode(sha256),
        }
    }
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    typ: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    x5t: Option<&'a str>,
    #[serde(rename = "x5t#S256", skip_serializing_if = "Option::is_none")]
    x5t_s256: Option<&'a str>,
}

/// The claims of an Entra ID client assertion: the client is issuer and subject, the token
/// endpoint the audience; valid ten minutes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientAssertionClaims {
    pub aud: String,
    pub iss: String,
    pub sub: String,
    pub jti: String,
    pub nbf: u64,
    pub iat: u64,
    pub exp: u64,
}

impl ClientAssertionClaims {
    pub fn new(token_url: &str, client_id: &str, jti: &str, now: u64) -> Self {
        Self {
            aud: token_url.to_string(),
            iss: client_id.to_string(),
            sub: client_id.to_string(),
            jti: jti.to_string(),
            nbf: now,
            iat: now,
            exp: now + 600,
        }
    }
}

/// The claims of a Google service-account assertion: `sub` is the user whose mailbox is used
/// (domain-wide delegation); valid one hour, the most Google accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceAccountClaims {
    pub iss: String,
    pub sub: String,
    pub scope: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
}

impl ServiceAccountClaims {
    pub fn new(client_email: &str, subject: &str, scope: &str, token_url: &str, now: u64) -> Self {
        Self {
            iss: client_email.to_string(),
            sub: subject.to_string(),
            scope: scope.to_string(),
            aud: token_url.to_string(),
            iat: now,
            exp: now + 3600,
        }
    }
}

/// `header.claims.signature`, each base64url without padding.
pub fn sign<C: Serialize>(
    key: &RsaKey,
    alg: JwtAlg,
    thumbprints: Option<&Thumbprints>,
    claims: &C,
) -> Result<String, OAuthError> {
    let header = Header {
        alg: alg.as_str(),
        typ: "JWT",
        x5t: thumbprints.map(|t| t.sha1.as_str()),
        x5t_s256: thumbprints.map(|t| t.sha256.as_str()),
    };
    let signing_input = format!("{}.{}", b64_json(&header)?, b64_json(claims)?);
    let sig = key.sign(alg, signing_input.as_bytes())?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

fn b64_json<T: Serialize + ?Sized>(v: &T) -> Result<String, OAuthError> {
    let json = serde_json::to_vec(v).map_err(|e| OAuthError::Key(format!("encoding a JWT: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

/// Splits a JWT and checks its signature with an RSA public key (DER); returns the header and
/// claims as JSON. For tests and for the test token endpoints.
pub fn verify(jwt: &str, public_key_der: &[u8]) -> Result<(serde_json::Value, serde_json::Value), String> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not three parts".into());
    };
    let decode = |p: &str| URL_SAFE_NO_PAD.decode(p).map_err(|e| e.to_string());
    let header: serde_json::Value = serde_json::from_slice(&decode(h)?).map_err(|e| e.to_string())?;
    let claims: serde_json::Value = serde_json::from_slice(&decode(c)?).map_err(|e| e.to_string())?;
    let alg: &'static dyn signature::VerificationAlgorithm = match header["alg"].as_str() {
        Some("RS256") => &signature::RSA_PKCS1_2048_8192_SHA256,
        Some("PS256") => &signature::RSA_PSS_2048_8192_SHA256,
        other => return Err(format!("unexpected alg {other:?}")),
    };
    signature::UnparsedPublicKey::new(alg, public_key_der)
        .verify(format!("{h}.{c}").as_bytes(), &decode(s)?)
        .map_err(|_| "bad signature".to_string())?;
    Ok((header, claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = include_str!("../../testkit/keys/dkim-rsa-2048.pem");

    #[test]
    fn assertions_verify_with_the_public_key_and_carry_the_claims() {
        let key = RsaKey::from_pem(KEY).unwrap();
        let tp = Thumbprints::from_der(b"certificate");
        let claims = ClientAssertionClaims::new("https://login.example/t/token", "client-1", "jti-1", 1_000);
        for alg in [JwtAlg::Rs256, JwtAlg::Ps256] {
            let jwt = sign(&key, alg, Some(&tp), &claims).unwrap();
            let (h, c) = verify(&jwt, &key.public_key_der()).unwrap();
            assert_eq!(h["alg"], alg.as_str());
            assert_eq!(h["x5t"], tp.sha1.as_str());
            assert_eq!(h["x5t#S256"], tp.sha256.as_str());
            assert_eq!(
                (c["aud"].as_str(), c["iss"].as_str(), c["sub"].as_str()),
                (
                    Some("https://login.example/t/token"),
                    Some("client-1"),
                    Some("client-1")
                )
            );
            assert_eq!((c["nbf"].as_u64(), c["exp"].as_u64()), (Some(1_000), Some(1_600)));
            // A changed claim breaks the signature.
            let mut parts: Vec<&str> = jwt.split('.').collect();
            let forged = URL_SAFE_NO_PAD.encode(br#"{"iss":"other"}"#);
            parts[1] = &forged;
            assert!(verify(&parts.join("."), &key.public_key_der()).is_err());
        }
        let sa = ServiceAccountClaims::new("sa@p.iam.gserviceaccount.com", "user@example.com", "s", "aud", 10);
        let (h, c) = verify(&sign(&key, JwtAlg::Rs256, None, &sa).unwrap(), &key.public_key_der()).unwrap();
        assert!(h.get("x5t").is_none());
        assert_eq!(
            (c["sub"].as_str(), c["exp"].as_u64()),
            (Some("user@example.com"), Some(3_610))
        );
    }

    #[test]
    fn keys_never_show_and_bad_pem_is_refused_without_quoting_it() {
        let key = RsaKey::from_pem(KEY).unwrap();
        let debug = format!("{key:?}");
        assert_eq!(debug, "RsaKey(2048 bits, [redacted])");
        let secret_line = KEY.lines().nth(1).unwrap();
        let err = RsaKey::from_pem(&KEY.replace(secret_line, "AAAA"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("AAAA") && !err.contains(secret_line), "{err}");
        assert!(RsaKey::from_pem(include_str!("../../testkit/keys/dkim-ed25519.pem")).is_err());
    }
}
