//! Choosing the artifact of a release for this host.

/// The host an artifact must run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`, `macos`, ... (Rust's `std::env::consts::OS`).
    pub os: String,
    /// `x86_64`, `aarch64`, ... (Rust's `std::env::consts::ARCH`).
    pub arch: String,
    /// `musl` or `gnu` on Linux.
    pub libc: Option<String>,
}

impl Platform {
    /// The platform this binary was built for.
    pub fn host() -> Self {
        let libc = if cfg!(target_env = "musl") {
            Some("musl".to_owned())
        } else if cfg!(target_env = "gnu") {
            Some("gnu".to_owned())
        } else {
            None
        };
        Self {
            os: std::env::consts::OS.to_owned(),
            arch: std::env::consts::ARCH.to_owned(),
            libc,
        }
    }

    fn os_tokens(&self) -> &'static [&'static str] {
        match self.os.as_str() {
            "linux" => &["linux"],
            "macos" => &["darwin", "macos", "apple", "osx"],
            "windows" => &["windows", "win", "win64"],
            "freebsd" => &["freebsd"],
            _ => &[],
        }
    }

    fn arch_tokens(&self) -> &'static [&'static str] {
        match self.arch.as_str() {
            "x86_64" => &["x86_64", "amd64", "x64"],
            "aarch64" => &["aarch64", "arm64"],
            "arm" => &["armv7", "armv7l", "armhf", "arm"],
            "x86" => &["i386", "i686", "386", "x86"],
            "riscv64" => &["riscv64"],
            _ => &[],
        }
    }
}

/// Files published beside artifacts that are never artifacts themselves.
fn is_auxiliary(lower: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        ".sha256",
        ".sha256sum",
        ".sha512",
        ".md5",
        ".sig",
        ".asc",
        ".pem",
        ".crt",
        ".minisig",
        ".sbom",
        ".json",
        ".txt",
        ".intoto.jsonl",
        ".spdx",
        ".deb",
        ".rpm",
        ".apk",
        ".msi",
        ".dmg",
        ".pkg",
    ];
    SUFFIXES.iter().any(|s| lower.ends_with(s)) || lower.contains("checksums") || lower == "sha256sums"
}

/// Names of files still being uploaded (publishers upload to a temporary
/// name and rename): never artifacts, even when their tokens match.
fn is_in_flight(lower: &str) -> bool {
    const SUFFIXES: &[&str] = &[".tmp", ".part", ".partial", ".download", ".crdownload", "~"];
    lower.starts_with('.') || SUFFIXES.iter().any(|s| lower.ends_with(s))
}

/// Whether `lower` names an archive (what a platform-neutral release ships;
/// a lone `README.md` is not one).
fn is_archive(lower: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst", ".zip",
    ];
    SUFFIXES.iter().any(|s| lower.ends_with(s))
}

/// Every OS and architecture token dewy knows, for any platform.
const ALL_PLATFORM_TOKENS: &[&str] = &[
    "linux", "darwin", "macos", "apple", "osx", "windows", "win", "win64", "freebsd", "x86_64", "amd64", "x64",
    "aarch64", "arm64", "armv7", "armv7l", "armhf", "arm", "i386", "i686", "386", "x86", "riscv64",
];

/// Lower-cased tokens of a file name, with `x86_64`/`x86-64` kept whole.
fn tokens(lower: &str) -> Vec<String> {
    let joined = lower.replace("x86_64", "x86~64").replace("x86-64", "x86~64");
    joined
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '~'))
        .filter(|t| !t.is_empty())
        .map(|t| t.replace('~', "_"))
        .collect()
}

/// Why no single artifact could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Exactly one artifact fits.
    One(String),
    /// None fits.
    None,
    /// Several fit equally; the operator must name one with `artifact=`.
    Ambiguous(Vec<String>),
}

/// Picks the artifact for `platform` among `names`: OS and architecture
/// matched by token (with aliases), never by substring; checksum, signature
/// and package files skipped, and so are files still being uploaded
/// (`.tmp`, `.part`, `.partial`, `.download`, `.crdownload`, `~`, a leading
/// dot); the host's libc preferred when both musl and gnu builds exist;
/// several equal candidates are [`Choice::Ambiguous`]. A release whose only
/// one archive names no OS and no architecture (`site.tar.gz`, perhaps
/// beside a `README.md`), with no other file naming one, is taken as
/// platform-neutral.
pub fn choose_artifact<'a>(names: impl IntoIterator<Item = &'a str>, platform: &Platform) -> Choice {
    let (os, arch) = (platform.os_tokens(), platform.arch_tokens());
    let candidates: Vec<(&str, Vec<String>)> = names
        .into_iter()
        .filter_map(|name| {
            let lower = name.to_ascii_lowercase();
            (!is_auxiliary(&lower) && !is_in_flight(&lower)).then(|| (name, tokens(&lower)))
        })
        .collect();
    // Platform-neutral: one archive, and no file names a platform (a
    // README or LICENSE beside it does not count).
    let archives: Vec<&str> = candidates
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| is_archive(&name.to_ascii_lowercase()))
        .collect();
    let neutral = candidates
        .iter()
        .all(|(_, toks)| !toks.iter().any(|t| ALL_PLATFORM_TOKENS.contains(&t.as_str())));
    if let [archive] = archives.as_slice()
        && neutral
    {
        return Choice::One((*archive).to_owned());
    }
    let mut matches: Vec<(&str, Vec<String>)> = candidates
        .into_iter()
        .filter(|(_, toks)| {
            let has = |set: &[&str]| toks.iter().any(|t| set.contains(&t.as_str()));
            has(os) && has(arch)
        })
        .collect();
    if matches.len() > 1
        && let Some(libc) = &platform.libc
    {
        let other = if libc == "musl" { "gnu" } else { "musl" };
        let preferred: Vec<_> = matches
            .iter()
            .filter(|(_, t)| t.iter().any(|x| x == libc))
            .cloned()
            .collect();
        if !preferred.is_empty() {
            matches = preferred;
        } else {
            matches.retain(|(_, t)| !t.iter().any(|x| x == other));
        }
    }
    match matches.len() {
        0 => Choice::None,
        1 => Choice::One(matches[0].0.to_owned()),
        _ => {
            let mut names: Vec<String> = matches.into_iter().map(|(n, _)| n.to_owned()).collect();
            names.sort();
            Choice::Ambiguous(names)
        }
    }
}

/// The artifact of release `tag` among `names`: the one asked for with
/// `artifact=`, else the one [`choose_artifact`] picks. A missing artifact
/// is [`crate::Error::ArtifactNotFound`] with the publish time (for the grace
/// period); several candidates are [`crate::Error::AmbiguousArtifact`].
pub(crate) fn pick_artifact<'a>(
    tag: &str,
    names: impl IntoIterator<Item = &'a str>,
    wanted: Option<&str>,
    platform: &Platform,
    published_at: Option<jiff::Timestamp>,
) -> Result<String, crate::Error> {
    let not_found = || crate::Error::ArtifactNotFound {
        tag: tag.to_owned(),
        wanted: wanted.map(str::to_owned),
        published_at,
    };
    let names: Vec<&str> = names.into_iter().collect();
    match wanted {
        Some(name) => names
            .iter()
            .find(|n| **n == name)
            .map(|n| (*n).to_owned())
            .ok_or_else(|| {
                log_missing_once(tag, &format!("`{name}` (artifact=)"), &names);
                not_found()
            }),
        None => match choose_artifact(names.iter().copied(), platform) {
            Choice::One(name) => Ok(name),
            Choice::None => {
                let looked_for = format!(
                    "an artifact for {} ({}) and {} ({})",
                    platform.os,
                    platform.os_tokens().join("|"),
                    platform.arch,
                    platform.arch_tokens().join("|")
                );
                log_missing_once(tag, &looked_for, &names);
                Err(not_found())
            }
            Choice::Ambiguous(candidates) => Err(crate::Error::AmbiguousArtifact {
                tag: tag.to_owned(),
                candidates,
            }),
        },
    }
}

/// One INFO line per release and candidate list saying why nothing was
/// chosen: a tick every few seconds must not repeat it.
fn log_missing_once(tag: &str, looked_for: &str, names: &[&str]) {
    if !crate::first_time(format!("artifact\0{tag}\0{}", names.join("\0"))) {
        return;
    }
    tracing::info!(
        tag,
        looked_for,
        candidates = %if names.is_empty() { "none".to_owned() } else { names.join(", ") },
        "No artifact of this release fits this host"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(os: &str, arch: &str, libc: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            arch: arch.into(),
            libc: libc.map(Into::into),
        }
    }

    #[test]
    fn artifact_table() {
        let goreleaser = [
            "dewy_1.2.3_linux_amd64.tar.gz",
            "dewy_1.2.3_linux_arm64.tar.gz",
            "dewy_1.2.3_darwin_amd64.tar.gz",
            "dewy_1.2.3_darwin_arm64.tar.gz",
            "checksums.txt",
            "dewy_1.2.3_linux_amd64.tar.gz.sig",
        ];
        let rust = [
            "app-x86_64-unknown-linux-gnu.tar.xz",
            "app-x86_64-unknown-linux-musl.tar.xz",
            "app-aarch64-unknown-linux-gnu.tar.xz",
            "app-aarch64-apple-darwin.tar.xz",
            "app-x86_64-unknown-linux-gnu.tar.xz.sha256",
        ];
        let cases: Vec<(&[&str], Platform, Choice)> = vec![
            (
                &goreleaser,
                p("linux", "x86_64", Some("gnu")),
                Choice::One("dewy_1.2.3_linux_amd64.tar.gz".into()),
            ),
            (
                &goreleaser,
                p("linux", "aarch64", Some("gnu")),
                Choice::One("dewy_1.2.3_linux_arm64.tar.gz".into()),
            ),
            (
                &goreleaser,
                p("macos", "aarch64", None),
                Choice::One("dewy_1.2.3_darwin_arm64.tar.gz".into()),
            ),
            (
                &rust,
                p("linux", "x86_64", Some("gnu")),
                Choice::One("app-x86_64-unknown-linux-gnu.tar.xz".into()),
            ),
            (
                &rust,
                p("linux", "x86_64", Some("musl")),
                Choice::One("app-x86_64-unknown-linux-musl.tar.xz".into()),
            ),
            (
                &rust,
                p("macos", "aarch64", None),
                Choice::One("app-aarch64-apple-darwin.tar.xz".into()),
            ),
            // `arm` must not match `arm64` by substring (a Go original bug).
            (&goreleaser, p("linux", "arm", None), Choice::None),
            (
                &["app_linux_amd64.zip", "app_linux_x86_64.tar.gz"],
                p("linux", "x86_64", None),
                Choice::Ambiguous(vec!["app_linux_amd64.zip".into(), "app_linux_x86_64.tar.gz".into()]),
            ),
            (
                &["app_linux_amd64"],
                p("linux", "x86_64", None),
                Choice::One("app_linux_amd64".into()),
            ),
            (&["linuxtool_amd64.tar.gz"], p("linux", "x86_64", None), Choice::None),
            (
                &["linuxtool_amd64.tar.gz", "other_amd64.tar.gz"],
                p("linux", "x86_64", None),
                Choice::None,
            ),
            // Uploads in flight are never chosen, whatever their tokens.
            (
                &[
                    "app_linux_amd64.tar.gz.tmp",
                    ".app_linux_amd64.tar.gz",
                    "app_linux_amd64.tar.gz.part",
                ],
                p("linux", "x86_64", None),
                Choice::None,
            ),
            (
                &["app_linux_amd64.tar.gz", "app_linux_amd64.tar.gz.tmp"],
                p("linux", "x86_64", None),
                Choice::One("app_linux_amd64.tar.gz".into()),
            ),
            // One artifact without OS/arch tokens: platform-neutral.
            (
                &["site.tar.gz", "SHA256SUMS"],
                p("linux", "x86_64", None),
                Choice::One("site.tar.gz".into()),
            ),
            (&["site.tar.gz.tmp"], p("linux", "x86_64", None), Choice::None),
            (&["README.md"], p("linux", "x86_64", None), Choice::None),
            // A README beside it changes nothing; a second archive does, and
            // so does a file naming a platform.
            (
                &["README.md", "site.tar.gz"],
                p("linux", "x86_64", None),
                Choice::One("site.tar.gz".into()),
            ),
            (&["site.tar.gz", "docs.zip"], p("linux", "x86_64", None), Choice::None),
            (
                &["site.tar.gz", "app_darwin_arm64"],
                p("linux", "x86_64", None),
                Choice::None,
            ),
            // One artifact for another platform is not platform-neutral.
            (&["app_darwin_arm64.tar.gz"], p("linux", "x86_64", None), Choice::None),
        ];
        for (names, platform, want) in cases {
            assert_eq!(
                choose_artifact(names.iter().copied(), &platform),
                want,
                "{names:?} on {platform:?}"
            );
        }
    }
}
