//! Limits on what a network peer can make a node hold (docs/threat-model.md): a flood of
//! pipelined writes on the node port that never reads its replies costs the node a bounded
//! amount of memory, and a guest on that node keeps writing through it. A stranger's flood
//! ends at the TLS handshake; this one comes from a member's certificate (a node gone bad),
//! the worst a peer can do.

mod common;

use common::{cluster, create_guest_vm, guest, json, pattern_of, wait_until, NodeProcess, GUEST_TIMEOUT};
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use volume::wire::{Op, Request};

const FLOOD_CONNECTIONS: usize = 50;
const FLOOD_WRITES_PER_CONNECTION: usize = 64;
const FLOOD_WRITE_BYTES: u32 = 4 << 20;
/// What a flooded node may grow to (the bound).
const RSS_MAX_BYTES: u64 = 512 << 20;

fn rss_bytes(node: &NodeProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    kib * 1024
}

/// Opens `FLOOD_CONNECTIONS` to `addr` with the member certificate of `tls`, each sending
/// `FLOOD_WRITES_PER_CONNECTION` 4 MiB writes that parse and name this node's disk, back to
/// back, and never reading a reply. Runs until `stop`; counts the bytes the node took in.
fn flood(
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    request: Request,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    let payload = Arc::new(vec![0x5a_u8; FLOOD_WRITE_BYTES as usize]);
    (0..FLOOD_CONNECTIONS)
        .map(|c| {
            let (addr, stop, sent, payload) = (addr.clone(), stop.clone(), sent.clone(), payload.clone());
            let tls = tls.clone();
            std::thread::spawn(move || {
                let Ok(tcp) = TcpStream::connect(&addr) else { return };
                tcp.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
                let name = rustls_pki_types::ServerName::try_from(pki::NODE_NAME).unwrap();
                let session = rustls::ClientConnection::new(tls, name).unwrap();
                let mut stream = rustls::StreamOwned::new(session, tcp);
                let mut pending: &[u8] = &[];
                let mut header;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && i < FLOOD_WRITES_PER_CONNECTION {
                    if pending.is_empty() {
                        header = Request { id: (c * 1000 + i) as u64, ..request }.encode();
                        match stream.write_all(&header) {
                            Ok(()) => {}
                            // The node stopped reading: try again in a while.
                            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                            // Refused (too many connections) or closed.
                            Err(_) => return,
                        }
                        pending = &payload[..];
                    }
                    match stream.write(pending) {
                        Ok(0) => return,
                        Ok(n) => {
                            sent.fetch_add(n as u64, Ordering::Relaxed);
                            pending = &pending[n..];
                            if pending.is_empty() {
                                i += 1;
                            }
                        }
                        // The node stopped reading: it holds what it took in, no more.
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return,
                    }
                }
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect()
}

#[test]
fn a_data_port_flood_that_never_reads_replies_costs_bounded_memory_and_a_guest_keeps_writing() {
    let guest = guest();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes = cluster(dir.path(), [41, 42, 43], 18940);
    let cmdline = "console=ttyS0 panic=-1 quiet gmode=writer";
    create_guest_vm(&nodes[0], &guest, "writer", &["64M", "160M,replicas=2"], cmdline);
    nodes[0].cli(&["volume", "create", "target", "--size", "1G", "--replicas", "2"]);

    // Writes the node would take for real: its cluster and its disk, a volume of its own.
    let status: api::v1::ClusterStatus = serde_json::from_str(&nodes[0].cli(&["--json", "cluster", "status"])).unwrap();
    let target: api::v1::VolumeInfo =
        serde_json::from_str(&nodes[0].cli(&["--json", "volume", "show", "target"])).unwrap();
    let request = |node: usize| Request {
        op: Op::Write,
        resync: false,
        id: 0,
        volume: target.id,
        extent: model::ExtentIndex(0),
        offset_bytes: 0,
        len_bytes: FLOOD_WRITE_BYTES,
        owner_epoch: model::OwnerEpoch(1),
        pg: model::pg_of(target.id, model::ExtentIndex(0), model::PG_COUNT_DEFAULT),
        pg_epoch: model::PgEpoch(1),
        disk: status.nodes.iter().find(|n| n.api_addr == nodes[node].addr).unwrap().disks[0].id,
        cluster: status.cluster_id.unwrap(),
        seq: 0,
    };
    let data_addr = |node: usize| {
        let (ip, port) = nodes[node].addr.rsplit_once(':').unwrap();
        format!("{ip}:{}", port.parse::<u16>().unwrap() + 1)
    };
    let rss_before = [rss_bytes(&nodes[0]), rss_bytes(&nodes[1])];
    // Node 2's certificate: the flood comes from a member.
    let member = pki::NodeTls::open(&nodes[2].data_dir.join("tls")).unwrap().material().unwrap();

    // The guest runs on node 0 and its second disk has a replica on another node: both
    // node 0 and node 1 are flooded.
    nodes[0].cli(&["vm", "start", "writer", "--node", &nodes[0].addr]);
    wait_until("the guest writes", GUEST_TIMEOUT, || {
        nodes[0].cli(&["vm", "console", "writer", "--no-follow"]).contains("WRITER started")
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let tls = member.blocks_client.clone();
    let mut flooders = flood(data_addr(0), tls.clone(), request(0), stop.clone(), sent.clone());
    flooders.extend(flood(data_addr(1), tls, request(1), stop.clone(), sent.clone()));
    let mut rss_max = [0u64; 2];
    wait_until("the guest wrote everything under the flood", GUEST_TIMEOUT, || {
        for (i, node) in nodes[..2].iter().enumerate() {
            rss_max[i] = rss_max[i].max(rss_bytes(node));
        }
        json(&nodes[0].cli(&["--json", "vm", "show", "writer"]))["state"]["state"] == "stopped"
    });
    let flooded_bytes = sent.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().unwrap();
    }

    let text = nodes[0].cli(&["vm", "console", "writer", "--no-follow"]);
    let done = text.lines().find(|l| l.contains("GUEST: WRITER done")).unwrap_or_else(|| panic!("{text}"));
    println!(
        "flood: {} MiB taken in by the two nodes; RSS before {:?} MiB, at most {:?} MiB; guest: {done}",
        flooded_bytes >> 20,
        rss_before.map(|b| b >> 20),
        rss_max.map(|b| b >> 20)
    );
    assert!(flooded_bytes > 64 << 20, "the flood got some of its writes in ({flooded_bytes} bytes)");
    for (i, rss) in rss_max.iter().enumerate() {
        assert!(*rss > 0 && *rss < RSS_MAX_BYTES, "node {i} grew to {} MiB under the flood", rss >> 20);
    }
    assert!(done.contains("writes=2000 failed=0 "), "no write failed in the guest: {done}");
    let exported = dir.path().join("writer-disk1.raw");
    nodes[2].cli(&["volume", "export", "writer-disk1", exported.to_str().unwrap()]);
    let bytes = std::fs::read(&exported).unwrap();
    let pattern = pattern_of(2000);
    for block in 0..2000 {
        let at = block * (64 << 10);
        assert!(bytes[at..at + 4096] == pattern[block * 4096..(block + 1) * 4096], "block {block} is intact");
    }
    // The nodes still serve: the flood is over and its connections gone.
    wait_until("the cluster is healthy after the flood", Duration::from_secs(60), || {
        json(&nodes[2].cli(&["--json", "cluster", "status"]))["healthy"] == true
    });
}
