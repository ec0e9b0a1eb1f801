//! `ApiError`: every way a request can fail, mapped to a status and a JSON
//! body in one place. Clients never see internal error text; the cause is
//! logged where it happens.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::protocol::jittered_ms;
use crate::topic::Position;

/// A failed request. The body is always `{"error": CODE, "message": TEXT}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input (bad topic name, not JSON, not an object, bad `since`).
    #[error("{message}")]
    BadRequest {
        /// A stable machine-readable code.
        code: &'static str,
        /// What was wrong, for a person.
        message: String,
    },
    /// Missing or wrong bearer token.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// The body's content type is not the one this method takes.
    #[error("Content-Type must be {expected}")]
    UnsupportedMediaType {
        /// The type the method takes.
        expected: &'static str,
    },
    /// The body is larger than `--max-body`.
    #[error("body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// No such topic (or it was deleted), or no such route.
    #[error("{0}")]
    NotFound(&'static str),
    /// The method is not allowed on this path.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// `If-Match` did not hold.
    #[error("the topic is not at the version named by If-Match")]
    PreconditionFailed {
        /// Where the topic stands.
        current: Option<Position>,
    },
    /// A browser page from an origin not in `--allow-origin` tried to subscribe.
    #[error("this origin may not subscribe")]
    OriginNotAllowed,
    /// The server is shutting down or draining; retry elsewhere after the hint.
    #[error("the server is draining; reconnect after the hint")]
    Draining,
    /// Admission control turned a subscription away; retry after the hint.
    #[error("the server is at capacity for new subscriptions ({reason}); retry after the hint")]
    Overloaded {
        /// Which limit was reached.
        reason: &'static str,
        /// The jittered hint.
        retry_after_ms: u64,
    },
    /// `--max-topics` reached: the publish would create one topic too many.
    #[error("this hub holds its maximum number of topics ({limit}); delete one or raise --max-topics")]
    TopicLimit {
        /// The limit in force.
        limit: usize,
    },
    /// WebSocket upgrades are switched off (`--disable-websocket`).
    #[error("WebSocket is disabled on this server; use Server-Sent Events or long-poll")]
    WebSocketDisabled,
    /// A WebSocket endpoint was called without an upgrade.
    #[error("this endpoint takes a WebSocket upgrade")]
    UpgradeRequired,
    /// The store cannot commit right now; retry after the hint.
    #[error("the store is unavailable; retry later")]
    Unavailable,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            Self::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Self::OriginNotAllowed => StatusCode::FORBIDDEN,
            Self::Unavailable | Self::Draining | Self::WebSocketDisabled | Self::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::TopicLimit { .. } => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } => code,
            Self::Unauthorized => "unauthorized",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PreconditionFailed { .. } => "precondition_failed",
            Self::UpgradeRequired => "upgrade_required",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::Unavailable => "unavailable",
            Self::Draining => "draining",
            Self::WebSocketDisabled => "websocket_disabled",
            Self::Overloaded { .. } => "overloaded",
            Self::TopicLimit { .. } => "topic_limit",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code(), "message": self.to_string() });
        let mut retry_after = None;
        match &self {
            Self::PreconditionFailed { current } => {
                body["current"] = current.map_or(serde_json::Value::Null, |p| json!(p.to_string()));
            }
            Self::Overloaded { reason, retry_after_ms } => {
                body["reason"] = json!(reason);
                body["retry_after_ms"] = json!(retry_after_ms);
                retry_after = Some(retry_after_ms.div_ceil(1000));
            }
            Self::Unavailable | Self::Draining | Self::WebSocketDisabled => {
                let ms = jittered_ms(1000, 2000);
                body["retry_after_ms"] = json!(ms);
                retry_after = Some(ms.div_ceil(1000));
            }
            _ => {}
        }
        let mut response = (self.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        if matches!(self, Self::Unauthorized) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(self, Self::UpgradeRequired) {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// The fallback for unknown paths.
pub(super) async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint")
}

/// The fallback for a known path with the wrong method.
pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
