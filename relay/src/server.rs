//! Assembles a running relay from its options: configuration, queue, delivery log, metrics,
//! SMTP listeners, delivery workers, the admin API, the suppression lists' refresher and the
//! periodic housekeeping, and drains it
//! on shutdown. It owns wiring and lifecycle only; every decision lives in the modules it wires.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::admin::AdminState;
use crate::admin::backend::RelayBackend;
use crate::config::{ConfigHandle, Source};
use crate::inbound::identity::IdentitySource;
use crate::inbound::identity_podmap::{PodIdentities, PodIdentityMetrics, Poller};
use crate::inbound::listener::ListenerKind;
use crate::inbound::quota::{MemoryQuotaStore, QuotaEngine, QuotaStore, RedisQuotaStore};
use crate::inbound::session::{Inbound, InboundSettings};
use crate::observe::dlog::DeliveryLog;
use crate::observe::liveness::{Heartbeat, Liveness};
use crate::observe::metrics::Metrics;
use crate::observe::telemetry::Telemetry;
use crate::outbound::delivery::{Deliverer, DelivererConfig, HickoryResolver, MxResolver};
use crate::outbound::oauth2::OAuth2Tokens;
use crate::outbound::pacing::SharedPacing;
use crate::outbound::shaping::{MemoryPaceStore, PaceStore, Pacer, RedisPaceStore};
use crate::outbound::transport::SmtpTransport;
use crate::outbound::worker::{Pacing, Worker, WorkerLiveness, WorkerSettings};
use crate::queue::memory::MemoryQueue;
use crate::queue::redis::{Durability, RedisQueue};
use crate::queue::{Queue, QueueUrl};
use crate::redis_client;

/// Everything the relay needs to start; the CLI fills it from flags and environment.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    pub source: Source,
    /// `memory` or a Redis URL, checked when parsed.
    pub queue: QueueUrl,
    pub redis_prefix: String,
    pub durability: Durability,
    /// The form enqueues write their records in (`queue::record`).
    pub queue_record: crate::queue::record::Form,
    pub smtp_listen: Option<SocketAddr>,
    pub submission_listen: Option<SocketAddr>,
    pub smtps_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub admin_listen: Option<SocketAddr>,
    pub admin_token: Option<String>,
    /// Also accept Kubernetes tokens on `/api/v1`, checked against this API server.
    pub admin_kubernetes: Option<crate::admin::kubernetes::KubernetesAuthConfig>,
    pub inbound: InboundSettings,
    pub workers: usize,
    pub visibility_timeout: Duration,
    pub log_retention: Duration,
    pub config_poll: Duration,
    pub drain_timeout: Duration,
    /// How often the Redis-backed gauges (queue, quotas) are read for `/metrics`.
    pub gauge_refresh: Duration,
    /// A loop of the relay (runtime, delivery loop, config reloader) silent for longer than
    /// this makes `/healthz` answer 503.
    pub liveness_max_silence: Duration,
    /// A delivery job running for longer than this counts as wedged (no attempt with its
    /// timeouts and the retried write of its outcome lasts that long).
    pub job_stuck_after: Duration,
    /// Deliver directly to MX when no route matches (otherwise defer until a route serves it).
    pub fallback_mx: bool,
    pub mx_port: u16,
    pub dns_server: Option<SocketAddr>,
    /// Idle outbound connections are closed (and their connection slots freed) after this.
    pub outbound_idle_timeout: Duration,
    /// Name of this relay as a queue consumer; unique per process.
    pub consumer: String,
    /// Write the delivery log as JSON lines to stdout.
    pub log_stdout: bool,
    /// Read the operator's pod-IP identity map from the queue's Redis this often (None: off).
    pub pod_identity_poll: Option<Duration>,
    /// A killed relay's webhook leases (fan-out, senders) are taken over after this.
    pub webhook_lease_ttl: Duration,
    /// Wait between looks at an empty delivery log or webhook outbox.
    pub webhook_poll: Duration,
    /// How long after a webhook left every relay's configuration its outbox and health hash stay.
    pub webhook_forget_after: Duration,
    /// The suppression lists' mode, auto-added bounce classes and refresh (Redis queue only).
    pub suppression: crate::suppress::Settings,
    /// Longest time a job is held in all (bulk queue control); then its hold lapses.
    pub max_hold: Duration,
    /// How often each relay reads the holds (and mirrors `spec.suspended` into them).
    pub hold_refresh: Duration,
}

impl RelayOptions {
    /// Local defaults: embedded config, memory queue, 127.0.0.1 ports.
    pub fn local() -> Self {
        RelayOptions {
            source: Source::Embedded,
            queue: QueueUrl::memory(),
            redis_prefix: crate::queue::redis::DEFAULT_PREFIX.into(),
            // Used only with replicas to wait for (`--wait-replicas`).
            durability: Durability {
                replicas: 0,
                timeout: Duration::from_secs(1),
            },
            queue_record: crate::queue::record::Form::Compact,
            smtp_listen: Some(SocketAddr::from(([127, 0, 0, 1], 2525))),
            submission_listen: None,
            smtps_listen: None,
            tls_cert: None,
            tls_key: None,
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            admin_token: None,
            admin_kubernetes: None,
            inbound: InboundSettings::default(),
            workers: 64,
            visibility_timeout: Duration::from_secs(300),
            log_retention: humantime::parse_duration(DEFAULT_LOG_RETENTION).expect("a valid constant"),
            config_poll: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(60),
            gauge_refresh: crate::admin::REFRESH_EVERY,
            liveness_max_silence: crate::observe::liveness::DEFAULT_MAX_SILENCE,
            job_stuck_after: Duration::from_secs(3600),
            fallback_mx: false,
            mx_port: 25,
            dns_server: None,
            outbound_idle_timeout: DelivererConfig::default().idle_timeout,
            consumer: default_consumer(),
            log_stdout: true,
            pod_identity_poll: None,
            webhook_lease_ttl: crate::webhook::DEFAULT_LEASE_TTL,
            webhook_poll: crate::webhook::DEFAULT_POLL,
            webhook_forget_after: crate::webhook::DEFAULT_FORGET_AFTER,
            suppression: crate::suppress::Settings::default(),
            max_hold: crate::control::DEFAULT_MAX_HOLD,
            hold_refresh: Duration::from_secs(2),
        }
    }
}

/// How long delivery-log records are kept unless `--log-retention` says otherwise, in the flag's
/// own words (a whole number of days reads better than humantime's months).
pub const DEFAULT_LOG_RETENTION: &str = "31d";

/// `<hostname>-<pid>-<random>`: unique even when a pod restarts with the same name.
pub fn default_consumer() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "relay".into());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &rand[..6])
}

pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<IpNet>()
                .or_else(|_| x.parse::<std::net::IpAddr>().map(IpNet::from))
                .with_context(|| format!("invalid CIDR {x:?}"))
        })
        .collect()
}

/// Counts running sessions so a drain can wait for them.
#[derive(Default)]
pub struct Sessions {
    active: AtomicUsize,
    idle: Notify,
}

struct SessionGuard(Arc<Sessions>);
impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Sessions {
    fn enter(self: &Arc<Self>) -> SessionGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        SessionGuard(self.clone())
    }
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
    async fn wait_idle(&self) {
        loop {
            let n = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            n.await;
        }
    }
}

/// A running relay.
pub struct Relay {
    pub smtp_addr: Option<SocketAddr>,
    pub submission_addr: Option<SocketAddr>,
    pub smtps_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub queue: Arc<dyn Queue>,
    pub config: Arc<ConfigHandle>,
    pub telemetry: Telemetry,
    shutdown: watch::Sender<bool>,
    /// When the workers give back the jobs of deliveries still in flight during a drain.
    give_back: watch::Sender<Option<tokio::time::Instant>>,
    sessions: Arc<Sessions>,
    listeners: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    /// Closed last, freeing the connection slots its idle connections hold.
    deliverer: Deliverer,
    drain_timeout: Duration,
}

/// Components a caller may replace (tests, quota wiring).
#[derive(Default)]
pub struct Overrides {
    pub pacing: Option<Arc<dyn Pacing>>,
    pub resolver: Option<Arc<dyn MxResolver>>,
    pub dlog_writer: Option<Box<dyn std::io::Write + Send>>,
    /// Fetches OAuth2 tokens (default: HTTPS trusting the system's roots).
    pub token_client: Option<mailroute_oauth::TokenClient>,
}

/// The OAuth2 token cache over the relays' shared Redis (none with the memory queue).
fn oauth2_tokens(
    redis: Option<redis_client::RedisConn>,
    prefix: &str,
    client: Option<mailroute_oauth::TokenClient>,
) -> OAuth2Tokens {
    let Some(redis) = redis else {
        return OAuth2Tokens::new(None);
    };
    let client = client.unwrap_or_else(|| {
        mailroute_oauth::TokenClient::with_native_roots().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "OAuth2 token endpoints cannot be verified: routes with auth.oauth2 will defer their mail");
            mailroute_oauth::TokenClient::new(rustls::RootCertStore::empty())
        })
    });
    let cache = mailroute_oauth::TokenCache::new(redis, prefix, client, mailroute_oauth::CacheSettings::default());
    OAuth2Tokens::new(Some(cache))
}

/// First wait for Redis: 1 s, doubling to this.
const REDIS_RETRY_MAX: Duration = Duration::from_secs(30);

/// Connects the queue and a shared connection to Redis, retrying with back-off while Redis is
/// unreachable instead of exiting (an exit would add Kubernetes' crash-loop back-off to the
/// outage). Meanwhile the admin address answers `/healthz` 200 and `/readyz` 503 with the
/// reason, so probes tell "waiting" from "dead". (A malformed URL never gets here: [`QueueUrl`]
/// refuses it when the options are parsed.)
async fn connect_redis(
    opts: &RelayOptions,
    target: &redis_client::Target,
) -> Result<(RedisQueue, redis_client::RedisConn)> {
    let attempt = async || -> Result<(RedisQueue, redis_client::RedisConn)> {
        let q = RedisQueue::connect_to(target, &opts.redis_prefix, opts.durability)
            .await?
            .with_record_form(opts.queue_record);
        let conn = redis_client::RedisConn::connect(target, redis_client::Timeouts::default()).await?;
        Ok((q, conn))
    };
    let mut waiting: Option<(watch::Sender<String>, tokio::task::JoinHandle<()>)> = None;
    let mut delay = Duration::from_secs(1);
    loop {
        match attempt().await {
            Ok(stores) => {
                if let Some((stop, server)) = waiting.take() {
                    drop(stop);
                    let _ = server.await;
                }
                return Ok(stores);
            }
            Err(e) => {
                let reason = format!("waiting for the queue at {}: {e:#}", opts.queue);
                tracing::warn!(retry_in = ?delay, "{reason}");
                match &waiting {
                    Some((tx, _)) => {
                        tx.send_replace(reason);
                    }
                    None => {
                        if let Some(addr) = opts.admin_listen {
                            let l = TcpListener::bind(addr)
                                .await
                                .with_context(|| format!("binding admin on {addr}"))?;
                            let (tx, rx) = watch::channel(reason);
                            waiting = Some((tx, tokio::spawn(crate::admin::serve_starting(l, rx))));
                        }
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(REDIS_RETRY_MAX);
            }
        }
    }
}

impl Relay {
    pub async fn start(opts: RelayOptions) -> Result<Relay> {
        Self::start_with(opts, Overrides::default()).await
    }

    pub async fn start_with(opts: RelayOptions, overrides: Overrides) -> Result<Relay> {
        // Builds that also contain the operator enable a second rustls provider; pick ring
        // explicitly so libraries calling `ClientConfig::builder()` (rediss://) do not panic.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = Arc::new(ConfigHandle::open(opts.source.clone()).context("loading configuration")?);
        for w in &config.get().warnings {
            tracing::warn!(warning = %w, "configuration warning");
        }
        let metrics = Arc::new(Metrics::new());
        if opts.queue.redis().is_none() && opts.pod_identity_poll.is_some() {
            anyhow::bail!("pod identities are read from the operator's map in Redis: they need a Redis --queue");
        }
        let mut pod_identity_conn = None;
        let mut webhook_conn = None;
        type Stores = (
            Arc<dyn Queue>,
            DeliveryLog,
            Arc<dyn QuotaStore>,
            Arc<dyn PaceStore>,
            Option<redis_client::RedisConn>,
        );
        let (queue, dlog, quota_store, pace_store, shared_redis): Stores = if let Some(target) = opts.queue.redis() {
            let (q, conn) = connect_redis(&opts, target).await?;
            pod_identity_conn = Some(conn.clone());
            // Webhooks get a connection of their own: their traffic never queues behind mail's.
            webhook_conn = Some(
                redis_client::RedisConn::connect(target, redis_client::Timeouts::default())
                    .await
                    .context("connecting the webhook dispatcher to Redis")?,
            );
            // The log is the Redis store under the queue's prefix, on the same Redis: the
            // commit stores each message's `received` with its jobs (see `queue::redis`).
            (
                Arc::new(q.storing_log()),
                DeliveryLog::redis(conn.clone(), &opts.redis_prefix),
                Arc::new(RedisQuotaStore::new(conn.clone(), opts.redis_prefix.clone())),
                Arc::new(RedisPaceStore::new(conn.clone(), opts.redis_prefix.clone())),
                Some(conn),
            )
        } else {
            tracing::warn!("using the in-memory queue: NOT durable, queued mail is lost when this process exits");
            (
                Arc::new(MemoryQueue::new()),
                DeliveryLog::memory(crate::observe::dlog::DEFAULT_MEMORY_CAPACITY),
                Arc::new(MemoryQuotaStore::new()),
                Arc::new(MemoryPaceStore::new()),
                None,
            )
        };
        let shared_redis_for_lists = shared_redis.clone();
        let oauth2 = oauth2_tokens(shared_redis, &opts.redis_prefix, overrides.token_client);
        let quotas = QuotaEngine::new(quota_store);
        let dlog = match overrides.dlog_writer {
            Some(w) => dlog.with_writer(w),
            None if opts.log_stdout => dlog,
            None => dlog.without_writer(),
        };
        let dlog = dlog.with_retention(opts.log_retention).with_metrics(metrics.clone());
        let telemetry = Telemetry {
            dlog: dlog.clone(),
            metrics: metrics.clone(),
        };
        let snap = config.get();
        metrics.config_generation.set(snap.generation as i64);
        metrics.set_config_info(&snap.hash);

        let tls = match (&opts.tls_cert, &opts.tls_key) {
            (Some(c), Some(k)) => {
                Some(crate::inbound::listener::server_tls_config(c, k).context("loading TLS certificate")?)
            }
            _ => None,
        };
        if tls.is_none() && (opts.submission_listen.is_some() || opts.smtps_listen.is_some()) {
            anyhow::bail!("the submission and smtps listeners need --tls-cert and --tls-key");
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut background = Vec::new();
        let mut identities: Option<Arc<dyn IdentitySource>> = None;
        if let (Some(every), Some(conn)) = (opts.pod_identity_poll, pod_identity_conn) {
            let m = PodIdentityMetrics::register(metrics.registry()).context("registering the pod identity metrics")?;
            let source = PodIdentities::new(Some(m));
            background.push(tokio::spawn(
                Poller::new(conn, &opts.redis_prefix, source.clone()).run(every, shutdown_rx.clone()),
            ));
            tracing::info!(poll = ?every, "attributing unauthenticated clients by the operator's pod identity map");
            identities = Some(source);
        }
        if let Some(conn) = webhook_conn {
            let m = crate::webhook::WebhookMetrics::register(metrics.registry())
                .context("registering the webhook metrics")?;
            let webhooks = crate::webhook::Webhooks::start(
                conn,
                &opts.redis_prefix,
                opts.consumer.clone(),
                config.clone(),
                m,
                crate::webhook::Timing {
                    lease_ttl: opts.webhook_lease_ttl,
                    poll: opts.webhook_poll,
                    forget_after: opts.webhook_forget_after,
                },
            )
            .await
            .context("creating the webhooks' consumer group on the delivery log")?;
            background.push(tokio::spawn(webhooks.run(shutdown_rx.clone())));
        }
        if opts.queue.redis().is_none() && !config.get().config.webhooks.is_empty() {
            tracing::warn!("DeliveryWebhooks need a Redis --queue: with the in-memory queue no event is sent");
        }
        let suppressions = match &shared_redis_for_lists {
            Some(conn) => {
                let m = crate::suppress::SuppressMetrics::register(metrics.registry())
                    .context("registering the suppression metrics")?;
                let lists = Arc::new(crate::suppress::Suppressions::new(
                    conn.clone(),
                    &opts.redis_prefix,
                    opts.suppression.clone(),
                    m,
                ));
                // Read once before the listeners open; the commit script covers a failure.
                if let Err(e) = lists.refresh(crate::clock::now_ms()).await {
                    tracing::warn!(error = %e, "reading the suppression lists failed; the enqueue checks them until the next read");
                }
                background.push(tokio::spawn(lists.clone().run(shutdown_rx.clone())));
                Some(lists)
            }
            None => None,
        };
        let (give_back, give_back_rx) = watch::channel(None);
        let mut inbound = Inbound::new(
            opts.inbound.clone(),
            config.clone(),
            queue.clone(),
            quotas.clone(),
            Arc::new(telemetry.clone()),
            tls,
        )
        .with_metrics(metrics.clone())
        .with_shutdown(shutdown_rx.clone());
        if let Some(source) = identities {
            inbound = inbound.with_identity(source);
        }
        if let Some(lists) = &suppressions {
            inbound = inbound.with_suppressions(lists.clone());
        }
        let inbound = Arc::new(inbound);

        let sessions = Arc::new(Sessions::default());
        let mut listeners = Vec::new();
        let mut bind = async |addr: Option<SocketAddr>, kind: ListenerKind| -> Result<Option<SocketAddr>> {
            let Some(addr) = addr else { return Ok(None) };
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {} on {addr}", kind.as_str()))?;
            let local = l.local_addr()?;
            tracing::info!(listener = kind.as_str(), addr = %local, "listening");
            listeners.push(tokio::spawn(accept_loop(
                l,
                kind,
                inbound.clone(),
                shutdown_rx.clone(),
                sessions.clone(),
            )));
            Ok(Some(local))
        };
        let smtp_addr = bind(opts.smtp_listen, ListenerKind::Smtp).await?;
        let submission_addr = bind(opts.submission_listen, ListenerKind::Submission).await?;
        let smtps_addr = bind(opts.smtps_listen, ListenerKind::Smtps).await?;

        let resolver: Arc<dyn MxResolver> = match overrides.resolver {
            Some(r) => r,
            None => match opts.dns_server {
                Some(server) => Arc::new(HickoryResolver::with_server(server)?),
                None => Arc::new(HickoryResolver::system()?),
            },
        };
        let deliverer = Deliverer::new(
            DelivererConfig {
                helo_name: opts.inbound.hostname.clone(),
                mx_port: opts.mx_port,
                idle_timeout: opts.outbound_idle_timeout,
                ..Default::default()
            },
            resolver,
        )?;
        let pacer = Pacer::new(pace_store);
        let control = Arc::new(crate::control::Control::new(
            queue.clone(),
            config.clone(),
            telemetry.clone(),
            opts.max_hold,
            opts.fallback_mx,
        ));
        let worker = Arc::new(Worker {
            queue: queue.clone(),
            config: config.clone(),
            transport: Arc::new(
                SmtpTransport::new(deliverer.clone())
                    .with_connection_slots(pacer.clone())
                    .with_oauth2_tokens(oauth2),
            ),
            pacing: overrides.pacing.unwrap_or_else(|| {
                Arc::new(SharedPacing {
                    pacer,
                    metrics: metrics.clone(),
                })
            }),
            telemetry: telemetry.clone(),
            suppress: suppressions.clone(),
            control: control.clone(),
            settings: WorkerSettings {
                consumer: opts.consumer.clone(),
                concurrency: opts.workers,
                visibility_timeout: opts.visibility_timeout,
                hostname: opts.inbound.hostname.clone(),
                fallback_mx: opts.fallback_mx,
                promote_every: Duration::from_millis(250),
                hold_refresh: opts.hold_refresh,
            },
        });
        let backend = Arc::new(RelayBackend {
            queue: queue.clone(),
            config: config.clone(),
            quotas: quotas.clone(),
            metrics: metrics.clone(),
            dlog: dlog.clone(),
            suppress: suppressions.clone(),
            control,
        });
        let liveness = Liveness::default();
        let mut ticker_rx = shutdown_rx.clone();
        listeners.push(tokio::spawn(crate::observe::liveness::runtime_ticker(
            liveness.heartbeat("the async runtime", opts.liveness_max_silence),
            async move {
                let _ = ticker_rx.changed().await;
            },
        )));
        let kubernetes = match opts.admin_kubernetes.clone() {
            Some(cfg) => Some(Arc::new(crate::admin::kubernetes::KubernetesAuth::new(cfg)?)),
            None => None,
        };
        let admin_state = AdminState {
            liveness: liveness.clone(),
            backend,
            dlog: dlog.clone(),
            metrics: metrics.clone(),
            token: opts.admin_token.clone(),
            kubernetes,
        };
        let mut admin_addr = None;
        if let Some(addr) = opts.admin_listen {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin on {addr}"))?;
            admin_addr = Some(l.local_addr()?);
            let mut rx = shutdown_rx.clone();
            let mut refresh_rx = shutdown_rx.clone();
            listeners.push(tokio::spawn(crate::admin::refresh_gauges(
                admin_state.clone(),
                opts.gauge_refresh,
                async move {
                    let _ = refresh_rx.changed().await;
                },
            )));
            listeners.push(tokio::spawn(async move {
                let app = crate::admin::router(admin_state);
                let r = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.changed().await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "admin server failed");
                }
            }));
        }

        let mut workers = Vec::new();
        if opts.workers > 0 {
            let live = WorkerLiveness {
                fetch_loop: liveness.heartbeat("the delivery loop", opts.liveness_max_silence),
                jobs: liveness.heartbeat(
                    format!(
                        "a delivery job running for over {}",
                        humantime::format_duration(opts.job_stuck_after)
                    ),
                    opts.liveness_max_silence,
                ),
                job_stuck_after: opts.job_stuck_after,
            };
            workers.push(tokio::spawn(worker.run(shutdown_rx.clone(), live, give_back_rx)));
        }
        workers.extend([
            tokio::spawn(config_reloader(
                config.clone(),
                metrics.clone(),
                opts.config_poll,
                liveness.heartbeat(
                    "the configuration reloader",
                    opts.liveness_max_silence.max(opts.config_poll * 3),
                ),
                shutdown_rx.clone(),
            )),
            tokio::spawn(dlog_trimmer(dlog.clone(), shutdown_rx.clone())),
            tokio::spawn(queue_housekeeper(
                queue.clone(),
                opts.visibility_timeout,
                shutdown_rx.clone(),
            )),
        ]);
        workers.extend(background);

        Ok(Relay {
            smtp_addr,
            submission_addr,
            smtps_addr,
            admin_addr,
            queue,
            config,
            telemetry,
            shutdown,
            sessions,
            listeners,
            workers,
            deliverer,
            give_back,
            drain_timeout: opts.drain_timeout,
        })
    }

    /// Stops accepting, ends sessions waiting for a command (`421 4.3.2`), lets sessions in DATA
    /// finish, stops the workers after their in-flight deliveries, closes idle outbound
    /// connections (freeing their connection slots for the other relays), and returns.
    ///
    /// The drain timeout bounds the whole drain, not each step: it must end inside the pod's
    /// grace period. What is still running at the deadline is left behind: a session without
    /// its 250 has not handed anything over, and a delivery without its outcome has its job
    /// given back to the queue shortly before the deadline (another relay's next reclaim takes
    /// it; if Redis cannot be told, after the visibility timeout).
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        // Deliveries still running shortly before the deadline give their jobs back, so another
        // relay takes them over at once rather than after the visibility timeout.
        let margin = (self.drain_timeout / 10).min(Duration::from_secs(2));
        let _ = self.give_back.send(Some(deadline - margin));
        let _ = self.shutdown.send(true);
        for l in self.listeners {
            // The admin server waits for its open connections; a keep-alive client must not
            // hold the drain past the deadline.
            let _ = tokio::time::timeout_at(deadline, l).await;
        }
        if tokio::time::timeout_at(deadline, self.sessions.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.sessions.active(),
                "drain timeout: closing remaining sessions"
            );
        }
        for w in self.workers {
            if tokio::time::timeout_at(deadline, w).await.is_err() {
                tracing::warn!("drain timeout: deliveries still in flight keep their jobs queued for another relay");
            }
        }
        let _ = tokio::time::timeout_at(deadline, self.deliverer.close_idle()).await;
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.telemetry.metrics
    }
}

async fn accept_loop(
    l: TcpListener,
    kind: ListenerKind,
    inbound: Arc<Inbound>,
    mut shutdown: watch::Receiver<bool>,
    sessions: Arc<Sessions>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            r = l.accept() => match r {
                Ok((tcp, peer)) => {
                    // A listener on [::] sees IPv4 clients as ::ffff:a.b.c.d; rules are written for a.b.c.d.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    let guard = sessions.enter();
                    let inbound = inbound.clone();
                    tokio::spawn(async move {
                        if let Err(e) = inbound.handle(tcp, peer, kind).await {
                            tracing::debug!(peer = %peer, error = %e, "session ended with an error");
                        }
                        drop(guard);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn config_reloader(
    config: Arc<ConfigHandle>,
    metrics: Arc<Metrics>,
    every: Duration,
    heartbeat: Heartbeat,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        heartbeat.beat();
        let c = config.clone();
        match tokio::task::spawn_blocking(move || c.reload()).await {
            Ok(Ok(Some(snap))) => {
                metrics.config_reloads.with_label_values(&["ok"]).inc();
                metrics.config_generation.set(snap.generation as i64);
                metrics.set_config_info(&snap.hash);
                tracing::info!(generation = snap.generation, hash = %snap.hash, routes = snap.config.routes.len(), "configuration reloaded");
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!(error = %e, "configuration reload failed; keeping the previous configuration");
            }
            Err(e) => tracing::error!(error = %e, "configuration reload task failed"),
        }
    }
}

async fn dlog_trimmer(dlog: DeliveryLog, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        match dlog.trim(crate::clock::now()).await {
            Ok(n) if n > 0 => tracing::info!(removed = n, "delivery log trimmed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "delivery log trim failed"),
        }
    }
}

/// How old an enqueue that was never committed must be before any relay purges it: far beyond
/// the few seconds a relay takes between staging and committing (clock skew included).
const UNCOMMITTED_TTL: Duration = Duration::from_secs(600);

/// Once per visibility timeout (1 s to 1 min): purges enqueues that were never committed and
/// removes the queue consumers of relays that stopped.
async fn queue_housekeeper(queue: Arc<dyn Queue>, visibility_timeout: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(visibility_timeout.clamp(Duration::from_secs(1), Duration::from_secs(60)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let before = crate::clock::now_ms() - UNCOMMITTED_TTL.as_millis() as i64;
        match queue.purge_uncommitted(before, 1000).await {
            Ok(n) if n > 0 => tracing::info!(purged = n, "purged enqueues that were never committed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging uncommitted enqueues failed"),
        }
        match queue.prune_consumers(visibility_timeout).await {
            Ok(n) if n > 0 => tracing::info!(removed = n, "removed queue consumers of stopped relays"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "removing idle queue consumers failed"),
        }
    }
}
