//! Sinks: where invalidations go.
//!
//! # The sink contract
//!
//! A sink receives one [`Invalidations`] set per batch, already deduplicated across every event
//! of the batch, and must:
//!
//! - **only delete**: UNLINK, purge, ban. A sink never writes a cached value, because a delete is
//!   safe to repeat and a write is not;
//! - **be idempotent**: the same batch may arrive again (after a crash, a rebalance or a
//!   retry), and doing it twice must be harmless;
//! - **retry transient failures itself** (through [`crate::retry`]), for as long as it takes,
//!   until shutdown abandons the work: while its cache is unreachable, `invalidate` simply does
//!   not return, the pipeline's bounded queues fill, and the source stops reading. Nothing is
//!   acknowledged and nothing is dropped;
//! - **say when it is done**: `invalidate` returns `Ok` only once every item is confirmed by the
//!   cache, or permanently rejected (reported in [`SinkReport::rejected`], which the pipeline
//!   dead-letters). Only then may the source position move past the batch's events.
//!
//! Delivery is therefore at-least-once; idempotent deletes make it effectively-once.

use std::fmt;

use async_trait::async_trait;

use crate::shutdown::Shutdown;

pub mod cdn;
pub mod redis;

/// What one batch asks of the sinks. Each list is deduplicated; each sink takes the kinds it
/// serves (Redis: keys and tags; HTTP caches and CDNs: surrogate keys and URLs) and ignores
/// the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invalidations {
    pub redis_keys: Vec<String>,
    pub redis_tags: Vec<String>,
    pub surrogate_keys: Vec<String>,
    pub urls: Vec<String>,
}

impl Invalidations {
    pub fn is_empty(&self) -> bool {
        self.redis_keys.is_empty()
            && self.redis_tags.is_empty()
            && self.surrogate_keys.is_empty()
            && self.urls.is_empty()
    }

    /// The union of `sets`, each list deduplicated and sorted (how a batch's events, and a
    /// layer's queued batches, become one set).
    pub fn union<'a>(sets: impl IntoIterator<Item = &'a Invalidations>) -> Invalidations {
        let sets: Vec<&Invalidations> = sets.into_iter().collect();
        let mut all = Invalidations::default();
        for kind in ItemKind::ALL {
            // Borrowed while deduplicating: only the distinct items are copied.
            let mut items: Vec<&str> = sets.iter().flat_map(|s| s.items(kind)).map(String::as_str).collect();
            items.sort_unstable();
            items.dedup();
            *all.items_mut(kind) = items.into_iter().map(str::to_owned).collect();
        }
        all
    }

    /// The items of one kind.
    pub fn items(&self, kind: ItemKind) -> &[String] {
        match kind {
            ItemKind::RedisKey => &self.redis_keys,
            ItemKind::RedisTag => &self.redis_tags,
            ItemKind::SurrogateKey => &self.surrogate_keys,
            ItemKind::Url => &self.urls,
        }
    }
}

impl Invalidations {
    fn items_mut(&mut self, kind: ItemKind) -> &mut Vec<String> {
        match kind {
            ItemKind::RedisKey => &mut self.redis_keys,
            ItemKind::RedisTag => &mut self.redis_tags,
            ItemKind::SurrogateKey => &mut self.surrogate_keys,
            ItemKind::Url => &mut self.urls,
        }
    }
}

/// The kinds of thing a rule can invalidate; also the `kind` label of invalidation metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemKind {
    RedisKey,
    RedisTag,
    SurrogateKey,
    Url,
}

impl ItemKind {
    pub const ALL: [ItemKind; 4] = [ItemKind::RedisKey, ItemKind::RedisTag, ItemKind::SurrogateKey, ItemKind::Url];

    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::RedisKey => "key",
            ItemKind::RedisTag => "tag",
            ItemKind::SurrogateKey => "surrogate_key",
            ItemKind::Url => "url",
        }
    }
}

impl fmt::Display for ItemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One item a sink refused for good (a 400 from a CDN, a key over the provider's size): the
/// pipeline dead-letters every event that asked for it, with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub kind: ItemKind,
    /// Index into the batch's list of that kind.
    pub index: usize,
    pub reason: String,
}

/// What a sink did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkReport {
    /// Items confirmed, by kind (for metrics). Rejected items are not counted here.
    pub confirmed: Vec<(ItemKind, u64)>,
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Shutdown abandoned the batch while the sink was still retrying: nothing may be
    /// acknowledged.
    #[error("abandoned at shutdown")]
    Abandoned,
    /// The sink cannot work at all (bad configuration discovered at run time): fatal.
    #[error("{0}")]
    Fatal(String),
}

/// A cache that can be told to forget things. See the module docs for the contract.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The configured name: a metric label and a log field.
    fn name(&self) -> &str;

    /// The kinds of item this sink serves; the pipeline skips it for batches with none of them
    /// and measures its staleness only over events that asked it for something.
    fn kinds(&self) -> &'static [ItemKind] {
        &ItemKind::ALL
    }

    /// Invalidates every item of the kinds this sink serves. Returns once each item is confirmed
    /// or permanently rejected; retries everything else until `shutdown` abandons the work.
    async fn invalidate(&self, batch: &Invalidations, shutdown: &Shutdown) -> Result<SinkReport, SinkError>;

    /// Whether the cache answers right now (for `/readyz`). Must return within a few seconds.
    async fn ping(&self) -> bool;
}
