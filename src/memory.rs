//! The memory guard: keeps the bytes handed to reader sockets and not yet
//! flushed under `--send-budget`, and the process's resident memory under
//! `--memory-limit`, by cutting off first the readers whose frame has been
//! stuck the longest (they are looking at the stalest board and cost the most
//! to keep). While the process is above its memory limit, admission turns new
//! subscriptions away as well, so the cut readers' places are not refilled.
//!
//! Each limit has a high-water mark (the value given) and a low-water mark
//! (four fifths of it): a round of cut-offs starts above the first and goes on
//! until the estimate is below the second, so the guard does not nibble at the
//! limit one connection per tick.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::metrics::{ConnStats, Connections, Cutoff, EVICTED, Metrics};

/// How often the guard looks. Stalled frames pile up at the publish rate at
/// most, so a tenth of a second keeps any overshoot small.
const TICK: Duration = Duration::from_millis(100);

/// After a round driven by resident memory, how long to wait before judging
/// it again: freed buffers take a moment to leave the allocator's books.
const RSS_SETTLE: Duration = Duration::from_secs(1);

/// A frame in flight for less than this is a reader keeping up (a 64 KiB
/// state takes half a second on a 1 Mbit/s link), not a stalled one: the
/// guard never cuts it, however far over a mark the process is. Without this
/// floor, a limit that cutting stalled readers cannot satisfy would go on to
/// cut healthy readers caught with a frame on the wire.
const MIN_STUCK_MS: u64 = 1000;

/// The guard's marks, in bytes; a zero high-water mark turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Unflushed bytes above which readers are cut off.
    pub send_high: u64,
    /// Unflushed bytes a round of cut-offs aims below.
    pub send_low: u64,
    /// Resident memory above which readers are cut off and new ones refused.
    pub memory_high: u64,
    /// Resident memory a round aims below, and below which new readers are
    /// admitted again.
    pub memory_low: u64,
}

impl Limits {
    /// Marks from `--send-budget` and `--memory-limit` (0 turns either off).
    pub fn new(send_budget: u64, memory_limit: u64) -> Self {
        Self {
            send_high: send_budget,
            send_low: send_budget / 5 * 4,
            memory_high: memory_limit,
            memory_low: memory_limit / 5 * 4,
        }
    }
}

/// One connection as the guard sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The registry id.
    pub id: u64,
    /// Since when its frame has been in flight (`metrics::process_ms`).
    pub since_ms: u64,
    /// Bytes it holds unflushed.
    pub bytes: u64,
}

/// Chooses whom to cut: oldest frame first, until the bytes freed (plus
/// `overhead` per connection, the rest of what a connection holds) reach
/// `need`. Pure, so the order is unit-tested.
pub fn plan(mut candidates: Vec<Candidate>, need: u64, overhead: u64) -> Vec<u64> {
    candidates.sort_by_key(|c| (c.since_ms, c.id));
    let mut freed = 0u64;
    let mut chosen = Vec::new();
    for c in candidates {
        if freed >= need {
            break;
        }
        freed = freed.saturating_add(c.bytes).saturating_add(overhead);
        chosen.push(c.id);
    }
    chosen
}

/// Runs the guard until shutdown.
pub async fn run(
    limits: Limits,
    metrics: Arc<Metrics>,
    connections: Arc<Connections>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
) {
    if limits.send_high == 0 && limits.memory_high == 0 {
        return;
    }
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut next_rss_round = Instant::now();
    let mut warned: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut need = 0u64;
        let mut overhead = 0u64;
        // Cheap first look: the gauge includes readers already cut off and
        // still in their close grace, so only when it is high is the list read.
        let over_budget = limits.send_high > 0 && metrics.bytes_in_flight.load(Ordering::Relaxed) > limits.send_high;
        if limits.memory_high > 0
            && let Some(rss) = resident_bytes()
        {
            let pressure = admission.memory_pressure.load(Ordering::Relaxed);
            if rss > limits.memory_high && !pressure {
                tracing::warn!(
                    rss,
                    limit = limits.memory_high,
                    "over the memory limit: refusing new readers, cutting the stalest"
                );
                admission.memory_pressure.store(true, Ordering::Relaxed);
            } else if rss < limits.memory_low && pressure {
                tracing::info!(rss, "back under the memory limit's low-water mark: admitting readers again");
                admission.memory_pressure.store(false, Ordering::Relaxed);
            }
            if rss > limits.memory_high && Instant::now() >= next_rss_round {
                next_rss_round = Instant::now() + RSS_SETTLE;
                need = rss - limits.memory_low;
                // Part of RSS may be memory freed but kept by the allocator;
                // hand it back before judging how much to cut next time.
                tokio::task::spawn_blocking(crate::net::release_free_memory);
                // A cut connection frees more than its unflushed frame: its
                // buffers, task and registry entry. Estimate that share.
                overhead = rss / (connections.len() as u64).max(1);
            }
        }
        if need == 0 && !over_budget {
            continue;
        }
        // One copy of the registry serves the whole round.
        let open = connections.list();
        if over_budget {
            let pending = effective_in_flight(&open);
            if pending > limits.send_high {
                need = need.max(pending - limits.send_low);
            }
        }
        if need == 0 {
            continue;
        }
        let stuck_before = crate::metrics::process_ms().saturating_sub(MIN_STUCK_MS);
        let candidates: Vec<Candidate> = open
            .iter()
            .filter_map(|c| {
                let since_ms = c.in_flight_since_ms.load(Ordering::Relaxed);
                (since_ms != 0 && since_ms != EVICTED && since_ms <= stuck_before).then(|| Candidate {
                    id: c.id,
                    since_ms,
                    bytes: c.in_flight_bytes.load(Ordering::Relaxed),
                })
            })
            .collect();
        let chosen: std::collections::HashSet<u64> = plan(candidates, need, overhead).into_iter().collect();
        if chosen.is_empty() {
            if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                warned = Some(Instant::now());
                tracing::warn!(need, "over a memory mark with no stalled reader left to cut");
            }
            continue;
        }
        tracing::info!(readers = chosen.len(), need, "memory guard: cutting off the stalest readers");
        for c in open.iter().filter(|c| chosen.contains(&c.id)) {
            c.in_flight_since_ms.store(EVICTED, Ordering::Relaxed);
            metrics.cutoff(Cutoff::Memory);
            // `notify_one` stores a permit, so a connection busy elsewhere in
            // its loop still sees it at its next wait.
            c.evict.notify_one();
        }
        if overhead > 0 {
            // The memory of the readers just cut is freed over the next
            // second (their close grace); hand it back to the system then,
            // or glibc keeps it and RSS never shows the cut.
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let _ = tokio::task::spawn_blocking(crate::net::release_free_memory).await;
            });
        }
    }
}

/// Unflushed bytes of connections not already cut off.
fn effective_in_flight(open: &[Arc<ConnStats>]) -> u64 {
    open.iter()
        .filter(|c| c.in_flight_since_ms.load(Ordering::Relaxed) != EVICTED)
        .map(|c| c.in_flight_bytes.load(Ordering::Relaxed))
        .sum()
}

/// The process's resident set size, from `/proc/self/statm`.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Linux on the machines we run on uses 4 KiB pages; reading the page size
    // would take `unsafe` sysconf for no practical gain.
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, since_ms: u64, bytes: u64) -> Candidate {
        Candidate { id, since_ms, bytes }
    }

    #[test]
    fn the_stalest_go_first_and_only_as_many_as_needed() {
        let candidates = vec![c(1, 300, 100), c(2, 100, 100), c(3, 200, 100), c(4, 400, 100)];
        assert_eq!(plan(candidates.clone(), 150, 0), vec![2, 3]);
        assert_eq!(plan(candidates.clone(), 1, 0), vec![2]);
        assert_eq!(plan(candidates.clone(), 0, 0), Vec::<u64>::new());
        assert_eq!(plan(candidates, 10_000, 0), vec![2, 3, 1, 4], "everyone, oldest first, if that is what it takes");
    }

    #[test]
    fn overhead_counts_towards_what_a_cut_frees() {
        let candidates = vec![c(1, 1, 10), c(2, 2, 10), c(3, 3, 10)];
        assert_eq!(plan(candidates, 100, 40), vec![1, 2]);
    }

    #[test]
    fn marks_are_four_fifths_apart_and_zero_is_off() {
        let limits = Limits::new(1000, 0);
        assert_eq!((limits.send_high, limits.send_low, limits.memory_high, limits.memory_low), (1000, 800, 0, 0));
    }

    #[test]
    fn resident_memory_is_readable() {
        assert!(resident_bytes().is_some_and(|rss| rss > 0));
    }
}
