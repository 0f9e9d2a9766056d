//! The deploy loop and one tick of it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use dewy_cache::{Cache, Key};
use dewy_notify::{HookReport, Notify};
use dewy_registry::{Downloader, Registry, Release, Report, SafeUrl, SignatureCheck};
use dewy_starter::{Event, Supervisor};

use crate::config::{Clock, Config, Mode, SystemClock};
use crate::deploy::Deployment;
use crate::error::{Error, chain};
use crate::hooks::{self, HookOutcome};
use crate::layout::Releases;
use crate::metrics::{Metrics, add_millis};
use crate::progress::{DeployProgress, ForRelease, LogProgress};
use crate::status::{State, Status};

/// How long a shutdown lets a deploy in flight finish before cancelling it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The longest wait between two attempts to start the release in place.
const RESUME_BACKOFF_MAX: Duration = Duration::from_secs(60);

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
    /// A staged rollout does not let this host deploy yet (its wave is
    /// full and baking, or the rollout is paused).
    RolloutWait {
        /// The release.
        tag: String,
        /// Why.
        reason: String,
    },
    /// A staged rollout will not let this host deploy the release: halted,
    /// aborted, or this host already failed it.
    RolloutStopped {
        /// The release.
        tag: String,
        /// Why.
        reason: String,
    },
    /// A release was deployed.
    Deployed {
        /// Its tag.
        tag: String,
        /// Its folder.
        release_dir: PathBuf,
    },
}

/// The deployment loop.
#[derive(Debug)]
pub struct Deployer {
    pub(crate) config: Config,
    registry: Arc<dyn Registry>,
    pub(crate) cache: Arc<dyn Cache>,
    pub(crate) notify: Notify,
    pub(crate) app: Option<Arc<dyn Supervisor>>,
    downloader: Downloader,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) progress: Arc<dyn DeployProgress>,
    pub(crate) releases: Releases,
    /// Never held across an await: [`Deployer::status`] answers at once,
    /// whatever a tick is doing.
    pub(crate) state: Mutex<State>,
    pub(crate) tick_lock: tokio::sync::Mutex<()>,
    trigger: tokio::sync::Notify,
    pub(crate) metrics: Metrics,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Set by an operator's pin during a deploy: the deploy stops at its
    /// next step and is undone.
    pub(crate) cancel_deploy: std::sync::atomic::AtomicBool,
    /// The storage's clock (staged rollouts, fleet ages).
    pub(crate) storage_clock: crate::rollout::BucketClock,
    /// This host's view of the rollout it takes part in.
    pub(crate) rollout: Mutex<crate::rollout::Local>,
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
            tick_lock: tokio::sync::Mutex::new(()),
            trigger: tokio::sync::Notify::new(),
            metrics: Metrics::default(),
            shutdown: tokio::sync::watch::channel(false).0,
            cancel_deploy: std::sync::atomic::AtomicBool::new(false),
            storage_clock: crate::rollout::BucketClock::default(),
            rollout: Mutex::new(crate::rollout::Local::default()),
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

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether [`Deployer::shutdown`] was called.
    pub(crate) fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once [`Deployer::shutdown`] is called.
    pub(crate) async fn cancelled(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// What the loop is doing now. Answers from a snapshot at once, also
    /// during a deploy.
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
        let state = self.state();
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
            deploying: state.deploying.clone(),
            cache_degraded: self.cache.degraded(),
        }
    }

    /// Stops the loop: a deploy in flight gets [`SHUTDOWN_GRACE`] to finish
    /// (a new generation that is already serving usually only needs its
    /// readiness interval); after that it is cancelled (a readiness wait is
    /// cut short) and undone. Then the application is stopped gracefully and
    /// notifications are flushed. No new deploy step starts after this is
    /// called.
    pub async fn shutdown(&self, signal_name: &str) {
        let _ = self.shutdown.send(true);
        let stop_app = || async {
            if let Some(app) = &self.app
                && let Err(err) = app.stop().await
            {
                tracing::error!(error = %chain(&err), "Stopping the application failed");
            }
        };
        let _tick = match tokio::time::timeout(SHUTDOWN_GRACE, self.tick_lock.lock()).await {
            Ok(tick) => tick,
            Err(_) => {
                if let Some(tag) = self.state().deploying.clone() {
                    tracing::warn!(version = %tag, "Cancelling the deploy in flight");
                }
                // Stopping the app also ends a readiness wait in flight, so
                // the tick never waits out a long `--health-timeout`.
                stop_app().await;
                self.tick_lock.lock().await
            }
        };
        stop_app().await;
        self.notify.send(format!("Stop receiving by `{signal_name}` signal"));
        self.notify.shutdown(Duration::from_secs(5)).await;
    }

    /// Runs ticks every interval until [`Deployer::shutdown`]. The first tick
    /// runs at once (and first starts the release in place, if any); a tick
    /// that overruns delays the next one, never overlaps it.
    pub async fn run(self: &Arc<Self>) {
        tracing::info!(version = %self.config.dewy_version, mode = self.config.mode.as_str(), "Dewy started");
        self.notify.on_deploy(&self.releases.current_link());
        self.notify.send(format!(
            "Automatic shipping started by *Dewy* (v{}: {})",
            self.config.dewy_version,
            self.config.mode.as_str()
        ));
        if let Some(app) = &self.app {
            tokio::spawn(forward_app_events(app.subscribe(), self.clone()));
        }
        let mut shutdown = self.shutdown.subscribe();
        let mut failures = FailureLog::default();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let result = self.tick().await;
            self.record_tick(&result);
            self.heartbeat(matches!(result, Ok(TickOutcome::Deployed { .. }))).await;
            match result {
                Ok(TickOutcome::KnownBad { .. } | TickOutcome::RolloutStopped { .. }) => {}
                Ok(_) => {
                    failures.recovered();
                    self.notify.success();
                }
                Err(Error::Cancelled { .. }) => {}
                Err(err) => {
                    let text = chain(&err);
                    failures.failed(&text);
                    self.notify.send_error(text);
                }
            }
            // A rollout may ask for an earlier check (a bake ends, a wave
            // opens) than the interval.
            let mut wait = self.config.interval;
            if let Some(at) = self.state().wake_at.take() {
                wait = wait.min(at.saturating_duration_since(tokio::time::Instant::now()));
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.trigger.notified() => tracing::debug!("Immediate check requested"),
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Writes this host's heartbeat (`host.<hostname>` in the cache, shared
    /// through a bucket cache): what it runs and how its last check went.
    /// Every [`HEARTBEAT_EVERY`], and at once when the version or the last
    /// outcome changed (a deploy, a failure, an operator's pin).
    pub(crate) async fn heartbeat(&self, now: bool) {
        {
            let mut state = self.state();
            let said = (state.current_tag.clone(), state.last_outcome.clone());
            let due = now
                || state.heartbeat_said.as_ref() != Some(&said)
                || state.heartbeat_at.is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY);
            if !due {
                return;
            }
            state.heartbeat_at = Some(tokio::time::Instant::now());
            state.heartbeat_said = Some(said);
        }
        let Ok(key) = Key::host(&self.config.hostname) else {
            return;
        };
        let record = self.heartbeat_record().await;
        if let Err(err) = self.cache.write(&key, record.as_bytes()).await {
            tracing::debug!(error = %chain(&err), "Could not write this host's heartbeat");
        }
    }

    /// This host's heartbeat record (JSON).
    pub(crate) async fn heartbeat_record(&self) -> String {
        let status = self.status().await;
        serde_json::json!({
            "host": self.config.hostname,
            "mode": status.mode,
            "dewy_version": status.dewy_version,
            "version": status.current_version,
            "running": status.is_running,
            "last_check": status.last_check,
            "last_outcome": status.last_outcome,
            "last_error": status.last_error,
            "pinned": status.pinned,
            "bad_release": status.bad_release,
            "at": self.clock.now().to_string(),
            "interval_secs": self.config.interval.as_secs(),
        })
        .to_string()
    }

    /// Every host's heartbeat in the cache (with a bucket cache: the
    /// fleet), each with `stale: true` when the storage wrote it more than
    /// three heartbeat periods ago (by the storage's clock: a host whose
    /// clock is off is neither dropped nor kept alive by it), and
    /// `written_at`.
    pub async fn fleet(&self) -> Vec<serde_json::Value> {
        fleet_of(self.cache.as_ref(), self.storage_clock.now())
            .await
            .unwrap_or_default()
    }

    fn record_tick(&self, result: &Result<TickOutcome, Error>) {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &self.metrics;
        let (counter, outcome, error) = match result {
            Ok(TickOutcome::Skipped) => (&m.ticks_skipped, "skipped", None),
            Ok(TickOutcome::Deployed { .. }) => (&m.ticks_deployed, "deployed", None),
            Ok(TickOutcome::WithinGracePeriod) => (&m.ticks_grace, "grace-period", None),
            Ok(TickOutcome::KnownBad { .. }) => (&m.ticks_known_bad, "known-bad", None),
            Ok(TickOutcome::Pinned { .. }) => (&m.ticks_skipped, "pinned", None),
            Ok(TickOutcome::RolloutWait { .. }) => (&m.ticks_skipped, "rollout-wait", None),
            Ok(TickOutcome::RolloutStopped { .. }) => (&m.ticks_known_bad, "rollout-stopped", None),
            Err(err) => (&m.ticks_error, "error", Some(chain(err))),
        };
        counter.fetch_add(1, Relaxed);
        let now = self.clock.now();
        let mut state = self.state();
        state.last_check = Some(now);
        state.last_outcome = Some(outcome.to_owned());
        state.last_error = error;
        state.next_check = jiff::SignedDuration::try_from(self.config.interval)
            .ok()
            .and_then(|d| now.checked_add(d).ok());
    }

    /// Server mode: when `current` holds a release and no generation runs
    /// (dewy just started, or a start failed), starts that release as it is:
    /// pinned or not, whatever is recorded bad about newer releases, without
    /// deploy hooks. A crashed app that the supervisor is restarting with
    /// backoff is left to it; a failed start is retried with backoff.
    pub(crate) async fn ensure_running(&self) -> Result<(), Error> {
        let Some(app) = &self.app else { return Ok(()) };
        if app.is_running() || app.is_restarting() || self.shutting_down() {
            return Ok(());
        }
        let Some(target) = self.releases.current_target() else {
            return Ok(());
        };
        if self
            .state()
            .resume_after
            .is_some_and(|t| tokio::time::Instant::now() < t)
        {
            return Ok(());
        }
        let version = self.version_placed(&target);
        let tag = version.clone().unwrap_or_else(|| target.display().to_string());
        tracing::info!(version = %tag, release = %target.display(), "Starting the release in place");
        let started = std::time::Instant::now();
        let result = app.start().await;
        add_millis(&self.metrics.phase_start_millis, started);
        match result {
            Ok(generation) => {
                {
                    let mut state = self.state();
                    state.resume_after = None;
                    state.resume_backoff = Duration::ZERO;
                    if version.is_some() {
                        state.current_tag = version;
                    }
                }
                tracing::info!(version = %tag, generation = generation.generation, pid = generation.pid, "Server started");
                self.notify.send_important(format!("Server started for `{tag}`"));
                Ok(())
            }
            Err(source) => {
                let mut state = self.state();
                let backoff = (state.resume_backoff * 2).clamp(Duration::from_secs(1), RESUME_BACKOFF_MAX);
                state.resume_backoff = backoff;
                state.resume_after = Some(tokio::time::Instant::now() + backoff);
                tracing::warn!(version = %tag, retry_in = ?backoff, "The release in place did not start; retrying with backoff");
                Err(Error::App {
                    action: "start",
                    tag,
                    source,
                })
            }
        }
    }

    /// One cycle: make sure the release in place runs, then check, cache,
    /// download, deploy, start or restart, record.
    pub async fn tick(&self) -> Result<TickOutcome, Error> {
        let _guard = self.tick_lock.lock().await;
        let resumed = self.ensure_running().await;
        if let Some(version) = crate::layout::pinned(&self.config.root) {
            resumed?;
            tracing::debug!(version, "Deploy skipped: pinned");
            return Ok(TickOutcome::Pinned { version });
        }
        let release = match self.latest().await? {
            Some(release) => release,
            None => return Ok(TickOutcome::WithinGracePeriod),
        };
        let key = Key::artifact(&release.tag, &release.artifact_name).map_err(Error::Cache)?;
        let current = self.cache.read(&self.config.current_key).await.map_err(Error::Cache)?;
        let same = current.as_deref() == Some(key.as_str().as_bytes());
        // The release in place is never deployed again: not after a restart
        // of dewy, not after a crash (the supervisor restarts it).
        let placed = self.releases.current_target().map(|t| self.version_placed(&t));
        let in_place = match &placed {
            Some(Some(version)) => *version == release.tag,
            // A folder the history does not know (put there by hand): trust
            // the cache's record.
            Some(None) => same,
            None => false,
        };
        if in_place {
            self.state().current_tag = Some(release.tag.clone());
            if !same
                && let Err(err) = self
                    .cache
                    .write(&self.config.current_key, key.as_str().as_bytes())
                    .await
            {
                tracing::warn!(error = %chain(&err), "Failed to record the current release in the cache");
            }
            resumed?;
            if self.config.rollout.is_some()
                && let Err(err) = self.rollout_in_place(&release, &key).await
            {
                tracing::warn!(version = %release.tag, error = %chain(&err), "Could not update this host's place in the rollout");
            }
            if let Some(app) = &self.app
                && !app.is_running()
                && !app.is_restarting()
            {
                return Err(Error::NotRunning { tag: release.tag });
            }
            tracing::debug!(cache_key = %key, "Deploy skipped");
            return Ok(TickOutcome::Skipped);
        }
        // A release whose rollout already stopped for this host (halted,
        // aborted, failed here): no request at all until a newer one.
        if let Some(reason) = self.rollout_stopped(&key) {
            resumed?;
            return Ok(TickOutcome::RolloutStopped {
                tag: release.tag,
                reason,
            });
        }
        let recorded_bad = self.cache.read(&Key::bad(&key)).await.ok().flatten().is_some();
        let remembered_bad = {
            let state = self.state();
            state.bad_key.as_deref() == Some(key.as_str()) && !state.bad_in_cache
        };
        if recorded_bad || remembered_bad {
            resumed?;
            // Once per release at INFO (a check every few seconds must not
            // repeat it), then at DEBUG.
            let first = {
                let mut state = self.state();
                let first = state.announced_bad.as_deref() != Some(key.as_str());
                state.announced_bad = Some(key.to_string());
                first
            };
            if first {
                tracing::info!(cache_key = %key, version = %release.tag, "Deploy skipped: this release is recorded as bad (here or by another host sharing the cache); `dewy clear-bad` allows it again");
            } else {
                tracing::debug!(cache_key = %key, "Deploy skipped: this release is recorded as bad");
            }
            return Ok(TickOutcome::KnownBad { tag: release.tag });
        }
        if !self.config.verify_keys.is_empty()
            && release.signature_url.is_none()
            && self.within_grace_period(release.published_at)
        {
            // Publishers upload the signature after the artifact: wait for
            // it as for a missing artifact, then refuse the release.
            resumed?;
            tracing::debug!(version = %release.tag, artifact = %release.artifact_name, "The release's signature is not published yet (within the grace period)");
            return Ok(TickOutcome::WithinGracePeriod);
        }
        let previous_tag = match placed {
            Some(Some(version)) => Some(version),
            _ => current
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.split_once("--").map(|(t, _)| t.to_owned())),
        };
        if self.config.rollout.is_some() {
            match self.rollout_admit(&release, &key, previous_tag.clone()).await {
                Ok(crate::rollout::Admission::Go { .. }) => {}
                Ok(crate::rollout::Admission::Wait(reason)) => {
                    resumed?;
                    return Ok(TickOutcome::RolloutWait {
                        tag: release.tag,
                        reason,
                    });
                }
                Ok(crate::rollout::Admission::Stopped(reason)) => {
                    resumed?;
                    return Ok(TickOutcome::RolloutStopped {
                        tag: release.tag,
                        reason,
                    });
                }
                // The shared record cannot be read or written: never
                // deploy around the plan.
                Err(err) => {
                    resumed?;
                    return Err(err);
                }
            }
        }
        if let Err(err) = resumed {
            // The newer release may fix it: deploy it, but say why nothing ran.
            tracing::warn!(error = %chain(&err), "The release in place is not running; deploying the newer one");
        }
        self.state().deploying = Some(release.tag.clone());
        let started = std::time::Instant::now();
        let result = match &self.config.rollout {
            // The slot is renewed while the deploy runs.
            Some(plan) => {
                let renew = async {
                    loop {
                        tokio::time::sleep(plan.lease / 3).await;
                        self.rollout_renew(&key).await;
                    }
                };
                tokio::select! {
                    result = self.fetch_and_deploy(&release, &key, previous_tag) => result,
                    () = renew => unreachable!("the renewal loop never ends"),
                }
            }
            None => self.fetch_and_deploy(&release, &key, previous_tag).await,
        };
        self.state().deploying = None;
        if self.config.rollout.is_some() {
            self.rollout_after_deploy(&key, &result).await;
        }
        self.cancel_deploy.store(false, std::sync::atomic::Ordering::SeqCst);
        self.record_attempt(&release, &key, &result, started).await;
        let release_dir = result?;
        self.record(&release, &key, &release_dir).await;
        Ok(TickOutcome::Deployed {
            tag: release.tag,
            release_dir,
        })
    }

    /// The registry's newest release; `None` when its artifact is missing
    /// within the grace period.
    async fn latest(&self) -> Result<Option<Release>, Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let answer = self.registry.latest().await;
        match &answer {
            Ok(_) => self.metrics.registry_ok.fetch_add(1, Relaxed),
            Err(dewy_registry::Error::ArtifactNotFound { .. }) => self.metrics.registry_not_found.fetch_add(1, Relaxed),
            Err(_) => self.metrics.registry_errors.fetch_add(1, Relaxed),
        };
        match answer {
            Ok(r) => Ok(Some(r)),
            Err(dewy_registry::Error::ArtifactNotFound {
                tag,
                wanted,
                published_at: Some(published),
            }) => {
                if self.within_grace_period(Some(published)) {
                    tracing::debug!(
                        tag,
                        message = "artifact not found",
                        grace_period = ?self.config.grace_period,
                        "Artifact not found within grace period"
                    );
                    return self.fallback_for_a_fresh_host(&tag).await;
                }
                Err(Error::Registry(dewy_registry::Error::ArtifactNotFound {
                    tag,
                    wanted,
                    published_at: Some(published),
                }))
            }
            Err(err) => {
                // Logged once per tick, as `Dewy run failure`.
                tracing::debug!(error = %chain(&err), "Current failure");
                Err(Error::Registry(err))
            }
        }
    }

    /// A host with nothing deployed does not wait out the grace period of
    /// the newest release: it takes the newest older release that is
    /// complete for it (and the newest one at a later tick).
    async fn fallback_for_a_fresh_host(&self, newest: &str) -> Result<Option<Release>, Error> {
        if self.releases.current_target().is_some() {
            return Ok(None);
        }
        match self.registry.latest_complete_before(newest).await {
            Ok(Some(release)) => {
                let first = {
                    let mut state = self.state();
                    let first = state.announced_fallback.as_deref() != Some(newest);
                    state.announced_fallback = Some(newest.to_owned());
                    first
                };
                if first {
                    tracing::info!(newest, version = %release.tag, grace_period = ?self.config.grace_period, "Nothing is deployed and the newest release has no artifact for this host yet; deploying the newest complete release meanwhile");
                }
                Ok(Some(release))
            }
            Ok(None) => Ok(None),
            Err(err) => {
                tracing::warn!(newest, error = %chain(&err), "Nothing is deployed and the newest release is incomplete; looking for an older complete release failed");
                Ok(None)
            }
        }
    }

    /// The artifact from the cache (or downloaded into it), then the
    /// deployment transaction.
    async fn fetch_and_deploy(
        &self,
        release: &Release,
        key: &Key,
        previous_tag: Option<String>,
    ) -> Result<PathBuf, Error> {
        // A checksum or signature that the artifact fails is the
        // publisher's fault: recorded bad, not downloaded again every tick.
        let artifact = match self.cached_or_downloaded(release, key).await {
            Err(err) if err.blames_release() => {
                self.mark_bad(release, &chain(&err), false).await;
                return Err(err);
            }
            other => other?,
        };
        self.notify.send(format!("Downloaded artifact for `{}`", release.tag));
        // A folder on disk that already holds this version (an operator's
        // rollback undone, say) is switched to again, not extracted anew.
        let reuse = crate::history::folder_of(&self.config.root, &release.tag)
            .filter(|dir| self.releases.current_target().as_deref() != Some(dir.as_path()));
        Deployment::begin(self, release, previous_tag, reuse)
            .run(&artifact)
            .await
    }

    /// The artifact in the cache, downloaded into it when missing; with
    /// `--verify-key`, its signature checked on the way in (and again for a
    /// copy already cached, which another host or a hand may have put).
    async fn cached_or_downloaded(&self, release: &Release, key: &Key) -> Result<PathBuf, Error> {
        let signature = self.signature_of(release).await?;
        let cached = match self.cache.local_path(key).await.map_err(Error::Cache)? {
            Some(path) => {
                self.metrics
                    .cache_hits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(path)
            }
            // Another host of the fleet downloaded it meanwhile.
            None => self.cache.begin_download(key).await.map_err(Error::Cache)?,
        };
        if let Some(path) = cached {
            if let Some(check) = signature {
                let file = path.clone();
                let verified = tokio::task::spawn_blocking(move || check.verify_file(&file).map(|()| check))
                    .await
                    .map_err(|e| Error::Io {
                        op: "verify the signature of",
                        path: path.clone(),
                        source: std::io::Error::other(e),
                    })?;
                let check = verified.map_err(|source| Error::Refused {
                    tag: release.tag.clone(),
                    source,
                })?;
                log_verified(release, &check);
            }
            return Ok(path);
        }
        // A shutdown does not wait for a long download.
        let downloaded = tokio::select! {
            r = self.download(release, key, signature.as_ref()) => r,
            () = self.cancelled() => Err(Error::Cancelled {
                tag: release.tag.clone(),
                why: "dewy is shutting down",
            }),
        };
        self.cache.end_download(key).await;
        downloaded
    }

    /// With `--verify-key`: the release's signature, read and matched to a
    /// trusted key before anything is downloaded.
    async fn signature_of(&self, release: &Release) -> Result<Option<SignatureCheck>, Error> {
        let keys = &self.config.verify_keys;
        if keys.is_empty() {
            return Ok(None);
        }
        match self.downloader.signature(&*self.registry, release, keys).await {
            Ok(check) => Ok(Some(check)),
            Err(dewy_registry::Error::Signature { source, .. }) => Err(Error::Refused {
                tag: release.tag.clone(),
                source,
            }),
            Err(source) => Err(Error::Download {
                tag: release.tag.clone(),
                source,
            }),
        }
    }

    /// Whether a release published at `published_at` is inside the grace
    /// period (an unknown time counts as outside).
    fn within_grace_period(&self, published_at: Option<jiff::Timestamp>) -> bool {
        let Some(published) = published_at else {
            return false;
        };
        let age = self.clock.now().duration_since(published);
        let grace = jiff::SignedDuration::try_from(self.config.grace_period).unwrap_or(jiff::SignedDuration::MAX);
        age < grace
    }

    /// Reports a deployment (or, to registries that want them, a failed
    /// attempt with its error chain) to the registry's audit trail.
    async fn report(&self, release: &Release, error: Option<String>) {
        let report = Report {
            release_id: release.id.clone(),
            tag: release.tag.clone(),
            command: self.config.mode.as_str().to_owned(),
            hostname: self.config.hostname.clone(),
            at: self.clock.now(),
            error,
        };
        if let Err(err) = self.registry.report(&report).await {
            tracing::error!(error = %chain(&err), "Report shipping failure");
        }
    }

    /// Writes the attempt to the history and the metrics; drops a cached
    /// artifact that could not be extracted.
    async fn record_attempt(
        &self,
        release: &Release,
        key: &Key,
        result: &Result<PathBuf, Error>,
        started: std::time::Instant,
    ) {
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
                self.metrics
                    .deployment_duration
                    .observe(Duration::from_millis(entry.duration_ms));
            } else {
                self.metrics.deployment_errors.fetch_add(1, Relaxed);
            }
        }
        if let Err(err) = crate::history::append(&self.config.root, &entry) {
            tracing::warn!(error = %err, "Could not write the deployment history");
        }
        if let Err(err) = result
            && !matches!(err, Error::Cancelled { .. })
            && self.registry.reports_failures()
        {
            self.report(release, Some(chain(err))).await;
        }
        if let Err(Error::Extract { .. }) = result {
            // The cached artifact may be a truncated copy (a `file://`
            // registry whose artifact was still being written): drop it so
            // the next tick downloads it again instead of failing forever.
            // An unsafe one (recorded bad) is of no use either.
            if let Err(err) = self.cache.delete(key).await {
                tracing::warn!(cache_key = %key, error = %chain(&err), "Could not drop the unusable cached artifact");
            }
        }
    }

    async fn download(
        &self,
        release: &Release,
        key: &Key,
        signature: Option<&SignatureCheck>,
    ) -> Result<PathBuf, Error> {
        tracing::info!(tag = %release.tag, url = %SafeUrl(&release.artifact_url), "Downloading artifact");
        let progress = ForRelease {
            tag: release.tag.clone(),
            progress: self.progress.clone(),
        };
        let download_error = |source| Error::Download {
            tag: release.tag.clone(),
            source,
        };
        let request = self.registry.artifact_request(release).await.map_err(download_error)?;
        let started = std::time::Instant::now();
        let downloaded = self
            .downloader
            .fetch_verified(
                &request,
                release.checksum.as_ref(),
                signature,
                self.cache.staging_dir(),
                &progress,
            )
            .await;
        self.progress.finished(&release.tag);
        add_millis(&self.metrics.phase_download_millis, started);
        let downloaded = match downloaded {
            Ok(d) => d,
            Err(dewy_registry::Error::Signature { source, .. }) => {
                return Err(Error::Refused {
                    tag: release.tag.clone(),
                    source,
                });
            }
            Err(err) => return Err(download_error(err)),
        };
        tracing::info!(tag = %release.tag, bytes = downloaded.size, sha256 = %downloaded.sha256, "Artifact downloaded");
        if let Some(check) = signature {
            log_verified(release, check);
        }
        self.metrics
            .downloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .download_bytes
            .fetch_add(downloaded.size, std::sync::atomic::Ordering::Relaxed);
        self.cache.put_file(key, &downloaded.path).await.map_err(Error::Cache)?;
        tracing::info!(cache_key = %key, "Cached artifact");
        self.cache
            .local_path(key)
            .await
            .map_err(Error::Cache)?
            .ok_or_else(|| Error::CacheVanished { key: key.to_string() })
    }

    /// Runs a deploy hook and reports it; `None` when it could not run. A
    /// shutdown kills the hook.
    pub(crate) async fn run_hook(
        &self,
        stage: &str,
        command: &str,
        env: &[(OsString, OsString)],
    ) -> Option<HookOutcome> {
        let started = std::time::Instant::now();
        let outcome = tokio::select! {
            o = hooks::run(command, &self.config.root, env, self.config.hook_timeout) => o,
            () = self.cancelled() => {
                tracing::warn!(command, "{stage} deploy hook cancelled: dewy is shutting down");
                return None;
            }
        };
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
            // On the status page's timeline.
            let version = {
                let state = self.state();
                state
                    .deploying
                    .clone()
                    .or_else(|| state.current_tag.clone())
                    .unwrap_or_default()
            };
            let entry = crate::history::Entry {
                time: self.clock.now(),
                version,
                outcome: "hook-failed".into(),
                duration_ms: outcome.duration.as_millis() as u64,
                release_dir: None,
                reason: Some(format!("{stage} deploy hook `{command}`: {}", outcome.failure())),
            };
            if let Err(err) = crate::history::append(&self.config.root, &entry) {
                tracing::warn!(error = %err, "Could not write the deployment history");
            }
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

    /// Records `release` as bad, in memory and in the cache (so a restarted
    /// dewy and every host sharing the cache skip it until a newer release
    /// appears or an operator clears it).
    /// With a staged rollout, a release that failed to start or become
    /// healthy (`by_this_host`) is counted in the rollout record instead,
    /// which halts it for the fleet after `max-failures`.
    pub(crate) async fn mark_bad(&self, release: &Release, reason: &str, by_this_host: bool) {
        let Ok(key) = Key::artifact(&release.tag, &release.artifact_name) else {
            return;
        };
        {
            let mut state = self.state();
            state.bad_key = Some(key.to_string());
            state.bad_in_cache = false;
        }
        if by_this_host && self.config.rollout.is_some() {
            return;
        }
        match self.cache.write(&Key::bad(&key), reason.as_bytes()).await {
            Ok(()) => self.state().bad_in_cache = true,
            Err(err) => tracing::warn!(error = %chain(&err), "Could not record the bad release in the cache"),
        }
    }

    /// The version deployed into `release_dir`, from the deployment history
    /// (read again only when `current` points at another folder).
    pub(crate) fn version_placed(&self, release_dir: &Path) -> Option<String> {
        if let Some((dir, version)) = &self.state().placed
            && dir == release_dir
        {
            return Some(version.clone());
        }
        let version = crate::history::version_of(&self.config.root, release_dir)?;
        self.state().placed = Some((release_dir.to_path_buf(), version.clone()));
        Some(version)
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
        {
            let mut state = self.state();
            state.current_tag = Some(release.tag.clone());
            state.placed = Some((release_dir.to_path_buf(), release.tag.clone()));
        }
        self.report(release, None).await;
        // Only folders dewy recorded in its history are pruned: a folder in
        // releases/ that dewy did not create is never removed.
        let recorded = crate::history::recorded_folders(&self.config.root);
        match self.releases.prune(self.config.keep_releases, &recorded) {
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

/// The INFO line of an artifact whose signature was verified.
fn log_verified(release: &Release, check: &SignatureCheck) {
    tracing::info!(version = %release.tag, key_id = %check.key_id(), trusted_comment = check.trusted_comment(), "Signature verified");
}

/// Turns the supervisor's events into notifications and metrics.
async fn forward_app_events(mut events: tokio::sync::broadcast::Receiver<Event>, deployer: Arc<Deployer>) {
    let notify = &deployer.notify;
    loop {
        match events.recv().await {
            Ok(Event::Exited {
                generation,
                pid,
                exit,
                expected: false,
            }) => {
                deployer
                    .metrics
                    .app_crashes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                notify.send_error(format!(
                    "Application exited unexpectedly (generation {generation}, pid {pid}, {exit}); restarting with backoff"
                ));
            }
            Ok(Event::CrashLoop { crashes }) => {
                notify.send_error(format!(
                    "Application is crash-looping: {crashes} crashes in the last minute"
                ));
            }
            Ok(Event::AcceptQueueStalled { queued, .. }) => {
                deployer
                    .metrics
                    .accept_queue_stalls
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                notify.send_error(format!(
                    "{queued} connections wait and no generation of the application accepts them"
                ));
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    }
}

/// Every host's heartbeat record in `cache`, sorted by host, each with
/// `written_at` (the storage's write time) and `stale: true` when that is
/// more than three heartbeat periods before `now` (a time by the storage's
/// clock, or the caller's best estimate of it).
pub async fn fleet_of(cache: &dyn Cache, now: jiff::Timestamp) -> Result<Vec<serde_json::Value>, Error> {
    let mut hosts = Vec::new();
    for entry in cache.list().await.map_err(Error::Cache)? {
        if !entry.key.is_host_record() {
            continue;
        }
        let Some(data) = cache.read(&entry.key).await.map_err(Error::Cache)? else {
            continue;
        };
        let Ok(mut record) = serde_json::from_slice::<serde_json::Value>(&data) else {
            continue;
        };
        let period = HEARTBEAT_EVERY.max(Duration::from_secs(record["interval_secs"].as_u64().unwrap_or(0)));
        let written = jiff::Timestamp::try_from(entry.modified).ok();
        let age = written.map(|t| now.duration_since(t));
        record["written_at"] = written.map(|t| t.to_string()).into();
        let stale =
            age.is_none_or(|a| a > jiff::SignedDuration::try_from(period * 3).unwrap_or(jiff::SignedDuration::MAX));
        record["stale"] = stale.into();
        hosts.push(record);
    }
    hosts.sort_by(|a, b| a["host"].as_str().cmp(&b["host"].as_str()));
    Ok(hosts)
}

/// How often a host writes its heartbeat record.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);

/// How often an unchanged failure is logged again at ERROR.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(600);

/// The ERROR lines of failed ticks: one per failure, an unchanged failure
/// again only every [`FAILURE_LOG_EVERY`] with how often it repeated (DEBUG
/// in between), a new failure at once. Used by the deploy loop and by
/// loops built on dewy's crates (container mode).
#[derive(Debug, Default)]
pub struct FailureLog {
    /// The failure's fingerprint, when it was last logged at ERROR, and
    /// the ticks it failed since then.
    last: Option<(String, std::time::Instant, u64)>,
    /// Failed ticks in a row.
    count: u64,
}

impl FailureLog {
    /// What makes two failures the same: the text without request ids,
    /// which differ on every attempt.
    fn fingerprint(error: &str) -> String {
        let mut out = String::with_capacity(error.len());
        let mut rest = error;
        while let Some(i) = rest.find("request id ") {
            out.push_str(&rest[..i + "request id ".len()]);
            rest = &rest[i + "request id ".len()..];
            let end = rest.find([' ', ',', ')', ';']).unwrap_or(rest.len());
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    }

    /// A failed tick with its error chain.
    pub fn failed(&mut self, error: &str) {
        self.count += 1;
        let count = self.count;
        let key = Self::fingerprint(error);
        match &mut self.last {
            Some((last, logged, repeats)) if *last == key && logged.elapsed() < FAILURE_LOG_EVERY => {
                *repeats += 1;
                tracing::debug!(error, count, "Dewy run failure (unchanged)");
            }
            Some((last, logged, repeats)) if *last == key => {
                tracing::error!(error, count, repeated = *repeats + 1, since = ?logged.elapsed(), "Dewy run failure");
                *logged = std::time::Instant::now();
                *repeats = 0;
            }
            _ => {
                tracing::error!(error, count, "Dewy run failure");
                self.last = Some((key, std::time::Instant::now(), 0));
            }
        }
    }

    /// A good tick: `Dewy run recovered` once after failures.
    pub fn recovered(&mut self) {
        if self.last.take().is_some() {
            tracing::info!(failed_ticks = self.count, "Dewy run recovered");
        }
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::FailureLog;

    #[test]
    fn failures_differing_only_in_request_ids_are_the_same() {
        let a = "list `s3://r/b/`: AccessDenied: Access Denied (HTTP 403, request id AAA111)";
        let b = "list `s3://r/b/`: AccessDenied: Access Denied (HTTP 403, request id BBB222)";
        assert_eq!(FailureLog::fingerprint(a), FailureLog::fingerprint(b));
        assert_ne!(
            FailureLog::fingerprint(a),
            FailureLog::fingerprint("list `s3://r/b/`: NoSuchBucket (HTTP 404, request id AAA111)")
        );
        let mut log = FailureLog::default();
        log.failed(a);
        log.failed(b);
        assert_eq!(log.last.as_ref().map(|l| l.2), Some(1), "the second is a repeat");
        log.recovered();
        assert!(log.last.is_none() && log.count == 0);
    }
}
