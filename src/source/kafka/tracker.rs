//! Which offsets of which assigned partitions are in flight, and what may be committed.
//!
//! Shared between the source task (starts and finishes events) and librdkafka's rebalance
//! callbacks (assign and revoke), hence behind a mutex; every operation is O(log n) or better
//! and never blocks on I/O while the lock is held.

use std::collections::HashMap;
use std::sync::Arc;

use crate::source::watermark::Watermark;
use crate::source::{Completions, Finished};

#[derive(Debug, Default)]
pub(super) struct Tracker {
    /// topic -> partition -> state, for the current assignment only.
    topics: HashMap<Arc<str>, HashMap<i32, PartitionState>>,
    /// Assignment instance ("stream") id -> partition. A revoked partition's stream disappears,
    /// so completions of its abandoned work are recognised and ignored.
    streams: HashMap<u64, (Arc<str>, i32)>,
    next_stream: u64,
    /// Set while the pipeline is full: partitions assigned meanwhile start paused too.
    pub(super) paused: bool,
}

#[derive(Debug)]
struct PartitionState {
    /// The shared topic name (the key of `topics`), handed out with each event.
    topic: Arc<str>,
    stream: u64,
    watermark: Watermark,
    /// The offset last sent in a commit request (async: it may still fail).
    last_committed: Option<i64>,
}

/// One partition's offset to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CommitPoint {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

impl Tracker {
    fn new_stream(&mut self, topic: &Arc<str>, partition: i32) -> PartitionState {
        self.next_stream += 1;
        self.streams.insert(self.next_stream, (topic.clone(), partition));
        PartitionState { topic: topic.clone(), stream: self.next_stream, watermark: Watermark::new(), last_committed: None }
    }

    fn topic_key(&self, topic: &str) -> Arc<str> {
        self.topics.get_key_value(topic).map(|(k, _)| k.clone()).unwrap_or_else(|| Arc::from(topic))
    }

    /// A partition was assigned to this consumer: a fresh stream.
    pub(super) fn assign(&mut self, topic: &str, partition: i32) {
        let topic = self.topic_key(topic);
        let state = self.new_stream(&topic, partition);
        if let Some(old) = self.topics.entry(topic).or_default().insert(partition, state) {
            self.streams.remove(&old.stream);
        }
    }

    /// A partition was taken away. Returns the offset to commit for it (what is finished), and
    /// forgets its unfinished work: those events will be redelivered to the new owner.
    pub(super) fn revoke(&mut self, topic: &str, partition: i32) -> Option<CommitPoint> {
        let parts = self.topics.get_mut(topic)?;
        let state = parts.remove(&partition)?;
        if parts.is_empty() {
            self.topics.remove(topic);
        }
        self.streams.remove(&state.stream);
        let offset = state.watermark.resume_from()?;
        Some(CommitPoint { topic: Arc::from(topic), partition, offset })
    }

    /// An event at `offset` entered the pipeline. Returns its completion coordinates and the
    /// shared topic name.
    pub(super) fn start(&mut self, topic: &str, partition: i32, offset: i64) -> (Finished, Arc<str>) {
        // The usual case: one lookup of the topic and one of the partition. (A failed `start`
        // changes nothing: the general case below tries again and begins a new stream.)
        if let Some(state) = self.topics.get_mut(topic).and_then(|p| p.get_mut(&partition)) {
            if state.watermark.start(offset).is_ok() {
                return (Finished { stream: state.stream, seq: offset }, state.topic.clone());
            }
        }
        let key = self.topic_key(topic);
        let exists = self.topics.get(topic).is_some_and(|p| p.contains_key(&partition));
        if !exists {
            // A message before its assignment callback: should not happen, but track it rather
            // than lose it.
            self.assign(topic, partition);
        }
        let mut fresh = None;
        {
            let state = self.topics.get_mut(topic).and_then(|p| p.get_mut(&partition));
            if let Some(state) = state {
                if state.watermark.start(offset).is_err() {
                    // The offset went backwards (an offset reset or a re-fetch): begin a new stream
                    // so nothing before `offset` is ever committed on the strength of old acks.
                    fresh = Some(());
                }
            }
        }
        if fresh.is_some() {
            self.assign(topic, partition);
            if let Some(state) = self.topics.get_mut(topic).and_then(|p| p.get_mut(&partition)) {
                let _ = state.watermark.start(offset);
            }
        }
        let stream = self.topics.get(topic).and_then(|p| p.get(&partition)).map(|s| s.stream).unwrap_or(0);
        (Finished { stream, seq: offset }, key)
    }

    /// An event is done. False when its partition was revoked meanwhile (ignored).
    pub(super) fn finish(&mut self, f: Finished) -> bool {
        self.watermark(f.stream).is_some_and(|w| w.finish(f.seq))
    }

    /// The watermark of a stream that is still assigned.
    fn watermark(&mut self, stream: u64) -> Option<&mut Watermark> {
        let (topic, partition) = self.streams.get(&stream)?;
        self.topics.get_mut(&**topic)?.get_mut(partition).map(|s| &mut s.watermark)
    }

    /// Events are done: the same as [`Tracker::finish`] on each in turn, with one lookup for
    /// each run of completions of one stream.
    pub(super) fn finish_completions(&mut self, completions: Completions) {
        match completions {
            Completions::One(f) => {
                self.finish(f);
            }
            Completions::Many(all) => {
                let mut all = all.into_iter().peekable();
                while let Some(first) = all.next() {
                    let stream = first.stream;
                    match self.watermark(stream) {
                        Some(w) => {
                            w.finish(first.seq);
                            while let Some(f) = all.next_if(|f| f.stream == stream) {
                                w.finish(f.seq);
                            }
                        }
                        None => while all.next_if(|f| f.stream == stream).is_some() {},
                    }
                }
            }
        }
    }

    /// Offsets that moved since they were last sent (all of them when `force`), marked as sent.
    pub(super) fn commits_due(&mut self, force: bool) -> Vec<CommitPoint> {
        let mut out = Vec::new();
        for (topic, parts) in &mut self.topics {
            for (&partition, state) in parts.iter_mut() {
                let Some(offset) = state.watermark.resume_from() else { continue };
                if force || state.last_committed != Some(offset) {
                    state.last_committed = Some(offset);
                    out.push(CommitPoint { topic: topic.clone(), partition, offset });
                }
            }
        }
        out
    }

    /// Every assigned partition's commit point, whether or not it moved (final commit).
    pub(super) fn all_commit_points(&mut self) -> Vec<CommitPoint> {
        self.commits_due(true)
    }

    pub(super) fn assigned(&self) -> usize {
        self.topics.values().map(HashMap::len).sum()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.topics.values().flat_map(|p| p.values()).map(|s| s.watermark.in_flight()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_per_partition_only_what_is_finished() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        t.assign("t", 1);
        let (a, _) = t.start("t", 0, 5);
        let (b, _) = t.start("t", 0, 6);
        let (c, _) = t.start("t", 1, 100);
        assert!(t.finish(b));
        assert!(t.finish(c));
        let mut points = t.commits_due(false);
        points.sort_by_key(|p| p.partition);
        assert_eq!(points[0].offset, 5, "offset 5 is unfinished: partition 0 stays at 5");
        assert_eq!(points[1].offset, 101);
        assert!(t.commits_due(false).is_empty(), "nothing moved");
        assert!(t.finish(a));
        assert_eq!(t.commits_due(false), vec![CommitPoint { topic: "t".into(), partition: 0, offset: 7 }]);
    }

    #[test]
    fn revoked_partitions_ignore_late_acks() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        let (a, _) = t.start("t", 0, 1);
        let (b, _) = t.start("t", 0, 2);
        assert!(t.finish(a));
        let point = t.revoke("t", 0).unwrap();
        assert_eq!(point.offset, 2, "commit what is finished on revoke");
        assert!(!t.finish(b), "work of a revoked partition is dropped, not acknowledged");
        // Reassigned later: a new stream; the old completion still means nothing.
        t.assign("t", 0);
        let (c, _) = t.start("t", 0, 2);
        assert_ne!(c.stream, b.stream);
        assert!(!t.finish(b));
        assert_eq!(t.commits_due(false)[0].offset, 2);
        assert!(t.finish(c));
        assert_eq!(t.commits_due(false)[0].offset, 3);
    }

    #[test]
    fn offset_going_backwards_starts_a_new_stream() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        let (a, _) = t.start("t", 0, 10);
        let (b, _) = t.start("t", 0, 4);
        assert_ne!(a.stream, b.stream);
        assert!(!t.finish(a));
        assert_eq!(t.commits_due(false)[0].offset, 4);
    }

    #[test]
    fn nothing_received_nothing_committed() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        assert!(t.commits_due(true).is_empty());
        assert_eq!(t.revoke("t", 0), None);
        assert_eq!(t.assigned(), 0);
    }
}
