//! The PostgreSQL backend: one database shared by every hub. A commit locks
//! the rows of the topics it writes (in name order, so two hubs committing
//! overlapping batches cannot deadlock), evaluates against the locked rows,
//! and writes each touched row once. Versions are therefore assigned by the
//! database, identical for every hub, and safe under concurrent publishes.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row as _};

use super::{Row, Write, WriteResult, evaluate_batch};
use crate::topic::{Epoch, Snapshot};

/// A pool on the shared database.
#[derive(Clone, Debug)]
pub(super) struct Db {
    pool: PgPool,
}

impl Db {
    pub(super) async fn open(url: &str) -> Result<Self, sqlx::Error> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.application_name("spillway");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            // While the database is unreachable a publish must fail fast
            // with 503, not hang.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }

    pub(super) async fn load_all(&self) -> Result<Vec<Snapshot>, sqlx::Error> {
        super::loaded_snapshots(sqlx::query(super::LOAD_ALL).fetch_all(&self.pool).await?)
    }

    /// Locks, evaluates and writes one batch in one transaction.
    pub(super) async fn commit(&self, writes: &[&Write], now_ms: u64) -> Result<Vec<WriteResult>, sqlx::Error> {
        let mut names: Vec<&str> = writes.iter().map(|w| w.topic.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut tx = self.pool.begin().await?;
        // A name never written has no row to lock: insert a placeholder
        // (version 0) first, in name order, so that every hub locks the same
        // rows in the same order.
        sqlx::query(
            "INSERT INTO topics (name, epoch, version, updated_ms, state) \
             SELECT n, 0, 0, 0, NULL FROM unnest($1::text[]) AS n ORDER BY n ON CONFLICT (name) DO NOTHING",
        )
        .bind(&names)
        .execute(&mut *tx)
        .await?;
        let locked = sqlx::query(
            "SELECT name, epoch, version, state, stream_id FROM topics WHERE name = ANY($1) ORDER BY name FOR UPDATE",
        )
        .bind(&names)
        .fetch_all(&mut *tx)
        .await?;
        let mut rows: HashMap<&str, Option<Row>> = names.iter().map(|n| (*n, None)).collect();
        for r in locked {
            let name: String = r.try_get("name")?;
            let version = r.try_get::<i64, _>("version")? as u64;
            let Some(key) = names.iter().find(|n| **n == name) else { continue };
            if version == 0 {
                continue;
            }
            rows.insert(
                key,
                Some(Row {
                    epoch: Epoch::from_u64(r.try_get::<i64, _>("epoch")? as u64),
                    version,
                    state: r.try_get("state")?,
                    stream_id: r.try_get::<Option<String>, _>("stream_id")?.and_then(|s| s.parse().ok()),
                }),
            );
        }
        let (results, touched) = evaluate_batch(writes, &mut rows, now_ms);
        for name in touched {
            let Some(Some(row)) = rows.get(name) else { continue };
            sqlx::query(
                "UPDATE topics SET epoch = $2, version = $3, updated_ms = $4, state = $5, stream_id = $6 WHERE name = $1",
            )
            .bind(name)
            .bind(row.epoch.as_u64() as i64)
            .bind(row.version as i64)
            .bind(now_ms as i64)
            .bind(row.state.as_deref())
            .bind(row.stream_id.map(|id| id.to_string()))
            .execute(&mut *tx)
            .await?;
        }
        // Placeholders of names whose writes were all refused are not topics.
        sqlx::query("DELETE FROM topics WHERE name = ANY($1) AND version = 0").bind(&names).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(results)
    }
}
