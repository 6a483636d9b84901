//! `mailroute suppress ls|add|rm|import|export`: a suppression list through
//! `/api/v1/suppressions[.csv]`: `--namespace N` for namespace N's list (what a tenant's
//! Kubernetes token needs), none for the platform's. Exit codes as everywhere: `rm` of an
//! address that is not listed, or `ls --address` of one, is 3 (not found).

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::AdminClient;
use crate::output::{self, Format};
use crate::{CliError, now};

#[derive(Debug, Args)]
pub struct Scope {
    /// The namespace's list (default: the platform's, which applies to every namespace).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SuppressCommand {
    /// Lists the entries (all pages), or shows one address's.
    Ls {
        #[command(flatten)]
        scope: Scope,
        /// Only this address (exit code 3 when it is not listed).
        #[arg(long)]
        address: Option<String>,
    },
    /// Adds an address (or replaces its entry).
    Add {
        address: String,
        #[command(flatten)]
        scope: Scope,
        /// Why (shown in listings).
        #[arg(long)]
        reason: Option<String>,
        /// When the entry stops suppressing: a duration from now (`30d`) or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Removes an address (exit code 3 when it was not listed).
    Rm {
        address: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Imports a CSV file (`-`: standard input) with at least an `address` column.
    Import {
        file: PathBuf,
        #[command(flatten)]
        scope: Scope,
    },
    /// Writes the list as CSV to standard output (or `--file`).
    Export {
        #[command(flatten)]
        scope: Scope,
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
}

fn scope_query(scope: &Scope) -> Vec<(String, String)> {
    scope
        .namespace
        .iter()
        .map(|n| ("namespace".to_string(), n.clone()))
        .collect()
}

/// `--expires` as the API's RFC 3339 time.
fn expires_param(s: &str, now: chrono::DateTime<chrono::Utc>) -> Result<String, CliError> {
    if let Ok(d) = humantime::parse_duration(s) {
        let d = chrono::Duration::from_std(d).map_err(|_| CliError::Usage(format!("--expires {s}: too long")))?;
        return Ok((now + d).to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.to_rfc3339())
        .map_err(|_| {
            CliError::Usage(format!(
                "--expires {s:?}: neither a duration (30d) nor an RFC 3339 time"
            ))
        })
}

/// `suppress ls`: one row per entry.
pub fn table(v: &Value) -> String {
    let entries: Vec<&Value> = match v["entries"].as_array() {
        Some(list) => list.iter().collect(),
        None if v["address"].is_string() => vec![v],
        None => Vec::new(),
    };
    if entries.is_empty() {
        return "No entries.\n".into();
    }
    let text = |v: &Value| match v {
        Value::String(s) if !s.is_empty() => s.clone(),
        _ => "-".into(),
    };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let s = &e["source"];
            let source = match (s["kind"].as_str(), s["by"].as_str(), s["message_id"].as_str()) {
                (Some(k), Some(by), _) => format!("{k} ({by})"),
                (Some(k), None, Some(m)) => format!("{k} ({m})"),
                (Some(k), None, None) => k.to_string(),
                _ => "-".into(),
            };
            vec![
                text(&e["address"]),
                text(&e["reason"]),
                source,
                text(&e["added"]),
                text(&e["expires"]),
            ]
        })
        .collect();
    output::table(&["address", "reason", "source", "added", "expires"], &rows, true)
}

pub async fn run(
    client: &AdminClient,
    cmd: SuppressCommand,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    use reqwest::Method;
    match cmd {
        SuppressCommand::Ls { scope, address } => {
            let mut query = scope_query(&scope);
            if let Some(a) = address {
                query.push(("address".into(), a));
                let v = client.get_json("/api/v1/suppressions", &query).await?;
                return output::print_value(out, format, &v, table);
            }
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            let mut name: Value;
            loop {
                let mut q = query.clone();
                q.push(("limit".into(), "1000".into()));
                if let Some(c) = &cursor {
                    q.push(("cursor".into(), c.clone()));
                }
                let v = client.get_json("/api/v1/suppressions", &q).await?;
                name = v["scope"].clone();
                all.extend(v["entries"].as_array().cloned().unwrap_or_default());
                cursor = v["next_cursor"].as_str().map(str::to_string);
                if cursor.is_none() {
                    break;
                }
            }
            all.sort_by(|a, b| a["address"].as_str().cmp(&b["address"].as_str()));
            let v = json!({ "scope": name, "entries": all });
            output::print_value(out, format, &v, table)
        }
        SuppressCommand::Add {
            address,
            scope,
            reason,
            expires,
        } => {
            let mut body = json!({ "address": address });
            if let Some(r) = reason {
                body["reason"] = json!(r);
            }
            if let Some(e) = expires {
                body["expires"] = json!(expires_param(&e, now())?);
            }
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            let v = client
                .request_json(
                    Method::POST,
                    "/api/v1/suppressions",
                    &scope_query(&scope),
                    Some(("application/json", bytes)),
                )
                .await?;
            output::print_value(out, format, &v, |v| {
                format!("{} suppressed\n", v["address"].as_str().unwrap_or(""))
            })
        }
        SuppressCommand::Rm { address, scope } => {
            let mut query = scope_query(&scope);
            query.push(("address".into(), address));
            let v = client
                .request_json(Method::DELETE, "/api/v1/suppressions", &query, None)
                .await?;
            output::print_value(out, format, &v, |v| {
                format!("{} removed\n", v["removed"].as_str().unwrap_or(""))
            })
        }
        SuppressCommand::Import { file, scope } => {
            let mut data = Vec::new();
            let read = if file.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut data)
            } else {
                std::fs::File::open(&file).and_then(|mut f| f.read_to_end(&mut data))
            };
            read.map_err(|e| CliError::Usage(format!("reading {}: {e}", file.display())))?;
            let v = client
                .request_json(
                    Method::POST,
                    "/api/v1/suppressions.csv",
                    &scope_query(&scope),
                    Some(("text/csv", data)),
                )
                .await?;
            output::print_value(out, format, &v, |v| {
                format!(
                    "{} entries imported into {}\n",
                    v["imported"],
                    v["scope"].as_str().unwrap_or("")
                )
            })
        }
        SuppressCommand::Export { scope, file } => {
            let csv = client
                .get_text_query("/api/v1/suppressions.csv", &scope_query(&scope))
                .await?;
            match file {
                Some(f) => std::fs::write(&f, csv.as_bytes())
                    .map_err(|e| CliError::Usage(format!("writing {}: {e}", f.display()))),
                None => out.write_all(csv.as_bytes()).map_err(|e| {
                    CliError::Client(crate::client::ClientError::Unexpected(format!(
                        "writing the output: {e}"
                    )))
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_takes_a_duration_or_a_time() {
        let now: chrono::DateTime<chrono::Utc> = "2026-12-05T10:00:00Z".parse().unwrap();
        assert_eq!(expires_param("1d", now).unwrap(), "2026-12-06T10:00:00.000Z");
        assert_eq!(
            expires_param("2027-01-01T00:00:00Z", now).unwrap(),
            "2027-01-01T00:00:00+00:00"
        );
        assert!(matches!(expires_param("soon", now), Err(CliError::Usage(_))));
    }

    #[test]
    fn entries_print_as_a_table() {
        let v = json!({"scope": "team-a", "entries": [
            {"address": "a@x.example", "reason": "hard bounce", "source": {"kind": "bounce", "message_id": "m1"},
             "added": "2026-12-05T10:00:00.000Z", "expires": null},
            {"address": "b@x.example", "reason": "asked", "source": {"kind": "manual", "by": "admin-token"},
             "added": "2026-12-05T10:00:00.000Z", "expires": "2027-01-01T00:00:00.000Z"}
        ]});
        let t = table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ADDRESS"), "{t}");
        assert!(lines[1].contains("bounce (m1)"), "{t}");
        assert!(
            lines[2].contains("manual (admin-token)") && lines[2].contains("2027-01-01"),
            "{t}"
        );
        assert_eq!(table(&json!({"entries": []})), "No entries.\n");
    }
}
