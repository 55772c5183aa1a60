//! `check`'s warnings about rules that will hurt a Redis Cluster target: what the templates
//! alone say about hash slots.
//!
//! What is and is not worth a warning (docs/design.md, "Hash tags"):
//! - **Tags across slots work**: a tag set's members may live in any slot. The fan-out moves a
//!   chunk of members, atomically, into a pending set in the tag set's own slot and unlinks them
//!   slot by slot from there (`fanout.rs`). So a tag and the keys it tracks need no common hash
//!   tag, and nothing about that is warned of.
//! - **A constant hash tag hurts**: a key template like `{{shop}}:product:{id}` renders
//!   `{shop}:product:42`, and Redis hashes only `shop`: every key of the template is in one
//!   slot, on one primary, which serves every delete of them (and holds them all in memory).
//!   The same for tag sets when the hash tag comes from `tag_prefix` or from the literal part
//!   of a tag template: every such tag set, its pending set and its fan-out script sit on one
//!   node. It still works, so this is a warning (exit code 0): an application may need those
//!   keys together for its own multi-key commands.
//! - Nothing else is decidable from the rules: a hash tag that holds a column spreads with the
//!   column's values, and one that a rendered value might open (a placeholder before the first
//!   literal `{`) cannot be judged.

use std::collections::BTreeSet;

use crate::config::{Config, RedisMode};
use crate::rules::{HashTag, Rules};
use crate::sink::ItemKind;

/// One sentence per template whose items all land in one hash slot of a cluster target.
pub fn warnings(config: &Config, rules: &Rules) -> Vec<String> {
    let Some(targets) = &config.sinks.redis else { return Vec::new() };
    // Sorted and deduplicated: two cluster targets with one tag_prefix warn once.
    let mut found = BTreeSet::new();
    for target in targets.iter().filter(|t| t.mode == RedisMode::Cluster) {
        for (rule, kind, template, tag) in rules.redis_hash_tags(&target.tag_prefix) {
            let HashTag::Constant(tag) = tag else { continue };
            found.insert(match kind {
                ItemKind::RedisTag => format!(
                    "rule {rule:?}: the Redis tag sets of {template:?} (with sinks.redis.tag_prefix {:?}) all have the hash tag {{{tag}}}, so in Redis Cluster they all share one slot and one primary runs every tag fan-out (a hot slot); tags need no shared slot with their keys, so drop the hash tag unless your application needs it",
                    target.tag_prefix
                ),
                _ => format!(
                    "rule {rule:?}: every Redis key of {template:?} has the hash tag {{{tag}}}, so in Redis Cluster they all share one slot and one primary serves every delete of them (a hot slot); put a column in the hash tag or drop it, unless your application needs these keys together"
                ),
            });
        }
    }
    found.into_iter().collect()
}
