//! converge's data model: ids, epochs and units, the replicated `ClusterState`, and the
//! `ClusterCommand`s that change it through the pure `ClusterState::apply`.
//!
//! Nothing here does IO, reads a clock or draws a random number: every Raft node applies
//! the same commands in the same order and must reach the same state.

mod command;
mod ha;
mod ids;
mod names;
mod network;
mod report;
mod state;
mod tokens;
mod units;
mod vm;

pub use command::{ClusterCommand, CommandError, CommandOutcome};
pub use ha::{
    bounded, Capacity, Event, EventKind, HaPolicy, NodeDown, EVENTS_KEPT, EVENT_MESSAGE_MAX_BYTES,
    GROUP_NAME_MAX_BYTES, VM_PRIORITY_MAX,
};
pub use ids::{ClusterId, DiskId, ExtentIndex, NodeId, OwnerEpoch, PgEpoch, PgId, PoolId, VolumeId};
pub use names::{check_name, NAME_MAX_BYTES};
pub use network::{
    Mac, Network, NetworkId, NetworkKind, Nic, GAP_REASON_MAX_BYTES, INTERFACE_NAME_MAX_BYTES, NETWORKS_MAX,
    VM_NICS_MAX, VNI_MAX,
};
pub use report::{DiskHealth, DiskReport, NodeReport, ResyncReport};
pub use state::{ClusterCa, ClusterInfo, ClusterState, Disk, Node, OutReason, Pg, Pool, Volume};
pub use tokens::{Role, Token, TokenKind, TOKENS_MAX, TOKEN_NAME_MAX_BYTES};
pub use units::{
    extent_of, format_size, parse_size, pg_of, SizeError, EXTENT_SIZE_BYTES, PG_COUNT_DEFAULT, REPLICAS_MAX,
    SECTOR_SIZE_BYTES, VOLUMES_MAX, VOLUME_SIZE_MAX_BYTES,
};
pub use vm::{
    Accel, Boot, BootFile, Vm, VmDesired, VmId, VmObserved, VmRunState, VmSpec, UEFI_VARS_BYTES, VMS_MAX, VM_CPUS_MAX,
    VM_DISKS_MAX, VM_MEMORY_MAX_BYTES, VM_MEMORY_MIN_BYTES,
};

/// An error and its causes, `outer: inner: innermost`: what a user needs when the reason
/// sits a few levels down (a TLS refusal, an OS error under a spawn).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
