//! Notifications for dewy: Slack and mail, off the deploy path.
//!
//! # Contract
//!
//! - [`Notifier`] is the backend trait: deliver one [`Notification`] or say
//!   why not. Backends: [`SlackNotifier`] (`slack://<channel>` with a bot
//!   token, or an incoming webhook), [`MailNotifier`] (`mail://` / `smtp://`)
//!   and [`NullNotifier`]; [`from_url`] chooses by scheme.
//! - [`Notify`] is what the deploy loop holds. Its methods never wait on the
//!   network: a message is pushed to a bounded queue and a background task
//!   delivers it with a timeout and a few retries. A full queue drops the
//!   oldest non-error message and counts it. [`Notify::shutdown`] flushes with
//!   a deadline.
//! - Error limiting, as in the Go original: errors 1 and 2 are sent as
//!   `Error occurred (count: N): ...`, the third with a warning that no more
//!   will follow, the rest are suppressed until a success resets the count;
//!   the first success after errors says how many were suppressed. Unlike the
//!   original, success messages are never suppressed while errors are
//!   pending.
//! - Quiet mode (`?quiet=true`): only important messages (server
//!   start/restart), errors and failed hooks are sent.
//!
//! # What this crate must never do
//!
//! Block or fail a deployment, read the environment (secrets come in through
//! [`NotifierEnv`]), or put a token, password or webhook URL into a log line
//! or an error text.

#![deny(missing_docs)]

mod mail;
mod queue;
mod slack;

use std::sync::Arc;
use std::time::Duration;

pub use mail::MailNotifier;
pub use queue::{Notify, NotifyStats};
pub use slack::{SlackNotifier, THREAD_TS_FILE};

/// How much a notification matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Routine (download finished, started shipping). Dropped in quiet mode.
    Info,
    /// A milestone an operator wants even in quiet mode (start, restart).
    Important,
    /// A failure.
    Error,
}

/// The result of a deploy hook, for [`Notify::send_hook_result`].
#[derive(Debug, Clone)]
pub struct HookReport {
    /// `Before Deploy` or `After Deploy`.
    pub stage: String,
    /// The command.
    pub command: String,
    /// Its stdout (trimmed).
    pub stdout: String,
    /// Its stderr (trimmed).
    pub stderr: String,
    /// Its exit code (`None` when killed by a signal or a timeout).
    pub exit_code: Option<i32>,
    /// How long it ran.
    pub duration: Duration,
    /// Whether it succeeded.
    pub success: bool,
}

/// One message to deliver.
#[derive(Debug, Clone)]
pub struct Notification {
    /// How much it matters.
    pub level: Level,
    /// The text (the Go original's catalogue, with facts appended).
    pub text: String,
    /// Set for hook results.
    pub hook: Option<HookReport>,
}

/// Facts every message carries.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The host's name.
    pub hostname: String,
    /// The user dewy runs as.
    pub user: String,
    /// dewy's working directory (the app folder).
    pub cwd: String,
    /// The application's name.
    pub app: String,
}

/// Secrets and endpoints from the environment, read by dewy-cli and passed in.
#[derive(Clone, Default)]
pub struct NotifierEnv {
    /// `SLACK_TOKEN`: bot token for `chat.postMessage`.
    pub slack_token: Option<String>,
    /// `SLACK_WEBHOOK_URL`: incoming webhook.
    pub slack_webhook_url: Option<String>,
    /// `SLACK_API_URL`: Slack API base (default `https://slack.com/api`).
    pub slack_api_url: Option<String>,
    /// `MAIL_USERNAME`.
    pub mail_username: Option<String>,
    /// `MAIL_PASSWORD`.
    pub mail_password: Option<String>,
    /// `MAIL_FROM`.
    pub mail_from: Option<String>,
    /// `MAIL_CA_FILE`: an extra trusted root (PEM) for the mail server.
    pub mail_ca_file: Option<String>,
}

impl std::fmt::Debug for NotifierEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| if o.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("NotifierEnv")
            .field("slack_token", &set(&self.slack_token))
            .field("slack_webhook_url", &set(&self.slack_webhook_url))
            .field("slack_api_url", &self.slack_api_url)
            .field("mail_username", &self.mail_username)
            .field("mail_password", &set(&self.mail_password))
            .field("mail_from", &self.mail_from)
            .field("mail_ca_file", &self.mail_ca_file)
            .finish()
    }
}

/// Errors of notification backends. Texts never contain secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A notifier URL or option that does not parse.
    #[error("invalid notifier `{url}`: {reason}")]
    Config {
        /// The URL without secrets.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The notifier URL is valid but its credentials are not set (an
    /// optional secrets file is absent, say). dewy-cli runs without
    /// notifications then, with one warning.
    #[error("notifier `{url}` has no credentials: {reason}")]
    NoCredentials {
        /// The URL without secrets.
        url: String,
        /// Which variables to set.
        reason: String,
    },
    /// The service asked to slow down.
    #[error("{service} rate limited the notification; retry after {retry_after:?}")]
    RateLimited {
        /// Slack or mail.
        service: &'static str,
        /// How long to wait.
        retry_after: Duration,
    },
    /// The service refused or failed.
    #[error("{service} refused the notification: {reason}")]
    Refused {
        /// Slack or mail.
        service: &'static str,
        /// Its answer (without secrets).
        reason: String,
    },
    /// The service could not be reached or did not answer in time.
    #[error("{service} could not be reached")]
    Unreachable {
        /// Slack or mail.
        service: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Unreachable { .. })
    }
}

/// A notification backend.
#[async_trait::async_trait]
pub trait Notifier: Send + Sync + std::fmt::Debug {
    /// Delivers one notification. Called from the background sender only.
    async fn deliver(&self, notification: &Notification, context: &Context) -> Result<(), Error>;

    /// A short name for logs (`slack`, `mail`, `null`).
    fn name(&self) -> &'static str;

    /// The release in `dir` is about to be (or is) the one in place; Slack
    /// with `thread=true` reads its `.slack-thread-ts` so later messages
    /// reply in that thread. The default does nothing.
    fn on_deploy(&self, _dir: &std::path::Path) {}
}

/// Sends nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullNotifier;

#[async_trait::async_trait]
impl Notifier for NullNotifier {
    async fn deliver(&self, _: &Notification, _: &Context) -> Result<(), Error> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "null"
    }
}

/// A backend and whether it is in quiet mode.
#[derive(Debug, Clone)]
pub struct Configured {
    /// The backend.
    pub notifier: Arc<dyn Notifier>,
    /// `?quiet=true`.
    pub quiet: bool,
}

/// The notifier schemes this build supports.
pub const SCHEMES: &[&str] = &["slack", "mail", "smtp"];

/// Chooses a backend by the URL's scheme; an empty URL is the null notifier.
pub fn from_url(url: &str, env: &NotifierEnv) -> Result<Configured, Error> {
    if url.trim().is_empty() {
        return Ok(Configured {
            notifier: Arc::new(NullNotifier),
            quiet: false,
        });
    }
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(Error::Config {
            url: redact(url),
            reason: format!("expected scheme://..., supported schemes: {}", SCHEMES.join(", ")),
        });
    };
    match scheme {
        "slack" => SlackNotifier::from_url(url, env),
        "mail" | "smtp" => MailNotifier::from_url(url, env),
        other => Err(Error::Config {
            url: redact(url),
            reason: format!(
                "unsupported notifier scheme `{other}`; supported schemes: {}",
                SCHEMES.join(", ")
            ),
        }),
    }
}

/// The URL without userinfo and without secret query values.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            let _ = u.set_username("");
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let secret = matches!(k.as_ref(), "password" | "token" | "webhook");
                    (k.into_owned(), if secret { "****".into() } else { v.into_owned() })
                })
                .collect();
            if pairs.is_empty() {
                u.set_query(None);
            } else {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => url.split(['?', '@']).next().unwrap_or_default().to_owned(),
    }
}

/// Parses a boolean query value.
pub(crate) fn parse_bool(url: &str, key: &str, value: &str) -> Result<bool, Error> {
    match value {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(Error::Config {
            url: redact(url),
            reason: format!("`{key}={other}` is not a boolean (true or false)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_redaction() {
        let env = NotifierEnv::default();
        assert_eq!(from_url("", &env).unwrap().notifier.name(), "null");
        let err = from_url("teams://x", &env).unwrap_err().to_string();
        assert!(err.contains("`teams`") && err.contains("slack"), "{err}");
        let err = from_url("slack", &env).unwrap_err().to_string();
        assert!(err.contains("scheme://"), "{err}");
        let r = redact("mail://user:pw@smtp.example.com:587/ops@example.com?password=hunter2&from=a@b");
        assert!(!r.contains("hunter2") && !r.contains("pw@"), "{r}");
    }
}
