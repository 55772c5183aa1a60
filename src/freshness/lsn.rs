//! Debezium PostgreSQL events name their WAL position in `source.lsn` (a number), with or
//! without the JSON converter's `schema`/`payload` envelope. Read here, only when
//! `freshness.replicas` is set, so the decoder stays as it is.

use serde::Deserialize;

#[derive(Deserialize)]
struct Envelope {
    payload: Option<Body>,
    source: Option<Source>,
}

#[derive(Deserialize)]
struct Body {
    source: Option<Source>,
}

#[derive(Deserialize)]
struct Source {
    lsn: Option<serde_json::Value>,
}

/// `source.lsn` of a Debezium message value, when it has one (PostgreSQL connector). Other
/// connectors' messages, and anything unreadable, have none: their second pass falls back to
/// `sinks.timing.repeat_after`.
pub fn debezium_lsn(value: &[u8]) -> Option<u64> {
    let envelope: Envelope = serde_json::from_slice(value).ok()?;
    let source = envelope.source.or(envelope.payload.and_then(|p| p.source))?;
    match source.lsn? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::debezium_lsn;

    // The fixtures are the project's Debezium PostgreSQL samples (their sources are cited in
    // tests/fixtures/debezium/); one with the converter's schema envelope, one without.
    #[test]
    fn source_lsn_is_read_with_and_without_the_schema_envelope() {
        let plain = include_bytes!("../../tests/fixtures/debezium/pg-insert.json");
        assert_eq!(debezium_lsn(plain), Some(24023400));
        let enveloped = include_bytes!("../../tests/fixtures/debezium/pg-update-with-schema.json");
        assert_eq!(debezium_lsn(enveloped), Some(24023184));
    }

    #[test]
    fn messages_without_an_lsn_have_none() {
        assert_eq!(debezium_lsn(br#"{"before":null,"after":{"id":1},"source":{"connector":"mysql","file":"mysql-bin.000003","pos":154},"op":"c"}"#), None);
        assert_eq!(debezium_lsn(b"not json"), None);
    }
}
