//! DKIM checks for tests: verifies a signed message against a public-key record held in a
//! pre-filled TXT cache (no DNS), and writes the record for an Ed25519 key. It signs nothing.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::parse::TxtRecordParser as _;
use mail_auth::common::verify::DomainKey;
use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;

struct TxtCache(Mutex<HashMap<Box<str>, Txt>>);

impl ResolverCache<Box<str>, Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().expect("lock").get(name).cloned()
    }
    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().expect("lock").remove(name)
    }
    fn insert(&self, key: Box<str>, value: Txt, _valid_until: Instant) {
        self.0.lock().expect("lock").insert(key, value);
    }
}

/// The DKIM results for `message`, with `record` (`v=DKIM1; k=…; p=…`) published at `txt_name`
/// (e.g. `mailroute._domainkey.example.com.`). Panics on a record or message that does not parse.
pub async fn verify(message: &[u8], txt_name: &str, record: &str) -> Vec<DkimResult> {
    let key = DomainKey::parse(record.as_bytes()).expect("DKIM key record parses");
    let cache = TxtCache(Mutex::new(HashMap::new()));
    cache.insert(
        txt_name.into(),
        Txt::from(key),
        Instant::now() + Duration::from_secs(3600),
    );
    // No name servers: every lookup must be answered by the cache.
    let authenticator = MessageAuthenticator::new(
        ResolverConfig::from_parts(None, vec![], vec![]),
        ResolverOpts::default(),
    )
    .expect("authenticator");
    let parsed = AuthenticatedMessage::parse(message).expect("message parses");
    authenticator
        .verify_dkim(Parameters::new(&parsed).with_txt_cache(&cache))
        .await
        .iter()
        .map(|o| o.result().clone())
        .collect()
}

/// The DKIM TXT record (`v=DKIM1; k=ed25519; p=…`) for an Ed25519 PKCS#8 private key in PEM.
pub fn ed25519_record(pkcs8_pem: &str) -> String {
    let der = PrivateKeyDer::from_pem_slice(pkcs8_pem.as_bytes()).expect("PEM");
    let PrivateKeyDer::Pkcs8(p) = der else {
        panic!("not a PKCS#8 key")
    };
    let public = Ed25519Key::from_pkcs8_maybe_unchecked_der(p.secret_pkcs8_der())
        .expect("Ed25519 key")
        .public_key();
    format!(
        "v=DKIM1; k=ed25519; p={}",
        base64::engine::general_purpose::STANDARD.encode(public)
    )
}
