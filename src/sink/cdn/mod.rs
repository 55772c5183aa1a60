//! HTTP caches and CDNs: purge surrogate keys and URLs at Varnish, Fastly, Cloudflare, an
//! in-house webhook, Amazon CloudFront (SigV4, [`sigv4`]) and Akamai Fast Purge (EdgeGrid,
//! [`edgegrid`]).
//!
//! Configured under `sinks.cdn` as a list; each entry has a `kind`, a unique `name` and the
//! provider's settings (docs/cdn.md lists them all):
//!
//! ```yaml
//! sinks:
//!   cdn:
//!     - { kind: varnish, name: edge-varnish, nodes: ["http://10.0.0.5:6081"] }
//!     - { kind: fastly, name: fastly, service_id: SU1Z0isxPaozGVKXdv0eY, token_env: FASTLY_TOKEN }
//! ```
//!
//! # Shared pieces (every provider uses them; keep their names)
//!
//! - [`CdnSinkConfig`]: the serde enum of providers. Every variant has `name`, `layer`, `limits`
//!   ([`LimitsConfig`], resolved against the provider's defaults into [`Limits`]), `retry`,
//!   `timeout`, an optional `verify` ([`verify::VerifyConfig`]), and credentials only as
//!   `*_env` / `*_file` ([`SecretRef`], the one convention of [`crate::config::secret`]): never
//!   inline, never `Serialize`, never in `Debug`, logs, errors or `explain`. Tokens are
//!   [`RotatingSecret`]s: a rotated file is picked up on use, and a 401/403 reads it again
//!   and sends once more before the refusal counts ([`http::Sender::with_reload`]).
//! - [`limit::TokenBucket`]: the client-side rate limit, one per provider limit.
//! - [`http::Sender`]: sends one request with rate limits, retries ([`http::classify`]: network
//!   errors, 429, 5xx retry, honouring `Retry-After` and reset headers; other 4xx are
//!   permanent with the provider's message) and metrics.
//! - [`Job`] and [`run_jobs`]: a batch cut into requests (by node, kind and size), sent with at
//!   most `concurrency` in flight per node; a permanent, item-level rejection of a multi-item
//!   request is split in halves until the culprit is found, so one bad key does not
//!   dead-letter 255 good ones.
//! - [`check_key`], [`check_url`]: bad items (spaces, over the provider's size, not an absolute
//!   URL) are rejected before anything is sent; the pipeline dead-letters the events that asked
//!   for them with the reason.
//! - [`report`]: the [`SinkReport`] from what was rejected.
//!
//! - [`purge`]: the one HTTP purge sink. Every provider's `invalidate` is [`purge::purge`]:
//!   check items → cut into [`Job`]s → [`run_jobs`] → verify → [`report`]; the provider
//!   supplies only [`purge::Provider`] (kinds, item check, how to cut when the default does not
//!   fit, request building and answer interpretation through [`http::Sender::send`]).
//!
//! # Adding a provider
//!
//! A file `<provider>.rs` with a `<Provider>Config` (`#[serde(deny_unknown_fields)]`, the
//! common fields above, `fn validate`), a struct implementing [`purge::Provider`] and the line
//! `purge_sink!(<Provider>Sink);`. Then one line in the `cdn_providers!` invocation below
//! (`<Provider> <provider>: <Provider>Config => <Provider>Sink;`), which also declares the module.
//!
//! # Order and timing
//!
//! `layer` orders sinks (Redis is 0; Varnish-like caches default to 1, CDNs to 2): the
//! pipeline purges a layer only after every inner layer confirmed the batch, waits
//! `sinks.timing.layer_delay` between layers, and optionally repeats the whole batch after
//! `sinks.timing.repeat_after` (see [`crate::pipeline`]).

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use serde::Deserialize;

pub use crate::config::secret::{Need, Reload, Reloaded, RotatingSecret, SecretRef};
use crate::sink::{Invalidations, ItemKind, Rejected, Sink, SinkError, SinkReport};
use crate::telemetry::Metrics;

pub mod aws_credentials;
pub mod edgegrid;
pub mod http;
pub mod limit;
pub mod purge;
pub mod sigv4;
pub mod verify;

use http::Failure;
use limit::TokenBucket;

/// The registry of providers: each line is `Variant module: Config => Sink;`, where `module`
/// (the variant in lower case) is both the file and the `kind` value. It declares the modules
/// and defines [`CdnSinkConfig`] with the methods that dispatch on it.
macro_rules! cdn_providers {
    ($($variant:ident $module:ident: $config:ident => $sink:ident;)+) => {
        $(pub mod $module;)+

        /// One entry of `sinks.cdn`.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "kind", rename_all = "lowercase")]
        pub enum CdnSinkConfig {
            $($variant($module::$config),)+
        }

        impl CdnSinkConfig {
            pub fn name(&self) -> &str {
                match self {
                    $(CdnSinkConfig::$variant(c) => &c.name,)+
                }
            }

            /// The provider, as spelled in `kind`.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(CdnSinkConfig::$variant(_) => stringify!($module),)+
                }
            }

            /// The sink's layer: inner layers are purged first.
            pub fn layer(&self) -> u8 {
                match self {
                    $(CdnSinkConfig::$variant(c) => c.layer,)+
                }
            }

            /// The provider's own checks (see [`CdnSinkConfig::validate`]).
            fn validate_provider(&mut self, config_file: &Path, problems: &mut Vec<(Vec<String>, String)>) {
                match self {
                    $(CdnSinkConfig::$variant(c) => c.validate(config_file, problems),)+
                }
            }

            /// The settings every provider has, for the shared range checks: the retry policy,
            /// the request timeout, and the optional verification.
            pub(crate) fn shared_settings(&self) -> (&crate::retry::RetryPolicy, Duration, Option<&verify::VerifyConfig>) {
                match self {
                    $(CdnSinkConfig::$variant(c) => (&c.retry, c.timeout, c.verify.as_ref()),)+
                }
            }

            /// Builds the sink (no network traffic: the daemon starts while a provider is down).
            pub fn build(&self, metrics: Arc<Metrics>) -> Result<Arc<dyn Sink>, CdnError> {
                Ok(match self {
                    $(CdnSinkConfig::$variant(c) => Arc::new($module::$sink::new(c, metrics)?),)+
                })
            }
        }
    };
}

cdn_providers! {
    Varnish varnish: VarnishConfig => VarnishSink;
    Fastly fastly: FastlyConfig => FastlySink;
    Cloudflare cloudflare: CloudflareConfig => CloudflareSink;
    Webhook webhook: WebhookConfig => WebhookSink;
    Cloudfront cloudfront: CloudfrontConfig => CloudfrontSink;
    Akamai akamai: AkamaiConfig => AkamaiSink;
}

impl CdnSinkConfig {
    /// Checks the settings and resolves credentials. Each problem is (path below this entry,
    /// sentence); the config loader adds file, line and column.
    pub fn validate(&mut self, config_file: &Path) -> Vec<(Vec<String>, String)> {
        let mut problems = Vec::new();
        if self.name().trim().is_empty() {
            problems.push((vec!["name".to_string()], "a CDN sink needs a non-empty `name`".to_string()));
        }
        self.validate_provider(config_file, &mut problems);
        problems
    }
}

/// `sinks.cdn`: each entry's own checks, its shared ranges, and unique names.
impl crate::sink::config::SinkSection for Vec<CdnSinkConfig> {
    fn is_configured(&self) -> bool {
        !self.is_empty()
    }

    fn validate(
        &mut self,
        origin: &crate::config::Origin,
        names: &mut std::collections::HashSet<String>,
        problems: &mut Vec<crate::config::Problem>,
    ) {
        use crate::config::ranges::{Ranges, HOUR, MS, TEN_MINUTES};
        for (i, sink) in self.iter_mut().enumerate() {
            let idx = i.to_string();
            for (path, message) in sink.validate(origin.file) {
                let mut at = vec!["sinks", "cdn", idx.as_str()];
                at.extend(path.iter().map(String::as_str));
                problems.push(origin.problem(&at, format!("sinks.cdn[{i}] ({}): {message}", sink.name())));
            }
            if !names.insert(sink.name().to_string()) {
                problems.push(origin.problem(
                    &["sinks", "cdn", &idx, "name"],
                    format!("sinks.cdn[{i}]: the sink name {:?} is used twice (names label metrics)", sink.name()),
                ));
            }
            let (retry, timeout, verify) = sink.shared_settings();
            let mut r = Ranges::new(origin, problems);
            r.retry(&["sinks", "cdn", &idx, "retry"], retry);
            r.duration(&["sinks", "cdn", &idx, "timeout"], timeout, MS, TEN_MINUTES);
            if let Some(v) = verify {
                r.duration(&["sinks", "cdn", &idx, "verify", "delay"], v.delay, Duration::ZERO, HOUR);
                r.duration(&["sinks", "cdn", &idx, "verify", "timeout"], v.timeout, MS, TEN_MINUTES);
                r.duration(&["sinks", "cdn", &idx, "verify", "age_slack"], v.age_slack, Duration::ZERO, HOUR);
            }
        }
    }

    fn check(&self, origin: &crate::config::Origin, problems: &mut Vec<crate::config::Problem>) {
        // A registry of its own: building registers each sink's series.
        let metrics = Arc::new(Metrics::new());
        for (i, cdn) in self.iter().enumerate() {
            if let Err(e) = cdn.build(metrics.clone()) {
                problems.push(origin.problem(&["sinks", "cdn", &i.to_string()], format!("sinks.cdn[{i}]: {e}")));
            }
        }
    }

    fn build(&self, metrics: &Arc<Metrics>, out: &mut crate::sink::config::Layered) -> Result<(), String> {
        for cdn in self {
            out.push((cdn.layer(), cdn.build(metrics.clone()).map_err(|e| e.to_string())?));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CdnError {
    /// A setting validation should have caught, or the TLS backend failing to initialise.
    #[error("CDN sink {sink}: {message}")]
    Build { sink: String, message: String },
}

impl CdnError {
    pub fn build(sink: &str, message: impl Into<String>) -> CdnError {
        CdnError::Build { sink: sink.to_string(), message: message.into() }
    }
}

pub(crate) fn default_layer_cache() -> u8 {
    1
}
pub(crate) fn default_layer_cdn() -> u8 {
    2
}
pub(crate) fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `sinks.cdn[].limits`: every field optional, defaulting to the provider's documented limit
/// (shared/reference/cdn-apis.md; see each provider's `DEFAULT_LIMITS`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Items (surrogate keys or URLs) per purge request.
    pub items_per_request: Option<usize>,
    /// Sustained purge requests per second allowed by the client-side token bucket; `0` turns
    /// the client-side limit off (the provider's 429s are still honoured).
    pub requests_per_second: Option<f64>,
    /// The token bucket's capacity: requests that may go out at once after a quiet period.
    pub burst: Option<u32>,
    /// Requests in flight at once, per node (Varnish) or per API endpoint (CDNs).
    pub concurrency: Option<usize>,
}

/// Limits after defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub items_per_request: usize,
    /// 0: no client-side rate limit.
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

    /// Range checks against the provider's hard maximum of items per request.
    pub fn validate(&self, defaults: Limits, max_items: usize, problems: &mut Vec<(Vec<String>, String)>) {
        let l = self.resolve(defaults);
        let at = |f: &str| vec!["limits".to_string(), f.to_string()];
        if l.items_per_request == 0 || l.items_per_request > max_items {
            problems
                .push((at("items_per_request"), format!("limits.items_per_request must be between 1 and {max_items}")));
        }
        if !l.requests_per_second.is_finite() || l.requests_per_second < 0.0 {
            problems.push((at("requests_per_second"), "limits.requests_per_second must be 0 (off) or positive".into()));
        }
        if l.burst == 0 {
            problems.push((at("burst"), "limits.burst must be at least 1".into()));
        }
        if l.concurrency == 0 || l.concurrency > 1024 {
            problems.push((at("concurrency"), "limits.concurrency must be between 1 and 1024".into()));
        }
    }
}

impl Limits {
    /// The request token bucket, or `None` when the client-side limit is off.
    pub fn request_bucket(&self, sink: &str, metrics: &Metrics) -> Option<TokenBucket> {
        (self.requests_per_second > 0.0).then(|| {
            TokenBucket::new(self.burst, self.requests_per_second)
                .with_wait_counter(crate::telemetry::events::sink_cdn::rate_limit_wait(metrics, sink))
        })
    }
}

/// Checks a base URL setting (an API base, a Varnish node, a webhook): absolute http(s).
pub fn check_base_url(field: &str, value: &str, problems: &mut Vec<(Vec<String>, String)>) {
    if let Err(e) = check_url(value) {
        problems.push((vec![field.to_string()], format!("`{field}` {e}")));
    }
}

/// An API base URL setting (validated before) and its `host[:port]`, as signed requests name it.
pub fn base_and_host(sink: &str, field: &str, value: &str) -> Result<(reqwest::Url, String), CdnError> {
    let url = check_url(value).map_err(|e| CdnError::build(sink, format!("{field} {e}")))?;
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        (None, _) => return Err(CdnError::build(sink, format!("{field} has no host"))),
    };
    Ok((url, host))
}

/// A surrogate key (tag) a provider accepts: not empty, no whitespace or control characters
/// (keys travel space-separated in headers), at most `max_bytes` bytes.
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

/// An absolute `http://` or `https://` URL with a host and no whitespace.
pub fn check_url(url: &str) -> Result<reqwest::Url, String> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("URL contains whitespace or a control character".into());
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not an absolute URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("is not an http(s) URL (scheme {})", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("URL has no host".into());
    }
    Ok(parsed)
}

/// Splits one kind's items of `batch` into those that pass `check` and rejections.
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

/// Cuts `indices` into requests of at most `max_items` items and, when `max_bytes` is set, at
/// most that many bytes by `size` (an item larger than `max_bytes` alone is its own request).
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
        let full = current.len() >= max_items || max_bytes.is_some_and(|m| !current.is_empty() && bytes + s > m);
        if full {
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

/// One purge request's worth of work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Which node (Varnish) or endpoint; `0` for single-endpoint providers. Concurrency is
    /// limited per node.
    pub node: usize,
    pub kind: ItemKind,
    /// Indices into the batch's list of `kind`.
    pub items: Vec<usize>,
}

impl Job {
    /// The job's items, read from the batch it was cut from.
    pub fn values<'a>(&self, batch: &'a Invalidations) -> Vec<&'a str> {
        self.items.iter().map(|&i| item(batch, self.kind, i)).collect()
    }
}

/// Item `index` of `kind` in `batch`; empty when out of range, which an index from
/// [`partition`] over the same batch never is.
pub fn item(batch: &Invalidations, kind: ItemKind, index: usize) -> &str {
    batch.items(kind).get(index).map_or("", String::as_str)
}

/// Sends every job through `send`, at most `per_node` in flight per node, and collects the
/// items rejected for good (each item once, with the first reason).
///
/// A permanent item-level failure ([`Failure::is_item_level`]) of a job with several items is
/// split in halves and both halves are sent again, down to single items: only the culprit is
/// dead-lettered. `Err` only when shutdown abandons the work (or a sink reports a fatal error).
pub async fn run_jobs<F, Fut>(jobs: Vec<Job>, per_node: usize, send: F) -> Result<Vec<Rejected>, SinkError>
where
    F: Fn(Job) -> Fut,
    Fut: Future<Output = Result<Result<(), Failure>, SinkError>>,
{
    let per_node = per_node.max(1);
    let nodes = jobs.iter().map(|j| j.node + 1).max().unwrap_or(0);
    let mut queues: Vec<VecDeque<Job>> = vec![VecDeque::new(); nodes];
    for job in jobs {
        queues[job.node].push_back(job);
    }
    let mut busy = vec![0usize; nodes];
    let mut in_flight = FuturesUnordered::new();
    let mut rejected: Vec<Rejected> = Vec::new();
    let send = &send;
    loop {
        for node in 0..nodes {
            while busy[node] < per_node {
                let Some(job) = queues[node].pop_front() else { break };
                busy[node] += 1;
                in_flight.push(async move {
                    let result = send(job.clone()).await;
                    (job, result)
                });
            }
        }
        let Some((job, result)) = in_flight.next().await else { break };
        busy[job.node] -= 1;
        match result? {
            Ok(()) => {}
            Err(failure) if failure.is_item_level() && job.items.len() > 1 => {
                let (a, b) = job.items.split_at(job.items.len() / 2);
                let queue = &mut queues[job.node];
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

/// The report for a batch: every item of `kinds` confirmed except the rejected ones.
pub fn report(batch: &Invalidations, kinds: &[ItemKind], rejected: Vec<Rejected>) -> SinkReport {
    let confirmed = kinds
        .iter()
        .filter_map(|&kind| {
            let total = batch.items(kind).len();
            let bad = rejected.iter().filter(|r| r.kind == kind).count();
            (total > bad).then(|| (kind, (total - bad) as u64))
        })
        .collect();
    SinkReport { confirmed, rejected, removed: 0 }
}

/// The end of every provider's `invalidate`: rejections in batch order (each item once), the
/// optional freshness check ([`verify`]) started on what was confirmed, and the [`report`].
pub fn finish(
    batch: &Invalidations,
    kinds: &[ItemKind],
    mut rejected: Vec<Rejected>,
    verifier: Option<&verify::Verifier>,
) -> SinkReport {
    rejected.sort_by_key(|r| (r.kind, r.index));
    rejected.dedup_by_key(|r| (r.kind, r.index));
    if let Some(v) = verifier {
        v.after_purge(batch, &rejected, std::time::Instant::now());
    }
    report(batch, kinds, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[test]
    fn keys_and_urls_are_checked() {
        assert!(check_key("product-42", 1024).is_ok());
        assert!(check_key("product 42", 1024).unwrap_err().contains("whitespace"));
        assert!(check_key("", 1024).is_err());
        assert!(check_key(&"k".repeat(1025), 1024).unwrap_err().contains("1025 bytes"));
        assert!(check_url("https://shop.example.com/p/a%20b?x=1").is_ok());
        assert!(check_url("/p/42").is_err());
        assert!(check_url("shop.example.com/p/42").is_err());
        assert!(check_url("ftp://shop.example.com/x").is_err());
        assert!(check_url("https://shop.example.com/p/a b").is_err());
    }

    #[test]
    fn chunks_respect_items_and_bytes() {
        let idx: Vec<usize> = (0..10).collect();
        assert_eq!(chunk(&idx, 4, None, |_| 1).iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(chunk(&idx, 100, Some(25), |_| 10).iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 2, 2, 2]);
        assert_eq!(chunk(&[0, 1], 100, Some(5), |_| 10).len(), 2, "an oversized item is its own request");
        assert!(chunk(&[], 3, None, |_| 1).is_empty());
    }

    #[tokio::test]
    async fn an_item_level_rejection_is_narrowed_to_the_culprit() {
        let calls = AtomicUsize::new(0);
        let jobs = vec![Job { node: 0, kind: ItemKind::SurrogateKey, items: (0..16).collect() }];
        let rejected = run_jobs(jobs, 2, |job| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if job.items.contains(&11) {
                    Ok(Err(Failure::Permanent { item_level: true, message: "HTTP 400: bad key".into() }))
                } else {
                    Ok(Ok(()))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(
            rejected,
            vec![Rejected { kind: ItemKind::SurrogateKey, index: 11, reason: "HTTP 400: bad key".into() }]
        );
        // 1 + 2 + 2 + 2 + 2 requests: a binary search, not one request per item.
        assert_eq!(calls.load(Ordering::SeqCst), 9);
    }

    #[tokio::test]
    async fn a_credentials_rejection_rejects_the_whole_request_once() {
        let jobs = vec![
            Job { node: 0, kind: ItemKind::Url, items: vec![0, 1, 2] },
            Job { node: 1, kind: ItemKind::Url, items: vec![0, 1, 2] },
        ];
        let rejected = run_jobs(jobs, 1, |_| async {
            Ok(Err(Failure::Permanent { item_level: false, message: "HTTP 403: Forbidden".into() }))
        })
        .await
        .unwrap();
        assert_eq!(rejected.len(), 3, "each item once although both nodes refused it");
    }

    #[tokio::test]
    async fn concurrency_is_bounded_per_node() {
        let now = Mutex::new([0usize; 3]);
        let peak = Mutex::new([0usize; 3]);
        let jobs: Vec<Job> =
            (0..30).map(|i| Job { node: i % 3, kind: ItemKind::SurrogateKey, items: vec![i] }).collect();
        run_jobs(jobs, 2, |job| {
            let (now, peak) = (&now, &peak);
            async move {
                {
                    let mut n = now.lock().unwrap();
                    n[job.node] += 1;
                    let mut p = peak.lock().unwrap();
                    p[job.node] = p[job.node].max(n[job.node]);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                now.lock().unwrap()[job.node] -= 1;
                Ok(Ok(()))
            }
        })
        .await
        .unwrap();
        assert_eq!(*peak.lock().unwrap(), [2, 2, 2]);
    }

    #[test]
    fn report_counts_what_was_not_rejected() {
        let batch = Invalidations::of(ItemKind::SurrogateKey, vec!["a".into(), "b".into()])
            .with(ItemKind::Url, vec!["u".into()]);
        let r = report(
            &batch,
            &[ItemKind::SurrogateKey, ItemKind::Url],
            vec![Rejected { kind: ItemKind::Url, index: 0, reason: "x".into() }],
        );
        assert_eq!(r.confirmed, vec![(ItemKind::SurrogateKey, 2)]);
        assert_eq!(r.rejected.len(), 1);
    }
}
