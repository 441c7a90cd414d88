//! Torture on real processes: a writer at queue depth 16 writes blocks that encode their
//! number, a version and a checksum through the block API, while a fault schedule kills,
//! restarts, stops and resumes nodes, including the writer's own node (the writer then goes
//! on through another node, which takes the volume over). After every cycle, once the
//! cluster has resynced, every block is read back through every node: each must hold its
//! latest acknowledged version (or the version of a later write whose outcome was unknown),
//! intact. Reading through every node reads every replica, since a node reads its own
//! replica first.
//!
//! `make test` runs a short version; `make torture CYCLES=N` runs N cycles of each.

mod common;

use common::{cluster, json, NodeProcess};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK_BYTES: usize = 4096;
/// Blocks the writer writes, one every `STRIDE_BYTES`: spread over many extents and PGs.
const BLOCKS: u64 = 1024;
const STRIDE_BYTES: u64 = 128 << 10;
const VOLUME_BYTES: u64 = BLOCKS * STRIDE_BYTES;
const QUEUE_DEPTH: u64 = 16;
/// How long writes go on around each fault.
const WRITE_PHASE: Duration = Duration::from_secs(3);
/// A stopped node stays stopped longer than the replica timeout (3 s), so it is taken out.
const STOPPED_FOR: Duration = Duration::from_secs(5);
const RESYNC_TIMEOUT: Duration = Duration::from_secs(180);
const MAGIC: &[u8; 8] = b"CVTBLOCK";

fn cycles(default: usize) -> usize {
    std::env::var("CONVERGE_TORTURE_CYCLES").ok().and_then(|c| c.parse().ok()).unwrap_or(default)
}

/// FNV-1a: a checksum the test computes itself, independent of anything under test.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Block `block` at `version`: magic, block, version, filler that depends on both, and the
/// checksum of everything before it in the last 8 bytes.
fn encode(block: u64, version: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(BLOCK_BYTES);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&block.to_le_bytes());
    bytes.extend_from_slice(&version.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version ^ 1;
    while bytes.len() < BLOCK_BYTES - 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(BLOCK_BYTES - 8);
    let sum = fnv(&bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());
    bytes
}

/// The version a block read back holds: 0 for never written, or why it is corrupt.
fn decode(block: u64, bytes: &[u8]) -> Result<u64, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let (body, sum) = bytes.split_at(BLOCK_BYTES - 8);
    if body[..8] != MAGIC[..] || fnv(body) != u64::from_le_bytes(sum.try_into().unwrap()) {
        return Err("bad magic or checksum".into());
    }
    let found = u64::from_le_bytes(body[8..16].try_into().unwrap());
    if found != block {
        return Err(format!("holds block {found}"));
    }
    Ok(u64::from_le_bytes(body[16..24].try_into().unwrap()))
}

/// What the writer knows about each block: the latest acknowledged version, and the newest
/// version of the later writes whose outcome is unknown (they failed, so any of them may or
/// may not be there; versions are given out one by one, so they are the ones in between).
#[derive(Default)]
struct Ledger {
    acked: Vec<u64>,
    unknown: Vec<Option<u64>>,
}

impl Ledger {
    fn new() -> Self {
        Ledger { acked: vec![0; BLOCKS as usize], unknown: vec![None; BLOCKS as usize] }
    }

    fn acceptable(&self, block: u64, version: u64) -> bool {
        let acked = self.acked[block as usize];
        version == acked || self.unknown[block as usize].is_some_and(|newest| version > acked && version <= newest)
    }
}

#[derive(Default)]
struct Counts {
    acked: AtomicU64,
    failed: AtomicU64,
}

/// One of `QUEUE_DEPTH` writers: blocks `lane`, `lane + QUEUE_DEPTH`, ... one write at a
/// time each, through the node in `target`, until `stop`.
async fn write_lane(
    lane: u64,
    http: reqwest::Client,
    target: Arc<Mutex<String>>,
    ledger: Arc<Mutex<Ledger>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let mut x = lane * 7919 + 1;
    while !stop.load(Ordering::Acquire) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = (x % (BLOCKS / QUEUE_DEPTH)) * QUEUE_DEPTH + lane;
        let version = {
            let ledger = ledger.lock().unwrap();
            ledger.acked[block as usize].max(ledger.unknown[block as usize].unwrap_or(0)) + 1
        };
        let addr = target.lock().unwrap().clone();
        let url = format!("https://{addr}/v1/volumes/torture/blocks/{}", block * STRIDE_BYTES);
        let sent = http.put(&url).body(encode(block, version)).send().await;
        let ok = matches!(&sent, Ok(response) if response.status().is_success());
        {
            let mut ledger = ledger.lock().unwrap();
            if ok {
                ledger.acked[block as usize] = version;
                ledger.unknown[block as usize] = None;
                counts.acked.fetch_add(1, Ordering::Relaxed);
            } else {
                ledger.unknown[block as usize] = Some(version);
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !ok {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads every block through `node`; returns the anomalies found.
async fn check_through(http: &reqwest::Client, node: &str, ledger: &Ledger) -> Vec<String> {
    let mut anomalies = Vec::new();
    for block in 0..BLOCKS {
        let url = format!("https://{node}/v1/volumes/torture/blocks/{}?len={BLOCK_BYTES}", block * STRIDE_BYTES);
        let bytes = match http.get(&url).send().await {
            Ok(response) if response.status().is_success() => response.bytes().await.map(|b| b.to_vec()),
            Ok(response) => {
                anomalies.push(format!("block {block} through {node}: HTTP {}", response.status()));
                continue;
            }
            Err(e) => Err(e),
        };
        match bytes.map_err(|e| e.to_string()).and_then(|b| decode(block, &b)) {
            Ok(version) if ledger.acceptable(block, version) => {}
            Ok(version) => anomalies.push(format!(
                "block {block} through {node}: version {version}, acknowledged {} (unknown {:?})",
                ledger.acked[block as usize], ledger.unknown[block as usize]
            )),
            Err(e) => anomalies.push(format!("block {block} through {node}: corrupt: {e}")),
        }
    }
    anomalies
}

fn wait_whole(nodes: &[NodeProcess]) {
    let deadline = Instant::now() + RESYNC_TIMEOUT;
    loop {
        let whole = nodes.iter().filter(|n| n.is_running()).all(|n| {
            common::run(&n.addr, &["--json", "cluster", "status"])
                .map(|s| json(&s)["pgs_degraded"] == 0)
                .unwrap_or(false)
        });
        if whole {
            return;
        }
        assert!(Instant::now() < deadline, "the cluster did not become whole in {RESYNC_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One torture cluster at a time: two clusters of real processes on a small machine starve
/// each other, and replica timeouts then fire for CPU starvation rather than faults.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `cycles` fault cycles on a cluster of `ips.len()` nodes with a volume of `replicas`.
fn torture<const N: usize>(ips: [u8; N], port: u16, replicas: u8, cycles: usize) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut nodes = cluster(dir.path(), ips, port);
    let size = format!("{}", VOLUME_BYTES);
    nodes[0].cli(&["volume", "create", "torture", "--size", &size, "--replicas", &replicas.to_string()]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let http = nodes[0].http(Duration::from_secs(90));
    let ledger = Arc::new(Mutex::new(Ledger::new()));
    let counts = Arc::new(Counts::default());
    let target = Arc::new(Mutex::new(nodes[0].addr.clone()));
    let mut writer_node = 0;
    let mut faults = 0;
    let mut anomalies = Vec::new();
    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let lanes: Vec<_> = (0..QUEUE_DEPTH)
            .map(|lane| {
                let (http, target, ledger, counts, stop) =
                    (http.clone(), target.clone(), ledger.clone(), counts.clone(), stop.clone());
                runtime.spawn(write_lane(lane, http, target, ledger, counts, stop))
            })
            .collect();
        std::thread::sleep(WRITE_PHASE);
        let others: Vec<usize> = (0..N).filter(|&i| i != writer_node).collect();
        let victim = others[cycle % others.len()];
        match cycle % 3 {
            // The writer's own node dies: the writer goes on through another node, which takes
            // the volume over and reconciles what the dead owner had in flight.
            2 => {
                let dead = writer_node;
                writer_node = victim;
                *target.lock().unwrap() = nodes[writer_node].addr.clone();
                nodes[dead].sigkill();
                std::thread::sleep(WRITE_PHASE);
                nodes[dead].restart();
            }
            1 => {
                nodes[victim].signal("STOP");
                std::thread::sleep(STOPPED_FOR);
                nodes[victim].signal("CONT");
            }
            _ => {
                nodes[victim].sigkill();
                std::thread::sleep(WRITE_PHASE);
                nodes[victim].restart();
            }
        }
        faults += 1;
        std::thread::sleep(WRITE_PHASE);
        stop.store(true, Ordering::Release);
        for lane in lanes {
            runtime.block_on(lane).unwrap();
        }
        wait_whole(&nodes);
        let ledger = ledger.lock().unwrap();
        for node in &nodes {
            anomalies.extend(runtime.block_on(check_through(&http, &node.addr, &ledger)));
        }
        if !anomalies.is_empty() {
            // The nodes' logs say what happened: kept for reading.
            let kept = dir.keep();
            panic!(
                "cycle {cycle}: {} anomalies, first: {:?}; node logs kept in {}",
                anomalies.len(),
                &anomalies[..anomalies.len().min(5)],
                kept.display()
            );
        }
    }
    println!(
        "torture: nodes={N} replicas={replicas} cycles={cycles} faults={faults} writes_acknowledged={} writes_failed={} anomalies={}",
        counts.acked.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        anomalies.len()
    );
    assert!(counts.acked.load(Ordering::Relaxed) > 0);
    drop(nodes);
    runtime.shutdown_timeout(Duration::from_secs(5));
}

#[test]
fn three_nodes_two_replicas_survive_kills_stops_and_the_writers_death() {
    torture([51, 52, 53], 18800, 2, cycles(3));
}

#[test]
fn five_nodes_three_replicas_survive_kills_stops_and_the_writers_death() {
    torture([54, 55, 56, 57, 58], 18820, 3, cycles(3));
}

#[test]
fn blocks_decode_to_their_version_and_corruption_is_seen() {
    let block = encode(7, 3);
    let mut flipped = block.clone();
    flipped[100] ^= 1;

    assert_eq!(decode(7, &block), Ok(3));
    assert_eq!(decode(7, &vec![0u8; BLOCK_BYTES]), Ok(0));
    assert!(decode(7, &flipped).is_err());
    assert!(decode(8, &block).is_err(), "a block at the wrong place is corrupt");
}
