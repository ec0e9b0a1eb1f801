//! Admission control for subscriptions (WebSocket, SSE, waiting long-polls):
//! a global cap, an optional per-address cap, and a token bucket on new
//! subscriptions. It runs before the upgrade and before any per-connection
//! allocation, so turning a storm away is cheap. When tokens are short,
//! readers that resume (they name a position they hold) go first: part of
//! the bucket is reserved for them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::protocol::jittered_ms;

/// The share of the bucket that only resuming readers may take.
const RESUME_RESERVE: f64 = 0.25;

/// Why a subscription was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-connections` reached.
    Full,
    /// `--max-connections-per-ip` reached for this address.
    PerIp,
    /// The token bucket is empty (a reconnect storm).
    Rate,
    /// The process is over its memory limit; the memory guard is cutting
    /// readers off and new ones would only take their place.
    Memory,
}

impl Refusal {
    /// The label used in metrics and notices.
    pub const fn label(self) -> &'static str {
        match self {
            Refusal::Full => "max_connections",
            Refusal::PerIp => "per_ip",
            Refusal::Rate => "accept_rate",
            Refusal::Memory => "memory",
        }
    }
}

/// How a reader arrives, for the token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// A new reader.
    New,
    /// A reader naming a position it holds: may use the reserved share.
    Resuming,
    /// The same reader again on an admitted connection: no token needed.
    Continuing,
}

/// A refused subscription and when to come back.
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    /// Why.
    pub why: Refusal,
    /// A jittered hint, in milliseconds.
    pub retry_after_ms: u64,
}

/// The token bucket's state.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// The admission policy and its live counts.
#[derive(Debug)]
pub struct Admission {
    max_connections: usize,
    per_ip_cap: usize,
    rate: f64,
    burst: f64,
    /// Reader connections admitted and still open.
    open: AtomicUsize,
    /// Open connections per client address; only kept when a cap is set.
    /// A `std` mutex: one short update per connect and disconnect.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// The token bucket on new subscriptions.
    bucket: Mutex<Bucket>,
    /// Admitted subscriptions.
    pub admitted: AtomicU64,
    /// Refused subscriptions, by `Refusal`.
    refused: [AtomicU64; 4],
    /// Set by the memory guard while the process is above its memory
    /// limit's high-water mark.
    pub memory_pressure: AtomicBool,
}

impl Admission {
    /// A policy: at most `max_connections` open, `per_ip_cap` per address (0
    /// for none), `rate` new subscriptions per second with bursts of `burst`.
    pub fn new(max_connections: usize, per_ip_cap: usize, rate: u32, burst: u32) -> Arc<Self> {
        Arc::new(Self {
            max_connections,
            per_ip_cap,
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            bucket: Mutex::new(Bucket { tokens: f64::from(burst.max(1)), refilled: Instant::now() }),
            admitted: AtomicU64::new(0),
            refused: Default::default(),
            memory_pressure: AtomicBool::new(false),
        })
    }

    /// Admits a subscription from `ip`, or says why not and when to retry.
    /// `resuming` readers may use the reserved part of the bucket.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, resuming: bool) -> Result<Permit, Refused> {
        self.admit_as(ip, if resuming { Arrival::Resuming } else { Arrival::New })
    }

    /// Admits a reader that is continuing on a connection already admitted
    /// before (a long-poll's next poll): the caps apply, the bucket does not.
    pub fn admit_continuing(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refused> {
        self.admit_as(ip, Arrival::Continuing)
    }

    fn admit_as(self: &Arc<Self>, ip: IpAddr, arrival: Arrival) -> Result<Permit, Refused> {
        let resuming = arrival == Arrival::Resuming;
        let refuse = |why: Refusal, base_ms: u64| {
            self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
            Err(Refused { why, retry_after_ms: jittered_ms(base_ms, base_ms.max(1000) * 2) })
        };
        if self.open.load(Ordering::Relaxed) >= self.max_connections {
            return refuse(Refusal::Full, 2000);
        }
        if self.memory_pressure.load(Ordering::Relaxed) {
            return refuse(Refusal::Memory, 5000);
        }
        // The per-address cap first: a refusal there must not use a token.
        if self.per_ip_cap > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= self.per_ip_cap {
                drop(per_ip);
                return refuse(Refusal::PerIp, 5000);
            }
            *count += 1;
        }
        // From here on a refusal gives the per-address place back.
        let permit = Permit { admission: Arc::clone(self), ip };
        if arrival != Arrival::Continuing {
            let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let refill = now.duration_since(bucket.refilled).as_secs_f64() * self.rate;
            bucket.tokens = (bucket.tokens + refill).min(self.burst);
            bucket.refilled = now;
            let floor = if resuming { 1.0 } else { 1.0 + self.burst * RESUME_RESERVE };
            if bucket.tokens < floor {
                // Come back about when the bucket will have room for this
                // kind of reader, spread so the storm does not return at once.
                let wait_ms = ((floor - bucket.tokens) / self.rate * 1000.0).ceil() as u64;
                drop(bucket);
                // Not counted as open yet: undo only the per-address count.
                self.open.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                return refuse(Refusal::Rate, wait_ms.max(250));
            }
            bucket.tokens -= 1.0;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(permit)
    }

    /// Subscriptions open now.
    pub fn open_now(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Refusals so far for `why`.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// Every refusal reason, for metrics.
    pub const REASONS: [Refusal; 4] = [Refusal::Full, Refusal::PerIp, Refusal::Rate, Refusal::Memory];
}

/// An admitted connection; dropping it gives the place back.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::Relaxed);
        if self.admission.per_ip_cap > 0 {
            let mut per_ip = self.admission.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = per_ip.get_mut(&self.ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

/// The client's address: the peer, or the last address in `X-Forwarded-For`
/// that a trusted proxy appended when the peer is one.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    // Walk from the right: each trusted hop appended the address it saw.
    let mut client = peer;
    if let Some(list) = forwarded_for {
        for hop in list.rsplit(',').map(str::trim) {
            match hop.parse::<IpAddr>() {
                Ok(ip) if trusted.contains(&ip) => client = ip,
                Ok(ip) => return ip,
                Err(_) => return client,
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn the_bucket_keeps_a_reserve_for_resuming_readers() {
        let admission = Admission::new(1000, 0, 1, 8);
        let mut permits = Vec::new();
        // New readers may take the bucket down to the reserve (25% of 8).
        while let Ok(p) = admission.admit(IP, false) {
            permits.push(p);
        }
        assert_eq!(permits.len(), 6);
        let refused = admission.admit(IP, false).expect_err("new readers wait");
        assert_eq!(refused.why, Refusal::Rate);
        assert!(refused.retry_after_ms >= 250);
        // Resuming readers still get in.
        permits.push(admission.admit(IP, true).expect("resuming first"));
        assert!(admission.admit(IP, true).is_ok());
        assert!(admission.admit(IP, true).is_err(), "until the bucket is empty");
    }

    #[test]
    fn caps_hold_and_permits_give_places_back() {
        let admission = Admission::new(2, 0, 1000, 1000);
        let a = admission.admit(IP, false).expect("a");
        let _b = admission.admit(IP, false).expect("b");
        assert_eq!(admission.admit(IP, false).expect_err("full").why, Refusal::Full);
        drop(a);
        assert!(admission.admit(IP, false).is_ok());
        let per_ip = Admission::new(100, 1, 1000, 1000);
        let _one = per_ip.admit(IP, false).expect("one");
        assert_eq!(per_ip.admit(IP, false).expect_err("per ip").why, Refusal::PerIp);
        let other: IpAddr = "127.0.0.2".parse().expect("ip");
        assert!(per_ip.admit(other, false).is_ok());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().expect("ip");
        let client: IpAddr = "203.0.113.7".parse().expect("ip");
        assert_eq!(client_ip(client, Some("1.2.3.4"), &[proxy]), client, "an untrusted peer's header is ignored");
        assert_eq!(client_ip(proxy, Some("1.2.3.4, 203.0.113.7"), &[proxy]), client);
        assert_eq!(client_ip(proxy, None, &[proxy]), proxy);
    }
}
