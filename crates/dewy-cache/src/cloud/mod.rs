//! Object stores (S3, GCS) and the cache built on them.
//!
//! [`ObjectStore`] is the small set of operations dewy needs from a bucket:
//! small reads and conditional writes (for the shared registry answer and
//! its lock), streaming downloads and uploads (artifacts), delimited listing
//! with pagination (registries), deletes, and an HTTP request that fetches
//! an object (so registry downloads go through dewy's verified downloader).
//! [`CloudCache`] implements [`crate::Cache`] on any of them.

mod cache;
#[cfg(feature = "gcs")]
mod gcs;
#[cfg(feature = "s3")]
mod s3;

use std::path::Path;
use std::sync::Arc;

pub use cache::CloudCache;
#[cfg(feature = "gcs")]
pub use gcs::GcsStore;
#[cfg(feature = "s3")]
pub use s3::S3Store;

use crate::Error;

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

/// An HTTP request that fetches an object: a presigned S3 URL, or the GCS
/// media URL with an authorization header. Header values may be secret.
#[derive(Clone)]
pub struct ObjectRequest {
    /// `http(s)://` URL.
    pub url: String,
    /// Headers to send (lower-case names).
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for ObjectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = self.url.split('?').next().unwrap_or_default();
        f.debug_struct("ObjectRequest")
            .field("url", &url)
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

/// Opens the bucket named by an `s3://` or `gs://` URL. Options it does not
/// know are returned in [`StoreUrl::rest`].
pub fn open_store(url: &url::Url, options: &CloudOptions) -> Result<StoreUrl, Error> {
    let mut rest = Vec::new();
    let mut endpoint = None;
    let mut region = None;
    for (k, v) in url.query_pairs() {
        match (url.scheme(), k.as_ref()) {
            ("s3", "endpoint") => endpoint = Some(v.into_owned()).filter(|e| !e.is_empty()),
            ("s3", "region") => region = Some(v.into_owned()).filter(|e| !e.is_empty()),
            _ => rest.push((k.into_owned(), v.into_owned())),
        }
    }
    let host = url.host_str().unwrap_or_default().to_owned();
    let mut segments: Vec<String> = url
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let join = |segs: &[String]| {
        if segs.is_empty() {
            String::new()
        } else {
            format!("{}/", segs.join("/"))
        }
    };
    match url.scheme() {
        #[cfg(feature = "s3")]
        "s3" => {
            if segments.is_empty() {
                return Err(invalid(url, "expected s3://<region>/<bucket>[/<prefix>]"));
            }
            let bucket = segments.remove(0);
            let region = region.unwrap_or(host);
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
                prefix: join(&segments),
                rest,
            })
        }
        #[cfg(feature = "gcs")]
        "gs" => {
            if host.is_empty() {
                return Err(invalid(url, "expected gs://<bucket>[/<prefix>]"));
            }
            Ok(StoreUrl {
                store: Arc::new(GcsStore::new(host, options.gcs_emulator.clone())),
                prefix: join(&segments),
                rest,
            })
        }
        other => Err(invalid(
            url,
            format!("no object store for scheme `{other}` in this build"),
        )),
    }
}

/// The file an object download streams into: created (or truncated), written
/// chunk by chunk, synced at the end; errors name the file.
pub(crate) struct FileSink<'a> {
    file: tokio::fs::File,
    dest: &'a Path,
}

impl<'a> FileSink<'a> {
    pub(crate) async fn create(dest: &'a Path) -> Result<Self, Error> {
        let file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| Error::io("create", dest, e))?;
        Ok(Self { file, dest })
    }

    pub(crate) async fn write(&mut self, chunk: &[u8]) -> Result<(), Error> {
        use tokio::io::AsyncWriteExt;
        self.file
            .write_all(chunk)
            .await
            .map_err(|e| Error::io("write", self.dest, e))
    }

    pub(crate) async fn finish(self) -> Result<(), Error> {
        self.file.sync_all().await.map_err(|e| Error::io("sync", self.dest, e))
    }
}

/// The name of an object below `prefix`, without it.
pub(crate) fn strip<'a>(prefix: &str, name: &'a str) -> &'a str {
    name.strip_prefix(prefix).unwrap_or(name)
}
