//! What this node does for each API call: the cluster, its local disks and the block
//! engine, composed.

use crate::error::ApiError;
use crate::v1;
use bytes::Bytes;
use cluster::{Cluster, ClusterError};
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use model::{Disk, DiskId, EXTENT_SIZE_BYTES, REPLICAS_MAX, SECTOR_SIZE_BYTES};
use std::path::Path;
use std::sync::Arc;
use store::{AlignedBuf, DiskIdentity, DiskSet, LocalDisk};
use volume::{Engine, VolumeError};

/// Import and export move a volume in chunks of this size; a chunk never spans extents.
pub const TRANSFER_CHUNK_BYTES: usize = 1 << 20;
/// Chunks an import writes, or an export reads ahead, at once.
pub const TRANSFER_IN_FLIGHT_MAX: usize = 8;
const _: () = assert!(EXTENT_SIZE_BYTES.is_multiple_of(TRANSFER_CHUNK_BYTES as u64));

#[derive(Clone)]
pub struct NodeServices {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Cluster,
    disks: Arc<DiskSet>,
    engine: Engine,
    /// Where the hypervisor keeps each VM's runtime files (console log among them).
    vm_dir: std::path::PathBuf,
    http: crate::transport::HttpTransport,
    /// Volumes this node writes through the block API, with the writer it holds for each.
    block_writers: tokio::sync::Mutex<std::collections::HashMap<model::VolumeId, Arc<volume::VolumeWriter>>>,
    /// A connection to the console socket of each VM running here that was typed into.
    pub(crate) console_inputs: crate::vms::ConsoleInputs,
    /// Places for interactive console sessions, which outlive their HTTP connections.
    console_sessions: Arc<tokio::sync::Semaphore>,
}

/// Interactive console sessions one node serves at once.
pub const SESSIONS_MAX: usize = 64;

/// Largest block API request: bounds the memory one call holds.
pub const BLOCK_IO_MAX_BYTES: usize = 1 << 20;

impl NodeServices {
    /// `http` carries this node's calls to other nodes (the one Raft uses).
    pub fn new(
        cluster: Cluster,
        disks: Arc<DiskSet>,
        engine: Engine,
        vm_dir: std::path::PathBuf,
        http: crate::transport::HttpTransport,
    ) -> Self {
        let (block_writers, console_inputs) = Default::default();
        let console_sessions = Arc::new(tokio::sync::Semaphore::new(SESSIONS_MAX));
        let inner = Inner { cluster, disks, engine, vm_dir, http, block_writers, console_inputs, console_sessions };
        NodeServices { inner: Arc::new(inner) }
    }

    pub(crate) fn console_inputs(&self) -> &crate::vms::ConsoleInputs {
        &self.inner.console_inputs
    }

    pub(crate) fn console_sessions(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.console_sessions
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Writes `data` at `offset_bytes` of a volume through this node, which becomes the
    /// volume's owner on its first write (acquire, then reconcile what the last owner wrote).
    /// A volume a running VM uses is refused; a writer fenced by a newer owner is dropped, so
    /// the next call takes the volume back.
    pub async fn write_blocks(&self, name: &str, offset_bytes: u64, data: Bytes) -> Result<(), ApiError> {
        let len = data.len();
        if len == 0 || len > BLOCK_IO_MAX_BYTES {
            return Err(ApiError::bad_request(format!(
                "a block write carries 1 to {BLOCK_IO_MAX_BYTES} bytes, not {len}"
            )));
        }
        let volume = self.inner.cluster.volume(name)?;
        let writer = self.block_writer(volume.id).await?;
        let buf: Arc<dyn store::IoMemory> = Arc::new(AlignedBuf::copy_from(&data));
        match writer.write(offset_bytes, buf, 0..len).await {
            Err(e @ volume::VolumeError::Fenced { .. }) => {
                self.inner.block_writers.lock().await.remove(&volume.id);
                Err(e.into())
            }
            result => Ok(result?),
        }
    }

    /// Reads `len_bytes` at `offset_bytes` of a volume through this node.
    pub async fn read_blocks(&self, name: &str, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>, ApiError> {
        if len_bytes == 0 || len_bytes > BLOCK_IO_MAX_BYTES as u64 {
            return Err(ApiError::bad_request(format!("a block read asks for 1 to {BLOCK_IO_MAX_BYTES} bytes")));
        }
        let volume = self.inner.cluster.volume(name)?;
        let mut out = Vec::with_capacity(len_bytes as usize);
        let mut at = offset_bytes;
        while at < offset_bytes + len_bytes {
            let (_, within) = model::extent_of(at);
            let n = (model::EXTENT_SIZE_BYTES - within).min(offset_bytes + len_bytes - at);
            match self.inner.engine.read(volume.id, at, n).await? {
                Some(data) => out.extend_from_slice(data.as_slice()),
                None => out.resize(out.len() + n as usize, 0),
            }
            at += n;
        }
        Ok(out)
    }

    async fn block_writer(&self, volume: model::VolumeId) -> Result<Arc<volume::VolumeWriter>, ApiError> {
        let mut writers = self.inner.block_writers.lock().await;
        let current = self.inner.cluster.state().volumes.get(&volume).map(|v| v.owner_epoch);
        if let Some(writer) = writers.get(&volume).filter(|w| Some(w.epoch()) == current && !w.is_stopped()) {
            return Ok(writer.clone());
        }
        let epoch = self.inner.cluster.acquire_idle_volume(volume).await?;
        let writer = Arc::new(self.inner.engine.writer(volume, epoch));
        let reconciled = self.inner.engine.reconcile(&writer).await?;
        if reconciled.ranges > 0 {
            tracing::info!(%volume, ranges = reconciled.ranges, bytes = reconciled.bytes, "made the replicas of the last owner's recent writes identical");
        }
        writers.insert(volume, writer.clone());
        Ok(writer)
    }

    pub fn vm_dir(&self) -> &Path {
        &self.inner.vm_dir
    }

    /// A client for calls to the node at `addr`.
    /// A client for another node's node port.
    pub(crate) fn http(&self, addr: &str) -> Result<reqwest::Client, cluster::TransportError> {
        self.inner.http.client_for(addr)
    }

    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    pub async fn init(&self) -> Result<v1::InitResponse, ApiError> {
        let (admin_token, join_token) = self.inner.cluster.init().await?;
        let cluster_id = self.inner.cluster.state().cluster.as_ref().map(|c| c.id.to_string()).unwrap_or_default();
        let address = self.inner.cluster.node().api_addr.clone();
        Ok(v1::InitResponse { cluster_id, address, admin_token, join_token })
    }

    pub async fn create_token(&self, request: v1::CreateToken) -> Result<v1::TokenCreated, ApiError> {
        let kind = match request.role {
            Some(role) => model::TokenKind::Api { role },
            None => model::TokenKind::Join { expires_ms: 0 },
        };
        let ttl = request.ttl_secs.map(std::time::Duration::from_secs);
        let token = self.inner.cluster.create_token(kind, &request.name, ttl).await?;
        let id = token.split('_').nth(1).unwrap_or_default().to_string();
        let kind = self.inner.cluster.state().tokens.get(&id).map(|t| t.kind).unwrap_or(kind);
        Ok(v1::TokenCreated { id, token, kind })
    }

    pub fn tokens(&self) -> Vec<v1::TokenInfo> {
        let state = self.inner.cluster.state();
        state
            .tokens
            .values()
            .map(|t| v1::TokenInfo { id: t.id.clone(), name: t.name.clone(), kind: t.kind, created_ms: t.created_ms })
            .collect()
    }

    pub async fn revoke_token(&self, id: &str) -> Result<(), ApiError> {
        Ok(self.inner.cluster.revoke_token(id).await?)
    }

    pub async fn join(&self, request: v1::JoinRequest) -> Result<v1::JoinResponse, ApiError> {
        let id = self.inner.cluster.join(&request.peer, &request.token).await?;
        Ok(v1::JoinResponse { cluster_id: id.to_string(), node: self.inner.cluster.node_id() })
    }

    /// Formats a device (or creates a file standing in for one) and adds it to the cluster.
    pub async fn add_disk(&self, request: v1::AddDisk) -> Result<v1::DiskInfo, ApiError> {
        let state = self.inner.cluster.state();
        let cluster = state.cluster.as_ref().ok_or(ClusterError::NotInitialized)?;
        let path = Path::new(&request.path);
        if !path.is_absolute() {
            return Err(ApiError::bad_request(format!("disk path {:?} must be absolute", request.path)));
        }
        if request.size_bytes.is_some_and(|s| s % SECTOR_SIZE_BYTES != 0) {
            return Err(ApiError::bad_request("disk size must be a multiple of 512 bytes"));
        }
        // The same file or device under another name (a symlink, a hard link, a bind
        // mount) as a disk this node has already: never formatted again.
        if let Ok(new) = std::fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            let same = |d: &&model::Disk| {
                std::fs::metadata(&d.path).is_ok_and(|m| {
                    (m.dev(), m.ino()) == (new.dev(), new.ino()) || (m.rdev() != 0 && m.rdev() == new.rdev())
                })
            };
            let node = self.inner.cluster.node_id();
            if let Some(disk) = state.disks_of(node).find(same) {
                return Err(ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    format!("{} is {} of this node already (at {})", request.path, disk.id, disk.path),
                ));
            }
        }
        let existed = path.exists();
        let identity =
            DiskIdentity { disk: DiskId(random_id()?), node: self.inner.cluster.node_id(), cluster: cluster.id };
        let disk = LocalDisk::claim(path, request.size_bytes, identity, request.force).await?;
        let sb = *disk.superblock();
        let record = Disk {
            id: sb.disk,
            node: sb.node,
            path: request.path.clone(),
            size_bytes: sb.size_bytes,
            extent_slots: sb.extent_slots,
        };
        if let Err(e) = self.inner.cluster.add_disk(record).await {
            drop(disk);
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
        self.inner.disks.insert(disk);
        Ok(v1::DiskInfo {
            id: sb.disk,
            node: sb.node,
            path: request.path,
            size_bytes: sb.size_bytes,
            capacity_bytes: sb.extent_slots * EXTENT_SIZE_BYTES,
        })
    }

    /// Opens every disk the cluster says this node has and that is not open yet; a disk
    /// that cannot be opened is reported as failed with the reason.
    pub async fn open_disks(&self) {
        let state = self.inner.cluster.state();
        for disk in state.disks_of(self.inner.cluster.node_id()) {
            if self.inner.disks.contains(disk.id) || self.inner.disks.is_failed(disk.id) {
                continue;
            }
            match LocalDisk::open(Path::new(&disk.path), disk.id).await {
                Ok(opened) => {
                    tracing::info!(disk = %disk.id, path = %disk.path, "opened disk");
                    self.inner.disks.insert(opened);
                }
                Err(e) => {
                    let reason = crate::error::chain(&e);
                    tracing::error!(disk = %disk.id, path = %disk.path, error = %reason, "disk cannot be opened");
                    self.inner.disks.mark_failed(disk.id, reason);
                }
            }
        }
    }

    pub fn volumes(&self) -> Vec<v1::VolumeInfo> {
        let state = self.inner.cluster.state();
        state.volumes.values().map(|v| volume_info(&state, v)).collect()
    }

    pub fn volume(&self, name: &str) -> Result<v1::VolumeInfo, ApiError> {
        let volume = self.inner.cluster.volume(name)?;
        Ok(volume_info(&self.inner.cluster.state(), &volume))
    }

    pub async fn create_volume(&self, request: v1::CreateVolume) -> Result<v1::VolumeInfo, ApiError> {
        if request.replicas == 0 || request.replicas > REPLICAS_MAX {
            return Err(ApiError::bad_request(format!("--replicas must be 1, 2 or 3, not {}", request.replicas)));
        }
        check_name("volume", &request.name)?;
        let volume = self.inner.cluster.create_volume(&request.name, request.size_bytes, request.replicas).await?;
        Ok(volume_info(&self.inner.cluster.state(), &volume))
    }

    /// Grows a volume no active VM uses.
    pub async fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<v1::VolumeInfo, ApiError> {
        let volume = self.inner.cluster.volume(name)?;
        self.inner.cluster.propose(model::ClusterCommand::ResizeVolume { volume: volume.id, size_bytes }).await?;
        self.volume(name)
    }

    pub async fn delete_volume(&self, name: &str) -> Result<(), ApiError> {
        Ok(self.inner.cluster.delete_volume(name).await?)
    }

    /// Writes a stream into the volume from offset 0, as its new owner. Zero chunks are
    /// written as zero ranges, so an imported sparse image stays thin.
    pub async fn import<S, E>(&self, name: &str, mut body: S) -> Result<v1::ImportResult, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error,
    {
        let volume = self.inner.cluster.volume(name)?;
        let owner_epoch = self.inner.cluster.acquire_idle_volume(volume.id).await?;
        let writer = self.inner.engine.writer(volume.id, owner_epoch);
        self.inner.engine.reconcile(&writer).await?;
        let mut in_flight = FuturesUnordered::new();
        let mut chunk = AlignedBuf::zeroed(TRANSFER_CHUNK_BYTES);
        let mut filled = 0usize;
        let mut offset = 0u64;
        loop {
            let bytes = match body.next().await {
                Some(Ok(bytes)) => bytes,
                Some(Err(e)) => {
                    let e = model::error_chain(&e);
                    return Err(ApiError::bad_request(format!("the upload broke off after {offset} bytes: {e}")));
                }
                None => break,
            };
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = rest.len().min(TRANSFER_CHUNK_BYTES - filled);
                chunk.as_mut_slice()[filled..filled + n].copy_from_slice(&rest[..n]);
                filled += n;
                rest = &rest[n..];
                if filled == TRANSFER_CHUNK_BYTES {
                    let full = std::mem::replace(&mut chunk, AlignedBuf::zeroed(TRANSFER_CHUNK_BYTES));
                    in_flight.push(write_chunk(&writer, offset, full, filled));
                    offset += filled as u64;
                    filled = 0;
                    if in_flight.len() >= TRANSFER_IN_FLIGHT_MAX {
                        in_flight.next().await.expect("a write is in flight")?;
                    }
                }
            }
        }
        if filled > 0 {
            // The tail is padded with zeros to a whole sector.
            let padded = filled.next_multiple_of(SECTOR_SIZE_BYTES as usize);
            in_flight.push(write_chunk(&writer, offset, chunk, padded));
            offset += filled as u64;
        }
        while let Some(result) = in_flight.next().await {
            result?;
        }
        Ok(v1::ImportResult { bytes: offset, owner_epoch })
    }

    /// The volume's size and a stream of its bytes, read ahead a few chunks.
    pub fn export(
        &self,
        name: &str,
    ) -> Result<(u64, impl Stream<Item = Result<Bytes, VolumeError>> + Send + 'static), ApiError> {
        let volume = self.inner.cluster.volume(name)?;
        let engine = self.inner.engine.clone();
        let zeros = Bytes::from(vec![0u8; TRANSFER_CHUNK_BYTES]);
        let size = volume.size_bytes;
        let chunks = futures_util::stream::iter((0..size).step_by(TRANSFER_CHUNK_BYTES)).map(move |offset| {
            let (engine, zeros) = (engine.clone(), zeros.clone());
            let len = (size - offset).min(TRANSFER_CHUNK_BYTES as u64);
            async move {
                Ok(match engine.read(volume.id, offset, len).await? {
                    Some(data) => Bytes::from_owner(data),
                    None => zeros.slice(..len as usize),
                })
            }
        });
        Ok((size, chunks.buffered(TRANSFER_IN_FLIGHT_MAX)))
    }
}

impl NodeServices {
    /// Copies volume `source` into `request.into`, making it if it does not exist, and tells
    /// `progress` each chunk copied; stops when `progress` answers false (nobody listens).
    /// A target it made is removed again if the copy fails. The source must not be a disk
    /// of an active VM (its bytes would change under the copy).
    pub async fn clone_volume(
        &self,
        source: &str,
        request: &v1::CloneVolume,
        progress: impl Fn(u64, u64) -> bool,
    ) -> Result<v1::VolumeInfo, ApiError> {
        let from = self.inner.cluster.volume(source)?;
        if request.into == source {
            return Err(ApiError::bad_request(format!("volume {source} cannot be cloned into itself")));
        }
        let state = self.inner.cluster.state();
        if let Some(vm) = state.vms.values().find(|vm| vm.is_active() && vm.volumes().contains(&from.id)) {
            return Err(ApiError::conflict(format!(
                "volume {source} belongs to VM {}, which is active: stop it before cloning its disk",
                vm.spec.name
            )));
        }
        let made = match self.inner.cluster.volume(&request.into) {
            Ok(target) if target.size_bytes < from.size_bytes => {
                return Err(ApiError::conflict(format!(
                    "volume {} has {} bytes, fewer than {source}'s {}",
                    request.into, target.size_bytes, from.size_bytes
                )));
            }
            Ok(_) => false,
            Err(cluster::ClusterError::NotFound { .. }) => {
                let replicas = match request.replicas {
                    Some(replicas) => replicas,
                    None => state.pools.get(&from.pool).map(|p| p.replicas).unwrap_or(2),
                };
                let create = v1::CreateVolume { name: request.into.clone(), size_bytes: from.size_bytes, replicas };
                self.create_volume(create).await?;
                true
            }
            Err(e) => return Err(e.into()),
        };
        let copied = async {
            // The source is taken (a new owner epoch fences any writer it had), and the
            // copy counts only if nobody took it while it ran.
            let epoch = self.inner.cluster.acquire_idle_volume(from.id).await?;
            let (size, chunks) = self.export(source)?;
            let mut done = 0u64;
            let chunks = chunks.take_while(|chunk| {
                let listened = match chunk {
                    Ok(bytes) => {
                        done += bytes.len() as u64;
                        progress(done, size)
                    }
                    Err(_) => true,
                };
                std::future::ready(listened)
            });
            let imported = self.import(&request.into, Box::pin(chunks)).await?;
            if imported.bytes != size {
                return Err(ApiError::bad_request(format!(
                    "the copy ended after {} of {size} bytes (nobody was waiting for it)",
                    imported.bytes
                )));
            }
            let now = self.inner.cluster.state().volumes.get(&from.id).map(|v| v.owner_epoch);
            if now != Some(epoch) {
                return Err(ApiError::conflict(format!(
                    "volume {source} was taken by a writer while it was being copied: the copy is not whole"
                )));
            }
            self.volume(&request.into)
        }
        .await;
        if copied.is_err() && made {
            if let Err(e) = self.delete_volume(&request.into).await {
                tracing::warn!(volume = %request.into, error = %e.message, "removing a failed clone's volume failed");
            }
        }
        copied
    }
}

/// Names of volumes and VMs: letters, digits, '-', '_' and '.', up to 128 characters.
/// The API's early answer for a bad name; `apply` checks the same.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    model::check_name(what, name, model::NAME_MAX_BYTES).map_err(ApiError::bad_request)
}

async fn write_chunk(
    writer: &volume::VolumeWriter,
    offset: u64,
    chunk: AlignedBuf,
    len: usize,
) -> Result<(), ApiError> {
    if chunk.as_slice()[..len].iter().all(|&b| b == 0) {
        writer.zero(offset, len as u64).await?;
    } else {
        writer.write(offset, Arc::new(chunk), 0..len).await?;
    }
    Ok(())
}

pub(crate) fn volume_info(state: &model::ClusterState, volume: &model::Volume) -> v1::VolumeInfo {
    let pool = state.pools.get(&volume.pool);
    v1::VolumeInfo {
        id: volume.id,
        name: volume.name.clone(),
        size_bytes: volume.size_bytes,
        pool: volume.pool,
        pool_name: pool.map(|p| p.name.clone()).unwrap_or_default(),
        replicas: pool.map(|p| p.replicas).unwrap_or_default(),
        min_size: pool.map(|p| p.min_size).unwrap_or_default(),
        owner: volume.owner,
        owner_epoch: volume.owner_epoch,
        pgs_degraded: pool.map(|p| p.pgs_degraded()).unwrap_or_default(),
        pgs: pool.map(|p| p.pg_count()).unwrap_or_default(),
        degraded: pool.map(|p| p.degraded(state)).unwrap_or_default(),
    }
}

pub(crate) fn random_id() -> Result<u64, ApiError> {
    let n = getrandom::u64()
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("no randomness: {e}")))?;
    Ok(n % (1 << 40) + 1)
}
