//! Latency histograms that any thread records into without a lock, read for metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets of every [`LatencyHistogram`], in seconds, from 50 µs
/// (a fast disk's sync, a task taken as soon as it is offered) to 60 s (a stalled disk,
/// a task that waited for a worker); one more bucket holds what is slower.
pub const LATENCY_BUCKETS_SECONDS: [f64; 19] = [
    0.000_05, 0.000_1, 0.000_2, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
    2.0, 5.0, 10.0, 30.0, 60.0,
];

/// Number of buckets: one per bound, and the last for everything slower.
const BUCKETS: usize = LATENCY_BUCKETS_SECONDS.len() + 1;

/// Counts of durations by bucket, and their sum, since it was made.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> LatencyHistogram {
        LatencyHistogram::default()
    }

    /// Counts one duration.
    pub fn record(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS - 1);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// What it has counted so far. Taken while others record, the counts and the sum
    /// may be a few durations apart.
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut buckets = [0; BUCKETS];
        for (count, bucket) in buckets.iter_mut().zip(&self.counts) {
            *count = bucket.load(Ordering::Relaxed);
        }
        LatencySnapshot {
            buckets,
            sum_seconds: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)).as_secs_f64(),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencySnapshot {
    /// Durations counted in each bucket of [`LATENCY_BUCKETS_SECONDS`] (not
    /// cumulative), then those slower than the last bound.
    pub buckets: [u64; BUCKETS],
    /// The sum of every duration counted, in seconds.
    pub sum_seconds: f64,
}

impl LatencySnapshot {
    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_is_counted_in_the_first_bucket_whose_bound_holds_it() {
        let histogram = LatencyHistogram::new();
        histogram.record(Duration::from_micros(50));
        histogram.record(Duration::from_micros(51));
        histogram.record(Duration::from_millis(3));
        histogram.record(Duration::from_secs(100));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.buckets[0], 1);
        assert_eq!(snapshot.buckets[1], 1);
        assert_eq!(snapshot.buckets[6], 1);
        assert_eq!(snapshot.buckets[BUCKETS - 1], 1);
        assert_eq!(snapshot.count(), 4);
        assert!((snapshot.sum_seconds - 100.003_101).abs() < 1e-9);
    }
}
