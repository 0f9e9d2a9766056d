//! Downloads one artifact URL with dewy's verified downloader.
//!
//! ```sh
//! cargo run --release -p dewy-registry --example fetch -- URL STAGING_DIR [SHA256]
//! ```
//!
//! Prints the size and SHA-256, and with `DEWY_REPORT_RSS=1` the peak
//! resident memory (for `cargo xtask bench download`).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use dewy_registry::{Checksum, DownloadPolicy, Downloader, NoProgress, Release};

#[tokio::main(worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, dir) = match args.as_slice() {
        [u, d, ..] => (u.clone(), d.clone()),
        _ => {
            eprintln!("usage: fetch URL STAGING_DIR [SHA256]");
            return std::process::ExitCode::from(2);
        }
    };
    let release = Release {
        id: "bench".into(),
        tag: "v0.0.0".into(),
        version: dewy_registry::parse_semver("v0.0.0").expect("valid"),
        artifact_name: url.rsplit('/').next().unwrap_or("artifact").into(),
        artifact_url: url,
        published_at: None,
        slot: None,
        checksum: args.get(2).map(|s| Checksum {
            sha256: s.clone(),
            source: "command line".into(),
        }),
        signature_url: None,
    };
    let d = Downloader::new(DownloadPolicy {
        max_bytes: u64::MAX,
        ..DownloadPolicy::default()
    })
    .expect("client");
    match d.fetch(&release, dir.as_ref(), &NoProgress).await {
        Ok(got) => {
            println!("{} bytes, sha256 {}", got.size, got.sha256);
            if std::env::var_os("DEWY_REPORT_RSS").is_some() {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                if let Some(kib) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                    eprintln!("peak_rss_kib={}", kib.trim().trim_end_matches("kB").trim());
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            let mut s = std::error::Error::source(&err);
            while let Some(c) = s {
                eprintln!("  Caused by: {c}");
                s = c.source();
            }
            std::process::ExitCode::FAILURE
        }
    }
}
