//! Debezium change events for tests, in the JSON shapes the connector emits.

use std::time::{SystemTime, UNIX_EPOCH};

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// A PostgreSQL insert into public.products (schemaless JsonConverter).
pub fn product_insert(id: i64, category: i64) -> String {
    format!(
        r#"{{"before":null,"after":{{"id":{id},"name":"Widget {id}","price":"1.00","category_id":{category},"slug":"widget-{id}"}},"source":{{"version":"2.7.3.Final","connector":"postgresql","name":"shop","ts_ms":{ts},"snapshot":"false","db":"shop","schema":"public","table":"products","txId":1,"lsn":1}},"op":"c","ts_ms":{ts},"transaction":null}}"#,
        ts = now_ms()
    )
}

/// A PostgreSQL update moving a product between categories.
pub fn product_update(id: i64, from: i64, to: i64) -> String {
    format!(
        r#"{{"before":{{"id":{id},"name":"Widget {id}","price":"1.00","category_id":{from},"slug":"widget-{id}"}},"after":{{"id":{id},"name":"Widget {id}","price":"2.00","category_id":{to},"slug":"widget-{id}"}},"source":{{"version":"2.7.3.Final","connector":"postgresql","name":"shop","ts_ms":{ts},"snapshot":"false","db":"shop","schema":"public","table":"products","txId":2,"lsn":2}},"op":"u","ts_ms":{ts},"transaction":null}}"#,
        ts = now_ms()
    )
}

/// The rules used by the pipeline tests.
pub const RULES: &str = r#"version: 1
rules:
  - name: product-pages
    table: public.products
    redis:
      keys: ["product:{id}"]
      tags: ["category:{category_id}"]
"#;
