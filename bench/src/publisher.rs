//! The publisher: states `{"seq","ts","pad"}` over HTTP, at a rate per topic
//! (fanout, slow-readers) or as fast as acknowledged (publish).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::time::{Instant, MissedTickBehavior};

use crate::frame::state_body;
use crate::hist::{new_hist, record};
use crate::worker::now_ns;

/// Sends one state per call.
#[derive(Debug)]
pub(crate) struct Publisher {
    client: reqwest::Client,
    /// One template per hub; hub 1's is used unless `round_robin`.
    url_templates: Vec<String>,
    /// Rotate publishes over the hubs by sequence number.
    round_robin: bool,
    method: reqwest::Method,
    headers: HeaderMap,
    payload: usize,
}

/// Publishing figures, shared by every publisher task.
#[derive(Debug)]
pub(crate) struct PubStats {
    pub(crate) attempted: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) errors: Mutex<BTreeMap<String, u64>>,
    pub(crate) ack: Mutex<Histogram<u64>>,
    /// Per topic: the sequence number of the newest acknowledged state (by
    /// the server's version when the acknowledgement carries one, so
    /// concurrent publishes that commit out of order are judged right), and
    /// when it was sent.
    pub(crate) last_acked: Vec<AtomicU64>,
    pub(crate) last_sent_ns: Vec<AtomicU64>,
    finals: Mutex<Vec<(u64, u64, u64)>>,
    /// Rate ticks skipped because `MAX_IN_FLIGHT` publishes were outstanding.
    pub(crate) ticks_skipped: AtomicU64,
}

impl PubStats {
    pub(crate) fn new(topics: usize) -> Self {
        Self {
            attempted: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            errors: Mutex::default(),
            ack: Mutex::new(new_hist()),
            last_acked: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            last_sent_ns: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            finals: Mutex::new(vec![(0, 0, 0); topics]),
            ticks_skipped: AtomicU64::new(0),
        }
    }
}

impl Publisher {
    pub(crate) fn new(
        url_templates: Vec<String>,
        round_robin: bool,
        method: &str,
        token: &str,
        extra_headers: &[String],
        payload: usize,
    ) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if !token.is_empty() {
            let value =
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| "the token is not a header value")?;
            headers.insert(AUTHORIZATION, value);
        }
        for h in extra_headers {
            let (name, value) = h.split_once(':').ok_or_else(|| format!("header {h:?}: use `Name: value`"))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| format!("header {h:?}: {e}"))?;
            let value = HeaderValue::from_str(value.trim()).map_err(|e| format!("header {h:?}: {e}"))?;
            headers.insert(name, value);
        }
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| format!("method {method:?}: {e}"))?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        if url_templates.is_empty() {
            return Err("no publish URL".into());
        }
        Ok(Self { client, url_templates, round_robin, method, headers, payload })
    }

    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Publishes `seq` on `topic` and waits for the acknowledgement.
    pub(crate) async fn publish(&self, stats: &PubStats, topic_index: usize, topic: &str, seq: u64) -> bool {
        let sent = now_ns();
        let body = state_body(seq, sent, self.payload);
        let template = if self.round_robin {
            &self.url_templates[seq as usize % self.url_templates.len()]
        } else {
            &self.url_templates[0]
        };
        let url = template.replace("{topic}", topic);
        let started = Instant::now();
        stats.attempted.fetch_add(1, Ordering::Relaxed);
        let result = self
            .client
            .request(self.method.clone(), url)
            .headers(self.headers.clone())
            .body(body)
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        let outcome = match result {
            Ok(response) if response.status().is_success() => {
                // Read the acknowledgement to the end so the connection is reused.
                let body = response.bytes().await.unwrap_or_default();
                Ok(crate::frame::number_after(&body, b"\"version\":"))
            }
            Ok(response) => Err(format!("status {}", response.status().as_u16())),
            Err(e) if e.is_timeout() => Err("timeout".to_string()),
            Err(e) if e.is_connect() => Err("connect".to_string()),
            Err(_) => Err("transport".to_string()),
        };
        match outcome {
            Ok(version) => {
                let took = started.elapsed();
                stats.acked.fetch_add(1, Ordering::Relaxed);
                record(&mut stats.ack.lock().unwrap_or_else(PoisonError::into_inner), took.as_micros() as u64);
                let mut finals = stats.finals.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(f) = finals.get_mut(topic_index) {
                    // Order by version when the server gives one, else by seq.
                    let key = version.unwrap_or(seq);
                    if key >= f.0 {
                        *f = (key, seq, sent);
                        stats.last_acked[topic_index].store(seq, Ordering::Relaxed);
                        stats.last_sent_ns[topic_index].store(sent, Ordering::Relaxed);
                    }
                }
                true
            }
            Err(label) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                *stats.errors.lock().unwrap_or_else(PoisonError::into_inner).entry(label).or_default() += 1;
                false
            }
        }
    }
}

/// Most publishes outstanding per topic: slow acknowledgements (a durable
/// commit) must not lower the offered rate, but a server that stops
/// answering must not collect unbounded requests either.
const MAX_IN_FLIGHT: usize = 8;

/// Publishes on one topic at `rate` per second until `until`. Each tick
/// sends one state without waiting for the previous acknowledgement (up to
/// `MAX_IN_FLIGHT`); ticks beyond that are skipped and counted.
pub(crate) async fn at_rate(
    publisher: Arc<Publisher>,
    stats: Arc<PubStats>,
    topic_index: usize,
    topic: String,
    rate: f64,
    until: Instant,
    first_seq: u64,
) {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    // Topics start spread over one period so their publishes interleave.
    let offset = period.mul_f64(topic_index as f64 / stats.last_acked.len().max(1) as f64);
    let mut ticks = tokio::time::interval_at(Instant::now() + offset, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut seq = first_seq;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let at = ticks.tick().await;
        if at >= until {
            break;
        }
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            stats.ticks_skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (publisher, stats, topic) = (Arc::clone(&publisher), Arc::clone(&stats), topic.clone());
        tasks.spawn(async move {
            publisher.publish(&stats, topic_index, &topic, seq).await;
            drop(permit);
        });
        seq += 1;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Publishes as fast as acknowledgements come back until `until`; each
/// publisher has its own topic so sequence numbers stay ordered.
pub(crate) async fn flood(
    publisher: Arc<Publisher>,
    stats: Arc<PubStats>,
    topic_index: usize,
    topic: String,
    until: Instant,
) {
    let mut seq = 1;
    while Instant::now() < until {
        if !publisher.publish(&stats, topic_index, &topic, seq).await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seq += 1;
    }
}
