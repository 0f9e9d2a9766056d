//! Extracts an archive safely and prints a summary of its manifest.
//!
//! ```sh
//! cargo run --release -p dewy-archive --example extract -- [--durable] ARCHIVE DEST
//! ```
//!
//! With `--durable`, the tree is on disk when the command returns.
//!
//! Exits 1 with the error chain on unsafe or corrupt input; `DEST` is then
//! left absent.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::error::Error as _;
use std::process::ExitCode;

use dewy_archive::{EntryKind, Extractor, Limits};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let durable = args.first().is_some_and(|a| a == "--durable");
    if durable {
        args.remove(0);
    }
    let [archive, dest] = args.as_slice() else {
        eprintln!("usage: extract [--durable] ARCHIVE DEST");
        return ExitCode::from(2);
    };
    let extractor = Extractor::new(Limits::default()).durable(durable);
    match extractor.extract(archive.as_ref(), dest.as_ref()) {
        Ok(manifest) => {
            println!(
                "extracted {} ({}): {} files, {} directories, {} symlinks, {} hard links, {} bytes",
                archive,
                manifest.format.map(|f| f.to_string()).unwrap_or_default(),
                manifest.count(EntryKind::File),
                manifest.count(EntryKind::Dir),
                manifest.count(EntryKind::Symlink),
                manifest.count(EntryKind::HardLink),
                manifest.total_bytes()
            );
            report_rss();
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  Caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// With `DEWY_REPORT_RSS=1`, prints the peak resident set size (for
/// `cargo xtask bench archive`).
fn report_rss() {
    if std::env::var_os("DEWY_REPORT_RSS").is_none() {
        return;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kib) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
        eprintln!("peak_rss_kib={}", kib.trim().trim_end_matches("kB").trim());
    }
}
