//! QEMU processes and QMP, and the node's reconcile loop from desired to actual VM state.
//!
//! Never touches guest data or vhost internals: disks arrive as vhost-user sockets from
//! the `Host` the composition root provides.

mod accel;
mod confine;
mod host;
mod plan;
mod process;
mod qemu_args;
mod qmp;
mod runtime;

pub use accel::detect_accel;
pub use confine::{QemuUser, QEMU_USER};
pub use host::{AttachedDisk, Host, HostError};
pub use plan::{plan, Action, LocalPhase};
pub use qemu_args::{qemu_args, VmPaths, DISK_QUEUES_MAX};
pub use runtime::{Hypervisor, POWERDOWN_TIMEOUT};

/// The serial console log of `vm` under the node's VM directory.
pub fn console_log(vm_dir: &std::path::Path, vm: model::VmId) -> std::path::PathBuf {
    vm_dir.join(vm.to_string()).join("console.log")
}
