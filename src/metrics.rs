//! Counters and gauges kept as plain atomics, and their rendering as
//! Prometheus text for `/metrics`. Hand-rolled so that the hot path is one
//! relaxed atomic add and the server pulls in no metrics framework.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::bus::BusStats;
use crate::store::StoreStats;
use crate::topic::{Hub, Wire, encodings_total};

/// Why a connection was cut off by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Cutoff {
    /// A write did not finish within the write timeout.
    WriteStall = 0,
    /// Two heartbeat pings went unanswered.
    HeartbeatLost = 1,
    /// The client sent data the protocol does not define.
    Policy = 2,
    /// The client sent a frame over the size limit.
    TooBig = 3,
    /// The topic was deleted.
    Deleted = 4,
    /// The server shut down.
    Shutdown = 5,
    /// The socket failed (reset, or the kernel's own timeout gave up on it).
    SocketError = 6,
    /// The reader stayed behind the newest version for too long.
    Stale = 7,
    /// The memory guard cut the reader off (it held unflushed bytes the
    /// longest while the process was over its send budget or memory limit).
    Memory = 8,
}

impl Cutoff {
    /// Every reason, in the order metrics list them.
    pub const ALL: [Cutoff; 9] = [
        Cutoff::Stale,
        Cutoff::Memory,
        Cutoff::WriteStall,
        Cutoff::HeartbeatLost,
        Cutoff::Policy,
        Cutoff::TooBig,
        Cutoff::Deleted,
        Cutoff::Shutdown,
        Cutoff::SocketError,
    ];

    /// The label used in metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Cutoff::WriteStall => "write_stall",
            Cutoff::HeartbeatLost => "heartbeat_lost",
            Cutoff::Policy => "policy",
            Cutoff::TooBig => "too_big",
            Cutoff::Deleted => "deleted",
            Cutoff::Shutdown => "shutdown",
            Cutoff::SocketError => "socket_error",
            Cutoff::Stale => "stale",
            Cutoff::Memory => "memory",
        }
    }
}

/// Process-wide counters. Shared through `Arc`; every field is a relaxed
/// atomic because each is an independent tally and no reader needs them to
/// agree with one another at an instant.
/// The ways a reader connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Transport {
    /// WebSocket.
    Ws = 0,
    /// Server-Sent Events.
    Sse = 1,
    /// A waiting long-poll.
    LongPoll = 2,
}

impl Transport {
    const ALL: [Transport; 3] = [Transport::Ws, Transport::Sse, Transport::LongPoll];

    /// The label used in metrics and the connection list.
    pub const fn label(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::LongPoll => "long_poll",
        }
    }
}

/// Process-wide counters. Shared through `Arc`; every field is a relaxed
/// atomic because each is an independent tally and no reader needs them to
/// agree with one another at an instant.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Reader connections open now, by transport.
    open: [AtomicU64; 3],
    /// Reader connections accepted since start, by transport.
    accepted: [AtomicU64; 3],
    /// Cut-offs by reason, indexed by `Cutoff`.
    cutoffs: [AtomicU64; 9],
    /// State frames (snapshot, deleted) written to readers.
    pub deliveries: AtomicU64,
    /// Versions readers skipped (coalesced away).
    pub skipped: AtomicU64,
    /// The highest number of state frames ever pending on one connection.
    /// The design promises 1; the test suite holds it to that.
    pub max_pending_state_frames: AtomicU64,
    /// Heartbeat frames sent.
    pub heartbeats: AtomicU64,
    /// Publishes acknowledged (PUT, PATCH, DELETE).
    pub publishes_ok: AtomicU64,
    /// Publishes refused (bad input, auth, precondition, not found).
    pub publishes_refused: AtomicU64,
    /// Publishes that failed in the store.
    pub publishes_failed: AtomicU64,
    /// From a publish request's arrival to its acknowledgement (committed
    /// and installed), for acknowledged publishes.
    pub publish_latency: Histogram,
    /// From a version's commit (its `updated_ms`, the committing hub's
    /// clock) to the moment a reader's socket took the frame.
    pub delivery_lag: Histogram,
    /// Bytes handed to reader sockets and not yet flushed to the kernel:
    /// what the memory guard's send budget bounds.
    pub bytes_in_flight: AtomicU64,
}

/// Upper bounds of the latency buckets, in microseconds: from 1 ms to 30 s,
/// roughly 1-2.5-5 per decade, which is the resolution an operator reads.
const LATENCY_BOUNDS_US: [u64; 14] = [
    1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 30_000_000,
];

/// A histogram's per-bucket counts (not cumulative), the last being `+Inf`.
pub type Buckets = [u64; LATENCY_BOUNDS_US.len() + 1];

/// A latency histogram with fixed buckets: one relaxed add per observation,
/// no allocation, rendered as a Prometheus histogram in seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: std::time::Duration) {
        self.observe_us(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// Records one observation in microseconds.
    pub fn observe_us(&self, us: u64) {
        let index = LATENCY_BOUNDS_US.iter().position(|&bound| us <= bound).unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The per-bucket counts (not cumulative), the last being `+Inf`.
    pub fn snapshot(&self) -> Buckets {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }

    /// The `q` quantile (0..=1) in milliseconds, interpolated within its
    /// bucket, from per-bucket counts (a `snapshot`, or the difference of two
    /// for a recent window); `None` without observations.
    pub fn quantile_ms(counts: &Buckets, q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut seen = 0u64;
        for (i, &n) in counts.iter().enumerate() {
            if n > 0 && (seen + n) as f64 >= rank {
                let low = if i == 0 { 0 } else { LATENCY_BOUNDS_US[i - 1] };
                // The open-ended bucket reports its lower bound.
                let high = LATENCY_BOUNDS_US.get(i).copied().unwrap_or(low);
                let within = (rank - seen as f64) / n as f64;
                return Some((low as f64 + within * (high - low) as f64) / 1000.0);
            }
            seen += n;
        }
        None
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.snapshot().iter().enumerate() {
            cumulative += count;
            let le = LATENCY_BOUNDS_US.get(i).map_or_else(|| "+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Milliseconds since the Unix epoch, for comparing with `updated_ms`.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Metrics {
    /// Counts a reader connection opening; the guard counts its closing.
    pub fn open(self: &Arc<Self>, transport: Transport) -> OpenGuard {
        self.open[transport as usize].fetch_add(1, Ordering::Relaxed);
        self.accepted[transport as usize].fetch_add(1, Ordering::Relaxed);
        OpenGuard { metrics: Arc::clone(self), transport }
    }

    /// Reader connections open now on `transport`.
    pub fn open_now(&self, transport: Transport) -> u64 {
        self.open[transport as usize].load(Ordering::Relaxed)
    }

    /// Counts a cut-off.
    pub fn cutoff(&self, why: Cutoff) {
        self.cutoffs[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Cut-offs so far for `why`.
    pub fn cutoffs(&self, why: Cutoff) -> u64 {
        self.cutoffs[why as usize].load(Ordering::Relaxed)
    }

    /// Records that a connection had `pending` state frames in flight.
    pub fn observe_pending(&self, pending: u64) {
        // A plain load first: the maximum almost never moves, and an
        // unconditional read-modify-write on this shared counter would cost
        // every delivery on every core a contended cache line.
        if pending > self.max_pending_state_frames.load(Ordering::Relaxed) {
            self.max_pending_state_frames.fetch_max(pending, Ordering::Relaxed);
        }
    }

    /// Renders every figure in the Prometheus text format.
    pub fn render(
        &self,
        hub: &Hub,
        store: &StoreStats,
        bus: &BusStats,
        admission: &crate::admission::Admission,
        connections: &Connections,
    ) -> String {
        let mut out = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for t in Transport::ALL {
            let value = load(&self.open[t as usize]);
            gauge(&mut out, "spillway_connections", "Reader connections open now.", &[("transport", t.label())], value);
        }
        for t in Transport::ALL {
            let value = load(&self.accepted[t as usize]);
            let help = "Reader connections accepted.";
            counter(&mut out, "spillway_connections_accepted_total", help, &[("transport", t.label())], value);
        }
        for why in Cutoff::ALL {
            counter(
                &mut out,
                "spillway_cutoffs_total",
                "Connections cut off by the server, by reason.",
                &[("reason", why.label())],
                self.cutoffs(why),
            );
        }
        counter(&mut out, "spillway_deliveries_total", "State frames written to readers.", &[], load(&self.deliveries));
        counter(
            &mut out,
            "spillway_versions_skipped_total",
            "Versions readers never received because a newer one replaced them first.",
            &[],
            load(&self.skipped),
        );
        gauge(
            &mut out,
            "spillway_connection_pending_state_frames_max",
            "Most state frames ever pending on one connection (the design bound is 1).",
            &[],
            load(&self.max_pending_state_frames),
        );
        counter(
            &mut out,
            "spillway_heartbeats_total",
            "Heartbeat frames sent to idle readers.",
            &[],
            load(&self.heartbeats),
        );
        for (result, value) in
            [("ok", &self.publishes_ok), ("refused", &self.publishes_refused), ("failed", &self.publishes_failed)]
        {
            counter(
                &mut out,
                "spillway_publishes_total",
                "Publish requests by outcome.",
                &[("result", result)],
                load(value),
            );
        }
        for wire in Wire::ALL {
            counter(
                &mut out,
                "spillway_encodings_total",
                "Wire encodings built (once per version and form, whatever the number of readers).",
                &[("wire", wire.label())],
                encodings_total(wire),
            );
        }
        gauge(&mut out, "spillway_topics", "Topics with a live state.", &[], hub.live_count() as u64);
        let help = "Subscriptions admitted and refused, by reason.";
        counter(&mut out, "spillway_subscriptions_total", help, &[("result", "admitted")], load(&admission.admitted));
        for why in crate::admission::Admission::REASONS {
            let labels = [("result", "refused"), ("reason", why.label())];
            counter(&mut out, "spillway_subscriptions_total", help, &labels, admission.refused(why));
        }
        // The batch-size histogram, cumulative as Prometheus expects.
        let mut cumulative = 0;
        let _ = writeln!(out, "# HELP spillway_store_commit_batch_size Writes per store commit (group commit).");
        let _ = writeln!(out, "# TYPE spillway_store_commit_batch_size histogram");
        for (i, bucket) in store.batch_buckets.iter().enumerate() {
            cumulative += load(bucket);
            let le = store.bucket_bound(i).map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "spillway_store_commit_batch_size_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "spillway_store_commit_batch_size_sum {}", load(&store.writes));
        let _ = writeln!(out, "spillway_store_commit_batch_size_count {}", load(&store.commits));
        counter(&mut out, "spillway_store_errors_total", "Store commits that failed.", &[], load(&store.errors));
        self.publish_latency.render(
            &mut out,
            "spillway_publish_latency_seconds",
            "From a publish request's arrival to its acknowledgement (acknowledged publishes).",
        );
        self.delivery_lag.render(
            &mut out,
            "spillway_delivery_lag_seconds",
            "From a version's commit to a reader's socket taking its frame.",
        );
        gauge(
            &mut out,
            "spillway_bytes_in_flight",
            "Bytes handed to reader sockets and not yet flushed to the kernel.",
            &[],
            load(&self.bytes_in_flight),
        );
        counter(
            &mut out,
            "spillway_out_of_descriptors_total",
            "Requests answered 503 from the descriptor reserve because the process was out of file descriptors.",
            &[],
            crate::server::OUT_OF_DESCRIPTORS.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "spillway_bus_up",
            "Whether the Redis bus subscription is up (1) or not (0).",
            &[],
            u64::from(bus.up.load(Ordering::Relaxed)),
        );
        for (name, help, value) in [
            ("spillway_bus_received_total", "Messages received from the bus.", &bus.received),
            ("spillway_bus_applied_total", "Received versions newer than what the hub held.", &bus.applied),
            ("spillway_bus_published_total", "Announcements published on the bus.", &bus.published),
            ("spillway_bus_publish_errors_total", "Announcements that could not be published.", &bus.publish_errors),
            ("spillway_bus_reconnects_total", "Reconnections of the bus subscription.", &bus.reconnects),
            ("spillway_store_resyncs_total", "Resynchronisations with the store.", &bus.resyncs),
            ("spillway_store_resync_applied_total", "Versions installed by resynchronisations.", &bus.resync_applied),
        ] {
            counter(&mut out, name, help, &[], load(value));
        }
        counter(
            &mut out,
            "spillway_ingest_entries_total",
            "Stream entries settled by ingest, by outcome.",
            &[("result", "committed")],
            load(&bus.ingest_committed),
        );
        for why in crate::bus::IngestDrop::ALL {
            counter(
                &mut out,
                "spillway_ingest_entries_total",
                "Stream entries settled by ingest, by outcome.",
                &[("result", "dropped"), ("reason", why.label())],
                load(&bus.ingest_dropped[why as usize]),
            );
        }
        counter(
            &mut out,
            "spillway_ingest_errors_total",
            "Losses of stream ingest's Redis connection.",
            &[],
            load(&bus.ingest_errors),
        );
        gauge(
            &mut out,
            "spillway_registered_connections",
            "Connections listed in the connection registry.",
            &[],
            connections.len() as u64,
        );
        out
    }
}

fn line(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{v}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    // Repeated series of one family share the header: print it only once.
    if !out.contains(&format!("# TYPE {name} ")) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
    header(out, name, help, "counter");
    line(out, name, labels, value);
}

fn gauge(out: &mut String, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
    header(out, name, help, "gauge");
    line(out, name, labels, value);
}

/// Counts a reader connection as open while it lives.
#[derive(Debug)]
pub struct OpenGuard {
    metrics: Arc<Metrics>,
    transport: Transport,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.metrics.open[self.transport as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open reader connection's figures, for operators and tests.
#[derive(Debug)]
pub struct ConnStats {
    /// Process-unique id.
    pub id: u64,
    /// The transport (`ws` for now).
    pub transport: &'static str,
    /// What it follows.
    pub topic: String,
    /// The peer's address.
    pub peer: SocketAddr,
    /// When it was opened.
    pub opened: Instant,
    /// State frames written.
    pub frames: AtomicU64,
    /// Versions skipped.
    pub skipped: AtomicU64,
    /// State frames pending now (0 or 1).
    pub pending: AtomicU64,
    /// The most state frames ever pending at once.
    pub pending_max: AtomicU64,
    /// Bytes of the frame handed to the socket and not yet flushed (0 when
    /// nothing is in flight), for the memory guard.
    pub in_flight_bytes: AtomicU64,
    /// Since when (`process_ms`) that frame has been in flight; 0 when none
    /// is. The memory guard cuts off the oldest first: the reader that has
    /// been stuck longest is looking at the stalest board.
    pub in_flight_since_ms: AtomicU64,
    /// Raised by the memory guard to cut this connection off.
    pub evict: tokio::sync::Notify,
}

impl ConnStats {
    /// Records that `bytes` were handed to the socket and are not yet
    /// flushed, adding them to the process-wide gauge.
    pub fn hand_over(&self, metrics: &Metrics, bytes: u64) {
        self.in_flight_bytes.fetch_add(bytes, Ordering::Relaxed);
        metrics.bytes_in_flight.fetch_add(bytes, Ordering::Relaxed);
        // Zero means "nothing in flight", so the clock starts at 1; a frame
        // queued behind another keeps the first one's clock, and a connection
        // already cut off keeps its mark.
        let now = process_ms().clamp(1, EVICTED - 1);
        let _ = self.in_flight_since_ms.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Records that everything handed over has been flushed.
    pub fn flushed(&self, metrics: &Metrics) {
        let bytes = self.in_flight_bytes.swap(0, Ordering::Relaxed);
        metrics.bytes_in_flight.fetch_sub(bytes, Ordering::Relaxed);
        let _ =
            self.in_flight_since_ms.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| (v != EVICTED).then_some(0));
    }
}

/// The `in_flight_since_ms` of a connection the memory guard has cut off:
/// the guard neither picks it again nor counts its bytes, which are freed
/// when its close grace ends.
pub const EVICTED: u64 = u64::MAX;

/// Milliseconds since the process first asked; a cheap monotonic clock that
/// fits in an atomic.
pub fn process_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The registry of open reader connections. A `std` mutex: entries are
/// added and removed once per connection and listed on demand, never held
/// across an await.
#[derive(Debug)]
pub struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnStats>>>,
    /// Where a closing connection gives back the bytes it still had in flight.
    metrics: Arc<Metrics>,
}

impl Connections {
    /// An empty registry whose connections account to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { next_id: AtomicU64::new(0), open: Mutex::new(HashMap::new()), metrics }
    }

    /// Registers a connection; it is removed when the guard drops.
    pub fn register(self: &Arc<Self>, transport: &'static str, topic: String, peer: SocketAddr) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let stats = Arc::new(ConnStats {
            id,
            transport,
            topic,
            peer,
            opened: Instant::now(),
            frames: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            pending_max: AtomicU64::new(0),
            in_flight_bytes: AtomicU64::new(0),
            in_flight_since_ms: AtomicU64::new(0),
            evict: tokio::sync::Notify::new(),
        });
        self.open.lock().unwrap_or_else(PoisonError::into_inner).insert(id, Arc::clone(&stats));
        ConnGuard { registry: Arc::clone(self), stats }
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the list, sorted by id.
    pub fn list(&self) -> Vec<Arc<ConnStats>> {
        let mut out: Vec<_> = self.open.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        out.sort_by_key(|c| c.id);
        out
    }
}

/// Keeps a connection registered while it lives.
#[derive(Debug)]
pub struct ConnGuard {
    registry: Arc<Connections>,
    /// The connection's figures.
    pub stats: Arc<ConnStats>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        // Whatever was still in flight is freed with the connection.
        let bytes = self.stats.in_flight_bytes.swap(0, Ordering::Relaxed);
        self.registry.metrics.bytes_in_flight.fetch_sub(bytes, Ordering::Relaxed);
        self.registry.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.stats.id);
    }
}
