//! A token endpoint over real HTTPS on 127.0.0.1 (rcgen certificate from testkit), in the way
//! Entra ID and Google answer: it checks the grant, the client secret or the client assertion's
//! signature, the scope and the refresh token; issues tokens; can rotate refresh tokens; answers
//! errors in the providers' words; counts requests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailroute_oauth::jwt;
use mailroute_testkit::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const AADSTS7000215: &str = "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app 'app-1'.";
pub const AADSTS700027: &str =
    "AADSTS700027: The certificate with identifier used to sign the client assertion is not registered on application.";

/// What the endpoint accepts and how it answers.
pub struct Settings {
    pub client_id: String,
    pub client_secret: String,
    /// Verifies client and service-account assertions.
    pub public_key: Vec<u8>,
    pub refresh_token: String,
    pub rotate: bool,
    pub expires_in: u64,
    /// How long each answer takes (a provider is not instantaneous).
    pub latency: Duration,
}

pub struct Endpoint {
    pub port: u16,
    pub pki: TestPki,
    requests: Arc<AtomicUsize>,
    pub settings: Arc<Mutex<Settings>>,
    /// The refresh tokens presented, in order.
    pub presented: Arc<Mutex<Vec<String>>>,
}

impl Endpoint {
    pub async fn start(settings: Settings) -> Self {
        let pki = TestPki::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let requests = Arc::new(AtomicUsize::new(0));
        let settings = Arc::new(Mutex::new(settings));
        let presented = Arc::new(Mutex::new(Vec::new()));
        let (r, s, p) = (requests.clone(), settings.clone(), presented.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, r, s, p) = (acceptor.clone(), r.clone(), s.clone(), p.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Some(form) = read_form(&mut tls).await else { return };
                    let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                    let latency = s.lock().unwrap().latency;
                    tokio::time::sleep(latency).await;
                    let (status, body) = answer(&form, n, port, &s, &p);
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
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/tenant-1/oauth2/v2.0/token", self.port)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
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
) -> (u16, String) {
    let mut s = settings.lock().unwrap();
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
            presented.lock().unwrap().push(token.clone());
            if token != s.refresh_token {
                return error(400, "invalid_grant", "Bad Request");
            }
            if s.rotate {
                s.refresh_token = format!("rt-{n}");
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
    let mut body =
        serde_json::json!({"token_type": "Bearer", "expires_in": s.expires_in, "access_token": format!("at-{n}")});
    if let Some(r) = refresh {
        body["refresh_token"] = r.into();
    }
    (200, body.to_string())
}
