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
//!
//! Debezium's `source.lsn` is the change's own WAL record, not its commit: a standby replays
//! that record and may then hold the commit back (`recovery_min_apply_delay`, a replay conflict
//! with a query, the rest of a large transaction), its replay position already past the LSN
//! while the change is still invisible. So for Debezium events the replica must also have
//! replayed a commit at least as recent as the event's (`pg_last_xact_replay_timestamp()`
//! against `source.ts_ms`/`ts_us`: both are the commit record's time on the primary's clock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::freshness::FreshnessConfig;
use crate::config::postgres::Connection;
use crate::event::{Decoded, Op};
use crate::shutdown::Shutdown;
use crate::source::postgres::sql::{self, SqlError};
use crate::source::{Position, SourceEvent};
use crate::telemetry::events::freshness::{MaxWaitReached, ReplicaLag};
use crate::telemetry::Metrics;

mod check;

pub use check::{check_all, system_identifier};

/// Why a replica cannot gate the second pass (at `check` and at start: fatal). `replica` names
/// it as the config does: `file:line:col: freshness.replicas NAME`.
#[derive(Debug, thiserror::Error)]
pub enum FreshnessError {
    #[error("{replica}: {source}")]
    Connect { replica: String, source: SqlError },
    #[error("{replica} ({target}) is a primary, not a standby in recovery: list the read replicas the application reads from")]
    NotStandby { replica: String, target: String },
    #[error("{replica} ({target}) belongs to another cluster: its system identifier {id} differs from the source's {source_id}")]
    OtherCluster { replica: String, target: String, id: u64, source_id: u64 },
    #[error("{replica} ({target}) belongs to another cluster than replica {other}: its system identifier {id} differs from {other_id}")]
    OtherClusterThanReplica { replica: String, target: String, id: u64, other: String, other_id: u64 },
    #[error("{replica}: {what} failed: {reason}")]
    Statement { replica: String, what: &'static str, reason: String },
}

impl FreshnessError {
    /// Only an unreachable replica may come back by itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, FreshnessError::Connect { source, .. } if source.is_transient())
    }

    /// A replica that answers but is not one the config may list (a primary, another
    /// cluster's): an invalid config (exit 2), not a failure to retry.
    pub fn is_invalid_config(&self) -> bool {
        matches!(
            self,
            FreshnessError::NotStandby { .. }
                | FreshnessError::OtherCluster { .. }
                | FreshnessError::OtherClusterThanReplica { .. }
        )
    }
}

/// What a replica must have replayed before a change is visible there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Its replay position must be past this WAL position.
    pub lsn: u64,
    /// Where `lsn` is the change's own record (Debezium) rather than its commit's: it must also
    /// have replayed a commit at least this recent (microseconds since the Unix epoch).
    pub at_us: Option<i64>,
}

/// A commit record's LSN (pgoutput): nothing else to wait for.
impl From<u64> for Commit {
    fn from(lsn: u64) -> Commit {
        Commit { lsn, at_us: None }
    }
}

impl Commit {
    /// What a batch's second pass waits for: the newest of its events' commits. None when no
    /// event has an LSN (the pass falls back to `repeat_after`).
    pub fn newest<'a>(events: impl IntoIterator<Item = &'a SourceEvent>) -> Option<Commit> {
        let mut newest: Option<Commit> = None;
        for event in events {
            let Some(lsn) = commit_lsn(event) else { continue };
            let at_us = commit_time(event);
            newest = Some(match newest {
                None => Commit { lsn, at_us },
                // `Option::max`: a known time wins over none.
                Some(c) => Commit { lsn: c.lsn.max(lsn), at_us: c.at_us.max(at_us) },
            });
        }
        newest
    }
}

/// The replay position every replica reported last (0: not known yet, or lost), and the commit
/// time of the last transaction each replayed (µs since the Unix epoch; 0: none known).
#[derive(Clone)]
pub struct Replicas {
    names: Arc<[String]>,
    replayed: watch::Receiver<Vec<u64>>,
    committed: watch::Receiver<Vec<i64>>,
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
    /// `source_system_id` when known, else as each other), then starts one poller per replica.
    pub async fn start(
        config: &FreshnessConfig,
        source_system_id: Option<u64>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<Replicas, FreshnessError> {
        if let Some(first) = check::check_replicas(config, source_system_id).await.into_iter().next() {
            return Err(first);
        }
        Ok(Replicas::spawn(config, metrics, shutdown))
    }

    /// Starts the pollers without the start-up checks (tests).
    pub fn spawn(config: &FreshnessConfig, metrics: Arc<Metrics>, shutdown: Shutdown) -> Replicas {
        let (tx, rx) = watch::channel(vec![0u64; config.replicas.len()]);
        let (commits_tx, commits_rx) = watch::channel(vec![0i64; config.replicas.len()]);
        let (tx, commits_tx) = (Arc::new(tx), Arc::new(commits_tx));
        for (i, replica) in config.replicas.iter().enumerate() {
            if let Some(connection) = replica.connection.clone() {
                let poller = Poller {
                    index: i,
                    name: replica.name.clone(),
                    connection,
                    interval: config.poll_interval,
                    tx: tx.clone(),
                    commits: commits_tx.clone(),
                    metrics: metrics.clone(),
                };
                tokio::spawn(poller.run(shutdown.clone()));
            }
        }
        Replicas {
            names: config.replicas.iter().map(|r| r.name.clone()).collect(),
            replayed: rx,
            committed: commits_rx,
            margin: config.margin,
            max_wait: config.max_wait,
            metrics,
        }
    }

    /// Replicas whose replay positions the caller sets (tests and benchmarks drive the gate
    /// without PostgreSQL): one slot per name, 0 until set. Their replayed commit times are
    /// the latest possible: only positions gate (see [`Replicas::manual_with_commits`]).
    pub fn manual(
        names: &[&str],
        margin: Duration,
        max_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> (Replicas, watch::Sender<Vec<u64>>) {
        let (replicas, tx, commits) = Replicas::manual_with_commits(names, margin, max_wait, metrics);
        commits.send_modify(|v| v.fill(i64::MAX));
        (replicas, tx)
    }

    /// [`Replicas::manual`] with the replayed commit times set by the caller too (0 until set).
    pub fn manual_with_commits(
        names: &[&str],
        margin: Duration,
        max_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> (Replicas, watch::Sender<Vec<u64>>, watch::Sender<Vec<i64>>) {
        let (tx, rx) = watch::channel(vec![0u64; names.len()]);
        let (commits_tx, commits_rx) = watch::channel(vec![0i64; names.len()]);
        let names = names.iter().map(|n| n.to_string()).collect();
        (Replicas { names, replayed: rx, committed: commits_rx, margin, max_wait, metrics }, tx, commits_tx)
    }

    /// Whether every replica has replayed `commit` (the change is visible on all of them).
    pub fn is_replayed(&self, commit: impl Into<Commit>) -> bool {
        let commit = commit.into();
        let (positions, commits) = (self.replayed.borrow(), self.committed.borrow());
        (0..positions.len()).all(|i| has_replayed(positions.get(i), commits.get(i), commit))
    }

    /// Until every replica has replayed `commit` (true), or the pollers are gone (false).
    async fn replayed_by_all(&self, commit: Commit) -> bool {
        let (mut positions, mut commits) = (self.replayed.clone(), self.committed.clone());
        let mut commits_open = true;
        loop {
            if self.is_replayed(commit) {
                return true;
            }
            tokio::select! {
                changed = positions.changed() => if changed.is_err() { return self.is_replayed(commit) },
                changed = commits.changed(), if commits_open => commits_open = changed.is_ok(),
            }
        }
    }

    /// One step of the wait for an event's second pass (`since`: its first pass). Without
    /// `replayed_at`, waits until every replica has replayed past `lsn` ([`Waited::Replayed`]:
    /// the caller notes the instant, for this pass and every later one already replayed, so the
    /// margin counts from the replay and not from when a pass reached the front) or until
    /// `max_wait` ([`Waited::TimedOut`], counted per lagging replica and logged). With it,
    /// sleeps until `replayed_at + margin` ([`Waited::Go`]); never past `max_wait`.
    pub async fn wait(
        &self,
        commit: impl Into<Commit>,
        since: tokio::time::Instant,
        replayed_at: Option<tokio::time::Instant>,
    ) -> Waited {
        let commit = commit.into();
        let deadline = since + self.max_wait;
        if let Some(at) = replayed_at {
            tokio::time::sleep_until(deadline.min(at + self.margin)).await;
            return Waited::Go;
        }
        if matches!(tokio::time::timeout_at(deadline, self.replayed_by_all(commit)).await, Ok(true)) {
            return Waited::Replayed;
        }
        if tokio::time::Instant::now() < deadline {
            // The pollers are gone (shutdown): nothing more will be replayed.
            tokio::time::sleep_until(deadline).await;
        }
        let lsn = commit.lsn;
        let behind: Vec<&str> = {
            let (positions, commits) = (self.replayed.borrow(), self.committed.borrow());
            let behind = |i: &usize| !has_replayed(positions.get(*i), commits.get(*i), commit);
            (0..self.names.len()).filter(behind).filter_map(|i| self.names.get(i)).map(String::as_str).collect()
        };
        self.metrics.emit(MaxWaitReached { behind: &behind, lsn: &format_lsn(lsn), max_wait: self.max_wait });
        Waited::TimedOut
    }

    /// Notes the newest commit LSN awaited, for the replay lag in bytes.
    pub fn awaited(&self, lsn: u64) {
        for (name, &at) in self.names.iter().zip(self.replayed.borrow().iter()) {
            if at > 0 && lsn > at {
                self.metrics.emit(ReplicaLag { replica: name, bytes: (lsn - at) as i64, seconds: None });
            }
        }
    }
}

/// Whether one replica (its replay position and last replayed commit time) has replayed `commit`.
fn has_replayed(position: Option<&u64>, committed_us: Option<&i64>, commit: Commit) -> bool {
    let position_past = position.is_some_and(|&at| at > commit.lsn);
    position_past && commit.at_us.is_none_or(|due| committed_us.is_some_and(|&at| at >= due))
}

/// The LSN a replica must have replayed before the event's change is visible there: the commit
/// record's (pgoutput), or Debezium's `source.lsn` as the decoder read it, whatever the message's
/// encoding (the change's own record: see [`commit_time`] for the commit that follows it).
pub fn commit_lsn(event: &SourceEvent) -> Option<u64> {
    match (&event.position, &event.decoded) {
        (Position::Postgres { commit_end_lsn, .. }, _) => Some(*commit_end_lsn),
        (Position::Kafka { .. }, Ok(Decoded::Change(change))) => change.lsn,
        _ => None,
    }
}

/// For a Debezium change, its commit time (µs since the Unix epoch, from `source.ts_*`): a
/// replica shows the change once it has replayed a commit this recent. None for pgoutput (its
/// LSN is the commit's own) and for snapshot reads (`op: r`: their time is the read's, and their
/// LSN the snapshot's, which is all a replica needs to have replayed).
fn commit_time(event: &SourceEvent) -> Option<i64> {
    if !matches!(event.position, Position::Kafka { .. }) {
        return None;
    }
    match &event.decoded {
        Ok(Decoded::Change(c)) if c.op != Op::Snapshot => {
            let since_epoch = c.committed_at?.duration_since(std::time::UNIX_EPOCH).ok()?;
            i64::try_from(since_epoch.as_micros()).ok()
        }
        _ => None,
    }
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
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
    commits: Arc<watch::Sender<Vec<i64>>>,
    metrics: Arc<Metrics>,
}

const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

impl Poller {
    async fn run(self, shutdown: Shutdown) {
        let mut backoff = RECONNECT_INITIAL;
        let mut lost_since: Option<Instant> = None;
        // The last replayed commit time seen: a restarted standby reports none until the
        // primary commits again, though it has replayed everything it had before.
        let mut last_commit_us = 0i64;
        loop {
            let reason = match sql::connect(&self.connection, "cdc-invalidator-freshness", Duration::from_secs(5)).await
            {
                Ok(client) => {
                    if lost_since.take().is_some() {
                        tracing::info!(replica = %self.name, "read replica reachable again");
                    }
                    backoff = RECONNECT_INITIAL;
                    match self.poll(&client, &shutdown, &mut last_commit_us).await {
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
            self.set(0, 0);
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
    async fn poll(
        &self,
        client: &tokio_postgres::Client,
        shutdown: &Shutdown,
        last_commit_us: &mut i64,
    ) -> Option<String> {
        let query = "SELECT pg_is_in_recovery(), \
                     pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::text, \
                     pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text, \
                     CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
                          ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END, \
                     (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::int8";
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
                self.set(u64::MAX, i64::MAX);
                continue;
            }
            let replayed = row.get::<_, Option<String>>(1).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            let bytes = row.get::<_, Option<String>>(2).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
            let seconds: Option<f64> = row.get(3);
            if let Some(at) = row.get::<_, Option<i64>>(4) {
                *last_commit_us = at;
            }
            self.set(replayed, *last_commit_us);
            self.metrics.emit(ReplicaLag { replica: &self.name, bytes, seconds: Some(seconds.unwrap_or(0.0)) });
        }
    }

    /// Publishes the replay position and the last replayed commit time (commit time first: a
    /// waiter woken by the position then sees both).
    fn set(&self, lsn: u64, commit_us: i64) {
        self.commits.send_if_modified(|v| match v.get_mut(self.index) {
            Some(at) if *at != commit_us => {
                *at = commit_us;
                true
            }
            _ => false,
        });
        self.tx.send_if_modified(|v| match v.get_mut(self.index) {
            Some(at) if *at != lsn => {
                *at = lsn;
                true
            }
            _ => false,
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

    fn decoded(topic: &str, value: &[u8]) -> SourceEvent {
        let position = Position::Kafka { topic: topic.into(), partition: 0, offset: 0 };
        let decoded = crate::source::debezium::decode(topic, None, Some(value))
            .map_err(|e| crate::source::Malformed(e.to_string()));
        SourceEvent { decoded, ..event(position, Some(value)) }
    }

    #[test]
    fn a_batch_waits_for_its_newest_change_and_commit_time_and_snapshots_only_for_their_lsn() {
        let topic = "shop.public.products";
        // Debezium's own sample: lsn 24023400, source.ts_ms 1763821802000.
        let insert = decoded(topic, include_bytes!("../../tests/fixtures/debezium/pg-insert.json"));
        let snapshot = decoded(topic, include_bytes!("../../tests/fixtures/debezium/pg-snapshot-read.json"));
        assert_eq!(Commit::newest([&insert]), Some(Commit { lsn: 24023400, at_us: Some(1_763_821_802_000_000) }));
        let read = Commit::newest([&snapshot]).expect("a snapshot read has an LSN");
        assert_eq!(read.at_us, None, "a snapshot read's time is the read's, not a commit's");
        let both = Commit::newest([&snapshot, &insert]).unwrap();
        assert_eq!(both, Commit { lsn: read.lsn.max(24023400), at_us: Some(1_763_821_802_000_000) });
        let pg = event(Position::Postgres { lsn: 10, commit_end_lsn: 42 }, None);
        assert_eq!(Commit::newest([&pg]), Some(Commit { lsn: 42, at_us: None }), "pgoutput: the commit's own LSN");
        let mysql = decoded("shopdb.shop.orders", include_bytes!("../../tests/fixtures/debezium/mysql-update.json"));
        assert_eq!(Commit::newest([&mysql]), None, "no LSN: repeat_after instead");
    }

    /// A standby replays a change's own record at once and holds its commit back (here as
    /// under `recovery_min_apply_delay`): Debezium's `source.lsn` alone would open the gate
    /// while the change is still invisible on the replica.
    #[tokio::test(start_paused = true)]
    async fn a_debezium_change_waits_for_its_commit_not_only_its_own_record() {
        let metrics = Arc::new(Metrics::new());
        let (replicas, positions, commits) =
            Replicas::manual_with_commits(&["a"], Duration::from_millis(100), Duration::from_secs(5), metrics);
        let change = Commit { lsn: 50, at_us: Some(1_000) };
        positions.send_modify(|v| v[0] = 60);
        commits.send_modify(|v| v[0] = 999);
        assert!(replicas.is_replayed(50) && !replicas.is_replayed(change), "past the record, not the commit");
        let since = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            commits.send_modify(|v| v[0] = 1_000);
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop((positions, commits));
        });
        assert_eq!(replicas.wait(change, since, None).await, Waited::Replayed);
        assert_eq!(since.elapsed(), Duration::from_secs(1), "released when its commit was replayed");
    }
}
