//! What this node does for each VM call: the VM's volumes, its spec in the cluster, and its
//! serial console, wherever it runs.

use crate::error::ApiError;
use crate::services::NodeServices;
use crate::v1;
use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use model::{Boot, BootFile, ClusterState, Vm, VmRunState, VmSpec, SECTOR_SIZE_BYTES};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How often a followed console checks for new output.
const CONSOLE_POLL: Duration = Duration::from_millis(200);
/// One connection per VM to its console socket, kept while it works: QEMU's socket takes
/// one client at a time and reads from it only as fast as the guest's serial port takes
/// bytes, so keys written on a connection that then closes would be lost. What QEMU sends
/// back on it is read and dropped (its log file has the output, for every viewer).
#[derive(Default)]
pub(crate) struct ConsoleInputs {
    open: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<model::VmId, ConsoleInput>>>,
}

type ConsoleInput = std::sync::Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>;

impl ConsoleInputs {
    /// The connection to `vm`'s console at `socket`, made if there is none.
    async fn connection(&self, vm: model::VmId, socket: &std::path::Path) -> std::io::Result<ConsoleInput> {
        if let Some(open) = self.open.lock().expect("console lock").get(&vm) {
            return Ok(open.clone());
        }
        let (mut from_qemu, to_qemu) = tokio::net::UnixStream::connect(socket).await?.into_split();
        let connection = std::sync::Arc::new(tokio::sync::Mutex::new(to_qemu));
        let kept = {
            let mut open = self.open.lock().expect("console lock");
            // Two first keys at once: one connection wins, the other is dropped.
            open.entry(vm).or_insert(connection).clone()
        };
        // QEMU's output on it is dropped; when QEMU closes it (the VM stopped), the
        // connection is forgotten.
        let (open, mine) = (self.open.clone(), kept.clone());
        tokio::spawn(async move {
            let mut sink = [0u8; 4096];
            while matches!(from_qemu.read(&mut sink).await, Ok(n) if n > 0) {}
            let mut open = open.lock().expect("console lock");
            if open.get(&vm).is_some_and(|c| std::sync::Arc::ptr_eq(c, &mine)) {
                open.remove(&vm);
            }
        });
        Ok(kept)
    }

    /// Drops `connection` (broken) if it is still `vm`'s.
    fn forget(&self, vm: model::VmId, connection: &ConsoleInput) {
        let mut open = self.open.lock().expect("console lock");
        if open.get(&vm).is_some_and(|c| std::sync::Arc::ptr_eq(c, connection)) {
            open.remove(&vm);
        }
    }
}

/// How long keys may wait for a guest to take them.
const CONSOLE_WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest piece of console input taken at once (a paste is cut into pieces).
pub const CONSOLE_INPUT_MAX_BYTES: usize = 4 << 10;
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
        self.know_what_it_names(&request).await?;
        if self.cluster().state().vm_by_name(&request.name).is_some() {
            return Err(model::CommandError::VmExists(request.name).into_api());
        }
        let boot = self.boot(&request.boot)?;
        let cdrom = request.cdrom.as_ref().map(|iso| self.boot_file(iso)).transpose()?;
        if let Some(cloud_init) = &request.cloud_init {
            crate::cidata::check(cloud_init).map_err(ApiError::bad_request)?;
        }
        let nics = self.nics(&request.nics)?;
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
            let boot = match boot {
                // The variables are kept as safely as the disk they boot.
                None => {
                    let replicas = request.disks.first().map_or(2, |d| d.replicas);
                    let name = format!("{}-uefi-vars", request.name);
                    let size_bytes = model::UEFI_VARS_BYTES.next_multiple_of(1 << 20);
                    let vars = self.create_volume(v1::CreateVolume { name, size_bytes, replicas }).await?;
                    created.push(vars.name.clone());
                    Boot::Uefi { vars: vars.id }
                }
                Some(boot) => boot,
            };
            let seed = match &request.cloud_init {
                Some(cloud_init) => Some(self.make_seed(&request, cloud_init, &mut created).await?),
                None => None,
            };
            let spec = VmSpec {
                name: request.name.clone(),
                cpus: request.cpus,
                memory_bytes: request.memory_bytes,
                disks,
                boot,
                ha: request.ha.clone(),
                seed,
                cdrom,
                nics,
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

    /// Makes the VM's cloud-init seed volume (`NAME-cidata`, as many replicas as its first
    /// disk) and writes the seed into it; its name goes into `created`.
    async fn make_seed(
        &self,
        request: &v1::CreateVm,
        cloud_init: &v1::CloudInit,
        created: &mut Vec<String>,
    ) -> Result<model::VolumeId, ApiError> {
        let name = format!("{}-cidata", request.name);
        let replicas = request.disks.first().map_or(2, |d| d.replicas);
        let volume = self
            .create_volume(v1::CreateVolume { name: name.clone(), size_bytes: crate::cidata::SEED_BYTES, replicas })
            .await?;
        created.push(name.clone());
        // Kept for the VM's life: cloud-init runs its first boot once, wherever the VM runs.
        let instance_id = format!("iid-{}-{:x}", request.name, crate::services::random_id()?);
        let seed = crate::cidata::seed(cloud_init, &instance_id).map_err(|e| {
            ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("making the seed: {e}"))
        })?;
        let chunk = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(Bytes::from(seed)) });
        self.import(&name, Box::pin(chunk)).await?;
        Ok(volume.id)
    }

    /// Catches up with the leader if the request names a network or a volume this node does
    /// not know: one made through another node a moment ago (`fresh_names` does this for
    /// names in a path). A name still unknown after is refused as usual.
    async fn know_what_it_names(&self, request: &v1::CreateVm) -> Result<(), ApiError> {
        let state = self.cluster().state();
        if state.cluster.is_none() {
            return Ok(());
        }
        let mut files = request.cdrom.iter().collect::<Vec<_>>();
        if let v1::BootRequest::Kernel { kernel, initrd, .. } = &request.boot {
            files.push(kernel);
            files.extend(initrd);
        }
        let unknown = files.iter().any(|f| state.volume_by_name(&f.volume).is_none())
            || request.nics.iter().any(|nic| state.network_by_name(&nic.network).is_none());
        drop(state);
        if unknown {
            self.cluster().catch_up().await.map_err(|e| {
                ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    format!("this node does not know a name the VM gives and cannot check with the cluster now ({e}): try again"),
                )
            })?;
        }
        Ok(())
    }

    /// The boot the request asks for; `None` for UEFI, whose variable volume is made with
    /// the VM's disks.
    /// A file kept in a volume, checked to fit it.
    fn boot_file(&self, r: &v1::BootFileRef) -> Result<BootFile, ApiError> {
        let volume = self.cluster().volume(&r.volume)?;
        if r.len_bytes == 0 || r.len_bytes > volume.size_bytes {
            return Err(ApiError::bad_request(format!(
                "boot file length {} does not fit volume {}",
                r.len_bytes, r.volume
            )));
        }
        Ok(BootFile { volume: volume.id, len_bytes: r.len_bytes })
    }

    fn boot(&self, request: &v1::BootRequest) -> Result<Option<Boot>, ApiError> {
        let file = |r: &v1::BootFileRef| self.boot_file(r);
        Ok(match request {
            v1::BootRequest::Disk => {
                return Err(ApiError::bad_request(
                    "BIOS cannot boot a disk converge serves: SeaBIOS stalls loading the boot loader from a \
                     vhost-user-blk disk (QEMU's own vhost-user-blk server does the same). Boot the image by UEFI \
                     (the default), or boot a kernel directly with --kernel",
                ))
            }
            v1::BootRequest::Uefi => None,
            v1::BootRequest::Kernel { kernel, initrd, cmdline } => Some(Boot::Kernel {
                kernel: file(kernel)?,
                initrd: initrd.as_ref().map(file).transpose()?,
                cmdline: cmdline.clone(),
            }),
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

    /// Changes the VM's vCPUs or memory, from its next start.
    pub async fn update_vm(&self, name: &str, request: v1::UpdateVm) -> Result<v1::VmInfo, ApiError> {
        let vm = self.cluster().vm(name)?;
        let mut spec = vm.spec.clone();
        spec.cpus = request.cpus.unwrap_or(spec.cpus);
        spec.memory_bytes = request.memory_bytes.unwrap_or(spec.memory_bytes);
        self.cluster().propose(model::ClusterCommand::UpdateVm { vm: vm.id, spec }).await?;
        self.vm(name)
    }

    /// Gives a stopped VM one more disk, a new volume `NAME-diskN`.
    pub async fn add_vm_disk(&self, name: &str, disk: v1::DiskRequest) -> Result<v1::VmInfo, ApiError> {
        let vm = self.cluster().vm(name)?;
        if vm.is_active() {
            return Err(ApiError::conflict(format!("VM {name} is running: stop it to add a disk")));
        }
        let state = self.cluster().state();
        let index = (0..).find(|i| state.volume_by_name(&format!("{name}-disk{i}")).is_none()).expect("a free index");
        let volume = self
            .create_volume(v1::CreateVolume {
                name: format!("{name}-disk{index}"),
                size_bytes: disk.size_bytes,
                replicas: disk.replicas,
            })
            .await?;
        let mut spec = vm.spec.clone();
        spec.disks.push(volume.id);
        if let Err(e) = self.cluster().propose(model::ClusterCommand::UpdateVm { vm: vm.id, spec }).await {
            if let Err(cleanup) = self.cluster().delete_volume(&volume.name).await {
                tracing::warn!(volume = %volume.name, error = %cleanup, "removing a disk that was not added");
            }
            return Err(e.into());
        }
        self.vm(name)
    }

    /// Takes a volume (a disk, the cloud-init seed or the CD-ROM) off a stopped VM; the
    /// volume stays, for `volume delete` or another VM.
    pub async fn detach_vm_volume(&self, name: &str, volume_name: &str) -> Result<v1::VmInfo, ApiError> {
        let vm = self.cluster().vm(name)?;
        let volume = self.cluster().volume(volume_name)?;
        let mut spec = vm.spec.clone();
        if spec.disks.first() == Some(&volume.id) && !matches!(spec.boot, Boot::Kernel { .. }) {
            return Err(ApiError::conflict(format!("{volume_name} is the disk VM {name} boots from")));
        }
        let before = spec.attached().len() + usize::from(spec.cdrom.is_some());
        spec.disks.retain(|d| *d != volume.id);
        spec.seed = spec.seed.filter(|s| *s != volume.id);
        spec.cdrom = spec.cdrom.filter(|c| c.volume != volume.id);
        if spec.attached().len() + usize::from(spec.cdrom.is_some()) == before {
            return Err(ApiError::bad_request(format!("{volume_name} is not a disk, seed or CD-ROM of VM {name}")));
        }
        self.cluster().propose(model::ClusterCommand::UpdateVm { vm: vm.id, spec }).await?;
        self.vm(name)
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

    /// Writes `input` to the serial console of VM `name` (keys a user typed), on the node
    /// running it; other nodes relay it there.
    pub async fn console_input(&self, name: &str, input: Bytes, relay: bool) -> Result<(), ApiError> {
        if input.len() > CONSOLE_INPUT_MAX_BYTES {
            return Err(ApiError::bad_request(format!(
                "console input of {} bytes is more than {CONSOLE_INPUT_MAX_BYTES}",
                input.len()
            )));
        }
        let vm = self.cluster().vm(name)?;
        let host = match (vm.observed.node, &vm.observed.state) {
            (Some(host), VmRunState::Starting | VmRunState::Running { .. }) => host,
            _ => return Err(ApiError::conflict(format!("VM {name} is not running: nothing reads its console"))),
        };
        if host != self.cluster().node_id() {
            if !relay {
                return Err(ApiError::conflict(format!("VM {name} runs on {host}, not here")));
            }
            let path = format!("/internal/vms/{name}/console/input");
            self.to_vm_node(host, name, &path, |client, url| {
                client.post(url).body(input).timeout(CONSOLE_WRITE_TIMEOUT * 2)
            })
            .await?;
            return Ok(());
        }
        let socket = self.vm_dir().join(vm.id.to_string()).join("console.sock");
        let failed = |e: std::io::Error| {
            ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                format!("writing to {name}'s console ({}): {e}", socket.display()),
            )
        };
        // A QEMU started since the connection was made broke it: connect once more.
        for attempt in 0..2 {
            let connection = self.console_inputs().connection(vm.id, &socket).await.map_err(failed)?;
            // A guest that does not read its serial port fills QEMU's buffer: the keys are
            // refused then, rather than holding every later key behind them.
            let written =
                tokio::time::timeout(CONSOLE_WRITE_TIMEOUT, async { connection.lock().await.write_all(&input).await })
                    .await;
            let written = match written {
                Ok(written) => written,
                Err(_) => {
                    return Err(ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("VM {name} does not read its serial console (its input is full)"),
                    ))
                }
            };
            match written {
                Ok(()) => return Ok(()),
                Err(e) if attempt == 0 => {
                    tracing::debug!(vm = %name, error = %e, "the console connection broke; connecting again");
                    self.console_inputs().forget(vm.id, &connection);
                }
                Err(e) => return Err(failed(e)),
            }
        }
        unreachable!("the second attempt returns")
    }

    /// Sends a request for VM `name` to `host`, the node running it, over the node port:
    /// `make` builds it from a client for that node and the URL of `path` there. Its
    /// answer if it succeeded; else the host's reason, with its status.
    async fn to_vm_node(
        &self,
        host: model::NodeId,
        name: &str,
        path: &str,
        make: impl FnOnce(reqwest::Client, String) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        let gateway = |message: String| ApiError::new(axum::http::StatusCode::BAD_GATEWAY, message);
        let addr = {
            let state = self.cluster().state();
            let found =
                state.nodes.get(&host).ok_or_else(|| ApiError::bad_request(format!("{host} left the cluster")))?;
            found.data_addr.clone()
        };
        let client = self.http(&addr).map_err(|e| gateway(e.to_string()))?;
        let response = make(client, format!("https://{addr}{path}"))
            .send()
            .await
            .map_err(|e| gateway(format!("{host} runs {name} but does not answer: {e}")))?;
        if !response.status().is_success() {
            let status = response.status();
            let reason = response.json::<v1::ErrorBody>().await.map(|b| b.error).unwrap_or_default();
            return Err(ApiError::new(status, format!("{host} runs {name} but refused ({status}): {reason}")));
        }
        Ok(response)
    }

    /// The VM's serial console output from its start (or its last `tail` bytes); with
    /// `follow`, new output as it comes, until the VM stops. Served by the node running
    /// the VM; other nodes relay it.
    pub async fn console(
        &self,
        name: &str,
        follow: bool,
        tail: Option<u64>,
        relay: bool,
    ) -> Result<BoxStream<'static, Result<Bytes, std::io::Error>>, ApiError> {
        let vm = self.cluster().vm(name)?;
        let host = vm.observed.node.ok_or_else(|| ApiError::bad_request(format!("VM {name} has not run yet")))?;
        if host != self.cluster().node_id() {
            // A node asked by another serves only what it runs: two nodes with different
            // views never pass a request back and forth.
            if !relay {
                return Err(ApiError::conflict(format!("VM {name} ran last on {host}, not here")));
            }
            let tail = tail.map(|t| format!("&tail={t}")).unwrap_or_default();
            let path = format!("/internal/vms/{name}/console?follow={follow}{tail}");
            let response = self.to_vm_node(host, name, &path, |client, url| client.get(url)).await?;
            return Ok(response.bytes_stream().map(|r| r.map_err(std::io::Error::other)).boxed());
        }
        let path = hypervisor::console_log(self.vm_dir(), vm.id);
        let mut file = tokio::fs::File::open(&path).await.map_err(|e| {
            ApiError::bad_request(format!("no console output for {name} on this node ({}): {e}", path.display()))
        })?;
        if let Some(tail) = tail {
            use tokio::io::AsyncSeekExt;
            let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(std::io::SeekFrom::Start(len.saturating_sub(tail))).await;
        }
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
        seed: vm.spec.seed.map(name),
        cdrom: vm.spec.cdrom.map(|c| name(c.volume)),
        nics: vm
            .spec
            .nics
            .iter()
            .map(|nic| v1::NicInfo {
                network: state.networks.get(&nic.network).map_or_else(|| nic.network.to_string(), |n| n.name.clone()),
                mac: nic.mac,
            })
            .collect(),
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
