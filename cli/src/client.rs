//! The admin API over HTTP: one client with the base URL, the bearer token and a timeout per
//! call, reaching the relays either directly (`--admin-url`) or through the Kubernetes API
//! server's service proxy (`/api/v1/namespaces/<ns>/services/http:<svc>:<port>/proxy/...`,
//! authenticated by the kubeconfig). It owns turning HTTP answers into values or typed errors,
//! with the server's own error text (the relay's, or the API server's when it could not proxy);
//! it must not print anything (the caller does) and never puts the token in an error.
//!
//! Through the proxy the token travels in `X-Mailroute-Token`: the API server removes
//! `Authorization` once it has authenticated the caller (k8s.io/apiserver
//! `filters/authentication.go`) and forwards the other headers to the Service.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("admin URL {0:?}: {1}")]
    BadUrl(String, String),
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("the admin API answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from the admin API: {0}")]
    Unexpected(String),
    #[error("the Kubernetes API server answered {status} for the relays' admin Service {service}: {message}")]
    Proxy {
        service: String,
        status: u16,
        message: String,
    },
}

/// The header the token travels in through the service proxy (the relay's
/// `admin::TOKEN_HEADER`).
pub const TOKEN_HEADER: &str = "x-mailroute-token";

/// The relays' admin Service as the service proxy names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// Port name or number.
    pub port: String,
}

impl ServiceRef {
    /// The API server path of the proxy to this Service (plain HTTP to the pods).
    pub fn proxy_path(&self) -> String {
        format!(
            "/api/v1/namespaces/{}/services/http:{}:{}/proxy",
            self.namespace, self.name, self.port
        )
    }
}

enum Transport {
    Direct,
    ServiceProxy { kube: kube::Client, service: ServiceRef },
}

pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    transport: Transport,
    timeout: Duration,
}

/// The host of the URLs built in service-proxy mode: only their path and query are sent, to
/// the API server the kubeconfig names.
const PROXY_BASE: &str = "http://service-proxy.invalid";

impl AdminClient {
    pub fn new(base: &str, token: Option<String>, timeout: Duration) -> Result<Self, ClientError> {
        let url = reqwest::Url::parse(base).map_err(|e| ClientError::BadUrl(base.to_string(), e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ClientError::BadUrl(
                base.to_string(),
                "not an http(s) URL with a host".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| ClientError::BadUrl(base.to_string(), e.to_string()))?;
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http,
            transport: Transport::Direct,
            timeout,
        })
    }

    /// A client reaching `service` through the API server `kube` talks to, with `token` (if
    /// any) in [`TOKEN_HEADER`].
    pub fn through_service_proxy(
        kube: kube::Client,
        service: ServiceRef,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let base = format!("{PROXY_BASE}{}", service.proxy_path());
        let mut client = Self::new(&base, token, timeout)?;
        client.transport = Transport::ServiceProxy { kube, service };
        Ok(client)
    }

    /// Where the calls go, for messages.
    pub fn describe(&self) -> String {
        match &self.transport {
            Transport::Direct => self.base.clone(),
            Transport::ServiceProxy { service, .. } => format!(
                "Service {}/{} port {} (through the Kubernetes API server)",
                service.namespace, service.name, service.port
            ),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        if let Transport::ServiceProxy { kube, service } = &self.transport {
            let req = req.build().map_err(|e| ClientError::Unexpected(e.to_string()))?;
            return self.through_proxy(kube, service, req).await;
        }
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: if e.is_timeout() {
                "timed out".into()
            } else {
                root_cause(&e)
            },
        })
    }

    /// A JSON answer; 404 is [`ClientError::NotFound`] with the server's words.
    pub async fn get_json(&self, path: &str, query: &[(String, String)]) -> Result<Value, ClientError> {
        let resp = self.send(self.http.get(self.url(path)).query(query)).await?;
        json_of(resp).await
    }

    /// A POST with query parameters and no body (the queue actions).
    pub async fn post_json(&self, path: &str, query: &[(String, String)]) -> Result<Value, ClientError> {
        let resp = self.send(self.http.post(self.url(path)).query(query)).await?;
        json_of(resp).await
    }

    pub async fn delete_json(&self, path: &str) -> Result<Value, ClientError> {
        let resp = self.send(self.http.delete(self.url(path))).await?;
        json_of(resp).await
    }

    /// A request with a query and an optional body (content type, bytes); JSON answer.
    pub async fn request_json(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(String, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Value, ClientError> {
        let mut req = self.http.request(method, self.url(path)).query(query);
        if let Some((content_type, bytes)) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, content_type).body(bytes);
        }
        json_of(self.send(req).await?).await
    }

    /// A text answer (CSV) to a GET with a query; 404 is [`ClientError::NotFound`].
    pub async fn get_text_query(&self, path: &str, query: &[(String, String)]) -> Result<String, ClientError> {
        let resp = self.send(self.http.get(self.url(path)).query(query)).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(json_of(resp)
                .await
                .err()
                .unwrap_or(ClientError::Unexpected(format!("status {status}"))));
        }
        resp.text().await.map_err(|e| ClientError::Unexpected(e.to_string()))
    }

    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| ClientError::Unexpected(e.to_string()))?;
        if !status.is_success() {
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message: body.trim().to_string(),
            });
        }
        Ok(body)
    }

    /// `/readyz`: `Ok` when ready, else the relay's reason.
    pub async fn readiness(&self) -> Result<Result<(), String>, ClientError> {
        let resp = self.send(self.http.get(self.url("/readyz"))).await?;
        let ready = resp.status().is_success();
        let body = resp.text().await.unwrap_or_default().trim().to_string();
        Ok(if ready { Ok(()) } else { Err(body) })
    }

    /// Sends `req`'s method, path, query, headers and body to the API server's proxy; an answer
    /// of the API server itself (a `Status`: no such Service, no endpoints, forbidden) is a
    /// [`ClientError::Proxy`], the relay's answer is returned as is.
    async fn through_proxy(
        &self,
        kube: &kube::Client,
        service: &ServiceRef,
        req: reqwest::Request,
    ) -> Result<reqwest::Response, ClientError> {
        let url = req.url();
        let path_and_query = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let mut builder = http::Request::builder()
            .method(req.method().clone())
            .uri(path_and_query);
        for (name, value) in req.headers() {
            builder = builder.header(name, value);
        }
        if let Some(t) = &self.token {
            builder = builder.header(TOKEN_HEADER, t);
        }
        let body = req
            .body()
            .and_then(|b| b.as_bytes())
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        let request = builder
            .body(kube::client::Body::from(body))
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.describe(),
            reason,
        };
        let call = async {
            let resp = kube.send(request).await.map_err(|e| unreachable(root_cause(&e)))?;
            let (parts, body) = resp.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .map_err(|e| unreachable(root_cause(&e)))?
                .to_bytes();
            Ok::<_, ClientError>((parts, bytes))
        };
        let (parts, bytes) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| unreachable("timed out".into()))??;
        if let Some(message) = api_server_status(parts.status, &bytes) {
            return Err(ClientError::Proxy {
                service: format!("{}/{}", service.namespace, service.name),
                status: parts.status.as_u16(),
                message,
            });
        }
        Ok(reqwest::Response::from(http::Response::from_parts(parts, bytes)))
    }
}

/// The message of a failed answer the API server wrote itself: a `Status` object (the relay
/// answers errors as `{"error": ...}`, never so).
pub fn api_server_status(status: StatusCode, body: &[u8]) -> Option<String> {
    if status.is_success() {
        return None;
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    (v["kind"] == "Status" && v["apiVersion"] == "v1").then(|| {
        v["message"]
            .as_str()
            .filter(|m| !m.is_empty())
            .or(v["reason"].as_str())
            .unwrap_or("no message")
            .to_string()
    })
}

async fn json_of(resp: reqwest::Response) -> Result<Value, ClientError> {
    let status = resp.status();
    let body = resp.text().await.map_err(|e| ClientError::Unexpected(e.to_string()))?;
    let v: Option<Value> = serde_json::from_str(&body).ok();
    // The API answers errors as {"error": "..."}.
    let message = v
        .as_ref()
        .and_then(|v| v["error"].as_str())
        .map_or_else(|| body.trim().to_string(), str::to_string);
    match status {
        s if s.is_success() => v.ok_or_else(|| ClientError::Unexpected(format!("not JSON: {}", truncate(&body)))),
        StatusCode::NOT_FOUND => Err(ClientError::NotFound(message)),
        s => Err(ClientError::Refused {
            status: s.as_u16(),
            message,
        }),
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}
