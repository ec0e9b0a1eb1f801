//! The coordinator: starts (or attaches to) the server, spreads the readers
//! over worker processes, publishes, samples the server, and assembles the
//! result.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::cli::{Args, PublishTo, Scenario, split_counts};
use crate::fleet::Fleet;
use crate::hist::{Summary, new_hist};
use crate::plan::{Command, HubTarget, Profile, ProfileKnobs, ReaderSpec, Tick, WorkerPlan, WorkerResult};
use crate::procfs::{self, SsSample};
use crate::publisher::{self, PubStats, Publisher};
use crate::server::{self, Hubs};
use crate::sys::FileLimits;
use crate::worker::now_ns;

/// One point of the time series.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Point {
    pub(crate) t_s: f64,
    pub(crate) phase: &'static str,
    pub(crate) server_rss_bytes: Option<u64>,
    pub(crate) server_cpu_cores: Option<f64>,
    pub(crate) connected: u64,
    pub(crate) frames_per_s: f64,
    pub(crate) publishes_per_s: f64,
    pub(crate) fast_p50_ms: Option<f64>,
    pub(crate) fast_p99_ms: Option<f64>,
    pub(crate) fast_max_ms: Option<f64>,
    pub(crate) kernel_bytes: Option<u64>,
    /// RSS of every hub (hub 1 first; `server_rss_bytes` is hub 1's).
    pub(crate) hub_rss_bytes: Vec<Option<u64>>,
    /// Refusals the readers have seen so far (cumulative).
    pub(crate) refusals: u64,
    /// `storm`: dropped readers so far, and those of them back.
    pub(crate) storm_dropped: u64,
    pub(crate) storm_back: u64,
}

/// Everything the sampler sees, shared with the phases.
#[derive(Debug, Default)]
struct Samples {
    phase: &'static str,
    points: Vec<Point>,
    ss: Vec<(f64, SsSample)>,
}

/// A snapshot of the server at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Moment {
    t_s: f64,
    rss_bytes: Option<u64>,
    cpu_s: Option<f64>,
    #[serde(skip)]
    metrics: Option<BTreeMap<String, f64>>,
}

struct Ctx {
    start: Instant,
    /// Hub 1's port, for `ss`.
    port: u16,
    publisher: Arc<Publisher>,
    /// Every hub's PID and base URL (hub 1 first).
    hub_pids: Vec<Option<u32>>,
    hub_urls: Vec<String>,
    topics: Vec<String>,
    ticks_per_s: u64,
    samples: Arc<Mutex<Samples>>,
    pub_stats: Arc<PubStats>,
    bar: ProgressBar,
}

impl Ctx {
    fn t(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// A moment of every hub (hub 1 first).
    async fn moments(&self) -> Vec<Moment> {
        let mut out = Vec::with_capacity(self.hub_pids.len());
        for (pid, url) in self.hub_pids.iter().zip(&self.hub_urls) {
            out.push(Moment {
                t_s: self.t(),
                rss_bytes: pid.and_then(procfs::rss_bytes),
                cpu_s: pid.and_then(|p| procfs::cpu_seconds(p, self.ticks_per_s)),
                metrics: server::scrape(self.publisher.client(), url).await,
            });
        }
        out
    }

    async fn ss_now(&self) -> Option<SsSample> {
        let port = self.port;
        let sample = tokio::task::spawn_blocking(move || procfs::ss_sample(port)).await.ok().flatten()?;
        self.samples.lock().unwrap_or_else(PoisonError::into_inner).ss.push((self.t(), sample.clone()));
        Some(sample)
    }

    fn phase(&self, phase: &'static str, len: u64) {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner).phase = phase;
        self.bar.set_prefix(phase);
        self.bar.set_length(len);
        self.bar.set_position(0);
    }
}

fn bar(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(1);
    if let Ok(style) = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos:>6}/{len:6} {elapsed:>4} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Runs the scenario and returns the JSON result.
pub(crate) async fn run(args: Args, limits: Option<FileLimits>) -> Result<Value, String> {
    args.validate()?;
    let mix = args.mix()?;
    let readers = args.readers();
    let start = Instant::now();
    let loadavg_start = crate::report::loadavg();
    let started_unix_ms = now_ns() / 1_000_000;
    // SIGINT is ours from here on, so that no interruption leaves hubs, a
    // database or Redis keys behind: hubs being started are waited for (a
    // bounded wait) and then stopped.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("cannot listen for Ctrl-C: {e}"))?;
    let mut hubs = {
        let mut starting = std::pin::pin!(Hubs::start(&args));
        let mut interrupted = false;
        let mut hubs = loop {
            tokio::select! {
                hubs = &mut starting => break hubs?,
                _ = sigint.recv() => {
                    interrupted = true;
                    eprintln!("interrupted; stopping once the hubs are up");
                }
            }
        };
        if interrupted {
            hubs.stop().await;
            return Err("interrupted before the readers came".into());
        }
        hubs
    };
    // Ctrl-C while publishing shortens the run (the publishing phase listens
    // for it and reports what it has); at any other moment it ends the run
    // here, so the hubs are still stopped and a multi-hub run's database and
    // Redis keys removed.
    let publishing = Arc::new(AtomicBool::new(false));
    let outcome = {
        let run = run_with_server(
            &args,
            &hubs,
            start,
            started_unix_ms,
            limits,
            &mix,
            readers,
            loadavg_start,
            Arc::clone(&publishing),
        );
        let mut run = std::pin::pin!(run);
        loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                _ = sigint.recv() => {
                    if !publishing.load(Ordering::Relaxed) {
                        break Err("interrupted; stopping the hubs and cleaning up".to_string());
                    }
                }
            }
        }
        // The run (its workers included) is dropped here, before the hubs stop.
    };
    if outcome.as_ref().is_err_and(|e| !e.starts_with("interrupted")) {
        for (h, server) in hubs.servers.iter().enumerate().filter(|(_, s)| s.spawned) {
            eprintln!("hub {} log (last lines):\n{}", h + 1, server.tail());
        }
    }
    hubs.stop().await;
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn run_with_server(
    args: &Args,
    hubs: &Hubs,
    start: Instant,
    started_unix_ms: u64,
    limits: Option<FileLimits>,
    mix: &[(Profile, f64)],
    readers: usize,
    loadavg_start: Option<[f64; 3]>,
    publishing: Arc<AtomicBool>,
) -> Result<Value, String> {
    let server = hubs.servers.first().ok_or("no server")?;
    let n_hubs = hubs.servers.len();
    // One template for every hub, or one per hub.
    let pick = |list: &[String], h: usize, default: String| match list.len() {
        0 => default,
        1 => list[0].clone(),
        _ => list[h].clone(),
    };
    let subscribe_templates: Vec<String> = (0..n_hubs)
        .map(|h| pick(&args.subscribe_url, h, args.transport.default_template(&hubs.servers[h].addr.to_string())))
        .collect();
    let publish_templates: Vec<String> = (0..n_hubs)
        .map(|h| pick(&args.publish_url, h, format!("http://{}/v1/topics/{{topic}}", hubs.servers[h].addr)))
        .collect();
    let mut connect_addrs = Vec::with_capacity(n_hubs);
    for (sub, publ) in subscribe_templates.iter().zip(&publish_templates) {
        connect_addrs.push(server::loopback_addr_of_url(&sub.replace("{topic}", "x")).await?);
        server::loopback_addr_of_url(&publ.replace("{topic}", "x")).await?;
    }
    let publish_template = publish_templates[0].clone();
    let round_robin = args.publish_to == PublishTo::RoundRobin && n_hubs > 1;
    let publisher = Arc::new(Publisher::new(
        publish_templates.clone(),
        round_robin,
        &args.publish_method,
        &args.token,
        &args.publish_header,
        args.payload,
    )?);
    let topic_count = if args.scenario == Scenario::Publish { args.topics.max(args.publishers) } else { args.topics };
    let topics: Vec<String> = (0..topic_count).map(|i| format!("{}-{i}", args.topic_prefix)).collect();
    let ctx = Ctx {
        start,
        port: server.addr.port(),
        publisher,
        hub_pids: hubs.servers.iter().map(|s| s.pid).collect(),
        hub_urls: hubs.servers.iter().map(|s| format!("http://{}", s.addr)).collect(),
        topics,
        ticks_per_s: crate::sys::clock_ticks_per_second(),
        samples: Arc::new(Mutex::new(Samples { phase: "start", ..Samples::default() })),
        pub_stats: Arc::new(PubStats::new(topic_count)),
        bar: bar(args.quiet),
    };

    // Every topic exists (sequence 0) before the readers come.
    ctx.phase("topics", topic_count as u64);
    for (i, topic) in ctx.topics.iter().enumerate() {
        if !ctx.publisher.publish(&ctx.pub_stats, i, topic, 0).await {
            let errors = ctx.pub_stats.errors.lock().unwrap_or_else(PoisonError::into_inner).clone();
            return Err(format!("cannot create topic {topic} through {publish_template}: {errors:?}"));
        }
        ctx.bar.inc(1);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_hubs = ctx.moments().await;
    let before = before_hubs[0].clone();
    let ss_before = ctx.ss_now().await;

    // Readers, spread over worker processes.
    let profiles = assign_profiles(readers, mix, args.seed);
    let workers =
        if readers == 0 { 0 } else { args.workers.unwrap_or(readers.div_ceil(args.per_worker.max(1))).max(1) };
    let nproc = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = args.worker_threads.unwrap_or((nproc / workers.max(1)).max(1));
    let knobs = ProfileKnobs {
        read_buffer: args.read_buffer,
        slow_rcvbuf: u32::try_from(args.slow_rcvbuf).unwrap_or(u32::MAX),
        bandwidth: args.bandwidth as u64,
        flap_min_ms: args.flap_min_ms,
        flap_max_ms: args.flap_max_ms,
        backoff_base_ms: args.backoff_base_ms,
        backoff_cap_ms: args.backoff_cap_ms,
        stall_resume_ms: args.stall_resume.map(|s| (s * 1000.0) as u64),
    };
    let targets: Vec<HubTarget> = (0..n_hubs)
        .map(|h| HubTarget {
            connect_addr: connect_addrs[h].to_string(),
            urls: ctx.topics.iter().map(|t| subscribe_templates[h].replace("{topic}", t)).collect(),
        })
        .collect();
    let storm = args.scenario == Scenario::Storm;
    let mut plans: Vec<WorkerPlan> = (0..workers)
        .map(|w| WorkerPlan {
            worker: w,
            transport: args.transport,
            hubs: targets.clone(),
            readers: Vec::new(),
            resume: args.resume(),
            first_frame_timeout_ms: args.first_frame_timeout_ms,
            long_poll_wait_s: args.long_poll_wait,
            storm,
            connect_concurrency: args.connect_concurrency,
            knobs: knobs.clone(),
            tick_ms: (args.sample_ms / 4).clamp(100, 1000),
            threads,
        })
        .collect();
    let spread = Spread {
        topics: args.topics,
        hubs: n_hubs,
        workers,
        conns_per_source: (!args.no_source_spread).then_some(args.conns_per_source),
        storm_drop_pct: storm.then_some(args.storm_drop_pct),
    };
    let (per_worker, readers_per_hub) = spread.readers(&profiles);
    for (plan, readers) in plans.iter_mut().zip(per_worker) {
        plan.readers = readers;
    }

    let stop_sampler = Arc::new(AtomicBool::new(false));
    let mut fleet = if workers > 0 { Some(Fleet::spawn(plans).await?) } else { None };
    let fleet_view = fleet.as_ref().map(|f| Arc::clone(&f.state));
    let sampler = tokio::spawn(sample_loop(
        ctx.hub_pids.clone(),
        ctx.ticks_per_s,
        ctx.start,
        Arc::clone(&ctx.samples),
        fleet_view,
        Arc::clone(&ctx.pub_stats),
        Arc::clone(&stop_sampler),
        args.sample_ms,
        ctx.bar.clone(),
    ));
    let ss_task =
        tokio::spawn(ss_loop(ctx.port, ctx.start, Arc::clone(&ctx.samples), Arc::clone(&stop_sampler), args.ss_every));

    // Connect phase.
    let mut connect = json!(null);
    let mut connected_moment = before.clone();
    let mut connected_hubs = before_hubs.clone();
    let mut ss_connected = ss_before.clone();
    if let Some(fleet) = &fleet {
        ctx.phase("connecting", readers as u64);
        let began = Instant::now();
        let limit = Duration::from_secs_f64((readers as f64 / 50.0).max(60.0));
        let mut last_progress = (0, Instant::now());
        let mut done_at = None;
        loop {
            let t = fleet.totals();
            ctx.bar.set_position(t.handshakes.min(readers as u64));
            // Every reader has tried once; readers that were refused keep
            // trying (by the hints), and the phase waits for them too.
            if t.initial_done_ms > 0 && t.refusals == 0 {
                done_at = Some(Duration::from_millis(t.initial_done_ms));
                break;
            }
            if t.initial_done_ms > 0 && t.handshakes >= readers as u64 {
                done_at = Some(began.elapsed());
                break;
            }
            let progress = t.handshakes + t.connect_failures + t.refusals;
            if progress != last_progress.0 {
                last_progress = (progress, Instant::now());
            }
            if began.elapsed() > limit || last_progress.1.elapsed() > Duration::from_secs(20) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = fleet.totals();
        let secs = done_at.unwrap_or_else(|| began.elapsed()).as_secs_f64();
        connect = json!({
            "readers": readers,
            "workers": workers,
            "worker_pids": fleet.pids(),
            "threads_per_worker": threads,
            "handshakes": t.handshakes,
            "failures": t.connect_failures,
            "refusals": t.refusals,
            "admitted_timeouts": t.admitted_timeouts,
            "all_connected": done_at.is_some(),
            "seconds": secs,
            "handshakes_per_s": if secs > 0.0 { t.handshakes.min(readers as u64) as f64 / secs } else { 0.0 },
        });
        if done_at.is_none() || t.connect_failures > 0 {
            eprintln!(
                "warning: only {} of {readers} readers connected ({} failures, {} refusals)",
                t.handshakes, t.connect_failures, t.refusals
            );
        }
        let settle = if args.scenario == Scenario::Idle { args.settle } else { 2.0 };
        ctx.phase("settling", (settle * 10.0) as u64);
        let settle_until = Instant::now() + Duration::from_secs_f64(settle);
        while Instant::now() < settle_until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            ctx.bar.inc(1);
        }
        connected_hubs = ctx.moments().await;
        connected_moment = connected_hubs[0].clone();
        ss_connected = ctx.ss_now().await;
    }
    let connected_now = fleet.as_ref().map_or(0, |f| f.totals().connected);

    // The measured phase.
    let duration = args.duration();
    let run_start_hubs = ctx.moments().await;
    let run_start = run_start_hubs[0].clone();
    let run_started_ns = now_ns();
    let storm_at_ns = run_started_ns + (args.storm_at() * 1e9) as u64;
    let storm_at_s = run_start.t_s + args.storm_at();
    if let Some(fleet) = fleet.as_mut() {
        let from = run_started_ns + (args.warmup * 1e9) as u64;
        fleet.send(&Command::Measure { from_unix_ns: from }).await;
        if storm {
            // Told now, done at the instant: every worker drops its share at
            // the same wall-clock time.
            let window_ms = (args.storm_window * 1000.0) as u64;
            fleet.send(&Command::Storm { at_unix_ns: storm_at_ns, window_ms }).await;
        }
    }
    ctx.phase(
        match args.scenario {
            Scenario::Idle => "holding",
            Scenario::Publish => "publishing",
            _ => "publishing",
        },
        duration.ceil() as u64,
    );
    let until = Instant::now() + Duration::from_secs_f64(duration);
    let mut tasks = Vec::new();
    match args.scenario {
        Scenario::Idle => {}
        Scenario::Fanout | Scenario::SlowReaders | Scenario::Storm | Scenario::MultiHub => {
            for (i, topic) in ctx.topics.iter().enumerate() {
                tasks.push(tokio::spawn(publisher::at_rate(
                    Arc::clone(&ctx.publisher),
                    Arc::clone(&ctx.pub_stats),
                    i,
                    topic.clone(),
                    args.rate,
                    until,
                    1,
                )));
            }
        }
        Scenario::Publish => {
            for p in 0..args.publishers.max(1) {
                let i = p % ctx.topics.len();
                tasks.push(tokio::spawn(publisher::flood(
                    Arc::clone(&ctx.publisher),
                    Arc::clone(&ctx.pub_stats),
                    i,
                    ctx.topics[i].clone(),
                    until,
                )));
            }
        }
    }
    let acked_before = ctx.pub_stats.acked.load(Ordering::Relaxed);
    let ack_hist_before = ctx.pub_stats.ack.lock().unwrap_or_else(PoisonError::into_inner).clone();
    publishing.store(true, Ordering::Relaxed);
    let interrupted = tokio::select! {
        () = tokio::time::sleep_until(until) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    publishing.store(false, Ordering::Relaxed);
    for task in tasks {
        if interrupted {
            task.abort();
        }
        let _ = task.await;
    }
    let run_secs = (run_start.t_s - ctx.t()).abs();
    let run_end_hubs = ctx.moments().await;
    let run_end = run_end_hubs[0].clone();
    // Every hub's sockets at the end (the `ss` series follows hub 1 only).
    let mut hub_ss_end = Vec::with_capacity(hubs.servers.len());
    for server in &hubs.servers {
        let port = server.addr.port();
        hub_ss_end.push(tokio::task::spawn_blocking(move || procfs::ss_sample(port)).await.ok().flatten());
    }
    let ss_end = ctx.ss_now().await;
    let acked_run = ctx.pub_stats.acked.load(Ordering::Relaxed) - acked_before;

    // A storm is over when every dropped reader is back: give stragglers
    // (refused, backing off) up to `STORM_BACK_GRACE` after publishing.
    if storm
        && !interrupted
        && let Some(f) = fleet.as_ref()
    {
        ctx.phase("reconnecting", 1);
        let deadline = Instant::now() + STORM_BACK_GRACE;
        loop {
            let t = f.totals();
            if t.storm_back >= t.storm_dropped || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Freshness: tell the workers the final sequence numbers.
    ctx.phase("finishing", 1);
    let finals: Vec<u64> = ctx.pub_stats.last_acked.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let last_sent: Vec<u64> = ctx.pub_stats.last_sent_ns.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let results: Vec<WorkerResult> = match fleet.as_mut() {
        Some(f) => {
            f.send(&Command::Finish { finals, last_publish_unix_ns: last_sent, grace_ms: args.freshness_grace_ms })
                .await;
            match fleet.take() {
                Some(f) => f.collect(Duration::from_millis(args.freshness_grace_ms) + Duration::from_secs(60)).await,
                None => Vec::new(),
            }
        }
        None => Vec::new(),
    };
    stop_sampler.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let _ = ss_task.await;
    ctx.bar.finish_and_clear();
    if interrupted {
        eprintln!("interrupted: the figures cover a shortened run");
    }

    let samples = std::mem::take(&mut *ctx.samples.lock().unwrap_or_else(PoisonError::into_inner));
    let ack_run = {
        let all = ctx.pub_stats.ack.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut run = all.clone();
        let _ = run.subtract(&ack_hist_before);
        run
    };
    Ok(crate::report::assemble(crate::report::Inputs {
        args,
        limits,
        started_unix_ms,
        server,
        readers,
        mix,
        connect,
        hubs,
        readers_per_hub: &readers_per_hub,
        hub_ss_end: &hub_ss_end,
        hub_moments: [&before_hubs, &connected_hubs, &run_start_hubs, &run_end_hubs],
        storm: storm.then_some(crate::report::StormInputs { at_unix_ns: storm_at_ns, at_s: storm_at_s }),
        before: &before,
        ss_before: ss_before.as_ref(),
        connected: &connected_moment,
        connected_now,
        ss_connected: ss_connected.as_ref(),
        run_start: &run_start,
        run_end: &run_end,
        ss_end: ss_end.as_ref(),
        run_secs,
        acked_run,
        ack_run: &ack_run,
        pub_stats: &ctx.pub_stats,
        results: &results,
        samples: &samples.points,
        ss_samples: &samples.ss,
        interrupted,
        loadavg_start,
    }))
}

impl Moment {
    pub(crate) fn metric(&self, series: &str) -> Option<f64> {
        self.metrics.as_ref()?.get(series).copied()
    }

    pub(crate) fn metrics_with_prefix(&self, prefix: &str) -> BTreeMap<String, f64> {
        self.metrics
            .as_ref()
            .map(|m| m.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    pub(crate) fn rss(&self) -> Option<u64> {
        self.rss_bytes
    }

    pub(crate) fn cpu(&self) -> Option<f64> {
        self.cpu_s
    }

    pub(crate) fn t(&self) -> f64 {
        self.t_s
    }
}

/// How long after publishing the bench waits for dropped readers to be
/// back before it reports those still out.
const STORM_BACK_GRACE: Duration = Duration::from_secs(30);

/// Whether reader `i` is in the share (`pct` percent) that drops in a storm:
/// spread evenly over the readers (and so over topics, workers and hubs).
fn drops(i: usize, pct: f64) -> bool {
    let share = |n: usize| (n as f64 * pct / 100.0).floor() as u64;
    share(i + 1) > share(i)
}

/// How readers are laid out over topics, hubs, worker processes and
/// loopback source addresses.
#[derive(Debug, Clone, Copy)]
struct Spread {
    topics: usize,
    hubs: usize,
    workers: usize,
    /// Readers per source address (`None`: the kernel picks 127.0.0.1).
    conns_per_source: Option<u32>,
    /// `storm`: the share that drops.
    storm_drop_pct: Option<f64>,
}

impl Spread {
    /// Each worker's readers, and how many readers each hub gets. Reader
    /// `i` goes to topic `i mod T`, hub `i mod H` (round robin) and worker
    /// `i mod W`.
    fn readers(&self, profiles: &[Profile]) -> (Vec<Vec<ReaderSpec>>, Vec<u64>) {
        let hubs = self.hubs.max(1);
        let mut per_worker: Vec<Vec<ReaderSpec>> = vec![Vec::new(); self.workers];
        let mut per_hub = vec![0u64; hubs];
        let mut in_profile: BTreeMap<Profile, u32> = BTreeMap::new();
        for (i, profile) in profiles.iter().enumerate() {
            let k = in_profile.entry(*profile).or_default();
            let source = self.conns_per_source.map(|per| profile.source_ip(*k / per.max(1)));
            *k += 1;
            let hub = i % hubs;
            per_hub[hub] += 1;
            if let Some(readers) = per_worker.get_mut(i % self.workers.max(1)) {
                readers.push(ReaderSpec {
                    topic: (i % self.topics.max(1)) as u32,
                    profile: *profile,
                    source,
                    hub: hub as u8,
                    // Counted within the worker, so every worker (and every
                    // hub) has its share of dropping readers.
                    drops: self.storm_drop_pct.is_some_and(|pct| drops(i / self.workers.max(1), pct)),
                });
            }
        }
        (per_worker, per_hub)
    }
}

/// Profiles for `readers` readers by the mix, shuffled (seeded) so that
/// every topic and every worker gets the mix.
fn assign_profiles(readers: usize, mix: &[(Profile, f64)], seed: u64) -> Vec<Profile> {
    let mut out = Vec::with_capacity(readers);
    for (profile, n) in split_counts(readers, mix) {
        out.extend(std::iter::repeat_n(profile, n));
    }
    fastrand::Rng::with_seed(seed).shuffle(&mut out);
    out
}

#[allow(clippy::too_many_arguments)]
async fn sample_loop(
    hub_pids: Vec<Option<u32>>,
    ticks_per_s: u64,
    start: Instant,
    samples: Arc<Mutex<Samples>>,
    fleet: Option<Arc<Mutex<crate::fleet::FleetState>>>,
    pub_stats: Arc<PubStats>,
    stop: Arc<AtomicBool>,
    every_ms: u64,
    bar: ProgressBar,
) {
    let pid = hub_pids.first().copied().flatten();
    let every = Duration::from_millis(every_ms.max(100));
    let mut last_t = start.elapsed().as_secs_f64();
    let mut last_cpu = pid.and_then(|p| procfs::cpu_seconds(p, ticks_per_s));
    let mut last_frames = 0u64;
    let mut last_acked = pub_stats.acked.load(Ordering::Relaxed);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        let t = start.elapsed().as_secs_f64();
        let dt = (t - last_t).max(1e-3);
        let cpu = pid.and_then(|p| procfs::cpu_seconds(p, ticks_per_s));
        let cores = match (cpu, last_cpu) {
            (Some(now), Some(before)) => Some((now - before) / dt),
            _ => None,
        };
        let (connected, frames, interval, totals): (u64, u64, Histogram<u64>, Tick) = match &fleet {
            Some(state) => {
                let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                let totals = crate::fleet::sum(&s.ticks);
                (totals.connected, totals.frames, std::mem::replace(&mut s.interval, new_hist()), totals)
            }
            None => (0, 0, new_hist(), Tick::default()),
        };
        let acked = pub_stats.acked.load(Ordering::Relaxed);
        let lat = (!interval.is_empty()).then(|| Summary::of(&interval));
        let mut s = samples.lock().unwrap_or_else(PoisonError::into_inner);
        let kernel = s.ss.last().map(|(_, ss)| ss.total.bytes);
        let point = Point {
            t_s: t,
            phase: s.phase,
            server_rss_bytes: pid.and_then(procfs::rss_bytes),
            server_cpu_cores: cores,
            connected,
            frames_per_s: frames.saturating_sub(last_frames) as f64 / dt,
            publishes_per_s: acked.saturating_sub(last_acked) as f64 / dt,
            fast_p50_ms: lat.map(|l| l.p50_ms),
            fast_p99_ms: lat.map(|l| l.p99_ms),
            fast_max_ms: lat.map(|l| l.max_ms),
            kernel_bytes: kernel,
            hub_rss_bytes: hub_pids.iter().map(|p| p.and_then(procfs::rss_bytes)).collect(),
            refusals: totals.refusals,
            storm_dropped: totals.storm_dropped,
            storm_back: totals.storm_back,
        };
        let phase = s.phase;
        bar.set_message(format!(
            "conn {} | {:.0} frames/s | {:.0} pub/s | p99 {} | rss {}",
            point.connected,
            point.frames_per_s,
            point.publishes_per_s,
            point.fast_p99_ms.map_or("-".into(), |v| format!("{v:.1} ms")),
            point.server_rss_bytes.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
        ));
        if matches!(phase, "holding" | "publishing" | "storm") {
            bar.inc(every.as_secs_f64().round().max(1.0) as u64);
        }
        s.points.push(point);
        drop(s);
        last_t = t;
        last_cpu = cpu;
        last_frames = frames;
        last_acked = acked;
    }
}

async fn ss_loop(port: u16, start: Instant, samples: Arc<Mutex<Samples>>, stop: Arc<AtomicBool>, every_s: f64) {
    if every_s <= 0.0 {
        return;
    }
    let every = Duration::from_secs_f64(every_s.max(0.5));
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        let t = start.elapsed().as_secs_f64();
        if let Ok(Some(sample)) = tokio::task::spawn_blocking(move || procfs::ss_sample(port)).await {
            samples.lock().unwrap_or_else(PoisonError::into_inner).ss.push((t, sample));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[test]
    fn thirty_thousand_readers_fit_three_hubs_and_two_workers() {
        // The layout `multi-hub -n 30000` gets with the default flags: every
        // worker under its 20,000 open files and every hub under 19k sockets.
        let readers = 30_000;
        let mix = [(Profile::Fast, 80.0), (Profile::Stalled, 20.0)];
        let profiles = assign_profiles(readers, &mix, 7);
        let workers = readers.div_ceil(15_000);
        let spread = Spread { topics: 10, hubs: 3, workers, conns_per_source: Some(1000), storm_drop_pct: Some(50.0) };
        let (per_worker, per_hub) = spread.readers(&profiles);
        assert_eq!(per_worker.len(), 2);
        assert!(per_worker.iter().all(|w| w.len() <= 15_000), "each worker holds at most 15,000 readers");
        assert_eq!(per_hub, vec![10_000; 3], "round robin over the hubs");
        assert!(per_hub.iter().all(|&n| n < 19_000));
        let mut by_source: BTreeMap<std::net::Ipv4Addr, u32> = BTreeMap::new();
        for spec in per_worker.iter().flatten() {
            *by_source.entry(spec.source.expect("spread over sources")).or_default() += 1;
        }
        assert!(by_source.values().all(|&n| n <= 1000), "at most 1,000 readers per source address");
        let dropping = per_worker.iter().flatten().filter(|s| s.drops).count();
        assert_eq!(dropping, 15_000, "half of them drop in a storm");
        for w in &per_worker {
            assert_eq!(w.iter().filter(|s| s.drops).count(), w.len() / 2, "each worker drops half of its readers");
        }
        let hubs_of_droppers: BTreeSet<u8> = per_worker.iter().flatten().filter(|s| s.drops).map(|s| s.hub).collect();
        assert_eq!(hubs_of_droppers.len(), 3, "the dropping half is on every hub");
    }

    #[test]
    fn drop_shares() {
        assert_eq!((0..10).filter(|&i| drops(i, 50.0)).count(), 5);
        assert_eq!((0..10).filter(|&i| drops(i, 100.0)).count(), 10);
        assert_eq!((0..1000).filter(|&i| drops(i, 12.5)).count(), 125);
    }
}
