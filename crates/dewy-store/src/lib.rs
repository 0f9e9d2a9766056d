//! The object-store client of dewy: the small set of operations dewy needs
//! from a bucket, on S3 (feature `s3`) and GCS (feature `gcs`).
//!
//! [`ObjectStore`] covers small reads and conditional writes (for the shared
//! registry answer, its lock and fleet records), streaming downloads and
//! uploads (artifacts), delimited listing with pagination (registries),
//! deletes, and an HTTP request that fetches an object (so registry
//! downloads go through dewy's verified downloader). [`open_store`] opens
//! one from an `s3://` or `gs://` URL.
//!
//! Used by dewy-cache (the cache in a bucket) and dewy-registry (the
//! `s3://`/`gs://` registries and the shared registry answer), so neither
//! depends on the other.
//!
//! # What this crate must never do
//!
//! Print an SDK's Debug output or a credential: errors are one line with the
//! operation, the object, the service's code and message and the request id
//! ([`Error::Remote`]); URLs are shown through [`SafeUrl`]. Read environment
//! variables: the caller passes credentials in [`CloudOptions`] (only the AWS
//! SDK's standard credential chain reads its own).

#![deny(missing_docs)]
// Without a backend feature only the trait and its types are used.
#![cfg_attr(not(any(feature = "s3", feature = "gcs")), allow(dead_code))]

#[cfg(feature = "gcs")]
mod gcs;
mod redact;
#[cfg(feature = "s3")]
mod s3;

use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(feature = "gcs")]
pub use gcs::GcsStore;
pub use redact::SafeUrl;
#[cfg(feature = "s3")]
pub use s3::S3Store;

/// Errors of an object store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store failed or could not be reached.
    #[error("failed to {op} `{location}`: {message}")]
    Remote {
        /// The operation.
        op: &'static str,
        /// The object (`s3://region/bucket/key`).
        location: String,
        /// What the store said, as one line.
        message: String,
    },
    /// A conditional write lost: the object changed or already exists.
    #[error("`{location}` was changed by someone else (precondition failed)")]
    Conflict {
        /// The object.
        location: String,
    },
    /// A malformed `s3://` or `gs://` URL.
    #[error("invalid object-store URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL without its query.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A local file operation failed.
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
}

/// One object, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Full object name (key).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification (creation for GCS, which never modifies).
    pub modified: Option<jiff::Timestamp>,
}

/// The result of a listing.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Objects directly under the prefix (all of them when not delimited).
    pub objects: Vec<ObjectInfo>,
    /// "Folders" (common prefixes ending in `/`) when delimited.
    pub prefixes: Vec<String>,
}

/// A condition on a write, for compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Write unconditionally.
    Any,
    /// Only if the object does not exist (S3 `If-None-Match: *`, GCS
    /// `ifGenerationMatch=0`).
    Absent,
    /// Only if the object's version is still this one (S3 ETag, GCS
    /// generation).
    Matches(String),
}

/// An HTTP request that fetches an object or an artifact: a presigned S3
/// URL, the GCS media URL with an authorization header, a GitHub asset with
/// its token, or a plain URL. Header values may be secret: `Debug` shows the
/// URL through [`SafeUrl`] and only the header names.
#[derive(Clone)]
pub struct ObjectRequest {
    /// `file://`, `http://` or `https://` URL.
    pub url: String,
    /// Headers to send (lower-case names).
    pub headers: Vec<(String, String)>,
}

impl ObjectRequest {
    /// A URL fetched with no extra headers.
    pub fn plain(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            headers: Vec::new(),
        }
    }
}

impl std::fmt::Debug for ObjectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectRequest")
            .field("url", &SafeUrl(&self.url).to_string())
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The operations dewy needs from a bucket.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// `s3://region/bucket` or `gs://bucket`, for messages.
    fn location(&self) -> String;

    /// A small object and its version; `None` when absent.
    async fn get(&self, name: &str) -> Result<Option<(Vec<u8>, String)>, Error>;

    /// Streams an object into the file `dest` (created or truncated) and
    /// syncs it; `false` when the object is absent.
    async fn download(&self, name: &str, dest: &Path) -> Result<bool, Error>;

    /// Writes a small object under `pre`; returns its new version. A failed
    /// precondition is [`Error::Conflict`].
    async fn put(&self, name: &str, data: Vec<u8>, pre: Precondition) -> Result<String, Error>;

    /// Uploads the file `src` as one object: readers see the old object or
    /// the whole new one, never a part.
    async fn upload(&self, name: &str, src: &Path) -> Result<(), Error>;

    /// Lists under `prefix`, following pagination to the end. With
    /// `delimited`, objects below a further `/` are grouped into prefixes.
    async fn list(&self, prefix: &str, delimited: bool) -> Result<Listing, Error>;

    /// Removes an object; an absent one is not an error.
    async fn delete(&self, name: &str) -> Result<(), Error>;

    /// An HTTP request that downloads the object.
    async fn request(&self, name: &str) -> Result<ObjectRequest, Error>;
}

/// Credentials and endpoints for the object stores, read from the
/// environment by the CLI (the AWS SDK also reads its standard chain).
#[derive(Clone, Default)]
pub struct CloudOptions {
    /// Static AWS credentials (access key id, secret, session token); when
    /// absent the AWS default chain applies (environment, profile, web
    /// identity, ECS, EC2 metadata).
    pub aws_credentials: Option<(String, String, Option<String>)>,
    /// `STORAGE_EMULATOR_HOST`: a GCS emulator (`http://127.0.0.1:4443`);
    /// implies anonymous access.
    pub gcs_emulator: Option<String>,
}

impl std::fmt::Debug for CloudOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudOptions")
            .field("aws_credentials", &self.aws_credentials.as_ref().map(|_| "<set>"))
            .field("gcs_emulator", &self.gcs_emulator)
            .finish()
    }
}

/// A bucket location parsed from `s3://region/bucket/prefix?endpoint=&region=`
/// or `gs://bucket/prefix`.
#[derive(Debug, Clone)]
pub struct StoreUrl {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside the bucket: empty, or ending in `/`.
    pub prefix: String,
    /// Query options the store did not take (for the caller to check).
    pub rest: Vec<(String, String)>,
}

fn invalid(url: &url::Url, reason: impl Into<String>) -> Error {
    Error::InvalidUrl {
        url: url.as_str().split('?').next().unwrap_or_default().to_owned(),
        reason: reason.into(),
    }
}

/// The parts of a store URL: host, decoded path segments, query pairs.
struct Parts {
    host: String,
    segments: Vec<String>,
    query: Vec<(String, String)>,
}

impl Parts {
    fn of(url: &url::Url) -> Self {
        Self {
            host: url.host_str().unwrap_or_default().to_owned(),
            segments: url
                .path()
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned())
                .collect(),
            query: url
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        }
    }

    /// The prefix made of `segments[from..]`: empty, or ending in `/`.
    fn prefix(&self, from: usize) -> String {
        let segs = self.segments.get(from..).unwrap_or_default();
        if segs.is_empty() {
            String::new()
        } else {
            format!("{}/", segs.join("/"))
        }
    }

    /// Removes query option `key` and returns its value when not empty.
    #[cfg(feature = "s3")]
    fn take(&mut self, key: &str) -> Option<String> {
        let i = self.query.iter().position(|(k, _)| k == key)?;
        Some(self.query.remove(i).1).filter(|v| !v.is_empty())
    }
}

/// Opens the bucket named by an `s3://` or `gs://` URL. Options it does not
/// know are returned in [`StoreUrl::rest`].
pub fn open_store(url: &url::Url, options: &CloudOptions) -> Result<StoreUrl, Error> {
    let parts = Parts::of(url);
    match url.scheme() {
        #[cfg(feature = "s3")]
        "s3" => open_s3(url, parts, options),
        #[cfg(feature = "gcs")]
        "gs" => {
            if parts.host.is_empty() {
                return Err(invalid(url, "expected gs://<bucket>[/<prefix>]"));
            }
            Ok(StoreUrl {
                store: Arc::new(GcsStore::new(parts.host.clone(), options.gcs_emulator.clone())),
                prefix: parts.prefix(0),
                rest: parts.query,
            })
        }
        other => {
            let _ = (parts, options);
            Err(invalid(
                url,
                format!("no object store for scheme `{other}` in this build"),
            ))
        }
    }
}

/// `s3://<region>/<bucket>[/<prefix>]?endpoint=&region=`.
#[cfg(feature = "s3")]
fn open_s3(url: &url::Url, mut parts: Parts, options: &CloudOptions) -> Result<StoreUrl, Error> {
    let endpoint = parts.take("endpoint");
    let region = parts.take("region").unwrap_or_else(|| parts.host.clone());
    let Some(bucket) = parts.segments.first().cloned() else {
        return Err(invalid(url, "expected s3://<region>/<bucket>[/<prefix>]"));
    };
    if region.is_empty() {
        return Err(invalid(url, "the region is missing: s3://<region>/<bucket>[/<prefix>]"));
    }
    if let Some(ep) = &endpoint
        && !(ep.starts_with("http://") || ep.starts_with("https://"))
    {
        return Err(invalid(url, format!("endpoint `{ep}` must be an http(s) URL")));
    }
    Ok(StoreUrl {
        store: Arc::new(S3Store::new(region, bucket, endpoint, options.aws_credentials.clone())),
        prefix: parts.prefix(1),
        rest: parts.query,
    })
}

#[cfg(any(feature = "s3", feature = "gcs"))]
/// The file an object download streams into: created (or truncated), written
/// chunk by chunk, synced at the end; errors name the file.
#[cfg(any(feature = "s3", feature = "gcs"))]
struct FileSink<'a> {
    file: tokio::fs::File,
    dest: &'a Path,
}

#[cfg(any(feature = "s3", feature = "gcs"))]
impl<'a> FileSink<'a> {
    async fn create(dest: &'a Path) -> Result<Self, Error> {
        let file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| Error::io("create", dest, e))?;
        Ok(Self { file, dest })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), Error> {
        use tokio::io::AsyncWriteExt;
        self.file
            .write_all(chunk)
            .await
            .map_err(|e| Error::io("write", self.dest, e))
    }

    async fn finish(self) -> Result<(), Error> {
        self.file.sync_all().await.map_err(|e| Error::io("sync", self.dest, e))
    }
}
