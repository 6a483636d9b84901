//! `mailroute-operator run`: command-line settings (every flag also read from `MAILROUTE_*`),
//! wiring of client, leader election, health server, watchers and the controller loop, and
//! graceful shutdown on SIGTERM/SIGINT (finish the running reconcile, release the Lease).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::controller::{self, LoopSettings};
use crate::http::{self, Health};
use crate::lease::{self, Elector};
use crate::metrics::Metrics;
use crate::plan::Fleet;
use crate::reconcile::{Reconciler, Settings};
use crate::usage::UsageClient;

const SA_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Flags of `mailroute-operator run`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Fleet name: the outputs are ConfigMap `<fleet>-config` and Secret `<fleet>-secrets`.
    #[arg(long, env = "MAILROUTE_FLEET", default_value = "mailroute")]
    pub fleet: String,
    /// Govern SmtpRoutes and SenderQuotas without the `mailroute.io/fleet` label (objects
    /// labelled for another fleet are never touched). Turn off on all releases but one.
    #[arg(long, env = "MAILROUTE_CLAIM_UNLABELLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub claim_unlabelled: bool,
    /// Namespace of the outputs and the Lease (default: the pod's namespace, else the kubeconfig's).
    #[arg(long, env = "MAILROUTE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespaces to watch for SmtpRoutes and SenderQuotas, comma-separated (default: all).
    #[arg(long, env = "MAILROUTE_WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Platform namespaces, comma-separated: SmtpRoutes and SenderQuotas there may serve other
    /// namespaces (`allowedNamespaces`); anywhere else they govern their own namespace's mail
    /// only. `*`: every namespace is one (single-tenant, as before tenancy). Default: the
    /// operator's namespace.
    #[arg(long, env = "MAILROUTE_PLATFORM_NAMESPACES", value_delimiter = ',')]
    pub platform_namespaces: Vec<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "MAILROUTE_HEALTH_LISTEN", default_value = "0.0.0.0:8081")]
    pub health_listen: String,
    /// Elect a leader with a Lease, so only one replica writes.
    #[arg(long, env = "MAILROUTE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "MAILROUTE_LEASE_NAME", default_value = "mailroute-operator")]
    pub lease_name: String,
    /// How long the Lease holds without renewal.
    #[arg(long, env = "MAILROUTE_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease and in Events (default: POD_NAME, else HOSTNAME).
    #[arg(long, env = "MAILROUTE_IDENTITY")]
    pub identity: Option<String>,
    /// Make the operator's Deployment (in its namespace) the owner of the outputs.
    #[arg(long, env = "MAILROUTE_OWNER_DEPLOYMENT")]
    pub owner_deployment: Option<String>,
    /// Test each route's upstream (connect, TLS, EHLO, AUTH).
    #[arg(long, env = "MAILROUTE_CONNECTION_TESTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub connection_tests: bool,
    /// Re-test unchanged routes this often.
    #[arg(long, env = "MAILROUTE_CONNECTION_TEST_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub connection_test_interval: Duration,
    /// Limit for each step of a connection test.
    #[arg(long, env = "MAILROUTE_CONNECTION_TEST_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub connection_test_timeout: Duration,
    /// Connection tests running at the same time.
    #[arg(long, env = "MAILROUTE_CONNECTION_TEST_CONCURRENCY", default_value_t = 4)]
    pub connection_test_concurrency: usize,
    /// Name sent in EHLO by connection tests.
    #[arg(long, env = "MAILROUTE_HELO_NAME", default_value = "mailroute-operator.local")]
    pub helo_name: String,
    /// The EHLO name the relays greet with (chart value relay.hostname; empty: their pod name).
    /// When given, MX routes say in their `Verified` condition if MX hosts would refuse it.
    #[arg(long, env = "MAILROUTE_RELAY_HOSTNAME")]
    pub relay_hostname: Option<String>,
    /// Base URL of the relays' admin API for quota usage, e.g. http://mailroute-admin:8080.
    #[arg(long, env = "MAILROUTE_RELAY_ADMIN_URL")]
    pub relay_admin_url: Option<String>,
    /// Bearer token for the admin API.
    #[arg(long, env = "MAILROUTE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the bearer token (alternative to --admin-token).
    #[arg(long, env = "MAILROUTE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Full reconcile at least this often (quota usage refresh, repair of hand edits).
    #[arg(long, env = "MAILROUTE_RESYNC_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,
    /// Changes within this window share one reconcile.
    #[arg(long, env = "MAILROUTE_DEBOUNCE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub debounce: Duration,
    /// The relays' Redis (their --queue URL): publish the pod IP → namespace/ServiceAccount map
    /// there, for relays that attribute unauthenticated clients by pod IP, and read the
    /// DeliveryWebhooks' endpoint health for their statuses. Unset: Pods are not watched and
    /// webhook statuses say their health is unknown.
    #[arg(long, env = "MAILROUTE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// The relays' Redis key prefix (their --redis-prefix).
    #[arg(long, env = "MAILROUTE_REDIS_PREFIX", default_value = "{mailroute}:")]
    pub redis_prefix: String,
    /// How often the leader vouches for the pod identity map; relays stop trusting it after
    /// three intervals without a heartbeat.
    #[arg(long, env = "MAILROUTE_POD_IDENTITY_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub pod_identity_interval: Duration,
    /// Log filter when RUST_LOG is unset.
    #[arg(long, env = "MAILROUTE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

fn identity(args: &RunArgs) -> String {
    args.identity
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("mailroute-operator-{}", std::process::id()))
}

fn namespace(args: &RunArgs, client: &Client) -> String {
    args.namespace
        .clone()
        .or_else(|| {
            std::fs::read_to_string(SA_NAMESPACE_FILE)
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string())
}

/// The platform namespaces (`None`: every namespace) from `--platform-namespaces`.
pub fn platform_namespaces(args: &RunArgs, own_namespace: &str) -> Option<std::collections::BTreeSet<String>> {
    let listed: std::collections::BTreeSet<String> = args
        .platform_namespaces
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    if listed.contains("*") {
        None
    } else if listed.is_empty() {
        Some([own_namespace.to_string()].into())
    } else {
        Some(listed)
    }
}

/// The owner reference to the operator's Deployment, which the outputs carry so that deleting
/// the install (`helm uninstall`) lets the garbage collector remove them.
pub async fn owner(client: &Client, namespace: &str, name: &str) -> anyhow::Result<OwnerReference> {
    let d = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .with_context(|| format!("reading Deployment {namespace}/{name} (--owner-deployment)"))?;
    Ok(OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: name.into(),
        uid: d.metadata.uid.context("the Deployment has no uid")?,
        controller: Some(false),
        block_owner_deletion: Some(false),
    })
}

fn usage_client(args: &RunArgs) -> anyhow::Result<Option<UsageClient>> {
    let Some(url) = &args.relay_admin_url else {
        return Ok(None);
    };
    let token = match (&args.admin_token, &args.admin_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the admin token from {}", path.display()))?
            .trim()
            .to_string(),
        (None, None) => {
            // Usage is optional: run without it and say so in the SenderQuota statuses.
            tracing::warn!(
                "--relay-admin-url without --admin-token or --admin-token-file: quota usage is not reported"
            );
            return Ok(None);
        }
    };
    Ok(Some(UsageClient::new(url, token, Duration::from_secs(10))?))
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the operator until SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster service account or KUBECONFIG)")?;
    let namespace = namespace(&args, &client);
    let identity = identity(&args);
    let mut fleet = Fleet::new(args.fleet.clone(), namespace.clone());
    fleet.relay_hostname = args.relay_hostname.clone();
    if let Some(d) = &args.owner_deployment {
        fleet.owner = Some(owner(&client, &namespace, d).await?);
    }
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let (shutdown_tx, shutdown) = watch::channel(false);
    // Listen for SIGTERM from the start: a signal during startup still shuts down cleanly.
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("termination signal received; shutting down");
        shutdown_tx.send_replace(true);
    });
    let (leading_tx, leading) = watch::channel(!args.leader_elect);

    let listener = tokio::net::TcpListener::bind(&args.health_listen)
        .await
        .with_context(|| format!("binding {}", args.health_listen))?;
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
        leading: leading.clone(),
    };
    let mut stop_http = shutdown.clone();
    let http_task = tokio::spawn(http::serve(listener, health, async move {
        let _ = stop_http.wait_for(|s| *s).await;
    }));

    let version = client
        .apiserver_version()
        .await
        .context("the Kubernetes API did not answer")?;
    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        fleet = %fleet.name,
        namespace = %namespace,
        identity = %identity,
        watch_namespaces = ?args.watch_namespaces,
        platform_namespaces = ?platform_namespaces(&args, &namespace),
        api_server = %version.git_version,
        "mailroute operator starting"
    );

    // Without election the sender stays alive (a closed channel would wake the loop forever).
    let mut fixed_leadership = None;
    let elector_task = if args.leader_elect {
        let mut params = lease::Params::new(namespace.clone(), args.lease_name.clone(), identity.clone());
        params.lease_duration = args.lease_duration;
        params.renew_deadline = args.lease_duration.mul_f64(2.0 / 3.0);
        params.retry_period = args.lease_duration / 7;
        let elector = Elector::new(client.clone(), params);
        Some(tokio::spawn(elector.run(leading_tx, shutdown.clone())))
    } else {
        fixed_leadership = Some(leading_tx);
        None
    };
    let leader_metric = {
        let mut leading = leading.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            loop {
                m.set_leading(*leading.borrow_and_update());
                if leading.changed().await.is_err() {
                    break;
                }
            }
        })
    };

    let pod_publisher = args.redis_url.clone().filter(|u| !u.is_empty()).map(|redis_url| {
        let s = crate::podpublish::Settings {
            redis_url,
            prefix: args.redis_prefix.clone(),
            namespaces: args
                .watch_namespaces
                .iter()
                .filter(|n| !n.is_empty())
                .cloned()
                .collect(),
            interval: args.pod_identity_interval.max(Duration::from_millis(100)),
            identity: identity.clone(),
        };
        tokio::spawn(crate::podpublish::run(
            client.clone(),
            s,
            metrics.clone(),
            leading.clone(),
            shutdown.clone(),
        ))
    });
    let settings = Settings {
        fleet,
        namespaces: args
            .watch_namespaces
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect(),
        test_interval: args.connection_tests.then_some(args.connection_test_interval),
        identity: crate::fleets::Identity {
            namespace: namespace.clone(),
            fleet: args.fleet.clone(),
            claim_unlabelled: args.claim_unlabelled,
        },
        rival_window: args.resync_interval * 2,
        instance: identity,
        platform_namespaces: platform_namespaces(&args, &namespace),
    };
    let reconciler = Reconciler::new(client.clone(), settings, usage_client(&args)?, metrics.clone());
    if let Some(url) = args.redis_url.clone().filter(|u| !u.is_empty()) {
        reconciler.read_webhook_health_from(crate::webhooks::HealthReader::new(url, args.redis_prefix.clone()));
    }
    let served = controller::webhooks_served(&client).await;
    if !served {
        tracing::warn!(
            "the API server does not serve DeliveryWebhooks (CRD not installed): webhooks are off until the operator restarts"
        );
    }
    reconciler.set_webhooks_served(served);
    let triggers = controller::triggers(&client, reconciler.clone());
    let loop_settings = LoopSettings {
        debounce: args.debounce,
        resync: args.resync_interval,
        max_concurrent_tests: args.connection_test_concurrency,
        conntest: crate::conntest::Settings {
            helo_name: args.helo_name.clone(),
            timeout: args.connection_test_timeout,
            token_client: match mailroute_oauth::TokenClient::with_native_roots() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "OAuth2 routes cannot be tested");
                    None
                }
            },
        },
    };
    controller::run(reconciler, triggers, loop_settings, leading, shutdown).await;
    if let Some(t) = pod_publisher {
        let _ = t.await;
    }
    if let Some(t) = elector_task {
        let _ = t.await;
    }
    leader_metric.abort();
    drop(fixed_leadership);
    match http_task.await {
        Ok(r) => r.context("health server")?,
        Err(e) => tracing::warn!(error = %e, "health server task failed"),
    }
    tracing::info!("mailroute operator stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(extra: &[&str]) -> RunArgs {
        Cli::parse_from(std::iter::once("mailroute-operator").chain(extra.iter().copied())).run
    }

    #[test]
    fn an_admin_url_without_a_token_runs_without_usage_instead_of_exiting() {
        let a = args(&["--relay-admin-url=http://relay-admin:8080"]);
        assert!(usage_client(&a).unwrap().is_none());
        let a = args(&["--relay-admin-url=http://relay-admin:8080", "--admin-token=t"]);
        assert!(usage_client(&a).unwrap().is_some());
        assert!(usage_client(&args(&[])).unwrap().is_none());
    }

    #[test]
    fn an_empty_relay_hostname_means_the_pod_name_and_absent_means_unknown() {
        // The chart always passes the flag, empty when relay.hostname is unset.
        assert_eq!(args(&["--relay-hostname="]).relay_hostname.as_deref(), Some(""));
        assert_eq!(
            args(&["--relay-hostname=mail.example.com"]).relay_hostname.as_deref(),
            Some("mail.example.com")
        );
        assert_eq!(args(&[]).relay_hostname, None);
    }

    #[test]
    fn platform_namespaces_default_to_the_operators_own_and_star_means_every_namespace() {
        let set = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(platform_namespaces(&args(&[]), "mailroute"), set(&["mailroute"]));
        assert_eq!(
            platform_namespaces(&args(&["--platform-namespaces=mail-platform,compliance"]), "mailroute"),
            set(&["compliance", "mail-platform"])
        );
        assert_eq!(
            platform_namespaces(&args(&["--platform-namespaces=*"]), "mailroute"),
            None
        );
    }
}
