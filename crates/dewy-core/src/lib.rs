//! The deployment loop of dewy.
//!
//! [`Deployer`] composes a [`Registry`], a [`Cache`], the archive extractor,
//! an optional [`Supervisor`] (server mode) and a [`Notify`] handle into the
//! loop of `deployment-workflow.md`: every interval, one *tick*:
//!
//! 1. **Check**: ask the registry for the newest release. A missing artifact
//!    inside the grace period ends the tick quietly (`Artifact not found
//!    within grace period`).
//! 2. **Cache**: if the release's key `<tag>--<artifact>` is the cache's
//!    `current` and the app is running (server) or the release is in place
//!    (assets): `Deploy skipped`.
//! 3. **Download** (when not cached): a verified download into the cache
//!    (`Cached artifact`), then `Downloaded artifact for <tag>`.
//! 4. **Deploy**: before hook, extraction into a fresh
//!    `releases/<YYYYMMDDTHHMMSSZ>` (staged, renamed into place), an atomic
//!    switch of `current` (temporary symlink renamed over it), after hook.
//! 5. **Startup control** (server mode): start the app the first time,
//!    restart it gracefully afterwards. A failed restart switches `current`
//!    back, leaves the previous generation serving and fails the tick.
//! 6. **Record**: only now is the cache's `current` written (the Go original
//!    wrote it before extraction, so a failed deploy was never retried), the
//!    deployment reported, old releases pruned (never the current or the
//!    previous one) and old artifacts evicted.
//!
//! A failed phase aborts the tick, leaves `current` and the running app as
//! they were, notifies (with error limiting) and is retried on the next
//! tick. Ticks never overlap; [`Deployer::request_check`] asks for one now.
//!
//! A release that fails to start, or fails its health checks during the
//! soak after a restart ([`Soak`]) or the assets health command, is rolled
//! back (previous release, restart, after hook with `DEWY_ROLLBACK=1`) and
//! recorded as bad in the cache (`bad.<tag>--<artifact>`), so no host
//! sharing the cache deploys it again until a newer release appears or
//! [`Deployer::clear_bad`]. An operator's pin (`.dewy/pin`, see
//! [`set_pin`]) holds the folder: ticks deploy nothing while it is set.
//!
//! # Embedding
//!
//! ```no_run
//! # async fn demo(registry: std::sync::Arc<dyn dewy_registry::Registry>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use dewy_core::{Config, Deployer, Mode};
//! let cache = Arc::new(dewy_cache::FileCache::open("/opt/app/.dewy/cache")?);
//! let notify = dewy_notify::Notify::new(Arc::new(dewy_notify::NullNotifier), Default::default(), false);
//! let config = Config::new(Mode::Assets, "/opt/app".into());
//! let deployer = Deployer::new(config, registry, cache, notify, None)?;
//! deployer.tick().await?;
//! # Ok(()) }
//! ```
//!
//! # What this crate must never do
//!
//! Name a concrete backend type, read flags, environment variables or config
//! files (the caller passes a [`Config`]), handle process signals (the caller
//! turns them into [`Deployer::restart_app`] and [`Deployer::shutdown`]), or
//! leave `current` pointing at an incomplete release.

#![deny(missing_docs)]

mod config;
mod deploy;
mod deployer;
mod error;
mod health;
mod history;
mod hooks;
mod layout;
mod metrics;
mod operator;
mod progress;
pub mod rollout;
mod status;

pub use config::{Clock, Config, Mode, Soak, SystemClock};
pub use deployer::{Deployer, FailureLog, SHUTDOWN_GRACE, TickOutcome, fleet_of};
pub use dewy_cache::Cache;
pub use dewy_notify::Notify;
pub use dewy_registry::Registry;
pub use dewy_starter::Supervisor;
pub use error::{Error, chain};
pub use history::{Entry as HistoryEntry, read as read_history};
pub use hooks::{HookOutcome, run as run_hook};
pub use layout::{ReleaseInfo, Releases, pinned, set_pin};
pub use metrics::{DEPLOYMENT_BUCKETS, Histogram, HistogramSnapshot, Metrics};
pub use progress::{DeployProgress, LogProgress};
pub use status::Status;
