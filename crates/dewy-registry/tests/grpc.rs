//! `grpc://` against Dewy's RegistryService served by grpcio (Python), a
//! server nobody here wrote: plaintext, TLS, mutual TLS, tokens, retries,
//! NOT_FOUND, reports, and artifact URLs of every scheme dewy downloads.

use std::sync::Arc;

use dewy_registry::{Downloader, Error, GithubEnv, NoProgress, OpenOptions, Platform, Registry, Report};
use dewy_testkit::{GrpcRegistry, GrpcTransport, TestCa};

fn options(token: Option<&str>) -> OpenOptions {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    OpenOptions {
        platform: Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            libc: Some("gnu".into()),
        },
        grpc_token: token.map(str::to_owned),
        ..OpenOptions::default()
    }
}

fn open(url: &str, opts: &OpenOptions) -> Arc<dyn Registry> {
    dewy_registry::open(url, opts).unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn grpc_code(err: &Error) -> &'static str {
    match err {
        Error::Grpc { code, .. } => code,
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

async fn download(reg: &Arc<dyn Registry>) -> Vec<u8> {
    let release = reg.latest().await.unwrap();
    let request = reg.artifact_request(&release).await.unwrap();
    let staging = tempfile::tempdir().unwrap();
    let got = Downloader::new(Default::default())
        .unwrap()
        .fetch_request(&request, None, staging.path(), &NoProgress)
        .await
        .unwrap();
    std::fs::read(&got.path).unwrap()
}

#[tokio::test]
async fn plaintext_answers_reports_and_go_platform_names() {
    let server = GrpcRegistry::start(GrpcTransport::Plain, None);
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("app_linux_amd64.tar.gz");
    std::fs::write(&artifact, b"artifact bytes").unwrap();
    server.set_release(
        "answer-1",
        "v1.2.3",
        &format!("file://{}", artifact.display()),
        Some("2026-01-02T03:04:05Z"),
    );
    let reg = open(
        &format!("grpc://{}?no-tls=true&artifact=app_linux_amd64.tar.gz", server.addr),
        &options(None),
    );
    let release = reg.latest().await.unwrap();
    assert_eq!(
        (
            release.id.as_str(),
            release.tag.as_str(),
            release.artifact_name.as_str()
        ),
        ("answer-1", "v1.2.3", "app_linux_amd64.tar.gz")
    );
    assert_eq!(release.published_at.unwrap().to_string(), "2026-01-02T03:04:05Z");
    assert_eq!(download(&reg).await, b"artifact bytes");
    let request = &server.requests()[0];
    assert_eq!(request["arch"], "amd64", "Go's GOARCH: {request}");
    assert_eq!(request["os"], "linux");
    assert_eq!(request["artifact_name"], "app_linux_amd64.tar.gz");
    assert!(request["authorization"].is_null(), "no token configured: {request}");

    // With --verify-key: `artifact_url` + `.minisig` is the signature.
    let key = dewy_testkit::MinisignKey::generate();
    let trusted = dewy_registry::TrustedKeys::parse(&[key.public.as_str()]).unwrap();
    let downloader = Downloader::new(Default::default()).unwrap();
    match downloader.signature(&*reg, &release, &trusted).await {
        Err(Error::Signature {
            source: dewy_registry::SignatureError::Missing { .. },
            ..
        }) => {}
        other => panic!("no .minisig yet: {other:?}"),
    }
    key.sign(&artifact, "grpc artifact", false);
    let check = downloader.signature(&*reg, &release, &trusted).await.unwrap();
    assert_eq!(check.trusted_comment(), "grpc artifact");

    assert!(reg.reports_failures());
    for error in [
        None,
        Some("failed to extract the artifact of `v1.2.3`: not an archive".to_owned()),
    ] {
        reg.report(&Report {
            release_id: release.id.clone(),
            tag: release.tag.clone(),
            command: "server".into(),
            hostname: "web-1".into(),
            at: jiff::Timestamp::now(),
            error,
        })
        .await
        .unwrap();
    }
    let reports = server.reports();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert_eq!(
        (&reports[0]["id"], &reports[0]["tag"], &reports[0]["command"]),
        (&"answer-1".into(), &"v1.2.3".into(), &"server".into())
    );
    assert!(reports[0]["err"].is_null(), "success has no err: {reports:?}");
    assert!(
        reports[1]["err"].as_str().is_some_and(|e| e.contains("not an archive")),
        "{reports:?}"
    );

    // An empty artifact URL, or NOT_FOUND with the release's creation time:
    // not published yet (the grace period case).
    server.set_release("answer-2", "v1.3.0", "", Some("2026-01-02T03:04:05Z"));
    match reg.latest().await {
        Err(Error::ArtifactNotFound { tag, published_at, .. }) => {
            assert_eq!(tag, "v1.3.0");
            assert!(published_at.is_some());
        }
        other => panic!("{other:?}"),
    }
    server.set_not_found(Some("2026-01-02T03:04:05Z"));
    match reg.latest().await {
        Err(Error::ArtifactNotFound { published_at, .. }) => assert!(published_at.is_some()),
        other => panic!("{other:?}"),
    }
    // NOT_FOUND alone is an error naming the code and the message.
    server.set_not_found(None);
    let err = reg.latest().await.unwrap_err();
    assert_eq!(grpc_code(&err), "NOT_FOUND");
    assert!(err.to_string().contains("no artifact for linux/amd64 yet"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn unavailable_is_retried_and_a_dead_service_is_a_clear_error() {
    let server = GrpcRegistry::start(GrpcTransport::Plain, None);
    server.set_release("a", "v1.0.0", "file:///srv/app.tar.gz", None);
    let reg = open(&format!("grpc://{}?no-tls=true", server.addr), &options(None));
    server.set_unavailable(2);
    assert_eq!(reg.latest().await.unwrap().tag, "v1.0.0");
    assert_eq!(server.requests().len(), 3, "two UNAVAILABLE answers, then the release");
    server.set_unavailable(10);
    let err = reg.latest().await.unwrap_err();
    assert_eq!(grpc_code(&err), "UNAVAILABLE");
    assert!(err.is_transient());
    // Recovery: the next call works.
    server.set_unavailable(0);
    assert_eq!(reg.latest().await.unwrap().tag, "v1.0.0");

    let port = dewy_testkit::free_port();
    let dead = open(&format!("grpc://127.0.0.1:{port}?no-tls=true"), &options(None));
    let err = dead.latest().await.unwrap_err();
    assert_eq!(grpc_code(&err), "UNAVAILABLE", "{err}");
    assert!(err.to_string().contains(&format!("grpc://127.0.0.1:{port}")), "{err}");
}

#[tokio::test]
async fn bearer_tokens_are_sent_and_refusals_named() {
    let server = GrpcRegistry::start(GrpcTransport::Plain, None);
    server.set_release("a", "v1.0.0", "file:///srv/app.tar.gz", None);
    server.set_token(Some("s3cret-token"));
    let url = format!("grpc://{}?no-tls=true", server.addr);
    let err = open(&url, &options(None)).latest().await.unwrap_err();
    assert_eq!(grpc_code(&err), "UNAUTHENTICATED");
    let err = open(&url, &options(Some("wr0ng-t0ken"))).latest().await.unwrap_err();
    assert_eq!(grpc_code(&err), "UNAUTHENTICATED");
    assert!(!err.to_string().contains("wr0ng"), "the token is not in errors: {err}");
    let reg = open(&url, &options(Some("s3cret-token")));
    assert_eq!(reg.latest().await.unwrap().tag, "v1.0.0");
    assert_eq!(
        server.requests().last().unwrap()["authorization"],
        "Bearer s3cret-token"
    );
    assert!(!format!("{reg:?}").contains("s3cret"), "{reg:?}");
}

#[tokio::test]
async fn tls_with_a_private_ca_and_mutual_tls() {
    let ca = TestCa::new();
    let server = GrpcRegistry::start(GrpcTransport::Tls, Some(&ca));
    server.set_release("a", "v1.0.0", "file:///srv/app.tar.gz", None);
    let port = server.addr.port();
    // The system roots do not know the test CA.
    let err = open(&format!("grpc://localhost:{port}"), &options(None))
        .latest()
        .await
        .unwrap_err();
    assert_eq!(grpc_code(&err), "UNAVAILABLE", "{err}");
    let trusted = format!("grpc://localhost:{port}?ca-cert={}", ca.cert.display());
    assert_eq!(open(&trusted, &options(None)).latest().await.unwrap().tag, "v1.0.0");

    let mutual = GrpcRegistry::start(GrpcTransport::MutualTls, Some(&ca));
    mutual.set_release("b", "v2.0.0", "file:///srv/app.tar.gz", None);
    let port = mutual.addr.port();
    let without = format!("grpc://localhost:{port}?ca-cert={}", ca.cert.display());
    let err = open(&without, &options(None)).latest().await.unwrap_err();
    assert!(
        matches!(grpc_code(&err), "UNAVAILABLE" | "UNKNOWN" | "INTERNAL" | "CANCELLED"),
        "{err}"
    );
    let with = format!(
        "{without}&client-cert={}&client-key={}",
        ca.client_cert.display(),
        ca.client_key.display()
    );
    assert_eq!(open(&with, &options(None)).latest().await.unwrap().tag, "v2.0.0");
}

#[tokio::test]
async fn artifact_urls_on_s3_and_github_are_fetched_with_their_credentials() {
    use dewy_store::{Precondition, open_store};
    let server = GrpcRegistry::start(GrpcTransport::Plain, None);
    let url = format!("grpc://{}?no-tls=true", server.addr);

    // s3://REGION/BUCKET/KEY?endpoint=, signed with the host's credentials.
    let s3 = dewy_testkit::S3Server::start();
    s3.create_bucket("releases");
    let mut opts = options(None);
    opts.cloud.aws_credentials = Some(("test".into(), "test".into(), None));
    let object = format!("s3://us-east-1/releases/api/v3.0.0/api.tar.gz?endpoint={}", s3.endpoint);
    let opened = open_store(&url::Url::parse(&object).unwrap(), &opts.cloud).unwrap();
    opened
        .store
        .put("api/v3.0.0/api.tar.gz", b"from s3".to_vec(), Precondition::Any)
        .await
        .unwrap();
    server.set_release("s3", "v3.0.0", &object, None);
    let reg = open(&url, &opts);
    assert_eq!(reg.latest().await.unwrap().artifact_name, "api.tar.gz");
    assert_eq!(download(&reg).await, b"from s3");

    // Dewy's ghr://OWNER/REPO/tag/TAG/ASSET, through the API with the token.
    let gh = dewy_testkit::github::FakeGithub::start();
    gh.add_token("ghp_test");
    gh.set_private(true);
    gh.add_release("v4.0.0", &[("api_linux_amd64.tar.gz", b"from github")]);
    opts.github = GithubEnv {
        token: Some("ghp_test".into()),
        api_url: Some(gh.api_url()),
        ..GithubEnv::default()
    };
    server.set_release("gh", "v4.0.0", "ghr://o/r/tag/v4.0.0/api_linux_amd64.tar.gz", None);
    let reg = open(&url, &opts);
    assert_eq!(download(&reg).await, b"from github");
    // A release without the asset is not found, naming it.
    server.set_release("gh", "v4.0.0", "ghr://o/r/tag/v4.0.0/missing.tar.gz", None);
    let release = reg.latest().await.unwrap();
    let err = reg.artifact_request(&release).await.unwrap_err();
    assert!(err.to_string().contains("missing.tar.gz"), "{err}");

    // A scheme dewy cannot download is named.
    server.set_release("x", "v5.0.0", "ftp://files/app.tar.gz", None);
    let release = reg.latest().await.unwrap();
    let err = reg.artifact_request(&release).await.unwrap_err();
    assert!(err.to_string().contains("ftp://files/app.tar.gz"), "{err}");
}
