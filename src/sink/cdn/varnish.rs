//! Varnish (and any Varnish-compatible HTTP cache): purge by surrogate key through xkey, by URL
//! with `PURGE`, or by URL regex with `BAN`, on every node of a list.
//!
//! Requests, as served by shared/reference/varnish-xkey.vcl (header names configurable):
//! - surrogate keys: `PURGE /` with `xkey-purge: k1 k2 …` (or `xkey-softpurge` when `soft`),
//!   at most `limits.items_per_request` keys and `max_header_bytes` bytes per request;
//! - URLs (`urls: purge`, the default): `PURGE <path?query>` with the URL's `Host`, one per
//!   request (Varnish hashes by host and URL, so this evicts exactly that object);
//! - URLs (`urls: ban`): `BAN /` with `X-Ban-Url: ^<path?query>`: the URL's path is a regular
//!   expression matched from the start of cached URLs, so `https://shop/c/5/` bans every page
//!   under `/c/5/` (on every host). Use only with rules whose URL templates are meant as regex
//!   prefixes.
//!
//! A batch is done when **every node** confirmed every item: a node that is down holds the
//! batch (retried, like Redis), since a purge that reached two nodes of three leaves a third
//! of the traffic stale. A node that permanently refuses (403 outside the VCL's ACL, 405 from
//! a VCL without purge support, 400 for a bad ban regex) dead-letters the items it refused.
//! Varnish has no rate limit: concurrency is capped per node (`limits.concurrency`), and a
//! client-side token bucket is available (`limits.requests_per_second`, off by default).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderName, HOST};
use reqwest::Method;
use serde::Deserialize;

use super::http::{self, Sender};
use super::limit::TokenBucket;
use super::purge::{purge_sink, Provider};
use super::verify::{Verifier, VerifyConfig};
use super::{check_key, check_url, chunk, CdnError, Job, Limits, LimitsConfig};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, ItemKind, SinkError};
use crate::telemetry::events::sink::{SinkBuilt, SinkPinged};
use crate::telemetry::Metrics;

/// Varnish has no rate limits: no client-side bucket, 4 requests in flight per node, and up to
/// 128 keys per xkey header (further bounded by `max_header_bytes`).
pub const DEFAULT_LIMITS: Limits =
    Limits { items_per_request: 128, requests_per_second: 0.0, burst: 100, concurrency: 4 };
/// The largest `items_per_request` accepted in config.
const MAX_ITEMS: usize = 4096;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UrlMethod {
    /// `PURGE` each URL: exactly that object.
    #[default]
    Purge,
    /// `BAN` by regex on the URL's path.
    Ban,
}

/// `sinks.cdn[]` with `kind: varnish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarnishConfig {
    pub name: String,
    #[serde(default = "super::default_layer_cache")]
    pub layer: u8,
    /// Base URLs of the cache nodes (`http://10.0.0.5:6081`); every purge goes to each.
    pub nodes: Vec<String>,
    /// Soft purge (xkey softpurge: objects stay servable as stale while refetched) instead of
    /// evicting.
    #[serde(default)]
    pub soft: bool,
    /// Header carrying space-separated keys for a hard purge.
    #[serde(default = "default_purge_header")]
    pub purge_header: String,
    /// Header for a soft purge.
    #[serde(default = "default_soft_purge_header")]
    pub soft_purge_header: String,
    /// How URLs are purged: `purge` (default) or `ban`.
    #[serde(default)]
    pub urls: UrlMethod,
    /// Header carrying the regex of a `BAN`.
    #[serde(default = "default_ban_header")]
    pub ban_header: String,
    /// Longest surrogate key accepted; longer ones are dead-lettered.
    #[serde(default = "default_max_key_bytes")]
    pub max_key_bytes: usize,
    /// Budget for the key header of one request (Varnish's `http_req_hdr_len` is 8 KB).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Per attempt, connect included.
    #[serde(default = "super::default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    pub verify: Option<VerifyConfig>,
}

fn default_purge_header() -> String {
    "xkey-purge".into()
}
fn default_soft_purge_header() -> String {
    "xkey-softpurge".into()
}
fn default_ban_header() -> String {
    "X-Ban-Url".into()
}
fn default_max_key_bytes() -> usize {
    1024
}
fn default_max_header_bytes() -> usize {
    4096
}

impl VarnishConfig {
    pub(super) fn validate(&mut self, _config_file: &std::path::Path, problems: &mut Vec<(Vec<String>, String)>) {
        if self.nodes.is_empty() {
            problems.push((vec!["nodes".into()], "a varnish sink needs at least one node in `nodes`".into()));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            match check_url(node) {
                Ok(u) if u.path() == "/" && u.query().is_none() => {}
                Ok(_) => problems.push((
                    vec!["nodes".into(), i.to_string()],
                    format!("nodes[{i}] must be a base URL without a path, such as http://10.0.0.5:6081"),
                )),
                Err(e) => problems.push((vec!["nodes".into(), i.to_string()], format!("nodes[{i}] {e}"))),
            }
        }
        for (field, value) in [
            ("purge_header", &self.purge_header),
            ("soft_purge_header", &self.soft_purge_header),
            ("ban_header", &self.ban_header),
        ] {
            if value.parse::<HeaderName>().is_err() {
                problems.push((vec![field.into()], format!("`{field}` is not a valid HTTP header name")));
            }
        }
        if self.max_key_bytes == 0 || self.max_header_bytes < self.max_key_bytes {
            problems.push((
                vec!["max_header_bytes".into()],
                "max_key_bytes must be at least 1 and max_header_bytes at least max_key_bytes".into(),
            ));
        }
        self.limits.validate(DEFAULT_LIMITS, MAX_ITEMS, problems);
        if let Some(v) = &self.verify {
            v.validate(problems);
        }
    }
}

pub struct VarnishSink {
    name: String,
    /// `scheme://host:port` of each node, no trailing slash.
    nodes: Vec<String>,
    key_header: HeaderName,
    urls: UrlMethod,
    ban_header: HeaderName,
    max_key_bytes: usize,
    max_header_bytes: usize,
    limits: Limits,
    bucket: Option<TokenBucket>,
    sender: Sender,
    verifier: Option<Verifier>,
}

impl VarnishSink {
    pub fn new(config: &VarnishConfig, metrics: Arc<Metrics>) -> Result<VarnishSink, CdnError> {
        let name = config.name.as_str();
        let header =
            |v: &str| v.parse::<HeaderName>().map_err(|_| CdnError::build(name, format!("bad header name {v}")));
        let nodes = config
            .nodes
            .iter()
            .map(|n| check_url(n).map(|u| u.origin().ascii_serialization()).map_err(|e| CdnError::build(name, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let limits = config.limits.resolve(DEFAULT_LIMITS);
        let client = http::client(config.timeout).map_err(|e| CdnError::build(name, e))?;
        metrics.emit(SinkBuilt { sink: name });
        Ok(VarnishSink {
            name: name.to_string(),
            nodes,
            key_header: header(if config.soft { &config.soft_purge_header } else { &config.purge_header })?,
            urls: config.urls,
            ban_header: header(&config.ban_header)?,
            max_key_bytes: config.max_key_bytes,
            max_header_bytes: config.max_header_bytes,
            limits,
            bucket: limits.request_bucket(name, &metrics),
            verifier: config.verify.as_ref().map(|v| Verifier::new(name, v, metrics.clone())).transpose()?,
            sender: Sender::new(name, client, config.retry.clone(), metrics),
        })
    }

    /// Builds the request of one job on one node.
    fn request(&self, job: &Job, batch: &Invalidations) -> Result<Request, String> {
        let node = &self.nodes[job.node];
        match job.kind {
            ItemKind::SurrogateKey => {
                let keys = job.values(batch);
                Ok(Request {
                    method: purge(),
                    url: format!("{node}/"),
                    headers: vec![(self.key_header.clone(), keys.join(" "))],
                })
            }
            _ => {
                let url = check_url(job.items.first().map_or("", |&i| super::item(batch, ItemKind::Url, i)))?;
                let path = match url.query() {
                    Some(q) => format!("{}?{q}", url.path()),
                    None => url.path().to_string(),
                };
                match self.urls {
                    UrlMethod::Purge => {
                        let host = match url.port() {
                            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
                            None => url.host_str().unwrap_or_default().to_string(),
                        };
                        Ok(Request { method: purge(), url: format!("{node}{path}"), headers: vec![(HOST, host)] })
                    }
                    UrlMethod::Ban => Ok(Request {
                        method: Method::from_bytes(b"BAN").unwrap_or(Method::DELETE),
                        url: format!("{node}/"),
                        headers: vec![(self.ban_header.clone(), format!("^{path}"))],
                    }),
                }
            }
        }
    }
}

fn purge() -> Method {
    // A valid token; `from_bytes` only fails on invalid ones.
    Method::from_bytes(b"PURGE").unwrap_or(Method::DELETE)
}

struct Request {
    method: Method,
    url: String,
    headers: Vec<(HeaderName, String)>,
}

#[async_trait]
impl Provider for VarnishSink {
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

    /// Every request to every node: keys space-separated in one header (bounded by
    /// `max_header_bytes`), URLs one per request.
    fn jobs(&self, batch: &Invalidations, kind: ItemKind, accepted: &[usize]) -> Vec<Job> {
        let requests: Vec<Vec<usize>> = match kind {
            ItemKind::SurrogateKey => {
                chunk(accepted, self.limits.items_per_request, Some(self.max_header_bytes), |i| {
                    super::item(batch, ItemKind::SurrogateKey, i).len() + 1
                })
            }
            _ => accepted.iter().map(|&i| vec![i]).collect(),
        };
        (0..self.nodes.len())
            .flat_map(|node| requests.iter().map(move |items| Job { node, kind, items: items.clone() }))
            .collect()
    }

    async fn send(
        &self,
        job: Job,
        batch: &Invalidations,
        shutdown: &Shutdown,
    ) -> Result<Result<(), http::Failure>, SinkError> {
        let buckets: Vec<(&TokenBucket, u32)> = self.bucket.iter().map(|b| (b, 1)).collect();
        let request = match self.request(&job, batch) {
            Ok(r) => r,
            Err(reason) => return Ok(Err(http::Failure::Permanent { item_level: false, message: reason })),
        };
        let build = |client: &reqwest::Client| {
            let mut b = client.request(request.method.clone(), &request.url);
            for (name, value) in &request.headers {
                b = b.header(name, value);
            }
            b
        };
        Ok(self.sender.send(shutdown, job.items.len(), &buckets, build, http::expect_success).await?.map(|_| ()))
    }

    /// Every node accepts a TCP connection within 2 s (no request: a GET would reach the
    /// origin, and Varnish has no side-effect-free health method without VCL support).
    async fn ping(&self) -> bool {
        let mut up = true;
        for node in &self.nodes {
            let Ok(url) = reqwest::Url::parse(node) else { return false };
            let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else { return false };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let connect = tokio::net::TcpStream::connect((host, port));
            up &= matches!(tokio::time::timeout(Duration::from_secs(2), connect).await, Ok(Ok(_)));
        }
        self.sender.metrics().emit(SinkPinged { sink: &self.name, up });
        up
    }
}

purge_sink!(VarnishSink);
