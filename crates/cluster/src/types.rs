//! openraft's type configuration and the messages nodes send each other.

use model::{ClusterCommand, ClusterId, CommandError, CommandOutcome, Node, NodeReport};
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// What openraft keeps about a member: where to send it Raft traffic (its node port).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    pub addr: String,
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
    /// A command a follower forwards to the leader.
    Propose(Proposal),
    /// A new node asks for its certificate: the cluster CA signs `public_key` (an
    /// uncompressed P-256 point) for it. Any member answers.
    Certify {
        token: String,
        node: Node,
        public_key: Vec<u8>,
    },
    /// A new node, with its certificate, asks to become a member.
    Join {
        token: String,
        node: Node,
    },
    Ping,
    /// A follower asks the leader for a read index: the leader's commit index, confirmed by
    /// a quorum to be still the leader's. Applied up to it, the follower has seen every
    /// write committed before it asked.
    ReadIndex,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerReply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// The outcome and the log index it was committed at.
    Propose(Result<(CommandOutcome, u64), RemoteRefusal>),
    Join(Result<ClusterId, RemoteRefusal>),
    Certify(Result<Certified, RemoteRefusal>),
    Ping(NodeReport),
    /// The answer to a `SnapshotTransfer`.
    Snapshot(Result<SnapshotResponse<u64>, RemoteRefusal>),
    ReadIndex(Result<u64, RemoteRefusal>),
}

/// What a joining node gets for its public key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Certified {
    /// The CA's certificate and the node's, PEM.
    pub ca_pem: String,
    pub cert_pem: String,
    /// The members' certificate fingerprints: until the joining node has the state, its
    /// node port takes these and no other (the leader that adds it is one of them).
    pub members: Vec<String>,
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

/// A whole snapshot of the cluster state on its way to a node that fell behind the log: the
/// leader's vote and the snapshot's metadata as a small JSON header, then the state's bytes
/// as they are, never re-encoded (openraft's full-snapshot API; no chunks).
///
/// Wire form: the header's length as 4 bytes big-endian, the header, the data.
#[derive(Debug)]
pub struct SnapshotTransfer {
    pub vote: Vote<u64>,
    pub meta: SnapshotMeta<u64, RaftNode>,
    pub data: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    vote: Vote<u64>,
    meta: SnapshotMeta<u64, RaftNode>,
}

/// Largest snapshot header: a vote and a membership, far below this.
const SNAPSHOT_HEADER_MAX: usize = 1 << 20;

impl SnapshotTransfer {
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&SnapshotHeader { vote: self.vote, meta: self.meta.clone() })
            .expect("a vote and snapshot metadata serialise");
        let mut wire = Vec::with_capacity(4 + header.len() + self.data.len());
        wire.extend_from_slice(&(header.len() as u32).to_be_bytes());
        wire.extend_from_slice(&header);
        wire.extend_from_slice(&self.data);
        wire
    }

    /// Takes the transfer apart in place: the data keeps the wire's allocation.
    pub fn decode(mut wire: Vec<u8>) -> Result<Self, String> {
        let len: [u8; 4] = wire.get(..4).and_then(|b| b.try_into().ok()).ok_or("a snapshot shorter than its header")?;
        let len = u32::from_be_bytes(len) as usize;
        if len > SNAPSHOT_HEADER_MAX || wire.len() < 4 + len {
            return Err(format!("a snapshot header of {len} bytes in a transfer of {} bytes", wire.len()));
        }
        let header: SnapshotHeader =
            serde_json::from_slice(&wire[4..4 + len]).map_err(|e| format!("a damaged snapshot header: {e}"))?;
        wire.drain(..4 + len);
        Ok(SnapshotTransfer { vote: header.vote, meta: header.meta, data: wire })
    }
}
