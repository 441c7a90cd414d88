//! The replica server's connection loop, as a peer drives it: whatever bytes arrive (a
//! valid request, garbage, a header without its payload, many requests pipelined), the
//! loop never panics, ends once the peer stops sending, and every reply it writes is a
//! well-formed header followed by exactly the payload that header announces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::{ClusterCommand, ClusterId, ClusterState, Disk, DiskId, Node, NodeId, PoolId, EXTENT_SIZE_BYTES};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use store::{DiskIdentity, DiskSet, LocalDisk};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volume::wire::{ResponseHeader, PAYLOAD_MAX_BYTES, RESPONSE_HEADER_BYTES};
use volume::{ActiveLog, DataLimits, DataServer, DirtyLog, ReplicaService, StateTopology, Topology};

const NODE: NodeId = NodeId(1);
/// The cluster and disk a request must name to reach the disk (seeds in the corpus do).
const CLUSTER: ClusterId = ClusterId(0xf022);
const DISK: DiskId = DiskId(10);

struct Fixture {
    runtime: tokio::runtime::Runtime,
    server: DataServer,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = std::env::temp_dir().join(format!("converge-fuzz-wire-server-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut state = ClusterState::default();
        let mut apply = |c: ClusterCommand| state.apply(&c).expect("setup");
        apply(ClusterCommand::InitCluster { id: CLUSTER });
        let node = Node { id: NODE, api_addr: String::new(), data_addr: String::new(), cert_sha256: String::new() };
        apply(ClusterCommand::AddNode(node));
        apply(ClusterCommand::AddDisk(Disk { id: DISK, node: NODE, path: String::new(), size_bytes: 64 << 20, extent_slots: 15 }));
        apply(ClusterCommand::CreatePool { name: "r1".into(), replicas: 1, min_size: 1, pgs: vec![vec![DISK]; 4] });
        apply(ClusterCommand::CreateVolume { name: "v".into(), pool: PoolId(0), size_bytes: 4 * EXTENT_SIZE_BYTES });
        apply(ClusterCommand::AcquireVolume { volume: model::VolumeId(0), node: NODE, unless_vm_running: false });
        let server = runtime.block_on(async {
            let identity = DiskIdentity { disk: DISK, node: NODE, cluster: CLUSTER };
            let disk = LocalDisk::create(&dir.join("disk.img"), Some(64 << 20), identity).await.unwrap();
            let disks = Arc::new(DiskSet::default());
            disks.insert(disk);
            let shared = Arc::new(tokio::sync::watch::Sender::new(Arc::new(state)));
            let topology: Arc<dyn Topology> = Arc::new(StateTopology::new(NODE, shared));
            let dirty = DirtyLog::open(&dir.join("dirty.redb")).unwrap();
            let active = ActiveLog::open(&dir.join("active.redb")).unwrap();
            let service = Arc::new(ReplicaService::new(disks, topology, dirty, active));
            let limits =
                DataLimits { io_timeout: Duration::from_secs(1), idle_timeout: Duration::from_secs(1), ..Default::default() };
            DataServer::new(service, limits)
        });
        Fixture { runtime, server }
    })
}

fuzz_target!(|input: &[u8]| {
    let fixture = fixture();
    fixture.runtime.block_on(async {
        let (mut peer, node) = tokio::io::duplex(1 << 20);
        let slot = fixture.server.admit("127.0.0.1".parse().unwrap()).expect("one connection at a time");
        let server = fixture.server.clone();
        let serving = tokio::spawn(async move { server.serve(node, slot).await });
        let _ = peer.write_all(input).await;
        let _ = peer.shutdown().await;
        let mut replies = Vec::new();
        // Bounded: the loop ends once the peer has stopped sending (its requests may wait
        // up to the epoch wait for a state that never comes).
        let read = tokio::time::timeout(Duration::from_secs(20), peer.read_to_end(&mut replies)).await;
        assert!(read.is_ok(), "the server did not end the connection");
        let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(ended.is_ok(), "the connection loop did not end");
        let mut rest = &replies[..];
        while !rest.is_empty() {
            let header = ResponseHeader::parse(rest[..RESPONSE_HEADER_BYTES].try_into().expect("a whole header"))
                .expect("a well-formed reply header");
            assert!(header.payload_len <= PAYLOAD_MAX_BYTES, "a reply within the payload bound");
            let end = RESPONSE_HEADER_BYTES + header.payload_len as usize;
            assert!(rest.len() >= end, "a reply with its whole payload");
            rest = &rest[end..];
        }
    });
});
