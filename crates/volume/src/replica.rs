//! A replica's side of every request, whether it came over the wire or from the engine on
//! the same node: the epoch and placement checks, then the local disk.

use crate::topology::Topology;
use crate::wire::{Op, Request, Status, MESSAGE_MAX_BYTES};
use model::{ClusterState, OwnerEpoch, VolumeId};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use store::{AlignedBuf, DiskSet, IoMemory, StoreError, StoreErrorKind};

/// How long a replica waits to learn an owner epoch newer than the one it knows: the new
/// owner committed it through Raft before writing, so this node applies it shortly.
pub const EPOCH_WAIT: Duration = Duration::from_secs(5);

/// A replica's answer.
#[derive(Debug)]
pub struct Reply {
    pub status: Status,
    /// The replica's current epoch for `StaleOwnerEpoch` and `StalePgEpoch`.
    pub epoch: u64,
    /// Data of a successful read.
    pub data: Option<AlignedBuf>,
    pub message: String,
}

impl Reply {
    fn ok(data: Option<AlignedBuf>) -> Self {
        Reply { status: Status::Ok, epoch: 0, data, message: String::new() }
    }

    fn refuse(status: Status, epoch: u64, message: String) -> Self {
        let mut message = message;
        message.truncate(MESSAGE_MAX_BYTES as usize);
        Reply { status, epoch, data: None, message }
    }
}

/// The memory a request's data moves through.
pub enum Payload {
    None,
    /// The data of a write.
    Write(Arc<dyn IoMemory>, Range<usize>),
    /// Where a read's data goes (straight from the disk when the replica is local).
    ReadInto(Arc<dyn IoMemory>, Range<usize>),
}

pub struct ReplicaService {
    disks: Arc<DiskSet>,
    topology: Arc<dyn Topology>,
    /// Per volume, the newest owner epoch a write brought here. A write holds its volume's
    /// gate shared from its epoch check until its IO is done; a write with a newer epoch
    /// takes it exclusively to raise it, so no older write is still in flight after that
    /// and none starts afterwards (DESIGN invariant 3).
    gates: std::sync::Mutex<std::collections::HashMap<VolumeId, Arc<tokio::sync::RwLock<OwnerEpoch>>>>,
}

impl ReplicaService {
    pub fn new(disks: Arc<DiskSet>, topology: Arc<dyn Topology>) -> Self {
        ReplicaService { disks, topology, gates: Default::default() }
    }

    pub fn disks(&self) -> &Arc<DiskSet> {
        &self.disks
    }

    /// Serves one checked request. A read without a `ReadInto` payload returns its data in
    /// the reply.
    pub async fn handle(&self, request: Request, payload: Payload) -> Reply {
        let fenced = matches!(request.op, Op::Write | Op::Zero);
        if fenced && request.owner_epoch == OwnerEpoch(0) {
            return Reply::refuse(Status::Invalid, 0, "writes need an owner epoch; acquire the volume first".into());
        }
        let Some(state) = self.state_with(request.volume, request.owner_epoch).await else {
            let message = format!("{} with {} is not known here yet", request.volume, request.owner_epoch);
            return Reply::refuse(Status::EpochUnknown, 0, message);
        };
        let volume = &state.volumes[&request.volume];
        let gate = self.gates.lock().expect("gates lock").entry(volume.id).or_default().clone();
        let mut held = gate.read().await;
        if fenced && request.owner_epoch > *held {
            drop(held);
            let mut newest = gate.write().await;
            *newest = (*newest).max(request.owner_epoch);
            drop(newest);
            held = gate.read().await;
        }
        if fenced && request.owner_epoch < *held {
            let message = format!("{} was written here with {}; {} is stale", volume.id, *held, request.owner_epoch);
            return Reply::refuse(Status::StaleOwnerEpoch, held.0, message);
        }
        if fenced && request.owner_epoch < volume.owner_epoch {
            let message =
                format!("{} is owned with {} now; {} is stale", volume.id, volume.owner_epoch, request.owner_epoch);
            return Reply::refuse(Status::StaleOwnerEpoch, volume.owner_epoch.0, message);
        }
        let Some(pool) = state.pools.get(&volume.pool) else {
            return Reply::refuse(Status::NotHere, 0, format!("pool of {} unknown", volume.id));
        };
        let (pg, placement) = pool.pg_for(volume.id, request.extent);
        if pg != request.pg {
            return Reply::refuse(
                Status::Invalid,
                0,
                format!("{} of {} is in {pg}, not {}", request.extent, volume.id, request.pg),
            );
        }
        if placement.epoch != request.pg_epoch {
            let message = format!("{pg} is at {}, not {}", placement.epoch, request.pg_epoch);
            return Reply::refuse(Status::StalePgEpoch, placement.epoch.0, message);
        }
        let Some(disk) = placement.disks.iter().find_map(|d| self.disks.get(*d)) else {
            return Reply::refuse(Status::NotHere, 0, format!("this node holds no replica of {pg}"));
        };
        let (offset, len) = (u64::from(request.offset_bytes), u64::from(request.len_bytes));
        let result = match request.op {
            Op::Write => {
                let Payload::Write(buf, range) = payload else {
                    return Reply::refuse(Status::Invalid, 0, "a write without data".into());
                };
                disk.write(volume.id, request.extent, offset, buf, range).await.map(|()| Reply::ok(None))
            }
            Op::Read => match payload {
                Payload::ReadInto(target, range) => {
                    disk.read_into(volume.id, request.extent, offset, target, range).await.map(|allocated| {
                        if allocated {
                            Reply::ok(None)
                        } else {
                            Reply { status: Status::Unallocated, ..Reply::ok(None) }
                        }
                    })
                }
                _ => disk.read(volume.id, request.extent, offset, len).await.map(|data| match data {
                    Some(data) => Reply::ok(Some(data)),
                    None => Reply { status: Status::Unallocated, ..Reply::ok(None) },
                }),
            },
            Op::Zero => disk.zero(volume.id, request.extent, offset, len).await.map(|()| Reply::ok(None)),
        };
        result.unwrap_or_else(store_refusal)
    }

    /// The state once it knows `volume` at `epoch` or later; waits `EPOCH_WAIT` at most.
    async fn state_with(&self, volume: VolumeId, epoch: OwnerEpoch) -> Option<Arc<ClusterState>> {
        let known = |s: &ClusterState| s.volumes.get(&volume).is_some_and(|v| v.owner_epoch >= epoch);
        let state = self.topology.state();
        if known(&state) {
            return Some(state);
        }
        let mut watch = self.topology.watch();
        tokio::time::timeout(EPOCH_WAIT, async {
            loop {
                let state = watch.borrow_and_update().clone();
                if known(&state) {
                    return Some(state);
                }
                watch.changed().await.ok()?;
            }
        })
        .await
        .ok()
        .flatten()
    }
}

fn store_refusal(e: StoreError) -> Reply {
    let status = match e.kind() {
        StoreErrorKind::InvalidRequest => Status::Invalid,
        StoreErrorKind::Full => Status::Full,
        StoreErrorKind::Device => Status::DeviceError,
    };
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    Reply::refuse(status, 0, message)
}
