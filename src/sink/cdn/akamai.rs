//! Akamai Fast Purge (CCU v3): surrogate keys as cache tags (or CP codes), URLs as URLs.
//!
//! - `POST {base_url}/ccu/v3/{invalidate|delete}/{tag|cpcode|url}/{production|staging}` with
//!   `{"objects":[…]}` (strings; integers for CP codes), one object type per request, signed
//!   with EdgeGrid ([`super::edgegrid`]; a fresh timestamp and nonce per attempt). Answered
//!   `201 {"httpStatus":201,"purgeId":…,"estimatedSeconds":5,…}`.
//! - Bodies stay under `max_body_bytes` (Akamai's 50 KB): a batch is cut by size as well as by
//!   `limits.items_per_request`. A 413 anyway (a smaller limit on the server) splits the
//!   request in halves until it fits; so does a 400 naming a bad object, down to the culprit,
//!   which is dead-lettered with Akamai's message.
//! - Rate limits are Akamai's own token buckets, mirrored client-side so the 429s never come:
//!   requests (100, refilling 50/s) and objects per type (URLs 10,000 refilling 12,000/min,
//!   tags 5,000 refilling 500/min, CP codes 300 refilling 30/min). A request takes one request
//!   token and one object token per object. A 429 (`application/problem+json`, `X-Ratelimit-*`)
//!   waits at least 5 s, or `Retry-After` when longer; 500, 503, 504 and 507 retry with backoff.
//! - `invalidate` marks content stale (the edge revalidates with the origin); `delete` evicts
//!   it. `staging` purges the staging network only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Deserialize;

use super::edgegrid;
use super::http::{self, Answer, Failure, Sender};
use super::limit::TokenBucket;
use super::purge::{purge_sink, Provider};
use super::verify::{Verifier, VerifyConfig};
use super::{
    base_and_host, check_base_url, check_key, check_url, chunk, CdnError, Job, Limits, LimitsConfig, Need,
    RotatingSecret, SecretRef,
};
use crate::config::secret::{Secret, SecretSet};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, SinkError};
use crate::telemetry::events::sink::SinkBuilt;
use crate::telemetry::Metrics;

/// Requests: Akamai's request bucket (100, refilling 50/s). Objects per request are bounded by
/// the body size first; 500 keeps one request well inside the tag bucket.
pub const DEFAULT_LIMITS: Limits =
    Limits { items_per_request: 500, requests_per_second: 50.0, burst: 100, concurrency: 4 };
/// The smallest object bucket (tags, 5,000): a request larger than that could never be sent.
const MAX_ITEMS: usize = 5_000;
/// Akamai's documented body limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 50_000;
/// `{"objects":[]}`: the body around the objects.
const BODY_OVERHEAD: usize = 14;
/// Akamai asks clients to wait at least this long after a 429.
pub const MIN_RATE_LIMITED_WAIT: Duration = Duration::from_secs(5);
/// Akamai's length limit of one cache tag.
const MAX_TAG_BYTES: usize = 128;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Mark stale: the edge revalidates with the origin (cheap for the origin when unchanged).
    #[default]
    Invalidate,
    /// Evict: the next request goes to the origin.
    Delete,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    Production,
    Staging,
}

/// What a rule's surrogate keys are at Akamai.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeysAs {
    /// Cache tags (`Edge-Cache-Tag` on the origin's responses).
    #[default]
    Tag,
    /// CP codes: every key must be a number.
    Cpcode,
}

/// Akamai's per-account object buckets: `burst` objects at once, refilling `per_minute`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectBucket {
    pub burst: u32,
    pub per_minute: f64,
}

/// `object_limits`: each optional, defaulting to Akamai's documented buckets.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectLimitsConfig {
    pub urls: Option<ObjectBucket>,
    pub tags: Option<ObjectBucket>,
    pub cpcodes: Option<ObjectBucket>,
}

pub const DEFAULT_URL_OBJECTS: ObjectBucket = ObjectBucket { burst: 10_000, per_minute: 12_000.0 };
pub const DEFAULT_TAG_OBJECTS: ObjectBucket = ObjectBucket { burst: 5_000, per_minute: 500.0 };
pub const DEFAULT_CPCODE_OBJECTS: ObjectBucket = ObjectBucket { burst: 300, per_minute: 30.0 };

/// `sinks.cdn[]` with `kind: akamai`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AkamaiConfig {
    pub name: String,
    #[serde(default = "super::default_layer_cdn")]
    pub layer: u8,
    /// The API client's host, as `https://akab-….purge.akamaiapis.net`.
    pub base_url: String,
    /// The three EdgeGrid credentials, each from an environment variable or a file.
    pub client_token_env: Option<String>,
    pub client_token_file: Option<PathBuf>,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub access_token_env: Option<String>,
    pub access_token_file: Option<PathBuf>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub surrogate_keys_as: KeysAs,
    /// Largest request body sent.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub object_limits: ObjectLimitsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default = "super::default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Optional freshness check after each confirmed purge ([`super::verify`]).
    pub verify: Option<VerifyConfig>,
    /// Fixed credentials (tests); otherwise the three secrets read by `validate`.
    #[serde(skip)]
    pub credentials: Option<edgegrid::Credentials>,
    /// `client_token`, `client_secret`, `access_token`, each following its file.
    #[serde(skip)]
    pub secrets: Option<[Arc<RotatingSecret>; 3]>,
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

impl AkamaiConfig {
    pub fn validate(&mut self, config_file: &Path, problems: &mut Vec<(Vec<String>, String)>) {
        let [client_token, client_secret, access_token] = [
            ("client_token", &self.client_token_env, &self.client_token_file),
            ("client_secret", &self.client_secret_env, &self.client_secret_file),
            ("access_token", &self.access_token_env, &self.access_token_file),
        ]
        .map(|(field, env, file)| {
            SecretRef::of(env, file).resolve_rotating_into(field, Need::Required, config_file, problems)
        });
        if let (Some(c), Some(s), Some(a)) = (client_token, client_secret, access_token) {
            self.secrets = Some([c, s, a]);
        }
        check_base_url("base_url", &self.base_url, problems);
        if self.max_body_bytes < 1024 || self.max_body_bytes > DEFAULT_MAX_BODY_BYTES {
            problems.push((
                vec!["max_body_bytes".into()],
                format!(
                    "max_body_bytes must be between 1024 and {DEFAULT_MAX_BODY_BYTES} (Akamai refuses larger bodies)"
                ),
            ));
        }
        self.limits.validate(DEFAULT_LIMITS, MAX_ITEMS, problems);
        if let Some(v) = &self.verify {
            v.validate(problems);
        }
        for (field, bucket) in [
            ("urls", self.object_limits.urls),
            ("tags", self.object_limits.tags),
            ("cpcodes", self.object_limits.cpcodes),
        ] {
            if let Some(b) = bucket {
                if b.burst == 0 || !b.per_minute.is_finite() || b.per_minute <= 0.0 {
                    problems.push((
                        vec!["object_limits".into(), field.into()],
                        format!("object_limits.{field} needs burst >= 1 and per_minute > 0"),
                    ));
                }
            }
        }
    }
}

pub struct AkamaiSink {
    name: String,
    base_url: String,
    /// `host[:port]` of `base_url`: signed as EdgeGrid's host field.
    host: String,
    scheme: String,
    /// `client_token`, `client_secret`, `access_token`: read per request, so a rotated file
    /// signs the next one.
    secrets: [Arc<RotatingSecret>; 3],
    settings: edgegrid::Settings,
    action: Action,
    network: Network,
    keys_as: KeysAs,
    max_body_bytes: usize,
    limits: Limits,
    requests: Option<TokenBucket>,
    url_objects: TokenBucket,
    tag_objects: TokenBucket,
    cpcode_objects: TokenBucket,
    sender: Sender,
    verifier: Option<Verifier>,
}

impl AkamaiSink {
    /// The credentials to sign with now.
    fn credentials(&self) -> edgegrid::Credentials {
        let [client_token, client_secret, access_token] = &self.secrets;
        edgegrid::Credentials {
            client_token: client_token.current().expose().to_string(),
            client_secret: client_secret.current(),
            access_token: access_token.current().expose().to_string(),
        }
    }

    pub fn new(config: &AkamaiConfig, metrics: Arc<Metrics>) -> Result<AkamaiSink, CdnError> {
        let name = config.name.as_str();
        let secrets = match (&config.credentials, &config.secrets) {
            (Some(c), _) => [
                RotatingSecret::fixed(Secret::new(c.client_token.as_str())),
                RotatingSecret::fixed(c.client_secret.clone()),
                RotatingSecret::fixed(Secret::new(c.access_token.as_str())),
            ],
            (None, Some(s)) => s.clone(),
            (None, None) => return Err(CdnError::build(name, "no EdgeGrid credentials (config not validated)")),
        };
        let reload = Arc::new(SecretSet(secrets.to_vec()));
        let (base, host) = base_and_host(name, "base_url", &config.base_url)?;
        let limits = config.limits.resolve(DEFAULT_LIMITS);
        let bucket = |b: Option<ObjectBucket>, default: ObjectBucket| {
            let b = b.unwrap_or(default);
            TokenBucket::new(b.burst, b.per_minute / 60.0)
        };
        let client = http::client(config.timeout).map_err(|e| CdnError::build(name, e))?;
        metrics.emit(SinkBuilt { sink: name });
        Ok(AkamaiSink {
            name: name.to_string(),
            base_url: config.base_url.trim_end_matches('/').to_string(),
            host,
            scheme: base.scheme().to_string(),
            secrets,
            settings: edgegrid::Settings::default(),
            action: config.action,
            network: config.network,
            keys_as: config.surrogate_keys_as,
            max_body_bytes: config.max_body_bytes,
            limits,
            requests: limits.request_bucket(name, &metrics),
            url_objects: bucket(config.object_limits.urls, DEFAULT_URL_OBJECTS),
            tag_objects: bucket(config.object_limits.tags, DEFAULT_TAG_OBJECTS),
            cpcode_objects: bucket(config.object_limits.cpcodes, DEFAULT_CPCODE_OBJECTS),
            verifier: config.verify.as_ref().map(|v| Verifier::new(name, v, metrics.clone())).transpose()?,
            sender: Sender::new(name, client, config.retry.clone(), metrics).with_reload(reload),
        })
    }

    /// The object type a job's kind is purged as, and its bucket.
    fn object_type(&self, kind: ItemKind) -> (&'static str, &TokenBucket) {
        match (kind, self.keys_as) {
            (ItemKind::Url, _) => ("url", &self.url_objects),
            (_, KeysAs::Cpcode) => ("cpcode", &self.cpcode_objects),
            _ => ("tag", &self.tag_objects),
        }
    }

    fn path(&self, object_type: &str) -> String {
        let action = match self.action {
            Action::Invalidate => "invalidate",
            Action::Delete => "delete",
        };
        let network = match self.network {
            Network::Production => "production",
            Network::Staging => "staging",
        };
        format!("/ccu/v3/{action}/{object_type}/{network}")
    }

    /// The JSON body for a job: strings, or numbers for CP codes (validated before).
    fn body(&self, job: &Job, batch: &Invalidations) -> String {
        let items = batch.items(job.kind);
        let objects: Vec<serde_json::Value> = job
            .items
            .iter()
            .map(|&i| match (job.kind, self.keys_as) {
                (ItemKind::SurrogateKey, KeysAs::Cpcode) => {
                    items[i].parse::<u64>().map(serde_json::Value::from).unwrap_or_else(|_| items[i].clone().into())
                }
                _ => items[i].clone().into(),
            })
            .collect();
        serde_json::json!({ "objects": objects }).to_string()
    }

    fn check_key(&self, key: &str) -> Result<(), String> {
        match self.keys_as {
            KeysAs::Tag => check_key(key, MAX_TAG_BYTES),
            KeysAs::Cpcode => key.parse::<u64>().map(|_| ()).map_err(|_| "a CP code must be a number".to_string()),
        }
    }
}

/// 2xx is success; a 429 waits at least [`MIN_RATE_LIMITED_WAIT`] (or `Retry-After`).
fn interpret(answer: Answer) -> Result<(), Failure> {
    if answer.status.is_success() {
        return Ok(());
    }
    let floor = (answer.status == reqwest::StatusCode::TOO_MANY_REQUESTS).then_some(MIN_RATE_LIMITED_WAIT);
    Err(Failure::from_answer(&answer, floor))
}

#[async_trait]
impl Provider for AkamaiSink {
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

    /// Cut by count and by JSON size (each object quoted and escaped, plus its comma).
    fn jobs(&self, batch: &Invalidations, kind: ItemKind, accepted: &[usize]) -> Vec<Job> {
        let room = Some(self.max_body_bytes - BODY_OVERHEAD);
        let size = |i: usize| serde_json::to_string(super::item(batch, kind, i)).map(|s| s.len()).unwrap_or(0) + 1;
        chunk(accepted, self.limits.items_per_request, room, size)
            .into_iter()
            .map(|items| Job { node: 0, kind, items })
            .collect()
    }

    async fn send(
        &self,
        job: Job,
        batch: &Invalidations,
        shutdown: &Shutdown,
    ) -> Result<Result<(), Failure>, SinkError> {
        let (object_type, objects) = self.object_type(job.kind);
        let path = self.path(object_type);
        let url = format!("{}{path}", self.base_url);
        let body = self.body(&job, batch);
        let mut buckets: Vec<(&TokenBucket, u32)> = self.requests.iter().map(|b| (b, 1)).collect();
        buckets.push((objects, job.items.len() as u32));
        let build = |client: &reqwest::Client| {
            // A fresh timestamp and nonce per attempt: Akamai refuses stale and replayed ones.
            let headers = [("Content-Type".to_string(), "application/json".to_string())];
            let request = edgegrid::Request {
                method: "POST",
                scheme: &self.scheme,
                host: &self.host,
                path_and_query: &path,
                headers: &headers,
                body: body.as_bytes(),
            };
            let authorization = edgegrid::authorization(
                &self.credentials(),
                &self.settings,
                &request,
                &edgegrid::timestamp(SystemTime::now()),
                &edgegrid::nonce(),
            );
            client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(reqwest::header::ACCEPT, "application/json")
                .header(reqwest::header::AUTHORIZATION, authorization)
                .body(body.clone())
        };
        self.sender.send(shutdown, job.items.len(), &buckets, build, interpret).await
    }

    async fn ping(&self) -> bool {
        self.sender.ping(&self.base_url).await
    }
}

purge_sink!(AkamaiSink);
