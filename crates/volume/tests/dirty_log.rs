//! The dirty log on a real redb file: what a survivor recorded outlives its daemon.

use model::{ExtentIndex, PgId, PoolId, VolumeId, EXTENT_SIZE_BYTES};
use volume::DirtyLog;

#[tokio::test]
async fn extents_on_record_survive_a_restart_as_wholly_changed() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("dirty.redb");
    let log = DirtyLog::open(&path).unwrap();
    log.record(PoolId(0), PgId(3), VolumeId(1), ExtentIndex(2), 4096..8192).await.unwrap();
    assert_eq!(log.bytes(PoolId(0), PgId(3)), 4096);
    drop(log);

    let reopened = DirtyLog::open(&path).unwrap();

    let extents = reopened.snapshot(PoolId(0), PgId(3));
    assert_eq!(extents.len(), 1);
    assert_eq!(extents[0].ranges, vec![0..EXTENT_SIZE_BYTES as u32]);
    reopened.clear(PoolId(0), PgId(3)).await.unwrap();
    drop(reopened);
    assert!(DirtyLog::open(&path).unwrap().pgs().is_empty(), "a cleared PG stays cleared");
}
