//! The Redis sink: UNLINK keys, fan out tags, advance generations, cascade to dependents; and
//! its twin for patterns.
//!
//! - **Keys** are unlinked `unlink_batch` per `UNLINK` command, several commands pipelined per
//!   round trip; outside a cluster, a batch that also has tags sends them (when one round trip
//!   holds them) in its tag fan-out's first round trip, ahead of the script call, which Redis
//!   runs after them as before: one round trip per batch instead of two.
//! - **Tags** are fanned out by a server-side script, `tag_chunk` members per tag and call, one
//!   call (one round trip, one string back) for many tags: see `fanout.rs` for how and why.
//! - **Generations** (`generation.rs`): a script per key sets it to the event's position when
//!   higher. **Dependents** (`dependents.rs`): the tag fan-out again, over `<dep_prefix>KEY`
//!   sets, level by level. **Patterns** (`pattern.rs`): `SCAN ... MATCH` on every primary, served
//!   by [`PatternSink`] on its own task so a long walk never holds the rest.
//! - **Failures** are retried through [`crate::retry`] with `sinks.redis.retry` until they pass
//!   or shutdown abandons the batch; work already confirmed is not redone, the round trip that
//!   failed is sent again whole (deletes are idempotent). A wrong password or a missing ACL
//!   permission is retried too, since the fix is usually deployed on the server while we wait,
//!   but it is logged as an error and counted as `class="permanent"`. Errors that retrying cannot
//!   fix (an unknown command, a reply we do not understand) fail the sink.
//! - **Connections** are made on first use, so the daemon starts while Redis is down; each
//!   connect is bounded by `connect_timeout` and each round trip by `response_timeout`, and a
//!   failed round trip always dials again (see `connection.rs`).
//!
//! Nothing here ever writes a cached value: the only commands sent are UNLINK, PING, SCAN
//! (patterns), SCRIPT LOAD and EVALSHA of the generation script (GET and SET of a generation
//! key, only ever to a higher position) and of the fan-out script (which runs EXISTS, SCARD, TYPE,
//! SRANDMEMBER, SSCAN, SREM and UNLINK, or in cluster mode SADD to a pending set instead of
//! UNLINK and no EXISTS), WAIT and ROLE (with
//! `wait_replicas`), and in cluster mode SREM, SRANDMEMBER and SCAN on pending sets and CLUSTER
//! SLOTS; with `broadcast` PUBLISH (SPUBLISH in cluster mode, `broadcast.rs`), with `warm`
//! XADD to the warm-up stream (`warm.rs`), both only after the batch's deletes are confirmed.
//! The only things changed are tag sets and pending sets (members moved or removed), the keys
//! unlinked, and the warm-up stream (entries appended).
//!
//! # Deployments (`sinks.redis.mode`)
//!
//! - **standalone**: one connection to `url` (`connection.rs`). A Redis Cluster node behind it
//!   is refused before start (`preflight.rs`) and, if it slips through, on the first `MOVED`,
//!   with a sentence saying to set `mode: cluster`.
//! - **sentinel**: the same connection, but each dial asks the sentinels for the current
//!   primary; after a failover the old primary fails a round trip (`READONLY`, or no answer),
//!   the connection is discarded, and the next dial reaches the promoted replica.
//! - **cluster** (`cluster.rs`): the `redis` crate's cluster client routes, follows `MOVED`/`ASK`
//!   and refreshes the slot map. Keys are grouped by hash slot; each slot's UNLINKs go as one
//!   pipeline, and all slots' pipelines are sent at once, so the client's one connection per
//!   primary carries them back to back (pipelined per node). A slot whose pipeline failed is
//!   sent again; the others are not. Tags fan out through a pending set in the tag's slot
//!   (`fanout.rs`).
//!
//! # Replication (`wait_replicas`)
//!
//! Redis replicates asynchronously: a delete the primary confirmed but had not yet passed on is
//! lost when that replica is promoted, and the stale value comes back. With `wait_replicas`
//! every round trip that deletes ends with `WAIT count timeout` *in the same pipeline*, so it
//! runs on the same connection, right after those deletes: a round counts as done only once
//! `count` replicas hold its deletes, and a WAIT that falls short fails the round, which is
//! sent again whole (to whichever node holds the slot by then). The pipeline also asks `ROLE`:
//! a primary with fewer replicas connected than `count` (none, right after its own promotion)
//! is waited for by all it has, since a replica that is not there can neither be read nor be
//! promoted. In cluster mode this is on by default (`count: 1, timeout: 1s`): a failover must
//! lose nothing. `count: 0` turns it off.
//!
//! Logs and metric labels carry the sink name, error codes and counts; never the URL (it may
//! hold a password) nor a key.

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use futures::stream::{FuturesOrdered, StreamExt};
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;

use crate::config::{RedisConfig, RedisMode, WaitReplicas};
use crate::retry::{RetryError, RetryPolicy, Verdict};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Rejected, Sink, SinkError, SinkReport};
use crate::telemetry::events::sink::Probed;
use crate::telemetry::events::sink_redis::{CommandFailed, CommandRetried, CommandSucceeded, RedisCounters};
use crate::telemetry::Metrics;

pub mod broadcast;
mod cluster;
pub mod config;
mod connection;
pub mod dependents;
mod endpoints;
mod fanout;
pub mod generation;
pub mod hash_tags;
mod pattern;
pub mod preflight;
mod slot;
pub mod warm;

pub use pattern::PatternSink;

use cluster::{cluster_error, Cluster};
use connection::{item, Class, CommandError, Connection, Dialer};
use fanout::Fanout;

/// UNLINK commands per round trip (with the default `unlink_batch`, 16k keys).
const UNLINKS_PER_ROUND: usize = 32;

/// The readiness probe's bound on connecting and on the PING reply, each.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Cluster mode: slot pipelines (or script calls) in flight at once. The client queues them
/// per primary, so this bounds memory, not parallelism per node.
const CLUSTER_IN_FLIGHT: usize = 256;

/// Cluster mode without `wait_replicas`: a failover must not bring deleted keys back.
const CLUSTER_DEFAULT_WAIT: WaitReplicas = WaitReplicas { count: 1, timeout: Duration::from_secs(1) };

/// Pending-set members read and finished per call of the start-up recovery.
const RECOVERY_PAGE: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
}

/// Where round trips go.
enum Backend {
    /// Standalone or Sentinel: one connection at a time.
    Single(Connection),
    Cluster(Cluster),
}

pub struct RedisSink {
    name: String,
    backend: Backend,
    tag_prefix: String,
    unlink_batch: usize,
    tag_chunk: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
    retry: RetryPolicy,
    script: redis::Script,
    /// `WAIT` after each deleting round trip (module docs); `None` when off.
    wait: Option<WaitReplicas>,
    /// Cluster mode: pending sets left by an earlier run have been finished.
    recovered: AtomicBool,
    /// Replicas connected to the primary of each slot (one entry outside a cluster), as `ROLE`
    /// last said; `wait.count` until it has said anything.
    replicas: Vec<AtomicU32>,
    /// What this sink reports, its series resolved once (commands report per round trip).
    telemetry: RedisCounters,
    /// Ends the backoff of waiting retries when the health probe sees Redis answer again
    /// after a failure (`down`), so a backlog restarts at once, not up to `retry.max` later.
    recovery: crate::retry::Recovery,
    down: std::sync::atomic::AtomicBool,
    /// `redis.dependents`: `dep_prefix` and `dependents_depth`.
    dep_prefix: String,
    dependents_depth: u32,
    /// `redis.generations`: the script, and whether the server(s) have it (SCRIPT LOAD).
    generation: generation::GenerationScript,
    /// `redis.patterns`: SCAN's COUNT.
    scan_count: usize,
    /// `sinks.redis.broadcast`: a message per batch after its deletes (`broadcast.rs`).
    broadcast: Option<broadcast::BroadcastConfig>,
    /// `sinks.redis.warm`: each key appended to a stream after its delete (`warm.rs`).
    warm: Option<warm::WarmConfig>,
}

/// Which sets a fan-out empties: tag sets, or (the dependents cascade) dependency sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sets {
    Tags,
    Dependents,
}

/// What [`RedisSink::add_wait`] added to a pipeline.
#[derive(Debug, Clone, Copy)]
struct WaitPlan {
    slot: u16,
    /// Replicas asked for; 0: no WAIT, only ROLE.
    count: u32,
}

/// A client's URL error in words that never quote the URL (it may hold a password).
fn url_error(e: &redis::RedisError, url: &str) -> RedisSinkError {
    // The client's messages are fixed sentences ("Redis URL did not parse", "Invalid
    // database number"); a detail, if any, might quote the URL, password and all.
    let text = e.to_string();
    let reason = if e.detail().is_none() && !text.contains('@') && !text.contains(url) {
        text
    } else {
        format!("{:?}", e.kind())
    };
    RedisSinkError::InvalidUrl(format!(
        "{reason}; expected redis://[user:password@]host[:port][/db], rediss://... for TLS, or unix:///path/to/socket"
    ))
}

impl RedisSink {
    /// Builds the sink without connecting: the daemon starts (and `/readyz` says not ready)
    /// while Redis is down. Only an unusable URL fails here.
    pub fn new(name: &str, config: &RedisConfig, metrics: Arc<Metrics>) -> Result<RedisSink, RedisSinkError> {
        let wait = match (&config.wait_replicas, config.mode) {
            (Some(w), _) if w.count == 0 => None,
            (Some(w), _) => Some(w.clone()),
            (None, RedisMode::Cluster) => Some(CLUSTER_DEFAULT_WAIT),
            (None, _) => None,
        };
        // A round trip ending in WAIT may take the WAIT's timeout on top of the reply's.
        let response_timeout = config.response_timeout + wait.as_ref().map_or(Duration::ZERO, |w| w.timeout);
        let backend = match config.mode {
            RedisMode::Standalone => Backend::Single(Connection::new(
                Dialer::Client(endpoints::standalone(config)?),
                config.connect_timeout,
                config.response_timeout,
            )),
            RedisMode::Sentinel => {
                let sentinel = Dialer::Sentinel(tokio::sync::Mutex::new(endpoints::sentinel(config)?));
                Backend::Single(Connection::new(sentinel, config.connect_timeout, response_timeout))
            }
            RedisMode::Cluster => {
                let seeds = endpoints::cluster(config)?;
                let cluster = Cluster::new(seeds, config.connect_timeout, response_timeout).map_err(|e| {
                    RedisSinkError::InvalidUrl(format!(
                        "sinks.redis.nodes: {:?}; expected redis://[user:password@]host:port",
                        e.kind()
                    ))
                })?;
                Backend::Cluster(cluster)
            }
        };
        let telemetry = RedisCounters::register(&metrics, name);
        Ok(RedisSink {
            name: name.to_string(),
            backend,
            tag_prefix: config.tag_prefix.clone(),
            unlink_batch: config.unlink_batch.max(1),
            tag_chunk: config.tag_chunk.max(1),
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            retry: config.retry.clone(),
            script: match config.mode {
                RedisMode::Cluster => fanout::cluster_script(),
                _ => fanout::script(),
            },
            replicas: (0..if config.mode == RedisMode::Cluster { slot::SLOTS } else { 1 })
                .map(|_| AtomicU32::new(wait.as_ref().map_or(0, |w| w.count)))
                .collect(),
            wait,
            recovered: AtomicBool::new(false),
            telemetry,
            recovery: Default::default(),
            down: Default::default(),
            dep_prefix: config.dep_prefix.clone(),
            dependents_depth: config.dependents_depth,
            generation: generation::GenerationScript::new(),
            scan_count: config.scan_count.max(1),
            broadcast: config.broadcast.clone(),
            warm: config.warm.clone(),
        })
    }

    /// The prefix of the sets a fan-out of `sets` empties.
    fn set_prefix(&self, sets: Sets) -> &str {
        match sets {
            Sets::Tags => &self.tag_prefix,
            Sets::Dependents => &self.dep_prefix,
        }
    }

    /// Where a fan-out of `sets` counts the keys it unlinked.
    fn set_members_counter(&self, sets: Sets) -> prometheus::IntCounter {
        match sets {
            Sets::Tags => self.telemetry.tag_members_unlinked().clone(),
            Sets::Dependents => self.telemetry.dependents_unlinked().clone(),
        }
    }

    /// Appends `WAIT` and `ROLE` (when configured) to a pipeline of deletes bound for `slot`
    /// (0 outside a cluster). `ROLE` says how many replicas the primary has right now: one left
    /// without replicas (its replica was just promoted away from a dead peer, or was never
    /// there) has nobody to wait for, and nobody who could be promoted with the deleted values
    /// either; what it says is remembered per slot, and the next WAIT asks for no more replicas
    /// than are there (none: no WAIT, only ROLE, until one is back).
    fn add_wait(&self, pipe: &mut redis::Pipeline, slot: u16) -> Option<WaitPlan> {
        let w = self.wait.as_ref()?;
        let known = self.replicas.get(slot as usize).map_or(w.count, |k| k.load(Ordering::Relaxed));
        let count = w.count.min(known);
        if count > 0 {
            pipe.cmd("WAIT").arg(count).arg(w.timeout.as_millis().max(1) as u64);
        }
        pipe.cmd("ROLE");
        Some(WaitPlan { slot, count })
    }

    /// `pipe` as sent (with what [`RedisSink::add_wait`] adds, on a copy, when configured):
    /// without `wait_replicas` the pipeline goes as it is, not copied at every attempt.
    fn waiting<'p>(&self, pipe: &'p redis::Pipeline, slot: u16) -> (Cow<'p, redis::Pipeline>, Option<WaitPlan>) {
        if self.wait.is_none() {
            return (Cow::Borrowed(pipe), None);
        }
        let mut pipe = pipe.clone();
        let plan = self.add_wait(&mut pipe, slot);
        (Cow::Owned(pipe), plan)
    }

    /// Appends the UNLINKs of `keys`, `unlink_batch` keys each, to `pipe`; returns how many.
    fn add_unlinks(&self, pipe: &mut redis::Pipeline, keys: &[String]) -> usize {
        let mut commands = 0;
        for chunk in keys.chunks(self.unlink_batch) {
            pipe.add_command(unlink(chunk));
            commands += 1;
        }
        commands
    }

    /// Takes the replies of what [`RedisSink::add_wait`] added off the end of `replies` and
    /// checks that enough replicas acknowledged.
    fn check_wait(&self, plan: Option<WaitPlan>, replies: &mut Vec<Value>) -> Result<(), CommandError> {
        let Some(plan) = plan else { return Ok(()) };
        let role = replies.pop().map(item);
        let acked = if plan.count > 0 {
            match replies.pop().map(item) {
                Some(Ok(Value::Int(n))) => n,
                Some(Err(e)) => return Err(CommandError::Redis(e)),
                other => return Err(CommandError::UnexpectedReply(format!("WAIT answered {other:?}"))),
            }
        } else {
            0
        };
        let connected = match role {
            Some(Ok(Value::Array(fields))) => match fields.as_slice() {
                [_, _, Value::Array(replicas)] => Some(replicas.len() as u32),
                _ => None,
            },
            Some(Err(e)) => return Err(CommandError::Redis(e)),
            _ => None,
        };
        if let (Some(n), Some(known)) = (connected, self.replicas.get(plan.slot as usize)) {
            known.store(n, Ordering::Relaxed);
        }
        if acked >= i64::from(plan.count) {
            return Ok(());
        }
        Err(CommandError::WaitTimeout { acked, wanted: plan.count })
    }

    /// UNLINKs every key: round trip after round trip, or in cluster mode slot by slot; returns
    /// how many keys existed (the sum of the UNLINK replies: what a second pass found refilled).
    async fn unlink_keys(&self, keys: &[String], shutdown: &Shutdown) -> Result<u64, SinkError> {
        let connection = match &self.backend {
            Backend::Single(c) => c,
            Backend::Cluster(cluster) => return self.unlink_keys_cluster(cluster, keys, shutdown).await,
        };
        let mut removed = 0;
        for round in keys.chunks(self.unlink_batch.saturating_mul(UNLINKS_PER_ROUND)) {
            let mut pipe = redis::pipe();
            self.add_unlinks(&mut pipe, round);
            let pipe = &pipe;
            removed += self
                .with_retries(shutdown, move || async move {
                    let (pipe, plan) = self.waiting(pipe, 0);
                    let mut replies = connection.round_trip(&pipe).await?;
                    self.check_wait(plan, &mut replies)?;
                    removed_by(replies)
                })
                .await?;
        }
        Ok(removed)
    }

    /// Cluster mode: one pipeline per hash slot (its UNLINKs, then WAIT), all sent at once;
    /// a retry sends again only the slots not yet confirmed.
    async fn unlink_keys_cluster(
        &self,
        cluster: &Cluster,
        keys: &[String],
        shutdown: &Shutdown,
    ) -> Result<u64, SinkError> {
        let mut by_slot: std::collections::BTreeMap<u16, Vec<&str>> = std::collections::BTreeMap::new();
        for key in keys {
            by_slot.entry(slot::slot(key.as_bytes())).or_default().push(key);
        }
        let pipes: Vec<(u16, redis::Pipeline)> = by_slot
            .iter()
            .map(|(slot, keys)| {
                let mut pipe = redis::pipe();
                for chunk in keys.chunks(self.unlink_batch) {
                    pipe.add_command(unlink(chunk));
                }
                (*slot, pipe)
            })
            .collect();
        let removed = self.slot_pipelines(cluster, &pipes, |_, replies| sum_of_ints(replies), shutdown).await?;
        Ok(removed.into_iter().sum())
    }

    /// Cluster mode: one pipeline per hash slot (each followed by WAIT when configured), all
    /// sent at once; a retry sends again only the slots not yet confirmed. `parse` turns a
    /// slot's replies (WAIT's taken off) into its result, given the pipeline's index in
    /// `pipes` (what it asked); the results in `pipes` order.
    async fn slot_pipelines<T, P>(
        &self,
        cluster: &Cluster,
        pipes: &[(u16, redis::Pipeline)],
        parse: P,
        shutdown: &Shutdown,
    ) -> Result<Vec<T>, SinkError>
    where
        P: Fn(usize, Vec<Value>) -> Result<T, CommandError>,
    {
        // Each slot's result once its pipeline is confirmed (a retried slot is not recounted).
        let done: Mutex<Vec<Option<T>>> = Mutex::new(pipes.iter().map(|_| None).collect());
        let (done_ref, parse) = (&done, &parse);
        self.with_retries(shutdown, move || async move {
            let todo: Vec<usize> =
                lock(done_ref).iter().enumerate().filter(|(_, d)| d.is_none()).map(|(i, _)| i).collect();
            let mut attempts = Vec::with_capacity(todo.len());
            for &i in &todo {
                if let Some((slot, pipe)) = pipes.get(i) {
                    attempts.push(async move {
                        let (pipe, plan) = self.waiting(pipe, *slot);
                        let mut replies = cluster.pipeline(&pipe).await?;
                        self.check_wait(plan, &mut replies)?;
                        parse(i, replies)
                    });
                }
            }
            let results = in_flight(attempts).await;
            if results.iter().any(|r| matches!(r, Err(CommandError::WaitTimeout { .. }))) {
                // A primary may have lost its replica (a failover): learn every slot's replicas
                // at once rather than one timed-out WAIT per slot.
                self.refresh_replicas(cluster).await;
            }
            let mut first = None;
            let mut done = lock(done_ref);
            for (i, result) in todo.into_iter().zip(results) {
                match result {
                    Ok(value) => {
                        if let Some(d) = done.get_mut(i) {
                            *d = Some(value);
                        }
                    }
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
            first.map_or(Ok(()), Err)
        })
        .await?;
        Ok(done.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()).into_iter().flatten().collect())
    }

    /// Fans out every tag (or, for the dependents cascade, every key's dependency set); the
    /// result says which finished and which were rejected, and with `collect` which members
    /// each gave. Standalone only, `keys` (at most [`UNLINKS_PER_ROUND`] UNLINKs' worth) are
    /// unlinked in the first round trip, ahead of its script call: a batch with keys and tags
    /// then costs one round trip, not two. Returns how many of `keys` existed too.
    async fn fan_out(
        &self,
        sets: Sets,
        tags: &[String],
        collect: bool,
        keys: &[String],
        shutdown: &Shutdown,
    ) -> Result<(Fanout, u64), SinkError> {
        let fanout =
            Fanout::new(self.set_prefix(sets), tags, self.tag_chunk, matches!(self.backend, Backend::Cluster(_)));
        let fanout = if collect { fanout.collecting() } else { fanout };
        let unlinked = self.set_members_counter(sets);
        let connection = match &self.backend {
            Backend::Single(c) => c,
            Backend::Cluster(cluster) => {
                let fanout = self.fan_out_cluster(cluster, fanout, &unlinked, shutdown).await?;
                return Ok((fanout, 0));
            }
        };
        // A std mutex, held only between awaits: the retried closure needs shared access to
        // the progress it advances.
        let fanout = Mutex::new(fanout);
        // How many of `keys` existed, once Redis confirmed their UNLINKs.
        let removed: Mutex<Option<u64>> = Mutex::new(keys.is_empty().then_some(0));
        let (unlinked, removed_ref) = (&unlinked, &removed);
        while !lock(&fanout).is_finished() || lock(&removed).is_none() {
            let fanout = &fanout;
            self.with_retries(shutdown, move || async move {
                let mut pipe = redis::pipe();
                let unlinks = if lock(removed_ref).is_none() { self.add_unlinks(&mut pipe, keys) } else { 0 };
                let mut round = lock(fanout).next_round_after(pipe, &self.script);
                let plan = self.add_wait(&mut round.pipe, 0);
                let mut replies = match connection.round_trip(&round.pipe).await {
                    Ok(replies) => replies,
                    Err(e) => {
                        lock(fanout).start_over();
                        return Err(e);
                    }
                };
                // A WAIT that fell short: the round's pops happened on the primary, but were they
                // replicated? Start over: if a failover lost them, the members are back in the set
                // (a script's effects replicate together), and the new measure takes them again.
                let waited = self.check_wait(plan, &mut replies);
                let calls = replies.split_off(unlinks.min(replies.len()));
                let keys_removed = removed_by(replies);
                let outcome = lock(fanout).apply(&round, calls);
                unlinked.inc_by(outcome.unlinked);
                if let Err(e) = waited {
                    lock(fanout).start_over();
                    return Err(e);
                }
                if unlinks > 0 {
                    *lock(removed_ref) = Some(keys_removed?);
                }
                match outcome.error {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            })
            .await?;
        }
        let removed = lock(&removed).unwrap_or(0);
        Ok((fanout.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()), removed))
    }

    /// Cluster mode: how many replicas serve each slot now, from `CLUSTER SLOTS` (which leaves
    /// out failed nodes). Best effort: without an answer, what `ROLE` said stays.
    async fn refresh_replicas(&self, cluster: &Cluster) {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let Ok(Value::Array(ranges)) = cluster.route(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random)).await
        else {
            return;
        };
        for range in ranges {
            let Value::Array(parts) = range else { continue };
            let (Some(Value::Int(from)), Some(Value::Int(to))) = (parts.first(), parts.get(1)) else { continue };
            let replicas = parts.len().saturating_sub(3) as u32;
            for slot in (*from).max(0)..=(*to).min(slot::SLOTS as i64 - 1) {
                if let Some(known) = self.replicas.get(slot as usize) {
                    known.store(replicas, Ordering::Relaxed);
                }
            }
        }
    }

    /// Cluster mode: each round's script calls (one per tag, each in its tag's slot) go at
    /// once; the members they moved to pending sets are unlinked slot by slot, then removed
    /// from the pending sets, before the next round.
    async fn fan_out_cluster(
        &self,
        cluster: &Cluster,
        fanout: Fanout,
        unlinked: &prometheus::IntCounter,
        shutdown: &Shutdown,
    ) -> Result<Fanout, SinkError> {
        let fanout = Mutex::new(fanout);
        let moved: Mutex<Vec<(String, Vec<String>)>> = Mutex::new(Vec::new());
        loop {
            self.finish_pending(cluster, &moved, unlinked, shutdown).await?;
            if lock(&fanout).is_finished() {
                break;
            }
            let (fanout, moved) = (&fanout, &moved);
            self.with_retries(shutdown, move || async move {
                let round = lock(fanout).next_round(&self.script);
                let commands: Vec<&redis::Cmd> = round.pipe.cmd_iter().collect();
                let mut results = Vec::with_capacity(commands.len());
                let mut calls = commands.as_slice();
                if round.loads_script {
                    // SCRIPT LOAD goes to every primary, and must be there before the calls.
                    if let Some((load, rest)) = calls.split_first() {
                        results.push(cluster.command(load).await);
                        calls = rest;
                    }
                }
                let mut sends = Vec::with_capacity(calls.len());
                for cmd in calls {
                    sends.push(cluster.command(cmd));
                }
                results.extend(in_flight(sends).await);
                let outcome = lock(fanout).apply_results(&round, results);
                lock(moved).extend(outcome.moved);
                match outcome.error {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            })
            .await?;
        }
        Ok(fanout.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Unlinks the members moved to pending sets, then removes them from those sets. Until
    /// then they stay in `moved` (and in Redis, for the next start to find).
    async fn finish_pending(
        &self,
        cluster: &Cluster,
        moved: &Mutex<Vec<(String, Vec<String>)>>,
        unlinked: &prometheus::IntCounter,
        shutdown: &Shutdown,
    ) -> Result<(), SinkError> {
        let work = lock(moved).clone();
        if work.is_empty() {
            return Ok(());
        }
        let members: Vec<String> = work.iter().flat_map(|(_, m)| m.iter().cloned()).collect();
        self.unlink_keys_cluster(cluster, &members, shutdown).await?;
        unlinked.inc_by(members.len() as u64);
        let srems: Vec<redis::Cmd> = work
            .iter()
            .flat_map(|(pending, members)| {
                members.chunks(RECOVERY_PAGE).map(move |chunk| {
                    let mut c = redis::cmd("SREM");
                    c.arg(pending).arg(chunk);
                    c
                })
            })
            .collect();
        let srems = &srems;
        self.with_retries(shutdown, move || async move {
            let mut sends = Vec::with_capacity(srems.len());
            for cmd in srems {
                sends.push(cluster.command(cmd));
            }
            in_flight(sends).await.into_iter().try_for_each(|r| r.map(drop))
        })
        .await?;
        lock(moved).clear();
        Ok(())
    }

    /// Cluster mode, once per run before the first batch: finishes the pending sets an earlier
    /// run left (a crash between moving members and unlinking them), found by `SCAN` on every
    /// primary.
    async fn recover_pending(&self, cluster: &Cluster, shutdown: &Shutdown) -> Result<(), SinkError> {
        if self.recovered.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.wait.is_some() {
            // A cluster without replicas must not pay a WAIT timeout per slot to find out.
            self.refresh_replicas(cluster).await;
        }
        let pending = self.with_retries(shutdown, || scan_primaries(cluster)).await?;
        if !pending.is_empty() {
            tracing::info!(sink = %self.name, sets = pending.len(), "finishing tag fan-outs an earlier run left pending");
        }
        for key in pending {
            loop {
                let key = &key;
                let members: Vec<String> = self
                    .with_retries(shutdown, move || async move {
                        let mut c = redis::cmd("SRANDMEMBER");
                        c.arg(key).arg(RECOVERY_PAGE);
                        match cluster.command(&c).await? {
                            Value::Array(items) => Ok(items.iter().filter_map(text).collect()),
                            Value::Nil => Ok(Vec::new()),
                            other => Err(CommandError::UnexpectedReply(format!("SRANDMEMBER answered {other:?}"))),
                        }
                    })
                    .await?;
                if members.is_empty() {
                    break;
                }
                let moved = Mutex::new(vec![(key.clone(), members)]);
                let unlinked = self.telemetry.tag_members_unlinked().clone();
                self.finish_pending(cluster, &moved, &unlinked, shutdown).await?;
            }
        }
        self.recovered.store(true, Ordering::Release);
        Ok(())
    }

    /// Runs `op` until it succeeds, counting, logging and classifying each failure.
    async fn with_retries<T, Op, Fut>(&self, shutdown: &Shutdown, mut op: Op) -> Result<T, SinkError>
    where
        Op: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CommandError>>,
    {
        let name = self.name.as_str();
        let attempt = || {
            let fut = op();
            async move {
                let result = fut.await;
                match &result {
                    Ok(_) => self.telemetry.emit(CommandSucceeded),
                    Err(e) => {
                        self.down.store(true, std::sync::atomic::Ordering::Relaxed);
                        let wait_timeout = matches!(e, CommandError::WaitTimeout { .. });
                        self.telemetry.emit(CommandFailed { class: e.class().report(), wait_timeout });
                    }
                }
                result
            }
        };
        let classify = |e: &CommandError| match e.class() {
            Class::Transient | Class::Refused => Verdict::Retry { floor: None },
            Class::Fatal => Verdict::Permanent,
        };
        let on_retry = |e: &CommandError, attempt: u32, wait: Duration| {
            let refused = e.class() == Class::Refused;
            self.telemetry.emit(CommandRetried { code: e.code(), attempt, wait, refused, error: e });
        };
        let recovery = Some(&self.recovery);
        match crate::retry::retry_with_recovery(&self.retry, shutdown, recovery, attempt, classify, on_retry).await {
            Ok(v) => Ok(v),
            Err(RetryError::Abandoned { attempts, .. }) => {
                tracing::warn!(sink = name, attempts, "shutdown abandoned the batch before Redis confirmed it");
                Err(SinkError::Abandoned)
            }
            Err(RetryError::Permanent(e)) => {
                tracing::error!(sink = name, code = e.code(), error = %e, "Redis error that retrying cannot fix");
                Err(SinkError::Fatal(format!("redis sink {name}: {e}")))
            }
            Err(RetryError::Exhausted { attempts, last }) => {
                tracing::error!(sink = name, attempts, code = last.code(), error = %last, "giving up: sinks.redis.retry.max_attempts reached");
                Err(SinkError::Fatal(format!("redis sink {name}: gave up after {attempts} attempts: {last}")))
            }
        }
    }
}

fn lock<T>(progress: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding it; if something did, the progress is still sound.
    progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `UNLINK` of `keys`, its buffer sized once: a batch's keys are most of what its round trips
/// carry, and growing the command as they are written copies them again and again.
fn unlink<K: AsRef<str>>(keys: &[K]) -> redis::Cmd {
    let bytes: usize = keys.iter().map(|k| k.as_ref().len()).sum();
    let mut cmd = redis::Cmd::with_capacity(keys.len() + 1, bytes + 6);
    cmd.arg("UNLINK");
    for key in keys {
        cmd.arg(key.as_ref());
    }
    cmd
}

/// Standalone: the replies of UNLINKs, summed: how many of their keys existed.
fn removed_by(replies: Vec<Value>) -> Result<u64, CommandError> {
    let mut removed = 0;
    for reply in replies {
        if let Value::Int(n) = item(reply).map_err(CommandError::Redis)? {
            removed += u64::try_from(n).unwrap_or(0);
        }
    }
    Ok(removed)
}

/// The replies of a pipeline of UNLINKs, summed: how many of its keys existed.
fn sum_of_ints(replies: Vec<Value>) -> Result<u64, CommandError> {
    let mut removed = 0;
    for reply in replies {
        if let Value::Int(n) = item(reply).map_err(cluster_error)? {
            removed += u64::try_from(n).unwrap_or(0);
        }
    }
    Ok(removed)
}

/// Runs `futures` at most [`CLUSTER_IN_FLIGHT`] at a time; the results in their order.
async fn in_flight<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pending = futures.into_iter();
    let mut running = FuturesOrdered::new();
    let mut out = Vec::with_capacity(pending.len());
    for f in pending.by_ref().take(CLUSTER_IN_FLIGHT) {
        running.push_back(f);
    }
    while let Some(result) = running.next().await {
        out.push(result);
        if let Some(f) = pending.next() {
            running.push_back(f);
        }
    }
    out
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Every pending set on every primary: `SCAN` each primary to the end of its own cursor.
async fn scan_primaries(cluster: &Cluster) -> Result<Vec<String>, CommandError> {
    let scan = |cursor: &str| {
        let mut c = redis::cmd("SCAN");
        c.arg(cursor).arg("MATCH").arg(format!("{}*", fanout::PENDING_PREFIX)).arg("COUNT").arg(1000);
        c
    };
    let first = cluster.route(scan("0"), RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None))).await?;
    let Value::Map(per_node) = first else {
        return Err(CommandError::UnexpectedReply(format!("SCAN on every primary answered {first:?}")));
    };
    let mut found = Vec::new();
    for (address, mut reply) in per_node {
        let address = text(&address).unwrap_or_default();
        loop {
            let (cursor, keys) = pattern::page(item(reply).map_err(CommandError::Redis)?)?;
            found.extend(keys);
            if cursor == "0" {
                break;
            }
            let (host, port) = pattern::host_port(&address)?;
            let at = SingleNodeRoutingInfo::ByAddress { host, port };
            reply = cluster.route(scan(&cursor), RoutingInfo::SingleNode(at)).await?;
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// Each rejected item once, with its first reason: a dependents root can be rejected by its
/// cascade (a `dep:` key that is not a set) and again by the warm-up stream.
fn once_each(mut rejected: Vec<Rejected>) -> Vec<Rejected> {
    let mut seen = std::collections::HashSet::new();
    rejected.retain(|r| seen.insert((r.kind, r.index)));
    rejected
}

impl RedisSink {
    /// Tells applications what this sink confirmed of `batch` (its items of `kinds`, and the
    /// `dependents` its cascades unlinked): the broadcast, then the warm-up stream, each if
    /// configured. Returns the items the warm-up stream rejected.
    async fn tell(
        &self,
        batch: &Invalidations,
        kinds: &[ItemKind],
        dependents: &[(String, usize)],
        shutdown: &Shutdown,
    ) -> Result<Vec<Rejected>, SinkError> {
        if let Some(config) = &self.broadcast {
            let announcement = broadcast::Announcement::of(batch, kinds, dependents.iter().map(|(k, _)| k.as_str()));
            self.broadcast(config, &announcement, shutdown).await?;
        }
        match &self.warm {
            Some(config) => {
                let entries = warm::entries(batch, kinds.contains(&ItemKind::RedisKey), dependents);
                self.warm(config, &entries, shutdown).await
            }
            None => Ok(Vec::new()),
        }
    }
}

#[async_trait]
impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.name
    }

    /// Patterns are served by [`PatternSink`], its own task, so a long scan never holds these.
    fn kinds(&self) -> &'static [ItemKind] {
        &[ItemKind::RedisKey, ItemKind::RedisTag, ItemKind::RedisGeneration, ItemKind::RedisDependents]
    }

    fn wants_origins(&self) -> bool {
        self.broadcast.is_some() || self.warm.is_some()
    }

    async fn invalidate(&self, batch: &Invalidations, shutdown: &Shutdown) -> Result<SinkReport, SinkError> {
        let mut report = SinkReport::default();
        if let Backend::Cluster(cluster) = &self.backend {
            self.recover_pending(cluster, shutdown).await?;
        }
        let (keys, tags) = (batch.items(ItemKind::RedisKey), batch.items(ItemKind::RedisTag));
        let roots = dependents::Roots::of(batch);
        // Where the cascade starts: (index of the root in the batch's dependents, its keys).
        let mut cascade = roots.keys();
        // Standalone, keys that fit in one round trip ride in the tag fan-out's first one.
        let riding = !tags.is_empty()
            && matches!(self.backend, Backend::Single(_))
            && keys.len().div_ceil(self.unlink_batch) <= UNLINKS_PER_ROUND;
        if !keys.is_empty() && !riding {
            report.removed = self.unlink_keys(keys, shutdown).await?;
            report.confirmed.push((ItemKind::RedisKey, keys.len() as u64));
        }
        if !tags.is_empty() {
            let riders: &[String] = if riding { keys } else { &[] };
            let (mut fanout, removed) = self.fan_out(Sets::Tags, tags, roots.has_tags(), riders, shutdown).await?;
            if !riders.is_empty() {
                report.removed = removed;
                report.confirmed.push((ItemKind::RedisKey, keys.len() as u64));
            }
            let done = fanout.confirmed();
            if done > 0 {
                report.confirmed.push((ItemKind::RedisTag, done));
            }
            report.rejected = fanout.rejected();
            for rejected in &report.rejected {
                // The reason names the key: it goes to the dead letter, not to the log.
                tracing::warn!(sink = %self.name, index = rejected.index, "a tag's Redis key is not a set: tag rejected");
            }
            cascade.extend(roots.tag_members(tags, fanout.take_members()));
        }
        let generations = batch.items(ItemKind::RedisGeneration);
        if !generations.is_empty() {
            let outcome = self.advance_generations(generations, shutdown).await?;
            report.confirmed.push((ItemKind::RedisGeneration, outcome.confirmed));
            report.rejected.extend(outcome.rejected);
        }
        let mut dependents = Vec::new();
        if roots.served_here() > 0 {
            let cascaded = self.cascade(cascade, shutdown).await?;
            report
                .confirmed
                .push((ItemKind::RedisDependents, roots.served_here().saturating_sub(cascaded.rejected.len()) as u64));
            report.rejected.extend(cascaded.rejected);
            dependents = cascaded.unlinked;
        }
        // Only now, with every delete confirmed, are applications told. Patterns are told by
        // the pattern sink once its walks end.
        report
            .rejected
            .extend(self.tell(batch, &[ItemKind::RedisKey, ItemKind::RedisTag], &dependents, shutdown).await?);
        report.rejected = once_each(std::mem::take(&mut report.rejected));
        Ok(report)
    }

    /// PING within `PING_TIMEOUT` (connect) plus `PING_TIMEOUT` (reply), never retried: a
    /// refused password is as much "not ready" as a server that is down, and is logged as an
    /// error since it will not pass by itself.
    async fn ping(&self) -> bool {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        let bounds = (self.connect_timeout.min(PING_TIMEOUT), self.response_timeout.min(PING_TIMEOUT));
        // The connection may be busy being made by `invalidate`: bound the wait for it too.
        let reply = match &self.backend {
            Backend::Single(connection) => {
                tokio::time::timeout(bounds.0 + bounds.1, connection.round_trip_within(&pipe, bounds.0, bounds.1)).await
            }
            // Every node must answer (the client sends PING to all of them).
            Backend::Cluster(cluster) => {
                tokio::time::timeout(bounds.0 + bounds.1, async {
                    cluster.command(&redis::cmd("PING")).await.map(|v| vec![v])
                })
                .await
            }
        };
        let up = match reply {
            Ok(Ok(values)) => {
                matches!(values.first(), Some(Value::SimpleString(s)) if s == "PONG")
                    || matches!(values.first(), Some(Value::Okay))
            }
            Ok(Err(e)) => {
                if e.class() == Class::Refused {
                    tracing::error!(sink = %self.name, code = e.code(), error = %e, "Redis refused the readiness probe");
                } else {
                    tracing::debug!(sink = %self.name, code = e.code(), error = %e, "Redis readiness probe failed");
                }
                false
            }
            Err(_) => false,
        };
        self.telemetry.sink().emit(Probed { up });
        let was_down = self.down.swap(!up, std::sync::atomic::Ordering::Relaxed);
        if up && was_down {
            tracing::info!(sink = %self.name, "Redis answers again: waiting retries go now");
            self.recovery.recovered();
        }
        up
    }
}
