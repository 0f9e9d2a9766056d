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
    "DEWY_GRPC_TOKEN",
    "DEWY_ADMIN_TOKEN",
    "DEWY_WEBHOOK_SECRET",
];

pub(crate) fn child_env(pass: &[String]) -> Vec<(OsString, OsString)> {
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

pub(crate) fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

pub(crate) fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Options of the S3 and GCS clients, from the environment.
pub(crate) fn cloud_options() -> dewy_registry::CloudOptions {
    dewy_registry::CloudOptions {
        // AWS credentials come from the SDK's standard chain.
        aws_credentials: None,
        gcs_emulator: var("STORAGE_EMULATOR_HOST"),
    }
}

/// A cache opened from `--cache`, and the bucket behind it if any.
pub(crate) struct OpenedCache {
    pub(crate) cache: Arc<dyn dewy_cache::Cache>,
    /// The bucket, its prefix and `registry-ttl` when it is a cloud cache.
    bucket: Option<(dewy_store::StoreUrl, Option<Duration>)>,
}

/// The local cache folder (for a bucket cache: of the local copies).
pub(crate) fn local_cache_dir(cache_url: &str, workdir: &std::path::Path) -> std::path::PathBuf {
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
pub(crate) fn open_cache_url(
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
    let opened = dewy_store::open_store(&url, cloud).map_err(|e| match e {
        dewy_store::Error::InvalidUrl { url, reason } => anyhow::anyhow!("invalid cache URL `{url}`: {reason}"),
        other => other.into(),
    })?;
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

pub(crate) fn usage(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Usage {
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

/// A host switching from Dewy with a shared cache directory: Dewy recorded
/// the release in place under the cache's single `current` key, dewy under
/// a key per app. When this app has no record yet but a release is in place
/// and Dewy's record exists, it is copied (never moved: another app may
/// read it), so switching binaries does not redeploy the same release.
async fn adopt_dewy_current(cache: &dyn dewy_cache::Cache, key: &dewy_cache::Key, workdir: &std::path::Path) {
    if std::fs::read_link(workdir.join("current")).is_err() {
        return;
    }
    let ours = cache.read(key).await;
    let theirs = cache.read(&dewy_cache::Key::current()).await;
    if let (Ok(None), Ok(Some(value))) = (ours, theirs) {
        match cache.write(key, &value).await {
            Ok(()) => tracing::info!(
                from = "current",
                to = %key,
                value = %String::from_utf8_lossy(&value),
                "Adopted Dewy's record of the release in place"
            ),
            Err(err) => tracing::warn!(error = %err, "Could not adopt Dewy's record of the release in place"),
        }
    }
}

/// The notifier of `url` (empty: none), with the host and app folder as
/// context. Missing credentials turn notifications off with one warning.
pub(crate) fn open_notify(url: &str, workdir: &std::path::Path, host: &str) -> Result<dewy_notify::Notify> {
    let env = dewy_notify::NotifierEnv {
        slack_token: var("SLACK_TOKEN"),
        slack_webhook_url: var("SLACK_WEBHOOK_URL"),
        slack_api_url: var("SLACK_API_URL"),
        mail_username: var("MAIL_USERNAME"),
        mail_password: var("MAIL_PASSWORD"),
        mail_from: var("MAIL_FROM"),
        mail_ca_file: var("MAIL_CA_FILE"),
    };
    let configured = match dewy_notify::from_url(url, &env) {
        Err(err @ dewy_notify::Error::NoCredentials { .. }) => {
            // An optional secrets file that is absent must not keep the app
            // down: deploy without notifications, and say so once.
            tracing::warn!(error = %err, "Notifications are off");
            dewy_notify::from_url("", &env).context("cannot set up the notifier")?
        }
        other => other.map_err(usage).context("cannot set up the notifier")?,
    };
    let context = dewy_notify::Context {
        hostname: host.to_owned(),
        user: var("USER").unwrap_or_default(),
        cwd: workdir.display().to_string(),
        app: workdir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    Ok(dewy_notify::Notify::new(configured.notifier, context, configured.quiet))
}

/// Runs dewy until a shutdown signal.
pub(crate) async fn run(s: Settings) -> Result<()> {
    std::env::set_current_dir(&s.workdir)
        .with_context(|| format!("cannot enter the working directory `{}`", s.workdir.display()))?;
    let _lock = lock_app_folder(&s.workdir)?;
    if s.core.interval < Duration::from_secs(1) {
        tracing::warn!(interval = ?s.core.interval, "An interval under one second polls the registry constantly and costs CPU; 10s or more is usual (the admin API's webhook deploys at once)");
    }
    let open = dewy_registry::OpenOptions {
        slot: s.slot.clone(),
        calver: s.calver.clone(),
        github: dewy_registry::GithubEnv {
            // GH_TOKEN wins over GITHUB_TOKEN, as in Dewy.
            token: var("GH_TOKEN").or_else(|| var("GITHUB_TOKEN")),
            // GITHUB_ENDPOINT is Dewy's name for it.
            api_url: var("GITHUB_API_URL").or_else(|| var("GITHUB_ENDPOINT")),
            artifact: var("GITHUB_ARTIFACT"),
            app_id: var("GITHUB_APP_ID"),
            app_installation_id: var("GITHUB_APP_INSTALLATION_ID"),
            app_private_key: var("GITHUB_APP_PRIVATE_KEY"),
            app_private_key_path: var("GITHUB_APP_PRIVATE_KEY_PATH"),
        },
        cloud: cloud_options(),
        grpc_token: var("DEWY_GRPC_TOKEN"),
        ..Default::default()
    };
    let registry = dewy_registry::open(&s.registry, &open)
        .map_err(usage)
        .context("cannot open the registry")?;

    let shared_cache = !s.cache.is_empty() || var("DEWY_CACHEDIR").is_some();
    let (cache, registry) = open_cache(&s, registry, &open)
        .map_err(|e| usage(e.into_boxed_dyn_error()))
        .context("cannot open the cache")?;

    let host = hostname();
    let notify = open_notify(&s.notifier, &s.workdir, &host)?;

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

    let mut config = s.core.clone();
    config.hook_env = env;
    config.hostname = s.host_id.clone().unwrap_or(host);
    if config.rollout.is_some() && !shared_cache {
        tracing::warn!("--rollout without a shared --cache: only this host takes part in the rollout");
    }
    if shared_cache {
        // A cache outside the app folder may be shared by several apps:
        // each records its own `current` (Dewy's single key made two apps
        // redeploy each other forever).
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(s.workdir.as_os_str().as_encoded_bytes()));
        config.current_key =
            dewy_cache::Key::new(format!("current-{}", &digest[..16])).context("per-app current key")?;
        adopt_dewy_current(cache.as_ref(), &config.current_key, &s.workdir).await;
    }
    if let (dewy_starter::Readiness::Http { path, .. }, Some(spec)) = (&s.readiness, s.ports.first()) {
        // Where a client reaches the app's first port from this host.
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
        let check = |duration, interval| {
            addr.map(|addr| dewy_core::Soak {
                addr,
                path: path.clone(),
                duration,
                interval,
            })
        };
        config.port_health = check(Duration::from_secs(10), Duration::from_millis(100));
        if !s.health_soak.is_zero() {
            config.soak = check(s.health_soak, s.health_interval);
            if config.soak.is_none() {
                tracing::warn!("--health-soak needs a TCP port first in --port; the soak is off");
            }
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
        registry: dewy_registry::SafeUrl(&s.registry).to_string(),
        sizes: std::sync::Mutex::default(),
        fleet: std::sync::Mutex::default(),
    });
    crate::admin::serve(admin, s.admin_port, admin_rx).await?;
    let otlp = match &s.otlp {
        Some(target) => Some(crate::otlp::start(target, s.otlp_interval, deployer.clone()).await),
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
    let _ = std::fs::remove_file(crate::client::socket_path(&s.workdir));
    if let Some(otlp) = otlp {
        otlp.stop().await;
    }
    let _ = runner.await;
    Ok(())
}
