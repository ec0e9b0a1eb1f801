//! Every way a reader connects besides the single-topic WebSocket: SSE (one
//! and several topics, resume by Last-Event-ID), polling with ETags, CDN
//! headers and compression, long-poll, multi-topic WebSockets, deltas, CORS.

use std::io::Read as _;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Server, Sse, TOKEN, next_json, next_json_within, send_text, status_json};

#[tokio::test]
async fn sse_streams_hello_snapshots_and_heartbeats() {
    let s = Server::start(&["--heartbeat", "300ms"]).await;
    s.publish("t", &json!({"n": 1})).await;
    let mut sse = Sse::open(&s, "/v1/topics/t/events", &[]).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.response_headers["content-type"], "text/event-stream");
    assert_eq!(sse.response_headers["cache-control"], "no-store");
    assert_eq!(sse.response_headers["x-accel-buffering"], "no");
    let hello = sse.next_within(Duration::from_secs(5)).await.expect("hello");
    assert!(hello.retry.is_some_and(|r| (1000..5000).contains(&r)), "a jittered retry: {hello:?}");
    assert_eq!(hello.json()["type"], "hello");
    assert!(hello.id.is_none(), "control events carry no id");
    let first = sse.next_state().await;
    let frame = first.json();
    assert_eq!((frame["type"].as_str(), frame["version"].as_u64()), (Some("snapshot"), Some(1)));
    assert_eq!(first.id.as_deref(), Some(format!("{}:1", frame["epoch"].as_str().expect("epoch")).as_str()));
    let heartbeat = sse.next_within(Duration::from_secs(5)).await.expect("heartbeat");
    assert_eq!(heartbeat.json()["type"], "heartbeat");
    s.publish("t", &json!({"n": 2})).await;
    assert_eq!(sse.next_state().await.json()["state"]["n"], 2);
}

#[tokio::test]
async fn sse_resumes_through_last_event_id_with_nothing_resent() {
    let s = Server::start(&[]).await;
    s.publish("t", &json!({"n": 1})).await;
    let mut sse = Sse::open(&s, "/v1/topics/t/events", &[]).await;
    let last = sse.next_state().await;
    drop(sse);
    // Reconnect as EventSource does, naming the last id.
    let id = last.id.expect("id");
    let mut sse = Sse::open(&s, "/v1/topics/t/events", &[("last-event-id", &id)]).await;
    assert_eq!(sse.next_within(Duration::from_secs(5)).await.expect("hello").json()["type"], "hello");
    assert!(sse.next_within(Duration::from_millis(500)).await.is_none(), "nothing resent");
    s.publish("t", &json!({"n": 2})).await;
    let next = sse.next_state().await.json();
    assert_eq!((next["version"].as_u64(), next["skipped"].as_u64()), (Some(2), Some(0)));

    let bad = Sse::open(&s, "/v1/topics/t/events", &[("last-event-id", "garbage")]).await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn sse_follows_several_topics_and_resumes_them_all() {
    let s = Server::start(&[]).await;
    s.publish("a", &json!({"x": 1})).await;
    s.publish("b", &json!({"y": 1})).await;
    let mut sse = Sse::open(&s, "/v1/events?topic=a&topic=b", &[]).await;
    let mut seen = Vec::new();
    let mut last_id = String::new();
    for _ in 0..2 {
        let event = sse.next_state().await;
        seen.push(event.json()["topic"].as_str().expect("topic").to_string());
        last_id = event.id.expect("id");
    }
    seen.sort();
    assert_eq!(seen, ["a", "b"]);
    assert!(last_id.contains("a=") && last_id.contains("b=") && last_id.contains(','), "{last_id}");
    drop(sse);
    let mut sse = Sse::open(&s, "/v1/events?topic=a&topic=b", &[("last-event-id", &last_id)]).await;
    sse.next_within(Duration::from_secs(5)).await.expect("hello");
    assert!(sse.next_within(Duration::from_millis(500)).await.is_none(), "nothing resent for either topic");
    s.publish("b", &json!({"y": 2})).await;
    let event = sse.next_state().await.json();
    assert_eq!((event["topic"].as_str(), event["version"].as_u64()), (Some("b"), Some(2)));
}

#[tokio::test]
async fn sse_readers_turned_away_get_200_a_retry_hint_and_a_notice() {
    let mut s = Server::start(&[]).await;
    s.publish("t", &json!({"n": 1})).await;
    let mut sse = Sse::open(&s, "/v1/topics/t/events", &[]).await;
    sse.next_state().await;
    s.signal("TERM");
    let notice = sse.next_state().await;
    assert_eq!(sse.status, 200);
    assert!(notice.retry.is_some(), "a retry hint with the notice: {notice:?}");
    let frame = notice.json();
    assert_eq!(frame["type"], "notice");
    assert!(frame["retry_after_ms"].as_u64().is_some());
    assert!(sse.next_within(Duration::from_secs(5)).await.is_none(), "the stream ends");
    assert!(s.wait_exit(Duration::from_secs(10)).is_some());
}

#[tokio::test]
async fn polling_gets_etags_cdn_headers_and_compression() {
    let s = Server::start(&["--cache-max-age", "2s"]).await;
    let big = json!({"events": (0..40).map(|i| json!({"minute": i, "text": "a goal was scored"})).collect::<Vec<_>>()});
    s.publish("t", &big).await;
    let plain = s.http.get(s.url("/v1/topics/t")).send().await.expect("get");
    assert_eq!(plain.headers()["cache-control"], "public, max-age=2, stale-while-revalidate=2");
    assert_eq!(plain.headers()["vary"], "accept-encoding");
    assert!(plain.headers().get("content-encoding").is_none());
    let etag = plain.headers()["etag"].to_str().expect("etag").to_string();
    let plain_body = plain.bytes().await.expect("body");

    let before = s.metric("spillway_encodings_total{wire=\"json_br\"}").await;
    for _ in 0..5 {
        let r = s.http.get(s.url("/v1/topics/t")).header("accept-encoding", "gzip, br").send().await.expect("get");
        assert_eq!(r.headers()["content-encoding"], "br");
        assert_eq!(r.headers()["etag"], etag.as_str(), "one weak tag across codings");
        let mut decoded = Vec::new();
        brotli::BrotliDecompress(&mut &r.bytes().await.expect("body")[..], &mut decoded).expect("brotli");
        assert_eq!(decoded, plain_body.to_vec());
    }
    assert_eq!(
        s.metric("spillway_encodings_total{wire=\"json_br\"}").await - before,
        1.0,
        "compressed once per version"
    );
    let r = s.http.get(s.url("/v1/topics/t")).header("accept-encoding", "gzip").send().await.expect("get");
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let mut decoded = Vec::new();
    flate2::read::GzDecoder::new(&r.bytes().await.expect("body")[..]).read_to_end(&mut decoded).expect("gunzip");
    assert_eq!(decoded, plain_body.to_vec());

    let r = s
        .http
        .get(s.url("/v1/topics/t"))
        .header("if-none-match", &etag)
        .header("accept-encoding", "br")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.headers()["cache-control"].to_str().expect("cc").contains("max-age=2"));
    assert!(r.bytes().await.expect("body").is_empty());
}

#[tokio::test]
async fn long_poll_answers_at_once_waits_for_a_publish_or_times_out() {
    let s = Server::start(&[]).await;
    let ack = s.publish("t", &json!({"n": 1})).await;
    let epoch = ack["epoch"].as_str().expect("epoch").to_string();

    // Behind: answered at once.
    let r = s.http.get(s.url("/v1/topics/t?since=0123456789abcdef:1&wait=10")).send().await.expect("poll");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");

    // Current: held until a publish.
    let url = s.url(&format!("/v1/topics/t?since={epoch}:1&wait=20"));
    let waiting = tokio::spawn({
        let http = s.http.clone();
        async move {
            let started = Instant::now();
            let r = http.get(url).send().await.expect("poll");
            (started.elapsed(), status_json(r).await)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.metric("spillway_connections{transport=\"long_poll\"}").await, 1.0);
    s.publish("t", &json!({"n": 2})).await;
    let (took, (status, body)) = waiting.await.expect("join");
    assert_eq!((status, body["version"].as_u64()), (200, Some(2)));
    assert!(took < Duration::from_secs(10), "woken by the publish, not the timeout");

    // Current and nothing happens: 304 when the wait ends.
    let started = Instant::now();
    let r = s.http.get(s.url(&format!("/v1/topics/t?since={epoch}:2&wait=0.5"))).send().await.expect("poll");
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert!(started.elapsed() >= Duration::from_millis(450));

    let r = s.http.get(s.url(&format!("/v1/topics/t?since={epoch}:2&wait=soon"))).send().await.expect("poll");
    let (status, body) = status_json(r).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_wait")));
}

#[tokio::test]
async fn one_websocket_follows_several_topics_and_manages_them() {
    let s = Server::start(&["--max-topics-per-connection", "2"]).await;
    s.publish("a", &json!({"a": 1})).await;
    let ack = s.publish("b", &json!({"b": 1})).await;
    let b_pos = format!("{}:1", ack["epoch"].as_str().expect("epoch"));
    let mut ws = s.ws(&format!("/v1/ws?topic=a&topic=b@{b_pos}")).await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["topic"], "a", "b is already current, so only a is sent");
    assert!(next_json_within(&mut ws, Duration::from_millis(300)).await.is_none());

    send_text(&mut ws, r#"{"type":"subscribe","topic":"c"}"#).await;
    let error = next_json(&mut ws).await;
    assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("error"), Some("too_many_topics")));
    send_text(&mut ws, r#"{"type":"unsubscribe","topic":"a"}"#).await;
    send_text(&mut ws, r#"{"type":"subscribe","topic":"c"}"#).await;
    send_text(&mut ws, r#"{"type":"subscribe","topic":"-bad"}"#).await;
    assert_eq!(next_json(&mut ws).await["code"], "bad_topic", "a bad value keeps the connection");
    s.publish("a", &json!({"a": 2})).await;
    s.publish("c", &json!({"c": 1})).await;
    let next = next_json(&mut ws).await;
    assert_eq!(next["topic"], "c", "a was unsubscribed, c was added: {next}");

    // A deleted topic is dropped from a multi-topic connection, which stays.
    s.http.delete(s.url("/v1/topics/c")).bearer_auth(TOKEN).send().await.expect("delete");
    assert_eq!(next_json(&mut ws).await["type"], "deleted");
    s.publish("b", &json!({"b": 2})).await;
    assert_eq!(next_json(&mut ws).await["topic"], "b");

    send_text(&mut ws, "not json").await;
    assert_eq!(next_json(&mut ws).await["code"], "unexpected_message");
    let (code, _) = crate::harness::expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, 1008);

    let r = s.http.get(s.url("/v1/ws?topic=a&topic=b&topic=c")).send().await.expect("get");
    assert_eq!(status_json(r).await.1["error"], "too_many_topics");
}

#[tokio::test]
async fn a_burst_on_one_topic_does_not_starve_another_on_the_same_connection() {
    let s = Server::start(&["--write-timeout", "60s"]).await;
    s.publish("busy", &json!({"n": 0, "pad": "x".repeat(1000)})).await;
    s.publish("quiet", &json!({"q": 0})).await;
    let mut ws = s.ws("/v1/ws?topic=busy&topic=quiet").await;
    for _ in 0..2 {
        next_json(&mut ws).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burst = tokio::spawn({
        let http = s.http.clone();
        let url = s.url("/v1/topics/busy");
        let stop = std::sync::Arc::clone(&stop);
        async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 5000 {
                n += 1;
                http.put(&url)
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(json!({"n": n, "pad": "x".repeat(1000)}).to_string())
                    .send()
                    .await
                    .expect("put");
            }
        }
    });
    // The reader does not read while the burst runs, then the quiet topic
    // changes once; whatever busy version exists after that change was
    // chosen by the server after quiet became due.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.publish("quiet", &json!({"q": 1})).await;
    let busy_at_quiet = s.get("busy").await.1["version"].as_u64().expect("version");
    let mut later_busy_frames = 0;
    loop {
        let frame = next_json(&mut ws).await;
        if frame["topic"] == "quiet" {
            assert_eq!(frame["state"]["q"], 1);
            break;
        }
        if frame["version"].as_u64().expect("version") > busy_at_quiet {
            later_busy_frames += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(later_busy_frames <= 1, "quiet waited behind {later_busy_frames} newer busy frames");
    burst.await.expect("burst");
}

#[tokio::test]
async fn deltas_are_sent_to_readers_holding_the_base() {
    let s = Server::start(&[]).await;
    s.publish("t", &json!({"home": {"score": 0}, "clock": "00:00", "note": "kick-off"})).await;
    let mut ws = s.ws("/v1/topics/t/ws?delta=merge-patch").await;
    let mut state = next_json(&mut ws).await["state"].clone();
    s.publish("t", &json!({"home": {"score": 1}, "clock": "12:00"})).await;
    let patch = next_json(&mut ws).await;
    assert_eq!(
        (patch["type"].as_str(), patch["base"].as_u64(), patch["version"].as_u64()),
        (Some("patch"), Some(1), Some(2))
    );
    json_patch::merge(&mut state, &patch["patch"]);
    assert_eq!(
        state,
        json!({"home": {"score": 1}, "clock": "12:00"}),
        "the patch applied to its base is the new state"
    );

    // A null the patch cannot carry: a full snapshot instead.
    s.publish("t", &json!({"home": {"score": 1}, "clock": null})).await;
    let full = next_json(&mut ws).await;
    assert_eq!(full["type"], "snapshot");
    assert_eq!(full["state"]["clock"], Value::Null);

    // A reader resuming from a version the server keeps no base for gets a snapshot.
    let ack = s.get("t").await.1;
    let stale = format!("{}:1", ack["epoch"].as_str().expect("epoch"));
    let mut late = s.ws(&format!("/v1/topics/t/ws?delta=merge-patch&since={stale}")).await;
    assert_eq!(next_json(&mut late).await["type"], "snapshot");

    // SSE gets the same patch events.
    let mut sse = Sse::open(&s, "/v1/topics/t/events?delta=merge-patch", &[]).await;
    assert_eq!(sse.next_state().await.json()["type"], "snapshot");
    s.publish("t", &json!({"home": {"score": 2}, "clock": null})).await;
    let event = sse.next_state().await.json();
    assert_eq!(event["type"], "patch");
    assert_eq!(event["patch"], json!({"home": {"score": 2}}));

    let r = s.http.get(s.url("/v1/topics/t/ws?delta=json-patch")).send().await.expect("get");
    assert_eq!(status_json(r).await.1["error"], "bad_delta");
}

#[tokio::test]
async fn cors_is_open_by_default_and_follows_allow_origin() {
    let open = Server::start(&[]).await;
    open.publish("t", &json!({})).await;
    let r =
        open.http.get(open.url("/v1/topics/t")).header("origin", "https://anyone.example").send().await.expect("get");
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers()["access-control-expose-headers"].to_str().expect("expose").contains("etag"));

    let s = Server::start(&["--allow-origin", "https://partner.example"]).await;
    s.publish("t", &json!({})).await;
    let r = s.http.get(s.url("/v1/topics/t")).header("origin", "https://partner.example").send().await.expect("get");
    assert_eq!(r.headers()["access-control-allow-origin"], "https://partner.example");
    let r = s.http.get(s.url("/v1/topics/t")).header("origin", "https://evil.example").send().await.expect("get");
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let sse = Sse::open(&s, "/v1/topics/t/events", &[("origin", "https://evil.example")]).await;
    assert_eq!(sse.status, 403);
    let preflight = s
        .http
        .request(reqwest::Method::OPTIONS, s.url("/v1/topics/t"))
        .header("origin", "https://partner.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "if-none-match")
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success());
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(s.ws_url("/v1/topics/t/ws"))
            .expect("request");
    request.headers_mut().insert("origin", "https://evil.example".parse().expect("header"));
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("upgrade from a disallowed origin: {:?}", other.map(|_| ())),
    }
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(s.ws_url("/v1/topics/t/ws"))
            .expect("request");
    request.headers_mut().insert("origin", "https://partner.example".parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("allowed origin");
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));
}

#[tokio::test]
async fn a_long_poll_reader_continuing_on_its_connection_is_not_charged_by_the_token_bucket() {
    // One token a second: a reader charged for every poll could not make
    // ten waiting polls in less than nine seconds.
    let s = Server::start(&["--accept-rate", "1", "--accept-burst", "1"]).await;
    let ack = s.publish("lp", &json!({"n": 0})).await;
    let epoch = ack["epoch"].as_str().expect("epoch").to_string();
    let mut version = ack["version"].as_u64().expect("version");
    // One keep-alive connection, reused for every poll.
    let reader = reqwest::Client::builder().pool_max_idle_per_host(1).build().expect("client");
    let started = Instant::now();
    for n in 1..=10 {
        let url = s.url(&format!("/v1/topics/lp?since={epoch}:{version}&wait=10"));
        let poll = tokio::spawn({
            let reader = reader.clone();
            async move { reader.get(url).send().await.expect("poll") }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        version = s.publish("lp", &json!({ "n": n })).await["version"].as_u64().expect("version");
        let response = poll.await.expect("join");
        assert_eq!(response.status(), 200, "poll {n} admitted");
    }
    let elapsed = started.elapsed();
    assert_eq!(s.metric("spillway_subscriptions_total{result=\"refused\",reason=\"accept_rate\"}").await, 0.0);
    if elapsed > Duration::from_secs(9) {
        eprintln!("the machine was too slow ({elapsed:?}) to tell a charged poll from a free one");
    }
    // A new connection still pays: the bucket is empty.
    let fresh = reqwest::Client::new();
    let refused =
        fresh.get(s.url(&format!("/v1/topics/lp?since={epoch}:{version}&wait=1"))).send().await.expect("poll");
    if elapsed < Duration::from_secs(9) {
        assert!(matches!(refused.status().as_u16(), 503 | 304), "{}", refused.status());
    }
}
