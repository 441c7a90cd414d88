//! The engine on the owner's side: splits a volume IO by extent, sends each piece to every
//! replica of the extent's PG acting set at once (the local one in-process, the others over
//! the wire), and acknowledges by the rule in `verdict`: every acting replica at one PG
//! epoch made it durable, and at least `min_size` of them (DESIGN invariant 1). A replica
//! that fails is taken out by a Raft change and the write goes on with the rest.

use crate::client::PeerPool;
use crate::error::{ReplicaError, VolumeError, VolumeErrorKind};
use crate::overlap::{OverlapQueue, WriteId};
use crate::replica::{error_chain, Payload, ReplicaService, Reply};
use crate::topology::{replicas_of, PgChange, PgChangeError, Replica, ReplicaSet, Topology};
use crate::verdict::{verdict, Answer, Verdict};
use crate::wire::{ActiveRange, Op, Request, Status};
use model::{
    extent_of, ExtentIndex, OwnerEpoch, PgEpoch, PgId, Volume, VolumeId, EXTENT_SIZE_BYTES, SECTOR_SIZE_BYTES,
};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{AlignedBuf, IoMemory};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;

/// Writes one volume writer may have in flight; bounds memory and queue depth.
pub const WRITES_IN_FLIGHT_MAX: usize = 256;
/// How long a replica may take to answer before it is taken out of its PG's acting set.
/// See docs/decisions.md for why 3 s.
pub const REPLICA_TIMEOUT_DEFAULT: Duration = Duration::from_secs(3);
/// How long an IO waits for its PG to have enough acting replicas (or for Raft to take a
/// failed one out) before it fails to the guest.
pub const IO_WAIT_MAX: Duration = Duration::from_secs(30);
/// Rounds over a PG's replicas a read makes when its view of the PG turns out to be old, or
/// no replica served it for a passing reason (a peer restarting, one behind Raft).
const READ_ROUNDS_MAX: usize = 3;
/// The pause before a read's next round after passing failures; doubled each round.
const READ_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How often a writer settles its finished writes on the replicas' activity logs by default.
const SETTLE_INTERVAL: Duration = Duration::from_secs(5);
/// Pause between attempts to commit a PG change while Raft has no leader.
const PG_CHANGE_RETRY: Duration = Duration::from_millis(200);

const _: () = assert!(IO_WAIT_MAX.as_millis() > 2 * REPLICA_TIMEOUT_DEFAULT.as_millis());

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub replica_timeout: Duration,
    pub io_wait: Duration,
    /// How often a writer settles its finished writes on the replicas' activity logs.
    pub settle_interval: Duration,
    /// The address connections to other replicas go out from (this node's advertised one).
    pub local_address: Option<std::net::IpAddr>,
    /// This node's certificate, presented to other replicas (mutual TLS); `None` talks to
    /// them in the clear (tests, and a benchmark's reference).
    pub tls: Option<Arc<pki::NodeTls>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            replica_timeout: REPLICA_TIMEOUT_DEFAULT,
            io_wait: IO_WAIT_MAX,
            settle_interval: SETTLE_INTERVAL,
            local_address: None,
            tls: None,
        }
    }
}

/// What a new owner's `reconcile` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Ranges older owners wrote recently, now identical on every acting replica.
    pub ranges: usize,
    pub bytes: u64,
    /// Replicas that could not be asked: the first write to reach them takes them out, and
    /// their own record is copied over when they are resynced.
    pub unreachable: usize,
}

/// Largest single copy `reconcile` makes.
const RECONCILE_CHUNK_BYTES: u32 = 1 << 20;
/// Replicas a new owner asks (or tells) at once while it reconciles.
const RECONCILE_ASKS_PARALLEL: usize = 32;

#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    replica: Arc<ReplicaService>,
    peers: PeerPool,
    topology: Arc<dyn Topology>,
    config: EngineConfig,
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
    pub fn new(replica: Arc<ReplicaService>, topology: Arc<dyn Topology>, config: EngineConfig) -> Self {
        let peers = PeerPool::new(config.local_address, config.tls.clone());
        Engine { inner: Arc::new(EngineInner { replica, peers, topology, config }) }
    }

    pub fn replica(&self) -> &Arc<ReplicaService> {
        &self.inner.replica
    }

    pub fn config(&self) -> EngineConfig {
        self.inner.config.clone()
    }

    /// A writer for `volume`, which this node has acquired with `epoch`.
    pub fn writer(&self, volume: VolumeId, epoch: OwnerEpoch) -> VolumeWriter {
        VolumeWriter {
            engine: self.clone(),
            volume,
            epoch,
            gate: Mutex::new(Gate::default()),
            slots: Semaphore::new(WRITES_IN_FLIGHT_MAX),
            stopped: Default::default(),
            last_settle: Mutex::new(Instant::now()),
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
        let this = self.inner.topology.this_node();
        let mut last = None;
        let mut pause = READ_RETRY_PAUSE;
        let started = Instant::now();
        for round in 1..=READ_ROUNDS_MAX {
            let set = replicas_of(&self.inner.topology.state(), &volume, piece.extent)?;
            let mut order = set.replicas.clone();
            order.sort_by_key(|r| (r.node != this, !self.inner.topology.is_up(r.node)));
            let (mut behind, mut passing) = (false, true);
            for replica in &order {
                let request = request(&set, replica, Op::Read, id, &piece, len_bytes, OwnerEpoch(0));
                match self.send(replica, request, payload()).await.and_then(accepted) {
                    Ok(reply) => return Ok(reply),
                    Err(e) => {
                        tracing::debug!(disk = %replica.disk, error = %e, "read from replica failed; trying the next");
                        behind |= matches!(e, ReplicaError::Refused { status: Status::StalePgEpoch | Status::Out, .. });
                        // A read is safe to send again: when every replica failed for a
                        // reason that may be gone a moment later (a peer restarting).
                        passing &= matches!(
                            e,
                            ReplicaError::Connect { .. }
                                | ReplicaError::ConnectionLost { .. }
                                | ReplicaError::Refused { status: Status::EpochUnknown, .. }
                        );
                        last = Some((replica.clone(), e));
                    }
                }
            }
            if round == READ_ROUNDS_MAX || !(behind || passing) {
                break;
            }
            if behind {
                // This node's view of the PG is older than a replica's: read again once it
                // has caught up.
                let deadline = Instant::now() + self.inner.config.replica_timeout;
                self.wait_for_pg(&set, &volume, piece.extent, |e| e > set.pg_epoch, deadline).await;
            } else if started.elapsed() + pause < self.inner.config.replica_timeout {
                tokio::time::sleep(pause).await;
                pause *= 2;
            } else {
                // Failures that took their time (connects to a host that is gone): a guest
                // waits no longer for another round.
                break;
            }
        }
        let (replica, source) = last.expect("a PG has at least one acting replica");
        Err(VolumeError::NoReplicaReadable {
            volume: id,
            extent: piece.extent,
            disk: replica.disk,
            node: replica.node,
            source,
        })
    }

    /// Makes every acting replica of what older owners of `volume` wrote recently identical,
    /// as its new owner at `epoch`, before the volume serves IO: an owner that died with
    /// writes in flight may have left one on some replicas and not on others. Each replica
    /// first fences the older owners, then lists their recent ranges; one version of each
    /// (read from the first replica that serves it) is written to all.
    ///
    /// It writes through `writer`, the one the new owner then serves IO with, so all its
    /// writes share one sequence (settling one never covers another's).
    pub async fn reconcile(&self, writer: &VolumeWriter) -> Result<Reconciled, VolumeError> {
        let (volume, epoch) = (writer.volume(), writer.epoch());
        let state = self.inner.topology.state();
        let info = state.volumes.get(&volume).cloned().ok_or(VolumeError::UnknownVolume(volume))?;
        let pool = state.pools.get(&info.pool).ok_or(VolumeError::UnknownVolume(volume))?;
        let cluster = state.cluster.as_ref().map(|c| c.id).unwrap_or_default();
        // Asked per PG: a replica's record of a PG it is out of stays for its resync, since
        // what is copied here reaches only the PG's acting replicas.
        let asks: Vec<(PgId, model::DiskId)> = pool
            .pgs
            .iter()
            .enumerate()
            .flat_map(|(index, pg)| pg.acting().map(move |disk| (PgId(index as u32), disk)))
            .collect();
        let mut done = Reconciled::default();
        let mut asked = Vec::new();
        let mut unasked: Vec<(model::DiskId, String)> = Vec::new();
        let mut ranges: std::collections::BTreeMap<ExtentIndex, Vec<Range<u32>>> = Default::default();
        // Every (PG, acting replica) is asked, many at once: a takeover waits for the slowest
        // answer, not the sum of them.
        let timeout = self.inner.config.replica_timeout + crate::replica::EPOCH_WAIT;
        let asking = asks.into_iter().filter_map(|(pg, disk)| {
            let replica = replica_of(&state, disk)?;
            let list = Request { resync: true, ..activity_request(Op::ListActive, volume, epoch, disk, pg, cluster) };
            Some(async move {
                // The replica may first wait to learn the new owner epoch (`EPOCH_WAIT`).
                let listed = match self.send_within(&replica, list, Payload::None, timeout).await.and_then(accepted) {
                    Ok(reply) => ActiveRange::parse_all(reply.data.as_ref().map(|d| d.as_slice()).unwrap_or_default())
                        .map_err(|source| ReplicaError::Protocol { addr: replica.data_addr.clone(), source }),
                    Err(e) => Err(e),
                };
                (replica, pg, listed)
            })
        });
        let answers: Vec<_> = futures_util::StreamExt::collect(futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter(asking),
            RECONCILE_ASKS_PARALLEL,
        ))
        .await;
        for (replica, pg, listed) in answers {
            match listed {
                Ok(listed) => {
                    for range in listed.into_iter().filter(|r| r.volume == volume) {
                        let end = range.offset_bytes + range.len_bytes;
                        crate::dirty::add_range(ranges.entry(range.extent).or_default(), range.offset_bytes..end);
                    }
                    asked.push((replica, pg));
                }
                Err(e) if unasked.iter().any(|(d, _)| *d == replica.disk) => {
                    tracing::debug!(%volume, disk = %replica.disk, error = %error_chain(&e), "another PG of an unreachable replica");
                }
                Err(e) => {
                    tracing::warn!(%volume, disk = %replica.disk, error = %error_chain(&e), "cannot ask a replica what the last owner wrote; taking it out");
                    done.unreachable += 1;
                    unasked.push((replica.disk, error_chain(&e)));
                }
            }
        }
        // A replica that could not be asked may hold a write the others lack: it leaves the
        // acting sets now, and its own record is copied over when it is resynced.
        for (disk, reason) in unasked {
            self.take_out_everywhere(volume, disk, reason).await?;
        }
        for (extent, extent_ranges) in ranges {
            for range in extent_ranges {
                let mut at = range.start;
                while at < range.end {
                    let offset = extent.0 * EXTENT_SIZE_BYTES + u64::from(at);
                    if offset >= info.size_bytes {
                        break;
                    }
                    // A range past a volume's end (a whole last extent) stops at the end.
                    let len = (range.end - at).min(RECONCILE_CHUNK_BYTES).min((info.size_bytes - offset) as u32);
                    match self.read(volume, offset, u64::from(len)).await? {
                        Some(data) => writer.write(offset, Arc::new(data), 0..len as usize).await?,
                        None => writer.zero(offset, u64::from(len)).await?,
                    }
                    done.bytes += u64::from(len);
                    at += len;
                }
                done.ranges += 1;
            }
        }
        let forgetting = asked.into_iter().map(|(replica, pg)| async move {
            let forget = Request {
                resync: true,
                ..activity_request(Op::ForgetActive, volume, epoch, replica.disk, pg, cluster)
            };
            if let Err(e) = self.send(&replica, forget, Payload::None).await.and_then(accepted) {
                tracing::debug!(%volume, disk = %replica.disk, error = %error_chain(&e), "forgetting reconciled ranges failed");
            }
        });
        futures_util::StreamExt::collect::<Vec<()>>(futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter(forgetting),
            RECONCILE_ASKS_PARALLEL,
        ))
        .await;
        Ok(done)
    }

    /// Takes `disk` out of every PG of the volume's pool where it is acting; fails if it is
    /// the last acting replica of one (then nothing can be made consistent without it).
    async fn take_out_everywhere(
        &self,
        volume: VolumeId,
        disk: model::DiskId,
        reason: String,
    ) -> Result<(), VolumeError> {
        let deadline = Instant::now() + self.inner.config.io_wait;
        let unavailable =
            |waited_ms, problem| VolumeError::Unavailable { volume, extent: ExtentIndex(0), waited_ms, problem };
        // Until no PG of the pool has it acting: a PG that moved on meanwhile is looked at again.
        loop {
            let state = self.inner.topology.state();
            let pool = state
                .volumes
                .get(&volume)
                .and_then(|v| state.pools.get(&v.pool))
                .ok_or(VolumeError::UnknownVolume(volume))?;
            let Some((index, pg)) = pool.pgs.iter().enumerate().find(|(_, pg)| pg.is_acting(disk)) else {
                return Ok(());
            };
            let (pg_id, seen) = (PgId(index as u32), pg.epoch);
            let change = PgChange::TakeOut { pool: pool.id, pg: pg_id, disk, seen, reason: reason.clone() };
            match self.inner.topology.change_pg(change).await {
                Ok(_) => {}
                Err(PgChangeError::Stale { .. }) => {
                    // This node's state may be behind the commit that moved the PG on.
                    self.wait_for_epoch(volume, pg_id, seen, deadline).await;
                }
                Err(PgChangeError::LastReplica) => {
                    let problem = format!(
                        "{disk} could not be asked what the last owner wrote, and it is the last acting replica of {pg_id}: {reason}"
                    );
                    return Err(unavailable(0, problem));
                }
                Err(PgChangeError::Unavailable { reason: why }) if Instant::now() < deadline => {
                    tracing::debug!(%disk, %why, "taking an unasked replica out must wait for Raft");
                    tokio::time::sleep(PG_CHANGE_RETRY).await;
                }
                Err(PgChangeError::Unavailable { reason: why }) => {
                    return Err(unavailable(self.inner.config.io_wait.as_millis() as u64, why));
                }
            }
            if Instant::now() >= deadline {
                return Err(unavailable(
                    self.inner.config.io_wait.as_millis() as u64,
                    format!("taking {disk} out: {reason}"),
                ));
            }
        }
    }

    /// Waits (until `deadline`) for this node's state to show `pg` of the volume's pool past
    /// `seen`.
    async fn wait_for_epoch(&self, volume: VolumeId, pg: PgId, seen: PgEpoch, deadline: Instant) {
        let mut watch = self.inner.topology.watch();
        let moved = |s: &model::ClusterState| {
            s.volumes
                .get(&volume)
                .and_then(|v| s.pools.get(&v.pool))
                .and_then(|p| p.pgs.get(pg.0 as usize))
                .is_none_or(|p| p.epoch > seen)
        };
        let _ = tokio::time::timeout_at(deadline, watch.wait_for(|s| moved(s))).await;
    }

    /// Tells every acting replica of the volume's pool that the owner at `epoch` settled its
    /// writes below `seq`. Best effort: an entry left unsettled costs a reconcile copy later.
    async fn settle(&self, volume: VolumeId, epoch: OwnerEpoch, seq: u64) {
        let state = self.inner.topology.state();
        let Some(pool) = state.volumes.get(&volume).and_then(|v| state.pools.get(&v.pool)) else { return };
        let cluster = state.cluster.as_ref().map(|c| c.id).unwrap_or_default();
        let disks: std::collections::BTreeSet<model::DiskId> = pool.pgs.iter().flat_map(|pg| pg.acting()).collect();
        for disk in disks {
            let Some(replica) = replica_of(&state, disk) else { continue };
            let settle = Request { seq, ..activity_request(Op::Settle, volume, epoch, disk, PgId(0), cluster) };
            if let Err(e) = self.send(&replica, settle, Payload::None).await.and_then(accepted) {
                tracing::debug!(%volume, %disk, error = %error_chain(&e), "settling finished writes failed");
            }
        }
    }

    /// Sends one request to one replica and waits for its answer, at most the replica
    /// timeout. The local replica's IO runs in a task of its own, so giving up on it never
    /// cancels disk IO halfway.
    pub(crate) async fn send(
        &self,
        replica: &Replica,
        request: Request,
        payload: Payload,
    ) -> Result<Reply, ReplicaError> {
        self.send_within(replica, request, payload, self.inner.config.replica_timeout).await
    }

    pub(crate) async fn send_within(
        &self,
        replica: &Replica,
        request: Request,
        payload: Payload,
        timeout: Duration,
    ) -> Result<Reply, ReplicaError> {
        if replica.node == self.inner.topology.this_node() {
            if let Payload::ReadInto(..) = payload {
                // The disk reads straight into the caller's memory: a read given up on could
                // still land there later, so a local read is waited for (a hung local disk
                // is a known limitation, docs/decisions.md).
                return Ok(self.inner.replica.handle(request, payload).await);
            }
            let service = self.inner.replica.clone();
            let local = tokio::spawn(async move { service.handle(request, payload).await });
            return match tokio::time::timeout(timeout, local).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(join)) => Err(ReplicaError::Local { reason: join.to_string() }),
                Err(_) => {
                    Err(ReplicaError::LocalTimeout { disk: replica.disk, timeout_ms: timeout.as_millis() as u64 })
                }
            };
        }
        let peers = &self.inner.peers;
        let addr = &replica.data_addr;
        match payload {
            Payload::Write(buf, range) => peers.call(addr, request, Some((&*buf, range)), None, timeout).await,
            // The data arrives from the socket straight in the target.
            Payload::ReadInto(target, range) => {
                let into = Some((target, range));
                peers.call(addr, request, None, into, timeout).await.map(|reply| Reply { data: None, ..reply })
            }
            Payload::None => peers.call(addr, request, None, None, timeout).await,
        }
    }

    /// Applies one write or zero piece on every acting replica of its PG in parallel, and
    /// goes on until the acknowledgement rule is met, the writer is fenced, or `io_wait`
    /// has passed.
    async fn fan_out(
        &self,
        volume: &Volume,
        (epoch, seq): (OwnerEpoch, u64),
        op: Op,
        piece: &Piece,
        payload: Option<&Arc<dyn IoMemory>>,
    ) -> Result<(), VolumeError> {
        let deadline = Instant::now() + self.inner.config.io_wait;
        loop {
            let set = replicas_of(&self.inner.topology.state(), volume, piece.extent)?;
            let len = piece.buf_range.len() as u64;
            let sends = set.replicas.iter().map(|replica| {
                let request = Request { seq, ..request(&set, replica, op, volume.id, piece, len, epoch) };
                let payload = match payload {
                    Some(buf) => Payload::Write(buf.clone(), piece.buf_range.clone()),
                    None => Payload::None,
                };
                async move { (replica.disk, answer(self.send(replica, request, payload).await)) }
            });
            let answers = futures_util::future::join_all(sends).await;
            let problem = match verdict(set.pg_epoch, set.min_size, &answers) {
                Verdict::Acknowledge => return Ok(()),
                Verdict::Fenced { current } => {
                    return Err(VolumeError::Fenced { volume: volume.id, sent: epoch, current })
                }
                Verdict::Refresh { at_least } => {
                    self.wait_for_pg(&set, volume, piece.extent, |e| e >= at_least, deadline).await;
                    format!("{} moved on to {at_least}", set.pg)
                }
                Verdict::TakeOut { seen, disks } => {
                    let problem = describe_failures(&disks);
                    for (disk, reason) in disks {
                        tracing::warn!(volume = %volume.id, pg = %set.pg, %disk, %reason, "taking a replica out of its PG");
                        self.take_out(&set, disk, seen, reason, deadline).await;
                    }
                    self.wait_for_pg(&set, volume, piece.extent, |e| e > seen, deadline).await;
                    problem
                }
                Verdict::BelowMinSize { acting, min_size } => {
                    self.wait_for_pg(&set, volume, piece.extent, |e| e > set.pg_epoch, deadline).await;
                    format!("{acting} of the PG's replicas are acting, fewer than the pool's min_size {min_size}")
                }
            };
            if Instant::now() >= deadline {
                return Err(VolumeError::Unavailable {
                    volume: volume.id,
                    extent: piece.extent,
                    waited_ms: self.inner.config.io_wait.as_millis() as u64,
                    problem,
                });
            }
        }
    }

    /// Proposes taking `disk` out of the PG, retrying while Raft has no leader. A refusal
    /// because the PG moved on, or because `disk` is its last acting replica, ends it: the
    /// caller looks at the PG again.
    async fn take_out(&self, set: &ReplicaSet, disk: model::DiskId, seen: PgEpoch, reason: String, deadline: Instant) {
        let change = PgChange::TakeOut { pool: set.pool, pg: set.pg, disk, seen, reason };
        loop {
            match self.inner.topology.change_pg(change.clone()).await {
                Ok(_) | Err(PgChangeError::Stale { .. }) => return,
                Err(PgChangeError::LastReplica) => {
                    // Nothing to take out to: wait a little for the replica to recover.
                    tokio::time::sleep_until(deadline.min(Instant::now() + PG_CHANGE_RETRY)).await;
                    return;
                }
                Err(PgChangeError::Unavailable { reason }) => {
                    tracing::debug!(pg = %set.pg, %reason, "taking a replica out must wait for Raft");
                    if Instant::now() + PG_CHANGE_RETRY >= deadline {
                        return;
                    }
                    tokio::time::sleep(PG_CHANGE_RETRY).await;
                }
            }
        }
    }

    /// Waits (until `deadline`) for this node's state to show the extent's PG at an epoch
    /// for which `ready` holds.
    async fn wait_for_pg(
        &self,
        set: &ReplicaSet,
        volume: &Volume,
        extent: ExtentIndex,
        ready: impl Fn(PgEpoch) -> bool,
        deadline: Instant,
    ) {
        let mut watch = self.inner.topology.watch();
        loop {
            let epoch = replicas_of(&watch.borrow_and_update(), volume, extent).map(|s| s.pg_epoch);
            if epoch.is_ok_and(&ready) {
                return;
            }
            if !matches!(tokio::time::timeout_at(deadline, watch.changed()).await, Ok(Ok(()))) {
                tracing::debug!(pg = %set.pg, "waiting for the PG to change timed out");
                return;
            }
        }
    }
}

/// Where a disk is, for a request to it.
pub(crate) fn replica_of(state: &model::ClusterState, disk: model::DiskId) -> Option<Replica> {
    let node = state.disks.get(&disk)?.node;
    let data_addr = state.nodes.get(&node)?.data_addr.clone();
    Some(Replica { disk, node, data_addr })
}

/// A `ListActive` or `ForgetActive` request: no range, the owner epoch of the asker.
pub(crate) fn activity_request(
    op: Op,
    volume: VolumeId,
    owner_epoch: OwnerEpoch,
    disk: model::DiskId,
    pg: PgId,
    cluster: model::ClusterId,
) -> Request {
    Request {
        op,
        resync: false,
        id: 0,
        volume,
        extent: ExtentIndex(0),
        offset_bytes: 0,
        len_bytes: 0,
        owner_epoch,
        pg,
        pg_epoch: PgEpoch(0),
        disk,
        cluster,
        seq: 0,
    }
}

fn request(
    set: &ReplicaSet,
    replica: &Replica,
    op: Op,
    volume: VolumeId,
    piece: &Piece,
    len: u64,
    owner_epoch: OwnerEpoch,
) -> Request {
    Request {
        op,
        resync: false,
        id: 0,
        volume,
        extent: piece.extent,
        offset_bytes: piece.offset_bytes as u32,
        len_bytes: len as u32,
        owner_epoch,
        pg: set.pg,
        pg_epoch: set.pg_epoch,
        disk: replica.disk,
        cluster: set.cluster,
        seq: 0,
    }
}

/// What a replica's reply to a data change means for the acknowledgement rule.
fn answer(result: Result<Reply, ReplicaError>) -> Answer {
    match result {
        Ok(reply) => match reply.status {
            Status::Ok => Answer::Durable,
            Status::StaleOwnerEpoch => Answer::Fenced { current: reply.owner_epoch },
            Status::StalePgEpoch | Status::Out => Answer::NewerPgEpoch(reply.pg_epoch),
            status => Answer::Failed { reason: format!("it answered {status:?}: {}", reply.message) },
        },
        Err(e) => Answer::Failed { reason: error_chain(&e) },
    }
}

fn describe_failures(disks: &[(model::DiskId, String)]) -> String {
    let parts: Vec<String> = disks.iter().map(|(disk, reason)| format!("{disk}: {reason}")).collect();
    parts.join("; ")
}

fn accepted(reply: Reply) -> Result<Reply, ReplicaError> {
    match reply.status {
        Status::Ok | Status::Unallocated => Ok(reply),
        status => Err(ReplicaError::Refused { status, message: reply.message }),
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
    /// Set once a write failed with its outcome unknown, or the writer was fenced: no write
    /// after it could be trusted to land after it, so none is made, and nothing is settled.
    /// The volume must be opened again (a new owner epoch reconciles it).
    stopped: std::sync::atomic::AtomicBool,
    last_settle: Mutex<Instant>,
}

/// Completes a write in the gate when dropped, even if the caller gave up on it.
struct Admitted<'a> {
    writer: &'a VolumeWriter,
    id: WriteId,
    /// Its requests went out; a write dropped between this and `finish` (its caller gave
    /// up) may still land anywhere, so it stops the writer like an unknown outcome does.
    sent: bool,
    finished: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.sent && !self.finished {
            self.writer.stopped.store(true, std::sync::atomic::Ordering::Release);
            tracing::warn!(volume = %self.writer.volume, "a write was given up by its caller: volume writer stopped");
        }
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
        self.change(Op::Write, offset_bytes, len, Some((&buf, range.start))).await
    }

    /// Makes a range read as zeros on every replica (discard and write-zeroes).
    pub async fn zero(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeError> {
        self.change(Op::Zero, offset_bytes, len_bytes, None).await
    }

    /// One write or zero: ordered after overlapping ones, fanned out piece by piece, and
    /// ended by `finish`. `data` is the buffer and where in it the range starts.
    async fn change(
        &self,
        op: Op,
        offset_bytes: u64,
        len_bytes: u64,
        data: Option<(&Arc<dyn IoMemory>, usize)>,
    ) -> Result<(), VolumeError> {
        let volume = self.engine.volume(self.volume, offset_bytes, len_bytes)?;
        self.check_running()?;
        let mut admitted = self.admit(offset_bytes..offset_bytes + len_bytes).await;
        // Checked again: the writer may have stopped while this write waited its turn.
        self.check_running()?;
        admitted.sent = true;
        let seq = admitted.id.0 + 1;
        let pieces = pieces(offset_bytes, len_bytes).into_iter().map(|mut piece| {
            let buf = data.map(|(buf, start)| {
                piece.buf_range = piece.buf_range.start + start..piece.buf_range.end + start;
                buf
            });
            let (engine, volume) = (&self.engine, &volume);
            async move { engine.fan_out(volume, (self.epoch, seq), op, &piece, buf).await }
        });
        let result = futures_util::future::join_all(pieces).await.into_iter().collect();
        self.finish(admitted, result)
    }

    /// Whether this writer stopped (see `stopped`): its owner must open the volume again.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Acquire)
    }

    fn check_running(&self) -> Result<(), VolumeError> {
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return Err(VolumeError::WriterStopped { volume: self.volume });
        }
        Ok(())
    }

    /// Ends a write: a failure whose outcome is unknown (or a newer owner) stops this writer
    /// before the write's range is freed; a success now and then settles what is done.
    fn finish(&self, mut admitted: Admitted<'_>, result: Result<(), VolumeError>) -> Result<(), VolumeError> {
        admitted.finished = true;
        if let Err(e) = &result {
            if matches!(e.kind(), VolumeErrorKind::Unavailable | VolumeErrorKind::Fenced) {
                self.stopped.store(true, std::sync::atomic::Ordering::Release);
                tracing::warn!(volume = %self.volume, error = %e, "volume writer stopped: the volume must be opened again");
            }
        }
        drop(admitted);
        if result.is_ok() {
            self.maybe_settle();
        }
        result
    }

    /// At most every `SETTLE_INTERVAL`: tells the replicas that every write of this writer
    /// older than the oldest still in flight is settled.
    fn maybe_settle(&self) {
        {
            let mut last = self.last_settle.lock().expect("settle lock");
            if last.elapsed() < self.engine.inner.config.settle_interval {
                return;
            }
            *last = Instant::now();
        }
        let below = {
            let gate = self.gate.lock().expect("gate lock");
            // Under the gate lock: a write that stops the writer does so before its range
            // leaves the queue, so a settle never covers a write of unknown outcome.
            if self.is_stopped() {
                return;
            }
            gate.queue.oldest().unwrap_or(gate.queue.next_id()).0 + 1
        };
        let (engine, volume, epoch) = (self.engine.clone(), self.volume, self.epoch);
        tokio::spawn(async move { engine.settle(volume, epoch, below).await });
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
        let admitted = Admitted { writer: self, id, sent: false, finished: false };
        if let Some(wait) = wait {
            let _ = wait.await;
        }
        admitted
    }
}
