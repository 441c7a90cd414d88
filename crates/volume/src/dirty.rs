//! What a replica wrote for a degraded PG, so the replicas that were out get exactly that
//! when they come back (resync).
//!
//! Two levels: which extents changed is kept on disk (a redb table under the data dir,
//! committed before the first write to an extent is acknowledged), so a crash of this
//! daemon never forgets that an extent must be copied; which byte ranges of it changed is
//! kept in memory, so a resync copies what changed, not whole extents. After a restart the
//! ranges are gone, and every extent on record is copied whole.

use model::{ExtentIndex, PgId, PoolId, VolumeId, EXTENT_SIZE_BYTES};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Byte ranges tracked per extent; past this the whole extent counts as changed, which
/// bounds memory per extent against random small writes.
pub const RANGES_PER_EXTENT_MAX: usize = 256;

/// (pool, pg, volume, extent) of every extent written while its PG was degraded.
const DIRTY: TableDefinition<(u32, u32, u64, u64), ()> = TableDefinition::new("dirty_extents");

#[derive(Debug, thiserror::Error)]
#[error("Recording changed extents in {path}")]
pub struct DirtyError {
    path: PathBuf,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// One changed extent of a PG, as a resync copies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyExtent {
    pub volume: VolumeId,
    pub extent: ExtentIndex,
    /// Sorted, disjoint byte ranges within the extent.
    pub ranges: Vec<Range<u32>>,
    /// Raised by every write recorded to the extent: a copy made at one generation is
    /// current while the generation has not moved.
    pub generation: u64,
}

impl DirtyExtent {
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.end - r.start)).sum()
    }
}

type PgKey = (PoolId, PgId);
type Boxed = Box<dyn std::error::Error + Send + Sync>;
type PgExtents = BTreeMap<(VolumeId, ExtentIndex), DirtyExtent>;

/// The whole extent as one range.
pub(crate) fn whole_extent() -> Vec<Range<u32>> {
    std::iter::once(0..EXTENT_SIZE_BYTES as u32).collect()
}

pub struct DirtyLog {
    path: PathBuf,
    db: Arc<Database>,
    pgs: Mutex<HashMap<PgKey, PgExtents>>,
}

impl DirtyLog {
    /// Opens (or creates) the log at `path`; every extent on record counts as wholly changed.
    pub fn open(path: &Path) -> Result<Self, DirtyError> {
        let error = |source: Box<dyn std::error::Error + Send + Sync>| DirtyError { path: path.into(), source };
        let db = Database::create(path).map_err(|e| error(e.into()))?;
        let mut pgs: HashMap<PgKey, BTreeMap<_, _>> = HashMap::new();
        let tx = db.begin_read().map_err(|e| error(e.into()))?;
        match tx.open_table(DIRTY) {
            Ok(table) => {
                for entry in table.iter().map_err(|e| error(e.into()))? {
                    let (key, _) = entry.map_err(|e| error(e.into()))?;
                    let (pool, pg, volume, extent) = key.value();
                    let (volume, extent) = (VolumeId(volume), ExtentIndex(extent));
                    let whole = DirtyExtent { volume, extent, ranges: whole_extent(), generation: 1 };
                    pgs.entry((PoolId(pool), PgId(pg))).or_default().insert((volume, extent), whole);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(error(e.into())),
        }
        drop(tx);
        Ok(DirtyLog { path: path.into(), db: Arc::new(db), pgs: Mutex::new(pgs) })
    }

    /// Records that `range` of the extent changed while its PG was degraded. Returns once
    /// the extent is on record durably.
    pub async fn record(
        &self,
        pool: PoolId,
        pg: PgId,
        volume: VolumeId,
        extent: ExtentIndex,
        range: Range<u32>,
    ) -> Result<(), DirtyError> {
        if self.merge(pool, pg, volume, extent, &range) {
            return Ok(());
        }
        // First write to this extent since the PG became degraded: on record durably first.
        let key = (pool.0, pg.0, volume.0, extent.0);
        self.write(move |table| table.insert(key, ()).map(drop)).await?;
        let mut pgs = self.pgs.lock().expect("dirty lock");
        let extents = pgs.entry((pool, pg)).or_default();
        let entry = extents.entry((volume, extent)).or_insert_with(|| DirtyExtent {
            volume,
            extent,
            ranges: Vec::new(),
            generation: 0,
        });
        add_range(&mut entry.ranges, range);
        entry.generation += 1;
        Ok(())
    }

    /// Adds `range` to an extent already on record; false if it is not on record yet.
    fn merge(&self, pool: PoolId, pg: PgId, volume: VolumeId, extent: ExtentIndex, range: &Range<u32>) -> bool {
        let mut pgs = self.pgs.lock().expect("dirty lock");
        let Some(entry) = pgs.get_mut(&(pool, pg)).and_then(|e| e.get_mut(&(volume, extent))) else {
            return false;
        };
        add_range(&mut entry.ranges, range.clone());
        entry.generation += 1;
        true
    }

    /// The changed extents of a PG, in (volume, extent) order.
    pub fn snapshot(&self, pool: PoolId, pg: PgId) -> Vec<DirtyExtent> {
        let pgs = self.pgs.lock().expect("dirty lock");
        pgs.get(&(pool, pg)).map(|e| e.values().cloned().collect()).unwrap_or_default()
    }

    /// Bytes changed in a PG since it became degraded, as far as this replica knows.
    pub fn bytes(&self, pool: PoolId, pg: PgId) -> u64 {
        let pgs = self.pgs.lock().expect("dirty lock");
        pgs.get(&(pool, pg)).map(|e| e.values().map(DirtyExtent::bytes).sum()).unwrap_or(0)
    }

    /// PGs with changes on record.
    pub fn pgs(&self) -> Vec<(PoolId, PgId)> {
        self.pgs.lock().expect("dirty lock").keys().copied().collect()
    }

    /// Commits one change to the table, off the async threads (a commit syncs the file).
    async fn write(
        &self,
        change: impl FnOnce(&mut redb::Table<(u32, u32, u64, u64), ()>) -> Result<(), redb::StorageError> + Send + 'static,
    ) -> Result<(), DirtyError> {
        let db = self.db.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<(), Boxed> {
            let tx = db.begin_write()?;
            change(&mut tx.open_table(DIRTY)?)?;
            tx.commit()?;
            Ok(())
        })
        .await;
        match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(DirtyError { path: self.path.clone(), source }),
            Err(join) => Err(DirtyError { path: self.path.clone(), source: join.into() }),
        }
    }

    /// Forgets a PG's changes: every replica of it is acting again and holds them.
    pub async fn clear(&self, pool: PoolId, pg: PgId) -> Result<(), DirtyError> {
        let (first, last) = ((pool.0, pg.0, 0u64, 0u64), (pool.0, pg.0, u64::MAX, u64::MAX));
        self.write(move |table| table.retain_in(first..=last, |_, _| false)).await?;
        self.pgs.lock().expect("dirty lock").remove(&(pool, pg));
        Ok(())
    }
}

/// Adds `range` to sorted, disjoint `ranges`, merging neighbours; past
/// `RANGES_PER_EXTENT_MAX` the whole extent counts as changed.
pub(crate) fn add_range(ranges: &mut Vec<Range<u32>>, range: Range<u32>) {
    let (mut start, mut end) = (range.start, range.end);
    ranges.retain(|r| {
        let touches = r.start <= end && start <= r.end;
        if touches {
            start = start.min(r.start);
            end = end.max(r.end);
        }
        !touches
    });
    let at = ranges.partition_point(|r| r.start < start);
    ranges.insert(at, start..end);
    if ranges.len() > RANGES_PER_EXTENT_MAX {
        *ranges = whole_extent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn touching_ranges_merge_and_others_stay_sorted() {
        let mut ranges = Vec::new();
        add_range(&mut ranges, 8192..12288);
        add_range(&mut ranges, 0..4096);
        add_range(&mut ranges, 4096..8192);
        add_range(&mut ranges, 65536..69632);
        assert_eq!(ranges, vec![0..12288, 65536..69632]);
    }

    #[test]
    fn too_many_ranges_make_the_whole_extent_dirty() {
        let mut ranges = Vec::new();
        for i in 0..=RANGES_PER_EXTENT_MAX as u32 {
            add_range(&mut ranges, i * 8192..i * 8192 + 4096);
        }
        assert_eq!(ranges, whole_extent());
    }

    proptest! {
        #[test]
        fn ranges_cover_every_byte_added_and_stay_disjoint(adds in proptest::collection::vec((0u32..1024, 1u32..16), 1..40)) {
            let mut ranges = Vec::new();
            for (start, len) in &adds {
                add_range(&mut ranges, start * 512..(start + len) * 512);
            }
            for pair in ranges.windows(2) {
                prop_assert!(pair[0].end < pair[1].start);
            }
            for (start, len) in adds {
                let (s, e) = (start * 512, (start + len) * 512);
                prop_assert!(ranges.iter().any(|r| r.start <= s && e <= r.end));
            }
        }
    }
}
