//! Amazon CloudFront: invalidations of paths, SigV4-signed ([`super::sigv4`]).
//!
//! - URLs become paths (`https://shop.example.com/p/42?x=1` → `/p/42?x=1`); surrogate keys
//!   become paths through `surrogate_key_path` (`/tags/{key}/*`), or are not served without it.
//!   A path CloudFront would refuse (not starting with `/`, a `*` anywhere but at the end, over
//!   4,000 characters, non-ASCII or control characters) is rejected before anything is sent.
//! - `POST {endpoint}/2020-05-31/distribution/{id}/invalidation` with an `<InvalidationBatch>`;
//!   answered `201` with the invalidation's `<Id>`. Each batch gets one `CallerReference`,
//!   reused on every retry of that batch: CloudFront answers a repeated reference with the
//!   invalidation it already created, so a retry after a lost answer creates nothing twice.
//! - CloudFront allows at most 3,000 individual paths and, separately, 15 wildcard paths in
//!   progress per distribution. The sink keeps a ledger of its own invalidations in progress
//!   and sends a batch only when it fits; when it does not, it asks CloudFront (`GET
//!   …/invalidation/{id}`) which of them completed, and waits `poll_interval` between asks.
//!   Batches are cut to fit too (`limits.items_per_request` paths, at most 15 wildcards). A
//!   `TooManyInvalidationsInProgress` anyway (another client invalidating the same
//!   distribution) waits `busy_backoff` and retries; so do throttling, 429 and 5xx.
//! - `wait_for_completion` polls each invalidation until `Completed` before the batch counts as
//!   done: outer layers and the source position then wait for the edge to be clean (minutes).
//! - Credentials: explicit keys or the AWS credential chain (`credentials: chain`), refreshed
//!   before temporary ones expire and read again on a 403 ([`super::aws_credentials`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rand::Rng;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::aws_credentials::{AwsCredentials, AwsCredentialsError, AwsEnv, CredentialsFrom};
use super::http::{self, Answer, Failure, Sender};
use super::limit::TokenBucket;
use super::purge::{purge_sink, Provider};
use super::sigv4;
use super::verify::{Verifier, VerifyConfig};
use super::{base_and_host, check_base_url, check_url, CdnError, Job, Limits, LimitsConfig, Need, SecretRef};
use crate::retry::{RetryError, RetryPolicy, Verdict};
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, SinkError};
use crate::telemetry::events::sink::SinkBuilt;
use crate::telemetry::events::sink_cdn::PurgeOutcome;
use crate::telemetry::Metrics;

/// One invalidation may carry every path the distribution allows in progress; the API is
/// throttled, so a slow request rate with a small burst.
pub const DEFAULT_LIMITS: Limits =
    Limits { items_per_request: 3_000, requests_per_second: 1.0, burst: 5, concurrency: 1 };
pub const DEFAULT_MAX_PATHS_IN_FLIGHT: usize = 3_000;
pub const DEFAULT_MAX_WILDCARDS_IN_FLIGHT: usize = 15;
/// CloudFront's limit on one path.
pub const MAX_PATH_CHARS: usize = 4_000;
const API_VERSION: &str = "2020-05-31";
const XMLNS: &str = "http://cloudfront.amazonaws.com/doc/2020-05-31/";

/// `sinks.cdn[]` with `kind: cloudfront`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudfrontConfig {
    pub name: String,
    #[serde(default = "super::default_layer_cdn")]
    pub layer: u8,
    pub distribution_id: String,
    /// Where the AWS credentials come from: `keys` (the default; the settings below) or
    /// `chain` (environment, web identity, shared profile: [`super::aws_credentials`]).
    #[serde(default)]
    pub credentials: CredentialsFrom,
    /// `credentials: chain`: the profile of the shared credentials file (default: `AWS_PROFILE`,
    /// else `default`).
    pub profile: Option<String>,
    /// `credentials: chain`: where web identity tokens are exchanged.
    #[serde(default = "default_sts_endpoint")]
    pub sts_endpoint: String,
    /// The AWS access key (an IAM user or role allowed `cloudfront:CreateInvalidation` and
    /// `cloudfront:GetInvalidation` on the distribution), each part from a variable or a file.
    pub access_key_id_env: Option<String>,
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key_env: Option<String>,
    pub secret_access_key_file: Option<PathBuf>,
    /// For temporary credentials only.
    pub session_token_env: Option<String>,
    pub session_token_file: Option<PathBuf>,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// CloudFront is a global service signed for us-east-1.
    #[serde(default = "default_region")]
    pub region: String,
    /// The path invalidated for a surrogate key, `{key}` standing for the key (URL-encoded),
    /// e.g. `/tags/{key}/*`. Without it this sink serves URLs only.
    pub surrogate_key_path: Option<String>,
    #[serde(default = "default_max_paths")]
    pub max_paths_in_flight: usize,
    #[serde(default = "default_max_wildcards")]
    pub max_wildcards_in_flight: usize,
    /// Poll every invalidation until `Completed` before the batch counts as done.
    #[serde(default)]
    pub wait_for_completion: bool,
    #[serde(default = "default_poll_interval", with = "crate::config::duration")]
    pub poll_interval: Duration,
    /// The wait after `TooManyInvalidationsInProgress` (invalidations take minutes).
    #[serde(default = "default_busy_backoff", with = "crate::config::duration")]
    pub busy_backoff: Duration,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default = "super::default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Optional freshness check after each confirmed purge ([`super::verify`]).
    pub verify: Option<VerifyConfig>,
    /// Keys that never change (tests); otherwise `resolved` or the chain.
    #[serde(skip)]
    pub static_credentials: Option<sigv4::Credentials>,
    /// The chain's variables (tests give their own; otherwise this process's).
    #[serde(skip)]
    pub aws_env: Option<AwsEnv>,
    /// `credentials: keys`, read by `validate`.
    #[serde(skip)]
    pub resolved: Option<Arc<AwsCredentials>>,
}

fn default_sts_endpoint() -> String {
    "https://sts.amazonaws.com".into()
}

fn default_endpoint() -> String {
    "https://cloudfront.amazonaws.com".into()
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_max_paths() -> usize {
    DEFAULT_MAX_PATHS_IN_FLIGHT
}
fn default_max_wildcards() -> usize {
    DEFAULT_MAX_WILDCARDS_IN_FLIGHT
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_busy_backoff() -> Duration {
    Duration::from_secs(60)
}

impl CloudfrontConfig {
    pub fn validate(&mut self, config_file: &Path, problems: &mut Vec<(Vec<String>, String)>) {
        let keys = [
            ("access_key_id", &self.access_key_id_env, &self.access_key_id_file, Need::Required),
            ("secret_access_key", &self.secret_access_key_env, &self.secret_access_key_file, Need::Required),
            ("session_token", &self.session_token_env, &self.session_token_file, Need::Optional),
        ];
        match self.credentials {
            CredentialsFrom::Keys => {
                let [key_id, key, token] = keys.map(|(field, env, file, need)| {
                    SecretRef::of(env, file).resolve_rotating_into(field, need, config_file, problems)
                });
                if let (Some(id), Some(key)) = (key_id, key) {
                    self.resolved = Some(Arc::new(AwsCredentials::keys(id, key, token)));
                }
                if self.profile.is_some() {
                    problems.push((vec!["profile".into()], "profile is read by credentials: chain only".into()));
                }
            }
            CredentialsFrom::Chain => {
                if keys.iter().any(|(_, env, file, _)| env.is_some() || file.is_some()) {
                    problems.push((
                        vec!["credentials".into()],
                        "credentials: chain finds the keys itself; remove access_key_id_*, secret_access_key_* and session_token_*, or use credentials: keys".into(),
                    ));
                }
                let env = self.aws_env.get_or_insert_with(AwsEnv::from_process);
                if let Err(e) = env.check_chain(self.profile.as_deref()) {
                    problems.push((vec!["credentials".into()], e));
                }
                check_base_url("sts_endpoint", &self.sts_endpoint, problems);
            }
        }
        if self.distribution_id.is_empty() || !self.distribution_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            problems.push((
                vec!["distribution_id".into()],
                "distribution_id must be a CloudFront distribution id (letters and digits)".into(),
            ));
        }
        check_base_url("endpoint", &self.endpoint, problems);
        if self.region.trim().is_empty() {
            problems.push((vec!["region".into()], "region must not be empty".into()));
        }
        if let Some(t) = &self.surrogate_key_path {
            if !t.starts_with('/') || !t.contains("{key}") {
                problems.push((
                    vec!["surrogate_key_path".into()],
                    "surrogate_key_path must start with / and contain {key}".into(),
                ));
            } else if let Err(e) = check_path(&t.replace("{key}", "k")) {
                problems.push((vec!["surrogate_key_path".into()], format!("surrogate_key_path: {e}")));
            }
        }
        if self.max_paths_in_flight == 0 || self.max_paths_in_flight > DEFAULT_MAX_PATHS_IN_FLIGHT {
            problems.push((
                vec!["max_paths_in_flight".into()],
                format!("max_paths_in_flight must be between 1 and {DEFAULT_MAX_PATHS_IN_FLIGHT}"),
            ));
        }
        if self.max_wildcards_in_flight == 0 || self.max_wildcards_in_flight > DEFAULT_MAX_WILDCARDS_IN_FLIGHT {
            problems.push((
                vec!["max_wildcards_in_flight".into()],
                format!("max_wildcards_in_flight must be between 1 and {DEFAULT_MAX_WILDCARDS_IN_FLIGHT}"),
            ));
        }
        if self.poll_interval.is_zero() {
            problems.push((vec!["poll_interval".into()], "poll_interval must be positive".into()));
        }
        self.limits.validate(DEFAULT_LIMITS, DEFAULT_MAX_PATHS_IN_FLIGHT, problems);
        if let Some(v) = &self.verify {
            v.validate(problems);
        }
    }
}

/// A path CloudFront accepts in an invalidation batch.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("a CloudFront path must start with /".into());
    }
    if path.chars().count() > MAX_PATH_CHARS {
        return Err(format!("a CloudFront path is at most {MAX_PATH_CHARS} characters"));
    }
    if path.chars().any(|c| !c.is_ascii() || c.is_ascii_control() || c == ' ') {
        return Err("a CloudFront path must be URL-encoded ASCII without spaces or control characters".into());
    }
    if path.find('*').is_some_and(|i| i != path.len() - 1) {
        return Err("CloudFront accepts * only as the last character of a path".into());
    }
    Ok(())
}

fn is_wildcard(path: &str) -> bool {
    path.ends_with('*')
}

/// The path of a URL: its encoded path and query.
fn url_path(url: &str) -> Result<String, String> {
    let parsed = check_url(url)?;
    let mut path = parsed.path().to_string();
    if let Some(q) = parsed.query() {
        path.push('?');
        path.push_str(q);
    }
    check_path(&path)?;
    Ok(path)
}

/// An invalidation this sink created that may still be in progress.
#[derive(Debug, Clone)]
struct InFlight {
    /// `None` while its CreateInvalidation is being sent.
    id: Option<String>,
    paths: usize,
    wildcards: usize,
}

pub struct CloudfrontSink {
    name: String,
    base: String,
    host: String,
    region: String,
    /// Read per attempt (the request builder signs with what is current).
    credentials: Arc<AwsCredentials>,
    /// For getting credentials from the chain as for requests.
    retry: RetryPolicy,
    key_path: Option<String>,
    max_paths: usize,
    max_wildcards: usize,
    wait_for_completion: bool,
    poll_interval: Duration,
    busy_backoff: Duration,
    limits: Limits,
    bucket: Option<TokenBucket>,
    ledger: Mutex<Vec<InFlight>>,
    sender: Sender,
    verifier: Option<Verifier>,
}

/// The answer to CreateInvalidation.
struct Created {
    id: String,
}

impl CloudfrontSink {
    pub fn new(config: &CloudfrontConfig, metrics: Arc<Metrics>) -> Result<CloudfrontSink, CdnError> {
        let name = config.name.as_str();
        let credentials = match (&config.static_credentials, &config.resolved, config.credentials) {
            (Some(c), _, _) => Arc::new(AwsCredentials::fixed(c.clone())),
            (None, Some(resolved), _) => resolved.clone(),
            (None, None, CredentialsFrom::Chain) => Arc::new(
                AwsCredentials::chain(
                    config.aws_env.clone().unwrap_or_else(AwsEnv::from_process),
                    config.profile.clone(),
                    &config.sts_endpoint,
                    config.timeout,
                )
                .map_err(|e| CdnError::build(name, e))?,
            ),
            (None, None, CredentialsFrom::Keys) => {
                return Err(CdnError::build(name, "no AWS credentials (config not validated)"))
            }
        };
        let (_, host) = base_and_host(name, "endpoint", &config.endpoint)?;
        let limits = config.limits.resolve(DEFAULT_LIMITS);
        let client = http::client(config.timeout).map_err(|e| CdnError::build(name, e))?;
        metrics.emit(SinkBuilt { sink: name });
        Ok(CloudfrontSink {
            name: name.to_string(),
            base: format!(
                "{}/{API_VERSION}/distribution/{}/invalidation",
                config.endpoint.trim_end_matches('/'),
                config.distribution_id
            ),
            host,
            region: config.region.clone(),
            credentials: credentials.clone(),
            retry: config.retry.clone(),
            key_path: config.surrogate_key_path.clone(),
            max_paths: config.max_paths_in_flight,
            max_wildcards: config.max_wildcards_in_flight,
            wait_for_completion: config.wait_for_completion,
            poll_interval: config.poll_interval,
            busy_backoff: config.busy_backoff,
            limits,
            bucket: limits.request_bucket(name, &metrics),
            ledger: Mutex::new(Vec::new()),
            verifier: config.verify.as_ref().map(|v| Verifier::new(name, v, metrics.clone())).transpose()?,
            sender: Sender::new(name, client, config.retry.clone(), metrics).with_reload(credentials),
        })
    }

    /// Makes sure the credentials are fresh before a request, retrying STS like a request;
    /// `Ok(Err)` when there are none to be had (the items are dead-lettered, as on a 403).
    async fn fresh_credentials(&self, shutdown: &Shutdown) -> Result<Result<(), Failure>, SinkError> {
        let classify = |e: &AwsCredentialsError| {
            if e.is_retriable() {
                Verdict::Retry { floor: None }
            } else {
                Verdict::Permanent
            }
        };
        let on_retry = |e: &AwsCredentialsError, attempt: u32, wait: Duration| {
            tracing::warn!(sink = %self.name, attempt, wait_ms = wait.as_millis() as u64, error = %e, "cannot get AWS credentials; retrying");
        };
        let op = || self.credentials.ensure_fresh();
        match crate::retry::retry(&self.retry, shutdown, op, classify, on_retry).await {
            Ok(()) => Ok(Ok(())),
            Err(RetryError::Permanent(e) | RetryError::Exhausted { last: e, .. }) => {
                tracing::error!(sink = %self.name, error = %e, "no AWS credentials; the request's items go to the dead-letter destination");
                Ok(Err(Failure::Permanent { item_level: false, message: format!("no AWS credentials: {e}") }))
            }
            Err(RetryError::Abandoned { .. }) => Err(SinkError::Abandoned),
        }
    }

    fn key_path(&self, key: &str) -> Result<String, String> {
        let template = self.key_path.as_deref().unwrap_or("/{key}");
        let path = template.replace("{key}", &sigv4::uri_encode(key.as_bytes()));
        check_path(&path)?;
        Ok(path)
    }

    /// The paths of one job, deduplicated, in order.
    fn paths(&self, job: &Job, batch: &Invalidations) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(job.items.len());
        for item in job.values(batch) {
            let path = match job.kind {
                ItemKind::Url => url_path(item),
                _ => self.key_path(item),
            };
            if let Ok(p) = path {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    }

    /// Cuts one kind's valid items into jobs: wildcard paths at most `max_wildcards` per job,
    /// others at most `items_per_request` (and `max_paths`).
    fn path_jobs(&self, kind: ItemKind, indices: &[usize], batch: &Invalidations) -> Vec<Job> {
        let path = |i: usize| match kind {
            ItemKind::Url => url_path(super::item(batch, kind, i)).unwrap_or_default(),
            _ => self.key_path(super::item(batch, kind, i)).unwrap_or_default(),
        };
        let (wild, plain): (Vec<usize>, Vec<usize>) = indices.iter().partition(|&&i| is_wildcard(&path(i)));
        let mut jobs = Vec::new();
        for (group, max) in [(plain, self.limits.items_per_request.min(self.max_paths)), (wild, self.max_wildcards)] {
            for items in group.chunks(max.max(1)) {
                jobs.push(Job { node: 0, kind, items: items.to_vec() });
            }
        }
        jobs
    }

    /// Signs a request to `url` (path `path`) with `body`.
    fn signed(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        url: &str,
        path: &str,
        body: &str,
    ) -> reqwest::RequestBuilder {
        let amz_date = sigv4::amz_date(SystemTime::now());
        let mut builder = client.request(method.clone(), url).header("x-amz-date", amz_date.clone());
        if !body.is_empty() {
            builder = builder.header(reqwest::header::CONTENT_TYPE, "text/xml").body(body.to_string());
        }
        let Some(credentials) = self.credentials.current() else {
            // Cannot happen (`fresh_credentials` ran first); CloudFront answers 403 unsigned.
            tracing::error!(sink = %self.name, "no AWS credentials to sign a CloudFront request");
            return builder;
        };
        let mut headers = vec![("host".to_string(), self.host.clone()), ("x-amz-date".to_string(), amz_date)];
        if let Some(token) = &credentials.session_token {
            headers.push(("x-amz-security-token".to_string(), token.expose().to_string()));
        }
        let request =
            sigv4::Request { method: method.as_str(), path, query: "", headers: &headers, payload: body.as_bytes() };
        if let Some(token) = &credentials.session_token {
            builder = builder.header("x-amz-security-token", token.expose());
        }
        match sigv4::sign(&credentials, &self.region, "cloudfront", &request) {
            Ok(signed) => builder = builder.header(reqwest::header::AUTHORIZATION, signed.authorization),
            // Cannot happen (host and date are set above); CloudFront answers 403 unsigned,
            // which is reported like any refusal.
            Err(e) => tracing::error!(sink = %self.name, error = %e, "cannot sign a CloudFront request"),
        }
        builder
    }

    fn api_path(&self, suffix: &str) -> (String, String) {
        let url = format!("{}{suffix}", self.base);
        let path = reqwest::Url::parse(&url).map(|u| u.path().to_string()).unwrap_or_default();
        (url, path)
    }

    /// Waits until the ledger has room for `paths` and `wildcards`, then reserves it.
    /// Returns the reservation's index marker.
    async fn reserve(&self, paths: usize, wildcards: usize, shutdown: &Shutdown) -> Result<(), SinkError> {
        loop {
            {
                let mut ledger = self.ledger.lock().await;
                let used: usize = ledger.iter().map(|f| f.paths).sum();
                let used_wild: usize = ledger.iter().map(|f| f.wildcards).sum();
                if used + paths <= self.max_paths && used_wild + wildcards <= self.max_wildcards {
                    ledger.push(InFlight { id: None, paths, wildcards });
                    return Ok(());
                }
            }
            // No room: ask which of ours completed, then wait a little if none did.
            if !self.forget_completed(shutdown).await? {
                tracing::info!(sink = %self.name, paths, wildcards, "waiting for CloudFront invalidations in progress to complete");
                tokio::select! {
                    _ = shutdown.abandoned() => return Err(SinkError::Abandoned),
                    _ = tokio::time::sleep(self.poll_interval) => {}
                }
            }
        }
    }

    /// Polls every recorded invalidation once and drops the completed ones; `true` if any was.
    async fn forget_completed(&self, shutdown: &Shutdown) -> Result<bool, SinkError> {
        let ids: Vec<String> = self.ledger.lock().await.iter().filter_map(|f| f.id.clone()).collect();
        let mut any = false;
        for id in ids {
            if self.status(&id, shutdown).await?.as_deref() == Some("Completed") {
                self.ledger.lock().await.retain(|f| f.id.as_deref() != Some(id.as_str()));
                any = true;
            }
        }
        Ok(any)
    }

    /// The status of invalidation `id`; `None` when CloudFront refused to say (logged).
    async fn status(&self, id: &str, shutdown: &Shutdown) -> Result<Option<String>, SinkError> {
        if let Err(f) = self.fresh_credentials(shutdown).await? {
            tracing::warn!(sink = %self.name, error = %f, "cannot read an invalidation's status");
            return Ok(None);
        }
        let (url, path) = self.api_path(&format!("/{id}"));
        let buckets: Vec<(&TokenBucket, u32)> = self.bucket.iter().map(|b| (b, 1)).collect();
        let build = |client: &reqwest::Client| self.signed(client, reqwest::Method::GET, &url, &path, "");
        let interpret = |answer: Answer| {
            if answer.status.is_success() {
                Ok(xml_text(&String::from_utf8_lossy(&answer.body), "Status").unwrap_or_default())
            } else {
                Err(failure(&answer, self.busy_backoff))
            }
        };
        match self.sender.send(shutdown, 0, &buckets, build, interpret).await? {
            Ok(status) => Ok(Some(status)),
            Err(f) => {
                tracing::warn!(sink = %self.name, error = %f, "cannot read an invalidation's status");
                Ok(None)
            }
        }
    }

    /// Sends one batch (reserved in the ledger) and, when configured, waits for completion.
    async fn send_job(
        &self,
        job: Job,
        batch: &Invalidations,
        shutdown: &Shutdown,
    ) -> Result<Result<(), Failure>, SinkError> {
        let paths = self.paths(&job, batch);
        if paths.is_empty() {
            return Ok(Ok(()));
        }
        let wildcards = paths.iter().filter(|p| is_wildcard(p)).count();
        if let Err(f) = self.fresh_credentials(shutdown).await? {
            return Ok(Err(f));
        }
        self.reserve(paths.len() - wildcards, wildcards, shutdown).await?;
        // One reference per batch, reused by every retry of it.
        let caller_reference = caller_reference();
        let body = invalidation_batch(&caller_reference, &paths);
        let (url, path) = self.api_path("");
        let buckets: Vec<(&TokenBucket, u32)> = self.bucket.iter().map(|b| (b, 1)).collect();
        let build = |client: &reqwest::Client| self.signed(client, reqwest::Method::POST, &url, &path, &body);
        let interpret = |answer: Answer| {
            if answer.status.is_success() {
                let text = String::from_utf8_lossy(&answer.body);
                match xml_text(&text, "Id") {
                    Some(id) => Ok(Created { id }),
                    None => Err(Failure::Transient {
                        outcome: PurgeOutcome::ServerError,
                        floor: None,
                        message: format!("HTTP {}: no invalidation Id in the answer", answer.status.as_u16()),
                    }),
                }
            } else {
                Err(failure(&answer, self.busy_backoff))
            }
        };
        let result = self.sender.send(shutdown, paths.len(), &buckets, build, interpret).await;
        let created = {
            let mut ledger = self.ledger.lock().await;
            let slot = ledger
                .iter()
                .position(|f| f.id.is_none() && f.paths == paths.len() - wildcards && f.wildcards == wildcards);
            match (&result, slot) {
                (Ok(Ok(created)), Some(i)) => {
                    ledger[i].id = Some(created.id.clone());
                    Some(created.id.clone())
                }
                (_, Some(i)) => {
                    ledger.remove(i);
                    None
                }
                _ => None,
            }
        };
        match result? {
            Err(f) => Ok(Err(f)),
            Ok(_) => {
                if let (true, Some(id)) = (self.wait_for_completion, created) {
                    self.wait_completed(&id, shutdown).await?;
                }
                Ok(Ok(()))
            }
        }
    }

    async fn wait_completed(&self, id: &str, shutdown: &Shutdown) -> Result<(), SinkError> {
        loop {
            if self.status(id, shutdown).await?.as_deref() == Some("Completed") {
                self.ledger.lock().await.retain(|f| f.id.as_deref() != Some(id));
                return Ok(());
            }
            tokio::select! {
                _ = shutdown.abandoned() => return Err(SinkError::Abandoned),
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }
}

/// CloudFront's error answers: `TooManyInvalidationsInProgress` and throttling are transient,
/// the first with a long floor; the rest by status, with the error code in the message.
fn failure(answer: &Answer, busy_backoff: Duration) -> Failure {
    let text = String::from_utf8_lossy(&answer.body);
    let code = xml_text(&text, "Code").unwrap_or_default();
    let message = xml_text(&text, "Message").unwrap_or_default();
    let sentence = http::one_line(&format!("HTTP {} {code}: {message}", answer.status.as_u16()));
    match code.as_str() {
        "TooManyInvalidationsInProgress" => {
            Failure::Transient { outcome: PurgeOutcome::RateLimited, floor: Some(busy_backoff), message: sentence }
        }
        "Throttling" | "RequestLimitExceeded" | "ServiceUnavailable" => {
            Failure::Transient { outcome: PurgeOutcome::RateLimited, floor: None, message: sentence }
        }
        _ => Failure::from_answer(answer, None).with_message(sentence),
    }
}

/// A reference unique to one batch: time plus randomness.
fn caller_reference() -> String {
    let millis = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let random: u64 = rand::rng().random();
    format!("cdc-invalidator-{millis}-{random:016x}")
}

/// The `<InvalidationBatch>` document.
pub fn invalidation_batch(caller_reference: &str, paths: &[String]) -> String {
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><InvalidationBatch xmlns=\"{XMLNS}\"><CallerReference>{}</CallerReference><Paths><Quantity>{}</Quantity><Items>",
        xml_escape(caller_reference),
        paths.len()
    );
    for p in paths {
        xml.push_str("<Path>");
        xml.push_str(&xml_escape(p));
        xml.push_str("</Path>");
    }
    xml.push_str("</Items></Paths></InvalidationBatch>");
    xml
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

pub fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&")
}

/// The text of the first `<tag>` element (CloudFront's documents are flat enough for this).
pub fn xml_text(doc: &str, tag: &str) -> Option<String> {
    xml_all(doc, tag).into_iter().next()
}

/// The texts of every `<tag>` element, in order.
pub fn xml_all(doc: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(xml_unescape(&after[..end]));
        rest = &after[end + close.len()..];
    }
    out
}

#[async_trait]
impl Provider for CloudfrontSink {
    // `name`, `limits`, `verifier`: the fields every provider keeps under those names.
    super::purge::provider_fields!();

    fn kinds(&self) -> &'static [ItemKind] {
        if self.key_path.is_some() {
            &[ItemKind::SurrogateKey, ItemKind::Url]
        } else {
            &[ItemKind::Url]
        }
    }

    fn check(&self, kind: ItemKind, item: &str) -> Result<(), String> {
        match kind {
            ItemKind::SurrogateKey => self.key_path(item).map(|_| ()),
            _ => url_path(item).map(|_| ()),
        }
    }

    fn jobs(&self, batch: &Invalidations, kind: ItemKind, accepted: &[usize]) -> Vec<Job> {
        self.path_jobs(kind, accepted, batch)
    }

    async fn send(
        &self,
        job: Job,
        batch: &Invalidations,
        shutdown: &Shutdown,
    ) -> Result<Result<(), Failure>, SinkError> {
        self.send_job(job, batch, shutdown).await
    }

    async fn ping(&self) -> bool {
        self.sender.ping(&self.base).await
    }
}

purge_sink!(CloudfrontSink);

#[cfg(test)]
mod tests {
    use super::*;

    fn validated(extra: serde_json::Value, env: &[(&str, &str)]) -> Vec<(Vec<String>, String)> {
        let mut config = serde_json::json!({ "name": "cf", "distribution_id": "EDFDVBD6EXAMPLE" });
        for (k, v) in extra.as_object().into_iter().flatten() {
            config[k] = v.clone();
        }
        let mut config: CloudfrontConfig = serde_json::from_value(config).unwrap();
        config.aws_env = Some(AwsEnv::from_vars(env.iter().map(|(k, v)| (k.to_string(), v.to_string()))));
        let mut problems = Vec::new();
        config.validate(Path::new("/nonexistent/c.yaml"), &mut problems);
        problems
    }

    #[test]
    fn credentials_come_from_keys_or_the_chain_not_both() {
        let keys = [("AWS_ACCESS_KEY_ID", "AKID"), ("AWS_SECRET_ACCESS_KEY", "s")];
        assert!(validated(serde_json::json!({ "credentials": "chain" }), &keys).is_empty());
        let both = validated(serde_json::json!({ "credentials": "chain", "access_key_id_env": "X" }), &keys);
        assert_eq!(both.len(), 1, "{both:?}");
        assert_eq!(both[0].0, ["credentials"]);
        let nothing = validated(serde_json::json!({ "credentials": "chain" }), &[]);
        assert!(nothing[0].1.contains("found no AWS credentials"), "{nothing:?}");
        let profile = validated(serde_json::json!({ "profile": "p" }), &[]);
        assert!(
            profile.iter().any(|(at, m)| at == &["profile"] && m.contains("credentials: chain only")),
            "{profile:?}"
        );
        assert!(profile.iter().any(|(_, m)| m.contains("`access_key_id_env` or `access_key_id_file` is required")));
    }

    #[test]
    fn paths_cloudfront_refuses_are_caught() {
        assert!(check_path("/p/42").is_ok());
        assert!(check_path("/images/*").is_ok());
        assert!(check_path("p/42").is_err());
        assert!(check_path("/a*/b").unwrap_err().contains("last character"));
        assert!(check_path("/a b").is_err());
        assert!(check_path("/caf\u{e9}").is_err());
        assert!(check_path(&format!("/{}", "a".repeat(MAX_PATH_CHARS))).is_err());
    }

    #[test]
    fn urls_map_to_paths_with_their_query() {
        assert_eq!(url_path("https://shop.example.com/p/42?x=1").unwrap(), "/p/42?x=1");
        assert_eq!(url_path("https://shop.example.com").unwrap(), "/");
        assert_eq!(url_path("https://shop.example.com/caf%C3%A9").unwrap(), "/caf%C3%A9");
        assert!(url_path("/p/42").is_err());
    }

    #[test]
    fn the_batch_document_is_escaped_and_counted() {
        let xml = invalidation_batch("ref-1", &["/a".into(), "/b?x=1&y=2".into()]);
        assert!(xml.contains("<CallerReference>ref-1</CallerReference>"));
        assert!(xml.contains("<Quantity>2</Quantity>"));
        assert_eq!(xml_all(&xml, "Path"), vec!["/a", "/b?x=1&y=2"]);
        assert!(xml.contains("/b?x=1&amp;y=2"));
    }
}
