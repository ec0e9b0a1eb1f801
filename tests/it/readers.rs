//! WebSocket readers: ordering, `since`, deletion, heartbeats, cut-offs for
//! bad client data and lost heartbeats, shared encodings, and shutdown.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Server, expect_close, next_json, next_json_within, send_text};

#[tokio::test]
async fn publish_then_subscribe_and_subscribe_then_publish() {
    let s = Server::start(&[]).await;
    s.publish("t", &json!({"n": 1})).await;
    let mut late = s.ws("/v1/topics/t/ws").await;
    let first = next_json(&mut late).await;
    assert_eq!((first["type"].as_str(), first["version"].as_u64()), (Some("snapshot"), Some(1)));
    assert_eq!(first["state"], json!({"n": 1}));
    assert_eq!(first["skipped"], 0);
    assert!(first["updated_at"].is_string());

    let mut early = s.ws("/v1/topics/fresh/ws").await;
    assert!(
        next_json_within(&mut early, Duration::from_millis(300)).await.is_none(),
        "nothing before the topic exists"
    );
    s.publish("fresh", &json!({"hello": "world"})).await;
    let got = next_json(&mut early).await;
    assert_eq!((got["topic"].as_str(), got["version"].as_u64()), (Some("fresh"), Some(1)));

    s.publish("t", &json!({"n": 2})).await;
    assert_eq!(next_json(&mut late).await["state"]["n"], 2);
}

#[tokio::test]
async fn versions_strictly_increase_for_every_reader() {
    let s = Server::start(&[]).await;
    s.publish("t", &json!({"n": 0})).await;
    let mut readers = Vec::new();
    for _ in 0..5 {
        readers.push(s.ws("/v1/topics/t/ws").await);
    }
    for n in 1..=200 {
        s.publish("t", &json!({"n": n})).await;
    }
    for ws in &mut readers {
        let mut last = 0;
        loop {
            let frame = next_json(ws).await;
            let version = frame["version"].as_u64().expect("version");
            assert!(version > last, "version went from {last} to {version}");
            last = version;
            if frame["state"]["n"] == 200 {
                break;
            }
        }
    }
}

#[tokio::test]
async fn since_already_current_resends_nothing() {
    let s = Server::start(&[]).await;
    let ack = s.publish("t", &json!({"n": 1})).await;
    let position = format!("{}:{}", ack["epoch"].as_str().expect("epoch"), 1);
    let mut ws = s.ws(&format!("/v1/topics/t/ws?since={position}")).await;
    assert!(next_json_within(&mut ws, Duration::from_millis(500)).await.is_none(), "nothing resent");
    s.publish("t", &json!({"n": 2})).await;
    let frame = next_json(&mut ws).await;
    assert_eq!((frame["version"].as_u64(), frame["skipped"].as_u64()), (Some(2), Some(0)));

    // A version ahead of the hub's (a client coming from a hub further along)
    // waits for a newer one; another epoch gets the newest snapshot.
    let ahead = format!("{}:{}", ack["epoch"].as_str().expect("epoch"), 50);
    let mut ws = s.ws(&format!("/v1/topics/t/ws?since={ahead}")).await;
    assert!(next_json_within(&mut ws, Duration::from_millis(300)).await.is_none());
    let mut other = s.ws("/v1/topics/t/ws?since=0123456789abcdef:9").await;
    assert_eq!(next_json(&mut other).await["version"], 2);

    let (status, body) = {
        let r = s.http.get(s.url("/v1/topics/t/ws?since=garbage")).send().await.expect("get");
        crate::harness::status_json(r).await
    };
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_since")));
}

#[tokio::test]
async fn deletion_is_announced_then_closes_and_recreation_is_a_new_epoch() {
    let s = Server::start(&[]).await;
    let first = s.publish("t", &json!({"n": 1})).await;
    let mut ws = s.ws("/v1/topics/t/ws").await;
    next_json(&mut ws).await;
    let del = s.http.delete(s.url("/v1/topics/t")).bearer_auth(crate::harness::TOKEN).send().await.expect("delete");
    assert_eq!(del.status(), 200);
    let frame = next_json(&mut ws).await;
    assert_eq!((frame["type"].as_str(), frame["topic"].as_str()), (Some("deleted"), Some("t")));
    let (code, reason) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, 4000);
    let hint: Value = serde_json::from_str(&reason).expect("reason is JSON");
    assert!(hint["retry_after_ms"].as_u64().is_some());

    // A new reader waits through the deletion for the topic to come back.
    let mut waiting = s.ws("/v1/topics/t/ws").await;
    assert!(next_json_within(&mut waiting, Duration::from_millis(300)).await.is_none());
    let again = s.publish("t", &json!({"n": 2})).await;
    let frame = next_json(&mut waiting).await;
    assert_eq!(frame["version"], 3);
    assert_ne!(frame["epoch"], first["epoch"]);
    assert_eq!(frame["epoch"], again["epoch"]);
}

#[tokio::test]
async fn idle_connections_get_heartbeats() {
    let s = Server::start(&["--heartbeat", "200ms"]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url("/v1/topics/quiet/ws")).await.expect("connect");
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["heartbeat_ms"], 200);
    let mut heartbeats = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while heartbeats < 3 && tokio::time::Instant::now() < deadline {
        use futures_util::StreamExt;
        if let Some(Ok(Message::Text(t))) = ws.next().await
            && t.contains("\"heartbeat\"")
        {
            heartbeats += 1;
        }
    }
    assert_eq!(heartbeats, 3);
}

#[tokio::test]
async fn client_data_the_protocol_does_not_define_closes_the_connection() {
    let s = Server::start(&[]).await;
    let mut ws = s.ws("/v1/topics/t/ws").await;
    send_text(&mut ws, "hello?").await;
    let error = next_json(&mut ws).await;
    assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("error"), Some("unexpected_message")));
    let (code, reason) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("retry_after_ms"));

    let mut ws = s.ws("/v1/topics/t/ws").await;
    ws.send(Message::text("x".repeat(5000))).await.expect("send");
    let (code, _) = expect_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, 1009, "a frame over 4 KiB closes with 1009");
    assert_eq!(s.metric("spillway_cutoffs_total{reason=\"policy\"}").await, 1.0);
    assert_eq!(s.metric("spillway_cutoffs_total{reason=\"too_big\"}").await, 1.0);
}

#[tokio::test]
async fn unanswered_pings_cut_the_reader_off() {
    let s = Server::start(&["--heartbeat", "200ms", "--write-timeout", "30s"]).await;
    // A raw client that completes the handshake, then never reads or writes,
    // so it never answers a ping.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.expect("tcp");
    let request = format!(
        "GET /v1/topics/t/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        s.addr
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.expect("read");
    assert_eq!(&head, b"HTTP/1.1 101");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.metric("spillway_cutoffs_total{reason=\"heartbeat_lost\"}").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "no heartbeat cut-off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn plain_get_on_the_websocket_endpoint_says_upgrade_required() {
    let s = Server::start(&[]).await;
    let r = s.http.get(s.url("/v1/topics/t/ws")).send().await.expect("get");
    let (status, body) = crate::harness::status_json(r).await;
    assert_eq!((status, body["error"].as_str()), (426, Some("upgrade_required")));
}

#[tokio::test]
async fn encodings_do_not_grow_with_readers() {
    let s = Server::start(&[]).await;
    s.publish("t", &json!({"n": 0})).await;
    let mut readers = Vec::new();
    for _ in 0..40 {
        readers.push(s.ws("/v1/topics/t/ws").await);
    }
    for ws in &mut readers {
        next_json(ws).await;
    }
    let before = s.metric("spillway_encodings_total{wire=\"ws\"}").await;
    for n in 1..=10 {
        s.publish("t", &json!({"n": n})).await;
        for ws in &mut readers {
            loop {
                if next_json(ws).await["state"]["n"] == n {
                    break;
                }
            }
        }
    }
    let built = s.metric("spillway_encodings_total{wire=\"ws\"}").await - before;
    assert_eq!(built, 10.0, "one encoding per version for 40 readers");
    assert!(s.metric("spillway_deliveries_total").await >= 40.0 * 10.0);
}

#[tokio::test]
async fn shutdown_tells_readers_and_exits_in_bounded_time() {
    let mut s = Server::start(&[]).await;
    s.publish("t", &json!({"n": 1})).await;
    let mut readers = Vec::new();
    for _ in 0..10 {
        let mut ws = s.ws("/v1/topics/t/ws").await;
        next_json(&mut ws).await;
        readers.push(ws);
    }
    s.signal("TERM");
    let mut hints = Vec::new();
    for ws in &mut readers {
        let (code, reason) = expect_close(ws, Duration::from_secs(10)).await;
        assert_eq!(code, 1001);
        let hint: Value = serde_json::from_str(&reason).expect("reason is JSON");
        hints.push(hint["retry_after_ms"].as_u64().expect("hint"));
    }
    hints.sort_unstable();
    hints.dedup();
    assert!(hints.len() > 1, "hints are jittered per connection: {hints:?}");
    let status = s.wait_exit(Duration::from_secs(10)).expect("exited within the bound");
    assert!(status.success(), "clean exit: {status:?}");
}
