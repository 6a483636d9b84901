//! The admin API over HTTP: one client with the base URL, the bearer token and a timeout per
//! call. It owns turning HTTP answers into values or typed errors, with the server's own
//! error text; it must not print anything (the caller does) and never puts the token in an
//! error.

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
}

pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

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
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
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
