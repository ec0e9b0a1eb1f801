//! The HTTP surface: one `router(state)`, the shared application state, and
//! the one error type every handler returns. Each submodule owns its routes.

mod error;
mod ops;
mod publish;
mod read;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, FromRequestParts, Path};
use axum::http::request::Parts;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::ApiError;

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
}

/// Everything a handler can reach. Cloning is cheap (handles and `Arc`s).
#[derive(Clone, Debug)]
pub struct AppState {
    /// The topic core.
    pub hub: Hub,
    /// The durable store.
    pub store: Store,
    /// Fixed settings.
    pub settings: Arc<Settings>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Open reader connections.
    pub connections: Arc<Connections>,
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
    Router::new()
        .merge(publish::router())
        .merge(read::router())
        .merge(ws::router())
        .merge(ops::router())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
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
    let query = query?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k).as_deref() == Some(key)).then(|| percent_decode(v)).flatten()
    })
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
