//! The node-to-node data path protocol: fixed little-endian headers over TCP, a payload
//! after a write request or a read response. Many requests share a connection; replies
//! carry the request id and may come in any order.
//!
//! ```text
//! request  (64 B): magic "CVQ1" | op u8 | pad 3 | id u64 | volume u64 | extent u64
//!                  | offset u32 | len u32 | owner_epoch u64 | pg u32 | pad 4 | pg_epoch u64
//! response (32 B): magic "CVA1" | status u8 | pad 3 | id u64 | epoch u64 | payload_len u32 | pad 4
//! ```
//!
//! Every field of a request is checked by `Request::parse` before anything acts on it.

use model::{ExtentIndex, OwnerEpoch, PgEpoch, PgId, VolumeId, EXTENT_SIZE_BYTES, SECTOR_SIZE_BYTES};

pub const REQUEST_HEADER_BYTES: usize = 64;
pub const RESPONSE_HEADER_BYTES: usize = 32;
const REQUEST_MAGIC: [u8; 4] = *b"CVQ1";
const RESPONSE_MAGIC: [u8; 4] = *b"CVA1";
/// No request moves more than one extent: the receiver's buffer is bounded by this.
pub const PAYLOAD_MAX_BYTES: u32 = EXTENT_SIZE_BYTES as u32;
/// Longest error message a response carries.
pub const MESSAGE_MAX_BYTES: u32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write,
    Read,
    /// Discard or write-zeroes: the range reads as zeros afterwards.
    Zero,
}

/// A request whose header was checked: known op, sector-aligned range inside one extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub id: u64,
    pub volume: VolumeId,
    pub extent: ExtentIndex,
    pub offset_bytes: u32,
    pub len_bytes: u32,
    /// The sender's owner epoch; 0 for reads, which are not fenced.
    pub owner_epoch: OwnerEpoch,
    pub pg: PgId,
    pub pg_epoch: PgEpoch,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:02x?}: the peer does not speak converge's data protocol")]
    Magic([u8; 4]),
    #[error("unknown op {0}")]
    UnknownOp(u8),
    #[error("range {offset}+{len} is not sector-aligned, empty, or crosses the extent's end")]
    BadRange { offset: u32, len: u32 },
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    #[error("payload of {0} bytes is larger than allowed")]
    PayloadTooLarge(u32),
}

impl Request {
    /// Bytes of payload that follow this request's header.
    pub fn payload_bytes(&self) -> usize {
        match self.op {
            Op::Write => self.len_bytes as usize,
            Op::Read | Op::Zero => 0,
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut out = [0u8; REQUEST_HEADER_BYTES];
        out[0..4].copy_from_slice(&REQUEST_MAGIC);
        out[4] = match self.op {
            Op::Write => 1,
            Op::Read => 2,
            Op::Zero => 3,
        };
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.volume.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.extent.0.to_le_bytes());
        out[32..36].copy_from_slice(&self.offset_bytes.to_le_bytes());
        out[36..40].copy_from_slice(&self.len_bytes.to_le_bytes());
        out[40..48].copy_from_slice(&self.owner_epoch.0.to_le_bytes());
        out[48..52].copy_from_slice(&self.pg.0.to_le_bytes());
        out[56..64].copy_from_slice(&self.pg_epoch.0.to_le_bytes());
        out
    }

    pub fn parse(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<Self, WireError> {
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != REQUEST_MAGIC {
            return Err(WireError::Magic(magic));
        }
        let op = match bytes[4] {
            1 => Op::Write,
            2 => Op::Read,
            3 => Op::Zero,
            other => return Err(WireError::UnknownOp(other)),
        };
        let offset = u32_at(bytes, 32);
        let len = u32_at(bytes, 36);
        let sector = SECTOR_SIZE_BYTES as u32;
        let inside = u64::from(offset) + u64::from(len) <= EXTENT_SIZE_BYTES;
        if len == 0 || !offset.is_multiple_of(sector) || !len.is_multiple_of(sector) || !inside {
            return Err(WireError::BadRange { offset, len });
        }
        Ok(Request {
            op,
            id: u64_at(bytes, 8),
            volume: VolumeId(u64_at(bytes, 16)),
            extent: ExtentIndex(u64_at(bytes, 24)),
            offset_bytes: offset,
            len_bytes: len,
            owner_epoch: OwnerEpoch(u64_at(bytes, 40)),
            pg: PgId(u32_at(bytes, 48)),
            pg_epoch: PgEpoch(u64_at(bytes, 56)),
        })
    }
}

/// How a replica answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// A read of an extent never written: zeros, no payload.
    Unallocated,
    /// The sender's owner epoch is older than the volume's (`epoch` holds the current one).
    StaleOwnerEpoch,
    /// The sender's PG epoch differs from the replica's (`epoch` holds the replica's).
    StalePgEpoch,
    /// This node holds no replica of that PG, or does not know the volume.
    NotHere,
    /// The replica could not learn the sender's newer owner epoch in time.
    EpochUnknown,
    Invalid,
    Full,
    DeviceError,
}

impl Status {
    fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Unallocated => 1,
            Status::StaleOwnerEpoch => 2,
            Status::StalePgEpoch => 3,
            Status::NotHere => 4,
            Status::EpochUnknown => 5,
            Status::Invalid => 6,
            Status::Full => 7,
            Status::DeviceError => 8,
        }
    }

    fn from_code(code: u8) -> Result<Self, WireError> {
        Ok(match code {
            0 => Status::Ok,
            1 => Status::Unallocated,
            2 => Status::StaleOwnerEpoch,
            3 => Status::StalePgEpoch,
            4 => Status::NotHere,
            5 => Status::EpochUnknown,
            6 => Status::Invalid,
            7 => Status::Full,
            8 => Status::DeviceError,
            other => return Err(WireError::UnknownStatus(other)),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    pub status: Status,
    pub id: u64,
    pub epoch: u64,
    /// Data for a successful read; a UTF-8 message for an error.
    pub payload_len: u32,
}

impl ResponseHeader {
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_BYTES] {
        let mut out = [0u8; RESPONSE_HEADER_BYTES];
        out[0..4].copy_from_slice(&RESPONSE_MAGIC);
        out[4] = self.status.code();
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        out[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    pub fn parse(bytes: &[u8; RESPONSE_HEADER_BYTES]) -> Result<Self, WireError> {
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != RESPONSE_MAGIC {
            return Err(WireError::Magic(magic));
        }
        let status = Status::from_code(bytes[4])?;
        let payload_len = u32_at(bytes, 24);
        let limit = if status == Status::Ok { PAYLOAD_MAX_BYTES } else { MESSAGE_MAX_BYTES };
        if payload_len > limit {
            return Err(WireError::PayloadTooLarge(payload_len));
        }
        Ok(ResponseHeader { status, id: u64_at(bytes, 8), epoch: u64_at(bytes, 16), payload_len })
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write_request() -> Request {
        Request {
            op: Op::Write,
            id: 7,
            volume: VolumeId(3),
            extent: ExtentIndex(9),
            offset_bytes: 4096,
            len_bytes: 8192,
            owner_epoch: OwnerEpoch(2),
            pg: PgId(17),
            pg_epoch: PgEpoch(1),
        }
    }

    #[test]
    fn request_round_trips() {
        assert_eq!(Request::parse(&write_request().encode()), Ok(write_request()));
    }

    #[test]
    fn request_crossing_the_extent_end_is_refused() {
        let mut bytes = write_request().encode();
        bytes[32..36].copy_from_slice(&((EXTENT_SIZE_BYTES as u32) - 4096).to_le_bytes());
        assert_eq!(
            Request::parse(&bytes),
            Err(WireError::BadRange { offset: (EXTENT_SIZE_BYTES as u32) - 4096, len: 8192 })
        );
    }

    #[test]
    fn unaligned_and_empty_requests_are_refused() {
        let mut unaligned = write_request().encode();
        unaligned[36..40].copy_from_slice(&100u32.to_le_bytes());
        let mut empty = write_request().encode();
        empty[36..40].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(Request::parse(&unaligned), Err(WireError::BadRange { .. })));
        assert!(matches!(Request::parse(&empty), Err(WireError::BadRange { .. })));
    }

    #[test]
    fn response_with_oversized_message_is_refused() {
        let header =
            ResponseHeader { status: Status::DeviceError, id: 1, epoch: 0, payload_len: MESSAGE_MAX_BYTES + 1 };
        assert_eq!(ResponseHeader::parse(&header.encode()), Err(WireError::PayloadTooLarge(MESSAGE_MAX_BYTES + 1)));
    }

    proptest! {
        #[test]
        fn any_header_bytes_parse_or_fail_cleanly(bytes in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform32(any::<u8>())) {
            let mut header = [0u8; REQUEST_HEADER_BYTES];
            header[..32].copy_from_slice(&bytes);
            header[32..].copy_from_slice(&tail);
            header[0..4].copy_from_slice(&REQUEST_MAGIC);
            if let Ok(request) = Request::parse(&header) {
                prop_assert!(u64::from(request.offset_bytes) + u64::from(request.len_bytes) <= EXTENT_SIZE_BYTES);
                prop_assert!(request.len_bytes > 0);
            }
        }
    }
}
