//! The bulk queue control endpoints: `GET /api/v1/queue` (list by filter, paged, with the
//! count), `POST /api/v1/queue/{cancel,retry,hold,release}` and `GET /api/v1/holds`. Parameters
//! are query parameters, validated once ([`QueueFilter::parse`]); unknown or repeated ones are
//! errors. A Kubernetes token must name its namespace and acts on that namespace's mail only
//! (its holds are scoped to it).
//!
//! Routing and answers only: the work is [`crate::control::Control`]'s.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AdminState, Principal, Scope, access, error, internal, list_scope};
use crate::control::rules::{HoldRule, NamespaceSel, QueueFilter};
use crate::control::{Actor, Control};
use crate::queue::QueueError;

/// Default and largest page of `GET /api/v1/queue`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

fn actor(p: &Principal) -> Actor {
    match p {
        Principal::Admin => Actor("admin-token".into()),
        Principal::Kubernetes(c) => Actor(c.user.username.clone()),
    }
}

/// A refused request: the response to send.
type Refused = Box<Response>;

fn control(st: &AdminState) -> Result<std::sync::Arc<Control>, Refused> {
    st.backend.control().ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_IMPLEMENTED,
            "bulk queue control is not available on this relay",
        ))
    })
}

fn failed(what: &str, e: QueueError) -> Response {
    match e {
        QueueError::Unsupported(why) => error(StatusCode::NOT_IMPLEMENTED, why),
        e => internal(what, e.into()),
    }
}

fn pairs(q: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Vec<(String, String)>, Refused> {
    q.map(|Query(p)| p)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e.body_text())))
}

/// The filter of a request, with its other parameters, held to the caller's namespace.
async fn scoped_filter(
    st: &AdminState,
    principal: &Principal,
    pairs: &[(String, String)],
    needs: fn(Option<&str>) -> Result<access::Permission, access::ScopeError>,
) -> Result<(QueueFilter, Vec<(String, String)>), Response> {
    let (mut filter, rest) = QueueFilter::parse(pairs).map_err(|e| error(StatusCode::BAD_REQUEST, e.0))?;
    let rest: Vec<(String, String)> = rest.into_iter().cloned().collect();
    let ns = match &filter.namespace {
        Some(NamespaceSel::Named(n)) => Some(n.as_str()),
        Some(NamespaceSel::Unattributed) => Some("-"),
        None => None,
    };
    if let Scope::Namespace(n) = list_scope(st, principal, ns, needs).await? {
        filter.namespace = Some(NamespaceSel::Named(n));
    }
    Ok((filter, rest))
}

/// The prelude of the filter endpoints: the control, the query's filter scoped to what the
/// caller may see (`needs`), and the other parameters, of which only `allowed` are accepted.
async fn filtered(
    st: &AdminState,
    principal: &Principal,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    needs: fn(Option<&str>) -> Result<access::Permission, access::ScopeError>,
    allowed: &[&str],
) -> Result<(std::sync::Arc<Control>, QueueFilter, Vec<(String, String)>), Response> {
    let c = control(st).map_err(|r| *r)?;
    let pairs = pairs(q).map_err(|r| *r)?;
    let (filter, rest) = scoped_filter(st, principal, &pairs, needs).await?;
    no_more(&rest, allowed).map_err(|r| *r)?;
    Ok((c, filter, rest))
}

fn no_more(rest: &[(String, String)], allowed: &[&str]) -> Result<(), Refused> {
    let mut seen: Vec<&str> = Vec::new();
    for (k, _) in rest {
        if !allowed.contains(&k.as_str()) {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("unknown parameter {k:?}"),
            )));
        }
        if seen.contains(&k.as_str()) {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("parameter {k:?} given more than once"),
            )));
        }
        seen.push(k);
    }
    Ok(())
}

fn param<'a>(rest: &'a [(String, String)], name: &str) -> Option<&'a str> {
    rest.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// `GET /api/v1/queue?<filter>&limit=&cursor=`.
pub(super) async fn list(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let (c, filter, rest) = match filtered(&st, &principal, q, access::queue_list, &["limit", "cursor"]).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let limit = match param(&rest, "limit").map(str::parse::<usize>) {
        None => DEFAULT_LIMIT,
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("limit must be between 1 and {MAX_LIMIT}"),
            );
        }
    };
    match c.list(&filter, param(&rest, "cursor"), limit).await {
        Ok(page) => axum::Json(page).into_response(),
        Err(e) => failed("listing the queue", e),
    }
}

/// `POST /api/v1/queue/cancel?<filter>[&all=true]`: a filter that selects everything needs
/// `all=true`.
pub(super) async fn cancel(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let (c, filter, rest) = match filtered(&st, &principal, q, access::queue_cancel, &["all"]).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let all = match param(&rest, "all") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return error(StatusCode::BAD_REQUEST, format!("all must be true or false, not {v:?}")),
    };
    if filter.selects_everything() && !all {
        return error(
            StatusCode::BAD_REQUEST,
            "cancel needs a filter (sender, domain, route, namespace, min_age, max_age); add all=true to cancel everything",
        );
    }
    match c.cancel(&filter, &actor(&principal)).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => failed("cancelling", e),
    }
}

/// `POST /api/v1/queue/retry?<filter>`: scheduled jobs become ready now.
pub(super) async fn retry(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let (c, filter, _) = match filtered(&st, &principal, q, access::queue_update, &[]).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match c.retry(&filter, &actor(&principal)).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => failed("retrying", e),
    }
}

/// The prelude of hold and release: the control, and the rule and scope of the request: exactly
/// one of `route`, `domain`, `sender`, and `namespace` (a Kubernetes token's own, required);
/// of the other parameters only `extra` are accepted.
async fn hold_target(
    st: &AdminState,
    principal: &Principal,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    extra: &[&str],
) -> Result<(std::sync::Arc<Control>, HoldRule, Option<String>, Vec<(String, String)>), Response> {
    let c = control(st).map_err(|r| *r)?;
    let pairs = pairs(q).map_err(|r| *r)?;
    let mut rule = None;
    let mut namespace = None;
    let mut rest = Vec::new();
    for (k, v) in &pairs {
        match k.as_str() {
            "route" | "domain" | "sender" => {
                if rule.is_some() {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "give exactly one of route, domain or sender",
                    ));
                }
                rule = Some(HoldRule::parse(k, v).map_err(|e| error(StatusCode::BAD_REQUEST, e.0))?);
            }
            "namespace" if namespace.is_some() => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "parameter \"namespace\" given more than once",
                ));
            }
            "namespace" => namespace = Some(v.trim().to_owned()).filter(|n| !n.is_empty()),
            _ => rest.push((k.clone(), v.clone())),
        }
    }
    no_more(&rest, extra).map_err(|r| *r)?;
    let Some(rule) = rule else {
        return Err(error(StatusCode::BAD_REQUEST, "give one of route, domain or sender"));
    };
    if let Some(n) = &namespace
        && !access::is_namespace_name(n)
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("namespace {n:?} is not a namespace name"),
        ));
    }
    let namespace = match list_scope(st, principal, namespace.as_deref(), access::queue_update).await? {
        Scope::All => namespace,
        Scope::Namespace(n) => Some(n),
    };
    Ok((c, rule, namespace, rest))
}

/// `POST /api/v1/queue/hold?route=|domain=|sender=[&namespace=][&max=]`.
pub(super) async fn hold(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let (c, rule, namespace, rest) = match hold_target(&st, &principal, q, &["max"]).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let max: Option<Duration> = match param(&rest, "max").map(humantime::parse_duration) {
        None => None,
        Some(Ok(d)) if !d.is_zero() => Some(d),
        Some(_) => return error(StatusCode::BAD_REQUEST, "max must be a duration like 30m or 4h"),
    };
    match c.hold(rule, namespace, max, &actor(&principal)).await {
        Ok((hold, r)) => axum::Json(json!({
            "action": r.action,
            "touched": r.touched,
            "in_flight": r.in_flight,
            "hold": hold,
        }))
        .into_response(),
        Err(e) => failed("holding", e),
    }
}

/// `POST /api/v1/queue/release?route=|domain=|sender=[&namespace=]`: 404 when no such hold.
pub(super) async fn release(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let (c, rule, namespace, _) = match hold_target(&st, &principal, q, &[]).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    match c.release(&rule, namespace.as_deref(), &actor(&principal)).await {
        Ok(Some(r)) => axum::Json(r).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no hold on {rule}")),
        Err(e) => failed("releasing", e),
    }
}

/// `GET /api/v1/holds[?namespace=]`: a Kubernetes token sees its namespace's holds.
pub(super) async fn holds(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let c = match control(&st) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let pairs = match pairs(q) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    if let Err(r) = no_more(&pairs, &["namespace"]) {
        return *r;
    }
    let namespace = param(&pairs, "namespace").map(str::to_owned);
    let scope = match list_scope(&st, &principal, namespace.as_deref(), access::queue_list).await {
        Ok(Scope::All) => namespace,
        Ok(Scope::Namespace(n)) => Some(n),
        Err(r) => return r,
    };
    match c.refresh_holds().await {
        Ok(list) => {
            let now = crate::clock::now_ms();
            let list: Vec<_> = list
                .iter()
                .filter(|h| h.active(now))
                .filter(|h| scope.is_none() || h.namespace == scope)
                .cloned()
                .collect();
            axum::Json(json!({ "holds": list })).into_response()
        }
        Err(e) => failed("reading the holds", e),
    }
}
