//! Integration tests of dewy-archive: malicious archives built in the test,
//! and positive cases for every format.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use dewy_archive::{Compression, Error, Extractor, Format, LimitKind, Limits, UnsafeReason};

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
    fn extract(&self, archive: &Path) -> Result<dewy_archive::Manifest, Error> {
        self.extract_with(archive, Limits::default())
    }
    fn extract_with(&self, archive: &Path, limits: Limits) -> Result<dewy_archive::Manifest, Error> {
        let dest = self.path("out/release");
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        Extractor::new(limits).extract(archive, &dest)
    }
    /// After a refused extraction nothing may exist but the (empty) parent.
    fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.path("out"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        assert!(!self.dir.path().parent().unwrap().join("evil").exists());
        assert!(!self.path("evil").exists());
    }
}

/// A raw tar entry: the name bytes are written unchecked so that malicious
/// names can be built.
enum Raw<'a> {
    File(&'a [u8], &'a [u8], u32),
    Dir(&'a [u8]),
    Symlink(&'a [u8], &'a [u8]),
    HardLink(&'a [u8], &'a [u8]),
    Special(&'a [u8], tar::EntryType),
}

fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_old();
        let (name, ty, data, link, mode): (&[u8], _, &[u8], Option<&[u8]>, u32) = match e {
            Raw::File(n, d, m) => (n, tar::EntryType::Regular, d, None, *m),
            Raw::Dir(n) => (n, tar::EntryType::Directory, b"", None, 0o755),
            Raw::Symlink(n, t) => (n, tar::EntryType::Symlink, b"", Some(t), 0o777),
            Raw::HardLink(n, t) => (n, tar::EntryType::Link, b"", Some(t), 0o644),
            Raw::Special(n, ty) => (n, *ty, b"", None, 0o644),
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}
fn bz2(data: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}
fn zst(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}
fn xz(data: &[u8]) -> Vec<u8> {
    let mut w = lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::with_preset(1)).unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

fn zip_of(entries: &[(&str, &[u8], Option<u32>)], symlinks: &[(&str, &str)]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data, mode) in entries {
        let mut o = zip::write::SimpleFileOptions::default();
        if let Some(m) = mode {
            o = o.unix_permissions(*m);
        }
        z.start_file(*name, o).unwrap();
        z.write_all(data).unwrap();
    }
    for (name, target) in symlinks {
        z.add_symlink(*name, *target, zip::write::SimpleFileOptions::default())
            .unwrap();
    }
    z.finish().unwrap().into_inner()
}

fn reason(result: Result<dewy_archive::Manifest, Error>) -> UnsafeReason {
    match result {
        Err(Error::UnsafeEntry { reason, .. }) => reason,
        other => panic!("expected an unsafe entry error, got {other:?}"),
    }
}

#[test]
fn malicious_tars_are_refused_and_leave_nothing() {
    type Check = fn(&UnsafeReason) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        ("zip-slip", raw_tar(&[Raw::File(b"../evil", b"x", 0o644)]), |r| {
            *r == UnsafeReason::EscapesRoot
        }),
        (
            "deep zip-slip",
            raw_tar(&[Raw::File(b"a/../../evil", b"x", 0o644)]),
            |r| *r == UnsafeReason::EscapesRoot,
        ),
        ("absolute path", raw_tar(&[Raw::File(b"/tmp/evil", b"x", 0o644)]), |r| {
            *r == UnsafeReason::AbsolutePath
        }),
        (
            "file through symlink",
            raw_tar(&[Raw::Symlink(b"link", b"sub"), Raw::File(b"link/evil", b"x", 0o644)]),
            |r| matches!(r, UnsafeReason::ThroughSymlink(_)),
        ),
        ("absolute symlink", raw_tar(&[Raw::Symlink(b"link", b"/etc")]), |r| {
            matches!(r, UnsafeReason::AbsoluteLinkTarget(_))
        }),
        (
            "escaping symlink",
            raw_tar(&[Raw::Symlink(b"a/link", b"../../etc")]),
            |r| matches!(r, UnsafeReason::LinkEscapesRoot(_)),
        ),
        (
            "symlink chain escaping in two hops",
            raw_tar(&[
                Raw::Dir(b"a"),
                Raw::Symlink(b"a/up", b".."),
                Raw::Symlink(b"out", b"a/up/.."),
            ]),
            |r| matches!(r, UnsafeReason::LinkEscapesRoot(_)),
        ),
        (
            "hard link outside",
            raw_tar(&[Raw::HardLink(b"h", b"../../etc/passwd")]),
            |r| matches!(r, UnsafeReason::HardLinkTarget(_)),
        ),
        (
            "hard link before target",
            raw_tar(&[Raw::HardLink(b"h", b"later"), Raw::File(b"later", b"x", 0o644)]),
            |r| matches!(r, UnsafeReason::HardLinkTarget(_)),
        ),
        (
            "char device",
            raw_tar(&[Raw::Special(b"dev", tar::EntryType::Char)]),
            |r| matches!(r, UnsafeReason::SpecialFile(_)),
        ),
        (
            "block device",
            raw_tar(&[Raw::Special(b"dev", tar::EntryType::Block)]),
            |r| matches!(r, UnsafeReason::SpecialFile(_)),
        ),
        ("fifo", raw_tar(&[Raw::Special(b"fifo", tar::EntryType::Fifo)]), |r| {
            matches!(r, UnsafeReason::SpecialFile(_))
        }),
        ("NUL in name", raw_tar(&[Raw::File(b"a\x01b", b"x", 0o644)]), |r| {
            *r == UnsafeReason::ControlCharacter
        }),
        ("non-UTF-8 name", raw_tar(&[Raw::File(b"caf\xe9", b"x", 0o644)]), |r| {
            *r == UnsafeReason::NonUtf8Name
        }),
        (
            "duplicate file",
            raw_tar(&[Raw::File(b"a", b"x", 0o644), Raw::File(b"a", b"y", 0o644)]),
            |r| *r == UnsafeReason::Duplicate,
        ),
    ];
    for (name, tar, check) in cases {
        for (ext, bytes) in [("tar", tar.clone()), ("tar.gz", gz(&tar))] {
            let case = Case::new();
            let archive = case.write(&format!("a.{ext}"), &bytes);
            let r = reason(case.extract(&archive));
            assert!(check(&r), "{name} ({ext}): unexpected reason {r:?}");
            case.assert_clean();
        }
    }
}

#[test]
fn malicious_zips_are_refused() {
    let case = Case::new();
    let archive = case.write("slip.zip", &zip_of(&[("../evil", b"x", None)], &[]));
    assert_eq!(reason(case.extract(&archive)), UnsafeReason::EscapesRoot);
    case.assert_clean();

    let case = Case::new();
    let archive = case.write("abs.zip", &zip_of(&[("/evil", b"x", None)], &[]));
    assert_eq!(reason(case.extract(&archive)), UnsafeReason::AbsolutePath);
    case.assert_clean();

    let case = Case::new();
    let archive = case.write("link.zip", &zip_of(&[], &[("l", "/etc/passwd")]));
    assert!(matches!(
        reason(case.extract(&archive)),
        UnsafeReason::AbsoluteLinkTarget(_)
    ));
    case.assert_clean();

    let case = Case::new();
    let archive = case.write("through.zip", &zip_of(&[("l/evil", b"x", None)], &[("l", "sub")]));
    // The symlink entry comes last in this archive, so the file's folder
    // already exists when the link is created: refused as a collision.
    assert!(case.extract(&archive).is_err());
    case.assert_clean();
}

fn limit_of(result: Result<dewy_archive::Manifest, Error>) -> LimitKind {
    match result {
        Err(Error::LimitExceeded { limit, .. }) => limit,
        other => panic!("expected a limit error, got {other:?}"),
    }
}

#[test]
fn bombs_of_every_format_are_refused_early() {
    let zeros = vec![0u8; 8 << 20];
    let tar = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(zeros.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "zeros", zeros.as_slice()).unwrap();
        b.into_inner().unwrap()
    };
    let limits = Limits {
        max_ratio: 20,
        ratio_floor: 1 << 20,
        ..Limits::default()
    };
    for (ext, bytes) in [
        ("tar.gz", gz(&tar)),
        ("tar.bz2", bz2(&tar)),
        ("tar.xz", xz(&tar)),
        ("tar.zst", zst(&tar)),
    ] {
        let case = Case::new();
        let archive = case.write(&format!("bomb.{ext}"), &bytes);
        assert_eq!(
            limit_of(case.extract_with(&archive, limits)),
            LimitKind::CompressionRatio,
            "{ext}"
        );
        case.assert_clean();
    }
    let case = Case::new();
    let archive = case.write("bomb.zip", &zip_of(&[("zeros", &zeros, None)], &[]));
    assert_eq!(
        limit_of(case.extract_with(&archive, limits)),
        LimitKind::CompressionRatio
    );
    case.assert_clean();

    let case = Case::new();
    let archive = case.write("big.tar", &tar);
    let small = Limits {
        max_total_bytes: 1 << 20,
        ..Limits::default()
    };
    assert_eq!(limit_of(case.extract_with(&archive, small)), LimitKind::TotalBytes);
    let small = Limits {
        max_entry_bytes: 1 << 20,
        ..Limits::default()
    };
    assert_eq!(limit_of(case.extract_with(&archive, small)), LimitKind::EntryBytes);
    case.assert_clean();

    let many: Vec<_> = (0..20).map(|i| format!("f{i}")).collect();
    let many_tar = raw_tar(
        &many
            .iter()
            .map(|n| Raw::File(n.as_bytes(), b"x", 0o644))
            .collect::<Vec<_>>(),
    );
    let case = Case::new();
    let archive = case.write("many.tar", &many_tar);
    let few = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    assert_eq!(limit_of(case.extract_with(&archive, few)), LimitKind::Entries);
    case.assert_clean();
}

#[test]
fn truncated_and_corrupt_archives_are_refused() {
    let mut b = tar::Builder::new(Vec::new());
    let data = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<_>>();
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "data.bin", data.as_slice()).unwrap();
    let tar = b.into_inner().unwrap();
    for (ext, bytes) in [
        ("tar", tar.clone()),
        ("tar.gz", gz(&tar)),
        ("tar.bz2", bz2(&tar)),
        ("tar.xz", xz(&tar)),
        ("tar.zst", zst(&tar)),
        ("zip", zip_of(&[("data.bin", &data, None)], &[])),
    ] {
        let case = Case::new();
        let archive = case.write(&format!("cut.{ext}"), &bytes[..bytes.len() / 2]);
        let err = case.extract(&archive).unwrap_err();
        assert!(
            matches!(err, Error::Corrupt { .. } | Error::UnknownFormat { .. }),
            "{ext}: {err:?}"
        );
        case.assert_clean();
    }
    // A tar header whose checksum is wrong.
    let mut bad = tar.clone();
    bad[148] = b'7';
    bad[149] = b'7';
    let case = Case::new();
    let archive = case.write("bad.tar", &gz(&bad));
    assert!(case.extract(&archive).is_err());
    case.assert_clean();
}

#[test]
fn unknown_format_names_the_file_and_what_was_seen() {
    let case = Case::new();
    let archive = case.write("notes.txt", b"hello world");
    let err = case.extract(&archive).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("notes.txt") && text.contains("68 65 6c 6c"), "{text}");
}

fn tree_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let long = format!("{}/{}", "d".repeat(120), "long-file-name-".repeat(10));
    let mut add = |path: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    };
    add("bin/app", b"#!/bin/sh\necho hi\n", 0o4755);
    add("empty", b"", 0o644);
    add(&long, b"long", 0o666);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_cksum();
    b.append_data(&mut h, "emptydir", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_cksum();
    b.append_link(&mut h, "bin/run", "app").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_cksum();
    b.append_link(&mut h, "hard", "empty").unwrap();
    b.into_inner().unwrap()
}

#[test]
fn tree_is_extracted_in_every_tar_format() {
    let tar = tree_tar();
    let long = format!("{}/{}", "d".repeat(120), "long-file-name-".repeat(10));
    for (ext, bytes, format) in [
        ("tar", tar.clone(), Format::Tar(Compression::None)),
        ("tar.gz", gz(&tar), Format::Tar(Compression::Gzip)),
        ("tbz2", bz2(&tar), Format::Tar(Compression::Bzip2)),
        ("tar.xz", xz(&tar), Format::Tar(Compression::Xz)),
        ("tar.zst", zst(&tar), Format::Tar(Compression::Zstd)),
        // The name is wrong on purpose: magic bytes decide.
        ("zip", gz(&tar), Format::Tar(Compression::Gzip)),
    ] {
        let case = Case::new();
        let archive = case.write(&format!("app.{ext}"), &bytes);
        let m = case.extract(&archive).unwrap_or_else(|e| panic!("{ext}: {e}"));
        assert_eq!(m.format, Some(format), "{ext}");
        let root = case.path("out/release");
        let app = root.join("bin/app");
        let mode = std::fs::metadata(&app).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "setuid dropped, executable kept ({ext})");
        assert_eq!(std::fs::read_link(root.join("bin/run")).unwrap(), PathBuf::from("app"));
        assert_eq!(std::fs::read(root.join("bin/run")).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(std::fs::read(root.join(&long)).unwrap(), b"long");
        let long_mode = std::fs::metadata(root.join(&long)).unwrap().permissions().mode() & 0o777;
        assert_eq!(long_mode, 0o644, "group/other write masked");
        assert!(root.join("emptydir").is_dir());
        assert_eq!(std::fs::read(root.join("empty")).unwrap(), b"");
        assert!(root.join("hard").is_file());
        let leftovers: Vec<_> = std::fs::read_dir(case.path("out")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "only the release, no staging left");
    }
}

#[test]
fn zip_entries_of_every_method_and_zip64() {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let methods = [
        ("stored", zip::CompressionMethod::Stored),
        ("deflated", zip::CompressionMethod::Deflated),
        ("bzip2", zip::CompressionMethod::Bzip2),
        ("zstd", zip::CompressionMethod::Zstd),
    ];
    for (name, method) in methods {
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(method)
            .unix_permissions(0o755);
        z.start_file(format!("{name}.txt"), o).unwrap();
        z.write_all(name.repeat(100).as_bytes()).unwrap();
    }
    let o = zip::write::SimpleFileOptions::default().large_file(true);
    z.start_file("zip64.bin", o).unwrap();
    z.write_all(b"zip64").unwrap();
    z.add_directory("dir/", zip::write::SimpleFileOptions::default())
        .unwrap();
    z.add_symlink("link", "stored.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    let bytes = z.finish().unwrap().into_inner();
    let case = Case::new();
    let archive = case.write("app.zip", &bytes);
    let m = case.extract(&archive).unwrap();
    assert_eq!(m.format, Some(Format::Zip));
    let root = case.path("out/release");
    for (name, _) in methods {
        assert_eq!(
            std::fs::read_to_string(root.join(format!("{name}.txt"))).unwrap(),
            name.repeat(100)
        );
        let mode = std::fs::metadata(root.join(format!("{name}.txt")))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o755);
    }
    assert_eq!(std::fs::read(root.join("zip64.bin")).unwrap(), b"zip64");
    assert!(root.join("dir").is_dir());
    assert_eq!(
        std::fs::read_link(root.join("link")).unwrap(),
        PathBuf::from("stored.txt")
    );
}

#[test]
fn archives_made_with_tar_dot_are_accepted() {
    // `tar -C dir -czf app.tar.gz .` starts with a `./` entry for the root.
    let case = Case::new();
    let archive = case.write(
        "dot.tar.gz",
        &gz(&raw_tar(&[Raw::Dir(b"./"), Raw::File(b"./app", b"x", 0o755)])),
    );
    let m = case.extract(&archive).unwrap();
    assert_eq!(m.entries.len(), 1);
    assert!(case.path("out/release/app").is_file());
    // A file named `.` is still refused.
    let case = Case::new();
    let archive = case.write("dotfile.tar", &raw_tar(&[Raw::File(b"./", b"x", 0o644)]));
    assert_eq!(reason(case.extract(&archive)), UnsafeReason::EmptyName);
}

#[test]
fn many_small_files() {
    let names: Vec<String> = (0..3000).map(|i| format!("d{}/f{i}.txt", i % 17)).collect();
    let mut b = tar::Builder::new(Vec::new());
    for n in &names {
        let mut h = tar::Header::new_gnu();
        h.set_size(n.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, n, n.as_bytes()).unwrap();
    }
    let case = Case::new();
    let archive = case.write("many.tar.gz", &gz(&b.into_inner().unwrap()));
    let m = case.extract(&archive).unwrap();
    assert_eq!(m.entries.len(), 3000);
    assert_eq!(
        std::fs::read_to_string(case.path("out/release/d7/f2999.txt")).unwrap(),
        "d7/f2999.txt"
    );
}

#[test]
fn single_executables_bare_and_compressed() {
    let elf = b"\x7fELF\x02\x01\x01\0rest-of-binary";
    for (name, bytes, placed) in [
        ("myapp_linux_amd64", elf.to_vec(), "myapp_linux_amd64"),
        ("myapp.gz", gz(elf), "myapp"),
        ("tool.zst", zst(b"#!/bin/sh\necho tool\n"), "tool"),
    ] {
        let case = Case::new();
        let archive = case.write(name, &bytes);
        let m = case.extract(&archive).unwrap();
        assert!(matches!(m.format, Some(Format::SingleFile(_))));
        let placed = case.path("out/release").join(placed);
        let mode = std::fs::metadata(&placed).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{name}");
    }
}

#[test]
fn existing_destination_is_refused() {
    let case = Case::new();
    let archive = case.write("a.tar", &raw_tar(&[Raw::File(b"a", b"x", 0o644)]));
    std::fs::create_dir_all(case.path("out/release")).unwrap();
    assert!(matches!(case.extract(&archive), Err(Error::DestinationExists { .. })));
}

mod props {
    //! Property tests mirroring the fuzz targets: arbitrary bytes and
    //! arbitrary entry names never escape the staging folder or panic.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), ext in prop_oneof![Just("tar"), Just("tar.gz"), Just("zip"), Just("bin")]) {
            let case = Case::new();
            let archive = case.write(&format!("x.{ext}"), &bytes);
            let _ = case.extract(&archive);
            prop_assert!(!case.path("evil").exists());
        }

        #[test]
        fn arbitrary_names_stay_inside(names in proptest::collection::vec("[a./]{1,12}", 1..6)) {
            let entries: Vec<Raw<'_>> = names.iter().map(|n| Raw::File(n.as_bytes(), b"x", 0o644)).collect();
            let case = Case::new();
            let archive = case.write("x.tar", &raw_tar(&entries));
            match case.extract(&archive) {
                Ok(m) => for e in &m.entries {
                    prop_assert!(e.path.components().all(|c| matches!(c, std::path::Component::Normal(_))));
                },
                Err(_) => {
                    let left = std::fs::read_dir(case.path("out")).unwrap().count();
                    prop_assert_eq!(left, 0);
                }
            }
        }

        #[test]
        fn arbitrary_zip_names(name in "[a./]{1,12}", link in "[a./]{1,12}") {
            let case = Case::new();
            let archive = case.write("x.zip", &zip_of(&[(name.as_str(), b"x", None)], &[("l", link.as_str())]));
            if case.extract(&archive).is_err() {
                prop_assert_eq!(std::fs::read_dir(case.path("out")).unwrap().count(), 0);
            }
        }
    }
}

#[test]
fn a_cancelled_extraction_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.tar.gz");
    let data = vec![7u8; 4 << 20];
    std::fs::write(&archive, gz(&raw_tar(&[Raw::File(b"big", &data, 0o644)]))).unwrap();
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let dest = dir.path().join("out");
    let err = Extractor::new(Limits::default())
        .cancel_on(flag)
        .extract(&archive, &dest)
        .unwrap_err();
    assert!(matches!(err, dewy_archive::Error::Cancelled { .. }), "{err}");
    assert!(!dest.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "no staging folder left: {left:?}");
}
