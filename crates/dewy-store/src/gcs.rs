//! Google Cloud Storage: google-cloud-storage reads objects (streaming, with
//! its CRC32C check); listing, deleting and writing go through the JSON API
//! with dewy's HTTP client and the same credentials.
//!
//! The crate's `StorageControl` client (list, delete) speaks gRPC, which
//! emulators do not serve, and its multipart upload is stored wrongly by
//! fake-gcs-server (the metadata part ends up in the object); a plain JSON
//! API multipart upload with `ifGenerationMatch` is what GCS documents and
//! what both accept.

use std::path::Path;

use google_cloud_storage::client::Storage;

use crate::Error;
use crate::{FileSink, Listing, ObjectInfo, ObjectRequest, ObjectStore, Precondition};

const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

/// Attempts of a JSON API request with transient failures.
const ATTEMPTS: u32 = 4;

/// A GCS bucket. With an emulator endpoint (`STORAGE_EMULATOR_HOST`) access
/// is anonymous; otherwise Application Default Credentials apply.
pub struct GcsStore {
    bucket: String,
    endpoint: String,
    anonymous: bool,
    storage: tokio::sync::OnceCell<Storage>,
    credentials: tokio::sync::OnceCell<google_cloud_auth::credentials::Credentials>,
    http: reqwest::Client,
    /// The bucket answered once (so a 404 is an absent object).
    bucket_seen: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for GcsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsStore")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct JsonListing {
    #[serde(default)]
    items: Vec<JsonObject>,
    #[serde(default)]
    prefixes: Vec<String>,
    #[serde(rename = "nextPageToken")]
    next_page_token: Option<String>,
}

#[derive(serde::Deserialize)]
struct JsonObject {
    name: String,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    updated: Option<String>,
    #[serde(default, rename = "timeCreated")]
    time_created: Option<String>,
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl GcsStore {
    /// A store for `bucket`; with `emulator`, at that endpoint, anonymously.
    pub fn new(bucket: String, emulator: Option<String>) -> Self {
        let anonymous = emulator.is_some();
        let endpoint = emulator
            .map(|e| {
                let e = e.trim_end_matches('/').to_owned();
                if e.starts_with("http://") || e.starts_with("https://") {
                    e
                } else {
                    format!("http://{e}")
                }
            })
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        Self {
            bucket,
            endpoint,
            anonymous,
            storage: tokio::sync::OnceCell::new(),
            credentials: tokio::sync::OnceCell::new(),
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .read_timeout(std::time::Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
            bucket_seen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn remote(&self, op: &'static str, name: &str, message: impl std::fmt::Display) -> Error {
        Error::Remote {
            op,
            location: format!("{}/{name}", self.location()),
            message: message.to_string(),
        }
    }

    fn resource(&self) -> String {
        format!("projects/_/buckets/{}", self.bucket)
    }

    async fn credentials(&self) -> Result<&google_cloud_auth::credentials::Credentials, Error> {
        self.credentials
            .get_or_try_init(|| async {
                if self.anonymous {
                    Ok(google_cloud_auth::credentials::anonymous::Builder::new().build())
                } else {
                    google_cloud_auth::credentials::Builder::default()
                        .build()
                        .map_err(|e| self.remote("authenticate", "", e))
                }
            })
            .await
    }

    async fn storage(&self) -> Result<&Storage, Error> {
        self.storage
            .get_or_try_init(|| async {
                Storage::builder()
                    .with_endpoint(self.endpoint.clone())
                    .with_credentials(self.credentials().await?.clone())
                    .build()
                    .await
                    .map_err(|e| self.remote("connect", "", e))
            })
            .await
    }

    async fn auth_headers(&self) -> Result<reqwest::header::HeaderMap, Error> {
        if self.anonymous {
            return Ok(reqwest::header::HeaderMap::new());
        }
        match self
            .credentials()
            .await?
            .headers(http::Extensions::new())
            .await
            .map_err(|e| self.remote("authenticate", "", e))?
        {
            google_cloud_auth::credentials::CacheableResource::New { data, .. } => Ok(data),
            google_cloud_auth::credentials::CacheableResource::NotModified => Ok(reqwest::header::HeaderMap::new()),
        }
    }

    /// The generation of the object an upload answer describes.
    async fn generation_of(&self, name: &str, op: &'static str, resp: reqwest::Response) -> Result<String, Error> {
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| self.remote(op, name, e))?;
        if status == 412 {
            return Err(Error::Conflict {
                location: format!("{}/{name}", self.location()),
            });
        }
        if !(200..300).contains(&status) {
            return Err(self.remote(op, name, http_error(status, &text)));
        }
        #[derive(serde::Deserialize)]
        struct Written {
            generation: String,
        }
        serde_json::from_str::<Written>(&text)
            .map(|w| w.generation)
            .map_err(|e| self.remote(op, name, format!("unexpected answer ({e}): {text}")))
    }

    /// Starts reading an object, or `None` when it does not exist.
    async fn open(
        &self,
        name: &str,
        op: &'static str,
    ) -> Result<Option<google_cloud_storage::read_object::ReadObjectResponse>, Error> {
        match self.storage().await?.read_object(self.resource(), name).send().await {
            Ok(r) => Ok(Some(r)),
            // An absent object, unless the bucket is what is missing.
            Err(e) if e.http_status_code() == Some(404) => match self.bucket_missing(op, name).await? {
                Some(err) => Err(err),
                None => Ok(None),
            },
            Err(e) => Err(self.remote(op, name, e)),
        }
    }

    /// After a 404 on an object: the error when the bucket itself does not
    /// exist (a missing bucket is a failure, not an absent object). Once
    /// the bucket was seen, later 404s are taken as absent objects without
    /// asking again.
    async fn bucket_missing(&self, op: &'static str, name: &str) -> Result<Option<Error>, Error> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.bucket_seen.load(Relaxed) {
            return Ok(None);
        }
        let url = format!("{}/storage/v1/b/{}", self.endpoint, enc(&self.bucket));
        let resp = self
            .send(op, name, |auth| Ok(self.http.get(&url).headers(auth)))
            .await?;
        let status = resp.status();
        if status.is_success() {
            self.bucket_seen.store(true, Relaxed);
            return Ok(None);
        }
        let body = resp.text().await.unwrap_or_default();
        let message = match status.as_u16() {
            404 => format!("the bucket does not exist ({})", http_error(status, &body)),
            _ => http_error(status, &body),
        };
        Ok(Some(self.remote(op, name, message)))
    }

    /// Sends a JSON API request that `build` makes (again for each attempt,
    /// with fresh credentials), retrying what is transient as the S3 SDK
    /// does: connection failures, timeouts, 408, 429 and 5xx answers, up
    /// to [`ATTEMPTS`] times with jittered exponential backoff. Conditional
    /// writes are safe to repeat (GCS documents them as idempotent).
    async fn send(
        &self,
        op: &'static str,
        name: &str,
        build: impl Fn(reqwest::header::HeaderMap) -> Result<reqwest::RequestBuilder, Error> + Send + Sync,
    ) -> Result<reqwest::Response, Error> {
        let mut delay = std::time::Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let result = build(self.auth_headers().await?)?.send().await;
            let transient = match &result {
                Ok(r) => matches!(r.status().as_u16(), 408 | 429 | 500..=599),
                Err(e) => e.is_connect() || e.is_timeout() || e.is_request(),
            };
            if !transient || attempt == ATTEMPTS {
                return result.map_err(|e| self.remote(op, name, e));
            }
            let why = match &result {
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            tracing::debug!(op, object = %format!("{}/{name}", self.location()), why, attempt, "Retrying a GCS request");
            let jitter = rand_u64() % (delay.as_millis() as u64 / 2 + 1);
            tokio::time::sleep(delay + std::time::Duration::from_millis(jitter)).await;
            delay *= 4;
            attempt += 1;
        }
    }

    /// The JSON API's object collection of the bucket (`upload` for the
    /// upload endpoint).
    fn objects_url(&self, upload: bool) -> String {
        let base = if upload { "/upload" } else { "" };
        format!("{}{base}/storage/v1/b/{}/o", self.endpoint, enc(&self.bucket))
    }
}

#[async_trait::async_trait]
impl ObjectStore for GcsStore {
    fn location(&self) -> String {
        format!("gs://{}", self.bucket)
    }

    async fn get(&self, name: &str) -> Result<Option<(Vec<u8>, String)>, Error> {
        let Some(mut resp) = self.open(name, "read").await? else {
            return Ok(None);
        };
        let version = resp.object().generation.to_string();
        let mut data = Vec::new();
        while let Some(chunk) = resp.next().await {
            data.extend_from_slice(&chunk.map_err(|e| self.remote("read", name, e))?);
        }
        Ok(Some((data, version)))
    }

    async fn download(&self, name: &str, dest: &Path) -> Result<bool, Error> {
        let Some(mut resp) = self.open(name, "download").await? else {
            return Ok(false);
        };
        let mut sink = FileSink::create(dest).await?;
        while let Some(chunk) = resp.next().await {
            sink.write(&chunk.map_err(|e| self.remote("download", name, e))?)
                .await?;
        }
        sink.finish().await?;
        Ok(true)
    }

    async fn put(&self, name: &str, data: Vec<u8>, pre: Precondition) -> Result<String, Error> {
        // A multipart upload: metadata and data in one request, so the
        // generation precondition applies to the whole write.
        let boundary = format!("dewy-{:016x}", rand_u64());
        let mut body = format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{}\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n",
            serde_json::json!({ "name": name })
        )
        .into_bytes();
        body.extend_from_slice(&data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let mut query = vec![("uploadType", "multipart".to_owned())];
        match pre {
            Precondition::Any => {}
            Precondition::Absent => query.push(("ifGenerationMatch", "0".to_owned())),
            Precondition::Matches(g) => query.push(("ifGenerationMatch", g)),
        }
        let resp = self
            .send("write", name, |auth| {
                Ok(self
                    .http
                    .post(self.objects_url(true))
                    .headers(auth)
                    .header("content-type", format!("multipart/related; boundary={boundary}"))
                    .query(&query)
                    .body(body.clone()))
            })
            .await?;
        self.generation_of(name, "write", resp).await
    }

    async fn upload(&self, name: &str, src: &Path) -> Result<(), Error> {
        let resp = self
            .send("upload", name, |auth| {
                let file = std::fs::File::open(src).map_err(|e| Error::io("open", src, e))?;
                let file = tokio::fs::File::from_std(file);
                Ok(self
                    .http
                    .post(self.objects_url(true))
                    .headers(auth)
                    .header("content-type", "application/octet-stream")
                    .query(&[("uploadType", "media"), ("name", name)])
                    .body(reqwest::Body::from(file)))
            })
            .await?;
        self.generation_of(name, "upload", resp).await.map(drop)
    }

    async fn list(&self, prefix: &str, delimited: bool) -> Result<Listing, Error> {
        let mut out = Listing::default();
        let mut token: Option<String> = None;
        let url = self.objects_url(false);
        loop {
            let mut query = vec![("prefix", prefix.to_owned()), ("maxResults", "1000".to_owned())];
            if delimited {
                query.push(("delimiter", "/".to_owned()));
            }
            if let Some(t) = token.take() {
                query.push(("pageToken", t));
            }
            let resp = self
                .send("list", prefix, |auth| {
                    Ok(self.http.get(&url).headers(auth).query(&query))
                })
                .await?;
            let status = resp.status();
            let body = resp.text().await.map_err(|e| self.remote("list", prefix, e))?;
            if !status.is_success() {
                return Err(self.remote("list", prefix, http_error(status, &body)));
            }
            let page: JsonListing = serde_json::from_str(&body).map_err(|e| self.remote("list", prefix, e))?;
            for o in page.items {
                out.objects.push(ObjectInfo {
                    size: o.size.and_then(|s| s.parse().ok()).unwrap_or(0),
                    modified: o.updated.or(o.time_created).and_then(|t| t.parse().ok()),
                    name: o.name,
                });
            }
            out.prefixes.extend(page.prefixes);
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    async fn delete(&self, name: &str) -> Result<(), Error> {
        let url = format!("{}/{}", self.objects_url(false), enc(name));
        let resp = self
            .send("delete", name, |auth| Ok(self.http.delete(&url).headers(auth)))
            .await?;
        match resp.status().as_u16() {
            200..=299 | 404 => Ok(()),
            s => Err(self.remote("delete", name, format!("HTTP {s}"))),
        }
    }

    async fn request(&self, name: &str) -> Result<ObjectRequest, Error> {
        let headers = self
            .auth_headers()
            .await?
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        Ok(ObjectRequest {
            url: format!("{}/{}?alt=media", self.objects_url(false), enc(name)),
            headers,
        })
    }
}

/// A JSON API error answer as one line: `HTTP 404: Not Found (notFound)`,
/// from the body's `error.message` and first `reason`, else the body's
/// first line, shortened.
fn http_error(status: impl std::fmt::Display, body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let error = parsed.as_ref().map(|v| &v["error"]);
    match error.and_then(|e| e["message"].as_str()) {
        Some(message) => match error.and_then(|e| e["errors"][0]["reason"].as_str()) {
            Some(reason) if reason != message => format!("HTTP {status}: {message} ({reason})"),
            _ => format!("HTTP {status}: {message}"),
        },
        None => {
            let line: String = body.lines().next().unwrap_or_default().chars().take(200).collect();
            format!("HTTP {status}: {}", line.trim())
        }
    }
}
