//! Mapping placement groups to disks: every PG gets `R` disks on distinct nodes, disks get
//! PGs in proportion to their size, and a change of disks moves as few replicas as it can.

use model::{ClusterState, DiskId, NodeId};
use std::collections::BTreeMap;

/// A disk placement may use, weighted by its capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CandidateDisk {
    pub disk: DiskId,
    pub node: NodeId,
    pub extent_slots: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("{replicas} replicas need disks on {replicas} different nodes, but only {nodes} node(s) have disks: add disks on more nodes or lower --replicas")]
    NotEnoughNodes { replicas: u8, nodes: usize },
}

/// Replicas that must hold a write before it is acknowledged, for a replication factor:
/// one fewer than all (at least one), so a pool keeps serving writes with one replica
/// down, and R=3 still keeps two copies of everything acknowledged.
pub fn min_size(replicas: u8) -> u8 {
    replicas.saturating_sub(1).max(1)
}

/// The default pool name for a replication factor.
pub fn pool_name(replicas: u8) -> String {
    format!("replicated-{replicas}")
}

/// The disks of every node in `state`.
fn candidates(state: &ClusterState) -> Vec<CandidateDisk> {
    state
        .disks
        .values()
        .filter(|d| state.nodes.contains_key(&d.node))
        .map(|d| CandidateDisk { disk: d.id, node: d.node, extent_slots: d.extent_slots.max(1) })
        .collect()
}

/// Places a new pool of `pg_count` PGs with `replicas` disks each over the cluster's disks.
pub fn place_pool(state: &ClusterState, replicas: u8, pg_count: u32) -> Result<Vec<Vec<DiskId>>, PlacementError> {
    let empty = vec![Vec::new(); pg_count as usize];
    rebalance(&empty, &candidates(state), replicas)
}

/// Adjusts `current` (PG index -> disks) to `disks`: drops vanished disks, fills PGs short
/// of `replicas`, then moves single replicas from the fullest disk to the emptiest while
/// that makes the spread strictly more even. Deterministic: ties go to the lowest id.
pub fn rebalance(
    current: &[Vec<DiskId>],
    disks: &[CandidateDisk],
    replicas: u8,
) -> Result<Vec<Vec<DiskId>>, PlacementError> {
    let by_id: BTreeMap<DiskId, CandidateDisk> = disks.iter().map(|d| (d.disk, *d)).collect();
    let mut nodes: Vec<NodeId> = disks.iter().map(|d| d.node).collect();
    nodes.sort();
    nodes.dedup();
    if nodes.len() < usize::from(replicas) {
        return Err(PlacementError::NotEnoughNodes { replicas, nodes: nodes.len() });
    }
    let mut pgs: Vec<Vec<DiskId>> =
        current.iter().map(|pg| pg.iter().copied().filter(|d| by_id.contains_key(d)).collect()).collect();
    let mut load: BTreeMap<DiskId, u64> = by_id.keys().map(|&d| (d, 0)).collect();
    for disk in pgs.iter().flatten() {
        *load.get_mut(disk).expect("kept disks are candidates") += 1;
    }
    for pg in pgs.iter_mut() {
        pg.truncate(usize::from(replicas));
        while pg.len() < usize::from(replicas) {
            let best = by_id
                .values()
                .filter(|d| allowed(pg, d, &by_id, None))
                .min_by(|a, b| fill_cmp(load[&a.disk] + 1, a, load[&b.disk] + 1, b).then(a.disk.cmp(&b.disk)))
                .expect("enough nodes were checked above");
            pg.push(best.disk);
            *load.get_mut(&best.disk).expect("candidate") += 1;
        }
    }
    // Each move strictly lowers the weighted sum of squared fills, so this terminates; the
    // bound is a backstop against a bug, not a limit we expect to reach.
    let moves_max = pgs.len() * usize::from(replicas) * by_id.len().max(1);
    for _ in 0..moves_max {
        if !move_one(&mut pgs, &mut load, &by_id) {
            break;
        }
    }
    Ok(pgs)
}

/// May `disk` join `pg`, given `leaving` is about to leave it?
fn allowed(
    pg: &[DiskId],
    disk: &CandidateDisk,
    by_id: &BTreeMap<DiskId, CandidateDisk>,
    leaving: Option<DiskId>,
) -> bool {
    pg.iter().filter(|&&d| Some(d) != leaving).all(|d| *d != disk.disk && by_id[d].node != disk.node)
}

/// Compares the fills `la / a.extent_slots` and `lb / b.extent_slots` without division.
fn fill_cmp(la: u64, a: &CandidateDisk, lb: u64, b: &CandidateDisk) -> std::cmp::Ordering {
    (u128::from(la) * u128::from(b.extent_slots)).cmp(&(u128::from(lb) * u128::from(a.extent_slots)))
}

/// Moves one replica from a fuller disk to an emptier one if that evens the spread.
fn move_one(
    pgs: &mut [Vec<DiskId>],
    load: &mut BTreeMap<DiskId, u64>,
    by_id: &BTreeMap<DiskId, CandidateDisk>,
) -> bool {
    let mut order: Vec<&CandidateDisk> = by_id.values().collect();
    order.sort_by(|a, b| fill_cmp(load[&a.disk], a, load[&b.disk], b).then(a.disk.cmp(&b.disk)));
    for over in order.iter().rev() {
        for under in order.iter() {
            // Worth it only if `over` stays at least as full as `under` becomes.
            let improves = fill_cmp(load[&over.disk], over, load[&under.disk] + 1, under).is_gt();
            if !improves {
                break;
            }
            let found = pgs.iter().position(|pg| pg.contains(&over.disk) && allowed(pg, under, by_id, Some(over.disk)));
            if let Some(index) = found {
                let slot = pgs[index].iter().position(|d| *d == over.disk).expect("pg holds over");
                pgs[index][slot] = under.disk;
                *load.get_mut(&over.disk).expect("candidate") -= 1;
                *load.get_mut(&under.disk).expect("candidate") += 1;
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_size_keeps_writes_going_with_one_replica_down() {
        assert_eq!([min_size(1), min_size(2), min_size(3)], [1, 1, 2]);
    }
    use proptest::prelude::*;

    fn disk(id: u64, node: u64) -> CandidateDisk {
        CandidateDisk { disk: DiskId(id), node: NodeId(node), extent_slots: 1000 }
    }

    fn loads(pgs: &[Vec<DiskId>]) -> BTreeMap<DiskId, usize> {
        let mut loads = BTreeMap::new();
        for d in pgs.iter().flatten() {
            *loads.entry(*d).or_insert(0) += 1;
        }
        loads
    }

    fn moved(before: &[Vec<DiskId>], after: &[Vec<DiskId>]) -> usize {
        before.iter().zip(after).map(|(b, a)| b.iter().filter(|d| !a.contains(d)).count()).sum()
    }

    #[test]
    fn three_nodes_two_replicas_spread_within_one() {
        let disks = [disk(1, 1), disk(2, 2), disk(3, 3)];
        let pgs = rebalance(&vec![vec![]; 128], &disks, 2).unwrap();
        let counts: Vec<usize> = loads(&pgs).values().copied().collect();
        assert_eq!(counts, vec![86, 85, 85]);
    }

    #[test]
    fn too_few_nodes_is_a_clear_error() {
        let disks = [disk(1, 1), disk(2, 1)];
        let refused = rebalance(&vec![vec![]; 8], &disks, 2);
        assert_eq!(refused, Err(PlacementError::NotEnoughNodes { replicas: 2, nodes: 1 }));
    }

    #[test]
    fn adding_a_fourth_disk_moves_only_its_fair_share() {
        let three = [disk(1, 1), disk(2, 2), disk(3, 3)];
        let before = rebalance(&vec![vec![]; 128], &three, 2).unwrap();
        let four = [disk(1, 1), disk(2, 2), disk(3, 3), disk(4, 4)];

        let after = rebalance(&before, &four, 2).unwrap();

        // 256 replicas over 4 disks: the new disk takes 64, and nothing else moves.
        assert_eq!(moved(&before, &after), 64);
        assert_eq!(loads(&after)[&DiskId(4)], 64);
    }

    #[test]
    fn bigger_disks_get_proportionally_more() {
        let mut big = disk(3, 3);
        big.extent_slots = 2000;
        let disks = [disk(1, 1), disk(2, 2), big, disk(4, 4)];
        let pgs = rebalance(&vec![vec![]; 100], &disks, 2).unwrap();
        assert_eq!(loads(&pgs)[&DiskId(3)], 80);
    }

    fn cluster() -> impl Strategy<Value = (Vec<CandidateDisk>, u8, u32)> {
        (2u64..7, 1u64..4, 1u8..=3, 1u32..200).prop_map(|(nodes, per_node, replicas, pgs)| {
            let disks = (0..nodes * per_node).map(|i| disk(100 + i, i % nodes)).collect();
            (disks, replicas.min(nodes as u8), pgs)
        })
    }

    proptest! {
        #[test]
        fn every_pg_has_r_disks_on_distinct_nodes((disks, replicas, pg_count) in cluster()) {
            let pgs = rebalance(&vec![vec![]; pg_count as usize], &disks, replicas).unwrap();
            for pg in &pgs {
                let mut nodes: Vec<NodeId> = pg.iter().map(|d| disks.iter().find(|c| c.disk == *d).unwrap().node).collect();
                nodes.sort();
                nodes.dedup();
                prop_assert_eq!(nodes.len(), usize::from(replicas));
            }
        }

        #[test]
        fn equal_disks_on_one_disk_per_node_differ_by_at_most_one(nodes in 2u64..8, replicas in 1u8..=3, pg_count in 1u32..300) {
            let replicas = replicas.min(nodes as u8);
            let disks: Vec<_> = (0..nodes).map(|i| disk(i, i)).collect();
            let pgs = rebalance(&vec![vec![]; pg_count as usize], &disks, replicas).unwrap();
            let counts = loads(&pgs);
            let max = disks.iter().map(|d| counts.get(&d.disk).copied().unwrap_or(0)).max().unwrap();
            let min = disks.iter().map(|d| counts.get(&d.disk).copied().unwrap_or(0)).min().unwrap();
            prop_assert!(max - min <= 1, "spread {min}..{max}");
        }

        #[test]
        fn adding_a_disk_moves_at_most_its_fair_share_plus_one_per_disk(nodes in 2u64..7, replicas in 1u8..=3, pg_count in 16u32..256) {
            let replicas = replicas.min(nodes as u8);
            let disks: Vec<_> = (0..nodes).map(|i| disk(i, i)).collect();
            let before = rebalance(&vec![vec![]; pg_count as usize], &disks, replicas).unwrap();
            let mut grown = disks.clone();
            grown.push(disk(99, 99));

            let after = rebalance(&before, &grown, replicas).unwrap();

            let fair_share = (pg_count as usize * usize::from(replicas)).div_ceil(grown.len());
            prop_assert!(moved(&before, &after) <= fair_share + grown.len(), "moved {} > {}", moved(&before, &after), fair_share);
        }

        #[test]
        fn rebalancing_a_balanced_map_moves_nothing((disks, replicas, pg_count) in cluster()) {
            let pgs = rebalance(&vec![vec![]; pg_count as usize], &disks, replicas).unwrap();
            let again = rebalance(&pgs, &disks, replicas).unwrap();
            prop_assert_eq!(moved(&pgs, &again), 0);
        }
    }
}
