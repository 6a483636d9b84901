//! `mailroute` (also installed as the kubectl plugin `kubectl-mailroute`): the relays' state,
//! their delivery events, and the queue, quota and suppression-list actions of the admin API,
//! from a terminal; and `route test`, which has the operator test a route's upstream now.
//!
//! The relays are reached at `--admin-url`, or without it through the Kubernetes API server's
//! service proxy as the kubeconfig says ([`cluster`] finds the admin Service, [`client`] calls
//! it either way).
//!
//! This crate owns the command line (clap), the calls to the admin API ([`client`]) and how
//! answers are printed ([`output`]: kubectl-like tables, JSON, YAML). It must not reach Redis
//! or the relays' configuration directly: every answer comes from the admin API (or, for
//! `route test`, from the SmtpRoute's status), so the CLI sees exactly what the API allows. It
//! never prints the token.
//!
//! Exit codes, for scripts: 0 done; 1 failed (unreachable, refused, server error, no answer);
//! 2 bad usage; 3 not found; 4 the relay is not ready (`status`); 5 the connection test ran and
//! failed (`route test`).

pub mod client;
pub mod cluster;
pub mod output;
pub mod route;
pub mod suppress;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::Value;

use crate::client::{AdminClient, ClientError};
use crate::cluster::{Cluster, ClusterError, KubeOptions};
use crate::output::Format;

/// What a command's failure means for the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// `route test` got no verdict (the route is not tested, or no operator answered).
    #[error("{0}")]
    NotTested(String),
    /// `route test`: the upstream failed the test.
    #[error("{0}")]
    TestFailed(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Client(ClientError::NotFound(_)) => 3,
            CliError::Client(_) => 1,
            CliError::Usage(_) => 2,
            CliError::NotReady(_) => 4,
            CliError::Cluster(ClusterError::NotFound(_)) => 3,
            CliError::Cluster(_) | CliError::NotTested(_) => 1,
            CliError::TestFailed(_) => 5,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "mailroute",
    version,
    about = "Relay status, delivery events, queue and quota actions of a mailroute relay fleet"
)]
pub struct Cli {
    /// Base URL of the relays' admin API (the `<release>-mailroute-relay-admin` Service, or a
    /// `kubectl port-forward` to it). Without it the relays are reached through the Kubernetes
    /// API server's service proxy, with the kubeconfig's credentials.
    #[arg(long, global = true, env = "MAILROUTE_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace of the relays, for the service proxy (default: the context's namespace).
    #[arg(long, global = true, env = "MAILROUTE_RELAY_NAMESPACE", value_name = "NAMESPACE")]
    pub relay_namespace: Option<String>,
    /// The relays' admin Service, NAME or NAME:PORT (default: the one Service labelled
    /// mailroute.io/port=admin in the relays' namespace, port `admin`).
    #[arg(long, global = true, env = "MAILROUTE_RELAY_SERVICE", value_name = "SERVICE")]
    pub relay_service: Option<String>,
    /// Through the service proxy, present the kubeconfig's own bearer token to the relays
    /// (tenant access, checked by TokenReview and SubjectAccessReview) instead of --token. Off
    /// by default: it hands your Kubernetes credential to the relay.
    #[arg(long, global = true)]
    pub kube_token: bool,
    /// Bearer token of the admin API.
    #[arg(long, global = true, env = "MAILROUTE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (alternative to --token).
    #[arg(long, global = true, env = "MAILROUTE_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Limit for each call to the admin API.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Readiness, queue depth, oldest message, configuration and delivery totals of the relay.
    Status,
    /// Delivery events (received, delivered, deferred, bounced, expired, cancelled).
    Events(EventsArgs),
    /// Queue actions.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// One message's state with its recipients.
    #[command(subcommand)]
    Message(MessageCommand),
    /// Sender quotas.
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// SmtpRoute actions (through the Kubernetes API; the kubeconfig's credentials).
    #[command(subcommand)]
    Route(RouteCommand),
    /// Suppression lists: addresses mail is not sent to (a namespace's, or the platform's).
    #[command(subcommand)]
    Suppress(suppress::SuppressCommand),
    /// Shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events for this recipient.
    #[arg(long)]
    pub recipient: Option<String>,
    /// Only events for this envelope sender.
    #[arg(long)]
    pub sender: Option<String>,
    /// Only events of this result (received, delivered, deferred, bounced, expired, cancelled).
    #[arg(long)]
    pub result: Option<String>,
    /// Only events of this queue id.
    #[arg(long)]
    pub message_id: Option<String>,
    /// Only mail of this sender namespace (`-`: mail no namespace could be attributed to).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Events newer than this: a duration (`1h`) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many events (all pages otherwise).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Keep printing new events as they come.
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Lists queued jobs (one per recipient) by filter, with the count of all that match.
    Ls {
        #[command(flatten)]
        filter: QueueFilterArgs,
        /// At most this many rows (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue after this `id/rcpt` (the previous page's last).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Cancels one message (by id), or every job a filter selects; never everything unless
    /// --all is given.
    Cancel {
        /// A queue id: cancels that message.
        id: Option<String>,
        #[command(flatten)]
        filter: QueueFilterArgs,
        /// Cancel every queued job the filter selects even if it names nothing to narrow it.
        #[arg(long)]
        all: bool,
    },
    /// Makes scheduled (deferred or delayed) jobs ready now.
    Retry {
        #[command(flatten)]
        filter: QueueFilterArgs,
    },
    /// Holds mail through a route, to a recipient domain, or from a sender: not attempted and
    /// not expiring until released or the relays' maximum hold time.
    Hold {
        #[command(flatten)]
        rule: HoldArgs,
        /// Lapse after this long (at most the relays' maximum hold time).
        #[arg(long)]
        max: Option<String>,
    },
    /// Removes a hold; the mail it held becomes ready.
    Release {
        #[command(flatten)]
        rule: HoldArgs,
    },
    /// Lists the holds in force.
    Holds {
        /// Only this namespace's holds (required with a Kubernetes token).
        #[arg(long)]
        namespace: Option<String>,
    },
}

/// Which queued jobs a queue command acts on.
#[derive(Debug, Default, Args)]
pub struct QueueFilterArgs {
    /// Envelope sender (`<>` for bounces).
    #[arg(long)]
    pub sender: Option<String>,
    /// Recipient domain.
    #[arg(long)]
    pub domain: Option<String>,
    /// Route `namespace/name` the mail goes through first (`none`: no route serves it).
    #[arg(long)]
    pub route: Option<String>,
    /// Sender namespace (`-`: unattributed mail); required with a Kubernetes token.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only mail received at least this long ago (`30m`).
    #[arg(long)]
    pub min_age: Option<String>,
    /// Only mail received at most this long ago.
    #[arg(long)]
    pub max_age: Option<String>,
    /// Only jobs in these states: ready, scheduled, in-flight, held (repeatable).
    #[arg(long)]
    pub state: Vec<String>,
}

impl QueueFilterArgs {
    fn query(&self) -> Vec<(String, String)> {
        let mut q = Vec::new();
        for (k, v) in [
            ("sender", &self.sender),
            ("domain", &self.domain),
            ("route", &self.route),
            ("namespace", &self.namespace),
            ("min_age", &self.min_age),
            ("max_age", &self.max_age),
        ] {
            if let Some(v) = v {
                q.push((k.to_string(), v.clone()));
            }
        }
        for s in &self.state {
            q.push(("state".into(), s.clone()));
        }
        q
    }

    /// Whether nothing narrows it (states alone do not).
    fn is_empty(&self) -> bool {
        self.query().iter().all(|(k, _)| k == "state")
    }
}

/// What a hold holds: exactly one of route, domain, sender.
#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "hold_rule")]
pub struct HoldArgs {
    /// Route `namespace/name`.
    #[arg(long, group = "hold_rule")]
    pub route: Option<String>,
    /// Recipient domain.
    #[arg(long, group = "hold_rule")]
    pub domain: Option<String>,
    /// Envelope sender.
    #[arg(long, group = "hold_rule")]
    pub sender: Option<String>,
    /// Only this namespace's mail (required with a Kubernetes token).
    #[arg(long)]
    pub namespace: Option<String>,
}

impl HoldArgs {
    fn query(&self) -> Vec<(String, String)> {
        let mut q = Vec::new();
        for (k, v) in [
            ("route", &self.route),
            ("domain", &self.domain),
            ("sender", &self.sender),
            ("namespace", &self.namespace),
        ] {
            if let Some(v) = v {
                q.push((k.to_string(), v.clone()));
            }
        }
        q
    }
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Has the operator run the route's connection test now and prints the upstream's replies
    /// (greeting, EHLO, STARTTLS, AUTH); exit code 0 passed, 5 failed. Needs patch on
    /// smtproutes.mailroute.io (the edit role).
    Test(RouteTestArgs),
}

#[derive(Debug, Args)]
pub struct RouteTestArgs {
    /// The SmtpRoute's name.
    pub name: String,
    /// The SmtpRoute's namespace (default: the context's namespace).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// How long to wait for the operator's answer.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

#[derive(Debug, Subcommand)]
pub enum MessageCommand {
    /// Shows a message's state.
    Show { id: String },
}

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Lists sender quotas with their usage.
    Ls {
        /// Only the quotas governing this namespace (its own and the platform's that cap it);
        /// required with a Kubernetes token.
        #[arg(long)]
        namespace: Option<String>,
    },
}

/// Parses the process arguments and runs; what `main` of both binaries calls.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // Builds that unify reqwest's rustls without a provider need one installed; ring is the
    // workspace's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout().lock();
    match rt.block_on(run(cli, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs one command, printing to `out`.
pub async fn run(cli: Cli, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "mailroute", out);
        return Ok(());
    }
    if let Command::Route(RouteCommand::Test(args)) = &cli.command {
        return route_test(&cli, args, out).await;
    }
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| CliError::Usage(format!("reading {}: {e}", f.display())))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let client = admin_client(&cli, token).await?;
    let format = cli.output;
    match cli.command {
        Command::Status => status(&client, format, out).await,
        Command::Events(args) => events(&client, &args, format, out).await,
        Command::Queue(QueueCommand::Cancel { id: None, filter, all }) => {
            if filter.is_empty() && !all {
                return Err(CliError::Usage(
                    "cancel needs a message id or a filter (--sender, --domain, --route, --namespace, --min-age, --max-age); --all cancels everything".into(),
                ));
            }
            let mut q = filter.query();
            if all {
                q.push(("all".into(), "true".into()));
            }
            let v = client.post_json("/api/v1/queue/cancel", &q).await?;
            output::print_value(out, format, &v, output::action_text)
        }
        Command::Queue(QueueCommand::Ls { filter, limit, cursor }) => {
            let mut q = filter.query();
            q.push(("limit".into(), limit.to_string()));
            if let Some(c) = cursor {
                q.push(("cursor".into(), c));
            }
            let v = client.get_json("/api/v1/queue", &q).await?;
            output::print_value(out, format, &v, output::queue_table)
        }
        Command::Queue(QueueCommand::Retry { filter }) => {
            let v = client.post_json("/api/v1/queue/retry", &filter.query()).await?;
            output::print_value(out, format, &v, output::action_text)
        }
        Command::Queue(QueueCommand::Hold { rule, max }) => {
            let mut q = rule.query();
            if let Some(m) = max {
                q.push(("max".into(), m));
            }
            let v = client.post_json("/api/v1/queue/hold", &q).await?;
            output::print_value(out, format, &v, output::action_text)
        }
        Command::Queue(QueueCommand::Release { rule }) => {
            let v = client.post_json("/api/v1/queue/release", &rule.query()).await?;
            output::print_value(out, format, &v, output::action_text)
        }
        Command::Queue(QueueCommand::Holds { namespace }) => {
            let q: Vec<(String, String)> = namespace.into_iter().map(|n| ("namespace".to_string(), n)).collect();
            let v = client.get_json("/api/v1/holds", &q).await?;
            output::print_value(out, format, &v, output::holds_table)
        }
        Command::Queue(QueueCommand::Cancel { id: Some(id), .. }) => {
            let v = client
                .delete_json(&format!("/api/v1/messages/{}", path_segment(&id)?))
                .await?;
            output::print_value(out, format, &v, |v| {
                let mut s = format!(
                    "message {} cancelled: {} recipient(s) will not be delivered\n",
                    str_of(&v["id"]),
                    v["recipients"]
                );
                if let Some(note) = v["note"].as_str() {
                    s.push_str(note);
                    s.push('\n');
                }
                s
            })
        }
        Command::Message(MessageCommand::Show { id }) => {
            let v = client
                .get_json(&format!("/api/v1/messages/{}", path_segment(&id)?), &[])
                .await?;
            output::print_value(out, format, &v, output::message_table)
        }
        Command::Quota(QuotaCommand::Ls { namespace }) => {
            let query: Vec<(String, String)> = namespace.into_iter().map(|n| ("namespace".to_string(), n)).collect();
            let v = client.get_json("/api/v1/quotas", &query).await?;
            output::print_value(out, format, &v, output::quota_table)
        }
        Command::Suppress(cmd) => suppress::run(&client, cmd, format, out).await,
        Command::Completion { .. } | Command::Route(_) => Ok(()),
    }
}

/// The admin API at `--admin-url`, else through the service proxy of the kubeconfig's API
/// server.
async fn admin_client(cli: &Cli, token: Option<String>) -> Result<AdminClient, CliError> {
    if let Some(url) = &cli.admin_url {
        if cli.kube_token {
            return Err(CliError::Usage(
                "--kube-token goes with the service proxy; with --admin-url give --token".into(),
            ));
        }
        return Ok(AdminClient::new(url, token, cli.timeout)?);
    }
    let cluster = Cluster::connect(&kube_options(cli), cli.timeout).await?;
    let token = match (token, cli.kube_token) {
        (Some(t), _) => Some(t),
        (None, true) => Some(cluster.token.clone().ok_or_else(|| {
            CliError::Usage(
                "--kube-token: the kubeconfig's user has no bearer token (a client certificate or an exec plugin): give --token"
                    .into(),
            )
        })?),
        (None, false) => None,
    };
    let namespace = cli.relay_namespace.clone().unwrap_or_else(|| cluster.namespace.clone());
    let service = cluster.admin_service(&namespace, cli.relay_service.as_deref()).await?;
    Ok(AdminClient::through_service_proxy(
        cluster.client,
        service,
        token,
        cli.timeout,
    )?)
}

fn kube_options(cli: &Cli) -> KubeOptions {
    KubeOptions {
        kubeconfig: cli.kubeconfig.clone(),
        context: cli.context.clone(),
    }
}

/// `route test`: only the Kubernetes API, never the relays.
async fn route_test(cli: &Cli, args: &RouteTestArgs, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    let cluster = Cluster::connect(&kube_options(cli), cli.timeout).await?;
    let namespace = args.namespace.clone().unwrap_or_else(|| cluster.namespace.clone());
    route::test(&cluster, &namespace, &args.name, args.wait, cli.output, out).await
}

/// Queue ids are what the relay made them; anything else is a typo, not a path to send.
fn path_segment(id: &str) -> Result<&str, CliError> {
    let ok =
        !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id)
    } else {
        Err(CliError::Usage(format!("{id:?} is not a message id")))
    }
}

/// The one place the CLI reads the wall clock.
#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

async fn status(client: &AdminClient, format: Format, out: &mut dyn std::io::Write) -> Result<(), CliError> {
    let ready = client.readiness().await?;
    let metrics = client.get_text("/metrics").await?;
    let summary = output::status_summary(&metrics, &ready);
    output::print_value(out, format, &summary, output::status_table)?;
    match ready {
        Ok(()) => Ok(()),
        Err(reason) => Err(CliError::NotReady(reason)),
    }
}

/// `--since` as the API's `from`: a duration back from now, or a time as given.
fn since_param(since: &str, now: chrono::DateTime<chrono::Utc>) -> Result<String, CliError> {
    if let Ok(d) = humantime::parse_duration(since) {
        let d = chrono::Duration::from_std(d).map_err(|_| CliError::Usage(format!("--since {since}: too long")))?;
        return Ok((now - d).to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
    chrono::DateTime::parse_from_rfc3339(since)
        .map(|t| t.to_rfc3339())
        .map_err(|_| {
            CliError::Usage(format!(
                "--since {since:?}: neither a duration (1h) nor an RFC 3339 time"
            ))
        })
}

async fn events(
    client: &AdminClient,
    args: &EventsArgs,
    format: Format,
    out: &mut dyn std::io::Write,
) -> Result<(), CliError> {
    let mut query: Vec<(String, String)> = Vec::new();
    for (k, v) in [
        ("recipient", &args.recipient),
        ("sender", &args.sender),
        ("result", &args.result),
        ("message_id", &args.message_id),
        ("namespace", &args.namespace),
    ] {
        if let Some(v) = v {
            query.push((k.to_string(), v.clone()));
        }
    }
    if let Some(since) = &args.since {
        query.push(("from".into(), since_param(since, now())?));
    }
    let mut shown = 0usize;
    let mut seen = std::collections::HashSet::new();
    let mut header = true;
    loop {
        let mut cursor: Option<String> = None;
        let mut page_events = Vec::new();
        loop {
            let mut q = query.clone();
            if let Some(c) = &cursor {
                q.push(("cursor".into(), c.clone()));
            }
            let v = client.get_json("/api/v1/events", &q).await?;
            if let Some(list) = v["events"].as_array() {
                page_events.extend(list.iter().cloned());
            }
            cursor = v["next_cursor"].as_str().map(str::to_string);
            let enough = args.limit.is_some_and(|l| shown + page_events.len() >= l);
            if cursor.is_none() || enough {
                break;
            }
        }
        // Following re-reads from the start of the window; print each event once.
        let fresh: Vec<Value> = page_events
            .into_iter()
            .filter(|e| seen.insert(e.to_string()))
            .take(args.limit.map_or(usize::MAX, |l| l.saturating_sub(shown)))
            .collect();
        shown += fresh.len();
        output::print_events(out, format, &fresh, header)?;
        header = false;
        let done = args.limit.is_some_and(|l| shown >= l);
        if !args.follow || done {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let now: chrono::DateTime<chrono::Utc> = "2026-12-05T10:00:00Z".parse().unwrap();
        assert_eq!(since_param("1h", now).unwrap(), "2026-12-05T09:00:00.000Z");
        assert_eq!(
            since_param("2026-12-01T00:00:00+09:00", now).unwrap(),
            "2026-12-01T00:00:00+09:00"
        );
        assert!(matches!(since_param("yesterday", now), Err(CliError::Usage(_))));
    }

    #[test]
    fn ids_that_are_not_queue_ids_never_reach_a_url() {
        assert_eq!(path_segment("0193a7c2-abc_9").unwrap(), "0193a7c2-abc_9");
        for bad in ["", "../quotas", "a b", "x%2Fy", &"a".repeat(129)] {
            assert!(matches!(path_segment(bad), Err(CliError::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn exit_codes_are_stable() {
        assert_eq!(CliError::Client(ClientError::NotFound("x".into())).exit_code(), 3);
        assert_eq!(CliError::NotReady("redis".into()).exit_code(), 4);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::TestFailed("535".into()).exit_code(), 5);
        assert_eq!(CliError::Cluster(ClusterError::NotFound("route".into())).exit_code(), 3);
        assert_eq!(CliError::NotTested("no operator".into()).exit_code(), 1);
        assert_eq!(
            CliError::Client(ClientError::Refused {
                status: 401,
                message: "no".into()
            })
            .exit_code(),
            1
        );
    }
}
