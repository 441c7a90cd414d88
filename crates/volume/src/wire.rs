//! The node-to-node data path protocol: fixed little-endian headers over TCP, a payload
//! after a write request or a read response. Many requests share a connection; replies
//! carry the request id and may come in any order.
//!
//! ```text
//! request  (96 B): magic "CVQ2" | op u8 | flags u8 | pad 2 | id u64 | volume u64 | extent u64
//!                  | offset u32 | len u32 | owner_epoch u64 | pg_epoch u64 | pg u32 | pad 4
//!                  | target disk u64 | cluster u128 | seq u64
//! response (40 B): magic "CVA2" | status u8 | pad 3 | id u64 | owner_epoch u64 | pg_epoch u64
//!                  | payload_len u32 | pad 4
//! ```
//!
//! Every request names the cluster and the disk it is meant for; a replica refuses one meant
//! for anything else. Every field is checked by `Request::parse` before anything acts on it,
//! and a response's payload length is checked against what its request asked for.

use model::{
    ClusterId, DiskId, ExtentIndex, OwnerEpoch, PgEpoch, PgId, VolumeId, EXTENT_SIZE_BYTES, SECTOR_SIZE_BYTES,
};

pub const REQUEST_HEADER_BYTES: usize = 96;
pub const RESPONSE_HEADER_BYTES: usize = 40;
const REQUEST_MAGIC: [u8; 4] = *b"CVQ2";
const RESPONSE_MAGIC: [u8; 4] = *b"CVA2";
/// No request moves more than one extent: the receiver's buffer is bounded by this.
pub const PAYLOAD_MAX_BYTES: u32 = EXTENT_SIZE_BYTES as u32;
/// Longest error message a response carries.
pub const MESSAGE_MAX_BYTES: u32 = 4096;
/// Request flag: on a write or zero, a copy from the PG's resync source to a replica that is
/// out of the acting set (only such a replica takes it, and only at the PG epoch it was
/// made for); on `ListActive` and `ForgetActive`, only the request's PG.
const FLAG_RESYNC: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write,
    Read,
    /// Discard or write-zeroes: the range reads as zeros afterwards.
    Zero,
    /// A new owner (its owner epoch in the request) fences older owners on the disk, then
    /// gets the ranges of the volume that older owners wrote recently, as `ActiveRange`s: a
    /// write the old owner had in flight may be on some replicas and not on others. With
    /// `ALL_VOLUMES`, every range on record on the disk (a resync source asks a returning
    /// replica). No range in the header (offset and length 0).
    ListActive,
    /// Forgets the ranges the volume's owners older than the request's owner epoch wrote on
    /// the disk: the new owner has made every replica of them identical. With the resync
    /// flag, only those in the request's PG (a resync source copied them).
    ForgetActive,
    /// The owner (its epoch in the request) says every write of its own with a sequence
    /// number below the request's `seq` is settled (acknowledged by every acting replica):
    /// their ranges need no reconciling any more.
    Settle,
}

/// `volume` of a `ListActive` or `ForgetActive` that is about every volume.
pub const ALL_VOLUMES: VolumeId = VolumeId(u64::MAX);

/// One entry of a `ListActive` reply: a range an owner wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveRange {
    pub volume: VolumeId,
    pub extent: ExtentIndex,
    pub offset_bytes: u32,
    pub len_bytes: u32,
    /// The newest owner that wrote it.
    pub owner_epoch: OwnerEpoch,
}

/// Bytes of one `ActiveRange` on the wire: volume u64, extent u64, offset u32, len u32,
/// owner epoch u64.
pub const ACTIVE_RANGE_BYTES: usize = 32;

impl ActiveRange {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.volume.0.to_le_bytes());
        out.extend_from_slice(&self.extent.0.to_le_bytes());
        out.extend_from_slice(&self.offset_bytes.to_le_bytes());
        out.extend_from_slice(&self.len_bytes.to_le_bytes());
        out.extend_from_slice(&self.owner_epoch.0.to_le_bytes());
    }

    /// Parses a `ListActive` reply; every range must be sector-aligned within one extent.
    pub fn parse_all(bytes: &[u8]) -> Result<Vec<ActiveRange>, WireError> {
        if !bytes.len().is_multiple_of(ACTIVE_RANGE_BYTES) {
            return Err(WireError::ReplyLength { expected: ACTIVE_RANGE_BYTES as u32, got: bytes.len() as u32 });
        }
        bytes
            .chunks_exact(ACTIVE_RANGE_BYTES)
            .map(|b| {
                let range = ActiveRange {
                    volume: VolumeId(u64_at(b, 0)),
                    extent: ExtentIndex(u64_at(b, 8)),
                    offset_bytes: u32_at(b, 16),
                    len_bytes: u32_at(b, 20),
                    owner_epoch: OwnerEpoch(u64_at(b, 24)),
                };
                check_range(range.offset_bytes, range.len_bytes)?;
                Ok(range)
            })
            .collect()
    }
}

fn check_range(offset: u32, len: u32) -> Result<(), WireError> {
    let sector = SECTOR_SIZE_BYTES as u32;
    let inside = u64::from(offset) + u64::from(len) <= EXTENT_SIZE_BYTES;
    if len == 0 || !offset.is_multiple_of(sector) || !len.is_multiple_of(sector) || !inside {
        return Err(WireError::BadRange { offset, len });
    }
    Ok(())
}

/// A request whose header was checked: known op and flags, sector-aligned range inside one
/// extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// A resync copy (see `FLAG_RESYNC`): a write or zero, never a read.
    pub resync: bool,
    pub id: u64,
    pub volume: VolumeId,
    pub extent: ExtentIndex,
    pub offset_bytes: u32,
    pub len_bytes: u32,
    /// The sender's owner epoch; 0 for reads and resync copies, which are not owner-fenced.
    pub owner_epoch: OwnerEpoch,
    pub pg: PgId,
    /// The PG epoch whose acting set the sender sent this to.
    pub pg_epoch: PgEpoch,
    /// The disk the request is for.
    pub disk: DiskId,
    pub cluster: ClusterId,
    /// A write's sequence number within its owner's writes (the same for every piece and
    /// every resend of one write); the settle point of a `Settle`; 0 otherwise.
    pub seq: u64,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:02x?}: the peer does not speak this version of converge's data protocol")]
    Magic([u8; 4]),
    #[error("unknown op {0}")]
    UnknownOp(u8),
    #[error("unknown flags {0:#04x} for op {1}")]
    BadFlags(u8, u8),
    #[error("range {offset}+{len} is not sector-aligned, empty, or crosses the extent's end")]
    BadRange { offset: u32, len: u32 },
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    #[error("payload of {0} bytes is larger than allowed")]
    PayloadTooLarge(u32),
    #[error("a reply of {got} bytes to a request that expects {expected}")]
    ReplyLength { expected: u32, got: u32 },
    #[error("a reply to request {0}, which is not waiting for one")]
    UnknownReply(u64),
}

impl Request {
    /// Bytes of payload that follow this request's header.
    pub fn payload_bytes(&self) -> usize {
        match self.op {
            Op::Write => self.len_bytes as usize,
            Op::Read | Op::Zero | Op::ListActive | Op::ForgetActive | Op::Settle => 0,
        }
    }

    /// Bytes of payload a successful reply carries: the data of a read, nothing for a data
    /// change; `None` for a `ListActive`, whose reply is any number of `ActiveRange`s.
    pub fn reply_bytes(&self) -> Option<u32> {
        match self.op {
            Op::Read => Some(self.len_bytes),
            Op::Write | Op::Zero | Op::ForgetActive | Op::Settle => Some(0),
            Op::ListActive => None,
        }
    }

    /// Whether the request changes data, and so is fenced by epochs and ordered by gates.
    pub fn changes_data(&self) -> bool {
        matches!(self.op, Op::Write | Op::Zero)
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut out = [0u8; REQUEST_HEADER_BYTES];
        out[0..4].copy_from_slice(&REQUEST_MAGIC);
        out[4] = match self.op {
            Op::Write => 1,
            Op::Read => 2,
            Op::Zero => 3,
            Op::ListActive => 4,
            Op::ForgetActive => 5,
            Op::Settle => 6,
        };
        out[5] = if self.resync { FLAG_RESYNC } else { 0 };
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.volume.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.extent.0.to_le_bytes());
        out[32..36].copy_from_slice(&self.offset_bytes.to_le_bytes());
        out[36..40].copy_from_slice(&self.len_bytes.to_le_bytes());
        out[40..48].copy_from_slice(&self.owner_epoch.0.to_le_bytes());
        out[48..56].copy_from_slice(&self.pg_epoch.0.to_le_bytes());
        out[56..60].copy_from_slice(&self.pg.0.to_le_bytes());
        out[64..72].copy_from_slice(&self.disk.0.to_le_bytes());
        out[72..88].copy_from_slice(&self.cluster.0.to_le_bytes());
        out[88..96].copy_from_slice(&self.seq.to_le_bytes());
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
            4 => Op::ListActive,
            5 => Op::ForgetActive,
            6 => Op::Settle,
            other => return Err(WireError::UnknownOp(other)),
        };
        let resync = match bytes[5] {
            0 => false,
            FLAG_RESYNC if matches!(op, Op::Write | Op::Zero | Op::ListActive | Op::ForgetActive) => true,
            flags => return Err(WireError::BadFlags(flags, bytes[4])),
        };
        let offset = u32_at(bytes, 32);
        let len = u32_at(bytes, 36);
        match op {
            Op::ListActive | Op::ForgetActive | Op::Settle if offset == 0 && len == 0 => {}
            Op::ListActive | Op::ForgetActive | Op::Settle => return Err(WireError::BadRange { offset, len }),
            Op::Write | Op::Read | Op::Zero => check_range(offset, len)?,
        }
        Ok(Request {
            op,
            resync,
            id: u64_at(bytes, 8),
            volume: VolumeId(u64_at(bytes, 16)),
            extent: ExtentIndex(u64_at(bytes, 24)),
            offset_bytes: offset,
            len_bytes: len,
            owner_epoch: OwnerEpoch(u64_at(bytes, 40)),
            pg_epoch: PgEpoch(u64_at(bytes, 48)),
            pg: PgId(u32_at(bytes, 56)),
            disk: DiskId(u64_at(bytes, 64)),
            cluster: ClusterId(u128::from_le_bytes(bytes[72..88].try_into().expect("16 bytes"))),
            seq: u64_at(bytes, 88),
        })
    }
}

/// How a replica answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// A read of an extent never written: zeros, no payload.
    Unallocated,
    /// The sender's owner epoch is older than the volume's (the reply's owner epoch).
    StaleOwnerEpoch,
    /// The sender's PG epoch is older than the replica's (the reply's PG epoch).
    StalePgEpoch,
    /// This node holds no replica of that PG, or the volume was deleted.
    NotHere,
    /// The replica could not learn the sender's newer epoch in time: it is behind Raft.
    EpochUnknown,
    Invalid,
    Full,
    DeviceError,
    /// The request names another cluster or a disk this node does not have. The replica
    /// closes the connection after this answer.
    WrongTarget,
    /// The disk is out of the PG's acting set: it serves nothing but resync copies.
    Out,
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
            Status::WrongTarget => 9,
            Status::Out => 10,
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
            9 => Status::WrongTarget,
            10 => Status::Out,
            other => return Err(WireError::UnknownStatus(other)),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    pub status: Status,
    pub id: u64,
    /// The replica's owner epoch for the volume, as far as it knows.
    pub owner_epoch: OwnerEpoch,
    /// The replica's epoch for the PG.
    pub pg_epoch: PgEpoch,
    /// Data for a successful read; a UTF-8 message for an error.
    pub payload_len: u32,
}

impl ResponseHeader {
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_BYTES] {
        let mut out = [0u8; RESPONSE_HEADER_BYTES];
        out[0..4].copy_from_slice(&RESPONSE_MAGIC);
        out[4] = self.status.code();
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.owner_epoch.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.pg_epoch.0.to_le_bytes());
        out[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    pub fn parse(bytes: &[u8; RESPONSE_HEADER_BYTES]) -> Result<Self, WireError> {
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != RESPONSE_MAGIC {
            return Err(WireError::Magic(magic));
        }
        let status = Status::from_code(bytes[4])?;
        let payload_len = u32_at(bytes, 32);
        let limit = if status == Status::Ok { PAYLOAD_MAX_BYTES } else { MESSAGE_MAX_BYTES };
        if payload_len > limit {
            return Err(WireError::PayloadTooLarge(payload_len));
        }
        Ok(ResponseHeader {
            status,
            id: u64_at(bytes, 8),
            owner_epoch: OwnerEpoch(u64_at(bytes, 16)),
            pg_epoch: PgEpoch(u64_at(bytes, 24)),
            payload_len,
        })
    }

    /// Checks the payload length against what `request` asked for: an Ok reply carries
    /// exactly the bytes of a read and nothing for a write; a refusal carries only a message.
    pub fn check_against(&self, request: &Request) -> Result<(), WireError> {
        if self.status != Status::Ok {
            return Ok(());
        }
        match request.reply_bytes() {
            Some(expected) if self.payload_len != expected => {
                Err(WireError::ReplyLength { expected, got: self.payload_len })
            }
            None if !(self.payload_len as usize).is_multiple_of(ACTIVE_RANGE_BYTES) => {
                Err(WireError::ReplyLength { expected: ACTIVE_RANGE_BYTES as u32, got: self.payload_len })
            }
            _ => Ok(()),
        }
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
            resync: false,
            disk: DiskId(20),
            cluster: ClusterId(u128::MAX - 5),
            seq: 41,
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

    fn response(status: Status, payload_len: u32) -> ResponseHeader {
        ResponseHeader { status, id: 1, owner_epoch: OwnerEpoch(3), pg_epoch: PgEpoch(4), payload_len }
    }

    #[test]
    fn response_with_oversized_message_is_refused() {
        let header = response(Status::DeviceError, MESSAGE_MAX_BYTES + 1);
        assert_eq!(ResponseHeader::parse(&header.encode()), Err(WireError::PayloadTooLarge(MESSAGE_MAX_BYTES + 1)));
    }

    #[test]
    fn response_round_trips_with_both_epochs_typed() {
        let header = response(Status::StalePgEpoch, 12);
        assert_eq!(ResponseHeader::parse(&header.encode()), Ok(header));
    }

    #[test]
    fn an_ok_read_reply_must_carry_exactly_the_bytes_asked_for() {
        let read = Request { op: Op::Read, ..write_request() };

        assert_eq!(response(Status::Ok, 8192).check_against(&read), Ok(()));
        assert_eq!(
            response(Status::Ok, 4096).check_against(&read),
            Err(WireError::ReplyLength { expected: 8192, got: 4096 })
        );
        assert_eq!(
            response(Status::Ok, 8704).check_against(&read),
            Err(WireError::ReplyLength { expected: 8192, got: 8704 })
        );
        assert_eq!(
            response(Status::Ok, 512).check_against(&write_request()),
            Err(WireError::ReplyLength { expected: 0, got: 512 })
        );
    }

    #[test]
    fn a_resync_read_is_refused() {
        let mut bytes = Request { op: Op::Read, ..write_request() }.encode();
        bytes[5] = FLAG_RESYNC;
        assert_eq!(Request::parse(&bytes), Err(WireError::BadFlags(FLAG_RESYNC, 2)));
    }

    #[test]
    fn a_resync_write_round_trips() {
        let resync = Request { resync: true, owner_epoch: OwnerEpoch(0), ..write_request() };
        assert_eq!(Request::parse(&resync.encode()), Ok(resync));
    }

    proptest! {
        #[test]
        fn any_header_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), REQUEST_HEADER_BYTES)) {
            let mut header = [0u8; REQUEST_HEADER_BYTES];
            header.copy_from_slice(&bytes);
            header[0..4].copy_from_slice(&REQUEST_MAGIC);
            if let Ok(request) = Request::parse(&header) {
                prop_assert!(u64::from(request.offset_bytes) + u64::from(request.len_bytes) <= EXTENT_SIZE_BYTES);
                prop_assert!(request.len_bytes > 0);
            }
        }
    }
}
