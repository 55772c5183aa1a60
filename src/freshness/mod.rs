//! Read replicas and the second pass (`freshness.replicas`).
//!
//! A reader that misses the cache refills it from a read replica. If the replica has not yet
//! replayed the change, the refill writes the old row back right after the daemon deleted it,
//! and that stale value stays for its whole TTL. A fixed `repeat_after` closes the race only
//! while it exceeds the replica's worst lag. Here the daemon knows instead: one task per replica
//! reads `pg_last_wal_replay_lsn()` every `poll_interval` on its own connection (reconnecting
//! with backoff), and an event's second pass is released once every replica has replayed past
//! the event's commit LSN, plus `margin`; a replica that is down or further behind than
//! `max_wait` does not stall anything: the pass goes out at `max_wait`, counted and logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::freshness::{FreshnessConfig, ReplicaConfig};
use crate::config::postgres::Connection;
use crate::event::Decoded;
use crate::shutdown::Shutdown;
use crate::source::postgres::sql::{self, SqlError};
use crate::source::{Position, SourceEvent};
use crate::telemetry::Metrics;

/// Why a replica cannot gate the second pass (at `check` and at start: fatal).
#[derive(Debug, thiserror::Error)]
pub enum FreshnessError {
    #[error("freshness.replicas {name}: {source}")]
    Connect { name: String, source: SqlError },
    #[error("freshness.replicas {name} ({target}) is a primary, not a standby in recovery: list the read replicas the application reads from")]
    NotStandby { name: String, target: String },
    #[error("freshness.replicas {name} ({target}) belongs to another cluster: its system identifier {replica} differs from the source's {source_id}")]
    OtherCluster { name: String, target: String, replica: u64, source_id: u64 },
    #[error("freshness.replicas {name}: {what} failed: {reason}")]
    Statement { name: String, what: &'static str, reason: String },
}

impl FreshnessError {
    /// Only an unreachable replica may come back by itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, FreshnessError::Connect { source, .. } if source.is_transient())
    }
}

/// The replay position every replica reported last (0: not known yet, or lost).
#[derive(Clone)]
pub struct Replicas {
    names: Arc<[String]>,
    replayed: watch::Receiver<Vec<u64>>,
    margin: Duration,
    max_wait: Duration,
    metrics: Arc<Metrics>,
}

/// How a step of the wait for the replicas ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// Every replica has now replayed the commit; `margin` is still to come.
    Replayed,
    /// The margin after the replay passed: the second pass may go.
    Go,
    /// `max_wait` passed first: the second pass goes anyway.
    TimedOut,
}

impl Replicas {
    /// Checks every replica once (reachable, credentials, in recovery, same cluster as
    /// `source_system_id` when known), then starts one poller per replica.
    pub async fn start(
        config: &FreshnessConfig,
        source_system_id: Option<u64>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<Replicas, FreshnessError> {
        for replica in &config.replicas {
            check_replica(replica, source_system_id).await?;
        }
        Ok(Replicas::spawn(config, metrics, shutdown))
    }

    /// Starts the pollers without the start-up checks (tests).
    pub fn spawn(config: &FreshnessConfig, metrics: Arc<Metrics>, shutdown: Shutdown) -> Replicas {
        let (tx, rx) = watch::channel(vec![0u64; config.replicas.len()]);
        let tx = Arc::new(tx);
        for (i, replica) in config.replicas.iter().enumerate() {
            if let Some(connection) = replica.connection.clone() {
                let poller = Poller {
                    index: i,
                    name: replica.name.clone(),
                    connection,
                    interval: config.poll_interval,
                    tx: tx.clone(),
                    metrics: metrics.clone(),
                };
                tokio::spawn(poller.run(shutdown.clone()));
            }
        }
        Replicas {
            names: config.replicas.iter().map(|r| r.name.clone()).collect(),
            replayed: rx,
            margin: config.margin,
            max_wait: config.max_wait,
            metrics,
        }
    }

    /// Replicas whose replay positions the caller sets (tests and benchmarks drive the gate
    /// without PostgreSQL): one slot per name, 0 until set.
    pub fn manual(
        names: &[&str],
        margin: Duration,
        max_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> (Replicas, watch::Sender<Vec<u64>>) {
        let (tx, rx) = watch::channel(vec![0u64; names.len()]);
        let names = names.iter().map(|n| n.to_string()).collect();
        (Replicas { names, replayed: rx, margin, max_wait, metrics }, tx)
    }

    /// Whether every replica has replayed past `lsn` (its commit is visible on all of them).
    pub fn is_replayed(&self, lsn: u64) -> bool {
        self.replayed.borrow().iter().all(|&at| at > lsn)
    }

    /// One step of the wait for an event's second pass (`since`: its first pass). Without
    /// `replayed_at`, waits until every replica has replayed past `lsn` ([`Waited::Replayed`]:
    /// the caller notes the instant, for this pass and every later one already replayed, so the
    /// margin counts from the replay and not from when a pass reached the front) or until
    /// `max_wait` ([`Waited::TimedOut`], counted per lagging replica and logged). With it,
    /// sleeps until `replayed_at + margin` ([`Waited::Go`]); never past `max_wait`.
    pub async fn wait(
        &self,
        lsn: u64,
        since: tokio::time::Instant,
        replayed_at: Option<tokio::time::Instant>,
    ) -> Waited {
        let deadline = since + self.max_wait;
        if let Some(at) = replayed_at {
            tokio::time::sleep_until(deadline.min(at + self.margin)).await;
            return Waited::Go;
        }
        let mut rx = self.replayed.clone();
        // The guard `wait_for` returns must not live across an await.
        let replayed =
            matches!(tokio::time::timeout_at(deadline, rx.wait_for(|v| v.iter().all(|&at| at > lsn))).await, Ok(Ok(_)));
        if replayed {
            return Waited::Replayed;
        }
        if tokio::time::Instant::now() < deadline {
            // The pollers are gone (shutdown): nothing more will be replayed.
            tokio::time::sleep_until(deadline).await;
        }
        let positions = self.replayed.borrow().clone();
        let behind: Vec<&str> =
            self.names.iter().zip(positions.iter()).filter(|(_, &at)| at <= lsn).map(|(n, _)| n.as_str()).collect();
        for name in &behind {
            self.metrics.freshness_max_wait.with_label_values(&[name]).inc();
        }
        tracing::warn!(
            replicas = %behind.join(","),
            lsn = %format_lsn(lsn),
            max_wait_ms = self.max_wait.as_millis() as u64,
            "freshness.max_wait reached before every replica replayed the commit: second pass sent anyway"
        );
        Waited::TimedOut
    }

    /// Notes the newest commit LSN awaited, for the replay lag in bytes.
    pub fn awaited(&self, lsn: u64) {
        for (name, &at) in self.names.iter().zip(self.replayed.borrow().iter()) {
            if at > 0 && lsn > at {
                self.metrics.replica_replay_lag_bytes.with_label_values(&[name]).set((lsn - at) as i64);
            }
        }
    }
}

/// The LSN a replica must have replayed before the event's change is visible there: the commit
/// record's (pgoutput), or Debezium's `source.lsn` as the decoder read it, whatever the message's
/// encoding (the change's own record; its commit follows it closely, which `margin` covers).
pub fn commit_lsn(event: &SourceEvent) -> Option<u64> {
    match (&event.position, &event.decoded) {
        (Position::Postgres { commit_end_lsn, .. }, _) => Some(*commit_end_lsn),
        (Position::Kafka { .. }, Ok(Decoded::Change(change))) => change.lsn,
        _ => None,
    }
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// One replica's identity and state, read at start and by `check --against-db`.
async fn check_replica(replica: &ReplicaConfig, source_system_id: Option<u64>) -> Result<(), FreshnessError> {
    let name = replica.name.clone();
    let Some(c) = replica.connection.as_ref() else { return Ok(()) };
    let client = sql::connect(c, "cdc-invalidator-freshness", Duration::from_secs(10))
        .await
        .map_err(|source| FreshnessError::Connect { name: name.clone(), source })?;
    let row = client
        .query_one("SELECT pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system())::text", &[])
        .await
        .map_err(|e| FreshnessError::Statement {
            name: name.clone(),
            what: "reading the replica's state",
            reason: sql::describe(&e),
        })?;
    let in_recovery: bool = row.get(0);
    let system_id: Option<String> = row.get(1);
    if !in_recovery {
        return Err(FreshnessError::NotStandby { name, target: c.to_string() });
    }
    if let (Some(source_id), Some(replica)) = (source_system_id, system_id.and_then(|s| s.parse::<u64>().ok())) {
        if source_id != replica {
            return Err(FreshnessError::OtherCluster { name, target: c.to_string(), replica, source_id });
        }
    }
    Ok(())
}

/// Checks every replica, for `check --against-db`: one sentence per problem.
pub async fn check_all(config: &FreshnessConfig, source_system_id: Option<u64>) -> Vec<String> {
    let mut problems = Vec::new();
    for replica in &config.replicas {
        if let Err(e) = check_replica(replica, source_system_id).await {
            problems.push(e.to_string());
        }
    }
    problems
}

/// The system identifier of the cluster behind `c` (the source), when it can be read.
pub async fn system_identifier(c: &Connection) -> Option<u64> {
    let client = sql::connect(c, "cdc-invalidator-freshness", Duration::from_secs(10)).await.ok()?;
    let row = client.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await.ok()?;
    row.get::<_, String>(0).parse().ok()
}

/// Reads one replica's replay position every `interval`; reconnects with backoff. Runs until
/// shutdown abandons the work, not merely until intake stops: the drain's second passes still
/// wait for the replicas.
struct Poller {
    index: usize,
    name: String,
    connection: Connection,
    interval: Duration,
    tx: Arc<watch::Sender<Vec<u64>>>,
    metrics: Arc<Metrics>,
}

const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

impl Poller {
    async fn run(self, shutdown: Shutdown) {
        let mut backoff = RECONNECT_INITIAL;
        let mut lost_since: Option<Instant> = None;
        loop {
            let reason = match sql::connect(&self.connection, "cdc-invalidator-freshness", Duration::from_secs(5)).await
            {
                Ok(client) => {
                    if lost_since.take().is_some() {
                        tracing::info!(replica = %self.name, "read replica reachable again");
                    }
                    backoff = RECONNECT_INITIAL;
                    match self.poll(&client, &shutdown).await {
                        Some(reason) => reason,
                        // The daemon is done: not a lost replica, nothing to warn about.
                        None => return,
                    }
                }
                Err(e) => e.to_string(),
            };
            if shutdown.is_abandoned() {
                return;
            }
            // Lost: its position is unknown, so passes wait for it until `max_wait`.
            self.set(0);
            if lost_since.is_none() {
                lost_since = Some(Instant::now());
                tracing::warn!(replica = %self.name, error = %reason, "read replica lost: second passes wait for it at most freshness.max_wait; reconnecting");
            }
            tokio::select! {
                _ = shutdown.abandoned() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }

    /// Polls until the connection fails (returns why) or shutdown (None). `abandoned()` also
    /// resolves when the trigger is dropped at the end of a clean drain, while `is_abandoned()`
    /// stays false: hence None here rather than a reason the caller must recognise.
    async fn poll(&self, client: &tokio_postgres::Client, shutdown: &Shutdown) -> Option<String> {
        let query = "SELECT pg_is_in_recovery(), \
                     pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::text, \
                     pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text, \
                     CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
                          ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END";
        let statement = match client.prepare(query).await {
            Ok(s) => s,
            Err(e) => return Some(sql::describe(&e)),
        };
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.abandoned() => return None,
                _ = tick.tick() => {}
            }
            let row = match tokio::time::timeout(Duration::from_secs(5), client.query_one(&statement, &[])).await {
                Ok(Ok(row)) => row,
                Ok(Err(e)) => return Some(sql::describe(&e)),
                Err(_) => return Some("no answer within 5s".into()),
            };
            let in_recovery: bool = row.get(0);
            if !in_recovery {
                // Promoted: it is the primary now and has everything it will ever serve.
                self.set(u64::MAX);
                continue;
            }
            let replayed = row.get::<_, Option<String>>(1).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            let bytes = row.get::<_, Option<String>>(2).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
            let seconds: Option<f64> = row.get(3);
            self.set(replayed);
            self.metrics.replica_replay_lag_bytes.with_label_values(&[&self.name]).set(bytes.max(0));
            self.metrics
                .replica_replay_lag_seconds
                .with_label_values(&[&self.name])
                .set(seconds.unwrap_or(0.0).max(0.0));
        }
    }

    fn set(&self, lsn: u64) {
        self.tx.send_modify(|v| {
            if let Some(at) = v.get_mut(self.index) {
                *at = lsn;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Ack, RawMessage};

    fn event(position: Position, value: Option<&[u8]>) -> SourceEvent {
        SourceEvent {
            position,
            decoded: crate::source::debezium::decode("shop.public.products", None, value)
                .map_err(|e| crate::source::Malformed(e.to_string())),
            raw: RawMessage { topic: None, key: None, value: value.map(<[u8]>::to_vec) },
            logged_at: None,
            received: std::time::Instant::now(),
            ack: Ack::detached(),
        }
    }

    // The fixtures are the project's Debezium samples (their sources are cited in
    // tests/fixtures/debezium/); one with the converter's schema envelope, one without. The Avro
    // and Protobuf forms of the same messages are checked in `source::encoded`.
    #[test]
    fn the_commit_lsn_comes_from_pgoutput_or_debeziums_source_lsn() {
        let pg = event(Position::Postgres { lsn: 10, commit_end_lsn: 42 }, None);
        assert_eq!(commit_lsn(&pg), Some(42), "pgoutput: the commit record's LSN");
        let kafka = Position::Kafka { topic: "shop.public.products".into(), partition: 0, offset: 7 };
        let value = include_bytes!("../../tests/fixtures/debezium/pg-insert.json");
        assert_eq!(commit_lsn(&event(kafka.clone(), Some(value))), Some(24023400), "Debezium: source.lsn");
        let enveloped = include_bytes!("../../tests/fixtures/debezium/pg-update-with-schema.json");
        assert_eq!(commit_lsn(&event(kafka.clone(), Some(enveloped))), Some(24023184), "with the schema envelope");
        let mysql = include_bytes!("../../tests/fixtures/debezium/mysql-update.json");
        assert_eq!(commit_lsn(&event(kafka.clone(), Some(mysql))), None, "MySQL events have no LSN");
        assert_eq!(commit_lsn(&event(kafka, Some(b"not json"))), None, "nothing decoded, no LSN");
        assert_eq!(format_lsn(0x1_0000_00FF), "1/FF");
    }

    #[tokio::test(start_paused = true)]
    async fn margin_counts_from_the_replay_and_a_dead_feed_waits_out_max_wait() {
        let metrics = Arc::new(Metrics::new());
        let (replicas, tx) =
            Replicas::manual(&["a"], Duration::from_millis(100), Duration::from_secs(5), metrics.clone());
        let since = tokio::time::Instant::now();
        tx.send_modify(|v| v[0] = 51);
        assert!(replicas.is_replayed(50) && !replicas.is_replayed(51));
        assert_eq!(replicas.wait(50, since, None).await, Waited::Replayed);
        assert_eq!(replicas.wait(50, since, Some(since)).await, Waited::Go);
        assert_eq!(since.elapsed(), Duration::from_millis(100));
        drop(tx);
        assert_eq!(replicas.wait(60, since, None).await, Waited::TimedOut);
        assert_eq!(since.elapsed(), Duration::from_secs(5));
        assert_eq!(metrics.value("cdc_invalidator_freshness_max_wait_total", &[("replica", "a")]), 1.0);
    }
}
