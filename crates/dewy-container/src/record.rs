//! dewy's small state files in `<workdir>/.dewy/`, written atomically
//! (a temporary file renamed over the old one): `replicas.json`, the
//! replicas in rotation, which the next dewy adopts; `images.json`, the
//! images dewy pulled ([`crate::images`]).

use std::path::{Path, PathBuf};

/// Reads a JSON record; `None` when it is absent or unreadable (logged).
pub(crate) fn load(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "Unreadable record; ignored");
            None
        }
    }
}

/// Replaces a JSON record atomically.
pub(crate) fn save(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value).unwrap_or_default())?;
    std::fs::rename(&tmp, path)
}

/// The replicas in rotation (each passed its health check), by container
/// id: what the next dewy adopts.
#[derive(Debug, Clone)]
pub(crate) struct Admitted {
    path: PathBuf,
}

impl Admitted {
    /// The record in `workdir`.
    pub(crate) fn new(workdir: &Path) -> Self {
        Self {
            path: workdir.join(".dewy/replicas.json"),
        }
    }

    /// The recorded ids; empty when there is no readable record.
    pub(crate) fn load(&self) -> Vec<String> {
        load(&self.path)
            .and_then(|v| {
                v.as_array().map(|items| {
                    items
                        .iter()
                        .filter_map(|i| i["id"].as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Records `ids` as the replicas in rotation.
    pub(crate) fn save(&self, ids: &[String]) {
        let list: Vec<serde_json::Value> = ids.iter().map(|id| serde_json::json!({ "id": id })).collect();
        if let Err(e) = save(&self.path, &serde_json::Value::Array(list)) {
            tracing::warn!(path = %self.path.display(), error = %e, "Could not record the replicas in rotation");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admitted_replicas_round_trip_and_an_unreadable_record_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let admitted = Admitted::new(dir.path());
        assert!(admitted.load().is_empty());
        admitted.save(&["a1".into(), "b2".into()]);
        assert_eq!(admitted.load(), ["a1", "b2"]);
        admitted.save(&[]);
        assert!(admitted.load().is_empty());
        std::fs::write(dir.path().join(".dewy/replicas.json"), "{not json").unwrap();
        assert!(admitted.load().is_empty());
    }
}
