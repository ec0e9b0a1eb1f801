//! Server-Sent Events: `GET /v1/topics/{topic}/events` and
//! `GET /v1/events?topic=…`. The same subscription core as WebSocket; this
//! module only frames deliveries as events and keeps hyper from buffering for
//! a slow reader.
//!
//! A streamed body gives no signal when its bytes reach the socket, and hyper
//! would keep pulling events into its own buffer while the socket is full. So
//! after each event the stream waits until the kernel holds less than the
//! clamped send buffer of unacknowledged bytes (`SIOCOUTQ`) before producing
//! the next one: one event in flight, like the WebSocket writer. A reader
//! whose socket stays full for the write timeout is cut off.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use tokio::time::{Instant, sleep, sleep_until};

use super::deliver::{Framing, frame};
use super::{ApiError, AppState, TopicPath, since_param, topic_list, wants_delta};
use crate::metrics::{ConnGuard, Cutoff, EVICTED, OpenGuard, Transport};
use crate::net::{Peer, shutdown_socket, unacked_bytes};
use crate::protocol::{self, HEARTBEAT, jittered_ms};
use crate::topic::{Position, Subscription, TopicName};

/// How often a stream blocked on a full socket looks again.
const GATE_POLL: Duration = Duration::from_millis(20);

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/topics/{topic}/events", get(events_one)).route("/v1/events", get(events_many))
}

async fn events_one(
    State(app): State<AppState>,
    TopicPath(topic): TopicPath,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let delta = wants_delta(query.as_deref())?;
    // `Last-Event-ID` (sent by a reconnecting EventSource) wins over `since`.
    let since =
        match last_event_id(&headers) {
            Some(id) => Some(id.parse::<Position>().map_err(|e| ApiError::BadRequest {
                code: "bad_last_event_id",
                message: format!("Last-Event-ID: {e}"),
            })?),
            None => since_param(query.as_deref())?,
        };
    let kind = Kind { framing: Framing::SseSingle, delta, resuming: since.is_some() };
    let label = topic.to_string();
    open(app, peer, &headers, vec![(topic, since)], kind, label)
}

async fn events_many(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let delta = wants_delta(query.as_deref())?;
    let mut topics = topic_list(query.as_deref(), app.settings.max_topics_per_connection)?;
    if let Some(id) = last_event_id(&headers) {
        for (name, position) in parse_multi_id(&id)? {
            if let Some(entry) = topics.iter_mut().find(|(t, _)| *t == name) {
                entry.1 = Some(position);
            }
        }
    }
    let label = topics.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(",");
    let resuming = topics.iter().any(|(_, since)| since.is_some());
    let kind = Kind { framing: Framing::SseMulti, delta, resuming };
    open(app, peer, &headers, topics, kind, label)
}

fn last_event_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
}

/// Parses a multi-topic id: `NAME=EPOCH:VERSION` joined by commas.
fn parse_multi_id(id: &str) -> Result<Vec<(TopicName, Position)>, ApiError> {
    let bad = || ApiError::BadRequest {
        code: "bad_last_event_id",
        message: "Last-Event-ID must be NAME=EPOCH:VERSION,… for a multi-topic stream".into(),
    };
    id.split(',')
        .map(|part| {
            let (name, position) = part.split_once('=').ok_or_else(bad)?;
            Ok((TopicName::parse(name).map_err(|_| bad())?, position.parse().map_err(|_| bad())?))
        })
        .collect()
}

/// What kind of stream a request asks for.
#[derive(Debug, Clone, Copy)]
struct Kind {
    /// One topic (id `EPOCH:VERSION`) or several (`NAME=EPOCH:VERSION,…`).
    framing: Framing,
    /// `?delta=merge-patch`.
    delta: bool,
    /// The reader named positions it holds (admitted first when short).
    resuming: bool,
}

/// Starts the event stream (or turns the reader away with a hint).
fn open(
    app: AppState,
    peer: Peer,
    headers: &HeaderMap,
    topics: Vec<(TopicName, Option<Position>)>,
    kind: Kind,
    label: String,
) -> Result<Response, ApiError> {
    let Kind { framing, resuming, .. } = kind;
    if !app.settings.origin_allowed(headers) {
        return Err(ApiError::OriginNotAllowed);
    }
    let retry_after_ms = jittered_ms(1000, 4000);
    if app.shutdown.is_cancelled() {
        // Native EventSource gives up for good after an error status, so a
        // reader turned away gets 200, a retry hint and a notice instead.
        let body = turn_away("draining", retry_after_ms);
        return Ok(event_stream(Body::from(body)));
    }
    let permit = match app.settings.admit(&app.admission, &peer, headers, resuming) {
        Ok(permit) => permit,
        // 200 with a hint, not 503: native EventSource never retries a 5xx.
        Err(refused) => return Ok(event_stream(Body::from(turn_away("overload", refused.retry_after_ms)))),
    };
    let subscription = super::ws::subscribe(&app, topics, framing == Framing::SseMulti);
    Ok(stream(app, &peer, subscription, kind, label, Some(permit)))
}

/// An operator's event stream of an internal topic (`/admin/events`). The
/// caller has authenticated the operator; admission is bypassed so that the
/// operator page keeps working during the storm it is there to show.
pub(super) fn operator_stream(app: AppState, peer: &Peer, subscription: Subscription, label: String) -> Response {
    let kind = Kind { framing: Framing::SseSingle, delta: false, resuming: false };
    stream(app, peer, subscription, kind, label, None)
}

/// Streams `subscription` to the reader; `permit` holds its admission place.
fn stream(
    app: AppState,
    peer: &Peer,
    subscription: Subscription,
    kind: Kind,
    label: String,
    permit: Option<crate::admission::Permit>,
) -> Response {
    let Kind { framing, delta, .. } = kind;
    app.settings.clamp_subscription_socket(peer);
    let stream = SseStream {
        guard: app.connections.register("sse", label, peer.addr),
        _open: app.metrics.open(Transport::Sse),
        _permit: permit,
        drain_at: None,
        app,
        subscription,
        framing,
        delta,
        fd: peer.fd,
        last_sent: Instant::now(),
        gated: false,
        committed_ms: None,
        behind_since: None,
        retry_after_ms: jittered_ms(1000, 4000),
        phase: Phase::Start,
    };
    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let event = stream.next_event().await?;
        Some((Ok::<_, std::convert::Infallible>(event), stream))
    });
    event_stream(Body::from_stream(events))
}

/// The body of a refusal: a retry hint and a `notice`, then the end.
fn turn_away(reason: &str, retry_after_ms: u64) -> Bytes {
    let mut out = format!("retry: {retry_after_ms}\n").into_bytes();
    out.extend_from_slice(&protocol::sse_data(&protocol::notice_frame(reason, retry_after_ms)));
    Bytes::from(out)
}

fn event_stream(body: Body) -> Response {
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx and friends buffer responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Where a stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing sent yet: the retry hint and `hello` come first.
    Start,
    /// Streaming deliveries.
    Live,
    /// The last event has been produced; the next poll ends the body.
    Done,
}

/// One reader's event stream.
struct SseStream {
    app: AppState,
    subscription: Subscription,
    framing: Framing,
    delta: bool,
    /// The connection's socket, for the back-pressure gate and the cut-off.
    fd: RawFd,
    /// Keeps the connection in the registry while the stream lives.
    guard: ConnGuard,
    /// Counts the connection as open while the stream lives.
    _open: OpenGuard,
    /// Holds the admission place while the stream lives (operator streams
    /// bypass admission and hold none).
    _permit: Option<crate::admission::Permit>,
    /// When shutdown began: this stream's moment in the drain window.
    drain_at: Option<Instant>,
    /// When the last event was handed over: a `heartbeat` event goes out once
    /// nothing has been sent for the heartbeat interval.
    last_sent: Instant,
    /// An event was handed to hyper and may not have reached the kernel yet.
    gated: bool,
    /// The commit time of the state event in flight, for the lag histogram.
    committed_ms: Option<u64>,
    /// Since when the reader has been continuously behind the newest
    /// version, for `--max-staleness` (as on WebSocket).
    behind_since: Option<Instant>,
    retry_after_ms: u64,
    phase: Phase,
}

impl SseStream {
    async fn next_event(&mut self) -> Option<Bytes> {
        match self.phase {
            Phase::Done => return None,
            Phase::Start => {
                self.phase = Phase::Live;
                let mut out = format!("retry: {}\n", self.retry_after_ms).into_bytes();
                out.extend_from_slice(&protocol::sse_data(&protocol::hello(self.app.settings.heartbeat)));
                return Some(self.sent(Bytes::from(out), false));
            }
            Phase::Live => {}
        }
        if self.gated && !self.wait_for_socket().await {
            return None;
        }
        if self.went_stale() {
            self.app.metrics.cutoff(Cutoff::Stale);
            self.phase = Phase::Done;
            return Some(turn_away("stale", self.retry_after_ms));
        }
        let shutdown = self.app.shutdown.clone();
        let stats = Arc::clone(&self.guard.stats);
        loop {
            tokio::select! {
                biased;
                () = stats.evict.notified() => {
                    // Counted by the memory guard; the socket had room again,
                    // so the reader gets its hint.
                    self.phase = Phase::Done;
                    return Some(turn_away("memory", self.retry_after_ms));
                }
                () = shutdown.cancelled(), if self.drain_at.is_none() => {
                    // Each reader leaves at its own moment in the drain window.
                    self.drain_at = Some(Instant::now() + self.app.settings.drain_delay());
                    continue;
                }
                () = sleep_until(self.drain_at.unwrap_or_else(Instant::now)), if self.drain_at.is_some() => {
                    self.app.metrics.cutoff(Cutoff::Shutdown);
                    self.phase = Phase::Done;
                    return Some(turn_away("drain", self.retry_after_ms));
                }
                () = self.subscription.ready() => {
                    let Some(delivery) = self.subscription.take() else { continue };
                    let stats = Arc::clone(&self.guard.stats);
                    let framed = frame(&self.app, &stats, &self.subscription, delivery, self.delta, self.framing);
                    self.committed_ms = Some(framed.committed_ms);
                    if let Some(topic) = framed.deleted {
                        if self.framing == Framing::SseMulti {
                            self.subscription.remove(topic.as_str());
                        } else {
                            self.app.metrics.cutoff(Cutoff::Deleted);
                            self.phase = Phase::Done;
                        }
                    }
                    return Some(self.sent(framed.bytes, true));
                }
                () = sleep_until(self.last_sent + self.app.settings.heartbeat) => {
                    self.app.metrics.heartbeats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Some(self.sent(protocol::sse_data(HEARTBEAT.as_bytes()), false));
                }
            }
        }
    }

    /// Records an event handed to hyper.
    fn sent(&mut self, bytes: Bytes, state: bool) -> Bytes {
        self.last_sent = Instant::now();
        self.gated = true;
        self.guard.stats.hand_over(&self.app.metrics, bytes.len() as u64);
        if state {
            // One state event at a time: the gate holds the next until this
            // one has reached the kernel.
            self.guard.stats.pending.store(1, std::sync::atomic::Ordering::Relaxed);
            self.guard.stats.pending_max.fetch_max(1, std::sync::atomic::Ordering::Relaxed);
            self.app.metrics.observe_pending(1);
        }
        bytes
    }

    /// Waits until the kernel has taken what was handed over; false if the
    /// reader was cut off (stalled for the write timeout) or shutdown came.
    async fn wait_for_socket(&mut self) -> bool {
        let limit = self.app.settings.socket_send_buffer;
        let started = Instant::now();
        loop {
            if self.guard.stats.in_flight_since_ms.load(std::sync::atomic::Ordering::Relaxed) == EVICTED {
                // The memory guard cut this stuck reader off (and counted
                // it): free its buffers now, as a write stall would.
                shutdown_socket(self.fd);
                self.phase = Phase::Done;
                return false;
            }
            match unacked_bytes(self.fd) {
                Ok(queued) if queued <= limit => break,
                Ok(_) => {}
                // Not a socket we can ask (should not happen): do not gate.
                Err(_) => break,
            }
            if started.elapsed() >= self.app.settings.write_timeout {
                self.app.metrics.cutoff(Cutoff::WriteStall);
                tracing::debug!(peer = %self.guard.stats.peer, "event stream stalled; cutting the reader off");
                // The socket cannot take even a last event: end it outright.
                shutdown_socket(self.fd);
                self.phase = Phase::Done;
                return false;
            }
            sleep(GATE_POLL).await;
        }
        self.gated = false;
        self.guard.stats.flushed(&self.app.metrics);
        self.guard.stats.pending.store(0, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// After a state event has reached the kernel: records its lag, and
    /// says whether the reader has now been behind the newest version,
    /// continuously, for longer than `--max-staleness` (as on WebSocket: it
    /// is looking at a stale board and is better off reconnecting).
    fn went_stale(&mut self) -> bool {
        let Some(committed_ms) = self.committed_ms.take() else { return false };
        super::deliver::observe_lag(&self.app, committed_ms);
        if !self.subscription.is_due() {
            self.behind_since = None;
            return false;
        }
        let since = *self.behind_since.get_or_insert(self.last_sent);
        since.elapsed() > self.app.settings.max_staleness
    }
}
