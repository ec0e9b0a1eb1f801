//! The operator page, on only with `--admin-token`: `GET /admin` (a login
//! form, or the live page), `POST /admin/login`, `POST /admin/logout`,
//! `GET /admin/events` (an event stream of the internal `_stats` topic) and
//! the page's script and stylesheet. Without the token every `/admin` path
//! answers 404 saying how to turn it on.
//!
//! A browser's `EventSource` cannot set an `Authorization` header, so the
//! page authenticates with a session cookie set by the login form; HTTP Basic
//! (any user name, the token as password) works too, for curl. Sessions live
//! in a small in-memory table; failed token checks draw from a per-process
//! bucket, so guessing the token is limited to about one try a second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use askama::Template;
use askama_web::WebTemplate;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::pages::{ADMIN_CSS, ADMIN_JS};
use super::{ApiError, AppState, Settings};
use crate::config::Secret;
use crate::net::Peer;
use crate::topic::Subscription;

/// The session cookie's name.
const COOKIE: &str = "spillway_admin";
/// How long a session lasts after login.
pub(super) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once; a login beyond it ends the oldest session.
pub(super) const MAX_SESSIONS: usize = 256;
/// Failed token checks allowed in a burst, process-wide.
pub(super) const FAILED_LOGIN_BURST: f64 = 10.0;
/// Failed token checks allowed per second once the burst is spent.
pub(super) const FAILED_LOGIN_RATE: f64 = 1.0;
/// Largest login form body, in bytes.
const LOGIN_BODY_LIMIT: usize = 4096;

/// Policy for the operator pages: our own script and stylesheet, the event
/// stream, and forms posting to this server only.
const ADMIN_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                         connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub(super) fn router(settings: &Settings) -> Router<AppState> {
    let Some(token) = settings.admin_token.clone() else {
        return Router::new().route("/admin", any(off)).route("/admin/{*rest}", any(off));
    };
    let admin = Arc::new(Admin::new(token));
    Router::new()
        .route("/admin", get(page))
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/events", get(events))
        .route("/admin/admin.js", get(|headers: HeaderMap| async move { ADMIN_JS.serve(&headers) }))
        .route("/admin/admin.css", get(|headers: HeaderMap| async move { ADMIN_CSS.serve(&headers) }))
        .layer(Extension(admin))
}

async fn off() -> ApiError {
    ApiError::NotFound(
        "the operator page is off; start spillway with --admin-token TOKEN (or SPILLWAY_ADMIN_TOKEN) to turn it on",
    )
}

/// The operator page's state: its token, the sessions, the failed-login bucket.
#[derive(Debug)]
struct Admin {
    token: Secret,
    sessions: Sessions,
    attempts: Attempts,
}

impl Admin {
    fn new(token: Secret) -> Self {
        Self { token, sessions: Sessions::default(), attempts: Attempts::new(Instant::now()) }
    }

    /// Checks a presented token in constant time, paying one attempt from
    /// the bucket first (given back on success), so that a burst of parallel
    /// guesses cannot all be checked before the first failure is counted.
    fn check_token(&self, presented: &[u8]) -> Result<(), Denied> {
        self.attempts.take(Instant::now()).map_err(Denied::TooMany)?;
        if bool::from(presented.ct_eq(self.token.expose().as_bytes())) {
            self.attempts.give_back();
            Ok(())
        } else {
            Err(Denied::WrongToken)
        }
    }

    /// Who is asking: a live session cookie wins; then HTTP Basic; else nobody.
    fn identify(&self, headers: &HeaderMap) -> Result<Caller, Denied> {
        if let Some(id) = session_cookie(headers)
            && self.sessions.check(&id, Instant::now())
        {
            return Ok(Caller::Session);
        }
        match basic_password(headers) {
            Some(Some(password)) => self.check_token(&password).map(|()| Caller::Basic),
            // Basic credentials that do not decode are a wrong token too.
            Some(None) => self.check_token(b"").map(|()| Caller::Basic),
            None => Ok(Caller::Anonymous),
        }
    }
}

/// An authenticated (or not) caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// Logged in through the form.
    Session,
    /// HTTP Basic with the right token.
    Basic,
    /// No credentials.
    Anonymous,
}

/// Why a token check failed.
#[derive(Debug, Clone, Copy)]
enum Denied {
    /// The token presented is not the admin token.
    WrongToken,
    /// Too many failed checks lately; try again after this long.
    TooMany(Duration),
}

/// A session id: 128 random bits.
type SessionId = [u8; 16];

/// Open sessions and their expiry. A `std` mutex: every critical section is
/// a lookup, insert or sweep, never across an await.
#[derive(Debug, Default)]
struct Sessions {
    open: Mutex<HashMap<SessionId, Instant>>,
}

impl Sessions {
    /// Starts a session; `None` if the OS has no random source (then no
    /// safe id can be made, and the login fails).
    fn start(&self, now: Instant) -> Option<SessionId> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).ok()?;
        self.insert(id, now);
        Some(id)
    }

    fn insert(&self, id: SessionId, now: Instant) {
        let mut open = self.lock();
        open.retain(|_, expires| *expires > now);
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open.iter().min_by_key(|(_, expires)| **expires).map(|(id, _)| *id)
        {
            open.remove(&oldest);
        }
        open.insert(id, now + SESSION_TTL);
    }

    /// Whether `id` is a live session (an expired one is removed).
    fn check(&self, id: &SessionId, now: Instant) -> bool {
        let mut open = self.lock();
        match open.get(id) {
            Some(expires) if *expires > now => true,
            Some(_) => {
                open.remove(id);
                false
            }
            None => false,
        }
    }

    fn end(&self, id: &SessionId) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Instant>> {
        // Each critical section leaves the map whole, so poisoning is ignored.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A token bucket of token checks: every check takes one, a correct token
/// gives it back, so only failures drain it.
#[derive(Debug)]
struct Attempts {
    /// Tokens left and when they were last refilled.
    state: Mutex<(f64, Instant)>,
}

impl Attempts {
    fn new(now: Instant) -> Self {
        Self { state: Mutex::new((FAILED_LOGIN_BURST, now)) }
    }

    /// Takes one attempt, or says how long until one is available.
    fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, refilled) = &mut *state;
        let elapsed = now.saturating_duration_since(*refilled).as_secs_f64();
        *tokens = (*tokens + elapsed * FAILED_LOGIN_RATE).min(FAILED_LOGIN_BURST);
        *refilled = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / FAILED_LOGIN_RATE))
        }
    }

    fn give_back(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 = (state.0 + 1.0).min(FAILED_LOGIN_BURST);
    }
}

/// The login form.
#[derive(Template, WebTemplate)]
#[template(path = "admin_login.html")]
struct LoginPage {
    /// Why the last attempt failed, if it did.
    error: Option<String>,
}

/// The live page.
#[derive(Template, WebTemplate)]
#[template(path = "admin.html")]
struct AdminPage {
    /// Logged in through the form (so a logout button makes sense; HTTP
    /// Basic has no logout).
    session: bool,
}

async fn page(Extension(admin): Extension<Arc<Admin>>, headers: HeaderMap) -> Response {
    match admin.identify(&headers) {
        Ok(Caller::Anonymous) => with_headers(LoginPage { error: None }.into_response()),
        Ok(caller) => with_headers(AdminPage { session: caller == Caller::Session }.into_response()),
        Err(denied) => denied_json(denied, true),
    }
}

async fn login(
    Extension(admin): Extension<Arc<Admin>>,
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = |status: StatusCode, error: &str| {
        with_headers((status, LoginPage { error: Some(error.to_string()) }).into_response())
    };
    let Ok(body) = axum::body::to_bytes(body, LOGIN_BODY_LIMIT).await else {
        return form(StatusCode::PAYLOAD_TOO_LARGE, "The form was too large.");
    };
    let body = String::from_utf8_lossy(&body);
    let Some(token) = super::query_param(Some(&body), "token").filter(|t| !t.trim().is_empty()) else {
        return form(StatusCode::BAD_REQUEST, "Enter the admin token.");
    };
    match admin.check_token(token.trim().as_bytes()) {
        Ok(()) => {}
        Err(Denied::WrongToken) => return form(StatusCode::UNAUTHORIZED, "That is not the admin token."),
        Err(Denied::TooMany(wait)) => {
            let secs = wait.as_secs().max(1);
            let mut response =
                form(StatusCode::TOO_MANY_REQUESTS, &format!("Too many failed attempts; try again in {secs} s."));
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return response;
        }
    }
    let Some(id) = admin.sessions.start(Instant::now()) else {
        tracing::error!("no random source for an admin session id");
        return form(StatusCode::INTERNAL_SERVER_ERROR, "The server cannot start a session.");
    };
    // `Secure` only when we know the browser spoke https to a proxy we trust;
    // over plain http the browser would drop a `Secure` cookie.
    let https = app.settings.trusted_proxies.contains(&peer.addr.ip())
        && headers.get("x-forwarded-proto").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{COOKIE}={}; Path=/admin; Max-Age={}; HttpOnly; SameSite=Strict{}",
        hex(&id),
        SESSION_TTL.as_secs(),
        if https { "; Secure" } else { "" }
    );
    let mut response = redirect_to_page();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn logout(Extension(admin): Extension<Arc<Admin>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        admin.sessions.end(&id);
    }
    let mut response = redirect_to_page();
    let expired = format!("{COOKIE}=; Path=/admin; Max-Age=0; HttpOnly; SameSite=Strict");
    if let Ok(value) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// The `_stats` topic as an event stream, for an authenticated operator.
async fn events(
    Extension(admin): Extension<Arc<Admin>>,
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    match admin.identify(&headers) {
        Ok(Caller::Session | Caller::Basic) => {}
        Ok(Caller::Anonymous) => return denied_json(Denied::WrongToken, false),
        Err(denied) => return denied_json(denied, true),
    }
    let topic = crate::stats::topic();
    let subscription = Subscription::single(app.hub.follow(&topic, None));
    super::sse::operator_stream(app, &peer, subscription, topic.to_string())
}

/// 303 to `/admin`, so a reload after login or logout does not post again.
fn redirect_to_page() -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    response.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/admin"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A JSON 401 (or 429). The Basic challenge goes only to callers that sent
/// credentials: to a browser's `EventSource` it would pop up a password
/// dialog over the page, which should send the operator to the form instead.
fn denied_json(denied: Denied, challenge: bool) -> Response {
    let (status, error, message, retry) = match denied {
        Denied::WrongToken => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin token is required: log in at /admin, or use HTTP Basic with the token as the password".into(),
            None,
        ),
        Denied::TooMany(wait) => {
            let secs = wait.as_secs().max(1);
            (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                format!("too many failed admin logins; retry in {secs} s"),
                Some(secs),
            )
        }
    };
    let mut response = (status, Json(json!({ "error": error, "message": message }))).into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if challenge && status == StatusCode::UNAUTHORIZED {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"spillway admin\", charset=\"UTF-8\""),
        );
    }
    if let Some(secs) = retry {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

fn with_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(ADMIN_CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The session id in the request's cookies, if one is well-formed.
fn session_cookie(headers: &HeaderMap) -> Option<SessionId> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| unhex(value))
}

/// `Some(password)` for `Authorization: Basic …` (`Some(None)` if it does not
/// decode), `None` without Basic credentials.
fn basic_password(headers: &HeaderMap) -> Option<Option<Vec<u8>>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    // The scheme name is case-insensitive (RFC 9110, section 11.1).
    let encoded = value.get(..6).filter(|scheme| scheme.eq_ignore_ascii_case("basic ")).map(|_| &value[6..])?;
    let decoded = base64_decode(encoded.trim());
    Some(decoded.and_then(|pair| {
        let colon = pair.iter().position(|b| *b == b':')?;
        Some(pair[colon + 1..].to_vec())
    }))
}

/// Decodes standard base64 (padding optional); `None` if malformed.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let text = text.trim_end_matches('=').as_bytes();
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= value(*c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<SessionId> {
    if text.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> Admin {
        Admin::new(Secret::new("the-admin-token"))
    }

    fn with(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_str(value).expect("header"));
        headers
    }

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64_decode("b3A6dGhlLWFkbWluLXRva2Vu").as_deref(), Some(&b"op:the-admin-token"[..]));
        assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("YWI").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        assert!(base64_decode("Y").is_none());
        assert!(base64_decode("a b!").is_none());
    }

    #[test]
    fn basic_takes_any_user_name_and_the_token() {
        let a = admin();
        // "anyone:the-admin-token"
        let good = with(header::AUTHORIZATION, "basic YW55b25lOnRoZS1hZG1pbi10b2tlbg==");
        assert_eq!(a.identify(&good).ok(), Some(Caller::Basic));
        // "anyone:wrong"
        let bad = with(header::AUTHORIZATION, "Basic YW55b25lOndyb25n");
        assert!(matches!(a.identify(&bad), Err(Denied::WrongToken)));
        let garbage = with(header::AUTHORIZATION, "Basic !!!");
        assert!(matches!(a.identify(&garbage), Err(Denied::WrongToken)));
        let bearer = with(header::AUTHORIZATION, "Bearer the-admin-token");
        assert_eq!(a.identify(&bearer).ok(), Some(Caller::Anonymous));
        assert_eq!(a.identify(&HeaderMap::new()).ok(), Some(Caller::Anonymous));
    }

    #[test]
    fn sessions_expire_and_are_bounded() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let first = sessions.start(t0).expect("random");
        assert!(sessions.check(&first, t0 + SESSION_TTL - Duration::from_secs(1)));
        assert!(!sessions.check(&first, t0 + SESSION_TTL));
        assert!(!sessions.check(&first, t0), "an expired session is gone for good");

        for i in 0..MAX_SESSIONS + 10 {
            sessions.insert(
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (i >> 8) as u8, i as u8],
                t0 + Duration::from_secs(i as u64),
            );
        }
        assert_eq!(sessions.lock().len(), MAX_SESSIONS);
        assert!(!sessions.check(&[0; 16], t0), "the oldest made room");
        let newest = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 9];
        assert!(sessions.check(&newest, t0));
        sessions.end(&newest);
        assert!(!sessions.check(&newest, t0));
    }

    #[test]
    fn failed_checks_are_rate_limited_and_successes_are_free() {
        let t0 = Instant::now();
        let attempts = Attempts::new(t0);
        for _ in 0..FAILED_LOGIN_BURST as usize {
            assert!(attempts.take(t0).is_ok());
        }
        let wait = attempts.take(t0).expect_err("the burst is spent");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(attempts.take(t0 + Duration::from_millis(1100)).is_ok(), "one more after a second");
        assert!(attempts.take(t0 + Duration::from_millis(1100)).is_err());
        attempts.give_back();
        assert!(attempts.take(t0 + Duration::from_millis(1100)).is_ok(), "a success gives its attempt back");
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let id = [7u8; 16];
        let headers = with(header::COOKIE, &format!("a=b; {COOKIE}={}; c=d", hex(&id)));
        assert_eq!(session_cookie(&headers), Some(id));
        assert_eq!(session_cookie(&with(header::COOKIE, &format!("{COOKIE}=zz"))), None);
        assert_eq!(unhex(&hex(&id)), Some(id));
    }
}
