//! S3 (moto) and GCS (fake-gcs-server) as registries and the fleet's
//! shared registry answer, against the real servers dewy-testkit starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dewy_registry::{
    CloudOptions, Downloader, Error, NoProgress, OpenOptions, Platform, Registry, Release, Report, Scheme,
    SharedRegistry, SharedScope,
};
use dewy_store::{ObjectStore, Precondition, open_store};
use dewy_testkit::{GcsServer, S3Server};

const ART: &str = "app_linux_amd64.tar.gz";

fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A server with an empty bucket `b`, and the URL prefix of that bucket.
enum Server {
    S3(S3Server),
    Gcs(GcsServer),
}

impl Server {
    async fn start(kind: &str) -> Self {
        init();
        match kind {
            "s3" => {
                let s = S3Server::start();
                s.create_bucket("dewy-bucket");
                Self::S3(s)
            }
            _ => {
                let g = GcsServer::start();
                g.create_bucket("dewy-bucket");
                Self::Gcs(g)
            }
        }
    }

    fn url(&self, prefix: &str, query: &str) -> String {
        match self {
            Self::S3(s) => format!("s3://us-east-1/dewy-bucket/{prefix}?endpoint={}{query}", s.endpoint),
            Self::Gcs(_) => format!("gs://dewy-bucket/{prefix}?{}", query.trim_start_matches('&')),
        }
    }

    fn cloud(&self) -> CloudOptions {
        match self {
            Self::S3(_) => CloudOptions {
                aws_credentials: Some(("test".into(), "test".into(), None)),
                ..Default::default()
            },
            Self::Gcs(g) => CloudOptions {
                gcs_emulator: Some(g.endpoint.clone()),
                ..Default::default()
            },
        }
    }

    fn store(&self, prefix: &str) -> (Arc<dyn ObjectStore>, String) {
        let url = url::Url::parse(&self.url(prefix, "")).unwrap();
        let opened = open_store(&url, &self.cloud()).unwrap();
        (opened.store, opened.prefix)
    }

    fn options(&self) -> OpenOptions {
        OpenOptions {
            platform: Platform {
                os: "linux".into(),
                arch: "x86_64".into(),
                libc: Some("gnu".into()),
            },
            cloud: self.cloud(),
            ..OpenOptions::default()
        }
    }
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

async fn registry_end_to_end(kind: &str, versions: usize) {
    let server = Server::start(kind).await;
    let (store, _) = server.store("apps/web/");
    for i in 0..versions {
        store
            .put(&format!("apps/web/v1.0.{i}/{ART}"), b"old".to_vec(), Precondition::Any)
            .await
            .unwrap();
    }
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    // Listed after every v1.* prefix: beyond the first page of 1,000.
    store
        .put(&format!("apps/web/v2.0.0/{ART}"), data.clone(), Precondition::Any)
        .await
        .unwrap();
    store
        .put(
            "apps/web/v2.0.0/SHA256SUMS",
            format!("{}  {ART}\n", sha256(&data)).into_bytes(),
            Precondition::Any,
        )
        .await
        .unwrap();
    store
        .put("apps/web/v3.0.0-rc.1/app.tar.gz", b"pre".to_vec(), Precondition::Any)
        .await
        .unwrap();
    let reg = dewy_registry::open(&server.url("apps/web", ""), &server.options()).unwrap();
    let release = reg.latest().await.unwrap();
    assert_eq!(release.tag, "v2.0.0");
    assert_eq!(release.artifact_name, ART);
    assert_eq!(release.checksum.as_ref().map(|c| c.source.as_str()), Some("SHA256SUMS"));
    let request = reg.artifact_request(&release).await.unwrap();
    let staging = tempfile::tempdir().unwrap();
    let got = Downloader::new(Default::default())
        .unwrap()
        .fetch_request(&request, release.checksum.as_ref(), staging.path(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);

    reg.report(&Report {
        release_id: "1".into(),
        tag: release.tag.clone(),
        command: "server".into(),
        hostname: "Web-1".into(),
        at: jiff::Timestamp::now(),
        error: None,
    })
    .await
    .unwrap();
    let listing = store.list("apps/web/v2.0.0/", false).await.unwrap();
    assert!(
        listing
            .objects
            .iter()
            .any(|o| o.name.contains("shipped_to_web-1_server_at_")),
        "{listing:?}"
    );

    // A version without a matching artifact yet: not found, with its time.
    store
        .put("apps/web/v2.1.0/README.md", b"soon".to_vec(), Precondition::Any)
        .await
        .unwrap();
    match reg.latest().await {
        Err(Error::ArtifactNotFound { tag, published_at, .. }) => {
            assert_eq!(tag, "v2.1.0");
            assert!(published_at.is_some());
        }
        other => panic!("{other:?}"),
    }
    // A host with nothing deployed may take the newest complete one.
    let fallback = reg
        .latest_complete_before("v2.1.0")
        .await
        .unwrap()
        .expect("v2.0.0 is complete");
    assert_eq!(fallback.tag, "v2.0.0");
    assert_eq!(
        fallback.checksum.as_ref().map(|c| c.source.as_str()),
        Some("SHA256SUMS")
    );
    let err = dewy_registry::open(&server.url("apps/web", "&bogus=1"), &server.options()).unwrap_err();
    assert!(err.to_string().contains("`bogus`"), "{err}");
}

/// Signatures beside the artifact in the bucket: verified, or refused when
/// the artifact was replaced or the signature is missing.
async fn signed_releases_in_a_bucket(kind: &str) {
    use dewy_registry::{SignatureError, TrustedKeys};
    let key = dewy_testkit::MinisignKey::generate();
    let trusted = TrustedKeys::parse(&[key.public.as_str()]).unwrap();
    let server = Server::start(kind).await;
    let (store, _) = server.store("signed/");
    let put = |name: String, data: Vec<u8>| {
        let store = store.clone();
        async move { store.put(&name, data, Precondition::Any).await.unwrap() }
    };
    let reg = dewy_registry::open(&server.url("signed", ""), &server.options()).unwrap();
    let downloader = Downloader::new(Default::default()).unwrap();
    let staging = tempfile::tempdir().unwrap();
    let fetch = || async {
        let release = reg.latest().await?;
        let check = downloader.signature(&*reg, &release, &trusted).await?;
        let request = reg.artifact_request(&release).await?;
        downloader
            .fetch_verified(&request, None, Some(&check), staging.path(), &NoProgress)
            .await
            .map(|_| check)
    };
    let data = b"artifact in a bucket".to_vec();
    put(format!("signed/v1.0.0/{ART}"), data.clone()).await;
    put(
        format!("signed/v1.0.0/{ART}.minisig"),
        key.signature_of(&data, "bucket"),
    )
    .await;
    assert_eq!(fetch().await.unwrap().trusted_comment(), "bucket");

    put(format!("signed/v1.1.0/{ART}"), b"replaced".to_vec()).await;
    put(
        format!("signed/v1.1.0/{ART}.minisig"),
        key.signature_of(&data, "bucket"),
    )
    .await;
    match fetch().await {
        Err(Error::Signature {
            source: SignatureError::Invalid { .. },
            ..
        }) => {}
        other => panic!("{kind}: {other:?}"),
    }
    assert_eq!(std::fs::read_dir(staging.path()).unwrap().count(), 0);

    put(format!("signed/v1.2.0/{ART}"), data.clone()).await;
    match fetch().await {
        Err(Error::Signature {
            source: SignatureError::Missing { .. },
            ..
        }) => {}
        other => panic!("{kind}: {other:?}"),
    }
}

#[tokio::test]
async fn s3_signed_releases() {
    signed_releases_in_a_bucket("s3").await;
}

#[tokio::test]
async fn gcs_signed_releases() {
    signed_releases_in_a_bucket("gcs").await;
}

#[tokio::test]
async fn s3_registry_pages_versions_verifies_and_reports() {
    registry_end_to_end("s3", 1005).await;
}

#[tokio::test]
async fn gcs_registry_pages_versions_verifies_and_reports() {
    registry_end_to_end("gcs", 1005).await;
}

/// An upstream registry that counts its calls and can fail.
#[derive(Debug, Default)]
struct Upstream {
    calls: AtomicU64,
    fail: AtomicBool,
    tag: std::sync::Mutex<String>,
}

#[async_trait::async_trait]
impl Registry for Upstream {
    async fn latest(&self) -> Result<Release, Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Api {
                registry: "ghr://o/r".into(),
                status: 502,
                message: "Bad Gateway".into(),
            });
        }
        let tag = self.tag.lock().unwrap().clone();
        Ok(Release {
            id: tag.clone(),
            version: dewy_registry::parse_semver(&tag).unwrap(),
            tag,
            artifact_name: ART.into(),
            artifact_url: format!("https://example.invalid/{ART}"),
            published_at: Some(jiff::Timestamp::now()),
            slot: None,
            checksum: None,
            signature_url: None,
        })
    }
}

fn shared(server: &Server, upstream: &Arc<Upstream>, node: &str, ttl: Duration) -> SharedRegistry {
    let (store, prefix) = server.store("fleet");
    SharedRegistry::new(
        upstream.clone(),
        store,
        &prefix,
        SharedScope {
            registry_url: "ghr://o/r?artifact=a".into(),
            scope: "linux|x86_64||".into(),
            scheme: Scheme::SemVer,
            node: node.into(),
        },
        ttl,
    )
}

async fn shared_answer(kind: &str) {
    let server = Server::start(kind).await;
    let upstream = Arc::new(Upstream::default());
    *upstream.tag.lock().unwrap() = "v1.0.0".into();

    // Contention: ten hosts at once, one upstream call.
    let hosts: Vec<_> = (0..10)
        .map(|i| {
            Arc::new(shared(
                &server,
                &upstream,
                &format!("host{i}:1"),
                Duration::from_secs(3),
            ))
        })
        .collect();
    let answers = futures_join(hosts.iter().map(|h| {
        let h = h.clone();
        async move { h.latest().await.map(|r| r.tag) }
    }))
    .await;
    assert!(
        answers.iter().all(|a| a.as_deref().ok() == Some("v1.0.0")),
        "{answers:?}"
    );
    assert_eq!(
        upstream.calls.load(Ordering::SeqCst),
        1,
        "one host per TTL asks upstream"
    );

    // After the TTL one host refreshes; a new release is seen.
    *upstream.tag.lock().unwrap() = "v1.1.0".into();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for h in &hosts {
        assert_eq!(h.latest().await.unwrap().tag, "v1.1.0");
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);

    // Upstream fails: the last answer keeps being served, and the rest of
    // the fleet does not retry upstream within the TTL.
    upstream.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for h in &hosts {
        assert_eq!(h.latest().await.unwrap().tag, "v1.1.0");
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 3);
    assert!(
        hosts
            .iter()
            .map(|h| h.shared_stats().stale_served.load(Ordering::SeqCst))
            .sum::<u64>()
            >= 1
    );

    // A lock whose holder died expires.
    upstream.fail.store(false, Ordering::SeqCst);
    let (store, prefix) = server.store("fleet");
    let name = hosts[0].object_name().to_owned();
    let (_, version) = store.get(&name).await.unwrap().unwrap();
    let dead = serde_json::json!({
        "response": null, "fetched_at": null,
        "locked_at": jiff::Timestamp::now().to_string(), "locked_by": "dead-host:42",
    });
    store
        .put(&name, dead.to_string().into_bytes(), Precondition::Matches(version))
        .await
        .unwrap();
    let survivor =
        shared(&server, &upstream, "survivor:1", Duration::from_secs(3)).with_lock_ttl(Duration::from_secs(1));
    let started = std::time::Instant::now();
    assert_eq!(survivor.latest().await.unwrap().tag, "v1.1.0");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for the lock to expire"
    );
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 4);

    // An unreadable entry is replaced, not bypassed forever.
    let (_, version) = store.get(&name).await.unwrap().unwrap();
    store
        .put(&name, b"{not json".to_vec(), Precondition::Matches(version))
        .await
        .unwrap();
    assert_eq!(hosts[1].latest().await.unwrap().tag, "v1.1.0");
    assert_eq!(hosts[2].latest().await.unwrap().tag, "v1.1.0");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 5);
    assert!(
        name.starts_with(&format!("{prefix}registry-cache/")) && name.ends_with(".json"),
        "{name}"
    );
}

async fn futures_join<F: std::future::Future + Send + 'static>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_shared_answer_one_upstream_call_per_ttl() {
    shared_answer("s3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcs_shared_answer_one_upstream_call_per_ttl() {
    shared_answer("gcs").await;
}
