//! The simulated cluster: nodes with one disk each, a Raft oracle, a lossy network that
//! delays and reorders, one volume and its owner writing to it. The decisions are the real
//! ones: `ClusterState::apply` for every Raft change, `replicas_of` for acting sets,
//! `admission::admit` on every replica, `verdict::verdict` on the writer. The glue around
//! them (messages, timers, dirty records, the activity log, resync, reconcile) follows the
//! engine's rules, one block of 512 bytes per write.

use crate::rng::Rng;
use model::{
    ClusterCommand, ClusterId, ClusterState, CommandOutcome, Disk, DiskId, ExtentIndex, Node, NodeId, OwnerEpoch,
    PgEpoch, PgId, PoolId, VolumeId, EXTENT_SIZE_BYTES,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use volume::admission::{admit, Admission, Gates};
use volume::verdict::{verdict, Answer, Verdict};
use volume::wire::{Op, Request, Status};

pub const VOLUME: VolumeId = VolumeId(0);
const CLUSTER: ClusterId = ClusterId(0x51);
const EXTENTS: u64 = 4;
const BLOCKS_PER_EXTENT: u32 = 4;
const BLOCK_BYTES: u32 = 512;
const QUEUE_DEPTH: usize = 4;
/// Ticks a replica may take to answer before the writer counts it failed.
const REPLICA_TIMEOUT: u64 = 12;
/// Ticks a write goes on before the writer gives up on it (and on itself).
const IO_WAIT: u64 = 120;
/// Ticks a replica waits to learn a newer epoch.
const EPOCH_WAIT: u64 = 20;
const DELAY_MAX: u64 = 6;

type Block = (ExtentIndex, u32);
type Version = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Canary {
    Off,
    /// A write of an old owner lands straight on a disk: the checkers must catch it.
    StaleOwnerWrite,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub step: usize,
    pub what: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub writes_acked: u64,
    pub writes_unknown: u64,
    pub faults: u64,
    pub owners: u64,
    pub resyncs: u64,
}

/// What survives a crash of its node.
struct DiskState {
    id: DiskId,
    node: NodeId,
    blocks: BTreeMap<Block, Version>,
    /// Owner epoch and version of the last owner write applied to each block.
    last_write: BTreeMap<Block, (OwnerEpoch, Version)>,
    newest_owner_applied: OwnerEpoch,
    dirty: BTreeSet<(PgId, Block)>,
    /// The activity log: owner epoch and newest write sequence (`u64::MAX`: not settleable).
    active: BTreeMap<Block, (OwnerEpoch, u64)>,
    failing: bool,
    slow: bool,
}

struct NodeState {
    id: NodeId,
    up: bool,
    isolated: bool,
    /// The cluster state this node has applied; behind the oracle's at times.
    view: ClusterState,
    owner_gate: OwnerEpoch,
    pg_gates: BTreeMap<PgId, PgEpoch>,
    /// Writes accepted and not yet on disk (a slow disk): they hold the gates.
    io: Vec<PendingIo>,
}

struct PendingIo {
    at: u64,
    request: Request,
    version: Version,
    write: u64,
    attempt: u64,
    from: NodeId,
}

#[derive(Clone, Debug)]
enum Body {
    Write {
        request: Request,
        version: Version,
        write: u64,
        attempt: u64,
        first_seen: Option<u64>,
    },
    Reply {
        write: u64,
        attempt: u64,
        disk: DiskId,
        answer: Answer,
    },
    /// The owner settled its writes below `seq` on `disk`.
    Settle {
        disk: DiskId,
        epoch: OwnerEpoch,
        seq: u64,
    },
}

struct Message {
    at: u64,
    from: NodeId,
    to: NodeId,
    body: Body,
}

struct WriteOp {
    block: Block,
    version: Version,
    attempt: u64,
    sent_at: PgEpoch,
    answers: BTreeMap<DiskId, Option<Answer>>,
    deadline: u64,
    started: u64,
    /// Waiting for the owner's view to reach this PG epoch before sending again.
    wait_for: Option<PgEpoch>,
}

struct Writer {
    node: NodeId,
    epoch: OwnerEpoch,
    writes: BTreeMap<u64, WriteOp>,
    busy: BTreeSet<Block>,
    stopped: bool,
}

pub struct World {
    rng: Rng,
    now: u64,
    step: usize,
    truth: ClusterState,
    nodes: Vec<NodeState>,
    disks: Vec<DiskState>,
    net: VecDeque<Message>,
    writer: Option<Writer>,
    next_write: u64,
    next_version: Version,
    acked: BTreeMap<Block, Version>,
    canary: Canary,
    canary_fired: bool,
    /// `SIM_TRACE=1` prints every event: how a failing seed is read.
    trace: bool,
    pub report: Report,
}

macro_rules! trace {
    ($world:expr, $($arg:tt)*) => {
        if $world.trace {
            eprintln!("[{:>5}] {}", $world.step, format!($($arg)*));
        }
    };
}

fn block_of(request: &Request) -> Block {
    (request.extent, request.offset_bytes / BLOCK_BYTES)
}

impl World {
    pub fn new(seed: u64, canary: Canary) -> Self {
        let mut rng = Rng::new(seed);
        let node_count = 3 + rng.below(2) as usize;
        let replicas = 2 + rng.below(2) as u8;
        let mut truth = ClusterState::default();
        let mut apply = |c: ClusterCommand| truth.apply(&c).expect("setup applies");
        apply(ClusterCommand::InitCluster { id: CLUSTER });
        let mut nodes = Vec::new();
        let mut disks = Vec::new();
        for i in 0..node_count as u64 {
            let (node, disk) = (NodeId(i + 1), DiskId(10 * (i + 1)));
            apply(ClusterCommand::AddNode(Node {
                id: node,
                api_addr: String::new(),
                data_addr: String::new(),
                cert_sha256: String::new(),
            }));
            apply(ClusterCommand::AddDisk(Disk {
                id: disk,
                node,
                path: String::new(),
                size_bytes: 1 << 30,
                extent_slots: 255,
            }));
            disks.push(DiskState {
                id: disk,
                node,
                blocks: BTreeMap::new(),
                last_write: BTreeMap::new(),
                newest_owner_applied: OwnerEpoch(0),
                dirty: BTreeSet::new(),
                active: BTreeMap::new(),
                failing: false,
                slow: false,
            });
        }
        // Every PG on `replicas` consecutive disks, starting at a different one each.
        let pgs = (0..4u64)
            .map(|pg| (0..u64::from(replicas)).map(|r| DiskId(10 * ((pg + r) % node_count as u64 + 1))).collect())
            .collect();
        let min_size = replicas - 1;
        apply(ClusterCommand::CreatePool { name: "p".into(), replicas, min_size, pgs });
        apply(ClusterCommand::CreateVolume {
            name: "v".into(),
            pool: PoolId(0),
            size_bytes: EXTENTS * EXTENT_SIZE_BYTES,
        });
        for disk in &disks {
            nodes.push(NodeState {
                id: disk.node,
                up: true,
                isolated: false,
                view: truth.clone(),
                owner_gate: OwnerEpoch(0),
                pg_gates: BTreeMap::new(),
                io: Vec::new(),
            });
        }
        let mut world = World {
            rng,
            now: 0,
            step: 0,
            truth,
            nodes,
            disks,
            net: VecDeque::new(),
            writer: None,
            next_write: 1,
            next_version: 1,
            acked: BTreeMap::new(),
            canary,
            canary_fired: false,
            trace: std::env::var_os("SIM_TRACE").is_some(),
            report: Report::default(),
        };
        world.new_owner();
        world
    }

    fn node(&mut self, id: NodeId) -> &mut NodeState {
        self.nodes.iter_mut().find(|n| n.id == id).expect("known node")
    }

    fn disk(&mut self, id: DiskId) -> &mut DiskState {
        self.disks.iter_mut().find(|d| d.id == id).expect("known disk")
    }

    fn reachable(&self, a: NodeId, b: NodeId) -> bool {
        let ok = |id: NodeId| self.nodes.iter().any(|n| n.id == id && n.up && !n.isolated);
        ok(a) && ok(b)
    }

    /// Proposes through the oracle: committed if the proposer is in touch with the majority.
    fn propose(&mut self, by: NodeId, command: ClusterCommand) -> Option<Result<CommandOutcome, model::CommandError>> {
        if !self.reachable(by, by) {
            return None;
        }
        let result = self.truth.apply(&command);
        trace!(self, "{by} proposes {command:?}: {result:?}");
        self.truth.check_invariants();
        let truth = self.truth.clone();
        self.node(by).view = truth;
        Some(result)
    }

    fn send(&mut self, from: NodeId, to: NodeId, body: Body) {
        let at = self.now + 1 + self.rng.below(DELAY_MAX);
        self.net.push_back(Message { at, from, to, body });
    }

    /// Runs `steps` steps with faults, then heals everything and runs to quiescence.
    pub fn run(&mut self, steps: usize) -> Result<(), Violation> {
        for _ in 0..steps {
            self.tick(true)?;
        }
        self.heal();
        for _ in 0..4000 {
            self.tick(false)?;
            if self.quiescent() {
                return self.check_converged();
            }
        }
        let writer = self.writer.as_ref().map(|w| (w.node, w.stopped, w.writes.len()));
        let degraded: Vec<_> =
            self.truth.pools[&PoolId(0)].pgs.iter().map(|pg| pg.out.keys().copied().collect::<Vec<_>>()).collect();
        let views = self.nodes.iter().filter(|n| n.view != self.truth).count();
        let stale_active: usize = self
            .disks
            .iter()
            .map(|d| d.active.values().filter(|(e, _)| *e < self.truth.volumes[&VOLUME].owner_epoch).count())
            .sum();
        Err(self.violation(format!(
            "the cluster did not settle after every fault healed: writer {writer:?}, messages {}, out {degraded:?}, stale views {views}, old activity {stale_active}",
            self.net.len()
        )))
    }

    fn violation(&self, what: String) -> Violation {
        Violation { step: self.step, what }
    }

    fn tick(&mut self, faults: bool) -> Result<(), Violation> {
        self.step += 1;
        self.now += 1;
        if faults {
            self.inject_fault();
            if self.canary == Canary::StaleOwnerWrite && !self.canary_fired && self.step > 200 {
                self.fire_canary()?;
            }
        }
        self.catch_up_views();
        self.finish_io()?;
        self.deliver()?;
        self.drive_writer(faults);
        self.resync();
        self.check_acked_on_acting()
    }

    fn inject_fault(&mut self) {
        let roll = self.rng.below(1000);
        let victim = self.rng.below(self.nodes.len() as u64) as usize;
        let healthy = self.nodes.iter().all(|n| n.up && !n.isolated);
        match roll {
            0..=4 if healthy => {
                trace!(self, "crash node {}", self.nodes[victim].id);
                self.report.faults += 1;
                let node = &mut self.nodes[victim];
                node.up = false;
                node.owner_gate = OwnerEpoch(0);
                node.pg_gates.clear();
                node.io.clear();
            }
            5..=9 if healthy => {
                trace!(self, "isolate node {}", self.nodes[victim].id);
                self.report.faults += 1;
                self.nodes[victim].isolated = true;
            }
            10..=39 => {
                for node in &mut self.nodes {
                    node.up = true;
                    node.isolated = false;
                }
            }
            40..=42 => {
                self.report.faults += 1;
                self.disks[victim].slow = !self.disks[victim].slow;
            }
            43..=44 => {
                self.report.faults += 1;
                self.disks[victim].failing = true;
            }
            45..=60 => self.disks[victim].failing = false,
            // A lost message.
            61..=70 if !self.net.is_empty() => {
                let at = self.rng.below(self.net.len() as u64) as usize;
                self.net.remove(at);
            }
            _ => {}
        }
    }

    fn heal(&mut self) {
        for node in &mut self.nodes {
            node.up = true;
            node.isolated = false;
        }
        for disk in &mut self.disks {
            disk.failing = false;
            disk.slow = false;
        }
    }

    fn catch_up_views(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].up && !self.nodes[i].isolated && self.nodes[i].view != self.truth && self.rng.chance(40) {
                self.nodes[i].view = self.truth.clone();
            }
        }
    }

    /// Slow disks finish their writes.
    fn finish_io(&mut self) -> Result<(), Violation> {
        for i in 0..self.nodes.len() {
            let node_id = self.nodes[i].id;
            let (due, keep): (Vec<_>, Vec<_>) = self.nodes[i].io.drain(..).partition(|io| io.at <= self.now);
            self.nodes[i].io = keep;
            for io in due {
                self.apply_write(&io.request, io.version)?;
                let body = Body::Reply {
                    write: io.write,
                    attempt: io.attempt,
                    disk: io.request.disk,
                    answer: Answer::Durable,
                };
                self.send(node_id, io.from, body);
            }
        }
        Ok(())
    }

    fn deliver(&mut self) -> Result<(), Violation> {
        let mut index = 0;
        while index < self.net.len() {
            if self.net[index].at > self.now {
                index += 1;
                continue;
            }
            let message = self.net.remove(index).expect("in range");
            if !self.reachable(message.from, message.to) {
                continue; // dropped: the sender times out
            }
            match message.body {
                Body::Write { .. } => self.replica_receives(message)?,
                Body::Settle { disk, epoch, seq } => {
                    let current = self
                        .nodes
                        .iter()
                        .find(|n| n.id == message.to)
                        .and_then(|n| n.view.volumes.get(&VOLUME))
                        .map(|v| v.owner_epoch);
                    if current == Some(epoch) {
                        trace!(self, "{disk} settles {epoch} below {seq}");
                        self.disk(disk).active.retain(|_, (e, newest)| !(*e == epoch && *newest < seq));
                    }
                }
                Body::Reply { write, attempt, disk, answer } => {
                    self.writer_receives(message.to, write, attempt, disk, answer)
                }
            }
        }
        Ok(())
    }

    /// A replica's side: the real admission decision, then dirty and activity records, then
    /// the disk (now, or later on a slow disk, holding the gates).
    fn replica_receives(&mut self, message: Message) -> Result<(), Violation> {
        let Body::Write { request, version, write, attempt, first_seen } = message.body else { unreachable!() };
        let node_id = message.to;
        let disk_node = self.disks.iter().find(|d| d.id == request.disk).map(|d| d.node);
        let local = disk_node == Some(node_id);
        let node = self.nodes.iter().find(|n| n.id == node_id).expect("known node");
        let pg_gate = node.pg_gates.get(&request.pg).copied().unwrap_or_default();
        let gates = Gates { owner_epoch: node.owner_gate, pg_epoch: pg_gate };
        let pending_older = node.io.iter().any(|io| {
            io.request.owner_epoch < request.owner_epoch
                || (io.request.pg == request.pg && io.request.pg_epoch < request.pg_epoch)
        });
        let reply = |status: Status, node: &NodeState| {
            let volume = node.view.volumes.get(&VOLUME);
            let owner = volume.map(|v| v.owner_epoch).unwrap_or_default();
            let pg_epoch = node.view.pools[&PoolId(0)].pgs[request.pg.0 as usize].epoch;
            match status {
                Status::Ok => Answer::Durable,
                Status::StaleOwnerEpoch => Answer::Fenced { current: owner },
                Status::StalePgEpoch | Status::Out => Answer::NewerPgEpoch(pg_epoch),
                other => Answer::Failed { reason: format!("{other:?}") },
            }
        };
        let answer = match admit(&request, local, &node.view, gates) {
            Admission::WaitForState => {
                let first = first_seen.unwrap_or(self.now);
                if self.now - first < EPOCH_WAIT {
                    let body = Body::Write { request, version, write, attempt, first_seen: Some(first) };
                    self.net.push_back(Message { at: self.now + 1, from: message.from, to: node_id, body });
                    return Ok(());
                }
                reply(Status::EpochUnknown, node)
            }
            Admission::Refuse(refusal) => reply(refusal.status, node),
            Admission::Accept { .. } if pending_older => {
                // Raising a gate waits out the older writes still on the disk.
                let body = Body::Write { request, version, write, attempt, first_seen };
                self.net.push_back(Message { at: self.now + 1, from: message.from, to: node_id, body });
                return Ok(());
            }
            Admission::Accept { record_dirty, .. } => {
                let block = block_of(&request);
                let n = self.node(node_id);
                n.owner_gate = n.owner_gate.max(request.owner_epoch);
                let gate = n.pg_gates.entry(request.pg).or_default();
                *gate = (*gate).max(request.pg_epoch);
                let disk = self.disk(request.disk);
                if disk.failing {
                    Answer::Failed { reason: "device error".into() }
                } else {
                    if record_dirty {
                        disk.dirty.insert((request.pg, block));
                    }
                    let entry = disk.active.entry(block).or_insert((request.owner_epoch, request.seq));
                    *entry = match entry.0.cmp(&request.owner_epoch) {
                        std::cmp::Ordering::Equal => (entry.0, entry.1.max(request.seq)),
                        // An older owner's entry relabelled: only reconcile or resync remove it.
                        std::cmp::Ordering::Less => (request.owner_epoch, u64::MAX),
                        std::cmp::Ordering::Greater => *entry,
                    };
                    if disk.slow {
                        let at = self.now + REPLICA_TIMEOUT / 2 + self.rng.below(REPLICA_TIMEOUT * 2);
                        let from = message.from;
                        self.node(node_id).io.push(PendingIo { at, request, version, write, attempt, from });
                        return Ok(());
                    }
                    self.apply_write(&request, version)?;
                    Answer::Durable
                }
            }
        };
        self.send(node_id, message.from, Body::Reply { write, attempt, disk: request.disk, answer });
        Ok(())
    }

    /// An owner's write lands on a disk: fencing and overlap order are checked here.
    fn apply_write(&mut self, request: &Request, version: Version) -> Result<(), Violation> {
        let step = self.step;
        let disk = self.disk(request.disk);
        let block = block_of(request);
        if request.owner_epoch < disk.newest_owner_applied {
            return Err(Violation {
                step,
                what: format!(
                    "fencing: {} applied a write of {} after one of {}",
                    disk.id, request.owner_epoch, disk.newest_owner_applied
                ),
            });
        }
        if let Some((epoch, last)) = disk.last_write.get(&block) {
            if *epoch == request.owner_epoch && *last > version {
                return Err(Violation {
                    step,
                    what: format!("overlap order: {} applied version {version} of {block:?} after {last}", disk.id),
                });
            }
        }
        disk.newest_owner_applied = request.owner_epoch;
        disk.last_write.insert(block, (request.owner_epoch, version));
        disk.blocks.insert(block, version);
        let id = disk.id;
        trace!(self, "{id} applies v{version} of {block:?} ({} {})", request.owner_epoch, request.pg_epoch);
        Ok(())
    }

    fn writer_receives(&mut self, to: NodeId, write: u64, attempt: u64, disk: DiskId, answer: Answer) {
        let Some(writer) = self.writer.as_mut().filter(|w| w.node == to) else { return };
        if let Some(op) = writer.writes.get_mut(&write).filter(|op| op.attempt == attempt) {
            if let Some(slot) = op.answers.get_mut(&disk) {
                *slot = Some(answer);
            }
        }
    }

    /// The owner: issues writes, times out replicas, and acts on each verdict.
    fn drive_writer(&mut self, issue: bool) {
        let writer_down = self.writer.as_ref().is_none_or(|w| !self.nodes.iter().any(|n| n.id == w.node && n.up));
        if writer_down || self.writer.as_ref().is_some_and(|w| w.stopped && w.writes.is_empty()) {
            if self.rng.chance(5) {
                if let Some(old) = &self.writer {
                    self.report.writes_unknown += old.writes.len() as u64;
                }
                self.new_owner();
            }
            return;
        }
        let writer_node = self.writer.as_ref().expect("checked").node;
        if issue && self.writer.as_ref().is_some_and(|w| !w.stopped && w.writes.len() < QUEUE_DEPTH) {
            let block = (ExtentIndex(self.rng.below(EXTENTS)), self.rng.below(u64::from(BLOCKS_PER_EXTENT)) as u32);
            if !self.writer.as_ref().expect("checked").busy.contains(&block) {
                let (id, version) = (self.next_write, self.next_version);
                self.next_write += 1;
                self.next_version += 1;
                let op = WriteOp {
                    block,
                    version,
                    attempt: 0,
                    sent_at: PgEpoch(0),
                    answers: BTreeMap::new(),
                    deadline: 0,
                    started: self.now,
                    wait_for: None,
                };
                let writer = self.writer.as_mut().expect("checked");
                writer.busy.insert(block);
                writer.writes.insert(id, op);
                self.send_attempt(id);
            }
        }
        let ids: Vec<u64> = self.writer.as_ref().expect("checked").writes.keys().copied().collect();
        for id in ids {
            self.advance_write(writer_node, id);
        }
        self.settle(writer_node);
    }

    /// Now and then the live owner settles its writes older than the oldest in flight on
    /// every acting disk (a stopped writer settles nothing).
    fn settle(&mut self, node: NodeId) {
        let writer = self.writer.as_ref().expect("a writer");
        if writer.stopped || !self.rng.chance(5) {
            return;
        }
        let below = writer.writes.keys().next().copied().unwrap_or(self.next_write);
        let epoch = writer.epoch;
        let acting: BTreeSet<DiskId> = self.truth.pools[&PoolId(0)].pgs.iter().flat_map(|pg| pg.acting()).collect();
        for disk in acting {
            let to = self.disks.iter().find(|d| d.id == disk).unwrap().node;
            self.send(node, to, Body::Settle { disk, epoch, seq: below });
        }
    }

    /// Sends write `id` to the acting set in the owner's view.
    fn send_attempt(&mut self, id: u64) {
        let writer = self.writer.as_ref().expect("a writer");
        let (node, epoch) = (writer.node, writer.epoch);
        let view = self.nodes.iter().find(|n| n.id == node).expect("known").view.clone();
        let op = writer.writes.get(&id).expect("known write");
        let block = op.block;
        let volume = view.volumes[&VOLUME].clone();
        let set = volume::replicas_of(&view, &volume, block.0).expect("the pool exists");
        let attempt = op.attempt + 1;
        let version = op.version;
        let op = self.writer.as_mut().expect("a writer").writes.get_mut(&id).expect("known");
        op.attempt = attempt;
        op.sent_at = set.pg_epoch;
        op.deadline = self.now + REPLICA_TIMEOUT;
        op.wait_for = None;
        op.answers = set.replicas.iter().map(|r| (r.disk, None)).collect();
        for replica in &set.replicas {
            let request = Request {
                op: Op::Write,
                resync: false,
                id: attempt,
                volume: VOLUME,
                extent: block.0,
                offset_bytes: block.1 * BLOCK_BYTES,
                len_bytes: BLOCK_BYTES,
                owner_epoch: epoch,
                pg: set.pg,
                pg_epoch: set.pg_epoch,
                disk: replica.disk,
                cluster: set.cluster,
                seq: id,
            };
            let body = Body::Write { request, version, write: id, attempt, first_seen: None };
            self.send(node, replica.node, body);
        }
    }

    fn advance_write(&mut self, node: NodeId, id: u64) {
        let now = self.now;
        let view_epoch = |world: &World, block: Block| {
            let view = &world.nodes.iter().find(|n| n.id == node).expect("known").view;
            view.pools[&PoolId(0)].pg_for(VOLUME, block.0).1.epoch
        };
        let op = self.writer.as_ref().expect("a writer").writes.get(&id).expect("known");
        if let Some(at_least) = op.wait_for {
            if view_epoch(self, op.block) >= at_least {
                self.send_attempt(id);
            } else if now > op.started + IO_WAIT {
                self.give_up(id);
            }
            return;
        }
        let complete = op.answers.values().all(Option::is_some);
        if !complete && now < op.deadline {
            return;
        }
        let answers: Vec<(DiskId, Answer)> = op
            .answers
            .iter()
            .map(|(d, a)| (*d, a.clone().unwrap_or(Answer::Failed { reason: "no answer in time".into() })))
            .collect();
        let (block, sent_at, version) = (op.block, op.sent_at, op.version);
        let min_size = self.truth.pools[&PoolId(0)].min_size;
        if answers.is_empty() {
            self.give_up(id);
            return;
        }
        let decided = verdict(sent_at, min_size, &answers);
        if !matches!(decided, Verdict::Acknowledge) {
            trace!(self, "write v{version} of {block:?} at {sent_at}: {decided:?}");
        }
        match decided {
            Verdict::Acknowledge => {
                let writer = self.writer.as_mut().expect("a writer");
                writer.writes.remove(&id);
                writer.busy.remove(&block);
                self.acked.insert(block, version);
                self.report.writes_acked += 1;
                trace!(self, "ack v{version} of {block:?} at {sent_at}: {answers:?}");
            }
            Verdict::Fenced { .. } => {
                let writer = self.writer.as_mut().expect("a writer");
                writer.stopped = true;
                self.give_up(id);
            }
            Verdict::Refresh { at_least } => self.wait(id, at_least),
            Verdict::TakeOut { seen, disks } => {
                let pg = self.truth.pools[&PoolId(0)].pg_for(VOLUME, block.0).0;
                for (disk, reason) in disks {
                    let command = ClusterCommand::TakeReplicaOut { pool: PoolId(0), pg, disk, seen, reason };
                    self.propose(node, command);
                }
                self.wait(id, PgEpoch(seen.0 + 1));
            }
            Verdict::BelowMinSize { .. } => self.wait(id, PgEpoch(sent_at.0 + 1)),
        }
    }

    fn wait(&mut self, id: u64, at_least: PgEpoch) {
        let now = self.now;
        let op = self.writer.as_mut().expect("a writer").writes.get_mut(&id).expect("known");
        if now > op.started + IO_WAIT {
            self.give_up(id);
            return;
        }
        op.wait_for = Some(at_least);
    }

    /// The write's outcome stays unknown; the writer stops (its range cannot be trusted to
    /// any later write) and a new owner takes over.
    fn give_up(&mut self, id: u64) {
        let writer = self.writer.as_mut().expect("a writer");
        if let Some(op) = writer.writes.remove(&id) {
            writer.busy.remove(&op.block);
            self.report.writes_unknown += 1;
        }
        writer.stopped = true;
    }

    /// A new owner on a node in touch with the majority: acquire, then reconcile what older
    /// owners wrote recently (fence each reachable acting disk, list, copy one version to
    /// all, forget).
    fn new_owner(&mut self) {
        let candidates: Vec<NodeId> = self.nodes.iter().filter(|n| n.up && !n.isolated).map(|n| n.id).collect();
        if candidates.is_empty() {
            return;
        }
        let node = candidates[self.rng.below(candidates.len() as u64) as usize];
        // Raising the gates waits out older writes still on slow disks.
        if self.nodes.iter().any(|n| !n.io.is_empty()) {
            return;
        }
        let acquire = ClusterCommand::AcquireVolume { volume: VOLUME, node, unless_vm_running: false };
        let Some(Ok(CommandOutcome::VolumeAcquired(epoch))) = self.propose(node, acquire) else { return };
        self.report.owners += 1;
        trace!(self, "new owner {node} at {epoch}");
        let pool = self.truth.pools[&PoolId(0)].clone();
        let acting: BTreeSet<DiskId> = pool.pgs.iter().flat_map(|pg| pg.acting()).collect();
        let reachable: Vec<DiskId> = acting
            .iter()
            .copied()
            .filter(|d| self.reachable(node, self.disks.iter().find(|x| x.id == *d).unwrap().node))
            .collect();
        // Each reachable disk is asked, per PG where it is acting, for what older owners wrote.
        let in_acting_pg =
            |pool: &model::Pool, disk: DiskId, block: &Block| pool.pg_for(VOLUME, block.0).1.is_acting(disk);
        let mut blocks = BTreeSet::new();
        for disk in &reachable {
            let owner = self.disks.iter().find(|d| d.id == *disk).unwrap().node;
            let n = self.node(owner);
            n.owner_gate = n.owner_gate.max(epoch);
            let d = self.disks.iter().find(|d| d.id == *disk).unwrap();
            blocks.extend(
                d.active.iter().filter(|(b, (e, _))| *e < epoch && in_acting_pg(&pool, *disk, b)).map(|(b, _)| *b),
            );
        }
        for block in blocks {
            let (pg, placement) = pool.pg_for(VOLUME, block.0);
            let holders: Vec<DiskId> = placement.acting().filter(|d| reachable.contains(d)).collect();
            let Some(first) = holders.first() else { continue };
            let version = self.disks.iter().find(|d| d.id == *first).unwrap().blocks.get(&block).copied();
            let degraded = self.truth.pools[&PoolId(0)].pgs[pg.0 as usize].is_degraded()
                || holders.len() < placement.acting().count();
            for disk in holders {
                let d = self.disk(disk);
                match version {
                    Some(v) => {
                        d.blocks.insert(block, v);
                    }
                    None => {
                        d.blocks.remove(&block);
                    }
                }
                d.newest_owner_applied = d.newest_owner_applied.max(epoch);
                d.last_write.insert(block, (epoch, version.unwrap_or(0)));
                if degraded {
                    d.dirty.insert((pg, block));
                }
            }
        }
        for disk in &reachable {
            let d = self.disks.iter_mut().find(|d| d.id == *disk).unwrap();
            d.active.retain(|b, (e, _)| *e >= epoch || !in_acting_pg(&pool, *disk, b));
        }
        // Replicas that could not be asked are taken out: they may differ. If one is a PG's
        // last acting replica, reconcile fails and no writer starts (a later owner tries again).
        let mut failed = false;
        for (index, pg) in pool.pgs.iter().enumerate() {
            for disk in pg.acting().filter(|d| !reachable.contains(d)) {
                let seen = self.truth.pools[&PoolId(0)].pgs[index].epoch;
                let reason = "not reachable by the new owner".to_string();
                let command =
                    ClusterCommand::TakeReplicaOut { pool: PoolId(0), pg: PgId(index as u32), disk, seen, reason };
                failed |= !matches!(self.propose(node, command), Some(Ok(_)));
            }
        }
        if failed {
            trace!(self, "reconcile by {node} at {epoch} failed: a replica it could not ask is needed");
            self.writer = None;
            return;
        }
        self.writer = Some(Writer { node, epoch, writes: BTreeMap::new(), busy: BTreeSet::new(), stopped: false });
    }

    /// Each PG's resync source brings a reachable out replica back: copies what it recorded
    /// and what the returning replica itself wrote for owners that moved on, then commits
    /// the replica in (as the frozen pass does, with no write of the PG in flight there).
    fn resync(&mut self) {
        let pool = self.truth.pools[&PoolId(0)].clone();
        for (index, pg) in pool.pgs.iter().enumerate() {
            let pg_id = PgId(index as u32);
            let Some(source) = pg.resync_source() else { continue };
            let Some(target) = pg.out.keys().next().copied() else { continue };
            let source_node = self.disks.iter().find(|d| d.id == source).unwrap().node;
            let target_node = self.disks.iter().find(|d| d.id == target).unwrap().node;
            // The source's freeze and the target's gate wait out writes of the PG still on
            // their disks.
            let busy = |node: NodeId| {
                self.nodes.iter().find(|n| n.id == node).unwrap().io.iter().any(|io| io.request.pg == pg_id)
            };
            let source_busy = busy(source_node) || busy(target_node);
            let source_view = &self.nodes.iter().find(|n| n.id == source_node).unwrap().view;
            let knows = source_view.pools[&PoolId(0)].pgs[index].epoch == pg.epoch;
            if !self.reachable(source_node, target_node) || source_busy || !knows || !self.rng.chance(20) {
                continue;
            }
            let owner_epoch = self.truth.volumes[&VOLUME].owner_epoch;
            let mut blocks: BTreeSet<Block> = self
                .disks
                .iter()
                .find(|d| d.id == source)
                .unwrap()
                .dirty
                .iter()
                .filter(|(p, _)| *p == pg_id)
                .map(|(_, b)| *b)
                .collect();
            let own = self.disks.iter().find(|d| d.id == target).unwrap();
            blocks.extend(
                own.active
                    .iter()
                    .filter(|(b, (e, _))| *e < owner_epoch && pool.pg_for(VOLUME, b.0).0 == pg_id)
                    .map(|(b, _)| *b),
            );
            trace!(self, "resync {pg_id} from {source} to {target}: {blocks:?}");
            // While another replica is still out, the target records the copies too (it may be
            // the PG's resync source later), as admission says.
            let others_out = pg.out.len() > 1;
            let current_owner = self.truth.volumes[&VOLUME].owner_epoch;
            for block in blocks {
                let version = self.disks.iter().find(|d| d.id == source).unwrap().blocks.get(&block).copied();
                let d = self.disk(target);
                match version {
                    Some(v) => d.blocks.insert(block, v),
                    None => d.blocks.remove(&block),
                };
                if others_out {
                    d.dirty.insert((pg_id, block));
                }
                // The copy may carry an unacknowledged write: on record, never settled.
                let entry = d.active.entry(block).or_insert((current_owner, u64::MAX));
                *entry = (entry.0.max(current_owner), u64::MAX);
            }
            let command = ClusterCommand::BringReplicaIn { pool: PoolId(0), pg: pg_id, disk: target, seen: pg.epoch };
            if let Some(Ok(_)) = self.propose(source_node, command) {
                self.report.resyncs += 1;
                let d = self.disk(target);
                d.active.retain(|b, (e, _)| *e >= owner_epoch || pool.pg_for(VOLUME, b.0).0 != pg_id);
                if !self.truth.pools[&PoolId(0)].pgs[index].is_degraded() {
                    for disk in &mut self.disks {
                        disk.dirty.retain(|(p, _)| *p != pg_id);
                    }
                }
            }
        }
    }

    fn fire_canary(&mut self) -> Result<(), Violation> {
        let candidate = self.disks.iter().position(|d| d.newest_owner_applied.0 > 0 && !d.last_write.is_empty());
        let Some(index) = candidate else { return Ok(()) };
        self.canary_fired = true;
        let disk = &self.disks[index];
        let block = *disk.last_write.keys().next().expect("checked");
        let stale = OwnerEpoch(disk.newest_owner_applied.0 - 1);
        let request = Request {
            op: Op::Write,
            resync: false,
            id: 0,
            volume: VOLUME,
            extent: block.0,
            offset_bytes: block.1 * BLOCK_BYTES,
            len_bytes: BLOCK_BYTES,
            owner_epoch: stale,
            pg: PgId(0),
            pg_epoch: PgEpoch(0),
            disk: disk.id,
            cluster: CLUSTER,
            seq: 0,
        };
        self.apply_write(&request, 0)
    }

    /// DESIGN invariants 1 and 2: every acting replica holds each block's latest acknowledged
    /// version or a newer one.
    fn check_acked_on_acting(&self) -> Result<(), Violation> {
        let pool = &self.truth.pools[&PoolId(0)];
        for (block, acked) in &self.acked {
            let (_, pg) = pool.pg_for(VOLUME, block.0);
            for disk in pg.acting() {
                let held = self.disks.iter().find(|d| d.id == disk).unwrap().blocks.get(block).copied().unwrap_or(0);
                if held < *acked {
                    return Err(self.violation(format!(
                        "no going back: acting {disk} holds version {held} of {block:?}, acknowledged {acked}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn quiescent(&self) -> bool {
        let writer_idle = self.writer.as_ref().is_some_and(|w| w.writes.is_empty() && !w.stopped);
        self.net.is_empty()
            && writer_idle
            && self.nodes.iter().all(|n| n.io.is_empty() && n.view == self.truth)
            && self.truth.pools[&PoolId(0)].pgs.iter().all(|pg| !pg.is_degraded())
    }

    /// Once everything healed and settled: every PG whole and its replicas identical.
    fn check_converged(&self) -> Result<(), Violation> {
        self.check_acked_on_acting()?;
        for (index, pg) in self.truth.pools[&PoolId(0)].pgs.iter().enumerate() {
            let copies: Vec<_> = pg
                .disks
                .iter()
                .map(|d| {
                    let disk = self.disks.iter().find(|x| x.id == *d).unwrap();
                    disk.blocks
                        .iter()
                        .filter(|(b, _)| self.truth.pools[&PoolId(0)].pg_for(VOLUME, b.0).0 == PgId(index as u32))
                        .collect::<Vec<_>>()
                })
                .collect();
            if copies.windows(2).any(|w| w[0] != w[1]) {
                return Err(self.violation(format!("replicas of pg-{index} differ after settling: {copies:?}")));
            }
        }
        Ok(())
    }
}
