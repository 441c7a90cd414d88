//! Spawning QEMU so that it cannot outlive the node daemon that serves its disks.
#![allow(unsafe_code)]

use std::process::Stdio;
use tokio::process::{Child, Command};

/// Who a spawned QEMU runs as: set in the child before it runs QEMU.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (`kvm`, where the user is in it).
    pub groups: Vec<u32>,
}

/// Spawns `program` with `args`, output to `log`, as `run_as` if given, with the file
/// descriptors `inherit` open in it under the same numbers (taps for its NICs), killed if
/// the spawning thread's process dies: a QEMU whose vhost-user backend is gone can do no IO,
/// and an orphan would keep the guest's memory and the old owner epoch alive.
///
/// The user is switched here, not by QEMU's `-runas`: the kernel clears the parent-death
/// signal whenever a process changes its user, so it is set after the switch.
pub fn spawn(
    program: &str,
    args: &[std::ffi::OsString],
    log: std::fs::File,
    run_as: Option<RunAs>,
    inherit: Vec<std::os::fd::RawFd>,
) -> std::io::Result<Child> {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // async-signal-safe functions (fcntl, setgroups, setgid, setuid, prctl, getppid) on
    // memory prepared before the fork (`run_as` and `inherit`, moved in) and shared with
    // nothing. The descriptors in `inherit` are the caller's, open until `spawn` returns.
    unsafe {
        command.pre_exec(move || {
            let check = |result: libc::c_int| if result == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
            // Opened close-on-exec (so no other child gets them); kept open in this one.
            for &fd in &inherit {
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
            }
            if let Some(user) = &run_as {
                check(libc::setgroups(user.groups.len(), user.groups.as_ptr()))?;
                check(libc::setgid(user.gid))?;
                check(libc::setuid(user.uid))?;
            }
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            // The daemon died before the signal was armed: nothing would end this QEMU.
            if libc::getppid() != parent {
                // (No allocation between fork and exec: the error is a bare errno.)
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}
