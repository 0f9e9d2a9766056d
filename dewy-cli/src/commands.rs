//! The one-shot commands: `dewy releases | status | rollback | pin | unpin
//! | clear-bad`. Each goes through the running dewy when there is one, else
//! works on the app folder (and cache) directly.

fn root_of(args: &crate::cli::ReleasesArgs) -> std::path::PathBuf {
    root_from(args.workdir.as_deref())
}

pub(crate) fn root_from(workdir: Option<&str>) -> std::path::PathBuf {
    let root = std::path::PathBuf::from(workdir.unwrap_or("."));
    std::path::absolute(&root).unwrap_or(root)
}

/// `dewy rollback` and `dewy pin`: through the running dewy (which does it
/// between ticks and restarts the app), else on the folder directly.
pub(crate) fn rollback(workdir: Option<&str>, to: Option<&str>) -> std::process::ExitCode {
    let root = root_from(workdir);
    let running = running_status(&root);
    if let Some(code) = refuse_in_container_mode(running.as_ref(), &root) {
        return code;
    }
    let (path, version) = match crate::releases::rollback_target(&root, to) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("error: {why}");
            return std::process::ExitCode::from(1);
        }
    };
    let query = to.map(|v| format!("?to={}", percent_encode(v))).unwrap_or_default();
    // Say at once what happens to a deploy in flight.
    if let Some(tag) = running.as_ref().and_then(|s| s["deploying"].as_str()) {
        eprintln!("cancelling the deploy of {tag} (it is undone), then rolling back to {version}");
    }
    match crate::client::request(&root, "POST", &format!("/api/rollback{query}")) {
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

/// The running dewy's `/api/status`, when one answers in `root`.
fn running_status(root: &std::path::Path) -> Option<serde_json::Value> {
    let Ok((200, body)) = crate::client::request(root, "GET", "/api/status") else {
        return None;
    };
    serde_json::from_str(&body).ok()
}

/// `dewy rollback`, `pin` and `unpin` against a running `dewy container`:
/// it has no releases on disk to go back to, so say so rather than
/// complain about the folder.
fn refuse_in_container_mode(
    running: Option<&serde_json::Value>,
    root: &std::path::Path,
) -> Option<std::process::ExitCode> {
    (running?["command"] == 2).then(|| {
        eprintln!(
            "error: rollback, pin and unpin do not apply to container mode (the dewy in {} runs `dewy container`): its replicas run the newest image not recorded as bad; to go back, publish the previous image under a newer tag. `dewy clear-bad` and `dewy container list` work there.",
            root.display()
        );
        std::process::ExitCode::from(1)
    })
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
    match crate::client::request(&root, "POST", "/api/clear-bad") {
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
    let cache_url = cache_url_for(&root, args.cache.as_deref());
    let local_dir = crate::run::local_cache_dir(&cache_url, &root);
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
        let cache = crate::run::open_cache_url(&cache_url, &root, &crate::run::cloud_options())?.cache;
        anyhow::Ok(dewy_cache::delete_bad_records(cache.as_ref()).await?)
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

/// The daemon's cache: the flag, else as `dewy server` would find it
/// (`DEWY_CACHE`, then `cache` in the folder's dewy.toml).
pub(crate) fn cache_url_for(root: &std::path::Path, flag: Option<&str>) -> String {
    flag.map(str::to_owned)
        .or_else(|| crate::run::var("DEWY_CACHE"))
        .or_else(|| {
            use figment::providers::Format;
            figment::Figment::from(figment::providers::Toml::file(root.join("dewy.toml")))
                .extract_inner::<String>("cache")
                .ok()
        })
        .unwrap_or_default()
}

/// `dewy unpin`.
pub(crate) fn unpin(workdir: Option<&str>) -> std::process::ExitCode {
    let root = root_from(workdir);
    if let Some(code) = refuse_in_container_mode(running_status(&root).as_ref(), &root) {
        return code;
    }
    if let Ok((200, _)) = crate::client::request(&root, "POST", "/api/unpin") {
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
    let rows = crate::releases::release_rows(&root);
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
    let body = match crate::client::request(&root, "GET", "/api/status") {
        Ok((_, body)) => body,
        Err(err) => {
            eprintln!(
                "error: no running dewy answers on {} ({err})",
                crate::client::socket_path(&root).display()
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
        "cache_degraded",
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

/// `dewy completions SHELL`: the completion script on stdout.
pub(crate) fn completions(shell: clap_complete::Shell) -> std::process::ExitCode {
    use clap::CommandFactory;
    let mut cmd = crate::Cli::command();
    clap_complete::generate(shell, &mut cmd, "dewy", &mut std::io::stdout());
    std::process::ExitCode::SUCCESS
}

/// `dewy man`: the man page (roff) on stdout.
pub(crate) fn man() -> std::process::ExitCode {
    use clap::CommandFactory;
    match clap_mangen::Man::new(crate::Cli::command()).render(&mut std::io::stdout()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: cannot write the man page: {err}");
            std::process::ExitCode::from(1)
        }
    }
}
