//! `Snapshot`: one committed version of a topic, and the wire bytes built from
//! it, at most once per wire form, shared by every reader.

use std::any::Any;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::TopicName;

/// Identifies one incarnation of a topic: new each time the topic is created
/// (so also after a delete and re-create, or with a rebuilt store). Written as
/// 16 lowercase hex digits on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(u64);

impl Epoch {
    /// Wraps a raw value (the store draws it at random when a topic is created).
    pub const fn from_u64(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({self})")
    }
}

impl FromStr for Epoch {
    type Err = InvalidPosition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidPosition);
        }
        u64::from_str_radix(s, 16).map(Self).map_err(|_| InvalidPosition)
    }
}

/// What a reader holds: `EPOCH:VERSION`. Used by `since=`, `Last-Event-ID`,
/// `If-Match` and ETags.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Position {
    /// The incarnation the reader's state belongs to.
    pub epoch: Epoch,
    /// The version the reader holds.
    pub version: u64,
}

/// `EPOCH:VERSION` did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidPosition;

impl fmt::Display for InvalidPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected EPOCH:VERSION (16 hex digits, a colon, a positive integer)")
    }
}

impl std::error::Error for InvalidPosition {}

impl FromStr for Position {
    type Err = InvalidPosition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, version) = s.split_once(':').ok_or(InvalidPosition)?;
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidPosition);
        }
        let version: u64 = version.parse().map_err(|_| InvalidPosition)?;
        if version == 0 {
            return Err(InvalidPosition);
        }
        Ok(Self { epoch: epoch.parse()?, version })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.version)
    }
}

/// The wire forms a snapshot can be encoded into. The core does not know how
/// any of them is built (the transports do); it only guarantees that each form
/// of each version is built once and then shared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
pub enum Wire {
    /// A WebSocket text payload (`snapshot` or `deleted` frame).
    WsFrame = 0,
    /// A WebSocket `patch` frame against `Snapshot::base` (empty when no
    /// merge patch can express the change).
    WsPatch = 1,
    /// A Server-Sent Events event for a single-topic stream.
    SseEvent = 2,
    /// A Server-Sent Events `patch` event for a single-topic stream.
    SsePatch = 3,
    /// The JSON body of `GET /v1/topics/{topic}`.
    JsonBody = 4,
    /// That body, gzip-compressed.
    JsonGzip = 5,
    /// That body, brotli-compressed.
    JsonBrotli = 6,
}

impl Wire {
    /// Every form, in index order.
    pub const ALL: [Wire; WIRE_FORMS] = [
        Wire::WsFrame,
        Wire::WsPatch,
        Wire::SseEvent,
        Wire::SsePatch,
        Wire::JsonBody,
        Wire::JsonGzip,
        Wire::JsonBrotli,
    ];

    /// A short name, for metrics labels.
    pub const fn label(self) -> &'static str {
        match self {
            Wire::WsFrame => "ws",
            Wire::WsPatch => "ws_patch",
            Wire::SseEvent => "sse",
            Wire::SsePatch => "sse_patch",
            Wire::JsonBody => "json",
            Wire::JsonGzip => "json_gzip",
            Wire::JsonBrotli => "json_br",
        }
    }
}

/// How many wire forms exist.
pub const WIRE_FORMS: usize = 7;

/// How many times each wire form was built, process-wide. A reader count that
/// moves this counter is a bug: the test suite watches it.
static ENCODINGS: [AtomicU64; WIRE_FORMS] = [const { AtomicU64::new(0) }; WIRE_FORMS];

/// The number of encodings built so far for `wire`, process-wide.
pub fn encodings_total(wire: Wire) -> u64 {
    ENCODINGS[wire as usize].load(Ordering::Relaxed)
}

/// Bytes built once for one version in one wire form.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// The complete bytes for a reader that skipped nothing.
    pub bytes: Bytes,
    /// Where the single `0` digit of the `skipped` field sits in `bytes`, if
    /// the form has one. A reader that skipped versions gets a copy with its
    /// own count spliced in there; only slow readers pay for that copy, and
    /// they are paced by their own socket.
    pub skipped_at: Option<usize>,
}

impl Encoded {
    /// The bytes for a reader that skipped `skipped` versions: shared when
    /// nothing was skipped, a fresh splice otherwise.
    pub fn with_skipped(&self, skipped: u64) -> Bytes {
        match self.skipped_at {
            Some(at) if skipped > 0 => {
                let digits = skipped.to_string();
                let mut out = Vec::with_capacity(self.bytes.len() + digits.len());
                out.extend_from_slice(&self.bytes[..at]);
                out.extend_from_slice(digits.as_bytes());
                out.extend_from_slice(&self.bytes[at + 1..]);
                Bytes::from(out)
            }
            _ => self.bytes.clone(),
        }
    }
}

/// One committed version of a topic: its live state, or its tombstone.
///
/// Immutable once built; shared through `Arc` by the topic slot and by every
/// connection that last sent it. Its encodings are filled lazily, once each.
pub struct Snapshot {
    /// The topic this version belongs to.
    pub topic: TopicName,
    /// The incarnation of the topic.
    pub epoch: Epoch,
    /// Strictly increasing per topic name, assigned by the durable store.
    pub version: u64,
    /// Commit time, milliseconds since the Unix epoch.
    pub updated_ms: u64,
    /// The state as compact JSON text (always an object), or empty for a
    /// tombstone. Kept as text so the core needs no JSON library.
    pub state: Bytes,
    /// Whether this version is the topic's deletion.
    pub deleted: bool,
    /// The live version this one replaced in the hub (same epoch), and its
    /// state: a reader holding exactly that version can be sent a delta.
    /// Only the state bytes are kept, never the older snapshot, so versions
    /// do not chain into a history.
    pub base: Option<(Position, Bytes)>,
    /// Wire encodings, each built at most once, indexed by `Wire`.
    encoded: [OnceLock<Encoded>; WIRE_FORMS],
    /// A transport's own form of each encoding, built at most once (see
    /// `adapted`). Type-erased, so the core stays ignorant of transports.
    adapted: [OnceLock<Box<dyn Any + Send + Sync>>; WIRE_FORMS],
}

impl Snapshot {
    /// A live version.
    pub fn live(topic: TopicName, epoch: Epoch, version: u64, updated_ms: u64, state: Bytes) -> Self {
        Self {
            topic,
            epoch,
            version,
            updated_ms,
            state,
            deleted: false,
            base: None,
            encoded: Default::default(),
            adapted: Default::default(),
        }
    }

    /// A tombstone: the version that deleted the topic.
    pub fn tombstone(topic: TopicName, epoch: Epoch, version: u64, updated_ms: u64) -> Self {
        Self {
            topic,
            epoch,
            version,
            updated_ms,
            state: Bytes::new(),
            deleted: true,
            base: None,
            encoded: Default::default(),
            adapted: Default::default(),
        }
    }

    /// `EPOCH:VERSION` of this version.
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch, version: self.version }
    }

    /// The encoding of this version in `wire`, built by `build` on first use
    /// and shared afterwards. Concurrent first callers wait for one build.
    pub fn encoded(&self, wire: Wire, build: impl FnOnce(&Snapshot) -> Encoded) -> &Encoded {
        self.encoded[wire as usize].get_or_init(|| {
            ENCODINGS[wire as usize].fetch_add(1, Ordering::Relaxed);
            build(self)
        })
    }

    /// A transport's own form of the `wire` encoding (for instance the text
    /// frame type of a WebSocket library, whose constructor checks UTF-8),
    /// built by `adapt` on first use and cloned for every later reader, so
    /// that per-byte work happens once per version and not once per reader.
    /// `None` if another type was stored for this form first.
    pub fn adapted<T: Clone + Send + Sync + 'static>(
        &self,
        wire: Wire,
        build: impl FnOnce(&Snapshot) -> Encoded,
        adapt: impl FnOnce(&Encoded) -> T,
    ) -> Option<T> {
        let stored = self.adapted[wire as usize].get_or_init(|| Box::new(adapt(self.encoded(wire, build))));
        stored.downcast_ref::<T>().cloned()
    }
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("topic", &self.topic)
            .field("epoch", &self.epoch)
            .field("version", &self.version)
            .field("deleted", &self.deleted)
            .field("state_len", &self.state.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_reject_garbage() {
        let p: Position = "00000000000000ff:42".parse().expect("valid");
        assert_eq!(p.epoch.as_u64(), 255);
        assert_eq!(p.version, 42);
        assert_eq!(p.to_string(), "00000000000000ff:42");
        for bad in [
            "",
            ":",
            "ff:1",
            "00000000000000ff",
            "00000000000000ff:",
            "00000000000000ff:0",
            "00000000000000ff:-1",
            "00000000000000ff:1x",
            "0000000000000g00:1",
            "00000000000000ff:+1",
            "00000000000000ff:99999999999999999999999",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn skipped_is_spliced_only_when_needed() {
        let enc = Encoded { bytes: Bytes::from_static(b"{\"skipped\":0,\"x\":1}"), skipped_at: Some(11) };
        assert_eq!(enc.with_skipped(0).as_ptr(), enc.bytes.as_ptr(), "zero shares the bytes");
        assert_eq!(&enc.with_skipped(1234)[..], b"{\"skipped\":1234,\"x\":1}");
    }

    #[test]
    fn an_adapted_form_is_built_once_and_typed() {
        let name = TopicName::parse("t").expect("valid");
        let snap = Snapshot::live(name, Epoch::from_u64(1), 1, 0, Bytes::from_static(b"{}"));
        let build = |_: &Snapshot| Encoded { bytes: Bytes::from_static(b"abc"), skipped_at: None };
        let mut adapts = 0;
        for _ in 0..10 {
            let got = snap.adapted(Wire::WsFrame, build, |e| {
                adapts += 1;
                e.bytes.len()
            });
            assert_eq!(got, Some(3));
        }
        assert_eq!(adapts, 1);
        assert_eq!(snap.adapted(Wire::WsFrame, build, |_| "other type"), None, "the first type stays");
    }

    #[test]
    fn each_form_is_built_once() {
        let name = TopicName::parse("t").expect("valid");
        let snap = Snapshot::live(name, Epoch::from_u64(1), 1, 0, Bytes::from_static(b"{}"));
        let mut builds = 0;
        for _ in 0..10 {
            snap.encoded(Wire::JsonBody, |_| {
                builds += 1;
                Encoded { bytes: Bytes::from_static(b"x"), skipped_at: None }
            });
        }
        assert_eq!(builds, 1);
    }
}
