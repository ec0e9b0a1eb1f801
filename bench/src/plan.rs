//! What the coordinator tells worker processes and what they answer: one
//! JSON object per line on the worker's stdin and stdout.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::hist::Dump;

/// How a reader's network behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) enum Profile {
    /// Reads as fast as frames arrive.
    #[serde(rename = "fast")]
    Fast,
    /// A small receive buffer and reads paced to a bandwidth.
    #[serde(rename = "3g")]
    ThreeG,
    /// Stops reading after the handshake.
    #[serde(rename = "stalled")]
    Stalled,
    /// Drops the connection after a random lifetime and reconnects with
    /// full-jitter backoff.
    #[serde(rename = "flapping")]
    Flapping,
}

impl Profile {
    pub(crate) const ALL: [Profile; 4] = [Profile::Fast, Profile::ThreeG, Profile::Stalled, Profile::Flapping];

    pub(crate) const fn label(self) -> &'static str {
        match self {
            Profile::Fast => "fast",
            Profile::ThreeG => "3g",
            Profile::Stalled => "stalled",
            Profile::Flapping => "flapping",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fast" => Some(Profile::Fast),
            "3g" | "slow" => Some(Profile::ThreeG),
            "stalled" | "stall" => Some(Profile::Stalled),
            "flapping" | "flap" => Some(Profile::Flapping),
            _ => None,
        }
    }

    pub(crate) const fn index(self) -> u8 {
        self as u8
    }

    /// Readers of each profile connect from their own range of loopback
    /// source addresses, `127.{10+profile}.0.{1+group}`, so the server's
    /// sockets can be told apart by peer address in `ss`.
    pub(crate) fn source_ip(self, group: u32) -> Ipv4Addr {
        let g = group.min(250 * 250);
        Ipv4Addr::new(127, 10 + self.index(), (g / 250) as u8, 1 + (g % 250) as u8)
    }

    /// The profile a peer address belongs to, if it is one of ours.
    pub(crate) fn of_source(ip: Ipv4Addr) -> Option<Self> {
        let [a, b, ..] = ip.octets();
        if a != 127 {
            return None;
        }
        Profile::ALL.into_iter().find(|p| 10 + p.index() == b)
    }

    /// Whether readers of this profile are expected to end on the final
    /// version (a stalled reader is not).
    pub(crate) const fn should_be_fresh(self) -> bool {
        !matches!(self, Profile::Stalled)
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The reader transports. Only WebSocket exists in the server today; SSE and
/// long-poll become further variants here and in `transport::Conn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum TransportKind {
    /// `ws://…` (RFC 6455).
    Ws,
}

/// One reader.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct ReaderSpec {
    /// Index of its topic in `WorkerPlan::topics`.
    pub(crate) topic: u32,
    pub(crate) profile: Profile,
    /// Loopback source address to bind before connecting (`None`: the kernel
    /// picks 127.0.0.1).
    pub(crate) source: Option<Ipv4Addr>,
}

/// Knobs of the reader profiles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProfileKnobs {
    /// tungstenite's read buffer, bytes.
    pub(crate) read_buffer: usize,
    /// `SO_RCVBUF` for 3G and stalled readers, bytes (the kernel doubles it).
    pub(crate) slow_rcvbuf: u32,
    /// 3G bandwidth, bytes per second.
    pub(crate) bandwidth: u64,
    /// Flapping: a connection lives uniformly between these, milliseconds.
    pub(crate) flap_min_ms: u64,
    pub(crate) flap_max_ms: u64,
    /// Reconnect backoff: full jitter, `uniform(0, min(cap, base·2^attempt))`.
    pub(crate) backoff_base_ms: u64,
    pub(crate) backoff_cap_ms: u64,
    /// Stalled: resume reading after this long (then reconnect and stall
    /// again); `None`: stall until the end.
    pub(crate) stall_resume_ms: Option<u64>,
}

/// Everything one worker process needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerPlan {
    pub(crate) worker: usize,
    pub(crate) transport: TransportKind,
    /// The TCP address to connect to (host:port, loopback).
    pub(crate) connect_addr: String,
    /// Subscription URL per topic (template already expanded).
    pub(crate) urls: Vec<String>,
    pub(crate) readers: Vec<ReaderSpec>,
    /// Handshakes in flight at once.
    pub(crate) connect_concurrency: usize,
    pub(crate) knobs: ProfileKnobs,
    /// How often to send a `Tick`, milliseconds.
    pub(crate) tick_ms: u64,
    /// Runtime threads.
    pub(crate) threads: usize,
}

/// Coordinator → worker, after the plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum Command {
    /// Record latencies of frames sent at or after this instant.
    Measure { from_unix_ns: u64 },
    /// Publishing is over: wait (up to `grace_ms`) for live readers to reach
    /// the final sequence number of their topic, then report and exit.
    /// `finals[topic]` is the last acknowledged sequence number and
    /// `last_publish_unix_ns[topic]` when it was sent.
    Finish { finals: Vec<u64>, last_publish_unix_ns: Vec<u64>, grace_ms: u64 },
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum WorkerMsg {
    Started { pid: u32, open_files_soft: u64 },
    Tick(Tick),
    Result(Box<WorkerResult>),
}

/// Cumulative counters, plus the fast readers' latencies since the last tick.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Tick {
    pub(crate) connected: u64,
    pub(crate) handshakes: u64,
    pub(crate) connect_failures: u64,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    /// Milliseconds from the worker's start until every one of its readers
    /// had made its first connection attempt succeed or fail (0: not yet).
    pub(crate) initial_done_ms: u64,
    pub(crate) fast_latency_interval: Dump,
}

/// One profile's figures in one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ProfileResult {
    pub(crate) readers: u64,
    pub(crate) connected_at_end: u64,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    /// Sum of the frames' `skipped` field.
    pub(crate) skipped_field: u64,
    /// Sequence numbers never seen between consecutive frames.
    pub(crate) seq_gaps: u64,
    pub(crate) latency: Dump,
    pub(crate) handshake: Dump,
    pub(crate) connects: u64,
    pub(crate) connect_failures: u64,
    pub(crate) reconnects: u64,
    /// How connections ended: close code, `eof`, `error`, `client-drop`.
    pub(crate) ends: BTreeMap<String, u64>,
    /// Live readers on the final version at the end, and not.
    pub(crate) on_final: u64,
    pub(crate) not_on_final: u64,
    /// For those on the final version: when they got it, after the last
    /// publish was sent.
    pub(crate) final_after: Dump,
    /// Frames received after the measurement started, and the time span.
    pub(crate) measured_frames: u64,
}

/// What a worker reports at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct WorkerResult {
    pub(crate) worker: usize,
    pub(crate) pid: u32,
    pub(crate) profiles: BTreeMap<Profile, ProfileResult>,
    /// The worker process's own CPU time and peak RSS.
    pub(crate) cpu_s: f64,
    pub(crate) rss_peak_bytes: u64,
}
