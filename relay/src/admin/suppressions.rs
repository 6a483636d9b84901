//! `/api/v1/suppressions` (JSON) and `/api/v1/suppressions.csv` (export and import): the
//! suppression list of one scope, `?namespace=N` for namespace N's, none for the platform's.
//!
//! - `GET` lists (`cursor`, `limit`), or with `address=` answers that address's entry (404 if
//!   it has none);
//! - `POST` adds or replaces one entry: `{"address", "reason"?, "expires"? (RFC 3339)}`, 201;
//! - `DELETE ?address=` removes one (404 if it was not listed);
//! - `GET .csv` exports every entry, `POST .csv` imports a CSV (all rows checked first).
//!
//! A Kubernetes token names its namespace and needs `list`, `create` or `delete` on
//! `suppressions` there ([`super::access::suppressions`]); the platform list is the admin
//! token's. Entries added here record who added them. Owns parameter checks and answers; the
//! list itself is `crate::suppress`'s.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::json;

use super::{AdminState, Principal, access, check, error, internal};
use crate::suppress::core::{self, Entry, Scope, Source};
use crate::suppress::{SuppressError, Suppressions};

/// Largest page of a listing.
const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;
/// Largest import accepted in one request.
pub const MAX_IMPORT_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Default)]
struct Params {
    namespace: Option<String>,
    address: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

fn params(q: Result<Query<Vec<(String, String)>>, QueryRejection>, allowed: &[&str]) -> Result<Params, String> {
    let Query(pairs) = q.map_err(|e| e.body_text())?;
    let mut p = Params::default();
    let mut seen: Vec<String> = Vec::new();
    for (k, v) in pairs {
        if seen.contains(&k) {
            return Err(format!("parameter {k:?} given more than once"));
        }
        if !allowed.contains(&k.as_str()) {
            return Err(format!("unknown parameter {k:?}"));
        }
        seen.push(k.clone());
        let v = v.trim().to_string();
        if v.is_empty() {
            continue;
        }
        match k.as_str() {
            "namespace" => {
                if !access::is_namespace_name(&v) {
                    return Err(format!("namespace {v:?} is not a namespace name"));
                }
                p.namespace = Some(v);
            }
            "address" => p.address = Some(v),
            "cursor" => p.cursor = Some(v),
            "limit" => {
                let n: usize = v.parse().map_err(|_| format!("limit {v:?} is not a number"))?;
                if n == 0 || n > MAX_LIMIT {
                    return Err(format!("limit must be between 1 and {MAX_LIMIT}"));
                }
                p.limit = Some(n);
            }
            _ => {}
        }
    }
    Ok(p)
}

/// The lists and the scope `principal` may `verb` (the response to send otherwise).
async fn scoped(
    st: &AdminState,
    principal: &Principal,
    verb: &'static str,
    namespace: Option<&str>,
) -> Result<(std::sync::Arc<Suppressions>, Scope), Response> {
    let Some(lists) = st.backend.suppressions() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the suppression list needs the Redis queue; this relay runs the in-memory queue",
        ));
    };
    if let Principal::Kubernetes(_) = principal {
        let permission =
            access::suppressions(verb, namespace).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
        check(st, principal, &permission).await?;
    }
    Ok((lists, Scope::of_message(namespace)))
}

fn by(principal: &Principal) -> String {
    match principal {
        Principal::Admin => "admin-token".to_string(),
        Principal::Kubernetes(c) => c.user.username.clone(),
    }
}

fn time_text(ms: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// An entry as the API shows it.
pub fn view(e: &Entry, now_ms: i64) -> serde_json::Value {
    json!({
        "address": e.address,
        "reason": e.reason,
        "source": e.source,
        "added": time_text(e.added_ms),
        "expires": e.expires_ms.and_then(time_text),
        "active": e.active(now_ms),
    })
}

fn failed(what: &str, e: SuppressError) -> Response {
    match e {
        SuppressError::Input(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
        SuppressError::Redis(e) => internal(what, e.into()),
    }
}

fn scope_name(scope: &Scope) -> String {
    match scope {
        Scope::Platform => "platform".into(),
        Scope::Namespace(n) => n.clone(),
    }
}

pub(super) async fn list(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let p = match params(q, &["namespace", "address", "cursor", "limit"]) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let (lists, scope) = match scoped(&st, &principal, "list", p.namespace.as_deref()).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let now = crate::clock::now_ms();
    if let Some(address) = &p.address {
        return match lists.get(&scope, address).await {
            Ok(Some(e)) => axum::Json(view(&e, now)).into_response(),
            Ok(None) => error(StatusCode::NOT_FOUND, format!("{address} is not on {scope}")),
            Err(e) => failed("reading the suppression list", e),
        };
    }
    match lists
        .page(&scope, p.cursor.as_deref(), p.limit.unwrap_or(DEFAULT_LIMIT))
        .await
    {
        Ok(page) => axum::Json(json!({
            "scope": scope_name(&scope),
            "entries": page.entries.iter().map(|e| view(e, now)).collect::<Vec<_>>(),
            "next_cursor": page.cursor,
        }))
        .into_response(),
        Err(e) => failed("reading the suppression list", e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddBody {
    address: String,
    #[serde(default)]
    reason: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    expires: Option<String>,
}

pub(super) async fn add(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    body: Bytes,
) -> Response {
    let p = match params(q, &["namespace"]) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let body: AddBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be JSON {{\"address\", \"reason\"?, \"expires\"?}}: {e}"),
            );
        }
    };
    let (lists, scope) = match scoped(&st, &principal, "create", p.namespace.as_deref()).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let expires_ms = match body.expires.as_deref().map(core::parse_time).transpose() {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let now = crate::clock::now_ms();
    let entry = Entry {
        address: body.address.trim().to_string(),
        reason: body.reason.unwrap_or_else(|| "added by an administrator".into()),
        source: Source::manual(&by(&principal)),
        added_ms: now,
        expires_ms,
    };
    match lists.put(&scope, &entry).await {
        Ok(_) => (StatusCode::CREATED, axum::Json(view(&entry, now))).into_response(),
        Err(e) => failed("writing the suppression list", e),
    }
}

pub(super) async fn remove(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let p = match params(q, &["namespace", "address"]) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let Some(address) = p.address.clone() else {
        return error(StatusCode::BAD_REQUEST, "name the entry: ?address=<address>");
    };
    let (lists, scope) = match scoped(&st, &principal, "delete", p.namespace.as_deref()).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    match lists.remove(&scope, &address).await {
        Ok(true) => axum::Json(json!({ "removed": address, "scope": scope_name(&scope) })).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("{address} is not on {scope}")),
        Err(e) => failed("writing the suppression list", e),
    }
}

pub(super) async fn export(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let p = match params(q, &["namespace"]) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let (lists, scope) = match scoped(&st, &principal, "list", p.namespace.as_deref()).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    match lists.all(&scope).await {
        Ok(entries) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"suppressions.csv\""),
            ],
            core::render_csv(&entries),
        )
            .into_response(),
        Err(e) => failed("reading the suppression list", e),
    }
}

pub(super) async fn import(
    State(st): State<AdminState>,
    Extension(principal): Extension<Principal>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    body: Bytes,
) -> Response {
    let p = match params(q, &["namespace"]) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let (lists, scope) = match scoped(&st, &principal, "create", p.namespace.as_deref()).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let entries = match core::parse_csv(&body, &by(&principal), crate::clock::now_ms()) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match lists.put_all(&scope, &entries).await {
        Ok(n) => axum::Json(json!({ "imported": n, "scope": scope_name(&scope) })).into_response(),
        Err(e) => failed("writing the suppression list", e),
    }
}
