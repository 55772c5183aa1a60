//! The Cloudflare sink against the Cloudflare double: one kind per request within 100 items,
//! `success:false` inside a 200 treated as a failure, credentials refused, the plan's rate
//! never exceeded, and a minute-long storm of 503 then 429 survived without losing a purge.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_invalidator::shutdown::Shutdown;
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink};
use cdc_invalidator::telemetry::Metrics;
use serde_json::json;

use crate::support::cdn_doubles::cloudflare::{CloudflareDouble, POISON_TAG, TOKEN, ZONE};
use crate::support::cdn_doubles::{build_sink, fast_retry, max_in_window, secret_file, Bucket, Storm};

fn sink(
    double: &CloudflareDouble,
    token: &str,
    extra: serde_json::Value,
) -> (Arc<dyn Sink>, Arc<Metrics>, tempfile::TempDir) {
    let (dir, token_file) = secret_file(token);
    let metrics = Arc::new(Metrics::new());
    let mut config = json!({
        "kind": "cloudflare",
        "name": "cloudflare",
        "zone_id": ZONE,
        "token_file": token_file,
        "api": double.api(),
        "plan": "enterprise",
        "retry": fast_retry(),
        "timeout": "2s",
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    (build_sink(config, metrics.clone()), metrics, dir)
}

fn tags(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tag-{i}")).collect()
}

#[tokio::test]
async fn tags_and_files_go_in_separate_requests_of_at_most_100() {
    let double = CloudflareDouble::with_buckets(Bucket::new(500, 50.0), Bucket::new(3000, 3000.0));
    let (sink, _, _dir) = sink(&double, TOKEN, json!({}));
    let urls: Vec<String> = (0..150).map(|i| format!("https://shop.example.com/p/{i}")).collect();
    let batch = Invalidations::of(ItemKind::SurrogateKey, tags(250)).with(ItemKind::Url, urls.clone());
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.confirmed, vec![(ItemKind::SurrogateKey, 250), (ItemKind::Url, 150)]);
    let st = double.state.lock().unwrap();
    let mut sizes: Vec<(String, usize)> = st.accepted.iter().map(|(_, k, i)| (k.clone(), i.len())).collect();
    sizes.sort();
    assert_eq!(
        sizes,
        vec![
            ("files".into(), 50),
            ("files".into(), 100),
            ("tags".into(), 50),
            ("tags".into(), 100),
            ("tags".into(), 100)
        ]
    );
    let mut got = st.items("files");
    got.sort();
    let mut want = urls;
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn urls_as_prefixes_and_keys_as_hosts() {
    let double = CloudflareDouble::start();
    let (sink, _, _dir) = sink(&double, TOKEN, json!({ "urls_as": "prefixes", "surrogate_keys_as": "hosts" }));
    let batch = Invalidations::of(ItemKind::SurrogateKey, vec!["static.example.com".into(), "not/a/host".into()])
        .with(ItemKind::Url, vec!["https://shop.example.com/c/5/".into()]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(report.rejected[0].reason.contains("host name"));
    let st = double.state.lock().unwrap();
    assert_eq!(st.items("prefixes"), vec!["shop.example.com/c/5/"]);
    assert_eq!(st.items("hosts"), vec!["static.example.com"]);
}

#[tokio::test]
async fn success_false_inside_a_200_is_a_failure_and_only_the_culprit_is_rejected() {
    let double = CloudflareDouble::start();
    let (sink, _, _dir) = sink(&double, TOKEN, json!({}));
    let mut t = tags(20);
    t.push(POISON_TAG.into());
    t.sort();
    let batch = Invalidations::of(ItemKind::SurrogateKey, t.clone());
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
    assert_eq!(t[report.rejected[0].index], POISON_TAG);
    assert!(report.rejected[0].reason.contains("success:false"), "{}", report.rejected[0].reason);
    assert!(report.rejected[0].reason.contains("1107 Invalid tag"), "{}", report.rejected[0].reason);
    assert_eq!(report.confirmed, vec![(ItemKind::SurrogateKey, 20)]);
    assert_eq!(double.state.lock().unwrap().items("tags").len(), 20);
}

#[tokio::test]
async fn a_wrong_token_is_refused_with_cloudflares_message() {
    let double = CloudflareDouble::start();
    let (sink, _, _dir) = sink(&double, "wrong-token", json!({}));
    let batch = Invalidations::of(ItemKind::SurrogateKey, tags(3));
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert_eq!(report.rejected.len(), 3);
    assert!(report.rejected[0].reason.contains("HTTP 403"));
    assert!(report.rejected[0].reason.contains("10000 Authentication error"));
    assert!(!report.rejected[0].reason.contains("wrong-token"));
    assert_eq!(double.state.lock().unwrap().log.len(), 1);
}

#[tokio::test]
async fn the_plans_tag_rate_is_never_exceeded() {
    // The double enforces Pro's kind of bucket (5/s, burst 25) scaled to 10/s, burst 5 for
    // speed (plus one token of slack for arrival jitter: a request that took its token first may
    // reach the double second); the sink is configured with 10/s, burst 5.
    let double = CloudflareDouble::with_buckets(Bucket::new(6, 10.0), Bucket::new(800, 800.0));
    let (sink, _, _dir) = sink(
        &double,
        TOKEN,
        json!({ "limits": { "items_per_request": 1, "requests_per_second": 10.0, "burst": 5, "concurrency": 4 } }),
    );
    let batch = Invalidations::of(ItemKind::SurrogateKey, tags(40));
    let started = Instant::now();
    sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(3400), "{:?}", started.elapsed());
    let st = double.state.lock().unwrap();
    assert_eq!(st.log.iter().filter(|(_, s)| *s == 429).count(), 0, "the provider never had to refuse");
    assert_eq!(st.items("tags").len(), 40);
    let times: Vec<Instant> = st.log.iter().map(|(t, _)| *t).collect();
    for window in [Duration::from_millis(300), Duration::from_secs(1), Duration::from_secs(2)] {
        let most = max_in_window(&times, window);
        assert!(most as f64 <= 5.0 + 10.0 * window.as_secs_f64() + 1.0, "{most} requests within {window:?}");
    }
}

/// The storm: the provider answers 503 for 30 s, then 429 (with Retry-After) for 30 s.
/// Purges keep arriving meanwhile (several batches, as the pipeline would send them one after
/// the other); none is lost, each arrives once the storm is over, and while it lasts the sink
/// backs off (capped at the policy's 2 s) instead of hammering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_503_then_429_loses_nothing() {
    let double = CloudflareDouble::with_buckets(Bucket::new(500, 50.0), Bucket::new(3000, 3000.0));
    let storm_start = Instant::now();
    double.state.lock().unwrap().storm = Some(Storm::for_(Duration::from_secs(30), 503));
    let (sink, metrics, _dir) = sink(&double, TOKEN, json!({ "retry": { "initial": "50ms", "max": "2s" } }));
    let switch = {
        let state = double.state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            state.lock().unwrap().storm = Some(Storm::for_(Duration::from_secs(30), 429));
        })
    };
    let mut sent = Vec::new();
    for round in 0..3 {
        let batch = Invalidations::of(ItemKind::SurrogateKey, (0..120).map(|i| format!("r{round}-{i}")).collect())
            .with(ItemKind::Url, vec![format!("https://shop.example.com/r{round}")]);
        let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        sent.extend(batch.items(ItemKind::SurrogateKey).iter().cloned());
    }
    switch.await.unwrap();
    assert!(storm_start.elapsed() >= Duration::from_secs(60), "the first batch only passed after the storm");
    let st = double.state.lock().unwrap();
    let mut got = st.items("tags");
    got.sort();
    sent.sort();
    assert_eq!(got, sent, "every purge arrived, once");
    assert_eq!(st.items("files").len(), 3);
    let during = st.log.iter().filter(|(_, s)| *s != 200).count();
    // 3 requests in flight backing off up to 2 s for 30 s, then Retry-After for 30 s: a few
    // dozen attempts, not thousands.
    assert!(during < 200, "{during} attempts during the storm");
    assert!(metrics.value("cdc_invalidator_cdn_requests_total", &[("outcome", "server_error")]) >= 3.0);
    assert!(metrics.value("cdc_invalidator_cdn_requests_total", &[("outcome", "rate_limited")]) >= 1.0);
}
