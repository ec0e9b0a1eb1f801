//! Operating-system knobs: the open-files limit and per-socket options. The
//! only module allowed `unsafe` (a few libc calls), each call commented.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// The open-files limits before and after raising the soft one.
#[derive(Debug, Clone, Copy)]
pub struct FileLimits {
    /// The soft limit found at start.
    pub soft_before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (the ceiling; cannot be raised without privilege).
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every reader is a
/// socket, and the default soft limit (often 1024) would cap a hub early.
pub fn raise_open_files_limit() -> io::Result<FileLimits> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable `rlimit` for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid `rlimit` read from the kernel just above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(FileLimits { soft_before, soft: lim.rlim_cur, hard: lim.rlim_max })
}

/// Sets `SO_SNDBUF` on a connected socket. Setting it disables the kernel's
/// send-buffer autotuning for that socket, which is the point: a reader that
/// stops reading can pin at most this much (Linux doubles the figure for its
/// own bookkeeping).
pub fn set_send_buffer(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` outlives the call and the length passed is its size;
    // `fd` is a socket owned by the connection serving the current request,
    // which stays open at least until this handler returns.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sets `TCP_USER_TIMEOUT`: the kernel aborts the connection when sent data
/// stays unacknowledged this long (zero-window probes included), which ends
/// readers that vanished without a FIN even on transports without pings.
pub fn set_user_timeout(fd: RawFd, timeout: std::time::Duration) -> io::Result<()> {
    let value = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: as in `set_send_buffer`: a live socket and a correctly sized value.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Bytes in the socket's send queue that the peer has not acknowledged yet
/// (`SIOCOUTQ`). Streaming responses use it to hand hyper a new event only
/// once the kernel has taken the previous ones.
pub fn unacked_bytes(fd: RawFd) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    // SAFETY: `value` is a valid `int` the kernel writes into; `fd` is the
    // socket of the response being streamed, open while the stream lives.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut value) };
    if rc == 0 { Ok(usize::try_from(value).unwrap_or(0)) } else { Err(io::Error::last_os_error()) }
}

/// Shuts a socket down in both directions, so that whoever holds it sees the
/// connection end at its next read or write. Used to cut off a streaming
/// reader whose socket has taken nothing for the write timeout.
pub fn shutdown_socket(fd: RawFd) {
    // SAFETY: shutting down a socket we are serving; a stale descriptor
    // yields an error we ignore, never memory unsafety.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// What a handler knows about the TCP connection it is serving: the peer's
/// address, and the socket, so a request that becomes a subscription can clamp
/// its send buffer (ordinary requests keep the kernel's defaults). The accept
/// loop (`crate::server`) puts it into every request as `ConnectInfo<Peer>`.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    /// The connection's socket. Valid while the request is being served.
    pub fd: RawFd,
}

/// Set on a connection once one of its long-polls has been answered: the
/// next poll on it is the same reader continuing, not a new subscription,
/// so admission's token bucket (meant for storms of new readers) lets it
/// through; the connection caps still apply. One per connection, shared by
/// its requests.
#[derive(Debug, Clone, Default)]
pub struct Polled(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

/// Hands memory the allocator holds but no longer uses back to the system
/// (glibc's `malloc_trim`), so that resident memory reflects what is in use:
/// the memory guard judges `--memory-limit` by RSS. A no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes a plain integer (bytes of slack to keep at
    // the top of the heap) and only releases free pages; it is safe to call
    // at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
