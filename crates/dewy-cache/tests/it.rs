//! Integration tests of the file cache: atomicity across killed and
//! concurrent processes, key validation, eviction, fallback.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dewy_cache::{Cache, FileCache, Key};

const HELPER_ENV: &str = "DEWY_CACHE_TEST_HELPER";

/// Re-runs this test binary as a helper process that writes to a cache.
fn helper(mode: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "helper_process", "--nocapture"])
        .env(HELPER_ENV, mode)
        .env("DEWY_CACHE_TEST_DIR", dir);
    cmd
}

/// Not a test of its own: the body of the helper processes above. Without
/// the variable it returns at once.
#[test]
fn helper_process() {
    let Ok(mode) = std::env::var(HELPER_ENV) else { return };
    let dir = std::env::var("DEWY_CACHE_TEST_DIR").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cache = FileCache::open(&dir).unwrap();
        let key = Key::new("value").unwrap();
        let fill = mode.as_bytes()[0];
        // Each value is 4 MiB of one byte, so a torn write is visible.
        for _ in 0..200 {
            cache.write(&key, &vec![fill; 4 << 20]).await.unwrap();
        }
    });
}

fn assert_whole(data: &[u8]) {
    assert_eq!(data.len(), 4 << 20, "torn value of {} bytes", data.len());
    assert!(data.iter().all(|b| *b == data[0]), "value mixes two writers");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_from_two_processes_never_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = helper("a", dir.path()).spawn().unwrap();
    let mut b = helper("b", dir.path()).spawn().unwrap();
    let cache = FileCache::open(dir.path()).unwrap();
    let key = Key::new("value").unwrap();
    let mut seen = 0;
    while a.try_wait().unwrap().is_none() || b.try_wait().unwrap().is_none() {
        if let Some(v) = cache.read(&key).await.unwrap() {
            assert_whole(&v);
            seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    assert_whole(&cache.read(&key).await.unwrap().unwrap());
    assert!(seen > 0);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_killed_midway_leaves_the_old_or_new_value() {
    let dir = tempfile::tempdir().unwrap();
    let cache = FileCache::open(dir.path()).unwrap();
    let key = Key::new("value").unwrap();
    cache.write(&key, &vec![b'o'; 4 << 20]).await.unwrap();
    for delay in [1u64, 7, 20, 45] {
        let mut child = helper("n", dir.path()).spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        let v = cache.read(&key).await.unwrap().unwrap();
        assert_whole(&v);
        assert!(v[0] == b'o' || v[0] == b'n');
    }
    // Killed writers may leave temporary files, never a listed key.
    let keys: Vec<_> = cache
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key.to_string())
        .collect();
    assert_eq!(keys, vec!["value".to_owned()]);
}

#[tokio::test]
async fn put_file_moves_a_complete_file_and_failure_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let cache = FileCache::open(dir.path()).unwrap();
    let key = Key::artifact("v1.0.0", "app.tar.gz").unwrap();
    let src = cache.staging_dir().join("download");
    std::fs::write(&src, b"artifact v1").unwrap();
    cache.put_file(&key, &src).await.unwrap();
    assert!(!src.exists());
    let path = cache.local_path(&key).await.unwrap().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"artifact v1");
    // A failed put (the source vanished) leaves the old value.
    assert!(
        cache
            .put_file(&key, &cache.staging_dir().join("missing"))
            .await
            .is_err()
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"artifact v1");
    assert_eq!(cache.local_path(&Key::new("other").unwrap()).await.unwrap(), None);
    assert_eq!(cache.read(&Key::current()).await.unwrap(), None);
}

#[tokio::test]
async fn eviction_keeps_the_newest_and_the_protected() {
    let dir = tempfile::tempdir().unwrap();
    let cache = FileCache::open(dir.path()).unwrap();
    let keys: Vec<Key> = (1..=9)
        .map(|i| Key::artifact(&format!("v1.0.{i}"), "app.tar.gz").unwrap())
        .collect();
    for (i, key) in keys.iter().enumerate() {
        cache.write(key, b"x").await.unwrap();
        let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i as u64 * 60);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join(key.as_str()))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    cache.write(&Key::current(), keys[0].as_str().as_bytes()).await.unwrap();
    let removed = cache.evict(3, &[keys[0].clone()]).await.unwrap();
    let mut removed: Vec<String> = removed.iter().map(ToString::to_string).collect();
    removed.sort();
    let want: Vec<String> = keys[1..6].iter().map(ToString::to_string).collect();
    assert_eq!(removed, want);
    let left: Vec<String> = cache
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key.to_string())
        .collect();
    assert_eq!(
        left,
        vec![
            "current",
            "v1.0.1--app.tar.gz",
            "v1.0.7--app.tar.gz",
            "v1.0.8--app.tar.gz",
            "v1.0.9--app.tar.gz"
        ]
    );
}

#[tokio::test]
async fn fallback_folder_when_the_preferred_one_cannot_be_created() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let opened = FileCache::open_or_fallback(blocker.join("cache")).unwrap();
    let (from, _err) = opened.fallback_from.expect("fell back");
    assert_eq!(from, blocker.join("cache"));
    assert!(opened.cache.dir().starts_with(std::env::temp_dir()));
    opened.cache.write(&Key::current(), b"x").await.unwrap();
    std::fs::remove_dir_all(opened.cache.dir()).unwrap();

    let ok = FileCache::open_or_fallback(dir.path().join("c")).unwrap();
    assert!(ok.fallback_from.is_none());
}

#[test]
fn keys_cannot_leave_the_cache() {
    for bad in ["../x", "/abs", "a\0b", "..", "sub/../../x"] {
        assert!(Key::new(bad).is_err(), "{bad:?}");
    }
}
