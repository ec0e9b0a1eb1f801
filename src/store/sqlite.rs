//! The SQLite backend: one file in the data directory, WAL with
//! `synchronous=FULL`, so a commit that returned survives `kill -9` and power
//! loss alike. One hub owns it.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row as _, Sqlite, SqlitePool};

use super::{Row, Write, WriteResult, evaluate_batch};
use crate::topic::{Epoch, Snapshot};

/// The database file's name inside the data directory.
pub(super) const FILE_NAME: &str = "spillway.db";

/// Names per `SELECT … IN (…)`: SQLite allows 32,766 bound parameters, and
/// a batch holds at most `MAX_BATCH` writes anyway.
const MAX_NAMES_PER_READ: usize = 1000;

/// Rows per multi-row `INSERT` (six parameters each).
const MAX_ROWS_PER_WRITE: usize = 1000;

/// A pool on the store's database.
#[derive(Clone, Debug)]
pub(super) struct Db {
    pool: SqlitePool,
}

impl Db {
    pub(super) async fn open(data_dir: &Path) -> Result<Self, sqlx::Error> {
        std::fs::create_dir_all(data_dir).map_err(sqlx::Error::Io)?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join(FILE_NAME))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        // One committer writes; the rest of the pool serves start-up reads.
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    pub(super) async fn load_all(&self) -> Result<Vec<Snapshot>, sqlx::Error> {
        super::loaded_snapshots(sqlx::query(super::LOAD_ALL).fetch_all(&self.pool).await?)
    }

    /// Evaluates `writes` in order inside one transaction and commits it.
    /// An `Err` means nothing was committed; an `Ok` carries one result per
    /// write (a rejected write changed nothing).
    pub(super) async fn commit(&self, writes: &[&Write], now_ms: u64) -> Result<Vec<WriteResult>, sqlx::Error> {
        // Four statements per commit whatever the batch size (begin, one
        // read of every touched row, one write of every changed row,
        // commit): each statement is a round trip to sqlx's SQLite thread,
        // and per-write round trips were what limited group commit.
        let mut tx = self.pool.begin().await?;
        let mut rows: HashMap<&str, Option<Row>> = HashMap::new();
        for write in writes {
            rows.entry(write.topic.as_str()).or_insert(None);
        }
        let names: Vec<&str> = rows.keys().copied().collect();
        for chunk in names.chunks(MAX_NAMES_PER_READ) {
            let mut read = QueryBuilder::<Sqlite>::new(
                "SELECT name, epoch, version, state, stream_id FROM topics WHERE name IN (",
            );
            let mut list = read.separated(", ");
            for name in chunk {
                list.push_bind(*name);
            }
            read.push(")");
            for r in read.build().fetch_all(&mut *tx).await? {
                let name: String = r.try_get("name")?;
                let row = Row {
                    epoch: Epoch::from_u64(r.try_get::<i64, _>("epoch")? as u64),
                    version: r.try_get::<i64, _>("version")? as u64,
                    state: r.try_get("state")?,
                    stream_id: r.try_get::<Option<String>, _>("stream_id")?.and_then(|s| s.parse().ok()),
                };
                if let Some(slot) = rows.get_mut(name.as_str()) {
                    *slot = Some(row);
                }
            }
        }
        let (results, touched) = evaluate_batch(writes, &mut rows, now_ms);
        // Only each touched topic's final row is written, however many
        // writes of the batch went to it.
        let changed: Vec<(&str, &Row)> =
            touched.iter().filter_map(|name| rows.get(name).and_then(Option::as_ref).map(|row| (*name, row))).collect();
        for chunk in changed.chunks(MAX_ROWS_PER_WRITE) {
            let mut upsert =
                QueryBuilder::<Sqlite>::new("INSERT INTO topics (name, epoch, version, updated_ms, state, stream_id) ");
            upsert.push_values(chunk, |mut values, (name, row)| {
                values
                    .push_bind(*name)
                    .push_bind(row.epoch.as_u64() as i64)
                    .push_bind(row.version as i64)
                    .push_bind(now_ms as i64)
                    .push_bind(row.state.as_deref())
                    .push_bind(row.stream_id.map(|id| id.to_string()));
            });
            upsert.push(
                " ON CONFLICT (name) DO UPDATE SET epoch = excluded.epoch, version = excluded.version, \
                 updated_ms = excluded.updated_ms, state = excluded.state, stream_id = excluded.stream_id",
            );
            upsert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(results)
    }
}
