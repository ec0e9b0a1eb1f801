//! The HTTP surface: one `router(state)`, the shared application state, and
//! the one error type every handler returns. Each submodule owns its routes.

mod admin;
mod deliver;
mod error;
mod ops;
mod pages;
mod publish;
mod read;
mod sse;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, FromRequestParts, Path};
use axum::http::request::Parts;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::ApiError;
pub use ops::starting_router;

use crate::config::Secret;
use crate::metrics::{Connections, Metrics};
use crate::store::Store;
use crate::topic::{Hub, TopicName};

/// Settings the handlers need, taken from `Config` once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Accepted publish tokens.
    pub publish_tokens: Vec<Secret>,
    /// Largest publish body, in bytes.
    pub max_body: usize,
    /// Write timeout for reader sockets.
    pub write_timeout: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// `SO_SNDBUF` for subscription sockets.
    pub socket_send_buffer: usize,
    /// `max-age` (and `stale-while-revalidate`) of snapshot responses.
    pub cache_max_age: Duration,
    /// Longest long-poll wait.
    pub max_wait: Duration,
    /// Most topics per connection.
    pub max_topics_per_connection: usize,
    /// Origins allowed to read and subscribe from a browser; `None` allows any.
    pub allowed_origins: Option<Vec<String>>,
    /// Refuse WebSocket upgrades (testing the clients' fallbacks).
    pub disable_websocket: bool,
    /// Time a client has to send a request's headers (`crate::server` enforces it).
    pub header_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Most live topics the hub holds.
    pub max_topics: usize,
    /// How long a reader may stay behind the newest version before it is cut off.
    pub max_staleness: Duration,
    /// Readers are told to reconnect at moments spread over this window on SIGTERM.
    pub drain_window: Duration,
    /// The operator page's token; `None` turns `/admin` off.
    pub admin_token: Option<Secret>,
}

impl Settings {
    /// Whether a request with these headers may subscribe: requests without
    /// an `Origin` (servers, apps, curl) always may; browsers only from an
    /// allowed origin.
    pub fn origin_allowed(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(allowed) = &self.allowed_origins else { return true };
        let Some(origin) = headers.get(axum::http::header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return true;
        };
        allowed.iter().any(|a| a.eq_ignore_ascii_case(origin.trim_end_matches('/')))
    }

    /// Admits a subscription or says why not: the admission policy, for the
    /// client address (from a trusted proxy's `X-Forwarded-For` if any).
    pub fn admit(
        &self,
        admission: &Arc<crate::admission::Admission>,
        peer: &crate::net::Peer,
        headers: &axum::http::HeaderMap,
        resuming: bool,
    ) -> Result<crate::admission::Permit, crate::admission::Refused> {
        admission.admit(self.client_ip(peer, headers), resuming)
    }

    /// The client's address: the peer, or what a trusted proxy says.
    pub fn client_ip(&self, peer: &crate::net::Peer, headers: &axum::http::HeaderMap) -> std::net::IpAddr {
        let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        crate::admission::client_ip(peer.addr.ip(), forwarded, &self.trusted_proxies)
    }

    /// A moment in the drain window, drawn uniformly, at which a reader is
    /// told to go (so a deploy spreads reconnects instead of causing a storm).
    pub fn drain_delay(&self) -> Duration {
        self.drain_window.mul_f64(fastrand::f64())
    }

    /// Prepares the socket of a request that becomes a subscription: clamps
    /// its send buffer (so the kernel cannot hoard stale states for a slow
    /// reader) and bounds how long unacknowledged data may sit in it.
    pub fn clamp_subscription_socket(&self, peer: &crate::net::Peer) {
        if let Err(error) = crate::net::set_send_buffer(peer.fd, self.socket_send_buffer) {
            tracing::warn!(%error, "cannot clamp the send buffer");
        }
        let user_timeout = self.write_timeout + Duration::from_secs(2);
        if let Err(error) = crate::net::set_user_timeout(peer.fd, user_timeout) {
            tracing::debug!(%error, "cannot set TCP_USER_TIMEOUT");
        }
    }
}

/// Everything a handler can reach. Cloning is cheap (handles and `Arc`s).
#[derive(Clone, Debug)]
pub struct AppState {
    /// The topic core.
    pub hub: Hub,
    /// The durable store.
    pub store: Store,
    /// The bus to the other hubs (in-process when there are none).
    pub bus: crate::bus::Bus,
    /// Fixed settings.
    pub settings: Arc<Settings>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Open reader connections.
    pub connections: Arc<Connections>,
    /// Admission control for new subscriptions.
    pub admission: Arc<crate::admission::Admission>,
    /// Fires when the server shuts down; every long-lived task watches it.
    pub shutdown: CancellationToken,
    /// Tracks long-lived tasks (WebSocket connections) so shutdown can wait
    /// for them, which axum's own graceful shutdown does not do.
    pub tasks: TaskTracker,
}

impl FromRef<AppState> for Hub {
    fn from_ref(state: &AppState) -> Self {
        state.hub.clone()
    }
}

/// Builds the whole router.
pub fn router(state: AppState) -> Router {
    // Browsers may read snapshots and event streams cross-origin (partner
    // widgets). The layer sits on the whole router because the read and
    // publish routes share paths; it allows only GET and HEAD, so a browser
    // page can never publish.
    let cors = cors_layer(&state.settings);
    Router::new()
        .merge(publish::router())
        .merge(read::router())
        .merge(sse::router())
        .merge(ws::router())
        .merge(ops::router())
        .merge(pages::router())
        .merge(admin::router(&state.settings))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(cors)
        .with_state(state)
}

fn cors_layer(settings: &Settings) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins = match &settings.allowed_origins {
        None => AllowOrigin::any(),
        // The same comparison as `origin_allowed` (scheme and host are
        // case-insensitive), so CORS and the subscription check agree.
        Some(list) => {
            let list = list.clone();
            AllowOrigin::predicate(move |origin: &HeaderValue, _| {
                origin.to_str().is_ok_and(|o| list.iter().any(|a| a.eq_ignore_ascii_case(o.trim_end_matches('/'))))
            })
        }
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::HEAD])
        .allow_headers([header::IF_NONE_MATCH, header::CACHE_CONTROL, HeaderName::from_static("last-event-id")])
        .expose_headers([header::ETAG, header::RETRY_AFTER, header::CACHE_CONTROL])
        .max_age(Duration::from_secs(600))
}

/// A topic name taken from the path and validated: handlers never see an
/// invalid one, and a bad name is a JSON 400 like every other error.
#[derive(Debug, Clone)]
pub struct TopicPath(pub TopicName);

impl<S: Send + Sync> FromRequestParts<S> for TopicPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::BadRequest { code: "bad_topic", message: "topic name is not valid UTF-8".into() })?;
        TopicName::parse(&raw)
            .map(TopicPath)
            .map_err(|e| ApiError::BadRequest { code: "bad_topic", message: e.to_string() })
    }
}

/// The value of query parameter `key`, percent-decoded; the first if repeated.
pub(crate) fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query_params(query, key).into_iter().next()
}

/// Every value of query parameter `key`, percent-decoded, in order.
pub(crate) fn query_params(query: Option<&str>, key: &str) -> Vec<String> {
    let Some(query) = query else { return Vec::new() };
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k).as_deref() == Some(key)).then(|| percent_decode(v)).flatten()
        })
        .collect()
}

/// Parses `since=EPOCH:VERSION` from a query string.
pub(crate) fn since_param(query: Option<&str>) -> Result<Option<crate::topic::Position>, ApiError> {
    query_param(query, "since")
        .map(|raw| raw.parse().map_err(|e| ApiError::BadRequest { code: "bad_since", message: format!("since: {e}") }))
        .transpose()
}

/// Parses the topic list of a multi-topic subscription: `topic=NAME` or
/// `topic=NAME@EPOCH:VERSION`, repeated.
pub(crate) fn topic_list(
    query: Option<&str>,
    limit: usize,
) -> Result<Vec<(TopicName, Option<crate::topic::Position>)>, ApiError> {
    let raw = query_params(query, "topic");
    if raw.len() > limit {
        return Err(ApiError::BadRequest {
            code: "too_many_topics",
            message: format!("at most {limit} topics per connection"),
        });
    }
    raw.iter()
        .map(|entry| {
            let (name, since) = match entry.split_once('@') {
                Some((name, since)) => (name, Some(since)),
                None => (entry.as_str(), None),
            };
            let name = TopicName::parse(name)
                .map_err(|e| ApiError::BadRequest { code: "bad_topic", message: format!("{name:?}: {e}") })?;
            let since = since
                .map(|s| {
                    s.parse()
                        .map_err(|e| ApiError::BadRequest { code: "bad_since", message: format!("{name}@{s}: {e}") })
                })
                .transpose()?;
            Ok((name, since))
        })
        .collect()
}

/// Whether the client asked for merge-patch deltas (`?delta=merge-patch`).
pub(crate) fn wants_delta(query: Option<&str>) -> Result<bool, ApiError> {
    match query_param(query, "delta").as_deref() {
        None => Ok(false),
        Some("merge-patch") => Ok(true),
        Some(other) => Err(ApiError::BadRequest {
            code: "bad_delta",
            message: format!("delta={other:?} is not supported; use delta=merge-patch"),
        }),
    }
}

/// Decodes `%XX` escapes and `+` as space; `None` if the result is not UTF-8.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}
