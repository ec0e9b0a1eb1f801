//! The durable store: assigns versions and acknowledges a write only after it
//! is committed. Concurrent writes share commits (group commit): one task
//! drains the queue of pending writes into one transaction per fsync. Two
//! backends: SQLite (one hub, the embedded default) and PostgreSQL (any
//! number of hubs; row locks make versions safe across them).

mod postgres;
mod sqlite;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::delta::apply_merge_patch;
use crate::topic::{Epoch, Position, Snapshot, TopicName};

/// The most writes one commit takes. Larger batches amortise the fsync
/// further but hold the first writer's answer back longer.
pub const MAX_BATCH: usize = 256;

/// How many writes may wait for the committer before publishers are made to
/// wait for room (back-pressure instead of an unbounded queue).
const QUEUE_DEPTH: usize = 4096;

/// How long one commit may take before its writes are answered 503. The
/// transaction may still commit afterwards; nothing was acknowledged, and the
/// hubs pick the version up when they reconcile.
const COMMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a write does to a topic's state.
#[derive(Debug, Clone)]
pub enum Change {
    /// Replace the state with this object.
    Put(Map<String, Value>),
    /// Apply this RFC 7396 merge patch to the stored object.
    Patch(Map<String, Value>),
    /// End the topic (a tombstone keeps its version).
    Delete,
}

/// A condition on the stored row, checked inside the committing transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// `If-Match: *`: the topic must exist.
    Exists,
    /// `If-Match: "EPOCH:VERSION"`: the topic must be at exactly this version.
    At(Position),
}

/// One write request.
#[derive(Debug, Clone)]
pub struct Write {
    /// The topic written.
    pub topic: TopicName,
    /// What to do to it.
    pub change: Change,
    /// An optional condition on the current row.
    pub precondition: Option<Precondition>,
    /// For writes ingested from a Redis stream: the entry's id. A write whose
    /// id is not above the last one applied to the topic is skipped, so a
    /// redelivered or reordered entry never applies twice or goes backwards.
    pub stream_id: Option<StreamId>,
}

impl Write {
    /// A write with no precondition and no stream id.
    pub fn new(topic: TopicName, change: Change) -> Self {
        Self { topic, change, precondition: None, stream_id: None }
    }
}

/// A Redis stream entry id, `MILLISECONDS-SEQUENCE`, ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    /// The millisecond part.
    pub ms: u64,
    /// The sequence part.
    pub seq: u64,
}

impl std::str::FromStr for StreamId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or(())?;
        Ok(Self { ms: ms.parse().map_err(|_| ())?, seq: seq.parse().map_err(|_| ())? })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why a write was not applied. Nothing was changed in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// `PATCH` or `DELETE` on a topic that does not exist (or was deleted).
    #[error("topic does not exist")]
    NotFound,
    /// `If-Match` did not hold; `current` is where the topic stands.
    #[error("precondition failed")]
    PreconditionFailed {
        /// The topic's live position, if it has one.
        current: Option<Position>,
    },
    /// A stream entry at or below the last one applied to the topic.
    #[error("stream entry already superseded")]
    Superseded,
    /// The store could not commit; the cause is logged, not shown.
    #[error("store unavailable")]
    Unavailable,
}

/// The committed outcome of a write, as a core snapshot ready for the hub.
pub type WriteResult = Result<Snapshot, WriteError>;

/// Counters about commits, read by `/metrics`.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Commits by batch size: bucket `i` counts batches of at most `2^i`
    /// writes (the last bucket takes the rest).
    pub batch_buckets: [AtomicU64; 10],
    /// Writes committed (including rejected ones evaluated in a commit).
    pub writes: AtomicU64,
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Commits that failed.
    pub errors: AtomicU64,
}

impl StoreStats {
    fn record_batch(&self, size: usize) {
        let bucket = (usize::BITS - size.saturating_sub(1).leading_zeros()) as usize;
        let bucket = bucket.min(self.batch_buckets.len() - 1);
        self.batch_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(size as u64, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    /// The upper bound of bucket `i` (inclusive), or `None` for the last one.
    pub fn bucket_bound(&self, i: usize) -> Option<u64> {
        (i + 1 < self.batch_buckets.len()).then(|| 1u64 << i)
    }
}

/// A write waiting for its commit.
struct Job {
    write: Write,
    reply: oneshot::Sender<WriteResult>,
}

/// The store's handle. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    /// The queue into the committer task; bounded, so a flood of publishes
    /// waits here instead of growing memory.
    jobs: mpsc::Sender<Job>,
    /// The database, for reads outside the committer (start-up load,
    /// reconciliation).
    db: Backend,
    /// Commit counters.
    stats: Arc<StoreStats>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("write", &self.write).finish_non_exhaustive()
    }
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the store: {0}")]
pub struct OpenError(#[from] pub sqlx::Error);

/// The database behind the store.
#[derive(Clone, Debug)]
enum Backend {
    /// One SQLite file (one hub).
    Sqlite(sqlite::Db),
    /// A PostgreSQL database (any number of hubs).
    Postgres(postgres::Db),
}

impl Backend {
    async fn commit(&self, writes: &[&Write], now_ms: u64) -> Result<Vec<WriteResult>, sqlx::Error> {
        match self {
            Self::Sqlite(db) => db.commit(writes, now_ms).await,
            Self::Postgres(db) => db.commit(writes, now_ms).await,
        }
    }

    async fn load_all(&self) -> Result<Vec<Snapshot>, sqlx::Error> {
        match self {
            Self::Sqlite(db) => db.load_all().await,
            Self::Postgres(db) => db.load_all().await,
        }
    }
}

impl Store {
    /// Opens (creating if needed) the SQLite database in `data_dir`, runs the
    /// migrations and starts the committer on `tasks`; it stops when
    /// `shutdown` fires, after answering what it already took.
    pub async fn open_sqlite(
        data_dir: &Path,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, OpenError> {
        let db = Backend::Sqlite(sqlite::Db::open(data_dir).await?);
        Ok(Self::start(db, tasks, shutdown))
    }

    /// Connects to PostgreSQL at `url`, runs the migrations and starts the
    /// committer, as `open_sqlite` does.
    pub async fn open_postgres(url: &str, tasks: &TaskTracker, shutdown: CancellationToken) -> Result<Self, OpenError> {
        let db = Backend::Postgres(postgres::Db::open(url).await?);
        Ok(Self::start(db, tasks, shutdown))
    }

    fn start(db: Backend, tasks: &TaskTracker, shutdown: CancellationToken) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(StoreStats::default());
        // The committer runs on a thread of its own. Each commit is several
        // round trips between it and the database driver; on the shared
        // runtime every one of them waited its turn behind the thousands of
        // reader tasks a publish wakes, which at 10k readers stretched a 2 ms
        // commit to tens of milliseconds. Shutdown still waits for it
        // through `tasks`.
        let (finished, committer_done) = tokio::sync::oneshot::channel::<()>();
        let committer = commit_loop(db.clone(), rx, Arc::clone(&stats), shutdown);
        let spawned = std::thread::Builder::new().name("spillway-commit".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(committer),
                Err(error) => tracing::error!(%error, "cannot start the committer's runtime"),
            }
            let _ = finished.send(());
        });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the committer thread; publishes will fail");
        }
        tasks.spawn(async move {
            let _ = committer_done.await;
        });
        Self { jobs, db, stats }
    }

    /// Whether this store can be shared by several hubs.
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Backend::Postgres(_))
    }

    /// Commits `write` and returns the new version. Resolves only after the
    /// commit is durable (or failed).
    pub async fn write(&self, write: Write) -> WriteResult {
        let (reply, answer) = oneshot::channel();
        if self.jobs.send(Job { write, reply }).await.is_err() {
            return Err(WriteError::Unavailable);
        }
        answer.await.unwrap_or(Err(WriteError::Unavailable))
    }

    /// Commits several writes in order (they share commits with everything
    /// else queued) and returns their results in the same order.
    pub async fn write_many(&self, writes: Vec<Write>) -> Vec<WriteResult> {
        let mut answers = Vec::with_capacity(writes.len());
        for write in writes {
            let (reply, answer) = oneshot::channel();
            // Enqueued one after another, so the committer sees them in order.
            if self.jobs.send(Job { write, reply }).await.is_err() {
                answers.push(None);
            } else {
                answers.push(Some(answer));
            }
        }
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(match answer {
                Some(answer) => answer.await.unwrap_or(Err(WriteError::Unavailable)),
                None => Err(WriteError::Unavailable),
            });
        }
        results
    }

    /// Every topic's newest row (live or tombstone), for warming the hub.
    pub async fn load_all(&self) -> Result<Vec<Snapshot>, sqlx::Error> {
        self.db.load_all().await
    }

    /// Commit counters.
    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.stats
    }
}

/// Takes writes off the queue in batches, one transaction per batch.
async fn commit_loop(db: Backend, mut rx: mpsc::Receiver<Job>, stats: Arc<StoreStats>, shutdown: CancellationToken) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            job = rx.recv() => job,
            () = shutdown.cancelled() => { rx.close(); rx.recv().await }
        };
        let Some(first) = first else { break };
        batch.push(first);
        // Whatever queued up while the previous commit was syncing rides
        // along in this one: that is the group commit.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let now_ms = now_ms();
        let writes: Vec<&Write> = batch.iter().map(|j| &j.write).collect();
        // A database that stops answering (a network cut that sends no reset)
        // must turn into 503s, not a committer stuck forever.
        let outcome = match tokio::time::timeout(COMMIT_TIMEOUT, db.commit(&writes, now_ms)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        };
        match outcome {
            Ok(results) => {
                stats.record_batch(batch.len());
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(error) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, writes = batch.len(), "commit failed; nothing in it was acknowledged");
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(WriteError::Unavailable));
                }
            }
        }
    }
    tracing::debug!("committer stopped");
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What a stored row says.
#[derive(Debug, Clone)]
struct Row {
    epoch: Epoch,
    version: u64,
    /// The state as JSON text; `None` for a tombstone. Parsed only when a
    /// merge patch needs it.
    state: Option<String>,
    /// The last stream entry applied to this topic, if any.
    stream_id: Option<StreamId>,
}

/// Evaluates a batch in order against `rows` (the current rows of every topic
/// the batch touches, `None` where none exists), updating `rows` as it goes.
/// Returns one result per write and the names whose rows changed.
fn evaluate_batch<'w>(
    writes: &[&'w Write],
    rows: &mut std::collections::HashMap<&'w str, Option<Row>>,
    now_ms: u64,
) -> (Vec<WriteResult>, Vec<&'w str>) {
    let mut results = Vec::with_capacity(writes.len());
    let mut touched: Vec<&str> = Vec::new();
    for write in writes {
        let name = write.topic.as_str();
        let current = rows.get(name).and_then(Option::as_ref);
        match evaluate(write, current) {
            Ok(next) => {
                let snapshot = match &next.state {
                    Some(state) => Snapshot::live(
                        write.topic.clone(),
                        next.epoch,
                        next.version,
                        now_ms,
                        bytes::Bytes::from(state.clone()),
                    ),
                    None => Snapshot::tombstone(write.topic.clone(), next.epoch, next.version, now_ms),
                };
                rows.insert(name, Some(next));
                if !touched.contains(&name) {
                    touched.push(name);
                }
                results.push(Ok(snapshot));
            }
            Err(rejected) => results.push(Err(rejected)),
        }
    }
    (results, touched)
}

/// Evaluates one write against the row as it stands inside the transaction.
/// Returns the new row (epoch, version, state or `None` for a tombstone).
fn evaluate(write: &Write, row: Option<&Row>) -> Result<Row, WriteError> {
    let to_text = |state: &Map<String, Value>| {
        serde_json::to_string(state).map_err(|error| {
            tracing::error!(%error, "cannot serialise a state");
            WriteError::Unavailable
        })
    };
    if let (Some(id), Some(last)) = (write.stream_id, row.and_then(|r| r.stream_id))
        && id <= last
    {
        return Err(WriteError::Superseded);
    }
    let stream_id = write.stream_id.or(row.and_then(|r| r.stream_id));
    let live = row.filter(|r| r.state.is_some());
    match (write.precondition, live) {
        (Some(Precondition::Exists), None) => return Err(WriteError::PreconditionFailed { current: None }),
        (Some(Precondition::At(want)), current) => {
            let current = current.map(|r| Position { epoch: r.epoch, version: r.version });
            if current != Some(want) {
                return Err(WriteError::PreconditionFailed { current });
            }
        }
        _ => {}
    }
    let next_version = row.map_or(1, |r| r.version + 1);
    match (&write.change, live) {
        (Change::Put(state), Some(live)) => {
            Ok(Row { epoch: live.epoch, version: next_version, state: Some(to_text(state)?), stream_id })
        }
        (Change::Put(state), None) => {
            Ok(Row { epoch: new_epoch(), version: next_version, state: Some(to_text(state)?), stream_id })
        }
        (Change::Patch(patch), Some(live)) => {
            let stored = live.state.as_deref().unwrap_or("{}");
            let mut state: Value = serde_json::from_str(stored).map_err(|error| {
                tracing::error!(%error, topic = %write.topic, "stored state is not JSON");
                WriteError::Unavailable
            })?;
            apply_merge_patch(&mut state, patch);
            let Value::Object(state) = state else {
                // A merge patch that is an object always leaves an object.
                return Err(WriteError::Unavailable);
            };
            Ok(Row { epoch: live.epoch, version: next_version, state: Some(to_text(&state)?), stream_id })
        }
        (Change::Delete, Some(live)) => Ok(Row { epoch: live.epoch, version: next_version, state: None, stream_id }),
        (Change::Patch(_) | Change::Delete, None) => Err(WriteError::NotFound),
    }
}

/// The query both backends load the hub with: every topic's newest row.
const LOAD_ALL: &str = "SELECT name, epoch, version, updated_ms, state FROM topics WHERE version > 0";

/// Decodes the rows of `LOAD_ALL`, from either backend.
fn loaded_snapshots<R>(rows: Vec<R>) -> Result<Vec<Snapshot>, sqlx::Error>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.extend(stored_snapshot(
            row.try_get("name")?,
            row.try_get("epoch")?,
            row.try_get("version")?,
            row.try_get("updated_ms")?,
            row.try_get("state")?,
        ));
    }
    Ok(out)
}

/// A stored row as a snapshot (live, or a tombstone when `state` is NULL);
/// `None`, with a warning, for a name that is not a valid topic name.
fn stored_snapshot(name: String, epoch: i64, version: i64, updated_ms: i64, state: Option<String>) -> Option<Snapshot> {
    let Ok(topic) = TopicName::parse(&name) else {
        tracing::warn!(name, "skipping a stored topic with an invalid name");
        return None;
    };
    // Integers are stored as the bit patterns of their unsigned values.
    let (epoch, version, updated_ms) = (Epoch::from_u64(epoch as u64), version as u64, updated_ms as u64);
    Some(match state {
        Some(state) => Snapshot::live(topic, epoch, version, updated_ms, bytes::Bytes::from(state)),
        None => Snapshot::tombstone(topic, epoch, version, updated_ms),
    })
}

/// A fresh random epoch for a newly created topic.
fn new_epoch() -> Epoch {
    // The OS random source failing is not something a publish can recover
    // from; fall back to time so creation still gets a distinct epoch.
    let raw = getrandom::u64()
        .unwrap_or_else(|_| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
    Epoch::from_u64(raw)
}

#[cfg(test)]
mod tests;
