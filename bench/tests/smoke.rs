//! CI smoke run: the bench against the real server for a few hundred
//! connections and a few seconds, in every scenario shape that matters; the
//! JSON result must hold every field. No timing is asserted.
//!
//! The server binary comes from `SPILLWAY_BIN`, or else
//! `<workspace>/target/debug/spillway` (CI builds it first). Without either
//! the test says so and passes. The multi-hub run needs PostgreSQL and Redis
//! on loopback (`SPILLWAY_BENCH_PG`, `SPILLWAY_BENCH_REDIS` to point
//! elsewhere); without them it prints a `skipped:` line, except under CI
//! (the `CI` variable set), where it fails.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

fn server_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("SPILLWAY_BIN") {
        let bin = PathBuf::from(bin);
        return bin.is_file().then_some(bin);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let bin = target.join("debug").join("spillway");
    bin.is_file().then_some(bin)
}

/// Runs the bench with `args` and returns its JSON result.
fn bench(name: &str, args: &[&str]) -> Option<Value> {
    bench_with(name, args, &[])
}

/// Runs the bench with `args`, then `server_args` after `--`.
fn bench_with(name: &str, args: &[&str], server_args: &[&str]) -> Option<Value> {
    let Some(server) = server_bin() else {
        eprintln!("SKIPPED: no server binary (set SPILLWAY_BIN or build target/debug/spillway first)");
        return None;
    };
    let dir = std::env::temp_dir().join(format!("spillway-bench-smoke-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = dir.join("result.json");
    let status = Command::new(env!("CARGO_BIN_EXE_spillway-bench"))
        .args(args)
        .arg("--server-bin")
        .arg(&server)
        .arg("--quiet")
        .arg("--out")
        .arg(&out)
        .arg("--")
        .args(server_args)
        .status()
        .expect("run spillway-bench");
    assert!(status.success(), "spillway-bench {args:?} failed: {status}");
    let text = std::fs::read_to_string(&out).expect("result file");
    let svg = std::fs::read_to_string(out.with_extension("svg")).expect("chart file");
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "the chart is an SVG with lines");
    let _ = std::fs::remove_dir_all(&dir);
    Some(serde_json::from_str(&text).expect("the result is JSON"))
}

/// Every dotted path must exist in the result (its value may be null where
/// a figure does not apply).
fn assert_fields(result: &Value, paths: &[&str]) {
    for path in paths {
        let mut v = result;
        for key in path.split('.') {
            v = v.get(key).unwrap_or_else(|| panic!("missing field {path} in the result"));
        }
    }
}

const COMMON: &[&str] = &[
    "schema",
    "scenario",
    "interrupted",
    "command",
    "config.args",
    "config.readers",
    "config.mix",
    "machine.nproc",
    "machine.mem_total_bytes",
    "machine.kernel",
    "machine.cpu_model",
    "open_files",
    "server.pid",
    "server.addr",
    "hubs",
    "connect",
    "readers.total",
    "readers.by_profile",
    "fast_latency_ms.p99_ms",
    "deliveries.client_frames_per_s",
    "deliveries.server_deliveries_per_s",
    "deliveries.deliveries_per_server_core_s",
    "deliveries.fast_frames_per_reader_per_s",
    "freshness.fast_all_on_final",
    "freshness.fast_max_ms_after_last_publish",
    "skipped.frames_field_total",
    "skipped.seq_gaps_total",
    "skipped.server_versions_skipped_run",
    "cutoffs.server_by_reason",
    "cutoffs.client_ends_by_profile",
    "reconnects",
    "memory.server_rss_before_bytes",
    "memory.server_rss_per_connection_bytes",
    "memory.server_rss_run_start_bytes",
    "memory.server_rss_run_end_bytes",
    "memory.server_rss_run_change_pct",
    "memory.server_rss_peak_bytes",
    "memory.kernel.per_connection_bytes",
    "memory.kernel.peak_total_bytes",
    "memory.kernel.per_stalled_reader_peak_bytes",
    "publish.acks_per_s",
    "publish.ack_latency_ms.p99_ms",
    "publish.commit_batch_mean",
    "storm",
    "multi_hub",
    "workers",
    "series",
    "ss_series",
    "targets",
];

#[test]
fn slow_readers_with_every_profile() {
    let Some(r) = bench(
        "mix",
        &[
            "slow-readers",
            "--readers",
            "300",
            "--topics",
            "3",
            "--rate",
            "10",
            "--duration",
            "4",
            "--warmup",
            "1",
            "--mix",
            "fast=55,3g=15,stalled=15,flapping=15",
            "--flap-min-ms",
            "500",
            "--flap-max-ms",
            "1500",
            "--workers",
            "2",
            "--ss-every",
            "1",
            "--freshness-grace-ms",
            "3000",
        ],
    ) else {
        return;
    };
    assert_fields(&r, COMMON);
    assert_eq!(r["scenario"], "slow-readers");
    assert_eq!(r["readers"]["total"], 300);
    assert_eq!(r["workers"].as_array().map(Vec::len), Some(2), "two worker processes reported");
    for profile in ["fast", "3g", "stalled", "flapping"] {
        let p = &r["readers"]["by_profile"][profile];
        assert_fields(
            p,
            &["readers", "frames", "latency_ms", "handshake_ms", "ends", "freshness.on_final", "reconnects"],
        );
    }
    assert!(r["readers"]["by_profile"]["fast"]["frames"].as_u64() > Some(0), "fast readers received frames");
    assert!(r["publish"]["acked_run"].as_u64() > Some(0), "the publisher was acknowledged");
}

#[test]
fn idle_and_publish() {
    let Some(idle) = bench("idle", &["idle", "--readers", "200", "--duration", "1", "--settle", "1"]) else {
        return;
    };
    assert_fields(&idle, COMMON);
    assert_eq!(idle["connect"]["handshakes"], 200);
    let Some(publish) = bench("publish", &["publish", "--publishers", "4", "--duration", "2"]) else {
        return;
    };
    assert_fields(&publish, COMMON);
    assert!(publish["publish"]["acked_run"].as_u64() > Some(0));
}

#[test]
fn sse_and_long_poll_readers() {
    let Some(sse) = bench(
        "sse",
        &[
            "slow-readers",
            "--transport",
            "sse",
            "--readers",
            "120",
            "--topics",
            "3",
            "--rate",
            "10",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--mix",
            "fast=55,3g=15,stalled=15,flapping=15",
            "--flap-min-ms",
            "500",
            "--flap-max-ms",
            "1500",
        ],
    ) else {
        return;
    };
    assert_fields(&sse, COMMON);
    assert_eq!(sse["config"]["args"]["transport"], "sse");
    assert!(sse["readers"]["by_profile"]["fast"]["frames"].as_u64() > Some(0), "SSE readers received frames");
    let Some(lp) = bench(
        "long-poll",
        &[
            "fanout",
            "--transport",
            "long-poll",
            "--readers",
            "100",
            "--topics",
            "3",
            "--rate",
            "10",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--mix",
            "fast=80,flapping=20",
            "--flap-min-ms",
            "500",
            "--flap-max-ms",
            "1500",
        ],
    ) else {
        return;
    };
    assert_fields(&lp, COMMON);
    assert_eq!(lp["config"]["args"]["transport"], "long-poll");
    assert!(lp["readers"]["by_profile"]["fast"]["frames"].as_u64() > Some(0), "long-poll readers received frames");
}

const STORM: &[&str] = &[
    "storm.at_s",
    "storm.window_s",
    "storm.resume",
    "storm.dropped",
    "storm.back",
    "storm.all_back",
    "storm.seconds_until_all_back",
    "storm.back_after_ms.p99_ms",
    "storm.reconnect_attempts",
    "storm.refusals",
    "storm.refusals_by_reason",
    "storm.connect_failures",
    "storm.admitted_timeouts",
    "storm.admitted_timeouts_whole_run",
    "storm.server_refusals_by_reason",
    "storm.undisturbed_latency_ms.before.p99_ms",
    "storm.undisturbed_latency_ms.storm.p99_ms",
    "storm.undisturbed_latency_ms.after.p99_ms",
];

#[test]
fn storm_drops_half_and_they_come_back() {
    // A small accept rate so that the reconnect wave meets refusals.
    let Some(r) = bench_with(
        "storm",
        &[
            "storm",
            "--readers",
            "200",
            "--topics",
            "4",
            "--rate",
            "5",
            "--duration",
            "6",
            "--storm-at",
            "2",
            "--storm-window",
            "2",
            "--warmup",
            "1",
            "--workers",
            "2",
        ],
        &["--accept-rate", "50", "--accept-burst", "60"],
    ) else {
        return;
    };
    assert_fields(&r, COMMON);
    assert_fields(&r, STORM);
    assert_eq!(r["scenario"], "storm");
    assert_eq!(r["storm"]["resume"], true, "storm readers resume by default");
    let dropped = r["storm"]["dropped"].as_u64().expect("dropped is a count");
    assert!(dropped > 0 && dropped <= 100, "at most half of the readers dropped: {dropped}");
    assert!(
        r["storm"]["reconnect_attempts"].as_u64() >= Some(dropped),
        "every dropped reader tried to reconnect at least once"
    );
    let series = r["series"].as_array().expect("series");
    assert!(series.iter().all(|p| p.get("refusals").is_some() && p.get("storm_back").is_some()));
}

/// Whether PostgreSQL and Redis answer; under CI they must.
fn services_up() -> bool {
    let pg = std::env::var("SPILLWAY_BENCH_PG").unwrap_or_else(|_| "127.0.0.1:5432".into());
    let redis = std::env::var("SPILLWAY_BENCH_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let up = |addr: &str| {
        addr.to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
    };
    let ok = up(&pg) && up(&redis);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "multi-hub smoke: PostgreSQL ({pg}) and Redis ({redis}) must be reachable in CI"
        );
        eprintln!("skipped: multi-hub smoke run: PostgreSQL ({pg}) or Redis ({redis}) is not reachable");
    }
    ok
}

#[test]
fn multi_hub_over_postgres_and_redis() {
    if !services_up() {
        return;
    }
    let pg = std::env::var("SPILLWAY_BENCH_PG").unwrap_or_else(|_| "127.0.0.1:5432".into());
    let redis = std::env::var("SPILLWAY_BENCH_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let pg_admin = format!("postgres://postgres@{pg}/postgres");
    let redis_url = format!("redis://{redis}");
    let Some(r) = bench(
        "multi-hub",
        &[
            "multi-hub",
            "--readers",
            "150",
            "--topics",
            "3",
            "--rate",
            "5",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--pg-admin-url",
            &pg_admin,
            "--redis-url",
            &redis_url,
        ],
    ) else {
        return;
    };
    assert_fields(&r, COMMON);
    assert_fields(
        &r,
        &[
            "multi_hub.hubs",
            "multi_hub.started_by_bench",
            "multi_hub.database",
            "multi_hub.redis_prefix",
            "multi_hub.publish_to",
            "multi_hub.cross_hub_latency_ms.hub1.p99_ms",
            "multi_hub.cross_hub_latency_ms.other_hubs.p99_ms",
            "multi_hub.cross_hub_latency_ms.p99_extra_ms",
        ],
    );
    assert_eq!(r["multi_hub"]["hubs"], 3);
    let hubs = r["hubs"].as_array().expect("hubs");
    assert_eq!(hubs.len(), 3, "one entry per hub");
    for h in hubs {
        assert_fields(
            h,
            &[
                "hub",
                "pid",
                "addr",
                "readers",
                "rss_run_start_bytes",
                "rss_peak_bytes",
                "rss_series",
                "fast_latency_ms.p99_ms",
                "freshness.on_final",
                "freshness.after_last_publish_ms.max_ms",
                "kernel_end",
            ],
        );
        assert_eq!(h["readers"], 50, "readers are spread round robin");
    }
    let series = r["series"].as_array().expect("series");
    assert!(series.iter().all(|p| p["hub_rss_bytes"].as_array().map(Vec::len) == Some(3)), "RSS of every hub");
}
