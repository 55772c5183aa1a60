//! The decoder against every fixture, the shapes around them, and malformed input.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::{decode, DecimalError, DecodeError};
use crate::event::{ChangeEvent, Decoded, NoChange, NoChangeKind, Op, Row};

const PRODUCTS: &str = "shop.public.products";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium")
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

fn row(value: serde_json::Value) -> Row {
    match value {
        serde_json::Value::Object(map) => map.into(),
        other => panic!("not an object: {other}"),
    }
}

fn ms(n: u64) -> Option<SystemTime> {
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(n))
}

fn ok(topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Decoded {
    match decode(topic, key, value) {
        Ok(decoded) => decoded,
        Err(e) => panic!("decoding {:?}: {e}", value.map(String::from_utf8_lossy)),
    }
}

fn change(topic: &str, value: &str) -> ChangeEvent {
    change_with_key(topic, None, value)
}

fn change_with_key(topic: &str, key: Option<&str>, value: &str) -> ChangeEvent {
    match ok(topic, key.map(str::as_bytes), Some(value.as_bytes())) {
        Decoded::Change(event) => event,
        other => panic!("not a change: {other:?}"),
    }
}

fn error(value: &[u8]) -> String {
    match decode(PRODUCTS, None, Some(value)) {
        Ok(decoded) => panic!("decoded {:?} as {decoded:?}", String::from_utf8_lossy(value)),
        Err(e) => e.to_string(),
    }
}

fn no_change(kind: NoChangeKind, table: Option<&str>, at: Option<SystemTime>) -> Decoded {
    Decoded::NoChange(NoChange { kind, table: table.map(str::to_owned), at })
}

fn blue_widget(price: &str, category_id: i64) -> Row {
    row(json!({"id": 42, "name": "Blue Widget", "price": price, "category_id": category_id, "slug": "blue-widget"}))
}

// ---- every fixture ----

#[test]
fn pg_update_with_schema_decodes_decimals() {
    let got = ok(PRODUCTS, None, Some(&fixture("pg-update-with-schema.json")));
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Update,
        before: Some(blue_widget("100.00", 5)),
        after: Some(blue_widget("80.00", 7)),
        committed_at: ms(1_763_821_800_123),
        lsn: Some(24023184),
    };
    assert_eq!(got, Decoded::Change(want));
}

#[test]
fn pg_update_no_schema() {
    let got = ok(PRODUCTS, None, Some(&fixture("pg-update-no-schema.json")));
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Update,
        before: Some(blue_widget("100.00", 5)),
        after: Some(blue_widget("80.00", 5)),
        committed_at: ms(1_763_821_800_123),
        lsn: Some(24023184),
    };
    assert_eq!(got, Decoded::Change(want));
}

#[test]
fn pg_update_replica_identity_default_has_no_before_image() {
    let got = ok(PRODUCTS, None, Some(&fixture("pg-update-replica-identity-default.json")));
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Update,
        before: None,
        after: Some(row(
            json!({"id": 42, "name": "Red Widget", "price": "80.00", "category_id": 5, "slug": "red-widget"}),
        )),
        committed_at: ms(1_763_821_801_000),
        lsn: Some(24023300),
    };
    assert_eq!(got, Decoded::Change(want.clone()));
    // The key does not invent a before image for an update: `when_changed` must see none.
    let key = fixture("key-products-42.json");
    assert_eq!(
        ok(PRODUCTS, Some(&key), Some(&fixture("pg-update-replica-identity-default.json"))),
        Decoded::Change(want)
    );
}

#[test]
fn pg_insert() {
    let got = ok(PRODUCTS, None, Some(&fixture("pg-insert.json")));
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Insert,
        before: None,
        after: Some(row(
            json!({"id": 43, "name": "Green Widget", "price": "12.50", "category_id": 7, "slug": "green-widget"}),
        )),
        committed_at: ms(1_763_821_802_000),
        lsn: Some(24023400),
    };
    assert_eq!(got, Decoded::Change(want));
}

#[test]
fn pg_delete_key_only() {
    let got = ok(PRODUCTS, Some(br#"{"id":43}"#), Some(&fixture("pg-delete-key-only.json")));
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Delete,
        before: Some(row(json!({"id": 43, "name": null, "price": null, "category_id": null, "slug": null}))),
        after: None,
        committed_at: ms(1_763_821_803_000),
        lsn: Some(24023500),
    };
    assert_eq!(got, Decoded::Change(want));
}

#[test]
fn pg_snapshot_read() {
    let got = ok(PRODUCTS, None, Some(&fixture("pg-snapshot-read.json")));
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Snapshot,
        before: None,
        after: Some(row(json!({"id": 1, "name": "Starter", "price": "1.00", "category_id": 1, "slug": "starter"}))),
        committed_at: ms(1_763_821_700_000),
        lsn: Some(24000000),
    };
    assert_eq!(got, Decoded::Change(want));
}

#[test]
fn pg_truncate() {
    let got = ok(PRODUCTS, None, Some(&fixture("pg-truncate.json")));
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Truncate,
        before: None,
        after: None,
        committed_at: ms(1_763_821_804_000),
        lsn: Some(24023600),
    };
    assert_eq!(got, Decoded::Change(want));
}

#[test]
fn mysql_update_uses_db_dot_table() {
    let got = ok("inventory.inventory.customers", None, Some(&fixture("mysql-update.json")));
    let customer = |first: &str| {
        row(json!({"id": 1004, "first_name": first, "last_name": "Kretchmar", "email": "annek@noanswer.org"}))
    };
    let want = ChangeEvent {
        table: "inventory.customers".into(),
        op: Op::Update,
        before: Some(customer("Anne")),
        after: Some(customer("Anne Marie")),
        committed_at: ms(1_763_821_805_000),
        lsn: None,
    };
    assert_eq!(got, Decoded::Change(want));
}

#[test]
fn unwrapped_update_strips_metadata() {
    let got = ok(PRODUCTS, None, Some(&fixture("unwrapped-update.json")));
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Update,
        before: None,
        after: Some(blue_widget("80.00", 7)),
        committed_at: ms(1_763_821_806_000),
        lsn: None,
    };
    assert_eq!(got, Decoded::Change(want));
}

#[test]
fn unwrapped_delete_rewrite_is_a_delete_of_the_row() {
    let got = ok(PRODUCTS, None, Some(&fixture("unwrapped-delete-rewrite.json")));
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Delete,
        before: Some(blue_widget("80.00", 7)),
        after: None,
        committed_at: ms(1_763_821_807_000),
        lsn: None,
    };
    assert_eq!(got, Decoded::Change(want));
}

#[test]
fn heartbeat() {
    let value = fixture("heartbeat.json");
    let want = no_change(NoChangeKind::Heartbeat, None, ms(1_763_821_808_000));
    assert_eq!(ok("__debezium-heartbeat.shop", None, Some(&value)), want);
    // Recognised by its shape on a renamed heartbeat topic too, with or without a schema.
    assert_eq!(ok("custom-heartbeats", None, Some(&value)), want);
    let wrapped = br#"{"schema":{"type":"struct","fields":[{"type":"int64","optional":false,"field":"ts_ms"}],"optional":false,"name":"io.debezium.connector.common.Heartbeat"},"payload":{"ts_ms":1763821808000}}"#;
    assert_eq!(ok("custom-heartbeats", None, Some(wrapped)), want);
    assert_eq!(ok("__debezium-heartbeat.shop", Some(br#"{"serverName":"shop"}"#), Some(wrapped)), want);
    assert_eq!(ok("__debezium-heartbeat.shop", None, None), no_change(NoChangeKind::Heartbeat, None, None));
}

#[test]
fn tombstone() {
    let want = no_change(NoChangeKind::Tombstone, Some("public.products"), None);
    assert_eq!(ok(PRODUCTS, Some(br#"{"id":42}"#), Some(&fixture("tombstone.json"))), want);
    assert_eq!(ok(PRODUCTS, Some(br#"{"id":42}"#), None), want);
    assert_eq!(ok(PRODUCTS, None, Some(b" null\n")), want);
    assert_eq!(ok(PRODUCTS, None, Some(br#"{"schema":null,"payload":null}"#)), want);
    assert_eq!(ok("products", None, None), no_change(NoChangeKind::Tombstone, Some("products"), None));
    assert_eq!(ok("", None, None), no_change(NoChangeKind::Tombstone, None, None));
}

/// The copies in this repository are the shared fixtures, byte for byte (checked when the
/// shared directory sits beside the repository, as in the project's checkout).
#[test]
fn fixture_copies_match_the_shared_ones() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/debezium");
    let Ok(entries) = std::fs::read_dir(&shared) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let theirs = std::fs::read(entry.path()).ok();
        let ours = std::fs::read(fixture_dir().join(&name)).ok();
        assert!(ours.is_some() && ours == theirs, "fixture {name:?} differs from the shared copy");
    }
}

// ---- shapes around the fixtures ----

#[test]
fn sql_server_uses_schema_over_db_and_the_topic_tail() {
    let value = r#"{"before":null,"after":{"id":1},"source":{"connector":"sqlserver","db":"shop","schema":"dbo","table":"orders","ts_ms":5},"op":"c"}"#;
    assert_eq!(change("server1.shop.dbo.orders", value).table, "dbo.orders");
    // Without a table in the event, the topic's last two parts name it.
    let value =
        r#"{"after":{"id":1},"source":{"connector":"sqlserver","db":"shop","schema":"dbo","table":null},"op":"c"}"#;
    assert_eq!(change("server1.shop.dbo.orders", value).table, "dbo.orders");
    let value = r#"{"after":{"id":1},"source":{"table":"orders"},"op":"c"}"#;
    assert_eq!(change("server1.shop.dbo.orders", value).table, "dbo.orders");
    assert_eq!(change("orders", value).table, "orders");
}

#[test]
fn no_table_anywhere_is_malformed() {
    let value = br#"{"after":{"id":1},"source":{"connector":"postgresql"},"op":"c"}"#;
    assert_eq!(
        decode("", None, Some(value)).map_err(|e| e.to_string()),
        Err("the event does not name its table and the topic is empty".to_owned())
    );
}

#[test]
fn commit_time_prefers_the_most_precise_source_timestamp() {
    let with = |source: &str| {
        let value = format!(
            r#"{{"after":{{"id":1}},"source":{{"schema":"public","table":"t",{source}}},"op":"c","ts_ms":99}}"#
        );
        change(PRODUCTS, &value).committed_at
    };
    let nanos = |n: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(n));
    assert_eq!(
        with(r#""ts_ms":1763821800123,"ts_us":1763821800123456,"ts_ns":1763821800123456789"#),
        nanos(1_763_821_800_123_456_789)
    );
    assert_eq!(
        with(r#""ts_ms":1763821800123,"ts_us":1763821800123456,"ts_ns":null"#),
        nanos(1_763_821_800_123_456_000)
    );
    assert_eq!(with(r#""ts_ms":1763821800123"#), ms(1_763_821_800_123));
    // The envelope's ts_ms (connector processing time) is not a commit time.
    assert_eq!(with(r#""ts_ms":null"#), None);
    assert_eq!(with(r#""ts_ms":"soon""#), None);
    assert_eq!(with(r#""ts_ms":-1000"#), Some(SystemTime::UNIX_EPOCH - Duration::from_secs(1)));
}

#[test]
fn message_and_schema_change_and_transaction_records_change_nothing() {
    let message = br#"{"op":"m","ts_ms":1,"source":{"connector":"postgresql","schema":"","table":"","ts_ms":1763821800000},"message":{"prefix":"p","content":"aGk="}}"#;
    assert_eq!(ok(PRODUCTS, None, Some(message)), no_change(NoChangeKind::Other, None, ms(1_763_821_800_000)));
    let ddl = br#"{"source":{"connector":"mysql","db":"inventory","table":"customers"},"databaseName":"inventory","ddl":"ALTER TABLE customers ADD x INT","tableChanges":[]}"#;
    assert_eq!(ok("inventory", None, Some(ddl)), no_change(NoChangeKind::Other, None, None));
    let tx = br#"{"status":"END","id":"571","event_count":2,"data_collections":[{"data_collection":"public.products","event_count":2}],"ts_ms":1763821800000}"#;
    assert_eq!(ok("shop.transaction", None, Some(tx)), no_change(NoChangeKind::Other, None, ms(1_763_821_800_000)));
}

#[test]
fn flattened_without_op_is_an_update_with_only_an_after_image() {
    let got = change(PRODUCTS, r#"{"id":42,"name":"Blue Widget","op":"renamed","after":"x"}"#);
    let want = ChangeEvent {
        table: "public.products".into(),
        op: Op::Update,
        before: None,
        after: Some(row(json!({"id": 42, "name": "Blue Widget", "op": "renamed", "after": "x"}))),
        committed_at: None,
        lsn: None,
    };
    assert_eq!(got, want);
    // A flattened outbox row with a `payload` column is no schema envelope.
    let outbox = change("shop.public.outbox", r#"{"id":1,"schema":"orders","payload":"{}"}"#);
    assert_eq!(outbox.after, Some(row(json!({"id": 1, "schema": "orders", "payload": "{}"}))));
}

#[test]
fn flattened_ops_and_table_fields() {
    let event = change(PRODUCTS, r#"{"id":1,"__op":"c","__db":"inventory","__table":"customers","__lsn":7}"#);
    assert_eq!((event.table.as_str(), event.op), ("inventory.customers", Op::Insert));
    assert_eq!(event.after, Some(row(json!({"id": 1}))));
    let event = change(PRODUCTS, r#"{"id":1,"__op":"r","__table":"other"}"#);
    assert_eq!((event.table.as_str(), event.op), ("public.other", Op::Snapshot));
    let event = change(PRODUCTS, r#"{"id":1,"__op":"d","__deleted":"false"}"#);
    assert_eq!((event.op, event.before, event.after), (Op::Delete, Some(row(json!({"id": 1}))), None));
    let event = change(PRODUCTS, r#"{"id":1,"__op":"u","__deleted":true}"#);
    assert_eq!(event.op, Op::Delete);
    let event = change(PRODUCTS, r#"{"id":1,"__op":"t","__source_ts_us":1763821800123456}"#);
    assert_eq!((event.op, event.before, event.after), (Op::Truncate, None, None));
    assert_eq!(event.committed_at, Some(SystemTime::UNIX_EPOCH + Duration::from_micros(1_763_821_800_123_456)));
    assert_eq!(ok(PRODUCTS, None, Some(br#"{"__op":"m"}"#)), no_change(NoChangeKind::Other, None, None));
}

#[test]
fn flattened_with_schema_decodes_decimals() {
    let value = r#"{"schema":{"type":"struct","name":"shop.public.products.Value","fields":[
        {"type":"int64","field":"id"},
        {"type":"bytes","field":"price","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}},
        {"type":"struct","field":"weight","name":"io.debezium.data.VariableScaleDecimal"},
        {"type":"string","field":"__op"}]},
        "payload":{"id":42,"price":"2PA=","weight":{"scale":3,"value":"AeI="},"__op":"u"}}"#;
    let event = change(PRODUCTS, value);
    assert_eq!(event.after, Some(row(json!({"id": 42, "price": "-100.00", "weight": "0.482"}))));
}

#[test]
fn envelope_variable_scale_decimal_and_untouched_other_values() {
    // io.debezium.time.Year is a plain int32 year: left as it is.
    let value = r#"{"schema":{"type":"struct","fields":[{"type":"struct","field":"after","fields":[
        {"type":"struct","field":"amount","name":"io.debezium.data.VariableScaleDecimal"},
        {"type":"int32","field":"year","name":"io.debezium.time.Year"},
        {"type":"int32","field":"day","name":"io.debezium.time.Date"}]}]},
        "payload":{"after":{"amount":{"scale":0,"value":"AA=="},"year":2024,"day":20000},"source":{"schema":"public","table":"t"},"op":"c"}}"#;
    let event = change(PRODUCTS, value);
    assert_eq!(event.after, Some(row(json!({"amount": "0", "year": 2024, "day": "2024-10-04"}))));
}

#[test]
fn key_fills_missing_and_null_key_columns() {
    let value = r#"{"before":{"tenant":null,"name":"a"},"after":{"id":7,"name":"b"},"source":{"schema":"public","table":"products"},"op":"u"}"#;
    let event = change_with_key(PRODUCTS, Some(r#"{"id":42,"tenant":3}"#), value);
    assert_eq!(event.before, Some(row(json!({"id": 42, "tenant": 3, "name": "a"}))));
    // Present values stay: the image is what the database logged.
    assert_eq!(event.after, Some(row(json!({"id": 7, "tenant": 3, "name": "b"}))));
}

#[test]
fn key_with_schema_envelope_and_decimal() {
    let key = r#"{"schema":{"type":"struct","fields":[{"type":"bytes","field":"sku","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"0"}}]},"payload":{"sku":"MDk="}}"#;
    let value = r#"{"after":{"name":"x"},"source":{"schema":"public","table":"products"},"op":"c"}"#;
    let event = change_with_key(PRODUCTS, Some(key), value);
    assert_eq!(event.after, Some(row(json!({"sku": "12345", "name": "x"}))));
}

#[test]
fn delete_without_before_takes_the_key() {
    let value = r#"{"before":null,"after":null,"source":{"schema":"public","table":"products"},"op":"d"}"#;
    let event = change_with_key(PRODUCTS, Some(r#"{"id":42}"#), value);
    assert_eq!((event.op, event.before, event.after), (Op::Delete, Some(row(json!({"id": 42}))), None));
    assert_eq!(
        decode(PRODUCTS, None, Some(value.as_bytes())).map_err(|e| e.to_string()),
        Err("the delete event has no `before` image and no message key to take the row's key from".to_owned())
    );
}

#[test]
fn unusable_keys_are_ignored() {
    let value = fixture("pg-insert.json");
    let plain = ok(PRODUCTS, None, Some(&value));
    for key in [&b"not json"[..], b"42", b"\"id\"", b"null", b"", b"[1]", br#"{"schema":{},"payload":7}"#] {
        assert_eq!(ok(PRODUCTS, Some(key), Some(&value)), plain, "key {:?}", String::from_utf8_lossy(key));
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let value = r#"{"after":{"id":1},"source":{"schema":"public","table":"t","extra":[1,{"a":2}]},"op":"c","transaction":{"id":"1"},"new_field":{"x":[[[]]]}}"#;
    assert_eq!(change(PRODUCTS, value).after, Some(row(json!({"id": 1}))));
}

#[test]
fn escaped_strings_decode() {
    let value =
        r#"{"after":{"na\u006de":"caf\u00e9 \"x\""},"source":{"schema":"pub\u006cic","table":"t"},"op":"\u0063"}"#;
    let event = change(PRODUCTS, value);
    assert_eq!((event.table.as_str(), event.op), ("public.t", Op::Insert));
    assert_eq!(event.after, Some(row(json!({"name": "café \"x\""}))));
}

/// The second message with a schema takes the fast path (schema known, only the payload
/// parsed); it must decide exactly as the general path does, errors included.
#[test]
fn known_schema_fast_path_agrees_with_the_general_path() {
    let text = match String::from_utf8(fixture("pg-update-with-schema.json")) {
        Ok(text) => text,
        Err(e) => panic!("{e}"),
    };
    let compact = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(value) => value.to_string(),
        Err(e) => panic!("{e}"),
    };
    let close = text.rfind('}').unwrap_or_default();
    let mut variants = vec![
        text.clone(),
        compact.clone(),
        text.replace(r#""op": "u""#, r#""op": u"#),
        text.replace(r#""op": "u""#, r#""op": "x""#),
        text.replace(r#""after": {"id": 42"#, r#""after": {"id": [[[[[[[[]]]]]]]]"#),
        format!("{} x", text),
        format!("{},\"extra\":1}}", &text[..close]),
    ];
    let payload_at = text.find(r#""payload": {"#).unwrap_or_default() + r#""payload": "#.len();
    for payload in ["null", r#""a string""#, "[]", "7", "{}", "{"] {
        variants.push(format!("{}{payload}\n}}", &text[..payload_at]));
    }
    let on_new_thread = |warm_up: Vec<String>, value: String| {
        // A new thread starts with an empty schema cache; decoding the warm-up messages first
        // puts their schemas in it.
        let decoded = std::thread::spawn(move || {
            for message in warm_up {
                let _ = decode(PRODUCTS, None, Some(message.as_bytes()));
            }
            decode(PRODUCTS, None, Some(value.as_bytes())).map_err(|e| e.to_string())
        })
        .join();
        decoded.unwrap_or_else(|_| panic!("the decoder panicked"))
    };
    for value in variants {
        let general = on_new_thread(Vec::new(), value.clone());
        let fast = on_new_thread(vec![text.clone(), compact.clone()], value.clone());
        assert_eq!(fast, general, "{value}");
    }
    // And the fast path is really taken once the schema is known, not before.
    let taken = std::thread::spawn(move || {
        let before = super::Message::read_known_envelope(&text, super::json::Depth::Event).is_some();
        let _ = decode(PRODUCTS, None, Some(text.as_bytes()));
        let after = matches!(
            super::Message::read_known_envelope(&text, super::json::Depth::Event),
            Some(Ok(super::Read::Message(_)))
        );
        (before, after)
    })
    .join();
    assert_eq!(taken.ok(), Some((false, true)));
}

// ---- malformed input ----

#[test]
fn invalid_json() {
    assert_eq!(error(b"x"), "the message value is not valid JSON: expected value at line 1 column 1");
    assert_eq!(
        error(br#"{"op":"c","after":{"id":1}"#),
        "the message value is not valid JSON: EOF while parsing an object at line 1 column 26"
    );
    assert_eq!(error(b"{} x"), "the message value is not valid JSON: trailing characters at line 1 column 4");
    assert_eq!(
        error(b"{\"a\":\"\xff\"}"),
        "the message value is not valid JSON: invalid utf-8 sequence of 1 bytes from index 6"
    );
}

/// An empty value is a tombstone like a null one (it used to be a dead letter in the daemon and
/// a tombstone in `explain`).
#[test]
fn empty_value_is_a_tombstone() {
    for value in [&b""[..], b" \n\t", b"null"] {
        match decode("shop.public.products", Some(b"{\"id\":1}"), Some(value)) {
            Ok(Decoded::NoChange(n)) => assert_eq!(n.table.as_deref(), Some("public.products"), "{value:?}"),
            other => panic!("{value:?}: {other:?}"),
        }
    }
}

#[test]
fn value_not_an_object() {
    assert_eq!(error(b"[1,2]"), "the message value is an array, expected a JSON object");
    assert_eq!(error(b"\"c\""), "the message value is a string, expected a JSON object");
    assert_eq!(error(b"42"), "the message value is a number, expected a JSON object");
}

#[test]
fn payload_not_an_object() {
    assert_eq!(error(br#"{"schema":{},"payload":"x"}"#), "`payload` is a string, expected an object or null");
    assert_eq!(error(br#"{"schema":null,"payload":[]}"#), "`payload` is an array, expected an object or null");
}

#[test]
fn op_missing_or_wrong() {
    let source = r#""source":{"schema":"public","table":"products"}"#;
    assert_eq!(
        error(format!(r#"{{"before":null,"after":{{"id":1}},{source}}}"#).as_bytes()),
        "the change event has no `op` field"
    );
    assert_eq!(
        error(format!(r#"{{"after":{{"id":1}},{source},"op":"x"}}"#).as_bytes()),
        r#"`op` is "x", expected one of "c", "u", "d", "r", "t" or "m""#
    );
    assert_eq!(
        error(format!(r#"{{"after":{{"id":1}},{source},"op":1}}"#).as_bytes()),
        "`op` is a number, expected a string"
    );
    assert_eq!(
        error(br#"{"id":1,"__op":"upsert"}"#),
        r#"`__op` is "upsert", expected one of "c", "u", "d", "r", "t" or "m""#
    );
    assert_eq!(error(br#"{"id":1,"__op":5}"#), "`__op` is a number, expected a string or null");
}

#[test]
fn row_image_not_an_object() {
    let source = r#""source":{"schema":"public","table":"products"}"#;
    assert_eq!(
        error(format!(r#"{{"after":"a string",{source},"op":"c"}}"#).as_bytes()),
        "`after` is a string, expected an object or null"
    );
    assert_eq!(
        error(format!(r#"{{"before":7,"after":null,{source},"op":"d"}}"#).as_bytes()),
        "`before` is a number, expected an object or null"
    );
    assert_eq!(
        error(br#"{"after":{},"source":{"table":5},"op":"c"}"#),
        "`source.table` is a number, expected a string or null"
    );
    assert_eq!(error(br#"{"id":1,"__table":["t"]}"#), "`__table` is an array, expected a string or null");
}

#[test]
fn missing_images() {
    let source = r#""source":{"schema":"public","table":"products"}"#;
    assert_eq!(
        error(format!(r#"{{"after":null,{source},"op":"c"}}"#).as_bytes()),
        "the insert event has no `after` image"
    );
    assert_eq!(error(format!(r#"{{{source},"op":"r"}}"#).as_bytes()), "the snapshot event has no `after` image");
    assert_eq!(
        error(format!(r#"{{"before":null,"after":null,{source},"op":"u"}}"#).as_bytes()),
        "the update event has neither a `before` nor an `after` image"
    );
}

#[test]
fn bad_decimal_names_the_column() {
    let schema = r#"{"type":"struct","fields":[{"type":"struct","field":"after","fields":[{"type":"bytes","field":"price","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}}]}]}"#;
    let value = format!(
        r#"{{"schema":{schema},"payload":{{"after":{{"price":"%%%"}},"source":{{"schema":"public","table":"p"}},"op":"c"}}}}"#
    );
    assert_eq!(error(value.as_bytes()), "column `price` is not a valid decimal: its value is not valid base64");
    assert_eq!(
        decode(PRODUCTS, None, Some(value.as_bytes())),
        Err(DecodeError::Decimal { column: "price".into(), reason: DecimalError::Base64 })
    );
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn huge_nesting_is_rejected_where_read_and_harmless_where_skipped() {
    let source = r#""source":{"schema":"public","table":"products"}"#;
    let deep = nested(200);
    assert_eq!(
        error(format!(r#"{{"after":{{"id":{deep}}},{source},"op":"c"}}"#).as_bytes()),
        "the message value is not valid JSON: recursion limit exceeded at line 1 column 141"
    );
    assert_eq!(
        error(format!(r#"{{"id":1,"source":{deep}}}"#).as_bytes()),
        "the row could not be read: recursion limit exceeded"
    );
    assert_eq!(
        error(format!(r#"{{"schema":null,"payload":{{"id":{deep}}}}}"#).as_bytes()),
        "the message value is not valid JSON: recursion limit exceeded at line 1 column 157"
    );
    // Nesting far beyond any stack, in parts the decoder skips or rejects by type: no crash.
    let abyss = nested(1_000_000);
    let source_with_abyss = format!(r#""source":{{"schema":"public","table":"products","extra":{abyss}}}"#);
    let event = change(PRODUCTS, &format!(r#"{{"after":{{"id":1}},{source_with_abyss},"op":"c"}}"#));
    assert_eq!(event.after, Some(row(json!({"id": 1}))));
    assert_eq!(error(abyss.as_bytes()), "the message value is an array, expected a JSON object");
    let schema = format!(r#"{{"schema":{{"name":"x.Decimal","fields":{abyss}}},"payload":{{"id":1}}}}"#);
    assert_eq!(error(schema.as_bytes()), "`schema` could not be read: recursion limit exceeded");
}

/// Every prefix of every fixture, and every fixture with one byte altered, decodes or fails
/// cleanly: no panic on any input.
#[test]
fn damaged_fixtures_never_panic() {
    let mut entries: Vec<_> = match std::fs::read_dir(fixture_dir()) {
        Ok(dir) => dir.flatten().map(|e| e.path()).collect(),
        Err(e) => panic!("{e}"),
    };
    entries.sort();
    let mut decoded = 0;
    for path in entries.iter().filter(|p| p.extension().is_some_and(|x| x == "json")) {
        let bytes = std::fs::read(path).unwrap_or_default();
        for end in 0..bytes.len() {
            decoded += usize::from(decode(PRODUCTS, Some(&bytes[..end]), Some(&bytes[..end])).is_ok());
        }
        for at in 0..bytes.len() {
            for replacement in [b'"', b'{', b'}', b'0', 0xff] {
                let mut damaged = bytes.clone();
                damaged[at] = replacement;
                decoded += usize::from(decode(PRODUCTS, None, Some(&damaged)).is_ok());
            }
        }
    }
    // Some damage is harmless (a changed digit or letter in a string): proof the loop ran.
    assert!(decoded > 100, "only {decoded} damaged values decoded");
}

/// The envelope's `source` block is read in the message's own pass, without keeping its value;
/// a flattened row whose table has a `source` column still gets that column, whatever its
/// type and wherever the row sits (top level or a schema envelope's payload).
#[test]
fn a_flattened_row_keeps_its_source_column() {
    let column = json!({"schema": "x", "table": "y", "n": [1, {"a": null}]});
    for value in [
        r#"{"id":1,"source":{"schema":"x","table":"y","n":[1,{"a":null}]},"__op":"u","__schema":"public","__table":"products"}"#,
        r#"{"id":1,"source":{"schema":"x","table":"y","n":[1,{"a":null}]}}"#,
        r#"{"schema":null,"payload":{"id":1,"source":{"schema":"x","table":"y","n":[1,{"a":null}]}}}"#,
    ] {
        let event = change(PRODUCTS, value);
        assert_eq!(event.table, "public.products", "{value}");
        assert_eq!(event.after.as_ref().and_then(|row| row.get("source")), Some(&column), "{value}");
    }
    let event = change(PRODUCTS, r#"{"id":1,"source":"web","__op":"c"}"#);
    assert_eq!(event.after, Some(row(json!({"id": 1, "source": "web"}))));
}

/// The last of duplicate fields wins, for `source` and inside it, as for every other field.
#[test]
fn duplicate_source_fields_read_last_wins() {
    let event = change(
        "x",
        r#"{"after":{"id":1},"source":{"schema":"a","table":"b"},"source":{"schema":"s","schema":"public","table":"products"},"op":"c"}"#,
    );
    assert_eq!(event.table, "public.products");
}
