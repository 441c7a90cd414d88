//! The store against real files through io_uring and O_DIRECT.

use model::{ClusterId, DiskId, ExtentIndex, NodeId, VolumeId, EXTENT_SIZE_BYTES};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use store::{AlignedBuf, DiskIdentity, LocalDisk, StoreError, StoreErrorKind};

const DISK: DiskId = DiskId(11);
const VOLUME: VolumeId = VolumeId(1);
/// Room for exactly three extents after the 1 MiB header.
const THREE_EXTENTS_BYTES: u64 = (1 << 20) + 3 * EXTENT_SIZE_BYTES;

fn identity() -> DiskIdentity {
    DiskIdentity { disk: DISK, node: NodeId(2), cluster: ClusterId(3) }
}

fn disk_path() -> (tempfile::TempDir, PathBuf) {
    // Under target/, not /tmp: O_DIRECT needs a real filesystem.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let path = dir.path().join("disk.img");
    (dir, path)
}

fn pattern(len: usize, seed: u8) -> Arc<AlignedBuf> {
    let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    Arc::new(AlignedBuf::copy_from(&bytes))
}

async fn write(disk: &LocalDisk, extent: u64, offset: u64, data: &Arc<AlignedBuf>) -> Result<(), StoreError> {
    disk.write(VOLUME, ExtentIndex(extent), offset, data.clone(), 0..data.len()).await
}

async fn read(disk: &LocalDisk, extent: u64, offset: u64, len: u64) -> Option<Vec<u8>> {
    let buf = disk.read(VOLUME, ExtentIndex(extent), offset, len).await.expect("read");
    buf.map(|b| b.as_slice().to_vec())
}

fn damage(path: &PathBuf, offset: u64) {
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&[byte[0] ^ 0xff]).unwrap();
}

#[tokio::test]
async fn written_data_reads_back_after_reopen() {
    let (_dir, path) = disk_path();
    let data = pattern(8192, 7);
    {
        let disk = LocalDisk::create(&path, Some(64 << 20), identity()).await.expect("create");
        write(&disk, 5, 4096, &data).await.expect("write");
    }

    let disk = LocalDisk::open(&path, DISK).await.expect("reopen");

    assert_eq!(read(&disk, 5, 4096, 8192).await.as_deref(), Some(data.as_slice()));
    assert_eq!(read(&disk, 5, 0, 4096).await, Some(vec![0; 4096]), "the rest of a new extent reads as zeros");
    assert_eq!(disk.extents_used(), 1);
}

#[tokio::test]
async fn extent_never_written_reads_as_unallocated() {
    let (_dir, path) = disk_path();
    let disk = LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap();
    assert_eq!(read(&disk, 0, 0, 4096).await, None);
}

#[tokio::test]
async fn full_disk_refuses_new_extents_and_keeps_the_old_ones() {
    let (_dir, path) = disk_path();
    let disk = LocalDisk::create(&path, Some(THREE_EXTENTS_BYTES), identity()).await.unwrap();
    let data = pattern(4096, 1);
    for extent in 0..3 {
        write(&disk, extent, 0, &data).await.unwrap();
    }

    let refused = write(&disk, 3, 0, &data).await.unwrap_err();

    assert_eq!(refused.kind(), StoreErrorKind::Full, "{refused}");
    assert_eq!(read(&disk, 2, 0, 4096).await.as_deref(), Some(data.as_slice()));
    write(&disk, 1, 4096, &data).await.expect("an allocated extent still takes writes");
}

#[tokio::test]
async fn freeing_an_extent_makes_room_and_its_reuse_reads_zeros() {
    let (_dir, path) = disk_path();
    let disk = LocalDisk::create(&path, Some(THREE_EXTENTS_BYTES), identity()).await.unwrap();
    let data = pattern(4096, 9);
    for extent in 0..3 {
        write(&disk, extent, 0, &data).await.unwrap();
    }

    disk.zero(VOLUME, ExtentIndex(1), 0, EXTENT_SIZE_BYTES).await.expect("discard");
    write(&disk, 7, 8192, &data).await.expect("the freed slot is reused");

    assert_eq!(read(&disk, 1, 0, 4096).await, None);
    assert_eq!(read(&disk, 7, 0, 4096).await, Some(vec![0; 4096]), "no stale bytes from extent 1");
    assert_eq!(disk.extents_used(), 3);
}

#[tokio::test]
async fn zeroing_part_of_an_extent_reads_back_zeros_after_reopen() {
    let (_dir, path) = disk_path();
    let data = pattern(16384, 3);
    {
        let disk = LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap();
        write(&disk, 0, 0, &data).await.unwrap();
        disk.zero(VOLUME, ExtentIndex(0), 4096, 8192).await.unwrap();
    }
    let disk = LocalDisk::open(&path, DISK).await.unwrap();

    let got = read(&disk, 0, 0, 16384).await.unwrap();

    assert_eq!(&got[..4096], &data.as_slice()[..4096]);
    assert_eq!(&got[4096..12288], &[0u8; 8192][..]);
    assert_eq!(&got[12288..], &data.as_slice()[12288..]);
}

#[tokio::test]
async fn concurrent_first_writes_to_one_extent_allocate_it_once() {
    let (_dir, path) = disk_path();
    let disk = LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap();
    let a = pattern(4096, 1);
    let b = pattern(4096, 2);

    let (ra, rb) = tokio::join!(write(&disk, 4, 0, &a), write(&disk, 4, 4096, &b));

    ra.unwrap();
    rb.unwrap();
    assert_eq!(disk.extents_used(), 1);
    assert_eq!(read(&disk, 4, 0, 4096).await.as_deref(), Some(a.as_slice()));
    assert_eq!(read(&disk, 4, 4096, 4096).await.as_deref(), Some(b.as_slice()));
}

#[tokio::test]
async fn corrupted_superblock_is_refused_with_a_clear_error() {
    let (_dir, path) = disk_path();
    drop(LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap());
    damage(&path, 40);

    let refused = LocalDisk::open(&path, DISK).await.err().expect("refused");

    assert!(refused.to_string().contains("superblock checksum does not match"), "{refused}");
}

#[tokio::test]
async fn truncated_disk_is_refused() {
    let (_dir, path) = disk_path();
    drop(LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap());
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(32 << 20).unwrap();

    let refused = LocalDisk::open(&path, DISK).await.err().expect("refused");

    assert!(refused.to_string().contains("truncated"), "{refused}");
}

#[tokio::test]
async fn damaged_table_entry_is_refused_rather_than_serving_wrong_data() {
    let (_dir, path) = disk_path();
    {
        let disk = LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap();
        write(&disk, 0, 0, &pattern(4096, 5)).await.unwrap();
    }
    damage(&path, 4096 + 2); // inside slot 0's table entry

    let refused = LocalDisk::open(&path, DISK).await.err().expect("refused");

    assert!(refused.to_string().contains("entry 0 is damaged"), "{refused}");
}

#[tokio::test]
async fn a_converge_disk_is_never_formatted_over() {
    let (_dir, path) = disk_path();
    drop(LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap());

    let other = DiskIdentity { disk: DiskId(99), ..identity() };
    let refused = LocalDisk::create(&path, None, other).await.err().expect("refused");

    assert!(matches!(refused, StoreError::AlreadyFormatted { disk: DISK, .. }), "{refused}");
}

#[tokio::test]
async fn missing_disk_is_a_clear_error() {
    let (_dir, path) = disk_path();
    let refused = LocalDisk::open(&path, DISK).await.err().expect("refused");
    assert!(matches!(refused, StoreError::NotFound { .. }), "{refused}");
}

#[tokio::test]
async fn unaligned_or_out_of_extent_requests_are_refused() {
    let (_dir, path) = disk_path();
    let disk = LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap();

    let unaligned = disk.read(VOLUME, ExtentIndex(0), 100, 512).await.unwrap_err();
    let past_end = disk.read(VOLUME, ExtentIndex(0), EXTENT_SIZE_BYTES - 512, 1024).await.unwrap_err();

    assert_eq!(unaligned.kind(), StoreErrorKind::InvalidRequest);
    assert_eq!(past_end.kind(), StoreErrorKind::InvalidRequest);
}

#[tokio::test]
async fn memory_unfit_for_direct_io_is_written_and_read_through_an_aligned_copy() {
    let (_dir, path) = disk_path();
    let disk = LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap();
    // Starting 100 bytes into an aligned buffer: no sector alignment, so O_DIRECT would refuse it.
    let source = pattern(4096 + 100, 4);
    let target: Arc<AlignedBuf> = Arc::new(AlignedBuf::zeroed(4096 + 100));

    disk.write(VOLUME, ExtentIndex(2), 0, source.clone(), 100..4196).await.expect("write");
    let allocated = disk.read_into(VOLUME, ExtentIndex(2), 0, target.clone(), 100..4196).await.expect("read");

    assert!(allocated);
    assert_eq!(&target.as_slice()[100..], &source.as_slice()[100..]);
}

#[tokio::test]
async fn reads_go_straight_into_the_callers_memory() {
    let (_dir, path) = disk_path();
    let disk = LocalDisk::create(&path, Some(64 << 20), identity()).await.unwrap();
    let data = pattern(8192, 6);
    write(&disk, 1, 0, &data).await.unwrap();
    let target: Arc<AlignedBuf> = Arc::new(AlignedBuf::zeroed(8192));

    let allocated = disk.read_into(VOLUME, ExtentIndex(1), 0, target.clone(), 0..8192).await.unwrap();
    let unwritten = disk.read_into(VOLUME, ExtentIndex(9), 0, target.clone(), 0..4096).await.unwrap();

    assert!(allocated);
    assert!(!unwritten, "an extent never written is reported, not read");
    assert_eq!(target.as_slice(), data.as_slice());
}
