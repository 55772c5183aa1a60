//! Cloudflare: purge by cache tag, host, prefix or URL.
//!
//! `POST {api}/zones/{zone_id}/purge_cache` with `Authorization: Bearer <token>` and a JSON body
//! holding exactly one kind: `{"tags":[…]}`, `{"hosts":[…]}`, `{"prefixes":[…]}` or
//! `{"files":[…]}`, at most `limits.items_per_request` items (100; 500 URLs on Enterprise, 30 on
//! old accounts). Surrogate keys go out as `tags` (or `hosts`: `surrogate_keys_as`), URLs as
//! `files` (or `prefixes`, the URL without its scheme: `urls_as`). `purge_everything` is never
//! sent.
//!
//! The answer is read, not only its status: `{"success":false,"errors":[{"code":…,"message":…}]}`
//! inside an HTTP 200 is a failure (permanent with Cloudflare's message, except code 971,
//! "throttled", which is retried).
//!
//! Limits, from the plan (`plan: free | pro | business | enterprise`, default `free` so an
//! unconfigured sink never trips a 429):
//! - tag, host and prefix purges share a token bucket per account: Free 5/min (burst 25), Pro
//!   5/s (25), Business 10/s (50), Enterprise 50/s (500): `limits.requests_per_second`/`burst`;
//! - URL purges are limited in URLs per second (800; Enterprise 3,000): `urls_per_second`,
//!   `url_burst`, one token per URL;
//! - every request counts against the global API limit, 1,200 per 5 minutes:
//!   `api_requests_per_second` (4) with a burst of `api_burst` (1,200).
//!
//! A 429 waits for `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::http::{self, Answer, Failure, Sender};
use super::limit::TokenBucket;
use super::purge::{purge_sink, Provider};
use super::verify::{Verifier, VerifyConfig};
use super::{check_base_url, check_key, check_url, CdnError, Job, Limits, LimitsConfig, SecretRef};
use crate::config::secret::{Need, RotatingSecret};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, SinkError};
use crate::telemetry::events::sink::SinkBuilt;
use crate::telemetry::events::sink_cdn::{self, PurgeOutcome};
use crate::telemetry::Metrics;

/// Cloudflare's per-request ceiling on its largest plan.
const MAX_ITEMS: usize = 500;
/// Cloudflare's limit on one cache tag.
const MAX_TAG_BYTES: usize = 1024;
/// Error code of a throttled request reported inside a 200.
const THROTTLED: i64 = 971;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    #[default]
    Free,
    Pro,
    Business,
    Enterprise,
}

impl Plan {
    /// The documented tag/host/prefix bucket and URL rate of the plan.
    pub fn defaults(self) -> (Limits, f64) {
        let (rate, burst, urls) = match self {
            Plan::Free => (5.0 / 60.0, 25, 800.0),
            Plan::Pro => (5.0, 25, 800.0),
            Plan::Business => (10.0, 50, 800.0),
            Plan::Enterprise => (50.0, 500, 3000.0),
        };
        (Limits { items_per_request: 100, requests_per_second: rate, burst, concurrency: 4 }, urls)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeysAs {
    #[default]
    Tags,
    Hosts,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UrlsAs {
    #[default]
    Files,
    Prefixes,
}

/// `sinks.cdn[]` with `kind: cloudflare`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudflareConfig {
    pub name: String,
    #[serde(default = "super::default_layer_cdn")]
    pub layer: u8,
    pub zone_id: String,
    /// An API token with the Cache Purge permission, from an environment variable...
    pub token_env: Option<String>,
    /// ...or a file.
    pub token_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub plan: Plan,
    #[serde(default)]
    pub surrogate_keys_as: KeysAs,
    #[serde(default)]
    pub urls_as: UrlsAs,
    #[serde(default = "default_api")]
    pub api: String,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// URL purge rate (URLs per second; default from `plan`)...
    pub urls_per_second: Option<f64>,
    /// ...and its burst (default: one second's worth).
    pub url_burst: Option<u32>,
    /// The global API limit: requests per second...
    #[serde(default = "default_api_rate")]
    pub api_requests_per_second: f64,
    /// ...and burst.
    #[serde(default = "default_api_burst")]
    pub api_burst: u32,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default = "super::default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    pub verify: Option<VerifyConfig>,
    #[serde(skip)]
    pub token: Option<Arc<RotatingSecret>>,
}

fn default_api() -> String {
    "https://api.cloudflare.com/client/v4".into()
}
fn default_api_rate() -> f64 {
    4.0
}
fn default_api_burst() -> u32 {
    1200
}

impl CloudflareConfig {
    pub(super) fn validate(&mut self, config_file: &std::path::Path, problems: &mut Vec<(Vec<String>, String)>) {
        self.token = SecretRef::of(&self.token_env, &self.token_file).resolve_rotating_into(
            "token",
            Need::Required,
            config_file,
            problems,
        );
        if self.zone_id.trim().is_empty() || !self.zone_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            problems.push((vec!["zone_id".into()], "zone_id must be a Cloudflare zone id (letters and digits)".into()));
        }
        check_base_url("api", &self.api, problems);
        let (defaults, _) = self.plan.defaults();
        self.limits.validate(defaults, MAX_ITEMS, problems);
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !self.urls_per_second.is_none_or(positive) || self.url_burst == Some(0) {
            problems.push((vec!["urls_per_second".into()], "urls_per_second and url_burst must be positive".into()));
        }
        if !positive(self.api_requests_per_second) || self.api_burst == 0 {
            problems.push((
                vec!["api_requests_per_second".into()],
                "api_requests_per_second and api_burst must be positive".into(),
            ));
        }
        if let Some(v) = &self.verify {
            v.validate(problems);
        }
    }
}

pub struct CloudflareSink {
    name: String,
    endpoint: String,
    token: Arc<RotatingSecret>,
    keys_as: KeysAs,
    urls_as: UrlsAs,
    limits: Limits,
    /// Tag, host and prefix requests.
    purge_bucket: Option<TokenBucket>,
    /// URLs (one token each).
    url_bucket: TokenBucket,
    /// Every request.
    api_bucket: TokenBucket,
    sender: Sender,
    verifier: Option<Verifier>,
}

impl CloudflareSink {
    pub fn new(config: &CloudflareConfig, metrics: Arc<Metrics>) -> Result<CloudflareSink, CdnError> {
        let name = config.name.as_str();
        let token = config.token.clone().ok_or_else(|| CdnError::build(name, "no token (config not validated)"))?;
        let (defaults, default_urls) = config.plan.defaults();
        let limits = config.limits.resolve(defaults);
        let urls_per_second = config.urls_per_second.unwrap_or(default_urls);
        let wait = || sink_cdn::rate_limit_wait(&metrics, name);
        let client = http::client(config.timeout).map_err(|e| CdnError::build(name, e))?;
        metrics.emit(SinkBuilt { sink: name });
        Ok(CloudflareSink {
            name: name.to_string(),
            endpoint: format!("{}/zones/{}/purge_cache", config.api.trim_end_matches('/'), config.zone_id),
            token: token.clone(),
            keys_as: config.surrogate_keys_as,
            urls_as: config.urls_as,
            limits,
            purge_bucket: limits.request_bucket(name, &metrics),
            url_bucket: TokenBucket::new(config.url_burst.unwrap_or(urls_per_second.ceil() as u32), urls_per_second)
                .with_wait_counter(wait()),
            api_bucket: TokenBucket::new(config.api_burst, config.api_requests_per_second).with_wait_counter(wait()),
            verifier: config.verify.as_ref().map(|v| Verifier::new(name, v, metrics.clone())).transpose()?,
            sender: Sender::new(name, client, config.retry.clone(), metrics).with_reload(token.clone()),
        })
    }

    fn check_key(&self, key: &str) -> Result<(), String> {
        check_key(key, MAX_TAG_BYTES)?;
        if self.keys_as == KeysAs::Hosts && !key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')) {
            return Err("not a host name (surrogate_keys_as: hosts)".into());
        }
        Ok(())
    }

    /// The body of one job.
    fn body(&self, job: &Job, batch: &Invalidations) -> serde_json::Value {
        let items = job.values(batch).into_iter();
        match (job.kind, self.keys_as, self.urls_as) {
            (ItemKind::SurrogateKey, KeysAs::Tags, _) => serde_json::json!({ "tags": items.collect::<Vec<_>>() }),
            (ItemKind::SurrogateKey, KeysAs::Hosts, _) => serde_json::json!({ "hosts": items.collect::<Vec<_>>() }),
            (_, _, UrlsAs::Files) => serde_json::json!({ "files": items.collect::<Vec<_>>() }),
            (_, _, UrlsAs::Prefixes) => serde_json::json!({
                "prefixes": items.map(|u| u.split_once("://").map_or(u, |(_, rest)| rest)).collect::<Vec<_>>()
            }),
        }
    }
}

/// Cloudflare's envelope.
#[derive(Deserialize)]
struct Envelope {
    success: bool,
    #[serde(default)]
    errors: Vec<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

/// Reads the body as well as the status.
fn interpret(answer: Answer) -> Result<(), Failure> {
    let envelope: Option<Envelope> = serde_json::from_slice(&answer.body).ok();
    let errors = |e: &Envelope| {
        e.errors.iter().map(|e| format!("{} {}", e.code, http::one_line(&e.message))).collect::<Vec<_>>().join("; ")
    };
    if !answer.status.is_success() {
        let failure = Failure::from_answer(&answer, None);
        return Err(match (failure, &envelope) {
            (f @ (Failure::Permanent { .. } | Failure::Unauthorized { .. }), Some(e)) if !e.errors.is_empty() => {
                f.with_message(format!("HTTP {}: Cloudflare errors: {}", answer.status.as_u16(), errors(e)))
            }
            (f, _) => f,
        });
    }
    match envelope {
        Some(e) if e.success => Ok(()),
        Some(e) if e.errors.iter().any(|e| e.code == THROTTLED) => Err(Failure::Transient {
            outcome: PurgeOutcome::RateLimited,
            floor: http::retry_after(&answer.headers, std::time::SystemTime::now()),
            message: format!("HTTP 200 with success:false: {}", errors(&e)),
        }),
        Some(e) => Err(Failure::Permanent {
            item_level: true,
            message: format!("HTTP 200 with success:false: Cloudflare errors: {}", errors(&e)),
        }),
        // A 200 that is not Cloudflare's envelope (a proxy's page?): not a confirmation.
        None => Err(Failure::Transient {
            outcome: PurgeOutcome::ServerError,
            floor: None,
            message: format!("HTTP 200 without Cloudflare's JSON envelope: {}", answer.message()),
        }),
    }
}

#[async_trait]
impl Provider for CloudflareSink {
    // `name`, `limits`, `verifier`: the fields every provider keeps under those names.
    super::purge::provider_fields!();

    fn kinds(&self) -> &'static [ItemKind] {
        &[ItemKind::SurrogateKey, ItemKind::Url]
    }

    fn check(&self, kind: ItemKind, item: &str) -> Result<(), String> {
        match kind {
            ItemKind::SurrogateKey => self.check_key(item),
            _ => check_url(item).map(|_| ()),
        }
    }

    async fn send(
        &self,
        job: Job,
        batch: &Invalidations,
        shutdown: &Shutdown,
    ) -> Result<Result<(), Failure>, SinkError> {
        let body = self.body(&job, batch).to_string();
        let n = job.items.len() as u32;
        let mut buckets: Vec<(&TokenBucket, u32)> = vec![(&self.api_bucket, 1)];
        match (job.kind, self.urls_as) {
            (ItemKind::Url, UrlsAs::Files) => buckets.push((&self.url_bucket, n)),
            _ => buckets.extend(self.purge_bucket.iter().map(|b| (b, 1))),
        }
        let build = |client: &reqwest::Client| {
            client
                .post(&self.endpoint)
                .bearer_auth(self.token.current().expose())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
        };
        self.sender.send(shutdown, job.items.len(), &buckets, build, interpret).await
    }

    async fn ping(&self) -> bool {
        self.sender.ping(&self.endpoint).await
    }
}

purge_sink!(CloudflareSink);

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderMap;
    use reqwest::StatusCode;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn success_false_in_a_200_is_a_failure() {
        assert_eq!(interpret(answer(200, r#"{"success":true,"errors":[],"messages":[],"result":{"id":"x"}}"#)), Ok(()));
        let f =
            interpret(answer(200, r#"{"success":false,"errors":[{"code":1107,"message":"bad tag"}]}"#)).unwrap_err();
        assert!(f.is_item_level());
        assert!(f.to_string().contains("1107 bad tag"), "{f}");
        let f =
            interpret(answer(200, r#"{"success":false,"errors":[{"code":971,"message":"throttled"}]}"#)).unwrap_err();
        assert!(matches!(f, Failure::Transient { outcome: PurgeOutcome::RateLimited, .. }));
        assert!(matches!(interpret(answer(200, "<html>")).unwrap_err(), Failure::Transient { .. }));
        let f =
            interpret(answer(403, r#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}]}"#))
                .unwrap_err();
        assert!(!f.is_item_level());
        assert!(f.to_string().contains("10000 Authentication error"), "{f}");
    }
}
