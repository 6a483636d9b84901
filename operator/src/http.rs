//! The operator's own HTTP endpoints (default port 8081): `/healthz` (the process runs),
//! `/readyz` (the API server was reached; a standby replica is ready to take over) and
//! `/metrics` (Prometheus text). Read-only; no secrets are reachable here.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// What the endpoints report.
#[derive(Clone)]
pub struct Health {
    pub metrics: Metrics,
    /// Set once the API server answered.
    pub ready: Arc<AtomicBool>,
    pub leading: watch::Receiver<bool>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if !h.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: the Kubernetes API has not answered yet",
        );
    }
    if *h.leading.borrow() {
        (StatusCode::OK, "ready (leader)")
    } else {
        (StatusCode::OK, "ready (standby)")
    }
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        h.metrics.render(),
    )
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoints_answer_over_tcp() {
        let metrics = Metrics::new();
        metrics.is_leader.set(1);
        let ready = Arc::new(AtomicBool::new(false));
        let (lead_tx, leading) = watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let health = Health {
            metrics,
            ready: ready.clone(),
            leading,
        };
        let server = tokio::spawn(serve(listener, health, async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));

        assert!(get(addr, "/healthz").await.ends_with("\r\n\r\nok"));
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.ends_with("ready (standby)"));
        lead_tx.send_replace(true);
        assert!(get(addr, "/readyz").await.ends_with("ready (leader)"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("text/plain; version=0.0.4"), "{m}");
        assert!(m.contains("mailroute_operator_is_leader 1"), "{m}");

        stop_tx.send_replace(true);
        server.await.unwrap().unwrap();
    }
}
