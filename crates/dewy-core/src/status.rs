//! What the loop is doing, for `dewy status` and the admin API.

/// What the loop is doing, for `dewy status` and the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// `server` or `assets`.
    pub mode: &'static str,
    /// dewy's version.
    pub dewy_version: String,
    /// The version running (or placed).
    pub current_version: Option<String>,
    /// Where `current` points.
    pub current_release: Option<String>,
    /// Whether the application runs (server mode).
    pub is_running: bool,
    /// The generation serving now and its pid (server mode).
    pub generation: Option<u64>,
    /// See `generation`.
    pub pid: Option<u32>,
    /// The release before the current one on disk (what `dewy rollback`
    /// would go back to).
    pub previous_release: Option<String>,
    /// When the last check ended.
    pub last_check: Option<String>,
    /// How it ended: skipped, deployed, grace-period, known-bad, error.
    pub last_outcome: Option<String>,
    /// The last error, if the last check failed.
    pub last_error: Option<String>,
    /// When the next check is due.
    pub next_check: Option<String>,
    /// A release that failed to start and is not retried.
    pub bad_release: Option<String>,
    /// The version an operator pinned, if any.
    pub pinned: Option<String>,
    /// The release being deployed right now, if a deploy is in flight.
    pub deploying: Option<String>,
    /// The shared cache cannot be reached and dewy works on its local copy:
    /// the bucket and the error.
    pub cache_degraded: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// The tag running (or placed) now.
    pub(crate) current_tag: Option<String>,
    /// A release whose application failed to start or become ready; it is
    /// not tried again until a newer release appears (or dewy restarts).
    pub(crate) bad_key: Option<String>,
    /// Whether `bad_key` is also recorded in the cache. Then the cache
    /// decides (an operator may clear it there for the whole fleet, from
    /// any machine); otherwise (the write failed, or a staged rollout
    /// counts the failure instead) this memory keeps the release from being
    /// retried at every tick.
    pub(crate) bad_in_cache: bool,
    /// When the last tick ended, and how.
    pub(crate) last_check: Option<jiff::Timestamp>,
    pub(crate) last_outcome: Option<String>,
    pub(crate) last_error: Option<String>,
    pub(crate) next_check: Option<jiff::Timestamp>,
    /// The last release folder looked up in the deployment history and its
    /// version (folders never change version, so one read per folder).
    pub(crate) placed: Option<(std::path::PathBuf, String)>,
    /// A start of the release in place failed: not tried again before this.
    pub(crate) resume_after: Option<tokio::time::Instant>,
    /// The delay before the next attempt after a failed start.
    pub(crate) resume_backoff: std::time::Duration,
    /// The release being deployed now, for status and operator commands.
    pub(crate) deploying: Option<String>,
    /// The last bad release whose skip was logged at INFO.
    pub(crate) announced_bad: Option<String>,
    /// The newest release whose missing artifact made a fresh host take
    /// an older one (said once at INFO).
    pub(crate) announced_fallback: Option<String>,
    /// When this host last wrote its heartbeat record, and the version
    /// and outcome it said.
    pub(crate) heartbeat_at: Option<tokio::time::Instant>,
    pub(crate) heartbeat_said: Option<(Option<String>, Option<String>)>,
    /// Check again at this time if it comes before the next interval (a
    /// rollout bake ending, a wave opening).
    pub(crate) wake_at: Option<tokio::time::Instant>,
}
