//! `route test NAME`: asks the operator to run a route's connection test now and shows the
//! upstream's own words. The CLI sets a fresh value in the route's `mailroute.io/test-requested`
//! annotation; the operator runs the test at once and writes the record with that value as
//! `status.lastConnectionTest.requestId`; the CLI polls the route until it shows it.
//!
//! This module owns the request, the wait and how a record is shown (pure functions, tested
//! directly); the Kubernetes calls are [`crate::cluster`]'s. It never runs a test itself.

use std::time::Duration;

use mailroute_api::SmtpRoute;
use mailroute_api::status::{ConnectionTest, condition_type};
use serde_json::{Value, json};

use crate::CliError;
use crate::cluster::Cluster;
use crate::output::{self, Format};

/// `result` of a passed test (the operator's `conntest::SUCCEEDED`).
pub const SUCCEEDED: &str = "Succeeded";

/// Between two reads of the route.
const POLL: Duration = Duration::from_millis(500);

/// `Verified` reasons with which the operator does not test the route at all.
const UNTESTED: [&str; 4] = ["Disabled", "NotTested", "NotApplicable", "HeloNameNotQualified"];

/// A request value no earlier request had: the time in nanoseconds and the process id.
pub fn request_id(now: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "{:x}-{:x}",
        now.timestamp_nanos_opt().unwrap_or_default(),
        std::process::id()
    )
}

/// Where a request stands, read from the route.
#[derive(Debug, PartialEq)]
pub enum Progress {
    /// Not answered yet.
    Waiting,
    /// The record that answers it.
    Done(ConnectionTest),
    /// The operator does not test this route (its `Verified` condition says why).
    Untested(String),
}

/// What the route says about request `request`.
pub fn progress(route: &SmtpRoute, request: &str) -> Progress {
    let Some(status) = &route.status else {
        return Progress::Waiting;
    };
    if let Some(t) = &status.last_connection_test
        && t.request_id.as_deref() == Some(request)
    {
        return Progress::Done(t.clone());
    }
    // Only a status of the current spec tells whether the route is tested.
    if status.observed_generation.is_none() || status.observed_generation != route.metadata.generation {
        return Progress::Waiting;
    }
    match status.conditions.iter().find(|c| c.type_ == condition_type::VERIFIED) {
        Some(c) if UNTESTED.contains(&c.reason.as_str()) => Progress::Untested(format!("{}: {}", c.reason, c.message)),
        _ => Progress::Waiting,
    }
}

/// The record as `-o json|yaml` shows it: the route, its upstream and the record's fields.
pub fn record_value(route_id: &str, upstream: &str, t: &ConnectionTest) -> Value {
    let mut v = json!({"route": route_id, "upstream": upstream});
    if let (Value::Object(out), Ok(Value::Object(fields))) = (&mut v, serde_json::to_value(t)) {
        out.extend(fields);
    }
    v
}

/// The record as text: a summary line, then the upstream's replies step by step, the failing
/// step last.
pub fn record_table(route_id: &str, upstream: &str, t: &ConnectionTest) -> String {
    let verdict = if t.result == SUCCEEDED {
        "passed".to_string()
    } else {
        format!("FAILED at {}", t.step.as_deref().unwrap_or("connect"))
    };
    let mut s = format!(
        "SmtpRoute {route_id}: connection test of {upstream} {verdict} ({})\n",
        t.time
    );
    let mut rows: Vec<Vec<String>> = t
        .replies
        .iter()
        .map(|r| vec![r.step.clone(), r.reply.clone()])
        .collect();
    if t.result != SUCCEEDED {
        let step = t.step.clone().unwrap_or_else(|| "connect".into());
        let words = match (&t.reply, &t.error) {
            (Some(reply), _) => reply.clone(),
            (None, Some(e)) => format!("(no reply) {e}"),
            (None, None) => "(no reply)".into(),
        };
        rows.push(vec![step, words]);
    }
    if let Some(m) = &t.test_message {
        rows.push(vec!["message".into(), m.clone()]);
    }
    s.push_str(&output::table(&["step", "upstream reply"], &rows, true));
    s
}

/// Runs `route test`: annotates, waits up to `wait`, prints the record; a failed test is
/// [`CliError::TestFailed`].
pub async fn test(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    wait: Duration,
    format: Format,
    out: &mut dyn std::io::Write,
) -> Result<(), CliError> {
    crate::cluster::check_namespace(namespace)?;
    let request = request_id(crate::now());
    cluster.request_test(namespace, name, &request).await?;
    let deadline = tokio::time::Instant::now() + wait;
    let route_id = format!("{namespace}/{name}");
    let record = loop {
        let route = cluster.route(namespace, name).await?;
        match progress(&route, &request) {
            Progress::Done(t) => break (t, route),
            Progress::Untested(why) => {
                return Err(CliError::NotTested(format!(
                    "the operator does not test SmtpRoute {route_id}: {why}"
                )));
            }
            Progress::Waiting => {}
        }
        if tokio::time::Instant::now() >= deadline {
            let verified = route
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition_type::VERIFIED))
                .map_or_else(|| "no Verified condition".to_string(), |c| c.message.clone());
            return Err(CliError::NotTested(format!(
                "no answer from the operator within {} for SmtpRoute {route_id} (is an operator running that \
                 governs it?); its Verified condition: {verified}",
                humantime::format_duration(wait)
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    let (t, route) = record;
    let upstream = match route.status.as_ref().map(|s| (&s.host, s.port)) {
        Some((Some(h), Some(p))) => format!("{h}:{p}"),
        Some((Some(h), None)) => h.clone(),
        _ => "its upstream".into(),
    };
    let v = record_value(&route_id, &upstream, &t);
    output::print_value(out, format, &v, |_| record_table(&route_id, &upstream, &t))?;
    if t.result == SUCCEEDED {
        Ok(())
    } else {
        let detail = t.reply.as_deref().or(t.error.as_deref()).unwrap_or("no reply");
        Err(CliError::TestFailed(format!(
            "the connection test of SmtpRoute {route_id} failed at {}: {detail}",
            t.step.as_deref().unwrap_or("connect")
        )))
    }
}

#[cfg(test)]
mod tests {
    use mailroute_api::status::StepReply;

    use super::*;

    fn route(yaml_status: Value, generation: i64) -> SmtpRoute {
        serde_json::from_value(json!({
            "apiVersion": "mailroute.io/v1alpha1",
            "kind": "SmtpRoute",
            "metadata": {"name": "up", "namespace": "mail", "generation": generation},
            "spec": {"host": "127.0.0.1"},
            "status": yaml_status,
        }))
        .unwrap()
    }

    fn verified(reason: &str) -> Value {
        json!({"type": "Verified", "status": "Unknown", "reason": reason, "message": "why",
               "lastTransitionTime": "2026-12-05T08:00:00Z", "observedGeneration": 2})
    }

    fn record(result: &str, request: Option<&str>) -> ConnectionTest {
        ConnectionTest {
            time: "2026-12-05T08:00:00Z".into(),
            result: result.into(),
            step: (result != SUCCEEDED).then(|| "auth".into()),
            reply: (result != SUCCEEDED).then(|| "535 5.7.8 Username and password not accepted.".into()),
            error: None,
            fingerprint: Some("fp".into()),
            test_message: None,
            request_id: request.map(String::from),
            replies: vec![
                StepReply {
                    step: "greeting".into(),
                    reply: "220 mx.example.net ESMTP".into(),
                },
                StepReply {
                    step: "ehlo".into(),
                    reply: "250 mx.example.net AUTH PLAIN".into(),
                },
            ],
        }
    }

    #[test]
    fn the_request_is_done_when_the_status_answers_it() {
        let answered = record(SUCCEEDED, Some("n1"));
        let r = route(json!({"lastConnectionTest": answered, "observedGeneration": 2}), 2);
        assert_eq!(progress(&r, "n1"), Progress::Done(answered));
        assert_eq!(progress(&r, "n2"), Progress::Waiting, "an older answer");
        assert_eq!(progress(&route(Value::Null, 1), "n1"), Progress::Waiting);
    }

    #[test]
    fn a_route_the_operator_does_not_test_ends_the_wait_at_once() {
        for reason in UNTESTED {
            let r = route(json!({"conditions": [verified(reason)], "observedGeneration": 2}), 2);
            assert_eq!(progress(&r, "n1"), Progress::Untested(format!("{reason}: why")));
        }
        // A status of an older spec says nothing yet; a pending test is no verdict.
        let stale = route(
            json!({"conditions": [verified("Disabled")], "observedGeneration": 1}),
            2,
        );
        assert_eq!(progress(&stale, "n1"), Progress::Waiting);
        let pending = route(json!({"conditions": [verified("Pending")], "observedGeneration": 2}), 2);
        assert_eq!(progress(&pending, "n1"), Progress::Waiting);
    }

    #[test]
    fn the_table_shows_the_upstreams_words_with_the_failing_step_last() {
        let failed = record("Failed", Some("n1"));
        let text = record_table("mail/up", "127.0.0.1:2525", &failed);
        assert_eq!(
            text,
            "SmtpRoute mail/up: connection test of 127.0.0.1:2525 FAILED at auth (2026-12-05T08:00:00Z)\n\
             STEP       UPSTREAM REPLY\n\
             greeting   220 mx.example.net ESMTP\n\
             ehlo       250 mx.example.net AUTH PLAIN\n\
             auth       535 5.7.8 Username and password not accepted.\n"
        );
        let mut refused = record("Failed", Some("n1"));
        refused.replies.clear();
        refused.step = Some("connect".into());
        refused.reply = None;
        refused.error = Some("Connection refused (os error 111)".into());
        assert!(
            record_table("mail/up", "x:1", &refused)
                .ends_with("connect   (no reply) Connection refused (os error 111)\n")
        );
        let passed = record(SUCCEEDED, Some("n1"));
        assert!(
            record_table("mail/up", "x:1", &passed).starts_with("SmtpRoute mail/up: connection test of x:1 passed")
        );
        let v = record_value("mail/up", "x:1", &passed);
        assert_eq!(v["route"], "mail/up");
        assert_eq!(v["requestId"], "n1");
        assert_eq!(v["replies"][0]["reply"], "220 mx.example.net ESMTP");
    }

    #[test]
    fn request_ids_differ_in_time() {
        let t: chrono::DateTime<chrono::Utc> = "2026-12-05T10:00:00Z".parse().unwrap();
        assert_ne!(request_id(t), request_id(t + chrono::Duration::nanoseconds(1)));
    }
}
