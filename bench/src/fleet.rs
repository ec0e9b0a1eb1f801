//! The worker processes: spawned from this binary, fed a plan and commands
//! on stdin, heard on stdout.

use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command as Process};

use crate::hist::new_hist;
use crate::plan::{Command, Tick, WorkerMsg, WorkerPlan, WorkerResult};

#[derive(Debug)]
struct Worker {
    child: Child,
    stdin: ChildStdin,
}

/// What the workers said last.
#[derive(Debug)]
pub(crate) struct FleetState {
    pub(crate) ticks: Vec<Tick>,
    pub(crate) pids: Vec<Option<u32>>,
    pub(crate) results: Vec<Option<WorkerResult>>,
    /// Fast readers' latencies since the sampler last drained it.
    pub(crate) interval: Histogram<u64>,
}

/// The running workers.
#[derive(Debug)]
pub(crate) struct Fleet {
    workers: Vec<Worker>,
    pub(crate) state: Arc<Mutex<FleetState>>,
}

/// Sums of cumulative counters over workers; `initial_done_ms` is the
/// latest worker's, and 0 while any worker is not done.
pub(crate) fn sum(ticks: &[Tick]) -> Tick {
    let mut t = Tick::default();
    for tick in ticks {
        t.connected += tick.connected;
        t.handshakes += tick.handshakes;
        t.connect_failures += tick.connect_failures;
        t.frames += tick.frames;
        t.bytes += tick.bytes;
        t.storm_dropped += tick.storm_dropped;
        t.storm_back += tick.storm_back;
        t.refusals += tick.refusals;
        t.admitted_timeouts += tick.admitted_timeouts;
        t.initial_done_ms = t.initial_done_ms.max(tick.initial_done_ms);
    }
    if ticks.iter().any(|t| t.initial_done_ms == 0) {
        t.initial_done_ms = 0;
    }
    t
}

impl Fleet {
    pub(crate) async fn spawn(plans: Vec<WorkerPlan>) -> Result<Fleet, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let n = plans.len();
        let state = Arc::new(Mutex::new(FleetState {
            ticks: vec![Tick::default(); n],
            pids: vec![None; n],
            results: vec![None; n],
            interval: new_hist(),
        }));
        let mut workers = Vec::with_capacity(n);
        for (i, plan) in plans.into_iter().enumerate() {
            let mut child = Process::new(&exe)
                .arg("__worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start worker {i}: {e}"))?;
            let mut stdin = child.stdin.take().ok_or("worker stdin")?;
            let stdout = child.stdout.take().ok_or("worker stdout")?;
            let mut line = serde_json::to_string(&plan).map_err(|e| e.to_string())?;
            line.push('\n');
            stdin.write_all(line.as_bytes()).await.map_err(|e| format!("worker {i}: {e}"))?;
            stdin.flush().await.map_err(|e| format!("worker {i}: {e}"))?;
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(msg) = serde_json::from_str::<WorkerMsg>(&line) else {
                        eprintln!("worker {i}: unreadable line");
                        continue;
                    };
                    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                    match msg {
                        WorkerMsg::Started { pid, .. } => s.pids[i] = Some(pid),
                        WorkerMsg::Tick(tick) => {
                            let mut interval = std::mem::replace(&mut s.interval, new_hist());
                            tick.fast_latency_interval.add_to(&mut interval);
                            s.interval = interval;
                            s.ticks[i] = tick;
                        }
                        WorkerMsg::Result(result) => s.results[i] = Some(*result),
                    }
                }
            });
            workers.push(Worker { child, stdin });
        }
        Ok(Fleet { workers, state })
    }

    /// Sums of the workers' latest cumulative counters.
    pub(crate) fn totals(&self) -> Tick {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        sum(&s.ticks)
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).pids.iter().flatten().copied().collect()
    }

    pub(crate) async fn send(&mut self, command: &Command) {
        let Ok(mut line) = serde_json::to_string(command) else { return };
        line.push('\n');
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Err(e) = w.stdin.write_all(line.as_bytes()).await {
                eprintln!("worker {i}: cannot send a command: {e}");
            }
            let _ = w.stdin.flush().await;
        }
    }

    /// Waits for every worker's result (up to `limit`), then for the
    /// processes to exit; kills any that does not.
    pub(crate) async fn collect(mut self, limit: Duration) -> Vec<WorkerResult> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let done = {
                let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                s.results.iter().all(Option::is_some)
            };
            if done || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            if tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await.is_err() {
                eprintln!("worker {i} did not exit; killing it");
                let _ = w.child.kill().await;
            }
        }
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.results.iter_mut().filter_map(Option::take).collect()
    }
}
