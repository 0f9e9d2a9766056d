//! The embedding example deploys from its own registry without the CLI.

use std::io::Write;
use std::time::{Duration, Instant};

#[test]
fn embedded_loop_deploys_from_a_custom_registry() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "VERSION", &b"v1.2.3"[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    let artifact = dir.path().join("site-v1.2.3.tar.gz");
    std::fs::write(&artifact, gz.finish().unwrap()).unwrap();
    let doc = dir.path().join("release.json");
    std::fs::write(
        &doc,
        format!(r#"{{"tag": "v1.2.3", "url": "file://{}"}}"#, artifact.display()),
    )
    .unwrap();
    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_embed-example"))
        .arg(&doc)
        .arg(&app)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(app.join("current/VERSION")).ok().as_deref() != Some("v1.2.3") {
        assert!(Instant::now() < deadline, "not deployed");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::process::Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}
