//! Spawning QEMU so that it cannot outlive the node daemon that serves its disks.
#![allow(unsafe_code)]

use std::process::Stdio;
use tokio::process::{Child, Command};

/// Spawns `program` with `args`, output to `log`, killed if the spawning thread's process
/// dies: a QEMU whose vhost-user backend is gone can do no IO, and an orphan would keep
/// the guest's memory and the old owner epoch alive.
pub fn spawn(program: &str, args: &[std::ffi::OsString], log: std::fs::File) -> std::io::Result<Child> {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // async-signal-safe functions (prctl, getppid) on no shared state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}
