//! The engine on the owner's side: splits a volume IO by extent, sends each piece to every
//! replica of the extent's PG at once (the local one in-process, the others over the wire),
//! and succeeds only when all of them did (DESIGN invariant 1).

use crate::client::PeerPool;
use crate::error::{ReplicaError, VolumeError};
use crate::overlap::{OverlapQueue, WriteId};
use crate::replica::{Payload, ReplicaService, Reply};
use crate::topology::{replicas_of, Replica, Topology};
use crate::wire::{Op, Request, Status};
use model::{extent_of, ExtentIndex, OwnerEpoch, Volume, VolumeId, EXTENT_SIZE_BYTES, SECTOR_SIZE_BYTES};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use store::{AlignedBuf, IoMemory};
use tokio::sync::{oneshot, Semaphore};

/// Writes one volume writer may have in flight; bounds memory and queue depth.
pub const WRITES_IN_FLIGHT_MAX: usize = 256;

#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    replica: Arc<ReplicaService>,
    peers: PeerPool,
    topology: Arc<dyn Topology>,
}

/// One piece of a volume IO that lies within one extent.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Piece {
    extent: ExtentIndex,
    offset_bytes: u64,
    /// The piece's bytes within the caller's buffer.
    buf_range: Range<usize>,
}

fn pieces(offset_bytes: u64, len_bytes: u64) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut done = 0u64;
    while done < len_bytes {
        let (extent, within) = extent_of(offset_bytes + done);
        let n = (EXTENT_SIZE_BYTES - within).min(len_bytes - done);
        pieces.push(Piece { extent, offset_bytes: within, buf_range: done as usize..(done + n) as usize });
        done += n;
    }
    pieces
}

impl Engine {
    pub fn new(replica: Arc<ReplicaService>, topology: Arc<dyn Topology>) -> Self {
        Engine { inner: Arc::new(EngineInner { replica, peers: PeerPool::default(), topology }) }
    }

    /// A writer for `volume`, which this node has acquired with `epoch`.
    pub fn writer(&self, volume: VolumeId, epoch: OwnerEpoch) -> VolumeWriter {
        VolumeWriter {
            engine: self.clone(),
            volume,
            epoch,
            gate: Mutex::new(Gate::default()),
            slots: Semaphore::new(WRITES_IN_FLIGHT_MAX),
        }
    }

    fn volume(&self, id: VolumeId, offset_bytes: u64, len_bytes: u64) -> Result<Volume, VolumeError> {
        let state = self.inner.topology.state();
        let volume = state.volumes.get(&id).cloned().ok_or(VolumeError::UnknownVolume(id))?;
        let aligned = offset_bytes.is_multiple_of(SECTOR_SIZE_BYTES) && len_bytes.is_multiple_of(SECTOR_SIZE_BYTES);
        let inside = offset_bytes.checked_add(len_bytes).is_some_and(|end| end <= volume.size_bytes);
        if !aligned || !inside || len_bytes == 0 {
            return Err(VolumeError::OutOfRange { volume: id, offset_bytes, len_bytes, size_bytes: volume.size_bytes });
        }
        Ok(volume)
    }

    /// Reads `len_bytes` at `offset_bytes`, which must lie within one extent. `None` means the
    /// range was never written and reads as zeros.
    pub async fn read(
        &self,
        id: VolumeId,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Option<AlignedBuf>, VolumeError> {
        let reply = self.read_piece(id, offset_bytes, len_bytes, || Payload::None).await?;
        Ok(match reply.status {
            Status::Unallocated => None,
            _ => Some(reply.data.unwrap_or_else(|| AlignedBuf::zeroed(len_bytes as usize))),
        })
    }

    /// Reads `range.len()` bytes at `offset_bytes` (within one extent) into `target[range]`:
    /// straight from the disk into the target when the replica is local. A range never
    /// written is filled with zeros.
    pub async fn read_into(
        &self,
        id: VolumeId,
        offset_bytes: u64,
        target: Arc<dyn IoMemory>,
        range: Range<usize>,
    ) -> Result<(), VolumeError> {
        assert!(range.end <= target.io_len(), "read range past its target");
        let len = range.len() as u64;
        let payload = || Payload::ReadInto(target.clone(), range.clone());
        let reply = self.read_piece(id, offset_bytes, len, payload).await?;
        if reply.status == Status::Unallocated {
            target.fill(range.start, &vec![0u8; range.len()]);
        }
        Ok(())
    }

    /// Reads one piece from the first replica that serves it: the local one, then those on
    /// nodes that are up, then the rest.
    async fn read_piece(
        &self,
        id: VolumeId,
        offset_bytes: u64,
        len_bytes: u64,
        payload: impl Fn() -> Payload,
    ) -> Result<Reply, VolumeError> {
        let volume = self.volume(id, offset_bytes, len_bytes)?;
        let [piece] = &pieces(offset_bytes, len_bytes)[..] else {
            return Err(VolumeError::OutOfRange { volume: id, offset_bytes, len_bytes, size_bytes: volume.size_bytes });
        };
        let piece = piece.clone();
        let set = replicas_of(&self.inner.topology.state(), &volume, piece.extent)?;
        let this = self.inner.topology.this_node();
        let mut order = set.replicas.clone();
        order.sort_by_key(|r| (r.node != this, !self.inner.topology.is_up(r.node)));
        let request = Request {
            op: Op::Read,
            id: 0,
            volume: id,
            extent: piece.extent,
            offset_bytes: piece.offset_bytes as u32,
            len_bytes: len_bytes as u32,
            owner_epoch: OwnerEpoch(0),
            pg: set.pg,
            pg_epoch: set.pg_epoch,
        };
        let mut last = None;
        for replica in &order {
            match self.send(replica, request, payload()).await.and_then(accepted) {
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    tracing::debug!(disk = %replica.disk, error = %e, "read from replica failed; trying the next");
                    last = Some((replica.clone(), e));
                }
            }
        }
        let (replica, source) = last.expect("a PG has at least one replica");
        Err(VolumeError::NoReplicaReadable {
            volume: id,
            extent: piece.extent,
            disk: replica.disk,
            node: replica.node,
            source,
        })
    }

    async fn send(&self, replica: &Replica, request: Request, payload: Payload) -> Result<Reply, ReplicaError> {
        if replica.node == self.inner.topology.this_node() {
            Ok(self.inner.replica.handle(request, payload).await)
        } else {
            let peers = &self.inner.peers;
            match payload {
                Payload::Write(buf, range) => peers.call(&replica.data_addr, request, Some((&*buf, range)), None).await,
                // The data arrives from the socket straight in the target (a reply that did not
                // fit it is copied in, which a well-behaved peer never sends).
                Payload::ReadInto(target, range) => {
                    let into = Some((target.clone(), range.clone()));
                    let reply = peers.call(&replica.data_addr, request, None, into).await?;
                    if let Some(data) = &reply.data {
                        target.fill(range.start, data.as_slice());
                    }
                    Ok(Reply { data: None, ..reply })
                }
                Payload::None => peers.call(&replica.data_addr, request, None, None).await,
            }
        }
    }

    /// Applies one write or zero piece on every replica in parallel.
    async fn fan_out(
        &self,
        volume: &Volume,
        epoch: OwnerEpoch,
        op: Op,
        piece: &Piece,
        payload: Option<&Arc<dyn IoMemory>>,
    ) -> Result<(), VolumeError> {
        let set = replicas_of(&self.inner.topology.state(), volume, piece.extent)?;
        let request = Request {
            op,
            id: 0,
            volume: volume.id,
            extent: piece.extent,
            offset_bytes: piece.offset_bytes as u32,
            len_bytes: piece.buf_range.len() as u32,
            owner_epoch: epoch,
            pg: set.pg,
            pg_epoch: set.pg_epoch,
        };
        let sends = set.replicas.iter().map(|replica| {
            let payload = match payload {
                Some(buf) => Payload::Write(buf.clone(), piece.buf_range.clone()),
                None => Payload::None,
            };
            async move { (replica, self.send(replica, request, payload).await.and_then(accepted)) }
        });
        for (replica, result) in futures_util::future::join_all(sends).await {
            match result {
                Ok(_) => {}
                Err(ReplicaError::Refused { status: Status::StaleOwnerEpoch, epoch: current, .. }) => {
                    return Err(VolumeError::Fenced { volume: volume.id, sent: epoch, current: OwnerEpoch(current) });
                }
                Err(source) => {
                    return Err(VolumeError::Replica {
                        volume: volume.id,
                        extent: piece.extent,
                        disk: replica.disk,
                        node: replica.node,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

fn accepted(reply: Reply) -> Result<Reply, ReplicaError> {
    match reply.status {
        Status::Ok | Status::Unallocated => Ok(reply),
        status => Err(ReplicaError::Refused { status, epoch: reply.epoch, message: reply.message }),
    }
}

#[derive(Default)]
struct Gate {
    queue: OverlapQueue,
    waiting: HashMap<WriteId, oneshot::Sender<()>>,
}

/// The single writer of a volume on its owner node: orders overlapping writes and fans
/// each out to the replicas.
pub struct VolumeWriter {
    engine: Engine,
    volume: VolumeId,
    epoch: OwnerEpoch,
    gate: Mutex<Gate>,
    slots: Semaphore,
}

/// Completes a write in the gate when dropped, even if the caller gave up on it.
struct Admitted<'a> {
    writer: &'a VolumeWriter,
    id: WriteId,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut gate = self.writer.gate.lock().expect("gate lock");
        for started in gate.queue.complete(self.id) {
            if let Some(wake) = gate.waiting.remove(&started) {
                let _ = wake.send(());
            }
        }
        gate.waiting.remove(&self.id);
        drop(gate);
        self.writer.slots.add_permits(1);
    }
}

impl VolumeWriter {
    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    pub fn epoch(&self) -> OwnerEpoch {
        self.epoch
    }

    /// Writes `buf[range]` at `offset_bytes`; returns once every replica has it durably.
    pub async fn write(
        &self,
        offset_bytes: u64,
        buf: Arc<dyn IoMemory>,
        range: Range<usize>,
    ) -> Result<(), VolumeError> {
        assert!(range.end <= buf.io_len(), "write range past its buffer");
        let len = range.len() as u64;
        let volume = self.engine.volume(self.volume, offset_bytes, len)?;
        let _admitted = self.admit(offset_bytes..offset_bytes + len).await;
        let writes = pieces(offset_bytes, len).into_iter().map(|mut piece| {
            piece.buf_range = piece.buf_range.start + range.start..piece.buf_range.end + range.start;
            let (engine, volume, buf) = (&self.engine, &volume, &buf);
            async move { engine.fan_out(volume, self.epoch, Op::Write, &piece, Some(buf)).await }
        });
        futures_util::future::join_all(writes).await.into_iter().collect()
    }

    /// Makes a range read as zeros on every replica (discard and write-zeroes).
    pub async fn zero(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeError> {
        let volume = self.engine.volume(self.volume, offset_bytes, len_bytes)?;
        let _admitted = self.admit(offset_bytes..offset_bytes + len_bytes).await;
        let zeros = pieces(offset_bytes, len_bytes).into_iter().map(|piece| {
            let (engine, volume) = (&self.engine, &volume);
            async move { engine.fan_out(volume, self.epoch, Op::Zero, &piece, None).await }
        });
        futures_util::future::join_all(zeros).await.into_iter().collect()
    }

    async fn admit(&self, range: Range<u64>) -> Admitted<'_> {
        let permit = self.slots.acquire().await.expect("semaphore is never closed");
        permit.forget();
        let (id, wait) = {
            let mut gate = self.gate.lock().expect("gate lock");
            let (id, started) = gate.queue.submit(range);
            let wait = (!started).then(|| {
                let (wake, wait) = oneshot::channel();
                gate.waiting.insert(id, wake);
                wait
            });
            (id, wait)
        };
        let admitted = Admitted { writer: self, id };
        if let Some(wait) = wait {
            let _ = wait.await;
        }
        admitted
    }
}
