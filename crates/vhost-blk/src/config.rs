//! The virtio-blk configuration space (virtio 1.2, 5.2.4), encoded by hand in its
//! little-endian layout so no unsafe byte view of a C struct is needed.

use crate::request::{DISCARD_SECTORS_MAX, DISCARD_SEG_MAX, SEG_MAX};

/// Bytes of the configuration layout we fill (up to `write_zeroes_may_unmap` and padding).
pub const CONFIG_BYTES: usize = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity_sectors: u64,
    pub num_queues: u16,
}

impl BlkConfig {
    pub fn encode(&self) -> [u8; CONFIG_BYTES] {
        let mut out = [0u8; CONFIG_BYTES];
        out[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        out[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        out[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
                                                            // writeback (32) stays 0: the device is write-through, each write durable when done.
        out[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        out[36..40].copy_from_slice(&DISCARD_SECTORS_MAX.to_le_bytes()); // max_discard_sectors
        out[40..44].copy_from_slice(&DISCARD_SEG_MAX.to_le_bytes()); // max_discard_seg
        out[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        out[48..52].copy_from_slice(&DISCARD_SECTORS_MAX.to_le_bytes()); // max_write_zeroes_sectors
        out[52..56].copy_from_slice(&DISCARD_SEG_MAX.to_le_bytes()); // max_write_zeroes_seg
        out[56] = 1; // write_zeroes_may_unmap
        out
    }

    /// The bytes QEMU asks for: exactly `size` from `offset`, zero beyond our layout.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.encode();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize).saturating_add(size as usize).min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_return_exactly_the_bytes_asked_for() {
        let config = BlkConfig { capacity_sectors: 2048, num_queues: 2 };
        assert_eq!(config.read(0, 8), 2048u64.to_le_bytes().to_vec());
        assert_eq!(config.read(34, 2), 2u16.to_le_bytes().to_vec());
        assert_eq!(config.read(56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(config.read(u32::MAX, 4), vec![0; 4]);
    }
}
