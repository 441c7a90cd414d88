//! virtio-blk requests (virtio 1.2, section 5.2.6), checked once at the boundary.
//!
//! A request is a descriptor chain: a 16-byte device-readable header (type, reserved,
//! sector), data buffers, and a 1-byte device-writable status at the end. The chain comes
//! from the guest and is trusted in nothing: `BlkRequest::parse` checks every direction,
//! length, count and sector against the spec and the volume's capacity, with checked
//! arithmetic. Code past it never sees a raw descriptor.

use model::SECTOR_SIZE_BYTES;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const HEADER_BYTES: u32 = 16;
/// The device id string is at most this long (5.2.6: `VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: u32 = 20;
/// A discard or write-zeroes segment: sector u64, num_sectors u32, flags u32.
pub const SEGMENT_BYTES: u32 = 16;
/// Largest data transfer of one request: the most a virtio chain may carry that OVMF's
/// driver sends (it puts a whole read of the firmware's, a kernel say, in one descriptor
/// and honours no advertised limit). Executed in pieces of `PIECE_BYTES`.
pub const REQUEST_DATA_MAX_BYTES: u64 = 1 << 30;
/// The most of one request the device moves at once: bounds what a request holds (a copy,
/// reads in flight) whatever its size.
pub const PIECE_BYTES: u64 = 4 << 20;
/// Data descriptors one request may use (advertised as `seg_max`).
pub const SEG_MAX: u32 = 128;
/// Segments of one discard or write-zeroes request (advertised as `max_discard_seg`).
pub const DISCARD_SEG_MAX: u32 = 16;
/// Sectors of one discard or write-zeroes segment (advertised as `max_discard_sectors`).
pub const DISCARD_SECTORS_MAX: u32 = (1 << 30) / SECTOR_SIZE_BYTES as u32;
/// WRITE_ZEROES segment flag: the device may unmap (we always free or zero).
const FLAG_UNMAP: u32 = 1;

const _: () = assert!(REQUEST_DATA_MAX_BYTES.is_multiple_of(SECTOR_SIZE_BYTES));
const _: () = assert!(PIECE_BYTES.is_multiple_of(SECTOR_SIZE_BYTES));

/// `bufs` cut into runs of at most `max` bytes each, in order: a buffer that straddles a
/// boundary is split there. With `max` a whole number of sectors, every run but the last
/// is exactly `max` bytes.
pub fn pieces(bufs: &[GuestBuf], max: u64) -> Vec<Vec<GuestBuf>> {
    let mut pieces = vec![Vec::new()];
    let mut room = max;
    for buf in bufs {
        let mut rest = *buf;
        while rest.len > 0 {
            if room == 0 {
                pieces.push(Vec::new());
                room = max;
            }
            let take = u64::from(rest.len).min(room) as u32;
            pieces.last_mut().expect("one at least").push(GuestBuf { addr: rest.addr, len: take });
            rest = GuestBuf { addr: rest.addr + u64::from(take), len: rest.len - take };
            room -= u64::from(take);
        }
    }
    pieces
}

/// One descriptor as the guest gave it: an address in guest memory, a length, and whether
/// the device may write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A guest buffer the request's data moves through; its range is checked against guest
/// memory when it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuf {
    pub addr: u64,
    pub len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub sectors: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlkOp {
    Read {
        sector: u64,
        bufs: Vec<GuestBuf>,
    },
    Write {
        sector: u64,
        bufs: Vec<GuestBuf>,
    },
    Flush,
    GetId {
        buf: GuestBuf,
    },
    /// Discard and write-zeroes both make the ranges read as zeros.
    Zero {
        segments: Vec<Segment>,
    },
}

/// A checked request. `status` is where its one-byte result goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    pub op: BlkOp,
    pub status: GuestBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No usable status descriptor: the request cannot even be answered.
    #[error("the chain has no writable one-byte status descriptor at its end")]
    NoStatus,
    #[error("the header descriptor is missing, writable or not 16 bytes")]
    BadHeader,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("a data descriptor has the wrong direction for the request")]
    WrongDirection,
    #[error("the data length {0} is zero, not whole sectors, or too large")]
    BadLength(u64),
    #[error("more than {SEG_MAX} data descriptors")]
    TooManySegments,
    #[error("sectors {sector}+{sectors} run past the end of the disk ({capacity} sectors)")]
    OutOfRange { sector: u64, sectors: u64, capacity: u64 },
    #[error("a discard or write-zeroes segment is malformed")]
    BadSegment,
}

impl RequestError {
    /// The status byte the guest gets; `None` when there is nowhere to put it.
    pub fn status(&self) -> Option<u8> {
        match self {
            RequestError::NoStatus => None,
            RequestError::Unsupported(_) => Some(VIRTIO_BLK_S_UNSUPP),
            _ => Some(VIRTIO_BLK_S_IOERR),
        }
    }
}

/// Where the status byte of a chain goes, if the chain has a usable one.
pub fn status_of(chain: &[Descriptor]) -> Option<GuestBuf> {
    match chain.last() {
        Some(d) if d.writable && d.len == 1 && chain.len() >= 2 => Some(GuestBuf { addr: d.addr, len: 1 }),
        _ => None,
    }
}

impl BlkRequest {
    /// Checks a chain whose first descriptor's 16 bytes were read into `header`. Discard and
    /// write-zeroes requests need their segments read from guest memory: use `parse_with`.
    pub fn parse(chain: &[Descriptor], header: &[u8; 16], capacity_sectors: u64) -> Result<Self, RequestError> {
        Self::parse_with(chain, header, capacity_sectors, &mut |_| None)
    }

    /// As `parse`, with `read` giving the bytes of a readable guest buffer (for discard and
    /// write-zeroes segments); `None` when the buffer is not in guest memory.
    pub fn parse_with(
        chain: &[Descriptor],
        header: &[u8; 16],
        capacity_sectors: u64,
        read: &mut dyn FnMut(GuestBuf) -> Option<Vec<u8>>,
    ) -> Result<Self, RequestError> {
        let status = status_of(chain).ok_or(RequestError::NoStatus)?;
        let head = chain[0];
        // Header, data and status each in descriptors of their own, as every driver we know
        // lays them out; anything else is refused rather than guessed at.
        if head.writable || head.len != HEADER_BYTES {
            return Err(RequestError::BadHeader);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let data = &chain[1..chain.len() - 1];
        if data.len() > SEG_MAX as usize {
            return Err(RequestError::TooManySegments);
        }
        let bufs = |writable: bool| -> Result<Vec<GuestBuf>, RequestError> {
            if data.iter().any(|d| d.writable != writable) {
                return Err(RequestError::WrongDirection);
            }
            // A buffer that wraps around the address space is in no guest's memory.
            if data.iter().any(|d| d.addr.checked_add(u64::from(d.len)).is_none()) {
                return Err(RequestError::BadLength(data.iter().map(|d| u64::from(d.len)).sum()));
            }
            Ok(data.iter().map(|d| GuestBuf { addr: d.addr, len: d.len }).collect())
        };
        let op = match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let bufs = bufs(kind == VIRTIO_BLK_T_IN)?;
                let len: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
                if len == 0 || !len.is_multiple_of(SECTOR_SIZE_BYTES) || len > REQUEST_DATA_MAX_BYTES {
                    return Err(RequestError::BadLength(len));
                }
                check_range(sector, len / SECTOR_SIZE_BYTES, capacity_sectors)?;
                if kind == VIRTIO_BLK_T_IN {
                    BlkOp::Read { sector, bufs }
                } else {
                    BlkOp::Write { sector, bufs }
                }
            }
            VIRTIO_BLK_T_FLUSH => BlkOp::Flush,
            VIRTIO_BLK_T_GET_ID => match bufs(true)?.as_slice() {
                [buf] if buf.len >= 1 => BlkOp::GetId { buf: GuestBuf { addr: buf.addr, len: buf.len.min(ID_BYTES) } },
                _ => return Err(RequestError::BadLength(data.iter().map(|d| u64::from(d.len)).sum())),
            },
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let bufs = bufs(false)?;
                // Bound what is read from the guest before reading it: a guest-chosen length
                // must not make the daemon allocate or copy more than the segments allowed.
                let total: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
                if total > u64::from(DISCARD_SEG_MAX * SEGMENT_BYTES) {
                    return Err(RequestError::BadSegment);
                }
                let mut segments = Vec::new();
                for buf in bufs {
                    if buf.len % SEGMENT_BYTES != 0 {
                        return Err(RequestError::BadSegment);
                    }
                    let bytes = read(buf).ok_or(RequestError::BadSegment)?;
                    for raw in bytes.chunks_exact(SEGMENT_BYTES as usize) {
                        segments.push(segment(raw, kind, capacity_sectors)?);
                        if segments.len() > DISCARD_SEG_MAX as usize {
                            return Err(RequestError::BadSegment);
                        }
                    }
                }
                if segments.is_empty() {
                    return Err(RequestError::BadSegment);
                }
                BlkOp::Zero { segments }
            }
            other => return Err(RequestError::Unsupported(other)),
        };
        Ok(BlkRequest { op, status })
    }
}

fn segment(raw: &[u8], kind: u32, capacity_sectors: u64) -> Result<Segment, RequestError> {
    let sector = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
    let sectors = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
    // DISCARD must have no flags; WRITE_ZEROES may set only UNMAP (5.2.6.2).
    let allowed = if kind == VIRTIO_BLK_T_WRITE_ZEROES { FLAG_UNMAP } else { 0 };
    if flags & !allowed != 0 || sectors == 0 || sectors > DISCARD_SECTORS_MAX {
        return Err(RequestError::BadSegment);
    }
    check_range(sector, u64::from(sectors), capacity_sectors)?;
    Ok(Segment { sector, sectors })
}

fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange { sector, sectors, capacity }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CAPACITY: u64 = 2048; // 1 MiB

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn d(addr: u64, len: u32, writable: bool) -> Descriptor {
        Descriptor { addr, len, writable }
    }

    fn chain(data: &[Descriptor]) -> Vec<Descriptor> {
        let mut c = vec![d(0x1000, 16, false)];
        c.extend_from_slice(data);
        c.push(d(0x9000, 1, true));
        c
    }

    #[test]
    fn a_read_of_two_buffers_parses() {
        let parsed = BlkRequest::parse(
            &chain(&[d(0x2000, 4096, true), d(0x4000, 512, true)]),
            &header(VIRTIO_BLK_T_IN, 8),
            CAPACITY,
        );
        let bufs = vec![GuestBuf { addr: 0x2000, len: 4096 }, GuestBuf { addr: 0x4000, len: 512 }];
        assert_eq!(
            parsed,
            Ok(BlkRequest { op: BlkOp::Read { sector: 8, bufs }, status: GuestBuf { addr: 0x9000, len: 1 } })
        );
    }

    #[test]
    fn a_write_into_a_device_writable_buffer_is_refused() {
        let parsed = BlkRequest::parse(&chain(&[d(0x2000, 512, true)]), &header(VIRTIO_BLK_T_OUT, 0), CAPACITY);
        assert_eq!(parsed, Err(RequestError::WrongDirection));
    }

    #[test]
    fn a_read_past_the_end_is_refused() {
        let parsed =
            BlkRequest::parse(&chain(&[d(0x2000, 1024, true)]), &header(VIRTIO_BLK_T_IN, CAPACITY - 1), CAPACITY);
        assert_eq!(parsed, Err(RequestError::OutOfRange { sector: CAPACITY - 1, sectors: 2, capacity: CAPACITY }));
    }

    #[test]
    fn a_sector_near_u64_max_does_not_overflow() {
        let parsed = BlkRequest::parse(&chain(&[d(0x2000, 512, true)]), &header(VIRTIO_BLK_T_IN, u64::MAX), CAPACITY);
        assert!(matches!(parsed, Err(RequestError::OutOfRange { .. })), "{parsed:?}");
    }

    #[test]
    fn zero_length_and_partial_sector_data_are_refused() {
        let empty = BlkRequest::parse(&chain(&[d(0x2000, 0, true)]), &header(VIRTIO_BLK_T_IN, 0), CAPACITY);
        let partial = BlkRequest::parse(&chain(&[d(0x2000, 100, false)]), &header(VIRTIO_BLK_T_OUT, 0), CAPACITY);
        assert_eq!(empty, Err(RequestError::BadLength(0)));
        assert_eq!(partial, Err(RequestError::BadLength(100)));
    }

    #[test]
    fn a_chain_without_a_writable_status_cannot_be_answered() {
        let mut c = chain(&[d(0x2000, 512, true)]);
        c.last_mut().unwrap().writable = false;
        assert_eq!(BlkRequest::parse(&c, &header(VIRTIO_BLK_T_IN, 0), CAPACITY), Err(RequestError::NoStatus));
        assert_eq!(RequestError::NoStatus.status(), None);
    }

    #[test]
    fn unknown_types_get_unsupp() {
        let parsed = BlkRequest::parse(&chain(&[]), &header(99, 0), CAPACITY);
        assert_eq!(parsed, Err(RequestError::Unsupported(99)));
        assert_eq!(parsed.unwrap_err().status(), Some(VIRTIO_BLK_S_UNSUPP));
    }

    #[test]
    fn write_zeroes_segments_are_read_and_checked() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&16u64.to_le_bytes());
        raw.extend_from_slice(&8u32.to_le_bytes());
        raw.extend_from_slice(&FLAG_UNMAP.to_le_bytes());
        let c = chain(&[d(0x2000, 16, false)]);
        let parsed =
            BlkRequest::parse_with(&c, &header(VIRTIO_BLK_T_WRITE_ZEROES, 0), CAPACITY, &mut |_| Some(raw.clone()));
        assert_eq!(parsed.map(|r| r.op), Ok(BlkOp::Zero { segments: vec![Segment { sector: 16, sectors: 8 }] }));
    }

    #[test]
    fn discard_with_flags_is_refused() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&0u64.to_le_bytes());
        raw.extend_from_slice(&8u32.to_le_bytes());
        raw.extend_from_slice(&FLAG_UNMAP.to_le_bytes());
        let c = chain(&[d(0x2000, 16, false)]);
        let parsed = BlkRequest::parse_with(&c, &header(VIRTIO_BLK_T_DISCARD, 0), CAPACITY, &mut |_| Some(raw.clone()));
        assert_eq!(parsed, Err(RequestError::BadSegment));
    }

    #[test]
    fn an_oversized_discard_is_refused_before_anything_is_read() {
        let c = chain(&[d(0x2000, 0xFFFF_FFF0, false)]);
        let mut reads = 0;
        let parsed = BlkRequest::parse_with(&c, &header(VIRTIO_BLK_T_DISCARD, 0), CAPACITY, &mut |_| {
            reads += 1;
            None
        });
        assert_eq!(parsed, Err(RequestError::BadSegment));
        assert_eq!(reads, 0);
    }

    proptest! {
        #[test]
        fn any_chain_parses_within_bounds_or_fails(
            kind in 0u32..16,
            sector in any::<u64>(),
            data in proptest::collection::vec((any::<u64>(), 0u32..(1 << 21), any::<bool>()), 0..6),
            status_writable in any::<bool>(),
        ) {
            let mut c = vec![d(0, 16, false)];
            c.extend(data.iter().map(|&(addr, len, writable)| d(addr, len, writable)));
            c.push(d(0x9000, 1, status_writable));
            if let Ok(request) = BlkRequest::parse(&c, &header(kind, sector), CAPACITY) {
                match request.op {
                    BlkOp::Read { sector, bufs } | BlkOp::Write { sector, bufs } => {
                        let len: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
                        prop_assert!(sector + len / SECTOR_SIZE_BYTES <= CAPACITY);
                        prop_assert!(len > 0 && len.is_multiple_of(SECTOR_SIZE_BYTES));
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn a_large_request_is_cut_into_pieces_that_keep_its_order_and_bytes() {
        let buf = |addr: u64, len: u32| GuestBuf { addr, len };
        // One descriptor of 10 MiB (as OVMF sends a kernel's read): 4 + 4 + 2 MiB.
        let one = pieces(&[buf(0x1000_0000, 10 << 20)], 4 << 20);
        assert_eq!(
            one,
            vec![vec![buf(0x1000_0000, 4 << 20)], vec![buf(0x1040_0000, 4 << 20)], vec![buf(0x1080_0000, 2 << 20)],]
        );
        // Several buffers, one straddling a boundary.
        let many = pieces(&[buf(0, 3 << 20), buf(0x100_0000, 2 << 20), buf(0x200_0000, 512)], 4 << 20);
        assert_eq!(
            many,
            vec![vec![buf(0, 3 << 20), buf(0x100_0000, 1 << 20)], vec![buf(0x110_0000, 1 << 20), buf(0x200_0000, 512)]]
        );
        let total = |p: &[Vec<GuestBuf>]| p.iter().flatten().map(|b| u64::from(b.len)).sum::<u64>();
        assert_eq!(total(&many), (5 << 20) + 512);
        assert_eq!(pieces(&[buf(7, 512)], 4 << 20), vec![vec![buf(7, 512)]], "a small request is one piece");
        // A whole gibibyte in 4 KiB descriptors: each piece holds exactly 4 MiB.
        let small: Vec<GuestBuf> = (0..1024u64).map(|i| buf(i << 12, 4096)).collect();
        assert!(pieces(&small, 1 << 20).iter().all(|p| p.len() == 256));
    }
}
