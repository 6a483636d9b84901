//! The other MTAs of the comparison (Exim, OpenSMTPD, Haraka, maddy): which are installed (the
//! manifest `bench/install-peers.sh` writes), what their 250 means for durability, and each one's
//! configuration as a smarthost relay to the sink with its queue under the run directory. Pure:
//! [`setup`] returns the files, directories and command line of a peer; the harness creates,
//! starts and measures them. Installing is the script's job, never this module's.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::message::RECIPIENT_DOMAIN;
use crate::report::Commit;

/// Where `bench/install-peers.sh` writes its manifest unless told otherwise.
pub fn default_manifest() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/mailroute-bench/peers/manifest.tsv")
}

/// One peer MTA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Exim,
    OpenSmtpd,
    Haraka,
    Maddy,
}

impl Peer {
    pub const ALL: [Peer; 4] = [Peer::Exim, Peer::OpenSmtpd, Peer::Haraka, Peer::Maddy];

    /// The name in the manifest, the install script and `--peers`.
    pub fn key(self) -> &'static str {
        match self {
            Peer::Exim => "exim",
            Peer::OpenSmtpd => "opensmtpd",
            Peer::Haraka => "haraka",
            Peer::Maddy => "maddy",
        }
    }

    pub fn from_key(key: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|p| p.key() == key)
    }

    /// The name in the table.
    pub fn label(self) -> &'static str {
        match self {
            Peer::Exim => "Exim",
            Peer::OpenSmtpd => "OpenSMTPD",
            Peer::Haraka => "Haraka",
            Peer::Maddy => "maddy",
        }
    }

    /// What the peer's 250 means, from its source: Exim fsyncs the -D and -H spool files
    /// (receive.c, spool_out.c), Haraka writes the outbound queue file through an fsyncing
    /// stream before renaming it into place (outbound/index.js), maddy syncs the body, header
    /// and meta files of its queue (internal/target/queue), OpenSMTPD writes the message and
    /// envelope files without fsync (queue_fs.c: envelopes are created with do_sync = 0).
    pub fn commit(self) -> Commit {
        match self {
            Peer::Exim | Peer::Haraka | Peer::Maddy => Commit::FsyncPerMessage,
            Peer::OpenSmtpd => Commit::None,
        }
    }

    /// The durability cell of the row.
    pub fn durability(self) -> &'static str {
        match self {
            Peer::Exim => "fsync per message (spool -D and -H files)",
            Peer::OpenSmtpd => "none: queue files written, not fsynced, before the 250",
            Peer::Haraka => "fsync per message (outbound queue file)",
            Peer::Maddy => "fsync per message (queue body, header, meta)",
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// A peer as the install script left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Install {
    Ready { version: String, program: PathBuf },
    Failed { version: String, reason: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest line {line}: expected NAME<TAB>ok|failed<TAB>VERSION<TAB>PROGRAM|REASON, got {text:?}")]
    Malformed { line: usize, text: String },
    #[error("manifest line {line}: unknown peer {name:?}")]
    UnknownPeer { line: usize, name: String },
}

/// Parses the manifest: one line per peer, tab separated (see `bench/install-peers.sh`).
/// Blank lines are skipped; a later line for the same peer wins.
pub fn parse_manifest(text: &str) -> Result<BTreeMap<Peer, Install>, ManifestError> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = raw.splitn(4, '\t').collect();
        let malformed = || ManifestError::Malformed {
            line,
            text: raw.to_string(),
        };
        let [name, status, version, rest] = f.as_slice() else {
            return Err(malformed());
        };
        let peer = Peer::from_key(name).ok_or_else(|| ManifestError::UnknownPeer {
            line,
            name: name.to_string(),
        })?;
        let install = match *status {
            "ok" if !rest.is_empty() => Install::Ready {
                version: version.to_string(),
                program: PathBuf::from(rest),
            },
            "failed" => Install::Failed {
                version: version.to_string(),
                reason: rest.trim().to_string(),
            },
            _ => return Err(malformed()),
        };
        out.insert(peer, install);
    }
    Ok(out)
}

/// Everything needed to run one peer: created and written by the harness, then `command`
/// started in the foreground; `queue` is where its queue lives (on the measured disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    pub dirs: Vec<PathBuf>,
    pub files: Vec<(PathBuf, String)>,
    /// Files copied (with their permissions) before the start: from, to.
    pub copies: Vec<(PathBuf, PathBuf)>,
    /// A queue outside the run directory, removed before the start and after the stop so that
    /// no message of an earlier run is delivered into this one, and the system program whose
    /// presence means the directory is not the bench's to remove (the row fails instead).
    pub shared_spool: Option<(PathBuf, PathBuf)>,
    /// Directories handed to this user (`chown -R`) before the start.
    pub chown: Option<(&'static str, Vec<PathBuf>)>,
    pub command: Vec<OsString>,
    pub queue: PathBuf,
    /// Log file the harness points the process's stdout and stderr to.
    pub log: PathBuf,
}

/// The user Debian's Exim build runs its receiving and delivering processes as.
pub const EXIM_USER: &str = "Debian-exim";
/// OpenSMTPD's queue directory, compiled into Debian's build.
pub const OPENSMTPD_SPOOL: &str = "/var/spool/smtpd";

/// Exim as a smarthost relay, after the spec's manualroute example ("route_list = * host").
/// Everything else is the default except what a private instance and this load need:
/// `smtp_accept_max` (default 20) below the 32 sessions the load opens, and
/// `smtp_accept_queue_per_connection` (default 10), which would leave every message after the
/// tenth of a kept-open session for the 30-minute queue runner instead of delivering it.
pub fn exim_conf(root: &Path, program: &Path, listen: SocketAddr, sink: SocketAddr) -> String {
    let r = root.display();
    format!(
        "# mailroute bench: private Exim instance; generated, do not edit.\n\
         primary_hostname = exim.bench.example\n\
         exim_path = {program}\n\
         spool_directory = {r}/spool\n\
         log_file_path = {r}/log/%slog\n\
         pid_file_path = {r}/exim.pid\n\
         local_interfaces = {ip}\n\
         daemon_smtp_ports = {port}\n\
         domainlist local_domains =\n\
         hostlist relay_from_hosts = 127.0.0.1\n\
         acl_smtp_rcpt = acl_check_rcpt\n\
         host_lookup =\n\
         smtp_accept_max = 100\n\
         smtp_accept_queue_per_connection = 0\n\
         \n\
         begin acl\n\
         acl_check_rcpt:\n\
         \x20 accept hosts = +relay_from_hosts\n\
         \x20 deny message = relay not permitted\n\
         \n\
         begin routers\n\
         smarthost:\n\
         \x20 driver = manualroute\n\
         \x20 domains = ! +local_domains\n\
         \x20 transport = remote_smtp\n\
         \x20 route_list = * {sink_ip}\n\
         \x20 self = send\n\
         \n\
         begin transports\n\
         remote_smtp:\n\
         \x20 driver = smtp\n\
         \x20 port = {sink_port}\n\
         \x20 allow_localhost\n\
         \n\
         begin retry\n\
         *  *  F,2h,15m; G,16h,1h,1.5; F,4d,6h\n",
        program = program.display(),
        ip = listen.ip(),
        port = listen.port(),
        sink_ip = sink.ip(),
        sink_port = sink.port(),
    )
}

/// OpenSMTPD as a relay to one host, as smtpd.conf(5) writes it. Two sets of defaults changed
/// for this load, as Exim's are: `smtp limit max-mails` (default 100 per session: every later
/// MAIL of a kept-open session gets 452) and the mta's connection pacing (`limit.c`: a new
/// connection to a route at most every 5 s, 3 s after a disconnect, 2 s per relay; with 100
/// mails per session that caps a smarthost at ~14 delivered/s). Connection counts (5 per route)
/// and everything else stay the defaults.
pub fn smtpd_conf(listen: SocketAddr, sink: SocketAddr) -> String {
    format!(
        "# mailroute bench: private OpenSMTPD instance; generated, do not edit.\n\
         smtp limit max-mails 1000000\n\
         mta limit conn-delay-route 0 reconn-delay-route 0 conn-delay-relay 0\n\
         listen on {ip} port {port}\n\
         action \"relay\" relay host smtp://{sink}\n\
         match from local for any action \"relay\"\n",
        ip = listen.ip(),
        port = listen.port(),
    )
}

/// Haraka's config directory: the `relay` plugin's ACL marks loopback clients as relaying, so
/// their mail goes to Haraka's outbound queue on disk; `queue/smtp_forward` with
/// `enable_outbound=false` leaves delivery to that queue and answers its `get_mx` hook with the
/// sink for the bench domain (the plugin's per-domain route). `local_mx_ok` lets outbound
/// deliver to a loopback address; `nodes=cpus` is the cluster mode the docs recommend.
pub fn haraka_files(root: &Path, listen: SocketAddr, sink: SocketAddr) -> Vec<(PathBuf, String)> {
    let c = root.join("config");
    vec![
        (c.join("smtp.ini"), format!("listen={listen}\nnodes=cpus\n")),
        (c.join("me"), "haraka.bench.example\n".into()),
        (c.join("plugins"), "relay\nqueue/smtp_forward\n".into()),
        (c.join("relay.ini"), "[relay]\nacl=true\n".into()),
        (c.join("relay_acl_allow"), "127.0.0.1/32\n".into()),
        (
            c.join("smtp_forward.ini"),
            format!(
                "enable_outbound=false\nhost={ip}\nport={port}\n\n[{RECIPIENT_DOMAIN}]\nhost={ip}\nport={port}\n",
                ip = sink.ip(),
                port = sink.port()
            ),
        ),
        (c.join("outbound.ini"), "local_mx_ok=true\n".into()),
        (c.join("queue_dir"), format!("{}\n", root.join("queue").display())),
        (c.join("host_list"), String::new()),
    ]
}

/// maddy with its SMTP endpoint delivering to a `target.queue` whose target is a
/// `target.smtp` at the sink: the smarthost form of the default config's
/// `remote_queue` → `outbound_delivery` pair. No checks or rate limits (those of the default
/// config are for mail from the internet); `tls off` and `starttls no` because neither the
/// load generator nor the sink speaks TLS.
pub fn maddy_conf(root: &Path, listen: SocketAddr, sink: SocketAddr) -> String {
    let r = root.display();
    format!(
        "# mailroute bench: private maddy instance; generated, do not edit.\n\
         hostname maddy.bench.example\n\
         state_dir {r}/state\n\
         runtime_dir {r}/run\n\
         tls off\n\
         \n\
         smtp tcp://{listen} {{\n\
         \x20   default_source {{\n\
         \x20       deliver_to &remote_queue\n\
         \x20   }}\n\
         }}\n\
         \n\
         target.queue remote_queue {{\n\
         \x20   location {r}/queue\n\
         \x20   target &smarthost\n\
         \x20   autogenerated_msg_domain bench.example\n\
         \x20   bounce {{\n\
         \x20       default_destination {{\n\
         \x20           reject 550 5.0.0 \"Refusing to send DSNs\"\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n\
         \n\
         target.smtp smarthost {{\n\
         \x20   targets tcp://{sink}\n\
         \x20   starttls no\n\
         }}\n"
    )
}

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

/// The files, directories and command of `peer` (installed as `program`) under `root`.
pub fn setup(peer: Peer, program: &Path, root: &Path, listen: SocketAddr, sink: SocketAddr) -> Setup {
    let log = root.join("stdout.log");
    match peer {
        Peer::Exim => {
            let conf = root.join("exim.conf");
            // Exim re-executes itself after dropping to its own user, which cannot read root's
            // home where the install cache is: it runs from a copy in the run directory.
            let exe = root.join("bin/exim4");
            Setup {
                dirs: vec![root.join("spool"), root.join("log"), root.join("bin")],
                files: vec![(conf.clone(), exim_conf(root, &exe, listen, sink))],
                copies: vec![(program.to_path_buf(), exe.clone())],
                shared_spool: None,
                chown: Some((EXIM_USER, vec![root.join("spool"), root.join("log")])),
                // -bdf: the daemon in the foreground; -q30m: a queue runner as Debian starts it.
                command: vec![os(&exe), os("-C"), os(&conf), os("-bdf"), os("-q30m")],
                queue: root.join("spool"),
                log,
            }
        }
        Peer::OpenSmtpd => {
            let conf = root.join("smtpd.conf");
            Setup {
                dirs: vec![],
                files: vec![(conf.clone(), smtpd_conf(listen, sink))],
                copies: vec![],
                // The spool is compiled in; with no system OpenSMTPD it is only ever the bench's.
                shared_spool: Some((PathBuf::from(OPENSMTPD_SPOOL), PathBuf::from("/usr/sbin/smtpd"))),
                chown: None,
                // -d: stay in the foreground, log to stderr.
                command: vec![os(program), os("-d"), os("-f"), os(&conf)],
                queue: PathBuf::from(OPENSMTPD_SPOOL),
                log,
            }
        }
        Peer::Haraka => Setup {
            dirs: vec![root.join("config"), root.join("queue")],
            files: haraka_files(root, listen, sink),
            // The base files `haraka -i` copies from the package (npm puts the program at
            // node_modules/.bin/haraka, the package at node_modules/Haraka); ours replace the rest.
            copies: ["connection.ini", "log.ini"]
                .into_iter()
                .map(|f| {
                    let pkg = program.parent().and_then(Path::parent).unwrap_or(Path::new("."));
                    (pkg.join("Haraka/config").join(f), root.join("config").join(f))
                })
                .collect(),
            shared_spool: None,
            chown: None,
            command: vec![os(program), os("-c"), os(root)],
            queue: root.join("queue"),
            log,
        },
        Peer::Maddy => {
            let conf = root.join("maddy.conf");
            Setup {
                dirs: vec![root.join("state"), root.join("run"), root.join("libexec")],
                files: vec![(conf.clone(), maddy_conf(root, listen, sink))],
                copies: vec![],
                shared_spool: None,
                chown: None,
                command: vec![
                    os(program),
                    os("--config"),
                    os(&conf),
                    os("run"),
                    os("--libexec"),
                    os(root.join("libexec")),
                ],
                queue: root.join("queue"),
                log,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn manifest_lists_ready_and_failed_peers() {
        let text = "exim\tok\t4.96-15\t/c/exim/usr/sbin/exim4\n\
                    \n\
                    maddy\tfailed\tv0.8.1\tgo build failed: no space left\n\
                    haraka\tok\t3.3.4\t/c/haraka/node_modules/.bin/haraka\n";
        let m = parse_manifest(text).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[&Peer::Exim],
            Install::Ready {
                version: "4.96-15".into(),
                program: "/c/exim/usr/sbin/exim4".into()
            }
        );
        assert_eq!(
            m[&Peer::Maddy],
            Install::Failed {
                version: "v0.8.1".into(),
                reason: "go build failed: no space left".into()
            }
        );
        assert!(!m.contains_key(&Peer::OpenSmtpd));
    }

    #[test]
    fn manifest_rejects_unknown_peers_and_short_lines() {
        assert_eq!(
            parse_manifest("sendmail\tok\t8\t/usr/sbin/sendmail\n"),
            Err(ManifestError::UnknownPeer {
                line: 1,
                name: "sendmail".into()
            })
        );
        assert!(matches!(
            parse_manifest("exim\tok\t4.96\n"),
            Err(ManifestError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            parse_manifest("exim\tok\t4.96\t\n"),
            Err(ManifestError::Malformed { .. })
        ));
        assert!(matches!(
            parse_manifest("exim\tmaybe\t4.96\t/x\n"),
            Err(ManifestError::Malformed { .. })
        ));
    }

    #[test]
    fn keys_round_trip_and_every_peer_says_what_its_250_means() {
        for p in Peer::ALL {
            assert_eq!(Peer::from_key(p.key()), Some(p));
            assert!(!p.durability().is_empty());
        }
        assert_eq!(Peer::OpenSmtpd.commit(), Commit::None);
        assert_eq!(Peer::Exim.commit(), Commit::FsyncPerMessage);
    }

    #[test]
    fn exim_relays_everything_to_the_sink_from_a_private_spool() {
        let cf = exim_conf(
            Path::new("/run/exim"),
            Path::new("/c/exim4"),
            addr("127.0.0.1:2600"),
            addr("127.0.0.1:2599"),
        );
        for want in [
            "spool_directory = /run/exim/spool\n",
            "exim_path = /c/exim4\n",
            "daemon_smtp_ports = 2600\n",
            "local_interfaces = 127.0.0.1\n",
            "route_list = * 127.0.0.1\n",
            "port = 2599\n",
            "driver = manualroute\n",
            "accept hosts = +relay_from_hosts\n",
            "smtp_accept_queue_per_connection = 0\n",
        ] {
            assert!(cf.contains(want), "{want:?} missing from\n{cf}");
        }
        assert!(!cf.contains("/var/spool/exim4"));
    }

    #[test]
    fn opensmtpd_relays_local_mail_to_the_sink() {
        let cf = smtpd_conf(addr("127.0.0.1:2600"), addr("127.0.0.1:2599"));
        assert!(cf.contains("listen on 127.0.0.1 port 2600\n"));
        assert!(cf.contains("action \"relay\" relay host smtp://127.0.0.1:2599\n"));
        assert!(cf.contains("match from local for any action \"relay\"\n"));
        // Without these the kept-open sessions get 452 after 100 messages and the mta opens
        // one connection to the sink every 5 s (the row delivered 14/s).
        assert!(cf.contains("smtp limit max-mails 1000000\n"));
        assert!(cf.contains("mta limit conn-delay-route 0 reconn-delay-route 0 conn-delay-relay 0\n"));
    }

    #[test]
    fn haraka_queues_relayed_mail_and_routes_the_bench_domain_to_the_sink() {
        let files = haraka_files(Path::new("/run/h"), addr("127.0.0.1:2600"), addr("127.0.0.1:2599"));
        let get = |name: &str| {
            files
                .iter()
                .find(|(p, _)| p == &Path::new("/run/h/config").join(name))
                .map(|(_, t)| t.as_str())
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert!(get("smtp.ini").contains("listen=127.0.0.1:2600\n"));
        assert_eq!(get("plugins"), "relay\nqueue/smtp_forward\n");
        assert_eq!(get("relay_acl_allow"), "127.0.0.1/32\n");
        let fwd = get("smtp_forward.ini");
        assert!(fwd.starts_with("enable_outbound=false\n"), "{fwd}");
        assert!(fwd.contains("[bench.example]\nhost=127.0.0.1\nport=2599\n"), "{fwd}");
        assert_eq!(get("queue_dir"), "/run/h/queue\n");
        assert!(get("outbound.ini").contains("local_mx_ok=true"));
    }

    #[test]
    fn maddy_queues_then_forwards_to_the_sink() {
        let cf = maddy_conf(Path::new("/run/m"), addr("127.0.0.1:2600"), addr("127.0.0.1:2599"));
        assert!(cf.contains("smtp tcp://127.0.0.1:2600 {\n"));
        assert!(cf.contains("deliver_to &remote_queue\n"));
        assert!(cf.contains("target.queue remote_queue {\n    location /run/m/queue\n    target &smarthost\n"));
        assert!(cf.contains("targets tcp://127.0.0.1:2599\n"));
        assert!(cf.contains("state_dir /run/m/state\n"));
        assert_eq!(cf.matches('{').count(), cf.matches('}').count());
    }

    #[test]
    fn setup_keeps_every_queue_under_the_run_directory_except_opensmtpds() {
        let root = Path::new("/work/run/peer");
        for p in Peer::ALL {
            let program = if p == Peer::Haraka { "/nm/.bin/haraka" } else { "/bin/x" };
            let s = setup(
                p,
                Path::new(program),
                root,
                addr("127.0.0.1:2600"),
                addr("127.0.0.1:2599"),
            );
            let exe = Path::new(&s.command[0]);
            if p == Peer::Haraka {
                assert_eq!(
                    s.copies[0],
                    (
                        PathBuf::from("/nm/Haraka/config/connection.ini"),
                        root.join("config/connection.ini")
                    )
                );
            }
            if p == Peer::Exim {
                assert_eq!(exe, root.join("bin/exim4"));
                assert_eq!(s.copies, vec![(PathBuf::from("/bin/x"), root.join("bin/exim4"))]);
                assert!(s.files[0].1.contains("exim_path = /work/run/peer/bin/exim4\n"));
            } else {
                assert_eq!(exe, Path::new(program));
            }
            assert!(s.files.iter().all(|(f, _)| f.starts_with(root)));
            if p == Peer::OpenSmtpd {
                assert_eq!(s.queue, Path::new(OPENSMTPD_SPOOL));
                let (spool, system) = s.shared_spool.clone().unwrap();
                assert_eq!(spool, s.queue);
                assert_eq!(system, Path::new("/usr/sbin/smtpd"));
            } else {
                assert!(s.queue.starts_with(root), "{p}: {:?}", s.queue);
                assert_eq!(s.shared_spool, None);
            }
        }
    }
}
