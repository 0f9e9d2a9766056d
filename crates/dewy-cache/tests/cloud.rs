//! The cache in a bucket on S3 (moto) and GCS (fake-gcs-server), started
//! by dewy-testkit: shared artifacts, per-host `current`, fleet-wide bad
//! records, eviction, and the degraded mode when the bucket is missing.

use std::sync::Arc;
use std::time::Duration;

use dewy_cache::cloud::CloudCache;
use dewy_cache::{Cache, FileCache, Key};
use dewy_store::{CloudOptions, ObjectStore, open_store};
use dewy_testkit::{GcsServer, S3Server};

const ART: &str = "app_linux_amd64.tar.gz";

/// A store server; `bucket` is created when `create` holds.
enum Server {
    S3(S3Server),
    Gcs(GcsServer),
}

impl Server {
    fn start(kind: &str) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        match kind {
            "s3" => Self::S3(S3Server::start()),
            _ => Self::Gcs(GcsServer::start()),
        }
    }

    fn create_bucket(&self, name: &str) {
        match self {
            Self::S3(s) => s.create_bucket(name),
            Self::Gcs(g) => g.create_bucket(name),
        }
    }

    /// The store of `bucket` and the prefix `prefix/` in it.
    fn store(&self, bucket: &str, prefix: &str) -> (Arc<dyn ObjectStore>, String) {
        let (url, cloud) = match self {
            Self::S3(s) => (
                format!("s3://us-east-1/{bucket}/{prefix}?endpoint={}", s.endpoint),
                CloudOptions {
                    aws_credentials: Some(("test".into(), "test".into(), None)),
                    ..Default::default()
                },
            ),
            Self::Gcs(g) => (
                format!("gs://{bucket}/{prefix}"),
                CloudOptions {
                    gcs_emulator: Some(g.endpoint.clone()),
                    ..Default::default()
                },
            ),
        };
        let opened = open_store(&url::Url::parse(&url).unwrap(), &cloud).unwrap();
        (opened.store, opened.prefix)
    }
}

async fn cache_round_trip(kind: &str) {
    let server = Server::start(kind);
    server.create_bucket("dewy-bucket");
    let (store, prefix) = server.store("dewy-bucket", "fleet/cache");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let hosts: Vec<CloudCache> = dirs
        .iter()
        .map(|d| CloudCache::new(store.clone(), prefix.clone(), FileCache::open(d.path()).unwrap()))
        .collect();
    let key = Key::artifact("v1.0.0", ART).unwrap();
    let src = hosts[0].staging_dir().join("download");
    std::fs::write(&src, b"artifact bytes").unwrap();
    hosts[0].put_file(&key, &src).await.unwrap();
    hosts[0].write(&Key::current(), key.as_str().as_bytes()).await.unwrap();

    // The second host finds the artifact in the bucket, not `current`.
    let path = hosts[1]
        .local_path(&key)
        .await
        .unwrap()
        .expect("fetched from the bucket");
    assert_eq!(std::fs::read(path).unwrap(), b"artifact bytes");
    assert_eq!(
        hosts[1].read(&Key::current()).await.unwrap(),
        None,
        "current is per host"
    );
    assert!(store.get(&format!("{prefix}current")).await.unwrap().is_none());
    // Bad-release records are fleet-wide.
    hosts[1].write(&Key::bad(&key), b"failed health check").await.unwrap();
    assert_eq!(
        hosts[0].read(&Key::bad(&key)).await.unwrap().as_deref(),
        Some(&b"failed health check"[..])
    );
    assert_eq!(
        hosts[0]
            .local_path(&Key::artifact("v9.9.9", ART).unwrap())
            .await
            .unwrap(),
        None
    );

    // Host heartbeats are fleet-wide, listed by every host, never evicted.
    for (i, h) in hosts.iter().enumerate() {
        h.write(
            &Key::host(&format!("web-{i}")).unwrap(),
            format!("{{\"host\":\"web-{i}\"}}").as_bytes(),
        )
        .await
        .unwrap();
    }
    let listed: Vec<String> = hosts[0]
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.key.is_host_record())
        .map(|e| e.key.as_str().to_owned())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.contains(&"host.web-1".to_owned()), "{listed:?}");
    assert_eq!(
        hosts[0].read(&Key::host("web-1").unwrap()).await.unwrap().as_deref(),
        Some(&br#"{"host":"web-1"}"#[..])
    );

    // Eviction keeps the newest artifacts in the bucket too.
    for tag in ["v1.0.1", "v1.0.2"] {
        let src = hosts[0].staging_dir().join("download");
        std::fs::write(&src, tag).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        hosts[0]
            .put_file(&Key::artifact(tag, ART).unwrap(), &src)
            .await
            .unwrap();
    }
    let removed = hosts[0].evict(2, &[]).await.unwrap();
    assert_eq!(removed, vec![key.clone()]);
    assert!(hosts[0].read(&Key::host("web-0").unwrap()).await.unwrap().is_some());
    assert!(store.get(&format!("{prefix}{key}")).await.unwrap().is_none());
}

#[tokio::test]
async fn s3_cache_shares_artifacts_not_current() {
    cache_round_trip("s3").await;
}

#[tokio::test]
async fn gcs_cache_shares_artifacts_not_current() {
    cache_round_trip("gcs").await;
}

/// A bucket that does not exist yet: the cache works on its local copy,
/// says it is degraded, and uses the bucket once it exists.
async fn missing_bucket_degrades_then_recovers(kind: &str) {
    let server = Server::start(kind);
    let (store, prefix) = server.store("later-bucket", "c");
    let dir = tempfile::tempdir().unwrap();
    let cache = CloudCache::new(store.clone(), prefix.clone(), FileCache::open(dir.path()).unwrap());
    let key = Key::artifact("v1.0.0", ART).unwrap();
    assert_eq!(cache.begin_download(&key).await.unwrap(), None, "download it yourself");
    let src = cache.staging_dir().join("download");
    std::fs::write(&src, b"artifact bytes").unwrap();
    cache.put_file(&key, &src).await.unwrap();
    cache.end_download(&key).await;
    let path = cache.local_path(&key).await.unwrap().expect("kept locally");
    assert_eq!(std::fs::read(path).unwrap(), b"artifact bytes");
    cache.write(&Key::bad(&key), b"bad").await.unwrap();
    assert_eq!(cache.read(&Key::bad(&key)).await.unwrap().as_deref(), Some(&b"bad"[..]));
    assert!(!cache.list().await.unwrap().is_empty());
    let why = cache.degraded().expect("degraded");
    assert!(why.contains("later-bucket"), "{why}");
    assert!(why.len() < 400 && !why.contains('\n'), "one readable line: {why}");
    if kind == "s3" {
        assert!(why.contains("NoSuchBucket") && why.contains("request id"), "{why}");
    }
    server.create_bucket("later-bucket");
    std::fs::write(&src, b"artifact bytes").unwrap();
    cache.put_file(&key, &src).await.unwrap();
    assert_eq!(cache.degraded(), None, "back on the bucket");
    assert!(store.get(&format!("{prefix}{key}")).await.unwrap().is_some());
}

#[tokio::test]
async fn s3_missing_bucket_degrades_to_the_local_cache() {
    missing_bucket_degrades_then_recovers("s3").await;
}

#[tokio::test]
async fn gcs_missing_bucket_degrades_to_the_local_cache() {
    missing_bucket_degrades_then_recovers("gcs").await;
}

/// The download lock: renewed while its holder downloads (however long
/// that takes, nobody takes it over), taken over once its holder stopped
/// renewing it (its process died), and versioned records written only by
/// compare-and-swap.
#[test]
fn download_locks_are_renewed_and_taken_over_when_their_holder_dies() {
    let server = Server::start("s3");
    server.create_bucket("locks");
    let (store, prefix) = server.store("locks", "c");
    let ttl = Duration::from_secs(2);
    let host = |name: &str, dir: &std::path::Path| {
        Arc::new(CloudCache::new(store.clone(), prefix.clone(), FileCache::open(dir).unwrap()).with_node(name, ttl))
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rt = |threads| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap()
    };
    let key = Key::artifact("v1.0.0", ART).unwrap();
    let b_rt = rt(1);
    let b = host("b", db.path());

    // a downloads for three lock TTLs: b waits all along, then gets a's copy.
    let a_rt = rt(1);
    let a = host("a", da.path());
    assert_eq!(a_rt.block_on(a.begin_download(&key)).unwrap(), None, "a downloads");
    let waiting = b_rt.spawn({
        let (b, key) = (b.clone(), key.clone());
        async move { b.begin_download(&key).await }
    });
    std::thread::sleep(ttl * 3);
    assert!(!waiting.is_finished(), "a renews its lock: b keeps waiting");
    let staged = a.staging_dir().join("v1");
    std::fs::write(&staged, b"artifact").unwrap();
    a_rt.block_on(async {
        a.put_file(&key, &staged).await.unwrap();
        a.end_download(&key).await;
    });
    let got = b_rt.block_on(waiting).unwrap().unwrap().expect("b uses a's upload");
    assert_eq!(std::fs::read(got).unwrap(), b"artifact");

    // a takes the lock of v2 and dies (its runtime and renewals gone): b
    // takes the lock over once it stayed unchanged for the TTL.
    let key2 = Key::artifact("v2.0.0", ART).unwrap();
    assert_eq!(a_rt.block_on(a.begin_download(&key2)).unwrap(), None);
    a_rt.shutdown_background();
    let started = std::time::Instant::now();
    assert_eq!(b_rt.block_on(b.begin_download(&key2)).unwrap(), None, "b downloads");
    assert!(started.elapsed() >= ttl, "{:?}", started.elapsed());
    assert!(started.elapsed() < ttl * 3, "{:?}", started.elapsed());
    b_rt.block_on(b.end_download(&key2));

    // Compare-and-swap records.
    b_rt.block_on(async {
        let record = Key::new("rollout.v1.0.0--x").unwrap();
        let v1 = b.write_if(&record, b"one", None).await.unwrap();
        let err = b.write_if(&record, b"again", None).await.unwrap_err();
        assert!(matches!(err, dewy_cache::Error::Conflict { .. }), "{err}");
        let read = b.read_versioned(&record).await.unwrap().unwrap();
        assert_eq!(
            (read.data.as_slice(), read.version.as_str()),
            (&b"one"[..], v1.as_str())
        );
        b.write_if(&record, b"two", Some(&v1)).await.unwrap();
        let err = b.write_if(&record, b"three", Some(&v1)).await.unwrap_err();
        assert!(matches!(err, dewy_cache::Error::Conflict { .. }), "{err}");
        assert!(b.written_at(&record).await.unwrap().is_some());
    });
}
