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
    let workdir = match &args.workdir {
        Some(w) => std::path::PathBuf::from(w),
        None => std::env::current_dir().context("cannot read the current directory")?,
    };
    Ok(Settings {
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
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // One ERROR line per failure; the same failure again at DEBUG, and at
    // ERROR every 10 minutes.
    let mut failing: Option<(String, std::time::Instant, u64)> = None;
    loop {
        match deployer.tick().await {
            Ok(outcome) => {
                if let Some((_, _, count)) = failing.take() {
                    tracing::info!(failed_ticks = count, "Dewy run recovered");
                }
                tracing::debug!(?outcome, "Check done");
            }
            Err(err) => {
                let text = chain(&err);
                match &mut failing {
                    Some((last, since, count)) if *last == text && since.elapsed() < Duration::from_secs(600) => {
                        *count += 1;
                        tracing::debug!(error = %text, count = *count, "Dewy run failure");
                    }
                    _ => {
                        let count = failing.as_ref().map_or(1, |(_, _, c)| c + 1);
                        tracing::error!(error = %text, count, "Dewy run failure");
                        failing = Some((text.clone(), std::time::Instant::now(), count));
                    }
                }
                notify.send_error(text);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(s.interval) => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(
        replicas = deployer.replicas().len(),
        "Shutting down; the replicas keep running for the next dewy to adopt"
    );
    notify.send("Stop receiving by `SIGTERM` signal");
    notify.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// An error and its causes on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `dewy container list`: the app's replicas as the runtime sees them.
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
            println!("{:<66} {:<8} {:<14} DIGEST", "CONTAINER", "STATE", "VERSION");
            for c in list {
                println!(
                    "{:<66} {:<8} {:<14} {}",
                    c.id,
                    if c.running { "running" } else { "stopped" },
                    c.version,
                    c.digest
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
