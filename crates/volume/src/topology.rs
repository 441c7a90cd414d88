//! What the engine needs to know about the cluster, and which disks hold an extent.

use crate::error::VolumeError;
use model::{ClusterState, DiskId, ExtentIndex, NodeId, PgEpoch, PgId, Volume};
use std::sync::Arc;
use tokio::sync::watch;

/// The engine's read-only view of the cluster, published by the control plane. Reading it
/// never waits for Raft.
pub trait Topology: Send + Sync + 'static {
    fn this_node(&self) -> NodeId;
    fn state(&self) -> Arc<ClusterState>;
    fn watch(&self) -> watch::Receiver<Arc<ClusterState>>;
    fn is_up(&self, node: NodeId) -> bool;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    pub disk: DiskId,
    pub node: NodeId,
    pub data_addr: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSet {
    pub pg: PgId,
    pub pg_epoch: PgEpoch,
    pub replicas: Vec<Replica>,
}

/// The replicas of `extent` of `volume` in `state`.
pub fn replicas_of(state: &ClusterState, volume: &Volume, extent: ExtentIndex) -> Result<ReplicaSet, VolumeError> {
    let pool = state.pools.get(&volume.pool).ok_or(VolumeError::UnknownVolume(volume.id))?;
    let (pg, placement) = pool.pg_for(volume.id, extent);
    let replicas = placement
        .disks
        .iter()
        .map(|disk| {
            let d = &state.disks[disk];
            let data_addr = state.nodes.get(&d.node).map(|n| n.data_addr.clone()).unwrap_or_default();
            Replica { disk: *disk, node: d.node, data_addr }
        })
        .collect();
    Ok(ReplicaSet { pg, pg_epoch: placement.epoch, replicas })
}
