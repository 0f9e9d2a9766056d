//! Smoke tests: each server starts and answers a real client.

use std::time::Duration;

use dewy_testkit::{GcsServer, S3Server, SmtpOptions, SmtpServer, SmtpTls, StartServer};

fn client() -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test]
async fn s3_server_stores_and_lists_objects() {
    let s3 = S3Server::start();
    let http = client();
    let auth = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
    let r = http
        .put(format!("{}/bucket", s3.endpoint))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    let r = http
        .put(format!("{}/bucket/app/v1.0.0/app.tar.gz", s3.endpoint))
        .header("authorization", auth)
        .body("artifact")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // A conditional create of an existing key is refused: the property the
    // shared cache's lock relies on.
    let r = http
        .put(format!("{}/bucket/app/v1.0.0/app.tar.gz", s3.endpoint))
        .header("authorization", auth)
        .header("if-none-match", "*")
        .body("other")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 412);
    let list = http
        .get(format!("{}/bucket?list-type=2&prefix=app/&delimiter=/", s3.endpoint))
        .header("authorization", auth)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(list.contains("<Prefix>app/v1.0.0/</Prefix>"), "{list}");
    let body = http
        .get(format!("{}/bucket/app/v1.0.0/app.tar.gz", s3.endpoint))
        .header("authorization", auth)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "artifact");
}

#[tokio::test]
async fn gcs_server_stores_and_lists_objects() {
    let gcs = GcsServer::start();
    let http = client();
    let r = http
        .post(format!("{}/storage/v1/b?project=test", gcs.endpoint))
        .json(&serde_json::json!({"name": "bucket"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    let r = http
        .post(format!(
            "{}/upload/storage/v1/b/bucket/o?uploadType=media&name=app/v1.0.0/app.tar.gz",
            gcs.endpoint
        ))
        .body("artifact")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "upload: {}", r.status());
    let list: serde_json::Value = http
        .get(format!(
            "{}/storage/v1/b/bucket/o?prefix=app/&delimiter=/",
            gcs.endpoint
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["prefixes"][0], "app/v1.0.0/", "{list}");
    let body = http
        .get(format!(
            "{}/storage/v1/b/bucket/o/app%2Fv1.0.0%2Fapp.tar.gz?alt=media",
            gcs.endpoint
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "artifact");
}

#[tokio::test]
async fn smtp_server_receives_mail_over_starttls_with_auth() {
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let smtp = SmtpServer::start(SmtpOptions {
        tls: SmtpTls::StartTls,
        auth: Some(("dewy".into(), "secret".into())),
        refuse: vec!["nobody@example.com".into()],
    });
    let cert = std::fs::read(smtp.cert_pem.as_ref().unwrap()).unwrap();
    let tls = lettre::transport::smtp::client::TlsParameters::builder("localhost".into())
        .add_root_certificate(lettre::transport::smtp::client::Certificate::from_pem(&cert).unwrap())
        .build_rustls()
        .unwrap();
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(smtp.port)
        .tls(lettre::transport::smtp::client::Tls::Required(tls))
        .credentials(lettre::transport::smtp::authentication::Credentials::new(
            "dewy".into(),
            "secret".into(),
        ))
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let msg = Message::builder()
        .from("dewy@example.com".parse().unwrap())
        .to("ops@example.com".parse().unwrap())
        .subject("hello")
        .body("deployed".to_owned())
        .unwrap();
    mailer.send(msg).await.unwrap();
    let got = smtp.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, vec!["ops@example.com".to_owned()]);
    assert_eq!(got[0].auth_user.as_deref(), Some("dewy"));
    assert!(got[0].tls);
    assert!(got[0].data.contains("Subject: hello"), "{}", got[0].data);

    let refused = Message::builder()
        .from("dewy@example.com".parse().unwrap())
        .to("nobody@example.com".parse().unwrap())
        .body("x".to_owned())
        .unwrap();
    assert!(mailer.send(refused).await.is_err());
}

#[test]
fn start_server_passes_its_socket_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env");
    let script = dir.path().join("app.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$SERVER_STARTER_PORT $SERVER_STARTER_GENERATION\" > {}\nexec sleep 30\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ss = StartServer::spawn(&script, &[], &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !out.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let env = std::fs::read_to_string(&out).unwrap_or_else(|_| panic!("app never ran; log:\n{}", ss.log()));
    // `host:port=fd GENERATION`; start_server's own descriptors decide the fd.
    let (port, generation) = env.trim().split_once(' ').unwrap();
    let (addr, fd) = port.rsplit_once('=').unwrap();
    assert_eq!(addr, format!("127.0.0.1:{}", ss.port), "log:\n{}", ss.log());
    assert!(fd.parse::<u32>().unwrap() >= 3);
    assert_eq!(generation, "1");
}
