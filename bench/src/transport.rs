//! Reader transports behind one interface: connect, then a stream of events.
//!
//! Only WebSocket exists today. SSE and long-poll readers are added as
//! variants of [`Conn`] (and of `TransportKind`): each needs a `connect` arm
//! producing the variant and a `next` arm turning its wire into [`Event`]s
//! (an SSE `data:` line or a long-poll body is a [`Event::Frame`]; the frame
//! parser in `frame.rs` reads the same fields from either).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::plan::TransportKind;

/// What a connection yields.
#[derive(Debug)]
pub(crate) enum Event {
    /// One application frame (text or binary payload).
    Frame(Bytes),
    /// The server closed with a code (1005 when it sent none) and a reason.
    Closed { code: u16, reason: String },
    /// The stream ended without a close frame.
    Eof,
    /// A transport error (reset, protocol violation).
    Error(String),
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
}

/// An open reader connection.
pub(crate) enum Conn {
    Ws(Box<WebSocketStream<Paced>>),
}

impl Conn {
    /// Opens a TCP connection (bound to the source address) and performs the
    /// transport's handshake.
    pub(crate) async fn connect(
        kind: TransportKind,
        addr: SocketAddr,
        url: &str,
        opts: SocketOpts,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let fut = async {
            let stream = tcp_connect(addr, opts).await?;
            let paced = Paced::new(stream, opts.bandwidth);
            match kind {
                TransportKind::Ws => {
                    let config = WebSocketConfig::default()
                        .read_buffer_size(opts.read_buffer)
                        .write_buffer_size(0)
                        .max_message_size(Some(16 << 20))
                        .max_frame_size(Some(16 << 20));
                    let (ws, _response) = tokio_tungstenite::client_async_with_config(url, paced, Some(config))
                        .await
                        .map_err(io::Error::other)?;
                    Ok(Conn::Ws(Box::new(ws)))
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake"))?
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
        }
    }
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
