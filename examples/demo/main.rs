//! The README's demo, and a smoke test of the whole product: `bash scripts/demo.sh` builds this
//! and runs it.
//!
//! `demo` (or `demo postgres`) reads a PostgreSQL database's logical replication stream: it
//! starts a private PostgreSQL cluster, a physical standby of it replaying 200 ms behind (the
//! read replica of `freshness.replicas`) and redis-server on free loopback ports, fills Redis the
//! way a shop application would, runs the real `cdc-invalidator` binary, performs UPDATEs,
//! a DELETE and a TRUNCATE, and shows each cached key disappearing with the milliseconds since
//! the commit, a stale refill from the replica removed by the second pass, then the staleness
//! and settled seconds the daemon measured (`postgres.rs`).
//! `demo kafka` does the same through Debezium change events on a Kafka-protocol broker
//! (`kafka.rs`).
//! Both end by stopping the daemon with SIGTERM and checking it drained cleanly (exit code 0).
//!
//! Exit code 0 when every expected invalidation happened within 30 s and the daemon exited 0;
//! 1 otherwise (the work directory is then kept for inspection); 2 for an unknown argument.
//! Everything it started is stopped on every path, including errors and SIGINT/SIGTERM.
//!
//! Needs `redis-server` on PATH, the `cdc-invalidator` binary built next to this example
//! (`cargo build --release --bins --examples`), and PostgreSQL 15 under /usr/lib/postgresql
//! (or `PG_BIN`) or `TANSU_BIN` for the Kafka path. `DEMO_KEEP=1` keeps the work directory
//! (config, rules, logs, dead letters).

mod cache;
mod kafka;
mod postgres;
mod report;
mod services;

use std::process::ExitCode;
use std::time::{Duration, Instant};

type DemoResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How long each expected invalidation may take before the demo counts it as failed.
const INVALIDATION_DEADLINE: Duration = Duration::from_secs(30);
/// Services start in seconds at most; this only bounds a broken install.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// The daemon becomes ready once it streams (partitions assigned, or the slot held): a few
/// seconds at most.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM drains in-flight work within `shutdown.grace` (5 s in the demo's configs).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often Redis and the dead-letter file are polled while waiting for an invalidation.
/// (The times shown are at this resolution, give or take the timer's millisecond.)
const POLL: Duration = Duration::from_millis(1);

/// The rules file of the contract (`interface.md`, "The rules file"), as is.
const RULES: &str = r##"version: 1
rules:
  - name: product-pages                 # unique; shows up in metrics and explain output
    table: public.products              # schema.table, or a glob such as public.order_*
    ops: [insert, update, delete]       # default: insert, update, delete (snapshot reads are opt-in)
    when_changed: [price, name, category_id]  # updates only: skip unless one of these differs between before and after
    vars:
      locale: [en-us, fr, de]           # a template using {locale} expands once per value
    redis:
      keys: ["product:{id}", "product:{id}:page:{locale}"]
      tags: ["category:{category_id}"]  # every key in the Redis set "<tag_prefix><tag>" is unlinked, then the set itself
    cdn:
      surrogate_keys: ["product-{id}", "category-{category_id}"]
      urls: ["https://shop.example.com/p/{slug|urlencode}"]
    on_truncate:                        # optional, applies to truncates whatever `ops` says; no columns here
      redis: { tags: ["products:all"] }
"##;

/// Which source the demo runs.
#[derive(Clone, Copy)]
enum Source {
    Postgres,
    Kafka,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let source = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] | ["postgres"] => Source::Postgres,
        ["kafka"] => Source::Kafka,
        _ => {
            eprintln!("usage: demo [postgres|kafka]   (default: postgres)");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = match tempfile::Builder::new().prefix("cdc-invalidator-demo.").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demo: cannot create a work directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Dropping the demo's future (on success, error or signal) kills and reaps every process it started.
    let result = runtime.block_on(async {
        tokio::select! {
            // Signal handlers first: they are installed when `interrupted` is first polled.
            biased;
            signal = interrupted() => Err(format!("interrupted by {signal}; stopping everything").into()),
            r = async {
                match source {
                    Source::Postgres => postgres::run(dir.path()).await,
                    Source::Kafka => kafka::run(dir.path()).await,
                }
            } => r,
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let keep = std::env::var_os("DEMO_KEEP").is_some_and(|v| !v.is_empty() && v != "0");
    match result {
        Ok(()) => {
            if keep {
                println!("Work directory kept: {}", dir.keep().display());
            }
            println!("\nDemo passed in {secs:.1} s.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let kept = dir.keep();
            println!("\nDemo FAILED after {secs:.1} s: {e}");
            println!("Work directory kept for inspection: {}", kept.display());
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        // Cannot listen for signals: the default action (exit) applies, nothing to wait for.
        _ => std::future::pending().await,
    }
}
