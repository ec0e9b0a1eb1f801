//! The browser side: the topic list (`/`), the scoreboard page
//! (`/t/{topic}`), the scripts (`/client.js`, `/page.js`, `/embed.js`), the
//! stylesheet and the sample partner page. Pages are rendered on the server
//! from the hub's newest snapshot, so they read well without JavaScript; the
//! scripts then keep them live. Every static file is compiled into the binary.

use std::sync::OnceLock;
use std::time::SystemTime;

use askama::Template;
use askama_web::WebTemplate;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value};

use super::AppState;
use crate::protocol::{rfc3339_ms, unix_ms};
use crate::topic::{Snapshot, TopicName};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/t/{topic}", get(topic_page))
        .route("/client.js", get(|headers: HeaderMap| async move { CLIENT_JS.serve(&headers) }))
        .route("/page.js", get(|headers: HeaderMap| async move { PAGE_JS.serve(&headers) }))
        .route("/embed.js", get(|headers: HeaderMap| async move { EMBED_JS.serve(&headers) }))
        .route("/style.css", get(|headers: HeaderMap| async move { STYLE_CSS.serve(&headers) }))
        .route("/partner-example.html", get(partner_example))
}

/// Policy for our own pages: scripts and styles only from this server, no
/// plugins, no framing. Publisher data cannot run even if escaping failed.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                        connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The topic list.
#[derive(Template, WebTemplate)]
#[template(path = "index.html")]
struct IndexPage {
    topics: Vec<TopicRow>,
}

/// One row of the topic list.
struct TopicRow {
    name: String,
    summary: String,
    updated_at: String,
    ago: String,
}

async fn index(State(app): State<AppState>) -> Response {
    let now = unix_ms(SystemTime::now());
    let topics = app
        .hub
        .live_topics()
        .iter()
        .map(|snapshot| TopicRow {
            name: snapshot.topic.to_string(),
            summary: summary(&parse_state(snapshot)),
            updated_at: rfc3339_ms(snapshot.updated_ms),
            ago: ago(now, snapshot.updated_ms),
        })
        .collect();
    with_page_headers(IndexPage { topics }.into_response())
}

/// The scoreboard page of one topic, or the page saying it will appear.
#[derive(Template, WebTemplate)]
#[template(path = "topic.html")]
struct TopicPage {
    topic: String,
    /// Nothing is published on this topic (or the name is not valid).
    missing: bool,
    /// Whether the name is a valid topic name (a missing valid topic may
    /// still be published; an invalid one never can).
    valid: bool,
    /// Where the state stands, for the script to resume from.
    position: Option<PagePosition>,
    /// The state, when it follows the scoreboard schema.
    board: Option<Board>,
    /// The state as key/value rows, when it does not.
    fields: Vec<(String, String)>,
}

/// The version the page was rendered from; the script subscribes from here
/// so that nothing is sent again if nothing changed.
struct PagePosition {
    epoch: String,
    version: u64,
    updated_at: String,
    ago: String,
    /// The state as JSON, carried in a data attribute (escaped like any
    /// attribute) so the script can apply patches to it.
    state_json: String,
}

async fn topic_page(State(app): State<AppState>, Path(raw): Path<String>) -> Response {
    let name = TopicName::parse(&raw).ok();
    let snapshot = name.as_ref().and_then(|n| app.hub.get(n.as_str())).and_then(|t| t.live());
    let Some(snapshot) = snapshot else {
        let page = TopicPage {
            topic: raw,
            missing: true,
            valid: name.is_some(),
            position: None,
            board: None,
            fields: Vec::new(),
        };
        // 404 for crawlers and JS-off readers; the script still waits for
        // the topic and renders it when it is first published.
        return with_page_headers((StatusCode::NOT_FOUND, page).into_response());
    };
    let state = parse_state(&snapshot);
    let board = Board::from_state(&state);
    let fields = if board.is_some() { Vec::new() } else { fields(&state) };
    let page = TopicPage {
        topic: snapshot.topic.to_string(),
        missing: false,
        valid: true,
        position: Some(PagePosition {
            epoch: snapshot.epoch.to_string(),
            version: snapshot.version,
            updated_at: rfc3339_ms(snapshot.updated_ms),
            ago: ago(unix_ms(SystemTime::now()), snapshot.updated_ms),
            state_json: String::from_utf8_lossy(&snapshot.state).into_owned(),
        }),
        board,
        fields,
    };
    with_page_headers(page.into_response())
}

fn with_page_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("strict-origin-when-cross-origin"));
    // The page carries the state of the moment; a cached copy would show an
    // old score before the script catches up.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The state as a JSON object (the store only keeps objects).
fn parse_state(snapshot: &Snapshot) -> Map<String, Value> {
    serde_json::from_slice(&snapshot.state).unwrap_or_default()
}

/// A state that follows the scoreboard schema (`docs/SCOREBOARD.md`),
/// flattened to text for the template. The same rule as `isBoard` in
/// `static/render.js`: `home` and `away` are objects with a string `name` and
/// a number or string `score`; every other field is optional.
struct Board {
    home_name: String,
    home_score: String,
    away_name: String,
    away_score: String,
    period: Option<String>,
    status: Option<String>,
    /// `status` reduced to lowercase letters, for a CSS class.
    status_class: String,
    clock: Option<String>,
    /// Newest first, as the script shows them.
    events: Vec<BoardEvent>,
}

/// One line of the events list.
struct BoardEvent {
    minute: String,
    text: String,
}

impl Board {
    fn from_state(state: &Map<String, Value>) -> Option<Self> {
        let team = |key: &str| {
            let team = state.get(key)?.as_object()?;
            let name = team.get("name")?.as_str()?.to_owned();
            let score = team.get("score").filter(|s| s.is_string() || s.is_number()).map(text)?;
            Some((name, score))
        };
        let (home_name, home_score) = team("home")?;
        let (away_name, away_score) = team("away")?;
        let status = state.get("status").and_then(Value::as_str).map(str::to_owned);
        let status_class =
            status.as_deref().unwrap_or("").to_lowercase().chars().filter(char::is_ascii_lowercase).collect();
        let events = state
            .get("events")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .rev()
                    .filter_map(|e| {
                        let e = e.as_object()?;
                        let text = e.get("text")?.as_str()?.to_owned();
                        let minute = e
                            .get("minute")
                            .filter(|m| !m.is_null())
                            .map(|m| format!("{}'", self::text(m)))
                            .unwrap_or_default();
                        Some(BoardEvent { minute, text })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            home_name,
            home_score,
            away_name,
            away_score,
            period: state.get("period").filter(|v| !v.is_null()).map(text),
            status,
            status_class,
            clock: state.get("clock").filter(|v| !v.is_null()).map(text),
            events,
        })
    }
}

/// A value as the page shows it: strings bare, anything else as JSON.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The generic view: one row per top-level key.
fn fields(state: &Map<String, Value>) -> Vec<(String, String)> {
    state.iter().map(|(k, v)| (k.clone(), text(v))).collect()
}

/// One line for the topic list, as `summary` in `static/render.js`.
fn summary(state: &Map<String, Value>) -> String {
    if let Some(b) = Board::from_state(state) {
        let clock = b.clock.map(|c| format!(" · {c}")).unwrap_or_default();
        return format!("{} {} – {} {}{clock}", b.home_name, b.home_score, b.away_score, b.away_name);
    }
    state
        .iter()
        .take(3)
        .map(|(k, v)| format!("{k}: {}", text(v).chars().take(24).collect::<String>()))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// "4 s ago", as `ago` in `static/render.js`.
fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = (now_ms.saturating_sub(then_ms) + 500) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

/// A static file compiled into the binary, with its gzip form built on first
/// request (scripts are fetched by every page view, so they go compressed).
pub(super) struct Asset {
    body: &'static str,
    content_type: &'static str,
    gzip: OnceLock<Vec<u8>>,
}

impl Asset {
    const fn new(body: &'static str, content_type: &'static str) -> Self {
        Self { body, content_type, gzip: OnceLock::new() }
    }

    pub(super) fn serve(&'static self, headers: &HeaderMap) -> Response {
        let accepts_gzip = headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|c| c.split(';').next().is_some_and(|c| c.trim() == "gzip")));
        let gzip = accepts_gzip.then(|| self.gzip.get_or_init(|| gzip(self.body.as_bytes()))).filter(|g| !g.is_empty());
        let mut response = match gzip {
            Some(bytes) => {
                let mut r = bytes.as_slice().into_response();
                r.headers_mut().insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                r
            }
            None => self.body.into_response(),
        };
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        // Not fingerprinted, so kept short: a deploy reaches every page
        // within minutes.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
        response
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // An empty result makes `serve` fall back to the plain body.
    encoder.write_all(bytes).and_then(|()| encoder.finish()).unwrap_or_default()
}

const JS: &str = "text/javascript; charset=utf-8";

static CLIENT_JS: Asset = Asset::new(include_str!("../../static/client.js"), JS);
static PAGE_JS: Asset =
    Asset::new(concat!(include_str!("../../static/render.js"), include_str!("../../static/page.js")), JS);
/// The widget carries the client and the renderer with it, so a partner page
/// needs one script tag and one request; the client keeps one hub per page
/// however many copies run.
static EMBED_JS: Asset = Asset::new(
    concat!(
        include_str!("../../static/client.js"),
        include_str!("../../static/render.js"),
        include_str!("../../static/embed.js")
    ),
    JS,
);
static STYLE_CSS: Asset = Asset::new(include_str!("../../static/style.css"), "text/css; charset=utf-8");
/// The operator page's script and stylesheet, served by `admin` under `/admin`.
pub(super) static ADMIN_JS: Asset = Asset::new(include_str!("../../static/admin.js"), JS);
pub(super) static ADMIN_CSS: Asset = Asset::new(include_str!("../../static/admin.css"), "text/css; charset=utf-8");
const PARTNER_EXAMPLE: &str = include_str!("../../static/partner-example.html");

/// The sample partner page, with this server's address filled in so it can
/// be saved and served from any other origin as it is.
async fn partner_example(headers: HeaderMap) -> Response {
    // The Host header comes from the client: only a plain host[:port] is
    // reflected into the page, anything else falls back to a placeholder.
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
        .unwrap_or("localhost:8080");
    let https = headers.get("x-forwarded-proto").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let (http, ws) = if https { ("https", "wss") } else { ("http", "ws") };
    let page =
        PARTNER_EXAMPLE.replace("__HTTP__", &format!("{http}://{host}")).replace("__WS__", &format!("{ws}://{host}"));
    let mut response = axum::response::Html(page).into_response();
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn recognises_a_scoreboard_and_orders_events_newest_first() {
        let state = object(serde_json::json!({
            "home": {"name": "Rovers", "score": 2}, "away": {"name": "City", "score": "1"},
            "clock": "67:00", "period": 2, "status": "Live",
            "events": [{"minute": 12, "text": "Goal"}, {"text": "Card"}, {"minute": 3}]
        }));
        let board = Board::from_state(&state).expect("a scoreboard");
        assert_eq!((board.home_score.as_str(), board.away_score.as_str()), ("2", "1"));
        assert_eq!(board.period.as_deref(), Some("2"));
        assert_eq!(board.status_class, "live");
        let events: Vec<_> = board.events.iter().map(|e| (e.minute.as_str(), e.text.as_str())).collect();
        assert_eq!(events, [("", "Card"), ("12'", "Goal")]);
        assert_eq!(summary(&state), "Rovers 2 – 1 City · 67:00");
    }

    #[test]
    fn anything_else_is_generic() {
        let state = object(serde_json::json!({"home": {"score": 1}, "away": {"name": "x", "score": 0}, "n": [1]}));
        assert!(Board::from_state(&state).is_none());
        assert_eq!(fields(&state)[2], ("n".to_string(), "[1]".to_string()));
    }

    #[test]
    fn says_how_long_ago() {
        assert_eq!(ago(10_000, 10_000), "0 s ago");
        assert_eq!(ago(14_000, 10_000), "4 s ago");
        assert_eq!(ago(200_000, 10_000), "3 min ago");
        assert_eq!(ago(10_000, 20_000), "0 s ago");
    }

    #[test]
    fn escapes_publisher_data() {
        let page = TopicPage {
            topic: "t".into(),
            missing: false,
            valid: true,
            position: None,
            board: None,
            fields: vec![("<b>".into(), "<img src=x onerror=alert(1)>".into())],
        };
        let html = page.render().expect("renders");
        assert!(html.contains("&#60;img src=x onerror=alert(1)&#62;") || html.contains("&lt;img"), "{html}");
        assert!(!html.contains("<img"));
    }
}
