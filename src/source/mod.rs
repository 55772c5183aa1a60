//! Sources: where change events come from, and how their positions are acknowledged.
//!
//! Every source hands the pipeline [`SourceEvent`]s through a bounded channel (backpressure: a
//! full channel pauses the source) and gets completions back through each event's [`Ack`]. The
//! source alone decides what a completion means for its position: Kafka commits, per partition,
//! the highest offset below which every event is finished; PostgreSQL confirms the end LSN of
//! the newest fully finished transaction. Both use [`watermark::Watermark`].
//!
//! An `Ack` that is dropped without [`Ack::finish`] is *not* acknowledged: that is how shutdown
//! and rebalances abandon work so it is redelivered.
//!
//! # Adding a source
//!
//! A folder `src/source/<kind>/` whose source type implements [`Source`], and whose
//! `<kind>/config.rs` holds its section (`source.<kind>`) implementing [`SourceSection`]: its
//! checks, its offline build check and its construction. Then one line in the `sources!`
//! invocation below, which declares the module and makes the `source.kind` value, the section
//! field, the dispatch and the fatal-error variant. The daemon (`crate::app`) and `config` know
//! only the trait.

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::config::{Origin, Problem};
use crate::event::Decoded;
use crate::rules::Rules;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

pub mod debezium;
pub mod encoded;
pub mod registry;
pub(crate) mod temporal;
pub mod watermark;

/// The integration tests' change events and rules (`tests/support/events.rs`, std only), for
/// the unit tests below too: one text of the pipeline tests' rules.
#[cfg(test)]
#[path = "../../tests/support/events.rs"]
#[allow(dead_code)]
mod test_events;

/// Where change events come from: the other end of the pipeline from [`crate::sink::Sink`].
///
/// The contract: `run` sends every event it reads into `out` in its stream's order (a full
/// channel is backpressure: the source waits, and pauses its upstream if it must), and moves
/// its position (a Kafka commit, a PostgreSQL confirmed LSN) only past events whose [`Ack`]
/// came back finished; an `Ack` dropped unfinished is redelivered after a restart. It retries
/// what is transient (a broker or server away) itself; an error it returns is fatal and stops
/// the daemon. When `shutdown` asks, it stops reading and returns once the pipeline has dropped
/// `out`'s receiver, after a last acknowledgement of what was finished.
#[async_trait]
pub trait Source: Send {
    /// The kind, as `source.kind` spells it (log lines).
    fn kind(&self) -> &'static str;

    async fn run(self: Box<Self>, out: mpsc::Sender<SourceEvent>, shutdown: Shutdown) -> Result<(), SourceError>;
}

/// One source's config section (`source.<kind>`): it checks itself and builds its source.
pub(crate) trait SourceSection {
    /// Checks the section and resolves its secrets, reporting every problem.
    fn validate(&mut self, origin: &Origin, problems: &mut Vec<Problem>);

    /// What `run` would fail to build, found without connecting (called only on a config that
    /// is valid so far, see `config::build`).
    fn check(&self, _origin: &Origin, _problems: &mut Vec<Problem>) {}

    /// The configured source (no network traffic yet: that starts with [`Source::run`]).
    /// `queue_capacity`: the pipeline's source queue. `rules`: the daemon's running rules, for
    /// a source that decodes only the columns they read ([`crate::rules::Projection`]).
    fn build(
        &self,
        queue_capacity: usize,
        rules: &watch::Receiver<Arc<Rules>>,
        metrics: Arc<Metrics>,
    ) -> Result<Box<dyn Source>, SourceError>;

    /// The PostgreSQL cluster the source reads from, if it reads one: the read replicas that
    /// gate the second pass must replicate that very cluster (`freshness`).
    fn postgres_cluster(&self) -> Option<&postgres::config::Connection> {
        None
    }
}

/// The registry of sources: each line is `Variant field: <section type>, <fatal error type>;`,
/// where `field` (the variant in lower case) is the module (`src/source/<field>/`), the
/// `source.kind` value and the name of the section. It declares the modules and defines
/// [`SourceKind`], [`SourceConfig`] and [`SourceError`].
macro_rules! sources {
    ($($(#[$doc:meta])* $variant:ident $field:ident: $section:ty, $error:ty;)+) => {
        $(pub mod $field;)+

        /// `source.kind`: which source runs.
        #[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
        #[serde(rename_all = "lowercase")]
        pub enum SourceKind {
            $($variant,)+
        }

        impl SourceKind {
            /// As `source.kind` spells it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(SourceKind::$variant => stringify!($field),)+
                }
            }
        }

        /// `source`: the kind, each source's own section, and how Debezium messages are read.
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct SourceConfig {
            pub kind: SourceKind,
            $($(#[$doc])* pub $field: Option<$section>,)+
            /// How Debezium messages are read (`source.debezium`), whichever transport brings them.
            #[serde(default)]
            pub debezium: debezium::DebeziumConfig,
        }

        impl SourceConfig {
            /// The section of the configured kind, if the file has it.
            fn section(&self) -> Option<&dyn SourceSection> {
                match self.kind {
                    $(SourceKind::$variant => self.$field.as_ref().map(|s| s as &dyn SourceSection),)+
                }
            }

            fn section_mut(&mut self) -> Option<&mut dyn SourceSection> {
                match self.kind {
                    $(SourceKind::$variant => self.$field.as_mut().map(|s| s as &mut dyn SourceSection),)+
                }
            }
        }

        /// A source's fatal error (sources retry the transient ones themselves).
        #[derive(Debug, thiserror::Error)]
        pub enum SourceError {
            $(#[error(transparent)] $variant(#[from] $error),)+
            /// `source.kind` names a section that is missing (validation reports it first).
            #[error("source.kind is {0} but there is no source.{0} section")]
            NotConfigured(&'static str),
        }
    };
}

sources! {
    /// Debezium topics on Kafka (`kind: kafka`).
    Kafka kafka: kafka::config::KafkaConfig, kafka::KafkaSourceError;
    /// PostgreSQL logical replication (`kind: postgres`).
    Postgres postgres: postgres::config::PostgresConfig, postgres::PostgresSourceError;
}

impl SourceConfig {
    /// Checks `source`: the section of the configured source (each source checks its own) and
    /// `source.debezium`.
    pub(crate) fn validate(&mut self, origin: &Origin, problems: &mut Vec<Problem>) {
        if self.debezium.unavailable_value_placeholder.as_deref().is_some_and(str::is_empty) {
            problems.push(origin.problem(
                &["source", "debezium", "unavailable_value_placeholder"],
                "source.debezium.unavailable_value_placeholder must not be empty (it would match every empty string)",
            ));
        }
        let kind = self.kind.as_str();
        match self.section_mut() {
            Some(section) => section.validate(origin, problems),
            None => problems.push(origin.problem(&["source"], SourceError::NotConfigured(kind).to_string())),
        }
    }

    /// What `run` would fail to build, found without connecting.
    pub(crate) fn check(&self, origin: &Origin, problems: &mut Vec<Problem>) {
        if let Some(section) = self.section() {
            section.check(origin, problems);
        }
    }

    /// The PostgreSQL cluster the configured source reads from, if any ([`SourceSection`]).
    pub fn postgres_cluster(&self) -> Option<&postgres::config::Connection> {
        self.section().and_then(|s| s.postgres_cluster())
    }
}

/// The configured source (no network traffic yet: that starts with [`Source::run`]).
/// `queue_capacity`: the pipeline's source queue. `rules`: the daemon's running rules (hot
/// reloads included); the Kafka source decodes only the columns they read, the PostgreSQL
/// source whole rows.
pub fn build(
    config: &SourceConfig,
    queue_capacity: usize,
    rules: &watch::Receiver<Arc<Rules>>,
    metrics: Arc<Metrics>,
) -> Result<Box<dyn Source>, SourceError> {
    let section = config.section().ok_or(SourceError::NotConfigured(config.kind.as_str()))?;
    section.build(queue_capacity, rules, metrics)
}

/// Where an event sits in its source; printed in dead letters and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    Kafka {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
    },
    /// PostgreSQL: the LSN of the change, and the LSN of its transaction's commit record as the
    /// Begin message announces it (the end LSN that is acknowledged is only known at Commit,
    /// after the changes have streamed; the source's tracker holds it).
    Postgres {
        lsn: u64,
        commit_end_lsn: u64,
    },
    /// Events that came from a file (`explain`, `replay`): the line number.
    File {
        line: u64,
    },
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Kafka { topic, partition, offset } => write!(f, "{topic}[{partition}]@{offset}"),
            Position::Postgres { lsn, .. } => write!(f, "lsn {:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff),
            Position::File { line } => write!(f, "line {line}"),
        }
    }
}

/// The original message, kept so a dead letter can be replayed byte for byte.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawMessage {
    pub topic: Option<Arc<str>>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Why a message could not be decoded; it goes to the dead-letter destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One message from a source, on its way through the pipeline.
#[derive(Debug)]
pub struct SourceEvent {
    pub position: Position,
    pub decoded: Result<Decoded, Malformed>,
    pub raw: RawMessage,
    /// When the message entered the log (Kafka message timestamp): the staleness origin for
    /// events whose payload carries no commit time.
    pub logged_at: Option<SystemTime>,
    /// When this process received it (for in-process latency figures).
    pub received: Instant,
    pub ack: Ack,
}

/// An opaque completion handle: the source's own coordinates of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Which ordered stream (a Kafka partition *assignment*, a PostgreSQL slot): sources bump it
    /// on every reassignment so completions of revoked work are recognised and ignored.
    pub stream: u64,
    /// The event's place in that stream (Kafka offset, PostgreSQL event sequence).
    pub seq: i64,
}

/// Acknowledges one event back to its source, once every sink has finished it or it has been
/// dead-lettered.
///
/// The channel behind it is unbounded on purpose, but what travels on it is bounded: at most
/// one message per outstanding event, and outstanding events are bounded by the pipeline queue.
///
/// Two kinds of channel: one [`Finished`] per message ([`Ack::new`], for sources and tests that
/// read `Finished` themselves), or [`Completions`] ([`Ack::batched`], from [`ack_channel`]),
/// where [`Ack::finish_all`] sends the completions of consecutive acks of one source as one
/// message, and an ack holds one shared reference instead of a sender of its own.
#[derive(Debug)]
pub struct Ack {
    route: Route,
    finished: Finished,
}

#[derive(Debug)]
enum Route {
    One(mpsc::UnboundedSender<Finished>),
    Batched(AckSender),
    /// `explain`, `replay`, tests: nowhere.
    Detached,
}

/// What travels back on an [`ack_channel`]: one completion, or those of several consecutive
/// acks ([`Ack::finish_all`]), in the order they were finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completions {
    One(Finished),
    Many(Vec<Finished>),
}

impl Completions {
    pub fn len(&self) -> usize {
        match self {
            Completions::One(_) => 1,
            Completions::Many(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sending side of an [`ack_channel`]: cloned into every [`Ack::batched`] as one reference
/// count (not a channel sender's two). The channel closes once the source's own handle and
/// every ack are gone, finished or dropped.
#[derive(Debug, Clone)]
pub struct AckSender(Arc<mpsc::UnboundedSender<Completions>>);

/// Hands `events` to the pipeline in order without waiting: what its queue does not take now
/// waits in `held` (and so does everything after it, to keep the order), for the source to
/// send once the queue has room. `true` when the pipeline is gone.
pub(crate) fn hand_over(
    events: impl IntoIterator<Item = SourceEvent>,
    out: &mpsc::Sender<SourceEvent>,
    held: &mut std::collections::VecDeque<SourceEvent>,
) -> bool {
    for event in events {
        if !held.is_empty() {
            held.push_back(event);
            continue;
        }
        match out.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => held.push_back(event),
            Err(mpsc::error::TrySendError::Closed(_)) => return true,
        }
    }
    false
}

/// A channel for [`Ack::batched`]: the source keeps the receiver (and drops its `AckSender` when
/// it stops reading, so that `recv` returns `None` once every ack is finished or dropped).
pub fn ack_channel() -> (AckSender, mpsc::UnboundedReceiver<Completions>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (AckSender(Arc::new(tx)), rx)
}

impl Ack {
    /// An ack that sends its [`Finished`] alone on `tx`.
    pub fn new(tx: mpsc::UnboundedSender<Finished>, finished: Finished) -> Ack {
        Ack { route: Route::One(tx), finished }
    }

    /// An ack on an [`ack_channel`]: [`Ack::finish_all`] batches it with its neighbours.
    pub fn batched(tx: &AckSender, finished: Finished) -> Ack {
        Ack { route: Route::Batched(tx.clone()), finished }
    }

    /// An ack that goes nowhere: for `explain`, `replay` and tests.
    pub fn detached() -> Ack {
        Ack { route: Route::Detached, finished: Finished { stream: 0, seq: 0 } }
    }

    /// The event is done: every sink finished it or it was dead-lettered.
    pub fn finish(self) {
        // The source may already be gone (shutdown); then there is nothing left to acknowledge.
        match self.route {
            Route::One(tx) => {
                let _ = tx.send(self.finished);
            }
            Route::Batched(tx) => {
                let _ = tx.0.send(Completions::One(self.finished));
            }
            Route::Detached => {}
        }
    }

    /// Finishes every ack of `acks`, exactly as calling [`Ack::finish`] on each in turn would,
    /// but consecutive acks of one [`ack_channel`] travel as one message: one send and at most
    /// one wake-up of the source for a whole batch, instead of one per event. Acks made with
    /// [`Ack::new`] are sent one by one, as `finish` does.
    ///
    /// The pipeline's finish stage and second pass return each unit's acks this way.
    pub fn finish_all(acks: impl IntoIterator<Item = Ack>) {
        let mut pending: Option<(AckSender, Vec<Finished>)> = None;
        let mut acks = acks.into_iter();
        while let Some(ack) = acks.next() {
            match ack.route {
                Route::Batched(tx) => match &mut pending {
                    Some((current, batch)) if Arc::ptr_eq(&current.0, &tx.0) => batch.push(ack.finished),
                    _ => {
                        flush(pending.take());
                        // Usually the rest of `acks` all go here.
                        let mut batch = Vec::with_capacity(acks.size_hint().0 + 1);
                        batch.push(ack.finished);
                        pending = Some((tx, batch));
                    }
                },
                route => {
                    // Keep the order of completions across channels as `finish` one by one would.
                    flush(pending.take());
                    Ack { route, finished: ack.finished }.finish();
                }
            }
        }
        flush(pending);

        fn flush(pending: Option<(AckSender, Vec<Finished>)>) {
            if let Some((tx, batch)) = pending {
                let message = match batch[..] {
                    [one] => Completions::One(one),
                    _ => Completions::Many(batch),
                };
                let _ = tx.0.send(message);
            }
        }
    }
}

#[cfg(test)]
mod ack_tests {
    use super::*;

    fn f(stream: u64, seq: i64) -> Finished {
        Finished { stream, seq }
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Completions>) -> Vec<Completions> {
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            out.push(c);
        }
        out
    }

    #[test]
    fn finish_all_sends_consecutive_acks_of_one_channel_as_one_message() {
        let (tx, mut rx) = ack_channel();
        Ack::finish_all((1..=5).map(|i| Ack::batched(&tx, f(1, i))));
        assert_eq!(drain(&mut rx), vec![Completions::Many((1..=5).map(|i| f(1, i)).collect())]);
        Ack::finish_all([Ack::batched(&tx, f(1, 6))]);
        assert_eq!(drain(&mut rx), vec![Completions::One(f(1, 6))]);
        Ack::finish_all(std::iter::empty());
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn finish_all_splits_where_the_channel_changes_and_keeps_the_order() {
        let (a, mut a_rx) = ack_channel();
        let (b, mut b_rx) = ack_channel();
        let (one, mut one_rx) = mpsc::unbounded_channel();
        Ack::finish_all([
            Ack::batched(&a, f(1, 1)),
            Ack::batched(&a, f(1, 2)),
            Ack::batched(&b, f(2, 1)),
            Ack::new(one.clone(), f(3, 1)),
            Ack::detached(),
            Ack::batched(&a, f(1, 3)),
            Ack::new(one, f(3, 2)),
        ]);
        assert_eq!(drain(&mut a_rx), vec![Completions::Many(vec![f(1, 1), f(1, 2)]), Completions::One(f(1, 3))]);
        assert_eq!(drain(&mut b_rx), vec![Completions::One(f(2, 1))]);
        assert_eq!(one_rx.try_recv(), Ok(f(3, 1)));
        assert_eq!(one_rx.try_recv(), Ok(f(3, 2)));
    }

    #[tokio::test]
    async fn the_channel_closes_once_every_ack_is_finished_or_dropped() {
        let (tx, mut rx) = ack_channel();
        let acks: Vec<Ack> = (1..=3).map(|i| Ack::batched(&tx, f(1, i))).collect();
        drop(tx);
        let mut acks = acks.into_iter();
        acks.next().expect("ack").finish();
        let dropped = acks.next().expect("ack");
        Ack::finish_all(acks);
        assert_eq!(rx.recv().await, Some(Completions::One(f(1, 1))));
        assert_eq!(rx.recv().await, Some(Completions::One(f(1, 3))));
        drop(dropped);
        assert_eq!(rx.recv().await, None, "a dropped ack sends nothing, and closes the channel last");
    }
}
