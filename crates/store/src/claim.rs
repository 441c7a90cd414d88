//! Claiming a device deliberately: before converge formats a device (or a file standing in
//! for one) that already exists, it looks for signs that something else uses it, and says
//! what it found. `disk add --force` overrides what is written on it, never a device that
//! is mounted or held open by the kernel (block devices are also opened `O_EXCL`).

use std::path::Path;

/// How much of the device's start the signatures need (ZFS puts its uberblocks 128 KiB in).
pub const PROBE_BYTES: usize = 256 << 10;

/// What the first `PROBE_BYTES` of a device say it holds, if anything: a file system, a
/// volume manager's label, swap, an encrypted volume or a partition table. Zeros, or bytes
/// with none of these signatures, give `None`.
pub fn signature(head: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    // Most specific first: a file system's own boot sector also ends in 0x55AA.
    let known: [(usize, &[u8], &'static str); 16] = [
        (1080, &[0x53, 0xef], "an ext2/ext3/ext4 file system"),
        (0, b"XFSB", "an XFS file system"),
        (0x10040, b"_BHRfS_M", "a btrfs file system"),
        (3, b"NTFS    ", "an NTFS file system"),
        (82, b"FAT32   ", "a FAT32 file system"),
        (54, b"FAT1", "a FAT file system"),
        (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
        // md RAID superblocks 1.1 (at the start) and 1.2 (4 KiB in): magic 0xa92b4efc.
        (0, &[0xfc, 0x4e, 0x2b, 0xa9], "a member of an md RAID array"),
        (4096, &[0xfc, 0x4e, 0x2b, 0xa9], "a member of an md RAID array"),
        // bcache's superblock, 4 KiB in, its magic 24 bytes into it.
        (
            4096 + 24,
            &[0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81],
            "a bcache device",
        ),
        // The first uberblock of ZFS's first vdev label: magic 0x00bab10c.
        (128 << 10, &[0x0c, 0xb1, 0xba, 0x00, 0x00, 0x00, 0x00, 0x00], "a ZFS pool member"),
        (512, b"LABELONE", "an LVM physical volume"),
        (4086, b"SWAPSPACE2", "a swap area"),
        (32769, b"CD001", "an ISO 9660 image"),
        (512, b"EFI PART", "a GPT partition table"),
        (510, &[0x55, 0xaa], "a partition table or boot sector (MBR)"),
    ];
    known.iter().find(|(offset, magic, _)| at(*offset, magic)).map(|(_, _, what)| *what)
}

/// Whether the kernel uses the regular file at `path` as a loop device's backing file: then
/// it is a disk of the host, mounted or about to be.
pub fn loop_device_backed_by(path: &Path) -> Option<String> {
    let target = std::fs::canonicalize(path).ok()?;
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing = std::fs::read_to_string(entry.path().join("loop/backing_file")).unwrap_or_default();
        if Path::new(backing.trim()) == target {
            return Some(format!("/dev/{name}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; PROBE_BYTES];
        head[offset..offset + magic.len()].copy_from_slice(magic);
        head
    }

    #[test]
    fn file_systems_labels_and_partition_tables_are_recognised() {
        assert_eq!(signature(&with(1080, &[0x53, 0xef])), Some("an ext2/ext3/ext4 file system"));
        assert_eq!(signature(&with(0x10040, b"_BHRfS_M")), Some("a btrfs file system"));
        assert_eq!(signature(&with(512, b"LABELONE")), Some("an LVM physical volume"));
        assert_eq!(signature(&with(4086, b"SWAPSPACE2")), Some("a swap area"));
        assert_eq!(signature(&with(4096, &[0xfc, 0x4e, 0x2b, 0xa9])), Some("a member of an md RAID array"));
        assert_eq!(signature(&with(128 << 10, &[0x0c, 0xb1, 0xba, 0, 0, 0, 0, 0])), Some("a ZFS pool member"));
        let bcache = [0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81];
        assert_eq!(signature(&with(4096 + 24, &bcache)), Some("a bcache device"));
        assert_eq!(signature(&with(510, &[0x55, 0xaa])), Some("a partition table or boot sector (MBR)"));
        let mut gpt = with(510, &[0x55, 0xaa]);
        gpt[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(signature(&gpt), Some("a GPT partition table"), "a protective MBR is a GPT disk");
    }

    #[test]
    fn zeros_random_bytes_and_short_heads_hold_nothing() {
        assert_eq!(signature(&vec![0u8; PROBE_BYTES]), None);
        let noise: Vec<u8> = (0..PROBE_BYTES as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        assert_eq!(signature(&noise), None);
        assert_eq!(signature(&[0x55; 100]), None, "a head shorter than a signature's place is not read past");
    }
}
