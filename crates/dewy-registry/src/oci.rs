//! `img://HOST[:PORT]/REPO`: container images in an OCI distribution
//! registry (Docker Hub, ghcr.io, a private registry).
//!
//! Tags are listed with `GET /v2/<repo>/tags/list` (every page, following
//! `Link: rel="next"`), the newest version is chosen as for every registry,
//! and its manifest digest is read with `HEAD /v2/<repo>/manifests/<tag>`:
//! the release's [`Release::artifact_url`] is `HOST/REPO@sha256:…`, so a
//! re-pushed tag is a new release and the runtime runs exactly what was
//! chosen. Token auth as registries speak it: an anonymous bearer token,
//! or one obtained with the credentials in [`OciEnv`] (`DOCKER_USERNAME` /
//! `DOCKER_PASSWORD`, `GITHUB_TOKEN` for ghcr.io, or the `auths` of a
//! Docker `config.json`). Loopback registries are spoken to over plain HTTP,
//! as Docker does; others over HTTPS.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::{CommonOptions, Error, OpenOptions, Registry, Release, SafeUrl, Selection, choose_latest};

/// Credentials for `img://`, read from the environment by the caller.
#[derive(Debug, Clone, Default)]
pub struct OciEnv {
    /// `DOCKER_USERNAME`.
    pub username: Option<String>,
    /// `DOCKER_PASSWORD`.
    pub password: Option<String>,
    /// `GITHUB_TOKEN` (used for ghcr.io when no username is given).
    pub github_token: Option<String>,
    /// Docker `config.json` files to read `auths` from, in order
    /// (`$REGISTRY_AUTH_FILE`, `~/.docker/config.json`).
    pub auth_files: Vec<std::path::PathBuf>,
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// The `img://` registry.
pub struct OciRegistry {
    /// `img://host/repo`, for logs.
    location: String,
    /// `http(s)://host[:port]`.
    base: String,
    /// The registry host as credentials name it (`ghcr.io`, `127.0.0.1:5000`).
    host: String,
    repo: String,
    selection: Selection,
    client: reqwest::Client,
    basic: Option<(String, String)>,
    token: Mutex<Option<(Auth, Instant)>>,
}

/// What a registry asked for.
#[derive(Clone)]
enum Auth {
    Bearer(String),
    Basic,
}

impl std::fmt::Debug for OciRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciRegistry")
            .field("location", &self.location)
            .field("credentials", &self.basic.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// Whether `host` (without port) is a loopback address or name.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost" || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl OciRegistry {
    /// Builds one from `img://HOST[:PORT]/REPO?pre-release=&calver=`.
    pub fn from_url(url: &url::Url, opts: &OpenOptions) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidUrl {
            url: SafeUrl(url.as_str()).to_string(),
            reason: reason.to_owned(),
        };
        let common = CommonOptions::parse(url)?;
        if common.artifact.is_some() {
            return Err(Error::UnknownOption {
                option: "artifact".into(),
                valid: vec!["pre-release", "calver"],
            });
        }
        let selection = common.selection(opts, url)?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("expected img://HOST/REPO"))?;
        let mut repo = url.path().trim_matches('/').to_owned();
        if repo.is_empty() {
            return Err(invalid("expected img://HOST/REPO (the repository is missing)"));
        }
        if repo.contains(':') || repo.contains('@') {
            return Err(invalid(
                "name the repository without a tag or digest: dewy chooses the tag (img://HOST/REPO)",
            ));
        }
        let host_port = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        // Docker Hub's names.
        let api_host = match host_port.as_str() {
            "docker.io" | "index.docker.io" => {
                if !repo.contains('/') {
                    repo = format!("library/{repo}");
                }
                "registry-1.docker.io".to_owned()
            }
            other => other.to_owned(),
        };
        let scheme = if is_loopback(host) { "http" } else { "https" };
        let basic = credentials(&opts.oci, &host_port);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("dewy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(&e.to_string()))?;
        Ok(Self {
            location: format!("img://{host_port}/{repo}"),
            base: format!("{scheme}://{api_host}"),
            host: host_port,
            repo,
            selection,
            client,
            basic,
            token: Mutex::new(None),
        })
    }

    /// The image reference to pull for `digest`: `HOST/REPO@sha256:…`.
    pub fn reference(&self, digest: &str) -> String {
        format!("{}/{}@{digest}", self.host, self.repo)
    }

    fn api_error(&self, status: u16, message: impl Into<String>) -> Error {
        Error::Api {
            registry: self.location.clone(),
            status,
            message: message.into(),
        }
    }

    fn transport(&self, url: &str, e: reqwest::Error) -> Error {
        Error::Transport {
            op: "OCI registry request for",
            url: SafeUrl(url).to_string(),
            source: Box::new(e),
        }
    }

    /// A GET or HEAD with the current token; on 401, gets a token as the
    /// registry's `WWW-Authenticate` says and tries once more.
    async fn send(&self, method: reqwest::Method, url: &str, accept: Option<&str>) -> Result<reqwest::Response, Error> {
        for attempt in 0..2 {
            let mut req = self.client.request(method.clone(), url);
            if let Some(a) = accept {
                req = req.header("accept", a);
            }
            let token = self
                .token
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .filter(|(_, until)| Instant::now() < *until);
            match (token, &self.basic) {
                (Some((Auth::Bearer(t), _)), _) => req = req.bearer_auth(t),
                (Some((Auth::Basic, _)), Some((user, pass))) => req = req.basic_auth(user, Some(pass)),
                _ => {}
            }
            let resp = req.send().await.map_err(|e| self.transport(url, e))?;
            if resp.status() != reqwest::StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            self.authenticate(&challenge).await?;
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Answers a `WWW-Authenticate` challenge: a bearer token from the
    /// realm (with the credentials, when there are some), or Basic.
    async fn authenticate(&self, challenge: &str) -> Result<(), Error> {
        let lower = challenge.to_ascii_lowercase();
        if lower.starts_with("basic") {
            if self.basic.is_none() {
                return Err(self.api_error(
                    401,
                    "the registry wants a login; set DOCKER_USERNAME and DOCKER_PASSWORD",
                ));
            }
            *self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((Auth::Basic, Instant::now() + Duration::from_secs(3600)));
            return Ok(());
        }
        let params = parse_challenge(challenge);
        let Some(realm) = params.iter().find(|(k, _)| k == "realm").map(|(_, v)| v.clone()) else {
            return Err(self.api_error(401, format!("unauthorized, and no token realm offered (`{challenge}`)")));
        };
        let mut query: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| k == "service" || k == "scope")
            .cloned()
            .collect();
        if !query.iter().any(|(k, _)| k == "scope") {
            query.push(("scope".into(), format!("repository:{}:pull", self.repo)));
        }
        let mut token_url = url::Url::parse(&realm)
            .map_err(|e| self.api_error(401, format!("the token realm `{realm}` is not a URL: {e}")))?;
        token_url.query_pairs_mut().extend_pairs(&query);
        let mut req = self.client.get(token_url);
        if let Some((user, pass)) = &self.basic {
            req = req.basic_auth(user, Some(pass));
        }
        let resp = req.send().await.map_err(|e| self.transport(&realm, e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let hint = if self.basic.is_some() {
                "the credentials were refused"
            } else {
                "set DOCKER_USERNAME and DOCKER_PASSWORD (or GITHUB_TOKEN for ghcr.io)"
            };
            return Err(self.api_error(status, format!("token request refused: {hint}")));
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let answer: TokenAnswer = resp
            .json()
            .await
            .map_err(|e| self.api_error(status, format!("malformed token answer: {e}")))?;
        let token = answer
            .token
            .or(answer.access_token)
            .ok_or_else(|| self.api_error(status, "the token answer holds no token"))?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(60).saturating_sub(5).max(5));
        *self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((Auth::Bearer(token), Instant::now() + lifetime));
        Ok(())
    }

    /// Every tag of the repository, following `Link` pagination.
    async fn tags(&self) -> Result<Vec<String>, Error> {
        let mut url = format!("{}/v2/{}/tags/list?n=1000", self.base, self.repo);
        let mut tags = Vec::new();
        for _ in 0..100 {
            let resp = self.send(reqwest::Method::GET, &url, None).await?;
            let status = resp.status().as_u16();
            let next = resp
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            if status != 200 {
                let reason = resp.status().canonical_reason().unwrap_or("error").to_owned();
                let body = resp.text().await.unwrap_or_default();
                let message = Some(registry_message(&body))
                    .filter(|m| !m.trim().is_empty())
                    .unwrap_or(reason);
                return Err(self.api_error(status, message));
            }
            #[derive(serde::Deserialize)]
            struct TagList {
                tags: Option<Vec<String>>,
            }
            let page: TagList = resp
                .json()
                .await
                .map_err(|e| self.api_error(status, format!("malformed tag list: {e}")))?;
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(path) if path.starts_with('/') => url = format!("{}{path}", self.base),
                Some(full) => url = full,
                None => return Ok(tags),
            }
        }
        Ok(tags)
    }

    /// The manifest digest of `tag`.
    async fn digest(&self, tag: &str) -> Result<String, Error> {
        let url = format!("{}/v2/{}/manifests/{tag}", self.base, self.repo);
        let resp = self.send(reqwest::Method::HEAD, &url, Some(MANIFEST_TYPES)).await?;
        let status = resp.status().as_u16();
        if status == 200
            && let Some(d) = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
            && valid_digest(d)
        {
            return Ok(d.to_owned());
        }
        // No digest header (some registries): the digest of the body.
        let resp = self.send(reqwest::Method::GET, &url, Some(MANIFEST_TYPES)).await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| self.transport(&url, e))?;
        if status != 200 {
            return Err(self.api_error(status, registry_message(&String::from_utf8_lossy(&body))));
        }
        if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
            return Err(self.api_error(status, format!("the manifest of `{tag}` is not JSON")));
        }
        use sha2::Digest as _;
        Ok(format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))))
    }
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `errors[0].message` of a registry's JSON error body, or the body.
fn registry_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = &v["errors"][0];
            Some(format!(
                "{}: {}",
                e["code"].as_str()?,
                e["message"].as_str().unwrap_or_default()
            ))
        })
        .unwrap_or_else(|| body.chars().take(200).collect())
}

/// `Bearer realm="…",service="…",scope="…"` → pairs.
fn parse_challenge(challenge: &str) -> Vec<(String, String)> {
    let rest = challenge.split_once(' ').map_or("", |(_, r)| r);
    let mut out = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let value: String = if chars.peek() == Some(&'"') {
            chars.next();
            chars.by_ref().take_while(|c| *c != '"').collect()
        } else {
            chars.by_ref().take_while(|c| *c != ',').collect()
        };
        out.push((key.trim().to_ascii_lowercase(), value));
    }
}

/// The target of `Link: <…>; rel="next"`.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .contains("rel=\"next\"")
            .then(|| target.trim().trim_start_matches('<').trim_end_matches('>').to_owned())
    })
}

/// Basic credentials for `host`: DOCKER_USERNAME/DOCKER_PASSWORD, then
/// GITHUB_TOKEN for ghcr.io, then a config.json `auths` entry.
fn credentials(env: &OciEnv, host: &str) -> Option<(String, String)> {
    if let (Some(u), Some(p)) = (&env.username, &env.password) {
        return Some((u.clone(), p.clone()));
    }
    if host == "ghcr.io"
        && let Some(t) = &env.github_token
    {
        return Some(("x-access-token".into(), t.clone()));
    }
    for file in &env.auth_files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            tracing::warn!(file = %file.display(), "The registry credentials file is not JSON; ignored");
            continue;
        };
        let auths = json["auths"].as_object()?;
        let entry = auths.iter().find_map(|(k, v)| {
            let k = k.trim_start_matches("https://").trim_start_matches("http://");
            let k = k.split('/').next().unwrap_or_default();
            let same = k == host || (host == "docker.io" && k == "index.docker.io");
            same.then_some(v)
        });
        if let Some(auth) = entry.and_then(|v| v["auth"].as_str())
            && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(auth)
            && let Ok(pair) = String::from_utf8(decoded)
            && let Some((u, p)) = pair.split_once(':')
        {
            return Some((u.to_owned(), p.to_owned()));
        }
    }
    None
}

#[async_trait::async_trait]
impl Registry for OciRegistry {
    async fn latest(&self) -> Result<Release, Error> {
        let tags = self.tags().await?;
        let version =
            choose_latest(tags.iter().map(String::as_str), &self.selection).ok_or_else(|| Error::NoVersion {
                location: self.location.clone(),
            })?;
        let digest = self.digest(&version.tag).await?;
        Ok(Release {
            id: digest.clone(),
            tag: version.tag.clone(),
            slot: version.build.clone(),
            version,
            artifact_name: self.repo.rsplit('/').next().unwrap_or_default().to_owned(),
            artifact_url: self.reference(&digest),
            published_at: None,
            checksum: None,
            signature_url: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_challenges_and_links() {
        let open = |u: &str| OciRegistry::from_url(&url::Url::parse(u).unwrap(), &OpenOptions::default());
        let r = open("img://docker.io/nginx").unwrap();
        assert_eq!(
            (r.base.as_str(), r.repo.as_str()),
            ("https://registry-1.docker.io", "library/nginx")
        );
        let r = open("img://127.0.0.1:5000/acme/api").unwrap();
        assert_eq!(r.base, "http://127.0.0.1:5000");
        assert_eq!(r.reference("sha256:ab"), "127.0.0.1:5000/acme/api@sha256:ab");
        assert!(open("img://ghcr.io/acme/api:v1").is_err());
        assert!(open("img://ghcr.io/").is_err());
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        );
        assert_eq!(c[0], ("realm".into(), "https://auth.docker.io/token".into()));
        assert_eq!(c[2].1, "repository:library/nginx:pull");
        assert_eq!(
            next_link(r#"</v2/x/tags/list?last=b&n=2>; rel="next""#).as_deref(),
            Some("/v2/x/tags/list?last=b&n=2")
        );
    }
}
