//! The README's demo, and a smoke test of the whole product: `bash scripts/demo.sh` builds this
//! and runs it.
//!
//! It starts a private redis-server and a Tansu broker (Kafka protocol) on free loopback ports,
//! fills Redis the way a shop application would, runs the real `cdc-invalidator` binary against
//! them, produces Debezium change events and shows each cached key disappearing, the dead
//! letters, the metrics and `explain`; then stops the daemon with SIGTERM and checks it drained
//! cleanly (exit code 0).
//!
//! Exit code 0 when every expected invalidation happened within 30 s and the daemon exited 0;
//! 1 otherwise (the work directory is then kept for inspection). Everything it started is
//! stopped on every path, including errors and SIGINT/SIGTERM.
//!
//! Needs `TANSU_BIN` (scripts/install-deps.sh prints it), `redis-server` on PATH, and the
//! `cdc-invalidator` binary built next to this example (`cargo build --release --bins
//! --examples`). `DEMO_KEEP=1` keeps the work directory (config, rules, logs, dead letters).

use std::fmt::Write as _;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::aio::MultiplexedConnection;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type DemoResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The topic Debezium would write `public.products` of the `shop` database to.
const TOPIC: &str = "shop.public.products";
const PARTITIONS: u32 = 3;
/// How long each expected invalidation may take before the demo counts it as failed.
const INVALIDATION_DEADLINE: Duration = Duration::from_secs(30);
/// Services start in milliseconds; this only bounds a broken install.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// The daemon becomes ready once its consumer group has partitions: a few seconds at most.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM drains in-flight work within `shutdown.grace` (5 s in the demo's config).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often Redis and the dead-letter file are polled while waiting for an invalidation.
const POLL: Duration = Duration::from_millis(2);

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

/// A value cut off mid-way, as a broken producer or a truncated write would leave it.
const MALFORMED: &str = r#"{"before":null,"after":{"id":44,"name":"Red Wid"#;

fn main() -> ExitCode {
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
    // Dropping `demo` (on success, error or signal) kills and reaps every process it started.
    let result = runtime.block_on(async {
        tokio::select! {
            r = demo(dir.path()) => r,
            signal = interrupted() => Err(format!("interrupted by {signal}; stopping everything").into()),
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

/// The demo proper. Missed expectations are collected and reported at the end, so one missing
/// invalidation still shows the dead letters and metrics that explain it.
async fn demo(dir: &Path) -> DemoResult<()> {
    let mut failures: Vec<String> = Vec::new();
    println!("cdc-invalidator demo (work directory {})", dir.display());

    section("1. Services (private instances on free loopback ports)");
    let daemon_bin = daemon_binary()?;
    let tansu_bin = tansu_binary()?;
    let (redis_server, redis_url) = start_redis(dir).await?;
    println!("   redis-server   {redis_url}   (log {})", redis_server.log.display());
    let (broker, bootstrap) = start_tansu(&tansu_bin, dir).await?;
    create_topic(&tansu_bin, &bootstrap, TOPIC, PARTITIONS).await?;
    println!("   tansu broker   {bootstrap}   topic {TOPIC}, {PARTITIONS} partitions   (log {})", broker.log.display());

    section("2. Rules and config");
    let rules_path = dir.join("rules.yaml");
    std::fs::write(&rules_path, RULES)?;
    let metrics_port = free_port()?;
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, config_text(&bootstrap, &redis_url, metrics_port))?;
    println!("   {}:", rules_path.display());
    print_indented(RULES, 6);
    println!("   {}:", config_path.display());
    print_indented(&config_text(&bootstrap, &redis_url, metrics_port), 6);
    println!("   (No CDN sink is configured here: surrogate keys and URLs are computed, and shown by `explain`.)");

    section("3. What the shop application cached in Redis");
    let mut redis = redis::Client::open(redis_url.as_str())?.get_multiplexed_async_connection().await?;
    let product = r#"{"id":42,"name":"Blue Widget","price":"100.00","category_id":5}"#;
    cache(&mut redis, "product:42", product).await?;
    for locale in ["en-us", "fr", "de"] {
        cache(&mut redis, &format!("product:42:page:{locale}"), "<html>Blue Widget</html>").await?;
    }
    for category in [5, 7, 9] {
        let listing = format!("listing:category:{category}:page:1");
        cache(&mut redis, &listing, &format!("<html>category {category}</html>")).await?;
        register(&mut redis, &format!("tag:category:{category}"), &listing).await?;
    }
    cache(&mut redis, "product:43", "null").await?;
    println!("   (product:43 is a negative cache entry: a visitor asked for product 43 before it existed.)");

    section("4. The daemon: cdc-invalidator run -c config.yaml");
    let daemon_log = dir.join("daemon.log");
    let mut cmd = Command::new(&daemon_bin);
    cmd.arg("run").arg("-c").arg(&config_path);
    let mut daemon = Service::spawn("cdc-invalidator", cmd, &daemon_log)?;
    let t = Instant::now();
    wait_ready(&mut daemon, metrics_port).await?;
    println!("   pid {}, ready after {} ms (GET /readyz = 200)", daemon.child.id(), t.elapsed().as_millis());
    println!("   metrics http://127.0.0.1:{metrics_port}/metrics   log {}", daemon_log.display());

    section("5. Debezium change events, and the cache emptying");
    println!("   (each event's source.ts_ms is set to now; times are from producing it to the key being gone)");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "0")
        .create()?;
    let dead_letters = dir.join("dead-letters.jsonl");
    let mut letters_seen = 0;

    let steps = [
        Step {
            title: "update product 42: price 100.00 -> 80.00, category 5 -> 7",
            source: "pg-update-with-schema.json",
            key: r#"{"id":42}"#,
            value: Some(fixture("pg-update-with-schema.json")?),
            gone: &[
                "product:42",
                "product:42:page:en-us",
                "product:42:page:fr",
                "product:42:page:de",
                "listing:category:5:page:1",
                "tag:category:5",
                "listing:category:7:page:1",
                "tag:category:7",
            ],
            dead_letter: None,
        },
        Step {
            title: "insert product 43 into category 7",
            source: "pg-insert.json",
            key: r#"{"id":43}"#,
            value: Some(fixture("pg-insert.json")?),
            gone: &["product:43", "listing:category:7:page:1", "tag:category:7"],
            dead_letter: None,
        },
        Step {
            title: "delete product 43 (the before image holds only the key)",
            source: "pg-delete-key-only.json",
            key: r#"{"id":43}"#,
            value: Some(fixture("pg-delete-key-only.json")?),
            gone: &["product:43", "product:43:page:en-us"],
            dead_letter: Some("rule_error"),
        },
        Step {
            title: "a malformed message (truncated JSON)",
            source: "hand-written",
            key: r#"{"id":44}"#,
            value: None,
            gone: &[],
            dead_letter: Some("malformed"),
        },
    ];
    for (i, step) in steps.iter().enumerate() {
        // Between events the shop goes on serving, and caching, what the next event changes.
        match i {
            1 => {
                println!("\n   The shop re-renders category 7's listing:");
                cache(&mut redis, "listing:category:7:page:1", "<html>category 7</html>").await?;
                register(&mut redis, "tag:category:7", "listing:category:7:page:1").await?;
            }
            2 => {
                println!("\n   Product 43 exists now; the shop caches it:");
                cache(&mut redis, "product:43", r#"{"id":43,"name":"Green Widget"}"#).await?;
                cache(&mut redis, "product:43:page:en-us", "<html>Green Widget</html>").await?;
            }
            _ => {}
        }
        println!("\n   > {}   [{}]", step.title, step.source);
        let value = match &step.value {
            Some(fixture) => with_current_commit_time(fixture)?,
            None => MALFORMED.to_string(),
        };
        let t0 = Instant::now();
        let record = FutureRecord::to(TOPIC).key(step.key).payload(&value);
        let delivery =
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| format!("produce: {e}"))?;
        println!("     produced to partition {}, offset {}", delivery.partition, delivery.offset);
        let missed = watch(&mut redis, step, t0, &dead_letters, &mut letters_seen).await?;
        failures.extend(missed.into_iter().map(|m| format!("{}: {m}", step.title)));
    }

    println!();
    for key in ["listing:category:9:page:1", "tag:category:9"] {
        if exists(&mut redis, key).await? {
            println!("   still cached: {key}   (category 9 was not touched)");
        } else {
            failures.push(format!("{key} was invalidated, but no event touched category 9"));
            println!("   MISSING: {key}, though no event touched category 9");
        }
    }

    section("6. The dead letters (dead-letters.jsonl; kept for a fix and a replay)");
    print_dead_letters(&dead_letters);

    section("7. Metrics (GET /metrics, the interesting lines)");
    let exposition = settled_metrics(metrics_port).await;
    print_metrics(&exposition);

    section("8. explain: what one event would invalidate, touching nothing");
    let fixture_path = fixtures_dir().join("pg-update-with-schema.json");
    println!(
        "   $ cdc-invalidator explain --rules rules.yaml --event {} --topic {TOPIC}",
        fixture_path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(&fixture_path).display()
    );
    let mut cmd = Command::new(&daemon_bin);
    cmd.arg("explain").arg("--rules").arg(&rules_path).arg("--event").arg(&fixture_path).args(["--topic", TOPIC]);
    let out = tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output()).await??;
    print_indented(String::from_utf8_lossy(&out.stdout).trim_end(), 3);
    if !out.status.success() {
        print_indented(String::from_utf8_lossy(&out.stderr).trim_end(), 3);
        failures.push(format!("explain exited with {}", out.status));
    }

    section("9. Shutdown: SIGTERM, drain, final commit");
    let t = Instant::now();
    daemon.signal("TERM")?;
    match daemon.wait_exit(EXIT_TIMEOUT).await {
        Some(0) => println!("   cdc-invalidator exited with code 0 after {} ms", t.elapsed().as_millis()),
        Some(code) => {
            println!("   cdc-invalidator exited with code {code}; its log ends:");
            print_indented(&tail(&daemon_log, 20), 6);
            failures.push(format!("the daemon exited with code {code} after SIGTERM"));
        }
        None => failures.push(format!("the daemon did not exit within {EXIT_TIMEOUT:?} of SIGTERM")),
    }
    let warnings = std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let warnings = warnings.trim_end();
    if !warnings.is_empty() {
        println!("   its log (warnings and errors only, as configured):");
        print_indented(warnings, 6);
    }
    drop(daemon);
    drop(broker);
    drop(redis_server);
    println!("   stopped redis-server and the tansu broker");

    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} expectation(s) not met:\n  - {}", failures.len(), failures.join("\n  - ")).into())
    }
}

fn section(title: &str) {
    println!("\n{title}");
    println!("{}", "-".repeat(title.chars().count()));
}

fn print_indented(text: &str, indent: usize) {
    for line in text.lines() {
        println!("{:indent$}{line}", "");
    }
}

/// The demo's config: the contract's first block, plus a few settings that make a short demo
/// show settled numbers (documented inline, since the file is printed).
fn config_text(bootstrap: &str, redis_url: &str, metrics_port: u16) -> String {
    format!(
        r#"rules: rules.yaml
source:
  kind: kafka
  kafka:
    brokers: "{bootstrap}"
    group_id: cdc-invalidator-demo
    topics: ["{TOPIC}"]
    commit_interval: 200ms             # demo: commit often, so the lag gauge settles quickly
    librdkafka:
      statistics.interval.ms: "1000"   # demo: lag statistics every second (default 5 s)
      # Tansu, the demo's broker, answers a group join after about half the session timeout, and
      # a fetch only when its wait runs out (Kafka answers as soon as data arrives): keep both short.
      session.timeout.ms: "6000"
      fetch.wait.max.ms: "10"
sinks:
  redis:
    url: "{redis_url}"
    tag_prefix: "tag:"
metrics:
  listen: "127.0.0.1:{metrics_port}"
dead_letter:
  file: dead-letters.jsonl
shutdown:
  grace: 5s
log:
  level: warn                          # demo: quiet; the log goes to daemon.log
"#
    )
}

/// One change event and what it must do.
struct Step {
    title: &'static str,
    /// Where the value comes from (a fixture file name), for the reader.
    source: &'static str,
    key: &'static str,
    /// The fixture's text (its commit time is set to now when it is produced); None for the
    /// malformed message, which is sent as is.
    value: Option<String>,
    /// Keys that must be gone from Redis afterwards.
    gone: &'static [&'static str],
    /// The reason of the dead letter the event must produce, if any.
    dead_letter: Option<&'static str>,
}

/// Waits until every key of `step.gone` has disappeared and its dead letter (if any) is written,
/// printing each as it happens. Returns what did not happen within the deadline.
async fn watch(
    redis: &mut MultiplexedConnection,
    step: &Step,
    t0: Instant,
    dead_letters: &Path,
    letters_seen: &mut usize,
) -> DemoResult<Vec<String>> {
    let mut waiting: Vec<&str> = step.gone.to_vec();
    let mut letter_due = step.dead_letter;
    let mut missed = Vec::new();
    loop {
        if !waiting.is_empty() {
            let mut pipe = redis::pipe();
            for key in &waiting {
                pipe.cmd("EXISTS").arg(*key);
            }
            let present: Vec<bool> = pipe.query_async(redis).await?;
            let ms = t0.elapsed().as_millis();
            let mut still = Vec::with_capacity(waiting.len());
            for (key, present) in waiting.iter().zip(present) {
                if present {
                    still.push(*key);
                } else {
                    println!("     {ms:>5} ms  gone  {key}");
                }
            }
            waiting = still;
        }
        let letters = read_dead_letters(dead_letters);
        for letter in letters.iter().skip(*letters_seen) {
            let reason = letter.get("reason").and_then(Value::as_str).unwrap_or("?");
            let position = letter.get("position").and_then(Value::as_str).unwrap_or("?");
            println!("     {:>5} ms  dead-lettered ({reason}) at {position}", t0.elapsed().as_millis());
            match letter_due {
                Some(want) if want == reason => letter_due = None,
                _ => missed.push(format!("an unexpected dead letter ({reason}) at {position}")),
            }
        }
        *letters_seen = letters.len();

        if waiting.is_empty() && letter_due.is_none() {
            return Ok(missed);
        }
        if t0.elapsed() > INVALIDATION_DEADLINE {
            for key in waiting {
                println!("     NOT GONE after {INVALIDATION_DEADLINE:?}: {key}");
                missed.push(format!("{key} still cached after {INVALIDATION_DEADLINE:?}"));
            }
            if let Some(reason) = letter_due {
                println!("     NO dead letter ({reason}) after {INVALIDATION_DEADLINE:?}");
                missed.push(format!("no {reason} dead letter after {INVALIDATION_DEADLINE:?}"));
            }
            return Ok(missed);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `SET key value`, printed as the application would issue it.
async fn cache(redis: &mut MultiplexedConnection, key: &str, value: &str) -> DemoResult<()> {
    redis::cmd("SET").arg(key).arg(value).query_async::<()>(redis).await?;
    println!("   SET  {key:<26} {value}");
    Ok(())
}

/// `SADD tag member`: registers a cached key under a tag, so a tag invalidation finds it.
async fn register(redis: &mut MultiplexedConnection, tag: &str, key: &str) -> DemoResult<()> {
    redis::cmd("SADD").arg(tag).arg(key).query_async::<()>(redis).await?;
    println!("   SADD {tag:<26} {key}");
    Ok(())
}

async fn exists(redis: &mut MultiplexedConnection, key: &str) -> DemoResult<bool> {
    Ok(redis::cmd("EXISTS").arg(key).query_async(redis).await?)
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium")
}

fn fixture(name: &str) -> DemoResult<String> {
    let path = fixtures_dir().join(name);
    std::fs::read_to_string(&path).map_err(|e| format!("cannot read the fixture {}: {e}", path.display()).into())
}

/// The event with its database commit time (`source.ts_ms`, and the envelope's `ts_ms`) set to
/// now, so the staleness the daemon measures is real. Handles the schema envelope too.
fn with_current_commit_time(text: &str) -> DemoResult<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let mut value: Value = serde_json::from_str(text)?;
    let envelope = match value.get_mut("payload") {
        Some(payload) if payload.is_object() => payload,
        _ => &mut value,
    };
    let source = envelope.get_mut("source").and_then(Value::as_object_mut).ok_or("the fixture has no source block")?;
    source.insert("ts_ms".into(), now.into());
    if let Some(ts) = envelope.get_mut("ts_ms") {
        *ts = now.into();
    }
    Ok(serde_json::to_string(&value)?)
}

fn read_dead_letters(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| Value::String(line.to_string())))
        .collect()
}

fn print_dead_letters(path: &Path) {
    let letters = read_dead_letters(path);
    if letters.is_empty() {
        println!("   (empty)");
    }
    for letter in letters {
        let field = |name: &str| match letter.get(name) {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => "-".into(),
            Some(v) => v.to_string(),
        };
        println!(
            "   reason {}   position {}   table {}   op {}",
            field("reason"),
            field("position"),
            field("table"),
            field("op")
        );
        // Several rule errors arrive as one string, sentence after sentence: one line each.
        let error = field("error").replace(" rule \"", "\n rule \"");
        for (i, sentence) in error.lines().enumerate() {
            let label = if i == 0 { "error:" } else { "" };
            println!("     {label:<6} {}", wrap(sentence.trim(), 100).join("\n              "));
        }
        println!("     key:   {}", field("key"));
        println!("     value: {}", shorten(&field("value"), 110));
    }
}

/// Splits `text` into lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let Some(line) = lines.last_mut() else { break };
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], text.len()),
        None => text.to_string(),
    }
}

/// Scrapes /metrics once the daemon has caught up: nothing pending, lag statistics in and zero
/// (commits every 200 ms, statistics every second). After 10 s it takes what there is.
async fn settled_metrics(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = http_get(port, "/metrics").await.map(|(_, body)| body).unwrap_or_default();
        let values = |prefix: &str| -> Vec<f64> {
            body.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect::<Vec<f64>>()
        };
        let pending = values("cdc_invalidator_pending_events ");
        let lag = values("cdc_invalidator_kafka_consumer_lag_messages{");
        let settled = pending == [0.0] && !lag.is_empty() && lag.iter().all(|&v| v == 0.0);
        if settled || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_metrics(exposition: &str) {
    const SHOWN: [&str; 9] = [
        "cdc_invalidator_events_total{",
        "cdc_invalidator_invalidations_total{",
        "cdc_invalidator_tag_members_unlinked_total{",
        "cdc_invalidator_staleness_seconds_count{",
        "cdc_invalidator_staleness_seconds_sum{",
        "cdc_invalidator_dead_letters_total{",
        "cdc_invalidator_rule_errors_total{",
        "cdc_invalidator_pending_events ",
        "cdc_invalidator_kafka_consumer_lag_messages{",
    ];
    if exposition.is_empty() {
        println!("   (no answer from /metrics)");
        return;
    }
    for prefix in SHOWN {
        for line in exposition.lines().filter(|l| l.starts_with(prefix)) {
            println!("   {line}");
        }
    }
    let p50 = quantile(exposition, "cdc_invalidator_staleness_seconds", "redis", 0.50);
    let p99 = quantile(exposition, "cdc_invalidator_staleness_seconds", "redis", 0.99);
    let mut line = String::from("   staleness, database commit -> Redis confirmed:");
    match (p50, p99) {
        (Some(p50), Some(p99)) => {
            let _ = write!(line, " p50 ~ {:.1} ms, p99 ~ {:.1} ms", p50 * 1e3, p99 * 1e3);
        }
        _ => line.push_str(" no observations"),
    }
    println!("{line}   (estimated from the histogram buckets, as histogram_quantile does)");
}

/// The q-quantile of a histogram's buckets for one sink, interpolated within the bucket as
/// Prometheus' `histogram_quantile` does. None without observations.
fn quantile(exposition: &str, metric: &str, sink: &str, q: f64) -> Option<f64> {
    let prefix = format!("{metric}_bucket{{sink=\"{sink}\",le=\"");
    let mut buckets: Vec<(f64, f64)> = exposition
        .lines()
        .filter_map(|l| {
            let (le, count) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).filter(|&t| t > 0.0)?;
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = if count > prev.1 { (rank - prev.1) / (count - prev.1) } else { 0.0 };
            return Some(prev.0 + (le - prev.0) * within);
        }
        prev = (le, count);
    }
    None
}

/// A child process with its output in a log file; killed and reaped on drop, so nothing it
/// started outlives the demo, whatever path the demo leaves by.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> DemoResult<Service> {
        let out = File::create(log)?;
        cmd.env("NO_COLOR", "1").stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = cmd.spawn().map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Service { name, child, log: log.to_path_buf() })
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends a signal by name (`TERM`), as an operator or a supervisor would.
    fn signal(&self, sig: &str) -> DemoResult<()> {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{sig} {} ({}) failed", self.child.id(), self.name).into())
        }
    }

    /// Waits for the process to exit; its exit code, or None on timeout (or death by signal).
    async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    fn failure(&self, what: &str) -> Box<dyn std::error::Error + Send + Sync> {
        format!("{} {what}; its log ({}) ends:\n{}", self.name, self.log.display(), tail(&self.log, 20)).into()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: another process may take it first, so
/// starters retry on a fresh port when the service exits at start).
fn free_port() -> DemoResult<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `cdc-invalidator`, built by cargo next to this example (`target/<profile>/examples/demo`).
fn daemon_binary() -> DemoResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("cdc-invalidator"))
        .ok_or("cannot locate the target directory")?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} not found: build it with `cargo build --release --bins --examples`", bin.display()).into())
    }
}

fn tansu_binary() -> DemoResult<PathBuf> {
    let bin = std::env::var_os("TANSU_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or("TANSU_BIN is not set: run `bash scripts/demo.sh`, which installs the Tansu broker")?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("TANSU_BIN={} is not a file: run scripts/install-deps.sh", bin.display()).into())
    }
}

/// Starts attempts at most this often when the port was taken between `free_port` and the bind.
const START_ATTEMPTS: usize = 3;

async fn start_redis(dir: &Path) -> DemoResult<(Service, String)> {
    for _ in 0..START_ATTEMPTS {
        let port = free_port()?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--daemonize", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir);
        let mut service = Service::spawn("redis-server", cmd, &dir.join("redis.log"))?;
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str())?;
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline && !service.exited() {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                    return Ok((service, url));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !service.exited() {
            return Err(service.failure(&format!("did not answer PING within {START_TIMEOUT:?}")));
        }
    }
    Err(format!("redis-server exited at start {START_ATTEMPTS} times (see {})", dir.join("redis.log").display()).into())
}

/// Printed by the broker once its listener is bound. On "address in use" it never appears and
/// the broker exits, which tells a lost port race from a hang.
const TANSU_READY: &str = "ready in";

async fn start_tansu(bin: &Path, dir: &Path) -> DemoResult<(Service, String)> {
    for _ in 0..START_ATTEMPTS {
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            // These settings have no flag here and must not leak in from the caller's shell.
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        let log = dir.join("tansu.log");
        let mut service = Service::spawn("tansu broker", cmd, &log)?;
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline && !service.exited() {
            if std::fs::read_to_string(&log).is_ok_and(|s| s.contains(TANSU_READY)) {
                return Ok((service, format!("127.0.0.1:{port}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !service.exited() {
            return Err(service.failure(&format!("not ready within {START_TIMEOUT:?}")));
        }
    }
    Err(format!("the tansu broker exited at start {START_ATTEMPTS} times (see {})", dir.join("tansu.log").display())
        .into())
}

/// `tansu topic create`: answers in milliseconds, but retries for long against a broken broker,
/// so it is bounded.
async fn create_topic(bin: &Path, bootstrap: &str, name: &str, partitions: u32) -> DemoResult<()> {
    let mut cmd = Command::new(bin);
    cmd.args(["topic", "create", "--broker", &format!("tcp://{bootstrap}")])
        .args(["--partitions", &partitions.to_string(), name])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let pid = child.id();
    let waited = tokio::time::timeout(START_TIMEOUT, tokio::task::spawn_blocking(move || child.wait_with_output()));
    match waited.await {
        Ok(out) => {
            let out = out??;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "tansu topic create {name} failed ({}): {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .into())
            }
        }
        Err(_) => {
            // The blocking wait ends once the process is gone.
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            Err(format!("tansu topic create {name} did not finish within {START_TIMEOUT:?}").into())
        }
    }
}

/// Waits for `GET /readyz` = 200 (partitions assigned, Redis answering PING).
async fn wait_ready(daemon: &mut Service, port: u16) -> DemoResult<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if daemon.exited() {
            return Err(daemon.failure("exited before becoming ready"));
        }
        if http_get(port, "/readyz").await.is_some_and(|(status, _)| status == 200) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(daemon.failure(&format!("not ready within {READY_TIMEOUT:?}")))
}

/// A plain HTTP/1.1 GET on loopback: (status, body), or None when nothing answers in 5 s.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw);
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), request).await.ok().flatten()
}
