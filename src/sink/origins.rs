//! Where a batch's items came from: what a sink needs to tell applications about a batch, beyond
//! the items themselves (the Redis broadcast carries the batch's position, the warm-up stream
//! each key's table and op).
//!
//! The pipeline works on deduplicated item lists and keeps the events beside them, so this is
//! gathered from the events, once per batch, only in a layer whose sinks ask for it
//! ([`crate::sink::Sink::wants_origins`]): the common path (no broadcast, no warm-up stream) pays
//! nothing. Its size is bounded by the batch's (one entry per distinct key).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::event::Decoded;
use crate::sink::{Invalidations, ItemKind};
use crate::source::SourceEvent;

/// The table and op of the change that asked for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOrigin {
    /// `schema.table` as the event names it (shared by the keys of one table).
    pub table: Arc<str>,
    /// `insert`, `update`, `delete`, `snapshot`, `truncate`, or `purge` for
    /// `cdc-invalidator purge`.
    pub op: &'static str,
}

/// A batch's origins. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins {
    /// The batch's highest [`position`] (`None`: no event said, as for a manual purge).
    pub position: Option<u64>,
    /// Each Redis key of the batch: the table and op of the *last* event that asked for it
    /// (a warmer should not refill a row the batch ends by deleting).
    pub keys: HashMap<String, KeyOrigin>,
    /// Each dependents root of the batch (`key:K`, `tag:T`, `pattern:P`, as in its
    /// [`ItemKind::RedisDependents`] list): the table and op of the last event that asked for
    /// it, which the keys its cascade unlinks inherit in the warm-up stream.
    pub roots: HashMap<String, KeyOrigin>,
}

/// An event's position as one number that grows with the source's order: the commit LSN
/// (pgoutput's commit record, or Debezium's `source.lsn`), else the commit time in microseconds
/// since the Unix epoch (MySQL, SQL Server, MongoDB). The broadcast's `position` is this number
/// in decimal, so an application can compare it with what it read. One deployment reads one kind
/// of source, so the two scales are never compared.
pub fn position(event: &SourceEvent) -> Option<u64> {
    crate::freshness::commit_lsn(event).or_else(|| {
        let committed = match &event.decoded {
            Ok(Decoded::Change(c)) => c.committed_at?,
            _ => return None,
        };
        u64::try_from(committed.duration_since(UNIX_EPOCH).ok()?.as_micros()).ok()
    })
}

impl Origins {
    /// The origins of a batch: its events, each with what the rules made of it, in order.
    pub fn of<'a>(events: impl IntoIterator<Item = (&'a SourceEvent, &'a Invalidations)>) -> Origins {
        let mut origins = Origins::default();
        // One `Arc` per table, not per key.
        let mut tables: HashMap<&str, Arc<str>> = HashMap::new();
        for (event, asked) in events {
            if asked.is_empty() {
                continue;
            }
            let Ok(Decoded::Change(change)) = &event.decoded else { continue };
            origins.position = origins.position.max(position(event));
            let (keys, roots) = (asked.items(ItemKind::RedisKey), asked.items(ItemKind::RedisDependents));
            if keys.is_empty() && roots.is_empty() {
                continue;
            }
            let table = tables.entry(change.table.as_str()).or_insert_with(|| Arc::from(change.table.as_str())).clone();
            let origin = KeyOrigin { table, op: change.op.as_str() };
            for key in keys {
                origins.keys.insert(key.clone(), origin.clone());
            }
            for root in roots {
                origins.roots.insert(root.clone(), origin.clone());
            }
        }
        origins
    }

    /// Origins for the keys (and dependents roots) an operator purges by hand: table `""`, op
    /// `purge`, no position.
    pub fn manual(items: &Invalidations) -> Origins {
        let origin = KeyOrigin { table: Arc::from(""), op: "purge" };
        let each = |kind| items.items(kind).iter().map(|k: &String| (k.clone(), origin.clone())).collect();
        Origins { position: None, keys: each(ItemKind::RedisKey), roots: each(ItemKind::RedisDependents) }
    }

    /// Where `key` came from, if known.
    pub fn key(&self, key: &str) -> Option<&KeyOrigin> {
        self.keys.get(key)
    }

    /// Where the dependents root `root` (`key:K`, `tag:T`, `pattern:P`) came from, if known.
    pub fn root(&self, root: &str) -> Option<&KeyOrigin> {
        self.roots.get(root)
    }

    /// The origins of batches merged in order: the highest position, and for a key asked for
    /// by several, the later batch's origin.
    pub fn merge<'a>(all: impl IntoIterator<Item = &'a Origins>) -> Origins {
        let mut merged = Origins::default();
        for o in all {
            merged.position = merged.position.max(o.position);
            merged.keys.extend(o.keys.iter().map(|(k, v)| (k.clone(), v.clone())));
            merged.roots.extend(o.roots.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime};

    use super::*;
    use crate::event::{ChangeEvent, Op};
    use crate::source::{Ack, Position, RawMessage};

    fn event(table: &str, op: Op, position: Position, committed_us: Option<u64>) -> SourceEvent {
        SourceEvent {
            position,
            decoded: Ok(Decoded::Change(ChangeEvent {
                table: table.into(),
                op,
                before: None,
                after: None,
                committed_at: committed_us.map(|us| UNIX_EPOCH + Duration::from_micros(us)),
                lsn: None,
            })),
            raw: RawMessage::default(),
            logged_at: Some(SystemTime::now()),
            received: Instant::now(),
            ack: Ack::detached(),
        }
    }

    fn keys(k: &[&str]) -> Invalidations {
        Invalidations::of(ItemKind::RedisKey, k.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn the_position_is_the_commit_lsn_or_else_the_commit_time_in_microseconds() {
        let pg = event("public.p", Op::Update, Position::Postgres { lsn: 10, commit_end_lsn: 42 }, Some(7));
        assert_eq!(position(&pg), Some(42), "the commit LSN wins over the commit time");
        let kafka = Position::Kafka { topic: "t".into(), partition: 0, offset: 9 };
        let mysql = event("shop.p", Op::Insert, kafka.clone(), Some(1_700_000_000_123_456));
        assert_eq!(position(&mysql), Some(1_700_000_000_123_456));
        assert_eq!(position(&event("shop.p", Op::Insert, kafka, None)), None, "the Kafka offset is no position");
    }

    #[test]
    fn each_key_keeps_the_last_event_that_asked_for_it_and_the_batch_its_highest_position() {
        let first = event("public.p", Op::Update, Position::Postgres { lsn: 1, commit_end_lsn: 50 }, None);
        let second = event("public.p", Op::Delete, Position::Postgres { lsn: 2, commit_end_lsn: 90 }, None);
        let third = event("public.c", Op::Insert, Position::Postgres { lsn: 3, commit_end_lsn: 70 }, None);
        let (a, b, c) = (keys(&["p:1", "p:2"]), keys(&["p:1"]), keys(&["c:1"]));
        let origins = Origins::of([(&first, &a), (&second, &b), (&third, &c)]);
        assert_eq!(origins.position, Some(90));
        assert_eq!(origins.key("p:1").map(|o| (&*o.table, o.op)), Some(("public.p", "delete")));
        assert_eq!(origins.key("p:2").map(|o| (&*o.table, o.op)), Some(("public.p", "update")));
        assert_eq!(origins.key("c:1").map(|o| (&*o.table, o.op)), Some(("public.c", "insert")));
        let later = Origins::of([(&first, &keys(&["c:1"]))]);
        let merged = Origins::merge([&origins, &later]);
        assert_eq!(merged.position, Some(90), "the highest, whatever the order");
        assert_eq!(merged.key("c:1").map(|o| o.op), Some("update"), "the later batch's origin");
    }

    #[test]
    fn each_dependents_root_keeps_the_event_that_asked_for_it() {
        let first = event("public.p", Op::Update, Position::Postgres { lsn: 1, commit_end_lsn: 50 }, None);
        let second = event("public.c", Op::Delete, Position::Postgres { lsn: 2, commit_end_lsn: 60 }, None);
        let (a, b) = (
            Invalidations::of(ItemKind::RedisDependents, vec!["key:p:1".into(), "pattern:p:1:*".into()]),
            Invalidations::of(ItemKind::RedisDependents, vec!["pattern:p:1:*".into()]),
        );
        let origins = Origins::of([(&first, &a), (&second, &b)]);
        assert_eq!(origins.root("key:p:1").map(|o| (&*o.table, o.op)), Some(("public.p", "update")));
        assert_eq!(origins.root("pattern:p:1:*").map(|o| (&*o.table, o.op)), Some(("public.c", "delete")));
        assert!(origins.key("p:1").is_none(), "a root is not a key of the batch");
        let manual = Origins::manual(&a.with(ItemKind::RedisKey, vec!["k".into()]));
        assert_eq!(manual.root("key:p:1").map(|o| (&*o.table, o.op)), Some(("", "purge")));
        assert_eq!(manual.key("k").map(|o| o.op), Some("purge"));
    }
}
