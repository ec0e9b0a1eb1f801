//! The memory guard, readiness and the figures operators watch: stalled
//! readers are cut off stalest first until the send budget holds; `/readyz`
//! is unready while the store is out of reach at start and while draining,
//! and stays ready through a bus outage; the latency histograms move.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Server, next_json};
use crate::services::{Database, POSTGRES, Proxy, REDIS, available, unique};

/// A WebSocket client with a 4 KiB receive buffer: when it stops reading,
/// the server's frame stays in the server's own buffers.
async fn stalling_client(server: &Server, path: &str) -> WebSocketStream<TcpStream> {
    let stream = crate::harness::small_buffer_stream(server);
    let (ws, _) = tokio_tungstenite::client_async(server.ws_url(path), stream).await.expect("handshake");
    ws
}

/// How a stalled reader's connection turned out once it read again.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// It received its big state and stayed connected.
    Kept,
    /// It was closed with this code (4004 from the memory guard), or ended
    /// without a close frame (`None`) when the grace ran out first.
    Cut(Option<u16>),
}

async fn fate(mut ws: WebSocketStream<TcpStream>) -> Fate {
    // A cut reader that reads within its close grace first receives the rest
    // of its stuck frame, then the close; a kept one stays open afterwards.
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut got_state = false;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) if got_state => return Fate::Kept,
            Err(_) => panic!("the reader neither got its state nor was closed"),
            Ok(Some(Ok(Message::Text(text)))) if text.contains("\"snapshot\"") => {
                got_state = true;
                deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            }
            Ok(Some(Ok(Message::Close(frame)))) => return Fate::Cut(frame.map(|f| u16::from(f.code))),
            Ok(None | Some(Err(_))) => return Fate::Cut(None),
            Ok(Some(Ok(_))) => {}
        }
    }
}

#[tokio::test]
async fn over_the_send_budget_the_stalest_readers_are_cut_first_and_the_budget_holds() {
    // A 1 MiB budget (low-water mark 800 KiB) and five readers, each stuck
    // on a 300 kB state of its own topic, stalled a third of a second apart.
    let s = Server::start(&[
        "--send-budget",
        "1MiB",
        "--max-body",
        "1MiB",
        "--write-timeout",
        "60s",
        "--max-staleness",
        "600s",
    ])
    .await;
    let mut readers = Vec::new();
    for i in 0..5 {
        let mut ws = stalling_client(&s, &format!("/v1/topics/big{i}/ws")).await;
        let hello = ws.next().await.expect("hello").expect("ok");
        assert!(hello.to_text().expect("text").contains("\"hello\""));
        readers.push(ws);
    }
    let big = json!({ "pad": "x".repeat(300_000) });
    for i in 0..5 {
        s.publish(&format!("big{i}"), &big).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The guard looks ten times a second.
    let mut cut = 0.0;
    for _ in 0..50 {
        cut = s.metric("spillway_cutoffs_total{reason=\"memory\"}").await;
        if cut > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cut >= 1.0, "the guard cut someone off");
    // Everyone reads again; the cut ones are within their close grace.
    let fates: Vec<Fate> = futures_util::future::join_all(readers.into_iter().map(fate)).await;
    let first_kept = fates.iter().position(|f| *f == Fate::Kept).expect("the newest stalled readers were kept");
    assert!(first_kept >= 1, "someone was cut: {fates:?}");
    assert!(
        fates[first_kept..].iter().all(|f| *f == Fate::Kept),
        "only the stalest were cut, in the order they stalled: {fates:?}"
    );
    assert!(fates[..first_kept].contains(&Fate::Cut(Some(4004))), "a cut reader that reads gets 4004: {fates:?}");
    assert_eq!(s.metric("spillway_cutoffs_total{reason=\"memory\"}").await, first_kept as f64);
    let in_flight = s.metric("spillway_bytes_in_flight").await;
    assert!(in_flight <= 1024.0 * 1024.0, "the budget holds: {in_flight} bytes in flight");
}

#[tokio::test]
async fn the_latency_histograms_and_the_in_flight_gauge_move() {
    let s = Server::start(&[]).await;
    assert_eq!(s.metric("spillway_publish_latency_seconds_count").await, 0.0);
    let mut ws = s.ws("/v1/topics/h/ws").await;
    s.publish("h", &json!({"n": 1})).await;
    assert_eq!(next_json(&mut ws).await["type"], "snapshot");
    assert_eq!(s.metric("spillway_publish_latency_seconds_count").await, 1.0);
    // The lag is observed once the socket has taken the frame.
    let mut lag = 0.0;
    for _ in 0..50 {
        lag = s.metric("spillway_delivery_lag_seconds_count").await;
        if lag >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lag, 1.0);
    assert_eq!(s.metric("spillway_publish_latency_seconds_bucket{le=\"+Inf\"}").await, 1.0);
    assert_eq!(s.metric("spillway_bytes_in_flight").await, 0.0, "nothing is stuck");
    assert_eq!(s.metric("spillway_out_of_descriptors_total").await, 0.0);
}

#[tokio::test]
async fn memory_flags_are_checked() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["--listen", "127.0.0.1:0", "--memory-limit", "1MiB"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--memory-limit must be 0 (off) or at least 32 MiB"));
}

#[tokio::test]
async fn readiness_waits_for_the_store_survives_a_bus_outage_and_ends_with_the_drain() {
    if !available("readiness").await {
        return;
    }
    let name = unique("ready");
    let db = Database::create(&name).await;
    let pg = Proxy::start(POSTGRES).await;
    let redis = Proxy::start(REDIS).await;
    pg.cut();
    let database_url = db.url_via(&pg.addr.to_string());
    let redis_url = format!("redis://{}", redis.addr);
    let mut s = Server::start_unready(&[
        "--database-url",
        &database_url,
        "--redis-url",
        &redis_url,
        "--redis-prefix",
        &name,
        "--hub-id",
        "ready",
        "--drain-window",
        "3s",
    ])
    .await;
    // The database is out of reach: alive, not ready, and requests are
    // turned away with a hint rather than answered from an empty hub.
    let ready = s.http.get(s.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["reason"], "starting");
    let health = s.http.get(s.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status(), 200);
    let read = s.http.get(s.url("/v1/topics/t")).send().await.expect("get");
    assert_eq!(read.status(), 503);
    assert!(read.headers().contains_key("retry-after"));
    // Once the database is back, the hub loads and becomes ready.
    pg.restore();
    let mut ready_now = false;
    for _ in 0..100 {
        if let Ok(r) = s.http.get(s.url("/readyz")).send().await
            && r.status() == 200
        {
            ready_now = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready_now, "ready once the store is loaded");
    s.publish("t", &json!({"n": 1})).await;
    // A bus outage is ridden out: the hub stays ready.
    redis.cut();
    let mut reconnecting = false;
    for _ in 0..50 {
        let health: serde_json::Value =
            s.http.get(s.url("/healthz")).send().await.expect("healthz").json().await.expect("json");
        if health["bus"] == "reconnecting" {
            reconnecting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reconnecting, "the bus outage is visible in /healthz");
    assert_eq!(s.http.get(s.url("/readyz")).send().await.expect("readyz").status(), 200);
    redis.restore();
    // While draining, /readyz says so and a snapshot read is still served.
    let mut ws = s.ws("/v1/topics/t/ws").await;
    next_json(&mut ws).await;
    s.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let draining = s.http.get(s.url("/readyz")).send().await.expect("readyz while draining");
    assert_eq!(draining.status(), 503);
    let body: serde_json::Value = draining.json().await.expect("json");
    assert_eq!(body["reason"], "draining");
    let (status, _) = s.get("t").await;
    assert_eq!(status, 200, "snapshot reads are served during the drain");
    let refused = s.http.get(s.url("/v1/topics/t/events")).send().await.expect("sse");
    assert_eq!(refused.status(), 200, "EventSource gets a hint, not an error");
    assert!(refused.text().await.expect("body").contains("draining"));
    assert!(s.wait_exit(Duration::from_secs(15)).is_some(), "exits after the window plus grace");
}

#[tokio::test]
async fn an_event_stream_that_stays_behind_is_cut_off_as_stale() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start(&["--max-staleness", "500ms", "--max-body", "1MiB"]).await;
    s.publish("s", &json!({"n": 0})).await;
    // A reader on a slow link: a small receive buffer, read a little at a time.
    let mut stream = crate::harness::small_buffer_stream(&s);
    stream
        .write_all(b"GET /v1/topics/s/events HTTP/1.1\r\nhost: test\r\naccept: text/event-stream\r\n\r\n")
        .await
        .expect("request");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (http, url, stop) = (s.http.clone(), s.url("/v1/topics/s"), std::sync::Arc::clone(&stop));
        tokio::spawn(async move {
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 2000 {
                let body = json!({ "n": n, "pad": "x".repeat(20_000) }).to_string();
                let _ = http
                    .put(&url)
                    .bearer_auth(crate::harness::TOKEN)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let ended = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.windows(16).any(|w| w == br#""reason":"stale""#) {
            break true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.await.expect("publisher");
    assert!(ended, "the stream ended");
    assert!(seen.windows(16).any(|w| w == br#""reason":"stale""#), "with a stale notice and a hint");
    assert!(s.metric("spillway_cutoffs_total{reason=\"stale\"}").await >= 1.0);
}

#[tokio::test]
async fn a_client_that_resets_its_connection_is_not_counted_as_a_cut_off() {
    let s = Server::start(&[]).await;
    s.publish("r", &json!({"n": 0})).await;
    let stream = TcpStream::connect(s.addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(s.ws_url("/v1/topics/r/ws"), stream).await.expect("handshake");
    ws.next().await.expect("hello").expect("ok");
    ws.next().await.expect("snapshot").expect("ok");
    // Vanish with a reset, as a phone losing its network or a killed tab can.
    let socket = socket2::SockRef::from(ws.get_ref());
    socket.set_linger(Some(Duration::ZERO)).expect("linger");
    drop(ws);
    for _ in 0..100 {
        if s.metric("spillway_connections{transport=\"ws\"}").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.metric("spillway_connections{transport=\"ws\"}").await, 0.0);
    assert_eq!(s.metric("spillway_cutoffs_total{reason=\"socket_error\"}").await, 0.0, "the client left; no cut-off");
}
