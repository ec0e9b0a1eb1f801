//! The reason spillway exists: a reader who cannot keep up skips versions,
//! holds at most one frame, and is cut off when it stops reading, while the
//! kernel is kept from hoarding on its behalf.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Server, next_json};

/// A WebSocket client whose socket has a small receive buffer, so that when
/// it stops reading the server's writes back up quickly.
async fn small_buffer_client(server: &Server, path: &str) -> (WebSocketStream<TcpStream>, SocketAddr) {
    let stream = crate::harness::small_buffer_stream(server);
    let local = stream.local_addr().expect("local");
    let (ws, _) = tokio_tungstenite::client_async(server.ws_url(path), stream).await.expect("handshake");
    (ws, local)
}

/// The server-side socket's memory for the connection from `client`, from
/// `ss -tmn`: (effective send buffer `tb`, bytes pinned `w` + `t`).
fn server_socket_memory(server: SocketAddr, client: SocketAddr) -> Option<(u64, u64)> {
    let output = std::process::Command::new("ss")
        .args(["-tmnH", "state", "established"])
        .arg(format!("( sport = :{} and dport = :{} )", server.port(), client.port()))
        .output()
        .expect("ss is installed (iproute2)");
    let text = String::from_utf8_lossy(&output.stdout);
    let skmem = text.split("skmem:(").nth(1)?.split(')').next()?;
    let field = |name: &str| {
        skmem.split(',').find_map(|f| {
            f.strip_prefix(name)
                .filter(|rest| rest.chars().all(|c| c.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
        })
    };
    Some((field("tb")?, field("w")? + field("t")?))
}

fn state_1k(n: u64) -> Value {
    json!({ "n": n, "pad": "x".repeat(1000) })
}

#[tokio::test]
async fn a_slow_reader_skips_to_the_newest_with_at_most_one_frame_pending() {
    let s = Server::start(&["--write-timeout", "60s"]).await;
    s.publish("t", &state_1k(0)).await;
    let (mut slow, _) = small_buffer_client(&s, "/v1/topics/t/ws").await;
    // hello and the first snapshot.
    for _ in 0..2 {
        slow.next().await.expect("frame").expect("ok");
    }
    // The reader stops reading while thousands of 1 KiB states are published.
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let http = s.http.clone();
            let url = s.url("/v1/topics/t");
            tokio::spawn(async move {
                for i in 0..500u64 {
                    let n = 1 + p * 500 + i;
                    let r = http
                        .put(&url)
                        .bearer_auth(crate::harness::TOKEN)
                        .header("content-type", "application/json")
                        .body(state_1k(n).to_string())
                        .send()
                        .await
                        .expect("put");
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.expect("publisher");
    }
    let (_, now) = s.get("t").await;
    let final_version = now["version"].as_u64().expect("version");
    assert_eq!(final_version, 2001);

    // It reads again: within a few frames it is on the final version.
    let started = Instant::now();
    let mut frames = 0;
    let mut skipped_total = 0;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("prompt")
            .expect("open")
            .expect("ok");
        let Message::Text(text) = message else { continue };
        let frame: Value = serde_json::from_str(&text).expect("json");
        if frame["type"] != "snapshot" {
            continue;
        }
        frames += 1;
        skipped_total += frame["skipped"].as_u64().expect("skipped");
        if frame["version"] == final_version {
            break;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5), "caught up promptly");
    assert!(frames <= 60, "caught up in {frames} frames, not a replay of 2000");
    assert!(skipped_total > 1900, "the frames say what was skipped: {skipped_total}");

    let connections = s.connections().await;
    assert!(!connections.is_empty());
    for c in &connections {
        assert!(c["pending_state_frames_max"].as_u64().expect("hwm") <= 1, "{c}");
    }
    assert!(s.metric("spillway_connection_pending_state_frames_max").await <= 1.0);
    assert!(s.metric("spillway_versions_skipped_total").await >= 1900.0);
}

#[tokio::test]
async fn a_reader_that_never_reads_is_cut_off_while_a_fast_one_keeps_receiving() {
    let s = Server::start(&["--write-timeout", "2s"]).await;
    s.publish("t", &state_1k(0)).await;
    let (stalled, stalled_addr) = small_buffer_client(&s, "/v1/topics/t/ws").await;
    let mut fast = s.ws("/v1/topics/t/ws").await;
    next_json(&mut fast).await;

    let started = Instant::now();
    let mut n = 0u64;
    let mut worst_pinned = 0u64;
    let mut cut_at = None;
    while started.elapsed() < Duration::from_secs(20) {
        n += 1;
        s.publish("t", &state_1k(n)).await;
        // The fast reader gets every one of these (it reads as fast as we publish).
        loop {
            let frame = next_json(&mut fast).await;
            if frame["state"]["n"] == n {
                break;
            }
        }
        match server_socket_memory(s.addr, stalled_addr) {
            Some((tb, pinned)) => {
                assert!(tb <= 64 * 1024, "effective send buffer {tb} exceeds the clamp");
                worst_pinned = worst_pinned.max(pinned);
            }
            None if cut_at.is_none() && n > 5 => cut_at = Some(started.elapsed()),
            None => {}
        }
        if cut_at.is_some() && s.metric("spillway_cutoffs_total{reason=\"write_stall\"}").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cut_at = cut_at.expect("the stalled reader's socket was closed");
    // Filling the socket takes a moment, then the 2 s write timeout and the
    // 1 s grace run; the bound is generous because CI machines are shared.
    assert!(cut_at < Duration::from_secs(10), "cut off within write timeout plus grace: {cut_at:?}");
    assert!(worst_pinned <= 64 * 1024, "stalled socket pinned {worst_pinned} bytes");
    assert!(worst_pinned > 0, "the test did fill the stalled socket");
    assert_eq!(s.metric("spillway_cutoffs_total{reason=\"write_stall\"}").await, 1.0);
    drop(stalled);
}

#[tokio::test]
async fn a_stalled_event_stream_is_held_to_one_event_and_cut_off() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start(&["--write-timeout", "2s"]).await;
    s.publish("t", &state_1k(0)).await;
    // A raw HTTP client with a small receive buffer that asks for the stream
    // and then never reads.
    let mut stalled = crate::harness::small_buffer_stream(&s);
    let local = stalled.local_addr().expect("local");
    let request = format!("GET /v1/topics/t/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n", s.addr);
    stalled.write_all(request.as_bytes()).await.expect("request");

    let started = Instant::now();
    let mut worst_pinned = 0;
    let mut cut_at = None;
    for n in 1..400u64 {
        s.publish("t", &state_1k(n)).await;
        match server_socket_memory(s.addr, local) {
            Some((tb, pinned)) => {
                assert!(tb <= 64 * 1024, "effective send buffer {tb} exceeds the clamp");
                worst_pinned = worst_pinned.max(pinned);
            }
            None => {
                cut_at = Some(started.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cut_at = cut_at.expect("the stalled stream was cut off");
    assert!(cut_at < Duration::from_secs(10), "cut off within write timeout plus grace: {cut_at:?}");
    assert!(worst_pinned > 0 && worst_pinned <= 64 * 1024, "pinned {worst_pinned} bytes");
    assert_eq!(s.metric("spillway_cutoffs_total{reason=\"write_stall\"}").await, 1.0);
    for c in s.connections().await {
        assert!(c["pending_state_frames_max"].as_u64().expect("hwm") <= 1, "{c}");
    }
}
