//! The Redis sink: UNLINK keys, fan out tags. (Being written; the API below is fixed.)

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::RedisConfig;
use crate::shutdown::Shutdown;
use crate::sink::{Invalidations, Sink, SinkError, SinkReport};
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
}

pub struct RedisSink {
    name: String,
    _metrics: Arc<Metrics>,
}

impl RedisSink {
    /// Builds the sink without connecting: the daemon starts (and `/readyz` says not ready)
    /// while Redis is down. Only an unusable URL fails here.
    pub fn new(name: &str, _config: &RedisConfig, metrics: Arc<Metrics>) -> Result<RedisSink, RedisSinkError> {
        Ok(RedisSink { name: name.to_string(), _metrics: metrics })
    }
}

#[async_trait]
impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn invalidate(&self, _batch: &Invalidations, _shutdown: &Shutdown) -> Result<SinkReport, SinkError> {
        todo!("redis sink")
    }

    async fn ping(&self) -> bool {
        false
    }
}
