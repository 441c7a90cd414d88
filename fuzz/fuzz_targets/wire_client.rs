//! The block client's reply loop, as a replica server drives it: whatever a peer answers to
//! a read (a good reply, garbage, a header whose length is wrong, a reply cut short, extra
//! replies), the call ends within its deadline, never panics, and never writes outside the
//! part of the caller's memory the read was for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::{ClusterId, DiskId, ExtentIndex, OwnerEpoch, PgEpoch, PgId, VolumeId};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use store::{AlignedBuf, IoMemory};
use volume::wire::{Op, Request, REQUEST_HEADER_BYTES};
use volume::PeerPool;

/// The read lands at `LANDING..LANDING + READ_BYTES` of a buffer twice as large.
const READ_BYTES: usize = 4096;
const LANDING: usize = 2048;
const CANARY: u8 = 0xa5;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    pool: PeerPool,
    addr: String,
    /// What the fake replica answers to the next request.
    reply: Arc<Mutex<Vec<u8>>>,
}

/// A fake replica on loopback: reads one request, answers with the current reply (the
/// request's id written into it, so a well-formed reply can match), and closes.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let reply: Arc<Mutex<Vec<u8>>> = Arc::default();
        let answer = reply.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut header = [0u8; REQUEST_HEADER_BYTES];
                if stream.read_exact(&mut header).is_err() {
                    continue;
                }
                let mut bytes = answer.lock().unwrap().clone();
                if bytes.len() >= 16 {
                    bytes[8..16].copy_from_slice(&header[8..16]);
                }
                let _ = stream.write_all(&bytes);
            }
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Fixture { runtime, pool: PeerPool::new(None, None), addr, reply }
    })
}

fuzz_target!(|input: &[u8]| {
    let fixture = fixture();
    *fixture.reply.lock().unwrap() = input.to_vec();
    let mut buf = AlignedBuf::zeroed(2 * READ_BYTES);
    buf.as_mut_slice().fill(CANARY);
    let buf: Arc<dyn IoMemory> = Arc::new(buf);
    let request = Request {
        op: Op::Read,
        resync: false,
        id: 0,
        volume: VolumeId(0),
        extent: ExtentIndex(0),
        offset_bytes: 0,
        len_bytes: READ_BYTES as u32,
        owner_epoch: OwnerEpoch(1),
        pg: PgId(0),
        pg_epoch: PgEpoch(1),
        disk: DiskId(10),
        cluster: ClusterId(1),
        seq: 0,
    };
    let started = Instant::now();
    let target = (buf.clone(), LANDING..LANDING + READ_BYTES);
    let call = fixture.pool.call(&fixture.addr, request, None, Some(target), Duration::from_millis(500));
    let _ = fixture.runtime.block_on(call);
    assert!(started.elapsed() < Duration::from_secs(5), "the call outlived its deadline");
    let bytes = buf.bytes(0..2 * READ_BYTES);
    assert!(bytes[..LANDING].iter().all(|b| *b == CANARY), "written before the read's range");
    assert!(bytes[LANDING + READ_BYTES..].iter().all(|b| *b == CANARY), "written after the read's range");
});
