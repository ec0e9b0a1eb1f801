//! The Redis Pub/Sub bus. A dedicated subscription connection (RESP3, so it
//! can be named with `CLIENT SETNAME` and still receive pushes) reconnects
//! with jittered backoff and resyncs from the store after every connect; a
//! separate publisher connection sends announcements in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::message::{Decoded, decode};
use super::{BusStats, resync};
use crate::store::Store;
use crate::topic::Hub;

/// How many received messages may wait for the subscriber task; past that
/// they are dropped and the hub resyncs from the store instead.
const INBOX_DEPTH: usize = 8192;

/// How to reach Redis and how to name things there.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://…` URL.
    pub url: String,
    /// Prefix of every key, channel and client name, so several deployments
    /// and test runs can share one Redis.
    pub prefix: String,
    /// This hub's name, for client names and stream consumers.
    pub hub_id: String,
}

impl RedisConfig {
    /// The Pub/Sub channel carrying announcements.
    pub fn channel(&self) -> String {
        format!("{}:versions", self.prefix)
    }

    /// The client name of one of this hub's connections.
    pub fn client_name(&self, role: &str) -> String {
        format!("{}:{}:{}", self.prefix, self.hub_id, role)
    }

    /// Opens a named connection; `push` receives pushes (subscriptions).
    pub async fn connect(
        &self,
        role: &str,
        push: Option<mpsc::Sender<PushInfo>>,
        overflow: Option<Arc<AtomicBool>>,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let info = self.url.as_str().into_connection_info()?;
        let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let mut config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        if let Some(push) = push {
            // Runs on the connection's driver: it must never wait. A full
            // inbox drops the message and asks for a resync instead.
            config = config.set_push_sender(move |info: PushInfo| {
                if push.try_send(info).is_err()
                    && let Some(flag) = &overflow
                {
                    flag.store(true, Ordering::Relaxed);
                }
                Ok::<(), std::convert::Infallible>(())
            });
        }
        let mut connection = client.get_multiplexed_async_connection_with_config(&config).await?;
        redis::cmd("CLIENT").arg("SETNAME").arg(self.client_name(role)).query_async::<()>(&mut connection).await?;
        Ok(connection)
    }
}

/// A full-jitter backoff delay for attempt `n` (0-based): uniform in
/// `[0, min(cap, base * 2^n))`.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 100u64;
    let cap = 5_000u64;
    let window = base.saturating_mul(1 << attempt.min(16)).min(cap);
    Duration::from_millis(fastrand::u64(0..window.max(1)))
}

/// Keeps the subscription up: connect, subscribe, resync, apply messages;
/// on any failure, back off and start again.
pub(super) async fn subscriber(
    config: Arc<RedisConfig>,
    hub: Hub,
    store: Store,
    stats: Arc<BusStats>,
    shutdown: CancellationToken,
) {
    let (push, mut inbox) = mpsc::channel::<PushInfo>(INBOX_DEPTH);
    let overflow = Arc::new(AtomicBool::new(false));
    let mut attempt = 0u32;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let connected = async {
            let mut connection = config.connect("bus-sub", Some(push.clone()), Some(Arc::clone(&overflow))).await?;
            connection.subscribe(config.channel()).await?;
            Ok::<_, redis::RedisError>(connection)
        }
        .await;
        let mut connection = match connected {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, attempt, "cannot subscribe to the Redis bus; retrying");
                attempt += 1;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff(attempt)) => continue,
                }
            }
        };
        // Whatever was published while we were away is in the store.
        if let Err(error) = resync(&hub, &store, &stats).await {
            tracing::warn!(%error, "resync after subscribing failed; the reconciler will retry");
        }
        if attempt > 0 {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        stats.up.store(true, Ordering::Relaxed);
        tracing::info!(channel = %config.channel(), "subscribed to the Redis bus");
        let mut ping = tokio::time::interval(Duration::from_secs(1));
        let lost = loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    stats.up.store(false, Ordering::Relaxed);
                    return;
                }
                pushed = inbox.recv() => {
                    let Some(info) = pushed else { break "inbox closed" };
                    match info.kind {
                        PushKind::Disconnection => break "disconnected",
                        // A gap: versions went by that we never heard of.
                        PushKind::Message if apply_message(&hub, &stats, &info.data) => {
                            overflow.store(true, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                _ = ping.tick() => {
                    // A silent network (a cut that sends no reset) shows up
                    // as a ping without an answer.
                    if redis::cmd("PING").query_async::<()>(&mut connection).await.is_err() {
                        break "ping failed";
                    }
                    if overflow.swap(false, Ordering::Relaxed) {
                        let _ = resync(&hub, &store, &stats).await;
                    }
                }
            }
        };
        stats.up.store(false, Ordering::Relaxed);
        tracing::warn!(reason = lost, "lost the Redis bus; serving what we hold and reconnecting");
        attempt = 1;
    }
}

/// Applies one bus message; returns whether it revealed a gap (versions of
/// the topic this hub never received), which calls for a resync.
fn apply_message(hub: &Hub, stats: &BusStats, data: &[Value]) -> bool {
    stats.received.fetch_add(1, Ordering::Relaxed);
    let Some(Value::BulkString(payload)) = data.get(1) else { return false };
    match decode(payload) {
        Decoded::Version(snapshot) => {
            let held = hub.get(snapshot.topic.as_str()).and_then(|t| t.current()).map(|c| c.version);
            let gap = held.is_some_and(|held| snapshot.version > held + 1);
            if hub.apply(*snapshot) {
                stats.applied.fetch_add(1, Ordering::Relaxed);
            }
            gap
        }
        Decoded::Unknown => {
            tracing::debug!("a bus message this release does not understand; resyncing from the store");
            true
        }
    }
}

/// Publishes announcements in order on a dedicated connection.
pub(super) async fn publisher(
    config: Arc<RedisConfig>,
    mut outbox: mpsc::Receiver<Bytes>,
    stats: Arc<BusStats>,
    shutdown: CancellationToken,
) {
    let channel = config.channel();
    let mut connection: Option<MultiplexedConnection> = None;
    let mut attempt = 0u32;
    let mut batch: Vec<Bytes> = Vec::with_capacity(64);
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            next = outbox.recv() => next,
        };
        let Some(first) = first else { return };
        batch.push(first);
        while batch.len() < 64 {
            match outbox.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        if connection.is_none() {
            match config.connect("bus-pub", None, None).await {
                Ok(c) => {
                    connection = Some(c);
                    attempt = 0;
                }
                Err(error) => {
                    attempt += 1;
                    tracing::debug!(%error, "cannot reach Redis to announce; the others will reconcile");
                }
            }
        }
        let sent = match connection.as_mut() {
            Some(c) => {
                let mut pipe = redis::pipe();
                for message in &batch {
                    pipe.cmd("PUBLISH").arg(&channel).arg(&message[..]).ignore();
                }
                pipe.query_async::<()>(c).await.is_ok()
            }
            None => false,
        };
        if sent {
            stats.published.fetch_add(batch.len() as u64, Ordering::Relaxed);
        } else {
            stats.publish_errors.fetch_add(batch.len() as u64, Ordering::Relaxed);
            connection = None;
            // Do not spin against a Redis that is down.
            tokio::time::sleep(backoff(attempt)).await;
        }
        batch.clear();
    }
}
