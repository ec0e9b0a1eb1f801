//! The accept loop and the HTTP connections it starts: our own replacement for
//! `axum::serve`, which has no header-read timeout, no header size limit and
//! sleeps a fixed second on every accept error.
//!
//! What this module owns:
//!
//! - **Slow or silent clients.** A connection must deliver a complete first
//!   request head within `--header-timeout`, or it is dropped; this also covers
//!   a client that connects and sends nothing (hyper's own timer only starts
//!   once it has seen the first byte and picked HTTP/1). Later requests on a
//!   keep-alive connection get the same bound from hyper, so an idle HTTP/1
//!   keep-alive connection is closed after `--header-timeout` too.
//! - **Header size.** HTTP/1 request heads may take at most [`MAX_HEADER_BYTES`]
//!   (hyper's read buffer is capped there, so a longer head is answered 431 and
//!   the connection closed); HTTP/2 header lists have the same bound.
//! - **The peer.** Each request carries `ConnectInfo<Peer>` (address and
//!   socket), which the subscription handlers use to clamp the send buffer.
//!   Every accepted socket gets `TCP_NODELAY`: readers receive many small
//!   frames, and Nagle's delay would only add latency.
//! - **Accept errors.** Errors that belong to one aborted connection
//!   (`ECONNABORTED` and the like) are skipped. Running out of file
//!   descriptors (`EMFILE`, `ENFILE`) or kernel memory backs off from 10 ms,
//!   doubling to 1 s, and logs at most once a second, instead of spinning on a
//!   listener that stays readable.
//! - **Probes while out of descriptors.** A reserve of [`RESERVE_FDS`] open
//!   `/dev/null` files is held from the start. When accept fails for lack of
//!   descriptors, one reserve file is closed and the oldest pending connection
//!   is accepted in its place, in *emergency mode*: its first bytes are peeked
//!   (a probe has sent its whole request before we accept it, so waiting is
//!   short, [`EMERGENCY_SNIFF`] at most). A `GET` or `HEAD` of `/healthz` or
//!   `/metrics` is served, HTTP/1 only, without keep-alive, for at most
//!   [`EMERGENCY_LIFETIME`]; anything else gets a best-effort 503 with a
//!   jittered reconnect hint and is closed at once. Deciding on the first
//!   bytes matters: the backlog is first come, first served, so a probe queued
//!   behind a flood of slow clients is reached only if each of them costs
//!   next to nothing. The reserve is refilled before every accept while it is
//!   short, and a finished emergency connection wakes the backing-off loop,
//!   so the next probe in the backlog is reached without waiting out the pause.
//! - **Shutdown.** When the token fires, accepting stops and the listener is
//!   closed, so new connections are refused by the kernel instead of waiting in
//!   the backlog. Each open connection is told to shut down gracefully (an
//!   idle one closes at once, a response in flight finishes, HTTP/2 sends
//!   GOAWAY); upgraded WebSockets and event streams end through the same token
//!   in their own tasks. Every connection is a task in the caller's
//!   `TaskTracker`, so the caller's bounded wait covers them.

use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper::service::{Service as _, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::ApiError;
use crate::net::Peer;
use crate::protocol::jittered_ms;

/// The most bytes a request head (request line and headers) may take. This is
/// hyper's HTTP/1 read-buffer cap, which is where a head must fit whole; a
/// longer one is answered `431 Request Header Fields Too Large`. Request
/// bodies are unaffected: they stream through the buffer in pieces.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// File descriptors held in reserve for emergency connections. Each one lets
/// one probe or scrape through at a time while the process is out of them.
pub const RESERVE_FDS: usize = 4;

/// The longest an emergency connection may live, so that a slow client cannot
/// keep a reserve descriptor from the next probe.
pub const EMERGENCY_LIFETIME: Duration = Duration::from_secs(2);

/// How long an emergency connection may take to show its request line.
pub const EMERGENCY_SNIFF: Duration = Duration::from_millis(250);

/// The paths answered on an emergency connection.
const EMERGENCY_PATHS: [&str; 2] = ["/healthz", "/metrics"];

/// The request-line beginnings that mark a probe on an emergency connection.
const EMERGENCY_REQUESTS: [&[u8]; 4] = [b"GET /healthz", b"GET /metrics", b"HEAD /healthz", b"HEAD /metrics"];

/// The first pause after an accept error that is not one connection's.
const BACKOFF_START: Duration = Duration::from_millis(10);
/// The longest pause; the pauses double up to it while the errors last.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How often at most an accept error is logged.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The two moments of a shutdown, as the accept loop sees them.
#[derive(Debug, Clone)]
pub struct Stopping {
    /// Shutdown has begun: keep-alive connections finish their request and
    /// close, connections accepted from now on answer one request each.
    pub draining: CancellationToken,
    /// Stop accepting (after the drain, so that probes and snapshot reads
    /// are still answered while readers leave).
    pub stop_accepting: CancellationToken,
}

/// How many requests were answered 503 from the descriptor reserve because
/// the process was out of file descriptors.
pub static OUT_OF_DESCRIPTORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Serves `app` on `listener` until `stop_accepting` fires. Each connection runs as
/// a task in `tasks`; this returns as soon as accepting has stopped, and the
/// caller waits for `tasks` (bounded) to let the connections finish.
///
/// Returns an error only if the listener itself has become unusable.
pub async fn run(
    listener: &TcpListener,
    app: Router,
    header_timeout: Duration,
    stopping: Stopping,
    tasks: TaskTracker,
) -> io::Result<()> {
    let Stopping { draining: shutdown, stop_accepting } = stopping;
    let builder = Arc::new(connection_builder(header_timeout, true));
    // Connections accepted while draining (probes, snapshot reads) answer
    // their request and close, instead of being shut down before they speak.
    let closing_builder = Arc::new(connection_builder(header_timeout, false));
    let mut reserve = Reserve::new(RESERVE_FDS);
    if reserve.files.len() < RESERVE_FDS {
        tracing::warn!(held = reserve.files.len(), wanted = RESERVE_FDS, "cannot fill the file-descriptor reserve");
    }
    let mut backoff = Backoff::default();
    // Signalled when an emergency connection ends and its descriptor is free
    // again; `notify_one` keeps the signal if the loop is not waiting yet.
    let emergency_done = Arc::new(Notify::new());
    loop {
        reserve.refill();
        let accepted = tokio::select! {
            biased;
            () = stop_accepting.cancelled() => break,
            // A descriptor came back from an emergency connection: take it
            // into the reserve (at the top of the loop) before anyone else.
            () = emergency_done.notified(), if reserve.is_short() => continue,
            accepted = listener.accept() => accepted,
        };
        let error = match accepted {
            Ok((stream, addr)) => {
                backoff.reset();
                let late = shutdown.is_cancelled();
                let builder = Arc::clone(if late { &closing_builder } else { &builder });
                tasks.spawn(serve(builder, app.clone(), stream, addr, header_timeout, shutdown.clone(), late));
                continue;
            }
            Err(error) => error,
        };
        match classify(&error) {
            AcceptError::Connection => {
                tracing::debug!(%error, "a connection was lost before it was accepted");
            }
            AcceptError::Fatal => {
                tracing::error!(%error, "the listener is unusable; no longer accepting");
                return Err(error);
            }
            AcceptError::Descriptors if reserve.release_one() => {
                // The descriptor just closed is the one this accept takes,
                // unless another thread opened something in between; then the
                // next round finds the reserve one shorter and tries again.
                backoff.note(&error, reserve.files.len());
                if let Some(Ok((stream, addr))) = try_accept(listener).await {
                    let (app, done) = (app.clone(), Arc::clone(&emergency_done));
                    tasks.spawn(async move {
                        serve_emergency(app, stream, addr).await;
                        done.notify_one();
                    });
                }
            }
            AcceptError::Descriptors | AcceptError::Resources => {
                backoff.note(&error, reserve.files.len());
                tokio::select! {
                    () = stop_accepting.cancelled() => break,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = emergency_done.notified() => {}
                }
            }
        }
    }
    // The caller drops the listener next, so the kernel refuses new
    // connections at once rather than leaving them in the backlog.
    Ok(())
}

/// The connection settings every ordinary connection shares.
fn connection_builder(header_timeout: Duration, keep_alive: bool) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(keep_alive);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// The hyper service for one connection: stamps every request with the peer
/// and hands it to the router. With `emergency`, only the probe paths reach
/// the router. `started` is set once the first request head has arrived.
fn service(
    app: Router,
    peer: Peer,
    started: Arc<AtomicBool>,
    emergency: bool,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<axum::body::Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<axum::body::Body>, Infallible>> + Send + 'static,
> + Send
+ 'static {
    let router = TowerToHyperService::new(app);
    let polled = crate::net::Polled::default();
    service_fn(move |mut request: Request<Incoming>| {
        started.store(true, Ordering::Release);
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(polled.clone());
        let refuse = emergency && !EMERGENCY_PATHS.contains(&request.uri().path());
        let routed = (!refuse).then(|| router.call(request));
        async move {
            match routed {
                Some(routed) => routed.await,
                None => Ok(out_of_descriptors()),
            }
        }
    })
}

/// The refusal given on an emergency connection to anything but a probe.
fn out_of_descriptors() -> Response<axum::body::Body> {
    OUT_OF_DESCRIPTORS.fetch_add(1, Ordering::Relaxed);
    let refusal = ApiError::Overloaded { reason: "out_of_file_descriptors", retry_after_ms: jittered_ms(1000, 2000) };
    let mut response = refusal.into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Serves one ordinary connection until it ends, or until shutdown has let it
/// finish what it was doing.
async fn serve(
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    stream: TcpStream,
    addr: SocketAddr,
    header_timeout: Duration,
    shutdown: CancellationToken,
    late: bool,
) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let peer = Peer { addr, fd: stream.as_raw_fd() };
    let started = Arc::new(AtomicBool::new(false));
    let service = service(app, peer, Arc::clone(&started), false);
    let mut connection = pin!(builder.serve_connection_with_upgrades(TokioIo::new(stream), service));
    // hyper times the request head only once it has chosen HTTP/1, which
    // takes a first byte; this deadline also catches the silent client and a
    // trickled HTTP/2 preface.
    let mut first_request = pin!(tokio::time::sleep(header_timeout));
    let mut awaiting_first_request = true;
    // A connection accepted after shutdown began was built without
    // keep-alive: it answers one request and ends by itself.
    let mut draining = late;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(peer = %addr, %error, "connection ended with an error");
                }
                return;
            }
            () = &mut first_request, if awaiting_first_request => {
                if !started.load(Ordering::Acquire) {
                    tracing::debug!(peer = %addr, "no request head within the header timeout; closing");
                    return;
                }
                awaiting_first_request = false;
            }
            () = shutdown.cancelled(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// Serves one connection accepted on a reserve descriptor: a probe gets one
/// answer, anything else a refusal at once; bounded in time either way.
async fn serve_emergency(app: Router, stream: TcpStream, addr: SocketAddr) {
    if !is_probe(&stream).await {
        tracing::debug!(peer = %addr, "out of file descriptors: refused a request that is not a probe");
        OUT_OF_DESCRIPTORS.fetch_add(1, Ordering::Relaxed);
        refuse_raw(&stream);
        return;
    }
    let peer = Peer { addr, fd: stream.as_raw_fd() };
    let service = service(app, peer, Arc::new(AtomicBool::new(false)), true);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(EMERGENCY_LIFETIME)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(false);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(EMERGENCY_LIFETIME, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(peer = %addr, %error, "emergency connection ended with an error"),
        Err(_) => tracing::debug!(peer = %addr, "emergency connection took too long; closed"),
    }
}

/// Whether the connection's first bytes are a probe's request line. Peeks, so
/// hyper still reads the request from the start.
async fn is_probe(stream: &TcpStream) -> bool {
    let deadline = tokio::time::Instant::now() + EMERGENCY_SNIFF;
    let mut buf = [0u8; 16];
    loop {
        let seen = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => &buf[..n],
            _ => return false,
        };
        if EMERGENCY_REQUESTS.iter().any(|probe| seen.starts_with(probe)) {
            return true;
        }
        let undecided = EMERGENCY_REQUESTS.iter().any(|probe| seen.len() < probe.len() && probe.starts_with(seen));
        if !undecided {
            return false;
        }
        // A peek returns at once while any byte is waiting, so pause briefly
        // for the rest of the request line to arrive.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes a canned 503 with a jittered reconnect hint if the socket takes it
/// without waiting; the connection is closed right after either way.
fn refuse_raw(stream: &TcpStream) {
    let retry_after_ms = jittered_ms(1000, 2000);
    let body =
        format!(r#"{{"error":"overloaded","reason":"out_of_file_descriptors","retry_after_ms":{retry_after_ms}}}"#);
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncache-control: no-store\r\n\
         retry-after: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        retry_after_ms.div_ceil(1000),
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

/// One accept attempt that does not wait: `None` if no connection is pending.
async fn try_accept(listener: &TcpListener) -> Option<io::Result<(TcpStream, SocketAddr)>> {
    std::future::poll_fn(|cx| match listener.poll_accept(cx) {
        Poll::Ready(result) => Poll::Ready(Some(result)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// What an accept error means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptError {
    /// One pending connection failed (reset, aborted); the next may be fine.
    Connection,
    /// The process or system is out of file descriptors.
    Descriptors,
    /// The kernel is short of memory or buffers, or the cause is unknown:
    /// wait and retry.
    Resources,
    /// The listener itself is broken; retrying cannot help.
    Fatal,
}

fn classify(error: &io::Error) -> AcceptError {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => AcceptError::Descriptors,
        // Linux hands pending network errors of the new socket to accept(2),
        // which asks callers to treat them like EAGAIN.
        Some(
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::ECONNREFUSED
            | libc::EPROTO
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETDOWN
            | libc::ENETUNREACH
            | libc::EPERM
            | libc::EINTR
            | libc::EAGAIN,
        ) => AcceptError::Connection,
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => AcceptError::Fatal,
        _ => AcceptError::Resources,
    }
}

/// Open `/dev/null` files kept only so that they can be closed when the
/// process runs out of descriptors, making room for one probe each.
#[derive(Debug)]
struct Reserve {
    files: Vec<File>,
    wanted: usize,
}

impl Reserve {
    fn new(wanted: usize) -> Self {
        let mut reserve = Self { files: Vec::with_capacity(wanted), wanted };
        reserve.refill();
        reserve
    }

    /// Opens files until the reserve is full or no descriptor is free; costs
    /// nothing while the reserve is full.
    fn refill(&mut self) {
        while self.is_short() {
            match File::open("/dev/null") {
                Ok(file) => self.files.push(file),
                Err(_) => break,
            }
        }
    }

    fn is_short(&self) -> bool {
        self.files.len() < self.wanted
    }

    /// Closes one reserve file; `false` if none is left.
    fn release_one(&mut self) -> bool {
        self.files.pop().is_some()
    }
}

/// The pause after accept errors and their rate-limited log.
#[derive(Debug)]
struct Backoff {
    delay: Duration,
    last_logged: Option<Instant>,
    /// Errors seen since the last log line, so the next line can say how many.
    unlogged: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { delay: BACKOFF_START, last_logged: None, unlogged: 0 }
    }
}

impl Backoff {
    /// Counts an error and logs it unless a line went out less than a second ago.
    fn note(&mut self, error: &io::Error, reserve_left: usize) {
        self.unlogged += 1;
        if self.last_logged.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            return;
        }
        tracing::warn!(
            %error,
            errors = self.unlogged,
            reserve_left,
            backoff_ms = self.delay.as_millis() as u64,
            "cannot accept connections; backing off (only /healthz and /metrics are served from the reserve)"
        );
        self.last_logged = Some(Instant::now());
        self.unlogged = 0;
    }

    /// The pause to take now; the next one is twice as long, up to the cap.
    fn next_delay(&mut self) -> Duration {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        delay
    }

    fn reset(&mut self) {
        self.delay = BACKOFF_START;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_are_classified() {
        let of = |code| classify(&io::Error::from_raw_os_error(code));
        assert_eq!(of(libc::ECONNABORTED), AcceptError::Connection);
        assert_eq!(of(libc::EMFILE), AcceptError::Descriptors);
        assert_eq!(of(libc::ENFILE), AcceptError::Descriptors);
        assert_eq!(of(libc::ENOBUFS), AcceptError::Resources);
        assert_eq!(of(libc::EBADF), AcceptError::Fatal);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays[0], BACKOFF_START);
        assert_eq!(delays[1], BACKOFF_START * 2);
        assert_eq!(delays[9], BACKOFF_MAX);
        backoff.reset();
        assert_eq!(backoff.next_delay(), BACKOFF_START);
    }

    #[test]
    fn reserve_releases_and_refills() {
        let mut reserve = Reserve::new(2);
        assert_eq!(reserve.files.len(), 2);
        assert!(reserve.release_one());
        assert!(reserve.release_one());
        assert!(!reserve.release_one());
        reserve.refill();
        assert_eq!(reserve.files.len(), 2);
    }
}
