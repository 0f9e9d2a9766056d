//! `img://` against Debian's docker-registry, with images built offline and
//! pushed by podman.

use dewy_registry::{Error, OpenOptions, Registry};
use dewy_testkit::ImageRegistry;

fn open(url: &str) -> std::sync::Arc<dyn Registry> {
    dewy_registry::open(url, &OpenOptions::default()).unwrap_or_else(|e| panic!("{url}: {e}"))
}

#[tokio::test]
async fn tags_versions_and_digests_from_a_real_registry() {
    let registry = ImageRegistry::start();
    let repo = "acme/web";
    registry.push_web_image(repo, "v1.0.0", "v1.0.0", None);
    let d11 = registry.push_web_image(repo, "v1.1.0", "v1.1.0", None);
    let rc = registry.push_web_image(repo, "v2.0.0-rc.1", "rc", None);
    registry.push_web_image(repo, "latest", "latest", None);

    let reg = open(&format!("img://{}/{repo}", registry.host));
    let release = reg.latest().await.unwrap();
    assert_eq!(release.tag, "v1.1.0");
    assert_eq!(release.id, d11);
    assert_eq!(release.artifact_url, format!("{}/{repo}@{d11}", registry.host));
    assert_eq!(release.artifact_name, "web");

    let pre = open(&format!("img://{}/{repo}?pre-release=true", registry.host));
    assert_eq!(pre.latest().await.unwrap().id, rc);

    // The same tag pushed again with other content: a new digest, so a
    // new release.
    let again = registry.push_web_image(repo, "v1.1.0", "v1.1.0 rebuilt", None);
    assert_ne!(again, d11);
    assert_eq!(reg.latest().await.unwrap().id, again);

    // A repository that does not exist: the registry's error, named.
    let err = open(&format!("img://{}/acme/none", registry.host))
        .latest()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Api { status: 404, .. }), "{err}");
    assert!(err.to_string().contains("NAME_UNKNOWN"), "{err}");

    // A registry that is down: a transient transport error.
    let port = dewy_testkit::free_port();
    let err = open(&format!("img://127.0.0.1:{port}/acme/web"))
        .latest()
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
}

fn open_with(url: &str, oci: dewy_registry::OciEnv) -> std::sync::Arc<dyn Registry> {
    let opts = OpenOptions {
        oci,
        ..OpenOptions::default()
    };
    dewy_registry::open(url, &opts).unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Token auth as Docker Hub and ghcr.io speak it, in front of the real
/// registry: credentials from DOCKER_USERNAME/DOCKER_PASSWORD or from a
/// Docker config.json, refused credentials and none named in the error.
#[tokio::test]
async fn token_auth_with_each_kind_of_credentials() {
    use dewy_testkit::{GateMode, RegistryGate};
    let registry = ImageRegistry::start();
    let digest = registry.push_web_image("acme/web", "v1.0.0", "v1.0.0", None);
    let gate = RegistryGate::start(
        &registry.host,
        GateMode::Token {
            user: "deployer".into(),
            password: "s3cret".into(),
        },
    );
    let url = format!("img://{}/acme/web", gate.host);
    let env = |user: &str, password: &str| dewy_registry::OciEnv {
        username: Some(user.into()),
        password: Some(password.into()),
        ..Default::default()
    };

    let release = open_with(&url, env("deployer", "s3cret")).latest().await.unwrap();
    assert_eq!(release.id, digest);
    assert_eq!(gate.tokens_issued(), 1);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "deployer:s3cret");
    std::fs::write(
        &config,
        format!(r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#, gate.host),
    )
    .unwrap();
    let from_file = dewy_registry::OciEnv {
        auth_files: vec![dir.path().join("missing.json"), config],
        ..Default::default()
    };
    assert_eq!(open_with(&url, from_file).latest().await.unwrap().id, digest);

    let err = open_with(&url, env("deployer", "wrong")).latest().await.unwrap_err();
    assert!(matches!(err, Error::Api { status: 401, .. }), "{err}");
    assert!(err.to_string().contains("credentials were refused"), "{err}");
    assert!(
        !err.to_string().contains("wrong"),
        "the password is not in the error: {err}"
    );

    let err = open(&url).latest().await.unwrap_err();
    assert!(err.to_string().contains("DOCKER_USERNAME"), "{err}");
    assert!(err.to_string().contains(&gate.host), "the registry is named: {err}");
}

/// A registry that answers a manifest request with something that is not
/// a manifest: an error naming the tag, no release.
#[tokio::test]
async fn a_malformed_manifest_is_an_error_naming_the_tag() {
    use dewy_testkit::{GateMode, RegistryGate};
    let registry = ImageRegistry::start();
    registry.push_web_image("acme/web", "v1.0.0", "v1.0.0", None);
    let gate = RegistryGate::start(&registry.host, GateMode::MalformedManifest);
    let err = open(&format!("img://{}/acme/web", gate.host))
        .latest()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("the manifest of `v1.0.0` is not JSON"),
        "{err}"
    );
    assert!(!err.is_transient(), "{err}");
}
