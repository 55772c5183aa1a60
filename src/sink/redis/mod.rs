//! The Redis sink: UNLINK keys, fan out tags.
//!
//! - **Keys** are unlinked `unlink_batch` per `UNLINK` command, several commands pipelined per
//!   round trip.
//! - **Tags** are fanned out by a server-side script, `tag_chunk` members per call: see
//!   `fanout.rs` for how and why.
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
//! Nothing here ever writes a cached value: the only commands sent are UNLINK, PING, SCRIPT
//! LOAD and EVALSHA of the fan-out script (which runs TYPE, SCARD, SPOP, SSCAN, SREM and UNLINK;
//! the only things it changes are tag sets, by removing members, and the keys it unlinks).
//!
//! Scope: standalone Redis, or the primary of a Sentinel setup. The fan-out script touches keys
//! it does not declare in `KEYS` (the members of the set), which Redis Cluster refuses.
//!
//! Logs and metric labels carry the sink name, error codes and counts; never the URL (it may
//! hold a password) nor a key.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use crate::config::RedisConfig;
use crate::retry::{RetryError, RetryPolicy, Verdict};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, Sink, SinkError, SinkReport};
use crate::telemetry::Metrics;

mod connection;
mod fanout;

use connection::{item, Class, CommandError, Connection};
use fanout::Fanout;

/// UNLINK commands per round trip (with the default `unlink_batch`, 16k keys).
const UNLINKS_PER_ROUND: usize = 32;

/// The readiness probe's bound on connecting and on the PING reply, each.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
}

pub struct RedisSink {
    name: String,
    connection: Connection,
    tag_prefix: String,
    unlink_batch: usize,
    tag_chunk: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
    retry: RetryPolicy,
    script: redis::Script,
    metrics: Arc<Metrics>,
}

impl RedisSink {
    /// Builds the sink without connecting: the daemon starts (and `/readyz` says not ready)
    /// while Redis is down. Only an unusable URL fails here.
    pub fn new(name: &str, config: &RedisConfig, metrics: Arc<Metrics>) -> Result<RedisSink, RedisSinkError> {
        let url = config.url().ok_or_else(|| RedisSinkError::InvalidUrl("no URL configured".into()))?.expose();
        let client = redis::Client::open(url).map_err(|e| {
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
        })?;
        metrics.sink_up.with_label_values(&[name]).set(0);
        Ok(RedisSink {
            name: name.to_string(),
            connection: Connection::new(client, config.connect_timeout, config.response_timeout),
            tag_prefix: config.tag_prefix.clone(),
            unlink_batch: config.unlink_batch.max(1),
            tag_chunk: config.tag_chunk.max(1),
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            retry: config.retry.clone(),
            script: fanout::script(),
            metrics,
        })
    }

    /// UNLINKs every key, round trip after round trip; returns how many keys existed (the sum
    /// of the UNLINK replies).
    async fn unlink_keys(&self, keys: &[String], shutdown: &Shutdown) -> Result<u64, SinkError> {
        let mut removed = 0;
        let commands: Vec<&[String]> = keys.chunks(self.unlink_batch).collect();
        for round in commands.chunks(UNLINKS_PER_ROUND) {
            let mut pipe = redis::pipe();
            for keys in round {
                pipe.cmd("UNLINK").arg(*keys);
            }
            let pipe = &pipe;
            removed += self
                .with_retries(shutdown, move || async move {
                    let replies = self.connection.round_trip(pipe).await?;
                    let mut removed = 0;
                    for reply in replies {
                        if let Value::Int(n) = item(reply).map_err(CommandError::Redis)? {
                            removed += u64::try_from(n).unwrap_or(0);
                        }
                    }
                    Ok(removed)
                })
                .await?;
        }
        Ok(removed)
    }

    /// Fans out every tag; the result says which finished and which were rejected.
    async fn fan_out(&self, tags: &[String], shutdown: &Shutdown) -> Result<Fanout, SinkError> {
        // A std mutex, held only between awaits: the retried closure needs shared access to
        // the progress it advances.
        let fanout = Mutex::new(Fanout::new(&self.tag_prefix, tags, self.tag_chunk));
        while !lock(&fanout).is_finished() {
            let fanout = &fanout;
            self.with_retries(shutdown, move || async move {
                let round = lock(fanout).next_round(&self.script);
                let replies = match self.connection.round_trip(&round.pipe).await {
                    Ok(replies) => replies,
                    Err(e) => {
                        lock(fanout).start_over();
                        return Err(e);
                    }
                };
                let outcome = lock(fanout).apply(&round, replies);
                self.metrics.tag_members_unlinked.with_label_values(&[&self.name]).inc_by(outcome.unlinked);
                match outcome.error {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            })
            .await?;
        }
        Ok(fanout.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()))
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
                    Ok(_) => self.metrics.sink_up.with_label_values(&[name]).set(1),
                    Err(e) => {
                        self.metrics.sink_up.with_label_values(&[name]).set(0);
                        self.metrics.sink_errors.with_label_values(&[name, e.class().label()]).inc();
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
            self.metrics.sink_retries.with_label_values(&[name]).inc();
            let wait_ms = wait.as_millis() as u64;
            match e.class() {
                Class::Refused => {
                    tracing::error!(sink = name, code = e.code(), attempt, wait_ms, error = %e, "Redis refused our credentials or permissions; retrying")
                }
                _ => {
                    tracing::warn!(sink = name, code = e.code(), attempt, wait_ms, error = %e, "Redis command failed; retrying")
                }
            }
        };
        match crate::retry::retry(&self.retry, shutdown, attempt, classify, on_retry).await {
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

fn lock(fanout: &Mutex<Fanout>) -> MutexGuard<'_, Fanout> {
    // Nothing panics while holding it; if something did, the progress is still sound.
    fanout.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn kinds(&self) -> &'static [ItemKind] {
        &[ItemKind::RedisKey, ItemKind::RedisTag]
    }

    async fn invalidate(&self, batch: &Invalidations, shutdown: &Shutdown) -> Result<SinkReport, SinkError> {
        let mut report = SinkReport::default();
        let (keys, tags) = (batch.items(ItemKind::RedisKey), batch.items(ItemKind::RedisTag));
        if !keys.is_empty() {
            report.removed = self.unlink_keys(keys, shutdown).await?;
            report.confirmed.push((ItemKind::RedisKey, keys.len() as u64));
        }
        if !tags.is_empty() {
            let fanout = self.fan_out(tags, shutdown).await?;
            let done = fanout.confirmed();
            if done > 0 {
                report.confirmed.push((ItemKind::RedisTag, done));
            }
            report.rejected = fanout.rejected();
            for rejected in &report.rejected {
                // The reason names the key: it goes to the dead letter, not to the log.
                tracing::warn!(sink = %self.name, index = rejected.index, "a tag's Redis key is not a set: tag rejected");
            }
        }
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
        let reply =
            tokio::time::timeout(bounds.0 + bounds.1, self.connection.round_trip_within(&pipe, bounds.0, bounds.1))
                .await;
        let up = match reply {
            Ok(Ok(values)) => matches!(values.first(), Some(Value::SimpleString(s)) if s == "PONG"),
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
        self.metrics.sink_up.with_label_values(&[&self.name]).set(up as i64);
        up
    }
}
