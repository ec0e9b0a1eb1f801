//! Turning a `Delivery` into the bytes of one transport: the only place that
//! chooses between a full snapshot, a delta, and a `deleted` frame, and that
//! counts deliveries. Every choice reuses the once-per-version encodings.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;

use super::AppState;
use crate::metrics::ConnStats;
use crate::protocol::{self, sse_event, sse_single, sse_single_patch, ws_frame, ws_patch};
use crate::topic::{Delivery, Encoded, Snapshot, Subscription, TopicName, Wire};

/// How a transport frames deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// A WebSocket text payload.
    Ws,
    /// A Server-Sent Event with `id: EPOCH:VERSION` (one topic per stream).
    SseSingle,
    /// A Server-Sent Event with `id: NAME=EPOCH:VERSION,...` (several topics).
    SseMulti,
}

/// One delivery, framed.
#[derive(Debug)]
pub(super) struct Framed {
    /// The bytes to write (empty for `Framing::Ws`, which uses `text`).
    pub(super) bytes: Bytes,
    /// For `Framing::Ws`, the payload as WebSocket text.
    pub(super) text: Option<Utf8Bytes>,
    /// The topic whose deletion this frame announces, if it does.
    pub(super) deleted: Option<TopicName>,
    /// When the version was committed (ms since the Unix epoch), for the
    /// delivery-lag histogram.
    pub(super) committed_ms: u64,
}

/// Frames `delivery` for `framing`. `sub` has already recorded the delivery,
/// so its positions are what the reader holds once it has this frame.
pub(super) fn frame(
    app: &AppState,
    stats: &ConnStats,
    sub: &Subscription,
    delivery: Delivery,
    delta: bool,
    framing: Framing,
) -> Framed {
    app.metrics.deliveries.fetch_add(1, Ordering::Relaxed);
    stats.frames.fetch_add(1, Ordering::Relaxed);
    match delivery {
        Delivery::Snapshot { snapshot, skipped, previous } => {
            // The process-wide counter is shared by every connection task on
            // every core: leave its cache line alone when there is nothing to add.
            if skipped > 0 {
                app.metrics.skipped.fetch_add(skipped, Ordering::Relaxed);
                stats.skipped.fetch_add(skipped, Ordering::Relaxed);
            }
            // A delta only for a reader holding exactly the version this one
            // replaced; anyone else needs the whole state.
            let holds_base = delta && previous.is_some() && snapshot.base.as_ref().map(|(p, _)| *p) == previous;
            if framing == Framing::Ws {
                let text = ws_text(&snapshot, holds_base, skipped);
                return Framed {
                    bytes: Bytes::new(),
                    text: Some(text),
                    deleted: None,
                    committed_ms: snapshot.updated_ms,
                };
            }
            let bytes = match framing {
                Framing::Ws | Framing::SseMulti => {
                    let payload = holds_base
                        .then(|| snapshot.encoded(Wire::WsPatch, ws_patch).bytes.clone())
                        .filter(|p| !p.is_empty())
                        .unwrap_or_else(|| snapshot.encoded(Wire::WsFrame, ws_frame).with_skipped(skipped));
                    match framing {
                        Framing::Ws => payload,
                        _ => sse_event(&multi_id(sub), &payload),
                    }
                }
                Framing::SseSingle => holds_base
                    .then(|| snapshot.encoded(Wire::SsePatch, sse_single_patch).bytes.clone())
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| snapshot.encoded(Wire::SseEvent, sse_single).with_skipped(skipped)),
            };
            Framed { bytes, text: None, deleted: None, committed_ms: snapshot.updated_ms }
        }
        Delivery::Deleted(snapshot) => {
            let deleted = Some(snapshot.topic.clone());
            if framing == Framing::Ws {
                let text = shared_text(&snapshot, Wire::WsFrame, ws_frame);
                return Framed { bytes: Bytes::new(), text: Some(text), deleted, committed_ms: snapshot.updated_ms };
            }
            let frame = snapshot.encoded(Wire::WsFrame, ws_frame).bytes.clone();
            let bytes = match framing {
                Framing::Ws => frame,
                Framing::SseSingle => protocol::sse_event(&snapshot.position().to_string(), &frame),
                Framing::SseMulti => sse_event(&multi_id(sub), &frame),
            };
            Framed { bytes, text: None, deleted, committed_ms: snapshot.updated_ms }
        }
    }
}

/// A WebSocket payload: the version's shared text, or for a reader that
/// skipped versions a copy with its own `skipped` count spliced in.
///
/// A text frame must be valid UTF-8, and the WebSocket library checks every
/// byte when it is handed plain bytes. The shared text is checked once per
/// version (`Snapshot::adapted`), and a spliced copy is assembled from that
/// checked text, so no reader's frame is checked again.
fn ws_text(snapshot: &Snapshot, holds_base: bool, skipped: u64) -> Utf8Bytes {
    if holds_base {
        let patch = shared_text(snapshot, Wire::WsPatch, ws_patch);
        // Empty when no merge patch can express the change.
        if !patch.is_empty() {
            return patch;
        }
    }
    let full = shared_text(snapshot, Wire::WsFrame, ws_frame);
    let Some(at) = snapshot.encoded(Wire::WsFrame, ws_frame).skipped_at.filter(|_| skipped > 0) else {
        return full;
    };
    // `at` is the single ASCII `0` of the `skipped` field, so both slices
    // start and end on character boundaries.
    match (full.as_str().get(..at), full.as_str().get(at + 1..)) {
        (Some(head), Some(tail)) => {
            let mut out = String::with_capacity(full.len() + 20);
            out.push_str(head);
            let _ = write!(out, "{skipped}");
            out.push_str(tail);
            Utf8Bytes::from(out)
        }
        _ => checked_text(snapshot.encoded(Wire::WsFrame, ws_frame).with_skipped(skipped)),
    }
}

/// The `wire` encoding of `snapshot` as WebSocket text, checked once per
/// version and shared by every reader.
fn shared_text(snapshot: &Snapshot, wire: Wire, build: fn(&Snapshot) -> Encoded) -> Utf8Bytes {
    snapshot
        .adapted(wire, build, |encoded| checked_text(encoded.bytes.clone()))
        .unwrap_or_else(|| checked_text(snapshot.encoded(wire, build).bytes.clone()))
}

/// WebSocket text from bytes we built ourselves as UTF-8 (JSON text).
pub(super) fn checked_text(bytes: Bytes) -> Utf8Bytes {
    // Our encoders only ever produce UTF-8; the check cannot fail.
    Utf8Bytes::try_from(bytes).unwrap_or_else(|_| Utf8Bytes::from_static("{}"))
}

/// Records a state frame's commit-to-socket lag, once the socket has taken it.
pub(super) fn observe_lag(app: &AppState, committed_ms: u64) {
    let lag_ms = crate::metrics::now_unix_ms().saturating_sub(committed_ms);
    app.metrics.delivery_lag.observe_us(lag_ms.saturating_mul(1000));
}

/// The SSE id of a multi-topic stream: every held position, `NAME=EPOCH:VERSION`
/// joined by commas, so `Last-Event-ID` resumes every topic at once.
pub(super) fn multi_id(sub: &Subscription) -> String {
    let mut id = String::new();
    for (name, held) in sub.positions() {
        if let Some(position) = held {
            if !id.is_empty() {
                id.push(',');
            }
            id.push_str(name.as_str());
            id.push('=');
            id.push_str(&position.to_string());
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Epoch;

    fn snapshot() -> Snapshot {
        let name = TopicName::parse("t").expect("valid");
        Snapshot::live(name, Epoch::from_u64(7), 3, 0, Bytes::from("{\"a\":\"é\"}"))
    }

    #[test]
    fn ws_text_is_shared_or_spliced_like_the_bytes() {
        let snap = snapshot();
        let shared = ws_text(&snap, false, 0);
        assert_eq!(shared.as_ptr(), ws_text(&snap, false, 0).as_ptr(), "every reader shares one text");
        assert_eq!(shared.as_bytes(), &snap.encoded(Wire::WsFrame, ws_frame).bytes[..]);
        let spliced = ws_text(&snap, false, 1234);
        assert_eq!(spliced.as_bytes(), &snap.encoded(Wire::WsFrame, ws_frame).with_skipped(1234)[..]);
        assert!(spliced.as_str().contains(r#""skipped":1234,"#), "{spliced}");
    }
}
