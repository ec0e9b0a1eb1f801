//! Operator endpoints: `/metrics` (Prometheus text), `/healthz`, `/readyz`,
//! and `/v1/connections` (per-connection figures, behind the publish token).

use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::{ApiError, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/connections", get(connections))
}

async fn metrics(State(app): State<AppState>) -> Response {
    let text = app.metrics.render(&app.hub, app.store.stats(), app.bus.stats(), &app.admission, &app.connections);
    let mut response = text.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// The router served while the store is being opened and loaded: the
/// process is alive, not ready, and everything else is turned away with a
/// reconnect hint (a read now would miss topics not loaded yet).
pub fn starting_router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "starting" })) }))
        .route(
            "/readyz",
            get(|| async {
                (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "reason": "starting" }))).into_response()
            }),
        )
        .fallback(|| async {
            ApiError::Overloaded { reason: "starting", retry_after_ms: crate::protocol::jittered_ms(1000, 3000) }
                .into_response()
        })
}

/// The process is alive; the body says how its store and bus are doing.
async fn healthz(State(app): State<AppState>) -> Json<serde_json::Value> {
    let bus = if !app.bus.is_redis() {
        "in-process"
    } else if app.bus.stats().up.load(Ordering::Relaxed) {
        "up"
    } else {
        "reconnecting"
    };
    let store = if app.store.is_shared() { "postgres" } else { "sqlite" };
    Json(json!({ "status": "ok", "store": store, "bus": bus }))
}

async fn readyz(State(app): State<AppState>) -> Response {
    if app.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "reason": "draining" }))).into_response()
    } else {
        Json(json!({ "ready": true })).into_response()
    }
}

/// Every open reader connection with its figures. Operator data, so it takes
/// the publish token.
async fn connections(State(app): State<AppState>, headers: HeaderMap) -> Result<Json<serde_json::Value>, ApiError> {
    super::publish::authorize(&app, &headers)?;
    let list: Vec<_> = app
        .connections
        .list()
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "transport": c.transport,
                "topic": c.topic,
                "peer": c.peer.to_string(),
                "age_ms": c.opened.elapsed().as_millis() as u64,
                "frames": c.frames.load(Ordering::Relaxed),
                "skipped": c.skipped.load(Ordering::Relaxed),
                "pending_state_frames": c.pending.load(Ordering::Relaxed),
                "pending_state_frames_max": c.pending_max.load(Ordering::Relaxed),
            })
        })
        .collect();
    Ok(Json(json!({ "connections": list })))
}
