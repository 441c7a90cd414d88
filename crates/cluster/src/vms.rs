//! VM commands on the cluster: create, start (placing it), stop, delete, and the reports of
//! the node running each.

use crate::cluster::Cluster;
use crate::error::ClusterError;
use model::{ClusterCommand, CommandOutcome, NodeId, Vm, VmId, VmRunState, VmSpec};

impl Cluster {
    pub fn vm(&self, name: &str) -> Result<Vm, ClusterError> {
        self.state().vm_by_name(name).cloned().ok_or_else(|| ClusterError::NotFound { what: "VM", name: name.into() })
    }

    pub async fn create_vm(&self, spec: VmSpec) -> Result<Vm, ClusterError> {
        let CommandOutcome::VmCreated(id) = self.propose(ClusterCommand::CreateVm { spec }).await? else {
            return Err(ClusterError::Refused("VM creation gave no VM".into()));
        };
        self.wait_for(|s| s.vms.get(&id).cloned()).await
    }

    /// Starts the VM on `node`, or on the least loaded node that is up.
    pub async fn start_vm(&self, name: &str, node: Option<NodeId>, force: bool) -> Result<NodeId, ClusterError> {
        let vm = self.vm(name)?;
        let state = self.state();
        let node = match node {
            Some(node) => {
                // A node declared down is refused at once (by the command); one not heard
                // from yet (just joined, or this node just started) gets the down time.
                let deadline = std::time::Instant::now() + self.down_after();
                while !self.state().is_down(node) && !self.is_up(node) && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                if !self.state().is_down(node) && !self.is_up(node) {
                    return Err(ClusterError::Refused(format!(
                        "{node} does not answer: start the VM on a node that is up"
                    )));
                }
                node
            }
            None => policy::choose_vm_node(&state, &vm.spec, |n| self.is_up(n)).ok_or_else(|| {
                // Among the nodes that would take it but for a network, the first gap.
                let takes_vms = |n: NodeId| self.is_up(n) && !state.is_down(n) && !state.drained.contains(&n);
                let gap = state
                    .nodes
                    .keys()
                    .filter(|&&n| takes_vms(n))
                    .find_map(|&n| state.network_gap(&vm.spec, n).map(|gap| (n, gap)));
                match gap {
                    Some((node, (network, why))) => ClusterError::Refused(format!(
                        "no node that is up can provide the VM's networks ({node} cannot provide network \
                         {network:?}: {why})"
                    )),
                    None => ClusterError::Refused("no node is up to run the VM".into()),
                }
            })?,
        };
        self.propose(ClusterCommand::StartVm { vm: vm.id, node, force }).await?;
        Ok(node)
    }

    /// Whether `node` can go down now: `Ok`, or every reason it cannot.
    pub fn node_check(&self, node: NodeId) -> Result<(), Vec<String>> {
        policy::node_check(&self.state(), node, |n| n != node && self.is_up(n))
    }

    pub async fn stop_vm(&self, name: &str, force: bool) -> Result<(), ClusterError> {
        let vm = self.vm(name)?;
        self.propose(ClusterCommand::StopVm { vm: vm.id, force }).await.map(drop)
    }

    pub async fn delete_vm(&self, name: &str) -> Result<Vm, ClusterError> {
        let vm = self.vm(name)?;
        self.propose(ClusterCommand::DeleteVm { vm: vm.id }).await?;
        self.wait_for(|s| (!s.vms.contains_key(&vm.id)).then_some(())).await?;
        Ok(vm)
    }

    /// Records what this node observes of a VM it runs.
    pub async fn report_vm(&self, vm: VmId, state: VmRunState) -> Result<(), ClusterError> {
        self.propose(ClusterCommand::ReportVm { vm, node: self.node_id(), state }).await.map(drop)
    }

    /// Resolves a node given by id (`node-12`, `12`) or address (`127.0.0.3`, `127.0.0.3:7700`).
    pub fn resolve_node(&self, text: &str) -> Result<NodeId, ClusterError> {
        let state = self.state();
        let by_id =
            text.trim_start_matches("node-").parse::<u64>().ok().map(NodeId).filter(|id| state.nodes.contains_key(id));
        let by_addr = || {
            state
                .nodes
                .values()
                .find(|n| n.api_addr == text || n.api_addr.split(':').next() == Some(text))
                .map(|n| n.id)
        };
        by_id.or_else(by_addr).ok_or_else(|| ClusterError::NotFound { what: "node", name: text.into() })
    }
}
