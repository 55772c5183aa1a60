//! Telling applications after the deletes (`sinks.redis.broadcast`, `sinks.redis.warm`) on real
//! Redis: standalone and a 3-primary cluster; the reference subscriber of `examples/`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cdc_invalidator::config::{RedisConfig, RedisMode, Secret};
use cdc_invalidator::retry::RetryPolicy;
use cdc_invalidator::shutdown::Shutdown;
use cdc_invalidator::sink::redis::broadcast::BroadcastConfig;
use cdc_invalidator::sink::redis::warm::WarmConfig;
use cdc_invalidator::sink::redis::RedisSink;
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink};
use cdc_invalidator::telemetry::Metrics;
use futures::StreamExt;
use redis::Commands;

use crate::support::daemon::{wait_until, write_config, Daemon, Setup};
use crate::support::events::product_insert;
use crate::support::kafka::MockKafka;
use crate::support::postgres::PgCluster;
use crate::support::redis::{RedisCluster, RedisServer};

/// The reference subscriber, exactly as shipped.
#[allow(dead_code)]
#[path = "../examples/broadcast_subscriber/subscriber.rs"]
pub(crate) mod subscriber;

use subscriber::{Event, LocalCache, Target};

const CHANNEL: &str = "cdc-invalidator";

fn fast(mut c: RedisConfig) -> RedisConfig {
    c.retry = RetryPolicy { initial: Duration::from_millis(20), max: Duration::from_millis(250), max_attempts: None };
    c.connect_timeout = Duration::from_millis(500);
    c.response_timeout = Duration::from_millis(1000);
    c
}

fn with_signals(mut c: RedisConfig, stream: Option<(&str, u64)>) -> RedisConfig {
    c.broadcast = Some(BroadcastConfig { channel: CHANNEL.into() });
    c.warm = stream.map(|(stream, maxlen)| WarmConfig { stream: stream.into(), maxlen });
    c
}

fn sink(config: &RedisConfig) -> (Arc<RedisSink>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    (Arc::new(RedisSink::new("redis", config, metrics.clone()).expect("valid config")), metrics)
}

fn metric(metrics: &Metrics, name: &str) -> f64 {
    metrics.value(name, &[])
}

/// A message as the subscriber received it, and what still existed at that moment.
struct Received {
    message: serde_json::Value,
    still_there: i64,
}

/// Subscribes (plain SUBSCRIBE) and, on every message, asks a second connection how many of the
/// message's keys and of its tags' members (`members`) still exist.
async fn watch_standalone(
    url: &str,
    members: HashMap<String, Vec<String>>,
) -> (tokio::task::JoinHandle<()>, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let client = redis::Client::open(url).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(CHANNEL).await.unwrap();
    let mut check = client.get_multiplexed_async_connection().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let message: serde_json::Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
            let mut keys: Vec<String> =
                message["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect();
            for tag in message["tags"].as_array().unwrap() {
                keys.extend(members.get(tag.as_str().unwrap()).cloned().unwrap_or_default());
            }
            let still_there: i64 = redis::cmd("EXISTS").arg(&keys).query_async(&mut check).await.unwrap();
            if tx.send(Received { message, still_there }).is_err() {
                return;
            }
        }
    });
    (task, rx)
}

/// Many batches of keys and tags: every message arrives after its batch's deletes (no key it
/// names, no member of a tag it names, exists when it is received), one message per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_never_hears_of_a_key_that_still_exists() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let batches = 40;
    let mut members = HashMap::new();
    let mut work = Vec::new();
    for b in 0..batches {
        let keys: Vec<String> = (0..25).map(|i| format!("product:{b}:{i}")).collect();
        let tag = format!("category:{b}");
        let listed: Vec<String> = (0..30).map(|i| format!("listing:{b}:{i}")).collect();
        for k in keys.iter().chain(&listed) {
            let _: () = con.set(k, "cached").unwrap();
        }
        let _: () = con.sadd(format!("tag:{tag}"), &listed).unwrap();
        members.insert(tag.clone(), listed);
        work.push(Invalidations::of(ItemKind::RedisKey, keys).with(ItemKind::RedisTag, vec![tag]));
    }
    let (listener, mut received) = watch_standalone(&redis.url(), members).await;
    let (sink, metrics) = sink(&with_signals(fast(RedisConfig::for_url(&redis.url())), None));
    for batch in &work {
        sink.invalidate(batch, &Shutdown::never()).await.unwrap();
    }
    for b in 0..batches {
        let got = tokio::time::timeout(Duration::from_secs(10), received.recv()).await.expect("a message per batch");
        let got = got.unwrap();
        assert_eq!(got.still_there, 0, "message {b} arrived before its deletes: {}", got.message);
        assert_eq!(got.message["keys"].as_array().unwrap().len(), 25);
        assert_eq!(got.message["tags"], serde_json::json!([format!("category:{b}")]));
        assert_eq!(got.message["patterns"], serde_json::json!([]));
        // A batch given straight to the sink has no source position.
        assert!(got.message["position"].is_null(), "{}", got.message);
    }
    assert_eq!(metric(&metrics, "cdc_invalidator_redis_broadcast_messages_total"), batches as f64);
    assert_eq!(metric(&metrics, "cdc_invalidator_redis_broadcast_receivers"), 1.0);
    listener.abort();
}

/// `MAXLEN ~` keeps the stream near its cap (Redis trims whole nodes of
/// `stream-node-max-entries`, 100 by default), every key gets an entry until then.
#[tokio::test]
async fn the_warm_up_stream_stays_near_its_cap() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let (sink, metrics) = sink(&with_signals(fast(RedisConfig::for_url(&redis.url())), Some(("warm", 1000))));
    for b in 0..10 {
        let keys: Vec<String> = (0..700).map(|i| format!("product:{b}:{i}")).collect();
        sink.invalidate(&Invalidations::of(ItemKind::RedisKey, keys), &Shutdown::never()).await.unwrap();
    }
    let len: u64 = con.xlen("warm").unwrap();
    assert!((1000..1100).contains(&len), "7000 keys appended to a stream capped at ~1000: {len} entries");
    assert_eq!(metric(&metrics, "cdc_invalidator_redis_warm_entries_total"), 7000.0);
    // The newest entry is the last key of the last batch, with its fields.
    let last: redis::streams::StreamRangeReply = con.xrevrange_count("warm", "+", "-", 1).unwrap();
    let entry = &last.ids[0];
    assert_eq!(entry.get::<String>("key").as_deref(), Some("product:9:699"), "the last key of the last batch");
    assert_eq!(entry.get::<String>("op").as_deref(), Some("unknown"), "no events, no origin");
}

/// A stream key holding a string: every key is rejected with the reason (the events are
/// dead-lettered), at once, not retried forever; the deletes themselves happened.
#[tokio::test]
async fn a_warm_stream_key_of_another_type_is_a_permanent_rejection() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let _: () = con.set("warm", "not a stream").unwrap();
    let _: () = con.set("product:1", "cached").unwrap();
    let (sink, metrics) = sink(&with_signals(fast(RedisConfig::for_url(&redis.url())), Some(("warm", 100))));
    let batch = Invalidations::of(ItemKind::RedisKey, vec!["product:1".into(), "product:2".into()]);
    let report = tokio::time::timeout(Duration::from_secs(10), sink.invalidate(&batch, &Shutdown::never()))
        .await
        .expect("no retry loop")
        .unwrap();
    assert_eq!(report.rejected.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 1]);
    let reason = &report.rejected[0].reason;
    assert!(
        reason.contains("WRONGTYPE") && reason.contains("\"warm\" (sinks.redis.warm.stream) is not a stream"),
        "{reason}"
    );
    assert!(!con.exists::<_, bool>("product:1").unwrap(), "the delete went first");
    assert_eq!(metric(&metrics, "cdc_invalidator_sink_retries_total"), 0.0);
    assert_eq!(metric(&metrics, "cdc_invalidator_redis_warm_entries_total"), 0.0);
}

/// Cluster mode: SPUBLISH (received by an SSUBSCRIBE: the reference subscriber in cluster mode)
/// after the deletes on every primary; the warm-up stream's XADDs go to its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_broadcast_is_a_shard_message_after_the_deletes() {
    let cluster = RedisCluster::start(3);
    let mut con = cluster.client();
    let cache = Arc::new(LocalCache::new(1000));
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let subscription =
        tokio::spawn(subscriber::run(Target::Cluster(cluster.urls()), CHANNEL.into(), cache.clone(), Some(tx)));
    let first = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("subscribed");
    assert_eq!(first, Some(Event::Subscribed));

    let mut config = fast(RedisConfig::for_url("redis://unused"));
    (config.url, config.resolved_url, config.mode) = (None, None, RedisMode::Cluster);
    config.nodes = cluster.urls().into_iter().map(Secret::new).collect();
    config.wait_replicas = Some(cdc_invalidator::config::WaitReplicas { count: 0, timeout: Duration::from_secs(1) });
    let (sink, metrics) = sink(&with_signals(config, Some(("cdc-invalidator:warm", 1000))));
    // Keys spread over every primary; each also held by the local cache.
    let keys: Vec<String> = (0..60).map(|i| format!("product:{i}")).collect();
    for k in &keys {
        let _: () = con.set(k, "cached").unwrap();
    }
    for k in &keys {
        cache.put(k, "cached", &[], cache.ticket());
    }
    cache.put("listing:1", "cached", &["category:5"], cache.ticket());
    let batch = Invalidations::of(ItemKind::RedisKey, keys.clone()).with(ItemKind::RedisTag, vec!["category:5".into()]);
    // Asked at once on receipt, on every primary concurrently, while the sink may still work.
    let checker = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let checker = checker.get_async_connection().await.unwrap();
    let invalidating = {
        let sink = sink.clone();
        tokio::spawn(async move { sink.invalidate(&batch, &Shutdown::never()).await })
    };
    let got = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("the shard message");
    let asked = keys.iter().map(|k| {
        let mut c = checker.clone();
        async move { redis::cmd("EXISTS").arg(k).query_async::<i64>(&mut c).await.unwrap() }
    });
    let there_on_receipt: i64 = futures::future::join_all(asked).await.into_iter().sum();
    assert_eq!(there_on_receipt, 0, "the message arrived before every delete");
    invalidating.await.unwrap().unwrap();
    let Some(Event::Message { message, dropped }) = got else { panic!("a message, got {got:?}") };
    let mut heard = message.keys.clone();
    heard.sort();
    let mut sent = keys.clone();
    sent.sort();
    assert_eq!(heard, sent);
    assert_eq!(dropped, 61, "every key and the tagged entry dropped locally");
    assert!(cache.is_empty());
    let left: Vec<&String> = keys.iter().filter(|k| con.exists::<_, bool>(k.as_str()).unwrap()).collect();
    assert!(left.is_empty(), "{left:?}");
    let len: u64 = con.xlen("cdc-invalidator:warm").unwrap();
    assert_eq!(len, 60);
    assert_eq!(metric(&metrics, "cdc_invalidator_redis_broadcast_messages_total"), 1.0);
    subscription.abort();
}

/// The reference subscriber on a standalone server: drops what a message names (keys and tagged
/// entries), and clears the whole local cache when its connection is lost, then resubscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_subscriber_drops_entries_and_starts_clean_after_a_reconnect() {
    let mut redis = RedisServer::start();
    let cache = Arc::new(LocalCache::new(100));
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let target = Target::Standalone(redis.url());
    let subscription = tokio::spawn(subscriber::run(target, CHANNEL.into(), cache.clone(), Some(tx)));
    assert_eq!(next(&mut events).await, Event::Subscribed);
    for (key, tags) in [("product:1", &["category:5"][..]), ("listing:5", &["category:5"]), ("product:2", &[])] {
        assert!(cache.put(key, "cached", tags, cache.ticket()));
    }
    let (sink, _) = sink(&with_signals(fast(RedisConfig::for_url(&redis.url())), None));
    let batch = Invalidations::of(ItemKind::RedisKey, vec!["product:1".into()])
        .with(ItemKind::RedisTag, vec!["category:5".into()]);
    sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    let Event::Message { dropped, .. } = next(&mut events).await else { panic!("a message") };
    assert_eq!(dropped, 2, "product:1, and listing:5 under category:5");
    assert_eq!(cache.get("product:2").as_deref(), Some("cached"));
    let ticket = cache.ticket();

    // Redis restarts: messages published meanwhile would be lost, so the cache starts clean.
    redis.restart();
    assert_eq!(next(&mut events).await, Event::Lost);
    assert!(cache.is_empty());
    assert!(!cache.put("product:3", "read before the loss", &[], ticket), "a read from before the loss is not cached");
    assert_eq!(next(&mut events).await, Event::Subscribed, "resubscribed by itself");
    assert!(cache.put("product:2", "cached", &[], cache.ticket()));
    sink.invalidate(&Invalidations::of(ItemKind::RedisKey, vec!["product:2".into()]), &Shutdown::never())
        .await
        .unwrap();
    let Event::Message { dropped, .. } = next(&mut events).await else { panic!("a message after resubscribing") };
    assert_eq!(dropped, 1);
    subscription.abort();
}

/// Through the daemon: the broadcast carries the batch's source position (Debezium's
/// `source.lsn`), the warm-up stream each key's table and op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_daemon_messages_carry_the_position_and_entries_the_table_and_op() {
    let kafka = MockKafka::start(1);
    kafka.create_topic("shop.public.products", 1);
    let redis = RedisServer::start();
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        bootstrap: &kafka.bootstrap(),
        topics: &["shop.public.products"],
        group: "signals",
        redis_url: &url,
        extra: "",
        librdkafka: &[],
    };
    let (path, port) = write_config(dir.path(), &setup);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "    retry: { initial: 20ms, max: 250ms }\n",
        "    retry: { initial: 20ms, max: 250ms }\n    broadcast: { channel: cdc-invalidator }\n    warm: { stream: \"cdc-invalidator:warm\", maxlen: 1000 }\n",
    );
    std::fs::write(&path, text).unwrap();
    let (listener, mut received) = watch_standalone(&url, HashMap::new()).await;
    let daemon = Daemon::from_config(dir.path(), &path, port);
    let mut con = redis.connection();
    let _: () = con.set("product:7", "cached").unwrap();
    kafka.produce("shop.public.products", None, Some("{\"id\":7}"), Some(&product_insert(7, 5))).await;
    let got = tokio::time::timeout(Duration::from_secs(30), received.recv()).await.expect("a message").unwrap();
    assert_eq!(got.still_there, 0);
    assert_eq!(got.message["keys"], serde_json::json!(["product:7"]));
    assert_eq!(got.message["position"], "1", "the event's source.lsn");
    let entries =
        wait_until(Duration::from_secs(10), || con.xlen::<_, u64>("cdc-invalidator:warm").unwrap_or(0) == 1).await;
    assert!(entries, "one warm-up entry");
    let range: redis::streams::StreamRangeReply = con.xrange_all("cdc-invalidator:warm").unwrap();
    let entry = &range.ids[0];
    let field = |f: &str| entry.get::<String>(f).unwrap_or_default();
    assert_eq!(
        (field("key"), field("table"), field("op")),
        ("product:7".into(), "public.products".into(), "insert".into())
    );
    daemon.stop().await.unwrap();
    listener.abort();
}

/// The subscriber's next event, within 15 s.
async fn next(events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Event {
    let wait = tokio::time::timeout(Duration::from_secs(15), events.recv());
    wait.await.expect("an event in time").expect("the subscriber runs")
}

/// An example's binary: built beside the test binary by `cargo test` / `cargo nextest`
/// (`target/<profile>/deps/main-…` → `target/<profile>/examples/<name>`).
fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|deps| deps.parent()).unwrap().join("examples").join(name)
}

/// The reference warmer (`examples/warmer/`): reads the stream as a consumer group, refills
/// the keys it knows from PostgreSQL with a TTL, skips deletes and keys it does not build, and
/// acknowledges every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_warmer_refills_from_postgres_and_acknowledges() {
    use cdc_invalidator::sink::origins::KeyOrigin;
    use cdc_invalidator::sink::Origins;
    let pg = PgCluster::start();
    pg.sql("CREATE TABLE products (id bigint PRIMARY KEY, name text); INSERT INTO products VALUES (42, 'Widget');")
        .await;
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let bin = example_binary("warmer");
    assert!(bin.exists(), "{bin:?} missing: `cargo build --examples` first (scripts/test.sh does)");
    let mut warmer = std::process::Command::new(bin)
        .args([redis.url(), pg.url(), "--stream".into(), "warm".into(), "--consumer".into(), "w1".into()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The group starts at the end of the stream: invalidate only once it is there.
    let grouped = wait_until(Duration::from_secs(15), || {
        redis::cmd("XINFO").arg("GROUPS").arg("warm").query::<Vec<redis::Value>>(&mut con).is_ok_and(|g| g.len() == 1)
    })
    .await;
    assert!(grouped, "the warmer created its consumer group");

    let (sink, _) = sink(&with_signals(fast(RedisConfig::for_url(&redis.url())), Some(("warm", 1000))));
    let keys = ["product:42", "product:43", "other:1"];
    let mut batch = Invalidations::of(ItemKind::RedisKey, keys.iter().map(|k| k.to_string()).collect());
    let origin = |op| KeyOrigin { table: Arc::from("public.products"), op };
    let origins = [("product:42", origin("update")), ("product:43", origin("delete")), ("other:1", origin("insert"))];
    batch.set_origins(Origins {
        keys: origins.into_iter().map(|(k, o)| (k.to_string(), o)).collect(),
        ..Origins::default()
    });
    sink.invalidate(&batch, &Shutdown::never()).await.unwrap();

    let refilled = wait_until(Duration::from_secs(15), || con.exists::<_, bool>("product:42").unwrap_or(false)).await;
    assert!(refilled, "product:42 refilled from its row");
    let value: String = con.get("product:42").unwrap();
    let row: serde_json::Value = serde_json::from_str(&value).unwrap();
    assert_eq!((row["id"].as_i64(), row["name"].as_str()), (Some(42), Some("Widget")));
    let ttl: i64 = con.ttl("product:42").unwrap();
    assert!(ttl > 0, "written with a TTL: {ttl}");
    let acked = wait_until(Duration::from_secs(15), || {
        let pending: redis::Value = redis::cmd("XPENDING").arg("warm").arg("warmers").query(&mut con).unwrap();
        matches!(pending, redis::Value::Array(ref p) if p.first() == Some(&redis::Value::Int(0)))
    })
    .await;
    assert!(acked, "every entry acknowledged");
    assert!(!con.exists::<_, bool>("product:43").unwrap(), "a deleted row is not refilled");
    assert!(!con.exists::<_, bool>("other:1").unwrap(), "a key the warmer does not build is left alone");
    let _ = warmer.kill();
    let _ = warmer.wait();
}
