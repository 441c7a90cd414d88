//! Two replica servers on loopback and the engine over the real wire: writes reach every
//! replica, and once the owner epoch moves on, the old owner's writes change nothing.

use model::{
    ClusterCommand, ClusterId, ClusterState, Disk, DiskId, Node, NodeId, OwnerEpoch, PoolId, VolumeId,
    EXTENT_SIZE_BYTES,
};
use std::sync::Arc;
use store::{AlignedBuf, DiskIdentity, DiskSet, LocalDisk};
use tokio::sync::watch;
use volume::{ActiveLog, DirtyLog, Engine, EngineConfig, ReplicaService, StateTopology, Topology, VolumeError};

type SharedState = Arc<watch::Sender<Arc<ClusterState>>>;

const NODE_A: NodeId = NodeId(1);
const NODE_B: NodeId = NodeId(2);
const VOLUME: VolumeId = VolumeId(0);

fn apply(state: &mut ClusterState, command: ClusterCommand) {
    state.apply(&command).expect("command applies");
}

/// Node A (127.0.0.2) and node B (127.0.0.3), one disk each, a 2-replica pool, one volume.
fn cluster(port: u16) -> ClusterState {
    let mut state = ClusterState::default();
    apply(&mut state, ClusterCommand::InitCluster { id: ClusterId(1) });
    for (node, ip) in [(NODE_A, 2), (NODE_B, 3)] {
        let data_addr = format!("127.0.0.{ip}:{port}");
        apply(
            &mut state,
            ClusterCommand::AddNode(Node { id: node, api_addr: String::new(), data_addr, cert_sha256: String::new() }),
        );
        let disk =
            Disk { id: DiskId(node_disk(node)), node, path: String::new(), size_bytes: 64 << 20, extent_slots: 15 };
        apply(&mut state, ClusterCommand::AddDisk(disk));
    }
    let pgs = vec![vec![DiskId(10), DiskId(20)]; 4];
    apply(&mut state, ClusterCommand::CreatePool { name: "replicated-2".into(), replicas: 2, min_size: 2, pgs });
    apply(
        &mut state,
        ClusterCommand::CreateVolume { name: "v".into(), pool: PoolId(0), size_bytes: 4 * EXTENT_SIZE_BYTES },
    );
    state
}

fn node_disk(node: NodeId) -> u64 {
    node.0 * 10
}

struct TestNode {
    engine: Engine,
    disks: Arc<DiskSet>,
}

async fn start_node(node: NodeId, state: &SharedState, dir: &std::path::Path) -> TestNode {
    let identity = DiskIdentity { disk: DiskId(node_disk(node)), node, cluster: ClusterId(1) };
    let disk = LocalDisk::create(&dir.join(format!("{node}.img")), Some(64 << 20), identity).await.expect("disk");
    let disks = Arc::new(DiskSet::default());
    disks.insert(disk);
    let topology: Arc<dyn Topology> = Arc::new(StateTopology::new(node, state.clone()));
    let dirty = DirtyLog::open(&dir.join(format!("{node}-dirty.redb"))).expect("dirty log");
    let active = ActiveLog::open(&dir.join(format!("{node}-active.redb"))).expect("activity log");
    let replica = Arc::new(ReplicaService::new(disks.clone(), topology.clone(), dirty, active));
    let addr = state.borrow().nodes[&node].data_addr.clone();
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind data address");
    tokio::spawn(volume::serve(listener, replica.clone()));
    TestNode { engine: Engine::new(replica, topology, EngineConfig::default()), disks }
}

fn pattern(seed: u8) -> Arc<AlignedBuf> {
    let bytes: Vec<u8> = (0..8192u32).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect();
    Arc::new(AlignedBuf::copy_from(&bytes))
}

async fn acquire(state: &SharedState, node: NodeId) -> OwnerEpoch {
    let mut next = (**state.borrow()).clone();
    let outcome =
        next.apply(&ClusterCommand::AcquireVolume { volume: VOLUME, node, unless_vm_running: false }).expect("acquire");
    state.send_replace(Arc::new(next));
    match outcome {
        model::CommandOutcome::VolumeAcquired(epoch) => epoch,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_reaches_both_replicas_and_a_stale_owner_changes_nothing() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17801))));
    let a = start_node(NODE_A, &state, dir.path()).await;
    let b = start_node(NODE_B, &state, dir.path()).await;
    let epoch_a = acquire(&state, NODE_A).await;
    let writer_a = a.engine.writer(VOLUME, epoch_a);
    let first = pattern(1);
    writer_a.write(EXTENT_SIZE_BYTES, first.clone(), 0..8192).await.expect("owner's write");

    let epoch_b = acquire(&state, NODE_B).await;
    let stale = writer_a.write(EXTENT_SIZE_BYTES, pattern(2), 0..8192).await;
    let read_on_b = b.engine.read(VOLUME, EXTENT_SIZE_BYTES, 8192).await.unwrap().expect("allocated");

    assert!(
        matches!(stale, Err(VolumeError::Fenced { sent, current, .. }) if sent == epoch_a && current == epoch_b),
        "{stale:?}"
    );
    assert_eq!(read_on_b.as_slice(), first.as_slice(), "B sees A's acknowledged write, not the stale one");
    for disks in [&a.disks, &b.disks] {
        let disk = disks.all().pop().unwrap();
        let stored = disk.read(VOLUME, model::ExtentIndex(1), 0, 8192).await.unwrap().unwrap();
        assert_eq!(stored.as_slice(), first.as_slice(), "replica on {} unchanged by the stale write", disk.id());
    }
    b.engine.writer(VOLUME, epoch_b).write(EXTENT_SIZE_BYTES, pattern(3), 0..8192).await.expect("new owner writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritten_ranges_read_as_unallocated_and_zeroed_ranges_too() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17802))));
    let a = start_node(NODE_A, &state, dir.path()).await;
    let _b = start_node(NODE_B, &state, dir.path()).await;
    let writer = a.engine.writer(VOLUME, acquire(&state, NODE_A).await);

    assert!(a.engine.read(VOLUME, 0, 4096).await.unwrap().is_none());
    writer.write(0, pattern(5), 0..8192).await.unwrap();
    writer.zero(0, EXTENT_SIZE_BYTES).await.unwrap();

    assert!(a.engine.read(VOLUME, 0, 4096).await.unwrap().is_none(), "a discarded extent is freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_past_the_volume_end_is_refused() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster(17803))));
    let a = start_node(NODE_A, &state, dir.path()).await;
    let writer = a.engine.writer(VOLUME, acquire(&state, NODE_A).await);

    let past_end = writer.write(4 * EXTENT_SIZE_BYTES - 4096, pattern(1), 0..8192).await;

    assert!(matches!(past_end, Err(VolumeError::OutOfRange { .. })), "{past_end:?}");
}

/// Node A and node B, with a one-replica pool whose every PG lives on node B's disk.
fn cluster_with_remote_replica(port: u16) -> ClusterState {
    let mut state = cluster(port);
    let pgs = vec![vec![DiskId(20)]; 4];
    apply(&mut state, ClusterCommand::CreatePool { name: "remote".into(), replicas: 1, min_size: 1, pgs });
    apply(
        &mut state,
        ClusterCommand::CreateVolume { name: "far".into(), pool: PoolId(1), size_bytes: 4 * EXTENT_SIZE_BYTES },
    );
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_from_a_remote_replica_lands_in_the_callers_memory_and_unwritten_ranges_read_zero() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state: SharedState = Arc::new(watch::Sender::new(Arc::new(cluster_with_remote_replica(17804))));
    let a = start_node(NODE_A, &state, dir.path()).await;
    let _b = start_node(NODE_B, &state, dir.path()).await;
    let far = VolumeId(1);
    let mut next = (**state.borrow()).clone();
    let Ok(model::CommandOutcome::VolumeAcquired(epoch)) =
        next.apply(&ClusterCommand::AcquireVolume { volume: far, node: NODE_A, unless_vm_running: false })
    else {
        panic!("acquire")
    };
    state.send_replace(Arc::new(next));
    let data = pattern(9);
    a.engine.writer(far, epoch).write(4096, data.clone(), 0..8192).await.unwrap();
    // Filled with 0xff so that zeros written by the read show.
    let target: Arc<AlignedBuf> = Arc::new(AlignedBuf::copy_from(&[0xffu8; 8192 + 4096]));

    a.engine.read_into(far, 4096, target.clone(), 4096..4096 + 8192).await.expect("remote read");
    a.engine.read_into(far, 2 * EXTENT_SIZE_BYTES, target.clone(), 0..4096).await.expect("unwritten read");

    assert_eq!(&target.as_slice()[4096..], data.as_slice());
    assert!(target.as_slice()[..4096].iter().all(|&b| b == 0), "an unwritten range reads as zeros");
}
