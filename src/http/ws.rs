//! The WebSocket transport for one topic: `GET /v1/topics/{topic}/ws`.
//!
//! Each connection runs one task and holds one `Follower` (a pointer to the
//! last version it sent). The writer wakes on change, loads the newest
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
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};

use super::{ApiError, AppState, TopicPath, query_param};
use crate::metrics::{ConnStats, Cutoff};
use crate::net::{Peer, set_send_buffer};
use crate::protocol::{self, HEARTBEAT, MAX_CLIENT_FRAME, close, close_reason, jittered_ms, ws_frame};
use crate::topic::{Delivery, Follower, Position, Wire};

/// How long a close frame (or the last frame before it) may take to leave
/// before the connection is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// tungstenite's read buffer: clients send almost nothing (pongs), so a small
/// buffer saves ~124 KiB per connection against the 128 KiB default.
const READ_BUFFER: usize = 4096;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/topics/{topic}/ws", get(subscribe))
}

async fn subscribe(
    State(app): State<AppState>,
    TopicPath(topic): TopicPath,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<Peer>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let since = match query_param(query.as_deref(), "since") {
        Some(raw) => Some(
            raw.parse::<Position>()
                .map_err(|e| ApiError::BadRequest { code: "bad_since", message: format!("since: {e}") })?,
        ),
        None => None,
    };
    let upgrade = upgrade.map_err(|_| ApiError::UpgradeRequired)?;
    // This request becomes a subscription: from here on the socket only
    // carries states we can drop, so keep the kernel from hoarding them.
    if let Err(error) = set_send_buffer(peer.fd, app.settings.socket_send_buffer) {
        tracing::warn!(%error, "cannot clamp the send buffer");
    }
    let follower = app.hub.follow(&topic, since);
    // Held by the task until it ends, so shutdown can wait for it.
    let tracked = app.tasks.token();
    Ok(upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |socket| async move {
            let guard = app.connections.register("ws", topic.to_string(), peer.addr);
            app.metrics.ws_accepted.fetch_add(1, Ordering::Relaxed);
            app.metrics.ws_open.fetch_add(1, Ordering::Relaxed);
            let connection = Connection::new(&app, follower, Arc::clone(&guard.stats));
            connection.run(socket).await;
            app.metrics.ws_open.fetch_sub(1, Ordering::Relaxed);
            drop(tracked);
        }))
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
    follower: Follower,
    stats: Arc<ConnStats>,
    /// This connection's reconnect hint, drawn once so that every close it
    /// sends says the same thing and connections cut off together spread out.
    retry_after_ms: u64,
    /// When the frame being written was handed to the socket, if one is.
    in_flight_since: Option<Instant>,
    /// Whether the frame in flight is a state frame (counted as pending).
    state_in_flight: bool,
    /// Whether anything was sent since the last heartbeat tick.
    sent_since_tick: bool,
    /// Pings sent and not answered.
    unanswered_pings: u32,
    closing: Option<Closing>,
}

impl<'a> Connection<'a> {
    fn new(app: &'a AppState, follower: Follower, stats: Arc<ConnStats>) -> Self {
        Self {
            app,
            follower,
            stats,
            retry_after_ms: jittered_ms(1000, 4000),
            in_flight_since: None,
            state_in_flight: false,
            sent_since_tick: false,
            unanswered_pings: 0,
            closing: None,
        }
    }

    async fn run<S>(mut self, mut socket: S)
    where
        S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
    {
        let heartbeat = self.app.settings.heartbeat;
        let write_timeout = self.app.settings.write_timeout;
        let shutdown = self.app.shutdown.clone();
        let mut ticks = interval_at(Instant::now() + heartbeat, heartbeat);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);

        self.send(&mut socket, text(protocol::hello(heartbeat)), false);
        loop {
            let in_flight = self.in_flight_since.is_some();
            let write_deadline = match (self.closing, self.in_flight_since) {
                (Some(closing), _) => closing.deadline,
                (None, Some(since)) => since + write_timeout,
                // Never reached: the branch below is disabled when idle.
                (None, None) => Instant::now() + write_timeout,
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if self.closing.is_none() => {
                    self.app.metrics.cutoff(Cutoff::Shutdown);
                    self.close(&mut socket, close::GOING_AWAY);
                }
                io = next_io(&mut socket, in_flight) => match io {
                    Io::Flushed(Ok(())) => {
                        self.in_flight_since = None;
                        if self.state_in_flight {
                            self.state_in_flight = false;
                            self.stats.pending.store(0, Ordering::Relaxed);
                        }
                        // Once the close frame is out, wait (within the grace)
                        // for the client's close or its end of the stream:
                        // dropping the socket with client data unread would
                        // send a reset that can destroy the close frame.
                    }
                    Io::Flushed(Err(_)) | Io::Incoming(None) => break,
                    Io::Incoming(Some(Err(error))) => {
                        // tungstenite reports an oversized frame as a capacity
                        // error; anything else means the stream is broken.
                        let too_big = error.to_string().contains("Space limit exceeded")
                            || error.to_string().to_ascii_lowercase().contains("too long")
                            || error.to_string().to_ascii_lowercase().contains("capacity");
                        if too_big && self.closing.is_none() {
                            self.app.metrics.cutoff(Cutoff::TooBig);
                            self.close(&mut socket, close::TOO_BIG);
                        } else {
                            break;
                        }
                    }
                    Io::Incoming(Some(Ok(message))) => self.on_message(&mut socket, message),
                },
                () = self.follower.ready(), if !in_flight && self.closing.is_none() => {
                    self.deliver(&mut socket);
                }
                _ = ticks.tick(), if self.closing.is_none() => self.on_tick(&mut socket),
                () = sleep_until(write_deadline), if in_flight || self.closing.is_some() => {
                    if self.closing.is_some() {
                        // The grace ran out: the socket cannot take even the
                        // close frame. Drop it.
                        break;
                    }
                    self.app.metrics.cutoff(Cutoff::WriteStall);
                    tracing::debug!(peer = %self.stats.peer, "write stalled; cutting the reader off");
                    self.close(&mut socket, close::WRITE_STALL);
                }
            }
        }
    }

    /// Sends the newest version if one is due.
    fn deliver<S: Sink<Message, Error = axum::Error> + Unpin>(&mut self, socket: &mut S) {
        match self.follower.take() {
            Some(Delivery::Snapshot { snapshot, skipped }) => {
                let bytes = snapshot.encoded(Wire::WsFrame, ws_frame).with_skipped(skipped);
                self.stats.frames.fetch_add(1, Ordering::Relaxed);
                self.stats.skipped.fetch_add(skipped, Ordering::Relaxed);
                self.app.metrics.deliveries.fetch_add(1, Ordering::Relaxed);
                self.app.metrics.skipped.fetch_add(skipped, Ordering::Relaxed);
                self.send(socket, text(bytes), true);
            }
            Some(Delivery::Deleted(snapshot)) => {
                let bytes = snapshot.encoded(Wire::WsFrame, ws_frame).bytes.clone();
                self.app.metrics.deliveries.fetch_add(1, Ordering::Relaxed);
                self.send(socket, text(bytes), true);
                self.app.metrics.cutoff(Cutoff::Deleted);
                self.close(socket, close::TOPIC_DELETED);
            }
            None => {}
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
            Message::Text(_) | Message::Binary(_) => {
                if self.closing.is_none() {
                    self.app.metrics.cutoff(Cutoff::Policy);
                    let frame = protocol::error_frame(
                        "unexpected_message",
                        "this endpoint takes no client messages; subscribe through /v1/ws to manage topics",
                    );
                    self.send(socket, text(frame), false);
                    self.close(socket, close::POLICY);
                }
            }
        }
    }

    fn on_tick<S: Sink<Message, Error = axum::Error> + Unpin>(&mut self, socket: &mut S) {
        if self.unanswered_pings >= 2 {
            self.app.metrics.cutoff(Cutoff::HeartbeatLost);
            self.close(socket, close::HEARTBEAT_LOST);
            return;
        }
        if self.in_flight_since.is_some() {
            // The socket is busy with a frame; the write timeout watches it.
            return;
        }
        if !self.sent_since_tick {
            self.app.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
            self.send(socket, Message::Text(Utf8Bytes::from_static(HEARTBEAT)), false);
        }
        self.send(socket, Message::Ping(Bytes::new()), false);
        self.unanswered_pings += 1;
        self.sent_since_tick = false;
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
        if Pin::new(&mut *socket).start_send(message).is_err() {
            // The socket is broken; the next flush reports it and ends us.
        }
        self.in_flight_since.get_or_insert_with(Instant::now);
        self.sent_since_tick = true;
        if state {
            self.state_in_flight = true;
            let pending = self.stats.pending.fetch_add(1, Ordering::Relaxed) + 1;
            self.stats.pending_max.fetch_max(pending, Ordering::Relaxed);
            self.app.metrics.observe_pending(pending);
        }
    }
}

/// A text message from bytes we built ourselves as UTF-8.
fn text(bytes: Bytes) -> Message {
    // Our encoders only ever produce UTF-8 (JSON text); the check cannot fail.
    Message::Text(Utf8Bytes::try_from(bytes).unwrap_or_else(|_| Utf8Bytes::from_static("{}")))
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
