//! The commands that change `ClusterState`, and the pure `apply` that every node runs.

use crate::ids::{ClusterId, DiskId, NodeId, OwnerEpoch, PgEpoch, PoolId, VolumeId};
use crate::state::{ClusterInfo, ClusterState, Disk, Node, Pg, Pool, Volume};
use crate::units::{REPLICAS_MAX, SECTOR_SIZE_BYTES};
use serde::{Deserialize, Serialize};

/// A change to the cluster state, proposed through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterCommand {
    InitCluster {
        id: ClusterId,
        join_secret: String,
    },
    /// Adds a node, or updates the addresses of a known one.
    AddNode(Node),
    AddDisk(Disk),
    /// `pgs[i]` lists the disks of placement group `i` (computed by `policy`).
    CreatePool {
        name: String,
        replicas: u8,
        min_size: u8,
        pgs: Vec<Vec<DiskId>>,
    },
    CreateVolume {
        name: String,
        pool: PoolId,
        size_bytes: u64,
    },
    DeleteVolume {
        volume: VolumeId,
    },
    /// Makes `node` the volume's only writer, with the next owner epoch.
    AcquireVolume {
        volume: VolumeId,
        node: NodeId,
    },
}

/// What an applied command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    Done,
    PoolCreated(PoolId),
    VolumeCreated(VolumeId),
    VolumeAcquired(OwnerEpoch),
}

/// Why a command was refused. A refused command leaves the state unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    #[error("The cluster is not initialised yet: run `converge cluster init` on the first node")]
    NotInitialized,
    #[error("The cluster is already initialised")]
    AlreadyInitialized,
    #[error("Node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    #[error("Disk {disk} is already part of the cluster (on {node} at {path})")]
    DiskExists { disk: DiskId, node: NodeId, path: String },
    #[error("Disk {0} is not part of the cluster")]
    UnknownDisk(DiskId),
    #[error("A pool named {0:?} exists already")]
    PoolExists(String),
    #[error("Pool {0} does not exist")]
    UnknownPool(PoolId),
    #[error("Placement for pool {pool:?} is invalid: {reason}")]
    InvalidPlacement { pool: String, reason: String },
    #[error("A volume named {0:?} exists already: pick another name or delete it first")]
    VolumeExists(String),
    #[error("Volume {0} does not exist")]
    UnknownVolume(VolumeId),
    #[error("Volume size {0} bytes is not a positive multiple of 512")]
    InvalidSize(u64),
    #[error("Replication factor {0} is outside 1..=3")]
    InvalidReplicas(u8),
}

impl ClusterState {
    /// Applies one command. Pure and deterministic: the same state and command give the
    /// same result on every node. A refused command changes nothing.
    pub fn apply(&mut self, command: &ClusterCommand) -> Result<CommandOutcome, CommandError> {
        if self.cluster.is_none() && !matches!(command, ClusterCommand::InitCluster { .. }) {
            return Err(CommandError::NotInitialized);
        }
        match command {
            ClusterCommand::InitCluster { id, join_secret } => {
                if self.cluster.is_some() {
                    return Err(CommandError::AlreadyInitialized);
                }
                self.cluster = Some(ClusterInfo { id: *id, join_secret: join_secret.clone() });
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::AddNode(node) => {
                self.nodes.insert(node.id, node.clone());
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::AddDisk(disk) => self.add_disk(disk),
            ClusterCommand::CreatePool { name, replicas, min_size, pgs } => {
                self.create_pool(name, *replicas, *min_size, pgs)
            }
            ClusterCommand::CreateVolume { name, pool, size_bytes } => self.create_volume(name, *pool, *size_bytes),
            ClusterCommand::DeleteVolume { volume } => {
                self.volumes.remove(volume).ok_or(CommandError::UnknownVolume(*volume))?;
                Ok(CommandOutcome::Done)
            }
            ClusterCommand::AcquireVolume { volume, node } => {
                if !self.nodes.contains_key(node) {
                    return Err(CommandError::UnknownNode(*node));
                }
                let v = self.volumes.get_mut(volume).ok_or(CommandError::UnknownVolume(*volume))?;
                v.owner = Some(*node);
                v.owner_epoch = v.owner_epoch.next();
                Ok(CommandOutcome::VolumeAcquired(v.owner_epoch))
            }
        }
    }

    fn add_disk(&mut self, disk: &Disk) -> Result<CommandOutcome, CommandError> {
        if !self.nodes.contains_key(&disk.node) {
            return Err(CommandError::UnknownNode(disk.node));
        }
        let clash = self.disks.values().find(|d| d.id == disk.id || (d.node == disk.node && d.path == disk.path));
        if let Some(existing) = clash {
            return Err(CommandError::DiskExists {
                disk: existing.id,
                node: existing.node,
                path: existing.path.clone(),
            });
        }
        self.disks.insert(disk.id, disk.clone());
        Ok(CommandOutcome::Done)
    }

    fn create_pool(
        &mut self,
        name: &str,
        replicas: u8,
        min_size: u8,
        pgs: &[Vec<DiskId>],
    ) -> Result<CommandOutcome, CommandError> {
        if self.pool_by_name(name).is_some() {
            return Err(CommandError::PoolExists(name.to_string()));
        }
        if replicas == 0 || replicas > REPLICAS_MAX {
            return Err(CommandError::InvalidReplicas(replicas));
        }
        let invalid = |reason: String| CommandError::InvalidPlacement { pool: name.into(), reason };
        if min_size == 0 || min_size > replicas {
            return Err(invalid(format!("min_size {min_size} is outside 1..={replicas}")));
        }
        if pgs.is_empty() {
            return Err(invalid("no placement groups".into()));
        }
        for (index, disks) in pgs.iter().enumerate() {
            if disks.len() != usize::from(replicas) {
                return Err(invalid(format!("PG {index} has {} disks", disks.len())));
            }
            let mut nodes = Vec::with_capacity(disks.len());
            for disk in disks {
                let d = self.disks.get(disk).ok_or(CommandError::UnknownDisk(*disk))?;
                if nodes.contains(&d.node) {
                    return Err(invalid(format!("PG {index} has two replicas on {}", d.node)));
                }
                nodes.push(d.node);
            }
        }
        let id = self.next_pool_id;
        self.next_pool_id = PoolId(id.0 + 1);
        let pgs = pgs.iter().map(|disks| Pg { disks: disks.clone(), epoch: PgEpoch(1) }).collect();
        let pool = Pool { id, name: name.to_string(), replicas, min_size, pgs };
        self.pools.insert(id, pool);
        Ok(CommandOutcome::PoolCreated(id))
    }

    fn create_volume(&mut self, name: &str, pool: PoolId, size_bytes: u64) -> Result<CommandOutcome, CommandError> {
        if !self.pools.contains_key(&pool) {
            return Err(CommandError::UnknownPool(pool));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_SIZE_BYTES) {
            return Err(CommandError::InvalidSize(size_bytes));
        }
        if self.volume_by_name(name).is_some() {
            return Err(CommandError::VolumeExists(name.to_string()));
        }
        let id = self.next_volume_id;
        self.next_volume_id = VolumeId(id.0 + 1);
        let volume = Volume { id, name: name.to_string(), pool, size_bytes, owner: None, owner_epoch: OwnerEpoch(0) };
        self.volumes.insert(id, volume);
        Ok(CommandOutcome::VolumeCreated(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_A: NodeId = NodeId(1);
    const NODE_B: NodeId = NodeId(2);

    fn node(id: NodeId) -> ClusterCommand {
        ClusterCommand::AddNode(Node {
            id,
            api_addr: format!("127.0.0.{}:7700", id.0 + 1),
            data_addr: format!("127.0.0.{}:7701", id.0 + 1),
        })
    }

    fn disk(id: u64, node: NodeId) -> ClusterCommand {
        ClusterCommand::AddDisk(Disk {
            id: DiskId(id),
            node,
            path: format!("/disks/{id}"),
            size_bytes: 1 << 30,
            extent_slots: 255,
        })
    }

    /// Two nodes with one disk each and a 2-replica pool with one PG.
    fn two_node_cluster() -> ClusterState {
        let mut state = ClusterState::default();
        let commands = [
            ClusterCommand::InitCluster { id: ClusterId(9), join_secret: "s".into() },
            node(NODE_A),
            node(NODE_B),
            disk(10, NODE_A),
            disk(20, NODE_B),
            ClusterCommand::CreatePool {
                name: "replicated-2".into(),
                replicas: 2,
                min_size: 2,
                pgs: vec![vec![DiskId(10), DiskId(20)]],
            },
        ];
        for command in &commands {
            state.apply(command).expect("setup command applies");
        }
        state.check_invariants();
        state
    }

    #[test]
    fn commands_before_init_are_refused() {
        let mut state = ClusterState::default();
        assert_eq!(state.apply(&node(NODE_A)), Err(CommandError::NotInitialized));
        assert_eq!(state, ClusterState::default());
    }

    #[test]
    fn acquiring_a_volume_moves_its_owner_epoch_forward() {
        let mut state = two_node_cluster();
        let create = ClusterCommand::CreateVolume { name: "db".into(), pool: PoolId(0), size_bytes: 1 << 30 };
        assert_eq!(state.apply(&create), Ok(CommandOutcome::VolumeCreated(VolumeId(0))));

        let first = state.apply(&ClusterCommand::AcquireVolume { volume: VolumeId(0), node: NODE_A });
        let second = state.apply(&ClusterCommand::AcquireVolume { volume: VolumeId(0), node: NODE_B });

        assert_eq!(first, Ok(CommandOutcome::VolumeAcquired(OwnerEpoch(1))));
        assert_eq!(second, Ok(CommandOutcome::VolumeAcquired(OwnerEpoch(2))));
        assert_eq!(state.volumes[&VolumeId(0)].owner, Some(NODE_B));
    }

    #[test]
    fn duplicate_volume_name_is_refused_and_changes_nothing() {
        let mut state = two_node_cluster();
        let create = ClusterCommand::CreateVolume { name: "db".into(), pool: PoolId(0), size_bytes: 1 << 30 };
        state.apply(&create).unwrap();
        let before = state.clone();

        assert_eq!(state.apply(&create), Err(CommandError::VolumeExists("db".into())));
        assert_eq!(state, before);
    }

    #[test]
    fn deleted_volume_ids_are_not_reused() {
        let mut state = two_node_cluster();
        let create = ClusterCommand::CreateVolume { name: "db".into(), pool: PoolId(0), size_bytes: 1 << 30 };
        state.apply(&create).unwrap();
        state.apply(&ClusterCommand::DeleteVolume { volume: VolumeId(0) }).unwrap();

        assert_eq!(state.apply(&create), Ok(CommandOutcome::VolumeCreated(VolumeId(1))));
    }

    #[test]
    fn pool_with_two_replicas_on_one_node_is_refused() {
        let mut state = two_node_cluster();
        state.apply(&disk(11, NODE_A)).unwrap();
        let pool = ClusterCommand::CreatePool {
            name: "bad".into(),
            replicas: 2,
            min_size: 2,
            pgs: vec![vec![DiskId(10), DiskId(11)]],
        };

        let refused = state.apply(&pool);

        assert!(matches!(refused, Err(CommandError::InvalidPlacement { .. })), "{refused:?}");
    }

    #[test]
    fn the_same_disk_cannot_join_twice() {
        let mut state = two_node_cluster();
        let again = state.apply(&disk(10, NODE_B));
        assert!(matches!(again, Err(CommandError::DiskExists { disk: DiskId(10), .. })), "{again:?}");
    }

    #[test]
    fn volume_size_must_be_whole_sectors() {
        let mut state = two_node_cluster();
        let create = ClusterCommand::CreateVolume { name: "odd".into(), pool: PoolId(0), size_bytes: 1000 };
        assert_eq!(state.apply(&create), Err(CommandError::InvalidSize(1000)));
    }
}
