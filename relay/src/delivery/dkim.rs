//! DKIM signing of outgoing mail with mail-auth: loads a route's private key (RSA in PKCS#8 or
//! PKCS#1 PEM, Ed25519 in PKCS#8 PEM — the formats `compile` accepts into
//! `RelaySecrets::dkim_keys`) and prepends a `DKIM-Signature:` header.
//!
//! Signing happens after the From override so the signature covers the final headers. Must not
//! log key material; the key never leaves this module.

use std::fmt;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, Done};
use mailroute_api::config::DkimConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;

/// Header fields signed when present.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Sender",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// Errors loading a key or signing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DkimError {
    #[error("the DKIM key is not a PEM private key: {0}")]
    Pem(String),
    #[error("unsupported DKIM key (expected RSA or Ed25519): {0}")]
    Key(String),
    #[error("DKIM signing failed: {0}")]
    Sign(String),
}

enum Key {
    Rsa(mail_auth::dkim::DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(mail_auth::dkim::DkimSigner<Ed25519Key, Done>),
}

/// A ready signer for one `d=` domain and selector. Build once per configuration generation and
/// share (`Arc`); signing takes `&self`.
pub struct DkimSigner {
    domain: String,
    selector: String,
    key: Key,
}

impl fmt::Debug for DkimSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DkimSigner")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm())
            .finish()
    }
}

impl DkimSigner {
    /// Builds a signer from a route's DKIM settings and its PEM key.
    pub fn from_config(config: &DkimConfig, key_pem: &str) -> Result<Self, DkimError> {
        Self::new(&config.domain, &config.selector, key_pem)
    }

    pub fn new(domain: &str, selector: &str, key_pem: &str) -> Result<Self, DkimError> {
        let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| DkimError::Pem(e.to_string()))?;
        let key = match der {
            PrivateKeyDer::Pkcs8(pkcs8) => {
                // PKCS#8 carries either algorithm; Ed25519 is the cheaper probe. "Maybe
                // unchecked" accepts v1 documents without the public key (e.g. OpenSSL's).
                match Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der()) {
                    Ok(k) => Key::Ed25519(Self::template(k, domain, selector)),
                    Err(_) => {
                        let k = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(pkcs8))
                            .map_err(|e| DkimError::Key(e.to_string()))?;
                        Key::Rsa(Self::template(k, domain, selector))
                    }
                }
            }
            other @ PrivateKeyDer::Pkcs1(_) => {
                let k = RsaKey::<Sha256>::from_key_der(other).map_err(|e| DkimError::Key(e.to_string()))?;
                Key::Rsa(Self::template(k, domain, selector))
            }
            _ => return Err(DkimError::Key("only RSA and Ed25519 keys can sign DKIM".into())),
        };
        Ok(Self {
            domain: domain.to_owned(),
            selector: selector.to_owned(),
            key,
        })
    }

    fn template<K: mail_auth::common::crypto::SigningKey>(
        key: K,
        domain: &str,
        selector: &str,
    ) -> mail_auth::dkim::DkimSigner<K, Done> {
        mail_auth::dkim::DkimSigner::from_key(key)
            .domain(domain)
            .selector(selector)
            .headers(SIGNED_HEADERS.iter().copied())
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed)
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn selector(&self) -> &str {
        &self.selector
    }

    /// `rsa-sha256` or `ed25519-sha256`.
    pub fn algorithm(&self) -> &'static str {
        match self.key {
            Key::Rsa(_) => "rsa-sha256",
            Key::Ed25519(_) => "ed25519-sha256",
        }
    }

    /// The `DKIM-Signature:` header field (with CRLF) for `message`.
    pub fn signature_header(&self, message: &[u8]) -> Result<String, DkimError> {
        let signature = match &self.key {
            Key::Rsa(s) => s.sign(message),
            Key::Ed25519(s) => s.sign(message),
        }
        .map_err(|e| DkimError::Sign(e.to_string()))?;
        Ok(signature.to_header())
    }

    /// `message` with the signature prepended.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, DkimError> {
        let header = self.signature_header(message)?;
        let mut out = Vec::with_capacity(header.len() + message.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(message);
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use mail_auth::DkimResult;

    use super::*;

    /// A 2048-bit RSA test key (PKCS#8), generated for this test only.
    pub(crate) const RSA_PKCS8_PEM: &str = include_str!("testdata/dkim-rsa.pem");
    /// The example key of examples/mx-default-route.yaml (Ed25519, PKCS#8 v1).
    pub(crate) const ED25519_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKqI1cA4MPeCfi0VBYZ2cZ0gC0dK2ajbFxVGAiHKXqmc\n-----END PRIVATE KEY-----\n";

    const MESSAGE: &[u8] = b"From: Shop <orders@example.com>\r\nTo: alice@example.net\r\nSubject: Order 42\r\nDate: Sun, 1 Mar 2026 10:00:00 +0000\r\nMessage-ID: <42@example.com>\r\n\r\nThanks for your order.\r\n";

    async fn verify(signed: &[u8], record: &str) -> Vec<DkimResult> {
        mailroute_testkit::dkim::verify(signed, "mailroute._domainkey.example.com.", record).await
    }

    #[tokio::test]
    async fn ed25519_signature_verifies() {
        let signer = DkimSigner::new("example.com", "mailroute", ED25519_PEM).expect("key loads");
        assert_eq!(signer.algorithm(), "ed25519-sha256");
        let signed = signer.sign(MESSAGE).expect("signs");
        assert!(signed.starts_with(b"DKIM-Signature: "));
        let record = mailroute_testkit::dkim::ed25519_record(ED25519_PEM);
        assert_eq!(verify(&signed, &record).await, vec![DkimResult::Pass]);

        // Tampering with a signed header breaks it.
        let tampered = String::from_utf8_lossy(&signed).replace("Order 42", "Order 43");
        let results = verify(tampered.as_bytes(), &record).await;
        assert!(matches!(results.as_slice(), [DkimResult::Fail(_)]), "{results:?}");
    }

    #[tokio::test]
    async fn rsa_signature_verifies() {
        let signer = DkimSigner::new("example.com", "mailroute", RSA_PKCS8_PEM).expect("key loads");
        assert_eq!(signer.algorithm(), "rsa-sha256");
        let signed = signer.sign(MESSAGE).expect("signs");
        let record = format!("v=DKIM1; k=rsa; p={}", include_str!("testdata/dkim-rsa.pub.b64").trim());
        assert_eq!(verify(&signed, &record).await, vec![DkimResult::Pass]);
        // The header covers the From the override produced.
        let header = signer.signature_header(MESSAGE).expect("signs");
        assert!(header.contains("d=example.com"), "{header}");
        assert!(header.contains("s=mailroute"), "{header}");
        assert!(header.to_ascii_lowercase().contains("from"), "{header}");
    }

    #[test]
    fn bad_keys_are_rejected_without_echoing_them() {
        let err = DkimSigner::new("example.com", "s", "not a key").expect_err("must fail");
        assert!(matches!(err, DkimError::Pem(_)), "{err}");
        let cert_only = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(DkimSigner::new("example.com", "s", cert_only).is_err());
        let debug = format!("{:?}", DkimSigner::new("example.com", "s", ED25519_PEM).expect("loads"));
        assert!(!debug.contains("MC4CAQ"), "{debug}");
    }
}
