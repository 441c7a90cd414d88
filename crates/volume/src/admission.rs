//! A replica's accept/refuse decision for one request, as a pure function of the request,
//! the cluster state this node has applied, and the newest epochs its gates have let
//! through. No IO, no clock: `ReplicaService` acts on the outcome.
//!
//! The checks, in order: the request is for this cluster and a disk of this node; a data
//! change carries an owner epoch that is neither older than the volume's (fencing, DESIGN
//! invariant 3) nor newer than this node knows; the extent is in the PG named; the PG epoch
//! is the one this node is at; and the disk is in the PG's acting set, or out of it for a
//! resync copy.

use crate::wire::{Request, Status};
use model::{ClusterState, OwnerEpoch, PgEpoch, PoolId};

/// What a replica does with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Serve it on `disk`. A data change made while the PG is degraded is recorded as dirty
    /// first, so the replicas that are out get it when they come back.
    Accept {
        pool: PoolId,
        record_dirty: bool,
    },
    /// The request was made at an epoch this node has not applied yet: wait for the state
    /// to catch up (bounded), then decide again.
    WaitForState,
    Refuse(Refusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub message: String,
}

/// The newest epochs this replica's gates have let a data change through with: a change
/// made for an older one could land after a newer one, so it is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gates {
    pub owner_epoch: OwnerEpoch,
    pub pg_epoch: PgEpoch,
}

fn refuse(status: Status, message: String) -> Admission {
    Admission::Refuse(Refusal { status, message })
}

/// Decides what to do with `request`, sent to `request.disk`; `local` says whether that disk
/// is one of this node's.
pub fn admit(request: &Request, local: bool, state: &ClusterState, gates: Gates) -> Admission {
    let Some(cluster) = &state.cluster else {
        return Admission::WaitForState;
    };
    if request.cluster != cluster.id {
        let message = format!("the request is for cluster {}; this node is in cluster {}", request.cluster, cluster.id);
        return refuse(Status::WrongTarget, message);
    }
    if !local {
        return refuse(Status::WrongTarget, format!("{} is not a disk of this node", request.disk));
    }
    let owner_fenced = request.changes_data() && !request.resync;
    if owner_fenced && request.owner_epoch == OwnerEpoch(0) {
        return refuse(Status::Invalid, "writes need an owner epoch; acquire the volume first".into());
    }
    let Some(volume) = state.volumes.get(&request.volume) else {
        if request.volume >= state.next_volume_id {
            return Admission::WaitForState;
        }
        return refuse(Status::NotHere, format!("{} was deleted", request.volume));
    };
    if owner_fenced && request.owner_epoch > volume.owner_epoch {
        return Admission::WaitForState;
    }
    let newest_owner = volume.owner_epoch.max(gates.owner_epoch);
    if owner_fenced && request.owner_epoch < newest_owner {
        let message = format!("{} is owned with {newest_owner}; {} is stale", volume.id, request.owner_epoch);
        return refuse(Status::StaleOwnerEpoch, message);
    }
    let Some(pool) = state.pools.get(&volume.pool) else {
        return refuse(Status::NotHere, format!("the pool of {} is unknown here", volume.id));
    };
    let (pg, placement) = pool.pg_for(volume.id, request.extent);
    if pg != request.pg {
        return refuse(Status::Invalid, format!("{} of {} is in {pg}, not {}", request.extent, volume.id, request.pg));
    }
    if !placement.disks.contains(&request.disk) {
        return refuse(Status::NotHere, format!("{} holds no replica of {pg}", request.disk));
    }
    if request.pg_epoch > placement.epoch {
        return Admission::WaitForState;
    }
    let newest_pg = if request.changes_data() { placement.epoch.max(gates.pg_epoch) } else { placement.epoch };
    if request.pg_epoch < newest_pg {
        return refuse(Status::StalePgEpoch, format!("{pg} is at {newest_pg}, not {}", request.pg_epoch));
    }
    let out = placement.out.get(&request.disk);
    match (request.resync, out) {
        (false, None) => {
            Admission::Accept { pool: pool.id, record_dirty: request.changes_data() && placement.is_degraded() }
        }
        (false, Some(out)) => {
            let message =
                format!("{} is out of {pg} since {} ({}): it is resynced first", request.disk, out.since, out.reason);
            refuse(Status::Out, message)
        }
        // While another replica is still out, the copy is recorded too: this replica may be
        // the PG's resync source later, and its record must cover what it received.
        (true, Some(_)) => Admission::Accept { pool: pool.id, record_dirty: placement.out.len() > 1 },
        (true, None) => refuse(Status::Invalid, format!("{} is acting in {pg}: it takes no resync copy", request.disk)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Op;
    use model::{
        ClusterCommand, ClusterId, Disk, DiskId, ExtentIndex, Node, NodeId, PgId, VolumeId, EXTENT_SIZE_BYTES,
    };

    const CLUSTER: ClusterId = ClusterId(7);
    const DISK_A: DiskId = DiskId(10);
    const DISK_B: DiskId = DiskId(20);
    const VOLUME: VolumeId = VolumeId(0);

    /// Two nodes, one disk each, a 2-replica pool of one PG, one volume owned at epoch 1.
    fn state() -> ClusterState {
        let mut state = ClusterState::default();
        let mut apply = |c: ClusterCommand| {
            state.apply(&c).expect("setup applies");
        };
        apply(ClusterCommand::InitCluster { id: CLUSTER });
        for (node, disk) in [(NodeId(1), DISK_A), (NodeId(2), DISK_B)] {
            apply(ClusterCommand::AddNode(Node {
                id: node,
                api_addr: String::new(),
                data_addr: String::new(),
                cert_sha256: String::new(),
            }));
            apply(ClusterCommand::AddDisk(Disk {
                id: disk,
                node,
                path: String::new(),
                size_bytes: 1 << 30,
                extent_slots: 255,
            }));
        }
        apply(ClusterCommand::CreatePool {
            name: "r2".into(),
            replicas: 2,
            min_size: 1,
            pgs: vec![vec![DISK_A, DISK_B]],
        });
        apply(ClusterCommand::CreateVolume { name: "v".into(), pool: PoolId(0), size_bytes: EXTENT_SIZE_BYTES });
        apply(ClusterCommand::AcquireVolume { volume: VOLUME, node: NodeId(1), unless_vm_running: false });
        state
    }

    fn take_out_b(state: &mut ClusterState) {
        let command = ClusterCommand::TakeReplicaOut {
            pool: PoolId(0),
            pg: PgId(0),
            disk: DISK_B,
            seen: PgEpoch(1),
            reason: "no answer".into(),
        };
        state.apply(&command).expect("take out applies");
    }

    fn write(disk: DiskId) -> Request {
        Request {
            op: Op::Write,
            resync: false,
            id: 1,
            volume: VOLUME,
            extent: ExtentIndex(0),
            offset_bytes: 0,
            len_bytes: 4096,
            owner_epoch: OwnerEpoch(1),
            pg: PgId(0),
            pg_epoch: PgEpoch(1),
            disk,
            cluster: CLUSTER,
            seq: 0,
        }
    }

    fn status(admission: Admission) -> Status {
        match admission {
            Admission::Refuse(refusal) => refusal.status,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    const ACCEPT: Admission = Admission::Accept { pool: PoolId(0), record_dirty: false };

    #[test]
    fn a_write_for_the_current_epochs_is_accepted() {
        assert_eq!(admit(&write(DISK_A), true, &state(), Gates::default()), ACCEPT);
    }

    #[test]
    fn a_request_for_another_cluster_is_refused_as_wrong_target() {
        let request = Request { cluster: ClusterId(8), ..write(DISK_A) };
        assert_eq!(status(admit(&request, true, &state(), Gates::default())), Status::WrongTarget);
    }

    #[test]
    fn a_request_for_a_disk_of_another_node_is_refused_as_wrong_target() {
        assert_eq!(status(admit(&write(DISK_B), false, &state(), Gates::default())), Status::WrongTarget);
    }

    #[test]
    fn a_write_from_an_older_owner_is_fenced() {
        let mut state = state();
        state
            .apply(&ClusterCommand::AcquireVolume { volume: VOLUME, node: NodeId(2), unless_vm_running: false })
            .unwrap();
        assert_eq!(status(admit(&write(DISK_A), true, &state, Gates::default())), Status::StaleOwnerEpoch);
    }

    #[test]
    fn a_write_older_than_one_the_gate_let_through_is_fenced() {
        let gates = Gates { owner_epoch: OwnerEpoch(2), pg_epoch: PgEpoch(1) };
        assert_eq!(status(admit(&write(DISK_A), true, &state(), gates)), Status::StaleOwnerEpoch);
    }

    #[test]
    fn a_write_from_a_newer_owner_than_known_waits_for_the_state() {
        let request = Request { owner_epoch: OwnerEpoch(2), ..write(DISK_A) };
        assert_eq!(admit(&request, true, &state(), Gates::default()), Admission::WaitForState);
    }

    #[test]
    fn a_write_without_owner_epoch_is_invalid() {
        let request = Request { owner_epoch: OwnerEpoch(0), ..write(DISK_A) };
        assert_eq!(status(admit(&request, true, &state(), Gates::default())), Status::Invalid);
    }

    #[test]
    fn a_write_for_an_older_pg_epoch_is_refused_as_stale() {
        let mut state = state();
        take_out_b(&mut state);
        assert_eq!(status(admit(&write(DISK_A), true, &state, Gates::default())), Status::StalePgEpoch);
    }

    #[test]
    fn a_write_for_a_newer_pg_epoch_than_known_waits_for_the_state() {
        let request = Request { pg_epoch: PgEpoch(2), ..write(DISK_A) };
        assert_eq!(admit(&request, true, &state(), Gates::default()), Admission::WaitForState);
    }

    #[test]
    fn a_write_older_than_the_pg_gate_is_refused_even_before_the_state_moved() {
        let gates = Gates { owner_epoch: OwnerEpoch(1), pg_epoch: PgEpoch(2) };
        assert_eq!(status(admit(&write(DISK_A), true, &state(), gates)), Status::StalePgEpoch);
    }

    #[test]
    fn a_write_to_a_degraded_pg_is_recorded_dirty() {
        let mut state = state();
        take_out_b(&mut state);
        let request = Request { pg_epoch: PgEpoch(2), ..write(DISK_A) };
        assert_eq!(
            admit(&request, true, &state, Gates::default()),
            Admission::Accept { pool: PoolId(0), record_dirty: true }
        );
    }

    #[test]
    fn a_replica_that_is_out_refuses_writes_and_reads() {
        let mut state = state();
        take_out_b(&mut state);
        let write = Request { pg_epoch: PgEpoch(2), ..write(DISK_B) };
        let read = Request { op: Op::Read, owner_epoch: OwnerEpoch(0), ..write };
        assert_eq!(status(admit(&write, true, &state, Gates::default())), Status::Out);
        assert_eq!(status(admit(&read, true, &state, Gates::default())), Status::Out);
    }

    #[test]
    fn a_replica_that_is_out_takes_resync_copies_at_the_current_epoch_only() {
        let mut state = state();
        take_out_b(&mut state);
        let resync = Request { resync: true, owner_epoch: OwnerEpoch(0), pg_epoch: PgEpoch(2), ..write(DISK_B) };
        let late = Request { pg_epoch: PgEpoch(1), ..resync };
        assert_eq!(admit(&resync, true, &state, Gates::default()), ACCEPT);
        assert_eq!(status(admit(&late, true, &state, Gates::default())), Status::StalePgEpoch);
    }

    #[test]
    fn an_acting_replica_refuses_resync_copies() {
        let resync = Request { resync: true, owner_epoch: OwnerEpoch(0), ..write(DISK_A) };
        assert_eq!(status(admit(&resync, true, &state(), Gates::default())), Status::Invalid);
    }

    #[test]
    fn a_request_for_a_deleted_volume_is_not_here_and_for_an_unknown_one_waits() {
        let mut state = state();
        let unknown = Request { volume: VolumeId(1), ..write(DISK_A) };
        state.apply(&ClusterCommand::DeleteVolume { volume: VOLUME }).unwrap();
        assert_eq!(status(admit(&write(DISK_A), true, &state, Gates::default())), Status::NotHere);
        assert_eq!(admit(&unknown, true, &state, Gates::default()), Admission::WaitForState);
    }

    #[test]
    fn a_request_naming_the_wrong_pg_is_invalid() {
        let mut state = state();
        let second = state.pools[&PoolId(0)].pgs[0].clone();
        state.pools.get_mut(&PoolId(0)).unwrap().pgs.push(second);
        let expected = state.pools[&PoolId(0)].pg_for(VOLUME, ExtentIndex(0)).0;
        let request = Request { pg: PgId(1 - expected.0), ..write(DISK_A) };
        assert_eq!(status(admit(&request, true, &state, Gates::default())), Status::Invalid);
    }

    #[test]
    fn reads_are_not_fenced_by_owner_or_gates() {
        let read = Request { op: Op::Read, owner_epoch: OwnerEpoch(0), ..write(DISK_A) };
        let gates = Gates { owner_epoch: OwnerEpoch(5), pg_epoch: PgEpoch(5) };
        assert_eq!(admit(&read, true, &state(), gates), ACCEPT);
    }
}
