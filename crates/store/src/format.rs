//! converge's on-disk format. Pure encoding and decoding; no IO.
//!
//! ```text
//! offset 0                 superblock (4 KiB): magic, version, ids, layout, crc32c
//! offset 4 KiB             extent table: one 32-byte entry per extent slot
//! offset data_offset       extent slots, EXTENT_SIZE_BYTES each (data_offset is 1 MiB aligned)
//! ```
//!
//! A table entry names the (volume, extent) a slot holds. An all-zero entry is a free slot
//! (a fresh device); any other entry carries a crc32c, so a torn or damaged entry is
//! detected instead of handing out another volume's data.

use model::{ClusterId, DiskId, ExtentIndex, NodeId, VolumeId, EXTENT_SIZE_BYTES};

pub const SUPERBLOCK_BYTES: u64 = 4096;
pub const MAGIC: [u8; 8] = *b"CNVGDSK1";
pub const FORMAT_VERSION: u32 = 1;
pub const TABLE_OFFSET_BYTES: u64 = SUPERBLOCK_BYTES;
pub const TABLE_ENTRY_BYTES: u64 = 32;
/// The unit in which the table is written: one direct IO, atomic on 4K-sector devices.
pub const TABLE_BLOCK_BYTES: u64 = 4096;
pub const ENTRIES_PER_TABLE_BLOCK: u64 = TABLE_BLOCK_BYTES / TABLE_ENTRY_BYTES;
pub const DATA_ALIGN_BYTES: u64 = 1 << 20;

const _: () = assert!(TABLE_BLOCK_BYTES.is_multiple_of(TABLE_ENTRY_BYTES));
const _: () = assert!(EXTENT_SIZE_BYTES.is_multiple_of(DATA_ALIGN_BYTES));

const ENTRY_USED: u32 = 1;
const ENTRY_FREED: u32 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("it is {size_bytes} bytes; a disk must hold at least {min_bytes} bytes")]
    TooSmall { size_bytes: u64, min_bytes: u64 },
    #[error("it has no converge superblock (it is not a converge disk, or its start was overwritten)")]
    NoMagic,
    #[error("its superblock is from format version {0}, which this converge does not read")]
    UnknownVersion(u32),
    #[error("its superblock checksum does not match: the superblock is damaged")]
    SuperblockChecksum,
    #[error("its superblock describes a layout that does not fit the device: {0}")]
    BadLayout(String),
    #[error("extent table entry {slot} is damaged (checksum mismatch)")]
    EntryChecksum { slot: u64 },
    #[error("extent table entry {slot} has unknown state {state}")]
    EntryState { slot: u64, state: u32 },
    #[error("extent {extent} of {volume} is recorded in two slots, {first} and {second}")]
    DuplicateExtent { volume: VolumeId, extent: ExtentIndex, first: u64, second: u64 },
}

/// The first 4 KiB of a converge disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub disk: DiskId,
    pub node: NodeId,
    pub cluster: ClusterId,
    pub size_bytes: u64,
    pub extent_slots: u64,
    pub data_offset_bytes: u64,
}

impl Superblock {
    /// The layout for a device of `size_bytes`: as many extent slots as fit after the table.
    pub fn new(disk: DiskId, node: NodeId, cluster: ClusterId, size_bytes: u64) -> Result<Self, FormatError> {
        // Size the table for an upper bound of slots, then count what fits after it.
        let slots_upper = size_bytes / EXTENT_SIZE_BYTES;
        let data_offset_bytes = data_offset_for(slots_upper);
        let extent_slots = size_bytes.saturating_sub(data_offset_bytes) / EXTENT_SIZE_BYTES;
        if extent_slots == 0 {
            let min_bytes = data_offset_for(1) + EXTENT_SIZE_BYTES;
            return Err(FormatError::TooSmall { size_bytes, min_bytes });
        }
        Ok(Superblock { disk, node, cluster, size_bytes, extent_slots, data_offset_bytes })
    }

    pub fn table_blocks(&self) -> u64 {
        self.extent_slots.div_ceil(ENTRIES_PER_TABLE_BLOCK)
    }

    pub fn table_bytes(&self) -> u64 {
        self.table_blocks() * TABLE_BLOCK_BYTES
    }

    pub fn slot_offset(&self, slot: u64) -> u64 {
        assert!(slot < self.extent_slots, "slot {slot} past {}", self.extent_slots);
        self.data_offset_bytes + slot * EXTENT_SIZE_BYTES
    }

    /// The table block holding `slot`'s entry, and the block's device offset.
    pub fn table_block_of(&self, slot: u64) -> (u64, u64) {
        let block = slot / ENTRIES_PER_TABLE_BLOCK;
        (block, TABLE_OFFSET_BYTES + block * TABLE_BLOCK_BYTES)
    }

    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES as usize] {
        let mut out = [0u8; SUPERBLOCK_BYTES as usize];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.disk.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.node.0.to_le_bytes());
        out[32..48].copy_from_slice(&self.cluster.0.to_le_bytes());
        out[48..56].copy_from_slice(&self.size_bytes.to_le_bytes());
        out[56..64].copy_from_slice(&EXTENT_SIZE_BYTES.to_le_bytes());
        out[64..72].copy_from_slice(&self.extent_slots.to_le_bytes());
        out[72..80].copy_from_slice(&self.data_offset_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&out[..SUPERBLOCK_CRC_AT]);
        out[SUPERBLOCK_CRC_AT..SUPERBLOCK_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a superblock read from a device of `device_bytes`.
    pub fn decode(bytes: &[u8], device_bytes: u64) -> Result<Self, FormatError> {
        if bytes.len() < SUPERBLOCK_BYTES as usize || bytes[0..8] != MAGIC {
            return Err(FormatError::NoMagic);
        }
        let version = u32_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnknownVersion(version));
        }
        let crc = u32_at(bytes, SUPERBLOCK_CRC_AT);
        if crc != crc32c::crc32c(&bytes[..SUPERBLOCK_CRC_AT]) {
            return Err(FormatError::SuperblockChecksum);
        }
        let sb = Superblock {
            disk: DiskId(u64_at(bytes, 16)),
            node: NodeId(u64_at(bytes, 24)),
            cluster: ClusterId(u128::from_le_bytes(bytes[32..48].try_into().expect("16 bytes"))),
            size_bytes: u64_at(bytes, 48),
            extent_slots: u64_at(bytes, 64),
            data_offset_bytes: u64_at(bytes, 72),
        };
        let extent_bytes = u64_at(bytes, 56);
        if extent_bytes != EXTENT_SIZE_BYTES {
            return Err(FormatError::BadLayout(format!("extent size {extent_bytes}")));
        }
        if sb.size_bytes > device_bytes {
            return Err(FormatError::BadLayout(format!(
                "formatted for {} bytes but the device has {device_bytes} (truncated?)",
                sb.size_bytes
            )));
        }
        let data_end = sb.extent_slots.checked_mul(EXTENT_SIZE_BYTES).and_then(|b| b.checked_add(sb.data_offset_bytes));
        let table_end = TABLE_OFFSET_BYTES + sb.extent_slots.div_ceil(ENTRIES_PER_TABLE_BLOCK) * TABLE_BLOCK_BYTES;
        match data_end {
            Some(end) if end <= sb.size_bytes && table_end <= sb.data_offset_bytes && sb.extent_slots > 0 => Ok(sb),
            _ => Err(FormatError::BadLayout(format!(
                "{} slots from offset {} do not fit {} bytes",
                sb.extent_slots, sb.data_offset_bytes, sb.size_bytes
            ))),
        }
    }
}

const SUPERBLOCK_CRC_AT: usize = 4092;

fn data_offset_for(slots: u64) -> u64 {
    let table = slots.div_ceil(ENTRIES_PER_TABLE_BLOCK).max(1) * TABLE_BLOCK_BYTES;
    (TABLE_OFFSET_BYTES + table).next_multiple_of(DATA_ALIGN_BYTES)
}

/// What an extent slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEntry {
    Free,
    Used { volume: VolumeId, extent: ExtentIndex },
}

impl TableEntry {
    pub fn encode(&self) -> [u8; TABLE_ENTRY_BYTES as usize] {
        let mut out = [0u8; TABLE_ENTRY_BYTES as usize];
        let (volume, extent, state) = match *self {
            TableEntry::Free => (0, 0, ENTRY_FREED),
            TableEntry::Used { volume, extent } => (volume.0, extent.0, ENTRY_USED),
        };
        out[0..8].copy_from_slice(&volume.to_le_bytes());
        out[8..16].copy_from_slice(&extent.to_le_bytes());
        out[16..20].copy_from_slice(&state.to_le_bytes());
        let crc = crc32c::crc32c(&out[..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8], slot: u64) -> Result<Self, FormatError> {
        assert_eq!(bytes.len(), TABLE_ENTRY_BYTES as usize);
        if bytes.iter().all(|&b| b == 0) {
            return Ok(TableEntry::Free);
        }
        if u32_at(bytes, 28) != crc32c::crc32c(&bytes[..28]) {
            return Err(FormatError::EntryChecksum { slot });
        }
        match u32_at(bytes, 16) {
            ENTRY_FREED => Ok(TableEntry::Free),
            ENTRY_USED => {
                Ok(TableEntry::Used { volume: VolumeId(u64_at(bytes, 0)), extent: ExtentIndex(u64_at(bytes, 8)) })
            }
            state => Err(FormatError::EntryState { slot, state }),
        }
    }
}

/// Decodes the whole table: entry `i` describes slot `i`. Refuses a table where one extent
/// appears twice, since either copy could be stale.
pub fn decode_table(bytes: &[u8], extent_slots: u64) -> Result<Vec<TableEntry>, FormatError> {
    assert!(bytes.len() as u64 >= extent_slots * TABLE_ENTRY_BYTES);
    let mut seen = std::collections::HashMap::new();
    let mut entries = Vec::with_capacity(extent_slots as usize);
    for slot in 0..extent_slots {
        let at = (slot * TABLE_ENTRY_BYTES) as usize;
        let entry = TableEntry::decode(&bytes[at..at + TABLE_ENTRY_BYTES as usize], slot)?;
        if let TableEntry::Used { volume, extent } = entry {
            if let Some(first) = seen.insert((volume, extent), slot) {
                return Err(FormatError::DuplicateExtent { volume, extent, first, second: slot });
            }
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn superblock(size_bytes: u64) -> Superblock {
        Superblock::new(DiskId(7), NodeId(3), ClusterId(0xabc), size_bytes).expect("fits")
    }

    #[test]
    fn one_gib_disk_holds_255_extents_after_a_1_mib_header() {
        let sb = superblock(GIB);
        assert_eq!(sb.data_offset_bytes, 1 << 20);
        assert_eq!(sb.extent_slots, 255);
    }

    #[test]
    fn disk_too_small_for_one_extent_is_refused() {
        let refused = Superblock::new(DiskId(1), NodeId(1), ClusterId(1), 4 << 20);
        assert_eq!(refused, Err(FormatError::TooSmall { size_bytes: 4 << 20, min_bytes: 5 << 20 }));
    }

    #[test]
    fn flipped_bit_in_superblock_is_detected() {
        let mut bytes = superblock(GIB).encode();
        bytes[50] ^= 1;
        assert_eq!(Superblock::decode(&bytes, GIB), Err(FormatError::SuperblockChecksum));
    }

    #[test]
    fn superblock_of_a_truncated_device_is_refused() {
        let bytes = superblock(GIB).encode();
        assert!(matches!(Superblock::decode(&bytes, GIB / 2), Err(FormatError::BadLayout(_))));
    }

    #[test]
    fn zeroed_device_has_no_superblock() {
        assert_eq!(Superblock::decode(&[0u8; 4096], GIB), Err(FormatError::NoMagic));
    }

    #[test]
    fn damaged_table_entry_is_detected() {
        let mut bytes = TableEntry::Used { volume: VolumeId(1), extent: ExtentIndex(2) }.encode();
        bytes[3] ^= 0x40;
        assert_eq!(TableEntry::decode(&bytes, 9), Err(FormatError::EntryChecksum { slot: 9 }));
    }

    #[test]
    fn extent_recorded_twice_is_refused() {
        let used = TableEntry::Used { volume: VolumeId(1), extent: ExtentIndex(2) }.encode();
        let table = [used, used].concat();
        let refused = decode_table(&table, 2);
        assert_eq!(
            refused,
            Err(FormatError::DuplicateExtent { volume: VolumeId(1), extent: ExtentIndex(2), first: 0, second: 1 })
        );
    }

    proptest! {
        #[test]
        fn superblock_round_trips_and_layout_fits(size_bytes in (5u64 << 20)..(1u64 << 44)) {
            let sb = superblock(size_bytes);
            prop_assert_eq!(Superblock::decode(&sb.encode(), size_bytes), Ok(sb));
            prop_assert!(sb.data_offset_bytes >= TABLE_OFFSET_BYTES + sb.table_bytes());
            prop_assert!(sb.data_offset_bytes + sb.extent_slots * EXTENT_SIZE_BYTES <= size_bytes);
            // No more than one extent's worth of space is lost to the header's rounding.
            prop_assert!(size_bytes - sb.data_offset_bytes - sb.extent_slots * EXTENT_SIZE_BYTES < EXTENT_SIZE_BYTES);
        }

        #[test]
        fn table_entries_round_trip(volume: u64, extent: u64) {
            let entry = TableEntry::Used { volume: VolumeId(volume), extent: ExtentIndex(extent) };
            prop_assert_eq!(TableEntry::decode(&entry.encode(), 0), Ok(entry));
        }
    }
}
