//! Proves the Tansu harness is a usable Kafka for librdkafka: multi-partition produce, group
//! consumption with manual commits, and a second group member resuming after the committed
//! offsets, which is what "never lose, never replay more than needed" rests on.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::support::tansu::TansuBroker;

const TOPIC: &str = "smoke";
const PARTITIONS: i32 = 3;
const GROUP: &str = "smoke-group";
/// Generous next to the few seconds this takes, but bounds a hang.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// (partition, offset, payload) of one consumed message.
type Seen = (i32, i64, String);

#[tokio::test]
async fn tansu_groups_commit_and_resume() {
    let broker = TansuBroker::start();
    broker.create_topic(TOPIC, PARTITIONS as u32);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("message.timeout.ms", "10000")
        .create()
        .expect("create producer");

    // 30 messages, 10 per partition, so every partition has a committed offset to resume from.
    let first: Vec<String> = (0..30).map(|i| format!("first-{i}")).collect();
    produce(&producer, &broker, &first).await;

    let consumer = group_member(&broker);
    let seen = within(&broker, "first consumer reads 30", recv_n(&consumer, first.len())).await;
    assert_eq!(payloads(&seen), first.iter().cloned().collect(), "exactly the produced messages, once each");

    // Commit exactly what was processed: the next offset of each partition.
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for (partition, offset, _) in &seen {
        let n = next.entry(*partition).or_default();
        *n = (*n).max(offset + 1);
    }
    assert_eq!(next.len(), PARTITIONS as usize, "all partitions were read: {next:?}");
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in &next {
        tpl.add_partition_offset(TOPIC, *partition, Offset::Offset(*offset)).expect("add offset");
    }
    // A synchronous commit blocks its thread; keep it off the async executor.
    let consumer = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync).map(|()| consumer))
        .await
        .expect("commit task")
        .unwrap_or_else(|e| panic!("commit {next:?}: {e}; broker output:\n{}", broker.log_tail()));
    // Leave the group so the second member gets the partitions at once.
    tokio::task::spawn_blocking(move || drop(consumer)).await.expect("close first consumer");

    let later: Vec<String> = (0..6).map(|i| format!("later-{i}")).collect();
    produce(&producer, &broker, &later).await;

    let consumer = group_member(&broker);
    let seen = within(&broker, "second consumer reads the 6 new", recv_n(&consumer, later.len())).await;
    assert_eq!(
        payloads(&seen),
        later.iter().cloned().collect(),
        "the second member resumes after the commits: nothing old, nothing missing"
    );
    for (partition, offset, payload) in &seen {
        assert!(
            *offset >= next[partition],
            "{payload} at {partition}/{offset} is before the committed offset {}",
            next[partition]
        );
    }
}

/// Produces `payloads` round-robin over the partitions and waits for every delivery.
async fn produce(producer: &FutureProducer, broker: &TansuBroker, payloads: &[String]) {
    for (i, payload) in payloads.iter().enumerate() {
        let key = format!("k{i}");
        let record = FutureRecord::to(TOPIC).key(&key).payload(payload).partition(i as i32 % PARTITIONS);
        if let Err((e, _)) = producer.send(record, STEP_TIMEOUT).await {
            panic!("deliver {payload}: {e}; broker output:\n{}", broker.log_tail());
        }
    }
}

fn group_member(broker: &TansuBroker) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", GROUP)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .expect("create consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    consumer
}

async fn recv_n(consumer: &StreamConsumer, n: usize) -> Vec<Seen> {
    let mut seen = Vec::with_capacity(n);
    while seen.len() < n {
        match consumer.recv().await {
            Ok(m) => {
                let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                seen.push((m.partition(), m.offset(), payload));
            }
            // Transient (e.g. a rebalance in progress); a persistent failure ends in the timeout.
            Err(e) => eprintln!("consumer error (retrying): {e}"),
        }
    }
    seen
}

/// Fails the test, with the broker's output, instead of hanging.
async fn within<T>(broker: &TansuBroker, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: timed out after {STEP_TIMEOUT:?}; broker output:\n{}", broker.log_tail()),
    }
}

fn payloads(seen: &[Seen]) -> BTreeSet<String> {
    let set: BTreeSet<String> = seen.iter().map(|(_, _, p)| p.clone()).collect();
    assert_eq!(set.len(), seen.len(), "no message delivered twice: {seen:?}");
    set
}
