//! Release discovery for dewy: which release should this host run, and where
//! is its artifact?
//!
//! # Contract
//!
//! - [`Registry::latest`] answers with the newest [`Release`] for this host
//!   (version scheme, pre-release opt-in and blue/green slot applied), or a
//!   typed [`Error`]. A release whose artifact is missing is
//!   [`Error::ArtifactNotFound`] with its publish time, so the caller can
//!   apply the grace period; several matching artifacts are
//!   [`Error::AmbiguousArtifact`], never a silent first pick.
//! - Backends are chosen by URL scheme through one table ([`open`]); an
//!   unknown scheme or query option is an error that names it and lists the
//!   valid ones.
//! - [`Downloader`] turns an artifact location into a verified file:
//!   streamed to a temporary file beside the cache, hashed with SHA-256 while
//!   streaming, resumed with HTTP `Range`, retried with backoff and jitter,
//!   bounded in size and time, and checked against the release's checksum.
//!   Memory use does not grow with the artifact's size.
//! - URLs in logs and errors go through [`SafeUrl`], which masks secrets.
//!
//! # Layout of the `file://` registry
//!
//! ```text
//! /srv/releases/                      file:///srv/releases
//! ├── v1.2.3/
//! │   ├── myapp_linux_amd64.tar.gz    artifact (chosen by OS/arch tokens)
//! │   └── SHA256SUMS                  optional: verified when present
//! └── v1.2.4/ ...
//! ```
//!
//! # What this crate must never do
//!
//! Read configuration files or flags (the CLI passes options in), log a
//! secret, or keep a whole artifact in memory.

#![deny(missing_docs)]

mod artifact;
mod download;
mod file;
#[cfg(feature = "github")]
mod github;
#[cfg(feature = "grpc")]
mod grpc;
mod object;
#[cfg(feature = "oci")]
mod oci;
mod shared;
mod signature;
mod version;

use std::path::PathBuf;
use std::sync::Arc;

pub use artifact::{Choice, Platform, choose_artifact};
pub use dewy_store::CloudOptions;
/// Where to download an artifact from (one type with dewy-store's object
/// requests). Header values may hold credentials: `Debug` shows only the
/// header names.
pub use dewy_store::ObjectRequest as ArtifactRequest;
pub use dewy_store::SafeUrl;
pub use download::{DownloadPolicy, DownloadProgress, Downloaded, Downloader, NoProgress};
pub use file::FileRegistry;
#[cfg(feature = "github")]
pub use github::{GithubEnv, GithubRegistry};
#[cfg(feature = "grpc")]
pub use grpc::GrpcRegistry;
pub use object::ObjectRegistry;
#[cfg(feature = "oci")]
pub use oci::{OciEnv, OciRegistry};
pub use shared::{SharedRegistry, SharedScope, SharedStats};
pub use signature::{KeyError, KeyId, SIGNATURE_SUFFIX, SignatureCheck, SignatureError, TrustedKeys};
pub use version::{CalVerFormat, Scheme, Selection, Version, choose_latest, parse_semver};

/// A SHA-256 digest that an artifact must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    /// Lower-case hex.
    pub sha256: String,
    /// Where it came from (`SHA256SUMS`, `app.tar.gz.sha256`, the registry's digest).
    pub source: String,
}

/// The release a registry chose for this host.
#[derive(Debug, Clone)]
pub struct Release {
    /// A stable identifier of the release in its registry.
    pub id: String,
    /// The tag as published (`v1.2.3`).
    pub tag: String,
    /// The parsed version.
    pub version: Version,
    /// The artifact's file name.
    pub artifact_name: String,
    /// Where to download it (`file://`, `http(s)://`).
    pub artifact_url: String,
    /// When the release was published, when known.
    pub published_at: Option<jiff::Timestamp>,
    /// The blue/green slot (build metadata), if any.
    pub slot: Option<String>,
    /// The checksum the artifact must match, when the registry knows one.
    pub checksum: Option<Checksum>,
    /// Where the publisher's minisign signature of the artifact is
    /// (`<artifact>.minisig` beside it), when one is published.
    pub signature_url: Option<String>,
}

/// A deployment to record in the registry's audit trail.
#[derive(Debug, Clone)]
pub struct Report {
    /// The release's identifier in its registry ([`Release::id`]).
    pub release_id: String,
    /// The release deployed.
    pub tag: String,
    /// `server` or `assets`.
    pub command: String,
    /// The host's name.
    pub hostname: String,
    /// When.
    pub at: jiff::Timestamp,
    /// The error, when the deployment failed.
    pub error: Option<String>,
}

/// Everything a registry or a download can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The chosen release has no artifact for this host (yet).
    #[error("artifact not found: {} in release `{tag}`", wanted.as_deref().unwrap_or("(none matches this host)"))]
    ArtifactNotFound {
        /// The release's tag.
        tag: String,
        /// The artifact asked for with `artifact=`, if any.
        wanted: Option<String>,
        /// When the release was published: inside the grace period a missing
        /// artifact is not an error.
        published_at: Option<jiff::Timestamp>,
    },
    /// Several artifacts fit this host.
    #[error("several artifacts of release `{tag}` fit this host: {}; choose one with `artifact=`", candidates.join(", "))]
    AmbiguousArtifact {
        /// The release's tag.
        tag: String,
        /// The candidates.
        candidates: Vec<String>,
    },
    /// No tag parsed as a version (of the slot, when one is set).
    #[error("no valid versioned release found in `{location}`")]
    NoVersion {
        /// The registry (redacted).
        location: String,
    },
    /// A registry URL with a scheme no backend handles.
    #[error("unsupported registry scheme `{scheme}`; supported schemes: {}", valid.join(", "))]
    UnknownScheme {
        /// The scheme given.
        scheme: String,
        /// The schemes this build supports.
        valid: Vec<&'static str>,
    },
    /// An unknown query option.
    #[error("unknown registry option `{option}`; valid options: {}", valid.join(", "))]
    UnknownOption {
        /// The option given.
        option: String,
        /// The options this backend takes.
        valid: Vec<&'static str>,
    },
    /// A malformed URL or option value.
    #[error("invalid registry `{url}`: {reason}")]
    InvalidUrl {
        /// The URL (redacted).
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A local filesystem operation failed.
    #[error("failed to {op} `{}`", path.display())]
    Io {
        /// The operation.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server answered with an error status.
    #[error("download of `{url}` failed with HTTP status {status}")]
    HttpStatus {
        /// The URL (redacted).
        url: String,
        /// The status code.
        status: u16,
    },
    /// The connection failed or timed out.
    #[error("{op} `{url}` failed")]
    Transport {
        /// What was asked: `download of`, `GitHub API request for`.
        op: &'static str,
        /// The URL (redacted).
        url: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The artifact does not match its checksum; nothing was cached.
    #[error("checksum mismatch for `{url}`: expected sha256 {expected} (from {source_name}), got {actual}")]
    ChecksumMismatch {
        /// The URL (redacted).
        url: String,
        /// The expected digest.
        expected: String,
        /// The digest of what arrived.
        actual: String,
        /// Where the expected digest came from.
        source_name: String,
    },
    /// The artifact's publisher signature was refused; nothing was cached.
    #[error("signature check of `{url}` failed")]
    Signature {
        /// The artifact or signature URL (redacted).
        url: String,
        /// Which check failed.
        #[source]
        source: SignatureError,
    },
    /// A gRPC registry answered with an error status.
    #[error("`{registry}` answered {code}: {message}")]
    Grpc {
        /// The registry (`grpc://host:port`).
        registry: String,
        /// The status code's name (`UNAUTHENTICATED`).
        code: &'static str,
        /// The status message.
        message: String,
    },
    /// A registry API answered with an error.
    #[error("`{registry}` answered HTTP {status}: {message}")]
    Api {
        /// The registry (`ghr://owner/repo`).
        registry: String,
        /// The status code.
        status: u16,
        /// What the server said, with a hint.
        message: String,
    },
    /// The registry's rate limit is spent; no request is sent before `retry_at`.
    #[error("`{registry}`: rate limit reached; next attempt at {retry_at}")]
    RateLimited {
        /// The registry.
        registry: String,
        /// When the next request will be sent.
        retry_at: jiff::Timestamp,
    },
    /// A bucket operation failed.
    #[error("registry `{location}`")]
    Store {
        /// The bucket.
        location: String,
        /// The cause.
        #[source]
        source: dewy_store::Error,
    },
    /// Credentials are missing, incomplete or unusable.
    #[error("registry credentials: {reason}")]
    Credentials {
        /// What is wrong, naming the variable.
        reason: String,
    },
    /// The artifact is larger than the configured maximum.
    #[error("artifact `{url}` exceeds the maximum size of {limit} bytes")]
    TooLarge {
        /// The URL (redacted).
        url: String,
        /// The limit.
        limit: u64,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::RateLimited { .. } | Self::Store { .. } => true,
            Self::Api { status, .. } => *status == 429 || *status >= 500,
            Self::Grpc { code, .. } => matches!(
                *code,
                "UNAVAILABLE" | "DEADLINE_EXCEEDED" | "RESOURCE_EXHAUSTED" | "ABORTED"
            ),
            Self::HttpStatus { status, .. } => *status == 429 || *status == 408 || *status >= 500,
            _ => false,
        }
    }
}

/// The backend of one registry URL.
///
/// Implementations answer from the registry's current state each call; they
/// may cache internally (conditional requests) but must not return a release
/// older than one they returned before.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + std::fmt::Debug {
    /// The newest release for this host. Reserve errors for real failures:
    /// a missing artifact is [`Error::ArtifactNotFound`].
    async fn latest(&self) -> Result<Release, Error>;

    /// The newest release older than `tag` whose artifact for this host is
    /// there, for a host with nothing deployed while the newest release's
    /// artifact is still missing (grace period). At most a few versions are
    /// tried. The default: none.
    async fn latest_complete_before(&self, _tag: &str) -> Result<Option<Release>, Error> {
        Ok(None)
    }

    /// Records a deployment in the registry's audit trail. The default does
    /// nothing.
    async fn report(&self, _report: &Report) -> Result<(), Error> {
        Ok(())
    }

    /// Whether [`Registry::report`] wants failed deploy attempts too (with
    /// [`Report::error`] set); otherwise only deployments are reported.
    fn reports_failures(&self) -> bool {
        false
    }

    /// How to fetch the artifact of `release` (a `file://` or `http(s)://`
    /// URL and the headers it needs, such as credentials). The default is
    /// the release's URL with no headers.
    async fn artifact_request(&self, release: &Release) -> Result<ArtifactRequest, Error> {
        Ok(ArtifactRequest::plain(&release.artifact_url))
    }

    /// How to fetch the publisher's signature of `release`'s artifact;
    /// `None` when none is published. The default: the release's
    /// `signature_url` with no headers.
    async fn signature_request(&self, release: &Release) -> Result<Option<ArtifactRequest>, Error> {
        Ok(release.signature_url.as_deref().map(ArtifactRequest::plain))
    }

    /// Counters of the requests this backend made (zero for backends that
    /// make none).
    fn stats(&self) -> RegistryStats {
        RegistryStats::default()
    }
}

/// Requests a registry backend made, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Requests sent.
    pub requests: u64,
    /// Answers that were 304 Not Modified (free against rate limits).
    pub not_modified: u64,
    /// Rate-limit answers or budget exhaustion.
    pub rate_limited: u64,
}

/// Options that come from flags rather than the registry URL.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Blue/green slot (`--slot`).
    pub slot: Option<String>,
    /// CalVer format (`--calver`); overrides a `calver=` query option.
    pub calver: Option<String>,
    /// The host platform for artifact choice.
    pub platform: Platform,
    /// GitHub credentials and API URL (`ghr://`).
    #[cfg(feature = "github")]
    pub github: GithubEnv,
    /// S3 and GCS credentials and endpoints (`s3://`, `gs://`).
    pub cloud: CloudOptions,
    /// Bearer token for `grpc://` (`DEWY_GRPC_TOKEN`); never logged.
    pub grpc_token: Option<String>,
    /// Credentials for `img://`.
    #[cfg(feature = "oci")]
    pub oci: OciEnv,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            slot: None,
            calver: None,
            platform: Platform::host(),
            #[cfg(feature = "github")]
            github: GithubEnv::default(),
            cloud: CloudOptions::default(),
            grpc_token: None,
            #[cfg(feature = "oci")]
            oci: OciEnv::default(),
        }
    }
}

/// How many older versions [`Registry::latest_complete_before`] tries.
const LOOKBACK: usize = 5;

/// [`Registry::latest_complete_before`] for a backend that lists `tags` and
/// builds a version's release with `release_of`.
pub(crate) async fn newest_complete_before<F, Fut>(
    tags: impl IntoIterator<Item = String>,
    selection: &Selection,
    before: &str,
    mut release_of: F,
) -> Result<Option<Release>, Error>
where
    F: FnMut(Version) -> Fut,
    Fut: std::future::Future<Output = Result<Release, Error>>,
{
    let Some(limit) = selection.scheme.parse(before) else {
        return Ok(None);
    };
    let mut older: Vec<String> = tags
        .into_iter()
        .filter(|t| {
            selection
                .scheme
                .parse(t)
                .is_some_and(|v| v.cmp_precedence(&limit) == std::cmp::Ordering::Less)
        })
        .collect();
    for _ in 0..LOOKBACK {
        let Some(version) = choose_latest(older.iter().map(String::as_str), selection) else {
            return Ok(None);
        };
        let tag = version.tag.clone();
        match release_of(version).await {
            Ok(release) => return Ok(Some(release)),
            Err(Error::ArtifactNotFound { .. }) => older.retain(|t| *t != tag),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Builds a backend from its URL.
type Constructor = fn(&url::Url, &OpenOptions) -> Result<Arc<dyn Registry>, Error>;

/// The scheme table: every registry backend this build has.
const SCHEMES: &[(&str, Constructor)] = &[
    ("file", |url, opts| Ok(Arc::new(FileRegistry::from_url(url, opts)?))),
    #[cfg(feature = "github")]
    ("ghr", |url, opts| Ok(Arc::new(GithubRegistry::from_url(url, opts)?))),
    #[cfg(feature = "s3")]
    ("s3", |url, opts| Ok(Arc::new(ObjectRegistry::from_url(url, opts)?))),
    #[cfg(feature = "gcs")]
    ("gs", |url, opts| Ok(Arc::new(ObjectRegistry::from_url(url, opts)?))),
    #[cfg(feature = "grpc")]
    ("grpc", |url, opts| Ok(Arc::new(GrpcRegistry::from_url(url, opts)?))),
    #[cfg(feature = "oci")]
    ("img", |url, opts| Ok(Arc::new(OciRegistry::from_url(url, opts)?))),
];

/// Opens the registry named by `url`, choosing the backend by scheme.
pub fn open(url: &str, options: &OpenOptions) -> Result<Arc<dyn Registry>, Error> {
    let valid = || SCHEMES.iter().map(|(s, _)| *s).collect::<Vec<_>>();
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(Error::InvalidUrl {
            url: SafeUrl(url).to_string(),
            reason: format!(
                "expected scheme://path, for example file:///srv/releases; supported schemes: {}",
                valid().join(", ")
            ),
        });
    };
    let parsed = url::Url::parse(url).map_err(|e| Error::InvalidUrl {
        url: SafeUrl(url).to_string(),
        reason: e.to_string(),
    })?;
    match SCHEMES.iter().find(|(s, _)| *s == scheme) {
        Some((_, make)) => make(&parsed, options),
        None => Err(Error::UnknownScheme {
            scheme: scheme.to_owned(),
            valid: valid(),
        }),
    }
}

/// Query options shared by the release registries.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommonOptions {
    pub(crate) pre_release: bool,
    pub(crate) artifact: Option<String>,
    pub(crate) calver: Option<String>,
}

impl CommonOptions {
    const VALID: &'static [&'static str] = &["pre-release", "artifact", "calver"];

    pub(crate) fn parse(url: &url::Url) -> Result<Self, Error> {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Self::parse_pairs(url, pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())), &[])
    }

    /// Parses `pairs`; `taken` are options the backend already consumed
    /// (listed as valid in the error for an unknown one).
    pub(crate) fn parse_pairs<'a>(
        url: &url::Url,
        pairs: impl Iterator<Item = (&'a str, &'a str)>,
        taken: &[&'static str],
    ) -> Result<Self, Error> {
        let mut out = Self::default();
        for (k, v) in pairs {
            match k {
                "pre-release" => {
                    out.pre_release = match v {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        other => {
                            return Err(Error::InvalidUrl {
                                url: SafeUrl(url.as_str()).to_string(),
                                reason: format!("`pre-release={other}` is not a boolean (true or false)"),
                            });
                        }
                    }
                }
                "artifact" => out.artifact = Some(v.to_owned()).filter(|a| !a.is_empty()),
                "calver" => out.calver = Some(v.to_owned()).filter(|a| !a.is_empty()),
                other => {
                    return Err(Error::UnknownOption {
                        option: other.to_owned(),
                        valid: Self::VALID.iter().chain(taken).copied().collect(),
                    });
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn selection(&self, opts: &OpenOptions, url: &url::Url) -> Result<Selection, Error> {
        let scheme = match opts.calver.as_ref().or(self.calver.as_ref()) {
            Some(f) => Scheme::CalVer(CalVerFormat::new(f).map_err(|reason| Error::InvalidUrl {
                url: SafeUrl(url.as_str()).to_string(),
                reason,
            })?),
            None => Scheme::SemVer,
        };
        Ok(Selection {
            scheme,
            pre_release: self.pre_release,
            slot: opts.slot.clone(),
        })
    }
}

/// Whether `key` is seen for the first time in this process (of the last
/// 256 keys): for log lines that a check every few seconds must not repeat.
pub(crate) fn first_time(key: String) -> bool {
    static SEEN: std::sync::Mutex<std::collections::VecDeque<String>> =
        std::sync::Mutex::new(std::collections::VecDeque::new());
    let mut seen = SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.contains(&key) {
        return false;
    }
    if seen.len() >= 256 {
        seen.pop_front();
    }
    seen.push_back(key);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_and_option_errors_name_the_culprit() {
        let err = open("ftp://x/y", &OpenOptions::default()).unwrap_err().to_string();
        assert!(err.contains("`ftp`") && err.contains("file"), "{err}");
        let err = open("file:///srv?bogus=1", &OpenOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`bogus`") && err.contains("pre-release"), "{err}");
        let err = open("/srv/releases", &OpenOptions::default()).unwrap_err().to_string();
        assert!(err.contains("scheme://"), "{err}");
        let err = open("file:///srv?pre-release=maybe", &OpenOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("pre-release=maybe"), "{err}");
    }
}
