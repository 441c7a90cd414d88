//! What this node does for each VM call: the VM's volumes, its spec in the cluster, and its
//! serial console, wherever it runs.

use crate::error::ApiError;
use crate::services::NodeServices;
use crate::v1;
use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use model::{Boot, BootFile, ClusterState, Vm, VmRunState, VmSpec, SECTOR_SIZE_BYTES};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// How often a followed console checks for new output.
const CONSOLE_POLL: Duration = Duration::from_millis(200);
/// Largest piece of console output sent at once.
const CONSOLE_CHUNK_BYTES: usize = 64 << 10;

impl NodeServices {
    pub fn vms(&self) -> Vec<v1::VmInfo> {
        let state = self.cluster().state();
        state.vms.values().map(|vm| vm_info(&state, vm)).collect()
    }

    pub fn vm(&self, name: &str) -> Result<v1::VmInfo, ApiError> {
        let vm = self.cluster().vm(name)?;
        Ok(vm_info(&self.cluster().state(), &vm))
    }

    /// Creates the VM's disk volumes (`NAME-disk0`, ...) and the VM; removes the volumes
    /// again if the VM cannot be created.
    pub async fn create_vm(&self, request: v1::CreateVm) -> Result<v1::VmInfo, ApiError> {
        crate::services::check_name("VM", &request.name)?;
        if self.cluster().state().vm_by_name(&request.name).is_some() {
            return Err(model::CommandError::VmExists(request.name).into_api());
        }
        let boot = self.boot(&request.boot)?;
        let mut created = Vec::new();
        let result = async {
            for (index, disk) in request.disks.iter().enumerate() {
                let name = format!("{}-disk{index}", request.name);
                let volume = self
                    .create_volume(v1::CreateVolume { name, size_bytes: disk.size_bytes, replicas: disk.replicas })
                    .await?;
                created.push(volume.name.clone());
            }
            let state = self.cluster().state();
            let disks = created.iter().map(|name| state.volume_by_name(name).expect("just created").id).collect();
            let spec = VmSpec {
                name: request.name.clone(),
                cpus: request.cpus,
                memory_bytes: request.memory_bytes,
                disks,
                boot,
                ha: request.ha.clone(),
            };
            Ok::<_, ApiError>(self.cluster().create_vm(spec).await?)
        }
        .await;
        match result {
            Ok(vm) => Ok(vm_info(&self.cluster().state(), &vm)),
            Err(e) => {
                for name in created {
                    if let Err(cleanup) = self.cluster().delete_volume(&name).await {
                        tracing::warn!(volume = %name, error = %cleanup, "removing a volume of a VM that was not created");
                    }
                }
                Err(e)
            }
        }
    }

    fn boot(&self, request: &v1::BootRequest) -> Result<Boot, ApiError> {
        let file = |r: &v1::BootFileRef| -> Result<BootFile, ApiError> {
            let volume = self.cluster().volume(&r.volume)?;
            if r.len_bytes == 0 || r.len_bytes > volume.size_bytes {
                return Err(ApiError::bad_request(format!(
                    "boot file length {} does not fit volume {}",
                    r.len_bytes, r.volume
                )));
            }
            Ok(BootFile { volume: volume.id, len_bytes: r.len_bytes })
        };
        Ok(match request {
            v1::BootRequest::Disk => Boot::Disk,
            v1::BootRequest::Kernel { kernel, initrd, cmdline } => Boot::Kernel {
                kernel: file(kernel)?,
                initrd: initrd.as_ref().map(file).transpose()?,
                cmdline: cmdline.clone(),
            },
        })
    }

    pub async fn start_vm(&self, name: &str, request: v1::StartVm) -> Result<v1::VmInfo, ApiError> {
        let node = request.node.as_deref().map(|n| self.cluster().resolve_node(n)).transpose()?;
        self.cluster().start_vm(name, node, request.force).await?;
        self.vm(name)
    }

    /// Keeps VMs off a node (`drained`), or lets them on again. The leader moves the VMs of
    /// a drained node elsewhere.
    pub async fn set_drain(&self, node: &str, drained: bool) -> Result<v1::NodeDrain, ApiError> {
        let id = self.cluster().resolve_node(node)?;
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.cluster().propose(model::ClusterCommand::SetDrain { node: id, drained, at_ms }).await?;
        let state = self.cluster().state();
        let vms =
            state.vms.values().filter(|vm| vm.desired.node() == Some(id)).map(|vm| vm.spec.name.clone()).collect();
        Ok(v1::NodeDrain { node: id, drained: state.drained.contains(&id), vms })
    }

    /// Whether a node can go down now, and if not, why.
    pub fn check_node(&self, node: &str) -> Result<v1::NodeCheck, ApiError> {
        let id = self.cluster().resolve_node(node)?;
        let reasons = self.cluster().node_check(id).err().unwrap_or_default();
        Ok(v1::NodeCheck { node: id, can_go_down: reasons.is_empty(), reasons })
    }

    pub async fn stop_vm(&self, name: &str, request: v1::StopVm) -> Result<v1::VmInfo, ApiError> {
        self.cluster().stop_vm(name, request.force).await?;
        self.vm(name)
    }

    /// Deletes a stopped VM and every volume it owns.
    pub async fn delete_vm(&self, name: &str) -> Result<(), ApiError> {
        let vm = self.cluster().delete_vm(name).await?;
        let state = self.cluster().state();
        for volume in vm.volumes() {
            if let Some(v) = state.volumes.get(&volume) {
                self.cluster().delete_volume(&v.name).await?;
            }
        }
        Ok(())
    }

    /// The VM's serial console output from its start; with `follow`, new output as it comes,
    /// until the VM stops. Served by the node running the VM; other nodes relay it.
    pub async fn console(
        &self,
        name: &str,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<Bytes, std::io::Error>>, ApiError> {
        let vm = self.cluster().vm(name)?;
        let host = vm.observed.node.ok_or_else(|| ApiError::bad_request(format!("VM {name} has not run yet")))?;
        if host != self.cluster().node_id() {
            let state = self.cluster().state();
            let addr = &state
                .nodes
                .get(&host)
                .ok_or_else(|| ApiError::bad_request(format!("{host} left the cluster")))?
                .data_addr;
            let url = format!("https://{addr}/internal/vms/{name}/console?follow={follow}");
            let client =
                self.http(addr).map_err(|e| ApiError::new(axum::http::StatusCode::BAD_GATEWAY, e.to_string()))?;
            let response = client.get(url).send().await.map_err(|e| {
                ApiError::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    format!("{host} runs {name} but does not answer: {e}"),
                )
            })?;
            if !response.status().is_success() {
                let status = response.status();
                let reason = response.json::<v1::ErrorBody>().await.map(|b| b.error).unwrap_or_default();
                return Err(ApiError::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    format!("{host} runs {name} but refused its console ({status}): {reason}"),
                ));
            }
            return Ok(response.bytes_stream().map(|r| r.map_err(std::io::Error::other)).boxed());
        }
        let path = hypervisor::console_log(self.vm_dir(), vm.id);
        let file = tokio::fs::File::open(&path).await.map_err(|e| {
            ApiError::bad_request(format!("no console output for {name} on this node ({}): {e}", path.display()))
        })?;
        let cluster = self.cluster().clone();
        let id = vm.id;
        let stream = futures_util::stream::unfold((file, false), move |(mut file, done)| {
            let cluster = cluster.clone();
            async move {
                if done {
                    return None;
                }
                let mut chunk = vec![0u8; CONSOLE_CHUNK_BYTES];
                loop {
                    match file.read(&mut chunk).await {
                        Ok(0) if follow && runs_here(&cluster.state(), id, cluster.node_id()) => {
                            tokio::time::sleep(CONSOLE_POLL).await;
                        }
                        Ok(0) => return None,
                        Ok(n) => {
                            chunk.truncate(n);
                            return Some((Ok(Bytes::from(chunk)), (file, false)));
                        }
                        Err(e) => return Some((Err(e), (file, true))),
                    }
                }
            }
        });
        Ok(stream.boxed())
    }
}

fn runs_here(state: &ClusterState, vm: model::VmId, node: model::NodeId) -> bool {
    state.vms.get(&vm).is_some_and(|vm| {
        vm.observed.node == Some(node) && matches!(vm.observed.state, VmRunState::Starting | VmRunState::Running { .. })
    })
}

fn vm_info(state: &ClusterState, vm: &Vm) -> v1::VmInfo {
    let name = |id| state.volumes.get(&id).map(|v| v.name.clone()).unwrap_or_else(|| id.to_string());
    v1::VmInfo {
        id: vm.id,
        name: vm.spec.name.clone(),
        cpus: vm.spec.cpus,
        memory_bytes: vm.spec.memory_bytes,
        disks: vm.spec.disks.iter().map(|&d| name(d)).collect(),
        boot: vm.spec.boot.clone(),
        desired: vm.desired,
        node: vm.observed.node,
        state: vm.observed.state.clone(),
        ha: vm.spec.ha.clone(),
        node_down: match vm.desired {
            model::VmDesired::Running { node } | model::VmDesired::Moving { from: node, .. } => state.is_down(node),
            model::VmDesired::Stopped => vm.observed.node.is_some_and(|n| state.is_down(n)),
        },
    }
}

trait IntoApi {
    fn into_api(self) -> ApiError;
}

impl IntoApi for model::CommandError {
    fn into_api(self) -> ApiError {
        cluster::ClusterError::Command(self).into()
    }
}

/// Boot file lengths are whole bytes; volumes hold whole sectors.
pub fn boot_volume_bytes(len_bytes: u64) -> u64 {
    len_bytes.max(1).next_multiple_of(SECTOR_SIZE_BYTES)
}
