//! `LocalDisk`: one device given whole to converge, holding extents of many volumes.
//!
//! Allocation order makes a crash at any point safe: a slot is zeroed and synced, then
//! its table entry is written (O_DSYNC), and only then is data written into it. A slot
//! whose entry never reached the disk is free after a restart; a slot whose entry did
//! holds zeros or data, never another volume's bytes.

use crate::buf::{AlignedBuf, IoMemory};
use crate::error::StoreError;
use crate::format::{
    decode_table, Superblock, TableEntry, ENTRIES_PER_TABLE_BLOCK, SUPERBLOCK_BYTES, TABLE_BLOCK_BYTES,
    TABLE_ENTRY_BYTES, TABLE_OFFSET_BYTES,
};
use crate::ring::{Op, Ring};
use model::{
    ClusterId, DiskHealth, DiskId, DiskReport, ExtentIndex, NodeId, VolumeId, EXTENT_SIZE_BYTES, SECTOR_SIZE_BYTES,
};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Largest single IO the store issues when it writes zeros itself.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
const _: () = assert!(EXTENT_SIZE_BYTES.is_multiple_of(ZERO_CHUNK_BYTES as u64));

/// Who a disk belongs to; written into its superblock when it is formatted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskIdentity {
    pub disk: DiskId,
    pub node: NodeId,
    pub cluster: ClusterId,
}

pub struct LocalDisk {
    path: PathBuf,
    sb: Superblock,
    ring: Ring,
    /// Where each allocated extent lives. Read on every IO; written on allocation and free.
    index: RwLock<HashMap<(VolumeId, ExtentIndex), u64>>,
    /// Serialises changes to the table, so two writes of one table block never race.
    alloc: tokio::sync::Mutex<Allocator>,
    /// IO holds this shared from looking up a slot until the IO is done; freeing a slot holds
    /// it exclusively, so a slot is never reused while an IO to its old extent is in flight.
    slot_use: tokio::sync::RwLock<()>,
}

struct Allocator {
    /// The table as it is on disk, in whole blocks.
    table: AlignedBuf,
    free: BTreeSet<u64>,
}

impl LocalDisk {
    /// Formats `path` for converge. A missing path is created as a file of `size_bytes`;
    /// an existing device or file is used whole, unless it already is a converge disk.
    pub async fn create(path: &Path, size_bytes: Option<u64>, identity: DiskIdentity) -> Result<Self, StoreError> {
        Self::claim(path, size_bytes, identity, false).await
    }

    /// Formats the device at `path` (a file of `size_bytes` is created if it does not
    /// exist). An existing device that holds a file system, a partition table, another
    /// converge disk or anything else `claim::signature` knows is refused unless `force`; one
    /// that is mounted or held by the kernel is always refused.
    pub async fn claim(
        path: &Path,
        size_bytes: Option<u64>,
        identity: DiskIdentity,
        force: bool,
    ) -> Result<Self, StoreError> {
        let created = match (path.exists(), size_bytes) {
            (false, None) => return Err(StoreError::NotFound { path: path.into() }),
            (false, Some(size)) => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .and_then(|f| f.set_len(size))
                    .map_err(|source| io_error(path, "creating the disk file", 0, source))?;
                true
            }
            (true, _) => false,
        };
        let result = Self::format(path, size_bytes, identity, created, force).await;
        if result.is_err() && created {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    async fn format(
        path: &Path,
        size_bytes: Option<u64>,
        identity: DiskIdentity,
        created: bool,
        force: bool,
    ) -> Result<Self, StoreError> {
        if let Some(device) = crate::claim::loop_device_backed_by(path) {
            return Err(StoreError::InUse { path: path.into(), what: format!("the backing file of {device}") });
        }
        let (ring, device_bytes) = open_ring(path)?;
        if let Some(requested_bytes) = size_bytes.filter(|&s| s != device_bytes) {
            return Err(StoreError::SizeMismatch { path: path.into(), actual_bytes: device_bytes, requested_bytes });
        }
        if !created && !force {
            let probe = (crate::claim::PROBE_BYTES as u64).min(device_bytes & !(SECTOR_SIZE_BYTES - 1));
            let head = read_at(&ring, path, 0, probe as usize).await?;
            if let Ok(sb) = Superblock::decode(head.as_slice(), device_bytes) {
                return Err(StoreError::AlreadyFormatted { path: path.into(), disk: sb.disk, cluster: sb.cluster });
            }
            if let Some(what) = crate::claim::signature(head.as_slice()) {
                return Err(StoreError::HoldsData { path: path.into(), what });
            }
            // Not zeros and nothing known: still somebody's data.
            if head.as_slice().iter().any(|&b| b != 0) {
                return Err(StoreError::HoldsData { path: path.into(), what: "data converge does not recognise" });
            }
        }
        let sb = Superblock::new(identity.disk, identity.node, identity.cluster, device_bytes)
            .map_err(|reason| StoreError::Format { path: path.into(), reason })?;
        if created {
            // Reserve the file's blocks now, so a full host filesystem shows here and not
            // as a failed guest write later.
            let op = Op::Fallocate { mode: 0, offset: 0, len: device_bytes };
            ring.submit(op).await.result.map_err(|e| io_error(path, "reserving space for the disk file", 0, e))?;
        }
        // The table first, the superblock last: a format cut short leaves no superblock.
        let table = AlignedBuf::zeroed(sb.table_bytes() as usize);
        write_at(&ring, path, TABLE_OFFSET_BYTES, Arc::new(table), None).await?;
        let head = Arc::new(AlignedBuf::copy_from(&sb.encode()));
        write_at(&ring, path, 0, head, None).await?;
        tracing::info!(path = %path.display(), disk = %sb.disk, slots = sb.extent_slots, "formatted disk");
        Self::load(path.into(), ring, device_bytes, identity.disk).await
    }

    /// Opens a disk formatted earlier, checking it is the one expected.
    pub async fn open(path: &Path, expected: DiskId) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::NotFound { path: path.into() });
        }
        let (ring, device_bytes) = open_ring(path)?;
        Self::load(path.into(), ring, device_bytes, expected).await
    }

    async fn load(path: PathBuf, ring: Ring, device_bytes: u64, expected: DiskId) -> Result<Self, StoreError> {
        let format_error = |reason| StoreError::Format { path: path.clone(), reason };
        let head = read_at(&ring, &path, 0, SUPERBLOCK_BYTES as usize).await?;
        let sb = Superblock::decode(head.as_slice(), device_bytes).map_err(format_error)?;
        if sb.disk != expected {
            return Err(StoreError::WrongDisk { path, expected, found: sb.disk });
        }
        let table = read_at(&ring, &path, TABLE_OFFSET_BYTES, sb.table_bytes() as usize).await?;
        let entries = decode_table(table.as_slice(), sb.extent_slots).map_err(format_error)?;
        let mut index = HashMap::new();
        let mut free = BTreeSet::new();
        for (slot, entry) in entries.iter().enumerate() {
            match *entry {
                TableEntry::Free => free.insert(slot as u64),
                TableEntry::Used { volume, extent } => index.insert((volume, extent), slot as u64).is_none(),
            };
        }
        Ok(LocalDisk {
            path,
            sb,
            ring,
            index: RwLock::new(index),
            alloc: tokio::sync::Mutex::new(Allocator { table, free }),
            slot_use: tokio::sync::RwLock::new(()),
        })
    }

    pub fn id(&self) -> DiskId {
        self.sb.disk
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn extents_used(&self) -> u64 {
        self.index.read().expect("index lock").len() as u64
    }

    pub fn report(&self) -> DiskReport {
        DiskReport {
            disk: self.sb.disk,
            health: DiskHealth::Ok,
            extents_used: self.extents_used(),
            extents_total: self.sb.extent_slots,
        }
    }

    /// Every extent this disk holds.
    pub fn extents(&self) -> Vec<(VolumeId, ExtentIndex)> {
        self.index.read().expect("index lock").keys().copied().collect()
    }

    fn slot_of(&self, volume: VolumeId, extent: ExtentIndex) -> Option<u64> {
        self.index.read().expect("index lock").get(&(volume, extent)).copied()
    }

    fn check_range(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), StoreError> {
        let aligned = offset_bytes.is_multiple_of(SECTOR_SIZE_BYTES) && len_bytes.is_multiple_of(SECTOR_SIZE_BYTES);
        let inside = offset_bytes.checked_add(len_bytes).is_some_and(|end| end <= EXTENT_SIZE_BYTES);
        if aligned && inside && len_bytes > 0 {
            Ok(())
        } else {
            Err(StoreError::BadRange { disk: self.sb.disk, volume, extent, offset_bytes, len_bytes })
        }
    }

    /// Writes `buf[range]` at `offset_bytes` within the extent, allocating the extent on its
    /// first write. Returns once the data is durable. The data goes to the device straight
    /// from `buf` when its address suits direct IO, through an aligned copy otherwise.
    pub async fn write(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        offset_bytes: u64,
        buf: Arc<dyn IoMemory>,
        range: Range<usize>,
    ) -> Result<(), StoreError> {
        let len_bytes = range.len() as u64;
        self.check_range(volume, extent, offset_bytes, len_bytes)?;
        assert!(range.end <= buf.io_len(), "caller passed a bad buffer range");
        let (buf, range): (Arc<dyn IoMemory>, Range<usize>) = if buf.aligned(&range, SECTOR_SIZE_BYTES as usize) {
            (buf, range)
        } else {
            (Arc::new(AlignedBuf::copy_from(buf.bytes(range.clone()))), 0..range.len())
        };
        let _in_use = self.slot_use.read().await;
        let slot = match self.slot_of(volume, extent) {
            Some(slot) => slot,
            None => self.allocate(volume, extent).await?,
        };
        let at = self.sb.slot_offset(slot) + offset_bytes;
        write_at(&self.ring, &self.path, at, buf, Some(range)).await
    }

    /// Reads `len_bytes` at `offset_bytes` within the extent. `None` when the extent was never
    /// written: it reads as zeros, and the caller need not move them.
    pub async fn read(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Option<AlignedBuf>, StoreError> {
        self.check_range(volume, extent, offset_bytes, len_bytes)?;
        let _in_use = self.slot_use.read().await;
        let Some(slot) = self.slot_of(volume, extent) else {
            return Ok(None);
        };
        let at = self.sb.slot_offset(slot) + offset_bytes;
        read_at(&self.ring, &self.path, at, len_bytes as usize).await.map(Some)
    }

    /// Reads `range.len()` bytes at `offset_bytes` within the extent straight into
    /// `target[range]` (through an aligned copy if its address does not suit direct IO).
    /// `false` when the extent was never written: the target is left as it is.
    pub async fn read_into(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        offset_bytes: u64,
        target: Arc<dyn IoMemory>,
        range: Range<usize>,
    ) -> Result<bool, StoreError> {
        let len_bytes = range.len() as u64;
        self.check_range(volume, extent, offset_bytes, len_bytes)?;
        assert!(range.end <= target.io_len(), "caller passed a bad target range");
        let _in_use = self.slot_use.read().await;
        let Some(slot) = self.slot_of(volume, extent) else { return Ok(false) };
        let at = self.sb.slot_offset(slot) + offset_bytes;
        if !target.aligned(&range, SECTOR_SIZE_BYTES as usize) {
            let data = read_at(&self.ring, &self.path, at, range.len()).await?;
            target.fill(range.start, data.as_slice());
            return Ok(true);
        }
        read_into_at(&self.ring, &self.path, at, target, range).await?;
        Ok(true)
    }

    /// Makes a range read as zeros and gives its space back: a whole extent is freed, part
    /// of one is zeroed in place. Serves both discard and write-zeroes.
    pub async fn zero(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), StoreError> {
        self.check_range(volume, extent, offset_bytes, len_bytes)?;
        if offset_bytes == 0 && len_bytes == EXTENT_SIZE_BYTES {
            return self.free(volume, extent).await;
        }
        let _in_use = self.slot_use.read().await;
        let Some(slot) = self.slot_of(volume, extent) else {
            return Ok(());
        };
        self.zero_range(self.sb.slot_offset(slot) + offset_bytes, len_bytes).await
    }

    /// Frees an extent: its slot is free once the table says so, and zeroed when reused.
    pub async fn free(&self, volume: VolumeId, extent: ExtentIndex) -> Result<(), StoreError> {
        let _no_io = self.slot_use.write().await;
        let mut alloc = self.alloc.lock().await;
        let Some(slot) = self.slot_of(volume, extent) else {
            return Ok(());
        };
        self.write_entry(&mut alloc, slot, TableEntry::Free).await?;
        self.index.write().expect("index lock").remove(&(volume, extent));
        alloc.free.insert(slot);
        // Give the space back to a thin host filesystem or device; the data is already gone
        // as far as converge is concerned, so a failure here loses nothing.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let op = Op::Fallocate { mode: punch, offset: self.sb.slot_offset(slot), len: EXTENT_SIZE_BYTES };
        if let Err(e) = self.ring.submit(op).await.result {
            tracing::debug!(disk = %self.sb.disk, error = %e, "punching a freed extent failed");
        }
        Ok(())
    }

    async fn allocate(&self, volume: VolumeId, extent: ExtentIndex) -> Result<u64, StoreError> {
        let mut alloc = self.alloc.lock().await;
        // Another write may have allocated it while we waited for the lock.
        if let Some(slot) = self.slot_of(volume, extent) {
            return Ok(slot);
        }
        let Some(slot) = alloc.free.pop_first() else {
            return Err(StoreError::Full { disk: self.sb.disk, slots: self.sb.extent_slots });
        };
        let result = async {
            self.zero_range(self.sb.slot_offset(slot), EXTENT_SIZE_BYTES).await?;
            self.write_entry(&mut alloc, slot, TableEntry::Used { volume, extent }).await
        }
        .await;
        if let Err(e) = result {
            alloc.free.insert(slot);
            return Err(e);
        }
        self.index.write().expect("index lock").insert((volume, extent), slot);
        Ok(slot)
    }

    async fn write_entry(&self, alloc: &mut Allocator, slot: u64, entry: TableEntry) -> Result<(), StoreError> {
        let at = (slot * TABLE_ENTRY_BYTES) as usize;
        let previous: [u8; TABLE_ENTRY_BYTES as usize] =
            alloc.table.as_slice()[at..at + TABLE_ENTRY_BYTES as usize].try_into().expect("entry");
        alloc.table.as_mut_slice()[at..at + TABLE_ENTRY_BYTES as usize].copy_from_slice(&entry.encode());
        let (block, offset) = self.sb.table_block_of(slot);
        let start = (block * ENTRIES_PER_TABLE_BLOCK * TABLE_ENTRY_BYTES) as usize;
        let image = Arc::new(AlignedBuf::copy_from(&alloc.table.as_slice()[start..start + TABLE_BLOCK_BYTES as usize]));
        let result = write_at(&self.ring, &self.path, offset, image, None).await;
        if result.is_err() {
            alloc.table.as_mut_slice()[at..at + TABLE_ENTRY_BYTES as usize].copy_from_slice(&previous);
        }
        result
    }

    /// Zeroes a device range durably: fallocate where the device supports it, else writes.
    async fn zero_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let op = Op::Fallocate { mode: libc::FALLOC_FL_ZERO_RANGE, offset, len };
        match self.ring.submit(op).await.result {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)) => {
                let zeros = Arc::new(AlignedBuf::zeroed(ZERO_CHUNK_BYTES));
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(ZERO_CHUNK_BYTES as u64) as usize;
                    write_at(&self.ring, &self.path, at, zeros.clone(), Some(0..n)).await?;
                    at += n as u64;
                }
            }
            Err(e) => return Err(io_error(&self.path, "zeroing", offset, e)),
        }
        let synced = self.ring.submit(Op::DataSync).await.result;
        synced.map(drop).map_err(|e| io_error(&self.path, "syncing", offset, e))
    }
}

fn io_error(path: &Path, op: &'static str, offset_bytes: u64, source: io::Error) -> StoreError {
    StoreError::Io { path: path.into(), op, offset_bytes, source }
}

/// Opens the device for direct, synchronous IO and starts its ring.
fn open_ring(path: &Path) -> Result<(Ring, u64), StoreError> {
    // A block device is opened exclusively: the kernel refuses it while it is mounted or
    // held by RAID, LVM or device-mapper, and refuses them while converge has it.
    let block_device = std::fs::metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device()
    });
    let exclusive = if block_device { libc::O_EXCL } else { 0 };
    let mut file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC | exclusive)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => {
                StoreError::InUse { path: path.into(), what: "mounted, or held by RAID, LVM or device-mapper".into() }
            }
            _ => io_error(path, "opening", 0, e),
        })?;
    let device_bytes = file.seek(SeekFrom::End(0)).map_err(|e| io_error(path, "sizing", 0, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ring = Ring::new(file, &name).map_err(|e| io_error(path, "setting up io_uring for", 0, e))?;
    Ok((ring, device_bytes))
}

async fn read_at(ring: &Ring, path: &Path, offset: u64, len: usize) -> Result<AlignedBuf, StoreError> {
    let buf = Arc::new(AlignedBuf::zeroed(len));
    read_into_at(ring, path, offset, buf.clone(), 0..len).await?;
    // The ring drops its reference before it reports the completion.
    Ok(Arc::try_unwrap(buf).expect("no IO holds the buffer after the read"))
}

/// Reads into `target[range]` from `offset`, resubmitting after short reads.
async fn read_into_at(
    ring: &Ring,
    path: &Path,
    offset: u64,
    target: Arc<dyn IoMemory>,
    range: Range<usize>,
) -> Result<(), StoreError> {
    let mut done = 0usize;
    while done < range.len() {
        let at = offset + done as u64;
        let op = Op::Read {
            buf: target.clone(),
            buf_offset: range.start + done,
            len: (range.len() - done) as u32,
            offset: at,
        };
        let n = ring.submit(op).await.result.map_err(|e| io_error(path, "reading", at, e))?;
        if n == 0 {
            let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "the device ended early");
            return Err(io_error(path, "reading", at, eof));
        }
        done += n as usize;
    }
    Ok(())
}

async fn write_at(
    ring: &Ring,
    path: &Path,
    offset: u64,
    buf: Arc<dyn IoMemory>,
    range: Option<Range<usize>>,
) -> Result<(), StoreError> {
    let range = range.unwrap_or(0..buf.io_len());
    let mut done = 0usize;
    while done < range.len() {
        let op = Op::Write {
            buf: buf.clone(),
            buf_offset: range.start + done,
            len: (range.len() - done) as u32,
            offset: offset + done as u64,
        };
        let n = ring.submit(op).await.result.map_err(|e| io_error(path, "writing", offset + done as u64, e))?;
        if n == 0 {
            let stuck = io::Error::new(io::ErrorKind::WriteZero, "the device accepted no bytes");
            return Err(io_error(path, "writing", offset + done as u64, stuck));
        }
        done += n as usize;
    }
    Ok(())
}
