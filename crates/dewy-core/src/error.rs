//! Why a tick failed.

use std::path::PathBuf;

/// Why a tick failed. Each phase has its variant; the source holds the
/// backend's error, and [`chain`] renders the whole chain for people.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry could not answer.
    #[error("failed to get the current release from the registry")]
    Registry(#[source] dewy_registry::Error),
    /// The cache failed.
    #[error("cache operation failed")]
    Cache(#[source] dewy_cache::Error),
    /// A staged rollout could not be read or updated in the shared cache
    /// (see [`crate::rollout`]): the host does not deploy until it can.
    #[error("rollout: {reason}")]
    Rollout {
        /// What failed.
        reason: String,
    },
    /// An artifact that was just cached cannot be found in the cache.
    #[error("`{key}` vanished from the cache right after it was stored")]
    CacheVanished {
        /// The cache key.
        key: String,
    },
    /// The artifact could not be downloaded or verified.
    #[error("failed to download the artifact of `{tag}`")]
    Download {
        /// The release.
        tag: String,
        /// The cause.
        #[source]
        source: dewy_registry::Error,
    },
    /// The artifact's publisher signature failed a check (`--verify-key`):
    /// nothing was cached or deployed.
    #[error("refused the artifact of `{tag}`")]
    Refused {
        /// The release.
        tag: String,
        /// Which check failed.
        #[source]
        source: dewy_registry::SignatureError,
    },
    /// The artifact could not be extracted.
    #[error("failed to extract the artifact of `{tag}`")]
    Extract {
        /// The release.
        tag: String,
        /// The cause.
        #[source]
        source: dewy_archive::Error,
    },
    /// The before hook failed and the config says to abort.
    #[error("before deploy hook `{command}` failed: {reason}")]
    BeforeHook {
        /// The hook's command.
        command: String,
        /// Its exit code or timeout, and its last stderr.
        reason: String,
    },
    /// A filesystem step of the deploy failed.
    #[error("failed to {op} `{}`", path.display())]
    Io {
        /// The step.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The new release failed a health check (the assets health command, or
    /// the soak after a restart) and the deploy was undone.
    #[error("`{tag}` failed its health check ({reason}); rolled back to `{previous}`")]
    Unhealthy {
        /// The release rolled back.
        tag: String,
        /// The failed check.
        reason: String,
        /// The release in place again (`nothing` on a first deploy).
        previous: String,
    },
    /// The application could not be started or restarted; the deploy was
    /// undone and the previous generation keeps serving.
    #[error("failed to {action} the application for `{tag}`")]
    App {
        /// `start` or `restart`.
        action: &'static str,
        /// The release.
        tag: String,
        /// The cause.
        #[source]
        source: dewy_starter::Error,
    },
    /// The release in place is not running and could not be started yet; it
    /// is started again with backoff.
    #[error("the application for `{tag}` is not running; starting it again with backoff")]
    NotRunning {
        /// The release in place.
        tag: String,
    },
    /// The deploy in flight was cancelled and undone: dewy is shutting
    /// down, or an operator pinned a release meanwhile.
    #[error("the deploy of `{tag}` was cancelled: {why}")]
    Cancelled {
        /// The release.
        tag: String,
        /// Why.
        why: &'static str,
    },
}

impl Error {
    /// Whether the release itself is at fault (it failed to start, to become
    /// healthy, does not match its published checksum or signature, or holds an archive
    /// entry that is refused as unsafe or too large), so
    /// that it is recorded as bad. Failures of the host (disk, network,
    /// hooks, shutdown) are retried instead.
    pub fn blames_release(&self) -> bool {
        match self {
            Self::Unhealthy { .. } => true,
            Self::App { source, .. } => !matches!(
                source,
                dewy_starter::Error::ShuttingDown | dewy_starter::Error::Os { .. } | dewy_starter::Error::Bind { .. }
            ),
            // The publisher's checksum disagrees with what it published.
            Self::Download { source, .. } => matches!(source, dewy_registry::Error::ChecksumMismatch { .. }),
            // Its signature is missing, malformed or not by a trusted key
            // (not: the cached copy could not be read).
            Self::Refused { source, .. } => !matches!(source, dewy_registry::SignatureError::Unreadable { .. }),
            Self::Extract { source, .. } => matches!(
                source,
                dewy_archive::Error::UnsafeEntry { .. } | dewy_archive::Error::LimitExceeded { .. }
            ),
            _ => false,
        }
    }
}

/// `err` and its sources on one line, joined by `: `.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
