//! An in-memory cache with error injection, for dewy-core's unit tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::{Cache, Entry, Error, Key};

/// An in-memory [`Cache`]. Artifact files are kept as real files in a
/// private temporary folder so that [`Cache::local_path`] works.
#[derive(Debug)]
pub struct MemoryCache {
    dir: tempfile::TempDir,
    staging: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    values: BTreeMap<Key, (Vec<u8>, SystemTime)>,
    files: BTreeMap<Key, SystemTime>,
    fail_writes: usize,
    fail_reads: usize,
    writes: Vec<Key>,
}

impl Default for MemoryCache {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCache {
    /// An empty cache.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary folder for MemoryCache");
        let staging = dir.path().join(".staging");
        std::fs::create_dir_all(&staging).expect("create staging folder");
        Self {
            dir,
            staging,
            state: Mutex::new(State::default()),
        }
    }

    /// Makes the next `n` writes (and file puts) fail.
    pub fn fail_next_writes(&self, n: usize) {
        self.state.lock().unwrap().fail_writes = n;
    }

    /// Makes the next `n` reads fail.
    pub fn fail_next_reads(&self, n: usize) {
        self.state.lock().unwrap().fail_reads = n;
    }

    /// Makes `key` look written `by` earlier (storage-clock tests).
    pub fn backdate(&self, key: &Key, by: std::time::Duration) {
        if let Some((_, t)) = self.state.lock().unwrap().values.get_mut(key) {
            *t -= by;
        }
    }

    /// Every key written so far, in order.
    pub fn writes(&self) -> Vec<Key> {
        self.state.lock().unwrap().writes.clone()
    }

    fn take_failure(counter: &mut usize, what: &str) -> Result<(), Error> {
        if *counter > 0 {
            *counter -= 1;
            return Err(Error::Injected(what.to_owned()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Cache for MemoryCache {
    async fn read(&self, key: &Key) -> Result<Option<Vec<u8>>, Error> {
        let mut s = self.state.lock().unwrap();
        Self::take_failure(&mut s.fail_reads, "read")?;
        if let Some((v, _)) = s.values.get(key) {
            return Ok(Some(v.clone()));
        }
        if s.files.contains_key(key) {
            return std::fs::read(self.dir.path().join(key.as_str()))
                .map(Some)
                .map_err(|e| Error::io("read", Path::new(key.as_str()), e));
        }
        Ok(None)
    }

    async fn write(&self, key: &Key, data: &[u8]) -> Result<(), Error> {
        let mut s = self.state.lock().unwrap();
        Self::take_failure(&mut s.fail_writes, "write")?;
        s.values.insert(key.clone(), (data.to_vec(), SystemTime::now()));
        s.writes.push(key.clone());
        Ok(())
    }

    async fn put_file(&self, key: &Key, src: &Path) -> Result<(), Error> {
        let mut s = self.state.lock().unwrap();
        Self::take_failure(&mut s.fail_writes, "put_file")?;
        let dest = self.dir.path().join(key.as_str());
        std::fs::rename(src, &dest).map_err(|e| Error::io("rename into", &dest, e))?;
        s.files.insert(key.clone(), SystemTime::now());
        s.writes.push(key.clone());
        Ok(())
    }

    async fn local_path(&self, key: &Key) -> Result<Option<PathBuf>, Error> {
        let mut s = self.state.lock().unwrap();
        Self::take_failure(&mut s.fail_reads, "local_path")?;
        Ok(s.files.contains_key(key).then(|| self.dir.path().join(key.as_str())))
    }

    async fn list(&self) -> Result<Vec<Entry>, Error> {
        let mut s = self.state.lock().unwrap();
        Self::take_failure(&mut s.fail_reads, "list")?;
        let mut out: Vec<Entry> = s
            .values
            .iter()
            .map(|(k, (v, t))| Entry {
                key: k.clone(),
                size: v.len() as u64,
                modified: *t,
            })
            .chain(s.files.iter().map(|(k, t)| Entry {
                key: k.clone(),
                size: 0,
                modified: *t,
            }))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn read_versioned(&self, key: &Key) -> Result<Option<crate::Versioned>, Error> {
        let mut s = self.state.lock().unwrap();
        Self::take_failure(&mut s.fail_reads, "read")?;
        Ok(s.values.get(key).map(|(data, t)| crate::Versioned {
            data: data.clone(),
            version: version_of(*t),
        }))
    }

    async fn write_if(&self, key: &Key, data: &[u8], expected: Option<&str>) -> Result<String, Error> {
        let mut s = self.state.lock().unwrap();
        Self::take_failure(&mut s.fail_writes, "write")?;
        let current = s.values.get(key).map(|(_, t)| version_of(*t));
        if current.as_deref() != expected {
            return Err(Error::Conflict { key: key.to_string() });
        }
        // Versions are write times: make each one differ from the last.
        let mut at = SystemTime::now();
        if let Some((_, t)) = s.values.get(key)
            && at <= *t
        {
            at = *t + std::time::Duration::from_nanos(1);
        }
        s.values.insert(key.clone(), (data.to_vec(), at));
        s.writes.push(key.clone());
        Ok(version_of(at))
    }

    async fn written_at(&self, key: &Key) -> Result<Option<SystemTime>, Error> {
        Ok(self.state.lock().unwrap().values.get(key).map(|(_, t)| *t))
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        let mut s = self.state.lock().unwrap();
        s.values.remove(key);
        if s.files.remove(key).is_some() {
            let _ = std::fs::remove_file(self.dir.path().join(key.as_str()));
        }
        Ok(())
    }

    fn staging_dir(&self) -> &Path {
        &self.staging
    }
}

fn version_of(t: SystemTime) -> String {
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}
