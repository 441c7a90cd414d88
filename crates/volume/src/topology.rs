//! What the engine needs to know about the cluster, and which disks hold an extent.

use crate::error::VolumeError;
use model::{ClusterId, ClusterState, DiskId, ExtentIndex, NodeId, PgEpoch, PgId, PoolId, Volume};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::watch;

/// The engine's read-only view of the cluster, published by the control plane. Reading it
/// never waits for Raft; only a failure (a replica to take out or bring back) proposes.
pub trait Topology: Send + Sync + 'static {
    fn this_node(&self) -> NodeId;
    fn state(&self) -> Arc<ClusterState>;
    fn watch(&self) -> watch::Receiver<Arc<ClusterState>>;
    fn is_up(&self, node: NodeId) -> bool;
    /// Commits a change of a PG's acting set through Raft; returns the PG's epoch after it,
    /// once this node has applied it.
    fn change_pg(&self, change: PgChange) -> Pin<Box<dyn Future<Output = Result<PgEpoch, PgChangeError>> + Send + '_>>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgChange {
    TakeOut {
        pool: PoolId,
        pg: PgId,
        disk: DiskId,
        seen: PgEpoch,
        reason: String,
    },
    BringIn {
        pool: PoolId,
        pg: PgId,
        disk: DiskId,
        seen: PgEpoch,
    },
    /// Raises the PG's epoch with `disk` still out: what was sent to it at `seen` with an
    /// unknown outcome is refused once it learns the new epoch.
    Fence {
        pool: PoolId,
        pg: PgId,
        disk: DiskId,
        seen: PgEpoch,
    },
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PgChangeError {
    #[error("the PG is at {current} now, not {seen}")]
    Stale { seen: PgEpoch, current: PgEpoch },
    #[error("the replica is the PG's last acting one")]
    LastReplica,
    #[error("the change could not be committed: {reason}")]
    Unavailable { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    pub disk: DiskId,
    pub node: NodeId,
    pub data_addr: String,
}

/// The acting set of the PG that holds an extent, at one PG epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSet {
    pub cluster: ClusterId,
    pub pool: PoolId,
    pub pg: PgId,
    pub pg_epoch: PgEpoch,
    pub min_size: u8,
    /// The acting replicas, in placement order.
    pub replicas: Vec<Replica>,
}

/// The acting replicas of `extent` of `volume` in `state`.
pub fn replicas_of(state: &ClusterState, volume: &Volume, extent: ExtentIndex) -> Result<ReplicaSet, VolumeError> {
    let pool = state.pools.get(&volume.pool).ok_or(VolumeError::UnknownVolume(volume.id))?;
    let (pg, placement) = pool.pg_for(volume.id, extent);
    let replicas = placement
        .acting()
        .map(|disk| {
            let node = state.disks[&disk].node;
            let data_addr = state.nodes.get(&node).map(|n| n.data_addr.clone()).unwrap_or_default();
            Replica { disk, node, data_addr }
        })
        .collect();
    Ok(ReplicaSet {
        cluster: state.cluster.as_ref().map(|c| c.id).unwrap_or_default(),
        pool: pool.id,
        pg,
        pg_epoch: placement.epoch,
        min_size: pool.min_size,
        replicas,
    })
}

/// A topology over a cluster state held in this process: PG changes are applied to it with
/// the same pure `ClusterState::apply` that Raft runs. For a node without Raft: tests of
/// the engine over real replica servers, and the simulator.
pub struct StateTopology {
    node: NodeId,
    state: Arc<watch::Sender<Arc<ClusterState>>>,
    down: Arc<std::sync::Mutex<std::collections::HashSet<NodeId>>>,
}

impl StateTopology {
    /// A view for `node` of the state in `state`; every `StateTopology` made from the same
    /// sender sees the others' changes at once.
    pub fn new(node: NodeId, state: Arc<watch::Sender<Arc<ClusterState>>>) -> Self {
        StateTopology { node, state, down: Default::default() }
    }

    /// Another node's view of the same state and liveness.
    pub fn for_node(&self, node: NodeId) -> Self {
        StateTopology { node, state: self.state.clone(), down: self.down.clone() }
    }

    /// Marks `node` down or up for `is_up`.
    pub fn set_up(&self, node: NodeId, up: bool) {
        let mut down = self.down.lock().expect("down lock");
        if up {
            down.remove(&node);
        } else {
            down.insert(node);
        }
    }

    /// Applies `command` to the shared state, as a committed Raft entry would.
    pub fn apply(&self, command: &model::ClusterCommand) -> Result<model::CommandOutcome, model::CommandError> {
        let mut outcome = None;
        self.state.send_modify(|state| {
            let mut next = (**state).clone();
            let result = next.apply(command);
            if result.is_ok() {
                *state = Arc::new(next);
            }
            outcome = Some(result);
        });
        outcome.expect("send_modify runs the closure")
    }
}

impl Topology for StateTopology {
    fn this_node(&self) -> NodeId {
        self.node
    }
    fn state(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }
    fn watch(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.subscribe()
    }
    fn is_up(&self, node: NodeId) -> bool {
        !self.down.lock().expect("down lock").contains(&node)
    }
    fn change_pg(&self, change: PgChange) -> Pin<Box<dyn Future<Output = Result<PgEpoch, PgChangeError>> + Send + '_>> {
        let result = self.apply(&change.command());
        Box::pin(async move { pg_change_outcome(result) })
    }
}

impl PgChange {
    /// The Raft command that makes this change.
    pub fn command(&self) -> model::ClusterCommand {
        match self.clone() {
            PgChange::TakeOut { pool, pg, disk, seen, reason } => {
                model::ClusterCommand::TakeReplicaOut { pool, pg, disk, seen, reason }
            }
            PgChange::BringIn { pool, pg, disk, seen } => {
                model::ClusterCommand::BringReplicaIn { pool, pg, disk, seen }
            }
            PgChange::Fence { pool, pg, disk, seen } => model::ClusterCommand::FenceReplicaOut { pool, pg, disk, seen },
        }
    }
}

/// What a committed (or refused) PG change command means for the engine.
pub fn pg_change_outcome(result: Result<model::CommandOutcome, model::CommandError>) -> Result<PgEpoch, PgChangeError> {
    match result {
        Ok(model::CommandOutcome::PgChanged(epoch)) => Ok(epoch),
        Ok(other) => Err(PgChangeError::Unavailable { reason: format!("unexpected outcome {other:?}") }),
        Err(model::CommandError::StalePgEpoch { seen, current, .. }) => Err(PgChangeError::Stale { seen, current }),
        Err(model::CommandError::LastReplica { .. }) => Err(PgChangeError::LastReplica),
        Err(e) => Err(PgChangeError::Unavailable { reason: e.to_string() }),
    }
}
