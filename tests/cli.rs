//! The commands as users type them: `explain` output and exit codes, `check`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::daemon::binary;

/// The contract's example rules file.
const CONTRACT_RULES: &str = include_str!("fixtures/rules/contract.yaml");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium").join(name)
}

fn explain(rules: &Path, event: &Path, topic: &str) -> Output {
    Command::new(binary())
        .args(["explain", "--rules"])
        .arg(rules)
        .arg("--event")
        .arg(event)
        .args(["--topic", topic])
        .output()
        .unwrap()
}

fn rules_file(dir: &tempfile::TempDir) -> PathBuf {
    let p = dir.path().join("rules.yaml");
    std::fs::write(&p, CONTRACT_RULES).unwrap();
    p
}

fn json(out: &Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn explain_schema_envelope_update_invalidates_both_categories() {
    let dir = tempfile::tempdir().unwrap();
    let out = explain(&rules_file(&dir), &fixture("pg-update-with-schema.json"), "shop.public.products");
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    // Field order and sorting as the contract shows them.
    assert!(text.starts_with(r#"{"table":"public.products","op":"update","redis_keys":["#), "{text}");
    let v = json(&out);
    assert_eq!(
        v["redis_keys"],
        serde_json::json!(["product:42", "product:42:page:de", "product:42:page:en-us", "product:42:page:fr"])
    );
    assert_eq!(v["redis_tags"], serde_json::json!(["category:5", "category:7"]));
    assert_eq!(v["surrogate_keys"], serde_json::json!(["category-5", "category-7", "product-42"]));
    assert_eq!(v["urls"], serde_json::json!(["https://shop.example.com/p/blue-widget"]));
    assert_eq!(v["matched_rules"], serde_json::json!(["product-pages"]));
    assert_eq!(v["errors"], serde_json::json!([]));
}

#[test]
fn explain_key_only_delete_lists_the_rule_error_and_what_rendered() {
    let dir = tempfile::tempdir().unwrap();
    let v = json(&explain(&rules_file(&dir), &fixture("pg-delete-key-only.json"), "shop.public.products"));
    assert_eq!(v["op"], "delete");
    assert!(v["redis_keys"].as_array().unwrap().contains(&serde_json::json!("product:43")));
    assert_eq!(v["redis_tags"], serde_json::json!([]));
    let errors = v["errors"].as_array().unwrap();
    assert!(errors.iter().any(|e| e.as_str().unwrap().contains("category_id")), "{errors:?}");
}

#[test]
fn explain_tombstone_heartbeat_and_truncate() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_file(&dir);
    let v = json(&explain(&rules, &fixture("tombstone.json"), "shop.public.products"));
    assert_eq!(v["op"], "none");
    assert_eq!(v["redis_keys"], serde_json::json!([]));
    let v = json(&explain(&rules, &fixture("heartbeat.json"), "__debezium-heartbeat.shop"));
    assert_eq!(v["op"], "none");
    let v = json(&explain(&rules, &fixture("pg-truncate.json"), "shop.public.products"));
    assert_eq!(v["op"], "truncate");
    assert_eq!(v["redis_tags"], serde_json::json!(["products:all"]));
    assert_eq!(v["redis_keys"], serde_json::json!([]));
}

#[test]
fn explain_reads_stdin_and_the_key_file() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_file(&dir);
    let mut child = Command::new(binary())
        .args(["explain", "--rules"])
        .arg(&rules)
        .args(["--event", "-", "--topic", "shop.public.products", "--key"])
        .arg(fixture("key-products-42.json"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&std::fs::read(fixture("unwrapped-update.json")).unwrap()).unwrap();
    let v = json(&child.wait_with_output().unwrap());
    assert_eq!(v["table"], "public.products");
    assert!(v["redis_keys"].as_array().unwrap().contains(&serde_json::json!("product:42")));
}

#[test]
fn explain_malformed_event_exits_1_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"op\": \"u\", \"after\": ").unwrap();
    let out = explain(&rules_file(&dir), &bad, "shop.public.products");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.json"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn explain_with_invalid_rules_exits_2_naming_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "version: 1\nrules:\n  - name: a\n    table: public.t\n    redis:\n      keys: [\"x:{id|shout}\"]\n",
    )
    .unwrap();
    let out = explain(&rules, &fixture("pg-insert.json"), "shop.public.products");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:6:", rules.display())), "{err}");
    assert!(err.contains("shout"), "{err}");
}

#[test]
fn check_prints_ok_for_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    rules_file(&dir);
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9092\"\n    topics: [\"dbz.public.products\"]\nsinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\n",
    )
    .unwrap();
    let out = Command::new(binary()).args(["check", "-c"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn check_reports_config_and_rules_problems_together() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), "version: 1\nrules:\n  - name: a\n    table: public.t\n").unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"127.0.0.1:9092\"\n    topics: [\"t\"]\nsinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\n",
    )
    .unwrap();
    let out = Command::new(binary()).args(["check", "-c"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rules.yaml:3:"), "a rule with nothing to invalidate is named by line: {err}");
}

#[test]
fn the_shipped_example_config_checks_ok() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config.kafka.yaml");
    let out = Command::new(binary())
        .args(["check", "-c"])
        .arg(&config)
        .env("REDIS_URL", "redis://redis:6379")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}
