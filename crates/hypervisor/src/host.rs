//! What the hypervisor needs from the rest of the node, as a trait the composition root
//! implements: the cluster's VM state, reporting, and disks served as vhost-user sockets.

use futures_util::future::BoxFuture;
use model::{BootFile, ClusterState, NodeId, Vm, VmId, VmRunState};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct HostError {
    pub what: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl HostError {
    pub fn new(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        HostError { what: what.into(), source: Some(Box::new(source)) }
    }
}

/// A VM's UEFI variable store in its volume, owned by this node while the VM runs here.
pub trait VarsVolume: Send + Sync {
    /// Writes the store (`model::UEFI_VARS_BYTES`) into the volume; durable when it returns.
    fn save<'a>(&'a self, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), HostError>>;
}

/// A VM's UEFI variable volume, taken for this node: what it holds and how to write it.
pub struct AttachedVars {
    /// `model::UEFI_VARS_BYTES`, zeros if never written.
    pub kept: Vec<u8>,
    pub volume: Arc<dyn VarsVolume>,
}

/// A disk served to a VM; dropping it (after QEMU has gone) ends the service.
pub trait AttachedDisk: Send + Sync {
    fn socket(&self) -> &Path;
}

pub trait Host: Send + Sync + 'static {
    fn this_node(&self) -> NodeId;
    fn state(&self) -> Arc<ClusterState>;
    fn watch(&self) -> watch::Receiver<Arc<ClusterState>>;
    /// Records what this node observes of a VM.
    fn report(&self, vm: VmId, state: VmRunState) -> BoxFuture<'_, Result<(), HostError>>;
    /// Records which networks this node cannot provide now, with why (none: every one).
    fn report_network_gaps(
        &self,
        gaps: std::collections::BTreeMap<model::NetworkId, String>,
    ) -> BoxFuture<'_, Result<(), HostError>>;
    /// True while this node is cut off from the majority: it then runs no VM.
    fn isolated(&self) -> watch::Receiver<bool>;
    /// The guest shut itself down (or QEMU ended): the VM's desired state follows, so it is
    /// not restarted, if it is still meant to run on this node.
    fn guest_stopped(&self, vm: VmId) -> BoxFuture<'_, Result<(), HostError>>;
    /// Adds to the cluster's event log, best effort.
    fn record_event(&self, kind: model::EventKind, message: String);
    /// Takes ownership of the VM's disks (new owner epochs, so any earlier owner is fenced)
    /// and serves each on a vhost-user socket under `dir`, in `VmSpec::attached`'s order.
    fn attach_disks<'a>(
        &'a self,
        vm: &'a Vm,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<Vec<Box<dyn AttachedDisk>>, HostError>>;
    /// Takes ownership of the VM's UEFI variable volume, as of its disks.
    fn attach_vars<'a>(&'a self, vm: &'a Vm, volume: model::VolumeId)
        -> BoxFuture<'a, Result<AttachedVars, HostError>>;
    /// Copies a boot file out of its volume to `to`.
    fn fetch_boot_file<'a>(&'a self, file: BootFile, to: PathBuf) -> BoxFuture<'a, Result<(), HostError>>;
}
