//! Health checks after a deploy: the soak after a restart (server mode) and
//! the health command (assets mode).

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use crate::config::Soak;

/// `Ok` when `GET path` on `addr` answers 2xx; otherwise why not.
async fn health_get(addr: std::net::SocketAddr, path: &str) -> Result<(), String> {
    match dewy_starter::http_status(addr, path, Duration::from_secs(5)).await {
        Ok(code) if (200..300).contains(&code) => Ok(()),
        Ok(code) => Err(format!("GET {path} answered {code}")),
        Err(e) => Err(format!("GET {path} failed: {e}")),
    }
}

/// Watches the new release's health for the soak period; `Err` names the
/// first failed check.
pub(crate) async fn soak(soak: &Soak) -> Result<(), String> {
    let until = tokio::time::Instant::now() + soak.duration;
    tracing::info!(duration = ?soak.duration, path = %soak.path, "Watching health after restart");
    while tokio::time::Instant::now() < until {
        health_get(soak.addr, &soak.path).await?;
        tokio::time::sleep(soak.interval).await;
    }
    Ok(())
}

/// The health path through the app's port after a switch: `Ok` on the
/// first 2xx; `Err` on the first other HTTP answer (the previous generation
/// no longer accepts, so the new one gave it), or when nothing answered
/// within `check.duration`.
pub(crate) async fn through_port(check: &Soak) -> Result<(), String> {
    let until = tokio::time::Instant::now() + check.duration;
    loop {
        match dewy_starter::http_status(check.addr, &check.path, Duration::from_secs(5)).await {
            Ok(code) if (200..300).contains(&code) => return Ok(()),
            Ok(code) => return Err(format!("GET {} answered {code} through the app's port", check.path)),
            Err(e) if tokio::time::Instant::now() >= until => {
                return Err(format!("GET {} failed through the app's port: {e}", check.path));
            }
            Err(_) => tokio::time::sleep(check.interval).await,
        }
    }
}

/// Runs the assets-mode health command; `Err` says how it failed.
pub(crate) async fn command(
    cmd: &str,
    root: &Path,
    env: &[(OsString, OsString)],
    timeout: Duration,
) -> Result<(), String> {
    match crate::hooks::run(cmd, root, env, timeout).await {
        Ok(o) if o.success() => {
            tracing::info!(command = %cmd, "Health command passed");
            Ok(())
        }
        Ok(o) => Err(format!("health command `{cmd}`: {} {}", o.failure(), o.stderr)
            .trim()
            .to_owned()),
        Err(e) => Err(format!("health command `{cmd}` could not run: {e}")),
    }
}
