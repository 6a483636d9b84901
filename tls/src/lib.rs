//! TLS client configurations for outbound SMTP: certificate-verifying configs (system roots,
//! optionally plus a route's extra CA bundle), pinned configs (exactly the certificates with
//! the given SHA-256 fingerprints, as Postfix's `smtp_tls_fingerprint_digest = sha256`), and
//! the non-verifying config used for opportunistic STARTTLS to MX hosts and for routes with
//! `verifyTls: false`.
//!
//! One crate for the relay's delivery and the operator's connection test, so a route the
//! operator reports as verified is trusted by the relay in exactly the same way. Also
//! [`MaybeTls`], the plain-or-TLS stream of every SMTP session that can upgrade.
//!
//! Built here rather than through mail-send's `build_tls_connector`, which only offers the
//! platform verifier or no verification at all, not extra CA roots. No I/O besides reading the
//! system roots once.

mod stream;

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use self::stream::MaybeTls;

/// Errors building a TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsSetupError {
    #[error("the CA bundle holds no PEM certificate")]
    EmptyBundle,
    #[error("invalid CA certificate: {0}")]
    InvalidCa(String),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("no certificate fingerprint to pin")]
    NoPin,
    #[error("`{0}` is not a SHA-256 fingerprint (64 hex digits)")]
    BadFingerprint(String),
}

/// The SHA-256 fingerprint of a DER certificate (what `openssl x509 -fingerprint -sha256`
/// prints, without the colons).
pub fn sha256_fingerprint(der: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(der).into()
}

/// `ab:cd:…` (upper case, as openssl prints it), for messages.
pub fn format_fingerprint(fp: &[u8; 32]) -> String {
    let hex = hex::encode_upper(fp);
    hex.as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// A config accepting exactly the server certificates whose SHA-256 fingerprint is in `pins`,
/// whatever their issuer, names, dates or CA flag (a self-signed certificate used as the
/// server's own); the handshake signature is still checked against the pinned certificate.
pub fn pinned(pins: &[[u8; 32]]) -> Result<Arc<ClientConfig>, TlsSetupError> {
    if pins.is_empty() {
        return Err(TlsSetupError::NoPin);
    }
    let provider = provider();
    let verifier = PinnedCertificate {
        pins: pins.to_vec(),
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The platform's trust anchors (`/etc/ssl/certs` and friends); empty when none are found.
pub fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    roots
}

/// A config verifying the server certificate against `roots` plus the certificates in `extra_pem`.
pub fn verifying(roots: &RootCertStore, extra_pem: Option<&str>) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut roots = roots.clone();
    if let Some(pem) = extra_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsSetupError::InvalidCa(e.to_string()))?;
            roots.add(cert).map_err(|e| TlsSetupError::InvalidCa(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsSetupError::EmptyBundle);
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A config accepting any certificate (handshake signatures are still checked). Only for
/// opportunistic encryption and routes that explicitly turned verification off.
pub fn non_verifying() -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = AcceptAnyCertificate(provider.signature_verification_algorithms);
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name to present in SNI and to verify: a DNS name or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(host.trim_end_matches('.').to_owned())
        .map_err(|_| TlsSetupError::Config(format!("`{host}` is not a valid TLS server name")))
}

/// [`pinned`] with the fingerprints as hex (the compiled route's form).
pub fn pinned_hex(pins: &[String]) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let pins = pins
        .iter()
        .map(|p| {
            hex::decode(p)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| TlsSetupError::BadFingerprint(p.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    pinned(&pins)
}

#[derive(Debug)]
struct PinnedCertificate {
    pins: Vec<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = sha256_fingerprint(end_entity);
        if self.pins.contains(&fp) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate (SHA-256 {}) is not the pinned one",
                format_fingerprint(&fp)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_ca_bundle_is_validated() {
        let roots = RootCertStore::empty();
        assert_eq!(
            verifying(&roots, Some("no pem here")).err(),
            Some(TlsSetupError::EmptyBundle)
        );
        assert!(verifying(&roots, None).is_ok());
        assert!(non_verifying().is_ok());
        assert!(server_name("mx.example.com.").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("bad name").is_err());
        assert_eq!(pinned(&[]).err(), Some(TlsSetupError::NoPin));
        assert!(pinned(&[[7; 32]]).is_ok());
        assert!(pinned_hex(&["07".repeat(32)]).is_ok());
        assert_eq!(
            pinned_hex(&["07".into()]).err(),
            Some(TlsSetupError::BadFingerprint("07".into()))
        );
    }

    #[test]
    fn fingerprints_print_like_openssl() {
        // `printf abc | openssl dgst -sha256`
        let fp = sha256_fingerprint(b"abc");
        assert!(format_fingerprint(&fp).starts_with("BA:78:16:BF:8F:01:CF:EA"));
        assert_eq!(format_fingerprint(&fp).len(), 32 * 3 - 1);
    }
}
