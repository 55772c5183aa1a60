//! The rules engine against the contract's example file and hand-built events mirroring the
//! Debezium fixtures, and every check rejection with the exact place it is reported.

use super::*;
use serde_json::{json, Value as Json};

/// The example from the contract (`interface.md`, "The rules file (YAML)"), verbatim.
const CONTRACT_EXAMPLE: &str = r#"version: 1
rules:
  - name: product-pages                 # unique; shows up in metrics and explain output
    table: public.products              # schema.table, or a glob such as public.order_*
    ops: [insert, update, delete]       # default: insert, update, delete (snapshot reads are opt-in)
    when_changed: [price, name, category_id]  # updates only: skip unless one of these differs between before and after
    vars:
      locale: [en-us, fr, de]           # a template using {locale} expands once per value
    redis:
      keys: ["product:{id}", "product:{id}:page:{locale}"]
      tags: ["category:{category_id}"]  # every key in the Redis set "<tag_prefix><tag>" is unlinked, then the set itself
    cdn:
      surrogate_keys: ["product-{id}", "category-{category_id}"]
      urls: ["https://shop.example.com/p/{slug|urlencode}"]
    on_truncate:                        # optional, applies to truncates whatever `ops` says; no columns here
      redis: { tags: ["products:all"] }
"#;

fn rules(text: &str) -> Rules {
    match Rules::parse(text, Path::new("rules.yaml")) {
        Ok(rules) => rules,
        Err(e) => panic!("rules rejected:\n{e}"),
    }
}

fn row(value: Json) -> Row {
    match value {
        Json::Object(map) => map.into(),
        other => panic!("not an object: {other}"),
    }
}

fn event(table: &str, op: Op, before: Option<Json>, after: Option<Json>) -> ChangeEvent {
    ChangeEvent {
        table: table.into(),
        op,
        before: before.map(row),
        after: after.map(row),
        committed_at: None,
        lsn: None,
    }
}

/// The products row of the fixtures, with overrides.
fn product(id: i64, category: i64, slug: &str) -> Json {
    json!({"id": id, "name": "Blue Widget", "price": "100.00", "category_id": category, "slug": slug})
}

fn matched(eval: &Evaluation) -> Vec<&str> {
    eval.matched_rules.iter().map(|r| &**r).collect()
}

fn messages(eval: &Evaluation) -> Vec<&str> {
    eval.errors.iter().map(|e| e.message.as_str()).collect()
}

/// Every problem as `line:col` and message.
fn problems(text: &str) -> Vec<(String, String)> {
    match Rules::parse(text, Path::new("rules.yaml")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e
            .problems()
            .iter()
            .map(|p| {
                assert_eq!(p.file, Path::new("rules.yaml"));
                let at = p.location.map(|l| l.to_string()).unwrap_or_default();
                (at, p.message.clone())
            })
            .collect(),
    }
}

/// The one problem of `text`: its `line:col` and message.
fn problem(text: &str) -> (String, String) {
    let mut all = problems(text);
    assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
    all.remove(0)
}

fn assert_problem(text: &str, at: &str, fragments: &[&str]) {
    let (location, message) = problem(text);
    assert_eq!(location, at, "{message}");
    for fragment in fragments {
        assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
    }
}

// ---- evaluation -------------------------------------------------------------------------

#[test]
fn the_contract_example_loads() {
    let r = rules(CONTRACT_EXAMPLE);
    assert_eq!(r.len(), 1);
    assert!(!r.is_empty());
    assert_eq!(r.names().collect::<Vec<_>>(), ["product-pages"]);
    assert_eq!(r.hash().len(), 16);
    assert_eq!(r.hash(), rules(CONTRACT_EXAMPLE).hash());
    assert_ne!(r.hash(), rules(&CONTRACT_EXAMPLE.replace("en-us", "en-gb")).hash());
}

#[test]
fn update_moving_category_invalidates_both_categories() {
    let r = rules(CONTRACT_EXAMPLE);
    let mut after = product(42, 7, "blue-widget");
    after["price"] = json!("80.00");
    let eval = r.evaluate(&event("public.products", Op::Update, Some(product(42, 5, "blue-widget")), Some(after)));
    let expected = Invalidations::of(
        ItemKind::RedisKey,
        vec![
            "product:42".into(),
            "product:42:page:de".into(),
            "product:42:page:en-us".into(),
            "product:42:page:fr".into(),
        ],
    )
    .with(ItemKind::RedisTag, vec!["category:5".into(), "category:7".into()])
    .with(ItemKind::SurrogateKey, vec!["category-5".into(), "category-7".into(), "product-42".into()])
    .with(ItemKind::Url, vec!["https://shop.example.com/p/blue-widget".into()]);
    assert_eq!(eval.invalidations, expected);
    assert_eq!(matched(&eval), ["product-pages"]);
    assert!(eval.errors.is_empty(), "{:?}", eval.errors);
}

#[test]
fn vars_expand_once_per_value_and_as_a_product() {
    let r = rules(
        r#"version: 1
rules:
  - name: pages
    table: public.products
    vars:
      locale: [en-us, fr]
      page: [1, 2]
      flag: [true]
    redis:
      keys: ["p:{id}:{locale}:{page}:{flag}", "static:{locale}"]
"#,
    );
    let eval = r.evaluate(&event("public.products", Op::Insert, None, Some(product(1, 1, "s"))));
    assert_eq!(
        eval.invalidations.items(ItemKind::RedisKey),
        ["p:1:en-us:1:true", "p:1:en-us:2:true", "p:1:fr:1:true", "p:1:fr:2:true", "static:en-us", "static:fr"]
    );
}

#[test]
fn urlencode_percent_encodes_spaces_and_non_ascii() {
    let r = rules(CONTRACT_EXAMPLE);
    let eval = r.evaluate(&event("public.products", Op::Insert, None, Some(product(43, 7, "Crème brûlée/2 pack"))));
    assert_eq!(
        eval.invalidations.items(ItemKind::Url),
        ["https://shop.example.com/p/Cr%C3%A8me%20br%C3%BBl%C3%A9e%2F2%20pack"]
    );

    let chained = rules(
        r#"version: 1
rules:
  - name: urls
    table: public.products
    cdn: { urls: ["/p/{slug|lower|urlencode}", "/P/{ slug | upper }"] }
"#,
    );
    let eval = chained.evaluate(&event("public.products", Op::Insert, None, Some(product(43, 7, "Ünïcode Slug"))));
    assert_eq!(eval.invalidations.items(ItemKind::Url), ["/P/ÜNÏCODE SLUG", "/p/%C3%BCn%C3%AFcode%20slug"]);
}

#[test]
fn when_changed_skips_an_update_that_changed_none_of_its_columns() {
    let r = rules(CONTRACT_EXAMPLE);
    let mut before = product(42, 5, "blue-widget");
    before["stock"] = json!(10);
    let mut after = product(42, 5, "blue-widget");
    after["stock"] = json!(9);
    let eval = r.evaluate(&event("public.products", Op::Update, Some(before), Some(after)));
    assert_eq!(eval, Evaluation::default());
}

#[test]
fn when_changed_treats_a_missing_before_image_as_changed() {
    // pg-update-replica-identity-default.json: `before: null`.
    let r = rules(CONTRACT_EXAMPLE);
    let eval = r.evaluate(&event("public.products", Op::Update, None, Some(product(42, 5, "red-widget"))));
    assert_eq!(matched(&eval), ["product-pages"]);
    assert_eq!(eval.invalidations.items(ItemKind::RedisTag), ["category:5"]);
    assert_eq!(eval.invalidations.items(ItemKind::Url), ["https://shop.example.com/p/red-widget"]);
    assert!(eval.errors.is_empty(), "{:?}", eval.errors);
}

#[test]
fn when_changed_treats_an_absent_column_as_changed() {
    // An unchanged TOASTed column is absent from the after image: unknown, so changed.
    let r = rules(CONTRACT_EXAMPLE);
    let mut after = product(42, 5, "blue-widget");
    after.as_object_mut().map(|o| o.remove("name"));
    let eval = r.evaluate(&event("public.products", Op::Update, Some(product(42, 5, "blue-widget")), Some(after)));
    assert_eq!(matched(&eval), ["product-pages"]);
    assert_eq!(eval.invalidations.items(ItemKind::RedisTag), ["category:5"]);
}

#[test]
fn delete_with_a_key_only_before_image_renders_keys_and_reports_the_rest() {
    // pg-delete-key-only.json: only `id` is known.
    let r = rules(CONTRACT_EXAMPLE);
    let before = json!({"id": 43, "name": null, "price": null, "category_id": null, "slug": null});
    let eval = r.evaluate(&event("public.products", Op::Delete, Some(before), None));
    assert_eq!(
        eval.invalidations.items(ItemKind::RedisKey),
        ["product:43", "product:43:page:de", "product:43:page:en-us", "product:43:page:fr"]
    );
    assert_eq!(eval.invalidations.items(ItemKind::SurrogateKey), ["product-43"]);
    assert!(eval.invalidations.items(ItemKind::RedisTag).is_empty());
    assert!(eval.invalidations.items(ItemKind::Url).is_empty());
    assert_eq!(matched(&eval), ["product-pages"]);
    assert!(eval.errors.iter().all(|e| &*e.rule == "product-pages"));
    assert_eq!(
        messages(&eval),
        [
            r#"rule "product-pages": template "category:{category_id}" could not be rendered: column "category_id" is null in the before image"#,
            r#"rule "product-pages": template "category-{category_id}" could not be rendered: column "category_id" is null in the before image"#,
            r#"rule "product-pages": template "https://shop.example.com/p/{slug|urlencode}" could not be rendered: column "slug" is null in the before image"#,
        ]
    );
}

#[test]
fn a_template_fails_only_when_no_image_can_render_it() {
    let r = rules(
        r#"version: 1
rules:
  - name: r
    table: public.t
    redis: { keys: ["k:{a}:{b}"], tags: ["t:{a}"] }
"#,
    );
    // The before image lacks `b`, the after image has it: rendered from the after image.
    let eval = r.evaluate(&event("public.t", Op::Update, Some(json!({"a": 1})), Some(json!({"a": 2, "b": "x"}))));
    assert_eq!(eval.invalidations.items(ItemKind::RedisKey), ["k:2:x"]);
    assert_eq!(eval.invalidations.items(ItemKind::RedisTag), ["t:1", "t:2"]);
    assert!(eval.errors.is_empty());
    // Neither image can: the error names each image's failure.
    let eval = r.evaluate(&event("public.t", Op::Update, Some(json!({"a": 1})), Some(json!({"a": 2, "b": [1]}))));
    assert_eq!(
        messages(&eval),
        [
            r#"rule "r": template "k:{a}:{b}" could not be rendered: column "b" is absent from the before image and is a list (which cannot be rendered) in the after image"#
        ]
    );
    assert_eq!(eval.invalidations.items(ItemKind::RedisTag), ["t:1", "t:2"]);
    // A delete without any image.
    let eval = r.evaluate(&event("public.t", Op::Delete, None, None));
    assert_eq!(
        messages(&eval),
        [
            r#"rule "r": template "k:{a}:{b}" could not be rendered: the delete event carries no row image"#,
            r#"rule "r": template "t:{a}" could not be rendered: the delete event carries no row image"#,
        ]
    );
    assert_eq!(matched(&eval), ["r"]);
}

#[test]
fn empty_and_oversize_items_are_errors_never_invalidations() {
    let r = rules(
        r#"version: 1
rules:
  - name: r
    table: public.t
    redis: { keys: ["{slug}", "k:{id}"], tags: ["t:{slug}"] }
"#,
    );
    let eval = r.evaluate(&event("public.t", Op::Insert, None, Some(json!({"id": 1, "slug": ""}))));
    assert_eq!(eval.invalidations.items(ItemKind::RedisKey), ["k:1"]);
    assert_eq!(eval.invalidations.items(ItemKind::RedisTag), ["t:"]);
    assert_eq!(
        messages(&eval),
        [r#"rule "r": template "{slug}" rendered an empty string, which is never invalidated"#]
    );

    let big = "x".repeat(template::MAX_ITEM_BYTES);
    let eval = r.evaluate(&event("public.t", Op::Insert, None, Some(json!({"id": 1, "slug": big}))));
    assert_eq!(eval.invalidations.items(ItemKind::RedisKey), ["k:1", big.as_str()]);
    assert!(eval.invalidations.items(ItemKind::RedisTag).is_empty());
    assert_eq!(
        messages(&eval),
        [
            r#"rule "r": template "t:{slug}" rendered an item of 8194 bytes, over the limit of 8192 bytes, which is never invalidated"#
        ]
    );
}

#[test]
fn truncate_applies_on_truncate_templates_only() {
    let r = rules(&format!(
        r#"{CONTRACT_EXAMPLE}  - name: no-truncate-handling
    table: public.products
    redis: {{ keys: ["list"] }}
"#
    ));
    let eval = r.evaluate(&event("public.products", Op::Truncate, None, None));
    assert_eq!(eval.invalidations, Invalidations::of(ItemKind::RedisTag, vec!["products:all".into()]));
    assert_eq!(matched(&eval), ["product-pages"]);
    assert!(eval.errors.is_empty());
    // ...and on_truncate templates are not rendered for row changes.
    let eval = r.evaluate(&event("public.products", Op::Insert, None, Some(product(1, 1, "a"))));
    assert!(!eval.invalidations.items(ItemKind::RedisTag).contains(&"products:all".to_string()));
    assert_eq!(matched(&eval), ["no-truncate-handling", "product-pages"]);
}

#[test]
fn on_truncate_templates_may_use_vars() {
    let r = rules(
        r#"version: 1
rules:
  - name: t
    table: public.products
    ops: [delete]
    vars: { locale: [fr, de] }
    on_truncate:
      cdn: { surrogate_keys: ["all-{locale|upper}"] }
"#,
    );
    let eval = r.evaluate(&event("public.products", Op::Truncate, None, None));
    assert_eq!(eval.invalidations.items(ItemKind::SurrogateKey), ["all-DE", "all-FR"]);
    // A rule with only on_truncate templates does not apply to row changes.
    let eval = r.evaluate(&event("public.products", Op::Delete, Some(product(1, 1, "a")), None));
    assert_eq!(eval, Evaluation::default());
}

#[test]
fn snapshot_reads_apply_only_when_opted_in() {
    let snapshot = event("public.products", Op::Snapshot, None, Some(product(1, 1, "starter")));
    assert_eq!(rules(CONTRACT_EXAMPLE).evaluate(&snapshot), Evaluation::default());
    let opted_in =
        rules(&CONTRACT_EXAMPLE.replace("ops: [insert, update, delete]", "ops: [insert, update, delete, snapshot]"));
    let eval = opted_in.evaluate(&snapshot);
    assert_eq!(matched(&eval), ["product-pages"]);
    assert_eq!(eval.invalidations.items(ItemKind::RedisTag), ["category:1"]);
}

#[test]
fn ops_filter_row_events() {
    let r = rules(
        r#"version: 1
rules:
  - name: deletes-only
    table: public.t
    ops: [delete]
    redis: { keys: ["k:{id}"] }
"#,
    );
    assert_eq!(r.evaluate(&event("public.t", Op::Insert, None, Some(json!({"id": 1})))), Evaluation::default());
    let eval = r.evaluate(&event("public.t", Op::Delete, Some(json!({"id": 1})), None));
    assert_eq!(eval.invalidations.items(ItemKind::RedisKey), ["k:1"]);
}

#[test]
fn glob_tables_match_and_rules_apply_in_file_order() {
    let r = rules(
        r#"version: 1
rules:
  - name: z-orders
    table: public.order_*
    redis: { keys: ["order:{id}:{missing}"] }
  - name: exact
    table: public.order_items
    redis: { keys: ["item:{id}:{missing}"] }
  - name: a-any-schema
    table: "*.order_item?"
    redis: { tags: ["items"] }
"#,
    );
    let eval = r.evaluate(&event("public.order_items", Op::Insert, None, Some(json!({"id": 3}))));
    assert_eq!(matched(&eval), ["a-any-schema", "exact", "z-orders"]);
    assert_eq!(eval.invalidations.items(ItemKind::RedisTag), ["items"]);
    // Errors come in rule order (file order), whatever the index path.
    let rules_in_error: Vec<&str> = eval.errors.iter().map(|e| &*e.rule).collect();
    assert_eq!(rules_in_error, ["z-orders", "exact"]);

    let eval = r.evaluate(&event("public.orders", Op::Insert, None, Some(json!({"id": 3}))));
    assert_eq!(eval, Evaluation::default());
    let eval = r.evaluate(&event("archive.order_item2", Op::Insert, None, Some(json!({"id": 3}))));
    assert_eq!(matched(&eval), ["a-any-schema"]);
}

#[test]
fn numbers_booleans_and_strings_render_as_json_spells_them() {
    let r = rules(
        r#"version: 1
rules:
  - name: r
    table: inventory.customers
    redis: { keys: ["{id}|{active}|{ratio}|{email|upper}"] }
"#,
    );
    let after = json!({"id": 1004, "active": false, "ratio": 0.25, "email": "annek@noanswer.org"});
    let eval = r.evaluate(&event("inventory.customers", Op::Insert, None, Some(after)));
    assert_eq!(eval.invalidations.items(ItemKind::RedisKey), ["1004|false|0.25|ANNEK@NOANSWER.ORG"]);
}

#[test]
fn literal_braces_are_written_doubled() {
    let r = rules(
        r#"version: 1
rules:
  - name: r
    table: public.t
    redis: { keys: ["{{\"id\":{id}}}"] }
"#,
    );
    let eval = r.evaluate(&event("public.t", Op::Insert, None, Some(json!({"id": 42}))));
    assert_eq!(eval.invalidations.items(ItemKind::RedisKey), [r#"{"id":42}"#]);
}

#[test]
fn unmatched_tables_cost_nothing() {
    let r = rules(CONTRACT_EXAMPLE);
    assert_eq!(r.evaluate(&event("public.other", Op::Insert, None, Some(json!({"id": 1})))), Evaluation::default());
}

// ---- check rejections: one per rule of the contract, with the exact place ---------------

const VALID: &str = r#"version: 1
rules:
  - name: p
    table: public.products
    redis:
      keys: ["product:{id}"]
"#;

#[test]
fn the_valid_base_is_valid() {
    assert_eq!(rules(VALID).len(), 1);
}

#[test]
fn rejects_unknown_keys_at_every_level() {
    assert_problem(
        &format!("{VALID}extra: 1\n"),
        "7:1",
        &["the rules file", "`extra` is not a known field", "`version` or `rules`"],
    );
    assert_problem(
        &VALID.replace("    table:", "    tabel: x\n    table:"),
        "4:5",
        &["rule \"p\"", "`tabel` is not a known field"],
    );
    assert_problem(
        &VALID.replace("      keys:", "      key: []\n      keys:"),
        "6:7",
        &["rule \"p\"", "`redis.key` is not a known field", "`keys`, `tags`, `patterns`"],
    );
    assert_problem(
        &format!("{VALID}    on_truncate:\n      redis: {{ tags: [all], keys: [k], urls: [u] }}\n"),
        "8:40",
        &["rule \"p\"", "`on_truncate.redis.urls` is not a known field"],
    );
}

#[test]
fn rejects_a_repeated_key() {
    assert_problem(
        &format!("{VALID}    table: public.x\n"),
        "7:5",
        &["rule \"p\"", "`table` is given twice (first at line 4)"],
    );
}

#[test]
fn rejects_a_missing_or_wrong_version() {
    assert_problem(&VALID.replace("version: 1\n", ""), "1:1", &["has no `version`"]);
    assert_problem(&VALID.replace("version: 1", "version: 2"), "1:10", &["`version` must be 1, not 2"]);
    assert_problem(
        &VALID.replace("version: 1", "version: \"1\""),
        "1:10",
        &["`version` must be 1, not the string \"1\""],
    );
}

#[test]
fn rejects_a_duplicate_rule_name() {
    let text = format!("{VALID}  - name: p\n    table: public.other\n    redis: {{ keys: [x] }}\n");
    assert_problem(&text, "7:11", &["rule \"p\"", "`name` is already used by the rule at line 3"]);
}

#[test]
fn rejects_a_missing_or_bad_name() {
    assert_problem(&VALID.replace("  - name: p\n    table", "  - table"), "3:5", &["rule #1 has no `name`"]);
    assert_problem(&VALID.replace("name: p", "name: \"\""), "3:11", &["rule #1", "`name` is empty"]);
    assert_problem(&VALID.replace("name: p", "name: [p]"), "3:11", &["rule #1", "`name` must be a string, not a list"]);
}

#[test]
fn rejects_an_unknown_filter() {
    assert_problem(
        &VALID.replace("product:{id}", "product:{id|lowr}"),
        "6:14",
        &["rule \"p\"", "`redis.keys`", "\"product:{id|lowr}\"", "unknown filter \"lowr\"", "lower, upper, urlencode"],
    );
}

#[test]
fn rejects_an_empty_placeholder() {
    assert_problem(
        &VALID.replace("product:{id}", "product:{}"),
        "6:14",
        &["`redis.keys` template \"product:{}\" has an empty placeholder"],
    );
}

#[test]
fn rejects_unbalanced_braces() {
    assert_problem(
        &VALID.replace("product:{id}", "product:{id"),
        "6:14",
        &["`redis.keys`", "`{` that is never closed"],
    );
    assert_problem(&VALID.replace("product:{id}", "product:id}"), "6:14", &["`redis.keys`", "`}` that closes nothing"]);
}

#[test]
fn rejects_a_var_with_no_values() {
    let text = VALID.replace("    redis:", "    vars:\n      locale: []\n    redis:");
    assert_problem(&text, "6:15", &["rule \"p\"", "`vars.locale` must list at least one value"]);
    // Templates using it are not also blamed for using a column.
    let text = format!("{text}    on_truncate: {{ redis: {{ tags: [\"all:{{locale}}\"] }} }}\n");
    assert_problem(&text, "6:15", &["`vars.locale` must list at least one value"]);
}

#[test]
fn rejects_when_changed_without_updates() {
    let text = VALID.replace("    redis:", "    ops: [insert, delete]\n    when_changed: [price]\n    redis:");
    assert_problem(&text, "6:19", &["rule \"p\"", "`when_changed` only applies to updates"]);
}

#[test]
fn rejects_columns_in_on_truncate() {
    let text = format!("{VALID}    on_truncate:\n      redis:\n        tags: [\"all\", \"cat:{{category_id}}\"]\n");
    assert_problem(&text, "9:23", &["rule \"p\"", "`on_truncate.redis.tags`", "uses the column \"category_id\""]);
}

#[test]
fn rejects_a_rule_with_nothing_to_invalidate() {
    let text = VALID.replace("    redis:\n      keys: [\"product:{id}\"]\n", "    redis: { keys: [] }\n");
    assert_problem(&text, "3:5", &["rule \"p\" has nothing to invalidate"]);
    let text = format!("{VALID}    on_truncate: {{}}\n");
    assert_problem(&text, "7:18", &["rule \"p\"", "`on_truncate` lists nothing to invalidate"]);
}

#[test]
fn rejects_unknown_ops_and_truncate_in_ops() {
    let text = VALID.replace("    redis:", "    ops: [insert, upsert]\n    redis:");
    assert_problem(&text, "5:19", &["rule \"p\"", "unknown operation \"upsert\""]);
    let text = VALID.replace("    redis:", "    ops: [insert, truncate]\n    redis:");
    assert_problem(&text, "5:19", &["rule \"p\"", "`ops` cannot list truncate", "`on_truncate`"]);
    let text = VALID.replace("    redis:", "    ops: []\n    redis:");
    assert_problem(&text, "5:10", &["`ops` must list at least one operation"]);
}

#[test]
fn rejects_empty_and_invalid_table_globs() {
    assert_problem(
        &VALID.replace("table: public.products", "table: \"\""),
        "4:12",
        &["rule \"p\"", "`table` \"\" is empty"],
    );
    assert_problem(
        &VALID.replace("table: public.products", "table: products"),
        "4:12",
        &["`table` \"products\" must be qualified"],
    );
    assert_problem(&VALID.replace("table: public.products", "table: \"public.[ab]*\""), "4:12", &["contains '['"]);
    assert_problem(&VALID.replace("    table: public.products\n", ""), "3:5", &["rule \"p\" has no `table`"]);
}

#[test]
fn rejects_wrong_types() {
    assert_problem(
        &VALID.replace("keys: [\"product:{id}\"]", "keys: \"product:{id}\""),
        "6:13",
        &["`redis.keys` must be a list of templates, not a string"],
    );
    assert_problem(
        &VALID.replace("\"product:{id}\"", "42"),
        "6:14",
        &["`redis.keys` lists an integer, but templates are strings"],
    );
    assert_problem("version: 1\nrules: 3\n", "2:8", &["`rules` must be a list of rules"]);
    assert_problem(
        &VALID.replace("    redis:\n      keys", "    vars: [a]\n    redis:\n      keys"),
        "5:11",
        &["`vars` must be a mapping"],
    );
    assert_problem(
        &VALID.replace("    redis:", "    vars: { v: [1.5] }\n    redis:"),
        "5:17",
        &["`vars.v` lists a number"],
    );
    assert_problem("- 1\n", "1:1", &["must be a mapping with `version` and `rules`, not a list"]);
    assert_problem("", "1:1", &["the rules file is empty"]);
}

#[test]
fn rejects_an_expansion_fan_out_over_the_bound() {
    let values: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    let list = values.join(", ");
    let text = VALID.replace(
        "    redis:\n      keys: [\"product:{id}\"]",
        &format!("    vars:\n      a: [{list}]\n      b: [{list}]\n    redis:\n      keys: [\"product:{{id}}:{{a}}:{{b}}\", \"product:{{a}}\"]"),
    );
    assert_problem(&text, "9:14", &["`redis.keys`", "expands to 1600 items", "limit of 1000"]);
}

#[test]
fn rejects_invalid_yaml_with_its_location() {
    let (at, message) = problem("version: 1\nrules: [\n");
    assert!(at.starts_with("3:") || at.starts_with("2:"), "{at}");
    assert!(message.contains("not valid YAML"), "{message}");
}

#[test]
fn reports_every_problem_in_one_file() {
    let text = r#"version: 3
rules:
  - name: a
    table: products
    ops: [insert, upsert]
    when_changed: []
    redis:
      keys: ["k:{id|lowr}", "x:{}"]
  - name: a
    table: public.b
    colour: blue
  - name: c
    table: public.c
    ops: [delete]
    when_changed: [x]
    vars: { l: [] }
    on_truncate:
      cdn: { urls: ["/c/{id}"] }
"#;
    let all = problems(text);
    let got: Vec<(&str, &str)> = all.iter().map(|(at, m)| (at.as_str(), m.as_str())).collect();
    let expected_places = [
        ("1:10", "`version` must be 1"),
        ("4:12", "rule \"a\": `table` \"products\" must be qualified"),
        ("5:19", "unknown operation \"upsert\""),
        ("6:19", "`when_changed` must list at least one column"),
        ("8:14", "unknown filter \"lowr\""),
        ("8:29", "empty placeholder"),
        ("9:5", "rule \"a\" has nothing to invalidate"),
        ("9:11", "`name` is already used by the rule at line 3"),
        ("11:5", "`colour` is not a known field"),
        ("15:19", "rule \"c\": `when_changed` only applies to updates"),
        ("16:16", "`vars.l` must list at least one value"),
        ("18:21", "uses the column \"id\""),
    ];
    assert_eq!(got.len(), expected_places.len(), "{got:#?}");
    for ((at, message), (want_at, fragment)) in got.iter().zip(expected_places) {
        assert_eq!(*at, want_at, "{message}");
        assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
    }
    let err = Rules::parse(text, Path::new("rules.yaml")).unwrap_err().to_string();
    assert!(err.lines().all(|l| l.starts_with("rules.yaml:")), "{err}");
}

#[test]
fn evaluating_into_one_evaluation_event_after_event_gives_what_evaluate_gives() {
    let r = rules(CONTRACT_EXAMPLE);
    let events = [
        event("public.products", Op::Insert, None, Some(product(1, 1, "a b"))),
        event("public.products", Op::Update, Some(product(2, 5, "x")), Some(product(2, 6, "x"))),
        // Unrenderable: the slug is null (an error), the rest renders.
        event("public.products", Op::Insert, None, Some(json!({"id": 3, "category_id": 4, "slug": null}))),
        event("public.orders", Op::Insert, None, Some(json!({"id": 1}))),
        event("public.products", Op::Truncate, None, None),
        event("public.products", Op::Delete, Some(product(9, 2, "z")), None),
    ];
    let mut scratch = Evaluation::default();
    for _ in 0..2 {
        for e in &events {
            r.evaluate_into(e, &mut scratch);
            assert_eq!(scratch, r.evaluate(e), "{} {:?}", e.table, e.op);
            // As the pipeline does: the items taken out, the lists' room kept.
            for kind in ItemKind::ALL {
                scratch.invalidations.items_mut(kind).clear();
            }
        }
    }
}
