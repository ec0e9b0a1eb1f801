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
}

impl Cutoff {
    const ALL: [Cutoff; 8] = [
        Cutoff::Stale,
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
    cutoffs: [AtomicU64; 8],
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
}

/// The registry of open reader connections. A `std` mutex: entries are
/// added and removed once per connection and listed on demand, never held
/// across an await.
#[derive(Debug, Default)]
pub struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnStats>>>,
}

impl Connections {
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
        self.registry.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.stats.id);
    }
}
