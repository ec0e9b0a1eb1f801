//! The bus: how a hub hears of versions committed by other hubs. In-process
//! (one hub, nothing to do) or Redis Pub/Sub (many hubs). The bus is a fast
//! hint, never the truth: every hub also reconciles with the store on an
//! interval and after every reconnect, and applies only versions newer than
//! what it holds, so no reader ever sees a version go backwards.

pub mod message;
mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::redis::RedisConfig;
pub(crate) use self::redis::backoff;
use crate::store::Store;
use crate::topic::{Hub, Snapshot};

/// How many announcements may wait for the Redis publisher before new ones
/// are dropped (the other hubs then catch up by reconciliation).
const ANNOUNCE_DEPTH: usize = 4096;

/// Counters about the bus, read by `/metrics`.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Whether the subscription to the bus is up now.
    pub up: AtomicBool,
    /// Messages received from the bus.
    pub received: AtomicU64,
    /// Received versions that were newer than what the hub held.
    pub applied: AtomicU64,
    /// Announcements published.
    pub published: AtomicU64,
    /// Announcements that could not be published (Redis down or queue full).
    pub publish_errors: AtomicU64,
    /// Reconnections of the subscription.
    pub reconnects: AtomicU64,
    /// Resynchronisations with the store (start, reconnect, gap, interval).
    pub resyncs: AtomicU64,
    /// Versions installed by a resynchronisation (the bus had missed them).
    pub resync_applied: AtomicU64,
    /// Stream ingest: entries committed.
    pub ingest_committed: AtomicU64,
    /// Stream ingest: entries acknowledged without a write, by reason
    /// (`IngestDrop`): malformed, superseded or refused by the store, or
    /// creating a topic beyond `--max-topics`.
    pub ingest_dropped: [AtomicU64; 3],
    /// Stream ingest: losses of the Redis connection.
    pub ingest_errors: AtomicU64,
}

/// Why stream ingest acknowledged an entry without committing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestDrop {
    /// The entry is not a valid write (no topic, bad JSON, unknown op).
    Malformed = 0,
    /// The store settled it without a write: an older entry than the last
    /// applied one, a patch or delete of a missing topic.
    Superseded = 1,
    /// It would create a topic beyond `--max-topics`.
    TopicLimit = 2,
}

impl IngestDrop {
    /// Every reason, for metrics.
    pub const ALL: [IngestDrop; 3] = [IngestDrop::Malformed, IngestDrop::Superseded, IngestDrop::TopicLimit];

    /// The label used in metrics.
    pub const fn label(self) -> &'static str {
        match self {
            IngestDrop::Malformed => "malformed",
            IngestDrop::Superseded => "superseded",
            IngestDrop::TopicLimit => "topic_limit",
        }
    }
}

/// The bus handle. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bus {
    /// Where announcements go; `None` for the in-process bus.
    outbox: Option<mpsc::Sender<bytes::Bytes>>,
    /// Counters.
    stats: Arc<BusStats>,
}

impl Bus {
    /// The in-process bus: a single hub, whose publishes reach its readers
    /// directly through the hub.
    pub fn in_process() -> Self {
        Self { outbox: None, stats: Arc::new(BusStats::default()) }
    }

    /// Joins the Redis bus: starts the subscriber (which resyncs from the
    /// store on every (re)connect), the publisher, and the reconciler.
    pub fn redis(
        config: RedisConfig,
        hub: Hub,
        store: Store,
        reconcile_every: Duration,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let stats = Arc::new(BusStats::default());
        let (outbox, rx) = mpsc::channel(ANNOUNCE_DEPTH);
        let config = Arc::new(config);
        tasks.spawn(redis::publisher(Arc::clone(&config), rx, Arc::clone(&stats), shutdown.clone()));
        tasks.spawn(redis::subscriber(
            Arc::clone(&config),
            hub.clone(),
            store.clone(),
            Arc::clone(&stats),
            shutdown.clone(),
        ));
        tasks.spawn(reconciler(hub, store, reconcile_every, Arc::clone(&stats), shutdown));
        Self { outbox: Some(outbox), stats }
    }

    /// Tells the other hubs about a committed version. Never waits: if the
    /// publisher is behind, the announcement is dropped and counted, and the
    /// other hubs converge at their next reconciliation.
    pub fn announce(&self, snapshot: &Snapshot) {
        let Some(outbox) = &self.outbox else { return };
        if outbox.try_send(message::encode(snapshot)).is_err() {
            self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether this is the Redis bus.
    pub fn is_redis(&self) -> bool {
        self.outbox.is_some()
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<BusStats> {
        &self.stats
    }
}

/// Loads every topic from the store and installs what is newer than the hub
/// holds. Returns how many versions were installed.
pub async fn resync(hub: &Hub, store: &Store, stats: &BusStats) -> Result<usize, sqlx::Error> {
    let rows = store.load_all().await?;
    let applied = rows.into_iter().map(|snapshot| hub.apply(snapshot)).filter(|newer| *newer).count();
    stats.resyncs.fetch_add(1, Ordering::Relaxed);
    stats.resync_applied.fetch_add(applied as u64, Ordering::Relaxed);
    Ok(applied)
}

/// Reconciles on an interval without a bus (several hubs on one database
/// and no Redis: they converge at this pace).
pub async fn reconcile_only(
    hub: Hub,
    store: Store,
    every: Duration,
    stats: Arc<BusStats>,
    shutdown: CancellationToken,
) {
    reconciler(hub, store, every, stats, shutdown).await;
}

/// Reconciles with the store every `every`, so a hub that died between its
/// commit and its announcement cannot leave the others stale for longer.
async fn reconciler(hub: Hub, store: Store, every: Duration, stats: Arc<BusStats>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match resync(&hub, &store, &stats).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(versions = n, "reconciliation installed versions the bus had not delivered"),
            Err(error) => tracing::warn!(%error, "reconciliation with the store failed"),
        }
    }
}
