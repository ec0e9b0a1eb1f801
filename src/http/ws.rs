//! The WebSocket transport: `GET /v1/topics/{topic}/ws` (one topic) and
//! `GET /v1/ws?topic=…` (several, with `subscribe`/`unsubscribe` messages).
//!
//! Each connection runs one task and holds one `Subscription` (per topic, the
//! position it last sent). The writer wakes on change, loads the newest
//! version, hands one frame to the socket and waits until the socket has
//! taken it before looking again: a slow reader skips versions instead of
//! queueing them, and a reader that stops reading is cut off after the write
//! timeout.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::time::{Instant, sleep_until};

use super::deliver::{Framing, checked_text, frame};
use super::{ApiError, AppState, TopicPath, since_param, topic_list, wants_delta};
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::admission::Permit;
use crate::metrics::{ConnGuard, ConnStats, Cutoff, Transport};
use crate::net::Peer;
use crate::protocol::{self, HEARTBEAT, MAX_CLIENT_FRAME, close, close_reason, jittered_ms};
use crate::topic::{Position, SubscribeError, Subscription, TopicName};

/// How long a close frame (or the last frame before it) may take to leave
/// before the connection is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// tungstenite's read buffer, allocated up front for every connection:
/// clients send almost nothing (pongs, close frames, the odd subscribe).
/// 64 bytes hold a whole pong (6 bytes with an empty payload, as our pings
/// ask for) and save ~128 KiB per connection against the 128 KiB default
/// (and 448 B against the 512 B used before; see the Profiling section of
/// BENCHMARKS.md). Longer client frames (a close with a reason, a subscribe,
/// anything up to the 4 KiB limit) are still read whole, 64 bytes a read.
const READ_BUFFER: usize = 64;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/topics/{topic}/ws", get(subscribe_one)).route("/v1/ws", get(subscribe_many))
}

async fn subscribe_one(
    State(app): State<AppState>,
    TopicPath(topic): TopicPath,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let since = since_param(query.as_deref())?;
    let delta = wants_delta(query.as_deref())?;
    let upgrade = upgrade.map_err(|_| ApiError::UpgradeRequired)?;
    let resuming = since.is_some();
    let label = topic.to_string();
    accept(app, peer, &headers, upgrade, vec![(topic, since)], Mode { delta, multi: false, resuming }, label)
}

async fn subscribe_many(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let topics = topic_list(query.as_deref(), app.settings.max_topics_per_connection)?;
    let delta = wants_delta(query.as_deref())?;
    let upgrade = upgrade.map_err(|_| ApiError::UpgradeRequired)?;
    let resuming = topics.iter().any(|(_, since)| since.is_some());
    let label = topics.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(",");
    accept(app, peer, &headers, upgrade, topics, Mode { delta, multi: true, resuming }, label)
}

/// Checks the origin, clamps the socket and upgrades.
fn accept(
    app: AppState,
    peer: Peer,
    headers: &HeaderMap,
    upgrade: WebSocketUpgrade,
    topics: Vec<(TopicName, Option<Position>)>,
    mode: Mode,
    label: String,
) -> Result<Response, ApiError> {
    if !app.settings.origin_allowed(headers) {
        return Err(ApiError::OriginNotAllowed);
    }
    if app.shutdown.is_cancelled() {
        return Err(ApiError::Draining);
    }
    if app.settings.disable_websocket {
        return Err(ApiError::WebSocketDisabled);
    }
    // Admission comes before the upgrade and before any per-connection state
    // beyond the request itself: a storm is turned away cheaply.
    let permit = app
        .settings
        .admit(&app.admission, &peer, headers, mode.resuming)
        .map_err(|r| ApiError::Overloaded { reason: r.why.label(), retry_after_ms: r.retry_after_ms })?;
    // Only an admitted reader touches the hub (a new topic name takes its
    // write lock to create a placeholder).
    let subscription = subscribe(&app, topics, mode.multi);
    // This request becomes a subscription: from here on the socket only
    // carries states we can drop, so keep the kernel from hoarding them.
    app.settings.clamp_subscription_socket(&peer);
    // Held by the task until it ends, so shutdown can wait for it.
    let tracked = app.tasks.token();
    // axum keeps the upgrade callback inside the connection's task for as
    // long as the connection lives (a future keeps everything it captured),
    // so the callback captures one pointer instead of everything by value.
    // Listed from here on; the entry goes when the task ends, or at once if
    // the upgrade never completes (the callback, holding it, is dropped).
    let guard = app.connections.register("ws", label, peer.addr);
    let mut setup =
        Box::new(Setup { app, subscription: Some(subscription), mode, guard, _permit: permit, _tracked: tracked });
    Ok(upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |mut socket| async move {
            // Fields are used in place, never moved into new locals: a
            // future stores each local beside what it was moved from.
            let open = setup.app.metrics.open(Transport::Ws);
            if let Some(subscription) = setup.subscription.take() {
                let stats = Arc::clone(&setup.guard.stats);
                let mut connection = Connection::new(&setup.app, subscription, setup.mode, stats);
                connection.run(&mut socket).await;
            }
            drop(open);
            // Then the registry entry, the admission permit and the
            // task-tracker token, in that order, as the box drops.
            drop(setup);
        }))
}

/// What an admitted reader brings to its connection task, boxed once.
struct Setup {
    app: AppState,
    /// Moved into the `Connection` when the task starts.
    subscription: Option<Subscription>,
    mode: Mode,
    /// Its entry in the connection registry.
    guard: ConnGuard,
    /// Its place under the admission limits, given back when the task ends.
    _permit: Permit,
    /// Keeps shutdown waiting for this task.
    _tracked: TaskTrackerToken,
}

/// The subscription for a connection's initial topics.
pub(super) fn subscribe(app: &AppState, topics: Vec<(TopicName, Option<Position>)>, multi: bool) -> Subscription {
    if !multi && let [(name, since)] = topics.as_slice() {
        return Subscription::single(app.hub.follow(name, *since));
    }
    let mut subscription = Subscription::multi(app.settings.max_topics_per_connection);
    for (name, since) in topics {
        // The list was checked against the limit already.
        let _ = subscription.add(app.hub.follow(&name, since));
    }
    subscription
}

/// What kind of connection this is.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// `?delta=merge-patch`: send `patch` frames when the reader holds the base.
    delta: bool,
    /// `/v1/ws`: several topics, client messages manage them, a deleted topic
    /// is dropped instead of closing the connection.
    multi: bool,
    /// The reader named positions it holds (it is reconnecting).
    resuming: bool,
}

/// A message a client may send on `/v1/ws`.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientMessage {
    /// Follow a topic, from `since` if given.
    Subscribe { topic: String, since: Option<String> },
    /// Stop following a topic.
    Unsubscribe { topic: String },
}

/// What happened on the socket.
enum Io {
    /// The client sent something (or the stream ended).
    Incoming(Option<Result<Message, axum::Error>>),
    /// Everything handed to the socket has been written.
    Flushed(Result<(), axum::Error>),
}

/// Why the connection is ending, once it is.
#[derive(Clone, Copy)]
struct Closing {
    /// Set once the close frame is queued; the connection ends when it has
    /// been written or the grace runs out.
    deadline: Instant,
}

/// One reader's connection state. Deliberately small: it is multiplied by
/// every open socket.
struct Connection<'a> {
    app: &'a AppState,
    subscription: Subscription,
    mode: Mode,
    stats: Arc<ConnStats>,
    /// This connection's reconnect hint, drawn once so that every close it
    /// sends says the same thing and connections cut off together spread out.
    retry_after_ms: u64,
    /// When the frame being written was handed to the socket, if one is.
    in_flight_since: Option<Instant>,
    /// Whether the frame in flight is a state frame (counted as pending).
    state_in_flight: bool,
    /// The commit time of the state frame in flight, for the lag histogram.
    committed_ms: u64,
    /// Whether anything was sent since the last heartbeat tick.
    /// When the last text frame was handed over: a `heartbeat` frame goes
    /// out once nothing has been sent for the heartbeat interval.
    last_text: Instant,
    /// When the last ping was sent; pings go out every interval.
    last_ping: Instant,
    /// Pings sent and not answered.
    unanswered_pings: u32,
    /// Since when the reader has been continuously behind the newest
    /// version (a newer one was due each time a frame finished).
    behind_since: Option<Instant>,
    closing: Option<Closing>,
}

impl<'a> Connection<'a> {
    fn new(app: &'a AppState, subscription: Subscription, mode: Mode, stats: Arc<ConnStats>) -> Self {
        Self {
            app,
            subscription,
            mode,
            stats,
            retry_after_ms: jittered_ms(1000, 4000),
            in_flight_since: None,
            state_in_flight: false,
            committed_ms: 0,
            last_text: Instant::now(),
            last_ping: Instant::now(),
            unanswered_pings: 0,
            behind_since: None,
            closing: None,
        }
    }

    async fn run<S>(&mut self, socket: &mut S)
    where
        S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
    {
        // Settings are read where they are used rather than copied into
        // locals: every local that lives across an `.await` is stored in the
        // connection's future, once per open socket.
        let app = self.app;
        // Registered once for the whole connection: a fresh `cancelled()` in
        // every turn of the loop would join and leave the token's waiter
        // list, one lock shared by every connection, twice per frame.
        let cancelled = app.shutdown.cancelled();
        let mut cancelled = std::pin::pin!(cancelled);
        // The memory guard's signal, registered once for the same reason
        // (its `notify_one` leaves a permit, so nothing is missed before the
        // first poll). It completes at most once: the branch then closes the
        // connection, which disables it.
        let stats = Arc::clone(&self.stats);
        let evicted = stats.evict.notified();
        let mut evicted = std::pin::pin!(evicted);
        // One timer serves heartbeats and pings: it fires at the earlier of
        // the two moments and is re-armed from what happened since.
        let timer = sleep_until(Instant::now() + app.settings.heartbeat);
        let mut timer = std::pin::pin!(timer);

        self.send(socket, text(protocol::hello(app.settings.heartbeat)), false);
        let mut drain_at: Option<Instant> = None;
        loop {
            let in_flight = self.in_flight_since.is_some();
            tokio::select! {
                biased;
                () = cancelled.as_mut(), if self.closing.is_none() && drain_at.is_none() => {
                    // Each reader leaves at its own moment in the drain window.
                    drain_at = Some(Instant::now() + self.app.settings.drain_delay());
                }
                // `select!` builds every branch's future on every turn, even
                // a disabled one. These two timers are needed only while
                // draining or while a write is stuck, so each is built and
                // boxed on its first poll: an idle connection's future does
                // not carry them, and a fast reader's write (flushed before
                // this branch is polled) never builds one.
                () = async { Box::pin(sleep_until(drain_at.unwrap_or_else(Instant::now))).await }, if drain_at.is_some() && self.closing.is_none() => {
                    self.app.metrics.cutoff(Cutoff::Shutdown);
                    let notice = protocol::notice_frame("drain", self.retry_after_ms);
                    self.send(socket, text(notice), false);
                    self.close(socket, close::GOING_AWAY);
                }
                () = evicted.as_mut(), if self.closing.is_none() => {
                    // The memory guard counted the cut-off. The close frame
                    // waits behind the stuck one: a reader that reads again
                    // within the grace still gets its hint.
                    tracing::debug!(peer = %self.stats.peer, "memory guard: cutting the reader off");
                    self.close(socket, close::MEMORY);
                }
                io = next_io(socket, in_flight) => match io {
                    Io::Flushed(Ok(())) => {
                        let started = self.in_flight_since.take();
                        self.stats.flushed(&self.app.metrics);
                        if self.state_in_flight {
                            self.state_in_flight = false;
                            self.stats.pending.store(0, Ordering::Relaxed);
                            super::deliver::observe_lag(self.app, self.committed_ms);
                            self.check_staleness(socket, started);
                        }
                        // Once the close frame is out, wait (within the grace)
                        // for the client's close or its end of the stream:
                        // dropping the socket with client data unread would
                        // send a reset that can destroy the close frame.
                    }
                    // The client went away; nothing to count.
                    Io::Incoming(None) => break,
                    Io::Flushed(Err(error)) => {
                        if self.closing.is_none() && !client_went_away(&error) {
                            self.app.metrics.cutoff(Cutoff::SocketError);
                        }
                        break;
                    }
                    Io::Incoming(Some(Err(error))) => {
                        // tungstenite reports an oversized frame as a capacity
                        // error; anything else means the stream is broken.
                        let too_big = error.to_string().contains("Space limit exceeded")
                            || error.to_string().to_ascii_lowercase().contains("too long")
                            || error.to_string().to_ascii_lowercase().contains("capacity");
                        if too_big && self.closing.is_none() {
                            self.app.metrics.cutoff(Cutoff::TooBig);
                            self.close(socket, close::TOO_BIG);
                        } else {
                            if self.closing.is_none() && !client_went_away(&error) {
                                self.app.metrics.cutoff(Cutoff::SocketError);
                            }
                            break;
                        }
                    }
                    Io::Incoming(Some(Ok(message))) => self.on_message(socket, message),
                },
                () = self.subscription.ready(), if !in_flight && self.closing.is_none() => {
                    self.deliver(socket);
                }
                () = timer.as_mut(), if self.closing.is_none() => {
                    self.on_timer(socket);
                    let heartbeat = app.settings.heartbeat;
                    let next = (self.last_text + heartbeat).min(self.last_ping + heartbeat).max(Instant::now() + Duration::from_millis(10));
                    timer.as_mut().reset(next);
                }
                () = async { Box::pin(sleep_until(self.write_deadline())).await }, if in_flight || self.closing.is_some() => {
                    if self.closing.is_some() {
                        // The grace ran out: the socket cannot take even the
                        // close frame. Drop it.
                        break;
                    }
                    self.app.metrics.cutoff(Cutoff::WriteStall);
                    tracing::debug!(peer = %self.stats.peer, "write stalled; cutting the reader off");
                    self.close(socket, close::WRITE_STALL);
                }
            }
        }
    }

    /// When the frame in flight (or, once closing, the close) must have left.
    fn write_deadline(&self) -> Instant {
        match (self.closing, self.in_flight_since) {
            (Some(closing), _) => closing.deadline,
            (None, Some(since)) => since + self.app.settings.write_timeout,
            // Never reached: the timer is polled only while a frame is in
            // flight or the connection is closing.
            (None, None) => Instant::now() + self.app.settings.write_timeout,
        }
    }

    /// Sends the newest version of the next due topic, if any.
    fn deliver<S: Sink<Message, Error = axum::Error> + Unpin>(&mut self, socket: &mut S) {
        let Some(delivery) = self.subscription.take() else { return };
        let framed = frame(self.app, &self.stats, &self.subscription, delivery, self.mode.delta, Framing::Ws);
        self.committed_ms = framed.committed_ms;
        let message = Message::Text(framed.text.unwrap_or_else(|| checked_text(framed.bytes)));
        self.send(socket, message, true);
        if let Some(topic) = framed.deleted {
            if self.mode.multi {
                self.subscription.remove(topic.as_str());
            } else {
                self.app.metrics.cutoff(Cutoff::Deleted);
                self.close(socket, close::TOPIC_DELETED);
            }
        }
    }

    fn on_message<S: Sink<Message, Error = axum::Error> + Unpin>(&mut self, socket: &mut S, message: Message) {
        match message {
            Message::Pong(_) => self.unanswered_pings = 0,
            // tungstenite answers pings itself.
            Message::Ping(_) => {}
            Message::Close(_) => {
                // tungstenite has queued the close reply; let it flush, then end.
                self.in_flight_since.get_or_insert_with(Instant::now);
                self.closing = Some(Closing { deadline: Instant::now() + CLOSE_GRACE });
            }
            Message::Text(text) if self.mode.multi && self.closing.is_none() => self.on_client_message(socket, &text),
            Message::Text(_) | Message::Binary(_) => {
                if self.closing.is_none() {
                    let frame = protocol::error_frame(
                        "unexpected_message",
                        "this endpoint takes no client messages; subscribe through /v1/ws to manage topics",
                    );
                    self.refuse(socket, frame);
                }
            }
        }
    }

    /// Handles `subscribe` and `unsubscribe` on a multi-topic connection. A
    /// well-formed message with a bad value gets an `error` frame and the
    /// connection stays; anything else the protocol does not define closes it.
    fn on_client_message<S: Sink<Message, Error = axum::Error> + Unpin>(&mut self, socket: &mut S, raw: &str) {
        let message = match serde_json::from_str::<ClientMessage>(raw) {
            Ok(message) => message,
            Err(_) => {
                let frame = protocol::error_frame(
                    "unexpected_message",
                    r#"expected {"type":"subscribe","topic":NAME,"since":"EPOCH:VERSION"} or {"type":"unsubscribe","topic":NAME}"#,
                );
                return self.refuse(socket, frame);
            }
        };
        let error = match message {
            ClientMessage::Subscribe { topic, since } => {
                match (TopicName::parse(&topic), since.map(|s| s.parse::<Position>()).transpose()) {
                    (Err(e), _) => Some(protocol::error_frame("bad_topic", &format!("{topic:?}: {e}"))),
                    (_, Err(e)) => Some(protocol::error_frame("bad_since", &format!("{topic}: {e}"))),
                    (Ok(name), Ok(since)) => match self.subscription.add(self.app.hub.follow(&name, since)) {
                        Ok(()) => None,
                        Err(SubscribeError::TooMany { limit }) => Some(protocol::error_frame(
                            "too_many_topics",
                            &format!("at most {limit} topics per connection; {topic} was not added"),
                        )),
                    },
                }
            }
            ClientMessage::Unsubscribe { topic } => {
                self.subscription.remove(&topic);
                None
            }
        };
        if let Some(frame) = error {
            self.send(socket, text(frame), false);
        }
    }

    /// Sends an `error` frame and closes for a protocol violation.
    fn refuse<S: Sink<Message, Error = axum::Error> + Unpin>(&mut self, socket: &mut S, frame: Bytes) {
        self.app.metrics.cutoff(Cutoff::Policy);
        self.send(socket, text(frame), false);
        self.close(socket, close::POLICY);
    }

    /// After a state frame went out: if a newer version is already due, the
    /// reader is behind; cut it off once it has been behind for longer than
    /// `--max-staleness` without a break.
    fn check_staleness<S: Sink<Message, Error = axum::Error> + Unpin>(
        &mut self,
        socket: &mut S,
        started: Option<Instant>,
    ) {
        if self.closing.is_some() || !self.subscription.is_due() {
            self.behind_since = None;
            return;
        }
        let since = *self.behind_since.get_or_insert(started.unwrap_or_else(Instant::now));
        if since.elapsed() > self.app.settings.max_staleness {
            self.app.metrics.cutoff(Cutoff::Stale);
            self.close(socket, close::STALE);
        }
    }

    /// Sends what the heartbeat timer says is due: a ping every interval (two
    /// unanswered ones end the connection), and a `heartbeat` frame when no
    /// text frame went out for an interval.
    fn on_timer<S: Sink<Message, Error = axum::Error> + Unpin>(&mut self, socket: &mut S) {
        let heartbeat = self.app.settings.heartbeat;
        let now = Instant::now();
        if now < self.last_ping + heartbeat && now < self.last_text + heartbeat {
            return;
        }
        if self.in_flight_since.is_some() {
            // The socket is busy with a frame; the write timeout watches it.
            // Postpone both clocks, or the timer would fire again at once.
            self.last_ping = now;
            self.last_text = now;
            return;
        }
        if now >= self.last_text + heartbeat {
            self.app.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
            self.send(socket, Message::Text(Utf8Bytes::from_static(HEARTBEAT)), false);
        }
        if now >= self.last_ping + heartbeat {
            if self.unanswered_pings >= 2 {
                self.app.metrics.cutoff(Cutoff::HeartbeatLost);
                self.close(socket, close::HEARTBEAT_LOST);
                return;
            }
            self.send(socket, Message::Ping(Bytes::new()), false);
            self.unanswered_pings += 1;
            self.last_ping = now;
        }
    }

    /// Queues a close frame with the reconnect hint and starts the grace.
    fn close<S: Sink<Message, Error = axum::Error> + Unpin>(&mut self, socket: &mut S, code: u16) {
        let reason = Utf8Bytes::from(close_reason(self.retry_after_ms));
        self.send(socket, Message::Close(Some(CloseFrame { code, reason })), false);
        self.closing = Some(Closing { deadline: Instant::now() + CLOSE_GRACE });
    }

    /// Hands `message` to the socket; `next_io` then drives the flush.
    fn send<S: Sink<Message, Error = axum::Error> + Unpin>(&mut self, socket: &mut S, message: Message, state: bool) {
        // With a zero write buffer the sink writes eagerly and is always ready
        // after a completed flush; a frame queued while another is in flight
        // (a control frame) waits in tungstenite's buffer behind it.
        let (message_kind, bytes) = match &message {
            Message::Text(text) => (Kind::Text, text.len()),
            // Control frames are tiny; count them as the little they are.
            _ => (Kind::Control, 16),
        };
        self.stats.hand_over(&self.app.metrics, bytes as u64);
        if Pin::new(&mut *socket).start_send(message).is_err() {
            // The socket is broken; the next flush reports it and ends us.
        }
        self.in_flight_since.get_or_insert_with(Instant::now);
        if matches!(message_kind, Kind::Text) {
            self.last_text = Instant::now();
        }
        if state {
            self.state_in_flight = true;
            let pending = self.stats.pending.fetch_add(1, Ordering::Relaxed) + 1;
            self.stats.pending_max.fetch_max(pending, Ordering::Relaxed);
            self.app.metrics.observe_pending(pending);
        }
    }
}

/// Whether a message counts as something the client's application sees.
enum Kind {
    /// A text frame (the browser sees it; it resets the heartbeat clock).
    Text,
    /// Ping, pong or close (invisible to browser code).
    Control,
}

/// Whether a socket error means the client ended the connection itself
/// (a reset, or an end without a close frame), which is not a cut-off, as
/// opposed to the kernel giving up on an unresponsive peer
/// (`TCP_USER_TIMEOUT`), which is.
fn client_went_away(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = cause.source();
    }
    // tungstenite reports an end of stream without a close frame as a
    // protocol error, not an I/O one.
    error.to_string().contains("without closing handshake")
}

/// A text message from bytes we built ourselves as UTF-8.
fn text(bytes: Bytes) -> Message {
    Message::Text(checked_text(bytes))
}

/// Waits for the next thing the socket has to say: an incoming message, or
/// (while a frame is in flight) the end of the flush.
async fn next_io<S>(socket: &mut S, in_flight: bool) -> Io
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    poll_fn(|cx| {
        if let Poll::Ready(message) = Pin::new(&mut *socket).poll_next(cx) {
            return Poll::Ready(Io::Incoming(message));
        }
        if in_flight && let Poll::Ready(result) = Pin::new(&mut *socket).poll_flush(cx) {
            return Poll::Ready(Io::Flushed(result));
        }
        Poll::Pending
    })
    .await
}
