//! Store errors as people read them, against moto checking credentials as
//! AWS does and fake-gcs-server: one line each, under 300 characters, with
//! the service's code, and never a key id or a secret.

use dewy_store::{CloudOptions, ObjectStore, open_store};
use dewy_testkit::{GcsServer, S3Server};

fn s3(endpoint: &str, bucket: &str, key: (&str, &str)) -> std::sync::Arc<dyn ObjectStore> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let url = url::Url::parse(&format!("s3://us-east-1/{bucket}/p?endpoint={endpoint}")).unwrap();
    let options = CloudOptions {
        aws_credentials: Some((key.0.to_owned(), key.1.to_owned(), None)),
        ..Default::default()
    };
    open_store(&url, &options).unwrap().store
}

/// Every operation's error is one short line holding `code` and none of
/// `secrets`.
async fn assert_readable(store: &dyn ObjectStore, code: &str, secrets: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let errors = [
        store.get("p/current").await.map(|_| ()).unwrap_err(),
        store.list("p/", true).await.map(|_| ()).unwrap_err(),
        store.upload("p/a", &file).await.unwrap_err(),
        store.download("p/a", &file).await.map(|_| ()).unwrap_err(),
        store
            .put("p/b", b"x".to_vec(), dewy_store::Precondition::Absent)
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for err in errors {
        let line = err.to_string();
        assert!(line.contains(code), "{code} missing: {line}");
        assert!(line.len() < 300 && !line.contains('\n'), "one short line: {line}");
        for secret in secrets {
            assert!(!line.contains(secret), "a credential leaked: {line}");
        }
        assert!(
            !line.contains("ServiceError") && !line.contains("raw:"),
            "SDK Debug output: {line}"
        );
    }
}

#[tokio::test]
async fn s3_missing_bucket_access_denied_and_wrong_keys_are_one_line_each() {
    let (server, user) = S3Server::start_with_auth("dewy-bucket");
    let denied = s3(&server.endpoint, "dewy-bucket", (&user.key_id, &user.secret));
    assert_readable(&*denied, "AccessDenied", &[&user.key_id, &user.secret]).await;
    let wrong = s3(
        &server.endpoint,
        "dewy-bucket",
        ("AKIAWRONGKEY0000TEST", "wrong-secret-value"),
    );
    assert_readable(
        &*wrong,
        "InvalidAccessKeyId",
        &["AKIAWRONGKEY0000TEST", "wrong-secret-value"],
    )
    .await;

    let open = S3Server::start();
    let missing = s3(
        &open.endpoint,
        "no-such-bucket",
        ("AKIAOPENKEY00000TEST", "open-secret-value"),
    );
    assert_readable(
        &*missing,
        "NoSuchBucket",
        &["AKIAOPENKEY00000TEST", "open-secret-value"],
    )
    .await;
    let line = missing.list("p/", true).await.unwrap_err().to_string();
    assert!(
        line.contains("s3://us-east-1/no-such-bucket") && line.contains("request id"),
        "{line}"
    );
}

#[tokio::test]
async fn gcs_missing_bucket_is_one_line() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = GcsServer::start();
    let options = CloudOptions {
        gcs_emulator: Some(server.endpoint.clone()),
        ..Default::default()
    };
    let store = open_store(&url::Url::parse("gs://no-such-bucket/p").unwrap(), &options)
        .unwrap()
        .store;
    assert_readable(&*store, "404", &[]).await;
    let line = store.get("p/current").await.unwrap_err().to_string();
    assert!(
        line.contains("gs://no-such-bucket") && line.contains("the bucket does not exist"),
        "{line}"
    );
    // An absent object in a bucket that exists is no error.
    server.create_bucket("no-such-bucket");
    assert_eq!(store.get("p/current").await.unwrap(), None);
}

#[tokio::test]
async fn gcs_retries_transient_answers_as_s3_does() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = GcsServer::start();
    server.create_bucket("flaky");
    let store = |endpoint: &str| {
        let options = CloudOptions {
            gcs_emulator: Some(endpoint.to_owned()),
            ..Default::default()
        };
        open_store(&url::Url::parse("gs://flaky/p").unwrap(), &options)
            .unwrap()
            .store
    };
    // 503 then 429, then the server: the write and the listing succeed.
    let proxy = dewy_testkit::FlakyProxy::start(&server.endpoint, vec![503, 429]);
    let flaky = store(&proxy.endpoint);
    flaky
        .put("p/a", b"x".to_vec(), dewy_store::Precondition::Absent)
        .await
        .unwrap();
    assert!(proxy.connections() >= 3, "two failures, then through");
    let listing = flaky.list("p/", false).await.unwrap();
    assert_eq!(listing.objects.len(), 1);
    // A failure that lasts ends in an error naming it, after the retries.
    let down = dewy_testkit::FlakyProxy::start(&server.endpoint, vec![503; 10]);
    let err = store(&down.endpoint).list("p/", true).await.unwrap_err().to_string();
    assert!(err.contains("503") && err.contains("gs://flaky"), "{err}");
    assert_eq!(down.connections(), 4, "four attempts");
}
