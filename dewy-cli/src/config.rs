//! Configuration: flags over `DEWY_*` environment variables over
//! `dewy.toml`, merged with figment, then validated once into [`Settings`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Deserialize;

use crate::cli::{Cli, Command};

/// One configuration key: its name in `dewy.toml` and `DEWY_<KEY>`, its
/// flag, and whether it takes several values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The key (`keep_releases`).
    pub name: String,
    /// The flag (`--keep-releases`), or `COMMAND (after --)`.
    pub flag: String,
    /// A list (`port`, `pass_env`, `command`).
    pub many: bool,
}

/// Every key of `dewy.toml` and `DEWY_*`, read from the flags of `dewy
/// server` (which has all of `assets`' too): a key is declared once, as a
/// flag in [`crate::cli`], and its value is checked once, in this module.
pub fn keys() -> Vec<Key> {
    use clap::CommandFactory;
    let cli = Cli::command();
    let Some(server) = cli.find_subcommand("server") else {
        return Vec::new();
    };
    server
        .get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "config" | "help" | "version"))
        .map(|a| Key {
            name: a.get_id().to_string(),
            flag: a
                .get_long()
                .map_or_else(|| "COMMAND (after --)".to_owned(), |l| format!("--{l}")),
            many: matches!(a.get_action(), clap::ArgAction::Append),
        })
        .collect()
}

/// A scalar from a flag (always a string), the environment (parsed by
/// figment) or TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum Scalar {
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
pub(crate) enum OneOrMany {
    Many(Vec<Scalar>),
    One(Scalar),
}

impl OneOrMany {
    pub(crate) fn items(&self) -> Vec<String> {
        match self {
            Self::Many(v) => v.iter().map(Scalar::text).collect(),
            Self::One(s) => vec![s.text()],
        }
    }
}

/// The merged, unvalidated values by key.
#[derive(Debug, Default)]
struct Raw(std::collections::BTreeMap<String, OneOrMany>);

impl Raw {
    /// A single value. Keys are checked in tests: an unknown one is a bug.
    fn scalar(&self, key: &str) -> Option<Scalar> {
        debug_assert!(
            keys().iter().any(|k| k.name == key && !k.many),
            "{key} is not a scalar key"
        );
        match self.0.get(key)? {
            OneOrMany::One(v) => Some(v.clone()),
            OneOrMany::Many(v) => v.first().cloned(),
        }
    }

    /// The values of a list key (absent: empty).
    fn list(&self, key: &str) -> Vec<String> {
        debug_assert!(
            keys().iter().any(|k| k.name == key && k.many),
            "{key} is not a list key"
        );
        self.0.get(key).map(OneOrMany::items).unwrap_or_default()
    }
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

/// Validated configuration: what dewy-core takes in [`Settings::core`],
/// the rest for the CLI's own parts (ports, logs, admin API, OTLP).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The deploy loop's configuration, filled from the keys it has.
    pub core: dewy_core::Config,
    /// `--host-id` (default: the hostname).
    pub host_id: Option<String>,
    /// The command.
    pub mode: Mode,
    /// Registry URL.
    pub registry: String,
    /// Cache URL (empty: default file cache).
    pub cache: String,
    /// Notifier URL (empty: none).
    pub notifier: String,
    /// Port specs (server).
    pub ports: Vec<dewy_starter::ListenSpec>,
    /// Log level filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Slot.
    pub slot: Option<String>,
    /// CalVer format.
    pub calver: Option<String>,
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
    /// Admin API port on 127.0.0.1.
    pub admin_port: Option<u16>,
    /// Bearer token for mutating admin calls over TCP.
    pub admin_token: Option<String>,
    /// GitHub webhook secret.
    pub webhook_secret: Option<String>,
    /// Where metrics are pushed over OTLP.
    pub otlp: Option<Otlp>,
    /// How often metrics are pushed over OTLP.
    pub otlp_interval: Duration,
}

/// An OpenTelemetry collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Otlp {
    /// OTLP/gRPC to `host:port` (Dewy's spelling), with TLS unless
    /// `insecure`.
    Grpc {
        /// `host:port`.
        target: String,
        /// Plaintext (`--otlp-insecure`).
        insecure: bool,
    },
    /// OTLP/HTTP to this URL.
    Http(String),
}

/// A configuration value that is wrong: names the flag or key, the value,
/// and what is expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An invalid value.
    #[error("invalid value `{value}` for {flag} (key `{key}`): {expected}")]
    Invalid {
        /// The flag.
        flag: String,
        /// The file/env key.
        key: String,
        /// The value given.
        value: String,
        /// What is expected.
        expected: String,
    },
    /// A required value is missing.
    #[error("{flag} is not set (or `{key}` in dewy.toml, or DEWY_{}): {expected}", key.to_uppercase())]
    Missing {
        /// The flag.
        flag: String,
        /// The key.
        key: String,
        /// What is expected.
        expected: &'static str,
    },
    /// The config file or the environment could not be read.
    #[error("configuration error: {0}")]
    Source(String),
}

fn flag_of(key: &str) -> String {
    keys()
        .into_iter()
        .find(|k| k.name == key)
        .map_or_else(|| key.to_owned(), |k| k.flag)
}

fn missing(key: &str, expected: &'static str) -> ConfigError {
    ConfigError::Missing {
        flag: flag_of(key),
        key: key.to_owned(),
        expected,
    }
}

fn invalid(key: &str, value: impl Into<String>, expected: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag: flag_of(key),
        key: key.to_owned(),
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
    let (mode, common, flags) = match cli.command.as_ref() {
        Some(Command::Server(s)) => (Mode::Server, &s.common, Figment::from(Serialized::defaults(s))),
        Some(Command::Assets(a)) => (Mode::Assets, a, Figment::from(Serialized::defaults(a))),
        // The other commands read no configuration (see `crate::main`).
        Some(_) | None => {
            return Err(ConfigError::Source("a command is required: server or assets".into()));
        }
    };
    let keys = keys();
    let (figment, file) = file_and_env(common.config.as_deref(), keys.iter().map(|k| k.name.clone()).collect())?;
    let figment = figment.merge(flags);
    let valid = || keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", ");
    let source = |msg: String| {
        ConfigError::Source(match file.as_ref() {
            Some(src) => format!(
                "{msg} (in {} or DEWY_* variables; valid keys: {})",
                src.display(),
                valid()
            ),
            None => msg,
        })
    };
    let raw = Raw(figment.extract().map_err(|e| source(e.to_string()))?);
    for (name, value) in &raw.0 {
        match keys.iter().find(|k| &k.name == name) {
            None => return Err(source(format!("unknown key `{name}`"))),
            Some(k) if !k.many && matches!(value, OneOrMany::Many(v) if v.len() != 1) => {
                return Err(invalid(name, value.items().join(","), "a single value, not a list"));
            }
            Some(_) => {}
        }
    }
    validate(mode, raw)
}

/// The config file (`--config FILE`, else `dewy.toml` in the working
/// directory when it exists) merged under the `DEWY_<KEY>` variables of
/// `known` keys, and the file read. A `--config` file that does not exist
/// is an error.
pub(crate) fn file_and_env(
    config: Option<&str>,
    known: Vec<String>,
) -> Result<(Figment, Option<PathBuf>), ConfigError> {
    let mut figment = Figment::new();
    let file = config.map(PathBuf::from).or_else(|| {
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
    // DEWY_CACHEDIR and other DEWY_* variables that are not keys are left
    // alone (the key arrives here in its original case).
    figment =
        figment.merge(Env::prefixed("DEWY_").filter(move |k| known.iter().any(|x| k.as_str().eq_ignore_ascii_case(x))));
    Ok((figment, file))
}

/// `--otlp-endpoint`: `HOST:PORT` for OTLP/gRPC (TLS unless `insecure`),
/// or an `http(s)://` URL for OTLP/HTTP.
pub(crate) fn otlp_target(endpoint: Option<String>, insecure: bool) -> Result<Option<Otlp>, ConfigError> {
    Ok(match endpoint {
        None => None,
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => Some(Otlp::Http(url)),
        Some(target) => {
            let valid = target.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !valid {
                return Err(invalid(
                    "otlp_endpoint",
                    &target,
                    "HOST:PORT for OTLP/gRPC (localhost:4317) or an http(s) URL for OTLP/HTTP (http://collector:4318/v1/metrics)",
                ));
            }
            Some(Otlp::Grpc { target, insecure })
        }
    })
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
    let registry = text(&raw.scalar("registry"))
        .ok_or_else(|| missing("registry", "a registry URL such as file:///srv/releases"))?;
    if !registry.contains("://") {
        return Err(invalid(
            "registry",
            &registry,
            "a URL such as file:///srv/releases (scheme://path)",
        ));
    }
    let cache = text(&raw.scalar("cache")).unwrap_or_default();
    if !cache.is_empty() && !["file://", "s3://", "gs://"].iter().any(|p| cache.starts_with(p)) {
        return Err(invalid(
            "cache",
            &cache,
            "empty (the default file cache), file:///path, s3://<region>/<bucket>[/<prefix>] or gs://<bucket>[/<prefix>]",
        ));
    }
    let notifier = text(&raw.scalar("notifier")).unwrap_or_default();
    if !notifier.is_empty() && !notifier.contains("://") {
        return Err(invalid(
            "notifier",
            &notifier,
            format!("a URL with one of the schemes {}", dewy_notify::SCHEMES.join(", ")),
        ));
    }
    let interval = duration_or("interval", &raw.scalar("interval"), false, Duration::from_secs(10))?;
    let log_level = text(&raw.scalar("log_level"))
        .unwrap_or_else(|| "info".into())
        .to_ascii_lowercase();
    if !["debug", "info", "warn", "error", "trace"].contains(&log_level.as_str()) {
        return Err(invalid("log_level", &log_level, "one of debug, info, warn, error"));
    }
    let log_format = match text(&raw.scalar("log_format"))
        .unwrap_or_else(|| "text".into())
        .to_ascii_lowercase()
        .as_str()
    {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => return Err(invalid("log_format", other, "text or json")),
    };
    let port_values = raw.list("port");
    let ports =
        dewy_starter::parse_ports(&port_values).map_err(|e| invalid("port", port_values.join(","), e.to_string()))?;
    let keep_releases = match &raw.scalar("keep_releases") {
        Some(v) => v
            .text()
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| invalid("keep_releases", v.text(), "a whole number of at least 1"))?,
        None => 7,
    };
    let grace_period = duration_or(
        "grace_period",
        &raw.scalar("grace_period"),
        true,
        Duration::from_secs(1800),
    )?;
    let hook_timeout = duration_or(
        "hook_timeout",
        &raw.scalar("hook_timeout"),
        false,
        Duration::from_secs(300),
    )?;
    let abort_on_hook_failure = boolean("abort_on_hook_failure", &raw.scalar("abort_on_hook_failure"))?;
    let workdir = text(&raw.scalar("workdir"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let workdir = std::path::absolute(&workdir)
        .map_err(|_| invalid("workdir", workdir.display().to_string(), "a folder path"))?;
    if !workdir.is_dir() {
        return Err(invalid("workdir", workdir.display().to_string(), "an existing folder"));
    }
    if let Some(calver) = text(&raw.scalar("calver")) {
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
    let command = raw.list("command");
    if mode == Mode::Server {
        let Some(program) = command.first() else {
            return Err(missing(
                "command",
                "the application to run, such as `dewy server ... -- current/myapp`",
            ));
        };
        if !program.contains('/') && !on_path(program) {
            return Err(invalid(
                "command",
                program,
                "a program on PATH, or a path such as current/myapp",
            ));
        }
    }
    let health_timeout = duration_or(
        "health_timeout",
        &raw.scalar("health_timeout"),
        false,
        Duration::from_secs(30),
    )?;
    let stop_timeout = duration_or(
        "stop_timeout",
        &raw.scalar("stop_timeout"),
        false,
        Duration::from_secs(30),
    )?;
    let ready_notify = boolean("ready_notify", &raw.scalar("ready_notify"))?;
    let readiness = match (text(&raw.scalar("health_path")), ready_notify) {
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
    let admin_port = match text(&raw.scalar("admin_port")) {
        Some(p) => Some(
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| invalid("admin_port", &p, "a port number 1-65535"))?,
        ),
        None => None,
    };
    let health_soak = duration_or("health_soak", &raw.scalar("health_soak"), true, Duration::ZERO)?;
    if !health_soak.is_zero() && !matches!(readiness, dewy_starter::Readiness::Http { .. }) {
        return Err(invalid(
            "health_soak",
            humantime::format_duration(health_soak).to_string(),
            "--health-path as well (the soak watches that path)",
        ));
    }
    let health_interval = duration_or(
        "health_interval",
        &raw.scalar("health_interval"),
        false,
        Duration::from_millis(500),
    )?;
    let health_command = text(&raw.scalar("health_command"));
    if health_command.is_some() && mode == Mode::Server {
        return Err(invalid(
            "health_command",
            health_command.unwrap_or_default(),
            "assets mode only; in server mode use --health-path",
        ));
    }
    // DEWY_VERIFY_KEY may hold several keys separated by commas.
    let verify_key: Vec<String> = raw
        .list("verify_key")
        .iter()
        .flat_map(|k| k.split(','))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    let verify_keys =
        dewy_registry::TrustedKeys::parse(&verify_key).map_err(|e| invalid("verify_key", &e.key, &e.reason))?;
    if boolean("require_signature", &raw.scalar("require_signature"))? && verify_keys.is_empty() {
        return Err(invalid(
            "require_signature",
            "true",
            "a --verify-key as well (the publisher's minisign public key)",
        ));
    }
    let rollout = match text(&raw.scalar("rollout")) {
        None => None,
        Some(plan) => Some(
            plan.parse::<dewy_core::rollout::Plan>()
                .map_err(|reason| invalid("rollout", &plan, reason))?,
        ),
    };
    let host_id = text(&raw.scalar("host_id"));
    if let Some(id) = &host_id
        && (id.len() > 200
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(
            "host_id",
            id,
            "letters, digits, `.`, `_` and `-` (at most 200)",
        ));
    }
    let otlp_insecure = boolean("otlp_insecure", &raw.scalar("otlp_insecure"))?;
    let otlp = otlp_target(text(&raw.scalar("otlp_endpoint")), otlp_insecure)?;
    // Dewy's telemetry serves `/metrics` on the admin port 17539 (moving
    // up when taken); an OTLP endpoint turns it on too.
    let telemetry = boolean("telemetry", &raw.scalar("telemetry"))? || otlp.is_some();
    let admin_port = admin_port.or(telemetry.then_some(crate::admin::DEWY_ADMIN_PORT));
    let otlp_interval = duration_or(
        "otlp_interval",
        &raw.scalar("otlp_interval"),
        false,
        Duration::from_secs(60),
    )?;
    let mut core = dewy_core::Config::new(
        match mode {
            Mode::Server => dewy_core::Mode::Server,
            Mode::Assets => dewy_core::Mode::Assets,
        },
        workdir.clone(),
    );
    core.interval = interval;
    core.keep_releases = keep_releases;
    core.grace_period = grace_period;
    core.before_hook = text(&raw.scalar("before_deploy_hook"));
    core.after_hook = text(&raw.scalar("after_deploy_hook"));
    core.hook_timeout = hook_timeout;
    core.abort_on_before_hook_failure = abort_on_hook_failure;
    core.health_command = health_command;
    core.verify_keys = verify_keys;
    core.rollout = rollout;
    Ok(Settings {
        host_id,
        core,
        health_soak,
        health_interval,
        admin_port,
        admin_token: text(&raw.scalar("admin_token")),
        webhook_secret: text(&raw.scalar("webhook_secret")),
        otlp,
        otlp_interval,
        readiness,
        stop_timeout,
        mode,
        registry,
        cache,
        notifier,
        ports,
        log_level,
        log_format,
        slot: text(&raw.scalar("slot")),
        calver: text(&raw.scalar("calver")),
        workdir,
        pass_env: raw.list("pass_env"),
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Loads `dewy assets` with `args` and a dewy.toml holding `toml`.
    fn load_with(toml: &str, args: &[&str]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dewy.toml");
        std::fs::write(&file, toml).unwrap();
        let workdir = dir.path().display().to_string();
        let mut argv = vec!["dewy", "assets", "--config", file.to_str().unwrap(), "-w", &workdir];
        argv.extend_from_slice(args);
        load(&Cli::try_parse_from(argv).unwrap())
    }

    #[test]
    fn flags_override_the_file_and_reach_the_core_config() {
        let s = load_with(
            "registry = \"file:///srv/r\"\nkeep_releases = 3\ninterval = 30\nbefore_deploy_hook = \"true\"\n",
            &["--keep-releases", "5"],
        )
        .unwrap();
        assert_eq!(s.core.keep_releases, 5);
        assert_eq!(s.core.interval, Duration::from_secs(30));
        assert_eq!(s.core.before_hook.as_deref(), Some("true"));
        assert_eq!(s.registry, "file:///srv/r");
    }

    #[test]
    fn rollout_plan_and_host_id_from_the_file_or_flags() {
        let s = load_with(
            "registry = \"file:///srv/r\"\nrollout = \"canary=2,bake=30s,auto-revert\"\nhost_id = \"web-7\"\n",
            &[],
        )
        .unwrap();
        let plan = s.core.rollout.unwrap();
        assert_eq!(plan.canary, dewy_core::rollout::Count::Hosts(2));
        assert_eq!(plan.bake, Duration::from_secs(30));
        assert!(plan.auto_revert);
        assert_eq!(s.host_id.as_deref(), Some("web-7"));
        let err = load_with("registry = \"file:///srv/r\"\n", &["--rollout", "canary=0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--rollout") && err.contains("canary=0"), "{err}");
        let err = load_with("registry = \"file:///srv/r\"\n", &["--host-id", "web 7"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--host-id") && err.contains("web 7"), "{err}");
    }

    #[test]
    fn unknown_keys_and_lists_for_single_values_are_named() {
        let err = load_with("registry = \"file:///srv/r\"\nkeep_release = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown key `keep_release`") && err.contains("keep_releases"),
            "{err}"
        );
        let err = load_with("registry = \"file:///srv/r\"\ninterval = [1, 2]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--interval") && err.contains("a single value"), "{err}");
        let err = load_with("", &[]).unwrap_err().to_string();
        assert!(err.contains("--registry is not set"), "{err}");
    }

    #[test]
    fn every_key_is_a_flag_and_lists_are_marked() {
        let keys = keys();
        let many: Vec<&str> = keys.iter().filter(|k| k.many).map(|k| k.name.as_str()).collect();
        assert_eq!(many, ["pass_env", "verify_key", "port", "command"]);
        assert!(
            keys.iter()
                .any(|k| k.name == "keep_releases" && k.flag == "--keep-releases")
        );
        assert!(!keys.iter().any(|k| k.name == "config"));
    }
}
