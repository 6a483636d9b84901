//! Where the relay's routing configuration comes from and how it is swapped at run time:
//! the operator's compiled files (`--config`/`--secrets`, a mounted ConfigMap and Secret),
//! SmtpRoute/SenderQuota YAML compiled in-process (`--routes`), or the embedded default.
//!
//! It owns loading, validation at this boundary, and the current snapshot. Reloading keeps the
//! old snapshot when the new input is broken, so a bad edit never stops delivery. It must not
//! interpret routes or quotas; readers take a snapshot per message and keep it for that message.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use mailroute_api::{Manifests, RelayConfig, RelaySecrets, Severity};

const EMBEDDED_DEFAULT: &str = include_str!("default-routes.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unsupported config version {0} (this relay reads versions {1} to {2})")]
    Version(u32, u32, u32),
    #[error("{0}")]
    Compile(String),
}

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Compiled by the operator.
    Files {
        config: PathBuf,
        secrets: Option<PathBuf>,
    },
    /// SmtpRoute / SenderQuota / Secret YAML files or directories, compiled here.
    Manifests(Vec<PathBuf>),
    Embedded,
}

/// One loaded configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub config: RelayConfig,
    pub secrets: RelaySecrets,
    /// Content hash of the config (what the operator writes into its annotation).
    pub hash: String,
    /// Counts loads in this process, starting at 1.
    pub generation: u64,
    /// Compile warnings and left-out objects (standalone mode only).
    pub warnings: Vec<String>,
}

/// Reads and validates a source.
pub fn load(source: &Source) -> Result<(RelayConfig, RelaySecrets, Vec<String>), ConfigError> {
    match source {
        Source::Files { config, secrets } => {
            let text = read(config)?;
            let cfg: RelayConfig = serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
                path: config.clone(),
                message: e.to_string(),
            })?;
            // Version 1 (before tenancy) still reads: its routes and quotas govern everyone.
            let (min, max) = (
                mailroute_api::config::MIN_CONFIG_VERSION,
                mailroute_api::config::CONFIG_VERSION,
            );
            if !(min..=max).contains(&cfg.version) {
                return Err(ConfigError::Version(cfg.version, min, max));
            }
            let sec = match secrets {
                Some(p) if p.exists() => serde_json::from_str(&read(p)?).map_err(|e| ConfigError::Parse {
                    path: p.clone(),
                    message: e.to_string(),
                })?,
                _ => RelaySecrets::default(),
            };
            Ok((cfg, sec, Vec::new()))
        }
        Source::Manifests(paths) => {
            let mut m = Manifests::default();
            for file in yaml_files(paths)? {
                let text = read(&file)?;
                m.add_yaml(&text, "default").map_err(|e| ConfigError::Parse {
                    path: file.clone(),
                    message: e.to_string(),
                })?;
            }
            compiled(m)
        }
        Source::Embedded => {
            let m = Manifests::from_yaml(EMBEDDED_DEFAULT, "default")
                .map_err(|e| ConfigError::Compile(format!("embedded default: {e}")))?;
            compiled(m)
        }
    }
}

fn compiled(m: Manifests) -> Result<(RelayConfig, RelaySecrets, Vec<String>), ConfigError> {
    let c = m.compile();
    let errors: Vec<String> = c
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| format!("{}: {} ({})", d.object.id(), d.message, d.reason.as_str()))
        .collect();
    if !errors.is_empty() {
        return Err(ConfigError::Compile(errors.join("; ")));
    }
    let warnings = c
        .diagnostics
        .iter()
        .map(|d| format!("{}: {}", d.object.id(), d.message))
        .collect();
    Ok((c.config, c.secrets, warnings))
}

fn read(p: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
        path: p.to_owned(),
        source,
    })
}

/// Files named on the command line, and `*.yaml`/`*.yml` inside named directories, sorted.
fn yaml_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ConfigError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|source| ConfigError::Read {
                path: p.clone(),
                source,
            })?;
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The current snapshot, swapped atomically on reload.
pub struct ConfigHandle {
    source: Source,
    current: RwLock<Arc<Snapshot>>,
}

impl ConfigHandle {
    pub fn open(source: Source) -> Result<Self, ConfigError> {
        let (config, secrets, warnings) = load(&source)?;
        let snap = Snapshot {
            hash: config.content_hash(),
            config,
            secrets,
            generation: 1,
            warnings,
        };
        Ok(ConfigHandle {
            source,
            current: RwLock::new(Arc::new(snap)),
        })
    }

    /// A handle on a fixed configuration (tests, embedding).
    pub fn fixed(config: RelayConfig, secrets: RelaySecrets) -> Self {
        let snap = Snapshot {
            hash: config.content_hash(),
            config,
            secrets,
            generation: 1,
            warnings: Vec::new(),
        };
        ConfigHandle {
            source: Source::Embedded,
            current: RwLock::new(Arc::new(snap)),
        }
    }

    pub fn get(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the snapshot (used by tests and by [`ConfigHandle::reload`]).
    pub fn replace(&self, config: RelayConfig, secrets: RelaySecrets, warnings: Vec<String>) -> Arc<Snapshot> {
        let generation = self.get().generation + 1;
        let snap = Arc::new(Snapshot {
            hash: config.content_hash(),
            config,
            secrets,
            generation,
            warnings,
        });
        match self.current.write() {
            Ok(mut g) => *g = snap.clone(),
            Err(p) => *p.into_inner() = snap.clone(),
        }
        snap
    }

    /// Re-reads the source. `Ok(Some)` when something changed, `Ok(None)` when identical, `Err`
    /// when the new input is broken (the old snapshot stays).
    pub fn reload(&self) -> Result<Option<Arc<Snapshot>>, ConfigError> {
        if matches!(self.source, Source::Embedded) {
            return Ok(None);
        }
        let (config, secrets, warnings) = load(&self.source)?;
        let cur = self.get();
        if config == cur.config && secrets == cur.secrets {
            return Ok(None);
        }
        Ok(Some(self.replace(config, secrets, warnings)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_api::config::Target;

    #[test]
    fn embedded_default_is_one_mx_route() {
        let (cfg, _, warnings) = load(&Source::Embedded).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.routes.len(), 1);
        assert_eq!(cfg.routes[0].target, Target::Mx);
        assert!(cfg.routes[0].serves("a@b.example", None, "anything.example"));
    }

    #[test]
    fn examples_directory_loads_standalone() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let (cfg, secrets, _) = load(&Source::Manifests(vec![dir])).unwrap();
        assert!(cfg.routes.len() >= 4);
        assert!(!secrets.upstream_credentials.is_empty());
    }

    #[test]
    fn reload_keeps_old_config_on_broken_input_and_swaps_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("relay.json");
        let (cfg, _, _) = load(&Source::Embedded).unwrap();
        std::fs::write(&cfg_path, cfg.to_canonical_json()).unwrap();
        let h = ConfigHandle::open(Source::Files {
            config: cfg_path.clone(),
            secrets: None,
        })
        .unwrap();
        assert_eq!(h.get().generation, 1);
        assert!(h.reload().unwrap().is_none());

        std::fs::write(&cfg_path, "{ not json").unwrap();
        assert!(matches!(h.reload(), Err(ConfigError::Parse { .. })));
        assert_eq!(h.get().config, cfg);

        let mut changed = cfg.clone();
        changed.routes[0].priority = 7;
        std::fs::write(&cfg_path, changed.to_canonical_json()).unwrap();
        let snap = h.reload().unwrap().expect("changed");
        assert_eq!(snap.generation, 2);
        assert_eq!(h.get().config.routes[0].priority, 7);
    }

    #[test]
    fn a_version_1_document_loads_and_an_unknown_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.json");
        let doc = |v: u32| {
            format!(
                r#"{{"version":{v},"routes":[{{"id":"mail/r","priority":1,"target":{{"kind":"mx"}},"recipientDomains":["*"],"senders":{{}},"limits":{{}},"retry":{{"intervalSecs":60,"lifetimeSecs":600,"backoff":"fixed","maxIntervalSecs":600}}}}],"quotas":[]}}"#
            )
        };
        let source = Source::Files {
            config: path.clone(),
            secrets: None,
        };
        std::fs::write(&path, doc(1)).unwrap();
        let (cfg, _, _) = load(&source).unwrap();
        assert!(cfg.routes[0].authority.governs(Some("team-a")) && cfg.routes[0].authority.governs(None));
        std::fs::write(&path, doc(3)).unwrap();
        assert_eq!(
            load(&source).unwrap_err().to_string(),
            "unsupported config version 3 (this relay reads versions 1 to 2)"
        );
    }

    #[test]
    fn broken_manifests_fail_with_the_object_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.yaml");
        std::fs::write(
            &f,
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {name: r}\nspec: {host: h.test, port: 587, auth: {secretRef: {name: missing}}, match: {recipientDomains: ['*']}}\n",
        )
        .unwrap();
        let e = load(&Source::Manifests(vec![f])).unwrap_err().to_string();
        assert!(e.contains("default/r"), "{e}");
    }
}
