//! The file registry end to end, and downloads against a local HTTP server
//! that misbehaves on purpose.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dewy_registry::{Checksum, DownloadPolicy, Downloader, Error, NoProgress, OpenOptions, Platform, Release, open};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn linux() -> OpenOptions {
    OpenOptions {
        platform: Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            libc: Some("gnu".into()),
        },
        ..OpenOptions::default()
    }
}

fn publish(root: &Path, tag: &str, files: &[(&str, &[u8])]) {
    let dir = root.join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in files {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

#[tokio::test]
async fn file_registry_chooses_the_newest_release_and_its_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    publish(
        root,
        "v1.0.0",
        &[("app_linux_amd64.tar.gz", b"v1"), ("app_darwin_arm64.tar.gz", b"m")],
    );
    publish(root, "v1.10.0", &[("app_linux_amd64.tar.gz", b"v10")]);
    publish(root, "v1.9.0", &[("app_linux_amd64.tar.gz", b"v9")]);
    publish(root, "v2.0.0-rc.1", &[("app_linux_amd64.tar.gz", b"rc")]);
    publish(root, "latest", &[("app_linux_amd64.tar.gz", b"x")]);
    let url = format!("file://{}", root.display());
    let r = open(&url, &linux()).unwrap();
    let rel = r.latest().await.unwrap();
    assert_eq!(rel.tag, "v1.10.0");
    assert_eq!(rel.artifact_name, "app_linux_amd64.tar.gz");
    assert!(
        rel.artifact_url.ends_with("/v1.10.0/app_linux_amd64.tar.gz"),
        "{}",
        rel.artifact_url
    );
    assert!(rel.published_at.is_some());
    assert!(rel.checksum.is_none());

    let pre = open(&format!("{url}?pre-release=true"), &linux()).unwrap();
    assert_eq!(pre.latest().await.unwrap().tag, "v2.0.0-rc.1");

    // A release without an artifact for this host: a distinct error with the
    // publish time, for the grace period.
    publish(root, "v3.0.0", &[("app_darwin_arm64.tar.gz", b"m")]);
    match r.latest().await {
        Err(Error::ArtifactNotFound {
            tag,
            published_at,
            wanted: None,
        }) => {
            assert_eq!(tag, "v3.0.0");
            assert!(published_at.is_some());
        }
        other => panic!("{other:?}"),
    }
    // For a host with nothing deployed: the newest older complete release,
    // skipping an incomplete one and pre-releases.
    publish(root, "v2.5.0", &[("SHA256SUMS", b"")]);
    let fallback = r
        .latest_complete_before("v3.0.0")
        .await
        .unwrap()
        .expect("an older complete release");
    assert_eq!(fallback.tag, "v1.10.0");
    assert!(fallback.artifact_url.ends_with("/v1.10.0/app_linux_amd64.tar.gz"));
    assert!(r.latest_complete_before("v1.0.0").await.unwrap().is_none());
    let named = open(&format!("{url}?artifact=app_darwin_arm64.tar.gz"), &linux()).unwrap();
    assert_eq!(named.latest().await.unwrap().artifact_name, "app_darwin_arm64.tar.gz");

    publish(
        root,
        "v3.0.0",
        &[("app_linux_amd64.tar.gz", b"a"), ("app_linux_x86_64.zip", b"b")],
    );
    assert!(matches!(r.latest().await, Err(Error::AmbiguousArtifact { .. })));
}

#[tokio::test]
async fn file_registry_slots_calver_and_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    publish(root, "v1.0.0+blue", &[("app_linux_amd64.tar.gz", b"blue1")]);
    publish(root, "v1.1.0+green", &[("app_linux_amd64.tar.gz", b"green")]);
    let url = format!("file://{}", root.display());
    let blue = open(
        &url,
        &OpenOptions {
            slot: Some("blue".into()),
            ..linux()
        },
    )
    .unwrap();
    let rel = blue.latest().await.unwrap();
    assert_eq!(rel.tag, "v1.0.0+blue");
    assert_eq!(rel.slot.as_deref(), Some("blue"));

    let cal = tempfile::tempdir().unwrap();
    publish(cal.path(), "2024.01.15.2", &[("app_linux_amd64.tar.gz", b"a")]);
    publish(cal.path(), "2024.01.15.10", &[("app_linux_amd64.tar.gz", b"b")]);
    let r = open(
        &format!("file://{}", cal.path().display()),
        &OpenOptions {
            calver: Some("YYYY.0M.0D.MICRO".into()),
            ..linux()
        },
    )
    .unwrap();
    assert_eq!(r.latest().await.unwrap().tag, "2024.01.15.10");

    let sums = format!("{}  app_linux_amd64.tar.gz\n", "ab".repeat(32));
    publish(
        root,
        "v2.0.0",
        &[("app_linux_amd64.tar.gz", b"x"), ("SHA256SUMS", sums.as_bytes())],
    );
    let plain = open(&url, &linux()).unwrap();
    let rel = plain.latest().await.unwrap();
    assert_eq!(
        rel.checksum,
        Some(Checksum {
            sha256: "ab".repeat(32),
            source: "SHA256SUMS".into()
        })
    );
}

#[tokio::test]
async fn file_download_is_verified_and_leaves_nothing_on_mismatch() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let staging = tempfile::tempdir().unwrap();
    let data = b"artifact bytes";
    let sum = sha256_hex(data);
    publish(
        dir.path(),
        "v1.0.0",
        &[
            ("app_linux_amd64.tar.gz", data),
            ("app_linux_amd64.tar.gz.sha256", sum.as_bytes()),
        ],
    );
    let r = open(&format!("file://{}", dir.path().display()), &linux()).unwrap();
    let rel = r.latest().await.unwrap();
    assert_eq!(rel.checksum.as_ref().unwrap().sha256, sum);
    let d = Downloader::new(DownloadPolicy::default()).unwrap();
    let got = d.fetch(&rel, staging.path(), &NoProgress).await.unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(got.sha256, sum);
    drop(got);

    let mut bad = rel.clone();
    bad.checksum = Some(Checksum {
        sha256: "0".repeat(64),
        source: "test".into(),
    });
    let err = d.fetch(&bad, staging.path(), &NoProgress).await.unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert_eq!(
        std::fs::read_dir(staging.path()).unwrap().count(),
        0,
        "nothing left in staging"
    );
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// What the test server does for one path.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Ok,
    /// Cuts the body in half on the first request only.
    CutOnce,
    /// Cuts the body in half on the first request, then ignores `Range`.
    CutOnceNoRanges,
    /// 503 twice, then OK.
    FlakyTwice,
    /// Sends headers and a little of the body, then stalls.
    Stall,
    /// Always 404.
    Missing,
}

struct Server {
    addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

/// A small HTTP/1.1 server with Range support and scripted faults.
async fn serve(body: Vec<u8>, behaviour: Behaviour) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    let body = Arc::new(body);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (log, body) = (log.clone(), body.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = String::new();
                while !head.contains("\r\n\r\n") {
                    let Ok(n) = sock.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    head.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                let n = {
                    let mut l = log.lock().unwrap();
                    l.push(head.clone());
                    l.len()
                };
                let range = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_owned))
                    .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
                let reply = |status: &str, extra: String, bytes: &[u8]| {
                    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nETag: \"v1\"\r\nConnection: close\r\n{extra}\r\n", bytes.len()).into_bytes();
                    out.extend_from_slice(bytes);
                    out
                };
                let out = match (behaviour, range) {
                    (Behaviour::Missing, _) => reply("404 Not Found", String::new(), b""),
                    (Behaviour::FlakyTwice, _) if n <= 2 => reply("503 Service Unavailable", String::new(), b""),
                    (Behaviour::CutOnce | Behaviour::CutOnceNoRanges, _) if n == 1 => {
                        let full = reply("200 OK", String::new(), &body);
                        let head_len = full.len() - body.len();
                        full[..head_len + body.len() / 2].to_vec()
                    }
                    (Behaviour::Stall, _) => {
                        let full = reply("200 OK", String::new(), &body);
                        let head_len = full.len() - body.len();
                        let _ = sock.write_all(&full[..head_len + 10]).await;
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    (Behaviour::CutOnceNoRanges, _) => reply("200 OK", String::new(), &body),
                    (_, Some(start)) => reply(
                        "206 Partial Content",
                        format!("Content-Range: bytes {start}-{}/{}\r\n", body.len() - 1, body.len()),
                        &body[start..],
                    ),
                    _ => reply("200 OK", String::new(), &body),
                };
                let _ = sock.write_all(&out).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Server { addr, requests }
}

fn http_release(server: &Server, checksum: Option<&str>) -> Release {
    Release {
        id: "x".into(),
        tag: "v1.0.0".into(),
        version: dewy_registry::parse_semver("v1.0.0").unwrap(),
        artifact_name: "app.tar.gz".into(),
        artifact_url: format!("http://{}/app.tar.gz", server.addr),
        published_at: None,
        slot: None,
        checksum: checksum.map(|s| Checksum {
            sha256: s.into(),
            source: "test".into(),
        }),
        signature_url: None,
    }
}

fn fast_policy() -> DownloadPolicy {
    DownloadPolicy {
        backoff: Duration::from_millis(10),
        idle_timeout: Duration::from_millis(500),
        ..DownloadPolicy::default()
    }
}

fn body() -> Vec<u8> {
    (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect()
}

/// Downloads `data`, verified against its checksum, from a server that
/// behaves as `behaviour`: the file's bytes and the requests the server saw.
async fn fetch_verified(data: &[u8], behaviour: Behaviour) -> (Vec<u8>, Vec<String>) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = serve(data.to_vec(), behaviour).await;
    let staging = tempfile::tempdir().unwrap();
    let d = Downloader::new(fast_policy()).unwrap();
    let got = d
        .fetch(
            &http_release(&server, Some(&sha256_hex(data))),
            staging.path(),
            &NoProgress,
        )
        .await
        .unwrap();
    assert_eq!(got.size, data.len() as u64);
    let bytes = std::fs::read(&got.path).unwrap();
    let requests = server.requests.lock().unwrap().clone();
    (bytes, requests)
}

#[tokio::test]
async fn interrupted_download_resumes_with_range() {
    let data = body();
    let (got, reqs) = fetch_verified(&data, Behaviour::CutOnce).await;
    assert_eq!(got, data);
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let second = reqs[1].to_ascii_lowercase();
    assert!(
        second.contains(&format!("range: bytes={}-", data.len() / 2)),
        "{second}"
    );
    assert!(second.contains("if-range: \"v1\""), "{second}");
}

#[tokio::test]
async fn server_errors_are_retried() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let data = body();
    let server = serve(data.clone(), Behaviour::FlakyTwice).await;
    let staging = tempfile::tempdir().unwrap();
    let d = Downloader::new(fast_policy()).unwrap();
    let got = d
        .fetch(&http_release(&server, None), staging.path(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(server.requests.lock().unwrap().len(), 3);

    let missing = serve(data.clone(), Behaviour::Missing).await;
    let err = d
        .fetch(&http_release(&missing, None), staging.path(), &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::HttpStatus { status: 404, .. }), "{err}");
    assert_eq!(missing.requests.lock().unwrap().len(), 1, "a 404 is not retried");
}

#[tokio::test]
async fn wrong_checksum_is_refused_and_staging_stays_clean() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = serve(body(), Behaviour::Ok).await;
    let staging = tempfile::tempdir().unwrap();
    let d = Downloader::new(fast_policy()).unwrap();
    let err = d
        .fetch(
            &http_release(&server, Some(&"1".repeat(64))),
            staging.path(),
            &NoProgress,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }));
    assert!(err.to_string().contains(&"1".repeat(64)));
    assert_eq!(std::fs::read_dir(staging.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn stalled_download_times_out() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = serve(body(), Behaviour::Stall).await;
    let staging = tempfile::tempdir().unwrap();
    let policy = DownloadPolicy {
        retries: 1,
        ..fast_policy()
    };
    let d = Downloader::new(policy).unwrap();
    let started = std::time::Instant::now();
    let err = d
        .fetch(&http_release(&server, None), staging.path(), &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(server.requests.lock().unwrap().len(), 2, "one retry");
    assert_eq!(std::fs::read_dir(staging.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn too_large_artifacts_are_refused() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = serve(body(), Behaviour::Ok).await;
    let staging = tempfile::tempdir().unwrap();
    let d = Downloader::new(DownloadPolicy {
        max_bytes: 1000,
        ..fast_policy()
    })
    .unwrap();
    let err = d
        .fetch(&http_release(&server, None), staging.path(), &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { limit: 1000, .. }));
}

/// Patterned bytes that differ at every offset, large enough to cross many
/// of the downloader's blocks and writeback ranges.
fn large_body() -> Vec<u8> {
    (0..5_000_000u32)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect()
}

#[tokio::test]
async fn large_downloads_arrive_intact_from_files_and_http() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let data = large_body();
    let sum = sha256_hex(&data);
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), "v1.0.0", &[("app_linux_amd64.tar.gz", &data)]);
    let staging = tempfile::tempdir().unwrap();
    let d = Downloader::new(fast_policy()).unwrap();
    let r = open(&format!("file://{}", dir.path().display()), &linux()).unwrap();
    let got = d
        .fetch(&r.latest().await.unwrap(), staging.path(), &NoProgress)
        .await
        .unwrap();
    assert_eq!((got.size, got.sha256.as_str()), (data.len() as u64, sum.as_str()));
    assert!(std::fs::read(&got.path).unwrap() == data, "file:// copy differs");

    let server = serve(data.clone(), Behaviour::Ok).await;
    let got = d
        .fetch(&http_release(&server, Some(&sum)), staging.path(), &NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(&got.path).unwrap() == data, "HTTP copy differs");
}

#[tokio::test]
async fn a_server_that_ignores_range_gets_a_fresh_start() {
    let data = large_body();
    let (got, reqs) = fetch_verified(&data, Behaviour::CutOnceNoRanges).await;
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert!(reqs[1].to_ascii_lowercase().contains("range: bytes="), "{}", reqs[1]);
    assert!(got == data, "the first half was written twice");
}

#[tokio::test]
async fn a_full_disk_is_an_error_that_says_so_and_leaves_nothing() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let staging = tempfile::tempdir().unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "dewy-download-test"])
        .arg(staging.path())
        .output()
        .unwrap();
    assert!(
        mount.status.success(),
        "cannot mount a 2 MiB tmpfs for the disk-full download (needs root): {}",
        String::from_utf8_lossy(&mount.stderr)
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(staging.path());
    let server = serve(large_body(), Behaviour::Ok).await;
    let d = Downloader::new(fast_policy()).unwrap();
    let err = d
        .fetch(&http_release(&server, None), staging.path(), &NoProgress)
        .await
        .unwrap_err();
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(chain.contains("No space left on device"), "{chain}");
    assert_eq!(server.requests.lock().unwrap().len(), 1, "a full disk is not retried");
    assert_eq!(std::fs::read_dir(staging.path()).unwrap().count(), 0);
}
