//! Virtual machines in the cluster state: what to run (spec), where and whether (desired),
//! and what the node running it last reported (observed).

use crate::ids::{NodeId, VolumeId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A VM; assigned by the cluster state, never reused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(pub u64);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm-{}", self.0)
    }
}

/// Largest vCPU count a VM may ask for.
pub const VM_CPUS_MAX: u16 = 64;
/// Smallest guest memory converge starts a VM with.
pub const VM_MEMORY_MIN_BYTES: u64 = 64 << 20;
/// Largest guest memory a VM may ask for (4 TiB).
pub const VM_MEMORY_MAX_BYTES: u64 = 4 << 40;
/// VMs one cluster holds: bounds the state every node keeps and every snapshot carries.
pub const VMS_MAX: usize = 4096;
/// Disks one VM may have.
pub const VM_DISKS_MAX: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub cpus: u16,
    pub memory_bytes: u64,
    /// The VM's disks, in order: the first is `/dev/vda` in a Linux guest.
    pub disks: Vec<VolumeId>,
    pub boot: Boot,
    /// Restarted elsewhere when its node goes down (on unless asked otherwise).
    #[serde(default)]
    pub ha: crate::ha::HaPolicy,
    /// A NoCloud seed for cloud-init (a small FAT volume labelled CIDATA), attached after
    /// the disks.
    #[serde(default)]
    pub seed: Option<VolumeId>,
    /// An ISO image kept in a volume, attached as a CD-ROM and booted first (an installer).
    #[serde(default)]
    pub cdrom: Option<BootFile>,
    /// Its network cards, in order: the first is `eth0` in a Linux guest.
    #[serde(default)]
    pub nics: Vec<crate::network::Nic>,
}

impl VmSpec {
    /// The volumes QEMU gets as virtio disks, in order: the disks, then the seed.
    pub fn attached(&self) -> Vec<VolumeId> {
        self.disks.iter().copied().chain(self.seed).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    /// BIOS (SeaBIOS) boot from the first disk.
    Disk,
    /// UEFI (OVMF) boot from the first disk. The firmware's variables (boot order, boot
    /// entries) live in volume `vars`, so the VM boots the same way on any node.
    Uefi { vars: VolumeId },
    /// Direct kernel boot; the kernel and initrd are kept in volumes of their own, so any
    /// node can start the VM.
    Kernel { kernel: BootFile, initrd: Option<BootFile>, cmdline: String },
}

/// The size of the UEFI variable store converge keeps for a VM: that of the 4 MiB OVMF
/// builds (`OVMF_VARS_4M.fd`), which every node's firmware must match.
pub const UEFI_VARS_BYTES: u64 = 540_672;

/// A file kept in a volume: the volume and the file's exact length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFile {
    pub volume: VolumeId,
    pub len_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmDesired {
    Stopped,
    /// Running on `node`.
    Running {
        node: NodeId,
    },
    /// Shutting down on `from`, to run on `to` once it stopped: a move off a drained node,
    /// stop then start (until live migration exists). The guest shuts down cleanly, and its
    /// disks stay `from`'s until then, so the two never run at once.
    Moving {
        from: NodeId,
        to: NodeId,
    },
}

impl VmDesired {
    /// The node that may run the VM and write its disks now.
    pub fn node(&self) -> Option<NodeId> {
        match *self {
            VmDesired::Stopped => None,
            VmDesired::Running { node } => Some(node),
            VmDesired::Moving { from, .. } => Some(from),
        }
    }
}

/// How a VM's guest is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VmRunState {
    Stopped,
    Starting,
    Running {
        accel: Accel,
        pid: u32,
    },
    Stopping,
    /// The node could not start or keep the VM running; the reason says why.
    Failed {
        reason: String,
    },
}

/// What a node last reported about a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmObserved {
    pub node: Option<NodeId>,
    pub state: VmRunState,
}

impl Vm {
    /// Whether the VM runs, or is meant to: its disks are in use.
    pub fn is_active(&self) -> bool {
        self.desired != VmDesired::Stopped
            || !matches!(self.observed.state, VmRunState::Stopped | VmRunState::Failed { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: VmId,
    pub spec: VmSpec,
    pub desired: VmDesired,
    /// Set by a forced stop: the guest is not asked to shut down, it is ended.
    #[serde(default)]
    pub force_stop: bool,
    pub observed: VmObserved,
}

impl Vm {
    /// Volumes the VM owns: its disks, its seed, its boot files, its UEFI variables and its
    /// CD-ROM.
    pub fn volumes(&self) -> Vec<VolumeId> {
        let mut volumes = self.spec.attached();
        match &self.spec.boot {
            Boot::Kernel { kernel, initrd, .. } => {
                volumes.push(kernel.volume);
                volumes.extend(initrd.map(|i| i.volume));
            }
            Boot::Uefi { vars } => volumes.push(*vars),
            Boot::Disk => {}
        }
        volumes.extend(self.spec.cdrom.map(|c| c.volume));
        volumes
    }
}
