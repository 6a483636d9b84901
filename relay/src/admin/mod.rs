//! The admin HTTP API (axum): `/healthz` (503 when a loop of the relay stopped turning),
//! `/readyz` and `/metrics` without
//! authentication, and `/api/v1/*` (delivery log events as JSON or CSV,
//! message state and cancellation, quota usage, suppression lists, bulk queue control in
//! [`queue`]) behind a bearer token (`Authorization`, or [`TOKEN_HEADER`] through the
//! Kubernetes API server's service proxy): the admin token (every
//! namespace), or, when enabled, a Kubernetes token authenticated by TokenReview and authorized
//! per namespace by SubjectAccessReview ([`access`] decides what each request needs,
//! [`kubernetes`] asks the API server). A tenant's answers never show another namespace's mail:
//! events and quotas are filtered to the namespace it named, and a message of a namespace it
//! may not read answers 404 like one that does not exist (same body; only its timing can differ,
//! since the message is looked up before its namespace is reviewed).
//!
//! This module owns routing, authentication, parameter validation and
//! response shapes. It must not reach into the queue or the quota store
//! directly: those answers come from an [`AdminBackend`] the relay provides
//! (`backend::RelayBackend`). It never logs or echoes the token.

pub mod access;
pub(crate) mod backend;
pub mod kubernetes;
mod queue;
mod suppressions;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mailroute_api::quota::QuotaUsage;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use self::access::Permission;
use self::kubernetes::{Caller, KubeAuthError, KubernetesAuth};
use crate::observe::dlog::{Cursor, DEFAULT_LIMIT, DeliveryLog, EventFilter, EventPage, MAX_LIMIT, write_csv};
use crate::observe::liveness::Liveness;
use crate::observe::metrics::{CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics};
use crate::outbound::bounce::BounceClass;

/// What the admin API needs from the rest of the relay (queue, config, quotas).
#[async_trait]
pub trait AdminBackend: Send + Sync {
    /// `Ok` when Redis is reachable and a configuration is loaded, else the reason.
    async fn ready(&self) -> Result<(), String>;
    /// The state of one message with per-recipient status, `None` if unknown.
    async fn message(&self, id: &str) -> anyhow::Result<Option<serde_json::Value>>;
    /// Cancels a queued or scheduled message. Implementations record a
    /// `cancelled` delivery log event per cancelled recipient.
    async fn cancel(&self, id: &str) -> anyhow::Result<CancelResult>;
    /// Current usage of every sender quota.
    async fn quotas(&self) -> anyhow::Result<Vec<QuotaReport>>;
    /// Updates the Redis-backed gauges (queue, quotas); `true` when every value was read. Run
    /// in the background by [`refresh_gauges`], never by a scrape.
    async fn refresh_metrics(&self) -> bool {
        true
    }
    /// The suppression lists, when the relay keeps them (a Redis queue).
    fn suppressions(&self) -> Option<Arc<crate::suppress::Suppressions>> {
        None
    }

    /// Bulk queue control (`/api/v1/queue*`, `/api/v1/holds`), when this relay offers it.
    fn control(&self) -> Option<Arc<crate::control::Control>> {
        None
    }
}

/// Outcome of `DELETE /api/v1/messages/{id}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelResult {
    /// `recipients` pending recipients will not be delivered (their jobs are gone);
    /// `in_flight` more were being delivered at that moment and may still be.
    Cancelled { recipients: usize, in_flight: usize },
    /// No such message (unknown, or every recipient already final).
    NotFound,
    /// It exists but cannot be cancelled now; the reason is returned with 409.
    Conflict(String),
}

/// One entry of `GET /api/v1/quotas`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuotaReport {
    /// Quota id "ns/name".
    pub id: String,
    /// For a namespace quota (`scope: Namespace`), the namespace this usage is of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub usage: QuotaUsage,
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub backend: Arc<dyn AdminBackend>,
    pub dlog: DeliveryLog,
    pub metrics: Arc<Metrics>,
    /// Heartbeats of the relay's loops; `/healthz` answers 503 naming any that stopped.
    pub liveness: Liveness,
    /// Bearer token for `/api/v1` (every namespace); `None` (or empty) and no `kubernetes`
    /// disables the API with 503.
    pub token: Option<String>,
    /// Accepts Kubernetes tokens too, each limited to the namespaces RBAC grants it.
    pub kubernetes: Option<Arc<KubernetesAuth>>,
}

/// Who made an `/api/v1` request (a request extension set by the authentication layer).
#[derive(Clone, Debug)]
pub enum Principal {
    /// The admin token: every namespace.
    Admin,
    /// A Kubernetes token: what SubjectAccessReview allows.
    Kubernetes(Caller),
}

/// What a [`Principal`] may see of one request's answer.
#[derive(Debug)]
enum Scope {
    /// Everything.
    All,
    /// One namespace, the permission checked.
    Namespace(String),
}

/// Longest accepted message id.
const MAX_ID_LEN: usize = 128;

/// The admin router.
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/events", get(events))
        .route("/events.csv", get(events_csv))
        .route("/messages/{id}", get(message).delete(cancel))
        .route("/quotas", get(quotas))
        // Suppression lists (see `suppressions`).
        .route(
            "/suppressions",
            get(suppressions::list)
                .post(suppressions::add)
                .delete(suppressions::remove),
        )
        .route(
            "/suppressions.csv",
            get(suppressions::export)
                .post(suppressions::import)
                .layer(axum::extract::DefaultBodyLimit::max(suppressions::MAX_IMPORT_BYTES)),
        )
        // Bulk queue control.
        .route("/queue", get(queue::list))
        .route("/queue/cancel", post(queue::cancel))
        .route("/queue/retry", post(queue::retry))
        .route("/queue/hold", post(queue::hold))
        .route("/queue/release", post(queue::release))
        .route("/holds", get(queue::holds))
        .fallback(api_not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// While the relay waits for Redis at start-up: `/healthz` 200 (the process is alive, do not
/// restart it), everything else 503 with the reason in `reason`. Serves until its sender is
/// dropped.
pub async fn serve_starting(listener: tokio::net::TcpListener, reason: tokio::sync::watch::Receiver<String>) {
    let mut closed = reason.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "starting" }))
        .fallback(move || {
            let reason = reason.borrow().clone();
            async move { (StatusCode::SERVICE_UNAVAILABLE, reason) }
        });
    let stop = async move { while closed.changed().await.is_ok() {} };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::error!(error = %e, "admin server (starting) failed");
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// A failed answer: 503 with a reason when the store (Redis) is down or not serving, so
/// clients and probes can tell an outage from a bug; 500 otherwise. Neither echoes the error.
fn internal(what: &str, err: anyhow::Error) -> Response {
    if let Some(reason) = store_unavailable(&err) {
        tracing::warn!(error = format!("{err:#}"), "admin API: {what}: {reason}");
        let mut resp = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{what} failed: {reason}; try again later"),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return resp;
    }
    tracing::error!(error = format!("{err:#}"), "admin API: {what}");
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {what}"))
}

/// Why the store is unavailable, when a Redis error in `err`'s chain says it cannot be reached
/// or is not serving (down, loading, failing over); `None` for any other failure.
fn store_unavailable(err: &anyhow::Error) -> Option<&'static str> {
    use redis::{ErrorKind as K, ServerErrorKind as S};
    err.chain()
        .filter_map(|c| c.downcast_ref::<redis::RedisError>())
        .find_map(|e| {
            if e.is_timeout() {
                Some("Redis did not answer in time")
            } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
                Some("Redis is unreachable")
            } else {
                match e.kind() {
                    K::ClusterConnectionNotFound | K::Server(S::ClusterDown | S::MasterDown | S::TryAgain) => {
                        Some("Redis is unreachable")
                    }
                    K::Server(S::BusyLoading) => Some("Redis is loading its data"),
                    K::Server(S::ReadOnly) => Some("Redis is failing over"),
                    _ => None,
                }
            }
        })
}

async fn healthz(State(st): State<AdminState>) -> Response {
    match st.liveness.check() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(reason) => {
            tracing::error!(%reason, "liveness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, reason).into_response()
        }
    }
}

async fn readyz(State(st): State<AdminState>) -> Response {
    match st.backend.ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

/// How often the Redis-backed gauges (queue, quotas) are read in the background. A scrape never
/// reads Redis: it serves the last values and their age (`mailroute_redis_gauges_age_seconds`),
/// so a slow or hung Redis cannot hold it until Prometheus' timeout.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// A refresh still running after this is abandoned; the next tick starts another.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the Redis-backed gauges every `every` until `shutdown` completes, one refresh at a
/// time, each bounded by a short timeout; records when the last complete read happened.
pub async fn refresh_gauges(state: AdminState, every: Duration, shutdown: impl Future<Output = ()> + Send) {
    let m = state.metrics.clone();
    let refresher = async {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Ok(true) = tokio::time::timeout(REFRESH_TIMEOUT, state.backend.refresh_metrics()).await {
                m.redis_gauges_read_ms.store(crate::clock::now_ms(), Ordering::Release);
            }
        }
    };
    tokio::select! {
        () = refresher => {}
        () = shutdown => {}
    }
}

async fn metrics(State(st): State<AdminState>) -> Response {
    let m = &st.metrics;
    let age_ms = crate::clock::now_ms() - m.redis_gauges_read_ms.load(Ordering::Acquire);
    m.redis_gauges_age_seconds.set(age_ms.max(0) as f64 / 1000.0);
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], st.metrics.encode()).into_response()
}

async fn require_token(State(st): State<AdminState>, mut req: Request, next: Next) -> Response {
    let token = st.token.as_deref().filter(|t| !t.is_empty());
    if token.is_none() && st.kubernetes.is_none() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "admin API disabled: no admin token configured",
        );
    }
    let presented = presented_token(req.headers());
    let principal = match (presented, token, &st.kubernetes) {
        (Some(p), Some(t), _) if token_matches(&p, t) => Some(Principal::Admin),
        (Some(p), _, Some(kube)) => match kube.authenticate(&p).await {
            Ok(caller) => caller.map(Principal::Kubernetes),
            Err(e) => return kubernetes_unavailable(e),
        },
        _ => None,
    };
    if let Some(principal) = principal {
        req.extensions_mut().insert(principal);
        return next.run(req).await;
    }
    let mut resp = error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"mailroute\""),
    );
    resp
}

/// The header a client behind the Kubernetes API server's service proxy presents its token in:
/// the API server removes `Authorization` once it has authenticated the caller, and forwards
/// other headers to the Service.
pub const TOKEN_HEADER: &str = "x-mailroute-token";

/// The bearer token of `Authorization`, else the bare token of [`TOKEN_HEADER`]; both are
/// checked the same way.
fn presented_token(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    match value(header::AUTHORIZATION.as_str()) {
        Some(auth) => bearer(auth).map(str::to_string),
        None => value(TOKEN_HEADER)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string),
    }
}

/// 503 when the API server could not answer a review: the caller may retry; nothing is cached.
fn kubernetes_unavailable(e: KubeAuthError) -> Response {
    tracing::warn!(error = %e, "admin API: Kubernetes review failed");
    let mut resp = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the Kubernetes API server could not check the token; try again later",
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    resp
}

/// Whether `principal` holds `permission` (the admin token holds all): `Ok(())`, or the
/// response to send (403 naming the permission, 503 when the API server did not answer).
async fn check(st: &AdminState, principal: &Principal, permission: &Permission) -> Result<(), Response> {
    let Principal::Kubernetes(caller) = principal else {
        return Ok(());
    };
    let Some(kube) = &st.kubernetes else {
        return Err(error(StatusCode::FORBIDDEN, "Kubernetes tokens are not accepted"));
    };
    match kube.authorize(caller, permission).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(error(
            StatusCode::FORBIDDEN,
            format!("{} may not {permission}", caller.user.username),
        )),
        Err(e) => Err(kubernetes_unavailable(e)),
    }
}

/// The scope of a namespaced list (events, quotas): the admin token's `namespace` filter is
/// optional; a Kubernetes token must name one namespace and hold `needs(namespace)` there.
async fn list_scope(
    st: &AdminState,
    principal: &Principal,
    namespace: Option<&str>,
    needs: fn(Option<&str>) -> Result<Permission, access::ScopeError>,
) -> Result<Scope, Response> {
    match principal {
        Principal::Admin => Ok(Scope::All),
        Principal::Kubernetes(_) => {
            let permission = needs(namespace).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
            check(st, principal, &permission).await?;
            Ok(Scope::Namespace(permission.namespace))
        }
    }
}

/// The message `id` if `principal` may read it: one of a namespace it may not read (or of no
/// namespace, for a Kubernetes token) answers 404 exactly as a message that does not exist.
async fn visible_message(st: &AdminState, principal: &Principal, id: &str) -> Result<serde_json::Value, Response> {
    let not_found = || error(StatusCode::NOT_FOUND, "message not found");
    let view = match st.backend.message(id).await {
        Ok(Some(v)) => v,
        Ok(None) => return Err(not_found()),
        Err(e) => return Err(internal("reading the message", e)),
    };
    if let Principal::Kubernetes(_) = principal {
        let Some(permission) = access::read_message(view["meta"]["namespace"].as_str()) else {
            return Err(not_found());
        };
        match check(st, principal, &permission).await {
            Ok(()) => {}
            Err(resp) if resp.status() == StatusCode::FORBIDDEN => return Err(not_found()),
            Err(resp) => return Err(resp),
        }
    }
    Ok(view)
}

/// The credentials of an `Authorization: Bearer <token>` header value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// Compares digests so the time taken reveals nothing about the token,
/// not even its length.
fn token_matches(presented: &str, token: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(token.as_bytes());
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn api_not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

/// Validated parameters of the events endpoints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventsQuery {
    pub filter: EventFilter,
    pub cursor: Option<Cursor>,
    pub limit: Option<usize>,
}

/// Parses `from, to, result, recipient, sender, source_ip, bounce_class,
/// message_id, namespace, limit, cursor` (`namespace=-`: unattributed mail). Empty values count as absent; unknown or
/// repeated parameters are errors (a typo must not silently widen a query).
/// `max_limit` bounds `limit` (`None`: unbounded).
pub fn parse_events_query(pairs: &[(String, String)], max_limit: Option<usize>) -> Result<EventsQuery, String> {
    let mut q = EventsQuery::default();
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in pairs {
        if seen.contains(&k.as_str()) {
            return Err(format!("parameter {k:?} given more than once"));
        }
        seen.push(k);
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        let f = &mut q.filter;
        match k.as_str() {
            "from" => f.from = Some(parse_time(k, v)?),
            "to" => f.to = Some(parse_time(k, v)?),
            "result" => f.result = Some(v.parse()?),
            "recipient" => f.recipient = Some(v.to_string()),
            "sender" => f.sender = Some(v.to_string()),
            "source_ip" => f.source_ip = Some(v.parse().map_err(|_| format!("source_ip {v:?} is not an IP address"))?),
            "bounce_class" => {
                if !BounceClass::ALL.iter().any(|c| c.as_str() == v) {
                    let names: Vec<&str> = BounceClass::ALL.iter().map(|c| c.as_str()).collect();
                    return Err(format!(
                        "unknown bounce_class {v:?}; expected one of {}",
                        names.join(", ")
                    ));
                }
                f.bounce_class = Some(v.to_string())
            }
            "message_id" => f.message_id = Some(v.to_string()),
            "namespace" => f.namespace = Some(v.to_string()),
            "cursor" => q.cursor = Some(v.parse()?),
            "limit" => {
                let n: usize = v.parse().map_err(|_| format!("limit {v:?} is not a number"))?;
                if n == 0 || max_limit.is_some_and(|m| n > m) {
                    return Err(match max_limit {
                        Some(m) => format!("limit must be between 1 and {m}"),
                        None => "limit must be at least 1".to_string(),
                    });
                }
                q.limit = Some(n);
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    if let (Some(from), Some(to)) = (q.filter.from, q.filter.to)
        && from > to
    {
        return Err("from must not be after to".to_string());
    }
    Ok(q)
}

fn parse_time(name: &str, v: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{name} {v:?} is not an RFC 3339 time: {e}"))
}

fn query_pairs(
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    max_limit: Option<usize>,
) -> Result<EventsQuery, String> {
    let Query(pairs) = q.map_err(|e| e.body_text())?;
    parse_events_query(&pairs, max_limit)
}

/// The events query of `principal`: a Kubernetes token's is held to the namespace it named.
async fn scoped_events(st: &AdminState, principal: &Principal, mut q: EventsQuery) -> Result<EventsQuery, Response> {
    match list_scope(st, principal, q.filter.namespace.as_deref(), access::events).await? {
        Scope::All => {}
        Scope::Namespace(ns) => q.filter.namespace = Some(ns),
    }
    Ok(q)
}

async fn events(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let q = match query_pairs(q, Some(MAX_LIMIT)) {
        Ok(q) => q,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let q = match scoped_events(&st, &principal, q).await {
        Ok(q) => q,
        Err(resp) => return resp,
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    match st.dlog.query(&q.filter, q.cursor, limit).await {
        Ok(page) => axum::Json(page).into_response(),
        Err(e) => internal("querying the delivery log", e.into()),
    }
}

/// State of a CSV download between pages.
struct CsvStream {
    dlog: DeliveryLog,
    filter: EventFilter,
    cursor: Option<Cursor>,
    /// Rows still allowed (`usize::MAX`: no limit).
    remaining: usize,
}

impl CsvStream {
    async fn page(&mut self) -> Result<EventPage, crate::observe::dlog::DlogError> {
        let limit = self.remaining.min(MAX_LIMIT);
        let page = self.dlog.query(&self.filter, self.cursor, limit).await?;
        self.remaining -= page.events.len();
        self.cursor = if self.remaining == 0 { None } else { page.next_cursor };
        Ok(page)
    }
}

async fn events_csv(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let q = match query_pairs(q, None) {
        Ok(q) => q,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let q = match scoped_events(&st, &principal, q).await {
        Ok(q) => q,
        Err(resp) => return resp,
    };
    let mut state = CsvStream {
        dlog: st.dlog.clone(),
        filter: q.filter,
        cursor: q.cursor,
        remaining: q.limit.unwrap_or(usize::MAX),
    };
    // The first page is fetched before answering, so a store failure is a
    // clean 503 or 500; later failures can only cut the download short.
    let first = match state.page().await {
        Ok(page) => page,
        Err(e) => return internal("querying the delivery log", e.into()),
    };
    let head = match write_csv(&first.events, true) {
        Ok(bytes) => bytes,
        Err(e) => return internal("writing CSV", e.into()),
    };
    let more = state.cursor.is_some();
    let rest = futures::stream::try_unfold(more.then_some(state), |state| async move {
        let Some(mut state) = state else {
            return Ok(None);
        };
        let page = state.page().await.map_err(std::io::Error::other)?;
        let bytes = write_csv(&page.events, false).map_err(std::io::Error::other)?;
        let next = state.cursor.is_some().then_some(state);
        Ok::<_, std::io::Error>(Some((bytes, next)))
    });
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(head) }).chain(rest);
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"events.csv\""),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~:-".contains(&b))
}

async fn message(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    if !valid_id(&id) {
        return error(StatusCode::BAD_REQUEST, "invalid message id");
    }
    match visible_message(&st, &principal, &id).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(resp) => resp,
    }
}

async fn cancel(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    if !valid_id(&id) {
        return error(StatusCode::BAD_REQUEST, "invalid message id");
    }
    if let Principal::Kubernetes(_) = principal {
        // Only a message it may read can be refused with 403 (it knows that one exists).
        let view = match visible_message(&st, &principal, &id).await {
            Ok(v) => v,
            Err(resp) => return resp,
        };
        let namespace = view["meta"]["namespace"].as_str().unwrap_or_default();
        if let Err(resp) = check(&st, &principal, &access::cancel_message(namespace)).await {
            return resp;
        }
    }
    match st.backend.cancel(&id).await {
        Ok(CancelResult::Cancelled { recipients, in_flight }) => {
            let mut body = json!({
                "id": id,
                "cancelled": true,
                "recipients": recipients,
                "in_flight": in_flight,
            });
            if in_flight > 0 {
                body["note"] = json!(format!(
                    "{in_flight} recipient(s) were being delivered when the cancel arrived and may still be delivered"
                ));
            }
            axum::Json(body).into_response()
        }
        Ok(CancelResult::NotFound) => error(StatusCode::NOT_FOUND, "message not found"),
        Ok(CancelResult::Conflict(reason)) => error(StatusCode::CONFLICT, reason),
        Err(e) => internal("cancelling the message", e),
    }
}

/// `GET /api/v1/quotas[?namespace=N]`: the entries of namespace N (see
/// [`access::quota_in`]); a Kubernetes token must name N.
async fn quotas(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let namespace = match quotas_namespace(q) {
        Ok(n) => n,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let namespace = match list_scope(&st, &principal, namespace.as_deref(), access::quotas).await {
        Ok(Scope::All) => namespace,
        Ok(Scope::Namespace(ns)) => Some(ns),
        Err(resp) => return resp,
    };
    match st.backend.quotas().await {
        Ok(mut list) => {
            if let Some(ns) = namespace {
                list.retain(|q| access::quota_in(&q.id, q.namespace.as_deref(), &ns));
            }
            axum::Json(json!({ "quotas": list })).into_response()
        }
        Err(e) => internal("reading quota usage", e),
    }
}

/// The only parameter of `/api/v1/quotas`: `namespace` (empty counts as absent).
fn quotas_namespace(q: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Option<String>, String> {
    let Query(pairs) = q.map_err(|e| e.body_text())?;
    let mut namespace = None;
    for (k, v) in pairs {
        match k.as_str() {
            "namespace" if namespace.is_some() => return Err("parameter \"namespace\" given more than once".into()),
            "namespace" => namespace = Some(v.trim().to_string()),
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(namespace.filter(|n| !n.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::dlog::{EventResult, RecordId};

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn parse(list: &[(&str, &str)]) -> Result<EventsQuery, String> {
        parse_events_query(&pairs(list), Some(MAX_LIMIT))
    }

    #[test]
    fn parses_every_parameter() {
        let q = parse(&[
            ("from", "2025-03-01T00:00:00Z"),
            ("to", "2025-03-01T09:00:00+09:00"),
            ("result", "bounced"),
            ("recipient", "bob@example.com"),
            ("sender", "<>"),
            ("source_ip", "2001:db8::1"),
            ("bounce_class", "invalid_recipient"),
            ("message_id", "abc-1"),
            ("namespace", "team-a"),
            ("limit", "1000"),
            ("cursor", "1740787200000-3"),
        ])
        .unwrap();
        let f = &q.filter;
        assert_eq!(f.from, f.to, "+09:00 is converted to UTC");
        assert_eq!(f.result, Some(EventResult::Bounced));
        assert_eq!(f.recipient.as_deref(), Some("bob@example.com"));
        assert_eq!(f.sender.as_deref(), Some("<>"));
        assert_eq!(f.source_ip, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(f.bounce_class.as_deref(), Some("invalid_recipient"));
        assert_eq!(f.message_id.as_deref(), Some("abc-1"));
        assert_eq!(f.namespace.as_deref(), Some("team-a"));
        assert_eq!(q.limit, Some(1000));
        assert_eq!(q.cursor, Some(RecordId::new(1_740_787_200_000, 3)));
    }

    #[test]
    fn empty_values_are_absent() {
        assert_eq!(
            parse(&[("result", ""), ("recipient", " ")]).unwrap(),
            EventsQuery::default()
        );
    }

    #[test]
    fn rejects_bad_parameters_with_a_reason() {
        for (list, needle) in [
            (vec![("from", "yesterday")], "RFC 3339"),
            (vec![("result", "sent")], "unknown result"),
            (vec![("source_ip", "10.0.0.300")], "IP address"),
            (vec![("bounce_class", "spam")], "unknown bounce_class"),
            (vec![("limit", "0")], "between 1 and 1000"),
            (vec![("limit", "1001")], "between 1 and 1000"),
            (vec![("limit", "-1")], "not a number"),
            (vec![("cursor", "abc")], "invalid cursor"),
            (vec![("recipent", "a@b")], "unknown parameter"),
            (vec![("result", "bounced"), ("result", "deferred")], "more than once"),
            (
                vec![("from", "2025-03-02T00:00:00Z"), ("to", "2025-03-01T00:00:00Z")],
                "from must not be after to",
            ),
        ] {
            let err = parse(&list).unwrap_err();
            assert!(err.contains(needle), "{list:?}: {err}");
        }
        // The CSV export has no upper limit.
        let q = parse_events_query(&pairs(&[("limit", "50000")]), None).unwrap();
        assert_eq!(q.limit, Some(50000));
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }

    #[test]
    fn the_token_header_serves_callers_behind_the_service_proxy() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert_eq!(presented_token(&headers(&[(TOKEN_HEADER, "abc")])), Some("abc".into()));
        assert_eq!(presented_token(&headers(&[(TOKEN_HEADER, " ")])), None);
        assert_eq!(presented_token(&headers(&[])), None);
        // Authorization, when present, is the one checked, even when it is not a bearer token.
        let both = headers(&[("authorization", "Bearer one"), (TOKEN_HEADER, "two")]);
        assert_eq!(presented_token(&both), Some("one".into()));
        let basic = headers(&[("authorization", "Basic eA=="), (TOKEN_HEADER, "two")]);
        assert_eq!(presented_token(&basic), None);
    }

    #[test]
    fn token_comparison() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("s3cret ", "s3cret"));
        assert!(!token_matches("", "s3cret"));
    }

    #[test]
    fn redis_outages_are_told_apart_from_other_failures() {
        let io = |kind| anyhow::Error::new(crate::queue::QueueError::Redis(std::io::Error::from(kind).into()));
        assert_eq!(
            store_unavailable(&io(std::io::ErrorKind::ConnectionRefused)),
            Some("Redis is unreachable")
        );
        assert_eq!(
            store_unavailable(&io(std::io::ErrorKind::TimedOut)),
            Some("Redis did not answer in time")
        );
        let loading =
            redis::RedisError::from((redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading), "loading"));
        let wrapped = anyhow::Error::new(crate::observe::dlog::DlogError::Redis(loading)).context("querying");
        assert_eq!(store_unavailable(&wrapped), Some("Redis is loading its data"));
        let corrupt = anyhow::Error::new(crate::queue::QueueError::Corrupt("bad record".into()));
        assert_eq!(store_unavailable(&corrupt), None);
        assert_eq!(store_unavailable(&anyhow::anyhow!("bug")), None);
    }

    #[test]
    fn message_ids() {
        assert!(valid_id("01JQ6ZC7V9-abc_1.2"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"x".repeat(MAX_ID_LEN + 1)));
    }
}
