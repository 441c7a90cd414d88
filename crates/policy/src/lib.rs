//! Replica placement and balancing, as pure functions of the cluster's disks.
//!
//! Nothing here does IO, reads a clock or draws a random number.

mod address;
mod placement;
mod vm_placement;

pub use address::{check_advertised, AddressError};
pub use placement::{min_size, place_pool, pool_name, rebalance, CandidateDisk, PlacementError};
pub use vm_placement::choose_vm_node;
