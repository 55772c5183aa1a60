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
    let mut readers = Vec::new();
    for r in 0..2 {
        let (stop, standby_client) = (stop.clone(), standby.client().await);
        let mut cache =
            redis::Client::open(redis_url.clone()).unwrap().get_multiplexed_async_connection().await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut id = r;
            while !stop.load(Ordering::Relaxed) {
                id = (id + 7) % ROWS;
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
    let run = cdc_invalidator::app::run(loaded, rules, Arc::new(Metrics::new()), shutdown);
    let err = tokio::time::timeout(Duration::from_secs(20), run).await.expect("stops by itself").expect_err("fatal");
    assert!(err.to_string().contains("replica-1") && err.to_string().contains("is a primary"), "{err}");

    let out = std::process::Command::new(crate::support::daemon::binary())
        .args(["check", "--against-db", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("freshness.replicas replica-1") && stderr.contains("is a primary"), "{stderr}");
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
