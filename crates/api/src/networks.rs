//! Networks: what this node does for each network call, and the NICs of a new VM.

use crate::error::ApiError;
use crate::services::NodeServices;
use crate::v1;
use model::{ClusterCommand, ClusterState, CommandOutcome, Mac, Network, NetworkKind, Nic};

impl NodeServices {
    pub fn networks(&self) -> Vec<v1::NetworkInfo> {
        let state = self.cluster().state();
        state.networks.values().map(|network| network_info(&state, network)).collect()
    }

    pub async fn create_network(&self, request: v1::CreateNetwork) -> Result<v1::NetworkInfo, ApiError> {
        crate::services::check_name("network", &request.name)?;
        let kind = match &request {
            // The cluster picks the VXLAN id as it applies the command.
            v1::CreateNetwork { overlay: true, vlan: None, interface: None, .. } => NetworkKind::Overlay { vni: 0 },
            v1::CreateNetwork { overlay: true, .. } => {
                return Err(ApiError::bad_request(
                    "an overlay runs between the nodes' own addresses: it takes no VLAN or interface",
                ))
            }
            v1::CreateNetwork { vlan: Some(vlan), interface, .. } => {
                NetworkKind::Vlan { vlan: *vlan, interface: interface.clone() }
            }
            v1::CreateNetwork { interface: Some(interface), .. } => {
                NetworkKind::Bridged { interface: interface.clone() }
            }
            _ => {
                return Err(ApiError::bad_request(
                    "say how the nodes reach each other on the network: a host interface (--interface IFACE, the \
                     same name on every node), a VLAN (--vlan ID), or an overlay between the nodes (--overlay)",
                ))
            }
        };
        if !matches!(kind, NetworkKind::Overlay { vni: 0 }) {
            kind.check().map_err(ApiError::bad_request)?;
        }
        let command = ClusterCommand::CreateNetwork { name: request.name.clone(), kind };
        let CommandOutcome::NetworkCreated(id) = self.cluster().propose(command).await? else {
            return Err(ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "no network was made"));
        };
        let state = self.cluster().state();
        let network = state.networks.get(&id).ok_or_else(|| {
            ApiError::new(axum::http::StatusCode::CONFLICT, format!("network {} was deleted at once", request.name))
        })?;
        Ok(network_info(&state, network))
    }

    pub async fn delete_network(&self, name: &str) -> Result<(), ApiError> {
        let network = self.network(name)?;
        self.cluster().propose(ClusterCommand::DeleteNetwork { network: network.id }).await?;
        Ok(())
    }

    fn network(&self, name: &str) -> Result<Network, ApiError> {
        let state = self.cluster().state();
        let network = state.network_by_name(name).cloned();
        network.ok_or_else(|| cluster::ClusterError::NotFound { what: "network", name: name.into() }.into())
    }

    /// A new VM's NICs: each on a known network, with the MAC asked for or a free one.
    pub(crate) fn nics(&self, requests: &[v1::NicRequest]) -> Result<Vec<Nic>, ApiError> {
        let state = self.cluster().state();
        let mut nics: Vec<Nic> = Vec::with_capacity(requests.len());
        for request in requests {
            let network = self.network(&request.network)?.id;
            let mac = match request.mac {
                Some(mac) => {
                    mac.check().map_err(ApiError::bad_request)?;
                    mac
                }
                None => free_mac(&state, &nics)?,
            };
            nics.push(Nic { network, mac });
        }
        Ok(nics)
    }
}

fn network_info(state: &ClusterState, network: &Network) -> v1::NetworkInfo {
    let vms = state.vms.values().filter(|vm| vm.spec.nics.iter().any(|nic| nic.network == network.id));
    v1::NetworkInfo {
        id: network.id,
        name: network.name.clone(),
        kind: network.kind.clone(),
        vms: vms.map(|vm| vm.spec.name.clone()).collect(),
        unavailable: state
            .network_gaps
            .iter()
            .filter_map(|(&node, gaps)| Some(v1::NetworkGap { node, reason: gaps.get(&network.id)?.clone() }))
            .collect(),
    }
}

/// A random MAC under converge's prefix that no NIC of the cluster (nor `also`) has. The
/// state machine refuses a duplicate anyway; this keeps a user from ever seeing one.
fn free_mac(state: &ClusterState, also: &[Nic]) -> Result<Mac, ApiError> {
    for _ in 0..64 {
        let [a, b, c, ..] = crate::services::random_id()?.to_le_bytes();
        let [p, q, r] = Mac::PREFIX;
        let mac = Mac([p, q, r, a, b, c]);
        if state.vm_with_mac(mac).is_none() && also.iter().all(|nic| nic.mac != mac) {
            return Ok(mac);
        }
    }
    Err(ApiError::new(axum::http::StatusCode::CONFLICT, "no free MAC address found: give one with mac="))
}
