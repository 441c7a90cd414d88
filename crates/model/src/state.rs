//! The replicated cluster state: what every node agrees on through Raft.

use crate::ha::{Capacity, Event, NodeDown};
use crate::ids::{ClusterId, DiskId, NodeId, OwnerEpoch, PgEpoch, PgId, PoolId, VolumeId};
use crate::network::{Network, NetworkId};
use crate::units::{pg_of, EXTENT_SIZE_BYTES};
use crate::vm::{Vm, VmId};
use crate::ExtentIndex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Everything the cluster agrees on. Changed only by `ClusterState::apply`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Set once by `ClusterCommand::InitCluster`.
    pub cluster: Option<ClusterInfo>,
    pub nodes: BTreeMap<NodeId, Node>,
    pub disks: BTreeMap<DiskId, Disk>,
    pub pools: BTreeMap<PoolId, Pool>,
    pub volumes: BTreeMap<VolumeId, Volume>,
    #[serde(default)]
    pub vms: BTreeMap<VmId, Vm>,
    /// Volume ids are never reused, so a replica can tell a deleted volume's extents.
    pub next_volume_id: VolumeId,
    pub next_pool_id: PoolId,
    #[serde(default)]
    pub next_vm_id: VmId,
    /// What each node offers to VMs, as it reported when it started.
    #[serde(default)]
    pub capacity: BTreeMap<NodeId, Capacity>,
    /// Nodes the leader declared down: not heard from for the down time.
    #[serde(default)]
    pub down: BTreeMap<NodeId, NodeDown>,
    /// Nodes being drained: no VM is placed on them.
    #[serde(default)]
    pub drained: BTreeSet<NodeId>,
    /// The newest `EVENTS_KEPT` events, oldest first.
    #[serde(default)]
    pub events: VecDeque<Event>,
    #[serde(default)]
    pub next_event_seq: u64,
    /// Nodes removed for good (`converge node remove`): their ids never come back, and
    /// their disks stay out of their PGs until those are placed anew.
    #[serde(default)]
    pub removed: BTreeMap<NodeId, Node>,
    /// API and join tokens by id (`tokens`): hashes of their secrets, never the secrets.
    #[serde(default)]
    pub tokens: BTreeMap<String, crate::tokens::Token>,
    /// The cluster's certificate authority (`SetCa`). Its key is the one secret the state
    /// holds: it never leaves the cluster's nodes (docs/threat-model.md).
    #[serde(default)]
    pub ca: Option<ClusterCa>,
    /// The networks VMs attach to; every node provides each as a bridge.
    #[serde(default)]
    pub networks: BTreeMap<NetworkId, Network>,
    #[serde(default)]
    pub next_network_id: NetworkId,
    /// The networks each node cannot provide now, with why, as it last reported. A node
    /// missing here provides every network (or has not said otherwise yet).
    #[serde(default)]
    pub network_gaps: BTreeMap<NodeId, BTreeMap<NetworkId, String>>,
}

/// The cluster's certificate authority, PEM.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").field("cert_pem", &self.cert_pem).field("key_pem", &"(secret)").finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub id: ClusterId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// `host:port` of the API (users, and nodes asking to join).
    pub api_addr: String,
    /// `host:port` of the node port: everything between nodes, over mutual TLS (Raft,
    /// liveness, snapshots, console relay, and the block protocol).
    pub data_addr: String,
    /// SHA-256 of the node's certificate: the node port takes a node by it.
    #[serde(default)]
    pub cert_sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: DiskId,
    pub node: NodeId,
    /// Where the node finds the device or file.
    pub path: String,
    pub size_bytes: u64,
    /// Extent slots the disk's format provides.
    pub extent_slots: u64,
}

/// A replication factor over the cluster's disks, split into placement groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub id: PoolId,
    pub name: String,
    pub replicas: u8,
    /// Replicas that must acknowledge a write for it to succeed.
    pub min_size: u8,
    /// `pgs[i]` is placement group `i`; `pgs.len()` is the pool's PG count.
    pub pgs: Vec<Pg>,
}

/// A placement group: the disks, on distinct nodes, that hold every extent hashed to it.
///
/// `disks` is every replica the PG is placed on; the *acting set* is those not `out`. A
/// write is acknowledged once every replica of the acting set at one PG epoch has it
/// durably (and the acting set has at least the pool's `min_size`). A replica that stops
/// answering is taken out, and brought back in only after it was resynced; both raise
/// `epoch`, so a replica can tell a request made for an older set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pg {
    pub disks: Vec<DiskId>,
    pub epoch: PgEpoch,
    /// Replicas taken out of the acting set: they miss writes until they are resynced.
    #[serde(default)]
    pub out: BTreeMap<DiskId, OutReason>,
}

/// Why a replica was taken out of its PG's acting set, as the writer saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutReason {
    /// The PG epoch at which it was taken out.
    pub since: PgEpoch,
    pub reason: String,
}

impl Pg {
    /// The replicas that take writes and serve reads at `epoch`, in placement order.
    pub fn acting(&self) -> impl Iterator<Item = DiskId> + '_ {
        self.disks.iter().copied().filter(|d| !self.out.contains_key(d))
    }

    pub fn is_acting(&self, disk: DiskId) -> bool {
        self.disks.contains(&disk) && !self.out.contains_key(&disk)
    }

    pub fn is_degraded(&self) -> bool {
        !self.out.is_empty()
    }

    /// The one replica that copies changed data to replicas coming back: the first acting
    /// one in placement order. Deterministic from the state alone, so two nodes never
    /// resync the same PG at once.
    pub fn resync_source(&self) -> Option<DiskId> {
        self.acting().next()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub pool: PoolId,
    pub size_bytes: u64,
    /// The node allowed to write; `None` until someone first writes.
    pub owner: Option<NodeId>,
    pub owner_epoch: OwnerEpoch,
}

impl Pool {
    pub fn pg_count(&self) -> u32 {
        self.pgs.len() as u32
    }

    /// The placement group holding `extent` of `volume`.
    pub fn pg_for(&self, volume: VolumeId, extent: ExtentIndex) -> (PgId, &Pg) {
        let pg = pg_of(volume, extent, self.pg_count());
        (pg, &self.pgs[pg.0 as usize])
    }
}

impl Pool {
    /// Why the pool is degraded, one line per replica out, or nothing when every PG is
    /// whole. Every volume of the pool spreads over all its PGs, so this is also why its
    /// volumes are degraded.
    pub fn degraded(&self, state: &ClusterState) -> Vec<String> {
        let mut out: BTreeMap<DiskId, (u32, &str)> = BTreeMap::new();
        for pg in &self.pgs {
            for (disk, why) in &pg.out {
                let entry = out.entry(*disk).or_insert((0, &why.reason));
                entry.0 += 1;
            }
        }
        out.into_iter()
            .map(|(disk, (pgs, reason))| {
                let node = state.disks.get(&disk).map(|d| d.node.to_string()).unwrap_or_default();
                format!(
                    "{disk} on {node} is out of {pgs} of {} PGs of {} until it is resynced: {reason}",
                    self.pgs.len(),
                    self.name
                )
            })
            .collect()
    }

    /// The indexes of the PGs that some volume of this pool maps an extent to.
    pub fn pgs_holding_volumes(&self, state: &ClusterState) -> std::collections::BTreeSet<usize> {
        let mut holding = std::collections::BTreeSet::new();
        for volume in state.volumes.values().filter(|v| v.pool == self.id) {
            for extent in 0..volume.extent_count() {
                if holding.len() == self.pgs.len() {
                    return holding;
                }
                holding.insert(pg_of(volume.id, crate::ids::ExtentIndex(extent), self.pg_count()).0 as usize);
            }
        }
        holding
    }

    pub fn pgs_degraded(&self) -> u32 {
        self.pgs.iter().filter(|pg| pg.is_degraded()).count() as u32
    }
}

impl Volume {
    pub fn extent_count(&self) -> u64 {
        self.size_bytes.div_ceil(EXTENT_SIZE_BYTES)
    }
}

impl ClusterState {
    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|v| v.name == name)
    }

    pub fn vm_by_name(&self, name: &str) -> Option<&Vm> {
        self.vms.values().find(|v| v.spec.name == name)
    }

    /// The VM using `volume`, if any.
    pub fn vm_using(&self, volume: VolumeId) -> Option<&Vm> {
        self.vms.values().find(|vm| vm.volumes().contains(&volume))
    }

    pub fn network_by_name(&self, name: &str) -> Option<&Network> {
        self.networks.values().find(|n| n.name == name)
    }

    /// The VM with a NIC of address `mac`, if any.
    pub fn vm_with_mac(&self, mac: crate::network::Mac) -> Option<&Vm> {
        self.vms.values().find(|vm| vm.spec.nics.iter().any(|nic| nic.mac == mac))
    }

    pub fn pool_by_name(&self, name: &str) -> Option<&Pool> {
        self.pools.values().find(|p| p.name == name)
    }

    pub fn disks_of(&self, node: NodeId) -> impl Iterator<Item = &Disk> {
        self.disks.values().filter(move |d| d.node == node)
    }

    /// Asserts the relations `apply` maintains; tests and the simulator call it after every
    /// step.
    pub fn check_invariants(&self) {
        for disk in self.disks.values() {
            let known = self.nodes.contains_key(&disk.node) || self.removed.contains_key(&disk.node);
            assert!(known, "{} on unknown {}", disk.id, disk.node);
        }
        for pool in self.pools.values() {
            assert!(!pool.pgs.is_empty(), "{} has no placement groups", pool.id);
            assert!(pool.min_size >= 1 && pool.min_size <= pool.replicas);
            for pg in &pool.pgs {
                assert_eq!(pg.disks.len(), usize::from(pool.replicas), "{} has a short PG", pool.id);
                let mut nodes: Vec<NodeId> = pg.disks.iter().map(|d| self.disks[d].node).collect();
                nodes.sort();
                nodes.dedup();
                assert_eq!(nodes.len(), pg.disks.len(), "{} has two replicas on one node", pool.id);
                assert!(pg.out.keys().all(|d| pg.disks.contains(d)), "{} has a stranger out", pool.id);
                assert!(pg.acting().next().is_some(), "{} has a PG with no acting replica", pool.id);
                assert!(pg.out.values().all(|o| o.since <= pg.epoch), "{} has an out mark from the future", pool.id);
            }
        }
        for volume in self.volumes.values() {
            assert!(self.pools.contains_key(&volume.pool));
            assert!(volume.id < self.next_volume_id);
            let same_name = self.volumes.values().filter(|v| v.name == volume.name).count();
            assert_eq!(same_name, 1, "volume name {} is not unique", volume.name);
        }
        for vm in self.vms.values() {
            assert!(vm.id < self.next_vm_id);
            for volume in vm.volumes() {
                assert!(self.volumes.contains_key(&volume), "{} uses missing {volume}", vm.id);
                assert_eq!(self.vm_using(volume).map(|v| v.id), Some(vm.id), "{volume} shared by two VMs");
            }
            for nic in &vm.spec.nics {
                assert!(self.networks.contains_key(&nic.network), "{} on missing {}", vm.id, nic.network);
                let holders = self.vms.values().flat_map(|v| &v.spec.nics).filter(|n| n.mac == nic.mac).count();
                assert_eq!(holders, 1, "MAC {} on {holders} NICs", nic.mac);
            }
        }
        for network in self.networks.values() {
            assert!(network.id < self.next_network_id);
        }
        for (node, gaps) in &self.network_gaps {
            assert!(self.nodes.contains_key(node), "network gaps of {node}, no member");
            assert!(!gaps.is_empty() && gaps.keys().all(|n| self.networks.contains_key(n)), "gaps of {node}");
        }
    }
}
