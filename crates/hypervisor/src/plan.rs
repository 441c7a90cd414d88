//! The reconcile decision: from the desired state of the cluster's VMs and what runs on
//! this node, the actions that bring the node in line. Pure.

use model::{ClusterState, NodeId, VmDesired, VmId};
use std::collections::BTreeMap;

/// What this node's runtime is doing with a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalPhase {
    Starting,
    Running,
    Stopping,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start(VmId),
    /// Stop a local VM; `force` ends it at once instead of asking the guest to shut down.
    Stop {
        vm: VmId,
        force: bool,
    },
}

/// The actions for this node. A node cut off from the majority (`isolated`) ends every VM
/// it runs at once and starts none: the majority may restart them elsewhere.
pub fn plan(state: &ClusterState, this: NodeId, local: &BTreeMap<VmId, LocalPhase>, isolated: bool) -> Vec<Action> {
    let mut actions = Vec::new();
    if isolated {
        // Even those already stopping gracefully: the guest may ignore the power button.
        actions.extend(local.keys().map(|&vm| Action::Stop { vm, force: true }));
        return actions;
    }
    for vm in state.vms.values() {
        if vm.desired == (VmDesired::Running { node: this }) && !local.contains_key(&vm.id) {
            actions.push(Action::Start(vm.id));
        }
    }
    for (&id, &phase) in local {
        if phase == LocalPhase::Stopping {
            continue;
        }
        match state.vms.get(&id).map(|vm| (vm.desired, vm.force_stop)) {
            Some((VmDesired::Running { node }, _)) if node == this => {}
            // Moved to another node, which owns its volumes now: nothing the guest here
            // writes can land, so end it at once.
            Some((VmDesired::Running { .. }, _)) => actions.push(Action::Stop { vm: id, force: true }),
            // Moving off this node: the guest shuts down cleanly first, then starts there.
            Some((VmDesired::Moving { from, .. }, force)) if from == this => {
                actions.push(Action::Stop { vm: id, force })
            }
            Some((VmDesired::Moving { .. }, _)) => actions.push(Action::Stop { vm: id, force: true }),
            Some((VmDesired::Stopped, force)) => actions.push(Action::Stop { vm: id, force }),
            None => actions.push(Action::Stop { vm: id, force: true }),
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Boot, BootFile, ClusterCommand, ClusterId, Disk, DiskId, Node, PoolId, VmSpec, VolumeId};

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    fn state_with_vm() -> (ClusterState, VmId) {
        let mut state = ClusterState::default();
        let disk = Disk { id: DiskId(1), node: A, path: "/d".into(), size_bytes: 1 << 30, extent_slots: 255 };
        let kernel = BootFile { volume: VolumeId(0), len_bytes: 512 };
        let spec = VmSpec {
            name: "web".into(),
            cpus: 1,
            memory_bytes: 256 << 20,
            disks: vec![],
            boot: Boot::Kernel { kernel, initrd: None, cmdline: String::new() },
            ha: Default::default(),
            seed: None,
            cdrom: None,
            nics: vec![],
        };
        let commands = [
            ClusterCommand::InitCluster { id: ClusterId(1) },
            ClusterCommand::AddNode(Node {
                id: A,
                api_addr: String::new(),
                data_addr: String::new(),
                cert_sha256: String::new(),
            }),
            ClusterCommand::AddNode(Node {
                id: B,
                api_addr: String::new(),
                data_addr: String::new(),
                cert_sha256: String::new(),
            }),
            ClusterCommand::AddDisk(disk),
            ClusterCommand::CreatePool { name: "p".into(), replicas: 1, min_size: 1, pgs: vec![vec![DiskId(1)]] },
            ClusterCommand::CreateVolume { name: "kernel".into(), pool: PoolId(0), size_bytes: 512 },
            ClusterCommand::CreateVm { spec },
        ];
        for command in &commands {
            state.apply(command).expect("fixture command applies");
        }
        (state, VmId(0))
    }

    #[test]
    fn a_vm_desired_here_and_not_running_is_started() {
        let (mut state, vm) = state_with_vm();
        state.apply(&ClusterCommand::StartVm { vm, node: A, force: false }).unwrap();
        assert_eq!(plan(&state, A, &BTreeMap::new(), false), vec![Action::Start(vm)]);
        assert_eq!(plan(&state, B, &BTreeMap::new(), false), vec![]);
    }

    #[test]
    fn a_vm_moving_off_this_node_shuts_down_gracefully_and_starts_only_at_the_end() {
        let (mut state, vm) = state_with_vm();
        state.apply(&ClusterCommand::StartVm { vm, node: A, force: false }).unwrap();
        state.apply(&ClusterCommand::SetDrain { node: A, drained: true, at_ms: 0 }).unwrap();
        state.apply(&ClusterCommand::MoveOffDrained { vm, from: A, to: B, at_ms: 0 }).unwrap();
        let local = BTreeMap::from([(vm, LocalPhase::Running)]);

        assert_eq!(plan(&state, A, &local, false), vec![Action::Stop { vm, force: false }]);
        assert_eq!(plan(&state, B, &BTreeMap::new(), false), vec![], "not started before it stopped on A");
    }

    #[test]
    fn a_vm_running_here_that_should_stop_is_stopped_gracefully_unless_forced() {
        let (mut state, vm) = state_with_vm();
        let local = BTreeMap::from([(vm, LocalPhase::Running)]);
        state.apply(&ClusterCommand::StopVm { vm, force: false }).unwrap();
        assert_eq!(plan(&state, A, &local, false), vec![Action::Stop { vm, force: false }]);
        state.apply(&ClusterCommand::StopVm { vm, force: true }).unwrap();
        assert_eq!(plan(&state, A, &local, false), vec![Action::Stop { vm, force: true }]);
    }

    #[test]
    fn a_vm_moved_to_another_node_is_ended_here_at_once() {
        let (mut state, vm) = state_with_vm();
        state.apply(&ClusterCommand::StartVm { vm, node: B, force: false }).unwrap();
        let local = BTreeMap::from([(vm, LocalPhase::Running)]);
        assert_eq!(plan(&state, A, &local, false), vec![Action::Stop { vm, force: true }]);
    }

    #[test]
    fn a_vm_already_stopping_is_left_alone() {
        let (state, vm) = state_with_vm();
        let local = BTreeMap::from([(vm, LocalPhase::Stopping)]);
        assert_eq!(plan(&state, A, &local, false), vec![]);
    }

    #[test]
    fn a_node_cut_off_from_the_majority_ends_its_vms_and_starts_none() {
        let (mut state, vm) = state_with_vm();
        state.apply(&ClusterCommand::StartVm { vm, node: A, force: false }).unwrap();
        let (other, leaving) = (VmId(7), VmId(8));
        let local = BTreeMap::from([(other, LocalPhase::Starting), (leaving, LocalPhase::Stopping)]);

        let actions = plan(&state, A, &local, true);

        let every = vec![Action::Stop { vm: other, force: true }, Action::Stop { vm: leaving, force: true }];
        assert_eq!(actions, every, "nothing started, every VM ended at once, a graceful stop too");
    }
}
