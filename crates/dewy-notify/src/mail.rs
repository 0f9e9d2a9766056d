//! Mail through SMTP: STARTTLS on 587, implicit TLS on 465, plain only when
//! asked for.

use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::{Configured, Context, Error, Notification, Notifier, NotifierEnv, parse_bool, redact};

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MailTls {
    /// STARTTLS, required.
    StartTls,
    /// TLS from the first byte (SMTPS).
    Implicit,
    /// No TLS (only with `tls=none`).
    None,
}

/// Sends notifications by mail.
#[derive(Clone)]
pub struct MailNotifier {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: lettre::message::Mailbox,
    to: lettre::message::Mailbox,
    subject: String,
    server: String,
}

impl std::fmt::Debug for MailNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailNotifier")
            .field("server", &self.server)
            .field("to", &self.to.to_string())
            .finish()
    }
}

impl MailNotifier {
    const OPTIONS: &'static [&'static str] = &[
        "username", "password", "from", "subject", "tls", "quiet", "host", "port", "to",
    ];

    /// From `mail://host[:port]/recipient?username=&password=&from=&subject=&tls=&quiet=`
    /// (`smtp://` too); `host=`, `port=` and `to=` may give the server and
    /// the recipient instead (and win over the URL's). Missing `username`, `password` and `from` fall back to
    /// `MAIL_USERNAME`, `MAIL_PASSWORD` and `MAIL_FROM`; `from` then to the
    /// user name. `tls` is `starttls`, `implicit` or `none`; by default port
    /// 465 means implicit TLS and any other port STARTTLS.
    pub fn from_url(url: &str, env: &NotifierEnv) -> Result<Configured, Error> {
        let bad = |reason: String| Error::Config {
            url: redact(url),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let (mut username, mut password, mut from, mut subject, mut tls, mut quiet) =
            (None, None, None, None, None, false);
        let (mut host_opt, mut port_opt, mut to_opt) = (None, None, None);
        for (k, v) in parsed.query_pairs() {
            let v = v.into_owned();
            match k.as_ref() {
                "username" => username = Some(v),
                "password" => password = Some(v),
                "from" => from = Some(v),
                "subject" => subject = Some(v),
                // Dewy's spellings of the server and the recipient.
                "host" => host_opt = Some(v).filter(|h| !h.is_empty()),
                "port" => {
                    port_opt = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| bad(format!("`port={v}` is not a port number")))?,
                    )
                }
                "to" => to_opt = Some(v).filter(|t| !t.is_empty()),
                "tls" => {
                    tls = Some(match v.as_str() {
                        "starttls" | "true" | "" => MailTls::StartTls,
                        "implicit" | "smtps" | "ssl" => MailTls::Implicit,
                        "none" | "false" | "plain" => MailTls::None,
                        other => return Err(bad(format!("`tls={other}` is not one of starttls, implicit, none"))),
                    })
                }
                "quiet" => quiet = parse_bool(url, "quiet", &v)?,
                other => {
                    return Err(bad(format!(
                        "unknown option `{other}`; valid options: {}",
                        Self::OPTIONS.join(", ")
                    )));
                }
            }
        }
        let host = host_opt
            .or_else(|| parsed.host_str().filter(|h| !h.is_empty()).map(str::to_owned))
            .ok_or_else(|| bad("mail host is required (mail://host:port/recipient or host=)".into()))?;
        let port = port_opt.or(parsed.port()).unwrap_or(587);
        let to = to_opt.unwrap_or_else(|| {
            percent_encoding::percent_decode_str(parsed.path().trim_matches('/'))
                .decode_utf8_lossy()
                .into_owned()
        });
        if to.is_empty() {
            return Err(bad(
                "mail recipient is required (mail://host:port/recipient or to=)".into()
            ));
        }
        let username = username.or_else(|| env.mail_username.clone()).filter(|u| !u.is_empty());
        let password = password.or_else(|| env.mail_password.clone()).filter(|p| !p.is_empty());
        let from = from
            .or_else(|| env.mail_from.clone())
            .or_else(|| username.clone())
            .ok_or_else(|| bad("mail from is required (from= or MAIL_FROM)".into()))?;
        let tls = tls.unwrap_or(if port == 465 {
            MailTls::Implicit
        } else {
            MailTls::StartTls
        });
        let mut params = TlsParameters::builder(host.clone());
        if let Some(ca) = &env.mail_ca_file {
            let pem = std::fs::read(ca).map_err(|e| bad(format!("cannot read MAIL_CA_FILE `{ca}`: {e}")))?;
            params = params.add_root_certificate(
                Certificate::from_pem(&pem).map_err(|e| bad(format!("MAIL_CA_FILE `{ca}`: {e}")))?,
            );
        }
        let params = params.build_rustls().map_err(|e| bad(format!("TLS setup: {e}")))?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host)
            .port(port)
            .timeout(Some(Duration::from_secs(10)));
        builder = match tls {
            MailTls::StartTls => builder.tls(Tls::Required(params)),
            MailTls::Implicit => builder.tls(Tls::Wrapper(params)),
            MailTls::None => builder.tls(Tls::None),
        };
        if let (Some(u), Some(p)) = (&username, &password) {
            builder = builder
                .credentials(Credentials::new(u.clone(), p.clone()))
                .authentication(vec![Mechanism::Plain, Mechanism::Login]);
        }
        let parse = |what: &str, addr: &str| {
            addr.parse::<lettre::message::Mailbox>()
                .map_err(|e| bad(format!("invalid {what} address `{addr}`: {e}")))
        };
        let notifier = Self {
            transport: builder.build(),
            from: parse("from", &from)?,
            to: parse("recipient", &to)?,
            subject: subject.unwrap_or_else(|| "Dewy Notification".into()),
            server: format!("{host}:{port}"),
        };
        Ok(Configured {
            notifier: std::sync::Arc::new(notifier),
            quiet,
        })
    }
}

fn footer(context: &Context) -> String {
    format!(
        "Host: {}\nUser: {}\nWorking dir: {}\n\n--\nDewy: https://github.com/linyows/dewy",
        context.hostname, context.user, context.cwd
    )
}

#[async_trait::async_trait]
impl Notifier for MailNotifier {
    async fn deliver(&self, n: &Notification, context: &Context) -> Result<(), Error> {
        let (subject, body) = match &n.hook {
            Some(h) => (
                format!("Dewy {} Hook {}", h.stage, if h.success { "SUCCESS" } else { "FAILED" }),
                format!(
                    "Command: {}\nExit Code: {}\nDuration: {:.1}s\n\nSTDOUT:\n{}\n\nSTDERR:\n{}\n\n{}",
                    h.command,
                    h.exit_code.map_or("none".to_owned(), |c| c.to_string()),
                    h.duration.as_secs_f64(),
                    h.stdout,
                    h.stderr,
                    footer(context)
                ),
            ),
            None => (self.subject.clone(), format!("{}\n\n{}", n.text, footer(context))),
        };
        let message = Message::builder()
            .from(self.from.clone())
            .to(self.to.clone())
            .subject(subject)
            .body(body)
            .map_err(|e| Error::Refused {
                service: "mail",
                reason: e.to_string(),
            })?;
        self.transport.send(message).await.map_err(|e| {
            if e.is_permanent() {
                Error::Refused {
                    service: "mail",
                    reason: e.to_string(),
                }
            } else {
                Error::Unreachable {
                    service: "mail",
                    source: Box::new(e),
                }
            }
        })?;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "mail"
    }
}
