//! `redis.patterns`, `redis.generations`, `redis.dependents` and `allow_full_scan` (issue 15):
//! what they render and every check rejection with its place.

use super::*;
use serde_json::json;

fn rules(text: &str) -> Rules {
    match Rules::parse(text, Path::new("rules.yaml")) {
        Ok(rules) => rules,
        Err(e) => panic!("rules rejected:\n{e}"),
    }
}

/// Every problem as `rules.yaml:line:col: message`.
fn problems(text: &str) -> String {
    match Rules::parse(text, Path::new("rules.yaml")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn insert(after: serde_json::Value) -> ChangeEvent {
    let serde_json::Value::Object(row) = after else { panic!("not an object") };
    ChangeEvent {
        table: "public.products".into(),
        op: Op::Insert,
        before: None,
        after: Some(row.into()),
        committed_at: None,
        lsn: None,
    }
}

const MORE: &str = r#"version: 1
rules:
  - name: products
    table: public.products
    redis:
      keys: ["product:{id}"]
      tags: ["category:{category_id}"]
      patterns: ["product:{id}:*", "search:{category_id}:*"]
      generations: ["gen:product:{id}"]
      dependents: true
  - name: plain
    table: public.products
    redis:
      keys: ["plain:{id}"]
"#;

#[test]
fn new_kinds_render_sorted_and_dependents_name_their_roots() {
    let eval = rules(MORE).evaluate(&insert(json!({"id": 42, "category_id": 5})));
    assert!(eval.errors.is_empty(), "{:?}", eval.errors);
    let set = &eval.invalidations;
    assert_eq!(set.items(ItemKind::RedisPattern), ["product:42:*", "search:5:*"]);
    assert_eq!(set.items(ItemKind::RedisGeneration), ["gen:product:42"]);
    // Only the rule that said `dependents: true`; its keys, tags and patterns, not its
    // generations, and not the other rule's key.
    assert_eq!(
        set.items(ItemKind::RedisDependents),
        ["key:product:42", "pattern:product:42:*", "pattern:search:5:*", "tag:category:5"]
    );
    let explain = serde_json::to_value(set).unwrap();
    assert_eq!(explain["redis_patterns"], json!(["product:42:*", "search:5:*"]));
    assert_eq!(explain["redis_generations"], json!(["gen:product:42"]));
}

#[test]
fn glob_characters_in_values_are_escaped_so_a_pattern_cannot_widen() {
    let eval = rules(MORE).evaluate(&insert(json!({"id": "4*", "category_id": "[a-z]?"})));
    assert_eq!(eval.invalidations.items(ItemKind::RedisPattern), ["product:4\\*:*", "search:\\[a-z\\]\\?:*"]);
    // Keys and tags are names, not globs: as rendered.
    assert_eq!(eval.invalidations.items(ItemKind::RedisKey), ["plain:4*", "product:4*"]);
}

#[test]
fn a_pattern_rendering_to_every_key_is_a_rule_error_unless_allowed() {
    let text = r#"version: 1
rules:
  - name: prefixed
    table: public.products
    redis:
      patterns: ["{prefix}*", "{prefix}:x:*"]
"#;
    let eval = rules(text).evaluate(&insert(json!({"prefix": ""})));
    assert_eq!(eval.invalidations.items(ItemKind::RedisPattern), [":x:*"]);
    assert_eq!(eval.errors.len(), 1);
    assert!(
        eval.errors[0].message.contains("\"{prefix}*\" rendered a pattern matching every key"),
        "{:?}",
        eval.errors
    );
    let allowed = text.replace("      patterns:", "      allow_full_scan: true\n      patterns:");
    let eval = rules(&allowed).evaluate(&insert(json!({"prefix": ""})));
    assert!(eval.errors.is_empty());
    assert_eq!(eval.invalidations.items(ItemKind::RedisPattern), ["*", ":x:*"]);
}

#[test]
fn a_literal_full_scan_is_a_check_error_with_its_place_and_allowing_it_is_a_notice() {
    let text = r#"version: 1
rules:
  - name: everything
    table: public.products
    redis:
      patterns: ["*"]
    on_truncate:
      redis: { patterns: ["**"] }
"#;
    let text_problems = problems(text);
    assert!(
        text_problems
            .contains("rules.yaml:6:18: rule \"everything\": `redis.patterns` template \"*\" matches every key"),
        "{text_problems}"
    );
    assert!(
        text_problems.contains("rules.yaml:8:27: rule \"everything\": `on_truncate.redis.patterns` template \"**\""),
        "{text_problems}"
    );
    let allowed = text
        .replace("      patterns: [\"*\"]", "      patterns: [\"*\"]\n      allow_full_scan: true")
        .replace("{ patterns: [\"**\"] }", "{ patterns: [\"**\"], allow_full_scan: true }");
    let loaded = rules(&allowed);
    let notices: Vec<String> = loaded.notices().iter().map(|n| n.to_string()).collect();
    assert_eq!(notices.len(), 2, "{notices:?}");
    assert!(
        notices[0].starts_with("rules.yaml:7:24: rule \"everything\": `redis.allow_full_scan: true`"),
        "{notices:?}"
    );
    assert!(notices[1].starts_with("rules.yaml:9:"), "{notices:?}");
}

#[test]
fn truncate_patterns_take_no_columns_and_flags_must_be_booleans() {
    let text = r#"version: 1
rules:
  - name: bad
    table: public.products
    redis:
      keys: ["p:{id}"]
      dependents: "yes"
      generations: "gen:{id}"
    on_truncate:
      redis: { patterns: ["product:{id}:*"], allow_full_scan: 1 }
"#;
    let text = problems(text);
    assert!(
        text.contains("rules.yaml:7:19: rule \"bad\": `redis.dependents` must be true or false, not a string"),
        "{text}"
    );
    assert!(text.contains("rules.yaml:8:20: rule \"bad\": `redis.generations` must be a list of templates"), "{text}");
    assert!(text.contains("rules.yaml:10:27: rule \"bad\": `on_truncate.redis.patterns` template \"product:{id}:*\" uses the column \"id\""), "{text}");
    assert!(text.contains("`on_truncate.redis.allow_full_scan` must be true or false"), "{text}");
    let ok = rules(
        "version: 1\nrules:\n  - name: t\n    table: public.products\n    on_truncate:\n      redis: { patterns: [\"product:*\"] }\n",
    );
    let truncate = ChangeEvent {
        table: "public.products".into(),
        op: Op::Truncate,
        before: None,
        after: None,
        committed_at: None,
        lsn: None,
    };
    assert_eq!(ok.evaluate(&truncate).invalidations.items(ItemKind::RedisPattern), ["product:*"]);
}

#[test]
fn an_unknown_redis_field_lists_the_new_ones() {
    let text = problems("version: 1\nrules:\n  - name: t\n    table: a.b\n    redis:\n      pattern: [\"x:*\"]\n");
    assert!(text.contains("rules.yaml:6:7: rule \"t\": `redis.pattern` is not a known field (expected `keys`, `tags`, `patterns`, `generations`, `dependents` or `allow_full_scan`)"), "{text}");
}
