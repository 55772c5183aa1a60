//! The commands: `run`, `check`, `explain` (the user-facing contract, `docs/interface.md`).
//!
//! Each returns the process exit code. Errors are printed to stderr as one sentence each, naming
//! the file (and line and column for YAML/JSON); nothing here panics on bad input.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::rules::Rules;
use crate::shutdown;
use crate::telemetry::{self, Metrics};

#[derive(Debug, Parser)]
#[command(
    name = "cdc-invalidator",
    version,
    about = "Invalidates cache keys, tags and CDN objects from database change events"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consume changes, invalidate, export metrics, until SIGTERM/SIGINT.
    Run {
        /// The config file (YAML, or TOML by extension).
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Validate the config and the rules file it names; prints `ok` or every problem found.
    Check {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// Also check the rules against the PostgreSQL schema (source.kind: postgres): tables,
        /// publication membership, columns and replica identities; and each of
        /// `freshness.replicas` (any source).
        #[arg(long)]
        against_db: bool,
    },
    /// Decode one change event and print what would be invalidated, touching nothing.
    Explain {
        /// The rules file.
        #[arg(long)]
        rules: PathBuf,
        /// A file holding one Kafka message value (`-` for stdin).
        #[arg(long)]
        event: PathBuf,
        /// A file holding the message key.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The topic the message came from (names the table when the event does not).
        #[arg(long)]
        topic: Option<String>,
        /// How the key and value are encoded: json (default), avro, protobuf or auto, as
        /// `source.kafka.format`.
        #[arg(long)]
        format: Option<String>,
        /// The schema registry to fetch Avro/Protobuf schemas from (`http(s)://host:port`).
        #[arg(long)]
        schema_registry: Option<String>,
    },
    /// Re-run dead-lettered events (or any Debezium messages) through the current rules and sinks.
    ///
    /// Exit codes: 0 every record replayed; 3 done, but some records were skipped as bad (each
    /// reported with its line number) or were dead-lettered again; 2 invalid config or rules; 1 a
    /// fatal error.
    Replay {
        /// The config file: rules, sinks and dead-letter destination of the daemon.
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// A JSON-lines file: dead-letter records (the daemon's `dead_letter.file`) or Debezium
        /// message values, one per line.
        #[arg(long, conflicts_with = "kafka_topic", required_unless_present = "kafka_topic")]
        file: Option<PathBuf>,
        /// A Kafka topic to read from its beginning to its current end (the dead-letter topic),
        /// on `dead_letter.kafka.brokers` or the source's brokers.
        #[arg(long)]
        kafka_topic: Option<String>,
        /// The topic plain Debezium messages came from (dead-letter records carry their own).
        #[arg(long)]
        topic: Option<String>,
        /// Print what would be invalidated (one `explain` object per record, with its position)
        /// and touch nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Invalidate the given items now, through the configured sinks in layer order; prints what
    /// each sink confirmed or rejected as JSON.
    ///
    /// Exit codes: 0 every sink confirmed everything; 1 something was rejected, failed, timed
    /// out or was skipped; 2 invalid config or arguments, or an item kind no configured sink
    /// serves.
    Purge {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        #[command(flatten)]
        items: crate::purge::Items,
        /// Give up on sinks still working after this long (`30s`, `500ms`, `2m`).
        #[arg(long, default_value = "30s", value_parser = crate::config::duration::parse)]
        timeout: std::time::Duration,
    },
}

/// Exit codes of the contract.
const OK: u8 = 0;
const FAILED: u8 = 1;
const INVALID: u8 = 2;
/// `run`: the shutdown grace period ran out and in-flight work was abandoned unacknowledged
/// (it is redelivered on the next start). Not 0, so a supervisor can tell it from a clean drain;
/// not 1, since nothing is broken. `replay` uses 3 alike for "done, but not everything".
const INCOMPLETE: u8 = 3;

fn print_problems(err: &dyn std::fmt::Display) {
    for line in crate::redact::scrub(&err.to_string()).lines() {
        eprintln!("{line}");
    }
}

/// Loads and validates config and rules, printing every problem.
fn load(config_path: &Path) -> Result<(Config, Rules), u8> {
    let mut failed = false;
    let config = match config::load(config_path) {
        Ok(c) => {
            crate::source::debezium::configure(&c.source.debezium);
            Some(c)
        }
        Err(e) => {
            print_problems(&e);
            failed = true;
            None
        }
    };
    // A Redis deployment that contradicts sinks.redis.mode (a cluster behind mode: standalone).
    for problem in config.as_ref().map(|c| crate::sink::redis::preflight::check(config_path, c)).unwrap_or_default() {
        print_problems(&problem);
        failed = true;
    }
    let rules = match &config {
        Some(c) => match Rules::from_file(&c.rules) {
            Ok(r) => Some(r),
            Err(e) => {
                print_problems(&e);
                failed = true;
                None
            }
        },
        None => None,
    };
    match (config, rules) {
        (Some(c), Some(r)) if !failed => Ok((c, r)),
        _ => Err(INVALID),
    }
}

pub fn check(config_path: &Path, against_db: bool) -> ExitCode {
    match load(config_path) {
        Ok((config, rules)) if against_db => crate::source::postgres::check::run_cli(&config, &rules),
        Ok(_) => {
            println!("ok");
            ExitCode::from(OK)
        }
        Err(code) => ExitCode::from(code),
    }
}

pub fn run(config_path: &Path) -> ExitCode {
    let (config, rules) = match load(config_path) {
        Ok(v) => v,
        Err(code) => return ExitCode::from(code),
    };
    telemetry::logging::init(config.log.format, &config.log.level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("cdc-invalidator").build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(FAILED);
        }
    };
    let grace = config.shutdown.grace;
    let result = runtime.block_on(async move {
        let (trigger, shutdown) = shutdown::channel();
        let abandoned = shutdown.clone();
        let metrics = Arc::new(Metrics::new());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let signals = tokio::spawn(shutdown::on_signals(trigger, grace, async move {
            let _ = done_rx.await;
        }));
        tracing::info!(rules = rules.len(), "cdc-invalidator {} starting", env!("CARGO_PKG_VERSION"));
        let result = crate::app::run(config, rules, metrics, shutdown).await;
        let _ = done_tx.send(());
        let _ = signals.await;
        result.map(|()| abandoned.is_abandoned())
    });
    // librdkafka threads may still be winding down; do not wait for them forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(false) => {
            tracing::info!("drained; exiting");
            ExitCode::from(OK)
        }
        Ok(true) => {
            tracing::warn!(
                code = INCOMPLETE,
                "exiting before the drain finished: abandoned work is redelivered on the next start"
            );
            ExitCode::from(INCOMPLETE)
        }
        Err(e) => {
            tracing::error!(error = %e, "fatal");
            eprintln!("cdc-invalidator: {}", crate::redact::scrub(&e.to_string()));
            // A listed read replica that is a primary or another cluster's: the config is wrong,
            // and a restart will not fix it.
            let invalid = matches!(&e, crate::app::AppError::Freshness(f) if f.is_invalid_config());
            ExitCode::from(if invalid { INVALID } else { FAILED })
        }
    }
}

/// `explain --format F --schema-registry URL`: the message decoded as the Kafka source decodes
/// it with `source.kafka.format: F` (one registry request per schema, no retries).
fn explain_encoded(
    rules_path: &Path,
    event: &Path,
    key: Option<&Path>,
    topic: Option<&str>,
    (format, registry_url): (Option<String>, Option<String>),
) -> ExitCode {
    use crate::config::{KafkaFormat, SchemaRegistryConfig};
    let format = match format.as_deref().unwrap_or("auto") {
        "json" => KafkaFormat::Json,
        "avro" => KafkaFormat::Avro,
        "protobuf" => KafkaFormat::Protobuf,
        "auto" => KafkaFormat::Auto,
        other => {
            eprintln!("--format {other}: expected json, avro, protobuf or auto");
            return ExitCode::from(INVALID);
        }
    };
    let Some(url) = registry_url else {
        eprintln!("--format {format:?} needs --schema-registry URL");
        return ExitCode::from(INVALID);
    };
    let rules = match Rules::from_file(rules_path) {
        Ok(r) => r,
        Err(e) => {
            print_problems(&e);
            return ExitCode::from(INVALID);
        }
    };
    let read = |path: &Path| std::fs::read(path).map_err(|e| eprintln!("{}: cannot read it: {e}", path.display()));
    let Ok(value) = read(event) else { return ExitCode::from(FAILED) };
    let key = match key.map(read).transpose() {
        Ok(k) => k,
        Err(()) => return ExitCode::from(FAILED),
    };
    let value = (!value.is_empty()).then_some(value);
    let config = SchemaRegistryConfig {
        url,
        basic_auth_user: std::env::var("SCHEMA_REGISTRY_USER").ok(),
        basic_auth_password: None,
        basic_auth_password_env: None,
        basic_auth_password_file: None,
        ca_file: None,
        timeout: std::time::Duration::from_secs(10),
        resolved_password: std::env::var("SCHEMA_REGISTRY_PASSWORD").ok().map(crate::config::Secret::new),
    };
    let registry = match crate::source::registry::Registry::new(&config) {
        Ok(r) => std::sync::Arc::new(r),
        Err(e) => {
            eprintln!("--schema-registry: {e}");
            return ExitCode::from(INVALID);
        }
    };
    let codec = crate::source::encoded::Codec::with_registry(format, Some(registry));
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return ExitCode::from(FAILED);
        }
    };
    let resolved = runtime.block_on(codec.resolve_once(key.as_deref(), value.as_deref()));
    match codec.decode(&resolved, topic.unwrap_or(""), key.as_deref(), value.as_deref()) {
        Ok(decoded) => match serde_json::to_string(&crate::explain::explanation(&rules, decoded)) {
            Ok(json) => {
                println!("{json}");
                ExitCode::from(OK)
            }
            Err(e) => {
                eprintln!("cannot print the explanation: {e}");
                ExitCode::from(FAILED)
            }
        },
        Err(e) => {
            eprintln!("{}: {e}", event.display());
            ExitCode::from(FAILED)
        }
    }
}

fn read_input(path: &Path) -> std::io::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(path)
    }
}

/// `replay`: see [`crate::replay`].
pub fn replay(config_path: &Path, options: crate::replay::Options) -> ExitCode {
    let (config, rules) = match load(config_path) {
        Ok(v) => v,
        Err(code) => return ExitCode::from(code),
    };
    // Logs (Kafka client warnings, sink retries) go to stderr with the summary; stdout carries
    // only the dry run's JSON lines.
    telemetry::logging::init(config.log.format, &config.log.level);
    ExitCode::from(crate::replay::main(config, rules, options))
}

pub fn explain(rules_path: &Path, event: &Path, key: Option<&Path>, topic: Option<&str>) -> ExitCode {
    let rules = match Rules::from_file(rules_path) {
        Ok(r) => r,
        Err(e) => {
            print_problems(&e);
            return ExitCode::from(INVALID);
        }
    };
    let value = match read_input(event) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{}: cannot read the event: {e}", event.display());
            return ExitCode::from(FAILED);
        }
    };
    let key = match key.map(std::fs::read).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{}: cannot read the key: {e}", key.map(|k| k.display().to_string()).unwrap_or_default());
            return ExitCode::from(FAILED);
        }
    };
    // An empty file is a tombstone too (kcat writes a null value as nothing).
    let value = (!value.iter().all(u8::is_ascii_whitespace)).then_some(value);
    match crate::explain::explain_message(&rules, topic.unwrap_or(""), key.as_deref(), value.as_deref()) {
        Ok(explanation) => {
            match serde_json::to_string(&explanation) {
                Ok(json) => println!("{json}"),
                Err(e) => {
                    eprintln!("cannot print the explanation: {e}");
                    return ExitCode::from(FAILED);
                }
            }
            ExitCode::from(OK)
        }
        Err(e) => {
            eprintln!("{}: {e}", event.display());
            ExitCode::from(FAILED)
        }
    }
}

/// Entry point: parse arguments (clap prints help and usage errors itself, exit 2) and dispatch.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config, against_db } => check(&config, against_db),
        Command::Explain { rules, event, key, topic, format, schema_registry } => {
            let encoding = (format, schema_registry);
            if encoding.0.as_deref().is_some_and(|f| f != "json") || encoding.1.is_some() {
                explain_encoded(&rules, &event, key.as_deref(), topic.as_deref(), encoding)
            } else {
                explain(&rules, &event, key.as_deref(), topic.as_deref())
            }
        }
        Command::Replay { config, file, kafka_topic, topic, dry_run } => {
            let input = match (file, kafka_topic) {
                (Some(f), _) => crate::replay::Input::File(f),
                (None, Some(topic)) => crate::replay::Input::Kafka { topic },
                // clap requires one of them.
                (None, None) => return ExitCode::from(INVALID),
            };
            replay(&config, crate::replay::Options { input, topic, dry_run })
        }
        Command::Purge { config, items, timeout } => ExitCode::from(crate::purge::main(&config, items, timeout)),
    }
}
