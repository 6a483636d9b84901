//! Which DKIM private keys the relay can sign with, decided when a route is compiled: RSA keys
//! of 2048 to 4096 bits (PKCS#8 or PKCS#1 PEM) and Ed25519 keys (PKCS#8 PEM). These are the
//! keys the relay's signer (mail-auth on ring) loads; any other key would leave every message
//! of the route unsigned, so `compile` refuses the route and says why. Pure: no I/O, and the
//! reason never contains key material.

use ring::signature::{Ed25519KeyPair, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;

/// Smallest and largest RSA modulus the relay signs with, in bits (ring's limits; RFC 8301
/// asks signers for at least 1024 and receivers widely distrust less than 2048).
pub const RSA_MIN_BITS: usize = 2048;
pub const RSA_MAX_BITS: usize = 4096;

/// A usable signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimKeyKind {
    Rsa { bits: usize },
    Ed25519,
}

const WANTED: &str = "the relay signs with RSA keys of 2048 to 4096 bits or Ed25519 keys";

/// The kind of `pem` if the relay can sign with it, else the reason it cannot.
pub fn check_signing_key(pem: &str) -> Result<DkimKeyKind, String> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "the DKIM key is not a PEM private key".to_owned())?;
    match der {
        PrivateKeyDer::Pkcs8(p) => {
            let der = p.secret_pkcs8_der();
            if Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).is_ok() {
                return Ok(DkimKeyKind::Ed25519);
            }
            match pkcs8_rsa_key(der) {
                Some(rsa) => check_rsa(RsaKeyPair::from_pkcs8(der).map(|_| ()), rsa_modulus_bits(rsa)),
                None => Err(format!("the DKIM key is neither an RSA nor an Ed25519 key; {WANTED}")),
            }
        }
        PrivateKeyDer::Pkcs1(p) => {
            let der = p.secret_pkcs1_der();
            check_rsa(RsaKeyPair::from_der(der).map(|_| ()), rsa_modulus_bits(der))
        }
        _ => Err(format!("the DKIM key is an EC key; {WANTED}")),
    }
}

fn check_rsa(loaded: Result<(), ring::error::KeyRejected>, bits: Option<usize>) -> Result<DkimKeyKind, String> {
    match (loaded, bits) {
        (Ok(()), Some(bits)) => Ok(DkimKeyKind::Rsa { bits }),
        (_, Some(bits)) if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) => {
            Err(format!("the DKIM key is a {bits}-bit RSA key; {WANTED}"))
        }
        (Err(e), _) => Err(format!(
            "the DKIM key is an RSA key the relay cannot sign with ({e}); {WANTED}"
        )),
        (Ok(()), None) => Err("the DKIM key is not a well-formed RSA key".to_owned()),
    }
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        (bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
/// 1.2.840.113549.1.1.1 (rsaEncryption).
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// The PKCS#1 key inside a PKCS#8 document whose algorithm is rsaEncryption.
fn pkcs8_rsa_key(pkcs8: &[u8]) -> Option<&[u8]> {
    let (SEQUENCE, body, _) = der(pkcs8)? else { return None };
    let (INTEGER, _, rest) = der(body)? else { return None };
    let (SEQUENCE, alg, rest) = der(rest)? else { return None };
    let (OID, oid, _) = der(alg)? else { return None };
    let (OCTET_STRING, key, _) = der(rest)? else {
        return None;
    };
    (oid == RSA_ENCRYPTION).then_some(key)
}

/// The modulus length in bits of a PKCS#1 RSAPrivateKey.
fn rsa_modulus_bits(pkcs1: &[u8]) -> Option<usize> {
    let (SEQUENCE, body, _) = der(pkcs1)? else { return None };
    let (INTEGER, _, rest) = der(body)? else { return None };
    let (INTEGER, n, _) = der(rest)? else { return None };
    let pos = n.iter().position(|b| *b != 0)?;
    let n = &n[pos..];
    Some(n.len() * 8 - n[0].leading_zeros() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKqI1cA4MPeCfi0VBYZ2cZ0gC0dK2ajbFxVGAiHKXqmc\n-----END PRIVATE KEY-----\n";
    const RSA_1024: &str = include_str!("../../testkit/keys/dkim-rsa-1024.pem");
    const RSA_2048: &str = include_str!("../../testkit/keys/dkim-rsa-2048.pem");
    const RSA_4096: &str = include_str!("../../testkit/keys/dkim-rsa-4096.pem");

    #[test]
    fn keys_the_relay_signs_with() {
        assert_eq!(check_signing_key(ED25519), Ok(DkimKeyKind::Ed25519));
        assert_eq!(check_signing_key(RSA_2048), Ok(DkimKeyKind::Rsa { bits: 2048 }));
        assert_eq!(check_signing_key(RSA_4096), Ok(DkimKeyKind::Rsa { bits: 4096 }));
    }

    #[test]
    fn keys_it_does_not_sign_with_are_refused_with_the_reason() {
        let err = check_signing_key(RSA_1024).expect_err("1024 bits");
        assert_eq!(
            err,
            "the DKIM key is a 1024-bit RSA key; the relay signs with RSA keys of 2048 to 4096 bits or Ed25519 keys"
        );
        let ec = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBYr\n-----END EC PRIVATE KEY-----\n";
        assert!(check_signing_key(ec).expect_err("SEC1").contains("EC key"), "{ec}");
        assert_eq!(
            check_signing_key("not a key"),
            Err("the DKIM key is not a PEM private key".to_owned())
        );
        // A PKCS#8 key of another algorithm (P-256), and garbage inside a PEM frame.
        let p256 = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgMwWyWLuHFA5KaSzv\n4pNFOSG5M6Yn6F9o/W7c3d67NqOhRANCAAQgsXa7hQSDiCdvbPwdsYBNJdORZyHQ\nmRNvDDkhJKUl40PV4hUakiZJ45MHA4bgKdcLJ4/VyTc9HibUk3RgW2FA\n-----END PRIVATE KEY-----\n";
        assert!(
            check_signing_key(p256)
                .expect_err("P-256")
                .contains("neither an RSA nor an Ed25519 key")
        );
        let junk = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(check_signing_key(junk).is_err());
        // The reason never quotes the key.
        assert!(!err.contains("MII"));
    }

    #[test]
    fn modulus_bits_of_every_test_key() {
        for (pem, bits) in [(RSA_1024, 1024), (RSA_2048, 2048), (RSA_4096, 4096)] {
            let Ok(PrivateKeyDer::Pkcs8(p)) = PrivateKeyDer::from_pem_slice(pem.as_bytes()) else {
                panic!("PKCS#8 test key")
            };
            let rsa = pkcs8_rsa_key(p.secret_pkcs8_der()).expect("RSA");
            assert_eq!(rsa_modulus_bits(rsa), Some(bits));
        }
    }
}
