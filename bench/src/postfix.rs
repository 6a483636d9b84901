//! The Postfix reference: a private Postfix instance (own config, queue and data directories under
//! the run directory, listening on 127.0.0.1:<port>, relaying everything to the sink) that never
//! touches the system instance or port 25. Config generation is pure; start/stop shell out to
//! `postfix -c DIR`. Must run as root, as Postfix's master does.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Where the distribution's master.cf is (its service list is the baseline we adapt).
pub const DISTRO_MASTER_CF: &str = "/etc/postfix/master.cf";

/// `main.cf` of the bench instance. Everything not set here is Postfix's default, on purpose:
/// the comparison is against Postfix as people run it, not a tuned special build.
pub fn main_cf(root: &Path, sink: SocketAddr) -> String {
    let r = root.display();
    format!(
        "# mailroute bench: private Postfix instance; generated, do not edit.\n\
         compatibility_level = 3.6\n\
         config_directory = {r}/conf\n\
         queue_directory = {r}/queue\n\
         data_directory = {r}/data\n\
         myhostname = postfix.bench.example\n\
         mydestination =\n\
         inet_interfaces = 127.0.0.1\n\
         inet_protocols = ipv4\n\
         mynetworks = 127.0.0.0/8\n\
         relayhost = [{ip}]:{port}\n\
         alias_maps =\n\
         alias_database =\n\
         biff = no\n\
         maillog_file = {r}/maillog\n\
         maillog_file_prefixes = {r}\n",
        ip = sink.ip(),
        port = sink.port(),
    )
}

/// The distribution's `master.cf` with the `smtp inet` listener moved to `listen`
/// (e.g. `127.0.0.1:2600`) and chroot turned off everywhere (a private queue directory has no
/// chroot jail prepared; Postfix's upstream default is also no chroot).
pub fn master_cf(distro: &str, listen: &str) -> String {
    let mut out = String::from("# mailroute bench: adapted from the distribution's master.cf; generated.\n");
    // Continuation lines (`  -o …`) of a dropped service are dropped with it.
    let mut dropping = false;
    for line in distro.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let continuation = line.starts_with([' ', '\t']);
        if continuation && dropping {
            continue;
        }
        if !continuation {
            dropping = false;
        }
        let is_service = !continuation && !line.starts_with('#') && f.len() >= 8;
        if !is_service {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut f = f;
        if f[0] == "smtp" && f[1] == "inet" {
            f[0] = listen;
        } else if f[1] == "inet" {
            // No other network listener (no submission/smtps from the distro file).
            dropping = true;
            continue;
        }
        f[4] = "n";
        out.push_str(&f.join(" "));
        out.push('\n');
    }
    out
}

/// Config directories of the instances running now, for [`abort_running`].
static RUNNING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn running() -> MutexGuard<'static, Vec<PathBuf>> {
    RUNNING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Stops every instance started by this process at once (`postfix abort`); for interrupts,
/// since the master daemonizes and outlives the harness otherwise.
pub fn abort_running() {
    for conf in running().drain(..) {
        let _ = Command::new("postfix").arg("-c").arg(&conf).arg("abort").output();
    }
}

/// A running private Postfix instance.
pub struct Postfix {
    root: PathBuf,
    pub listen: SocketAddr,
    running: bool,
}

impl Postfix {
    /// Writes the configuration under `root` and starts the instance; waits until it listens.
    pub fn start(root: &Path, listen: SocketAddr, sink: SocketAddr) -> anyhow::Result<Self> {
        for d in ["conf", "queue", "data"] {
            fs::create_dir_all(root.join(d)).with_context(|| format!("creating {}/{d}", root.display()))?;
        }
        // Postfix daemons run as the postfix user and must reach the queue directory.
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
        let distro = fs::read_to_string(DISTRO_MASTER_CF).with_context(|| format!("reading {DISTRO_MASTER_CF}"))?;
        fs::write(root.join("conf/main.cf"), main_cf(root, sink))?;
        fs::write(root.join("conf/master.cf"), master_cf(&distro, &listen.to_string()))?;
        let chown = Command::new("chown").arg("postfix").arg(root.join("data")).status()?;
        if !chown.success() {
            bail!(
                "chown postfix {}/data failed (is the postfix user installed?)",
                root.display()
            );
        }
        let mut pf = Postfix {
            root: root.to_path_buf(),
            listen,
            running: false,
        };
        pf.postfix("start")?;
        pf.running = true;
        running().push(root.join("conf"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                bail!("postfix did not listen on {listen}; log:\n{}", pf.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pf)
    }

    fn postfix(&self, verb: &str) -> anyhow::Result<()> {
        let out = Command::new("postfix")
            .arg("-c")
            .arg(self.root.join("conf"))
            .arg(verb)
            .output()
            .context("running postfix (apt-get install postfix)")?;
        if !out.status.success() {
            bail!(
                "postfix {verb} failed: {}{}\nlog:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(20)
            );
        }
        Ok(())
    }

    /// Pid of the master process.
    pub fn master_pid(&self) -> Option<u32> {
        fs::read_to_string(self.root.join("queue/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Messages still in Postfix's queues (incoming, active, deferred, hold, maildrop).
    pub fn queued(&self) -> usize {
        ["incoming", "active", "deferred", "hold", "maildrop"]
            .iter()
            .map(|q| count_files(&self.root.join("queue").join(q)))
            .sum()
    }

    /// The last `n` lines of the instance's mail log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = fs::read_to_string(self.root.join("maillog")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops the instance and waits for the master to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if !self.running {
            return Ok(());
        }
        let pid = self.master_pid();
        self.running = false;
        let conf = self.root.join("conf");
        running().retain(|c| *c != conf);
        if self.postfix("stop").is_err() {
            self.postfix("abort")?;
        }
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_cf_relays_everything_to_the_sink_from_a_private_tree() {
        let cf = main_cf(Path::new("/tmp/run/postfix"), "127.0.0.1:2599".parse().unwrap());
        assert!(cf.contains("relayhost = [127.0.0.1]:2599\n"));
        assert!(cf.contains("queue_directory = /tmp/run/postfix/queue\n"));
        assert!(cf.contains("config_directory = /tmp/run/postfix/conf\n"));
        assert!(cf.contains("mydestination =\n"));
        assert!(cf.contains("inet_interfaces = 127.0.0.1\n"));
    }

    #[test]
    fn master_cf_moves_the_listener_and_drops_chroot_and_other_listeners() {
        let distro = "# comment\n\
            smtp      inet  n       -       y       -       -       smtpd\n\
            #submission inet n       -       y       -       -       smtpd\n\
            submission inet n       -       y       -       -       smtpd\n\
            \x20 -o smtpd_tls_security_level=encrypt\n\
            cleanup   unix  n       -       y       -       0       cleanup\n\
            qmgr      unix  n       -       n       300     1       qmgr\n";
        let cf = master_cf(distro, "127.0.0.1:2600");
        assert!(cf.contains("127.0.0.1:2600 inet n - n - - smtpd\n"));
        assert!(cf.contains("cleanup unix n - n - 0 cleanup\n"));
        assert!(cf.contains("qmgr unix n - n 300 1 qmgr\n"));
        assert!(cf.contains("#submission inet"));
        assert!(!cf.contains("\nsubmission inet"));
        assert!(!cf.contains("encrypt"));
        assert!(!cf.lines().any(|l| l.starts_with("smtp ")));
    }
}
