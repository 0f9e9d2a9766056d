//! Log output in the Go original's shapes: text
//! `time=... level=INFO msg="..." key=value` or one JSON object per line with
//! `time`, `level`, `msg`, then the fields.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// The crates whose events `--log-level` governs.
const DEWY_TARGETS: &[&str] = &[
    "dewy",
    "dewy_cli",
    "dewy_core",
    "dewy_registry",
    "dewy_store",
    "dewy_cache",
    "dewy_archive",
    "dewy_starter",
    "dewy_notify",
];

/// The filter for `--log-level LEVEL`: dewy's own events at LEVEL, the
/// libraries' (SDKs, HTTP, TLS) at WARN and above only whatever the level,
/// since their debug output carries request details such as credential
/// scopes and signed URLs. `DEWY_LOG` (an `EnvFilter` directive) overrides it
/// for those who need the libraries' traces.
fn directives(level: &str) -> String {
    let mut d = (if level == "error" { "error" } else { "warn" }).to_owned();
    for target in DEWY_TARGETS {
        d.push_str(&format!(",{target}={level}"));
    }
    d
}

/// Installs the global subscriber writing to stderr.
pub(crate) fn init(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEWY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directives(level)));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(SlogFormat {
            json: format == LogFormat::Json,
        })
        .try_init();
}

struct SlogFormat {
    json: bool,
}

#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.pairs.push((field.name().to_owned(), value.to_owned()));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let v = format!("{value:?}");
        if field.name() == "message" {
            self.message = v;
        } else {
            self.pairs.push((field.name().to_owned(), v));
        }
    }
}

fn quote_text(v: &str) -> String {
    if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '"' || c == '=') {
        format!("{v:?}")
    } else {
        v.to_owned()
    }
}

impl<S, N> FormatEvent<S, N> for SlogFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        let time = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "ERROR",
            tracing::Level::WARN => "WARN",
            tracing::Level::INFO => "INFO",
            _ => "DEBUG",
        };
        if self.json {
            let mut map = serde_json::Map::new();
            map.insert("time".into(), time.into());
            map.insert("level".into(), level.into());
            map.insert("msg".into(), f.message.into());
            for (k, v) in f.pairs {
                let value = v
                    .parse::<i64>()
                    .map(serde_json::Value::from)
                    .unwrap_or_else(|_| match v.as_str() {
                        "true" => true.into(),
                        "false" => false.into(),
                        _ => v.into(),
                    });
                map.insert(k, value);
            }
            writeln!(w, "{}", serde_json::Value::Object(map))
        } else {
            write!(w, "time={time} level={level} msg={}", quote_text(&f.message))?;
            for (k, v) in f.pairs {
                write!(w, " {k}={}", quote_text(&v))?;
            }
            writeln!(w)
        }
    }
}
