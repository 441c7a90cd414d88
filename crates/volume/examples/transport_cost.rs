//! What mutual TLS on the node port costs a 4 KiB write at queue depth 1 (docs/benchmarks.md).
//! `make bench` runs it (`cargo run --release -p volume --example transport_cost`); it
//! prints the mean write latency over mutual TLS against the same writes in the clear,
//! measured in the same run, rounds alternating so drift falls on both.
//!
//! Node A writes a 2-replica volume whose other replica is on node B, both on loopback with
//! file disks: each write is one durable local write and one round trip to B's replica
//! server with its durable write there. Over TLS B's server runs what the node port runs on
//! a connection (the handshake with a client certificate of the cluster CA, then the block
//! protocol on the TLS stream); in the clear the same server on plain TCP.

use model::{
    ClusterCommand, ClusterId, ClusterState, Disk, DiskId, Node, NodeId, OwnerEpoch, PoolId, VolumeId,
    EXTENT_SIZE_BYTES,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{AlignedBuf, DiskIdentity, DiskSet, IoMemory, LocalDisk};
use tokio::net::TcpListener;
use tokio::sync::watch;
use volume::{
    ActiveLog, DataLimits, DataServer, DirtyLog, Engine, EngineConfig, ReplicaService, StateTopology, Topology,
};

const CLUSTER: ClusterId = ClusterId(0x7e57);
const VOLUME: VolumeId = VolumeId(0);
const WRITES_PER_ROUND: u64 = 1000;
const ROUNDS: usize = 6;
const DISK_BYTES: u64 = 64 << 20;

/// Nodes A and B (replica servers at `addr_a`, `addr_b`), a 2-replica volume owned by A.
fn state(addr_a: &str, addr_b: &str) -> ClusterState {
    let mut state = ClusterState::default();
    let mut apply = |command: ClusterCommand| state.apply(&command).expect("setup command applies");
    apply(ClusterCommand::InitCluster { id: CLUSTER });
    for (node, addr) in [(1, addr_a), (2, addr_b)] {
        let node = NodeId(node);
        let data_addr = addr.to_string();
        apply(ClusterCommand::AddNode(Node {
            id: node,
            api_addr: String::new(),
            data_addr,
            cert_sha256: String::new(),
        }));
        let disk =
            Disk { id: DiskId(node.0 * 10), node, path: String::new(), size_bytes: DISK_BYTES, extent_slots: 15 };
        apply(ClusterCommand::AddDisk(disk));
    }
    let pgs = vec![vec![DiskId(10), DiskId(20)]; 4];
    apply(ClusterCommand::CreatePool { name: "replicated-2".into(), replicas: 2, min_size: 2, pgs });
    apply(ClusterCommand::CreateVolume { name: "v".into(), pool: PoolId(0), size_bytes: 4 * EXTENT_SIZE_BYTES });
    apply(ClusterCommand::AcquireVolume { volume: VOLUME, node: NodeId(1), unless_vm_running: false });
    state
}

async fn replica(
    node: NodeId,
    dir: &std::path::Path,
    state: &Arc<watch::Sender<Arc<ClusterState>>>,
) -> (Arc<ReplicaService>, Arc<dyn Topology>) {
    let identity = DiskIdentity { disk: DiskId(node.0 * 10), node, cluster: CLUSTER };
    let disk = LocalDisk::create(&dir.join(format!("{node}.img")), Some(DISK_BYTES), identity).await.expect("disk");
    let disks = Arc::new(DiskSet::default());
    disks.insert(disk);
    let topology: Arc<dyn Topology> = Arc::new(StateTopology::new(node, state.clone()));
    let dirty = DirtyLog::open(&dir.join(format!("{node}-dirty.redb"))).expect("dirty log");
    let active = ActiveLog::open(&dir.join(format!("{node}-active.redb"))).expect("activity log");
    (Arc::new(ReplicaService::new(disks, topology.clone(), dirty, active)), topology)
}

/// B's replica server: over mutual TLS with B's certificate, or in the clear.
async fn serve(listener: TcpListener, service: Arc<ReplicaService>, tls: Option<Arc<pki::Material>>) {
    let server = DataServer::new(service, DataLimits::default());
    loop {
        let (stream, peer) = listener.accept().await.expect("accept");
        stream.set_nodelay(true).unwrap();
        let slot = server.admit(peer.ip()).expect("a slot");
        let (server, tls) = (server.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => server.serve(stream, slot).await,
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.node_server.clone());
                    let stream = acceptor.accept(stream).await.expect("handshake");
                    assert!(stream.get_ref().1.peer_certificates().is_some(), "the client showed its certificate");
                    server.serve(stream, slot).await
                }
            }
        });
    }
}

fn node_tls(ca: &pki::NewCa, id: u64, dir: &std::path::Path) -> Arc<pki::NodeTls> {
    let tls = pki::NodeTls::open(&dir.join(format!("tls-{id}"))).unwrap();
    let cert = pki::sign_node(&ca.key_pem, id, &[], tls.public_key()).unwrap();
    tls.install(&ca.cert_pem, &cert).unwrap();
    Arc::new(tls)
}

/// Mean microseconds per 4 KiB write over `WRITES_PER_ROUND` writes through `engine`.
async fn round(engine: &Engine, fill: u8) -> f64 {
    let writer = engine.writer(VOLUME, OwnerEpoch(1));
    let mut buf = AlignedBuf::zeroed(4096);
    buf.as_mut_slice().fill(fill);
    let buf: Arc<dyn IoMemory> = Arc::new(buf);
    // Warm: the extent allocated, the connection made.
    writer.write(0, buf.clone(), 0..4096).await.expect("write");
    let started = Instant::now();
    for i in 0..WRITES_PER_ROUND {
        writer.write((i % 1024) * 4096, buf.clone(), 0..4096).await.expect("write");
    }
    started.elapsed().as_secs_f64() * 1e6 / WRITES_PER_ROUND as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // File disks on a real file system (O_DIRECT), under the build's target directory.
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target");
    let dir = tempfile::Builder::new().prefix("transport-cost-").tempdir_in(target).unwrap();
    let ca = pki::new_ca().unwrap();
    let (tls_a, tls_b) = (node_tls(&ca, 1, dir.path()), node_tls(&ca, 2, dir.path()));
    let plain_listener = TcpListener::bind("127.0.0.3:0").await.unwrap();
    let tls_listener = TcpListener::bind("127.0.0.3:0").await.unwrap();

    // One cluster per transport, B at its plain or its TLS address.
    let clear_engine = setup(&dir.path().join("clear"), plain_listener, None, None).await;
    let tls_engine = setup(&dir.path().join("tls"), tls_listener, Some(tls_a), tls_b.material()).await;
    let engines = [clear_engine, tls_engine];

    let (mut clear, mut tls) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        clear.push(round(&engines[0], r as u8).await);
        tls.push(round(&engines[1], r as u8).await);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (clear_us, tls_us) = (mean(&clear), mean(&tls));
    println!("4 KiB writes at queue depth 1, 2 replicas (one local, one over loopback), {ROUNDS} rounds of {WRITES_PER_ROUND}:");
    println!("  in the clear (reference):  {clear_us:8.1} us per write  (rounds: {clear:.0?})");
    println!("  mutual TLS 1.3 (AES-GCM):  {tls_us:8.1} us per write  (rounds: {tls:.0?})");
    println!("  ratio {:.3} (TLS / clear)", tls_us / clear_us);
}

/// A writer on node A whose volume's other replica is B, served on `listener` (over TLS
/// with `b_tls`, presenting `a_tls` from A, when given).
async fn setup(
    dir: &std::path::Path,
    listener: TcpListener,
    a_tls: Option<Arc<pki::NodeTls>>,
    b_tls: Option<Arc<pki::Material>>,
) -> Engine {
    std::fs::create_dir_all(dir).unwrap();
    let b_addr = listener.local_addr().unwrap().to_string();
    let shared = Arc::new(watch::Sender::new(Arc::new(state("127.0.0.2:1", &b_addr))));
    let (a, topology) = replica(NodeId(1), dir, &shared).await;
    let (b, _) = replica(NodeId(2), dir, &shared).await;
    tokio::spawn(serve(listener, b, b_tls));
    let config = EngineConfig { tls: a_tls, replica_timeout: Duration::from_secs(5), ..Default::default() };
    Engine::new(a, topology, config)
}
