//! CI smoke run: the bench against the real server for a few hundred
//! connections and a few seconds, in every scenario shape that matters; the
//! JSON result must hold every field. No timing is asserted.
//!
//! The server binary comes from `SPILLWAY_BIN`, or else
//! `<workspace>/target/debug/spillway` (CI builds it first). Without either
//! the test says so and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

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
