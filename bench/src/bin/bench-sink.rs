//! `bench-sink`: a fast SMTP sink on loopback that accepts and discards every message, counting
//! them; `GET /stats` on the HTTP address returns the counters as JSON. Prints
//! `LISTENING smtp=ADDR http=ADDR` once both sockets are bound (port 0 picks free ports).

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use mailroute_bench::sink_server::{SinkCounters, serve_http, serve_smtp};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(about = "SMTP sink that counts and discards messages")]
struct Args {
    /// SMTP listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    smtp: String,
    /// HTTP stats listen address (`GET /stats`).
    #[arg(long, default_value = "127.0.0.1:0")]
    http: String,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    rt.enable_all().build()?.block_on(async {
        let smtp = TcpListener::bind(&args.smtp)
            .await
            .with_context(|| format!("binding {}", args.smtp))?;
        let http = TcpListener::bind(&args.http)
            .await
            .with_context(|| format!("binding {}", args.http))?;
        println!("LISTENING smtp={} http={}", smtp.local_addr()?, http.local_addr()?);
        let counters = Arc::new(SinkCounters::default());
        tokio::select! {
            r = serve_smtp(smtp, counters.clone()) => r.context("smtp listener")?,
            r = serve_http(http, counters) => r.context("http listener")?,
        }
        Ok(())
    })
}
