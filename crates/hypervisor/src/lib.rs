//! QEMU processes and QMP, and the node's reconcile loop from desired to actual VM state.
//!
//! Never touches guest data or vhost internals: disks arrive as vhost-user sockets from
//! the `Host` the composition root provides.

mod plan;
mod qemu_args;

pub use plan::{plan, Action, LocalPhase};
pub use qemu_args::{qemu_args, VmPaths, DISK_QUEUES_MAX};
