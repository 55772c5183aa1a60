//! Hot reload of the rules file: a changed file applies to later events, a broken one keeps the
//! running rules, and SIGHUP reloads the real binary.

use std::path::Path;
use std::time::Duration;

use redis::Commands;

use cdc_invalidator::rules::Rules;

use crate::support::daemon::{http_get, wait_until, write_config, Daemon, DaemonProcess, Setup};
use crate::support::events::product_insert;
use crate::support::kafka::MockKafka;
use crate::support::redis::RedisServer;

const TOPIC: &str = "shop.public.products";

/// The same table, now invalidating `item:{id}` instead of `product:{id}`.
const NEW_RULES: &str = r#"version: 1
rules:
  - name: item-pages
    table: public.products
    redis:
      keys: ["item:{id}"]
"#;

/// Two problems: an unbalanced brace and an unknown key.
const BROKEN_RULES: &str = r#"version: 1
rules:
  - name: item-pages
    table: public.products
    redis:
      keys: ["item:{id"]
    colour: red
"#;

fn hash_of(text: &str) -> String {
    Rules::parse(text, Path::new("rules.yaml")).expect("valid rules").hash()
}

fn cache(c: &mut redis::Connection, ids: impl IntoIterator<Item = i64>) {
    for id in ids {
        let _: () = c.set(format!("product:{id}"), "cached").unwrap();
        let _: () = c.set(format!("item:{id}"), "cached").unwrap();
    }
}

fn exists(c: &mut redis::Connection, key: &str) -> bool {
    c.exists(key).unwrap_or(true)
}

/// Replaces the file the way editors and ConfigMaps do: write aside, rename over.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_rules_file_applies_to_later_events_and_a_broken_one_keeps_the_old_rules() {
    let redis = RedisServer::start();
    let mut c = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    cache(&mut c, 1..=3);
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let daemon = Daemon::start(
        dir.path(),
        &Setup {
            bootstrap: &bootstrap,
            topics: &[TOPIC],
            group: "reload",
            redis_url: &url,
            extra: "",
            librdkafka: &[],
        },
    );
    let rules_path = dir.path().join("rules.yaml");
    let old_hash = hash_of(&std::fs::read_to_string(&rules_path).unwrap());
    // The daemon task sets these once it runs: wait for it, do not race it.
    let loaded = wait_until(Duration::from_secs(10), || {
        daemon.metrics.value("cdc_invalidator_rules_info", &[("hash", &old_hash)]) == 1.0
    })
    .await;
    assert!(loaded, "the running rules' hash is exported");
    assert!(daemon.metrics.value("cdc_invalidator_rules_loaded_timestamp_seconds", &[]) > 1.6e9);

    kafka.produce(TOPIC, None, Some("{\"id\":1}"), Some(&product_insert(1, 5))).await;
    assert!(wait_until(Duration::from_secs(20), || !exists(&mut c, "product:1")).await);

    // A broken file: rejected, flagged, and the old rules go on.
    replace_file(&rules_path, BROKEN_RULES);
    let flagged =
        wait_until(Duration::from_secs(10), || daemon.metrics.value("cdc_invalidator_rules_reload_failed", &[]) == 1.0)
            .await;
    assert!(flagged, "a broken rules file sets cdc_invalidator_rules_reload_failed");
    assert_eq!(daemon.metrics.value("cdc_invalidator_rules_reloads_total", &[("outcome", "error")]), 1.0);
    kafka.produce(TOPIC, None, Some("{\"id\":2}"), Some(&product_insert(2, 5))).await;
    assert!(wait_until(Duration::from_secs(20), || !exists(&mut c, "product:2")).await, "old rules still run");
    assert!(exists(&mut c, "item:2"), "the broken file's rules never ran");
    assert_eq!(daemon.metrics.value("cdc_invalidator_rules_info", &[("hash", &old_hash)]), 1.0);
    // Several polls later it was still counted once: a broken text is reported once per edit.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(daemon.metrics.value("cdc_invalidator_rules_reloads_total", &[("outcome", "error")]), 1.0);

    // The fix: swapped in, and later events use it.
    replace_file(&rules_path, NEW_RULES);
    let new_hash = hash_of(NEW_RULES);
    let swapped = wait_until(Duration::from_secs(10), || {
        daemon.metrics.value("cdc_invalidator_rules_info", &[("hash", &new_hash)]) == 1.0
    })
    .await;
    assert!(swapped, "the fixed file is swapped in");
    assert_eq!(daemon.metrics.value("cdc_invalidator_rules_info", &[("hash", &old_hash)]), 0.0, "one hash series");
    assert_eq!(daemon.metrics.value("cdc_invalidator_rules_reload_failed", &[]), 0.0);
    kafka.produce(TOPIC, None, Some("{\"id\":3}"), Some(&product_insert(3, 5))).await;
    assert!(wait_until(Duration::from_secs(20), || !exists(&mut c, "item:3")).await, "new rules apply");
    assert!(exists(&mut c, "product:3"), "the old rules no longer run");
    daemon.stop().await.expect("clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_a_broken_file_keeps_it_running() {
    let redis = RedisServer::start();
    let mut c = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    cache(&mut c, 1..=2);
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 1);
    let bootstrap = kafka.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let (config, port) = write_config(
        dir.path(),
        &Setup { bootstrap: &bootstrap, topics: &[TOPIC], group: "hup", redis_url: &url, extra: "", librdkafka: &[] },
    );
    let mut daemon = DaemonProcess::start(&config, dir.path());
    assert!(
        wait_until(Duration::from_secs(30), || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)).await,
        "ready; log:\n{}",
        daemon.log_text()
    );
    let rules_path = dir.path().join("rules.yaml");
    let metrics = || http_get(port, "/metrics").map(|(_, body)| body).unwrap_or_default();

    // A broken file and SIGHUP: every problem logged with its line and column, still running.
    std::fs::write(&rules_path, BROKEN_RULES).unwrap();
    daemon.signal("HUP");
    // All of them, in any order: the file poll (every 2 s) may see the new file before the
    // signal arrives, and then the SIGHUP's own reload is logged a moment after the metric is
    // set; the problems are logged a moment after the metric too (a busy machine showed the
    // gap).
    let (line6, line7) = (format!("{}:6:", rules_path.display()), format!("{}:7:", rules_path.display()));
    let rejected = wait_until(Duration::from_secs(10), || {
        let log = daemon.log_text();
        metrics().contains("cdc_invalidator_rules_reload_failed 1")
            && log.contains("SIGHUP: reloading the rules file")
            && log.contains(&line6)
            && log.contains(&line7)
    })
    .await;
    let log = daemon.log_text();
    assert!(rejected, "rejected, the brace problem named at line 6, the unknown key at line 7; log:\n{log}");
    assert!(daemon.child.try_wait().unwrap().is_none(), "SIGHUP does not stop the daemon");

    // A valid file and SIGHUP: swapped, and the next event uses the new rules.
    std::fs::write(&rules_path, NEW_RULES).unwrap();
    daemon.signal("HUP");
    let new_hash = hash_of(NEW_RULES);
    let swapped = wait_until(Duration::from_secs(10), || {
        metrics().contains(&format!("cdc_invalidator_rules_info{{hash=\"{new_hash}\"}} 1"))
    })
    .await;
    assert!(swapped, "log:\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("rules reloaded"), "{}", daemon.log_text());
    kafka.produce(TOPIC, None, Some("{\"id\":1}"), Some(&product_insert(1, 5))).await;
    assert!(wait_until(Duration::from_secs(20), || !exists(&mut c, "item:1")).await, "{}", daemon.log_text());
    assert!(exists(&mut c, "product:1"));

    daemon.signal("TERM");
    let (code, log) =
        tokio::task::spawn_blocking(move || (daemon.wait(Duration::from_secs(30)), daemon.log_text())).await.unwrap();
    assert_eq!(code, Some(0), "{log}");
}
