//! The daemon: builds the source, the sinks (in layers), the dead-letter destination and the
//! telemetry from the configuration, runs the [`Pipeline`] between them, and shuts down.
//! The pipeline's stages themselves are in [`crate::pipeline`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::dead_letter::{DeadLetterError, DeadLetters};
use crate::rules::reload::{self, Reloader};
use crate::rules::Rules;
use crate::shutdown::Shutdown;
use crate::sink::Sink;
use crate::source::SourceError;
use crate::telemetry::events::sink::SinkPinged;
use crate::telemetry::{self, Health, Metrics};

pub use crate::pipeline::Pipeline;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Http(#[from] telemetry::http::HttpError),
    #[error("{0}")]
    Sink(String),
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("source task failed: {0}")]
    SourceTask(String),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error(transparent)]
    Freshness(#[from] crate::freshness::FreshnessError),
}

/// How often sinks are pinged for `/readyz` and `cdc_invalidator_sink_up`.
const PING_INTERVAL: Duration = Duration::from_secs(2);
/// How often a sink that is down is pinged: recovery is noticed within this.
const DOWN_PING_INTERVAL: Duration = Duration::from_millis(200);

/// Runs the daemon until `shutdown` stops it and everything in flight is finished or abandoned.
pub async fn run(config: Config, rules: Rules, metrics: Arc<Metrics>, shutdown: Shutdown) -> Result<(), AppError> {
    // Hot reload (SIGHUP, file changes), first so SIGHUP is handled from the start; the pipeline
    // picks the current rules once per batch.
    let (reloader, rules) = Reloader::new(&config.rules, Arc::new(rules), metrics.clone());
    let health = Arc::new(Health::default());
    let (addr, http) =
        telemetry::http::serve(config.metrics.listen, metrics.clone(), health.clone(), shutdown.clone()).await?;
    // Aborted however `run` returns: an early error below (a sink that cannot be built, a bad
    // replica) must not leave the port bound in a process that goes on (tests, an embedder).
    let _http = AbortOnDrop(http);
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");

    let (layers, sinks) = build_sinks(&config, &metrics)?;
    let kafka_config = config.source.kafka.as_ref();
    let dead_letters = DeadLetters::open(&config.dead_letter, kafka_config, metrics.clone()).await?;
    tracing::info!(destination = %dead_letters.describe(), "dead letters");
    // Before the source starts: a bad replica stops the daemon before it reads anything.
    let freshness = match config.freshness.enabled() {
        true => Some(start_freshness(&config, &metrics, &shutdown).await?),
        false => None,
    };

    let (tx, rx) = mpsc::channel(config.pipeline.queue_capacity);
    // The Kafka source decodes only the columns the running rules read (`rules::Projection`).
    let source = crate::source::build(&config.source, config.pipeline.queue_capacity, &rules, metrics.clone())?;
    tracing::info!(source = source.kind(), "reading changes");
    let stop = shutdown.clone();
    let source_task = tokio::spawn(async move { source.run(tx, stop).await.map_err(AppError::from) });

    let reloads = tokio::spawn(reloader.run(reload::POLL_INTERVAL, shutdown.clone()));
    let pinger = tokio::spawn(ping_sinks(sinks.clone(), health.clone(), metrics.clone(), shutdown.clone()));
    health.alive.store(true, Ordering::Relaxed);

    let initial = rules.borrow().clone();
    let mut pipeline = Pipeline::new(config.pipeline.clone(), initial, sinks, dead_letters, metrics.clone())
        .with_layers(layers, config.sinks.timing.clone())
        .with_rules_updates(rules);
    if let Some(replicas) = freshness {
        pipeline = pipeline.with_freshness(replicas);
    }
    let result = pipeline.run(rx, &shutdown).await;
    health.alive.store(false, Ordering::Relaxed);
    pinger.abort();
    reloads.abort();

    // The pipeline has finished or dropped every event: the source can make its final commit.
    let source_result = source_task.await;
    drop(_http);
    result?;
    match source_result {
        Ok(r) => r,
        Err(e) => Err(AppError::SourceTask(e.to_string())),
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The read replicas' pollers, after checking each replica once (a bad one is fatal at start;
/// one lost later only delays second passes up to `freshness.max_wait`).
async fn start_freshness(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> Result<crate::freshness::Replicas, AppError> {
    let source_id = match config.source.postgres_cluster() {
        Some(c) => crate::freshness::system_identifier(c).await,
        None => None,
    };
    let replicas =
        crate::freshness::Replicas::start(&config.freshness, source_id, metrics.clone(), shutdown.clone()).await?;
    tracing::info!(replicas = config.freshness.replicas.len(), "second passes wait for the read replicas");
    Ok(replicas)
}

/// Each sink's layer, and the sinks in layer order (parallel vectors).
pub type LayeredSinks = (Vec<u8>, Vec<Arc<dyn Sink>>);

/// The configured sinks in layer order: Redis (0), then HTTP caches (1), then CDNs (2), stable
/// within a layer; with each sink's layer. Shared by `run` and `replay`.
pub fn build_sinks(config: &Config, metrics: &Arc<Metrics>) -> Result<LayeredSinks, AppError> {
    Ok(config.sinks.build(metrics).map_err(AppError::Sink)?.into_iter().unzip())
}

async fn ping_sinks(sinks: Vec<Arc<dyn Sink>>, health: Arc<Health>, metrics: Arc<Metrics>, shutdown: Shutdown) {
    let mut up_now = vec![false; sinks.len()];
    let mut last_full = None::<tokio::time::Instant>;
    loop {
        // Every sink each PING_INTERVAL; a sink that is down each DOWN_PING_INTERVAL, so its
        // return is seen (and its waiting retries woken, see `crate::retry::Recovery`) at once.
        let full = last_full.is_none_or(|t| t.elapsed() >= PING_INTERVAL);
        if full {
            last_full = Some(tokio::time::Instant::now());
        }
        for (sink, up_now) in sinks.iter().zip(up_now.iter_mut()) {
            if full || !*up_now {
                let up = tokio::time::timeout(Duration::from_secs(2), sink.ping()).await.unwrap_or(false);
                metrics.emit(SinkPinged { sink: sink.name(), up });
                *up_now = up;
            }
        }
        health.sinks_ready.store(up_now.iter().all(|u| *u), Ordering::Relaxed);
        let wait = if up_now.iter().all(|u| *u) { PING_INTERVAL } else { DOWN_PING_INTERVAL };
        tokio::select! {
            _ = shutdown.abandoned() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
