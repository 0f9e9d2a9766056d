//! Embeds the commit and its date for `dewy --version` (`dewy version:
//! 0.1.0 [abc1234, 2026-11-29T06:00:00Z]`, as Dewy prints it).
//!
//! `DEWY_BUILD_COMMIT` and `DEWY_BUILD_DATE` override what git says (for
//! builds from a source archive); without git and without them, `unknown`.
//! The date is the commit's, not the build's, so a build is reproducible.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    for var in ["DEWY_BUILD_COMMIT", "DEWY_BUILD_DATE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // A new commit changes the branch ref (loose or packed).
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::env::var("DEWY_BUILD_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=7", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let date = std::env::var("DEWY_BUILD_DATE")
        .ok()
        .or_else(|| git(&["log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%dT%H:%M:%SZ"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DEWY_COMMIT={commit}");
    println!("cargo:rustc-env=DEWY_DATE={date}");
}
