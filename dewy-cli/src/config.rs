//! Configuration: flags over `DEWY_*` environment variables over
//! `dewy.toml`, merged with figment, then validated once into [`Settings`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Deserialize;

use crate::cli::{Cli, Command, CommonArgs};

/// The keys of the file and of `DEWY_<KEY>` variables, with their flags.
pub const KEYS: &[(&str, &str)] = &[
    ("registry", "--registry"),
    ("cache", "--cache"),
    ("notifier", "--notifier"),
    ("interval", "--interval"),
    ("port", "--port"),
    ("log_level", "--log-level"),
    ("log_format", "--log-format"),
    ("before_deploy_hook", "--before-deploy-hook"),
    ("after_deploy_hook", "--after-deploy-hook"),
    ("slot", "--slot"),
    ("calver", "--calver"),
    ("keep_releases", "--keep-releases"),
    ("grace_period", "--grace-period"),
    ("hook_timeout", "--hook-timeout"),
    ("abort_on_hook_failure", "--abort-on-hook-failure"),
    ("workdir", "--workdir"),
    ("pass_env", "--pass-env"),
    ("health_command", "--health-command"),
    ("admin_port", "--admin-port"),
    ("admin_token", "--admin-token"),
    ("otlp_endpoint", "--otlp-endpoint"),
    ("otlp_interval", "--otlp-interval"),
    ("webhook_secret", "--webhook-secret"),
    ("health_path", "--health-path"),
    ("ready_notify", "--ready-notify"),
    ("health_timeout", "--health-timeout"),
    ("stop_timeout", "--stop-timeout"),
    ("health_soak", "--health-soak"),
    ("health_interval", "--health-interval"),
    ("command", "COMMAND (after --)"),
];

/// A scalar from a flag (always a string), the environment (parsed by
/// figment) or TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Self::Str(s) => s.clone(),
            Self::Int(i) => i.to_string(),
            Self::Float(f) => f.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<Scalar>),
    One(Scalar),
}

impl OneOrMany {
    fn items(&self) -> Vec<String> {
        match self {
            Self::Many(v) => v.iter().map(Scalar::text).collect(),
            Self::One(s) => vec![s.text()],
        }
    }
}

/// The merged, unvalidated values.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    registry: Option<Scalar>,
    cache: Option<Scalar>,
    notifier: Option<Scalar>,
    interval: Option<Scalar>,
    port: Option<OneOrMany>,
    log_level: Option<Scalar>,
    log_format: Option<Scalar>,
    before_deploy_hook: Option<Scalar>,
    after_deploy_hook: Option<Scalar>,
    slot: Option<Scalar>,
    calver: Option<Scalar>,
    keep_releases: Option<Scalar>,
    grace_period: Option<Scalar>,
    hook_timeout: Option<Scalar>,
    abort_on_hook_failure: Option<Scalar>,
    workdir: Option<Scalar>,
    pass_env: Option<OneOrMany>,
    command: Option<OneOrMany>,
    health_path: Option<Scalar>,
    health_soak: Option<Scalar>,
    health_interval: Option<Scalar>,
    admin_port: Option<Scalar>,
    health_command: Option<Scalar>,
    admin_token: Option<Scalar>,
    otlp_endpoint: Option<Scalar>,
    otlp_interval: Option<Scalar>,
    webhook_secret: Option<Scalar>,
    ready_notify: Option<Scalar>,
    health_timeout: Option<Scalar>,
    stop_timeout: Option<Scalar>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `time=... level=INFO msg="..." key=value`.
    Text,
    /// One JSON object per line: `time`, `level`, `msg`, then fields.
    Json,
}

/// `server` or `assets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `dewy server`.
    Server,
    /// `dewy assets`.
    Assets,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The command.
    pub mode: Mode,
    /// Registry URL.
    pub registry: String,
    /// Cache URL (empty: default file cache).
    pub cache: String,
    /// Notifier URL (empty: none).
    pub notifier: String,
    /// Check interval.
    pub interval: Duration,
    /// Port specs (server).
    pub ports: Vec<dewy_starter::ListenSpec>,
    /// Log level filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Before hook.
    pub before_hook: Option<String>,
    /// After hook.
    pub after_hook: Option<String>,
    /// Slot.
    pub slot: Option<String>,
    /// CalVer format.
    pub calver: Option<String>,
    /// Releases kept.
    pub keep_releases: usize,
    /// Grace period.
    pub grace_period: Duration,
    /// Hook timeout.
    pub hook_timeout: Duration,
    /// Abort on before-hook failure.
    pub abort_on_hook_failure: bool,
    /// App folder (absolute).
    pub workdir: PathBuf,
    /// Secret variables passed through anyway.
    pub pass_env: Vec<String>,
    /// The application's command (server).
    pub command: Vec<String>,
    /// When a new generation counts as ready.
    pub readiness: dewy_starter::Readiness,
    /// SIGTERM-to-SIGKILL delay for a generation.
    pub stop_timeout: Duration,
    /// Health soak after each restart (zero: off).
    pub health_soak: Duration,
    /// Time between two soak checks.
    pub health_interval: Duration,
    /// Assets health command.
    pub health_command: Option<String>,
    /// Admin API port on 127.0.0.1.
    pub admin_port: Option<u16>,
    /// Bearer token for mutating admin calls over TCP.
    pub admin_token: Option<String>,
    /// GitHub webhook secret.
    pub webhook_secret: Option<String>,
    /// OTLP/HTTP metrics collector URL.
    pub otlp_endpoint: Option<String>,
    /// How often metrics are pushed over OTLP.
    pub otlp_interval: Duration,
}

/// A configuration value that is wrong: names the flag or key, the value,
/// and what is expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An invalid value.
    #[error("invalid value `{value}` for {flag} (key `{key}`): {expected}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// The file/env key.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is expected.
        expected: String,
    },
    /// A required value is missing.
    #[error("{flag} is not set (or `{key}` in dewy.toml, or DEWY_{}): {expected}", key.to_uppercase())]
    Missing {
        /// The flag.
        flag: &'static str,
        /// The key.
        key: &'static str,
        /// What is expected.
        expected: &'static str,
    },
    /// The config file or the environment could not be read.
    #[error("configuration error: {0}")]
    Source(String),
}

fn flag_of(key: &str) -> &'static str {
    KEYS.iter().find(|(k, _)| *k == key).map_or("?", |(_, f)| f)
}

fn key_static(key: &str) -> &'static str {
    KEYS.iter().find(|(k, _)| *k == key).map_or("?", |(k, _)| k)
}

fn invalid(key: &str, value: impl Into<String>, expected: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag: flag_of(key),
        key: key_static(key),
        value: value.into(),
        expected: expected.into(),
    }
}

/// A duration: plain seconds (`10`) or humantime (`30s`, `5m`, `1h30m`).
fn duration(key: &str, value: &Scalar, allow_zero: bool) -> Result<Duration, ConfigError> {
    let text = value.text();
    let d = match text.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(text.trim())
            .map_err(|_| invalid(key, &text, "a number of seconds or a duration such as 30s, 5m, 1h"))?,
    };
    if d.is_zero() && !allow_zero {
        return Err(invalid(key, &text, "a duration greater than zero"));
    }
    Ok(d)
}

/// A boolean: `true`/`false`/`1`/`0`, absent is false.
fn boolean(key: &str, value: &Option<Scalar>) -> Result<bool, ConfigError> {
    match value {
        Some(Scalar::Bool(b)) => Ok(*b),
        Some(v) => match v.text().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" | "" => Ok(false),
            other => Err(invalid(key, other, "true or false")),
        },
        None => Ok(false),
    }
}

/// An optional duration with a default.
fn duration_or(
    key: &str,
    value: &Option<Scalar>,
    allow_zero: bool,
    default: Duration,
) -> Result<Duration, ConfigError> {
    value.as_ref().map_or(Ok(default), |v| duration(key, v, allow_zero))
}

fn text(v: &Option<Scalar>) -> Option<String> {
    v.as_ref().map(Scalar::text).filter(|s| !s.is_empty())
}

/// Merges the sources and validates.
pub(crate) fn load(cli: &Cli) -> Result<Settings, ConfigError> {
    let mut server_flags: Vec<(&str, String)> = Vec::new();
    let (mode, common, ports, command): (Mode, &CommonArgs, Vec<String>, Vec<String>) = match cli.command.as_ref() {
        Some(Command::Server(s)) => {
            if let Some(p) = &s.health_path {
                server_flags.push(("health_path", p.clone()));
            }
            if s.ready_notify {
                server_flags.push(("ready_notify", "true".into()));
            }
            if let Some(t) = &s.health_timeout {
                server_flags.push(("health_timeout", t.clone()));
            }
            if let Some(t) = &s.stop_timeout {
                server_flags.push(("stop_timeout", t.clone()));
            }
            if let Some(t) = &s.health_soak {
                server_flags.push(("health_soak", t.clone()));
            }
            if let Some(t) = &s.health_interval {
                server_flags.push(("health_interval", t.clone()));
            }
            (Mode::Server, &s.common, s.port.clone(), s.command.clone())
        }
        Some(Command::Assets(a)) => (Mode::Assets, a, vec![], vec![]),
        // The other commands read no configuration (see `crate::main`).
        Some(_) | None => {
            return Err(ConfigError::Source("a command is required: server or assets".into()));
        }
    };
    let mut figment = Figment::new();
    let file = common.config.clone().map(PathBuf::from).or_else(|| {
        let default = PathBuf::from("dewy.toml");
        default.exists().then_some(default)
    });
    if let Some(file) = &file {
        if !file.exists() {
            return Err(ConfigError::Source(format!(
                "the config file `{}` given with --config does not exist",
                file.display()
            )));
        }
        figment = figment.merge(Toml::file(file));
    }
    let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
    // DEWY_CACHEDIR and other DEWY_* variables that are not keys are left
    // alone (the key arrives here in its original case).
    figment =
        figment.merge(Env::prefixed("DEWY_").filter(move |k| known.iter().any(|x| k.as_str().eq_ignore_ascii_case(x))));
    figment = figment.merge(Serialized::defaults(common));
    if !ports.is_empty() {
        figment = figment.merge(Serialized::default("port", &ports));
    }
    if !command.is_empty() {
        figment = figment.merge(Serialized::default("command", &command));
    }
    for (key, value) in &server_flags {
        figment = figment.merge(Serialized::default(key, value));
    }
    let raw: Raw = figment.extract().map_err(|e| {
        let mut msg = e.to_string();
        if let Some(src) = file.as_ref() {
            msg = format!(
                "{msg} (in {} or DEWY_* variables; valid keys: {})",
                src.display(),
                KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            );
        }
        ConfigError::Source(msg)
    })?;
    validate(mode, raw)
}

/// A `file://` URL with a relative path (`file://./releases`,
/// `file://releases`) made absolute against the directory dewy was started
/// in, as a user reads it; other URLs unchanged.
fn absolute_file_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let Some(rest) = url.strip_prefix("file://") else {
        return Ok(url.to_owned());
    };
    if rest.starts_with('/') {
        return Ok(url.to_owned());
    }
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let abs = std::path::absolute(path).map_err(|e| invalid(key, url, e.to_string()))?;
    let abs = abs.to_string_lossy();
    Ok(match query {
        Some(q) => format!("file://{abs}?{q}"),
        None => format!("file://{abs}"),
    })
}

/// The path of an absolute `file://` URL.
fn file_url_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("file://")?;
    let path = rest.split('?').next().unwrap_or(rest);
    path.starts_with('/').then(|| PathBuf::from(path))
}

/// Refuses a `file://` location inside the folders dewy manages in the app
/// folder (`releases/`, `current`, and `extra`): pruning or a switch would
/// delete or hide what lives there.
fn refuse_managed(key: &str, url: &str, workdir: &Path, extra: &[&str]) -> Result<(), ConfigError> {
    let Some(path) = file_url_path(url) else { return Ok(()) };
    // Resolve symlinks where the path exists (`current` is one).
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let target = real(&path);
    for managed in ["releases", "current"].iter().chain(extra) {
        let m = workdir.join(managed);
        if path.starts_with(&m) || target.starts_with(real(&m)) {
            return Err(invalid(
                key,
                url,
                format!(
                    "a folder outside `{}`, which dewy manages (it prunes releases/ and switches current): move the {key} elsewhere",
                    m.display()
                ),
            ));
        }
    }
    Ok(())
}

fn validate(mode: Mode, raw: Raw) -> Result<Settings, ConfigError> {
    let registry = text(&raw.registry).ok_or(ConfigError::Missing {
        flag: "--registry",
        key: "registry",
        expected: "a registry URL such as file:///srv/releases",
    })?;
    if !registry.contains("://") {
        return Err(invalid(
            "registry",
            &registry,
            "a URL such as file:///srv/releases (scheme://path)",
        ));
    }
    let cache = text(&raw.cache).unwrap_or_default();
    if !cache.is_empty() && !["file://", "s3://", "gs://"].iter().any(|p| cache.starts_with(p)) {
        return Err(invalid(
            "cache",
            &cache,
            "empty (the default file cache), file:///path, s3://<region>/<bucket>[/<prefix>] or gs://<bucket>[/<prefix>]",
        ));
    }
    let notifier = text(&raw.notifier).unwrap_or_default();
    if !notifier.is_empty() && !notifier.contains("://") {
        return Err(invalid(
            "notifier",
            &notifier,
            format!("a URL with one of the schemes {}", dewy_notify::SCHEMES.join(", ")),
        ));
    }
    let interval = duration_or("interval", &raw.interval, false, Duration::from_secs(10))?;
    let log_level = text(&raw.log_level)
        .unwrap_or_else(|| "info".into())
        .to_ascii_lowercase();
    if !["debug", "info", "warn", "error", "trace"].contains(&log_level.as_str()) {
        return Err(invalid("log_level", &log_level, "one of debug, info, warn, error"));
    }
    let log_format = match text(&raw.log_format)
        .unwrap_or_else(|| "text".into())
        .to_ascii_lowercase()
        .as_str()
    {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => return Err(invalid("log_format", other, "text or json")),
    };
    let port_values = raw.port.as_ref().map(OneOrMany::items).unwrap_or_default();
    let ports =
        dewy_starter::parse_ports(&port_values).map_err(|e| invalid("port", port_values.join(","), e.to_string()))?;
    let keep_releases = match &raw.keep_releases {
        Some(v) => v
            .text()
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| invalid("keep_releases", v.text(), "a whole number of at least 1"))?,
        None => 7,
    };
    let grace_period = duration_or("grace_period", &raw.grace_period, true, Duration::from_secs(1800))?;
    let hook_timeout = duration_or("hook_timeout", &raw.hook_timeout, false, Duration::from_secs(300))?;
    let abort_on_hook_failure = boolean("abort_on_hook_failure", &raw.abort_on_hook_failure)?;
    let workdir = text(&raw.workdir)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let workdir = std::path::absolute(&workdir)
        .map_err(|_| invalid("workdir", workdir.display().to_string(), "a folder path"))?;
    if !workdir.is_dir() {
        return Err(invalid("workdir", workdir.display().to_string(), "an existing folder"));
    }
    if let Some(calver) = text(&raw.calver) {
        dewy_registry::CalVerFormat::new(&calver).map_err(|e| invalid("calver", &calver, e))?;
    }
    let registry = absolute_file_url("registry", &registry)?;
    let cache = if cache.starts_with("file://") {
        absolute_file_url("cache", &cache)?
    } else {
        cache
    };
    refuse_managed("registry", &registry, &workdir, &[".dewy"])?;
    refuse_managed("cache", &cache, &workdir, &[])?;
    let command = raw.command.as_ref().map(OneOrMany::items).unwrap_or_default();
    if mode == Mode::Server {
        let Some(program) = command.first() else {
            return Err(ConfigError::Missing {
                flag: "COMMAND (after --)",
                key: "command",
                expected: "the application to run, such as `dewy server ... -- current/myapp`",
            });
        };
        if !program.contains('/') && !on_path(program) {
            return Err(invalid(
                "command",
                program,
                "a program on PATH, or a path such as current/myapp",
            ));
        }
    }
    let health_timeout = duration_or("health_timeout", &raw.health_timeout, false, Duration::from_secs(30))?;
    let stop_timeout = duration_or("stop_timeout", &raw.stop_timeout, false, Duration::from_secs(30))?;
    let ready_notify = boolean("ready_notify", &raw.ready_notify)?;
    let readiness = match (text(&raw.health_path), ready_notify) {
        (Some(_), true) => {
            return Err(invalid(
                "health_path",
                "--health-path with --ready-notify",
                "one readiness method, not both",
            ));
        }
        (Some(path), false) => {
            if !path.starts_with('/') {
                return Err(invalid("health_path", &path, "a path starting with /, such as /health"));
            }
            dewy_starter::Readiness::Http {
                path,
                timeout: health_timeout,
            }
        }
        (None, true) => dewy_starter::Readiness::Notify {
            timeout: health_timeout,
        },
        (None, false) => dewy_starter::Readiness::Alive(Duration::from_secs(1)),
    };
    let admin_port = match text(&raw.admin_port) {
        Some(p) => Some(
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| invalid("admin_port", &p, "a port number 1-65535"))?,
        ),
        None => None,
    };
    let health_soak = duration_or("health_soak", &raw.health_soak, true, Duration::ZERO)?;
    if !health_soak.is_zero() && !matches!(readiness, dewy_starter::Readiness::Http { .. }) {
        return Err(invalid(
            "health_soak",
            humantime::format_duration(health_soak).to_string(),
            "--health-path as well (the soak watches that path)",
        ));
    }
    let health_interval = duration_or(
        "health_interval",
        &raw.health_interval,
        false,
        Duration::from_millis(500),
    )?;
    let health_command = text(&raw.health_command);
    if health_command.is_some() && mode == Mode::Server {
        return Err(invalid(
            "health_command",
            health_command.unwrap_or_default(),
            "assets mode only; in server mode use --health-path",
        ));
    }
    let otlp_endpoint = text(&raw.otlp_endpoint);
    if let Some(url) = &otlp_endpoint
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(invalid(
            "otlp_endpoint",
            url,
            "an http(s) URL such as http://collector:4318/v1/metrics",
        ));
    }
    let otlp_interval = duration_or("otlp_interval", &raw.otlp_interval, false, Duration::from_secs(60))?;
    Ok(Settings {
        health_command,
        health_soak,
        health_interval,
        admin_port,
        admin_token: text(&raw.admin_token),
        webhook_secret: text(&raw.webhook_secret),
        otlp_endpoint,
        otlp_interval,
        readiness,
        stop_timeout,
        mode,
        registry,
        cache,
        notifier,
        interval,
        ports,
        log_level,
        log_format,
        before_hook: text(&raw.before_deploy_hook),
        after_hook: text(&raw.after_deploy_hook),
        slot: text(&raw.slot),
        calver: text(&raw.calver),
        keep_releases,
        grace_period,
        hook_timeout,
        abort_on_hook_failure,
        workdir,
        pass_env: raw.pass_env.as_ref().map(OneOrMany::items).unwrap_or_default(),
        command,
    })
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| is_executable(&d.join(program))))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
