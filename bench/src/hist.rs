//! HDR histograms of microseconds, and their transport between processes as
//! `(value, count)` pairs (no serialisation feature needed).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microseconds, 1 µs to one hour, three significant figures.
pub(crate) fn new_hist() -> Histogram<u64> {
    // Fails only for invalid constant bounds, which these are not.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Records `micros`, clamped into the histogram's range.
pub(crate) fn record(h: &mut Histogram<u64>, micros: u64) {
    let v = micros.clamp(1, 3_600_000_000);
    let _ = h.record(v);
}

/// A histogram as recorded `(value, count)` pairs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Dump(pub(crate) Vec<(u64, u64)>);

impl Dump {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        Self(h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect())
    }

    pub(crate) fn add_to(&self, h: &mut Histogram<u64>) {
        for &(value, count) in &self.0 {
            let _ = h.record_n(value.clamp(1, 3_600_000_000), count);
        }
    }
}

/// Percentiles in milliseconds, for the JSON result.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Summary {
    pub(crate) count: u64,
    pub(crate) mean_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

impl Summary {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}
