//! The disks of this node, as opened at start or added since, and those that failed to open.

use crate::disk::LocalDisk;
use model::{DiskHealth, DiskId, DiskReport};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

#[derive(Default)]
pub struct DiskSet {
    disks: RwLock<BTreeMap<DiskId, Arc<LocalDisk>>>,
    failed: RwLock<BTreeMap<DiskId, String>>,
}

impl DiskSet {
    pub fn get(&self, disk: DiskId) -> Option<Arc<LocalDisk>> {
        self.disks.read().expect("disks lock").get(&disk).cloned()
    }

    pub fn contains(&self, disk: DiskId) -> bool {
        self.disks.read().expect("disks lock").contains_key(&disk)
    }

    pub fn all(&self) -> Vec<Arc<LocalDisk>> {
        self.disks.read().expect("disks lock").values().cloned().collect()
    }

    pub fn insert(&self, disk: LocalDisk) -> Arc<LocalDisk> {
        let disk = Arc::new(disk);
        self.failed.write().expect("failed lock").remove(&disk.id());
        self.disks.write().expect("disks lock").insert(disk.id(), disk.clone());
        disk
    }

    /// Records a disk that could not be opened, with the reason a person should see.
    pub fn mark_failed(&self, disk: DiskId, reason: String) {
        self.failed.write().expect("failed lock").insert(disk, reason);
    }

    pub fn is_failed(&self, disk: DiskId) -> bool {
        self.failed.read().expect("failed lock").contains_key(&disk)
    }

    /// Health and usage of every disk, for this node's pings and status.
    pub fn reports(&self) -> Vec<DiskReport> {
        let mut disks: Vec<DiskReport> = self.all().iter().map(|d| d.report()).collect();
        for (disk, reason) in self.failed.read().expect("failed lock").iter() {
            disks.push(DiskReport {
                disk: *disk,
                health: DiskHealth::Failed(reason.clone()),
                extents_used: 0,
                extents_total: 0,
            });
        }
        disks
    }
}
