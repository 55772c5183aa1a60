//! Which LSN may be confirmed to the server.
//!
//! Every event of a replication connection gets a sequence number (1, 2, ...); the shared
//! [`Watermark`] says up to which sequence number everything is finished. Each committed
//! transaction leaves a *boundary*: (its last event's sequence number, its Commit `end_lsn`).
//! The confirmed flush LSN is the end LSN of the newest boundary at or below the watermark,
//! i.e. of the newest transaction whose every event, and every earlier event, is finished.
//! A transaction with no event of interest leaves a boundary at the previous event's number,
//! so it is confirmed as soon as what came before it is.
//!
//! Keepalives between transactions also leave a boundary (at the server's WAL position): on a
//! database whose published tables are quiet while others are busy, pgoutput sends nothing at
//! all (PostgreSQL 15 skips empty transactions), and without this the slot would retain WAL
//! until `max_slot_wal_keep_size` and then be lost.
//!
//! A new connection is a new *stream*: the server replays everything after the LSN it had
//! confirmed, so completions of the old connection's events mean nothing any more.

use std::collections::VecDeque;

use crate::source::watermark::Watermark;
use crate::source::Finished;

#[derive(Debug)]
pub(crate) struct Tracker {
    stream: u64,
    next_seq: i64,
    watermark: Watermark,
    /// (last sequence number of a transaction, its end LSN), both increasing.
    boundaries: VecDeque<(i64, u64)>,
    /// The LSN that may be reported as flushed: everything before it is finished.
    confirmed: u64,
    /// Between Begin and Commit: keepalives leave no boundary there.
    in_transaction: bool,
}

impl Tracker {
    /// A tracker for stream `stream` starting at the server's confirmed position.
    pub fn new(stream: u64, confirmed: u64) -> Tracker {
        Tracker {
            stream,
            next_seq: 1,
            watermark: Watermark::new(),
            boundaries: VecDeque::new(),
            confirmed,
            in_transaction: false,
        }
    }

    /// A new connection: forget the old stream's work (it will be replayed) but keep the
    /// confirmed position.
    pub fn reset(&mut self, stream: u64) {
        *self = Tracker::new(stream, self.confirmed);
    }

    pub fn begin(&mut self) {
        self.in_transaction = true;
    }

    /// An event entered the pipeline: its completion coordinates.
    pub fn start(&mut self) -> Finished {
        let seq = self.next_seq;
        self.next_seq += 1;
        // Sequence numbers are assigned here in increasing order: start cannot fail.
        let _ = self.watermark.start(seq);
        Finished { stream: self.stream, seq }
    }

    /// The transaction whose events were started since `begin` committed, ending at `end_lsn`.
    pub fn commit(&mut self, end_lsn: u64) {
        self.in_transaction = false;
        self.boundary(end_lsn);
    }

    /// The server says its WAL reaches `lsn` (a keepalive). Outside a transaction everything
    /// before it has been sent, so once what we hold is finished, `lsn` may be confirmed.
    pub fn idle_at(&mut self, lsn: u64) {
        if !self.in_transaction {
            self.boundary(lsn);
        }
    }

    fn boundary(&mut self, lsn: u64) {
        let newest = self.boundaries.back().map_or(self.confirmed, |&(_, l)| l);
        if lsn <= newest {
            return;
        }
        let last = self.next_seq - 1;
        match self.boundaries.back_mut() {
            // Same last event (no event since): the newer LSN supersedes.
            Some(b) if b.0 == last => b.1 = lsn,
            _ => self.boundaries.push_back((last, lsn)),
        }
        self.advance();
    }

    /// An event is finished. False for another stream's event or a repeated ack (ignored).
    pub fn finish(&mut self, f: Finished) -> bool {
        if f.stream != self.stream {
            return false;
        }
        let moved = self.watermark.finish(f.seq);
        if moved {
            self.advance();
        }
        moved
    }

    fn advance(&mut self) {
        let through = self.watermark.finished_through().unwrap_or(0);
        while let Some(&(seq, lsn)) = self.boundaries.front() {
            if seq > through {
                break;
            }
            self.confirmed = self.confirmed.max(lsn);
            self.boundaries.pop_front();
        }
    }

    /// The confirmed flush LSN.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    pub fn in_flight(&self) -> usize {
        self.watermark.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_a_transaction_only_when_all_its_events_are_finished() {
        let mut t = Tracker::new(1, 100);
        t.begin();
        let a = t.start();
        let b = t.start();
        t.commit(200);
        t.begin();
        let c = t.start();
        t.commit(300);
        assert!(t.finish(b));
        assert!(t.finish(c));
        assert_eq!(t.confirmed(), 100, "a is unfinished: neither transaction is confirmed");
        assert!(t.finish(a));
        assert_eq!(t.confirmed(), 300);
    }

    #[test]
    fn a_transaction_is_not_confirmed_before_its_commit_arrives() {
        let mut t = Tracker::new(1, 100);
        t.begin();
        let a = t.start();
        t.finish(a);
        t.idle_at(250); // a keepalive mid-transaction
        assert_eq!(t.confirmed(), 100);
        t.commit(200);
        assert_eq!(t.confirmed(), 200);
    }

    #[test]
    fn empty_transactions_and_keepalives_follow_what_came_before() {
        let mut t = Tracker::new(1, 100);
        t.begin();
        let a = t.start();
        t.commit(200);
        t.begin();
        t.commit(300); // no event of interest
        t.idle_at(400);
        assert_eq!(t.confirmed(), 100, "everything waits for a");
        t.finish(a);
        assert_eq!(t.confirmed(), 400);
        // Nothing in flight: an empty transaction is confirmed at once.
        t.begin();
        t.commit(500);
        assert_eq!(t.confirmed(), 500);
        // And a position never goes back.
        t.idle_at(450);
        assert_eq!(t.confirmed(), 500);
    }

    #[test]
    fn a_new_stream_ignores_old_completions() {
        let mut t = Tracker::new(1, 100);
        t.begin();
        let a = t.start();
        t.commit(200);
        t.reset(2);
        assert!(!t.finish(a));
        assert_eq!(t.confirmed(), 100);
        t.begin();
        let b = t.start();
        t.commit(200);
        assert_eq!(b.seq, 1);
        assert!(!t.finish(Finished { stream: 1, seq: 1 }));
        assert!(t.finish(b));
        assert_eq!(t.confirmed(), 200);
    }

    /// Random completion orders: the confirmed LSN never passes a transaction with an
    /// unfinished event.
    #[test]
    fn randomised_never_confirms_unfinished_work() {
        use rand::seq::SliceRandom;
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..200 {
            let mut t = Tracker::new(1, 0);
            let mut events = Vec::new(); // (finished, end lsn of its transaction)
            let mut lsn = 0;
            for _ in 0..30 {
                t.begin();
                lsn += 10;
                for _ in 0..rng.random_range(0..4) {
                    events.push((t.start(), lsn));
                }
                t.commit(lsn);
            }
            events.shuffle(&mut rng);
            let mut done = Vec::new();
            for (f, end) in events.iter().copied() {
                t.finish(f);
                done.push(f.seq);
                let confirmed = t.confirmed();
                for (g, e) in &events {
                    if *e <= confirmed {
                        assert!(done.contains(&g.seq), "confirmed {confirmed} past unfinished event of tx {e}");
                    }
                }
                let _ = end;
            }
            assert_eq!(t.confirmed(), lsn);
        }
    }
}
