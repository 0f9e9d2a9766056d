//! `dewy rollout` and `dewy fleet`: the fleet's shared records, read and
//! changed straight in the cache, from any host (no running dewy needed).

use std::process::ExitCode;

use dewy_core::rollout::{self, Command, Record};

/// The cache of `--cache` (or as the daemon finds it), on a small runtime.
fn with_cache<T>(
    args: &crate::cli::SharedCacheArgs,
    f: impl AsyncFnOnce(&dyn dewy_cache::Cache) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let root = crate::commands::root_from(args.workdir.as_deref());
    let url = crate::commands::cache_url_for(&root, args.cache.as_deref());
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let cache = crate::run::open_cache_url(&url, &root, &crate::run::cloud_options())?.cache;
        f(cache.as_ref()).await
    })
}

fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(1)
}

/// Who runs a command, for the record's reason: `user@host`.
fn operator() -> String {
    format!(
        "{}@{}",
        crate::run::var("USER").unwrap_or_else(|| "operator".into()),
        crate::run::hostname()
    )
}

/// `dewy rollout status|pause|resume|abort [--release TAG]`.
pub(crate) fn rollout(args: &crate::cli::RolloutArgs) -> ExitCode {
    let result = with_cache(&args.shared, async |cache| {
        let records = rollout::list(cache).await?;
        let chosen = match &args.release {
            Some(tag) => records.into_iter().find(|r| &r.release == tag),
            None => records.into_iter().next(),
        };
        let Some(record) = chosen else {
            anyhow::bail!(
                "no rollout record{} in the cache (is `--cache` the fleet's, and `--rollout` set on the hosts?)",
                args.release
                    .as_deref()
                    .map(|t| format!(" for `{t}`"))
                    .unwrap_or_default()
            );
        };
        let command = match args.action.as_str() {
            "pause" => Command::Pause,
            "resume" => Command::Resume,
            "abort" => Command::Abort,
            _ => return Ok(record),
        };
        let artifact = dewy_cache::Key::new(record.artifact.clone())?;
        Ok(rollout::control(cache, &artifact, command, &operator()).await?)
    });
    match result {
        Ok(record) if args.shared.json => {
            println!("{}", serde_json::to_string_pretty(&record).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(record) => {
            print_rollout(&record);
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err),
    }
}

fn print_rollout(r: &Record) {
    println!("release   {} ({})", r.release, r.artifact);
    println!(
        "state     {}{}",
        r.state.as_str(),
        r.reason.as_deref().map(|x| format!(": {x}")).unwrap_or_default()
    );
    println!("plan      {}", r.plan);
    println!("wave      {}   failures {}", r.wave, r.failures);
    println!("started   {} by {}", r.created_at, r.created_by);
    println!();
    println!("{:<24} {:<5} {:<10} {:<26} ERROR", "HOST", "WAVE", "PHASE", "SINCE");
    for (host, slot) in &r.hosts {
        println!(
            "{:<24} {:<5} {:<10} {:<26} {}",
            host,
            slot.wave,
            slot.phase.as_str(),
            slot.since.to_string(),
            slot.error.as_deref().unwrap_or("")
        );
    }
}

/// `dewy fleet`: every host's heartbeat, live or stale by the storage's
/// clock.
pub(crate) fn fleet(args: &crate::cli::FleetArgs) -> ExitCode {
    let result = with_cache(&args.shared, async |cache| {
        Ok(dewy_core::fleet_of(cache, jiff::Timestamp::now()).await?)
    });
    let hosts = match result {
        Ok(h) => h,
        Err(err) => return fail(&err),
    };
    if args.shared.json {
        println!("{}", serde_json::Value::Array(hosts));
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<24} {:<6} {:<14} {:<8} {:<16} {:<26} ",
        "HOST", "LIVE", "VERSION", "RUNNING", "LAST OUTCOME", "LAST CHECK"
    );
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    for h in &hosts {
        println!(
            "{:<24} {:<6} {:<14} {:<8} {:<16} {:<26}",
            text(&h["host"]),
            if h["stale"] == true { "stale" } else { "live" },
            text(&h["version"]),
            if h["running"] == true { "yes" } else { "no" },
            text(&h["last_outcome"]),
            text(&h["last_check"]),
        );
    }
    ExitCode::SUCCESS
}
