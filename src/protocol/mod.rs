//! The wire protocol: every frame and body a reader receives, the close codes
//! and the reconnect hints. Shared by the transports, the tests and the load
//! generator; `docs/PROTOCOL.md` is its prose twin and must agree with it.

pub mod delta;

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::topic::{Encoded, Snapshot, Wire};

/// Close codes a WebSocket connection can end with. 1000–1015 are the RFC
/// 6455 codes; 4000–4999 are ours.
pub mod close {
    /// Normal closure (the client asked, or the topic ended cleanly).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down or draining; reconnect after the hint.
    pub const GOING_AWAY: u16 = 1001;
    /// The client sent data the protocol does not define.
    pub const POLICY: u16 = 1008;
    /// The client sent a frame larger than the limit.
    pub const TOO_BIG: u16 = 1009;
    /// The topic was deleted; a single-topic connection ends with it.
    pub const TOPIC_DELETED: u16 = 4000;
    /// The connection could not take a frame within the write timeout. Rarely
    /// seen: a socket that stalls cannot usually take the close frame either.
    pub const WRITE_STALL: u16 = 4001;
    /// Two heartbeat pings went unanswered.
    pub const HEARTBEAT_LOST: u16 = 4002;
    /// The reader stayed behind the newest version for longer than
    /// `--max-staleness`: it is looking at a stale board and is better off
    /// reconnecting.
    pub const STALE: u16 = 4003;
    /// The memory guard cut the reader off: the process was over its send
    /// budget or memory limit and this reader's frame had been stuck the
    /// longest. Reconnect after the hint.
    pub const MEMORY: u16 = 4004;
    /// The request was malformed (for example a bad `since`).
    pub const BAD_REQUEST: u16 = 4400;
}

/// The largest frame a client may send on a WebSocket, in bytes.
pub const MAX_CLIENT_FRAME: usize = 4096;

/// The `hello` frame, first on every connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    /// Always `"hello"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The protocol revision (`1`).
    pub protocol: u32,
    /// How often the server sends something (a `heartbeat` if nothing else);
    /// a client that hears nothing for 2.5 times this should reconnect.
    pub heartbeat_ms: u64,
    /// Reconnect advice for this connection.
    pub reconnect: ReconnectAdvice,
}

/// How a client should reconnect: exponential backoff with full jitter
/// between `base_ms` and `cap_ms`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReconnectAdvice {
    /// The first backoff window.
    pub base_ms: u64,
    /// The largest backoff window.
    pub cap_ms: u64,
}

/// The default reconnect advice: windows from 0.5 s up to 30 s.
pub const DEFAULT_RECONNECT: ReconnectAdvice = ReconnectAdvice { base_ms: 500, cap_ms: 30_000 };

/// The text of a `hello` frame.
pub fn hello(heartbeat: Duration) -> Bytes {
    let hello = Hello {
        kind: "hello".into(),
        protocol: 1,
        heartbeat_ms: heartbeat.as_millis() as u64,
        reconnect: DEFAULT_RECONNECT,
    };
    Bytes::from(serde_json::to_vec(&hello).unwrap_or_default())
}

/// The text of a `heartbeat` frame.
pub const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;

/// The text of an `error` frame.
pub fn error_frame(code: &str, message: &str) -> Bytes {
    let frame = serde_json::json!({ "type": "error", "code": code, "message": message });
    Bytes::from(frame.to_string())
}

/// The text of a `notice` frame (drain, overload): why, and when to come back.
pub fn notice_frame(reason: &str, retry_after_ms: u64) -> Bytes {
    let frame = serde_json::json!({ "type": "notice", "reason": reason, "retry_after_ms": retry_after_ms });
    Bytes::from(frame.to_string())
}

/// A jittered reconnect delay in milliseconds, uniform over
/// `[base_ms, base_ms + spread_ms)`, drawn per connection so that readers cut
/// off together do not come back together.
pub fn jittered_ms(base_ms: u64, spread_ms: u64) -> u64 {
    base_ms + fastrand::u64(0..spread_ms.max(1))
}

/// The reason text carried by a close frame: `{"retry_after_ms":N}`.
pub fn close_reason(retry_after_ms: u64) -> String {
    format!(r#"{{"retry_after_ms":{retry_after_ms}}}"#)
}

/// `updated_at` as RFC 3339 with milliseconds, in UTC.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// Milliseconds since the Unix epoch for `at`.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Builds the shared WebSocket payload for a version: a `snapshot` frame, or a
/// `deleted` frame for a tombstone. Topic names and epochs need no JSON
/// escaping (their alphabets exclude it) and the state is stored as compact
/// JSON text, so the frame is assembled without re-serialising the state.
pub fn ws_frame(snapshot: &Snapshot) -> Encoded {
    if snapshot.deleted {
        let text = format!(
            r#"{{"type":"deleted","topic":"{}","epoch":"{}","version":{},"updated_at":"{}"}}"#,
            snapshot.topic,
            snapshot.epoch,
            snapshot.version,
            rfc3339_ms(snapshot.updated_ms)
        );
        return Encoded { bytes: Bytes::from(text), skipped_at: None };
    }
    let head = format!(
        r#"{{"type":"snapshot","topic":"{}","epoch":"{}","version":{},"updated_at":"{}","skipped":"#,
        snapshot.topic,
        snapshot.epoch,
        snapshot.version,
        rfc3339_ms(snapshot.updated_ms)
    );
    let mut out = Vec::with_capacity(head.len() + snapshot.state.len() + 16);
    out.extend_from_slice(head.as_bytes());
    let skipped_at = out.len();
    out.extend_from_slice(br#"0,"state":"#);
    out.extend_from_slice(&snapshot.state);
    out.push(b'}');
    Encoded { bytes: Bytes::from(out), skipped_at: Some(skipped_at) }
}

/// Builds the JSON body of `GET /v1/topics/{topic}` for a live version.
pub fn json_body(snapshot: &Snapshot) -> Encoded {
    let head = format!(
        r#"{{"topic":"{}","epoch":"{}","version":{},"updated_at":"{}","state":"#,
        snapshot.topic,
        snapshot.epoch,
        snapshot.version,
        rfc3339_ms(snapshot.updated_ms)
    );
    let mut out = Vec::with_capacity(head.len() + snapshot.state.len() + 1);
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&snapshot.state);
    out.push(b'}');
    Encoded { bytes: Bytes::from(out), skipped_at: None }
}

/// Builds the shared `patch` frame from `Snapshot::base` to this version, or
/// an empty encoding when there is no base or no merge patch can express the
/// change (the reader then gets a full snapshot).
pub fn ws_patch(snapshot: &Snapshot) -> Encoded {
    let none = Encoded { bytes: Bytes::new(), skipped_at: None };
    let Some((base, base_state)) = &snapshot.base else { return none };
    let parse = |bytes: &[u8]| serde_json::from_slice::<Map<String, Value>>(bytes).ok();
    let (Some(old), Some(new)) = (parse(base_state), parse(&snapshot.state)) else { return none };
    let Some(patch) = delta::merge_patch_between(&old, &new) else { return none };
    let Ok(patch) = serde_json::to_string(&patch) else { return none };
    let text = format!(
        r#"{{"type":"patch","topic":"{}","epoch":"{}","base":{},"version":{},"updated_at":"{}","skipped":0,"patch":{}}}"#,
        snapshot.topic,
        snapshot.epoch,
        base.version,
        snapshot.version,
        rfc3339_ms(snapshot.updated_ms),
        patch
    );
    Encoded { bytes: Bytes::from(text), skipped_at: None }
}

/// Wraps a frame as one Server-Sent Event: `data:` then `id:`.
pub fn sse_event(id: &str, frame: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(frame.len() + id.len() + 16);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(frame);
    out.extend_from_slice(b"\nid: ");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Wraps a control frame (no `id:`, so `Last-Event-ID` keeps its value).
pub fn sse_data(frame: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(frame.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(frame);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The shared single-topic SSE event for a version (id `EPOCH:VERSION`).
pub fn sse_single(snapshot: &Snapshot) -> Encoded {
    let frame = snapshot.encoded(Wire::WsFrame, ws_frame);
    let event = sse_event(&snapshot.position().to_string(), &frame.bytes);
    Encoded { bytes: event, skipped_at: frame.skipped_at.map(|at| at + "data: ".len()) }
}

/// The shared single-topic SSE `patch` event for a version, or empty.
pub fn sse_single_patch(snapshot: &Snapshot) -> Encoded {
    let patch = snapshot.encoded(Wire::WsPatch, ws_patch);
    if patch.bytes.is_empty() {
        return patch.clone();
    }
    Encoded { bytes: sse_event(&snapshot.position().to_string(), &patch.bytes), skipped_at: None }
}

/// The JSON body compressed with gzip.
pub fn json_gzip(snapshot: &Snapshot) -> Encoded {
    let body = snapshot.encoded(Wire::JsonBody, json_body);
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let bytes = match encoder.write_all(&body.bytes).and_then(|()| encoder.finish()) {
        Ok(compressed) => Bytes::from(compressed),
        Err(_) => Bytes::new(),
    };
    Encoded { bytes, skipped_at: None }
}

/// The JSON body compressed with brotli.
pub fn json_brotli(snapshot: &Snapshot) -> Encoded {
    let body = snapshot.encoded(Wire::JsonBody, json_body);
    let mut out = Vec::new();
    // Quality 5 and a 4 MiB window: a good ratio for small JSON at a cost
    // paid once per version.
    let params = brotli::enc::BrotliEncoderParams { quality: 5, lgwin: 22, ..Default::default() };
    let bytes = match brotli::BrotliCompress(&mut &body.bytes[..], &mut out, &params) {
        Ok(_) => Bytes::from(out),
        Err(_) => Bytes::new(),
    };
    Encoded { bytes, skipped_at: None }
}

/// The answer to a publish: where the topic now stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishAck {
    /// The topic written.
    pub topic: String,
    /// Its incarnation.
    pub epoch: String,
    /// The version this write committed.
    pub version: u64,
    /// The commit time, RFC 3339.
    pub updated_at: String,
}

impl PublishAck {
    /// The acknowledgement for a committed version.
    pub fn of(snapshot: &Snapshot) -> Self {
        Self {
            topic: snapshot.topic.to_string(),
            epoch: snapshot.epoch.to_string(),
            version: snapshot.version,
            updated_at: rfc3339_ms(snapshot.updated_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::topic::{Epoch, TopicName};

    fn snap() -> Snapshot {
        let name = TopicName::parse("m-1").expect("valid");
        Snapshot::live(name, Epoch::from_u64(0xabc), 7, 1_700_000_000_123, Bytes::from_static(br#"{"a":[1,"x"]}"#))
    }

    #[test]
    fn ws_frame_is_valid_json_with_every_field() {
        let enc = ws_frame(&snap());
        for skipped in [0, 1, 98765] {
            let v: Value = serde_json::from_slice(&enc.with_skipped(skipped)).expect("json");
            assert_eq!(v["type"], "snapshot");
            assert_eq!(v["topic"], "m-1");
            assert_eq!(v["epoch"], "0000000000000abc");
            assert_eq!(v["version"], 7);
            assert_eq!(v["updated_at"], "2023-11-14T22:13:20.123Z");
            assert_eq!(v["skipped"], skipped);
            assert_eq!(v["state"]["a"][1], "x");
        }
    }

    #[test]
    fn patches_and_events_are_well_formed() {
        let name = TopicName::parse("m-1").expect("valid");
        let mut next =
            Snapshot::live(name, Epoch::from_u64(0xabc), 8, 0, Bytes::from_static(br#"{"a":[1,"x"],"b":2}"#));
        assert!(ws_patch(&next).bytes.is_empty(), "no base, no patch");
        next.base = Some((snap().position(), snap().state.clone()));
        let v: Value = serde_json::from_slice(&ws_patch(&next).bytes).expect("json");
        assert_eq!((v["type"].as_str(), v["base"].as_u64(), v["version"].as_u64()), (Some("patch"), Some(7), Some(8)));
        assert_eq!(v["patch"], serde_json::json!({"b": 2}));
        let event = sse_single(&snap());
        let text = String::from_utf8(event.with_skipped(3).to_vec()).expect("utf8");
        assert!(text.starts_with("data: {") && text.ends_with("\nid: 0000000000000abc:7\n\n"), "{text}");
        let data: Value =
            serde_json::from_str(text.lines().next().expect("line").trim_start_matches("data: ")).expect("json");
        assert_eq!(data["skipped"], 3);
    }

    #[test]
    fn compressed_bodies_decompress_to_the_body() {
        use std::io::Read as _;
        let body = json_body(&snap()).bytes;
        let mut gz = Vec::new();
        flate2::read::GzDecoder::new(&json_gzip(&snap()).bytes[..]).read_to_end(&mut gz).expect("gunzip");
        assert_eq!(gz, body.to_vec());
        let mut br = Vec::new();
        brotli::BrotliDecompress(&mut &json_brotli(&snap()).bytes[..], &mut br).expect("unbrotli");
        assert_eq!(br, body.to_vec());
    }

    #[test]
    fn tombstones_and_bodies_are_valid_json() {
        let name = TopicName::parse("m-1").expect("valid");
        let tomb = Snapshot::tombstone(name, Epoch::from_u64(1), 9, 0);
        let v: Value = serde_json::from_slice(&ws_frame(&tomb).bytes).expect("json");
        assert_eq!((v["type"].as_str(), v["version"].as_u64()), (Some("deleted"), Some(9)));
        let v: Value = serde_json::from_slice(&json_body(&snap()).bytes).expect("json");
        assert_eq!(v["state"]["a"][0], 1);
        let hello: Hello = serde_json::from_slice(&hello(Duration::from_secs(20))).expect("hello");
        assert_eq!(hello.heartbeat_ms, 20_000);
    }
}
