//! Patterns: `redis.patterns` globs, every matching key unlinked.
//!
//! # Never KEYS, never in the way
//!
//! Matches are found with `SCAN cursor MATCH pattern COUNT scan_count` (`KEYS` would block the
//! server for the whole keyspace), on the one server, or in a cluster on every primary, each to
//! the end of its own cursor. Each page of matches is unlinked as it comes (by slot in a
//! cluster, with WAIT like any other delete), so memory stays bounded by a page whatever the
//! pattern matches. SCAN returns every key present for the whole walk; a key written during the
//! walk may or may not be seen, which is the same race any invalidation has with a refill (the
//! second pass covers it).
//!
//! A walk over a big keyspace takes long, so patterns are served by their own sink,
//! [`PatternSink`], next to the target's [`RedisSink`] in layer 0: the layer gives every sink
//! its own task and queue, so keys, tags, generations and dependents keep flowing while a scan
//! runs (the key sink runs ahead by up to the layer's `queue_capacity` events). The units still
//! leave the layer in order, so an event is acknowledged only once its scan is done, and every
//! event behind it only after that: never early.
//!
//! # Bounded and coalesced
//!
//! - `scans_per_second`: SCAN calls over every pattern and primary of the target are paced to
//!   at most this many per second (one call every `1 / scans_per_second`), so a pattern costs
//!   Redis a bounded share of its time however big the keyspace.
//! - What queued behind a scan is merged into one batch by the layer, and the batch's patterns
//!   are deduplicated: a pattern asked for by a thousand events is walked once.
//! - A failed call starts that pattern's walk again from cursor 0 (a cursor means nothing to a
//!   restarted or promoted server); keys already unlinked are not found again.
//!
//! # Telling applications
//!
//! With `sinks.redis.broadcast`, this sink publishes its own message once every walk of a batch
//! (and the cascades from its matches) is done: `patterns` lists the batch's patterns, `keys`
//! the dependents unlinked (the key sink's message for the same batch has `patterns: []`, since
//! its deletes end earlier). A long walk's dependents are told as they pile up, a message's
//! worth at a time, so memory stays bounded; the message naming the pattern comes last. With
//! `sinks.redis.warm` the dependents are appended with their root's table and op; the matches
//! are not (a glob names no key to refill).
//!
//! Progress: `cdc_invalidator_redis_pattern_scans_in_flight`, `..._scan_calls_total`,
//! `..._pattern_keys_matched_total`, `..._pattern_keys_unlinked_total`, by sink (named
//! `<target>:patterns`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;

use super::broadcast::MAX_KEYS_PER_MESSAGE;
use super::cluster::Cluster;
use super::connection::{item, CommandError};
use super::dependents::Roots;
use super::{lock, text, Backend, RedisSink, RedisSinkError};
use crate::config::RedisConfig;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Rejected, Sink, SinkError, SinkReport};
use crate::telemetry::events::sink_redis::{
    PatternKeysMatched, PatternKeysUnlinked, PatternScanCalls, PatternWalkStarted,
};
use crate::telemetry::Metrics;

/// The Redis sink's twin that serves `redis.patterns` (and `pattern:` dependents) on its own
/// connection and task.
pub struct PatternSink {
    core: RedisSink,
    /// The earliest instant the next SCAN may go (the `scans_per_second` pace).
    next_scan: tokio::sync::Mutex<tokio::time::Instant>,
    interval: Duration,
}

/// Where one walk is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor {
    /// Standalone or Sentinel.
    Single(String),
    /// One primary of a cluster.
    Node { host: String, port: u16, cursor: String },
}

/// One pattern's walk over every primary.
#[derive(Debug, Default)]
struct Walk {
    started: bool,
    /// Cursors still to follow; empty once started: done.
    cursors: Vec<Cursor>,
}

impl Walk {
    fn is_done(&self) -> bool {
        self.started && self.cursors.is_empty()
    }

    fn restart(&mut self) {
        *self = Walk::default();
    }
}

impl PatternSink {
    /// The pattern sink of the Redis target `target` (its metrics label: `<target>:patterns`).
    pub fn new(target: &str, config: &RedisConfig, metrics: Arc<Metrics>) -> Result<PatternSink, RedisSinkError> {
        let core = RedisSink::new(&format!("{target}:patterns"), config, metrics)?;
        let interval = Duration::from_secs(1) / config.scans_per_second.max(1);
        Ok(PatternSink { core, next_scan: tokio::sync::Mutex::new(tokio::time::Instant::now()), interval })
    }

    /// Waits for the pace to allow `calls` more SCAN calls.
    async fn pace(&self, calls: u32) {
        let at = {
            let mut next = self.next_scan.lock().await;
            let now = tokio::time::Instant::now();
            let at = (*next).max(now);
            *next = at + self.interval * calls.max(1);
            at
        };
        tokio::time::sleep_until(at).await;
        self.core.telemetry.emit(PatternScanCalls { calls });
    }

    /// The next page of `pattern`'s walk: the keys it matched. A failure restarts the walk.
    async fn next_page(&self, pattern: &str, walk: &Mutex<Walk>) -> Result<Vec<String>, CommandError> {
        let result = match &self.core.backend {
            Backend::Single(connection) => {
                let cursor = match lock(walk).cursors.pop() {
                    Some(Cursor::Single(c)) => c,
                    _ => "0".to_string(),
                };
                self.pace(1).await;
                let mut pipe = redis::pipe();
                pipe.add_command(scan(&cursor, pattern, self.core.scan_count));
                let reply = connection.round_trip(&pipe).await.and_then(|replies| {
                    let first = replies.into_iter().next().ok_or_else(|| unexpected(&Value::Nil))?;
                    page(item(first).map_err(CommandError::Redis)?)
                });
                reply.map(|(next, keys)| {
                    let mut walk = lock(walk);
                    walk.started = true;
                    if next != "0" {
                        walk.cursors.push(Cursor::Single(next));
                    }
                    keys
                })
            }
            Backend::Cluster(cluster) => self.next_page_cluster(cluster, pattern, walk).await,
        };
        if result.is_err() {
            lock(walk).restart();
        }
        result
    }

    async fn next_page_cluster(
        &self,
        cluster: &Cluster,
        pattern: &str,
        walk: &Mutex<Walk>,
    ) -> Result<Vec<String>, CommandError> {
        let started = lock(walk).started;
        if !started {
            // The first page of every primary at once (the crate knows who the primaries are);
            // the pace is charged for each of them once they answered.
            self.pace(1).await;
            let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            let reply = cluster.route(scan("0", pattern, self.core.scan_count), all).await?;
            let Value::Map(per_node) = reply else { return Err(unexpected(&reply)) };
            if per_node.len() > 1 {
                self.pace(per_node.len() as u32 - 1).await;
            }
            let mut keys = Vec::new();
            let mut cursors = Vec::new();
            for (address, reply) in per_node {
                let (next, found) = page(item(reply).map_err(CommandError::Redis)?)?;
                keys.extend(found);
                if next != "0" {
                    let address = text(&address).unwrap_or_default();
                    let (host, port) = host_port(&address)?;
                    cursors.push(Cursor::Node { host, port, cursor: next });
                }
            }
            *lock(walk) = Walk { started: true, cursors };
            return Ok(keys);
        }
        let Some(Cursor::Node { host, port, cursor }) = lock(walk).cursors.pop() else { return Ok(Vec::new()) };
        self.pace(1).await;
        let at = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port });
        let reply = cluster.route(scan(&cursor, pattern, self.core.scan_count), at).await?;
        let (next, keys) = page(item(reply).map_err(CommandError::Redis)?)?;
        if next != "0" {
            lock(walk).cursors.push(Cursor::Node { host, port, cursor: next });
        }
        Ok(keys)
    }

    /// Walks `pattern` to the end, unlinking each page and, with a root, cascading to the
    /// dependents of what it unlinked (added to `dependents`, `(key, root index)`). Returns the
    /// root's rejections.
    async fn invalidate_pattern(
        &self,
        batch: &Invalidations,
        pattern: &str,
        root: Option<usize>,
        dependents: &mut Vec<(String, usize)>,
        shutdown: &Shutdown,
    ) -> Result<Vec<Rejected>, SinkError> {
        self.core.telemetry.emit(PatternWalkStarted);
        let walk = Mutex::new(Walk::default());
        let mut rejected = Vec::new();
        while !lock(&walk).is_done() {
            let walk = &walk;
            let keys = self.core.with_retries(shutdown, move || self.next_page(pattern, walk)).await?;
            if keys.is_empty() {
                continue;
            }
            self.core.telemetry.emit(PatternKeysMatched { keys: keys.len() as u64 });
            let unlinked = self.core.unlink_keys(&keys, shutdown).await?;
            self.core.telemetry.emit(PatternKeysUnlinked { keys: unlinked });
            if let Some(root) = root {
                let cascaded = self.core.cascade(vec![(root, keys)], shutdown).await?;
                for r in cascaded.rejected {
                    if !rejected.iter().any(|known: &Rejected| known.index == r.index) {
                        rejected.push(r);
                    }
                }
                dependents.extend(cascaded.unlinked);
                if dependents.len() >= MAX_KEYS_PER_MESSAGE {
                    // A long walk's dependents are told as they are unlinked, a message's worth
                    // at a time, rather than held until the walk ends: memory stays bounded.
                    let told = std::mem::take(dependents);
                    rejected.extend(self.core.tell(batch, &[], &told, shutdown).await?);
                }
            }
        }
        Ok(rejected)
    }
}

/// `SCAN cursor MATCH pattern COUNT count`.
fn scan(cursor: &str, pattern: &str, count: usize) -> redis::Cmd {
    let mut c = redis::cmd("SCAN");
    c.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count);
    c
}

/// A SCAN reply: the next cursor and the keys.
pub(super) fn page(reply: Value) -> Result<(String, Vec<String>), CommandError> {
    match &reply {
        Value::Array(fields) => match fields.as_slice() {
            [cursor, Value::Array(keys)] => {
                Ok((text(cursor).unwrap_or_else(|| "0".into()), keys.iter().filter_map(text).collect()))
            }
            _ => Err(unexpected(&reply)),
        },
        _ => Err(unexpected(&reply)),
    }
}

/// `host:port` of a cluster node as the client names it.
pub(super) fn host_port(address: &str) -> Result<(String, u16), CommandError> {
    address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
        .ok_or_else(|| CommandError::UnexpectedReply(format!("a node address {address:?}")))
}

fn unexpected(reply: &Value) -> CommandError {
    CommandError::UnexpectedReply(format!("SCAN answered {reply:?}"))
}

#[async_trait]
impl Sink for PatternSink {
    fn name(&self) -> &str {
        &self.core.name
    }

    fn kinds(&self) -> &'static [ItemKind] {
        &[ItemKind::RedisPattern, ItemKind::RedisDependents]
    }

    async fn invalidate(&self, batch: &Invalidations, shutdown: &Shutdown) -> Result<SinkReport, SinkError> {
        let mut report = SinkReport::default();
        let patterns = batch.items(ItemKind::RedisPattern);
        if patterns.is_empty() {
            return Ok(report);
        }
        let roots = Roots::of(batch).patterns();
        let in_flight = self.core.telemetry.pattern_scans_in_flight();
        in_flight.set(patterns.len() as i64);
        let mut rejected = Vec::new();
        let mut dependents = Vec::new();
        for pattern in patterns {
            let root = roots.get(pattern.as_str()).copied();
            let result = self.invalidate_pattern(batch, pattern, root, &mut dependents, shutdown).await;
            in_flight.dec();
            match result {
                Ok(r) => rejected.extend(r),
                Err(e) => {
                    in_flight.set(0);
                    return Err(e);
                }
            }
        }
        report.confirmed.push((ItemKind::RedisPattern, patterns.len() as u64));
        if !roots.is_empty() {
            report.confirmed.push((ItemKind::RedisDependents, roots.len().saturating_sub(rejected.len()) as u64));
        }
        // Every walk is done (and its cascade): only now may applications hear of the patterns,
        // on the same channel as the key sink's message for the same batch (which lists the
        // keys and tags, not the patterns).
        dependents.sort_unstable();
        dependents.dedup_by(|a, b| a.0 == b.0);
        rejected.extend(self.core.tell(batch, &[ItemKind::RedisPattern], &dependents, shutdown).await?);
        report.rejected = super::once_each(rejected);
        Ok(report)
    }

    fn wants_origins(&self) -> bool {
        self.core.wants_origins()
    }

    async fn ping(&self) -> bool {
        self.core.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_pages_and_node_addresses_are_read_and_nonsense_is_an_error() {
        let reply = Value::Array(vec![
            Value::BulkString(b"17".to_vec()),
            Value::Array(vec![Value::BulkString(b"product:4:a".to_vec())]),
        ]);
        assert_eq!(page(reply).unwrap(), ("17".to_string(), vec!["product:4:a".to_string()]));
        assert!(page(Value::Okay).is_err());
        assert_eq!(host_port("127.0.0.1:7001").unwrap(), ("127.0.0.1".to_string(), 7001));
        assert!(host_port("nonsense").is_err());
    }

    #[test]
    fn a_walk_is_done_once_started_without_cursors_and_restarts_from_zero() {
        let mut walk = Walk::default();
        assert!(!walk.is_done());
        walk.started = true;
        walk.cursors.push(Cursor::Single("5".into()));
        assert!(!walk.is_done());
        walk.restart();
        assert!(!walk.started && walk.cursors.is_empty());
    }
}
