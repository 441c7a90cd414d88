//! One node's disks: converge's on-disk format on a raw device (a plain file stands in
//! for one in tests), extent allocation on first write, and O_DIRECT|O_DSYNC IO through
//! io_uring. A write that completes is durable.
//!
//! Never does networking or cluster decisions: it stores extents it is told to store.

mod buf;
pub mod claim;
mod disk;
mod error;
pub mod format;
mod ring;

pub use buf::{AlignedBuf, IoMemory, BUF_ALIGN_BYTES};
pub use disk::{DiskIdentity, LocalDisk};
pub use error::{StoreError, StoreErrorKind};
pub use ring::RING_DEPTH;

mod disk_set;
pub use disk_set::DiskSet;
