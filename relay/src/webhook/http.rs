//! One signed POST to a webhook endpoint: a new connection per request (plain TCP only to a
//! loopback `http://` URL, which `compile` allows only there; rustls with the ring provider
//! otherwise), the whole request bounded by the webhook's timeout, the answer read up to a few
//! KiB. Returns the status and a short excerpt of the answer; never logs the body or headers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Bytes of an answer read (the rest is not waited for).
const MAX_ANSWER: usize = 4096;
/// Characters of an answer kept for the status.
pub(crate) const EXCERPT: usize = 200;

/// An endpoint's answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub excerpt: String,
}

pub(crate) struct Request<'a> {
    pub url: &'a str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// POSTs `req`; `Err` when there was no HTTP answer (what went wrong, without secrets).
pub(crate) async fn post(
    req: Request<'_>,
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Answer, String> {
    match tokio::time::timeout(timeout, post_inner(req, tls)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(timeout))),
    }
}

async fn post_inner(req: Request<'_>, tls: &Arc<rustls::ClientConfig>) -> Result<Answer, String> {
    let uri: hyper::Uri = req.url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("only http(s) URLs".into()),
    };
    let host = uri.host().ok_or("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or(host.clone());
    let mut builder = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "mailroute-webhooks");
    for (k, v) in req.headers {
        builder = builder.header(k, v);
    }
    let request = builder
        .body(Full::new(Bytes::from(req.body)))
        .map_err(|e| format!("request: {e}"))?;
    if https {
        let name = mailroute_tls::server_name(&host).map_err(|e| format!("server name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(TokioIo::new(stream), request).await
    } else {
        exchange(TokioIo::new(tcp), request).await
    }
}

async fn exchange<T>(io: T, request: hyper::Request<Full<Bytes>>) -> Result<Answer, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status().as_u16();
        // A body larger than the limit is cut: the status is what counts.
        let body = match Limited::new(response.into_body(), MAX_ANSWER).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        Ok(Answer {
            status,
            excerpt: excerpt(&body),
        })
    }
    .await;
    driver.abort();
    result
}

/// The first [`EXCERPT`] characters of an answer, on one line, control characters replaced.
pub(crate) fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(EXCERPT)
        .collect::<String>()
        .trim()
        .to_string()
}
