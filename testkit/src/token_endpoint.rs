//! An OAuth2 token endpoint over real HTTPS on 127.0.0.1 (rcgen certificate), answering the way
//! Entra ID and Google do: it checks the grant, the client secret or the client assertion's
//! signature, the scope and the refresh token; issues short-lived tokens; can rotate refresh
//! tokens; answers errors in the providers' words; counts requests. It remembers the tokens it
//! issued, so an SMTP upstream ([`crate::Script::xoauth2`]) can accept only a currently valid one
//! ([`Endpoint::token_check`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mailroute_oauth::jwt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::TestPki;
use crate::smtp::TokenCheck;

pub const AADSTS7000215: &str = "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app 'app-1'.";
pub const AADSTS700027: &str =
    "AADSTS700027: The certificate with identifier used to sign the client assertion is not registered on application.";

/// What the endpoint accepts and how it answers.
pub struct Settings {
    pub client_id: String,
    pub client_secret: String,
    /// Verifies client and service-account assertions (DER `RSAPublicKey`).
    pub public_key: Vec<u8>,
    pub refresh_token: String,
    pub rotate: bool,
    pub expires_in: u64,
    /// How long each answer takes (a provider is not instantaneous).
    pub latency: Duration,
    /// Issued access tokens are `<token_prefix><n>`, rotated refresh tokens `<refresh_prefix><n>`.
    pub token_prefix: String,
    pub refresh_prefix: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            client_id: "app-1".into(),
            client_secret: "right-secret".into(),
            public_key: Vec::new(),
            refresh_token: "rt-0".into(),
            rotate: false,
            expires_in: 3599,
            latency: Duration::ZERO,
            token_prefix: "at-".into(),
            refresh_prefix: "rt-".into(),
        }
    }
}

/// Issued access tokens and when they expire (Unix seconds).
type Issued = Arc<Mutex<HashMap<String, u64>>>;

pub struct Endpoint {
    pub port: u16,
    pub pki: TestPki,
    requests: Arc<AtomicUsize>,
    pub settings: Arc<Mutex<Settings>>,
    /// The refresh tokens presented, in order.
    pub presented: Arc<Mutex<Vec<String>>>,
    issued: Issued,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Endpoint {
    pub async fn start(settings: Settings) -> Self {
        let pki = TestPki::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let requests = Arc::new(AtomicUsize::new(0));
        let settings = Arc::new(Mutex::new(settings));
        let presented = Arc::new(Mutex::new(Vec::new()));
        let issued: Issued = Arc::default();
        let (r, s, p, i) = (requests.clone(), settings.clone(), presented.clone(), issued.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, r, s, p, i) = (acceptor.clone(), r.clone(), s.clone(), p.clone(), i.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Some(form) = read_form(&mut tls).await else { return };
                    let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                    let latency = lock(&s).latency;
                    tokio::time::sleep(latency).await;
                    let (status, body) = answer(&form, n, port, &s, &p, &i);
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(body.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self {
            port,
            pki,
            requests,
            settings,
            presented,
            issued,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/tenant-1/oauth2/v2.0/token", self.port)
    }

    /// Token requests answered so far (successful or not).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Whether `token` was issued here and has not expired or been revoked.
    pub fn is_valid(&self, token: &str) -> bool {
        valid(&self.issued, token)
    }

    /// The provider revokes `token` before it expires (an upstream then answers it with 535).
    pub fn revoke(&self, token: &str) {
        lock(&self.issued).remove(token);
    }

    /// For [`crate::Script::xoauth2`]: accepts exactly the tokens valid here now, for any user.
    pub fn token_check(&self) -> TokenCheck {
        let issued = self.issued.clone();
        TokenCheck::new(move |_user, token| valid(&issued, token))
    }
}

fn valid(issued: &Issued, token: &str) -> bool {
    lock(issued).get(token).is_some_and(|&exp| exp > unix_now())
}

async fn read_form(tls: &mut (impl AsyncReadExt + Unpin)) -> Option<BTreeMap<String, String>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tls.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        assert!(head.starts_with("post /tenant-1/oauth2/v2.0/token http/1.1"), "{head}");
        assert!(
            head.contains("content-type: application/x-www-form-urlencoded"),
            "{head}"
        );
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())?;
        if buf.len() >= end + 4 + len {
            let body = &buf[end + 4..end + 4 + len];
            return Some(form_urlencoded::parse(body).into_owned().collect());
        }
    }
}

fn error(status: u16, error: &str, description: &str) -> (u16, String) {
    let body = serde_json::json!({"error": error, "error_description": description, "error_codes": [1]});
    (status, body.to_string())
}

fn answer(
    form: &BTreeMap<String, String>,
    n: usize,
    port: u16,
    settings: &Mutex<Settings>,
    presented: &Mutex<Vec<String>>,
    issued: &Issued,
) -> (u16, String) {
    let mut s = lock(settings);
    let get = |k: &str| form.get(k).map(String::as_str);
    let url = format!("https://127.0.0.1:{port}/tenant-1/oauth2/v2.0/token");
    let mut refresh = None;
    match get("grant_type") {
        Some("client_credentials") => {
            if get("client_id") != Some(s.client_id.as_str()) {
                return error(400, "unauthorized_client", "AADSTS700016: Application not found.");
            }
            if get("scope") != Some(mailroute_oauth::OFFICE365_SCOPE) {
                return error(
                    400,
                    "invalid_scope",
                    "AADSTS70011: The provided value for scope is not valid.",
                );
            }
            match (get("client_secret"), get("client_assertion")) {
                (Some(secret), None) if secret == s.client_secret => {}
                (Some(_), None) => return error(401, "invalid_client", AADSTS7000215),
                (None, Some(assertion)) => {
                    let ok = get("client_assertion_type")
                        == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                        && jwt::verify(assertion, &s.public_key).is_ok_and(|(h, c)| {
                            h.get("x5t#S256").is_some()
                                && c["aud"] == url.as_str()
                                && c["iss"] == s.client_id.as_str()
                                && c["sub"] == s.client_id.as_str()
                        });
                    if !ok {
                        return error(401, "invalid_client", AADSTS700027);
                    }
                }
                _ => {
                    return error(
                        400,
                        "invalid_request",
                        "AADSTS900144: The request body must contain client_secret or client_assertion.",
                    );
                }
            }
        }
        Some("refresh_token") => {
            let token = get("refresh_token").unwrap_or_default().to_string();
            lock(presented).push(token.clone());
            if token != s.refresh_token {
                return error(400, "invalid_grant", "Bad Request");
            }
            if s.rotate {
                s.refresh_token = format!("{}{n}", s.refresh_prefix);
                refresh = Some(s.refresh_token.clone());
            }
        }
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            let ok = jwt::verify(get("assertion").unwrap_or_default(), &s.public_key).is_ok_and(|(_, c)| {
                c["scope"] == mailroute_oauth::GMAIL_SCOPE && c["aud"] == url.as_str() && c["sub"].is_string()
            });
            if !ok {
                return error(400, "invalid_grant", "Invalid JWT Signature.");
            }
        }
        _ => return error(400, "unsupported_grant_type", "unsupported grant"),
    }
    let token = format!("{}{n}", s.token_prefix);
    lock(issued).insert(token.clone(), unix_now() + s.expires_in);
    let mut body = serde_json::json!({"token_type": "Bearer", "expires_in": s.expires_in, "access_token": token});
    if let Some(r) = refresh {
        body["refresh_token"] = r.into();
    }
    (200, body.to_string())
}
