//! The node's side of the cluster's networks: a Linux bridge per network, joined to the
//! other nodes' (a host interface, a VLAN on one, or a VXLAN overlay between the nodes'
//! own addresses), and a tap per VM NIC in it, opened here and handed to QEMU as a file
//! descriptor (so QEMU, unprivileged, needs no right over the host's network).
//!
//! Every link converge makes carries the alias `converge <cluster> <network>`: a node takes
//! away only its own cluster's links, and never an interface or bridge the admin made.
//! Links are changed with iproute2 (`ip`, `bridge`), as an admin would.
#![allow(unsafe_code)]

use model::{ClusterState, Mac, Network, NetworkId, NetworkKind, NodeId, VmId};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use tokio::sync::Mutex;

/// The IANA port of VXLAN.
const VXLAN_PORT: u16 = 4789;
/// What VXLAN adds to a frame over IPv4 and IPv6 (outer IP, UDP, VXLAN, inner Ethernet).
const VXLAN_OVERHEAD_V4: u32 = 50;
const VXLAN_OVERHEAD_V6: u32 = 70;
/// How long an `ip` or `bridge` command may take.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// What the reasons of one report of gaps add up to at most.
const GAPS_REPORT_BYTES: usize = 24 << 10;

/// A guest's MTU when nothing tells it otherwise.
pub const GUEST_MTU_DEFAULT: u32 = 1500;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("running `{command}` failed (is iproute2 installed?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network {network}: {reason}")]
    Unusable { network: String, reason: String },
    #[error("opening a tap on {path} failed")]
    Tap {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` printed what it should not: {reason}")]
    Output { command: String, reason: String },
}

/// What a node must set up for a network, from the state: it changes when a node joins or
/// leaves (an overlay's peers) or this node's address changes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Want {
    kind: NetworkKind,
    name: String,
    /// This node's own address (its node port's).
    local: Option<IpAddr>,
    /// The other nodes' addresses.
    peers: BTreeSet<IpAddr>,
}

/// A network as this node provides it.
#[derive(Clone, Debug)]
struct Provided {
    want: Want,
    bridge: String,
}

/// A VM NIC's tap, opened for QEMU: the file descriptors QEMU inherits.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub file: File,
    /// `/dev/vhost-net`, where the kernel has it: the NIC's queues served in the kernel.
    pub vhost: Option<File>,
    /// The MTU of the network's bridge: the most a guest's frame may carry on it.
    pub mtu: u32,
    pub mac: Mac,
}

/// The networks this node provides.
pub struct HostNetworks {
    this: NodeId,
    provided: Mutex<BTreeMap<NetworkId, Provided>>,
    /// The last failure told for each network, so a failing network is logged once.
    told: std::sync::Mutex<BTreeMap<NetworkId, String>>,
    /// Set after a pass over a cluster without networks: the next such pass has nothing to
    /// do. Cleared while there are networks, so their deletion is swept up after.
    swept: std::sync::atomic::AtomicBool,
}

impl HostNetworks {
    pub fn new(this: NodeId) -> Self {
        HostNetworks { this, provided: Mutex::default(), told: Default::default(), swept: Default::default() }
    }

    /// Brings the node's bridges in line with the state's networks: makes the missing, fixes
    /// the changed (an overlay's peers) and what was changed behind converge's back (a
    /// bridge deleted, a port or a running VM's tap taken out of it), takes away this
    /// cluster's links of networks that are gone (also those deleted while the node was
    /// down, or made half-way by a failed attempt). Failures are logged (once each) and come
    /// back when a VM's NIC needs the network.
    pub async fn reconcile(&self, state: &ClusterState) {
        let Some(cluster) = state.cluster.as_ref().map(|c| c.id.0) else { return };
        let mut provided = self.provided.lock().await;
        // A cluster without networks costs nothing once the first pass found no leftovers.
        let idle = state.networks.is_empty() && provided.is_empty();
        if idle && self.swept.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if !idle {
            self.swept.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        // One look at the node's links per pass.
        let present: BTreeMap<String, Link> = match links().await {
            Ok(links) => links.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %model::error_chain(&e), "looking at the node's links");
                return;
            }
        };
        for network in state.networks.values() {
            if provided.get(&network.id).is_some_and(|p| !intact(p, network, &present)) {
                provided.remove(&network.id);
            }
            let result = self.provide(&mut provided, state, network).await;
            if let Ok(bridge) = &result {
                // Taps of running VMs put back in a bridge that was made anew.
                let alias = alias(cluster, network.id);
                for (name, link) in &present {
                    let astray = link.kind.as_deref() == Some("tun") && link.master.as_deref() != Some(bridge);
                    if link.alias.as_deref() == Some(alias.as_str()) && astray {
                        if let Err(e) = ip(&["link", "set", "dev", name, "master", bridge]).await {
                            tracing::warn!(tap = %name, error = %model::error_chain(&e), "putting a tap back in its bridge");
                        }
                    }
                }
            }
            self.tell(network, result.as_ref().err());
        }
        provided.retain(|id, _| state.networks.contains_key(id));
        let known: BTreeSet<String> = state.networks.keys().map(|id| id.to_string()).collect();
        for (name, link) in &present {
            let Some(of) = link.alias.as_deref().and_then(|a| owner(a, cluster)) else { continue };
            if !known.contains(&of) && link_exists(name).await.unwrap_or(false) {
                tracing::info!(link = %name, network = %of, "taking away a link of a deleted network");
                if let Err(e) = ip(&["link", "del", "dev", name]).await {
                    tracing::warn!(link = %name, error = %model::error_chain(&e), "taking a deleted network's link away");
                }
            }
        }
    }

    /// The networks of `state` this node could not provide at its last try, with why, cut
    /// as the state keeps reasons (so an unchanged list compares equal to the state's).
    pub fn gaps(&self, state: &ClusterState) -> BTreeMap<NetworkId, String> {
        let mut told = self.told.lock().expect("told lock");
        told.retain(|network, _| state.networks.contains_key(network));
        // A report is one log entry: with many gaps (no iproute2 at all, say) each reason
        // is shorter, so the whole stays well under the entry bound.
        let max = model::GAP_REASON_MAX_BYTES.min(GAPS_REPORT_BYTES / told.len().max(1));
        told.iter()
            .map(|(network, why)| {
                // The network is named where the gap is shown.
                let name = state.networks[network].name.as_str();
                let why = why.strip_prefix(&format!("network {name}: ")).unwrap_or(why);
                (*network, model::bounded(why, max))
            })
            .collect()
    }

    fn tell(&self, network: &Network, error: Option<&NetError>) {
        let mut told = self.told.lock().expect("told lock");
        match error {
            None => {
                if told.remove(&network.id).is_some() {
                    tracing::info!(network = %network.name, "network provided");
                }
            }
            Some(e) => {
                let text = model::error_chain(e);
                if told.get(&network.id) != Some(&text) {
                    tracing::warn!(network = %network.name, error = %text, "this node cannot provide the network");
                    told.insert(network.id, text);
                }
            }
        }
    }

    /// A tap for NIC `index` of `vm`, in its network's bridge, up.
    pub async fn tap(&self, state: &ClusterState, vm: VmId, index: usize, nic: &model::Nic) -> Result<Tap, NetError> {
        let network = state.networks.get(&nic.network).ok_or_else(|| NetError::Unusable {
            network: nic.network.to_string(),
            reason: "it is not in the cluster any more".into(),
        })?;
        let bridge = {
            let mut provided = self.provided.lock().await;
            // The bridge may have gone behind our back: provided again if so.
            if let Some(p) = provided.get(&network.id) {
                if !link_exists(&p.bridge).await? {
                    provided.remove(&network.id);
                }
            }
            let result = self.provide(&mut provided, state, network).await;
            self.tell(network, result.as_ref().err());
            result?
        };
        let name = tap_name(vm, index);
        // One left by this VM's last QEMU (a persistent one it may have made of it): gone
        // first, so no other process holds the network's port.
        if link_exists(&name).await? {
            ip(&["link", "del", "dev", &name]).await?;
        }
        let file = open_tap(&name)?;
        let mtu = link(&bridge).await?.mtu;
        let cluster = state.cluster.as_ref().map_or(0, |c| c.id.0);
        ip(&["link", "set", "dev", &name, "alias", &alias(cluster, network.id)]).await?;
        quiet_ipv6(&name).await;
        ip(&["link", "set", "dev", &name, "mtu", &mtu.to_string(), "master", &bridge, "up"]).await?;
        let vhost = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/vhost-net") {
            Ok(file) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(NetError::Tap { path: "/dev/vhost-net", source }),
        };
        Ok(Tap { name, file, vhost, mtu, mac: nic.mac })
    }

    /// Takes away the taps of `vm`'s NICs once its QEMU has ended (a tap its QEMU made
    /// persistent would outlive it).
    pub async fn release(&self, vm: VmId, nics: usize) {
        for index in 0..nics {
            let name = tap_name(vm, index);
            if link_exists(&name).await.unwrap_or(false) {
                if let Err(e) = ip(&["link", "del", "dev", &name]).await {
                    tracing::warn!(tap = %name, error = %model::error_chain(&e), "taking a VM's tap away");
                }
            }
        }
    }

    /// Sets up `network` unless it is as wanted already; returns its bridge.
    async fn provide(
        &self,
        provided: &mut BTreeMap<NetworkId, Provided>,
        state: &ClusterState,
        network: &Network,
    ) -> Result<String, NetError> {
        let cluster = state.cluster.as_ref().map_or(0, |c| c.id.0);
        let want = self.want(state, network);
        if let Some(p) = provided.get(&network.id) {
            if p.want == want {
                return Ok(p.bridge.clone());
            }
        }
        let unusable = |reason: String| NetError::Unusable { network: network.name.clone(), reason };
        let alias = alias(cluster, network.id);
        let bridge = match &network.kind {
            NetworkKind::Bridged { interface } => {
                let port = link(interface).await.map_err(|e| unusable(model::error_chain(&e)))?;
                if port.kind.as_deref() == Some("bridge") {
                    // The admin's own bridge: taps join it as it is.
                    interface.clone()
                } else {
                    if let Some(address) = global_address(interface).await? {
                        return Err(unusable(format!(
                            "host interface {interface} holds the address {address}: as a bridge port it would stop \
                             answering on it; name a bridge that holds it (br0) or a spare interface"
                        )));
                    }
                    let bridge = bridge_name(network.id);
                    // A port of the admin's bridge or bond (the one the node's own address
                    // is on, say) is never taken from it.
                    if let Some(master) = port.master.as_deref().filter(|m| *m != bridge) {
                        return Err(unusable(format!(
                            "host interface {interface} is a port of {master} already: name {master} itself (a \
                             bridge is used as it is), or a spare interface"
                        )));
                    }
                    ensure_bridge(&bridge, &alias).await?;
                    if port.master.as_deref() != Some(bridge.as_str()) {
                        ip(&["link", "set", "dev", interface, "master", &bridge]).await?;
                    }
                    ip(&["link", "set", "dev", interface, "up"]).await?;
                    bridge
                }
            }
            NetworkKind::Vlan { vlan, interface } => {
                let parent = match interface {
                    Some(interface) => interface.clone(),
                    None => {
                        let local =
                            want.local.ok_or_else(|| unusable("this node has no address in the state".into()))?;
                        interface_of(local)
                            .await?
                            .ok_or_else(|| unusable(format!("no interface of this node holds its address {local}")))?
                    }
                };
                let bridge = bridge_name(network.id);
                ensure_bridge(&bridge, &alias).await?;
                let port = format!("cvvl{}", network.id.0);
                ip(&["link", "set", "dev", &parent, "up"]).await?;
                let existing = match link(&port).await {
                    Ok(existing) => Some(existing),
                    Err(NetError::Command { .. }) => None,
                    Err(e) => return Err(e),
                };
                let stale = existing
                    .as_ref()
                    .is_some_and(|l| l.vlan_id != Some(u32::from(*vlan)) || l.parent.as_deref() != Some(&parent));
                if stale {
                    ip(&["link", "del", "dev", &port]).await?;
                }
                if existing.is_none() || stale {
                    let vlan = vlan.to_string();
                    ip(&["link", "add", "link", &parent, "name", &port, "type", "vlan", "id", &vlan]).await.map_err(
                        |e| match e {
                            NetError::Command { stderr, .. } if stderr.contains("Unknown device type") => {
                                unusable("this kernel has no 802.1Q VLANs (module 8021q, CONFIG_VLAN_8021Q)".into())
                            }
                            e => e,
                        },
                    )?;
                }
                ip(&["link", "set", "dev", &port, "alias", &alias]).await?;
                quiet_ipv6(&port).await;
                ip(&["link", "set", "dev", &port, "master", &bridge, "up"]).await?;
                bridge
            }
            NetworkKind::Overlay { vni } => {
                let local = want.local.ok_or_else(|| unusable("this node has no address in the state".into()))?;
                if local.is_unspecified() {
                    return Err(unusable(format!("this node's address {local} is no address to send VXLAN from")));
                }
                let bridge = bridge_name(network.id);
                ensure_bridge(&bridge, &alias).await?;
                let port = format!("cvvx{}", network.id.0);
                let existing = match link(&port).await {
                    Ok(existing) => Some(existing),
                    Err(NetError::Command { .. }) => None,
                    Err(e) => return Err(e),
                };
                // A node readdressed: its VXLAN sends from the new address.
                let stale = existing.as_ref().is_some_and(|l| l.vxlan_local != Some(local) || l.vxlan_id != Some(*vni));
                if stale {
                    ip(&["link", "del", "dev", &port]).await?;
                }
                if existing.is_none() || stale {
                    let underlay = interface_of(local)
                        .await?
                        .ok_or_else(|| unusable(format!("no interface of this node holds its address {local}")))?;
                    let overhead = if local.is_ipv4() { VXLAN_OVERHEAD_V4 } else { VXLAN_OVERHEAD_V6 };
                    let mtu = link(&underlay).await?.mtu.saturating_sub(overhead);
                    let (vni, local, port_number, mtu) =
                        (vni.to_string(), local.to_string(), VXLAN_PORT.to_string(), mtu.to_string());
                    // Learning: a peer's guests are found where their frames came from; a
                    // moved VM's QEMU announces it from its new node.
                    ip(&[
                        "link",
                        "add",
                        &port,
                        "mtu",
                        &mtu,
                        "type",
                        "vxlan",
                        "id",
                        &vni,
                        "local",
                        &local,
                        "dstport",
                        &port_number,
                    ])
                    .await?;
                }
                ip(&["link", "set", "dev", &port, "alias", &alias]).await?;
                quiet_ipv6(&port).await;
                ip(&["link", "set", "dev", &port, "master", &bridge, "up"]).await?;
                sync_flood_list(&port, &want.peers).await?;
                bridge
            }
        };
        provided.insert(network.id, Provided { want, bridge: bridge.clone() });
        Ok(bridge)
    }

    fn want(&self, state: &ClusterState, network: &Network) -> Want {
        let address = |node: &model::Node| node.data_addr.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        let local = state.nodes.get(&self.this).and_then(address);
        let peers = state
            .nodes
            .values()
            .filter(|n| n.id != self.this)
            .filter_map(address)
            .filter(|ip| !ip.is_unspecified() && Some(ip.is_ipv4()) == local.map(|l| l.is_ipv4()))
            .collect();
        Want { kind: network.kind.clone(), name: network.name.clone(), local, peers }
    }
}

/// The bridge converge makes for a network.
fn bridge_name(network: NetworkId) -> String {
    format!("cvbr{}", network.0)
}

/// The tap of NIC `index` of `vm`: unique on the node, as VM ids are in the cluster, and
/// within Linux's 15 bytes for any id below 2^40.
fn tap_name(vm: VmId, index: usize) -> String {
    format!("cvt{:x}n{index}", vm.0)
}

/// The alias marking the links converge makes for `network` of `cluster`.
fn alias(cluster: u128, network: NetworkId) -> String {
    format!("converge {cluster} {network}")
}

/// Makes `bridge` (or takes the one there, unless another cluster's or network's), with no
/// address of the host's on it: guests on the network must not reach the host through it.
async fn ensure_bridge(bridge: &str, alias: &str) -> Result<(), NetError> {
    match link(bridge).await {
        Ok(existing) => {
            if let Some(other) = existing.alias.as_deref().filter(|a| *a != alias) {
                return Err(NetError::Output {
                    command: format!("ip link show dev {bridge}"),
                    reason: format!("{bridge} is there already as {other:?}: another cluster's, in this namespace?"),
                });
            }
        }
        Err(NetError::Command { .. }) => {
            ip(&["link", "add", "name", bridge, "type", "bridge"]).await?;
        }
        Err(e) => return Err(e),
    }
    ip(&["link", "set", "dev", bridge, "alias", alias]).await?;
    quiet_ipv6(bridge).await;
    ip(&["link", "set", "dev", bridge, "up"]).await.map(drop)
}

/// Keeps IPv6 off a link converge makes: no link-local address, no router advertisements
/// taken from a guest. Best effort: a host without IPv6 has nothing to keep off.
async fn quiet_ipv6(link: &str) {
    let _ = ip(&["link", "set", "dev", link, "addrgenmode", "none"]).await;
    for (setting, value) in [("accept_ra", "0"), ("disable_ipv6", "1")] {
        let path = format!("/proc/sys/net/ipv6/conf/{link}/{setting}");
        if std::path::Path::new(&path).exists() {
            if let Err(e) = std::fs::write(&path, value) {
                tracing::warn!(%path, error = %e, "keeping IPv6 off a network's link");
            }
        }
    }
}

/// Whether what converge made for `network` is still there as made: its bridge, and the
/// port joining it to the other nodes in it.
fn intact(provided: &Provided, network: &Network, present: &BTreeMap<String, Link>) -> bool {
    if !present.contains_key(&provided.bridge) {
        return false;
    }
    let port = match &network.kind {
        NetworkKind::Bridged { interface } if *interface == provided.bridge => return true,
        NetworkKind::Bridged { interface } => interface.clone(),
        NetworkKind::Vlan { .. } => format!("cvvl{}", network.id.0),
        NetworkKind::Overlay { .. } => format!("cvvx{}", network.id.0),
    };
    present.get(&port).is_some_and(|l| l.master.as_deref() == Some(provided.bridge.as_str()))
}

/// What `ip -d link show` tells of a link.
#[derive(Debug, Default)]
struct Link {
    mtu: u32,
    /// `bridge`, `vxlan`, `vlan`, `tun`... (none for a plain device).
    kind: Option<String>,
    master: Option<String>,
    alias: Option<String>,
    /// A VXLAN's or a VLAN's id.
    vxlan_id: Option<u32>,
    vxlan_local: Option<IpAddr>,
    vlan_id: Option<u32>,
    /// The device a VLAN is on.
    parent: Option<String>,
}

impl Link {
    fn from_json(value: &serde_json::Value) -> (String, Link) {
        let text = |v: &serde_json::Value| v.as_str().map(String::from);
        let info = &value["linkinfo"];
        let name = text(&value["ifname"]).unwrap_or_default();
        let link = Link {
            mtu: value["mtu"].as_u64().unwrap_or(u64::from(GUEST_MTU_DEFAULT)) as u32,
            kind: text(&info["info_kind"]),
            master: text(&value["master"]),
            alias: text(&value["ifalias"]),
            vxlan_id: info["info_data"]["id"].as_u64().map(|id| id as u32),
            // iproute2 names an IPv6 local address `local6`.
            vxlan_local: [&info["info_data"]["local"], &info["info_data"]["local6"]]
                .into_iter()
                .find_map(|l| l.as_str().and_then(|l| l.parse().ok())),
            vlan_id: info["info_data"]["id"].as_u64().map(|id| id as u32),
            parent: text(&value["link"]),
        };
        (name, link)
    }
}

async fn link(name: &str) -> Result<Link, NetError> {
    let out = ip(&["-j", "-d", "link", "show", "dev", name]).await?;
    let parsed: serde_json::Value = parse(&out, "ip -j -d link show")?;
    parsed.as_array().and_then(|a| a.first()).map(|v| Link::from_json(v).1).ok_or_else(|| NetError::Output {
        command: format!("ip -j -d link show dev {name}"),
        reason: "no link in its answer".into(),
    })
}

async fn link_exists(name: &str) -> Result<bool, NetError> {
    let out = ip(&["-j", "link", "show"]).await?;
    let parsed: serde_json::Value = parse(&out, "ip -j link show")?;
    Ok(parsed.as_array().into_iter().flatten().any(|l| l["ifname"].as_str() == Some(name)))
}

async fn links() -> Result<Vec<(String, Link)>, NetError> {
    let out = ip(&["-j", "-d", "link", "show"]).await?;
    let parsed: serde_json::Value = parse(&out, "ip -j -d link show")?;
    Ok(parsed.as_array().into_iter().flatten().map(Link::from_json).collect())
}

/// Addresses of the host, by interface: `ip -j addr show`.
async fn addresses() -> Result<Vec<(String, IpAddr, String)>, NetError> {
    let out = ip(&["-j", "addr", "show"]).await?;
    let parsed: serde_json::Value = parse(&out, "ip -j addr show")?;
    let mut found = Vec::new();
    for link in parsed.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default();
        for address in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(scope)) = (address["local"].as_str(), address["scope"].as_str()) else { continue };
            if let Ok(ip) = local.parse() {
                found.push((name.to_string(), ip, scope.to_string()));
            }
        }
    }
    Ok(found)
}

/// The interface that holds `address`.
async fn interface_of(address: IpAddr) -> Result<Option<String>, NetError> {
    Ok(addresses().await?.into_iter().find(|(_, ip, _)| *ip == address).map(|(name, ..)| name))
}

/// An address of global scope on `interface`, if it has one.
async fn global_address(interface: &str) -> Result<Option<IpAddr>, NetError> {
    Ok(addresses()
        .await?
        .into_iter()
        .find(|(name, _, scope)| name == interface && scope == "global")
        .map(|(_, ip, _)| ip))
}

/// Makes the VXLAN `port` flood unknown and broadcast frames to exactly `peers`.
async fn sync_flood_list(port: &str, peers: &BTreeSet<IpAddr>) -> Result<(), NetError> {
    const ALL: &str = "00:00:00:00:00:00";
    let out = run("bridge", &["-j", "fdb", "show", "dev", port]).await?;
    let parsed: serde_json::Value = parse(&out, "bridge -j fdb show")?;
    let present: BTreeSet<IpAddr> = parsed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["mac"].as_str() == Some(ALL))
        .filter_map(|e| e["dst"].as_str().and_then(|d| d.parse().ok()))
        .collect();
    for peer in peers.difference(&present) {
        run("bridge", &["fdb", "append", ALL, "dev", port, "dst", &peer.to_string()]).await?;
    }
    for gone in present.difference(peers) {
        run("bridge", &["fdb", "del", ALL, "dev", port, "dst", &gone.to_string()]).await?;
    }
    Ok(())
}

/// Whether `alias` marks a link of `cluster`, and of which network.
fn owner(alias: &str, cluster: u128) -> Option<String> {
    let mut words = alias.split(' ');
    let ours = words.next() == Some("converge") && words.next() == Some(cluster.to_string().as_str());
    words.next().filter(|network| ours && !network.is_empty()).map(String::from)
}

/// The request `TUNSETIFF` takes (`struct ifreq`, with the flags of its union).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// Opens a new tap `name` (not persistent: it goes when QEMU, its last holder, ends), with
/// virtio-net headers so the guest's checksum and segmentation offloads reach the host.
fn open_tap(name: &str) -> Result<File, NetError> {
    let tap_error = |source| NetError::Tap { path: "/dev/net/tun", source };
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(tap_error)?;
    let mut request = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _rest: [0; 22] };
    assert!(name.len() < libc::IFNAMSIZ, "tap names are short");
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    request.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out (40 bytes,
    // the name then the flags), on a file descriptor this function owns.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request as *mut IfReq) };
    if result != 0 {
        return Err(tap_error(std::io::Error::last_os_error()));
    }
    Ok(file)
}

async fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args).await
}

async fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let command = format!("{program} {}", args.join(" "));
    let output =
        tokio::process::Command::new(program).args(args).stdin(std::process::Stdio::null()).kill_on_drop(true).output();
    let output = tokio::time::timeout(COMMAND_TIMEOUT, output)
        .await
        .map_err(|_| NetError::Command { command: command.clone(), stderr: "no answer within 10 s".into() })?
        .map_err(|source| NetError::Spawn { command: command.clone(), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(NetError::Command { command, stderr });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn parse(out: &str, command: &str) -> Result<serde_json::Value, NetError> {
    // An empty answer (no links, no entries) is an empty list.
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(out).map_err(|e| NetError::Output { command: command.into(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_links_of_this_cluster_are_this_clusters() {
        assert_eq!(owner("converge 7 net-3", 7), Some("net-3".into()));
        assert_eq!(owner("converge 70 net-3", 7), None);
        assert_eq!(owner("converge 7", 7), None);
        assert_eq!(owner("uplink to the core", 7), None);
    }

    #[test]
    fn tap_names_fit_linux() {
        assert_eq!(tap_name(VmId(0x12), 3), "cvt12n3");
        assert!(tap_name(VmId((1 << 40) - 1), 7).len() < libc::IFNAMSIZ);
    }

    #[test]
    fn the_request_tunsetiff_takes_is_an_ifreq() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
