//! `cdc-invalidator purge` as an operator types it: the real binary, a real Redis, the webhook
//! double as an HTTP cache in layer 1; its JSON summary and exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use redis::Commands;

use crate::support::cdn_doubles::secret_file;
use crate::support::cdn_doubles::webhook::{WebhookDouble, SECRET};
use crate::support::daemon::binary;
use crate::support::free_port;
use crate::support::redis::RedisServer;

/// A daemon config with `sinks` (YAML, indented under `sinks:`); the source is never contacted.
fn config(dir: &Path, sinks: &str) -> PathBuf {
    std::fs::write(dir.join("rules.yaml"), crate::support::events::RULES).unwrap();
    let text = format!(
        "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:1\"\n    topics: [\"t\"]\nsinks:\n{sinks}log:\n  level: warn\n"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn redis_sink(url: &str) -> String {
    format!("  redis:\n    url: \"{url}\"\n    retry: {{ initial: 20ms, max: 200ms }}\n    connect_timeout: 200ms\n")
}

fn purge(config: &Path, args: &[&str]) -> Output {
    Command::new(binary()).arg("purge").arg("-c").arg(config).args(args).output().unwrap()
}

fn summary(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("one JSON object on stdout ({e}); stderr: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn keys_and_tags_are_purged_and_confirmed_exit_0() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    for k in ["product:1", "product:2", "listing:1"] {
        let _: () = con.set(k, "cached").unwrap();
    }
    let _: () = con.sadd("tag:category:5", "listing:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &redis_sink(&redis.url()));
    let out = purge(&cfg, &["--key", "product:2", "--key", "product:1", "--tag", "category:5"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v = summary(&out);
    assert_eq!(v["outcome"], "confirmed");
    assert_eq!(v["requested"]["redis_keys"], serde_json::json!(["product:1", "product:2"]));
    assert_eq!(v["requested"]["redis_tags"], serde_json::json!(["category:5"]));
    assert_eq!(
        v["sinks"],
        serde_json::json!([{"sink":"redis","layer":0,"status":"confirmed","confirmed":{"key":2,"tag":1},"rejected":[]}])
    );
    for k in ["product:1", "product:2", "listing:1", "tag:category:5"] {
        assert!(!con.exists::<_, bool>(k).unwrap(), "{k} purged");
    }
}

#[test]
fn a_rejected_item_is_named_with_its_reason_exit_1() {
    let redis = RedisServer::start();
    let mut con = redis.connection();
    let _: () = con.set("tag:category:5", "a string, not a set").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &redis_sink(&redis.url()));
    let out = purge(&cfg, &["--key", "product:1", "--tag", "category:5"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v = summary(&out);
    assert_eq!(v["outcome"], "incomplete");
    let sink = &v["sinks"][0];
    assert_eq!(sink["status"], "rejected");
    assert_eq!(sink["confirmed"], serde_json::json!({"key": 1}));
    assert_eq!(sink["rejected"][0]["kind"], "tag");
    assert_eq!(sink["rejected"][0]["item"], "category:5");
    assert!(sink["rejected"][0]["reason"].as_str().unwrap().contains("not a set"), "{sink}");
}

#[test]
fn a_kind_no_sink_serves_bad_config_and_no_items_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &redis_sink(&format!("redis://127.0.0.1:{}", free_port())));
    let out = purge(&cfg, &["--key", "product:1", "--url", "https://shop.example.com/p/1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no configured sink serves url items (--url)") && err.contains("sinks.cdn"), "{err}");
    assert!(out.stdout.is_empty(), "nothing was purged, nothing reported");

    let out = purge(&cfg, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to purge: give at least one of --key, --tag"));

    let bad = config(dir.path(), "  redis:\n    url: \"redis://127.0.0.1:1\"\n    broadcast: { channel: \"\" }\n");
    let out = purge(&bad, &["--key", "k"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.yaml:") && err.contains("broadcast.channel must not be empty"), "{err}");
}

/// Redis down: the purge gives up at `--timeout` (exit 1, `timed_out`), and the HTTP cache of
/// the next layer is not purged (it would refill from a cache still holding the old value).
#[test]
fn a_sink_that_is_down_times_out_and_later_layers_are_skipped_exit_1() {
    let hook = WebhookDouble::start();
    let (_secret_dir, secret) = secret_file(SECRET);
    let dir = tempfile::tempdir().unwrap();
    let sinks = format!(
        "{}  cdn:\n    - kind: webhook\n      name: hook\n      url: \"{}\"\n      secret_file: \"{secret}\"\n",
        redis_sink(&format!("redis://127.0.0.1:{}", free_port())),
        hook.url()
    );
    let cfg = config(dir.path(), &sinks);
    let started = Instant::now();
    let out = purge(&cfg, &["--key", "product:1", "--surrogate-key", "product-1", "--timeout", "1s"]);
    assert!(started.elapsed() < Duration::from_secs(10), "bounded by --timeout");
    assert_eq!(out.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v = summary(&out);
    assert_eq!(v["sinks"][0]["sink"], "redis");
    assert_eq!(v["sinks"][0]["status"], "timed_out");
    assert_eq!(v["sinks"][1]["sink"], "hook");
    assert_eq!(v["sinks"][1]["layer"], 1);
    assert_eq!(v["sinks"][1]["status"], "skipped");
    assert!(hook.state.lock().unwrap().keys.is_empty(), "layer 1 untouched");
}

/// Both layers up: Redis first, then the HTTP cache; both confirmed.
#[test]
fn every_layer_in_order_exit_0() {
    let redis = RedisServer::start();
    let hook = WebhookDouble::start();
    let (_secret_dir, secret) = secret_file(SECRET);
    let dir = tempfile::tempdir().unwrap();
    let sinks = format!(
        "{}  cdn:\n    - kind: webhook\n      name: hook\n      url: \"{}\"\n      secret_file: \"{secret}\"\n",
        redis_sink(&redis.url()),
        hook.url()
    );
    let cfg = config(dir.path(), &sinks);
    let out = purge(&cfg, &["--key", "product:1", "--surrogate-key", "product-1"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v = summary(&out);
    let statuses: Vec<(&str, &str)> = v["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["sink"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(statuses, [("redis", "confirmed"), ("hook", "confirmed")]);
    assert_eq!(hook.state.lock().unwrap().keys, vec!["product-1"]);
}
