//! The result: one JSON document, a human summary, and an SVG chart of the
//! server's RSS and the fast readers' latency over time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::cli::{Args, PublishTo, Scenario};
use crate::hist::{Summary, new_hist};
use crate::plan::{Profile, StormResult, WorkerResult};
use crate::procfs::{SockMem, SsSample};
use crate::publisher::PubStats;
use crate::run::{Moment, Point};
use crate::server::{Hubs, Server};
use crate::sys::FileLimits;

pub(crate) struct Inputs<'a> {
    pub(crate) args: &'a Args,
    pub(crate) limits: Option<FileLimits>,
    pub(crate) started_unix_ms: u64,
    pub(crate) server: &'a Server,
    pub(crate) readers: usize,
    pub(crate) mix: &'a [(Profile, f64)],
    pub(crate) connect: Value,
    pub(crate) hubs: &'a Hubs,
    /// Readers assigned to each hub.
    pub(crate) readers_per_hub: &'a [u64],
    /// Kernel memory of every hub's sockets at the end of publishing.
    pub(crate) hub_ss_end: &'a [Option<SsSample>],
    /// Every hub's moments: before readers, connected, run start, run end.
    pub(crate) hub_moments: [&'a [Moment]; 4],
    pub(crate) storm: Option<StormInputs>,
    pub(crate) before: &'a Moment,
    pub(crate) ss_before: Option<&'a SsSample>,
    pub(crate) connected: &'a Moment,
    pub(crate) connected_now: u64,
    pub(crate) ss_connected: Option<&'a SsSample>,
    pub(crate) run_start: &'a Moment,
    pub(crate) run_end: &'a Moment,
    pub(crate) ss_end: Option<&'a SsSample>,
    pub(crate) run_secs: f64,
    pub(crate) acked_run: u64,
    pub(crate) ack_run: &'a Histogram<u64>,
    pub(crate) pub_stats: &'a PubStats,
    pub(crate) results: &'a [WorkerResult],
    pub(crate) samples: &'a [Point],
    pub(crate) ss_samples: &'a [(f64, SsSample)],
    pub(crate) interrupted: bool,
    pub(crate) loadavg_start: Option<[f64; 3]>,
}

/// When the storm's drop was, for the result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StormInputs {
    pub(crate) at_unix_ns: u64,
    /// Seconds since the bench started (the chart's time axis).
    pub(crate) at_s: f64,
}

/// One profile's figures over every worker.
#[derive(Default)]
struct Merged {
    readers: u64,
    connected_at_end: u64,
    frames: u64,
    bytes: u64,
    measured_frames: u64,
    skipped_field: u64,
    seq_gaps: u64,
    connects: u64,
    connect_failures: u64,
    reconnects: u64,
    refusals: BTreeMap<String, u64>,
    admitted_timeouts: u64,
    on_final: u64,
    not_on_final: u64,
    ends: BTreeMap<String, u64>,
    latency: Option<Histogram<u64>>,
    handshake: Option<Histogram<u64>>,
    final_after: Option<Histogram<u64>>,
}

fn merge(results: &[WorkerResult]) -> BTreeMap<Profile, Merged> {
    let mut out: BTreeMap<Profile, Merged> = BTreeMap::new();
    for r in results {
        for (profile, p) in &r.profiles {
            let m = out.entry(*profile).or_default();
            m.readers += p.readers;
            m.connected_at_end += p.connected_at_end;
            m.frames += p.frames;
            m.bytes += p.bytes;
            m.measured_frames += p.measured_frames;
            m.skipped_field += p.skipped_field;
            m.seq_gaps += p.seq_gaps;
            m.connects += p.connects;
            m.connect_failures += p.connect_failures;
            m.reconnects += p.reconnects;
            m.admitted_timeouts += p.admitted_timeouts;
            for (k, v) in &p.refusals {
                *m.refusals.entry(k.clone()).or_default() += v;
            }
            m.on_final += p.on_final;
            m.not_on_final += p.not_on_final;
            for (k, v) in &p.ends {
                *m.ends.entry(k.clone()).or_default() += v;
            }
            p.latency.add_to(m.latency.get_or_insert_with(new_hist));
            p.handshake.add_to(m.handshake.get_or_insert_with(new_hist));
            p.final_after.add_to(m.final_after.get_or_insert_with(new_hist));
        }
    }
    out
}

fn summary(h: Option<&Histogram<u64>>) -> Summary {
    h.map(Summary::of).unwrap_or_default()
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()));
    let mem_total = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok()))
        .flatten()
        .map(|kb| kb * 1024);
    json!({
        "nproc": std::thread::available_parallelism().map_or(1, usize::from),
        "mem_total_bytes": mem_total,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu_model": cpu_model,
    })
}

/// `/proc/loadavg`'s three averages: other work on the box skews latency.
pub(crate) fn loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let v: Vec<f64> = text.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect();
    Some([*v.first()?, *v.get(1)?, *v.get(2)?])
}

pub(crate) fn assemble(i: Inputs<'_>) -> Value {
    let args = i.args;
    let merged = merge(i.results);
    let count = |p: Profile| merged.get(&p).map_or(0, |m| m.readers);
    let fast = merged.get(&Profile::Fast);
    let fast_latency = summary(fast.and_then(|m| m.latency.as_ref()));
    let measured_secs = (i.run_secs - args.warmup).max(1e-3);

    let by_profile: BTreeMap<&str, Value> = merged
        .iter()
        .map(|(p, m)| {
            let per_reader_per_s =
                if m.readers > 0 { m.measured_frames as f64 / m.readers as f64 / measured_secs } else { 0.0 };
            let fresh = summary(m.final_after.as_ref());
            (
                p.label(),
                json!({
                    "readers": m.readers,
                    "connected_at_end": m.connected_at_end,
                    "frames": m.frames,
                    "bytes": m.bytes,
                    "measured_frames": m.measured_frames,
                    "frames_per_reader_per_s": per_reader_per_s,
                    "skipped_field": m.skipped_field,
                    "seq_gaps": m.seq_gaps,
                    "latency_ms": summary(m.latency.as_ref()),
                    "handshake_ms": summary(m.handshake.as_ref()),
                    "connects": m.connects,
                    "connect_failures": m.connect_failures,
                    "reconnects": m.reconnects,
                    "refusals": m.refusals,
                    "admitted_timeouts": m.admitted_timeouts,
                    "ends": m.ends,
                    "freshness": {
                        "expected": p.should_be_fresh(),
                        "live": m.connected_at_end,
                        "on_final": m.on_final,
                        "not_on_final": m.not_on_final,
                        "after_last_publish_ms": fresh,
                    },
                }),
            )
        })
        .collect();

    // Server figures over the measured phase.
    let [hubs_before, hubs_connected, hubs_start, hubs_end] = i.hub_moments;
    // Server counters summed over hubs (one hub: that hub's).
    let sum_diff = |f: &dyn Fn(&Moment) -> Option<f64>| -> Option<f64> {
        let per: Vec<Option<f64>> = hubs_start.iter().zip(hubs_end).map(|(a, b)| diff(f(a), f(b))).collect();
        per.iter().all(Option::is_some).then(|| per.iter().flatten().sum())
    };
    let deliveries = sum_diff(&|m| m.metric("spillway_deliveries_total"));
    let server_skipped = sum_diff(&|m| m.metric("spillway_versions_skipped_total"));
    let cpu_run = sum_diff(&|m| m.cpu());
    let run_secs = (i.run_end.t() - i.run_start.t()).max(1e-3);
    let client_frames_run: u64 = merged.values().map(|m| m.measured_frames).sum();
    let cutoffs: BTreeMap<String, f64> = i
        .run_end
        .metrics_with_prefix("spillway_cutoffs_total{")
        .into_iter()
        .map(|(k, v)| {
            let reason = k.split('"').nth(1).unwrap_or(&k).to_string();
            let before = i.before.metric(&k).unwrap_or(0.0);
            (reason, v - before)
        })
        .collect();
    let batch = match (
        diff(
            i.run_start.metric("spillway_store_commit_batch_size_sum"),
            i.run_end.metric("spillway_store_commit_batch_size_sum"),
        ),
        diff(
            i.run_start.metric("spillway_store_commit_batch_size_count"),
            i.run_end.metric("spillway_store_commit_batch_size_count"),
        ),
    ) {
        (Some(sum), Some(n)) if n > 0.0 => Some(sum / n),
        _ => None,
    };

    // Memory.
    let rss_peak = i.samples.iter().filter_map(|p| p.server_rss_bytes).max();
    let single_hub = hubs_start.len() == 1;
    let rss_per_conn = match (i.before.rss(), i.connected.rss()) {
        (Some(b), Some(a)) if i.connected_now > 0 && single_hub => Some((a as f64 - b as f64) / i.connected_now as f64),
        _ => None,
    };
    let rss_change_pct = match (i.run_start.rss(), i.run_end.rss()) {
        (Some(a), Some(b)) if a > 0 => Some((b as f64 - a as f64) / a as f64 * 100.0),
        _ => None,
    };
    let stalled = count(Profile::Stalled);
    let stalled_peak: Option<SockMem> =
        i.ss_samples.iter().filter_map(|(_, s)| s.by_profile.get("stalled").copied()).max_by_key(|m| m.bytes);
    let kernel_peak = i.ss_samples.iter().map(|(_, s)| s.total.bytes).max();
    let kernel_per_conn = match (i.ss_connected, i.ss_before) {
        (Some(c), b) if i.connected_now > 0 => {
            Some((c.total.bytes as f64 - b.map_or(0.0, |b| b.total.bytes as f64)) / i.connected_now as f64)
        }
        _ => None,
    };
    let per_stalled = stalled_peak.filter(|_| stalled > 0).map(|m| m.bytes as f64 / stalled as f64);

    // Publishing.
    let errors = i.pub_stats.errors.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let acks_per_s = i.acked_run as f64 / i.run_secs.max(1e-3);
    let topics = i.pub_stats.last_acked.len();
    let publish = json!({
        "topics": topics,
        "publishers": if args.scenario == Scenario::Publish { args.publishers } else { topics },
        "payload_bytes": args.payload,
        "rate_per_topic_target": if publishes_at_rate(args.scenario) { Some(args.rate) } else { None },
        "acked_run": i.acked_run,
        "acks_per_s": acks_per_s,
        "achieved_rate_per_topic": acks_per_s / topics.max(1) as f64,
        "attempted_total": i.pub_stats.attempted.load(Ordering::Relaxed),
        "failed_total": i.pub_stats.failed.load(Ordering::Relaxed),
        "rate_ticks_skipped": i.pub_stats.ticks_skipped.load(Ordering::Relaxed),
        "errors": errors,
        "ack_latency_ms": Summary::of(i.ack_run),
        "commit_batch_mean": batch,
    });

    // Freshness of fast readers.
    let fast_fresh_max = fast.and_then(|m| m.final_after.as_ref()).map(|h| Summary::of(h).max_ms);
    let fast_all_on_final = fast.map(|m| m.not_on_final == 0 && m.connected_at_end > 0);

    let fast_rate = fast.filter(|m| m.readers > 0).map(|m| m.measured_frames as f64 / m.readers as f64 / measured_secs);

    // Targets from issue 7 (reported, never enforced).
    let mut targets = Vec::new();
    let mut target = |name: &str, goal: &str, measured: Value, met: Option<bool>| {
        targets.push(json!({ "name": name, "target": goal, "measured": measured, "met": met }));
    };
    match args.scenario {
        Scenario::Idle => {
            target(
                "server RSS per idle WebSocket connection",
                "<= 4096 bytes (at 19k connections)",
                json!(rss_per_conn),
                rss_per_conn.map(|v| v <= 4096.0),
            );
        }
        Scenario::Fanout | Scenario::SlowReaders => {
            let p99_goal = if i.readers <= 2000 { 25.0 } else { 100.0 };
            target(
                "fast readers' p99 publish-to-delivery latency",
                &format!("<= {p99_goal} ms"),
                json!(fast_latency.p99_ms),
                (fast_latency.count > 0).then_some(fast_latency.p99_ms <= p99_goal),
            );
            target(
                "fast readers receive the full update rate",
                &format!(">= {:.2} frames/s per reader (99% of {})", args.rate * 0.99, args.rate),
                json!(fast_rate),
                fast_rate.map(|r| r >= args.rate * 0.99),
            );
            target(
                "server RSS at the end within 10% of when publishing began",
                "|change| <= 10%",
                json!(rss_change_pct),
                rss_change_pct.map(|c| c.abs() <= 10.0),
            );
            if stalled > 0 {
                target(
                    "kernel memory per stalled reader (peak)",
                    "<= 65536 bytes",
                    json!(per_stalled),
                    per_stalled.map(|v| v <= 65536.0),
                );
            }
            target(
                "every fast reader on the final version within 1 s of the last publish",
                "all on final, max <= 1000 ms",
                json!({ "all_on_final": fast_all_on_final, "max_ms": fast_fresh_max }),
                match (fast_all_on_final, fast_fresh_max) {
                    (Some(all), Some(max)) => Some(all && max <= 1000.0),
                    _ => None,
                },
            );
        }
        Scenario::Storm => {
            let storm = storm_figures(i.results);
            let timeouts = storm.admitted_timeouts_total(&merged);
            target(
                "no admitted connection timed out (no first frame within the deadline)",
                "0",
                json!(timeouts),
                Some(timeouts == 0),
            );
            let p99 = storm.during.p99_ms;
            target(
                "undisturbed readers' p99 latency during the storm",
                "<= 250 ms",
                json!(p99),
                (storm.during.count > 0).then_some(p99 <= 250.0),
            );
            target(
                "every dropped reader back",
                "all",
                json!({ "dropped": storm.sum.dropped, "back": storm.sum.back }),
                Some(storm.sum.dropped > 0 && storm.sum.back >= storm.sum.dropped),
            );
        }
        Scenario::MultiHub => {
            target(
                "every fast reader, on every hub, on the final version within 1 s of the last publish",
                "all on final, max <= 1000 ms",
                json!({ "all_on_final": fast_all_on_final, "max_ms": fast_fresh_max }),
                match (fast_all_on_final, fast_fresh_max) {
                    (Some(all), Some(max)) => Some(all && max <= 1000.0),
                    _ => None,
                },
            );
        }
        Scenario::Publish => {
            target(
                "acknowledged durable publishes per second",
                ">= 5000 /s",
                json!(acks_per_s),
                Some(acks_per_s >= 5000.0),
            );
        }
    }

    let ends: BTreeMap<&str, &BTreeMap<String, u64>> = merged.iter().map(|(p, m)| (p.label(), &m.ends)).collect();
    let reconnects: BTreeMap<&str, u64> = merged.iter().map(|(p, m)| (p.label(), m.reconnects)).collect();
    let ss_series: Vec<Value> = i
        .ss_samples
        .iter()
        .map(|(t, s)| json!({ "t_s": t, "sockets": s.total.sockets, "total_bytes": s.total.bytes, "by_profile": s.by_profile, "by_state": s.by_state }))
        .collect();
    let hub_list = hub_entries(&i, hubs_before, hubs_connected, hubs_start, hubs_end);
    let storm_section = i.storm.map(|st| storm_json(&i, st, &merged));
    let multi_hub = multi_hub_json(&i);
    let mut connect = i.connect;
    if let Some(obj) = connect.as_object_mut() {
        let mut all = new_hist();
        for m in merged.values() {
            if let Some(h) = &m.handshake {
                let _ = all.add(h);
            }
        }
        obj.insert("handshake_ms".into(), json!(Summary::of(&all)));
    }
    let mix: BTreeMap<&str, f64> = i.mix.iter().map(|(p, pct)| (p.label(), *pct)).collect();

    json!({
        "schema": 1,
        "scenario": args.scenario,
        "interrupted": i.interrupted,
        "started_unix_ms": i.started_unix_ms,
        "command": std::env::args().collect::<Vec<_>>(),
        "config": {
            "args": args,
            "readers": i.readers,
            "duration_s": args.duration(),
            "mix": mix,
        },
        "machine": machine(),
        "loadavg": { "start": i.loadavg_start, "end": loadavg() },
        "open_files": i.limits,
        "server": {
            "spawned": i.server.spawned,
            "bin": i.server.bin.as_ref().map(|b| b.display().to_string()),
            "args": i.server.args,
            "addr": i.server.addr.to_string(),
            "pid": i.server.pid,
        },
        "hubs": hub_list,
        "connect": connect,
        "readers": { "total": i.readers, "by_profile": by_profile },
        "fast_latency_ms": fast_latency,
        "deliveries": {
            "run_s": run_secs,
            "client_frames_run": client_frames_run,
            "client_frames_per_s": client_frames_run as f64 / measured_secs,
            "server_deliveries_run": deliveries,
            "server_deliveries_per_s": deliveries.map(|d| d / run_secs),
            "server_cpu_s_run": cpu_run,
            "server_cpu_cores": cpu_run.map(|c| c / run_secs),
            "deliveries_per_server_core_s": match (deliveries, cpu_run) { (Some(d), Some(c)) if c > 0.0 => Some(d / c), _ => None },
            "fast_frames_per_reader_per_s": fast_rate,
            "expected_frames_per_reader_per_s": if publishes_at_rate(args.scenario) { Some(args.rate) } else { None },
        },
        "freshness": {
            "fast_all_on_final": fast_all_on_final,
            "fast_max_ms_after_last_publish": fast_fresh_max,
            "grace_ms": args.freshness_grace_ms,
        },
        "skipped": {
            "frames_field_total": merged.values().map(|m| m.skipped_field).sum::<u64>(),
            "seq_gaps_total": merged.values().map(|m| m.seq_gaps).sum::<u64>(),
            "server_versions_skipped_run": server_skipped,
        },
        "cutoffs": {
            "server_by_reason": cutoffs,
            "client_ends_by_profile": ends,
        },
        "reconnects": reconnects,
        "memory": {
            "server_rss_before_bytes": i.before.rss(),
            "server_rss_connected_bytes": i.connected.rss(),
            "server_rss_per_connection_bytes": rss_per_conn,
            "server_rss_run_start_bytes": i.run_start.rss(),
            "server_rss_run_end_bytes": i.run_end.rss(),
            "server_rss_run_change_pct": rss_change_pct,
            "server_rss_peak_bytes": rss_peak,
            "kernel": {
                "definition": "sum over the server's sockets on its port (ss -tm) of skmem r+w+f+o+bl",
                "before": i.ss_before,
                "connected": i.ss_connected,
                "end": i.ss_end,
                "per_connection_bytes": kernel_per_conn,
                "peak_total_bytes": kernel_peak,
                "stalled_peak": stalled_peak,
                "per_stalled_reader_peak_bytes": per_stalled,
            },
        },
        "publish": publish,
        "storm": storm_section,
        "multi_hub": multi_hub,
        "workers": i.results.iter().map(|r| json!({ "worker": r.worker, "pid": r.pid, "cpu_s": r.cpu_s, "rss_peak_bytes": r.rss_peak_bytes })).collect::<Vec<_>>(),
        "series": i.samples,
        "ss_series": ss_series,
        "targets": targets,
    })
}

/// Scenarios whose publisher runs at `--rate` per topic.
fn publishes_at_rate(s: Scenario) -> bool {
    matches!(s, Scenario::Fanout | Scenario::SlowReaders | Scenario::Storm | Scenario::MultiHub)
}

/// The storm over every worker.
struct StormFigures {
    sum: StormResult,
    back_after: Summary,
    before: Summary,
    during: Summary,
    after: Summary,
}

impl StormFigures {
    /// Admitted connections that timed out, over every reader and the whole
    /// run (not only the storm).
    fn admitted_timeouts_total(&self, merged: &BTreeMap<Profile, Merged>) -> u64 {
        merged.values().map(|m| m.admitted_timeouts).sum()
    }
}

fn storm_figures(results: &[WorkerResult]) -> StormFigures {
    let mut sum = StormResult::default();
    let (mut back, mut before, mut during, mut after) = (new_hist(), new_hist(), new_hist(), new_hist());
    for st in results.iter().filter_map(|r| r.storm.as_ref()) {
        sum.dropped += st.dropped;
        sum.back += st.back;
        sum.attempts += st.attempts;
        sum.failures += st.failures;
        sum.admitted_timeouts += st.admitted_timeouts;
        sum.last_back_unix_ns = sum.last_back_unix_ns.max(st.last_back_unix_ns);
        for (k, v) in &st.refusals {
            *sum.refusals.entry(k.clone()).or_default() += v;
        }
        st.back_after.add_to(&mut back);
        st.latency_before.add_to(&mut before);
        st.latency_storm.add_to(&mut during);
        st.latency_after.add_to(&mut after);
    }
    StormFigures {
        sum,
        back_after: Summary::of(&back),
        before: Summary::of(&before),
        during: Summary::of(&during),
        after: Summary::of(&after),
    }
}

fn storm_json(i: &Inputs<'_>, st: StormInputs, merged: &BTreeMap<Profile, Merged>) -> Value {
    let f = storm_figures(i.results);
    let all_back = f.sum.dropped > 0 && f.sum.back >= f.sum.dropped;
    let until_all_back = (all_back && f.sum.last_back_unix_ns >= st.at_unix_ns)
        .then(|| (f.sum.last_back_unix_ns - st.at_unix_ns) as f64 / 1e9);
    // The server's own count of refused subscriptions over the run, by
    // reason (every hub).
    let [_, _, starts, ends] = i.hub_moments;
    let mut server_refusals: BTreeMap<String, f64> = BTreeMap::new();
    for (a, b) in starts.iter().zip(ends) {
        for (k, v) in b.metrics_with_prefix("spillway_subscriptions_total{") {
            if !k.contains("result=\"refused\"") {
                continue;
            }
            let reason = k.split("reason=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?").to_string();
            *server_refusals.entry(reason).or_default() += v - a.metric(&k).unwrap_or(0.0);
        }
    }
    json!({
        "at_s": st.at_s,
        "at_unix_ms": st.at_unix_ns / 1_000_000,
        "window_s": i.args.storm_window,
        "drop_pct": i.args.storm_drop_pct,
        "resume": i.args.resume(),
        "dropped": f.sum.dropped,
        "back": f.sum.back,
        "all_back": all_back,
        "seconds_until_all_back": until_all_back,
        "back_after_ms": f.back_after,
        "reconnect_attempts": f.sum.attempts,
        "refusals": f.sum.refusals.values().sum::<u64>(),
        "refusals_by_reason": f.sum.refusals,
        "connect_failures": f.sum.failures,
        "admitted_timeouts": f.sum.admitted_timeouts,
        "admitted_timeouts_whole_run": f.admitted_timeouts_total(merged),
        "first_frame_timeout_ms": i.args.first_frame_timeout_ms,
        "server_refusals_by_reason": server_refusals,
        "undisturbed_latency_ms": { "before": f.before, "storm": f.during, "after": f.after },
    })
}

/// One entry per hub: memory over time, CPU, and its readers' latency and
/// freshness.
fn hub_entries(
    i: &Inputs<'_>,
    before: &[Moment],
    connected: &[Moment],
    start: &[Moment],
    end: &[Moment],
) -> Vec<Value> {
    let n = i.hubs.servers.len();
    let mut latency: Vec<Histogram<u64>> = (0..n).map(|_| new_hist()).collect();
    let mut fresh: Vec<Histogram<u64>> = (0..n).map(|_| new_hist()).collect();
    let mut counts = vec![(0u64, 0u64, 0u64); n];
    for r in i.results {
        for (h, hr) in r.hubs.iter().enumerate().take(n) {
            hr.fast_latency.add_to(&mut latency[h]);
            hr.final_after.add_to(&mut fresh[h]);
            counts[h].0 += hr.connected_at_end;
            counts[h].1 += hr.on_final;
            counts[h].2 += hr.not_on_final;
        }
    }
    (0..n)
        .map(|h| {
            let server: &Server = &i.hubs.servers[h];
            let rss = |m: &[Moment]| m.get(h).and_then(Moment::rss);
            let assigned = i.readers_per_hub.get(h).copied().unwrap_or(0);
            let per_conn = match (rss(before), rss(connected)) {
                (Some(b), Some(a)) if assigned > 0 => Some((a as f64 - b as f64) / assigned as f64),
                _ => None,
            };
            let series: Vec<Value> =
                i.samples.iter().map(|p| json!([p.t_s, p.hub_rss_bytes.get(h).copied().flatten()])).collect();
            let peak = i.samples.iter().filter_map(|p| p.hub_rss_bytes.get(h).copied().flatten()).max();
            let cpu = diff(start.get(h).and_then(Moment::cpu), end.get(h).and_then(Moment::cpu));
            let deliveries = diff(
                start.get(h).and_then(|m| m.metric("spillway_deliveries_total")),
                end.get(h).and_then(|m| m.metric("spillway_deliveries_total")),
            );
            json!({
                "hub": h + 1,
                "pid": server.pid,
                "addr": server.addr.to_string(),
                "spawned": server.spawned,
                "readers": assigned,
                "rss_before_bytes": rss(before),
                "rss_connected_bytes": rss(connected),
                "rss_per_connection_bytes": per_conn,
                "rss_run_start_bytes": rss(start),
                "rss_run_end_bytes": rss(end),
                "rss_peak_bytes": peak,
                "cpu_run_s": cpu,
                "server_deliveries_run": deliveries,
                "kernel_end": i.hub_ss_end.get(h).and_then(Option::as_ref).map(|s| s.total),
                "fast_latency_ms": Summary::of(&latency[h]),
                "freshness": {
                    "live": counts[h].0,
                    "on_final": counts[h].1,
                    "not_on_final": counts[h].2,
                    "after_last_publish_ms": Summary::of(&fresh[h]),
                },
                "rss_series": series,
            })
        })
        .collect()
}

/// Multi-hub figures: where publishes went, the shared services, and
/// readers on the other hubs against readers on the hub that took the
/// publishes. `null` with a single hub.
fn multi_hub_json(i: &Inputs<'_>) -> Value {
    let n = i.hubs.servers.len();
    if n < 2 && i.args.scenario != Scenario::MultiHub {
        return Value::Null;
    }
    let (mut first, mut others) = (new_hist(), new_hist());
    for r in i.results {
        for (h, hr) in r.hubs.iter().enumerate() {
            hr.fast_latency.add_to(if h == 0 { &mut first } else { &mut others });
        }
    }
    let (first, others) = (Summary::of(&first), Summary::of(&others));
    let svc = i.hubs.services.as_ref();
    let round_robin = i.args.publish_to == PublishTo::RoundRobin && n > 1;
    json!({
        "hubs": n,
        "started_by_bench": svc.is_some(),
        "database": svc.map(|s| s.database.clone()),
        "redis_prefix": svc.map(|s| s.prefix.clone()),
        "publish_to": if round_robin { "round-robin" } else { "first" },
        "cross_hub_latency_ms": {
            "definition": "fast readers' publish-to-delivery latency: on hub 1 (the publishing hub unless round-robin) against hubs 2..n",
            "hub1": first,
            "other_hubs": others,
            "p50_extra_ms": (first.count > 0 && others.count > 0).then_some(others.p50_ms - first.p50_ms),
            "p99_extra_ms": (first.count > 0 && others.count > 0).then_some(others.p99_ms - first.p99_ms),
        },
    })
}

fn mib(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |b| format!("{:.1} MiB", b / 1048576.0))
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// A few lines for a person.
pub(crate) fn human(r: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== spillway-bench {} ==", r["scenario"].as_str().unwrap_or("?"));
    let m = &r["machine"];
    let _ = writeln!(
        out,
        "machine: {} cores, {}, kernel {}, {}",
        m["nproc"],
        mib(&m["mem_total_bytes"]),
        m["kernel"].as_str().unwrap_or("?"),
        m["cpu_model"].as_str().unwrap_or("?")
    );
    let c = &r["connect"];
    if !c.is_null() {
        let _ = writeln!(
            out,
            "connect: {} readers in {} s over {} worker(s): {} handshakes/s, {} failures",
            c["readers"],
            num(&c["seconds"], 1),
            c["workers"],
            num(&c["handshakes_per_s"], 0),
            c["failures"]
        );
    }
    let mem = &r["memory"];
    let _ = writeln!(
        out,
        "server RSS: before {}, connected {}, run start {}, end {} ({}%), peak {}",
        mib(&mem["server_rss_before_bytes"]),
        mib(&mem["server_rss_connected_bytes"]),
        mib(&mem["server_rss_run_start_bytes"]),
        mib(&mem["server_rss_run_end_bytes"]),
        num(&mem["server_rss_run_change_pct"], 1),
        mib(&mem["server_rss_peak_bytes"]),
    );
    let _ = writeln!(
        out,
        "per connection: RSS {} B, kernel {} B; kernel peak {}; per stalled reader {} B",
        num(&mem["server_rss_per_connection_bytes"], 0),
        num(&mem["kernel"]["per_connection_bytes"], 0),
        mib(&mem["kernel"]["peak_total_bytes"]),
        num(&mem["kernel"]["per_stalled_reader_peak_bytes"], 0),
    );
    if let Some(profiles) = r["readers"]["by_profile"].as_object() {
        for (name, p) in profiles {
            let l = &p["latency_ms"];
            let _ = writeln!(
                out,
                "{name:>9}: {} readers, {} frames/reader/s, latency p50 {} p99 {} max {} ms, skipped {}, gaps {}, reconnects {}, live {} on final {}/{}",
                p["readers"],
                num(&p["frames_per_reader_per_s"], 2),
                num(&l["p50_ms"], 2),
                num(&l["p99_ms"], 2),
                num(&l["max_ms"], 1),
                p["skipped_field"],
                p["seq_gaps"],
                p["reconnects"],
                p["freshness"]["live"],
                p["freshness"]["on_final"],
                p["freshness"]["live"],
            );
        }
    }
    let d = &r["deliveries"];
    let _ = writeln!(
        out,
        "deliveries: server {}/s, client {}/s; server CPU {} cores, {} deliveries per core-second",
        num(&d["server_deliveries_per_s"], 0),
        num(&d["client_frames_per_s"], 0),
        num(&d["server_cpu_cores"], 2),
        num(&d["deliveries_per_server_core_s"], 0),
    );
    let p = &r["publish"];
    let _ = writeln!(
        out,
        "publish: {} acked/s ({} per topic), ack p50 {} p99 {} ms, failed {}, commit batch mean {}",
        num(&p["acks_per_s"], 0),
        num(&p["achieved_rate_per_topic"], 2),
        num(&p["ack_latency_ms"]["p50_ms"], 2),
        num(&p["ack_latency_ms"]["p99_ms"], 2),
        p["failed_total"],
        num(&p["commit_batch_mean"], 1),
    );
    let f = &r["freshness"];
    let _ = writeln!(
        out,
        "freshness: fast all on final: {}, max {} ms after the last publish",
        f["fast_all_on_final"],
        num(&f["fast_max_ms_after_last_publish"], 1)
    );
    let _ = writeln!(out, "server cut-offs: {}", r["cutoffs"]["server_by_reason"]);
    let st = &r["storm"];
    if !st.is_null() {
        let u = &st["undisturbed_latency_ms"];
        let _ = writeln!(
            out,
            "storm at {} s: {} dropped, {} back (all back after {} s; per reader p50 {} p99 {} ms); {} attempts, {} refused {}, {} failed, {} admitted but timed out",
            num(&st["at_s"], 1),
            st["dropped"],
            st["back"],
            num(&st["seconds_until_all_back"], 2),
            num(&st["back_after_ms"]["p50_ms"], 0),
            num(&st["back_after_ms"]["p99_ms"], 0),
            st["reconnect_attempts"],
            st["refusals"],
            st["refusals_by_reason"],
            st["connect_failures"],
            st["admitted_timeouts"],
        );
        for (name, key) in [("before", "before"), ("during", "storm"), ("after", "after")] {
            let l = &u[key];
            let _ = writeln!(
                out,
                "  undisturbed latency {name:>6} the storm: p50 {} p99 {} max {} ms ({} frames)",
                num(&l["p50_ms"], 1),
                num(&l["p99_ms"], 1),
                num(&l["max_ms"], 1),
                l["count"],
            );
        }
        let _ = writeln!(out, "  server refusals by reason: {}", st["server_refusals_by_reason"]);
    }
    if let Some(hubs) = r["hubs"].as_array().filter(|h| h.len() > 1 || !r["multi_hub"].is_null()) {
        for h in hubs {
            let l = &h["fast_latency_ms"];
            let f = &h["freshness"];
            let _ = writeln!(
                out,
                "hub {} ({}): {} readers, RSS {} -> {} (peak {}), fast p50 {} p99 {} ms, on final {}/{} (max {} ms)",
                h["hub"],
                h["addr"].as_str().unwrap_or("?"),
                h["readers"],
                mib(&h["rss_run_start_bytes"]),
                mib(&h["rss_run_end_bytes"]),
                mib(&h["rss_peak_bytes"]),
                num(&l["p50_ms"], 1),
                num(&l["p99_ms"], 1),
                f["on_final"],
                f["live"],
                num(&f["after_last_publish_ms"]["max_ms"], 1),
            );
        }
        let x = &r["multi_hub"]["cross_hub_latency_ms"];
        if !x.is_null() {
            let _ = writeln!(
                out,
                "cross-hub: other hubs p99 {} ms vs hub 1 {} ms ({} ms extra), publishing to {}",
                num(&x["other_hubs"]["p99_ms"], 1),
                num(&x["hub1"]["p99_ms"], 1),
                num(&x["p99_extra_ms"], 1),
                r["multi_hub"]["publish_to"].as_str().unwrap_or("?"),
            );
        }
    }
    if let Some(targets) = r["targets"].as_array() {
        for t in targets {
            let verdict = match t["met"].as_bool() {
                Some(true) => "MET",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let _ = writeln!(
                out,
                "target [{verdict}] {}: {} (measured {})",
                t["name"].as_str().unwrap_or(""),
                t["target"].as_str().unwrap_or(""),
                t["measured"]
            );
        }
    }
    out
}

/// One panel of the chart: lines over a shared time axis.
struct Line<'a> {
    label: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn panel(out: &mut String, top: f64, title: &str, unit: &str, t_max: f64, lines: &[Line<'_>]) {
    let (left, width, height) = (70.0, 800.0, 200.0);
    let y_max = nice_max(lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).fold(0.0, f64::max));
    let x = |t: f64| left + t / t_max.max(1e-9) * width;
    let y = |v: f64| top + height - v / y_max * height;
    let _ = writeln!(out, r#"<text x="{left}" y="{}" font-size="14" font-weight="bold">{title}</text>"#, top - 8.0);
    let _ =
        writeln!(out, r##"<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>"##);
    for k in 0..=4 {
        let v = y_max * k as f64 / 4.0;
        let yy = y(v);
        let _ = writeln!(out, r##"<line x1="{left}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#eee"/>"##, left + width);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" font-size="11" text-anchor="end">{} {unit}</text>"#,
            left - 4.0,
            yy + 4.0,
            trim_num(v)
        );
    }
    for k in 0..=5 {
        let t = t_max * k as f64 / 5.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{:.0} s</text>"#,
            x(t),
            top + height + 14.0,
            t
        );
    }
    for (n, line) in lines.iter().enumerate() {
        if line.points.is_empty() {
            continue;
        }
        let pts: Vec<String> = line.points.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            line.color,
            pts.join(" ")
        );
        let lx = left + 10.0 + n as f64 * 150.0;
        let _ = writeln!(
            out,
            r#"<rect x="{lx}" y="{}" width="12" height="3" fill="{}"/><text x="{}" y="{}" font-size="11">{}</text>"#,
            top + 10.0,
            line.color,
            lx + 16.0,
            top + 14.0,
            line.label
        );
    }
}

fn trim_num(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() { format!("{v:.0}") } else { format!("{v:.2}").trim_end_matches('0').to_string() }
}

/// The chart: server RSS (and kernel socket memory), fast readers' latency,
/// and open connections over time.
pub(crate) fn svg(r: &Value) -> String {
    let series = r["series"].as_array().cloned().unwrap_or_default();
    let pick = |key: &str, scale: f64| -> Vec<(f64, f64)> {
        series.iter().filter_map(|p| Some((p["t_s"].as_f64()?, p[key].as_f64()? * scale))).collect()
    };
    let t_max = series.iter().filter_map(|p| p["t_s"].as_f64()).fold(1.0, f64::max);
    let mut out = String::new();
    let _ =
        writeln!(out, r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="800" font-family="sans-serif">"#);
    let _ = writeln!(out, r#"<rect width="900" height="800" fill="white"/>"#);
    let title = format!(
        "spillway-bench {} — {} readers, {} topics, {} hub(s), {}",
        r["scenario"].as_str().unwrap_or("?"),
        r["readers"]["total"],
        r["publish"]["topics"],
        r["hubs"].as_array().map_or(1, Vec::len),
        r["config"]["args"]["transport"].as_str().unwrap_or("ws"),
    );
    let _ = writeln!(out, r#"<text x="70" y="24" font-size="16" font-weight="bold">{}</text>"#, xml_escape(&title));
    let hubs = r["hubs"].as_array().map_or(1, Vec::len);
    let mut memory = Vec::new();
    if hubs > 1 {
        const COLORS: [&str; 6] = ["#1f77b4", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
        for h in 0..hubs {
            let points = series
                .iter()
                .filter_map(|p| Some((p["t_s"].as_f64()?, p["hub_rss_bytes"].get(h)?.as_f64()? / 1048576.0)))
                .collect();
            memory.push((format!("hub {} RSS", h + 1), COLORS[h % COLORS.len()], points));
        }
    } else {
        memory.push(("RSS".to_string(), "#1f77b4", pick("server_rss_bytes", 1.0 / 1048576.0)));
    }
    memory.push(("kernel (skmem, hub 1)".to_string(), "#ff7f0e", pick("kernel_bytes", 1.0 / 1048576.0)));
    let memory: Vec<Line<'_>> =
        memory.iter().map(|(label, color, points)| Line { label, color, points: points.clone() }).collect();
    panel(&mut out, 60.0, "Server memory", "MiB", t_max, &memory);
    let storm_at = r["storm"]["at_s"].as_f64();
    let latency_title = if storm_at.is_some() {
        "Undisturbed fast readers: publish-to-delivery latency (dashed: the drop)"
    } else {
        "Fast readers: publish-to-delivery latency"
    };
    panel(
        &mut out,
        320.0,
        latency_title,
        "ms",
        t_max,
        &[
            Line { label: "p50", color: "#2ca02c", points: pick("fast_p50_ms", 1.0) },
            Line { label: "p99", color: "#d62728", points: pick("fast_p99_ms", 1.0) },
        ],
    );
    panel(
        &mut out,
        580.0,
        "Open reader connections",
        "",
        t_max,
        &[
            Line { label: "connected", color: "#9467bd", points: pick("connected", 1.0) },
            Line { label: "refusals (cumulative)", color: "#d62728", points: pick("refusals", 1.0) },
        ],
    );
    if let Some(at) = storm_at {
        // The drop instant across every panel.
        let x = 70.0 + at / t_max.max(1e-9) * 800.0;
        let _ =
            writeln!(out, r##"<line x1="{x:.1}" y1="60" x2="{x:.1}" y2="780" stroke="#555" stroke-dasharray="4 3"/>"##);
    }
    out.push_str("</svg>\n");
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
