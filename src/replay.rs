//! `cdc-invalidator replay`: runs dead-lettered events (or any Debezium messages) again through
//! the current rules and sinks, after the cause was fixed.
//!
//! ```text
//! input (file lines | Kafka topic) ──▶ read_record ──▶ debezium::decode ──▶ pipeline::Pipeline ──▶ sinks
//!   a dead-letter record: original key, value and topic      (the daemon's own pipeline: batching,
//!   anything else: one Debezium message value                 layers, dead letters, metrics)
//!                                   └── --dry-run: explain::explanation, printed, nothing touched
//! ```
//!
//! Every input item is either a dead-letter record (as written by [`crate::dead_letter`]:
//! recognised by its `dead_lettered_at_ms` and `reason` fields; the original bytes come back with
//! [`dead_letter::bytes_of`]) or a Debezium message value as the connector wrote it (`null` is a
//! tombstone). A line that is neither (not JSON, a record without its value, an event that does
//! not decode) is reported on stderr with its line number (or Kafka position) and skipped: it is
//! not sent to the sinks and not dead-lettered again, so the input stays its only record.
//!
//! A file is read up to the length it had when replay started, so replaying the daemon's own
//! dead-letter file while events that fail again are appended to it cannot loop. A Kafka topic
//! is read from the beginning of every partition up to the high watermark seen at start, with
//! partitions assigned (no consumer group offsets are committed, the daemon's group is untouched).
//!
//! Exit codes (documented in the README and `docs/operations.md`): 0 every record was replayed
//! and finished; 3 finished, but some lines were skipped as bad or some events were dead-lettered
//! again (in `--dry-run`: would have rule errors); 2 invalid config, rules or arguments; 1 a fatal
//! error (input unreadable, a sink failed fatally, interrupted before every event finished).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::app::{self, Pipeline};
use crate::config::Config;
use crate::dead_letter::{self, DeadLetters};
use crate::event::Decoded;
use crate::rules::Rules;
use crate::shutdown::{self, Shutdown};
use crate::source::{Ack, Finished, Position, RawMessage, SourceEvent};
use crate::telemetry::Metrics;

/// Exit code when replay finished but left something for the operator to look at.
pub const INCOMPLETE: u8 = 3;
const OK: u8 = 0;
const FAILED: u8 = 1;

/// Where the records come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A JSON-lines file: dead-letter records or Debezium message values, one per line.
    File(PathBuf),
    /// A Kafka topic (the dead-letter topic, or a Debezium topic), on the source's cluster.
    Kafka { topic: String },
}

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct Options {
    pub input: Input,
    /// The topic of plain Debezium messages (names the table for flattened events and tells
    /// heartbeats apart); dead-letter records carry their own.
    pub topic: Option<String>,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    App(#[from] app::AppError),
    #[error(transparent)]
    DeadLetter(#[from] dead_letter::DeadLetterError),
    #[error("interrupted: {0} replayed events were not finished (run replay again)")]
    Interrupted(usize),
    /// `source.kafka.schema_registry` unusable (CA file, client).
    #[error("source.kafka.schema_registry: {0}")]
    Registry(String),
}

/// One item read from the input, before decoding.
struct Item {
    position: Position,
    /// The message's own topic and key when it came from Kafka.
    topic: Option<String>,
    key: Option<Vec<u8>>,
    bytes: Option<Vec<u8>>,
}

/// What happened to the records, for the summary and the exit code.
#[derive(Debug, Default)]
pub struct Summary {
    pub read: usize,
    /// Positions (`line 3`, `topic[0]@5`) of skipped records, with the reason.
    pub bad: Vec<(String, String)>,
    pub invalidated: u64,
    pub no_match: u64,
    pub no_change: u64,
    /// Dead-lettered again (rule errors, sink rejections); in dry-run: would have rule errors.
    pub dead_lettered: u64,
}

impl Summary {
    pub fn exit_code(&self) -> u8 {
        if self.bad.is_empty() && self.dead_lettered == 0 {
            OK
        } else {
            INCOMPLETE
        }
    }

    fn print(&self, dry_run: bool) {
        let verb = if dry_run { "would be " } else { "" };
        eprintln!(
            "replay{}: {} records read: {} {verb}invalidated, {} matched no rule, {} carried no change, {} {}, {} bad records skipped",
            if dry_run { " (dry run)" } else { "" },
            self.read,
            self.invalidated,
            self.no_match,
            self.no_change,
            self.dead_lettered,
            if dry_run { "with rule errors (would be dead-lettered again)" } else { "dead-lettered again" },
            self.bad.len(),
        );
        if !self.bad.is_empty() {
            let list: Vec<&str> = self.bad.iter().map(|(p, _)| p.as_str()).collect();
            eprintln!("replay: skipped: {}", list.join(", "));
        }
    }
}

/// A message to decode: topic, key and value (`None` for a tombstone).
type Message = (String, Option<Vec<u8>>, Option<Vec<u8>>);

/// The pipeline fed by a replay, and its task.
type Feed = (mpsc::Sender<SourceEvent>, tokio::task::JoinHandle<Result<(), app::AppError>>);

/// Reads one record: a dead-letter record gives back its original message; anything else is a
/// message value itself. `Err` is a sentence saying why the record is unusable.
fn read_record(item: &Item, default_topic: &str) -> Result<Message, String> {
    let fallback_topic = item.topic.clone().unwrap_or_else(|| default_topic.to_string());
    let Some(bytes) = &item.bytes else {
        // A Kafka tombstone on a Debezium topic.
        return Ok((fallback_topic, item.key.clone(), None));
    };
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let is_letter = value.get("dead_lettered_at_ms").is_some() && value.get("reason").is_some();
    if !is_letter {
        let value = (!value.is_null()).then(|| bytes.clone());
        return Ok((fallback_topic, item.key.clone(), value));
    }
    let topic = value
        .pointer("/source/topic")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| default_topic.to_string());
    let key = dead_letter::bytes_of(&value, "key");
    let has_value = value.get("value").is_some_and(|v| !v.is_null()) || value.get("value_base64").is_some();
    let message = dead_letter::bytes_of(&value, "value");
    if has_value && message.is_none() {
        return Err("dead-letter record whose `value_base64` is not valid base64".into());
    }
    if value.get("value").is_none() && value.get("value_base64").is_none() {
        return Err("dead-letter record without a `value` field".into());
    }
    Ok((topic, key, message))
}

/// Reads the input on a blocking thread into `tx`, until it ends or intake stops.
fn spawn_reader(
    input: Input,
    config: &Config,
    tx: mpsc::Sender<Item>,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<Result<(), ReplayError>>, ReplayError> {
    Ok(match input {
        Input::File(path) => {
            let file = std::fs::File::open(&path)
                .map_err(|e| ReplayError::Input(format!("{}: cannot open: {e}", path.display())))?;
            let len =
                file.metadata().map_err(|e| ReplayError::Input(format!("{}: cannot read: {e}", path.display())))?.len();
            tokio::task::spawn_blocking(move || read_file(&path, file, len, tx, shutdown))
        }
        Input::Kafka { topic } => {
            let client = kafka_client(config)?;
            tokio::task::spawn_blocking(move || read_topic(client, &topic, tx, shutdown))
        }
    })
}

fn read_file(
    path: &Path,
    file: std::fs::File,
    len: u64,
    tx: mpsc::Sender<Item>,
    shutdown: Shutdown,
) -> Result<(), ReplayError> {
    use std::io::Read;
    let mut reader = std::io::BufReader::new(file.take(len));
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| ReplayError::Input(format!("{}: cannot read: {e}", path.display())))?;
        if n == 0 || shutdown.is_stopping() {
            return Ok(());
        }
        line_no += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let item =
            Item { position: Position::File { line: line_no }, topic: None, key: None, bytes: Some(buf.clone()) };
        if tx.blocking_send(item).is_err() {
            return Ok(());
        }
    }
}

fn kafka_client(config: &Config) -> Result<rdkafka::ClientConfig, ReplayError> {
    let source = config.source.kafka.as_ref();
    let brokers = config.dead_letter.kafka.as_ref().and_then(|k| k.brokers.clone());
    let mut client = match source {
        Some(k) => crate::source::kafka::client_config(k),
        None => rdkafka::ClientConfig::new(),
    };
    match (brokers, source) {
        (Some(b), _) => {
            client.set("bootstrap.servers", b);
        }
        (None, Some(_)) => {}
        (None, None) => {
            return Err(ReplayError::Input(
                "replay from a topic needs Kafka brokers: set dead_letter.kafka.brokers or use a Kafka source".into(),
            ))
        }
    }
    if let Some(k) = &config.dead_letter.kafka {
        for (key, value) in &k.resolved_librdkafka {
            client.set(key, value.expose());
        }
    }
    // Assigned partitions, read once: no group membership, nothing committed.
    client
        .set("group.id", "cdc-invalidator-replay")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .remove("statistics.interval.ms")
        // Never the daemon's static identity: the same id would fence the running daemon.
        .remove("group.instance.id");
    Ok(client)
}

fn read_topic(
    client: rdkafka::ClientConfig,
    topic: &str,
    tx: mpsc::Sender<Item>,
    shutdown: Shutdown,
) -> Result<(), ReplayError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let fail = |what: &str, e: rdkafka::error::KafkaError| ReplayError::Input(format!("topic {topic}: {what}: {e}"));
    let consumer: BaseConsumer = client.create().map_err(|e| fail("cannot create a consumer", e))?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| fail("no metadata", e))?;
    let partitions: Vec<i32> =
        metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect::<Vec<_>>();
    if partitions.is_empty() {
        return Err(ReplayError::Input(format!("topic {topic} does not exist or has no partitions")));
    }
    // Read each partition up to its end as of now.
    let mut ends = std::collections::HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).map_err(|e| fail("no watermarks", e))?;
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning).map_err(|e| fail("cannot assign", e))?;
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl).map_err(|e| fail("cannot assign", e))?;
    let mut idle_since = Instant::now();
    while !ends.is_empty() {
        if shutdown.is_stopping() {
            return Ok(());
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                if idle_since.elapsed() > Duration::from_secs(60) {
                    return Err(ReplayError::Input(format!(
                        "topic {topic}: no message for 60 s before the end of partitions {:?}",
                        ends.keys().collect::<Vec<_>>()
                    )));
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "replay: Kafka error (retrying)"),
            Some(Ok(m)) => {
                idle_since = Instant::now();
                let (partition, offset) = (m.partition(), m.offset());
                let item = Item {
                    position: Position::Kafka { topic: Arc::from(m.topic()), partition, offset },
                    topic: Some(m.topic().to_string()),
                    key: m.key().map(<[u8]>::to_vec),
                    bytes: m.payload().map(<[u8]>::to_vec),
                };
                if tx.blocking_send(item).is_err() {
                    return Ok(());
                }
                if ends.get(&partition).is_some_and(|&end| offset + 1 >= end) {
                    ends.remove(&partition);
                }
            }
        }
    }
    Ok(())
}

/// Runs a replay to the end. Prints explanations (dry run) on stdout, problems and the summary
/// on stderr.
pub async fn replay(
    config: Config,
    rules: Rules,
    options: Options,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<Summary, ReplayError> {
    let (tx, mut rx) = mpsc::channel::<Item>(config.pipeline.queue_capacity.max(1));
    let reader = spawn_reader(options.input.clone(), &config, tx, shutdown.clone())?;
    let default_topic = options.topic.clone().unwrap_or_default();
    let mut summary = Summary::default();

    // The daemon's pipeline, fed from here (not in a dry run).
    let mut events: Option<Feed> = None;
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Finished>();
    let rules = Arc::new(rules);
    if !options.dry_run {
        let (layers, sinks) = app::build_sinks(&config, &metrics)?;
        let dead_letters =
            DeadLetters::open(&config.dead_letter, config.source.kafka.as_ref(), metrics.clone()).await?;
        let pipeline = Pipeline::new(config.pipeline.clone(), rules.clone(), sinks, dead_letters, metrics.clone())
            .with_layers(layers, config.sinks.timing.clone());
        let (etx, erx) = mpsc::channel(config.pipeline.queue_capacity.max(1));
        let pipeline_shutdown = shutdown.clone();
        events = Some((
            etx,
            tokio::spawn(async move { pipeline.run(erx, &pipeline_shutdown).await.map_err(app::AppError::from) }),
        ));
    }

    // Dead letters of Avro messages hold the Confluent-framed bytes: decoded as the source did.
    let codec = match config.source.kafka.as_ref() {
        Some(kafka) => crate::source::encoded::Codec::new(kafka, None).map_err(ReplayError::Registry)?,
        None => crate::source::encoded::Codec::with_registry(crate::config::KafkaFormat::Json, None),
    };
    let mut sent = 0usize;
    while let Some(item) = rx.recv().await {
        summary.read += 1;
        let position = item.position.to_string();
        let record = read_record(&item, &default_topic);
        let resolved = match &record {
            Ok((_, key, value)) => match codec.resolve(key.as_deref(), value.as_deref(), &shutdown).await {
                Some(resolved) => resolved,
                None => break,
            },
            Err(_) => crate::source::encoded::Resolved::plain(),
        };
        let decoded = record.and_then(|(topic, key, value)| {
            let decoded = codec
                .decode(&resolved, &topic, key.as_deref(), value.as_deref())
                .map_err(|e| format!("malformed event: {e}"))?;
            Ok((topic, key, value, decoded))
        });
        let (topic, key, value, decoded) = match decoded {
            Ok(d) => d,
            Err(reason) => {
                let at = match &options.input {
                    Input::File(p) => format!("{}:{}", p.display(), position.trim_start_matches("line ")),
                    Input::Kafka { .. } => position.clone(),
                };
                eprintln!("{at}: {reason}; skipped");
                summary.bad.push((position, reason));
                continue;
            }
        };
        match &events {
            None => {
                // Dry run: what `explain` would print, with the record's position first.
                let ex = crate::explain::explanation(&rules, decoded);
                if !ex.errors.is_empty() {
                    summary.dead_lettered += 1;
                } else if ex.op == "none" {
                    summary.no_change += 1;
                } else if ex.matched_rules.is_empty() {
                    summary.no_match += 1;
                } else {
                    summary.invalidated += 1;
                }
                let json = serde_json::to_string(&ex).unwrap_or_default();
                let position = serde_json::to_string(&position).unwrap_or_default();
                println!("{{\"position\":{position},{}", json.strip_prefix('{').unwrap_or(&json));
            }
            Some((etx, _)) => {
                let seq = sent as i64;
                let event = SourceEvent {
                    position: item.position,
                    decoded: Ok::<Decoded, _>(decoded),
                    raw: RawMessage { topic: Some(Arc::from(topic.as_str())), key, value },
                    logged_at: None,
                    received: Instant::now(),
                    ack: Ack::new(ack_tx.clone(), Finished { stream: 0, seq }),
                };
                if etx.send(event).await.is_err() {
                    break;
                }
                sent += 1;
            }
        }
    }
    drop(rx);
    let read_result = reader.await.map_err(|e| ReplayError::Input(format!("reader task: {e}")))?;

    if let Some((etx, task)) = events {
        drop(etx);
        task.await.map_err(|e| ReplayError::Input(format!("pipeline task: {e}")))??;
        drop(ack_tx);
        let mut finished = 0usize;
        while ack_rx.recv().await.is_some() {
            finished += 1;
        }
        let count = |outcome: &str| metrics.value("cdc_invalidator_events_total", &[("outcome", outcome)]) as u64;
        summary.invalidated = count("invalidated");
        summary.no_match = count("no_match");
        summary.no_change = count("no_change");
        summary.dead_lettered = count("partial") + count("dead_lettered");
        if finished < sent {
            return Err(ReplayError::Interrupted(sent - finished));
        }
    }
    read_result?;
    Ok(summary)
}

/// The `replay` command: loads config and rules, runs, prints the summary; returns the exit code.
pub fn main(config: Config, rules: Rules, options: Options) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("replay").build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return FAILED;
        }
    };
    let grace = config.shutdown.grace;
    let dry_run = options.dry_run;
    let result = runtime.block_on(async move {
        let (trigger, shutdown) = shutdown::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let signals = tokio::spawn(shutdown::on_signals(trigger, grace, async move {
            let _ = done_rx.await;
        }));
        let result = replay(config, rules, options, Arc::new(Metrics::new()), shutdown).await;
        let _ = done_tx.send(());
        let _ = signals.await;
        result
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(summary) => {
            summary.print(dry_run);
            summary.exit_code()
        }
        Err(e) => {
            eprintln!("replay: {}", crate::redact::scrub(&e.to_string()));
            FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(line: u64, text: &str) -> Item {
        Item { position: Position::File { line }, topic: None, key: None, bytes: Some(text.as_bytes().to_vec()) }
    }

    #[test]
    fn dead_letter_records_give_back_the_original_message() {
        let record = r#"{"reason":"rule_error","error":"x","position":"t[0]@4","source":{"kind":"kafka","topic":"shop.public.products","partition":0,"offset":4},"table":"public.products","op":"delete","key":"{\"id\":43}","value":"{\"op\":\"d\"}","dead_lettered_at_ms":1}"#;
        let (topic, key, value) = read_record(&item(1, record), "other").expect("usable");
        assert_eq!(topic, "shop.public.products");
        assert_eq!(key.as_deref(), Some(&b"{\"id\":43}"[..]));
        assert_eq!(value.as_deref(), Some(&b"{\"op\":\"d\"}"[..]));
    }

    #[test]
    fn plain_messages_and_tombstones_use_the_given_topic() {
        let (topic, key, value) = read_record(&item(1, r#"{"op":"c"}"#), "shop.public.products").expect("usable");
        assert_eq!(
            (topic.as_str(), key, value.as_deref()),
            ("shop.public.products", None, Some(&br#"{"op":"c"}"#[..]))
        );
        let (_, _, value) = read_record(&item(2, "null\n"), "t").expect("usable");
        assert_eq!(value, None, "a JSON null is a tombstone");
    }

    #[test]
    fn unusable_records_say_why() {
        assert!(read_record(&item(1, "{not json"), "t").unwrap_err().starts_with("not JSON"));
        let no_value = r#"{"reason":"malformed","error":"x","dead_lettered_at_ms":1}"#;
        assert!(read_record(&item(2, no_value), "t").unwrap_err().contains("without a `value`"));
        let bad_b64 = r#"{"reason":"malformed","value":null,"value_base64":"%%%","dead_lettered_at_ms":1}"#;
        assert!(read_record(&item(3, bad_b64), "t").unwrap_err().contains("base64"));
    }

    #[test]
    fn exit_code_flags_anything_left_over() {
        let mut s = Summary { read: 2, invalidated: 2, ..Summary::default() };
        assert_eq!(s.exit_code(), 0);
        s.dead_lettered = 1;
        assert_eq!(s.exit_code(), INCOMPLETE);
        s.dead_lettered = 0;
        s.bad.push(("line 2".into(), "not JSON".into()));
        assert_eq!(s.exit_code(), INCOMPLETE);
    }
}
