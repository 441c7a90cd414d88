//! Which addresses a node may tell its peers: pure checks of the addresses in `Node`s.

use model::Node;
use std::net::{IpAddr, SocketAddr};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(
        "{addr} is not an address peers can reach (0.0.0.0 or :: means every local address): give `converge serve --advertise` the address other nodes reach this node at"
    )]
    Unspecified { addr: String },
    #[error(
        "{addr} is a loopback address, but {member} is not: nodes on other machines cannot reach it; give `converge serve --advertise` this node's network address"
    )]
    LoopbackAmongNetwork { addr: String, member: String },
    #[error(
        "{addr} is a network address, but the cluster's members advertise loopback addresses ({member}) that this node cannot reach"
    )]
    NetworkAmongLoopback { addr: String, member: String },
}

fn ip_of(addr: &str) -> Option<IpAddr> {
    addr.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// Checks the addresses `node` advertises, alone and against the cluster's `members`: none
/// is unspecified, and loopback and network addresses are not mixed in one cluster (a
/// cluster on loopback lives on one machine, for tests and trials). Names that are not IP
/// literals are left to the resolver.
pub fn check_advertised<'a>(node: &Node, members: impl IntoIterator<Item = &'a Node>) -> Result<(), AddressError> {
    let own = [&node.api_addr, &node.data_addr];
    for addr in own {
        if ip_of(addr).is_some_and(|ip| ip.is_unspecified()) {
            return Err(AddressError::Unspecified { addr: addr.clone() });
        }
    }
    let Some(loopback) = ip_of(&node.api_addr).map(|ip| ip.is_loopback()) else { return Ok(()) };
    for member in members.into_iter().filter(|m| m.id != node.id) {
        let Some(member_loopback) = ip_of(&member.api_addr).map(|ip| ip.is_loopback()) else { continue };
        let (addr, other) = (node.api_addr.clone(), member.api_addr.clone());
        match (loopback, member_loopback) {
            (true, false) => return Err(AddressError::LoopbackAmongNetwork { addr, member: other }),
            (false, true) => return Err(AddressError::NetworkAmongLoopback { addr, member: other }),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::NodeId;

    fn node(id: u64, api: &str, data: &str) -> Node {
        Node { id: NodeId(id), api_addr: api.into(), data_addr: data.into(), cert_sha256: String::new() }
    }

    #[test]
    fn an_unspecified_address_is_refused_even_alone() {
        let refused = check_advertised(&node(1, "10.0.0.1:7700", "0.0.0.0:7701"), []);
        assert_eq!(refused, Err(AddressError::Unspecified { addr: "0.0.0.0:7701".into() }));
        let v6 = check_advertised(&node(1, "[::]:7700", "[::]:7701"), []);
        assert_eq!(v6, Err(AddressError::Unspecified { addr: "[::]:7700".into() }));
    }

    #[test]
    fn a_loopback_node_cannot_join_a_cluster_on_the_network() {
        let members = [node(2, "10.0.0.2:7700", "10.0.0.2:7701")];
        let refused = check_advertised(&node(1, "127.0.0.1:7700", "127.0.0.1:7701"), &members);
        assert!(matches!(refused, Err(AddressError::LoopbackAmongNetwork { .. })), "{refused:?}");
    }

    #[test]
    fn a_network_node_cannot_join_a_cluster_on_loopback() {
        let members = [node(2, "127.0.0.2:7700", "127.0.0.2:7701")];
        let refused = check_advertised(&node(1, "10.0.0.1:7700", "10.0.0.1:7701"), &members);
        assert!(matches!(refused, Err(AddressError::NetworkAmongLoopback { .. })), "{refused:?}");
    }

    #[test]
    fn loopback_clusters_and_ipv6_network_clusters_are_fine() {
        let loopback = [node(2, "127.0.0.2:7700", "127.0.0.2:7701")];
        let v6 = [node(2, "[fd00::2]:7700", "[fd00::2]:7701")];
        assert_eq!(check_advertised(&node(1, "127.0.0.3:7700", "127.0.0.3:7701"), &loopback), Ok(()));
        assert_eq!(check_advertised(&node(1, "[fd00::1]:7700", "[fd00::1]:7701"), &v6), Ok(()));
        assert_eq!(check_advertised(&node(2, "127.0.0.2:7700", "127.0.0.2:7701"), &loopback), Ok(()), "itself");
    }
}
