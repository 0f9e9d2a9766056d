//! The app folder: `releases/<timestamp>/`, the `current` symlink, pruning.
//!
//! ```text
//! <root>/
//! ├── current -> <root>/releases/20240115T103045Z   (absolute target)
//! └── releases/
//!     ├── 20240115T103045Z/
//!     └── 20240114T090000Z/
//! ```

use std::path::{Path, PathBuf};

/// One release folder on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseInfo {
    /// Its folder name (`20240115T103045Z`, or with a `-N` suffix when two
    /// deploys fall in the same second).
    pub name: String,
    /// Its absolute path.
    pub path: PathBuf,
    /// Whether `current` points to it.
    pub current: bool,
}

/// The releases and the `current` link of one app folder.
#[derive(Debug, Clone)]
pub struct Releases {
    root: PathBuf,
}

impl Releases {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `<root>/releases`.
    pub fn dir(&self) -> PathBuf {
        self.root.join("releases")
    }

    /// `<root>/current`.
    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    /// Where `current` points, when it points at an existing folder.
    pub fn current_target(&self) -> Option<PathBuf> {
        let target = std::fs::read_link(self.current_link()).ok()?;
        let target = if target.is_absolute() {
            target
        } else {
            self.root.join(target)
        };
        target.is_dir().then_some(target)
    }

    /// A fresh, unused release path for `now`: `releases/<ts>`, or
    /// `releases/<ts>-N` after the highest `N` of that second, so the new
    /// folder always sorts newest, even when older ones of the same second
    /// were pruned (reusing a freed `<ts>` would sort it oldest).
    pub fn new_release_path(&self, now: jiff::Timestamp) -> PathBuf {
        let base = now.strftime("%Y%m%dT%H%M%SZ").to_string();
        let dir = self.dir();
        let taken = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let (b, n) = release_order(&name);
                        (b == base).then_some(n)
                    })
                    .max()
            })
            .unwrap_or(None);
        match taken {
            None => dir.join(&base),
            Some(n) => dir.join(format!("{base}-{}", n + 1)),
        }
    }

    /// Points `current` at `release` atomically: a temporary symlink is
    /// created next to it and renamed over it (never remove-then-create),
    /// then the folder is synced.
    pub fn switch(&self, release: &Path) -> std::io::Result<()> {
        let link = self.current_link();
        let tmp = self.root.join(format!(".current.tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(release, &tmp)?;
        if let Err(e) = std::fs::rename(&tmp, &link) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::File::open(&self.root).and_then(|d| d.sync_all())?;
        Ok(())
    }

    /// Release folders, newest first (names sort by time).
    pub fn list(&self) -> std::io::Result<Vec<ReleaseInfo>> {
        let current = self.current_target();
        let mut out = Vec::new();
        let dir = self.dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.file_type()?.is_dir() {
                continue;
            }
            let path = entry.path();
            out.push(ReleaseInfo {
                current: current.as_deref() == Some(path.as_path()),
                name,
                path,
            });
        }
        out.sort_by_key(|r| std::cmp::Reverse(release_order(&r.name)));
        Ok(out)
    }

    /// Removes old releases that dewy created: of the folders in `recorded`
    /// (folder → version, from the deployment history), keeps the newest
    /// `keep` distinct versions, and never removes the folder `current`
    /// points to nor the newest recorded folder before it (the rollback
    /// target). Folders dewy did not record are left alone. Returns what
    /// was removed.
    pub fn prune(
        &self,
        keep: usize,
        recorded: &std::collections::HashMap<PathBuf, String>,
    ) -> std::io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let mut versions = std::collections::HashSet::new();
        let mut previous_seen = false;
        for r in self.list()? {
            let Some(version) = recorded.get(&r.path) else { continue };
            let new_version = versions.insert(version.clone());
            let protected = if r.current {
                true
            } else if !previous_seen {
                previous_seen = true;
                true
            } else {
                false
            };
            if protected || (new_version && versions.len() <= keep.max(1)) {
                continue;
            }
            std::fs::remove_dir_all(&r.path)?;
            removed.push(r.path);
        }
        Ok(removed)
    }

    /// Removes the `current` link (a first deploy undone: nothing is in
    /// place). A missing link is fine.
    pub fn unlink_current(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.current_link()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => std::fs::File::open(&self.root).and_then(|d| d.sync_all()),
        }
    }

    /// Removes what an interrupted deploy left behind: staging folders in
    /// `releases/` and temporary `current` links.
    pub fn clean_leftovers(&self) {
        if let Ok(entries) = std::fs::read_dir(self.dir()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".dewy-extract-") {
                    tracing::info!(path = %e.path().display(), "Removing leftover of an interrupted deploy");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".current.tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// The version pinned in `<root>/.dewy/pin`, if any.
pub fn pinned(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join(".dewy/pin"))
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Pins `<root>` at `version` (atomically written), or unpins with `None`.
pub fn set_pin(root: &Path, version: Option<&str>) -> std::io::Result<()> {
    let path = root.join(".dewy/pin");
    match version {
        Some(v) => {
            std::fs::create_dir_all(root.join(".dewy"))?;
            let tmp = root.join(".dewy/.pin.tmp");
            std::fs::write(&tmp, format!("{v}\n"))?;
            std::fs::rename(tmp, path)
        }
        None => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// `20240115T103045Z-2` sorts after `20240115T103045Z-1` after `20240115T103045Z`.
fn release_order(name: &str) -> (String, u64) {
    match name.rsplit_once('-') {
        Some((base, n)) if n.chars().all(|c| c.is_ascii_digit()) => (base.to_owned(), n.parse().unwrap_or(0)),
        _ => (name.to_owned(), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_switch_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases::new(dir.path());
        let now: jiff::Timestamp = "2024-01-15T10:30:45Z".parse().unwrap();
        let mut made = Vec::new();
        for _ in 0..3 {
            let p = r.new_release_path(now);
            std::fs::create_dir_all(&p).unwrap();
            made.push(p);
        }
        let names: Vec<_> = made
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["20240115T103045Z", "20240115T103045Z-1", "20240115T103045Z-2"]);
        // A pruned name of the same second is not reused: the next folder
        // must still sort newest.
        std::fs::remove_dir(&made[0]).unwrap();
        let next = r.new_release_path(now);
        assert_eq!(next.file_name().unwrap(), "20240115T103045Z-3");
        std::fs::create_dir_all(&made[0]).unwrap();
        r.switch(&made[0]).unwrap();
        assert_eq!(r.current_target().unwrap(), made[0]);
        r.switch(&made[2]).unwrap();
        assert_eq!(r.current_target().unwrap(), made[2]);
        let list: Vec<_> = r.list().unwrap().into_iter().map(|i| (i.name, i.current)).collect();
        assert_eq!(list[0], ("20240115T103045Z-2".to_owned(), true));
        // Keep 1, but never current nor the newest one before it.
        r.switch(&made[0]).unwrap();
        let recorded: std::collections::HashMap<_, _> = made
            .iter()
            .zip(["v1", "v2", "v3"])
            .map(|(p, v)| (p.clone(), v.to_owned()))
            .collect();
        let removed = r.prune(1, &recorded).unwrap();
        assert_eq!(removed, vec![made[1].clone()]);
        assert!(made[0].exists() && made[2].exists());
        // A folder dewy did not record is never removed.
        let foreign = r.dir().join("20200101T000000Z");
        std::fs::create_dir_all(&foreign).unwrap();
        assert!(r.prune(1, &recorded).unwrap().is_empty());
        assert!(foreign.exists());
        // Two folders of one version count once: the older copy goes.
        let copy = r.new_release_path("2024-01-15T10:30:50Z".parse().unwrap());
        std::fs::create_dir_all(&copy).unwrap();
        let mut recorded = recorded;
        recorded.insert(copy.clone(), "v1".into());
        recorded.remove(&made[1]);
        let old = r.dir().join("20230101T000000Z");
        std::fs::create_dir_all(&old).unwrap();
        recorded.insert(old.clone(), "v1".into());
        r.switch(&copy).unwrap();
        let removed = r.prune(7, &recorded).unwrap();
        assert_eq!(
            removed,
            vec![made[0].clone(), old],
            "older copies of v1 go; v1 (current) and v3 (previous) stay"
        );
    }
}
