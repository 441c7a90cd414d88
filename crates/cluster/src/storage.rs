//! The Raft log and the state machine, stored in one redb database under the data dir.
//!
//! The state machine is small (the cluster's metadata), so it is written whole, in the
//! same durable transaction as the position it was applied up to: after a crash it is
//! exactly the state of some applied prefix of the log.

// openraft's storage errors are large by its design; these functions return them as it does.
#![allow(clippy::result_large_err)]

use crate::types::{ApplyResult, RaftNode, TypeConfig};
use model::{ClusterState, CommandOutcome};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use tokio::sync::watch;

type StorageResult<T> = Result<T, StorageError<u64>>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_MACHINE: &str = "state_machine";
/// The newest snapshot: its metadata (JSON) and its data (the bytes as sent, raw).
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";

/// Opens (or creates) the database both stores share.
pub fn open_database(path: &std::path::Path) -> Result<Arc<Database>, redb::DatabaseError> {
    Database::create(path).map(Arc::new)
}

fn read_meta<T: DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, StorageIOError<u64>> {
    let tx = db.begin_read().map_err(|e| StorageIOError::read(&e))?;
    let table = match tx.open_table(META) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(StorageIOError::read(&e)),
    };
    let Some(value) = table.get(key).map_err(|e| StorageIOError::read(&e))? else {
        return Ok(None);
    };
    serde_json::from_slice(value.value()).map(Some).map_err(|e| StorageIOError::read(&e))
}

fn write_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> Result<(), StorageIOError<u64>> {
    let bytes = serde_json::to_vec(value).map_err(|e| StorageIOError::write(&e))?;
    write_raw(db, &[(key, &bytes)])
}

/// Writes every `(key, bytes)` in one transaction: all of them or none.
fn write_raw(db: &Database, values: &[(&str, &[u8])]) -> Result<(), StorageIOError<u64>> {
    let tx = db.begin_write().map_err(|e| StorageIOError::write(&e))?;
    {
        let mut table = tx.open_table(META).map_err(|e| StorageIOError::write(&e))?;
        for (key, bytes) in values {
            table.insert(*key, *bytes).map_err(|e| StorageIOError::write(&e))?;
        }
    }
    tx.commit().map_err(|e| StorageIOError::write(&e))
}

/// Reads every key of `keys` in one transaction: values written together read together.
fn read_raw<const N: usize>(db: &Database, keys: [&str; N]) -> Result<[Option<Vec<u8>>; N], StorageIOError<u64>> {
    let tx = db.begin_read().map_err(|e| StorageIOError::read(&e))?;
    let table = match tx.open_table(META) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok([const { None }; N]),
        Err(e) => return Err(StorageIOError::read(&e)),
    };
    let mut values = [const { None }; N];
    for (value, key) in values.iter_mut().zip(keys) {
        *value = table.get(key).map_err(|e| StorageIOError::read(&e))?.map(|v| v.value().to_vec());
    }
    Ok(values)
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> Self {
        LogStore { db }
    }

    fn last_entry_id(&self) -> Result<Option<LogId<u64>>, StorageIOError<u64>> {
        let tx = self.db.begin_read().map_err(|e| StorageIOError::read_logs(&e))?;
        let table = match tx.open_table(LOG) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(StorageIOError::read_logs(&e)),
        };
        let Some((_, value)) = table.last().map_err(|e| StorageIOError::read_logs(&e))? else {
            return Ok(None);
        };
        let entry: Entry<TypeConfig> =
            serde_json::from_slice(value.value()).map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(Some(entry.log_id))
    }

    fn remove(&self, range: impl RangeBounds<u64>) -> Result<(), StorageIOError<u64>> {
        let tx = self.db.begin_write().map_err(|e| StorageIOError::write_logs(&e))?;
        {
            let mut table = tx.open_table(LOG).map_err(|e| StorageIOError::write_logs(&e))?;
            table.retain_in(range, |_, _| false).map_err(|e| StorageIOError::write_logs(&e))?;
        }
        tx.commit().map_err(|e| StorageIOError::write_logs(&e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(&x) => x,
            Bound::Excluded(&x) => x + 1,
            Bound::Unbounded => 0,
        };
        let tx = self.db.begin_read().map_err(|e| StorageIOError::read_logs(&e))?;
        let table = match tx.open_table(LOG) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(StorageIOError::read_logs(&e).into()),
        };
        let mut entries = Vec::new();
        for item in table.range(start..).map_err(|e| StorageIOError::read_logs(&e))? {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            if !range.contains(&key.value()) {
                break;
            }
            entries.push(serde_json::from_slice(value.value()).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<u64>> = read_meta(&self.db, KEY_PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        Ok(write_meta(&self.db, KEY_VOTE, vote)?)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        Ok(read_meta(&self.db, KEY_VOTE)?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        Ok(write_meta(&self.db, KEY_COMMITTED, &committed)?)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        Ok(read_meta::<Option<LogId<u64>>>(&self.db, KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let tx = self.db.begin_write().map_err(|e| StorageIOError::write_logs(&e))?;
        {
            let mut table = tx.open_table(LOG).map_err(|e| StorageIOError::write_logs(&e))?;
            for entry in entries {
                let bytes = serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
                table.insert(entry.log_id.index, bytes.as_slice()).map_err(|e| StorageIOError::write_logs(&e))?;
            }
        }
        tx.commit().map_err(|e| StorageIOError::write_logs(&e))?;
        // redb's commit is durable (fsync) before it returns.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        Ok(self.remove(log_id.index..)?)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        write_meta(&self.db, KEY_PURGED, &log_id)?;
        Ok(self.remove(..=log_id.index)?)
    }
}

/// The applied state, as stored and as sent in snapshots.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Machine {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, RaftNode>,
    state: ClusterState,
    /// Outcomes of the latest proposals by id, oldest first, at most `PROPOSALS_REMEMBERED`.
    #[serde(default)]
    recent: std::collections::VecDeque<(u128, ApplyResult)>,
}

/// Proposals whose outcome the state machine remembers: far more than can be in flight.
const PROPOSALS_REMEMBERED: usize = 4096;

/// Applies committed commands to `ClusterState` and publishes each new state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    machine: Arc<tokio::sync::Mutex<Machine>>,
    published: Arc<watch::Sender<Arc<ClusterState>>>,
}

impl StateMachineStore {
    pub fn open(db: Arc<Database>) -> Result<(Self, watch::Receiver<Arc<ClusterState>>), StorageError<u64>> {
        let machine: Machine = read_meta(&db, KEY_MACHINE)?.unwrap_or_default();
        let (published, receiver) = watch::channel(Arc::new(machine.state.clone()));
        let store = StateMachineStore {
            db,
            machine: Arc::new(tokio::sync::Mutex::new(machine)),
            published: Arc::new(published),
        };
        Ok((store, receiver))
    }

    fn persist_and_publish(&self, machine: &Machine) -> Result<(), StorageIOError<u64>> {
        write_meta(&self.db, KEY_MACHINE, machine)?;
        self.published.send_replace(Arc::new(machine.state.clone()));
        Ok(())
    }

    /// Stores `data` as the newest snapshot, with the machine it was taken from or made into
    /// (one transaction: the stored snapshot is never behind the applied state after a crash).
    fn store_snapshot(&self, machine: &Machine, meta: &SnapshotMeta<u64, RaftNode>, data: &[u8]) -> StorageResult<()> {
        let machine_bytes = serde_json::to_vec(machine).map_err(|e| StorageIOError::write(&e))?;
        let meta_bytes = serde_json::to_vec(meta).map_err(|e| StorageIOError::write(&e))?;
        write_raw(
            &self.db,
            &[(KEY_MACHINE, &machine_bytes), (KEY_SNAPSHOT_META, &meta_bytes), (KEY_SNAPSHOT_DATA, data)],
        )?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // The machine stays locked until the snapshot is stored: a snapshot installed from
        // the leader meanwhile (newer) must not be overwritten by this one, or a restart
        // finds the log purged past its snapshot.
        let machine = self.machine.lock().await;
        let data = serde_json::to_vec(&*machine).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match machine.last_applied {
            Some(id) => format!("{}-{}", id.leader_id, id.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: machine.last_applied,
            last_membership: machine.membership.clone(),
            snapshot_id,
        };
        self.store_snapshot(&machine, &meta, &data)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, RaftNode>)> {
        let machine = self.machine.lock().await;
        Ok((machine.last_applied, machine.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<ApplyResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut machine = self.machine.lock().await;
        let mut results = Vec::new();
        for entry in entries {
            machine.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(CommandOutcome::Done),
                EntryPayload::Normal(proposal) => match machine.recent.iter().find(|(id, _)| *id == proposal.id) {
                    Some((_, first)) => first.clone(),
                    None => {
                        let result = machine.state.apply(&proposal.command);
                        if machine.recent.len() == PROPOSALS_REMEMBERED {
                            machine.recent.pop_front();
                        }
                        machine.recent.push_back((proposal.id, result.clone()));
                        result
                    }
                },
                EntryPayload::Membership(membership) => {
                    machine.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Ok(CommandOutcome::Done)
                }
            };
            results.push(result);
        }
        self.persist_and_publish(&machine)?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, RaftNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let mut incoming: Machine =
            serde_json::from_slice(&data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        if incoming.last_applied != meta.last_log_id {
            let e = std::io::Error::other(format!(
                "a snapshot whose data was taken at {:?} but whose metadata says {:?}",
                incoming.last_applied, meta.last_log_id
            ));
            return Err(StorageIOError::read_snapshot(Some(meta.signature()), &e).into());
        }
        incoming.last_applied = meta.last_log_id;
        incoming.membership = meta.last_membership.clone();
        let mut machine = self.machine.lock().await;
        *machine = incoming;
        // Under the machine lock, like `build_snapshot`: a snapshot being built meanwhile
        // (older) cannot overwrite this one.
        self.store_snapshot(&machine, meta, &data)?;
        self.published.send_replace(Arc::new(machine.state.clone()));
        let bytes = data.len();
        tracing::info!(last = ?meta.last_log_id, bytes, "installed a snapshot of the cluster state");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        // Metadata and data from one transaction: a snapshot stored meanwhile is seen whole
        // or not at all.
        let [meta, data] = read_raw(&self.db, [KEY_SNAPSHOT_META, KEY_SNAPSHOT_DATA])?;
        let (Some(meta), Some(data)) = (meta, data) else { return Ok(None) };
        let meta: SnapshotMeta<u64, RaftNode> =
            serde_json::from_slice(&meta).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Proposal;
    use model::{ClusterCommand, ClusterId, CommandError};
    use openraft::CommittedLeaderId;

    fn entry(index: u64, proposal: &Proposal) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(proposal.clone()),
        }
    }

    #[tokio::test]
    async fn a_retried_proposal_is_applied_once_and_answered_with_its_first_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_database(&dir.path().join("cluster.redb")).unwrap();
        let (mut machine, state) = StateMachineStore::open(db).unwrap();
        let init = Proposal { id: 1, command: ClusterCommand::InitCluster { id: ClusterId(5) } };

        let results = machine.apply([entry(1, &init), entry(2, &init)]).await.unwrap();
        let again = Proposal { id: 2, ..init };
        let fresh = machine.apply([entry(3, &again)]).await.unwrap();

        assert_eq!(
            results,
            vec![Ok(CommandOutcome::Done), Ok(CommandOutcome::Done)],
            "the repeat is not applied again"
        );
        assert_eq!(fresh, vec![Err(CommandError::AlreadyInitialized)], "a new id is applied");
        assert_eq!(state.borrow().cluster.as_ref().map(|c| c.id), Some(ClusterId(5)));
    }
}
