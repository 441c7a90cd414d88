//! openraft's network over the cluster transport. The transport itself (HTTP today) is
//! supplied by the composition root; this crate never opens a socket.

use crate::types::{PeerReply, PeerRpc, RaftNode, TypeConfig};
use futures_util::future::BoxFuture;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use std::sync::Arc;
use std::time::Duration;

/// Sends one request to the node at `api_addr` and waits for its reply.
pub trait PeerTransport: Send + Sync + 'static {
    fn call(
        &self,
        api_addr: &str,
        rpc: PeerRpc,
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
        Connection { transport: self.transport.clone(), target, addr: node.api_addr.clone() }
    }
}

impl Connection {
    async fn call<E: std::error::Error>(
        &self,
        rpc: PeerRpc,
        option: &RPCOption,
    ) -> Result<PeerReply, RPCError<u64, RaftNode, E>> {
        self.transport.call(&self.addr, rpc, option.hard_ttl()).await.map_err(|e| match e {
            TransportError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            TransportError::Failed { .. } => RPCError::Network(NetworkError::new(&e)),
        })
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

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, RaftNode, RaftError<u64, InstallSnapshotError>>> {
        match self.call(PeerRpc::Snapshot(rpc), &option).await? {
            PeerReply::Snapshot(result) => result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(other)),
        }
    }
}
