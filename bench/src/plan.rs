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

/// The reader transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum TransportKind {
    /// `ws://…/v1/topics/{topic}/ws` (RFC 6455).
    Ws,
    /// Server-Sent Events: `http://…/v1/topics/{topic}/events`.
    Sse,
    /// Long-poll: `http://…/v1/topics/{topic}?since=…&wait=…`, one request
    /// after another on a keep-alive connection.
    LongPoll,
}

impl TransportKind {
    /// The default subscription URL template for a hub at `addr`.
    pub(crate) fn default_template(self, addr: &str) -> String {
        match self {
            TransportKind::Ws => format!("ws://{addr}/v1/topics/{{topic}}/ws"),
            TransportKind::Sse => format!("http://{addr}/v1/topics/{{topic}}/events"),
            TransportKind::LongPoll => format!("http://{addr}/v1/topics/{{topic}}"),
        }
    }
}

/// One hub as the readers see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HubTarget {
    /// The TCP address to connect to (host:port, loopback).
    pub(crate) connect_addr: String,
    /// Subscription URL per topic (template already expanded).
    pub(crate) urls: Vec<String>,
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
    /// Index of its hub in `WorkerPlan::hubs`.
    pub(crate) hub: u8,
    /// `storm`: this reader is in the half that drops at the storm instant.
    pub(crate) drops: bool,
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
    /// The hubs readers connect to (one unless `multi-hub` or a `--url` list).
    pub(crate) hubs: Vec<HubTarget>,
    pub(crate) readers: Vec<ReaderSpec>,
    /// Reconnect with the position held (`since=`), as the product's client.
    pub(crate) resume: bool,
    /// An admitted connection must deliver its first frame (`hello`, or a
    /// long-poll's first answer) within this, milliseconds, or it counts as
    /// an admitted connection that timed out.
    pub(crate) first_frame_timeout_ms: u64,
    /// Long-poll: `wait=` of each request, seconds.
    pub(crate) long_poll_wait_s: f64,
    /// `storm`: only readers that do not drop feed the per-tick latency.
    pub(crate) storm: bool,
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
    /// `storm`: at `at_unix_ns`, every reader with `drops` closes its
    /// connection without a close frame and reconnects at once. Latencies of
    /// the others are split by send time: before `at_unix_ns`, within
    /// `window_ms` after it, and later.
    Storm { at_unix_ns: u64, window_ms: u64 },
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
    /// `storm`: readers dropped so far, and those of them back (admitted and
    /// their first frame received).
    pub(crate) storm_dropped: u64,
    pub(crate) storm_back: u64,
    /// Refusals (503 or an SSE `overload` notice) so far.
    pub(crate) refusals: u64,
    /// Admitted connections whose first frame did not come in time.
    pub(crate) admitted_timeouts: u64,
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
    /// Refusals by reason (`accept_rate`, `overload`, …).
    pub(crate) refusals: BTreeMap<String, u64>,
    /// Admitted connections whose first frame did not come in time.
    pub(crate) admitted_timeouts: u64,
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
    /// Per hub (same order as the plan's).
    pub(crate) hubs: Vec<HubResult>,
    /// `storm`: the dropped half's reconnection and the others' latency.
    pub(crate) storm: Option<StormResult>,
}

/// One hub's readers in one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct HubResult {
    pub(crate) readers: u64,
    pub(crate) connected_at_end: u64,
    /// Fast readers' publish-to-delivery latency.
    pub(crate) fast_latency: Dump,
    /// Live readers expected fresh: on the final version at the end, or not.
    pub(crate) on_final: u64,
    pub(crate) not_on_final: u64,
    pub(crate) final_after: Dump,
}

/// The storm, as one worker saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StormResult {
    /// Readers that dropped, and those back by the end.
    pub(crate) dropped: u64,
    pub(crate) back: u64,
    /// Connection attempts by dropped readers after the drop.
    pub(crate) attempts: u64,
    /// Of those, refused (503 or `overload` notice), by reason.
    pub(crate) refusals: BTreeMap<String, u64>,
    /// Of those, failed otherwise (TCP, timeout, protocol).
    pub(crate) failures: u64,
    /// Of those, admitted but without a first frame in time.
    pub(crate) admitted_timeouts: u64,
    /// Per dropped reader: from the drop until it was back.
    pub(crate) back_after: Dump,
    /// When the last dropped reader was back (Unix ns; 0: none).
    pub(crate) last_back_unix_ns: u64,
    /// Undisturbed fast readers' latency by the send time of the frame.
    pub(crate) latency_before: Dump,
    pub(crate) latency_storm: Dump,
    pub(crate) latency_after: Dump,
}
