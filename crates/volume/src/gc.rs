//! Frees the extents of deleted volumes on this node's disks.

use model::ClusterState;
use store::DiskSet;

/// Frees every local extent whose volume the state no longer has. Volume ids are never
/// reused, and an id at or past `next_volume_id` belongs to a volume this node has not
/// heard of yet, so those are left alone. Returns how many extents were freed.
pub async fn collect_garbage(disks: &DiskSet, state: &ClusterState) -> usize {
    let mut freed = 0;
    for disk in disks.all() {
        for (volume, extent) in disk.extents() {
            if volume < state.next_volume_id && !state.volumes.contains_key(&volume) {
                match disk.free(volume, extent).await {
                    Ok(()) => freed += 1,
                    Err(e) => {
                        tracing::warn!(disk = %disk.id(), %volume, %extent, error = %e, "freeing a deleted volume's extent failed")
                    }
                }
            }
        }
    }
    freed
}
