//! An in-process cache kept honest by cdc-invalidator's broadcast (`sinks.redis.broadcast`).
//!
//! [`LocalCache`] is a small LRU an application server keeps in front of Redis; [`run`]
//! subscribes to the broadcast channel and drops what each message names: keys, entries
//! registered under a tag, entries matching a pattern.
//!
//! Pub/sub is fire-and-forget: Redis hands a message to whoever is subscribed at that moment.
//! A message published while this process was disconnected is lost, so every time the
//! subscription is (re)established the whole local cache is cleared: whatever it held may
//! have been invalidated meanwhile. The daemon publishes only after its deletes are confirmed,
//! so after a message a read of Redis never returns the value just invalidated.
//!
//! (Tests include this file to exercise it against a real Redis: `tests/redis_signals.rs`.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

/// One broadcast message: `{"keys":[…],"tags":[…],"patterns":[…],"position":"…"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Invalidation {
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
    /// The batch's highest source position (commit LSN, or commit time in µs), as a string;
    /// `None` for a manual purge.
    #[serde(default)]
    pub position: Option<String>,
}

impl Invalidation {
    /// `None` for a payload that is not a broadcast message (another publisher on the channel).
    pub fn parse(payload: &[u8]) -> Option<Invalidation> {
        serde_json::from_slice(payload).ok()
    }
}

/// A least-recently-used cache of strings with tags, behind a mutex (shared by request handlers
/// and the subscriber).
pub struct LocalCache {
    inner: Mutex<Lru>,
}

struct Lru {
    capacity: usize,
    /// key → (value, tags, last use)
    entries: HashMap<String, (String, Vec<String>, u64)>,
    /// last use → key: the oldest first.
    order: BTreeMap<u64, String>,
    /// tag → keys cached under it.
    tagged: HashMap<String, HashSet<String>>,
    clock: u64,
    /// Messages applied and clears so far: a value read from Redis before a message arrived
    /// may be the one it invalidates, so it is not cached (see [`LocalCache::put`]).
    invalidations: u64,
}

impl Lru {
    fn remove(&mut self, key: &str) -> bool {
        let Some((_, tags, used)) = self.entries.remove(key) else { return false };
        self.order.remove(&used);
        for tag in tags {
            if let Some(keys) = self.tagged.get_mut(&tag) {
                keys.remove(key);
                if keys.is_empty() {
                    self.tagged.remove(&tag);
                }
            }
        }
        true
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

impl LocalCache {
    pub fn new(capacity: usize) -> LocalCache {
        let lru = Lru {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tagged: HashMap::new(),
            clock: 0,
            invalidations: 0,
        };
        LocalCache { inner: Mutex::new(lru) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let mut guard = self.lock();
        let lru = &mut *guard;
        let now = lru.tick();
        let (value, _, used) = lru.entries.get_mut(key)?;
        let (value, before) = (value.clone(), std::mem::replace(used, now));
        lru.order.remove(&before);
        lru.order.insert(now, key.to_string());
        Some(value)
    }

    /// Call before reading a value from Redis; hand the ticket to [`LocalCache::put`].
    pub fn ticket(&self) -> u64 {
        self.lock().invalidations
    }

    /// Caches `value` under `key`, registered under `tags` (as the application registers the
    /// Redis key under its tag sets), unless an invalidation arrived since `ticket` was taken:
    /// the value read may be the stale one that message was about. Returns whether it cached.
    pub fn put(&self, key: &str, value: &str, tags: &[&str], ticket: u64) -> bool {
        let mut lru = self.lock();
        if lru.invalidations != ticket {
            return false;
        }
        lru.remove(key);
        while lru.entries.len() >= lru.capacity {
            let Some((_, oldest)) = lru.order.pop_first() else { break };
            lru.remove(&oldest);
        }
        let now = lru.tick();
        let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        for tag in &tags {
            lru.tagged.entry(tag.clone()).or_default().insert(key.to_string());
        }
        lru.entries.insert(key.to_string(), (value.to_string(), tags, now));
        lru.order.insert(now, key.to_string());
        true
    }

    // Used by applications and the tests, not by the demonstration in `main.rs`.
    #[allow(dead_code)]
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    #[allow(dead_code)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        let mut lru = self.lock();
        lru.invalidations += 1;
        lru.entries.clear();
        lru.order.clear();
        lru.tagged.clear();
    }

    /// Drops everything `message` names; returns how many entries went.
    pub fn invalidate(&self, message: &Invalidation) -> usize {
        let mut lru = self.lock();
        lru.invalidations += 1;
        let mut dropped = 0;
        for key in &message.keys {
            dropped += usize::from(lru.remove(key));
        }
        for tag in &message.tags {
            let keys = lru.tagged.get(tag).cloned().unwrap_or_default();
            for key in keys {
                dropped += usize::from(lru.remove(&key));
            }
        }
        if !message.patterns.is_empty() {
            let matching: Vec<String> = lru
                .entries
                .keys()
                .filter(|k| message.patterns.iter().any(|p| glob_match(p.as_bytes(), k.as_bytes())))
                .cloned()
                .collect();
            for key in matching {
                dropped += usize::from(lru.remove(&key));
            }
        }
        dropped
    }
}

/// Redis's glob (`*`, `?`, `[abc]`, `[a-z]`, `[^a]`, `\x`), as `SCAN MATCH` reads a pattern.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| text.get(i..).is_some_and(|t| glob_match(rest, t))),
        Some((b'?', rest)) => text.split_first().is_some_and(|(_, t)| glob_match(rest, t)),
        Some((b'[', rest)) => {
            let Some((&c, t)) = text.split_first() else { return false };
            let (negate, mut class) = match rest.split_first() {
                Some((b'^', r)) => (true, r),
                _ => (false, rest),
            };
            let mut matched = false;
            loop {
                match class {
                    [] => return false, // an unclosed class matches nothing
                    [b']', after @ ..] => return matched != negate && glob_match(after, t),
                    [b'\\', x, after @ ..] => {
                        matched |= *x == c;
                        class = after;
                    }
                    [lo, b'-', hi, after @ ..] if *hi != b']' => {
                        matched |= (*lo.min(hi)..=*lo.max(hi)).contains(&c);
                        class = after;
                    }
                    [x, after @ ..] => {
                        matched |= *x == c;
                        class = after;
                    }
                }
            }
        }
        Some((b'\\', [x, rest @ ..])) => text.split_first().is_some_and(|(c, t)| c == x && glob_match(rest, t)),
        Some((x, rest)) => text.split_first().is_some_and(|(c, t)| c == x && glob_match(rest, t)),
    }
}

/// Where the broadcast comes from.
#[derive(Debug, Clone)]
pub enum Target {
    /// A standalone server (or a Sentinel-managed primary's address): `SUBSCRIBE`.
    Standalone(String),
    /// Redis Cluster seed nodes: `SSUBSCRIBE` (the daemon publishes with `SPUBLISH`).
    Cluster(Vec<String>),
}

/// What happened, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The subscription is (again) in place; the cache was cleared.
    Subscribed,
    /// The connection dropped; the cache was cleared (messages are lost until resubscribed).
    Lost,
    /// A message arrived and `dropped` entries were removed.
    Message { message: Invalidation, dropped: usize },
}

/// How often the connection is checked: a dropped one is noticed and remade within this.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// Subscribes to `channel` and keeps `cache` honest until the task is dropped. Reconnects (and
/// resubscribes) by itself; each (re)subscription and each loss clears the cache.
pub async fn run(
    target: Target,
    channel: String,
    cache: Arc<LocalCache>,
    events: Option<mpsc::UnboundedSender<Event>>,
) -> redis::RedisResult<()> {
    let (tx, mut pushes) = mpsc::unbounded_channel::<PushInfo>();
    let resp3 = |url: &str| -> redis::RedisResult<redis::ConnectionInfo> {
        let info = url.into_connection_info()?;
        let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        Ok(info.set_redis_settings(settings))
    };
    // Pushes (messages, confirmations, disconnections) arrive on `tx`; both clients
    // resubscribe by themselves after reconnecting.
    let mut keepalive: Box<dyn FnMut() -> futures::future::BoxFuture<'static, ()> + Send> = match &target {
        Target::Standalone(url) => {
            let client = redis::Client::open(resp3(url)?)?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_push_sender(tx)
                .set_automatic_resubscription()
                .set_response_timeout(Some(KEEPALIVE))
                .set_connection_timeout(Some(KEEPALIVE));
            let mut manager = client.get_connection_manager_with_config(config).await?;
            manager.subscribe(&channel).await?;
            Box::new(move || {
                let mut m = manager.clone();
                Box::pin(async move {
                    let _: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut m).await;
                })
            })
        }
        Target::Cluster(nodes) => {
            let nodes: Vec<redis::ConnectionInfo> = nodes.iter().map(|n| resp3(n)).collect::<Result<_, _>>()?;
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(tx)
                .connection_timeout(KEEPALIVE)
                .response_timeout(KEEPALIVE)
                .build()?;
            let mut connection = client.get_async_connection().await?;
            connection.ssubscribe(&channel).await?;
            Box::new(move || {
                let mut c = connection.clone();
                Box::pin(async move {
                    let _: redis::RedisResult<Value> = redis::cmd("PING").query_async(&mut c).await;
                })
            })
        }
    };
    let tell = |event: Event| {
        if let Some(events) = &events {
            let _ = events.send(event);
        }
    };
    let mut tick = tokio::time::interval(KEEPALIVE);
    loop {
        let push = tokio::select! {
            push = pushes.recv() => match push {
                Some(push) => push,
                None => return Ok(()),
            },
            // A PING through the client makes it notice a dead connection and reconnect.
            _ = tick.tick() => {
                keepalive().await;
                continue;
            }
        };
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                // data: [channel, payload]
                let payload = match push.data.as_slice() {
                    [_, Value::BulkString(payload)] => payload,
                    _ => continue,
                };
                let Some(message) = Invalidation::parse(payload) else { continue };
                let dropped = cache.invalidate(&message);
                tell(Event::Message { message, dropped });
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                // Anything cached before this moment may have missed a message.
                cache.clear();
                tell(Event::Subscribed);
            }
            PushKind::Disconnection => {
                cache.clear();
                tell(Event::Lost);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_redis_does() {
        for (p, t, want) in [
            ("product:42:*", "product:42:page", true),
            ("product:42:*", "product:420:page", false),
            ("product:?", "product:7", true),
            ("product:[0-9]", "product:7", true),
            ("product:[^0-9]", "product:7", false),
            ("product:4\\*", "product:4*", true),
            ("product:4\\*", "product:42", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), t.as_bytes()), want, "{p} ~ {t}");
        }
    }
}
