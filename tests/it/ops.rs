//! Operations: the accept loop's defences (slow request heads, oversized
//! headers) and the `spillway healthcheck` subcommand.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::Server;

/// Reads what the server sends until it closes the connection, or `None` if
/// it is still open after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(received),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// The server still answers an ordinary request.
async fn still_serving(server: &Server) {
    let (status, body) = server.get("ops").await;
    assert_eq!(status, 200, "normal requests keep working: {body}");
}

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let server = Server::start(&["--header-timeout", "1s"]).await;
    server.publish("ops", &json!({ "n": 1 })).await;

    // A slowloris: a valid request head, one byte every 200 ms, which would
    // take about 12 s in all.
    let mut slow = TcpStream::connect(server.addr).await.expect("connect");
    let head = format!("GET /v1/topics/ops HTTP/1.1\r\nHost: {}\r\nX-Slow: yes\r\n\r\n", server.addr);
    let started = Instant::now();
    let mut cut_off = false;
    for byte in head.bytes() {
        if slow.write_all(&[byte]).await.is_err() {
            cut_off = true;
            break;
        }
        // Whatever the server sends (nothing, or a 408) must be followed by
        // the end of the connection.
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => {
                cut_off = true;
                break;
            }
            Ok(Ok(n)) => {
                let answer = String::from_utf8_lossy(&buf[..n]);
                assert!(answer.starts_with("HTTP/1.1 408"), "only a 408 may answer a slow head: {answer}");
            }
        }
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let elapsed = started.elapsed();
    assert!(cut_off, "a head trickled over {elapsed:?} was not cut off");
    assert!(elapsed < Duration::from_secs(5), "cut off only after {elapsed:?}");

    // A client that connects and says nothing is closed too.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let closed = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a silent connection stayed open");

    still_serving(&server).await;
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let server = Server::start(&[]).await;
    server.publish("ops", &json!({ "n": 1 })).await;

    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let filler = "a".repeat(70 * 1024);
    let head = format!("GET /v1/topics/ops HTTP/1.1\r\nHost: {}\r\nX-Filler: {filler}\r\n\r\n", server.addr);
    // The server may close before it has read everything; that is an answer too.
    let _ = stream.write_all(head.as_bytes()).await;
    let received = read_until_closed(&mut stream, Duration::from_secs(5)).await.expect("connection closed");
    let answer = String::from_utf8_lossy(&received);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "a 70 KiB head is refused: {answer}");

    // Headers just under the limit are fine.
    let filler = "a".repeat(32 * 1024);
    let response = server.http.get(server.url("/v1/topics/ops")).header("x-filler", filler).send().await.expect("get");
    assert_eq!(response.status(), 200);

    still_serving(&server).await;
}

/// Runs `spillway --listen ADDR healthcheck` and returns its exit code and output.
async fn healthcheck(listen: &str) -> (Option<i32>, String) {
    let listen = listen.to_string();
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(["--listen", &listen, "healthcheck"])
            .env_remove("SPILLWAY_LISTEN")
            .output()
            .expect("run healthcheck");
        (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn healthcheck_reports_the_server() {
    let server = Server::start(&[]).await;
    let (code, output) = healthcheck(&server.addr.to_string()).await;
    assert_eq!(code, Some(0), "healthy server: {output}");
    assert!(output.starts_with("healthy"), "{output}");
    assert_eq!(output.lines().count(), 1, "one line: {output}");

    // A port nobody listens on: bind one, note it, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let started = Instant::now();
    let (code, output) = healthcheck(&closed.to_string()).await;
    assert_eq!(code, Some(1), "closed port: {output}");
    assert!(output.starts_with("unhealthy"), "{output}");
    assert!(started.elapsed() < Duration::from_secs(5), "the check is bounded");
}

/// A server whose open-files limit is tiny (through `prlimit`), so a test
/// can run it out of descriptors. Killed on drop.
struct Starved {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Starved {
    /// `None` when `prlimit` (util-linux) is not installed.
    fn start(max_files: u32) -> Option<Starved> {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().expect("tempdir");
        let limit = format!("--nofile={max_files}:{max_files}");
        let mut child = Command::new("prlimit")
            .arg(limit)
            .arg(env!("CARGO_BIN_EXE_spillway"))
            .args(["--listen", "127.0.0.1:0", "--publish-token", crate::harness::TOKEN, "--header-timeout", "30s"])
            .arg("--data-dir")
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.trim().to_string());
                }
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            return None;
        };
        Some(Starved { child, addr: addr.parse().expect("address"), _dir: dir })
    }
}

impl Drop for Starved {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw request; the status code of the answer, if any came.
async fn raw_status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.ok()?.ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.split(' ').nth(1)?.parse().ok()
}

#[tokio::test]
async fn probes_answer_while_out_of_file_descriptors() {
    let Some(server) = Starved::start(64) else {
        eprintln!("skipped: prlimit is not available");
        return;
    };
    assert_eq!(raw_status(server.addr, "/healthz").await, Some(200));

    // Far more connections than the server has descriptors, each holding a
    // half-sent request so that it stays open.
    let mut hogs = Vec::new();
    for _ in 0..100 {
        let mut hog = TcpStream::connect(server.addr).await.expect("connect");
        hog.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        hogs.push(hog);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(raw_status(server.addr, "/healthz").await, Some(200), "/healthz answers from the reserve");
    assert_eq!(raw_status(server.addr, "/metrics").await, Some(200), "/metrics answers from the reserve");
    // Other paths get a 503 unless a descriptor happens to be free at that
    // moment (then they are served as usual), so only the probes are asserted.

    // Once the descriptors are back, everything is served again.
    drop(hogs);
    let deadline = Instant::now() + Duration::from_secs(10);
    while raw_status(server.addr, "/v1/topics").await != Some(200) {
        assert!(Instant::now() < deadline, "the server recovers once descriptors are free");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
