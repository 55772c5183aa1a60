//! Issue 15 (part A) against real Redis, standalone and a 3-primary/3-replica cluster:
//! `redis.patterns`, `redis.generations` and `redis.dependents`; a 100,000-key pattern scan
//! that does not hold the invalidations behind it (the daemon, Kafka mock cluster); `check`
//! on the new rule keys.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cdc_invalidator::config::{RedisConfig, RedisMode, Secret};
use cdc_invalidator::retry::RetryPolicy;
use cdc_invalidator::shutdown;
use cdc_invalidator::sink::redis::generation::stamp;
use cdc_invalidator::sink::redis::{PatternSink, RedisSink};
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink, SinkReport};
use cdc_invalidator::telemetry::Metrics;
use redis::ConnectionLike;

use crate::support::daemon::{binary, wait_until, write_config, Daemon, Setup};
use crate::support::events::product_insert;
use crate::support::kafka::{committed, MockKafka};
use crate::support::redis::{RedisCluster, RedisServer};

/// A Redis to test against: one server, or a cluster.
enum Target {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

impl Target {
    fn standalone() -> Target {
        Target::Standalone(RedisServer::start())
    }

    fn cluster() -> Target {
        Target::Cluster(RedisCluster::start(3))
    }

    /// Fast retries, short timeouts, small SCAN pages (so a walk takes many calls).
    fn config(&self) -> RedisConfig {
        let mut c = match self {
            Target::Standalone(server) => RedisConfig::for_url(&server.url()),
            Target::Cluster(cluster) => {
                let mut c = RedisConfig::for_url("redis://unused");
                c.url = None;
                c.resolved_url = None;
                c.mode = RedisMode::Cluster;
                c.nodes = cluster.urls().into_iter().map(Secret::new).collect();
                c
            }
        };
        c.retry =
            RetryPolicy { initial: Duration::from_millis(20), max: Duration::from_millis(250), max_attempts: None };
        c.connect_timeout = Duration::from_millis(500);
        c.response_timeout = Duration::from_millis(2000);
        c.scan_count = 100;
        c.scans_per_second = 10_000;
        c.tag_chunk = 50;
        c
    }

    /// A connection for setting up and checking, whichever the deployment.
    fn connection(&self) -> Box<dyn ConnectionLike> {
        match self {
            Target::Standalone(server) => Box::new(server.connection()),
            Target::Cluster(cluster) => Box::new(cluster.client()),
        }
    }
}

fn sinks(target: &Target) -> (RedisSink, PatternSink, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let config = target.config();
    let keys = RedisSink::new("r", &config, metrics.clone()).expect("valid config");
    let patterns = PatternSink::new("r", &config, metrics.clone()).expect("valid config");
    (keys, patterns, metrics)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// One command through either kind of connection (`redis::Commands` needs a sized one).
fn q<T: redis::FromRedisValue>(con: &mut dyn ConnectionLike, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(con).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn set_all(con: &mut dyn ConnectionLike, keys: &[String]) {
    for key in keys {
        q::<()>(con, &["SET", key, "cached"]);
    }
}

fn sadd(con: &mut dyn ConnectionLike, set: &str, members: &[&str]) {
    let mut args = vec!["SADD", set];
    args.extend_from_slice(members);
    q::<()>(con, &args);
}

fn existing(con: &mut dyn ConnectionLike, keys: &[String]) -> Vec<String> {
    keys.iter().filter(|k| q::<bool>(con, &["EXISTS", k])).cloned().collect()
}

async fn invalidate(sink: &dyn Sink, batch: &Invalidations) -> SinkReport {
    let (_trigger, shutdown) = shutdown::channel();
    sink.invalidate(batch, &shutdown).await.expect("confirmed")
}

/// Every key matching, on every primary, unlinked; nothing else; an escaped value matches
/// only itself; progress in the metrics.
async fn patterns_unlink_every_match(target: Target) {
    let mut con = target.connection();
    let matching: Vec<String> = (0..3000).map(|i| format!("product:4:page:{i}")).collect();
    let others = strings(&["product:40:page:1", "product:4", "product:4*:x", "unrelated"]);
    set_all(&mut *con, &matching);
    set_all(&mut *con, &others);
    let (_, patterns, metrics) = sinks(&target);

    let report = invalidate(&patterns, &Invalidations::of(ItemKind::RedisPattern, strings(&["product:4:*"]))).await;
    assert_eq!(report.confirmed, vec![(ItemKind::RedisPattern, 1)]);
    assert!(existing(&mut *con, &matching).is_empty(), "every match is unlinked");
    assert_eq!(existing(&mut *con, &others), others, "nothing else is");
    let label = [("sink", "r:patterns")];
    assert_eq!(metrics.value("cdc_invalidator_redis_pattern_keys_unlinked_total", &label), 3000.0);
    assert_eq!(metrics.value("cdc_invalidator_redis_pattern_keys_matched_total", &label), 3000.0);
    // 3000 matches among ~3000 keys, 100 per call: many calls, on every primary.
    assert!(metrics.value("cdc_invalidator_redis_scan_calls_total", &label) >= 30.0);
    assert_eq!(metrics.value("cdc_invalidator_redis_pattern_scans_in_flight", &label), 0.0);

    // What the rules make of `product:{id}:*` with id "4*": the value matches only itself.
    invalidate(&patterns, &Invalidations::of(ItemKind::RedisPattern, strings(&["product:4\\*:*"]))).await;
    assert_eq!(existing(&mut *con, &others), strings(&["product:40:page:1", "product:4", "unrelated"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_patterns_unlink_every_match() {
    patterns_unlink_every_match(Target::standalone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_patterns_unlink_every_match_on_every_primary() {
    patterns_unlink_every_match(Target::cluster()).await;
}

fn generations(items: &[&str], position: Option<u64>) -> Invalidations {
    let mut set = Invalidations::of(ItemKind::RedisGeneration, strings(items));
    stamp(&mut set, position);
    set
}

/// Set to the position when higher; redelivered and older events change nothing, also above
/// 2^53 where a Lua number would round; the highest of a batch wins; a key that is not a
/// generation is rejected and left alone.
async fn generations_only_move_forward(target: Target) {
    let mut con = target.connection();
    let (sink, _, metrics) = sinks(&target);
    let keys = ["gen:product:1", "gen:product:2"];
    invalidate(&sink, &generations(&keys, Some(100))).await;
    let read = |con: &mut dyn ConnectionLike, key: &str| -> String { q(con, &["GET", key]) };
    assert_eq!(read(&mut *con, "gen:product:1"), "100");
    assert_eq!(read(&mut *con, "gen:product:2"), "100");

    // Redelivery, then an older event: nothing moves back.
    invalidate(&sink, &generations(&keys, Some(100))).await;
    let report = invalidate(&sink, &generations(&keys, Some(99))).await;
    assert_eq!(report.confirmed, vec![(ItemKind::RedisGeneration, 2)]);
    assert_eq!(read(&mut *con, "gen:product:1"), "100");
    let kept = [("sink", "r"), ("outcome", "kept")];
    assert_eq!(metrics.value("cdc_invalidator_redis_generations_total", &kept), 4.0);

    // Coalesced: two events of one batch, the higher position wins.
    let batch = Invalidations::union([
        &generations(&["gen:product:1"], Some(300)),
        &generations(&["gen:product:1"], Some(200)),
    ]);
    invalidate(&sink, &batch).await;
    assert_eq!(read(&mut *con, "gen:product:1"), "300");

    // Beyond 2^53: 2^53 + 1 moves on from 2^53, which a double cannot tell apart, and 2^53
    // then does not move it back.
    invalidate(&sink, &generations(&["gen:big"], Some(9_007_199_254_740_992))).await;
    invalidate(&sink, &generations(&["gen:big"], Some(9_007_199_254_740_993))).await;
    assert_eq!(read(&mut *con, "gen:big"), "9007199254740993");
    invalidate(&sink, &generations(&["gen:big"], Some(9_007_199_254_740_992))).await;
    assert_eq!(read(&mut *con, "gen:big"), "9007199254740993");
    invalidate(&sink, &generations(&["gen:big"], Some(u64::MAX))).await;
    assert_eq!(read(&mut *con, "gen:big"), u64::MAX.to_string());

    // Not generations: left alone, rejected with the reason; the others still advance.
    q::<()>(&mut *con, &["HSET", "gen:hash", "f", "v"]);
    q::<()>(&mut *con, &["SET", "gen:text", "v17"]);
    let mut batch = generations(&["gen:hash", "gen:text", "gen:product:2"], Some(500));
    batch.items_mut(ItemKind::RedisGeneration).push("gen:unstamped".into());
    let report = invalidate(&sink, &batch).await;
    assert_eq!(report.confirmed, vec![(ItemKind::RedisGeneration, 1)]);
    let reasons: Vec<String> = report.rejected.iter().map(|r| r.reason.clone()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("\"gen:hash\" holds a hash")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("\"gen:text\" holds a string that is not a decimal number")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("no source position")), "{reasons:?}");
    assert_eq!(read(&mut *con, "gen:text"), "v17");
    assert_eq!(read(&mut *con, "gen:product:2"), "500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_generations_only_move_forward_under_redelivery() {
    generations_only_move_forward(Target::standalone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_generations_only_move_forward_under_redelivery() {
    generations_only_move_forward(Target::cluster()).await;
}

/// A batch of many generations, most in one slot: several keys a script call, several calls a
/// round trip, two round trips (standalone); each key answered for in order: advanced, kept
/// where it held a higher position, rejected where it holds a hash.
async fn many_generations_are_each_answered(target: &Target) {
    let mut con = target.connection();
    let (sink, _, metrics) = sinks(target);
    let mut keys: Vec<String> = (0..1100).map(|i| format!("gen:{{many}}:{i}")).collect();
    keys.extend((0..20).map(|i| format!("gen:other:{i}")));
    let (mut hashes, mut kept) = (Vec::new(), Vec::new());
    for (i, key) in keys.iter().enumerate().take(1100) {
        if i % 50 == 1 {
            q::<()>(&mut *con, &["HSET", key, "f", "v"]);
            hashes.push(key.clone());
        } else if i % 7 == 0 {
            q::<()>(&mut *con, &["SET", key, "2000"]);
            kept.push(key.clone());
        }
    }
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let batch = generations(&refs, Some(1000));

    let report = invalidate(&sink, &batch).await;

    let total = keys.len() - hashes.len();
    assert_eq!(report.confirmed, vec![(ItemKind::RedisGeneration, total as u64)]);
    let items = batch.items(ItemKind::RedisGeneration);
    let mut rejected: Vec<String> =
        report.rejected.iter().map(|r| items[r.index].split('\u{1f}').next().unwrap_or_default().to_string()).collect();
    rejected.sort();
    hashes.sort();
    assert_eq!(rejected, hashes, "the keys holding a hash, and they alone");
    assert!(report.rejected.iter().all(|r| r.reason.contains("holds a hash")), "{:?}", report.rejected[0]);
    let counted =
        |outcome| metrics.value("cdc_invalidator_redis_generations_total", &[("sink", "r"), ("outcome", outcome)]);
    assert_eq!(counted("kept"), kept.len() as f64);
    assert_eq!(counted("advanced"), (total - kept.len()) as f64);
    for key in &keys {
        let held: String = match q::<String>(&mut *con, &["TYPE", key]).as_str() {
            "hash" => continue,
            _ => q(&mut *con, &["GET", key]),
        };
        let expected = if kept.contains(key) { "2000" } else { "1000" };
        assert_eq!(held, expected, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_generations_take_many_keys_a_call() {
    let target = Target::standalone();
    let Target::Standalone(server) = &target else { unreachable!() };
    q::<()>(&mut server.connection(), &["CONFIG", "RESETSTAT"]);
    many_generations_are_each_answered(&target).await;
    // 1120 keys: 1024 in the first round trip (4 calls of 256), 96 in the second.
    assert_eq!(server.command_calls("evalsha"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_generations_take_many_keys_a_call() {
    many_generations_are_each_answered(&Target::cluster()).await;
}

/// A → {B, C}, B → {D, A} (a cycle), C → {D}, D → {E}, E → {F}: with depth 3 from A, B C D E
/// go (each once, the cycle ends at A), F stays (the bound), and so does `dep:E`, F's
/// registration. From a tag's members and a pattern's matches too; a `dep:` key that is not
/// a set rejects its root and the rest goes on.
async fn dependents_cascade(target: Target) {
    let mut con = target.connection();
    let chain = strings(&["A", "B", "C", "D", "E", "F", "M", "N", "p:1", "Q", "X", "Y"]);
    set_all(&mut *con, &chain);
    for (set, members) in [
        ("dep:A", &["B", "C"][..]),
        ("dep:B", &["D", "A"]),
        ("dep:C", &["D"]),
        ("dep:D", &["E"]),
        ("dep:E", &["F"]),
        ("tag:t", &["M"]),
        ("dep:M", &["N"]),
        ("dep:p:1", &["Q"]),
        ("dep:Y", &["Y-never"]),
    ] {
        sadd(&mut *con, set, members);
    }
    q::<()>(&mut *con, &["SET", "dep:X", "not a set"]);
    let (sink, patterns, metrics) = sinks(&target);

    let batch = Invalidations::of(ItemKind::RedisKey, strings(&["A", "X"]))
        .with(ItemKind::RedisTag, strings(&["t"]))
        .with(ItemKind::RedisPattern, strings(&["p:*"]))
        .with(ItemKind::RedisDependents, strings(&["key:A", "key:X", "pattern:p:*", "tag:t"]));
    let report = invalidate(&sink, &batch).await;
    assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
    assert_eq!((report.rejected[0].kind, report.rejected[0].index), (ItemKind::RedisDependents, 1));
    assert!(report.rejected[0].reason.contains("\"dep:X\" holds a string"), "{}", report.rejected[0].reason);
    assert!(report.confirmed.contains(&(ItemKind::RedisDependents, 2)), "{:?}", report.confirmed);
    let report = invalidate(&patterns, &batch).await;
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert!(report.confirmed.contains(&(ItemKind::RedisDependents, 1)), "{:?}", report.confirmed);

    assert_eq!(
        existing(&mut *con, &chain),
        strings(&["F", "Y"]),
        "the chain to depth 3, the tag's and the match's dependents"
    );
    let sets = strings(&["dep:A", "dep:B", "dep:C", "dep:D", "dep:E", "dep:M", "dep:p:1", "dep:X", "dep:Y"]);
    assert_eq!(existing(&mut *con, &sets), strings(&["dep:E", "dep:X", "dep:Y"]), "emptied sets are gone");
    let x: String = q(&mut *con, &["GET", "dep:X"]);
    assert_eq!(x, "not a set");
    // B, C, D, E (A's chain; A again through the cycle), N, Q.
    let unlinked = metrics.value("cdc_invalidator_redis_dependents_unlinked_total", &[("sink", "r")])
        + metrics.value("cdc_invalidator_redis_dependents_unlinked_total", &[("sink", "r:patterns")]);
    assert!((7.0..=8.0).contains(&unlinked), "{unlinked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_dependency_chain_with_a_cycle() {
    dependents_cascade(Target::standalone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_dependency_chain_with_a_cycle() {
    dependents_cascade(Target::cluster()).await;
}

const TOPIC: &str = "shop.public.products";

const PATTERN_RULES: &str = r#"version: 1
rules:
  - name: product-pages
    table: public.products
    redis:
      keys: ["product:{id}"]
      patterns: ["bulk:{category_id}:*"]
"#;

/// Keys matching `pattern` on the server, or on every primary of the cluster.
fn count(target: &Target, pattern: &str) -> usize {
    let ports = match target {
        Target::Standalone(server) => vec![server.port()],
        Target::Cluster(cluster) => cluster.masters(),
    };
    let mut n = 0;
    for port in ports {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(5000)
                .query(&mut con)
                .unwrap();
            n += keys.len();
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    n
}

/// The daemon with 100,000 keys under one pattern, walked at 20 SCAN calls of 1,000 a second
/// (about five seconds): a plain key invalidated after the walk started is gone while the walk
/// still runs, and the offsets are not committed past the pattern's event until its walk is
/// done.
async fn a_big_pattern_scan_does_not_hold_plain_keys(target: Target) {
    let keys: Vec<String> = (0..100_000).map(|i| format!("bulk:5:{i}")).collect();
    match &target {
        Target::Standalone(server) => {
            let mut con = server.connection();
            for chunk in keys.chunks(10_000) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.set(key, "cached").ignore();
                }
                let _: () = pipe.query(&mut con).unwrap();
            }
        }
        Target::Cluster(cluster) => {
            let mut con = cluster.client();
            for chunk in keys.chunks(10_000) {
                let mut pipe = redis::cluster::cluster_pipe();
                for key in chunk {
                    pipe.set(key, "cached").ignore();
                }
                let _: () = pipe.query(&mut con).unwrap();
            }
        }
    }
    assert_eq!(count(&target, "bulk:5:*"), 100_000);
    let mut con = target.connection();
    set_all(&mut *con, &strings(&["product:1", "product:2"]));

    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = kafka.bootstrap();
    let url = match &target {
        Target::Standalone(server) => server.url(),
        Target::Cluster(_) => "redis://replaced".to_string(),
    };
    let setup =
        Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "g", redis_url: &url, extra: "", librdkafka: &[] };
    let (path, port) = write_config(dir.path(), &setup);
    std::fs::write(dir.path().join("rules.yaml"), PATTERN_RULES).unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap().replace(
        "    retry: { initial: 20ms, max: 250ms }\n",
        "    retry: { initial: 20ms, max: 250ms }\n    scan_count: 1000\n    scans_per_second: 20\n",
    );
    if let Target::Cluster(cluster) = &target {
        let nodes = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
        text = text.replace("    url: \"redis://replaced\"\n", &format!("    mode: cluster\n    nodes: [{nodes}]\n"));
    }
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::from_config(dir.path(), &path, port);

    kafka.produce(TOPIC, None, Some("{\"id\":1}"), Some(&product_insert(1, 5))).await;
    let started = wait_until(Duration::from_secs(30), || count(&target, "bulk:5:*") < 100_000).await;
    assert!(started, "the walk unlinks as it goes");
    kafka.produce(TOPIC, None, Some("{\"id\":2}"), Some(&product_insert(2, 9))).await;
    let plain_gone = wait_until(Duration::from_secs(20), || !q::<bool>(&mut *con, &["EXISTS", "product:2"])).await;
    let left = count(&target, "bulk:5:*");
    assert!(plain_gone, "the plain key behind the pattern is invalidated");
    assert!(left > 0, "... while the walk is still running (it had {left} keys left)");
    let offsets = committed(&bootstrap, "g", TOPIC, 1).await;
    assert!(offsets[0] <= 0, "nothing is acknowledged past the pattern's event before its walk is done: {offsets:?}");

    let done = wait_until(Duration::from_secs(90), || count(&target, "bulk:5:*") == 0).await;
    assert!(done, "the walk finishes");
    let acked = wait_until(Duration::from_secs(30), || {
        futures::executor::block_on(committed(&bootstrap, "g", TOPIC, 1)).first() == Some(&2)
    })
    .await;
    assert!(acked, "both events are acknowledged once the walks are done");
    let label = [("sink", "redis:patterns")];
    assert_eq!(daemon.metrics.value("cdc_invalidator_redis_pattern_keys_unlinked_total", &label), 100_000.0);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_key_pattern_scan_does_not_hold_plain_keys() {
    a_big_pattern_scan_does_not_hold_plain_keys(Target::standalone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_100k_key_pattern_scan_does_not_hold_plain_keys() {
    a_big_pattern_scan_does_not_hold_plain_keys(Target::cluster()).await;
}

/// `check`: a pattern that matches every key is refused with its place; allowed, it is
/// reported and the file passes.
#[test]
fn check_refuses_a_full_scan_and_reports_one_that_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9092\"\n    topics: [\"t\"]\nsinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\n",
    )
    .unwrap();
    let rules = "version: 1\nrules:\n  - name: all\n    table: public.t\n    redis:\n      patterns: [\"*\"]\n";
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    let out = Command::new(binary()).args(["check", "-c"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rules.yaml:6:18:") && err.contains("allow_full_scan: true"), "{err}");

    std::fs::write(dir.path().join("rules.yaml"), format!("{rules}      allow_full_scan: true\n")).unwrap();
    let out = Command::new(binary()).args(["check", "-c"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("notice: ") && err.contains("rules.yaml:7:24:") && err.contains("whole keyspace"), "{err}");
}

/// `purge --pattern ... --dependents`: the operator's way to the same walk and cascade.
#[test]
fn purge_takes_patterns_and_their_dependents() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    set_all(&mut con, &strings(&["page:1:a", "page:1:b", "page:2:a", "home"]));
    q::<()>(&mut con, &["SADD", "dep:page:1:a", "home"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), PATTERN_RULES).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:1\"\n    topics: [\"t\"]\nsinks:\n  redis:\n    url: \"{}\"\nlog:\n  level: warn\n",
            redis.url()
        ),
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["purge", "-c"])
        .arg(&config)
        .args(["--pattern", "page:1:*", "--dependents"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON summary");
    assert_eq!(summary["requested"]["redis_patterns"], serde_json::json!(["page:1:*"]));
    assert_eq!(summary["requested"]["redis_dependents"], serde_json::json!(["pattern:page:1:*"]));
    let patterns = summary["sinks"].as_array().unwrap().iter().find(|s| s["sink"] == "redis:patterns").cloned();
    assert_eq!(patterns.map(|s| s["confirmed"]["pattern"].clone()), Some(serde_json::json!(1)), "{summary}");
    let all = strings(&["page:1:a", "page:1:b", "page:2:a", "home", "dep:page:1:a"]);
    assert_eq!(existing(&mut con, &all), strings(&["page:2:a"]));
}

// ---- Telling applications about patterns and dependents (issue 15, part C) ----

use cdc_invalidator::sink::origins::KeyOrigin;
use cdc_invalidator::sink::redis::broadcast::BroadcastConfig;
use cdc_invalidator::sink::redis::warm::WarmConfig;
use cdc_invalidator::sink::Origins;

use crate::redis_signals::subscriber::{self, Event, LocalCache};

const CHANNEL: &str = "cdc-invalidator";
const STREAM: &str = "cdc-invalidator:warm";

/// The target's config with the broadcast and the warm-up stream on, and a slow SCAN pace (50
/// calls a second of 100 keys): a walk takes many calls and a noticeable time.
fn signalling(target: &Target) -> RedisConfig {
    let mut c = target.config();
    c.broadcast = Some(BroadcastConfig { channel: CHANNEL.into() });
    c.warm = Some(WarmConfig { stream: STREAM.into(), maxlen: 10_000 });
    c.scans_per_second = 50;
    c
}

/// The reference subscriber on `target`, its local cache holding `cached`; returns once it is
/// subscribed.
async fn subscribed(
    target: &Target,
    cached: &[String],
) -> (Arc<LocalCache>, tokio::sync::mpsc::UnboundedReceiver<Event>, tokio::task::JoinHandle<redis::RedisResult<()>>) {
    let cache = Arc::new(LocalCache::new(100_000));
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let at = match target {
        Target::Standalone(server) => subscriber::Target::Standalone(server.url()),
        Target::Cluster(cluster) => subscriber::Target::Cluster(cluster.urls()),
    };
    let task = tokio::spawn(subscriber::run(at, CHANNEL.into(), cache.clone(), Some(tx)));
    let first = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("subscribed");
    assert_eq!(first, Some(Event::Subscribed));
    for key in cached {
        cache.put(key, "cached", &[], cache.ticket());
    }
    (cache, events, task)
}

/// The next message, and how many keys matching `pattern` plus of `keys` existed the moment it
/// arrived.
async fn on_receipt(
    target: &Target,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    pattern: &str,
    keys: &[String],
) -> (subscriber::Invalidation, usize, usize) {
    let got = tokio::time::timeout(Duration::from_secs(30), events.recv()).await.expect("a message");
    let (matching, named) = tokio::task::block_in_place(|| {
        let mut con = target.connection();
        (count(target, pattern), existing(&mut *con, keys).len())
    });
    let Some(Event::Message { message, dropped }) = got else { panic!("a message, got {got:?}") };
    (message, dropped, matching + named)
}

/// `(key, table, op)` of every entry of the warm-up stream, oldest first.
fn warm_entries(con: &mut dyn ConnectionLike) -> Vec<(String, String, String)> {
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(STREAM).arg("-").arg("+").query(con).expect("XRANGE");
    let field = |id: &redis::streams::StreamId, f: &str| id.get::<String>(f).unwrap_or_default();
    reply.ids.iter().map(|id| (field(id, "key"), field(id, "table"), field(id, "op"))).collect()
}

fn origin(op: &'static str) -> KeyOrigin {
    KeyOrigin { table: Arc::from("public.products"), op }
}

/// The pattern sink's own message: after every match (on every primary) and every dependent of
/// a match is gone, never before; `patterns` names the pattern, `keys` the dependents its
/// cascade unlinked, with the batch's position. The dependents go to the warm-up stream with
/// the table and op of the pattern's event; the matches themselves do not (a pattern names no
/// key to refill).
async fn the_pattern_message_comes_after_the_walk(target: Target) {
    let mut con = target.connection();
    let matches: Vec<String> = (0..600).map(|i| format!("bulk:7:{i}")).collect();
    set_all(&mut *con, &matches);
    set_all(&mut *con, &strings(&["home:7", "other:1"]));
    sadd(&mut *con, "dep:bulk:7:3", &["home:7"]);
    let metrics = Arc::new(Metrics::new());
    let patterns = PatternSink::new("r", &signalling(&target), metrics.clone()).expect("valid config");
    assert!(patterns.wants_origins(), "the position and the roots' origins are needed");
    let mut cached = matches.clone();
    cached.extend(strings(&["home:7", "other:1"]));
    let (cache, mut events, subscription) = subscribed(&target, &cached).await;

    let mut batch = Invalidations::of(ItemKind::RedisPattern, strings(&["bulk:7:*"]))
        .with(ItemKind::RedisDependents, strings(&["pattern:bulk:7:*"]));
    let mut origins = Origins { position: Some(24023400), ..Origins::default() };
    origins.roots.insert("pattern:bulk:7:*".into(), origin("update"));
    batch.set_origins(origins);
    let walking = tokio::spawn(async move {
        let report = invalidate(&patterns, &batch).await;
        (report, patterns)
    });
    let (message, dropped, there) = on_receipt(&target, &mut events, "bulk:7:*", &strings(&["home:7"])).await;
    assert_eq!(there, 0, "the pattern's message arrived while a match or a dependent still existed");
    let (report, _patterns) = walking.await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(message.patterns, ["bulk:7:*"]);
    assert_eq!(message.keys, ["home:7"], "the cascade's dependents");
    assert!(message.tags.is_empty());
    assert_eq!(message.position.as_deref(), Some("24023400"));
    assert_eq!(dropped, 601, "every local entry matching the pattern, and the dependent");
    assert_eq!(cache.len(), 1, "other:1 stays cached");
    assert_eq!(metrics.value("cdc_invalidator_redis_broadcast_messages_total", &[("sink", "r:patterns")]), 1.0);
    assert_eq!(warm_entries(&mut *con), [("home:7".to_string(), "public.products".to_string(), "update".to_string())]);
    subscription.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_the_pattern_message_comes_after_the_walk() {
    the_pattern_message_comes_after_the_walk(Target::standalone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_the_pattern_message_comes_after_the_walk() {
    the_pattern_message_comes_after_the_walk(Target::cluster()).await;
}

/// The key sink's message lists, with the batch's keys, every dependent its cascade unlinked
/// (from a key and from a tag's member, through a cycle, each once), sent after the whole
/// cascade; the warm-up stream gets the keys with their own origin, then the dependents with
/// their root's. A dependency set that is not a set still rejects its root only.
async fn dependents_are_announced_and_warmed(target: Target) {
    let mut con = target.connection();
    let all = strings(&["A", "B", "C", "M", "N", "X"]);
    set_all(&mut *con, &all);
    for (set, members) in [("dep:A", &["B"][..]), ("dep:B", &["C", "A"]), ("tag:t", &["M"]), ("dep:M", &["N"])] {
        sadd(&mut *con, set, members);
    }
    q::<()>(&mut *con, &["SET", "dep:X", "not a set"]);
    let metrics = Arc::new(Metrics::new());
    let sink = RedisSink::new("r", &signalling(&target), metrics.clone()).expect("valid config");
    let (cache, mut events, subscription) = subscribed(&target, &all).await;

    let mut batch = Invalidations::of(ItemKind::RedisKey, strings(&["A", "X"]))
        .with(ItemKind::RedisTag, strings(&["t"]))
        .with(ItemKind::RedisDependents, strings(&["key:A", "key:X", "tag:t"]));
    let mut origins = Origins { position: Some(7), ..Origins::default() };
    origins.keys.insert("A".into(), origin("update"));
    origins.keys.insert("X".into(), origin("insert"));
    origins.roots.insert("key:A".into(), origin("update"));
    origins.roots.insert("tag:t".into(), KeyOrigin { table: Arc::from("public.categories"), op: "delete" });
    batch.set_origins(origins);
    let invalidating = tokio::spawn(async move { (invalidate(&sink, &batch).await, sink) });
    let (message, dropped, there) = on_receipt(&target, &mut events, "no-such-key:*", &all).await;
    assert_eq!(there, 0, "the message arrived before the cascade's deletes");
    let (report, _sink) = invalidating.await.unwrap();
    assert_eq!(report.rejected.iter().map(|r| (r.kind, r.index)).collect::<Vec<_>>(), [(ItemKind::RedisDependents, 1)]);
    assert_eq!(message.keys, strings(&["A", "B", "C", "N", "X"]), "the keys and the dependents, once each");
    assert_eq!(message.tags, ["t"]);
    assert!(message.patterns.is_empty(), "patterns are the pattern sink's to announce");
    assert_eq!(dropped, 5, "M is the tag's member: the tag names it, not the keys");
    assert_eq!(cache.len(), 1, "M stays in a cache that did not register it under t");
    let mut warmed = warm_entries(&mut *con);
    let own: Vec<_> = warmed.drain(..2).collect();
    assert_eq!(
        own.iter().map(|e| (e.0.as_str(), e.2.as_str())).collect::<Vec<_>>(),
        [("A", "update"), ("X", "insert")]
    );
    warmed.sort();
    let entry = |k: &str, t: &str, o: &str| (k.to_string(), t.to_string(), o.to_string());
    assert_eq!(
        warmed,
        [
            entry("B", "public.products", "update"),
            entry("C", "public.products", "update"),
            entry("N", "public.categories", "delete")
        ],
        "each dependent with its root's table and op"
    );
    subscription.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_dependents_are_announced_and_warmed() {
    dependents_are_announced_and_warmed(Target::standalone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_dependents_are_announced_and_warmed() {
    dependents_are_announced_and_warmed(Target::cluster()).await;
}

/// A walk whose matches have more dependents than a message lists: they are told while the walk
/// goes on (each message after its keys are gone), at most 10,000 keys a message, every one
/// once, and the message naming the pattern comes last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_walk_tells_its_dependents_in_bounded_messages() {
    let target = Target::standalone();
    let Target::Standalone(server) = &target else { unreachable!() };
    let mut con = server.connection();
    let n = 12_000;
    let mut setup = redis::pipe();
    for i in 0..n {
        setup.set(format!("m:{i}"), "cached").ignore();
        setup.set(format!("d:{i}"), "cached").ignore();
        setup.sadd(format!("dep:m:{i}"), format!("d:{i}")).ignore();
    }
    let () = setup.query(&mut con).unwrap();
    let mut config = signalling(&target);
    config.warm = None;
    config.scans_per_second = 10_000;
    config.scan_count = 1000;
    let patterns = PatternSink::new("r", &config, Arc::new(Metrics::new())).expect("valid config");
    let (_cache, mut events, subscription) = subscribed(&target, &[]).await;
    let batch = Invalidations::of(ItemKind::RedisPattern, strings(&["m:*"]))
        .with(ItemKind::RedisDependents, strings(&["pattern:m:*"]));
    let walking = tokio::spawn(async move { invalidate(&patterns, &batch).await });
    let mut told = Vec::new();
    loop {
        let (message, _, _) = on_receipt(&target, &mut events, "no-such-key:*", &[]).await;
        assert!(message.keys.len() <= 10_000, "{} keys in one message", message.keys.len());
        let there = tokio::task::block_in_place(|| {
            let mut con = target.connection();
            existing(&mut *con, &message.keys).len()
        });
        assert_eq!(there, 0, "a message named dependents still there");
        told.extend(message.keys);
        if !message.patterns.is_empty() {
            assert_eq!(message.patterns, ["m:*"]);
            break;
        }
        assert!(message.patterns.is_empty());
    }
    assert!(walking.await.unwrap().rejected.is_empty());
    told.sort();
    let mut expected: Vec<String> = (0..n).map(|i| format!("d:{i}")).collect();
    expected.sort();
    assert_eq!(told.len(), n, "each dependent once");
    assert_eq!(told, expected);
    assert_eq!(count(&target, "m:*") + count(&target, "d:*"), 0);
    subscription.abort();
}

/// Through the daemon (standalone): a rule with keys, a pattern and dependents. The key sink's
/// message names the key and its dependent, the pattern sink's the pattern and its match's
/// dependent, both with the event's position, each after what it names is gone; the warm-up
/// stream gets the key and both dependents with the event's table and op, not the matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_daemon_patterns_and_dependents_are_told() {
    let target = Target::standalone();
    let Target::Standalone(server) = &target else { unreachable!() };
    let mut con = target.connection();
    let matches: Vec<String> = (0..300).map(|i| format!("bulk:5:{i}")).collect();
    set_all(&mut *con, &matches);
    set_all(&mut *con, &strings(&["product:1", "home:1", "sitemap:5"]));
    sadd(&mut *con, "dep:product:1", &["home:1"]);
    sadd(&mut *con, "dep:bulk:5:17", &["sitemap:5"]);
    let (_cache, mut events, subscription) = subscribed(&target, &[]).await;

    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = kafka.bootstrap();
    let url = server.url();
    let setup =
        Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "g", redis_url: &url, extra: "", librdkafka: &[] };
    let (path, port) = write_config(dir.path(), &setup);
    let rules = PATTERN_RULES.replace("      patterns:", "      dependents: true\n      patterns:");
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "    retry: { initial: 20ms, max: 250ms }\n",
        "    retry: { initial: 20ms, max: 250ms }\n    scan_count: 50\n    scans_per_second: 50\n    broadcast: { channel: cdc-invalidator }\n    warm: { stream: \"cdc-invalidator:warm\", maxlen: 1000 }\n",
    );
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::from_config(dir.path(), &path, port);
    kafka.produce(TOPIC, None, Some("{\"id\":1}"), Some(&product_insert(1, 5))).await;

    let mut by_sink = Vec::new();
    for _ in 0..2 {
        let named = strings(&["product:1", "home:1", "sitemap:5"]);
        let (message, _, there) = on_receipt(&target, &mut events, "bulk:5:*", &named).await;
        if message.patterns.is_empty() {
            let named_there = tokio::task::block_in_place(|| {
                let mut con = target.connection();
                existing(&mut *con, &message.keys).len()
            });
            assert_eq!(named_there, 0, "the key sink's message came before its deletes");
        } else {
            assert_eq!(there, 0, "the pattern sink's message came before the walk ended");
        }
        assert_eq!(message.position.as_deref(), Some("1"), "the event's source.lsn");
        by_sink.push((message.patterns, message.keys));
    }
    by_sink.sort();
    assert_eq!(
        by_sink,
        [(vec![], strings(&["home:1", "product:1"])), (strings(&["bulk:5:*"]), strings(&["sitemap:5"]))]
    );
    let warmed = wait_until(Duration::from_secs(10), || warm_entries(&mut *con).len() >= 3).await;
    assert!(warmed, "three warm-up entries");
    let mut entries = warm_entries(&mut *con);
    entries.sort();
    let entry = |k: &str| (k.to_string(), "public.products".to_string(), "insert".to_string());
    assert_eq!(entries, [entry("home:1"), entry("product:1"), entry("sitemap:5")]);
    daemon.stop().await.unwrap();
    subscription.abort();
}

/// A warm-up stream key of another type rejects a dependent's root (once, even when its
/// cascade rejected it too), besides the keys: their events are dead-lettered, the deletes done.
#[tokio::test]
async fn a_warm_stream_of_another_type_rejects_the_roots_of_dependents() {
    let target = Target::standalone();
    let mut con = target.connection();
    set_all(&mut *con, &strings(&["A", "B", "Z", STREAM]));
    sadd(&mut *con, "dep:A", &["B"]);
    q::<()>(&mut *con, &["SET", "dep:X", "not a set"]);
    sadd(&mut *con, "tag:t", &["X", "Y"]);
    // Z is unlinked through tag:t's cascade as well: its warm-up entry rejects the same root.
    sadd(&mut *con, "dep:Y", &["Z"]);
    let sink = RedisSink::new("r", &signalling(&target), Arc::new(Metrics::new())).expect("valid config");
    let batch = Invalidations::of(ItemKind::RedisKey, strings(&["A"]))
        .with(ItemKind::RedisTag, strings(&["t"]))
        .with(ItemKind::RedisDependents, strings(&["key:A", "tag:t"]));
    let report = invalidate(&sink, &batch).await;
    let rejected: Vec<(ItemKind, usize)> = report.rejected.iter().map(|r| (r.kind, r.index)).collect();
    assert_eq!(rejected, [(ItemKind::RedisDependents, 1), (ItemKind::RedisKey, 0), (ItemKind::RedisDependents, 0)]);
    assert!(report.rejected[0].reason.contains("\"dep:X\" holds a string"), "the cascade's reason first");
    assert!(report.rejected[2].reason.contains("is not a stream"), "{}", report.rejected[2].reason);
    assert!(existing(&mut *con, &strings(&["A", "B", "X", "Z"])).is_empty(), "the deletes happened");
}
