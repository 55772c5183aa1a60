//! Optional freshness verification: after a provider confirmed a purge, fetch a page that
//! depended on what was purged and check that the cache really let go of it.
//!
//! A purge API answering 200 for a typo (a wrong service id, a header the VCL does not know, a
//! tag the site never set) is a known way to stay stale for days; nothing else would notice.
//!
//! ```yaml
//! verify:
//!   url: "https://shop.example.com/p/{key}"   # or "{url}", or "http://10.0.0.5:6081{path}"
//!   delay: 1s                                  # propagation time before looking
//! ```
//!
//! The template's placeholder says which items are checked: `{key}` (a purged surrogate key,
//! percent-encoded) for surrogate keys; `{url}` (a purged URL as is), `{path}` (its path and
//! query) and `{host}` for URLs. A template with `{path}` but no `{host}` sends the purged URL's
//! host as the `Host` header, so it can point at one cache node.
//!
//! The answer is **fresh** when the cache-status header (`X-Cache` by default) says MISS (or
//! EXPIRED, PASS, BYPASS, DYNAMIC), or when `Age` is no older than the time since the purge
//! (plus `age_slack`): an object older than the purge was not purged. It is **stale** when
//! `Age` is older; **inconclusive** when the answer carries neither signal; **error** when the
//! fetch fails. Verification is a canary, not part of delivery: it runs in the background on a
//! sample (`items_per_batch`), never delays or fails the batch, and at most `max_in_flight`
//! checks run at once per sink (more are `skipped`). Outcomes are counted in
//! `cdc_invalidator_cdn_verifications_total{sink,outcome}`; stale ones are logged as warnings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Semaphore;

use super::{check_url, CdnError};
use crate::sink::{Invalidations, ItemKind, Rejected};
use crate::telemetry::events::sink_cdn::{VerificationOutcome, Verified};
use crate::telemetry::Metrics;

/// `sinks.cdn[].verify`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// The page to fetch, with `{key}`, or `{url}` / `{path}` / `{host}`.
    pub url: String,
    /// How long after the provider's confirmation to look (propagation time).
    #[serde(default = "default_delay", with = "crate::config::duration")]
    pub delay: Duration,
    /// Items checked per batch.
    #[serde(default = "default_items_per_batch")]
    pub items_per_batch: usize,
    /// The response header that says HIT or MISS.
    #[serde(default = "default_cache_status_header")]
    pub cache_status_header: String,
    /// Tolerance on `Age` (whole seconds, rounded by caches).
    #[serde(default = "default_age_slack", with = "crate::config::duration")]
    pub age_slack: Duration,
    /// Checks running at once for this sink; beyond that, checks are skipped (and counted).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "default_verify_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
}

fn default_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_items_per_batch() -> usize {
    1
}
fn default_cache_status_header() -> String {
    "x-cache".into()
}
fn default_age_slack() -> Duration {
    Duration::from_secs(1)
}
fn default_max_in_flight() -> usize {
    4
}
fn default_verify_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Which items a template checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Keys,
    Urls,
}

impl VerifyConfig {
    fn target(&self) -> Option<Target> {
        let keys = self.url.contains("{key}");
        let urls = ["{url}", "{path}", "{host}"].iter().any(|p| self.url.contains(p));
        match (keys, urls) {
            (true, false) => Some(Target::Keys),
            (false, true) => Some(Target::Urls),
            _ => None,
        }
    }

    pub fn validate(&self, problems: &mut Vec<(Vec<String>, String)>) {
        let at = |f: &str| vec!["verify".to_string(), f.to_string()];
        match self.target() {
            None => problems.push((
                at("url"),
                "verify.url needs exactly one kind of placeholder: {key} (surrogate keys) or {url}/{path}/{host} (URLs)"
                    .into(),
            )),
            Some(_) => {
                let sample = self
                    .url
                    .replace("{key}", "k")
                    .replace("{url}", "https://example.com/")
                    .replace("{host}", "example.com")
                    .replace("{path}", "/p");
                if let Err(e) = check_url(&sample) {
                    problems.push((at("url"), format!("verify.url does not render to an absolute URL: it {e}")));
                }
            }
        }
        if self.items_per_batch == 0 || self.max_in_flight == 0 {
            problems.push((
                at("items_per_batch"),
                "verify.items_per_batch and verify.max_in_flight must be at least 1".into(),
            ));
        }
        if self.cache_status_header.parse::<reqwest::header::HeaderName>().is_err() {
            problems.push((at("cache_status_header"), "verify.cache_status_header is not a valid header name".into()));
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    Stale,
    Inconclusive,
    Error,
}

/// What `cdc_invalidator_cdn_verifications_total` reports of a check.
impl From<Freshness> for VerificationOutcome {
    fn from(f: Freshness) -> VerificationOutcome {
        match f {
            Freshness::Fresh => VerificationOutcome::Fresh,
            Freshness::Stale => VerificationOutcome::Stale,
            Freshness::Inconclusive => VerificationOutcome::Inconclusive,
            Freshness::Error => VerificationOutcome::Error,
        }
    }
}

/// One sink's verifier.
pub struct Verifier {
    sink: Arc<str>,
    config: VerifyConfig,
    target: Target,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
}

/// A rendered check: the URL to fetch and the `Host` to send, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub url: String,
    pub host: Option<String>,
}

impl Verifier {
    pub fn new(sink: &str, config: &VerifyConfig, metrics: Arc<Metrics>) -> Result<Verifier, CdnError> {
        let target = config.target().ok_or_else(|| CdnError::build(sink, "verify.url has no usable placeholder"))?;
        let client = super::http::client(config.timeout).map_err(|e| CdnError::build(sink, e))?;
        Ok(Verifier {
            sink: sink.into(),
            config: config.clone(),
            target,
            client,
            metrics,
            slots: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
        })
    }

    /// Renders the check for one item (`None` if the item does not fit the template).
    pub fn render(&self, item: &str) -> Option<Check> {
        match self.target {
            Target::Keys => Some(Check { url: self.config.url.replace("{key}", &percent_encode(item)), host: None }),
            Target::Urls => {
                let parsed = check_url(item).ok()?;
                let host = match parsed.port() {
                    Some(p) => format!("{}:{p}", parsed.host_str()?),
                    None => parsed.host_str()?.to_string(),
                };
                let path = match parsed.query() {
                    Some(q) => format!("{}?{q}", parsed.path()),
                    None => parsed.path().to_string(),
                };
                let url = self.config.url.replace("{url}", item).replace("{host}", &host).replace("{path}", &path);
                let send_host =
                    (self.config.url.contains("{path}") && !self.config.url.contains("{host}")).then_some(host);
                Some(Check { url, host: send_host })
            }
        }
    }

    /// Starts background checks of a sample of `batch`'s items that were not rejected.
    /// `confirmed` is when the provider confirmed them.
    pub fn after_purge(&self, batch: &Invalidations, rejected: &[Rejected], confirmed: Instant) {
        let kind = match self.target {
            Target::Keys => ItemKind::SurrogateKey,
            Target::Urls => ItemKind::Url,
        };
        let sample = batch
            .items(kind)
            .iter()
            .enumerate()
            .filter(|(i, _)| !rejected.iter().any(|r| r.kind == kind && r.index == *i))
            .take(self.config.items_per_batch);
        for (_, item) in sample {
            let Some(check) = self.render(item) else { continue };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.metrics.emit(Verified { sink: &self.sink, outcome: VerificationOutcome::Skipped });
                continue;
            };
            let (client, sink, metrics, config) =
                (self.client.clone(), self.sink.clone(), self.metrics.clone(), self.config.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let wait = config.delay.saturating_sub(confirmed.elapsed());
                tokio::time::sleep(wait).await;
                let freshness = fetch(&client, &config, &check, confirmed).await;
                metrics.emit(Verified { sink: &sink, outcome: freshness.into() });
            });
        }
    }

    /// One check now (tests and tools).
    pub async fn check_now(&self, item: &str, confirmed: Instant) -> Freshness {
        match self.render(item) {
            Some(check) => fetch(&self.client, &self.config, &check, confirmed).await,
            None => Freshness::Error,
        }
    }
}

async fn fetch(client: &reqwest::Client, config: &VerifyConfig, check: &Check, confirmed: Instant) -> Freshness {
    let mut request = client.get(&check.url);
    if let Some(host) = &check.host {
        request = request.header(reqwest::header::HOST, host);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e.without_url(), "verification fetch failed");
            return Freshness::Error;
        }
    };
    let since_purge = confirmed.elapsed();
    let headers = response.headers();
    let status =
        headers.get(config.cache_status_header.as_str()).and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
    let age =
        headers.get(reqwest::header::AGE).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    judge(status.as_deref(), age, since_purge, config.age_slack)
}

/// The freshness rule (see the module docs).
pub fn judge(cache_status: Option<&str>, age: Option<u64>, since_purge: Duration, slack: Duration) -> Freshness {
    let missed =
        cache_status.is_some_and(|s| ["miss", "expired", "pass", "bypass", "dynamic"].iter().any(|m| s.contains(m)));
    if missed {
        return Freshness::Fresh;
    }
    match age {
        Some(age) if Duration::from_secs(age) > since_purge + slack => Freshness::Stale,
        Some(_) => Freshness::Fresh,
        None => Freshness::Inconclusive,
    }
}

/// Percent-encodes everything outside RFC 3986's unreserved set.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> VerifyConfig {
        serde_json::from_value(serde_json::json!({ "url": url })).unwrap()
    }

    #[test]
    fn the_rule() {
        let s = Duration::from_secs(1);
        assert_eq!(judge(Some("miss"), Some(500), Duration::ZERO, s), Freshness::Fresh);
        assert_eq!(judge(Some("HIT"), Some(30), Duration::from_secs(2), s), Freshness::Stale);
        assert_eq!(judge(Some("hit"), Some(2), Duration::from_secs(2), s), Freshness::Fresh);
        assert_eq!(judge(None, Some(0), Duration::ZERO, s), Freshness::Fresh);
        assert_eq!(judge(Some("hit"), None, Duration::ZERO, s), Freshness::Inconclusive);
    }

    #[test]
    fn templates_choose_their_items() {
        let m = Arc::new(Metrics::new());
        let v = Verifier::new("s", &config("https://shop.example.com/p/{key}"), m.clone()).unwrap();
        assert_eq!(v.render("a b/c").unwrap().url, "https://shop.example.com/p/a%20b%2Fc");
        let v = Verifier::new("s", &config("http://127.0.0.1:6081{path}"), m.clone()).unwrap();
        let c = v.render("https://shop.example.com:8443/p/1?x=2").unwrap();
        assert_eq!(
            c,
            Check { url: "http://127.0.0.1:6081/p/1?x=2".into(), host: Some("shop.example.com:8443".into()) }
        );
        assert!(v.render("not a url").is_none());
        let v = Verifier::new("s", &config("{url}"), m).unwrap();
        assert_eq!(v.render("https://a.example/x").unwrap().host, None);
    }

    #[test]
    fn validation() {
        let mut p = Vec::new();
        config("https://x.example/{key}{url}").validate(&mut p);
        config("no placeholder").validate(&mut p);
        config("{key}").validate(&mut p);
        assert_eq!(p.len(), 3, "{p:?}");
        let mut p = Vec::new();
        config("{url}").validate(&mut p);
        assert!(p.is_empty(), "{p:?}");
    }
}
