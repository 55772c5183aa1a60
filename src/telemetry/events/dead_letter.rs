//! What the dead-letter destination reports: letters written (by reason), failed writes.

use std::fmt::Display;
use std::time::Duration;

use super::InternalEvent;
use crate::dead_letter::Reason;
use crate::telemetry::Metrics;

/// Dead letters written, one reason each.
pub struct DeadLettersWritten<'a> {
    pub reasons: &'a mut dyn Iterator<Item = Reason>,
}

impl InternalEvent for DeadLettersWritten<'_> {
    fn emit(self, metrics: &Metrics) {
        for reason in self.reasons {
            metrics.dead_letters.with_label_values(&[reason.as_str()]).inc();
        }
    }
}

/// Writing dead letters failed (`attempt`); retried after `wait`.
pub struct DeadLetterWriteFailed<'a> {
    pub error: &'a dyn Display,
    pub attempt: u32,
    pub wait: Duration,
}

impl InternalEvent for DeadLetterWriteFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.dead_letter_errors.inc();
        let (error, attempt) = (self.error, self.attempt);
        tracing::warn!(target: "cdc_invalidator::dead_letter", error = %error, attempt, wait_ms = self.wait.as_millis() as u64, "dead-letter write failed; retrying");
    }
}
