//! The source against librdkafka's in-process mock cluster: bursts keep each partition's order,
//! acknowledgements are taken while a backlog is read, and batched acknowledgements commit
//! exactly what one-by-one ones do.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::mpsc;

use super::tracker::Tracker;
// The integration tests' mock-cluster helpers (self-contained: rdkafka only), for reading
// committed offsets the same way they do.
#[path = "../../../tests/support/kafka.rs"]
#[allow(dead_code)]
mod mock_kafka;
use super::{finish, KafkaSource};
use crate::config::KafkaConfig;
use crate::source::{ack_channel, Ack, Finished, Position, Source, SourceEvent};
use crate::telemetry::Metrics;

/// A mock cluster owned by its producer, with group joins at once (not after 3 s).
fn mock_cluster() -> FutureProducer {
    let producer: FutureProducer = ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .set("linger.ms", "0")
        .create()
        .expect("mock cluster producer");
    // SAFETY: the producer's client is alive; the mock cluster handle it returns is owned by it.
    unsafe {
        let mc = rdkafka::bindings::rd_kafka_handle_mock_cluster(producer.client().native_ptr());
        assert!(!mc.is_null(), "the producer has a mock cluster");
        rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(mc, 0);
    }
    producer
}

fn kafka_config(bootstrap: &str, group: &str, topic: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: bootstrap.to_string(),
        group_id: group.to_string(),
        topics: vec![topic.to_string()],
        topic_pattern: None,
        librdkafka: BTreeMap::new(),
        commit_interval: Duration::from_millis(50),
        max_message_bytes: 1 << 20,
        max_in_flight_bytes: 8 << 20,
        resolved_librdkafka: Vec::new(),
        group_instance_id: None,
        format: Default::default(),
        schema_registry: None,
    }
}

/// As `tests/support/events.rs` `product_update`.
fn update(id: usize) -> String {
    format!(
        r#"{{"before":{{"id":{id},"name":"Widget {id}","price":"1.00","category_id":1,"slug":"widget-{id}"}},"after":{{"id":{id},"name":"Widget {id}","price":"2.00","category_id":2,"slug":"widget-{id}"}},"source":{{"version":"2.7.3.Final","connector":"postgresql","name":"shop","ts_ms":1,"snapshot":"false","db":"shop","schema":"public","table":"products","txId":2,"lsn":2}},"op":"u","ts_ms":1,"transaction":null}}"#
    )
}

/// Reads a backlog of `total` messages in 3 partitions through a pipeline queue of `capacity`
/// events, finishing them in batches of up to `batch` with `Ack::finish_all`, or one by one.
/// Checks each partition's order and that acknowledgements were taken during the read, and
/// returns the committed offsets after a clean stop.
async fn read_backlog(capacity: usize, batch: usize, batched: bool, total: usize) -> (Vec<i64>, Vec<i64>) {
    let producer = mock_cluster();
    let cluster = producer.client().mock_cluster().expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let topic = "t.public.products";
    cluster.create_topic(topic, 3, 1).expect("topic");
    let mut produced = vec![0i64; 3];
    for i in 0..total {
        let partition = (i % 3) as i32;
        let key = format!("{{\"id\":{i}}}");
        let value = update(i);
        producer
            .send(FutureRecord::to(topic).partition(partition).key(&key).payload(&value), Duration::from_secs(10))
            .await
            .expect("produce");
        produced[partition as usize] += 1;
    }
    producer.flush(Duration::from_secs(10)).expect("flush");

    let group = format!("g-{capacity}-{batch}-{batched}");
    let metrics = Arc::new(Metrics::new());
    let source = KafkaSource::new(&kafka_config(&bootstrap, &group, topic), metrics.clone()).expect("source");
    let (trigger, shutdown) = crate::shutdown::channel();
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(capacity);
    let run = tokio::spawn(Box::new(source).run(tx, shutdown));

    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut received = 0;
    let mut most_pending = 0;
    let mut buf = Vec::new();
    while received < total {
        let n = tokio::time::timeout(Duration::from_secs(30), rx.recv_many(&mut buf, batch))
            .await
            .unwrap_or_else(|_| panic!("only {received} of {total} events in 30 s"));
        assert!(n > 0, "the source stopped early");
        for ev in &buf {
            let Position::Kafka { partition, offset, .. } = ev.position else { panic!("a Kafka position") };
            let expected = next.entry(partition).or_insert(0);
            assert_eq!(offset, *expected, "partition {partition} in order, nothing skipped");
            *expected += 1;
            assert!(ev.decoded.is_ok(), "{:?}", ev.decoded);
        }
        received += n;
        most_pending = most_pending.max(metrics.pending_events.get());
        if batched {
            Ack::finish_all(buf.drain(..).map(|ev| ev.ack));
        } else {
            buf.drain(..).for_each(|ev| ev.ack.finish());
        }
    }
    // Acknowledgements are taken between bursts: what is started and not yet taken back stays
    // near the queue, the bursts being decoded, a burst waiting and one batch, not the whole
    // backlog.
    assert!(
        most_pending <= (capacity + (super::DECODING + 2) * super::BURST as usize + batch) as i64,
        "at most {most_pending} pending: acknowledgements waited for the backlog"
    );
    trigger.stop_intake();
    drop(rx);
    tokio::time::timeout(Duration::from_secs(30), run).await.expect("source stops").expect("task").expect("run");
    assert_eq!(metrics.pending_events.get(), 0);
    (mock_kafka::committed(&bootstrap, &group, topic, 3).await, produced)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_read_in_bursts_keeps_order_and_commits_everything_with_batched_acks() {
    // A small queue: bursts end on a full queue, events wait in `held`.
    let (committed, produced) = read_backlog(8, 5, true, 1500).await;
    assert_eq!(committed, produced);
    // A large one: bursts end at BURST or on an empty librdkafka queue.
    let (committed, produced) = read_backlog(1024, 100, true, 1500).await;
    assert_eq!(committed, produced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_stops_at_max_in_flight_bytes_until_acknowledgements_free_them() {
    let producer = mock_cluster();
    let cluster = producer.client().mock_cluster().expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let topic = "budget.public.products";
    cluster.create_topic(topic, 1, 1).expect("create topic");
    let total = 120;
    let mut message_bytes = 0;
    for i in 0..total {
        // Keys and values of one length: every message holds the same bytes.
        let key = format!("{{\"id\":{}}}", 1000 + i);
        let value = update(1000 + i);
        message_bytes = key.len() + value.len();
        producer.send(FutureRecord::to(topic).key(&key).payload(&value), Duration::from_secs(10)).await.expect("produce");
    }
    producer.flush(Duration::from_secs(10)).expect("flush");

    // Room for 10 messages in flight; the pipeline queue alone would take them all.
    let config = KafkaConfig { max_in_flight_bytes: 10 * message_bytes, ..kafka_config(&bootstrap, "g-budget", topic) };
    let metrics = Arc::new(Metrics::new());
    let source = KafkaSource::new(&config, metrics.clone()).expect("source");
    let (trigger, shutdown) = crate::shutdown::channel();
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(1000);
    let run = tokio::spawn(Box::new(source).run(tx, shutdown));

    let mut unfinished: Vec<SourceEvent> = Vec::new();
    let mut received = 0;
    let mut round = 0;
    while received < total {
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        unfinished.push(first.ok().flatten().unwrap_or_else(|| panic!("round {round}: nothing in 10 s")));
        // Then whatever comes until nothing has for a while (the first time, for longer than
        // the second after which a hold pauses the partitions: resuming works too).
        let quiet = if round == 0 { Duration::from_millis(1500) } else { Duration::from_millis(300) };
        while let Ok(Some(ev)) = tokio::time::timeout(quiet, rx.recv()).await {
            unfinished.push(ev);
        }
        received += unfinished.len();
        assert_eq!(unfinished.len(), 10, "round {round}: room for 10 messages");
        Ack::finish_all(unfinished.drain(..).map(|ev| ev.ack));
        round += 1;
    }
    trigger.stop_intake();
    drop(rx);
    tokio::time::timeout(Duration::from_secs(30), run).await.expect("source stops").expect("task").expect("run");
    assert_eq!(mock_kafka::committed(&bootstrap, "g-budget", topic, 1).await, vec![total as i64]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_read_in_bursts_commits_everything_with_acks_one_by_one() {
    let (committed, produced) = read_backlog(16, 7, false, 1200).await;
    assert_eq!(committed, produced);
}

/// A source reading into a channel, and what stops it.
struct Reading {
    trigger: crate::shutdown::ShutdownTrigger,
    events: mpsc::Receiver<SourceEvent>,
    run: tokio::task::JoinHandle<Result<(), crate::source::SourceError>>,
}

impl Reading {
    fn start(source: Box<dyn Source>) -> Reading {
        let (trigger, shutdown) = crate::shutdown::channel();
        let (out, events) = mpsc::channel::<SourceEvent>(16);
        Reading { trigger, events, run: tokio::spawn(source.run(out, shutdown)) }
    }

    /// The columns of the next event's new row image, and the rules load they were decoded
    /// for (`None`: whole rows). The event's ack is dropped (it would be redelivered).
    async fn next_columns(&mut self) -> (Option<crate::event::ProjectionId>, String) {
        let event = tokio::time::timeout(Duration::from_secs(30), self.events.recv()).await;
        let event = event.ok().flatten().expect("an event in 30 s");
        let Ok(crate::event::Decoded::Change(change)) = &event.decoded else { panic!("{:?}", event.decoded) };
        let after = change.after.as_ref().expect("a new row image");
        let mut columns: Vec<&str> = after.keys().collect();
        columns.sort_unstable();
        (after.projection(), columns.join(","))
    }

    async fn stop(self) {
        self.trigger.stop_intake();
        drop(self.events);
        let stopped = tokio::time::timeout(Duration::from_secs(30), self.run).await;
        stopped.expect("source stops").expect("task").expect("run");
    }
}

/// The daemon's source (`source::build`, as `app::run` makes it) decodes only the columns the
/// running rules read, a reload's from the next message on; a source made without the rules
/// (the benchmarks) decodes whole rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_source_decodes_only_the_columns_the_running_rules_read() {
    use crate::rules::Rules;
    use crate::source::SourceConfig;

    let producer = mock_cluster();
    let cluster = producer.client().mock_cluster().expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let topic = "projection.public.products";
    cluster.create_topic(topic, 1, 1).expect("create topic");
    let produce = |id: usize| {
        let (key, value) = (format!("{{\"id\":{id}}}"), update(id));
        let producer = producer.clone();
        async move {
            let record = FutureRecord::to(topic).key(&key).payload(&value);
            producer.send(record, Duration::from_secs(10)).await.expect("produce");
        }
    };
    let parse = |text: &str| Arc::new(Rules::parse(text, std::path::Path::new("rules.yaml")).expect("rules"));
    let slugs = parse(
        "version: 1\nrules:\n  - name: slugs\n    table: public.products\n    redis: { keys: [\"s:{slug}\"] }\n",
    );
    let (reload, rules) = tokio::sync::watch::channel(slugs.clone());
    let config: SourceConfig = serde_json::from_value(serde_json::json!({
        "kind": "kafka",
        "kafka": {"brokers": bootstrap, "group_id": "g-projected", "topics": [topic]},
    }))
    .expect("source config");
    let metrics = Arc::new(Metrics::new());

    let mut reading = Reading::start(crate::source::build(&config, 16, &rules, metrics.clone()).expect("source"));
    produce(1).await;
    assert_eq!(reading.next_columns().await, (Some(slugs.projection().id()), "slug".to_string()));
    let reloaded = parse(crate::source::test_events::RULES);
    reload.send(reloaded.clone()).expect("reload");
    produce(2).await;
    assert_eq!(reading.next_columns().await, (Some(reloaded.projection().id()), "category_id,id".to_string()));
    reading.stop().await;

    let whole = KafkaSource::new(&kafka_config(&bootstrap, "g-whole", topic), metrics).expect("source");
    let mut reading = Reading::start(Box::new(whole));
    assert_eq!(reading.next_columns().await, (None, "category_id,id,name,price,slug".to_string()));
    reading.stop().await;
}

/// Starts `offsets` (even ones in partition 0, odd ones in 1), each holding as many bytes as its
/// offset, and returns their completion coordinates.
fn tracked(tracker: &Mutex<Tracker>, offsets: impl IntoIterator<Item = i64>) -> Vec<(i64, Finished)> {
    let mut t = tracker.lock().unwrap();
    t.assign("t", 0);
    t.assign("t", 1);
    offsets.into_iter().map(|o| (o, t.start("t", (o % 2) as i32, o, o as usize).0)).collect()
}

fn points(tracker: &Mutex<Tracker>) -> Vec<(i32, i64)> {
    let mut points: Vec<(i32, i64)> =
        tracker.lock().unwrap().commits_due(true).into_iter().map(|p| (p.partition, p.offset)).collect();
    points.sort();
    points
}

#[test]
fn acks_finished_in_batches_commit_exactly_as_one_by_one() {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..200 {
        let batched = Mutex::new(Tracker::default());
        let single = Mutex::new(Tracker::default());
        let offsets: Vec<i64> = (0..60).collect();
        let a = tracked(&batched, offsets.clone());
        let b = tracked(&single, offsets);
        assert_eq!(a, b);
        let (tx, mut rx) = ack_channel();
        let mut acks: Vec<(Finished, Ack)> = a.iter().map(|&(_, f)| (f, Ack::batched(&tx, f))).collect();
        acks.shuffle(&mut rng);
        // Some acks are dropped unfinished (their events are redelivered).
        let keep: Vec<(Finished, Ack)> = acks.into_iter().filter(|_| rng.random_bool(0.95)).collect();
        // Each event holds as many bytes as its offset: what stays charged is what is unfinished.
        let mut unfinished: i64 = (0..60).sum();
        let mut rest = keep.into_iter().peekable();
        while rest.peek().is_some() {
            let size = rng.random_range(1..=10);
            let chunk: Vec<(Finished, Ack)> = rest.by_ref().take(size).collect();
            for &(f, _) in &chunk {
                single.lock().unwrap().finish(f);
                unfinished -= f.seq;
            }
            Ack::finish_all(chunk.into_iter().map(|(_, ack)| ack));
            if let Ok(first) = rx.try_recv() {
                finish(&batched, first, &mut rx);
            }
            assert_eq!(points(&batched), points(&single));
            assert_eq!(batched.lock().unwrap().in_flight_bytes(), unfinished as usize);
            assert_eq!(single.lock().unwrap().in_flight_bytes(), unfinished as usize);
        }
    }
}

#[test]
fn a_dropped_ack_in_a_batch_holds_the_watermark() {
    let tracker = Mutex::new(Tracker::default());
    let started = tracked(&tracker, [10, 12, 14, 16]);
    let (tx, mut rx) = ack_channel();
    let mut acks: Vec<Ack> = started.iter().map(|&(_, f)| Ack::batched(&tx, f)).collect();
    let dropped = acks.remove(1);
    Ack::finish_all(acks);
    drop(dropped);
    let first = rx.try_recv().expect("one message for the batch");
    assert_eq!(finish(&tracker, first, &mut rx), 3);
    let points = tracker.lock().unwrap().commits_due(true);
    assert_eq!(points.len(), 1);
    assert_eq!((points[0].partition, points[0].offset), (0, 12), "12 was never finished: commit stays there");
}
