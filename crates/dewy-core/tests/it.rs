//! Every branch of the tick with an in-memory cache, a scripted registry and
//! a scripted supervisor; then the file registry, the file cache, real
//! archives and a real child app.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dewy_cache::{Cache, Key, MemoryCache};
use dewy_core::{Config, Deployer, Error, Mode, TickOutcome};
use dewy_notify::{Context, Notification, Notifier, Notify};
use dewy_registry::{Registry, Release};
use dewy_starter::{Event, GenerationInfo, Supervisor};

use dewy_testkit::targz;

enum Answer {
    Release(String),
    NotFound { minutes_ago: i64 },
    Fail,
}

/// A registry whose answer the test sets; artifacts are files it writes.
#[derive(Debug)]
struct Scripted {
    dir: PathBuf,
    answer: Mutex<Option<Answer>>,
    reports: AtomicU32,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Answer")
    }
}

impl Scripted {
    fn new(dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            dir: dir.to_path_buf(),
            answer: Mutex::new(None),
            reports: AtomicU32::new(0),
        })
    }
    fn publish(&self, tag: &str, artifact: &[u8]) {
        dewy_testkit::publish(&self.dir, tag, "app_linux_amd64.tar.gz", artifact);
        *self.answer.lock().unwrap() = Some(Answer::Release(tag.into()));
    }
    fn set(&self, a: Answer) {
        *self.answer.lock().unwrap() = Some(a);
    }
}

#[async_trait::async_trait]
impl Registry for Scripted {
    async fn latest(&self) -> Result<Release, dewy_registry::Error> {
        match self.answer.lock().unwrap().as_ref().expect("answer set") {
            Answer::Release(tag) => Ok(Release {
                id: tag.clone(),
                tag: tag.clone(),
                version: dewy_registry::parse_semver(tag).unwrap(),
                artifact_name: "app_linux_amd64.tar.gz".into(),
                artifact_url: format!("file://{}/{tag}/app_linux_amd64.tar.gz", self.dir.display()),
                published_at: None,
                slot: None,
                checksum: None,
                signature_url: None,
            }),
            Answer::NotFound { minutes_ago } => Err(dewy_registry::Error::ArtifactNotFound {
                tag: "v9.0.0".into(),
                wanted: None,
                published_at: Some(jiff::Timestamp::now() - jiff::SignedDuration::from_mins(*minutes_ago)),
            }),
            Answer::Fail => Err(dewy_registry::Error::NoVersion {
                location: "scripted".into(),
            }),
        }
    }
    async fn report(&self, _: &dewy_registry::Report) -> Result<(), dewy_registry::Error> {
        self.reports.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A supervisor that records calls and can be told to fail.
#[derive(Debug, Default)]
struct FakeApp {
    running: AtomicBool,
    starts: AtomicU32,
    restarts: AtomicU32,
    fail_next: AtomicBool,
    events: Mutex<Option<tokio::sync::broadcast::Sender<Event>>>,
}

#[async_trait::async_trait]
impl Supervisor for FakeApp {
    async fn start(&self) -> Result<GenerationInfo, dewy_starter::Error> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(dewy_starter::Error::NotRunning);
        }
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.running.store(true, Ordering::SeqCst);
        Ok(GenerationInfo { generation: 1, pid: 1 })
    }
    async fn restart(&self) -> Result<GenerationInfo, dewy_starter::Error> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(dewy_starter::Error::ExitedEarly {
                generation: 2,
                exit: dewy_starter::ExitInfo::Code(1),
                stderr: vec!["boom".into()],
            });
        }
        self.restarts.fetch_add(1, Ordering::SeqCst);
        Ok(GenerationInfo { generation: 2, pid: 2 })
    }
    async fn stop(&self) -> Result<(), dewy_starter::Error> {
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events
            .lock()
            .unwrap()
            .get_or_insert_with(|| tokio::sync::broadcast::channel(8).0)
            .subscribe()
    }
}

#[derive(Debug, Default)]
struct Capture(Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Notifier for Capture {
    async fn deliver(&self, n: &Notification, _: &Context) -> Result<(), dewy_notify::Error> {
        self.0.lock().unwrap().push(n.text.clone());
        Ok(())
    }
    fn name(&self) -> &'static str {
        "capture"
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    registry: Arc<Scripted>,
    cache: Arc<MemoryCache>,
    app: Arc<FakeApp>,
    sent: Arc<Capture>,
    deployer: Deployer,
}

fn rig_with(mode: Mode, edit: impl FnOnce(&mut Config)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("app");
    std::fs::create_dir_all(&root).unwrap();
    let registry = Scripted::new(&dir.path().join("registry"));
    let cache = Arc::new(MemoryCache::new());
    let app = Arc::new(FakeApp::default());
    let sent = Arc::new(Capture::default());
    let notify = Notify::new(sent.clone(), Context::default(), false);
    let mut config = Config::new(mode, root.clone());
    edit(&mut config);
    let deployer = Deployer::new(config, registry.clone(), cache.clone(), notify, Some(app.clone())).unwrap();
    Rig {
        _dir: dir,
        root,
        registry,
        cache,
        app,
        sent,
        deployer,
    }
}

fn rig(mode: Mode) -> Rig {
    rig_with(mode, |_| {})
}

fn app_v(v: &str) -> Vec<u8> {
    targz(&[
        ("bin/app", format!("#!/bin/sh\necho {v}\n").as_bytes(), 0o755),
        ("VERSION", v.as_bytes(), 0o644),
    ])
}

impl Rig {
    async fn current_key(&self) -> Option<String> {
        self.cache
            .read(&Key::current())
            .await
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }
    fn current_version(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join("current/VERSION")).ok()
    }
    fn release_count(&self) -> usize {
        std::fs::read_dir(self.root.join("releases")).unwrap().count()
    }
    async fn messages(&self) -> Vec<String> {
        self.deployer.notify().shutdown(Duration::from_secs(5)).await;
        self.sent.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn first_deploy_then_skip_then_new_version() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    let out = r.deployer.tick().await.unwrap();
    assert!(matches!(out, TickOutcome::Deployed { ref tag, .. } if tag == "v1.0.0"));
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert_eq!(r.current_key().await.as_deref(), Some("v1.0.0--app_linux_amd64.tar.gz"));
    assert_eq!(r.app.starts.load(Ordering::SeqCst), 1);
    assert_eq!(r.registry.reports.load(Ordering::SeqCst), 1);
    let link = std::fs::read_link(r.root.join("current")).unwrap();
    assert!(link.is_absolute() && link.starts_with(r.root.join("releases")));

    assert_eq!(r.deployer.tick().await.unwrap(), TickOutcome::Skipped);
    assert_eq!(r.app.starts.load(Ordering::SeqCst), 1);

    r.registry.publish("v1.1.0", &app_v("v2"));
    r.deployer.tick().await.unwrap();
    assert_eq!(r.current_version().as_deref(), Some("v2"));
    assert_eq!(r.app.restarts.load(Ordering::SeqCst), 1);
    assert_eq!(r.release_count(), 2);
    let msgs = r.messages().await;
    assert!(
        msgs.contains(&"Downloaded artifact for `v1.0.0`".to_owned()),
        "{msgs:?}"
    );
    assert!(msgs.contains(&"Server started for `v1.0.0`".to_owned()), "{msgs:?}");
    assert!(msgs.contains(&"Server restarted for `v1.1.0`".to_owned()), "{msgs:?}");
}

#[tokio::test]
async fn stopped_server_is_started_from_the_release_in_place_and_assets_mode_skips() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    r.app.running.store(false, Ordering::SeqCst);
    // The artifact is gone from the registry: nothing is downloaded or
    // extracted again, the release in place is started as it is.
    std::fs::remove_dir_all(r.registry.dir.join("v1.0.0")).unwrap();
    assert_eq!(r.deployer.tick().await.unwrap(), TickOutcome::Skipped);
    assert_eq!(r.app.starts.load(Ordering::SeqCst), 2);
    assert_eq!(r.release_count(), 1, "no second folder for the same version");

    let a = rig(Mode::Assets);
    a.registry.publish("v1.0.0", &app_v("v1"));
    a.deployer.tick().await.unwrap();
    assert_eq!(a.deployer.tick().await.unwrap(), TickOutcome::Skipped);
    assert_eq!(a.app.starts.load(Ordering::SeqCst), 0, "assets mode runs nothing");
    // If the release folder vanished, assets mode puts it back.
    std::fs::remove_dir_all(a.root.join("releases")).unwrap();
    std::fs::create_dir_all(a.root.join("releases")).unwrap();
    assert!(matches!(a.deployer.tick().await.unwrap(), TickOutcome::Deployed { .. }));
    assert_eq!(a.current_version().as_deref(), Some("v1"));
}

#[tokio::test]
async fn grace_period_inside_and_outside() {
    let r = rig(Mode::Assets);
    r.registry.set(Answer::NotFound { minutes_ago: 5 });
    assert_eq!(r.deployer.tick().await.unwrap(), TickOutcome::WithinGracePeriod);
    r.registry.set(Answer::NotFound { minutes_ago: 45 });
    let err = r.deployer.tick().await.unwrap_err();
    assert!(
        matches!(err, Error::Registry(dewy_registry::Error::ArtifactNotFound { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn hook_failures_continue_by_default_and_hooks_get_dewy_variables() {
    let r = rig_with(Mode::Assets, |c| {
        c.before_hook = Some("echo before-$DEWY_VERSION-$DEWY_PREVIOUS_VERSION >> hooks.log; exit 1".into());
        c.after_hook = Some(
            "echo after-$DEWY_VERSION-$(cat $DEWY_RELEASE_DIR/VERSION)-$(basename $DEWY_APP_DIR) >> hooks.log".into(),
        );
    });
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    r.registry.publish("v1.1.0", &app_v("v2"));
    r.deployer.tick().await.unwrap();
    let log = std::fs::read_to_string(r.root.join("hooks.log")).unwrap();
    assert_eq!(
        log,
        "before-v1.0.0-\nafter-v1.0.0-v1-app\nbefore-v1.1.0-v1.0.0\nafter-v1.1.0-v2-app\n"
    );
    let msgs = r.messages().await;
    assert!(msgs.iter().any(|m| m.contains("Before Deploy hook failed")), "{msgs:?}");

    let strict = rig_with(Mode::Assets, |c| {
        c.before_hook = Some("exit 7".into());
        c.abort_on_before_hook_failure = true;
    });
    strict.registry.publish("v1.0.0", &app_v("v1"));
    let err = strict.deployer.tick().await.unwrap_err();
    assert!(err.to_string().contains("exit code 7"), "{err}");
    assert_eq!(strict.current_version(), None);
    assert_eq!(strict.current_key().await, None);
}

#[tokio::test]
async fn extraction_failure_keeps_everything_as_it_was_and_is_retried() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    // A truncated archive: extraction fails midway.
    let big: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut broken = targz(&[("bin/app", &big, 0o755), ("VERSION", b"v2", 0o644)]);
    broken.truncate(broken.len() / 2);
    r.registry.publish("v1.1.0", &broken);
    let err = r.deployer.tick().await.unwrap_err();
    assert!(matches!(err, Error::Extract { .. }), "{err}");
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert_eq!(
        r.current_key().await.as_deref(),
        Some("v1.0.0--app_linux_amd64.tar.gz"),
        "current is not poisoned"
    );
    assert_eq!(r.release_count(), 1, "no partial release left");
    assert_eq!(r.app.restarts.load(Ordering::SeqCst), 0);
    let history = dewy_core::read_history(&r.root);
    let outcomes: Vec<(&str, &str)> = history
        .iter()
        .map(|e| (e.version.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes[..3],
        [("v1.0.0", "extracted"), ("v1.0.0", "deployed"), ("v1.1.0", "failed")],
        "the folder is recorded once complete, then the deploy"
    );
    let history = &history[1..];
    assert_eq!(
        (history[1].version.as_str(), history[1].outcome.as_str()),
        ("v1.1.0", "failed")
    );
    assert!(
        history[1].reason.as_deref().unwrap().contains("failed to extract"),
        "{:?}",
        history[1]
    );
    // The unusable artifact left the cache, so a completed upload of the
    // same version is picked up.
    let artifacts: Vec<String> = r
        .cache
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key.to_string())
        .collect();
    assert!(
        !artifacts.contains(&"v1.1.0--app_linux_amd64.tar.gz".to_owned()),
        "{artifacts:?}"
    );
    // The next tick tries again (not skipped); once the upload of v1.1.0 is
    // complete it deploys, and so does a later v1.1.1.
    assert!(r.deployer.tick().await.is_err());
    r.registry.publish("v1.1.0", &app_v("v2-complete"));
    r.deployer.tick().await.unwrap();
    assert_eq!(r.current_version().as_deref(), Some("v2-complete"));
    r.registry.publish("v1.1.1", &app_v("v3"));
    r.deployer.tick().await.unwrap();
    assert_eq!(r.current_version().as_deref(), Some("v3"));
}

#[tokio::test]
async fn failed_restart_switches_current_back_and_keeps_the_old_version() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    r.registry.publish("v2.0.0", &app_v("v2"));
    r.app.fail_next.store(true, Ordering::SeqCst);
    let err = r.deployer.tick().await.unwrap_err();
    assert!(matches!(err, Error::App { action: "restart", .. }), "{err}");
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert_eq!(r.current_key().await.as_deref(), Some("v1.0.0--app_linux_amd64.tar.gz"));
    assert_eq!(r.release_count(), 1);
    // Not retried every tick: the version that failed to start is skipped
    // until a newer one appears.
    assert_eq!(
        r.deployer.tick().await.unwrap(),
        TickOutcome::KnownBad { tag: "v2.0.0".into() }
    );
    assert_eq!(r.app.restarts.load(Ordering::SeqCst), 0);
    r.registry.publish("v2.0.1", &app_v("v2.1"));
    r.deployer.tick().await.unwrap();
    assert_eq!(r.current_version().as_deref(), Some("v2.1"));
}

#[tokio::test(start_paused = true)]
async fn repeated_errors_are_limited_and_reset_by_success() {
    let r = Arc::new(rig_with(Mode::Assets, |c| c.interval = Duration::from_secs(10)));
    r.registry.set(Answer::Fail);
    let d = Arc::new(r.deployer_handle());
    let runner = {
        let d = d.clone();
        tokio::spawn(async move { d.run().await })
    };
    tokio::time::sleep(Duration::from_secs(55)).await;
    r.registry.publish("v1.0.0", &app_v("v1"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    d.shutdown("terminated").await;
    runner.await.unwrap();
    let msgs = r.sent.0.lock().unwrap().clone();
    let errors: Vec<_> = msgs.iter().filter(|m| m.contains("Error occurred")).collect();
    assert_eq!(errors.len(), 3, "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("Recovered after 6 errors (3 error notifications were suppressed)")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m == "Stop receiving by `terminated` signal"),
        "{msgs:?}"
    );
    assert!(msgs[0].starts_with("Automatic shipping started by *Dewy*"), "{msgs:?}");
}

impl Rig {
    /// The loop needs an `Arc<Deployer>`; build a second deployer on the
    /// same registry, cache and folder.
    fn deployer_handle(&self) -> Deployer {
        let notify = Notify::new(self.sent.clone(), Context::default(), false);
        let mut config = Config::new(Mode::Assets, self.root.clone());
        config.interval = Duration::from_secs(10);
        Deployer::new(config, self.registry.clone(), self.cache.clone(), notify, None).unwrap()
    }
}

#[tokio::test]
async fn seven_releases_are_kept() {
    let r = rig(Mode::Assets);
    for i in 0..10 {
        r.registry.publish(&format!("v1.0.{i}"), &app_v(&format!("v{i}")));
        r.deployer.tick().await.unwrap();
    }
    assert_eq!(r.release_count(), 7);
    assert_eq!(r.current_version().as_deref(), Some("v9"));
    let artifacts = r
        .cache
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.key.is_artifact())
        .count();
    assert_eq!(artifacts, 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn file_registry_file_cache_and_a_real_app() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let demo = dewy_testkit::demo_app();
    let dir = tempfile::tempdir().unwrap();
    let (root, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&root).unwrap();
    let demo_bytes = std::fs::read(&demo).unwrap();
    let publish = |tag: &str, extra: &[(&str, &[u8], u32)]| {
        let version = tag.to_owned();
        let mut files: Vec<(&str, &[u8], u32)> =
            vec![("demo-app", &demo_bytes, 0o755), ("VERSION", version.as_bytes(), 0o644)];
        files.extend_from_slice(extra);
        dewy_testkit::publish(&reg, tag, "app_linux_amd64.tar.gz", &targz(&files));
    };
    publish("v1.0.0", &[]);
    let opts = dewy_registry::OpenOptions {
        platform: dewy_registry::Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            libc: None,
        },
        ..Default::default()
    };
    let registry = dewy_registry::open(&format!("file://{}", reg.display()), &opts).unwrap();
    let cache = Arc::new(dewy_cache::FileCache::open(root.join(".dewy/cache")).unwrap());
    let port = dewy_testkit::free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let listeners = dewy_starter::Listeners::bind(&[dewy_starter::ListenSpec::Addr(addr)]).unwrap();
    let starter = dewy_starter::Starter::new(
        dewy_starter::StarterConfig {
            command: root.join("current/demo-app"),
            args: vec![],
            dir: root.clone(),
            env: vec![],
            readiness: dewy_starter::Readiness::Notify {
                timeout: Duration::from_secs(10),
            },
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            stop_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        },
        listeners,
    );
    let notify = Notify::new(Arc::new(dewy_notify::NullNotifier), Context::default(), false);
    let d = Deployer::new(
        Config::new(Mode::Server, root.clone()),
        registry,
        cache,
        notify,
        Some(Arc::new(starter)),
    )
    .unwrap();
    d.tick().await.unwrap();
    let body = || dewy_testkit::http_get(addr, "/").unwrap().1;
    assert!(body().starts_with("version=v1.0.0 generation=1"), "{}", body());
    publish("v2.0.0", &[]);
    d.tick().await.unwrap();
    assert!(body().starts_with("version=v2.0.0 generation=2"), "{}", body());
    // A broken v3 (exits at start) is refused; v2 keeps serving.
    publish("v3.0.0", &[("demo.env", b"DEMO_EXIT_AT_START=1\n", 0o644)]);
    let err = d.tick().await.unwrap_err();
    assert!(matches!(err, Error::App { .. }), "{err}");
    assert!(body().starts_with("version=v2.0.0 generation=2"), "{}", body());
    assert_eq!(std::fs::read_to_string(root.join("current/VERSION")).unwrap(), "v2.0.0");
    assert_eq!(
        std::fs::read_dir(root.join("releases")).unwrap().count(),
        2,
        "old release kept, broken one removed"
    );
    d.shutdown("terminated").await;
    assert!(dewy_testkit::http_get(addr, "/").is_err() || dewy_testkit::http_get(addr, "/").unwrap().0 == 0);
}

#[tokio::test]
async fn assets_health_command_rolls_back_and_the_record_survives_a_restart() {
    let r = rig_with(Mode::Assets, |c| {
        c.health_command = Some("test -f \"$DEWY_RELEASE_DIR/OK\"".into());
        c.after_hook = Some("echo \"$DEWY_VERSION ${DEWY_ROLLBACK:-0}\" >> hooks.log".into());
    });
    let with_ok = |v: &str| targz(&[("VERSION", v.as_bytes(), 0o644), ("OK", b"", 0o644)]);
    r.registry.publish("v1.0.0", &with_ok("v1"));
    r.deployer.tick().await.unwrap();
    r.registry.publish("v2.0.0", &app_v("v2"));
    let err = r.deployer.tick().await.unwrap_err();
    assert!(matches!(err, Error::Unhealthy { .. }), "{err}");
    assert!(err.to_string().contains("rolled back to `v1.0.0`"), "{err}");
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert_eq!(r.release_count(), 1);
    let log = std::fs::read_to_string(r.root.join("hooks.log")).unwrap();
    assert!(
        log.ends_with("v1.0.0 1\n"),
        "after hook ran with DEWY_ROLLBACK=1: {log}"
    );
    let bad = Key::bad(&Key::artifact("v2.0.0", "app_linux_amd64.tar.gz").unwrap());
    assert!(
        r.cache.read(&bad).await.unwrap().is_some(),
        "the bad record is in the cache"
    );
    assert_eq!(
        r.deployer.tick().await.unwrap(),
        TickOutcome::KnownBad { tag: "v2.0.0".into() }
    );
    // Cleared in the shared cache from elsewhere (`dewy clear-bad --cache`
    // on an operator's machine): the host that recorded it tries it again
    // too, and records it again.
    r.cache.delete(&bad).await.unwrap();
    assert!(matches!(r.deployer.tick().await, Err(Error::Unhealthy { .. })));
    assert!(r.cache.read(&bad).await.unwrap().is_some());
    assert_eq!(
        r.deployer.tick().await.unwrap(),
        TickOutcome::KnownBad { tag: "v2.0.0".into() }
    );

    // A restarted dewy (a new deployer on the same cache) still skips it.
    let notify = Notify::new(r.sent.clone(), Context::default(), false);
    let mut config = Config::new(Mode::Assets, r.root.clone());
    config.health_command = Some("test -f \"$DEWY_RELEASE_DIR/OK\"".into());
    let again = Deployer::new(config, r.registry.clone(), r.cache.clone(), notify, None).unwrap();
    assert_eq!(
        again.tick().await.unwrap(),
        TickOutcome::KnownBad { tag: "v2.0.0".into() }
    );
    // Cleared by an operator, it is tried (and refused) again.
    assert_eq!(again.clear_bad().await.unwrap(), 1);
    assert!(matches!(again.tick().await, Err(Error::Unhealthy { .. })));
    // A newer release replaces it.
    r.registry.publish("v3.0.0", &with_ok("v3"));
    again.tick().await.unwrap();
    assert_eq!(r.current_version().as_deref(), Some("v3"));
}

/// A [`MemoryCache`] that counts lookups of bad-release records (with a
/// bucket cache each one is a request).
#[derive(Debug, Default)]
struct CountingBadReads {
    inner: MemoryCache,
    bad_reads: AtomicU32,
}

#[async_trait::async_trait]
impl Cache for CountingBadReads {
    async fn read(&self, key: &Key) -> Result<Option<Vec<u8>>, dewy_cache::Error> {
        if key.is_bad_record() {
            self.bad_reads.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.read(key).await
    }
    async fn write(&self, key: &Key, data: &[u8]) -> Result<(), dewy_cache::Error> {
        self.inner.write(key, data).await
    }
    async fn put_file(&self, key: &Key, src: &Path) -> Result<(), dewy_cache::Error> {
        self.inner.put_file(key, src).await
    }
    async fn local_path(&self, key: &Key) -> Result<Option<PathBuf>, dewy_cache::Error> {
        self.inner.local_path(key).await
    }
    async fn list(&self) -> Result<Vec<dewy_cache::Entry>, dewy_cache::Error> {
        self.inner.list().await
    }
    async fn delete(&self, key: &Key) -> Result<(), dewy_cache::Error> {
        self.inner.delete(key).await
    }
    fn staging_dir(&self) -> &Path {
        self.inner.staging_dir()
    }
}

#[tokio::test]
async fn steady_ticks_do_not_look_up_bad_records_and_a_stopped_app_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("app");
    std::fs::create_dir_all(&root).unwrap();
    let registry = Scripted::new(&dir.path().join("registry"));
    let cache = Arc::new(CountingBadReads::default());
    let app = Arc::new(FakeApp::default());
    let notify = Notify::new(Arc::new(Capture::default()), Context::default(), false);
    let d = Deployer::new(
        Config::new(Mode::Server, root),
        registry.clone(),
        cache.clone(),
        notify,
        Some(app.clone()),
    )
    .unwrap();
    registry.publish("v1.0.0", &app_v("v1"));
    d.tick().await.unwrap();
    let after_deploy = cache.bad_reads.load(Ordering::SeqCst);
    assert_eq!(after_deploy, 1, "a new release is checked against the records");
    for _ in 0..5 {
        assert_eq!(d.tick().await.unwrap(), TickOutcome::Skipped);
    }
    assert_eq!(cache.bad_reads.load(Ordering::SeqCst), after_deploy, "steady ticks");
    // The app stops and meanwhile another host sharing the cache recorded
    // this release as bad: the release in place is started again rather
    // than nothing served.
    let key = Key::artifact("v1.0.0", "app_linux_amd64.tar.gz").unwrap();
    cache.write(&Key::bad(&key), b"{}").await.unwrap();
    app.running.store(false, Ordering::SeqCst);
    assert_eq!(d.tick().await.unwrap(), TickOutcome::Skipped);
    assert_eq!(app.starts.load(Ordering::SeqCst), 2);
    let reads = cache.bad_reads.load(Ordering::SeqCst);
    registry.publish("v1.1.0", &app_v("v2"));
    d.tick().await.unwrap();
    assert_eq!(cache.bad_reads.load(Ordering::SeqCst), reads + 1, "the next release");
    assert_eq!(app.restarts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_hand_made_switch_of_current_is_noticed_on_the_next_tick() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    let v1_dir = std::fs::read_link(r.root.join("current")).unwrap();
    r.registry.publish("v1.1.0", &app_v("v2"));
    r.deployer.tick().await.unwrap();
    assert_eq!(r.deployer.tick().await.unwrap(), TickOutcome::Skipped);
    // An operator points `current` back at v1 without dewy (and without a
    // pin): the next tick puts the newest release back in place.
    dewy_core::Releases::new(&r.root).switch(&v1_dir).unwrap();
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert!(matches!(r.deployer.tick().await.unwrap(), TickOutcome::Deployed { .. }));
    assert_eq!(r.current_version().as_deref(), Some("v2"));
    assert_eq!(
        r.release_count(),
        2,
        "v2's folder is switched to again, not extracted anew"
    );
    assert_eq!(r.deployer.tick().await.unwrap(), TickOutcome::Skipped);
}

// ---------------------------------------------------------------------------
// The deploy transaction: every failure path goes through one abort.

fn rollback_log(root: &Path) -> String {
    std::fs::read_to_string(root.join("hooks.log")).unwrap_or_default()
}

fn with_rollback_hook(c: &mut Config) {
    c.after_hook = Some("echo \"$DEWY_VERSION ${DEWY_ROLLBACK:-0}\" >> hooks.log".into());
}

async fn is_recorded_bad(r: &Rig, tag: &str) -> bool {
    let bad = Key::bad(&Key::artifact(tag, "app_linux_amd64.tar.gz").unwrap());
    r.cache.read(&bad).await.unwrap().is_some()
}

#[tokio::test]
async fn failed_health_command_on_a_first_deploy_leaves_nothing_in_place() {
    let r = rig_with(Mode::Assets, |c| {
        c.health_command = Some("false".into());
        with_rollback_hook(c);
    });
    r.registry.publish("v1.0.0", &app_v("v1"));
    let err = r.deployer.tick().await.unwrap_err();
    assert!(matches!(err, Error::Unhealthy { .. }), "{err}");
    assert!(
        std::fs::symlink_metadata(r.root.join("current")).is_err(),
        "current must not point at the failed release"
    );
    assert_eq!(r.release_count(), 0, "the failed folder is removed");
    assert!(is_recorded_bad(&r, "v1.0.0").await);
    assert_eq!(
        rollback_log(&r.root),
        "v1.0.0 0\n 1\n",
        "after hook, then its rollback run"
    );
}

#[tokio::test]
async fn failed_start_on_a_first_deploy_leaves_nothing_in_place() {
    let r = rig_with(Mode::Server, with_rollback_hook);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.app.fail_next.store(true, Ordering::SeqCst);
    let err = r.deployer.tick().await.unwrap_err();
    assert!(matches!(err, Error::App { action: "start", .. }), "{err}");
    assert!(std::fs::symlink_metadata(r.root.join("current")).is_err());
    assert_eq!(r.release_count(), 0);
    assert!(is_recorded_bad(&r, "v1.0.0").await);
    assert!(rollback_log(&r.root).ends_with(" 1\n"), "{}", rollback_log(&r.root));
}

#[tokio::test]
async fn failed_restart_runs_the_rollback_hook_and_records_the_release_bad() {
    let r = rig_with(Mode::Server, with_rollback_hook);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    r.registry.publish("v2.0.0", &app_v("v2"));
    r.app.fail_next.store(true, Ordering::SeqCst);
    let err = r.deployer.tick().await.unwrap_err();
    assert!(matches!(err, Error::App { action: "restart", .. }), "{err}");
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert_eq!(r.release_count(), 1);
    assert!(is_recorded_bad(&r, "v2.0.0").await);
    assert_eq!(rollback_log(&r.root), "v1.0.0 0\nv2.0.0 0\nv1.0.0 1\n");
    assert_eq!(
        r.deployer.tick().await.unwrap(),
        TickOutcome::KnownBad { tag: "v2.0.0".into() },
        "not retried on every tick"
    );
}

/// A one-connection-at-a-time HTTP server answering `status` to anything.
async fn answering(status: u16) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(format!("HTTP/1.0 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await;
        }
    });
    addr
}

#[tokio::test]
async fn failed_soak_restarts_the_previous_release() {
    let addr = answering(500).await;
    let r = rig_with(Mode::Server, |c| {
        with_rollback_hook(c);
        c.soak = Some(dewy_core::Soak {
            addr,
            path: "/health".into(),
            duration: Duration::from_secs(1),
            interval: Duration::from_millis(50),
        });
    });
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    r.registry.publish("v2.0.0", &app_v("v2"));
    let err = r.deployer.tick().await.unwrap_err();
    assert!(matches!(err, Error::Unhealthy { .. }), "{err}");
    assert!(err.to_string().contains("answered 500"), "{err}");
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert_eq!(r.app.restarts.load(Ordering::SeqCst), 2, "to v2, then back to v1");
    assert_eq!(r.release_count(), 1);
    assert!(is_recorded_bad(&r, "v2.0.0").await);
    assert!(rollback_log(&r.root).ends_with("v1.0.0 1\n"));
}

#[tokio::test]
async fn unsafe_archive_is_refused_and_recorded_bad_but_a_truncated_one_is_retried() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    let mut raw = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.as_old_mut().name[..14].copy_from_slice(b"../../evil.txt");
    h.set_cksum();
    raw.append(&h, &b"evil"[..]).unwrap();
    r.registry.publish("v2.0.0", &raw.into_inner().unwrap());
    let err = r.deployer.tick().await.unwrap_err();
    assert!(matches!(err, Error::Extract { .. }), "{err}");
    assert!(dewy_core::Error::blames_release(&err));
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert!(is_recorded_bad(&r, "v2.0.0").await);
    assert!(!r.root.parent().unwrap().join("evil.txt").exists());
    // A truncated archive (still being written) is not the release's fault.
    let full = app_v("v3");
    r.registry.publish("v3.0.0", &full[..full.len() / 2]);
    let err = r.deployer.tick().await.unwrap_err();
    assert!(!err.blames_release(), "{err}");
    assert!(!is_recorded_bad(&r, "v3.0.0").await);
    r.registry.publish("v3.0.0", &full);
    assert!(matches!(r.deployer.tick().await.unwrap(), TickOutcome::Deployed { .. }));
}

/// A tmpfs of `size` mounted on `dir` for one test (needs root, as the
/// e2e disk scenario); unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "this test mounts a tmpfs and needs root (mount -t tmpfs failed)");
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_during_extraction_changes_nothing_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("app");
    let _fs = Tmpfs::mount(&root, "4m");
    let registry = Scripted::new(&dir.path().join("registry"));
    let cache = Arc::new(MemoryCache::new());
    let app = Arc::new(FakeApp::default());
    let notify = Notify::new(Arc::new(Capture::default()), Context::default(), false);
    let d = Deployer::new(
        Config::new(Mode::Server, root.clone()),
        registry.clone(),
        cache.clone(),
        notify,
        Some(app.clone()),
    )
    .unwrap();
    registry.publish("v1.0.0", &app_v("v1"));
    d.tick().await.unwrap();
    // 8 MiB of incompressible bytes do not fit in the 4 MiB disk.
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    registry.publish("v2.0.0", &targz(&[("VERSION", b"v2", 0o644), ("blob", &big, 0o644)]));
    let err = d.tick().await.unwrap_err();
    assert!(err.to_string().contains("extract"), "{err}");
    assert!(!err.blames_release(), "a full disk is the host's fault: {err}");
    assert_eq!(std::fs::read_to_string(root.join("current/VERSION")).unwrap(), "v1");
    let left: Vec<_> = std::fs::read_dir(root.join("releases")).unwrap().collect();
    assert_eq!(left.len(), 1, "no partial folder left behind");
    let bad = Key::bad(&Key::artifact("v2.0.0", "app_linux_amd64.tar.gz").unwrap());
    assert!(cache.read(&bad).await.unwrap().is_none());
    assert_eq!(app.restarts.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------
// A restarted dewy starts what `current` holds first.

fn restarted(r: &Rig, edit: impl FnOnce(&mut Config)) -> (Deployer, Arc<FakeApp>) {
    let app = Arc::new(FakeApp::default());
    let notify = Notify::new(r.sent.clone(), Context::default(), false);
    let mut config = Config::new(Mode::Server, r.root.clone());
    edit(&mut config);
    let d = Deployer::new(config, r.registry.clone(), r.cache.clone(), notify, Some(app.clone())).unwrap();
    (d, app)
}

#[tokio::test]
async fn a_restarted_dewy_starts_the_release_in_place_without_a_new_folder() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    let (d, app) = restarted(&r, |_| {});
    assert_eq!(d.tick().await.unwrap(), TickOutcome::Skipped);
    assert_eq!(app.starts.load(Ordering::SeqCst), 1);
    assert_eq!(r.release_count(), 1);
    assert_eq!(d.status().await.current_version.as_deref(), Some("v1.0.0"));
}

#[tokio::test]
async fn a_pinned_folder_is_started_when_dewy_starts() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    r.registry.publish("v1.1.0", &app_v("v2"));
    r.deployer.tick().await.unwrap();
    // `dewy rollback` while dewy is stopped: pin and switch by hand.
    let v1 = r.deployer.releases().list().unwrap()[1].path.clone();
    dewy_core::set_pin(&r.root, Some("v1.0.0")).unwrap();
    r.deployer.releases().switch(&v1).unwrap();
    let (d, app) = restarted(&r, |_| {});
    assert_eq!(
        d.tick().await.unwrap(),
        TickOutcome::Pinned {
            version: "v1.0.0".into()
        }
    );
    assert_eq!(app.starts.load(Ordering::SeqCst), 1, "the pinned release runs");
    assert_eq!(r.current_version().as_deref(), Some("v1"));
}

#[tokio::test]
async fn a_newer_bad_release_does_not_keep_the_release_in_place_down() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.2.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    r.registry.publish("v1.3.0", &app_v("v2"));
    r.app.fail_next.store(true, Ordering::SeqCst);
    r.deployer.tick().await.unwrap_err();
    let (d, app) = restarted(&r, |_| {});
    assert_eq!(d.tick().await.unwrap(), TickOutcome::KnownBad { tag: "v1.3.0".into() });
    assert_eq!(app.starts.load(Ordering::SeqCst), 1);
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert_eq!(d.status().await.current_version.as_deref(), Some("v1.2.0"));
}

#[tokio::test]
async fn a_failing_before_hook_does_not_stop_the_start_of_the_release_in_place() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    let (d, app) = restarted(&r, |c| {
        c.before_hook = Some("exit 1".into());
        c.abort_on_before_hook_failure = true;
    });
    assert_eq!(d.tick().await.unwrap(), TickOutcome::Skipped);
    assert_eq!(
        app.starts.load(Ordering::SeqCst),
        1,
        "no hook runs on a start from disk"
    );
}

#[tokio::test(start_paused = true)]
async fn a_release_in_place_that_fails_to_start_is_retried_with_backoff() {
    let r = rig(Mode::Server);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    let (d, app) = restarted(&r, |_| {});
    app.fail_next.store(true, Ordering::SeqCst);
    let err = d.tick().await.unwrap_err();
    assert!(matches!(err, Error::App { action: "start", .. }), "{err}");
    // Within the backoff: no new attempt, the tick says what is wrong.
    let err = d.tick().await.unwrap_err();
    assert!(matches!(err, Error::NotRunning { .. }), "{err}");
    assert_eq!(app.starts.load(Ordering::SeqCst), 0);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(d.tick().await.unwrap(), TickOutcome::Skipped);
    assert_eq!(app.starts.load(Ordering::SeqCst), 1);
    assert_eq!(r.release_count(), 1);
}

#[tokio::test]
async fn a_pin_during_a_deploy_cancels_it_before_the_new_release_serves() {
    let r = rig_with(Mode::Server, |c| c.before_hook = Some("sleep 1".into()));
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    let v1 = std::fs::read_link(r.root.join("current")).unwrap();
    r.registry.publish("v2.0.0", &app_v("v2"));
    let pin = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.deployer.deploying().as_deref(), Some("v2.0.0"));
        r.deployer.pin_release(&v1, "v1.0.0").await
    };
    let (ticked, pinned) = tokio::join!(r.deployer.tick(), pin);
    pinned.unwrap();
    let err = ticked.unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err}");
    assert_eq!(r.current_version().as_deref(), Some("v1"));
    assert_eq!(r.release_count(), 1, "the cancelled release's folder is removed");
    assert_eq!(
        r.app.restarts.load(Ordering::SeqCst),
        1,
        "only the pin restarted the app"
    );
    assert!(!is_recorded_bad(&r, "v2.0.0").await, "a cancelled release is not bad");
}

#[tokio::test]
async fn a_crash_looping_release_never_costs_the_last_good_one_its_folder() {
    let r = rig_with(Mode::Server, |c| c.keep_releases = 1);
    r.registry.publish("v1.0.0", &app_v("v1"));
    r.deployer.tick().await.unwrap();
    r.registry.publish("v2.0.0", &app_v("v2"));
    r.deployer.tick().await.unwrap();
    for _ in 0..20 {
        // v2 keeps dying; each check starts it again from its folder.
        r.app.running.store(false, Ordering::SeqCst);
        assert_eq!(r.deployer.tick().await.unwrap(), TickOutcome::Skipped);
    }
    assert_eq!(r.app.starts.load(Ordering::SeqCst), 21);
    assert_eq!(
        r.release_count(),
        2,
        "v2's folder is reused and v1 (the rollback target) kept"
    );
    let list = r.deployer.releases().list().unwrap();
    assert_eq!(std::fs::read_to_string(list[1].path.join("VERSION")).unwrap(), "v1");
}

/// Each host sharing the cache writes a heartbeat; the fleet lists them.
#[tokio::test]
async fn every_host_sharing_the_cache_is_in_the_fleet() {
    let r = rig(Mode::Assets);
    r.registry.publish("v1.0.0", &app_v("v1.0.0"));
    let hosts: Vec<Arc<Deployer>> = ["web-1", "web-2"]
        .iter()
        .map(|h| {
            let dir = r._dir.path().join(h);
            std::fs::create_dir_all(&dir).unwrap();
            let mut config = Config::new(Mode::Assets, dir);
            config.hostname = (*h).to_owned();
            config.interval = Duration::from_millis(200);
            let notify = Notify::new(r.sent.clone(), Context::default(), false);
            Arc::new(Deployer::new(config, r.registry.clone(), r.cache.clone(), notify, None).unwrap())
        })
        .collect();
    let runs: Vec<_> = hosts
        .iter()
        .map(|d| {
            let d = d.clone();
            tokio::spawn(async move { d.run().await })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let fleet = loop {
        let fleet = hosts[0].fleet().await;
        if fleet.len() == 2 && fleet.iter().all(|h| h["version"] == "v1.0.0") {
            break fleet;
        }
        assert!(std::time::Instant::now() < deadline, "{fleet:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(fleet[0]["host"], "web-1");
    assert_eq!(fleet[1]["host"], "web-2");
    assert!(
        fleet
            .iter()
            .all(|h| h["stale"] == false && h["last_outcome"] == "deployed")
    );
    // Age is by the storage's clock, not the writer's: a host whose clock
    // is years off is live while it writes, stale once it stopped.
    let skewed = serde_json::json!({"host": "gone", "at": "2020-01-01T00:00:00Z"});
    let gone = Key::host("gone").unwrap();
    r.cache.write(&gone, skewed.to_string().as_bytes()).await.unwrap();
    let stale_of = |fleet: Vec<serde_json::Value>| fleet.iter().find(|h| h["host"] == "gone").unwrap()["stale"].clone();
    assert_eq!(stale_of(hosts[1].fleet().await), false);
    r.cache.backdate(&gone, Duration::from_secs(91));
    assert_eq!(stale_of(hosts[1].fleet().await), true);
    assert!(!Key::host("a--b").unwrap().is_artifact());
    for d in &hosts {
        d.shutdown("SIGTERM").await;
    }
    for run in runs {
        run.abort();
    }
}
