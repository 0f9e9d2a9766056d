//! Zip archives, read entry by entry (never the crate's bulk `extract`).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::Error;
use crate::sink::Sink;

const S_IFMT: u32 = 0o170_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

fn corrupt(archive: &Path, entry: Option<PathBuf>, source: zip::result::ZipError) -> Error {
    let source = match source {
        zip::result::ZipError::Io(e) => e,
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
    };
    Error::Corrupt {
        archive: archive.to_path_buf(),
        entry,
        source,
    }
}

pub(crate) fn unpack(archive: &Path, sink: &mut Sink<'_>) -> Result<(), Error> {
    let file = File::open(archive).map_err(|source| Error::io("open", archive, source))?;
    let mut zip =
        zip::ZipArchive::new(BufReader::with_capacity(32 * 1024, file)).map_err(|e| corrupt(archive, None, e))?;
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(|e| corrupt(archive, None, e))?;
        let raw = entry.name_raw().to_vec();
        if entry.is_dir() && Sink::dir_name(&raw)?.is_none() {
            continue; // the root itself
        }
        let rel = Sink::name(&raw)?;
        let unix = entry.unix_mode();
        let kind = unix.map(|m| m & S_IFMT);
        if entry.is_symlink() || kind == Some(S_IFLNK) {
            let mut target = Vec::new();
            entry
                .by_ref()
                .take(4096)
                .read_to_end(&mut target)
                .map_err(|e| corrupt(archive, Some(rel.clone()), e.into()))?;
            sink.symlink(&rel, &target)?;
        } else if entry.is_dir() || kind == Some(S_IFDIR) {
            sink.dir(&rel, unix.unwrap_or(0o755))?;
        } else if matches!(kind, None | Some(0) | Some(S_IFREG)) {
            sink.file(&rel, unix.unwrap_or(0o644), &mut entry)
                .map_err(|e| match e {
                    Error::Corrupt { entry, source, .. } => Error::Corrupt {
                        archive: archive.to_path_buf(),
                        entry,
                        source,
                    },
                    other => other,
                })?;
        } else {
            return Err(Sink::special(&rel, "special file"));
        }
    }
    Ok(())
}
