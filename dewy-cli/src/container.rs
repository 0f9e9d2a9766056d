//! `dewy container`: wires flags to dewy-container and runs its loop until
//! a shutdown signal. Replicas keep running when dewy stops; the next dewy
//! adopts them.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::ContainerArgs;
use crate::config::LogFormat;

fn duration(flag: &str, value: &str) -> Result<Duration> {
    let d = match value.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(value.trim())
            .with_context(|| format!("invalid value `{value}` for {flag}: a duration such as 30s"))?,
    };
    Ok(d)
}

/// The default app name: the repository's last segment.
fn app_name(registry: &str) -> String {
    registry
        .split(['?', '#'])
        .next()
        .and_then(|r| r.trim_end_matches('/').rsplit('/').next())
        .map(|n| n.split([':', '@']).next().unwrap_or(n))
        .filter(|n| !n.is_empty() && !n.contains("://"))
        .unwrap_or("app")
        .to_owned()
}

/// Validated settings of `dewy container`.
struct Settings {
    admin_port: u16,
    admin_token: Option<String>,
    otlp: Option<crate::config::Otlp>,
    otlp_interval: Duration,
    calver: Option<String>,
    registry: String,
    config: dewy_container::ContainerConfig,
    runtime: String,
    interval: Duration,
    workdir: std::path::PathBuf,
    notifier: String,
}

fn settings(args: &ContainerArgs) -> Result<Settings> {
    let Some(registry) = args.registry.clone().filter(|r| !r.is_empty()) else {
        bail!("--registry is required: img://HOST[:PORT]/REPO");
    };
    if !registry.starts_with("img://") {
        bail!("invalid value `{registry}` for --registry: container mode needs an img://HOST/REPO registry");
    }
    if args.port.is_empty() {
        bail!("--port is required for container mode: PROXY[:CONTAINER], such as 8080 or 8080:80");
    }
    let mut ports = Vec::new();
    for p in &args.port {
        let m: dewy_container::PortMapping = p
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid value `{p}` for --port: {e}"))?;
        if ports.iter().any(|o: &dewy_container::PortMapping| o.proxy == m.proxy) {
            bail!("invalid value `{p}` for --port: proxy port {} is given twice", m.proxy);
        }
        ports.push(m);
    }
    if !matches!(args.runtime.as_str(), "docker" | "podman") {
        bail!("invalid value `{}` for --runtime: docker or podman", args.runtime);
    }
    for arg in &args.extra {
        let name = arg.split('=').next().unwrap_or_default();
        if matches!(
            name,
            "-d" | "--detach" | "-p" | "--publish" | "-P" | "--publish-all" | "-it" | "-i" | "-t" | "--rm" | "--name"
        ) {
            bail!("the run argument `{arg}` conflicts with dewy's management of the replicas");
        }
        if arg.starts_with("--label=dewy.") || arg.starts_with("dewy.") {
            bail!("the label `{arg}` uses the reserved prefix `dewy.`");
        }
    }
    let interval = duration("--interval", &args.interval)?;
    if interval.is_zero() {
        bail!("invalid value `{}` for --interval: more than 0", args.interval);
    }
    let listen = args
        .listen
        .parse()
        .with_context(|| format!("invalid value `{}` for --listen: an IP address", args.listen))?;
    if let Some(slot) = args.slot.as_deref().filter(|s| !s.is_empty()) {
        // Accepted by the parser for Dewy's command lines, refused here
        // rather than polling forever for a tag that cannot exist.
        bail!(
            "invalid value `{slot}` for --slot: container mode cannot use slots (OCI tags cannot carry build metadata such as `+{slot}`, so no tag would ever match)"
        );
    }
    let calver = args.calver.clone().filter(|c| !c.is_empty());
    if let Some(c) = &calver {
        dewy_registry::CalVerFormat::new(c).map_err(|e| anyhow::anyhow!("invalid value `{c}` for --calver: {e}"))?;
    }
    let otlp = crate::config::otlp_target(args.otlp_endpoint.clone().filter(|e| !e.is_empty()), args.otlp_insecure)?;
    let otlp_interval = duration("--otlp-interval", &args.otlp_interval)?;
    if otlp_interval.is_zero() {
        bail!(
            "invalid value `{}` for --otlp-interval: more than 0",
            args.otlp_interval
        );
    }
    // As Dewy, container mode always serves its admin API on a port: 17539
    // (moving up when taken) unless `--admin-port`; `--telemetry` changes
    // nothing here (the metrics are always served).
    let admin_port = args.admin_port.unwrap_or(crate::admin::DEWY_ADMIN_PORT);
    let workdir = match &args.workdir {
        // Absolute: it is also the replicas' `dewy.workdir` label.
        Some(w) => std::path::absolute(w).with_context(|| format!("invalid value `{w}` for --workdir"))?,
        None => std::env::current_dir().context("cannot read the current directory")?,
    };
    Ok(Settings {
        admin_port,
        admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
        otlp,
        otlp_interval,
        calver,
        config: dewy_container::ContainerConfig {
            app: args.name.clone().unwrap_or_else(|| app_name(&registry)),
            replicas: args.replicas.max(1),
            ports,
            listen,
            health_path: args.health_path.clone().filter(|p| !p.is_empty()),
            health_timeout: duration("--health-timeout", &args.health_timeout)?,
            drain_time: duration("--drain-time", &args.drain_time)?,
            stop_timeout: duration("--stop-timeout", &args.stop_timeout)?,
            extra_args: args.extra.clone(),
            cmd: args.cmd.clone(),
            idle_timeout: Some(duration("--proxy-idle-timeout", &args.proxy_idle_timeout)?).filter(|d| !d.is_zero()),
            before_hook: args.before_deploy_hook.clone().filter(|h| !h.is_empty()),
            after_hook: args.after_deploy_hook.clone().filter(|h| !h.is_empty()),
            hook_env: crate::run::child_env(&args.pass_env),
            workdir: workdir.clone(),
            hook_timeout: Duration::from_secs(300),
            keep_images: args.keep_images,
        },
        registry,
        runtime: args.runtime.clone(),
        interval,
        workdir,
        notifier: args.notifier.clone(),
    })
}

/// `dewy container`.
pub(crate) fn main(args: &ContainerArgs) -> ExitCode {
    let merged = match with_config(args) {
        Ok(m) => m,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let args = merged.as_ref().unwrap_or(args);
    if args.list.is_some() {
        return list(args);
    }
    let s = match settings(args) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let format = if args.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    crate::logging::init(&args.log_level, format);
    crate::block_on(run(s))
}

fn oci_env() -> dewy_registry::OciEnv {
    let var = crate::run::var;
    let mut auth_files = Vec::new();
    if let Some(f) = var("REGISTRY_AUTH_FILE") {
        auth_files.push(f.into());
    }
    if let Some(home) = var("HOME") {
        auth_files.push(std::path::Path::new(&home).join(".docker/config.json"));
    }
    dewy_registry::OciEnv {
        username: var("DOCKER_USERNAME"),
        password: var("DOCKER_PASSWORD"),
        github_token: var("GITHUB_TOKEN").or_else(|| var("GH_TOKEN")),
        auth_files,
    }
}

async fn run(s: Settings) -> Result<()> {
    let options = dewy_registry::OpenOptions {
        oci: oci_env(),
        calver: s.calver.clone(),
        ..Default::default()
    };
    let registry = dewy_registry::open(&s.registry, &options)
        .map_err(crate::run::usage)
        .context("cannot open the registry")?;
    let runtime = dewy_container::runtime::Runtime::new(&s.runtime, Vec::new()).map_err(crate::run::usage)?;
    // Where `dewy clear-bad -w DIR` finds the records too.
    let cache_dir = crate::run::local_cache_dir("", &s.workdir);
    let cache: Arc<dyn dewy_cache::Cache> = Arc::new(
        dewy_cache::FileCache::open(&cache_dir)
            .with_context(|| format!("cannot open the cache {}", cache_dir.display()))?,
    );
    let host = crate::run::hostname();
    let notify = crate::run::open_notify(&s.notifier, &s.workdir, &host)?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), mode = "container", app = %s.config.app, replicas = s.config.replicas, "Dewy started");
    let deployer = dewy_container::ContainerDeployer::start(registry, runtime, cache, notify.clone(), s.config.clone())
        .await
        .context("cannot start container mode")?;
    notify.send(format!(
        "Automatic shipping started by *Dewy* (v{}: container)",
        env!("CARGO_PKG_VERSION")
    ));
    let checks = Arc::new(std::sync::Mutex::new(LastCheck::default()));
    let check_now = Arc::new(tokio::sync::Notify::new());
    serve_admin(
        deployer.clone(),
        checks.clone(),
        check_now.clone(),
        &s.workdir,
        s.admin_port,
        s.admin_token.clone(),
    )
    .await?;
    let otlp = match &s.otlp {
        Some(target) => Some(crate::otlp::start(target, s.otlp_interval, deployer.clone()).await),
        None => None,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // One ERROR line per failure, as in server mode.
    let mut failures = dewy_core::FailureLog::default();
    // A signal stops a check in progress too: a rollout cut short leaves
    // the replicas in rotation as they were recorded, and the next dewy
    // adopts those, removes what the rollout had started and rolls out
    // again (see ContainerDeployer::start).
    let mut cut_short = false;
    loop {
        let checked = tokio::select! {
            checked = deployer.tick() => checked,
            _ = term.recv() => { cut_short = true; break }
            _ = int.recv() => { cut_short = true; break }
        };
        match checked {
            Ok(outcome) => {
                checks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .record(&format!("{outcome:?}"), None);
                failures.recovered();
                tracing::debug!(?outcome, "Check done");
            }
            Err(err) => {
                let text = dewy_core::chain(&err);
                checks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .record("error", Some(&text));
                failures.failed(&text);
                notify.send_error(text);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(s.interval) => {}
            () = check_now.notified() => tracing::info!("Check requested through the admin API"),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(
        replicas = deployer.replicas().len(),
        check_cut_short = cut_short,
        "Shutting down; the replicas keep running for the next dewy to adopt"
    );
    notify.send("Stop receiving by `SIGTERM` signal");
    if let Some(otlp) = otlp {
        otlp.stop().await;
    }
    notify.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// `--otlp-endpoint` pushes the same families as `/metrics`.
impl crate::otlp::Source for dewy_container::ContainerDeployer {
    fn families(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<crate::metrics::Family>> + Send + '_>> {
        Box::pin(async move { families(self) })
    }

    fn new_durations(&self) -> Vec<f64> {
        Vec::new()
    }
}

/// The last check, for the status API.
#[derive(Debug, Default)]
struct LastCheck {
    at: Option<jiff::Timestamp>,
    outcome: Option<String>,
    error: Option<String>,
}

impl LastCheck {
    fn record(&mut self, outcome: &str, error: Option<&str>) {
        self.at = Some(jiff::Timestamp::now());
        self.outcome = Some(outcome.to_owned());
        self.error = error.map(str::to_owned);
    }
}

type Checks = Arc<std::sync::Mutex<LastCheck>>;

fn status(d: &dewy_container::ContainerDeployer, checks: &Checks) -> serde_json::Value {
    let last = checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let running = d.replicas();
    let current_version = running.first().map(|r| r.version.clone());
    let replicas: Vec<_> = running
        .into_iter()
        .map(|r| serde_json::json!({"id": r.id, "version": r.version, "digest": r.digest}))
        .collect();
    let proxies: Vec<_> = d
        .proxies()
        .iter()
        .map(|p| {
            let backends: Vec<_> = p
                .backends()
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "container": b.container,
                        "addr": b.addr.to_string(),
                        "open_connections": b.open_connections(),
                        "failed": b.failed(),
                    })
                })
                .collect();
            serde_json::json!({
                "listen": p.listen.to_string(),
                "accepted": p.accepted.load(std::sync::atomic::Ordering::Relaxed),
                "refused": p.refused.load(std::sync::atomic::Ordering::Relaxed),
                "backends": backends,
            })
        })
        .collect();
    let proxy_backends: usize = d.proxies().iter().map(|p| p.backends().len()).sum();
    serde_json::json!({
        // Dewy's fields first (`command` 2 is container mode).
        "name": d.app(),
        "command": 2,
        "current_version": current_version.unwrap_or_default(),
        "proxy_backends": proxy_backends,
        "is_running": false,
        "mode": "container",
        "dewy_version": env!("CARGO_PKG_VERSION"),
        "replicas": replicas,
        "proxies": proxies,
        "last_check": last.at.map(|t| t.to_string()),
        "last_outcome": last.outcome,
        "last_error": last.error,
    })
}

fn families(d: &dewy_container::ContainerDeployer) -> Vec<crate::metrics::Family> {
    use std::sync::atomic::Ordering::Relaxed;
    let family = |name, kind, help, samples| crate::metrics::Family {
        name,
        kind,
        help,
        samples,
        histogram: None,
    };
    let per_proxy = |f: &dyn Fn(&dewy_container::proxy::Proxy) -> u64| {
        d.proxies()
            .iter()
            .map(|p| (vec![("proxy_port", p.listen.port().to_string())], f(p)))
            .collect::<Vec<_>>()
    };
    vec![
        family(
            "dewy_container_replicas",
            "gauge",
            "Replicas in rotation.",
            vec![(Vec::new(), d.replicas().len() as u64)],
        ),
        family(
            "dewy_proxy_connections_total",
            "counter",
            "Connections the proxy accepted.",
            per_proxy(&|p| p.accepted.load(Relaxed)),
        ),
        family(
            "dewy_proxy_refused_total",
            "counter",
            "Connections closed because no replica could take them.",
            per_proxy(&|p| p.refused.load(Relaxed)),
        ),
        family(
            "dewy_proxy_open_connections",
            "gauge",
            "Connections open through the proxy now.",
            per_proxy(&|p| p.backends().iter().map(|b| b.open_connections() as u64).sum()),
        ),
    ]
}

/// `GET /api/containers` in Dewy's shape: the app's containers with the
/// address dewy's first proxy port reaches each one on.
async fn containers(d: &dewy_container::ContainerDeployer) -> axum::response::Response {
    use axum::response::IntoResponse;
    let list = match d.containers().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot list the containers for the admin API");
            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "Internal server error\n").into_response();
        }
    };
    let first_proxy = d.proxies().into_iter().next();
    let time = |secs: i64| {
        jiff::Timestamp::from_second(secs)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    let items: Vec<serde_json::Value> = list
        .into_iter()
        .map(|c| {
            let ip_port = first_proxy
                .as_ref()
                .and_then(|p| p.backends().into_iter().find(|b| b.container == c.id))
                .map(|b| b.addr.to_string())
                .unwrap_or_default();
            let started_at = c.started_at.map(time).unwrap_or_default();
            let deployed_at = if c.deployed_at.is_empty() {
                started_at.clone()
            } else {
                c.deployed_at.clone()
            };
            serde_json::json!({
                "id": c.id,
                "name": c.name,
                "image": c.image,
                "status": c.status,
                "ip_port": ip_port,
                "started_at": started_at,
                "deployed_at": deployed_at,
                "labels": c.labels,
            })
        })
        .collect();
    axum::Json(serde_json::json!({ "containers": items })).into_response()
}

/// The read-only status API: `.dewy/admin.sock` (owner only) and
/// 127.0.0.1:PORT (`--admin-port`, by default Dewy's 17539 moving up to
/// 17548; none free is a warning, not a failure).
async fn serve_admin(
    deployer: Arc<dewy_container::ContainerDeployer>,
    checks: Checks,
    check_now: Arc<tokio::sync::Notify>,
    workdir: &std::path::Path,
    port: u16,
    token: Option<String>,
) -> Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/api/status",
            get({
                let (d, c) = (deployer.clone(), checks.clone());
                move || async move { axum::Json(status(&d, &c)) }
            }),
        )
        .route(
            "/",
            get({
                let (d, c) = (deployer.clone(), checks.clone());
                move || async move {
                    (
                        [
                            ("content-type", "text/html; charset=utf-8"),
                            ("cache-control", "no-store"),
                            // Nothing loaded, nothing run: a static page.
                            (
                                "content-security-policy",
                                "default-src 'none'; style-src 'unsafe-inline'",
                            ),
                        ],
                        crate::page::render_container(&status(&d, &c)),
                    )
                }
            }),
        )
        .route(
            "/api/containers",
            get({
                let d = deployer.clone();
                move || async move { containers(&d).await }
            }),
        )
        .route(
            "/metrics",
            get({
                let d = deployer.clone();
                move || async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        crate::metrics::render(families(&d)),
                    )
                }
            }),
        );
    let unix = crate::admin::bind_socket(workdir)?;
    let token: Option<Arc<str>> = token.map(Into::into);
    let unix_app = app.clone().merge(actions(&deployer, &check_now, None, true));
    let app = app.merge(actions(&deployer, &check_now, token, false));
    tokio::spawn(async move {
        let _ = axum::serve(unix, unix_app).await;
    });
    let tcp = match crate::admin::bind_port(port).await {
        Ok(tcp) => Some(tcp),
        // Dewy's default port range taken by other instances: the socket
        // still serves; an explicit port must work.
        Err(e) if port == crate::admin::DEWY_ADMIN_PORT => {
            tracing::warn!(error = %e, "No admin port free; the status API is on the unix socket only");
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(tcp) = tcp {
        tokio::spawn(async move {
            let _ = axum::serve(tcp, app).await;
        });
    }
    Ok(())
}

/// The actions: for the owner on the unix socket (`trusted`), on the TCP
/// port with `Authorization: Bearer <--admin-token>` (refused without a
/// token configured), as in server mode.
fn actions(
    deployer: &Arc<dewy_container::ContainerDeployer>,
    check_now: &Arc<tokio::sync::Notify>,
    token: Option<Arc<str>>,
    trusted: bool,
) -> axum::Router {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;
    let refused = move |headers: &HeaderMap| crate::admin::refusal(trusted, token.as_deref(), headers);
    let unsupported = {
        let refused = refused.clone();
        move |headers: HeaderMap| async move {
            if let Some(r) = refused(&headers) {
                return r;
            }
            (
                StatusCode::NOT_IMPLEMENTED,
                "container mode has no rollback or pin: the replicas run the newest image that is not recorded as bad; to go back, publish the previous image under a newer tag\n",
            )
                .into_response()
        }
    };
    axum::Router::new()
        .route(
            "/api/check",
            post({
                let (refused, check_now) = (refused.clone(), check_now.clone());
                move |headers: HeaderMap| async move {
                    if let Some(r) = refused(&headers) {
                        return r;
                    }
                    check_now.notify_one();
                    (StatusCode::ACCEPTED, "check requested\n").into_response()
                }
            }),
        )
        .route(
            "/api/clear-bad",
            post({
                let (refused, check_now, d) = (refused.clone(), check_now.clone(), deployer.clone());
                move |headers: HeaderMap| async move {
                    if let Some(r) = refused(&headers) {
                        return r;
                    }
                    match d.clear_bad().await {
                        Ok(n) => {
                            check_now.notify_one();
                            (StatusCode::OK, format!("cleared {n} bad release records\n")).into_response()
                        }
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, format!("{}\n", dewy_core::chain(&e))).into_response()
                        }
                    }
                }
            }),
        )
        .route(
            "/api/restart",
            post({
                let (refused, d) = (refused, deployer.clone());
                move |headers: HeaderMap| async move {
                    if let Some(r) = refused(&headers) {
                        return r;
                    }
                    match d.restart().await {
                        Ok(n) => (StatusCode::OK, format!("restarted {n} replicas\n")).into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, format!("{}\n", dewy_core::chain(&e))).into_response()
                        }
                    }
                }
            }),
        )
        .route("/api/rollback", post(unsupported.clone()))
        .route("/api/unpin", post(unsupported))
}

/// The containers a running dewy's proxies route to (backends not failed).
fn in_rotation(status: &serde_json::Value) -> Vec<String> {
    status["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["backends"].as_array().into_iter().flatten())
        .filter(|b| b["failed"] != serde_json::Value::Bool(true))
        .filter_map(|b| b["container"].as_str().map(str::to_owned))
        .collect()
}

/// `12s`, `5m`, `3h`, `2d`.
fn human_duration(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `dewy container list`: the app's replicas as the runtime sees them,
/// with uptime and, when dewy runs, whether each one serves.
fn list(args: &ContainerArgs) -> ExitCode {
    let app = args
        .name
        .clone()
        .or_else(|| args.registry.as_deref().map(app_name))
        .unwrap_or_else(|| "app".into());
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return ExitCode::from(1);
    };
    let result = rt.block_on(async {
        let runtime = dewy_container::runtime::Runtime::new(&args.runtime, Vec::new())?;
        runtime.managed(&app).await
    });
    match result {
        Ok(list) => {
            // Health as the running dewy sees it: a replica is serving when
            // its proxy backend is in rotation.
            let workdir = std::path::PathBuf::from(args.workdir.as_deref().unwrap_or("."));
            let served = crate::client::request(&workdir, "GET", "/api/status")
                .ok()
                .filter(|(code, _)| *code == 200)
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                .map(|status| in_rotation(&status));
            let now = jiff::Timestamp::now().as_second();
            println!(
                "{:<14} {:<8} {:<10} {:<12} {:<14} DIGEST",
                "CONTAINER", "STATE", "UPTIME", "HEALTH", "VERSION"
            );
            for c in list {
                let uptime = match c.started_at {
                    Some(t) if c.running => human_duration((now - t).max(0)),
                    _ => "-".to_owned(),
                };
                let health = match (&served, c.running) {
                    (_, false) => "stopped",
                    (None, true) => "unknown",
                    (Some(ids), true) if ids.iter().any(|id| id == &c.id) => "serving",
                    (Some(_), true) => "not-serving",
                };
                println!(
                    "{:<14} {:<8} {:<10} {:<12} {:<14} {}",
                    c.id.get(..12).unwrap_or(&c.id),
                    if c.running { "running" } else { "stopped" },
                    uptime,
                    health,
                    c.version,
                    c.digest
                );
            }
            if served.is_none() {
                eprintln!(
                    "note: no dewy answers on {}; HEALTH is unknown",
                    crate::client::socket_path(&workdir).display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}

/// `dewy container`'s flags completed from `dewy.toml` (or `--config`) and
/// `DEWY_<KEY>` variables, in that order of precedence below the flags:
/// each key missing from the command line becomes its flag again, and the
/// whole is parsed once more (so a value from the file is checked exactly
/// as the flag's). `None` when neither adds anything.
fn with_config(args: &ContainerArgs) -> Result<Option<ContainerArgs>> {
    use clap::CommandFactory;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = crate::cli::Cli::command();
    let Ok(matches) = cli.clone().try_get_matches_from(&argv) else {
        return Ok(None);
    };
    let Some(("container", given)) = matches.subcommand() else {
        return Ok(None);
    };
    let sub = cli.find_subcommand("container").context("no container command")?;
    let keys: Vec<&clap::Arg> = sub
        .get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "list" | "config" | "help" | "version"))
        .collect();
    let names: Vec<String> = keys.iter().map(|a| a.get_id().to_string()).collect();
    let (figment, file) = crate::config::file_and_env(args.config.as_deref(), names.clone())?;
    let source = || match &file {
        Some(f) => format!("{} or DEWY_* variables", f.display()),
        None => "DEWY_* variables".to_owned(),
    };
    let raw: std::collections::BTreeMap<String, crate::config::OneOrMany> = figment
        .extract()
        .map_err(|e| anyhow::anyhow!("{e} (in {})", source()))?;
    let mut added: Vec<String> = Vec::new();
    let mut run_args: Vec<String> = Vec::new();
    for (key, value) in &raw {
        let Some(arg) = keys.iter().find(|a| a.get_id() == key.as_str()) else {
            bail!(
                "unknown key `{key}` (in {}; valid keys: {})",
                source(),
                names.join(", ")
            );
        };
        if given.value_source(key) == Some(clap::parser::ValueSource::CommandLine) {
            continue; // the flag wins
        }
        if key == "run_args" {
            run_args = value.items();
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap_or(key));
        match arg.get_action() {
            clap::ArgAction::SetTrue => {
                if value.items().iter().any(|v| matches!(v.as_str(), "true" | "1")) {
                    added.push(flag);
                }
            }
            clap::ArgAction::Append => {
                for item in value.items() {
                    added.push(format!("{flag}={item}"));
                }
            }
            _ => {
                let items = value.items();
                if items.len() != 1 {
                    bail!("invalid value for {flag}: a single value, not a list (in {})", source());
                }
                added.push(format!("{flag}={}", items[0]));
            }
        }
    }
    if added.is_empty() && run_args.is_empty() {
        return Ok(None);
    }
    let at = argv
        .iter()
        .position(|a| a == "container")
        .context("no container command on the command line")?;
    let mut merged: Vec<std::ffi::OsString> = argv[..=at].to_vec();
    merged.extend(added.iter().map(std::ffi::OsString::from));
    merged.extend(argv[at + 1..].iter().cloned());
    if !run_args.is_empty() && !argv.iter().any(|a| a == "--") {
        merged.push("--".into());
        merged.extend(run_args.iter().map(std::ffi::OsString::from));
    }
    match <crate::cli::Cli as clap::Parser>::try_parse_from(&merged) {
        Ok(crate::cli::Cli {
            command: Some(crate::cli::Command::Container(merged)),
            ..
        }) => Ok(Some(merged)),
        Ok(_) => bail!("the configuration changed the command"),
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            bail!(
                "{} (a value from {})",
                first.trim_start_matches("error: ").trim(),
                source()
            )
        }
    }
}
