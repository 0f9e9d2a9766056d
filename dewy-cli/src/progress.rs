//! A progress bar on a terminal for downloads and extractions.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Draws one bar at a time on stderr.
#[derive(Debug, Default)]
pub(crate) struct BarProgress {
    bar: Mutex<Option<(String, ProgressBar)>>,
}

impl BarProgress {
    fn update(&self, label: String, total: Option<u64>, position: u64) {
        let mut slot = self.bar.lock().expect("progress bar");
        if slot.as_ref().is_none_or(|(l, _)| *l != label) {
            if let Some((_, old)) = slot.take() {
                old.finish_and_clear();
            }
            let bar = match total {
                Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()).with_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                ),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                    ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            };
            bar.set_message(label.clone());
            *slot = Some((label, bar));
        }
        if let Some((_, bar)) = slot.as_ref() {
            bar.set_position(position);
        }
    }
}

impl dewy_core::DeployProgress for BarProgress {
    fn downloading(&self, tag: &str, done: u64, total: Option<u64>) {
        self.update(format!("downloading {tag}"), total, done);
    }
    fn extracting(&self, tag: &str, unpacked: u64) {
        self.update(format!("extracting {tag}"), None, unpacked);
    }
    fn finished(&self, _tag: &str) {
        if let Some((_, bar)) = self.bar.lock().expect("progress bar").take() {
            bar.finish_and_clear();
        }
    }
}
