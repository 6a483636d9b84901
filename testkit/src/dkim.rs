//! DKIM checks for tests: verifies a signed message against a public-key record held in a
//! pre-filled TXT cache (no DNS), and writes the record for an Ed25519 key. It signs nothing.
//!
//! Also: test keys of every size with their TXT records ([`TestKey`]), and verification by
//! verifiers written by others than mail-auth ([`Verifier::Dkimpy`], [`Verifier::OpenDkim`]),
//! run through `dkim_verify.py` with the records given to them directly (no DNS). A missing
//! verifier panics with how to install it (scripts/test.sh does): a test must not pass because
//! a verifier could not run.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::process::{Command, Stdio};
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

/// A DKIM private key made for tests (testkit/keys/) and its TXT record.
#[derive(Debug, Clone, Copy)]
pub struct TestKey {
    /// `rsa-2048`, `ed25519`, …
    pub label: &'static str,
    /// PKCS#8 PEM.
    pub pem: &'static str,
    /// `v=DKIM1; k=…; p=…`
    pub record: &'static str,
}

pub const RSA_1024: TestKey = TestKey {
    label: "rsa-1024",
    pem: include_str!("../keys/dkim-rsa-1024.pem"),
    record: include_str!("../keys/dkim-rsa-1024.txt"),
};
pub const RSA_2048: TestKey = TestKey {
    label: "rsa-2048",
    pem: include_str!("../keys/dkim-rsa-2048.pem"),
    record: include_str!("../keys/dkim-rsa-2048.txt"),
};
pub const RSA_3072: TestKey = TestKey {
    label: "rsa-3072",
    pem: include_str!("../keys/dkim-rsa-3072.pem"),
    record: include_str!("../keys/dkim-rsa-3072.txt"),
};
pub const RSA_4096: TestKey = TestKey {
    label: "rsa-4096",
    pem: include_str!("../keys/dkim-rsa-4096.pem"),
    record: include_str!("../keys/dkim-rsa-4096.txt"),
};
pub const ED25519: TestKey = TestKey {
    label: "ed25519",
    pem: include_str!("../keys/dkim-ed25519.pem"),
    record: include_str!("../keys/dkim-ed25519.txt"),
};

/// A DKIM verifier that is not mail-auth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verifier {
    /// dkimpy (PyPI `dkimpy`, with PyNaCl for Ed25519), the library of many Python filters.
    Dkimpy,
    /// OpenDKIM's libopendkim (Debian `opendkim-tools` / `libopendkim11`), the library of the
    /// opendkim milter.
    OpenDkim,
}

/// The dkimpy version scripts/test.sh installs.
pub const DKIMPY_VERSION: &str = "1.1.8";

impl Verifier {
    pub const ALL: [Verifier; 2] = [Verifier::Dkimpy, Verifier::OpenDkim];

    pub fn name(self) -> &'static str {
        match self {
            Verifier::Dkimpy => "dkimpy",
            Verifier::OpenDkim => "opendkim",
        }
    }

    /// Panics, saying how to install it, when the verifier cannot run here.
    pub fn require(self) {
        let (probe, install) = match self {
            Verifier::Dkimpy => (
                "import dkim, nacl",
                format!("python3 -m pip install 'dkimpy[ed25519]=={DKIMPY_VERSION}'"),
            ),
            Verifier::OpenDkim => (
                "import ctypes; ctypes.CDLL('libopendkim.so.11')",
                "apt-get install opendkim-tools".to_owned(),
            ),
        };
        let ok = Command::new("python3")
            .args(["-c", probe])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "DKIM verifier {} is missing (python3 -c {probe:?} failed): install it with `{install}` \
             (scripts/test.sh does)",
            self.name()
        );
    }

    /// Verifies each of `messages`, with the TXT `records` (`(name, record)`, e.g.
    /// `("s1._domainkey.example.com", "v=DKIM1; k=rsa; p=…")`) standing in for DNS: `Ok` for a
    /// signature found good, else the verifier's reason. One process for all the messages.
    pub fn verify(self, messages: &[Vec<u8>], records: &[(&str, &str)]) -> Vec<Result<(), String>> {
        self.require();
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("dkim_verify.py");
        std::fs::write(&script, include_str!("dkim_verify.py")).expect("write script");
        for (i, m) in messages.iter().enumerate() {
            std::fs::write(dir.path().join(format!("{i:05}.eml")), m).expect("write message");
        }
        let records: HashMap<&str, &str> = records.iter().map(|(k, v)| (*k, v.trim())).collect();
        let json = serde_json::to_string(&records).expect("records as JSON");
        std::fs::write(dir.path().join("records.json"), json).expect("write records");
        let out = Command::new("python3")
            .arg(&script)
            .arg(self.name())
            .arg(dir.path())
            .output()
            .expect("run python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert!(
            out.status.success() && lines.len() == messages.len(),
            "{} did not verify the {} messages (exit {:?}): {}{}",
            self.name(),
            messages.len(),
            out.status.code(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a JSON result line");
                match (v["ok"].as_bool(), v["detail"].as_str()) {
                    (Some(true), _) => Ok(()),
                    (_, detail) => Err(detail.unwrap_or(l).to_owned()),
                }
            })
            .collect()
    }
}
