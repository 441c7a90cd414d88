//! The block engine: a volume's IO split by extent and sent to every replica of the
//! extent's placement group in parallel; owner epochs and fencing; the replica server and
//! the node-to-node wire protocol.
//!
//! Never looks at guest memory layout or Raft internals: the cluster reaches it through
//! the `Topology` trait, which the composition root implements.

mod client;
mod engine;
mod error;
mod gc;
mod overlap;
mod replica;
mod server;
mod topology;
pub mod wire;

pub use engine::{Engine, VolumeWriter, WRITES_IN_FLIGHT_MAX};
pub use error::{ReplicaError, VolumeError, VolumeErrorKind};
pub use gc::collect_garbage;
pub use overlap::{OverlapQueue, WriteId};
pub use replica::{ReplicaService, Reply};
pub use server::serve;
pub use topology::{replicas_of, Replica, ReplicaSet, Topology};
