use crate::format::FormatError;
use model::{ClusterId, DiskId, ExtentIndex, VolumeId};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path} does not exist: give a block device, or --size to create a file standing in for one")]
    NotFound { path: PathBuf },
    #[error(
        "{path} exists with {actual_bytes} bytes, not the {requested_bytes} asked for: omit --size to use it as it is"
    )]
    SizeMismatch { path: PathBuf, actual_bytes: u64, requested_bytes: u64 },
    #[error("{path} cannot be used as a converge disk: {reason}")]
    Format {
        path: PathBuf,
        #[source]
        reason: FormatError,
    },
    #[error(
        "{path} already holds converge disk {disk} of cluster {cluster}; converge will not overwrite it \
         (add --force if that disk is no longer used)"
    )]
    AlreadyFormatted { path: PathBuf, disk: DiskId, cluster: ClusterId },
    #[error("{path} holds {what}; converge will not overwrite it (add --force if its contents can be lost)")]
    HoldsData { path: PathBuf, what: &'static str },
    #[error("{path} is in use ({what}); converge will not take it, even with --force")]
    InUse { path: PathBuf, what: String },
    #[error("{path} holds disk {found}, but disk {expected} was expected there")]
    WrongDisk { path: PathBuf, expected: DiskId, found: DiskId },
    #[error("Disk {disk} is full: all {slots} extents are in use; add a disk or delete volumes")]
    Full { disk: DiskId, slots: u64 },
    #[error("Request on disk {disk} for extent {extent} of {volume} at {offset_bytes}+{len_bytes} is not sector-aligned or crosses the extent's end")]
    BadRange { disk: DiskId, volume: VolumeId, extent: ExtentIndex, offset_bytes: u64, len_bytes: u64 },
    #[error("{op} on {path} at offset {offset_bytes}")]
    Io {
        path: PathBuf,
        op: &'static str,
        offset_bytes: u64,
        #[source]
        source: std::io::Error,
    },
}

/// What a caller can do about a `StoreError`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The request itself is wrong; retrying it elsewhere will not help.
    InvalidRequest,
    /// The disk has no room.
    Full,
    /// The device failed or is not usable; another replica may serve the request.
    Device,
}

impl StoreError {
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::BadRange { .. } => StoreErrorKind::InvalidRequest,
            StoreError::Full { .. } => StoreErrorKind::Full,
            _ => StoreErrorKind::Device,
        }
    }
}
