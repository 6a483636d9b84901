//! A real Kubernetes control plane for tests: owns starting etcd, kube-apiserver and
//! kube-controller-manager on loopback (one set per test process, shared), their PKI, the admin
//! kubeconfig, ServiceAccount kubeconfigs (TokenRequest) and a fresh namespace per test, and
//! making sure none of those processes outlives the test process.
//!
//! The binaries come from `scripts/k8s-control-plane.sh build` (cached by version; built when
//! missing, never skipped). `MAILROUTE_K8S_VERSION=oldest` runs the oldest Kubernetes minor the
//! chart claims instead of the latest: only its kube-apiserver is built, so it runs without a
//! controller manager ([`ControlPlane::controller_manager`] is false). The API server runs with RBAC authorization and a service-account
//! issuer with its signing key, so TokenRequest, TokenReview and SubjectAccessReview work; there
//! is no kubelet, so Pods are accepted but never run. The controller manager runs only the
//! garbage collector, the namespace, service-account and ClusterRole-aggregation controllers.
//!
//! Lifetime: every child process is spawned from one thread that lives as long as the process,
//! with `PR_SET_PDEATHSIG` = SIGKILL, so the kernel kills them whenever the test process ends,
//! however it ends; on a normal exit an `atexit` hook also kills them and removes the scratch
//! directory. Scratch directories of dead test processes are swept at start.

use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// How long the control plane may take to become ready (a cold start on 2 busy cores).
const START_DEADLINE: Duration = Duration::from_secs(180);
/// Polling interval while waiting for readiness.
const POLL: Duration = Duration::from_millis(100);
/// The service-account issuer the API server signs tokens for.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The running control plane shared by all tests of one test binary.
#[derive(Debug)]
pub struct ControlPlane {
    /// `https://127.0.0.1:<port>` of kube-apiserver.
    pub server: String,
    /// PEM of the CA that signed the serving and client certificates.
    pub ca_pem: String,
    /// Kubeconfig of a `system:masters` user.
    pub admin_kubeconfig: PathBuf,
    /// Where kubectl, helm and the control-plane binaries are.
    pub bin_dir: PathBuf,
    /// Scratch directory of this control plane (logs, data, kubeconfigs).
    pub dir: PathBuf,
    /// The API server's `gitVersion` (e.g. `v1.37.2`).
    pub version: String,
    /// Whether kube-controller-manager runs (garbage collector, namespace controller, ...).
    pub controller_manager: bool,
}

/// Children to kill at exit, and the scratch directory to remove.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
static NAMESPACES: AtomicU32 = AtomicU32::new(0);

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// The spawner thread: parent-death signals fire when the *thread* that forked the child ends, so
/// every child is forked from this one thread, which never ends before the process does.
#[allow(unsafe_code)]
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("k8s-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the spawner thread");
        // SAFETY: `cleanup_at_exit` is a plain extern "C" fn without unwinding.
        unsafe { libc::atexit(cleanup_at_exit) };
        Mutex::new(tx)
    })
}

#[allow(unsafe_code)]
extern "C" fn cleanup_at_exit() {
    let pids = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    for pid in &pids {
        // SAFETY: plain syscalls on pids we spawned (SIGKILL of an exited pid is harmless: the
        // pid is not reaped yet, since nobody waits for these children but us).
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    for pid in &pids {
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(*pid as i32, std::ptr::null_mut(), 0) };
    }
    if let Some(dir) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Spawns `cmd` so that it dies with the test process. The child is killed at exit unless the
/// caller kills it first (see [`Process`]).
#[allow(unsafe_code)]
pub fn spawn(mut cmd: Command) -> io::Result<Child> {
    // SAFETY: getpid before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls (prctl, getppid, raise) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died before prctl: nobody would kill us later.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| io::Error::other("spawner lock poisoned"))?
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    let child = rx.recv().map_err(|_| io::Error::other("spawner thread is gone"))??;
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(child.id());
    }
    Ok(child)
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Process {
    /// Spawns `cmd` with stdout and stderr going to `log`.
    pub fn start(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = spawn(cmd).with_context(|| format!("starting {name}"))?;
        Ok(Self {
            child,
            name: name.to_string(),
            log,
        })
    }

    /// The log so far (for assertions and failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.log_tail(40));
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; the OS does not hand it out again soon).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` distinct free ports (all held until all are chosen).
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Which Kubernetes the tests run against: `MAILROUTE_K8S_VERSION` (`latest`, the default, or
/// `oldest`, the oldest minor the chart claims).
pub fn version_choice() -> anyhow::Result<String> {
    match std::env::var("MAILROUTE_K8S_VERSION") {
        Err(std::env::VarError::NotPresent) => Ok("latest".into()),
        Ok(v) if v == "latest" || v == "oldest" => Ok(v),
        Ok(v) => bail!("MAILROUTE_K8S_VERSION={v}: expected latest or oldest"),
        Err(e) => bail!("MAILROUTE_K8S_VERSION: {e}"),
    }
}

/// Runs `scripts/k8s-control-plane.sh build <version>` (a no-op when the cache is complete) and
/// returns the binary directory. `MAILROUTE_K8S_BIN` overrides it (a directory holding the same
/// binaries).
pub fn binaries() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MAILROUTE_K8S_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = workspace_root().join("scripts/k8s-control-plane.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("build")
        .arg(version_choice()?)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} build failed ({})", script.display(), out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

struct Pki {
    ca_pem: String,
    serving: (String, String),
    admin: (String, String),
    sa_key: String,
    sa_pub: String,
}

fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    org: Option<&str>,
    sans: Vec<String>,
    purpose: ExtendedKeyUsagePurpose,
) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(org) = org {
        params.distinguished_name.push(DnType::OrganizationName, org);
    }
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn pki() -> anyhow::Result<Pki> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mailroute-tests kubernetes CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let sans = [
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
    ]
    .map(String::from)
    .to_vec();
    let serving = leaf(&ca, "kube-apiserver", None, sans, ExtendedKeyUsagePurpose::ServerAuth)?;
    let admin = leaf(
        &ca,
        "mailroute-tests-admin",
        Some("system:masters"),
        vec![],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let sa = KeyPair::generate()?;
    Ok(Pki {
        ca_pem: ca.pem(),
        serving,
        admin,
        sa_key: sa.serialize_pem(),
        sa_pub: sa.public_key_pem(),
    })
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A kubeconfig for `server` trusting `ca_pem`, authenticating with `user` (a YAML mapping).
fn kubeconfig(server: &str, ca_pem: &str, user: serde_json::Value) -> String {
    let cfg = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    });
    serde_yaml::to_string(&cfg).expect("a JSON value serialises as YAML")
}

/// Removes scratch directories left by test processes that no longer run.
fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("mailroute-k8s-").and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl ControlPlane {
    /// The control plane of this test process, started on first use.
    ///
    /// # Panics
    /// If it cannot be built or started (the message carries the failing process' log).
    pub fn shared() -> &'static ControlPlane {
        // A workspace build enables both of rustls' providers (feature unification), and rustls
        // then refuses to guess: pick ring, as the relay and the operator do.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let started = SHARED.get_or_init(|| {
            // Readiness polling needs a runtime; the caller may be inside one (tokio::test), so
            // start on a plain thread with its own.
            std::thread::spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(Self::start()).map_err(|e| format!("{e:#}"))
            })
            .join()
            .unwrap_or_else(|_| Err("control plane start panicked".into()))
        });
        match started {
            Ok(cp) => cp,
            Err(e) => panic!("starting the Kubernetes control plane: {e}"),
        }
    }

    async fn start() -> anyhow::Result<Self> {
        let began = Instant::now();
        let bin_dir = binaries()?;
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        sweep_stale(&base);
        let dir = base.join(format!("mailroute-k8s-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let _ = SCRATCH.set(dir.clone());
        spawner();

        let pki = pki()?;
        let write = |name: &str, content: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let ca = write("ca.crt", &pki.ca_pem)?;
        let serving_crt = write("apiserver.crt", &pki.serving.0)?;
        let serving_key = write("apiserver.key", &pki.serving.1)?;
        let sa_key = write("sa.key", &pki.sa_key)?;
        let sa_pub = write("sa.pub", &pki.sa_pub)?;

        // etcd on tmpfs without fsync: the data is thrown away with the test process.
        let [etcd_client, etcd_peer, port] = free_ports::<3>()?;
        let mut etcd = Command::new(bin_dir.join("etcd"));
        etcd.args([
            "--name=test".to_string(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-cluster=test=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
        ]);
        let mut etcd = Process::start("etcd", etcd, dir.join("etcd.log"))?;

        let server = format!("https://127.0.0.1:{port}");
        let mut apiserver = Command::new(bin_dir.join("kube-apiserver"));
        apiserver.args([
            format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            // The kubernetes Service endpoint cannot be a loopback address; nothing here needs it.
            "--endpoint-reconciler-type=none".to_string(),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", serving_crt.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--client-ca-file={}", ca.display()),
            "--authorization-mode=RBAC".to_string(),
            format!("--service-account-issuer={ISSUER}"),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-cluster-ip-range=10.96.0.0/16".to_string(),
            "--enable-priority-and-fairness=false".to_string(),
            "--profiling=false".to_string(),
            format!("--cert-dir={}", dir.join("certs").display()),
        ]);
        let mut apiserver = Process::start("kube-apiserver", apiserver, dir.join("kube-apiserver.log"))?;

        let admin_kubeconfig = write(
            "admin.kubeconfig",
            &kubeconfig(
                &server,
                &pki.ca_pem,
                serde_json::json!({"client-certificate-data": b64(&pki.admin.0), "client-key-data": b64(&pki.admin.1)}),
            ),
        )?;
        // The oldest version's build has no controller manager (tests/README.md).
        let controller_manager = bin_dir.join("kube-controller-manager").exists();
        let mut cp = ControlPlane {
            server,
            ca_pem: pki.ca_pem.clone(),
            admin_kubeconfig,
            bin_dir: bin_dir.clone(),
            dir: dir.clone(),
            version: String::new(),
            controller_manager,
        };

        // Ready once /readyz says so (etcd reachable, RBAC bootstrap roles written, ...).
        let client = cp.admin_client().await?;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            etcd.check_running()?;
            apiserver.check_running()?;
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => break,
                Ok(_) | Err(_) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                Ok(body) => bail!("kube-apiserver not ready after {START_DEADLINE:?}: {body}"),
                Err(e) => bail!(
                    "kube-apiserver not ready after {START_DEADLINE:?}: {e}\n{}",
                    apiserver.log_tail(40)
                ),
            }
        }

        cp.version = client.apiserver_version().await?.git_version;

        if controller_manager {
            let mut kcm = Command::new(bin_dir.join("kube-controller-manager"));
            kcm.args([
                format!("--kubeconfig={}", cp.admin_kubeconfig.display()),
                "--controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,clusterrole-aggregation-controller".to_string(),
                "--leader-elect=false".to_string(),
                "--secure-port=0".to_string(),
                "--concurrent-gc-syncs=5".to_string(),
            ]);
            let kcm = Process::start("kube-controller-manager", kcm, dir.join("kube-controller-manager.log"))?;
            // The processes live as long as the test process: the atexit hook and PDEATHSIG end them.
            std::mem::forget(kcm);
        }
        eprintln!(
            "k8s control plane {} ready at {} in {:.1} s (logs in {}{})",
            cp.version,
            cp.server,
            began.elapsed().as_secs_f64(),
            dir.display(),
            if controller_manager {
                ""
            } else {
                "; no controller manager"
            }
        );
        std::mem::forget(etcd);
        std::mem::forget(apiserver);
        Ok(cp)
    }

    /// A client for the admin kubeconfig.
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        client_for(&self.admin_kubeconfig).await
    }

    /// Creates a fresh namespace `<prefix>-<n>-<pid>` and returns its name.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{n}-{}", std::process::id());
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        Api::<Namespace>::all(self.admin_client().await?)
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(name)
    }

    /// Writes a kubeconfig authenticating as ServiceAccount `ns/name` with a token from the
    /// TokenRequest API (valid for an hour) and returns its path.
    pub async fn service_account_kubeconfig(&self, ns: &str, name: &str) -> anyhow::Result<PathBuf> {
        let api = Api::<ServiceAccount>::namespaced(self.admin_client().await?, ns);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = api
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {ns}/{name}"))?
            .status
            .ok_or_else(|| anyhow!("TokenRequest for {ns}/{name} returned no status"))?
            .token;
        let path = self.dir.join(format!("sa-{ns}-{name}.kubeconfig"));
        std::fs::write(
            &path,
            kubeconfig(&self.server, &self.ca_pem, serde_json::json!({"token": token})),
        )?;
        Ok(path)
    }

    /// A `kubectl` command with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.admin_kubeconfig);
        cmd
    }

    /// A `helm` command with the admin kubeconfig and helm's state kept in the scratch directory.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("helm"));
        cmd.env("KUBECONFIG", &self.admin_kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        cmd
    }

    /// The objects of a rendered manifest (`helm get manifest`, a `--output-dir` file) as
    /// `kind/name` (kind in lower case), split into those that exist now and those that do not;
    /// objects that name no namespace are looked up in `ns`.
    pub fn manifest_objects(&self, ns: &str, manifest: &str) -> anyhow::Result<ManifestObjects> {
        let mut objects = ManifestObjects::default();
        for doc in serde_yaml::Deserializer::from_str(manifest) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc)?;
            let (Some(kind), Some(name)) = (v["kind"].as_str(), v["metadata"]["name"].as_str()) else {
                continue;
            };
            let object = format!("{}/{name}", kind.to_lowercase());
            let object_ns = v["metadata"]["namespace"].as_str().unwrap_or(ns);
            let out = run(self
                .kubectl()
                .args(["get", "-n", object_ns, "--ignore-not-found", "-o", "name", &object]))?;
            if out.trim().is_empty() {
                objects.missing.push(object);
            } else {
                objects.present.push(object);
            }
        }
        Ok(objects)
    }
}

/// [`ControlPlane::manifest_objects`]: `kind/name` of the objects that exist and that do not.
#[derive(Debug, Default)]
pub struct ManifestObjects {
    pub present: Vec<String>,
    pub missing: Vec<String>,
}

/// A client for a kubeconfig file.
pub async fn client_for(path: &Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Runs `cmd`, failing with its output when it does not succeed; returns stdout.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` until it returns `Some`, failing after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "timed out after {timeout:?} waiting for {what} (last error: {last_err:?})"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The dynamic API resource of a mailroute.io/v1alpha1 kind (the tests apply CRs as JSON).
pub fn mailroute_resource(kind: &str, plural: &str) -> kube::api::ApiResource {
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("mailroute.io", "v1alpha1", kind),
        plural,
    )
}

/// `SmtpRoute`'s resource.
pub fn route_resource() -> kube::api::ApiResource {
    mailroute_resource("SmtpRoute", "smtproutes")
}

/// A Secret of `data` given as stringData.
pub fn secret(ns: &str, name: &str, data: serde_json::Value) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "stringData": data,
    }))
    .expect("a valid Secret")
}

/// Applies every CRD in `crds/` and waits until each is Established.
pub async fn apply_crds(client: &kube::Client) -> anyhow::Result<()> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(workspace_root().join("crds"))? {
        let path = entry?.path();
        let crd: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply("mailroute-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|e| anyhow::anyhow!("the API server refused {}: {e}", path.display()))?;
        names.push(name);
    }
    for name in names {
        eventually(&format!("CRD {name} Established"), Duration::from_secs(60), || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let crd = api.get(&name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                Ok(established.then_some(()))
            }
        })
        .await?;
    }
    Ok(())
}
