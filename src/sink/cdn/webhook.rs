//! Webhook: a JSON batch POSTed to any URL, for in-house caches.
//!
//! ```text
//! POST <url>
//! Content-Type: application/json
//! X-Cdc-Invalidator-Signature: t=1718000000,v1=<hex HMAC-SHA256(secret, "1718000000." + body)>
//!
//! {"surrogate_keys":["product-42","category-7"],"urls":[]}
//! ```
//!
//! One kind per request (the other list is empty), at most `limits.items_per_request` items.
//! The signature (sent when `secret_env`/`secret_file` is set) covers the timestamp and the
//! exact body bytes, so a receiver can reject forgeries and replays older than it tolerates:
//! recompute the HMAC over `t + "." + raw body` and compare in constant time. Any 2xx
//! confirms; 429/5xx/network errors retry (honouring `Retry-After`); other 4xx dead-letter the
//! items with the receiver's message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use sha2::Sha256;

use super::http::Failure;
use super::http::{self, Sender};
use super::limit::TokenBucket;
use super::purge::{purge_sink, Provider};
use super::verify::{Verifier, VerifyConfig};
use super::{check_base_url, check_key, check_url, CdnError, Job, Limits, LimitsConfig, SecretRef};
use crate::config::secret::{Need, RotatingSecret};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, SinkError};
use crate::telemetry::events::sink::SinkBuilt;
use crate::telemetry::Metrics;

/// No provider limits to respect: no client-side bucket, 2 requests in flight, 1,000 items.
pub const DEFAULT_LIMITS: Limits =
    Limits { items_per_request: 1000, requests_per_second: 0.0, burst: 100, concurrency: 2 };
const MAX_ITEMS: usize = 100_000;

/// `sinks.cdn[]` with `kind: webhook`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    #[serde(default = "super::default_layer_cache")]
    pub layer: u8,
    pub url: String,
    /// The HMAC key, from an environment variable...
    pub secret_env: Option<String>,
    /// ...or a file. Without either, requests are not signed.
    pub secret_file: Option<std::path::PathBuf>,
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    /// Extra, non-secret headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Longest surrogate key accepted.
    #[serde(default = "default_max_key_bytes")]
    pub max_key_bytes: usize,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default = "super::default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    pub verify: Option<VerifyConfig>,
    #[serde(skip)]
    pub secret: Option<Arc<RotatingSecret>>,
}

fn default_signature_header() -> String {
    "X-Cdc-Invalidator-Signature".into()
}
fn default_max_key_bytes() -> usize {
    1024
}

impl WebhookConfig {
    pub(super) fn validate(&mut self, config_file: &std::path::Path, problems: &mut Vec<(Vec<String>, String)>) {
        self.secret = SecretRef::of(&self.secret_env, &self.secret_file).resolve_rotating_into(
            "secret",
            Need::Optional,
            config_file,
            problems,
        );
        check_base_url("url", &self.url, problems);
        if self.signature_header.parse::<HeaderName>().is_err() {
            problems.push((vec!["signature_header".into()], "signature_header is not a valid header name".into()));
        }
        for (k, v) in &self.headers {
            if k.parse::<HeaderName>().is_err() || HeaderValue::from_str(v).is_err() {
                problems.push((vec!["headers".into(), k.clone()], format!("headers.{k} is not a valid HTTP header")));
            }
        }
        if self.max_key_bytes == 0 {
            problems.push((vec!["max_key_bytes".into()], "max_key_bytes must be at least 1".into()));
        }
        self.limits.validate(DEFAULT_LIMITS, MAX_ITEMS, problems);
        if let Some(v) = &self.verify {
            v.validate(problems);
        }
    }
}

pub struct WebhookSink {
    name: String,
    url: String,
    secret: Option<Arc<RotatingSecret>>,
    signature_header: HeaderName,
    headers: Vec<(HeaderName, HeaderValue)>,
    max_key_bytes: usize,
    limits: Limits,
    bucket: Option<TokenBucket>,
    sender: Sender,
    verifier: Option<Verifier>,
}

impl WebhookSink {
    pub fn new(config: &WebhookConfig, metrics: Arc<Metrics>) -> Result<WebhookSink, CdnError> {
        let name = config.name.as_str();
        let bad = |what: &str| CdnError::build(name, format!("invalid {what}"));
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.parse::<HeaderName>().map_err(|_| bad("header"))?,
                    HeaderValue::from_str(v).map_err(|_| bad("header"))?,
                ))
            })
            .collect::<Result<Vec<_>, CdnError>>()?;
        let limits = config.limits.resolve(DEFAULT_LIMITS);
        let client = http::client(config.timeout).map_err(|e| CdnError::build(name, e))?;
        metrics.emit(SinkBuilt { sink: name });
        Ok(WebhookSink {
            name: name.to_string(),
            url: config.url.clone(),
            secret: config.secret.clone(),
            signature_header: config.signature_header.parse().map_err(|_| bad("signature_header"))?,
            headers,
            max_key_bytes: config.max_key_bytes,
            limits,
            bucket: limits.request_bucket(name, &metrics),
            verifier: config.verify.as_ref().map(|v| Verifier::new(name, v, metrics.clone())).transpose()?,
            sender: match &config.secret {
                // A receiver that refuses the signature (401/403) may have been given a new secret.
                Some(secret) => Sender::new(name, client, config.retry.clone(), metrics).with_reload(secret.clone()),
                None => Sender::new(name, client, config.retry.clone(), metrics),
            },
        })
    }
}

/// The signature header value for `body` at Unix time `t`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

#[async_trait]
impl Provider for WebhookSink {
    // `name`, `limits`, `verifier`: the fields every provider keeps under those names.
    super::purge::provider_fields!();

    fn kinds(&self) -> &'static [ItemKind] {
        &[ItemKind::SurrogateKey, ItemKind::Url]
    }

    fn check(&self, kind: ItemKind, item: &str) -> Result<(), String> {
        match kind {
            ItemKind::SurrogateKey => check_key(item, self.max_key_bytes),
            _ => check_url(item).map(|_| ()),
        }
    }

    async fn send(
        &self,
        job: Job,
        batch: &Invalidations,
        shutdown: &Shutdown,
    ) -> Result<Result<(), Failure>, SinkError> {
        let buckets: Vec<(&TokenBucket, u32)> = self.bucket.iter().map(|b| (b, 1)).collect();
        let items = job.values(batch);
        let empty: Vec<&str> = Vec::new();
        let (keys, urls) = if job.kind == ItemKind::SurrogateKey { (&items, &empty) } else { (&empty, &items) };
        let body = serde_json::json!({ "surrogate_keys": keys, "urls": urls }).to_string();
        let build = |client: &reqwest::Client| {
            let mut b = client.post(&self.url).header(reqwest::header::CONTENT_TYPE, "application/json");
            for (k, v) in &self.headers {
                b = b.header(k, v);
            }
            if let Some(secret) = &self.secret {
                let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                b = b.header(
                    &self.signature_header,
                    signature(secret.current().expose().as_bytes(), t, body.as_bytes()),
                );
            }
            b.body(body.clone())
        };
        Ok(self.sender.send(shutdown, job.items.len(), &buckets, build, http::expect_success).await?.map(|_| ()))
    }

    async fn ping(&self) -> bool {
        self.sender.ping(&self.url).await
    }
}

purge_sink!(WebhookSink);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Expected value computed independently (Python's hmac module).
        let body = br#"{"surrogate_keys":["a"],"urls":[]}"#;
        assert_eq!(
            signature(b"Jefe", 1_718_000_000, body),
            "t=1718000000,v1=2c10c2e67c0fb00932b306f86fccdae754ddd2c7ad4358727bcdca7196994f12"
        );
        assert_ne!(signature(b"Jefe", 1_718_000_001, body), signature(b"Jefe", 1_718_000_000, body));
    }

    #[test]
    fn signature_matches_the_rfc_4231_vector() {
        // RFC 4231 test case 2: the HMAC primitive as wired here.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
