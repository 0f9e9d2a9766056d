//! dewy's `grpc://` client against this example server: the contract both
//! sides compile from the same .proto.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use dewy_registry::{Downloader, Error, NoProgress, OpenOptions, Platform, Report};

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn dewy_deploys_from_the_example_service() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let root = tempfile::tempdir().unwrap();
    let publish = |tag: &str, name: &str, data: &[u8]| {
        std::fs::create_dir_all(root.path().join(tag)).unwrap();
        std::fs::write(root.path().join(tag).join(name), data).unwrap();
    };
    publish("v1.0.0", "app_linux_amd64.tar.gz", b"linux build");
    publish("v1.0.0", "app_darwin_arm64.tar.gz", b"mac build");
    let port = dewy_testkit::free_port();
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_grpc-registry"))
            .args(["--root", &root.path().display().to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    BufReader::new(server.0.stderr.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("serving"), "{ready}");

    let options = OpenOptions {
        platform: Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            libc: None,
        },
        ..OpenOptions::default()
    };
    let reg = dewy_registry::open(&format!("grpc://127.0.0.1:{port}?no-tls=true"), &options).unwrap();
    let release = reg.latest().await.unwrap();
    assert_eq!(
        (release.tag.as_str(), release.artifact_name.as_str()),
        ("v1.0.0", "app_linux_amd64.tar.gz")
    );
    assert!(release.published_at.is_some());
    let request = reg.artifact_request(&release).await.unwrap();
    let staging = tempfile::tempdir().unwrap();
    let got = Downloader::new(Default::default())
        .unwrap()
        .fetch_request(&request, None, staging.path(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), b"linux build");
    reg.report(&Report {
        release_id: release.id.clone(),
        tag: release.tag.clone(),
        command: "server".into(),
        hostname: "web-1".into(),
        at: jiff::Timestamp::now(),
        error: Some("it broke".into()),
    })
    .await
    .unwrap();
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("\"tag\":\"v1.0.0\"") && line.contains("\"command\":\"server\"") && line.contains("it broke"),
        "{line}"
    );

    // A newer release without a Linux build yet: NOT_FOUND with its time.
    publish("v1.1.0", "app_darwin_arm64.tar.gz", b"mac only");
    match reg.latest().await {
        Err(Error::ArtifactNotFound { tag, published_at, .. }) => {
            assert_eq!(tag, "v1.1.0");
            assert!(published_at.is_some());
        }
        other => panic!("{other:?}"),
    }
}
