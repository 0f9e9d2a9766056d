//! What operators ask of a running dewy: restart, pin (rollback), unpin,
//! clear bad records. Each runs between ticks, never inside a deploy.

use std::path::Path;

use crate::deployer::Deployer;
use crate::error::Error;

impl Deployer {
    /// Restarts the application on request (SIGUSR1, the admin API).
    pub async fn restart_app(&self) -> Result<(), Error> {
        let Some(app) = &self.app else {
            tracing::info!("Restart requested, but assets mode runs no application");
            return Ok(());
        };
        let tag = self.state().current_tag.clone().unwrap_or_default();
        app.restart().await.map_err(|source| Error::App {
            action: "restart",
            tag: tag.clone(),
            source,
        })?;
        self.metrics
            .restarts_signal
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.notify.send("Restarted receiving by `SIGUSR1` signal");
        self.record_operator_action(&tag, "restarted", None, "by an operator");
        Ok(())
    }

    /// The release being deployed now, if any: a pin issued now cancels
    /// it (at its next step), other operator commands wait until it ended.
    pub fn deploying(&self) -> Option<String> {
        self.state().deploying.clone()
    }

    /// An operator's rollback or pin: cancels a deploy in flight (it is
    /// undone at its next step), then, between ticks, pins the folder at
    /// `version`, points `current` at `release_dir` (a release on disk) and
    /// restarts the application.
    pub async fn pin_release(&self, release_dir: &Path, version: &str) -> Result<(), Error> {
        if let Some(tag) = self.deploying() {
            // The pinned release wins: the deploy stops at its next step
            // and is undone, so the new release does not keep serving.
            self.cancel_deploy.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!(deploying = %tag, pin = version, "Cancelling the deploy in flight for an operator's pin");
        }
        let _tick = self.tick_lock.lock().await;
        crate::layout::set_pin(&self.config.root, Some(version)).map_err(|source| Error::Io {
            op: "pin the app folder at",
            path: release_dir.to_path_buf(),
            source,
        })?;
        self.switch_and_restart(release_dir, version).await?;
        tracing::info!(version, release = %release_dir.display(), "Pinned by an operator");
        self.record_operator_action(version, "rolled-back", Some(release_dir), "by an operator; pinned");
        self.heartbeat(true).await;
        self.notify.send_important(format!(
            "Rolled back to `{version}` by an operator; deploys are paused until unpinned"
        ));
        Ok(())
    }

    /// Points `current` at `release_dir` (a release on disk holding
    /// `version`) and restarts the application.
    pub(crate) async fn switch_and_restart(&self, release_dir: &Path, version: &str) -> Result<(), Error> {
        self.releases.switch(release_dir).map_err(|source| Error::Io {
            op: "switch the current symlink to",
            path: release_dir.to_path_buf(),
            source,
        })?;
        self.notify.on_deploy(release_dir);
        {
            let mut state = self.state();
            state.current_tag = Some(version.to_owned());
            state.placed = None;
        }
        if let Some(app) = &self.app {
            app.restart().await.map_err(|source| Error::App {
                action: "restart",
                tag: version.to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    /// Writes an operator's action to the deployment history (for the
    /// timeline of the status page).
    pub(crate) fn record_operator_action(
        &self,
        version: &str,
        outcome: &str,
        release_dir: Option<&Path>,
        reason: &str,
    ) {
        let entry = crate::history::Entry {
            time: self.clock.now(),
            version: version.to_owned(),
            outcome: outcome.to_owned(),
            duration_ms: 0,
            release_dir: release_dir.map(|d| d.display().to_string()),
            reason: Some(reason.to_owned()),
        };
        if let Err(err) = crate::history::append(&self.config.root, &entry) {
            tracing::warn!(error = %err, "Could not write the deployment history");
        }
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
        self.state().bad_key = None;
        let n = dewy_cache::delete_bad_records(self.cache.as_ref())
            .await
            .map_err(Error::Cache)?;
        tracing::info!(cleared = n, "Bad release records cleared");
        Ok(n)
    }
}
