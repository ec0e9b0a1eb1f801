//! Snapshot reads: `GET /v1/topics/{topic}` (one topic, with an ETag, CDN
//! cache headers and compression), its long-poll form
//! (`?since=EPOCH:VERSION&wait=SECONDS`), and `GET /v1/topics` (the list).
//! Served from the hub's memory, never from the store: the hub holds exactly
//! what has been committed.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::{ApiError, AppState, TopicPath, query_param, since_param};
use crate::metrics::Transport;
use crate::net::Peer;
use crate::protocol::{json_body, json_brotli, json_gzip, rfc3339_ms};
use crate::topic::{Delivery, Snapshot, Subscription, Wire};

/// Bodies smaller than this are sent uncompressed: the framing would eat
/// the gain.
const COMPRESS_MIN: usize = 256;

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
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<Peer>,
    polled: Option<axum::Extension<crate::net::Polled>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let polled = polled.map(|axum::Extension(polled)| polled);
    let since = since_param(query.as_deref())?;
    let Some(since) = since else {
        // A plain poll: the current snapshot, cacheable by a CDN.
        let snapshot =
            app.hub.get(topic.as_str()).and_then(|t| t.live()).ok_or(ApiError::NotFound("topic does not exist"))?;
        let cache = format!("public, max-age={0}, stale-while-revalidate={0}", app.settings.cache_max_age.as_secs());
        return Ok(snapshot_response(&snapshot, &headers, &cache));
    };
    let wait = match query_param(query.as_deref(), "wait") {
        None => Duration::ZERO,
        Some(raw) => {
            let secs: f64 = raw.parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0).ok_or_else(|| {
                ApiError::BadRequest { code: "bad_wait", message: "wait must be a number of seconds".into() }
            })?;
            // Clamped to --max-wait rather than refused: a client asking for
            // too long still gets a useful answer.
            Duration::from_secs_f64(secs.min(app.settings.max_wait.as_secs_f64()))
        }
    };
    if !app.settings.origin_allowed(&headers) {
        return Err(ApiError::OriginNotAllowed);
    }
    if app.shutdown.is_cancelled() {
        return Err(ApiError::Draining);
    }
    // A long-poll: answer at once if the reader is behind, else hold the
    // request (one parked future, no polling loop) until a newer version
    // arrives or the wait ends.
    let mut subscription = Subscription::single(app.hub.follow(&topic, Some(since)));
    let delivery = match subscription.take() {
        Some(delivery) => Some(delivery),
        None if wait.is_zero() => None,
        None => {
            // Only a poll that waits holds a place; it resumes by definition,
            // and the next poll on a connection whose last one was answered is
            // the same reader continuing, which the token bucket does not
            // charge (N long-poll readers of a topic changing R times a second
            // would otherwise need N·R tokens a second).
            let continuing = polled.as_ref().is_some_and(|p| p.0.load(std::sync::atomic::Ordering::Relaxed));
            let admitted = if continuing {
                app.admission.admit_continuing(app.settings.client_ip(&peer, &headers))
            } else {
                app.settings.admit(&app.admission, &peer, &headers, true)
            };
            let _permit = admitted
                .map_err(|r| ApiError::Overloaded { reason: r.why.label(), retry_after_ms: r.retry_after_ms })?;
            app.settings.clamp_subscription_socket(&peer);
            let _waiting = app.metrics.open(Transport::LongPoll);
            let drain = async {
                app.shutdown.cancelled().await;
                // Each waiting poll is answered at its own moment in the drain window.
                tokio::time::sleep(app.settings.drain_delay()).await;
            };
            tokio::select! {
                () = subscription.ready() => subscription.take(),
                () = tokio::time::sleep(wait) => None,
                () = drain => return Err(ApiError::Draining),
            }
        }
    };
    if let Some(polled) = &polled {
        polled.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    match delivery {
        Some(Delivery::Snapshot { snapshot, .. }) => {
            app.metrics.deliveries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(snapshot_response(&snapshot, &HeaderMap::new(), "no-store"))
        }
        Some(Delivery::Deleted(_)) => Err(ApiError::NotFound("topic was deleted")),
        None => {
            let mut response = StatusCode::NOT_MODIFIED.into_response();
            let h = response.headers_mut();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if let Some(current) = app.hub.get(topic.as_str()).and_then(|t| t.live()) {
                h.insert(header::ETAG, etag(&current));
            }
            Ok(response)
        }
    }
}

/// The snapshot as a response: 304 if `If-None-Match` names it, else the
/// body in the best coding the client accepts, each coding built once per
/// version.
fn snapshot_response(snapshot: &Snapshot, headers: &HeaderMap, cache_control: &str) -> Response {
    let etag = etag(snapshot);
    let cache_control = HeaderValue::from_str(cache_control).unwrap_or(HeaderValue::from_static("no-cache"));
    if if_none_match(headers, &etag) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        let h = response.headers_mut();
        h.insert(header::ETAG, etag);
        h.insert(header::CACHE_CONTROL, cache_control);
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        return response;
    }
    let plain = snapshot.encoded(Wire::JsonBody, json_body).bytes.clone();
    let (body, coding) = match coding(headers) {
        Some(Coding::Brotli) if plain.len() >= COMPRESS_MIN => {
            (snapshot.encoded(Wire::JsonBrotli, json_brotli).bytes.clone(), Some("br"))
        }
        Some(Coding::Gzip) if plain.len() >= COMPRESS_MIN => {
            (snapshot.encoded(Wire::JsonGzip, json_gzip).bytes.clone(), Some("gzip"))
        }
        _ => (plain.clone(), None),
    };
    // A failed compression leaves an empty encoding: fall back to plain.
    let (body, coding) = if body.is_empty() { (plain, None) } else { (body, coding) };
    let mut response = Response::new(Body::from(body));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(coding) = coding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
    }
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(header::ETAG, etag);
    h.insert(header::CACHE_CONTROL, cache_control);
    response
}

/// A content coding we produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Brotli,
    Gzip,
}

/// The preferred coding from `Accept-Encoding`: brotli over gzip, honouring
/// `q=0` refusals; `None` for identity.
fn coding(headers: &HeaderMap) -> Option<Coding> {
    let mut best: Option<(Coding, f32)> = None;
    for value in headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()) {
        for item in value.split(',') {
            let mut parts = item.split(';').map(str::trim);
            let name = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts.find_map(|p| p.strip_prefix("q=").and_then(|q| q.parse::<f32>().ok())).unwrap_or(1.0);
            let coding = match name.as_str() {
                "br" => Coding::Brotli,
                "gzip" | "x-gzip" => Coding::Gzip,
                _ => continue,
            };
            if q <= 0.0 {
                continue;
            }
            let better = match best {
                None => true,
                Some((current, best_q)) => {
                    q > best_q || (q == best_q && coding == Coding::Brotli && current != Coding::Brotli)
                }
            };
            if better {
                best = Some((coding, q));
            }
        }
    }
    best.map(|(c, _)| c)
}

/// A weak entity tag naming the version: `W/"EPOCH:VERSION"`. Weak, so it
/// stays truthful across content codings (one tag for gzip, brotli and
/// identity, as the bodies are semantically the same).
fn etag(snapshot: &Snapshot) -> HeaderValue {
    HeaderValue::try_from(format!("W/\"{}\"", snapshot.position())).unwrap_or(HeaderValue::from_static("W/\"0\""))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(accept).expect("header"));
        h
    }

    #[test]
    fn negotiates_codings() {
        assert_eq!(coding(&HeaderMap::new()), None);
        assert_eq!(coding(&with("gzip, deflate, br")), Some(Coding::Brotli));
        assert_eq!(coding(&with("gzip")), Some(Coding::Gzip));
        assert_eq!(coding(&with("br;q=0, gzip")), Some(Coding::Gzip));
        assert_eq!(coding(&with("br;q=0.5, gzip;q=0.8")), Some(Coding::Gzip));
        assert_eq!(coding(&with("identity")), None);
    }
}
