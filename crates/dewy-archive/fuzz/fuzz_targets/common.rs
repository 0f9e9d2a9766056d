//! The body of every fuzz target: extract `prefix + data`; it must be
//! extracted or refused without a panic, and nothing may appear outside the
//! destination's parent folder.

pub fn extract(prefix: &[u8], data: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("input");
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(data);
    std::fs::write(&archive, &bytes).expect("write input");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("out");
    let _ = dewy_archive::Extractor::default().extract(&archive, &out.join("release"));
    assert!(!dir.path().join("evil").exists());
    assert!(!std::path::Path::new("/tmp/evil").exists());
}
