//! The Fastly sink against the Fastly double: bulk requests within 256 keys, soft purge, URL
//! purge, credentials refused, one bad key isolated, 429 storms waited out until
//! `Fastly-RateLimit-Reset`, and the client-side rate never exceeded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_invalidator::shutdown::Shutdown;
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink};
use cdc_invalidator::telemetry::Metrics;
use serde_json::json;

use crate::support::cdn_doubles::fastly::{FastlyDouble, SERVICE, TOKEN};
use crate::support::cdn_doubles::{build_sink, fast_retry, max_in_window, secret_file, Bucket, Storm};

fn sink(
    double: &FastlyDouble,
    token: &str,
    extra: serde_json::Value,
) -> (Arc<dyn Sink>, Arc<Metrics>, tempfile::TempDir) {
    let (dir, token_file) = secret_file(token);
    let metrics = Arc::new(Metrics::new());
    let mut config = json!({
        "kind": "fastly",
        "name": "fastly",
        "service_id": SERVICE,
        "token_file": token_file,
        "api": double.api(),
        "retry": fast_retry(),
        "timeout": "2s",
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    (build_sink(config, metrics.clone()), metrics, dir)
}

fn keys(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test]
async fn keys_go_in_bulk_within_256_and_urls_one_by_one() {
    let double = FastlyDouble::start();
    let (sink, metrics, _dir) = sink(&double, TOKEN, json!({ "soft": true }));
    let batch = Invalidations::of(ItemKind::SurrogateKey, keys(600, "product"))
        .with(ItemKind::Url, vec!["https://shop.example.com/p/1".into(), "https://shop.example.com/p/2?x=1".into()]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.confirmed, vec![(ItemKind::SurrogateKey, 600), (ItemKind::Url, 2)]);
    let st = double.state.lock().unwrap();
    let mut sizes = st.bulk_sizes.clone();
    sizes.sort();
    assert_eq!(sizes, vec![88, 256, 256]);
    let mut purged: Vec<String> = st.keys.iter().map(|(k, _)| k.clone()).collect();
    purged.sort();
    let mut want = batch.items(ItemKind::SurrogateKey).to_vec();
    want.sort();
    assert_eq!(purged, want);
    assert!(st.keys.iter().all(|(_, soft)| *soft), "Fastly-Soft-Purge: 1 on every request");
    let mut urls = st.urls.clone();
    urls.sort();
    assert_eq!(urls, vec!["shop.example.com/p/1", "shop.example.com/p/2?x=1"]);
    drop(st);
    assert_eq!(metrics.value("cdc_invalidator_cdn_request_items", &[("sink", "fastly")]), 5.0, "5 requests observed");
}

#[tokio::test]
async fn a_wrong_token_rejects_every_item_with_fastlys_message_in_one_request() {
    let double = FastlyDouble::start();
    let (sink, _, _dir) = sink(&double, "not-the-token", json!({}));
    let batch = Invalidations::of(ItemKind::SurrogateKey, keys(10, "k"));
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 10);
    assert!(report.rejected[0].reason.contains("HTTP 401"), "{}", report.rejected[0].reason);
    assert!(report.rejected[0].reason.contains("credentials are missing or invalid"), "{}", report.rejected[0].reason);
    assert!(!report.rejected[0].reason.contains("not-the-token"), "the token never appears in errors");
    assert_eq!(double.state.lock().unwrap().log.len(), 1, "a credentials error is not split or retried");
}

#[tokio::test]
async fn one_bad_key_is_isolated_and_the_rest_purged() {
    let double = FastlyDouble::start();
    double.state.lock().unwrap().refuse.push("k-37".into());
    let (sink, _, _dir) = sink(&double, TOKEN, json!({}));
    let batch = Invalidations::of(ItemKind::SurrogateKey, keys(100, "k"));
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(batch.items(ItemKind::SurrogateKey)[report.rejected[0].index], "k-37");
    assert!(report.rejected[0].reason.contains("invalid surrogate key k-37"), "{}", report.rejected[0].reason);
    assert_eq!(double.purged_keys().len(), 99);
    assert!(double.state.lock().unwrap().log.len() <= 15, "found by bisection, not one request per key");
}

#[tokio::test]
async fn a_429_storm_is_waited_out_until_the_reset_and_nothing_is_lost() {
    let double = FastlyDouble::start();
    // The storm's 3 s count from its creation, so the clock starts before it (started after
    // it, the test failed once at 2.99 s with the sink behaving correctly).
    let started = Instant::now();
    double.state.lock().unwrap().storm = Some(Storm::for_(Duration::from_secs(3), 429));
    let (sink, metrics, _dir) = sink(&double, TOKEN, json!({ "limits": { "items_per_request": 50 } }));
    let batch = Invalidations::of(ItemKind::SurrogateKey, keys(200, "k"));
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(double.purged_keys().len(), 200, "every key arrives after the storm");
    let st = double.state.lock().unwrap();
    let refused = st.log.iter().filter(|(_, s)| *s == 429).count();
    // 4 requests (8 in flight at most) each hit the storm once, then wait for the reset time
    // instead of hammering with 20 ms backoffs.
    assert!(refused <= 8, "{refused} requests during the storm: the reset header was not honoured");
    assert!(metrics.value("cdc_invalidator_cdn_requests_total", &[("outcome", "rate_limited")]) >= 1.0);
}

#[tokio::test]
async fn the_configured_request_rate_is_never_exceeded() {
    let double = FastlyDouble::start();
    // The provider's bucket is ours plus one token of slack for arrival jitter (a request that
    // took its token first may reach the double second): anything faster would be a 429.
    double.state.lock().unwrap().bucket = Some(Bucket::new(5, 8.0));
    let (sink, metrics, _dir) = sink(
        &double,
        TOKEN,
        json!({ "limits": { "items_per_request": 1, "requests_per_second": 8.0, "burst": 4, "concurrency": 8 } }),
    );
    let batch = Invalidations::of(ItemKind::SurrogateKey, keys(36, "k"));
    let started = Instant::now();
    sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    // 36 requests, 4 at once, then 8/s: at least 4 s.
    assert!(started.elapsed() >= Duration::from_millis(3900), "{:?}", started.elapsed());
    let st = double.state.lock().unwrap();
    assert_eq!(st.log.len(), 36, "no request was refused, so none was repeated");
    assert!(st.log.iter().all(|(_, s)| *s == 200));
    let times: Vec<Instant> = st.log.iter().map(|(t, _)| *t).collect();
    for window in [Duration::from_millis(500), Duration::from_secs(1), Duration::from_secs(2)] {
        let most = max_in_window(&times, window);
        assert!(most as f64 <= 4.0 + 8.0 * window.as_secs_f64() + 1.0, "{most} requests within {window:?}");
    }
    assert!(metrics.value("cdc_invalidator_cdn_rate_limit_wait_seconds_total", &[("sink", "fastly")]) > 1.0);
}
