//! openraft's network over the cluster transport. The transport itself (HTTP over mutual TLS) is
//! supplied by the composition root; this crate never opens a socket.

use crate::types::{PeerReply, PeerRpc, RaftNode, SnapshotTransfer, TypeConfig};
use futures_util::future::BoxFuture;
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{OptionalSend, Snapshot, Vote};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Carries requests between nodes. Members talk node port to node port, each presenting
/// its certificate; a node that is not a member yet knocks on a member's API port.
pub trait PeerTransport: Send + Sync + 'static {
    /// Sends one request to the node port at `addr` and waits for its reply.
    fn call(
        &self,
        addr: &str,
        rpc: PeerRpc,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerReply, TransportError>>;

    /// Sends a join request (`Certify` or `Join`) to a member's API port at `api_addr`,
    /// trusting it only if it presents a certificate of the CA whose fingerprint is
    /// `ca_sha256`.
    fn knock(
        &self,
        api_addr: &str,
        rpc: PeerRpc,
        ca_sha256: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerReply, TransportError>>;

    /// Sends a whole snapshot (`SnapshotTransfer::encode`) and waits until the node at
    /// `addr` installed it or refused it.
    fn send_snapshot(
        &self,
        addr: &str,
        transfer: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerReply, TransportError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("Node at {addr} is unreachable")]
    Unreachable {
        addr: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Request to node at {addr} failed: {reason}")]
    Failed { addr: String, reason: String },
}

#[derive(Clone)]
pub struct Network {
    pub transport: Arc<dyn PeerTransport>,
}

pub struct Connection {
    transport: Arc<dyn PeerTransport>,
    target: u64,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &RaftNode) -> Connection {
        Connection { transport: self.transport.clone(), target, addr: node.addr.clone() }
    }
}

impl Connection {
    async fn call<E: std::error::Error>(
        &self,
        rpc: PeerRpc,
        option: &RPCOption,
    ) -> Result<PeerReply, RPCError<u64, RaftNode, E>> {
        self.transport.call(&self.addr, rpc, option.hard_ttl()).await.map_err(Self::transport_error)
    }

    fn transport_error<E: std::error::Error>(e: TransportError) -> RPCError<u64, RaftNode, E> {
        match e {
            TransportError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            TransportError::Failed { .. } => RPCError::Network(NetworkError::new(&e)),
        }
    }

    fn unexpected<E: std::error::Error>(&self, reply: PeerReply) -> RPCError<u64, RaftNode, E> {
        let e = TransportError::Failed { addr: self.addr.clone(), reason: format!("unexpected reply {reply:?}") };
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, RaftNode, RaftError<u64>>> {
        match self.call(PeerRpc::Append(rpc), &option).await? {
            PeerReply::Append(result) => result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, RaftNode, RaftError<u64>>> {
        match self.call(PeerRpc::Vote(rpc), &option).await? {
            PeerReply::Vote(result) => result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(other)),
        }
    }

    /// The whole snapshot in one transfer: the cluster state is metadata, megabytes at most,
    /// and its bytes travel as they are.
    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let transfer = SnapshotTransfer { vote, meta: snapshot.meta.clone(), data: snapshot.snapshot.into_inner() };
        let bytes = transfer.data.len();
        let wire = transfer.encode();
        if wire.len() > crate::cluster::SNAPSHOT_BYTES_MAX {
            tracing::error!(bytes, "the cluster state is larger than a node accepts in a snapshot");
            let e = TransportError::Failed {
                addr: self.addr.clone(),
                reason: format!(
                    "a snapshot of {bytes} bytes is larger than the {} a node accepts",
                    crate::cluster::SNAPSHOT_BYTES_MAX
                ),
            };
            return Err(StreamingError::Network(NetworkError::new(&e)));
        }
        let sent = self.transport.send_snapshot(&self.addr, wire, option.hard_ttl());
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            reply = sent => reply,
        };
        tracing::debug!(target = self.target, bytes, "sent a snapshot");
        match reply {
            Ok(PeerReply::Snapshot(Ok(response))) => Ok(response),
            Ok(PeerReply::Snapshot(Err(refusal))) => {
                let e = TransportError::Failed { addr: self.addr.clone(), reason: refusal.to_string() };
                Err(StreamingError::Network(NetworkError::new(&e)))
            }
            Ok(other) => Err(StreamingError::Network(NetworkError::new(&TransportError::Failed {
                addr: self.addr.clone(),
                reason: format!("unexpected reply {other:?}"),
            }))),
            Err(e @ TransportError::Unreachable { .. }) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
            Err(e @ TransportError::Failed { .. }) => Err(StreamingError::Network(NetworkError::new(&e))),
        }
    }
}
