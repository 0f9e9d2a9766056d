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

/// The default [`DeployProgress`]: while a download or an extraction runs,
/// a progress line every three seconds (none for work that ends sooner; the
/// start and the end have their own lines).
#[derive(Debug, Default)]
pub struct LogProgress {
    /// The work being reported (`download`/`extract` and the tag) and when
    /// its last line (or its start) was.
    last: std::sync::Mutex<Option<(&'static str, String, std::time::Instant)>>,
}

impl LogProgress {
    fn due(&self, kind: &'static str, tag: &str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        match last.as_mut() {
            Some((k, t, at)) if *k == kind && t == tag => {
                let due = at.elapsed() >= Duration::from_secs(3);
                if due {
                    *at = now;
                }
                due
            }
            _ => {
                *last = Some((kind, tag.to_owned(), now));
                false
            }
        }
    }
}

impl DeployProgress for LogProgress {
    fn downloading(&self, tag: &str, done: u64, total: Option<u64>) {
        if self.due("download", tag) {
            tracing::info!(tag, bytes = done, total = total.unwrap_or(0), "Download progress");
        }
    }
    fn extracting(&self, tag: &str, unpacked: u64) {
        if self.due("extract", tag) {
            tracing::info!(tag, bytes = unpacked, "Extract progress");
        }
    }
    fn finished(&self, _tag: &str) {
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
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

#[cfg(test)]
mod tests {
    use super::LogProgress;

    #[test]
    fn no_progress_line_at_the_start_of_a_download_or_an_extraction() {
        let p = LogProgress::default();
        assert!(!p.due("download", "v1"), "the start has its own line");
        assert!(!p.due("download", "v1"), "not before three seconds");
        assert!(!p.due("extract", "v1"), "a new step starts its own clock");
        *p.last.lock().unwrap() = Some((
            "extract",
            "v1".into(),
            std::time::Instant::now() - std::time::Duration::from_secs(4),
        ));
        assert!(p.due("extract", "v1"));
        assert!(!p.due("extract", "v1"));
    }
}
