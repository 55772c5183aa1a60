//! Which offsets of which assigned partitions are in flight, what may be committed, and how many
//! message bytes the events in flight hold (`source.kafka.max_in_flight_bytes`).
//!
//! Shared between the source task (starts and finishes events) and librdkafka's rebalance
//! callbacks (assign and revoke), hence behind a mutex; every operation is O(log n) or better
//! and never blocks on I/O while the lock is held.

use std::collections::{HashMap, VecDeque};
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
    /// The sum of every assigned partition's [`Charges`].
    in_flight_bytes: usize,
}

#[derive(Debug)]
struct PartitionState {
    /// The shared topic name (the key of `topics`), handed out with each event.
    topic: Arc<str>,
    stream: u64,
    watermark: Watermark,
    /// The offset last sent in a commit request (async: it may still fail).
    last_committed: Option<i64>,
    charges: Charges,
}

/// The message bytes of one partition's events in flight, by offset: what each holds against
/// `source.kafka.max_in_flight_bytes` until it is finished. Offsets are charged in increasing
/// order (as the watermark starts them), so a release finds its offset at the front (events
/// usually finish in order) or by binary search.
#[derive(Debug, Default)]
struct Charges(VecDeque<(i64, usize)>);

impl Charges {
    fn charge(&mut self, offset: i64, bytes: usize) {
        self.0.push_back((offset, bytes));
    }

    /// The bytes `offset` held (0 when it holds none: never charged, or released already).
    fn release(&mut self, offset: i64) -> usize {
        let at = match self.0.front() {
            Some(&(o, _)) if o == offset => Some(0),
            _ => self.0.binary_search_by_key(&offset, |&(o, _)| o).ok(),
        };
        let bytes = at.and_then(|i| self.0.get_mut(i)).map_or(0, |(_, bytes)| std::mem::take(bytes));
        // Released entries hold 0 bytes: those at the front go (an entry charged 0 bytes that is
        // still in flight may go too: its release would free nothing anyway).
        while self.0.front().is_some_and(|&(_, bytes)| bytes == 0) {
            self.0.pop_front();
        }
        bytes
    }

    fn total(&self) -> usize {
        self.0.iter().map(|&(_, bytes)| bytes).sum()
    }
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
        PartitionState {
            topic: topic.clone(),
            stream: self.next_stream,
            watermark: Watermark::new(),
            last_committed: None,
            charges: Charges::default(),
        }
    }

    fn topic_key(&self, topic: &str) -> Arc<str> {
        self.topics.get_key_value(topic).map(|(k, _)| k.clone()).unwrap_or_else(|| Arc::from(topic))
    }

    /// A partition was assigned to this consumer: a fresh stream.
    pub(super) fn assign(&mut self, topic: &str, partition: i32) {
        let topic = self.topic_key(topic);
        let state = self.new_stream(&topic, partition);
        if let Some(old) = self.topics.entry(topic).or_default().insert(partition, state) {
            self.forget(&old);
        }
    }

    /// A stream's state is gone (revoked, or replaced by a new stream): its completions will be
    /// ignored, so its events stop counting against the byte bound now. They may still be in
    /// the pipeline for a while, bounded there by its queues (counted in events).
    fn forget(&mut self, old: &PartitionState) {
        self.streams.remove(&old.stream);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(old.charges.total());
    }

    /// A partition was taken away. Returns the offset to commit for it (what is finished), and
    /// forgets its unfinished work: those events will be redelivered to the new owner.
    pub(super) fn revoke(&mut self, topic: &str, partition: i32) -> Option<CommitPoint> {
        let parts = self.topics.get_mut(topic)?;
        let state = parts.remove(&partition)?;
        if parts.is_empty() {
            self.topics.remove(topic);
        }
        self.forget(&state);
        let offset = state.watermark.resume_from()?;
        Some(CommitPoint { topic: Arc::from(topic), partition, offset })
    }

    /// An event at `offset`, holding `bytes` of message, entered the pipeline. Returns its
    /// completion coordinates and the shared topic name.
    pub(super) fn start(&mut self, topic: &str, partition: i32, offset: i64, bytes: usize) -> (Finished, Arc<str>) {
        // The usual case: one lookup of the topic and one of the partition. (A failed `start`
        // changes nothing: the general case below tries again and begins a new stream.)
        if let Some(state) = self.topics.get_mut(topic).and_then(|p| p.get_mut(&partition)) {
            if state.watermark.start(offset).is_ok() {
                state.charges.charge(offset, bytes);
                self.in_flight_bytes = self.in_flight_bytes.saturating_add(bytes);
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
        let state = self.topics.get_mut(topic).and_then(|p| p.get_mut(&partition));
        let stream = match state {
            Some(state) => {
                state.charges.charge(offset, bytes);
                self.in_flight_bytes = self.in_flight_bytes.saturating_add(bytes);
                state.stream
            }
            None => 0,
        };
        (Finished { stream, seq: offset }, key)
    }

    /// An event is done. False when its partition was revoked meanwhile (ignored).
    pub(super) fn finish(&mut self, f: Finished) -> bool {
        let Some(state) = state(&self.streams, &mut self.topics, f.stream) else { return false };
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(state.charges.release(f.seq));
        state.watermark.finish(f.seq)
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
                    match state(&self.streams, &mut self.topics, stream) {
                        Some(state) => {
                            let mut released = state.charges.release(first.seq);
                            state.watermark.finish(first.seq);
                            while let Some(f) = all.next_if(|f| f.stream == stream) {
                                released += state.charges.release(f.seq);
                                state.watermark.finish(f.seq);
                            }
                            self.in_flight_bytes = self.in_flight_bytes.saturating_sub(released);
                        }
                        None => while all.next_if(|f| f.stream == stream).is_some() {},
                    }
                }
            }
        }
    }

    /// The message bytes of the events in flight (of the partitions still assigned).
    pub(super) fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
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

/// The state of a stream that is still assigned (a function of the two maps rather than a
/// method, so that the caller can update `in_flight_bytes` while holding it).
fn state<'a>(
    streams: &HashMap<u64, (Arc<str>, i32)>,
    topics: &'a mut HashMap<Arc<str>, HashMap<i32, PartitionState>>,
    stream: u64,
) -> Option<&'a mut PartitionState> {
    let (topic, partition) = streams.get(&stream)?;
    topics.get_mut(&**topic)?.get_mut(partition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_per_partition_only_what_is_finished() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        t.assign("t", 1);
        let (a, _) = t.start("t", 0, 5, 0);
        let (b, _) = t.start("t", 0, 6, 0);
        let (c, _) = t.start("t", 1, 100, 0);
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
        let (a, _) = t.start("t", 0, 1, 0);
        let (b, _) = t.start("t", 0, 2, 0);
        assert!(t.finish(a));
        let point = t.revoke("t", 0).unwrap();
        assert_eq!(point.offset, 2, "commit what is finished on revoke");
        assert!(!t.finish(b), "work of a revoked partition is dropped, not acknowledged");
        // Reassigned later: a new stream; the old completion still means nothing.
        t.assign("t", 0);
        let (c, _) = t.start("t", 0, 2, 0);
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
        let (a, _) = t.start("t", 0, 10, 0);
        let (b, _) = t.start("t", 0, 4, 0);
        assert_ne!(a.stream, b.stream);
        assert!(!t.finish(a));
        assert_eq!(t.commits_due(false)[0].offset, 4);
    }

    #[test]
    fn message_bytes_count_until_their_events_finish_in_any_order() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        t.assign("t", 1);
        let (a, _) = t.start("t", 0, 5, 100);
        let (b, _) = t.start("t", 0, 7, 20);
        let (c, _) = t.start("t", 1, 3, 3);
        let (d, _) = t.start("t", 0, 9, 0);
        assert_eq!(t.in_flight_bytes(), 123);
        assert!(t.finish(b));
        assert_eq!(t.in_flight_bytes(), 103, "out of order: 7 releases its own bytes");
        assert!(!t.finish(b));
        assert_eq!(t.in_flight_bytes(), 103, "a repeated ack releases nothing");
        t.finish_completions(Completions::Many(vec![c, a, d]));
        assert_eq!(t.in_flight_bytes(), 0);
        let (e, _) = t.start("t", 0, 10, 8);
        assert_eq!(t.in_flight_bytes(), 8, "charges go on after the front was released");
        assert!(t.finish(e));
        assert_eq!(t.in_flight_bytes(), 0);
    }

    #[test]
    fn a_revoked_or_restarted_partition_stops_counting() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        t.assign("t", 1);
        let (a, _) = t.start("t", 0, 1, 10);
        t.start("t", 1, 1, 5);
        t.revoke("t", 0);
        assert_eq!(t.in_flight_bytes(), 5, "the revoked partition's events are forgotten");
        assert!(!t.finish(a));
        assert_eq!(t.in_flight_bytes(), 5, "and their late acks release nothing");
        // An offset going backwards begins a new stream: the old one's charges go with it.
        let (b, _) = t.start("t", 1, 0, 7);
        assert_eq!(t.in_flight_bytes(), 7);
        assert!(t.finish(b));
        assert_eq!(t.in_flight_bytes(), 0);
        // Reassigned while events were in flight: the same.
        t.start("t", 1, 1, 4);
        t.assign("t", 1);
        assert_eq!(t.in_flight_bytes(), 0);
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
