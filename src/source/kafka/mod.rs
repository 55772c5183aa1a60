//! The Kafka source: a consumer group reading Debezium topics.
