//! The daemon's own work per event, as an instruction count: the Kafka source's decoding, then
//! the pipeline's stages (intake with rules and coalescing, the Redis layer with a real
//! redis-server, finish with its acknowledgements), on one thread, everything but librdkafka.
//!
//! Made for callgrind, whose counts do not move with the machine's load (wall-clock figures
//! on a shared machine do):
//!
//! ```text
//! BENCH_EVENTS=20000 valgrind --tool=callgrind --toggle-collect='*pipeline_cost*measured*' \
//!     target/release/deps/pipeline_cost-<hash>
//! ```
//!
//! Only `measured` (feeding the events, running every stage until every event is acknowledged)
//! is counted; building the messages, starting Redis and the sink are not. Divide the total by
//! BENCH_EVENTS. The events are those of the end-to-end benchmark (b): Debezium updates of 50,000
//! products in 97 categories, one key and two tags each. Without valgrind it prints its rate,
//! which is not a figure to quote (one thread, a loaded machine).
//!
//! The batches intake gathers depend on the wall clock (`batch_idle_wait`, `batch_max_wait`), so
//! under the default settings the total moves by a few percent from run to run with the batch
//! sizes (46 to 89 units for 20,000 events: larger batches allocate in larger bursts, which
//! cost the allocator more). `BENCH_FULL_BATCHES=1` makes every batch a full one
//! (`batch_max_events`, a fixed window that only closes when full or when the source ends), so
//! that two builds can be compared count for count. `BENCH_BATCH_EVENTS=N` sets
//! `pipeline.batch_max_events` (500 by default): with full batches, the difference between two
//! sizes is the cost of the stages' hand-overs per unit.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cdc_invalidator::app;
use cdc_invalidator::config::{self, KafkaFormat};
use cdc_invalidator::dead_letter::DeadLetters;
use cdc_invalidator::pipeline::Pipeline;
use cdc_invalidator::rules::{Projection, Rules};
use cdc_invalidator::shutdown;
use cdc_invalidator::source::encoded::{Codec, Resolved};
use cdc_invalidator::source::{Ack, Finished, Position, RawMessage, SourceEvent};
use cdc_invalidator::telemetry::Metrics;
use tokio::sync::mpsc;

use support::daemon::{write_config, Setup};
use support::events::product_update;
use support::redis::RedisServer;

// The binary's allocator (src/main.rs): the figure depends on it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const TOPIC: &str = "bench.public.products";

/// One Kafka message as the source reads it.
struct Message {
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    value: Vec<u8>,
}

fn main() {
    let total: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let messages: Vec<Message> = (0..total)
        .map(|i| {
            let id = (i % 50_000) as i64;
            Message {
                partition: (i % 3) as i32,
                offset: (i / 3) as i64,
                key: format!("{{\"id\":{id}}}").into_bytes(),
                value: product_update(id, id % 97, (id + 1) % 97).into_bytes(),
            }
        })
        .collect();

    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let full_batches = std::env::var("BENCH_FULL_BATCHES").is_ok_and(|v| v == "1");
    let mut extra =
        String::from(if full_batches { "pipeline:\n  batch_max_wait: 60s\n  batch_idle_wait: 60s\n" } else { "" });
    if let Some(n) = std::env::var("BENCH_BATCH_EVENTS").ok().and_then(|v| v.parse::<usize>().ok()) {
        if !full_batches {
            extra.push_str("pipeline:\n");
        }
        extra.push_str(&format!("  batch_max_events: {n}\n"));
    }
    let (path, _) = write_config(
        dir.path(),
        &Setup {
            bootstrap: "127.0.0.1:9",
            topics: &[TOPIC],
            group: "bench-cost",
            redis_url: &redis.url(),
            extra: &extra,
            librdkafka: &[],
        },
    );
    let config = config::load_with_env(&path, []).expect("bench config");
    let rules = Rules::from_file(&config.rules).expect("bench rules");
    // The source decodes the columns the running rules read (`Codec::projection`).
    let projection = rules.projection().clone();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let metrics = Arc::new(Metrics::new());
    let pipeline = runtime.block_on(async {
        let (layers, sinks) = app::build_sinks(&config, &metrics).expect("sinks");
        // Connect before counting.
        for sink in &sinks {
            assert!(sink.ping().await, "redis-server answers");
        }
        let dead_letters = DeadLetters::open(&config.dead_letter, None, metrics.clone()).await.expect("dead letters");
        Pipeline::new(config.pipeline.clone(), Arc::new(rules), sinks, dead_letters, metrics.clone())
            .with_layers(layers, config.sinks.timing.clone())
    });

    let started = Instant::now();
    let acked = measured(&runtime, pipeline, &messages, &projection);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "pipeline_cost: {acked} of {total} events acknowledged in {secs:.2} s ({:.0} events/s on one thread; count instructions with callgrind instead)",
        acked as f64 / secs
    );
    assert_eq!(acked, total, "every event acknowledged");
}

/// Feeds every message through decoding into the pipeline, as the Kafka source does, and runs
/// the pipeline until every event is acknowledged. Returns the number of acknowledgements.
#[inline(never)]
fn measured(
    runtime: &tokio::runtime::Runtime,
    pipeline: Pipeline,
    messages: &[Message],
    projection: &Projection,
) -> usize {
    runtime.block_on(async {
        let (trigger, shutdown) = shutdown::channel();
        let capacity = 4096;
        let (tx, rx) = mpsc::channel(capacity);
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Finished>();
        let run = tokio::spawn(async move { pipeline.run(rx, &shutdown).await });
        let codec = Codec::with_registry(KafkaFormat::Json, None);
        let topic: Arc<str> = Arc::from(TOPIC);
        let mut acked = 0;
        for m in messages {
            // What the source does per message (src/source/kafka/mod.rs, `to_event`).
            let decoded = codec
                .decode_projected(&Resolved::plain(), &topic, Some(&m.key), Some(&m.value), Some(projection))
                .map_err(cdc_invalidator::source::Malformed);
            let event = SourceEvent {
                position: Position::Kafka { topic: topic.clone(), partition: m.partition, offset: m.offset },
                decoded,
                raw: RawMessage { topic: Some(topic.clone()), key: Some(m.key.clone()), value: Some(m.value.clone()) },
                logged_at: Some(SystemTime::now()),
                received: Instant::now(),
                ack: Ack::new(ack_tx.clone(), Finished { stream: m.partition as u64, seq: m.offset }),
            };
            tx.send(event).await.expect("pipeline running");
            while ack_rx.try_recv().is_ok() {
                acked += 1;
            }
        }
        drop(tx);
        drop(ack_tx);
        while tokio::time::timeout(Duration::from_secs(30), ack_rx.recv()).await.ok().flatten().is_some() {
            acked += 1;
        }
        run.await.expect("pipeline task").expect("pipeline run");
        drop(trigger);
        acked
    })
}
