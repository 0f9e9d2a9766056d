//! Wiring validated settings to dewy-core, and signals.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Mode, Settings};

/// Variables dewy itself consumes as secrets. They are removed from the
/// environment of the application and the hooks unless `--pass-env` names
/// them (the Go original leaked all of them).
const SECRETS: &[&str] = &[
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "GITHUB_APP_ID",
    "GITHUB_APP_INSTALLATION_ID",
    "GITHUB_APP_PRIVATE_KEY",
    "GITHUB_APP_PRIVATE_KEY_PATH",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "SLACK_TOKEN",
    "SLACK_WEBHOOK_URL",
    "MAIL_USERNAME",
    "MAIL_PASSWORD",
    "DOCKER_PASSWORD",
];

fn child_env(pass: &[String]) -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| {
            let name = k.to_string_lossy();
            // systemd's socket is dewy's, not the app's.
            name != "NOTIFY_SOCKET" && (!SECRETS.contains(&name.as_ref()) || pass.iter().any(|p| *p == name))
        })
        .collect()
}

/// Tells systemd (`Type=notify`) that dewy is up, when it runs under it.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = var("NOTIFY_SOCKET") else { return };
    let addr = match path.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| std::os::unix::net::UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(err) = sent {
        tracing::warn!(error = %err, "Could not notify systemd");
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Options of the S3 and GCS clients, from the environment.
fn cloud_options() -> dewy_registry::CloudOptions {
    dewy_registry::CloudOptions {
        // AWS credentials come from the SDK's standard chain.
        aws_credentials: None,
        gcs_emulator: var("STORAGE_EMULATOR_HOST"),
    }
}

/// A cache opened from `--cache`, and the bucket behind it if any.
struct OpenedCache {
    cache: Arc<dyn dewy_cache::Cache>,
    /// The bucket, its prefix and `registry-ttl` when it is a cloud cache.
    bucket: Option<(dewy_cache::cloud::StoreUrl, Option<Duration>)>,
}

/// The local cache folder (for a bucket cache: of the local copies).
fn local_cache_dir(cache_url: &str, workdir: &std::path::Path) -> std::path::PathBuf {
    if let Some(path) = cache_url.strip_prefix("file://") {
        std::path::PathBuf::from(path.split('?').next().unwrap_or(path))
    } else if let Some(dir) = var("DEWY_CACHEDIR") {
        dir.into()
    } else {
        workdir.join(".dewy/cache")
    }
}

/// The cache named by `cache_url`: a local file cache (`file:///path`, else
/// `$DEWY_CACHEDIR`, else `WORKDIR/.dewy/cache`) or a bucket with a local
/// copy.
fn open_cache_url(
    cache_url: &str,
    workdir: &std::path::Path,
    cloud: &dewy_registry::CloudOptions,
) -> Result<OpenedCache> {
    let local = dewy_cache::FileCache::open_or_fallback(local_cache_dir(cache_url, workdir))?.cache;
    if cache_url.is_empty() || cache_url.starts_with("file://") {
        if cache_url.contains("registry-ttl=") {
            tracing::warn!("registry-ttl set but cache backend does not support atomic writes; ignoring");
        }
        return Ok(OpenedCache {
            cache: Arc::new(local),
            bucket: None,
        });
    }
    let url = url::Url::parse(cache_url).with_context(|| format!("invalid cache URL `{cache_url}`"))?;
    let opened = dewy_cache::cloud::open_store(&url, cloud)?;
    let mut ttl = None;
    for (k, v) in &opened.rest {
        match k.as_str() {
            "registry-ttl" if v.is_empty() => {}
            "registry-ttl" => {
                ttl = Some(
                    humantime::parse_duration(v)
                        .with_context(|| format!("cache option `registry-ttl={v}` is not a duration such as 30s"))?,
                )
            }
            other => {
                let valid = if url.scheme() == "s3" {
                    "endpoint, region, registry-ttl"
                } else {
                    "registry-ttl"
                };
                anyhow::bail!("unknown cache option `{other}`; valid options: {valid}");
            }
        }
    }
    let cache = Arc::new(dewy_cache::cloud::CloudCache::new(
        opened.store.clone(),
        opened.prefix.clone(),
        local,
    ));
    Ok(OpenedCache {
        cache,
        bucket: Some((opened, ttl)),
    })
}

/// The cache named by `--cache`, and the registry wrapped to share its
/// answers through the bucket when the cache URL asks for it
/// (`registry-ttl=`).
fn open_cache(
    s: &Settings,
    registry: Arc<dyn dewy_registry::Registry>,
    open: &dewy_registry::OpenOptions,
) -> Result<(Arc<dyn dewy_cache::Cache>, Arc<dyn dewy_registry::Registry>)> {
    let OpenedCache { cache, bucket } = open_cache_url(&s.cache, &s.workdir, &open.cloud)?;
    let Some((opened, Some(ttl))) = bucket.map(|(o, ttl)| (o, ttl.filter(|t| !t.is_zero()))) else {
        return Ok((cache, registry));
    };
    let registry_url = url::Url::parse(&s.registry)?;
    let calver = s.calver.clone().or_else(|| {
        registry_url
            .query_pairs()
            .find(|(k, _)| k == "calver")
            .map(|(_, v)| v.into_owned())
    });
    let scheme = match &calver {
        Some(f) => dewy_registry::Scheme::CalVer(dewy_registry::CalVerFormat::new(f).map_err(anyhow::Error::msg)?),
        None => dewy_registry::Scheme::SemVer,
    };
    let scope = format!(
        "{}|{}|{}|{}",
        open.platform.os,
        open.platform.arch,
        s.slot.as_deref().unwrap_or_default(),
        calver.as_deref().unwrap_or_default()
    );
    tracing::info!(ttl = %humantime::format_duration(ttl), "Registry result cache enabled");
    let shared = dewy_registry::SharedRegistry::new(
        registry,
        opened.store,
        &opened.prefix,
        dewy_registry::SharedScope {
            registry_url: s.registry.clone(),
            scope,
            scheme,
            node: format!("{}:{}", hostname(), std::process::id()),
        },
        ttl,
    );
    Ok((cache, Arc::new(shared)))
}

/// A configuration error found while opening what the flags name (a
/// registry or cache URL, a notifier): dewy exits 2, like for a bad flag,
/// so that systemd's `RestartPreventExitStatus=2` stops retrying.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(crate) struct Usage(Box<dyn std::error::Error + Send + Sync>);

fn usage(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Usage {
    Usage(err.into())
}

/// Takes the app folder for this process: an exclusive lock on
/// `.dewy/lock` (holding the pid), kept until dewy exits. A second dewy on
/// the same folder would unlink the first one's admin socket and switch
/// `current` under it.
fn lock_app_folder(root: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let dir = root.join(".dewy");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open `{}`", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            anyhow::bail!(
                "another dewy (pid {}) already runs in `{}`; stop it first",
                pid.trim(),
                root.display()
            );
        }
        Err((_, errno)) => return Err(errno).with_context(|| format!("cannot lock `{}`", path.display())),
    };
    lock.set_len(0)?;
    lock.rewind()?;
    writeln!(lock, "{}", std::process::id())?;
    Ok(lock)
}

/// Runs dewy until a shutdown signal.
pub(crate) async fn run(s: Settings) -> Result<()> {
    std::env::set_current_dir(&s.workdir)
        .with_context(|| format!("cannot enter the working directory `{}`", s.workdir.display()))?;
    let _lock = lock_app_folder(&s.workdir)?;
    if s.interval < Duration::from_secs(1) {
        tracing::warn!(interval = ?s.interval, "An interval under one second polls the registry constantly and costs CPU; 10s or more is usual (the admin API's webhook deploys at once)");
    }
    let open = dewy_registry::OpenOptions {
        slot: s.slot.clone(),
        calver: s.calver.clone(),
        github: dewy_registry::GithubEnv {
            // GH_TOKEN wins over GITHUB_TOKEN, as in Dewy.
            token: var("GH_TOKEN").or_else(|| var("GITHUB_TOKEN")),
            api_url: var("GITHUB_API_URL"),
            app_id: var("GITHUB_APP_ID"),
            app_installation_id: var("GITHUB_APP_INSTALLATION_ID"),
            app_private_key: var("GITHUB_APP_PRIVATE_KEY"),
            app_private_key_path: var("GITHUB_APP_PRIVATE_KEY_PATH"),
        },
        cloud: cloud_options(),
        ..Default::default()
    };
    let registry = dewy_registry::open(&s.registry, &open)
        .map_err(usage)
        .context("cannot open the registry")?;

    let shared_cache = !s.cache.is_empty() || var("DEWY_CACHEDIR").is_some();
    let (cache, registry) = open_cache(&s, registry, &open)
        .map_err(|e| usage(e.into_boxed_dyn_error()))
        .context("cannot open the cache")?;

    let env = dewy_notify::NotifierEnv {
        slack_token: var("SLACK_TOKEN"),
        slack_webhook_url: var("SLACK_WEBHOOK_URL"),
        slack_api_url: var("SLACK_API_URL"),
        mail_username: var("MAIL_USERNAME"),
        mail_password: var("MAIL_PASSWORD"),
        mail_from: var("MAIL_FROM"),
        mail_ca_file: var("MAIL_CA_FILE"),
    };
    let configured = match dewy_notify::from_url(&s.notifier, &env) {
        Err(err @ dewy_notify::Error::NoCredentials { .. }) => {
            // An optional secrets file that is absent must not keep the app
            // down: deploy without notifications, and say so once.
            tracing::warn!(error = %err, "Notifications are off");
            dewy_notify::from_url("", &env).context("cannot set up the notifier")?
        }
        other => other.map_err(usage).context("cannot set up the notifier")?,
    };
    let host = hostname();
    let context = dewy_notify::Context {
        hostname: host.clone(),
        user: var("USER").unwrap_or_default(),
        cwd: s.workdir.display().to_string(),
        app: s
            .workdir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let notify = dewy_notify::Notify::new(configured.notifier, context, configured.quiet);

    let env = child_env(&s.pass_env);
    let app: Option<Arc<dyn dewy_core::Supervisor>> = if s.mode == Mode::Server {
        let listeners = dewy_starter::Listeners::bind(&s.ports).context("cannot listen on the application's ports")?;
        for (spec, _) in listeners.iter() {
            tracing::info!(port = %spec.starter_name(), "Listening for the application");
        }
        let config = dewy_starter::StarterConfig {
            command: s.command[0].clone().into(),
            args: s.command[1..].iter().map(OsString::from).collect(),
            dir: s.workdir.clone(),
            env: env.clone(),
            readiness: s.readiness.clone(),
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            stop_timeout: s.stop_timeout,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        };
        Some(Arc::new(dewy_starter::Starter::new(config, listeners)))
    } else {
        None
    };

    let mut config = dewy_core::Config::new(
        if s.mode == Mode::Server {
            dewy_core::Mode::Server
        } else {
            dewy_core::Mode::Assets
        },
        s.workdir.clone(),
    );
    config.interval = s.interval;
    config.keep_releases = s.keep_releases;
    config.grace_period = s.grace_period;
    config.before_hook = s.before_hook.clone();
    config.after_hook = s.after_hook.clone();
    config.hook_timeout = s.hook_timeout;
    config.abort_on_before_hook_failure = s.abort_on_hook_failure;
    config.hook_env = env;
    config.hostname = host;
    config.health_command = s.health_command.clone();
    if shared_cache {
        // A cache outside the app folder may be shared by several apps:
        // each records its own `current` (Dewy's single key made two apps
        // redeploy each other forever).
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(s.workdir.as_os_str().as_encoded_bytes()));
        config.current_key =
            dewy_cache::Key::new(format!("current-{}", &digest[..16])).context("per-app current key")?;
    }
    if let (false, dewy_starter::Readiness::Http { path, .. }, Some(spec)) =
        (s.health_soak.is_zero(), &s.readiness, s.ports.first())
    {
        let addr = match spec {
            dewy_starter::ListenSpec::Port(p) => Some(std::net::SocketAddr::from(([127, 0, 0, 1], *p))),
            dewy_starter::ListenSpec::Addr(a) if a.ip().is_unspecified() => Some(std::net::SocketAddr::new(
                if a.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                },
                a.port(),
            )),
            dewy_starter::ListenSpec::Addr(a) => Some(*a),
            dewy_starter::ListenSpec::Unix(_) => None,
        };
        match addr {
            Some(addr) => {
                config.soak = Some(dewy_core::Soak {
                    addr,
                    path: path.clone(),
                    duration: s.health_soak,
                    interval: s.health_interval,
                })
            }
            None => tracing::warn!("--health-soak needs a TCP port first in --port; the soak is off"),
        }
    }
    let mut deployer =
        dewy_core::Deployer::new(config, registry, cache, notify, app).context("cannot prepare the app folder")?;
    // A bar on a terminal; otherwise dewy-core logs progress every few seconds.
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) && s.log_format == crate::config::LogFormat::Text {
        deployer = deployer.with_progress(Arc::new(crate::progress::BarProgress::default()));
    }
    let deployer = Arc::new(deployer);
    let (admin_stop, admin_rx) = tokio::sync::watch::channel(false);
    let admin = Arc::new(crate::admin::Admin {
        deployer: deployer.clone(),
        root: s.workdir.clone(),
        token: s.admin_token.clone(),
        webhook_secret: s.webhook_secret.clone(),
    });
    crate::admin::serve(admin, s.admin_port, admin_rx).await?;
    let otlp = match &s.otlp_endpoint {
        Some(url) => Some(crate::otlp::start(url, s.otlp_interval, deployer.clone()).await),
        None => None,
    };

    let runner = {
        let d = deployer.clone();
        tokio::spawn(async move { d.run().await })
    };
    notify_systemd("READY=1");
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let name = loop {
        tokio::select! {
            _ = hup.recv() => tracing::info!("SIGHUP ignored (use SIGUSR1 to restart the application)"),
            _ = usr1.recv() => {
                tracing::info!("Restart requested by SIGUSR1");
                if let Err(err) = deployer.restart_app().await {
                    tracing::error!(error = %err, "Restart failure");
                    deployer.notify().send_error(err);
                }
            }
            _ = term.recv() => break "terminated",
            _ = int.recv() => break "interrupt",
            _ = quit.recv() => break "quit",
        }
    };
    tracing::info!(signal = name, "Shutting down");
    notify_systemd("STOPPING=1");
    deployer.shutdown(name).await;
    let _ = admin_stop.send(true);
    let _ = std::fs::remove_file(crate::admin::socket_path(&s.workdir));
    if let Some(otlp) = otlp {
        otlp.stop().await;
    }
    let _ = runner.await;
    Ok(())
}

/// The releases on disk, newest first, with what the history says of them.
pub(crate) fn release_rows(root: &std::path::Path) -> Vec<serde_json::Value> {
    let layout = dewy_core::Releases::new(root);
    let history = dewy_core::read_history(root);
    layout
        .list()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let dir = r.path.display().to_string();
            let entry = history
                .iter()
                .rev()
                .find(|e| e.release_dir.as_deref() == Some(dir.as_str()));
            serde_json::json!({
                "release": r.name,
                "current": r.current,
                "version": entry.map(|e| e.version.clone()),
                "deployed_at": entry.map(|e| e.time.to_string()),
                "path": dir,
            })
        })
        .collect()
}

fn root_of(args: &crate::cli::ReleasesArgs) -> std::path::PathBuf {
    root_from(args.workdir.as_deref())
}

fn root_from(workdir: Option<&str>) -> std::path::PathBuf {
    let root = std::path::PathBuf::from(workdir.unwrap_or("."));
    std::path::absolute(&root).unwrap_or(root)
}

/// One request to the running dewy over its admin socket.
fn admin_request(root: &std::path::Path, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(crate::admin::socket_path(root))?;
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: dewy\r\nContent-Length: 0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

/// The release to roll back to: `to` (a version or a release folder name),
/// else the one before the current one. `Err` says what is on disk.
pub(crate) fn rollback_target(
    root: &std::path::Path,
    to: Option<&str>,
) -> Result<(std::path::PathBuf, String), String> {
    let rows = release_rows(root);
    let version_of = |r: &serde_json::Value| r["version"].as_str().map(str::to_owned);
    let current = rows.iter().position(|r| r["current"] == true);
    let target = match to {
        Some(v) => rows
            .iter()
            .find(|r| version_of(r).as_deref() == Some(v) || r["release"] == v),
        None => current.and_then(|i| rows.get(i + 1)),
    };
    let Some(target) = target else {
        let on_disk: Vec<String> = rows
            .iter()
            .map(|r| version_of(r).unwrap_or_else(|| r["release"].as_str().unwrap_or("?").to_owned()))
            .collect();
        return Err(match to {
            Some(v) => format!(
                "version `{v}` is not on disk in {}; releases: {}",
                root.display(),
                on_disk.join(", ")
            ),
            None => format!(
                "no release before the current one in {}; releases: {}",
                root.display(),
                on_disk.join(", ")
            ),
        });
    };
    let path = std::path::PathBuf::from(target["path"].as_str().unwrap_or_default());
    let version = version_of(target).unwrap_or_else(|| target["release"].as_str().unwrap_or_default().to_owned());
    Ok((path, version))
}

/// `dewy rollback` and `dewy pin`: through the running dewy (which does it
/// between ticks and restarts the app), else on the folder directly.
pub(crate) fn rollback(workdir: Option<&str>, to: Option<&str>) -> std::process::ExitCode {
    let root = root_from(workdir);
    let (path, version) = match rollback_target(&root, to) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("error: {why}");
            return std::process::ExitCode::from(1);
        }
    };
    let query = to.map(|v| format!("?to={}", percent_encode(v))).unwrap_or_default();
    // Say at once what happens to a deploy in flight.
    if let Ok((200, body)) = admin_request(&root, "GET", "/api/status")
        && let Ok(status) = serde_json::from_str::<serde_json::Value>(&body)
        && let Some(tag) = status["deploying"].as_str()
    {
        eprintln!("cancelling the deploy of {tag} (it is undone), then rolling back to {version}");
    }
    match admin_request(&root, "POST", &format!("/api/rollback{query}")) {
        Ok((200, _)) => {
            println!(
                "current -> {} ({version}); the running dewy restarted the application; pinned until `dewy unpin`",
                path.display()
            );
            return std::process::ExitCode::SUCCESS;
        }
        Ok((status, body)) => {
            eprintln!(
                "error: the running dewy could not roll back ({status}): {}",
                body.trim()
            );
            return std::process::ExitCode::from(1);
        }
        Err(_) => {}
    }
    if let Err(err) =
        dewy_core::set_pin(&root, Some(&version)).and_then(|()| dewy_core::Releases::new(&root).switch(&path))
    {
        eprintln!("error: cannot roll back {}: {err}", root.display());
        return std::process::ExitCode::from(1);
    }
    println!(
        "current -> {} ({version}); pinned until `dewy unpin`; no running dewy in {}, the next start uses this release",
        path.display(),
        root.display()
    );
    std::process::ExitCode::SUCCESS
}

fn percent_encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `dewy clear-bad`: through the running dewy, else on its cache directly
/// (`--cache`, the same URL the daemon uses; a bucket's records are shared
/// by the fleet).
pub(crate) fn clear_bad(args: &crate::cli::ClearBadArgs) -> std::process::ExitCode {
    let root = root_from(args.workdir.as_deref());
    match admin_request(&root, "POST", "/api/clear-bad") {
        Ok((200, body)) => {
            println!("{}", body.trim());
            return std::process::ExitCode::SUCCESS;
        }
        Ok((status, body)) => {
            eprintln!("error: the running dewy refused ({status}): {}", body.trim());
            return std::process::ExitCode::from(1);
        }
        Err(_) => {}
    }
    // The daemon's cache: the flag, else as `dewy server` would find it.
    let cache_url = args
        .cache
        .clone()
        .or_else(|| var("DEWY_CACHE"))
        .or_else(|| {
            use figment::providers::Format;
            figment::Figment::from(figment::providers::Toml::file(root.join("dewy.toml")))
                .extract_inner::<String>("cache")
                .ok()
        })
        .unwrap_or_default();
    let local_dir = local_cache_dir(&cache_url, &root);
    let place = if cache_url.is_empty() || cache_url.starts_with("file://") {
        if !local_dir.is_dir() {
            println!("cleared 0 bad release records (no cache in {})", local_dir.display());
            return std::process::ExitCode::SUCCESS;
        }
        local_dir.display().to_string()
    } else {
        dewy_registry::SafeUrl(&cache_url).to_string()
    };
    let cleared = async {
        let cache = open_cache_url(&cache_url, &root, &cloud_options())?.cache;
        let mut n = 0;
        for entry in cache.list().await? {
            if entry.key.is_bad_record() {
                cache.delete(&entry.key).await?;
                n += 1;
            }
        }
        anyhow::Ok(n)
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(cleared) {
        Ok(n) => {
            println!("cleared {n} bad release records in {place}");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: cannot clear the bad release records in {place}: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// `dewy unpin`.
pub(crate) fn unpin(workdir: Option<&str>) -> std::process::ExitCode {
    let root = root_from(workdir);
    if let Ok((200, _)) = admin_request(&root, "POST", "/api/unpin") {
        println!("unpinned: the running dewy checks the registry now");
        return std::process::ExitCode::SUCCESS;
    }
    if let Err(err) = dewy_core::set_pin(&root, None) {
        eprintln!("error: cannot unpin {}: {err}", root.display());
        return std::process::ExitCode::from(1);
    }
    println!("unpinned: deploys resume at the next check");
    std::process::ExitCode::SUCCESS
}

/// `dewy releases`: the releases on disk, newest first.
pub(crate) fn releases(args: &crate::cli::ReleasesArgs) -> std::process::ExitCode {
    let root = root_of(args);
    let releases_dir = dewy_core::Releases::new(&root).dir();
    if let Err(err) = std::fs::read_dir(&releases_dir) {
        eprintln!("error: cannot list {}: {err}", releases_dir.display());
        return std::process::ExitCode::from(1);
    }
    let rows = release_rows(&root);
    if args.json {
        println!("{}", serde_json::Value::Array(rows));
    } else if rows.is_empty() {
        println!("No releases in {}.", releases_dir.display());
    } else {
        println!("{:<8} {:<22} {:<20} DEPLOYED", "CURRENT", "RELEASE", "VERSION");
        for r in &rows {
            println!(
                "{:<8} {:<22} {:<20} {}",
                if r["current"] == true { "*" } else { "" },
                r["release"].as_str().unwrap_or_default(),
                r["version"].as_str().unwrap_or("?"),
                r["deployed_at"].as_str().unwrap_or("?")
            );
        }
    }
    std::process::ExitCode::SUCCESS
}

/// `dewy status`: asks the running dewy over its admin socket.
pub(crate) fn status(args: &crate::cli::ReleasesArgs) -> std::process::ExitCode {
    let root = root_of(args);
    let body = match admin_request(&root, "GET", "/api/status") {
        Ok((_, body)) => body,
        Err(err) => {
            eprintln!(
                "error: no running dewy answers on {} ({err})",
                crate::admin::socket_path(&root).display()
            );
            return std::process::ExitCode::from(1);
        }
    };
    if args.json {
        println!("{body}");
        return std::process::ExitCode::SUCCESS;
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    for key in [
        "mode",
        "dewy_version",
        "current_version",
        "current_release",
        "previous_release",
        "is_running",
        "generation",
        "pid",
        "last_check",
        "last_outcome",
        "last_error",
        "next_check",
        "bad_release",
        "pinned",
        "deploying",
    ] {
        let value = match &v[key] {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{key:<16} {value}");
    }
    std::process::ExitCode::SUCCESS
}
