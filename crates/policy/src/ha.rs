//! Where VMs go when their node goes down or is drained, and whether a node can go down:
//! pure decisions over the cluster state and the caller's view of which nodes answer.

use model::{ClusterState, NodeId, Vm, VmDesired, VmId};
use std::collections::BTreeMap;

/// Where each VM to move goes, and the ones that fit nowhere, with why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub moves: Vec<Move>,
    pub unplaced: Vec<Unplaced>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub vm: VmId,
    pub from: NodeId,
    pub to: NodeId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaced {
    pub vm: VmId,
    pub from: NodeId,
    pub reason: String,
}

/// What a node has given to VMs so far: the VMs meant to run there, and those this plan
/// adds.
#[derive(Clone, Debug, Default)]
struct Load {
    memory_bytes: u64,
    vms: usize,
    groups: Vec<String>,
}

/// The HA VMs of nodes that are down, placed on nodes that are up.
pub fn failover_plan(state: &ClusterState, is_up: impl Fn(NodeId) -> bool) -> Placement {
    let moving: Vec<&Vm> = state
        .vms
        .values()
        .filter(|vm| vm.spec.ha.enabled)
        .filter(|vm| matches!(vm.desired, VmDesired::Running { node } if state.is_down(node)))
        .collect();
    place(state, &moving, is_up, None)
}

/// Moves whose VM stopped on the node it leaves (or that node is down), ready to finish:
/// on the planned node if it can still take the VM, else on another one.
pub fn finish_moves(state: &ClusterState, is_up: impl Fn(NodeId) -> bool) -> Placement {
    // Stopped as `from` itself said (it also says so for a VM it never ran), or `from` is down.
    let stopped = |vm: &Vm, from: NodeId| {
        state.is_down(from)
            || (vm.observed.node == Some(from)
                && matches!(vm.observed.state, model::VmRunState::Stopped | model::VmRunState::Failed { .. }))
    };
    let mut placement = Placement::default();
    let mut replan = Vec::new();
    for vm in state.vms.values() {
        let VmDesired::Moving { from, to } = vm.desired else { continue };
        if !stopped(vm, from) {
            continue;
        }
        if is_up(to) && !state.is_down(to) && !state.drained.contains(&to) && state.network_gap(&vm.spec, to).is_none()
        {
            placement.moves.push(Move { vm: vm.id, from, to });
        } else {
            replan.push(vm);
        }
    }
    // The planned node can no longer take it: place it anew.
    let again = place(state, &replan, is_up, None);
    placement.moves.extend(again.moves);
    placement.unplaced.extend(again.unplaced);
    placement
}

/// Every VM meant to run on `node`, placed on the other nodes that are up.
pub fn drain_plan(state: &ClusterState, node: NodeId, is_up: impl Fn(NodeId) -> bool) -> Placement {
    let moving: Vec<&Vm> = state.vms.values().filter(|vm| vm.desired == (VmDesired::Running { node })).collect();
    place(state, &moving, is_up, Some(node))
}

/// Places `moving` (highest priority first, then oldest) on the nodes that are up, not down,
/// not drained and not `leaving`: where the VM's memory and vCPUs fit, and no VM of its
/// anti-affinity group is; among those, the one with the most memory left, then the fewest
/// VMs, then the lowest id. A node whose capacity is unknown (it never reported) counts as
/// roomy.
fn place(state: &ClusterState, moving: &[&Vm], is_up: impl Fn(NodeId) -> bool, leaving: Option<NodeId>) -> Placement {
    let mut loads: BTreeMap<NodeId, Load> = state
        .nodes
        .keys()
        .filter(|&&n| is_up(n) && !state.is_down(n) && !state.drained.contains(&n) && Some(n) != leaving)
        .map(|&n| (n, Load::default()))
        .collect();
    for vm in state.vms.values() {
        // A VM on its way to a node counts there already.
        if let VmDesired::Running { node } | VmDesired::Moving { to: node, .. } = vm.desired {
            if let Some(load) = loads.get_mut(&node) {
                load.memory_bytes += vm.spec.memory_bytes;
                load.vms += 1;
                load.groups.extend(vm.spec.ha.anti_affinity.clone());
            }
        }
    }
    let mut order: Vec<&Vm> = moving.to_vec();
    order.sort_by_key(|vm| (std::cmp::Reverse(vm.spec.ha.priority), vm.id));
    let mut placement = Placement::default();
    for vm in order {
        let (VmDesired::Running { node: from } | VmDesired::Moving { from, .. }) = vm.desired else { continue };
        let capacity = |n: &NodeId| state.capacity.get(n).copied().filter(|c| c.memory_bytes > 0);
        let fits = |(n, load): &(&NodeId, &Load)| {
            let room = capacity(n)
                .is_none_or(|c| load.memory_bytes + vm.spec.memory_bytes <= c.memory_bytes && vm.spec.cpus <= c.cpus);
            let apart = vm.spec.ha.anti_affinity.as_ref().is_none_or(|g| !load.groups.contains(g));
            let wired = state.network_gap(&vm.spec, **n).is_none();
            room && apart && wired
        };
        let free = |n: &NodeId, load: &Load| capacity(n).map_or(u64::MAX, |c| c.memory_bytes - load.memory_bytes);
        let best = loads
            .iter()
            .filter(fits)
            .min_by_key(|(n, load)| (std::cmp::Reverse(free(n, load)), load.vms, **n))
            .map(|(n, _)| *n);
        match best {
            Some(to) => {
                let load = loads.get_mut(&to).expect("chosen from the loads");
                load.memory_bytes += vm.spec.memory_bytes;
                load.vms += 1;
                load.groups.extend(vm.spec.ha.anti_affinity.clone());
                placement.moves.push(Move { vm: vm.id, from, to });
            }
            None => {
                let gaps: Vec<(NodeId, (String, String))> =
                    loads.keys().filter_map(|&n| state.network_gap(&vm.spec, n).map(|gap| (n, gap))).collect();
                let reason = if loads.is_empty() {
                    "no other node is up and taking VMs".to_string()
                } else if gaps.len() == loads.len() {
                    let (node, (network, why)) = &gaps[0];
                    format!("no node that is up can provide its networks ({node} cannot provide network {network:?}: {why})")
                } else if vm.spec.ha.anti_affinity.is_some()
                    && loads.iter().any(|(n, l)| {
                        capacity(n).is_none_or(|c| l.memory_bytes + vm.spec.memory_bytes <= c.memory_bytes)
                    })
                {
                    format!(
                        "every node with room runs a VM of its anti-affinity group {}",
                        vm.spec.ha.anti_affinity.as_deref().unwrap_or_default()
                    )
                } else {
                    format!(
                        "no node that is up has {} MiB of memory and {} vCPUs free for it",
                        vm.spec.memory_bytes >> 20,
                        vm.spec.cpus
                    )
                };
                placement.unplaced.push(Unplaced { vm: vm.id, from, reason });
            }
        }
    }
    placement
}

/// Whether `node` can go down now: `Ok` or every reason it cannot, in plain sentences.
pub fn node_check(state: &ClusterState, node: NodeId, is_up: impl Fn(NodeId) -> bool) -> Result<(), Vec<String>> {
    let mut reasons = Vec::new();
    for pool in state.pools.values() {
        let mut short = 0;
        for pg in &pool.pgs {
            let acting_elsewhere =
                pg.acting().filter(|d| state.disks.get(d).is_some_and(|d| d.node != node && is_up(d.node))).count();
            if acting_elsewhere < usize::from(pool.min_size) {
                short += 1;
            }
        }
        if short > 0 {
            reasons.push(format!(
                "{short} of {} PGs of pool {} would keep fewer than {} replicas (min_size): their volumes would stop taking writes",
                pool.pgs.len(),
                pool.name,
                pool.min_size
            ));
        }
    }
    let plan = drain_plan(state, node, &is_up);
    for unplaced in &plan.unplaced {
        let name = state.vms.get(&unplaced.vm).map(|v| v.spec.name.as_str()).unwrap_or_default();
        reasons.push(format!("VM {name} has nowhere to run: {}", unplaced.reason));
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{
        Boot, BootFile, Capacity, ClusterCommand, ClusterId, Disk, DiskId, HaPolicy, Node, PoolId, VmSpec, VolumeId,
    };

    const GIB: u64 = 1 << 30;

    /// Nodes 1..=n with `memory_gib` each, and VMs `(name, node, memory_gib, ha)`, each
    /// booting a kernel kept in a volume of its own.
    fn cluster(nodes: u64, memory_gib: u64, vms: &[(&str, u64, u64, HaPolicy)]) -> ClusterState {
        let mut state = ClusterState::default();
        let mut apply = |c: ClusterCommand| {
            state.apply(&c).expect("fixture applies");
        };
        apply(ClusterCommand::InitCluster { id: ClusterId(1) });
        for id in 1..=nodes {
            apply(ClusterCommand::AddNode(Node {
                id: NodeId(id),
                api_addr: String::new(),
                data_addr: String::new(),
                cert_sha256: String::new(),
            }));
            let capacity = Capacity { cpus: 4, memory_bytes: memory_gib * GIB };
            apply(ClusterCommand::ReportCapacity { node: NodeId(id), capacity });
        }
        let disk = Disk { id: DiskId(1), node: NodeId(1), path: "/d".into(), size_bytes: GIB, extent_slots: 255 };
        apply(ClusterCommand::AddDisk(disk));
        apply(ClusterCommand::CreatePool { name: "p".into(), replicas: 1, min_size: 1, pgs: vec![vec![DiskId(1)]] });
        for (i, (name, node, memory, ha)) in vms.iter().enumerate() {
            apply(ClusterCommand::CreateVolume { name: format!("{name}-kernel"), pool: PoolId(0), size_bytes: 512 });
            let kernel = BootFile { volume: VolumeId(i as u64), len_bytes: 512 };
            let spec = VmSpec {
                name: name.to_string(),
                cpus: 1,
                memory_bytes: memory * GIB,
                disks: vec![],
                boot: Boot::Kernel { kernel, initrd: None, cmdline: String::new() },
                ha: ha.clone(),
                seed: None,
                cdrom: None,
                nics: vec![],
            };
            apply(ClusterCommand::CreateVm { spec });
            apply(ClusterCommand::StartVm { vm: VmId(i as u64), node: NodeId(*node), force: false });
        }
        state
    }

    fn ha() -> HaPolicy {
        HaPolicy::default()
    }

    fn down(state: &mut ClusterState, node: u64) {
        state.apply(&ClusterCommand::MarkNodeDown { node: NodeId(node), at_ms: 0, silent_ms: 0 }).unwrap();
    }

    #[test]
    fn the_vms_of_a_down_node_spread_over_the_nodes_with_the_most_room() {
        let mut state = cluster(3, 8, &[("a", 1, 2, ha()), ("b", 1, 2, ha()), ("c", 2, 4, ha())]);
        down(&mut state, 1);

        let plan = failover_plan(&state, |_| true);

        let to: Vec<(VmId, NodeId)> = plan.moves.iter().map(|m| (m.vm, m.to)).collect();
        assert_eq!(to, vec![(VmId(0), NodeId(3)), (VmId(1), NodeId(3))], "node 3 has 8 GiB free, node 2 has 4");
        assert!(plan.unplaced.is_empty());
    }

    #[test]
    fn higher_priority_goes_first_and_what_fits_nowhere_is_reported() {
        let low = HaPolicy { priority: 1, ..ha() };
        let high = HaPolicy { priority: 50, ..ha() };
        let mut state = cluster(2, 4, &[("low", 1, 3, low), ("high", 1, 3, high)]);
        down(&mut state, 1);

        let plan = failover_plan(&state, |_| true);

        assert_eq!(plan.moves, vec![Move { vm: VmId(1), from: NodeId(1), to: NodeId(2) }]);
        assert_eq!(plan.unplaced.len(), 1);
        assert_eq!(plan.unplaced[0].vm, VmId(0));
        assert!(plan.unplaced[0].reason.contains("3072 MiB"), "{}", plan.unplaced[0].reason);
    }

    #[test]
    fn a_vm_goes_only_to_a_node_that_provides_its_networks() {
        use model::{Mac, NetworkId, NetworkKind, Nic};
        let mut state = cluster(3, 8, &[("web", 1, 1, ha())]);
        let lan = ClusterCommand::CreateNetwork { name: "lan".into(), kind: NetworkKind::Overlay { vni: 5 } };
        state.apply(&lan).unwrap();
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        state.vms.get_mut(&VmId(0)).unwrap().spec.nics = vec![Nic { network: NetworkId(0), mac }];
        let gap = |state: &mut ClusterState, node: u64| {
            let gaps = [(NetworkId(0), "no VXLAN here".to_string())].into();
            state.apply(&ClusterCommand::ReportNetworkGaps { node: NodeId(node), gaps }).unwrap();
        };
        gap(&mut state, 2);
        down(&mut state, 1);

        let plan = failover_plan(&state, |_| true);
        assert_eq!(plan.moves, vec![Move { vm: VmId(0), from: NodeId(1), to: NodeId(3) }], "node 2 would win a tie");

        gap(&mut state, 3);
        let plan = failover_plan(&state, |_| true);
        assert!(plan.moves.is_empty());
        let reason = &plan.unplaced[0].reason;
        assert!(reason.contains("cannot provide network \"lan\": no VXLAN here"), "{reason}");
    }

    #[test]
    fn vms_of_one_anti_affinity_group_never_share_a_node() {
        let group = HaPolicy { anti_affinity: Some("db".into()), ..ha() };
        let mut state = cluster(3, 16, &[("db1", 1, 1, group.clone()), ("db2", 2, 1, group)]);
        down(&mut state, 1);

        let plan = failover_plan(&state, |_| true);
        assert_eq!(plan.moves, vec![Move { vm: VmId(0), from: NodeId(1), to: NodeId(3) }]);

        down(&mut state, 3);
        let plan = failover_plan(&state, |_| true);
        assert!(plan.moves.is_empty());
        assert!(plan.unplaced[0].reason.contains("anti-affinity group db"), "{:?}", plan.unplaced);
    }

    #[test]
    fn vms_without_ha_stay_and_nodes_that_do_not_answer_or_are_drained_get_nothing() {
        let off = HaPolicy { enabled: false, ..ha() };
        let mut state = cluster(4, 8, &[("kept", 1, 1, off), ("moved", 1, 1, ha())]);
        down(&mut state, 1);
        state.apply(&ClusterCommand::SetDrain { node: NodeId(2), drained: true, at_ms: 0 }).unwrap();

        let plan = failover_plan(&state, |n| n != NodeId(3));

        assert_eq!(plan.moves, vec![Move { vm: VmId(1), from: NodeId(1), to: NodeId(4) }]);
    }

    #[test]
    fn a_node_whose_loss_stops_writes_or_leaves_a_vm_nowhere_to_run_cannot_go_down() {
        // The fixture's pool has its only replica on node 1.
        let state = cluster(2, 4, &[("big", 1, 3, ha()), ("other", 2, 3, ha())]);

        let node_1 = node_check(&state, NodeId(1), |_| true).unwrap_err();
        let node_2 = node_check(&state, NodeId(2), |_| true).unwrap_err();

        assert_eq!(node_1.len(), 2, "{node_1:?}");
        assert!(node_1[0].starts_with("1 of 1 PGs of pool p would keep fewer than 1 replicas"), "{node_1:?}");
        assert!(node_1[1].starts_with("VM big has nowhere to run"), "{node_1:?}");
        assert_eq!(node_2.len(), 1, "{node_2:?}");
        assert!(node_2[0].starts_with("VM other has nowhere to run"), "{node_2:?}");
        assert_eq!(drain_plan(&state, NodeId(1), |_| true).moves, vec![]);
    }

    #[test]
    fn a_node_with_room_for_its_vms_elsewhere_and_no_sole_replica_can_go_down() {
        let state = cluster(3, 8, &[("a", 2, 2, ha()), ("b", 3, 2, ha())]);

        assert_eq!(node_check(&state, NodeId(2), |_| true), Ok(()));
        assert_eq!(
            drain_plan(&state, NodeId(2), |_| true).moves,
            vec![Move { vm: VmId(0), from: NodeId(2), to: NodeId(1) }],
            "node 1 has the most room"
        );
    }

    #[test]
    fn a_move_finishes_on_its_node_once_the_guest_stopped_or_elsewhere_if_that_node_went_down() {
        let mut state = cluster(3, 8, &[("a", 1, 2, ha()), ("b", 1, 2, ha())]);
        state.apply(&ClusterCommand::SetDrain { node: NodeId(1), drained: true, at_ms: 0 }).unwrap();
        for vm in [VmId(0), VmId(1)] {
            let running = model::VmRunState::Running { accel: model::Accel::Tcg, pid: 1 };
            state.apply(&ClusterCommand::ReportVm { vm, node: NodeId(1), state: running }).unwrap();
            let to = NodeId(2 + vm.0);
            state.apply(&ClusterCommand::MoveOffDrained { vm, from: NodeId(1), to, at_ms: 0 }).unwrap();
        }

        assert!(finish_moves(&state, |_| true).moves.is_empty(), "both still run on node 1");
        for vm in [VmId(0), VmId(1)] {
            let stopped = model::VmRunState::Stopped;
            state.apply(&ClusterCommand::ReportVm { vm, node: NodeId(1), state: stopped }).unwrap();
        }
        down(&mut state, 3);
        let plan = finish_moves(&state, |n| n != NodeId(3));

        let to: Vec<(VmId, NodeId)> = plan.moves.iter().map(|m| (m.vm, m.to)).collect();
        assert_eq!(to, vec![(VmId(0), NodeId(2)), (VmId(1), NodeId(2))], "node 3 went down: b goes to 2 as well");
    }
}
