//! One deploy as a transaction: extract → durable → switch → start, then
//! [`Deployment::commit`] or [`Deployment::abort`].
//!
//! In the manner of rustup's `Transaction`, a [`Deployment`] remembers every
//! change it made to the host (a new release folder, the `current` switch,
//! the application it started or restarted), and `abort` is the only way
//! back: it undoes those changes in reverse order, whatever step failed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use dewy_archive::Extractor;
use dewy_registry::Release;

use crate::config::Mode;
use crate::deployer::Deployer;
use crate::error::{Error, chain};
use crate::metrics::add_millis;
use crate::progress::ForRelease;

/// One release being deployed. Every failure after [`Deployment::begin`]
/// goes through [`Deployment::abort`].
#[derive(Debug)]
pub(crate) struct Deployment<'d> {
    d: &'d Deployer,
    release: &'d Release,
    /// The release folder: new, or a folder that already holds this version.
    dir: PathBuf,
    /// Whether this deployment extracted `dir` (so `abort` removes it).
    created: bool,
    /// Where `current` pointed before, and that release's version.
    previous: Option<PathBuf>,
    previous_tag: Option<String>,
    /// The hooks' environment.
    env: Vec<(OsString, OsString)>,
    switched: bool,
    /// A new generation replaced the one that served the previous release.
    restarted: bool,
}

impl<'d> Deployment<'d> {
    /// A deployment of `release` into a new folder, or into `reuse`, a
    /// folder on disk that already holds this version (nothing extracted).
    pub(crate) fn begin(
        d: &'d Deployer,
        release: &'d Release,
        previous_tag: Option<String>,
        reuse: Option<PathBuf>,
    ) -> Self {
        let created = reuse.is_none();
        let dir = reuse.unwrap_or_else(|| d.releases.new_release_path(d.clock.now()));
        let mut env = d.config.hook_env.clone();
        env.push(("DEWY_VERSION".into(), release.tag.clone().into()));
        env.push(("DEWY_RELEASE_DIR".into(), dir.clone().into()));
        env.push((
            "DEWY_PREVIOUS_VERSION".into(),
            previous_tag.clone().unwrap_or_default().into(),
        ));
        env.push(("DEWY_APP_DIR".into(), d.config.root.clone().into()));
        Self {
            d,
            release,
            dir,
            created,
            previous: d.releases.current_target(),
            previous_tag,
            env,
            switched: false,
            restarted: false,
        }
    }

    /// Runs every step; on failure, undoes what was done and returns why.
    pub(crate) async fn run(mut self, artifact: &Path) -> Result<PathBuf, Error> {
        match self.steps(artifact).await {
            Ok(()) => Ok(self.commit()),
            Err(err) => Err(self.abort(err).await),
        }
    }

    async fn steps(&mut self, artifact: &Path) -> Result<(), Error> {
        let d = self.d;
        if let Some(cmd) = &d.config.before_hook
            && let Some(o) = d.run_hook("Before", cmd, &self.env).await
            && !o.success()
            && d.config.abort_on_before_hook_failure
        {
            return Err(Error::BeforeHook {
                command: cmd.clone(),
                reason: format!("{} {}", o.failure(), o.stderr).trim().to_owned(),
            });
        }
        self.check_cancelled()?;
        if self.created {
            self.extract(artifact).await?;
        } else {
            tracing::info!(version = %self.release.tag, path = %self.dir.display(), "Reusing the release folder on disk");
        }
        self.check_cancelled()?;
        // Slack `thread=true`: messages from here on reply in the new
        // release's thread (Dewy calls it between extraction and switch).
        d.notify.on_deploy(&self.dir);
        tracing::info!(from = %self.dir.display(), to = %d.releases.current_link().display(), "Create symlink");
        d.releases.switch(&self.dir).map_err(|source| Error::Io {
            op: "switch the current symlink to",
            path: self.dir.clone(),
            source,
        })?;
        self.switched = true;
        if let Some(cmd) = &d.config.after_hook {
            d.run_hook("After", cmd, &self.env).await;
        }
        if let (Mode::Assets, Some(cmd)) = (d.config.mode, &d.config.health_command) {
            let started = std::time::Instant::now();
            let checked = crate::health::command(cmd, &d.config.root, &self.env, d.config.hook_timeout).await;
            add_millis(&d.metrics.phase_hooks_millis, started);
            checked.map_err(|reason| self.unhealthy(reason))?;
        }
        self.check_cancelled()?;
        self.start().await
    }

    fn check_cancelled(&self) -> Result<(), Error> {
        let why = if self.d.shutting_down() {
            "dewy is shutting down"
        } else if self.d.cancel_deploy.load(std::sync::atomic::Ordering::SeqCst) {
            "an operator pinned a release (dewy rollback or pin)"
        } else {
            return Ok(());
        };
        Err(Error::Cancelled {
            tag: self.release.tag.clone(),
            why,
        })
    }

    fn unhealthy(&self, reason: String) -> Error {
        Error::Unhealthy {
            tag: self.release.tag.clone(),
            reason,
            previous: self.previous_tag.clone().unwrap_or_else(|| "nothing".into()),
        }
    }

    /// Extracts the artifact into the new folder, durably: every file and
    /// folder is on disk before `current` may point at it.
    async fn extract(&mut self, artifact: &Path) -> Result<(), Error> {
        let d = self.d;
        tracing::info!(path = %self.dir.display(), "Extract archive");
        // A shutdown stops the extraction between two blocks.
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (extractor, src, dest) = (
            Extractor::new(d.config.limits).durable(true).cancel_on(cancel.clone()),
            artifact.to_path_buf(),
            self.dir.clone(),
        );
        let progress = ForRelease {
            tag: self.release.tag.clone(),
            progress: d.progress.clone(),
        };
        let started = std::time::Instant::now();
        let extracting =
            tokio::task::spawn_blocking(move || extractor.extract_with_progress(&src, &dest, Some(&progress)));
        let watch_shutdown = async {
            d.cancelled().await;
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            std::future::pending::<()>().await;
        };
        let extracted = tokio::select! {
            r = extracting => r,
            () = watch_shutdown => unreachable!("pending never resolves"),
        };
        d.progress.finished(&self.release.tag);
        add_millis(&d.metrics.phase_extract_millis, started);
        extracted
            .map_err(|e| Error::Io {
                op: "extract into",
                path: self.dir.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| match source {
                dewy_archive::Error::Cancelled { .. } => Error::Cancelled {
                    tag: self.release.tag.clone(),
                    why: "dewy is shutting down",
                },
                source => Error::Extract {
                    tag: self.release.tag.clone(),
                    source,
                },
            })?;
        // Before `current` may point at it: a dewy killed from here on
        // knows on its next start which version this folder holds (so it
        // neither extracts it again nor leaves it unpruned).
        let entry = crate::history::Entry {
            time: d.clock.now(),
            version: self.release.tag.clone(),
            outcome: "extracted".into(),
            duration_ms: started.elapsed().as_millis() as u64,
            release_dir: Some(self.dir.display().to_string()),
            reason: None,
        };
        if let Err(err) = crate::history::append(&d.config.root, &entry) {
            tracing::warn!(error = %err, "Could not write the deployment history");
        }
        Ok(())
    }

    /// Server mode: starts the first generation or restarts the running one,
    /// then watches the soak.
    async fn start(&mut self) -> Result<(), Error> {
        let d = self.d;
        let Some(app) = &d.app else { return Ok(()) };
        let restart = app.is_running();
        let started = std::time::Instant::now();
        let result = if restart {
            tracing::info!(version = %self.release.tag, "Restart server");
            d.metrics
                .restarts_deploy
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            app.restart().await
        } else {
            tracing::info!(version = %self.release.tag, "Start server");
            app.start().await
        };
        add_millis(&d.metrics.phase_start_millis, started);
        let generation = result.map_err(|source| Error::App {
            action: if restart { "restart" } else { "start" },
            tag: self.release.tag.clone(),
            source,
        })?;
        self.restarted = restart;
        let verb = if restart { "restarted" } else { "started" };
        tracing::info!(version = %self.release.tag, generation = generation.generation, pid = generation.pid, "Server {verb}");
        d.notify
            .send_important(format!("Server {verb} for `{}`", self.release.tag));
        if let (true, true, Some(check)) = (restart, app.health_unverified(), &d.config.port_health) {
            let checked = tokio::select! {
                r = crate::health::through_port(check) => r,
                () = d.cancelled() => Err("dewy is shutting down".to_owned()),
            };
            checked.map_err(|reason| self.unhealthy(reason))?;
        }
        if let (true, Some(soak)) = (restart, &d.config.soak) {
            let watched = tokio::select! {
                r = crate::health::soak(soak) => r,
                () = d.cancelled() => Err("dewy is shutting down".to_owned()),
            };
            watched.map_err(|reason| self.unhealthy(reason))?;
        }
        Ok(())
    }

    /// The deploy succeeded: the release folder stays.
    fn commit(self) -> PathBuf {
        self.dir
    }

    /// Undoes every change, newest first: `current` back to the previous
    /// release (or removed on a first deploy), the previous release running
    /// again (or the app stopped on a first deploy), the after hook with
    /// `DEWY_ROLLBACK=1`, the new folder removed, and the release recorded
    /// as bad when it is at fault. Returns `cause`.
    pub(crate) async fn abort(self, cause: Error) -> Error {
        let d = self.d;
        let reason = chain(&cause);
        if self.switched {
            tracing::error!(version = %self.release.tag, reason, "Deploy failed, rolling back");
            d.metrics.rollbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let back = match &self.previous {
                Some(prev) => d.releases.switch(prev),
                None => d.releases.unlink_current(),
            };
            match (&back, &self.previous) {
                (Err(e), _) => tracing::error!(error = %e, "Switching current back failed"),
                (Ok(()), Some(prev)) => {
                    tracing::info!(to = %prev.display(), "Switched current back to the previous release");
                    d.notify.on_deploy(prev);
                }
                (Ok(()), None) => tracing::info!("Removed current: no release was in place before this one"),
            }
        }
        // A failed start or restart left the previous generation serving;
        // a restart that succeeded must be undone with another one.
        if let (Some(app), true, Some(_)) = (&d.app, self.restarted, &self.previous)
            && let Err(e) = app.restart().await
        {
            tracing::error!(error = %chain(&e), "Restarting the previous release failed");
        }
        if let (true, Some(cmd)) = (self.switched, &d.config.after_hook) {
            let mut env = d.config.hook_env.clone();
            env.push((
                "DEWY_VERSION".into(),
                self.previous_tag.clone().unwrap_or_default().into(),
            ));
            env.push((
                "DEWY_RELEASE_DIR".into(),
                self.previous.clone().unwrap_or_default().into(),
            ));
            env.push(("DEWY_PREVIOUS_VERSION".into(), self.release.tag.clone().into()));
            env.push(("DEWY_APP_DIR".into(), d.config.root.clone().into()));
            env.push(("DEWY_ROLLBACK".into(), "1".into()));
            d.run_hook("After", cmd, &env).await;
        }
        if self.created
            && d.releases.current_target().as_deref() != Some(self.dir.as_path())
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.dir.display(), error = %e, "Could not remove the failed release folder");
        }
        if cause.blames_release() {
            d.mark_bad(self.release, &reason, true).await;
        }
        cause
    }
}
