//! Slack: `chat.postMessage` with a bot token, or an incoming webhook.

use std::time::Duration;

use crate::{Configured, Context, Error, Level, Notification, Notifier, NotifierEnv, parse_bool, redact};

const ICON: &str = "https://raw.githubusercontent.com/linyows/dewy/main/misc/dewy-icon.512.png";

/// Where messages go.
#[derive(Clone)]
enum Target {
    /// `chat.postMessage` on `api` with a bot token.
    Bot {
        api: String,
        token: String,
        channel: String,
    },
    /// An incoming webhook.
    Webhook { url: String },
}

/// Posts notifications to Slack.
#[derive(Clone)]
pub struct SlackNotifier {
    target: Target,
    title: Option<String>,
    link: Option<String>,
    client: reqwest::Client,
    /// `thread=true`: replies go to the thread whose timestamp the release
    /// in place holds in `.slack-thread-ts`.
    thread: bool,
    thread_ts: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// The file of a release that names its Slack thread (Dewy's).
pub const THREAD_TS_FILE: &str = ".slack-thread-ts";

impl std::fmt::Debug for SlackNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.target {
            Target::Bot { channel, .. } => format!("bot token, channel {channel}"),
            Target::Webhook { .. } => "incoming webhook".to_owned(),
        };
        f.debug_struct("SlackNotifier")
            .field("target", &kind)
            .field("title", &self.title)
            .finish()
    }
}

impl SlackNotifier {
    const OPTIONS: &'static [&'static str] = &["title", "url", "quiet", "thread"];

    /// From `slack://<channel>?title=&url=&quiet=&thread=`: a bot token from
    /// `SLACK_TOKEN`, or without one an incoming webhook from
    /// `SLACK_WEBHOOK_URL`. `slack://hooks.slack.com/services/...` names the
    /// webhook in the URL itself.
    pub fn from_url(url: &str, env: &NotifierEnv) -> Result<Configured, Error> {
        let parsed = url::Url::parse(url).map_err(|e| Error::Config {
            url: redact(url),
            reason: e.to_string(),
        })?;
        let (mut title, mut link, mut quiet, mut thread) = (None, None, false, false);
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "title" => title = Some(v.into_owned()),
                "url" => link = Some(v.into_owned()),
                "quiet" => quiet = parse_bool(url, "quiet", &v)?,
                "thread" => thread = parse_bool(url, "thread", &v)?,
                other => {
                    return Err(Error::Config {
                        url: redact(url),
                        reason: format!("unknown option `{other}`; valid options: {}", Self::OPTIONS.join(", ")),
                    });
                }
            }
        }
        let host = parsed.host_str().unwrap_or_default();
        let target = if host == "hooks.slack.com" {
            Target::Webhook {
                url: format!("https://hooks.slack.com{}", parsed.path()),
            }
        } else if let Some(token) = env.slack_token.clone().filter(|t| !t.is_empty()) {
            let channel = format!("{host}{}", parsed.path()).trim_matches('/').to_owned();
            let channel = if channel.is_empty() {
                "randam".to_owned()
            } else {
                channel
            };
            let api = env
                .slack_api_url
                .clone()
                .unwrap_or_else(|| "https://slack.com/api".into());
            Target::Bot { api, token, channel }
        } else if let Some(url) = env.slack_webhook_url.clone().filter(|u| !u.is_empty()) {
            Target::Webhook { url }
        } else {
            return Err(Error::NoCredentials {
                url: redact(url),
                reason: "set SLACK_TOKEN (bot token) or SLACK_WEBHOOK_URL (incoming webhook)".into(),
            });
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Unreachable {
                service: "slack",
                source: Box::new(e),
            })?;
        Ok(Configured {
            notifier: std::sync::Arc::new(Self {
                target,
                title,
                link,
                client,
                thread,
                thread_ts: std::sync::Arc::default(),
            }),
            quiet,
        })
    }

    /// The thread replies go to, with `thread=true` and a release that
    /// names one.
    fn thread(&self) -> Option<String> {
        if !self.thread {
            return None;
        }
        self.thread_ts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn footer(&self, context: &Context) -> String {
        match (&self.link, &self.title) {
            (Some(u), Some(t)) => format!("<{u}|{t}>/{}", context.hostname),
            (None, Some(t)) => format!("{t}/{}", context.hostname),
            _ => context.hostname.clone(),
        }
    }

    fn attachment(&self, n: &Notification, context: &Context) -> serde_json::Value {
        let footer = self.footer(context);
        match &n.hook {
            Some(h) => {
                let fence = |s: &str| {
                    if s.is_empty() {
                        "(empty)".to_owned()
                    } else {
                        format!("```{}```", truncate(s))
                    }
                };
                serde_json::json!({
                    "title": format!("{} Hook", h.stage),
                    "color": if h.success { "#36a64f" } else { "#dd0000" },
                    "text": format!("```{}```", h.command),
                    "fields": [
                        {"title": "Stdout", "value": fence(&h.stdout), "short": false},
                        {"title": "Stderr", "value": fence(&h.stderr), "short": false},
                        {"title": "Exit Code", "value": h.exit_code.map_or("none".to_owned(), |c| c.to_string()), "short": true},
                        {"title": "Duration", "value": format!("{:.1}s", h.duration.as_secs_f64()), "short": true},
                    ],
                    "footer": footer,
                })
            }
            None => serde_json::json!({
                "color": match n.level { Level::Error => "#dd0000".to_owned(), _ => host_color(&context.hostname) },
                "text": n.text,
                "footer": footer,
                "ts": jiff::Timestamp::now().as_second(),
            }),
        }
    }
}

/// At most 50 lines and 2,000 characters, as the Go original trims.
fn truncate(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let mut out = lines.iter().take(50).copied().collect::<Vec<_>>().join("\n");
    if lines.len() > 50 {
        out.push_str(&format!("\n... ({} more lines truncated)", lines.len() - 50));
    }
    if out.chars().count() > 2000 {
        let cut: String = out.chars().take(2000).collect();
        let more = out.chars().count() - 2000;
        out = format!("{cut}\n... ({more} more characters truncated)");
    }
    out
}

/// A stable colour per host, so messages of one host look alike.
fn host_color(host: &str) -> String {
    let h = host.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("#{:02x}{:02x}{:02x}", (h >> 16) as u8 | 0x20, (h >> 8) as u8, h as u8)
}

fn retry_after(resp: &reqwest::Response) -> Duration {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
}

#[async_trait::async_trait]
impl Notifier for SlackNotifier {
    async fn deliver(&self, n: &Notification, context: &Context) -> Result<(), Error> {
        let unreachable = |e: reqwest::Error| Error::Unreachable {
            service: "slack",
            source: Box::new(e.without_url()),
        };
        let attachment = self.attachment(n, context);
        let req = match &self.target {
            Target::Bot { api, token, channel } => self
                .client
                .post(format!("{}/chat.postMessage", api.trim_end_matches('/')))
                .bearer_auth(token)
                .json(&{
                    let mut body = serde_json::json!({
                        "channel": channel,
                        "username": "Dewy",
                        "icon_url": ICON,
                        "attachments": [attachment],
                    });
                    if let Some(ts) = self.thread() {
                        body["thread_ts"] = ts.into();
                        // Errors also show in the channel, as Dewy does.
                        if n.level == Level::Error {
                            body["reply_broadcast"] = true.into();
                        }
                    }
                    body
                }),
            Target::Webhook { url } => self.client.post(url).json(&serde_json::json!({
                "username": "Dewy",
                "icon_url": ICON,
                "text": n.text,
                "attachments": [attachment],
            })),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        if status.as_u16() == 429 {
            return Err(Error::RateLimited {
                service: "slack",
                retry_after: retry_after(&resp),
            });
        }
        if status.is_server_error() {
            return Err(Error::Unreachable {
                service: "slack",
                source: format!("HTTP {status}").into(),
            });
        }
        let body = resp.text().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(Error::Refused {
                service: "slack",
                reason: format!("HTTP {status}: {}", body.chars().take(200).collect::<String>()),
            });
        }
        if let Target::Bot { .. } = self.target {
            // chat.postMessage answers 200 even on failure.
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if v["ok"] != serde_json::Value::Bool(true) {
                let reason = v["error"].as_str().unwrap_or("malformed answer").to_owned();
                return Err(Error::Refused {
                    service: "slack",
                    reason,
                });
            }
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "slack"
    }

    fn on_deploy(&self, dir: &std::path::Path) {
        if !self.thread {
            return;
        }
        let ts = std::fs::read_to_string(dir.join(THREAD_TS_FILE))
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        tracing::debug!(thread_ts = ?ts, dir = %dir.display(), "Slack thread of the release");
        *self.thread_ts.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = ts;
    }
}
