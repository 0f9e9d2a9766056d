//! Flags, with the names, short forms and meanings of the Go original.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

/// dewy keeps an application deployed: it polls a registry, downloads and
/// extracts new releases, switches `current` atomically, and restarts the
/// application without dropping a connection.
#[derive(Debug, Parser)]
#[command(name = "dewy", disable_version_flag = true, arg_required_else_help = true)]
pub struct Cli {
    /// Print the version and exit.
    #[arg(short = 'v', long = "version", global = true)]
    pub version: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an application and keep it on the newest release, restarting it
    /// gracefully on each deploy: `dewy server [FLAGS] -- COMMAND [ARGS]`.
    Server(ServerArgs),
    /// Keep files on the newest release (no process management).
    Assets(CommonArgs),
    /// Keep container replicas of the newest image of an `img://` registry
    /// running behind dewy's TCP proxy, with rolling updates: `dewy
    /// container --registry img://HOST/REPO -p 8080 [-- DOCKER-RUN-ARGS]`.
    Container(ContainerArgs),
    /// List the releases on disk: which is current, their versions and
    /// when they were deployed (from the deployment history).
    Releases(ReleasesArgs),
    /// Ask the running dewy of an app folder what it is doing.
    Status(ReleasesArgs),
    /// Switch `current` back to the previous release (or `--to VERSION`)
    /// still on disk, restart the app if dewy runs, and pin the folder so no
    /// deploy replaces it until `dewy unpin`.
    Rollback(RollbackArgs),
    /// Hold the app folder at VERSION (a release on disk): `dewy rollback
    /// --to VERSION`.
    Pin(PinArgs),
    /// Release the pin: deploys resume at the next check.
    Unpin(ReleasesArgs),
    /// Forget the releases recorded as bad (failed to start or failed their
    /// health checks), so they are tried again.
    ClearBad(ClearBadArgs),
    /// A staged rollout (`--rollout`) across the fleet sharing the cache:
    /// `status`, `pause`, `resume` or `abort` (hosts that took the release
    /// go back). Works from any host, with or without a running dewy.
    Rollout(RolloutArgs),
    /// The hosts sharing the cache (from their heartbeats): version,
    /// health, last check, whether they are live.
    Fleet(FleetArgs),
    /// Print the shell completion script for SHELL (bash, zsh, fish,
    /// elvish, powershell): `dewy completions bash >
    /// /etc/bash_completion.d/dewy`.
    Completions(CompletionsArgs),
    /// Print the man page (roff): `dewy man | man -l -`.
    Man,
}

/// `dewy container`.
#[derive(Debug, Args)]
pub struct ContainerArgs {
    /// `list`: show the replicas of the running dewy (or of the runtime).
    #[arg(value_parser = ["list"], value_name = "list")]
    pub list: Option<String>,

    /// Registry URL: `img://HOST[:PORT]/REPO` (`?pre-release=true`,
    /// `calver=`).
    #[arg(long, value_name = "URL")]
    pub registry: Option<String>,

    /// `PROXY[:CONTAINER]`: dewy listens on PROXY and forwards to the
    /// replicas' CONTAINER port (default: the image's one EXPOSEd port).
    /// Repeatable.
    #[arg(short = 'p', long = "port", value_name = "PROXY[:CONTAINER]")]
    pub port: Vec<String>,

    /// Replicas to keep running. Default 1.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub replicas: usize,

    /// The app name (`dewy.app` label, container names). Default: the
    /// repository's last segment.
    #[arg(short = 'n', long, value_name = "NAME")]
    pub name: Option<String>,

    /// `docker` or `podman`. Default docker.
    #[arg(long, value_name = "RUNTIME", default_value = "docker")]
    pub runtime: String,

    /// Each new replica must answer 200–399 to `GET PATH` on its own port
    /// before it gets traffic (without it: a TCP connect).
    #[arg(long = "health-path", value_name = "PATH")]
    pub health_path: Option<String>,

    /// How long a new replica gets to become healthy. Default 30s.
    #[arg(long = "health-timeout", value_name = "DURATION", default_value = "30s")]
    pub health_timeout: String,

    /// How long a retiring replica's open connections may take to finish
    /// before it is stopped. Default 30s.
    #[arg(long = "drain-time", value_name = "DURATION", default_value = "30s")]
    pub drain_time: String,

    /// How long a replica gets to exit after SIGTERM before SIGKILL.
    /// Default 10s.
    #[arg(long = "stop-timeout", value_name = "DURATION", default_value = "10s")]
    pub stop_timeout: String,

    /// An argument after the image in `run` (the container's command).
    /// Repeatable.
    #[arg(long = "cmd", value_name = "ARG", allow_hyphen_values = true)]
    pub cmd: Vec<String>,

    /// Close a proxied connection after this many seconds (or a duration)
    /// without a byte either way; 0 disables. Default 300 (as Dewy).
    #[arg(long = "proxy-idle-timeout", value_name = "SECONDS", default_value = "300")]
    pub proxy_idle_timeout: String,

    /// Images dewy pulled that are kept after each rollout (the most
    /// recently pulled); older ones are removed with `rmi` (never forced:
    /// images a container uses, or that carry other names, stay). 0 keeps
    /// all. Default 7 (as Dewy).
    #[arg(long = "keep-images", value_name = "N", default_value_t = 7)]
    pub keep_images: usize,

    /// Shell command run before each rollout (after the pull).
    #[arg(long = "before-deploy-hook", value_name = "COMMAND")]
    pub before_deploy_hook: Option<String>,

    /// Shell command run after each rollout.
    #[arg(long = "after-deploy-hook", value_name = "COMMAND")]
    pub after_deploy_hook: Option<String>,

    /// Pass this secret variable to the hooks too (see `dewy server`).
    /// Repeatable.
    #[arg(long = "pass-env", value_name = "NAME")]
    pub pass_env: Vec<String>,

    /// Address the proxies listen on. Default 0.0.0.0 (as Dewy).
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0")]
    pub listen: String,

    /// Seconds between checks (or a duration). Default 10.
    #[arg(short = 'i', long, value_name = "SECONDS", default_value = "10")]
    pub interval: String,

    /// Notifier URL (`slack://CHANNEL`, `mail://…`).
    #[arg(long, value_name = "URL", default_value = "")]
    pub notifier: String,

    /// debug, info, warn or error.
    #[arg(short = 'l', long = "log-level", value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// text or json.
    #[arg(short = 'f', long = "log-format", value_name = "FORMAT", default_value = "text")]
    pub log_format: String,

    /// The read-only status API (`/api/status`, `/api/containers`,
    /// `/metrics`) on 127.0.0.1:PORT. Default: Dewy's 17539, or the first
    /// free port up to 17548 (it always listens on `.dewy/admin.sock` in
    /// the workdir too, owner only).
    #[arg(long = "admin-port", value_name = "PORT")]
    pub admin_port: Option<u16>,

    /// Bearer token that callers on the admin port must send for the
    /// actions (`POST /api/check`, `/api/restart`, `/api/clear-bad`);
    /// without it they work on `.dewy/admin.sock` only.
    #[arg(long = "admin-token", value_name = "TOKEN")]
    pub admin_token: Option<String>,

    /// The folder for dewy's state (`.dewy/cache`: bad-image records).
    /// Default: the current directory.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,

    /// Accepted for Dewy's command lines and refused with a reason: OCI
    /// tags cannot carry the build metadata (`+SLOT`) slots select on.
    #[arg(short = 's', long, value_name = "SLOT")]
    pub slot: Option<String>,

    /// CalVer format of the tags, such as `YYYY.0M.0D.MICRO`.
    #[arg(long, value_name = "FORMAT")]
    pub calver: Option<String>,

    /// Dewy's telemetry switch, accepted as is: container mode always
    /// serves `/metrics` with its status API.
    #[arg(long = "telemetry")]
    pub telemetry: bool,

    /// Push the metrics of `/metrics` to an OpenTelemetry collector:
    /// `HOST:PORT` over OTLP/gRPC (TLS unless `--otlp-insecure`) or an
    /// `http(s)://` URL over OTLP/HTTP.
    #[arg(long = "otlp-endpoint", value_name = "HOST:PORT|URL")]
    pub otlp_endpoint: Option<String>,

    /// Plaintext gRPC to a `HOST:PORT` `--otlp-endpoint` (no TLS).
    #[arg(long = "otlp-insecure")]
    pub otlp_insecure: bool,

    /// How often metrics are pushed with `--otlp-endpoint`. Default 60s.
    #[arg(long = "otlp-interval", value_name = "DURATION", default_value = "60s")]
    pub otlp_interval: String,

    /// Config file (TOML; keys are the flags' long names with `_`, and
    /// `run_args` for the arguments after `--`). Default: `dewy.toml` in
    /// the working directory when it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<String>,

    /// Extra `run` arguments for the replicas (after `--`).
    #[arg(last = true, value_name = "RUN-ARGS", id = "run_args")]
    pub extra: Vec<String>,
}

/// `dewy completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// `dewy clear-bad`.
#[derive(Debug, Args)]
pub struct ClearBadArgs {
    /// The app folder. Default: the current directory.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// The cache the daemon uses (`--cache` of `dewy server`/`assets`),
    /// when no dewy runs in the folder: `s3://…` or `gs://…` clears the
    /// records the whole fleet shares. Default: `DEWY_CACHE`, else `cache`
    /// in the folder's dewy.toml, else the local file cache.
    #[arg(long = "cache", value_name = "URL")]
    pub cache: Option<String>,
}

/// `dewy rollout`.
#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// `status`, `pause`, `resume` or `abort`.
    #[arg(value_parser = ["status", "pause", "resume", "abort"], value_name = "ACTION")]
    pub action: String,
    /// The release (its tag). Default: the newest rollout.
    #[arg(long = "release", value_name = "TAG")]
    pub release: Option<String>,
    #[command(flatten)]
    pub shared: SharedCacheArgs,
}

/// `dewy fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub shared: SharedCacheArgs,
}

/// Where `dewy rollout` and `dewy fleet` find the fleet's cache.
#[derive(Debug, Args)]
pub struct SharedCacheArgs {
    /// The app folder (for its dewy.toml). Default: the current directory.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// The cache the fleet shares (`--cache` of `dewy server`/`assets`).
    /// Default: `DEWY_CACHE`, else `cache` in the folder's dewy.toml.
    #[arg(long = "cache", value_name = "URL")]
    pub cache: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `dewy rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The version to go back to (default: the release before the current one).
    #[arg(long = "to", value_name = "VERSION")]
    pub to: Option<String>,
    /// The app folder. Default: the current directory.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
}

/// `dewy pin`.
#[derive(Debug, Args)]
pub struct PinArgs {
    /// The version to hold.
    #[arg(value_name = "VERSION")]
    pub release: String,
    /// The app folder. Default: the current directory.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
}

/// `dewy releases` and `dewy status`.
#[derive(Debug, Args)]
pub struct ReleasesArgs {
    /// The app folder. Default: the current directory.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `dewy server`. Serialized (set flags only) as the top layer of the
/// configuration; the field names are the keys of `dewy.toml`.
#[derive(Debug, Args, Serialize)]
pub struct ServerArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,

    /// Ports to hold for the application: `8000`, `8000,8001`,
    /// `8000-8005`, `127.0.0.1:8000`, `[::1]:8000`, or a unix socket path.
    /// Repeatable.
    #[arg(short = 'p', long = "port", value_name = "PORTS")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub port: Vec<String>,

    /// Readiness by HTTP: after a start or restart, the new generation must
    /// answer 2xx to `GET PATH` (on a private socket it inherits last)
    /// before the previous one is stopped.
    #[arg(long = "health-path", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,

    /// Readiness by notification: the app sends `READY=1` to
    /// `NOTIFY_SOCKET`, as under systemd's `Type=notify`.
    #[arg(long = "ready-notify")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ready_notify: bool,

    /// How long a new generation gets to become ready. Default 30s.
    #[arg(long = "health-timeout", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_timeout: Option<String>,

    /// With `--health-path`: after each restart the new release must keep
    /// answering 2xx on the app's first port for this long, or dewy rolls
    /// back to the previous release. Default 0 (off).
    #[arg(long = "health-soak", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_soak: Option<String>,

    /// Time between two health checks during the soak. Default 500ms.
    #[arg(long = "health-interval", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<String>,

    /// How long a generation gets to exit after SIGTERM before SIGKILL.
    /// Default 30s.
    #[arg(long = "stop-timeout", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<String>,

    /// The application's command and arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

/// Flags shared by `server` and `assets`. None has a clap default: defaults
/// live in one place (the config loader) so that `DEWY_*` variables and
/// `dewy.toml` are not overridden by unset flags.
#[derive(Debug, Args, Serialize, Default)]
pub struct CommonArgs {
    /// Registry URL: `file:///srv/releases` (`?pre-release=true&artifact=NAME`).
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,

    /// Cache URL: empty for the file cache in `$DEWY_CACHEDIR` or
    /// `.dewy/cache`, or `file:///path`.
    #[arg(short = 'c', long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,

    /// Notifier URL: `slack://CHANNEL`, `mail://HOST:PORT/TO`, `smtp://...`.
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notifier: Option<String>,

    /// Seconds between checks (or a duration such as `30s`). Default 10.
    #[arg(short = 'i', long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,

    /// debug, info, warn or error. Default info.
    #[arg(short = 'l', long = "log-level", value_name = "LEVEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,

    /// text or json. Default text.
    #[arg(short = 'f', long = "log-format", value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,

    /// Shell command run before each deploy (`sh -c`).
    #[arg(long = "before-deploy-hook", value_name = "COMMAND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before_deploy_hook: Option<String>,

    /// Shell command run after each deploy's switch of `current`.
    #[arg(long = "after-deploy-hook", value_name = "COMMAND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_deploy_hook: Option<String>,

    /// Blue/green slot: deploy only releases whose build metadata is SLOT.
    #[arg(short = 's', long, value_name = "SLOT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,

    /// CalVer format of the tags, such as `YYYY.0M.0D.MICRO`.
    #[arg(long, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calver: Option<String>,

    /// Releases kept on disk (and artifacts kept in the cache). Default 7.
    #[arg(long = "keep-releases", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_releases: Option<String>,

    /// A missing artifact younger than this is not an error. Default 30m.
    #[arg(long = "grace-period", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<String>,

    /// Hooks are killed after this. Default 5m.
    #[arg(long = "hook-timeout", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_timeout: Option<String>,

    /// Abort the deploy when the before hook fails (Dewy continues).
    #[arg(long = "abort-on-hook-failure")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub abort_on_hook_failure: bool,

    /// The app folder holding `releases/` and `current`. Default: the
    /// current directory.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,

    /// Pass this secret variable (such as GITHUB_TOKEN) to the app and hooks
    /// too; dewy's own secrets are removed from their environment otherwise.
    /// Repeatable.
    #[arg(long = "pass-env", value_name = "NAME")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pass_env: Vec<String>,

    /// Trust this minisign public key: its base64 line (`RWQ…`) or
    /// `@PATH` to its `.pub` file. Every artifact must then come with
    /// `<artifact>.minisig` signed by one of the keys given, or it is
    /// refused and recorded as bad. Repeatable (key rotation).
    #[arg(long = "verify-key", value_name = "KEY")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verify_key: Vec<String>,

    /// Refuse to start without a `--verify-key` (guards against a unit
    /// file or dewy.toml that lost its key).
    #[arg(long = "require-signature")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub require_signature: bool,

    /// Stage each release across the hosts sharing the cache (`s3://`,
    /// `gs://`, or a folder on a shared mount): `canary=1,bake=5m,
    /// max-parallel=25%,max-failures=1,auto-revert,lease=1m` (options left
    /// out keep these defaults; auto-revert is off unless named). Off by
    /// default: every host deploys as soon as it sees a release.
    #[arg(long = "rollout", value_name = "PLAN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,

    /// This host's name in the fleet (heartbeats, rollout slots). Default:
    /// the hostname.
    #[arg(long = "host-id", value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,

    /// assets: a shell command run after each switch (with the hooks'
    /// variables); if it fails, the previous release is put back and this
    /// one is recorded as bad.
    #[arg(long = "health-command", value_name = "COMMAND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_command: Option<String>,

    /// Also serve the admin API on 127.0.0.1:PORT (it always listens on
    /// `.dewy/admin.sock` in the app folder, owner only).
    #[arg(long = "admin-port", value_name = "PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_port: Option<String>,

    /// Push the metrics of `/metrics` to an OpenTelemetry collector:
    /// `HOST:PORT` over OTLP/gRPC as Dewy does (`localhost:4317`, TLS with
    /// the system's roots unless `--otlp-insecure`), or an `http(s)://` URL
    /// over OTLP/HTTP (`http://collector:4318/v1/metrics`). Turns
    /// `--telemetry` on. Off by default.
    #[arg(long = "otlp-endpoint", value_name = "HOST:PORT|URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,

    /// Plaintext gRPC to a `HOST:PORT` `--otlp-endpoint` (no TLS).
    #[arg(long = "otlp-insecure")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub otlp_insecure: bool,

    /// Dewy's telemetry switch: also serve the admin API with `/metrics` on
    /// 127.0.0.1:17539 (the first free port up to 17548), or on
    /// `--admin-port`. The unix socket always serves it.
    #[arg(long = "telemetry")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub telemetry: bool,

    /// How often metrics are pushed with `--otlp-endpoint`. Default 60s.
    #[arg(long = "otlp-interval", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_interval: Option<String>,

    /// Bearer token that callers on the admin port must send to trigger a
    /// check or a restart.
    #[arg(long = "admin-token", value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,

    /// Secret of the GitHub webhook (`POST /webhook/github`, checked with
    /// `X-Hub-Signature-256`); a `release` event triggers a check at once.
    #[arg(long = "webhook-secret", value_name = "SECRET")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,

    /// Config file (TOML). Default: `dewy.toml` in the working directory
    /// when it exists.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<String>,
}

/// Parses the command line; `Err` carries the exit code for help, version
/// and usage errors (already printed).
pub(crate) fn parse() -> Result<Cli, ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    // `dewy help` behaves like `dewy --help`.
    let args: Vec<String> = match args.get(1).map(String::as_str) {
        Some("help") if args.len() == 2 => vec![args[0].clone(), "--help".into()],
        _ => args,
    };
    let asks_version = args.iter().skip(1).any(|a| a == "-v" || a == "--version");
    let json = args
        .windows(2)
        .any(|w| matches!(w[0].as_str(), "-f" | "--log-format") && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json" || a == "-fjson");
    if asks_version && json {
        // Dewy's JSON form: one log record on stderr.
        eprintln!(
            "{}",
            serde_json::json!({
                "time": jiff::Timestamp::now().to_string(),
                "level": "INFO",
                "msg": "Dewy version",
                "version": env!("CARGO_PKG_VERSION"),
                "commit": env!("DEWY_COMMIT"),
                "date": env!("DEWY_DATE"),
            })
        );
        return Err(ExitCode::SUCCESS);
    }
    match Cli::try_parse_from(args) {
        Ok(cli) if cli.version => {
            println!("{}", version_line());
            Err(ExitCode::SUCCESS)
        }
        Ok(cli) if cli.command.is_none() => {
            eprintln!("error: a command is required: server or assets (see `dewy --help`)");
            Err(ExitCode::from(2))
        }
        Ok(cli) => Ok(cli),
        Err(e) => {
            let _ = e.print();
            Err(ExitCode::from(if e.use_stderr() { 2 } else { 0 }))
        }
    }
}

/// `dewy version: 0.1.0 [abc1234, 2026-11-29T06:00:00Z]`, as Dewy prints it.
pub(crate) fn version_line() -> String {
    format!(
        "dewy version: {} [{}, {}]",
        env!("CARGO_PKG_VERSION"),
        env!("DEWY_COMMIT"),
        env!("DEWY_DATE")
    )
}
