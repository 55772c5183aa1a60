//! Ordinary SQL on a `tokio-postgres` connection: start-up checks of the slot and the
//! publication, the slot figures behind the lag metrics, and `check --against-db`.

use std::time::Duration;

use tokio_postgres::Client;

use super::config::{Connection, SslMode, TargetSession};

/// A failed SQL connection or statement, classified.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The server could not be reached (refused, timed out, reset): worth retrying.
    #[error("cannot reach PostgreSQL at {target}: {reason}")]
    Unreachable { target: String, reason: String },
    /// The server answered but refused us (password, TLS, permissions, missing database):
    /// retrying will not help.
    #[error("PostgreSQL at {target} refused the connection: {reason}")]
    Refused { target: String, reason: String },
    #[error("{what} failed: {reason}")]
    Statement { what: &'static str, reason: String },
}

impl SqlError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SqlError::Unreachable { .. })
    }
}

/// One sentence for a tokio-postgres error: the server's message and SQLSTATE when it sent
/// one, else the client's description.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

/// Connects an ordinary (non-replication) session, with TLS as the URL says.
pub async fn connect(c: &Connection, application_name: &str, timeout: Duration) -> Result<Client, SqlError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(&c.user).dbname(&c.database).port(c.port).application_name(application_name).connect_timeout(timeout);
    if c.host.starts_with('/') {
        cfg.host_path(&c.host);
    } else {
        cfg.host(&c.host);
    }
    if let Some(pw) = &c.password {
        cfg.password(pw.expose());
    }
    let target = c.to_string();
    let connected = match c.ssl_mode {
        SslMode::Disable => {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            tokio::time::timeout(timeout, cfg.connect(tokio_postgres::NoTls)).await.map(|r| {
                r.map(|(client, conn)| {
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "postgres SQL connection closed");
                        }
                    });
                    client
                })
            })
        }
        mode => {
            cfg.ssl_mode(if mode == SslMode::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            let tls = tls_connector(c).map_err(|reason| SqlError::Refused { target: target.clone(), reason })?;
            tokio::time::timeout(timeout, cfg.connect(tls)).await.map(|r| {
                r.map(|(client, conn)| {
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "postgres SQL connection closed");
                        }
                    });
                    client
                })
            })
        }
    };
    match connected {
        Err(_) => Err(SqlError::Unreachable { target, reason: format!("no answer within {timeout:?}") }),
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => {
            let reason = describe(&e);
            if e.as_db_error().is_some() || reason.contains("tls") || reason.contains("certificate") {
                Err(SqlError::Refused { target, reason })
            } else {
                Err(SqlError::Unreachable { target, reason })
            }
        }
    }
}

/// Connects to the first host of the URL that is what `target_session_attrs` asks for (every
/// host in order, as libpq does); returns the session and that host's single-host connection.
/// None fitting (say, mid-failover, before a standby is promoted) is `Unreachable`: retried.
pub async fn connect_target(
    c: &Connection,
    application_name: &str,
    timeout: Duration,
) -> Result<(Client, Connection), SqlError> {
    let candidates = c.candidates();
    if candidates.len() == 1 && c.target == TargetSession::Any {
        let client = connect(c, application_name, timeout).await?;
        return Ok((client, c.clone()));
    }
    let mut seen = Vec::new();
    let mut last_error = None;
    for candidate in candidates {
        match connect(&candidate, application_name, timeout).await {
            Ok(client) => {
                let check = match c.target {
                    TargetSession::Any => "SELECT true",
                    TargetSession::ReadWrite => {
                        "SELECT NOT pg_is_in_recovery() AND current_setting('default_transaction_read_only') = 'off'"
                    }
                    TargetSession::Primary => "SELECT NOT pg_is_in_recovery()",
                    TargetSession::Standby => "SELECT pg_is_in_recovery()",
                };
                let fits = tokio::time::timeout(timeout, client.query_one(check, &[]))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|row| row.try_get::<_, bool>(0).ok());
                match fits {
                    Some(true) => return Ok((client, candidate)),
                    Some(false) => seen.push(format!("{}:{} is not {}", candidate.host, candidate.port, c.target)),
                    None => seen.push(format!("{}:{} did not answer", candidate.host, candidate.port)),
                }
            }
            Err(e) => {
                seen.push(format!("{}:{}: {e}", candidate.host, candidate.port));
                last_error = Some(e);
            }
        }
    }
    // A refusal (password, TLS) on the only host is fatal; anything else waits for a server
    // to fit (a promotion under way).
    match last_error {
        Some(e @ SqlError::Refused { .. }) if seen.len() == 1 => Err(e),
        _ => Err(SqlError::Unreachable {
            target: c.to_string(),
            reason: format!("no host fits target_session_attrs ({})", seen.join("; ")),
        }),
    }
}

fn tls_connector(c: &Connection) -> Result<postgres_native_tls::MakeTlsConnector, String> {
    let mut b = native_tls::TlsConnector::builder();
    match c.ssl_mode {
        SslMode::Prefer | SslMode::Require | SslMode::Disable => {
            b.danger_accept_invalid_certs(true).danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyCa => {
            b.danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyFull => {}
    }
    if let Some(path) = &c.ssl_root_cert {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
        let cert = native_tls::Certificate::from_pem(&pem)
            .map_err(|e| format!("sslrootcert {} is not a PEM certificate: {e}", path.display()))?;
        b.add_root_certificate(cert);
    }
    let connector = b.build().map_err(|e| format!("cannot set up TLS: {e}"))?;
    Ok(postgres_native_tls::MakeTlsConnector::new(connector))
}

/// What `pg_replication_slots` says about our slot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SlotStatus {
    pub plugin: Option<String>,
    pub logical: bool,
    pub database: Option<String>,
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub confirmed_flush: Option<u64>,
    /// Server WAL position minus the confirmed flush LSN. On a standby the position is the
    /// replay position: WAL the standby has not replayed cannot be decoded there yet.
    pub lag_bytes: Option<i64>,
    /// Server WAL position minus the slot's restart LSN: what the slot keeps on disk.
    pub retained_bytes: Option<i64>,
    /// A failover slot (PostgreSQL 17+; false before).
    pub failover: bool,
    /// A copy a standby keeps in sync from its primary (PostgreSQL 17+): not decodable there
    /// until the standby is promoted.
    pub synced: bool,
    /// Why the server invalidated the slot: PostgreSQL 17+'s `invalidation_reason`
    /// (`wal_removed`, `rows_removed`, `wal_level_insufficient`, `idle_timeout`); on 16,
    /// `conflicting = true` (a conflict with recovery on a standby) reads as `conflicting`.
    pub invalidation_reason: Option<String>,
}

impl SlotStatus {
    /// The slot can no longer be decoded from: invalidated for whatever reason.
    pub fn is_invalidated(&self) -> bool {
        self.invalidation_reason.is_some() || self.wal_status.as_deref() == Some("lost")
    }
}

/// What the server is: its version and whether it is a standby, and the settings that decide
/// what the source may do there.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerInfo {
    /// `server_version_num`: 150004, 180006, ...
    pub version_num: i32,
    /// `server_version`, for messages.
    pub version: String,
    /// A physical standby (in recovery).
    pub in_recovery: bool,
    pub wal_level: String,
    pub hot_standby_feedback: bool,
}

impl ServerInfo {
    pub fn major(&self) -> i32 {
        self.version_num / 10_000
    }
}

pub async fn server_info(client: &Client) -> Result<ServerInfo, SqlError> {
    let what = "reading the server version and settings";
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
                    pg_is_in_recovery(), current_setting('wal_level'), current_setting('hot_standby_feedback') = 'on'",
            &[],
        )
        .await
        .map_err(|e| SqlError::Statement { what, reason: describe(&e) })?;
    let err = |e: tokio_postgres::Error| SqlError::Statement { what, reason: describe(&e) };
    Ok(ServerInfo {
        version_num: row.try_get(0).map_err(err)?,
        version: row.try_get(1).map_err(err)?,
        in_recovery: row.try_get(2).map_err(err)?,
        wal_level: row.try_get(3).map_err(err)?,
        hot_standby_feedback: row.try_get(4).map_err(err)?,
    })
}

/// The slot query for a server of `version_num`. The WAL position is the replay position in
/// recovery: `pg_current_wal_lsn()` fails there ("recovery is in progress"), and a standby
/// decodes only what it replayed. CASE evaluates only the branch it takes, so one statement
/// serves a primary, a standby, and a standby promoted while the daemon runs.
fn slot_query(version_num: i32) -> String {
    let extra = if version_num >= 170_000 {
        "failover, synced, invalidation_reason"
    } else if version_num >= 160_000 {
        "false, false, CASE WHEN conflicting THEN 'conflicting' END"
    } else {
        "false, false, NULL::text"
    };
    format!(
        "SELECT plugin::text, slot_type = 'logical', database::text, active, wal_status, \
                pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint, \
                pg_wal_lsn_diff(w.lsn, confirmed_flush_lsn)::bigint, \
                pg_wal_lsn_diff(w.lsn, restart_lsn)::bigint, {extra} \
         FROM pg_replication_slots, \
              (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS lsn) w \
         WHERE slot_name = $1"
    )
}

pub async fn slot_status(client: &Client, slot: &str, version_num: i32) -> Result<Option<SlotStatus>, SqlError> {
    let what = "reading pg_replication_slots";
    let row = client
        .query_opt(&slot_query(version_num), &[&slot])
        .await
        .map_err(|e| SqlError::Statement { what, reason: describe(&e) })?;
    let Some(row) = row else { return Ok(None) };
    let get = |i: usize| -> Result<Option<String>, SqlError> {
        row.try_get(i).map_err(|e| SqlError::Statement { what, reason: describe(&e) })
    };
    let num = |i: usize| -> Result<Option<i64>, SqlError> {
        row.try_get(i).map_err(|e| SqlError::Statement { what, reason: describe(&e) })
    };
    let flag = |i: usize| row.try_get::<_, Option<bool>>(i).ok().flatten().unwrap_or(false);
    Ok(Some(SlotStatus {
        plugin: get(0)?,
        logical: flag(1),
        database: get(2)?,
        active: flag(3),
        wal_status: get(4)?,
        confirmed_flush: num(5)?.and_then(|v| u64::try_from(v).ok()),
        lag_bytes: num(6)?,
        retained_bytes: num(7)?,
        failover: flag(8),
        synced: flag(9),
        invalidation_reason: get(10)?,
    }))
}

/// Physical standbys streaming from this server now (`pg_stat_replication` rows of walsenders
/// that are not logical decoding sessions).
pub async fn standbys_attached(client: &Client) -> Result<i64, SqlError> {
    let what = "reading pg_stat_replication";
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_replication r \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.active_pid = r.pid AND s.slot_type = 'logical')",
            &[],
        )
        .await
        .map_err(|e| SqlError::Statement { what, reason: describe(&e) })?;
    row.try_get(0).map_err(|e| SqlError::Statement { what, reason: describe(&e) })
}

pub async fn publication_exists(client: &Client, publication: &str) -> Result<bool, SqlError> {
    client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map(|r| r.is_some())
        .map_err(|e| SqlError::Statement { what: "reading pg_publication", reason: describe(&e) })
}

/// Creates a pgoutput slot; `failover` (PostgreSQL 17+ only) makes it a failover slot.
pub async fn create_slot(client: &Client, slot: &str, failover: bool) -> Result<(), SqlError> {
    let statement = if failover {
        // (name, plugin, temporary, twophase, failover)
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    client
        .execute(statement, &[&slot])
        .await
        .map(|_| ())
        .map_err(|e| SqlError::Statement { what: "creating the replication slot", reason: describe(&e) })
}

/// `name` is validated by the config (letters, digits, underscores), so it can be spliced.
pub async fn create_publication(client: &Client, name: &str) -> Result<(), SqlError> {
    client
        .batch_execute(&format!("CREATE PUBLICATION {name} FOR ALL TABLES"))
        .await
        .map_err(|e| SqlError::Statement { what: "creating the publication", reason: describe(&e) })
}
