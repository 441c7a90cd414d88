//! The request and response bodies of API version 1.

use model::{DiskId, NodeId, OwnerEpoch, PoolId, VolumeId};
use serde::{Deserialize, Serialize};

pub use cluster::{ClusterStatus, DiskStatus, NodeStatus};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitResponse {
    pub cluster_id: String,
    /// Where other nodes reach this one (`cluster join --peer`).
    pub address: String,
    /// An admin token for the API (`converge token create` makes more).
    pub admin_token: String,
    /// Lets other nodes join, for an hour.
    pub join_token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateToken {
    /// `None` for a join token.
    pub role: Option<model::Role>,
    #[serde(default)]
    pub name: String,
    /// How long a join token lasts; an hour if absent.
    pub ttl_secs: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenCreated {
    pub id: String,
    /// The token itself: shown once, kept nowhere.
    pub token: String,
    pub kind: model::TokenKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub kind: model::TokenKind,
    pub created_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// `host:port` of any member.
    pub peer: String,
    pub token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    pub cluster_id: String,
    pub node: NodeId,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddDisk {
    pub path: String,
    /// Create a file of this size if `path` does not exist.
    pub size_bytes: Option<u64>,
    /// Format it even if it holds a file system, a partition table or another cluster's disk.
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: DiskId,
    pub node: NodeId,
    pub path: String,
    pub size_bytes: u64,
    pub capacity_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateVolume {
    pub name: String,
    pub size_bytes: u64,
    pub replicas: u8,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub pool: PoolId,
    pub pool_name: String,
    pub replicas: u8,
    /// Replicas that must hold a write before it is acknowledged.
    pub min_size: u8,
    pub owner: Option<NodeId>,
    pub owner_epoch: OwnerEpoch,
    /// Placement groups of the volume's pool with a replica out, of `pgs`.
    pub pgs_degraded: u32,
    pub pgs: u32,
    /// Why it is degraded, one line per replica out; empty when whole.
    pub degraded: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImportResult {
    pub bytes: u64,
    pub owner_epoch: OwnerEpoch,
}

/// `POST /v1/volumes/{name}/resize`: grow the volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResizeVolume {
    pub size_bytes: u64,
}

/// `PATCH /v1/vms/{name}`: what changes from the VM's next start.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpdateVm {
    #[serde(default)]
    pub cpus: Option<u16>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// `POST /v1/volumes/{name}/clone`: copy the volume's bytes into volume `into`, made with the
/// source's size (and `replicas`, or the source's) if it does not exist.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CloneVolume {
    pub into: String,
    #[serde(default)]
    pub replicas: Option<u8>,
}

/// One line of a clone's answer (JSON, one per line): progress as it copies, then how it
/// ended. A clone that fails removes the volume it made.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneProgress {
    Copied { bytes: u64, of: u64 },
    Done { volume: VolumeInfo },
    Failed { error: String },
}

/// The body of every error response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskRequest {
    pub size_bytes: u64,
    pub replicas: u8,
}

/// A file already imported into a volume, for direct kernel boot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootFileRef {
    pub volume: String,
    pub len_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum BootRequest {
    /// BIOS from the first disk.
    Disk,
    /// UEFI from the first disk; the server makes the VM's variable volume (`NAME-uefi-vars`).
    Uefi,
    Kernel {
        kernel: BootFileRef,
        initrd: Option<BootFileRef>,
        cmdline: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateVm {
    pub name: String,
    pub cpus: u16,
    pub memory_bytes: u64,
    pub disks: Vec<DiskRequest>,
    pub boot: BootRequest,
    /// Restart on another node when its node goes down; on by default.
    #[serde(default)]
    pub ha: model::HaPolicy,
    /// A cloud-init seed (NoCloud) attached after the disks.
    #[serde(default)]
    pub cloud_init: Option<CloudInit>,
    /// An ISO image (uploaded into a volume) attached as a CD-ROM, booted first.
    #[serde(default)]
    pub cdrom: Option<BootFileRef>,
    /// Network cards, in order.
    #[serde(default)]
    pub nics: Vec<NicRequest>,
}

/// A network card for a new VM: the network's name, and its MAC address if the user chose
/// one (else the server picks a free one).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NicRequest {
    pub network: String,
    #[serde(default)]
    pub mac: Option<model::Mac>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NicInfo {
    pub network: String,
    pub mac: model::Mac,
}

/// `POST /v1/networks`. Untagged on `interface` by default; `vlan` tags it (on `interface`,
/// or on the interface of each node's own address); `overlay` makes a VXLAN between the
/// nodes instead.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CreateNetwork {
    pub name: String,
    #[serde(default)]
    pub interface: Option<String>,
    #[serde(default)]
    pub vlan: Option<u16>,
    #[serde(default)]
    pub overlay: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub id: model::NetworkId,
    pub name: String,
    #[serde(flatten)]
    pub kind: model::NetworkKind,
    /// The VMs with a NIC on it.
    pub vms: Vec<String>,
    /// The nodes that cannot provide it now, and why: VMs on it are not placed there.
    #[serde(default)]
    pub unavailable: Vec<NetworkGap>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkGap {
    pub node: NodeId,
    pub reason: String,
}

/// What cloud-init is told at the VM's first boot.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CloudInit {
    #[serde(default)]
    pub hostname: Option<String>,
    /// A user to make, with sudo and the SSH keys; without one, the keys are the image's
    /// default user's.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// The user's own user-data (a cloud-config, a script...), instead of the one made from
    /// the fields above.
    #[serde(default)]
    pub user_data: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StartVm {
    /// A node id (`node-12`) or address; the least loaded node that is up if absent.
    pub node: Option<String>,
    /// Move a VM that is running elsewhere.
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StopVm {
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: model::VmId,
    pub name: String,
    pub cpus: u16,
    pub memory_bytes: u64,
    /// Volume names of the disks, in order.
    pub disks: Vec<String>,
    pub boot: model::Boot,
    pub desired: model::VmDesired,
    /// The node that last reported on the VM, and what it reported.
    pub node: Option<NodeId>,
    pub state: model::VmRunState,
    #[serde(default)]
    pub ha: model::HaPolicy,
    /// Whether the node the VM is meant to run on, or last ran on, is down.
    #[serde(default)]
    pub node_down: bool,
    /// The volume of its cloud-init seed, attached after the disks.
    #[serde(default)]
    pub seed: Option<String>,
    /// The volume of the ISO image attached as its CD-ROM.
    #[serde(default)]
    pub cdrom: Option<String>,
    #[serde(default)]
    pub nics: Vec<NicInfo>,
}

/// `GET /v1/events?after=SEQ`: the events after `after`, oldest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    pub after: u64,
}

/// `GET /v1/nodes/{node}/check`: whether the node can go down now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeCheck {
    pub node: NodeId,
    pub can_go_down: bool,
    /// Why not, one sentence each.
    pub reasons: Vec<String>,
}

/// A node's drain state after `drain` or `resume`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeDrain {
    pub node: NodeId,
    pub drained: bool,
    /// VMs still meant to run on it.
    pub vms: Vec<String>,
}
