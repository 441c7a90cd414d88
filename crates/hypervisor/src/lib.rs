//! QEMU processes and QMP, and the node's reconcile loop from desired to actual VM state.
//!
//! Never touches guest data or vhost internals: disks arrive as vhost-user sockets from
//! the `Host` the composition root provides.

mod accel;
mod confine;
mod firmware;
mod host;
mod net;
mod plan;
mod process;
mod qemu_args;
mod qmp;
mod runtime;

pub use accel::detect_accel;
pub use confine::{create_fresh, vm_dir, QemuUser, QEMU_USER};
pub use firmware::{OVMF_CODE, OVMF_VARS, VARS_SYNC};
pub use host::{AttachedDisk, AttachedVars, Host, HostError, VarsVolume};
pub use net::{HostNetworks, NetError};
pub use plan::{plan, Action, LocalPhase};
pub use qemu_args::{qemu_args, NicFds, UefiPaths, VmPaths, DISK_QUEUES_MAX};
pub use runtime::{Hypervisor, POWERDOWN_TIMEOUT};

/// The serial console log of `vm` under the node's VM directory.
pub fn console_log(vm_dir: &std::path::Path, vm: model::VmId) -> std::path::PathBuf {
    vm_dir.join(vm.to_string()).join("console.log")
}
