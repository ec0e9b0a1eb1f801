//! Stream ingest: a writer service may push updates into a Redis stream
//! (`{prefix}:ingest`) instead of calling HTTP. Every hub reads it through
//! one consumer group, so each entry is taken by one hub, committed, and only
//! then acknowledged (`XACK`). Entries of dead consumers are reclaimed
//! (`XAUTOCLAIM`); an entry redelivered, or delivered after a newer one of
//! the same topic, is skipped by the store (it keeps the last applied entry
//! id per topic in the same transaction). The stream is kept bounded.
//!
//! Entry fields: `topic` (required), `op` = `put` (default) | `patch` |
//! `delete`, `state` (a JSON object; required for put and patch).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId as Entry, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, RedisResult, Value};
use serde_json::{Map, Value as Json};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, IngestDrop, RedisConfig};
use crate::store::{Change, Store, StreamId, Write, WriteError};
use crate::topic::{Hub, TopicName};

/// Entries taken per read.
const BATCH: usize = 256;
/// How long an entry may sit unacknowledged with a consumer before another
/// hub takes it over.
const RECLAIM_IDLE: Duration = Duration::from_secs(30);

/// The stream key.
pub fn stream_key(config: &RedisConfig) -> String {
    format!("{}:ingest", config.prefix)
}

/// The consumer group shared by every hub.
pub fn group_name(config: &RedisConfig) -> String {
    format!("{}:hubs", config.prefix)
}

/// Runs the consumer until shutdown, reconnecting as needed.
pub async fn run(
    config: RedisConfig,
    max_len: u64,
    max_topics: usize,
    hub: Hub,
    store: Store,
    bus: Bus,
    shutdown: CancellationToken,
) {
    let mut attempt = 0u32;
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = consume(&config, max_len, Target { hub: &hub, store: &store, bus: &bus, max_topics }, &shutdown) => outcome,
        };
        if let Err(error) = outcome {
            attempt += 1;
            bus.stats().ingest_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%error, attempt, "stream ingest lost Redis; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(crate::bus::backoff(attempt)) => {}
            }
        } else {
            return;
        }
    }
}

/// Where ingested entries go.
#[derive(Clone, Copy)]
struct Target<'a> {
    hub: &'a Hub,
    store: &'a Store,
    bus: &'a Bus,
    /// `--max-topics`, which stream entries respect as publishes do.
    max_topics: usize,
}

async fn consume(
    config: &RedisConfig,
    max_len: u64,
    target: Target<'_>,
    shutdown: &CancellationToken,
) -> RedisResult<()> {
    let mut connection = config.connect("ingest", None, None).await?;
    let key = stream_key(config);
    let group = group_name(config);
    let consumer = config.hub_id.clone();
    // Create the group at the start of the stream, so entries pushed before
    // any hub ran are ingested too; it may exist already.
    let created: RedisResult<()> = connection.xgroup_create_mkstream(&key, &group, "0").await;
    if let Err(error) = created
        && error.code() != Some("BUSYGROUP")
    {
        return Err(error);
    }
    let mut housekeeping_at = tokio::time::Instant::now();
    // `0` re-reads this consumer's own pending entries (after a failed
    // commit); `>` takes new ones.
    let mut cursor = "0";
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= housekeeping_at {
            housekeeping_at = tokio::time::Instant::now() + Duration::from_secs(5);
            let _: RedisResult<Value> =
                redis::cmd("XTRIM").arg(&key).arg("MAXLEN").arg("~").arg(max_len).query_async(&mut connection).await;
            let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&key)
                .arg(&group)
                .arg(&consumer)
                .arg(RECLAIM_IDLE.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut connection)
                .await?;
            if !claimed.claimed.is_empty() {
                tracing::info!(entries = claimed.claimed.len(), "took over entries of a silent consumer");
                ingest(&mut connection, &key, &group, target, claimed.claimed).await?;
            }
        }
        let options = StreamReadOptions::default().group(&group, &consumer).count(BATCH).block(1000);
        let reply: StreamReadReply = connection.xread_options(&[&key], &[cursor], &options).await?;
        let entries: Vec<Entry> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
        if entries.is_empty() {
            cursor = ">";
            continue;
        }
        let all_done = ingest(&mut connection, &key, &group, target, entries).await?;
        cursor = if all_done { ">" } else { "0" };
    }
}

/// Commits what the entries say and acknowledges each one that is settled
/// (committed, superseded, or malformed). Returns false if some could not be
/// committed now (the store is down); they stay pending and are retried.
async fn ingest(
    connection: &mut MultiplexedConnection,
    key: &str,
    group: &str,
    target: Target<'_>,
    entries: Vec<Entry>,
) -> RedisResult<bool> {
    let Target { hub, store, bus, max_topics } = target;
    let stats = bus.stats();
    let dropped = |why: IngestDrop| stats.ingest_dropped[why as usize].fetch_add(1, Ordering::Relaxed);
    let mut settled: Vec<String> = Vec::with_capacity(entries.len());
    let mut writes = Vec::with_capacity(entries.len());
    // Topics this batch creates, so a batch cannot overshoot the limit.
    let mut creating: HashSet<TopicName> = HashSet::new();
    for entry in &entries {
        match parse(entry) {
            Ok(write) => {
                let exists = hub.get(write.topic.as_str()).is_some_and(|t| t.live().is_some());
                if !exists && matches!(write.change, Change::Put(_)) && !creating.contains(&write.topic) {
                    if hub.live_count() + creating.len() >= max_topics {
                        // The stream's equivalent of the 507 a PUT gets: the
                        // entry is settled (retrying cannot help) and counted.
                        tracing::warn!(id = %entry.id, topic = %write.topic, max_topics, "dropping a stream entry: topic limit reached");
                        dropped(IngestDrop::TopicLimit);
                        settled.push(entry.id.clone());
                        continue;
                    }
                    creating.insert(write.topic.clone());
                }
                writes.push((entry.id.clone(), write));
            }
            Err(why) => {
                tracing::warn!(id = %entry.id, why, "dropping a malformed stream entry");
                dropped(IngestDrop::Malformed);
                settled.push(entry.id.clone());
            }
        }
    }
    let results = store.write_many(writes.iter().map(|(_, w)| w.clone()).collect()).await;
    let mut all_done = true;
    for ((id, _), result) in writes.into_iter().zip(results) {
        match result {
            Ok(snapshot) => {
                stats.ingest_committed.fetch_add(1, Ordering::Relaxed);
                bus.announce(&snapshot);
                hub.apply(snapshot);
                settled.push(id);
            }
            Err(WriteError::Superseded) | Err(WriteError::NotFound) | Err(WriteError::PreconditionFailed { .. }) => {
                dropped(IngestDrop::Superseded);
                settled.push(id);
            }
            Err(WriteError::Unavailable) => all_done = false,
        }
    }
    if !settled.is_empty() {
        let _: i64 = connection.xack(key, group, &settled).await?;
    }
    Ok(all_done)
}

fn parse(entry: &Entry) -> Result<Write, &'static str> {
    let text = |field: &str| -> Option<String> { entry.get::<String>(field) };
    let id: StreamId = entry.id.parse().map_err(|()| "bad entry id")?;
    let topic = TopicName::parse(&text("topic").ok_or("no topic field")?).map_err(|_| "bad topic name")?;
    let object = || -> Result<Map<String, Json>, &'static str> {
        match serde_json::from_str::<Json>(&text("state").ok_or("no state field")?) {
            Ok(Json::Object(map)) => Ok(map),
            _ => Err("state is not a JSON object"),
        }
    };
    let change = match text("op").as_deref().unwrap_or("put") {
        "put" => Change::Put(object()?),
        "patch" => Change::Patch(object()?),
        "delete" => Change::Delete,
        _ => return Err("op must be put, patch or delete"),
    };
    Ok(Write { stream_id: Some(id), ..Write::new(topic, change) })
}
