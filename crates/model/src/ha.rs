//! High availability in the cluster state: what each node offers, which nodes the leader
//! declared down, VMs moved off them, and the event log that says what happened when.
//!
//! Times are wall-clock milliseconds since the Unix epoch, chosen by the proposer and
//! carried in the command, so every node applies the same value.

use crate::command::CommandError;
use crate::ids::NodeId;
use crate::state::ClusterState;
use crate::vm::{VmDesired, VmId, VmObserved, VmRunState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Events the cluster keeps; older ones are dropped first.
pub const EVENTS_KEPT: usize = 256;
/// Longest event message kept (bytes); a longer one is cut at a character boundary.
pub const EVENT_MESSAGE_MAX_BYTES: usize = 512;
/// Largest VM priority: VMs with a higher one are restarted first.
pub const VM_PRIORITY_MAX: u8 = 100;
/// Longest anti-affinity group name.
pub const GROUP_NAME_MAX_BYTES: usize = 64;

/// `text` cut to at most `max` bytes at a character boundary: free text from a node (a
/// reason, a message) never makes a state or a Raft entry grow without bound.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Longest reason kept for a failed VM or a replica taken out.
pub const REASON_MAX_BYTES: usize = 1024;

/// What a node offers to VMs, as it reported at its start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpus: u16,
    pub memory_bytes: u64,
}

/// How a VM is treated when its node goes down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaPolicy {
    /// Restart it on another node when its node goes down.
    pub enabled: bool,
    /// Higher is restarted first when there is not room for every VM.
    #[serde(default)]
    pub priority: u8,
    /// VMs of one group are never placed on one node by HA.
    #[serde(default)]
    pub anti_affinity: Option<String>,
}

impl Default for HaPolicy {
    fn default() -> Self {
        HaPolicy { enabled: true, priority: 0, anti_affinity: None }
    }
}

impl HaPolicy {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.priority > VM_PRIORITY_MAX {
            return Err(format!("priority {} is above {VM_PRIORITY_MAX}", self.priority));
        }
        if let Some(group) = &self.anti_affinity {
            crate::names::check_name("anti-affinity group", group, GROUP_NAME_MAX_BYTES)?;
        }
        Ok(())
    }
}

/// A node the leader declared down, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDown {
    pub at_ms: u64,
    /// How long it had not answered when it was declared down.
    #[serde(default)]
    pub silent_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    NodeDown,
    NodeUp,
    NodeRemoved,
    /// A node answered late, but within the time that would have declared it down.
    NodeSlow,
    /// A node lost the majority and stopped its VMs on its own.
    NodeIsolated,
    VmFailover,
    /// An HA VM of a down node fits on no node that is up.
    VmUnplaced,
    /// A VM started after a failover: how long each step took.
    VmRestarted,
    Fencing,
    ResyncStarted,
    ResyncFinished,
    Drain,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Raised by one for every event: `converge events --follow` asks for those after one.
    pub seq: u64,
    pub at_ms: u64,
    pub kind: EventKind,
    pub message: String,
}

impl ClusterState {
    pub fn is_down(&self, node: NodeId) -> bool {
        self.down.contains_key(&node)
    }

    /// Appends an event, dropping the oldest past `EVENTS_KEPT`.
    pub(crate) fn record_event(&mut self, at_ms: u64, kind: EventKind, message: &str) {
        let message = bounded(message, EVENT_MESSAGE_MAX_BYTES);
        self.next_event_seq += 1;
        self.events.push_back(Event { seq: self.next_event_seq, at_ms, kind, message });
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
    }

    /// The events after `seq`, oldest first.
    pub fn events_after(&self, seq: u64) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(move |e| e.seq > seq)
    }

    fn node_name(&self, node: NodeId) -> String {
        match self.nodes.get(&node) {
            Some(n) => format!("{node} ({})", n.api_addr),
            None => node.to_string(),
        }
    }

    pub(crate) fn mark_node_down(&mut self, node: NodeId, at_ms: u64, silent_ms: u64) -> Result<(), CommandError> {
        if !self.nodes.contains_key(&node) {
            return Err(CommandError::UnknownNode(node));
        }
        if self.down.contains_key(&node) {
            return Ok(());
        }
        self.down.insert(node, NodeDown { at_ms, silent_ms });
        // Its replicas leave their acting sets now, in one step, rather than one write
        // timeout and one take-out at a time: writers and a new owner's fencing go on with
        // the others at once. A PG whose only acting replicas are there keeps them (its data
        // is there); the node's replicas are resynced when it answers again.
        let on_node: Vec<crate::ids::DiskId> = self.disks_of(node).map(|d| d.id).collect();
        let reason = format!("its node {node} went down");
        for pool in self.pools.values_mut() {
            for pg in &mut pool.pgs {
                let leaving: Vec<_> = on_node.iter().copied().filter(|d| pg.is_acting(*d)).collect();
                if leaving.is_empty() || pg.acting().count() == leaving.len() {
                    continue;
                }
                pg.epoch = crate::ids::PgEpoch(pg.epoch.0 + 1);
                for disk in leaving {
                    pg.out.insert(disk, crate::state::OutReason { since: pg.epoch, reason: reason.clone() });
                }
            }
        }
        // Its QEMU processes died with it, or will be ended when it returns: what ran there
        // is not running, and may be stopped, deleted or restarted elsewhere.
        let reason = format!("its node {node} went down");
        for vm in self.vms.values_mut() {
            let alive = !matches!(vm.observed.state, VmRunState::Stopped | VmRunState::Failed { .. });
            if vm.observed.node == Some(node) && alive {
                vm.observed = VmObserved { node: Some(node), state: VmRunState::Failed { reason: reason.clone() } };
            }
        }
        let message = format!("{} is down: not heard from for {silent_ms} ms", self.node_name(node));
        self.record_event(at_ms, EventKind::NodeDown, &message);
        Ok(())
    }

    pub(crate) fn mark_node_up(&mut self, node: NodeId, at_ms: u64) -> Result<(), CommandError> {
        if !self.nodes.contains_key(&node) {
            return Err(CommandError::UnknownNode(node));
        }
        if let Some(down) = self.down.remove(&node) {
            let message =
                format!("{} is up again after {} ms down", self.node_name(node), at_ms.saturating_sub(down.at_ms));
            self.record_event(at_ms, EventKind::NodeUp, &message);
        }
        Ok(())
    }

    /// Moves an HA VM off `from`, which is down, to `to`.
    pub(crate) fn failover_vm(&mut self, vm: VmId, from: NodeId, to: NodeId, at_ms: u64) -> Result<(), CommandError> {
        let Some(down) = self.down.get(&from).copied() else {
            return Err(CommandError::NodeNotDown(from));
        };
        let name = self.move_vm(vm, from, to)?;
        let (to, from) = (self.node_name(to), self.node_name(from));
        let message =
            format!("VM {name} restarts on {to}: {from} went down {} ms ago", at_ms.saturating_sub(down.at_ms));
        self.record_event(at_ms, EventKind::VmFailover, &message);
        Ok(())
    }

    /// Moves a VM off `from`, which is drained, to `to`: only while it is still meant to run
    /// on `from` and `from` is still drained (an admin's stop or resume meanwhile wins).
    pub(crate) fn move_off_drained(
        &mut self,
        vm: VmId,
        from: NodeId,
        to: NodeId,
        at_ms: u64,
    ) -> Result<(), CommandError> {
        if !self.drained.contains(&from) {
            return Err(CommandError::NodeNotDrained(from));
        }
        self.check_target(vm, to)?;
        let found = self.vms.get_mut(&vm).ok_or(CommandError::UnknownVm(vm))?;
        if found.desired != (VmDesired::Running { node: from }) {
            return Err(CommandError::VmMovedOn { vm: found.spec.name.clone() });
        }
        found.desired = VmDesired::Moving { from, to };
        found.force_stop = false;
        let name = found.spec.name.clone();
        let message =
            format!("VM {name} shuts down on drained {} to start on {}", self.node_name(from), self.node_name(to));
        self.record_event(at_ms, EventKind::Drain, &message);
        Ok(())
    }

    /// Ends a move: the VM stopped on the node it leaves (or that node is down), and runs on
    /// `to` from now on.
    pub(crate) fn finish_move(&mut self, vm: VmId, to: NodeId, at_ms: u64) -> Result<(), CommandError> {
        self.check_target(vm, to)?;
        let down = self.down.clone();
        let found = self.vms.get_mut(&vm).ok_or(CommandError::UnknownVm(vm))?;
        let VmDesired::Moving { from, .. } = found.desired else {
            return Err(CommandError::VmMovedOn { vm: found.spec.name.clone() });
        };
        let stopped = found.observed.node == Some(from)
            && matches!(found.observed.state, VmRunState::Stopped | VmRunState::Failed { .. });
        if !stopped && !down.contains_key(&from) {
            return Err(CommandError::InvalidInput(format!(
                "VM {} still runs on {from}: it moves once it stopped there",
                found.spec.name
            )));
        }
        found.desired = VmDesired::Running { node: to };
        let name = found.spec.name.clone();
        let message = format!("VM {name} moved off {} to {}", self.node_name(from), self.node_name(to));
        self.record_event(at_ms, EventKind::Drain, &message);
        Ok(())
    }

    /// Points a VM still meant to run on `from` at `to`, a member that is not down; its name.
    fn move_vm(&mut self, vm: VmId, from: NodeId, to: NodeId) -> Result<String, CommandError> {
        self.check_target(vm, to)?;
        let found = self.vms.get_mut(&vm).ok_or(CommandError::UnknownVm(vm))?;
        if found.desired != (VmDesired::Running { node: from }) {
            return Err(CommandError::VmMovedOn { vm: found.spec.name.clone() });
        }
        found.desired = VmDesired::Running { node: to };
        found.force_stop = false;
        Ok(found.spec.name.clone())
    }

    /// A node a VM can be moved to: a member that is not down.
    fn check_target(&self, vm: VmId, to: NodeId) -> Result<(), CommandError> {
        if !self.nodes.contains_key(&to) {
            return Err(CommandError::UnknownNode(to));
        }
        if self.down.contains_key(&to) {
            return Err(CommandError::NodeDown(to));
        }
        // A plan made before `to` said it cannot provide the VM's network: made again.
        if let Some((network, reason)) = self.vms.get(&vm).and_then(|found| self.network_gap(&found.spec, to)) {
            return Err(CommandError::NetworkUnavailable { network, node: to, reason });
        }
        Ok(())
    }

    /// Adds a member, or confirms one that is already in with the same addresses. An id
    /// that was removed never comes back, and no node takes over another's addresses.
    pub(crate) fn add_node(
        &mut self,
        node: &crate::state::Node,
    ) -> Result<crate::command::CommandOutcome, CommandError> {
        let refuse =
            |reason: String| Err(CommandError::JoinRefused { node: node.id, addr: node.api_addr.clone(), reason });
        if self.removed.contains_key(&node.id) {
            return refuse(format!("{} was removed; a node joins again with an empty data dir", node.id));
        }
        if let Some(known) = self.nodes.get(&node.id) {
            if known != node {
                return refuse(format!("{} is already a member at {}", node.id, known.api_addr));
            }
            return Ok(crate::command::CommandOutcome::Done);
        }
        // (Test fixtures leave addresses empty; a real node's are checked when it starts.)
        let same = |a: &str, b: &str| !a.is_empty() && a == b;
        let taken =
            self.nodes.values().find(|n| same(&n.api_addr, &node.api_addr) || same(&n.data_addr, &node.data_addr));
        if let Some(other) = taken {
            return refuse(format!("{} uses that address; remove it first (`converge node remove`)", other.id));
        }
        let same_cert =
            self.nodes.values().chain(self.removed.values()).find(|n| same(&n.cert_sha256, &node.cert_sha256));
        if let Some(other) = same_cert {
            return refuse(format!("{} has that certificate; a node joins with a key of its own", other.id));
        }
        self.nodes.insert(node.id, node.clone());
        Ok(crate::command::CommandOutcome::Done)
    }

    pub(crate) fn remove_node(&mut self, node: NodeId, at_ms: u64) -> Result<(), CommandError> {
        if !self.nodes.contains_key(&node) {
            return Err(CommandError::UnknownNode(node));
        }
        if !self.down.contains_key(&node) {
            return Err(CommandError::NodeNotDown(node));
        }
        let in_use = |reason: String| Err(CommandError::NodeInUse { node, reason });
        let vms: Vec<String> =
            self.vms.values().filter(|vm| vm.desired.node() == Some(node)).map(|vm| vm.spec.name.clone()).collect();
        if !vms.is_empty() {
            return in_use(format!("VMs {} are meant to run on it: start them elsewhere or stop them", vms.join(", ")));
        }
        let disks: Vec<crate::ids::DiskId> = self.disks_of(node).map(|d| d.id).collect();
        // A PG no volume maps to holds nothing to lose.
        let sole: usize = self
            .pools
            .values()
            .map(|pool| {
                let holding = pool.pgs_holding_volumes(self);
                let sole = |(i, pg): &(usize, &crate::state::Pg)| {
                    holding.contains(i) && disks.iter().any(|d| pg.is_acting(*d))
                };
                pool.pgs.iter().enumerate().filter(sole).count()
            })
            .sum();
        if sole > 0 {
            return in_use(format!(
                "it holds the only acting replica of {sole} PGs with volume data: bring it back, or that data is lost"
            ));
        }
        // PGs no volume maps to hold nothing: their other replicas, out or not, are whole,
        // and take over from the removed one (a PG whose every replica was there keeps it
        // acting, and its pool takes no new volume until it is placed anew).
        let holding: BTreeMap<crate::ids::PoolId, BTreeSet<usize>> =
            self.pools.values().map(|pool| (pool.id, pool.pgs_holding_volumes(self))).collect();
        let emptied_reason = format!("its node {node} was removed");
        for pool in self.pools.values_mut() {
            for (i, pg) in pool.pgs.iter_mut().enumerate() {
                let removed: Vec<_> = pg.disks.iter().copied().filter(|d| disks.contains(d)).collect();
                let others = pg.disks.len() - removed.len();
                if removed.is_empty() || others == 0 || holding[&pool.id].contains(&i) {
                    continue;
                }
                pg.epoch = crate::ids::PgEpoch(pg.epoch.0 + 1);
                pg.out.clear();
                for disk in removed {
                    pg.out.insert(disk, crate::state::OutReason { since: pg.epoch, reason: emptied_reason.clone() });
                }
            }
        }
        let gone = self.nodes.remove(&node).expect("checked above");
        self.removed.insert(node, gone.clone());
        self.down.remove(&node);
        self.drained.remove(&node);
        self.capacity.remove(&node);
        self.network_gaps.remove(&node);
        let reason = format!("its node {node} was removed");
        let mut pgs = 0;
        for pool in self.pools.values_mut() {
            for pg in &mut pool.pgs {
                for disk in &disks {
                    if let Some(out) = pg.out.get_mut(disk) {
                        out.reason = reason.clone();
                        pgs += 1;
                    }
                }
            }
        }
        let message = format!(
            "{node} ({}) was removed; its replicas stay out of {pgs} PGs until they are placed anew",
            gone.api_addr
        );
        self.record_event(at_ms, EventKind::NodeRemoved, &message);
        Ok(())
    }
}
