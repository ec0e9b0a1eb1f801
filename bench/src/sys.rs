//! Operating-system knobs: the open-files limit, the clock tick, signals.
//! The only module allowed `unsafe` (three libc calls, each commented).
#![allow(unsafe_code)]

use std::io;

/// The open-files limits before and after raising the soft one.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct FileLimits {
    /// The soft limit found at start.
    pub(crate) soft_before: u64,
    /// The soft limit now.
    pub(crate) soft: u64,
    /// The hard limit.
    pub(crate) hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every reader is a socket.
pub(crate) fn raise_open_files_limit() -> io::Result<FileLimits> {
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

/// Clock ticks per second, the unit of CPU times in `/proc/PID/stat`.
pub(crate) fn clock_ticks_per_second() -> u64 {
    // SAFETY: `sysconf` only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Sends SIGTERM to a process this program started.
pub(crate) fn terminate(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: plain syscall; `pid` is positive, so it names one process (ours).
    unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
}
