//! Turning a `Delivery` into the bytes of one transport: the only place that
//! chooses between a full snapshot, a delta, and a `deleted` frame, and that
//! counts deliveries. Every choice reuses the once-per-version encodings.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::AppState;
use crate::metrics::ConnStats;
use crate::protocol::{self, sse_event, sse_single, sse_single_patch, ws_frame, ws_patch};
use crate::topic::{Delivery, Subscription, TopicName, Wire};

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
    /// The bytes to write.
    pub(super) bytes: Bytes,
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
            app.metrics.skipped.fetch_add(skipped, Ordering::Relaxed);
            stats.skipped.fetch_add(skipped, Ordering::Relaxed);
            // A delta only for a reader holding exactly the version this one
            // replaced; anyone else needs the whole state.
            let holds_base = delta && previous.is_some() && snapshot.base.as_ref().map(|(p, _)| *p) == previous;
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
            Framed { bytes, deleted: None, committed_ms: snapshot.updated_ms }
        }
        Delivery::Deleted(snapshot) => {
            let frame = snapshot.encoded(Wire::WsFrame, ws_frame).bytes.clone();
            let bytes = match framing {
                Framing::Ws => frame,
                Framing::SseSingle => protocol::sse_event(&snapshot.position().to_string(), &frame),
                Framing::SseMulti => sse_event(&multi_id(sub), &frame),
            };
            Framed { bytes, deleted: Some(snapshot.topic.clone()), committed_ms: snapshot.updated_ms }
        }
    }
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
