//! Where a VM starts when the admin does not say.

use model::{ClusterState, NodeId, VmDesired, VmSpec};

/// The up node with the fewest VMs desired running on it, among those neither declared down
/// nor drained and able to provide `spec`'s networks; ties go to the lowest id.
pub fn choose_vm_node(state: &ClusterState, spec: &VmSpec, is_up: impl Fn(NodeId) -> bool) -> Option<NodeId> {
    let takes_vms = |n: NodeId| {
        is_up(n) && !state.is_down(n) && !state.drained.contains(&n) && state.network_gap(spec, n).is_none()
    };
    state.nodes.keys().copied().filter(|&n| takes_vms(n)).min_by_key(|&node| {
        let headed_here =
            |d: VmDesired| matches!(d, VmDesired::Running { node: n } | VmDesired::Moving { to: n, .. } if n == node);
        let load = state.vms.values().filter(|vm| headed_here(vm.desired)).count();
        (load, node)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{ClusterCommand, ClusterId, Node};

    #[test]
    fn a_vm_goes_to_the_least_loaded_node_that_is_up() {
        let mut state = ClusterState::default();
        state.apply(&ClusterCommand::InitCluster { id: ClusterId(1) }).unwrap();
        for id in [1, 2, 3] {
            let node =
                Node { id: NodeId(id), api_addr: String::new(), data_addr: String::new(), cert_sha256: String::new() };
            state.apply(&ClusterCommand::AddNode(node)).unwrap();
        }

        let spec = VmSpec {
            name: "web".into(),
            cpus: 1,
            memory_bytes: 256 << 20,
            disks: vec![],
            boot: model::Boot::Disk,
            ha: Default::default(),
            seed: None,
            cdrom: None,
            nics: vec![model::Nic { network: model::NetworkId(0), mac: "52:54:00:00:00:01".parse().unwrap() }],
        };
        assert_eq!(choose_vm_node(&state, &spec, |n| n != NodeId(1)), Some(NodeId(2)));
        assert_eq!(choose_vm_node(&state, &spec, |_| false), None);

        // Not where its network cannot be provided.
        let lan = model::NetworkKind::Overlay { vni: 5 };
        state.apply(&ClusterCommand::CreateNetwork { name: "lan".into(), kind: lan }).unwrap();
        let gaps = [(model::NetworkId(0), "no VXLAN here".to_string())].into();
        state.apply(&ClusterCommand::ReportNetworkGaps { node: NodeId(2), gaps }).unwrap();
        assert_eq!(choose_vm_node(&state, &spec, |n| n != NodeId(1)), Some(NodeId(3)));
    }
}
