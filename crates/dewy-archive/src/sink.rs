//! The writing side of an extraction: every entry goes through here, so the
//! safety policy and the limits live in one place.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::LimitKind;
use crate::{EntryKind, Error, Limits, ManifestEntry, Progress, UnsafeReason, path};

const MODE_MASK: u32 = 0o777 & !0o022;

pub(crate) struct Sink<'a> {
    root: &'a Path,
    limits: &'a Limits,
    compressed_size: u64,
    progress: Option<&'a dyn Progress>,
    entries: Vec<ManifestEntry>,
    written: HashSet<PathBuf>,
    files: HashSet<PathBuf>,
    links: HashMap<PathBuf, String>,
    link_order: Vec<PathBuf>,
    dir_modes: Vec<(PathBuf, u32)>,
    total: u64,
    buf: Vec<u8>,
    /// Start writeback of each file as soon as it is written (durable
    /// extraction: the final sync then only waits for the tail).
    pub(crate) writeback: bool,
    /// Set by the caller to stop the extraction between two blocks.
    pub(crate) cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(
        root: &'a Path,
        limits: &'a Limits,
        compressed_size: u64,
        progress: Option<&'a dyn Progress>,
    ) -> Self {
        Self {
            root,
            limits,
            compressed_size,
            progress,
            entries: Vec::new(),
            written: HashSet::new(),
            files: HashSet::new(),
            links: HashMap::new(),
            link_order: Vec::new(),
            dir_modes: Vec::new(),
            total: 0,
            buf: vec![0; 256 * 1024],
            writeback: false,
            cancel: None,
        }
    }

    /// Normalizes a raw entry name, refusing unsafe ones.
    pub(crate) fn name(raw: &[u8]) -> Result<PathBuf, Error> {
        path::normalize_entry(raw)
            .map_err(|reason| Error::unsafe_entry(String::from_utf8_lossy(raw).into_owned(), reason))
    }

    /// Like [`Sink::name`], but a directory entry naming the root itself
    /// (`./`, as `tar -C dir -czf x .` writes) is `None`, not an error.
    pub(crate) fn dir_name(raw: &[u8]) -> Result<Option<PathBuf>, Error> {
        match path::normalize_entry(raw) {
            Ok(p) => Ok(Some(p)),
            Err(UnsafeReason::EmptyName) => Ok(None),
            Err(reason) => Err(Error::unsafe_entry(String::from_utf8_lossy(raw).into_owned(), reason)),
        }
    }

    fn limit(&self, limit: LimitKind, limit_value: u64, entry: &Path) -> Error {
        Error::LimitExceeded {
            limit,
            limit_value,
            entry: entry.to_path_buf(),
        }
    }

    /// Counts an entry and checks that nothing above it is one of the
    /// archive's symbolic links.
    fn admit(&mut self, rel: &Path) -> Result<(), Error> {
        if self.entries.len() as u64 >= self.limits.max_entries {
            return Err(self.limit(LimitKind::Entries, self.limits.max_entries, rel));
        }
        for ancestor in rel.ancestors().skip(1) {
            if self.links.contains_key(ancestor) {
                return Err(Error::unsafe_entry(
                    rel,
                    UnsafeReason::ThroughSymlink(ancestor.to_path_buf()),
                ));
            }
        }
        if self.links.contains_key(rel) || self.files.contains(rel) {
            return Err(Error::unsafe_entry(rel, UnsafeReason::Duplicate));
        }
        Ok(())
    }

    fn make_parent(&mut self, rel: &Path) -> Result<(), Error> {
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            let abs = self.root.join(parent);
            fs::create_dir_all(&abs).map_err(|source| Error::io("create directory", &abs, source))?;
        }
        Ok(())
    }

    fn record(&mut self, path: PathBuf, kind: EntryKind, size: u64, mode: u32) {
        if let Some(progress) = self.progress {
            progress.on_entry(&path, self.total);
        }
        self.written.insert(path.clone());
        self.entries.push(ManifestEntry { path, kind, size, mode });
    }

    /// Writes a regular file from `reader`.
    pub(crate) fn file(&mut self, rel: &Path, mode: u32, reader: &mut dyn Read) -> Result<(), Error> {
        self.admit(rel)?;
        self.make_parent(rel)?;
        let abs = self.root.join(rel);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&abs)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => Error::unsafe_entry(rel, UnsafeReason::Duplicate),
                _ => Error::io("create file", &abs, source),
            })?;
        let mut size = 0u64;
        loop {
            if self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            {
                return Err(Error::Cancelled {
                    entry: rel.to_path_buf(),
                });
            }
            let n = match reader.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Corrupt {
                        archive: PathBuf::new(),
                        entry: Some(rel.to_path_buf()),
                        source,
                    });
                }
            };
            size += n as u64;
            self.total += n as u64;
            if size > self.limits.max_entry_bytes {
                return Err(self.limit(LimitKind::EntryBytes, self.limits.max_entry_bytes, rel));
            }
            if self.total > self.limits.max_total_bytes {
                return Err(self.limit(LimitKind::TotalBytes, self.limits.max_total_bytes, rel));
            }
            if self.total > self.limits.ratio_floor && self.total / self.compressed_size.max(1) > self.limits.max_ratio
            {
                return Err(self.limit(LimitKind::CompressionRatio, self.limits.max_ratio, rel));
            }
            out.write_all(&self.buf[..n])
                .map_err(|source| Error::io("write", &abs, source))?;
        }
        if self.writeback {
            // POSIX_FADV_DONTNEED starts writeback of the dirty pages without
            // waiting for it (pages still dirty or under writeback stay
            // cached). Only a hint: the final sync is what guarantees.
            let _ = rustix::fs::fadvise(&out, 0, None, rustix::fs::Advice::DontNeed);
        }
        let mode = mode & MODE_MASK;
        fs::set_permissions(&abs, fs::Permissions::from_mode(mode))
            .map_err(|source| Error::io("set permissions of", &abs, source))?;
        self.files.insert(rel.to_path_buf());
        self.record(rel.to_path_buf(), EntryKind::File, size, mode);
        Ok(())
    }

    /// Creates a directory; its mode is applied at the end.
    pub(crate) fn dir(&mut self, rel: &Path, mode: u32) -> Result<(), Error> {
        if self.written.contains(rel) && !self.files.contains(rel) && !self.links.contains_key(rel) {
            return Ok(()); // a repeated directory entry is harmless
        }
        self.admit(rel)?;
        let abs = self.root.join(rel);
        fs::create_dir_all(&abs).map_err(|source| Error::io("create directory", &abs, source))?;
        let mode = (mode & MODE_MASK) | 0o700;
        self.dir_modes.push((rel.to_path_buf(), mode));
        self.record(rel.to_path_buf(), EntryKind::Dir, 0, mode);
        Ok(())
    }

    /// Records a symbolic link; links are validated and created in
    /// [`Sink::finish`], after every file.
    pub(crate) fn symlink(&mut self, rel: &Path, raw_target: &[u8]) -> Result<(), Error> {
        let target = path::check_target(raw_target).map_err(|reason| Error::unsafe_entry(rel, reason))?;
        if Path::new(&target).is_absolute() {
            return Err(Error::unsafe_entry(rel, UnsafeReason::AbsoluteLinkTarget(target)));
        }
        self.admit(rel)?;
        if self.written.contains(rel) {
            return Err(Error::unsafe_entry(rel, UnsafeReason::Duplicate));
        }
        self.links.insert(rel.to_path_buf(), target);
        self.link_order.push(rel.to_path_buf());
        self.record(rel.to_path_buf(), EntryKind::Symlink, 0, 0o777);
        Ok(())
    }

    /// Creates a hard link to a file extracted earlier.
    pub(crate) fn hardlink(&mut self, rel: &Path, raw_target: &[u8]) -> Result<(), Error> {
        let target_str = String::from_utf8_lossy(raw_target).into_owned();
        let target = path::normalize_entry(raw_target)
            .map_err(|_| Error::unsafe_entry(rel, UnsafeReason::HardLinkTarget(target_str.clone())))?;
        if !self.files.contains(&target) {
            return Err(Error::unsafe_entry(rel, UnsafeReason::HardLinkTarget(target_str)));
        }
        self.admit(rel)?;
        self.make_parent(rel)?;
        let abs = self.root.join(rel);
        fs::hard_link(self.root.join(&target), &abs).map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => Error::unsafe_entry(rel, UnsafeReason::Duplicate),
            _ => Error::io("create hard link", &abs, source),
        })?;
        self.files.insert(rel.to_path_buf());
        self.record(rel.to_path_buf(), EntryKind::HardLink, 0, 0);
        Ok(())
    }

    /// Refuses a special entry (device, fifo, ...).
    pub(crate) fn special(rel: &Path, kind: &'static str) -> Error {
        Error::unsafe_entry(rel, UnsafeReason::SpecialFile(kind))
    }

    /// Validates and creates the links, applies directory modes deepest
    /// first, and returns the manifest entries.
    pub(crate) fn finish(mut self) -> Result<Vec<ManifestEntry>, Error> {
        let links = std::mem::take(&mut self.links);
        let lookup = |p: &Path| links.get(p).cloned();
        for rel in std::mem::take(&mut self.link_order) {
            let rel = rel.as_path();
            let target = &links[rel];
            let folder = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            path::resolve_link(&folder, target, &lookup, 0).map_err(|reason| Error::unsafe_entry(rel, reason))?;
            let abs = self.root.join(rel);
            self.make_parent(rel)?;
            std::os::unix::fs::symlink(target, &abs).map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => Error::unsafe_entry(rel, UnsafeReason::Duplicate),
                _ => Error::io("create symbolic link", &abs, source),
            })?;
        }
        self.dir_modes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, mode) in &self.dir_modes {
            let abs = self.root.join(rel);
            fs::set_permissions(&abs, fs::Permissions::from_mode(*mode))
                .map_err(|source| Error::io("set permissions of", &abs, source))?;
        }
        Ok(self.entries)
    }
}
