//! Membership, the Raft log (openraft) and its state machine storage (redb), proposing
//! commands, and publishing read-only snapshots of the cluster state.
//!
//! Never touches guest data, QEMU or HTTP: the transport between nodes is a trait that the
//! composition root implements.

mod cluster;
mod error;
mod liveness;
mod network;
mod status;
mod storage;
pub mod tokens;
mod types;
mod vms;

pub use cluster::{Cluster, ClusterConfig, PEER_REQUEST_BYTES_MAX, SNAPSHOT_BYTES_MAX};
pub use error::{ClusterError, ClusterErrorKind};
pub use liveness::{DOWN_AFTER_DEFAULT, DOWN_AFTER_MIN, PING_INTERVAL};
pub use network::{PeerTransport, TransportError};
pub use status::{ClusterStatus, DiskStatus, NodeStatus};
pub use types::{Certified, PeerReply, PeerRpc, RemoteRefusal, SnapshotTransfer};
