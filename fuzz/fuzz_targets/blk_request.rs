//! Everything a guest controls in a virtio-blk request: the descriptor chain (addresses,
//! lengths, directions), the header, and discard segments. The parser must never panic,
//! and whatever it accepts must lie inside the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::SECTOR_SIZE_BYTES;
use vhost_blk::request::{pieces, BlkOp, BlkRequest, Descriptor, GuestBuf, PIECE_BYTES, REQUEST_DATA_MAX_BYTES};

const CAPACITY_SECTORS: u64 = 1 << 21; // 1 GiB

fuzz_target!(|input: &[u8]| {
    if input.len() < 16 {
        return;
    }
    let header: [u8; 16] = input[..16].try_into().unwrap();
    // Each descriptor is 13 bytes: addr u64, len u32, flags u8.
    let chain: Vec<Descriptor> = input[16..]
        .chunks_exact(13)
        .take(300)
        .map(|d| Descriptor {
            addr: u64::from_le_bytes(d[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(d[8..12].try_into().unwrap()),
            writable: d[12] & 1 == 1,
        })
        .collect();
    // Discard segments are read from the same input, as guest memory would give them.
    let mut read = |buf: GuestBuf| (buf.len <= 4096).then(|| input.iter().cycle().take(buf.len as usize).copied().collect());
    if let Ok(request) = BlkRequest::parse_with(&chain, &header, CAPACITY_SECTORS, &mut read) {
        match request.op {
            BlkOp::Read { sector, bufs } | BlkOp::Write { sector, bufs } => {
                let len: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
                assert!(len > 0 && len % SECTOR_SIZE_BYTES == 0 && len <= REQUEST_DATA_MAX_BYTES);
                assert!(sector + len / SECTOR_SIZE_BYTES <= CAPACITY_SECTORS);
                // Executed in pieces: every byte once, in order, each piece whole sectors
                // of at most PIECE_BYTES (the last may be shorter).
                let cut = pieces(&bufs, PIECE_BYTES);
                let sizes: Vec<u64> = cut.iter().map(|p| p.iter().map(|b| u64::from(b.len)).sum()).collect();
                assert_eq!(sizes.iter().sum::<u64>(), len);
                assert!(sizes.iter().all(|s| *s > 0 && *s <= PIECE_BYTES && s % SECTOR_SIZE_BYTES == 0));
                assert!(sizes[..sizes.len() - 1].iter().all(|s| *s == PIECE_BYTES));
                let flat: Vec<(u64, u32)> = cut.iter().flatten().map(|b| (b.addr, b.len)).collect();
                // (An empty buffer moves nothing: no piece holds it.)
                let mut at = bufs.iter().filter(|b| b.len > 0).map(|b| (b.addr, b.len));
                let mut current = at.next();
                for (addr, piece_len) in flat {
                    let (start, left) = current.expect("a piece beyond the buffers");
                    assert_eq!(addr, start);
                    current = if piece_len == left { at.next() } else { Some((start + u64::from(piece_len), left - piece_len)) };
                }
                assert!(current.is_none() || current.is_some_and(|(_, l)| l == 0));
            }
            BlkOp::Zero { segments } => {
                for s in segments {
                    assert!(s.sector + u64::from(s.sectors) <= CAPACITY_SECTORS);
                }
            }
            BlkOp::Flush | BlkOp::GetId { .. } => {}
        }
    }
});
