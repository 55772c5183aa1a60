//! Fastly: surrogate keys in bulk, URLs one by one, optionally soft.
//!
//! - Keys: `POST {api}/service/{service_id}/purge` with `{"surrogate_keys":[…]}` (at most 256
//!   keys per request, each at most 1 KB), answered `200 {"k1":"<purge id>",…}`.
//! - URLs: `POST {api}/purge/{host}{path}` (the URL without its scheme), answered
//!   `200 {"status":"ok","id":…}`.
//! - Both with `Fastly-Key: <token>` and, when `soft`, `Fastly-Soft-Purge: 1` (mark stale
//!   instead of evicting). `purge_all` is never sent: it cannot be soft, and a rule must never
//!   be able to empty a whole service.
//! - A 429 waits until `Fastly-RateLimit-Reset` (Unix seconds) or `Retry-After`, whichever is
//!   later. Key and URL purges do not count against Fastly's hourly API limit, so the default
//!   client-side bucket (50 requests/s, burst 100) is a courtesy ceiling, not a documented
//!   limit: raise it freely.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::http::{self, Answer, Failure, Sender};
use super::limit::TokenBucket;
use super::purge::{purge_sink, Provider};
use super::verify::{Verifier, VerifyConfig};
use super::{check_base_url, check_key, check_url, chunk, CdnError, Job, Limits, LimitsConfig, SecretRef};
use crate::config::secret::{Need, RotatingSecret};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, SinkError};
use crate::telemetry::events::sink::SinkBuilt;
use crate::telemetry::Metrics;

pub const DEFAULT_LIMITS: Limits =
    Limits { items_per_request: 256, requests_per_second: 50.0, burst: 100, concurrency: 8 };
/// Fastly answers 400 to more keys per request.
const MAX_ITEMS: usize = 256;
/// Fastly's size limit of one surrogate key.
const MAX_KEY_BYTES: usize = 1024;

/// `sinks.cdn[]` with `kind: fastly`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastlyConfig {
    pub name: String,
    #[serde(default = "super::default_layer_cdn")]
    pub layer: u8,
    pub service_id: String,
    /// The API token (scope `purge_select`), from an environment variable...
    pub token_env: Option<String>,
    /// ...or a file.
    pub token_file: Option<std::path::PathBuf>,
    /// Soft purge: mark content stale instead of evicting it.
    #[serde(default)]
    pub soft: bool,
    #[serde(default = "default_api")]
    pub api: String,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default = "super::default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    pub verify: Option<VerifyConfig>,
    #[serde(skip)]
    pub token: Option<Arc<RotatingSecret>>,
}

fn default_api() -> String {
    "https://api.fastly.com".into()
}

impl FastlyConfig {
    pub(super) fn validate(&mut self, config_file: &std::path::Path, problems: &mut Vec<(Vec<String>, String)>) {
        self.token = SecretRef::of(&self.token_env, &self.token_file).resolve_rotating_into(
            "token",
            Need::Required,
            config_file,
            problems,
        );
        if self.service_id.trim().is_empty() || !self.service_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            problems.push((
                vec!["service_id".into()],
                "service_id must be a Fastly service id (letters and digits)".into(),
            ));
        }
        check_base_url("api", &self.api, problems);
        self.limits.validate(DEFAULT_LIMITS, MAX_ITEMS, problems);
        if let Some(v) = &self.verify {
            v.validate(problems);
        }
    }
}

pub struct FastlySink {
    name: String,
    api: String,
    service_id: String,
    token: Arc<RotatingSecret>,
    soft: bool,
    limits: Limits,
    bucket: Option<TokenBucket>,
    sender: Sender,
    verifier: Option<Verifier>,
}

impl FastlySink {
    pub fn new(config: &FastlyConfig, metrics: Arc<Metrics>) -> Result<FastlySink, CdnError> {
        let name = config.name.as_str();
        let token = config.token.clone().ok_or_else(|| CdnError::build(name, "no token (config not validated)"))?;
        let limits = config.limits.resolve(DEFAULT_LIMITS);
        let client = http::client(config.timeout).map_err(|e| CdnError::build(name, e))?;
        metrics.emit(SinkBuilt { sink: name });
        Ok(FastlySink {
            name: name.to_string(),
            api: config.api.trim_end_matches('/').to_string(),
            service_id: config.service_id.clone(),
            token: token.clone(),
            soft: config.soft,
            limits,
            bucket: limits.request_bucket(name, &metrics),
            verifier: config.verify.as_ref().map(|v| Verifier::new(name, v, metrics.clone())).transpose()?,
            sender: Sender::new(name, client, config.retry.clone(), metrics).with_reload(token.clone()),
        })
    }

    fn request(&self, job: &Job, batch: &Invalidations) -> (String, Option<String>) {
        match job.kind {
            ItemKind::SurrogateKey => {
                let keys = job.values(batch);
                let body = serde_json::json!({ "surrogate_keys": keys }).to_string();
                (format!("{}/service/{}/purge", self.api, self.service_id), Some(body))
            }
            _ => {
                let url = job.items.first().map_or("", |&i| super::item(batch, ItemKind::Url, i));
                let bare = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
                (format!("{}/purge/{bare}", self.api), None)
            }
        }
    }
}

/// A 2xx is success; a 429 waits for `Fastly-RateLimit-Reset` too.
fn interpret(answer: Answer) -> Result<(), Failure> {
    if answer.status.is_success() {
        return Ok(());
    }
    Err(Failure::from_answer(&answer, http::epoch_reset(&answer.headers, "Fastly-RateLimit-Reset")))
}

#[async_trait]
impl Provider for FastlySink {
    // `name`, `limits`, `verifier`: the fields every provider keeps under those names.
    super::purge::provider_fields!();

    fn kinds(&self) -> &'static [ItemKind] {
        &[ItemKind::SurrogateKey, ItemKind::Url]
    }

    fn check(&self, kind: ItemKind, item: &str) -> Result<(), String> {
        match kind {
            ItemKind::SurrogateKey => check_key(item, MAX_KEY_BYTES),
            _ => check_url(item).map(|_| ()),
        }
    }

    /// Keys in bulk requests; URLs one per request (Fastly purges a URL by requesting it).
    fn jobs(&self, _: &Invalidations, kind: ItemKind, accepted: &[usize]) -> Vec<Job> {
        match kind {
            ItemKind::SurrogateKey => chunk(accepted, self.limits.items_per_request, None, |_| 0)
                .into_iter()
                .map(|items| Job { node: 0, kind, items })
                .collect(),
            _ => accepted.iter().map(|&i| Job { node: 0, kind, items: vec![i] }).collect(),
        }
    }

    async fn send(
        &self,
        job: Job,
        batch: &Invalidations,
        shutdown: &Shutdown,
    ) -> Result<Result<(), Failure>, SinkError> {
        let buckets: Vec<(&TokenBucket, u32)> = self.bucket.iter().map(|b| (b, 1)).collect();
        let (url, body) = self.request(&job, batch);
        let build = |client: &reqwest::Client| {
            let mut b = client
                .post(&url)
                .header("Fastly-Key", self.token.current().expose())
                .header(reqwest::header::ACCEPT, "application/json");
            if self.soft {
                b = b.header("Fastly-Soft-Purge", "1");
            }
            if let Some(body) = &body {
                b = b.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone());
            }
            b
        };
        self.sender.send(shutdown, job.items.len(), &buckets, build, interpret).await
    }

    async fn ping(&self) -> bool {
        self.sender.ping(&self.api).await
    }
}

purge_sink!(FastlySink);
