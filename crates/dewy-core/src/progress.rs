//! Progress of long work: downloads and extractions.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dewy_registry::DownloadProgress;

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
pub(crate) struct ForRelease {
    pub(crate) tag: String,
    pub(crate) progress: Arc<dyn DeployProgress>,
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
