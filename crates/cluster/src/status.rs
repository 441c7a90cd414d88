//! What `converge cluster status` shows: the replicated state joined with liveness.

use model::{ClusterId, DiskHealth, DiskId, NodeId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: Option<ClusterId>,
    pub this_node: NodeId,
    pub leader: Option<NodeId>,
    pub healthy: bool,
    /// What makes the cluster unhealthy, one line each.
    pub problems: Vec<String>,
    pub nodes: Vec<NodeStatus>,
    /// Placement groups with a replica out, over every pool.
    #[serde(default)]
    pub pgs_degraded: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub api_addr: String,
    pub data_addr: String,
    pub up: bool,
    pub voter: bool,
    pub disks: Vec<DiskStatus>,
    /// What the node's resyncs copied since it started; `None` while it is down.
    #[serde(default)]
    pub resync: Option<model::ResyncReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskStatus {
    pub id: DiskId,
    pub path: String,
    pub size_bytes: u64,
    /// `None` while the disk's node is down.
    pub health: Option<DiskHealth>,
    pub used_bytes: Option<u64>,
    pub capacity_bytes: u64,
}
