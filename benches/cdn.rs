//! CDN purge benchmarks: purges/s through the Varnish sink (real varnishd with xkey, private, on
//! loopback) and through the Fastly and Cloudflare sinks against their local doubles, and the
//! batching ratio (items per request, events per request) under a realistic key distribution.
//!
//! `cargo bench --bench cdn` (needs varnishd: scripts/install-deps.sh). Figures go to
//! docs/benchmarks.md, section "CDN".
//!
//! Key distribution: 50,000 products with Zipf(s = 1.1) popularity (a few hot products take
//! most of the writes, as in a shop), 200 categories; each change event asks for
//! `product-{id}` and `category-{category}` and the URL of the product page. The pipeline
//! coalesces a batch of 500 events into distinct keys, exactly as `app::coalesce` does.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_invalidator::shutdown::Shutdown;
use cdc_invalidator::sink::{Invalidations, ItemKind, Sink};
use cdc_invalidator::telemetry::Metrics;
use rand::Rng;
use serde_json::json;

use support::cdn_doubles::cloudflare::{CloudflareDouble, TOKEN as CF_TOKEN, ZONE};
use support::cdn_doubles::fastly::{FastlyDouble, SERVICE, TOKEN as FASTLY_TOKEN};
use support::cdn_doubles::{build_sink, secret_file, Bucket};
use support::varnish::{Origin, Varnish};

const PRODUCTS: usize = 50_000;
const CATEGORIES: usize = 200;
const BATCH_EVENTS: usize = 500;
const BATCHES: usize = 200;
/// Product pages cached in Varnish before the run (the hottest ids), so purges evict real objects.
const WARM: usize = 2000;

/// Zipf(s) sampler over 1..=n by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n);
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        let total = acc;
        cdf.iter_mut().for_each(|c| *c /= total);
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u) + 1
    }
}

/// Batches of coalesced invalidations, and how many (event, item) requests they stand for.
fn workload() -> (Vec<Invalidations>, usize) {
    let zipf = Zipf::new(PRODUCTS, 1.1);
    let mut rng = rand::rng();
    let mut batches = Vec::new();
    let mut asked = 0;
    for _ in 0..BATCHES {
        let mut keys = BTreeSet::new();
        let mut urls = BTreeSet::new();
        for _ in 0..BATCH_EVENTS {
            let id = zipf.sample(&mut rng);
            let category = id % CATEGORIES;
            keys.insert(format!("product-{id}"));
            keys.insert(format!("category-{category}"));
            urls.insert(format!("https://shop.example.com/p/{id}"));
            asked += 2;
        }
        batches.push(
            Invalidations::of(ItemKind::SurrogateKey, keys.into_iter().collect())
                .with(ItemKind::Url, urls.into_iter().collect()),
        );
    }
    (batches, asked)
}

struct Figures {
    name: String,
    items: usize,
    requests: f64,
    elapsed: Duration,
}

impl Figures {
    fn print(&self, events: usize) {
        let secs = self.elapsed.as_secs_f64();
        println!(
            "{:<34} {:>8} items in {:>7.3} s = {:>9.0} items/s, {:>7.0} requests/s, {:>6.1} items/request, {:>6.1} events/request",
            self.name,
            self.items,
            secs,
            self.items as f64 / secs,
            self.requests / secs,
            self.items as f64 / self.requests,
            events as f64 / self.requests,
        );
    }
}

async fn run(
    name: &str,
    sink: Arc<dyn Sink>,
    metrics: &Metrics,
    batches: &[Invalidations],
    keys_only: bool,
) -> Figures {
    let started = Instant::now();
    let mut items = 0;
    for b in batches {
        let b = if keys_only {
            Invalidations::of(ItemKind::SurrogateKey, b.items(ItemKind::SurrogateKey).to_vec())
        } else {
            b.clone()
        };
        items += b.items(ItemKind::SurrogateKey).len() + b.items(ItemKind::Url).len();
        let report = sink.invalidate(&b, &Shutdown::never()).await.expect("batch done");
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    }
    let elapsed = started.elapsed();
    let requests = metrics.value("cdc_invalidator_cdn_requests_total", &[("outcome", "ok")]);
    Figures { name: name.to_string(), items, requests, elapsed }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (batches, asked) = workload();
    let keys: usize = batches.iter().map(|b| b.items(ItemKind::SurrogateKey).len()).sum();
    let urls: usize = batches.iter().map(|b| b.items(ItemKind::Url).len()).sum();
    let events = BATCHES * BATCH_EVENTS;
    println!(
        "workload: {BATCHES} batches x {BATCH_EVENTS} events, Zipf(1.1) over {PRODUCTS} products: {asked} surrogate keys asked, {keys} after per-batch coalescing ({:.2}x), {urls} URLs",
        asked as f64 / keys as f64
    );

    // Varnish: one node, surrogate keys by xkey (up to 128 per request), then URLs (one each).
    let origin = Origin::start();
    let varnish = Varnish::start(origin.server.port);
    for id in 1..=WARM {
        origin.tag(&format!("/p/{id}"), &format!("product-{id} category-{}", id % CATEGORIES));
        varnish.get("shop.example.com", &format!("/p/{id}"));
    }
    let metrics = Arc::new(Metrics::new());
    let sink = build_sink(json!({ "kind": "varnish", "name": "varnish", "nodes": [varnish.url()] }), metrics.clone());
    run("varnish: surrogate keys (xkey)", sink, &metrics, &batches, true).await.print(events);
    let metrics = Arc::new(Metrics::new());
    let sink = build_sink(
        json!({ "kind": "varnish", "name": "varnish", "nodes": [varnish.url()], "limits": { "concurrency": 8 } }),
        metrics.clone(),
    );
    let url_batches: Vec<Invalidations> =
        batches.iter().map(|b| Invalidations::of(ItemKind::Url, b.items(ItemKind::Url).to_vec())).collect();
    run("varnish: URLs (PURGE, 8 in flight)", sink, &metrics, &url_batches, false).await.print(events);
    let evicted =
        (1..=WARM).filter(|id| varnish.get("shop.example.com", &format!("/p/{id}")).x_cache == "MISS").count();
    println!("varnish: {evicted} of the {WARM} cached product pages were evicted by the purges");

    // Fastly double, client-side limit off: what the sink itself can do.
    let fastly = FastlyDouble::start();
    let (_d, token) = secret_file(FASTLY_TOKEN);
    let metrics = Arc::new(Metrics::new());
    let sink = build_sink(
        json!({ "kind": "fastly", "name": "fastly", "service_id": SERVICE, "token_file": token, "api": fastly.api(),
                "limits": { "requests_per_second": 0 } }),
        metrics.clone(),
    );
    run("fastly double: surrogate keys", sink, &metrics, &batches, true).await.print(events);

    // Cloudflare double, 100 tags per request, rate limits off on both sides (what the sink
    // itself can do; a real account is limited to its plan's bucket).
    let cf = CloudflareDouble::with_buckets(Bucket::new(1_000_000, 1e6), Bucket::new(1_000_000, 1e6));
    let (_d2, token) = secret_file(CF_TOKEN);
    let metrics = Arc::new(Metrics::new());
    let sink = build_sink(
        json!({ "kind": "cloudflare", "name": "cloudflare", "zone_id": ZONE, "token_file": token, "api": cf.api(),
                "plan": "enterprise", "limits": { "requests_per_second": 0 },
                "api_requests_per_second": 1e6, "api_burst": 1_000_000 }),
        metrics.clone(),
    );
    run("cloudflare double: tags", sink, &metrics, &batches, true).await.print(events);
}
