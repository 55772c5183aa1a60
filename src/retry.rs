//! The one retry helper every sink and the dead-letter writer use.
//!
//! Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
//! Jitter"): the n-th wait is uniform in `[0, min(max, initial * 2^n)]`. Each caller decides what
//! is retriable; this module only decides *when* to try again and stops when shutdown abandons
//! in-flight work. There is deliberately no attempt limit by default: a sink that cannot reach its
//! cache must pause the pipeline (backpressure), never drop an invalidation.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;
use tokio::sync::Notify;

use crate::shutdown::Shutdown;

/// Retry settings (config: `sinks.<sink>.retry`, with the defaults below).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// First backoff ceiling.
    #[serde(with = "crate::config::duration")]
    pub initial: Duration,
    /// Largest backoff ceiling.
    #[serde(with = "crate::config::duration")]
    pub max: Duration,
    /// Give up after this many attempts; `None` (the default) retries until shutdown.
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(30), max_attempts: None }
    }
}

impl RetryPolicy {
    /// The ceiling for the wait after `attempt` failures (attempt 1 = first failure).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u64.checked_shl(attempt.saturating_sub(1).min(32)).unwrap_or(u64::MAX);
        let ms = (self.initial.as_millis() as u64).saturating_mul(factor);
        Duration::from_millis(ms).min(self.max)
    }

    /// A full-jitter wait for `attempt`, never below `floor` (a server's `Retry-After`).
    pub fn wait(&self, attempt: u32, floor: Option<Duration>) -> Duration {
        let ceiling = self.ceiling(attempt);
        let jittered = if ceiling.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(rand::rng().random_range(0..=ceiling.as_micros() as u64))
        };
        match floor {
            Some(floor) => jittered.max(floor),
            None => jittered,
        }
    }
}

/// How one failed attempt should be treated: the per-sink "is this retriable" decision.
pub enum Verdict {
    /// Try again after the backoff (or at least after the given floor, from `Retry-After`).
    Retry { floor: Option<Duration> },
    /// Retrying cannot help (bad request, auth): hand the error back.
    Permanent,
}

/// Why [`retry`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    #[error("permanent failure: {0}")]
    Permanent(E),
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: E },
    /// Shutdown abandoned in-flight work while we were retrying.
    #[error("abandoned at shutdown after {attempts} attempts")]
    Abandoned { attempts: u32, last: Option<E> },
}

/// Ends the backoff of every retry waiting on it: fired when the target is seen answering again
/// (the Redis sink's health probe), so a backlog restarts at once instead of up to `retry.max`
/// later. Cloning shares it. A `Retry-After` floor is not cut short: the server asked for it.
#[derive(Debug, Clone, Default)]
pub struct Recovery(Arc<Notify>);

impl Recovery {
    /// Every retry waiting now tries again at once.
    pub fn recovered(&self) {
        self.0.notify_waiters();
    }
}

/// Runs `op` until it succeeds, fails permanently, runs out of attempts or shutdown abandons it.
///
/// `classify` is the caller's retriable-or-fatal split; `on_retry` is told of every failure that
/// will be retried and the wait chosen, so the caller can log and count it.
pub async fn retry<T, E, Op, Fut, Classify, OnRetry>(
    policy: &RetryPolicy,
    shutdown: &Shutdown,
    op: Op,
    classify: Classify,
    on_retry: OnRetry,
) -> Result<T, RetryError<E>>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    Classify: Fn(&E) -> Verdict,
    OnRetry: FnMut(&E, u32, Duration),
{
    retry_with_recovery(policy, shutdown, None, op, classify, on_retry).await
}

/// [`retry`], whose backoff waits also end when `recovery` fires.
pub async fn retry_with_recovery<T, E, Op, Fut, Classify, OnRetry>(
    policy: &RetryPolicy,
    shutdown: &Shutdown,
    recovery: Option<&Recovery>,
    mut op: Op,
    classify: Classify,
    mut on_retry: OnRetry,
) -> Result<T, RetryError<E>>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    Classify: Fn(&E) -> Verdict,
    OnRetry: FnMut(&E, u32, Duration),
{
    let mut attempt = 0u32;
    loop {
        if shutdown.is_abandoned() {
            return Err(RetryError::Abandoned { attempts: attempt, last: None });
        }
        attempt += 1;
        // Registered before the attempt, so a recovery seen while it was failing is not missed.
        let recovered = recovery.map(|r| r.0.notified());
        let err = tokio::select! {
            biased;
            _ = shutdown.abandoned() => return Err(RetryError::Abandoned { attempts: attempt, last: None }),
            result = op() => match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            },
        };
        let floor = match classify(&err) {
            Verdict::Permanent => return Err(RetryError::Permanent(err)),
            Verdict::Retry { floor } => floor,
        };
        if policy.max_attempts.is_some_and(|max| attempt >= max) {
            return Err(RetryError::Exhausted { attempts: attempt, last: err });
        }
        let wait = policy.wait(attempt, floor);
        on_retry(&err, attempt, wait);
        let woken = async {
            match (recovered, floor) {
                (Some(r), None) => r.await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.abandoned() => return Err(RetryError::Abandoned { attempts: attempt, last: Some(err) }),
            _ = woken => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn policy() -> RetryPolicy {
        RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(5), max_attempts: None }
    }

    #[test]
    fn ceiling_doubles_up_to_max() {
        let p = policy();
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(6), Duration::from_millis(3200));
        assert_eq!(p.ceiling(7), Duration::from_secs(5));
        assert_eq!(p.ceiling(500), Duration::from_secs(5));
    }

    #[test]
    fn wait_is_within_ceiling_and_above_floor() {
        let p = policy();
        for attempt in 1..20 {
            assert!(p.wait(attempt, None) <= p.ceiling(attempt));
            assert!(p.wait(attempt, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_with_bounded_total_wait() {
        let calls = Arc::new(AtomicU32::new(0));
        let start = tokio::time::Instant::now();
        let c = calls.clone();
        let mut retries = 0;
        let out: Result<u32, RetryError<&str>> = retry(
            &policy(),
            &Shutdown::never(),
            || {
                let c = c.clone();
                async move {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    if n < 5 {
                        Err("down")
                    } else {
                        Ok(n)
                    }
                }
            },
            |_| Verdict::Retry { floor: None },
            |_, _, _| retries += 1,
        )
        .await;
        assert_eq!(out.unwrap(), 5);
        assert_eq!(retries, 4);
        // 4 waits, each at most its ceiling: 100+200+400+800 ms.
        assert!(start.elapsed() <= Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let mut calls = 0;
        let out: Result<(), _> = retry(
            &policy(),
            &Shutdown::never(),
            || {
                calls += 1;
                async { Err::<(), _>("400 bad request") }
            },
            |_| Verdict::Permanent,
            |_, _, _| {},
        )
        .await;
        assert!(matches!(out, Err(RetryError::Permanent("400 bad request"))));
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_floor_is_honoured() {
        let start = tokio::time::Instant::now();
        let mut calls = 0;
        let _: Result<(), RetryError<&str>> = retry(
            &policy(),
            &Shutdown::never(),
            || {
                calls += 1;
                let fail = calls == 1;
                async move {
                    if fail {
                        Err("429")
                    } else {
                        Ok(())
                    }
                }
            },
            |_| Verdict::Retry { floor: Some(Duration::from_secs(60)) },
            |_, _, _| {},
        )
        .await;
        assert!(start.elapsed() >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn abandon_stops_an_endless_retry() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(async move {
            retry(
                &policy(),
                &shutdown,
                || async { Err::<(), _>("connection refused") },
                |_| Verdict::Retry { floor: None },
                |_, _, _| {},
            )
            .await
        });
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!task.is_finished());
        trigger.abandon();
        let out = task.await.unwrap();
        assert!(matches!(out, Err(RetryError::Abandoned { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn max_attempts_exhausts() {
        let p = RetryPolicy { max_attempts: Some(3), ..policy() };
        let mut calls = 0;
        let out: Result<(), _> = retry(
            &p,
            &Shutdown::never(),
            || {
                calls += 1;
                async { Err::<(), _>("503") }
            },
            |_| Verdict::Retry { floor: None },
            |_, _, _| {},
        )
        .await;
        assert!(matches!(out, Err(RetryError::Exhausted { attempts: 3, .. })));
        assert_eq!(calls, 3);
    }

    /// A retry waiting out a long backoff goes at once when its target is seen answering.
    #[tokio::test(start_paused = true)]
    async fn recovery_ends_the_backoff_at_once() {
        let p = RetryPolicy { initial: Duration::from_secs(3600), max: Duration::from_secs(3600), max_attempts: None };
        let recovery = Recovery::default();
        let calls = Arc::new(AtomicU32::new(0));
        let (r, c) = (recovery.clone(), calls.clone());
        let task = tokio::spawn(async move {
            retry_with_recovery(
                &p,
                &Shutdown::never(),
                Some(&r),
                || {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        if n < 3 {
                            Err("down")
                        } else {
                            Ok(n)
                        }
                    }
                },
                |_| Verdict::Retry { floor: None },
                |_, _, _| {},
            )
            .await
        });
        // Each wait is up to an hour (the paused clock moves only in these 10 ms steps).
        let start = tokio::time::Instant::now();
        for target in [2, 3] {
            tokio::time::sleep(Duration::from_millis(10)).await;
            recovery.recovered();
            while calls.load(Ordering::SeqCst) < target && start.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
        assert_eq!(task.await.unwrap().unwrap(), 3);
    }

    /// One recovery ends the backoff of every retry waiting on it, not only the first (a Redis
    /// target and its pattern twin, or several rounds of one sink, all waiting on one server).
    #[tokio::test(start_paused = true)]
    async fn recovery_wakes_every_waiting_retry() {
        let p = RetryPolicy { initial: Duration::from_secs(3600), max: Duration::from_secs(3600), max_attempts: None };
        let recovery = Recovery::default();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let calls: Vec<Arc<AtomicU32>> = (0..3).map(|_| Arc::new(AtomicU32::new(0))).collect();
        let tasks: Vec<_> = calls
            .iter()
            .map(|c| {
                let (p, r, up, c) = (p.clone(), recovery.clone(), up.clone(), c.clone());
                tokio::spawn(async move {
                    retry_with_recovery(
                        &p,
                        &Shutdown::never(),
                        Some(&r),
                        || {
                            c.fetch_add(1, Ordering::SeqCst);
                            let ok = up.load(Ordering::SeqCst);
                            async move {
                                if ok {
                                    Ok(())
                                } else {
                                    Err("down")
                                }
                            }
                        },
                        |_| Verdict::Retry { floor: None },
                        |_, _, _| {},
                    )
                    .await
                })
            })
            .collect();
        // Every retry has failed once and waits out its backoff (up to an hour each).
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(calls.iter().all(|c| c.load(Ordering::SeqCst) == 1));
        up.store(true, Ordering::SeqCst);
        let recovered_at = tokio::time::Instant::now();
        recovery.recovered();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        // Each tried exactly once more, woken by the one recovery: a retry left to its backoff
        // would have let the paused clock jump ahead to the end of its hour.
        assert!(calls.iter().all(|c| c.load(Ordering::SeqCst) == 2));
        assert!(recovered_at.elapsed() < Duration::from_secs(1), "{:?} on the paused clock", recovered_at.elapsed());
    }
}
