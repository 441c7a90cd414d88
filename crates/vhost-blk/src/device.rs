//! `BlkDevice`: one VM disk as a vhost-user-blk backend. The guest's virtqueues live in
//! its shared memory; each request is parsed once into a `BlkRequest`, executed by the
//! volume engine on the tokio runtime, and completed from there.

use crate::config::BlkConfig;
use crate::guest::{copy_from_guest, copy_to_guest};
use crate::guest_io::GuestRange;
use crate::request::{BlkOp, BlkRequest, Descriptor, GuestBuf, HEADER_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use model::{extent_of, VolumeId, EXTENT_SIZE_BYTES, SECTOR_SIZE_BYTES};
use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use store::AlignedBuf;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use volume::{Engine, VolumeWriter};

pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
type Vring = VringRwLock<GuestMemory>;

/// Descriptors per virtqueue.
pub const QUEUE_SIZE: usize = 256;
/// Queues a device offers; QEMU uses up to this many (one per vCPU).
pub const QUEUES_MAX: usize = 4;
/// How long stopping a queue waits for its requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What a device serves: a volume this node owns for writing.
pub struct DiskTarget {
    pub volume: VolumeId,
    pub size_bytes: u64,
    pub writer: Arc<VolumeWriter>,
    pub engine: Engine,
    /// Up to 20 bytes the guest sees as the disk's serial (GET_ID).
    pub serial: String,
}

pub struct BlkDevice {
    target: DiskTarget,
    config: BlkConfig,
    mem: GuestMemory,
    runtime: tokio::runtime::Handle,
    event_idx: AtomicBool,
    exit: Vec<(EventConsumer, EventNotifier)>,
    in_flight: Vec<Arc<InFlight>>,
    writes: Arc<WriteOrder>,
}

impl BlkDevice {
    pub fn new(target: DiskTarget, mem: GuestMemory, runtime: tokio::runtime::Handle) -> io::Result<Self> {
        let exit = (0..QUEUES_MAX)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        let config =
            BlkConfig { capacity_sectors: target.size_bytes / SECTOR_SIZE_BYTES, num_queues: QUEUES_MAX as u16 };
        Ok(BlkDevice {
            target,
            config,
            mem,
            runtime,
            event_idx: AtomicBool::new(false),
            exit,
            in_flight: (0..QUEUES_MAX).map(|_| Arc::default()).collect(),
            writes: Arc::default(),
        })
    }

    fn drain_queue(&self, queue: usize, vring: &Vring) -> io::Result<()> {
        if self.event_idx.load(Ordering::Acquire) {
            // With EVENT_IDX the guest kicks only when it passes our avail event: re-check
            // after re-enabling, or a request that arrived meanwhile would wait forever.
            loop {
                vring.disable_notification().map_err(io::Error::other)?;
                self.process_queue(queue, vring)?;
                if !vring.enable_notification().map_err(io::Error::other)? {
                    return Ok(());
                }
            }
        }
        self.process_queue(queue, vring)
    }

    /// Pops every available chain, checks it, and starts it on the runtime.
    fn process_queue(&self, queue: usize, vring: &Vring) -> io::Result<()> {
        let mem = self.mem.memory();
        // Each chain counts as in flight before the queue's lock is released: a queue stop
        // that comes between popping and counting would otherwise start a new generation
        // that this request then completes into.
        let chains: Vec<_> = {
            let mut guard = vring.get_mut();
            let popped = guard.get_queue_mut().iter(mem.clone()).map_err(io::Error::other)?;
            popped.map(|chain| (self.in_flight[queue].begin(), chain)).collect()
        };
        for (generation, chain) in chains {
            let head = chain.head_index();
            // Bounded by the queue size: a chain longer than that is not a valid chain.
            let descriptors: Vec<Descriptor> = chain
                .clone()
                .take(QUEUE_SIZE)
                .map(|d| Descriptor { addr: d.addr().0, len: d.len(), writable: d.is_write_only() })
                .collect();
            match self.parse(&descriptors, &mem) {
                Ok(request) => self.submit(queue, generation, vring.clone(), head, request),
                Err(e) => {
                    tracing::debug!(volume = %self.target.volume, head, error = %e, "refused a guest request");
                    let status = e.status().zip(crate::request::status_of(&descriptors));
                    let status = status.map(|(s, buf)| (buf, s));
                    finish(&self.in_flight[queue], generation, vring, &self.mem, head, status, 0);
                }
            }
        }
        Ok(())
    }

    fn parse(&self, chain: &[Descriptor], mem: &GuestMemoryMmap) -> Result<BlkRequest, crate::request::RequestError> {
        let mut header = [0u8; HEADER_BYTES as usize];
        let head = chain.first().ok_or(crate::request::RequestError::NoStatus)?;
        if head.len != HEADER_BYTES || mem.read_slice(&mut header, GuestAddress(head.addr)).is_err() {
            // Still answer if the chain has a status byte.
            return Err(match crate::request::status_of(chain) {
                Some(_) => crate::request::RequestError::BadHeader,
                None => crate::request::RequestError::NoStatus,
            });
        }
        let mut read = |buf: GuestBuf| {
            let mut bytes = vec![0u8; buf.len as usize];
            mem.read_slice(&mut bytes, GuestAddress(buf.addr)).ok().map(|()| bytes)
        };
        BlkRequest::parse_with(chain, &header, self.config.capacity_sectors, &mut read)
    }

    fn submit(&self, queue: usize, generation: u64, vring: Vring, head: u16, request: BlkRequest) {
        let in_flight = self.in_flight[queue].clone();
        // A write's place in the FLUSH order is taken when it is popped, not when it runs.
        let ticket = matches!(request.op, BlkOp::Write { .. } | BlkOp::Zero { .. }).then(|| self.writes.begin());
        let mem = self.mem.clone();
        let writer = self.target.writer.clone();
        let engine = self.target.engine.clone();
        let volume = self.target.volume;
        let serial = self.target.serial.clone();
        let writes = self.writes.clone();
        self.runtime.spawn(async move {
            // A request's pieces stop when its queue does (a reset guest): none may land
            // after the next boot's requests.
            let live = || in_flight.current(generation);
            let io = Io { mem: &mem, writer: &writer, engine: &engine, volume };
            let result = execute(&request.op, &io, &serial, &writes, &live).await;
            if let Some(ticket) = ticket {
                writes.end(ticket);
            }
            let (status, written) = match result {
                Ok(written) => (VIRTIO_BLK_S_OK, written),
                Err(e) => {
                    tracing::warn!(%volume, error = %e, "guest request failed");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            };
            finish(&in_flight, generation, &vring, &mem, head, Some((request.status, status)), written);
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum IoError {
    #[error("guest buffer outside guest memory")]
    GuestMemory,
    #[error("the queue stopped before the request's last piece")]
    Stopped,
    #[error(transparent)]
    Volume(#[from] volume::VolumeError),
}

/// Where a request's bytes move: the guest's memory and the volume.
struct Io<'a> {
    mem: &'a GuestMemory,
    writer: &'a VolumeWriter,
    engine: &'a Engine,
    volume: VolumeId,
}

/// Runs one request; returns the bytes written into guest buffers (for the used length).
async fn execute(
    op: &BlkOp,
    io: &Io<'_>,
    serial: &str,
    writes: &WriteOrder,
    live: &(dyn Fn() -> bool + Sync),
) -> Result<u32, IoError> {
    let Io { mem, writer, engine, volume } = *io;
    match op {
        BlkOp::Read { sector, bufs } => {
            let mut offset = sector * SECTOR_SIZE_BYTES;
            for bufs in crate::request::pieces(bufs, crate::request::PIECE_BYTES) {
                if !live() {
                    return Err(IoError::Stopped);
                }
                match guest_ranges(mem, &bufs) {
                    Some(ranges) => read_direct(engine, volume, offset, &bufs, ranges).await?,
                    None => read_copied(mem, engine, volume, offset, &bufs).await?,
                }
                offset += bufs.iter().map(|b| u64::from(b.len)).sum::<u64>();
            }
            Ok((offset - sector * SECTOR_SIZE_BYTES) as u32)
        }
        BlkOp::Write { sector, bufs } => {
            let mut offset = sector * SECTOR_SIZE_BYTES;
            for bufs in crate::request::pieces(bufs, crate::request::PIECE_BYTES) {
                if !live() {
                    return Err(IoError::Stopped);
                }
                match guest_ranges(mem, &bufs) {
                    Some(ranges) => write_direct(writer, offset, ranges).await?,
                    None => write_copied(mem, writer, offset, &bufs).await?,
                }
                offset += bufs.iter().map(|b| u64::from(b.len)).sum::<u64>();
            }
            Ok(0)
        }
        BlkOp::Zero { segments } => {
            for segment in segments {
                let len = u64::from(segment.sectors) * SECTOR_SIZE_BYTES;
                writer.zero(segment.sector * SECTOR_SIZE_BYTES, len).await?;
            }
            Ok(0)
        }
        BlkOp::Flush => {
            // Every acknowledged write is already durable on every replica; a FLUSH waits for
            // the writes before it that are still in flight (DESIGN invariant 1).
            writes.barrier().await;
            Ok(0)
        }
        BlkOp::GetId { buf } => {
            let mut id = [0u8; crate::request::ID_BYTES as usize];
            let n = serial.len().min(id.len());
            id[..n].copy_from_slice(&serial.as_bytes()[..n]);
            let len = buf.len as usize;
            mem.memory().write_slice(&id[..len], GuestAddress(buf.addr)).map_err(|_| IoError::GuestMemory)?;
            Ok(buf.len)
        }
    }
}

/// The request's buffers as guest memory the engine can do IO on directly, when every one
/// is whole sectors long and inside one region of guest memory (the usual case).
fn guest_ranges(mem: &GuestMemory, bufs: &[GuestBuf]) -> Option<Vec<(GuestBuf, Arc<GuestRange>)>> {
    if bufs.iter().any(|b| u64::from(b.len) % SECTOR_SIZE_BYTES != 0) {
        return None;
    }
    let map = mem.memory().into_inner();
    bufs.iter().map(|&b| GuestRange::new(map.clone(), b).map(|r| (b, Arc::new(r)))).collect()
}

/// Each buffer is written straight from guest memory to every replica, all at once.
async fn write_direct(
    writer: &VolumeWriter,
    offset: u64,
    ranges: Vec<(GuestBuf, Arc<GuestRange>)>,
) -> Result<(), IoError> {
    let mut at = offset;
    let mut writes = Vec::with_capacity(ranges.len());
    for (buf, range) in ranges {
        let len = buf.len as usize;
        writes.push(writer.write(at, range as Arc<dyn store::IoMemory>, 0..len));
        at += len as u64;
    }
    for result in futures_util::future::join_all(writes).await {
        result?;
    }
    Ok(())
}

/// Each buffer is read straight into guest memory, split where it crosses an extent.
async fn read_direct(
    engine: &Engine,
    volume: VolumeId,
    offset: u64,
    bufs: &[GuestBuf],
    ranges: Vec<(GuestBuf, Arc<GuestRange>)>,
) -> Result<(), IoError> {
    let mut reads = Vec::new();
    let mut at = offset;
    for ((_, range), buf) in ranges.into_iter().zip(bufs) {
        let mut done = 0u64;
        while done < u64::from(buf.len) {
            let (_, within) = extent_of(at + done);
            let n = (EXTENT_SIZE_BYTES - within).min(u64::from(buf.len) - done);
            let target: Arc<dyn store::IoMemory> = range.clone();
            reads.push(engine.read_into(volume, at + done, target, done as usize..(done + n) as usize));
            done += n;
        }
        at += u64::from(buf.len);
    }
    for result in futures_util::future::join_all(reads).await {
        result?;
    }
    Ok(())
}

/// The bounds-checked path with one copy, for buffers that are not whole sectors.
async fn read_copied(
    mem: &GuestMemory,
    engine: &Engine,
    volume: VolumeId,
    offset: u64,
    bufs: &[GuestBuf],
) -> Result<(), IoError> {
    let len: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
    let mut done = 0u64;
    while done < len {
        let (_, within) = extent_of(offset + done);
        let n = (EXTENT_SIZE_BYTES - within).min(len - done);
        let data = engine.read(volume, offset + done, n).await?;
        let zeros;
        let bytes = match &data {
            Some(data) => data.as_slice(),
            None => {
                zeros = vec![0u8; n as usize];
                &zeros
            }
        };
        copy_to_guest(&mem.memory(), bufs, done, bytes).ok_or(IoError::GuestMemory)?;
        done += n;
    }
    Ok(())
}

async fn write_copied(mem: &GuestMemory, writer: &VolumeWriter, offset: u64, bufs: &[GuestBuf]) -> Result<(), IoError> {
    let len: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
    let mut data = AlignedBuf::zeroed(len as usize);
    copy_from_guest(&mem.memory(), bufs, data.as_mut_slice()).ok_or(IoError::GuestMemory)?;
    writer.write(offset, Arc::new(data), 0..len as usize).await?;
    Ok(())
}

/// Counts a request out and, unless its queue was stopped since it began, returns it to the
/// guest. Locks in the order popping takes them, the vring's and then the in-flight count's:
/// the other order deadlocks a completion against a queue being drained.
fn finish(
    in_flight: &InFlight,
    generation: u64,
    vring: &Vring,
    mem: &GuestMemory,
    head: u16,
    status: Option<(GuestBuf, u8)>,
    written: u32,
) {
    let mut ring = vring.get_mut();
    in_flight.end(generation, || complete(&mut ring, mem, head, status, written));
}

/// Writes the status byte and returns the chain to the guest, notifying it if it asked.
/// The vring lock (held by the caller) makes add_used and the notification atomic.
fn complete(
    state: &mut VringState<GuestMemory>,
    mem: &GuestMemory,
    head: u16,
    status: Option<(GuestBuf, u8)>,
    written: u32,
) {
    let mut used_len = written;
    if let Some((buf, value)) = status {
        match mem.memory().write_obj(value, GuestAddress(buf.addr)) {
            Ok(()) => used_len += 1,
            Err(e) => tracing::debug!(error = %e, "status byte outside guest memory"),
        }
    }
    if let Err(e) = state.add_used(head, used_len) {
        tracing::warn!(error = %e, "returning a chain to the guest failed");
        return;
    }
    if !matches!(state.needs_notification(), Ok(false)) {
        // No call eventfd yet, or QEMU is gone: nothing more to do.
        let _ = state.signal_used_queue();
    }
}

/// Requests in flight on one queue, so stopping the queue can wait for them; and the
/// queue's generation, so a request that outlives a stop never touches the ring (or guest
/// memory) of the queue's next life.
#[derive(Default)]
struct InFlight {
    /// (requests in flight, generation)
    state: Mutex<(usize, u64)>,
    idle: Condvar,
}

impl InFlight {
    /// Counts a request in; returns the generation it belongs to.
    fn begin(&self) -> u64 {
        let mut state = self.state.lock().expect("in-flight lock");
        state.0 += 1;
        state.1
    }

    /// Counts a request out, running `complete` only if the queue has not been stopped
    /// since the request began. Completion and stop are serialised by the lock.
    fn end(&self, generation: u64, complete: impl FnOnce()) {
        let mut state = self.state.lock().expect("in-flight lock");
        if state.1 == generation {
            complete();
        }
        state.0 -= 1;
        if state.0 == 0 {
            self.idle.notify_all();
        }
    }

    /// Whether the queue is still in `generation` (not stopped since).
    fn current(&self, generation: u64) -> bool {
        self.state.lock().expect("in-flight lock").1 == generation
    }

    /// Waits for the requests in flight (at most `timeout`), then starts a new generation.
    fn stop(&self, timeout: Duration) -> bool {
        let state = self.state.lock().expect("in-flight lock");
        let (mut state, _) = self.idle.wait_timeout_while(state, timeout, |s| s.0 > 0).expect("in-flight lock");
        state.1 += 1;
        state.0 == 0
    }
}

/// Orders FLUSH after the writes submitted before it.
#[derive(Default)]
pub struct WriteOrder {
    state: Mutex<(u64, BTreeSet<u64>)>,
    changed: tokio::sync::Notify,
}

impl WriteOrder {
    pub fn begin(&self) -> u64 {
        let mut state = self.state.lock().expect("write order lock");
        let ticket = state.0;
        state.0 += 1;
        state.1.insert(ticket);
        ticket
    }

    pub fn end(&self, ticket: u64) {
        self.state.lock().expect("write order lock").1.remove(&ticket);
        self.changed.notify_waiters();
    }

    /// Returns once every write that began before this call has ended.
    pub async fn barrier(&self) {
        let upto = self.state.lock().expect("write order lock").0;
        loop {
            let changed = self.changed.notified();
            let oldest = self.state.lock().expect("write order lock").1.first().copied();
            if oldest.is_none_or(|t| t >= upto) {
                return;
            }
            changed.await;
        }
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        QUEUES_MAX
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // No VIRTIO_BLK_F_FLUSH: the device has no volatile cache, so the guest treats it as
        // write-through and sends one request per durable write.
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        // `self.mem` shares the daemon's atomic: it sees the new map already.
        Ok(())
    }

    /// One worker thread per queue, so queues never wait on each other.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..QUEUES_MAX).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exit.get(thread_index)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(in_flight) = self.in_flight.get(queue_index as usize) {
            if !in_flight.stop(DRAIN_TIMEOUT) {
                tracing::warn!(volume = %self.target.volume, queue_index, "queue stopped with requests still in flight; their completions will be dropped");
            }
        }
        Ok(())
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], thread_id: usize) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected epoll event set"));
        }
        // With one queue per thread, `device_event` indexes this thread's one vring and the
        // queue number is the thread's.
        let vring = vrings.get(usize::from(device_event)).ok_or_else(|| io::Error::other("unknown vring event"))?;
        // An error here would end this queue's worker thread for good; a queue the guest (or
        // a racing reset) left in a bad state is logged and waits for the next kick or reset.
        if let Err(e) = self.drain_queue(thread_id, vring) {
            tracing::warn!(volume = %self.target.volume, queue = thread_id, error = %e, "virtqueue unusable until reset");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_that_outlives_a_queue_stop_is_not_completed_into_the_next_ring() {
        let in_flight = InFlight::default();
        let before_stop = in_flight.begin();

        let drained = in_flight.stop(Duration::ZERO);
        let after_stop = in_flight.begin();
        let mut completed = Vec::new();
        in_flight.end(before_stop, || completed.push("before"));
        in_flight.end(after_stop, || completed.push("after"));

        assert!(!drained, "the stop gave up on the request in flight");
        assert_eq!(completed, vec!["after"]);
        assert!(in_flight.stop(Duration::ZERO), "both were counted out");
    }

    #[test]
    fn a_completion_never_deadlocks_against_a_queue_being_popped() {
        let (done, finished) = std::sync::mpsc::channel();
        // On a thread of its own, so a deadlock fails the test instead of hanging it.
        std::thread::spawn(move || {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap());
            let vring = Vring::new(mem.clone(), 16).unwrap();
            let in_flight = Arc::new(InFlight::default());
            let generation = in_flight.begin();
            // The popper holds the vring while it counts a new request in; a completion
            // runs meanwhile on another thread. With the locks taken in opposite orders the
            // two wait on each other for ever.
            let popping = vring.get_mut();
            let completing = {
                let (in_flight, vring, mem) = (in_flight.clone(), vring.clone(), mem.clone());
                std::thread::spawn(move || finish(&in_flight, generation, &vring, &mem, 0, None, 0))
            };
            std::thread::sleep(Duration::from_millis(50));
            in_flight.begin();
            drop(popping);
            completing.join().unwrap();
            done.send(in_flight.stop(Duration::ZERO)).unwrap();
        });

        let drained = finished.recv_timeout(Duration::from_secs(5));

        assert_eq!(drained, Ok(false), "no deadlock, and the second request is still in flight");
    }
}
