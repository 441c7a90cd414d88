//! The activity log: which ranges of which extents the owners of volumes wrote here
//! recently, so that when an owner dies with writes in flight, the next owner can make every
//! replica of those ranges identical before the volume serves IO again (a write may have
//! reached some replicas and not others).
//!
//! As with the dirty log, the extents are on disk (a redb table, committed before the first
//! write to an extent is acknowledged) and the ranges in memory; after a restart the extents
//! on record count as wholly written and stay until a new owner or a resync has dealt with
//! them. The live owner settles its entries: it says which of its writes (by sequence
//! number) every acting replica has acknowledged, and entries written only by those go. An
//! owner that died settles nothing, so what it had in flight stays on record for the next.

use crate::dirty::{add_range, whole_extent};
use crate::wire::{ActiveRange, ACTIVE_RANGE_BYTES, PAYLOAD_MAX_BYTES};
use model::{DiskId, ExtentIndex, OwnerEpoch, VolumeId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Most ranges one `ListActive` reply carries; past it, extents are listed whole.
const LISTED_RANGES_MAX: usize = PAYLOAD_MAX_BYTES as usize / ACTIVE_RANGE_BYTES;

/// (disk, volume, extent) → owner epoch of every extent written recently.
const ACTIVE: TableDefinition<(u64, u64, u64), u64> = TableDefinition::new("active_extents_by_disk");

#[derive(Debug, thiserror::Error)]
#[error("Recording active extents in {path}")]
pub struct ActiveError {
    path: PathBuf,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

struct Active {
    owner_epoch: OwnerEpoch,
    ranges: Vec<Range<u32>>,
    /// The newest write sequence number recorded; `u64::MAX` for entries no settle may
    /// remove: found on disk at start, or written by an older owner before this one.
    newest_seq: u64,
}

/// Which entry: the disk it is about, the volume and the extent.
pub type ActiveKey = (DiskId, VolumeId, ExtentIndex);

pub struct ActiveLog {
    path: PathBuf,
    db: Arc<Database>,
    extents: Mutex<BTreeMap<ActiveKey, Active>>,
    /// Serialises changes (memory and disk together), so a forget never removes an entry a
    /// write is adding to at the same time.
    changes: tokio::sync::Mutex<()>,
}

type Boxed = Box<dyn std::error::Error + Send + Sync>;

impl ActiveLog {
    pub fn open(path: &Path) -> Result<Self, ActiveError> {
        let error = |source: Boxed| ActiveError { path: path.into(), source };
        let db = Database::create(path).map_err(|e| error(e.into()))?;
        let mut extents = BTreeMap::new();
        let tx = db.begin_read().map_err(|e| error(e.into()))?;
        match tx.open_table(ACTIVE) {
            Ok(table) => {
                for entry in table.iter().map_err(|e| error(e.into()))? {
                    let (key, epoch) = entry.map_err(|e| error(e.into()))?;
                    let (disk, volume, extent) = key.value();
                    let active =
                        Active { owner_epoch: OwnerEpoch(epoch.value()), ranges: whole_extent(), newest_seq: u64::MAX };
                    extents.insert((DiskId(disk), VolumeId(volume), ExtentIndex(extent)), active);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(error(e.into())),
        }
        drop(tx);
        Ok(ActiveLog {
            path: path.into(),
            db: Arc::new(db),
            extents: Mutex::new(extents),
            changes: tokio::sync::Mutex::new(()),
        })
    }

    /// Records that the owner at `epoch` wrote `range` of the extent on `key.0` with write
    /// `seq`; returns once the extent is on record durably.
    pub async fn record(
        &self,
        key: ActiveKey,
        range: Range<u32>,
        epoch: OwnerEpoch,
        seq: u64,
    ) -> Result<(), ActiveError> {
        let _change = self.changes.lock().await;
        let known = {
            let mut extents = self.extents.lock().expect("active lock");
            match extents.get_mut(&key).filter(|a| a.owner_epoch == epoch) {
                Some(active) => {
                    add_range(&mut active.ranges, range.clone());
                    active.newest_seq = active.newest_seq.max(seq);
                    true
                }
                None => false,
            }
        };
        if known {
            return Ok(());
        }
        let (disk, volume, extent) = key;
        self.write(move |table| table.insert((disk.0, volume.0, extent.0), epoch.0).map(drop)).await?;
        let mut extents = self.extents.lock().expect("active lock");
        match extents.get_mut(&key) {
            // An older owner's entry relabelled for this one: only a reconcile or a resync
            // may remove it, since its older ranges are still to be dealt with.
            Some(older) => {
                older.owner_epoch = older.owner_epoch.max(epoch);
                older.newest_seq = u64::MAX;
                add_range(&mut older.ranges, range);
            }
            None => {
                let mut ranges = Vec::new();
                add_range(&mut ranges, range);
                extents.insert(key, Active { owner_epoch: epoch, ranges, newest_seq: seq });
            }
        }
        Ok(())
    }

    /// The ranges on record of the entries `pick` chooses (by key and owner epoch), at most
    /// what one reply carries; past it, extents are listed whole.
    pub fn list(&self, pick: impl Fn(ActiveKey, OwnerEpoch) -> bool) -> Vec<ActiveRange> {
        let extents = self.extents.lock().expect("active lock");
        let chosen: Vec<(&ActiveKey, &Active)> = extents.iter().filter(|(k, a)| pick(**k, a.owner_epoch)).collect();
        let ranges: usize = chosen.iter().map(|(_, a)| a.ranges.len()).sum();
        let whole = ranges > LISTED_RANGES_MAX;
        chosen
            .into_iter()
            .flat_map(|((_, volume, extent), a)| {
                let ranges = if whole { whole_extent() } else { a.ranges.clone() };
                ranges.into_iter().map(move |r| ActiveRange {
                    volume: *volume,
                    extent: *extent,
                    offset_bytes: r.start,
                    len_bytes: r.end - r.start,
                    owner_epoch: a.owner_epoch,
                })
            })
            .collect()
    }

    /// Forgets the entries `forget` picks (by key, owner epoch and newest write).
    pub async fn forget(&self, forget: impl Fn(ActiveKey, OwnerEpoch, u64) -> bool) -> Result<usize, ActiveError> {
        let _change = self.changes.lock().await;
        let gone: Vec<ActiveKey> = {
            let extents = self.extents.lock().expect("active lock");
            extents.iter().filter(|(k, a)| forget(**k, a.owner_epoch, a.newest_seq)).map(|(k, _)| *k).collect()
        };
        if gone.is_empty() {
            return Ok(0);
        }
        let keys: Vec<(u64, u64, u64)> = gone.iter().map(|(d, v, e)| (d.0, v.0, e.0)).collect();
        self.write(move |table| {
            for key in &keys {
                table.remove(*key)?;
            }
            Ok(())
        })
        .await?;
        let mut extents = self.extents.lock().expect("active lock");
        for key in &gone {
            extents.remove(key);
        }
        Ok(gone.len())
    }

    /// The owner at `epoch` settled every write of its own below `seq` on `disk`.
    pub async fn settle(
        &self,
        disk: DiskId,
        volume: VolumeId,
        epoch: OwnerEpoch,
        seq: u64,
    ) -> Result<usize, ActiveError> {
        self.forget(|(d, v, _), e, newest| d == disk && v == volume && e == epoch && newest < seq).await
    }

    async fn write(
        &self,
        change: impl FnOnce(&mut redb::Table<(u64, u64, u64), u64>) -> Result<(), redb::StorageError> + Send + 'static,
    ) -> Result<(), ActiveError> {
        let db = self.db.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<(), Boxed> {
            let tx = db.begin_write()?;
            change(&mut tx.open_table(ACTIVE)?)?;
            tx.commit()?;
            Ok(())
        })
        .await;
        match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ActiveError { path: self.path.clone(), source }),
            Err(join) => Err(ActiveError { path: self.path.clone(), source: join.into() }),
        }
    }
}
