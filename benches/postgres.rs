//! Benchmark of the PostgreSQL source: the whole daemon in process against a private
//! PostgreSQL 15 cluster and a real Redis (both on loopback).
//!
//! 1. Latency: single-row UPDATE transactions at a steady 500 and 2,000 tx/s; for each, the
//!    time from COMMIT returning to Redis reporting the key deleted (keyspace notification on
//!    a subscribed connection). p50/p99/max.
//! 2. Throughput: 200,000 row changes in 1,000-row transactions, committed as fast as
//!    PostgreSQL takes them; row changes per second until every one is invalidated and the
//!    slot confirmed past the last commit.
//!
//! `cargo bench --bench postgres` (runs as root: the cluster runs as the `postgres` user).
//! Options through the environment: `PG_BENCH_SECONDS` (per latency rate, default 10),
//! `PG_BENCH_BATCH_WAIT` (`pipeline.batch_max_wait`, default the daemon's default, 5ms),
//! `PG_BENCH_IDLE_WAIT` (`pipeline.batch_idle_wait`, default the daemon's default).

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::daemon::{series_sum, wait_until, Daemon};
use support::postgres::{write_config, PgCluster, PgSetup};
use support::redis::RedisServer;

const SLOT: &str = "bench_slot";
const PUBLICATION: &str = "bench_pub";
const RULES: &str = "version: 1\nrules:\n  - name: items\n    table: public.items\n    redis: { keys: [\"i:{id}\"] }\n";
const ROWS: i32 = 50_000;

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Records when each `i:<id>` key is deleted, from Redis keyspace notifications.
fn watch_deletes(redis: &RedisServer) -> Arc<Mutex<HashMap<i32, Instant>>> {
    let mut c = redis.connection();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("Eg").query(&mut c).unwrap();
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let out = seen.clone();
    let mut sub = redis.connection();
    std::thread::spawn(move || {
        let mut pubsub = sub.as_pubsub();
        pubsub.subscribe("__keyevent@0__:del").unwrap();
        loop {
            let Ok(msg) = pubsub.get_message() else { return };
            let now = Instant::now();
            let Ok(key) = msg.get_payload::<String>() else { continue };
            if let Some(id) = key.strip_prefix("i:").and_then(|s| s.parse::<i32>().ok()) {
                out.lock().unwrap().insert(id, now);
            }
        }
    });
    seen
}

async fn latency(
    pg: &PgCluster,
    redis: &RedisServer,
    seen: &Arc<Mutex<HashMap<i32, Instant>>>,
    rate: u32,
    seconds: u32,
    first_id: i32,
) -> (Vec<Duration>, f64, usize) {
    let n = (rate * seconds) as i32;
    let ids: Vec<i32> = (first_id..first_id + n).collect();
    {
        let mut c = redis.connection();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("SET").arg(format!("i:{id}")).arg("cached").ignore();
        }
        let _: () = pipe.query(&mut c).unwrap();
    }
    let client = pg.client().await;
    let stmt = client.prepare("UPDATE items SET n = n + 1 WHERE id = $1").await.unwrap();
    let mut committed: Vec<(i32, Instant)> = Vec::with_capacity(ids.len());
    let start = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        client.execute(&stmt, &[id]).await.unwrap();
        committed.push((*id, Instant::now()));
    }
    let achieved = ids.len() as f64 / start.elapsed().as_secs_f64();
    let last = ids[ids.len() - 1];
    wait_until(Duration::from_secs(30), || seen.lock().unwrap().contains_key(&last)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = seen.lock().unwrap();
    let mut lat: Vec<Duration> =
        committed.iter().filter_map(|(id, at)| seen.get(id).map(|t| t.saturating_duration_since(*at))).collect();
    let missing = committed.len() - lat.len();
    lat.sort();
    (lat, achieved, missing)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u32 = std::env::var("PG_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let batch_wait = std::env::var("PG_BENCH_BATCH_WAIT").unwrap_or_else(|_| "5ms".into());
    let idle = std::env::var("PG_BENCH_IDLE_WAIT").map(|v| format!("  batch_idle_wait: {v}\n")).unwrap_or_default();
    let extra = format!("log:\n  level: warn\npipeline:\n  batch_max_wait: {batch_wait}\n{idle}");
    let pg = PgCluster::start();
    pg.sql(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, n int); INSERT INTO items SELECT i, 0 FROM generate_series(1, {ROWS}) i;"
    ))
    .await;
    pg.publish(PUBLICATION, "items", SLOT).await;
    let redis = RedisServer::start();
    let seen = watch_deletes(&redis);
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let (config, port) = write_config(
        dir.path(),
        &PgSetup { extra: &extra, ..PgSetup::new(&url, SLOT, PUBLICATION, &redis.url(), RULES) },
    );
    let daemon = Daemon::from_config(dir.path(), &config, port);
    assert!(
        wait_until(Duration::from_secs(20), || daemon.metrics.value("cdc_invalidator_source_ready", &[]) == 1.0).await
    );

    println!("commit -> Redis invalidated (single-row UPDATE transactions, {seconds} s per rate, batch_max_wait {batch_wait})");
    println!(
        "{:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "target/s", "achieved/s", "p50 ms", "p99 ms", "max ms", "missing"
    );
    let mut first = 1;
    for rate in [500u32, 2000] {
        let (lat, achieved, missing) = latency(&pg, &redis, &seen, rate, seconds, first).await;
        first += (rate * seconds) as i32;
        println!(
            "{:>10} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9}",
            rate,
            achieved,
            percentile(&lat, 0.50).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            missing
        );
    }

    // Throughput: 200 transactions of 1,000 row changes each.
    let before = daemon.metrics.value("cdc_invalidator_events_total", &[]);
    let batches_before = batch_totals(&daemon.metrics.render());
    let client = pg.client().await;
    let total = 200_000u32;
    let start = Instant::now();
    for t in 0..(total / 1000) {
        let lo = (t as i32 * 1000) % ROWS + 1;
        client.execute("UPDATE items SET n = n + 1 WHERE id BETWEEN $1 AND $2", &[&lo, &(lo + 999)]).await.unwrap();
    }
    let committed = start.elapsed();
    let end = pg.current_lsn().await;
    let done = wait_until(Duration::from_secs(300), || {
        daemon.metrics.value("cdc_invalidator_events_total", &[]) - before >= total as f64
            && daemon.metrics.value("cdc_invalidator_postgres_confirmed_flush_lsn", &[]) >= end as f64
    })
    .await;
    let elapsed = start.elapsed();
    println!(
        "throughput: {total} row changes in {:.2} s (committed in {:.2} s): {:.0} row changes/s invalidated and confirmed{}",
        elapsed.as_secs_f64(),
        committed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        if done { "" } else { " (TIMED OUT)" }
    );
    let (batches, events) = batch_totals(&daemon.metrics.render());
    let batches = batches - batches_before.0;
    println!(
        "throughput: {batches:.0} batches, mean {:.1} events per batch",
        (events - batches_before.1) / batches.max(1.0)
    );
    daemon.stop().await.unwrap();
}

/// (batches, events in them) so far, from the `cdc_invalidator_batch_events` histogram.
fn batch_totals(text: &str) -> (f64, f64) {
    (series_sum(text, "cdc_invalidator_batch_events_count "), series_sum(text, "cdc_invalidator_batch_events_sum "))
}
