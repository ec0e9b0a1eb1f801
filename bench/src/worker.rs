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
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::frame;
use crate::hist::{Dump, new_hist, record};
use crate::plan::{Command, Profile, ReaderSpec, Tick, WorkerMsg, WorkerPlan, WorkerResult};
use crate::procfs;
use crate::transport::{Conn, Event, SocketOpts};

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
    hists: Mutex<Hists>,
    ends: Mutex<BTreeMap<String, u64>>,
}

/// One reader's latest position, read at the end for freshness.
#[derive(Default)]
struct Slot {
    /// The last sequence number received, plus one (0: none yet).
    last_seq: AtomicU64,
    /// When it arrived, Unix nanoseconds.
    last_at_ns: AtomicU64,
    connected: AtomicBool,
}

struct Shared {
    plan: WorkerPlan,
    addr: SocketAddr,
    connect: Semaphore,
    measure_from: AtomicU64,
    stopping: AtomicBool,
    profiles: [ProfileStats; 4],
    slots: Vec<Slot>,
    connected: AtomicU64,
    handshakes: AtomicU64,
    connect_failures: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Readers whose first connection attempt has ended.
    initial: AtomicU64,
    initial_done_ms: AtomicU64,
    started: Instant,
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
}

fn emit(msg: &WorkerMsg) {
    if let Ok(line) = serde_json::to_string(msg) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

async fn run(plan: WorkerPlan, open_files_soft: u64) -> ExitCode {
    let addr: SocketAddr = match plan.connect_addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("worker: bad address {}: {e}", plan.connect_addr);
            return ExitCode::FAILURE;
        }
    };
    let readers = plan.readers.len();
    let shared = Arc::new(Shared {
        connect: Semaphore::new(plan.connect_concurrency.max(1)),
        addr,
        measure_from: AtomicU64::new(u64::MAX),
        stopping: AtomicBool::new(false),
        profiles: Default::default(),
        slots: (0..readers).map(|_| Slot::default()).collect(),
        connected: AtomicU64::new(0),
        handshakes: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        initial: AtomicU64::new(0),
        initial_done_ms: AtomicU64::new(0),
        started: Instant::now(),
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
        }));
    }
}

/// How a session ended.
struct End {
    label: String,
    retry_after_ms: Option<u64>,
}

impl End {
    fn of(event: &Event) -> Self {
        match event {
            Event::Closed { code, reason } => End {
                label: format!("close-{code}"),
                retry_after_ms: frame_number(reason.as_bytes(), b"\"retry_after_ms\":"),
            },
            Event::Eof => End { label: "eof".into(), retry_after_ms: None },
            Event::Error(e) => {
                let label = if e.contains("reset") { "reset" } else { "error" };
                End { label: label.into(), retry_after_ms: None }
            }
            Event::Frame(_) => End { label: "frame".into(), retry_after_ms: None },
        }
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

async fn reader(shared: Arc<Shared>, index: usize) {
    let spec = shared.plan.readers[index];
    let knobs = &shared.plan.knobs;
    let slow = matches!(spec.profile, Profile::ThreeG | Profile::Stalled);
    let opts = SocketOpts {
        source: spec.source,
        rcvbuf: slow.then_some(knobs.slow_rcvbuf),
        bandwidth: (spec.profile == Profile::ThreeG).then_some(knobs.bandwidth),
        read_buffer: knobs.read_buffer,
    };
    let url = shared.plan.urls[spec.topic as usize].clone();
    let stats = shared.stats(spec.profile);
    let slot = &shared.slots[index];
    let mut attempt = 0u32;
    let mut first = true;
    loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        let connected = {
            let Ok(_permit) = shared.connect.acquire().await else { return };
            let started = Instant::now();
            let conn = Conn::connect(shared.plan.transport, shared.addr, &url, opts, HANDSHAKE_TIMEOUT).await;
            conn.map(|c| (c, started.elapsed()))
        };
        if first {
            shared.initial_attempt_over();
        }
        let wait = match connected {
            Err(e) => {
                stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                if attempt == 0 && first {
                    tracing_line(&format!("connect failed: {e}"));
                }
                count_end(stats, "connect-failed");
                let wait = full_jitter(knobs.backoff_base_ms, knobs.backoff_cap_ms, attempt);
                attempt += 1;
                wait
            }
            Ok((conn, took)) => {
                {
                    let mut h = stats.hists.lock().unwrap_or_else(PoisonError::into_inner);
                    record(Hists::get(&mut h.handshake), took.as_micros() as u64);
                }
                stats.connects.fetch_add(1, Ordering::Relaxed);
                if !first {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                shared.handshakes.fetch_add(1, Ordering::Relaxed);
                shared.connected.fetch_add(1, Ordering::Relaxed);
                slot.connected.store(true, Ordering::Relaxed);
                let opened = Instant::now();
                let end = session(&shared, spec, slot, conn).await;
                slot.connected.store(false, Ordering::Relaxed);
                shared.connected.fetch_sub(1, Ordering::Relaxed);
                count_end(stats, &end.label);
                if opened.elapsed() > Duration::from_millis(knobs.backoff_cap_ms) {
                    attempt = 0;
                }
                let wait = end
                    .retry_after_ms
                    .map(Duration::from_millis)
                    .unwrap_or_else(|| full_jitter(knobs.backoff_base_ms, knobs.backoff_cap_ms, attempt));
                attempt += 1;
                wait
            }
        };
        first = false;
        tokio::time::sleep(wait).await;
    }
}

fn tracing_line(text: &str) {
    eprintln!("worker {}: {text}", std::process::id());
}

fn count_end(stats: &ProfileStats, label: &str) {
    *stats.ends.lock().unwrap_or_else(PoisonError::into_inner).entry(label.to_string()).or_default() += 1;
}

/// One connection's life, by profile.
async fn session(shared: &Shared, spec: ReaderSpec, slot: &Slot, mut conn: Conn) -> End {
    let knobs = &shared.plan.knobs;
    let mut reading = Reading { first: true };
    match spec.profile {
        Profile::Fast | Profile::ThreeG => loop {
            let event = conn.next().await;
            if let Event::Frame(bytes) = &event {
                reading.on_frame(shared, spec, slot, bytes);
            } else {
                return End::of(&event);
            }
        },
        Profile::Flapping => {
            let lifetime = fastrand::u64(knobs.flap_min_ms..=knobs.flap_max_ms.max(knobs.flap_min_ms));
            let drop_at = Instant::now() + Duration::from_millis(lifetime);
            loop {
                tokio::select! {
                    event = conn.next() => {
                        if let Event::Frame(bytes) = &event {
                            reading.on_frame(shared, spec, slot, bytes);
                        } else {
                            return End::of(&event);
                        }
                    }
                    () = tokio::time::sleep_until(drop_at) => {
                        // Drop without a close frame, as a lost network does.
                        drop(conn);
                        return End { label: "client-drop".into(), retry_after_ms: None };
                    }
                }
            }
        }
        Profile::Stalled => {
            // Take the greeting so the subscription is established, then stop
            // reading: the socket's receive buffer fills and the server's
            // send buffer behind it.
            match tokio::time::timeout(Duration::from_secs(10), conn.next()).await {
                Ok(Event::Frame(bytes)) => reading.on_frame(shared, spec, slot, &bytes),
                Ok(other) => return End::of(&other),
                Err(_) => {}
            }
            match knobs.stall_resume_ms {
                None => std::future::pending::<()>().await,
                Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            }
            loop {
                let event = conn.next().await;
                if let Event::Frame(bytes) = &event {
                    reading.on_frame(shared, spec, slot, bytes);
                } else {
                    return End::of(&event);
                }
            }
        }
    }
}

struct Reading {
    /// The first state frame of a connection is the snapshot it joined on,
    /// not a delivery of a fresh publish: no latency for it.
    first: bool,
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
            let mut h = stats.hists.lock().unwrap_or_else(PoisonError::into_inner);
            record(Hists::get(&mut h.latency), micros);
            if spec.profile == Profile::Fast {
                record(Hists::get(&mut h.interval), micros);
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
        ..WorkerResult::default()
    };
    let mut final_after: BTreeMap<Profile, Histogram<u64>> = BTreeMap::new();
    for (i, s) in shared.slots.iter().enumerate() {
        let profile = shared.plan.readers[i].profile;
        let entry = result.profiles.entry(profile).or_default();
        entry.readers += 1;
        if !s.connected.load(Ordering::Relaxed) {
            continue;
        }
        entry.connected_at_end += 1;
        if on_final(i, s) {
            entry.on_final += 1;
            let topic = shared.plan.readers[i].topic as usize;
            let sent = last_publish_ns.get(topic).copied().unwrap_or(0);
            let after = s.last_at_ns.load(Ordering::Relaxed).saturating_sub(sent) / 1000;
            record(final_after.entry(profile).or_insert_with(new_hist), after);
        } else {
            entry.not_on_final += 1;
        }
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
        let h = stats.hists.lock().unwrap_or_else(PoisonError::into_inner);
        entry.latency = h.latency.as_ref().map(Dump::of).unwrap_or_default();
        entry.handshake = h.handshake.as_ref().map(Dump::of).unwrap_or_default();
        entry.ends = stats.ends.lock().unwrap_or_else(PoisonError::into_inner).clone();
        entry.final_after = final_after.get(&profile).map(Dump::of).unwrap_or_default();
    }
    result
}
