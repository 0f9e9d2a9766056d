//! The images dewy pulled (`<workdir>/.dewy/images.json`), and the removal
//! of old ones after a rollout.
//!
//! Only references dewy pulled itself are ever removed, with the runtime's
//! plain `rmi REF` (never `--force`): an image a container still uses
//! (running or stopped, dewy's or not) stays, and an image that also
//! carries other names (a tag someone pulled or built) only loses dewy's
//! reference.

use std::path::{Path, PathBuf};

use crate::runtime::Runtime;

/// The record of pulled images, newest last.
#[derive(Debug, Clone)]
pub(crate) struct Pulled {
    path: PathBuf,
}

impl Pulled {
    /// The record in `workdir`.
    pub(crate) fn new(workdir: &Path) -> Self {
        Self {
            path: workdir.join(".dewy/images.json"),
        }
    }

    /// The recorded references, oldest first. An unreadable record is
    /// empty (nothing is removed on its account).
    fn load(&self) -> Vec<String> {
        crate::record::load_list(&self.path, "image")
    }

    fn save(&self, images: &[String]) -> std::io::Result<()> {
        crate::record::save_list(&self.path, "image", images)
    }

    /// Notes that `image` (`HOST/REPO@sha256:…`) was pulled now.
    pub(crate) fn record(&self, image: &str) {
        let mut images = self.load();
        images.retain(|i| i != image);
        images.push(image.to_owned());
        if let Err(e) = self.save(&images) {
            tracing::warn!(path = %self.path.display(), error = %e, "Could not record the pulled image");
        }
    }

    /// Removes the pulled images beyond the `keep` most recently pulled,
    /// except those in `in_use`; returns how many went. `keep` 0 keeps all.
    pub(crate) async fn keep(&self, runtime: &Runtime, keep: usize, in_use: &[&str]) -> usize {
        if keep == 0 {
            return 0;
        }
        let images = self.load();
        let old = images.len().saturating_sub(keep);
        let mut kept: Vec<String> = Vec::new();
        let mut removed = 0;
        for (i, image) in images.iter().enumerate() {
            if i >= old || in_use.contains(&image.as_str()) {
                kept.push(image.clone());
                continue;
            }
            match runtime.remove_image(image).await {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(image = %image, "Removed an old image");
                }
                Err(e) if is_missing(&e.to_string()) => {} // removed by someone else
                Err(e) => {
                    // In use by a container, or the runtime failed: tried
                    // again after the next rollout.
                    tracing::warn!(image = %image, error = %e, "Could not remove an old image");
                    kept.push(image.clone());
                }
            }
        }
        if let Err(e) = self.save(&kept) {
            tracing::warn!(path = %self.path.display(), error = %e, "Could not update the record of pulled images");
        }
        tracing::info!(count = keep, removed, "Keep images");
        removed
    }
}

/// Whether a runtime's `rmi` error says the image is not there.
fn is_missing(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("image not known") || m.contains("no such image")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_order_and_moves_a_repull_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let pulled = Pulled::new(dir.path());
        assert!(pulled.load().is_empty());
        for i in ["r@sha256:1", "r@sha256:2", "r@sha256:1", "r@sha256:3"] {
            pulled.record(i);
        }
        assert_eq!(pulled.load(), ["r@sha256:2", "r@sha256:1", "r@sha256:3"]);
        std::fs::write(dir.path().join(".dewy/images.json"), "{not json").unwrap();
        assert!(pulled.load().is_empty(), "an unreadable record removes nothing");
        assert!(is_missing("Error: r@sha256:1: image not known"));
        assert!(is_missing("Error response from daemon: No such image: r@sha256:1"));
        assert!(!is_missing("image is in use by a container"));
    }
}
