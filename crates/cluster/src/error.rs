use crate::network::TransportError;
use model::{ClusterId, CommandError};
use policy::PlacementError;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("This node is not in a cluster yet: run `converge cluster init` on it, or `converge cluster join`")]
    NotInitialized,
    #[error("This node is already a member of cluster {0}")]
    AlreadyMember(ClusterId),
    #[error("The join token was not accepted: copy it again from `converge cluster init` on the first node")]
    BadToken,
    #[error("No Raft leader answered within {waited_ms} ms: is a majority of the cluster's nodes up?")]
    NoLeader { waited_ms: u64 },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Address(#[from] policy::AddressError),
    #[error("No {what} named {name:?}")]
    NotFound { what: &'static str, name: String },
    #[error("{0}")]
    Refused(String),
    #[error("Talking to node {addr}")]
    Peer {
        addr: String,
        #[source]
        source: TransportError,
    },
    #[error("Opening the cluster database {path}")]
    Database {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("Reading or writing {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Raft failed: {0}")]
    Raft(String),
}

/// What a caller (an API handler) can tell its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterErrorKind {
    Invalid,
    NotFound,
    Conflict,
    Unavailable,
    Internal,
}

impl ClusterError {
    pub fn kind(&self) -> ClusterErrorKind {
        use ClusterErrorKind::*;
        match self {
            ClusterError::NotInitialized | ClusterError::AlreadyMember(_) => Conflict,
            ClusterError::BadToken
            | ClusterError::Placement(_)
            | ClusterError::Address(_)
            | ClusterError::Refused(_) => Invalid,
            ClusterError::NoLeader { .. } | ClusterError::Peer { .. } => Unavailable,
            ClusterError::NotFound { .. } => NotFound,
            ClusterError::Command(c) => match c {
                CommandError::UnknownVolume(_)
                | CommandError::UnknownPool(_)
                | CommandError::UnknownDisk(_)
                | CommandError::UnknownNode(_)
                | CommandError::UnknownVm(_)
                | CommandError::UnknownNetwork(_)
                | CommandError::UnknownToken(_)
                | CommandError::UnknownPg { .. }
                | CommandError::NotAReplica { .. } => NotFound,
                CommandError::NotInitialized
                | CommandError::AlreadyInitialized
                | CommandError::DiskExists { .. }
                | CommandError::PoolExists(_)
                | CommandError::VolumeExists(_)
                | CommandError::VmExists(_)
                | CommandError::NetworkExists(_)
                | CommandError::NetworkInUse { .. }
                | CommandError::VolumeInUse { .. }
                | CommandError::VmRunningElsewhere { .. }
                | CommandError::VmNotStopped(_)
                | CommandError::StalePgEpoch { .. }
                | CommandError::VolumeBusy { .. }
                | CommandError::LastReplica { .. }
                | CommandError::ReplicaNotOut { .. }
                | CommandError::NodeDown(_)
                | CommandError::NetworkUnavailable { .. }
                | CommandError::NodeNotDown(_)
                | CommandError::NodeNotDrained(_)
                | CommandError::NodeInUse { .. }
                | CommandError::JoinRefused { .. }
                | CommandError::VmMovedOn { .. }
                | CommandError::VolumeOfVmElsewhere { .. } => Conflict,
                CommandError::InvalidPlacement { .. }
                | CommandError::InvalidSize(_)
                | CommandError::InvalidReplicas(_)
                | CommandError::InvalidVm(_)
                | CommandError::InvalidInput(_) => Invalid,
            },
            ClusterError::Database { .. } | ClusterError::Io { .. } | ClusterError::Raft(_) => Internal,
        }
    }
}
