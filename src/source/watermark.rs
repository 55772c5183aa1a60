//! Position tracking for one ordered stream: which events are still in flight, and the position
//! that can safely be acknowledged.
//!
//! Events finish out of order (a batch fails and is retried while a later one succeeds, a
//! dead letter is written slower than a delete), but a source position may only move past an
//! event once it *and every event before it* is finished. That is the whole promise of
//! at-least-once delivery, so it lives in one small, heavily tested type.

use std::collections::VecDeque;

/// Tracks started and finished positions of one stream (a Kafka partition, a PostgreSQL slot).
///
/// Positions must be started in increasing order; they need not be contiguous (Kafka offsets
/// skip over compacted records and transaction markers).
#[derive(Debug, Default)]
pub struct Watermark {
    /// In-flight and finished-but-not-yet-contiguous positions, in start order.
    window: VecDeque<(i64, bool)>,
    /// The highest position ever started.
    last_started: Option<i64>,
}

/// A position was started out of order: a source bug, surfaced instead of silently acknowledging
/// too much.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("position {got} started after {last}: positions must increase")]
pub struct OutOfOrder {
    pub got: i64,
    pub last: i64,
}

impl Watermark {
    pub fn new() -> Watermark {
        Watermark::default()
    }

    /// Records that the event at `pos` entered the pipeline.
    pub fn start(&mut self, pos: i64) -> Result<(), OutOfOrder> {
        if let Some(last) = self.last_started {
            if pos <= last {
                return Err(OutOfOrder { got: pos, last });
            }
        }
        self.last_started = Some(pos);
        self.window.push_back((pos, false));
        Ok(())
    }

    /// Records that the event at `pos` is finished. Returns false for a position that is not in
    /// flight (already finished, or never started): harmless, since acks may repeat.
    pub fn finish(&mut self, pos: i64) -> bool {
        // In order, the usual case: the front.
        let i = match self.window.front() {
            Some(&(p, _)) if p == pos => 0,
            _ => match self.window.binary_search_by_key(&pos, |&(p, _)| p) {
                Ok(i) => i,
                Err(_) => return false,
            },
        };
        if self.window[i].1 {
            return false;
        }
        self.window[i].1 = true;
        while self.window.front().is_some_and(|&(_, done)| done) {
            self.window.pop_front();
        }
        true
    }

    /// The position to resume from: everything strictly below it is finished. For Kafka that is
    /// exactly the offset to commit. `None` until something was started.
    pub fn resume_from(&self) -> Option<i64> {
        match self.window.front() {
            Some(&(pos, _)) => Some(pos),
            None => self.last_started.map(|p| p + 1),
        }
    }

    /// The highest position at or below which every event is finished (positions below the
    /// first one started count as finished: the source had already acknowledged them).
    pub fn finished_through(&self) -> Option<i64> {
        match self.window.front() {
            Some(&(pos, _)) => pos.checked_sub(1),
            None => self.last_started,
        }
    }

    /// Events started but not finished.
    pub fn in_flight(&self) -> usize {
        self.window.iter().filter(|&&(_, done)| !done).count()
    }

    /// True when nothing is in flight.
    pub fn is_idle(&self) -> bool {
        self.window.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_started_nothing_to_commit() {
        let w = Watermark::new();
        assert_eq!(w.resume_from(), None);
        assert!(w.is_idle());
    }

    #[test]
    fn commits_only_below_the_first_unfinished() {
        let mut w = Watermark::new();
        for p in [10, 11, 12, 15] {
            w.start(p).unwrap();
        }
        assert_eq!(w.resume_from(), Some(10));
        assert!(w.finish(11));
        assert!(w.finish(15));
        // 10 is still in flight: nothing may be committed past it.
        assert_eq!(w.resume_from(), Some(10));
        assert!(w.finish(10));
        assert_eq!(w.resume_from(), Some(12));
        assert!(w.finish(12));
        // All done: resume after the last one started, past the gap 13..14.
        assert_eq!(w.resume_from(), Some(16));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn repeated_and_unknown_acks_are_ignored() {
        let mut w = Watermark::new();
        w.start(1).unwrap();
        w.start(2).unwrap();
        assert!(w.finish(2));
        assert!(!w.finish(2));
        assert!(!w.finish(7));
        assert_eq!(w.resume_from(), Some(1));
    }

    #[test]
    fn out_of_order_start_is_an_error() {
        let mut w = Watermark::new();
        w.start(5).unwrap();
        assert_eq!(w.start(5), Err(OutOfOrder { got: 5, last: 5 }));
        assert_eq!(w.start(3), Err(OutOfOrder { got: 3, last: 5 }));
    }

    #[test]
    fn finished_through_tracks_the_contiguous_prefix() {
        let mut w = Watermark::new();
        for p in 1..=4 {
            w.start(p).unwrap();
        }
        w.finish(1);
        w.finish(3);
        assert_eq!(w.finished_through(), Some(1));
        w.finish(2);
        assert_eq!(w.finished_through(), Some(3));
        w.finish(4);
        assert_eq!(w.finished_through(), Some(4));
    }

    /// Any interleaving of finishes: the resume point never passes an unfinished event.
    #[test]
    fn randomised_never_passes_unfinished_work() {
        use rand::seq::SliceRandom;
        let mut rng = rand::rng();
        for _ in 0..200 {
            let mut w = Watermark::new();
            let mut positions: Vec<i64> = (0..50).map(|i| i * 3).collect();
            for &p in &positions {
                w.start(p).unwrap();
            }
            positions.shuffle(&mut rng);
            let mut done = std::collections::BTreeSet::new();
            for p in positions {
                w.finish(p);
                done.insert(p);
                let resume = w.resume_from().unwrap();
                // Every position below the resume point is finished...
                assert!((0..50).map(|i| i * 3).filter(|&q| q < resume).all(|q| done.contains(&q)));
                // ...and the resume point itself, if it is a started position, is not.
                if resume % 3 == 0 && resume < 150 {
                    assert!(!done.contains(&resume));
                }
            }
            assert_eq!(w.resume_from(), Some(148));
        }
    }
}
