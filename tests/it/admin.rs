//! The operator page: off without `--admin-token`, the login form and its
//! session cookie, HTTP Basic, the `/admin/events` stream of the internal
//! `_stats` topic, and that topic staying out of every public endpoint.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Server, Sse, status_json};

const ADMIN: &str = "admin-token-0123456789";

/// A server with the operator page on.
async fn server(extra: &[&str]) -> Server {
    let mut args = vec!["--admin-token", ADMIN];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

/// Standard base64, for a Basic header.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn basic(password: &str) -> String {
    format!("Basic {}", base64(format!("operator:{password}").as_bytes()))
}

/// Posts the login form; returns the response.
async fn login(s: &Server, token: &str) -> reqwest::Response {
    client()
        .post(s.url("/admin/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .expect("login")
}

/// The `name=value` part of the response's session cookie, if it set one.
fn session_cookie(response: &reqwest::Response) -> Option<String> {
    let set = response.headers().get("set-cookie")?.to_str().ok()?;
    let pair = set.split(';').next()?.trim();
    (pair.starts_with("spillway_admin=") && pair.len() > "spillway_admin=".len()).then(|| pair.to_string())
}

/// The next stats document on an operator stream.
async fn next_stats(sse: &mut Sse) -> Value {
    let event = sse.next_state().await;
    let frame = event.json();
    assert_eq!(frame["type"], "snapshot", "{frame}");
    assert_eq!(frame["topic"], "_stats");
    frame["state"].clone()
}

#[tokio::test]
async fn the_admin_surface_is_off_without_a_token() {
    let s = Server::start(&[]).await;
    for path in ["/admin", "/admin/events", "/admin/admin.js"] {
        let (status, body) = status_json(s.http.get(s.url(path)).send().await.expect("get")).await;
        assert_eq!(status, 404, "{path}");
        assert!(body["message"].as_str().is_some_and(|m| m.contains("--admin-token")), "{path}: {body}");
    }
    let response = login(&s, ADMIN).await;
    assert_eq!(response.status(), 404);
    assert!(session_cookie(&response).is_none());
}

#[tokio::test]
async fn the_form_logs_in_with_a_cookie_and_logout_ends_the_session() {
    let s = server(&[]).await;
    let http = client();

    // Anonymous: the login form, no challenge that would pop up a dialog.
    let form = http.get(s.url("/admin")).send().await.expect("get");
    assert_eq!(form.status(), 200);
    assert!(form.headers().get("www-authenticate").is_none());
    let html = form.text().await.expect("html");
    assert!(html.contains(r#"action="/admin/login""#) && html.contains(r#"name="token""#), "{html}");

    // A wrong token: 401, the form again, and no cookie.
    let wrong = login(&s, "not-the-token").await;
    assert_eq!(wrong.status(), 401);
    assert!(session_cookie(&wrong).is_none());
    assert!(wrong.text().await.expect("html").contains("not the admin token"));
    // No token at all is bad input.
    let empty = login(&s, "").await;
    assert_eq!(empty.status(), 400);
    assert!(session_cookie(&empty).is_none());

    // A form over the 4 KiB limit is refused unread.
    let huge = login(&s, &format!("{ADMIN}&pad={}", "x".repeat(5000))).await;
    assert_eq!(huge.status(), 413);
    assert!(session_cookie(&huge).is_none());

    // The right one: a session cookie and a redirect to the page.
    let ok = login(&s, ADMIN).await;
    assert_eq!(ok.status(), 303);
    assert_eq!(ok.headers()["location"], "/admin");
    let set = ok.headers()["set-cookie"].to_str().expect("ascii").to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    let cookie = session_cookie(&ok).expect("a session cookie");
    let page = http.get(s.url("/admin")).header("cookie", &cookie).send().await.expect("page");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().expect("ascii").to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = page.text().await.expect("html");
    assert!(html.contains("/admin/admin.js") && html.contains("/admin/logout"), "{html}");
    let script = http.get(s.url("/admin/admin.js")).send().await.expect("script");
    assert_eq!(script.status(), 200);
    assert!(script.text().await.expect("js").contains("EventSource"));

    let mut events = Sse::open(&s, "/admin/events", &[("cookie", &cookie)]).await;
    assert_eq!(events.status, 200);
    assert!(next_stats(&mut events).await["uptime_s"].is_u64());
    drop(events);

    // Logout ends the session: the old cookie opens nothing any more.
    let out = http.post(s.url("/admin/logout")).header("cookie", &cookie).send().await.expect("logout");
    assert_eq!(out.status(), 303);
    assert!(out.headers()["set-cookie"].to_str().expect("ascii").contains("Max-Age=0"));
    let events = http.get(s.url("/admin/events")).header("cookie", &cookie).send().await.expect("events");
    assert_eq!(events.status(), 401);
    let again = http.get(s.url("/admin")).header("cookie", &cookie).send().await.expect("page");
    assert!(again.text().await.expect("html").contains(r#"name="token""#), "the form again");
}

#[tokio::test]
async fn basic_auth_works_for_curl_and_the_stream_moves_with_a_publish() {
    let s = server(&[]).await;
    let auth = basic(ADMIN);
    let page = s.http.get(s.url("/admin")).header("authorization", &auth).send().await.expect("page");
    assert_eq!(page.status(), 200);
    assert!(!page.text().await.expect("html").contains("/admin/logout"), "Basic has no logout");

    let (status, body) = status_json(
        s.http.get(s.url("/admin/events")).header("authorization", basic("wrong-token")).send().await.expect("events"),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let anonymous = s.http.get(s.url("/admin/events")).send().await.expect("events");
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().get("www-authenticate").is_none(), "no dialog for a browser's EventSource");

    let mut events = Sse::open(&s, "/admin/events", &[("authorization", &auth)]).await;
    assert_eq!(events.status, 200);
    assert_eq!(events.response_headers["content-type"], "text/event-stream");
    let before = next_stats(&mut events).await;
    assert_eq!(before["publishes"]["ok"], 0, "{before}");
    for key in ["publish_latency_ms", "delivery_lag_ms", "bytes_in_flight"] {
        assert!(before.get(key).is_some(), "{key} is in the document (null until wired)");
    }
    assert!(before["process"]["rss_bytes"].as_u64().is_some_and(|b| b > 0), "{before}");

    s.publish("board", &json!({"n": 1})).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = next_stats(&mut events).await;
        if stats["publishes"]["ok"] == 1 {
            assert_eq!(stats["topics"], 1, "one public topic, the stats topic not counted: {stats}");
            // Built after the operator connected: its own stream counts.
            assert_eq!(stats["connections"]["sse"], 1, "{stats}");
            break;
        }
        assert!(Instant::now() < deadline, "the publish never showed: {stats}");
    }
}

#[tokio::test]
async fn the_stats_topic_is_unreachable_from_public_endpoints() {
    let s = server(&[]).await;
    // Let the stats task install at least one version first.
    let mut events = Sse::open(&s, "/admin/events", &[("authorization", &basic(ADMIN))]).await;
    next_stats(&mut events).await;
    s.publish("public", &json!({"n": 1})).await;

    for path in ["/v1/topics/_stats", "/v1/topics/_stats/events", "/v1/events?topic=_stats", "/t/_stats"] {
        let response = s.http.get(s.url(path)).send().await.expect("get");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        assert!(!text.contains("uptime_s"), "{path} leaked the stats: {text}");
        if path != "/t/_stats" {
            assert_eq!(status, 400, "{path}: {text}");
        }
    }
    let ws = s.http.get(s.url("/v1/topics/_stats/ws")).send().await.expect("ws");
    assert_eq!(ws.status(), 400);
    assert!(tokio_tungstenite::connect_async(s.ws_url("/v1/topics/_stats/ws")).await.is_err());
    assert!(tokio_tungstenite::connect_async(s.ws_url("/v1/ws?topic=_stats")).await.is_err());
    let put = s
        .http
        .put(s.url("/v1/topics/_stats"))
        .bearer_auth(crate::harness::TOKEN)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 400);

    let (_, list) = status_json(s.http.get(s.url("/v1/topics")).send().await.expect("list")).await;
    assert_eq!(list["topics"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(s.metric("spillway_topics").await, 1.0);
    let index = s.http.get(s.url("/")).send().await.expect("index").text().await.expect("html");
    assert!(!index.contains("_stats"));
}

#[tokio::test]
async fn operators_bypass_admission_and_guessing_is_rate_limited() {
    let s = server(&["--max-connections", "1"]).await;
    s.publish("t", &json!({"n": 1})).await;
    let mut reader = Sse::open(&s, "/v1/topics/t/events", &[]).await;
    reader.next_state().await;
    // The one place is taken: a second reader is turned away…
    let mut refused = Sse::open(&s, "/v1/topics/t/events", &[]).await;
    let notice = refused.next_within(Duration::from_secs(5)).await.expect("notice");
    assert_eq!(notice.json()["reason"], "overload");
    // …but the operator still gets the figures, refusals included.
    let mut events = Sse::open(&s, "/admin/events", &[("authorization", &basic(ADMIN))]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = next_stats(&mut events).await;
        if stats["subscriptions"]["refused"]["max_connections"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the refusal never showed: {stats}");
    }

    // Guessing: failed checks drain a small bucket (about one a second after
    // a burst of ten), after which checks are refused outright with 429.
    let mut statuses = Vec::new();
    for i in 0..30 {
        let response = login(&s, &format!("guess-{i}")).await;
        assert!(session_cookie(&response).is_none());
        statuses.push(response.status().as_u16());
    }
    assert!(statuses.iter().all(|s| matches!(s, 401 | 429)), "{statuses:?}");
    assert!(statuses.contains(&429), "no guess was rate limited: {statuses:?}");
    let limited = s.http.get(s.url("/admin")).header("authorization", basic("guess")).send().await.expect("get");
    if limited.status() == 429 {
        assert!(limited.headers().get("retry-after").is_some());
    }
}
