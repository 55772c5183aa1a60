//! The foundation path end to end in process: Kafka (librdkafka's mock cluster) -> Debezium
//! decoding -> rules -> a real Redis, with offsets committed only for finished work.

use std::time::Duration;

use redis::Commands;

use crate::support::daemon::{http_get, wait_until, Daemon, Setup};
use crate::support::events::{product_insert, product_update};
use crate::support::kafka::{committed, MockKafka};
use crate::support::redis::RedisServer;

const TOPIC: &str = "shop.public.products";

fn conn(url: &str) -> redis::Connection {
    redis::Client::open(url).expect("redis url").get_connection().expect("redis connection")
}

fn exists(c: &mut redis::Connection, key: &str) -> bool {
    c.exists(key).unwrap_or(true)
}

fn set_keys(c: &mut redis::Connection, ids: impl IntoIterator<Item = i64>) {
    for id in ids {
        let _: () = c.set(format!("product:{id}"), "cached").expect("SET");
    }
}

async fn wait_committed(bootstrap: &str, group: &str, partitions: i32, total: i64) -> Vec<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = committed(bootstrap, group, TOPIC, partitions).await;
        if got.iter().map(|&o| o.max(0)).sum::<i64>() == total || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn produce_inserts(kafka: &MockKafka, ids: std::ops::RangeInclusive<i64>, category: i64) {
    for id in ids {
        kafka.produce(TOPIC, None, Some(&format!("{{\"id\":{id}}}")), Some(&product_insert(id, category))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tag_members_are_deleted_and_offsets_committed() {
    let redis = RedisServer::start();
    let mut c = conn(&redis.url());
    set_keys(&mut c, 1..=30);
    let _: () = c.set("unrelated", "stays").unwrap();
    for m in ["listing:5:page:1", "listing:5:page:2", "listing:9:page:1"] {
        let _: () = c.set(m, "cached").unwrap();
    }
    let _: () =
        redis::cmd("SADD").arg("tag:category:5").arg("listing:5:page:1").arg("listing:5:page:2").query(&mut c).unwrap();
    let _: () = redis::cmd("SADD").arg("tag:category:9").arg("listing:9:page:1").query(&mut c).unwrap();

    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 3);
    produce_inserts(&kafka, 1..=30, 5).await;
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &Setup {
            bootstrap: &bootstrap,
            topics: &[TOPIC],
            group: "g1",
            redis_url: &redis.url(),
            extra: "",
            librdkafka: &[],
        },
    );

    let gone =
        wait_until(Duration::from_secs(20), || (1..=30).all(|id| !exists(&mut c, &format!("product:{id}")))).await;
    assert!(gone, "every product key is unlinked");
    assert!(!exists(&mut c, "listing:5:page:1") && !exists(&mut c, "listing:5:page:2"), "tag members are unlinked");
    assert!(!exists(&mut c, "tag:category:5"), "the tag set goes too");
    assert!(exists(&mut c, "listing:9:page:1") && exists(&mut c, "tag:category:9"), "other tags are untouched");
    assert!(exists(&mut c, "unrelated"));

    let offsets = wait_committed(&bootstrap, "g1", 3, 30).await;
    assert_eq!(
        offsets.iter().map(|&o| o.max(0)).sum::<i64>(),
        30,
        "offsets of all 30 finished events committed: {offsets:?}"
    );
    assert_eq!(daemon.metrics.value("cdc_invalidator_events_total", &[("outcome", "invalidated")]), 30.0);
    assert!(daemon.metrics.value("cdc_invalidator_staleness_seconds", &[("sink", "redis")]) >= 1.0);
    assert_eq!(daemon.metrics.value("cdc_invalidator_pending_events", &[]), 0.0);
    assert!(
        wait_until(Duration::from_secs(10), || daemon
            .metrics
            .value("cdc_invalidator_source_commits_total", &[("outcome", "ok")])
            >= 1.0)
        .await,
        "commit results are reported"
    );

    // The exposition is what Prometheus scrapes, and it must pass promtool's lint.
    let (status, body) = http_get(daemon.metrics_port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(body.contains("cdc_invalidator_events_total{"), "{body}");
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/install-deps.sh)");
    {
        use std::io::Write;
        promtool.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (ready, _) = http_get(daemon.metrics_port, "/readyz").unwrap();
    assert_eq!(ready, 200, "ready once assigned and Redis answers");
    assert_eq!(http_get(daemon.metrics_port, "/healthz").unwrap().0, 200);

    daemon.stop().await.expect("clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_after_the_last_committed_offset() {
    let redis = RedisServer::start();
    let mut c = conn(&redis.url());
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();
    let setup = Setup {
        bootstrap: &bootstrap,
        topics: &[TOPIC],
        group: "g2",
        redis_url: &redis.url(),
        extra: "",
        librdkafka: &[],
    };

    set_keys(&mut c, 1..=10);
    produce_inserts(&kafka, 1..=10, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let first = Daemon::start(dir.path(), &setup);
    assert!(wait_until(Duration::from_secs(20), || (1..=10).all(|id| !exists(&mut c, &format!("product:{id}")))).await);
    first.stop().await.unwrap();
    assert_eq!(committed(&bootstrap, "g2", TOPIC, 1).await, vec![10]);

    // Caches refill; new changes arrive while the daemon is down.
    set_keys(&mut c, 1..=15);
    produce_inserts(&kafka, 11..=15, 1).await;
    let second = Daemon::start(dir.path(), &setup);
    assert!(
        wait_until(Duration::from_secs(20), || (11..=15).all(|id| !exists(&mut c, &format!("product:{id}")))).await
    );
    assert_eq!(wait_committed(&bootstrap, "g2", 1, 15).await, vec![15]);
    let processed = second.metrics.value("cdc_invalidator_events_total", &[]);
    second.stop().await.unwrap();
    assert_eq!(processed, 5.0, "only the events after the committed offset are read again");
    assert!((1..=10).all(|id| exists(&mut c, &format!("product:{id}"))), "finished work is not redone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_holds_offsets_and_everything_is_deleted_when_it_returns() {
    let mut redis = RedisServer::start();
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 2);
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let daemon = Daemon::start(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "g3", redis_url: &url, extra: "", librdkafka: &[] },
    );

    {
        let mut c = conn(&url);
        set_keys(&mut c, 1..=20);
        let _: () = c.set("sentinel", "never invalidated").unwrap();
        produce_inserts(&kafka, 1..=10, 1).await;
        assert!(
            wait_until(Duration::from_secs(20), || (1..=10).all(|id| !exists(&mut c, &format!("product:{id}")))).await
        );
        // Keep the refilled keys across the restart: persist them, then stop the server.
        let _: () = redis::cmd("SAVE").query(&mut c).unwrap();
    }
    assert_eq!(wait_committed(&bootstrap, "g3", 2, 10).await.iter().sum::<i64>(), 10);
    redis.stop();

    produce_inserts(&kafka, 11..=20, 1).await;
    // The events are consumed but cannot finish: offsets must not move.
    assert!(
        wait_until(Duration::from_secs(10), || daemon.metrics.value("cdc_invalidator_pending_events", &[]) == 10.0)
            .await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        committed(&bootstrap, "g3", TOPIC, 2).await.iter().sum::<i64>(),
        10,
        "nothing acknowledged while Redis is down"
    );
    assert!(daemon.metrics.value("cdc_invalidator_sink_retries_total", &[("sink", "redis")]) >= 1.0);

    redis.restart();
    let mut c = conn(&url);
    // (product:11..20 may already be gone again: the daemon retries within 250 ms.)
    assert!(exists(&mut c, "sentinel"), "the saved keys came back with the server");
    assert!(
        wait_until(Duration::from_secs(20), || (11..=20).all(|id| !exists(&mut c, &format!("product:{id}")))).await,
        "every key is deleted once Redis returns"
    );
    assert_eq!(wait_committed(&bootstrap, "g3", 2, 20).await.iter().sum::<i64>(), 20);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_work_is_redelivered_on_the_next_start() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.stop();
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();
    produce_inserts(&kafka, 1..=8, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let setup =
        Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "g4", redis_url: &url, extra: "", librdkafka: &[] };

    let first = Daemon::start(dir.path(), &setup);
    assert!(
        wait_until(Duration::from_secs(10), || first.metrics.value("cdc_invalidator_pending_events", &[]) == 8.0).await
    );
    first.abandon().await.unwrap();
    // Offset 0 ("resume at 0") or no commit at all: either way none of the 8 is acknowledged.
    let offsets = committed(&bootstrap, "g4", TOPIC, 1).await;
    assert!(offsets[0] <= 0, "abandoned work is not acknowledged: {offsets:?}");

    redis.restart();
    let mut c = conn(&url);
    set_keys(&mut c, 1..=8);
    let second = Daemon::start(dir.path(), &setup);
    assert!(wait_until(Duration::from_secs(20), || (1..=8).all(|id| !exists(&mut c, &format!("product:{id}")))).await);
    assert_eq!(wait_committed(&bootstrap, "g4", 1, 8).await, vec![8]);
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_faults_lose_nothing() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let redis = RedisServer::start();
    let mut c = conn(&redis.url());
    set_keys(&mut c, 1..=30);
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 2);
    let bootstrap = kafka.bootstrap();
    produce_inserts(&kafka, 1..=10, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &Setup {
            bootstrap: &bootstrap,
            topics: &[TOPIC],
            group: "g5",
            redis_url: &redis.url(),
            extra: "",
            librdkafka: &[],
        },
    );
    assert!(wait_until(Duration::from_secs(20), || (1..=10).all(|id| !exists(&mut c, &format!("product:{id}")))).await);

    // Fetch and OffsetCommit requests fail for a while.
    kafka
        .cluster()
        .request_errors(RDKafkaApiKey::Fetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 4]);
    kafka
        .cluster()
        .request_errors(RDKafkaApiKey::OffsetCommit, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 4]);
    produce_inserts(&kafka, 11..=20, 1).await;
    assert!(
        wait_until(Duration::from_secs(20), || (11..=20).all(|id| !exists(&mut c, &format!("product:{id}")))).await
    );

    // The broker goes away and comes back.
    kafka.cluster().broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.cluster().broker_up(1).unwrap();
    produce_inserts(&kafka, 21..=30, 1).await;
    assert!(
        wait_until(Duration::from_secs(30), || (21..=30).all(|id| !exists(&mut c, &format!("product:{id}")))).await,
        "events after the outage arrive"
    );
    let offsets = wait_committed(&bootstrap, "g5", 2, 30).await;
    let diag: Vec<String> = daemon
        .metrics
        .render()
        .lines()
        .filter(|l| ["source_commits", "rebalances", "pending_events", "source_errors"].iter().any(|m| l.contains(m)))
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    assert_eq!(offsets.iter().sum::<i64>(), 30, "commits recover after the faults: {offsets:?} {diag:#?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unrenderable_events_are_dead_lettered_and_the_pipeline_goes_on() {
    let redis = RedisServer::start();
    let mut c = conn(&redis.url());
    set_keys(&mut c, [1, 2, 43]);
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();
    kafka.produce(TOPIC, Some(0), None, Some(&product_insert(1, 1))).await;
    kafka.produce(TOPIC, Some(0), None, Some("{not json")).await;
    kafka
        .produce(
            TOPIC,
            Some(0),
            None,
            Some(r#"{"before":null,"after":{"id":9},"source":{"schema":"public","table":"products"},"op":"x"}"#),
        )
        .await;
    // A delete whose before image holds only the key: the tag cannot render, the key can.
    let delete = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/debezium/pg-delete-key-only.json"
    ))
    .unwrap();
    kafka.produce(TOPIC, Some(0), None, Some(&delete)).await;
    kafka.produce(TOPIC, Some(0), None, None).await; // tombstone
                                                     // An empty value is a tombstone too, as `explain` says: not a dead letter.
    kafka.produce(TOPIC, Some(0), None, Some("")).await;
    kafka.produce(TOPIC, Some(0), None, Some(&product_update(2, 1, 2))).await;

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &Setup {
            bootstrap: &bootstrap,
            topics: &[TOPIC],
            group: "g6",
            redis_url: &redis.url(),
            extra: "",
            librdkafka: &[],
        },
    );
    assert!(
        wait_until(Duration::from_secs(20), || !exists(&mut c, "product:1") && !exists(&mut c, "product:2")).await,
        "later events are processed"
    );
    assert!(!exists(&mut c, "product:43"), "what a partially renderable event could render is still invalidated");
    assert_eq!(wait_committed(&bootstrap, "g6", 1, 7).await, vec![7], "dead-lettered events count as finished");

    let letters = daemon.dead_letters();
    assert_eq!(letters.len(), 3, "{letters:#?}");
    assert_eq!(letters[0]["reason"], "malformed");
    assert_eq!(letters[0]["position"], format!("{TOPIC}[0]@1"));
    assert_eq!(letters[0]["value"], "{not json");
    assert_eq!(letters[1]["reason"], "malformed");
    assert!(letters[1]["error"].as_str().unwrap().contains("x"), "{}", letters[1]["error"]);
    assert_eq!(letters[2]["reason"], "rule_error");
    assert_eq!(letters[2]["position"], format!("{TOPIC}[0]@3"));
    assert!(letters[2]["error"].as_str().unwrap().contains("category_id"), "{}", letters[2]["error"]);
    assert_eq!(daemon.metrics.value("cdc_invalidator_dead_letters_total", &[("reason", "malformed")]), 2.0);
    assert_eq!(daemon.metrics.value("cdc_invalidator_rule_errors_total", &[("rule", "product-pages")]), 1.0);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_go_to_a_kafka_topic() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;

    let redis = RedisServer::start();
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    kafka.create_topic("dead-letters", 1);
    let bootstrap = kafka.bootstrap();
    kafka.produce(TOPIC, Some(0), Some("k1"), Some("not json at all")).await;
    kafka.produce(TOPIC, Some(0), None, Some(&product_insert(1, 1))).await;

    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let (path, port) = crate::support::daemon::write_config(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "g7", redis_url: &url, extra: "", librdkafka: &[] },
    );
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("  file: dead-letters.jsonl", "  kafka: { topic: dead-letters }");
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::from_config(dir.path(), &path, port);
    assert_eq!(wait_committed(&bootstrap, "g7", 1, 2).await, vec![2]);
    assert_eq!(daemon.metrics.value("cdc_invalidator_dead_letters_total", &[("reason", "malformed")]), 1.0);
    daemon.stop().await.unwrap();

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["dead-letters"]).unwrap();
    let msg =
        tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await.expect("a dead letter arrives").unwrap();
    assert_eq!(msg.key(), Some(&b"k1"[..]), "keyed like the original message");
    let record: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
    assert_eq!(record["reason"], "malformed");
    assert_eq!(record["value"], "not json at all");
    assert_eq!(record["source"]["offset"], 0);
    assert!(!std::path::Path::new(&dir.path().join("dead-letters.jsonl")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_pattern_subscription_and_oversized_messages() {
    let redis = RedisServer::start();
    let mut c = conn(&redis.url());
    set_keys(&mut c, [1, 2]);
    let kafka = MockKafka::start(1);
    kafka.create_topic("shop.public.products", 1);
    kafka.create_topic("shop.public.orders", 1);
    kafka.create_topic("other.public.products", 1);
    let bootstrap = kafka.bootstrap();
    kafka.produce("shop.public.products", Some(0), None, Some(&product_insert(1, 1))).await;
    // Over the configured max_message_bytes: dead-lettered without being parsed.
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(20_000));
    kafka.produce("shop.public.orders", Some(0), None, Some(&huge)).await;
    kafka.produce("other.public.products", Some(0), None, Some(&product_insert(2, 1))).await;

    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let (path, port) = crate::support::daemon::write_config(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &["unused"], group: "g8", redis_url: &url, extra: "", librdkafka: &[] },
    );
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("    topics: [\"unused\"]\n", "    topic_pattern: \"^shop\\\\..*\"\n    max_message_bytes: 10000\n");
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::from_config(dir.path(), &path, port);
    assert!(
        wait_until(Duration::from_secs(20), || !exists(&mut c, "product:1")).await,
        "a topic matching the pattern is read"
    );
    assert!(
        wait_until(Duration::from_secs(10), || daemon.metrics.value("cdc_invalidator_dead_letters_total", &[]) == 1.0)
            .await
    );
    let letters = daemon.dead_letters();
    assert_eq!(letters.len(), 1);
    assert!(letters[0]["error"].as_str().unwrap().contains("max_message_bytes"), "{}", letters[0]["error"]);
    assert_eq!(letters[0]["value"], serde_json::Value::Null, "an oversized value is not copied into the dead letter");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(exists(&mut c, "product:2"), "a topic outside the pattern is not read");
    daemon.stop().await.unwrap();
}
