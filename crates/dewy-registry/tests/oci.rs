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
