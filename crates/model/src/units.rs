//! Units, sizes and the stable extent-to-placement-group hash.

use crate::ids::{ExtentIndex, PgId, VolumeId};

/// The fixed size of an extent: the unit of allocation on a disk and of placement.
pub const EXTENT_SIZE_BYTES: u64 = 4 << 20;
/// The unit of addressing a guest and the data path use.
pub const SECTOR_SIZE_BYTES: u64 = 512;
/// Placement groups per pool: enough to spread a pool evenly over a few dozen disks.
pub const PG_COUNT_DEFAULT: u32 = 128;
/// Copies of each extent a pool may keep.
pub const REPLICAS_MAX: u8 = 3;
/// Largest volume (256 TiB): offsets and extent counts stay far from overflow.
pub const VOLUME_SIZE_MAX_BYTES: u64 = 256 << 40;
/// Volumes one cluster holds: bounds the state every node keeps and every snapshot carries.
pub const VOLUMES_MAX: usize = 16_384;

const _: () = assert!(EXTENT_SIZE_BYTES.is_multiple_of(SECTOR_SIZE_BYTES));
const _: () = assert!(EXTENT_SIZE_BYTES.is_power_of_two());

/// The extent holding byte `offset_bytes` of a volume, and the offset within that extent.
pub fn extent_of(offset_bytes: u64) -> (ExtentIndex, u64) {
    (ExtentIndex(offset_bytes / EXTENT_SIZE_BYTES), offset_bytes % EXTENT_SIZE_BYTES)
}

/// The placement group of an extent: a stable hash, identical on every node and release,
/// so that neighbouring extents of a volume land on different disks.
pub fn pg_of(volume: VolumeId, extent: ExtentIndex, pg_count: u32) -> PgId {
    assert!(pg_count > 0, "a pool has at least one placement group");
    let h = splitmix64(splitmix64(volume.0) ^ extent.0);
    PgId((h % u64::from(pg_count)) as u32)
}

/// SplitMix64's finaliser: a fixed, well-mixed 64-bit permutation.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("Size {0:?} is not a number with an optional unit (K, M, G, T), for example 20G")]
    Malformed(String),
    #[error("Size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size such as `4096`, `512K`, `256M`, `20G`, `1T` (binary units; an optional
/// trailing `B` or `iB` is accepted).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let upper = trimmed.to_ascii_uppercase();
    let without_b = upper.strip_suffix("IB").or_else(|| upper.strip_suffix('B')).unwrap_or(&upper);
    let (digits, shift) = match without_b.chars().last() {
        Some('K') => (&without_b[..without_b.len() - 1], 10),
        Some('M') => (&without_b[..without_b.len() - 1], 20),
        Some('G') => (&without_b[..without_b.len() - 1], 30),
        Some('T') => (&without_b[..without_b.len() - 1], 40),
        _ => (without_b, 0),
    };
    let number: u64 = digits.trim().parse().map_err(|_| SizeError::Malformed(text.to_string()))?;
    number.checked_mul(1u64 << shift).ok_or_else(|| SizeError::Overflow(text.to_string()))
}

/// Formats a byte count for people: `4.0 MiB`, `20.0 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
    }

    #[test]
    fn malformed_and_overflowing_sizes_are_rejected() {
        assert_eq!(parse_size("twenty"), Err(SizeError::Malformed("twenty".into())));
        assert_eq!(parse_size("-1G"), Err(SizeError::Malformed("-1G".into())));
        assert_eq!(parse_size("99999999999T"), Err(SizeError::Overflow("99999999999T".into())));
    }

    #[test]
    fn extent_of_splits_offset_at_extent_boundaries() {
        assert_eq!(extent_of(EXTENT_SIZE_BYTES - 1), (ExtentIndex(0), EXTENT_SIZE_BYTES - 1));
        assert_eq!(extent_of(EXTENT_SIZE_BYTES + 512), (ExtentIndex(1), 512));
    }

    #[test]
    fn pg_hash_is_stable_across_releases() {
        // Changing the hash would move every extent: these values are part of the format.
        let pgs: Vec<u32> = (0..4).map(|e| pg_of(VolumeId(1), ExtentIndex(e), 128).0).collect();
        assert_eq!(pgs, [30, 30, 107, 3]);
        let spread: std::collections::BTreeSet<_> = (0..64).map(|e| pg_of(VolumeId(7), ExtentIndex(e), 128)).collect();
        assert!(spread.len() > 32, "64 consecutive extents land on {} PGs", spread.len());
    }
}
