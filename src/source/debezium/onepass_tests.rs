//! The one-pass fast paths (`onepass.rs`) against the general path: for every fixture, a set
//! of hand-made edge cases and thousands of mutated messages, decoding with the fast paths
//! gives exactly the general path's `Result<Decoded, DecodeError>`, and never panics.

use std::path::Path;

use super::{decode_general, decode_with, key_row, onepass, DecodeError, Placeholders, GENERAL_ONLY};
use crate::event::{Decoded, Row};

const TOPIC: &str = "shop.public.products";

/// Every `.json` file of both fixture directories, by name.
fn fixtures() -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    for dir in ["tests/fixtures/debezium", "tests/fixtures/debezium-real"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.extension().is_some_and(|ext| ext == "json") {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                all.push((name, bytes));
            }
        }
    }
    all.sort();
    assert!(all.len() >= 30, "fixtures found: {}", all.len());
    all
}

/// The keys messages are decoded with: none, the fixtures' and a few odd ones.
fn keys() -> Vec<Option<Vec<u8>>> {
    let mut keys: Vec<Option<Vec<u8>>> = vec![None];
    for (name, bytes) in fixtures() {
        if name.contains("key") {
            keys.push(Some(bytes));
        }
    }
    for key in [
        r#"{"id":42}"#,
        r#" { "id" : 7 , "name" : "x" } "#,
        r#"{"id":null}"#,
        r#"{"id":"42","id":43}"#,
        r#"{}"#,
        r#"null"#,
        r#""#,
        r#"42"#,
        r#"{"id":{"a":1}}"#,
        r#"{"id":[1]}"#,
        r#"{"id":1.5E3,"big":18446744073709551616,"neg":-0}"#,
        r#"{"__dbz__physicalTableIdentifier":"a.b","id":1}"#,
        r#"{"schema":{"type":"int64"},"payload":42}"#,
        r#"{"payload":1.5}"#,
        r#"{"source":1}"#,
        r#"{"i\u0064":1}"#,
        r#"{"id":"\u00e9\n"}"#,
        r#"{"id":1"#,
        r#"{"id":1}x"#,
        r#"{"id":01}"#,
    ] {
        keys.push(Some(key.as_bytes().to_vec()));
    }
    keys
}

/// The topics a fixture is decoded on.
const TOPICS: [&str; 4] = [TOPIC, "server1.testDB.dbo.customers", "__debezium-heartbeat.shop", "products"];

/// Decodes with and without the fast paths, asserts the outcomes are equal, and says whether
/// the fast path took the message.
fn same(placeholders: &Placeholders, topic: &str, key: Option<&[u8]>, value: &[u8]) -> bool {
    let general = decode_general(placeholders, topic, key, Some(value));
    let fast = decode_with(placeholders, topic, key, Some(value));
    assert_eq!(
        fast,
        general,
        "value {:?} key {:?} topic {topic}",
        String::from_utf8_lossy(value),
        key.map(String::from_utf8_lossy)
    );
    let took = onepass::decode(placeholders, topic, key, value, None);
    if let Some(took) = &took {
        assert_eq!(took, &general, "onepass::decode of {:?}", String::from_utf8_lossy(value));
    }
    let projected = super::projection_tests::same_projected(placeholders, topic, key, value, &general);
    PROJECTED.with(|n| n.set(n.get() + projected));
    took.is_some()
}

thread_local! {
    /// How many projected decodes in [`same`] had projected rows (the projection was used).
    static PROJECTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// [`PROJECTED`] since the last call.
fn projected_since() -> usize {
    PROJECTED.with(|n| n.replace(0))
}

/// The message key's row with and without the fast path; says whether the fast path took it.
fn same_key(key: &[u8]) -> bool {
    GENERAL_ONLY.with(|general| general.set(true));
    let general = key_row(Some(key));
    GENERAL_ONLY.with(|general| general.set(false));
    let fast = onepass::key_row(key);
    if let Some(fast) = &fast {
        assert_eq!(Some(fast), general.as_ref(), "key {:?}", String::from_utf8_lossy(key));
    }
    assert_eq!(key_row(Some(key)), general, "key {:?}", String::from_utf8_lossy(key));
    fast.is_some()
}

fn placeholder_sets() -> [Placeholders; 2] {
    [Placeholders::new(None), Placeholders::new(Some("N/A"))]
}

#[test]
fn debezium_onepass_fixtures_decode_as_the_general_path() {
    let mut took = Vec::new();
    for placeholders in placeholder_sets() {
        for (name, value) in fixtures() {
            for topic in TOPICS {
                for key in keys() {
                    // Twice: the first general decode caches a schema the fast path then uses.
                    for _ in 0..2 {
                        if same(&placeholders, topic, key.as_deref(), &value) && !took.contains(&name) {
                            took.push(name.clone());
                        }
                    }
                }
            }
        }
    }
    // Projected rows were compared too (each message with each rules file).
    let projected = projected_since();
    assert!(projected > 500, "projected decodes with projected rows: {projected}");
    // The fast path is taken where it is meant to be, schema envelopes included.
    for name in [
        "pg-update-no-schema.json",
        "pg-insert.json",
        "pg-delete-key-only.json",
        "pg-update-with-schema.json",
        "mysql-update.json",
        "pg-truncate.json",
        "sqlserver-create.json",
        // Flattened rows (`ExtractNewRecordState`), MongoDB's included.
        "unwrapped-update.json",
        "unwrapped-delete-rewrite.json",
        "unwrap-delete-rewrite.json",
        "unwrap-source-table.json",
        "mongodb-unwrapped.json",
    ] {
        assert!(took.iter().any(|t| t == name), "the fast path declined {name}; took {took:?}");
    }
}

#[test]
fn debezium_onepass_keys_read_as_the_general_path() {
    let mut took = 0;
    for key in keys().into_iter().flatten() {
        took += usize::from(same_key(&key));
    }
    assert!(took >= 8, "the fast path took {took} keys");
    assert!(same_key(br#"{"id":42}"#));
    assert!(same_key(br#"{"id":42,"__dbz__sourceIdentifier":"a"}"#));
}

/// A standard envelope around the given images, source fields and extra fields.
fn envelope(before: &str, after: &str, source: &str, rest: &str) -> String {
    format!(r#"{{"before":{before},"after":{after},"source":{{{source}}},"op":"u"{rest}}}"#)
}

const SOURCE: &str = r#""version":"2.7.3.Final","connector":"postgresql","name":"shop","ts_ms":1763821800123,"db":"shop","schema":"public","table":"products","txId":2,"lsn":2"#;

/// Hand-made edge cases, each decoded both ways on every topic with and without a key.
fn edge_cases() -> Vec<String> {
    let mut cases = Vec::new();
    let row = |value: &str| format!(r#"{{"id":42,"v":{value}}}"#);
    // Values in a row column.
    for value in [
        "1.50",
        "-0",
        "-0.0",
        "0",
        "-1",
        "1e5",
        "1E5",
        "1E+5",
        "1e-5",
        "1.5E-05",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "123456789012345678901234567890.123",
        "01",
        "1.",
        ".5",
        "-",
        "+1",
        "1e",
        "1e+",
        "NaN",
        "Infinity",
        "true",
        "false",
        "null",
        "tru",
        "nul",
        r#""""#,
        r#""plain""#,
        r#""a\"b""#,
        r#""back\\slash""#,
        r#""\/\b\f\n\r\t""#,
        r#""\u00e9\u0041""#,
        r#""\u0000""#,
        "\"é ü 日本 😀\"",
        r#""\ud83d\ude00""#,
        r#""\ud800""#,
        r#""\udc00x""#,
        r#""\q""#,
        r#""\u12""#,
        r#""\u12G4""#,
        "\"tab\there\"",
        "\"nul\u{0}\"",
        "\"del\u{7f}\"",
        r#""__debezium_unavailable_value""#,
        r#""X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==""#,
        r#""b68a35a7-17ad-35b3-af2a-ae46edb4545a""#,
        r#""N/A""#,
        r#""Ti9B""#,
        r#"{"a":1}"#,
        r#"["__debezium_unavailable_value"]"#,
        "[1,2]",
        "[]",
        "{}",
        r#"{"$serde_json::private::Number":"5"}"#,
    ] {
        cases.push(envelope(&row(value), &row(value), SOURCE, ""));
        cases.push(envelope("null", &row(value), SOURCE, r#","ts_ms":1"#));
    }
    // Images.
    for (before, after) in [
        ("null", "null"),
        ("{}", "{}"),
        (r#"{"id":1,"id":2}"#, r#"{"id":null,"id":3,"id":null}"#),
        (
            r#"{"id":1,"a":"__debezium_unavailable_value","a":2}"#,
            r#"{"id":1,"a":2,"a":"__debezium_unavailable_value"}"#,
        ),
        (r#"{"id":"__debezium_unavailable_value"}"#, r#"{"id":"N/A","x":"Ti9B"}"#),
        (r#"{"$serde_json::private::Number":"5"}"#, "null"),
        (r#"{"$serde_json::private::RawValue":"5"}"#, "null"),
        (r#"{"a\u0062c":1,"abc":2}"#, r#"{"\u0041":1}"#),
        ("5", "null"),
        (r#""text""#, "null"),
        ("[]", "null"),
        ("true", "null"),
        (r#"{"id":42,}"#, "null"),
        (r#"{"id":42 "x":1}"#, "null"),
        (r#"{"id"42}"#, "null"),
        (r#"{id:42}"#, "null"),
        (r#"{"id":42}}"#, "null"),
    ] {
        cases.push(envelope(before, after, SOURCE, ""));
    }
    // Source blocks.
    for source in [
        "",
        r#""schema":"public","table":"products""#,
        r#""db":"inventory","table":"customers""#,
        r#""table":"products""#,
        r#""schema":null,"db":null,"table":null"#,
        r#""schema":"","db":"shop","table":"""#,
        r#""schema":5,"table":"t""#,
        r#""schema":"s","table":{"a":1}"#,
        r#""schema":"s","table":["t"]"#,
        r#""schema":"p\u0075blic","table":"t\"x""#,
        r#""schema":"a","schema":"b","table":"t","table":"u""#,
        r#""db":"d","collection":"c""#,
        r#""db":"d","collection":null,"table":"t""#,
        r#""ts_ms":0,"ts_us":1763821800123456,"ts_ns":"1""#,
        r#""ts_ms":1.5,"ts_us":-5,"ts_ns":1e3"#,
        r#""ts_ms":99999999999999999999"#,
        r#""lsn":"123","table":"t""#,
        r#""lsn":0"#,
        r#""lsn":-1"#,
        r#""lsn":18446744073709551615"#,
        r#""lsn":{"x":[1,{"y":null}]}"#,
        r#""sequence":"[\"1\",\"2\"]","xmin":null,"snapshot":"false""#,
        r#""nested":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"#,
        r#""nested":[[[[[[[[[[1]]]]]]]]]]"#,
        r#""nested":{"a":{"b":[{"c":[]},{}]}}"#,
        r#""nested":[1,]"#,
        r#""nested":{"a":1,}"#,
        r#""nested":{"a" 1}"#,
        r#""nested":[1 2]"#,
        r#""nested":{1:2}"#,
        r#""t\u0061ble":"x""#,
    ] {
        cases.push(envelope("null", r#"{"id":1}"#, source, ""));
    }
    // Top-level fields and the envelope around them.
    let after = r#"{"id":1}"#;
    for op in
        [r#""c""#, r#""u""#, r#""d""#, r#""r""#, r#""t""#, r#""m""#, r#""x""#, r#""\u0075""#, "5", "null", r#""""#]
    {
        cases.push(format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":{op}}}"#));
        cases.push(format!(r#"{{"source":{{{SOURCE}}},"op":{op}}}"#));
        cases.push(format!(r#"{{"before":{after},"source":{{{SOURCE}}},"op":{op}}}"#));
    }
    for text in [
        format!(r#"{{"after":{after},"source":{{{SOURCE}}}}}"#),
        format!(r#"{{"after":{after},"op":"c"}}"#),
        format!(r#"{{"after":{after},"source":null,"op":"c"}}"#),
        format!(r#"{{"after":{after},"source":"s","op":"c"}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","op":"d"}}"#),
        format!(r#"{{"after":{after},"after":null,"source":{{{SOURCE}}},"op":"c"}}"#),
        format!(r#"{{"after":{after},"source":{{}},"source":{{{SOURCE}}},"op":"c"}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","transaction":{{"id":"1:2","total_order":1,"data_collection_order":1}}}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","ts_ms":1,"ts_us":2,"ts_ns":3}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","transaction":{{"$serde_json::private::Number":"x"}}}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","transaction":{{"$serde_json::private::Number":"1.5"}}}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","transaction":{{"$serde_json::private::RawValue":"[1"}}}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","transaction":{{"$serde_json::private::Number":"x"}}}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","ts_ms":[{{"$serde_json::private::Number":{{}}}}]}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","ts_ms":{{"$x":1}}}}"#),
        format!(r#"{{"after":{after},"source":{{"table":"t","x":{{"$serde_json::private::Number":"x"}}}},"op":"c"}}"#),
        format!(r#"{{"after":{{"$serde_json::private::RawValue":"[1"}},"source":{{{SOURCE}}},"op":"c"}}"#),
        format!(r#"{{"after":{{"id":1,"$serde_json::private::Number":"5"}},"source":{{{SOURCE}}},"op":"c"}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","__deleted":"false"}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","ddl":"x"}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c","schema":{{}},"payload":{{}}}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c"}}   "#),
        " \n\t\r{ \"after\" : { \"id\" : 1 , \"n\" : \"x\" } ,\n\"source\"\t:\r{ \"table\" : \"t\" , \"schema\" : \"s\" } , \"op\" : \"c\" } \n".to_owned(),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c"}},"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c"}}{{}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c",}}"#),
        format!(r#"{{"after":{after},"source":{{{SOURCE}}},"op":"c""#),
        format!("\u{c}{{\"after\":{after},\"source\":{{{SOURCE}}},\"op\":\"c\"}}"),
        r#"{"ts_ms":5}"#.to_owned(),
        r#"{"status":"BEGIN","id":"1","event_count":null,"ts_ms":5}"#.to_owned(),
        r#"{"id":1,"name":"flattened","__op":"c","__table":"t"}"#.to_owned(),
        r#"{"schema":{"type":"struct","fields":[]},"payload":null}"#.to_owned(),
        "null".to_owned(),
        "[]".to_owned(),
        "5".to_owned(),
        "".to_owned(),
        "   ".to_owned(),
        "{".to_owned(),
        "}".to_owned(),
    ] {
        cases.push(text);
    }
    cases.extend(flat_edge_cases());
    cases
}

/// A flattened row's columns, before and after the `__` fields in the cases below.
const FLAT_ROW: &str = r#""id":42,"name":"Blue Widget","price":"80.00""#;

/// Hand-made flattened rows (`ExtractNewRecordState`): every `__` field with values of every
/// kind, columns named like the envelope's fields, and heartbeats, transaction markers,
/// envelopes and schema envelopes in disguise.
fn flat_edge_cases() -> Vec<String> {
    let mut cases = Vec::new();
    let values = [
        r#""c""#,
        r#""u""#,
        r#""d""#,
        r#""r""#,
        r#""t""#,
        r#""m""#,
        r#""x""#,
        r#""\u0064""#,
        r#""""#,
        r#""true""#,
        r#""false""#,
        r#""TRUE""#,
        "true",
        "false",
        "null",
        "0",
        "1",
        "-5",
        "1.5",
        "1e3",
        "1763821806000",
        "1763821806000123",
        "99999999999999999999",
        r#""1763821806000""#,
        r#""products""#,
        r#""public""#,
        r#""__debezium_unavailable_value""#,
        "{}",
        "[]",
        r#"{"a":1}"#,
    ];
    let fields = [
        "__op",
        "__table",
        "__source_table",
        "__schema",
        "__source_schema",
        "__db",
        "__source_db",
        "__collection",
        "__source_collection",
        "__deleted",
        "__source_ts_ns",
        "__source_ts_us",
        "__source_ts_ms",
        "__lsn",
        "__source_connector",
        "__",
        "___x",
    ];
    for field in fields {
        for value in values {
            cases.push(format!(r#"{{{FLAT_ROW},"{field}":{value}}}"#));
        }
        // Alone, first, and twice (the same value and another).
        cases.push(format!(r#"{{"{field}":"d"}}"#));
        cases.push(format!(r#"{{"{field}":"true",{FLAT_ROW}}}"#));
        cases.push(format!(r#"{{{FLAT_ROW},"{field}":"d","{field}":"d"}}"#));
        cases.push(format!(r#"{{{FLAT_ROW},"{field}":"c","id":1,"{field}":"d"}}"#));
    }
    // Whole rows as Debezium writes them, and their variations.
    for meta in [
        r#""__op":"u","__table":"products","__schema":"public","__source_ts_ms":1763821806000,"__deleted":"false""#,
        r#""__op":"d","__table":"products","__schema":"public","__source_ts_ms":1763821807000,"__deleted":"true""#,
        r#""__op":"c","__deleted":true"#,
        r#""__op":"c","__deleted":"true""#,
        r#""__op":"d","__deleted":"false""#,
        r#""__op":"u","__deleted":false"#,
        r#""__deleted":"true""#,
        r#""__deleted":"false""#,
        r#""__op":"t","__table":"products""#,
        r#""__op":"m","__source_ts_ms":5"#,
        r#""__op":"q","__table":5"#,
        r#""__table":5,"__op":"q""#,
        r#""__op":5,"__table":"t""#,
        r#""__op":"c","__db":"inventory","__table":"customers""#,
        r#""__op":"c","__db":"inventory","__schema":"","__table":"customers""#,
        r#""__op":"c","__db":"","__schema":"","__table":"""#,
        r#""__op":"c","__source_db":"inventory","__source_table":"customers","__source_ts_us":1763821806000123"#,
        r#""__op":"c","__source_ts_ns":1763821806000123456,"__source_ts_us":1,"__source_ts_ms":2"#,
        r#""__op":"c","__source_ts_ns":"1","__source_ts_us":1.5,"__source_ts_ms":-1"#,
        r#""__op":"u","__db":"inventory","__collection":"customers""#,
        r#""__op":"u","__source_collection":"c","__table":"t""#,
        r#""__op":"u","__collection":null"#,
        r#""__op":"u","__table":"t\"x","__schema":"s\u00e9""#,
        r#""\u005f_op":"d","__table":"t""#,
        r#""_\u005fop":"d","__op":"d""#,
    ] {
        cases.push(format!(r#"{{{FLAT_ROW},{meta}}}"#));
        cases.push(format!(r#"{{{meta},{FLAT_ROW}}}"#));
    }
    // Columns: names like the envelope's fields and the markers', values of every kind.
    for column in [
        r#""op":"c""#,
        r#""before":1"#,
        r#""after":"x""#,
        r#""after":null"#,
        r#""before":{"id":1}"#,
        r#""source":"s""#,
        r#""source":{"table":"t"}"#,
        r#""source":null"#,
        r#""ts_ms":5"#,
        r#""ts_us":5"#,
        r#""ts_ns":5"#,
        r#""transaction":null"#,
        r#""ddl":"x""#,
        r#""tableChanges":"x""#,
        r#""status":"BEGIN""#,
        r#""status":"BEGIN","event_count":1"#,
        r#""status":"END","data_collections":null"#,
        r#""event_count":1"#,
        r#""data_collections":"x""#,
        r#""schema":"x""#,
        r#""payload":"x""#,
        r#""schema":{},"payload":{"id":1}"#,
        r#""$serde_json::private::Number":"5""#,
        r#""$serde_json::private::RawValue":"5""#,
        r#""\u0073ource":"s""#,
        r#""ts_\u006ds":5"#,
        r#""i\u0064":7"#,
        r#""v":"\ud83d\ude00""#,
        r#""v":"\u00e9\n""#,
        r#""v":-0"#,
        r#""v":1.50"#,
        r#""v":1E5"#,
        r#""v":18446744073709551616"#,
        r#""v":[1]"#,
        r#""v":{"a":1}"#,
        r#""v":"N/A""#,
        r#""v":"__debezium_unavailable_value""#,
        r#""id":null"#,
        r#""id":"__debezium_unavailable_value""#,
        r#""id":1,"id":2"#,
    ] {
        cases.push(format!(r#"{{{column},"__op":"c"}}"#));
        cases.push(format!(r#"{{"__op":"u",{column},"x":1}}"#));
        cases.push(format!(r#"{{{column}}}"#));
        cases.push(format!(r#"{{{column},"x":1}}"#));
    }
    // Heartbeats, markers and schema envelopes in disguise; whitespace; broken objects.
    for text in [
        r#"{"ts_ms":5}"#,
        r#"{"ts_ms":5,"ts_ms":6}"#,
        r#"{"ts_ms":5,"__op":"c"}"#,
        r#"{"ts_ms":5,"id":1}"#,
        r#"{"status":"BEGIN","id":"1","event_count":2,"data_collections":null}"#,
        r#"{"status":"END","id":"1","data_collections":[],"__op":"c"}"#,
        r#"{"id":1,"status":"BEGIN","event_count":null}"#,
        r#"{"id":1,"status":"BEGIN"}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"int32","field":"id"}]},"payload":{"id":1,"__op":"c","__deleted":"false"}}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"int32","field":"id"}]},"payload":{"id":1,"__deleted":"true"}}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"int32","field":"id"}]},"payload":{"id":1,"ts_ms":1}}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"int32","field":"id"}]},"payload":{"id":"N/A","x":"__debezium_unavailable_value"}}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"int32","field":"id"}]},"payload":{}}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"int32","field":"id"}]},"payload":5}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"int32","field":"id"}]},"payload":{"id":1,"__op":"c"},"x":1}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"2"},"field":"price"}]},"payload":{"id":1,"price":"AfQ=","__op":"u"}}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"2"},"field":"price"}]},"payload":{"id":1,"price":"!!","__op":"u"}}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"2"},"field":"price"}]},"payload":{"id":1,"price":"__debezium_unavailable_value","__op":"u"}}"#,
        r#"{"schema":{"type":"struct","fields":[{"type":"int32","name":"io.debezium.time.Date","field":"day"}]},"payload":{"day":19000,"__op":"c"}}"#,
        r#"{}"#,
        r#"{"__op":"c"}"#,
        " \n{ \"id\" : 1 ,\t\"__op\" : \"c\" ,\r\"__table\" : \"t\" } \n",
        r#"{"id":1,"__op":"c",}"#,
        r#"{"id":1,"__op":"c"}x"#,
        r#"{"id":1,"__op":"c"}}"#,
        r#"{"id":1 "__op":"c"}"#,
        r#"{"id":1,"__op":"c""#,
        r#"{"id":01,"__op":"c"}"#,
        r#"{"id":1,"__op":"\q"}"#,
        r#"{"id":1,"__op":"\ud800"}"#,
        r#"{"id":1,__op:"c"}"#,
    ] {
        cases.push(text.to_owned());
    }
    cases
}

#[test]
fn debezium_onepass_edge_cases_decode_as_the_general_path() {
    let mut took = 0;
    for placeholders in placeholder_sets() {
        for case in edge_cases() {
            for topic in TOPICS {
                for key in [
                    None,
                    Some(&br#"{"id":42}"#[..]),
                    Some(&br#"{"id":null,"x":"\u00e9"}"#[..]),
                    Some(&br#"{"id":7,"__dbz__physicalTableIdentifier":"a","v":"k"}"#[..]),
                    Some(&br#"{"id":1,"id":"__debezium_unavailable_value"}"#[..]),
                    Some(&br#"{"id":1"#[..]),
                ] {
                    took += usize::from(same(&placeholders, topic, key, case.as_bytes()));
                }
            }
        }
    }
    assert!(took > 200, "the fast path took {took} cases");
    let projected = projected_since();
    assert!(projected > 1_000, "projected decodes with projected rows: {projected}");
    // Truncated messages: every prefix of a message the fast path takes.
    let full = envelope(r#"{"id":42,"v":"a\"b","n":1.5e3}"#, r#"{"id":42,"v":null}"#, SOURCE, r#","ts_ms":1"#);
    let placeholders = Placeholders::new(None);
    assert!(same(&placeholders, TOPIC, None, full.as_bytes()));
    for end in 0..full.len() {
        assert!(!same(&placeholders, TOPIC, None, &full.as_bytes()[..end]), "took a truncated message");
    }
    // Every prefix of a flattened row the fast path takes.
    let flat = format!(
        r#"{{{FLAT_ROW},"v":"a\"b","n":1.5e3,"__op":"u","__table":"products","__source_ts_ms":1763821806000,"__deleted":"false"}}"#
    );
    assert!(same(&placeholders, TOPIC, None, flat.as_bytes()));
    for end in 0..flat.len() {
        assert!(!same(&placeholders, TOPIC, None, &flat.as_bytes()[..end]), "took a truncated flattened row");
    }
    // Bytes that are not UTF-8, in a string and outside one.
    for (at, byte) in [(30, 0xFF), (10, 0xC3), (1, 0x80)] {
        let mut bytes = full.clone().into_bytes();
        bytes.insert(at, byte);
        assert!(!same(&placeholders, TOPIC, None, &bytes));
    }
}

#[test]
fn debezium_onepass_reproduces_serde_json_numbers() {
    // The texts serde_json keeps under `arbitrary_precision`, and that the fast path does.
    for (text, kept) in [
        ("1.50", "1.50"),
        ("-0", "-0"),
        ("1e5", "1e+5"),
        ("1E5", "1e+5"),
        ("1E+5", "1e+5"),
        ("1e-5", "1e-5"),
        ("18446744073709551616", "18446744073709551616"),
        ("18446744073709551615", "18446744073709551615"),
        ("-9223372036854775809", "-9223372036854775809"),
        ("0", "0"),
    ] {
        let value = format!(r#"{{"after":{{"n":{text}}},"source":{{"table":"t"}},"op":"c"}}"#);
        let placeholders = Placeholders::new(None);
        assert!(same(&placeholders, TOPIC, None, value.as_bytes()), "{text}");
        let Some(Ok(Decoded::Change(event))) = onepass::decode(&placeholders, TOPIC, None, value.as_bytes(), None)
        else {
            panic!("{text} not decoded");
        };
        let n = event.after.as_ref().and_then(|row: &Row| row.get("n")).and_then(|n| n.as_number().cloned());
        assert_eq!(n.as_ref().map(serde_json::Number::as_str), Some(kept), "{text}");
    }
}

/// A small linear congruential generator: deterministic, no dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes a mutation inserts or writes: JSON's structure, escapes, number and literal parts,
/// whitespace, and bytes that are not UTF-8 or are control characters.
const ALPHABET: &[u8] = b"{}[],:\"\\ \n\t0123456789-+.eEtrufalsn/bu\x00\x01\x7f\xc3\xa9\xff";

fn mutate(rng: &mut Lcg, base: &[u8]) -> Vec<u8> {
    let mut bytes = base.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(bytes.len() + 1);
        let byte = if rng.below(4) == 0 { rng.next() as u8 } else { ALPHABET[rng.below(ALPHABET.len())] };
        match rng.below(5) {
            0 if at < bytes.len() => bytes[at] = byte,
            1 if at < bytes.len() => {
                bytes.remove(at);
            }
            2 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
            3 => {
                // Repeat a short stretch (duplicates a field or a value now and then).
                let len = rng.below(24).min(bytes.len() - at.min(bytes.len()));
                let stretch: Vec<u8> = bytes[at..at + len].to_vec();
                bytes.splice(at..at, stretch);
            }
            _ => bytes.insert(at, byte),
        }
    }
    bytes
}

#[test]
fn debezium_onepass_mutated_messages_decode_as_the_general_path() {
    let mut bases: Vec<Vec<u8>> = fixtures().into_iter().map(|(_, bytes)| bytes).collect();
    bases.push(
        envelope(
            r#"{"id":42,"name":"Widget 42","price":"1.00","category_id":5,"slug":"widget-42"}"#,
            r#"{"id":42,"name":"Widget 42","price":"2.00","category_id":7,"slug":"widget-42"}"#,
            SOURCE,
            r#","ts_ms":1763821800151,"transaction":null"#,
        )
        .into_bytes(),
    );
    bases.push(
        envelope(r#"{"id":-0,"v":"a\"b\u00e9","n":1.5E3,"b":true}"#, "null", SOURCE, r#","ts_ns":1"#).into_bytes(),
    );
    for meta in [
        r#""__op":"u","__table":"products","__schema":"public","__db":"shop","__source_ts_ms":1763821806000,"__source_ts_us":1763821806000123,"__deleted":"false""#,
        r#""__op":"d","__source_table":"products","__source_schema":"public","__source_ts_ns":1763821806000123456,"__deleted":"true""#,
        r#""__op":"c","__db":"inventory","__collection":"customers","__deleted":false"#,
    ] {
        bases.push(
            format!(r#"{{{FLAT_ROW},"category_id":7,"v":"a\"b","n":-1.5E3,"b":true,"z":null,{meta}}}"#).into_bytes(),
        );
        bases.push(format!(r#"{{{meta},"ts_ms":1,"status":"BEGIN","id":"1","event_count":2}}"#).into_bytes());
    }
    let key_bases: [&[u8]; 3] = [br#"{"id":42}"#, br#"{"id":42,"__dbz__x":"a"}"#, br#"{"id":"k","n":-1.5e3}"#];
    let placeholders = Placeholders::new(None);
    let mut rng = Lcg(0x5eed_1234);
    let (mut cases, mut took) = (0, 0);
    for base in &bases {
        for _ in 0..200 {
            let value = mutate(&mut rng, base);
            let key = key_bases[rng.below(key_bases.len())];
            let key = if rng.below(3) == 0 { mutate(&mut rng, key) } else { key.to_vec() };
            took += usize::from(same(&placeholders, TOPIC, Some(&key), &value));
            same_key(&key);
            cases += 1;
        }
    }
    assert!(cases >= 7_000, "{cases} cases");
    // Many mutations leave a message the fast path takes (a changed digit or letter): they
    // check the values it builds, not just that it declines.
    assert!(took > cases / 20, "the fast path took {took} of {cases}");
    let projected = projected_since();
    assert!(projected > took, "projected decodes with projected rows: {projected}");
    println!("mutations: the fast path took {took} of {cases}");
}

#[test]
fn debezium_onepass_declines_what_it_does_not_handle() {
    let placeholders = Placeholders::new(None);
    let declined = |value: &str| onepass::decode(&placeholders, TOPIC, None, value.as_bytes(), None).is_none();
    let after = r#"{"id":1}"#;
    assert!(!declined(&format!(r#"{{"after":{after},"source":{{"table":"t"}},"op":"c"}}"#)));
    assert!(declined(r#"{"after":{"id":[1]},"source":{"table":"t"},"op":"c"}"#), "nested column");
    assert!(declined(&format!(r#"{{"after":{after},"source":{{"table":"t"}},"op":"c","x":1}}"#)), "other field");
    assert!(declined(&format!(r#"{{"after":{after},"after":null,"source":{{"table":"t"}},"op":"c"}}"#)), "duplicate");
    assert!(declined(&format!(r#"{{"after":{after},"source":{{"table":"t"}},"op":"\u0063"}}"#)), "escaped op");
    assert!(declined(r#"{"after":{"v":"\ud83d\ude00"},"source":{"table":"t"},"op":"c"}"#), "surrogates");
    assert!(declined(&format!(r#"{{"after":{after},"source":{{"table":"t"}},"op":"c"}}"#).replace('}', "} ")[..20]));
    let value = format!(r#"{{"after":{after},"source":{{"table":"t"}},"op":"c"}}"#);
    assert!(onepass::decode(&placeholders, "__debezium-heartbeat.x", None, value.as_bytes(), None).is_none());
    // Flattened rows: plain columns and `__` fields are taken, anything else declines.
    assert!(!declined(r#"{"id":1,"name":"x","__op":"c","__table":"t","__deleted":"false"}"#));
    assert!(!declined(r#"{"id":1,"name":"x"}"#), "a flattened row without metadata");
    assert!(!declined(r#"{"id":1,"op":"c","after":5,"before":null}"#), "envelope names without source");
    assert!(declined(r#"{"id":1,"__op":"c","__op":"c"}"#), "duplicate __ field");
    assert!(declined(r#"{"id":1,"__op":"c","v":{"a":1}}"#), "nested column");
    assert!(declined(r#"{"id":1,"__op":"c","v":[1]}"#), "array column");
    assert!(declined(r#"{"id":1,"__table":{"a":1}}"#), "nested __ field");
    assert!(declined(r#"{"ts_ms":5}"#), "heartbeat");
    assert!(declined(r#"{"id":1,"ts_ms":5}"#), "ts_ms column");
    assert!(declined(r#"{"id":"1","status":"BEGIN","event_count":2}"#), "transaction marker");
    assert!(declined(r#"{"id":"1","status":"END","data_collections":null}"#), "transaction marker");
    assert!(declined(r#"{"id":1,"source":"s","__op":"c"}"#), "source column");
    assert!(declined(r#"{"id":1,"schema":"s"}"#), "schema column");
    assert!(declined(r#"{"id":1,"payload":"p"}"#), "payload column");
    assert!(declined(r#"{"id":1,"\u0073ource":"s"}"#), "escaped source column");
    assert!(declined(r#"{}"#), "empty object");
    let unknown_flat = r#"{"id":1,"__op":"x"}"#;
    assert!(matches!(
        onepass::decode(&placeholders, TOPIC, None, unknown_flat.as_bytes(), None),
        Some(Err(DecodeError::UnknownOp { field: "__op", .. }))
    ));
    // An error the general path reports is its own.
    let unknown = format!(r#"{{"after":{after},"source":{{"table":"t"}},"op":"x"}}"#);
    assert!(matches!(
        onepass::decode(&placeholders, TOPIC, None, unknown.as_bytes(), None),
        Some(Err(DecodeError::UnknownOp { .. }))
    ));
}
