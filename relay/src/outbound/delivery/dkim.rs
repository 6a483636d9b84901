//! DKIM signing of outgoing mail with mail-auth: loads a route's private key (RSA in PKCS#8 or
//! PKCS#1 PEM, Ed25519 in PKCS#8 PEM — the formats `compile` accepts into
//! `RelaySecrets::dkim_keys`) and prepends a `DKIM-Signature:` header.
//!
//! Signing happens after the From override so the signature covers the final headers. Must not
//! log key material; the key never leaves this module.
//!
//! Two of mail-auth's outputs differ from what other verifiers (dkimpy, OpenDKIM) compute, and
//! are worked around here: its header puts a fold between a `b=` value that fills its line and
//! the closing `;` ([`close_b_value`]), and its relaxed body hash counts whitespace-only lines at
//! the end of the body ([`empty_trailing_blank_lines`]). relay/tests/dkim_interop.rs checks
//! every key type, canonicalization and awkward message shape with those verifiers.

use std::borrow::Cow;
use std::fmt;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
pub use mail_auth::dkim::Canonicalization;
use mail_auth::dkim::Done;
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
    relaxed_body: bool,
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
            relaxed_body: true,
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

    /// The same signer with other canonicalizations (relaxed/relaxed by default).
    pub fn with_canonicalization(self, header: Canonicalization, body: Canonicalization) -> Self {
        let key = match self.key {
            Key::Rsa(s) => Key::Rsa(s.header_canonicalization(header).body_canonicalization(body)),
            Key::Ed25519(s) => Key::Ed25519(s.header_canonicalization(header).body_canonicalization(body)),
        };
        Self {
            key,
            relaxed_body: body == Canonicalization::Relaxed,
            ..self
        }
    }

    /// The `DKIM-Signature:` header field (with CRLF) for `message` exactly as given; [`Self::sign`]
    /// first makes the message one that every verifier hashes alike.
    fn signature_header(&self, message: &[u8]) -> Result<String, DkimError> {
        let signature = match &self.key {
            Key::Rsa(s) => s.sign(message),
            Key::Ed25519(s) => s.sign(message),
        }
        .map_err(|e| DkimError::Sign(e.to_string()))?;
        Ok(close_b_value(signature.to_header()))
    }

    /// `message` with the signature prepended. With relaxed body canonicalization, whitespace-only
    /// lines at the end of the body come out empty ([`empty_trailing_blank_lines`]).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, DkimError> {
        let message = if self.relaxed_body {
            empty_trailing_blank_lines(message)
        } else {
            Cow::Borrowed(message)
        };
        let header = self.signature_header(&message)?;
        let mut out = Vec::with_capacity(header.len() + message.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&message);
        Ok(out)
    }
}

/// Removes the fold mail-auth puts between the `b=` value and its closing `;` when the value
/// exactly fills a line (`b=…\r\n\t;`). mail-auth signs the header with an empty `b=` value and
/// no whitespace after it (`b=;`); RFC 6376 §3.7 deletes the value "including all surrounding
/// whitespace", which mail-auth's verifier reads as covering that fold, but dkimpy and others
/// delete only the base64 text (and the folds inside it), keep the fold, and find the signature
/// bad (every RSA-2048 message with our usual headers). `b=` is always the last tag mail-auth
/// writes and only a fold after a full line can end the header this way, so the result, with
/// the `b=` value deleted, is byte for byte what was signed, under either reading. The last line
/// gets one character longer (77), within RFC 5322's 78.
pub fn close_b_value(header: String) -> String {
    match header.strip_suffix("\r\n\t;\r\n") {
        Some(head) if head.rsplit_once("; b=").is_some_and(|(_, b)| !b.contains(';')) => format!("{head};\r\n"),
        _ => header,
    }
}

/// `message` with the spaces and tabs removed from the whitespace at the end of its body (the
/// body's last non-whitespace character stays where it is; line breaks stay). RFC 6376 §3.4.4
/// relaxed body canonicalization ignores whitespace at the end of lines and empty lines at the
/// end of the body, so whitespace-only trailing lines count for nothing; mail-auth counts them
/// (`Body.\r\n  \r\n` hashes as `Body.\r\n\r\n`), and dkimpy and OpenDKIM then reject the body
/// hash. Removing that whitespace changes no verifier's canonical body, and makes mail-auth's
/// agree. A message without a header/body separator is returned as it is.
pub fn empty_trailing_blank_lines(message: &[u8]) -> Cow<'_, [u8]> {
    let Some(body_start) = message.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
        return Cow::Borrowed(message);
    };
    let body = &message[body_start..];
    let tail_start = body
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .map_or(0, |p| p + 1);
    let tail = &body[tail_start..];
    if !tail.iter().any(|b| matches!(b, b' ' | b'\t')) {
        return Cow::Borrowed(message);
    }
    let mut out = Vec::with_capacity(message.len());
    out.extend_from_slice(&message[..body_start + tail_start]);
    out.extend(tail.iter().filter(|b| !matches!(b, b' ' | b'\t')));
    Cow::Owned(out)
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
        let header = String::from_utf8(signer.sign(MESSAGE).expect("signs")).expect("UTF-8");
        assert!(header.contains("d=example.com"), "{header}");
        assert!(header.contains("s=mailroute"), "{header}");
        assert!(header.to_ascii_lowercase().contains("from"), "{header}");
    }

    #[test]
    fn a_b_value_that_fills_its_line_is_closed_without_a_fold() {
        let head = "DKIM-Signature: v=1; a=rsa-sha256; s=s; d=example.com; c=relaxed/relaxed;\r\n\th=From; t=1; bh=AAAA; b=\r\n\tBBBB";
        assert_eq!(close_b_value(format!("{head}\r\n\t;\r\n")), format!("{head};\r\n"));
        // Already closed, or a fold that is not after the b= value: left alone.
        for other in [format!("{head};\r\n"), "X: a; b=c; d=\r\n\t;\r\n".to_owned()] {
            assert_eq!(close_b_value(other.clone()), other);
        }
    }

    #[test]
    fn whitespace_at_the_end_of_the_body_is_emptied() {
        let cases: [(&[u8], &[u8]); 7] = [
            (
                b"A: b\r\n\r\nBody.\r\n\r\n  \r\n\t\r\n",
                b"A: b\r\n\r\nBody.\r\n\r\n\r\n\r\n",
            ),
            (b"A: b\r\n\r\nBody.  \r\n \r\n", b"A: b\r\n\r\nBody.\r\n\r\n"),
            (b"A: b\r\n\r\nBody. ", b"A: b\r\n\r\nBody."),
            (b"A: b\r\n\r\n \r\n", b"A: b\r\n\r\n\r\n"),
            // Whitespace inside the body and in the headers stays.
            (b"A:  b \r\n\r\n x \r\n  y\r\n", b"A:  b \r\n\r\n x \r\n  y\r\n"),
            (b"A: b\r\n\r\nBody.\r\n\r\n", b"A: b\r\n\r\nBody.\r\n\r\n"),
            (b"A: b  \r\n", b"A: b  \r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(
                &*empty_trailing_blank_lines(input),
                want,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
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
