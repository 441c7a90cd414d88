//! Moving request data between guest buffers and the engine's buffers, with every guest
//! range checked by vm-memory: a buffer outside guest memory fails the request.

use crate::request::GuestBuf;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Copies `data` into the guest buffers `bufs`, starting `at` bytes into their
/// concatenation.
pub fn copy_to_guest(mem: &GuestMemoryMmap, bufs: &[GuestBuf], at: u64, data: &[u8]) -> Option<()> {
    let mut skip = at;
    let mut rest = data;
    for buf in bufs {
        if rest.is_empty() {
            break;
        }
        let len = u64::from(buf.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(rest.len());
        mem.write_slice(&rest[..n], GuestAddress(buf.addr.checked_add(skip)?)).ok()?;
        rest = &rest[n..];
        skip = 0;
    }
    rest.is_empty().then_some(())
}

/// Fills `out` from the concatenation of the guest buffers `bufs`.
pub fn copy_from_guest(mem: &GuestMemoryMmap, bufs: &[GuestBuf], out: &mut [u8]) -> Option<()> {
    let mut at = 0usize;
    for buf in bufs {
        let n = buf.len as usize;
        mem.read_slice(out.get_mut(at..at + n)?, GuestAddress(buf.addr)).ok()?;
        at += n;
    }
    (at == out.len()).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("anonymous guest memory")
    }

    #[test]
    fn data_scatters_across_buffers_from_an_offset_and_gathers_back() {
        let mem = memory();
        let bufs = [GuestBuf { addr: 0x1000, len: 512 }, GuestBuf { addr: 0x4000, len: 1024 }];
        let data: Vec<u8> = (0..1536u32).map(|i| i as u8).collect();

        copy_to_guest(&mem, &bufs, 0, &data[..1024]).unwrap();
        copy_to_guest(&mem, &bufs, 1024, &data[1024..]).unwrap();
        let mut back = vec![0u8; 1536];
        copy_from_guest(&mem, &bufs, &mut back).unwrap();

        assert_eq!(back, data);
    }

    #[test]
    fn a_buffer_outside_guest_memory_fails_the_copy() {
        let mem = memory();
        let outside = [GuestBuf { addr: 0xff00, len: 512 }];
        assert_eq!(copy_to_guest(&mem, &outside, 0, &[1u8; 512]), None);
        assert_eq!(copy_from_guest(&mem, &outside, &mut [0u8; 512]), None);
    }
}
