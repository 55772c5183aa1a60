//! Client-side rate limits: a token bucket per provider limit, so we never send what the
//! provider would answer with a 429 (and, for providers that bill or throttle per request,
//! never spend more than the configured budget).
//!
//! The bucket holds at most `capacity` tokens and gains `refill_per_second` tokens per second.
//! A request costing `n` tokens waits until `n` are available and then takes them all at once:
//! a request that has to wait takes nothing while it waits ("a denied request spends no
//! tokens", as the providers' own buckets work), and waiters are served first come, first
//! served, so a large request cannot be starved by a stream of small ones.
//!
//! Over any interval of length `t` the bucket therefore lets through at most
//! `capacity + refill_per_second * t` tokens: that is the property the storm tests measure at
//! the test doubles.

use std::time::Duration;

use prometheus::Counter;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A token bucket shared by every request of one sink (or one provider limit of it).
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    refill_per_second: f64,
    /// Held by the request at the head of the queue while it waits for tokens: a tokio mutex is
    /// fair (FIFO), which gives first come, first served.
    state: Mutex<State>,
    /// Seconds spent waiting, if the owner counts them (`cdn_rate_limit_wait_seconds_total`).
    waited: Option<Counter>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `capacity` is clamped to at least 1 and `refill_per_second` to a small
    /// positive rate, so every request eventually goes through.
    pub fn new(capacity: u32, refill_per_second: f64) -> TokenBucket {
        let capacity = f64::from(capacity.max(1));
        let refill_per_second = if refill_per_second.is_finite() { refill_per_second.max(1e-6) } else { 1e-6 };
        TokenBucket {
            capacity,
            refill_per_second,
            state: Mutex::new(State { tokens: capacity, last: Instant::now() }),
            waited: None,
        }
    }

    /// Adds the seconds every `acquire` waits to `counter`.
    pub fn with_wait_counter(mut self, counter: Counter) -> TokenBucket {
        self.waited = Some(counter);
        self
    }

    pub fn capacity(&self) -> u32 {
        self.capacity as u32
    }

    pub fn refill_per_second(&self) -> f64 {
        self.refill_per_second
    }

    /// Waits until `n` tokens are available, takes them, and returns how long it waited. A
    /// request larger than the bucket takes the whole bucket (it could never fit otherwise).
    ///
    /// Cancel-safe: a caller dropped while waiting (shutdown) has taken nothing.
    pub async fn acquire(&self, n: u32) -> Duration {
        let need = f64::from(n).min(self.capacity);
        let started = Instant::now();
        let mut state = self.state.lock().await;
        loop {
            let now = Instant::now();
            let earned = now.saturating_duration_since(state.last).as_secs_f64() * self.refill_per_second;
            state.tokens = (state.tokens + earned).min(self.capacity);
            state.last = now;
            if state.tokens + 1e-9 >= need {
                state.tokens = (state.tokens - need).max(0.0);
                break;
            }
            let missing = need - state.tokens;
            // Round up to the next millisecond so the loop does not spin on float dust.
            let wait = Duration::from_secs_f64(missing / self.refill_per_second) + Duration::from_millis(1);
            tokio::time::sleep(wait).await;
        }
        drop(state);
        let waited = started.elapsed();
        if let Some(counter) = &self.waited {
            if !waited.is_zero() {
                counter.inc_by(waited.as_secs_f64());
            }
        }
        waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_lets_a_burst_through_then_paces() {
        let bucket = TokenBucket::new(5, 2.0);
        for _ in 0..5 {
            assert_eq!(bucket.acquire(1).await, Duration::ZERO);
        }
        let waited = bucket.acquire(1).await;
        assert!(waited >= Duration::from_millis(500) && waited <= Duration::from_millis(510), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_capacity_plus_refill_over_any_window() {
        let bucket = Arc::new(TokenBucket::new(10, 20.0));
        let start = Instant::now();
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (bucket, times) = (bucket.clone(), times.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    bucket.acquire(1).await;
                    times.lock().unwrap().push(start.elapsed().as_secs_f64());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut times = times.lock().unwrap().clone();
        times.sort_by(f64::total_cmp);
        assert_eq!(times.len(), 200);
        // 200 tokens, 10 up front, 190 at 20/s: at least 9.5 s.
        assert!(*times.last().unwrap() >= 9.49);
        for (i, &t0) in times.iter().enumerate() {
            for window in [0.1, 0.5, 1.0, 3.0] {
                let n = times[i..].iter().take_while(|&&t| t <= t0 + window).count() as f64;
                assert!(n <= 10.0 + 20.0 * window + 1e-6, "{n} tokens within {window}s of {t0}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_spends_nothing_and_is_served_in_order() {
        let bucket = Arc::new(TokenBucket::new(10, 1.0));
        bucket.acquire(10).await;
        // A big request queues first; small ones behind it must not overtake it.
        let big = {
            let b = bucket.clone();
            tokio::spawn(async move {
                b.acquire(8).await;
                Instant::now()
            })
        };
        tokio::task::yield_now().await;
        let small = {
            let b = bucket.clone();
            tokio::spawn(async move {
                b.acquire(1).await;
                Instant::now()
            })
        };
        let (big, small) = (big.await.unwrap(), small.await.unwrap());
        assert!(big <= small, "first come, first served");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_bucket_still_passes() {
        let bucket = TokenBucket::new(3, 100.0);
        bucket.acquire(50).await;
        assert!(bucket.acquire(1).await > Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_counted() {
        let counter = Counter::new("w", "w").unwrap();
        let bucket = TokenBucket::new(1, 4.0).with_wait_counter(counter.clone());
        bucket.acquire(1).await;
        bucket.acquire(1).await;
        assert!((counter.get() - 0.251).abs() < 0.01, "{}", counter.get());
    }
}
