//! The PostgreSQL source: logical replication (pgoutput) from an existing slot, no Kafka.
//!
//! ```text
//!  pgwire-replication worker ──(buffer_messages)──▶ this task ──SourceEvent──▶ pipeline
//!    (TCP/TLS, SCRAM, keepalive replies,              decode ▸ relation cache ▸ tracker
//!     standby status with OUR applied LSN)                    ▲
//!         ▲                                                   │ Ack (seq, stream)
//!         └──────── update_applied_lsn(confirmed) ◀── tracker ┘
//! ```
//!
//! - **Start-up** (`prepare`): over ordinary SQL, the server must fit the config
//!   (`server.rs`: `wal_level`, `failover` only on 17+, a standby only on 16+ and with
//!   `hot_standby_feedback`), the publication must exist (or `create_publication`), the slot
//!   must exist (or `create_slot`: a failover slot on a 17+ primary unless `failover: false`),
//!   be logical, use pgoutput, belong to this database, not be invalidated (the server's
//!   reason is quoted) and not be a copy a standby synchronises. Each failure is one fatal
//!   sentence naming the thing and the fix. An unreachable server is retried (the daemon is not
//!   ready meanwhile).
//! - **On a physical standby** (16+) everything works alike; the slot figures are measured
//!   against the replay position, as `pg_current_wal_lsn()` fails in recovery.
//! - **Streaming**: changes are emitted as they arrive, never buffered per transaction; each
//!   gets a sequence number. The confirmed flush LSN is the Commit `end_lsn` of the newest
//!   transaction whose every event (and every earlier one) is finished (`tracker.rs`); it is
//!   handed to the replication client, which sends it in standby status updates at most every
//!   `feedback_interval` and at once when a keepalive asks for a reply. The server's received
//!   position is never reported as flushed.
//! - **Backpressure**: while the pipeline queue is full the task stops reading; the client's
//!   bounded buffer fills and then the client stops reading the socket, while it keeps sending
//!   status updates so the walsender does not time out.
//! - **Reconnects**: a broken stream (walsender terminated, server restart) is reopened with
//!   exponential backoff from the confirmed LSN; the new connection is a new stream, so acks of
//!   the old one are ignored (the server replays that work).
//! - **Standby**: START_REPLICATION on a slot another session holds fails with SQLSTATE 55006;
//!   the daemon then waits as a standby (`cdc_invalidator_postgres_role{role="standby"} 1`,
//!   not ready) and retries every `standby_retry` until the active daemon's session is gone.
//! - **Slot health**: every `status_interval` the slot's lag and retained WAL are read into
//!   metrics; an invalidated slot is fatal (docs/postgres.md has the recovery steps).

pub mod check;
pub mod config;
mod pgoutput;
mod relation;
mod server;
pub mod sql;
mod tracker;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use serde_json::Value;
use tokio::sync::mpsc;

use self::pgoutput::Message;
use self::relation::{RelationCache, Undecodable};
use self::tracker::Tracker;
use crate::config::postgres::{Connection, SslMode};
use crate::config::PostgresConfig;
use crate::event::{ChangeEvent, Decoded};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::source::{Ack, Finished, Malformed, Position, RawMessage, SourceEvent};
use crate::telemetry::events::source::{PostgresRole, PostgresRoleChanged};
use crate::telemetry::Metrics;

/// How long the final status update at shutdown may take.
const FINAL_FEEDBACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Fatal errors of the PostgreSQL source: each is one sentence naming the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PostgresSourceError {
    #[error("source.postgres: {0}")]
    Config(String),
    #[error("replication slot {slot:?} does not exist: create it with SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); or set source.postgres.create_slot: true (a slot created after changes were made has skipped them: flush the caches first)")]
    SlotMissing { slot: String },
    /// Invalidated by the server; `reason` is its `invalidation_reason` (PostgreSQL 17+), quoted
    /// with the recovery steps.
    #[error("{}", server::invalidated_sentence(slot, reason.as_deref()))]
    SlotLost { slot: String, reason: Option<String> },
    #[error("replication slot {slot:?} cannot be used: {why}")]
    SlotUnusable { slot: String, why: String },
    #[error("publication {publication:?} does not exist: create it with CREATE PUBLICATION {publication} FOR TABLE schema.table, ...; or set source.postgres.create_publication: true")]
    PublicationMissing { publication: String },
    /// What the server is does not fit the config (wal_level, version, standby settings): the
    /// sentences of `server::server_problems`, each naming the setting to change.
    #[error("{0}")]
    Server(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Sql(String),
    #[error("the replication stream failed: {0}")]
    Replication(String),
}

/// How a replication error is handled.
#[derive(Debug)]
enum Verdict {
    /// Another session holds the slot (SQLSTATE 55006): wait as a standby.
    Standby,
    /// Reconnect with backoff.
    Transient(String),
    Fatal(PostgresSourceError),
}

/// The SQLSTATE the replication client put into a server error's text.
fn sqlstate(text: &str) -> Option<&str> {
    let start = text.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    text.get(start..start + 5)
}

fn classify(e: &PgWireError, slot: &str) -> Verdict {
    match e {
        PgWireError::Server(text) => match sqlstate(text) {
            Some("55006") => Verdict::Standby,
            Some("58P01") => Verdict::Fatal(PostgresSourceError::SlotLost { slot: slot.into(), reason: None }),
            Some("55000") if text.contains("invalidated") || text.contains("no longer") => {
                Verdict::Fatal(PostgresSourceError::SlotLost { slot: slot.into(), reason: None })
            }
            // On a standby whose primary dropped below wal_level = logical (the standby has
            // invalidated its slots as it replayed the change).
            Some("55000") if server::creation_failure(text).is_some() => Verdict::Fatal(PostgresSourceError::Server(
                server::creation_failure(text).unwrap_or_default(),
            )),
            // A slot a standby synchronises from its primary (PostgreSQL 17+): the server's
            // own words ("cannot use replication slot ... for logical decoding").
            Some("55000") if text.contains("for logical decoding") => {
                Verdict::Fatal(PostgresSourceError::SlotUnusable {
                    slot: slot.into(),
                    why: format!("{text}; a slot being synchronized from the primary (synced = true) cannot be decoded on the standby until it is promoted: point source.postgres.url at the primary"),
                })
            }
            Some("42704") if text.contains("slot") => {
                Verdict::Fatal(PostgresSourceError::SlotMissing { slot: slot.into() })
            }
            Some(code)
                if code.starts_with("28") || code.starts_with("42") || code.starts_with("3D") || code == "55000" =>
            {
                Verdict::Fatal(PostgresSourceError::Replication(text.clone()))
            }
            _ => Verdict::Transient(e.to_string()),
        },
        PgWireError::Auth(text) => Verdict::Fatal(PostgresSourceError::Refused(format!(
            "PostgreSQL refused the replication login: {text} (check the user and password in source.postgres.url)"
        ))),
        PgWireError::Tls(text) => Verdict::Fatal(PostgresSourceError::Refused(format!(
            "TLS to PostgreSQL failed: {text} (check sslmode and sslrootcert in source.postgres.url)"
        ))),
        _ => Verdict::Transient(e.to_string()),
    }
}

/// The transaction being streamed.
#[derive(Debug, Clone, Copy)]
struct Transaction {
    committed_at: Option<SystemTime>,
    /// The LSN of its commit record (pgoutput's Begin `final_lsn`): the position's
    /// `commit_end_lsn`, which identifies the transaction.
    final_lsn: u64,
}

/// Why a session ended.
enum SessionEnd {
    /// Shutdown stopped intake: drain.
    Stopping,
    /// The pipeline is gone: nothing can finish any more.
    PipelineGone,
    Broken(PgWireError),
    Fatal(PostgresSourceError),
}

pub struct PostgresSource {
    /// As configured: with a host list, every host.
    connection: Connection,
    /// The host in use: the one `target_session_attrs` picked at the last start-up check.
    current: std::sync::Mutex<Connection>,
    /// This source's share of `pending_events`: what to take back when a stream is abandoned
    /// for another host (the acks of its events then go nowhere).
    pending: std::sync::atomic::AtomicI64,
    slot: String,
    publication: String,
    create_slot: bool,
    create_publication: bool,
    failover: Option<bool>,
    feedback_interval: Duration,
    status_interval: Duration,
    standby_retry: Duration,
    connect_timeout: Duration,
    buffer_messages: usize,
    application_name: String,
    backoff: RetryPolicy,
    metrics: Arc<Metrics>,
}

impl PostgresSource {
    pub fn new(config: &PostgresConfig, metrics: Arc<Metrics>) -> Result<PostgresSource, PostgresSourceError> {
        let connection = config.connection().cloned().ok_or_else(|| {
            PostgresSourceError::Config("the url was not resolved (validate the config first)".into())
        })?;
        let backoff =
            RetryPolicy { initial: config.reconnect_initial, max: config.reconnect_max, ..RetryPolicy::default() };
        Ok(PostgresSource {
            current: std::sync::Mutex::new(connection.clone()),
            pending: std::sync::atomic::AtomicI64::new(0),
            connection,
            slot: config.slot.clone(),
            publication: config.publication.clone(),
            create_slot: config.create_slot,
            create_publication: config.create_publication,
            failover: config.failover,
            feedback_interval: config.feedback_interval,
            status_interval: config.status_interval,
            standby_retry: config.standby_retry,
            connect_timeout: config.connect_timeout,
            buffer_messages: config.buffer_messages,
            application_name: config.application_name.clone(),
            backoff,
            metrics,
        })
    }

    /// Checks the slot and publication, then streams until shutdown, then drains: keeps
    /// confirming while the pipeline finishes what it holds, and sends the final position.
    ///
    /// With a host list, a stream that breaks because its server is no longer the one
    /// `target_session_attrs` asks for (a failover) starts over on the one that is: the checks
    /// again, then the stream from that server's slot (a synced failover slot), so what the old
    /// server had not confirmed is delivered again.
    async fn replicate(self, out: mpsc::Sender<SourceEvent>, shutdown: Shutdown) -> Result<(), PostgresSourceError> {
        let mut out = out;
        let mut after_failover = false;
        loop {
            let Some(start) = self.prepare(&shutdown, after_failover).await? else {
                return Ok(()); // Shutdown while the server was unreachable.
            };
            self.metrics.postgres_confirmed_lsn.set(start as f64);
            let (fatal_tx, fatal_rx) = mpsc::channel(1);
            let poller = tokio::spawn(poll_slot(
                self.current(),
                self.application_name.clone(),
                self.slot.clone(),
                self.status_interval,
                self.connect_timeout,
                self.metrics.clone(),
                fatal_tx,
            ));
            let result = self.stream(out, &shutdown, start, fatal_rx).await;
            poller.abort();
            self.set_role(None);
            match result {
                Ok(Some(handed_back)) => {
                    out = handed_back;
                    after_failover = true;
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn pending_sub(&self, n: i64) {
        self.pending.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        self.metrics.pending_events.sub(n);
    }

    /// The host in use.
    fn current(&self) -> Connection {
        match self.current.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// With a host list: whether another host is now the one to use (the current one is gone
    /// or no longer fits `target_session_attrs`).
    async fn moved(&self) -> bool {
        if self.connection.alternates.is_empty() {
            return false;
        }
        let current = self.current();
        match sql::connect_target(&self.connection, &self.application_name, self.connect_timeout).await {
            Ok((_, chosen)) => (chosen.host != current.host || chosen.port != current.port).then(|| {
                tracing::warn!(from = %current, to = %chosen, "the server to stream from changed (failover): starting over there from its slot");
            }).is_some(),
            Err(_) => false,
        }
    }

    /// Start-up checks over ordinary SQL. `None` when shutdown came first. `after_failover`:
    /// the stream moved to another host, where a missing slot is never created (a new slot
    /// would have skipped every change since the last confirmation).
    async fn prepare(&self, shutdown: &Shutdown, after_failover: bool) -> Result<Option<u64>, PostgresSourceError> {
        let mut attempt = 0u32;
        let client = loop {
            match sql::connect_target(&self.connection, &self.application_name, self.connect_timeout).await {
                Ok((c, chosen)) => {
                    match self.current.lock() {
                        Ok(mut current) => *current = chosen,
                        Err(poisoned) => *poisoned.into_inner() = chosen,
                    }
                    break c;
                }
                Err(e) if e.is_transient() => {
                    self.metrics.source_errors.inc();
                    attempt += 1;
                    let wait = self.backoff.wait(attempt, None);
                    tracing::warn!(error = %e, attempt, wait_ms = wait.as_millis() as u64, "PostgreSQL unreachable; retrying");
                    tokio::select! {
                        _ = shutdown.stopping() => return Ok(None),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => return Err(PostgresSourceError::Refused(e.to_string())),
            }
        };
        let sql_err = |e: sql::SqlError| PostgresSourceError::Sql(e.to_string());
        let info = sql::server_info(&client).await.map_err(sql_err)?;
        if let Some(problem) = server::server_problems(&info, self.failover).into_iter().next() {
            return Err(PostgresSourceError::Server(problem));
        }
        if !sql::publication_exists(&client, &self.publication).await.map_err(sql_err)? {
            if info.in_recovery {
                // A standby is read-only: the publication comes from the primary by replay.
                return Err(PostgresSourceError::Server(format!(
                    "publication {:?} does not exist on this standby: create it on the primary with CREATE PUBLICATION {} FOR TABLE schema.table, ...; (a standby receives it by replay)",
                    self.publication, self.publication
                )));
            }
            if !self.create_publication {
                return Err(PostgresSourceError::PublicationMissing { publication: self.publication.clone() });
            }
            sql::create_publication(&client, &self.publication).await.map_err(sql_err)?;
            tracing::warn!(publication = %self.publication, "created publication FOR ALL TABLES (create_publication: true)");
        }
        let mut status = sql::slot_status(&client, &self.slot, info.version_num).await.map_err(sql_err)?;
        if status.is_none() && after_failover {
            return Err(PostgresSourceError::Server(format!(
                "after a failover to {} replication slot {:?} is missing there (it was not a failover slot, or the standby had not synchronised it yet), so changes since the last confirmation were never streamed: flush the caches the rules cover, create the slot (pg_create_logical_replication_slot('{}', 'pgoutput', false, false, true)) and restart",
                self.current(),
                self.slot,
                self.slot
            )));
        }
        if status.is_none() {
            if !self.create_slot {
                return Err(PostgresSourceError::SlotMissing { slot: self.slot.clone() });
            }
            let failover = server::wants_failover(&info, self.failover);
            if info.in_recovery {
                // Creating a slot on a standby waits for a running-transactions record from
                // the primary, which it logs only every 15 s and only while it is busy.
                tracing::info!(slot = %self.slot, "creating the replication slot on a standby: it completes at the primary's next running-transactions record (run SELECT pg_log_standby_snapshot(); on the primary to finish at once)");
            }
            if let Err(e) = sql::create_slot(&client, &self.slot, failover).await {
                let text = e.to_string();
                return Err(match server::creation_failure(&text) {
                    Some(sentence) => PostgresSourceError::Server(sentence),
                    None => sql_err(e),
                });
            }
            tracing::warn!(slot = %self.slot, failover, "created replication slot (create_slot: true): changes made before now are not streamed");
            status = sql::slot_status(&client, &self.slot, info.version_num).await.map_err(sql_err)?;
        }
        let Some(status) = status else {
            return Err(PostgresSourceError::SlotMissing { slot: self.slot.clone() });
        };
        let unusable = |why: String| PostgresSourceError::SlotUnusable { slot: self.slot.clone(), why };
        if !status.logical {
            return Err(unusable("it is a physical slot; create a logical one with pgoutput".into()));
        }
        if status.plugin.as_deref() != Some("pgoutput") {
            return Err(unusable(format!(
                "it uses the output plugin {:?}; this source needs pgoutput: drop it and create it with pg_create_logical_replication_slot('{}', 'pgoutput')",
                status.plugin.as_deref().unwrap_or(""),
                self.slot
            )));
        }
        if status.database.as_deref() != Some(self.connection.database.as_str()) {
            return Err(unusable(format!(
                "it belongs to database {:?}, but source.postgres.url names {:?}",
                status.database.as_deref().unwrap_or(""),
                self.connection.database
            )));
        }
        if status.is_invalidated() {
            return Err(PostgresSourceError::SlotLost {
                slot: self.slot.clone(),
                reason: status.invalidation_reason.clone(),
            });
        }
        if let Some(problem) = server::slot_problems(&self.slot, &info, &status).into_iter().next() {
            return Err(PostgresSourceError::Server(problem));
        }
        if !info.in_recovery && info.major() >= 17 && self.failover != Some(false) {
            let standbys = sql::standbys_attached(&client).await.unwrap_or(0);
            if let Some(warning) = server::failover_warning(&self.slot, &info, &status, standbys) {
                tracing::warn!("{warning}");
            }
        }
        tracing::info!(
            server = %self.current(),
            version = %info.version,
            standby = info.in_recovery,
            failover = status.failover,
            slot = %self.slot,
            publication = %self.publication,
            confirmed_flush = %Lsn(status.confirmed_flush.unwrap_or(0)),
            "PostgreSQL slot checked"
        );
        Ok(Some(status.confirmed_flush.unwrap_or(0)))
    }

    fn replication_config(&self, start: u64) -> ReplicationConfig {
        let c = &self.current();
        let password = c.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default();
        let tls = match c.ssl_mode {
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig { mode: pgwire_replication::SslMode::Prefer, ..TlsConfig::default() },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(c.ssl_root_cert.clone()),
            SslMode::VerifyFull => TlsConfig::verify_full(c.ssl_root_cert.clone()),
        };
        ReplicationConfig::new(
            c.host.clone(),
            c.user.clone(),
            password,
            c.database.clone(),
            self.slot.clone(),
            self.publication.as_str(),
        )
        .with_port(c.port)
        .with_tls(tls)
        // Resume after what we confirmed (the server takes the later of this and its own
        // confirmed_flush_lsn), and never report less than it.
        .with_start_lsn(Lsn(start))
        .with_ack_lsn(Lsn(start))
        .with_status_interval(self.feedback_interval)
        .with_buffer_size(self.buffer_messages)
        .with_application_name(self.application_name.clone())
    }

    /// The replication protocol's error for an invalidated slot does not carry the server's
    /// reason: read it from `pg_replication_slots` (best effort, bounded by connect_timeout).
    async fn with_reason(&self, e: PostgresSourceError) -> PostgresSourceError {
        let PostgresSourceError::SlotLost { slot, reason: None } = e else { return e };
        let read = async {
            let c = sql::connect(&self.current(), &self.application_name, self.connect_timeout).await.ok()?;
            let info = sql::server_info(&c).await.ok()?;
            sql::slot_status(&c, &slot, info.version_num).await.ok()??.invalidation_reason
        };
        let reason = tokio::time::timeout(self.connect_timeout, read).await.ok().flatten();
        PostgresSourceError::SlotLost { slot, reason }
    }

    fn set_role(&self, role: Option<PostgresRole>) {
        self.metrics.emit(PostgresRoleChanged { role });
    }

    async fn stream(
        &self,
        out: mpsc::Sender<SourceEvent>,
        shutdown: &Shutdown,
        start: u64,
        mut fatal_rx: mpsc::Receiver<PostgresSourceError>,
    ) -> Result<Option<mpsc::Sender<SourceEvent>>, PostgresSourceError> {
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Finished>();
        let mut stream_id = 1;
        let mut tracker = Tracker::new(stream_id, start);
        let mut failures = 0u32;
        let mut standby_logged = false;
        let mut client: Option<ReplicationClient> = None;

        loop {
            let mut c = ReplicationClient::connect(self.replication_config(tracker.confirmed()))
                .await
                .map_err(|e| PostgresSourceError::Replication(e.to_string()))?;
            let started = tokio::select! {
                biased;
                _ = shutdown.stopping() => break,
                _ = out.closed() => break,
                Some(e) = fatal_rx.recv() => return Err(e),
                r = c.wait_started() => r,
            };
            // Whether the stream broke (not: another daemon holds the slot).
            let mut broke = false;
            let wait = match started {
                Ok(()) => {
                    self.set_role(Some(PostgresRole::Active));
                    failures = 0;
                    standby_logged = false;
                    tracing::info!(slot = %self.slot, from = %Lsn(tracker.confirmed()), "streaming from the replication slot (active)");
                    let end =
                        self.session(&mut c, &mut tracker, &out, &ack_tx, &mut ack_rx, shutdown, &mut fatal_rx).await;
                    match end {
                        SessionEnd::Stopping | SessionEnd::PipelineGone => {
                            client = Some(c);
                            break;
                        }
                        SessionEnd::Fatal(e) => return Err(e),
                        SessionEnd::Broken(e) => match classify(&e, &self.slot) {
                            Verdict::Fatal(f) => return Err(self.with_reason(f).await),
                            Verdict::Standby | Verdict::Transient(_) => {
                                broke = true;
                                self.set_role(None);
                                self.metrics.postgres_reconnects.inc();
                                self.metrics.source_errors.inc();
                                failures += 1;
                                let wait = self.backoff.wait(failures, None);
                                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "replication stream broke; reconnecting from the confirmed LSN");
                                wait
                            }
                        },
                    }
                }
                Err(e) => match classify(&e, &self.slot) {
                    Verdict::Fatal(f) => return Err(self.with_reason(f).await),
                    Verdict::Standby => {
                        self.set_role(Some(PostgresRole::Standby));
                        if !standby_logged {
                            standby_logged = true;
                            tracing::info!(slot = %self.slot, retry_ms = self.standby_retry.as_millis() as u64, "another session holds the slot; waiting as a standby");
                        }
                        self.standby_retry
                    }
                    Verdict::Transient(why) => {
                        broke = true;
                        self.set_role(None);
                        self.metrics.postgres_reconnects.inc();
                        self.metrics.source_errors.inc();
                        failures += 1;
                        let wait = self.backoff.wait(failures, None);
                        tracing::warn!(error = %why, wait_ms = wait.as_millis() as u64, "cannot start replication; retrying");
                        wait
                    }
                },
            };
            // With a host list, a failover: start over on the server that fits now, from its
            // slot. Events in flight are finished by the pipeline, but their acks go nowhere:
            // the new server's slot delivers them again.
            if broke && self.moved().await {
                let abandoned = self.pending.swap(0, std::sync::atomic::Ordering::Relaxed);
                self.metrics.pending_events.sub(abandoned);
                return Ok(Some(out));
            }
            // A new connection replays everything after the confirmed LSN: a new stream.
            stream_id += 1;
            tracker.reset(stream_id);
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    biased;
                    // Old acks are ignored, but keep the channel short and the gauge right.
                    Some(f) = ack_rx.recv() => self.finish(f, &mut tracker, &mut ack_rx, None),
                    _ = shutdown.stopping() => break,
                    _ = out.closed() => break,
                    Some(e) = fatal_rx.recv() => return Err(e),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            if shutdown.is_stopping() || out.is_closed() {
                break;
            }
        }

        // Drain: no new input; the pipeline finishes what it holds, and we keep confirming.
        tracing::info!(in_flight = tracker.in_flight(), "source stopped reading; waiting for in-flight events");
        drop(out);
        drop(ack_tx);
        while let Some(f) = ack_rx.recv().await {
            self.finish(f, &mut tracker, &mut ack_rx, client.as_ref());
        }
        if let Some(mut c) = client {
            let confirmed = tracker.confirmed();
            c.update_applied_lsn(Lsn(confirmed));
            let metrics = c.metrics();
            let deadline = Instant::now() + FINAL_FEEDBACK_TIMEOUT;
            while metrics.last_applied_lsn().0 < confirmed && c.is_running() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if metrics.last_applied_lsn().0 >= confirmed {
                tracing::info!(confirmed = %Lsn(confirmed), "final position confirmed to the server");
            } else {
                tracing::warn!(confirmed = %Lsn(confirmed), "could not send the final position: the next start redelivers from the previous one");
            }
            c.stop();
            let _ = tokio::time::timeout(FINAL_FEEDBACK_TIMEOUT, c.shutdown()).await;
        }
        Ok(None)
    }

    /// Reads one active session until it ends.
    #[allow(clippy::too_many_arguments)]
    async fn session(
        &self,
        client: &mut ReplicationClient,
        tracker: &mut Tracker,
        out: &mpsc::Sender<SourceEvent>,
        ack_tx: &mpsc::UnboundedSender<Finished>,
        ack_rx: &mut mpsc::UnboundedReceiver<Finished>,
        shutdown: &Shutdown,
        fatal_rx: &mut mpsc::Receiver<PostgresSourceError>,
    ) -> SessionEnd {
        let mut cache = RelationCache::default();
        let mut transaction: Option<Transaction> = None;
        // Decoded events the pipeline had no room for. While any are held the stream is not
        // read, so this holds at most the events of one message (a truncate of many tables).
        let mut held: VecDeque<SourceEvent> = VecDeque::new();
        let end = loop {
            tokio::select! {
                biased;
                // Acknowledgements first, so finished work is confirmed before new input.
                Some(f) = ack_rx.recv() => self.finish(f, tracker, ack_rx, Some(client)),
                _ = shutdown.stopping() => break SessionEnd::Stopping,
                _ = out.closed() => break SessionEnd::PipelineGone,
                Some(e) = fatal_rx.recv() => break SessionEnd::Fatal(e),
                permit = out.reserve(), if !held.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(ev) = held.pop_front() {
                            permit.send(ev);
                        }
                    }
                    Err(_) => break SessionEnd::PipelineGone,
                },
                ev = client.recv(), if held.is_empty() => match ev {
                    Ok(Some(ev)) => {
                        let before = tracker.confirmed();
                        let events = self.handle(ev, &mut cache, &mut transaction, tracker, ack_tx);
                        if crate::source::hand_over(events, out, &mut held) {
                            return SessionEnd::PipelineGone;
                        }
                        if tracker.confirmed() != before {
                            self.confirm(tracker, client);
                        }
                    }
                    Ok(None) => break SessionEnd::Broken(PgWireError::Io(Arc::new(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server ended the replication stream",
                    )))),
                    Err(e) => break SessionEnd::Broken(e),
                },
            }
        };
        // Held events were never handed over: their acks drop, they are replayed.
        self.pending_sub(held.len() as i64);
        end
    }

    /// Records completions (this one and any already queued) and confirms what moved.
    fn finish(
        &self,
        first: Finished,
        tracker: &mut Tracker,
        rx: &mut mpsc::UnboundedReceiver<Finished>,
        client: Option<&ReplicationClient>,
    ) {
        let before = tracker.confirmed();
        let mut n = 1;
        tracker.finish(first);
        while let Ok(f) = rx.try_recv() {
            tracker.finish(f);
            n += 1;
        }
        self.pending_sub(n);
        if let (Some(client), true) = (client, tracker.confirmed() != before) {
            self.confirm(tracker, client);
        }
    }

    fn confirm(&self, tracker: &Tracker, client: &ReplicationClient) {
        let lsn = tracker.confirmed();
        client.update_applied_lsn(Lsn(lsn));
        self.metrics.postgres_confirmed_lsn.set(lsn as f64);
    }

    /// One replication message: the events it makes (none for most).
    fn handle(
        &self,
        ev: ReplicationEvent,
        cache: &mut RelationCache,
        transaction: &mut Option<Transaction>,
        tracker: &mut Tracker,
        ack_tx: &mpsc::UnboundedSender<Finished>,
    ) -> Vec<SourceEvent> {
        match ev {
            ReplicationEvent::Begin { final_lsn, commit_time_micros, .. } => {
                tracker.begin();
                let committed_at = pg_time(commit_time_micros);
                *transaction = Some(Transaction { committed_at, final_lsn: final_lsn.0 });
                Vec::new()
            }
            ReplicationEvent::Commit { end_lsn, commit_time_micros, .. } => {
                tracker.commit(end_lsn.0);
                *transaction = None;
                if let Some(t) = pg_time(commit_time_micros) {
                    self.metrics.last_commit_timestamp.set(unix_seconds(t));
                }
                Vec::new()
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                tracker.idle_at(wal_end.0);
                self.metrics.last_event_timestamp.set(unix_seconds(SystemTime::now()));
                Vec::new()
            }
            ReplicationEvent::XLogData { wal_start, data, .. } => {
                let tx = transaction.unwrap_or(Transaction { committed_at: None, final_lsn: wal_start.0 });
                let position = Position::Postgres { lsn: wal_start.0, commit_end_lsn: tx.final_lsn };
                let at = tx.committed_at;
                let results: Vec<Result<ChangeEvent, Undecodable>> = match pgoutput::parse(&data) {
                    Err(e) => vec![Err(Undecodable { reason: e.to_string(), table: None, rendering: None })],
                    Ok(Message::Relation(r)) => {
                        tracing::debug!(table = %format!("{}.{}", r.schema, r.name), columns = r.columns.len(), "relation");
                        cache.refresh(r);
                        Vec::new()
                    }
                    Ok(Message::Insert { relation, new }) => vec![cache.insert(relation, &new, at)],
                    Ok(Message::Update { relation, old, new }) => vec![cache.update(relation, old.as_ref(), &new, at)],
                    Ok(Message::Delete { relation, old }) => vec![cache.delete(relation, &old, at)],
                    Ok(Message::Truncate { relations }) => {
                        relations.iter().map(|&oid| cache.truncate(oid, at)).collect()
                    }
                    Ok(Message::Other(_)) => Vec::new(),
                };
                results.into_iter().map(|r| self.event(r, position.clone(), tracker, ack_tx)).collect()
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => Vec::new(),
        }
    }

    fn event(
        &self,
        result: Result<ChangeEvent, Undecodable>,
        position: Position,
        tracker: &mut Tracker,
        ack_tx: &mpsc::UnboundedSender<Finished>,
    ) -> SourceEvent {
        let finished = tracker.start();
        self.pending.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.pending_events.inc();
        self.metrics.last_event_timestamp.set(unix_seconds(SystemTime::now()));
        let lsn = match position {
            Position::Postgres { lsn, .. } => Some(lsn),
            _ => None,
        };
        let (decoded, rendering) = match result {
            Ok(change) => {
                // schema and table for the Debezium rendering: split at the first dot, as
                // PostgreSQL schema names cannot be empty.
                let (schema, table) = change.table.split_once('.').unwrap_or(("", change.table.as_str()));
                let json = relation::debezium_json(&change, schema, table, lsn);
                (Ok(Decoded::Change(change)), Some(json))
            }
            Err(u) => {
                let reason = match &u.table {
                    Some(t) => format!("{} (table {t})", u.reason),
                    None => u.reason.clone(),
                };
                (Err(Malformed(reason)), u.rendering)
            }
        };
        SourceEvent {
            position,
            decoded,
            raw: RawMessage {
                topic: None,
                key: None,
                value: rendering.as_ref().map(Value::to_string).map(String::into_bytes),
            },
            logged_at: None,
            received: Instant::now(),
            ack: Ack::new(ack_tx.clone(), finished),
        }
    }
}

/// PostgreSQL timestamps count microseconds from 2000-01-01.
fn pg_time(micros: i64) -> Option<SystemTime> {
    const PG_EPOCH_FROM_UNIX_MICROS: i64 = 946_684_800_000_000;
    let unix = micros.checked_add(PG_EPOCH_FROM_UNIX_MICROS)?;
    u64::try_from(unix).ok().map(|us| UNIX_EPOCH + Duration::from_micros(us))
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Reads the slot's figures every `interval` into the metrics, and reports a lost or dropped
/// slot as fatal. Its own SQL connection, reopened after failures.
async fn poll_slot(
    connection: Connection,
    application_name: String,
    slot: String,
    interval: Duration,
    timeout: Duration,
    metrics: Arc<Metrics>,
    fatal: mpsc::Sender<PostgresSourceError>,
) {
    let mut client = None;
    let mut version_num = 0;
    let mut warned = false;
    loop {
        if client.is_none() {
            let connected = match sql::connect(&connection, &application_name, timeout).await {
                Ok(c) => match tokio::time::timeout(timeout, sql::server_info(&c)).await {
                    Ok(Ok(info)) => Ok((c, info.version_num)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                },
                Err(e) => Err(e.to_string()),
            };
            match connected {
                Ok((c, v)) => {
                    client = Some(c);
                    version_num = v;
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "cannot read slot figures; retrying");
                }
                Err(_) => {}
            }
        }
        if let Some(c) = &client {
            match tokio::time::timeout(timeout, sql::slot_status(c, &slot, version_num)).await {
                Ok(Ok(Some(s))) => {
                    warned = false;
                    if let Some(lag) = s.lag_bytes {
                        metrics.postgres_lag_bytes.set(lag.max(0));
                    }
                    if let Some(retained) = s.retained_bytes {
                        metrics.postgres_retained_wal_bytes.set(retained.max(0));
                    }
                    if s.is_invalidated() {
                        let reason = s.invalidation_reason.clone();
                        tracing::error!(slot = %slot, reason = reason.as_deref().unwrap_or("wal_status = lost"), "replication slot is invalidated");
                        let _ = fatal.send(PostgresSourceError::SlotLost { slot: slot.clone(), reason }).await;
                        return;
                    }
                }
                Ok(Ok(None)) => {
                    let _ = fatal.send(PostgresSourceError::SlotMissing { slot: slot.clone() }).await;
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "reading slot figures failed");
                    client = None;
                }
                Err(_) => client = None,
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[async_trait::async_trait]
impl crate::source::Source for PostgresSource {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn run(
        self: Box<Self>,
        out: mpsc::Sender<SourceEvent>,
        shutdown: Shutdown,
    ) -> Result<(), crate::source::SourceError> {
        Ok(self.replicate(out, shutdown).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_are_classified_by_sqlstate() {
        let server = |t: &str| PgWireError::Server(t.to_string());
        assert!(matches!(
            classify(&server("replication slot \"s\" is active for PID 7 (SQLSTATE 55006)"), "s"),
            Verdict::Standby
        ));
        assert!(matches!(
            classify(&server("terminating connection due to administrator command (SQLSTATE 57P01)"), "s"),
            Verdict::Transient(_)
        ));
        assert!(matches!(
            classify(&server("replication slot \"s\" does not exist (SQLSTATE 42704)"), "s"),
            Verdict::Fatal(PostgresSourceError::SlotMissing { .. })
        ));
        assert!(matches!(
            classify(&server("can no longer get changes from replication slot \"s\" (SQLSTATE 55000)"), "s"),
            Verdict::Fatal(PostgresSourceError::SlotLost { .. })
        ));
        assert!(matches!(classify(&server("password authentication failed (SQLSTATE 28P01)"), "s"), Verdict::Fatal(_)));
        assert!(matches!(
            classify(
                &server(
                    "logical decoding on standby requires \"wal_level\" >= \"logical\" on the primary (SQLSTATE 55000)"
                ),
                "s"
            ),
            Verdict::Fatal(PostgresSourceError::Server(_))
        ));
        // A slot a standby synchronises: the server's words, and what to do.
        match classify(&server("cannot use replication slot \"s\" for logical decoding (SQLSTATE 55000)"), "s") {
            Verdict::Fatal(e) => {
                let text = e.to_string();
                assert!(text.contains("cannot use replication slot \"s\" for logical decoding"), "{text}");
                assert!(text.contains("point source.postgres.url at the primary"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(&PgWireError::Io(Arc::new(std::io::Error::other("reset"))), "s"),
            Verdict::Transient(_)
        ));
    }

    #[test]
    fn commit_times_convert_from_the_postgres_epoch() {
        assert_eq!(pg_time(0), Some(UNIX_EPOCH + Duration::from_secs(946_684_800)));
        assert_eq!(pg_time(i64::MIN), None);
    }
}
