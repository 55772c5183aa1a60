//! The warm-up signal (`sinks.redis.warm`): after a batch's deletes are confirmed, each
//! invalidated key is appended to a Redis stream with the table and op of the change that asked
//! for it, so a warmer (`examples/warmer/`) can refill hot keys before readers stampede the
//! database. The daemon itself never writes a cached value.
//!
//! - **What**: one entry per key of the batch's `keys` list (`XADD stream MAXLEN ~ maxlen *
//!   key K table T op O`); `op` is that of the batch's last event asking for the key, so a warmer
//!   can skip keys whose row is gone (`delete`, `truncate`). Keys the dependents cascade
//!   unlinked follow, each with the table and op of its root's event (a dependent is refilled
//!   because the row behind its root changed). Keys unlinked through tag fan-out are not
//!   listed: the server-side script removes them without naming them to the daemon, and a
//!   tag's members are rarely the hot keys a warmer exists for.
//! - **Bounded**: the stream is capped with `MAXLEN ~` (Redis trims whole macro-nodes, so it
//!   stays near `maxlen`, a little over at most), and a batch's XADDs go
//!   [`XADDS_PER_ROUND`] per round trip. In cluster mode the stream is one key in one slot:
//!   every XADD goes to that slot's primary.
//! - **Delivery**: at least once, like the deletes: a round that failed is sent again whole, so
//!   after a failure or a redelivery a key may appear twice (refilling twice is harmless). A
//!   second pass appends its keys again.
//! - **A stream key of another type** (`WRONGTYPE`): retrying cannot fix it, and it must not
//!   stop the daemon either, so every key not yet appended is a permanent rejection with the
//!   reason, and the events that asked for them are dead-lettered (after their deletes were
//!   confirmed: the caches are clean; only the warm-up signal is missing). Fix the key, then
//!   `replay` the dead letters.

use redis::Value;
use serde::Deserialize;

use super::connection::{item, CommandError};
use super::{Backend, RedisSink};
use crate::shutdown::Shutdown;
use crate::sink::origins::KeyOrigin;
use crate::sink::{Invalidations, ItemKind, Rejected, SinkError};
use crate::telemetry::events::sink_redis::WarmEntriesAdded;

/// XADD commands per round trip.
const XADDS_PER_ROUND: usize = 500;

/// `sinks.redis.warm`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WarmConfig {
    /// The stream's key.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// `MAXLEN ~`: about how many entries the stream keeps.
    #[serde(default = "default_maxlen")]
    pub maxlen: u64,
}

fn default_stream() -> String {
    "cdc-invalidator:warm".into()
}

fn default_maxlen() -> u64 {
    100_000
}

/// The largest `maxlen` accepted: a cap is there to bound memory.
const MAX_MAXLEN: u64 = 100_000_000;

impl WarmConfig {
    /// What is wrong with it: (field, sentence), for the config's file:line:col problems.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.stream.trim().is_empty() {
            problems.push(("stream", "warm.stream must not be empty".to_string()));
        }
        if self.maxlen == 0 || self.maxlen > MAX_MAXLEN {
            problems.push(("maxlen", format!("warm.maxlen must be between 1 and {MAX_MAXLEN}")));
        }
        problems
    }
}

/// One entry to append, and the batch item answerable for it (rejected if it cannot be).
#[derive(Debug, Clone, Copy)]
pub(super) struct WarmEntry<'a> {
    key: &'a str,
    origin: Option<&'a KeyOrigin>,
    item: (ItemKind, usize),
}

/// The entries of `batch`: its keys (when `own_keys`: the sink serving them tells them), then
/// the `dependents` a cascade unlinked (`(key, root index)`; a key already listed is not listed
/// twice), with the origin of their root.
pub(super) fn entries<'a>(
    batch: &'a Invalidations,
    own_keys: bool,
    dependents: &'a [(String, usize)],
) -> Vec<WarmEntry<'a>> {
    let origins = batch.origins();
    let keys = if own_keys { batch.items(ItemKind::RedisKey) } else { &[][..] };
    let roots = batch.items(ItemKind::RedisDependents);
    let listed: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    let own = keys.iter().enumerate().map(|(index, key)| WarmEntry {
        key,
        origin: origins.and_then(|o| o.key(key)),
        item: (ItemKind::RedisKey, index),
    });
    let cascaded = dependents.iter().filter(|(key, _)| !listed.contains(key.as_str())).map(|(key, root)| WarmEntry {
        key,
        origin: origins.zip(roots.get(*root)).and_then(|(o, root)| o.root(root)),
        item: (ItemKind::RedisDependents, *root),
    });
    own.chain(cascaded).collect()
}

/// How one round of XADDs ended.
enum Round {
    Added,
    /// The stream's key holds another type: the server's sentence.
    WrongType(String),
}

/// The server's sentence if `e` says the key holds another type.
fn wrong_type(e: &redis::RedisError) -> Option<String> {
    let text = e.to_string();
    (e.code() == Some("WRONGTYPE") || text.contains("WRONGTYPE")).then_some(text)
}

impl RedisSink {
    /// Appends every entry to the stream; returns the items rejected because the stream's key
    /// holds another type (each once).
    pub(super) async fn warm(
        &self,
        config: &WarmConfig,
        entries: &[WarmEntry<'_>],
        shutdown: &Shutdown,
    ) -> Result<Vec<Rejected>, SinkError> {
        let maxlen = config.maxlen.to_string();
        for (round, chunk) in entries.chunks(XADDS_PER_ROUND).enumerate() {
            let mut pipe = redis::pipe();
            // Each reply on its own: a WRONGTYPE is told apart from a failed round trip.
            pipe.ignore_errors();
            for entry in chunk {
                let (key, origin) = (entry.key, entry.origin);
                let (table, op) = origin.map_or(("", "unknown"), |o| (&*o.table, o.op));
                pipe.cmd("XADD")
                    .arg(&config.stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(&maxlen)
                    .arg("*")
                    .arg("key")
                    .arg(key)
                    .arg("table")
                    .arg(table)
                    .arg("op")
                    .arg(op);
            }
            let pipe = &pipe;
            let outcome = self
                .with_retries(shutdown, move || async move {
                    let replies = match self.one_slot_pipeline(pipe).await {
                        Ok(replies) => replies,
                        Err(CommandError::Redis(e)) => {
                            return wrong_type(&e).map(Round::WrongType).ok_or(CommandError::Redis(e))
                        }
                        Err(e) => return Err(e),
                    };
                    for reply in replies {
                        match item(reply) {
                            Ok(Value::BulkString(_) | Value::SimpleString(_)) => {}
                            Ok(other) => return Err(CommandError::UnexpectedReply(format!("XADD answered {other:?}"))),
                            Err(e) => match wrong_type(&e) {
                                Some(sentence) => return Ok(Round::WrongType(sentence)),
                                None => return Err(CommandError::Redis(e)),
                            },
                        }
                    }
                    Ok(Round::Added)
                })
                .await?;
            match outcome {
                Round::Added => self.telemetry.emit(WarmEntriesAdded { entries: chunk.len() as u64 }),
                Round::WrongType(sentence) => {
                    // The stream's name is configuration, not data: it may be logged.
                    tracing::error!(sink = %self.name, stream = %config.stream, "the warm-up stream's key holds another type: keys rejected (dead-lettered) until it is fixed");
                    let reason = format!(
                        "the warm-up stream {:?} (sinks.redis.warm.stream) is not a stream: {sentence}; the key was deleted, only its warm-up entry is missing",
                        config.stream
                    );
                    let mut items: Vec<(ItemKind, usize)> =
                        entries.iter().skip(round * XADDS_PER_ROUND).map(|e| e.item).collect();
                    items.sort_unstable();
                    items.dedup();
                    return Ok(items
                        .into_iter()
                        .map(|(kind, index)| Rejected { kind, index, reason: reason.clone() })
                        .collect());
                }
            }
        }
        Ok(Vec::new())
    }

    /// A pipeline whose keys share one slot, in one round trip.
    async fn one_slot_pipeline(&self, pipe: &redis::Pipeline) -> Result<Vec<Value>, CommandError> {
        match &self.backend {
            Backend::Single(connection) => connection.round_trip(pipe).await,
            Backend::Cluster(cluster) => cluster.pipeline(pipe).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let w: WarmConfig = serde_json::from_str("{}").unwrap();
        assert_eq!((w.stream.as_str(), w.maxlen), ("cdc-invalidator:warm", 100_000));
        assert!(w.problems().is_empty());
        let bad = WarmConfig { stream: "".into(), maxlen: 0 };
        let fields: Vec<&str> = bad.problems().iter().map(|p| p.0).collect();
        assert_eq!(fields, ["stream", "maxlen"]);
    }
}
