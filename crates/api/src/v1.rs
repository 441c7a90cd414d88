//! The request and response bodies of API version 1.

use model::{DiskId, NodeId, OwnerEpoch, PoolId, VolumeId};
use serde::{Deserialize, Serialize};

pub use cluster::{ClusterStatus, DiskStatus, NodeStatus};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitResponse {
    pub cluster_id: String,
    pub token: String,
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
    pub owner: Option<NodeId>,
    pub owner_epoch: OwnerEpoch,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImportResult {
    pub bytes: u64,
    pub owner_epoch: OwnerEpoch,
}

/// The body of every error response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
