//! Figures from `/proc` and `ss`: RSS and CPU time of a process, and the
//! kernel memory held by the sockets of one listening port.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use serde::Serialize;

use crate::plan::Profile;

/// `VmRSS` (or another `Vm*` line) of a process, in bytes.
pub(crate) fn vm_bytes(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    vm_bytes(pid, "VmRSS")
}

/// User plus system CPU time of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32, ticks_per_s: u64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after its ')'.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ')' come field 3 (state) onwards: utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_s as f64)
}

/// Kernel memory held by one class of sockets.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct SockMem {
    pub(crate) sockets: u64,
    /// Sum of `r + w + f + o + bl` from `skmem`: receive queue, send queue
    /// (queued, including in flight), forward-allocated reserve, options and
    /// backlog. The `rb`/`tb` limits are not memory held.
    pub(crate) bytes: u64,
    /// Of which sitting in send queues (`w`).
    pub(crate) send_queued: u64,
}

impl SockMem {
    fn add(&mut self, other: SockMem) {
        self.sockets += other.sockets;
        self.bytes += other.bytes;
        self.send_queued += other.send_queued;
    }
}

/// The server side of every TCP socket on `port`, by the peer's profile
/// (from its source address) and by TCP state.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SsSample {
    pub(crate) total: SockMem,
    pub(crate) by_profile: BTreeMap<String, SockMem>,
    pub(crate) by_state: BTreeMap<String, SockMem>,
}

/// Runs `ss -tmnHO state connected sport = :PORT` and sums `skmem`.
pub(crate) fn ss_sample(port: u16) -> Option<SsSample> {
    let output =
        Command::new("ss").args(["-tmnHO", "state", "connected", "sport", "=", &format!(":{port}")]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    Some(parse_ss(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_ss(text: &str) -> SsSample {
    let mut sample = SsSample::default();
    for line in text.lines() {
        let mut tokens = line.split_whitespace();
        let Some(state) = tokens.next() else { continue };
        let addrs: Vec<SocketAddr> = line.split_whitespace().filter_map(|t| t.parse().ok()).collect();
        let Some(skmem) = line.split("skmem:(").nth(1).and_then(|r| r.split(')').next()) else { continue };
        let mut mem = SockMem { sockets: 1, ..SockMem::default() };
        for field in skmem.split(',') {
            let key: String = field.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
            let Ok(value) = field[key.len()..].parse::<u64>() else { continue };
            match key.as_str() {
                "r" | "f" | "o" | "bl" => mem.bytes += value,
                "w" => {
                    mem.bytes += value;
                    mem.send_queued += value;
                }
                _ => {}
            }
        }
        let profile = match addrs.get(1).map(SocketAddr::ip) {
            Some(IpAddr::V4(ip)) => Profile::of_source(ip).map_or("other", Profile::label),
            _ => "other",
        };
        sample.total.add(mem);
        sample.by_profile.entry(profile.to_string()).or_default().add(mem);
        sample.by_state.entry(state.to_string()).or_default().add(mem);
    }
    sample
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_lines() {
        let text = "ESTAB 0 0 127.0.0.1:8080 127.12.0.1:40000 skmem:(r0,rb131072,t0,tb32768,f4096,w28000,o0,bl0,d0)\n\
                    FIN-WAIT-1 0 1 127.0.0.1:8080 127.10.0.1:40001 skmem:(r0,rb131072,t0,tb32768,f0,w1000,o0,bl0,d0) cubic\n";
        let s = parse_ss(text);
        assert_eq!(s.total.sockets, 2);
        assert_eq!(s.total.bytes, 33_096);
        assert_eq!(s.by_profile["stalled"].bytes, 32_096);
        assert_eq!(s.by_profile["fast"].send_queued, 1000);
        assert_eq!(s.by_state["FIN-WAIT-1"].sockets, 1);
    }
}
