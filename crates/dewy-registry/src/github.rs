//! The `ghr://owner/repo` registry: GitHub Releases, polled cheaply.
//!
//! # Polling cost
//!
//! Each tick asks for the first page of releases (100 per page) with the
//! validators of the previous answer (`If-None-Match`, `If-Modified-Since`).
//! While nothing changed GitHub answers 304, which does not count against
//! the rate limit, and the previous choice is reused. When the first page
//! changed, every page is read again (each one conditionally), because the
//! newest *version* is not necessarily the newest *release*: a hotfix
//! `v1.4.9` published after `v2.0.0` must not downgrade the fleet. That is
//! also why dewy does not use the `releases/latest` endpoint, which follows
//! publish order.
//!
//! # Rate limits
//!
//! `x-ratelimit-remaining` / `x-ratelimit-reset` and `Retry-After` are read
//! on every answer. After a 403 or 429 limit answer, or when the remaining
//! budget reaches 0, no request is sent until the reset time: each tick in
//! between fails fast with [`Error::RateLimited`], which names the time of
//! the next attempt.
//!
//! # Downloads
//!
//! Assets are fetched through the API's asset endpoint with
//! `Accept: application/octet-stream`; GitHub redirects to its storage host
//! and the token is not sent there (cross-host redirects drop
//! `Authorization`). The asset's `digest` (`sha256:…`) is the checksum.
//!
//! # Audit trail
//!
//! [`Registry::report`] creates a GitHub *deployment* of the tag (environment
//! `dewy`, payload with host and command) and a deployment status (success
//! or failure with the error). Unlike the Go original, which uploaded one
//! release asset per host and deploy (GitHub caps a release at 1,000
//! assets), this does not grow the release. It needs the `deployments:write`
//! permission; without it the first refusal turns the audit trail off with a
//! warning instead of failing every deploy.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue};
use serde::Deserialize;

use crate::artifact::{Platform, pick_artifact};
use crate::{
    ArtifactRequest, Checksum, CommonOptions, Error, OpenOptions, Registry, RegistryStats, Release, Report, SafeUrl,
    Selection, choose_latest,
};

const DEFAULT_API: &str = "https://api.github.com";
/// Refresh an App installation token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Pages of 100 releases read at most (10,000 releases).
const MAX_PAGES: usize = 100;
/// Wait after a secondary limit that did not say how long.
const SECONDARY_WAIT: Duration = Duration::from_secs(60);

/// GitHub credentials and endpoint, read from the environment by the CLI.
#[derive(Clone, Default)]
pub struct GithubEnv {
    /// `GH_TOKEN` or `GITHUB_TOKEN` (`GH_TOKEN` wins, as in Dewy).
    pub token: Option<String>,
    /// `GITHUB_API_URL` (else `GITHUB_ENDPOINT`, Dewy's name): the API base
    /// for GitHub Enterprise Server (`https://ghe.example.com/api/v3`).
    pub api_url: Option<String>,
    /// `GITHUB_ARTIFACT`: the artifact name when the URL has no
    /// `artifact=`, as in Dewy.
    pub artifact: Option<String>,
    /// `GITHUB_APP_ID`.
    pub app_id: Option<String>,
    /// `GITHUB_APP_INSTALLATION_ID`.
    pub app_installation_id: Option<String>,
    /// `GITHUB_APP_PRIVATE_KEY`: the PEM itself.
    pub app_private_key: Option<String>,
    /// `GITHUB_APP_PRIVATE_KEY_PATH`: a file holding the PEM.
    pub app_private_key_path: Option<String>,
}

impl std::fmt::Debug for GithubEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| if o.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("GithubEnv")
            .field("token", &set(&self.token))
            .field("api_url", &self.api_url)
            .field("artifact", &self.artifact)
            .field("app_id", &self.app_id)
            .field("app_installation_id", &self.app_installation_id)
            .field("app_private_key", &set(&self.app_private_key))
            .field("app_private_key_path", &self.app_private_key_path)
            .finish()
    }
}

/// A GitHub Releases registry.
#[derive(Debug)]
pub struct GithubRegistry {
    location: String,
    repo_route: String,
    selection: Selection,
    artifact: Option<String>,
    platform: Platform,
    api: Api,
    /// Parsed pages by route, reused on 304.
    pages: Mutex<HashMap<String, Page>>,
    report_off: AtomicBool,
    /// Recording deployments failed last time (warned once).
    report_failing: AtomicBool,
    /// Checksum files already read, by asset URL (a published asset does
    /// not change; one download per release, not per tick).
    sums: Mutex<HashMap<String, String>>,
    /// Fetches checksum files (small, through the same redirect-safe path
    /// as artifacts).
    downloader: std::sync::OnceLock<crate::Downloader>,
}

#[derive(Debug, Clone)]
struct Page {
    releases: Vec<GhRelease>,
    next: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct GhRelease {
    id: u64,
    tag_name: String,
    #[serde(default)]
    draft: bool,
    #[serde(default)]
    prerelease: bool,
    published_at: Option<String>,
    #[serde(default)]
    assets: Vec<GhAsset>,
}

#[derive(Debug, Clone, Deserialize)]
struct GhAsset {
    name: String,
    url: String,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    digest: Option<String>,
}

struct Api {
    base: String,
    /// reqwest, so `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` apply as for
    /// every other request dewy sends (octocrab's client ignores them).
    http: reqwest::Client,
    auth: Auth,
    /// `ETag` and `Last-Modified` of the last fresh answer, by route.
    validators: Mutex<HashMap<String, Validators>>,
    blocked_until: Mutex<Option<jiff::Timestamp>>,
    requests: AtomicU64,
    not_modified: AtomicU64,
    rate_limited: AtomicU64,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

type Validators = (Option<HeaderValue>, Option<HeaderValue>);

enum Auth {
    Anonymous,
    Token(String),
    App(Box<App>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Token(_) => f.write_str("Token(****)"),
            Self::App(app) => write!(f, "App({}, installation {})", app.app_id, app.installation_id),
        }
    }
}

struct App {
    app_id: u64,
    installation_id: u64,
    /// Signs the App's JWTs (octocrab's JWT support).
    key: octocrab::EncodingKey,
    token: tokio::sync::Mutex<Option<(String, jiff::Timestamp)>>,
}

#[derive(Deserialize)]
struct InstallationToken {
    token: String,
    expires_at: Option<String>,
}

#[derive(Deserialize)]
struct Created {
    id: u64,
}

enum Answer {
    Fresh(String, Option<String>),
    NotModified,
}

impl GithubRegistry {
    /// Builds one from `ghr://owner/repo?pre-release=&artifact=&calver=`.
    pub fn from_url(url: &url::Url, opts: &OpenOptions) -> Result<Self, Error> {
        let common = CommonOptions::parse(url)?;
        let selection = common.selection(opts, url)?;
        let invalid = |reason: &str| Error::InvalidUrl {
            url: SafeUrl(url.as_str()).to_string(),
            reason: reason.to_owned(),
        };
        let owner = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("expected ghr://owner/repo"))?;
        let repo = url.path().trim_matches('/');
        if repo.is_empty() || repo.contains('/') {
            return Err(invalid("expected ghr://owner/repo"));
        }
        let api = Api::new(&opts.github)?;
        Ok(Self {
            location: format!("ghr://{owner}/{repo}"),
            repo_route: format!("/repos/{owner}/{repo}"),
            selection,
            artifact: common.artifact.or_else(|| opts.github.artifact.clone()),
            platform: opts.platform.clone(),
            api,
            pages: Mutex::new(HashMap::new()),
            report_off: AtomicBool::new(false),
            report_failing: AtomicBool::new(false),
            sums: Mutex::new(HashMap::new()),
            downloader: std::sync::OnceLock::new(),
        })
    }

    /// Every release, newest first, from the pages' cache when page one has
    /// not changed.
    async fn releases(&self) -> Result<Vec<GhRelease>, Error> {
        let first = format!("{}/releases?per_page=100", self.repo_route);
        let mut route = first.clone();
        let mut out = Vec::new();
        let mut unchanged = true;
        for n in 0..MAX_PAGES {
            let cached = self.pages.lock().expect("pages lock").get(&route).cloned();
            let page = match self.api.get(&self.location, &route, cached.is_some()).await? {
                Answer::NotModified => cached.expect("304 only for a cached page"),
                Answer::Fresh(body, next) => {
                    unchanged = false;
                    let releases: Vec<GhRelease> = serde_json::from_str(&body).map_err(|e| {
                        // Never answer a later 304 with a page that was not understood.
                        self.api.forget(&route);
                        Error::Api {
                            registry: self.location.clone(),
                            status: 200,
                            message: format!("unexpected releases answer: {e}"),
                        }
                    })?;
                    let page = Page { releases, next };
                    self.pages
                        .lock()
                        .expect("pages lock")
                        .insert(route.clone(), page.clone());
                    page
                }
            };
            out.extend(page.releases);
            // Page one unchanged: nothing was published, edited or deleted
            // in front of it; the later pages are what they were.
            if n == 0 && unchanged {
                let pages = self.pages.lock().expect("pages lock");
                let mut next = page.next;
                while let Some(link) = next {
                    let Some(p) = self.api.relative(&link).and_then(|r| pages.get(&r)) else {
                        break;
                    };
                    out.extend(p.releases.iter().cloned());
                    next = p.next.clone();
                }
                return Ok(out);
            }
            match page.next {
                Some(link) => {
                    route = self.api.relative(&link).ok_or_else(|| Error::Api {
                        registry: self.location.clone(),
                        status: 200,
                        message: format!(
                            "refusing to follow a pagination link to another host: {}",
                            SafeUrl(&link)
                        ),
                    })?
                }
                None => return Ok(out),
            }
        }
        tracing::warn!(registry = %self.location, pages = MAX_PAGES, "Stopped reading releases after the page limit");
        Ok(out)
    }
}

fn parse_time(s: Option<&str>) -> Option<jiff::Timestamp> {
    s.and_then(|t| t.parse().ok())
}

impl GithubRegistry {
    /// A request for an asset through the API (`Accept:
    /// application/octet-stream`, the token when there is one; the
    /// downloader drops it on a redirect to another host).
    async fn asset_request(&self, url: &str) -> Result<ArtifactRequest, Error> {
        let mut headers = vec![
            ("accept".to_owned(), "application/octet-stream".to_owned()),
            ("x-github-api-version".to_owned(), "2022-11-28".to_owned()),
        ];
        if let Some(token) = self.api.token(&self.location).await? {
            headers.push(("authorization".to_owned(), format!("Bearer {token}")));
        }
        Ok(ArtifactRequest {
            url: url.to_owned(),
            headers,
        })
    }

    /// The request for asset `name` of release `tag`: Dewy's artifact URL
    /// `ghr://owner/repo/tag/<tag>/<name>`, as a gRPC registry answers it.
    /// A missing release or asset is [`Error::ArtifactNotFound`].
    pub(crate) async fn named_asset_request(&self, tag: &str, name: &str) -> Result<ArtifactRequest, Error> {
        let releases = self.releases().await?;
        let asset = releases
            .iter()
            .find(|r| r.tag_name == tag)
            .and_then(|r| r.assets.iter().find(|a| a.name == name))
            .ok_or_else(|| Error::ArtifactNotFound {
                tag: tag.to_owned(),
                wanted: Some(name.to_owned()),
                published_at: None,
            })?;
        self.asset_request(&asset.url).await
    }

    /// The text of a checksum file asset (at most 1 MiB), read once per
    /// asset.
    async fn checksum_file(&self, url: &str) -> Result<String, Error> {
        if let Some(known) = self.sums.lock().expect("sums").get(url) {
            return Ok(known.clone());
        }
        let text = async {
            let downloader = match self.downloader.get() {
                Some(d) => d,
                None => {
                    let policy = crate::DownloadPolicy {
                        max_bytes: 1 << 20,
                        ..crate::DownloadPolicy::default()
                    };
                    let d = crate::Downloader::new(policy)?;
                    self.downloader.get_or_init(|| d)
                }
            };
            let request = self.asset_request(url).await?;
            let dir = tempfile::tempdir().map_err(|e| Error::io("create a folder in", std::env::temp_dir(), e))?;
            let got = downloader
                .fetch_request(&request, None, dir.path(), &crate::NoProgress)
                .await?;
            std::fs::read_to_string(&got.path).map_err(|e| Error::io("read", &got.path, e))
        }
        .await?;
        self.sums.lock().expect("sums").insert(url.to_owned(), text.clone());
        Ok(text)
    }
}

#[async_trait::async_trait]
impl Registry for GithubRegistry {
    async fn latest(&self) -> Result<Release, Error> {
        let releases = self.releases().await?;
        let candidates = self.candidates(&releases);
        let version =
            choose_latest(candidates.iter().map(|r| r.tag_name.as_str()), &self.selection).ok_or_else(|| {
                Error::NoVersion {
                    location: self.location.clone(),
                }
            })?;
        self.release_of(&candidates, version).await
    }

    async fn latest_complete_before(&self, tag: &str) -> Result<Option<Release>, Error> {
        let releases = self.releases().await?;
        let candidates = self.candidates(&releases);
        let tags = candidates.iter().map(|r| r.tag_name.clone());
        crate::newest_complete_before(tags, &self.selection, tag, |v| self.release_of(&candidates, v)).await
    }
    async fn artifact_request(&self, release: &Release) -> Result<ArtifactRequest, Error> {
        self.asset_request(&release.artifact_url).await
    }

    async fn signature_request(&self, release: &Release) -> Result<Option<ArtifactRequest>, Error> {
        match &release.signature_url {
            Some(url) => Ok(Some(self.asset_request(url).await?)),
            None => Ok(None),
        }
    }

    /// Records a deployment and its status. The audit trail never fails a
    /// deploy: a refusal (403/404) turns it off with one warning; other
    /// failures (5xx, network) are one warning per outage and one INFO line
    /// when it works again.
    async fn report(&self, report: &Report) -> Result<(), Error> {
        if self.report_off.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.record_deployment(report).await {
            Ok(()) => {
                if self.report_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(registry = %self.location, "GitHub records deployments again");
                }
            }
            Err(Error::Api { status, message, .. }) if matches!(status, 403 | 404) => {
                self.report_off.store(true, Ordering::Relaxed);
                tracing::warn!(registry = %self.location, status, message, "GitHub refused to record deployments; the audit trail is off (the token needs deployments:write)");
            }
            Err(err) => {
                if self.report_failing.swap(true, Ordering::Relaxed) {
                    tracing::debug!(registry = %self.location, error = %err, "GitHub could not record the deployment");
                } else {
                    tracing::warn!(registry = %self.location, error = %err, "GitHub could not record the deployment; the deploy itself is unaffected (said once until it works again)");
                }
            }
        }
        Ok(())
    }

    fn stats(&self) -> RegistryStats {
        RegistryStats {
            requests: self.api.requests.load(Ordering::Relaxed),
            not_modified: self.api.not_modified.load(Ordering::Relaxed),
            rate_limited: self.api.rate_limited.load(Ordering::Relaxed),
        }
    }
}

impl GithubRegistry {
    /// A GitHub deployment of the tag in the environment `dewy`, and its
    /// `success` or `failure` status.
    async fn record_deployment(&self, report: &Report) -> Result<(), Error> {
        let description = format!("dewy {} on {}", report.command, report.hostname);
        let deployment = serde_json::json!({
            "ref": report.tag,
            "environment": "dewy",
            "description": description,
            "auto_merge": false,
            "required_contexts": [],
            "payload": {"hostname": report.hostname, "command": report.command, "at": report.at.to_string()},
        });
        let route = format!("{}/deployments", self.repo_route);
        let created: Created = self.api.post(&self.location, &route, &deployment).await?;
        let mut text = report.error.clone().unwrap_or(description);
        text.truncate(text.floor_char_boundary(140));
        let status = serde_json::json!({
            "state": if report.error.is_some() { "failure" } else { "success" },
            "description": text,
            "environment": "dewy",
        });
        let route = format!("{}/deployments/{}/statuses", self.repo_route, created.id);
        self.api
            .post::<serde_json::Value>(&self.location, &route, &status)
            .await?;
        Ok(())
    }

    /// The releases that may be deployed: drafts never are; GitHub's
    /// pre-release flag is honoured as well as the tag's pre-release part
    /// (the Go original looked at the name only).
    fn candidates<'a>(&self, releases: &'a [GhRelease]) -> Vec<&'a GhRelease> {
        releases
            .iter()
            .filter(|r| !r.draft && (self.selection.pre_release || !r.prerelease))
            .collect()
    }

    /// The release of `version` among `candidates`: its uploaded artifact
    /// for this host and the checksums to verify it with.
    async fn release_of(&self, candidates: &[&GhRelease], version: crate::Version) -> Result<Release, Error> {
        let release = candidates
            .iter()
            .find(|r| r.tag_name == version.tag)
            .expect("the chosen tag is a candidate's");
        let published_at = parse_time(release.published_at.as_deref());
        // Assets still uploading (`starter`) are not there yet.
        let uploaded: Vec<&GhAsset> = release
            .assets
            .iter()
            .filter(|a| a.state.as_deref().is_none_or(|s| s == "uploaded"))
            .collect();
        let name = pick_artifact(
            &version.tag,
            uploaded.iter().map(|a| a.name.as_str()),
            self.artifact.as_deref(),
            &self.platform,
            published_at,
        )?;
        let asset = uploaded.iter().find(|a| a.name == name).expect("picked among them");
        let digest = asset
            .digest
            .as_deref()
            .and_then(|d| d.strip_prefix("sha256:"))
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|h| Checksum {
                sha256: h.to_ascii_lowercase(),
                source: "the GitHub asset digest".into(),
            });
        // The publisher's checksum file, when the release has one, is
        // verified too; it must agree with GitHub's digest.
        // A checksum file that is published but cannot be read fails the
        // check (retried next tick) rather than deploy unverified.
        let mut files = HashMap::new();
        for file in [
            format!("{name}.sha256"),
            "SHA256SUMS".into(),
            "sha256sums.txt".into(),
            "checksums.txt".into(),
        ] {
            if let Some(a) = uploaded.iter().find(|a| a.name == file) {
                files.insert(file, self.checksum_file(&a.url).await?);
            }
        }
        let published = crate::file::find_checksum(&name, |file| {
            let text = files.get(&file).cloned();
            async move { text }
        })
        .await;
        let checksum = match (digest, published) {
            (Some(d), Some(p)) if d.sha256 != p.sha256 => {
                return Err(Error::ChecksumMismatch {
                    url: format!("{}/releases/tag/{}/{name}", self.location, version.tag),
                    expected: p.sha256,
                    actual: d.sha256,
                    source_name: format!("{} (GitHub's asset digest disagrees)", p.source),
                });
            }
            (_, Some(p)) => Some(p),
            (d, None) => d,
        };
        let signature = format!("{name}{}", crate::SIGNATURE_SUFFIX);
        let signature_url = uploaded.iter().find(|a| a.name == signature).map(|a| a.url.clone());
        Ok(Release {
            id: release.id.to_string(),
            tag: version.tag.clone(),
            slot: version.build.clone(),
            version,
            artifact_name: name,
            artifact_url: asset.url.clone(),
            published_at,
            checksum,
            signature_url,
        })
    }
}

impl Api {
    fn new(env: &GithubEnv) -> Result<Self, Error> {
        let base = env
            .api_url
            .as_deref()
            .unwrap_or(DEFAULT_API)
            .trim_end_matches('/')
            .to_owned();
        let cred = |reason: String| Error::Credentials { reason };
        match base.parse::<http::Uri>() {
            Ok(uri) if uri.scheme().is_some() && uri.authority().is_some() => {}
            _ => return Err(cred(format!("GITHUB_API_URL `{base}` is not an http(s) URL"))),
        }
        let app_vars = [&env.app_id, &env.app_installation_id];
        let auth = if app_vars.iter().any(|v| v.is_some()) {
            let id = |v: &Option<String>, name: &str| -> Result<u64, Error> {
                let v = v
                    .as_deref()
                    .ok_or_else(|| cred(format!("{name} is required for GitHub App authentication")))?;
                v.trim()
                    .parse()
                    .map_err(|_| cred(format!("{name} must be a number, not `{v}`")))
            };
            let app_id = id(&env.app_id, "GITHUB_APP_ID")?;
            let installation_id = id(&env.app_installation_id, "GITHUB_APP_INSTALLATION_ID")?;
            let pem = match (&env.app_private_key, &env.app_private_key_path) {
                (Some(pem), _) => pem.replace("\\n", "\n").into_bytes(),
                (None, Some(path)) => std::fs::read(path)
                    .map_err(|e| cred(format!("cannot read GITHUB_APP_PRIVATE_KEY_PATH `{path}`: {e}")))?,
                (None, None) => {
                    return Err(cred(
                        "GITHUB_APP_PRIVATE_KEY or GITHUB_APP_PRIVATE_KEY_PATH is required for GitHub App authentication"
                            .into(),
                    ));
                }
            };
            let key = octocrab::EncodingKey::from_rsa_pem(&pem)
                .map_err(|e| cred(format!("the GitHub App private key is not an RSA PEM key: {e}")))?;
            Auth::App(Box::new(App {
                app_id,
                installation_id,
                key,
                token: tokio::sync::Mutex::new(None),
            }))
        } else {
            match &env.token {
                Some(t) if !t.trim().is_empty() => Auth::Token(t.trim().to_owned()),
                _ => Auth::Anonymous,
            }
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| cred(format!("cannot set up the GitHub client for `{base}`: {e}")))?;
        Ok(Self {
            base,
            http,
            auth,
            validators: Mutex::new(HashMap::new()),
            blocked_until: Mutex::new(None),
            requests: AtomicU64::new(0),
            not_modified: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
        })
    }

    /// Drops the validators of `route`, so the next request is unconditional.
    fn forget(&self, route: &str) {
        self.validators.lock().expect("validators").remove(route);
    }

    /// A link of a GitHub answer as a route under the API base; `None` for
    /// a link to anywhere else (never followed).
    fn relative(&self, link: &str) -> Option<String> {
        let rest = link.strip_prefix(&self.base)?;
        rest.starts_with('/').then(|| rest.to_owned())
    }

    /// The bearer token to send, refreshing an App installation token
    /// shortly before it expires.
    async fn token(&self, registry: &str) -> Result<Option<String>, Error> {
        match &self.auth {
            Auth::Anonymous => Ok(None),
            Auth::Token(t) => Ok(Some(t.clone())),
            Auth::App(app) => app.token(registry, &self.base, &self.http).await.map(Some),
        }
    }

    fn check_blocked(&self, registry: &str) -> Result<(), Error> {
        let until = *self.blocked_until.lock().expect("rate lock");
        match until {
            Some(t) if t > jiff::Timestamp::now() => Err(Error::RateLimited {
                registry: registry.to_owned(),
                retry_at: t,
            }),
            _ => Ok(()),
        }
    }

    fn block(&self, registry: &str, until: jiff::Timestamp, why: &str) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
        *self.blocked_until.lock().expect("rate lock") = Some(until);
        tracing::warn!(registry, reason = why, next_attempt = %until, "GitHub rate limit reached; waiting until the next attempt");
    }

    /// Reads the rate-limit headers; returns the error for a limit answer.
    fn observe(&self, registry: &str, status: u16, headers: &HeaderMap, body: &str) -> Option<Error> {
        let num = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<i64>().ok())
        };
        let now = jiff::Timestamp::now();
        let reset = num("x-ratelimit-reset").and_then(|s| jiff::Timestamp::from_second(s).ok());
        let remaining = num("x-ratelimit-remaining");
        if status == 403 || status == 429 {
            let until = if let Some(secs) = num("retry-after") {
                Some((now + jiff::SignedDuration::from_secs(secs.max(1)), "Retry-After"))
            } else if remaining == Some(0) {
                reset.map(|r| (r.max(now + jiff::SignedDuration::from_secs(1)), "primary limit"))
            } else if status == 429 || body.to_ascii_lowercase().contains("rate limit") {
                Some((
                    now + jiff::SignedDuration::try_from(SECONDARY_WAIT).unwrap_or_default(),
                    "secondary limit",
                ))
            } else {
                None
            };
            if let Some((until, why)) = until {
                self.block(registry, until, why);
                return Some(Error::RateLimited {
                    registry: registry.to_owned(),
                    retry_at: until,
                });
            }
        } else if remaining == Some(0)
            && let Some(r) = reset.filter(|r| *r > now)
        {
            // The budget is spent: the next request would be refused.
            self.block(registry, r, "no requests left");
        }
        None
    }

    fn error(&self, registry: &str, status: u16, body: &str) -> Error {
        let message = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_else(|| {
                // An HTML error page (a proxy, a GitHub outage) says nothing
                // a log line needs: its status reason does.
                if body.trim_start().starts_with('<') {
                    let reason = http::StatusCode::from_u16(status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("error");
                    format!("{reason} (an HTML page, not the API's JSON)")
                } else {
                    body.lines().next().unwrap_or_default().chars().take(200).collect()
                }
            });
        let message = match status {
            401 => format!(
                "GitHub refused the credentials ({message}); check GH_TOKEN/GITHUB_TOKEN or the GitHub App settings"
            ),
            404 => format!(
                "{message}: the repository does not exist or is not visible without a token (set GH_TOKEN or GITHUB_TOKEN for a private repository)"
            ),
            _ => message,
        };
        Error::Api {
            registry: registry.to_owned(),
            status,
            message,
        }
    }

    fn transport(registry: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Transport {
            op: "GitHub API request for",
            url: registry.to_owned(),
            source: Box::new(e),
        }
    }

    async fn headers(&self, registry: &str) -> Result<HeaderMap, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/vnd.github+json"));
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(concat!("dewy/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(token) = self.token(registry).await? {
            let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| Error::Credentials {
                reason: "the GitHub token contains characters not allowed in a header".into(),
            })?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        Ok(headers)
    }

    /// Sends one request (with dewy's headers plus `extra`), counts it,
    /// reads the rate-limit headers, and returns the status, headers and
    /// body. Refused at once while a rate limit holds; a limit answer is
    /// [`Error::RateLimited`].
    async fn send(
        &self,
        registry: &str,
        method: http::Method,
        route: &str,
        extra: HeaderMap,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, HeaderMap, String), Error> {
        self.check_blocked(registry)?;
        let mut headers = self.headers(registry).await?;
        headers.extend(extra);
        let url = if route.starts_with("http://") || route.starts_with("https://") {
            route.to_owned()
        } else {
            format!("{}{route}", self.base)
        };
        let mut request = self.http.request(method, &url).headers(headers);
        if let Some(body) = body {
            request = request.json(body);
        }
        let resp = request
            .send()
            .await
            .map_err(|e| Self::transport(registry, e.without_url()))?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let status = resp.status().as_u16();
        let head = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| Self::transport(registry, e.without_url()))?;
        match self.observe(registry, status, &head, &text) {
            Some(err) => Err(err),
            None => Ok((status, head, text)),
        }
    }

    /// A conditional GET of `route`.
    async fn get(&self, registry: &str, route: &str, conditional: bool) -> Result<Answer, Error> {
        let mut extra = HeaderMap::new();
        if conditional && let Some((etag, modified)) = self.validators.lock().expect("validators").get(route).cloned() {
            if let Some(e) = etag {
                extra.insert(http::header::IF_NONE_MATCH, e);
            }
            if let Some(m) = modified {
                extra.insert(http::header::IF_MODIFIED_SINCE, m);
            }
        }
        let (status, head, body) = self.send(registry, http::Method::GET, route, extra, None).await?;
        if status == 304 {
            self.not_modified.fetch_add(1, Ordering::Relaxed);
            return Ok(Answer::NotModified);
        }
        if status != 200 {
            return Err(self.error(registry, status, &body));
        }
        self.validators.lock().expect("validators").insert(
            route.to_owned(),
            (
                head.get(http::header::ETAG).cloned(),
                head.get(http::header::LAST_MODIFIED).cloned(),
            ),
        );
        let next = head
            .get_all(http::header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find(|part| part.contains("rel=\"next\""))
            .and_then(|part| {
                part.trim()
                    .strip_prefix('<')?
                    .split_once('>')
                    .map(|(u, _)| u.to_owned())
            });
        Ok(Answer::Fresh(body, next))
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        registry: &str,
        route: &str,
        body: &serde_json::Value,
    ) -> Result<T, Error> {
        let (status, _, text) = self
            .send(registry, http::Method::POST, route, HeaderMap::new(), Some(body))
            .await?;
        if !(200..300).contains(&status) {
            return Err(self.error(registry, status, &text));
        }
        serde_json::from_str(&text).map_err(|e| Error::Api {
            registry: registry.to_owned(),
            status,
            message: format!("unexpected answer: {e}"),
        })
    }
}

impl App {
    async fn token(&self, registry: &str, base: &str, http: &reqwest::Client) -> Result<String, Error> {
        let mut slot = self.token.lock().await;
        let now = jiff::Timestamp::now();
        let margin = jiff::SignedDuration::try_from(TOKEN_MARGIN).unwrap_or_default();
        if let Some((token, expires)) = slot.as_ref()
            && *expires - margin > now
        {
            return Ok(token.clone());
        }
        let failed = |reason: String| Error::Credentials {
            reason: format!(
                "GitHub App {} could not get a token for installation {}: {reason}",
                self.app_id, self.installation_id
            ),
        };
        let jwt = octocrab::auth::create_jwt(octocrab::models::AppId(self.app_id), &self.key)
            .map_err(|e| failed(e.to_string()))?;
        let url = format!("{base}/app/installations/{}/access_tokens", self.installation_id);
        let resp = http
            .post(&url)
            .bearer_auth(jwt)
            .header(ACCEPT, "application/vnd.github+json")
            .header(http::header::USER_AGENT, concat!("dewy/", env!("CARGO_PKG_VERSION")))
            .send()
            .await
            .map_err(|e| failed(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| failed(e.without_url().to_string()))?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("HTTP {status}"));
            return Err(Error::Api {
                registry: registry.to_owned(),
                status,
                message: format!(
                    "GitHub App {} could not get a token for installation {}: {message}",
                    self.app_id, self.installation_id
                ),
            });
        }
        let token: InstallationToken =
            serde_json::from_str(&text).map_err(|e| failed(format!("unexpected answer: {e}")))?;
        // Without an expiry, assume GitHub's one hour.
        let expires = parse_time(token.expires_at.as_deref()).unwrap_or(now + jiff::SignedDuration::from_secs(3600));
        let verb = if slot.is_some() { "refreshed" } else { "acquired" };
        tracing::info!(app_id = self.app_id, installation_id = self.installation_id, expires_at = %expires, "GitHub App: installation token {verb}");
        *slot = Some((token.token.clone(), expires));
        Ok(token.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_credentials_errors_name_the_culprit() {
        let opts = OpenOptions::default();
        // Opening needs no runtime (the client is built on first use).
        GithubRegistry::from_url(&url::Url::parse("ghr://o/r").unwrap(), &opts).unwrap();
        let err = GithubRegistry::from_url(&url::Url::parse("ghr://owner").unwrap(), &opts).unwrap_err();
        assert!(err.to_string().contains("ghr://owner/repo"), "{err}");
        let mut opts = OpenOptions::default();
        opts.github.app_id = Some("12".into());
        let err = GithubRegistry::from_url(&url::Url::parse("ghr://o/r").unwrap(), &opts).unwrap_err();
        assert!(err.to_string().contains("GITHUB_APP_INSTALLATION_ID"), "{err}");
        opts.github.app_installation_id = Some("x".into());
        let err = GithubRegistry::from_url(&url::Url::parse("ghr://o/r").unwrap(), &opts).unwrap_err();
        assert!(err.to_string().contains("must be a number"), "{err}");
        opts.github.app_installation_id = Some("34".into());
        opts.github.app_private_key = Some("not a key".into());
        let err = GithubRegistry::from_url(&url::Url::parse("ghr://o/r").unwrap(), &opts).unwrap_err();
        assert!(err.to_string().contains("RSA PEM"), "{err}");
        let debug = format!(
            "{:?}",
            GithubEnv {
                token: Some("ghp_secret".into()),
                ..Default::default()
            }
        );
        assert!(!debug.contains("ghp_secret"), "{debug}");
    }
}
