//! Safe, bounded-memory extraction of untrusted release archives.
//!
//! dewy extracts whatever a registry hands it into a directory that a server
//! then runs from, so every archive is treated as hostile input. This crate is
//! small on purpose so that other tools can reuse it for the same job.
//!
//! # Contract
//!
//! [`Extractor::extract`] takes an archive file and a destination path that
//! must not exist yet. It extracts into a fresh staging directory next to the
//! destination (same filesystem) and renames the staging directory into place
//! only when every entry succeeded. On any error the staging directory is
//! removed and the destination still does not exist. On success it returns a
//! [`Manifest`] of what was written.
//!
//! Formats are detected from magic bytes ([`detect`]); the file name only
//! breaks ties: `.tar`, `.tar.gz`/`.tgz`, `.tar.bz2`/`.tbz2`, `.tar.xz`/`.txz`,
//! `.tar.zst`/`.tzst`, `.zip`, and a single executable (ELF, Mach-O or `#!`
//! script), bare or compressed with gzip, bzip2, xz or zstd. A single file is
//! placed as one file with its executable bit set.
//!
//! # Safety policy (fails closed)
//!
//! Every refusal is an [`Error::UnsafeEntry`] naming the entry and the
//! [`UnsafeReason`]; nothing is silently skipped:
//!
//! - absolute paths, `..` that leaves the root, NUL or control characters and
//!   non-UTF-8 bytes in names;
//! - device, fifo and other special entries;
//! - hard links whose target is outside the tree or not extracted yet;
//! - symbolic links that are absolute or whose target, resolved lexically from
//!   the link's own folder (following the archive's other links), leaves the
//!   root; links are created after every file, so nothing is ever written
//!   through one, and an entry below a link is refused;
//! - files are created with `create_new`; setuid, setgid and sticky bits are
//!   dropped, modes are masked with `0o022`, owners are never applied, and
//!   directory modes are applied at the end.
//!
//! [`Limits`] bound the total unpacked size, the entry count, the size of one
//! entry and the compression ratio, checked while bytes stream, so a
//! decompression bomb is refused early instead of after filling the disk.
//!
//! # What this crate must never do
//!
//! No network I/O, no global state, no process spawning, and no writes outside
//! the staging directory and the final rename to the destination.
//!
//! # Example
//!
//! ```no_run
//! use dewy_archive::{Extractor, Limits};
//! let manifest = Extractor::new(Limits::default())
//!     .extract("app_linux_amd64.tar.gz".as_ref(), "releases/20240115T103045Z".as_ref())?;
//! println!("{} entries, {} bytes", manifest.entries.len(), manifest.total_bytes());
//! # Ok::<(), dewy_archive::Error>(())
//! ```

#![deny(missing_docs)]

mod error;
mod format;
mod limits;
mod path;
mod sink;
mod tarball;
mod zipfile;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

pub use error::{Error, LimitKind, UnsafeReason};
pub use format::{Compression, Format, detect};
pub use limits::Limits;

/// What one extracted entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A relative symbolic link that stays inside the tree.
    Symlink,
    /// A hard link to an earlier file of the same archive.
    HardLink,
}

/// One entry of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Path relative to the destination, normalized (no `.` or `..`).
    pub path: PathBuf,
    /// What was written.
    pub kind: EntryKind,
    /// Bytes written (0 for directories and links).
    pub size: u64,
    /// Permission bits applied (after masking).
    pub mode: u32,
}

/// What an extraction wrote, in archive order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The detected format of the source.
    pub format: Option<Format>,
    /// Every entry written.
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Sum of the sizes of regular files.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Number of entries of the given kind.
    pub fn count(&self, kind: EntryKind) -> usize {
        self.entries.iter().filter(|e| e.kind == kind).count()
    }
}

/// Observer of extraction progress; the library never draws anything itself.
pub trait Progress: Send + Sync {
    /// Called after each entry with the bytes unpacked so far.
    fn on_entry(&self, _path: &Path, _unpacked_total: u64) {}
}

/// Extracts archives under a [`Limits`] policy.
#[derive(Debug, Clone)]
pub struct Extractor {
    limits: Limits,
    durable: bool,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Extractor {
    /// An extractor with the given limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            durable: false,
            cancel: None,
        }
    }

    /// Stops the extraction (with [`Error::Cancelled`], nothing left at the
    /// destination) once `flag` is set, checked between blocks of 256 KiB:
    /// a caller shutting down need not wait for a large archive.
    pub fn cancel_on(mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// With `true`, the extracted tree is on disk when extraction returns:
    /// writeback of each file starts as soon as it is written, and one
    /// `syncfs(2)` of the destination's filesystem plus an fsync of its
    /// parent folder (the rename) end the extraction. Without it, the tree
    /// may still be in the page cache only, and a power cut may leave empty
    /// files behind (ext4's delayed allocation).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Extracts `archive` into `dest`, which must not exist.
    ///
    /// See the crate documentation for the guarantees.
    pub fn extract(&self, archive: &Path, dest: &Path) -> Result<Manifest, Error> {
        self.extract_with_progress(archive, dest, None)
    }

    /// Like [`Extractor::extract`], reporting progress to `progress`.
    pub fn extract_with_progress(
        &self,
        archive: &Path,
        dest: &Path,
        progress: Option<&dyn Progress>,
    ) -> Result<Manifest, Error> {
        if dest.symlink_metadata().is_ok() {
            return Err(Error::DestinationExists {
                path: dest.to_path_buf(),
            });
        }
        let format = detect(archive)?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let staging = tempfile::Builder::new()
            .prefix(".dewy-extract-")
            .tempdir_in(&parent)
            .map_err(|source| Error::io("create staging directory in", &parent, source))?;
        let compressed_size = std::fs::metadata(archive)
            .map_err(|source| Error::io("read metadata of", archive, source))?
            .len();
        let mut sink = sink::Sink::new(staging.path(), &self.limits, compressed_size, progress);
        sink.writeback = self.durable;
        sink.cancel = self.cancel.clone();
        let result = self.unpack(archive, format, &mut sink).map_err(|e| match e {
            Error::Corrupt {
                archive: a,
                entry,
                source,
            } if a.as_os_str().is_empty() => Error::Corrupt {
                archive: archive.to_path_buf(),
                entry,
                source,
            },
            other => other,
        });
        let result = result.and_then(|()| sink.finish());
        match result {
            Ok(entries) => {
                let staging = staging.keep();
                std::fs::rename(&staging, dest).map_err(|source| {
                    let _ = std::fs::remove_dir_all(&staging);
                    Error::io("rename staging directory to", dest, source)
                })?;
                if self.durable {
                    sync_tree(dest, &parent)?;
                }
                tracing::debug!(dest = %dest.display(), entries = entries.len(), "Extracted archive");
                Ok(Manifest {
                    format: Some(format),
                    entries,
                })
            }
            // Dropping `staging` removes the partial tree.
            Err(err) => Err(err),
        }
    }

    fn unpack(&self, archive: &Path, format: Format, sink: &mut sink::Sink<'_>) -> Result<(), Error> {
        let open = || {
            File::open(archive)
                .map(|f| BufReader::with_capacity(256 * 1024, f))
                .map_err(|source| Error::io("open", archive, source))
        };
        match format {
            Format::Zip => zipfile::unpack(archive, sink),
            Format::Tar(compression) => {
                let reader = format::decoder(compression, open()?)?;
                tarball::unpack(reader, sink)
            }
            Format::SingleFile(compression) => {
                let mut reader: Box<dyn Read> = format::decoder(compression, open()?)?;
                let name = format::single_file_name(archive, compression);
                sink.file(Path::new(&name), 0o755, &mut reader)
            }
        }
    }
}

/// Makes the tree at `dest` and its name in `parent` durable.
fn sync_tree(dest: &Path, parent: &Path) -> Result<(), Error> {
    let dir = File::open(dest).map_err(|source| Error::io("open", dest, source))?;
    rustix::fs::syncfs(&dir).map_err(|e| Error::io("sync the filesystem of", dest, e.into()))?;
    File::open(parent)
        .and_then(|p| p.sync_all())
        .map_err(|source| Error::io("sync", parent, source))
}

impl Default for Extractor {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}
