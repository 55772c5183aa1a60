//! Benchmarks (b) and (c): the daemon (the release binary, as its own process) against a broker
//! and a real Redis (both private, on loopback).
//!
//! (b) throughput and memory, in one run: events/s from a pre-filled 3-partition Tansu topic to
//!     Redis invalidated and the offsets committed, side by side with the two ceilings measured
//!     right after on the same machine (a bare librdkafka consumer reading the same topic;
//!     redis-benchmark sending multi-key UNLINKs), their ratio, and the daemon's peak RSS
//!     (/proc/<pid>/status VmHWM, reset between phases with `clear_refs`, plus VmRSS sampled
//!     every 50 ms) while catching up, and through a Redis outage (Redis stopped for
//!     BENCH_OUTAGE_SECONDS while the producer goes on at BENCH_OUTAGE_RATE, then restarted and
//!     the backlog caught up), with the catch-up's own ceiling (a bare consumer reading the same
//!     outage backlog with the daemon's fetch settings). Printed as one table.
//! (c) staleness: p50/p99 of database-commit-to-Redis-confirmed at a steady 5,000 events/s with
//!     a 5 ms batch wait, split into the upstream share (commit -> entering the daemon) and the
//!     daemon's own (entering -> confirmed), once per broker: librdkafka's mock cluster (in this
//!     process) and Tansu (out of process); each followed by the broker path alone at the same
//!     rate for reference.
//!
//! `cargo bench --bench end_to_end` (needs TANSU_BIN or scripts/install-deps.sh first).
//! Knobs: BENCH_PARTS (b, c), BENCH_EVENTS (200000), BENCH_OUTAGE_SECONDS (60; 0 skips the
//! outage), BENCH_OUTAGE_RATE (5000 events/s), BENCH_OUTAGE_FRESH (set: a second daemon reads
//! the outage events without having been through the outage, for comparison), BENCH_UNLINK_KEYS (keys per UNLINK in the Redis
//! ceiling, 500), BENCH_C_BROKERS (mock,tansu), BENCH_DAEMON (process, in_process: then the RSS
//! is this whole process's), BENCH_FETCH_WAIT_MS, BENCH_STATS_MS, BENCH_QUEUE_CAPACITY (the
//! daemon's `pipeline.queue_capacity`), BENCH_DAEMON_EXTRA (more
//! librdkafka settings for the daemon, "key=value,...", in (b) and (c)),
//! BENCH_CEILINGS (0: skip the ceilings, for runs that only measure memory), BENCH_DAEMON_WRAPPER (a command the daemon runs under, such as
//! "valgrind --tool=massif --massif-out-file=/tmp/m.out": memory profiling; the log stays in
//! the run's temporary directory, BENCH_KEEP_DIR keeps it), BENCH_REF_EXTRA, BENCH_REF_SECONDS, BENCH_COMMIT_INTERVAL, BENCH_REDIS (standalone, or
//! cluster: a private 3-primary/3-replica Redis Cluster, `mode: cluster`, WAIT 1 per slot
//! pipeline by default; cluster_nowait: the same with `wait_replicas: { count: 0 }`; the outage
//! and the Redis ceiling then use the standalone server, so use BENCH_OUTAGE_SECONDS=0).

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use support::daemon::{http_get, series_sum, write_config, Daemon, DaemonProcess, Setup};
use support::events::product_update;
use support::redis::RedisServer;
use support::tansu::TansuBroker;

static SEND_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// BENCH_REDIS=cluster: the cluster's seed URLs, quoted and comma-separated, for the config.
static CLUSTER_NODES: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer")
}

/// Sends the `i`th update (product `i % 50,000`, moving between two of 97 categories) in a task
/// of its own; a failed send is counted in SEND_ERRORS.
fn send_update(p: &FutureProducer, topic: &str, i: usize) -> tokio::task::JoinHandle<()> {
    let id = (i % 50_000) as i64;
    let value = product_update(id, id % 97, (id + 1) % 97);
    let key = format!("{{\"id\":{id}}}");
    let p = p.clone();
    let topic = topic.to_string();
    tokio::spawn(async move {
        if p.send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(120)).await.is_err() {
            SEND_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    })
}

/// Sends `n` updates as fast as the broker takes them.
async fn fill(p: &FutureProducer, topic: &str, n: usize) {
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..n {
        pending.push(send_update(p, topic, i));
        if pending.len() == 10_000 {
            for h in pending.drain(..) {
                let _ = h.await;
            }
        }
    }
    for h in pending {
        let _ = h.await;
    }
    p.flush(Duration::from_secs(30)).expect("flush");
}

/// p-quantile from the exported histogram buckets, interpolated within a bucket as Prometheus'
/// histogram_quantile does.
/// `labels` selects the series: `sink="redis",` or empty for an unlabelled histogram.
fn quantile(exposition: &str, metric: &str, labels: &str, q: f64) -> f64 {
    let prefix = format!("{metric}_bucket{{{labels}le=\"");
    let mut buckets: Vec<(f64, f64)> = exposition
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let within = if count > prev.1 { (rank - prev.1) / (count - prev.1) } else { 0.0 };
            return prev.0 + (le - prev.0) * within;
        }
        prev = (le, count);
    }
    f64::NAN
}

/// Reads `skip + n` messages with a plain consumer group member of `group` (`fetch.wait.max.ms`
/// 5, then `extra`); returns how many of the last `n` it read and how long they took, from the
/// first of them to the last.
async fn bare_consume(
    bootstrap: &str,
    topic: &str,
    group: &str,
    skip: usize,
    n: usize,
    extra: &[(&str, &str)],
) -> (usize, Duration) {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", "5");
    for (key, value) in extra {
        config.set(*key, *value);
    }
    let c: StreamConsumer = config.create().expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let (mut seen, mut got) = (0, 0);
    let mut first = None;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(30), c.recv()).await {
            Ok(Ok(_)) => {
                seen += 1;
                if seen > skip {
                    first.get_or_insert_with(Instant::now);
                    got += 1;
                }
            }
            _ => break,
        }
    }
    (got, first.map(|t| t.elapsed()).unwrap_or_default())
}

/// BENCH_DAEMON_EXTRA ("key=value,..."): more librdkafka settings for the daemon's consumer.
fn daemon_extra() -> Vec<(&'static str, &'static str)> {
    let text: &'static str = Box::leak(std::env::var("BENCH_DAEMON_EXTRA").unwrap_or_default().into_boxed_str());
    text.split(',').filter_map(|kv| kv.split_once('=')).collect()
}

/// The broker path alone at the same rate: producer -> Tansu -> a bare consumer, exact
/// per-message latency from the send instant (carried in the payload) to receipt.
async fn reference_latency(
    p: &FutureProducer,
    bootstrap: &str,
    topic: &str,
    rate: usize,
    seconds: usize,
    fetch_wait: &str,
    debezium: bool,
) -> (f64, f64) {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    use rdkafka::Message;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-latency")
        .set("auto.offset.reset", "latest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", fetch_wait);
    // BENCH_REF_EXTRA="key=value,key=value": give the reference consumer some of the daemon's
    // settings, to find which one (if any) changes the broker path's latency.
    for kv in std::env::var("BENCH_REF_EXTRA").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        if let Some((k, v)) = kv.split_once('=') {
            config.set(k, v);
        }
    }
    let c: StreamConsumer = config.create().expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    // Wait for the assignment before producing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.assignment().map(|a| a.count()).unwrap_or(0) == 0 && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(100), c.recv()).await;
    }
    let epoch = Instant::now();
    let total = rate * seconds;
    let consumer = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(total);
        while lat.len() < total {
            match tokio::time::timeout(Duration::from_secs(10), c.recv()).await {
                Ok(Ok(m)) => {
                    // The send instant travels in a header, so the payload can be the daemon's.
                    let sent: u64 = m
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "sent_us")?.value)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    lat.push(epoch.elapsed().as_micros() as u64 - sent);
                }
                _ => break,
            }
        }
        lat
    });
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..(seconds * 100) {
        tick.tick().await;
        for j in 0..(rate / 100) {
            let p = p.clone();
            let topic = topic.to_string();
            let sent = epoch.elapsed().as_micros().to_string();
            // The same messages as the daemon's run (keyed Debezium updates), or tiny unkeyed ones.
            let id = j as i64;
            let (key, value) = if debezium {
                (Some(format!("{{\"id\":{id}}}")), product_update(id, 1, 2))
            } else {
                (None, sent.clone())
            };
            tokio::spawn(async move {
                let headers = OwnedHeaders::new().insert(Header { key: "sent_us", value: Some(sent.as_str()) });
                let mut record = FutureRecord::to(&topic).payload(&value).headers(headers);
                if let Some(key) = &key {
                    record = record.key(key);
                }
                let _ = p.send(record, Duration::from_secs(60)).await;
            });
        }
    }
    let mut lat = consumer.await.unwrap_or_default();
    lat.sort_unstable();
    let q = |f: f64| {
        lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0) as f64
            / 1000.0
    };
    (q(0.5), q(0.99))
}

/// CPU time counters from /proc/stat: (steal, total) in clock ticks over all CPUs. On a VM, steal
/// is time the hypervisor gave our virtual CPUs to someone else: every stolen slice stalls
/// whatever was running (broker, daemon or producer) and shows up in the latency tail.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    Some((*fields.get(7)?, fields.iter().take(8).sum()))
}

fn steal_since(before: Option<(u64, u64)>) -> String {
    match (before, cpu_ticks()) {
        (Some((s0, t0)), Some((s1, t1))) if t1 > t0 => {
            format!("{:.1} % of CPU time stolen by the hypervisor", 100.0 * (s1 - s0) as f64 / (t1 - t0) as f64)
        }
        _ => "steal time unknown".into(),
    }
}

/// The daemon under measurement: by default the release binary as a process of its own, with
/// its own runtime as in production, read through its /metrics endpoint; with
/// `BENCH_DAEMON=in_process`, inside this process (sharing the load generator's runtime).
enum UnderTest {
    InProcess(Daemon),
    Process(DaemonProcess, u16),
}

impl UnderTest {
    fn start(dir: &std::path::Path, setup: &Setup<'_>) -> UnderTest {
        let (config, port) = write_config(dir, setup);
        // The test harness commits every 100 ms (tests want commits soon); measure with the
        // daemon's default (1 s) unless BENCH_COMMIT_INTERVAL says otherwise. On Tansu every
        // commit costs the broker CPU on the same two cores: 100 ms made (c)'s tail worse.
        let interval = std::env::var("BENCH_COMMIT_INTERVAL").unwrap_or_else(|_| "1s".into());
        let text = std::fs::read_to_string(&config).expect("read config");
        let text = text.replace("commit_interval: 100ms", &format!("commit_interval: {interval}"));
        let text = match CLUSTER_NODES.get() {
            Some(nodes) => text.replace(
                &format!("    url: \"{}\"\n", setup.redis_url),
                &format!(
                    "    mode: cluster\n    nodes: [{nodes}]\n{}",
                    if std::env::var("BENCH_REDIS").as_deref() == Ok("cluster_nowait") {
                        "    wait_replicas: { count: 0 }\n"
                    } else {
                        ""
                    }
                ),
            ),
            None => text,
        };
        std::fs::write(&config, text).expect("write config");
        match std::env::var("BENCH_DAEMON").as_deref() {
            Ok("in_process") => UnderTest::InProcess(Daemon::from_config(dir, &config, port)),
            _ => {
                let wrapper = std::env::var("BENCH_DAEMON_WRAPPER").unwrap_or_default();
                let wrapper: Vec<&str> = wrapper.split_whitespace().collect();
                UnderTest::Process(DaemonProcess::start_wrapped(&config, dir, &wrapper), port)
            }
        }
    }

    fn render(&self) -> String {
        match self {
            UnderTest::InProcess(d) => d.metrics.render(),
            UnderTest::Process(_, port) => http_get(*port, "/metrics").map(|(_, body)| body).unwrap_or_default(),
        }
    }

    /// The process whose memory is measured: the daemon's, or this one's when it runs inside.
    fn pid(&self) -> u32 {
        match self {
            UnderTest::InProcess(_) => std::process::id(),
            UnderTest::Process(p, _) => p.child.id(),
        }
    }

    /// cdc_invalidator_events_total over every series.
    fn events(&self) -> f64 {
        series_sum(&self.render(), "cdc_invalidator_events_total")
    }

    async fn stop(self) {
        match self {
            UnderTest::InProcess(d) => {
                let _ = d.stop().await;
            }
            UnderTest::Process(mut p, _) => {
                p.signal("TERM");
                let _ = tokio::task::spawn_blocking(move || p.wait(Duration::from_secs(30))).await;
            }
        }
    }
}

async fn wait_for_events(d: &UnderTest, n: f64, timeout: Duration) -> Option<(Instant, Instant)> {
    let deadline = Instant::now() + timeout;
    let mut first = None;
    loop {
        let seen = d.events();
        if first.is_none() && seen > 0.0 {
            first = Some((Instant::now(), seen));
        }
        if seen >= n {
            return first.map(|(t, _)| (t, Instant::now()));
        }
        if Instant::now() > deadline {
            return None;
        }
        // Rendering /metrics is not free (polling every 20 ms cost (b) about 10 %): poll every
        // 100 ms, which bounds the error of each end of the measurement to 0.1 s.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// BENCH_QUEUE_CAPACITY: the daemon's `pipeline.queue_capacity`, when set.
fn queue_capacity_override() -> Option<usize> {
    std::env::var("BENCH_QUEUE_CAPACITY").ok().and_then(|v| v.parse().ok())
}

/// The daemon's `pipeline:` section: `settings` (indented lines), plus `batch_idle_wait` from
/// BENCH_IDLE_WAIT and `queue_capacity` from BENCH_QUEUE_CAPACITY when set (the daemon's
/// defaults otherwise).
fn pipeline_section(settings: &str) -> String {
    let idle = std::env::var("BENCH_IDLE_WAIT").map(|v| format!("batch_idle_wait: {v}\n")).unwrap_or_default();
    let queue = queue_capacity_override().map(|n| format!("queue_capacity: {n}\n")).unwrap_or_default();
    let lines: String = format!("{settings}{idle}{queue}").lines().map(|l| format!("  {l}\n")).collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("pipeline:\n{lines}")
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let broker = TansuBroker::start();
    let create_topic = |name: &str| broker.create_topic(name, 3);
    let bootstrap = broker.bootstrap();
    let mut redis = RedisServer::start();
    let url = redis.url();
    let p = producer(&bootstrap);
    let _cluster = match std::env::var("BENCH_REDIS").as_deref() {
        Ok("cluster" | "cluster_nowait") => {
            let cluster = support::redis::RedisCluster::start(3);
            let nodes = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
            println!("Redis: a private 3-primary/3-replica cluster (mode: cluster)");
            let _ = CLUSTER_NODES.set(nodes);
            Some(cluster)
        }
        _ => None,
    };

    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "bc".into());

    // (b) pre-filled topic, side by side with the ceilings, then the Redis outage.
    if parts.contains('b') {
        throughput_and_memory(&broker, &bootstrap, &p, &mut redis, total).await;
    }

    // (c) steady 5,000 events/s for 20 s, once per broker.
    if !parts.contains('c') {
        return;
    }
    let brokers = std::env::var("BENCH_C_BROKERS").unwrap_or_else(|_| "mock,tansu".into());
    for name in brokers.split(',') {
        match name {
            "tansu" => steady(name, &bootstrap, &p, &create_topic, &url).await,
            "mock" => {
                // librdkafka's mock cluster, in this process: three brokers, topics replicated
                // once; no separate broker process competing for the two cores.
                let mock = support::kafka::MockKafka::start(3);
                let bootstrap = mock.bootstrap();
                let p = producer(&bootstrap);
                steady(name, &bootstrap, &p, &|t: &str| mock.create_topic(t, 3), &url).await;
            }
            other => println!("(c) unknown broker {other:?} in BENCH_C_BROKERS (tansu, mock)"),
        }
    }
}

/// (c) against one broker: the daemon's staleness at a steady rate, then the broker path alone
/// at the same rate (tiny messages, and the daemon's own messages) for reference.
async fn steady(broker: &str, bootstrap: &str, p: &FutureProducer, create_topic: &dyn Fn(&str), url: &str) {
    // Tansu answers a fetch when fetch.wait.max.ms expires, even with data waiting; Kafka
    // answers as soon as data arrives. BENCH_FETCH_WAIT_MS shows how much of the figure is that.
    let fetch_wait = std::env::var("BENCH_FETCH_WAIT_MS").unwrap_or_else(|_| "5".into());
    let stats = std::env::var("BENCH_STATS_MS").unwrap_or_else(|_| "5000".into());
    println!("(c) [{broker}] settings: batch_max_wait 5 ms, fetch.wait.max.ms {fetch_wait}, producer linger.ms 2");
    create_topic("steady.public.products");
    let mut librdkafka = vec![("fetch.wait.max.ms", fetch_wait.as_str()), ("statistics.interval.ms", stats.as_str())];
    librdkafka.extend(daemon_extra());
    let extra = pipeline_section("batch_max_wait: 5ms\n");
    let dir = tempfile::tempdir().unwrap();
    let d = UnderTest::start(
        dir.path(),
        &Setup {
            bootstrap,
            topics: &["steady.public.products"],
            group: "bench-c",
            redis_url: url,
            extra: &extra,
            // Tansu answers a fetch only when fetch.wait.max.ms expires (Kafka answers as soon as
            // data arrives); the default 500 ms would measure the broker, not the daemon.
            librdkafka: &librdkafka,
        },
    );
    // Let the group settle before the clock starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rate = 5_000;
    let seconds = 20;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let start = Instant::now();
    let ticks = cpu_ticks();
    // One tick every 10 ms, rate/100 events per tick.
    for i in 0..(seconds * 100) {
        tick.tick().await;
        for j in 0..(rate / 100) {
            let id = ((i * (rate / 100) + j) % 50_000) as i64;
            let value = product_update(id, 1, 2);
            let key = format!("{{\"id\":{id}}}");
            let p = p.clone();
            tokio::spawn(async move {
                let record = FutureRecord::to("steady.public.products").key(&key).payload(&value);
                if p.send(record, Duration::from_secs(60)).await.is_err() {
                    SEND_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    }
    let sent = rate * seconds;
    let send_secs = start.elapsed().as_secs_f64();
    let finished = wait_for_events(&d, sent as f64, Duration::from_secs(60)).await.is_some();
    println!("(c) [{broker}] while sending: {}", steal_since(ticks));
    let processed = d.events();
    println!(
        "(c) [{broker}] steady: {sent} events sent at {rate}/s in {send_secs:.1} s; {processed} processed{}; {} producer errors",
        if finished { "" } else { " (NOT all within 60 s)" },
        SEND_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
    );
    let text = d.render();
    for name in ["cdc_invalidator_batch_events", "cdc_invalidator_sink_batch_duration_seconds"] {
        let sum = series_sum(&text, &format!("{name}_sum"));
        let count = series_sum(&text, &format!("{name}_count"));
        println!("(c) [{broker}] {name}: {count} batches, mean {:.4}", sum / count.max(1.0));
    }
    // Staleness, and its two shares as the daemon measures them: upstream (commit -> entering
    // the daemon: producer linger, broker, fetch) and the daemon's own (entering -> confirmed).
    for (what, metric, labels) in [
        ("staleness, commit -> redis confirmed", "cdc_invalidator_staleness_seconds", "sink=\"redis\","),
        ("  upstream, commit -> entering the daemon", "cdc_invalidator_source_delay_seconds", ""),
        ("  daemon, entering -> redis confirmed", "cdc_invalidator_processing_seconds", "sink=\"redis\","),
    ] {
        let [p50, p99] = [0.5, 0.99].map(|q| quantile(&text, metric, labels, q) * 1000.0);
        println!("(c) [{broker}] {what}: p50 {p50:.2} ms, p99 {p99:.2} ms");
    }
    d.stop().await;

    // The same rate through the broker alone, for reference.
    for (topic, debezium, what) in
        [("latency.ref", false, "tiny unkeyed messages"), ("latency.ref.debezium", true, "the same Debezium messages")]
    {
        create_topic(topic);
        let ticks = cpu_ticks();
        // As long as the daemon's run by default: Tansu slows as a topic grows, so a shorter
        // reference flatters the broker (p99 13-31 ms over 10 s, 44-55 ms over 20 s).
        let seconds = std::env::var("BENCH_REF_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
        let (p50, p99) = reference_latency(p, bootstrap, topic, rate, seconds, &fetch_wait, debezium).await;
        println!(
            "(c) [{broker}] reference: producer -> broker -> bare consumer at {rate}/s, {what}: p50 {p50:.2} ms, p99 {p99:.2} ms (exact; {})",
            steal_since(ticks)
        );
    }
}

/// The resident memory of the daemon under test, read from /proc/<pid>/status: the peak since
/// the last [`Rss::reset_peak`] (VmHWM) and, as a cross-check, the highest VmRSS a sampler saw
/// every 50 ms (VmHWM alone cannot be reset on kernels without `clear_refs` 5).
struct Rss {
    pid: u32,
    sampled_max_kib: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl Rss {
    fn watch(pid: u32) -> Rss {
        use std::sync::atomic::Ordering;
        let sampled_max_kib = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (max, done) = (sampled_max_kib.clone(), stop.clone());
        let sampler = std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kib) = status_kib(pid, "VmRSS:") {
                    max.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Rss { pid, sampled_max_kib, stop, sampler: Some(sampler) }
    }

    /// Starts a new measurement: VmHWM back to the current RSS (`clear_refs` 5) and the sampled
    /// maximum back to zero. Returns whether the kernel reset VmHWM.
    fn reset_peak(&self) -> bool {
        self.sampled_max_kib.store(0, std::sync::atomic::Ordering::Relaxed);
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    /// (VmHWM, highest sampled VmRSS) in MiB since the last reset.
    fn peak_mib(&self) -> (f64, f64) {
        let hwm = status_kib(self.pid, "VmHWM:").map_or(f64::NAN, |k| k as f64 / 1024.0);
        (hwm, self.sampled_max_kib.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0)
    }
}

impl Drop for Rss {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
    }
}

/// A `Vm*:` line of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Redis' own ceiling for what the daemon asks of it: redis-benchmark sending multi-key UNLINKs
/// of `keys` random keys each (BENCH_UNLINK_KEYS, 500 by default: one full batch's keys), 4
/// connections, 8 commands pipelined. Returns keys/s.
fn redis_unlink_ceiling(port: u16) -> Option<f64> {
    let keys: usize = std::env::var("BENCH_UNLINK_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let requests = (10_000_000 / keys.max(1)).max(1000);
    let mut cmd = std::process::Command::new("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", "4", "-P", "8", "-r", "100000000", "--csv"])
        .args(["-n", &requests.to_string(), "UNLINK"])
        .args((0..keys).map(|_| "product:__rand_int__"));
    let out = cmd.output().ok()?;
    // --csv: a header line, then "<command>","<requests per second>",...
    let text = String::from_utf8_lossy(&out.stdout);
    let rps: f64 = text.lines().last()?.split("\",\"").nth(1)?.trim_matches('"').parse().ok()?;
    Some(rps * keys as f64)
}

/// Produces `rate` updates per second for `seconds`.
async fn produce_steadily(p: &FutureProducer, topic: &str, rate: usize, seconds: usize) -> usize {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (rate / 100).max(1);
    let mut sent = 0;
    for _ in 0..(seconds * 100) {
        tick.tick().await;
        for _ in 0..per_tick {
            send_update(p, topic, sent);
            sent += 1;
        }
    }
    sent
}

/// (b) in one run: the daemon catching up on a pre-filled topic, its two ceilings measured on
/// the same machine right after (a bare consumer reading the same topic; Redis taking multi-key
/// UNLINKs), the ratio, and the daemon's peak RSS while catching up and through a Redis outage
/// with the producer still producing. Printed as one table at the end.
async fn throughput_and_memory(
    broker: &TansuBroker,
    bootstrap: &str,
    p: &FutureProducer,
    redis: &mut RedisServer,
    total: usize,
) {
    let topic = "bench.public.products";
    broker.create_topic(topic, 3);
    let t = Instant::now();
    fill(p, topic, total).await;
    println!("(b) pre-filled {total} events into 3 partitions in {:.1} s", t.elapsed().as_secs_f64());
    // Tansu answers a fetch when fetch.wait.max.ms expires (see (c)); BENCH_DAEMON_EXTRA wins.
    let mut librdkafka = daemon_extra();
    if !librdkafka.iter().any(|(key, _)| *key == "fetch.wait.max.ms") {
        librdkafka.push(("fetch.wait.max.ms", "5"));
    }
    let dir = tempfile::tempdir().unwrap();
    let d = UnderTest::start(
        dir.path(),
        &Setup {
            bootstrap,
            topics: &[topic],
            group: "bench-b",
            redis_url: &redis.url(),
            extra: &pipeline_section(""),
            librdkafka: &librdkafka,
        },
    );
    let rss = Rss::watch(d.pid());
    let mut rows: Vec<(String, String)> = Vec::new();

    let daemon_rate = match wait_for_events(&d, total as f64, Duration::from_secs(600)).await {
        Some((first, last)) => {
            let rate = total as f64 / last.duration_since(first).as_secs_f64();
            rows.push((
                "daemon end to end (first event processed to last, offsets committed)".into(),
                format!("{rate:.0} events/s"),
            ));
            Some(rate)
        }
        None => {
            rows.push(("daemon end to end".into(), "did not finish within 600 s".into()));
            None
        }
    };
    let (hwm, sampled) = rss.peak_mib();
    rows.push((
        format!("daemon peak RSS catching up on {total} events (target <= 64 MiB)"),
        format!("{hwm:.1} MiB VmHWM ({sampled:.1} MiB sampled)"),
    ));

    // The ceilings, with the daemon idle: the broker's delivery rate to a bare consumer doing
    // nothing with the messages, and Redis' rate for the daemon's command.
    if ceilings() {
        ceilings_b(bootstrap, topic, redis, total, daemon_rate, &mut rows).await;
    }

    // The outage: Redis stopped while the producer goes on; then Redis back and the daemon
    // catching up on what piled up. Memory must stay bounded throughout.
    let rate: usize = std::env::var("BENCH_OUTAGE_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let seconds: usize = std::env::var("BENCH_OUTAGE_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    if seconds > 0 {
        outage(bootstrap, topic, p, redis, total, &d, &rss, &librdkafka, rate, seconds, &mut rows).await;
    }
    drop(rss);
    d.stop().await;
    if std::env::var("BENCH_KEEP_DIR").is_ok() {
        println!("(b) the daemon's directory (config, log) is kept: {}", dir.keep().display());
    }

    println!("\n(b) throughput and memory, one run\n");
    println!("| measurement | value |\n|---|---|");
    for (what, value) in rows {
        println!("| {what} | {value} |");
    }
    println!();
}

/// BENCH_CEILINGS=0 skips the ceilings (runs that only measure memory).
fn ceilings() -> bool {
    std::env::var("BENCH_CEILINGS").as_deref() != Ok("0")
}

/// (b)'s two ceilings, measured with the daemon idle, and the daemon's ratio to the lower.
async fn ceilings_b(
    bootstrap: &str,
    topic: &str,
    redis: &RedisServer,
    total: usize,
    daemon_rate: Option<f64>,
    rows: &mut Vec<(String, String)>,
) {
    let (n, took) = bare_consume(bootstrap, topic, "bench-bare", 0, total, &[]).await;
    let consumer = n as f64 / took.as_secs_f64();
    rows.push((
        format!("ceiling: bare librdkafka consumer, same topic ({n} messages)"),
        format!("{consumer:.0} messages/s"),
    ));
    let unlink = tokio::task::spawn_blocking({
        let port = redis.port();
        move || redis_unlink_ceiling(port)
    })
    .await
    .ok()
    .flatten();
    match unlink {
        Some(keys) => rows.push((
            "ceiling: Redis, redis-benchmark multi-key UNLINK (one key per event)".into(),
            format!("{keys:.0} keys/s"),
        )),
        None => rows.push(("ceiling: Redis".into(), "redis-benchmark failed".into())),
    }
    let lower = unlink.map_or(consumer, |u| u.min(consumer));
    if let Some(rate) = daemon_rate {
        rows.push(("daemon / lower ceiling (target >= 0.7)".into(), format!("{:.2}", rate / lower)));
    }
}

/// (b)'s Redis outage: Redis stopped for `seconds` while the producer goes on at `rate`, then
/// back, and the daemon catching up; its peak RSS throughout, and the catch-up's own ceiling.
#[allow(clippy::too_many_arguments)]
async fn outage(
    bootstrap: &str,
    topic: &str,
    p: &FutureProducer,
    redis: &mut RedisServer,
    total: usize,
    d: &UnderTest,
    rss: &Rss,
    librdkafka: &[(&str, &str)],
    rate: usize,
    seconds: usize,
    rows: &mut Vec<(String, String)>,
) {
    {
        let reset = rss.reset_peak();
        let before = d.events();
        redis.stop();
        let sent = produce_steadily(p, topic, rate, seconds).await;
        // Every outage event in the broker before Redis comes back, so that the catch-up
        // measures the daemon (and its broker), not a producer still delivering.
        let flushed = p.flush(Duration::from_secs(120)).is_ok();
        let during = d.events() - before;
        redis.restart();
        let back = Instant::now();
        let caught_up = wait_for_events(d, before + sent as f64, Duration::from_secs(600)).await.is_some();
        let catch_up = back.elapsed();
        let (hwm, sampled) = rss.peak_mib();
        rows.push((
            format!(
                "daemon peak RSS, {seconds} s Redis outage at {rate} events/s, then catching up (target <= 64 MiB)"
            ),
            format!(
                "{} ({sampled:.1} MiB sampled)",
                if reset { format!("{hwm:.1} MiB VmHWM") } else { "VmHWM not resettable".into() }
            ),
        ));
        rows.push((
            "outage: events produced / finished while Redis was down".into(),
            format!("{sent} / {during:.0} (nothing with a Redis key is finished before Redis confirms it)"),
        ));
        rows.push((
            format!(
                "outage: catching up after Redis came back{}",
                if flushed { "" } else { " (the producer had NOT delivered everything to the broker)" }
            ),
            if caught_up {
                format!(
                    "all {sent} in {:.1} s ({:.0} events/s)",
                    catch_up.as_secs_f64(),
                    sent as f64 / catch_up.as_secs_f64()
                )
            } else {
                "NOT all within 600 s".into()
            },
        ));
        // The catch-up's own ceiling: the broker delivering the same outage backlog to a bare
        // consumer with the daemon's fetch settings. Tansu serves the small record batches of a
        // steady producer far slower than the large ones of the pre-fill (docs/benchmarks.md).
        if !ceilings() {
            return;
        }
        let mut fetch: Vec<(&str, &str)> = cdc_invalidator::source::kafka::prefetch::settings().to_vec();
        fetch.extend(librdkafka.iter().copied());
        let (n, took) = bare_consume(bootstrap, topic, "bench-bare-outage", total, sent, &fetch).await;
        let ceiling = n as f64 / took.as_secs_f64();
        rows.push((
            format!("ceiling: bare consumer, the same {n} outage events, the daemon's fetch settings"),
            format!("{ceiling:.0} messages/s"),
        ));
        if caught_up {
            rows.push((
                "outage catch-up / its ceiling".into(),
                format!("{:.2}", sent as f64 / catch_up.as_secs_f64() / ceiling),
            ));
        }
        // BENCH_OUTAGE_FRESH=1: a second daemon (its own group) reads the whole topic, and its
        // time for the outage part is the catch-up without the outage's pause, retries and
        // resume: the same figure says the daemon's recovery costs nothing.
        if std::env::var("BENCH_OUTAGE_FRESH").is_ok() {
            let dir2 = tempfile::tempdir().unwrap();
            let d2 = UnderTest::start(
                dir2.path(),
                &Setup {
                    bootstrap,
                    topics: &[topic],
                    group: "bench-b-fresh",
                    redis_url: &redis.url(),
                    extra: &pipeline_section(""),
                    librdkafka,
                },
            );
            let _ = wait_for_events(&d2, total as f64, Duration::from_secs(600)).await;
            let t = Instant::now();
            let done = wait_for_events(&d2, (total + sent) as f64, Duration::from_secs(600)).await.is_some();
            let took = t.elapsed();
            rows.push((
                "a fresh daemon (no outage) on the same outage events, after the pre-filled ones".into(),
                if done {
                    format!(
                        "all {sent} in {:.1} s ({:.0} events/s)",
                        took.as_secs_f64(),
                        sent as f64 / took.as_secs_f64()
                    )
                } else {
                    "NOT all within 600 s".into()
                },
            ));
            d2.stop().await;
        }
    }
}
