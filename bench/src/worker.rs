//! A worker process: holds its share of the readers, reports cumulative
//! counters every tick and its full results when told to finish. The
//! coordinator re-executes this binary as `spillway-bench __worker` so that
//! the number of readers is not bounded by one process's open files.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::frame;
use crate::hist::{Dump, new_hist, record};
use crate::plan::{Command, HubResult, Profile, ReaderSpec, StormResult, Tick, WorkerMsg, WorkerPlan, WorkerResult};
use crate::procfs;
use crate::transport::{Conn, ConnectError, Event, Refusal, SocketOpts};

/// How long one handshake may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Entry point of `spillway-bench __worker`: the plan is the first line of
/// stdin.
pub(crate) fn main() -> ExitCode {
    let limits = crate::sys::raise_open_files_limit();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        eprintln!("worker: cannot read the plan");
        return ExitCode::FAILURE;
    }
    let plan: WorkerPlan = match serde_json::from_str(&line) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("worker: bad plan: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(plan.threads.max(1)).enable_all().build();
    let Ok(runtime) = runtime else {
        eprintln!("worker: cannot start the runtime");
        return ExitCode::FAILURE;
    };
    let soft = limits.map(|l| l.soft).unwrap_or(0);
    runtime.block_on(run(plan, soft))
}

#[derive(Default)]
struct Hists {
    latency: Option<Histogram<u64>>,
    handshake: Option<Histogram<u64>>,
    interval: Option<Histogram<u64>>,
}

impl Hists {
    fn get(slot: &mut Option<Histogram<u64>>) -> &mut Histogram<u64> {
        slot.get_or_insert_with(new_hist)
    }
}

#[derive(Default)]
struct ProfileStats {
    frames: AtomicU64,
    bytes: AtomicU64,
    skipped_field: AtomicU64,
    seq_gaps: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    reconnects: AtomicU64,
    measured_frames: AtomicU64,
    admitted_timeouts: AtomicU64,
    hists: Mutex<Hists>,
    ends: Mutex<BTreeMap<String, u64>>,
    refusals: Mutex<BTreeMap<String, u64>>,
}

/// One hub's fast readers' latency (a mutex: recorded per frame, read at
/// the end; never held across an await).
#[derive(Default)]
struct HubStats {
    latency: Mutex<Option<Histogram<u64>>>,
}

/// The storm as this worker sees it. Counters are atomics bumped by reader
/// tasks; the histograms sit behind one mutex, held only to record.
#[derive(Default)]
struct StormStats {
    dropped: AtomicU64,
    back: AtomicU64,
    attempts: AtomicU64,
    failures: AtomicU64,
    admitted_timeouts: AtomicU64,
    last_back_ns: AtomicU64,
    refusals: Mutex<BTreeMap<String, u64>>,
    hists: Mutex<StormHists>,
}

#[derive(Default)]
struct StormHists {
    back_after: Option<Histogram<u64>>,
    before: Option<Histogram<u64>>,
    storm: Option<Histogram<u64>>,
    after: Option<Histogram<u64>>,
}

/// One reader's latest position, read at the end for freshness.
#[derive(Default)]
struct Slot {
    /// The last sequence number received, plus one (0: none yet).
    last_seq: AtomicU64,
    /// When it arrived, Unix nanoseconds.
    last_at_ns: AtomicU64,
    connected: AtomicBool,
    /// The position (`EPOCH:VERSION`) of the last state received, for
    /// `since=` when resuming; only kept when the plan resumes.
    position: Mutex<Option<String>>,
}

struct Shared {
    plan: WorkerPlan,
    /// Each hub's address, parsed once.
    addrs: Vec<SocketAddr>,
    connect: Semaphore,
    measure_from: AtomicU64,
    stopping: AtomicBool,
    profiles: [ProfileStats; 4],
    hubs: Vec<HubStats>,
    slots: Vec<Slot>,
    connected: AtomicU64,
    handshakes: AtomicU64,
    connect_failures: AtomicU64,
    refusals: AtomicU64,
    admitted_timeouts: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Readers whose first connection attempt has ended.
    initial: AtomicU64,
    initial_done_ms: AtomicU64,
    started: Instant,
    /// `storm`: the drop instant (Unix ns; `u64::MAX` until told) and the
    /// length of the storm window, for splitting latencies by send time.
    storm_at: AtomicU64,
    storm_window_ns: AtomicU64,
    /// Flips to `true` at the drop instant; readers that drop watch it (a
    /// `watch`, so a reader busy with a frame at that moment still sees it).
    storm_go: watch::Sender<bool>,
    storm: StormStats,
}

impl Shared {
    fn initial_attempt_over(&self) {
        let n = self.initial.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.plan.readers.len() as u64 {
            let ms = self.started.elapsed().as_millis().max(1) as u64;
            self.initial_done_ms.store(ms, Ordering::Relaxed);
        }
    }

    fn stats(&self, p: Profile) -> &ProfileStats {
        &self.profiles[p.index() as usize]
    }

    fn refused(&self, stats: &ProfileStats, in_storm: bool, reason: &str) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        *stats.refusals.lock().unwrap_or_else(PoisonError::into_inner).entry(reason.to_string()).or_default() += 1;
        if in_storm {
            *self
                .storm
                .refusals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(reason.to_string())
                .or_default() += 1;
        }
    }
}

fn emit(msg: &WorkerMsg) {
    if let Ok(line) = serde_json::to_string(msg) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

async fn run(plan: WorkerPlan, open_files_soft: u64) -> ExitCode {
    let mut addrs = Vec::with_capacity(plan.hubs.len());
    for hub in &plan.hubs {
        match hub.connect_addr.parse() {
            Ok(a) => addrs.push(a),
            Err(e) => {
                eprintln!("worker: bad address {}: {e}", hub.connect_addr);
                return ExitCode::FAILURE;
            }
        }
    }
    let readers = plan.readers.len();
    let shared = Arc::new(Shared {
        connect: Semaphore::new(plan.connect_concurrency.max(1)),
        addrs,
        measure_from: AtomicU64::new(u64::MAX),
        stopping: AtomicBool::new(false),
        profiles: Default::default(),
        hubs: plan.hubs.iter().map(|_| HubStats::default()).collect(),
        slots: (0..readers).map(|_| Slot::default()).collect(),
        connected: AtomicU64::new(0),
        handshakes: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        refusals: AtomicU64::new(0),
        admitted_timeouts: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        initial: AtomicU64::new(0),
        initial_done_ms: AtomicU64::new(0),
        started: Instant::now(),
        storm_at: AtomicU64::new(u64::MAX),
        storm_window_ns: AtomicU64::new(0),
        storm_go: watch::Sender::new(false),
        storm: StormStats::default(),
        plan,
    });
    emit(&WorkerMsg::Started { pid: std::process::id(), open_files_soft });
    for i in 0..readers {
        tokio::spawn(reader(Arc::clone(&shared), i));
    }
    let ticker = tokio::spawn(ticks(Arc::clone(&shared)));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            // The coordinator is gone: nothing to report to.
            Ok(None) | Err(_) => return ExitCode::FAILURE,
        };
        match serde_json::from_str::<Command>(&line) {
            Ok(Command::Measure { from_unix_ns }) => shared.measure_from.store(from_unix_ns, Ordering::Relaxed),
            Ok(Command::Storm { at_unix_ns, window_ms }) => {
                shared.storm_window_ns.store(window_ms.saturating_mul(1_000_000), Ordering::Relaxed);
                shared.storm_at.store(at_unix_ns, Ordering::Relaxed);
                let shared = Arc::clone(&shared);
                // Every worker gets the same wall-clock instant, so the
                // drop is simultaneous across processes.
                tokio::spawn(async move {
                    let wait = Duration::from_nanos(at_unix_ns.saturating_sub(now_ns()));
                    tokio::time::sleep(wait).await;
                    shared.storm_go.send_replace(true);
                });
            }
            Ok(Command::Finish { finals, last_publish_unix_ns, grace_ms }) => {
                let result = finish(&shared, &finals, &last_publish_unix_ns, grace_ms).await;
                ticker.abort();
                emit(&WorkerMsg::Result(Box::new(result)));
                // Exit without closing sockets one by one: the kernel does it.
                std::process::exit(0);
            }
            Err(e) => eprintln!("worker: bad command {line:?}: {e}"),
        }
    }
}

async fn ticks(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(Duration::from_millis(shared.plan.tick_ms.max(50)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let interval = {
            let mut h = shared.stats(Profile::Fast).hists.lock().unwrap_or_else(PoisonError::into_inner);
            let dump = h.interval.as_ref().map(Dump::of).unwrap_or_default();
            if let Some(i) = h.interval.as_mut() {
                i.reset();
            }
            dump
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        emit(&WorkerMsg::Tick(Tick {
            connected: load(&shared.connected),
            handshakes: load(&shared.handshakes),
            connect_failures: load(&shared.connect_failures),
            frames: load(&shared.frames),
            bytes: load(&shared.bytes),
            initial_done_ms: load(&shared.initial_done_ms),
            fast_latency_interval: interval,
            storm_dropped: load(&shared.storm.dropped),
            storm_back: load(&shared.storm.back),
            refusals: load(&shared.refusals),
            admitted_timeouts: load(&shared.admitted_timeouts),
        }));
    }
}

/// How a session ended.
struct End {
    label: String,
    retry_after_ms: Option<u64>,
    /// The server refused (a long-poll's 503 mid-session): its reason.
    refused: Option<String>,
    /// The reader dropped itself at the storm instant.
    storm_drop: bool,
    /// The session delivered at least one state (the client's rule for
    /// resetting its backoff).
    got_state: bool,
}

impl End {
    fn of(event: &Event) -> Self {
        let (label, retry_after_ms, refused) = match event {
            Event::Closed { code, reason } => {
                (format!("close-{code}"), frame_number(reason.as_bytes(), b"\"retry_after_ms\":"), None)
            }
            Event::Refused(r) => (format!("refused-{}", r.reason), r.retry_after_ms, Some(r.reason.clone())),
            Event::Eof => ("eof".into(), None, None),
            Event::Error(e) => (if e.contains("reset") { "reset" } else { "error" }.into(), None, None),
            Event::Frame(_) => ("frame".into(), None, None),
        };
        End { label, retry_after_ms, refused, storm_drop: false, got_state: false }
    }

    fn labelled(label: &str) -> Self {
        End { label: label.into(), retry_after_ms: None, refused: None, storm_drop: false, got_state: false }
    }
}

fn frame_number(hay: &[u8], key: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(hay).ok()?;
    let key = std::str::from_utf8(key).ok()?;
    let rest = s.split(key).nth(1)?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Full jitter: uniform over `[0, min(cap, base·2^attempt))`.
fn full_jitter(base_ms: u64, cap_ms: u64, attempt: u32) -> Duration {
    let window = base_ms.saturating_mul(1u64 << attempt.min(30)).min(cap_ms).max(1);
    Duration::from_millis(fastrand::u64(0..window))
}

/// The product client's delay (`spillway.backoff` in `static/client.js`):
/// full jitter, and never sooner than the server's hint.
fn client_backoff(base_ms: u64, cap_ms: u64, attempt: u32, hint_ms: Option<u64>) -> Duration {
    let jitter = full_jitter(base_ms, cap_ms, attempt);
    match hint_ms {
        Some(h) if h > 0 => jitter.max(Duration::from_millis(h.min(MAX_HINT_MS))),
        _ => jitter,
    }
}

/// A server hint above five minutes is treated as a bug, as the client does.
const MAX_HINT_MS: u64 = 300_000;

async fn reader(shared: Arc<Shared>, index: usize) {
    let spec = shared.plan.readers[index];
    let knobs = &shared.plan.knobs;
    let slow = matches!(spec.profile, Profile::ThreeG | Profile::Stalled);
    let opts = SocketOpts {
        source: spec.source,
        rcvbuf: slow.then_some(knobs.slow_rcvbuf),
        bandwidth: (spec.profile == Profile::ThreeG).then_some(knobs.bandwidth),
        read_buffer: knobs.read_buffer,
        long_poll_wait_s: shared.plan.long_poll_wait_s,
    };
    let hub = usize::from(spec.hub).min(shared.addrs.len().saturating_sub(1));
    let url = shared.plan.hubs[hub].urls[spec.topic as usize].clone();
    let addr = shared.addrs[hub];
    let first_frame_timeout = Duration::from_millis(shared.plan.first_frame_timeout_ms.max(1));
    let stats = shared.stats(spec.profile);
    let slot = &shared.slots[index];
    let mut storm_rx = spec.drops.then(|| shared.storm_go.subscribe());
    // Set from the drop until the reader is back.
    let mut dropped_at: Option<Instant> = None;
    let mut attempt = 0u32;
    let mut first = true;
    // A reconnect is a connection after the first successful one (a reader
    // refused at first and then admitted has not reconnected).
    let mut ever_connected = false;
    loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        let in_storm = dropped_at.is_some();
        if in_storm {
            shared.storm.attempts.fetch_add(1, Ordering::Relaxed);
        }
        let since = if shared.plan.resume {
            slot.position.lock().unwrap_or_else(PoisonError::into_inner).clone()
        } else {
            None
        };
        let connected = {
            let Ok(_permit) = shared.connect.acquire().await else { return };
            let started = Instant::now();
            let conn =
                Conn::connect(shared.plan.transport, addr, &url, since.as_deref(), opts, HANDSHAKE_TIMEOUT).await;
            conn.map(|c| (c, started.elapsed()))
        };
        if first {
            shared.initial_attempt_over();
        }
        let backoff = |attempt: u32, hint: Option<u64>| {
            client_backoff(knobs.backoff_base_ms, knobs.backoff_cap_ms, attempt, hint)
        };
        let wait = match connected {
            Err(ConnectError::Refused(r)) => {
                shared.refused(stats, in_storm, &r.reason);
                count_end(stats, &format!("refused-{}", r.reason));
                attempt += 1;
                backoff(attempt - 1, r.retry_after_ms)
            }
            Err(ConnectError::Failed(e)) => {
                stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                if in_storm {
                    shared.storm.failures.fetch_add(1, Ordering::Relaxed);
                }
                if attempt == 0 && first {
                    tracing_line(&format!("connect failed: {e}"));
                }
                count_end(stats, "connect-failed");
                attempt += 1;
                backoff(attempt - 1, None)
            }
            Ok((mut conn, took)) => {
                // Admitted: the first frame (`hello`, a long-poll's first
                // answer) must follow, or the admission was worth nothing.
                match tokio::time::timeout(first_frame_timeout, conn.next()).await {
                    Err(_) => {
                        drop(conn);
                        stats.admitted_timeouts.fetch_add(1, Ordering::Relaxed);
                        shared.admitted_timeouts.fetch_add(1, Ordering::Relaxed);
                        if in_storm {
                            shared.storm.admitted_timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        count_end(stats, "first-frame-timeout");
                        attempt += 1;
                        backoff(attempt - 1, None)
                    }
                    Ok(Event::Frame(bytes)) if Refusal::of_notice(&bytes, conn.sse_retry()).is_some() => {
                        // An event stream refuses with 200 and a lone notice.
                        let r = Refusal::of_notice(&bytes, conn.sse_retry())
                            .unwrap_or_else(|| Refusal { reason: "notice".into(), retry_after_ms: None });
                        shared.refused(stats, in_storm, &r.reason);
                        count_end(stats, &format!("refused-{}", r.reason));
                        attempt += 1;
                        backoff(attempt - 1, r.retry_after_ms)
                    }
                    Ok(Event::Frame(bytes)) => {
                        {
                            let mut h = stats.hists.lock().unwrap_or_else(PoisonError::into_inner);
                            record(Hists::get(&mut h.handshake), took.as_micros() as u64);
                        }
                        stats.connects.fetch_add(1, Ordering::Relaxed);
                        if ever_connected {
                            stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        ever_connected = true;
                        shared.handshakes.fetch_add(1, Ordering::Relaxed);
                        shared.connected.fetch_add(1, Ordering::Relaxed);
                        slot.connected.store(true, Ordering::Relaxed);
                        if let Some(at) = dropped_at.take() {
                            back_from_storm(&shared, at);
                        }
                        // A reader that was not connected at the storm
                        // instant missed it; it does not drop later.
                        if storm_rx.as_ref().is_some_and(|rx| *rx.borrow()) {
                            storm_rx = None;
                        }
                        let end = session(&shared, spec, slot, conn, &bytes, &mut storm_rx).await;
                        slot.connected.store(false, Ordering::Relaxed);
                        shared.connected.fetch_sub(1, Ordering::Relaxed);
                        count_end(stats, &end.label);
                        if let Some(reason) = &end.refused {
                            shared.refused(stats, false, reason);
                        }
                        if end.storm_drop {
                            // The worst case: every dropped reader tries
                            // again at once, then follows the hints.
                            shared.storm.dropped.fetch_add(1, Ordering::Relaxed);
                            dropped_at = Some(Instant::now());
                            storm_rx = None;
                            attempt = 0;
                            Duration::ZERO
                        } else {
                            if end.got_state {
                                attempt = 0;
                            }
                            attempt += 1;
                            backoff(attempt - 1, end.retry_after_ms)
                        }
                    }
                    Ok(other) => {
                        let end = End::of(&other);
                        count_end(stats, &end.label);
                        if let Some(reason) = &end.refused {
                            shared.refused(stats, in_storm, reason);
                        }
                        attempt += 1;
                        backoff(attempt - 1, end.retry_after_ms)
                    }
                }
            }
        };
        first = false;
        tokio::time::sleep(wait).await;
    }
}

fn back_from_storm(shared: &Shared, dropped_at: Instant) {
    shared.storm.back.fetch_add(1, Ordering::Relaxed);
    shared.storm.last_back_ns.fetch_max(now_ns(), Ordering::Relaxed);
    let mut h = shared.storm.hists.lock().unwrap_or_else(PoisonError::into_inner);
    record(Hists::get(&mut h.back_after), dropped_at.elapsed().as_micros() as u64);
}

fn tracing_line(text: &str) {
    eprintln!("worker {}: {text}", std::process::id());
}

fn count_end(stats: &ProfileStats, label: &str) {
    *stats.ends.lock().unwrap_or_else(PoisonError::into_inner).entry(label.to_string()).or_default() += 1;
}

/// The next event, or `None` when the storm instant comes first.
async fn next_or_storm(conn: &mut Conn, storm: &mut Option<watch::Receiver<bool>>) -> Option<Event> {
    let Some(rx) = storm.as_mut() else { return Some(conn.next().await) };
    let fired = tokio::select! {
        event = conn.next() => return Some(event),
        r = rx.wait_for(|go| *go) => r.is_ok(),
    };
    if fired {
        return None;
    }
    // The sender is gone (cannot happen while the worker runs): read on.
    *storm = None;
    Some(conn.next().await)
}

fn storm_end(label: &str) -> End {
    End { storm_drop: true, ..End::labelled(label) }
}

/// One connection's life, by profile. `first` is the frame that proved the
/// connection (usually `hello`).
async fn session(
    shared: &Shared,
    spec: ReaderSpec,
    slot: &Slot,
    mut conn: Conn,
    first: &[u8],
    storm: &mut Option<watch::Receiver<bool>>,
) -> End {
    let knobs = &shared.plan.knobs;
    let mut reading = Reading { first: true, states: 0 };
    reading.on_frame(shared, spec, slot, first);
    let mut end = match spec.profile {
        Profile::Fast | Profile::ThreeG => loop {
            match next_or_storm(&mut conn, storm).await {
                None => break storm_end("storm-drop"),
                Some(Event::Frame(bytes)) => reading.on_frame(shared, spec, slot, &bytes),
                Some(other) => break End::of(&other),
            }
        },
        Profile::Flapping => {
            let lifetime = fastrand::u64(knobs.flap_min_ms..=knobs.flap_max_ms.max(knobs.flap_min_ms));
            let drop_at = Instant::now() + Duration::from_millis(lifetime);
            loop {
                tokio::select! {
                    event = next_or_storm(&mut conn, storm) => match event {
                        None => break storm_end("storm-drop"),
                        Some(Event::Frame(bytes)) => reading.on_frame(shared, spec, slot, &bytes),
                        Some(other) => break End::of(&other),
                    },
                    // Drop without a close frame, as a lost network does.
                    () = tokio::time::sleep_until(drop_at) => break End::labelled("client-drop"),
                }
            }
        }
        Profile::Stalled => {
            // The greeting established the subscription; now stop reading:
            // the socket's receive buffer fills and the server's send
            // buffer behind it.
            let stall = async {
                match knobs.stall_resume_ms {
                    None => std::future::pending::<()>().await,
                    Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                }
            };
            let stormed = async {
                if let Some(rx) = storm.as_mut()
                    && rx.wait_for(|go| *go).await.is_ok()
                {
                    return;
                }
                std::future::pending::<()>().await
            };
            let dropped = tokio::select! {
                () = stall => false,
                () = stormed => true,
            };
            if dropped {
                storm_end("storm-drop")
            } else {
                loop {
                    match next_or_storm(&mut conn, storm).await {
                        None => break storm_end("storm-drop"),
                        Some(Event::Frame(bytes)) => reading.on_frame(shared, spec, slot, &bytes),
                        Some(other) => break End::of(&other),
                    }
                }
            }
        }
    };
    // Dropping the connection here closes it without a close frame.
    drop(conn);
    end.got_state = reading.states > 0;
    end
}

struct Reading {
    /// The first state frame of a connection is the snapshot it joined on,
    /// not a delivery of a fresh publish: no latency for it.
    first: bool,
    /// State frames received on this connection.
    states: u64,
}

impl Reading {
    fn on_frame(&mut self, shared: &Shared, spec: ReaderSpec, slot: &Slot, bytes: &[u8]) {
        let stats = shared.stats(spec.profile);
        let now = now_ns();
        stats.frames.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        shared.frames.fetch_add(1, Ordering::Relaxed);
        shared.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let fields = frame::parse(bytes);
        let (Some(seq), Some(ts)) = (fields.seq, fields.ts) else { return };
        self.states += 1;
        if shared.plan.resume
            && let Some(pos) = frame::position(bytes)
        {
            *slot.position.lock().unwrap_or_else(PoisonError::into_inner) = Some(pos);
        }
        if let Some(skipped) = fields.skipped {
            stats.skipped_field.fetch_add(skipped, Ordering::Relaxed);
        }
        let previous = slot.last_seq.swap(seq + 1, Ordering::Relaxed);
        slot.last_at_ns.store(now, Ordering::Relaxed);
        if self.first {
            self.first = false;
            return;
        }
        if previous > 0 && seq + 1 > previous + 1 {
            stats.seq_gaps.fetch_add(seq - previous, Ordering::Relaxed);
        }
        if ts >= shared.measure_from.load(Ordering::Relaxed) {
            stats.measured_frames.fetch_add(1, Ordering::Relaxed);
            let micros = now.saturating_sub(ts) / 1000;
            let undisturbed = !spec.drops;
            {
                let mut h = stats.hists.lock().unwrap_or_else(PoisonError::into_inner);
                record(Hists::get(&mut h.latency), micros);
                // In a storm the chart follows the readers that stay.
                if spec.profile == Profile::Fast && (undisturbed || !shared.plan.storm) {
                    record(Hists::get(&mut h.interval), micros);
                }
            }
            if spec.profile == Profile::Fast {
                if let Some(hub) = shared.hubs.get(usize::from(spec.hub)) {
                    let mut h = hub.latency.lock().unwrap_or_else(PoisonError::into_inner);
                    record(Hists::get(&mut h), micros);
                }
                if shared.plan.storm && undisturbed {
                    let at = shared.storm_at.load(Ordering::Relaxed);
                    let window = shared.storm_window_ns.load(Ordering::Relaxed);
                    let mut h = shared.storm.hists.lock().unwrap_or_else(PoisonError::into_inner);
                    let phase = if ts < at {
                        &mut h.before
                    } else if ts < at.saturating_add(window) {
                        &mut h.storm
                    } else {
                        &mut h.after
                    };
                    record(Hists::get(phase), micros);
                }
            }
        }
    }
}

async fn finish(shared: &Shared, finals: &[u64], last_publish_ns: &[u64], grace_ms: u64) -> WorkerResult {
    shared.stopping.store(true, Ordering::Relaxed);
    let on_final = |i: usize, s: &Slot| {
        let topic = shared.plan.readers[i].topic as usize;
        finals.get(topic).is_none_or(|f| s.last_seq.load(Ordering::Relaxed) > *f)
    };
    let deadline = Instant::now() + Duration::from_millis(grace_ms);
    loop {
        let waiting = shared.slots.iter().enumerate().any(|(i, s)| {
            shared.plan.readers[i].profile.should_be_fresh() && s.connected.load(Ordering::Relaxed) && !on_final(i, s)
        });
        if !waiting || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut result = WorkerResult {
        worker: shared.plan.worker,
        pid: std::process::id(),
        cpu_s: procfs::cpu_seconds(std::process::id(), crate::sys::clock_ticks_per_second()).unwrap_or(0.0),
        rss_peak_bytes: procfs::vm_bytes(std::process::id(), "VmHWM").unwrap_or(0),
        hubs: vec![HubResult::default(); shared.plan.hubs.len()],
        ..WorkerResult::default()
    };
    let mut final_after: BTreeMap<Profile, Histogram<u64>> = BTreeMap::new();
    let mut hub_final_after: Vec<Histogram<u64>> = shared.plan.hubs.iter().map(|_| new_hist()).collect();
    for (i, s) in shared.slots.iter().enumerate() {
        let spec = shared.plan.readers[i];
        let profile = spec.profile;
        let hub = usize::from(spec.hub).min(result.hubs.len().saturating_sub(1));
        let entry = result.profiles.entry(profile).or_default();
        entry.readers += 1;
        result.hubs[hub].readers += 1;
        if !s.connected.load(Ordering::Relaxed) {
            continue;
        }
        entry.connected_at_end += 1;
        result.hubs[hub].connected_at_end += 1;
        if on_final(i, s) {
            entry.on_final += 1;
            let topic = spec.topic as usize;
            let sent = last_publish_ns.get(topic).copied().unwrap_or(0);
            let after = s.last_at_ns.load(Ordering::Relaxed).saturating_sub(sent) / 1000;
            record(final_after.entry(profile).or_insert_with(new_hist), after);
            if profile.should_be_fresh() {
                result.hubs[hub].on_final += 1;
                record(&mut hub_final_after[hub], after);
            }
        } else {
            entry.not_on_final += 1;
            if profile.should_be_fresh() {
                result.hubs[hub].not_on_final += 1;
            }
        }
    }
    for (h, out) in result.hubs.iter_mut().enumerate() {
        out.final_after = Dump::of(&hub_final_after[h]);
        let lat = shared.hubs[h].latency.lock().unwrap_or_else(PoisonError::into_inner);
        out.fast_latency = lat.as_ref().map(Dump::of).unwrap_or_default();
    }
    for profile in Profile::ALL {
        let Some(entry) = result.profiles.get_mut(&profile) else { continue };
        let stats = shared.stats(profile);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        entry.frames = load(&stats.frames);
        entry.bytes = load(&stats.bytes);
        entry.skipped_field = load(&stats.skipped_field);
        entry.seq_gaps = load(&stats.seq_gaps);
        entry.connects = load(&stats.connects);
        entry.connect_failures = load(&stats.connect_failures);
        entry.reconnects = load(&stats.reconnects);
        entry.measured_frames = load(&stats.measured_frames);
        entry.admitted_timeouts = load(&stats.admitted_timeouts);
        entry.refusals = stats.refusals.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let h = stats.hists.lock().unwrap_or_else(PoisonError::into_inner);
        entry.latency = h.latency.as_ref().map(Dump::of).unwrap_or_default();
        entry.handshake = h.handshake.as_ref().map(Dump::of).unwrap_or_default();
        entry.ends = stats.ends.lock().unwrap_or_else(PoisonError::into_inner).clone();
        entry.final_after = final_after.get(&profile).map(Dump::of).unwrap_or_default();
    }
    if shared.plan.storm {
        let st = &shared.storm;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let h = st.hists.lock().unwrap_or_else(PoisonError::into_inner);
        let dump = |x: &Option<Histogram<u64>>| x.as_ref().map(Dump::of).unwrap_or_default();
        result.storm = Some(StormResult {
            dropped: load(&st.dropped),
            back: load(&st.back),
            attempts: load(&st.attempts),
            refusals: st.refusals.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            failures: load(&st.failures),
            admitted_timeouts: load(&st.admitted_timeouts),
            back_after: dump(&h.back_after),
            last_back_unix_ns: load(&st.last_back_ns),
            latency_before: dump(&h.before),
            latency_storm: dump(&h.storm),
            latency_after: dump(&h.after),
        });
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_floored_by_the_hint() {
        for attempt in 0..8 {
            let window = (500u64 << attempt).min(30_000);
            let d = client_backoff(500, 30_000, attempt, None);
            assert!(d < Duration::from_millis(window), "attempt {attempt}: {d:?}");
            let hinted = client_backoff(500, 30_000, attempt, Some(20_000));
            assert!(hinted >= Duration::from_millis(20_000) && hinted < Duration::from_millis(30_000));
        }
        // A hint above five minutes is capped there, as the client does.
        assert_eq!(client_backoff(1, 1, 0, Some(10_000_000)), Duration::from_millis(MAX_HINT_MS));
    }

    #[test]
    fn close_reasons_carry_hints() {
        let end = End::of(&Event::Closed { code: 4001, reason: r#"{"retry_after_ms":2500}"#.into() });
        assert_eq!((end.label.as_str(), end.retry_after_ms), ("close-4001", Some(2500)));
        let refused = End::of(&Event::Refused(Refusal { reason: "accept_rate".into(), retry_after_ms: Some(9) }));
        assert_eq!((refused.label.as_str(), refused.refused.as_deref()), ("refused-accept_rate", Some("accept_rate")));
    }
}
