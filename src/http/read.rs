//! Snapshot reads: `GET /v1/topics/{topic}` (one topic, with an ETag) and
//! `GET /v1/topics` (the list). Served from the hub's memory, never from the
//! store: the hub holds exactly what has been committed.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::{ApiError, AppState, TopicPath};
use crate::protocol::{json_body, rfc3339_ms};
use crate::topic::{Snapshot, Wire};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/topics", get(list_topics)).route("/v1/topics/{topic}", get(get_topic))
}

async fn list_topics(State(app): State<AppState>) -> Response {
    let topics: Vec<_> = app
        .hub
        .live_topics()
        .iter()
        .map(|s| {
            json!({
                "topic": s.topic.as_str(),
                "epoch": s.epoch.to_string(),
                "version": s.version,
                "updated_at": rfc3339_ms(s.updated_ms),
            })
        })
        .collect();
    let mut response = Json(json!({ "topics": topics })).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn get_topic(
    State(app): State<AppState>,
    TopicPath(topic): TopicPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let snapshot =
        app.hub.get(topic.as_str()).and_then(|t| t.live()).ok_or(ApiError::NotFound("topic does not exist"))?;
    let etag = etag(&snapshot);
    if if_none_match(&headers, &etag) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        set_validators(response.headers_mut(), &etag);
        return Ok(response);
    }
    let body = snapshot.encoded(Wire::JsonBody, json_body).bytes.clone();
    let mut response = Response::new(Body::from(body));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    set_validators(h, &etag);
    Ok(response)
}

/// A weak entity tag naming the version: `W/"EPOCH:VERSION"`. Weak, so it
/// stays truthful when a proxy or our own compression changes the bytes.
fn etag(snapshot: &Snapshot) -> HeaderValue {
    HeaderValue::try_from(format!("W/\"{}\"", snapshot.position())).unwrap_or(HeaderValue::from_static("W/\"0\""))
}

fn set_validators(headers: &mut HeaderMap, etag: &HeaderValue) {
    headers.insert(header::ETAG, etag.clone());
    // Until the transports issue adds CDN caching, every poll revalidates.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

/// Whether `If-None-Match` names this version (weak comparison, `*` matches).
fn if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.to_str().unwrap_or("");
    let ours = ours.strip_prefix("W/").unwrap_or(ours);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').map(str::trim).any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == ours))
}
