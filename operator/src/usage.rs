//! Reads quota usage from the relays' admin API (`GET /api/v1/quotas` with a bearer token, see
//! the relay contract) for the SenderQuota statuses. Plain HTTP/1.1 inside the cluster. It only
//! reads; a failure is reported to the caller, which keeps the usage it already shows. The token
//! never appears in errors or logs.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mailroute_api::quota::QuotaUsage;
use serde::Deserialize;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("admin URL `{0}` is not an http:// URL with a host")]
    Url(String),
    #[error("connecting to the relay admin API: {0}")]
    Connect(#[from] std::io::Error),
    #[error("relay admin API: {0}")]
    Http(#[from] hyper::Error),
    #[error("relay admin API answered {0}: {1}")]
    Status(StatusCode, String),
    #[error("relay admin API sent unreadable quota usage: {0}")]
    Json(#[from] serde_json::Error),
    #[error("relay admin API did not answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Deserialize)]
struct QuotasDoc {
    quotas: Vec<QuotaEntry>,
}

#[derive(Deserialize)]
struct QuotaEntry {
    id: String,
    usage: QuotaUsage,
}

/// Parses the `GET /api/v1/quotas` document into usage by quota id. A namespace quota
/// (`scope: Namespace`) has one entry per namespace it counts: its status shows the usage when
/// it counts one namespace; with several, none (no single number is the quota's usage).
pub fn parse(body: &[u8]) -> Result<BTreeMap<String, QuotaUsage>, serde_json::Error> {
    let doc: QuotasDoc = serde_json::from_slice(body)?;
    let mut out = BTreeMap::new();
    let mut several = std::collections::BTreeSet::new();
    for q in doc.quotas {
        if out.insert(q.id.clone(), q.usage).is_some() {
            several.insert(q.id);
        }
    }
    out.retain(|id, _| !several.contains(id));
    Ok(out)
}

/// Client of one relay admin endpoint (usually the relays' Service; all relays share Redis, so
/// any of them answers for the fleet).
#[derive(Clone)]
pub struct UsageClient {
    host: String,
    port: u16,
    authority: String,
    path: String,
    token: String,
    timeout: Duration,
}

impl std::fmt::Debug for UsageClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageClient")
            .field("authority", &self.authority)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl UsageClient {
    /// `base_url` like `http://mailroute-admin.mailroute.svc:8080`.
    pub fn new(base_url: &str, token: impl Into<String>, timeout: Duration) -> Result<Self, UsageError> {
        let bad = || UsageError::Url(base_url.to_string());
        let uri: Uri = base_url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("http") {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?.clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let path = format!("{}/api/v1/quotas", uri.path().trim_end_matches('/'));
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(80),
            authority: authority.to_string(),
            path,
            token: token.into(),
            timeout,
        })
    }

    /// Usage of every quota the relays know, by quota id.
    pub async fn fetch(&self) -> Result<BTreeMap<String, QuotaUsage>, UsageError> {
        match tokio::time::timeout(self.timeout, self.fetch_inner()).await {
            Ok(r) => r,
            Err(_) => Err(UsageError::Timeout(self.timeout)),
        }
    }

    async fn fetch_inner(&self) -> Result<BTreeMap<String, QuotaUsage>, UsageError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        // The connection task ends when the response is read and `sender` is dropped.
        tokio::spawn(conn);
        let request = Request::get(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|_| UsageError::Url(self.authority.clone()))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body).chars().take(200).collect();
            return Err(UsageError::Status(status, text));
        }
        Ok(parse(&body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_document() {
        let body = br#"{"quotas":[{"id":"mail/shop-42","usage":{"month":{"used":3,"limit":10000,"remaining":9997,"resetsAt":"2024-06-01T00:00:00+09:00"}}}]}"#;
        let u = parse(body).unwrap();
        let month = u["mail/shop-42"].month.as_ref().unwrap();
        assert_eq!((month.used, month.remaining), (3, 9997));
        assert!(u["mail/shop-42"].minute.is_none());
        assert!(parse(b"{\"events\":[]}").is_err());
    }

    #[test]
    fn a_namespace_quota_shows_usage_only_when_it_counts_one_namespace() {
        let body = br#"{"quotas":[
            {"id":"mailroute/shop-42-plan","namespace":"shop-42","usage":{"month":{"used":7,"limit":10000,"remaining":9993,"resetsAt":"x"}}},
            {"id":"mailroute/basic","namespace":"team-a","usage":{"day":{"used":1,"limit":2,"remaining":1,"resetsAt":"x"}}},
            {"id":"mailroute/basic","namespace":"team-b","usage":{"day":{"used":2,"limit":2,"remaining":0,"resetsAt":"x"}}}]}"#;
        let u = parse(body).unwrap();
        assert_eq!(u["mailroute/shop-42-plan"].month.as_ref().unwrap().used, 7);
        assert!(!u.contains_key("mailroute/basic"));
    }

    #[test]
    fn only_http_urls_with_a_host_are_accepted() {
        let c = UsageClient::new("http://relay-admin.mail.svc:8080/", "t", Duration::from_secs(1)).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.path.as_str()),
            ("relay-admin.mail.svc", 8080, "/api/v1/quotas")
        );
        assert_eq!(c.authority, "relay-admin.mail.svc:8080");
        assert!(UsageClient::new("https://x", "t", Duration::from_secs(1)).is_err());
        assert!(UsageClient::new("relay:8080", "t", Duration::from_secs(1)).is_err());
        assert!(!format!("{c:?}").contains("\"t\""));
    }
}
