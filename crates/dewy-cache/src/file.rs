//! The local file cache, dewy's default.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Cache, Entry, Error, Key};

/// A cache in a local folder. Writes are atomic (temporary file, fsync,
/// rename, directory fsync) and serialized between processes by an advisory
/// lock on `<dir>/.lock`.
#[derive(Debug, Clone)]
pub struct FileCache {
    dir: PathBuf,
    staging: PathBuf,
    /// A fallback folder under the system temporary directory, removed when
    /// the last handle of this cache goes (dewy exits).
    _temporary: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// The result of [`FileCache::open_or_fallback`].
#[derive(Debug)]
pub struct Opened {
    /// The cache.
    pub cache: FileCache,
    /// When the preferred folder could not be used: it and the error.
    pub fallback_from: Option<(PathBuf, Error)>,
}

impl FileCache {
    /// Opens (creating if needed) a cache in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        let staging = dir.join(".staging");
        fs::create_dir_all(&staging).map_err(|e| Error::io("create cache directory", &staging, e))?;
        let probe =
            tempfile::NamedTempFile::new_in(&staging).map_err(|e| Error::io("write in cache directory", &dir, e))?;
        drop(probe);
        Ok(Self {
            dir,
            staging,
            _temporary: None,
        })
    }

    /// Opens `preferred`, or when it cannot be created or written, a fresh
    /// `dewy-*` folder under the system temporary directory (as the Go
    /// original does), logging a warning that names both folders. That
    /// folder is removed when the cache is dropped.
    pub fn open_or_fallback(preferred: impl Into<PathBuf>) -> Result<Opened, Error> {
        let preferred = preferred.into();
        match Self::open(&preferred) {
            Ok(cache) => Ok(Opened {
                cache,
                fallback_from: None,
            }),
            Err(err) => {
                let tmp = std::env::temp_dir();
                let temporary = tempfile::Builder::new()
                    .prefix("dewy-")
                    .tempdir_in(&tmp)
                    .map_err(|e| Error::io("create fallback cache directory in", &tmp, e))?;
                let fallback = temporary.path().to_path_buf();
                tracing::warn!(
                    cache_dir = %preferred.display(),
                    fallback = %fallback.display(),
                    error = %err,
                    "Cache directory unusable, falling back to a temporary directory"
                );
                let mut cache = Self::open(&fallback)?;
                cache._temporary = Some(std::sync::Arc::new(temporary));
                Ok(Opened {
                    cache,
                    fallback_from: Some((preferred, err)),
                })
            }
        }
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(key.as_str())
    }

    fn lock(&self) -> Result<File, Error> {
        let path = self.dir.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open lock file", &path, e))?;
        file.lock().map_err(|e| Error::io("lock", &path, e))?;
        Ok(file)
    }

    fn sync_dir(&self) -> Result<(), Error> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("sync directory", &self.dir, e))
    }

    fn write_blocking(&self, key: &Key, data: &[u8]) -> Result<(), Error> {
        let _lock = self.lock()?;
        self.replace_locked(key, data)
    }

    /// The version of the file under `key` (its inode and mtime: every
    /// write renames a new file into place), `None` when absent.
    fn version_of(&self, key: &Key) -> Result<Option<String>, Error> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path(key);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(format!("{}-{}.{}", m.ino(), m.mtime(), m.mtime_nsec()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    fn read_versioned_blocking(&self, key: &Key) -> Result<Option<crate::Versioned>, Error> {
        let _lock = self.lock()?;
        let Some(version) = self.version_of(key)? else {
            return Ok(None);
        };
        let path = self.path(key);
        let data = fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        Ok(Some(crate::Versioned { data, version }))
    }

    fn write_if_blocking(&self, key: &Key, data: &[u8], expected: Option<&str>) -> Result<String, Error> {
        let _lock = self.lock()?;
        if self.version_of(key)?.as_deref() != expected {
            return Err(Error::Conflict { key: key.to_string() });
        }
        self.replace_locked(key, data)?;
        Ok(self.version_of(key)?.unwrap_or_default())
    }

    /// Writes `data` under `key` (temporary file, fsync, rename); the
    /// caller holds the lock.
    fn replace_locked(&self, key: &Key, data: &[u8]) -> Result<(), Error> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)
            .map_err(|e| Error::io("create temporary file in", &self.dir, e))?;
        tmp.write_all(data).map_err(|e| Error::io("write", tmp.path(), e))?;
        tmp.as_file().sync_all().map_err(|e| Error::io("sync", tmp.path(), e))?;
        let dest = self.path(key);
        tmp.persist(&dest)
            .map_err(|e| Error::io("rename into", &dest, e.error))?;
        self.sync_dir()?;
        tracing::debug!(path = %dest.display(), "Write file");
        Ok(())
    }

    fn put_file_blocking(&self, key: &Key, src: &Path) -> Result<(), Error> {
        let _lock = self.lock()?;
        File::open(src)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("sync", src, e))?;
        let dest = self.path(key);
        if let Err(err) = fs::rename(src, &dest) {
            if err.kind() != std::io::ErrorKind::CrossesDevices {
                return Err(Error::io("rename into", &dest, err));
            }
            // Another filesystem: copy to a temporary file beside the
            // destination, then rename.
            let tmp = tempfile::Builder::new()
                .prefix(".tmp-")
                .tempfile_in(&self.dir)
                .map_err(|e| Error::io("create temporary file in", &self.dir, e))?;
            fs::copy(src, tmp.path()).map_err(|e| Error::io("copy", src, e))?;
            tmp.as_file().sync_all().map_err(|e| Error::io("sync", tmp.path(), e))?;
            tmp.persist(&dest)
                .map_err(|e| Error::io("rename into", &dest, e.error))?;
            let _ = fs::remove_file(src);
        }
        self.sync_dir()?;
        tracing::debug!(path = %dest.display(), "Write file");
        Ok(())
    }

    fn list_blocking(&self) -> Result<Vec<Entry>, Error> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io("list", &self.dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", &self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(key) = Key::new(name) else { continue };
            let meta = entry.metadata().map_err(|e| Error::io("stat", &entry.path(), e))?;
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().map_err(|e| Error::io("stat", &entry.path(), e))?;
            out.push(Entry {
                key,
                size: meta.len(),
                modified,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::io(
            "run blocking cache task for",
            Path::new("<cache>"),
            std::io::Error::other(e),
        )
    })?
}

#[async_trait::async_trait]
impl Cache for FileCache {
    async fn read(&self, key: &Key) -> Result<Option<Vec<u8>>, Error> {
        let path = self.path(key);
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    async fn write(&self, key: &Key, data: &[u8]) -> Result<(), Error> {
        let (this, key, data) = (self.clone(), key.clone(), data.to_vec());
        blocking(move || this.write_blocking(&key, &data)).await
    }

    async fn put_file(&self, key: &Key, src: &Path) -> Result<(), Error> {
        let (this, key, src) = (self.clone(), key.clone(), src.to_path_buf());
        blocking(move || this.put_file_blocking(&key, &src)).await
    }

    async fn local_path(&self, key: &Key) -> Result<Option<PathBuf>, Error> {
        let path = self.path(key);
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(path)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    async fn list(&self) -> Result<Vec<Entry>, Error> {
        let this = self.clone();
        blocking(move || this.list_blocking()).await
    }

    async fn read_versioned(&self, key: &Key) -> Result<Option<crate::Versioned>, Error> {
        let (this, key) = (self.clone(), key.clone());
        blocking(move || this.read_versioned_blocking(&key)).await
    }

    async fn write_if(&self, key: &Key, data: &[u8], expected: Option<&str>) -> Result<String, Error> {
        let (this, key, data, expected) = (self.clone(), key.clone(), data.to_vec(), expected.map(str::to_owned));
        blocking(move || this.write_if_blocking(&key, &data, expected.as_deref())).await
    }

    /// The file's mtime, which the kernel sets: on a shared mount, the
    /// file server's or the kernel's clock, not a process's idea of time.
    async fn written_at(&self, key: &Key) -> Result<Option<std::time::SystemTime>, Error> {
        let path = self.path(key);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(m.modified().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("delete", &path, e)),
        }
    }

    fn staging_dir(&self) -> &Path {
        &self.staging
    }
}
