//! librdkafka's mock cluster, in process: a real Kafka protocol peer on loopback ports, with
//! fault injection (request errors, brokers down and up).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

/// A mock cluster owned by a producer (the cluster lives as long as this value).
pub struct MockKafka {
    producer: FutureProducer,
}

impl MockKafka {
    pub fn start(brokers: u32) -> MockKafka {
        let producer: FutureProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "0")
            .create()
            .expect("create mock cluster producer");
        // The first group join waits 3 s by default; tests want it at once.
        unsafe {
            let mc = rdkafka::bindings::rd_kafka_handle_mock_cluster(producer.client().native_ptr());
            assert!(!mc.is_null(), "the producer has no mock cluster");
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(mc, 0);
        }
        MockKafka { producer }
    }

    pub fn cluster(&self) -> MockCluster<'_, impl rdkafka::ClientContext> {
        self.producer.client().mock_cluster().expect("mock cluster")
    }

    pub fn bootstrap(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.cluster().create_topic(name, partitions, 1).expect("create topic");
    }

    /// Produces one message and waits for its delivery report.
    pub async fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&str>,
        value: Option<&str>,
    ) -> (i32, i64) {
        let mut record: FutureRecord<'_, str, str> = FutureRecord::to(topic);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        let delivery = self.producer.send(record, Duration::from_secs(30)).await.expect("produce");
        (delivery.partition, delivery.offset)
    }

    /// [`MockKafka::produce`] with binary key and value (Confluent wire format).
    pub async fn produce_bytes(&self, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> (i32, i64) {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).partition(0);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        let delivery = self.producer.send(record, Duration::from_secs(30)).await.expect("produce");
        (delivery.partition, delivery.offset)
    }

    pub fn flush(&self) {
        let _ = self.producer.flush(Duration::from_secs(10));
    }
}

/// The committed offsets of `group` for partitions 0..n of `topic` (-1 when none).
pub async fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let (bootstrap, group, topic) = (bootstrap.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("create offsets reader");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
        (0..partitions)
            .map(|p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    })
    .await
    .expect("offsets reader task")
}
