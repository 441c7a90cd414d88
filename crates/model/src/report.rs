//! What a node reports about itself to its peers: liveness and disk usage. Not part of the
//! replicated state; it is exchanged by the nodes' periodic pings.

use crate::ids::{DiskId, NodeId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: NodeId,
    pub disks: Vec<DiskReport>,
    #[serde(default)]
    pub resync: ResyncReport,
    /// How long ago (ms) this node last heard from each other node: the leader declares a
    /// node down only when nobody has heard from it, not just the leader.
    #[serde(default)]
    pub heard_ms_ago: std::collections::BTreeMap<NodeId, u64>,
}

/// What a node's resyncs copied since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncReport {
    pub bytes_copied: u64,
    pub replicas_brought_in: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub disk: DiskId,
    pub health: DiskHealth,
    pub extents_used: u64,
    pub extents_total: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum DiskHealth {
    Ok,
    /// The device or file is not there, or its format cannot be read; the reason says which.
    Failed(String),
}
