//! Reader transports behind one interface: connect, then a stream of events.
//!
//! WebSocket goes through tungstenite. SSE and long-poll speak HTTP/1.1 by
//! hand over the same paced socket ([`Http`]): a reader only needs a request
//! line, a response head, and a chunked or sized body, and a hand-rolled
//! client keeps each connection as small as a browser's (no pool, no extra
//! task). An SSE `data:` line and a long-poll body are both a
//! [`Event::Frame`]; the frame parser in `frame.rs` reads the same fields
//! from either.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::frame;
use crate::plan::TransportKind;

/// The largest response head or SSE line accepted (the server's own request
/// head limit is the same 64 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// The largest long-poll body or SSE event accepted.
const MAX_BODY: usize = 16 << 20;

/// What a connection yields.
#[derive(Debug)]
pub(crate) enum Event {
    /// One application frame (text or binary payload).
    Frame(Bytes),
    /// The server closed with a code (1005 when it sent none) and a reason.
    Closed { code: u16, reason: String },
    /// The server turned a request away mid-session (a long-poll's 503).
    Refused(Refusal),
    /// The stream ended without a close frame.
    Eof,
    /// A transport error (reset, protocol violation).
    Error(String),
}

/// A refusal by the server: admission control (`overloaded`), shutdown
/// (`draining`), or any other 503, with the hint it carried.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    /// `reason` of an `overloaded` body (`accept_rate`, …), else the
    /// `error` code, else `status-N`; an SSE notice's `reason`.
    pub(crate) reason: String,
    /// `retry_after_ms` of the body, else `Retry-After` in milliseconds.
    pub(crate) retry_after_ms: Option<u64>,
}

impl Refusal {
    fn of_body(status: u16, body: &[u8], retry_after_header: Option<u64>) -> Self {
        let reason = frame::string_after(body, b"\"reason\":\"")
            .or_else(|| frame::string_after(body, b"\"error\":\""))
            .unwrap_or_else(|| format!("status-{status}"));
        let retry_after_ms = frame::number_after(body, b"\"retry_after_ms\":").or(retry_after_header);
        Self { reason, retry_after_ms }
    }

    /// An SSE `notice` as the only event of a stream (`overload`,
    /// `draining`): the event stream's way of refusing, since `EventSource`
    /// gives up after an error status.
    pub(crate) fn of_notice(data: &[u8], retry_field: Option<u64>) -> Option<Self> {
        if frame::string_after(data, b"\"type\":\"").as_deref() != Some("notice") {
            return None;
        }
        Some(Self {
            reason: frame::string_after(data, b"\"reason\":\"").unwrap_or_else(|| "notice".into()),
            retry_after_ms: frame::number_after(data, b"\"retry_after_ms\":").or(retry_field),
        })
    }
}

/// Why a connection could not be opened.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The server answered the handshake with a 503 (or another refusal).
    Refused(Refusal),
    /// TCP, protocol or timeout failure.
    Failed(io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(r) => write!(f, "refused ({}), retry after {:?} ms", r.reason, r.retry_after_ms),
            ConnectError::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        ConnectError::Failed(e)
    }
}

/// How to open the socket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SocketOpts {
    pub(crate) source: Option<Ipv4Addr>,
    /// `SO_RCVBUF` to set before connecting.
    pub(crate) rcvbuf: Option<u32>,
    /// Pace reads to this many bytes per second.
    pub(crate) bandwidth: Option<u64>,
    pub(crate) read_buffer: usize,
    /// Long-poll: the `wait=` of each request, seconds.
    pub(crate) long_poll_wait_s: f64,
}

/// An open reader connection.
pub(crate) enum Conn {
    Ws(Box<WebSocketStream<Paced>>),
    Sse(Box<SseConn>),
    LongPoll(Box<LongPollConn>),
}

impl Conn {
    /// Opens a TCP connection (bound to the source address) and performs the
    /// transport's handshake: the WebSocket upgrade, the event stream's
    /// response head, or a long-poll's first (immediate) answer. `url` may
    /// carry `since=`; a long-poll reader also takes the position it holds.
    pub(crate) async fn connect(
        kind: TransportKind,
        addr: SocketAddr,
        url: &str,
        since: Option<&str>,
        opts: SocketOpts,
        timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        let fut = async {
            let stream = tcp_connect(addr, opts).await?;
            let paced = Paced::new(stream, opts.bandwidth);
            match kind {
                TransportKind::Ws => {
                    let url = with_since(url, since);
                    let config = WebSocketConfig::default()
                        .read_buffer_size(opts.read_buffer)
                        .write_buffer_size(0)
                        .max_message_size(Some(16 << 20))
                        .max_frame_size(Some(16 << 20));
                    match tokio_tungstenite::client_async_with_config(url.as_str(), paced, Some(config)).await {
                        Ok((ws, _response)) => Ok(Conn::Ws(Box::new(ws))),
                        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                            let header =
                                retry_after_header(response.headers().get("retry-after").and_then(|v| v.to_str().ok()));
                            let body = response.body().as_deref().unwrap_or_default();
                            Err(ConnectError::Refused(Refusal::of_body(response.status().as_u16(), body, header)))
                        }
                        Err(e) => Err(ConnectError::Failed(io::Error::other(e))),
                    }
                }
                TransportKind::Sse => {
                    let url = with_since(url, since);
                    let mut http = Http::new(paced, &url)?;
                    http.send_get(&http.path.clone()).await?;
                    let head = http.read_head().await?;
                    if head.status != 200 {
                        let body = http.read_whole_body(&head).await.unwrap_or_default();
                        return Err(ConnectError::Refused(Refusal::of_body(head.status, &body, head.retry_after_ms)));
                    }
                    http.start_body(&head);
                    Ok(Conn::Sse(Box::new(SseConn { http, line: Vec::new(), data: Vec::new(), retry: None })))
                }
                TransportKind::LongPoll => {
                    let mut lp = LongPollConn {
                        http: Http::new(paced, url)?,
                        since: since.map(str::to_string),
                        wait_s: opts.long_poll_wait_s,
                        pending: None,
                    };
                    // The first answer is immediate (`wait=0`, or a plain
                    // GET without a position): it is the handshake.
                    let first = lp.poll_once(0.0).await;
                    lp.pending = Some(match first {
                        Event::Refused(r) => return Err(ConnectError::Refused(r)),
                        Event::Error(e) => return Err(ConnectError::Failed(io::Error::other(e))),
                        Event::Eof => return Err(ConnectError::Failed(io::ErrorKind::UnexpectedEof.into())),
                        other => other,
                    });
                    Ok(Conn::LongPoll(Box::new(lp)))
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ConnectError::Failed(io::Error::new(io::ErrorKind::TimedOut, "handshake")))?
    }

    /// The next event. Pings are answered by tungstenite itself.
    pub(crate) async fn next(&mut self) -> Event {
        match self {
            Conn::Ws(ws) => loop {
                match ws.next().await {
                    None => return Event::Eof,
                    Some(Ok(Message::Text(text))) => return Event::Frame(Bytes::from(text)),
                    Some(Ok(Message::Binary(bytes))) => return Event::Frame(bytes),
                    Some(Ok(Message::Close(Some(frame)))) => {
                        return Event::Closed { code: frame.code.into(), reason: frame.reason.to_string() };
                    }
                    Some(Ok(Message::Close(None))) => return Event::Closed { code: 1005, reason: String::new() },
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Event::Error(e.to_string()),
                }
            },
            Conn::Sse(sse) => sse.next().await,
            Conn::LongPoll(lp) => {
                if let Some(event) = lp.pending.take() {
                    return event;
                }
                lp.next().await
            }
        }
    }

    /// The SSE `retry:` field last seen (the stream's reconnect delay).
    pub(crate) fn sse_retry(&self) -> Option<u64> {
        match self {
            Conn::Sse(sse) => sse.retry,
            _ => None,
        }
    }
}

/// `url` with `since=POSITION` added to its query.
pub(crate) fn with_since(url: &str, since: Option<&str>) -> String {
    match since {
        None => url.to_string(),
        Some(pos) => format!("{url}{}since={pos}", if url.contains('?') { '&' } else { '?' }),
    }
}

/// `Retry-After` in whole seconds, as milliseconds.
fn retry_after_header(value: Option<&str>) -> Option<u64> {
    value?.trim().parse::<u64>().ok().map(|s| s.saturating_mul(1000))
}

/// A minimal HTTP/1.1 client connection: one request at a time, keep-alive.
pub(crate) struct Http {
    io: Paced,
    host: String,
    /// Path and query of the URL it was opened for.
    path: String,
    /// Bytes read from the socket and not consumed yet.
    buf: Vec<u8>,
    body: Body,
}

/// Where the current response body stands.
#[derive(Debug, Clone, Copy)]
enum Body {
    /// `Content-Length`: bytes left.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunk),
    /// Neither: the body ends with the connection.
    UntilClose,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Expecting a size line.
    Size,
    /// Inside a chunk: bytes left.
    Data(usize),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last (empty) chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

/// A response head.
#[derive(Debug)]
struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
    retry_after_ms: Option<u64>,
}

impl Http {
    fn new(io: Paced, url: &str) -> io::Result<Self> {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if host.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {url:?}")));
        }
        Ok(Self { io, host: host.to_string(), path: path.to_string(), buf: Vec::new(), body: Body::Length(0) })
    }

    async fn send_get(&mut self, path: &str) -> io::Result<()> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream, application/json\r\nAccept-Encoding: identity\r\n\r\n",
            self.host
        );
        self.io.write_all(request.as_bytes()).await
    }

    /// Reads more bytes from the socket into `buf`; 0 at the end.
    async fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 4096];
        let n = self.io.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    async fn read_head(&mut self) -> io::Result<Head> {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                if i > MAX_HEAD {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "response head over 64 KiB"));
                }
                break i;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "response head over 64 KiB"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = text.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
        let mut head = Head { status, content_length: None, chunked: false, retry_after_ms: None };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => head.content_length = value.parse().ok(),
                "transfer-encoding" => head.chunked = value.to_ascii_lowercase().contains("chunked"),
                "retry-after" => head.retry_after_ms = retry_after_header(Some(value)),
                _ => {}
            }
        }
        Ok(head)
    }

    fn start_body(&mut self, head: &Head) {
        self.body = if head.chunked {
            Body::Chunked(Chunk::Size)
        } else if let Some(n) = head.content_length {
            Body::Length(n)
        } else if matches!(head.status, 204 | 304) || (100..200).contains(&head.status) {
            Body::Length(0)
        } else {
            Body::UntilClose
        };
    }

    /// Appends the next decoded body bytes to `out`; `true` once the body
    /// has ended (nothing more will come).
    async fn body_bytes(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        loop {
            match &mut self.body {
                Body::Length(0) | Body::Chunked(Chunk::Done) => return Ok(true),
                Body::Length(left) if !self.buf.is_empty() => {
                    let k = (*left).min(self.buf.len());
                    out.extend(self.buf.drain(..k));
                    *left -= k;
                    return Ok(*left == 0);
                }
                Body::UntilClose if !self.buf.is_empty() => {
                    out.append(&mut self.buf);
                    return Ok(false);
                }
                Body::Chunked(Chunk::Data(left)) if !self.buf.is_empty() => {
                    let k = (*left).min(self.buf.len());
                    out.extend(self.buf.drain(..k));
                    *left -= k;
                    if *left == 0 {
                        self.body = Body::Chunked(Chunk::DataEnd);
                    }
                    return Ok(false);
                }
                Body::Chunked(Chunk::DataEnd) if self.buf.len() >= 2 => {
                    self.buf.drain(..2);
                    self.body = Body::Chunked(Chunk::Size);
                    continue;
                }
                Body::Chunked(state @ (Chunk::Size | Chunk::Trailer)) => {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                        self.buf.drain(..i + 2);
                        if matches!(state, Chunk::Trailer) {
                            if line.is_empty() {
                                self.body = Body::Chunked(Chunk::Done);
                            }
                            continue;
                        }
                        let hex = line.split(';').next().unwrap_or("").trim();
                        let size = usize::from_str_radix(hex, 16)
                            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                        self.body = Body::Chunked(if size == 0 { Chunk::Trailer } else { Chunk::Data(size) });
                        continue;
                    }
                    if self.buf.len() > MAX_HEAD {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk size line too long"));
                    }
                }
                _ => {}
            }
            if self.fill().await? == 0 {
                return match self.body {
                    Body::UntilClose => Ok(true),
                    _ => Err(io::ErrorKind::UnexpectedEof.into()),
                };
            }
        }
    }

    async fn read_whole_body(&mut self, head: &Head) -> io::Result<Vec<u8>> {
        self.start_body(head);
        let mut out = Vec::new();
        while !self.body_bytes(&mut out).await? {
            if out.len() > MAX_BODY {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "body over 16 MiB"));
            }
        }
        Ok(out)
    }
}

/// An event stream (`text/event-stream`).
pub(crate) struct SseConn {
    http: Http,
    /// Decoded body bytes not yet split into lines.
    line: Vec<u8>,
    /// The `data:` lines of the event being read.
    data: Vec<u8>,
    /// The last `retry:` field.
    retry: Option<u64>,
}

impl SseConn {
    async fn next(&mut self) -> Event {
        let mut ended = false;
        loop {
            while let Some(i) = self.line.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.line.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    if !self.data.is_empty() {
                        return Event::Frame(Bytes::from(std::mem::take(&mut self.data)));
                    }
                } else if let Some(value) = line.strip_prefix(b"data:") {
                    if !self.data.is_empty() {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
                } else if let Some(value) = line.strip_prefix(b"retry:") {
                    self.retry = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok());
                }
            }
            if ended {
                return Event::Eof;
            }
            if self.line.len() + self.data.len() > MAX_BODY {
                return Event::Error("event over 16 MiB".into());
            }
            match self.http.body_bytes(&mut self.line).await {
                Ok(done) => ended = done,
                Err(e) => return error_event(&e),
            }
        }
    }
}

/// Long-poll: `GET …?since=POSITION&wait=S`, again and again on one
/// keep-alive connection; a 200 is a frame, a 304 asks again.
pub(crate) struct LongPollConn {
    http: Http,
    /// The position held (`EPOCH:VERSION`), from the last 200.
    since: Option<String>,
    wait_s: f64,
    /// The handshake's answer, handed out by the first `next`.
    pending: Option<Event>,
}

/// A position no topic holds: a long-poll naming it waits for the topic
/// to be (re-)created instead of answering 404 again at once.
const NO_EPOCH: &str = "0000000000000000:1";

impl LongPollConn {
    async fn poll_once(&mut self, wait_s: f64) -> Event {
        let path = match &self.since {
            Some(pos) => format!("{}{}since={pos}&wait={wait_s}", self.http.path, sep(&self.http.path)),
            None => self.http.path.clone(),
        };
        let result = async {
            self.http.send_get(&path).await?;
            let head = self.http.read_head().await?;
            let body = self.http.read_whole_body(&head).await?;
            Ok::<_, io::Error>((head, body))
        }
        .await;
        let (head, body) = match result {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Event::Eof,
            Err(e) => return error_event(&e),
        };
        match head.status {
            200 => {
                if let Some(pos) = frame::position(&body) {
                    self.since = Some(pos);
                }
                Event::Frame(Bytes::from(body))
            }
            // Nothing new within the wait: the marker frames carry no `seq`,
            // so readers count them as neither deliveries nor states.
            304 => Event::Frame(Bytes::from_static(br#"{"type":"long_poll_304"}"#)),
            404 => {
                self.since = Some(NO_EPOCH.into());
                Event::Frame(Bytes::from_static(br#"{"type":"long_poll_404"}"#))
            }
            status => Event::Refused(Refusal::of_body(status, &body, head.retry_after_ms)),
        }
    }

    async fn next(&mut self) -> Event {
        loop {
            let event = self.poll_once(self.wait_s).await;
            match &event {
                Event::Frame(b) if b.starts_with(br#"{"type":"long_poll_"#) => {}
                _ => return event,
            }
        }
    }
}

fn sep(path: &str) -> char {
    if path.contains('?') { '&' } else { '?' }
}

fn error_event(e: &io::Error) -> Event {
    if e.kind() == io::ErrorKind::UnexpectedEof { Event::Eof } else { Event::Error(e.to_string()) }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn tcp_connect(addr: SocketAddr, opts: SocketOpts) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(bytes) = opts.rcvbuf {
        socket.set_recv_buffer_size(bytes)?;
    }
    if let Some(ip) = opts.source {
        // Ports of a source address are reusable as soon as their TIME_WAIT
        // twin is gone from our side; flapping readers need that.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(ip.into(), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A TCP stream whose reads are paced to a bandwidth (a token bucket), or
/// not paced at all.
#[derive(Debug)]
pub(crate) struct Paced {
    inner: TcpStream,
    rate: Option<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    bytes_per_s: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Paced {
    fn new(inner: TcpStream, bandwidth: Option<u64>) -> Self {
        let rate = bandwidth.filter(|b| *b > 0).map(|b| {
            let bytes_per_s = b as f64;
            let burst = (bytes_per_s / 20.0).clamp(512.0, 16_384.0);
            Bucket { bytes_per_s, burst, tokens: burst, last: Instant::now(), sleep: None }
        });
        Self { inner, rate }
    }
}

impl AsyncRead for Paced {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(bucket) = this.rate.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        loop {
            let now = Instant::now();
            let elapsed = now.duration_since(bucket.last).as_secs_f64();
            bucket.last = now;
            bucket.tokens = (bucket.tokens + elapsed * bucket.bytes_per_s).min(bucket.burst);
            if bucket.tokens >= 1.0 {
                bucket.sleep = None;
                break;
            }
            let wait = Duration::from_secs_f64((1.0 - bucket.tokens).max(0.0) / bucket.bytes_per_s)
                .max(Duration::from_millis(1));
            let sleep = bucket.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            bucket.sleep = None;
        }
        let allowed = (bucket.tokens as usize).min(buf.remaining()).min(4096);
        let mut tmp = [0u8; 4096];
        let mut sub = ReadBuf::new(&mut tmp[..allowed]);
        match Pin::new(&mut this.inner).poll_read(cx, &mut sub) {
            Poll::Ready(Ok(())) => {
                let n = sub.filled().len();
                bucket.tokens -= n as f64;
                buf.put_slice(sub.filled());
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Paced {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn opts() -> SocketOpts {
        SocketOpts { source: None, rcvbuf: None, bandwidth: None, read_buffer: 4096, long_poll_wait_s: 20.0 }
    }

    /// A one-connection server: for each request head it reads, it writes
    /// the next canned answer; it returns the request heads it saw.
    async fn serve(answers: Vec<Vec<u8>>) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            for answer in answers {
                let mut head = Vec::new();
                while find(&head, b"\r\n\r\n").is_none() {
                    let mut b = [0u8; 1024];
                    let n = socket.read(&mut b).await.expect("read");
                    if n == 0 {
                        return seen;
                    }
                    head.extend_from_slice(&b[..n]);
                }
                seen.push(String::from_utf8_lossy(&head).into_owned());
                // Written in small pieces, so that the client meets split
                // chunk sizes, lines and events.
                for piece in answer.chunks(7) {
                    socket.write_all(piece).await.expect("write");
                    socket.flush().await.expect("flush");
                }
            }
            seen
        });
        (addr, task)
    }

    fn chunked(parts: &[&str]) -> Vec<u8> {
        let mut out =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for p in parts {
            out.extend_from_slice(format!("{:x}\r\n{p}\r\n", p.len()).as_bytes());
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[tokio::test]
    async fn sse_events_across_chunks_and_a_refusal_notice() {
        let body = chunked(&[
            "retry: 2700\ndata: {\"type\":\"hello\"}\n",
            "\ndata: {\"type\":\"snapshot\",\"epoch\":\"00000000000000ab\",\"version\":3,\"state\":{\"seq\":2}}\nid: x\n\n",
            ": comment\n\ndata: {\"type\":\"notice\",\"reason\":\"overload\",\"retry_after_ms\":1840}\n\n",
        ]);
        let (addr, server) = serve(vec![body]).await;
        let url = format!("http://{addr}/v1/topics/t/events");
        let mut conn =
            Conn::connect(TransportKind::Sse, addr, &url, Some("00000000000000ab:1"), opts(), Duration::from_secs(5))
                .await
                .expect("connect");
        let Event::Frame(hello) = conn.next().await else { panic!("hello expected") };
        assert_eq!(&hello[..], br#"{"type":"hello"}"#);
        assert_eq!(conn.sse_retry(), Some(2700));
        let Event::Frame(snapshot) = conn.next().await else { panic!("snapshot expected") };
        assert_eq!(frame::position(&snapshot).as_deref(), Some("00000000000000ab:3"));
        let Event::Frame(notice) = conn.next().await else { panic!("notice expected") };
        let refusal = Refusal::of_notice(&notice, conn.sse_retry()).expect("a notice is a refusal");
        assert_eq!((refusal.reason.as_str(), refusal.retry_after_ms), ("overload", Some(1840)));
        assert!(matches!(conn.next().await, Event::Eof), "the stream ends with the body");
        let heads = server.await.expect("server");
        assert!(heads[0].starts_with("GET /v1/topics/t/events?since=00000000000000ab:1 HTTP/1.1\r\n"), "{heads:?}");
    }

    #[tokio::test]
    async fn long_poll_follows_its_position() {
        let snapshot = |v: u64| {
            let body = format!(r#"{{"topic":"t","epoch":"00000000000000ab","version":{v},"state":{{"seq":{v}}}}}"#);
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
        };
        let not_modified = b"HTTP/1.1 304 Not Modified\r\netag: W/\"x\"\r\n\r\n".to_vec();
        let body = r#"{"error":"overloaded","reason":"accept_rate","retry_after_ms":1234}"#;
        let refused = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nretry-after: 2\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        let (addr, server) = serve(vec![snapshot(1), not_modified, snapshot(2), refused]).await;
        let url = format!("http://{addr}/v1/topics/t");
        let mut conn = Conn::connect(TransportKind::LongPoll, addr, &url, None, opts(), Duration::from_secs(5))
            .await
            .expect("connect");
        let Event::Frame(first) = conn.next().await else { panic!("first answer expected") };
        assert_eq!(frame::position(&first).as_deref(), Some("00000000000000ab:1"));
        // The 304 is skipped: the next frame is version 2.
        let Event::Frame(second) = conn.next().await else { panic!("version 2 expected") };
        assert_eq!(frame::position(&second).as_deref(), Some("00000000000000ab:2"));
        let event = conn.next().await;
        let Event::Refused(r) = event else { panic!("a refusal expected, got {event:?}") };
        assert_eq!((r.reason.as_str(), r.retry_after_ms), ("accept_rate", Some(1234)));
        let heads = server.await.expect("server");
        assert!(heads[0].starts_with("GET /v1/topics/t HTTP/1.1"), "a plain GET first: {heads:?}");
        assert!(heads[1].starts_with("GET /v1/topics/t?since=00000000000000ab:1&wait=20 HTTP/1.1"), "{heads:?}");
        assert!(heads[2].starts_with("GET /v1/topics/t?since=00000000000000ab:1&wait=20 "), "{heads:?}");
        assert!(heads[3].starts_with("GET /v1/topics/t?since=00000000000000ab:2&wait=20 "), "{heads:?}");
    }

    #[tokio::test]
    async fn a_refused_upgrade_and_an_oversized_head() {
        let body = r#"{"error":"overloaded","reason":"max_connections","retry_after_ms":4321}"#;
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 5\r\n\r\n{body}",
            body.len()
        );
        let (addr, _server) = serve(vec![answer.into_bytes()]).await;
        let url = format!("ws://{addr}/v1/topics/t/ws");
        match Conn::connect(TransportKind::Ws, addr, &url, None, opts(), Duration::from_secs(5)).await {
            Err(ConnectError::Refused(r)) => {
                assert_eq!((r.reason.as_str(), r.retry_after_ms), ("max_connections", Some(4321)));
            }
            other => panic!("a refusal expected, got {:?}", other.map(|_| ())),
        }
        // A response head over MAX_HEAD is an error, not an unbounded buffer.
        let mut huge = b"HTTP/1.1 200 OK\r\nx-pad: ".to_vec();
        huge.extend(std::iter::repeat_n(b'x', MAX_HEAD + 10));
        huge.extend_from_slice(b"\r\n\r\n");
        let (addr, _server) = serve(vec![huge]).await;
        let url = format!("http://{addr}/v1/topics/t/events");
        match Conn::connect(TransportKind::Sse, addr, &url, None, opts(), Duration::from_secs(5)).await {
            Err(ConnectError::Failed(e)) => assert!(e.to_string().contains("64 KiB"), "{e}"),
            other => panic!("a failure expected, got {:?}", other.map(|_| ())),
        }
    }
}
