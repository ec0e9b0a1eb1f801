//! Command-line flags.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::plan::{Profile, TransportKind};

/// The named scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Scenario {
    /// Hold N connections open; server RSS and kernel memory per connection.
    Idle,
    /// N fast readers over T topics, a publisher at R updates/s per topic.
    Fanout,
    /// The seed's night: fanout with a mix of slow readers (default 20% stalled).
    SlowReaders,
    /// Acknowledged durable publishes per second with concurrent publishers.
    Publish,
    /// N readers settle; then half of them drop at one instant and reconnect
    /// at once (then by the server's hints, with jitter, resuming), while
    /// publishing goes on.
    Storm,
    /// Three hubs on one PostgreSQL database and one Redis prefix (started by
    /// the bench, or a `--url` list); readers spread over them round robin.
    MultiHub,
}

/// Where `multi-hub` (or any run with several hubs) publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PublishTo {
    /// Every publish goes to hub 1: readers on the other hubs get each
    /// version over the Redis bus.
    First,
    /// Publishes rotate over the hubs.
    RoundRobin,
}

/// spillway-bench: load generator for spillway (or any server reachable
/// through URL templates). Loopback only.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "spillway-bench", version, about)]
pub(crate) struct Args {
    /// The scenario to run.
    #[arg(value_enum)]
    pub(crate) scenario: Scenario,

    /// Readers (connections) to open. Default: 1000 (0 for `publish`).
    #[arg(long, short = 'n')]
    pub(crate) readers: Option<usize>,
    /// Topics the readers are spread over.
    #[arg(long, short = 't', default_value_t = 10)]
    pub(crate) topics: usize,
    /// Updates per second per topic.
    #[arg(long, short = 'r', default_value_t = 20.0)]
    pub(crate) rate: f64,
    /// Size of each published state (bytes; KiB and MiB suffixes work).
    #[arg(long, short = 'b', default_value = "1KiB", value_parser = parse_bytes)]
    pub(crate) payload: usize,
    /// Seconds of publishing (idle: of holding). Default by scenario: idle
    /// 10, fanout 30, slow-readers 60, publish 20.
    #[arg(long, short = 'd')]
    pub(crate) duration: Option<f64>,
    /// Seconds at the start of publishing whose latencies are not recorded.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) warmup: f64,
    /// Reader mix by percentage, e.g. `fast=80,stalled=20` or
    /// `fast=70,3g=10,stalled=10,flapping=10`. Default: `fast=100`, and for
    /// slow-readers the seed's 20% slow: `fast=80,stalled=20`.
    #[arg(long)]
    pub(crate) mix: Option<String>,
    /// Concurrent publishers for `publish`.
    #[arg(long, default_value_t = 16)]
    pub(crate) publishers: usize,
    /// Idle: seconds to wait after the last connection before measuring.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) settle: f64,
    /// After the last publish, how long live readers get to reach the final
    /// version before they count as stale (milliseconds).
    #[arg(long, default_value_t = 5000)]
    pub(crate) freshness_grace_ms: u64,
    /// Reader transport.
    #[arg(long, value_enum, default_value = "ws")]
    pub(crate) transport: TransportKind,

    /// Start this server binary (spillway) on 127.0.0.1:0 with a temporary
    /// data directory, and stop it at the end. Arguments after `--` are
    /// passed to it. Default: `target/release/spillway` if neither this nor
    /// `--url` is given.
    #[arg(long)]
    pub(crate) server_bin: Option<PathBuf>,
    /// Extra arguments for the server (after `--`).
    #[arg(last = true)]
    pub(crate) server_args: Vec<String>,
    /// Attach to running servers instead (`http://127.0.0.1:8080`); a list
    /// (comma-separated or repeated) is several hubs, readers spread over
    /// them round robin.
    #[arg(long, value_delimiter = ',')]
    pub(crate) url: Vec<String>,
    /// PIDs of the attached servers (same order as `--url`), for RSS and CPU.
    #[arg(long, value_delimiter = ',')]
    pub(crate) server_pid: Vec<u32>,
    /// Publish token (spillway: `--publish-token`).
    #[arg(long, default_value = "bench-token-0123456789", env = "SPILLWAY_BENCH_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub(crate) token: String,
    /// Subscription URL template; `{topic}` is replaced. Default by
    /// transport: `ws://ADDR/v1/topics/{topic}/ws`,
    /// `http://ADDR/v1/topics/{topic}/events`, `http://ADDR/v1/topics/{topic}`.
    /// With several hubs, give one per hub (same order as `--url`).
    #[arg(long, value_delimiter = ',')]
    pub(crate) subscribe_url: Vec<String>,
    /// Publish URL template; `{topic}` is replaced. Default:
    /// `http://ADDR/v1/topics/{topic}`. With several hubs, one per hub.
    #[arg(long, value_delimiter = ',')]
    pub(crate) publish_url: Vec<String>,
    /// HTTP method for publishing.
    #[arg(long, default_value = "PUT")]
    pub(crate) publish_method: String,
    /// Extra publish header `Name: value` (repeatable).
    #[arg(long)]
    pub(crate) publish_header: Vec<String>,
    /// Prefix of topic names (`PREFIX-0`, `PREFIX-1`, …).
    #[arg(long, default_value = "bench")]
    pub(crate) topic_prefix: String,

    /// Worker processes holding the readers. Default: enough for
    /// `--per-worker` readers each.
    #[arg(long)]
    pub(crate) workers: Option<usize>,
    /// Most readers per worker process (a process may hold 20,000 files).
    #[arg(long, default_value_t = 15_000)]
    pub(crate) per_worker: usize,
    /// Runtime threads per worker. Default: cores / workers, at least 1.
    #[arg(long)]
    pub(crate) worker_threads: Option<usize>,
    /// Readers per loopback source address (each address has its own
    /// ephemeral port range). Keep it small: `bind(addr, 0)` searches the
    /// address's port space, and at 10,000 ports per address that search made
    /// handshakes 6x slower (330/s against 2,100/s at 1,000).
    #[arg(long, default_value_t = 1000)]
    pub(crate) conns_per_source: u32,
    /// Do not bind readers to 127.10.x.y source addresses.
    #[arg(long)]
    pub(crate) no_source_spread: bool,
    /// Handshakes in flight at once, per worker.
    #[arg(long, default_value_t = 128)]
    pub(crate) connect_concurrency: usize,
    /// The client's WebSocket read buffer (bytes).
    #[arg(long, default_value = "4KiB", value_parser = parse_bytes)]
    pub(crate) read_buffer: usize,
    /// `SO_RCVBUF` of 3G and stalled readers (bytes; the kernel doubles it).
    #[arg(long, default_value = "4KiB", value_parser = parse_bytes)]
    pub(crate) slow_rcvbuf: usize,
    /// 3G readers' bandwidth (bytes per second): 48KiB is 384 kbit/s.
    #[arg(long, default_value = "48KiB", value_parser = parse_bytes)]
    pub(crate) bandwidth: usize,
    /// Flapping readers' connection lifetime range (milliseconds).
    #[arg(long, default_value_t = 2000)]
    pub(crate) flap_min_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    pub(crate) flap_max_ms: u64,
    /// Reconnect backoff with full jitter: base and cap (milliseconds).
    #[arg(long, default_value_t = 500)]
    pub(crate) backoff_base_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    pub(crate) backoff_cap_ms: u64,
    /// Stalled readers resume reading after this many seconds, see their
    /// cut-off, reconnect and stall again. Default: stall until the end.
    #[arg(long)]
    pub(crate) stall_resume: Option<f64>,
    /// Reconnect with the position held (`since=`), as the product's client
    /// does. Default: on for `storm`, off otherwise (`--resume=false` to
    /// turn it off for `storm`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub(crate) resume: Option<bool>,
    /// An admitted connection (handshake done) must deliver its first frame
    /// within this (milliseconds), else it counts as an admitted connection
    /// that timed out and is dropped.
    #[arg(long, default_value_t = 5000)]
    pub(crate) first_frame_timeout_ms: u64,
    /// Long-poll readers: `wait=` of each request (seconds).
    #[arg(long, default_value_t = 20.0)]
    pub(crate) long_poll_wait: f64,

    /// Storm: seconds into publishing when the readers drop. Default: a
    /// third of `--duration`.
    #[arg(long)]
    pub(crate) storm_at: Option<f64>,
    /// Storm: the window (seconds from the drop) whose latencies count as
    /// "during the storm".
    #[arg(long, default_value_t = 10.0)]
    pub(crate) storm_window: f64,
    /// Storm: the share of readers that drop (percent).
    #[arg(long, default_value_t = 50.0)]
    pub(crate) storm_drop_pct: f64,

    /// Hubs to start (ignored with `--url`). Default: 3 for `multi-hub`, 1
    /// otherwise; more than one hub runs on PostgreSQL and Redis as in
    /// `multi-hub` (e.g. a `storm` larger than one hub's open files).
    #[arg(long)]
    pub(crate) hubs: Option<usize>,
    /// Multi-hub: where the publisher publishes.
    #[arg(long, value_enum, default_value = "first")]
    pub(crate) publish_to: PublishTo,
    /// Multi-hub: PostgreSQL server (trust authentication) on which a fresh
    /// database `bench_<random>` is created, and dropped at the end.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub(crate) pg_admin_url: String,
    /// Multi-hub: Redis for the bus; its keys under a fresh
    /// `bench-<random>` prefix are deleted at the end.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis_url: String,

    /// Seed for the reader shuffle (profiles over topics and workers).
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,

    /// Write the JSON result here.
    #[arg(long, short = 'o')]
    pub(crate) out: Option<PathBuf>,
    /// Write the SVG chart here. Default: beside `--out`, with `.svg`.
    #[arg(long)]
    pub(crate) svg: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub(crate) quiet: bool,
    /// Sampling interval of RSS, CPU and latency (milliseconds).
    #[arg(long, default_value_t = 1000)]
    pub(crate) sample_ms: u64,
    /// Interval of `ss` samples of kernel socket memory (seconds; it costs
    /// CPU with many sockets).
    #[arg(long, default_value_t = 5.0)]
    pub(crate) ss_every: f64,
}

impl Args {
    pub(crate) fn readers(&self) -> usize {
        self.readers.unwrap_or(match self.scenario {
            Scenario::Publish => 0,
            _ => 1000,
        })
    }

    pub(crate) fn duration(&self) -> f64 {
        self.duration.unwrap_or(match self.scenario {
            Scenario::Idle => 10.0,
            Scenario::Fanout => 30.0,
            Scenario::SlowReaders => 60.0,
            Scenario::Publish => 20.0,
            Scenario::Storm | Scenario::MultiHub => 30.0,
        })
    }

    /// Hubs the bench starts.
    pub(crate) fn hubs(&self) -> usize {
        self.hubs.unwrap_or(if self.scenario == Scenario::MultiHub { 3 } else { 1 })
    }

    /// Whether readers resume with `since=`.
    pub(crate) fn resume(&self) -> bool {
        self.resume.unwrap_or(self.scenario == Scenario::Storm)
    }

    /// Seconds into publishing of the storm's drop.
    pub(crate) fn storm_at(&self) -> f64 {
        self.storm_at.unwrap_or(self.duration() / 3.0)
    }

    /// Checks the flags that cannot go together; a clear message, nothing
    /// started.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let mix = self.mix()?;
        if self.topics == 0 {
            return Err("--topics must be at least 1".into());
        }
        if self.transport == TransportKind::LongPoll && mix.iter().any(|(p, pct)| *p == Profile::Stalled && *pct > 0.0)
        {
            return Err("the stalled profile does not apply to long-poll: a long-poll reader that stops reading \
                        simply stops asking (use ws or sse for stalled readers)"
                .into());
        }
        if !(self.long_poll_wait >= 0.0 && self.long_poll_wait <= 300.0) {
            return Err("--long-poll-wait must be between 0 and 300 seconds".into());
        }
        if self.scenario == Scenario::Storm {
            let at = self.storm_at();
            if !(at >= 0.0 && at < self.duration()) {
                return Err(format!("--storm-at {at} must be within the publishing time (0 to {})", self.duration()));
            }
            if self.storm_window.is_nan() || self.storm_window <= 0.0 {
                return Err("--storm-window must be above 0".into());
            }
            if !(self.storm_drop_pct > 0.0 && self.storm_drop_pct <= 100.0) {
                return Err("--storm-drop-pct must be above 0 and at most 100".into());
            }
        }
        if !(1..=16).contains(&self.hubs()) {
            return Err("--hubs must be between 1 and 16".into());
        }
        if self.hubs.is_some() && !self.url.is_empty() {
            return Err("--hubs starts hubs; with --url the hubs are the URLs given".into());
        }
        let hubs = if self.url.is_empty() { 1 } else { self.url.len() };
        for (name, list) in [("--subscribe-url", &self.subscribe_url), ("--publish-url", &self.publish_url)] {
            if list.len() > 1 && list.len() != hubs {
                return Err(format!("{name}: give one template, or one per --url ({hubs})"));
            }
        }
        if !self.server_pid.is_empty() && self.server_pid.len() != self.url.len() {
            return Err("--server-pid: give one PID per --url, in the same order".into());
        }
        Ok(())
    }

    /// The mix as (profile, percent) pairs summing to 100.
    pub(crate) fn mix(&self) -> Result<Vec<(Profile, f64)>, String> {
        let raw = self.mix.clone().unwrap_or_else(|| match self.scenario {
            Scenario::SlowReaders => "fast=80,stalled=20".into(),
            _ => "fast=100".into(),
        });
        let mut out: Vec<(Profile, f64)> = Vec::new();
        for part in raw.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, pct) = part.split_once('=').ok_or_else(|| format!("mix entry {part:?}: use NAME=PERCENT"))?;
            let profile = Profile::parse(name)
                .ok_or_else(|| format!("unknown profile {name:?} (fast, 3g, stalled, flapping)"))?;
            let pct: f64 =
                pct.trim().trim_end_matches('%').parse().map_err(|_| format!("bad percentage in {part:?}"))?;
            if !(0.0..=100.0).contains(&pct) {
                return Err(format!("percentage out of range in {part:?}"));
            }
            out.push((profile, pct));
        }
        let total: f64 = out.iter().map(|(_, p)| p).sum();
        if (total - 100.0).abs() > 0.01 {
            return Err(format!("the mix sums to {total}%, not 100%"));
        }
        Ok(out)
    }
}

/// Parses `65536`, `64KiB`, `1MiB` (also `k`/`KB` meaning KiB).
pub(crate) fn parse_bytes(raw: &str) -> Result<usize, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let n: usize = digits.parse().map_err(|_| format!("not a size: {raw:?}"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        other => return Err(format!("unknown size unit {other:?} (use B, KiB or MiB)")),
    };
    n.checked_mul(factor).ok_or_else(|| format!("size too large: {raw:?}"))
}

/// Splits `readers` by the mix (largest remainder), in mix order.
pub(crate) fn split_counts(readers: usize, mix: &[(Profile, f64)]) -> Vec<(Profile, usize)> {
    let exact: Vec<f64> = mix.iter().map(|(_, p)| readers as f64 * p / 100.0).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut left = readers.saturating_sub(counts.iter().sum());
    let mut order: Vec<usize> = (0..mix.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    for i in order.into_iter().cycle().take(mix.len() * 2) {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    mix.iter().zip(counts).map(|((p, _), n)| (*p, n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_split_exactly() {
        let mix = vec![(Profile::Fast, 80.0), (Profile::Stalled, 20.0)];
        assert_eq!(split_counts(2000, &mix), vec![(Profile::Fast, 1600), (Profile::Stalled, 400)]);
        let thirds = vec![(Profile::Fast, 33.3), (Profile::ThreeG, 33.3), (Profile::Flapping, 33.4)];
        assert_eq!(split_counts(10, &thirds).iter().map(|(_, n)| n).sum::<usize>(), 10);
    }

    #[test]
    fn default_mix_is_the_seeds() {
        let args = Args::parse_from(["spillway-bench", "slow-readers"]);
        assert_eq!(args.mix(), Ok(vec![(Profile::Fast, 80.0), (Profile::Stalled, 20.0)]));
        assert!(Args::parse_from(["spillway-bench", "fanout", "--mix", "fast=50"]).mix().is_err());
    }

    #[test]
    fn storm_and_multi_hub_flags() {
        let storm = Args::parse_from(["spillway-bench", "storm", "-d", "12"]);
        assert!(storm.resume(), "storm resumes by default");
        assert!((storm.storm_at() - 4.0).abs() < 1e-9);
        assert_eq!(storm.validate(), Ok(()));
        assert!(!Args::parse_from(["spillway-bench", "storm", "--resume=false"]).resume());
        assert!(!Args::parse_from(["spillway-bench", "fanout"]).resume());
        assert!(Args::parse_from(["spillway-bench", "storm", "-d", "10", "--storm-at", "10"]).validate().is_err());
        let lp = Args::parse_from(["spillway-bench", "slow-readers", "--transport", "long-poll"]);
        assert!(lp.validate().is_err(), "stalled long-poll readers are refused");
        let urls = Args::parse_from(["spillway-bench", "multi-hub", "--url", "http://127.0.0.1:1,http://127.0.0.1:2"]);
        assert_eq!(urls.url.len(), 2);
        assert_eq!(urls.validate(), Ok(()));
        let bad =
            Args::parse_from(["spillway-bench", "multi-hub", "--url", "http://127.0.0.1:1", "--server-pid", "1,2"]);
        assert!(bad.validate().is_err());
        assert_eq!(Args::parse_from(["spillway-bench", "multi-hub"]).hubs(), 3);
        assert_eq!(Args::parse_from(["spillway-bench", "storm"]).hubs(), 1);
        assert_eq!(Args::parse_from(["spillway-bench", "storm", "--hubs", "3"]).hubs(), 3);
        assert!(Args::parse_from(["spillway-bench", "storm", "--hubs", "0"]).validate().is_err());
    }
}
