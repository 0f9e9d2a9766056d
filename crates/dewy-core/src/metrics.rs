//! Counters since dewy started, for `/metrics` and OTLP.

/// Counters for metrics, all since dewy started.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Successful deploys.
    pub deployments: std::sync::atomic::AtomicU64,
    /// Failed deploys (a tick that got as far as a release and failed).
    pub deployment_errors: std::sync::atomic::AtomicU64,
    /// Durations of successful deploys.
    pub deployment_duration: Histogram,
    /// Restarts for a deploy.
    pub restarts_deploy: std::sync::atomic::AtomicU64,
    /// Restarts asked for by a signal or the admin API.
    pub restarts_signal: std::sync::atomic::AtomicU64,
    /// Ticks by outcome: skipped, deployed, grace, known-bad, error.
    pub ticks_skipped: std::sync::atomic::AtomicU64,
    /// See `ticks_skipped`.
    pub ticks_deployed: std::sync::atomic::AtomicU64,
    /// See `ticks_skipped`.
    pub ticks_grace: std::sync::atomic::AtomicU64,
    /// See `ticks_skipped`.
    pub ticks_known_bad: std::sync::atomic::AtomicU64,
    /// See `ticks_skipped`.
    pub ticks_error: std::sync::atomic::AtomicU64,
    /// Registry answers: a release.
    pub registry_ok: std::sync::atomic::AtomicU64,
    /// Registry answers: no artifact for this host (yet).
    pub registry_not_found: std::sync::atomic::AtomicU64,
    /// Registry failures.
    pub registry_errors: std::sync::atomic::AtomicU64,
    /// Artifacts downloaded.
    pub downloads: std::sync::atomic::AtomicU64,
    /// Bytes downloaded.
    pub download_bytes: std::sync::atomic::AtomicU64,
    /// Deploys served from the cache without a download.
    pub cache_hits: std::sync::atomic::AtomicU64,
    /// Hooks that succeeded.
    pub hooks_ok: std::sync::atomic::AtomicU64,
    /// Hooks that failed (or timed out).
    pub hooks_failed: std::sync::atomic::AtomicU64,
    /// Unexpected exits of the application.
    pub app_crashes: std::sync::atomic::AtomicU64,
    /// Automatic rollbacks.
    pub rollbacks: std::sync::atomic::AtomicU64,
    /// Times connections waited in the accept queue with no generation
    /// accepting them.
    pub accept_queue_stalls: std::sync::atomic::AtomicU64,
    /// Time spent in each deploy phase, in milliseconds: downloading.
    pub phase_download_millis: std::sync::atomic::AtomicU64,
    /// See `phase_download_millis`: extracting.
    pub phase_extract_millis: std::sync::atomic::AtomicU64,
    /// See `phase_download_millis`: running hooks and health commands.
    pub phase_hooks_millis: std::sync::atomic::AtomicU64,
    /// See `phase_download_millis`: starting or restarting the app until ready.
    pub phase_start_millis: std::sync::atomic::AtomicU64,
}

pub(crate) fn add_millis(counter: &std::sync::atomic::AtomicU64, since: std::time::Instant) {
    counter.fetch_add(since.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
}

/// The upper bounds, in seconds, of the deploy-duration buckets (Dewy's).
pub const DEPLOYMENT_BUCKETS: [u64; 8] = [1, 5, 10, 30, 60, 120, 300, 600];

/// A histogram of durations over [`DEPLOYMENT_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [std::sync::atomic::AtomicU64; DEPLOYMENT_BUCKETS.len() + 1],
    sum_millis: std::sync::atomic::AtomicU64,
    count: std::sync::atomic::AtomicU64,
    /// Observations (seconds) not yet taken by [`Histogram::take_new`]; the
    /// newest [`PENDING_MAX`] are kept.
    pending: std::sync::Mutex<std::collections::VecDeque<f64>>,
}

/// Observations kept for [`Histogram::take_new`].
const PENDING_MAX: usize = 1024;

/// A reading of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, cumulative count)`, `+Inf` last as
    /// `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = DEPLOYMENT_BUCKETS
            .iter()
            .position(|b| d.as_secs_f64() <= *b as f64)
            .unwrap_or(DEPLOYMENT_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_millis.fetch_add(d.as_millis() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.len() == PENDING_MAX {
            pending.pop_front();
        }
        pending.push_back(d.as_secs_f64());
    }

    /// The observations (in seconds) since the last call, for an exporter
    /// that records them into its own histogram (OTLP). One consumer only.
    pub fn take_new(&self) -> Vec<f64> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect()
    }

    /// The cumulative buckets, the sum and the count now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let mut total = 0;
        let bounds = DEPLOYMENT_BUCKETS.iter().map(|b| *b as f64).chain([f64::INFINITY]);
        let buckets = bounds
            .zip(&self.buckets)
            .map(|(bound, n)| {
                total += n.load(Relaxed);
                (bound, total)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum_seconds: self.sum_millis.load(Relaxed) as f64 / 1000.0,
            count: self.count.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_last() {
        let h = super::Histogram::default();
        for secs in [0.5, 3.0, 3.0, 700.0] {
            h.observe(Duration::from_secs_f64(secs));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (1.0, 1));
        assert_eq!(s.buckets[1], (5.0, 3));
        assert_eq!(s.buckets[7], (600.0, 3));
        assert_eq!(s.buckets[8], (f64::INFINITY, 4));
        assert!((s.sum_seconds - 706.5).abs() < 0.01);
        assert_eq!(h.take_new(), [0.5, 3.0, 3.0, 700.0]);
        assert!(h.take_new().is_empty(), "taken once");
    }
}
