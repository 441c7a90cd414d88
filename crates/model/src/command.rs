//! The commands that change `ClusterState`, and the pure `apply` that every node runs.

use crate::ids::{ClusterId, DiskId, NodeId, OwnerEpoch, PgEpoch, PgId, PoolId, VolumeId};
use crate::state::{ClusterCa, ClusterInfo, ClusterState, Disk, Node, OutReason, Pg, Pool, Volume};
use crate::units::{REPLICAS_MAX, SECTOR_SIZE_BYTES};
use crate::vm::{Vm, VmDesired, VmId, VmObserved, VmRunState, VmSpec, VM_CPUS_MAX, VM_DISKS_MAX, VM_MEMORY_MIN_BYTES};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A change to the cluster state, proposed through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterCommand {
    InitCluster {
        id: ClusterId,
    },
    /// Sets the cluster's certificate authority, once (`cluster init`).
    SetCa(ClusterCa),
    /// Adds an API or join token (expired join tokens leave the state at the same time).
    CreateToken(crate::tokens::Token),
    /// Revokes a token of either kind: it works no more.
    RevokeToken {
        id: String,
    },
    /// Adds a node, or updates the addresses of a known one.
    AddNode(Node),
    AddDisk(Disk),
    /// `pgs[i]` lists the disks of placement group `i` (computed by `policy`).
    CreatePool {
        name: String,
        replicas: u8,
        min_size: u8,
        pgs: Vec<Vec<DiskId>>,
    },
    CreateVolume {
        name: String,
        pool: PoolId,
        size_bytes: u64,
    },
    /// Grows a volume to `size_bytes` (never shrinks it), while no active VM uses it.
    ResizeVolume {
        volume: VolumeId,
        size_bytes: u64,
    },
    DeleteVolume {
        volume: VolumeId,
    },
    /// Makes `node` the volume's only writer, with the next owner epoch. With
    /// `unless_vm_running`, refused while a VM using the volume runs or is meant to (an
    /// import must not take a running guest's disk away from it).
    AcquireVolume {
        volume: VolumeId,
        node: NodeId,
        #[serde(default)]
        unless_vm_running: bool,
    },
    CreateVm {
        spec: VmSpec,
    },
    /// A network every node provides as a bridge.
    CreateNetwork {
        name: String,
        kind: crate::network::NetworkKind,
    },
    /// Deletes a network no VM has a NIC on.
    DeleteNetwork {
        network: crate::network::NetworkId,
    },
    /// Gives VM `vm` a new spec, from its next start. Its name stays; while it is active
    /// only its vCPUs, memory and HA policy may change (its volumes are in use).
    UpdateVm {
        vm: VmId,
        spec: VmSpec,
    },
    /// Deletes a stopped VM (its volumes are deleted by their own commands).
    DeleteVm {
        vm: VmId,
    },
    /// Runs the VM on `node`. A VM running elsewhere moves only with `force`.
    StartVm {
        vm: VmId,
        node: NodeId,
        force: bool,
    },
    /// Stops the VM: asks the guest to shut down, or ends it at once with `force`.
    StopVm {
        vm: VmId,
        force: bool,
    },
    /// What `node` observes of a VM it runs or ran.
    ReportVm {
        vm: VmId,
        node: NodeId,
        state: VmRunState,
    },
    /// Takes `disk` out of the PG's acting set, raising the PG epoch. `seen` is the epoch the
    /// proposer saw the replica fail at: a proposal made on an older view is refused, so a
    /// replica that was brought back in meanwhile is not taken out for an old failure.
    TakeReplicaOut {
        pool: PoolId,
        pg: PgId,
        disk: DiskId,
        seen: PgEpoch,
        reason: String,
    },
    /// Puts a resynced `disk` back into the PG's acting set, raising the PG epoch. `seen` is
    /// the epoch the resync copied at: anything written since was written to it too.
    BringReplicaIn {
        pool: PoolId,
        pg: PgId,
        disk: DiskId,
        seen: PgEpoch,
    },
    /// Removes a node that is gone for good: out of the cluster (and, by the leader, out of
    /// the Raft voters). Refused while it is not down, runs VMs, or holds a PG's last
    /// acting replica.
    RemoveNode {
        node: NodeId,
        at_ms: u64,
    },
    /// Takes back a join that failed halfway (before the node became a Raft member).
    AbandonJoin {
        node: NodeId,
    },
    /// What `node` offers to VMs; it reports this when it starts.
    ReportCapacity {
        node: NodeId,
        capacity: crate::ha::Capacity,
    },
    /// The networks `node` cannot provide now, with why: it reports each change. VMs with
    /// a NIC on one of them are not placed there.
    ReportNetworkGaps {
        node: NodeId,
        gaps: BTreeMap<crate::network::NetworkId, String>,
    },
    /// The leader heard nothing from `node` for `silent_ms`: it is down. The VMs it ran are
    /// no longer running; HA VMs among them are then moved by `FailoverVm`.
    MarkNodeDown {
        node: NodeId,
        at_ms: u64,
        silent_ms: u64,
    },
    /// The leader hears from `node` again.
    MarkNodeUp {
        node: NodeId,
        at_ms: u64,
    },
    /// Runs an HA VM of `from`, which is down, on `to` instead.
    FailoverVm {
        vm: VmId,
        from: NodeId,
        to: NodeId,
        at_ms: u64,
    },
    /// Starts moving a VM off `from`, which is drained, to `to`: it shuts down on `from`
    /// first (`VmDesired::Moving`).
    MoveOffDrained {
        vm: VmId,
        from: NodeId,
        to: NodeId,
        at_ms: u64,
    },
    /// A moving VM stopped on the node it leaves (or that node is down): it runs on `to`,
    /// the planned node or another one if that can no longer take it.
    FinishMove {
        vm: VmId,
        to: NodeId,
        at_ms: u64,
    },
    /// The guest of a VM on `node` powered off, or QEMU ended or failed to start there: the
    /// VM's desired state follows, if it is still meant to run on `node`.
    GuestStopped {
        vm: VmId,
        node: NodeId,
    },
    /// Keeps VMs off `node` (`drained`), or lets them on again.
    SetDrain {
        node: NodeId,
        drained: bool,
        at_ms: u64,
    },
    /// Something a node saw happen, for the event log.
    RecordEvent {
        at_ms: u64,
        kind: crate::ha::EventKind,
        message: String,
    },
    /// Raises the epoch of a PG whose `disk` is out, acting set unchanged. A resync source
    /// proposes it when a copy it sent to `disk` at `seen` got no answer: that copy may
    /// still land, so nothing is copied again at `seen`, and once `disk` hears of the new
    /// epoch the old copy is refused.
    FenceReplicaOut {
        pool: PoolId,
        pg: PgId,
        disk: DiskId,
        seen: PgEpoch,
    },
}

pub use crate::names::NAME_MAX_BYTES;
/// Longest kernel command line.
pub const CMDLINE_MAX_BYTES: usize = 4096;
/// Longest disk path.
pub const PATH_MAX_BYTES: usize = 4096;

/// What an applied command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    Done,
    PoolCreated(PoolId),
    VolumeCreated(VolumeId),
    VolumeAcquired(OwnerEpoch),
    VmCreated(VmId),
    NetworkCreated(crate::network::NetworkId),
    /// The PG's epoch after a replica was taken out or brought in.
    PgChanged(PgEpoch),
}

/// Why a command was refused. A refused command leaves the state unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    #[error("The cluster is not initialised yet: run `converge cluster init` on the first node")]
    NotInitialized,
    #[error("The cluster is already initialised")]
    AlreadyInitialized,
    #[error("Node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    #[error("Disk {disk} is already part of the cluster (on {node} at {path})")]
    DiskExists { disk: DiskId, node: NodeId, path: String },
    #[error("Disk {0} is not part of the cluster")]
    UnknownDisk(DiskId),
    #[error("A pool named {0:?} exists already")]
    PoolExists(String),
    #[error("Pool {0} does not exist")]
    UnknownPool(PoolId),
    #[error("Placement for pool {pool:?} is invalid: {reason}")]
    InvalidPlacement { pool: String, reason: String },
    #[error("A volume named {0:?} exists already: pick another name or delete it first")]
    VolumeExists(String),
    #[error("Volume {0} does not exist")]
    UnknownVolume(VolumeId),
    #[error("Volume size {0} bytes is not a positive multiple of 512 of at most 256 TiB")]
    InvalidSize(u64),
    #[error("Replication factor {0} is outside 1..=3")]
    InvalidReplicas(u8),
    #[error("A VM named {0:?} exists already: pick another name or delete it first")]
    VmExists(String),
    #[error("VM {0} does not exist")]
    UnknownVm(VmId),
    #[error("Network {0} does not exist")]
    UnknownNetwork(crate::network::NetworkId),
    #[error("A network named {0:?} exists already: pick another name or delete it first")]
    NetworkExists(String),
    #[error("Network {network:?} has a NIC of VM {vm:?} on it: delete the VM or its NIC first")]
    NetworkInUse { network: String, vm: String },
    #[error(
        "{node} cannot provide network {network:?}: {reason} (start the VM on another node, or fix the network there)"
    )]
    NetworkUnavailable { network: String, node: NodeId, reason: String },
    #[error("No token {0}: see `converge token list`")]
    UnknownToken(String),
    #[error("VM spec is invalid: {0}")]
    InvalidVm(String),
    #[error("Volume {volume} is already used by VM {vm}")]
    VolumeInUse { volume: VolumeId, vm: String },
    #[error("VM {vm} is running on {node}: stop it first, or move it with `converge vm move {vm} --node NODE`")]
    VmRunningElsewhere { vm: String, node: NodeId },
    #[error("VM {0} is not stopped: stop it before deleting it")]
    VmNotStopped(String),
    #[error("Volume {volume} is a disk of VM {vm}, which is running: stop the VM first (`converge vm stop {vm}`)")]
    VolumeBusy { volume: VolumeId, vm: String },
    #[error("{pg} of pool {pool} does not exist")]
    UnknownPg { pool: PoolId, pg: PgId },
    #[error("{disk} holds no replica of {pg} of pool {pool}")]
    NotAReplica { pool: PoolId, pg: PgId, disk: DiskId },
    #[error("{pg} of pool {pool} is at {current}, not {seen}: look again at the new replica set")]
    StalePgEpoch { pool: PoolId, pg: PgId, seen: PgEpoch, current: PgEpoch },
    #[error("{disk} is the last acting replica of {pg} of pool {pool}: it holds the newest data and stays")]
    LastReplica { pool: PoolId, pg: PgId, disk: DiskId },
    #[error("{0} is down: start the VM on a node that is up")]
    NodeDown(NodeId),
    #[error("{0} is not down")]
    NodeNotDown(NodeId),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0} is not drained")]
    NodeNotDrained(NodeId),
    #[error("{node} cannot be removed: {reason}")]
    NodeInUse { node: NodeId, reason: String },
    #[error("Node {node} cannot join as {addr}: {reason}")]
    JoinRefused { node: NodeId, addr: String, reason: String },
    #[error("VM {vm} is no longer meant to run on the node it was moved from")]
    VmMovedOn { vm: String },
    #[error("Volume {volume} is a disk of VM {vm}, which is meant to run on {node}: only that node may write it")]
    VolumeOfVmElsewhere { volume: VolumeId, vm: String, node: NodeId },
    #[error("{disk} is acting in {pg} of pool {pool}: only a replica that is out is fenced")]
    ReplicaNotOut { pool: PoolId, pg: PgId, disk: DiskId },
}

impl ClusterState {
    /// Applies one command. Pure and deterministic: the same state and command give the
    /// same result on every node. A refused command changes nothing.
    pub fn apply(&mut self, command: &ClusterCommand) -> Result<CommandOutcome, CommandError> {
        if self.cluster.is_none() && !matches!(command, ClusterCommand::InitCluster { .. }) {
            return Err(CommandError::NotInitialized);
        }
        match command {
            ClusterCommand::InitCluster { id } => {
                if self.cluster.is_some() {
                    return Err(CommandError::AlreadyInitialized);
                }
                self.cluster = Some(ClusterInfo { id: *id });
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::SetCa(ca) => {
                if self.ca.is_some() {
                    return Err(CommandError::AlreadyInitialized);
                }
                self.ca = Some(ca.clone());
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::CreateToken(token) => {
                self.forget_expired_tokens(token.created_ms);
                self.create_token(token).map(|()| CommandOutcome::Done)
            }
            ClusterCommand::RevokeToken { id } => self.revoke_token(id).map(|()| CommandOutcome::Done),
            ClusterCommand::AddNode(node) => self.add_node(node),
            ClusterCommand::AddDisk(disk) => self.add_disk(disk),
            ClusterCommand::CreatePool { name, replicas, min_size, pgs } => {
                self.create_pool(name, *replicas, *min_size, pgs)
            }
            ClusterCommand::CreateVolume { name, pool, size_bytes } => self.create_volume(name, *pool, *size_bytes),
            ClusterCommand::ResizeVolume { volume, size_bytes } => self.resize_volume(*volume, *size_bytes),
            ClusterCommand::DeleteVolume { volume } => {
                if let Some(vm) = self.vm_using(*volume) {
                    return Err(CommandError::VolumeInUse { volume: *volume, vm: vm.spec.name.clone() });
                }
                self.volumes.remove(volume).ok_or(CommandError::UnknownVolume(*volume))?;
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::CreateVm { spec } => self.create_vm(spec),
            ClusterCommand::CreateNetwork { name, kind } => self.create_network(name, kind),
            ClusterCommand::DeleteNetwork { network } => {
                let found = self.networks.get(network).ok_or(CommandError::UnknownNetwork(*network))?;
                if let Some(vm) = self.vms.values().find(|vm| vm.spec.nics.iter().any(|nic| nic.network == *network)) {
                    return Err(CommandError::NetworkInUse { network: found.name.clone(), vm: vm.spec.name.clone() });
                }
                self.networks.remove(network);
                for gaps in self.network_gaps.values_mut() {
                    gaps.remove(network);
                }
                self.network_gaps.retain(|_, gaps| !gaps.is_empty());
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::UpdateVm { vm, spec } => self.update_vm(*vm, spec),
            ClusterCommand::DeleteVm { vm } => {
                let found = self.vms.get(vm).ok_or(CommandError::UnknownVm(*vm))?;
                let stopped = matches!(found.observed.state, VmRunState::Stopped | VmRunState::Failed { .. });
                if found.desired != VmDesired::Stopped || !stopped {
                    return Err(CommandError::VmNotStopped(found.spec.name.clone()));
                }
                self.vms.remove(vm);
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::StartVm { vm, node, force } => {
                if !self.nodes.contains_key(node) {
                    return Err(CommandError::UnknownNode(*node));
                }
                if self.is_down(*node) {
                    return Err(CommandError::NodeDown(*node));
                }
                let found = self.vms.get(vm).ok_or(CommandError::UnknownVm(*vm))?;
                let gap = self.network_gap(&found.spec, *node).filter(|_| found.desired.node() != Some(*node));
                if let Some((network, reason)) = gap {
                    return Err(CommandError::NetworkUnavailable { network, node: *node, reason });
                }
                let found = self.vms.get_mut(vm).ok_or(CommandError::UnknownVm(*vm))?;
                if let Some(current) = found.desired.node() {
                    if current != *node && !force {
                        return Err(CommandError::VmRunningElsewhere { vm: found.spec.name.clone(), node: current });
                    }
                }
                found.desired = VmDesired::Running { node: *node };
                found.force_stop = false;
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::StopVm { vm, force } => {
                let found = self.vms.get_mut(vm).ok_or(CommandError::UnknownVm(*vm))?;
                found.desired = VmDesired::Stopped;
                found.force_stop = *force;
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::ReportVm { vm, node, state } => {
                let found = self.vms.get_mut(vm).ok_or(CommandError::UnknownVm(*vm))?;
                // The node the VM is meant to run on always reports; another node only while
                // nothing else is running it, so a late "stopped" from the node it left does
                // not hide it running elsewhere.
                let meant_here = found.desired.node() == Some(*node);
                let other_running = found.observed.node.is_some_and(|n| n != *node)
                    && !matches!(found.observed.state, VmRunState::Stopped | VmRunState::Failed { .. });
                if meant_here || !other_running {
                    let state = match state {
                        VmRunState::Failed { reason } => {
                            VmRunState::Failed { reason: crate::ha::bounded(reason, crate::ha::REASON_MAX_BYTES) }
                        }
                        other => other.clone(),
                    };
                    found.observed = VmObserved { node: Some(*node), state };
                }
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::TakeReplicaOut { pool, pg, disk, seen, reason } => {
                let found = self.pg_mut(*pool, *pg, *disk, *seen)?;
                if found.out.contains_key(disk) {
                    return Ok(CommandOutcome::PgChanged(found.epoch));
                }
                if found.acting().count() == 1 {
                    return Err(CommandError::LastReplica { pool: *pool, pg: *pg, disk: *disk });
                }
                found.epoch = PgEpoch(found.epoch.0 + 1);
                let reason = crate::ha::bounded(reason, crate::ha::REASON_MAX_BYTES);
                found.out.insert(*disk, OutReason { since: found.epoch, reason });
                Ok(CommandOutcome::PgChanged(found.epoch))
            }
            ClusterCommand::BringReplicaIn { pool, pg, disk, seen } => {
                let found = self.pg_mut(*pool, *pg, *disk, *seen)?;
                if found.out.remove(disk).is_some() {
                    found.epoch = PgEpoch(found.epoch.0 + 1);
                }
                Ok(CommandOutcome::PgChanged(found.epoch))
            }
            ClusterCommand::RemoveNode { node, at_ms } => {
                self.remove_node(*node, *at_ms).map(|()| CommandOutcome::Done)
            }
            ClusterCommand::AbandonJoin { node } => {
                let unused = self.disks_of(*node).next().is_none()
                    && !self.vms.values().any(|vm| vm.observed.node == Some(*node));
                if unused {
                    self.nodes.remove(node);
                    self.capacity.remove(node);
                    self.network_gaps.remove(node);
                }
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::ReportCapacity { node, capacity } => {
                if !self.nodes.contains_key(node) {
                    return Err(CommandError::UnknownNode(*node));
                }
                self.capacity.insert(*node, *capacity);
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::ReportNetworkGaps { node, gaps } => {
                if !self.nodes.contains_key(node) {
                    return Err(CommandError::UnknownNode(*node));
                }
                // Only networks that still exist (one may have gone since the node looked).
                let gaps: BTreeMap<_, _> = gaps
                    .iter()
                    .filter(|(network, _)| self.networks.contains_key(network))
                    .map(|(network, why)| (*network, crate::ha::bounded(why, crate::network::GAP_REASON_MAX_BYTES)))
                    .collect();
                if gaps.is_empty() {
                    self.network_gaps.remove(node);
                } else {
                    self.network_gaps.insert(*node, gaps);
                }
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::MarkNodeDown { node, at_ms, silent_ms } => {
                self.mark_node_down(*node, *at_ms, *silent_ms).map(|()| CommandOutcome::Done)
            }
            ClusterCommand::MarkNodeUp { node, at_ms } => {
                self.mark_node_up(*node, *at_ms).map(|()| CommandOutcome::Done)
            }
            ClusterCommand::FailoverVm { vm, from, to, at_ms } => {
                self.failover_vm(*vm, *from, *to, *at_ms).map(|()| CommandOutcome::Done)
            }
            ClusterCommand::MoveOffDrained { vm, from, to, at_ms } => {
                self.move_off_drained(*vm, *from, *to, *at_ms).map(|()| CommandOutcome::Done)
            }
            ClusterCommand::FinishMove { vm, to, at_ms } => {
                self.finish_move(*vm, *to, *at_ms).map(|()| CommandOutcome::Done)
            }
            ClusterCommand::GuestStopped { vm, node } => {
                let found = self.vms.get_mut(vm).ok_or(CommandError::UnknownVm(*vm))?;
                if found.desired == (VmDesired::Running { node: *node }) {
                    found.desired = VmDesired::Stopped;
                    found.force_stop = false;
                }
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::SetDrain { node, drained, at_ms } => {
                if !self.nodes.contains_key(node) {
                    return Err(CommandError::UnknownNode(*node));
                }
                let changed = if *drained { self.drained.insert(*node) } else { self.drained.remove(node) };
                if changed {
                    let what = if *drained { "is drained: no VM is placed on it" } else { "takes VMs again" };
                    let message = format!("{node} {what}");
                    self.record_event(*at_ms, crate::ha::EventKind::Drain, &message);
                }
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::RecordEvent { at_ms, kind, message } => {
                self.record_event(*at_ms, *kind, message);
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::FenceReplicaOut { pool, pg, disk, seen } => {
                let found = self.pg_mut(*pool, *pg, *disk, *seen)?;
                if !found.out.contains_key(disk) {
                    return Err(CommandError::ReplicaNotOut { pool: *pool, pg: *pg, disk: *disk });
                }
                found.epoch = PgEpoch(found.epoch.0 + 1);
                Ok(CommandOutcome::PgChanged(found.epoch))
            }
            ClusterCommand::AcquireVolume { volume, node, unless_vm_running } => {
                if !self.nodes.contains_key(node) {
                    return Err(CommandError::UnknownNode(*node));
                }
                if let Some(vm) = self.vm_using(*volume).filter(|vm| *unless_vm_running && vm.is_active()) {
                    return Err(CommandError::VolumeBusy { volume: *volume, vm: vm.spec.name.clone() });
                }
                // A VM's disks are written only from the node it is meant to run on: a late
                // start on the node it left cannot take them back.
                if let Some(vm) = self.vm_using(*volume) {
                    if let Some(meant) = vm.desired.node() {
                        if meant != *node {
                            let vm = vm.spec.name.clone();
                            return Err(CommandError::VolumeOfVmElsewhere { volume: *volume, vm, node: meant });
                        }
                    }
                }
                let v = self.volumes.get_mut(volume).ok_or(CommandError::UnknownVolume(*volume))?;
                v.owner = Some(*node);
                v.owner_epoch = v.owner_epoch.next();
                Ok(CommandOutcome::VolumeAcquired(v.owner_epoch))
            }
        }
    }

    /// The PG, if `disk` is one of its replicas and the proposer saw its current epoch.
    fn pg_mut(&mut self, pool: PoolId, pg: PgId, disk: DiskId, seen: PgEpoch) -> Result<&mut Pg, CommandError> {
        let found = self
            .pools
            .get_mut(&pool)
            .ok_or(CommandError::UnknownPool(pool))?
            .pgs
            .get_mut(pg.0 as usize)
            .ok_or(CommandError::UnknownPg { pool, pg })?;
        if !found.disks.contains(&disk) {
            return Err(CommandError::NotAReplica { pool, pg, disk });
        }
        if found.epoch != seen {
            return Err(CommandError::StalePgEpoch { pool, pg, seen, current: found.epoch });
        }
        Ok(found)
    }

    fn create_vm(&mut self, spec: &VmSpec) -> Result<CommandOutcome, CommandError> {
        if self.vm_by_name(&spec.name).is_some() {
            return Err(CommandError::VmExists(spec.name.clone()));
        }
        if self.vms.len() >= crate::vm::VMS_MAX {
            return Err(CommandError::InvalidVm(format!(
                "the cluster holds {} VMs, the most it takes: delete some first",
                self.vms.len()
            )));
        }
        self.check_vm_spec(spec, None)?;
        let candidate = Vm {
            id: self.next_vm_id,
            spec: spec.clone(),
            desired: VmDesired::Stopped,
            force_stop: false,
            observed: VmObserved { node: None, state: VmRunState::Stopped },
        };
        self.next_vm_id = VmId(candidate.id.0 + 1);
        let id = candidate.id;
        self.vms.insert(id, candidate);
        Ok(CommandOutcome::VmCreated(id))
    }

    fn create_network(
        &mut self,
        name: &str,
        kind: &crate::network::NetworkKind,
    ) -> Result<CommandOutcome, CommandError> {
        crate::names::check_name("network", name, NAME_MAX_BYTES).map_err(CommandError::InvalidInput)?;
        use crate::network::NetworkKind::{Overlay, Vlan};
        let kind = match kind {
            Overlay { vni: 0 } => {
                let taken: std::collections::BTreeSet<u32> = self
                    .networks
                    .values()
                    .filter_map(|n| match n.kind {
                        Overlay { vni } => Some(vni),
                        _ => None,
                    })
                    .collect();
                Overlay { vni: (1..).find(|vni| !taken.contains(vni)).expect("fewer networks than VXLAN ids") }
            }
            kind => kind.clone(),
        };
        let kind = &kind;
        kind.check().map_err(CommandError::InvalidInput)?;
        if self.network_by_name(name).is_some() {
            return Err(CommandError::NetworkExists(name.into()));
        }
        if self.networks.len() >= crate::network::NETWORKS_MAX {
            return Err(CommandError::InvalidInput(format!(
                "the cluster holds {} networks, the most it takes",
                self.networks.len()
            )));
        }
        // Two networks on one wire would be one network under two names (a VLAN on "the
        // node's own interface" may well be on the one another names).
        let same_wire = self.networks.values().find(|n| match (&n.kind, kind) {
            (Overlay { vni: a }, Overlay { vni: b }) => a == b,
            (Vlan { vlan: a, interface: i }, Vlan { vlan: b, interface: j }) => {
                a == b && (i == j || i.is_none() || j.is_none())
            }
            (a, b) => a == b,
        });
        if let Some(other) = same_wire {
            return Err(CommandError::InvalidInput(format!("network {} is {kind} already", other.name)));
        }
        let network = crate::network::Network { id: self.next_network_id, name: name.into(), kind: kind.clone() };
        self.next_network_id = crate::network::NetworkId(network.id.0 + 1);
        let id = network.id;
        self.networks.insert(id, network);
        Ok(CommandOutcome::NetworkCreated(id))
    }

    fn update_vm(&mut self, id: VmId, spec: &VmSpec) -> Result<CommandOutcome, CommandError> {
        let vm = self.vms.get(&id).ok_or(CommandError::UnknownVm(id))?;
        if spec.name != vm.spec.name {
            return Err(CommandError::InvalidVm("a VM keeps its name".into()));
        }
        let same_volumes =
            VmSpec { cpus: vm.spec.cpus, memory_bytes: vm.spec.memory_bytes, ha: vm.spec.ha.clone(), ..spec.clone() };
        if vm.is_active() && same_volumes != vm.spec {
            return Err(CommandError::InvalidVm(format!(
                "VM {} is running: its disks and boot change only while it is stopped",
                vm.spec.name
            )));
        }
        self.check_vm_spec(spec, Some(id))?;
        self.vms.get_mut(&id).expect("checked above").spec = spec.clone();
        Ok(CommandOutcome::Done)
    }

    /// What every VM spec must be; `vm` is the VM it is for, if it exists already (its own
    /// volumes are not in another VM's use).
    fn check_vm_spec(&self, spec: &VmSpec, vm: Option<VmId>) -> Result<(), CommandError> {
        let invalid = |reason: String| Err(CommandError::InvalidVm(reason));
        if spec.cpus == 0 || spec.cpus > VM_CPUS_MAX {
            return invalid(format!("{} vCPUs is outside 1..={VM_CPUS_MAX}", spec.cpus));
        }
        if spec.memory_bytes < VM_MEMORY_MIN_BYTES || !spec.memory_bytes.is_multiple_of(1 << 20) {
            return invalid(format!("memory must be whole MiB and at least {} MiB", VM_MEMORY_MIN_BYTES >> 20));
        }
        if spec.memory_bytes > crate::vm::VM_MEMORY_MAX_BYTES {
            return invalid(format!("memory must be at most {} GiB", crate::vm::VM_MEMORY_MAX_BYTES >> 30));
        }
        if let Err(reason) = spec.ha.check() {
            return invalid(reason);
        }
        if let Err(reason) = crate::names::check_name("VM", &spec.name, NAME_MAX_BYTES) {
            return invalid(reason);
        }
        if let crate::vm::Boot::Kernel { cmdline, .. } = &spec.boot {
            if cmdline.len() > CMDLINE_MAX_BYTES {
                return invalid(format!(
                    "the kernel command line is {} bytes, more than {CMDLINE_MAX_BYTES}",
                    cmdline.len()
                ));
            }
        }
        if spec.disks.len() > VM_DISKS_MAX {
            return invalid(format!("{} disks is more than {VM_DISKS_MAX}", spec.disks.len()));
        }
        if spec.disks.is_empty() && matches!(spec.boot, crate::vm::Boot::Disk | crate::vm::Boot::Uefi { .. }) {
            return invalid("a VM that boots from disk needs a disk".into());
        }
        if let crate::vm::Boot::Uefi { vars } = &spec.boot {
            // (An unknown volume is refused with the VM's other volumes, below.)
            let size = self.volumes.get(vars).map_or(u64::MAX, |v| v.size_bytes);
            if size < crate::vm::UEFI_VARS_BYTES {
                return invalid(format!(
                    "the UEFI variables need a volume of {} bytes at least, not {size}",
                    crate::vm::UEFI_VARS_BYTES
                ));
            }
        }
        if spec.nics.len() > crate::network::VM_NICS_MAX {
            return invalid(format!("{} NICs is more than {}", spec.nics.len(), crate::network::VM_NICS_MAX));
        }
        for (i, nic) in spec.nics.iter().enumerate() {
            if !self.networks.contains_key(&nic.network) {
                return Err(CommandError::UnknownNetwork(nic.network));
            }
            nic.mac.check().map_err(CommandError::InvalidVm)?;
            // Two cards of one address on a network would take each other's traffic.
            let twice = spec.nics[..i].iter().any(|other| other.mac == nic.mac);
            let elsewhere =
                self.vms.values().find(|v| Some(v.id) != vm && v.spec.nics.iter().any(|o| o.mac == nic.mac));
            if twice {
                return invalid(format!("MAC {} is given to two NICs", nic.mac));
            }
            if let Some(other) = elsewhere {
                return invalid(format!("MAC {} is VM {}'s already", nic.mac, other.spec.name));
            }
        }
        let candidate = Vm {
            id: vm.unwrap_or(self.next_vm_id),
            spec: spec.clone(),
            desired: VmDesired::Stopped,
            force_stop: false,
            observed: VmObserved { node: None, state: VmRunState::Stopped },
        };
        let volumes = candidate.volumes();
        for (i, volume) in volumes.iter().enumerate() {
            if !self.volumes.contains_key(volume) {
                return Err(CommandError::UnknownVolume(*volume));
            }
            if let Some(user) = self.vms.values().find(|v| Some(v.id) != vm && v.volumes().contains(volume)) {
                return Err(CommandError::VolumeInUse { volume: *volume, vm: user.spec.name.clone() });
            }
            if volumes[..i].contains(volume) {
                return invalid(format!("{volume} is listed twice"));
            }
        }
        Ok(())
    }

    fn add_disk(&mut self, disk: &Disk) -> Result<CommandOutcome, CommandError> {
        if disk.path.len() > PATH_MAX_BYTES {
            return Err(CommandError::InvalidInput(format!("a disk path is at most {PATH_MAX_BYTES} bytes")));
        }
        if !self.nodes.contains_key(&disk.node) {
            return Err(CommandError::UnknownNode(disk.node));
        }
        let clash = self.disks.values().find(|d| d.id == disk.id || (d.node == disk.node && d.path == disk.path));
        if let Some(existing) = clash {
            return Err(CommandError::DiskExists {
                disk: existing.id,
                node: existing.node,
                path: existing.path.clone(),
            });
        }
        self.disks.insert(disk.id, disk.clone());
        Ok(CommandOutcome::Done)
    }

    fn create_pool(
        &mut self,
        name: &str,
        replicas: u8,
        min_size: u8,
        pgs: &[Vec<DiskId>],
    ) -> Result<CommandOutcome, CommandError> {
        if self.pool_by_name(name).is_some() {
            return Err(CommandError::PoolExists(name.to_string()));
        }
        if replicas == 0 || replicas > REPLICAS_MAX {
            return Err(CommandError::InvalidReplicas(replicas));
        }
        let invalid = |reason: String| CommandError::InvalidPlacement { pool: name.into(), reason };
        if min_size == 0 || min_size > replicas {
            return Err(invalid(format!("min_size {min_size} is outside 1..={replicas}")));
        }
        if pgs.is_empty() {
            return Err(invalid("no placement groups".into()));
        }
        for (index, disks) in pgs.iter().enumerate() {
            if disks.len() != usize::from(replicas) {
                return Err(invalid(format!("PG {index} has {} disks", disks.len())));
            }
            let mut nodes = Vec::with_capacity(disks.len());
            for disk in disks {
                let d = self.disks.get(disk).ok_or(CommandError::UnknownDisk(*disk))?;
                if nodes.contains(&d.node) {
                    return Err(invalid(format!("PG {index} has two replicas on {}", d.node)));
                }
                nodes.push(d.node);
            }
        }
        let id = self.next_pool_id;
        self.next_pool_id = PoolId(id.0 + 1);
        let pgs =
            pgs.iter().map(|disks| Pg { disks: disks.clone(), epoch: PgEpoch(1), out: Default::default() }).collect();
        let pool = Pool { id, name: name.to_string(), replicas, min_size, pgs };
        self.pools.insert(id, pool);
        Ok(CommandOutcome::PoolCreated(id))
    }

    fn resize_volume(&mut self, id: VolumeId, size_bytes: u64) -> Result<CommandOutcome, CommandError> {
        let volume = self.volumes.get(&id).ok_or(CommandError::UnknownVolume(id))?;
        if !size_bytes.is_multiple_of(SECTOR_SIZE_BYTES) || size_bytes > crate::VOLUME_SIZE_MAX_BYTES {
            return Err(CommandError::InvalidSize(size_bytes));
        }
        if size_bytes < volume.size_bytes {
            return Err(CommandError::InvalidInput(format!(
                "volume {} has {} bytes: a volume only grows (a file system on it may use every byte)",
                volume.name, volume.size_bytes
            )));
        }
        // A running guest would not see the new size until its next start.
        if let Some(vm) = self.vms.values().find(|vm| vm.is_active() && vm.volumes().contains(&id)) {
            return Err(CommandError::InvalidInput(format!(
                "volume {} is a disk of VM {}, which is running: stop it first (it sees the new size when it starts)",
                volume.name, vm.spec.name
            )));
        }
        self.volumes.get_mut(&id).expect("checked above").size_bytes = size_bytes;
        Ok(CommandOutcome::Done)
    }

    fn create_volume(&mut self, name: &str, pool: PoolId, size_bytes: u64) -> Result<CommandOutcome, CommandError> {
        if !self.pools.contains_key(&pool) {
            return Err(CommandError::UnknownPool(pool));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_SIZE_BYTES) || size_bytes > crate::VOLUME_SIZE_MAX_BYTES
        {
            return Err(CommandError::InvalidSize(size_bytes));
        }
        if self.volumes.len() >= crate::VOLUMES_MAX {
            return Err(CommandError::InvalidInput(format!(
                "the cluster holds {} volumes, the most it takes: delete some first",
                self.volumes.len()
            )));
        }
        if self.volume_by_name(name).is_some() {
            return Err(CommandError::VolumeExists(name.to_string()));
        }
        // A PG whose every replica was on a removed node has nowhere to keep new data.
        let stranded = self.pools[&pool]
            .pgs
            .iter()
            .filter(|pg| pg.acting().all(|d| self.disks.get(&d).is_some_and(|d| self.removed.contains_key(&d.node))))
            .count();
        if stranded > 0 {
            return Err(CommandError::InvalidInput(format!(
                "{stranded} PGs of pool {} had every replica on a removed node: the pool takes no new volume until \
                 they are placed anew",
                self.pools[&pool].name
            )));
        }
        crate::names::check_name("volume", name, NAME_MAX_BYTES).map_err(CommandError::InvalidInput)?;
        let id = self.next_volume_id;
        self.next_volume_id = VolumeId(id.0 + 1);
        let volume = Volume { id, name: name.to_string(), pool, size_bytes, owner: None, owner_epoch: OwnerEpoch(0) };
        self.volumes.insert(id, volume);
        Ok(CommandOutcome::VolumeCreated(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_A: NodeId = NodeId(1);
    const NODE_B: NodeId = NodeId(2);

    fn node(id: NodeId) -> ClusterCommand {
        ClusterCommand::AddNode(Node {
            id,
            api_addr: format!("127.0.0.{}:7700", id.0 + 1),
            data_addr: format!("127.0.0.{}:7701", id.0 + 1),
            cert_sha256: format!("{:064x}", id.0),
        })
    }

    fn disk(id: u64, node: NodeId) -> ClusterCommand {
        ClusterCommand::AddDisk(Disk {
            id: DiskId(id),
            node,
            path: format!("/disks/{id}"),
            size_bytes: 1 << 30,
            extent_slots: 255,
        })
    }

    /// Two nodes with one disk each and a 2-replica pool with one PG.
    fn two_node_cluster() -> ClusterState {
        let mut state = ClusterState::default();
        let commands = [
            ClusterCommand::InitCluster { id: ClusterId(9) },
            node(NODE_A),
            node(NODE_B),
            disk(10, NODE_A),
            disk(20, NODE_B),
            ClusterCommand::CreatePool {
                name: "replicated-2".into(),
                replicas: 2,
                min_size: 2,
                pgs: vec![vec![DiskId(10), DiskId(20)]],
            },
        ];
        for command in &commands {
            state.apply(command).expect("setup command applies");
        }
        state.check_invariants();
        state
    }

    #[test]
    fn commands_before_init_are_refused() {
        let mut state = ClusterState::default();
        assert_eq!(state.apply(&node(NODE_A)), Err(CommandError::NotInitialized));
        assert_eq!(state, ClusterState::default());
    }

    #[test]
    fn acquiring_a_volume_moves_its_owner_epoch_forward() {
        let mut state = two_node_cluster();
        let create = ClusterCommand::CreateVolume { name: "db".into(), pool: PoolId(0), size_bytes: 1 << 30 };
        assert_eq!(state.apply(&create), Ok(CommandOutcome::VolumeCreated(VolumeId(0))));

        let first =
            state.apply(&ClusterCommand::AcquireVolume { volume: VolumeId(0), node: NODE_A, unless_vm_running: false });
        let second =
            state.apply(&ClusterCommand::AcquireVolume { volume: VolumeId(0), node: NODE_B, unless_vm_running: false });

        assert_eq!(first, Ok(CommandOutcome::VolumeAcquired(OwnerEpoch(1))));
        assert_eq!(second, Ok(CommandOutcome::VolumeAcquired(OwnerEpoch(2))));
        assert_eq!(state.volumes[&VolumeId(0)].owner, Some(NODE_B));
    }

    #[test]
    fn duplicate_volume_name_is_refused_and_changes_nothing() {
        let mut state = two_node_cluster();
        let create = ClusterCommand::CreateVolume { name: "db".into(), pool: PoolId(0), size_bytes: 1 << 30 };
        state.apply(&create).unwrap();
        let before = state.clone();

        assert_eq!(state.apply(&create), Err(CommandError::VolumeExists("db".into())));
        assert_eq!(state, before);
    }

    #[test]
    fn deleted_volume_ids_are_not_reused() {
        let mut state = two_node_cluster();
        let create = ClusterCommand::CreateVolume { name: "db".into(), pool: PoolId(0), size_bytes: 1 << 30 };
        state.apply(&create).unwrap();
        state.apply(&ClusterCommand::DeleteVolume { volume: VolumeId(0) }).unwrap();

        assert_eq!(state.apply(&create), Ok(CommandOutcome::VolumeCreated(VolumeId(1))));
    }

    #[test]
    fn pool_with_two_replicas_on_one_node_is_refused() {
        let mut state = two_node_cluster();
        state.apply(&disk(11, NODE_A)).unwrap();
        let pool = ClusterCommand::CreatePool {
            name: "bad".into(),
            replicas: 2,
            min_size: 2,
            pgs: vec![vec![DiskId(10), DiskId(11)]],
        };

        let refused = state.apply(&pool);

        assert!(matches!(refused, Err(CommandError::InvalidPlacement { .. })), "{refused:?}");
    }

    #[test]
    fn the_same_disk_cannot_join_twice() {
        let mut state = two_node_cluster();
        let again = state.apply(&disk(10, NODE_B));
        assert!(matches!(again, Err(CommandError::DiskExists { disk: DiskId(10), .. })), "{again:?}");
    }

    fn vm_with_disk(state: &mut ClusterState, name: &str) -> VmId {
        let created = state.apply(&ClusterCommand::CreateVolume {
            name: format!("{name}-disk"),
            pool: PoolId(0),
            size_bytes: 1 << 30,
        });
        let Ok(CommandOutcome::VolumeCreated(volume)) = created else { panic!("{created:?}") };
        let spec = VmSpec {
            name: name.into(),
            cpus: 1,
            memory_bytes: 256 << 20,
            disks: vec![volume],
            boot: crate::vm::Boot::Disk,
            ha: Default::default(),
            seed: None,
            cdrom: None,
            nics: vec![],
        };
        let Ok(CommandOutcome::VmCreated(vm)) = state.apply(&ClusterCommand::CreateVm { spec }) else { panic!() };
        vm
    }

    #[test]
    fn networks_have_one_name_and_one_wire_and_go_only_when_no_nic_is_on_them() {
        use crate::network::{Mac, NetworkId, NetworkKind, Nic};
        let mut state = two_node_cluster();
        let overlay =
            |vni| ClusterCommand::CreateNetwork { name: format!("net{vni}"), kind: NetworkKind::Overlay { vni } };
        assert_eq!(state.apply(&overlay(7)), Ok(CommandOutcome::NetworkCreated(NetworkId(0))));
        let again = ClusterCommand::CreateNetwork { name: "net7".into(), kind: NetworkKind::Overlay { vni: 8 } };
        assert_eq!(state.apply(&again), Err(CommandError::NetworkExists("net7".into())));
        let same_vni = ClusterCommand::CreateNetwork { name: "other".into(), kind: NetworkKind::Overlay { vni: 7 } };
        assert!(matches!(state.apply(&same_vni), Err(CommandError::InvalidInput(_))), "one VXLAN, two names");
        let bad = ClusterCommand::CreateNetwork { name: "../x".into(), kind: NetworkKind::Overlay { vni: 9 } };
        assert!(matches!(state.apply(&bad), Err(CommandError::InvalidInput(_))));
        let vlan =
            ClusterCommand::CreateNetwork { name: "v".into(), kind: NetworkKind::Vlan { vlan: 5000, interface: None } };
        assert!(matches!(state.apply(&vlan), Err(CommandError::InvalidInput(_))));

        let web = vm_with_disk(&mut state, "web");
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        let with_nic = |state: &ClusterState, vm: VmId, nics: Vec<Nic>| {
            let spec = VmSpec { nics, ..state.vms[&vm].spec.clone() };
            ClusterCommand::UpdateVm { vm, spec }
        };
        let nic = Nic { network: NetworkId(0), mac };
        assert_eq!(state.apply(&with_nic(&state, web, vec![nic])), Ok(CommandOutcome::Done));
        let db = vm_with_disk(&mut state, "db");
        assert!(
            matches!(state.apply(&with_nic(&state, db, vec![nic])), Err(CommandError::InvalidVm(e)) if e.contains("web")),
            "a MAC is one NIC's"
        );
        let unknown = Nic { network: NetworkId(5), mac: "52:54:00:00:00:02".parse().unwrap() };
        assert_eq!(state.apply(&with_nic(&state, db, vec![unknown])), Err(CommandError::UnknownNetwork(NetworkId(5))));
        let multicast = Nic { network: NetworkId(0), mac: "01:54:00:00:00:02".parse().unwrap() };
        assert!(matches!(state.apply(&with_nic(&state, db, vec![multicast])), Err(CommandError::InvalidVm(_))));

        let delete = ClusterCommand::DeleteNetwork { network: NetworkId(0) };
        assert_eq!(state.apply(&delete), Err(CommandError::NetworkInUse { network: "net7".into(), vm: "web".into() }));
        state.apply(&ClusterCommand::StartVm { vm: web, node: NODE_A, force: false }).unwrap();
        assert!(
            matches!(state.apply(&with_nic(&state, web, vec![])), Err(CommandError::InvalidVm(_))),
            "a running VM keeps its NICs"
        );
        state.apply(&ClusterCommand::StopVm { vm: web, force: false }).unwrap();
        state.apply(&ClusterCommand::ReportVm { vm: web, node: NODE_A, state: VmRunState::Stopped }).unwrap();
        assert_eq!(state.apply(&with_nic(&state, web, vec![])), Ok(CommandOutcome::Done));
        assert_eq!(state.apply(&delete), Ok(CommandOutcome::Done));
        assert_eq!(state.apply(&overlay(9)), Ok(CommandOutcome::NetworkCreated(NetworkId(1))), "ids are not reused");
        let picked = ClusterCommand::CreateNetwork { name: "auto".into(), kind: NetworkKind::Overlay { vni: 0 } };
        assert_eq!(state.apply(&picked), Ok(CommandOutcome::NetworkCreated(NetworkId(2))));
        assert_eq!(state.networks[&NetworkId(2)].kind, NetworkKind::Overlay { vni: 1 }, "the lowest free VXLAN id");
        let on_eth0 = ClusterCommand::CreateNetwork {
            name: "v1".into(),
            kind: NetworkKind::Vlan { vlan: 5, interface: Some("eth0".into()) },
        };
        assert!(state.apply(&on_eth0).is_ok());
        let on_own =
            ClusterCommand::CreateNetwork { name: "v2".into(), kind: NetworkKind::Vlan { vlan: 5, interface: None } };
        assert!(matches!(state.apply(&on_own), Err(CommandError::InvalidInput(_))), "maybe the same wire");
        state.check_invariants();
    }

    #[test]
    fn a_vm_starts_only_where_its_networks_are_provided_and_gaps_go_with_their_network() {
        use crate::network::{NetworkId, NetworkKind, Nic};
        let mut state = two_node_cluster();
        let lan = ClusterCommand::CreateNetwork {
            name: "lan".into(),
            kind: NetworkKind::Bridged { interface: "eth1".into() },
        };
        state.apply(&lan).unwrap();
        let web = vm_with_disk(&mut state, "web");
        let nic = Nic { network: NetworkId(0), mac: "52:54:00:00:00:01".parse().unwrap() };
        let spec = VmSpec { nics: vec![nic], ..state.vms[&web].spec.clone() };
        state.apply(&ClusterCommand::UpdateVm { vm: web, spec }).unwrap();

        let gaps = |node, list: &[(u32, &str)]| ClusterCommand::ReportNetworkGaps {
            node,
            gaps: list.iter().map(|(id, why)| (NetworkId(*id), why.to_string())).collect(),
        };
        // A gap of a network that is gone (or never was) is dropped; a long reason is cut.
        let long = "x".repeat(5000);
        state.apply(&gaps(NODE_B, &[(0, "eth1 does not exist"), (7, "gone")])).unwrap();
        assert_eq!(state.network_gaps[&NODE_B].keys().copied().collect::<Vec<_>>(), vec![NetworkId(0)]);
        let refused = state.apply(&ClusterCommand::StartVm { vm: web, node: NODE_B, force: false });
        assert!(
            matches!(&refused, Err(CommandError::NetworkUnavailable { network, node: NODE_B, reason })
                if network == "lan" && reason.contains("eth1 does not exist")),
            "{refused:?}"
        );
        state.apply(&ClusterCommand::StartVm { vm: web, node: NODE_A, force: false }).unwrap();
        state.apply(&gaps(NODE_A, &[(0, &long)])).unwrap();
        assert_eq!(state.network_gaps[&NODE_A][&NetworkId(0)].len(), crate::network::GAP_REASON_MAX_BYTES);
        assert_eq!(
            state.apply(&ClusterCommand::StartVm { vm: web, node: NODE_A, force: false }),
            Ok(CommandOutcome::Done),
            "starting it again where it is meant to run is no placement"
        );
        // A failover planned before the gap was known is refused; the leader plans again.
        state.apply(&ClusterCommand::MarkNodeDown { node: NODE_A, at_ms: 0, silent_ms: 0 }).unwrap();
        let failover = ClusterCommand::FailoverVm { vm: web, from: NODE_A, to: NODE_B, at_ms: 0 };
        assert!(matches!(state.apply(&failover), Err(CommandError::NetworkUnavailable { .. })));
        state.apply(&ClusterCommand::MarkNodeUp { node: NODE_A, at_ms: 0 }).unwrap();
        assert!(state.apply(&gaps(NodeId(77), &[])).is_err(), "only members report");
        state.check_invariants();

        // Mended: the node says so, and its entry goes.
        state.apply(&gaps(NODE_B, &[])).unwrap();
        assert!(!state.network_gaps.contains_key(&NODE_B));
        state.apply(&ClusterCommand::StopVm { vm: web, force: false }).unwrap();
        state.apply(&ClusterCommand::ReportVm { vm: web, node: NODE_A, state: VmRunState::Stopped }).unwrap();
        state.apply(&ClusterCommand::DeleteVm { vm: web }).unwrap();
        state.apply(&ClusterCommand::DeleteNetwork { network: NetworkId(0) }).unwrap();
        assert!(state.network_gaps.is_empty(), "a deleted network's gaps go with it");
        state.check_invariants();
    }

    #[test]
    fn a_vm_asks_for_no_more_memory_than_the_bound() {
        let mut state = two_node_cluster();
        let spec = |memory_bytes| VmSpec {
            name: "big".into(),
            cpus: 1,
            memory_bytes,
            disks: vec![],
            boot: crate::vm::Boot::Kernel {
                kernel: crate::vm::BootFile { volume: VolumeId(99), len_bytes: 1 },
                initrd: None,
                cmdline: String::new(),
            },
            ha: Default::default(),
            seed: None,
            cdrom: None,
            nics: vec![],
        };
        let too_much =
            state.apply(&ClusterCommand::CreateVm { spec: spec(crate::vm::VM_MEMORY_MAX_BYTES + (1 << 20)) });
        assert!(matches!(&too_much, Err(CommandError::InvalidVm(r)) if r.contains("at most")), "{too_much:?}");
    }

    #[test]
    fn a_running_vm_moves_to_another_node_only_with_force() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();

        let refused = state.apply(&ClusterCommand::StartVm { vm, node: NODE_B, force: false });
        let forced = state.apply(&ClusterCommand::StartVm { vm, node: NODE_B, force: true });

        assert!(matches!(refused, Err(CommandError::VmRunningElsewhere { node: NODE_A, .. })), "{refused:?}");
        assert_eq!(forced, Ok(CommandOutcome::Done));
        assert_eq!(state.vms[&vm].desired, VmDesired::Running { node: NODE_B });
    }

    #[test]
    fn a_volume_serves_one_vm_and_cannot_be_deleted_under_it() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        let disk = state.vms[&vm].spec.disks[0];
        let spec = VmSpec {
            name: "thief".into(),
            cpus: 1,
            memory_bytes: 256 << 20,
            disks: vec![disk],
            boot: crate::vm::Boot::Disk,
            ha: Default::default(),
            seed: None,
            cdrom: None,
            nics: vec![],
        };

        let second_vm = state.apply(&ClusterCommand::CreateVm { spec });
        let delete = state.apply(&ClusterCommand::DeleteVolume { volume: disk });

        assert!(matches!(second_vm, Err(CommandError::VolumeInUse { .. })), "{second_vm:?}");
        assert!(matches!(delete, Err(CommandError::VolumeInUse { .. })), "{delete:?}");
        state.check_invariants();
    }

    #[test]
    fn a_running_vm_changes_only_cpus_and_memory_and_a_stopped_one_its_disks_too() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        let other = vm_with_disk(&mut state, "db");
        let extra =
            state.apply(&ClusterCommand::CreateVolume { name: "extra".into(), pool: PoolId(0), size_bytes: 1 << 20 });
        let Ok(CommandOutcome::VolumeCreated(extra)) = extra else { panic!("{extra:?}") };
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();

        let bigger = VmSpec { cpus: 4, memory_bytes: 1 << 30, ..state.vms[&vm].spec.clone() };
        assert_eq!(state.apply(&ClusterCommand::UpdateVm { vm, spec: bigger }), Ok(CommandOutcome::Done));
        assert_eq!((state.vms[&vm].spec.cpus, state.vms[&vm].spec.memory_bytes), (4, 1 << 30));
        let mut with_disk = state.vms[&vm].spec.clone();
        with_disk.disks.push(extra);
        let running = state.apply(&ClusterCommand::UpdateVm { vm, spec: with_disk.clone() });
        assert!(matches!(&running, Err(CommandError::InvalidVm(r)) if r.contains("stopped")), "{running:?}");

        state.apply(&ClusterCommand::StopVm { vm, force: true }).unwrap();
        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_A, state: VmRunState::Stopped }).unwrap();
        assert_eq!(state.apply(&ClusterCommand::UpdateVm { vm, spec: with_disk.clone() }), Ok(CommandOutcome::Done));
        // Another VM's disk, another name, or a spec past the bounds: refused, nothing changed.
        let before = state.clone();
        let mut stolen = with_disk.clone();
        stolen.disks.push(state.vms[&other].spec.disks[0]);
        let refusals = [
            state.apply(&ClusterCommand::UpdateVm { vm, spec: stolen }),
            state.apply(&ClusterCommand::UpdateVm { vm, spec: VmSpec { name: "renamed".into(), ..with_disk.clone() } }),
            state.apply(&ClusterCommand::UpdateVm { vm, spec: VmSpec { cpus: 0, ..with_disk } }),
        ];
        assert!(matches!(refusals[0], Err(CommandError::VolumeInUse { .. })), "{refusals:?}");
        assert!(refusals[1..].iter().all(|r| matches!(r, Err(CommandError::InvalidVm(_)))), "{refusals:?}");
        assert_eq!(state, before);
    }

    #[test]
    fn a_volume_only_grows_and_not_under_a_running_vm() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        let disk = state.vms[&vm].spec.disks[0];
        let grow = |size_bytes| ClusterCommand::ResizeVolume { volume: disk, size_bytes };

        assert_eq!(state.apply(&grow(2 << 30)), Ok(CommandOutcome::Done));
        assert_eq!(state.volumes[&disk].size_bytes, 2 << 30);
        assert!(matches!(state.apply(&grow(1 << 30)), Err(CommandError::InvalidInput(r)) if r.contains("only grows")));
        assert!(matches!(state.apply(&grow((3 << 30) + 1)), Err(CommandError::InvalidSize(_))));
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();
        assert!(matches!(state.apply(&grow(3 << 30)), Err(CommandError::InvalidInput(r)) if r.contains("running")));
    }

    #[test]
    fn a_stale_stopped_report_does_not_hide_the_vm_running_elsewhere() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        let running = VmRunState::Running { accel: crate::vm::Accel::Tcg, pid: 42 };
        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_B, state: running.clone() }).unwrap();

        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_A, state: VmRunState::Stopped }).unwrap();

        assert_eq!(state.vms[&vm].observed, VmObserved { node: Some(NODE_B), state: running });
    }

    #[test]
    fn the_node_a_vm_moved_to_reports_over_the_node_it_left() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        let running = VmRunState::Running { accel: crate::vm::Accel::Tcg, pid: 7 };
        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_A, state: running.clone() }).unwrap();
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_B, force: true }).unwrap();

        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_B, state: VmRunState::Starting }).unwrap();

        assert_eq!(state.vms[&vm].observed, VmObserved { node: Some(NODE_B), state: VmRunState::Starting });
    }

    #[test]
    fn a_vm_is_deleted_only_when_stopped() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();

        assert_eq!(state.apply(&ClusterCommand::DeleteVm { vm }), Err(CommandError::VmNotStopped("web".into())));
        state.apply(&ClusterCommand::StopVm { vm, force: false }).unwrap();
        assert_eq!(state.apply(&ClusterCommand::DeleteVm { vm }), Ok(CommandOutcome::Done));
    }

    fn take_out(disk: u64, seen: u64) -> ClusterCommand {
        ClusterCommand::TakeReplicaOut {
            pool: PoolId(0),
            pg: PgId(0),
            disk: DiskId(disk),
            seen: PgEpoch(seen),
            reason: "no answer within 3000 ms".into(),
        }
    }

    #[test]
    fn taking_a_replica_out_raises_the_pg_epoch_and_leaves_the_rest_acting() {
        let mut state = two_node_cluster();

        let outcome = state.apply(&take_out(20, 1));

        assert_eq!(outcome, Ok(CommandOutcome::PgChanged(PgEpoch(2))));
        let pg = &state.pools[&PoolId(0)].pgs[0];
        assert_eq!(pg.acting().collect::<Vec<_>>(), vec![DiskId(10)]);
        assert_eq!(pg.out[&DiskId(20)].since, PgEpoch(2));
        state.check_invariants();
    }

    #[test]
    fn the_last_acting_replica_is_never_taken_out() {
        let mut state = two_node_cluster();
        state.apply(&take_out(20, 1)).unwrap();
        let before = state.clone();

        let refused = state.apply(&take_out(10, 2));

        assert_eq!(refused, Err(CommandError::LastReplica { pool: PoolId(0), pg: PgId(0), disk: DiskId(10) }));
        assert_eq!(state, before);
    }

    #[test]
    fn a_take_out_seen_at_an_older_epoch_is_refused() {
        let mut state = two_node_cluster();
        state.apply(&take_out(20, 1)).unwrap();
        let bring_in =
            ClusterCommand::BringReplicaIn { pool: PoolId(0), pg: PgId(0), disk: DiskId(20), seen: PgEpoch(2) };
        state.apply(&bring_in).unwrap();

        let late = state.apply(&take_out(20, 1));

        let stale = CommandError::StalePgEpoch { pool: PoolId(0), pg: PgId(0), seen: PgEpoch(1), current: PgEpoch(3) };
        assert_eq!(late, Err(stale));
        assert!(!state.pools[&PoolId(0)].pgs[0].is_degraded());
    }

    #[test]
    fn taking_out_a_replica_already_out_changes_nothing() {
        let mut state = two_node_cluster();
        state.apply(&take_out(20, 1)).unwrap();
        let before = state.clone();

        assert_eq!(state.apply(&take_out(20, 2)), Ok(CommandOutcome::PgChanged(PgEpoch(2))));
        assert_eq!(state, before);
    }

    #[test]
    fn fencing_a_replica_that_is_out_raises_the_epoch_and_keeps_it_out() {
        let mut state = two_node_cluster();
        state.apply(&take_out(20, 1)).unwrap();
        let fence = |seen| ClusterCommand::FenceReplicaOut { pool: PoolId(0), pg: PgId(0), disk: DiskId(20), seen };

        assert_eq!(state.apply(&fence(PgEpoch(2))), Ok(CommandOutcome::PgChanged(PgEpoch(3))));
        let pg = &state.pools[&PoolId(0)].pgs[0];
        assert_eq!(pg.acting().collect::<Vec<_>>(), vec![DiskId(10)]);
        assert_eq!(pg.out[&DiskId(20)].since, PgEpoch(2), "out since the take-out, not the fence");
        let stale = CommandError::StalePgEpoch { pool: PoolId(0), pg: PgId(0), seen: PgEpoch(2), current: PgEpoch(3) };
        assert_eq!(state.apply(&fence(PgEpoch(2))), Err(stale), "a fence made on an old view is refused");
        state.check_invariants();
    }

    #[test]
    fn an_acting_replica_is_not_fenced() {
        let mut state = two_node_cluster();
        let before = state.clone();

        let refused = state.apply(&ClusterCommand::FenceReplicaOut {
            pool: PoolId(0),
            pg: PgId(0),
            disk: DiskId(20),
            seen: PgEpoch(1),
        });

        assert_eq!(refused, Err(CommandError::ReplicaNotOut { pool: PoolId(0), pg: PgId(0), disk: DiskId(20) }));
        assert_eq!(state, before);
    }

    #[test]
    fn bringing_a_replica_in_needs_the_epoch_its_resync_copied_at() {
        let mut state = two_node_cluster();
        state.apply(&take_out(20, 1)).unwrap();
        let early = ClusterCommand::BringReplicaIn { pool: PoolId(0), pg: PgId(0), disk: DiskId(20), seen: PgEpoch(1) };
        let current =
            ClusterCommand::BringReplicaIn { pool: PoolId(0), pg: PgId(0), disk: DiskId(20), seen: PgEpoch(2) };

        assert!(matches!(state.apply(&early), Err(CommandError::StalePgEpoch { .. })));
        assert_eq!(state.apply(&current), Ok(CommandOutcome::PgChanged(PgEpoch(3))));
        assert_eq!(state.pools[&PoolId(0)].pgs[0].acting().count(), 2);
    }

    #[test]
    fn an_import_cannot_take_the_disk_of_a_running_vm_but_the_vm_itself_can() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        let disk = state.vms[&vm].spec.disks[0];
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();

        let import =
            state.apply(&ClusterCommand::AcquireVolume { volume: disk, node: NODE_B, unless_vm_running: true });
        let vm_start =
            state.apply(&ClusterCommand::AcquireVolume { volume: disk, node: NODE_A, unless_vm_running: false });

        assert_eq!(import, Err(CommandError::VolumeBusy { volume: disk, vm: "web".into() }));
        assert_eq!(vm_start, Ok(CommandOutcome::VolumeAcquired(OwnerEpoch(1))));
    }

    #[test]
    fn volume_size_must_be_whole_sectors() {
        let mut state = two_node_cluster();
        let create = ClusterCommand::CreateVolume { name: "odd".into(), pool: PoolId(0), size_bytes: 1000 };
        assert_eq!(state.apply(&create), Err(CommandError::InvalidSize(1000)));
        let huge = crate::VOLUME_SIZE_MAX_BYTES + 512;
        let too_big = ClusterCommand::CreateVolume { name: "huge".into(), pool: PoolId(0), size_bytes: huge };
        assert_eq!(state.apply(&too_big), Err(CommandError::InvalidSize(huge)));
    }

    fn down(node: NodeId, at_ms: u64) -> ClusterCommand {
        ClusterCommand::MarkNodeDown { node, at_ms, silent_ms: 3500 }
    }

    #[test]
    fn the_vms_of_a_node_that_went_down_are_not_running_and_can_be_stopped_and_deleted() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();
        let running = VmRunState::Running { accel: crate::vm::Accel::Tcg, pid: 7 };
        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_A, state: running }).unwrap();

        let epoch = state.pools[&PoolId(0)].pgs[0].epoch;
        state.apply(&down(NODE_A, 1000)).unwrap();

        assert!(matches!(state.vms[&vm].observed.state, VmRunState::Failed { .. }));
        let pg = &state.pools[&PoolId(0)].pgs[0];
        assert_eq!(pg.acting().collect::<Vec<_>>(), vec![DiskId(20)], "its replicas left the acting sets");
        assert_eq!(pg.epoch, PgEpoch(epoch.0 + 1));
        assert_eq!(state.apply(&ClusterCommand::StopVm { vm, force: false }), Ok(CommandOutcome::Done));
        assert_eq!(state.apply(&ClusterCommand::DeleteVm { vm }), Ok(CommandOutcome::Done));
        assert_eq!(state.events.back().map(|e| e.kind), Some(crate::ha::EventKind::NodeDown));
        state.check_invariants();
    }

    #[test]
    fn a_vm_fails_over_only_from_a_node_that_is_down_to_one_that_is_up() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();
        let failover = |from, to| ClusterCommand::FailoverVm { vm, from, to, at_ms: 2000 };

        assert_eq!(state.apply(&failover(NODE_A, NODE_B)), Err(CommandError::NodeNotDown(NODE_A)));
        state.apply(&down(NODE_A, 1000)).unwrap();
        state.apply(&down(NODE_B, 1000)).unwrap();
        assert_eq!(state.pools[&PoolId(0)].pgs[0].acting().count(), 1, "a PG keeps its last acting replica");
        assert_eq!(state.apply(&failover(NODE_A, NODE_B)), Err(CommandError::NodeDown(NODE_B)));
        state.apply(&ClusterCommand::MarkNodeUp { node: NODE_B, at_ms: 1500 }).unwrap();
        assert_eq!(state.apply(&failover(NODE_A, NODE_B)), Ok(CommandOutcome::Done));
        assert_eq!(state.vms[&vm].desired, VmDesired::Running { node: NODE_B });
        let again = state.apply(&failover(NODE_A, NODE_B));
        assert_eq!(again, Err(CommandError::VmMovedOn { vm: "web".into() }), "a second failover is refused");
    }

    #[test]
    fn a_vm_is_not_started_on_a_node_that_is_down() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&down(NODE_B, 1000)).unwrap();

        let refused = state.apply(&ClusterCommand::StartVm { vm, node: NODE_B, force: false });

        assert_eq!(refused, Err(CommandError::NodeDown(NODE_B)));
    }

    #[test]
    fn a_guest_stopped_on_a_node_the_vm_left_changes_nothing() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_B, force: true }).unwrap();

        state.apply(&ClusterCommand::GuestStopped { vm, node: NODE_A }).unwrap();
        assert_eq!(state.vms[&vm].desired, VmDesired::Running { node: NODE_B });
        state.apply(&ClusterCommand::GuestStopped { vm, node: NODE_B }).unwrap();
        assert_eq!(state.vms[&vm].desired, VmDesired::Stopped);
    }

    #[test]
    fn only_the_node_a_vm_is_meant_to_run_on_acquires_its_disks() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        let disk = state.vms[&vm].spec.disks[0];
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_B, force: false }).unwrap();
        let acquire = |node| ClusterCommand::AcquireVolume { volume: disk, node, unless_vm_running: false };
        let epoch = state.volumes[&disk].owner_epoch;

        let late = state.apply(&acquire(NODE_A));

        assert_eq!(late, Err(CommandError::VolumeOfVmElsewhere { volume: disk, vm: "web".into(), node: NODE_B }));
        assert_eq!(state.volumes[&disk].owner_epoch, epoch, "the late taker got nothing");
        assert!(matches!(state.apply(&acquire(NODE_B)), Ok(CommandOutcome::VolumeAcquired(_))));
    }

    #[test]
    fn the_event_log_keeps_the_newest_events_and_bounds_each_message() {
        let mut state = two_node_cluster();
        for i in 0..(crate::ha::EVENTS_KEPT as u64 + 10) {
            let message = "é".repeat(400) + &i.to_string();
            let kind = crate::ha::EventKind::NodeSlow;
            state.apply(&ClusterCommand::RecordEvent { at_ms: i, kind, message }).unwrap();
        }

        assert_eq!(state.events.len(), crate::ha::EVENTS_KEPT);
        assert_eq!(state.events.front().map(|e| e.seq), Some(11));
        assert_eq!(state.events_after(state.next_event_seq - 2).count(), 2);
        assert!(state.events.iter().all(|e| e.message.len() <= crate::ha::EVENT_MESSAGE_MAX_BYTES));
    }

    #[test]
    fn a_drain_move_yields_to_a_stop_or_a_resume_made_meanwhile() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();
        let drain = |drained| ClusterCommand::SetDrain { node: NODE_A, drained, at_ms: 0 };
        let move_off = ClusterCommand::MoveOffDrained { vm, from: NODE_A, to: NODE_B, at_ms: 0 };

        assert_eq!(state.apply(&move_off), Err(CommandError::NodeNotDrained(NODE_A)));
        state.apply(&drain(true)).unwrap();
        state.apply(&ClusterCommand::StopVm { vm, force: false }).unwrap();
        assert_eq!(state.apply(&move_off), Err(CommandError::VmMovedOn { vm: "web".into() }));
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();
        assert_eq!(state.apply(&move_off), Ok(CommandOutcome::Done));
        assert_eq!(state.vms[&vm].desired, VmDesired::Moving { from: NODE_A, to: NODE_B });
        assert_eq!(state.events.back().map(|e| e.kind), Some(crate::ha::EventKind::Drain));
    }

    /// A VM that ran on A, now moving to B because A is drained.
    fn moving_off_drained_a() -> (ClusterState, VmId) {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();
        let running = VmRunState::Running { accel: crate::vm::Accel::Tcg, pid: 7 };
        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_A, state: running }).unwrap();
        state.apply(&ClusterCommand::SetDrain { node: NODE_A, drained: true, at_ms: 0 }).unwrap();
        state.apply(&ClusterCommand::MoveOffDrained { vm, from: NODE_A, to: NODE_B, at_ms: 0 }).unwrap();
        (state, vm)
    }

    #[test]
    fn a_move_off_a_drained_node_starts_elsewhere_only_once_the_guest_stopped() {
        let (mut state, vm) = moving_off_drained_a();
        let finish = ClusterCommand::FinishMove { vm, to: NODE_B, at_ms: 1 };
        let disk = state.vms[&vm].spec.disks[0];
        let acquire = |node| ClusterCommand::AcquireVolume { volume: disk, node, unless_vm_running: false };

        assert!(matches!(state.apply(&finish), Err(CommandError::InvalidInput(_))), "it still runs on A");
        assert!(state.apply(&acquire(NODE_B)).is_err(), "its disks stay A's while it shuts down");
        assert!(state.apply(&acquire(NODE_A)).is_ok());
        let stopping = ClusterCommand::ReportVm { vm, node: NODE_A, state: VmRunState::Stopping };
        state.apply(&stopping).unwrap();
        assert!(state.apply(&finish).is_err(), "shutting down is not stopped");
        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_A, state: VmRunState::Stopped }).unwrap();
        assert_eq!(state.apply(&finish), Ok(CommandOutcome::Done));
        assert_eq!(state.vms[&vm].desired, VmDesired::Running { node: NODE_B });
        assert!(state.apply(&acquire(NODE_B)).is_ok());
        assert!(matches!(state.apply(&finish), Err(CommandError::VmMovedOn { .. })), "once");
    }

    #[test]
    fn a_move_waits_for_the_node_it_leaves_to_say_the_vm_is_stopped_there() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        // It last ran on B; it is meant for A, which may be starting it right now.
        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_B, state: VmRunState::Stopped }).unwrap();
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();
        state.apply(&ClusterCommand::SetDrain { node: NODE_A, drained: true, at_ms: 0 }).unwrap();
        state.apply(&ClusterCommand::MoveOffDrained { vm, from: NODE_A, to: NODE_B, at_ms: 0 }).unwrap();
        let finish = ClusterCommand::FinishMove { vm, to: NODE_B, at_ms: 1 };

        assert!(state.apply(&finish).is_err(), "stopped on B says nothing of A");
        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_A, state: VmRunState::Stopped }).unwrap();
        assert_eq!(state.apply(&finish), Ok(CommandOutcome::Done));
    }

    #[test]
    fn a_move_whose_source_went_down_finishes_without_waiting_for_it() {
        let (mut state, vm) = moving_off_drained_a();

        state.apply(&down(NODE_A, 1)).unwrap();

        assert_eq!(state.apply(&ClusterCommand::FinishMove { vm, to: NODE_B, at_ms: 2 }), Ok(CommandOutcome::Done));
        assert_eq!(state.vms[&vm].desired, VmDesired::Running { node: NODE_B });
    }

    #[test]
    fn a_node_is_removed_only_when_down_idle_and_holding_no_last_replica() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_B, force: false }).unwrap();
        let remove = ClusterCommand::RemoveNode { node: NODE_B, at_ms: 5 };

        assert_eq!(state.apply(&remove), Err(CommandError::NodeNotDown(NODE_B)));
        state.apply(&down(NODE_B, 1)).unwrap();
        assert!(matches!(state.apply(&remove), Err(CommandError::NodeInUse { .. })), "its VM is meant there");
        state.apply(&ClusterCommand::StopVm { vm, force: true }).unwrap();
        assert_eq!(state.apply(&remove), Ok(CommandOutcome::Done));

        assert!(!state.nodes.contains_key(&NODE_B) && state.removed.contains_key(&NODE_B));
        assert!(state.pools[&PoolId(0)].pgs[0].out[&DiskId(20)].reason.contains("removed"));
        state.check_invariants();
        let back = state.apply(&node(NODE_B));
        assert!(matches!(back, Err(CommandError::JoinRefused { .. })), "a removed id never comes back: {back:?}");
    }

    #[test]
    fn a_node_holding_the_last_acting_replica_of_volume_data_is_not_removed() {
        let mut state = two_node_cluster();
        vm_with_disk(&mut state, "web");
        state.apply(&down(NODE_A, 1)).unwrap();
        state.apply(&down(NODE_B, 1)).unwrap();
        state.apply(&ClusterCommand::MarkNodeUp { node: NODE_A, at_ms: 2 }).unwrap();

        let refused = state.apply(&ClusterCommand::RemoveNode { node: NODE_B, at_ms: 3 });

        assert!(
            matches!(&refused, Err(CommandError::NodeInUse { reason, .. }) if reason.contains("only acting replica")),
            "{refused:?}"
        );
    }

    #[test]
    fn a_node_holding_the_last_replica_of_pgs_without_volumes_is_removed() {
        let mut state = two_node_cluster();
        state.apply(&down(NODE_A, 1)).unwrap();
        state.apply(&down(NODE_B, 1)).unwrap();
        state.apply(&ClusterCommand::MarkNodeUp { node: NODE_A, at_ms: 2 }).unwrap();
        assert!(state.pools[&PoolId(0)].pgs.iter().any(|pg| pg.acting().eq([DiskId(20)])), "B holds a last replica");

        assert_eq!(state.apply(&ClusterCommand::RemoveNode { node: NODE_B, at_ms: 3 }), Ok(CommandOutcome::Done));
        state.check_invariants();
        let pgs = &state.pools[&PoolId(0)].pgs;
        assert!(pgs.iter().all(|pg| pg.acting().eq([DiskId(10)])), "A's replicas, whole, take over: {pgs:?}");
        let create = ClusterCommand::CreateVolume { name: "after".into(), pool: PoolId(0), size_bytes: 1 << 20 };
        assert!(matches!(state.apply(&create), Ok(CommandOutcome::VolumeCreated(_))));
    }

    #[test]
    fn a_join_never_rebinds_an_existing_node_or_address() {
        let mut state = two_node_cluster();
        let a = state.nodes[&NODE_A].clone();
        let moved = Node { api_addr: "10.0.0.9:7700".into(), ..a.clone() };
        let thief = Node { id: NodeId(3), ..a.clone() };

        assert_eq!(state.apply(&ClusterCommand::AddNode(a.clone())), Ok(CommandOutcome::Done), "a retried join");
        assert!(matches!(state.apply(&ClusterCommand::AddNode(moved)), Err(CommandError::JoinRefused { .. })));
        assert!(matches!(state.apply(&ClusterCommand::AddNode(thief)), Err(CommandError::JoinRefused { .. })));
        assert_eq!(state.nodes[&NODE_A], a);
    }

    #[test]
    fn free_text_from_nodes_is_bounded_and_long_inputs_are_refused() {
        let mut state = two_node_cluster();
        let vm = vm_with_disk(&mut state, "web");
        state.apply(&ClusterCommand::StartVm { vm, node: NODE_A, force: false }).unwrap();
        let failed = VmRunState::Failed { reason: "ü".repeat(5000) };
        state.apply(&ClusterCommand::ReportVm { vm, node: NODE_A, state: failed }).unwrap();
        let take_out = ClusterCommand::TakeReplicaOut {
            pool: PoolId(0),
            pg: PgId(0),
            disk: DiskId(20),
            seen: PgEpoch(1),
            reason: "e".repeat(100_000),
        };
        state.apply(&take_out).unwrap();

        let VmRunState::Failed { reason } = &state.vms[&vm].observed.state else { panic!() };
        assert!(reason.len() <= crate::ha::REASON_MAX_BYTES);
        assert!(state.pools[&PoolId(0)].pgs[0].out[&DiskId(20)].reason.len() <= crate::ha::REASON_MAX_BYTES);
        let long_name = ClusterCommand::CreateVolume { name: "v".repeat(200), pool: PoolId(0), size_bytes: 512 };
        assert!(matches!(state.apply(&long_name), Err(CommandError::InvalidInput(_))));
    }
}
