//! Values the database did not send: the connector's "unavailable value" placeholder.
//!
//! Debezium writes `__debezium_unavailable_value` (its `unavailable.value.placeholder`) where it
//! has no value to give: PostgreSQL's unchanged TOASTed columns under REPLICA IDENTITY DEFAULT,
//! Oracle's LOB columns in `before` and unchanged LOBs in `after`. A bytes column gets the
//! placeholder's UTF-8 bytes, which JsonConverter writes as base64
//! (`X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==`), and an array or map column holds it as an
//! element. The PostgreSQL connector's tests (`DecoderDifferences.java`,
//! `PostgresDefaultValueConverterIT.java` in debezium/debezium) show three more spellings, all
//! recognised: a `uuid` column gets the name-based UUID of the text
//! (`b68a35a7-17ad-35b3-af2a-ae46edb4545a` for the default), an integer array the text's bytes
//! as numbers (`[95, 95, 100, …]`), a `json` column the text `{"<p>":"<p>"}`.
//!
//! Rendered into a key, any of these invalidates a key nobody uses while the real one stays
//! cached, so the decoder drops such a column from its image: it is then **unknown**, as an
//! absent column (the pgoutput source treats unchanged TOAST the same way), and a template
//! needing it renders from the other image or is a rule error.
//!
//! The belt and braces: [`Placeholders::found_in`] lets the rules engine refuse any rendered
//! item that still contains a known placeholder.

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use crate::event::Row;

/// Debezium's default `unavailable.value.placeholder` (`CommonConnectorConfig`).
pub const DEFAULT_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// The default placeholder in a `uuid` column (`DecoderDifferences.TOASTED_VALUE_UUID_STRING`).
const DEFAULT_UUID: &str = "b68a35a7-17ad-35b3-af2a-ae46edb4545a";

/// Nesting we look into for a placeholder inside arrays and maps; deeper values are not
/// searched (no connector nests one deeper than an array of arrays).
const MAX_DEPTH: usize = 8;

/// `source.debezium` in the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebeziumConfig {
    /// The connector's `unavailable.value.placeholder` when it is not Debezium's default. The
    /// default is recognised as well, always.
    #[serde(default)]
    pub unavailable_value_placeholder: Option<String>,
}

/// The placeholders recognised: each text and its base64 form.
#[derive(Debug, Clone)]
pub struct Placeholders {
    texts: Vec<String>,
    /// Each placeholder's bytes: an integer array column holds them as numbers.
    bytes: Vec<Vec<u8>>,
    /// The shortest text: a value shorter than this is none and holds none, which settles most
    /// values with one comparison (every column of every image is asked about).
    min_len: usize,
}

impl Placeholders {
    /// Debezium's default placeholder and, if given and not empty, a custom one.
    pub fn new(custom: Option<&str>) -> Placeholders {
        let mut texts = vec![DEFAULT_UUID.to_owned()];
        let mut bytes = Vec::with_capacity(2);
        for text in std::iter::once(DEFAULT_PLACEHOLDER).chain(custom.filter(|c| !c.is_empty())) {
            let encoded = STANDARD.encode(text.as_bytes());
            let json = serde_json::json!({ text: text }).to_string();
            for candidate in [text.to_owned(), encoded, json] {
                if !texts.contains(&candidate) {
                    texts.push(candidate);
                }
            }
            if !bytes.iter().any(|b: &Vec<u8>| b == text.as_bytes()) {
                bytes.push(text.as_bytes().to_vec());
            }
        }
        let min_len = texts.iter().map(String::len).min().unwrap_or(0);
        Placeholders { texts, bytes, min_len }
    }

    /// Whether `value` is a placeholder: one of the texts, or an array or map holding one.
    pub(crate) fn is_placeholder(&self, value: &Value) -> bool {
        self.holds(value, 0)
    }

    /// Whether a string value is a placeholder.
    pub(crate) fn is_placeholder_text(&self, s: &str) -> bool {
        s.len() >= self.min_len && self.texts.iter().any(|t| t == s)
    }

    fn holds(&self, value: &Value, depth: usize) -> bool {
        match value {
            Value::String(s) => self.is_placeholder_text(s),
            Value::Array(items) if self.is_byte_list(items) => true,
            Value::Array(items) if depth < MAX_DEPTH => items.iter().any(|v| self.holds(v, depth + 1)),
            Value::Object(map) if depth < MAX_DEPTH => map.values().any(|v| self.holds(v, depth + 1)),
            _ => false,
        }
    }

    fn is_byte_list(&self, items: &[Value]) -> bool {
        self.bytes.iter().any(|bytes| {
            bytes.len() == items.len() && bytes.iter().zip(items).all(|(b, v)| v.as_u64() == Some(u64::from(*b)))
        })
    }

    /// Drops every placeholder column from `row`, making it unknown in this image.
    pub(crate) fn strip(&self, row: &mut Row) {
        if row.values().any(|v| self.is_placeholder(v)) {
            row.retain(|_, v| !self.is_placeholder(v));
        }
    }

    /// Whether a rendered item contains a placeholder anywhere (a template that concatenates a
    /// placeholder into a key, however it got into the row).
    pub fn found_in(&self, item: &str) -> bool {
        item.len() >= self.min_len && self.texts.iter().any(|t| item.contains(t.as_str()))
    }
}

static CONFIGURED: OnceLock<Placeholders> = OnceLock::new();

/// Sets the process's placeholders from the config (`run`, `replay`, `check` call it once, after
/// loading the config). The placeholder is one value per deployment, like the connector setting
/// it mirrors; a second call keeps the first.
pub fn configure(config: &DebeziumConfig) {
    let _ = CONFIGURED.set(Placeholders::new(config.unavailable_value_placeholder.as_deref()));
}

/// The configured placeholders, or Debezium's default alone before [`configure`] (`explain`).
pub fn current() -> &'static Placeholders {
    static DEFAULT: OnceLock<Placeholders> = OnceLock::new();
    CONFIGURED.get().unwrap_or_else(|| DEFAULT.get_or_init(|| Placeholders::new(None)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recognises_text_base64_and_containers() {
        let p = Placeholders::new(None);
        assert!(p.is_placeholder(&json!("__debezium_unavailable_value")));
        assert!(p.is_placeholder(&json!("X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==")));
        assert!(p.is_placeholder(&json!(["__debezium_unavailable_value"])));
        assert!(p.is_placeholder(&json!({"k": "__debezium_unavailable_value"})));
        assert!(!p.is_placeholder(&json!("a__debezium_unavailable_value")));
        assert!(!p.is_placeholder(&json!(["x"])));
        // DecoderDifferences.java: the uuid and integer-array spellings.
        assert!(p.is_placeholder(&json!("b68a35a7-17ad-35b3-af2a-ae46edb4545a")));
        let ints: Vec<u8> = DEFAULT_PLACEHOLDER.bytes().collect();
        assert!(p.is_placeholder(&json!(ints)));
        assert!(!p.is_placeholder(&json!([95, 95])));
        // PostgresDefaultValueConverterIT.java: a json column.
        assert!(p.is_placeholder(&json!(r#"{"__debezium_unavailable_value":"__debezium_unavailable_value"}"#)));
        assert!(p.found_in("product:__debezium_unavailable_value"));
        assert!(!p.found_in("product:42"));

        let custom = Placeholders::new(Some("N/A"));
        assert!(custom.is_placeholder(&json!("N/A")));
        assert!(custom.is_placeholder(&json!("Ti9B")), "base64 of N/A");
        assert!(custom.is_placeholder(&json!("__debezium_unavailable_value")), "the default stays known");

        let mut row = match json!({"id": 1, "body": "__debezium_unavailable_value", "tags": ["__debezium_unavailable_value"]})
        {
            Value::Object(row) => Row::from(row),
            _ => unreachable!(),
        };
        p.strip(&mut row);
        assert_eq!(row.into_value(), json!({"id": 1}));
    }
}
