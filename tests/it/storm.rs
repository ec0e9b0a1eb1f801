//! Surviving the storm: admission control before the upgrade, resuming
//! readers first, a drain spread over its window, the topic limit, and the
//! staleness cut-off.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::harness::{Server, Sse, next_json};

/// Opens a WebSocket and says whether it was admitted; checks a refusal's
/// status, `Retry-After` and JSON hint.
async fn try_ws(url: String) -> Option<crate::harness::Ws> {
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Some(ws),
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert!(response.headers().get("retry-after").is_some(), "a Retry-After header");
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or(b"null")).expect("json body");
            assert_eq!(body["error"], "overloaded");
            assert!(body["retry_after_ms"].as_u64().is_some_and(|ms| ms >= 250), "{body}");
            None
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_storm_is_turned_away_cheaply_and_resuming_readers_go_first() {
    // The storm: 5,000 subscriptions at once against 1,000 a second.
    let s = Server::start(&["--accept-rate", "1000", "--accept-burst", "1000"]).await;
    let ack = s.publish("t", &json!({"n": 0})).await;
    let position = format!("{}:1", ack["epoch"].as_str().expect("epoch"));
    let mut before = Vec::new();
    for _ in 0..5 {
        let mut ws = s.ws("/v1/topics/t/ws").await;
        next_json(&mut ws).await;
        before.push(ws);
    }
    // The storm: 4,000 new readers and 1,000 resuming ones, all at once.
    let started = Instant::now();
    let mut attempts = Vec::new();
    for i in 0..5000 {
        let url = if i % 5 == 0 {
            s.ws_url(&format!("/v1/topics/t/ws?since={position}"))
        } else {
            s.ws_url("/v1/topics/t/ws")
        };
        attempts.push(tokio::spawn(async move { (i % 5 == 0, try_ws(url).await) }));
    }
    let mut admitted = Vec::new();
    let (mut resuming_in, mut resuming_all, mut new_in, mut new_all) = (0, 0, 0, 0);
    for attempt in attempts {
        let (resuming, ws) = attempt.await.expect("join");
        if resuming {
            resuming_all += 1;
            resuming_in += usize::from(ws.is_some());
        } else {
            new_all += 1;
            new_in += usize::from(ws.is_some());
        }
        admitted.extend(ws);
    }
    eprintln!(
        "storm: {new_in}/{new_all} new and {resuming_in}/{resuming_all} resuming readers admitted in {:?}",
        started.elapsed()
    );
    assert!(new_in < new_all, "the storm was throttled ({new_in} of {new_all} new readers admitted)");
    let resuming_share = resuming_in as f64 / resuming_all as f64;
    let new_share = new_in as f64 / new_all as f64;
    assert!(resuming_share > new_share, "resuming readers first: {resuming_share:.2} vs {new_share:.2}");

    // Readers from before the storm and every admitted one keep receiving.
    s.publish("t", &json!({"n": 1})).await;
    for ws in before.iter_mut().chain(admitted.iter_mut()) {
        loop {
            let frame = next_json(ws).await;
            if frame["state"]["n"] == 1 {
                break;
            }
        }
    }
    let refused = s.metric("spillway_subscriptions_total{result=\"refused\",reason=\"accept_rate\"}").await;
    assert_eq!(refused as usize, (new_all - new_in) + (resuming_all - resuming_in));
}

#[tokio::test]
async fn event_streams_turned_away_get_200_a_retry_hint_and_a_notice() {
    let s = Server::start(&["--max-connections", "1"]).await;
    s.publish("t", &json!({})).await;
    let mut first = Sse::open(&s, "/v1/topics/t/events", &[]).await;
    first.next_state().await;
    let mut second = Sse::open(&s, "/v1/topics/t/events", &[]).await;
    assert_eq!(second.status, 200, "never a 5xx for EventSource");
    let notice = second.next_within(Duration::from_secs(5)).await.expect("notice");
    assert!(notice.retry.is_some());
    assert_eq!((notice.json()["type"].as_str(), notice.json()["reason"].as_str()), (Some("notice"), Some("overload")));
    assert!(second.next_within(Duration::from_secs(2)).await.is_none(), "then the stream ends");
    let r = s.http.get(s.url("/v1/topics/t/ws")).send().await.expect("get");
    assert_eq!(r.status(), 426, "a plain GET is not a subscription and is not throttled");
}

#[tokio::test]
async fn a_drain_spreads_readers_over_the_window_and_exits_in_time() {
    let mut s = Server::start(&["--drain-window", "3s"]).await;
    s.publish("t", &json!({})).await;
    let mut readers = Vec::new();
    for _ in 0..40 {
        let mut ws = s.ws("/v1/topics/t/ws").await;
        next_json(&mut ws).await;
        readers.push(ws);
    }
    let ready = s.http.get(s.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
    let started = Instant::now();
    s.signal("TERM");
    let mut moments = Vec::new();
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut notice = false;
                while let Some(Ok(message)) = ws.next().await {
                    match message {
                        Message::Text(t) if t.contains("\"notice\"") => notice = true,
                        Message::Close(frame) => return (notice, frame.map(|f| u16::from(f.code)), Instant::now()),
                        _ => {}
                    }
                }
                (notice, None, Instant::now())
            })
        })
        .collect();
    for task in tasks {
        let (notice, code, at) = task.await.expect("join");
        assert!(notice, "a notice before the close");
        assert_eq!(code, Some(1001));
        moments.push(at.duration_since(started).as_secs_f64());
    }
    moments.sort_by(f64::total_cmp);
    let spread = moments[moments.len() - 1] - moments[0];
    assert!(spread > 1.5, "closes spread over the window: {moments:?}");
    // Roughly uniform: each third of the window holds a fair share.
    for third in 0..3 {
        let (lo, hi) = (f64::from(third), f64::from(third + 1));
        let count = moments.iter().filter(|m| **m >= lo && **m < hi).count();
        assert!(count >= 5, "third {third} holds only {count} of 40: {moments:?}");
    }
    assert!(s.wait_exit(Duration::from_secs(12)).is_some(), "exits within the window plus grace");
}

#[tokio::test]
async fn the_topic_limit_refuses_one_topic_too_many() {
    let s = Server::start(&["--max-topics", "2"]).await;
    s.publish("a", &json!({})).await;
    s.publish("b", &json!({})).await;
    let (status, body) = s.put("c", &json!({})).await;
    assert_eq!((status, body["error"].as_str()), (507, Some("topic_limit")));
    assert_eq!(s.get("c").await.0, 404, "nothing was created");
    s.publish("a", &json!({"still": "writable"})).await;
}

#[tokio::test]
async fn a_reader_that_stays_behind_is_cut_off_as_stale() {
    let s = Server::start(&["--max-staleness", "1s", "--write-timeout", "30s"]).await;
    s.publish("t", &json!({"n": 0})).await;
    let stream = crate::harness::small_buffer_stream(&s);
    let (mut slow, _) = tokio_tungstenite::client_async(s.ws_url("/v1/topics/t/ws"), stream).await.expect("ws");
    let publisher = tokio::spawn({
        let http = s.http.clone();
        let url = s.url("/v1/topics/t");
        async move {
            // As fast as the server acknowledges: always ahead of the reader.
            for n in 1..=5000 {
                let body = json!({"n": n, "pad": "x".repeat(4000)}).to_string();
                let sent = http
                    .put(&url)
                    .bearer_auth(crate::harness::TOKEN)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                if sent.is_err() {
                    return;
                }
            }
        }
    });
    // A reader that keeps reading, but slowly: one frame every 500 ms.
    let started = Instant::now();
    let code = loop {
        assert!(started.elapsed() < Duration::from_secs(60), "never cut off");
        match tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => tokio::time::sleep(Duration::from_millis(500)).await,
            other => panic!("unexpected: {other:?}"),
        }
    };
    assert_eq!(code, Some(4003));
    assert_eq!(s.metric("spillway_cutoffs_total{reason=\"stale\"}").await, 1.0);
    publisher.abort();
}
