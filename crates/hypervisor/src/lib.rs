//! QEMU processes and QMP, and the node's reconcile loop from desired to actual VM state.
//!
//! Never touches guest data or vhost internals: disks arrive as vhost-user sockets from
//! the `Host` the composition root provides.

mod plan;
mod qemu_args;

pub use plan::{plan, Action, LocalPhase};
pub use qemu_args::{qemu_args, VmPaths, DISK_QUEUES_MAX};

/// The serial console log of `vm` under the node's VM directory.
pub fn console_log(vm_dir: &std::path::Path, vm: model::VmId) -> std::path::PathBuf {
    vm_dir.join(vm.to_string()).join("console.log")
}
