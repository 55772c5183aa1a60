//! Integration tests against real services. One test binary (faster to link than one per file);
//! `support/` starts private instances of Redis, Kafka (librdkafka's mock cluster in process,
//! Tansu out of process) on free loopback ports and stops them afterwards.

mod support;

mod avro;
mod cdn_cloudflare;
mod cdn_credentials;
mod cdn_daemon;
mod cdn_fastly;
mod cdn_signed;
mod cdn_varnish;
mod cdn_webhook;
mod cli;
mod debezium_real;
mod end_to_end;
mod freshness;
mod hardening;
mod operator_alerts;
mod operator_kit;
mod operator_metrics;
mod operator_reload;
mod operator_replay;
mod pipeline;
mod postgres;
mod protobuf;
mod purge;
mod redis_deployments;
mod redis_more_ways;
mod redis_secure;
mod redis_signals;
mod redis_sink;
mod signals;
mod tansu_smoke;
