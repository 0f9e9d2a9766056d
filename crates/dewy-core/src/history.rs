//! The deployment history: one JSON line per deploy attempt in
//! `<root>/.dewy/history.jsonl`, rotated to `history.jsonl.1` past 1 MiB.

use std::io::Write;
use std::path::{Path, PathBuf};

/// One deploy attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// When it ended.
    pub time: jiff::Timestamp,
    /// The release's tag.
    pub version: String,
    /// `extracted` (the folder is complete; written before `current` may
    /// point at it), `deployed` or `failed`; `hook-failed` (a deploy hook
    /// that failed without failing the deploy); an operator's
    /// `rolled-back` (to `release_dir`, pinned) or `restarted`.
    pub outcome: String,
    /// How long it took.
    pub duration_ms: u64,
    /// The release folder, when deployed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub release_dir: Option<String>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

impl Entry {
    /// Whether this entry says which version a release folder holds: the
    /// folder was extracted (complete, possibly not deployed: dewy may have
    /// been killed before the switch or the start) or deployed.
    fn placed_a_folder(&self) -> bool {
        self.outcome == "deployed" || self.outcome == "extracted"
    }
}

const ROTATE_AT: u64 = 1 << 20;

fn path(root: &Path) -> PathBuf {
    root.join(".dewy/history.jsonl")
}

/// Appends `entry`, rotating the file when it grew past 1 MiB.
pub(crate) fn append(root: &Path, entry: &Entry) -> std::io::Result<()> {
    let file = path(root);
    std::fs::create_dir_all(file.parent().expect("has parent"))?;
    if std::fs::metadata(&file).is_ok_and(|m| m.len() > ROTATE_AT) {
        std::fs::rename(&file, file.with_extension("jsonl.1"))?;
    }
    let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
    line.push(b'\n');
    // One write of a whole line in append mode: concurrent readers never see
    // half a record.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)?
        .write_all(&line)
}

/// Every recorded attempt, oldest first (the rotated file included).
pub fn read(root: &Path) -> Vec<Entry> {
    let file = path(root);
    [file.with_extension("jsonl.1"), file]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<Entry>(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every release folder dewy deployed into, with the version it holds
/// (the last one deployed there).
pub(crate) fn recorded_folders(root: &Path) -> std::collections::HashMap<PathBuf, String> {
    read(root)
        .into_iter()
        .filter(Entry::placed_a_folder)
        .filter_map(|e| Some((PathBuf::from(e.release_dir?), e.version)))
        .collect()
}

/// The newest folder on disk that holds `version`, if dewy deployed it
/// there and it still exists.
pub(crate) fn folder_of(root: &Path, version: &str) -> Option<PathBuf> {
    let folders = recorded_folders(root);
    let mut dirs: Vec<PathBuf> = folders
        .into_iter()
        .filter(|(dir, v)| v == version && dir.is_dir())
        .map(|(dir, _)| dir)
        .collect();
    dirs.sort();
    dirs.pop()
}

/// The version last deployed into `release_dir`, if the history knows it.
pub(crate) fn version_of(root: &Path, release_dir: &Path) -> Option<String> {
    let dir = release_dir.display().to_string();
    read(root)
        .into_iter()
        .rev()
        .find(|e| e.placed_a_folder() && e.release_dir.as_deref() == Some(dir.as_str()))
        .map(|e| e.version)
}
