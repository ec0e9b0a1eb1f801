//! The test harness: runs the real `spillway` binary on port 0 with a fresh
//! data directory, finds its address in the log, and offers typed helpers.
//! The server is killed when the handle drops, so no test leaves a process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The token every test server accepts.
pub(crate) const TOKEN: &str = "test-token-0123456789";

/// A WebSocket client stream.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A running server process.
pub(crate) struct Server {
    child: Child,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    _dir: Option<Arc<tempfile::TempDir>>,
    /// Everything it logged, line by line.
    pub(crate) log: Arc<Mutex<Vec<String>>>,
    /// HTTP client for helpers.
    pub(crate) http: reqwest::Client,
}

impl Server {
    /// Starts a server on a fresh data directory with extra flags.
    pub(crate) async fn start(args: &[&str]) -> Server {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let mut server = Self::start_in(dir.path(), args).await;
        server._dir = Some(dir);
        server
    }

    /// Starts a server on `data_dir` (which the caller keeps).
    pub(crate) async fn start_in(data_dir: &Path, args: &[&str]) -> Server {
        Self::spawn(data_dir, args, "listening on ").await
    }

    /// Starts a server and returns as soon as its port is bound, before it
    /// has loaded the store (it is not ready yet).
    pub(crate) async fn start_unready(args: &[&str]) -> Server {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let mut server = Self::spawn(dir.path(), args, "bound ").await;
        server._dir = Some(dir);
        server
    }

    /// Spawns the binary and waits for the log line `marker ADDR`.
    async fn spawn(data_dir: &Path, args: &[&str], marker: &'static str) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spillway"));
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--publish-token")
            .arg(TOKEN)
            .args(args)
            .env("RUST_LOG", std::env::var("SPILLWAY_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("SPILLWAY_PUBLISH_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn spillway");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("SPILLWAY_TEST_ECHO").is_some() {
                        eprintln!("[server] {line}");
                    }
                    if let Some(rest) = line.split(marker).nth(1) {
                        let addr = rest.split(';').next().unwrap_or(rest);
                        let _ = tx.send(addr.trim().to_string());
                    }
                    log.lock().expect("log").push(line);
                }
            });
        }
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .expect("join")
            .unwrap_or_else(|_| panic!("server did not say `{marker}` within 60 s"));
        let addr: SocketAddr = addr.parse().expect("address in log");
        let http = reqwest::Client::builder().pool_max_idle_per_host(4).build().expect("client");
        Server { child, addr, _dir: None, log, http }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://ADDR{path}`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `ws://ADDR{path}`.
    pub(crate) fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// `PUT /v1/topics/{topic}` with the test token; returns status and body.
    pub(crate) async fn put(&self, topic: &str, state: &Value) -> (u16, Value) {
        let response = self
            .http
            .put(self.url(&format!("/v1/topics/{topic}")))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(state.to_string())
            .send()
            .await
            .expect("put");
        status_json(response).await
    }

    /// `PUT` that must succeed; returns the acknowledgement.
    pub(crate) async fn publish(&self, topic: &str, state: &Value) -> Value {
        let (status, body) = self.put(topic, state).await;
        assert_eq!(status, 200, "publish failed: {body}");
        body
    }

    /// `GET /v1/topics/{topic}`; returns status and body.
    pub(crate) async fn get(&self, topic: &str) -> (u16, Value) {
        let response = self.http.get(self.url(&format!("/v1/topics/{topic}"))).send().await.expect("get");
        status_json(response).await
    }

    /// Opens a WebSocket on `path` and returns it after reading the `hello`.
    pub(crate) async fn ws(&self, path: &str) -> Ws {
        let (mut ws, _) = tokio_tungstenite::connect_async(self.ws_url(path)).await.expect("ws connect");
        let hello = next_json(&mut ws).await;
        assert_eq!(hello["type"], "hello", "first frame is hello: {hello}");
        ws
    }

    /// The value of a metric series (exact name with labels), from `/metrics`.
    pub(crate) async fn metric(&self, series: &str) -> f64 {
        let text = self.http.get(self.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in /metrics"))
    }

    /// `/v1/connections`.
    pub(crate) async fn connections(&self) -> Vec<Value> {
        let body: Value = self
            .http
            .get(self.url("/v1/connections"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("connections")
            .json()
            .await
            .expect("json");
        body["connections"].as_array().cloned().unwrap_or_default()
    }

    /// Sends `signal` to the process.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Kills the process with SIGKILL and waits for it.
    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself, up to `limit`.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether a logged line contains `needle`.
    pub(crate) fn logged(&self, needle: &str) -> bool {
        self.log.lock().expect("log").iter().any(|l| l.contains(needle))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Status and JSON body (or `Null` when the body is empty or not JSON).
pub(crate) async fn status_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The next text frame as JSON, skipping pings and heartbeats; panics after
/// 10 s or if the stream ends.
pub(crate) async fn next_json(ws: &mut Ws) -> Value {
    next_json_within(ws, Duration::from_secs(10)).await.expect("a frame within 10 s")
}

/// The next text frame as JSON (heartbeats skipped), or `None` on timeout.
pub(crate) async fn next_json_within(ws: &mut Ws, limit: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next()).await.ok()?;
        match message {
            Some(Ok(Message::Text(text))) => {
                let value: Value = serde_json::from_str(&text).expect("frame is JSON");
                if value["type"] != "heartbeat" {
                    return Some(value);
                }
            }
            Some(Ok(Message::Close(frame))) => panic!("closed: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("ws error: {e}"),
            None => panic!("stream ended"),
        }
    }
}

/// Reads until a close frame arrives; returns its code and reason.
pub(crate) async fn expect_close(ws: &mut Ws, limit: Duration) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("no close frame within {limit:?}"),
            Ok(Some(Ok(Message::Close(Some(frame))))) => return (frame.code.into(), frame.reason.to_string()),
            Ok(Some(Ok(Message::Close(None)))) => return (1005, String::new()),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("ws error before close: {e}"),
            Ok(None) => panic!("stream ended without a close frame"),
        }
    }
}

/// Sends a text frame.
pub(crate) async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// One Server-Sent Event as a client sees it.
#[derive(Debug, Default, Clone)]
pub(crate) struct Event {
    pub(crate) id: Option<String>,
    pub(crate) data: Option<String>,
    pub(crate) retry: Option<u64>,
}

impl Event {
    /// The `data:` as JSON.
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().unwrap_or("null")).expect("data is JSON")
    }
}

/// A minimal SSE client over a streamed reqwest response.
pub(crate) struct Sse {
    pub(crate) response_headers: reqwest::header::HeaderMap,
    pub(crate) status: u16,
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Sse {
    /// Opens `path` with extra request headers.
    pub(crate) async fn open(server: &Server, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut request = server.http.get(server.url(path)).header("accept", "text/event-stream");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.expect("sse request");
        let status = response.status().as_u16();
        let response_headers = response.headers().clone();
        Sse { response_headers, status, body: Box::pin(response.bytes_stream()), buffer: String::new() }
    }

    /// The next event (comments skipped), `None` at the end of the stream or
    /// after `limit`.
    pub(crate) async fn next_within(&mut self, limit: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event::default();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("data: ") {
                        event.data = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        event.retry = v.parse().ok();
                    }
                }
                if event.data.is_some() || event.id.is_some() || event.retry.is_some() {
                    return Some(event);
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// The next event that is not a `hello` or a heartbeat; panics after 10 s.
    pub(crate) async fn next_state(&mut self) -> Event {
        loop {
            let event = self.next_within(Duration::from_secs(10)).await.expect("an event within 10 s");
            if !matches!(event.json()["type"].as_str(), Some("heartbeat" | "hello")) {
                return event;
            }
        }
    }
}

/// A TCP connection to `server` with a 4 KiB receive buffer, as a reader on a
/// slow or stalled link has: when it stops reading, the server's writes back
/// up after a few KiB instead of the megabytes loopback would otherwise take.
pub(crate) fn small_buffer_stream(server: &Server) -> tokio::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket.connect(&server.addr.into()).expect("connect");
    socket.set_nonblocking(true).expect("nonblocking");
    tokio::net::TcpStream::from_std(socket.into()).expect("tokio stream")
}
