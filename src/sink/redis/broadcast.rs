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
//! - **The body**: `{"keys":[…],"tags":[…],"patterns":[…],"position":"…"}`: the batch's items of
//!   each kind (sorted, deduplicated; a tag whose Redis key was not a set is still listed, since
//!   in-process copies under it may be stale all the same) and its highest source position as a
//!   decimal string ([`crate::sink::origins::position`]: the commit LSN, or the commit time in
//!   microseconds where there is no LSN; `null` when no event gave one, as for `purge`).
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

/// The body's lists and the kind each is made of; `None`: a kind this build does not have, an
/// empty list (the contract's field is always there). One line per kind.
const LISTS: [(&str, Option<ItemKind>); 3] =
    [("keys", Some(ItemKind::RedisKey)), ("tags", Some(ItemKind::RedisTag)), ("patterns", None)];

/// The message for `batch`.
pub(super) fn body(batch: &Invalidations) -> String {
    let mut body = serde_json::Map::new();
    for (field, kind) in LISTS {
        let items = kind.map_or(&[][..], |k| batch.items(k));
        body.insert(field.into(), items.iter().map(|i| serde_json::Value::String(i.clone())).collect());
    }
    let position = batch.origins().and_then(|o| o.position);
    body.insert("position".into(), position.map_or(serde_json::Value::Null, |p| p.to_string().into()));
    serde_json::Value::Object(body).to_string()
}

impl RedisSink {
    /// Publishes `batch`'s message on `config.channel`, retried until Redis accepted it.
    pub(super) async fn broadcast(
        &self,
        config: &BroadcastConfig,
        batch: &Invalidations,
        shutdown: &Shutdown,
    ) -> Result<(), SinkError> {
        let body = body(batch);
        let command = if matches!(self.backend, Backend::Cluster(_)) { "SPUBLISH" } else { "PUBLISH" };
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
        self.metrics.redis_broadcasts.with_label_values(&[&self.name]).inc();
        self.metrics.redis_broadcast_receivers.with_label_values(&[&self.name]).set(receivers);
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

    #[test]
    fn the_body_lists_every_kind_and_the_position_as_a_string() {
        let mut batch = Invalidations::of(ItemKind::RedisKey, vec!["product:42".into(), "product:42:page".into()])
            .with(ItemKind::RedisTag, vec!["category:5".into()])
            .with(ItemKind::Url, vec!["https://x.example/".into()]);
        let plain: serde_json::Value = serde_json::from_str(&body(&batch)).unwrap();
        assert_eq!(
            plain,
            serde_json::json!({"keys":["product:42","product:42:page"],"tags":["category:5"],"patterns":[],"position":null})
        );
        // A position beyond 2^53 (an LSN) stays exact: it travels as a string.
        batch.set_origins(Origins { position: Some(u64::MAX - 1), ..Origins::default() });
        let v: serde_json::Value = serde_json::from_str(&body(&batch)).unwrap();
        assert_eq!(v["position"], "18446744073709551614");
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
