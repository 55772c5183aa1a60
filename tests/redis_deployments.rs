//! The Redis sink against real Redis deployments: a 3-primary/3-replica Redis Cluster, a
//! Sentinel setup, a cluster node behind `mode: standalone`, and two named targets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_invalidator::config::{RedisConfig, RedisMode, Secret, SentinelConfig};
use cdc_invalidator::retry::RetryPolicy;
use cdc_invalidator::shutdown;
use cdc_invalidator::sink::redis::RedisSink;
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink, SinkError};
use cdc_invalidator::telemetry::Metrics;
use redis::Commands;

use crate::support::daemon::{wait_until, write_config, Daemon, Setup};
use crate::support::events::product_insert;
use crate::support::kafka::MockKafka;
use crate::support::redis::{RedisCluster, RedisSentinel, RedisServer, SENTINEL_MASTER};

fn fast(mut c: RedisConfig) -> RedisConfig {
    c.retry = RetryPolicy { initial: Duration::from_millis(20), max: Duration::from_millis(250), max_attempts: None };
    c.connect_timeout = Duration::from_millis(500);
    c.response_timeout = Duration::from_millis(1000);
    c
}

fn cluster_config(cluster: &RedisCluster) -> RedisConfig {
    let mut c = fast(RedisConfig::for_url("redis://unused"));
    c.resolved_url = None;
    c.url = None;
    c.mode = RedisMode::Cluster;
    c.nodes = cluster.urls().into_iter().map(Secret::new).collect();
    c.tag_chunk = 50;
    c
}

fn sink(name: &str, config: &RedisConfig) -> (Arc<RedisSink>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    (Arc::new(RedisSink::new(name, config, metrics.clone()).expect("valid config")), metrics)
}

fn batch(keys: &[String], tags: &[String]) -> Invalidations {
    Invalidations::of(ItemKind::RedisKey, keys.to_vec()).with(ItemKind::RedisTag, tags.to_vec())
}

/// Keys of `keys` that exist, asked through a cluster client.
fn existing(con: &mut redis::cluster::ClusterConnection, keys: &[String]) -> Vec<String> {
    keys.iter().filter(|k| con.exists::<_, bool>(k.as_str()).unwrap_or(true)).cloned().collect()
}

/// `cdc-invalidator <command> -c <config>`: its exit code and stderr.
fn cli(command: &str, config: &std::path::Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(crate::support::daemon::binary())
        .arg(command)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap_or_else(|e| panic!("run {command}: {e}"));
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every pending set left anywhere in the cluster.
fn pending_sets(cluster: &RedisCluster) -> Vec<String> {
    let mut found = Vec::new();
    for port in cluster.masters() {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("cdc-invalidator:pending:*").query(&mut con).unwrap();
        found.extend(keys);
    }
    found
}

/// 3 primaries with a replica each; keys and tag members on every primary; a primary killed
/// while batches are going, its replica promoted: every batch still returns Ok and nothing
/// stays cached, nothing stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_mid_stream_leaves_nothing_undeleted() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("cdc_invalidator=debug,redis=info").try_init();
    let mut cluster = RedisCluster::start(3);
    let mut con = cluster.client();
    let batches = 40;
    let keys_per_batch = 100;
    let members_per_tag = 150;
    let mut all_keys = Vec::new();
    let mut work = Vec::new();
    for b in 0..batches {
        let keys: Vec<String> = (0..keys_per_batch).map(|i| format!("product:{b}:{i}")).collect();
        let tag = format!("category:{b}");
        let members: Vec<String> = (0..members_per_tag).map(|i| format!("listing:{b}:{i}")).collect();
        for k in keys.iter().chain(&members) {
            let _: () = con.set(k, "cached").unwrap();
        }
        for m in &members {
            let _: () = con.sadd(format!("tag:{tag}"), m).unwrap();
        }
        all_keys.extend(keys.iter().cloned());
        all_keys.extend(members.iter().cloned());
        all_keys.push(format!("tag:{tag}"));
        work.push(batch(&keys, &[tag]));
    }
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let served: std::collections::HashSet<u16> = all_keys.iter().take(500).map(|k| cluster.master_of(k)).collect();
    assert_eq!(served.len(), 3, "keys are spread over every primary");
    // Let replicas catch up with the setup before one of them is promoted.
    let _: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut con).unwrap_or(0);
    cluster.wait_healthy();

    let victim = cluster.master_of("product:20:0");
    let (sink, metrics) = sink("cluster", &cluster_config(&cluster));
    let (_trigger, shutdown) = shutdown::channel();
    let runner = {
        let sink = sink.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for b in work {
                results.push(sink.invalidate(&b, &shutdown).await);
            }
            results
        })
    };
    // Kill a primary once about a quarter of the batches are through.
    let killed = wait_until(Duration::from_secs(60), || {
        metrics.value("cdc_invalidator_tag_members_unlinked_total", &[("sink", "cluster")])
            >= (members_per_tag * batches / 4) as f64
    })
    .await;
    assert!(killed, "the first batches go through");
    cluster.kill(victim);
    let started = Instant::now();
    let results = tokio::time::timeout(Duration::from_secs(120), runner).await.expect("batches finish").unwrap();
    for r in &results {
        assert!(r.is_ok(), "every batch is confirmed: {r:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(120));
    cluster.wait_healthy();
    let mut con = cluster.client();
    let left = existing(&mut con, &all_keys);
    assert!(
        left.is_empty(),
        "{} keys still cached after the failover, e.g. {:?}",
        left.len(),
        &left[..left.len().min(5)]
    );
    assert!(pending_sets(&cluster).is_empty(), "no pending set is left");
    assert!(
        metrics.value("cdc_invalidator_sink_errors_total", &[("sink", "cluster")]) > 0.0,
        "the failover was seen (and retried)"
    );
}

/// Slots not covered (a primary and its replica both down): the batch is held, retried and
/// counted, never reported done; once the nodes are back it is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_uncovered_slots_holds_the_batch() {
    let mut cluster = RedisCluster::start(3);
    let primary = cluster.master_of("product:1");
    let replicas = cluster.replicas_of(primary);
    assert_eq!(replicas.len(), 1);
    let keys: Vec<String> = (0..300).map(|i| format!("product:{i}")).collect();
    let (sink, metrics) = sink("cluster", &cluster_config(&cluster));
    let (_trigger, shutdown) = shutdown::channel();
    sink.invalidate(&batch(&keys[..1], &[]), &shutdown).await.expect("connected");
    cluster.kill(replicas[0]);
    cluster.kill(primary);
    let task = {
        let (sink, work) = (sink.clone(), batch(&keys, &[]));
        tokio::spawn(async move { sink.invalidate(&work, &shutdown).await })
    };
    let retried = wait_until(Duration::from_secs(30), || {
        metrics.value("cdc_invalidator_sink_retries_total", &[("sink", "cluster")]) >= 3.0
    })
    .await;
    assert!(retried, "the batch is retried while slots are not served");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!task.is_finished(), "nothing is reported done while slots are not served");
    cluster.restart(primary);
    cluster.restart(replicas[0]);
    let result = tokio::time::timeout(Duration::from_secs(90), task).await.expect("confirmed once back").unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// Pending sets a crashed run left (members moved out of a tag set, not yet unlinked) are
/// finished by the next start, before its first batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_start_finishes_pending_sets_left_by_a_crash() {
    let cluster = RedisCluster::start(3);
    let mut con = cluster.client();
    let members: Vec<String> = (0..300).map(|i| format!("orphan-candidate:{i}")).collect();
    for m in &members {
        let _: () = con.set(m, "cached").unwrap();
    }
    // What fanout_cluster.lua leaves between the move and the unlink.
    let pending = "cdc-invalidator:pending:{a1}:tag:category:9";
    for chunk in members.chunks(100) {
        let _: () = con.sadd(pending, chunk).unwrap();
    }
    let (sink, _metrics) = sink("cluster", &cluster_config(&cluster));
    let (_trigger, shutdown) = shutdown::channel();
    let report = sink.invalidate(&batch(&["unrelated".to_string()], &[]), &shutdown).await.expect("confirmed");
    assert!(!report.confirmed.is_empty());
    assert!(existing(&mut con, &members).is_empty(), "every pending member is unlinked");
    assert!(!con.exists::<_, bool>(pending).unwrap(), "the pending set is gone");
}

/// A tag set with members in every slot, fanned out in cluster mode (chunks of 50, so many
/// rounds), while the application keeps tagging: every member present before is unlinked, the
/// set is gone or holds only new members, nothing is left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_tag_fanout_across_slots() {
    let cluster = RedisCluster::start(3);
    let mut con = cluster.client();
    let members: Vec<String> = (0..2000).map(|i| format!("page:{i}")).collect();
    for m in &members {
        let _: () = con.set(m, "cached").unwrap();
    }
    for chunk in members.chunks(500) {
        let _: () = con.sadd("tag:everything", chunk).unwrap();
    }
    let (sink, metrics) = sink("cluster", &cluster_config(&cluster));
    let (_trigger, shutdown) = shutdown::channel();
    let report = sink.invalidate(&batch(&[], &["everything".to_string()]), &shutdown).await.expect("confirmed");
    assert_eq!(report.confirmed, vec![(cdc_invalidator::sink::ItemKind::RedisTag, 1)]);
    assert!(existing(&mut con, &members).is_empty());
    assert!(!con.exists::<_, bool>("tag:everything").unwrap());
    assert!(pending_sets(&cluster).is_empty());
    assert_eq!(metrics.value("cdc_invalidator_tag_members_unlinked_total", &[("sink", "cluster")]), 2000.0);
}

/// Issue 10 item 0: a standalone URL pointed at a cluster node. The fan-out script must not
/// take members it cannot unlink: the call fails (with a sentence naming mode: cluster) and
/// the tag set still holds every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_fanout_on_a_cluster_node_keeps_the_tag_set_whole() {
    let cluster = RedisCluster::start(3);
    let mut con = cluster.client();
    let members: Vec<String> = (0..200).map(|i| format!("listing:{i}")).collect();
    for m in &members {
        let _: () = con.set(m, "cached").unwrap();
    }
    let _: () = con.sadd("tag:category:5", &members).unwrap();
    let port = cluster.master_of("tag:category:5");
    let mut config = fast(RedisConfig::for_url(&format!("redis://127.0.0.1:{port}")));
    config.retry.max_attempts = Some(2);
    let (sink, _) = sink("redis", &config);
    let (_trigger, shutdown) = shutdown::channel();
    let err = sink.invalidate(&batch(&[], &["category:5".to_string()]), &shutdown).await.expect_err("refused");
    let SinkError::Fatal(message) = err else { panic!("a fatal error") };
    assert!(message.contains("mode: cluster"), "{message}");
    // The node refuses the UNLINK of keys in other slots before running it, and the members
    // are removed only after their UNLINK: the set is whole.
    let left: usize = con.scard("tag:category:5").unwrap();
    assert_eq!(left, members.len(), "no member was taken out of the tag set");
    // Every member either still cached and tracked, or unlinked: none orphaned.
    let tracked: Vec<String> = con.smembers("tag:category:5").unwrap();
    for m in existing(&mut con, &members) {
        assert!(tracked.contains(&m), "{m} is cached but no longer in its tag set: orphaned");
    }
}

/// Issue 10 item 0: `check` and `run` refuse a cluster node behind mode: standalone with exit 2
/// and one sentence naming the setting.
#[test]
fn check_refuses_a_cluster_behind_mode_standalone() {
    let cluster = RedisCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(
        dir.path(),
        &Setup {
            bootstrap: "127.0.0.1:9",
            topics: &["t"],
            group: "g",
            redis_url: &cluster.urls()[0],
            extra: "",
            librdkafka: &[],
        },
    );
    let (code, stderr) = cli("check", &config);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("config.yaml:"), "names the file and line: {stderr}");
    assert!(stderr.contains("set mode: cluster"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // `run` refuses it the same way, before starting anything.
    let (code, stderr) = cli("run", &config);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("set mode: cluster"), "{stderr}");

    // The same file with mode: cluster and the nodes passes.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("    url: \"{}\"\n", cluster.urls()[0]),
        &format!("    mode: cluster\n    nodes: [\"{}\"]\n", cluster.urls()[1]),
    );
    std::fs::write(&config, text).unwrap();
    let (code, stderr) = cli("check", &config);
    assert_eq!(code, Some(0), "{stderr}");
}

/// Sentinel: the primary is killed; a batch sent meanwhile is retried until the sentinels
/// promote the replica, then lands there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_follows_the_primary_through_a_failover() {
    let mut setup = RedisSentinel::start();
    let old = setup.primary_port();
    let keys: Vec<String> = (0..100).map(|i| format!("product:{i}")).collect();
    {
        let mut con = setup.connection(old);
        for k in &keys {
            let _: () = con.set(k, "cached").unwrap();
        }
        let _: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut con).unwrap();
    }
    let mut config = fast(RedisConfig::for_url("redis://unused"));
    config.url = None;
    config.resolved_url = None;
    config.mode = RedisMode::Sentinel;
    config.sentinel = Some(SentinelConfig {
        nodes: setup.sentinel_urls().into_iter().map(Secret::new).collect(),
        master: SENTINEL_MASTER.to_string(),
    });
    let (sink, _metrics) = sink("sentinel", &config);
    let (_trigger, shutdown) = shutdown::channel();
    sink.invalidate(&batch(&keys[..10], &[]), &shutdown).await.expect("before the failover");

    setup.kill_primary();
    let result =
        tokio::time::timeout(Duration::from_secs(60), sink.invalidate(&batch(&keys[10..], &[]), &shutdown)).await;
    result.expect("finished within 60 s").expect("confirmed after the failover");
    assert_eq!(setup.current_primary(), setup.replica_port(), "the replica was promoted");
    let mut con = setup.connection(setup.replica_port());
    let left: Vec<&String> = keys.iter().filter(|k| con.exists::<_, bool>(k.as_str()).unwrap()).collect();
    assert!(left.is_empty(), "keys left on the new primary: {left:?}");
}

/// `sinks.redis` as a list of two named targets, one of them down for 10 s: the other gets its
/// invalidations meanwhile, the one that was down gets all of them once back, and each target's
/// metrics carry its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_named_targets_with_one_down_for_ten_seconds() {
    let kafka = MockKafka::start(1);
    let topic = "shop.public.products";
    kafka.create_topic(topic, 1);
    let eu = RedisServer::start();
    let mut us = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = kafka.bootstrap();
    let (path, port) = write_config(
        dir.path(),
        &Setup {
            bootstrap: &bootstrap,
            topics: &[topic],
            group: "targets",
            redis_url: &eu.url(),
            extra: "",
            librdkafka: &[],
        },
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("  redis:\n    url: \"{}\"\n    retry: {{ initial: 20ms, max: 250ms }}\n", eu.url()),
        &format!(
            "  redis:\n    - name: eu\n      url: \"{}\"\n      retry: {{ initial: 20ms, max: 250ms }}\n    - name: us\n      url: \"{}\"\n      retry: {{ initial: 20ms, max: 250ms }}\n",
            eu.url(),
            us.url()
        ),
    );
    assert!(text.contains("name: us"), "{text}");
    std::fs::write(&path, text).unwrap();
    let (mut eu_con, mut us_con) = (eu.connection(), us.connection());
    for id in 0..20 {
        let _: () = eu_con.set(format!("product:{id}"), "cached").unwrap();
        let _: () = us_con.set(format!("product:{id}"), "cached").unwrap();
    }
    // The snapshot brings the cached values back when `us` restarts.
    let _: () = redis::cmd("SAVE").query(&mut us_con).unwrap();
    let daemon = Daemon::from_config(dir.path(), &path, port);

    us.stop();
    let down = Instant::now();
    kafka.produce(topic, None, Some("{\"id\":0}"), Some(&product_insert(0, 1))).await;
    let eu_done = wait_until(Duration::from_secs(9), || !eu_con.exists::<_, bool>("product:0").unwrap_or(true)).await;
    assert!(eu_done, "the target that is up is invalidated while the other is down");
    assert!(down.elapsed() < Duration::from_secs(10));
    for id in 1..20 {
        kafka.produce(topic, None, Some(&format!("{{\"id\":{id}}}")), Some(&product_insert(id, 1))).await;
    }
    // Every one of the 20 reaches the target that is up while the other is still down: the
    // targets progress independently (up to the layer's queue), and only the acks wait for `us`.
    let eu_all = wait_until(Duration::from_secs(10).saturating_sub(down.elapsed()), || {
        (0..20).all(|id| !eu_con.exists::<_, bool>(format!("product:{id}")).unwrap_or(true))
    })
    .await;
    assert!(eu_all, "the target that is up got all 20 invalidations while the other was down");
    assert!(down.elapsed() < Duration::from_secs(10), "while us was down (it restarts at 10 s)");
    let remaining = Duration::from_secs(10).saturating_sub(down.elapsed());
    tokio::time::sleep(remaining).await;
    assert!(
        daemon.metrics.value("cdc_invalidator_sink_up", &[("sink", "us")]) == 0.0,
        "the target that is down is reported down under its own name"
    );
    us.restart();
    let mut us_con = us.connection();
    let all = wait_until(Duration::from_secs(30), || {
        (0..20).all(|id| {
            !eu_con.exists::<_, bool>(format!("product:{id}")).unwrap_or(true)
                && !us_con.exists::<_, bool>(format!("product:{id}")).unwrap_or(true)
        })
    })
    .await;
    assert!(all, "both targets got every invalidation");
    for name in ["eu", "us"] {
        assert!(
            daemon.metrics.value("cdc_invalidator_invalidations_total", &[("sink", name)]) >= 20.0,
            "{name} counts its own invalidations"
        );
    }
    daemon.stop().await.expect("clean drain");
}

/// `check` warns about hash tags that put every key (or tag set) of a template in one slot of a
/// cluster target, and still exits 0; a hash tag holding a column, and tags whose keys are in
/// other slots, are not warned about; a standalone target gets no such warning.
#[test]
fn check_warns_about_constant_hash_tags_in_cluster_mode() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        "version: 1\nrules:\n  - name: products\n    table: public.products\n    redis:\n      keys: [\"{{shop}}:product:{id}\", \"product:{{{id}}}:page\", \"product:{id}\"]\n      tags: [\"category:{category_id}\"]\n",
    )
    .unwrap();
    // Nobody listens there: the start-up probe has nothing to say, only the rules are judged.
    let node = format!("redis://127.0.0.1:{}", crate::support::free_port());
    let check = |redis: &str| {
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!("rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9\"\n    topics: [\"t\"]\nsinks:\n{redis}"),
        )
        .unwrap();
        cli("check", &config)
    };
    let (code, stderr) =
        check(&format!("  redis:\n    mode: cluster\n    nodes: [\"{node}\"]\n    tag_prefix: \"{{tags}}:\"\n"));
    assert_eq!(code, Some(0), "warnings do not fail the check: {stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("\"{{shop}}:product:{id}\" has the hash tag {shop}") && w.contains("one slot")),
        "{stderr}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("tag sets of \"category:{category_id}\"") && w.contains("{tags}")),
        "{stderr}"
    );

    let (code, stderr) = check(&format!("  redis:\n    mode: cluster\n    nodes: [\"{node}\"]\n"));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("warning: ")).count(), 1, "only the key template: {stderr}");
    let (code, stderr) = check(&format!("  redis:\n    url: \"{node}\"\n    tag_prefix: \"{{tags}}:\"\n"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("warning: "), "hash slots do not matter to a standalone Redis: {stderr}");
}
