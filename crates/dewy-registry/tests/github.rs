//! `ghr://` against the fake GitHub of dewy-testkit: what dewy chooses, and
//! the requests it made to get there (counts, headers, validators).

use std::time::Duration;

use dewy_registry::{Downloader, Error, GithubEnv, OpenOptions, Platform, Registry, Report};
use dewy_testkit::github::{FakeGithub, app_key_pair};

const ART: &str = "app_linux_amd64.tar.gz";

fn options(gh: &FakeGithub, token: Option<&str>) -> OpenOptions {
    OpenOptions {
        platform: Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            libc: Some("gnu".into()),
        },
        github: GithubEnv {
            token: token.map(str::to_owned),
            api_url: Some(gh.api_url()),
            ..GithubEnv::default()
        },
        ..OpenOptions::default()
    }
}

fn open(url: &str, opts: &OpenOptions) -> std::sync::Arc<dyn Registry> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    dewy_registry::open(url, opts).unwrap()
}

fn counted(gh: &FakeGithub) -> usize {
    gh.requests().iter().filter(|r| r.counted()).count()
}

#[tokio::test]
async fn unchanged_releases_cost_nothing_against_the_rate_limit() {
    let gh = FakeGithub::start();
    gh.add_token("ghp_test");
    gh.add_release("v1.0.0", &[(ART, b"one")]);
    gh.add_release("v1.1.0", &[(ART, b"one-one"), ("checksums.txt", b"x")]);
    gh.add_release("v2.0.0-rc.1", &[(ART, b"rc")]);
    gh.add_release_with("v3.0.0", true, false, &[(ART, b"draft")]);
    gh.add_release_with("v2.5.0", false, true, &[(ART, b"flagged pre-release")]);
    let reg = open("ghr://o/r", &options(&gh, Some("ghp_test")));

    let first = reg.latest().await.unwrap();
    assert_eq!(
        first.tag, "v1.1.0",
        "drafts, pre-release tags and flagged pre-releases are skipped"
    );
    assert_eq!(first.artifact_name, ART);
    let sum = first.checksum.clone().expect("the asset digest is the checksum");
    assert_eq!(sum.sha256, hex_sha256(b"one-one"));
    for _ in 0..10 {
        assert_eq!(reg.latest().await.unwrap().tag, "v1.1.0");
    }
    // The release's `checksums.txt` (which does not list the artifact) is
    // read once, on the first check.
    let all = gh.requests();
    let reads = all.iter().filter(|r| r.uri.contains("/releases/assets/")).count();
    assert_eq!(reads, 1, "the checksum file is read once: {all:#?}");
    let log: Vec<_> = all.into_iter().filter(|r| r.uri.contains("/releases?")).collect();
    assert_eq!(log.len(), 11, "one list request per check: {log:#?}");
    assert_eq!(
        log.iter().filter(|r| r.counted()).count(),
        1,
        "only the first answer counts: {log:#?}"
    );
    for r in &log {
        assert_eq!(r.header("authorization"), Some("Bearer ghp_test"));
        assert!(r.uri.contains("per_page=100"), "{}", r.uri);
    }
    assert!(
        log[1..]
            .iter()
            .all(|r| r.header("if-none-match").is_some() && r.status == 304)
    );
    assert_eq!(reg.stats().not_modified, 10);

    // A new release is seen on the next check, at the cost of one request.
    gh.clear_requests();
    gh.add_release("v1.2.0", &[(ART, b"one-two")]);
    assert_eq!(reg.latest().await.unwrap().tag, "v1.2.0");
    assert_eq!(counted(&gh), 1);

    // With pre-releases on, both the tag and the flag are accepted.
    let pre = open("ghr://o/r?pre-release=true", &options(&gh, Some("ghp_test")));
    assert_eq!(pre.latest().await.unwrap().tag, "v2.5.0");
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[tokio::test]
async fn every_page_is_read_when_page_one_changes_and_the_highest_version_wins() {
    let gh = FakeGithub::start();
    gh.add_token("t");
    // Published first, so it sits on the last page; then 250 lower versions,
    // the newest of which GitHub would call "latest".
    gh.add_release("v9.0.0", &[(ART, b"nine")]);
    for i in 0..250 {
        gh.add_release(&format!("v1.0.{i}"), &[(ART, b"old")]);
    }
    let reg = open("ghr://o/r", &options(&gh, Some("t")));
    assert_eq!(reg.latest().await.unwrap().tag, "v9.0.0");
    let log = gh.requests();
    assert_eq!(log.len(), 3, "three pages of 100: {log:#?}");
    assert!(log[1].uri.starts_with("/repositories/1/releases") && log[1].uri.contains("page=2"));
    assert!(
        log.iter().all(|r| r.header("authorization") == Some("Bearer t")),
        "every page is authenticated"
    );
    gh.clear_requests();
    // Page one unchanged: one 304 and the cached later pages.
    assert_eq!(reg.latest().await.unwrap().tag, "v9.0.0");
    assert_eq!(gh.requests().len(), 1);
    assert_eq!(counted(&gh), 0);
}

#[tokio::test]
async fn rate_limits_stop_requests_until_the_reset() {
    let gh = FakeGithub::start();
    gh.add_release("v1.0.0", &[(ART, b"one")]);
    // Primary limit: the budget is already spent.
    gh.set_rate_limit(0, Duration::from_secs(120));
    let reg = open("ghr://o/r", &options(&gh, None));
    let err = reg.latest().await.unwrap_err();
    let Error::RateLimited { retry_at, .. } = &err else {
        panic!("{err}")
    };
    let wait = retry_at.duration_since(jiff::Timestamp::now()).as_secs();
    assert!(
        (100..=121).contains(&wait),
        "next attempt at the reset time, not {wait}s"
    );
    assert!(err.to_string().contains("next attempt at"), "{err}");
    for _ in 0..5 {
        assert!(matches!(reg.latest().await, Err(Error::RateLimited { .. })));
    }
    assert_eq!(gh.requests().len(), 1, "no request is sent before the reset");
    assert_eq!(reg.stats().rate_limited, 1);

    // A budget that runs out on a successful answer also stops requests.
    let gh = FakeGithub::start();
    gh.add_release("v1.0.0", &[(ART, b"one")]);
    gh.set_rate_limit(1, Duration::from_secs(120));
    let reg = open("ghr://o/r", &options(&gh, None));
    assert_eq!(reg.latest().await.unwrap().tag, "v1.0.0");
    assert!(matches!(reg.latest().await, Err(Error::RateLimited { .. })));
    assert_eq!(gh.requests().len(), 1);

    // Secondary limit: 429 with Retry-After is honoured, then polling resumes.
    let gh = FakeGithub::start();
    gh.add_release("v1.0.0", &[(ART, b"one")]);
    gh.secondary_limit(1, 2);
    let reg = open("ghr://o/r", &options(&gh, None));
    let err = reg.latest().await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err}");
    assert!(matches!(reg.latest().await, Err(Error::RateLimited { .. })));
    assert_eq!(gh.requests().len(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(reg.latest().await.unwrap().tag, "v1.0.0");
    assert_eq!(gh.requests().len(), 2);
}

#[tokio::test]
async fn assets_download_through_the_redirect_without_the_token() {
    let gh = FakeGithub::start();
    gh.add_token("ghp_secret");
    gh.set_private(true);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    gh.add_release("v1.0.0", &[(ART, &data), ("app_darwin_arm64.tar.gz", b"mac")]);
    let reg = open("ghr://o/r", &options(&gh, Some("ghp_secret")));
    let release = reg.latest().await.unwrap();
    let request = reg.artifact_request(&release).await.unwrap();
    assert!(!format!("{request:?}").contains("ghp_secret"), "{request:?}");
    let staging = tempfile::tempdir().unwrap();
    let got = Downloader::new(Default::default())
        .unwrap()
        .fetch_request(
            &request,
            release.checksum.as_ref(),
            staging.path(),
            &dewy_registry::NoProgress,
        )
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    let log = gh.requests();
    let asset = log.iter().find(|r| r.uri.contains("/releases/assets/")).unwrap();
    assert_eq!(asset.status, 302);
    assert_eq!(asset.header("accept"), Some("application/octet-stream"));
    assert_eq!(asset.header("authorization"), Some("Bearer ghp_secret"));
    let storage = log.iter().find(|r| r.host == "storage").expect("redirect followed");
    assert_eq!(storage.status, 200);
    assert_eq!(
        storage.header("authorization"),
        None,
        "the token must not reach the storage host"
    );
}

#[tokio::test]
async fn missing_or_rejected_credentials_are_clear_errors() {
    let gh = FakeGithub::start();
    gh.add_token("good");
    gh.set_private(true);
    gh.add_release("v1.0.0", &[(ART, b"one")]);
    let err = open("ghr://o/r", &options(&gh, None))
        .latest()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("404") && err.contains("GH_TOKEN"), "{err}");
    let err = open("ghr://o/r", &options(&gh, Some("bad")))
        .latest()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("401") && err.contains("refused the credentials"), "{err}");
    assert!(!err.contains("bad"), "the token is not echoed: {err}");
    // With the API down, the error says what failed: the API, not a download.
    let reg = open("ghr://o/r", &options(&gh, Some("good")));
    drop(gh);
    let err = reg.latest().await.unwrap_err().to_string();
    assert!(err.contains("GitHub API request for `ghr://o/r` failed"), "{err}");
}

#[tokio::test]
async fn a_release_whose_asset_comes_later_is_not_found_then_chosen() {
    let gh = FakeGithub::start();
    gh.add_release("v1.0.0", &[(ART, b"one")]);
    gh.add_release("v1.1.0", &[]);
    let reg = open("ghr://o/r", &options(&gh, None));
    match reg.latest().await {
        Err(Error::ArtifactNotFound { tag, published_at, .. }) => {
            assert_eq!(tag, "v1.1.0");
            assert!(published_at.is_some(), "the publish time drives the grace period");
        }
        other => panic!("{other:?}"),
    }
    let fallback = reg.latest_complete_before("v1.1.0").await.unwrap().expect("v1.0.0");
    assert_eq!(fallback.tag, "v1.0.0");
    assert_eq!(fallback.artifact_name, ART);
    gh.add_asset("v1.1.0", ART, b"one-one", false);
    let release = reg.latest().await.unwrap();
    assert_eq!(release.tag, "v1.1.0");
    assert!(release.checksum.is_none(), "no digest, no checksum");
}

#[tokio::test]
async fn github_app_tokens_are_exchanged_and_refreshed_before_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = app_key_pair(dir.path());
    let gh = FakeGithub::start();
    gh.set_private(true);
    gh.add_release("v1.0.0", &[(ART, b"one")]);
    gh.set_app(12, 34, &public, Duration::from_secs(3600));
    let mut opts = options(&gh, Some("ignored-when-an-app-is-set"));
    opts.github.app_id = Some("12".into());
    opts.github.app_installation_id = Some("34".into());
    let key_path = dir.path().join("app.pem");
    std::fs::write(&key_path, &private).unwrap();
    opts.github.app_private_key_path = Some(key_path.display().to_string());
    let reg = open("ghr://o/r", &opts);
    assert_eq!(reg.latest().await.unwrap().tag, "v1.0.0");
    assert_eq!(reg.latest().await.unwrap().tag, "v1.0.0");
    assert_eq!(gh.app_tokens_issued(), 1, "a valid token is reused");
    let list = gh
        .requests()
        .into_iter()
        .filter(|r| r.uri.contains("/releases"))
        .collect::<Vec<_>>();
    assert!(
        list.iter()
            .all(|r| r.header("authorization") == Some("Bearer ghs_fake34_1")),
        "{list:#?}"
    );

    // Tokens that expire within the refresh margin are replaced before use.
    gh.set_app(12, 34, &public, Duration::from_secs(120));
    let mut inline = opts.clone();
    inline.github.app_private_key_path = None;
    inline.github.app_private_key = Some(String::from_utf8(private.clone()).unwrap());
    let reg = open("ghr://o/r", &inline);
    reg.latest().await.unwrap();
    reg.latest().await.unwrap();
    assert_eq!(gh.app_tokens_issued(), 2);

    // A wrong App id is refused by GitHub and reported as such.
    let mut wrong = opts.clone();
    wrong.github.app_id = Some("99".into());
    let err = open("ghr://o/r", &wrong).latest().await.unwrap_err().to_string();
    assert!(err.contains("GitHub App 99") && err.contains("401"), "{err}");
}

#[tokio::test]
async fn deployments_are_the_audit_trail() {
    let gh = FakeGithub::start();
    gh.add_token("t");
    gh.add_release("v1.0.0", &[(ART, b"one")]);
    let reg = open("ghr://o/r", &options(&gh, Some("t")));
    for error in [None, Some("before deploy hook failed".to_owned())] {
        reg.report(&Report {
            release_id: "1".into(),
            tag: "v1.0.0".into(),
            command: "server".into(),
            hostname: "web-1".into(),
            at: jiff::Timestamp::now(),
            error,
        })
        .await
        .unwrap();
    }
    let deployments = gh.deployments();
    assert_eq!(deployments.len(), 2);
    assert_eq!(deployments[0]["ref"], "v1.0.0");
    assert_eq!(deployments[0]["payload"]["hostname"], "web-1");
    let states: Vec<_> = gh.deployment_statuses().iter().map(|s| s["state"].clone()).collect();
    assert_eq!(states, ["success", "failure"]);

    // GitHub down while recording: the deploy is not failed by it, and an
    // HTML error page never reaches a message.
    gh.fail_next(1000, 502);
    let report = Report {
        release_id: "1".into(),
        tag: "v1.0.0".into(),
        command: "server".into(),
        hostname: "web-1".into(),
        at: jiff::Timestamp::now(),
        error: None,
    };
    reg.report(&report).await.unwrap();
    reg.report(&report).await.unwrap();
    let err = open("ghr://o/r", &options(&gh, Some("t")))
        .latest()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("502") && err.contains("Bad Gateway") && !err.contains('<'),
        "{err}"
    );
    gh.fail_next(0, 502);
    reg.report(&report).await.unwrap();
    assert_eq!(gh.deployments().len(), 3, "recorded again once GitHub answers");
}

/// A publisher's `SHA256SUMS` asset is verified with and without GitHub's
/// own `digest`: a disagreement refuses the release.
#[tokio::test]
async fn published_checksum_files_are_verified_with_and_without_a_digest() {
    let gh = FakeGithub::start();
    let data = b"the artifact".to_vec();
    let good = format!("{}  {ART}\n", hex_sha256(&data));
    let bad = format!("{}  {ART}\n", "0".repeat(64));
    let staging = tempfile::tempdir().unwrap();
    let fetch = |reg: std::sync::Arc<dyn Registry>, release: dewy_registry::Release| {
        let dir = staging.path().to_path_buf();
        async move {
            let request = reg.artifact_request(&release).await.unwrap();
            Downloader::new(Default::default())
                .unwrap()
                .fetch_request(&request, release.checksum.as_ref(), &dir, &dewy_registry::NoProgress)
                .await
        }
    };

    // With GitHub's digest: the disagreeing file refuses the release at once.
    gh.add_release("v1.0.0", &[(ART, &data), ("SHA256SUMS", bad.as_bytes())]);
    let reg = open("ghr://o/r", &options(&gh, None));
    let err = reg.latest().await.unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains("SHA256SUMS"), "{err}");

    // Without a digest (older GitHub Enterprise): the file alone is checked.
    gh.add_release("v1.1.0", &[]);
    gh.add_asset("v1.1.0", ART, &data, false);
    gh.add_asset("v1.1.0", "SHA256SUMS", bad.as_bytes(), false);
    let reg = open("ghr://o/r", &options(&gh, None));
    let release = reg.latest().await.unwrap();
    assert_eq!(release.checksum.as_ref().unwrap().source, "SHA256SUMS");
    let err = fetch(reg.clone(), release).await.unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");

    // A matching file, without a digest: verified and downloaded; the file
    // is read once, not on every check.
    gh.add_release("v1.2.0", &[]);
    gh.add_asset("v1.2.0", ART, &data, false);
    gh.add_asset("v1.2.0", "SHA256SUMS", good.as_bytes(), false);
    let reg = open("ghr://o/r", &options(&gh, None));
    let release = reg.latest().await.unwrap();
    assert_eq!(release.checksum.as_ref().unwrap().sha256, hex_sha256(&data));
    fetch(reg.clone(), release).await.unwrap();
    gh.clear_requests();
    reg.latest().await.unwrap();
    assert!(
        !gh.requests().iter().any(|r| r.uri.contains("/releases/assets/")),
        "checksum file read again"
    );
}

#[tokio::test]
async fn signatures_are_release_assets_fetched_with_the_token() {
    use dewy_registry::{SignatureError, TrustedKeys};
    use dewy_testkit::MinisignKey;
    let (key, stranger) = (MinisignKey::generate(), MinisignKey::generate());
    let trusted = TrustedKeys::parse(&[key.public.as_str()]).unwrap();
    let gh = FakeGithub::start();
    gh.add_token("ghp_test");
    gh.set_private(true);
    let reg = open("ghr://o/r", &options(&gh, Some("ghp_test")));
    let downloader = Downloader::new(Default::default()).unwrap();
    let staging = tempfile::tempdir().unwrap();
    let sig = format!("{ART}.minisig");
    let fetch = |release: dewy_registry::Release| {
        let (reg, downloader, trusted, dir) = (
            reg.clone(),
            downloader.clone(),
            trusted.clone(),
            staging.path().to_path_buf(),
        );
        async move {
            let check = downloader.signature(&*reg, &release, &trusted).await?;
            let request = reg.artifact_request(&release).await?;
            downloader
                .fetch_verified(
                    &request,
                    release.checksum.as_ref(),
                    Some(&check),
                    &dir,
                    &dewy_registry::NoProgress,
                )
                .await
                .map(|_| check)
        }
    };
    let refusal = |r: Result<_, Error>| match r {
        Err(Error::Signature { source, .. }) => source,
        other => panic!("expected a refused signature, got {other:?}"),
    };

    // Signed: the .minisig asset is found (never taken for the artifact)
    // and downloaded through the asset API with the token.
    let data = b"signed artifact".to_vec();
    gh.add_release("v1.0.0", &[(ART, &data), (&sig, &key.signature_of(&data, "ci run 42"))]);
    let release = reg.latest().await.unwrap();
    assert_eq!(release.artifact_name, ART);
    assert!(release.signature_url.is_some(), "{release:?}");
    gh.clear_requests();
    let check = fetch(release).await.unwrap();
    assert_eq!(check.trusted_comment(), "ci run 42");
    let sig_reads: Vec<_> = gh
        .requests()
        .into_iter()
        .filter(|r| r.uri.contains("/releases/assets/"))
        .collect();
    assert_eq!(sig_reads.len(), 2, "the signature, then the artifact: {sig_reads:#?}");
    assert!(
        sig_reads
            .iter()
            .all(|r| r.header("authorization") == Some("Bearer ghp_test"))
    );

    // The artifact replaced after signing.
    gh.add_release("v1.1.0", &[(ART, b"replaced"), (&sig, &key.signature_of(&data, "ci"))]);
    let err = refusal(fetch(reg.latest().await.unwrap()).await);
    assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");
    // Signed by a key nobody trusts.
    gh.add_release("v1.2.0", &[(ART, &data), (&sig, &stranger.signature_of(&data, "ci"))]);
    let err = refusal(fetch(reg.latest().await.unwrap()).await);
    assert!(matches!(err, SignatureError::UnknownKey { .. }), "{err}");
    // No signature asset.
    gh.add_release("v1.3.0", &[(ART, &data)]);
    let err = refusal(fetch(reg.latest().await.unwrap()).await);
    assert!(matches!(err, SignatureError::Missing { .. }), "{err}");
}
