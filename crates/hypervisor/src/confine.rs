//! Keeping a guest's QEMU in its place (docs/threat-model.md): it runs as an unprivileged
//! user of its own (`converge-qemu`, made by scripts/setup.sh), under QEMU's seccomp
//! sandbox, in a cgroup that bounds its memory and CPU; the files it needs (its VM
//! directory, its disks' vhost-user sockets) are that user's alone.

use std::path::{Path, PathBuf};

/// The user QEMU runs as when the daemon runs as root.
pub const QEMU_USER: &str = "converge-qemu";

/// Memory a QEMU may use beyond its guest's RAM (device state, TCG's translation cache).
const OVERHEAD_BYTES: u64 = 1 << 30;

/// The unprivileged user, if the daemon can switch to it.
#[derive(Clone, Debug)]
pub struct QemuUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Its supplementary groups (`kvm`, for /dev/kvm).
    pub groups: Vec<u32>,
}

impl QemuUser {
    /// `QEMU_USER` from /etc/passwd, when this process is root (only root can switch).
    pub fn find() -> Option<Self> {
        if effective_uid() != Some(0) {
            return None;
        }
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        let (uid, gid) = passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 || fields[0] != QEMU_USER {
                return None;
            }
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        })?;
        // group:x:gid:member,member
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let mut groups: Vec<u32> = groups
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                let member = fields.get(3)?.split(',').any(|m| m == QEMU_USER);
                member.then(|| fields.get(2)?.parse().ok()).flatten()
            })
            .collect();
        groups.push(gid);
        Some(QemuUser { name: QEMU_USER.to_string(), uid, gid, groups })
    }

    /// Whether this user may open `device` for reading and writing, by its mode, owner and
    /// group (QEMU opens /dev/kvm as this user).
    pub fn may_open(&self, device: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(device) else { return false };
        let mode = meta.mode();
        (meta.uid() == self.uid && mode & 0o600 == 0o600)
            || (self.groups.contains(&meta.gid()) && mode & 0o060 == 0o060)
            || mode & 0o006 == 0o006
    }

    /// How the spawned QEMU becomes this user.
    pub fn run_as(&self) -> crate::process::RunAs {
        crate::process::RunAs { uid: self.uid, gid: self.gid, groups: self.groups.clone() }
    }

    /// Makes `path` this user's, readable and writable by it alone. A symbolic link is
    /// refused: every QEMU runs as this user, so one a guest broke out of could put a link
    /// in a VM directory to have root hand it a host file.
    pub fn give(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::symlink_metadata(path)?.file_type().is_symlink() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a symbolic link, not converge's own file",
            ));
        }
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }

    /// Makes the open file `file` this user's.
    pub fn give_file(&self, file: &std::fs::File) -> std::io::Result<()> {
        std::os::unix::fs::fchown(file, Some(self.uid), Some(self.gid))
    }
}

/// Where VMs' runtime files (sockets, console log, UEFI variables) live: `preferred` (the
/// data dir's `vms`) when guests run as `QEMU_USER` and every directory above it lets that
/// user through; else a directory of this data dir's own under `/run/converge`, root's and
/// passable, so a data dir under a private directory (`/root/...`) still runs guests
/// confined.
pub fn vm_dir(preferred: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if QemuUser::find().is_none() {
        return preferred.to_path_buf();
    }
    let passable = preferred
        .ancestors()
        .skip(1)
        .filter_map(|dir| std::fs::metadata(dir).ok())
        .all(|meta| meta.permissions().mode() & 0o001 != 0);
    if passable {
        return preferred.to_path_buf();
    }
    // FNV-1a of the path: short enough for socket paths (108 bytes), the same at every start.
    let hash = preferred
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    let dir = PathBuf::from(format!("/run/converge/vms-{hash:016x}"));
    tracing::info!(
        data = %preferred.display(),
        vms = %dir.display(),
        "a directory above the data dir does not let the guests' user through: VMs' runtime files go elsewhere"
    );
    dir
}

/// Creates `path` anew (mode 0600), never through whatever is there now: a file a QEMU
/// left, or a link it put in its place, is removed first, and the new file is made
/// exclusively.
pub fn create_fresh(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

/// QEMU's own arguments for confinement: its seccomp sandbox (no obsolete system calls, no
/// changing user or group, no spawning processes, no changing its own resource limits or
/// scheduling). The user it runs as is set before it starts (`process::spawn`), so QEMU
/// itself never needs to change it.
pub fn qemu_args() -> Vec<String> {
    vec!["-sandbox".to_string(), "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".to_string()]
}

/// A VM's cgroup: its memory and CPU bounds. Removed when dropped.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates the cgroup for `name` with room for `memory_bytes` of guest RAM (plus
    /// QEMU's own) and `cpus` CPUs, and puts `pid` in it. cgroup v2 where the system has
    /// it, else v1's memory and cpu controllers.
    pub fn place(name: &str, pid: u32, memory_bytes: u64, cpus: u16) -> std::io::Result<Self> {
        let root = Path::new("/sys/fs/cgroup");
        let limit = memory_bytes + OVERHEAD_BYTES;
        let period = 100_000u64;
        let quota = period * u64::from(cpus.max(1));
        let mut made = Cgroup { dirs: Vec::new() };
        if root.join("cgroup.controllers").exists() {
            let parent = root.join("converge");
            std::fs::create_dir_all(&parent)?;
            // Controllers must be delegated to the parent for its children to use them.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu");
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu");
            let dir = made.make(&parent.join(name))?;
            std::fs::write(dir.join("memory.max"), limit.to_string())?;
            std::fs::write(dir.join("cpu.max"), format!("{quota} {period}"))?;
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        } else {
            let memory = made.make(&root.join("memory/converge").join(name))?;
            std::fs::write(memory.join("memory.limit_in_bytes"), limit.to_string())?;
            std::fs::write(memory.join("cgroup.procs"), pid.to_string())?;
            let cpu = made.make(&root.join("cpu/converge").join(name))?;
            std::fs::write(cpu.join("cpu.cfs_period_us"), period.to_string())?;
            std::fs::write(cpu.join("cpu.cfs_quota_us"), quota.to_string())?;
            std::fs::write(cpu.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(made)
    }

    fn make(&mut self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        self.dirs.push(dir.to_path_buf());
        Ok(dir.to_path_buf())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Empty once its QEMU exited; a cgroup with processes left in it stays.
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find(|l| l.starts_with("Uid:"))?.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod vm_dir_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn runtime_files_leave_a_data_dir_the_guests_user_cannot_reach() {
        let outer = tempfile::tempdir().unwrap();
        let private = outer.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let open = outer.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

        let behind = private.join("data/vms");
        let reachable = open.join("data/vms");
        if QemuUser::find().is_none() {
            // Not root, or no guests' user: QEMU runs as the daemon's own user, anywhere.
            assert_eq!(vm_dir(&behind), behind);
            return;
        }
        let moved = vm_dir(&behind);
        assert!(
            moved.to_string_lossy().starts_with("/run/converge/vms-") && moved.as_os_str().len() < 40,
            "{}",
            moved.display()
        );
        assert_eq!(vm_dir(&behind), moved, "the same place at every start");
        assert_eq!(vm_dir(&reachable), reachable);
    }
}
