//! The QEMU command line for a VM: a pure function of its spec and the node's paths.

use model::{Accel, VmSpec};
use std::ffi::OsString;
use std::path::PathBuf;

/// Where a VM's runtime files live on the node running it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPaths {
    pub qmp_socket: PathBuf,
    pub console_socket: PathBuf,
    pub console_log: PathBuf,
    /// One vhost-user socket per disk, in the spec's order.
    pub disk_sockets: Vec<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub uefi: Option<UefiPaths>,
    /// The ISO image attached as a CD-ROM.
    pub cdrom: Option<PathBuf>,
    /// One tap per NIC, in the spec's order.
    pub nics: Vec<NicFds>,
}

/// A NIC's tap as QEMU inherits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicFds {
    pub tap: i32,
    /// `/dev/vhost-net`, where the host has it.
    pub vhost: Option<i32>,
    /// Told to the guest when its network carries less than an Ethernet frame (an
    /// overlay): a guest that sent 1500 bytes would see them dropped without a word.
    pub mtu: Option<u32>,
}

/// The two flash chips of a UEFI VM: the firmware (read-only) and its variable store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UefiPaths {
    pub code: PathBuf,
    pub vars: PathBuf,
}

/// Queues per disk: one per vCPU, up to this many.
pub const DISK_QUEUES_MAX: u16 = 4;

pub fn qemu_args(spec: &VmSpec, paths: &VmPaths, accel: Accel) -> Vec<OsString> {
    assert_eq!(paths.disk_sockets.len(), spec.attached().len(), "one socket per disk");
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
    let memory_mib = spec.memory_bytes >> 20;
    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none"]);
    assert_eq!(paths.nics.len(), spec.nics.len(), "one tap per NIC");
    if spec.nics.is_empty() {
        push(&["-nic", "none"]);
    }
    for (index, (nic, fds)) in spec.nics.iter().zip(&paths.nics).enumerate() {
        let vhost = fds.vhost.map(|fd| format!(",vhost=on,vhostfd={fd}")).unwrap_or_default();
        push(&["-netdev", &format!("tap,id=nic{index},fd={}{vhost}", fds.tap)]);
        let mtu = fds.mtu.map(|mtu| format!(",host_mtu={mtu}")).unwrap_or_default();
        // No option ROM: the firmware has its own virtio-net driver.
        push(&["-device", &format!("virtio-net-pci,netdev=nic{index},mac={}{mtu},romfile=", nic.mac)]);
    }
    // Guest RAM is a shared memfd: the vhost-user backend maps it and serves the
    // virtqueues straight from it.
    push(&["-object", &format!("memory-backend-memfd,id=ram,size={memory_mib}M,share=on")]);
    match accel {
        Accel::Kvm => push(&["-machine", "q35,memory-backend=ram", "-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-machine", "q35,memory-backend=ram", "-accel", "tcg", "-cpu", "max"]),
    }
    push(&["-m", &format!("{memory_mib}M"), "-smp", &spec.cpus.to_string()]);
    if let Some(uefi) = &paths.uefi {
        let code = format!("if=pflash,format=raw,unit=0,readonly=on,file={}", uefi.code.display());
        let vars = format!("if=pflash,format=raw,unit=1,file={}", uefi.vars.display());
        push(&["-drive", &code, "-drive", &vars]);
    }
    let queues = spec.cpus.clamp(1, DISK_QUEUES_MAX);
    for (index, socket) in paths.disk_sockets.iter().enumerate() {
        push(&["-chardev", &format!("socket,id=disk{index},path={}", socket.display())]);
        let boot = if index == 0 { ",bootindex=1" } else { "" };
        push(&["-device", &format!("vhost-user-blk-pci,chardev=disk{index},num-queues={queues}{boot}")]);
    }
    if let (Some(kernel), model::Boot::Kernel { cmdline, .. }) = (&paths.kernel, &spec.boot) {
        push(&["-kernel", &kernel.display().to_string(), "-append", cmdline]);
        if let Some(initrd) = &paths.initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
    }
    if let Some(iso) = &paths.cdrom {
        // On q35's own AHCI controller, booted before the disks (an installer).
        let drive = format!("if=none,id=cdrom,media=cdrom,readonly=on,format=raw,file={}", iso.display());
        push(&["-drive", &drive, "-device", "ide-cd,drive=cdrom,bus=ide.0,bootindex=0"]);
    }
    let console = format!(
        "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
        paths.console_socket.display(),
        paths.console_log.display()
    );
    push(&["-chardev", &console, "-serial", "chardev:console"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", paths.qmp_socket.display())]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Boot, BootFile, VolumeId};

    fn spec(cpus: u16, disks: usize, boot: Boot) -> VmSpec {
        VmSpec {
            name: "web".into(),
            cpus,
            memory_bytes: 512 << 20,
            disks: (0..disks as u64).map(VolumeId).collect(),
            boot,
            ha: Default::default(),
            seed: None,
            cdrom: None,
            nics: vec![],
        }
    }

    fn paths(disks: usize, kernel: bool) -> VmPaths {
        VmPaths {
            qmp_socket: "/run/vm/qmp.sock".into(),
            console_socket: "/run/vm/console.sock".into(),
            console_log: "/run/vm/console.log".into(),
            disk_sockets: (0..disks).map(|i| PathBuf::from(format!("/run/vm/disk{i}.sock"))).collect(),
            kernel: kernel.then(|| "/run/vm/kernel".into()),
            initrd: kernel.then(|| "/run/vm/initrd".into()),
            uefi: None,
            cdrom: None,
            nics: vec![],
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn guest_ram_is_a_shared_memfd_for_the_vhost_user_backend() {
        let line = joined(&qemu_args(&spec(2, 1, Boot::Disk), &paths(1, false), Accel::Tcg));
        assert!(line.contains("-object memory-backend-memfd,id=ram,size=512M,share=on"), "{line}");
        assert!(line.contains("-machine q35,memory-backend=ram -accel tcg"), "{line}");
    }

    #[test]
    fn each_disk_is_a_vhost_user_blk_device_with_a_queue_per_vcpu() {
        let line = joined(&qemu_args(&spec(2, 2, Boot::Disk), &paths(2, false), Accel::Kvm));
        assert!(line.contains("-device vhost-user-blk-pci,chardev=disk0,num-queues=2,bootindex=1"), "{line}");
        assert!(line.contains("-device vhost-user-blk-pci,chardev=disk1,num-queues=2 "), "{line}");
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
    }

    #[test]
    fn kernel_boot_passes_kernel_initrd_and_cmdline() {
        let file = BootFile { volume: VolumeId(9), len_bytes: 1 };
        let boot = Boot::Kernel { kernel: file, initrd: Some(file), cmdline: "console=ttyS0 root=/dev/vda".into() };
        let args = qemu_args(&spec(1, 1, boot), &paths(1, true), Accel::Tcg);
        let line = joined(&args);
        assert!(
            line.contains("-kernel /run/vm/kernel -append console=ttyS0 root=/dev/vda -initrd /run/vm/initrd"),
            "{line}"
        );
    }

    #[test]
    fn a_uefi_vm_has_the_firmware_read_only_and_its_own_variable_store() {
        let mut paths = paths(1, false);
        paths.uefi = Some(UefiPaths { code: "/fw/CODE.fd".into(), vars: "/run/vm/uefi-vars.fd".into() });
        let line = joined(&qemu_args(&spec(1, 1, Boot::Uefi { vars: VolumeId(9) }), &paths, Accel::Tcg));
        assert!(line.contains("-drive if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd"), "{line}");
        assert!(line.contains("-drive if=pflash,format=raw,unit=1,file=/run/vm/uefi-vars.fd"), "{line}");
        let bios = joined(&qemu_args(&spec(1, 1, Boot::Disk), &super::tests::paths(1, false), Accel::Tcg));
        assert!(!bios.contains("pflash"), "{bios}");
    }

    #[test]
    fn each_nic_is_a_virtio_net_on_its_inherited_tap_with_its_own_mac() {
        let mut spec = spec(1, 1, Boot::Disk);
        let network = model::NetworkId(0);
        spec.nics = vec![
            model::Nic { network, mac: "52:54:00:00:00:01".parse().unwrap() },
            model::Nic { network, mac: "52:54:00:00:00:02".parse().unwrap() },
        ];
        let mut paths = paths(1, false);
        paths.nics =
            vec![NicFds { tap: 30, vhost: Some(31), mtu: None }, NicFds { tap: 32, vhost: None, mtu: Some(1450) }];
        let line = joined(&qemu_args(&spec, &paths, Accel::Tcg));
        assert!(line.contains("-netdev tap,id=nic0,fd=30,vhost=on,vhostfd=31 "), "{line}");
        assert!(line.contains("-device virtio-net-pci,netdev=nic0,mac=52:54:00:00:00:01,romfile= "), "{line}");
        assert!(line.contains("-netdev tap,id=nic1,fd=32 "), "{line}");
        assert!(
            line.contains("-device virtio-net-pci,netdev=nic1,mac=52:54:00:00:00:02,host_mtu=1450,romfile= "),
            "{line}"
        );
        assert!(!line.contains("-nic none"), "{line}");
        let without =
            joined(&qemu_args(&super::tests::spec(1, 1, Boot::Disk), &super::tests::paths(1, false), Accel::Tcg));
        assert!(without.contains("-nic none"), "{without}");
    }

    #[test]
    fn an_iso_is_a_read_only_cd_rom_booted_before_the_disks() {
        let mut paths = paths(1, false);
        paths.cdrom = Some("/run/vm/cdrom.iso".into());
        let line = joined(&qemu_args(&spec(1, 1, Boot::Uefi { vars: VolumeId(9) }), &paths, Accel::Tcg));
        assert!(
            line.contains("-drive if=none,id=cdrom,media=cdrom,readonly=on,format=raw,file=/run/vm/cdrom.iso"),
            "{line}"
        );
        assert!(line.contains("-device ide-cd,drive=cdrom,bus=ide.0,bootindex=0"), "{line}");
    }
}
