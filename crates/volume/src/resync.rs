//! Resync: a replica that was taken out of its PG and is reachable again gets what changed
//! while it was out, copied from the PG's resync source, and is then brought back in.
//!
//! The source (the PG's first acting replica, so one node per PG) copies its recorded
//! changes while writes go on, a few passes until little is left; then it freezes the PG on
//! its side (no write of the PG is in flight there, none starts), copies the rest, and
//! commits the replica back in with a new PG epoch before it lets writes through again.
//! Writes held up meanwhile are refused for the old epoch, and their writer sends them to
//! the new acting set, the returning replica included. Every copy is stamped with the PG
//! epoch the replica was out at: once it is back in, or out again, a late copy is refused.
//!
//! A copy that got no answer may still land, after any later copy of the same range made
//! at the same epoch (the replica serves requests concurrently). So nothing is copied to
//! that replica again at that epoch: the next attempt first fences it, raising the PG
//! epoch with the replica still out, and copies at the new one.

use crate::engine::{activity_request, Engine};
use crate::replica::Payload;
use crate::topology::{PgChange, PgChangeError, Replica, Topology};
use crate::wire::{ActiveRange, Op, Request, Status, ALL_VOLUMES};
use crate::DirtyExtent;
use model::{ClusterState, DiskId, ExtentIndex, OwnerEpoch, PgEpoch, PgId, PoolId, VolumeId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::IoMemory;
use tokio::sync::Semaphore;

/// How often the source looks for replicas to resync, besides every state change.
const RESYNC_TICK: Duration = Duration::from_secs(1);
/// PGs this node resyncs at once.
const RESYNC_PGS_PARALLEL: usize = 4;
/// Copy passes made while writes go on, before the final pass with the PG frozen (a pass
/// with nothing to copy costs nothing).
const LIVE_PASSES_MAX: usize = 4;
/// The final, frozen pass starts once a live pass leaves no more than this to copy.
const FROZEN_PASS_BYTES_MAX: u64 = 8 << 20;
/// How long the source stays frozen after a bring-in whose commit it could not confirm.
const BRING_IN_WAIT: Duration = Duration::from_secs(30);
/// Largest single copy request.
const COPY_CHUNK_BYTES: u32 = 1 << 20;

/// What this node's resyncs did since it started.
#[derive(Debug, Default)]
pub struct ResyncStats {
    pub bytes_copied: AtomicU64,
    pub replicas_brought_in: AtomicU64,
}

impl ResyncStats {
    pub fn report(&self) -> model::ResyncReport {
        model::ResyncReport {
            bytes_copied: self.bytes_copied.load(Ordering::Relaxed),
            replicas_brought_in: self.replicas_brought_in.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ResyncError {
    #[error("the PG moved on while resyncing")]
    Moved,
    #[error("{left} bytes still changing after the live passes; the PG is not frozen for that much")]
    Busy { left: u64 },
    #[error("copying {extent} of {volume} to {disk}: {reason}")]
    Copy { volume: VolumeId, extent: ExtentIndex, disk: DiskId, reason: String },
    /// A copy sent at `seen` got no answer: it may land later.
    #[error("copying {extent} of {volume} to {disk} at {seen}: no answer: {reason}")]
    Unanswered { volume: VolumeId, extent: ExtentIndex, disk: DiskId, seen: PgEpoch, reason: String },
    #[error("fencing the copies sent to {disk} at {seen}: {reason}")]
    Fence { disk: DiskId, seen: PgEpoch, reason: String },
    #[error("reading {extent} of {volume} here: {reason}")]
    Read { volume: VolumeId, extent: ExtentIndex, reason: String },
    #[error("bringing {disk} back in: {reason}")]
    BringIn { disk: DiskId, reason: String },
}

/// A resync: (pool, PG, returning disk).
type ResyncKey = (PoolId, PgId, DiskId);

/// Runs for the life of the node: resyncs the PGs this node is the source of, and forgets
/// the recorded changes of PGs that are whole again.
pub async fn resync_loop(engine: Engine, stats: Arc<ResyncStats>) {
    let topology = engine.replica().topology().clone();
    let running: Arc<Mutex<HashSet<(PoolId, PgId)>>> = Arc::default();
    // (pool, PG, target) whose last attempt sent a copy that got no answer, with the PG
    // epoch it was sent at: fenced before anything is copied to that target again.
    let unanswered: Arc<Mutex<HashMap<ResyncKey, PgEpoch>>> = Arc::default();
    // A previous run of this node may have sent copies that are still queued at their
    // targets: every replica out when this run starts is fenced before its first copy.
    {
        let state = topology.state();
        let mut inherited = unanswered.lock().expect("unanswered lock");
        for pool in state.pools.values() {
            for (index, pg) in pool.pgs.iter().enumerate() {
                for disk in pg.out.keys() {
                    inherited.insert((pool.id, PgId(index as u32), *disk), pg.epoch);
                }
            }
        }
    }
    let slots = Arc::new(Semaphore::new(RESYNC_PGS_PARALLEL));
    let mut watch = topology.watch();
    let mut ticker = tokio::time::interval(RESYNC_TICK);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = watch.changed() => if changed.is_err() { return },
        }
        let state = topology.state();
        engine.replica().forget_clean_pgs(&state).await;
        for (pool, pg, target) in resyncs_due(&engine, &state) {
            if !running.lock().expect("running lock").insert((pool, pg)) {
                continue;
            }
            let (engine, stats, running, slots) = (engine.clone(), stats.clone(), running.clone(), slots.clone());
            let unanswered = unanswered.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire().await.expect("semaphore is never closed");
                let key = (pool, pg, target.disk);
                let due = unanswered.lock().expect("unanswered lock").get(&key).copied();
                let fenced = match due {
                    Some(seen) => fence(engine.replica().topology().as_ref(), key, seen).await,
                    None => Ok(()),
                };
                let result = match fenced {
                    Ok(()) => {
                        unanswered.lock().expect("unanswered lock").remove(&key);
                        resync(&engine, &stats, pool, pg, target.clone()).await
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(bytes) => tracing::info!(%pool, %pg, disk = %target.disk, bytes, "replica resynced and back in"),
                    Err(e) => {
                        if let ResyncError::Unanswered { seen, .. } = e {
                            unanswered.lock().expect("unanswered lock").insert(key, seen);
                        }
                        tracing::info!(%pool, %pg, disk = %target.disk, error = %e, "resync did not finish; will try again")
                    }
                }
                running.lock().expect("running lock").remove(&(pool, pg));
            });
        }
    }
}

/// Raises the PG's epoch past `seen` with the target still out, so a copy sent to it at
/// `seen` that got no answer is refused from then on. A PG already past `seen` needs none.
async fn fence(
    topology: &dyn Topology,
    (pool, pg, disk): (PoolId, PgId, DiskId),
    seen: PgEpoch,
) -> Result<(), ResyncError> {
    match topology.change_pg(PgChange::Fence { pool, pg, disk, seen }).await {
        Ok(_) | Err(PgChangeError::Stale { .. }) => Ok(()),
        Err(e) => Err(ResyncError::Fence { disk, seen, reason: e.to_string() }),
    }
}

/// The (pool, PG, replica) resyncs this node should run now: PGs whose source disk is here,
/// with a replica out on a node that is up.
fn resyncs_due(engine: &Engine, state: &ClusterState) -> Vec<(PoolId, PgId, Replica)> {
    let topology = engine.replica().topology();
    let disks = engine.replica().disks();
    let mut due = Vec::new();
    for pool in state.pools.values() {
        for (index, pg) in pool.pgs.iter().enumerate() {
            if !pg.resync_source().is_some_and(|source| disks.contains(source)) {
                continue;
            }
            let target = pg.out.keys().find_map(|disk| {
                let node = state.disks.get(disk)?.node;
                let data_addr = state.nodes.get(&node)?.data_addr.clone();
                topology.is_up(node).then_some(Replica { disk: *disk, node, data_addr })
            });
            if let Some(target) = target {
                due.push((pool.id, PgId(index as u32), target));
            }
        }
    }
    due
}

/// Copies what changed to `target` and brings it back in; returns the bytes copied.
async fn resync(
    engine: &Engine,
    stats: &ResyncStats,
    pool: PoolId,
    pg: PgId,
    target: Replica,
) -> Result<u64, ResyncError> {
    let topology = engine.replica().topology().clone();
    let epoch_now = || {
        let state = topology.state();
        let found = state.pools.get(&pool).and_then(|p| p.pgs.get(pg.0 as usize))?;
        Some((found.epoch, found.out.contains_key(&target.disk), found.resync_source()?))
    };
    let Some((seen, true, source)) = epoch_now() else { return Err(ResyncError::Moved) };
    let mut copied: HashMap<(VolumeId, ExtentIndex), u64> = HashMap::new();
    // What the returning replica itself wrote last for owners that have since moved on: it
    // may hold a write the others never got (its owner died with it in flight).
    let (own, owners_then) = target_activity(engine, &target, pool, pg).await?;
    let mut bytes = copy(engine, stats, (source, &target), pg, seen, &own, &mut HashMap::new()).await?;
    for _ in 0..LIVE_PASSES_MAX {
        let todo = changed_since(engine, pool, pg, &copied);
        bytes += copy(engine, stats, (source, &target), pg, seen, &todo, &mut copied).await?;
    }
    // The frozen pass holds this PG's writes here: only when little is left to copy.
    let left: u64 = changed_since(engine, pool, pg, &copied).iter().map(DirtyExtent::bytes).sum();
    if left > FROZEN_PASS_BYTES_MAX {
        return Err(ResyncError::Busy { left });
    }
    let frozen = engine.replica().freeze_pg(pool, pg).await;
    // A volume that changed owners since the target's record was read may have entries the
    // copy left out (they were the current owner's then): look again later.
    if epoch_now() != Some((seen, true, source)) || owner_epochs(&topology.state(), pool) != owners_then {
        return Err(ResyncError::Moved);
    }
    let todo = changed_since(engine, pool, pg, &copied);
    bytes += copy(engine, stats, (source, &target), pg, seen, &todo, &mut copied).await?;
    // What was copied over the target's own record (older owners' entries) can go from it.
    let cluster = topology.state().cluster.as_ref().map(|c| c.id).unwrap_or_default();
    for (volume, epoch) in owners_then.iter().filter(|(v, _)| own.iter().any(|d| d.volume == **v)) {
        let forget =
            Request { resync: true, ..activity_request(Op::ForgetActive, *volume, *epoch, target.disk, pg, cluster) };
        match engine.send(&target, forget, Payload::None).await {
            Ok(reply) if reply.status == Status::Ok => {}
            Ok(reply) => return Err(ResyncError::BringIn { disk: target.disk, reason: reply.message }),
            Err(e) => return Err(ResyncError::BringIn { disk: target.disk, reason: e.to_string() }),
        }
    }
    let change = PgChange::BringIn { pool, pg, disk: target.disk, seen };
    if let Err(e) = topology.change_pg(change).await {
        // "Not committed" may mean "not known yet": stay frozen until this node's state
        // moves past `seen` (or a bound passes), so no write lands here at `seen` after a
        // late commit brought the replica in without it.
        let mut watch = topology.watch();
        let moved = watch
            .wait_for(|s| s.pools.get(&pool).and_then(|p| p.pgs.get(pg.0 as usize)).is_some_and(|p| p.epoch > seen));
        let _ = tokio::time::timeout(BRING_IN_WAIT, moved).await;
        drop(frozen);
        return Err(ResyncError::BringIn { disk: target.disk, reason: e.to_string() });
    }
    drop(frozen);
    stats.replicas_brought_in.fetch_add(1, Ordering::Relaxed);
    Ok(bytes)
}

/// The owner epoch of every volume of a pool.
fn owner_epochs(state: &model::ClusterState, pool: PoolId) -> BTreeMap<VolumeId, OwnerEpoch> {
    state.volumes.values().filter(|v| v.pool == pool).map(|v| (v.id, v.owner_epoch)).collect()
}

/// The ranges the returning replica has on record in this PG from owners that have moved
/// on since (by this node's state; the current owners' writes are in the dirty records),
/// and the owner epochs they were judged by.
async fn target_activity(
    engine: &Engine,
    target: &Replica,
    pool: PoolId,
    pg: PgId,
) -> Result<(Vec<DirtyExtent>, BTreeMap<VolumeId, OwnerEpoch>), ResyncError> {
    let state = engine.replica().topology().state();
    let owners = owner_epochs(&state, pool);
    let cluster = state.cluster.as_ref().map(|c| c.id).unwrap_or_default();
    let list = activity_request(Op::ListActive, ALL_VOLUMES, OwnerEpoch(0), target.disk, pg, cluster);
    let asked = |reason: String| ResyncError::Copy {
        volume: ALL_VOLUMES,
        extent: ExtentIndex(0),
        disk: target.disk,
        reason: format!("asking what it wrote last: {reason}"),
    };
    let reply = engine.send(target, list, Payload::None).await.map_err(|e| asked(e.to_string()))?;
    if reply.status != Status::Ok {
        return Err(asked(format!("it answered {:?}: {}", reply.status, reply.message)));
    }
    let listed = ActiveRange::parse_all(reply.data.as_ref().map(|d| d.as_slice()).unwrap_or_default())
        .map_err(|e| asked(e.to_string()))?;
    let mut extents: BTreeMap<(VolumeId, ExtentIndex), DirtyExtent> = BTreeMap::new();
    for range in listed {
        let in_pg = state
            .volumes
            .get(&range.volume)
            .and_then(|v| state.pools.get(&v.pool))
            .is_some_and(|p| p.id == pool && p.pg_for(range.volume, range.extent).0 == pg);
        let moved_on = owners.get(&range.volume).is_some_and(|current| *current > range.owner_epoch);
        if !in_pg || !moved_on {
            continue;
        }
        let entry = extents.entry((range.volume, range.extent)).or_insert_with(|| DirtyExtent {
            volume: range.volume,
            extent: range.extent,
            ranges: Vec::new(),
            generation: 0,
        });
        crate::dirty::add_range(&mut entry.ranges, range.offset_bytes..range.offset_bytes + range.len_bytes);
    }
    Ok((extents.into_values().collect(), owners))
}

/// The recorded changes of a PG not yet copied at their current generation.
fn changed_since(
    engine: &Engine,
    pool: PoolId,
    pg: PgId,
    copied: &HashMap<(VolumeId, ExtentIndex), u64>,
) -> Vec<DirtyExtent> {
    let dirty = engine.replica().dirty().snapshot(pool, pg);
    dirty.into_iter().filter(|d| copied.get(&(d.volume, d.extent)) != Some(&d.generation)).collect()
}

/// Copies `extents` from this node's replica to `target`, stamped with PG epoch `seen`.
async fn copy(
    engine: &Engine,
    stats: &ResyncStats,
    (source, target): (DiskId, &Replica),
    pg: PgId,
    seen: PgEpoch,
    extents: &[DirtyExtent],
    copied: &mut HashMap<(VolumeId, ExtentIndex), u64>,
) -> Result<u64, ResyncError> {
    let state = engine.replica().topology().state();
    let cluster = state.cluster.as_ref().map(|c| c.id).unwrap_or_default();
    let disk = engine.replica().disks().get(source).ok_or(ResyncError::Moved)?;
    let mut bytes = 0;
    for extent in extents {
        // A volume deleted meanwhile has nothing left to copy.
        if !state.volumes.contains_key(&extent.volume) {
            copied.insert((extent.volume, extent.extent), extent.generation);
            continue;
        }
        for range in &extent.ranges {
            let mut at = range.start;
            while at < range.end {
                let len = (range.end - at).min(COPY_CHUNK_BYTES);
                let read = disk.read(extent.volume, extent.extent, u64::from(at), u64::from(len)).await;
                let data = read.map_err(|e| ResyncError::Read {
                    volume: extent.volume,
                    extent: extent.extent,
                    reason: crate::replica::error_chain(&e),
                })?;
                let request = Request {
                    op: if data.is_some() { Op::Write } else { Op::Zero },
                    resync: true,
                    id: 0,
                    volume: extent.volume,
                    extent: extent.extent,
                    offset_bytes: at,
                    len_bytes: len,
                    owner_epoch: OwnerEpoch(0),
                    pg,
                    pg_epoch: seen,
                    disk: target.disk,
                    cluster,
                    seq: 0,
                };
                let payload = match data {
                    Some(buf) => Payload::Write(Arc::new(buf) as Arc<dyn IoMemory>, 0..len as usize),
                    None => Payload::None,
                };
                let copy_error = |reason: String| ResyncError::Copy {
                    volume: extent.volume,
                    extent: extent.extent,
                    disk: target.disk,
                    reason,
                };
                // The target may first wait to learn `seen` (EPOCH_WAIT) and answer that it
                // could not: that is an answer. Any other failure leaves the copy's fate
                // open (one that was never sent costs a needless fence, nothing more).
                let timeout = engine.config().replica_timeout + crate::replica::EPOCH_WAIT;
                match engine.send_within(target, request, payload, timeout).await {
                    Ok(reply) if reply.status == Status::Ok => {}
                    Ok(reply) => return Err(copy_error(format!("it answered {:?}: {}", reply.status, reply.message))),
                    Err(e) => {
                        return Err(ResyncError::Unanswered {
                            volume: extent.volume,
                            extent: extent.extent,
                            disk: target.disk,
                            seen,
                            reason: crate::replica::error_chain(&e),
                        })
                    }
                }
                stats.bytes_copied.fetch_add(u64::from(len), Ordering::Relaxed);
                bytes += u64::from(len);
                at += len;
            }
        }
        copied.insert((extent.volume, extent.extent), extent.generation);
    }
    Ok(bytes)
}
