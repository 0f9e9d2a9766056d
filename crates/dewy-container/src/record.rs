//! dewy's small state files in `<workdir>/.dewy/`, written atomically
//! (a temporary file renamed over the old one): `replicas.json`, the
//! replicas in rotation, which the next dewy adopts; `images.json`, the
//! images dewy pulled ([`crate::images`]).

use std::path::{Path, PathBuf};

/// Reads a record that is a JSON list of `{"<field>": "…"}`: the values,
/// in order. Absent or unreadable (logged): empty.
pub(crate) fn load_list(path: &Path, field: &str) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.get(field)?.as_str().map(str::to_owned))
            .collect(),
        _ => {
            tracing::warn!(path = %path.display(), "Unreadable record; ignored");
            Vec::new()
        }
    }
}

/// Replaces such a record atomically (a temporary file renamed over it).
pub(crate) fn save_list(path: &Path, field: &str, values: &[String]) -> std::io::Result<()> {
    let list: Vec<serde_json::Value> = values.iter().map(|v| serde_json::json!({ field: v })).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&list).unwrap_or_default())?;
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
        load_list(&self.path, "id")
    }

    /// Records `ids` as the replicas in rotation.
    pub(crate) fn save(&self, ids: &[String]) {
        if let Err(e) = save_list(&self.path, "id", ids) {
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
