//! Verified downloads into a staging folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::signature::{SIGNATURE_MAX_BYTES, SIGNATURE_SUFFIX, SignatureCheck, SignatureError, TrustedKeys};
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

/// The download in progress. Received chunks are batched (without copying)
/// into blocks of about 1 MiB, and each block goes to two threads: one
/// writes it to the file, one hashes it. Receiving, writing and hashing thus
/// overlap, thread hand-offs happen once per block (not per network chunk),
/// and memory stays bounded (the block being filled plus `IN_FLIGHT` blocks).
struct Partial {
    block: Vec<Bytes>,
    block_len: usize,
    workers: Option<Workers>,
    size: u64,
}

struct Workers {
    to_writer: tokio::sync::mpsc::Sender<Block>,
    to_hasher: tokio::sync::mpsc::Sender<Block>,
    writer: std::thread::JoinHandle<std::io::Result<u64>>,
    hasher: std::thread::JoinHandle<Digests>,
}

/// What the hashing thread computed: the SHA-256 and, when a signature was
/// to be checked, its verdict.
struct Digests {
    sha256: String,
    signature: Option<Result<(), SignatureError>>,
}

#[derive(Clone)]
enum Block {
    Data(Arc<[Bytes]>),
    /// The server ignored the range: start the file over.
    Reset,
    /// Everything was sent: make the file durable. Without this the
    /// download was abandoned and the writer does not bother syncing.
    Finish,
}

const BLOCK: usize = 1 << 20;
const IN_FLIGHT: usize = 4;
/// Writeback to disk is started every this many bytes, so that the disk
/// writes while the network receives and the final fsync only waits for the
/// tail (instead of for the whole artifact, as `curl -o F && sync F` does).
const WRITEBACK_EVERY: u64 = 8 << 20;

fn write_blocks(mut file: std::fs::File, mut rx: tokio::sync::mpsc::Receiver<Block>) -> std::io::Result<u64> {
    use std::io::{Seek, Write};
    let mut size = 0u64;
    let mut written_back = 0u64;
    while let Some(block) = rx.blocking_recv() {
        match block {
            Block::Data(chunks) => {
                for chunk in chunks.iter() {
                    file.write_all(chunk)?;
                    size += chunk.len() as u64;
                }
                if size - written_back >= WRITEBACK_EVERY {
                    start_writeback(&file, written_back, size - written_back);
                    written_back = size;
                }
            }
            Block::Reset => {
                file.set_len(0)?;
                file.seek(std::io::SeekFrom::Start(0))?;
                size = 0;
                written_back = 0;
            }
            Block::Finish => {
                // Durable before it may be renamed into the cache.
                file.sync_all()?;
                return Ok(size);
            }
        }
    }
    Err(std::io::Error::other("download abandoned"))
}

/// Hashes the blocks, and feeds them to the signature's verifier in the
/// same pass: the artifact is read once.
fn hash_blocks(mut rx: tokio::sync::mpsc::Receiver<Block>, signature: Option<SignatureCheck>) -> Digests {
    let mut hasher = Sha256::new();
    let mut verifier = signature.as_ref().map(SignatureCheck::verifier);
    while let Some(block) = rx.blocking_recv() {
        match block {
            Block::Data(chunks) => {
                for c in chunks.iter() {
                    hasher.update(c);
                    if let Some(Ok(v)) = &mut verifier {
                        v.update(c);
                    }
                }
            }
            Block::Reset => {
                hasher = Sha256::new();
                verifier = signature.as_ref().map(SignatureCheck::verifier);
            }
            Block::Finish => break,
        }
    }
    Digests {
        sha256: hex::encode(hasher.finalize()),
        signature: signature.as_ref().zip(verifier).map(|(s, v)| s.finish(v?)),
    }
}

impl Partial {
    fn new(file: std::fs::File, signature: Option<SignatureCheck>) -> Self {
        let (to_writer, writer_rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
        let (to_hasher, hasher_rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
        Self {
            block: Vec::new(),
            block_len: 0,
            workers: Some(Workers {
                to_writer,
                to_hasher,
                writer: std::thread::spawn(move || write_blocks(file, writer_rx)),
                hasher: std::thread::spawn(move || hash_blocks(hasher_rx, signature)),
            }),
            size: 0,
        }
    }

    async fn send(&mut self, block: Block) -> std::io::Result<()> {
        let workers = self
            .workers
            .as_ref()
            .ok_or_else(|| std::io::Error::other("download already finished"))?;
        // Waits without a thread hop while a worker is IN_FLIGHT blocks behind.
        if workers.to_hasher.send(block.clone()).await.is_ok() && workers.to_writer.send(block).await.is_ok() {
            return Ok(());
        }
        // Only the writer stops early (disk full, I/O error): say why.
        let (_, size) = self.join().await?;
        Err(std::io::Error::other(format!(
            "the download writer stopped after {size} bytes"
        )))
    }

    /// Ends the workers and returns the digests and the size written.
    async fn join(&mut self) -> std::io::Result<(Digests, u64)> {
        let Workers {
            to_writer,
            to_hasher,
            writer,
            hasher,
        } = self
            .workers
            .take()
            .ok_or_else(|| std::io::Error::other("download already finished"))?;
        drop((to_writer, to_hasher));
        tokio::task::spawn_blocking(move || {
            let panicked = |_| std::io::Error::other("download worker panicked");
            let size = writer.join().map_err(panicked)??;
            let digests = hasher.join().map_err(panicked)?;
            Ok((digests, size))
        })
        .await
        .map_err(std::io::Error::other)?
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let chunks: Arc<[Bytes]> = std::mem::take(&mut self.block).into();
        self.block_len = 0;
        self.send(Block::Data(chunks)).await
    }

    async fn push(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.size += bytes.len() as u64;
        self.block_len += bytes.len();
        self.block.push(bytes);
        if self.block_len >= BLOCK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn reset(&mut self) -> std::io::Result<()> {
        self.block.clear();
        self.block_len = 0;
        self.size = 0;
        self.send(Block::Reset).await
    }

    /// Writes what is left, syncs, and returns the digests and size.
    async fn finish(&mut self) -> std::io::Result<(Digests, u64)> {
        self.flush().await?;
        self.send(Block::Finish).await?;
        self.join().await
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to
/// disk, without waiting for it. Failures are ignored here: the fsync at
/// the end reports any I/O error.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range(2) takes no pointers, only integers; the
    // descriptor is borrowed from `file`, so it stays open for the call.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}

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
                op: "download of",
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
        self.fetch_verified(request, checksum, None, staging, progress).await
    }

    /// [`Downloader::fetch_request`], and verifies the publisher's
    /// `signature` in the same pass that computes the SHA-256: a file that
    /// does not match is removed and [`Error::Signature`] returned.
    pub async fn fetch_verified(
        &self,
        request: &ArtifactRequest,
        checksum: Option<&Checksum>,
        signature: Option<&SignatureCheck>,
        staging: &Path,
        progress: &dyn DownloadProgress,
    ) -> Result<Downloaded, Error> {
        let url = request.url.as_str();
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(staging)
            .map_err(|e| Error::io("create download file in", staging, e))?;
        let (std_file, path) = tmp.into_parts();
        let mut partial = Partial::new(std_file, signature.cloned());
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
        let (Digests { sha256, signature }, written) =
            partial.finish().await.map_err(|e| Error::io("write", &*path, e))?;
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
        if let Some(Err(source)) = signature {
            return Err(Error::Signature {
                url: SafeUrl(url).to_string(),
                source,
            });
        }
        Ok(Downloaded {
            path,
            sha256,
            size: partial.size,
        })
    }

    /// The publisher's signature of `release`'s artifact, fetched from
    /// `registry` and matched to one of `keys`, before the artifact is
    /// downloaded. A signature that is missing, malformed, legacy or by an
    /// unknown key is [`Error::Signature`]; other errors (network) are
    /// worth retrying.
    pub async fn signature(
        &self,
        registry: &dyn crate::Registry,
        release: &Release,
        keys: &TrustedKeys,
    ) -> Result<SignatureCheck, Error> {
        let Some(request) = registry.signature_request(release).await? else {
            let expected = format!("{}{SIGNATURE_SUFFIX}", release.artifact_name);
            return Err(Error::Signature {
                url: SafeUrl(&release.artifact_url).to_string(),
                source: SignatureError::Missing { file: expected },
            });
        };
        let text = self.fetch_signature(&request).await?;
        let url = SafeUrl(request.url.as_str()).to_string();
        keys.check(&text, &url)
            .map_err(|source| Error::Signature { url, source })
    }

    /// A signature file: its text, or [`SignatureError::Missing`] when the
    /// server says it does not exist (HTTP 404, no such file). Small
    /// (at most 64 KiB), retried like downloads.
    async fn fetch_signature(&self, request: &ArtifactRequest) -> Result<String, Error> {
        let url = request.url.as_str();
        let missing = || Error::Signature {
            url: SafeUrl(url).to_string(),
            source: SignatureError::Missing {
                file: SafeUrl(url).to_string(),
            },
        };
        let staging = std::env::temp_dir();
        let small = Self {
            client: self.client.clone(),
            policy: DownloadPolicy {
                max_bytes: SIGNATURE_MAX_BYTES,
                ..self.policy.clone()
            },
        };
        let fetched = small.fetch_request(request, None, &staging, &NoProgress).await;
        let file = match fetched {
            Ok(file) => file,
            Err(Error::HttpStatus { status: 404, .. }) => return Err(missing()),
            Err(Error::Io {
                op: "open artifact",
                source,
                ..
            }) if source.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
            Err(err) => return Err(err),
        };
        let text = tokio::fs::read(&file.path)
            .await
            .map_err(|e| Error::io("read signature", &*file.path, e))?;
        String::from_utf8(text).map_err(|_| Error::Signature {
            url: SafeUrl(url).to_string(),
            source: SignatureError::Malformed {
                file: SafeUrl(url).to_string(),
                reason: "not text".into(),
            },
        })
    }

    async fn append(&self, url: &str, partial: &mut Partial, chunk: Bytes) -> Result<(), Error> {
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
        let mut buf = bytes::BytesMut::new();
        loop {
            // Reuses the allocation once every earlier piece was written.
            buf.reserve(BLOCK);
            let n = file
                .read_buf(&mut buf)
                .await
                .map_err(|e| Error::io("read artifact", src, e))?;
            if n == 0 {
                return Ok(());
            }
            self.append(url, partial, buf.split().freeze()).await?;
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
            op: "download of",
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
                        op: "download of",
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
            self.append(url, partial, chunk).await?;
            progress.on_progress(partial.size, total);
        }
        if let Some(t) = total
            && partial.size != t
        {
            return Err(Error::Transport {
                op: "download of",
                url: safe(),
                source: format!("body ended after {} of {t} bytes", partial.size).into(),
            });
        }
        Ok(())
    }
}
