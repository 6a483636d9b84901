//! Command-line entry point of the operator: `run` (the controller) and `crd` (CRD generation).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "mailroute-operator", version, about = "mailroute Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster (in-cluster service account or KUBECONFIG).
    Run(Box<mailroute_operator::app::RunArgs>),
    /// Print the CustomResourceDefinitions, or write them into a directory.
    Crd {
        /// Directory to write `smtproutes.yaml` and `senderquotas.yaml` into (default: print to stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => {
            // Feature unification can enable more than one rustls backend; pick ring explicitly
            // (as the connection tests do) so the Kubernetes client never has to guess.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let filter = EnvFilter::try_from_default_env()
                .or_else(|_| EnvFilter::try_new(&args.log_level))
                .context("invalid log filter")?;
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_env_filter(filter)
                .init();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(mailroute_operator::app::run(*args))?;
        }
        Command::Crd { out } => {
            for (file, yaml) in mailroute_operator::crdgen::crds()? {
                match &out {
                    Some(dir) => {
                        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                        let path = dir.join(file);
                        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                    }
                    None => print!("---\n{yaml}"),
                }
            }
        }
    }
    Ok(())
}
