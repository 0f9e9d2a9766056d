//! An in-process server that speaks the part of the GitHub REST API dewy
//! uses, faithfully enough to test polling cost and security: releases list
//! with `Link` pagination, latest release, assets, weak ETags and
//! `Last-Modified` with 304 answers that do not count against the rate
//! limit, `x-ratelimit-*` headers, primary (403) and secondary (429 with
//! `Retry-After`) limits, 302 asset redirects to a separate storage host,
//! GitHub App installation tokens (RS256 JWTs verified with the App's public
//! key), deployments and deployment statuses.
//!
//! Every request is logged ([`FakeGithub::requests`]) so tests can assert
//! what the client sent, not only what it got back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use sha2::Digest;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Logged {
    /// `api` or `storage`.
    pub host: &'static str,
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Request headers (lower-case names).
    pub headers: BTreeMap<String, String>,
    /// The status answered.
    pub status: u16,
}

impl Logged {
    /// A request header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Whether this request counted against the rate limit (GitHub does not
    /// count 304 answers; the storage host is not the API).
    pub fn counted(&self) -> bool {
        self.host == "api" && self.status != 304
    }
}

/// A release asset.
#[derive(Debug, Clone)]
pub struct FakeAsset {
    /// Asset id.
    pub id: u64,
    /// File name.
    pub name: String,
    /// Content.
    pub data: Vec<u8>,
    /// Whether the API reports a `digest` (`sha256:<hex>`) for it.
    pub digest: bool,
}

/// A release.
#[derive(Debug, Clone)]
pub struct FakeRelease {
    /// Release id.
    pub id: u64,
    /// Tag name.
    pub tag: String,
    /// Draft releases are listed (the token may push) but never "latest".
    pub draft: bool,
    /// GitHub's pre-release flag.
    pub prerelease: bool,
    /// Publish time (seconds since the epoch).
    pub published_at: u64,
    /// Assets.
    pub assets: Vec<FakeAsset>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Newest first, as GitHub lists them.
    releases: Vec<FakeRelease>,
    next_id: u64,
    /// Bumped on every change; part of the ETag and `Last-Modified`.
    revision: u64,
    modified_at: u64,
    log: Vec<Logged>,
    /// Tokens accepted as `Authorization: Bearer/token <t>`; empty = public repo.
    tokens: Vec<String>,
    /// Whether requests without a token are refused (private repository).
    private: bool,
    /// Remaining requests of the primary limit, per identity.
    remaining: BTreeMap<String, u64>,
    limit: u64,
    reset_at: u64,
    /// The next N API requests get a secondary-limit 429 with `Retry-After`.
    secondary: u32,
    retry_after: u64,
    app: Option<AppConfig>,
    /// The next N API requests answer with this status (5xx faults).
    fail: (u32, u16),
    /// The next N API requests answer 200 with a body that is not JSON.
    malformed: u32,
    deployments: Vec<serde_json::Value>,
    statuses: Vec<serde_json::Value>,
    storage: String,
}

#[derive(Debug, Clone)]
struct AppConfig {
    app_id: u64,
    installation_id: u64,
    public_pem: Vec<u8>,
    lifetime: Duration,
    issued: u64,
}

/// The fake GitHub. Dropping it stops both hosts.
#[derive(Debug)]
pub struct FakeGithub {
    api: SocketAddr,
    storage: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let iso = rfc3339(secs);
    let (y, mo, d) = (&iso[0..4], &iso[5..7], &iso[8..10]);
    let month = MONTHS[mo.parse::<usize>().unwrap_or(1) - 1];
    format!(
        "{}, {d} {month} {y} {} GMT",
        DAYS[(secs / 86_400 % 7) as usize],
        &iso[11..19]
    )
}

impl FakeGithub {
    /// Starts the API host and the storage host on free loopback ports.
    pub fn start() -> Self {
        Self::start_on(0)
    }

    /// Starts the API host on `port` (0: any free one), for tests where the
    /// client was pointed at the port before the server came up.
    pub fn start_on(port: u16) -> Self {
        let api = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind fake GitHub API");
        let storage = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake GitHub storage");
        let (api_addr, storage_addr) = (api.local_addr().unwrap(), storage.local_addr().unwrap());
        api.set_nonblocking(true).unwrap();
        storage.set_nonblocking(true).unwrap();
        let inner = Arc::new(Mutex::new(Inner {
            next_id: 1000,
            limit: 5000,
            reset_at: now() + 3600,
            retry_after: 60,
            modified_at: now(),
            storage: format!("http://{storage_addr}"),
            ..Inner::default()
        }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = inner.clone();
        std::thread::Builder::new()
            .name("fake-github".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let api = tokio::net::TcpListener::from_std(api).unwrap();
                    let storage = tokio::net::TcpListener::from_std(storage).unwrap();
                    let api_app = axum::Router::new().fallback(api_handler).with_state(state.clone());
                    let storage_app = axum::Router::new()
                        .route("/assets/{id}", axum::routing::get(storage_handler))
                        .with_state(state);
                    let a = axum::serve(api, api_app);
                    let s = axum::serve(storage, storage_app);
                    tokio::select! {
                        _ = a => {}
                        _ = s => {}
                        _ = rx => {}
                    }
                });
            })
            .expect("spawn fake GitHub");
        Self {
            api: api_addr,
            storage: storage_addr,
            inner,
            _shutdown: tx,
        }
    }

    /// The API base URL (`GITHUB_API_URL`).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// The API host's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api
    }

    /// The storage host that asset downloads are redirected to.
    pub fn storage_addr(&self) -> SocketAddr {
        self.storage
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap())
    }

    /// Accepts `token`; once any token is set, unknown tokens get 401.
    pub fn add_token(&self, token: &str) {
        self.with(|i| i.tokens.push(token.to_owned()));
    }

    /// Makes the repository private: requests without a token get 404.
    pub fn set_private(&self, private: bool) {
        self.with(|i| i.private = private);
    }

    /// Sets the primary limit per identity and its reset time.
    pub fn set_rate_limit(&self, limit: u64, reset_in: Duration) {
        self.with(|i| {
            i.limit = limit;
            i.remaining.clear();
            i.reset_at = now() + reset_in.as_secs();
        });
    }

    /// The next `n` API requests get a secondary-limit 429 with `Retry-After: secs`.
    pub fn secondary_limit(&self, n: u32, retry_after_secs: u64) {
        self.with(|i| {
            i.secondary = n;
            i.retry_after = retry_after_secs;
        });
    }

    /// The next `n` API requests answer with HTTP `status` (a 5xx fault).
    pub fn fail_next(&self, n: u32, status: u16) {
        self.with(|i| i.fail = (n, status));
    }

    /// The next `n` API requests answer 200 with a body that is not JSON.
    pub fn malformed_next(&self, n: u32) {
        self.with(|i| i.malformed = n);
    }

    /// Configures a GitHub App whose installation tokens live `lifetime`.
    pub fn set_app(&self, app_id: u64, installation_id: u64, public_pem: &[u8], lifetime: Duration) {
        self.with(|i| {
            i.app = Some(AppConfig {
                app_id,
                installation_id,
                public_pem: public_pem.to_vec(),
                lifetime,
                issued: 0,
            })
        });
    }

    /// Installation tokens issued so far.
    pub fn app_tokens_issued(&self) -> u64 {
        self.with(|i| i.app.as_ref().map_or(0, |a| a.issued))
    }

    /// Publishes a release (newest first in listings); returns its id.
    pub fn add_release(&self, tag: &str, assets: &[(&str, &[u8])]) -> u64 {
        self.add_release_with(tag, false, false, assets)
    }

    /// Publishes a release with GitHub's draft and pre-release flags.
    pub fn add_release_with(&self, tag: &str, draft: bool, prerelease: bool, assets: &[(&str, &[u8])]) -> u64 {
        self.with(|i| {
            i.next_id += 1;
            let id = i.next_id;
            let mut rel = FakeRelease {
                id,
                tag: tag.to_owned(),
                draft,
                prerelease,
                published_at: now(),
                assets: Vec::new(),
            };
            for (name, data) in assets {
                i.next_id += 1;
                rel.assets.push(FakeAsset {
                    id: i.next_id,
                    name: (*name).to_owned(),
                    data: data.to_vec(),
                    digest: true,
                });
            }
            i.releases.insert(0, rel);
            i.touch();
            id
        })
    }

    /// Uploads an asset to an existing release (as a CI job does after
    /// creating the release).
    pub fn add_asset(&self, tag: &str, name: &str, data: &[u8], digest: bool) {
        self.with(|i| {
            i.next_id += 1;
            let id = i.next_id;
            let rel = i.releases.iter_mut().find(|r| r.tag == tag).expect("release exists");
            rel.assets.push(FakeAsset {
                id,
                name: name.to_owned(),
                data: data.to_vec(),
                digest,
            });
            i.touch();
        });
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.with(|i| i.log.clone())
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.with(|i| i.log.clear());
    }

    /// Deployments created through the API.
    pub fn deployments(&self) -> Vec<serde_json::Value> {
        self.with(|i| i.deployments.clone())
    }

    /// Deployment statuses created through the API.
    pub fn deployment_statuses(&self) -> Vec<serde_json::Value> {
        self.with(|i| i.statuses.clone())
    }
}

impl Inner {
    fn touch(&mut self) {
        self.revision += 1;
        self.modified_at = self.modified_at.max(now());
    }

    fn release_json(&self, r: &FakeRelease, api: &str) -> serde_json::Value {
        let assets: Vec<_> = r
            .assets
            .iter()
            .map(|a| {
                let mut v = serde_json::json!({
                    "id": a.id,
                    "name": a.name,
                    "size": a.data.len(),
                    "state": "uploaded",
                    "content_type": "application/octet-stream",
                    "url": format!("{api}/repos/o/r/releases/assets/{}", a.id),
                    "browser_download_url": format!("{}/assets/{}", self.storage, a.id),
                });
                if a.digest {
                    v["digest"] = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&a.data))).into();
                }
                v
            })
            .collect();
        serde_json::json!({
            "id": r.id,
            "tag_name": r.tag,
            "name": r.tag,
            "draft": r.draft,
            "prerelease": r.prerelease,
            "published_at": if r.draft { serde_json::Value::Null } else { rfc3339(r.published_at).into() },
            "created_at": rfc3339(r.published_at),
            "assets": assets,
        })
    }
}

fn headers_map(h: &HeaderMap) -> BTreeMap<String, String> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn message(status: StatusCode, text: &str) -> Response {
    json_response(
        status,
        &serde_json::json!({"message": text, "documentation_url": "https://docs.github.com/rest"}),
    )
}

/// The bearer token of a request (`Bearer x` or `token x`).
fn bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("token "))
        .map(str::to_owned)
}

async fn api_handler(
    State(state): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    let mut inner = state.lock().unwrap();
    let mut resp = api_inner(&mut inner, &method, &uri, &headers, &query, &body);
    inner.log.push(Logged {
        host: "api",
        method: method.to_string(),
        uri: uri.to_string(),
        headers: headers_map(&headers),
        status: resp.status().as_u16(),
    });
    resp.headers_mut()
        .insert("x-github-api-version-selected", "2022-11-28".parse().unwrap());
    resp
}

fn with_limits(mut resp: Response, limit: u64, remaining: u64, reset: u64) -> Response {
    let h = resp.headers_mut();
    h.insert("x-ratelimit-limit", limit.into());
    h.insert("x-ratelimit-remaining", remaining.into());
    h.insert("x-ratelimit-used", limit.saturating_sub(remaining).into());
    h.insert("x-ratelimit-reset", reset.into());
    h.insert("x-ratelimit-resource", "core".parse().unwrap());
    resp
}

fn api_inner(
    inner: &mut Inner,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
    body: &[u8],
) -> Response {
    let path = uri.path().to_owned();
    let api = format!(
        "http://{}",
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1")
    );
    // The App token exchange authenticates with a JWT, not a token.
    if let Some(rest) = path.strip_prefix("/app/installations/")
        && let Some(id) = rest.strip_suffix("/access_tokens")
        && method == Method::POST
    {
        return app_token(inner, id, headers);
    }
    if inner.fail.0 > 0 {
        inner.fail.0 -= 1;
        let status = StatusCode::from_u16(inner.fail.1).unwrap_or(StatusCode::BAD_GATEWAY);
        return Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/html")
            .body(Body::from(
                "<html><body>Unicorn! This page is taking too long to load.</body></html>",
            ))
            .unwrap();
    }
    if inner.malformed > 0 {
        inner.malformed -= 1;
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
            .body(Body::from("[{\"id\": 1, \"tag_name\": \"v9.9.9\", \"assets\": [tru"))
            .unwrap();
    }
    let token = bearer(headers);
    let identity = match &token {
        Some(t) if inner.tokens.contains(t) => t.clone(),
        Some(_) => return message(StatusCode::UNAUTHORIZED, "Bad credentials"),
        None if inner.private => return message(StatusCode::NOT_FOUND, "Not Found"),
        None => "anonymous".to_owned(),
    };
    if inner.now_reset() {
        inner.remaining.clear();
    }
    let (limit, reset) = (inner.limit, inner.reset_at);
    if inner.secondary > 0 {
        inner.secondary -= 1;
        let mut resp = message(
            StatusCode::TOO_MANY_REQUESTS,
            "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
        );
        resp.headers_mut().insert(header::RETRY_AFTER, inner.retry_after.into());
        return resp;
    }
    let remaining = *inner.remaining.entry(identity.clone()).or_insert(limit);
    if remaining == 0 {
        return with_limits(
            message(StatusCode::FORBIDDEN, "API rate limit exceeded for this identity."),
            limit,
            0,
            reset,
        );
    }
    let resp = route(inner, method, &path, headers, query, body, &api);
    let counted = resp.status() != StatusCode::NOT_MODIFIED;
    let left = inner.remaining.entry(identity).or_insert(limit);
    if counted {
        *left = left.saturating_sub(1);
    }
    let left = *left;
    with_limits(resp, limit, left, reset)
}

impl Inner {
    fn now_reset(&mut self) -> bool {
        if now() >= self.reset_at {
            self.reset_at = now() + 3600;
            return true;
        }
        false
    }
}

/// Answers 304 when the validators match, else 200 with them.
fn conditional(inner: &Inner, headers: &HeaderMap, body: serde_json::Value, links: Option<String>) -> Response {
    let text = body.to_string();
    let etag = format!("W/\"{}\"", hex::encode(&sha2::Sha256::digest(text.as_bytes())[..12]));
    let last_modified = http_date(inner.modified_at);
    let inm = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    let ims = headers.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok());
    let not_modified = match inm {
        Some(v) => v.split(',').any(|t| t.trim() == etag),
        None => ims == Some(last_modified.as_str()),
    };
    let mut b = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, &last_modified)
        .header(header::CACHE_CONTROL, "private, max-age=60, s-maxage=60")
        .header(header::VARY, "Accept, Authorization, Cookie");
    if let Some(l) = links {
        b = b.header(header::LINK, l);
    }
    if not_modified {
        return b.status(StatusCode::NOT_MODIFIED).body(Body::empty()).unwrap();
    }
    b.status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(text))
        .unwrap()
}

fn route(
    inner: &mut Inner,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
    body: &[u8],
    api: &str,
) -> Response {
    // Pagination links use `/repositories/<id>/...`, as GitHub's do.
    let rest = match (path.strip_prefix("/repos/"), path.strip_prefix("/repositories/")) {
        (Some(rest), _) => rest.to_owned(),
        (None, Some(rest)) => format!("o/r/{}", rest.split_once('/').map_or("", |(_, r)| r)),
        _ => return message(StatusCode::NOT_FOUND, "Not Found"),
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (method.clone(), parts.as_slice()) {
        (Method::GET, [_, _, "releases"]) => {
            let per_page = query
                .get("per_page")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(30)
                .clamp(1, 100);
            let page = query
                .get("page")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1)
                .max(1);
            let all = &inner.releases;
            let pages = all.len().div_ceil(per_page).max(1);
            let items: Vec<_> = all
                .iter()
                .skip((page - 1) * per_page)
                .take(per_page)
                .map(|r| inner.release_json(r, api))
                .collect();
            let base = format!("{api}/repositories/1/releases?per_page={per_page}");
            let mut links = Vec::new();
            if page < pages {
                links.push(format!("<{base}&page={}>; rel=\"next\"", page + 1));
                links.push(format!("<{base}&page={pages}>; rel=\"last\""));
            }
            if page > 1 {
                links.push(format!("<{base}&page=1>; rel=\"first\""));
                links.push(format!("<{base}&page={}>; rel=\"prev\"", page - 1));
            }
            let links = (!links.is_empty()).then(|| links.join(", "));
            conditional(inner, headers, serde_json::Value::Array(items), links)
        }
        (Method::GET, [_, _, "releases", "latest"]) => {
            match inner.releases.iter().find(|r| !r.draft && !r.prerelease) {
                Some(r) => {
                    let v = inner.release_json(r, api);
                    conditional(inner, headers, v, None)
                }
                None => message(StatusCode::NOT_FOUND, "Not Found"),
            }
        }
        (Method::GET, [_, _, "releases", "assets", id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            let Some(asset) = inner.releases.iter().flat_map(|r| &r.assets).find(|a| a.id == id) else {
                return message(StatusCode::NOT_FOUND, "Not Found");
            };
            let wants_bytes = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/octet-stream"));
            if wants_bytes {
                Response::builder()
                    .status(StatusCode::FOUND)
                    .header(
                        header::LOCATION,
                        format!(
                            "{}/assets/{}?X-Amz-Signature=fake&response-content-disposition=attachment",
                            inner.storage, asset.id
                        ),
                    )
                    .body(Body::empty())
                    .unwrap()
            } else {
                json_response(
                    StatusCode::OK,
                    &serde_json::json!({"id": asset.id, "name": asset.name, "size": asset.data.len()}),
                )
            }
        }
        (Method::POST, [_, _, "deployments"]) => {
            let mut v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let id = inner.deployments.len() as u64 + 1;
            v["id"] = id.into();
            inner.deployments.push(v.clone());
            json_response(StatusCode::CREATED, &v)
        }
        (Method::POST, [_, _, "deployments", id, "statuses"]) => {
            let mut v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            v["deployment_id"] = id.parse::<u64>().unwrap_or(0).into();
            inner.statuses.push(v.clone());
            json_response(StatusCode::CREATED, &v)
        }
        _ => message(StatusCode::NOT_FOUND, "Not Found"),
    }
}

fn app_token(inner: &mut Inner, id: &str, headers: &HeaderMap) -> Response {
    let Some(app) = inner.app.as_mut() else {
        return message(StatusCode::NOT_FOUND, "Not Found");
    };
    if id.parse::<u64>().ok() != Some(app.installation_id) {
        return message(StatusCode::NOT_FOUND, "Not Found");
    }
    let Some(jwt) = bearer(headers) else {
        return message(StatusCode::UNAUTHORIZED, "A JSON web token could not be decoded");
    };
    let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(&app.public_pem) else {
        return message(StatusCode::INTERNAL_SERVER_ERROR, "bad test key");
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    // GitHub takes a numeric `iss`, which the library's own issuer check does not parse.
    validation.set_required_spec_claims(&["exp"]);
    validation.validate_exp = true;
    #[derive(serde::Deserialize)]
    struct Claims {
        iss: serde_json::Value,
        iat: u64,
        exp: u64,
    }
    let claims = match jsonwebtoken::decode::<Claims>(&jwt, &key, &validation) {
        Ok(d) => d.claims,
        Err(e) => {
            return message(
                StatusCode::UNAUTHORIZED,
                &format!("'Issuer' claim or signature invalid: {e}"),
            );
        }
    };
    let iss = claims
        .iss
        .as_u64()
        .or_else(|| claims.iss.as_str().and_then(|s| s.parse().ok()));
    if iss != Some(app.app_id) || claims.exp.saturating_sub(claims.iat) > 660 {
        return message(
            StatusCode::UNAUTHORIZED,
            "'Issuer' claim ('iss') must be the App id; 'exp' at most 10 minutes after 'iat'",
        );
    }
    app.issued += 1;
    let token = format!("ghs_fake{}_{}", app.installation_id, app.issued);
    let expires = now() + app.lifetime.as_secs();
    inner.tokens.push(token.clone());
    json_response(
        StatusCode::CREATED,
        &serde_json::json!({"token": token, "expires_at": rfc3339(expires), "permissions": {"contents": "read"}}),
    )
}

async fn storage_handler(
    State(state): State<Arc<Mutex<Inner>>>,
    Path(id): Path<u64>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut inner = state.lock().unwrap();
    let data = inner
        .releases
        .iter()
        .flat_map(|r| &r.assets)
        .find(|a| a.id == id)
        .map(|a| a.data.clone());
    let resp = match data {
        // Like the real storage host: a request carrying the API token is refused.
        _ if headers.contains_key(header::AUTHORIZATION) => Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Body::from(
                "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
            ))
            .unwrap(),
        Some(d) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, d.len())
            .body(Body::from(d))
            .unwrap(),
        None => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::empty())
            .unwrap(),
    };
    inner.log.push(Logged {
        host: "storage",
        method: "GET".into(),
        uri: uri.to_string(),
        headers: headers_map(&headers),
        status: resp.status().as_u16(),
    });
    resp
}

/// An RSA key pair for a fake GitHub App: (private PEM, public PEM), made
/// with the `openssl` command.
pub fn app_key_pair(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let private = dir.join("app.pem");
    let public = dir.join("app.pub.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl (apt install openssl; `cargo xtask test` installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["genrsa", "-traditional", "-out", private.to_str().unwrap(), "2048"]);
    run(&[
        "rsa",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (std::fs::read(private).unwrap(), std::fs::read(public).unwrap())
}
