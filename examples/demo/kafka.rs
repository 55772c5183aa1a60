//! The Kafka path (`bash scripts/demo.sh kafka`): a private Tansu broker (Kafka protocol) stands
//! in for Kafka + Debezium. The demo produces Debezium change events (the repository's fixtures,
//! their commit time set to now) and shows each cached key disappearing, the dead letters, the
//! metrics and `explain`; then stops the daemon with SIGTERM and checks it drained cleanly.
//!
//! Needs `TANSU_BIN` (scripts/install-deps.sh prints it) besides redis-server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

use crate::cache::{cache, check_untouched, register, watch, Expected};
use crate::report::{print_dead_letters, print_indented, print_metrics, section};
use crate::services::{daemon_binary, free_port, http_get, start_redis, tail, wait_ready, Service, START_ATTEMPTS};
use crate::{DemoResult, EXIT_TIMEOUT, RULES, START_TIMEOUT};

/// The topic Debezium would write `public.products` of the `shop` database to.
const TOPIC: &str = "shop.public.products";
const PARTITIONS: u32 = 3;

/// A value cut off mid-way, as a broken producer or a truncated write would leave it.
const MALFORMED: &str = r#"{"before":null,"after":{"id":44,"name":"Red Wid"#;

/// The demo proper. Missed expectations are collected and reported at the end, so one missing
/// invalidation still shows the dead letters and metrics that explain it.
pub async fn run(dir: &Path) -> DemoResult<()> {
    let mut failures: Vec<String> = Vec::new();
    println!("cdc-invalidator demo, Kafka path (work directory {})", dir.display());

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
            expected: Expected {
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
        },
        Step {
            title: "insert product 43 into category 7",
            source: "pg-insert.json",
            key: r#"{"id":43}"#,
            value: Some(fixture("pg-insert.json")?),
            expected: Expected {
                gone: &["product:43", "listing:category:7:page:1", "tag:category:7"],
                dead_letter: None,
            },
        },
        Step {
            title: "delete product 43 (the before image holds only the key)",
            source: "pg-delete-key-only.json",
            key: r#"{"id":43}"#,
            value: Some(fixture("pg-delete-key-only.json")?),
            expected: Expected { gone: &["product:43", "product:43:page:en-us"], dead_letter: Some("rule_error") },
        },
        Step {
            title: "a malformed message (truncated JSON)",
            source: "hand-written",
            key: r#"{"id":44}"#,
            value: None,
            expected: Expected { gone: &[], dead_letter: Some("malformed") },
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
        let missed = watch(&mut redis, &step.expected, t0, &dead_letters, &mut letters_seen).await?;
        failures.extend(missed.into_iter().map(|m| format!("{}: {m}", step.title)));
    }

    println!();
    check_untouched(&mut redis, "event", &mut failures).await?;

    section("6. The dead letters (dead-letters.jsonl; kept for a fix and a replay)");
    print_dead_letters(&dead_letters);

    section("7. Metrics (GET /metrics, the interesting lines)");
    let exposition = settled_metrics(metrics_port).await;
    print_metrics(&exposition, &["cdc_invalidator_kafka_consumer_lag_messages{"]);

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
    expected: Expected<'static>,
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
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            // Tansu's level comes from RUST_LOG; at `info` it logs every span it closes, down to
            // each field it serialises (gigabytes a minute under load). Its banner, with
            // TANSU_READY, is printed at any level.
            .env("RUST_LOG", "warn");
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
