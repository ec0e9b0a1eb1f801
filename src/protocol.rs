//! The wire protocol: every frame and body a reader receives, the close codes
//! and the reconnect hints. Shared by the transports, the tests and the load
//! generator; `docs/PROTOCOL.md` is its prose twin and must agree with it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::topic::{Encoded, Snapshot};

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
