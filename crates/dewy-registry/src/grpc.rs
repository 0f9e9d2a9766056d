//! `grpc://HOST:PORT`: a team's own service answers which release this host
//! runs, through Dewy's `dewy.RegistryService` (wire-compatible: the
//! original's .proto, compiled at build time by protox, no `protoc`).
//!
//! Options: `no-tls=true` (plaintext, as Dewy), `artifact=NAME`,
//! `calver=FORMAT`, and dewy's own `ca-cert=PATH` (trust this CA instead of
//! the system roots), `client-cert=PATH` + `client-key=PATH` (mutual TLS).
//! A bearer token ([`OpenOptions::grpc_token`], from `DEWY_GRPC_TOKEN`) is
//! sent as `authorization: Bearer …` metadata, marked sensitive.
//!
//! The answer's `artifact_url` may be `http(s)://`, `file://`, `s3://`,
//! `gs://` or Dewy's `ghr://owner/repo/tag/<tag>/<asset>`; an empty one is
//! a release not published yet, and so is NOT_FOUND with a `created-at`
//! trailer (RFC 3339): both count against the grace period from
//! `created_at`. `Report` is sent after every deploy attempt, with `err`
//! set to the error chain when it failed.

use std::collections::HashMap;
#[cfg(feature = "github")]
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{ArtifactRequest, CommonOptions, Error, OpenOptions, Platform, Registry, Release, Report, SafeUrl, Scheme};

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("dewy");
}

use pb::registry_service_client::RegistryServiceClient;

/// Time allowed for one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of a call answered UNAVAILABLE (or a connection that failed).
const ATTEMPTS: u32 = 4;
/// First backoff; doubled per attempt, with jitter.
const BACKOFF: Duration = Duration::from_millis(250);

/// The `grpc://` registry.
pub struct GrpcRegistry {
    location: String,
    endpoint: Endpoint,
    client: tokio::sync::OnceCell<RegistryServiceClient<Channel>>,
    token: Option<String>,
    artifact: Option<String>,
    scheme: Scheme,
    platform: Platform,
    /// Credentials for the artifact URLs the service answers.
    #[cfg_attr(not(any(feature = "github", feature = "s3", feature = "gcs")), allow(dead_code))]
    options: OpenOptions,
    /// `ghr://owner/repo` registries that resolve Dewy's GitHub artifact
    /// URLs, kept for their conditional-request caches.
    #[cfg(feature = "github")]
    github: Mutex<HashMap<String, Arc<crate::GithubRegistry>>>,
}

impl std::fmt::Debug for GrpcRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcRegistry")
            .field("location", &self.location)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl GrpcRegistry {
    const OWN: &'static [&'static str] = &["no-tls", "ca-cert", "client-cert", "client-key"];

    /// Builds one from `grpc://HOST:PORT?no-tls=&artifact=&calver=&ca-cert=&client-cert=&client-key=`.
    /// Certificate files are read here, so a missing one fails at start.
    pub fn from_url(url: &url::Url, opts: &OpenOptions) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidUrl {
            url: SafeUrl(url.as_str()).to_string(),
            reason,
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("expected grpc://HOST:PORT".into()))?;
        let port = url
            .port()
            .ok_or_else(|| invalid("expected grpc://HOST:PORT (the port is required)".into()))?;
        if !matches!(url.path(), "" | "/") {
            return Err(invalid("expected grpc://HOST:PORT, without a path".into()));
        }
        let mut own: HashMap<&str, String> = HashMap::new();
        let mut rest = Vec::new();
        for (k, v) in url.query_pairs() {
            match Self::OWN.iter().find(|o| **o == k) {
                Some(o) => {
                    own.insert(o, v.into_owned());
                }
                None => rest.push((k.into_owned(), v.into_owned())),
            }
        }
        let common = CommonOptions::parse_pairs(url, rest.iter().map(|(k, v)| (k.as_str(), v.as_str())), Self::OWN)?;
        if common.pre_release {
            return Err(Error::UnknownOption {
                option: "pre-release".into(),
                valid: ["artifact", "calver"].iter().chain(Self::OWN).copied().collect(),
            });
        }
        let selection = common.selection(opts, url)?;
        let no_tls = match own.get("no-tls").map(String::as_str) {
            None | Some("false" | "0") => false,
            Some("true" | "1" | "") => true,
            Some(other) => return Err(invalid(format!("`no-tls={other}` is not a boolean (true or false)"))),
        };
        if no_tls
            && ["ca-cert", "client-cert", "client-key"]
                .iter()
                .any(|o| own.contains_key(o))
        {
            return Err(invalid(
                "`ca-cert`, `client-cert` and `client-key` need TLS; remove `no-tls=true`".into(),
            ));
        }
        let read = |option: &str| -> Result<Option<Vec<u8>>, Error> {
            match own.get(option).filter(|p| !p.is_empty()) {
                None => Ok(None),
                Some(path) => std::fs::read(path)
                    .map(Some)
                    .map_err(|e| invalid(format!("cannot read `{option}={path}`: {e}"))),
            }
        };
        let (ca, cert, key) = (read("ca-cert")?, read("client-cert")?, read("client-key")?);
        let address = format!("{}://{host}:{port}", if no_tls { "http" } else { "https" });
        let mut endpoint = Endpoint::from_shared(address)
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .user_agent(concat!("dewy/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| invalid(e.to_string()))?;
        if !no_tls {
            let mut tls = ClientTlsConfig::new().domain_name(host);
            tls = match ca {
                Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                None => tls.with_native_roots(),
            };
            match (cert, key) {
                (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(cert, key)),
                (None, None) => {}
                _ => {
                    return Err(invalid(
                        "`client-cert` and `client-key` go together (mutual TLS)".into(),
                    ));
                }
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| invalid(format!("TLS: {e}")))?;
        }
        Ok(Self {
            location: format!("grpc://{host}:{port}"),
            endpoint,
            client: tokio::sync::OnceCell::new(),
            token: opts.grpc_token.clone().filter(|t| !t.is_empty()),
            artifact: common.artifact,
            scheme: selection.scheme,
            platform: opts.platform.clone(),
            options: opts.clone(),
            #[cfg(feature = "github")]
            github: Mutex::new(HashMap::new()),
        })
    }

    /// The client, connected lazily (inside the runtime, on first use).
    async fn client(&self) -> RegistryServiceClient<Channel> {
        self.client
            .get_or_init(|| async { RegistryServiceClient::new(self.endpoint.connect_lazy()) })
            .await
            .clone()
    }

    /// A request with the deadline and the bearer token.
    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        if let Some(token) = &self.token {
            let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {token}").parse().map_err(|_| Error::Credentials {
                    reason: "DEWY_GRPC_TOKEN holds characters that cannot be sent in gRPC metadata".into(),
                })?;
            value.set_sensitive(true);
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    /// Runs `call` again while the service answers UNAVAILABLE (or cannot
    /// be reached), with backoff and jitter.
    async fn with_retries<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Err(status) if status.code() == tonic::Code::Unavailable && attempt + 1 < ATTEMPTS => {
                    attempt += 1;
                    let base = BACKOFF * 2u32.pow(attempt - 1);
                    let delay = base + base.mul_f64(rand::random::<f64>() * 0.5);
                    tracing::debug!(registry = %self.location, call = what, attempt, message = status.message(), delay_ms = delay.as_millis() as u64, "gRPC registry unavailable, retrying");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    fn status_error(&self, status: &tonic::Status) -> Error {
        Error::Grpc {
            registry: self.location.clone(),
            code: code_name(status.code()),
            message: status.message().to_owned(),
        }
    }

    /// How to fetch `url`, an artifact URL the service answered.
    async fn resolve(&self, url: &str) -> Result<ArtifactRequest, Error> {
        let invalid = |reason: &str| Error::InvalidUrl {
            url: SafeUrl(url).to_string(),
            reason: format!("{reason} (answered by {})", self.location),
        };
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
        match scheme {
            "http" | "https" | "file" => Ok(ArtifactRequest::plain(url)),
            #[cfg(any(feature = "s3", feature = "gcs"))]
            "s3" | "gs" => {
                let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
                let opened = dewy_store::open_store(&parsed, &self.options.cloud).map_err(|source| Error::Store {
                    location: SafeUrl(url).to_string(),
                    source,
                })?;
                let key = opened.prefix.trim_end_matches('/');
                if key.is_empty() {
                    return Err(invalid("expected an object: s3://REGION/BUCKET/KEY or gs://BUCKET/KEY"));
                }
                opened.store.request(key).await.map_err(|source| Error::Store {
                    location: SafeUrl(url).to_string(),
                    source,
                })
            }
            #[cfg(feature = "github")]
            "ghr" => {
                // Dewy's form: ghr://owner/repo/tag/<tag>/<asset>.
                let parts: Vec<&str> = url["ghr://".len()..].split('/').collect();
                let [owner, repo, "tag", tag, asset] = parts[..] else {
                    return Err(invalid("expected ghr://OWNER/REPO/tag/TAG/ASSET"));
                };
                let repo_url = format!("ghr://{owner}/{repo}");
                let github = {
                    let mut cache = self.github.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    match cache.get(&repo_url) {
                        Some(g) => g.clone(),
                        None => {
                            let parsed = url::Url::parse(&repo_url).map_err(|e| invalid(&e.to_string()))?;
                            let g = Arc::new(crate::GithubRegistry::from_url(&parsed, &self.options)?);
                            cache.insert(repo_url, g.clone());
                            g
                        }
                    }
                };
                github.named_asset_request(tag, asset).await
            }
            _ => Err(invalid(
                "dewy downloads http(s)://, file://, s3://, gs:// and ghr://OWNER/REPO/tag/TAG/ASSET artifact URLs",
            )),
        }
    }
}

/// The gRPC status code as the spec names it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Go's `GOARCH` for a Rust architecture, as existing services match on it.
fn go_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        other => other,
    }
}

/// Go's `GOOS` for a Rust OS.
fn go_os(os: &str) -> &str {
    match os {
        "macos" => "darwin",
        other => other,
    }
}

fn timestamp(t: &prost_types::Timestamp) -> Option<jiff::Timestamp> {
    jiff::Timestamp::new(t.seconds, t.nanos).ok()
}

#[async_trait::async_trait]
impl Registry for GrpcRegistry {
    async fn latest(&self) -> Result<Release, Error> {
        let client = self.client().await;
        let message = pb::CurrentRequest {
            arch: go_arch(&self.platform.arch).to_owned(),
            os: go_os(&self.platform.os).to_owned(),
            // Dewy's wire name (sic).
            arifact_name: self.artifact.clone(),
        };
        let answer = self
            .with_retries("Current", || {
                let mut client = client.clone();
                let request = self.request(message.clone());
                async move {
                    let request = request.map_err(|e| tonic::Status::internal(e.to_string()))?;
                    client.current(request).await
                }
            })
            .await;
        let response = match answer {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                // NOT_FOUND with the release's creation time: not published
                // for this host yet (the grace period case).
                let created_at = status
                    .metadata()
                    .get("created-at")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<jiff::Timestamp>().ok());
                if created_at.is_some() {
                    return Err(Error::ArtifactNotFound {
                        tag: status
                            .metadata()
                            .get("tag")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("(not named)")
                            .to_owned(),
                        wanted: self.artifact.clone(),
                        published_at: created_at,
                    });
                }
                return Err(self.status_error(&status));
            }
            Err(status) => return Err(self.status_error(&status)),
        };
        let published_at = response.created_at.as_ref().and_then(timestamp);
        if response.artifact_url.is_empty() {
            return Err(Error::ArtifactNotFound {
                tag: response.tag,
                wanted: self.artifact.clone(),
                published_at,
            });
        }
        let version = self.scheme.parse(&response.tag).ok_or_else(|| Error::InvalidUrl {
            url: self.location.clone(),
            reason: format!("the service answered tag `{}`, which is not a version", response.tag),
        })?;
        let path = response.artifact_url.split(['?', '#']).next().unwrap_or_default();
        let artifact_name = path.rsplit('/').next().unwrap_or_default().to_owned();
        Ok(Release {
            id: response.id,
            tag: response.tag,
            slot: version.build.clone(),
            version,
            artifact_name,
            signature_url: Some(format!("{path}{}", crate::SIGNATURE_SUFFIX)),
            artifact_url: response.artifact_url,
            published_at,
            checksum: None,
        })
    }

    async fn report(&self, report: &Report) -> Result<(), Error> {
        let client = self.client().await;
        let message = pb::ReportRequest {
            id: report.release_id.clone(),
            tag: report.tag.clone(),
            command: report.command.clone(),
            err: report.error.clone(),
        };
        self.with_retries("Report", || {
            let mut client = client.clone();
            let request = self.request(message.clone());
            async move {
                let request = request.map_err(|e| tonic::Status::internal(e.to_string()))?;
                client.report(request).await
            }
        })
        .await
        .map(|_| ())
        .map_err(|status| self.status_error(&status))
    }

    fn reports_failures(&self) -> bool {
        true
    }

    async fn artifact_request(&self, release: &Release) -> Result<ArtifactRequest, Error> {
        self.resolve(&release.artifact_url).await
    }

    async fn signature_request(&self, release: &Release) -> Result<Option<ArtifactRequest>, Error> {
        let Some(url) = &release.signature_url else {
            return Ok(None);
        };
        match self.resolve(url).await {
            Ok(request) => Ok(Some(request)),
            // A GitHub release without the `.minisig` asset.
            Err(Error::ArtifactNotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(url: &str) -> Result<GrpcRegistry, Error> {
        GrpcRegistry::from_url(&url::Url::parse(url).unwrap(), &OpenOptions::default())
    }

    #[test]
    fn urls_and_options() {
        open("grpc://registry.internal:9000").unwrap();
        open("grpc://127.0.0.1:9000?no-tls=true&artifact=app.tar.gz").unwrap();
        let err = open("grpc://127.0.0.1").unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
        let err = open("grpc://h:1?bogus=1").unwrap_err().to_string();
        assert!(err.contains("`bogus`") && err.contains("ca-cert"), "{err}");
        let err = open("grpc://h:1?ca-cert=/nonexistent.pem").unwrap_err().to_string();
        assert!(err.contains("ca-cert=/nonexistent.pem"), "{err}");
        let err = open("grpc://h:1?no-tls=true&ca-cert=/x").unwrap_err().to_string();
        assert!(err.contains("need TLS"), "{err}");
        let err = open("grpc://h:1?pre-release=true").unwrap_err().to_string();
        assert!(err.contains("pre-release"), "{err}");
    }

    #[test]
    fn go_platform_names() {
        assert_eq!((go_os("linux"), go_arch("x86_64")), ("linux", "amd64"));
        assert_eq!((go_os("macos"), go_arch("aarch64")), ("darwin", "arm64"));
    }
}
