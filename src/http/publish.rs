//! The publish API: `PUT`, `PATCH` and `DELETE /v1/topics/{topic}`. Every
//! check happens before the store is asked, so a rejected request changes
//! nothing; a write is answered only after its commit.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::routing::put;
use bytes::Bytes;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState, TopicPath};
use crate::protocol::PublishAck;
use crate::store::{Change, Precondition, Write, WriteError};
use crate::topic::Position;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/topics/{topic}", put(put_topic).patch(patch_topic).delete(delete_topic))
}

async fn put_topic(
    State(app): State<AppState>,
    TopicPath(topic): TopicPath,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PublishAck>, ApiError> {
    let started = Instant::now();
    let outcome = async {
        authorize(&app, &headers)?;
        require_content_type(&headers, &["application/json"], "application/json")?;
        let state = read_object(&app, &headers, body).await?;
        let precondition = precondition(&headers)?;
        Ok(Write { precondition, ..Write::new(topic, Change::Put(state)) })
    }
    .await;
    commit(&app, outcome, started).await
}

async fn patch_topic(
    State(app): State<AppState>,
    TopicPath(topic): TopicPath,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PublishAck>, ApiError> {
    let started = Instant::now();
    let outcome = async {
        authorize(&app, &headers)?;
        require_content_type(&headers, &["application/merge-patch+json"], "application/merge-patch+json")?;
        let patch = read_object(&app, &headers, body).await?;
        let precondition = precondition(&headers)?;
        Ok(Write { precondition, ..Write::new(topic, Change::Patch(patch)) })
    }
    .await;
    commit(&app, outcome, started).await
}

async fn delete_topic(
    State(app): State<AppState>,
    TopicPath(topic): TopicPath,
    headers: HeaderMap,
) -> Result<Json<PublishAck>, ApiError> {
    let started = Instant::now();
    let outcome = authorize(&app, &headers)
        .and_then(|()| precondition(&headers))
        .map(|precondition| Write { precondition, ..Write::new(topic, Change::Delete) });
    commit(&app, outcome, started).await
}

/// Commits a validated write, installs the new version in the hub and
/// answers; or answers the validation error. Counts either way.
async fn commit(
    app: &AppState,
    write: Result<Write, ApiError>,
    started: Instant,
) -> Result<Json<PublishAck>, ApiError> {
    let write = write
        .and_then(|write| {
            // A write that would create one topic too many is refused before
            // the store sees it (re-creating a deleted topic counts as new).
            let exists = app.hub.get(write.topic.as_str()).is_some_and(|t| t.live().is_some());
            let limit = app.settings.max_topics;
            if !exists && matches!(write.change, Change::Put(_)) && app.hub.live_count() >= limit {
                return Err(ApiError::TopicLimit { limit });
            }
            Ok(write)
        })
        .inspect_err(|_| {
            app.metrics.publishes_refused.fetch_add(1, Ordering::Relaxed);
        })?;
    match app.store.write(write).await {
        Ok(snapshot) => {
            app.metrics.publishes_ok.fetch_add(1, Ordering::Relaxed);
            let ack = PublishAck::of(&snapshot);
            app.bus.announce(&snapshot);
            app.hub.apply(snapshot);
            app.metrics.publish_latency.observe(started.elapsed());
            Ok(Json(ack))
        }
        Err(error) => {
            let counter = match error {
                WriteError::Unavailable => &app.metrics.publishes_failed,
                _ => &app.metrics.publishes_refused,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            Err(match error {
                WriteError::NotFound => ApiError::NotFound("topic does not exist"),
                WriteError::PreconditionFailed { current } => ApiError::PreconditionFailed { current },
                // Only stream ingest sets a stream id; HTTP writes cannot be superseded.
                WriteError::Unavailable | WriteError::Superseded => ApiError::Unavailable,
            })
        }
    }
}

/// Checks `Authorization: Bearer TOKEN` against every configured token in
/// constant time (per token), so timing reveals nothing about a token.
pub(super) fn authorize(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme name is case-insensitive (RFC 9110, section 11.1).
        .and_then(|v| v.get(..7).filter(|scheme| scheme.eq_ignore_ascii_case("bearer ")).map(|_| &v[7..]))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    let mut ok = subtle::Choice::from(0);
    for token in &app.settings.publish_tokens {
        ok |= presented.as_bytes().ct_eq(token.expose().as_bytes());
    }
    if bool::from(ok) { Ok(()) } else { Err(ApiError::Unauthorized) }
}

/// Requires one of `accepted` as the media type (parameters such as
/// `charset=utf-8` are allowed).
fn require_content_type(headers: &HeaderMap, accepted: &[&str], expected: &'static str) -> Result<(), ApiError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match media_type {
        Some(t) if accepted.contains(&t.as_str()) => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType { expected }),
    }
}

/// Reads the body within `--max-body` and parses it as a JSON object.
async fn read_object(app: &AppState, headers: &HeaderMap, body: Body) -> Result<Map<String, Value>, ApiError> {
    let limit = app.settings.max_body;
    // A declared length over the limit is refused before reading a byte.
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::PayloadTooLarge { limit })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest { code: "not_an_object", message: "the body must be a JSON object".into() }),
        Err(e) => Err(ApiError::BadRequest { code: "bad_json", message: format!("the body is not valid JSON: {e}") }),
    }
}

/// Parses `If-Match`: `*`, or one entity tag `"EPOCH:VERSION"` (a weak `W/`
/// prefix is tolerated, since our ETags are weak).
fn precondition(headers: &HeaderMap) -> Result<Option<Precondition>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let bad =
        || ApiError::BadRequest { code: "bad_if_match", message: "If-Match must be * or \"EPOCH:VERSION\"".into() };
    let value = value.to_str().map_err(|_| bad())?.trim();
    if value == "*" {
        return Ok(Some(Precondition::Exists));
    }
    let tag = value.strip_prefix("W/").unwrap_or(value);
    let inner = tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')).ok_or_else(bad)?;
    let position: Position = inner.parse().map_err(|_| bad())?;
    Ok(Some(Precondition::At(position)))
}
