//! Redis launcher: owns a real `redis-server` child process bound to
//! `127.0.0.1` on a free port, its scratch directory and its lifecycle
//! (start, graceful stop, crash, restart on the same port/dir, kill on drop).
//!
//! The binary is looked up in `$REDIS_SERVER_BIN`, then on `$PATH`.
//! Everything here is synchronous (`std::process`), so `Drop` needs no runtime.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use tempfile::TempDir;

/// How long to wait for the server to answer `PING` (or to exit on stop).
const DEADLINE: Duration = Duration::from_secs(10);
/// Polling interval while waiting on a deadline.
const POLL: Duration = Duration::from_millis(5);
/// How many fresh ports to try when the chosen one turns out to be taken.
const PORT_ATTEMPTS: usize = 5;

/// Options for [`RedisServer`]; obtained from [`RedisServer::builder`].
#[derive(Clone, Debug, Default)]
pub struct RedisBuilder {
    aof: bool,
    dir: Option<PathBuf>,
    port: Option<u16>,
    args: Vec<String>,
}

impl RedisBuilder {
    /// Enables the append-only file with `appendfsync always` (default: off).
    pub fn aof(mut self, enabled: bool) -> Self {
        self.aof = enabled;
        self
    }

    /// Uses `dir` as redis' working directory (RDB/AOF live here). It is
    /// created if missing and is *not* removed on drop. Default: a temp dir
    /// owned (and removed) by the [`RedisServer`].
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Uses a fixed port instead of picking a free one (no retry if taken).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Appends several command-line arguments.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Appends an extra command-line argument (e.g. `"--requirepass"`, `"secret"`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts the server and waits until it answers `PING`.
    pub fn start(self) -> anyhow::Result<RedisServer> {
        RedisServer::start_with(self)
    }
}

/// A running `redis-server` child process. Killed (and its temp dir removed) on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    opts: RedisBuilder,
    log_path: PathBuf,
    spawns: usize,
    scratch: TempDir,
}

enum StartFailure {
    /// The port was taken by someone else; retrying on another port may help.
    PortInUse(anyhow::Error),
    Fatal(anyhow::Error),
}

impl RedisServer {
    /// Starts a server with default options (no persistence, temp dir, free port).
    pub fn start() -> anyhow::Result<Self> {
        Self::builder().start()
    }

    /// Options builder: `RedisServer::builder().aof(true).dir(path).start()`.
    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    fn start_with(opts: RedisBuilder) -> anyhow::Result<Self> {
        let bin = find_redis_server()?;
        let scratch = tempfile::Builder::new()
            .prefix("mailroute-testkit-redis-")
            .tempdir()
            .context("creating redis temp dir")?;
        let dir = match &opts.dir {
            Some(dir) => dir.clone(),
            None => scratch.path().join("data"),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating redis dir {}", dir.display()))?;

        let mut server = RedisServer {
            child: None,
            bin,
            port: 0,
            dir,
            log_path: PathBuf::new(),
            spawns: 0,
            scratch,
            opts,
        };
        let attempts = if server.opts.port.is_some() { 1 } else { PORT_ATTEMPTS };
        let mut last_error = anyhow!("redis-server was never started");
        for _ in 0..attempts {
            server.port = match server.opts.port {
                Some(port) => port,
                None => free_port()?,
            };
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(StartFailure::PortInUse(e)) => last_error = e,
                Err(StartFailure::Fatal(e)) => return Err(e),
            }
        }
        Err(last_error.context(format!(
            "redis-server could not get a free port after {attempts} attempt(s)"
        )))
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartFailure> {
        self.spawns += 1;
        self.log_path = self.scratch.path().join(format!("redis-{}.log", self.spawns));
        let log = File::create(&self.log_path)
            .and_then(|f| Ok((f.try_clone()?, f)))
            .context("creating redis log file")
            .map_err(StartFailure::Fatal)?;

        let mut cmd = Command::new(&self.bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no"]);
        if self.opts.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.args(&self.opts.args)
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))
            .map_err(StartFailure::Fatal)?;
        self.child = Some(child);

        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(failure) => {
                self.kill();
                Err(failure)
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let deadline = Instant::now() + DEADLINE;
        let client = ::redis::Client::open(self.url())
            .context("redis client")
            .map_err(StartFailure::Fatal)?;
        loop {
            let child = self
                .child
                .as_mut()
                .ok_or_else(|| StartFailure::Fatal(anyhow!("redis-server is not running")))?;
            let pid = child.id();
            if let Some(status) = child
                .try_wait()
                .context("waiting on redis-server")
                .map_err(StartFailure::Fatal)?
            {
                let log = self.log();
                let err = anyhow!(
                    "redis-server on port {} exited during startup ({status}); log:\n{log}",
                    self.port
                );
                return Err(if log.contains("Address already in use") {
                    StartFailure::PortInUse(err)
                } else {
                    StartFailure::Fatal(err)
                });
            }
            if let Some(server_pid) = ping(&client) {
                if server_pid == pid {
                    return Ok(());
                }
                return Err(StartFailure::PortInUse(anyhow!(
                    "port {} is served by another redis (pid {server_pid})",
                    self.port
                )));
            }
            if Instant::now() >= deadline {
                return Err(StartFailure::Fatal(anyhow!(
                    "redis-server on port {} did not answer PING within {DEADLINE:?}; log:\n{}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port redis listens on (stable across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Redis' working directory (where the RDB / AOF files live).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `redis` crate client for [`url`](Self::url).
    pub fn client(&self) -> anyhow::Result<::redis::Client> {
        Ok(::redis::Client::open(self.url())?)
    }

    /// PID of the running child, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the child process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Output of the current (or last) redis-server process.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Graceful stop: `SHUTDOWN`, then waits (bounded) for the process to
    /// exit, falling back to kill. No-op if not running.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Ok(client) = ::redis::Client::open(self.url())
            && let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(1))
        {
            // The server closes the connection instead of replying on success.
            let _ = con.set_read_timeout(Some(Duration::from_secs(5)));
            let _: ::redis::RedisResult<()> = ::redis::cmd("SHUTDOWN").query(&mut con);
        }
        let deadline = Instant::now() + DEADLINE;
        while let Some(child) = self.child.as_mut()
            && Instant::now() < deadline
        {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => std::thread::sleep(POLL),
            }
        }
        self.kill();
    }

    /// Hard stop (SIGKILL, like a crash) and reap. No-op if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if running, then starts a new one with the same
    /// port, dir and options, and waits until it answers `PING` (and has
    /// finished loading its AOF/RDB).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        match self.spawn_and_wait() {
            Ok(()) => Ok(()),
            Err(StartFailure::PortInUse(e) | StartFailure::Fatal(e)) => {
                Err(e.context(format!("restarting redis-server on port {}", self.port)))
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `Some(pid)` if a redis on `client` answers PING (and is not loading).
fn ping(client: &::redis::Client) -> Option<u32> {
    let mut con = client.get_connection_with_timeout(Duration::from_millis(250)).ok()?;
    con.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let pong: String = ::redis::cmd("PING").query(&mut con).ok()?;
    if pong != "PONG" {
        return None;
    }
    let info: String = ::redis::cmd("INFO").arg("server").query(&mut con).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn find_redis_server() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("REDIS_SERVER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "redis-server not found on PATH (install it, e.g. `apt-get install -y redis-server`, \
                 or set REDIS_SERVER_BIN)"
            )
        })
}
