//! The vhost-user-blk backend: a guest's virtio-blk queues, in its shared memory, served by
//! the volume engine. Every descriptor, length, offset and sector from the guest or QEMU is
//! checked before use: a bad one fails its request with an IO error status and the device
//! goes on serving.
//!
//! Never makes storage decisions (the engine does), never talks to Raft or QEMU's monitor.

mod config;
mod device;
mod guest;
mod guest_io;
pub mod request;
mod server;

pub use device::{BlkDevice, DiskTarget, GuestMemory, WriteOrder, QUEUES_MAX, QUEUE_SIZE};
pub use server::{DiskServer, VhostError};
