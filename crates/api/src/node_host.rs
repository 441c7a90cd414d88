//! The hypervisor's `Host` on this node: VM state and reports through the cluster, disks
//! served by vhost-blk devices on the volume engine.

use crate::services::NodeServices;
use futures_util::future::BoxFuture;
use hypervisor::{AttachedDisk, AttachedVars, Host, HostError, VarsVolume};
use model::{BootFile, ClusterState, NodeId, Vm, VmId, VmRunState, VolumeId};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use vhost_blk::{DiskServer, DiskTarget};
use volume::VolumeWriter;

pub struct NodeHost {
    services: NodeServices,
    runtime: tokio::runtime::Handle,
}

impl NodeHost {
    pub fn new(services: NodeServices, runtime: tokio::runtime::Handle) -> Self {
        NodeHost { services, runtime }
    }
}

struct ServedDisk(DiskServer);

impl AttachedDisk for ServedDisk {
    fn socket(&self) -> &Path {
        self.0.socket()
    }
}

impl NodeHost {
    /// Takes `volume` of `vm` for this node (a new owner epoch fences any earlier owner) and
    /// makes its replicas agree on the last owner's writes.
    async fn acquire(&self, vm: &Vm, volume: VolumeId) -> Result<(model::Volume, Arc<VolumeWriter>), HostError> {
        let cluster = self.services.cluster();
        // A VM moved or stopped while it was starting here must not take its volumes back
        // from the node it runs on now.
        let here = model::VmDesired::Running { node: cluster.node_id() };
        if cluster.state().vms.get(&vm.id).map(|v| v.desired) != Some(here) {
            return Err(HostError {
                what: format!("VM {} is no longer meant to run here", vm.spec.name),
                source: None,
            });
        }
        let epoch =
            cluster.acquire_volume(volume).await.map_err(|e| HostError::new(format!("acquiring {volume}"), e))?;
        let info =
            cluster.state().volumes.get(&volume).cloned().ok_or_else(|| HostError {
                what: format!("{volume} of VM {} was deleted", vm.spec.name),
                source: None,
            })?;
        let engine = self.services.engine();
        // The last owner may have died with writes in flight: its replicas agree before the
        // guest reads anything.
        let writer = Arc::new(engine.writer(volume, epoch));
        let reconciled = engine
            .reconcile(&writer)
            .await
            .map_err(|e| HostError::new(format!("reconciling {} after its last owner", info.name), e))?;
        if reconciled.ranges > 0 {
            tracing::info!(volume = %info.name, ranges = reconciled.ranges, bytes = reconciled.bytes, "made the replicas of the last owner's recent writes identical");
        }
        Ok((info, writer))
    }
}

/// A UEFI variable store's volume, written as its owner.
struct Vars {
    writer: Arc<VolumeWriter>,
    name: String,
}

impl VarsVolume for Vars {
    fn save<'a>(&'a self, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), HostError>> {
        Box::pin(async move {
            let mut buf = store::AlignedBuf::zeroed(bytes.len());
            buf.as_mut_slice().copy_from_slice(bytes);
            self.writer
                .write(0, Arc::new(buf), 0..bytes.len())
                .await
                .map_err(|e| HostError::new(format!("writing the UEFI variables to {}", self.name), e))
        })
    }
}

impl Host for NodeHost {
    fn this_node(&self) -> NodeId {
        self.services.cluster().node_id()
    }

    fn state(&self) -> Arc<ClusterState> {
        self.services.cluster().state()
    }

    fn watch(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.services.cluster().watch_state()
    }

    fn report(&self, vm: VmId, state: VmRunState) -> BoxFuture<'_, Result<(), HostError>> {
        Box::pin(async move {
            self.services.cluster().report_vm(vm, state).await.map_err(|e| HostError::new(format!("reporting {vm}"), e))
        })
    }

    fn report_network_gaps(
        &self,
        gaps: std::collections::BTreeMap<model::NetworkId, String>,
    ) -> BoxFuture<'_, Result<(), HostError>> {
        Box::pin(async move {
            let cluster = self.services.cluster();
            let command = model::ClusterCommand::ReportNetworkGaps { node: cluster.node_id(), gaps };
            cluster.propose(command).await.map(drop).map_err(|e| HostError::new("reporting the networks", e))
        })
    }

    fn isolated(&self) -> watch::Receiver<bool> {
        self.services.cluster().watch_isolated()
    }

    fn record_event(&self, kind: model::EventKind, message: String) {
        self.services.cluster().record_event(kind, message);
    }

    fn guest_stopped(&self, vm: VmId) -> BoxFuture<'_, Result<(), HostError>> {
        Box::pin(async move {
            let command = model::ClusterCommand::GuestStopped { vm, node: self.services.cluster().node_id() };
            self.services
                .cluster()
                .propose(command)
                .await
                .map(drop)
                .map_err(|e| HostError::new(format!("stopping {vm}"), e))
        })
    }

    fn attach_disks<'a>(
        &'a self,
        vm: &'a Vm,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<Vec<Box<dyn AttachedDisk>>, HostError>> {
        Box::pin(async move {
            let mut disks: Vec<Box<dyn AttachedDisk>> = Vec::new();
            for (index, volume) in vm.spec.attached().into_iter().enumerate() {
                let (info, writer) = self.acquire(vm, volume).await?;
                let engine = self.services.engine().clone();
                let target =
                    DiskTarget { volume, size_bytes: info.size_bytes, writer, engine, serial: info.name.clone() };
                let socket = dir.join(format!("disk{index}.sock"));
                let server = DiskServer::start(&socket, target, self.runtime.clone())
                    .map_err(|e| HostError::new(format!("serving {} to VM {}", info.name, vm.spec.name), e))?;
                disks.push(Box::new(ServedDisk(server)));
            }
            Ok(disks)
        })
    }

    fn attach_vars<'a>(&'a self, vm: &'a Vm, volume: VolumeId) -> BoxFuture<'a, Result<AttachedVars, HostError>> {
        Box::pin(async move {
            let (info, writer) = self.acquire(vm, volume).await?;
            let len = model::UEFI_VARS_BYTES;
            let kept = self.services.engine().read(volume, 0, len).await.map_err(|e| {
                HostError::new(format!("reading the UEFI variables of VM {} ({})", vm.spec.name, info.name), e)
            })?;
            let kept = kept.map(|data| data.as_ref()[..len as usize].to_vec()).unwrap_or_else(|| vec![0; len as usize]);
            Ok(AttachedVars { kept, volume: Arc::new(Vars { writer, name: info.name }) })
        })
    }

    fn fetch_boot_file<'a>(&'a self, file: BootFile, to: PathBuf) -> BoxFuture<'a, Result<(), HostError>> {
        Box::pin(async move {
            let state = self.services.cluster().state();
            let volume = state
                .volumes
                .get(&file.volume)
                .ok_or_else(|| HostError { what: format!("boot file volume {} is gone", file.volume), source: None })?;
            let fail = |e: &dyn std::fmt::Display| HostError {
                what: format!("copying {} to {}: {e}", volume.name, to.display()),
                source: None,
            };
            let (_, mut chunks) = self.services.export(&volume.name).map_err(|e| fail(&e.message))?;
            // Made anew, never through a link a QEMU may have left in the VM's directory.
            let mut out = tokio::fs::File::from_std(hypervisor::create_fresh(&to).map_err(|e| fail(&e))?);
            let mut left = file.len_bytes;
            while left > 0 {
                let Some(chunk) = futures_util::StreamExt::next(&mut chunks).await else { break };
                let chunk = chunk.map_err(|e| fail(&e))?;
                let n = (chunk.len() as u64).min(left) as usize;
                out.write_all(&chunk[..n]).await.map_err(|e| fail(&e))?;
                left -= n as u64;
            }
            if left > 0 {
                return Err(fail(&format!("{left} bytes short")));
            }
            out.flush().await.map_err(|e| fail(&e))
        })
    }
}
