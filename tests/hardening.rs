//! Issue 10: what an operator meets at the edge of the daemon. A sentinel secret in every
//! setting never shows in any output; `check` rejects what `run` would.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use crate::support::daemon::{binary, http_get, read_dead_letters, wait_until, write_config, DaemonProcess, Setup};
use crate::support::events::product_insert;
use crate::support::kafka::MockKafka;
use crate::support::redis::RedisServer;

const TOPIC: &str = "shop.public.products";
const SENTINEL: &str = "s3ntinel-9d4c-hunter2";

/// An HTTP server that answers every request 400 with the request (headers and all) as its
/// body, as some CDNs' error pages do.
fn echo_400() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = vec![0u8; 16384];
            let n = s.read(&mut buf).unwrap_or(0);
            let body = String::from_utf8_lossy(&buf[..n]).replace("\r\n", " | ");
            let _ = write!(
                s,
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn cli(args: &[&str], config: &std::path::Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args).arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The typo of the issue (`sasl.pasword_env`) and an unparseable Redis URL holding the secret:
/// `check` and `run` both exit 2 naming file, line and column, and never print the secret.
#[test]
fn config_errors_never_print_a_secret_and_check_rejects_what_run_would() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), crate::support::events::RULES).unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!(
            "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9\"\n    topics: [t]\n    librdkafka:\n      sasl.pasword_env: CDC_TEST_SENTINEL_PW\nsinks:\n  redis:\n    url: \"redis://:{SENTINEL}@127.0.0.1:notaport\"\n"
        ),
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let (code, out) = cli(&[cmd, "-c"], &path, &[("CDC_TEST_SENTINEL_PW", SENTINEL)]);
        assert_eq!(code, Some(2), "{cmd}: {out}");
        assert!(!out.contains(SENTINEL), "{cmd} printed the secret: {out}");
        assert!(out.contains(&format!("{}:8:7: ", path.display())), "{cmd}: {out}");
        assert!(out.contains("sasl.pasword_env: No such configuration property"), "{cmd}: {out}");
        assert!(out.contains(&format!("{}:11:10: sinks.redis.url", path.display())), "{cmd}: {out}");
    }
}

/// The daemon at trace level with the sentinel as the Redis password, a librdkafka password
/// and a CDN token, and a CDN that echoes the request (token header included) in its 400: the
/// secret is in none of the logs, the dead letters, `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_never_outputs_a_secret() {
    let redis = RedisServer::start_with_password(SENTINEL);
    let echo = echo_400();
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    kafka.produce(TOPIC, Some(0), Some("{\"id\":1}"), Some(&product_insert(1, 5))).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{SENTINEL}\n")).unwrap();
    let bootstrap = kafka.bootstrap();
    let url = redis.url();
    let (config, port) = write_config(
        dir.path(),
        &Setup {
            bootstrap: &bootstrap,
            topics: &[TOPIC],
            group: "sentinel",
            redis_url: &url,
            extra: "",
            librdkafka: &[("sasl.username", "svc"), ("sasl.password_env", "CDC_TEST_SENTINEL_PW")],
        },
    );
    std::fs::write(
        dir.path().join("rules.yaml"),
        "version: 1\nrules:\n  - name: p\n    table: public.products\n    redis:\n      keys: [\"product:{id}\"]\n    cdn:\n      surrogate_keys: [\"product-{id}\"]\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "sinks:\n",
        &format!(
            "sinks:\n  cdn:\n    - {{ kind: fastly, name: fastly, service_id: svc1, token_file: \"{}\", api: \"http://127.0.0.1:{echo}\", retry: {{ initial: 20ms, max: 200ms }} }}\n",
            token.display()
        ),
        1,
    );
    let text = text.replace("level: \"info,librdkafka=warn\"", "level: \"trace\"");
    std::fs::write(&config, text).unwrap();
    let mut daemon = {
        let mut cmd = Command::new(binary());
        let log = dir.path().join("daemon.log");
        let out = std::fs::File::create(&log).unwrap();
        cmd.args(["run", "-c"]).arg(&config).env("CDC_TEST_SENTINEL_PW", SENTINEL);
        let child = cmd.stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap();
        DaemonProcess { child, log }
    };
    let letters_path = dir.path().join("dead-letters.jsonl");
    let lettered = wait_until(Duration::from_secs(30), || !read_dead_letters(&letters_path).is_empty()).await;
    assert!(lettered, "the CDN's 400 dead-letters the event; log:\n{}", daemon.log_text());
    let metrics = http_get(port, "/metrics").map(|(_, b)| b).unwrap_or_default();
    daemon.signal("TERM");
    let (_, log) =
        tokio::task::spawn_blocking(move || (daemon.wait(Duration::from_secs(30)), daemon.log_text())).await.unwrap();
    let letters = std::fs::read_to_string(&letters_path).unwrap();
    assert!(letters.contains("fastly-key") || letters.contains("Fastly-Key"), "the echo is kept: {letters}");
    for (what, text) in [("the log", &log), ("the dead letters", &letters), ("/metrics", &metrics)] {
        assert!(!text.contains(SENTINEL), "{what} shows the secret:\n{text}");
    }
    assert!(log.lines().count() > 50, "trace logging was on: {log}");
}

/// The base of the mutation loop below: every setting written out, so each can be mutated.
const BASE: &str = r#"rules: rules.yaml
source:
  kind: kafka
  kafka:
    brokers: "127.0.0.1:9"
    group_id: mutated
    topics: ["shop.public.products"]
    commit_interval: 100ms
    max_message_bytes: 1000000
    librdkafka:
      fetch.wait.max.ms: 100
      session.timeout.ms: 6000
sinks:
  redis:
    url: "redis://127.0.0.1:9/0"
    tag_prefix: "tag:"
    unlink_batch: 512
    tag_chunk: 500
    response_timeout: 1s
    connect_timeout: 1s
    retry: { initial: 10ms, max: 100ms }
  timing:
    layer_delay: 0s
    repeat_after: 0s
    repeat_max_events: 1000
metrics:
  listen: "127.0.0.1:0"
pipeline:
  batch_max_events: 500
  batch_max_wait: 5ms
  batch_idle_wait: 1ms
  queue_capacity: 4096
dead_letter:
  file: dead-letters.jsonl
  retry: { initial: 10ms, max: 100ms }
shutdown:
  grace: 1s
log:
  level: info
"#;

/// Values tried in place of every scalar setting of [`BASE`]: zero, negative, huge, empty,
/// wrong types and units.
const MUTATIONS: &[&str] = &["0", "0s", "-1", "1", "1ms", "99999999999999", "\"\"", "x", "true", "2h", "1.5", "{}"];

/// Every config `check` accepts starts under `run` and drains cleanly (the brokers and Redis
/// are unreachable: a reason `check` cannot know, which `run` rides out). A deterministic
/// mutation loop over every scalar setting; before issue 10, `commit_interval: 0s` passed and
/// panicked, an unknown librdkafka property passed and failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_config_check_accepts_starts_under_run() {
    use cdc_invalidator::{app, config, rules::Rules, shutdown, telemetry::Metrics};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), crate::support::events::RULES).unwrap();
    let lines: Vec<&str> = BASE.lines().collect();
    let (mut accepted, mut rejected) = (0, 0);
    for (i, line) in lines.iter().enumerate() {
        let Some((key, value)) = line.split_once(": ") else { continue };
        if value.trim().is_empty() || key.trim() == "kind" || key.trim() == "rules" {
            continue;
        }
        // `retry: { initial: .., max: .. }` is mutated value by value too.
        let mut variants: Vec<String> = MUTATIONS.iter().map(|m| format!("{key}: {m}")).collect();
        if value.starts_with('{') {
            for m in MUTATIONS {
                variants.push(format!("{key}: {{ initial: {m}, max: 100ms }}"));
                variants.push(format!("{key}: {{ initial: 10ms, max: {m} }}"));
            }
        }
        for variant in variants {
            let mut text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            text[i] = variant.clone();
            let path = dir.path().join("c.yaml");
            std::fs::write(&path, text.join("\n") + "\n").unwrap();
            let cfg = match config::load_with_env(&path, []) {
                Ok(c) => c,
                Err(e) => {
                    rejected += 1;
                    let msg = e.to_string();
                    assert!(!msg.contains("panicked"), "{variant}: {msg}");
                    continue;
                }
            };
            accepted += 1;
            let rules = Rules::from_file(&cfg.rules).expect("rules");
            let (trigger, stop) = shutdown::channel();
            let task = tokio::spawn(app::run(cfg, rules, std::sync::Arc::new(Metrics::new()), stop));
            tokio::time::sleep(Duration::from_millis(50)).await;
            trigger.stop_intake();
            let result = tokio::time::timeout(Duration::from_secs(20), task).await;
            match result {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("`{variant}` passed check, then run failed: {e}"),
                Ok(Err(join)) => panic!("`{variant}` passed check, then run panicked: {join}"),
                Err(_) => panic!("`{variant}` passed check, then run did not stop"),
            }
        }
    }
    assert!(accepted > 50 && rejected > 100, "accepted {accepted}, rejected {rejected}");
}

/// After an outage, the backlog starts within a second of Redis answering again, although the
/// next retry was scheduled up to `retry.max` (20 s here) ahead: the health probe sees Redis
/// back and wakes the waiting retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_starts_within_a_second_of_redis_answering() {
    use redis::Commands;
    let mut redis = RedisServer::start();
    {
        let mut c = redis.connection();
        for id in 1..=5 {
            let _: () = c.set(format!("product:{id}"), "cached").unwrap();
        }
        let _: () = redis::cmd("SAVE").query(&mut c).unwrap();
    }
    redis.stop();
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    for id in 1..=5 {
        kafka.produce(TOPIC, Some(0), Some(&format!("{{\"id\":{id}}}")), Some(&product_insert(id, 1))).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let setup = Setup {
        bootstrap: &kafka.bootstrap(),
        topics: &[TOPIC],
        group: "recover",
        redis_url: &url,
        extra: "",
        librdkafka: &[],
    };
    let (path, port) = write_config(dir.path(), &setup);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("retry: { initial: 20ms, max: 250ms }", "retry: { initial: 20s, max: 20s }");
    std::fs::write(&path, text).unwrap();
    let daemon = crate::support::daemon::Daemon::from_config(dir.path(), &path, port);
    let retries = || daemon.metrics.value("cdc_invalidator_sink_retries_total", &[("sink", "redis")]);
    assert!(wait_until(Duration::from_secs(30), || retries() >= 1.0).await, "the batch fails while Redis is down");
    // Let the retry settle into its backoff (up to 20 s).
    tokio::time::sleep(Duration::from_millis(500)).await;

    tokio::task::block_in_place(|| redis.restart());
    let back = std::time::Instant::now();
    let mut c = redis.connection();
    let started = wait_until(Duration::from_secs(30), || !c.exists::<_, bool>("product:1").unwrap_or(true)).await;
    let after = back.elapsed();
    assert!(started, "the backlog never started");
    assert!(after < Duration::from_secs(1), "the backlog started {after:?} after Redis answered");
    assert!(
        wait_until(Duration::from_secs(5), || (1..=5)
            .all(|id| !c.exists::<_, bool>(format!("product:{id}")).unwrap_or(true)))
        .await
    );
    daemon.stop().await.unwrap();
}

/// How long a daemon restarted after kill -9 takes to invalidate a new change, against Tansu (a
/// real broker, out of process), with a 10 s session timeout; with or without static membership.
async fn rejoin_after_kill_9(group_instance_id: Option<&str>) -> (Duration, Duration) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use redis::Commands;
    let broker = crate::support::tansu::TansuBroker::start();
    broker.create_topic(TOPIC, 1);
    let redis = RedisServer::start();
    let mut c = redis.connection();
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create().unwrap();
    let produce = |id: i64| {
        let value = product_insert(id, 1);
        let producer = producer.clone();
        async move {
            let key = format!("{{\"id\":{id}}}");
            producer.send(FutureRecord::to(TOPIC).key(&key).payload(&value), Duration::from_secs(10)).await.unwrap();
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let bootstrap = broker.bootstrap();
    let group = format!("rejoin-{}", group_instance_id.is_some());
    let setup =
        Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: &group, redis_url: &url, extra: "", librdkafka: &[] };
    let (config, _) = write_config(dir.path(), &setup);
    let mut text =
        std::fs::read_to_string(&config).unwrap().replace("session.timeout.ms: 6000", "session.timeout.ms: 10000");
    if let Some(id) = group_instance_id {
        text = text.replace(
            "    commit_interval: 100ms\n",
            &format!("    commit_interval: 100ms\n    group_instance_id: {id}\n"),
        );
    }
    std::fs::write(&config, text).unwrap();

    let _: () = c.set("product:1", "cached").unwrap();
    produce(1).await;
    let started = std::time::Instant::now();
    let first = DaemonProcess::start(&config, dir.path());
    let consumed = wait_until(Duration::from_secs(60), || !c.exists::<_, bool>("product:1").unwrap_or(true)).await;
    assert!(consumed, "the first daemon consumes; log:\n{}", first.log_text());
    let cold = started.elapsed();
    drop(first); // SIGKILL, reaped

    let _: () = c.set("product:2", "cached").unwrap();
    let restarted = std::time::Instant::now();
    let second = DaemonProcess::start(&config, dir.path());
    produce(2).await;
    let consumed = wait_until(Duration::from_secs(60), || !c.exists::<_, bool>("product:2").unwrap_or(true)).await;
    assert!(consumed, "the restarted daemon consumes; log:\n{}", second.log_text());
    (cold, restarted.elapsed())
}

/// kill -9, then restart: with static membership the restarted daemon takes its partition back
/// without waiting for the dead member's session (10 s) to time out. Figures in
/// docs/benchmarks.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_membership_rejoins_after_kill_9_without_the_session_timeout() {
    let (cold_dynamic, dynamic) = rejoin_after_kill_9(None).await;
    let (cold_static, fixed) = rejoin_after_kill_9(Some("cdc-invalidator-0")).await;
    eprintln!(
        "first start: {cold_dynamic:?} / {cold_static:?}; rejoin after kill -9: dynamic membership {dynamic:?}, static membership {fixed:?}"
    );
    assert!(dynamic > Duration::from_secs(9), "dynamic membership waits for the session timeout: {dynamic:?}");
    assert!(fixed + Duration::from_secs(5) < dynamic, "static membership does not: {fixed:?} vs {dynamic:?}");
}

/// Integers beyond 64 bits render exactly as written (they rendered `1.8446744073709552e19`, the
/// wrong key); floats as before; Connect decimals as decimal strings as before. The fixture is
/// `pg-update-no-schema.json` (tests/fixtures/debezium/README.md) with the id widened, as a
/// NUMERIC(20,0) key arrives from a JsonConverter writing decimals as numbers, and a double
/// column added.
#[test]
fn integers_beyond_64_bits_render_as_written() {
    use cdc_invalidator::{explain::explain_message, rules::Rules, sink::ItemKind};
    let rules = Rules::parse(
        "version: 1\nrules:\n  - name: p\n    table: public.products\n    redis:\n      keys: [\"product:{id}\", \"w:{weight}\", \"price:{price}\", \"neg:{delta}\"]\n",
        std::path::Path::new("rules.yaml"),
    )
    .unwrap();
    let fixture = |name: &str| {
        std::fs::read_to_string(format!("{}/tests/fixtures/debezium/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let value = fixture("pg-update-no-schema.json").replace(
        "\"after\":{\"id\":42,",
        "\"after\":{\"id\":18446744073709551616,\"weight\":1.50,\"delta\":-99999999999999999999,",
    );
    let out = explain_message(&rules, TOPIC, None, Some(value.as_bytes())).unwrap();
    assert_eq!(
        out.invalidations.items(ItemKind::RedisKey),
        [
            "neg:-99999999999999999999",
            "price:100.00",
            "price:80.00",
            "product:18446744073709551616",
            "product:42",
            "w:1.5"
        ],
        "{out:?}"
    );
    let value = fixture("pg-update-with-schema.json");
    let rules = Rules::parse(
        "version: 1\nrules:\n  - name: p\n    table: public.products\n    redis:\n      keys: [\"product:{id}:{price}\"]\n",
        std::path::Path::new("rules.yaml"),
    )
    .unwrap();
    let out = explain_message(&rules, TOPIC, None, Some(value.as_bytes())).unwrap();
    assert_eq!(out.invalidations.items(ItemKind::RedisKey), ["product:42:100.00", "product:42:80.00"], "{out:?}");
}
