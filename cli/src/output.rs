//! How answers are printed: kubectl-like tables (upper-case headers, columns padded), or the
//! API's JSON / YAML as is. Pure functions from values to text, tested directly; nothing here
//! calls the API.

use std::io::Write;

use serde_json::{Value, json};

use crate::CliError;
use crate::client::ClientError;

/// Output format (`-o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

fn write_err(e: std::io::Error) -> CliError {
    CliError::Client(ClientError::Unexpected(format!("writing the output: {e}")))
}

/// Prints `v` as JSON or YAML, or as the text `table` makes of it.
pub fn print_value(
    out: &mut dyn Write,
    format: Format,
    v: &Value,
    table: impl Fn(&Value) -> String,
) -> Result<(), CliError> {
    let text = match format {
        Format::Table => table(v),
        Format::Json => format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default()),
        Format::Yaml => serde_yaml::to_string(v).unwrap_or_default(),
    };
    out.write_all(text.as_bytes()).map_err(write_err)
}

/// Columns padded to their widest cell, three spaces apart, headers upper-case.
pub fn table(headers: &[&str], rows: &[Vec<String>], with_header: bool) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            s.push_str(c);
            if i < last {
                s.push_str(&" ".repeat(w - c.chars().count() + 3));
            }
        }
        s.push('\n');
        s
    };
    let mut s = String::new();
    if with_header {
        s.push_str(&line(headers.iter().map(|h| h.to_uppercase()).collect()));
    }
    for r in rows {
        s.push_str(&line(r.clone()));
    }
    s
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Events as rows, JSON lines (one event per line, for `--follow` piped into jq) or YAML.
pub fn print_events(out: &mut dyn Write, format: Format, events: &[Value], header: bool) -> Result<(), CliError> {
    let text = match format {
        Format::Table => {
            let rows: Vec<Vec<String>> = events
                .iter()
                .map(|e| {
                    let reply = match (e["reply_code"].as_u64(), e["reply_text"].as_str()) {
                        (Some(c), Some(t)) => format!("{c} {t}"),
                        (Some(c), None) => c.to_string(),
                        _ => "-".into(),
                    };
                    vec![
                        cell(&e["time"]),
                        cell(&e["result"]),
                        cell(&e["namespace"]),
                        cell(&e["message_id"]),
                        cell(&e["envelope_from"]),
                        cell(&e["recipient"]),
                        cell(&e["route"]),
                        reply,
                    ]
                })
                .collect();
            if rows.is_empty() && header {
                "No events.\n".to_string()
            } else {
                table(
                    &[
                        "time",
                        "result",
                        "namespace",
                        "message",
                        "sender",
                        "recipient",
                        "route",
                        "reply",
                    ],
                    &rows,
                    header,
                )
            }
        }
        Format::Json => events.iter().map(|e| format!("{e}\n")).collect(),
        Format::Yaml => {
            if events.is_empty() {
                String::new()
            } else {
                serde_yaml::to_string(&Value::Array(events.to_vec())).unwrap_or_default()
            }
        }
    };
    out.write_all(text.as_bytes()).map_err(write_err)
}

/// `message show`: the message's header lines, then one row per recipient (the API's
/// `MessageView`: `meta`, `cancelled`, `pending`, `recipients` as `[address, state or null]`).
pub fn message_table(v: &Value) -> String {
    let meta = &v["meta"];
    let received = meta["received_at_ms"]
        .as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "-".into(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let sender = meta["mail_from"].as_str().filter(|s| !s.is_empty()).unwrap_or("<>");
    let mut s = format!(
        "message:   {}
sender:    {sender}
received:  {received}
cancelled: {}
pending:   {}

",
        cell(&meta["id"]),
        v["cancelled"] == json!(true),
        cell(&v["pending"])
    );
    let rows: Vec<Vec<String>> = v["recipients"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let state = &r[1];
                    vec![
                        cell(&r[0]),
                        if state.is_null() {
                            "queued".into()
                        } else {
                            cell(&state["status"])
                        },
                        cell(&state["attempts"]),
                        cell(&state["route"]),
                        cell(&state["last_reply"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    s.push_str(&table(
        &["recipient", "status", "attempts", "route", "last reply"],
        &rows,
        true,
    ));
    s
}

/// `quota ls`: one row per quota and period.
pub fn quota_table(v: &Value) -> String {
    let mut rows = Vec::new();
    for q in v["quotas"].as_array().map(Vec::as_slice).unwrap_or_default() {
        for period in ["minute", "hour", "day", "month"] {
            let u = &q["usage"][period];
            if u.is_object() {
                rows.push(vec![
                    cell(&q["id"]),
                    period.to_string(),
                    cell(&u["used"]),
                    cell(&u["limit"]),
                    cell(&u["remaining"]),
                    cell(&u["resetsAt"]),
                ]);
            }
        }
    }
    if rows.is_empty() {
        return "No quotas.\n".into();
    }
    table(
        &["quota", "period", "used", "limit", "remaining", "resets"],
        &rows,
        true,
    )
}

/// `queue ls`: one row per job, then how many match in all.
pub fn queue_table(v: &Value) -> String {
    let items = v["items"].as_array().map(Vec::as_slice).unwrap_or_default();
    let total = v["total"].as_u64().unwrap_or(0);
    if items.is_empty() {
        return format!("No queued jobs match ({total} in all).\n");
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                cell(&i["id"]),
                cell(&i["rcpt"]),
                cell(&i["recipient"]),
                if i["sender"] == "" {
                    "<>".into()
                } else {
                    cell(&i["sender"])
                },
                cell(&i["namespace"]),
                cell(&i["route"]),
                cell(&i["state"]),
                age(i["age_seconds"].as_u64().unwrap_or(0)),
                cell(&i["attempts"]),
            ]
        })
        .collect();
    let mut s = table(
        &[
            "id",
            "rcpt",
            "recipient",
            "sender",
            "namespace",
            "route",
            "state",
            "age",
            "attempts",
        ],
        &rows,
        true,
    );
    s.push_str(&format!("{} of {total} matching job(s) shown", items.len()));
    if let Some(c) = v["next_cursor"].as_str() {
        s.push_str(&format!("; more with --cursor {c}"));
    }
    s.push('\n');
    s
}

/// kubectl's age style: the largest unit or two.
fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d", s / 86400),
    }
}

/// A queue action's answer: what it did, in one line (two with a hold).
pub fn action_text(v: &Value) -> String {
    let touched = v["touched"].as_u64().unwrap_or(0);
    let mut s = match v["action"].as_str().unwrap_or_default() {
        "cancel" => format!("{touched} job(s) cancelled"),
        "retry" => format!("{touched} job(s) made ready now"),
        "hold" => format!("{touched} job(s) held"),
        "release" => format!("{touched} job(s) released"),
        other => format!("{other}: {touched} job(s)"),
    };
    let in_flight = v["in_flight"].as_u64().unwrap_or(0);
    if in_flight > 0 {
        s.push_str(&format!(" ({in_flight} being delivered were left alone)"));
    }
    s.push('\n');
    if v["hold"].is_object() {
        s.push_str(&format!(
            "hold on {} until {}\n",
            rule_text(&v["hold"]["rule"]),
            until_text(&v["hold"]["until_ms"])
        ));
    }
    s
}

fn rule_text(rule: &Value) -> String {
    rule.as_object()
        .and_then(|o| o.iter().next())
        .map(|(k, v)| format!("{k} {}", cell(v)))
        .unwrap_or_else(|| "-".into())
}

fn until_text(ms: &Value) -> String {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "-".into(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// `queue holds`.
pub fn holds_table(v: &Value) -> String {
    let holds = v["holds"].as_array().map(Vec::as_slice).unwrap_or_default();
    if holds.is_empty() {
        return "No holds.\n".into();
    }
    let rows: Vec<Vec<String>> = holds
        .iter()
        .map(|h| {
            vec![
                rule_text(&h["rule"]),
                cell(&h["namespace"]),
                cell(&h["by"]),
                cell(&h["source"]),
                until_text(&h["until_ms"]),
            ]
        })
        .collect();
    table(&["hold", "namespace", "by", "source", "until"], &rows, true)
}

/// The samples of `name` (any labels) in a Prometheus text exposition, summed; `None` when
/// there is none.
fn metric_sum(text: &str, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if let Some((k, want)) = label
            && !labels.split(',').any(|kv| kv == format!("{k}=\"{want}\""))
        {
            continue;
        }
        if let Ok(x) = value.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += x;
        }
    }
    found
}

/// What `status` shows, from `/readyz` and `/metrics`.
pub fn status_summary(metrics: &str, ready: &Result<(), String>) -> Value {
    let n = |name: &str| metric_sum(metrics, name, None).map(|x| x as i64);
    let by = |name: &str, k: &str, v: &str| metric_sum(metrics, name, Some((k, v))).map(|x| x as i64);
    json!({
        "ready": ready.is_ok(),
        "notReadyReason": ready.as_ref().err(),
        "queue": {
            "messages": n("mailroute_queue_messages"),
            "readyJobs": n("mailroute_queue_ready_jobs"),
            "scheduledJobs": n("mailroute_queue_scheduled_jobs"),
            "inflightJobs": n("mailroute_queue_inflight_jobs"),
            "oldestAgeSeconds": metric_sum(metrics, "mailroute_queue_oldest_age_seconds", None),
            "gaugesAgeSeconds": metric_sum(metrics, "mailroute_redis_gauges_age_seconds", None),
        },
        "configGeneration": n("mailroute_config_generation"),
        "totals": {
            "received": n("mailroute_messages_received_total"),
            "delivered": by("mailroute_delivery_attempts_total", "result", "delivered"),
            "bounced": n("mailroute_bounces_total"),
            "expired": n("mailroute_expired_total"),
        },
    })
}

pub fn status_table(v: &Value) -> String {
    let ready = if v["ready"] == json!(true) {
        "yes".to_string()
    } else {
        format!("no ({})", cell(&v["notReadyReason"]))
    };
    let q = &v["queue"];
    let oldest = q["oldestAgeSeconds"].as_f64().map_or_else(
        || "-".into(),
        |s| humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string(),
    );
    let rows = vec![
        vec!["ready".into(), ready],
        vec!["queued messages".into(), cell(&q["messages"])],
        vec![
            "jobs ready / scheduled / in flight".into(),
            format!(
                "{} / {} / {}",
                cell(&q["readyJobs"]),
                cell(&q["scheduledJobs"]),
                cell(&q["inflightJobs"])
            ),
        ],
        vec!["oldest queued".into(), oldest],
        vec!["configuration generation".into(), cell(&v["configGeneration"])],
        vec![
            "received / delivered / bounced / expired (this relay, since start)".into(),
            format!(
                "{} / {} / {} / {}",
                cell(&v["totals"]["received"]),
                cell(&v["totals"]["delivered"]),
                cell(&v["totals"]["bounced"]),
                cell(&v["totals"]["expired"])
            ),
        ],
    ];
    table(&["", ""], &rows, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_like_kubectl() {
        let t = table(
            &["name", "state"],
            &[
                vec!["a".into(), "delivered".into()],
                vec!["longer-id".into(), "-".into()],
            ],
            true,
        );
        assert_eq!(t, "NAME        STATE\na           delivered\nlonger-id   -\n");
        assert_eq!(table(&["x"], &[vec!["1".into()]], false), "1\n");
    }

    #[test]
    fn status_reads_the_exposition() {
        let metrics = "# HELP x\nmailroute_queue_messages 3\nmailroute_queue_ready_jobs 2\n\
            mailroute_delivery_attempts_total{route=\"mail/a\",result=\"delivered\"} 5\n\
            mailroute_delivery_attempts_total{route=\"mail/b\",result=\"delivered\"} 2\n\
            mailroute_delivery_attempts_total{route=\"mail/a\",result=\"deferred\"} 9\n\
            mailroute_queue_oldest_age_seconds 125.5\n";
        let s = status_summary(metrics, &Err("redis unreachable".into()));
        assert_eq!(s["ready"], json!(false));
        assert_eq!(s["queue"]["messages"], json!(3));
        assert_eq!(s["totals"]["delivered"], json!(7));
        assert_eq!(s["totals"]["bounced"], Value::Null);
        let t = status_table(&s);
        assert!(t.contains("no (redis unreachable)"), "{t}");
        assert!(t.contains("2m 5s"), "{t}");
    }

    #[test]
    fn events_print_as_rows_or_json_lines() {
        let e = json!({"time": "2026-12-05T10:00:00Z", "result": "bounced", "message_id": "m1",
            "envelope_from": "", "recipient": "x@example.com", "reply_code": 550, "reply_text": "5.1.1 no such user"});
        let mut out = Vec::new();
        print_events(&mut out, Format::Table, std::slice::from_ref(&e), true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("TIME"), "{text}");
        assert!(text.contains("550 5.1.1 no such user"), "{text}");
        let mut out = Vec::new();
        print_events(&mut out, Format::Json, &[e.clone(), e], false).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 2);
    }
}
