//! `Cluster`: this node's handle on the Raft group and the state it agrees on.

use crate::error::ClusterError;
use crate::liveness::Liveness;
use crate::network::{Network, PeerTransport};
use crate::status::{ClusterStatus, DiskStatus, NodeStatus};
use crate::storage::{open_database, LogStore, StateMachineStore};
use crate::types::{Certified, PeerReply, PeerRpc, Proposal, RaftNode, RemoteRefusal, SnapshotTransfer, TypeConfig};
use model::{
    ClusterCommand, ClusterId, ClusterState, CommandOutcome, Disk, DiskHealth, Node, NodeId, NodeReport, OwnerEpoch,
    TokenKind, Volume, VolumeId, EXTENT_SIZE_BYTES, PG_COUNT_DEFAULT,
};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, Raft};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a join token lasts unless its maker says otherwise.
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest a join token may be made to last.
pub const JOIN_TOKEN_TTL_MAX: Duration = Duration::from_secs(30 * 86_400);
/// How long a proposal waits for a leader before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(15);
/// How long a forwarded proposal may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long sending a whole snapshot may take (the state is metadata: megabytes at most).
const SNAPSHOT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries in one append request: with ENTRY_BYTES_MAX each, an append stays under
/// `PEER_REQUEST_BYTES_MAX`.
const APPEND_ENTRIES_MAX: u64 = 64;
/// Largest peer request other than a snapshot (an append of APPEND_ENTRIES_MAX entries as
/// JSON, with room to spare): what a node's peer endpoint accepts.
pub const PEER_REQUEST_BYTES_MAX: usize = 16 << 20;
/// Largest snapshot transfer a node accepts (and sends).
pub const SNAPSHOT_BYTES_MAX: usize = 256 << 20;
/// Joining waits for the new node to catch up with the log.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// A joining node waits longer than the leader's own bound, so a join that succeeds late
/// is not reported as failed.
const JOIN_WAIT: Duration = Duration::from_secs(80);
/// A member forwarding a join to the leader waits between the two.
const JOIN_FORWARD_WAIT: Duration = Duration::from_secs(70);
/// How long the leader waits for a membership change of its own to commit.
const MEMBERSHIP_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a catch-up with the leader may take, all told.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(2);
/// The least time between two catch-ups of one node: what a flood of unknown tokens can
/// make it ask of the leader.
const CATCH_UP_SPACING: Duration = Duration::from_millis(50);

pub struct ClusterConfig {
    pub data_dir: PathBuf,
    pub api_addr: String,
    pub data_addr: String,
    /// A node not heard from for this long is down: the leader marks it so, and its HA VMs
    /// restart elsewhere. See `liveness` for the timing argument.
    pub down_after: Duration,
    /// Log entries between snapshots; as many are kept behind the newest snapshot.
    pub snapshot_every: u64,
    /// This node's key, and its certificate once it has one.
    pub tls: Arc<pki::NodeTls>,
}

/// Ends a join's pass for the members when dropped.
struct JoinPending<'a>(&'a Inner);

impl Drop for JoinPending<'_> {
    fn drop(&mut self) {
        *self.0.join_pending.lock().expect("join lock") = None;
        if let Err(e) = self.0.tls.set_joining(None) {
            tracing::warn!(error = %e, "forgetting the finished join failed");
        }
    }
}

/// This node's view of the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) node: Node,
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) state: watch::Receiver<Arc<ClusterState>>,
    pub(crate) transport: Arc<dyn PeerTransport>,
    /// When each other node last answered a ping, and what it reported.
    pub(crate) seen: Mutex<HashMap<NodeId, (Instant, NodeReport)>>,
    local_report: Box<dyn Fn() -> NodeReport + Send + Sync>,
    pub(crate) liveness: Liveness,
    joining: tokio::sync::Mutex<()>,
    /// The last catch-ups (`Cluster::catch_up`); held while one runs.
    catch_up: Arc<tokio::sync::Mutex<CatchUps>>,
    snapshot_installs: tokio::sync::Semaphore,
    /// Set while this node joins and has no state yet: the members' certificates its node
    /// port takes meanwhile (`Certified::members`), the leader's first messages among them.
    join_pending: Mutex<Option<BTreeSet<String>>>,
    tls: Arc<pki::NodeTls>,
}

#[derive(Default)]
struct CatchUps {
    /// When the last catch-up began, and how it ended: it answers every caller who asked
    /// before it began.
    attempt: Option<(Instant, Result<(), String>)>,
    /// When the last one ended.
    ended: Option<Instant>,
}

impl Cluster {
    /// Opens this node's Raft log and state under `config.data_dir` and starts Raft and the
    /// liveness pings. A node that was a member before rejoins on its own.
    pub async fn start(
        config: ClusterConfig,
        transport: Arc<dyn PeerTransport>,
        local_report: Box<dyn Fn() -> NodeReport + Send + Sync>,
    ) -> Result<Self, ClusterError> {
        let id = load_or_create_node_id(&config.data_dir)?;
        // The certificate is recorded in the state when the node joins (or inits).
        let node = Node { id, api_addr: config.api_addr, data_addr: config.data_addr, cert_sha256: String::new() };
        let db_path = config.data_dir.join("cluster.redb");
        let db = open_database(&db_path)
            .map_err(|source| ClusterError::Database { path: db_path.display().to_string(), source })?;
        let (machine, state) = StateMachineStore::open(db.clone()).map_err(|e| ClusterError::Raft(e.to_string()))?;
        // The addresses peers will be told: reachable, and of the same kind as the members'.
        policy::check_advertised(&node, state.borrow().nodes.values())?;
        let raft_config = Config {
            cluster_name: "converge".into(),
            heartbeat_interval: 250,
            election_timeout_min: 1000,
            election_timeout_max: 2000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.snapshot_every,
            // A snapshot goes whole, in one transfer (`SnapshotTransfer`).
            install_snapshot_timeout: SNAPSHOT_SEND_TIMEOUT.as_millis() as u64,
            // Bounds one append request: at most this many entries of ENTRY_BYTES_MAX each.
            max_payload_entries: APPEND_ENTRIES_MAX,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let network = Network { transport: transport.clone() };
        let raft = Raft::new(id.0, Arc::new(raft_config), network, LogStore::new(db), machine)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let liveness = Liveness::new(config.down_after)?;
        let inner = Arc::new(Inner {
            node,
            raft,
            state,
            transport,
            seen: Mutex::new(HashMap::new()),
            local_report,
            liveness,
            joining: tokio::sync::Mutex::new(()),
            catch_up: Default::default(),
            snapshot_installs: tokio::sync::Semaphore::new(1),
            // A join that was under way when this node stopped goes on where it was.
            join_pending: Mutex::new(config.tls.joining().map(|members| members.into_iter().collect())),
            tls: config.tls,
        });
        // Calls to other nodes trust only certificates the state records for a node.
        let weak = Arc::downgrade(&inner);
        inner
            .tls
            .check_members_with(move |cert| weak.upgrade().is_some_and(|inner| Cluster { inner }.accepts_peer(cert)));
        tokio::spawn(crate::liveness::ping_loop(Arc::downgrade(&inner)));
        tokio::spawn(crate::liveness::leader_loop(Arc::downgrade(&inner)));
        Ok(Cluster { inner })
    }

    fn local_report(&self) -> NodeReport {
        let heard_ms_ago = self
            .inner
            .seen
            .lock()
            .expect("seen lock")
            .iter()
            .map(|(node, (at, _))| (*node, at.elapsed().as_millis() as u64))
            .collect();
        NodeReport { node: self.node_id(), heard_ms_ago, ..(self.inner.local_report)() }
    }

    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node.id
    }

    /// The latest applied state. Never waits for Raft.
    pub fn state(&self) -> Arc<ClusterState> {
        self.inner.state.borrow().clone()
    }

    /// A receiver that sees every newly applied state.
    pub fn watch_state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.inner.state.clone()
    }

    /// Creates a one-node cluster with this node; its first admin token, and a join token
    /// for the others (valid for `JOIN_TOKEN_TTL`).
    pub async fn init(&self) -> Result<(String, String), ClusterError> {
        // An init cut short (this node stopped half-way) goes on where it stopped: each step
        // is taken only if the state does not show it done. A node that is a member of its
        // cluster is initialised already.
        let state = self.state();
        let me = self.node_id();
        if let Some(info) = &state.cluster {
            if !state.nodes.is_empty() || !state.removed.is_empty() {
                return Err(ClusterError::AlreadyMember(info.id));
            }
        }
        let raft = &self.inner.raft;
        if !raft.is_initialized().await.map_err(raft_error)? {
            let members = BTreeMap::from([(me.0, RaftNode { addr: self.node().data_addr.clone() })]);
            raft.initialize(members).await.map_err(raft_error)?;
        }
        if self.state().cluster.is_none() {
            let id = ClusterId(u128::from(random_u64()?) << 64 | u128::from(random_u64()?));
            self.propose(ClusterCommand::InitCluster { id }).await?;
        }
        if self.state().ca.is_none() {
            let ca = pki::new_ca().map_err(|e| ClusterError::Refused(e.to_string()))?;
            let ca = model::ClusterCa { cert_pem: ca.cert_pem, key_pem: ca.key_pem };
            self.propose(ClusterCommand::SetCa(ca)).await?;
        }
        let (ca_pem, cert_pem) = self.certify_node(self.node(), self.inner.tls.public_key())?;
        let material = self.inner.tls.install(&ca_pem, &cert_pem).map_err(|e| ClusterError::Refused(e.to_string()))?;
        let node = Node { cert_sha256: material.cert_sha256.clone(), ..self.node().clone() };
        self.propose(ClusterCommand::AddNode(node)).await?;
        let admin = self.create_token(TokenKind::Api { role: model::Role::Admin }, "admin", None).await?;
        let join = self.create_token(TokenKind::Join { expires_ms: 0 }, "", Some(JOIN_TOKEN_TTL)).await?;
        Ok((admin, join))
    }

    /// Makes a token and returns its text (the only time anyone sees it). A join token
    /// lasts `ttl`.
    pub async fn create_token(
        &self,
        kind: TokenKind,
        name: &str,
        ttl: Option<Duration>,
    ) -> Result<String, ClusterError> {
        let now_ms = crate::liveness::now_ms();
        let kind = match kind {
            TokenKind::Join { .. } => {
                let ttl = ttl.unwrap_or(JOIN_TOKEN_TTL);
                if ttl > JOIN_TOKEN_TTL_MAX {
                    return Err(ClusterError::Refused(format!(
                        "a join token lasts at most {} days",
                        JOIN_TOKEN_TTL_MAX.as_secs() / 86_400
                    )));
                }
                TokenKind::Join { expires_ms: now_ms + ttl.as_millis() as u64 }
            }
            api => api,
        };
        let ca = self.state().ca.as_ref().map(|ca| pki::fingerprint_pem(&ca.cert_pem)).transpose();
        let ca = ca.map_err(|e| ClusterError::Refused(e.to_string()))?.unwrap_or_default();
        let (token, text) = crate::tokens::mint(kind, name, now_ms, &ca)?;
        self.propose(ClusterCommand::CreateToken(token)).await?;
        Ok(text)
    }

    pub async fn revoke_token(&self, id: &str) -> Result<(), ClusterError> {
        self.propose(ClusterCommand::RevokeToken { id: id.to_string() }).await.map(drop)
    }

    /// Asks the member at `peer_api_addr` to add this node, and waits for this node to see
    /// the cluster's state.
    pub async fn join(&self, peer_api_addr: &str, token: &str) -> Result<ClusterId, ClusterError> {
        if let Some(info) = &self.state().cluster {
            return Err(ClusterError::AlreadyMember(info.id));
        }
        let Some(ca) = crate::tokens::join_token_ca(token) else {
            return Err(ClusterError::Refused(
                "that is not a join token of this version (it names no cluster CA): make one with \
                 `converge token create --join` on a member"
                    .into(),
            ));
        };
        // First a certificate: the members' node ports take this node only with one.
        let public_key = self.inner.tls.public_key().to_vec();
        let rpc = PeerRpc::Certify { token: token.to_string(), node: self.node().clone(), public_key };
        let ca = ca.as_str();
        let Certified { ca_pem, cert_pem, members } = match self.knock(peer_api_addr, rpc, ca, FORWARD_TIMEOUT).await? {
            PeerReply::Certify(result) => result.map_err(refusal)?,
            other => return Err(ClusterError::Refused(format!("unexpected reply {other:?}"))),
        };
        if pki::fingerprint_pem(&ca_pem).ok().as_deref() != Some(ca) {
            return Err(ClusterError::Refused("the member sent a CA other than the one the join token names".into()));
        }
        let material = self.inner.tls.install(&ca_pem, &cert_pem).map_err(|e| ClusterError::Refused(e.to_string()))?;
        let node = Node { cert_sha256: material.cert_sha256.clone(), ..self.node().clone() };
        let rpc = PeerRpc::Join { token: token.to_string(), node };
        let until = std::time::SystemTime::now() + JOIN_WAIT + JOIN_WAIT;
        self.inner.tls.set_joining(Some((&members, until))).map_err(|e| ClusterError::Refused(e.to_string()))?;
        *self.inner.join_pending.lock().expect("join lock") = Some(members.into_iter().collect());
        // However this ends (done, refused, or the caller gone), the members' pass ends too.
        let _pending = JoinPending(&self.inner);
        let joined = async {
            let id = match self.knock(peer_api_addr, rpc, ca, JOIN_WAIT).await? {
                PeerReply::Join(result) => result.map_err(refusal)?,
                other => return Err(ClusterError::Refused(format!("unexpected reply {other:?}"))),
            };
            let me = self.node_id();
            self.wait_for(|s| s.nodes.contains_key(&me).then_some(())).await?;
            Ok(id)
        }
        .await;
        joined
    }

    /// Proposes a command through the leader, wherever it is, and returns its outcome once
    /// this node has applied it too: a caller reads its own writes on any node.
    pub async fn propose(&self, command: ClusterCommand) -> Result<CommandOutcome, ClusterError> {
        let (outcome, index) = self.propose_at(command).await?;
        let wait = self.inner.raft.wait(Some(LEADER_WAIT));
        wait.applied_index_at_least(Some(index), "read own write")
            .await
            .map_err(|_| ClusterError::NoLeader { waited_ms: LEADER_WAIT.as_millis() as u64 })?;
        Ok(outcome)
    }

    /// Proposes a command only while this node leads, and never forwards it: the leader's
    /// own judgements (a node down, a failover) must not be applied by another leader that
    /// did not make them, after this one was deposed with the proposal pending.
    pub(crate) async fn propose_as_leader(&self, command: ClusterCommand) -> Result<CommandOutcome, ClusterError> {
        let proposal = Proposal { id: u128::from(random_u64()?) << 64 | u128::from(random_u64()?), command };
        check_entry_size(&proposal)?;
        match self.inner.raft.client_write(proposal).await {
            Ok(response) => Ok(response.data?),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(ClusterError::Refused("this node no longer leads".into()))
            }
            Err(e) => Err(raft_error(e)),
        }
    }

    /// Proposes through the leader; the outcome and the log index it was committed at.
    async fn propose_at(&self, command: ClusterCommand) -> Result<(CommandOutcome, u64), ClusterError> {
        let started = Instant::now();
        // One id for every attempt: a retry of a proposal that did commit is answered with
        // its first outcome instead of being applied again.
        let proposal = Proposal { id: u128::from(random_u64()?) << 64 | u128::from(random_u64()?), command };
        check_entry_size(&proposal)?;
        loop {
            let attempt = match self.inner.raft.client_write(proposal.clone()).await {
                Ok(response) => return Ok((response.data?, response.log_id.index)),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => match forward.leader_node {
                    Some(leader) if forward.leader_id != Some(self.node_id().0) => {
                        self.forward(&leader.addr, proposal.clone()).await
                    }
                    _ => Err(ClusterError::NoLeader { waited_ms: started.elapsed().as_millis() as u64 }),
                },
                Err(e) => return Err(raft_error(e)),
            };
            match attempt {
                Err(ClusterError::NoLeader { .. } | ClusterError::Peer { .. }) if started.elapsed() < LEADER_WAIT => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(ClusterError::NoLeader { .. } | ClusterError::Peer { .. }) => {
                    return Err(ClusterError::NoLeader { waited_ms: started.elapsed().as_millis() as u64 });
                }
                other => return other,
            }
        }
    }

    async fn forward(&self, leader_addr: &str, proposal: Proposal) -> Result<(CommandOutcome, u64), ClusterError> {
        match self.call(leader_addr, PeerRpc::Propose(proposal), FORWARD_TIMEOUT).await? {
            PeerReply::Propose(Ok(committed)) => Ok(committed),
            PeerReply::Propose(Err(RemoteRefusal::Command(e))) => Err(ClusterError::Command(e)),
            PeerReply::Propose(Err(RemoteRefusal::NotLeader)) => Err(ClusterError::NoLeader { waited_ms: 0 }),
            // The leader refused it for a reason of its own: that reason, and no retry.
            PeerReply::Propose(Err(RemoteRefusal::Other(reason))) => Err(ClusterError::Refused(reason)),
            other => Err(ClusterError::Refused(format!("unexpected reply {other:?}"))),
        }
    }

    async fn knock(
        &self,
        api_addr: &str,
        rpc: PeerRpc,
        ca: &str,
        timeout: Duration,
    ) -> Result<PeerReply, ClusterError> {
        self.inner
            .transport
            .knock(api_addr, rpc, ca, timeout)
            .await
            .map_err(|source| ClusterError::Peer { addr: api_addr.into(), source })
    }

    async fn call(&self, addr: &str, rpc: PeerRpc, timeout: Duration) -> Result<PeerReply, ClusterError> {
        self.inner
            .transport
            .call(addr, rpc, timeout)
            .await
            .map_err(|source| ClusterError::Peer { addr: addr.into(), source })
    }

    /// Serves a request from another node.
    pub async fn handle_peer(&self, rpc: PeerRpc) -> PeerReply {
        let raft = &self.inner.raft;
        match rpc {
            PeerRpc::Append(request) => {
                let reply = raft.append_entries(request).await;
                if matches!(&reply, Ok(r) if !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_))) {
                    self.inner.liveness.heard_from_leader();
                }
                PeerReply::Append(reply)
            }
            PeerRpc::Vote(request) => PeerReply::Vote(raft.vote(request).await),
            PeerRpc::Propose(command) if check_entry_size(&command).is_err() => {
                PeerReply::Propose(Err(RemoteRefusal::Other(format!("a proposal larger than {ENTRY_BYTES_MAX} bytes"))))
            }
            PeerRpc::Propose(command) => PeerReply::Propose(match raft.client_write(command).await {
                Ok(response) => {
                    response.data.map(|outcome| (outcome, response.log_id.index)).map_err(RemoteRefusal::Command)
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(RemoteRefusal::NotLeader),
                Err(e) => Err(RemoteRefusal::Other(e.to_string())),
            }),
            PeerRpc::Join { token, node } => {
                // Its own task: a caller that hangs up mid-way does not leave the join half
                // done (a learner nobody promotes); it finishes or is undone either way.
                let cluster = self.clone();
                let admitted = tokio::spawn(async move { cluster.admit(token, node).await })
                    .await
                    .unwrap_or_else(|e| Err(ClusterError::Refused(format!("the join failed: {e}"))));
                PeerReply::Join(admitted.map_err(|e| match e {
                    ClusterError::Command(c) => RemoteRefusal::Command(c),
                    other => RemoteRefusal::Other(other.to_string()),
                }))
            }
            PeerRpc::Certify { token, node, public_key } => {
                PeerReply::Certify(self.certify(&token, &node, &public_key).await.map_err(|e| match e {
                    ClusterError::Command(c) => RemoteRefusal::Command(c),
                    other => RemoteRefusal::Other(other.to_string()),
                }))
            }
            PeerRpc::Ping => PeerReply::Ping(self.local_report()),
            // The leader's own apply is not waited for: the asker waits for its own.
            PeerRpc::ReadIndex => PeerReply::ReadIndex(match raft.get_read_log_id().await {
                Ok((read, _applied)) => Ok(read.map_or(0, |log_id| log_id.index)),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => Err(RemoteRefusal::NotLeader),
                Err(e) => Err(RemoteRefusal::Other(e.to_string())),
            }),
        }
    }

    /// Brings this node's state up to every write the cluster committed before the call
    /// (a read index from the leader, applied here), within `CATCH_UP_TIMEOUT`. A follower
    /// lags the leader by a round trip: what a caller made through one node (a token, say)
    /// and shows to another at once is there after this.
    ///
    /// One catch-up runs at a time, in a task of its own (a caller that gives up does not
    /// cut it short), at most one per `CATCH_UP_SPACING`; a caller that asked before one
    /// began takes its outcome. So a burst of misses costs one round trip.
    pub async fn catch_up(&self) -> Result<(), ClusterError> {
        let asked = Instant::now();
        let mut last = self.inner.catch_up.clone().lock_owned().await;
        // One that began after this caller asked serves it, whatever its outcome: callers
        // queued behind a leader that does not answer fail together, not 2 s each.
        if let Some((began, outcome)) = &last.attempt {
            if *began >= asked {
                return outcome.clone().map_err(ClusterError::Refused);
            }
        }
        let cluster = self.clone();
        let run = tokio::spawn(async move {
            if let Some(ended) = last.ended {
                tokio::time::sleep_until((ended + CATCH_UP_SPACING).into()).await;
            }
            let began = Instant::now();
            let caught_up = match tokio::time::timeout(CATCH_UP_TIMEOUT, cluster.read_index_applied()).await {
                Ok(result) => result,
                Err(_) => Err(ClusterError::NoLeader { waited_ms: CATCH_UP_TIMEOUT.as_millis() as u64 }),
            };
            last.ended = Some(Instant::now());
            last.attempt = Some((began, caught_up.as_ref().map(drop).map_err(|e| e.to_string())));
            caught_up
        });
        run.await.unwrap_or_else(|e| Err(ClusterError::Refused(format!("catching up with the leader: {e}"))))
    }

    /// Waits until this node has applied the leader's read index.
    async fn read_index_applied(&self) -> Result<(), ClusterError> {
        let index = self.read_index().await?;
        let wait = self.inner.raft.wait(Some(CATCH_UP_TIMEOUT));
        wait.applied_index_at_least(Some(index), "catch up")
            .await
            .map_err(|_| ClusterError::NoLeader { waited_ms: CATCH_UP_TIMEOUT.as_millis() as u64 })?;
        Ok(())
    }

    /// The leader's commit index, confirmed by a quorum, asked of the leader wherever it is.
    async fn read_index(&self) -> Result<u64, ClusterError> {
        let leader = match self.inner.raft.get_read_log_id().await {
            Ok((read, _applied)) => return Ok(read.map_or(0, |log_id| log_id.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => match forward.leader_node {
                Some(leader) if forward.leader_id != Some(self.node_id().0) => leader,
                _ => return Err(ClusterError::NoLeader { waited_ms: 0 }),
            },
            Err(e) => return Err(raft_error(e)),
        };
        match self.call(&leader.addr, PeerRpc::ReadIndex, CATCH_UP_TIMEOUT).await? {
            PeerReply::ReadIndex(Ok(index)) => Ok(index),
            PeerReply::ReadIndex(Err(RemoteRefusal::NotLeader)) => Err(ClusterError::NoLeader { waited_ms: 0 }),
            PeerReply::ReadIndex(Err(e)) => Err(refusal(e)),
            other => Err(ClusterError::Refused(format!("unexpected reply {other:?}"))),
        }
    }

    /// Installs a whole snapshot sent by the leader (`SnapshotTransfer`'s wire form).
    pub async fn handle_snapshot(&self, wire: Vec<u8>) -> PeerReply {
        let installed = async {
            // One at a time: each holds a whole state in memory, several times over.
            let _one = self.inner.snapshot_installs.acquire().await.map_err(|e| RemoteRefusal::Other(e.to_string()))?;
            let transfer = SnapshotTransfer::decode(wire).map_err(RemoteRefusal::Other)?;
            let snapshot = openraft::Snapshot { meta: transfer.meta, snapshot: Box::new(Cursor::new(transfer.data)) };
            let raft = &self.inner.raft;
            raft.install_full_snapshot(transfer.vote, snapshot).await.map_err(|e| RemoteRefusal::Other(e.to_string()))
        };
        PeerReply::Snapshot(installed.await)
    }

    /// Whether `token` is a join token that works now, as this node's state says.
    fn join_token_valid(&self, token: &str) -> bool {
        let now_ms = crate::liveness::now_ms();
        crate::tokens::verify(&self.state(), token)
            .is_some_and(|t| matches!(t.kind, TokenKind::Join { expires_ms } if expires_ms > now_ms))
    }

    /// Whether `token` is a join token that works now. One this node has not seen may have
    /// just been made on another member: it catches up once before saying no.
    async fn join_token_valid_caught_up(&self, token: &str) -> Result<bool, ClusterError> {
        if self.join_token_valid(token) || !crate::tokens::unseen(&self.state(), token) {
            return Ok(self.join_token_valid(token));
        }
        self.catch_up().await?;
        Ok(self.join_token_valid(token))
    }

    /// Signs a certificate for a node that presented `token`: the CA's and the node's, PEM.
    /// The certificate alone opens nothing: node ports take a node whose certificate the
    /// state records, which only a completed join does.
    async fn certify(&self, token: &str, node: &Node, public_key: &[u8]) -> Result<Certified, ClusterError> {
        if !self.join_token_valid_caught_up(token).await? {
            return Err(ClusterError::BadToken);
        }
        let state = self.state();
        if state.nodes.contains_key(&node.id) || state.removed.contains_key(&node.id) {
            return Err(ClusterError::Refused(format!(
                "{} is already known to the cluster: a node joins with an empty data dir",
                node.id
            )));
        }
        policy::check_advertised(node, state.nodes.values())?;
        let (ca_pem, cert_pem) = self.certify_node(node, public_key)?;
        let members = state.nodes.values().map(|n| n.cert_sha256.clone()).collect();
        Ok(Certified { ca_pem, cert_pem, members })
    }

    fn certify_node(&self, node: &Node, public_key: &[u8]) -> Result<(String, String), ClusterError> {
        let state = self.state();
        let ca = state.ca.as_ref().ok_or_else(|| ClusterError::Refused("the cluster has no CA yet".into()))?;
        let ip = |addr: &str| addr.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        let addresses: Vec<_> = [ip(&node.api_addr), ip(&node.data_addr)].into_iter().flatten().collect();
        let cert = pki::sign_node(&ca.key_pem, node.id.0, &addresses, public_key)
            .map_err(|e| ClusterError::Refused(e.to_string()))?;
        Ok((ca.cert_pem.clone(), cert))
    }

    /// Adds a node that presented `token`: its addresses go into the state, then it becomes
    /// a learner, catches up, and is promoted to voter.
    async fn admit(&self, token: String, node: Node) -> Result<ClusterId, ClusterError> {
        let cluster = self.state().cluster.as_ref().map(|info| info.id).ok_or(ClusterError::NotInitialized)?;
        if !self.join_token_valid_caught_up(&token).await? {
            return Err(ClusterError::BadToken);
        }
        let state = self.state();
        if node.cert_sha256.len() != 64 {
            return Err(ClusterError::Refused("a joining node names its certificate (`Certify` first)".into()));
        }
        policy::check_advertised(&node, state.nodes.values())?;
        let raft = &self.inner.raft;
        let leader = raft.current_leader().await;
        if leader != Some(self.node_id().0) {
            let leader_addr = leader
                .and_then(|l| state.nodes.get(&NodeId(l)))
                .map(|n| n.data_addr.clone())
                .ok_or(ClusterError::NoLeader { waited_ms: 0 })?;
            return match self.call(&leader_addr, PeerRpc::Join { token, node }, JOIN_FORWARD_WAIT).await? {
                PeerReply::Join(result) => result.map_err(refusal),
                other => Err(ClusterError::Refused(format!("unexpected reply {other:?}"))),
            };
        }
        // One join at a time: two membership changes at once would refuse one of them.
        let _joining = self.inner.joining.lock().await;
        // Checked again: the token may have been revoked, or run out, while this waited.
        if !self.join_token_valid(&token) {
            return Err(ClusterError::BadToken);
        }
        let known = self.state().nodes.contains_key(&node.id);
        self.propose(ClusterCommand::AddNode(node.clone())).await?;
        let raft_node = RaftNode { addr: node.data_addr.clone() };
        let joined = async {
            // Bounded: a node that never catches up is not waited for forever.
            let learner = tokio::time::timeout(JOIN_TIMEOUT, raft.add_learner(node.id.0, raft_node, true)).await;
            match learner {
                Ok(added) => added.map_err(raft_error)?,
                Err(_) => {
                    return Err(ClusterError::Refused(format!(
                        "{} did not catch up with the cluster log within {} s",
                        node.id,
                        JOIN_TIMEOUT.as_secs()
                    )))
                }
            };
            let voters = ChangeMembers::AddVoterIds(BTreeSet::from([node.id.0]));
            raft.change_membership(voters, false).await.map_err(raft_error)
        }
        .await;
        if let Err(e) = joined {
            // No half-member: the node leaves the state again (unless it was a member
            // before this attempt).
            if !known {
                let _ = raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([node.id.0])), false).await;
                if let Err(undo) = self.propose(ClusterCommand::AbandonJoin { node: node.id }).await {
                    tracing::warn!(node = %node.id, error = %undo, "taking back a failed join failed");
                }
            }
            return Err(e);
        }
        tracing::info!(node = %node.id, addr = %node.api_addr, "node joined");
        Ok(cluster)
    }

    /// Removes a node that is gone for good, and waits until it is out of the Raft voters
    /// (the leader takes removed nodes out of the membership).
    pub async fn remove_node(&self, node: NodeId) -> Result<(), ClusterError> {
        let at_ms = crate::liveness::now_ms();
        self.propose(ClusterCommand::RemoveNode { node, at_ms }).await?;
        let mut metrics = self.inner.raft.metrics();
        let out = |m: &openraft::RaftMetrics<u64, RaftNode>| {
            !m.membership_config.membership().nodes().any(|(id, _)| *id == node.0)
        };
        let waited = tokio::time::timeout(LEADER_WAIT, metrics.wait_for(out)).await.map(|r| r.is_ok());
        if waited != Ok(true) {
            // The removal itself is committed; only the voters' change is late.
            return Err(ClusterError::Refused(format!(
                "{node} is removed, but it is still a Raft voter after {} s: the leader takes it out as soon as a \
                 majority answers; `converge cluster status` shows when",
                LEADER_WAIT.as_secs()
            )));
        }
        Ok(())
    }

    /// Whether the node port serves a caller that presented the certificate of fingerprint
    /// `cert_sha256` (its chain to the CA already checked): it is a node of the cluster, or
    /// this node is joining and has no state yet (the leader's first messages come from a
    /// node it cannot know).
    pub fn accepts_peer(&self, cert_sha256: &str) -> bool {
        let state = self.state();
        if state.nodes.is_empty() {
            let pending = self.inner.join_pending.lock().expect("join lock");
            return pending.as_ref().is_some_and(|members| members.contains(cert_sha256));
        }
        state.nodes.values().any(|n| n.cert_sha256 == cert_sha256)
    }

    /// This node's key and certificate.
    pub fn tls(&self) -> &Arc<pki::NodeTls> {
        &self.inner.tls
    }

    /// Whether `node` answered a ping within the down time (this node is always up to itself).
    pub fn is_up(&self, node: NodeId) -> bool {
        let down_after = self.inner.liveness.down_after;
        node == self.node_id()
            || self.inner.seen.lock().expect("seen lock").get(&node).is_some_and(|(at, _)| at.elapsed() < down_after)
    }

    /// How long a node may go unheard before it is declared down.
    pub fn down_after(&self) -> Duration {
        self.inner.liveness.down_after
    }

    /// True while this node cannot reach a majority of the voters: it then runs no VM.
    pub fn watch_isolated(&self) -> watch::Receiver<bool> {
        self.inner.liveness.isolated.subscribe()
    }

    /// Adds to the event log in the background, best effort.
    pub fn record_event(&self, kind: model::EventKind, message: String) {
        crate::liveness::record_event(self.clone(), kind, message);
    }

    /// Makes the Raft membership follow the state, as the leader: members that are not (or
    /// no longer) nodes of the state leave it; nodes of the state that are not members (a
    /// join whose leader died half-way) become learners, and learners that caught up and are
    /// up become voters. Skipped while a join is under way (that join does all of this
    /// itself) and while the state lags the membership (a new leader that has not applied
    /// the log it committed yet would see members missing from the state).
    pub(crate) async fn reconcile_membership(&self) {
        let Ok(_joining) = self.inner.joining.try_lock() else { return };
        let raft = &self.inner.raft;
        let metrics = raft.metrics().borrow().clone();
        if metrics.last_applied < *metrics.membership_config.log_id() {
            return;
        }
        let me = self.node_id().0;
        let state = self.state();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        let in_state = |id: &u64| state.nodes.contains_key(&NodeId(*id));
        // This node leaves too if it was removed (it steps down once that commits); absent
        // from the state for another reason (a cluster being initialised) it stays.
        let leaving: BTreeSet<u64> = members
            .iter()
            .copied()
            .filter(|id| if *id == me { state.removed.contains_key(&NodeId(me)) } else { !in_state(id) })
            .collect();
        let change = |change: ChangeMembers<u64, RaftNode>| async move {
            match tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, raft.change_membership(change, false)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("not committed within {} s", MEMBERSHIP_CHANGE_TIMEOUT.as_secs())),
            }
        };
        if !leaving.is_empty() {
            let removal = if leaving.iter().any(|id| voters.contains(id)) {
                ChangeMembers::RemoveVoters(leaving.clone())
            } else {
                ChangeMembers::RemoveNodes(leaving.clone())
            };
            match change(removal).await {
                Ok(()) => tracing::info!(?leaving, "nodes no longer in the cluster left the Raft membership"),
                Err(e) => tracing::warn!(?leaving, error = %e, "taking nodes out of the Raft membership failed"),
            }
            return;
        }
        let usable = |id: NodeId| self.is_up(id) && !state.is_down(id);
        for node in state.nodes.values().filter(|n| !members.contains(&n.id.0) && usable(n.id)) {
            let raft_node = RaftNode { addr: node.data_addr.clone() };
            let added = tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, raft.add_learner(node.id.0, raft_node, false));
            match added.await {
                Ok(Ok(_)) => {
                    tracing::info!(node = %node.id, "a node of the cluster missing from the Raft membership is a learner again")
                }
                Ok(Err(e)) => tracing::warn!(node = %node.id, error = %e, "adding a node back as a learner failed"),
                Err(_) => tracing::warn!(node = %node.id, "adding a node back as a learner did not commit in time"),
            }
        }
        // Only learners that are up: a voter that cannot answer could leave the new
        // configuration without a majority, and no membership change would then commit.
        let last = metrics.last_log_index.unwrap_or(0);
        let caught_up: BTreeSet<u64> = members
            .iter()
            .copied()
            .filter(|id| !voters.contains(id) && in_state(id) && usable(NodeId(*id)))
            .filter(|id| {
                let matched = metrics.replication.as_ref().and_then(|r| r.get(id).cloned().flatten());
                matched.is_some_and(|m| m.index + APPEND_ENTRIES_MAX >= last)
            })
            .collect();
        if !caught_up.is_empty() {
            match change(ChangeMembers::AddVoterIds(caught_up.clone())).await {
                Ok(()) => tracing::info!(?caught_up, "learners of the cluster that caught up became voters"),
                Err(e) => tracing::warn!(?caught_up, error = %e, "promoting learners failed"),
            }
        }
    }

    pub(crate) fn from_inner(inner: &Arc<Inner>) -> Cluster {
        Cluster { inner: inner.clone() }
    }

    pub async fn add_disk(&self, disk: Disk) -> Result<(), ClusterError> {
        self.propose(ClusterCommand::AddDisk(disk)).await.map(drop)
    }

    /// Creates a volume in the pool for `replicas`, creating and placing that pool first if
    /// this is its first volume.
    pub async fn create_volume(&self, name: &str, size_bytes: u64, replicas: u8) -> Result<Volume, ClusterError> {
        if self.state().cluster.is_none() {
            return Err(ClusterError::NotInitialized);
        }
        let pool_name = policy::pool_name(replicas);
        if self.state().pool_by_name(&pool_name).is_none() {
            let pgs = policy::place_pool(&self.state(), replicas, PG_COUNT_DEFAULT)?;
            let create = ClusterCommand::CreatePool {
                name: pool_name.clone(),
                replicas,
                min_size: policy::min_size(replicas),
                pgs,
            };
            match self.propose(create).await {
                Ok(_) | Err(ClusterError::Command(model::CommandError::PoolExists(_))) => {}
                Err(e) => return Err(e),
            }
        }
        let pool = self.wait_for(|s| s.pool_by_name(&pool_name).map(|p| p.id)).await?;
        let command = ClusterCommand::CreateVolume { name: name.to_string(), pool, size_bytes };
        let CommandOutcome::VolumeCreated(id) = self.propose(command).await? else {
            return Err(ClusterError::Refused("volume creation gave no volume".into()));
        };
        self.wait_for(|s| s.volumes.get(&id).cloned()).await
    }

    pub fn volume(&self, name: &str) -> Result<Volume, ClusterError> {
        self.state()
            .volume_by_name(name)
            .cloned()
            .ok_or_else(|| ClusterError::NotFound { what: "volume", name: name.into() })
    }

    pub async fn delete_volume(&self, name: &str) -> Result<(), ClusterError> {
        let volume = self.volume(name)?;
        self.propose(ClusterCommand::DeleteVolume { volume: volume.id }).await?;
        self.wait_for(|s| (!s.volumes.contains_key(&volume.id)).then_some(())).await
    }

    /// Makes this node the volume's writer with a new owner epoch, and waits until this node
    /// has applied it (so its own replica server agrees).
    pub async fn acquire_volume(&self, volume: VolumeId) -> Result<OwnerEpoch, ClusterError> {
        self.acquire(volume, false).await
    }

    /// Like `acquire_volume`, but refused while a VM using the volume runs.
    pub async fn acquire_idle_volume(&self, volume: VolumeId) -> Result<OwnerEpoch, ClusterError> {
        self.acquire(volume, true).await
    }

    async fn acquire(&self, volume: VolumeId, unless_vm_running: bool) -> Result<OwnerEpoch, ClusterError> {
        let command = ClusterCommand::AcquireVolume { volume, node: self.node_id(), unless_vm_running };
        let CommandOutcome::VolumeAcquired(epoch) = self.propose(command).await? else {
            return Err(ClusterError::Refused("acquiring the volume gave no epoch".into()));
        };
        self.wait_for(|s| s.volumes.get(&volume).filter(|v| v.owner_epoch >= epoch).map(|_| ())).await?;
        Ok(epoch)
    }

    /// Waits until this node's applied state satisfies `pick`, for a committed change.
    pub(crate) async fn wait_for<T>(&self, pick: impl Fn(&ClusterState) -> Option<T>) -> Result<T, ClusterError> {
        let mut state = self.watch_state();
        let waited = tokio::time::timeout(LEADER_WAIT, async {
            loop {
                if let Some(found) = pick(&state.borrow_and_update()) {
                    return Some(found);
                }
                if state.changed().await.is_err() {
                    return None;
                }
            }
        });
        match waited.await {
            Ok(Some(found)) => Ok(found),
            _ => Err(ClusterError::NoLeader { waited_ms: LEADER_WAIT.as_millis() as u64 }),
        }
    }

    pub async fn status(&self) -> ClusterStatus {
        let state = self.state();
        let metrics = self.inner.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = metrics.membership_config.membership().voter_ids().collect();
        let mut reports: HashMap<NodeId, NodeReport> = HashMap::new();
        reports.insert(self.node_id(), self.local_report());
        for (node, (at, report)) in self.inner.seen.lock().expect("seen lock").iter() {
            if at.elapsed() < self.inner.liveness.down_after {
                reports.insert(*node, report.clone());
            }
        }
        let mut problems = Vec::new();
        let nodes: Vec<NodeStatus> = state
            .nodes
            .values()
            .map(|node| {
                let report = reports.get(&node.id);
                let up = report.is_some();
                if !up {
                    problems.push(format!("{} ({}) is down", node.id, node.api_addr));
                } else if state.is_down(node.id) {
                    // Answering again, but VMs are not placed on it until the leader says so.
                    problems.push(format!(
                        "{} ({}) answers again; the leader marks it up once a majority hears it",
                        node.id, node.api_addr
                    ));
                }
                let disks = state
                    .disks_of(node.id)
                    .map(|disk| {
                        let disk_report = report.and_then(|r| r.disks.iter().find(|d| d.disk == disk.id));
                        if let Some(DiskHealth::Failed(reason)) = disk_report.map(|d| &d.health) {
                            problems.push(format!("{} on {} failed: {reason}", disk.id, node.id));
                        }
                        DiskStatus {
                            id: disk.id,
                            path: disk.path.clone(),
                            size_bytes: disk.size_bytes,
                            health: disk_report.map(|d| d.health.clone()),
                            used_bytes: disk_report.map(|d| d.extents_used * EXTENT_SIZE_BYTES),
                            capacity_bytes: disk.extent_slots * EXTENT_SIZE_BYTES,
                        }
                    })
                    .collect();
                NodeStatus {
                    resync: report.map(|r| r.resync),
                    id: node.id,
                    api_addr: node.api_addr.clone(),
                    data_addr: node.data_addr.clone(),
                    up,
                    voter: voters.contains(&node.id.0),
                    disks,
                }
            })
            .collect();
        // A leader this node cannot reach is as good as none until the others elect anew.
        let leader = metrics.current_leader.map(NodeId).filter(|l| reports.contains_key(l));
        if leader.is_none() {
            problems.push("no Raft leader: a majority of nodes must be up".into());
        }
        if state.cluster.is_none() {
            problems.push("not initialised: run `converge cluster init`".into());
        }
        for pool in state.pools.values() {
            problems.extend(pool.degraded(&state));
        }
        let pgs_degraded = state.pools.values().map(|p| p.pgs_degraded()).sum();
        ClusterStatus {
            cluster_id: state.cluster.as_ref().map(|c| c.id),
            this_node: self.node_id(),
            leader,
            healthy: problems.is_empty(),
            problems,
            nodes,
            pgs_degraded,
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.inner.raft.shutdown().await;
    }
}

/// Largest Raft entry: every command is metadata, small by construction; this bounds what a
/// bug or a hostile caller could make every node store and replay.
pub const ENTRY_BYTES_MAX: usize = 64 << 10;

fn check_entry_size(proposal: &Proposal) -> Result<(), ClusterError> {
    let bytes = serde_json::to_vec(proposal).map(|b| b.len()).unwrap_or(usize::MAX);
    if bytes > ENTRY_BYTES_MAX {
        return Err(ClusterError::Refused(format!(
            "the command is {bytes} bytes, more than the {ENTRY_BYTES_MAX} a cluster log entry may hold"
        )));
    }
    Ok(())
}

fn refusal(e: RemoteRefusal) -> ClusterError {
    match e {
        RemoteRefusal::Command(c) => ClusterError::Command(c),
        RemoteRefusal::Other(text) if text.contains("join token") => ClusterError::BadToken,
        RemoteRefusal::Other(text) => ClusterError::Refused(text),
        RemoteRefusal::NotLeader => ClusterError::NoLeader { waited_ms: 0 },
    }
}

fn raft_error<E: std::fmt::Display>(e: E) -> ClusterError {
    ClusterError::Raft(e.to_string())
}

fn random_u64() -> Result<u64, ClusterError> {
    getrandom::u64().map_err(|e| ClusterError::Raft(format!("no randomness from the OS: {e}")))
}

/// This node's id: drawn once, kept in the data dir.
fn load_or_create_node_id(data_dir: &std::path::Path) -> Result<NodeId, ClusterError> {
    let path = data_dir.join("node-id");
    let io = |source| ClusterError::Io { path: path.display().to_string(), source };
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(NodeId)
            .map_err(|_| ClusterError::Refused(format!("{} is damaged: it should hold a number", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(io)?;
            // Small ids read better in status output; 2^40 keeps collisions negligible.
            let id = NodeId(random_u64()? % (1 << 40) + 1);
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, id.0.to_string()).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_too_large_for_a_log_entry_is_refused_before_it_is_proposed() {
        let event = |len| Proposal {
            id: 1,
            command: ClusterCommand::RecordEvent {
                at_ms: 0,
                kind: model::EventKind::NodeSlow,
                message: "x".repeat(len),
            },
        };

        assert!(check_entry_size(&event(1000)).is_ok());
        let refused = check_entry_size(&event(ENTRY_BYTES_MAX)).unwrap_err();
        assert!(refused.to_string().contains("more than the 65536"), "{refused}");
    }
}
