//! The artifact cache of dewy.
//!
//! The cache remembers which artifact is current and keeps downloaded
//! artifacts, so that a restart, a redeploy after a crash, or a rollback needs
//! no download.
//!
//! # Contract
//!
//! - Keys are validated [`Key`]s: `<tag>--<artifact>` for artifacts
//!   ([`Key::artifact`]) and `current` ([`Key::current`]) for the one in use.
//!   A key can never name a path outside the cache.
//! - A final key never names a partial value: writes go to a temporary file in
//!   the same folder, are synced, then renamed, so a crash at any point leaves
//!   the old value or the new one ([`FileCache`]).
//! - Large artifacts never pass through memory: [`Cache::put_file`] moves a
//!   complete file (downloaded into [`Cache::staging_dir`]) under its key, and
//!   [`Cache::local_path`] hands a file path back for extraction.
//!
//! # Layout of the file backend
//!
//! ```text
//! <cache dir>/
//! ├── .lock                           advisory lock taken around every write
//! ├── .staging/                       downloads in progress (same filesystem)
//! ├── current                         value: the artifact key in use
//! └── v1.2.3--myapp_linux_amd64.tar.gz
//! ```
//!
//! # Cloud backends (features `s3`, `gcs`)
//!
//! [`cloud::CloudCache`] keeps artifacts and bad-release records in a bucket
//! shared by a fleet, with a local copy per host; the per-host `current`
//! stays local. The bucket is a `dewy_store::ObjectStore`, the client that
//! dewy-registry's `s3://` and `gs://` registries use too.
//!
//! # What this crate must never do
//!
//! Network I/O outside the `cloud` module (which goes through dewy-store), reading environment variables
//! (the CLI passes `DEWY_CACHEDIR` and credentials in; only the AWS SDK's
//! standard credential chain reads its own), or exposing a partially written
//! value under a final key.

#![deny(missing_docs)]

#[cfg(feature = "cloud")]
pub mod cloud;
mod file;
mod key;
#[cfg(feature = "testing")]
mod memory;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use file::{FileCache, Opened};
pub use key::Key;
#[cfg(feature = "testing")]
pub use memory::MemoryCache;

/// One stored value, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its key.
    pub key: Key,
    /// Size in bytes.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

/// Errors of a cache backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A key that would leave the cache, or is otherwise malformed.
    #[error("invalid cache key `{key}`: {reason}")]
    InvalidKey {
        /// The rejected key (with control characters escaped).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A filesystem operation failed.
    #[error("failed to {op} `{}`", path.display())]
    Io {
        /// The operation.
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bucket of a cloud cache failed (see [`cloud::CloudCache`]).
    #[cfg(feature = "cloud")]
    #[error(transparent)]
    Store(#[from] dewy_store::Error),
    /// A failure injected by a test backend.
    #[error("injected failure: {0}")]
    Injected(String),
    /// A conditional write found another version than the one expected
    /// (another host wrote first): read again and retry.
    #[error("`{key}` was changed by another writer")]
    Conflict {
        /// The record.
        key: String,
    },
    /// The backend cannot do this (a conditional write on a backend
    /// without compare-and-swap).
    #[error("this cache cannot {op}")]
    Unsupported {
        /// What was asked.
        op: &'static str,
    },
}

/// A record read with its version, for a later [`Cache::write_if`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The value.
    pub data: Vec<u8>,
    /// Opaque version (S3 ETag, GCS generation, file inode and mtime).
    pub version: String,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Deletes every bad-release record in `cache` (what `dewy clear-bad`
/// does) and returns how many there were. With a bucket cache the records
/// are the fleet's: every host may try those releases again.
pub async fn delete_bad_records(cache: &dyn Cache) -> Result<usize, Error> {
    let mut n = 0;
    for entry in cache.list().await? {
        if entry.key.is_bad_record() {
            cache.delete(&entry.key).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// A key-value store for artifacts and the `current` marker.
///
/// Implementations must make every write atomic (old value or new value,
/// never a mix) and must reject nothing that [`Key`] accepts.
#[async_trait::async_trait]
pub trait Cache: Send + Sync + std::fmt::Debug {
    /// Reads a small value (such as `current`); `None` when absent.
    async fn read(&self, key: &Key) -> Result<Option<Vec<u8>>, Error>;

    /// Writes a small value atomically.
    async fn write(&self, key: &Key, data: &[u8]) -> Result<(), Error>;

    /// Moves the complete file `src` (which should be inside
    /// [`Cache::staging_dir`]) under `key` atomically.
    async fn put_file(&self, key: &Key, src: &Path) -> Result<(), Error>;

    /// A local file holding the value of `key`, for extraction; `None` when
    /// absent.
    async fn local_path(&self, key: &Key) -> Result<Option<PathBuf>, Error>;

    /// Every stored value except `current`-style markers' internals.
    async fn list(&self) -> Result<Vec<Entry>, Error>;

    /// Removes a value; absent keys are not an error.
    async fn delete(&self, key: &Key) -> Result<(), Error>;

    /// Reads a record shared by the fleet with its version. Unlike
    /// [`Cache::read`], a shared backend that fails is an error (never a
    /// fallback to a local copy): coordination must not act on stale
    /// state.
    async fn read_versioned(&self, _key: &Key) -> Result<Option<Versioned>, Error> {
        Err(Error::Unsupported {
            op: "read a record with its version",
        })
    }

    /// Writes `data` under `key` only if its version is still `expected`
    /// (`None`: only if it does not exist), and returns the new version;
    /// [`Error::Conflict`] when another writer came first.
    async fn write_if(&self, _key: &Key, _data: &[u8], _expected: Option<&str>) -> Result<String, Error> {
        Err(Error::Unsupported {
            op: "write conditionally",
        })
    }

    /// When the storage last wrote `key`, by the storage's own clock (the
    /// object's Last-Modified or update time, the file's mtime): the clock
    /// every host of a fleet can agree on.
    async fn written_at(&self, _key: &Key) -> Result<Option<SystemTime>, Error> {
        Ok(None)
    }

    /// When a shared backend cannot be reached and the cache works on its
    /// local copy only: why (for status and metrics). `None` when healthy.
    fn degraded(&self) -> Option<String> {
        None
    }

    /// A folder on the same filesystem as the cache, for downloads in
    /// progress.
    fn staging_dir(&self) -> &Path;

    /// Called before downloading `key` from upstream. A cache shared by a
    /// fleet lets one host download while the others wait: it returns the
    /// local path when another host finished the download meanwhile, and
    /// `None` when this host should download (then call
    /// [`Cache::end_download`]). The default never waits.
    async fn begin_download(&self, _key: &Key) -> Result<Option<PathBuf>, Error> {
        Ok(None)
    }

    /// Ends a download turn taken with [`Cache::begin_download`], whether the
    /// download succeeded or not.
    async fn end_download(&self, _key: &Key) {}

    /// Keeps the artifacts of the newest `keep` releases (by write time) plus
    /// `protect`, removes the others, and returns what was removed.
    async fn evict(&self, keep: usize, protect: &[Key]) -> Result<Vec<Key>, Error> {
        let mut removed = Vec::new();
        for key in to_evict(self.list().await?, keep, protect) {
            self.delete(&key).await?;
            tracing::info!(cache_key = %key, "Evicted cached artifact");
            removed.push(key);
        }
        Ok(removed)
    }
}

/// The artifacts among `entries` beyond the newest `keep` (by write time,
/// ties by key), except those in `protect`.
pub(crate) fn to_evict(entries: Vec<Entry>, keep: usize, protect: &[Key]) -> Vec<Key> {
    let mut artifacts: Vec<Entry> = entries.into_iter().filter(|e| e.key.is_artifact()).collect();
    artifacts.sort_by(|a, b| b.modified.cmp(&a.modified).then_with(|| a.key.cmp(&b.key)));
    artifacts
        .into_iter()
        .skip(keep)
        .map(|e| e.key)
        .filter(|k| !protect.contains(k))
        .collect()
}
