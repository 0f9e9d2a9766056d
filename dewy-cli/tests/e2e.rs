//! End-to-end fault matrix: the real `dewy server` binary runs the demo app
//! under a load client for the whole scenario while faults are injected
//! around it. Each scenario asserts the load client's failures and the state
//! on disk afterwards, and records a row for `docs/reliability.md`
//! (assembled by `cargo xtask test` from `target/tmp/e2e/`).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use dewy_testkit::{Load, Reaped};

fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    dewy_testkit::http_get(addr, path).map_err(|e| e.to_string())
}

/// One scenario's world: an app folder, a file registry, a port.
struct World {
    dir: tempfile::TempDir,
    port: u16,
    demo: Vec<u8>,
}

impl World {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            port: dewy_testkit::free_port(),
            demo: std::fs::read(dewy_testkit::demo_app()).unwrap(),
        }
    }

    fn app(&self) -> PathBuf {
        let p = self.dir.path().join("app");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn registry(&self) -> PathBuf {
        self.dir.path().join("registry")
    }

    fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// The demo app as release `tag`, with `extra` files (such as `demo.env`).
    fn archive(&self, tag: &str, extra: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut files: Vec<(&str, &[u8], u32)> =
            vec![("demo-app", &self.demo, 0o755), ("VERSION", tag.as_bytes(), 0o644)];
        files.extend_from_slice(extra);
        dewy_testkit::targz(&files)
    }

    fn publish(&self, tag: &str, extra: &[(&str, &[u8], u32)]) {
        self.publish_raw(tag, &self.archive(tag, extra));
    }

    fn publish_raw(&self, tag: &str, artifact: &[u8]) {
        dewy_testkit::publish(&self.registry(), tag, "demo_linux_amd64.tar.gz", artifact);
    }

    fn dewy(&self, registry: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::cargo_bin("dewy").unwrap();
        for (k, _) in std::env::vars() {
            if k.starts_with("DEWY_") || k.starts_with("GITHUB_") || k.starts_with("GH_") || k.starts_with("SLACK_") {
                cmd.env_remove(k);
            }
        }
        cmd.current_dir(self.app())
            .args([
                "server",
                "--registry",
                registry,
                "-p",
                &format!("127.0.0.1:{}", self.port),
                "-i",
                "1",
            ])
            .args(["--log-format", "json", "--ready-notify"])
            .args(extra)
            .args(["--", "current/demo-app"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path())
                    .unwrap(),
            );
        cmd
    }

    fn file_registry(&self) -> String {
        format!("file://{}", self.registry().display())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("dewy.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn serving(&self, tag: &str) -> bool {
        get(self.addr(), "/").is_ok_and(|(s, b)| s == 200 && b.contains(&format!("version={tag} ")))
    }

    /// Waits until dewy logged an error about `tag`.
    fn wait_for_error(&self, tag: &str, what: &str) {
        wait_for(what, Duration::from_secs(30), || {
            self.log()
                .lines()
                .any(|l| l.contains(tag) && l.contains("\"level\":\"ERROR\""))
        });
    }

    fn history(&self) -> String {
        std::fs::read_to_string(self.app().join(".dewy/history.jsonl")).unwrap_or_default()
    }

    /// Release folders on disk.
    /// The release folders (not the hidden staging folder of an extraction
    /// in progress, which a retry every second may have open right now).
    fn release_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.app().join("releases"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| !name.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Every release folder holds a complete release (its VERSION file).
    fn assert_releases_complete(&self) {
        for d in self.release_dirs() {
            let dir = self.app().join("releases").join(&d);
            assert!(
                dir.join("VERSION").is_file() && dir.join("demo-app").is_file(),
                "incomplete release folder {d}"
            );
        }
        // A download may be in progress right now (a failed release is
        // retried every second): a leftover is a file still there later.
        let staging = self.app().join(".dewy/cache/.staging");
        let in_staging = || -> Vec<std::ffi::OsString> {
            std::fs::read_dir(&staging)
                .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default()
        };
        let before = in_staging();
        if !before.is_empty() {
            std::thread::sleep(Duration::from_secs(3));
            let left: Vec<_> = in_staging().into_iter().filter(|f| before.contains(f)).collect();
            assert!(left.is_empty(), "partial downloads left in the cache: {left:?}");
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(mut child: Reaped) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "dewy did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes whose command line mentions `needle` (orphan checks).
fn processes_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline).contains(needle).then_some(pid)
        })
        .collect()
}

/// Records a row of the reliability table.
fn record(scenario: &str, faults: &str, ok: u64, failed: u64, checked: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let slug: String = scenario
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    std::fs::write(
        dir.join(format!("{slug}.md")),
        format!("| {scenario} | {faults} | {ok} | {failed} | {checked} |\n"),
    )
    .unwrap();
}

#[test]
fn releases_in_a_row_under_load() {
    let w = World::new();
    w.publish("v1.0.0", &[]);
    let dewy = Reaped(w.dewy(&w.file_registry(), &[]).spawn().unwrap());
    wait_for("v1.0.0 served", Duration::from_secs(60), || w.serving("v1.0.0"));
    let load = Load::start(w.addr());
    w.publish("v2.0.0", &[]);
    wait_for("v2.0.0 served", Duration::from_secs(30), || load.version() == "v2.0.0");
    // Two releases faster than the interval: only the newest is deployed.
    w.publish("v3.0.0", &[]);
    w.publish("v3.0.1", &[]);
    wait_for("v3.0.1 served", Duration::from_secs(30), || load.version() == "v3.0.1");
    std::thread::sleep(Duration::from_secs(3));
    let (ok, failed, errors) = load.finish();
    stop(dewy);
    let history = w.history();
    assert!(!history.contains("\"v3.0.0\""), "v3.0.0 was deployed:\n{history}");
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 100, "the load client ran ({ok} requests)");
    w.assert_releases_complete();
    record(
        "first deploy, v2, then v3.0.0 and v3.0.1 within one interval",
        "none",
        ok,
        failed,
        "v3.0.0 never deployed; every release folder complete",
    );
}

/// A named fault and how to inject it.
type Fault<'a> = (&'a str, Box<dyn Fn() + 'a>);

#[test]
fn registry_faults_keep_the_current_version_serving() {
    // The registry is down when dewy starts (connection refused).
    let api_port = dewy_testkit::free_port();
    let w = World::new();
    let art = |tag: &str| w.archive(tag, &[]);
    let mut dewy_cmd = w.dewy("ghr://o/r?artifact=demo_linux_amd64.tar.gz", &["--grace-period", "2s"]);
    dewy_cmd
        .env("GITHUB_API_URL", format!("http://127.0.0.1:{api_port}"))
        .env("GH_TOKEN", "t");
    let dewy = Reaped(dewy_cmd.spawn().unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let gh = dewy_testkit::github::FakeGithub::start_on(api_port);
    gh.add_token("t");
    gh.add_release("v1.0.0", &[("demo_linux_amd64.tar.gz", &art("v1.0.0"))]);
    wait_for("v1.0.0 served once the registry is up", Duration::from_secs(60), || {
        w.serving("v1.0.0")
    });
    let load = Load::start(w.addr());
    let faults: Vec<Fault<'_>> = vec![
        ("502", Box::new(|| gh.fail_next(3, 502))),
        ("503", Box::new(|| gh.fail_next(3, 503))),
        ("malformed JSON", Box::new(|| gh.malformed_next(3))),
        ("429 secondary limit", Box::new(|| gh.secondary_limit(1, 2))),
        (
            "403 primary limit",
            Box::new(|| {
                gh.set_rate_limit(0, Duration::from_secs(3));
                std::thread::sleep(Duration::from_millis(1500));
                // The budget comes back with the reset dewy was told about.
                gh.set_rate_limit(5000, Duration::from_secs(3600));
            }),
        ),
    ];
    for (name, inject) in &faults {
        inject();
        std::thread::sleep(Duration::from_secs(4));
        assert_eq!(load.version(), "v1.0.0", "after {name}");
    }
    // A release without its artifact: quiet inside the grace period, an
    // error after it, deployed once the asset is uploaded.
    gh.add_release("v2.0.0", &[]);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(load.version(), "v1.0.0");
    gh.add_asset("v2.0.0", "demo_linux_amd64.tar.gz", &art("v2.0.0"), true);
    wait_for("v2.0.0 served after the faults", Duration::from_secs(90), || {
        load.version() == "v2.0.0"
    });
    let (ok, failed, errors) = load.finish();
    stop(dewy);
    let log = w.log();
    assert!(log.contains("rate limit"), "rate limits were logged");
    assert!(
        log.contains("artifact not found"),
        "the missing artifact was reported after the grace period"
    );
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    w.assert_releases_complete();
    record(
        "registry faults (GitHub fake)",
        "connection refused at start, 502, 503, malformed JSON, 429 Retry-After, 403 rate limit, release without artifact (inside and after the grace period)",
        ok,
        failed,
        "v1 served throughout; v2 deployed after recovery",
    );
}

/// A tar.gz whose entry escapes the release folder.
fn escaping_archive(demo: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    {
        let mut b = tar::Builder::new(&mut raw);
        let mut h = tar::Header::new_gnu();
        h.set_size(demo.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, "demo-app", demo).unwrap();
        let evil = b"owned";
        let mut h = tar::Header::new_gnu();
        h.set_size(evil.len() as u64);
        h.set_mode(0o644);
        // `append_data` refuses `..`; write the name into the header directly.
        h.as_old_mut().name[..14].copy_from_slice(b"../../evil.txt");
        h.set_cksum();
        b.append(&h, &evil[..]).unwrap();
        b.finish().unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap()
}

/// A tar.gz that expands to 300 MiB of zeros from a few hundred KiB.
fn bomb() -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    {
        let mut b = tar::Builder::new(&mut gz);
        let size = 300u64 << 20;
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "zeros", std::io::repeat(0).take(size)).unwrap();
        b.finish().unwrap();
    }
    gz.finish().unwrap()
}

#[test]
fn bad_artifacts_never_reach_releases() {
    let w = World::new();
    w.publish("v1.0.0", &[]);
    let dewy = Reaped(w.dewy(&w.file_registry(), &[]).spawn().unwrap());
    wait_for("v1.0.0 served", Duration::from_secs(60), || w.serving("v1.0.0"));
    let load = Load::start(w.addr());
    let good = w.archive("v2.0.0", &[]);
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("checksum mismatch", "v2.0.0", good.clone()),
        ("truncated archive", "v2.0.1", good[..good.len() / 2].to_vec()),
        ("entry escaping the release folder", "v2.0.2", escaping_archive(&w.demo)),
        ("decompression bomb", "v2.0.3", bomb()),
    ];
    for (name, tag, artifact) in &cases {
        w.publish_raw(tag, artifact);
        if *name == "checksum mismatch" {
            std::fs::write(
                w.registry().join(tag).join("SHA256SUMS"),
                format!("{}  demo_linux_amd64.tar.gz\n", "0".repeat(64)),
            )
            .unwrap();
        }
        w.wait_for_error(tag, name);
        assert_eq!(load.version(), "v1.0.0", "after {name}");
        assert_eq!(w.release_dirs().len(), 1, "after {name}: {:?}", w.release_dirs());
        w.assert_releases_complete();
        // Remove it from the registry so the next case is the newest.
        std::fs::remove_dir_all(w.registry().join(tag)).unwrap();
    }
    assert!(!w.dir.path().join("evil.txt").exists() && !w.app().join("evil.txt").exists());
    w.publish("v3.0.0", &[]);
    wait_for("v3.0.0 served", Duration::from_secs(30), || load.version() == "v3.0.0");
    let (ok, failed, errors) = load.finish();
    stop(dewy);
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    let cached: Vec<String> = std::fs::read_dir(w.app().join(".dewy/cache"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('v'))
        .collect();
    assert!(
        cached
            .iter()
            .all(|n| n.starts_with("v1.0.0--") || n.starts_with("v3.0.0--")),
        "bad artifacts left in the cache: {cached:?}"
    );
    record(
        "artifact faults (file registry)",
        "checksum mismatch, truncated archive, escaping entry, 300 MiB decompression bomb",
        ok,
        failed,
        "nothing bad in releases/ or the cache; v3 deployed after",
    );
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().unwrap()
}

/// Unmounts on drop.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = sh(&format!("umount -l '{}'", self.0.display()));
    }
}

#[test]
fn full_or_read_only_disk_aborts_the_deploy_cleanly() {
    let w = World::new();
    let releases = w.app().join("releases");
    std::fs::create_dir_all(&releases).unwrap();
    // Room for one release and a half.
    let size_kib = w.demo.len() * 3 / 2 / 1024 + 64;
    let out = sh(&format!(
        "mount -t tmpfs -o size={size_kib}k dewy-e2e '{}'",
        releases.display()
    ));
    assert!(
        out.status.success(),
        "cannot mount a tmpfs for the disk-full scenario (needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _mount = Mount(releases.clone());
    w.publish("v1.0.0", &[]);
    let dewy = Reaped(w.dewy(&w.file_registry(), &[]).spawn().unwrap());
    wait_for("v1.0.0 served", Duration::from_secs(60), || w.serving("v1.0.0"));
    let load = Load::start(w.addr());
    w.publish("v2.0.0", &[]);
    w.wait_for_error("v2.0.0", "the disk-full failure");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(load.version(), "v1.0.0");
    assert_eq!(w.release_dirs().len(), 1, "{:?}", w.release_dirs());
    w.assert_releases_complete();
    let remount = |mode: &str| {
        // dewy retries the failed release every second: a read-only remount
        // is refused ("busy") while that retry has a file open for writing.
        let mut out = None;
        for _ in 0..50 {
            let o = sh(&format!(
                "mount -o remount,{mode},size={}k '{}'",
                size_kib * 4,
                releases.display()
            ));
            if o.status.success() {
                return;
            }
            out = Some(o);
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "remount {mode}: {}",
            String::from_utf8_lossy(&out.expect("tried").stderr)
        );
    };
    // Read-only: the next release cannot be extracted either.
    remount("ro");
    w.publish("v2.0.1", &[]);
    w.wait_for_error("v2.0.1", "the read-only failure");
    assert_eq!(load.version(), "v1.0.0");
    // Room again: the fleet recovers on its own.
    remount("rw");
    wait_for("v2.0.1 served once there is room", Duration::from_secs(60), || {
        load.version() == "v2.0.1"
    });
    let (ok, failed, errors) = load.finish();
    stop(dewy);
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    w.assert_releases_complete();
    record(
        "disk faults",
        "releases/ on a full tmpfs, then remounted read-only, then with room",
        ok,
        failed,
        "deploys aborted cleanly; v1 served; v2.0.1 deployed once writable",
    );
}

#[test]
fn process_faults_are_contained() {
    let w = World::new();
    w.publish("v1.0.0", &[]);
    let dewy = Reaped(
        w.dewy(
            &w.file_registry(),
            &[
                "--stop-timeout",
                "2s",
                "--hook-timeout",
                "2s",
                "--before-deploy-hook",
                "sleep 600; echo late",
            ],
        )
        .spawn()
        .unwrap(),
    );
    wait_for("v1.0.0 served", Duration::from_secs(60), || w.serving("v1.0.0"));
    let load = Load::start(w.addr());

    // The app crashes: dewy restarts it, the socket stays open meanwhile.
    let pid = app_pid(w.addr());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for("a new generation after the crash", Duration::from_secs(30), || {
        get(w.addr(), "/").is_ok_and(|(s, b)| s == 200 && pid_in(&b) != Some(pid))
    });
    let crash_failures = load.failed();

    // A release whose app ignores SIGTERM: the next restart kills it after
    // --stop-timeout. The before hook hangs each time and is killed after
    // --hook-timeout.
    w.publish("v2.0.0", &[("demo.env", b"DEMO_IGNORE_TERM=1\n", 0o644)]);
    wait_for("v2.0.0 served", Duration::from_secs(60), || load.version() == "v2.0.0");
    let v2_pid = app_pid(w.addr());
    w.publish("v3.0.0", &[]);
    wait_for("v3.0.0 served", Duration::from_secs(60), || load.version() == "v3.0.0");
    wait_for(
        "the SIGTERM-ignoring generation killed",
        Duration::from_secs(10),
        || {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(v2_pid), None).is_err()
                || std::fs::read_to_string(format!("/proc/{v2_pid}/stat")).is_ok_and(|s| s.contains(") Z "))
        },
    );
    assert!(
        processes_with("-c\u{0}sleep 600; echo late").is_empty() && processes_with("sleep\u{0}600\u{0}").is_empty(),
        "the hung hook was left running"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failed, errors) = load.finish();

    // dewy itself is SIGKILLed: the app dies with it (no orphan), and a new
    // dewy converges on the same release.
    let dewy_pid = dewy.id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dewy_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut dewy = dewy;
    dewy.wait().unwrap();
    let app_dir = w.app().join("releases").display().to_string();
    wait_for("no orphan app processes", Duration::from_secs(10), || {
        processes_with(&app_dir).is_empty()
    });
    let dewy = Reaped(w.dewy(&w.file_registry(), &[]).spawn().unwrap());
    wait_for("v3.0.0 served after dewy's restart", Duration::from_secs(60), || {
        w.serving("v3.0.0")
    });
    stop(dewy);
    wait_for("the app stopped with dewy", Duration::from_secs(10), || {
        processes_with(&app_dir).is_empty()
    });
    // Only the request in flight on the killed process may fail.
    assert!(crash_failures <= 1, "crash failures: {errors:?}");
    assert!(failed <= 1, "failed requests: {errors:?}");
    w.assert_releases_complete();
    record(
        "process faults",
        "app SIGKILLed, app ignoring SIGTERM, before hook hanging, dewy SIGKILLed and restarted",
        ok,
        failed,
        "app restarted; stuck generation and hook killed after their timeouts; no orphans; converged (at most the one request in flight on the killed app fails)",
    );
}

fn pid_in(body: &str) -> Option<i32> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("pid=")?.parse().ok())
}

/// The pid of the generation answering now.
fn app_pid(addr: SocketAddr) -> i32 {
    pid_in(&get(addr, "/").unwrap().1).expect("the demo app says its pid")
}

/// A server that accepts connections and never answers (a slow Slack).
fn black_hole() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
            if held.len() > 50 {
                break;
            }
        }
    });
    (addr, t)
}

#[test]
fn notifier_faults_do_not_delay_deploys() {
    let (slow, _t) = black_hole();
    let (slow_mail, _m) = black_hole();
    let closed = dewy_testkit::free_port();
    for (name, notifier, api) in [
        (
            "Slack down",
            "slack://deploys".to_owned(),
            format!("http://127.0.0.1:{closed}/api"),
        ),
        (
            "Slack never answers",
            "slack://deploys".to_owned(),
            format!("http://{slow}/api"),
        ),
        (
            "SMTP down",
            format!("mail://127.0.0.1:{closed}/ops@example.com?from=dewy@example.com&tls=none"),
            String::new(),
        ),
        (
            "SMTP never answers",
            format!("mail://{slow_mail}/ops@example.com?from=dewy@example.com&tls=none"),
            String::new(),
        ),
    ] {
        let w = World::new();
        w.publish("v1.0.0", &[]);
        let mut cmd = w.dewy(&w.file_registry(), &["--notifier", &notifier]);
        cmd.env("SLACK_TOKEN", "xoxb-test").env("SLACK_API_URL", &api);
        let dewy = Reaped(cmd.spawn().unwrap());
        wait_for("v1.0.0 served", Duration::from_secs(60), || w.serving("v1.0.0"));
        let load = Load::start(w.addr());
        let published = Instant::now();
        w.publish("v2.0.0", &[]);
        wait_for("v2.0.0 served", Duration::from_secs(30), || load.version() == "v2.0.0");
        let took = published.elapsed();
        let (ok, failed, errors) = load.finish();
        stop(dewy);
        assert!(took < Duration::from_secs(8), "{name}: the deploy took {took:?}");
        assert_eq!(failed, 0, "{name}: {errors:?}");
        record(
            &format!("notifier faults: {name}"),
            name,
            ok,
            failed,
            &format!("v2 served {:.1} s after publishing (interval 1 s)", took.as_secs_f64()),
        );
    }
}
