//! The writer's acknowledgement rule, pure: given how every replica of a PG's acting set
//! answered one write sent at one PG epoch, what the writer does next.
//!
//! A write is acknowledged only when every replica of the acting set at one PG epoch made
//! it durable, and that set has at least the pool's `min_size` replicas (DESIGN invariant
//! 1). A replica that failed is taken out of the set by a Raft change (a new PG epoch), and
//! the write is sent again to the set at that epoch: the survivors then record it as dirty
//! for the replica that missed it, and a replica that failed halfway can never apply it
//! after a newer write, since it refuses anything made for an older epoch.

use model::{DiskId, OwnerEpoch, PgEpoch};

/// How one replica answered a write or zero sent at one PG epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Durable,
    /// The volume has a newer owner: this writer is fenced.
    Fenced {
        current: OwnerEpoch,
    },
    /// The replica is at a newer PG epoch than the one the write was sent at.
    NewerPgEpoch(PgEpoch),
    /// No answer in time, a lost connection, a failing or full disk, a replica behind Raft:
    /// whether it applied the write is unknown or it did not.
    Failed {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Acknowledge,
    Fenced {
        current: OwnerEpoch,
    },
    /// This writer's view of the PG is old: wait for the state to reach `at_least`, then
    /// send again to the acting set there.
    Refresh {
        at_least: PgEpoch,
    },
    /// Take these replicas out of the acting set seen at `seen`, then send again at the new
    /// epoch.
    TakeOut {
        seen: PgEpoch,
        disks: Vec<(DiskId, String)>,
    },
    /// Every acting replica has it, but fewer than `min_size` are acting: wait (bounded) for
    /// a replica to come back, then send again.
    BelowMinSize {
        acting: usize,
        min_size: u8,
    },
}

/// The verdict on a write sent at `epoch` to an acting set of `answers.len()` replicas.
pub fn verdict(epoch: PgEpoch, min_size: u8, answers: &[(DiskId, Answer)]) -> Verdict {
    assert!(!answers.is_empty(), "a PG always has an acting replica");
    if let Some(current) = answers.iter().find_map(|(_, a)| match a {
        Answer::Fenced { current } => Some(*current),
        _ => None,
    }) {
        return Verdict::Fenced { current };
    }
    let newest = answers.iter().filter_map(|(_, a)| match a {
        Answer::NewerPgEpoch(e) if *e > epoch => Some(*e),
        _ => None,
    });
    if let Some(at_least) = newest.max() {
        return Verdict::Refresh { at_least };
    }
    let failed: Vec<(DiskId, String)> = answers
        .iter()
        .filter_map(|(disk, a)| match a {
            Answer::Failed { reason } => Some((*disk, reason.clone())),
            // A replica that claims an epoch not newer than ours broke the protocol.
            Answer::NewerPgEpoch(e) => Some((*disk, format!("it claimed {e}, not newer than {epoch}"))),
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        return Verdict::TakeOut { seen: epoch, disks: failed };
    }
    if answers.len() < usize::from(min_size) {
        return Verdict::BelowMinSize { acting: answers.len(), min_size };
    }
    Verdict::Acknowledge
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK_A: DiskId = DiskId(10);
    const DISK_B: DiskId = DiskId(20);
    const DISK_C: DiskId = DiskId(30);
    const EPOCH: PgEpoch = PgEpoch(4);

    fn failed(reason: &str) -> Answer {
        Answer::Failed { reason: reason.into() }
    }

    #[test]
    fn a_write_every_acting_replica_made_durable_is_acknowledged() {
        let answers = [(DISK_A, Answer::Durable), (DISK_B, Answer::Durable)];
        assert_eq!(verdict(EPOCH, 1, &answers), Verdict::Acknowledge);
    }

    #[test]
    fn a_failed_replica_is_taken_out_before_anything_is_acknowledged() {
        let answers = [(DISK_A, Answer::Durable), (DISK_B, failed("no answer within 3000 ms"))];
        assert_eq!(
            verdict(EPOCH, 1, &answers),
            Verdict::TakeOut { seen: EPOCH, disks: vec![(DISK_B, "no answer within 3000 ms".into())] }
        );
    }

    #[test]
    fn a_single_acting_replica_is_enough_when_min_size_is_one() {
        assert_eq!(verdict(PgEpoch(5), 1, &[(DISK_A, Answer::Durable)]), Verdict::Acknowledge);
    }

    #[test]
    fn fewer_acting_replicas_than_min_size_wait_instead_of_acknowledging() {
        assert_eq!(verdict(EPOCH, 2, &[(DISK_A, Answer::Durable)]), Verdict::BelowMinSize { acting: 1, min_size: 2 });
    }

    #[test]
    fn a_newer_owner_anywhere_fences_the_write() {
        let answers =
            [(DISK_A, Answer::Durable), (DISK_B, Answer::Fenced { current: OwnerEpoch(9) }), (DISK_C, failed("lost"))];
        assert_eq!(verdict(EPOCH, 2, &answers), Verdict::Fenced { current: OwnerEpoch(9) });
    }

    #[test]
    fn a_replica_at_a_newer_pg_epoch_makes_the_writer_refresh_before_taking_anyone_out() {
        let answers = [
            (DISK_A, Answer::NewerPgEpoch(PgEpoch(6))),
            (DISK_B, Answer::NewerPgEpoch(PgEpoch(5))),
            (DISK_C, failed("lost")),
        ];
        assert_eq!(verdict(EPOCH, 2, &answers), Verdict::Refresh { at_least: PgEpoch(6) });
    }

    #[test]
    fn a_replica_claiming_an_epoch_that_is_not_newer_is_taken_out() {
        let answers = [(DISK_A, Answer::Durable), (DISK_B, Answer::NewerPgEpoch(EPOCH))];
        assert!(matches!(verdict(EPOCH, 1, &answers), Verdict::TakeOut { disks, .. } if disks[0].0 == DISK_B));
    }
}
