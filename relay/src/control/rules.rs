//! The pure part of bulk queue control: the filter that selects queued jobs (parsed and
//! validated once, from the admin API's query), the states a queued job can be in, and holds
//! (a rule on route, recipient domain or sender, optionally limited to one namespace) with the
//! decision whether a job is held now and until when.
//!
//! Plain data and functions, tested directly. Must not do I/O or read the clock: callers pass
//! every instant.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::admin::access::is_namespace_name;
use crate::queue::message::MessageMeta;

/// Where a queued job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// In the ready stream, no relay working on it.
    Ready,
    /// Waiting for a retry or a start time.
    Scheduled,
    /// A relay is attempting it now (cannot be taken back).
    InFlight,
    /// Held by a hold: not attempted, not expiring, until released or the hold lapses.
    Held,
}

impl JobState {
    pub const ALL: [JobState; 4] = [JobState::Ready, JobState::Scheduled, JobState::InFlight, JobState::Held];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Scheduled => "scheduled",
            JobState::InFlight => "in-flight",
            JobState::Held => "held",
        }
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state {s:?}; expected one of ready, scheduled, in-flight, held"))
    }
}

/// Which mail a namespace selector names: one namespace's, or unattributed mail (`-`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamespaceSel {
    Named(String),
    Unattributed,
}

impl NamespaceSel {
    pub fn matches(&self, ns: Option<&str>) -> bool {
        match self {
            NamespaceSel::Named(n) => ns == Some(n.as_str()),
            NamespaceSel::Unattributed => ns.is_none(),
        }
    }
}

/// Selects queued jobs. Every criterion given must hold; an empty filter selects everything
/// (the API refuses an empty filter for cancel unless `all` is said).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueFilter {
    /// Envelope sender, lowercase; empty = the null sender `<>`.
    pub sender: Option<String>,
    /// Recipient domain, lowercase A-label.
    pub domain: Option<String>,
    /// Route id `namespace/name` (the route the job would go through first), `none` for none.
    pub route: Option<String>,
    pub namespace: Option<NamespaceSel>,
    /// Only messages received at least this long ago.
    pub min_age: Option<Duration>,
    /// Only messages received at most this long ago.
    pub max_age: Option<Duration>,
    /// Only jobs in one of these states (empty: any).
    pub states: Vec<JobState>,
}

/// A filter and the parameters that are not the filter's.
pub type Parsed<'a> = (QueueFilter, Vec<&'a (String, String)>);

/// A bad filter parameter, answered 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError(msg.into()))
}

/// Lowercases an address; `<>` or empty is the null sender.
fn sender_of(v: &str) -> Result<String, FilterError> {
    let v = v.trim().trim_start_matches('<').trim_end_matches('>');
    if v.is_empty() {
        return Ok(String::new());
    }
    if !v.contains('@') || v.chars().any(|c| c.is_whitespace() || c.is_control()) || v.len() > 320 {
        return err(format!(
            "sender {v:?} is not an e-mail address (use <> for the null sender)"
        ));
    }
    Ok(v.to_ascii_lowercase())
}

fn domain_of(v: &str) -> Result<String, FilterError> {
    let v = v.trim().trim_end_matches('.');
    match crate::outbound::route::ascii_domain(v) {
        Some(d) if !d.is_empty() && d.len() <= 253 && !d.contains('@') && !d.contains(char::is_whitespace) => Ok(d),
        _ => err(format!("domain {v:?} is not a domain name")),
    }
}

fn route_of(v: &str) -> Result<String, FilterError> {
    let v = v.trim();
    if v == "none" || v == "mx" {
        return Ok(v.to_owned());
    }
    match v.split_once('/') {
        Some((ns, name))
            if is_namespace_name(ns)
                && !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') =>
        {
            Ok(v.to_owned())
        }
        _ => err(format!("route {v:?} is not namespace/name")),
    }
}

fn namespace_sel(v: &str) -> Result<NamespaceSel, FilterError> {
    match v.trim() {
        "-" => Ok(NamespaceSel::Unattributed),
        n if is_namespace_name(n) => Ok(NamespaceSel::Named(n.to_owned())),
        n => err(format!(
            "namespace {n:?} is not a namespace name (- for unattributed mail)"
        )),
    }
}

fn age_of(k: &str, v: &str) -> Result<Duration, FilterError> {
    humantime::parse_duration(v.trim())
        .or_else(|e| err(format!("{k} {v:?} is not a duration like 90s, 10m or 2h: {e}")))
}

impl QueueFilter {
    /// Parses the filter parameters among `pairs` (`sender, domain, route, namespace, min_age,
    /// max_age, state` (repeatable or comma-separated)); others are left to the caller, which
    /// gets them back. Repeated parameters (but `state`) are errors.
    pub fn parse(pairs: &[(String, String)]) -> Result<Parsed<'_>, FilterError> {
        let mut f = QueueFilter::default();
        let mut seen: Vec<&str> = Vec::new();
        let mut rest = Vec::new();
        for pair in pairs {
            let (k, v) = (pair.0.as_str(), pair.1.as_str());
            let known = ["sender", "domain", "route", "namespace", "min_age", "max_age"].contains(&k);
            if known {
                if seen.contains(&k) {
                    return err(format!("parameter {k:?} given more than once"));
                }
                seen.push(k);
            }
            match k {
                "sender" => f.sender = Some(sender_of(v)?),
                "domain" => f.domain = Some(domain_of(v)?),
                "route" => f.route = Some(route_of(v)?),
                "namespace" => f.namespace = Some(namespace_sel(v)?),
                "min_age" => f.min_age = Some(age_of(k, v)?),
                "max_age" => f.max_age = Some(age_of(k, v)?),
                "state" => {
                    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let s: JobState = s.parse().map_err(FilterError)?;
                        if !f.states.contains(&s) {
                            f.states.push(s);
                        }
                    }
                }
                _ => rest.push(pair),
            }
        }
        if let (Some(min), Some(max)) = (f.min_age, f.max_age)
            && min > max
        {
            return err("min_age must not be greater than max_age");
        }
        Ok((f, rest))
    }

    /// Whether nothing narrows the selection (only the states may be given).
    pub fn selects_everything(&self) -> bool {
        self.sender.is_none()
            && self.domain.is_none()
            && self.route.is_none()
            && self.namespace.is_none()
            && self.min_age.is_none()
            && self.max_age.is_none()
    }

    /// Whether a job with these facts is selected at `now_ms`.
    pub fn matches(&self, j: &JobFacts<'_>, now_ms: i64) -> bool {
        let meta = j.meta;
        if let Some(s) = &self.sender
            && !meta.mail_from.eq_ignore_ascii_case(s)
        {
            return false;
        }
        if let Some(d) = &self.domain
            && j.rcpt_domain != d
        {
            return false;
        }
        if let Some(r) = &self.route
            && j.route.unwrap_or("none") != r
        {
            return false;
        }
        if let Some(n) = &self.namespace
            && !n.matches(meta.namespace.as_deref())
        {
            return false;
        }
        let age = (now_ms - meta.received_at_ms).max(0) as u128;
        if self.min_age.is_some_and(|m| age < m.as_millis()) || self.max_age.is_some_and(|m| age > m.as_millis()) {
            return false;
        }
        self.states.is_empty() || self.states.contains(&j.state)
    }

    /// The filter as query parameters (the CLI sends them; the log notes them).
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        let mut put = |k: &str, val: String| v.push((k.to_owned(), val));
        if let Some(s) = &self.sender {
            put("sender", if s.is_empty() { "<>".into() } else { s.clone() });
        }
        if let Some(d) = &self.domain {
            put("domain", d.clone());
        }
        if let Some(r) = &self.route {
            put("route", r.clone());
        }
        match &self.namespace {
            Some(NamespaceSel::Named(n)) => put("namespace", n.clone()),
            Some(NamespaceSel::Unattributed) => put("namespace", "-".into()),
            None => {}
        }
        if let Some(a) = self.min_age {
            put("min_age", humantime::format_duration(a).to_string());
        }
        if let Some(a) = self.max_age {
            put("max_age", humantime::format_duration(a).to_string());
        }
        if !self.states.is_empty() {
            put(
                "state",
                self.states.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","),
            );
        }
        v
    }
}

/// What a filter or a hold looks at for one job.
#[derive(Clone, Copy, Debug)]
pub struct JobFacts<'a> {
    pub meta: &'a MessageMeta,
    /// The recipient's domain, lowercase A-label.
    pub rcpt_domain: &'a str,
    /// The route the job goes through first (`None`: no route serves it).
    pub route: Option<&'a str>,
    pub state: JobState,
}

/// What a hold holds: mail through a route, to a recipient domain, or from a sender.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldRule {
    Route(String),
    Domain(String),
    Sender(String),
}

impl HoldRule {
    /// From the API's `route`, `domain` or `sender` parameter (exactly one).
    pub fn parse(kind: &str, value: &str) -> Result<HoldRule, FilterError> {
        Ok(match kind {
            "route" => HoldRule::Route(route_of(value)?),
            "domain" => HoldRule::Domain(domain_of(value)?),
            "sender" => HoldRule::Sender(sender_of(value)?),
            other => return err(format!("a hold is by route, domain or sender, not {other:?}")),
        })
    }

    pub fn matches(&self, j: &JobFacts<'_>) -> bool {
        match self {
            HoldRule::Route(r) => j.route == Some(r.as_str()),
            HoldRule::Domain(d) => j.rcpt_domain == d,
            HoldRule::Sender(s) => j.meta.mail_from.eq_ignore_ascii_case(s),
        }
    }

    /// The filter selecting what this rule holds.
    pub fn filter(&self) -> QueueFilter {
        let mut f = QueueFilter::default();
        match self {
            HoldRule::Route(r) => f.route = Some(r.clone()),
            HoldRule::Domain(d) => f.domain = Some(d.clone()),
            HoldRule::Sender(s) => f.sender = Some(s.clone()),
        }
        f
    }
}

impl fmt::Display for HoldRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldRule::Route(r) => write!(f, "route {r}"),
            HoldRule::Domain(d) => write!(f, "domain {d}"),
            HoldRule::Sender(s) if s.is_empty() => write!(f, "sender <>"),
            HoldRule::Sender(s) => write!(f, "sender {s}"),
        }
    }
}

/// Who placed a hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldSource {
    /// The admin API (`queue hold`).
    Admin,
    /// An SmtpRoute with `spec.suspended: true`; released when the spec no longer says so.
    Spec,
}

/// One hold, as stored in Redis (shared by every relay).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub rule: HoldRule,
    /// Only this namespace's mail (a tenant's hold); `None`: every namespace's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Who placed it (the admin principal, or the SmtpRoute).
    pub by: String,
    pub since_ms: i64,
    /// When it lapses by itself (an admin hold: since + its maximum hold time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
    pub source: HoldSource,
}

impl Hold {
    /// The key it is stored under: one hold per rule and namespace scope.
    pub fn key(&self) -> String {
        hold_key(&self.rule, self.namespace.as_deref())
    }

    pub fn active(&self, now_ms: i64) -> bool {
        self.until_ms.is_none_or(|u| now_ms < u)
    }

    pub fn applies(&self, j: &JobFacts<'_>) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|n| j.meta.namespace.as_deref() == Some(n))
            && self.rule.matches(j)
    }
}

pub fn hold_key(rule: &HoldRule, namespace: Option<&str>) -> String {
    let (kind, v) = match rule {
        HoldRule::Route(r) => ("route", r.as_str()),
        HoldRule::Domain(d) => ("domain", d.as_str()),
        HoldRule::Sender(s) => ("sender", s.as_str()),
    };
    format!("{}|{kind}|{v}", namespace.unwrap_or("*"))
}

/// Whether the job is held at `now_ms`, by which hold and until when. `held_since`: when this
/// job's current hold began (`None`: not held yet); `held_ms`: time it was held before. A job is
/// never held for longer than `max_hold` in all: past that the hold lapses for it.
pub fn held_until<'h>(
    holds: &'h [Hold],
    j: &JobFacts<'_>,
    held_since: Option<i64>,
    held_ms: u64,
    max_hold: Duration,
    now_ms: i64,
) -> Option<(&'h Hold, i64)> {
    let start = held_since.unwrap_or(now_ms);
    let cap = start + (max_hold.as_millis() as i64 - held_ms as i64);
    if now_ms >= cap {
        return None;
    }
    holds
        .iter()
        .filter(|h| h.active(now_ms) && h.applies(j))
        .map(|h| (h, h.until_ms.map_or(cap, |u| u.min(cap))))
        .max_by_key(|(_, until)| *until)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn meta(from: &str, ns: Option<&str>, received: i64) -> MessageMeta {
        MessageMeta {
            namespace: ns.map(str::to_owned),
            mail_from: from.into(),
            ..MessageMeta::sample("m", received)
        }
    }

    #[test]
    fn parses_and_validates_once() {
        let p = pairs(&[
            ("sender", "<News@Shop.Example>"),
            ("domain", "Bücher.Example."),
            ("route", "mail/up"),
            ("namespace", "team-a"),
            ("min_age", "1m"),
            ("max_age", "2h"),
            ("state", "ready,held"),
            ("state", "in-flight"),
            ("limit", "5"),
        ]);
        let (f, rest) = QueueFilter::parse(&p).unwrap();
        assert_eq!(f.sender.as_deref(), Some("news@shop.example"));
        assert_eq!(f.domain.as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(f.route.as_deref(), Some("mail/up"));
        assert_eq!(f.namespace, Some(NamespaceSel::Named("team-a".into())));
        assert_eq!(f.min_age, Some(Duration::from_secs(60)));
        assert_eq!(f.states, vec![JobState::Ready, JobState::Held, JobState::InFlight]);
        assert_eq!(rest.len(), 1);
        assert!(!f.selects_everything());
        let again = QueueFilter::parse(&f.to_pairs()).unwrap().0;
        assert_eq!(again, f);
        let (null, _) = QueueFilter::parse(&pairs(&[("sender", "<>"), ("namespace", "-")])).unwrap();
        assert_eq!(null.sender.as_deref(), Some(""));
        assert_eq!(null.namespace, Some(NamespaceSel::Unattributed));
        assert!(
            QueueFilter::parse(&pairs(&[("state", "held")]))
                .unwrap()
                .0
                .selects_everything()
        );
    }

    #[test]
    fn rejects_bad_parameters_with_a_reason() {
        for (list, needle) in [
            (vec![("sender", "not an address")], "not an e-mail address"),
            (vec![("domain", "a b")], "not a domain"),
            (vec![("route", "up")], "namespace/name"),
            (vec![("namespace", "Team")], "not a namespace name"),
            (vec![("min_age", "soon")], "not a duration"),
            (vec![("state", "stuck")], "unknown state"),
            (vec![("sender", "a@b.c"), ("sender", "d@e.f")], "more than once"),
            (vec![("min_age", "2h"), ("max_age", "1h")], "min_age"),
        ] {
            let e = QueueFilter::parse(&pairs(&list)).unwrap_err();
            assert!(e.0.contains(needle), "{list:?}: {e}");
        }
    }

    #[test]
    fn matching_checks_every_criterion() {
        let m = meta("News@shop.example", Some("team-a"), 1_000);
        let j = JobFacts {
            meta: &m,
            rcpt_domain: "d.example",
            route: Some("mail/up"),
            state: JobState::Scheduled,
        };
        let f = |list: &[(&str, &str)]| QueueFilter::parse(&pairs(list)).unwrap().0;
        assert!(f(&[]).matches(&j, 5_000));
        assert!(
            f(&[
                ("sender", "news@shop.example"),
                ("domain", "d.example"),
                ("route", "mail/up")
            ])
            .matches(&j, 5_000)
        );
        assert!(!f(&[("sender", "other@shop.example")]).matches(&j, 5_000));
        assert!(!f(&[("domain", "e.example")]).matches(&j, 5_000));
        assert!(!f(&[("route", "none")]).matches(&j, 5_000));
        assert!(!f(&[("namespace", "-")]).matches(&j, 5_000));
        assert!(f(&[("namespace", "team-a")]).matches(&j, 5_000));
        assert!(f(&[("min_age", "3s")]).matches(&j, 5_000));
        assert!(!f(&[("min_age", "5s")]).matches(&j, 5_000));
        assert!(!f(&[("max_age", "3s")]).matches(&j, 5_000));
        assert!(f(&[("state", "scheduled,held")]).matches(&j, 5_000));
        assert!(!f(&[("state", "ready")]).matches(&j, 5_000));
    }

    #[test]
    fn holds_apply_by_rule_scope_and_time_and_lapse_at_the_maximum() {
        let m = meta("a@b.example", Some("team-a"), 0);
        let j = JobFacts {
            meta: &m,
            rcpt_domain: "d.example",
            route: Some("mail/up"),
            state: JobState::Ready,
        };
        let hold = |rule, ns: Option<&str>, until| Hold {
            rule,
            namespace: ns.map(str::to_owned),
            by: "admin".into(),
            since_ms: 0,
            until_ms: until,
            source: HoldSource::Admin,
        };
        let max = Duration::from_secs(100);
        let domain = hold(HoldRule::Domain("d.example".into()), None, Some(50_000));
        let other_ns = hold(HoldRule::Route("mail/up".into()), Some("team-b"), None);
        let holds = [domain.clone(), other_ns];
        // Held from now until the hold's own end.
        assert_eq!(
            held_until(&holds, &j, None, 0, max, 10_000).map(|(_, u)| u),
            Some(50_000)
        );
        // The hold ended: not held.
        assert!(held_until(&holds, &j, Some(10_000), 0, max, 50_000).is_none());
        // A hold without an end is capped by the job's maximum hold time, counting earlier holds.
        let spec = [hold(HoldRule::Route("mail/up".into()), None, None)];
        assert_eq!(
            held_until(&spec, &j, Some(10_000), 30_000, max, 20_000).map(|(_, u)| u),
            Some(80_000)
        );
        assert!(held_until(&spec, &j, Some(10_000), 30_000, max, 80_000).is_none());
        // Another namespace's hold does not touch this mail.
        assert!(held_until(&holds[1..], &j, None, 0, max, 0).is_none());
        assert_eq!(domain.key(), "*|domain|d.example");
        assert_eq!(HoldRule::parse("sender", "<>").unwrap().to_string(), "sender <>");
        assert!(HoldRule::parse("queue", "x").is_err());
    }
}
