//! The internal stats topic `_stats`: once per second, a JSON document of the
//! server's own figures (connections, admission, deliveries, cut-offs,
//! publishes, store, bus, process) installed into the hub like any snapshot,
//! so the operator page (`/admin/events`) follows it with the ordinary SSE
//! machinery.
//!
//! The topic is internal: its name starts with `_`, which no public endpoint
//! accepts; it never goes to the store or the bus, and it counts neither in
//! `spillway_topics` nor against `--max-topics`. Its versions come from a
//! local counter under an epoch drawn at start: the one exception to
//! "versions come only from the store", harmless because no other hub and no
//! store ever hold this topic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::bus::BusStats;
use crate::http::AppState;
use crate::metrics::{Buckets, Cutoff, Histogram, Metrics, Transport};
use crate::protocol::unix_ms;
use crate::store::StoreStats;
use crate::topic::{Epoch, Hub, Snapshot, TopicName, Wire, encodings_total};

/// The name of the stats topic.
pub const STATS_TOPIC: &str = "_stats";

/// How often the document is rebuilt and installed.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The stats topic's name, as the hub knows it.
pub fn topic() -> TopicName {
    TopicName::internal(STATS_TOPIC)
}

/// Where the figures come from: the same handles `/metrics` reads.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The topic core (topic count; and where the document is installed).
    pub hub: Hub,
    /// Process-wide counters.
    pub metrics: Arc<Metrics>,
    /// Admission control's counters.
    pub admission: Arc<Admission>,
    /// The store's commit counters.
    pub store: Arc<StoreStats>,
    /// `sqlite` or `postgres`.
    pub store_kind: &'static str,
    /// The bus's counters.
    pub bus: Arc<BusStats>,
    /// Whether the bus is Redis (otherwise in-process, always "up").
    pub bus_is_redis: bool,
    /// This hub's name, if it has one.
    pub hub_id: Option<String>,
    /// When the process started serving.
    pub started: Instant,
}

impl Sources {
    /// The sources of a running application.
    pub fn from_state(state: &AppState, hub_id: Option<String>) -> Self {
        Self {
            hub: state.hub.clone(),
            metrics: Arc::clone(&state.metrics),
            admission: Arc::clone(&state.admission),
            store: Arc::clone(state.store.stats()),
            store_kind: if state.store.is_shared() { "postgres" } else { "sqlite" },
            bus: Arc::clone(state.bus.stats()),
            bus_is_redis: state.bus.is_redis(),
            hub_id,
            started: Instant::now(),
        }
    }
}

/// The totals of the previous document, for per-second rates.
#[derive(Debug, Clone, Copy)]
pub struct Previous {
    at: Instant,
    deliveries: u64,
    skipped: u64,
    publishes: u64,
    commits: u64,
    publish_latency: Buckets,
    delivery_lag: Buckets,
}

impl Previous {
    /// Starts from the counters as they are now, so the first rates are not
    /// inflated by everything counted before the task started.
    pub fn now(src: &Sources) -> Self {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Self {
            at: Instant::now(),
            deliveries: load(&src.metrics.deliveries),
            skipped: load(&src.metrics.skipped),
            publishes: load(&src.metrics.publishes_ok),
            commits: load(&src.store.commits),
            publish_latency: src.metrics.publish_latency.snapshot(),
            delivery_lag: src.metrics.delivery_lag.snapshot(),
        }
    }
}

/// Figures read from `/proc` (Linux); `None` where unavailable.
#[derive(Debug, Clone, Copy, Default)]
pub struct Process {
    /// Resident set size, in bytes.
    pub rss_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
}

impl Process {
    /// Reads the figures. Blocking file reads (of in-memory `/proc` files,
    /// but the descriptor list can hold thousands of entries), so the task
    /// runs this on the blocking pool.
    pub fn read() -> Self {
        // `VmRSS` in `/proc/self/status` is `statm`'s resident pages already
        // converted to kB, which spares asking the kernel for the page size.
        let rss_bytes = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        });
        // The listing itself holds one descriptor open while it runs.
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|dir| (dir.count() as u64).saturating_sub(1));
        Self { rss_bytes, open_fds }
    }
}

/// p50, p90 and p99 (ms) of the observations between two snapshots of a
/// histogram; null without any.
fn window(now: &Buckets, before: &Buckets) -> Value {
    let counts: Buckets = std::array::from_fn(|i| now[i].saturating_sub(before[i]));
    let quantile = |q| Histogram::quantile_ms(&counts, q).map(round1);
    match (quantile(0.5), quantile(0.9), quantile(0.99)) {
        (Some(p50), Some(p90), Some(p99)) => json!({ "p50": p50, "p90": p90, "p99": p99 }),
        _ => Value::Null,
    }
}

/// Builds the stats document: every figure the operator page shows. The one
/// place that decides its shape; `docs/DEPLOYMENT.md` lists the keys.
pub fn figures(src: &Sources, previous: &mut Previous, process: Process) -> Value {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let now = Instant::now();
    let elapsed = now.duration_since(previous.at).as_secs_f64();
    // A rate over a near-zero interval would be noise; report 0 instead.
    let rate = |now: u64, before: u64| {
        if elapsed < 0.001 { 0.0 } else { round1(now.saturating_sub(before) as f64 / elapsed) }
    };
    let current = Previous { at: now, ..Previous::now(src) };

    let mut connections = Map::new();
    for t in [Transport::Ws, Transport::Sse, Transport::LongPoll] {
        connections.insert(t.label().into(), json!(src.metrics.open_now(t)));
    }
    let mut refused = Map::new();
    for why in Admission::REASONS {
        refused.insert(why.label().into(), json!(src.admission.refused(why)));
    }
    let mut cutoffs = Map::new();
    for why in Cutoff::ALL {
        cutoffs.insert(why.label().into(), json!(src.metrics.cutoffs(why)));
    }
    let mut encodings = Map::new();
    for wire in Wire::ALL {
        encodings.insert(wire.label().into(), json!(encodings_total(wire)));
    }
    // Commits per batch size, by the bucket's upper bound (not cumulative).
    let mut batches = Map::new();
    for (i, bucket) in src.store.batch_buckets.iter().enumerate() {
        let key = src.store.bucket_bound(i).map_or_else(|| "more".to_string(), |b| b.to_string());
        batches.insert(key, json!(load(bucket)));
    }
    let writes = load(&src.store.writes);
    let mean_batch = if current.commits == 0 { 0.0 } else { round1(writes as f64 / current.commits as f64) };
    let bus_status = if !src.bus_is_redis {
        "in-process"
    } else if src.bus.up.load(Ordering::Relaxed) {
        "up"
    } else {
        "reconnecting"
    };

    let document = json!({
        "at_ms": unix_ms(SystemTime::now()),
        "uptime_s": src.started.elapsed().as_secs(),
        "hub_id": src.hub_id,
        "version": env!("CARGO_PKG_VERSION"),
        "connections": connections,
        "subscriptions": { "admitted": load(&src.admission.admitted), "refused": refused },
        "deliveries": { "total": current.deliveries, "per_s": rate(current.deliveries, previous.deliveries) },
        "versions_skipped": { "total": current.skipped, "per_s": rate(current.skipped, previous.skipped) },
        "cutoffs": cutoffs,
        "publishes": {
            "ok": current.publishes,
            "refused": load(&src.metrics.publishes_refused),
            "failed": load(&src.metrics.publishes_failed),
            "per_s": rate(current.publishes, previous.publishes),
        },
        "topics": src.hub.live_count(),
        "encodings": encodings,
        "store": {
            "kind": src.store_kind,
            "commits": current.commits,
            "commits_per_s": rate(current.commits, previous.commits),
            "writes": writes,
            "mean_batch": mean_batch,
            "batch_sizes": batches,
            "errors": load(&src.store.errors),
        },
        "bus": {
            "status": bus_status,
            "reconnects": load(&src.bus.reconnects),
            "resyncs": load(&src.bus.resyncs),
            "received": load(&src.bus.received),
            "publish_errors": load(&src.bus.publish_errors),
        },
        "process": { "rss_bytes": process.rss_bytes, "open_fds": process.open_fds },
        // Over the last interval, not since start: an operator watching a
        // storm wants to see the latency now. Null when nothing happened.
        "publish_latency_ms": window(&current.publish_latency, &previous.publish_latency),
        "delivery_lag_ms": window(&current.delivery_lag, &previous.delivery_lag),
        "bytes_in_flight": load(&src.metrics.bytes_in_flight),
    });
    *previous = current;
    document
}

/// One decimal place is plenty for a rate on a dashboard.
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Installs a fresh document every [`INTERVAL`] until shutdown.
pub async fn run(src: Sources, shutdown: CancellationToken) {
    let name = topic();
    // A new epoch per process: a page that reconnects to a restarted server
    // holds a position of the old one, and must simply get the newest.
    let epoch = Epoch::from_u64(fastrand::u64(..));
    let mut version = 0u64;
    let mut previous = Previous::now(&src);
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let process = tokio::task::spawn_blocking(Process::read).await.unwrap_or_default();
        let document = figures(&src, &mut previous, process);
        version += 1;
        let state = Bytes::from(document.to_string());
        src.hub.apply(Snapshot::live(name.clone(), epoch, version, unix_ms(SystemTime::now()), state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Sources {
        Sources {
            hub: Hub::new(),
            metrics: Arc::new(Metrics::default()),
            admission: Admission::new(10, 0, 10, 10),
            store: Arc::new(StoreStats::default()),
            store_kind: "sqlite",
            bus: Arc::new(BusStats::default()),
            bus_is_redis: false,
            hub_id: Some("hub-a".into()),
            started: Instant::now(),
        }
    }

    #[test]
    fn the_document_has_every_figure_and_null_placeholders() {
        let src = sources();
        let mut previous = Previous::now(&src);
        let doc = figures(&src, &mut previous, Process { rss_bytes: Some(4096), open_fds: None });
        for key in [
            "uptime_s",
            "connections",
            "subscriptions",
            "deliveries",
            "versions_skipped",
            "cutoffs",
            "publishes",
            "topics",
            "encodings",
            "store",
            "bus",
            "process",
        ] {
            assert!(doc.get(key).is_some_and(|v| !v.is_null()), "{key} missing in {doc}");
        }
        for key in ["publish_latency_ms", "delivery_lag_ms"] {
            assert_eq!(doc.get(key), Some(&Value::Null), "nothing observed yet: {key}");
        }
        assert_eq!(doc["bytes_in_flight"], 0);
        src.metrics.publish_latency.observe(Duration::from_millis(3));
        let next = figures(&src, &mut previous, Process::default());
        assert!(next["publish_latency_ms"]["p50"].as_f64().is_some_and(|ms| (2.0..=5.0).contains(&ms)), "{next}");
        let later = figures(&src, &mut previous, Process::default());
        assert_eq!(later["publish_latency_ms"], Value::Null, "a window, not since start");
        assert_eq!(doc["hub_id"], "hub-a");
        assert_eq!(doc["connections"]["long_poll"], 0);
        assert_eq!(doc["cutoffs"].as_object().map(Map::len), Some(Cutoff::ALL.len()));
        assert_eq!(doc["subscriptions"]["refused"]["accept_rate"], 0);
        assert_eq!(doc["bus"]["status"], "in-process");
        assert_eq!(doc["process"]["rss_bytes"], 4096);
        assert_eq!(doc["process"]["open_fds"], Value::Null);
    }

    #[test]
    fn rates_are_per_second_since_the_previous_document() {
        let src = sources();
        let mut previous = Previous::now(&src);
        // Pretend the previous document was two seconds ago.
        previous.at -= Duration::from_secs(2);
        src.metrics.deliveries.fetch_add(100, Ordering::Relaxed);
        src.metrics.publishes_ok.fetch_add(3, Ordering::Relaxed);
        let doc = figures(&src, &mut previous, Process::default());
        let per_s = doc["deliveries"]["per_s"].as_f64().expect("a number");
        assert!((45.0..=50.0).contains(&per_s), "{per_s}");
        assert_eq!(doc["deliveries"]["total"], 100);
        assert_eq!(doc["publishes"]["ok"], 3);
        // Nothing moved since: the next rates are zero, the totals stay.
        previous.at -= Duration::from_secs(1);
        let doc = figures(&src, &mut previous, Process::default());
        assert_eq!(doc["deliveries"]["per_s"], 0.0);
        assert_eq!(doc["deliveries"]["total"], 100);
    }

    #[test]
    fn process_figures_are_read_on_linux() {
        let process = Process::read();
        assert!(process.rss_bytes.is_some_and(|b| b > 0));
        assert!(process.open_fds.is_some_and(|n| n >= 3), "stdin, stdout, stderr at least");
    }

    #[tokio::test]
    async fn the_task_installs_versions_under_an_internal_name_and_stops() {
        let src = sources();
        let hub = src.hub.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(src, shutdown.clone()));
        let mut follower = hub.follow(&topic(), None);
        let first = tokio::time::timeout(Duration::from_secs(10), follower.wait_next()).await.expect("a document");
        assert!(matches!(first, crate::topic::Delivery::Snapshot { ref snapshot, .. } if snapshot.version == 1));
        assert_eq!(hub.live_count(), 0, "the stats topic is not a topic");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops").expect("no panic");
    }
}
