//! The one way CDN sinks talk HTTP: send a purge request, classify the answer, retry what is
//! worth retrying, count everything.
//!
//! ```text
//! Sender::send(buckets, build, interpret)
//!   loop (crate::retry: exponential backoff, full jitter, floor from Retry-After / reset headers)
//!     ├─ take tokens from every bucket the request costs (waiting is counted)
//!     ├─ build() the request afresh (bodies and signatures are per attempt), send it
//!     ├─ interpret(Answer) -> Ok(T) | Err(Failure)       (provider-specific: Cloudflare reads
//!     │                                                    `success` in a 200 body)
//!     └─ Failure::Transient -> retry; Failure::Permanent -> hand back for dead-lettering
//! ```
//!
//! The split, for every provider (shared/reference/cdn-apis.md): network errors, timeouts, 408,
//! 425, 429 and 5xx are transient; any other 4xx is permanent and carries the provider's own
//! message to the dead letter. A permanent failure of a multi-item request is
//! `Failure::Permanent { item_level: true }` when the provider blames the request's content
//! (400, 413, 414, 422, 431, or an error inside a 200 body) so the caller can split it to find
//! the culprit, and not when it blames the credentials or the account (401, 403, 404, 405...),
//! where every item shares the fate. 401 and 403 are [`Failure::Unauthorized`]: before they
//! count as permanent, the sender reads the sink's credentials again ([`Sender::with_reload`])
//! and, when they changed (a rotated token file, refreshed AWS credentials), sends once more.
//!
//! Messages never include a credential: requests carry them in headers only, reqwest's errors
//! are stripped of the URL, and provider bodies are cut to [`MESSAGE_CHARS`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use super::limit::TokenBucket;
use crate::config::secret::{Reload, Reloaded};
use crate::retry::{RetryError, RetryPolicy, Verdict};
use crate::shutdown::Shutdown;
use crate::sink::SinkError;
use crate::telemetry::events::sink::{ErrorClass, SinkPinged};
use crate::telemetry::events::sink_cdn::{
    CdnCounters, CredentialsReloaded, PurgeAttempted, PurgeOutcome, PurgeRequestBuilt, PurgeRetried,
};
use crate::telemetry::Metrics;

/// How much of a provider's error body goes into a dead letter or a log line.
pub const MESSAGE_CHARS: usize = 300;

/// The longest wait a server may impose through `Retry-After` or a reset header: a broken
/// clock or a typo must not park a sink for a day. Longer hints are clamped (and the retry
/// policy's own backoff still applies on top).
pub const MAX_SERVER_FLOOR: Duration = Duration::from_secs(300);

/// The HTTP client every CDN sink uses: one connection pool per sink, `timeout` per attempt
/// (connect included), no proxy taken from the environment (a purge must reach the configured
/// host, not whatever `HTTP_PROXY` says), no redirects (a redirected purge is a configuration
/// error to surface, not to follow with credentials attached).
pub fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cdc-invalidator/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// The retry decision for an HTTP status: 408, 425, 429 and 5xx retry (not before the
/// `Retry-After` the server sent, seconds or an HTTP date); every other 4xx is permanent.
/// 1xx-3xx are not failures and are never passed here by the sinks; if they are, they count as
/// permanent (a redirect we do not follow will not change by retrying).
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Verdict {
    classify_with_floor(status, headers, None)
}

/// [`classify`], with a provider's own reset hint (e.g. [`epoch_reset`] of
/// `Fastly-RateLimit-Reset`): the floor is the later of the two.
pub fn classify_with_floor(status: StatusCode, headers: &HeaderMap, provider_floor: Option<Duration>) -> Verdict {
    if is_transient(status) {
        let floor = match (retry_after(headers, SystemTime::now()), provider_floor) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Verdict::Retry { floor: floor.map(|f| f.min(MAX_SERVER_FLOOR)) }
    } else {
        Verdict::Permanent
    }
}

fn is_transient(status: StatusCode) -> bool {
    status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429)
}

/// `Retry-After` as a wait from `now`: delta-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A reset header holding the Unix time (seconds) at which the provider's limit refills, such
/// as `Fastly-RateLimit-Reset`, as a wait from now.
pub fn epoch_reset(headers: &HeaderMap, name: &str) -> Option<Duration> {
    let secs: u64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
    // Checked: `+` panics past what `SystemTime` holds (a reset of u64::MAX seconds); a time
    // that cannot be represented is no hint, like one that does not parse.
    let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// A whole HTTP answer (the body is small: purge APIs answer with a few hundred bytes).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as one line of at most [`MESSAGE_CHARS`] characters: the provider's message.
    pub fn message(&self) -> String {
        one_line(&String::from_utf8_lossy(&self.body))
    }
}

/// Squeezes a provider's text into one short line.
pub fn one_line(text: &str) -> String {
    let squeezed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if squeezed.chars().count() <= MESSAGE_CHARS {
        squeezed
    } else {
        let cut: String = squeezed.chars().take(MESSAGE_CHARS).collect();
        format!("{cut}…")
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    /// Worth another attempt, not before `floor`. `outcome` is the metric label.
    #[error("{message}")]
    Transient { outcome: PurgeOutcome, floor: Option<Duration>, message: String },
    /// Retrying cannot help: the items go to the dead-letter destination with `message`.
    /// `item_level`: the provider blamed the request's content, so splitting a multi-item
    /// request can isolate the culprit; otherwise (credentials, a missing zone) every item of
    /// the request shares the fate.
    #[error("{message}")]
    Permanent { item_level: bool, message: String },
    /// 401 or 403: the provider refused the credentials. Permanent too, for every item of the
    /// request, unless reading the credentials again finds new ones ([`Sender::with_reload`]).
    #[error("{message}")]
    Unauthorized { message: String },
}

impl Failure {
    /// The failure for a non-success answer, with the provider's message, by [`classify`].
    pub fn from_answer(answer: &Answer, provider_floor: Option<Duration>) -> Failure {
        let message = format!("HTTP {}: {}", answer.status.as_u16(), answer.message());
        match classify_with_floor(answer.status, &answer.headers, provider_floor) {
            Verdict::Retry { floor } => {
                let outcome = if answer.status == StatusCode::TOO_MANY_REQUESTS {
                    PurgeOutcome::RateLimited
                } else {
                    PurgeOutcome::ServerError
                };
                Failure::Transient { outcome, floor, message }
            }
            Verdict::Permanent if matches!(answer.status.as_u16(), 401 | 403) => Failure::Unauthorized { message },
            Verdict::Permanent => Failure::Permanent {
                item_level: matches!(answer.status.as_u16(), 400 | 413 | 414 | 422 | 431),
                message,
            },
        }
    }

    /// A network error, a timeout, a body cut short: always transient. The URL is left out
    /// of the message (a webhook URL may carry a token).
    pub fn network(error: reqwest::Error) -> Failure {
        let kind = if error.is_timeout() { "timed out" } else { "network error" };
        Failure::Transient {
            outcome: PurgeOutcome::NetworkError,
            floor: None,
            message: format!("{kind}: {}", one_line(&error.without_url().to_string())),
        }
    }

    pub fn verdict(&self) -> Verdict {
        match self {
            Failure::Transient { floor, .. } => Verdict::Retry { floor: *floor },
            Failure::Permanent { .. } | Failure::Unauthorized { .. } => Verdict::Permanent,
        }
    }

    /// The same failure with another sentence (a provider's own reading of its error body).
    pub fn with_message(self, message: String) -> Failure {
        match self {
            Failure::Transient { outcome, floor, .. } => Failure::Transient { outcome, floor, message },
            Failure::Permanent { item_level, .. } => Failure::Permanent { item_level, message },
            Failure::Unauthorized { .. } => Failure::Unauthorized { message },
        }
    }

    fn outcome(&self) -> PurgeOutcome {
        match self {
            Failure::Transient { outcome, .. } => *outcome,
            Failure::Permanent { .. } | Failure::Unauthorized { .. } => PurgeOutcome::Rejected,
        }
    }

    pub fn is_item_level(&self) -> bool {
        matches!(self, Failure::Permanent { item_level: true, .. })
    }
}

/// The default interpretation: any 2xx is success, everything else goes through [`classify`].
pub fn expect_success(answer: Answer) -> Result<Answer, Failure> {
    if answer.status.is_success() {
        Ok(answer)
    } else {
        Err(Failure::from_answer(&answer, None))
    }
}

/// Sends one sink's requests: rate limits, retries, metrics. Cheap to share by reference.
pub struct Sender {
    client: reqwest::Client,
    sink: Arc<str>,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
    /// What this sink reports, its series resolved once (requests report per attempt).
    telemetry: CdnCounters,
    /// The sink's credentials, read again when the provider refuses them (401/403).
    reload: Option<Arc<dyn Reload>>,
}

impl Sender {
    pub fn new(sink: &str, client: reqwest::Client, retry: RetryPolicy, metrics: Arc<Metrics>) -> Sender {
        let telemetry = CdnCounters::register(&metrics, sink);
        Sender { client, sink: sink.into(), retry, metrics, telemetry, reload: None }
    }

    /// Credentials to read again when the provider answers 401/403: when they changed, the
    /// request is sent once more (with its own retries) before the refusal counts, so a
    /// rotation at the provider that is ahead of ours costs one refused request, not a dead
    /// letter. `build` must read the credentials per attempt for the new ones to be used.
    pub fn with_reload(mut self, reload: Arc<dyn Reload>) -> Sender {
        self.reload = Some(reload);
        self
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sends one purge request of `items` items until `interpret` accepts an answer or
    /// declares a permanent failure (returned as `Ok(Err(failure))`, for dead-lettering).
    ///
    /// Before every attempt (retries too: a retry is a request the provider counts) it takes
    /// from each `(bucket, tokens)`. `build` is called per attempt so signatures and
    /// timestamps are fresh. Transient failures are retried with the sink's policy, never
    /// sooner than the floor they carry; `Err` only when shutdown abandons the work. When
    /// `retry.max_attempts` runs out, the last failure is returned as permanent (the items
    /// are dead-lettered rather than the daemon stopped).
    pub async fn send<T, Build, Interpret>(
        &self,
        shutdown: &Shutdown,
        items: usize,
        buckets: &[(&TokenBucket, u32)],
        build: Build,
        interpret: Interpret,
    ) -> Result<Result<T, Failure>, SinkError>
    where
        Build: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        Interpret: Fn(Answer) -> Result<T, Failure>,
    {
        let sink = &*self.sink;
        self.telemetry.emit(PurgeRequestBuilt { items });
        // Copies of references, so each attempt's future owns what it borrows.
        let (this, build, interpret) = (self, &build, &interpret);
        let attempt = move || async move {
            for (bucket, tokens) in buckets {
                bucket.acquire(*tokens).await;
            }
            let in_flight = InFlight::enter(this.telemetry.in_flight().clone());
            let started = std::time::Instant::now();
            let result = this.attempt(build, interpret).await;
            drop(in_flight);
            let (outcome, failure) = match &result {
                Ok(_) => (PurgeOutcome::Ok, None),
                Err(f @ Failure::Transient { .. }) => (f.outcome(), Some(ErrorClass::Retriable)),
                Err(f @ (Failure::Permanent { .. } | Failure::Unauthorized { .. })) => {
                    (f.outcome(), Some(ErrorClass::Permanent))
                }
            };
            this.telemetry.emit(PurgeAttempted { took: started.elapsed(), outcome, failure });
            result
        };
        let on_retry = |failure: &Failure, attempt: u32, wait: Duration| {
            self.telemetry.emit(PurgeRetried { attempt, wait, error: failure });
        };
        let mut outcome = crate::retry::retry(&self.retry, shutdown, attempt, Failure::verdict, on_retry).await;
        if let (Err(RetryError::Permanent(Failure::Unauthorized { message })), Some(reload)) = (&outcome, &self.reload)
        {
            let reloaded = reload.reload().await;
            self.telemetry.emit(CredentialsReloaded { reloaded: &reloaded, refusal: message });
            if let Reloaded::Changed = reloaded {
                outcome = crate::retry::retry(&self.retry, shutdown, attempt, Failure::verdict, on_retry).await;
            }
        }
        match outcome {
            Ok(v) => Ok(Ok(v)),
            Err(RetryError::Permanent(failure)) => {
                tracing::warn!(sink, items, error = %failure, "purge request rejected; its items go to the dead-letter destination");
                Ok(Err(failure))
            }
            Err(RetryError::Exhausted { attempts, last }) => {
                tracing::error!(sink, attempts, error = %last, "giving up on a purge request: retry.max_attempts reached; its items go to the dead-letter destination");
                Ok(Err(Failure::Permanent {
                    item_level: false,
                    message: format!("gave up after {attempts} attempts: {last}"),
                }))
            }
            Err(RetryError::Abandoned { attempts, .. }) => {
                tracing::warn!(sink, attempts, "shutdown abandoned a purge request before the provider confirmed it");
                Err(SinkError::Abandoned)
            }
        }
    }

    /// The readiness probe: whether `url` answers HTTP at all ([`reachable`]), recorded in
    /// `sink_up` for this sink.
    pub async fn ping(&self, url: &str) -> bool {
        let up = reachable(&self.client, url, Duration::from_secs(2)).await;
        self.metrics.emit(SinkPinged { sink: &self.sink, up });
        up
    }

    async fn attempt<T>(
        &self,
        build: &impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        interpret: &impl Fn(Answer) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let response = build(&self.client).send().await.map_err(Failure::network)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(Failure::network)?.to_vec();
        interpret(Answer { status, headers, body })
    }
}

/// Counts one request in flight until dropped (also when shutdown drops the attempt midway).
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn enter(gauge: prometheus::IntGauge) -> InFlight {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Whether anything answers HTTP at `url` within `timeout` (any status: a 404 from an API root
/// still proves the provider is reachable). For `/readyz`; never retried.
pub async fn reachable(client: &reqwest::Client, url: &str, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, client.head(url).send()).await, Ok(Ok(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn floor(v: Verdict) -> Option<Duration> {
        match v {
            Verdict::Retry { floor } => floor,
            Verdict::Permanent => panic!("expected a retry"),
        }
    }

    #[test]
    fn statuses_split_into_retriable_and_permanent() {
        for s in [429, 500, 502, 503, 504, 507, 408] {
            assert!(
                matches!(classify(StatusCode::from_u16(s).unwrap(), &HeaderMap::new()), Verdict::Retry { .. }),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 405, 413, 422] {
            assert!(matches!(classify(StatusCode::from_u16(s).unwrap(), &HeaderMap::new()), Verdict::Permanent), "{s}");
        }
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        let h = headers(&[("retry-after", "7")]);
        assert_eq!(floor(classify(StatusCode::TOO_MANY_REQUESTS, &h)), Some(Duration::from_secs(7)));
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let h = headers(&[("retry-after", &date)]);
        let wait = retry_after(&h, now).unwrap();
        assert!(wait <= Duration::from_secs(30) && wait >= Duration::from_secs(29), "{wait:?}");
        // A date in the past means "now"; garbage means no hint.
        let h = headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
    }

    #[test]
    fn provider_reset_header_and_clamp() {
        let reset = (SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap() + Duration::from_secs(20))
            .as_secs()
            .to_string();
        let h = headers(&[("fastly-ratelimit-reset", &reset), ("retry-after", "2")]);
        let f =
            floor(classify_with_floor(StatusCode::TOO_MANY_REQUESTS, &h, epoch_reset(&h, "Fastly-RateLimit-Reset")))
                .unwrap();
        assert!(f >= Duration::from_secs(18) && f <= Duration::from_secs(20), "{f:?}");
        let h = headers(&[("retry-after", "999999")]);
        assert_eq!(floor(classify(StatusCode::SERVICE_UNAVAILABLE, &h)), Some(MAX_SERVER_FLOOR));
    }

    /// A provider's reset header is remote input: u64::MAX seconds made `UNIX_EPOCH + secs`
    /// panic (overflow) in the sink's task. It is no hint now; a far but representable reset is
    /// clamped like any server floor.
    #[test]
    fn an_unrepresentable_reset_is_no_hint() {
        let h = headers(&[("fastly-ratelimit-reset", &u64::MAX.to_string())]);
        assert_eq!(epoch_reset(&h, "Fastly-RateLimit-Reset"), None);
        let h = headers(&[("fastly-ratelimit-reset", "32503680000")]); // the year 3000
        let f =
            floor(classify_with_floor(StatusCode::TOO_MANY_REQUESTS, &h, epoch_reset(&h, "Fastly-RateLimit-Reset")));
        assert_eq!(f, Some(MAX_SERVER_FLOOR));
    }

    #[test]
    fn failures_carry_the_providers_message_in_one_short_line() {
        let answer = Answer {
            status: StatusCode::BAD_REQUEST,
            headers: HeaderMap::new(),
            body: format!("{{\"msg\":\"bad\nkey\"}} {}", "x".repeat(1000)).into_bytes(),
        };
        let f = Failure::from_answer(&answer, None);
        let Failure::Permanent { item_level, message } = &f else { panic!("{f:?}") };
        assert!(item_level);
        assert!(message.starts_with("HTTP 400: {\"msg\":\"bad key\"}"), "{message}");
        assert!(message.chars().count() < MESSAGE_CHARS + 20);
        let auth = Answer { status: StatusCode::FORBIDDEN, headers: HeaderMap::new(), body: b"no".to_vec() };
        assert!(!Failure::from_answer(&auth, None).is_item_level());
    }
}
