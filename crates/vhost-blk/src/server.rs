//! Serving one device on a unix socket for one QEMU connection.

use crate::device::{BlkDevice, DiskTarget, GuestMemory};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("Listening on vhost-user socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("Setting up the vhost-user device for {path}")]
    Device {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Starting the vhost-user daemon for {path}: {reason}")]
    Daemon { path: PathBuf, reason: String },
}

/// A device listening on its socket. The socket exists once this is made, so QEMU can be
/// started right after. Dropping it after QEMU has gone ends the device.
pub struct DiskServer {
    socket: PathBuf,
    connected: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskServer {
    pub fn start(socket: &Path, target: DiskTarget, runtime: tokio::runtime::Handle) -> Result<Self, VhostError> {
        let mut listener =
            Listener::new(socket, true).map_err(|source| VhostError::Listen { path: socket.into(), source })?;
        let mem = GuestMemory::new(GuestMemoryMmap::new());
        let device = BlkDevice::new(target, mem.clone(), runtime)
            .map_err(|source| VhostError::Device { path: socket.into(), source })?;
        let volume = device_name(socket);
        let mut daemon = VhostUserDaemon::new(volume.clone(), Arc::new(device), mem)
            .map_err(|e| VhostError::Daemon { path: socket.into(), reason: e.to_string() })?;
        let connected = Arc::new(AtomicBool::new(false));
        let flag = connected.clone();
        let path = socket.to_path_buf();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{volume}"))
            .spawn(move || {
                // One connection per device: a QEMU that reconnects gets a new device.
                if let Err(e) = daemon.start(&mut listener) {
                    tracing::warn!(socket = %path.display(), error = %e, "vhost-user accept failed");
                    return;
                }
                flag.store(true, Ordering::Release);
                match daemon.wait() {
                    Ok(()) => {}
                    // A normal QEMU exit shows as a disconnect.
                    Err(e) => tracing::debug!(socket = %path.display(), error = %e, "vhost-user frontend left"),
                }
                for handler in daemon.get_epoll_handlers() {
                    handler.send_exit_event();
                }
                drop(listener);
            })
            .map_err(|source| VhostError::Device { path: socket.into(), source })?;
        Ok(DiskServer { socket: socket.into(), connected, thread: Some(thread) })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for DiskServer {
    fn drop(&mut self) {
        if !self.connected.load(Ordering::Acquire) {
            // QEMU never connected: connect once ourselves so the accept returns.
            let _ = UnixStream::connect(&self.socket);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn device_name(socket: &Path) -> String {
    socket.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "disk".into())
}
