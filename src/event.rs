//! The one change-event type every source decodes into.
//!
//! A source (Debezium over Kafka, PostgreSQL logical replication) turns its wire format into a
//! [`Decoded`] value; the rules engine is a pure function from a [`ChangeEvent`] to the set of
//! keys, tags, surrogate keys and URLs to invalidate; sinks never see source formats.

use std::fmt;
use std::time::SystemTime;

/// A row image: column name to value.
///
/// Values keep their JSON shape (numbers, strings, booleans, null). Sources normalise
/// database-specific encodings before they get here (a Connect Decimal becomes a decimal string,
/// a PostgreSQL numeric too), so one rules file renders the same keys from either source.
///
/// A column that is *absent* is unknown (an unchanged TOASTed value, a key-only before image);
/// a column that is present with `null` is known to be null. Neither can render a template.
pub type Row = serde_json::Map<String, serde_json::Value>;

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// A snapshot read (Debezium `op: r`): the row existed when the connector started.
    Snapshot,
    /// Every row of the table went at once; no row images.
    Truncate,
}

impl Op {
    /// The spelling used in rules files, `explain` output and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Snapshot => "snapshot",
            Op::Truncate => "truncate",
        }
    }

    /// Parses the rules-file spelling.
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "insert" => Op::Insert,
            "update" => Op::Update,
            "delete" => Op::Delete,
            "snapshot" => Op::Snapshot,
            "truncate" => Op::Truncate,
            _ => return None,
        })
    }

    pub const ALL: [Op; 5] = [Op::Insert, Op::Update, Op::Delete, Op::Snapshot, Op::Truncate];
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One changed row (or one truncated table).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// `schema.table` (PostgreSQL, SQL Server) or `db.table` (MySQL/MariaDB).
    pub table: String,
    pub op: Op,
    /// The row before the change: present for updates and deletes when the database logs it
    /// (PostgreSQL REPLICA IDENTITY DEFAULT logs only the key columns, or nothing for an update
    /// that leaves the key alone).
    pub before: Option<Row>,
    /// The row after the change: present for inserts, updates and snapshot reads.
    pub after: Option<Row>,
    /// When the database committed the change: the origin of every staleness figure.
    /// `None` when the source does not say; the pipeline then falls back to the time the
    /// message was written to the log (Kafka timestamp) or received.
    pub committed_at: Option<SystemTime>,
    /// The change's position in the PostgreSQL WAL as Debezium's PostgreSQL connector writes
    /// it (`source.lsn`), whatever the encoding (JSON, Avro, Protobuf): what a second pass
    /// waits for read replicas to replay (`freshness`). `None` for other connectors and
    /// sources (the PostgreSQL source keeps its commit LSN in the event's position).
    pub lsn: Option<u64>,
}

impl ChangeEvent {
    /// The row images a template is rendered against, per the contract: `after` for inserts
    /// and snapshot reads, `before` for deletes, both for updates. Truncates have none.
    pub fn images(&self) -> impl Iterator<Item = &Row> {
        let (first, second) = match self.op {
            Op::Insert | Op::Snapshot => (self.after.as_ref(), None),
            Op::Delete => (self.before.as_ref(), None),
            Op::Update => (self.before.as_ref(), self.after.as_ref()),
            Op::Truncate => (None, None),
        };
        first.into_iter().chain(second)
    }
}

/// What one source message turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A row change (or truncate) to run through the rules.
    Change(ChangeEvent),
    /// A message that carries no row change: a tombstone, a heartbeat, a schema-change or
    /// transaction-boundary record. Nothing is invalidated, but it proves the source is alive
    /// and its position must still be acknowledged.
    NoChange(NoChange),
}

#[derive(Debug, Clone, PartialEq)]
pub struct NoChange {
    pub kind: NoChangeKind,
    /// The table it concerns, when known (a tombstone's topic names one).
    pub table: Option<String>,
    /// When the source produced it (a heartbeat's `ts_ms`), for liveness metrics.
    pub at: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoChangeKind {
    Tombstone,
    Heartbeat,
    /// Debezium `op: m` messages, schema-change and transaction metadata records.
    Other,
}

impl NoChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NoChangeKind::Tombstone => "tombstone",
            NoChangeKind::Heartbeat => "heartbeat",
            NoChangeKind::Other => "other",
        }
    }
}
