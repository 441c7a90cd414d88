//! openraft's type configuration and the messages nodes send each other.

use model::{ClusterCommand, ClusterId, CommandError, CommandOutcome, Node, NodeReport};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// What openraft keeps about a member: where to send it Raft traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    pub api_addr: String,
}

/// A command with an id drawn by its proposer, so a proposal retried after a lost reply is
/// applied once: the state machine answers a repeated id with the first outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Proposal {
    pub id: u128,
    pub command: ClusterCommand,
}

/// The result of applying one log entry (membership and blank entries give `Done`).
pub type ApplyResult = Result<CommandOutcome, CommandError>;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Proposal,
        R = ApplyResult,
        NodeId = u64,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A request from one node to another over the cluster transport.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A command a follower forwards to the leader.
    Propose(Proposal),
    /// A new node asks to become a member.
    Join {
        token: String,
        node: Node,
    },
    Ping,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerReply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// The outcome and the log index it was committed at.
    Propose(Result<(CommandOutcome, u64), RemoteRefusal>),
    Join(Result<ClusterId, RemoteRefusal>),
    Ping(NodeReport),
}

/// Why a peer refused a forwarded request, carried across the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RemoteRefusal {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{0}")]
    Other(String),
    /// The node asked is not the leader (any more): ask the leader.
    #[error("not the leader")]
    NotLeader,
}
