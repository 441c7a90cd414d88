//! A replica's side of every request, whether it came over the wire or from the engine on
//! the same node: `admission::admit` decides, this module waits, orders and does the IO.
//!
//! Ordering: every data change holds two gates shared from its decision until its IO is
//! done, its volume's (owner epochs) and its PG's (PG epochs). A change made for a newer
//! epoch takes the gate exclusively to raise it, which waits out every change still in
//! flight for an older one; after that, the older ones are refused. So nothing an old owner
//! or an old acting set sent lands after something sent for a newer one (DESIGN invariants
//! 3 and 5), even when a request outlives its sender's timeout.

use crate::active::{ActiveKey, ActiveLog};
use crate::admission::{admit, Admission, Gates, Refusal};
use crate::dirty::DirtyLog;
use crate::topology::Topology;
use crate::wire::{Op, Request, Status, ALL_VOLUMES, MESSAGE_MAX_BYTES};
use model::{ClusterState, OwnerEpoch, PgEpoch, PgId, PoolId, VolumeId};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{AlignedBuf, DiskSet, IoMemory, StoreError, StoreErrorKind};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

/// How long a replica waits to learn an epoch newer than the one it knows: the sender
/// committed it through Raft before sending, so this node applies it shortly, unless it is
/// cut off from the majority.
pub const EPOCH_WAIT: Duration = Duration::from_secs(5);

/// A replica's answer.
#[derive(Debug)]
pub struct Reply {
    pub status: Status,
    /// The replica's owner epoch for the volume and epoch for the PG, as far as it knows.
    pub owner_epoch: OwnerEpoch,
    pub pg_epoch: PgEpoch,
    /// Data of a successful read.
    pub data: Option<AlignedBuf>,
    pub message: String,
}

impl Reply {
    pub fn ok(data: Option<AlignedBuf>) -> Self {
        Reply { status: Status::Ok, owner_epoch: OwnerEpoch(0), pg_epoch: PgEpoch(0), data, message: String::new() }
    }

    pub fn refuse(status: Status, message: String) -> Self {
        let mut message = message;
        message.truncate(MESSAGE_MAX_BYTES as usize);
        Reply { status, owner_epoch: OwnerEpoch(0), pg_epoch: PgEpoch(0), data: None, message }
    }

    /// Fills in this replica's epochs for the request's volume and PG.
    fn with_epochs(mut self, state: &ClusterState, request: &Request) -> Self {
        if let Some(volume) = state.volumes.get(&request.volume) {
            self.owner_epoch = volume.owner_epoch;
            if let Some(pg) = state.pools.get(&volume.pool).and_then(|p| p.pgs.get(request.pg.0 as usize)) {
                self.pg_epoch = pg.epoch;
            }
        }
        self
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

type Gate<E> = Arc<RwLock<E>>;

pub struct ReplicaService {
    disks: Arc<DiskSet>,
    topology: Arc<dyn Topology>,
    dirty: DirtyLog,
    active: ActiveLog,
    owner_gates: Mutex<HashMap<VolumeId, Gate<OwnerEpoch>>>,
    pg_gates: Mutex<HashMap<(PoolId, PgId), Gate<PgEpoch>>>,
}

/// The gates a data change holds until its IO is done.
struct Held {
    _owner: Option<OwnedRwLockReadGuard<OwnerEpoch>>,
    _pg: OwnedRwLockReadGuard<PgEpoch>,
    gates: Gates,
}

impl ReplicaService {
    pub fn new(disks: Arc<DiskSet>, topology: Arc<dyn Topology>, dirty: DirtyLog, active: ActiveLog) -> Self {
        ReplicaService { disks, topology, dirty, active, owner_gates: Default::default(), pg_gates: Default::default() }
    }

    pub fn active(&self) -> &ActiveLog {
        &self.active
    }

    pub fn disks(&self) -> &Arc<DiskSet> {
        &self.disks
    }

    pub fn dirty(&self) -> &DirtyLog {
        &self.dirty
    }

    pub(crate) fn topology(&self) -> &Arc<dyn Topology> {
        &self.topology
    }

    /// A refusal if `request` is for another cluster or a disk this node does not have:
    /// the replica server answers it and closes the connection.
    pub fn wrong_target(&self, request: &Request) -> Option<Reply> {
        let state = self.topology.state();
        let local = self.disks.contains(request.disk);
        match admit(request, local, &state, Gates::default()) {
            Admission::Refuse(Refusal { status: Status::WrongTarget, message }) => {
                Some(Reply::refuse(Status::WrongTarget, message))
            }
            _ => None,
        }
    }

    /// Serves one checked request. A read without a `ReadInto` payload returns its data in
    /// the reply.
    pub async fn handle(&self, request: Request, payload: Payload) -> Reply {
        let local = self.disks.contains(request.disk);
        if matches!(request.op, Op::ListActive | Op::ForgetActive | Op::Settle) {
            return self.activity(&request, local).await;
        }
        let (state, pool, record_dirty) = match self.decide(&request, local, Gates::default()).await {
            Ok(accepted) => accepted,
            Err(reply) => return reply,
        };
        if !request.changes_data() {
            return self.io(&request, payload).await.with_epochs(&state, &request);
        }
        let held = self.hold_gates(&request, pool).await;
        // Decided again with the gates held: the state may have moved while we waited.
        let (state, _, record_dirty_now) = match self.decide(&request, local, held.gates).await {
            Ok(accepted) => accepted,
            Err(reply) => return reply,
        };
        let range = request.offset_bytes..request.offset_bytes + request.len_bytes;
        if record_dirty || record_dirty_now {
            if let Err(e) = self.dirty.record(pool, request.pg, request.volume, request.extent, range.clone()).await {
                return Reply::refuse(Status::DeviceError, error_chain(&e)).with_epochs(&state, &request);
            }
        }
        // A resync copy may carry a write its owner never saw acknowledged: it is on record
        // here too, under the current owner and never settled, so the next owner reconciles it.
        let (epoch, seq) = if request.resync {
            (state.volumes.get(&request.volume).map(|v| v.owner_epoch).unwrap_or_default(), u64::MAX)
        } else {
            (request.owner_epoch, request.seq)
        };
        let key = (request.disk, request.volume, request.extent);
        if let Err(e) = self.active.record(key, range, epoch, seq).await {
            return Reply::refuse(Status::DeviceError, error_chain(&e)).with_epochs(&state, &request);
        }
        let reply = self.io(&request, payload).await.with_epochs(&state, &request);
        if record_dirty || record_dirty_now {
            // Raised again now that the data is on disk: a resync pass that read the range
            // before it landed sees the extent as changed and copies it again.
            let range = request.offset_bytes..request.offset_bytes + request.len_bytes;
            if let Err(e) = self.dirty.record(pool, request.pg, request.volume, request.extent, range).await {
                return Reply::refuse(Status::DeviceError, error_chain(&e)).with_epochs(&state, &request);
            }
        }
        drop(held);
        reply
    }

    /// Serves `ListActive` and `ForgetActive`: the activity log, for a new owner making the
    /// replicas of what its predecessor wrote identical, and for resync.
    async fn activity(&self, request: &Request, local: bool) -> Reply {
        let ours = self.topology.state().cluster.as_ref().is_some_and(|c| c.id == request.cluster);
        if !ours || !local {
            let message = format!("{} of cluster {} is not a disk of this node", request.disk, request.cluster);
            return Reply::refuse(Status::WrongTarget, message);
        }
        let all = request.volume == ALL_VOLUMES;
        let disk = request.disk;
        let result = match (request.op, all) {
            (Op::ListActive, true) => {
                // For a resync source: everything on record for this disk in the request's
                // PG, with the owner epoch that wrote it; the source picks what to copy.
                let in_pg = self.in_pg(request);
                Ok(self.active.list(|(d, v, e), _| d == disk && in_pg(v, e)))
            }
            (Op::ListActive, false) => {
                // Fence the older owners first: once the gate is raised, none of their writes
                // is in flight here and none lands later, so the list is complete.
                if let Err(reply) = self.owner_known(request).await {
                    return reply;
                }
                let gate = self.owner_gates.lock().expect("gates lock").entry(request.volume).or_default().clone();
                let _held = raise_and_hold(gate, request.owner_epoch).await;
                let (volume, below) = (request.volume, request.owner_epoch);
                let in_pg = self.in_pg(request);
                let scoped = request.resync;
                Ok(self
                    .active
                    .list(|(d, v, e), epoch| d == disk && v == volume && epoch < below && (!scoped || in_pg(v, e))))
            }
            (Op::ForgetActive, false) if request.resync => {
                // A resync source copied the entries of `volume` older than the epoch in
                // this PG to this replica.
                let in_pg = self.in_pg(request);
                let (volume, below) = (request.volume, request.owner_epoch);
                let picked = |(d, v, e): ActiveKey, epoch: OwnerEpoch, _| {
                    d == disk && v == volume && epoch < below && in_pg(v, e)
                };
                self.active.forget(picked).await.map(|_| Vec::new())
            }
            (Op::ForgetActive, false) => {
                let (volume, below) = (request.volume, request.owner_epoch);
                self.active
                    .forget(|(d, v, _), epoch, _| d == disk && v == volume && epoch < below)
                    .await
                    .map(|_| Vec::new())
            }
            (Op::ForgetActive, true) => {
                return Reply::refuse(Status::Invalid, "forgetting every volume's activity is not a request".into())
            }
            (Op::Settle, _) => {
                let current = self.topology.state().volumes.get(&request.volume).map(|v| v.owner_epoch);
                if current != Some(request.owner_epoch) {
                    return Reply::refuse(
                        Status::StaleOwnerEpoch,
                        format!("{} is not the owner's epoch", request.owner_epoch),
                    );
                }
                self.active.settle(disk, request.volume, request.owner_epoch, request.seq).await.map(|_| Vec::new())
            }
            _ => unreachable!("only activity ops come here"),
        };
        match result {
            Ok(ranges) => {
                let mut bytes = Vec::with_capacity(ranges.len() * crate::wire::ACTIVE_RANGE_BYTES);
                ranges.iter().for_each(|r| r.encode(&mut bytes));
                let data = (!bytes.is_empty()).then(|| AlignedBuf::copy_from(&bytes));
                Reply::ok(data)
            }
            Err(e) => Reply::refuse(Status::DeviceError, error_chain(&e)),
        }
    }

    /// Whether an extent of a volume lies in the request's PG, on the request's disk.
    fn in_pg(&self, request: &Request) -> impl Fn(VolumeId, model::ExtentIndex) -> bool {
        let state = self.topology.state();
        let (pg, disk) = (request.pg, request.disk);
        move |volume, extent| {
            let Some(v) = state.volumes.get(&volume) else { return false };
            state.pools.get(&v.pool).is_some_and(|p| {
                let (this_pg, placement) = p.pg_for(volume, extent);
                this_pg == pg && placement.disks.contains(&disk)
            })
        }
    }

    /// Waits (bounded) until this node knows the request's owner epoch for its volume.
    async fn owner_known(&self, request: &Request) -> Result<(), Reply> {
        let mut watch = self.topology.watch();
        let known =
            |s: &ClusterState| s.volumes.get(&request.volume).is_some_and(|v| v.owner_epoch >= request.owner_epoch);
        let waited = tokio::time::timeout(EPOCH_WAIT, watch.wait_for(|s| known(s))).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Reply::refuse(
                Status::EpochUnknown,
                format!("{} at {} is not known here yet", request.volume, request.owner_epoch),
            )),
        }
    }

    /// Admits `request`, waiting (up to `EPOCH_WAIT`) for a state that knows its epochs.
    async fn decide(
        &self,
        request: &Request,
        local: bool,
        gates: Gates,
    ) -> Result<(Arc<ClusterState>, PoolId, bool), Reply> {
        let mut watch = self.topology.watch();
        let deadline = tokio::time::Instant::now() + EPOCH_WAIT;
        loop {
            let state = watch.borrow_and_update().clone();
            match admit(request, local, &state, gates) {
                Admission::Accept { pool, record_dirty } => return Ok((state, pool, record_dirty)),
                Admission::Refuse(Refusal { status, message }) => {
                    return Err(Reply::refuse(status, message).with_epochs(&state, request));
                }
                Admission::WaitForState => {}
            }
            let changed = tokio::time::timeout_at(deadline, watch.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                let message = format!(
                    "{} at {} / {} is not known here yet: this node is behind the cluster",
                    request.volume, request.owner_epoch, request.pg_epoch
                );
                return Err(Reply::refuse(Status::EpochUnknown, message).with_epochs(&state, request));
            }
        }
    }

    /// Takes the volume's and the PG's gates shared, raising either first if the request
    /// was made for a newer epoch than any let through so far.
    async fn hold_gates(&self, request: &Request, pool: PoolId) -> Held {
        let owner = if request.resync {
            None
        } else {
            let gate = self.owner_gates.lock().expect("gates lock").entry(request.volume).or_default().clone();
            Some(raise_and_hold(gate, request.owner_epoch).await)
        };
        let gate = self.pg_gates.lock().expect("gates lock").entry((pool, request.pg)).or_default().clone();
        let pg = raise_and_hold(gate, request.pg_epoch).await;
        let gates = Gates { owner_epoch: owner.as_ref().map(|g| **g).unwrap_or_default(), pg_epoch: *pg };
        Held { _owner: owner, _pg: pg, gates }
    }

    /// Holds a PG's gate exclusively: no data change of that PG is in flight here, and none
    /// starts, until the guard is dropped. The resync source holds it while it makes its
    /// last copies and brings a replica back in.
    pub(crate) async fn freeze_pg(&self, pool: PoolId, pg: PgId) -> tokio::sync::OwnedRwLockWriteGuard<PgEpoch> {
        let gate = self.pg_gates.lock().expect("gates lock").entry((pool, pg)).or_default().clone();
        gate.write_owned().await
    }

    async fn io(&self, request: &Request, payload: Payload) -> Reply {
        let Some(disk) = self.disks.get(request.disk) else {
            return Reply::refuse(Status::WrongTarget, format!("{} is not a disk of this node", request.disk));
        };
        let (volume, extent) = (request.volume, request.extent);
        let (offset, len) = (u64::from(request.offset_bytes), u64::from(request.len_bytes));
        let result = match request.op {
            Op::Write => {
                let Payload::Write(buf, range) = payload else {
                    return Reply::refuse(Status::Invalid, "a write without data".into());
                };
                disk.write(volume, extent, offset, buf, range).await.map(|()| Reply::ok(None))
            }
            Op::Read => match payload {
                Payload::ReadInto(target, range) => {
                    disk.read_into(volume, extent, offset, target, range).await.map(|allocated| {
                        if allocated {
                            Reply::ok(None)
                        } else {
                            Reply { status: Status::Unallocated, ..Reply::ok(None) }
                        }
                    })
                }
                _ => disk.read(volume, extent, offset, len).await.map(|data| match data {
                    Some(data) => Reply::ok(Some(data)),
                    None => Reply { status: Status::Unallocated, ..Reply::ok(None) },
                }),
            },
            Op::Zero => disk.zero(volume, extent, offset, len).await.map(|()| Reply::ok(None)),
            Op::ListActive | Op::ForgetActive | Op::Settle => unreachable!("activity ops are served before IO"),
        };
        result.unwrap_or_else(store_refusal)
    }

    /// Forgets the recorded changes of every PG that is whole again in `state`.
    pub async fn forget_clean_pgs(&self, state: &ClusterState) {
        for (pool, pg) in self.dirty.pgs() {
            let clean = state.pools.get(&pool).and_then(|p| p.pgs.get(pg.0 as usize)).is_none_or(|p| !p.is_degraded());
            if !clean {
                continue;
            }
            // Wait out changes in flight that were recorded for the degraded set, and judge
            // again on the state after them: a replica may have been taken out meanwhile.
            let _frozen = self.freeze_pg(pool, pg).await;
            let state = self.topology.state();
            if state.pools.get(&pool).and_then(|p| p.pgs.get(pg.0 as usize)).is_some_and(|p| p.is_degraded()) {
                continue;
            }
            if let Err(e) = self.dirty.clear(pool, pg).await {
                tracing::warn!(%pool, %pg, error = %error_chain(&e), "forgetting a whole PG's changes failed");
            }
        }
    }
}

async fn raise_and_hold<E: Copy + Ord + Send + Sync + 'static>(gate: Gate<E>, epoch: E) -> OwnedRwLockReadGuard<E> {
    let held = gate.clone().read_owned().await;
    if epoch <= *held {
        return held;
    }
    drop(held);
    let mut newest = gate.clone().write_owned().await;
    *newest = (*newest).max(epoch);
    drop(newest);
    gate.read_owned().await
}

pub(crate) use model::error_chain;

fn store_refusal(e: StoreError) -> Reply {
    let status = match e.kind() {
        StoreErrorKind::InvalidRequest => Status::Invalid,
        StoreErrorKind::Full => Status::Full,
        StoreErrorKind::Device => Status::DeviceError,
    };
    Reply::refuse(status, error_chain(&e))
}
