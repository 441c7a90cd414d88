//! Replica servers on loopback, each node's server in a runtime of its own so it can die
//! the way a killed process does (its sockets closed under it). The engine keeps writing
//! through a dead or stalled replica, resync brings it back with only what changed, and
//! peers that send requests for another target, garbage, or replies of the wrong length
//! are refused without harm.

use model::{
    ClusterCommand, ClusterId, ClusterState, Disk, DiskId, ExtentIndex, Node, NodeId, OwnerEpoch, PgEpoch, PgId,
    PoolId, VolumeId, EXTENT_SIZE_BYTES,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{AlignedBuf, DiskIdentity, DiskSet, LocalDisk};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use volume::wire::{Op, Request, ResponseHeader, Status, REQUEST_HEADER_BYTES, RESPONSE_HEADER_BYTES};
use volume::{
    ActiveLog, DirtyLog, Engine, EngineConfig, ReplicaService, ResyncStats, StateTopology, Topology, VolumeError,
};

const NODE_A: NodeId = NodeId(1);
const NODE_B: NodeId = NodeId(2);
const CLUSTER: ClusterId = ClusterId(0xc0ffee);
const VOLUME: VolumeId = VolumeId(0);
const DISK_BYTES: u64 = 64 << 20;
/// Short, so a stalled replica costs the test little; the default is 3 s.
const REPLICA_TIMEOUT: Duration = Duration::from_millis(500);

type SharedState = Arc<watch::Sender<Arc<ClusterState>>>;

fn disk_of(node: NodeId) -> DiskId {
    DiskId(node.0 * 10)
}

/// Nodes A and B with a disk each, a 2-replica pool (min_size 1) of 4 PGs, one volume.
fn cluster(port: u16) -> ClusterState {
    let mut state = ClusterState::default();
    let mut apply = |command: ClusterCommand| {
        state.apply(&command).expect("setup command applies");
    };
    apply(ClusterCommand::InitCluster { id: CLUSTER });
    for (node, ip) in [(NODE_A, 2), (NODE_B, 3)] {
        let data_addr = format!("127.0.0.{ip}:{port}");
        apply(ClusterCommand::AddNode(Node {
            id: node,
            api_addr: String::new(),
            data_addr,
            cert_sha256: String::new(),
        }));
        apply(ClusterCommand::AddDisk(Disk {
            id: disk_of(node),
            node,
            path: String::new(),
            size_bytes: DISK_BYTES,
            extent_slots: 15,
        }));
    }
    let pgs = vec![vec![disk_of(NODE_A), disk_of(NODE_B)]; 4];
    apply(ClusterCommand::CreatePool { name: "replicated-2".into(), replicas: 2, min_size: 1, pgs });
    apply(ClusterCommand::CreateVolume { name: "v".into(), pool: PoolId(0), size_bytes: 4 * EXTENT_SIZE_BYTES });
    apply(ClusterCommand::AcquireVolume { volume: VOLUME, node: NODE_A, unless_vm_running: false });
    state
}

/// A node: its disk and dirty log under `dir`, its replica server on its own runtime.
struct TestNode {
    engine: Engine,
    disks: Arc<DiskSet>,
    server: Option<tokio::runtime::Runtime>,
}

impl TestNode {
    async fn start(node: NodeId, state: &SharedState, dir: &std::path::Path, fresh: bool) -> TestNode {
        let addr = state.borrow().nodes[&node].data_addr.clone();
        TestNode::start_on(node, state, dir, fresh, &addr).await
    }

    /// A node whose replica server listens on `addr` (peers reach it through a link there).
    async fn start_on(node: NodeId, state: &SharedState, dir: &std::path::Path, fresh: bool, addr: &str) -> TestNode {
        let path = dir.join(format!("{node}.img"));
        let disk = if fresh {
            let identity = DiskIdentity { disk: disk_of(node), node, cluster: CLUSTER };
            LocalDisk::create(&path, Some(DISK_BYTES), identity).await.expect("disk")
        } else {
            LocalDisk::open(&path, disk_of(node)).await.expect("disk reopens")
        };
        let disks = Arc::new(DiskSet::default());
        disks.insert(disk);
        let topology: Arc<dyn Topology> = Arc::new(StateTopology::new(node, state.clone()));
        let dirty = DirtyLog::open(&dir.join(format!("{node}-dirty.redb"))).expect("dirty log");
        let active = ActiveLog::open(&dir.join(format!("{node}-active.redb"))).expect("activity log");
        let replica = Arc::new(ReplicaService::new(disks.clone(), topology.clone(), dirty, active));
        let server = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = server.block_on_listener(addr);
        server.spawn(volume::serve(listener, replica.clone()));
        let config =
            EngineConfig { replica_timeout: REPLICA_TIMEOUT, io_wait: Duration::from_secs(10), ..Default::default() };
        TestNode { engine: Engine::new(replica, topology, config), disks, server: Some(server) }
    }

    /// Ends the node's replica server the way a SIGKILL does: every socket closes at once,
    /// and every task of it is gone when this returns.
    async fn kill(&mut self) {
        let server = self.server.take().expect("running");
        tokio::task::spawn_blocking(move || server.shutdown_timeout(Duration::from_secs(5))).await.unwrap();
    }

    async fn stored(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let disk = self.disks.all().pop().unwrap();
        let (extent, within) = model::extent_of(offset);
        disk.read(VOLUME, extent, within, len).await.unwrap().map(|b| b.as_slice().to_vec())
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown_background();
        }
    }
}

trait BindOn {
    fn block_on_listener(&self, addr: &str) -> TcpListener;
}

impl BindOn for tokio::runtime::Runtime {
    fn block_on_listener(&self, addr: &str) -> TcpListener {
        let std = std::net::TcpListener::bind(addr).expect("bind data address");
        std.set_nonblocking(true).unwrap();
        let _guard = self.enter();
        TcpListener::from_std(std).unwrap()
    }
}

fn pattern(seed: u8, len: usize) -> Arc<AlignedBuf> {
    let bytes: Vec<u8> = (0..len as u32).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect();
    Arc::new(AlignedBuf::copy_from(&bytes))
}

fn pg_of_offset(state: &ClusterState, offset: u64) -> (PgId, model::Pg) {
    let (extent, _) = model::extent_of(offset);
    let (pg, placement) = state.pools[&PoolId(0)].pg_for(VOLUME, extent);
    (pg, placement.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_when_a_replica_dies_and_resync_brings_back_only_what_changed() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17811))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    let mut b = TestNode::start(NODE_B, &state, dir.path(), true).await;
    let writer = a.engine.writer(VOLUME, OwnerEpoch(1));
    writer.write(0, pattern(1, 65536), 0..65536).await.expect("write with both replicas");

    b.kill().await;
    let started = Instant::now();
    for i in 0..16u64 {
        writer.write(i * 4096, pattern(2 + i as u8, 4096), 0..4096).await.expect("write with B dead");
    }

    assert!(started.elapsed() < REPLICA_TIMEOUT * 4, "a dead replica is found by its closed socket, not a timeout");
    let (pg, placement) = pg_of_offset(&state.borrow(), 0);
    assert_eq!(placement.acting().collect::<Vec<_>>(), vec![disk_of(NODE_A)], "B is out of {pg}");
    assert_eq!(placement.epoch, PgEpoch(2));
    assert_eq!(a.engine.replica().dirty().bytes(PoolId(0), pg), 65536, "A recorded what B missed");
    assert_eq!(b.stored(0, 4096).await.unwrap(), pattern(1, 4096).as_slice(), "B still holds the old data");

    drop(b);
    let b = TestNode::start(NODE_B, &state, dir.path(), false).await;
    let stats = Arc::new(ResyncStats::default());
    let resync = tokio::spawn(volume::resync_loop(a.engine.clone(), stats.clone()));
    let mut watch = state.subscribe();
    tokio::time::timeout(Duration::from_secs(20), watch.wait_for(|s| !pg_of_offset(s, 0).1.is_degraded()))
        .await
        .expect("B is brought back in")
        .unwrap();
    resync.abort();

    assert_eq!(stats.bytes_copied.load(Ordering::Relaxed), 65536, "resync copied the changed bytes only");
    for i in 0..16u64 {
        assert_eq!(b.stored(i * 4096, 4096).await.unwrap(), pattern(2 + i as u8, 4096).as_slice());
    }
    // Out at 2; fenced at 3 before the first copy (this resync run may follow an earlier
    // one whose copies are still queued); back in at 4.
    assert_eq!(pg_of_offset(&state.borrow(), 0).1.epoch, PgEpoch(4));
    writer.write(0, pattern(40, 4096), 0..4096).await.expect("write with both replicas again");
    assert_eq!(b.stored(0, 4096).await.unwrap(), pattern(40, 4096).as_slice(), "B takes writes again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_answering_is_taken_out_after_the_replica_timeout() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17812))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    // B's address accepts connections and reads requests, and never answers: a stopped process.
    let stalled = TcpListener::bind(&state.borrow().nodes[&NODE_B].data_addr).await.unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (stream, _) = stalled.accept().await.unwrap();
            held.push(stream);
        }
    });
    let writer = a.engine.writer(VOLUME, OwnerEpoch(1));

    let started = Instant::now();
    writer.write(0, pattern(1, 4096), 0..4096).await.expect("the write completes on A alone");
    let stalled_for = started.elapsed();

    assert!(stalled_for >= REPLICA_TIMEOUT, "{stalled_for:?}");
    assert!(stalled_for < REPLICA_TIMEOUT * 3, "one timeout and one PG change: {stalled_for:?}");
    assert!(pg_of_offset(&state.borrow(), 0).1.is_degraded());
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_replica_gone_a_write_fails_with_a_clear_error_after_the_io_wait() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17813))));
    let mut a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    let mut b = TestNode::start(NODE_B, &state, dir.path(), true).await;
    let topology = StateTopology::new(NODE_A, state.clone());
    let config =
        EngineConfig { replica_timeout: REPLICA_TIMEOUT, io_wait: Duration::from_secs(2), ..Default::default() };
    // A writer on a third node, C, so that both replicas are remote and both can die.
    let c_state = {
        let mut s = (**state.borrow()).clone();
        s.apply(&ClusterCommand::AddNode(Node {
            id: NodeId(3),
            api_addr: String::new(),
            data_addr: "127.0.0.4:17813".into(),
            cert_sha256: String::new(),
        }))
        .unwrap();
        s.apply(&ClusterCommand::AcquireVolume { volume: VOLUME, node: NodeId(3), unless_vm_running: false }).unwrap();
        s
    };
    state.send_replace(Arc::new(c_state));
    let c_topology: Arc<dyn Topology> = Arc::new(topology.for_node(NodeId(3)));
    let c_dirty = DirtyLog::open(&dir.path().join("c-dirty.redb")).unwrap();
    let c_active = ActiveLog::open(&dir.path().join("c-active.redb")).unwrap();
    let c_replica = Arc::new(ReplicaService::new(Arc::new(DiskSet::default()), c_topology.clone(), c_dirty, c_active));
    let c = Engine::new(c_replica, c_topology, config);
    let writer = c.writer(VOLUME, OwnerEpoch(2));
    writer.write(0, pattern(1, 4096), 0..4096).await.expect("write with both replicas");

    b.kill().await;
    a.kill().await;
    let failed = writer.write(0, pattern(2, 4096), 0..4096).await;

    assert!(matches!(failed, Err(VolumeError::Unavailable { .. })), "{failed:?}");
    let message = failed.unwrap_err().to_string();
    assert!(message.contains("cluster status"), "the error says where to look: {message}");
    let (_, placement) = pg_of_offset(&state.borrow(), 0);
    assert_eq!(placement.acting().count(), 1, "the last acting replica is never taken out");
    let after = writer.write(EXTENT_SIZE_BYTES, pattern(3, 4096), 0..4096).await;
    assert!(
        matches!(after, Err(VolumeError::WriterStopped { .. })),
        "no write after one of unknown outcome: {after:?}"
    );
}

async fn raw_request(stream: &mut TcpStream, request: Request) -> Option<(ResponseHeader, Vec<u8>)> {
    stream.write_all(&request.encode()).await.ok()?;
    let mut header = [0u8; RESPONSE_HEADER_BYTES];
    stream.read_exact(&mut header).await.ok()?;
    let header = ResponseHeader::parse(&header).unwrap();
    let mut payload = vec![0u8; header.payload_len as usize];
    stream.read_exact(&mut payload).await.ok()?;
    Some((header, payload))
}

fn read_request(disk: DiskId, cluster: ClusterId, pg: PgId) -> Request {
    Request {
        op: Op::Read,
        resync: false,
        id: 7,
        volume: VOLUME,
        extent: ExtentIndex(0),
        offset_bytes: 0,
        len_bytes: 4096,
        owner_epoch: OwnerEpoch(0),
        pg,
        pg_epoch: PgEpoch(1),
        disk,
        cluster,
        seq: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_another_target_and_garbage_are_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17814))));
    let _a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    let addr = state.borrow().nodes[&NODE_A].data_addr.clone();
    let (pg, _) = pg_of_offset(&state.borrow(), 0);

    let mut other_cluster = TcpStream::connect(&addr).await.unwrap();
    let (refused, message) =
        raw_request(&mut other_cluster, read_request(disk_of(NODE_A), ClusterId(1), pg)).await.unwrap();
    let mut other_disk = TcpStream::connect(&addr).await.unwrap();
    let (refused_disk, _) = raw_request(&mut other_disk, read_request(disk_of(NODE_B), CLUSTER, pg)).await.unwrap();
    let mut garbage = TcpStream::connect(&addr).await.unwrap();
    garbage.write_all(&[0x5a; REQUEST_HEADER_BYTES]).await.unwrap();
    let mut rest = Vec::new();
    let garbage_closed = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut rest)).await;
    let mut good = TcpStream::connect(&addr).await.unwrap();
    let (served, _) = raw_request(&mut good, read_request(disk_of(NODE_A), CLUSTER, pg)).await.unwrap();

    assert_eq!(refused.status, Status::WrongTarget);
    assert!(String::from_utf8_lossy(&message).contains("cluster"), "{}", String::from_utf8_lossy(&message));
    assert_eq!(refused_disk.status, Status::WrongTarget);
    let mut after = [0u8; 1];
    assert_eq!(other_cluster.read(&mut after).await.unwrap(), 0, "the connection is closed after a wrong target");
    assert!(matches!(garbage_closed, Ok(Ok(0))), "garbage closes the connection: {garbage_closed:?}");
    assert_eq!(served.status, Status::Unallocated, "the server goes on serving good requests");
}

/// A peer that answers every read with `reply_len` bytes of 0xee after the header, sending
/// the first `send_now` of them at once and the rest after `stall`.
async fn lying_peer(addr: &str, reply_len: u32, send_now: usize, stall: Duration) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut header = [0u8; REQUEST_HEADER_BYTES];
                while stream.read_exact(&mut header).await.is_ok() {
                    let request = Request::parse(&header).unwrap();
                    let reply = ResponseHeader {
                        status: Status::Ok,
                        id: request.id,
                        owner_epoch: OwnerEpoch(1),
                        pg_epoch: PgEpoch(1),
                        payload_len: reply_len,
                    };
                    let payload = vec![0xeeu8; reply_len as usize];
                    let _ = stream.write_all(&reply.encode()).await;
                    let _ = stream.write_all(&payload[..send_now]).await;
                    tokio::time::sleep(stall).await;
                    let _ = stream.write_all(&payload[send_now..]).await;
                }
            });
        }
    })
}

/// Node A reading a volume whose only replica is on node B (a 1-replica pool on B's disk).
fn remote_only(port: u16) -> ClusterState {
    let mut state = cluster(port);
    let pgs = vec![vec![disk_of(NODE_B)]; 4];
    state.apply(&ClusterCommand::CreatePool { name: "remote".into(), replicas: 1, min_size: 1, pgs }).unwrap();
    state
        .apply(&ClusterCommand::CreateVolume { name: "far".into(), pool: PoolId(1), size_bytes: EXTENT_SIZE_BYTES })
        .unwrap();
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_reply_of_the_wrong_length_is_refused_and_never_fills_the_callers_memory() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(remote_only(17815))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    let peer = lying_peer(&state.borrow().nodes[&NODE_B].data_addr.clone(), 8192, 8192, Duration::ZERO).await;
    let target = Arc::new(AlignedBuf::copy_from(&[0x11u8; 8192]));

    let result = a.engine.read_into(VolumeId(1), 0, target.clone(), 0..4096).await;

    assert!(matches!(result, Err(VolumeError::NoReplicaReadable { .. })), "{result:?}");
    let message = format!("{:?}", result.unwrap_err());
    assert!(message.contains("ReplyLength"), "{message}");
    assert!(target.as_slice().iter().all(|&b| b == 0x11), "nothing of the bad reply reached the caller");
    peer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_timed_out_never_writes_into_the_callers_memory_afterwards() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(remote_only(17816))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    // Half the reply now, the rest long after the reader's timeout.
    let peer = lying_peer(&state.borrow().nodes[&NODE_B].data_addr.clone(), 4096, 2048, REPLICA_TIMEOUT * 2).await;
    let target = Arc::new(AlignedBuf::copy_from(&[0x11u8; 4096]));

    let result = a.engine.read_into(VolumeId(1), 0, target.clone(), 0..4096).await;
    let when_returned = target.as_slice().to_vec();
    tokio::time::sleep(REPLICA_TIMEOUT * 3).await;

    assert!(result.is_err(), "{result:?}");
    assert_eq!(target.as_slice(), &when_returned[..], "the stalled peer's late bytes did not land");
    assert!(target.as_slice()[2048..].iter().all(|&b| b == 0x11));
    peer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_caller_gave_up_never_writes_into_its_memory_afterwards() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(remote_only(17817))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    let peer = lying_peer(&state.borrow().nodes[&NODE_B].data_addr.clone(), 4096, 2048, REPLICA_TIMEOUT / 2).await;
    let target = Arc::new(AlignedBuf::copy_from(&[0x11u8; 4096]));

    // The caller drops the read (a guest request cancelled, a client gone) mid-payload.
    let read = a.engine.read_into(VolumeId(1), 0, target.clone(), 0..4096);
    let gave_up = tokio::time::timeout(REPLICA_TIMEOUT / 4, read).await;
    let when_dropped = target.as_slice().to_vec();
    tokio::time::sleep(REPLICA_TIMEOUT).await;

    assert!(gave_up.is_err(), "the caller gave up first");
    assert_eq!(target.as_slice(), &when_dropped[..], "the late bytes did not land");
    assert!(target.as_slice()[2048..].iter().all(|&b| b == 0x11));
    peer.abort();
}

/// A replica whose server is not there for a moment (its daemon restarting) is read again
/// a moment later: a read fails only when no replica served it in every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_replica_is_gone_for_a_moment_is_served_when_it_is_back() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(remote_only(17826))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    // B's server runs on another port; its address in the state answers only after 100 ms,
    // through a relay (binding is all that takes).
    let server = "127.0.0.3:17827";
    let b = TestNode::start_on(NODE_B, &state, dir.path(), true, server).await;
    let back = tokio::spawn({
        let addr = state.borrow().nodes[&NODE_B].data_addr.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let listener = TcpListener::bind(&addr).await.unwrap();
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut to_server = TcpStream::connect(server).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut to_server).await;
                });
            }
        }
    });
    let target = Arc::new(AlignedBuf::copy_from(&[0x11u8; 4096]));

    let result = a.engine.read_into(VolumeId(1), 0, target.clone(), 0..4096).await;

    assert!(result.is_ok(), "{result:?}");
    assert!(target.as_slice().iter().all(|&b| b == 0), "never written: zeros");
    back.abort();
    drop(b);
}

/// A 4 KiB write at offset 0 of the volume, as its owner at `epoch` sends it to `node`'s disk.
fn owner_write(state: &SharedState, node: NodeId, epoch: OwnerEpoch) -> Request {
    let (pg, placement) = pg_of_offset(&state.borrow(), 0);
    let read = read_request(disk_of(node), CLUSTER, pg);
    Request { op: Op::Write, len_bytes: 4096, owner_epoch: epoch, pg_epoch: placement.epoch, ..read }
}

/// Sends `request` with block `seed` of the pattern straight to `node`'s replica server, as
/// an owner would; the replica's answer.
async fn send_write(state: &SharedState, node: NodeId, request: Request, seed: u8) -> Status {
    let addr = state.borrow().nodes[&node].data_addr.clone();
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream.write_all(&request.encode()).await.unwrap();
    stream.write_all(pattern(seed, 4096).as_slice()).await.unwrap();
    let mut header = [0u8; RESPONSE_HEADER_BYTES];
    stream.read_exact(&mut header).await.unwrap();
    ResponseHeader::parse(&header).unwrap().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_makes_replicas_identical_where_the_dead_owner_had_a_write_in_flight() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17818))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    let b = TestNode::start(NODE_B, &state, dir.path(), true).await;
    a.engine.writer(VOLUME, OwnerEpoch(1)).write(0, pattern(1, 8192), 0..8192).await.expect("acknowledged write");
    // The owner dies with its next write in flight: it reached B, and never A.
    let in_flight = owner_write(&state, NODE_B, OwnerEpoch(1));
    assert_eq!(send_write(&state, NODE_B, in_flight, 2).await, Status::Ok);
    assert_ne!(a.stored(0, 4096).await, b.stored(0, 4096).await, "the replicas differ where the write was in flight");

    let topology = StateTopology::new(NODE_B, state.clone());
    topology.apply(&ClusterCommand::AcquireVolume { volume: VOLUME, node: NODE_B, unless_vm_running: false }).unwrap();
    let new_owner = b.engine.writer(VOLUME, OwnerEpoch(2));
    let reconciled = b.engine.reconcile(&new_owner).await.expect("reconcile");
    let again = b.engine.reconcile(&new_owner).await.expect("reconcile again");

    assert_eq!(a.stored(0, 8192).await, b.stored(0, 8192).await, "one version on both replicas");
    assert_eq!((reconciled.ranges, reconciled.bytes, reconciled.unreachable), (1, 8192, 0));
    assert_eq!(again.ranges, 0, "what was reconciled is forgotten");
    let late = owner_write(&state, NODE_A, OwnerEpoch(1));
    assert_eq!(send_write(&state, NODE_A, late, 3).await, Status::StaleOwnerEpoch, "the old owner is fenced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_died_with_its_local_replica_gets_that_replica_made_identical_when_it_returns() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17819))));
    let mut a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    let b = TestNode::start(NODE_B, &state, dir.path(), true).await;
    a.engine.writer(VOLUME, OwnerEpoch(1)).write(0, pattern(1, 8192), 0..8192).await.expect("acknowledged write");
    // Owner A dies with its next write in flight: it reached A's own replica, not B's.
    let in_flight = owner_write(&state, NODE_A, OwnerEpoch(1));
    assert_eq!(send_write(&state, NODE_A, in_flight, 2).await, Status::Ok);
    a.kill().await;

    let topology = StateTopology::new(NODE_B, state.clone());
    topology.apply(&ClusterCommand::AcquireVolume { volume: VOLUME, node: NODE_B, unless_vm_running: false }).unwrap();
    let new_owner = b.engine.writer(VOLUME, OwnerEpoch(2));
    let reconciled = b.engine.reconcile(&new_owner).await.expect("reconcile with A gone");
    new_owner.write(65536, pattern(3, 4096), 0..4096).await.expect("B writes on");
    drop(a);
    let a = TestNode::start(NODE_A, &state, dir.path(), false).await;
    let differs_before_resync = a.stored(0, 4096).await != b.stored(0, 4096).await;
    let resync = tokio::spawn(volume::resync_loop(b.engine.clone(), Arc::new(ResyncStats::default())));
    let mut watch = state.subscribe();
    tokio::time::timeout(Duration::from_secs(20), watch.wait_for(|s| !pg_of_offset(s, 0).1.is_degraded()))
        .await
        .expect("A is brought back in")
        .unwrap();
    resync.abort();

    assert_eq!(reconciled.unreachable, 1, "A could not be asked while it was down");
    assert!(differs_before_resync, "A came back holding the write B never got");
    assert_eq!(a.stored(0, 8192).await, b.stored(0, 8192).await, "A holds B's version after resync");
    assert_eq!(a.stored(65536, 4096).await.unwrap(), pattern(3, 4096).as_slice(), "and what B wrote meanwhile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_owner_settles_its_finished_writes_so_a_new_owner_has_nothing_to_reconcile() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17820))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    let b = TestNode::start(NODE_B, &state, dir.path(), true).await;
    let topology: Arc<dyn Topology> = Arc::new(StateTopology::new(NODE_A, state.clone()));
    let config = EngineConfig { settle_interval: Duration::ZERO, ..Default::default() };
    let settling = Engine::new(a.engine.replica().clone(), topology, config);
    let writer = settling.writer(VOLUME, OwnerEpoch(1));
    writer.write(0, pattern(1, 8192), 0..8192).await.unwrap();
    writer.write(EXTENT_SIZE_BYTES, pattern(2, 4096), 0..4096).await.unwrap();

    let on_record = |node: &TestNode| node.engine.replica().active().list(|(_, v, _), _| v == VOLUME).len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while (on_record(&a) > 0 || on_record(&b) > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!((on_record(&a), on_record(&b)), (0, 0), "every finished write was settled on both replicas");
    let topology = StateTopology::new(NODE_B, state.clone());
    topology.apply(&ClusterCommand::AcquireVolume { volume: VOLUME, node: NODE_B, unless_vm_running: false }).unwrap();
    let reconciled = b.engine.reconcile(&b.engine.writer(VOLUME, OwnerEpoch(2))).await.unwrap();
    assert_eq!(reconciled.ranges, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_given_up_by_its_caller_after_it_was_sent_stops_the_writer() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17821))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    // B accepts and never answers, so the write is still out there when its caller leaves.
    let stalled = TcpListener::bind(&state.borrow().nodes[&NODE_B].data_addr).await.unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            held.push(stalled.accept().await.unwrap().0);
        }
    });
    let writer = a.engine.writer(VOLUME, OwnerEpoch(1));

    let gave_up = tokio::time::timeout(REPLICA_TIMEOUT / 5, writer.write(0, pattern(1, 4096), 0..4096)).await;
    let next = writer.write(0, pattern(2, 4096), 0..4096).await;

    assert!(gave_up.is_err(), "the caller gave up first");
    assert!(matches!(next, Err(VolumeError::WriterStopped { .. })), "{next:?}");
    assert!(writer.is_stopped());
    hold.abort();
}

/// Node A alone, with a one-replica pool on its own disk: every write goes to the local
/// replica in-process.
fn local_only(port: u16) -> ClusterState {
    let mut state = cluster(port);
    let pgs = vec![vec![disk_of(NODE_A)]; 4];
    state.apply(&ClusterCommand::CreatePool { name: "local".into(), replicas: 1, min_size: 1, pgs }).unwrap();
    state
        .apply(&ClusterCommand::CreateVolume {
            name: "near".into(),
            pool: PoolId(1),
            size_bytes: 8 * EXTENT_SIZE_BYTES,
        })
        .unwrap();
    state
        .apply(&ClusterCommand::AcquireVolume { volume: VolumeId(1), node: NODE_A, unless_vm_running: false })
        .unwrap();
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_dropped_by_their_callers_mid_allocation_leave_the_disk_consistent() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(local_only(17822))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    let near = VolumeId(1);

    // Each first write to an extent allocates it (zero, sync, table entry, data); its caller
    // gives up a moment in, as an import cancelled with Ctrl-C does. Then a second write to
    // the same extent through a fresh writer.
    for extent in 0..8u64 {
        let dropped = a.engine.writer(near, OwnerEpoch(1));
        let _ = tokio::time::timeout(
            Duration::from_micros(200 * extent),
            dropped.write(extent * EXTENT_SIZE_BYTES, pattern(1, 4096), 0..4096),
        )
        .await;
        let again = a.engine.writer(near, OwnerEpoch(1));
        again.write(extent * EXTENT_SIZE_BYTES + 8192, pattern(2, 4096), 0..4096).await.expect("the next write");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reopened = LocalDisk::open(&dir.path().join(format!("{NODE_A}.img")), disk_of(NODE_A)).await;

    let reopened = reopened.expect("the disk opens: no extent recorded in two slots");
    for extent in 0..8u64 {
        let data = reopened.read(near, ExtentIndex(extent), 8192, 4096).await.unwrap().expect("allocated");
        assert_eq!(data.as_slice(), pattern(2, 4096).as_slice(), "extent {extent} holds the second write");
    }
    assert_eq!(reopened.extents().iter().filter(|(v, _)| *v == near).count(), 8);
}

/// A network link in front of a replica server that delays one resync copy the way a
/// stopped or starved peer does: it holds back the first copy (its sender gives up on it),
/// lets the next copy through, and delivers the held one only after that was served,
/// before passing the answer on. Everything else passes unchanged.
#[derive(Default)]
struct DelayingLink {
    state: std::sync::Mutex<LinkState>,
    /// Signalled when the first copy is held back.
    held: tokio::sync::Notify,
    /// Signalled when the server answered the held copy.
    held_answered: tokio::sync::Notify,
}

type ToServer = Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>;

#[derive(Default)]
struct LinkState {
    connections: u64,
    /// The held copy: its connection, request id, frame, and the way to the server.
    held: Option<(u64, u64, Vec<u8>, ToServer)>,
    /// (connection, request id) of the copy that overtakes the held one.
    overtaker: Option<(u64, u64)>,
    /// What the server answered the held copy.
    held_status: Option<Status>,
    delivered: bool,
}

impl DelayingLink {
    async fn start(listen: &str, server: String) -> Arc<DelayingLink> {
        let link = Arc::new(DelayingLink::default());
        let listener = TcpListener::bind(listen).await.unwrap();
        let serving = link.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let upstream = TcpStream::connect(&server).await.unwrap();
                serving.clone().carry(client, upstream);
            }
        });
        link
    }

    fn carry(self: Arc<Self>, client: TcpStream, upstream: TcpStream) {
        let connection = {
            let mut state = self.state.lock().unwrap();
            state.connections += 1;
            state.connections
        };
        let (mut from_client, to_client) = client.into_split();
        let (mut from_server, to_server) = upstream.into_split();
        let to_server = Arc::new(tokio::sync::Mutex::new(to_server));
        let to_client = Arc::new(tokio::sync::Mutex::new(to_client));
        let link = self.clone();
        let server_side = to_server.clone();
        tokio::spawn(async move {
            let mut header = [0u8; REQUEST_HEADER_BYTES];
            while from_client.read_exact(&mut header).await.is_ok() {
                let request = Request::parse(&header).unwrap();
                let mut frame = header.to_vec();
                frame.resize(REQUEST_HEADER_BYTES + request.payload_bytes(), 0);
                if from_client.read_exact(&mut frame[REQUEST_HEADER_BYTES..]).await.is_err() {
                    break;
                }
                if request.resync && request.op == Op::Write {
                    let mut state = link.state.lock().unwrap();
                    if state.held.is_none() && !state.delivered {
                        state.held = Some((connection, request.id, frame, server_side.clone()));
                        link.held.notify_one();
                        continue;
                    }
                    if state.held.is_some() && state.overtaker.is_none() {
                        state.overtaker = Some((connection, request.id));
                    }
                }
                if server_side.lock().await.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut header = [0u8; RESPONSE_HEADER_BYTES];
            while from_server.read_exact(&mut header).await.is_ok() {
                let response = ResponseHeader::parse(&header).unwrap();
                let mut frame = header.to_vec();
                frame.resize(RESPONSE_HEADER_BYTES + response.payload_len as usize, 0);
                if from_server.read_exact(&mut frame[RESPONSE_HEADER_BYTES..]).await.is_err() {
                    break;
                }
                let (held, overtaken) = {
                    let mut state = self.state.lock().unwrap();
                    let held =
                        state.held.as_ref().is_some_and(|h| (h.0, h.1) == (connection, response.id)) && state.delivered;
                    if held {
                        state.held_status = Some(response.status);
                    }
                    let overtaken = state.overtaker == Some((connection, response.id));
                    (held, overtaken.then(|| state.held.clone()).flatten())
                };
                if held {
                    // Its sender gave up on it long ago.
                    self.held_answered.notify_one();
                    continue;
                }
                if let Some((_, _, late, to_server)) = overtaken {
                    // The newer copy is on the server's disk: now the held one goes, and the
                    // newer copy's answer waits until the server answered it.
                    self.state.lock().unwrap().delivered = true;
                    let (link, to_client) = (self.clone(), to_client.clone());
                    tokio::spawn(async move {
                        to_server.lock().await.write_all(&late).await.unwrap();
                        link.held_answered.notified().await;
                        let _ = to_client.lock().await.write_all(&frame).await;
                    });
                    continue;
                }
                if to_client.lock().await.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_copy_that_got_no_answer_never_lands_over_a_newer_copy() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17823))));
    let a = TestNode::start(NODE_A, &state, dir.path(), true).await;
    // Peers reach B through the link, at B's address in the cluster state.
    let b = TestNode::start_on(NODE_B, &state, dir.path(), true, "127.0.0.3:17824").await;
    let link = DelayingLink::start(&state.borrow().nodes[&NODE_B].data_addr, "127.0.0.3:17824".into()).await;
    let writer = a.engine.writer(VOLUME, OwnerEpoch(1));
    writer.write(0, pattern(1, 4096), 0..4096).await.expect("write to both");
    let (pg, _) = pg_of_offset(&state.borrow(), 0);
    let take_out = ClusterCommand::TakeReplicaOut {
        pool: PoolId(0),
        pg,
        disk: disk_of(NODE_B),
        seen: PgEpoch(1),
        reason: "test".into(),
    };
    StateTopology::new(NODE_A, state.clone()).apply(&take_out).unwrap();
    writer.write(0, pattern(2, 4096), 0..4096).await.expect("write with B out");

    // The first copy to B (of version 2) is held back; version 3 is written meanwhile.
    let resync = tokio::spawn(volume::resync_loop(a.engine.clone(), Arc::new(ResyncStats::default())));
    tokio::time::timeout(Duration::from_secs(10), link.held.notified()).await.expect("a copy was sent to B");
    writer.write(0, pattern(3, 4096), 0..4096).await.expect("write with B out");
    let mut watch = state.subscribe();
    tokio::time::timeout(Duration::from_secs(30), watch.wait_for(|s| !pg_of_offset(s, 0).1.is_degraded()))
        .await
        .expect("B is brought back in")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while link.state.lock().unwrap().held_status.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the held copy reached B");
    resync.abort();

    assert_eq!(b.stored(0, 4096).await.unwrap(), pattern(3, 4096).as_slice(), "B holds the newest version");
    assert_eq!(link.state.lock().unwrap().held_status, Some(Status::StalePgEpoch), "the late copy is refused");
    let placement = pg_of_offset(&state.borrow(), 0).1;
    assert_eq!(placement.epoch, PgEpoch(5), "out at 2, fenced at the run's start and after the lost copy, back in");
}
