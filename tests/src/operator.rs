//! Running mailroute's own binaries against the control plane of [`crate::k8s`]: owns finding the
//! operator and relay binaries `cargo test` built, applying the Helm chart's operator RBAC, and
//! starting the operator with a ServiceAccount's token as the chart runs it. It must not start a
//! control plane or run anything as admin.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;
use serde::Deserialize as _;

use crate::k8s::{ControlPlane, Process, free_port, run, workspace_root};

/// A binary `cargo test` built next to the test (`target/debug/<name>`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .context("target directory")?;
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build -p mailroute-operator -p mailroute-relay -p mailroute-cli` first (scripts/test.sh does)",
        bin.display()
    );
    Ok(bin)
}

/// Renders the chart's operator RBAC and ServiceAccount for release `release` in `ns`, applies
/// them, and returns the ServiceAccount's name.
pub fn install_chart_rbac(cp: &ControlPlane, release: &str, ns: &str) -> anyhow::Result<String> {
    install_chart_rbac_with(cp, release, ns, &[])
}

/// [`install_chart_rbac`] with further `--set` values (e.g. `podIdentities.enabled=true`).
pub fn install_chart_rbac_with(cp: &ControlPlane, release: &str, ns: &str, sets: &[&str]) -> anyhow::Result<String> {
    let chart = workspace_root().join("charts/mailroute");
    let mut helm = cp.helm();
    helm.args(["template", release]).arg(&chart).args([
        "--namespace",
        ns,
        "--show-only",
        "templates/operator-rbac.yaml",
        "--show-only",
        "templates/operator-serviceaccount.yaml",
        // The source tree's chart renders only with named images.
        "--set",
        "image.tag=k8s-suite",
    ]);
    for s in sets {
        helm.args(["--set", s]);
    }
    let rendered = run(&mut helm)?;
    let mut sa = None;
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        let v = serde_json::Value::deserialize(doc)?;
        if v["kind"] == "ServiceAccount" {
            sa = v["metadata"]["name"].as_str().map(str::to_string);
        }
    }
    let path = cp.dir.join(format!("{release}-rbac.yaml"));
    std::fs::write(&path, &rendered)?;
    run(cp.kubectl().args(["apply", "--server-side", "-n", ns, "-f"]).arg(&path))?;
    sa.context("the chart renders no ServiceAccount")
}

/// Starts the operator binary (fleet `mailroute`) as the chart runs it, authenticated by
/// `kubeconfig`, watching only `ns` (other tests of the binary run their own routes).
pub fn start_operator(
    cp: &ControlPlane,
    kubeconfig: &Path,
    ns: &str,
    name: &str,
    extra: &[&str],
) -> anyhow::Result<Process> {
    let health = free_port()?;
    let mut cmd = Command::new(binary("mailroute-operator")?);
    cmd.env_clear()
        .env("KUBECONFIG", kubeconfig)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .args([
            "run".to_string(),
            "--fleet=mailroute".to_string(),
            format!("--namespace={ns}"),
            format!("--health-listen=127.0.0.1:{health}"),
            "--leader-elect=true".to_string(),
            format!("--lease-name={name}"),
            format!("--identity={name}"),
            "--connection-test-timeout=10s".to_string(),
            "--debounce=200ms".to_string(),
            format!("--watch-namespaces={ns}"),
        ])
        .args(extra)
        .stdin(Stdio::null());
    Process::start(name, cmd, cp.dir.join(format!("{ns}-{name}.log")))
}

/// The lines of a log in which the API server refused something.
pub fn forbidden(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Forbidden") || l.contains("forbidden"))
        .map(str::to_string)
        .collect()
}
