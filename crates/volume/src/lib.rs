//! The block engine: a volume's IO split by extent and sent to every replica of the
//! extent's placement group in parallel; owner epochs and fencing; the replica server and
//! the node-to-node wire protocol.
//!
//! Never looks at guest memory layout or Raft internals: the cluster reaches it through
//! the `Topology` trait, which the composition root implements.

mod active;
pub mod admission;
mod client;
mod dirty;
mod engine;
mod error;
mod gc;
mod overlap;
mod replica;
mod resync;
mod server;
mod topology;
pub mod verdict;
pub mod wire;

pub use active::{ActiveError, ActiveLog};
pub use client::{PeerPool, ReadTarget};
pub use dirty::{DirtyError, DirtyExtent, DirtyLog};
pub use engine::{
    Engine, EngineConfig, Reconciled, VolumeWriter, IO_WAIT_MAX, REPLICA_TIMEOUT_DEFAULT, WRITES_IN_FLIGHT_MAX,
};
pub use error::{ReplicaError, VolumeError, VolumeErrorKind};
pub use gc::collect_garbage;
pub use overlap::{OverlapQueue, WriteId};
pub use replica::{ReplicaService, Reply};
pub use resync::{resync_loop, ResyncStats};
pub use server::{serve, serve_with, Admitted, ConnectionSlot, DataLimits, DataServer};
pub use topology::{
    pg_change_outcome, replicas_of, PgChange, PgChangeError, Replica, ReplicaSet, StateTopology, Topology,
};
