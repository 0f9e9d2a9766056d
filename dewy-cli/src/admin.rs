//! The admin API: a unix socket in the app folder (owner only) and, with
//! `--admin-port`, 127.0.0.1:PORT.
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /` | the status page (HTML, self-contained) |
//! | `GET /api/status` | what the loop is doing (JSON) |
//! | `GET /api/history` | the deployment history, oldest first (JSON) |
//! | `GET /api/releases` | the releases on disk (JSON) |
//! | `GET /api/fleet` | every host's heartbeat in the (shared) cache (JSON) |
//! | `GET /api/rollout` | the staged rollout this host last saw (JSON record, `null` without one) |
//! | `POST /api/check` | check the registry now |
//! | `POST /api/restart` | restart the application gracefully |
//! | `POST /api/clear-bad` | forget the releases recorded as bad |
//! | `POST /api/rollback[?to=VERSION]` | back to the previous (or named) release on disk, restart, pin |
//! | `POST /api/unpin` | release the pin and check now |
//! | `POST /webhook/github` | a GitHub `release` event (signed) checks now |
//! | `GET /metrics` | OpenMetrics text (Prometheus scrapes it) |
//!
//! Callers on the unix socket are trusted (its mode is 0600). On the TCP
//! port, `POST /api/*` needs `Authorization: Bearer <--admin-token>` and is
//! refused when no token is configured; the webhook is authenticated by
//! its HMAC signature instead.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};

/// Shared by both listeners.
#[derive(Debug)]
pub(crate) struct Admin {
    pub(crate) deployer: Arc<dewy_core::Deployer>,
    pub(crate) root: PathBuf,
    pub(crate) token: Option<String>,
    pub(crate) webhook_secret: Option<String>,
    /// The registry URL, redacted, for the status page.
    pub(crate) registry: String,
    /// Sizes of release folders (they never change once extracted).
    pub(crate) sizes: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// The fleet as last read, and when: status pages poll it, and with a
    /// bucket cache each read lists the bucket and reads every host.
    pub(crate) fleet: std::sync::Mutex<Option<(std::time::Instant, Vec<serde_json::Value>)>>,
}

/// How long a read of the fleet is reused.
const FLEET_READ_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl Admin {
    async fn fleet(&self) -> Vec<serde_json::Value> {
        {
            let cached = self.fleet.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((at, hosts)) = cached.as_ref()
                && at.elapsed() < FLEET_READ_EVERY
            {
                return hosts.clone();
            }
        }
        let hosts = self.deployer.fleet().await;
        *self.fleet.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), hosts.clone()));
        hosts
    }
}

#[derive(Debug, Clone)]
struct Ctx {
    admin: Arc<Admin>,
    /// The unix socket: callers are the owner.
    trusted: bool,
}

/// Dewy's default admin port.
pub(crate) const DEWY_ADMIN_PORT: u16 = 17539;

fn router(admin: Arc<Admin>, trusted: bool) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/api/history", get(history))
        .route("/api/releases", get(releases))
        .route("/api/fleet", get(fleet))
        .route("/api/rollout", get(rollout))
        .route("/api/check", post(check))
        .route("/api/restart", post(restart))
        .route("/api/clear-bad", post(clear_bad))
        .route("/api/rollback", post(rollback))
        .route("/api/unpin", post(unpin))
        .route("/webhook/github", post(webhook))
        .route("/metrics", get(metrics))
        .with_state(Ctx { admin, trusted })
}

/// Listens on `.dewy/admin.sock` in `root`, owner only (a stale socket
/// file from a killed dewy is replaced).
pub(crate) fn bind_socket(root: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    let path = crate::client::socket_path(root);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let unix = tokio::net::UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tracing::info!(path = %path.display(), "Admin API listening");
    Ok(unix)
}

/// Starts the listeners; they stop when `shutdown` fires.
pub(crate) async fn serve(
    admin: Arc<Admin>,
    port: Option<u16>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let unix = bind_socket(&admin.root)?;
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let unix_app = router(admin.clone(), true);
    tokio::spawn({
        let rx = shutdown.clone();
        async move {
            let _ = axum::serve(unix, unix_app).with_graceful_shutdown(stop(rx)).await;
        }
    });
    if let Some(port) = port {
        let tcp = bind_port(port).await?;
        let tcp_app = router(admin, false);
        tokio::spawn(async move {
            let _ = axum::serve(tcp, tcp_app).with_graceful_shutdown(stop(shutdown)).await;
        });
    }
    Ok(())
}

/// The admin API's TCP listener on 127.0.0.1:`port`. Dewy's default port
/// 17539 moves up to +9 when taken, so several instances on one host each
/// find one.
pub(crate) async fn bind_port(port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let candidates: Vec<u16> = if port == DEWY_ADMIN_PORT {
        (port..port + 10).collect()
    } else {
        vec![port]
    };
    for p in &candidates {
        if let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", *p)).await {
            tracing::info!(port = *p, "Admin API port bound successfully");
            return Ok(l);
        }
    }
    anyhow::bail!("cannot listen for the admin API on 127.0.0.1 (tried ports {candidates:?})")
}

fn refuse(status: StatusCode, why: &str) -> Response {
    tracing::warn!(status = status.as_u16(), reason = why, "Admin API request refused");
    (status, format!("{why}\n")).into_response()
}

/// Mutating calls: trusted on the socket, bearer token on TCP. Returns the
/// refusal, if any.
fn unauthorized(ctx: &Ctx, headers: &HeaderMap) -> Option<Response> {
    refusal(ctx.trusted, ctx.admin.token.as_deref(), headers)
}

/// A mutating call's refusal, if any: callers on the unix socket
/// (`trusted`) are the owner; on TCP the bearer `token` must be sent, and
/// without one configured nothing is allowed.
pub(crate) fn refusal(trusted: bool, token: Option<&str>, headers: &HeaderMap) -> Option<Response> {
    if trusted {
        return None;
    }
    let Some(token) = token else {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "no --admin-token is configured; use the unix socket",
        ));
    };
    let sent = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if sent.is_some_and(|s| constant_time_eq(s.as_bytes(), token.as_bytes())) {
        None
    } else {
        Some(refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The loop's status, with the registry and the app's uptime.
async fn status_json(admin: &Admin) -> serde_json::Value {
    let status = admin.deployer.status().await;
    let uptime = status.pid.and_then(crate::page::uptime_seconds);
    let mut json = serde_json::to_value(status).unwrap_or_default();
    json["registry"] = admin.registry.clone().into();
    json["uptime_seconds"] = uptime.into();
    json
}

/// The rollout this host last read or wrote (no bucket request).
async fn rollout(State(ctx): State<Ctx>) -> Response {
    axum::Json(serde_json::to_value(ctx.admin.deployer.rollout_seen()).unwrap_or_default()).into_response()
}

/// The releases on disk, with their sizes.
fn release_rows(admin: &Admin) -> Vec<serde_json::Value> {
    let mut rows = crate::releases::release_rows(&admin.root);
    let mut sizes = admin.sizes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for row in &mut rows {
        let (Some(name), Some(path)) = (row["release"].as_str(), row["path"].as_str()) else {
            continue;
        };
        let size = *sizes
            .entry(name.to_owned())
            .or_insert_with(|| crate::page::folder_size(std::path::Path::new(path)));
        row["size_bytes"] = size.into();
    }
    rows
}

/// The newest history entries (at most 500), oldest first.
fn history_entries(admin: &Admin) -> Vec<dewy_core::HistoryEntry> {
    let mut entries = dewy_core::read_history(&admin.root);
    let skip = entries.len().saturating_sub(500);
    entries.drain(..skip);
    entries
}

async fn page(State(ctx): State<Ctx>) -> Response {
    let auth = match (ctx.trusted, &ctx.admin.token) {
        (true, _) => crate::page::Auth::Socket,
        (false, Some(_)) => crate::page::Auth::Token,
        (false, None) => crate::page::Auth::None,
    };
    let status = status_json(&ctx.admin).await;
    let fleet = ctx.admin.fleet().await;
    let html = crate::page::render(
        &status,
        &history_entries(&ctx.admin),
        &release_rows(&ctx.admin),
        &fleet,
        ctx.admin.deployer.rollout_seen().as_ref(),
        auth,
    );
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
            // Everything is inline; nothing may be loaded from elsewhere.
            (
                "content-security-policy",
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        html,
    )
        .into_response()
}

async fn status(State(ctx): State<Ctx>) -> Response {
    axum::Json(status_json(&ctx.admin).await).into_response()
}

async fn history(State(ctx): State<Ctx>) -> Response {
    axum::Json(history_entries(&ctx.admin)).into_response()
}

async fn fleet(State(ctx): State<Ctx>) -> Response {
    axum::Json(ctx.admin.fleet().await).into_response()
}

async fn releases(State(ctx): State<Ctx>) -> Response {
    axum::Json(release_rows(&ctx.admin)).into_response()
}

async fn check(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&ctx, &headers) {
        return r;
    }
    ctx.admin.deployer.request_check();
    (StatusCode::ACCEPTED, "check requested\n").into_response()
}

async fn restart(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&ctx, &headers) {
        return r;
    }
    match ctx.admin.deployer.restart_app().await {
        Ok(()) => (StatusCode::OK, "restarted\n").into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

#[derive(Debug, serde::Deserialize)]
struct RollbackQuery {
    to: Option<String>,
}

async fn rollback(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<RollbackQuery>,
) -> Response {
    if let Some(r) = unauthorized(&ctx, &headers) {
        return r;
    }
    let (path, version) = match crate::releases::rollback_target(&ctx.admin.root, q.to.as_deref()) {
        Ok(t) => t,
        Err(why) => return (StatusCode::NOT_FOUND, format!("{why}\n")).into_response(),
    };
    match ctx.admin.deployer.pin_release(&path, &version).await {
        Ok(()) => (StatusCode::OK, format!("rolled back to {version}; pinned\n")).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

async fn unpin(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&ctx, &headers) {
        return r;
    }
    match ctx.admin.deployer.unpin() {
        Ok(()) => (StatusCode::OK, "unpinned\n").into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

async fn clear_bad(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&ctx, &headers) {
        return r;
    }
    match ctx.admin.deployer.clear_bad().await {
        Ok(n) => {
            ctx.admin.deployer.request_check();
            (StatusCode::OK, format!("cleared {n} bad release records\n")).into_response()
        }
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

async fn webhook(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(secret) = &ctx.admin.webhook_secret else {
        return refuse(StatusCode::FORBIDDEN, "no --webhook-secret is configured");
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(|h| hex::decode(h).ok());
    let Some(signature) = signature else {
        return refuse(StatusCode::UNAUTHORIZED, "missing X-Hub-Signature-256");
    };
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "bad webhook secret");
    };
    mac.update(&body);
    if mac.verify_slice(&signature).is_err() {
        return refuse(StatusCode::UNAUTHORIZED, "webhook signature does not match");
    }
    let event = headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match event {
        "release" => {
            tracing::info!("GitHub release event received, checking now");
            ctx.admin.deployer.request_check();
            (StatusCode::ACCEPTED, "check requested\n").into_response()
        }
        "ping" => (StatusCode::OK, "pong\n").into_response(),
        other => (StatusCode::OK, format!("ignored event `{other}`\n")).into_response(),
    }
}

/// Prometheus text exposition of the metrics.
async fn metrics(State(ctx): State<Ctx>) -> Response {
    let out = crate::metrics::prometheus_text(&ctx.admin.deployer).await;
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
