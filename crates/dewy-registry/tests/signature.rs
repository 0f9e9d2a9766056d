//! Publisher signatures on the file registry, with files signed by Debian's
//! `minisign` tool as a publisher's CI would sign them.

use std::path::Path;

use dewy_registry::{
    Downloader, Error, NoProgress, OpenOptions, Platform, Registry, SignatureCheck, SignatureError, TrustedKeys,
};
use dewy_testkit::MinisignKey;

const ART: &str = "app_linux_amd64.tar.gz";

fn linux() -> OpenOptions {
    OpenOptions {
        platform: Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            libc: Some("gnu".into()),
        },
        ..OpenOptions::default()
    }
}

/// Publishes `data` as the artifact of `tag`, signed by `key` when given.
fn publish(root: &Path, tag: &str, data: &[u8], key: Option<&MinisignKey>) -> std::path::PathBuf {
    let dir = root.join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(ART);
    std::fs::write(&file, data).unwrap();
    if let Some(key) = key {
        key.sign(&file, &format!("app {tag}"), false);
    }
    file
}

struct Host {
    registry: std::sync::Arc<dyn Registry>,
    downloader: Downloader,
    staging: tempfile::TempDir,
}

impl Host {
    fn new(root: &Path) -> Self {
        Self {
            registry: dewy_registry::open(&format!("file://{}", root.display()), &linux()).unwrap(),
            downloader: Downloader::new(Default::default()).unwrap(),
            staging: tempfile::tempdir().unwrap(),
        }
    }

    /// What dewy does with keys: the signature first, then the download
    /// verified against it. Returns the check on success.
    async fn fetch(&self, keys: &TrustedKeys) -> Result<SignatureCheck, Error> {
        let release = self.registry.latest().await?;
        assert_eq!(release.artifact_name, ART, "the .minisig is never the artifact");
        let check = self.downloader.signature(&*self.registry, &release, keys).await?;
        let request = self.registry.artifact_request(&release).await?;
        let result = self
            .downloader
            .fetch_verified(&request, None, Some(&check), self.staging.path(), &NoProgress)
            .await;
        let left = std::fs::read_dir(self.staging.path()).unwrap().count();
        match result {
            Ok(d) => {
                drop(d);
                Ok(check)
            }
            Err(e) => {
                assert_eq!(left, 0, "a refused download leaves nothing in staging");
                Err(e)
            }
        }
    }
}

fn keys(list: &[&MinisignKey]) -> TrustedKeys {
    TrustedKeys::parse(&list.iter().map(|k| k.public.clone()).collect::<Vec<_>>()).unwrap()
}

fn signature_error(result: Result<SignatureCheck, Error>) -> SignatureError {
    match result {
        Err(Error::Signature { source, .. }) => source,
        other => panic!("expected a signature error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_signed_artifact_is_verified_while_it_downloads() {
    let key = MinisignKey::generate();
    let root = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    publish(root.path(), "v1.0.0", &data, Some(&key));
    let host = Host::new(root.path());
    let release = host.registry.latest().await.unwrap();
    assert!(
        release
            .signature_url
            .as_deref()
            .is_some_and(|u| u.ends_with(&format!("/v1.0.0/{ART}.minisig"))),
        "{release:?}"
    );
    let check = host.fetch(&keys(&[&key])).await.unwrap();
    assert_eq!(check.trusted_comment(), "app v1.0.0");
    assert_eq!(check.key_id(), keys(&[&key]).ids()[0]);
    // The key as minisign writes it, given as @PATH.
    let from_file = TrustedKeys::parse(&[format!("@{}", key.public_file.display())]).unwrap();
    assert_eq!(from_file.ids(), keys(&[&key]).ids());
    host.fetch(&from_file).await.unwrap();
}

#[tokio::test]
async fn a_tampered_artifact_or_signature_is_refused() {
    let key = MinisignKey::generate();
    let root = tempfile::tempdir().unwrap();
    let file = publish(root.path(), "v1.0.0", b"the published artifact", Some(&key));
    let host = Host::new(root.path());
    let trusted = keys(&[&key]);

    // The artifact replaced after signing.
    std::fs::write(&file, b"the attacker's artifact!").unwrap();
    let err = signature_error(host.fetch(&trusted).await);
    assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");
    assert!(err.to_string().starts_with("bad signature"), "{err}");

    // The trusted comment edited: the global signature no longer matches.
    std::fs::write(&file, b"the published artifact").unwrap();
    let sig = file.with_file_name(format!("{ART}.minisig"));
    let good = std::fs::read_to_string(&sig).unwrap();
    host.fetch(&trusted).await.unwrap();
    std::fs::write(
        &sig,
        good.replace("trusted comment: app v1.0.0", "trusted comment: app v9.9.9"),
    )
    .unwrap();
    let err = signature_error(host.fetch(&trusted).await);
    assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");

    // The signature bytes flipped.
    let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
    let mut b = lines[1].clone().into_bytes();
    b[20] = if b[20] == b'A' { b'B' } else { b'A' };
    lines[1] = String::from_utf8(b).unwrap();
    std::fs::write(&sig, lines.join("\n") + "\n").unwrap();
    let err = signature_error(host.fetch(&trusted).await);
    assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");

    // Not a signature at all.
    std::fs::write(&sig, "hello\n").unwrap();
    let err = signature_error(host.fetch(&trusted).await);
    assert!(matches!(err, SignatureError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains(".minisig"), "names the file: {err}");
}

#[tokio::test]
async fn unknown_keys_missing_and_legacy_signatures_are_refused() {
    let (publisher, stranger) = (MinisignKey::generate(), MinisignKey::generate());
    let root = tempfile::tempdir().unwrap();
    publish(root.path(), "v1.0.0", b"artifact", Some(&publisher));
    let host = Host::new(root.path());

    let err = signature_error(host.fetch(&keys(&[&stranger])).await);
    let SignatureError::UnknownKey { key_id, trusted, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*key_id, keys(&[&publisher]).ids()[0]);
    assert_eq!(*trusted, keys(&[&stranger]).ids());
    assert!(err.to_string().contains(&key_id.to_string()), "{err}");

    // No signature published.
    publish(root.path(), "v1.1.0", b"unsigned", None);
    let release = host.registry.latest().await.unwrap();
    assert_eq!(release.tag, "v1.1.0");
    assert!(release.signature_url.is_none());
    let err = signature_error(host.fetch(&keys(&[&publisher])).await);
    assert!(
        matches!(&err, SignatureError::Missing { file } if file == &format!("{ART}.minisig")),
        "{err}"
    );

    // A legacy signature (the whole file signed, `minisign -l`).
    let file = publish(root.path(), "v1.2.0", b"legacy", None);
    publisher.sign(&file, "legacy", true);
    let err = signature_error(host.fetch(&keys(&[&publisher])).await);
    assert!(matches!(err, SignatureError::Legacy { .. }), "{err}");
}

#[tokio::test]
async fn two_keys_during_a_rotation() {
    let (old, new) = (MinisignKey::generate(), MinisignKey::generate());
    let root = tempfile::tempdir().unwrap();
    let host = Host::new(root.path());
    let both = keys(&[&old, &new]);
    publish(root.path(), "v1.0.0", b"signed by the old key", Some(&old));
    assert_eq!(host.fetch(&both).await.unwrap().key_id(), keys(&[&old]).ids()[0]);
    publish(root.path(), "v1.1.0", b"signed by the new key", Some(&new));
    assert_eq!(host.fetch(&both).await.unwrap().key_id(), keys(&[&new]).ids()[0]);
    // Once the old key is retired, its signatures are refused.
    publish(root.path(), "v1.2.0", b"signed by the old key again", Some(&old));
    let err = signature_error(host.fetch(&keys(&[&new])).await);
    assert!(matches!(err, SignatureError::UnknownKey { .. }), "{err}");
}

#[test]
fn keys_that_cannot_be_used_are_named() {
    let err = TrustedKeys::parse(&["RWQnot-a-key"]).unwrap_err();
    assert_eq!(err.key, "RWQnot-a-key");
    let err = TrustedKeys::parse(&["@/nonexistent/k.pub"]).unwrap_err();
    assert!(err.reason.contains("/nonexistent/k.pub"), "{err}");
    assert!(TrustedKeys::parse::<&str>(&[]).unwrap().is_empty());
}

#[tokio::test]
async fn a_cached_copy_is_verified_by_reading_it_once() {
    let key = MinisignKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("registry");
    let file = publish(&root, "v1.0.0", b"cached artifact", Some(&key));
    let host = Host::new(&root);
    let release = host.registry.latest().await.unwrap();
    let check = host
        .downloader
        .signature(&*host.registry, &release, &keys(&[&key]))
        .await
        .unwrap();
    check.verify_file(&file).unwrap();
    std::fs::write(&file, b"cached artifact, replaced").unwrap();
    assert!(matches!(check.verify_file(&file), Err(SignatureError::Invalid { .. })));
}
