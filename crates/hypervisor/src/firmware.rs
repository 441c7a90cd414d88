//! UEFI firmware (OVMF, from Debian's `ovmf` package) and each VM's variable store. The
//! store lives in a volume of the VM's own; while the VM runs, QEMU has it as a file (its
//! second flash chip), and whatever the firmware changes there (a boot entry, the boot
//! order, a variable the guest set) is written back to the volume within `VARS_SYNC`, and
//! once more when QEMU ends. So the VM boots the same way on whichever node starts it next.

use crate::host::{HostError, VarsVolume};
use model::UEFI_VARS_BYTES;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The firmware's code, read-only and shared by every VM.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// An empty variable store: what a VM's store starts as.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// How often a running VM's store is compared with what its volume holds.
pub const VARS_SYNC: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("The UEFI firmware {path} is missing on this node: install the ovmf package")]
    Missing {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has {len} bytes, not the {UEFI_VARS_BYTES} of the 4 MiB OVMF builds whose variables converge keeps"
    )]
    WrongSize { path: &'static str, len: u64 },
}

/// The firmware's code, checked to be there.
pub fn code() -> Result<PathBuf, FirmwareError> {
    std::fs::metadata(OVMF_CODE).map_err(|source| FirmwareError::Missing { path: OVMF_CODE, source })?;
    Ok(PathBuf::from(OVMF_CODE))
}

/// The store a VM starts with: what its volume holds, or OVMF's empty store on its first
/// boot (a volume never written reads as zeros, which no store is).
pub fn initial_vars(kept: Vec<u8>) -> Result<Vec<u8>, FirmwareError> {
    if kept.iter().any(|b| *b != 0) {
        return Ok(kept);
    }
    let empty = std::fs::read(OVMF_VARS).map_err(|source| FirmwareError::Missing { path: OVMF_VARS, source })?;
    if empty.len() as u64 != UEFI_VARS_BYTES {
        return Err(FirmwareError::WrongSize { path: OVMF_VARS, len: empty.len() as u64 });
    }
    Ok(empty)
}

/// Keeps a running VM's variable file and its volume the same.
pub struct VarsSync {
    path: PathBuf,
    volume: Arc<dyn VarsVolume>,
    /// What the volume holds now.
    saved: tokio::sync::Mutex<Vec<u8>>,
}

impl VarsSync {
    pub fn new(path: PathBuf, volume: Arc<dyn VarsVolume>, saved: Vec<u8>) -> Self {
        VarsSync { path, volume, saved: tokio::sync::Mutex::new(saved) }
    }

    /// The file's bytes, read as a regular file only (never through a link, never more
    /// than a store holds: QEMU, and a guest that broke out of it, can write its
    /// directory), and read again until two reads agree (QEMU may be writing it).
    fn read(&self) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let once = || -> std::io::Result<Vec<u8>> {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&self.path)?;
            if !file.metadata()?.file_type().is_file() {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"));
            }
            let mut bytes = Vec::with_capacity(UEFI_VARS_BYTES as usize);
            file.take(UEFI_VARS_BYTES + 1).read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        let mut last = once()?;
        for _ in 0..5 {
            let again = once()?;
            if again == last {
                return Ok(again);
            }
            last = again;
        }
        Err(std::io::Error::new(std::io::ErrorKind::WouldBlock, "the file kept changing under five reads"))
    }

    /// Writes the file to the volume if it changed since the last time; true if it did.
    pub async fn sync(&self) -> Result<bool, HostError> {
        let mut saved = self.saved.lock().await;
        let now = self
            .read()
            .map_err(|e| HostError::new(format!("reading the UEFI variables {}", self.path.display()), e))?;
        if now.len() as u64 != UEFI_VARS_BYTES {
            return Err(HostError {
                what: format!(
                    "the UEFI variables {} have {} bytes, not {UEFI_VARS_BYTES}",
                    self.path.display(),
                    now.len()
                ),
                source: None,
            });
        }
        if now == *saved {
            return Ok(false);
        }
        self.volume.save(&now).await?;
        *saved = now;
        Ok(true)
    }

    /// Syncs every `VARS_SYNC` until `stop` is notified (never in the middle of a write).
    pub async fn run(self: Arc<Self>, stop: Arc<tokio::sync::Notify>, vm: String) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(VARS_SYNC) => {}
                _ = stop.notified() => return,
            }
            match self.sync().await {
                Ok(true) => tracing::debug!(%vm, "saved the UEFI variables the firmware changed"),
                Ok(false) => {}
                Err(e) => tracing::warn!(%vm, error = %model::error_chain(&e), "saving the UEFI variables failed"),
            }
        }
    }
}
