//! The HTTPS POST to a token endpoint: one connection per request (tokens are fetched about once
//! an hour per route and user), rustls with the ring provider chosen explicitly (a workspace build
//! enables two providers, and rustls then refuses to pick one), bounded in time and size.
//! Returns the provider's answer as `grant::parse_response` reads it; logs the endpoint's host and
//! the outcome, never the path (Entra ID's holds the tenant), the form or the token.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::grant::{Grant, OAuthError, Token, TokenRequest, endpoint_name, parse_response};
use crate::secret::SecretString;

/// Largest token endpoint answer read.
const MAX_BODY: usize = 64 * 1024;

/// Fetches tokens from token endpoints over HTTPS.
#[derive(Clone)]
pub struct TokenClient {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl std::fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClient").field("timeout", &self.timeout).finish()
    }
}

impl TokenClient {
    /// A client trusting `roots` only.
    pub fn new(roots: RootCertStore) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            tls: Arc::new(tls),
            timeout: Duration::from_secs(30),
        }
    }

    /// A client trusting the system's roots (the providers' endpoints have public certificates).
    pub fn with_native_roots() -> Result<Self, OAuthError> {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(OAuthError::Key(
                "no trusted root certificates found on this system".into(),
            ));
        }
        Ok(Self::new(roots))
    }

    /// Bounds the whole request (connect, TLS, answer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Asks `grant`'s endpoint for a token; `refresh_token` replaces the grant's own (rotated).
    pub async fn fetch(&self, grant: &Grant, refresh_token: Option<&SecretString>) -> Result<Token, OAuthError> {
        let jti = uuid::Uuid::new_v4().to_string();
        let request = grant.request(unix_now(), &jti, refresh_token)?;
        let (status, body) = self.post(&request).await?;
        let result = parse_response(status, &body, unix_now());
        match &result {
            Ok(_) => tracing::debug!(endpoint = %endpoint_name(&request.url), "token fetched"),
            Err(e) => tracing::warn!(endpoint = %endpoint_name(&request.url), error = %e, "token request failed"),
        }
        result
    }

    /// POSTs the form; the HTTP status and body.
    pub async fn post(&self, request: &TokenRequest) -> Result<(u16, Vec<u8>), OAuthError> {
        let url = request.url.clone();
        let transport = |reason: String| OAuthError::Transport {
            url: url.clone(),
            reason,
        };
        match tokio::time::timeout(self.timeout, self.post_inner(request)).await {
            Ok(r) => r.map_err(transport),
            Err(_) => Err(transport(format!("no answer within {:?}", self.timeout))),
        }
    }

    async fn post_inner(&self, request: &TokenRequest) -> Result<(u16, Vec<u8>), String> {
        let uri: http::Uri = request.url.parse().map_err(|e| format!("not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err("only https token endpoints are used".into());
        }
        let host = uri.host().ok_or("the URL has no host")?.to_string();
        let port = uri.port_u16().unwrap_or(443);
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let driver = tokio::spawn(conn);
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host.as_str());
        let req = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(request.body())))
            .map_err(|e| format!("request: {e}"))?;
        let response = sender.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        driver.abort();
        Ok((status, body.to_vec()))
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
