//! The `dewy` command: flags, `DEWY_*` environment and `dewy.toml` merged
//! into validated configuration, logging, the tokio runtime, the rustls
//! crypto provider, signals and exit codes. Nothing else in dewy reads
//! flags, environment or config files.
//!
//! Exit codes: 0 after a clean shutdown (SIGTERM, SIGINT, SIGQUIT) or for
//! `--help`/`--version`; 2 for a usage or configuration error (the message
//! names the flag or key, the value and what is expected); 1 when startup
//! fails (a port cannot be bound, the cache folder cannot be used).
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod admin;
mod cli;
mod client;
mod commands;
mod config;
mod container;
mod fleet;
mod logging;
mod metrics;
mod otlp;
mod page;
mod progress;
mod releases;
mod run;

use std::process::ExitCode;

pub use cli::Cli;
pub use config::{ConfigError, Key, Settings, keys};

/// Parses the command line, then runs.
pub fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Some(cli::Command::Releases(args)) = &cli.command {
        return commands::releases(args);
    }
    match &cli.command {
        Some(cli::Command::Status(args)) => return commands::status(args),
        Some(cli::Command::Rollback(args)) => return commands::rollback(args.workdir.as_deref(), args.to.as_deref()),
        Some(cli::Command::Pin(args)) => return commands::rollback(args.workdir.as_deref(), Some(&args.release)),
        Some(cli::Command::Unpin(args)) => return commands::unpin(args.workdir.as_deref()),
        Some(cli::Command::ClearBad(args)) => return commands::clear_bad(args),
        Some(cli::Command::Rollout(args)) => return fleet::rollout(args),
        Some(cli::Command::Fleet(args)) => return fleet::fleet(args),
        Some(cli::Command::Completions(args)) => return commands::completions(args.shell),
        Some(cli::Command::Man) => return commands::man(),
        Some(cli::Command::Container(args)) => return container::main(args),
        _ => {}
    }
    let settings = match config::load(&cli) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    logging::init(&settings.log_level, settings.log_format);
    block_on(run::run(settings))
}

/// Runs a daemon's future on a multi-threaded runtime (with the one rustls
/// provider installed) and turns its result into the exit code:
/// configuration errors 2 (as a bad flag), other failures 1.
pub(crate) fn block_on(daemon: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(daemon) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  Caused by: {cause}");
            }
            if err.chain().any(|c| c.is::<run::Usage>()) {
                return ExitCode::from(2);
            }
            ExitCode::from(1)
        }
    }
}
