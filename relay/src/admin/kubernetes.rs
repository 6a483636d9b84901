//! The admin API's Kubernetes client: TokenReview (who presents this bearer token) and
//! SubjectAccessReview (may they do this, see [`super::access`]) against the API server, with
//! their answers cached briefly so a polling dashboard does not hammer the API server.
//!
//! It reaches the API server as a pod does (in-cluster: `KUBERNETES_SERVICE_HOST`/`_PORT`, the
//! ServiceAccount's token and CA files, the token re-read for each call since the kubelet
//! rotates it), or at an address, token file and CA file given by flags. HTTPS only, one short
//! HTTP/1.1 connection per call (calls are rare thanks to the cache).
//!
//! It owns the HTTP calls and the caches. It never logs a token or keys anything by one: the
//! caches are keyed by the token's SHA-256, and a TokenReview answer (which echoes the token)
//! is never logged. It must not decide what an endpoint needs (that is [`super::access`]).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{self, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::access::{GROUP, Permission};

/// Where an in-cluster pod finds its ServiceAccount token and the cluster's CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Bound on one call to the API server (connect, TLS, request, answer).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries per cache; a full cache drops its expired entries, then everything.
const CACHE_CAPACITY: usize = 4096;
/// Largest answer read from the API server.
const MAX_ANSWER: usize = 1 << 20;

/// How to reach the API server and how long answers are kept.
#[derive(Clone, Debug, PartialEq)]
pub struct KubernetesAuthConfig {
    /// `https://host:port` of the API server.
    pub api_server: String,
    /// The relay's own token (to call TokenReview and SubjectAccessReview), re-read per call.
    pub token_file: PathBuf,
    /// PEM of the CA that signs the API server's certificate.
    pub ca_file: PathBuf,
    /// How long an authenticated token and an allowed permission are kept.
    pub allow_ttl: Duration,
    /// How long a refused token and a denied permission are kept.
    pub deny_ttl: Duration,
}

impl KubernetesAuthConfig {
    pub const DEFAULT_ALLOW_TTL: Duration = Duration::from_secs(20);
    pub const DEFAULT_DENY_TTL: Duration = Duration::from_secs(10);

    /// The in-cluster configuration, each part replaceable (`None`: the pod's own).
    pub fn in_cluster(
        api_server: Option<String>,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
    ) -> Result<Self, KubeAuthError> {
        let api_server = match api_server.filter(|s| !s.is_empty()) {
            Some(s) => s,
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    KubeAuthError::Config(
                        "KUBERNETES_SERVICE_HOST is not set (not in a pod?): give the API server's address".into(),
                    )
                })?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                let host = if host.contains(':') { format!("[{host}]") } else { host };
                format!("https://{host}:{port}")
            }
        };
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        Ok(KubernetesAuthConfig {
            api_server,
            token_file: token_file.unwrap_or_else(|| dir.join("token")),
            ca_file: ca_file.unwrap_or_else(|| dir.join("ca.crt")),
            allow_ttl: Self::DEFAULT_ALLOW_TTL,
            deny_ttl: Self::DEFAULT_DENY_TTL,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeAuthError {
    #[error("Kubernetes authentication: {0}")]
    Config(String),
    #[error("calling the Kubernetes API server: {0}")]
    Call(String),
    #[error("the Kubernetes API server answered {status}: {message}")]
    Status { status: u16, message: String },
}

/// Who a Kubernetes token belongs to (TokenReview's `status.user`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// An authenticated caller: its user and the digest of its token (the cache key).
#[derive(Clone, Debug)]
pub struct Caller {
    key: [u8; 32],
    pub user: Arc<UserInfo>,
}

/// The client (see the module doc). Cheap to share behind an `Arc`.
pub struct KubernetesAuth {
    cfg: KubernetesAuthConfig,
    authority: String,
    host: String,
    port: u16,
    server_name: rustls::pki_types::ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    reviews: TtlCache<[u8; 32], Option<Arc<UserInfo>>>,
    decisions: TtlCache<([u8; 32], Permission), bool>,
}

impl KubernetesAuth {
    /// Reads the CA file and checks the address; the token file is read at each call.
    pub fn new(cfg: KubernetesAuthConfig) -> Result<Self, KubeAuthError> {
        let uri: Uri = cfg
            .api_server
            .parse()
            .map_err(|e| KubeAuthError::Config(format!("API server address {:?}: {e}", cfg.api_server)))?;
        if uri.scheme_str() != Some("https") {
            return Err(KubeAuthError::Config(format!(
                "API server address {:?} must be https://host:port",
                cfg.api_server
            )));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| KubeAuthError::Config(format!("API server address {:?} names no host", cfg.api_server)))?
            .clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(443);
        let server_name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| KubeAuthError::Config(format!("API server host {host:?}: {e}")))?;
        let pem = std::fs::read(&cfg.ca_file)
            .map_err(|e| KubeAuthError::Config(format!("reading CA file {}: {e}", cfg.ca_file.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| KubeAuthError::Config(format!("CA file {}: {e}", cfg.ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| KubeAuthError::Config(format!("CA file {}: {e}", cfg.ca_file.display())))?;
        }
        if roots.is_empty() {
            return Err(KubeAuthError::Config(format!(
                "CA file {} holds no certificate",
                cfg.ca_file.display()
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeAuthError::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(KubernetesAuth {
            authority: authority.to_string(),
            host,
            port,
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            reviews: TtlCache::new(CACHE_CAPACITY),
            decisions: TtlCache::new(CACHE_CAPACITY),
            cfg,
        })
    }

    /// TokenReview: `Some` caller when the API server authenticates `token`, `None` when it
    /// does not (both cached), an error when it could not be asked (not cached).
    pub async fn authenticate(&self, token: &str) -> Result<Option<Caller>, KubeAuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let user = match self.reviews.get(&key) {
            Some(user) => user,
            None => {
                let body = json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": token},
                });
                let answer: ReviewAnswer<TokenReviewStatus> =
                    self.post("/apis/authentication.k8s.io/v1/tokenreviews", &body).await?;
                let user = answer
                    .status
                    .filter(|s| s.authenticated)
                    .map(|s| Arc::new(s.user.unwrap_or_default()));
                let ttl = if user.is_some() {
                    self.cfg.allow_ttl
                } else {
                    self.cfg.deny_ttl
                };
                self.reviews.insert(key, user.clone(), ttl);
                user
            }
        };
        Ok(user.map(|user| Caller { key, user }))
    }

    /// SubjectAccessReview: whether `caller` holds `permission` (cached either way).
    pub async fn authorize(&self, caller: &Caller, permission: &Permission) -> Result<bool, KubeAuthError> {
        let key = (caller.key, permission.clone());
        if let Some(allowed) = self.decisions.get(&key) {
            return Ok(allowed);
        }
        let u = &caller.user;
        let body = json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": u.username,
                "uid": u.uid,
                "groups": u.groups,
                "extra": u.extra,
                "resourceAttributes": {
                    "group": GROUP,
                    "resource": permission.resource,
                    "verb": permission.verb,
                    "namespace": permission.namespace,
                },
            },
        });
        let answer: ReviewAnswer<AccessReviewStatus> = self
            .post("/apis/authorization.k8s.io/v1/subjectaccessreviews", &body)
            .await?;
        let allowed = answer.status.is_some_and(|s| s.allowed && !s.denied);
        let ttl = if allowed { self.cfg.allow_ttl } else { self.cfg.deny_ttl };
        self.decisions.insert(key, allowed, ttl);
        Ok(allowed)
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, KubeAuthError> {
        let call = async {
            let token = tokio::fs::read_to_string(&self.cfg.token_file).await.map_err(|e| {
                KubeAuthError::Config(format!("reading token file {}: {e}", self.cfg.token_file.display()))
            })?;
            let call_err = |e: &dyn std::fmt::Display| KubeAuthError::Call(e.to_string());
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| call_err(&e))?;
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| call_err(&e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| call_err(&e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = http::Request::post(path)
                .header(header::HOST, &self.authority)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ACCEPT, "application/json")
                .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| call_err(&e))?;
            let resp = sender.send_request(req).await.map_err(|e| call_err(&e))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| call_err(&e))?
                .to_bytes();
            if !status.is_success() {
                // A Status object: its message names the problem (never the reviewed token).
                let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_string))
                    .unwrap_or_default();
                return Err(KubeAuthError::Status {
                    status: status.as_u16(),
                    message,
                });
            }
            serde_json::from_slice(&bytes).map_err(|e| KubeAuthError::Call(format!("unreadable answer: {e}")))
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| KubeAuthError::Call(format!("no answer within {CALL_TIMEOUT:?}")))?
    }
}

#[derive(Deserialize)]
struct ReviewAnswer<S> {
    status: Option<S>,
}

#[derive(Deserialize)]
struct TokenReviewStatus {
    #[serde(default)]
    authenticated: bool,
    user: Option<UserInfo>,
}

#[derive(Deserialize)]
struct AccessReviewStatus {
    #[serde(default)]
    allowed: bool,
    #[serde(default)]
    denied: bool,
}

/// A bounded map whose entries expire.
struct TtlCache<K, V> {
    map: Mutex<HashMap<K, (Instant, V)>>,
    capacity: usize,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    fn new(capacity: usize) -> Self {
        TtlCache {
            map: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(expires, _)| Instant::now() < *expires)
            .map(|(_, v)| v.clone())
    }

    fn insert(&self, key: K, value: V, ttl: Duration) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity {
            map.retain(|_, (expires, _)| now < *expires);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(key, (now + ttl, value));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_entries_expire_and_the_cache_stays_bounded() {
        let c = TtlCache::new(3);
        c.insert(1, "a", Duration::from_secs(60));
        c.insert(2, "b", Duration::ZERO);
        assert_eq!(c.get(&1), Some("a"));
        assert_eq!(c.get(&2), None, "expired");
        c.insert(3, "c", Duration::from_secs(60));
        // Full: the expired entry goes first.
        c.insert(4, "d", Duration::from_secs(60));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&1), Some("a"));
        // Full of live entries: it starts over rather than grow.
        c.insert(5, "e", Duration::from_secs(60));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(&5), Some("e"));
    }

    #[test]
    fn in_cluster_defaults_and_bad_addresses() {
        let cfg = KubernetesAuthConfig::in_cluster(Some("https://10.96.0.1:443".into()), None, None).unwrap();
        assert_eq!(cfg.token_file, Path::new(SERVICE_ACCOUNT_DIR).join("token"));
        assert_eq!(cfg.ca_file, Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt"));
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "not a certificate").unwrap();
        for (server, needle) in [
            ("http://127.0.0.1:6443", "must be https"),
            ("https://127.0.0.1:6443", "holds no certificate"),
        ] {
            let cfg = KubernetesAuthConfig {
                api_server: server.into(),
                ca_file: ca.clone(),
                ..cfg.clone()
            };
            let err = KubernetesAuth::new(cfg).err().unwrap().to_string();
            assert!(err.contains(needle), "{server}: {err}");
        }
    }
}
