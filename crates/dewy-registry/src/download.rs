//! Verified downloads into a staging folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{ArtifactRequest, Checksum, Error, Release, SafeUrl};

/// Limits and timeouts of a download.
#[derive(Debug, Clone)]
pub struct DownloadPolicy {
    /// Largest artifact accepted.
    pub max_bytes: u64,
    /// Attempts after the first one for transient failures.
    pub retries: u32,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Longest pause between two received chunks.
    pub idle_timeout: Duration,
    /// First backoff delay; doubled per attempt, with jitter.
    pub backoff: Duration,
}

impl Default for DownloadPolicy {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 30,
            retries: 4,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            backoff: Duration::from_millis(500),
        }
    }
}

/// Observer of download progress; the library never draws anything itself.
pub trait DownloadProgress: Send + Sync {
    /// Bytes received so far and the total when the server said it.
    fn on_progress(&self, _done: u64, _total: Option<u64>) {}
}

/// A [`DownloadProgress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;
impl DownloadProgress for NoProgress {}

/// A downloaded, verified artifact in the staging folder. The file is
/// removed when this is dropped, unless it was moved away first.
#[derive(Debug)]
pub struct Downloaded {
    /// The file.
    pub path: tempfile::TempPath,
    /// Its SHA-256 (lower-case hex).
    pub sha256: String,
    /// Its size.
    pub size: u64,
}

/// Fetches artifacts (`file://`, `http://`, `https://`).
#[derive(Debug, Clone)]
pub struct Downloader {
    client: reqwest::Client,
    policy: DownloadPolicy,
}

/// The download in progress. Bytes are gathered into 1 MiB blocks and
/// handed to a writer thread that hashes and writes them, so receiving the
/// next bytes overlaps with hashing and writing the previous ones, thread
/// hand-offs happen once per block (not per network chunk), and memory stays
/// bounded (the block being filled plus `IN_FLIGHT` blocks).
struct Partial {
    block: Vec<u8>,
    tx: Option<tokio::sync::mpsc::Sender<Block>>,
    writer: Option<std::thread::JoinHandle<std::io::Result<(String, u64)>>>,
    size: u64,
}

enum Block {
    Data(Vec<u8>),
    /// The server ignored the range: start the file over.
    Reset,
}

const BLOCK: usize = 1 << 20;
const IN_FLIGHT: usize = 4;

impl Partial {
    fn new(file: std::fs::File) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Block>(IN_FLIGHT);
        let writer = std::thread::spawn(move || -> std::io::Result<(String, u64)> {
            use std::io::{Seek, Write};
            let mut file = file;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(block) = rx.blocking_recv() {
                match block {
                    Block::Data(b) => {
                        hasher.update(&b);
                        file.write_all(&b)?;
                        size += b.len() as u64;
                    }
                    Block::Reset => {
                        file.set_len(0)?;
                        file.seek(std::io::SeekFrom::Start(0))?;
                        hasher = Sha256::new();
                        size = 0;
                    }
                }
            }
            // Durable before it may be renamed into the cache.
            file.sync_all()?;
            Ok((hex::encode(hasher.finalize()), size))
        });
        Self {
            block: Vec::with_capacity(BLOCK),
            tx: Some(tx),
            writer: Some(writer),
            size: 0,
        }
    }

    async fn send(&mut self, block: Block) -> std::io::Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| std::io::Error::other("download already finished"))?;
        // Waits without a thread hop while the writer is IN_FLIGHT blocks behind.
        tx.send(block).await.map_err(|_| self.writer_failed())
    }

    fn writer_failed(&self) -> std::io::Error {
        std::io::Error::other("the download writer stopped (disk full or unwritable?)")
    }

    async fn push(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.size += bytes.len() as u64;
        self.block.extend_from_slice(bytes);
        if self.block.len() >= BLOCK {
            let full = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
            self.send(Block::Data(full)).await?;
        }
        Ok(())
    }

    async fn reset(&mut self) -> std::io::Result<()> {
        self.block.clear();
        self.size = 0;
        self.send(Block::Reset).await
    }

    /// Writes what is left, syncs, and returns the SHA-256 and size.
    async fn finish(&mut self) -> std::io::Result<(String, u64)> {
        if !self.block.is_empty() {
            let rest = std::mem::take(&mut self.block);
            self.send(Block::Data(rest)).await?;
        }
        self.tx.take();
        let writer = self
            .writer
            .take()
            .ok_or_else(|| std::io::Error::other("download already finished"))?;
        tokio::task::spawn_blocking(move || {
            writer
                .join()
                .map_err(|_| std::io::Error::other("download writer panicked"))?
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

impl Downloader {
    /// A downloader with `policy`. The process must have installed a rustls
    /// crypto provider before HTTPS is used.
    pub fn new(policy: DownloadPolicy) -> Result<Self, Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(policy.connect_timeout)
            .read_timeout(policy.idle_timeout)
            .user_agent(concat!("dewy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Transport {
                url: "(client)".into(),
                source: Box::new(e),
            })?;
        Ok(Self { client, policy })
    }

    /// Downloads the artifact of `release` into `staging`, verifies it
    /// against the release's checksum, and returns the file. On any error
    /// nothing is left in `staging`.
    pub async fn fetch(
        &self,
        release: &Release,
        staging: &Path,
        progress: &dyn DownloadProgress,
    ) -> Result<Downloaded, Error> {
        let request = ArtifactRequest::plain(&release.artifact_url);
        self.fetch_request(&request, release.checksum.as_ref(), staging, progress)
            .await
    }

    /// Downloads what `request` names into `staging` and verifies it against
    /// `checksum` when one is known. Headers go to the first host only:
    /// redirects to another host do not carry `Authorization`.
    pub async fn fetch_request(
        &self,
        request: &ArtifactRequest,
        checksum: Option<&Checksum>,
        staging: &Path,
        progress: &dyn DownloadProgress,
    ) -> Result<Downloaded, Error> {
        let url = request.url.as_str();
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(staging)
            .map_err(|e| Error::io("create download file in", staging, e))?;
        let (std_file, path) = tmp.into_parts();
        let mut partial = Partial::new(std_file);
        if let Some(rest) = url.strip_prefix("file://") {
            let src = url::Url::parse(url)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .unwrap_or_else(|| PathBuf::from(rest));
            self.copy_local(&src, url, &mut partial, progress).await?;
        } else if url.starts_with("http://") || url.starts_with("https://") {
            self.fetch_http(request, &mut partial, progress).await?;
        } else {
            return Err(Error::InvalidUrl {
                url: SafeUrl(url).to_string(),
                reason: "artifact URLs must be file://, http:// or https://".into(),
            });
        }
        let (sha256, written) = partial.finish().await.map_err(|e| Error::io("write", &*path, e))?;
        debug_assert_eq!(written, partial.size);
        if let Some(expected) = checksum
            && !expected.sha256.eq_ignore_ascii_case(&sha256)
        {
            return Err(Error::ChecksumMismatch {
                url: SafeUrl(url).to_string(),
                expected: expected.sha256.clone(),
                actual: sha256,
                source_name: expected.source.clone(),
            });
        }
        Ok(Downloaded {
            path,
            sha256,
            size: partial.size,
        })
    }

    async fn append(&self, url: &str, partial: &mut Partial, chunk: &[u8]) -> Result<(), Error> {
        if partial.size + chunk.len() as u64 > self.policy.max_bytes {
            return Err(Error::TooLarge {
                url: SafeUrl(url).to_string(),
                limit: self.policy.max_bytes,
            });
        }
        partial
            .push(chunk)
            .await
            .map_err(|e| Error::io("write download of", PathBuf::from(SafeUrl(url).to_string()), e))
    }

    async fn copy_local(
        &self,
        src: &Path,
        url: &str,
        partial: &mut Partial,
        progress: &dyn DownloadProgress,
    ) -> Result<(), Error> {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(src)
            .await
            .map_err(|e| Error::io("open artifact", src, e))?;
        let total = file.metadata().await.ok().map(|m| m.len());
        let mut buf = vec![0u8; BLOCK];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| Error::io("read artifact", src, e))?;
            if n == 0 {
                return Ok(());
            }
            self.append(url, partial, &buf[..n]).await?;
            progress.on_progress(partial.size, total);
        }
    }

    async fn fetch_http(
        &self,
        request: &ArtifactRequest,
        partial: &mut Partial,
        progress: &dyn DownloadProgress,
    ) -> Result<(), Error> {
        let url = request.url.as_str();
        let mut attempt = 0;
        let mut validator: Option<String> = None;
        loop {
            match self.fetch_http_once(request, partial, progress, &mut validator).await {
                Ok(()) => return Ok(()),
                Err(err) if err.is_transient() && attempt < self.policy.retries => {
                    attempt += 1;
                    let base = self.policy.backoff * 2u32.pow(attempt - 1);
                    let jitter = base.mul_f64(rand::random::<f64>() * 0.5);
                    let delay = base + jitter;
                    tracing::warn!(url = %SafeUrl(url), attempt, error = %err, delay_ms = delay.as_millis() as u64, bytes_so_far = partial.size, "Download attempt failed, retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn restart(&self, partial: &mut Partial, url: &str) -> Result<(), Error> {
        partial
            .reset()
            .await
            .map_err(|e| Error::io("truncate download of", PathBuf::from(SafeUrl(url).to_string()), e))
    }

    async fn fetch_http_once(
        &self,
        request: &ArtifactRequest,
        partial: &mut Partial,
        progress: &dyn DownloadProgress,
        validator: &mut Option<String>,
    ) -> Result<(), Error> {
        let url = request.url.as_str();
        let safe = || SafeUrl(url).to_string();
        let transport = |e: reqwest::Error| Error::Transport {
            url: SafeUrl(url).to_string(),
            source: Box::new(e),
        };
        let mut req = self.client.get(url);
        for (name, value) in &request.headers {
            req = req.header(name.as_str(), value.as_str());
        }
        let resuming = partial.size > 0 && validator.is_some();
        if resuming {
            req = req.header("Range", format!("bytes={}-", partial.size));
            if let Some(v) = validator.as_deref() {
                req = req.header("If-Range", v);
            }
        } else if partial.size > 0 {
            self.restart(partial, url).await?;
        }
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let total = match status {
            206 if resuming => {
                let range = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let start = range
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.parse::<u64>().ok());
                if start != Some(partial.size) {
                    // The server resumed somewhere else: start over.
                    self.restart(partial, url).await?;
                    *validator = None;
                    return Err(Error::Transport {
                        url: safe(),
                        source: format!("unexpected Content-Range `{range}`").into(),
                    });
                }
                tracing::info!(url = %SafeUrl(url), offset = partial.size, "Resuming download");
                range.rsplit('/').next().and_then(|t| t.parse::<u64>().ok())
            }
            200 => {
                if partial.size > 0 {
                    self.restart(partial, url).await?;
                }
                resp.content_length()
            }
            _ => return Err(Error::HttpStatus { url: safe(), status }),
        };
        if let Some(t) = total
            && t > self.policy.max_bytes
        {
            return Err(Error::TooLarge {
                url: safe(),
                limit: self.policy.max_bytes,
            });
        }
        *validator = resp
            .headers()
            .get("etag")
            .or_else(|| resp.headers().get("last-modified"))
            .and_then(|v| v.to_str().ok())
            .filter(|_| {
                resp.headers()
                    .get("accept-ranges")
                    .is_some_and(|v| v.as_bytes() == b"bytes")
            })
            .map(str::to_owned);
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            self.append(url, partial, &chunk).await?;
            progress.on_progress(partial.size, total);
        }
        if let Some(t) = total
            && partial.size != t
        {
            return Err(Error::Transport {
                url: safe(),
                source: format!("body ended after {} of {t} bytes", partial.size).into(),
            });
        }
        Ok(())
    }
}
