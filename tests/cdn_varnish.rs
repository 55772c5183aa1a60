//! The Varnish sink against real Varnish 7 with the xkey vmod (two private nodes in front of a
//! local origin): purge by surrogate key evicts exactly the tagged objects, a URL purge exactly
//! one object, on every node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_invalidator::shutdown::{self, Shutdown};
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink, SinkError};
use cdc_invalidator::telemetry::Metrics;
use serde_json::json;

use crate::support::cdn_doubles::{build_sink, fast_retry};
use crate::support::daemon::wait_until;
use crate::support::varnish::{Origin, Varnish};

const HOST: &str = "shop.example.com";

fn keys(k: &[&str]) -> Invalidations {
    Invalidations::of(ItemKind::SurrogateKey, k.iter().map(|s| s.to_string()).collect())
}

fn urls(u: &[&str]) -> Invalidations {
    Invalidations::of(ItemKind::Url, u.iter().map(|s| s.to_string()).collect())
}

fn sink(nodes: &[&Varnish], extra: serde_json::Value) -> (Arc<dyn Sink>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let mut config = json!({
        "kind": "varnish",
        "name": "varnish",
        "nodes": nodes.iter().map(|v| v.url()).collect::<Vec<_>>(),
        "retry": fast_retry(),
        "timeout": "2s",
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    (build_sink(config, metrics.clone()), metrics)
}

/// Fetches every path through every node until each is a cache hit.
fn warm(nodes: &[&Varnish], host: &str, paths: &[&str]) {
    for v in nodes {
        for p in paths {
            v.get(host, p);
            assert_eq!(v.get(host, p).x_cache, "HIT", "{p} is cached on :{}", v.port);
        }
    }
}

fn cached(v: &Varnish, host: &str, path: &str) -> bool {
    // A MISS refills the cache, so each check is only good once per purge.
    v.get(host, path).x_cache == "HIT"
}

#[tokio::test]
async fn a_surrogate_key_purge_evicts_exactly_the_tagged_objects_on_every_node() {
    let origin = Origin::start();
    origin.tag("/p/1", "product-1 category-5");
    origin.tag("/p/2", "product-2 category-5");
    origin.tag("/p/3", "product-3 category-9");
    origin.tag("/c/5", "category-5");
    let (a, b) = (Varnish::start(origin.server.port), Varnish::start(origin.server.port));
    let nodes = [&a, &b];
    let all = ["/p/1", "/p/2", "/p/3", "/c/5", "/untagged"];
    warm(&nodes, HOST, &all);
    let (sink, metrics) = sink(&nodes, json!({}));

    let report = sink.invalidate(&keys(&["product-1"]), &Shutdown::never()).await.unwrap();
    assert_eq!(report.confirmed, vec![(ItemKind::SurrogateKey, 1)]);
    assert!(report.rejected.is_empty());
    for v in nodes {
        assert!(!cached(v, HOST, "/p/1"), "the tagged object is gone on :{}", v.port);
        for p in ["/p/2", "/p/3", "/c/5", "/untagged"] {
            assert!(cached(v, HOST, p), "{p} stays cached on :{}", v.port);
        }
    }
    assert_eq!(origin.fetches("/p/1"), 4, "fetched once per node to warm and once per node after the purge");

    // Two keys in one request: every object tagged with either, nothing else.
    warm(&nodes, HOST, &all);
    sink.invalidate(&keys(&["category-5", "product-3"]), &Shutdown::never()).await.unwrap();
    for v in nodes {
        for p in ["/p/1", "/p/2", "/p/3", "/c/5"] {
            assert!(!cached(v, HOST, p), "{p} is tagged: purged on :{}", v.port);
        }
        assert!(cached(v, HOST, "/untagged"));
    }
    assert_eq!(
        metrics.value("cdc_invalidator_cdn_requests_total", &[("outcome", "ok")]),
        4.0,
        "one request per node per batch"
    );
}

#[tokio::test]
async fn a_url_purge_evicts_exactly_one_object() {
    let origin = Origin::start();
    let v = Varnish::start(origin.server.port);
    warm(&[&v], HOST, &["/p/1", "/p/1?page=2", "/p/2"]);
    warm(&[&v], "other.example.com", &["/p/1"]);
    let (sink, _) = sink(&[&v], json!({}));

    let report = sink.invalidate(&urls(&["https://shop.example.com/p/1"]), &Shutdown::never()).await.unwrap();
    assert_eq!(report.confirmed, vec![(ItemKind::Url, 1)]);
    assert!(!cached(&v, HOST, "/p/1"));
    assert!(cached(&v, HOST, "/p/1?page=2"), "the query string is another object");
    assert!(cached(&v, HOST, "/p/2"));
    assert!(cached(&v, "other.example.com", "/p/1"), "another host is another object");

    sink.invalidate(&urls(&["https://shop.example.com/p/1?page=2"]), &Shutdown::never()).await.unwrap();
    assert!(!cached(&v, HOST, "/p/1?page=2"));
}

#[tokio::test]
async fn ban_by_url_regex_evicts_the_matching_urls() {
    let origin = Origin::start();
    let v = Varnish::start(origin.server.port);
    warm(&[&v], HOST, &["/c/5/page/1", "/c/5/page/2", "/c/50/page/1", "/c/6/page/1"]);
    let (sink, _) = sink(&[&v], json!({ "urls": "ban" }));
    sink.invalidate(&urls(&["https://shop.example.com/c/5/"]), &Shutdown::never()).await.unwrap();
    assert!(!cached(&v, HOST, "/c/5/page/1") && !cached(&v, HOST, "/c/5/page/2"));
    assert!(cached(&v, HOST, "/c/50/page/1") && cached(&v, HOST, "/c/6/page/1"));
}

#[tokio::test]
async fn soft_purge_keeps_serving_then_refetches() {
    let origin = Origin::start();
    origin.tag("/p/1", "product-1");
    let v = Varnish::start(origin.server.port);
    warm(&[&v], HOST, &["/p/1", "/p/2"]);
    let (sink, _) = sink(&[&v], json!({ "soft": true }));
    sink.invalidate(&keys(&["product-1"]), &Shutdown::never()).await.unwrap();
    // Soft: the stale copy is still served (grace) while Varnish refetches in the background.
    let first = v.get(HOST, "/p/1");
    assert_eq!(first.status, 200);
    assert!(first.body.contains("fetch 1"), "the stale copy is served: {first:?}");
    assert!(wait_until(Duration::from_secs(5), || origin.fetches("/p/1") == 2).await, "refetched");
    assert!(wait_until(Duration::from_secs(5), || v.get(HOST, "/p/1").body.contains("fetch 2")).await);
    assert_eq!(origin.fetches("/p/2"), 1, "untagged objects are untouched");
}

#[tokio::test]
async fn bad_items_are_rejected_and_never_sent() {
    let origin = Origin::start();
    let v = Varnish::start(origin.server.port);
    let (sink, metrics) = sink(&[&v], json!({ "max_key_bytes": 16 }));
    let batch = Invalidations::of(ItemKind::SurrogateKey, vec!["has space".into(), "k".repeat(17), "ok-key".into()])
        .with(ItemKind::Url, vec!["/relative".into(), "https://shop.example.com/fine".into()]);
    let report = sink.invalidate(&batch, &Shutdown::never()).await.unwrap();
    let reasons: Vec<(ItemKind, usize)> = report.rejected.iter().map(|r| (r.kind, r.index)).collect();
    assert_eq!(reasons, vec![(ItemKind::SurrogateKey, 0), (ItemKind::SurrogateKey, 1), (ItemKind::Url, 0)]);
    assert!(report.rejected[0].reason.contains("whitespace"), "{:?}", report.rejected);
    assert!(report.rejected[1].reason.contains("17 bytes"), "{:?}", report.rejected);
    assert!(report.rejected[2].reason.contains("absolute"), "{:?}", report.rejected);
    assert_eq!(report.confirmed, vec![(ItemKind::SurrogateKey, 1), (ItemKind::Url, 1)]);
    assert_eq!(metrics.value("cdc_invalidator_cdn_requests_total", &[]), 2.0, "only the good items were sent");
}

#[tokio::test]
async fn a_node_that_is_down_holds_the_batch_until_shutdown() {
    let origin = Origin::start();
    let v = Varnish::start(origin.server.port);
    let dead = format!("http://127.0.0.1:{}", crate::support::free_port());
    let metrics = Arc::new(Metrics::new());
    let sink = build_sink(
        json!({ "kind": "varnish", "name": "varnish", "nodes": [v.url(), dead], "retry": fast_retry() }),
        metrics.clone(),
    );
    let (trigger, shutdown) = shutdown::channel();
    let task = tokio::spawn(async move { sink.invalidate(&keys(&["product-1"]), &shutdown).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished(), "two nodes of three purged is not done");
    assert!(metrics.value("cdc_invalidator_sink_retries_total", &[]) >= 2.0);
    trigger.abandon();
    assert!(matches!(task.await.unwrap(), Err(SinkError::Abandoned)));
}

#[tokio::test]
async fn verification_catches_a_purge_the_cache_answered_200_for_but_ignored() {
    let origin = Origin::start();
    origin.tag("/k/product-1", "product-1");
    let v = Varnish::start(origin.server.port);
    let host = format!("127.0.0.1:{}", v.port);
    warm(&[&v], &host, &["/k/product-1"]);
    // Let the cached copy age, so "older than the purge" is measurable in whole seconds.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let verify = json!({ "url": format!("{}/k/{{key}}", v.url()), "delay": "0ms", "age_slack": "500ms" });

    // A typo in the header name: the VCL sees a plain `PURGE /`, purges "/" and answers 200.
    let (typo, metrics) = sink(&[&v], json!({ "purge_header": "xkey-purje", "verify": verify }));
    let started = Instant::now();
    typo.invalidate(&keys(&["product-1"]), &Shutdown::never()).await.unwrap();
    let stale = || metrics.value("cdc_invalidator_cdn_verifications_total", &[("outcome", "stale")]) == 1.0;
    assert!(wait_until(Duration::from_secs(5), stale).await, "the stale copy is detected");
    assert!(started.elapsed() < Duration::from_secs(5));

    let (good, metrics) = sink(&[&v], json!({ "verify": verify }));
    good.invalidate(&keys(&["product-1"]), &Shutdown::never()).await.unwrap();
    let fresh = || metrics.value("cdc_invalidator_cdn_verifications_total", &[("outcome", "fresh")]) == 1.0;
    assert!(wait_until(Duration::from_secs(5), fresh).await, "a real purge verifies fresh");
    assert_eq!(metrics.value("cdc_invalidator_cdn_verifications_total", &[("outcome", "stale")]), 0.0);
}
