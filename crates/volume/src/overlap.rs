//! The writer's ordering of overlapping writes (DESIGN invariant 5): a write that overlaps
//! one in flight, or one queued before it, waits; every replica then sees overlapping
//! writes one at a time, in submission order. Pure: no IO, no clock.

use std::collections::VecDeque;
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriteId(pub u64);

#[derive(Debug, Default)]
pub struct OverlapQueue {
    next: u64,
    in_flight: Vec<(WriteId, Range<u64>)>,
    waiting: VecDeque<(WriteId, Range<u64>)>,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl OverlapQueue {
    /// Registers a write of `range`; returns its id and whether it may start now.
    pub fn submit(&mut self, range: Range<u64>) -> (WriteId, bool) {
        let id = WriteId(self.next);
        self.next += 1;
        let blocked = self.in_flight.iter().chain(self.waiting.iter()).any(|(_, r)| overlaps(r, &range));
        if blocked {
            self.waiting.push_back((id, range));
        } else {
            self.in_flight.push((id, range));
        }
        (id, !blocked)
    }

    /// Marks `id` done, or withdraws it if it was still waiting; returns the writes that
    /// may start now, in submission order.
    pub fn complete(&mut self, id: WriteId) -> Vec<WriteId> {
        if let Some(at) = self.in_flight.iter().position(|(w, _)| *w == id) {
            self.in_flight.swap_remove(at);
        } else {
            let at = self.waiting.iter().position(|(w, _)| *w == id).expect("completing a write that was submitted");
            self.waiting.remove(at);
        }
        let mut started = Vec::new();
        let mut still_waiting: VecDeque<(WriteId, Range<u64>)> = VecDeque::new();
        while let Some((wid, range)) = self.waiting.pop_front() {
            let blocked = self.in_flight.iter().chain(still_waiting.iter()).any(|(_, r)| overlaps(r, &range));
            if blocked {
                still_waiting.push_back((wid, range));
            } else {
                self.in_flight.push((wid, range));
                started.push(wid);
            }
        }
        self.waiting = still_waiting;
        started
    }

    /// The oldest write still in flight or waiting.
    pub fn oldest(&self) -> Option<WriteId> {
        self.in_flight.iter().chain(self.waiting.iter()).map(|(id, _)| *id).min()
    }

    /// The id the next write will get.
    pub fn next_id(&self) -> WriteId {
        WriteId(self.next)
    }

    pub fn check_invariants(&self) {
        for (i, (_, a)) in self.in_flight.iter().enumerate() {
            for (_, b) in &self.in_flight[i + 1..] {
                assert!(!overlaps(a, b), "overlapping writes {a:?} and {b:?} in flight together");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn disjoint_writes_start_at_once() {
        let mut queue = OverlapQueue::default();
        assert_eq!(queue.submit(0..4096), (WriteId(0), true));
        assert_eq!(queue.submit(4096..8192), (WriteId(1), true));
    }

    #[test]
    fn overlapping_write_waits_for_the_earlier_one() {
        let mut queue = OverlapQueue::default();
        let (first, _) = queue.submit(0..8192);
        assert_eq!(queue.submit(4096..12288), (WriteId(1), false));
        assert_eq!(queue.complete(first), vec![WriteId(1)]);
    }

    #[test]
    fn a_write_does_not_overtake_an_overlapping_queued_one() {
        let mut queue = OverlapQueue::default();
        let (a, _) = queue.submit(0..4096);
        let (b, _) = queue.submit(0..8192); // waits for a
        let (c, started) = queue.submit(4096..8192); // overlaps b, which is queued
        assert!(!started);
        assert_eq!(queue.complete(a), vec![b]);
        assert_eq!(queue.complete(b), vec![c]);
    }

    #[test]
    fn withdrawing_a_waiting_write_lets_the_next_one_start_when_free() {
        let mut queue = OverlapQueue::default();
        let (a, _) = queue.submit(0..4096);
        let (b, _) = queue.submit(0..8192);
        let (c, _) = queue.submit(4096..8192); // waits behind b only
        assert_eq!(queue.complete(b), vec![c]);
        assert_eq!(queue.complete(a), vec![]);
    }

    proptest! {
        #[test]
        fn overlapping_writes_never_run_together(ops in proptest::collection::vec((0u64..16, 1u64..4, any::<bool>()), 1..64)) {
            let mut queue = OverlapQueue::default();
            let mut running: Vec<WriteId> = Vec::new();
            for (start, len, complete_one) in ops {
                if complete_one && !running.is_empty() {
                    let id = running.remove(0);
                    running.extend(queue.complete(id));
                } else {
                    let (id, started) = queue.submit(start * 512..(start + len) * 512);
                    if started { running.push(id); }
                }
                queue.check_invariants();
            }
        }
    }
}
