//! `source.kafka.format`: keys and values in the Confluent wire format (Avro or Protobuf through
//! a schema registry) read into the same JSON shape the JsonConverter writes, then decoded by the one
//! Debezium decoder, so a row renders identically whatever the encoding (the contract, "Other
//! encodings on Kafka").
//!
//! Fetching schemas ([`Codec::resolve`]) is async and happens before the message is tracked:
//! while the registry is down or answers 5xx, the message waits, unacknowledged, and nothing
//! after it is read (order is kept). Decoding ([`Codec::decode`]) is synchronous.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{KafkaConfig, KafkaFormat};
use crate::event::{Decoded, Row};
use crate::rules::{Projection, Rules};
use crate::shutdown::Shutdown;
use crate::source::debezium;
use crate::source::registry::{framed, Probe, RegisteredSchema, Registry, RegistryError};
use crate::source::{Malformed, SourceEvent};
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct Codec {
    format: KafkaFormat,
    registry: Option<Arc<Registry>>,
    /// The running rules, when the codec decodes only the columns they read (the daemon's
    /// Kafka source with the `json` format: [`Codec::projection`]).
    rules: Option<watch::Receiver<Arc<Rules>>>,
}

/// What the registry said about one part (key or value) of a message.
pub enum Part {
    /// Not Confluent-framed, or the format is `json` (nothing fetched).
    Plain,
    Schema(Arc<RegisteredSchema>),
    Failed(RegistryError),
}

pub struct Resolved {
    key: Part,
    value: Part,
}

impl Resolved {
    /// Nothing fetched: the `json` format.
    pub fn plain() -> Resolved {
        Resolved { key: Part::Plain, value: Part::Plain }
    }
}

impl Codec {
    /// The codec `source.kafka` configures; `metrics` counts the registry's requests.
    pub fn new(config: &KafkaConfig, metrics: Option<Arc<Metrics>>) -> Result<Codec, String> {
        let registry = match &config.schema_registry {
            Some(registry) if config.format != KafkaFormat::Json => {
                let registry = Registry::new(registry)?;
                Some(Arc::new(match metrics {
                    Some(metrics) => registry.with_metrics(metrics),
                    None => registry,
                }))
            }
            _ => None,
        };
        Ok(Codec { format: config.format, registry, rules: None })
    }

    /// The codec, following `rules`: with the `json` format it decodes only the columns the
    /// running rules read ([`Codec::projection`]). The daemon's Kafka source alone does this;
    /// `explain`, `check` and `replay` decode whole rows.
    pub(crate) fn following(self, rules: watch::Receiver<Arc<Rules>>) -> Codec {
        Codec { rules: Some(rules), ..self }
    }

    /// The start-up check of the registry (none for the `json` format). Credentials the
    /// registry rejects are an error: waiting will not fix them, and every message that needs a
    /// schema would wait forever. A registry that is down is only logged: the daemon runs,
    /// messages whose schema it needs wait (unacknowledged) and are retried until it is back.
    pub async fn check_registry(&self) -> Result<(), String> {
        let Some(registry) = &self.registry else {
            return Ok(());
        };
        match registry.probe().await {
            Probe::Reachable { schema_types } => {
                let wanted = match self.format {
                    KafkaFormat::Protobuf => Some("PROTOBUF"),
                    KafkaFormat::Avro => Some("AVRO"),
                    _ => None,
                };
                if let (Some(types), Some(wanted)) = (&schema_types, wanted) {
                    if !types.iter().any(|t| t == wanted) {
                        tracing::warn!(?types, wanted, "the schema registry does not list the format's schema type");
                    }
                }
                tracing::info!(?schema_types, "schema registry reachable");
                Ok(())
            }
            Probe::Rejected { status, body } => Err(rejected(status, &body)),
            Probe::Unreachable { reason } => {
                tracing::warn!(
                    %reason,
                    "schema registry unreachable at start: running anyway; messages that need a schema wait \
                     (unacknowledged) and are retried until it answers"
                );
                Ok(())
            }
        }
    }

    /// A codec on a given registry (for `explain` and tests).
    pub fn with_registry(format: KafkaFormat, registry: Option<Arc<Registry>>) -> Codec {
        Codec { format, registry, rules: None }
    }

    /// The columns to decode now ([`Codec::decode_projected`]): those the running rules read,
    /// when the codec follows them and the format is `json`; `None` for whole rows. Looked up
    /// once per burst of messages (a lock), not per message.
    ///
    /// Only the `json` format projects: its messages are decoded as they came, so that the
    /// pipeline can decode one again in full from its raw copy ([`unproject`]); an Avro or
    /// Protobuf message is decoded through its schema, and its key may be too.
    pub fn projection(&self) -> Option<Arc<Projection>> {
        let rules = self.rules.as_ref().filter(|_| self.format == KafkaFormat::Json)?;
        let projection = rules.borrow().projection().clone();
        Some(projection)
    }

    /// Fetches the schemas the message's key and value name. `None` when `shutdown` stopped
    /// intake while the registry was being retried: the message is then left unread.
    pub async fn resolve(&self, key: Option<&[u8]>, value: Option<&[u8]>, shutdown: &Shutdown) -> Option<Resolved> {
        let Some(registry) = &self.registry else {
            return Some(Resolved::plain());
        };
        let mut parts = [Part::Plain, Part::Plain];
        for (part, bytes) in parts.iter_mut().zip([key, value]) {
            if let Some((id, _)) = bytes.and_then(framed) {
                *part = match registry.schema_retrying(id, shutdown.stopping()).await? {
                    Ok(schema) => Part::Schema(schema),
                    Err(e) => Part::Failed(e),
                };
            }
        }
        let [key, value] = parts;
        Some(Resolved { key, value })
    }

    /// [`Codec::resolve`] without waiting: one attempt per schema (for `explain`).
    pub async fn resolve_once(&self, key: Option<&[u8]>, value: Option<&[u8]>) -> Resolved {
        let Some(registry) = &self.registry else {
            return Resolved::plain();
        };
        let mut parts = [Part::Plain, Part::Plain];
        for (part, bytes) in parts.iter_mut().zip([key, value]) {
            if let Some((id, _)) = bytes.and_then(framed) {
                *part = match registry.schema(id).await {
                    Ok(schema) => Part::Schema(schema),
                    Err(e) => Part::Failed(e),
                };
            }
        }
        let [key, value] = parts;
        Resolved { key, value }
    }

    /// [`Codec::decode`], the row images holding only the columns `projection` keeps when it
    /// is given and the format is `json` (`debezium::decode_projected`).
    pub fn decode_projected(
        &self,
        resolved: &Resolved,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        projection: Option<&Projection>,
    ) -> Result<Decoded, String> {
        match projection {
            Some(projection) if self.format == KafkaFormat::Json => {
                debezium::decode_projected(topic, key, value, projection).map_err(|e| e.to_string())
            }
            _ => self.decode(resolved, topic, key, value),
        }
    }

    /// Decodes the message; the error is the dead letter's reason.
    pub fn decode(
        &self,
        resolved: &Resolved,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Decoded, String> {
        if self.format == KafkaFormat::Json {
            return debezium::decode(topic, key, value).map_err(|e| e.to_string());
        }
        // A key that cannot be read is ignored, as a non-JSON key is on the JSON path: the value
        // alone is a complete event.
        let key_json = match (&resolved.key, key.and_then(framed)) {
            (Part::Schema(schema), Some((_, datum))) => read_json(schema, datum).ok(),
            (_, Some(_)) => None,
            (_, None) => key.map(<[u8]>::to_vec),
        };
        let value_json = match value {
            None => None,
            Some(bytes) => match (framed(bytes), &resolved.value) {
                (Some((id, datum)), Part::Schema(schema)) => {
                    let read = read_json(schema, datum).map_err(|e| {
                        format!("the message value ({}, schema id {id}) cannot be read: {e}", kind(schema))
                    })?;
                    // An Avro null value is a tombstone as a JSON null is.
                    (read != b"null").then_some(read)
                }
                (Some((id, _)), Part::Failed(e)) => {
                    return Err(format!("the message value's schema (id {id}) is not available: {e}"))
                }
                (Some((id, _)), Part::Plain) => {
                    return Err(format!("the message value's schema (id {id}) was not fetched"));
                }
                (None, _) if self.format == KafkaFormat::Auto => Some(bytes.to_vec()),
                (None, _) => {
                    let first = bytes.first().copied().unwrap_or(0);
                    return Err(format!(
                        "the message value is not in the Confluent wire format (first byte {first:#04x}, expected 0x00): \
                         set source.kafka.format to json or auto"
                    ));
                }
            },
        };
        debezium::decode(topic, key_json.as_deref(), value_json.as_deref()).map_err(|e| e.to_string())
    }
}

/// Makes sure `event` can be evaluated by the rules whose projection is `projection`: an event
/// whose rows were decoded for another rules load (one a reload replaced, or one loaded since,
/// while the event waited in the queue) may lack a column these rules read, so it is decoded
/// again from its raw message, with whole rows, as the `json` format decodes it (the only one
/// that projects: [`Codec::projection`]). The outcome is the one the codec would have given
/// without a projection. An event with whole rows, or rows decoded for these very rules, is
/// left alone (two comparisons).
pub fn unproject(event: &mut SourceEvent, projection: &Projection) {
    let Ok(Decoded::Change(change)) = &event.decoded else { return };
    let other = |row: &Option<Row>| row.as_ref().and_then(Row::projection).is_some_and(|id| id != projection.id());
    if !(other(&change.before) || other(&change.after)) {
        return;
    }
    let raw = &event.raw;
    event.decoded = match raw.topic.as_deref() {
        Some(topic) => {
            debezium::decode(topic, raw.key.as_deref(), raw.value.as_deref()).map_err(|e| Malformed(e.to_string()))
        }
        // Never so: only the Kafka source projects, and it keeps every message it decodes.
        None => Err(Malformed(
            "the message was decoded for other rules and cannot be decoded again: its raw copy names no topic".into(),
        )),
    };
}

/// `check --against-registry`: the start-up check of `run`, once, as a verdict. Exit 0 when the
/// registry answers and accepts the credentials, 1 when it rejects them or cannot be reached
/// (where `run` would start and wait), 2 when there is no registry to check.
pub fn check_cli(config: &crate::config::Config) -> std::process::ExitCode {
    use std::process::ExitCode;
    let kafka = config.source.kafka.as_ref().filter(|k| k.format != KafkaFormat::Json);
    let Some(registry_config) = kafka.and_then(|k| k.schema_registry.as_ref()) else {
        eprintln!("check --against-registry needs source.kafka.format avro, protobuf or auto and source.kafka.schema_registry");
        return ExitCode::from(2);
    };
    let registry = match Registry::new(registry_config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("source.kafka.schema_registry: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(registry.probe()) {
        Probe::Reachable { schema_types } => {
            match schema_types {
                Some(types) => println!("ok: the schema registry answers (schema types {})", types.join(", ")),
                None => println!("ok: the schema registry answers"),
            }
            ExitCode::from(0)
        }
        Probe::Rejected { status, body } => {
            eprintln!("source.kafka.schema_registry: {}", rejected(status, &body));
            ExitCode::from(1)
        }
        Probe::Unreachable { reason } => {
            eprintln!(
                "source.kafka.schema_registry: the registry cannot be reached ({}): `run` would start and make \
                 messages that need a schema wait",
                crate::redact::scrub(&reason)
            );
            ExitCode::from(1)
        }
    }
}

/// The sentence for credentials the registry refuses (at start and in `check`).
fn rejected(status: u16, body: &str) -> String {
    format!(
        "the schema registry rejected the credentials (HTTP {status}: {body}): check \
         source.kafka.schema_registry.basic_auth_user and basic_auth_password (_env, _file)"
    )
}

/// A framed datum (after the schema id) as the JSON text the Debezium decoder reads.
fn read_json(schema: &RegisteredSchema, datum: &[u8]) -> Result<Vec<u8>, String> {
    match schema {
        RegisteredSchema::Avro(avro) => avro.read_json(datum).map_err(|e| e.to_string()),
        RegisteredSchema::Protobuf(protobuf) => protobuf.read_json(datum).map_err(|e| e.to_string()),
        RegisteredSchema::Other(kind) => Err(format!(
            "{kind} in the Confluent wire format: this build decodes Avro and Protobuf (use the AvroConverter, \
             the ProtobufConverter or the JsonConverter)"
        )),
    }
}

fn kind(schema: &RegisteredSchema) -> &str {
    match schema {
        RegisteredSchema::Avro(_) => "Avro",
        RegisteredSchema::Protobuf(_) => "Protobuf",
        RegisteredSchema::Other(kind) => kind,
    }
}

#[cfg(test)]
mod tests {
    //! The Avro fixtures are the JsonConverter fixtures of tests/fixtures/debezium*/ serialised by
    //! Confluent's own AvroSerializer (scripts/gen-avro-fixtures.py): each must decode to exactly
    //! the event its JSON form decodes to.

    use std::path::PathBuf;

    use serde_json::Value;

    use crate::source::debezium::{self, AvroSchema};
    use crate::source::registry::framed;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn read(path: &str) -> Vec<u8> {
        std::fs::read(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn schemas() -> Value {
        serde_json::from_slice(&read("tests/fixtures/avro/schemas.json")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The Avro datum as the JSON bytes the decoder reads.
    fn avro_as_json(name: &str) -> Vec<u8> {
        let bytes = read(&format!("tests/fixtures/avro/{name}.avro"));
        let (id, datum) = framed(&bytes).unwrap_or_else(|| panic!("{name} is not Confluent-framed"));
        let schemas = schemas();
        let text = schemas[id.to_string()].as_str().unwrap_or_else(|| panic!("no schema {id}"));
        let schema = AvroSchema::parse(text).unwrap_or_else(|e| panic!("schema {id}: {e}"));
        let value = schema.read(datum).unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = schema.read_json(datum).unwrap_or_else(|e| panic!("{name}: {e}"));
        let reparsed: Value = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(reparsed, value, "{name}: the streamed JSON is the value read");
        text
    }

    /// Every non-key case of `manifest` decodes, read by `binary_as_json`, to what `expected`
    /// (the case's name and JSON fixture) decodes to; the key case is checked through what it
    /// does: the key-only delete of the products row.
    fn assert_cases_decode_as(
        manifest: &str,
        binary_as_json: impl Fn(&str) -> Vec<u8>,
        expected: impl Fn(&str, &[u8]) -> Vec<u8>,
    ) {
        let manifest: Value = serde_json::from_slice(&read(manifest)).unwrap_or_else(|e| panic!("{e}"));
        let cases = manifest.as_array().cloned().unwrap_or_default();
        assert!(cases.len() >= 6);
        let key_json = read("tests/fixtures/debezium-real/key-products-42-schema.json");
        let key_binary = binary_as_json("pg-key-42");
        for case in cases {
            let name = case["name"].as_str().unwrap_or_default();
            let topic = case["topic"].as_str().unwrap_or_default();
            let json = read(case["json"].as_str().unwrap_or_default());
            if case["key"].as_bool() == Some(true) {
                let json_event = debezium::decode(topic, Some(&json), None);
                let binary_event = debezium::decode(topic, Some(&key_binary), None);
                assert_eq!(binary_event, json_event, "{name}");
                continue;
            }
            let want = debezium::decode(topic, Some(&key_json), Some(&expected(name, &json)));
            let got = debezium::decode(topic, Some(&key_binary), Some(&binary_as_json(name)));
            assert!(want.is_ok(), "{name}: {want:?}");
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn avro_serializer_output_decodes_exactly_as_its_json_form() {
        assert_cases_decode_as("tests/fixtures/avro/manifest.json", avro_as_json, |_, json| json.to_vec());
    }

    /// The Protobuf fixture's schema, compiled with the files its references name (followed
    /// through schemas.json as the registry client follows them).
    fn protobuf_schema(id: u32) -> crate::source::debezium::ProtobufSchema {
        let all: Value =
            serde_json::from_slice(&read("tests/fixtures/protobuf/schemas.json")).unwrap_or_else(|e| panic!("{e}"));
        let entry = &all[id.to_string()];
        let mut imports = Vec::new();
        let mut pending: Vec<Value> = entry["references"].as_array().cloned().unwrap_or_default();
        while let Some(reference) = pending.pop() {
            let found = all.as_object().and_then(|m| {
                m.values().find(|s| s["subject"] == reference["subject"] && s["version"] == reference["version"])
            });
            let Some(found) = found else { panic!("reference {reference} is not in schemas.json") };
            pending.extend(found["references"].as_array().cloned().unwrap_or_default());
            imports.push((
                reference["name"].as_str().unwrap_or_default().to_owned(),
                found["schema"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        let text = entry["schema"].as_str().unwrap_or_else(|| panic!("no schema {id}"));
        crate::source::debezium::ProtobufSchema::compile(text, imports).unwrap_or_else(|e| panic!("schema {id}: {e}"))
    }

    /// The Protobuf message (after the schema id) as the JSON bytes the decoder reads.
    fn protobuf_as_json(name: &str) -> Vec<u8> {
        let bytes = read(&format!("tests/fixtures/protobuf/{name}.pb"));
        let (id, datum) = framed(&bytes).unwrap_or_else(|| panic!("{name} is not Confluent-framed"));
        protobuf_schema(id).read_json(datum).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn protobuf_serializer_output_decodes_exactly_as_its_json_form() {
        assert_cases_decode_as("tests/fixtures/protobuf/manifest.json", protobuf_as_json, |name, json| {
            if name != "pg-adaptive-temporal" {
                return json.to_vec();
            }
            // The converter writes no Connect name on primitive types, so Debezium's own
            // temporal types arrive as the numbers and strings the connector wrote: what the
            // JsonConverter writes without its schema (schemas.enable=false).
            let doc: Value = serde_json::from_slice(json).unwrap_or_else(|e| panic!("{e}"));
            serde_json::to_vec(&doc["payload"]).unwrap_or_default()
        });
    }

    #[test]
    fn protobuf_nulls_without_optional_for_nullables_read_as_defaults() {
        // The same message; only the optional.for.nullables setting of the converter differs.
        let with: Value = serde_json::from_slice(&protobuf_as_json("pg-update")).unwrap_or_default();
        let without: Value = serde_json::from_slice(&protobuf_as_json("pg-update-defaults")).unwrap_or_default();
        assert_eq!(with["source"]["xmin"], Value::Null);
        assert_eq!(without["source"]["xmin"], Value::from(0), "an unset int64 without presence is 0");
        assert_eq!(with["transaction"], Value::Null);
        assert_eq!(without["transaction"], Value::Null, "a message field has presence either way");
        assert_eq!(with["after"]["price"], Value::from("80.00"));
        assert_eq!(without["after"], with["after"]);
    }

    #[test]
    fn protobuf_events_carry_source_lsn() {
        let got = debezium::decode("shop.public.products", None, Some(&protobuf_as_json("pg-update")));
        let Ok(crate::event::Decoded::Change(change)) = got else { panic!("{got:?}") };
        assert_eq!(change.lsn, Some(24023184));
    }

    #[test]
    fn avro_decimal_renders_as_decimal_string() {
        let got = debezium::decode("shop.public.products", None, Some(&avro_as_json("pg-update")));
        let Ok(crate::event::Decoded::Change(change)) = got else { panic!("{got:?}") };
        let after = change.after.unwrap_or_default();
        assert_eq!(after.get("price"), Some(&Value::String("80.00".into())));
    }

    #[test]
    fn avro_events_carry_source_lsn_for_the_freshness_second_pass() {
        // pg-update.avro is pg-update-with-schema.json (source.lsn 24023184) through the
        // AvroSerializer: the LSN must come out of the binary form as it does out of the JSON one.
        let json = read("tests/fixtures/debezium/pg-update-with-schema.json");
        let lsn_of = |decoded| match decoded {
            Ok(crate::event::Decoded::Change(change)) => change.lsn,
            other => panic!("{other:?}"),
        };
        assert_eq!(lsn_of(debezium::decode("shop.public.products", None, Some(&json))), Some(24023184));
        assert_eq!(
            lsn_of(debezium::decode("shop.public.products", None, Some(&avro_as_json("pg-update")))),
            Some(24023184)
        );
        // A MySQL event has no LSN in either form.
        assert_eq!(
            lsn_of(debezium::decode("shopdb.shop.orders", None, Some(&avro_as_json("mysql-connect-temporal")))),
            None
        );
    }

    #[test]
    fn the_configured_format_decides_what_a_plain_or_framed_value_is() {
        use super::{Codec, Resolved};
        use crate::config::KafkaFormat;

        let json = read("tests/fixtures/debezium/pg-update-with-schema.json");
        let topic = "shop.public.products";
        let plain = Resolved::plain();
        let decode = |format, value: &[u8]| Codec::with_registry(format, None).decode(&plain, topic, None, Some(value));
        assert!(decode(KafkaFormat::Auto, &json).is_ok(), "auto reads JSON as JSON");
        assert_eq!(
            decode(KafkaFormat::Json, &json),
            debezium::decode(topic, None, Some(&json)).map_err(|e| e.to_string())
        );
        let err = decode(KafkaFormat::Avro, &json).unwrap_err();
        assert!(
            err.contains("not in the Confluent wire format (first byte 0x7b") && err.contains("json or auto"),
            "{err}"
        );
        let framed_bytes = read("tests/fixtures/avro/pg-update.avro");
        let err = decode(KafkaFormat::Json, &framed_bytes).unwrap_err();
        assert!(err.contains("Confluent wire format, schema id") && err.contains("avro or auto"), "{err}");
    }

    #[test]
    fn truncated_avro_is_an_error_naming_the_schema_id() {
        let bytes = read("tests/fixtures/avro/pg-update.avro");
        let Some((id, datum)) = framed(&bytes) else { panic!() };
        let schemas = schemas();
        let schema =
            AvroSchema::parse(schemas[id.to_string()].as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        for cut in [1, datum.len() / 2, datum.len() - 1] {
            assert!(schema.read(&datum[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// A codec that follows the rules ([`Codec::following`], as the daemon's Kafka source's
    /// does) takes the running rules' projection (a reload's once it is sent), with the `json`
    /// format only.
    #[test]
    fn the_codec_projects_the_running_rules_with_the_json_format_only() {
        use std::path::Path;
        use std::sync::Arc;

        use super::Codec;
        use crate::config::{KafkaConfig, KafkaFormat};
        use crate::event::Decoded;
        use crate::rules::Rules;

        let rules =
            |text: &str| Arc::new(Rules::parse(text, Path::new("rules.yaml")).unwrap_or_else(|e| panic!("{e}")));
        let first =
            rules("version: 1\nrules:\n  - name: a\n    table: public.products\n    redis: { keys: [\"p:{id}\"] }\n");
        let (tx, rx) = tokio::sync::watch::channel(first.clone());
        let following = |format: &str| {
            let config: KafkaConfig = serde_json::from_value(
                serde_json::json!({"brokers": "localhost:9092", "topics": ["t"], "format": format}),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            Codec::new(&config, None).unwrap_or_else(|e| panic!("{e}")).following(rx.clone())
        };
        let codec = following("json");
        assert_eq!(codec.projection().map(|p| p.id()), Some(first.projection().id()));
        let reloaded =
            rules("version: 1\nrules:\n  - name: b\n    table: public.products\n    redis: { keys: [\"s:{slug}\"] }\n");
        tx.send(reloaded.clone()).unwrap_or_else(|e| panic!("{e}"));
        let projection = codec.projection().unwrap_or_else(|| panic!("a projection"));
        assert_eq!(projection.id(), reloaded.projection().id());

        let value = read("tests/fixtures/debezium/pg-update-no-schema.json");
        let topic = "shop.public.products";
        let plain = super::Resolved::plain();
        let decoded = codec.decode_projected(&plain, topic, None, Some(&value), Some(&projection));
        let Ok(Decoded::Change(change)) = decoded else { panic!("{decoded:?}") };
        let after = change.after.unwrap_or_default();
        assert_eq!(after.projection(), Some(reloaded.projection().id()));
        assert_eq!(after.keys().collect::<Vec<_>>(), ["slug"]);

        // Another format never projects, whatever it is given.
        let auto = following("auto");
        assert!(auto.projection().is_none());
        let whole = auto.decode_projected(&plain, topic, None, Some(&value), Some(&projection));
        assert_eq!(whole, codec.decode(&plain, topic, None, Some(&value)));
        assert!(Codec::with_registry(KafkaFormat::Json, None).projection().is_none(), "no rules followed");
    }
}
