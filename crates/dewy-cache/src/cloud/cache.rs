//! [`CloudCache`]: a bucket shared by a fleet, with a local copy per host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ObjectStore, Precondition};
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
#[derive(Debug)]
pub struct CloudCache {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    local: FileCache,
}

impl CloudCache {
    /// A cache at `prefix` (empty or ending in `/`) of `store`, with the
    /// local copy in `local`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: impl Into<String>, local: FileCache) -> Self {
        Self {
            store,
            prefix: prefix.into(),
            local,
        }
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
        key.is_artifact() || key.is_bad_record()
    }

    fn name(&self, key: &Key) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }
}

#[async_trait::async_trait]
impl Cache for CloudCache {
    async fn read(&self, key: &Key) -> Result<Option<Vec<u8>>, Error> {
        if !Self::shared(key) {
            return self.local.read(key).await;
        }
        Ok(self.store.get(&self.name(key)).await?.map(|(data, _)| data))
    }

    async fn write(&self, key: &Key, data: &[u8]) -> Result<(), Error> {
        if Self::shared(key) {
            self.store
                .put(&self.name(key), data.to_vec(), Precondition::Any)
                .await?;
            tracing::info!(location = %self.store.location(), key = %self.name(key), "Write object");
        }
        self.local.write(key, data).await
    }

    async fn put_file(&self, key: &Key, src: &Path) -> Result<(), Error> {
        if Self::shared(key) {
            self.store.upload(&self.name(key), src).await?;
            tracing::info!(location = %self.store.location(), key = %self.name(key), "Write object");
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
        if !self.store.download(&self.name(key), &tmp).await? {
            return Ok(None);
        }
        tracing::info!(location = %self.store.location(), key = %self.name(key), "Fetched shared cache object");
        self.local.put_file(key, &tmp).await?;
        self.local.local_path(key).await
    }

    async fn list(&self) -> Result<Vec<Entry>, Error> {
        let listing = self.store.list(&self.prefix, true).await?;
        let mut out: Vec<Entry> = listing
            .objects
            .into_iter()
            .filter_map(|o| {
                let key = Key::new(super::strip(&self.prefix, &o.name)).ok()?;
                Self::shared(&key).then(|| Entry {
                    key,
                    size: o.size,
                    modified: o
                        .modified
                        .map(std::time::SystemTime::from)
                        .unwrap_or(std::time::UNIX_EPOCH),
                })
            })
            .collect();
        for e in self.local.list().await? {
            if !out.iter().any(|o| o.key == e.key) {
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        if Self::shared(key) {
            self.store.delete(&self.name(key)).await?;
        }
        self.local.delete(key).await
    }

    fn staging_dir(&self) -> &Path {
        self.local.staging_dir()
    }

    /// Keeps the newest `keep` artifacts in the bucket and in the local
    /// copy (the Go original never removed anything from either).
    async fn evict(&self, keep: usize, protect: &[Key]) -> Result<Vec<Key>, Error> {
        let mut removed = self.local.evict(keep, protect).await?;
        let listing = self.store.list(&self.prefix, true).await?;
        let mut artifacts: Vec<_> = listing
            .objects
            .into_iter()
            .filter_map(|o| Some((Key::new(super::strip(&self.prefix, &o.name)).ok()?, o.modified)))
            .filter(|(k, _)| k.is_artifact())
            .collect();
        artifacts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (key, _) in artifacts.into_iter().skip(keep) {
            if protect.contains(&key) {
                continue;
            }
            self.store.delete(&self.name(&key)).await?;
            tracing::info!(location = %self.store.location(), cache_key = %key, "Evicted shared cached artifact");
            if !removed.contains(&key) {
                removed.push(key);
            }
        }
        Ok(removed)
    }
}
