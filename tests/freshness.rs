//! `freshness.replicas` against real PostgreSQL physical standbys: the replica checks at start
//! (and `check --against-db`), and the second-pass gate following a lagging standby's replay.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cdc_invalidator::config::freshness::{FreshnessConfig, ReplicaConfig};
use cdc_invalidator::config::postgres::parse_url;
use cdc_invalidator::freshness::{system_identifier, FreshnessError, Replicas, Waited};
use cdc_invalidator::shutdown::Shutdown;
use cdc_invalidator::telemetry::Metrics;

use crate::support::kafka::MockKafka;
use crate::support::postgres::{PgCluster, CDC_PASSWORD};

fn freshness(replicas: &[(&str, &str)]) -> FreshnessConfig {
    FreshnessConfig {
        replicas: replicas
            .iter()
            .map(|(name, url)| ReplicaConfig {
                name: name.to_string(),
                url: None,
                url_env: None,
                url_file: None,
                connection: Some(parse_url(url, Path::new("config.yaml")).unwrap()),
                defined_at: None,
            })
            .collect(),
        ..FreshnessConfig::default()
    }
}

async fn start(replicas: &[(&str, &str)], source_id: Option<u64>) -> Result<Replicas, FreshnessError> {
    Replicas::start(&freshness(replicas), source_id, Arc::new(Metrics::new()), Shutdown::never()).await
}

#[tokio::test]
async fn freshness_bad_replicas_are_named_in_one_sentence_at_start() {
    let primary = PgCluster::start();
    primary.create_cdc_role().await;
    let standby = PgCluster::standby_of(&primary, "replica1", &[]).await;
    let source_id = system_identifier(&parse_url(&primary.url(), Path::new("c")).unwrap()).await;
    assert!(source_id.is_some(), "the source's system identifier is readable");

    // A good standby, over SCRAM.
    let good = standby.cdc_url(CDC_PASSWORD);
    start(&[("r1", &good)], source_id).await.expect("a standby of the source is accepted");

    // A primary is not a replica.
    let err = start(&[("r1", &primary.url())], source_id).await.err().expect("a primary is refused").to_string();
    assert!(err.contains("r1") && err.contains("is a primary, not a standby in recovery"), "{err}");

    // Wrong credentials: refused (not retried).
    let err = start(&[("r1", &standby.cdc_url("wrong"))], source_id).await.err().expect("wrong password");
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("freshness.replicas r1") && err.to_string().contains("refused"), "{err}");

    // Nothing listening.
    let port = crate::support::free_port();
    let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
    let err = start(&[("r1", &url)], source_id).await.err().expect("unreachable");
    assert!(err.to_string().contains("cannot reach PostgreSQL"), "{err}");

    // A standby of another cluster.
    let other = PgCluster::start();
    let other_standby = PgCluster::standby_of(&other, "replica2", &[]).await;
    let err = start(&[("r2", &other_standby.url())], source_id).await.err().expect("another cluster").to_string();
    assert!(err.contains("belongs to another cluster"), "{err}");
}

#[tokio::test]
async fn freshness_gate_follows_a_lagging_standbys_replay_and_reports_its_lag() {
    let primary = PgCluster::start();
    primary.sql("CREATE TABLE items (id int PRIMARY KEY, n int)").await;
    let standby = PgCluster::standby_of(&primary, "replica1", &[]).await;
    standby.sql("ALTER SYSTEM SET recovery_min_apply_delay = '1s'").await;
    standby.client().await.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let metrics = Arc::new(Metrics::new());
    let config = FreshnessConfig {
        margin: Duration::from_millis(50),
        max_wait: Duration::from_secs(20),
        ..freshness(&[("r1", &standby.url())])
    };
    let replicas = Replicas::spawn(&config, metrics.clone(), Shutdown::never());

    for n in 0..3 {
        primary.sql(&format!("INSERT INTO items VALUES ({n}, {n})")).await;
        // The end of the commit record: replayed only once the standby shows the row.
        let lsn = primary.current_lsn().await - 1;
        let since = tokio::time::Instant::now();
        let waited = replicas.wait(lsn, since, None).await;
        let elapsed = since.elapsed();
        assert_eq!(waited, Waited::Replayed, "insert {n}");
        // recovery_min_apply_delay counts from the commit: generous lower bound on a busy machine.
        assert!(
            elapsed >= Duration::from_millis(500),
            "insert {n}: released after {elapsed:?}, before the standby applied it"
        );
        let row = standby.client().await.query_opt("SELECT n FROM items WHERE id = $1", &[&n]).await.unwrap();
        assert!(row.is_some(), "insert {n}: the standby shows the row once the gate opens");
        assert!(standby.replay_lsn().await > lsn);
    }
    // Lag appears in the metrics while the standby holds WAL back.
    primary.sql("INSERT INTO items VALUES (100, 100)").await;
    let mut seen = 0.0_f64;
    for _ in 0..40 {
        seen = seen.max(metrics.value("cdc_invalidator_replica_replay_lag_seconds", &[("replica", "r1")]));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen > 0.0, "a replay lag in seconds was reported");
}

/// The refills metric rests on this: the Redis sink reports how many keys an UNLINK found.
#[tokio::test]
async fn freshness_redis_report_counts_only_the_keys_that_were_there() {
    use cdc_invalidator::config::RedisConfig;
    use cdc_invalidator::sink::redis::RedisSink;
    use cdc_invalidator::sink::{Invalidations, ItemKind, Sink};

    let server = crate::support::redis::RedisServer::start();
    let mut con = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("MSET").arg("k:1").arg("v").arg("k:3").arg("v").query(&mut con).unwrap();
    let sink = RedisSink::new("redis", &RedisConfig::for_url(&server.url()), Arc::new(Metrics::new())).unwrap();
    let keys = ["k:1", "k:2", "k:3", "k:4"].iter().map(|k| k.to_string()).collect();
    let batch = Invalidations::of(ItemKind::RedisKey, keys);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.removed, 2, "two of the four keys existed");
    let again = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(again.removed, 0, "nothing refilled, nothing removed");
}

/// Two readers of `items` (ids 0..rows, each stepping by `step`): on a cache miss, read the
/// standby and fill the cache (cache-aside), until `stop`.
async fn start_readers(
    standby: &PgCluster,
    redis_url: &str,
    rows: i32,
    step: i32,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    let mut readers = Vec::new();
    for r in 0..2 {
        let (stop, standby_client) = (stop.clone(), standby.client().await);
        let mut cache = redis::Client::open(redis_url).unwrap().get_multiplexed_async_connection().await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut id = r;
            while !stop.load(Ordering::Relaxed) {
                id = (id + step) % rows;
                let key = format!("item:{id}");
                let cached: Option<i32> = redis::cmd("GET").arg(&key).query_async(&mut cache).await.unwrap();
                if cached.is_none() {
                    let row = standby_client.query_one("SELECT v FROM items WHERE id = $1", &[&id]).await.unwrap();
                    let v: i32 = row.get(0);
                    let _: () = redis::cmd("SET").arg(&key).arg(v).query_async(&mut cache).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    readers
}

/// The freshness harness: a primary, a physical standby whose replay lags (200 ms, then 1 s
/// mid-run), readers refilling Redis from the standby on a miss (cache-aside), a writer
/// updating the primary, and the daemon on the primary's replication stream. Returns the keys
/// stale (cached value differs from the primary's) at each checkpoint: after the 200 ms phase,
/// after the 1 s phase (both once lag + margin + slack has passed), and at the end.
async fn race(with_replicas: bool) -> (Vec<usize>, Arc<Metrics>) {
    use crate::support::daemon::Daemon;
    use crate::support::postgres::{write_config, PgSetup};
    use std::sync::atomic::{AtomicBool, Ordering};

    const ROWS: i32 = 20;
    let primary = PgCluster::start();
    primary.sql("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)").await;
    primary.sql(&format!("INSERT INTO items SELECT g, 0 FROM generate_series(0, {}) g", ROWS - 1)).await;
    primary.publish("fresh_pub", "items", "fresh_slot").await;
    let standby = PgCluster::standby_of(&primary, "replica1", &["recovery_min_apply_delay = '200ms'"]).await;
    let redis = crate::support::redis::RedisServer::start();
    let redis_url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let extra = if with_replicas {
        format!(
            "freshness:\n  replicas:\n    - {{ name: replica-1, url: \"{}\" }}\n  margin: 100ms\n  max_wait: 20s\n",
            standby.url()
        )
    } else {
        String::new()
    };
    let rules = "version: 1\nrules:\n  - name: items\n    table: public.items\n    redis: { keys: [\"item:{id}\"] }\n";
    let url = primary.url();
    let (config, port) = write_config(
        dir.path(),
        &PgSetup { extra: &extra, ..PgSetup::new(&url, "fresh_slot", "fresh_pub", &redis_url, rules) },
    );
    let daemon = Daemon::from_config(dir.path(), &config, port);
    let metrics = daemon.metrics.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Readers: on a miss, read the standby and fill the cache.
    let stop = Arc::new(AtomicBool::new(false));
    let readers = start_readers(&standby, &redis_url, ROWS, 7, &stop).await;
    let writer = primary.client().await;
    let mut cache = redis::Client::open(redis_url.clone()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut stale_counts = Vec::new();
    let mut n = 0;
    for (phase, settle) in [(0, Duration::from_secs(3)), (1, Duration::from_secs(5))] {
        if phase == 1 {
            standby.sql("ALTER SYSTEM SET recovery_min_apply_delay = '1s'").await;
            standby.sql("SELECT pg_reload_conf()").await;
        }
        // 50 updates a second for 3 s.
        for _ in 0..150 {
            writer.execute("UPDATE items SET v = v + 1 WHERE id = $1", &[&(n % ROWS)]).await.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Lag + margin, and generous slack for a busy machine; readers keep refilling.
        tokio::time::sleep(settle).await;
        let mut stale = 0;
        for id in 0..ROWS {
            let v: i32 = writer.query_one("SELECT v FROM items WHERE id = $1", &[&id]).await.unwrap().get(0);
            let cached: Option<i32> =
                redis::cmd("GET").arg(format!("item:{id}")).query_async(&mut cache).await.unwrap();
            stale += usize::from(cached.is_some_and(|c| c != v));
        }
        stale_counts.push(stale);
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    daemon.stop().await.unwrap();
    (stale_counts, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_harness_with_replicas_no_key_stays_stale_while_the_lag_changes() {
    let (stale, metrics) = race(true).await;
    assert_eq!(stale, vec![0, 0], "keys stale after lag + margin (200 ms phase, 1 s phase)");
    let refills = metrics.value("cdc_invalidator_second_pass_refills_total", &[("sink", "redis")]);
    eprintln!("with freshness.replicas: stale {stale:?}, refills caught {refills}");
    assert!(refills > 0.0, "the race happened and the second pass caught it ({refills} refills)");
    assert!(metrics.value("cdc_invalidator_settled_seconds", &[("sink", "redis")]) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_harness_without_replicas_the_race_shows() {
    let (stale, _) = race(false).await;
    eprintln!("without freshness.replicas: stale keys at the checkpoints {stale:?} of 20");
    assert!(stale.iter().sum::<usize>() > 0, "stale keys without freshness.replicas: {stale:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_a_primary_listed_as_replica_stops_the_daemon_and_fails_check() {
    use crate::support::postgres::{write_config, PgSetup};

    let primary = PgCluster::start();
    primary.sql("CREATE TABLE items (id int PRIMARY KEY, v int)").await;
    primary.publish("fresh_pub", "items", "fresh_slot").await;
    let redis = crate::support::redis::RedisServer::start();
    let redis_url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let url = primary.url();
    let extra = format!("freshness:\n  replicas:\n    - {{ name: replica-1, url: \"{url}\" }}\n");
    let rules = "version: 1\nrules:\n  - name: items\n    table: public.items\n    redis: { keys: [\"item:{id}\"] }\n";
    let (config, _) = write_config(
        dir.path(),
        &PgSetup { extra: &extra, ..PgSetup::new(&url, "fresh_slot", "fresh_pub", &redis_url, rules) },
    );
    let loaded = cdc_invalidator::config::load_with_env(&config, []).unwrap();
    let rules = cdc_invalidator::rules::Rules::from_file(&loaded.rules).unwrap();
    let (_trigger, shutdown) = cdc_invalidator::shutdown::channel();
    let listen = loaded.metrics.listen;
    let run = cdc_invalidator::app::run(loaded, rules, Arc::new(Metrics::new()), shutdown);
    let err = tokio::time::timeout(Duration::from_secs(20), run).await.expect("stops by itself").expect_err("fatal");
    assert!(err.to_string().contains("replica-1") && err.to_string().contains("is a primary"), "{err}");
    // The early error released the metrics port (its server task was aborted, not left to the
    // runtime): a process embedding the daemon can start it again on the same port. The abort
    // takes effect at the task's next poll, hence the short wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpListener::bind(listen).is_err() {
        assert!(std::time::Instant::now() < deadline, "{listen} is still bound after run returned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let out = std::process::Command::new(crate::support::daemon::binary())
        .args(["check", "--against-db", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("freshness.replicas replica-1") && stderr.contains("is a primary"), "{stderr}");

    // `run`: an invalid config, exit 2, naming the entry where it is. (On its own metrics port,
    // so the subprocess cannot race anything else of this test for it.)
    let text = std::fs::read_to_string(&config).unwrap();
    let port = crate::support::free_port();
    let text: Vec<String> =
        text.lines()
            .map(|l| {
                if l.trim_start().starts_with("listen:") {
                    format!("  listen: \"127.0.0.1:{port}\"")
                } else {
                    l.into()
                }
            })
            .collect();
    std::fs::write(&config, text.join("\n")).unwrap();
    let at = format!("{}:{}:", config.display(), line_of(&config, "name: replica-1"));
    let (code, log) = run_to_exit(&config, dir.path()).await;
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains(&at.to_string()) && log.contains("freshness.replicas replica-1 (") && log.contains("is a primary"),
        "{log}"
    );
}

/// The 1-based number of the first line of `path` that contains `text`.
fn line_of(path: &Path, text: &str) -> usize {
    let config = std::fs::read_to_string(path).unwrap();
    config.lines().position(|l| l.contains(text)).expect("the config has the line") + 1
}

/// Runs the binary on `config` until it exits by itself (30 s at most): its code and output.
async fn run_to_exit(config: &Path, dir: &Path) -> (Option<i32>, String) {
    let mut daemon = crate::support::daemon::DaemonProcess::start(config, dir);
    tokio::task::spawn_blocking(move || (daemon.wait(Duration::from_secs(30)), daemon.log_text())).await.unwrap()
}

/// With a Kafka source the daemon never connects to the primary, so `check --against-db` and
/// the start compare the replicas with each other: a list mixing clusters, or naming a primary,
/// is an invalid config (exit 2) naming the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_with_a_kafka_source_the_replicas_are_checked_against_each_other() {
    use crate::support::daemon::{write_config, Setup};

    let primary = PgCluster::start();
    let standby = PgCluster::standby_of(&primary, "replica1", &[]).await;
    let other = PgCluster::start();
    let other_standby = PgCluster::standby_of(&other, "replica2", &[]).await;
    let redis = crate::support::redis::RedisServer::start();
    let redis_url = redis.url();
    let check = |replicas: &[(&str, String)]| {
        let dir = tempfile::tempdir().unwrap();
        let entries: String =
            replicas.iter().map(|(name, url)| format!("    - {{ name: {name}, url: \"{url}\" }}\n")).collect();
        let extra = format!("freshness:\n  replicas:\n{entries}");
        // The brokers are never contacted: `check` reads no topic, `run` stops before the source.
        let setup = Setup {
            bootstrap: "127.0.0.1:9",
            topics: &["t"],
            group: "g",
            redis_url: &redis_url,
            extra: &extra,
            librdkafka: &[],
        };
        let (config, _) = write_config(dir.path(), &setup);
        let out = std::process::Command::new(crate::support::daemon::binary())
            .args(["check", "--against-db", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text, config, dir)
    };

    // Two entries for standbys of one cluster (the same standby twice): fine.
    let (code, text, _, _dir) = check(&[("r1", standby.url()), ("r2", standby.url())]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ok"), "{text}");

    // Standbys of two clusters: the second is named, where it is.
    let (code, text, config, dir) = check(&[("r1", standby.url()), ("r2", other_standby.url())]);
    assert_eq!(code, Some(2), "{text}");
    let at = format!("{}:{}:", config.display(), line_of(&config, "name: r2"));
    assert!(text.contains(&at.to_string()) && text.contains("freshness.replicas r2 ("), "{text}");
    assert!(text.contains("belongs to another cluster than replica r1"), "{text}");
    assert!(!text.contains("freshness.replicas r1 ("), "r1 is fine: {text}");
    // And the daemon refuses to start on it.
    let (code, log) = run_to_exit(&config, dir.path()).await;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains(&at) && log.contains("another cluster than replica r1"), "{log}");

    // A primary listed as a replica.
    let (code, text, _, _dir) = check(&[("r1", primary.url())]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("freshness.replicas r1 (") && text.contains("is a primary, not a standby"), "{text}");
}

/// A clean drain is not a lost replica: the poller saw the end of the daemon (its shutdown
/// trigger dropped) as a failed connection and warned "read replica lost" on every SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_a_clean_sigterm_does_not_report_the_replica_lost() {
    use crate::support::daemon::{http_get, wait_until, DaemonProcess};
    use crate::support::postgres::{write_config, PgSetup};

    let primary = PgCluster::start();
    primary.sql("CREATE TABLE items (id int PRIMARY KEY, v int)").await;
    primary.publish("quiet_pub", "items", "quiet_slot").await;
    let standby = PgCluster::standby_of(&primary, "quiet_replica", &[]).await;
    let redis = crate::support::redis::RedisServer::start();
    let redis_url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let url = primary.url();
    let extra = format!("freshness:\n  replicas:\n    - {{ name: replica-1, url: \"{}\" }}\n", standby.url());
    let rules = "version: 1\nrules:\n  - name: items\n    table: public.items\n    redis: { keys: [\"item:{id}\"] }\n";
    let (config, port) = write_config(
        dir.path(),
        &PgSetup { extra: &extra, ..PgSetup::new(&url, "quiet_slot", "quiet_pub", &redis_url, rules) },
    );
    let mut daemon = DaemonProcess::start(&config, dir.path());
    let ready =
        wait_until(Duration::from_secs(30), || http_get(port, "/readyz").is_some_and(|(status, _)| status == 200))
            .await;
    assert!(ready, "daemon log:\n{}", daemon.log_text());
    // One change through both passes, so the poller has been polling for a while.
    primary.sql("INSERT INTO items VALUES (1, 1)").await;
    let settled = wait_until(Duration::from_secs(30), || {
        http_get(port, "/metrics")
            .is_some_and(|(_, body)| body.contains("cdc_invalidator_settled_seconds_count{sink=\"redis\"} 1"))
    })
    .await;
    assert!(settled, "daemon log:\n{}", daemon.log_text());

    daemon.signal("TERM");
    let (code, log) = tokio::task::spawn_blocking(move || {
        let code = daemon.wait(Duration::from_secs(30));
        (code, daemon.log_text())
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "exit 0 after a clean drain; log:\n{log}");
    assert!(!log.contains("read replica lost"), "a clean drain reported the replica lost:\n{log}");
}

/// Whether `group` commits offset `next` on partition 0 of `topic` within 10 s.
async fn wait_committed(bootstrap: &str, group: &str, topic: &str, next: i64) -> bool {
    for _ in 0..100 {
        if crate::support::kafka::committed(bootstrap, group, topic, 1).await == vec![next] {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A stand-in for Debezium's PostgreSQL connector on a real primary: reads the changes of a
/// logical slot (test_decoding: the same decoding, so the same per-change LSNs Debezium's
/// pgoutput stream carries) and writes each update as the connector's JSON change event, the
/// shape of tests/fixtures/debezium-real/pg-toast-update.json (an update under REPLICA IDENTITY
/// DEFAULT: `before` null; `source.lsn` the change's own WAL record, `source.txId`, and
/// `source.ts_ms` the commit time, all as Debezium's PostgresStreamingChangeEventSource sets
/// them from the stream). Returns the Kafka offsets written.
async fn debezium_connector_step(primary: &tokio_postgres::Client, kafka: &MockKafka, topic: &str) -> Vec<i64> {
    // Debezium's ts_ms: the commit timestamp, in whole milliseconds.
    let rows = primary
        .query(
            "SELECT pg_wal_lsn_diff(lsn, '0/0')::int8, xid::text::int8, data, \
                    floor(extract(epoch FROM pg_xact_commit_timestamp(xid)) * 1000)::int8 \
             FROM pg_logical_slot_get_changes('dbz', NULL, NULL)",
            &[],
        )
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for row in rows {
        let (lsn, tx_id, data, committed_ms): (i64, i64, String, Option<i64>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        // "table public.items: UPDATE: id[integer]:3 v[integer]:17"
        let Some(columns) = data.strip_prefix("table public.items: UPDATE: ") else { continue };
        let value = |name: &str| -> i64 {
            let prefix = format!("{name}[integer]:");
            columns.split(' ').find_map(|c| c.strip_prefix(prefix.as_str())).unwrap().parse().unwrap()
        };
        let (id, v) = (value("id"), value("v"));
        let committed_ms = committed_ms.expect("track_commit_timestamp is on");
        let event = format!(
            r#"{{"before":null,"after":{{"id":{id},"v":{v}}},"source":{{"version":"3.2.0.Final","connector":"postgresql","name":"shop","ts_ms":{committed_ms},"snapshot":"false","db":"postgres","schema":"public","table":"items","txId":{tx_id},"lsn":{lsn}}},"op":"u","ts_ms":{now}}}"#,
            now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        );
        let (_, offset) = kafka.produce(topic, Some(0), Some(&format!(r#"{{"id":{id}}}"#)), Some(&event)).await;
        offsets.push(offset);
    }
    offsets
}

/// The Debezium path end to end: a real primary whose changes reach the daemon as Debezium
/// events on Kafka (librdkafka's mock cluster), a physical standby holding commits back 500 ms
/// (`recovery_min_apply_delay`: it replays a change's own record at once and waits at the
/// commit, so `source.lsn` alone would release the second pass too early), readers refilling
/// Redis from the standby. The second pass must wait for the standby to show each change, the
/// offset must be committed only after it, and nothing may stay stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_debezium_events_on_kafka_wait_for_the_replica_and_commit_after_the_second_pass() {
    use crate::support::daemon::{wait_until, write_config, Daemon, Setup};
    use crate::support::kafka::committed;
    use std::sync::atomic::{AtomicBool, Ordering};

    const ROWS: i32 = 10;
    const TOPIC: &str = "shop.public.items";
    const GROUP: &str = "fresh-dbz";
    let primary = PgCluster::start_with(&["track_commit_timestamp = on"]);
    primary.sql("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)").await;
    primary.sql(&format!("INSERT INTO items SELECT g, 0 FROM generate_series(0, {}) g", ROWS - 1)).await;
    primary.sql("SELECT pg_create_logical_replication_slot('dbz', 'test_decoding')").await;
    let standby = PgCluster::standby_of(&primary, "replica1", &["recovery_min_apply_delay = '500ms'"]).await;
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();
    let redis = crate::support::redis::RedisServer::start();
    let redis_url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    // margin: a reader's replica read to its cache write, generously for two busy cores.
    let extra = format!(
        "freshness:\n  replicas:\n    - {{ name: replica-1, url: \"{}\" }}\n  margin: 250ms\n  max_wait: 20s\n",
        standby.url()
    );
    let (config, port) = write_config(
        dir.path(),
        &Setup {
            bootstrap: &bootstrap,
            topics: &[TOPIC],
            group: GROUP,
            redis_url: &redis_url,
            extra: &extra,
            librdkafka: &[],
        },
    );
    let rules = "version: 1\nrules:\n  - name: items\n    table: public.items\n    redis: { keys: [\"item:{id}\"] }\n";
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    let daemon = Daemon::from_config(dir.path(), &config, port);
    let metrics = daemon.metrics.clone();

    // Readers: on a miss, read the standby and fill the cache (cache-aside).
    let stop = Arc::new(AtomicBool::new(false));
    let readers = start_readers(&standby, &redis_url, ROWS, 3, &stop).await;

    // Writers on the primary; the connector forwards each commit's changes at once. First a
    // burst (the standby replays each change's record only after the previous commit's delay),
    // then isolated updates: the standby replays each one's record at once and holds its commit
    // for 500 ms, which `source.lsn` alone cannot tell from a replayed change.
    let writer = primary.client().await;
    let mut produced = Vec::new();
    let pauses = std::iter::repeat_n(30, 20).chain(std::iter::repeat_n(800, 6));
    for (n, pause) in pauses.enumerate() {
        writer.execute("UPDATE items SET v = v + 1 WHERE id = $1", &[&(n as i32 % ROWS)]).await.unwrap();
        produced.extend(debezium_connector_step(&writer, &kafka, TOPIC).await);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    assert_eq!(produced.len(), 26, "one Debezium event per update");
    let last = *produced.last().unwrap();
    let all_committed = wait_until(Duration::from_secs(30), || {
        metrics.value("cdc_invalidator_second_pass_pending_events", &[]) == 0.0
            && metrics.value("cdc_invalidator_settled_seconds", &[("sink", "redis")]) >= 26.0
    })
    .await;
    assert!(all_committed, "every event's second pass done within 30 s");
    assert!(wait_committed(&bootstrap, GROUP, TOPIC, last + 1).await, "the offsets committed after the second passes");
    let refills = metrics.value("cdc_invalidator_second_pass_refills_total", &[("sink", "redis")]);
    assert!(refills > 0.0, "readers raced the replica and the second pass caught it ({refills} refills)");

    // One more change while the standby's replay is paused: the first pass goes at once, the
    // second waits for the replica, and so does the Kafka commit.
    standby.sql("SELECT pg_wal_replay_pause()").await;
    writer.execute("UPDATE items SET v = v + 1 WHERE id = 0", &[]).await.unwrap();
    let held = debezium_connector_step(&writer, &kafka, TOPIC).await;
    assert_eq!(held.len(), 1);
    let waiting =
        wait_until(Duration::from_secs(10), || metrics.value("cdc_invalidator_second_pass_pending_events", &[]) == 1.0)
            .await;
    assert!(waiting, "the first pass went and the second waits");
    let fresh: i32 = writer.query_one("SELECT v FROM items WHERE id = 0", &[]).await.unwrap().get(0);
    let mut cache = redis::Client::open(redis_url.clone()).unwrap().get_multiplexed_async_connection().await.unwrap();
    // A reader refills the key from the paused standby: the race, with the old row.
    let mut refilled_stale = false;
    for _ in 0..100 {
        let cached: Option<i32> = redis::cmd("GET").arg("item:0").query_async(&mut cache).await.unwrap();
        if cached.is_some_and(|c| c != fresh) {
            refilled_stale = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refilled_stale, "a reader refilled item:0 with the old row from the paused standby");
    // Well past lag + margin: still held, and not committed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        metrics.value("cdc_invalidator_second_pass_pending_events", &[]),
        1.0,
        "held while the replica has not replayed"
    );
    assert_eq!(committed(&bootstrap, GROUP, TOPIC, 1).await, vec![held[0]], "not committed before the second pass");
    let refills_before = metrics.value("cdc_invalidator_second_pass_refills_total", &[("sink", "redis")]);
    standby.sql("SELECT pg_wal_replay_resume()").await;
    assert!(
        wait_committed(&bootstrap, GROUP, TOPIC, held[0] + 1).await,
        "committed once the replica replayed the change and the second pass ran"
    );
    assert!(
        metrics.value("cdc_invalidator_second_pass_refills_total", &[("sink", "redis")]) > refills_before,
        "the second pass removed the stale refill"
    );

    // Readers keep refilling for lag + margin and slack; then nothing may be stale.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let mut stale = Vec::new();
    for id in 0..ROWS {
        let v: i32 = writer.query_one("SELECT v FROM items WHERE id = $1", &[&id]).await.unwrap().get(0);
        let cached: Option<i32> = redis::cmd("GET").arg(format!("item:{id}")).query_async(&mut cache).await.unwrap();
        if cached.is_some_and(|c| c != v) {
            stale.push((id, cached, v));
        }
    }
    assert_eq!(stale, vec![], "keys stale at the end (id, cached, primary)");
    assert_eq!(metrics.value("cdc_invalidator_freshness_max_wait_total", &[]), 0.0, "the replica gated every pass");
    daemon.stop().await.unwrap();
}

/// Without a second pass the first pass is the last: settled seconds covers those events too
/// (commit to the first pass), so the settled panel and alert watch every invalidated event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_an_event_without_a_second_pass_settles_at_its_first() {
    use crate::support::daemon::{wait_until, Daemon, Setup};

    let kafka = MockKafka::start(1);
    kafka.create_topic("shop.public.products", 1);
    let bootstrap = kafka.bootstrap();
    let redis = crate::support::redis::RedisServer::start();
    let redis_url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        bootstrap: &bootstrap,
        topics: &["shop.public.products"],
        group: "settled",
        redis_url: &redis_url,
        extra: "",
        librdkafka: &[],
    };
    let daemon = Daemon::start(dir.path(), &setup);
    let metrics = daemon.metrics.clone();
    let event = crate::support::events::product_insert(42, 7);
    kafka.produce("shop.public.products", Some(0), Some(r#"{"id":42}"#), Some(&event)).await;
    let settled = wait_until(Duration::from_secs(30), || {
        metrics.value("cdc_invalidator_settled_seconds", &[("sink", "redis")]) == 1.0
    })
    .await;
    assert!(settled, "one settled observation for the one event");
    assert_eq!(metrics.value("cdc_invalidator_staleness_seconds", &[("sink", "redis")]), 1.0);
    assert_eq!(metrics.value("cdc_invalidator_second_pass_refills_total", &[]), 0.0);
    daemon.stop().await.unwrap();
}
