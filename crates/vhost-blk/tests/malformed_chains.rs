//! A guest's virtqueue, laid out by hand in real guest memory, served by a `BlkDevice` over a
//! real one-node volume engine on a real disk file. Malformed descriptor chains (out-of-range
//! addresses, zero-length data, wrong direction, sectors past the end, no status byte) each
//! fail their own request, and the device goes on serving the good requests around them.

use model::{
    ClusterCommand, ClusterId, ClusterState, CommandOutcome, Disk, DiskId, Node, NodeId, PoolId, VolumeId,
    EXTENT_SIZE_BYTES, SECTOR_SIZE_BYTES,
};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use store::{DiskIdentity, DiskSet, LocalDisk};
use tokio::sync::watch;
use vhost_blk::request::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vhost_blk::{BlkDevice, DiskTarget, GuestMemory, QUEUE_SIZE};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use volume::{ActiveLog, DirtyLog, Engine, EngineConfig, ReplicaService, StateTopology, Topology};

const NODE: NodeId = NodeId(1);
const DISK: DiskId = DiskId(10);
const VOLUME: VolumeId = VolumeId(0);
/// Four extents: 16 MiB, the smallest volume spanning more than one placement group.
const VOLUME_BYTES: u64 = 4 * EXTENT_SIZE_BYTES;
/// What the device reports to the guest as its capacity (32768 sectors).
const CAPACITY_SECTORS: u64 = VOLUME_BYTES / SECTOR_SIZE_BYTES;
/// The disk file holding the one replica: room for the volume's four extents and then some.
const DISK_BYTES: u64 = 64 << 20;

/// The guest's RAM: one 16 MiB region at guest physical address 0.
const GUEST_MEMORY_BYTES: usize = 16 << 20;
/// An address no guest region covers.
const OUTSIDE_GUEST_MEMORY: u64 = 0xFFFF_FFFF_0000;

// Where the one virtqueue lives in guest memory (virtio 1.2, 2.7 split virtqueues), each part
// on its own page: the descriptor table (16 bytes a descriptor), the available ring (flags,
// idx, a u16 head per entry) and the used ring (flags, idx, an {id u32, len u32} per entry).
const DESC_TABLE: u64 = 0x0000;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

// Where request headers, status bytes and data buffers are carved from, one region each so
// no request's memory overlaps another's.
const HEADERS: u64 = 0x10_0000;
const STATUSES: u64 = 0x20_0000;
const BUFFERS: u64 = 0x30_0000;
const HEADER_BYTES: u32 = 16;
/// Every data buffer is one 4 KiB page, eight sectors.
const BUFFER_BYTES: u32 = 4096;
/// Status bytes start out as this, which is no virtio-blk status: a status the device never
/// wrote stays visible.
const UNWRITTEN: u8 = 0xFF;

/// Where the good requests write and read: sector 8, the volume's second 4 KiB.
const SECTOR: u64 = 8;
/// How long a batch of requests may take to come back before the device counts as hung.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chains_fail_alone_and_the_device_keeps_serving() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let target = one_node_volume(dir.path()).await;
    let mut guest = Guest::new();
    // The device's one queue, as the vhost-user daemon hands it to `handle_event`.
    let vrings = [guest.virtqueue()];
    let device = BlkDevice::new(target, guest.mem.clone(), tokio::runtime::Handle::current()).expect("device");
    let pattern: Vec<u8> = (0..BUFFER_BYTES).map(|i| (i as u8).wrapping_mul(7).wrapping_add(3)).collect();

    // First batch: one good write, then one malformed request of each kind.
    let source = guest.buffer();
    guest.fill(source, &pattern);
    let good_write = guest.request(VIRTIO_BLK_T_OUT, SECTOR, &[readable(source, BUFFER_BYTES)]);
    let data_outside_memory = guest.request(VIRTIO_BLK_T_IN, SECTOR, &[writable(OUTSIDE_GUEST_MEMORY, BUFFER_BYTES)]);
    let zero_length_buffer = guest.buffer();
    let zero_length = guest.request(VIRTIO_BLK_T_OUT, SECTOR, &[readable(zero_length_buffer, 0)]);
    let wrong_direction_buffer = guest.buffer();
    let wrong_direction = guest.request(VIRTIO_BLK_T_IN, SECTOR, &[readable(wrong_direction_buffer, BUFFER_BYTES)]);
    // Eight sectors starting at the last one: seven of them past the end.
    let past_the_end_buffer = guest.buffer();
    let past_the_end =
        guest.request(VIRTIO_BLK_T_IN, CAPACITY_SECTORS - 1, &[writable(past_the_end_buffer, BUFFER_BYTES)]);
    let header_outside_buffer = guest.buffer();
    let header_outside_status = guest.status();
    let header_outside_memory = Request {
        head: guest.publish(&[
            readable(OUTSIDE_GUEST_MEMORY, HEADER_BYTES),
            writable(header_outside_buffer, BUFFER_BYTES),
            header_outside_status,
        ]),
        status: header_outside_status.addr,
    };

    let first_batch =
        [&good_write, &data_outside_memory, &zero_length, &wrong_direction, &past_the_end, &header_outside_memory];
    let heads: Vec<u16> = first_batch.iter().map(|r| r.head).collect();

    device.handle_event(0, EventSet::IN, &vrings, 0).expect("the device takes the first batch");
    let used = guest.used_within(heads.len(), COMPLETION_TIMEOUT).await;

    assert_eq!(used.keys().copied().collect::<Vec<_>>(), sorted(&heads), "every chain comes back, once");
    assert_eq!(guest.status_of(&good_write), VIRTIO_BLK_S_OK, "the good write succeeds");
    assert_eq!(guest.status_of(&data_outside_memory), VIRTIO_BLK_S_IOERR, "data buffer outside guest memory");
    assert_eq!(guest.status_of(&zero_length), VIRTIO_BLK_S_IOERR, "zero-length data descriptor");
    assert_eq!(guest.status_of(&wrong_direction), VIRTIO_BLK_S_IOERR, "read into a device-readable buffer");
    assert_eq!(guest.status_of(&past_the_end), VIRTIO_BLK_S_IOERR, "read past the last sector");
    assert_eq!(guest.status_of(&header_outside_memory), VIRTIO_BLK_S_IOERR, "header outside guest memory");
    for request in first_batch {
        assert_eq!(used[&request.head], 1, "only the status byte is written for head {}", request.head);
    }
    assert!(guest.read(wrong_direction_buffer).iter().all(|&b| b == 0), "a refused read writes no data");

    // Second batch: a good read sees the first write; a chain with nowhere to put a status
    // still comes back; a good read after it is still served.
    let first_read_buffer = guest.buffer();
    let good_read = guest.request(VIRTIO_BLK_T_IN, SECTOR, &[writable(first_read_buffer, BUFFER_BYTES)]);
    let no_status_header = guest.header(VIRTIO_BLK_T_IN, SECTOR);
    let no_status_buffer = guest.buffer();
    // The last descriptor is one byte, as a status should be, but device-readable.
    let no_status_byte = guest.status().addr;
    let no_status =
        guest.publish(&[no_status_header, writable(no_status_buffer, BUFFER_BYTES), readable(no_status_byte, 1)]);
    let last_read_buffer = guest.buffer();
    let read_after = guest.request(VIRTIO_BLK_T_IN, SECTOR, &[writable(last_read_buffer, BUFFER_BYTES)]);

    let all_heads: Vec<u16> = heads.iter().copied().chain([good_read.head, no_status, read_after.head]).collect();

    device.handle_event(0, EventSet::IN, &vrings, 0).expect("the device takes the second batch");
    let used = guest.used_within(all_heads.len(), COMPLETION_TIMEOUT).await;

    assert_eq!(used.keys().copied().collect::<Vec<_>>(), sorted(&all_heads), "every chain comes back, once");
    assert_eq!(guest.status_of(&good_read), VIRTIO_BLK_S_OK, "the good read succeeds");
    assert_eq!(guest.read(first_read_buffer), pattern, "the good read sees the good write");
    assert_eq!(used[&good_read.head], BUFFER_BYTES + 1, "data and status written");
    assert_eq!(used[&no_status], 0, "a chain without a status comes back with nothing written");
    assert_eq!(guest.byte(no_status_byte), UNWRITTEN, "a device-readable status byte is left alone");
    assert!(guest.read(no_status_buffer).iter().all(|&b| b == 0), "an unanswerable request is not run");
    assert_eq!(guest.status_of(&read_after), VIRTIO_BLK_S_OK, "the device still serves");
    assert_eq!(guest.read(last_read_buffer), pattern);
    assert_eq!(used[&read_after.head], BUFFER_BYTES + 1);
}

/// A request in the queue: its chain's head and its status byte's address.
struct Request {
    head: u16,
    status: u64,
}

#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    device_writable: bool,
}

fn readable(addr: u64, len: u32) -> Descriptor {
    Descriptor { addr, len, device_writable: false }
}

fn writable(addr: u64, len: u32) -> Descriptor {
    Descriptor { addr, len, device_writable: true }
}

fn sorted(heads: &[u16]) -> Vec<u16> {
    let mut heads = heads.to_vec();
    heads.sort_unstable();
    heads
}

/// The driver side: guest memory with one split virtqueue, filled the way a guest's
/// virtio-blk driver would.
struct Guest {
    mem: GuestMemory,
    next_descriptor: u16,
    next_avail: u16,
    next_header: u64,
    next_status: u64,
    next_buffer: u64,
}

impl Guest {
    fn new() -> Self {
        let map = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_MEMORY_BYTES)]).expect("guest memory");
        Guest {
            mem: GuestMemory::new(map),
            next_descriptor: 0,
            next_avail: 0,
            next_header: HEADERS,
            next_status: STATUSES,
            next_buffer: BUFFERS,
        }
    }

    /// The device's side of the queue, set up as QEMU's vhost-user messages would.
    fn virtqueue(&self) -> VringRwLock<GuestMemory> {
        let vring = VringRwLock::new(self.mem.clone(), QUEUE_SIZE as u16).expect("vring");
        vring.set_queue_size(QUEUE_SIZE as u16);
        vring.set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING).expect("queue addresses");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    /// A fresh zeroed data buffer.
    fn buffer(&mut self) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += u64::from(BUFFER_BYTES);
        addr
    }

    /// A fresh request header, as its device-readable descriptor.
    fn header(&mut self, kind: u32, sector: u64) -> Descriptor {
        let addr = self.next_header;
        self.next_header += u64::from(HEADER_BYTES);
        let mut header = [0u8; HEADER_BYTES as usize];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.fill(addr, &header);
        readable(addr, HEADER_BYTES)
    }

    /// A fresh status byte, still `UNWRITTEN`, as its device-writable descriptor.
    fn status(&mut self) -> Descriptor {
        let addr = self.next_status;
        self.next_status += 1;
        self.fill(addr, &[UNWRITTEN]);
        writable(addr, 1)
    }

    /// Queues the usual chain: header, `data`, status.
    fn request(&mut self, kind: u32, sector: u64, data: &[Descriptor]) -> Request {
        let mut chain = vec![self.header(kind, sector)];
        chain.extend_from_slice(data);
        let status = self.status();
        chain.push(status);
        Request { head: self.publish(&chain), status: status.addr }
    }

    /// Writes `chain` into the descriptor table and makes it available; returns its head.
    fn publish(&mut self, chain: &[Descriptor]) -> u16 {
        let head = self.next_descriptor;
        for (i, d) in chain.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == chain.len();
            let flags = if last { 0 } else { DESC_F_NEXT } | if d.device_writable { DESC_F_WRITE } else { 0 };
            let next = if last { 0 } else { index + 1 };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.fill(DESC_TABLE + 16 * u64::from(index), &raw);
        }
        self.next_descriptor += chain.len() as u16;
        let slot = u64::from(self.next_avail % QUEUE_SIZE as u16);
        self.fill(AVAIL_RING + 4 + 2 * slot, &head.to_le_bytes());
        self.next_avail = self.next_avail.wrapping_add(1);
        // The index last, with release ordering, as a driver publishes it.
        self.mem.memory().store(self.next_avail.to_le(), GuestAddress(AVAIL_RING + 2), Ordering::Release).unwrap();
        head
    }

    /// Waits until the used ring holds `count` entries or `timeout` passes, and returns what
    /// it holds then: each head with its used length.
    async fn used_within(&self, count: usize, timeout: Duration) -> BTreeMap<u16, u32> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut used_idx = self.used_idx();
        while usize::from(used_idx) < count && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            used_idx = self.used_idx();
        }
        let mut used = BTreeMap::new();
        for i in 0..used_idx {
            let element = self.read_array::<8>(USED_RING + 4 + 8 * u64::from(i % QUEUE_SIZE as u16));
            let id = u32::from_le_bytes(element[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(element[4..8].try_into().unwrap());
            let head = u16::try_from(id).expect("a used id is a descriptor index");
            assert!(used.insert(head, len).is_none(), "head {head} came back twice");
        }
        used
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.memory().load(GuestAddress(USED_RING + 2), Ordering::Acquire).unwrap())
    }

    fn status_of(&self, request: &Request) -> u8 {
        self.byte(request.status)
    }

    fn byte(&self, addr: u64) -> u8 {
        self.read_array::<1>(addr)[0]
    }

    fn read(&self, addr: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; BUFFER_BYTES as usize];
        self.mem.memory().read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    fn read_array<const N: usize>(&self, addr: u64) -> [u8; N] {
        let mut bytes = [0u8; N];
        self.mem.memory().read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    fn fill(&self, addr: u64, bytes: &[u8]) {
        self.mem.memory().write_slice(bytes, GuestAddress(addr)).unwrap();
    }
}

/// A volume this node owns, on a real disk file in `dir`, as the device's target. With one
/// replica, on this node, the engine reaches it in-process: no data listener is needed.
async fn one_node_volume(dir: &std::path::Path) -> DiskTarget {
    let mut state = ClusterState::default();
    let commands = [
        ClusterCommand::InitCluster { id: ClusterId(1) },
        ClusterCommand::AddNode(Node {
            id: NODE,
            api_addr: String::new(),
            data_addr: String::new(),
            cert_sha256: String::new(),
        }),
        ClusterCommand::AddDisk(Disk {
            id: DISK,
            node: NODE,
            path: String::new(),
            size_bytes: DISK_BYTES,
            extent_slots: 15,
        }),
        ClusterCommand::CreatePool { name: "single".into(), replicas: 1, min_size: 1, pgs: vec![vec![DISK]; 4] },
        ClusterCommand::CreateVolume { name: "v".into(), pool: PoolId(0), size_bytes: VOLUME_BYTES },
    ];
    for command in &commands {
        state.apply(command).expect("setup command applies");
    }
    let epoch =
        match state.apply(&ClusterCommand::AcquireVolume { volume: VOLUME, node: NODE, unless_vm_running: false }) {
            Ok(CommandOutcome::VolumeAcquired(epoch)) => epoch,
            other => panic!("acquiring the volume: {other:?}"),
        };

    let identity = DiskIdentity { disk: DISK, node: NODE, cluster: ClusterId(1) };
    let disk = LocalDisk::create(&dir.join("disk.img"), Some(DISK_BYTES), identity).await.expect("disk");
    let disks = Arc::new(DiskSet::default());
    disks.insert(disk);
    let topology: Arc<dyn Topology> = Arc::new(StateTopology::new(NODE, Arc::new(watch::Sender::new(Arc::new(state)))));
    let dirty = DirtyLog::open(&dir.join("dirty.redb")).expect("dirty log");
    let active = ActiveLog::open(&dir.join("active.redb")).expect("activity log");
    let replica = Arc::new(ReplicaService::new(disks, topology.clone(), dirty, active));
    let engine = Engine::new(replica, topology, EngineConfig::default());
    DiskTarget {
        volume: VOLUME,
        size_bytes: VOLUME_BYTES,
        writer: Arc::new(engine.writer(VOLUME, epoch)),
        engine,
        serial: "malformed-chains".into(),
    }
}
