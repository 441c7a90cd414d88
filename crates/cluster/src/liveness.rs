//! Who is alive: every node pings every other one; the leader declares a node down after
//! `down_after` without an answer and moves its HA VMs; a node that cannot reach a
//! majority of the voters for `down_after / 2` knows it is cut off and runs no VM.
//!
//! The timing argument (docs/decisions.md): a node cut off at time T stops its VMs by about
//! T + down_after/2 + one ping round, while the majority, which heard from it until T at
//! the latest, declares it down no earlier than T + down_after - one ping round. With the
//! default 3.5 s and 0.5 s rounds that leaves about a second between the cut-off node ending
//! its VMs and anyone else starting them, and the owner epochs fence its writes anyway.

use crate::cluster::{Cluster, Inner};
use crate::types::{PeerReply, PeerRpc};
use model::{Capacity, ClusterCommand, EventKind, NodeId, VmId};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// How often each node pings every other one.
pub const PING_INTERVAL: Duration = Duration::from_millis(500);
/// A ping unanswered this long is missed (a busy node may take longer than the interval).
const PING_TIMEOUT: Duration = Duration::from_millis(1000);
/// A node not heard from for this long is down. Longer than a 2 s stall (a busy or briefly
/// stopped process must not cost a failover), short enough to restart VMs within seconds.
pub const DOWN_AFTER_DEFAULT: Duration = Duration::from_millis(3500);
/// Shorter than this and a node could be declared down between two missed pings.
pub const DOWN_AFTER_MIN: Duration = Duration::from_millis(2000);
/// A ping round that starts or lasts this much late means this process itself stalled
/// (stopped, starved): what it knows of the others is old, so it judges nobody for a while.
const STALL: Duration = Duration::from_millis(1800);
/// How often the leader judges who is down: finer than the pings, so a node is declared
/// down soon after its silence passes the down time.
const LEADER_TICK: Duration = Duration::from_millis(250);
/// Rounds between two checks that the state holds this node's capacity.
const CAPACITY_EVERY_ROUNDS: u32 = 20;

pub(crate) struct Liveness {
    pub(crate) down_after: Duration,
    isolated_after: Duration,
    pub(crate) isolated: watch::Sender<bool>,
    /// Since when this node's own ping rounds have run on time: silence before it counts
    /// for nothing.
    steady_since: Mutex<Instant>,
    /// When a current leader last replicated to this node.
    leader_contact: Mutex<Instant>,
}

impl Liveness {
    pub(crate) fn new(down_after: Duration) -> Result<Self, crate::ClusterError> {
        if down_after < DOWN_AFTER_MIN {
            return Err(crate::ClusterError::Refused(format!(
                "the down time must be at least {} ms (pings go every {} ms)",
                DOWN_AFTER_MIN.as_millis(),
                PING_INTERVAL.as_millis()
            )));
        }
        Ok(Liveness {
            down_after,
            isolated_after: down_after / 2,
            isolated: watch::Sender::new(false),
            steady_since: Mutex::new(Instant::now()),
            leader_contact: Mutex::new(Instant::now()),
        })
    }

    pub(crate) fn heard_from_leader(&self) {
        *self.leader_contact.lock().expect("contact lock") = Instant::now();
    }

    fn steady_since(&self) -> Instant {
        *self.steady_since.lock().expect("steady lock")
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Pings every other member each `PING_INTERVAL`, recording who answered and their
/// reports, and judges whether this node still reaches a majority of the voters.
pub(crate) async fn ping_loop(inner: Weak<Inner>) {
    let mut ticker = tokio::time::interval(PING_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_round = Instant::now();
    let mut majority_at = Instant::now();
    let mut failed_rounds = 0u32;
    let mut isolated_at_ms = 0;
    let mut rounds = 0u32;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let round = Instant::now();
        let state = inner.state.borrow().clone();
        let me = inner.node.id;
        let pings = state.nodes.values().filter(|n| n.id != me).map(|node| {
            let call = inner.transport.call(&node.data_addr, PeerRpc::Ping, PING_TIMEOUT);
            async move { (node.id, call.await) }
        });
        let mut answered = HashSet::new();
        for (node, reply) in futures_util::future::join_all(pings).await {
            // Only the node itself counts: another daemon answering at its address does not.
            if let Ok(PeerReply::Ping(report)) = reply {
                if report.node != node {
                    tracing::warn!(%node, answered = %report.node, "another node answers at a member's address");
                    continue;
                }
                inner.seen.lock().expect("seen lock").insert(node, (Instant::now(), report));
                answered.insert(node.0);
            }
        }
        // A round that started late or took long means this process stalled (stopped,
        // starved): the silence of the others over that time says nothing about them.
        let end = Instant::now();
        if round.duration_since(last_round) > STALL || end.duration_since(round) > STALL {
            *inner.liveness.steady_since.lock().expect("steady lock") = end;
            majority_at = end;
            failed_rounds = 0;
            let stalled_ms = end.duration_since(last_round).as_millis() as u64;
            tracing::warn!(stalled_ms, "this node stalled");
            if inner.state.borrow().nodes.contains_key(&inner.node.id) {
                let message = format!("{} stalled for about {stalled_ms} ms (its own pings ran late)", inner.node.id);
                record_event(Cluster::from_inner(&inner), EventKind::NodeSlow, message);
            }
        }
        last_round = end;

        let voters: BTreeSet<u64> = inner.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        let reached = voters.iter().filter(|v| **v == me.0 || answered.contains(v)).count();
        if voters.is_empty() || reached * 2 > voters.len() {
            majority_at = round;
            failed_rounds = 0;
        } else if majority_at < end {
            failed_rounds += 1;
        }
        // Cut off: no majority answered the pings, and Raft says the same (as a follower no
        // leader replicated here, as the leader no quorum acknowledged), both for
        // `isolated_after`. Either alone can be a busy peer; both together are a cut.
        let pings_lost = failed_rounds >= 2 && last_round.duration_since(majority_at) >= inner.liveness.isolated_after;
        let raft_lost = pings_lost && {
            let leading = inner.raft.metrics().borrow().state == openraft::ServerState::Leader;
            if leading {
                // A leader asks a quorum to confirm it (its metrics are only published on a
                // change, so their age of the last quorum ack can be stale).
                let confirmed = tokio::time::timeout(PING_TIMEOUT, inner.raft.ensure_linearizable()).await;
                !matches!(confirmed, Ok(Ok(_)))
            } else {
                inner.liveness.leader_contact.lock().expect("contact lock").elapsed() >= inner.liveness.isolated_after
            }
        };
        let isolated = pings_lost && raft_lost;
        let was = *inner.liveness.isolated.borrow();
        if isolated != was {
            inner.liveness.isolated.send_replace(isolated);
            if isolated {
                isolated_at_ms = now_ms();
                tracing::error!(reached, voters = voters.len(), "cut off from the majority: stopping this node's VMs");
            } else {
                let message = format!(
                    "{me} was cut off from the majority for {} ms and stopped its VMs",
                    now_ms().saturating_sub(isolated_at_ms)
                );
                tracing::warn!("{message}");
                record_event(Cluster::from_inner(&inner), EventKind::NodeIsolated, message);
            }
        }
        rounds += 1;
        if rounds % CAPACITY_EVERY_ROUNDS == 1 && state.nodes.contains_key(&me) {
            let capacity = local_capacity();
            if state.capacity.get(&me) != Some(&capacity) && capacity.memory_bytes > 0 {
                let cluster = Cluster::from_inner(&inner);
                tokio::spawn(async move {
                    let command = ClusterCommand::ReportCapacity { node: me, capacity };
                    if let Err(e) = cluster.propose(command).await {
                        tracing::debug!(error = %e, "reporting this node's capacity failed; will try again");
                    }
                });
            }
        }
    }
}

/// Proposes an event, in the background and best effort.
pub(crate) fn record_event(cluster: Cluster, kind: EventKind, message: String) {
    tokio::spawn(async move {
        let command = ClusterCommand::RecordEvent { at_ms: now_ms(), kind, message };
        if let Err(e) = cluster.propose(command).await {
            tracing::debug!(error = %e, "recording an event failed");
        }
    });
}

/// What this machine offers to VMs: its CPUs and memory.
fn local_capacity() -> Capacity {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(usize::from(u16::MAX)) as u16;
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0);
    Capacity { cpus, memory_bytes }
}

/// The leader's duties, each ping round: declare nodes down (and up again), say when one
/// was slow, and move the HA VMs of the nodes that are down.
pub(crate) async fn leader_loop(inner: Weak<Inner>) {
    let mut ticker = tokio::time::interval(LEADER_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When each node was last heard from, as of the previous round: a jump of more than
    // half the down time is a silence worth telling, if it did not end in a failover.
    let mut heard: HashMap<NodeId, Instant> = HashMap::new();
    // Since when each node has been heard by no majority of the voters.
    let mut minority_since: HashMap<NodeId, Instant> = HashMap::new();
    let mut unplaced_told: HashSet<(VmId, NodeId)> = HashSet::new();
    // When this leader first saw each node in the state: a node that just joined has had no
    // time to be heard, and its silence counts from then.
    let mut known_since: HashMap<NodeId, Instant> = HashMap::new();
    let mut last_tick = Instant::now();
    let mut judging_since = Instant::now();
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        // This loop itself ran late (the process stalled): what it knows is old.
        if now.duration_since(last_tick) > STALL {
            judging_since = now;
        }
        last_tick = now;
        let cluster = Cluster::from_inner(&inner);
        let me = inner.node.id;
        let (leading, voters) = {
            let metrics = inner.raft.metrics().borrow().clone();
            let voters: BTreeSet<u64> = metrics.membership_config.membership().voter_ids().collect();
            (metrics.current_leader == Some(me.0) && metrics.state == openraft::ServerState::Leader, voters)
        };
        let state = cluster.state();
        if !leading || state.cluster.is_none() {
            heard.clear();
            minority_since.clear();
            known_since.clear();
            continue;
        }
        known_since.retain(|node, _| state.nodes.contains_key(node));
        for &node in state.nodes.keys() {
            known_since.entry(node).or_insert(now);
        }
        if state.is_down(me) {
            propose(&cluster, ClusterCommand::MarkNodeUp { node: me, at_ms: now_ms() }).await;
        }
        // The Raft membership follows the state.
        cluster.reconcile_membership().await;
        // Silence before this node's own stall, or before it started, counts for nothing.
        let steady_since = inner.liveness.steady_since().max(judging_since);
        let down_after = inner.liveness.down_after;
        for &node in state.nodes.keys().filter(|&&n| n != me) {
            let steady_since = steady_since.max(known_since[&node]);
            let (last, heard_by) = last_heard(&inner, node, down_after);
            let silent = now.duration_since(last.unwrap_or(steady_since).max(steady_since));
            let with_itself = heard_by + usize::from(voters.contains(&node.0));
            let minority = !voters.is_empty() && with_itself * 2 <= voters.len();
            let minority_for = if minority {
                let since = *minority_since.entry(node).or_insert(now);
                now.duration_since(since.max(steady_since))
            } else {
                minority_since.remove(&node);
                Duration::ZERO
            };
            // A silence that spans this node's own stall is this node's: it tells that itself.
            let gap = match (heard.get(&node), last) {
                (Some(before), Some(last)) if last > *before && *before >= steady_since => {
                    Some(last.duration_since(*before))
                }
                _ => None,
            };
            if let Some(last) = last {
                heard.insert(node, last);
            }
            if state.is_down(node) {
                // Up again only on a fresh answer heard by a majority.
                let answered = last.is_some_and(|l| now.duration_since(l) < PING_INTERVAL * 2);
                if answered && !minority {
                    propose(&cluster, ClusterCommand::MarkNodeUp { node, at_ms: now_ms() }).await;
                }
                continue;
            }
            if silent >= down_after || minority_for >= down_after {
                let silent_ms = silent.max(minority_for).as_millis() as u64;
                tracing::warn!(%node, silent_ms, heard_by, "declaring a node down");
                propose(&cluster, ClusterCommand::MarkNodeDown { node, at_ms: now_ms(), silent_ms }).await;
            } else if let Some(gap) = gap.filter(|gap| *gap >= down_after / 2) {
                let message = format!(
                    "{node} was not heard from for {} ms, then was (down after {} ms): no failover",
                    gap.as_millis(),
                    down_after.as_millis()
                );
                propose(&cluster, ClusterCommand::RecordEvent { at_ms: now_ms(), kind: EventKind::NodeSlow, message })
                    .await;
            }
        }
        let state = cluster.state();
        let plan = policy::failover_plan(&state, |n| cluster.is_up(n));
        for moved in plan.moves {
            let name = state.vms.get(&moved.vm).map(|v| v.spec.name.clone()).unwrap_or_default();
            tracing::warn!(vm = %name, from = %moved.from, to = %moved.to, "restarting an HA VM of a node that is down");
            let command = ClusterCommand::FailoverVm { vm: moved.vm, from: moved.from, to: moved.to, at_ms: now_ms() };
            propose(&cluster, command).await;
        }
        // Drained nodes: their VMs are stopped there and started elsewhere (a forced move,
        // until live migration exists).
        let mut unplaced = plan.unplaced;
        for &node in &state.drained {
            let drain = policy::drain_plan(&state, node, |n| cluster.is_up(n));
            for moved in drain.moves {
                let name = state.vms.get(&moved.vm).map(|v| v.spec.name.clone()).unwrap_or_default();
                tracing::info!(vm = %name, from = %node, to = %moved.to, "moving a VM off a drained node");
                let command =
                    ClusterCommand::MoveOffDrained { vm: moved.vm, from: node, to: moved.to, at_ms: now_ms() };
                propose(&cluster, command).await;
            }
            unplaced.extend(drain.unplaced);
        }
        // Moves whose guest shut down on the node it leaves: it starts on its new node.
        let finishing = policy::finish_moves(&state, |n| cluster.is_up(n));
        for moved in finishing.moves {
            let command = ClusterCommand::FinishMove { vm: moved.vm, to: moved.to, at_ms: now_ms() };
            propose(&cluster, command).await;
        }
        unplaced.extend(finishing.unplaced);
        unplaced_told.retain(|(vm, from)| unplaced.iter().any(|u| u.vm == *vm && u.from == *from));
        for unplaced in unplaced {
            if unplaced_told.insert((unplaced.vm, unplaced.from)) {
                let name = state.vms.get(&unplaced.vm).map(|v| v.spec.name.clone()).unwrap_or_default();
                let message = format!("VM {name} of {} cannot restart: {}", unplaced.from, unplaced.reason);
                let command = ClusterCommand::RecordEvent { at_ms: now_ms(), kind: EventKind::VmUnplaced, message };
                propose(&cluster, command).await;
            }
        }
    }
}

/// When anyone last heard from `node` (this node's own pings, or the reports of the nodes
/// that answered it), and how many of the others heard it within `within`. A node that
/// only the leader cannot reach (an asymmetric cut) is not down: the others still see it,
/// and its VMs keep running there; a node that only a minority hears is cut off, and stops
/// its VMs itself.
fn last_heard(inner: &Inner, node: NodeId, within: Duration) -> (Option<Instant>, usize) {
    let seen = inner.seen.lock().expect("seen lock");
    let own = seen.get(&node).map(|(at, _)| *at);
    let relayed: Vec<Instant> = seen
        .iter()
        .filter(|(peer, (at, _))| **peer != node && at.elapsed() < within)
        .filter_map(|(_, (at, report))| at.checked_sub(Duration::from_millis(*report.heard_ms_ago.get(&node)?)))
        .collect();
    let heard_by = own.iter().chain(&relayed).filter(|at| at.elapsed() < within).count();
    (own.into_iter().chain(relayed).max(), heard_by)
}

async fn propose(cluster: &Cluster, command: ClusterCommand) {
    if let Err(e) = cluster.propose_as_leader(command.clone()).await {
        tracing::warn!(?command, error = %e, "the leader's proposal failed");
    }
}
