//! What the loop needs to know, built and validated by the caller.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use dewy_archive::Limits;
use dewy_cache::Key;
use dewy_registry::{DownloadPolicy, TrustedKeys};

/// `dewy server` or `dewy assets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Runs the application and restarts it on each deploy.
    Server,
    /// Only places files.
    Assets,
}

impl Mode {
    /// `server` or `assets`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Assets => "assets",
        }
    }
}

/// The clock, a seam for tests.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now(&self) -> jiff::Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::now()
    }
}

/// Everything the loop needs to know; built and validated by the caller.
#[derive(Debug, Clone)]
pub struct Config {
    /// Server or assets.
    pub mode: Mode,
    /// The app folder holding `releases/` and `current`.
    pub root: PathBuf,
    /// Time between checks (default 10 s).
    pub interval: Duration,
    /// Releases kept on disk (default 7); also the artifacts kept in cache.
    pub keep_releases: usize,
    /// A missing artifact younger than this is not an error (default 30 min).
    pub grace_period: Duration,
    /// Shell command before extraction.
    pub before_hook: Option<String>,
    /// Shell command after the switch.
    pub after_hook: Option<String>,
    /// Hooks are killed after this (default 5 min).
    pub hook_timeout: Duration,
    /// A failed before hook aborts the deploy (default false, as in Dewy).
    pub abort_on_before_hook_failure: bool,
    /// The environment hooks get, before dewy's `DEWY_*` variables (the
    /// caller removes secrets).
    pub hook_env: Vec<(OsString, OsString)>,
    /// The host's name, for reports.
    pub hostname: String,
    /// dewy's own version, for the start notification.
    pub dewy_version: String,
    /// Archive limits.
    pub limits: Limits,
    /// Health watched after each restart; a failure rolls back.
    pub soak: Option<Soak>,
    /// The health path through the app's own port, checked after a restart
    /// when the supervisor could not probe it before the switch (an app
    /// that serves only its first socket): a 2xx passes; another answer, or
    /// none within `duration`, rolls back.
    pub port_health: Option<Soak>,
    /// Assets mode: a shell command run after the switch; if it fails, the
    /// previous release is put back and this one is recorded as bad.
    pub health_command: Option<String>,
    /// The cache key that records the artifact in use: `current`, as in
    /// Dewy, when the cache belongs to this app; a per-app key when the
    /// cache may be shared, so two apps never overwrite each other's.
    pub current_key: Key,
    /// Download limits and timeouts.
    pub download: DownloadPolicy,
    /// Publisher keys (`--verify-key`). When not empty, every artifact must
    /// carry a valid minisign signature by one of them, checked before it
    /// enters the cache and again before a cached copy is deployed; a
    /// release refused for its signature is recorded as bad.
    pub verify_keys: TrustedKeys,
    /// Stage each release across the fleet sharing the cache (canary,
    /// waves, bake, halt): see [`crate::rollout`]. `None`: every host
    /// deploys as soon as it sees the release.
    pub rollout: Option<crate::rollout::Plan>,
}

impl Config {
    /// Defaults of the spec for `mode` in `root`.
    pub fn new(mode: Mode, root: PathBuf) -> Self {
        Self {
            mode,
            root,
            interval: Duration::from_secs(10),
            keep_releases: 7,
            grace_period: Duration::from_secs(30 * 60),
            before_hook: None,
            after_hook: None,
            hook_timeout: Duration::from_secs(300),
            abort_on_before_hook_failure: false,
            hook_env: vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())],
            hostname: String::from("localhost"),
            dewy_version: env!("CARGO_PKG_VERSION").to_owned(),
            limits: Limits::default(),
            download: DownloadPolicy::default(),
            verify_keys: TrustedKeys::default(),
            soak: None,
            port_health: None,
            current_key: Key::current(),
            health_command: None,
            rollout: None,
        }
    }
}

/// After a restart, the new release must keep answering 2xx to
/// `GET path` on `addr` for `duration`, checked every `interval`; otherwise
/// dewy rolls back to the previous release.
#[derive(Debug, Clone)]
pub struct Soak {
    /// Where the application listens (its first port).
    pub addr: std::net::SocketAddr,
    /// The health path, such as `/health`.
    pub path: String,
    /// How long the new release must stay healthy.
    pub duration: Duration,
    /// Time between two checks.
    pub interval: Duration,
}
