//! The error type of dewy-archive.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnsafeReason {
    /// The name is an absolute path.
    AbsolutePath,
    /// A `..` component leaves the extraction root.
    EscapesRoot,
    /// The name holds a NUL or another control character.
    ControlCharacter,
    /// The name is not valid UTF-8.
    NonUtf8Name,
    /// The name is empty after normalization.
    EmptyName,
    /// A device, fifo or other special file.
    SpecialFile(&'static str),
    /// A symbolic link with an absolute target.
    AbsoluteLinkTarget(String),
    /// A symbolic link whose target leaves the root.
    LinkEscapesRoot(String),
    /// A hard link whose target is outside the tree or not extracted yet.
    HardLinkTarget(String),
    /// The entry would be written through a symbolic link of the archive.
    ThroughSymlink(PathBuf),
    /// The entry's path was already written by an earlier entry.
    Duplicate,
    /// Symbolic links refer to each other in a loop or too deeply.
    LinkLoop,
}

impl fmt::Display for UnsafeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AbsolutePath => f.write_str("absolute path"),
            Self::EscapesRoot => f.write_str("path escapes the extraction root"),
            Self::ControlCharacter => f.write_str("name contains a NUL or control character"),
            Self::NonUtf8Name => f.write_str("name is not valid UTF-8"),
            Self::EmptyName => f.write_str("empty name"),
            Self::SpecialFile(kind) => write!(f, "{kind} entries are not allowed"),
            Self::AbsoluteLinkTarget(t) => write!(f, "symbolic link to absolute path `{t}`"),
            Self::LinkEscapesRoot(t) => write!(f, "symbolic link target `{t}` escapes the extraction root"),
            Self::HardLinkTarget(t) => write!(f, "hard link target `{t}` is outside the tree or not extracted yet"),
            Self::ThroughSymlink(p) => write!(f, "would be written through symbolic link `{}`", p.display()),
            Self::Duplicate => f.write_str("path already written by an earlier entry"),
            Self::LinkLoop => f.write_str("symbolic links loop or nest too deeply"),
        }
    }
}

/// A limit of [`crate::Limits`] that an archive exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitKind {
    /// Total unpacked bytes.
    TotalBytes,
    /// Number of entries.
    Entries,
    /// Size of one entry.
    EntryBytes,
    /// Ratio of unpacked to compressed bytes.
    CompressionRatio,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TotalBytes => "total unpacked bytes",
            Self::Entries => "number of entries",
            Self::EntryBytes => "size of one entry",
            Self::CompressionRatio => "compression ratio",
        })
    }
}

/// Everything that can go wrong while extracting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An entry was refused by the safety policy.
    #[error("unsafe archive entry `{}`: {reason}", entry.display())]
    UnsafeEntry {
        /// The entry's name as stored in the archive (lossy if not UTF-8).
        entry: PathBuf,
        /// Why it was refused.
        reason: UnsafeReason,
    },
    /// A limit was exceeded (a decompression bomb or an oversized archive).
    #[error("archive exceeds the limit on {limit} ({limit_value}) at entry `{}`", entry.display())]
    LimitExceeded {
        /// Which limit.
        limit: LimitKind,
        /// The configured value.
        limit_value: u64,
        /// The entry being written when it was exceeded.
        entry: PathBuf,
    },
    /// The file is not an archive format this crate knows.
    #[error("unknown archive format of `{}`: {seen}", path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// What its first bytes looked like.
        seen: String,
    },
    /// The archive is truncated or corrupt.
    #[error("corrupt or truncated archive `{}`{}", archive.display(), entry.as_ref().map(|e| format!(" at entry `{}`", e.display())).unwrap_or_default())]
    Corrupt {
        /// The archive file.
        archive: PathBuf,
        /// The entry being read, when known.
        entry: Option<PathBuf>,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// The destination already exists; extraction never merges into a tree.
    #[error("destination `{}` already exists", path.display())]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },
    /// The caller cancelled the extraction ([`crate::Extractor::cancel_on`]);
    /// nothing was left at the destination.
    #[error("extraction cancelled at entry `{}`", entry.display())]
    Cancelled {
        /// The entry being written.
        entry: PathBuf,
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
}

impl Error {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn unsafe_entry(entry: impl Into<PathBuf>, reason: UnsafeReason) -> Self {
        Self::UnsafeEntry {
            entry: entry.into(),
            reason,
        }
    }

    /// The reason, when this is an [`Error::UnsafeEntry`].
    pub fn unsafe_reason(&self) -> Option<&UnsafeReason> {
        match self {
            Self::UnsafeEntry { reason, .. } => Some(reason),
            _ => None,
        }
    }
}
