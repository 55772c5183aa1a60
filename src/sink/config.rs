//! `sinks`: the sections of each kind of sink, and `sinks.timing`. Each kind's section is a
//! [`SinkSection`] that checks itself, builds offline for `check`, and builds its sinks with
//! their layers; this file knows none of them: the `sink_sections!` invocation in
//! `src/sink/mod.rs` lists them, one line each.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{duration, Origin, Problem};
use crate::sink::Sink;
use crate::telemetry::Metrics;

/// Sinks with the layer each runs in (0 is purged first).
pub type Layered = Vec<(u8, Arc<dyn Sink>)>;

/// One kind of sink's section of `sinks` (`sinks.<field>`).
pub(crate) trait SinkSection {
    /// Whether the file configures any sink of this kind.
    fn is_configured(&self) -> bool;

    /// Checks the section and resolves its secrets. `names` holds the sink names taken so far
    /// (names label metrics, so they are unique across every kind); the section adds its own.
    fn validate(&mut self, origin: &Origin, names: &mut HashSet<String>, problems: &mut Vec<Problem>);

    /// What `run` would fail to build, found without connecting (called only on a config that
    /// is valid so far).
    fn check(&self, origin: &Origin, problems: &mut Vec<Problem>);

    /// The section's sinks with their layers (no network traffic yet).
    fn build(&self, metrics: &Arc<Metrics>, out: &mut Layered) -> Result<(), String>;
}

/// The registry of sink kinds, invoked once in `src/sink/mod.rs`: each line is
/// `field: Section,`, `sinks.<field>` in the file and `src/sink/<field>/` (or `<field>.rs`) for
/// its code. It declares the module and defines [`SinksConfig`] and the list of its sections.
macro_rules! sink_sections {
    ($($(#[$doc:meta])* $field:ident: $section:ty,)+) => {
        $(pub mod $field;)+

        /// `sinks`.
        #[derive(Debug, ::serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct SinksConfig {
            $($(#[$doc])* #[serde(default)] pub $field: $section,)+
            /// Layer order timing: delay between layers, second pass.
            #[serde(default)]
            pub timing: $crate::sink::config::LayerTiming,
        }

        impl SinksConfig {
            /// The sections, in registry order (the order names are checked in).
            fn sections(&self) -> Vec<&dyn $crate::sink::config::SinkSection> {
                vec![$(&self.$field as &dyn $crate::sink::config::SinkSection,)+]
            }

            fn sections_mut(&mut self) -> Vec<&mut dyn $crate::sink::config::SinkSection> {
                vec![$(&mut self.$field as &mut dyn $crate::sink::config::SinkSection,)+]
            }
        }
    };
}
pub(crate) use sink_sections;

pub use super::SinksConfig;

impl SinksConfig {
    /// Checks every section (at least one sink, unique names across all) and `sinks.timing`.
    pub(crate) fn validate(&mut self, origin: &Origin, problems: &mut Vec<Problem>) {
        if !self.sections().iter().any(|s| s.is_configured()) {
            problems.push(origin.problem(&["sinks"], "sinks needs at least one sink: add sinks.redis or sinks.cdn"));
        }
        let mut names = HashSet::new();
        for section in self.sections_mut() {
            section.validate(origin, &mut names, problems);
        }
        let t = &self.timing;
        if t.layer_delay > Duration::from_secs(600) || t.repeat_after > Duration::from_secs(3600) {
            problems.push(origin.problem(
                &["sinks", "timing"],
                "sinks.timing.layer_delay must be at most 10m and repeat_after at most 1h",
            ));
        }
        if t.repeat_max_events == 0 {
            problems.push(origin.problem(&["sinks", "timing", "repeat_max_events"], "must be at least 1"));
        }
    }

    /// What `run` would fail to build, found without connecting.
    pub(crate) fn check(&self, origin: &Origin, problems: &mut Vec<Problem>) {
        for section in self.sections() {
            section.check(origin, problems);
        }
    }

    /// Every configured sink with its layer, sorted by layer (stable within one).
    pub fn build(&self, metrics: &Arc<Metrics>) -> Result<Layered, String> {
        let mut layered = Layered::new();
        for section in self.sections() {
            section.build(metrics, &mut layered)?;
        }
        layered.sort_by_key(|(layer, _)| *layer);
        Ok(layered)
    }
}

/// `sinks.timing`: how the pipeline paces layers (Redis 0, Varnish-like caches 1, CDNs 2).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LayerTiming {
    /// Wait this long after a layer confirmed a batch before purging the next one out, so an
    /// edge cannot refill from an inner cache that is still being purged.
    #[serde(with = "duration")]
    pub layer_delay: Duration,
    /// Re-issue every batch's invalidations once more this long after the first pass (covers a
    /// reader that refilled a cache from a lagging replica); `0` (the default) turns it off.
    /// Positions wait for it (docs/cdn.md says why).
    #[serde(with = "duration")]
    pub repeat_after: Duration,
    /// At most this many events wait for their second pass; beyond, intake waits.
    pub repeat_max_events: usize,
}

impl Default for LayerTiming {
    fn default() -> Self {
        LayerTiming { layer_delay: Duration::ZERO, repeat_after: Duration::ZERO, repeat_max_events: 100_000 }
    }
}
