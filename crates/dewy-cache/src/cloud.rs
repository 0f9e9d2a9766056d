//! [`CloudCache`]: a bucket shared by a fleet, with a local copy per host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dewy_store::{ObjectStore, Precondition};

use crate::{Cache, Entry, Error, FileCache, Key};

/// A cache in a bucket (`s3://…`, `gs://…`) with a local [`FileCache`] for
/// staging and extraction.
///
/// What is shared and what is not:
///
/// - Artifacts (`<tag>--<artifact>`) and bad-release records live in the
///   bucket, so each release is downloaded from upstream once per fleet and a
///   release that failed on one host is known to all. A host keeps a local
///   copy of what it used.
/// - Every other key (`current`, `current-<app>`) is this host's own and
///   stays local. The Go original stored `current` in the bucket too, so a
///   fresh assets host found the fleet's `current` there and never deployed,
///   and two apps sharing a prefix overwrote each other's.
/// - Uploads are single objects, visible whole or not at all.
///
/// A bucket that cannot be reached (missing, wrong credentials, network)
/// never blocks a deploy: the cache degrades to its local copy (the host
/// downloads from the registry itself, bad records stay local), logs one
/// WARN naming the bucket and the error (again every 10 minutes while it
/// lasts), reports it in [`Cache::degraded`], and returns to the bucket
/// with one INFO line when it answers again.
#[derive(Debug)]
pub struct CloudCache {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    local: FileCache,
    node: String,
    download_lock_ttl: std::time::Duration,
    /// Since when the bucket fails, when that was last logged, and why.
    degraded: std::sync::Mutex<Option<Degraded>>,
    /// The renewals of the download locks this host holds.
    renewals: std::sync::Mutex<std::collections::HashMap<String, tokio::task::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Degraded {
    logged: std::time::Instant,
    error: String,
}

/// How long a download lock may stay unchanged before another host takes
/// it over (its holder renews it every third of this).
pub const DOWNLOAD_LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// How often a lasting bucket failure is logged again.
const DEGRADED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

impl CloudCache {
    /// A cache at `prefix` (empty or ending in `/`) of `store`, with the
    /// local copy in `local`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: impl Into<String>, local: FileCache) -> Self {
        Self {
            store,
            prefix: prefix.into(),
            local,
            node: format!("pid-{}", std::process::id()),
            download_lock_ttl: DOWNLOAD_LOCK_TTL,
            degraded: std::sync::Mutex::new(None),
            renewals: std::sync::Mutex::default(),
        }
    }

    /// The outcome of a bucket operation: `Some` on success (leaving the
    /// degraded mode if it was on), `None` when the bucket failed (entering
    /// or staying in it; the caller falls back to the local copy).
    async fn bucket<T, E: std::fmt::Display>(
        &self,
        op: &str,
        result: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        let result = result.await;
        let mut degraded = self.degraded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(v) => {
                if degraded.take().is_some() {
                    tracing::info!(location = %self.store.location(), "Shared cache reachable again");
                }
                Some(v)
            }
            Err(err) => {
                let error = format!("{op}: {err}");
                let log = degraded
                    .as_ref()
                    .is_none_or(|d| d.logged.elapsed() >= DEGRADED_LOG_EVERY);
                if log {
                    tracing::warn!(location = %self.store.location(), error = %error, "Shared cache unreachable; using the local cache and the registry directly until it answers");
                }
                let logged = match degraded.as_ref() {
                    Some(d) if !log => d.logged,
                    _ => std::time::Instant::now(),
                };
                *degraded = Some(Degraded { logged, error });
                None
            }
        }
    }

    /// Names this host in download locks (`host:pid`), and sets how long a
    /// download lock may stay unchanged before another host takes it over
    /// (default [`DOWNLOAD_LOCK_TTL`]; the holder renews it every third of
    /// that, so a host that died mid-download delays the fleet that long at
    /// most, however long downloads take).
    pub fn with_node(mut self, node: impl Into<String>, download_lock_ttl: std::time::Duration) -> Self {
        self.node = node.into();
        self.download_lock_ttl = download_lock_ttl;
        self
    }

    /// Rewrites the download lock of `key` every third of the lock TTL
    /// until [`Cache::end_download`] (or until another host took it over).
    fn renew_lock(&self, key: &Key, lock: String, mut version: String) {
        let (store, node, every) = (self.store.clone(), self.node.clone(), self.download_lock_ttl / 3);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let body = serde_json::json!({"node": node, "at": jiff::Timestamp::now().to_string()});
                match store
                    .put(
                        &lock,
                        body.to_string().into_bytes(),
                        Precondition::Matches(version.clone()),
                    )
                    .await
                {
                    Ok(v) => version = v,
                    Err(dewy_store::Error::Conflict { .. }) => {
                        tracing::warn!(key = %lock, "Another host took over this host's download lock");
                        return;
                    }
                    Err(err) => tracing::warn!(key = %lock, error = %err, "Could not renew the download lock"),
                }
            }
        });
        if let Some(old) = self
            .renewals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.to_string(), task)
        {
            old.abort();
        }
    }

    fn lock_name(&self, key: &Key) -> String {
        format!("{}locks/{}", self.prefix, key.as_str())
    }

    /// The bucket.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The prefix inside the bucket.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn shared(key: &Key) -> bool {
        key.is_artifact() || key.is_bad_record() || key.is_host_record() || key.is_rollout_record()
    }

    fn name(&self, key: &Key) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }

    /// The shared values in the bucket (artifacts, bad records, host
    /// heartbeats).
    async fn bucket_entries(&self) -> Result<Vec<Entry>, Error> {
        let listing = self.store.list(&self.prefix, true).await?;
        Ok(listing
            .objects
            .into_iter()
            .filter_map(|o| {
                let key = Key::new(o.name.strip_prefix(&self.prefix).unwrap_or(&o.name)).ok()?;
                Self::shared(&key).then(|| Entry {
                    key,
                    size: o.size,
                    modified: o
                        .modified
                        .map(std::time::SystemTime::from)
                        .unwrap_or(std::time::UNIX_EPOCH),
                })
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl Cache for CloudCache {
    async fn read(&self, key: &Key) -> Result<Option<Vec<u8>>, Error> {
        if !Self::shared(key) {
            return self.local.read(key).await;
        }
        match self.bucket("read", self.store.get(&self.name(key))).await {
            Some(Some((data, _))) => Ok(Some(data)),
            // Not in the bucket (or no bucket): what this host wrote while
            // the bucket was unreachable.
            _ => self.local.read(key).await,
        }
    }

    async fn write(&self, key: &Key, data: &[u8]) -> Result<(), Error> {
        if Self::shared(key) {
            let name = self.name(key);
            if self
                .bucket("write", self.store.put(&name, data.to_vec(), Precondition::Any))
                .await
                .is_some()
            {
                if key.is_host_record() {
                    tracing::debug!(location = %self.store.location(), key = %name, "Write object");
                } else {
                    tracing::info!(location = %self.store.location(), key = %name, "Write object");
                }
            }
        }
        self.local.write(key, data).await
    }

    async fn put_file(&self, key: &Key, src: &Path) -> Result<(), Error> {
        if Self::shared(key) {
            let name = self.name(key);
            if self.bucket("upload", self.store.upload(&name, src)).await.is_some() {
                tracing::info!(location = %self.store.location(), key = %name, "Write object");
            }
        }
        self.local.put_file(key, src).await
    }

    async fn local_path(&self, key: &Key) -> Result<Option<PathBuf>, Error> {
        if let Some(path) = self.local.local_path(key).await? {
            return Ok(Some(path));
        }
        if !Self::shared(key) {
            return Ok(None);
        }
        // Another host put it in the bucket: stage a local copy.
        let tmp = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempfile_in(self.local.staging_dir())
            .map_err(|e| Error::io("create staging file in", self.local.staging_dir(), e))?
            .into_temp_path();
        if self
            .bucket("download", self.store.download(&self.name(key), &tmp))
            .await
            != Some(true)
        {
            return Ok(None);
        }
        tracing::info!(location = %self.store.location(), key = %self.name(key), "Fetched shared cache object");
        self.local.put_file(key, &tmp).await?;
        self.local.local_path(key).await
    }

    async fn list(&self) -> Result<Vec<Entry>, Error> {
        let mut out = self.bucket("list", self.bucket_entries()).await.unwrap_or_default();
        for e in self.local.list().await? {
            if !out.iter().any(|o| o.key == e.key) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Straight from the bucket: no local fallback.
    async fn read_versioned(&self, key: &Key) -> Result<Option<crate::Versioned>, Error> {
        Ok(self
            .store
            .get(&self.name(key))
            .await?
            .map(|(data, version)| crate::Versioned { data, version }))
    }

    /// S3 `If-None-Match: *` / `If-Match: <etag>`, GCS
    /// `ifGenerationMatch`.
    async fn write_if(&self, key: &Key, data: &[u8], expected: Option<&str>) -> Result<String, Error> {
        let pre = match expected {
            None => Precondition::Absent,
            Some(v) => Precondition::Matches(v.to_owned()),
        };
        match self.store.put(&self.name(key), data.to_vec(), pre).await {
            Err(dewy_store::Error::Conflict { .. }) => Err(Error::Conflict { key: key.to_string() }),
            other => Ok(other?),
        }
    }

    /// The object's Last-Modified (S3) or update time (GCS), from a
    /// listing of its exact name.
    async fn written_at(&self, key: &Key) -> Result<Option<std::time::SystemTime>, Error> {
        let name = self.name(key);
        let listing = self.store.list(&name, false).await?;
        Ok(listing
            .objects
            .into_iter()
            .find(|o| o.name == name)
            .and_then(|o| o.modified)
            .map(std::time::SystemTime::from))
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        if Self::shared(key) {
            self.bucket("delete", self.store.delete(&self.name(key))).await;
        }
        self.local.delete(key).await
    }

    fn staging_dir(&self) -> &Path {
        self.local.staging_dir()
    }

    /// One host of the fleet downloads: the first to create
    /// `<prefix>locks/<key>` (a create-only write) does, and renews the
    /// lock every third of the lock TTL while it downloads; the others wait
    /// for the artifact to appear in the bucket. A lock that stays
    /// unchanged for the lock TTL, as this host watches it (so no host's
    /// clock matters), lost its holder and is taken over.
    async fn begin_download(&self, key: &Key) -> Result<Option<PathBuf>, Error> {
        let lock = self.lock_name(key);
        let mut announced = false;
        // The lock's version as first seen unchanged, and since when.
        let mut watched: Option<(String, std::time::Instant)> = None;
        loop {
            let body = || {
                serde_json::json!({"node": self.node, "at": jiff::Timestamp::now().to_string()})
                    .to_string()
                    .into_bytes()
            };
            // A bucket that does not answer: download without the lock.
            let Some(current) = self.bucket("read the download lock", self.store.get(&lock)).await else {
                return Ok(None);
            };
            let taken = match current {
                None => match self.store.put(&lock, body(), Precondition::Absent).await {
                    Ok(version) => Some(version),
                    Err(dewy_store::Error::Conflict { .. }) => None,
                    Err(e) => {
                        self.bucket("write the download lock", async { Err::<(), _>(e) }).await;
                        return Ok(None);
                    }
                },
                Some((_, version)) => {
                    let since = match &watched {
                        Some((v, since)) if *v == version => *since,
                        _ => {
                            watched = Some((version.clone(), std::time::Instant::now()));
                            std::time::Instant::now()
                        }
                    };
                    if since.elapsed() >= self.download_lock_ttl {
                        tracing::warn!(key = %lock, "Download lock not renewed (its holder stopped); taking it over");
                        match self.store.put(&lock, body(), Precondition::Matches(version)).await {
                            Ok(version) => Some(version),
                            Err(dewy_store::Error::Conflict { .. }) => None,
                            Err(e) => return Err(e.into()),
                        }
                    } else {
                        None
                    }
                }
            };
            if let Some(version) = taken {
                // The previous holder may have finished just before.
                if let Some(path) = self.local_path(key).await? {
                    self.store.delete(&lock).await.ok();
                    return Ok(Some(path));
                }
                self.renew_lock(key, lock, version);
                return Ok(None);
            }
            if let Some(path) = self.local_path(key).await? {
                return Ok(Some(path));
            }
            if !announced {
                tracing::info!(cache_key = %key, "Another host is downloading this artifact; waiting for it");
                announced = true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    async fn end_download(&self, key: &Key) {
        if let Some(renewal) = self
            .renewals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key.as_str())
        {
            renewal.abort();
        }
        if self.degraded().is_some() {
            return;
        }
        if let Err(err) = self.store.delete(&self.lock_name(key)).await {
            tracing::warn!(key = %self.lock_name(key), error = %err, "Could not remove the download lock");
        }
    }

    fn degraded(&self) -> Option<String> {
        self.degraded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|d| format!("{}: {}", self.store.location(), d.error))
    }

    /// Keeps the newest `keep` artifacts in the bucket and in the local
    /// copy (the Go original never removed anything from either).
    async fn evict(&self, keep: usize, protect: &[Key]) -> Result<Vec<Key>, Error> {
        let mut removed = self.local.evict(keep, protect).await?;
        let Some(entries) = self.bucket("list", self.bucket_entries()).await else {
            return Ok(removed);
        };
        for key in crate::to_evict(entries, keep, protect) {
            self.store.delete(&self.name(&key)).await?;
            tracing::info!(location = %self.store.location(), cache_key = %key, "Evicted shared cached artifact");
            if !removed.contains(&key) {
                removed.push(key);
            }
        }
        Ok(removed)
    }
}
