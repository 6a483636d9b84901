//! `mailroute-relay`: the relay binary. Parses flags (each also read from `MAILROUTE_*`
//! environment variables), starts a [`Relay`], and drains it on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use mailroute_relay::admin::kubernetes::KubernetesAuthConfig;
use mailroute_relay::config::Source;
use mailroute_relay::inbound::auth_guard::AuthLimits;
use mailroute_relay::inbound::session::InboundSettings;
use mailroute_relay::queue::redis::Durability;
use mailroute_relay::server::{Relay, RelayOptions, parse_cidrs};
use mailroute_relay::suppress::Mode;

/// mimalloc instead of glibc's malloc: the relay allocates and frees many small, short-lived
/// buffers per message on two or more threads, where glibc's malloc and free took 8-11% of the
/// relay's CPU; mimalloc's take a third of that (bench/results/2026-12-05-vm-issue18-profile.md
/// has the before and after, and the relay's memory under a backlog: 17 MiB more, constant).
/// Only the binary: the library and its tests keep the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "mailroute-relay", version, about = "mailroute SMTP relay")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Compiled RelayConfig JSON (the operator's ConfigMap, key relay.json); reloaded on change.
    #[arg(long, env = "MAILROUTE_CONFIG")]
    config: Option<PathBuf>,
    /// RelaySecrets JSON (the operator's Secret, key secrets.json); reloaded on change.
    #[arg(long, env = "MAILROUTE_SECRETS")]
    secrets: Option<PathBuf>,
    /// Standalone: SmtpRoute/SenderQuota/Secret YAML files or directories, compiled here.
    #[arg(long, env = "MAILROUTE_ROUTES", value_delimiter = ',')]
    routes: Vec<PathBuf>,
    /// `memory` (not durable), `redis://host:port/db`, `rediss://…`, or a Redis Cluster:
    /// `redis+cluster://host1:port,host2:port` (`rediss+cluster://…`), any nodes as seeds.
    #[arg(long, env = "MAILROUTE_QUEUE", default_value_t = defaults().queue.to_string())]
    queue: String,
    /// Redis key prefix; must contain a hash tag so one message's keys share a slot.
    #[arg(long, env = "MAILROUTE_REDIS_PREFIX", default_value_t = defaults().redis_prefix.clone())]
    redis_prefix: String,
    /// Replicas that must acknowledge a message (Redis WAIT) before it is answered 250.
    #[arg(long, env = "MAILROUTE_WAIT_REPLICAS", default_value_t = defaults().durability.replicas)]
    wait_replicas: u32,
    #[arg(long, env = "MAILROUTE_WAIT_TIMEOUT", default_value_t = defaults().durability.timeout.into())]
    wait_timeout: humantime::Duration,
    /// How enqueues store a message in Redis: `compact` (default), or `json`, the form relays
    /// before the compact record read (set it before rolling back to one; both forms are read).
    #[arg(long, env = "MAILROUTE_QUEUE_RECORD", value_enum, default_value_t = defaults().queue_record)]
    queue_record: mailroute_relay::queue::record::Form,
    /// Plain listener (port 25 style). Empty disables it.
    #[arg(long, env = "MAILROUTE_SMTP_LISTEN", default_value_t = listen(defaults().smtp_listen))]
    smtp_listen: String,
    /// Submission listener (587 style: STARTTLS, then AUTH required). Empty disables it.
    #[arg(long, env = "MAILROUTE_SUBMISSION_LISTEN", default_value_t = listen(defaults().submission_listen))]
    submission_listen: String,
    /// Implicit-TLS listener (465 style, AUTH required). Empty disables it.
    #[arg(long, env = "MAILROUTE_SMTPS_LISTEN", default_value_t = listen(defaults().smtps_listen))]
    smtps_listen: String,
    #[arg(long, env = "MAILROUTE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "MAILROUTE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Sources allowed to relay without AUTH on the plain listener.
    #[arg(long, env = "MAILROUTE_RELAY_CIDRS", default_value_t = cidrs(&defaults().inbound.relay_cidrs))]
    relay_cidrs: String,
    /// Mail whose sender's namespace is unknown: `platformOnly` (only platform routes and
    /// quotas governing every namespace apply) or `refuse` (550 5.7.1 at MAIL FROM).
    #[arg(long, env = "MAILROUTE_UNATTRIBUTED", default_value = "platformOnly")]
    unattributed: mailroute_relay::inbound::identity::Unattributed,
    /// Load balancers (CIDRs) whose connections begin with a PROXY protocol header (v1 or v2)
    /// naming the client; its address then counts for every rule. Empty: no PROXY protocol.
    #[arg(long, env = "MAILROUTE_PROXY_PROTOCOL_FROM", default_value = "")]
    proxy_protocol_from: String,
    /// Admin HTTP listener (/healthz, /readyz, /metrics, /api/v1). Empty disables it.
    #[arg(long, env = "MAILROUTE_ADMIN_LISTEN", default_value_t = listen(defaults().admin_listen))]
    admin_listen: String,
    /// Bearer token for /api/v1 (disabled with 503 when unset).
    #[arg(long, env = "MAILROUTE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Also accept Kubernetes bearer tokens on /api/v1: TokenReview authenticates them and
    /// SubjectAccessReview on `mailroute.io` deliveryevents/messages/quotausages authorizes each
    /// namespace. The API server is the pod's own (in-cluster) unless the flags below say.
    #[arg(long, env = "MAILROUTE_ADMIN_KUBERNETES_AUTH")]
    admin_kubernetes_auth: bool,
    /// `https://host:port` of the API server (default: in-cluster, from KUBERNETES_SERVICE_HOST).
    #[arg(long, env = "MAILROUTE_KUBERNETES_API_SERVER", requires = "admin_kubernetes_auth")]
    kubernetes_api_server: Option<String>,
    /// The relay's own token for TokenReview/SubjectAccessReview (default: the ServiceAccount's).
    #[arg(long, env = "MAILROUTE_KUBERNETES_TOKEN_FILE", requires = "admin_kubernetes_auth")]
    kubernetes_token_file: Option<PathBuf>,
    /// CA of the API server's certificate (default: the ServiceAccount's ca.crt).
    #[arg(long, env = "MAILROUTE_KUBERNETES_CA_FILE", requires = "admin_kubernetes_auth")]
    kubernetes_ca_file: Option<PathBuf>,
    /// How long an authenticated token and an allowed permission are cached.
    #[arg(long, env = "MAILROUTE_ADMIN_KUBERNETES_CACHE_TTL", default_value = "20s")]
    admin_kubernetes_cache_ttl: humantime::Duration,
    /// How long a refused token and a denied permission are cached.
    #[arg(long, env = "MAILROUTE_ADMIN_KUBERNETES_DENY_TTL", default_value = "10s")]
    admin_kubernetes_deny_ttl: humantime::Duration,
    /// Name in the greeting, EHLO and Received headers.
    #[arg(long, env = "MAILROUTE_HOSTNAME")]
    hostname: Option<String>,
    #[arg(long, env = "MAILROUTE_MAX_MESSAGE_SIZE", default_value_t = defaults().inbound.max_message_size)]
    max_message_size: usize,
    #[arg(long, env = "MAILROUTE_MAX_RECIPIENTS", default_value_t = defaults().inbound.max_recipients)]
    max_recipients: usize,
    #[arg(long, env = "MAILROUTE_MAX_SESSIONS_PER_IP", default_value_t = defaults().inbound.max_sessions_per_ip)]
    max_sessions_per_ip: usize,
    /// Bytes of message bodies held in memory at once, over all sessions; a message that does
    /// not fit is refused with 452 4.3.1. Default: 4 × --max-message-size.
    #[arg(long, env = "MAILROUTE_MAX_BODY_MEMORY")]
    max_body_memory: Option<usize>,
    /// SMTP AUTH password checks run at once (about 19 MiB each); more get 454 4.7.0.
    #[arg(long, env = "MAILROUTE_AUTH_CONCURRENCY", default_value_t = auth_concurrency(), value_parser = clap::value_parser!(u16).range(1..))]
    auth_concurrency: u16,
    /// AUTH failures from one client address (IPv6: one /64) before it is locked out; 0: never.
    #[arg(long, env = "MAILROUTE_AUTH_FAILURES_PER_ADDRESS", default_value_t = defaults().inbound.auth_limits.max_failures_per_address)]
    auth_failures_per_address: u32,
    /// How long an address's AUTH failures count (and a lock-out lasts) after its last one.
    #[arg(long, env = "MAILROUTE_AUTH_FAILURE_WINDOW", default_value_t = defaults().inbound.auth_limits.failure_window.into())]
    auth_failure_window: humantime::Duration,
    /// Concurrent deliveries of this process (0: accept only, deliver nothing).
    #[arg(long, env = "MAILROUTE_WORKERS", default_value_t = defaults().workers)]
    workers: usize,
    #[arg(long, env = "MAILROUTE_LOG_RETENTION", default_value = mailroute_relay::server::DEFAULT_LOG_RETENTION)]
    log_retention: humantime::Duration,
    /// A job leased longer than this is taken over by another relay.
    #[arg(long, env = "MAILROUTE_VISIBILITY_TIMEOUT", default_value_t = defaults().visibility_timeout.into())]
    visibility_timeout: humantime::Duration,
    /// Longest time a queued job is held by holds (bulk queue control, `spec.suspended`) in
    /// all; past it the hold lapses for that job and it is attempted, its lifetime extended by
    /// the time it was held.
    #[arg(long, env = "MAILROUTE_MAX_HOLD_TIME", default_value_t = defaults().max_hold.into())]
    max_hold_time: humantime::Duration,
    /// Bounds the whole drain after SIGTERM (sessions, deliveries, idle connections together);
    /// keep it inside the pod's termination grace period.
    #[arg(long, env = "MAILROUTE_DRAIN_TIMEOUT", default_value_t = defaults().drain_timeout.into())]
    drain_timeout: humantime::Duration,
    /// `/healthz` answers 503 when a loop of the relay (runtime, delivery loop, config reload)
    /// has not advanced for this long.
    #[arg(long, env = "MAILROUTE_LIVENESS_MAX_SILENCE", default_value_t = defaults().liveness_max_silence.into())]
    liveness_max_silence: humantime::Duration,
    /// A delivery job running for longer than this counts as wedged for `/healthz` (longer
    /// than an attempt with all its timeouts and the retried write of its outcome).
    #[arg(long, env = "MAILROUTE_JOB_STUCK_AFTER", default_value_t = defaults().job_stuck_after.into())]
    job_stuck_after: humantime::Duration,
    /// Idle outbound connections are closed after this, giving back their `maxConnections` slot.
    #[arg(long, env = "MAILROUTE_OUTBOUND_IDLE_TIMEOUT", default_value_t = defaults().outbound_idle_timeout.into())]
    outbound_idle_timeout: humantime::Duration,
    /// Deliver directly to MX when no route matches (otherwise defer until a route serves it).
    #[arg(long, env = "MAILROUTE_FALLBACK_MX")]
    fallback_mx: bool,
    #[arg(long, env = "MAILROUTE_MX_PORT", default_value_t = defaults().mx_port)]
    mx_port: u16,
    /// DNS server for MX lookups (default: the system's).
    #[arg(long, env = "MAILROUTE_DNS_SERVER")]
    dns_server: Option<SocketAddr>,
    /// Do not write the delivery log to stdout.
    #[arg(long, env = "MAILROUTE_NO_LOG_STDOUT")]
    no_log_stdout: bool,
    /// Attribute unauthenticated clients to a namespace and ServiceAccount by their pod IP, from
    /// the map the operator (`--redis-url`) publishes in the queue's Redis. Needs a Redis queue.
    #[arg(long, env = "MAILROUTE_POD_IDENTITIES")]
    pod_identities: bool,
    /// How often the pod identity map's generation and heartbeat are read.
    #[arg(long, env = "MAILROUTE_POD_IDENTITY_POLL", default_value = "1s")]
    pod_identity_poll: humantime::Duration,
    /// DeliveryWebhooks: a killed relay's webhooks are taken over by another relay after this.
    #[arg(long, env = "MAILROUTE_WEBHOOK_LEASE_TTL", default_value_t = defaults().webhook_lease_ttl.into())]
    webhook_lease_ttl: humantime::Duration,
    /// What a recipient on a suppression list gets: `refuse` (550 5.1.1 at RCPT) or `drop`
    /// (accepted, not delivered, a `suppressed` delivery-log record).
    #[arg(long, env = "MAILROUTE_SUPPRESSED", value_enum, default_value_t = Mode::Refuse)]
    suppressed: Mode,
    /// Bounce classes whose hard bounces add the recipient to the suppression list, comma
    /// separated (empty: none).
    #[arg(long, env = "MAILROUTE_SUPPRESS_BOUNCE_CLASSES", default_value = "invalid_recipient")]
    suppress_bounce_classes: String,
    /// How often the suppression lists' generations are read (a changed list is re-read).
    #[arg(long, env = "MAILROUTE_SUPPRESSION_POLL", default_value = "2s")]
    suppression_poll: humantime::Duration,
}

/// The relay's own defaults ([`RelayOptions::local`]): the flags' defaults, defined once.
fn defaults() -> &'static RelayOptions {
    static DEFAULTS: OnceLock<RelayOptions> = OnceLock::new();
    DEFAULTS.get_or_init(RelayOptions::local)
}

/// A listener address as a flag value (empty: disabled).
fn listen(a: Option<SocketAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_default()
}

fn cidrs(nets: &[IpNet]) -> String {
    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn auth_concurrency() -> u16 {
    u16::try_from(defaults().inbound.auth_limits.concurrency).unwrap_or(u16::MAX)
}

fn addr(s: &str, what: &str) -> Result<Option<SocketAddr>> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .with_context(|| format!("invalid {what} address {s:?}"))
}

fn options(a: RunArgs) -> Result<RelayOptions> {
    let source = match (&a.config, a.routes.is_empty()) {
        (Some(c), true) => Source::Files {
            config: c.clone(),
            secrets: a.secrets.clone(),
        },
        (None, false) => Source::Manifests(a.routes.clone()),
        (None, true) => Source::Embedded,
        (Some(_), false) => anyhow::bail!("use either --config or --routes, not both"),
    };
    let hostname = a
        .hostname
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    let mut o = RelayOptions::local();
    o.source = source;
    o.queue = a.queue.parse()?;
    o.redis_prefix = a.redis_prefix;
    o.durability = Durability {
        replicas: a.wait_replicas,
        timeout: a.wait_timeout.into(),
    };
    o.queue_record = a.queue_record;
    o.smtp_listen = addr(&a.smtp_listen, "smtp listen")?;
    o.submission_listen = addr(&a.submission_listen, "submission listen")?;
    o.smtps_listen = addr(&a.smtps_listen, "smtps listen")?;
    o.tls_cert = a.tls_cert;
    o.tls_key = a.tls_key;
    o.admin_listen = addr(&a.admin_listen, "admin listen")?;
    o.admin_token = a.admin_token.filter(|t| !t.is_empty());
    if a.admin_kubernetes_auth {
        let mut k =
            KubernetesAuthConfig::in_cluster(a.kubernetes_api_server, a.kubernetes_token_file, a.kubernetes_ca_file)?;
        k.allow_ttl = a.admin_kubernetes_cache_ttl.into();
        k.deny_ttl = a.admin_kubernetes_deny_ttl.into();
        o.admin_kubernetes = Some(k);
    }
    o.inbound = InboundSettings {
        hostname,
        max_message_size: a.max_message_size,
        max_recipients: a.max_recipients,
        max_sessions_per_ip: a.max_sessions_per_ip,
        relay_cidrs: parse_cidrs(&a.relay_cidrs)?,
        proxy_protocol_from: parse_cidrs(&a.proxy_protocol_from)?,
        max_body_memory: a.max_body_memory,
        unattributed: a.unattributed,
        auth_limits: AuthLimits {
            concurrency: usize::from(a.auth_concurrency),
            max_failures_per_address: a.auth_failures_per_address,
            failure_window: a.auth_failure_window.into(),
        },
        ..InboundSettings::default()
    };
    o.workers = a.workers;
    o.log_retention = a.log_retention.into();
    o.visibility_timeout = a.visibility_timeout.into();
    o.max_hold = a.max_hold_time.into();
    o.drain_timeout = a.drain_timeout.into();
    o.liveness_max_silence = a.liveness_max_silence.into();
    o.job_stuck_after = a.job_stuck_after.into();
    o.outbound_idle_timeout = a.outbound_idle_timeout.into();
    o.fallback_mx = a.fallback_mx;
    o.mx_port = a.mx_port;
    o.dns_server = a.dns_server;
    o.log_stdout = !a.no_log_stdout;
    o.pod_identity_poll = a.pod_identities.then(|| a.pod_identity_poll.into());
    o.webhook_lease_ttl = a.webhook_lease_ttl.into();
    o.suppression = mailroute_relay::suppress::Settings {
        mode: a.suppressed,
        auto_classes: parse_bounce_classes(&a.suppress_bounce_classes)?,
        poll: a.suppression_poll.into(),
    };
    Ok(o)
}

/// `--suppress-bounce-classes`: names of bounce classes, each checked.
fn parse_bounce_classes(s: &str) -> Result<Vec<String>> {
    use mailroute_relay::outbound::bounce::BounceClass;
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            if BounceClass::ALL.iter().any(|k| k.as_str() == c) {
                Ok(c.to_owned())
            } else {
                let names: Vec<&str> = BounceClass::ALL.iter().map(|k| k.as_str()).collect();
                anyhow::bail!(
                    "--suppress-bounce-classes: unknown class {c:?}; expected {}",
                    names.join(", ")
                )
            }
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MAILROUTE_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let Command::Run(args) = Cli::parse().command;
    let opts = options(args)?;
    let relay = Relay::start(opts).await?;
    tracing::info!(
        smtp = ?relay.smtp_addr, submission = ?relay.submission_addr, smtps = ?relay.smtps_addr,
        admin = ?relay.admin_addr, durable = relay.queue.durable(), "relay started"
    );
    wait_for_signal().await;
    tracing::info!("shutting down: draining sessions and deliveries");
    relay.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(args: &[&str]) -> Result<RelayOptions> {
        let cli = Cli::try_parse_from(["mailroute-relay", "run"].iter().chain(args))?;
        let Command::Run(a) = cli.command;
        options(a)
    }

    #[test]
    fn a_bad_queue_url_is_refused_at_startup_without_its_password() {
        let e = parse(&["--queue", "redis://app:hunter2@redis:notaport"]).expect_err("a bad URL");
        let e = format!("{e:#}");
        assert!(e.contains("the queue URL redis://***@redis:notaport"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = parse(&["--queue", "redis.example:6379"]).expect_err("not a URL");
        assert!(format!("{e:#}").contains("is not a Redis URL"), "{e:#}");
    }

    #[test]
    fn flags_reach_the_relay_options() {
        let o = parse(&[
            "--routes",
            "a.yaml,b.yaml",
            "--queue",
            "redis://127.0.0.1:6379",
            "--visibility-timeout",
            "90s",
            "--outbound-idle-timeout",
            "5s",
            "--wait-replicas",
            "1",
            "--queue-record",
            "json",
            "--admin-listen",
            "",
            "--relay-cidrs",
            "10.0.0.0/8",
            "--max-body-memory",
            "1000000",
            "--auth-concurrency",
            "3",
            "--auth-failures-per-address",
            "7",
            "--auth-failure-window",
            "1h",
        ])
        .unwrap();
        assert!(matches!(&o.source, Source::Manifests(p) if p.len() == 2));
        assert_eq!(o.queue.to_string(), "redis://127.0.0.1:6379");
        assert_eq!(o.visibility_timeout, Duration::from_secs(90));
        assert_eq!(o.outbound_idle_timeout, Duration::from_secs(5));
        assert_eq!(o.durability.replicas, 1);
        assert_eq!(o.queue_record, mailroute_relay::queue::record::Form::Json);
        assert_eq!(o.admin_listen, None);
        assert_eq!(o.inbound.relay_cidrs.len(), 1);
        assert_eq!(o.inbound.body_budget(), 1_000_000);
        assert_eq!(o.inbound.auth_limits.concurrency, 3);
        assert_eq!(o.inbound.auth_limits.max_failures_per_address, 7);
        assert_eq!(o.inbound.auth_limits.failure_window, Duration::from_secs(3600));
        assert_eq!(o.admin_kubernetes, None, "off unless asked for");

        let k = parse(&[
            "--admin-kubernetes-auth",
            "--kubernetes-api-server",
            "https://127.0.0.1:6443",
            "--kubernetes-token-file",
            "/t/token",
            "--kubernetes-ca-file",
            "/t/ca.crt",
            "--admin-kubernetes-cache-ttl",
            "30s",
        ])
        .unwrap()
        .admin_kubernetes
        .unwrap();
        assert_eq!(k.api_server, "https://127.0.0.1:6443");
        assert_eq!(k.token_file, PathBuf::from("/t/token"));
        assert_eq!(k.ca_file, PathBuf::from("/t/ca.crt"));
        assert_eq!(
            (k.allow_ttl, k.deny_ttl),
            (Duration::from_secs(30), Duration::from_secs(10))
        );

        let d = parse(&[]).unwrap();
        assert!(matches!(d.source, Source::Embedded));
        assert_eq!(d.outbound_idle_timeout, Duration::from_secs(30));
        assert_eq!(d.visibility_timeout, Duration::from_secs(300));
        assert_eq!(
            d.inbound.body_budget(),
            4 * 25 * 1024 * 1024,
            "4 × the message size limit"
        );
        assert!(d.queue.is_memory());
        assert_eq!(d.smtp_listen, Some(SocketAddr::from(([127, 0, 0, 1], 2525))));
        assert_eq!(d.admin_listen, Some(SocketAddr::from(([127, 0, 0, 1], 8080))));
        assert_eq!((d.submission_listen, d.smtps_listen), (None, None));
        assert_eq!(d.inbound.relay_cidrs.len(), 2);
        assert_eq!(d.inbound.max_recipients, 100);
        assert_eq!(d.inbound.auth_limits.max_failures_per_address, 20);
        assert_eq!(d.inbound.auth_limits.failure_window, Duration::from_secs(600));
        assert_eq!((d.workers, d.mx_port), (64, 25));
        assert_eq!(d.log_retention, Duration::from_secs(31 * 24 * 3600));
        assert_eq!(d.drain_timeout, Duration::from_secs(60));
        assert_eq!(
            (d.durability.replicas, d.durability.timeout),
            (0, Duration::from_secs(1))
        );
        assert_eq!(d.queue_record, mailroute_relay::queue::record::Form::Compact);
        assert_eq!(d.inbound.auth_limits.concurrency, 2);
    }

    #[test]
    fn suppression_flags() {
        let d = parse(&[]).unwrap().suppression;
        assert_eq!(d.mode, Mode::Refuse);
        assert_eq!(d.auto_classes, ["invalid_recipient"]);
        let o = parse(&[
            "--suppressed",
            "drop",
            "--suppress-bounce-classes",
            "invalid_recipient, mailbox_full",
            "--suppression-poll",
            "100ms",
        ])
        .unwrap()
        .suppression;
        assert_eq!(o.mode, Mode::Drop);
        assert_eq!(o.auto_classes, ["invalid_recipient", "mailbox_full"]);
        assert_eq!(o.poll, Duration::from_millis(100));
        assert!(
            parse(&["--suppress-bounce-classes", ""])
                .unwrap()
                .suppression
                .auto_classes
                .is_empty()
        );
        let e = parse(&["--suppress-bounce-classes", "invalid"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown class"), "{e}");
    }

    #[tokio::test]
    async fn pod_identities_are_off_unless_asked_for_and_need_a_redis_queue() {
        assert_eq!(parse(&[]).unwrap().pod_identity_poll, None);
        let o = parse(&["--pod-identities", "--pod-identity-poll", "250ms"]).unwrap();
        assert_eq!(o.pod_identity_poll, Some(Duration::from_millis(250)));
        let e = Relay::start(o)
            .await
            .err()
            .expect("a memory queue has no pod identity map");
        assert!(e.to_string().contains("need a Redis --queue"), "{e}");
    }

    #[test]
    fn bad_flags_are_refused_with_a_reason() {
        let e = parse(&["--config", "relay.json", "--routes", "a.yaml"]).unwrap_err();
        assert!(e.to_string().contains("either --config or --routes"), "{e}");
        let e = parse(&["--smtp-listen", "nowhere"]).unwrap_err();
        assert!(e.to_string().contains("invalid smtp listen address"), "{e}");
        assert!(parse(&["--outbound-idle-timeout", "soon"]).is_err());
        assert!(parse(&["--auth-concurrency", "0"]).is_err());
        let e = parse(&["--kubernetes-api-server", "https://x:1"]).unwrap_err();
        assert!(e.to_string().contains("--admin-kubernetes-auth"), "{e}");
    }
}
