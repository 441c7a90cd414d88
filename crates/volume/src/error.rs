use crate::wire::{Status, WireError};
use model::{DiskId, ExtentIndex, NodeId, OwnerEpoch, VolumeId};

/// Why one replica did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("it answered {status:?}: {message}")]
    Refused { status: Status, message: String },
    #[error("the local replica's task failed: {reason}")]
    Local { reason: String },
    #[error("the local replica on {disk} did not answer within {timeout_ms} ms")]
    LocalTimeout { disk: DiskId, timeout_ms: u64 },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the connection to {addr} was lost")]
    ConnectionLost { addr: String },
    #[error("no answer from {addr} within {timeout_ms} ms")]
    Timeout { addr: String, timeout_ms: u64 },
    #[error("{addr} broke the protocol")]
    Protocol {
        addr: String,
        #[source]
        source: WireError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("Volume {0} does not exist (deleted?)")]
    UnknownVolume(VolumeId),
    #[error(
        "IO at {offset_bytes}+{len_bytes} is outside volume {volume} of {size_bytes} bytes, or not sector-aligned"
    )]
    OutOfRange { volume: VolumeId, offset_bytes: u64, len_bytes: u64, size_bytes: u64 },
    #[error("Volume {volume} has moved to a newer owner (epoch {current} > {sent}); this node may no longer write it")]
    Fenced { volume: VolumeId, sent: OwnerEpoch, current: OwnerEpoch },
    #[error("Replica of {extent} of {volume} on {disk} ({node}) failed")]
    Replica {
        volume: VolumeId,
        extent: ExtentIndex,
        disk: DiskId,
        node: NodeId,
        #[source]
        source: ReplicaError,
    },
    #[error(
        "IO to {extent} of {volume} gave up after {waited_ms} ms: {problem}; check `converge cluster status` for nodes and disks that are down"
    )]
    Unavailable { volume: VolumeId, extent: ExtentIndex, waited_ms: u64, problem: String },
    #[error(
        "Writes to {volume} stopped after a write whose outcome is unknown: open the volume again (restart the VM) so its replicas are made identical"
    )]
    WriterStopped { volume: VolumeId },
    #[error("No replica of {extent} of {volume} could be read; last error from {disk} ({node})")]
    NoReplicaReadable {
        volume: VolumeId,
        extent: ExtentIndex,
        disk: DiskId,
        node: NodeId,
        #[source]
        source: ReplicaError,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeErrorKind {
    /// The request is wrong (range, unknown volume).
    Invalid,
    /// Another owner holds the volume now.
    Fenced,
    /// A replica is down or failing; the data is safe elsewhere or the write was not acked.
    Unavailable,
}

impl VolumeError {
    pub fn kind(&self) -> VolumeErrorKind {
        match self {
            VolumeError::UnknownVolume(_) | VolumeError::OutOfRange { .. } => VolumeErrorKind::Invalid,
            VolumeError::Fenced { .. } => VolumeErrorKind::Fenced,
            VolumeError::Replica { .. }
            | VolumeError::NoReplicaReadable { .. }
            | VolumeError::Unavailable { .. }
            | VolumeError::WriterStopped { .. } => VolumeErrorKind::Unavailable,
        }
    }
}
