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

    /// Makes `path` this user's, readable and writable by it alone.
    pub fn give(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
}

/// QEMU's own arguments for confinement: its seccomp sandbox (no obsolete system calls, no
/// spawning processes, no changing its own resource limits or scheduling). The user it runs
/// as is set when it is spawned (`process::spawn`).
pub fn qemu_args() -> Vec<String> {
    vec!["-sandbox".to_string(), "on,obsolete=deny,spawn=deny,resourcecontrol=deny".to_string()]
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
