//! The decoder against messages as real connectors and SMTs write them (issue 11): fixtures in
//! `tests/fixtures/debezium-real/`, each built from the debezium/debezium file cited beside
//! its test (commit `aad5519902997a3627fe296f77ea6d3452e9acce`; README.md there lists them).

use std::path::Path;

use serde_json::json;

use super::{decode, decode_with, DecodeError, Placeholders};
use crate::event::{ChangeEvent, Decoded, NoChangeKind, Op, Row};
use crate::rules::Rules;

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium-real").join(name);
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

fn change(topic: &str, key: Option<&str>, value: &str) -> ChangeEvent {
    let key = key.map(fixture);
    match decode(topic, key.as_deref(), Some(&fixture(value))) {
        Ok(Decoded::Change(event)) => event,
        other => panic!("{value}: not a change: {other:?}"),
    }
}

fn no_change(topic: &str, value: &str) -> NoChangeKind {
    match decode(topic, None, Some(&fixture(value))) {
        Ok(Decoded::NoChange(n)) => n.kind,
        other => panic!("{value}: not a no-change: {other:?}"),
    }
}

fn rules(text: &str) -> Rules {
    match Rules::parse(text, Path::new("rules.yaml")) {
        Ok(rules) => rules,
        Err(e) => panic!("{e}"),
    }
}

// PostgresConnectorIT.java, shouldEmitPlaceholderForUnchangedJsonbColumnOnUpdate (DBZ-1258):
// an update that leaves a TOASTed jsonb alone sends the placeholder for it.
#[test]
fn postgres_toast_placeholder_is_unknown_not_data() {
    let event = change("test_server.dbz1258.toast_test", None, "pg-toast-update.json");
    assert_eq!(event.table, "dbz1258.toast_test");
    assert_eq!(event.after, Some(row(json!({"pk": 1, "label": "updated"}))));
    // A template on the column is a rule error, never `doc:__debezium_unavailable_value`.
    let rules = rules(
        "version: 1\nrules:\n  - name: docs\n    table: dbz1258.toast_test\n    redis:\n      keys: [\"doc:{payload}\", \"row:{pk}\"]\n",
    );
    let eval = rules.evaluate(&event);
    assert_eq!(eval.invalidations.items(crate::sink::ItemKind::RedisKey), ["row:1"]);
    assert_eq!(eval.errors.len(), 1, "{eval:?}");
    assert!(eval.errors[0].message.contains("\"payload\" is absent from the after image"), "{eval:?}");
}

// DecoderDifferences.java: bytea as base64 of the placeholder, int[] as its bytes, uuid as its
// name-based UUID; a text[] holds it as an element.
#[test]
fn postgres_placeholder_in_bytes_arrays_and_uuid_columns_is_unknown() {
    let event = change("shop.public.products", None, "pg-toast-bytes-array.json");
    assert_eq!(event.after, Some(row(json!({"id": 42, "slug": "blue-widget"}))));
}

// oracle.adoc, `lob.enabled` / `unavailable.value.placeholder`: LOB columns in `before` hold
// the placeholder, deletes included.
#[test]
fn oracle_lob_placeholder_in_a_delete_is_unknown() {
    let event = change("server1.DEBEZIUM.DOCS", None, "oracle-lob-delete.json");
    assert_eq!((event.table.as_str(), event.op), ("DEBEZIUM.DOCS", Op::Delete));
    assert_eq!(event.before, Some(row(json!({"ID": 7}))));
    let rules = rules("version: 1\nrules:\n  - name: docs\n    table: DEBEZIUM.DOCS\n    cdn:\n      urls: [\"https://x.example/{SLUG}\"]\n");
    let eval = rules.evaluate(&event);
    assert!(eval.invalidations.items(crate::sink::ItemKind::Url).is_empty());
    assert_eq!(eval.errors.len(), 1, "{eval:?}");
}

// DecoderDifferences.mandatoryToastedValueBinaryPlaceholder: the bytes of the placeholder, which
// JsonConverter writes as base64, also in a Connect Decimal column (a TOASTed numeric): unknown,
// never decoded into a number.
#[test]
fn a_placeholder_in_a_decimal_column_is_unknown_not_a_number() {
    let value = br#"{"schema":{"type":"struct","fields":[{"type":"struct","field":"after","fields":[
        {"type":"int32","field":"id"},
        {"type":"bytes","field":"price","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}}]}]},
        "payload":{"before":null,"after":{"id":1,"price":"X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="},
        "source":{"schema":"public","table":"t"},"op":"u"}}"#;
    match decode("shop.public.t", None, Some(value)) {
        Ok(Decoded::Change(event)) => assert_eq!(event.after, Some(row(json!({"id": 1})))),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_custom_placeholder_is_unknown_too() {
    let value = br#"{"before":null,"after":{"id":1,"body":"N/A","raw":"Ti9B"},"source":{"schema":"public","table":"t"},"op":"u"}"#;
    let custom = Placeholders::new(Some("N/A"));
    match decode_with(&custom, "shop.public.t", None, Some(value)) {
        Ok(Decoded::Change(event)) => assert_eq!(event.after, Some(row(json!({"id": 1})))),
        other => panic!("{other:?}"),
    }
}

// sqlserver.adoc, the create event example (schema envelope; db + schema + table).
#[test]
fn sqlserver_create() {
    let event = change("server1.testDB.dbo.customers", None, "sqlserver-create.json");
    assert_eq!((event.table.as_str(), event.op), ("dbo.customers", Op::Insert));
    assert_eq!(event.after.as_ref().and_then(|a| a.get("id")), Some(&json!(1005)));
    let expected = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(1_559_729_468_470_000_000);
    assert_eq!(event.committed_at, Some(expected));
}

// mysql.adoc, "Temporal types" with time.precision.mode=connect (connectors/mysql.json here):
// Connect Date (days), Time (ms), Timestamp (ms); TIMESTAMP columns as ZonedTimestamp.
#[test]
fn mysql_connect_temporal_types_render_as_iso() {
    let event = change("shopdb.shop.orders", None, "mysql-connect-temporal.json");
    assert_eq!(event.table, "shop.orders");
    assert_eq!(
        event.after,
        Some(row(json!({
            "id": 1,
            "day": "2024-03-15",
            "at": "10:04:05.25",
            "local_ts": "2024-03-15T10:04:05.25",
            "zoned_ts": "2024-03-15T09:04:05.25Z"
        })))
    );
}

// postgresql.adoc, "Temporal types", and io/debezium/time/*.java SCHEMA_NAMEs: every Debezium
// temporal logical type.
#[test]
fn debezium_temporal_types_render_as_iso() {
    let event = change("shop.public.orders", None, "pg-adaptive-temporal.json");
    assert_eq!(
        event.after,
        Some(row(json!({
            "id": 1,
            "day": "2024-03-15",
            "at": "10:04:05.25",
            "at_ms": "10:04:05.25",
            "at_ns": "10:04:05.25",
            "local_ts": "2024-03-15T10:04:05.25",
            "local_ts_ms": "2024-03-15T10:04:05.25",
            "local_ts_ns": "2024-03-15T10:04:05.25",
            "zoned_ts": "2024-03-15T09:04:05.25Z",
            "zoned_t": "09:04:05Z",
            "iso_day": "2024-03-15",
            "iso_at": "10:04:05.25",
            "iso_ts": "2024-03-15T10:04:05.25"
        })))
    );
}

#[test]
fn without_a_schema_an_integer_date_stays_an_integer() {
    let value =
        br#"{"before":null,"after":{"id":1,"day":19797},"source":{"schema":"public","table":"orders"},"op":"c"}"#;
    match decode("shop.public.orders", None, Some(value)) {
        Ok(Decoded::Change(event)) => assert_eq!(event.after, Some(row(json!({"id": 1, "day": 19797})))),
        other => panic!("{other:?}"),
    }
}

// DefaultDeleteHandlingStrategy.java, `case TOMBSTONE: return afterDelegate.apply(record)`: the
// default delete handling keeps the row's schema with a null value; the key names the row.
#[test]
fn extract_new_record_state_default_delete_is_a_delete() {
    let event =
        change("shop.public.products", Some("key-products-42-schema.json"), "unwrap-delete-tombstone-mode.json");
    assert_eq!((event.table.as_str(), event.op), ("public.products", Op::Delete));
    assert_eq!(event.before, Some(row(json!({"id": 42}))));
    // Without a key there is no row to name: malformed (dead-lettered), never done.
    let err = decode("shop.public.products", None, Some(&fixture("unwrap-delete-tombstone-mode.json")));
    assert_eq!(err, Err(DecodeError::DeleteWithoutRow));
    // A true tombstone stays one: no value, or no schema.
    for value in [None, Some(&br#"{"schema":null,"payload":null}"#[..]), Some(&b"null"[..])] {
        match decode("shop.public.products", Some(br#"{"id":42}"#), value) {
            Ok(Decoded::NoChange(n)) => assert_eq!(n.kind, NoChangeKind::Tombstone),
            other => panic!("{other:?}"),
        }
    }
}

// event-flattening.adoc, the `delete.tombstone.handling.mode=rewrite` example.
#[test]
fn extract_new_record_state_rewrite_delete() {
    let event = change("dbserver1.public.t", None, "unwrap-delete-rewrite.json");
    assert_eq!((event.table.as_str(), event.op), ("public.t", Op::Delete));
    assert_eq!(event.before, Some(row(json!({"pk": 2, "cola": null}))));
}

// event-flattening.adoc, "Adding metadata": `add.fields=source.table` gives `__source_table`,
// which names the table even when a router renamed the topic.
#[test]
fn source_table_fields_name_the_table() {
    let event = change("shop.products_all", None, "unwrap-source-table.json");
    assert_eq!((event.table.as_str(), event.op), ("public.products_eu", Op::Update));
    assert_eq!(event.after, Some(row(json!({"id": 42, "slug": "blue-widget", "category_id": 7}))));
    let value = br#"{"id":1,"__source_db":"inventory","__source_table":"customers"}"#;
    match decode("routed.all", None, Some(value)) {
        Ok(Decoded::Change(event)) => assert_eq!(event.table, "inventory.customers"),
        other => panic!("{other:?}"),
    }
}

// mongodb.adoc, update event example (with pre-image).
#[test]
fn mongodb_update() {
    let event = change("fulfillment.inventory.customers", Some("mongodb-key-1004.json"), "mongodb-update.json");
    assert_eq!((event.table.as_str(), event.op), ("inventory.customers", Op::Update));
    assert_eq!(
        event.after,
        Some(row(
            json!({"_id": 1004, "first_name": "Anne Marie", "last_name": "Kretchmar", "email": "annek@noanswer.org"})
        ))
    );
    assert_eq!(event.before.as_ref().and_then(|b| b.get("first_name")), Some(&json!("unknown")));
}

// mongodb.adoc, delete event (no pre-image) and "Change event keys": `_id` from the key.
#[test]
fn mongodb_delete_takes_id_from_the_key() {
    let event =
        change("fulfillment.inventory.customers", Some("mongodb-key-1004.json"), "mongodb-delete-no-preimage.json");
    assert_eq!((event.table.as_str(), event.op), ("inventory.customers", Op::Delete));
    assert_eq!(event.before, Some(row(json!({"_id": 1004}))));
}

// mongodb.adoc, the key table's ObjectId row; extended JSON wrappers.
#[test]
fn mongodb_extended_json_values() {
    let event = change("fulfillment.inventory.orders", Some("mongodb-key-oid.json"), "mongodb-insert-oid.json");
    assert_eq!(
        event.after,
        Some(row(json!({
            "_id": "596e275826f08b2730779e1f",
            "qty": 3,
            "total": 1200,
            "placed": "2024-03-15T10:04:05.25Z"
        })))
    );
    let rules = rules("version: 1\nrules:\n  - name: orders\n    table: inventory.orders\n    redis:\n      keys: [\"order:{_id}:{placed}\"]\n");
    assert_eq!(
        rules.evaluate(&event).invalidations.items(crate::sink::ItemKind::RedisKey),
        ["order:596e275826f08b2730779e1f:2024-03-15T10:04:05.25Z"]
    );
}

// mongodb-event-flattening.adoc, "Adding metadata fields": `__collection` names the collection.
#[test]
fn mongodb_extract_new_document_state() {
    let event = change("fulfillment.inventory.customers", Some("mongodb-key-1004.json"), "mongodb-unwrapped.json");
    assert_eq!((event.table.as_str(), event.op), ("inventory.customers", Op::Update));
    assert_eq!(event.after.as_ref().and_then(|a| a.get("_id")), Some(&json!(1004)));
    assert!(event.after.as_ref().is_some_and(|a| !a.contains_key("id")), "{event:?}");
}

// topic-routing.adoc, "Ensure unique key": the router's key field is not a column.
#[test]
fn by_logical_table_router_key_field_is_dropped() {
    let event = change("myserver.mydb.customers_all_shards", Some("router-key.json"), "router-update.json");
    assert_eq!(event.table, "mydb.customers_shard1");
    for image in [&event.before, &event.after] {
        assert!(image.as_ref().is_some_and(|i| !i.contains_key("__dbz__sourceIdentifier")), "{event:?}");
    }
}

// postgresql.adoc, "Transaction metadata"; SchemaFactory.java, heartbeatValueSchema.
#[test]
fn transaction_metadata_and_heartbeats_change_nothing() {
    assert_eq!(no_change("shop.transaction", "transaction-begin.json"), NoChangeKind::Other);
    assert_eq!(no_change("shop.transaction", "transaction-end.json"), NoChangeKind::Other);
    assert_eq!(no_change("__debezium-heartbeat.shop", "heartbeat-schema.json"), NoChangeKind::Heartbeat);
    assert_eq!(no_change("renamed-heartbeats", "heartbeat-schema.json"), NoChangeKind::Heartbeat);
}

#[test]
fn confluent_framed_values_name_the_encoding() {
    // Magic byte 0, schema id 7 (big-endian), then Avro bytes.
    let value = [0u8, 0, 0, 0, 7, 2, 0x54];
    let err = decode("shop.public.products", None, Some(&value)).map_err(|e| e.to_string());
    assert_eq!(
        err,
        Err("the message value is in the Confluent wire format, schema id 7: set source.kafka.format to avro or auto"
            .to_owned())
    );
}

// The belt and braces: a placeholder that reaches a row by any path (here an event built by
// hand) is never rendered into an item; the rule reports it.
#[test]
fn a_rendered_item_holding_a_placeholder_is_a_rule_error() {
    let event = ChangeEvent {
        table: "public.products".into(),
        op: Op::Insert,
        before: None,
        after: Some(row(json!({"id": 42, "slug": "x-__debezium_unavailable_value"}))),
        committed_at: None,
        lsn: None,
    };
    let rules = rules(
        "version: 1\nrules:\n  - name: pages\n    table: public.products\n    redis:\n      keys: [\"product:{id}\"]\n    cdn:\n      urls: [\"https://shop.example.com/p/{slug}\"]\n",
    );
    let eval = rules.evaluate(&event);
    assert_eq!(eval.invalidations.items(crate::sink::ItemKind::RedisKey), ["product:42"]);
    assert!(eval.invalidations.items(crate::sink::ItemKind::Url).is_empty(), "{eval:?}");
    assert_eq!(eval.errors.len(), 1, "{eval:?}");
    assert!(eval.errors[0].message.contains("unavailable-value placeholder"), "{eval:?}");
}

// DefaultDeleteHandlingStrategy.java, handleDeleteRecord / handleTombstoneRecord: what each
// `delete.tombstone.handling.mode` puts on the topic for one deleted row (key `{"id":42}`),
// and what the decoder makes of it. `drop` writes nothing at all.
#[test]
fn extract_new_record_state_every_delete_mode() {
    let key = Some(&br#"{"id":42}"#[..]);
    let schema_null = fixture("unwrap-delete-tombstone-mode.json");
    let rewritten = br#"{"id":42,"slug":"blue-widget","__deleted":"true"}"#;
    let kinds = |messages: &[Option<&[u8]>]| -> Vec<String> {
        messages
            .iter()
            .map(|value| match decode("shop.public.products", key, *value) {
                Ok(Decoded::Change(event)) => {
                    format!("{}:{}", event.op, event.before.map(|b| b["id"].clone()).unwrap_or_default())
                }
                Ok(Decoded::NoChange(n)) => n.kind.as_str().to_owned(),
                Err(e) => e.to_string(),
            })
            .collect()
    };
    // tombstone (the default): the delete record keeps the value schema, its value null; the
    // connector's own tombstone is dropped.
    assert_eq!(kinds(&[Some(&schema_null)]), ["delete:42"]);
    // rewrite: the before image with `__deleted: "true"`, tombstone dropped.
    assert_eq!(kinds(&[Some(rewritten)]), ["delete:42"]);
    // rewrite-with-tombstone: the same, then the tombstone (no value).
    assert_eq!(kinds(&[Some(rewritten), None]), ["delete:42", "tombstone"]);
    // delete-to-tombstone: a true tombstone only (null schema and value): the delete is lost,
    // as the documentation says.
    assert_eq!(kinds(&[None]), ["tombstone"]);
}
