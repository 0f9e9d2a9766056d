//! Tar streams (plain or behind a decoder).

use std::io::Read;
use std::path::PathBuf;

use tar::EntryType;

use crate::Error;
use crate::sink::Sink;

fn corrupt(entry: Option<PathBuf>, source: std::io::Error) -> Error {
    Error::Corrupt {
        archive: PathBuf::new(),
        entry,
        source,
    }
}

pub(crate) fn unpack(reader: impl Read, sink: &mut Sink<'_>) -> Result<(), Error> {
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|e| corrupt(None, e))?;
    let mut last: Option<PathBuf> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(last.clone(), e))?;
        let raw = entry.path_bytes().into_owned();
        if entry.header().entry_type() == EntryType::Directory && Sink::dir_name(&raw)?.is_none() {
            continue; // the root itself (`./`)
        }
        let rel = Sink::name(&raw)?;
        last = Some(rel.clone());
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644);
        match header.entry_type() {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                sink.file(&rel, mode, &mut entry)?;
            }
            EntryType::Directory => sink.dir(&rel, mode)?,
            EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                sink.symlink(&rel, &target)?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                sink.hardlink(&rel, &target)?;
            }
            EntryType::Char => return Err(Sink::special(&rel, "character device")),
            EntryType::Block => return Err(Sink::special(&rel, "block device")),
            EntryType::Fifo => return Err(Sink::special(&rel, "fifo")),
            // PAX and GNU long-name headers are consumed by the tar crate.
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink => {}
            _ => return Err(Sink::special(&rel, "unknown tar entry type")),
        }
    }
    Ok(())
}
