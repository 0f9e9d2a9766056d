//! Format detection from magic bytes, and decoders.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::Error;

/// A compression layer around a tar stream or a single file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// No compression.
    None,
    /// gzip.
    Gzip,
    /// bzip2.
    Bzip2,
    /// xz.
    Xz,
    /// Zstandard.
    Zstd,
}

/// A detected archive format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A tar stream, possibly compressed.
    Tar(Compression),
    /// A zip archive.
    Zip,
    /// One file (an executable), possibly compressed.
    SingleFile(Compression),
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, c) = match self {
            Self::Zip => return f.write_str("zip"),
            Self::Tar(c) => ("tar", c),
            Self::SingleFile(c) => ("single file", c),
        };
        match c {
            Compression::None => f.write_str(kind),
            Compression::Gzip => write!(f, "{kind}+gzip"),
            Compression::Bzip2 => write!(f, "{kind}+bzip2"),
            Compression::Xz => write!(f, "{kind}+xz"),
            Compression::Zstd => write!(f, "{kind}+zstd"),
        }
    }
}

const GZIP: &[u8] = &[0x1f, 0x8b];
const BZIP2: &[u8] = b"BZh";
const XZ: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const ZIP: &[&[u8]] = &[b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"];

fn compression_of(head: &[u8]) -> Option<Compression> {
    if head.starts_with(GZIP) {
        Some(Compression::Gzip)
    } else if head.starts_with(BZIP2) {
        Some(Compression::Bzip2)
    } else if head.starts_with(XZ) {
        Some(Compression::Xz)
    } else if head.starts_with(ZSTD) {
        Some(Compression::Zstd)
    } else {
        None
    }
}

/// True when `block` looks like a tar header: a `ustar` magic, or a valid
/// header checksum (old V7 archives have no magic).
fn is_tar_header(block: &[u8]) -> bool {
    if block.len() < 512 {
        return false;
    }
    if &block[257..262] == b"ustar" {
        return true;
    }
    let stored = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let Some(stored) = stored else { return false };
    let sum: u32 = block[..512]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                u32::from(b' ')
            } else {
                u32::from(*b)
            }
        })
        .sum();
    sum == stored && block[0] != 0
}

fn is_executable(head: &[u8]) -> bool {
    const MACHO: &[[u8; 4]] = &[
        [0xfe, 0xed, 0xfa, 0xce],
        [0xfe, 0xed, 0xfa, 0xcf],
        [0xce, 0xfa, 0xed, 0xfe],
        [0xcf, 0xfa, 0xed, 0xfe],
        [0xca, 0xfe, 0xba, 0xbe],
    ];
    head.starts_with(b"\x7fELF") || head.starts_with(b"#!") || MACHO.iter().any(|m| head.starts_with(m))
}

fn name_says_tar(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        ".tar", ".tgz", ".tbz2", ".tbz", ".txz", ".tzst", ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst",
    ]
    .iter()
    .any(|ext| n.ends_with(ext))
}

fn read_head(reader: &mut impl Read, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    reader.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

fn describe(head: &[u8]) -> String {
    if head.is_empty() {
        return "the file is empty".to_owned();
    }
    let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("first bytes are {}", hex.join(" "))
}

/// Detects the format of `path` from its magic bytes.
///
/// For a compressed stream the first block after decompression decides
/// between a tar archive and a single file; the name (`.tar.gz`, `.tgz`, ...)
/// only breaks a tie when that block is too short to tell.
pub fn detect(path: &Path) -> Result<Format, Error> {
    let mut file = File::open(path).map_err(|source| Error::io("open", path, source))?;
    let head = read_head(&mut file, 512).map_err(|source| Error::io("read", path, source))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if ZIP.iter().any(|m| head.starts_with(m)) {
        return Ok(Format::Zip);
    }
    if let Some(compression) = compression_of(&head) {
        let file = File::open(path).map_err(|source| Error::io("open", path, source))?;
        let mut decoder = decoder(compression, BufReader::new(file))?;
        let inner = read_head(&mut decoder, 512).map_err(|source| Error::Corrupt {
            archive: path.to_path_buf(),
            entry: None,
            source,
        })?;
        if is_tar_header(&inner) || (inner.len() < 512 && name_says_tar(&name) && inner.iter().all(|b| *b == 0)) {
            return Ok(Format::Tar(compression));
        }
        if is_executable(&inner) {
            return Ok(Format::SingleFile(compression));
        }
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            seen: format!(
                "{compression:?}-compressed data that is neither a tar archive nor an executable ({})",
                describe(&inner)
            ),
        });
    }
    if is_tar_header(&head) {
        return Ok(Format::Tar(Compression::None));
    }
    if is_executable(&head) {
        return Ok(Format::SingleFile(Compression::None));
    }
    Err(Error::UnknownFormat {
        path: path.to_path_buf(),
        seen: describe(&head),
    })
}

/// A reader that decompresses `inner`.
pub(crate) fn decoder<'a, R: BufRead + Send + 'a>(
    compression: Compression,
    inner: R,
) -> Result<Box<dyn Read + Send + 'a>, Error> {
    Ok(match compression {
        Compression::None => Box::new(inner),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(inner)),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(inner)),
        Compression::Xz => Box::new(lzma_rust2::XzReader::new(inner, true)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(inner)
                .map_err(|source| Error::io("start zstd decoder for", Path::new("<archive>"), source))?,
        ),
    })
}

/// The name a single-file artifact is placed under: the archive's name
/// without its compression suffix.
pub(crate) fn single_file_name(archive: &Path, compression: Compression) -> String {
    let name = archive
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "app".to_owned());
    let suffixes: &[&str] = match compression {
        Compression::None => &[],
        Compression::Gzip => &[".gz"],
        Compression::Bzip2 => &[".bz2"],
        Compression::Xz => &[".xz"],
        Compression::Zstd => &[".zst", ".zstd"],
    };
    for s in suffixes {
        if let Some(stem) = name.strip_suffix(s)
            && !stem.is_empty()
        {
            return stem.to_owned();
        }
    }
    name
}
