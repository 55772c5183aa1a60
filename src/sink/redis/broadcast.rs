//! The broadcast (`sinks.redis.broadcast`): after a batch's deletes are confirmed, one message
//! on a pub/sub channel, so processes holding in-memory copies (an LRU in every application
//! server) drop them too.
//!
//! - **When**: after every key is unlinked and every tag fanned out (and, with `wait_replicas`,
//!   replicated), never before: a subscriber that drops its copy and reads Redis again finds
//!   the key gone, not the stale value. A second pass publishes again.
//! - **How**: `PUBLISH channel body` on the connection the deletes used; in cluster mode
//!   `SPUBLISH` (a shard channel, Redis 7+: it stays within the channel's shard instead of
//!   crossing the whole cluster bus), subscribed to with `SSUBSCRIBE`.
//! - **The body**: `{"keys":[…],"tags":[…],"patterns":[…],"position":"…"}`: what the sink that
//!   publishes it did for the batch ([`Announcement`]), sorted, deduplicated, and the batch's
//!   highest source position as a decimal string ([`crate::sink::origins::position`]: the
//!   commit LSN, or the commit time in microseconds where there is no LSN; `null` when no event
//!   gave one, as for `purge`). The key sink lists its keys and the dependents its cascade
//!   unlinked, and its tags (a tag whose Redis key was not a set is still listed, since
//!   in-process copies under it may be stale all the same); the pattern sink, once its walks
//!   end, its patterns and the dependents of their matches. So a batch with patterns is told in
//!   two messages, each after what it names is gone.
//! - **Bounded**: at most [`MAX_KEYS_PER_MESSAGE`] keys a message; more are split between
//!   several messages.
//! - **Delivery**: pub/sub is fire-and-forget. The publish itself is part of the sink's work and
//!   is retried like a delete until Redis accepted it (a batch is not confirmed before that;
//!   after a crash the redelivered batch publishes again): at-least-once *to Redis*. Redis then
//!   hands the message to whoever is subscribed at that moment and to nobody else: a subscriber
//!   that was disconnected misses it. So a subscriber must clear its whole cache when it
//!   (re)subscribes (`examples/broadcast_subscriber/`), and at-least-once ends at the PUBLISH.

use redis::Value;
use serde::Deserialize;

use super::connection::CommandError;
use super::{Backend, RedisSink};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, SinkError};
use crate::telemetry::events::sink_redis::BroadcastSent;

/// `sinks.redis.broadcast`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BroadcastConfig {
    /// The pub/sub channel (a shard channel in cluster mode).
    #[serde(default = "default_channel")]
    pub channel: String,
}

fn default_channel() -> String {
    "cdc-invalidator".into()
}

impl BroadcastConfig {
    /// What is wrong with it: (field, sentence), for the config's file:line:col problems.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.channel.trim().is_empty() {
            problems.push(("channel", "broadcast.channel must not be empty".to_string()));
        }
        problems
    }
}

/// Keys one message lists at most. A batch whose keys (with the dependents its cascade unlinked)
/// are more is told in several messages, the keys split between them: Redis drops a subscriber
/// whose output buffer for pub/sub passes 32 MB (`client-output-buffer-limit pubsub`), and a
/// message of a million keys would be about that.
pub(super) const MAX_KEYS_PER_MESSAGE: usize = 10_000;

/// What one sink tells about one batch: the keys it unlinked by name (the batch's and its
/// cascade's), the tags it fanned out, the patterns it walked, and the batch's position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Announcement<'a> {
    /// Sorted, deduplicated.
    pub(super) keys: Vec<&'a str>,
    pub(super) tags: &'a [String],
    pub(super) patterns: &'a [String],
    pub(super) position: Option<u64>,
}

impl<'a> Announcement<'a> {
    /// `batch`'s items of the kinds a sink served, with `dependents` (the keys its cascade
    /// unlinked) among the keys.
    pub(super) fn of(
        batch: &'a Invalidations,
        kinds: &[ItemKind],
        dependents: impl IntoIterator<Item = &'a str>,
    ) -> Announcement<'a> {
        let served = |kind| if kinds.contains(&kind) { batch.items(kind) } else { &[][..] };
        let mut keys: Vec<&str> = served(ItemKind::RedisKey).iter().map(String::as_str).chain(dependents).collect();
        keys.sort_unstable();
        keys.dedup();
        Announcement {
            keys,
            tags: served(ItemKind::RedisTag),
            patterns: served(ItemKind::RedisPattern),
            position: batch.origins().and_then(|o| o.position),
        }
    }

    /// The messages: one, or with more than [`MAX_KEYS_PER_MESSAGE`] keys one per that many
    /// (the tags and patterns in the first, every one with the position); none when there is
    /// nothing to tell (the key sink's share of a batch of patterns and `pattern:` roots).
    pub(super) fn bodies(&self) -> Vec<String> {
        let mut chunks: Vec<&[&str]> = self.keys.chunks(MAX_KEYS_PER_MESSAGE).collect();
        if chunks.is_empty() && !(self.tags.is_empty() && self.patterns.is_empty()) {
            chunks.push(&[]);
        }
        let none: &[String] = &[];
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, keys)| {
                let (tags, patterns) = if i == 0 { (self.tags, self.patterns) } else { (none, none) };
                body(keys, tags, patterns, self.position)
            })
            .collect()
    }
}

/// One message's JSON (the contract's four fields, always all of them).
fn body(keys: &[&str], tags: &[String], patterns: &[String], position: Option<u64>) -> String {
    serde_json::json!({
        "keys": keys,
        "tags": tags,
        "patterns": patterns,
        "position": position.map(|p| p.to_string()),
    })
    .to_string()
}

impl RedisSink {
    /// Publishes `announcement` on `config.channel` (one message, or one per
    /// [`MAX_KEYS_PER_MESSAGE`] keys), each retried until Redis accepted it.
    pub(super) async fn broadcast(
        &self,
        config: &BroadcastConfig,
        announcement: &Announcement<'_>,
        shutdown: &Shutdown,
    ) -> Result<(), SinkError> {
        let command = if matches!(self.backend, Backend::Cluster(_)) { "SPUBLISH" } else { "PUBLISH" };
        for body in announcement.bodies() {
            let mut publish = redis::cmd(command);
            publish.arg(&config.channel).arg(&body);
            let publish = &publish;
            let receivers = self
                .with_retries(shutdown, move || async move {
                    match self.one_slot(publish).await? {
                        Value::Int(n) => Ok(n),
                        other => Err(CommandError::UnexpectedReply(format!("{command} answered {other:?}"))),
                    }
                })
                .await?;
            self.telemetry.emit(BroadcastSent { receivers });
        }
        Ok(())
    }

    /// One command in one round trip: on the connection, or in cluster mode to the primary of
    /// its key's (or shard channel's) slot.
    pub(super) async fn one_slot(&self, command: &redis::Cmd) -> Result<Value, CommandError> {
        match &self.backend {
            Backend::Single(connection) => {
                let mut pipe = redis::pipe();
                pipe.add_command(command.clone());
                let reply = connection.round_trip(&pipe).await?.pop();
                let reply = reply.ok_or_else(|| CommandError::UnexpectedReply("no reply".into()))?;
                super::connection::item(reply).map_err(CommandError::Redis)
            }
            Backend::Cluster(cluster) => cluster.command(command).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Origins;

    const KEY_SINK: [ItemKind; 2] = [ItemKind::RedisKey, ItemKind::RedisTag];

    fn parsed(a: &Announcement) -> Vec<serde_json::Value> {
        a.bodies().iter().map(|b| serde_json::from_str(b).unwrap()).collect()
    }

    #[test]
    fn the_body_lists_the_kinds_served_and_the_position_as_a_string() {
        let mut batch = Invalidations::of(ItemKind::RedisKey, vec!["product:42".into(), "product:42:page".into()])
            .with(ItemKind::RedisTag, vec!["category:5".into()])
            .with(ItemKind::RedisPattern, vec!["product:42:*".into()])
            .with(ItemKind::Url, vec!["https://x.example/".into()]);
        let plain = parsed(&Announcement::of(&batch, &KEY_SINK, ["home:page", "product:42"]));
        assert_eq!(
            plain,
            [
                serde_json::json!({"keys":["home:page","product:42","product:42:page"],"tags":["category:5"],"patterns":[],"position":null})
            ],
            "a dependent among the keys, once; the pattern left to the sink that walks it"
        );
        let walked = parsed(&Announcement::of(&batch, &[ItemKind::RedisPattern], []));
        assert_eq!(walked, [serde_json::json!({"keys":[],"tags":[],"patterns":["product:42:*"],"position":null})]);
        // A position beyond 2^53 (an LSN) stays exact: it travels as a string.
        batch.set_origins(Origins { position: Some(u64::MAX - 1), ..Origins::default() });
        let v = parsed(&Announcement::of(&batch, &KEY_SINK, []));
        assert_eq!(v[0]["position"], "18446744073709551614");
    }

    #[test]
    fn many_keys_are_split_between_messages_each_with_the_position() {
        let keys: Vec<String> = (0..MAX_KEYS_PER_MESSAGE * 2 + 1).map(|i| format!("k:{i:06}")).collect();
        let mut batch = Invalidations::of(ItemKind::RedisKey, keys).with(ItemKind::RedisTag, vec!["t".into()]);
        batch.set_origins(Origins { position: Some(7), ..Origins::default() });
        let messages = parsed(&Announcement::of(&batch, &KEY_SINK, []));
        let sizes: Vec<usize> = messages.iter().map(|m| m["keys"].as_array().unwrap().len()).collect();
        assert_eq!(sizes, [MAX_KEYS_PER_MESSAGE, MAX_KEYS_PER_MESSAGE, 1]);
        assert_eq!(messages[0]["tags"], serde_json::json!(["t"]));
        assert_eq!(messages[2]["tags"], serde_json::json!([]), "the tags once");
        assert!(messages.iter().all(|m| m["position"] == "7"));
        assert!(parsed(&Announcement::default()).is_empty(), "nothing to tell: no message");
        let tag = ["t".to_string()];
        let tags_only = Announcement { tags: &tag, ..Announcement::default() };
        assert_eq!(parsed(&tags_only).len(), 1);
    }

    #[test]
    fn an_empty_channel_is_a_problem() {
        let ok: BroadcastConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(ok.channel, "cdc-invalidator");
        assert!(ok.problems().is_empty());
        let bad = BroadcastConfig { channel: " ".into() };
        assert_eq!(bad.problems().len(), 1);
    }
}
