//! TEMPORARY stand-ins for the shared CDN pieces being built on branch `cdn` (`sink::cdn::http`,
//! `sink::cdn::limit` and the helpers of `sink::cdn`), with the same names and signatures, so
//! the CloudFront and Akamai sinks compile and are tested before that branch lands. Deleted
//! at the merge: the sinks then import the real pieces (`super::` instead of
//! `super::standin::`). Smallest versions that keep the same behaviour; no metrics.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::Secret;
use crate::sink::{Invalidations, ItemKind, Rejected, SinkError, SinkReport};

pub mod limit {
    use std::time::Duration;
    use tokio::sync::Mutex;
    use tokio::time::Instant;

    /// A FIFO token bucket: `capacity` tokens, `refill_per_second` more per second.
    #[derive(Debug)]
    pub struct TokenBucket {
        capacity: f64,
        refill_per_second: f64,
        state: Mutex<(f64, Instant)>,
    }

    impl TokenBucket {
        pub fn new(capacity: u32, refill_per_second: f64) -> TokenBucket {
            let capacity = f64::from(capacity.max(1));
            let refill_per_second = if refill_per_second.is_finite() { refill_per_second.max(1e-6) } else { 1e-6 };
            TokenBucket { capacity, refill_per_second, state: Mutex::new((capacity, Instant::now())) }
        }

        pub async fn acquire(&self, n: u32) -> Duration {
            let need = f64::from(n).min(self.capacity);
            let started = Instant::now();
            let mut state = self.state.lock().await;
            loop {
                let now = Instant::now();
                state.0 = (state.0 + now.saturating_duration_since(state.1).as_secs_f64() * self.refill_per_second)
                    .min(self.capacity);
                state.1 = now;
                if state.0 + 1e-9 >= need {
                    state.0 = (state.0 - need).max(0.0);
                    break;
                }
                let wait =
                    Duration::from_secs_f64((need - state.0) / self.refill_per_second) + Duration::from_millis(1);
                tokio::time::sleep(wait).await;
            }
            started.elapsed()
        }
    }
}

pub mod http {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use reqwest::header::{HeaderMap, RETRY_AFTER};
    use reqwest::StatusCode;

    use super::limit::TokenBucket;
    use crate::retry::{RetryError, RetryPolicy, Verdict};
    use crate::shutdown::Shutdown;
    use crate::sink::SinkError;
    use crate::telemetry::Metrics;

    pub const MESSAGE_CHARS: usize = 300;
    pub const MAX_SERVER_FLOOR: Duration = Duration::from_secs(300);

    pub fn client(timeout: Duration) -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    pub fn classify_with_floor(status: StatusCode, headers: &HeaderMap, provider_floor: Option<Duration>) -> Verdict {
        if status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429) {
            let floor = match (retry_after(headers, SystemTime::now()), provider_floor) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            Verdict::Retry { floor: floor.map(|f| f.min(MAX_SERVER_FLOOR)) }
        } else {
            Verdict::Permanent
        }
    }

    pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
        let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
        if let Ok(secs) = text.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        let at = httpdate::parse_http_date(text).ok()?;
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    }

    #[derive(Debug)]
    pub struct Answer {
        pub status: StatusCode,
        pub headers: HeaderMap,
        pub body: Vec<u8>,
    }

    impl Answer {
        pub fn message(&self) -> String {
            one_line(&String::from_utf8_lossy(&self.body))
        }
    }

    pub fn one_line(text: &str) -> String {
        let squeezed = text.split_whitespace().collect::<Vec<_>>().join(" ");
        squeezed.chars().take(MESSAGE_CHARS).collect()
    }

    #[derive(Debug, Clone, PartialEq, thiserror::Error)]
    pub enum Failure {
        #[error("{message}")]
        Transient { outcome: &'static str, floor: Option<Duration>, message: String },
        #[error("{message}")]
        Permanent { item_level: bool, message: String },
    }

    impl Failure {
        pub fn from_answer(answer: &Answer, provider_floor: Option<Duration>) -> Failure {
            let message = format!("HTTP {}: {}", answer.status.as_u16(), answer.message());
            match classify_with_floor(answer.status, &answer.headers, provider_floor) {
                Verdict::Retry { floor } => {
                    let outcome =
                        if answer.status == StatusCode::TOO_MANY_REQUESTS { "rate_limited" } else { "server_error" };
                    Failure::Transient { outcome, floor, message }
                }
                Verdict::Permanent => Failure::Permanent {
                    item_level: matches!(answer.status.as_u16(), 400 | 413 | 414 | 422 | 431),
                    message,
                },
            }
        }

        pub fn network(error: reqwest::Error) -> Failure {
            Failure::Transient {
                outcome: "network_error",
                floor: None,
                message: format!("network error: {}", one_line(&error.without_url().to_string())),
            }
        }

        pub fn verdict(&self) -> Verdict {
            match self {
                Failure::Transient { floor, .. } => Verdict::Retry { floor: *floor },
                Failure::Permanent { .. } => Verdict::Permanent,
            }
        }

        pub fn is_item_level(&self) -> bool {
            matches!(self, Failure::Permanent { item_level: true, .. })
        }
    }

    pub struct Sender {
        client: reqwest::Client,
        sink: Arc<str>,
        retry: RetryPolicy,
        metrics: Arc<Metrics>,
    }

    impl Sender {
        pub fn new(sink: &str, client: reqwest::Client, retry: RetryPolicy, metrics: Arc<Metrics>) -> Sender {
            Sender { client, sink: sink.into(), retry, metrics }
        }

        pub fn client(&self) -> &reqwest::Client {
            &self.client
        }

        pub fn metrics(&self) -> &Metrics {
            &self.metrics
        }

        pub async fn send<T, Build, Interpret>(
            &self,
            shutdown: &Shutdown,
            _items: usize,
            buckets: &[(&TokenBucket, u32)],
            build: Build,
            interpret: Interpret,
        ) -> Result<Result<T, Failure>, SinkError>
        where
            Build: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
            Interpret: Fn(Answer) -> Result<T, Failure>,
        {
            let (this, build, interpret) = (self, &build, &interpret);
            let attempt = move || async move {
                for (bucket, tokens) in buckets {
                    bucket.acquire(*tokens).await;
                }
                let response = build(&this.client).send().await.map_err(Failure::network)?;
                let status = response.status();
                let headers = response.headers().clone();
                let body = response.bytes().await.map_err(Failure::network)?.to_vec();
                interpret(Answer { status, headers, body })
            };
            let sink = &*self.sink;
            let on_retry = |failure: &Failure, attempt: u32, wait: Duration| {
                tracing::warn!(sink, attempt, wait_ms = wait.as_millis() as u64, error = %failure, "purge request failed; retrying");
            };
            match crate::retry::retry(&self.retry, shutdown, attempt, Failure::verdict, on_retry).await {
                Ok(v) => Ok(Ok(v)),
                Err(RetryError::Permanent(failure)) => Ok(Err(failure)),
                Err(RetryError::Exhausted { attempts, last }) => Ok(Err(Failure::Permanent {
                    item_level: false,
                    message: format!("gave up after {attempts} attempts: {last}"),
                })),
                Err(RetryError::Abandoned { .. }) => Err(SinkError::Abandoned),
            }
        }
    }

    pub async fn reachable(client: &reqwest::Client, url: &str, timeout: Duration) -> bool {
        matches!(tokio::time::timeout(timeout, client.head(url).send()).await, Ok(Ok(_)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CdnError {
    #[error("CDN sink {sink}: {message}")]
    Build { sink: String, message: String },
}

impl CdnError {
    pub fn build(sink: &str, message: impl Into<String>) -> CdnError {
        CdnError::Build { sink: sink.to_string(), message: message.into() }
    }
}

pub(crate) fn default_layer_cdn() -> u8 {
    2
}
pub(crate) fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub items_per_request: Option<usize>,
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub concurrency: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub items_per_request: usize,
    pub requests_per_second: f64,
    pub burst: u32,
    pub concurrency: usize,
}

impl LimitsConfig {
    pub fn resolve(&self, defaults: Limits) -> Limits {
        Limits {
            items_per_request: self.items_per_request.unwrap_or(defaults.items_per_request),
            requests_per_second: self.requests_per_second.unwrap_or(defaults.requests_per_second),
            burst: self.burst.unwrap_or(defaults.burst),
            concurrency: self.concurrency.unwrap_or(defaults.concurrency),
        }
    }

    pub fn validate(&self, defaults: Limits, max_items: usize, problems: &mut Vec<(Vec<String>, String)>) {
        let l = self.resolve(defaults);
        if l.items_per_request == 0 || l.items_per_request > max_items {
            problems.push((
                vec!["limits".into(), "items_per_request".into()],
                format!("limits.items_per_request must be between 1 and {max_items}"),
            ));
        }
        if l.burst == 0 || l.concurrency == 0 || !l.requests_per_second.is_finite() || l.requests_per_second < 0.0 {
            problems.push((vec!["limits".into()], "limits out of range".into()));
        }
    }
}

impl Limits {
    pub fn request_bucket(&self, _sink: &str, _metrics: &crate::telemetry::Metrics) -> Option<limit::TokenBucket> {
        (self.requests_per_second > 0.0).then(|| limit::TokenBucket::new(self.burst, self.requests_per_second))
    }
}

#[derive(Debug, Clone, Default)]
pub struct SecretRef {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
}

impl SecretRef {
    pub fn resolve(
        &self,
        field: &str,
        required: bool,
        config_file: &Path,
        problems: &mut Vec<(Vec<String>, String)>,
    ) -> Option<Secret> {
        match (&self.env, &self.file) {
            (Some(_), Some(_)) => {
                problems.push((vec![format!("{field}_env")], format!("set `{field}_env` or `{field}_file`, not both")));
                None
            }
            (None, None) => {
                if required {
                    problems.push((vec![], format!("`{field}_env` or `{field}_file` is required")));
                }
                None
            }
            (Some(var), None) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Some(Secret::new(v.trim())),
                _ => {
                    problems
                        .push((vec![format!("{field}_env")], format!("`{field}_env` names {var}, which is not set")));
                    None
                }
            },
            (None, Some(file)) => match std::fs::read_to_string(crate::config::relative_to(config_file, file)) {
                Ok(v) if !v.trim().is_empty() => Some(Secret::new(v.trim_end_matches(['\n', '\r']))),
                _ => {
                    problems.push((vec![format!("{field}_file")], format!("`{field}_file` cannot be read")));
                    None
                }
            },
        }
    }
}

pub fn check_base_url(field: &str, value: &str, problems: &mut Vec<(Vec<String>, String)>) {
    if let Err(e) = check_url(value) {
        problems.push((vec![field.to_string()], format!("`{field}` {e}")));
    }
}

pub fn check_url(url: &str) -> Result<reqwest::Url, String> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("URL contains whitespace or a control character".into());
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not an absolute URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err("is not an http(s) URL with a host".into());
    }
    Ok(parsed)
}

pub fn partition(
    batch: &Invalidations,
    kind: ItemKind,
    check: impl Fn(&str) -> Result<(), String>,
    rejected: &mut Vec<Rejected>,
) -> Vec<usize> {
    let mut ok = Vec::new();
    for (index, item) in batch.items(kind).iter().enumerate() {
        match check(item) {
            Ok(()) => ok.push(index),
            Err(reason) => rejected.push(Rejected { kind, index, reason }),
        }
    }
    ok
}

pub fn chunk(
    indices: &[usize],
    max_items: usize,
    max_bytes: Option<usize>,
    size: impl Fn(usize) -> usize,
) -> Vec<Vec<usize>> {
    let max_items = max_items.max(1);
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0usize;
    for &i in indices {
        let s = size(i);
        if current.len() >= max_items || max_bytes.is_some_and(|m| !current.is_empty() && bytes + s > m) {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += s;
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub node: usize,
    pub kind: ItemKind,
    pub items: Vec<usize>,
}

/// Sequential stand-in for the shared `run_jobs` (which runs `per_node` at once): same
/// splitting of item-level rejections.
pub async fn run_jobs<F, Fut>(jobs: Vec<Job>, _per_node: usize, send: F) -> Result<Vec<Rejected>, SinkError>
where
    F: Fn(Job) -> Fut,
    Fut: Future<Output = Result<Result<(), http::Failure>, SinkError>>,
{
    let mut queue: std::collections::VecDeque<Job> = jobs.into();
    let mut rejected: Vec<Rejected> = Vec::new();
    while let Some(job) = queue.pop_front() {
        match send(job.clone()).await? {
            Ok(()) => {}
            Err(failure) if failure.is_item_level() && job.items.len() > 1 => {
                let (a, b) = job.items.split_at(job.items.len() / 2);
                queue.push_front(Job { items: b.to_vec(), ..job.clone() });
                queue.push_front(Job { items: a.to_vec(), ..job });
            }
            Err(failure) => {
                for index in job.items {
                    if !rejected.iter().any(|r| r.kind == job.kind && r.index == index) {
                        rejected.push(Rejected { kind: job.kind, index, reason: failure.to_string() });
                    }
                }
            }
        }
    }
    rejected.sort_by_key(|r| (r.kind, r.index));
    Ok(rejected)
}

pub fn report(batch: &Invalidations, kinds: &[ItemKind], rejected: Vec<Rejected>) -> SinkReport {
    let confirmed = kinds
        .iter()
        .filter_map(|&kind| {
            let total = batch.items(kind).len();
            let bad = rejected.iter().filter(|r| r.kind == kind).count();
            (total > bad).then(|| (kind, (total - bad) as u64))
        })
        .collect();
    SinkReport { confirmed, rejected }
}

pub fn check_key(key: &str, max_bytes: usize) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty surrogate key".into());
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("surrogate key contains whitespace or a control character".into());
    }
    if key.len() > max_bytes {
        return Err(format!("surrogate key is {} bytes, over the provider's {max_bytes}", key.len()));
    }
    Ok(())
}
