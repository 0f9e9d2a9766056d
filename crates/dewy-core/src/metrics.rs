//! Counters since dewy started, for `/metrics` and OTLP.

/// Counters for metrics, all since dewy started.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Successful deploys.
    pub deployments: std::sync::atomic::AtomicU64,
    /// Failed deploys (a tick that got as far as a release and failed).
    pub deployment_errors: std::sync::atomic::AtomicU64,
    /// Sum of successful deploy durations, in milliseconds.
    pub deployment_millis: std::sync::atomic::AtomicU64,
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
