//! Replica placement and balancing, and where VMs go when nodes fail or drain: pure
//! functions of the cluster state.
//!
//! Nothing here does IO, reads a clock or draws a random number.

mod address;
mod ha;
mod placement;
mod vm_placement;

pub use address::{check_advertised, AddressError};
pub use ha::{drain_plan, failover_plan, finish_moves, node_check, Move, Placement, Unplaced};
pub use placement::{min_size, place_pool, pool_name, rebalance, CandidateDisk, PlacementError};
pub use vm_placement::choose_vm_node;
