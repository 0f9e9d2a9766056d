//! The deploy loop and one tick of it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dewy_archive::{Extractor, Limits};
use dewy_cache::{Cache, Key};
use dewy_notify::{HookReport, Notify};
use dewy_registry::{DownloadPolicy, DownloadProgress, Downloader, Registry, Release, Report, SafeUrl};
use dewy_starter::{Event, Supervisor};
use tokio::sync::Mutex;

use crate::hooks::{self, HookOutcome};
use crate::layout::Releases;

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
    /// Assets mode: a shell command run after the switch; if it fails, the
    /// previous release is put back and this one is recorded as bad.
    pub health_command: Option<String>,
    /// The cache key that records the artifact in use: `current`, as in
    /// Dewy, when the cache belongs to this app; a per-app key when the
    /// cache may be shared, so two apps never overwrite each other's.
    pub current_key: Key,
    /// Download limits and timeouts.
    pub download: DownloadPolicy,
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
            soak: None,
            current_key: Key::current(),
            health_command: None,
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

async fn health_get(addr: std::net::SocketAddr, path: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let line = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| format!("GET {path} timed out"))?
        .map_err(|e| format!("GET {path} failed: {e}"))?;
    match line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()) {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {path} answered {code}")),
        None => Err(format!("GET {path} got no HTTP answer")),
    }
}

/// Why a tick failed. Each phase has its variant; the source holds the
/// backend's error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry could not answer.
    #[error("failed to get the current release from the registry")]
    Registry(#[source] dewy_registry::Error),
    /// The cache failed.
    #[error("cache operation failed")]
    Cache(#[source] dewy_cache::Error),
    /// The artifact could not be downloaded or verified.
    #[error("failed to download the artifact of `{tag}`")]
    Download {
        /// The release.
        tag: String,
        /// The cause.
        #[source]
        source: dewy_registry::Error,
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
    #[error("before deploy hook failed: {0}")]
    BeforeHook(String),
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
    /// The new release failed its health checks during the soak period and
    /// was rolled back.
    #[error("`{tag}` failed its health check after the restart ({reason}); rolled back to `{previous}`")]
    Unhealthy {
        /// The release rolled back.
        tag: String,
        /// The failed check.
        reason: String,
        /// The release running again.
        previous: String,
    },
    /// The application could not be started or restarted; the previous
    /// generation keeps serving and `current` was switched back.
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
}

/// What a tick did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickOutcome {
    /// Nothing to do (same version, running).
    Skipped,
    /// The release's artifact is not there yet, inside the grace period.
    WithinGracePeriod,
    /// The newest release already failed to start or become ready; it is not
    /// tried again until a newer one appears.
    KnownBad {
        /// Its tag.
        tag: String,
    },
    /// An operator pinned the app folder (`dewy rollback`, `dewy pin`):
    /// nothing is deployed until `dewy unpin`.
    Pinned {
        /// The version pinned.
        version: String,
    },
    /// A release was deployed.
    Deployed {
        /// Its tag.
        tag: String,
        /// Its folder.
        release_dir: PathBuf,
    },
}

#[derive(Debug, Default)]
struct State {
    /// The tag running (or placed) now.
    current_tag: Option<String>,
    /// A release whose application failed to start or become ready; it is
    /// not tried again until a newer release appears (or dewy restarts).
    bad_key: Option<String>,
    /// When the last tick ended, and how.
    last_check: Option<jiff::Timestamp>,
    last_outcome: Option<String>,
    last_error: Option<String>,
    next_check: Option<jiff::Timestamp>,
    /// The last release folder looked up in the deployment history and its
    /// version (folders never change version, so one read per folder).
    placed: Option<(std::path::PathBuf, String)>,
}

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
    /// Time spent in each deploy phase, in milliseconds: downloading.
    pub phase_download_millis: std::sync::atomic::AtomicU64,
    /// See `phase_download_millis`: extracting.
    pub phase_extract_millis: std::sync::atomic::AtomicU64,
    /// See `phase_download_millis`: running hooks and health commands.
    pub phase_hooks_millis: std::sync::atomic::AtomicU64,
    /// See `phase_download_millis`: starting or restarting the app until ready.
    pub phase_start_millis: std::sync::atomic::AtomicU64,
}

fn add_millis(counter: &std::sync::atomic::AtomicU64, since: std::time::Instant) {
    counter.fetch_add(since.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
}

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
}

/// The deployment loop.
#[derive(Debug)]
pub struct Deployer {
    config: Config,
    registry: Arc<dyn Registry>,
    cache: Arc<dyn Cache>,
    notify: Notify,
    app: Option<Arc<dyn Supervisor>>,
    downloader: Downloader,
    clock: Arc<dyn Clock>,
    progress: Arc<dyn DeployProgress>,
    releases: Releases,
    state: Mutex<State>,
    tick_lock: Mutex<()>,
    trigger: tokio::sync::Notify,
    metrics: Metrics,
    shutdown: tokio::sync::watch::Sender<bool>,
}

/// Observer of long work (downloads, extractions). dewy-core never draws:
/// the default logs a line every few seconds; dewy-cli draws a bar on a
/// terminal.
pub trait DeployProgress: Send + Sync + std::fmt::Debug {
    /// Bytes of the artifact of `tag` downloaded so far, and the total when
    /// known.
    fn downloading(&self, tag: &str, done: u64, total: Option<u64>);
    /// Bytes of `tag` unpacked so far.
    fn extracting(&self, tag: &str, unpacked: u64);
    /// The download or extraction of `tag` ended.
    fn finished(&self, _tag: &str) {}
}

/// The default [`DeployProgress`]: a log line every three seconds.
#[derive(Debug)]
pub struct LogProgress {
    last: std::sync::Mutex<std::time::Instant>,
}

impl Default for LogProgress {
    fn default() -> Self {
        Self {
            last: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl LogProgress {
    fn due(&self) -> bool {
        let mut last = self.last.lock().expect("progress clock");
        let due = last.elapsed() >= Duration::from_secs(3);
        if due {
            *last = std::time::Instant::now();
        }
        due
    }
}

impl DeployProgress for LogProgress {
    fn downloading(&self, tag: &str, done: u64, total: Option<u64>) {
        if self.due() {
            tracing::info!(tag, bytes = done, total = total.unwrap_or(0), "Downloading artifact");
        }
    }
    fn extracting(&self, tag: &str, unpacked: u64) {
        if self.due() {
            tracing::info!(tag, bytes = unpacked, "Extracting archive");
        }
    }
}

/// Adapts a [`DeployProgress`] to the registry's and the extractor's
/// observer traits for one release.
struct ForRelease {
    tag: String,
    progress: Arc<dyn DeployProgress>,
}

impl DownloadProgress for ForRelease {
    fn on_progress(&self, done: u64, total: Option<u64>) {
        self.progress.downloading(&self.tag, done, total);
    }
}

impl dewy_archive::Progress for ForRelease {
    fn on_entry(&self, _path: &Path, unpacked: u64) {
        self.progress.extracting(&self.tag, unpacked);
    }
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl Deployer {
    /// A deployer. `app` is required in server mode and ignored in assets
    /// mode.
    pub fn new(
        config: Config,
        registry: Arc<dyn Registry>,
        cache: Arc<dyn Cache>,
        notify: Notify,
        app: Option<Arc<dyn Supervisor>>,
    ) -> Result<Self, Error> {
        let downloader = Downloader::new(config.download.clone()).map_err(Error::Registry)?;
        let releases = Releases::new(config.root.clone());
        std::fs::create_dir_all(releases.dir()).map_err(|source| Error::Io {
            op: "create",
            path: releases.dir(),
            source,
        })?;
        releases.clean_leftovers();
        let app = if config.mode == Mode::Server { app } else { None };
        Ok(Self {
            config,
            registry,
            cache,
            notify,
            app,
            downloader,
            clock: Arc::new(SystemClock),
            progress: Arc::new(LogProgress::default()),
            releases,
            state: Mutex::new(State::default()),
            tick_lock: Mutex::new(()),
            trigger: tokio::sync::Notify::new(),
            metrics: Metrics::default(),
            shutdown: tokio::sync::watch::channel(false).0,
        })
    }

    /// Replaces the progress observer (the default logs every few seconds).
    pub fn with_progress(mut self, progress: Arc<dyn DeployProgress>) -> Self {
        self.progress = progress;
        self
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The release layout of the app folder.
    pub fn releases(&self) -> &Releases {
        &self.releases
    }

    /// The notification handle.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    /// Asks for a check now instead of at the next interval.
    pub fn request_check(&self) {
        self.trigger.notify_one();
    }

    /// Counters since start.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The registry backend's request counters (304s, rate limits).
    pub fn registry_stats(&self) -> dewy_registry::RegistryStats {
        self.registry.stats()
    }

    /// What the loop is doing now.
    pub async fn status(&self) -> Status {
        let serving = match &self.app {
            Some(app) => app.current().await,
            None => None,
        };
        let releases = self.releases.list().unwrap_or_default();
        let previous_release = releases
            .iter()
            .position(|r| r.current)
            .and_then(|i| releases.get(i + 1))
            .map(|r| r.path.display().to_string());
        let state = self.state.lock().await;
        let fmt = |t: &Option<jiff::Timestamp>| t.map(|t| t.to_string());
        Status {
            mode: self.config.mode.as_str(),
            dewy_version: self.config.dewy_version.clone(),
            current_version: state.current_tag.clone(),
            current_release: self.releases.current_target().map(|p| p.display().to_string()),
            is_running: self.app.as_ref().is_some_and(|a| a.is_running()),
            generation: serving.map(|g| g.generation),
            pid: serving.map(|g| g.pid),
            previous_release,
            last_check: fmt(&state.last_check),
            last_outcome: state.last_outcome.clone(),
            last_error: state.last_error.clone(),
            next_check: fmt(&state.next_check),
            bad_release: state.bad_key.clone(),
            pinned: crate::layout::pinned(&self.config.root),
        }
    }

    /// Restarts the application on request (SIGUSR1, the admin API).
    pub async fn restart_app(&self) -> Result<(), Error> {
        let Some(app) = &self.app else {
            tracing::info!("Restart requested, but assets mode runs no application");
            return Ok(());
        };
        let tag = self.state.lock().await.current_tag.clone().unwrap_or_default();
        app.restart().await.map_err(|source| Error::App {
            action: "restart",
            tag,
            source,
        })?;
        self.metrics
            .restarts_signal
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.notify.send("Restarted receiving by `SIGUSR1` signal");
        Ok(())
    }

    /// Stops the loop after the tick in flight, stops the application
    /// gracefully, and flushes notifications.
    pub async fn shutdown(&self, signal_name: &str) {
        let _ = self.shutdown.send(true);
        // Wait for a tick in flight so a deploy is never cut in the middle.
        let _tick = self.tick_lock.lock().await;
        if let Some(app) = &self.app
            && let Err(err) = app.stop().await
        {
            tracing::error!(error = %chain(&err), "Stopping the application failed");
        }
        self.notify.send(format!("Stop receiving by `{signal_name}` signal"));
        self.notify.shutdown(Duration::from_secs(5)).await;
    }

    /// Runs ticks every interval until [`Deployer::shutdown`]. The first tick
    /// runs at once; a tick that overruns delays the next one, never
    /// overlaps it.
    pub async fn run(self: &Arc<Self>) {
        tracing::info!(version = %self.config.dewy_version, mode = self.config.mode.as_str(), "Dewy started");
        self.notify.send(format!(
            "Automatic shipping started by *Dewy* (v{}: {})",
            self.config.dewy_version,
            self.config.mode.as_str()
        ));
        if let Some(app) = &self.app {
            let mut events = app.subscribe();
            let notify = self.notify.clone();
            tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(Event::Exited {
                            generation,
                            pid,
                            exit,
                            expected: false,
                        }) => {
                            notify.send_error(format!("Application exited unexpectedly (generation {generation}, pid {pid}, {exit}); restarting with backoff"));
                        }
                        Ok(Event::CrashLoop { crashes }) => {
                            notify.send_error(format!(
                                "Application is crash-looping: {crashes} crashes in the last minute"
                            ));
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    }
                }
            });
        }
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let result = self.tick().await;
            {
                use std::sync::atomic::Ordering::Relaxed;
                let m = &self.metrics;
                let (counter, outcome, error) = match &result {
                    Ok(TickOutcome::Skipped) => (&m.ticks_skipped, "skipped", None),
                    Ok(TickOutcome::Deployed { .. }) => (&m.ticks_deployed, "deployed", None),
                    Ok(TickOutcome::WithinGracePeriod) => (&m.ticks_grace, "grace-period", None),
                    Ok(TickOutcome::KnownBad { .. }) => (&m.ticks_known_bad, "known-bad", None),
                    Ok(TickOutcome::Pinned { .. }) => (&m.ticks_skipped, "pinned", None),
                    Err(err) => (&m.ticks_error, "error", Some(chain(err))),
                };
                counter.fetch_add(1, Relaxed);
                let mut state = self.state.lock().await;
                let now = self.clock.now();
                state.last_check = Some(now);
                state.last_outcome = Some(outcome.to_owned());
                state.last_error = error;
                state.next_check = jiff::SignedDuration::try_from(self.config.interval)
                    .ok()
                    .and_then(|d| now.checked_add(d).ok());
            }
            match result {
                Ok(TickOutcome::KnownBad { .. }) => {}
                Ok(_) => self.notify.success(),
                Err(err) => {
                    let text = chain(&err);
                    tracing::error!(error = %text, "Dewy run failure");
                    self.notify.send_error(text);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = self.trigger.notified() => tracing::debug!("Immediate check requested"),
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One cycle: check, cache, download, deploy, start or restart, record.
    pub async fn tick(&self) -> Result<TickOutcome, Error> {
        let _guard = self.tick_lock.lock().await;
        if let Some(version) = crate::layout::pinned(&self.config.root) {
            tracing::debug!(version, "Deploy skipped: pinned");
            return Ok(TickOutcome::Pinned { version });
        }
        let answer = self.registry.latest().await;
        {
            use std::sync::atomic::Ordering::Relaxed;
            match &answer {
                Ok(_) => self.metrics.registry_ok.fetch_add(1, Relaxed),
                Err(dewy_registry::Error::ArtifactNotFound { .. }) => {
                    self.metrics.registry_not_found.fetch_add(1, Relaxed)
                }
                Err(_) => self.metrics.registry_errors.fetch_add(1, Relaxed),
            };
        }
        let release = match answer {
            Ok(r) => r,
            Err(dewy_registry::Error::ArtifactNotFound {
                tag,
                wanted,
                published_at: Some(published),
            }) => {
                let age = self.clock.now().duration_since(published);
                let grace =
                    jiff::SignedDuration::try_from(self.config.grace_period).unwrap_or(jiff::SignedDuration::MAX);
                if age < grace {
                    tracing::debug!(
                        tag,
                        message = "artifact not found",
                        grace_period = ?self.config.grace_period,
                        "Artifact not found within grace period"
                    );
                    return Ok(TickOutcome::WithinGracePeriod);
                }
                return Err(Error::Registry(dewy_registry::Error::ArtifactNotFound {
                    tag,
                    wanted,
                    published_at: Some(published),
                }));
            }
            Err(err) => {
                tracing::error!(error = %chain(&err), "Current failure");
                return Err(Error::Registry(err));
            }
        };
        let key = Key::artifact(&release.tag, &release.artifact_name).map_err(Error::Cache)?;
        let current = self.cache.read(&self.config.current_key).await.map_err(Error::Cache)?;
        let same = current.as_deref() == Some(key.as_str().as_bytes());
        // The steady state (this release deployed, in place, running) and
        // a stopped app are settled before the bad-release record is looked
        // up: with a bucket cache that lookup is a request per tick.
        let mut cached = None;
        let mut redeploy = false;
        if same {
            cached = self.cache.local_path(&key).await.map_err(Error::Cache)?;
            // `current` must still point at this release: an operator may
            // have rolled back by hand (`dewy rollback`) since.
            let in_place = match self.releases.current_target() {
                Some(target) => self.version_placed(&target).await.is_none_or(|v| v == release.tag),
                None => false,
            };
            if cached.is_some() && in_place {
                if self.app.as_ref().is_none_or(|a| a.is_running()) {
                    tracing::debug!(cache_key = %key, "Deploy skipped");
                    self.state.lock().await.current_tag = Some(release.tag.clone());
                    return Ok(TickOutcome::Skipped);
                }
                redeploy = true;
            }
        }
        if redeploy {
            // The release in place stopped: bring it back even if another
            // host recorded it as bad meanwhile, rather than serve nothing.
            tracing::info!(cache_key = %key, "Server not running, redeploying from cache");
        } else {
            let recorded_bad = self.cache.read(&Key::bad(&key)).await.ok().flatten().is_some();
            if recorded_bad || self.state.lock().await.bad_key.as_deref() == Some(key.as_str()) {
                tracing::debug!(cache_key = %key, "Deploy skipped: this release failed to start before");
                return Ok(TickOutcome::KnownBad { tag: release.tag });
            }
        }
        if !same {
            // Only now: with a bucket cache this may fetch another host's copy.
            cached = self.cache.local_path(&key).await.map_err(Error::Cache)?;
        }
        let started = std::time::Instant::now();
        let result = async {
            let artifact = match cached {
                Some(path) => {
                    self.metrics
                        .cache_hits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    path
                }
                None => match self.cache.begin_download(&key).await.map_err(Error::Cache)? {
                    // Another host of the fleet downloaded it meanwhile.
                    Some(path) => path,
                    None => {
                        let downloaded = self.download(&release, &key).await;
                        self.cache.end_download(&key).await;
                        downloaded?
                    }
                },
            };
            self.notify.send(format!("Downloaded artifact for `{}`", release.tag));
            self.deploy(&release, &artifact, current.as_deref()).await
        }
        .await;
        let entry = crate::history::Entry {
            time: self.clock.now(),
            version: release.tag.clone(),
            outcome: if result.is_ok() { "deployed" } else { "failed" }.to_owned(),
            duration_ms: started.elapsed().as_millis() as u64,
            release_dir: result.as_ref().ok().map(|d| d.display().to_string()),
            reason: result.as_ref().err().map(|e| chain(e)),
        };
        {
            use std::sync::atomic::Ordering::Relaxed;
            if result.is_ok() {
                self.metrics.deployments.fetch_add(1, Relaxed);
                self.metrics.deployment_millis.fetch_add(entry.duration_ms, Relaxed);
            } else {
                self.metrics.deployment_errors.fetch_add(1, Relaxed);
            }
        }
        if let Err(err) = crate::history::append(&self.config.root, &entry) {
            tracing::warn!(error = %err, "Could not write the deployment history");
        }
        if let Err(Error::Extract { .. }) = &result {
            // The cached artifact may be a truncated copy (a `file://`
            // registry whose artifact was still being written): drop it so
            // the next tick downloads it again instead of failing forever.
            if let Err(err) = self.cache.delete(&key).await {
                tracing::warn!(cache_key = %key, error = %chain(&err), "Could not drop the unusable cached artifact");
            }
        }
        let release_dir = result?;
        self.record(&release, &key, &release_dir).await;
        Ok(TickOutcome::Deployed {
            tag: release.tag,
            release_dir,
        })
    }

    async fn download(&self, release: &Release, key: &Key) -> Result<PathBuf, Error> {
        tracing::info!(tag = %release.tag, url = %SafeUrl(&release.artifact_url), "Downloading artifact");
        let progress = ForRelease {
            tag: release.tag.clone(),
            progress: self.progress.clone(),
        };
        let request = self
            .registry
            .artifact_request(release)
            .await
            .map_err(|source| Error::Download {
                tag: release.tag.clone(),
                source,
            })?;
        let started = std::time::Instant::now();
        let downloaded = self
            .downloader
            .fetch_request(&request, release.checksum.as_ref(), self.cache.staging_dir(), &progress)
            .await
            .map_err(|source| Error::Download {
                tag: release.tag.clone(),
                source,
            });
        self.progress.finished(&release.tag);
        add_millis(&self.metrics.phase_download_millis, started);
        let downloaded = downloaded?;
        tracing::info!(tag = %release.tag, bytes = downloaded.size, sha256 = %downloaded.sha256, "Artifact downloaded");
        self.metrics
            .downloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .download_bytes
            .fetch_add(downloaded.size, std::sync::atomic::Ordering::Relaxed);
        self.cache.put_file(key, &downloaded.path).await.map_err(Error::Cache)?;
        tracing::info!(cache_key = %key, "Cached artifact");
        self.cache.local_path(key).await.map_err(Error::Cache)?.ok_or_else(|| {
            Error::Cache(dewy_cache::Error::Injected(format!(
                "`{key}` vanished right after it was cached"
            )))
        })
    }

    fn hook_env(&self, release: &Release, release_dir: &Path, previous: Option<&str>) -> Vec<(OsString, OsString)> {
        let mut env = self.config.hook_env.clone();
        env.push(("DEWY_VERSION".into(), release.tag.clone().into()));
        env.push(("DEWY_RELEASE_DIR".into(), release_dir.into()));
        env.push(("DEWY_PREVIOUS_VERSION".into(), previous.unwrap_or_default().into()));
        env.push(("DEWY_APP_DIR".into(), self.config.root.clone().into()));
        env
    }

    async fn run_hook(&self, stage: &str, command: &str, env: &[(OsString, OsString)]) -> Option<HookOutcome> {
        let started = std::time::Instant::now();
        let outcome = hooks::run(command, &self.config.root, env, self.config.hook_timeout).await;
        add_millis(&self.metrics.phase_hooks_millis, started);
        let outcome = match outcome {
            Ok(o) => o,
            Err(err) => {
                tracing::error!(command, error = %err, "{stage} deploy hook failure");
                self.notify
                    .send_error(format!("{stage} deploy hook could not run: {err}"));
                return None;
            }
        };
        let counter = if outcome.success() {
            &self.metrics.hooks_ok
        } else {
            &self.metrics.hooks_failed
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if outcome.success() {
            tracing::info!(command, stdout = %outcome.stdout, stderr = %outcome.stderr, duration = ?outcome.duration, "Execute hook");
        } else {
            tracing::info!(command, stdout = %outcome.stdout, stderr = %outcome.stderr, duration = ?outcome.duration, exit_code = outcome.exit_code.unwrap_or(-1), "Execute hook failed");
            tracing::error!(error = %outcome.failure(), exit_code = outcome.exit_code.unwrap_or(-1), "{stage} deploy hook failure");
        }
        self.notify.send_hook_result(HookReport {
            stage: format!("{stage} Deploy"),
            command: command.to_owned(),
            stdout: outcome.stdout.clone(),
            stderr: outcome.stderr.clone(),
            exit_code: outcome.exit_code,
            duration: outcome.duration,
            success: outcome.success(),
        });
        Some(outcome)
    }

    /// Before hook, extraction, switch, after hook, start or restart.
    async fn deploy(&self, release: &Release, artifact: &Path, previous_key: Option<&[u8]>) -> Result<PathBuf, Error> {
        let previous_tag = previous_key
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| k.split_once("--").map(|(t, _)| t.to_owned()));
        let release_dir = self.releases.new_release_path(self.clock.now());
        let env = self.hook_env(release, &release_dir, previous_tag.as_deref());
        if let Some(cmd) = &self.config.before_hook
            && let Some(o) = self.run_hook("Before", cmd, &env).await
            && !o.success()
            && self.config.abort_on_before_hook_failure
        {
            return Err(Error::BeforeHook(o.failure()));
        }
        tracing::info!(path = %release_dir.display(), "Extract archive");
        let (extractor, src, dest) = (
            Extractor::new(self.config.limits),
            artifact.to_path_buf(),
            release_dir.clone(),
        );
        let progress = ForRelease {
            tag: release.tag.clone(),
            progress: self.progress.clone(),
        };
        let extract_started = std::time::Instant::now();
        let extracted =
            tokio::task::spawn_blocking(move || extractor.extract_with_progress(&src, &dest, Some(&progress)))
                .await
                .map_err(|e| Error::Io {
                    op: "extract into",
                    path: release_dir.clone(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| Error::Extract {
                    tag: release.tag.clone(),
                    source,
                });
        self.progress.finished(&release.tag);
        add_millis(&self.metrics.phase_extract_millis, extract_started);
        extracted?;
        let previous_dir = self.releases.current_target();
        tracing::info!(from = %release_dir.display(), to = %self.releases.current_link().display(), "Create symlink");
        self.releases.switch(&release_dir).map_err(|source| Error::Io {
            op: "switch the current symlink to",
            path: release_dir.clone(),
            source,
        })?;
        if let Some(cmd) = &self.config.after_hook {
            self.run_hook("After", cmd, &env).await;
        }
        if let (Mode::Assets, Some(cmd)) = (self.config.mode, &self.config.health_command) {
            let started = std::time::Instant::now();
            let outcome = hooks::run(cmd, &self.config.root, &env, self.config.hook_timeout).await;
            add_millis(&self.metrics.phase_hooks_millis, started);
            match outcome {
                Ok(o) if o.success() => tracing::info!(command = %cmd, "Health command passed"),
                outcome => {
                    let reason = match outcome {
                        Ok(o) => format!("health command `{cmd}`: {} {}", o.failure(), o.stderr)
                            .trim()
                            .to_owned(),
                        Err(e) => format!("health command `{cmd}` could not run: {e}"),
                    };
                    return match &previous_dir {
                        Some(prev) => Err(self
                            .roll_back(release, &release_dir, prev, previous_tag.as_deref(), reason)
                            .await),
                        None => {
                            self.mark_bad(release, &reason).await;
                            Err(Error::Unhealthy {
                                tag: release.tag.clone(),
                                reason,
                                previous: "nothing (first deploy)".into(),
                            })
                        }
                    };
                }
            }
        }
        if let Some(app) = &self.app {
            let restart = app.is_running();
            let start_started = std::time::Instant::now();
            let result = if restart {
                tracing::info!(version = %release.tag, "Restart server");
                self.metrics
                    .restarts_deploy
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                app.restart().await
            } else {
                tracing::info!(version = %release.tag, "Start server");
                app.start().await
            };
            add_millis(&self.metrics.phase_start_millis, start_started);
            match result {
                Ok(generation) => {
                    let verb = if restart { "restarted" } else { "started" };
                    tracing::info!(version = %release.tag, generation = generation.generation, pid = generation.pid, "Server {verb}");
                    self.notify
                        .send_important(format!("Server {verb} for `{}`", release.tag));
                    if let (true, Some(soak), Some(prev)) = (restart, &self.config.soak, &previous_dir)
                        && let Err(reason) = self.soak(soak).await
                    {
                        return Err(self
                            .roll_back(release, &release_dir, prev, previous_tag.as_deref(), reason)
                            .await);
                    }
                }
                Err(source) => {
                    // Put the previous release back so that the generation
                    // still serving (and any crash restart of it) runs it.
                    if let Some(prev) = &previous_dir {
                        if let Err(e) = self.releases.switch(prev) {
                            tracing::error!(error = %e, "Switching current back failed");
                        } else {
                            tracing::info!(to = %prev.display(), "Switched current back to the previous release");
                        }
                    }
                    let _ = std::fs::remove_dir_all(&release_dir);
                    self.mark_bad(release, &source.to_string()).await;
                    return Err(Error::App {
                        action: if restart { "restart" } else { "start" },
                        tag: release.tag.clone(),
                        source,
                    });
                }
            }
        }
        Ok(release_dir)
    }

    /// Records `release` as bad, in memory and in the cache (so a restarted
    /// dewy and every host sharing the cache skip it until a newer release
    /// appears or an operator clears it).
    async fn mark_bad(&self, release: &Release, reason: &str) {
        let Ok(key) = Key::artifact(&release.tag, &release.artifact_name) else {
            return;
        };
        self.state.lock().await.bad_key = Some(key.to_string());
        if let Err(err) = self.cache.write(&Key::bad(&key), reason.as_bytes()).await {
            tracing::warn!(error = %chain(&err), "Could not record the bad release in the cache");
        }
    }

    /// An operator's rollback or pin: between ticks, pins the folder at
    /// `version`, points `current` at `release_dir` (a release on disk) and
    /// restarts the application.
    pub async fn pin_release(&self, release_dir: &Path, version: &str) -> Result<(), Error> {
        let _tick = self.tick_lock.lock().await;
        let io = |op, source| Error::Io {
            op,
            path: release_dir.to_path_buf(),
            source,
        };
        crate::layout::set_pin(&self.config.root, Some(version)).map_err(|e| io("pin the app folder at", e))?;
        self.releases
            .switch(release_dir)
            .map_err(|e| io("switch the current symlink to", e))?;
        self.state.lock().await.current_tag = Some(version.to_owned());
        if let Some(app) = &self.app {
            app.restart().await.map_err(|source| Error::App {
                action: "restart",
                tag: version.to_owned(),
                source,
            })?;
        }
        tracing::info!(version, release = %release_dir.display(), "Pinned by an operator");
        self.notify.send_important(format!(
            "Rolled back to `{version}` by an operator; deploys are paused until unpinned"
        ));
        Ok(())
    }

    /// Releases an operator's pin and checks the registry at once.
    pub fn unpin(&self) -> Result<(), Error> {
        crate::layout::set_pin(&self.config.root, None).map_err(|source| Error::Io {
            op: "unpin",
            path: self.config.root.clone(),
            source,
        })?;
        self.request_check();
        Ok(())
    }

    /// Forgets every bad-release record, so those releases are tried again.
    /// Returns how many were cleared.
    pub async fn clear_bad(&self) -> Result<usize, Error> {
        self.state.lock().await.bad_key = None;
        let mut n = 0;
        for entry in self.cache.list().await.map_err(Error::Cache)? {
            if entry.key.is_bad_record() {
                self.cache.delete(&entry.key).await.map_err(Error::Cache)?;
                n += 1;
            }
        }
        tracing::info!(cleared = n, "Bad release records cleared");
        Ok(n)
    }

    /// The version deployed into `release_dir`, from the deployment history
    /// (read again only when `current` points at another folder).
    async fn version_placed(&self, release_dir: &std::path::Path) -> Option<String> {
        if let Some((dir, version)) = &self.state.lock().await.placed
            && dir == release_dir
        {
            return Some(version.clone());
        }
        let version = crate::history::version_of(&self.config.root, release_dir)?;
        self.state.lock().await.placed = Some((release_dir.to_path_buf(), version.clone()));
        Some(version)
    }

    /// Watches the new release's health for the soak period.
    async fn soak(&self, soak: &Soak) -> Result<(), String> {
        let until = tokio::time::Instant::now() + soak.duration;
        tracing::info!(duration = ?soak.duration, path = %soak.path, "Watching health after restart");
        while tokio::time::Instant::now() < until {
            health_get(soak.addr, &soak.path).await?;
            tokio::time::sleep(soak.interval).await;
        }
        Ok(())
    }

    /// Puts the previous release back after a failed soak: switch, restart,
    /// after hook with `DEWY_ROLLBACK=1`, and the release is remembered as
    /// bad.
    async fn roll_back(
        &self,
        release: &Release,
        release_dir: &Path,
        previous: &Path,
        previous_tag: Option<&str>,
        reason: String,
    ) -> Error {
        let previous_tag = previous_tag.unwrap_or("the previous release").to_owned();
        tracing::error!(version = %release.tag, reason, "Health check failed after restart, rolling back");
        self.metrics
            .rollbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.releases.switch(previous) {
            tracing::error!(error = %e, "Switching current back failed");
        }
        if let Some(app) = &self.app
            && let Err(e) = app.restart().await
        {
            tracing::error!(error = %chain(&e), "Restarting the previous release failed");
        }
        if let Some(cmd) = &self.config.after_hook {
            let mut env = self.config.hook_env.clone();
            env.push(("DEWY_VERSION".into(), previous_tag.clone().into()));
            env.push(("DEWY_RELEASE_DIR".into(), previous.into()));
            env.push(("DEWY_PREVIOUS_VERSION".into(), release.tag.clone().into()));
            env.push(("DEWY_APP_DIR".into(), self.config.root.clone().into()));
            env.push(("DEWY_ROLLBACK".into(), "1".into()));
            self.run_hook("After", cmd, &env).await;
        }
        let _ = std::fs::remove_dir_all(release_dir);
        self.mark_bad(release, &reason).await;
        Error::Unhealthy {
            tag: release.tag.clone(),
            reason,
            previous: previous_tag,
        }
    }

    /// After a successful deploy: `current` in the cache, the audit report,
    /// pruning. Failures here are logged, never undo the deploy.
    async fn record(&self, release: &Release, key: &Key, release_dir: &Path) {
        let previous = self.cache.read(&self.config.current_key).await.ok().flatten();
        if let Err(err) = self
            .cache
            .write(&self.config.current_key, key.as_str().as_bytes())
            .await
        {
            tracing::error!(error = %chain(&err), "Failed to record the current release in the cache");
        }
        self.state.lock().await.current_tag = Some(release.tag.clone());
        let report = Report {
            tag: release.tag.clone(),
            command: self.config.mode.as_str().to_owned(),
            hostname: self.config.hostname.clone(),
            at: self.clock.now(),
            error: None,
        };
        if let Err(err) = self.registry.report(&report).await {
            tracing::error!(error = %chain(&err), "Report shipping failure");
        }
        let previous_dir = self
            .releases
            .list()
            .ok()
            .and_then(|l| l.into_iter().find(|r| r.path != release_dir).map(|r| r.path));
        match self.releases.prune(self.config.keep_releases, previous_dir.as_deref()) {
            Ok(removed) => {
                tracing::info!(
                    count = self.config.keep_releases,
                    removed = removed.len(),
                    "Keep releases"
                );
            }
            Err(err) => tracing::error!(error = %err, "Keep releases failure"),
        }
        // Never evict what this app, or another app sharing the cache, runs.
        let mut protect = vec![key.clone()];
        let as_key = |v: Vec<u8>| String::from_utf8(v).ok().and_then(|p| Key::new(p).ok());
        protect.extend(previous.and_then(as_key));
        for entry in self.cache.list().await.unwrap_or_default() {
            if entry.key.as_str().starts_with("current") {
                protect.extend(self.cache.read(&entry.key).await.ok().flatten().and_then(as_key));
            }
        }
        if let Err(err) = self.cache.evict(self.config.keep_releases, &protect).await {
            tracing::error!(error = %chain(&err), "Cache eviction failure");
        }
    }
}
