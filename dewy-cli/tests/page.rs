//! The status page in a real browser (headless chromium through
//! chromedriver): what it shows, its actions with and without the admin
//! token, and that it notices when dewy stops.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use dewy_testkit::browser::Browser;

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn release(reg: &Path, demo: &[u8], tag: &str, extra: &[(&str, &[u8], u32)]) {
    let mut files: Vec<(&str, &[u8], u32)> = vec![("demo-app", demo, 0o755), ("VERSION", tag.as_bytes(), 0o644)];
    files.extend_from_slice(extra);
    dewy_testkit::publish(reg, tag, "demo_linux_amd64.tar.gz", &dewy_testkit::targz(&files));
}

#[test]
fn the_status_page_shows_the_timeline_and_acts_with_the_token() {
    let demo = std::fs::read(dewy_testkit::demo_app()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    let (port, admin_port) = (dewy_testkit::free_port(), dewy_testkit::free_port());
    let mut cmd = Command::cargo_bin("dewy").unwrap();
    for (k, _) in std::env::vars() {
        if k.starts_with("DEWY_") {
            cmd.env_remove(k);
        }
    }
    let log = dir.path().join("dewy.log");
    let mut dewy = dewy_testkit::Reaped(
        cmd.current_dir(&app)
            .args(["server", "--registry", &format!("file://{}", reg.display())])
            .args(["-p", &format!("127.0.0.1:{port}"), "-i", "1"])
            .args(["--admin-port", &admin_port.to_string(), "--admin-token", "page-token"])
            .args(["--", "current/demo-app"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let serving =
        |v: &str| dewy_testkit::http_get(addr, "/").is_ok_and(|(_, b)| b.starts_with(&format!("version={v}")));
    for tag in ["v1.0.0", "v2.0.0", "v3.0.0"] {
        release(&reg, &demo, tag, &[]);
        wait_for(tag, Duration::from_secs(30), || serving(tag));
    }
    // A v4 that exits at start: recorded as failed, v3 keeps serving.
    release(&reg, &demo, "v4.0.0", &[("demo.env", b"DEMO_EXIT_AT_START=1\n", 0o644)]);
    wait_for("v4 recorded bad", Duration::from_secs(30), || {
        std::fs::read_to_string(app.join(".dewy/history.jsonl")).is_ok_and(|h| h.contains("\"failed\""))
    });

    // Without JavaScript: the essentials are in the HTML itself.
    let (status, html) = dewy_testkit::http_get(([127, 0, 0, 1], admin_port).into(), "/").unwrap();
    assert_eq!(status, 200);
    assert!(
        html.contains("<div class=\"big\" id=\"version\">v3.0.0</div>"),
        "{html}"
    );
    assert!(html.len() < 100 * 1024);

    let browser = Browser::start();
    let page = format!("http://127.0.0.1:{admin_port}/");
    browser.goto(&page);
    wait_for("the page's first refresh", Duration::from_secs(10), || {
        browser.text("#updated").starts_with("Updated")
    });
    assert_eq!(browser.text("#version"), "v3.0.0");
    assert_eq!(browser.text("#running"), "running");
    assert!(browser.text("#bad").starts_with("v4.0.0"), "{}", browser.text("#bad"));
    // Four entries: three deploys and the failure with its reason.
    assert_eq!(browser.count("#timeline-svg .event"), 4);
    assert_eq!(browser.count("#timeline-svg .event.failed"), 1);
    let rows = browser.texts("#events li");
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(
        rows[0].contains("v4.0.0") && rows[0].contains("failed") && rows[0].contains("exit"),
        "the failure's reason: {rows:?}"
    );
    assert_eq!(browser.count("#releases tr"), 3, "three releases on disk");
    // The fleet: this host alone, from its heartbeat in the cache.
    assert_eq!(browser.count("#fleet tr.host"), 1);

    // No token typed: actions are disabled, saying why.
    assert_eq!(browser.property("#act-restart", "disabled"), true);
    assert!(browser.text("#auth-reason").contains("admin token"));

    // A wrong token: the rollback is refused, v3 stays.
    browser.type_into("#token", "wrong-token");
    assert_eq!(browser.property("#act-restart", "disabled"), false);
    browser.click("button[data-rollback='v2.0.0']");
    assert!(browser.accept_dialog().contains("Roll back to v2.0.0"));
    wait_for("the refusal", Duration::from_secs(10), || {
        browser.text("#action-result").contains("refused (401)")
    });
    assert!(serving("v3.0.0"));

    // The right token: rolled back through the page, and pinned.
    browser.type_into("#token", "page-token");
    browser.click("button[data-rollback='v2.0.0']");
    browser.accept_dialog();
    wait_for("v2 in place", Duration::from_secs(30), || {
        browser.text("#version") == "v2.0.0" && browser.text("#pinned") == "v2.0.0"
    });
    wait_for("v2 serving", Duration::from_secs(30), || serving("v2.0.0"));
    wait_for(
        "the rollback on the timeline and in the fleet",
        Duration::from_secs(10),
        || browser.count("#timeline-svg .event.rolled-back") == 1 && browser.text("#fleet tr.host").contains("v2.0.0"),
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    browser.screenshot(&shot);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);

    // dewy stops: the page says so instead of showing stale data as current.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dewy.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(dewy.wait().unwrap().code(), Some(0));
    wait_for("the unreachable banner", Duration::from_secs(10), || {
        browser.execute("return document.body.classList.contains('stale')") == true
    });
    assert!(browser.text("#banner").contains("dewy is unreachable"));
}
