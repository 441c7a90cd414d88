//! Networks VMs attach to. A network is cluster-wide: every node provides it as a Linux
//! bridge of its own, joined to the same layer-2 segment (a host interface, a VLAN on one,
//! or a VXLAN overlay between the nodes), so a VM finds the same network wherever it runs.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A network; assigned by the cluster state, never reused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NetworkId(pub u32);

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net-{}", self.0)
    }
}

/// Networks one cluster holds.
pub const NETWORKS_MAX: usize = 1024;
/// NICs one VM may have.
pub const VM_NICS_MAX: usize = 8;
/// Longest host interface name Linux takes (IFNAMSIZ - 1).
pub const INTERFACE_NAME_MAX_BYTES: usize = 15;
/// VXLAN network identifiers are 24 bits.
pub const VNI_MAX: u32 = (1 << 24) - 1;
/// Longest reason a node gives for a network it cannot provide: a line, enough for an
/// interface and an error, small enough that a report of many stays one log entry.
pub const GAP_REASON_MAX_BYTES: usize = 200;

impl crate::state::ClusterState {
    /// The first network of `spec`'s NICs that `node` reported it cannot provide: its name,
    /// and why.
    pub fn network_gap(&self, spec: &crate::vm::VmSpec, node: crate::ids::NodeId) -> Option<(String, String)> {
        let gaps = self.network_gaps.get(&node)?;
        spec.nics.iter().find_map(|nic| {
            let why = gaps.get(&nic.network)?;
            let name = self.networks.get(&nic.network).map_or_else(|| nic.network.to_string(), |n| n.name.clone());
            Some((name, why.clone()))
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: NetworkId,
    pub name: String,
    pub kind: NetworkKind,
}

/// How every node joins a network's bridge to the others'.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetworkKind {
    /// Untagged on host interface `interface` (the same name on every node): a bridge with
    /// the interface as its port, or the interface itself when it is a bridge already (one
    /// that holds the host's own address, say).
    Bridged { interface: String },
    /// 802.1Q VLAN `vlan` on host interface `interface`, or, without one, on the interface
    /// that holds the node's own address.
    Vlan {
        vlan: u16,
        #[serde(default)]
        interface: Option<String>,
    },
    /// VXLAN `vni` between the nodes' own addresses (those of their node ports): a layer-2
    /// network of its own over whatever IP network joins the nodes. In `CreateNetwork`, 0
    /// has the cluster pick the lowest id no network has.
    Overlay { vni: u32 },
}

impl NetworkKind {
    /// Why the kind is not one a node can provide, if it is not.
    pub fn check(&self) -> Result<(), String> {
        match self {
            NetworkKind::Bridged { interface } => check_interface(interface),
            NetworkKind::Vlan { vlan, interface } => {
                if !(1..=4094).contains(vlan) {
                    return Err(format!("VLAN {vlan} is outside 1..=4094"));
                }
                interface.as_deref().map_or(Ok(()), check_interface)
            }
            NetworkKind::Overlay { vni } => {
                if *vni == 0 || *vni > VNI_MAX {
                    return Err(format!("VXLAN id {vni} is outside 1..={VNI_MAX}"));
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for NetworkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkKind::Bridged { interface } => write!(f, "bridged on {interface}"),
            NetworkKind::Vlan { vlan, interface: Some(interface) } => write!(f, "VLAN {vlan} on {interface}"),
            NetworkKind::Vlan { vlan, interface: None } => write!(f, "VLAN {vlan} on the nodes' own interface"),
            NetworkKind::Overlay { vni } => write!(f, "overlay (VXLAN {vni})"),
        }
    }
}

/// A host interface name as Linux takes it, as nothing reads as a flag or a path, and none
/// of the links converge makes itself (a VM's tap, another network's bridge).
fn check_interface(name: &str) -> Result<(), String> {
    crate::names::check_name("host interface", name, INTERFACE_NAME_MAX_BYTES)?;
    if ["cvbr", "cvvx", "cvvl", "cvt"].iter().any(|prefix| name.starts_with(prefix)) {
        return Err(format!("{name} is a name converge gives its own links (a bridge, a VXLAN, a VLAN or a tap)"));
    }
    Ok(())
}

/// A VM's network card: the network it is on and its MAC address, kept in the spec so the
/// guest sees the same card wherever it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub network: NetworkId,
    pub mac: Mac,
}

/// An Ethernet MAC address, `52:54:00:12:34:56` in text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The prefix of the addresses converge makes (locally administered, QEMU's).
    pub const PREFIX: [u8; 3] = [0x52, 0x54, 0x00];

    /// Why this cannot be a NIC's address, if it cannot: a multicast or all-zero address
    /// would be taken for a group or for nobody.
    pub fn check(&self) -> Result<(), String> {
        if self.0[0] & 1 == 1 {
            return Err(format!("{self} is a multicast address; a NIC needs a unicast one (even first byte)"));
        }
        if self.0 == [0; 6] {
            return Err("00:00:00:00:00:00 is no NIC's address".into());
        }
        Ok(())
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a MAC address (six hex bytes: 52:54:00:12:34:56)");
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(bytes))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_reads_back_as_written_and_odd_text_is_refused() {
        let mac: Mac = "52:54:00:ab:CD:0f".parse().unwrap();
        assert_eq!(mac, Mac([0x52, 0x54, 0, 0xab, 0xcd, 0x0f]));
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!(serde_json::to_string(&mac).unwrap(), "\"52:54:00:ab:cd:0f\"");
        for bad in
            ["", "52:54:00:ab:cd", "52:54:00:ab:cd:0f:00", "52:54:00:ab:cd:f", "52-54-00-ab-cd-0f", "zz:54:00:ab:cd:0f"]
        {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
        assert!("01:00:5e:00:00:01".parse::<Mac>().unwrap().check().is_err(), "multicast");
        assert!("00:00:00:00:00:00".parse::<Mac>().unwrap().check().is_err());
        assert!(mac.check().is_ok());
    }

    #[test]
    fn a_network_kind_is_one_a_node_can_provide() {
        assert!(NetworkKind::Vlan { vlan: 0, interface: None }.check().is_err());
        assert!(NetworkKind::Vlan { vlan: 4095, interface: None }.check().is_err());
        assert!(NetworkKind::Vlan { vlan: 100, interface: Some("eno1".into()) }.check().is_ok());
        assert!(NetworkKind::Bridged { interface: "a-very-long-interface".into() }.check().is_err());
        assert!(NetworkKind::Bridged { interface: "-x".into() }.check().is_err());
        assert!(NetworkKind::Bridged { interface: "br0".into() }.check().is_ok());
        assert!(NetworkKind::Bridged { interface: "cvt5n0".into() }.check().is_err(), "a VM's tap");
        assert!(NetworkKind::Bridged { interface: "cvbr3".into() }.check().is_err(), "another network's bridge");
        assert!(NetworkKind::Overlay { vni: 1 << 24 }.check().is_err());
        assert!(NetworkKind::Overlay { vni: 0 }.check().is_err());
    }
}
