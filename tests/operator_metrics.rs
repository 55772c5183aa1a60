//! The dashboard and the alerts use only metrics the daemon really exports: every metric name
//! in `deploy/grafana/cdc-invalidator.json` and `deploy/prometheus/alerts.yml` is checked against
//! the live `/metrics` page of a daemon (mock Kafka, real Redis, a webhook CDN double) driven so
//! that every labelled series exists. The PostgreSQL source's metrics cannot appear on a Kafka
//! daemon's page; they are checked against the daemon's metric registry instead
//! (`Metrics::is_registered`), which knows every family whether or not it has a series yet.

use std::collections::BTreeSet;
use std::time::Duration;

use cdc_invalidator::telemetry::Metrics;

use crate::support::cdn_doubles::secret_file;
use crate::support::cdn_doubles::webhook::{WebhookDouble, SECRET};
use crate::support::daemon::{http_get, wait_until, write_config, Daemon, Setup};
use crate::support::events::product_insert;
use crate::support::kafka::MockKafka;
use crate::support::redis::RedisServer;

const TOPIC: &str = "shop.public.products";

/// Metrics only the PostgreSQL source sets (a Kafka daemon never has series for them).
const POSTGRES_PREFIX: &str = "cdc_invalidator_postgres_";

/// Metrics only a daemon with `freshness.replicas` (and its second passes) has series for.
const FRESHNESS: &[&str] = &[
    "cdc_invalidator_second_pass_refills_total",
    "cdc_invalidator_settled_seconds",
    "cdc_invalidator_settled_seconds_bucket",
    "cdc_invalidator_replica_replay_lag_seconds",
    "cdc_invalidator_replica_replay_lag_bytes",
    "cdc_invalidator_freshness_max_wait_total",
];

/// Series Prometheus makes itself, not the daemon.
const PROMETHEUS_OWN: &[&str] = &["up"];

const RULES: &str = r#"version: 1
rules:
  - name: product-pages
    table: public.products
    redis:
      keys: ["product:{id}"]
      tags: ["category:{category_id}"]
    cdn:
      surrogate_keys: ["product-{id}"]
"#;

pub fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `cdc_invalidator_*` name in a text (PromQL in JSON or YAML).
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("cdc_invalidator_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Every PromQL expression of the dashboard: panel targets (rows included), template
/// variables and annotations.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                        ("query", serde_json::Value::String(s)) if s.contains('(') => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// Whether the exposition has a sample of exactly this name.
fn exported(page: &str, name: &str) -> bool {
    page.lines().any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
}

#[test]
fn every_dashboard_panel_queries_a_daemon_metric() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/cdc-invalidator.json")).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let graphs: Vec<&serde_json::Value> = panels.iter().filter(|p| p["type"] != "row").collect();
    assert!(graphs.len() >= 15, "{} panels", graphs.len());
    for p in graphs {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has targets", p["title"]));
        assert!(!targets.is_empty(), "panel {} has a query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!metric_names(expr).is_empty(), "panel {}: {expr:?} uses a daemon metric", p["title"]);
            assert!(expr.contains("$instance"), "panel {}: {expr:?} follows the instance selector", p["title"]);
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Staleness p50 / p99 per sink",
        "Staleness p50 / p99 per table",
        "Kafka consumer lag",
        "PostgreSQL replication lag",
        "Time since the last event or heartbeat",
        "CDN purge requests by outcome",
        "Dead letters",
        "Rule errors",
    ] {
        assert!(titles.iter().any(|t| t.starts_with(wanted)), "a panel {wanted:?}: {titles:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_metrics_exist_on_a_live_metrics_page() {
    let mut used = BTreeSet::new();
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/cdc-invalidator.json")).expect("dashboard is JSON");
    for expr in dashboard_exprs(&dashboard) {
        used.extend(metric_names(&expr));
    }
    let dashboard_count = used.len();
    used.extend(metric_names(&repo_file("deploy/prometheus/alerts.yml")));
    assert!(dashboard_count >= 20, "{used:?}");
    let (postgres, live): (BTreeSet<String>, BTreeSet<String>) =
        used.into_iter().partition(|n| n.starts_with(POSTGRES_PREFIX) || FRESHNESS.contains(&n.as_str()));
    assert!(postgres.len() >= 3, "the dashboard and alerts cover the PostgreSQL source: {postgres:?}");

    // A daemon with every kind of series: Redis and a webhook CDN that fails its first three
    // purges (errors, retries, purge outcomes; counted in requests, not time, so a slow start on
    // a loaded machine cannot miss the failures), inserts (invalidations, staleness, tags), a
    // key-only delete (a rule error) and a malformed message (dead letters).
    let redis = RedisServer::start();
    let webhook = WebhookDouble::start();
    webhook.state.lock().unwrap().fail_first = 3;
    let (_secret_dir, secret) = secret_file(SECRET);
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 2);
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let setup = Setup {
        bootstrap: &bootstrap,
        topics: &[TOPIC],
        group: "metrics",
        redis_url: &url,
        extra: "",
        // Lag figures every 500 ms instead of 5 s.
        librdkafka: &[("statistics.interval.ms", "500")],
    };
    let (config, port) = write_config(dir.path(), &setup);
    std::fs::write(dir.path().join("rules.yaml"), RULES).unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "sinks:\n",
        &format!(
            "sinks:\n  cdn:\n    - {{ kind: webhook, name: webhook, url: \"{}\", secret_file: \"{secret}\", retry: {{ initial: 20ms, max: 200ms }} }}\n",
            webhook.url()
        ),
        1,
    );
    // Applications told after the deletes (the broadcast and warm-up panels).
    let text = text.replacen(
        "    retry: { initial: 20ms, max: 250ms }\n",
        "    retry: { initial: 20ms, max: 250ms }\n    broadcast: {}\n    warm: {}\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::from_config(dir.path(), &config, port);
    for id in 1..=5 {
        kafka.produce(TOPIC, None, Some(&format!("{{\"id\":{id}}}")), Some(&product_insert(id, 5))).await;
    }
    let delete = std::fs::read_to_string(format!(
        "{}/tests/fixtures/debezium/pg-delete-key-only.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    kafka.produce(TOPIC, None, Some("{\"id\":43}"), Some(&delete)).await;
    kafka.produce(TOPIC, None, None, Some("{not json")).await;

    let page = || http_get(port, "/metrics").map(|(_, b)| b).unwrap_or_default();
    let all_there = wait_until(Duration::from_secs(30), || {
        let p = page();
        live.iter().all(|n| PROMETHEUS_OWN.contains(&n.as_str()) || exported(&p, n))
    })
    .await;
    let p = page();
    let missing: Vec<&String> =
        live.iter().filter(|n| !PROMETHEUS_OWN.contains(&n.as_str()) && !exported(&p, n)).collect();
    assert!(all_there && missing.is_empty(), "not on the live /metrics page: {missing:?}\n{p}");

    // The PostgreSQL source's metrics: registered by the daemon (same registry type).
    let registry = Metrics::new();
    let unknown: Vec<&String> =
        postgres.iter().filter(|n| !registry.is_registered(n.strip_suffix("_bucket").unwrap_or(n))).collect();
    assert!(unknown.is_empty(), "used by the dashboard or alerts but not defined by the daemon: {unknown:?}");
    daemon.stop().await.expect("clean stop");
}

#[test]
fn is_registered_tells_defined_metrics_from_made_up_ones() {
    let m = Metrics::new();
    // A labelled family without series yet, a plain gauge, a histogram.
    for name in
        ["cdc_invalidator_rule_errors_total", "cdc_invalidator_pending_events", "cdc_invalidator_staleness_seconds"]
    {
        assert!(m.is_registered(name), "{name}");
        assert!(m.is_registered(name), "{name}: probing twice changes nothing");
    }
    assert!(!m.is_registered("cdc_invalidator_made_up_total"));
    assert!(!m.is_registered("cdc_invalidator_made_up_total"), "the probe leaves no trace");
    assert!(!m.render().contains("made_up"));
}
