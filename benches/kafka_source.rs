//! The Kafka source's own CPU per message: the real `KafkaSource` reading a pre-filled topic of
//! librdkafka's in-process mock cluster into a channel whose consumer acknowledges every event
//! at once, measured in CPU time (not wall clock, which moves with the load of a shared
//! machine).
//!
//! ```text
//! BENCH_EVENTS=200000 BENCH_RUNS=5 BENCH_ACK=each cargo bench --bench kafka_source
//! ```
//!
//! The topic (Debezium JSON updates shaped like `tests/support/events.rs` `product_update`, as
//! in the end-to-end benchmark (b), keyed by product id) is filled once; each run reads it from
//! the start with a new consumer group. It has 24 partitions (`BENCH_PARTITIONS`), not the 3
//! of (b): the mock cluster keeps only the last 5 MiB of each partition (about 10,000 of these
//! messages), so 200,000 need about 20. The window is from the first event received to the
//! moment the source has taken back every acknowledgement (`pending_events` back to 0), and the
//! CPU time (`/proc/self/task/*/schedstat`) of every thread in that window is summed per kind of
//! thread:
//!
//! - `tokio`: the two runtime workers, where the source task (select, schema resolution, JSON
//!   decoding, tracking, the hand-over) and the acknowledging task run; the figure to compare;
//! - `librdkafka`: every `rdk:` thread: the consumer's own (fetching, its queues) but also the
//!   mock cluster's broker threads serving the fetches and the producer's idle ones;
//! - `process`: everything.
//!
//! Each figure is the median over `BENCH_RUNS` runs, in microseconds per message. The JSON
//! decoding of the same messages alone (one thread, `Codec::decode`, as `to_event` calls it) is
//! printed too: `tokio` minus that is the source's overhead besides decoding, plus the trivial
//! acknowledging task. `BENCH_ACK=batch` acknowledges each received batch with
//! `Ack::finish_all` instead of one `Ack::finish` per event (what the pipeline's finish stage
//! can do). `BENCH_DEBUG=1` prints progress and every thread's CPU.
//!
//! Instructions of the source task alone, steadier than CPU time on a shared machine (neither
//! librdkafka's threads nor the acknowledging task are counted):
//!
//! ```text
//! BENCH_EVENTS=20000 BENCH_RUNS=1 BENCH_PARTITIONS=3 valgrind --tool=callgrind \
//!   '--toggle-collect=<cdc_invalidator::source::kafka::KafkaSource as cdc_invalidator::source::Source>::run::*' \
//!   target/release/deps/kafka_source-<hash>
//! ```

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_invalidator::config::{self, KafkaFormat};
use cdc_invalidator::shutdown;
use cdc_invalidator::source::encoded::{Codec, Resolved};
use cdc_invalidator::source::kafka::KafkaSource;
use cdc_invalidator::source::{Source, SourceEvent};
use cdc_invalidator::telemetry::Metrics;
use tokio::sync::mpsc;

use support::daemon::{write_config, Setup};
use support::events::product_update;
use support::kafka::MockKafka;

// The binary's allocator (src/main.rs): the figure depends on it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const TOPIC: &str = "bench.public.products";

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn key(i: usize) -> String {
    format!("{{\"id\":{}}}", i % 50_000)
}

fn value(i: usize) -> String {
    let id = (i % 50_000) as i64;
    product_update(id, id % 97, (id + 1) % 97)
}

/// CPU nanoseconds per thread of this process, keyed by thread id, with the thread's name.
fn threads() -> BTreeMap<u64, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else { continue };
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default().trim().to_string();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
            .unwrap_or(0);
        out.insert(tid, (comm, ns));
    }
    out
}

fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU seconds of one run's window, per kind of thread.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    tokio: f64,
    librdkafka: f64,
    process: f64,
    wall: f64,
}

fn window(before: &BTreeMap<u64, (String, u64)>, after: &BTreeMap<u64, (String, u64)>, wall: f64) -> Sample {
    let mut s = Sample { wall, ..Sample::default() };
    for (tid, (comm, ns)) in after {
        let start = before.get(tid).map(|(_, n)| *n).unwrap_or(0);
        let secs = ns.saturating_sub(start) as f64 / 1e9;
        s.process += secs;
        if std::env::var("BENCH_DEBUG").is_ok() {
            eprintln!("thread {tid} {comm}: {secs:.3}");
        }
        if comm.starts_with("tokio-r") {
            s.tokio += secs;
        } else if comm.starts_with("rdk:") {
            s.librdkafka += secs;
        }
    }
    s
}

fn main() {
    let total: usize = env("BENCH_EVENTS", 200_000);
    let runs: usize = env("BENCH_RUNS", 5);
    let batch_acks = std::env::var("BENCH_ACK").is_ok_and(|v| v == "batch");

    // Decoding alone, on this thread, for reference.
    let codec = Codec::with_registry(KafkaFormat::Json, None);
    let topic: Arc<str> = Arc::from(TOPIC);
    let messages: Vec<(String, String)> = (0..total.min(50_000)).map(|i| (key(i), value(i))).collect();
    let t0 = thread_cpu_ns();
    let mut ok = 0usize;
    for i in 0..total {
        let (k, v) = &messages[i % messages.len()];
        ok += codec.decode(&Resolved::plain(), &topic, Some(k.as_bytes()), Some(v.as_bytes())).is_ok() as usize;
    }
    let decode_us = (thread_cpu_ns() - t0) as f64 / 1e3 / total as f64;
    assert_eq!(ok, total);
    drop(messages);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mock = MockKafka::start(1);
    let partitions: i32 = env("BENCH_PARTITIONS", 24);
    mock.create_topic(TOPIC, partitions);
    let bootstrap = mock.bootstrap();
    let t = Instant::now();
    runtime.block_on(async {
        let mut i = 0;
        while i < total {
            let end = (i + 5_000).min(total);
            let batch: Vec<(String, String)> = (i..end).map(|j| (key(j), value(j))).collect();
            futures::future::join_all(batch.iter().map(|(k, v)| mock.produce(TOPIC, None, Some(k), Some(v)))).await;
            i = end;
        }
    });
    mock.flush();
    println!(
        "kafka_source: {total} messages in {partitions} partitions produced in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let mut samples = Vec::new();
    for run in 0..runs {
        let group = format!("bench-source-{run}");
        let (path, _) = write_config(
            dir.path(),
            &Setup {
                bootstrap: &bootstrap,
                topics: &[TOPIC],
                group: &group,
                redis_url: "redis://127.0.0.1:9",
                extra: "",
                librdkafka: &[],
            },
        );
        let config = config::load_with_env(&path, []).expect("bench config");
        let kafka = config.source.kafka.as_ref().expect("source.kafka");
        let metrics = Arc::new(Metrics::new());
        let _runtime = runtime.enter();
        let source = KafkaSource::new(kafka, metrics.clone()).expect("source");
        let s =
            runtime.block_on(measured(Box::new(source), config.pipeline.queue_capacity, metrics, total, batch_acks));
        println!(
            "run {run}: tokio {:.3} s, librdkafka {:.3} s, process {:.3} s of CPU, {:.2} s wall",
            s.tokio, s.librdkafka, s.process, s.wall
        );
        samples.push(s);
    }
    let median = |f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e6 / total as f64
    };
    println!(
        "kafka_source ({} acks, {total} events, median of {runs}): tokio {:.2} us/event (decoding alone {decode_us:.2}), librdkafka {:.2}, process {:.2} us/event of CPU; wall {:.2} us/event",
        if batch_acks { "batched" } else { "one-by-one" },
        median(|s| s.tokio),
        median(|s| s.librdkafka),
        median(|s| s.process),
        median(|s| s.wall),
    );
}

/// Runs the source until every event is received and its acknowledgement taken back by the
/// source; returns the CPU of that window.
async fn measured(
    source: Box<dyn Source>,
    capacity: usize,
    metrics: Arc<Metrics>,
    total: usize,
    batch_acks: bool,
) -> Sample {
    let (trigger, shutdown) = shutdown::channel();
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(capacity);
    let run = tokio::spawn(source.run(tx, shutdown));
    let acker = tokio::spawn(async move {
        let mut buf: Vec<SourceEvent> = Vec::with_capacity(256);
        // The first event opens the window.
        let first = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("first event in 60 s");
        let before = threads();
        let started = Instant::now();
        let mut n = 0;
        if let Some(ev) = first {
            n += 1;
            ev.ack.finish();
        }
        while n < total {
            match tokio::time::timeout(Duration::from_secs(20), rx.recv_many(&mut buf, 256)).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => {
                    panic!("only {n} of {total} events in: more than the mock cluster keeps (5 MiB a partition)?")
                }
            }
            n += buf.len();
            if std::env::var("BENCH_DEBUG").is_ok() && n % 10_000 < buf.len() {
                eprintln!("{n} received");
            }
            if batch_acks {
                cdc_invalidator::source::Ack::finish_all(buf.drain(..).map(|ev| ev.ack));
            } else {
                for ev in buf.drain(..) {
                    ev.ack.finish();
                }
            }
        }
        assert_eq!(n, total, "every event received");
        (rx, before, started)
    });
    let (rx, before, started) = acker.await.expect("acker");
    // The source has taken back every acknowledgement.
    while metrics.pending_events.get() > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let sample = window(&before, &threads(), started.elapsed().as_secs_f64());
    trigger.stop_intake();
    drop(rx);
    run.await.expect("source task").expect("source run");
    sample
}
