//! Slack against a local HTTP server that records requests, mail against
//! aiosmtpd, and the promise that a hanging notifier never delays a deploy.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dewy_notify::{Context, Error, HookReport, Notification, Notifier, NotifierEnv, Notify, from_url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn context() -> Context {
    Context {
        hostname: "web-1".into(),
        user: "deploy".into(),
        cwd: "/opt/app".into(),
        app: "app".into(),
    }
}

fn provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[derive(Clone, Copy)]
enum Reply {
    SlackOk,
    WebhookOk,
    RateLimitedOnce,
    ServerError,
    SlackNotOk,
    Hang,
}

struct Recorder {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

async fn slack_server(reply: Reply) -> Recorder {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&raw).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                let n = {
                    let mut l = log.lock().unwrap();
                    l.push(String::from_utf8_lossy(&raw).to_string());
                    l.len()
                };
                let (status, extra, body) = match reply {
                    Reply::SlackOk => ("200 OK", "", r#"{"ok":true}"#),
                    Reply::WebhookOk => ("200 OK", "", "ok"),
                    Reply::RateLimitedOnce if n == 1 => ("429 Too Many Requests", "Retry-After: 1\r\n", ""),
                    Reply::RateLimitedOnce => ("200 OK", "", r#"{"ok":true}"#),
                    Reply::ServerError => ("500 Internal Server Error", "", "boom"),
                    Reply::SlackNotOk => ("200 OK", "", r#"{"ok":false,"error":"channel_not_found"}"#),
                    Reply::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                };
                let out = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(out.as_bytes()).await;
            });
        }
    });
    Recorder { url, requests }
}

fn note(text: &str) -> Notification {
    Notification {
        level: dewy_notify::Level::Important,
        text: text.into(),
        hook: None,
    }
}

#[tokio::test]
async fn slack_bot_token_posts_the_message_with_auth() {
    provider();
    let server = slack_server(Reply::SlackOk).await;
    let env = NotifierEnv {
        slack_token: Some("xoxb-secret".into()),
        slack_api_url: Some(server.url.clone()),
        ..NotifierEnv::default()
    };
    let c = from_url("slack://deploys?title=myapp", &env).unwrap();
    assert!(!format!("{:?}", c.notifier).contains("xoxb-secret"));
    c.notifier
        .deliver(&note("Server restarted for `v1.2.3`"), &context())
        .await
        .unwrap();
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert!(r.starts_with("POST /chat.postMessage"), "{r}");
    assert!(
        r.to_ascii_lowercase().contains("authorization: bearer xoxb-secret"),
        "{r}"
    );
    assert!(r.contains(r#""channel":"deploys""#), "{r}");
    assert!(r.contains("Server restarted for `v1.2.3`"), "{r}");
    assert!(r.contains("myapp/web-1"), "footer: {r}");

    let bad = slack_server(Reply::SlackNotOk).await;
    let env = NotifierEnv {
        slack_token: Some("xoxb-secret".into()),
        slack_api_url: Some(bad.url.clone()),
        ..NotifierEnv::default()
    };
    let c = from_url("slack://deploys", &env).unwrap();
    let err = c.notifier.deliver(&note("x"), &context()).await.unwrap_err();
    assert!(err.to_string().contains("channel_not_found"), "{err}");
    assert!(!err.to_string().contains("xoxb"), "{err}");
}

/// `thread=true`: messages reply in the thread the release in place names
/// in `.slack-thread-ts`; errors are also broadcast to the channel.
#[tokio::test]
async fn slack_thread_replies_follow_the_release_in_place() {
    provider();
    let server = slack_server(Reply::SlackOk).await;
    let env = NotifierEnv {
        slack_token: Some("xoxb-secret".into()),
        slack_api_url: Some(server.url.clone()),
        ..NotifierEnv::default()
    };
    let c = from_url("slack://deploys?thread=true", &env).unwrap();
    let release = tempfile::tempdir().unwrap();
    std::fs::write(release.path().join(dewy_notify::THREAD_TS_FILE), "1700000000.123456\n").unwrap();
    c.notifier.on_deploy(release.path());
    c.notifier.deliver(&note("Server restarted"), &context()).await.unwrap();
    let mut failed = note("Error occurred (count: 1): boom");
    failed.level = dewy_notify::Level::Error;
    c.notifier.deliver(&failed, &context()).await.unwrap();
    // A release without a thread: back to the channel.
    let plain = tempfile::tempdir().unwrap();
    c.notifier.on_deploy(plain.path());
    c.notifier.deliver(&note("Server restarted"), &context()).await.unwrap();
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 3);
    assert!(reqs[0].contains(r#""thread_ts":"1700000000.123456""#), "{}", reqs[0]);
    assert!(!reqs[0].contains("reply_broadcast"), "{}", reqs[0]);
    assert!(reqs[1].contains(r#""reply_broadcast":true"#), "{}", reqs[1]);
    assert!(!reqs[2].contains("thread_ts"), "{}", reqs[2]);

    // Without thread=true the file is ignored.
    let server = slack_server(Reply::SlackOk).await;
    let env = NotifierEnv {
        slack_api_url: Some(server.url.clone()),
        ..env
    };
    let c = from_url("slack://deploys", &env).unwrap();
    c.notifier.on_deploy(release.path());
    c.notifier.deliver(&note("x"), &context()).await.unwrap();
    assert!(!server.requests.lock().unwrap()[0].contains("thread_ts"));
}

#[tokio::test]
async fn slack_webhook_form() {
    provider();
    let server = slack_server(Reply::WebhookOk).await;
    let env = NotifierEnv {
        slack_webhook_url: Some(format!("{}/services/T/B/X", server.url)),
        ..NotifierEnv::default()
    };
    let c = from_url("slack://deploys?quiet=true", &env).unwrap();
    assert!(c.quiet);
    c.notifier.deliver(&note("hello"), &context()).await.unwrap();
    let reqs = server.requests.lock().unwrap().clone();
    assert!(reqs[0].starts_with("POST /services/T/B/X"), "{}", reqs[0]);
    assert!(reqs[0].contains(r#""text":"hello""#));
    assert!(
        from_url("slack://deploys", &NotifierEnv::default())
            .unwrap_err()
            .to_string()
            .contains("SLACK_TOKEN")
    );
    assert!(
        from_url("slack://deploys?bogus=1", &env)
            .unwrap_err()
            .to_string()
            .contains("`bogus`")
    );
}

#[tokio::test]
async fn slack_rate_limit_is_retried_after_the_delay_and_500_is_reported() {
    provider();
    let server = slack_server(Reply::RateLimitedOnce).await;
    let env = NotifierEnv {
        slack_token: Some("t".into()),
        slack_api_url: Some(server.url.clone()),
        ..NotifierEnv::default()
    };
    let c = from_url("slack://deploys", &env).unwrap();
    let err = c.notifier.deliver(&note("x"), &context()).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { retry_after, .. } if retry_after == Duration::from_secs(1)));
    // Through the queue: retried after Retry-After, then delivered.
    let notify = Notify::new(c.notifier.clone(), context(), false);
    notify.send_important("after rate limit");
    assert_eq!(notify.shutdown(Duration::from_secs(10)).await, 0);
    assert_eq!(notify.stats().sent.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(server.requests.lock().unwrap().len(), 2);

    let failing = slack_server(Reply::ServerError).await;
    let env = NotifierEnv {
        slack_token: Some("t".into()),
        slack_api_url: Some(failing.url.clone()),
        ..NotifierEnv::default()
    };
    let c = from_url("slack://deploys", &env).unwrap();
    let err = c.notifier.deliver(&note("x"), &context()).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[tokio::test]
async fn a_hanging_notifier_never_delays_the_caller() {
    provider();
    let server = slack_server(Reply::Hang).await;
    let env = NotifierEnv {
        slack_token: Some("t".into()),
        slack_api_url: Some(server.url.clone()),
        ..NotifierEnv::default()
    };
    let c = from_url("slack://deploys", &env).unwrap();
    let notify = Notify::new(c.notifier, context(), false);
    let started = Instant::now();
    for i in 0..200 {
        notify.send(format!("message {i}"));
        notify.send_error(format!("error {i}"));
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "pushing took {:?}",
        started.elapsed()
    );
    // The queue is bounded: old routine messages were dropped, counted.
    assert!(notify.stats().dropped.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let started = Instant::now();
    let left = notify.shutdown(Duration::from_millis(300)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(left > 0, "the hanging server delivered nothing");
}

#[derive(Debug, Default)]
struct Capture(Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Notifier for Capture {
    async fn deliver(&self, n: &Notification, _: &Context) -> Result<(), Error> {
        self.0.lock().unwrap().push(n.text.clone());
        Ok(())
    }
    fn name(&self) -> &'static str {
        "capture"
    }
}

#[tokio::test]
async fn error_limiting_and_quiet_mode() {
    let capture = Arc::new(Capture::default());
    let notify = Notify::new(capture.clone(), context(), false);
    for i in 1..=5 {
        notify.send_error(format!("registry down {i}"));
    }
    notify.send("Downloaded artifact for `v2`");
    notify.success();
    notify.send_error("again");
    notify.shutdown(Duration::from_secs(5)).await;
    let got = capture.0.lock().unwrap().clone();
    assert_eq!(got[0], "Error occurred (count: 1): registry down 1");
    assert_eq!(got[1], "Error occurred (count: 2): registry down 2");
    assert!(
        got[2].starts_with("⚠️ No more error notifications will be sent until errors are resolved."),
        "{}",
        got[2]
    );
    assert!(got[2].ends_with("Error occurred (count: 3): registry down 3"));
    // Success messages are not suppressed while errors are pending.
    assert_eq!(got[3], "Downloaded artifact for `v2`");
    assert_eq!(
        got[4],
        "Recovered after 5 errors (2 error notifications were suppressed)"
    );
    assert_eq!(got[5], "Error occurred (count: 1): again");
    assert_eq!(got.len(), 6);

    let capture = Arc::new(Capture::default());
    let quiet = Notify::new(capture.clone(), context(), true);
    quiet.send("routine");
    quiet.send_important("Server started for `v1`");
    let hook = |success| HookReport {
        stage: "Before Deploy".into(),
        command: "make migrate".into(),
        stdout: String::new(),
        stderr: "boom".into(),
        exit_code: Some(if success { 0 } else { 1 }),
        duration: Duration::from_millis(1200),
        success,
    };
    quiet.send_hook_result(hook(true));
    quiet.send_hook_result(hook(false));
    quiet.shutdown(Duration::from_secs(5)).await;
    let got = capture.0.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], "Server started for `v1`");
    assert!(
        got[1].contains("Before Deploy hook failed") && got[1].contains("exit code 1"),
        "{}",
        got[1]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_arrives_over_starttls_with_auth() {
    provider();
    let smtp = dewy_testkit::SmtpServer::start(dewy_testkit::SmtpOptions {
        tls: dewy_testkit::SmtpTls::StartTls,
        auth: Some(("dewy".into(), "s3cret".into())),
        refuse: vec!["nobody@example.com".into()],
    });
    let env = NotifierEnv {
        mail_password: Some("s3cret".into()),
        mail_ca_file: Some(smtp.cert_pem.as_ref().unwrap().display().to_string()),
        ..NotifierEnv::default()
    };
    let url = format!(
        "mail://localhost:{}/ops@example.com?username=dewy&from=dewy@example.com&subject=Deploys",
        smtp.port
    );
    let c = from_url(&url, &env).unwrap();
    c.notifier
        .deliver(&note("Server restarted for `v1.2.3`"), &context())
        .await
        .unwrap();
    let got = smtp.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.rcpt_tos, vec!["ops@example.com".to_owned()]);
    assert_eq!(m.auth_user.as_deref(), Some("dewy"));
    assert!(m.tls);
    assert!(m.data.contains("Subject: Deploys"), "{}", m.data);
    assert!(m.data.contains("From: dewy@example.com"), "{}", m.data);
    assert!(m.data.contains("Server restarted for `v1.2.3`"));
    assert!(m.data.contains("Host: web-1") && m.data.contains("Working dir: /opt/app"));

    // A refused recipient is an error that names no secret.
    let url = format!(
        "mail://localhost:{}/nobody@example.com?username=dewy&from=dewy@example.com",
        smtp.port
    );
    let c = from_url(&url, &env).unwrap();
    let err = c.notifier.deliver(&note("x"), &context()).await.unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err}");
    assert!(!err.to_string().contains("s3cret"));

    // Plain SMTP only when asked for.
    let plain = dewy_testkit::SmtpServer::start(dewy_testkit::SmtpOptions::default());
    let url = format!(
        "smtp://127.0.0.1:{}/ops@example.com?from=dewy@example.com&tls=none",
        plain.port
    );
    from_url(&url, &NotifierEnv::default())
        .unwrap()
        .notifier
        .deliver(&note("plain"), &context())
        .await
        .unwrap();
    assert_eq!(plain.wait_for(1, Duration::from_secs(10)).len(), 1);
    // Dewy's option spellings: the server and the recipient as options.
    let url = format!(
        "mail://?host=127.0.0.1&port={}&to=oncall@example.com&from=dewy@example.com&tls=none",
        plain.port
    );
    from_url(&url, &NotifierEnv::default())
        .unwrap()
        .notifier
        .deliver(&note("options"), &context())
        .await
        .unwrap();
    let got = plain.wait_for(2, Duration::from_secs(10));
    assert!(
        got[1].rcpt_tos.iter().any(|t| t.contains("oncall@example.com")),
        "{:?}",
        got[1].rcpt_tos
    );
    let Err(err) = from_url("mail://?host=h&port=x&to=a@b", &NotifierEnv::default()) else {
        panic!("a bad port is refused");
    };
    let err = err.to_string();
    assert!(err.contains("port=x"), "{err}");
    let url = format!("smtp://127.0.0.1:{}/ops@example.com?from=dewy@example.com", plain.port);
    let err = from_url(&url, &NotifierEnv::default())
        .unwrap()
        .notifier
        .deliver(&note("x"), &context())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("mail"),
        "STARTTLS is required by default: {err}"
    );
}
