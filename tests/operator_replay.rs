//! `cdc-invalidator replay`: dead letters (file or topic) and plain Debezium JSON lines back
//! through the current rules and the real sinks; bad lines reported by number and skipped.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use redis::Commands;

use cdc_invalidator::config;
use cdc_invalidator::replay::{self, Input, Options};
use cdc_invalidator::rules::Rules;
use cdc_invalidator::shutdown::Shutdown;
use cdc_invalidator::telemetry::Metrics;

use crate::support::daemon::{binary, read_dead_letters, wait_until, write_config, Daemon, Setup};
use crate::support::events::{product_insert, product_update};
use crate::support::kafka::MockKafka;
use crate::support::redis::RedisServer;

const TOPIC: &str = "shop.public.products";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/debezium/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

/// The fixed rules: the tag on `category_id` (which key-only deletes cannot render) is gone, and
/// product pages get a second key.
const FIXED_RULES: &str = r#"version: 1
rules:
  - name: product-pages
    table: public.products
    redis:
      keys: ["product:{id}", "page:{id}"]
"#;

fn conn(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

fn exists(c: &mut redis::Connection, key: &str) -> bool {
    c.exists(key).unwrap_or(true)
}

fn run_replay(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary()).arg("replay").args(args).output().expect("run replay");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config for replay only: the Kafka source is never contacted when reading a file.
fn replay_config(dir: &Path, redis_url: &str) -> std::path::PathBuf {
    let (path, _) = write_config(
        dir,
        &Setup { bootstrap: "127.0.0.1:1", topics: &[TOPIC], group: "replay", redis_url, extra: "", librdkafka: &[] },
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_from_the_daemon_replay_through_fixed_rules() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url);
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "dl", redis_url: &url, extra: "", librdkafka: &[] },
    );
    // A key-only delete: the tag template on category_id cannot render: a rule error.
    kafka.produce(TOPIC, None, Some("{\"id\":43}"), Some(&fixture("pg-delete-key-only.json"))).await;
    kafka.produce(TOPIC, None, Some("{\"id\":44}"), Some("{not json")).await;
    assert!(wait_until(Duration::from_secs(20), || daemon.dead_letters().len() == 2).await, "two dead letters");
    daemon.stop().await.expect("drained");
    let letters = read_dead_letters(&dir.path().join("dead-letters.jsonl"));
    assert_eq!(letters[0]["reason"], "rule_error");
    assert_eq!(letters[1]["reason"], "malformed");

    // The operator fixes the rules, and the application has cached the pages again.
    std::fs::write(dir.path().join("rules.yaml"), FIXED_RULES).unwrap();
    for k in ["product:43", "page:43"] {
        let _: () = c.set(k, "cached").unwrap();
    }
    let config = dir.path().join("config.yaml");
    let dead = dir.path().join("dead-letters.jsonl");
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_replay(&["-c", config.to_str().unwrap(), "--file", dead.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(!exists(&mut c, "product:43") && !exists(&mut c, "page:43"), "replayed through the new rules: {stderr}");
    // The malformed record is reported by its line number and skipped; it is not written again.
    assert_eq!(code, Some(3), "some records were bad: {stderr}");
    assert!(stderr.contains("dead-letters.jsonl:2: malformed event"), "{stderr}");
    assert!(stderr.contains("2 records read: 1 invalidated"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(read_dead_letters(&dir.path().join("dead-letters.jsonl")).len(), 2, "nothing dead-lettered again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_are_reported_by_number_and_the_rest_goes_on() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url);
    for k in ["product:1", "product:2", "product:42", "tag:category:5", "listing:5"] {
        let _: () = c.set(k, "cached").unwrap();
    }
    let _: () = c.del("tag:category:5").unwrap();
    let _: () = c.sadd("tag:category:5", "listing:5").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = replay_config(dir.path(), &url);
    // Plain Debezium messages, one per line, with junk among them.
    let lines = [
        product_insert(1, 5),                                      // 1 ok
        "this is not json".to_string(),                            // 2 bad
        "null".to_string(),                                        // 3 a tombstone: no change
        String::new(),                                             // 4 blank: ignored
        r#"{"op":"c","source":{"table":"products"}}"#.to_string(), // 5 an event without rows: bad
        fixture("pg-update-no-schema.json").trim().to_string(),    // 6 ok: product 42 in category 5
        fixture("pg-delete-key-only.json").trim().to_string(),     // 7 rule error: dead-lettered again
        product_update(2, 1, 2),                                   // 8 ok
    ];
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let args = ["-c", config.to_str().unwrap(), "--file", input.to_str().unwrap(), "--topic", TOPIC];
    let (code, _, stderr) = run_replay(&args);
    assert_eq!(code, Some(3), "{stderr}");
    let at = |n: u32| format!("{}:{n}: ", input.display());
    assert!(stderr.contains(&(at(2) + "not JSON")), "{stderr}");
    assert!(stderr.contains(&(at(5) + "malformed event")), "{stderr}");
    assert!(!stderr.contains(&at(4)) && !stderr.contains(&at(3)), "{stderr}");
    assert!(
        stderr.contains("7 records read: 3 invalidated, 0 matched no rule, 1 carried no change, 1 dead-lettered again, 2 bad records skipped"),
        "{stderr}"
    );
    assert!(stderr.contains("skipped: line 2, line 5"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for k in ["product:1", "product:2", "product:42", "listing:5"] {
        assert!(!exists(&mut c, k), "{k} invalidated; {stderr}");
    }
    let again = read_dead_letters(&dir.path().join("dead-letters.jsonl"));
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["reason"], "rule_error");
    assert_eq!(again[0]["position"], "line 7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_explanations_and_touches_nothing() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url);
    let _: () = c.set("product:42", "cached").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = replay_config(dir.path(), &url);
    let input = dir.path().join("events.jsonl");
    let update = fixture("pg-update-no-schema.json");
    std::fs::write(&input, format!("{}\n{{oops\n", update.trim())).unwrap();
    let args = ["-c", config.to_str().unwrap(), "--file", input.to_str().unwrap(), "--topic", TOPIC, "--dry-run"];
    let (code, stdout, stderr) = run_replay(&args);
    assert_eq!(code, Some(3), "a bad line: {stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert_eq!(lines[0]["position"], "line 1");
    assert_eq!(lines[0]["redis_keys"], serde_json::json!(["product:42"]));
    assert_eq!(lines[0]["redis_tags"], serde_json::json!(["category:5"]));
    assert!(stderr.contains(":2: not JSON"), "{stderr}");
    assert!(stderr.contains("(dry run): 2 records read: 1 would be invalidated"), "{stderr}");
    assert!(exists(&mut c, "product:42"), "a dry run touches nothing");
    assert!(
        !dir.path().join("dead-letters.jsonl").exists()
            || read_dead_letters(&dir.path().join("dead-letters.jsonl")).is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_topic_replays_to_its_end() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut c = conn(&url);
    for id in 1..=3 {
        let _: () = c.set(format!("product:{id}"), "cached").unwrap();
    }
    let kafka = MockKafka::start(1);
    let dlq = "cdc-invalidator.dead-letters";
    kafka.create_topic(dlq, 2);
    // Records as the daemon writes them, on two partitions, plus one that is not a record.
    for id in 1..=3i64 {
        let record = serde_json::json!({
            "reason": "sink_rejected", "error": "x", "position": format!("{TOPIC}[0]@{id}"),
            "source": {"kind": "kafka", "topic": TOPIC, "partition": 0, "offset": id},
            "table": "public.products", "op": "insert", "key": format!("{{\"id\":{id}}}"),
            "value": product_insert(id, 5), "dead_lettered_at_ms": 1,
        });
        kafka.produce(dlq, Some((id % 2) as i32), None, Some(&record.to_string())).await;
    }
    let (_, bad_offset) = kafka.produce(dlq, Some(0), None, Some("garbage")).await;
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = kafka.bootstrap();
    let (path, _) = write_config(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "g", redis_url: &url, extra: "", librdkafka: &[] },
    );
    let config = config::load_with_env(&path, []).unwrap();
    let rules = Rules::from_file(&config.rules).unwrap();
    let options = Options { input: Input::Kafka { topic: dlq.into() }, topic: None, dry_run: false };
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        replay::replay(config, rules, options, Arc::new(Metrics::new()), Shutdown::never()),
    )
    .await
    .expect("replay reaches the end of the topic")
    .expect("replay ran");
    assert_eq!(summary.read, 4);
    assert_eq!(summary.invalidated, 3);
    assert_eq!(summary.bad.len(), 1, "{:?}", summary.bad);
    assert_eq!(summary.bad[0].0, format!("{dlq}[0]@{bad_offset}"));
    assert_eq!(summary.exit_code(), replay::INCOMPLETE);
    for id in 1..=3 {
        assert!(!exists(&mut c, &format!("product:{id}")));
    }
}
