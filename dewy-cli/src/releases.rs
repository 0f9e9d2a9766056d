//! The releases on disk and which one a rollback goes back to: shared by
//! the admin API and the one-shot commands.

/// The releases on disk, newest first, with what the history says of them.
pub(crate) fn release_rows(root: &std::path::Path) -> Vec<serde_json::Value> {
    let layout = dewy_core::Releases::new(root);
    let history = dewy_core::read_history(root);
    layout
        .list()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let dir = r.path.display().to_string();
            let entry = history.iter().rev().find(|e| {
                matches!(e.outcome.as_str(), "deployed" | "extracted") && e.release_dir.as_deref() == Some(dir.as_str())
            });
            serde_json::json!({
                "release": r.name,
                "current": r.current,
                "version": entry.map(|e| e.version.clone()),
                "deployed_at": entry.map(|e| e.time.to_string()),
                "path": dir,
            })
        })
        .collect()
}

/// The release to roll back to: `to` (a version or a release folder name),
/// else the one before the current one. `Err` says what is on disk.
pub(crate) fn rollback_target(
    root: &std::path::Path,
    to: Option<&str>,
) -> Result<(std::path::PathBuf, String), String> {
    let rows = release_rows(root);
    let version_of = |r: &serde_json::Value| r["version"].as_str().map(str::to_owned);
    let current = rows.iter().position(|r| r["current"] == true);
    let target = match to {
        Some(v) => rows
            .iter()
            .find(|r| version_of(r).as_deref() == Some(v) || r["release"] == v),
        None => current.and_then(|i| rows.get(i + 1)),
    };
    let Some(target) = target else {
        let on_disk: Vec<String> = rows
            .iter()
            .map(|r| version_of(r).unwrap_or_else(|| r["release"].as_str().unwrap_or("?").to_owned()))
            .collect();
        return Err(match to {
            Some(v) => format!(
                "version `{v}` is not on disk in {}; releases: {}",
                root.display(),
                on_disk.join(", ")
            ),
            None => format!(
                "no release before the current one in {}; releases: {}",
                root.display(),
                on_disk.join(", ")
            ),
        });
    };
    let path = std::path::PathBuf::from(target["path"].as_str().unwrap_or_default());
    let version = version_of(target).unwrap_or_else(|| target["release"].as_str().unwrap_or_default().to_owned());
    Ok((path, version))
}
