//! The real `dewy` binary in temporary folders: help, version, validation
//! errors, configuration precedence, and a full `dewy server` run.

mod common;

use common::otlp_grpc_collector;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;

fn dewy(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("dewy").unwrap();
    cmd.current_dir(dir).env_remove("DEWY_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("DEWY_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = run(dewy(dir.path()).arg("--help"));
    assert_eq!(code, 0);
    assert!(out.contains("server") && out.contains("assets"), "{out}");
    let (code, out, _) = run(dewy(dir.path()).arg("help"));
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = run(dewy(dir.path()).args(["server", "--help"]));
    assert_eq!(code, 0);
    for flag in [
        "--registry",
        "--cache",
        "--notifier",
        "--interval",
        "--port",
        "--log-level",
        "--log-format",
        "--before-deploy-hook",
        "--after-deploy-hook",
        "--slot",
        "--calver",
        "--keep-releases",
        "--grace-period",
        "--hook-timeout",
        "--workdir",
    ] {
        assert!(out.contains(flag), "{flag} missing from help:\n{out}");
    }
    let (code, out, _) = run(dewy(dir.path()).arg("--version"));
    assert_eq!(code, 0);
    // Dewy's shape: `dewy version: X [commit, date]`, the commit and its
    // date embedded at build time.
    let rest = out
        .trim()
        .strip_prefix(&format!("dewy version: {} [", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("{out}"));
    let (commit, date) = rest.trim_end_matches(']').split_once(", ").unwrap();
    assert!(commit.len() == 7 || commit == "unknown", "{out}");
    assert!(date.parse::<jiff::Timestamp>().is_ok() || date == "unknown", "{out}");
    let (code, out2, _) = run(dewy(dir.path()).arg("-v"));
    assert_eq!((code, out2.as_str()), (0, out.as_str()));
    let (code, stdout, stderr) = run(dewy(dir.path()).args(["--version", "-f", "json"]));
    assert_eq!((code, stdout.as_str()), (0, ""));
    let record: serde_json::Value = serde_json::from_str(stderr.trim()).unwrap();
    assert_eq!(record["msg"], "Dewy version");
    assert_eq!(record["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(record["commit"].as_str().unwrap(), commit);
}

#[test]
fn completions_and_man_page_are_printed() {
    let dir = tempfile::tempdir().unwrap();
    let (code, bash, _) = run(dewy(dir.path()).args(["completions", "bash"]));
    assert_eq!(code, 0);
    assert!(bash.contains("--registry") && bash.contains("clear-bad"), "{bash}");
    let script = dir.path().join("dewy.bash");
    std::fs::write(&script, &bash).unwrap();
    let (code, _, err) = run(Command::new("bash").arg("-n").arg(&script));
    assert_eq!(code, 0, "bash -n: {err}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let (code, out, _) = run(dewy(dir.path()).args(["completions", shell]));
        assert!(code == 0 && out.contains("registry"), "{shell}");
    }
    let (code, _, err) = run(dewy(dir.path()).args(["completions", "tcsh"]));
    assert_eq!(code, 2, "{err}");
    let (code, man, _) = run(dewy(dir.path()).arg("man"));
    assert_eq!(code, 0);
    assert!(man.contains(".TH dewy 1") && man.contains("registry"), "{man}");
}

#[test]
fn every_bad_value_is_a_usage_error_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["assets", "--registry", "file:///nonexistent"];
    let cases: &[(&[&str], &str)] = &[
        (&["assets"], "--registry"),
        (&["assets", "--registry", "/srv/releases"], "--registry"),
        (&[&base[..], &["--interval", "0"]].concat(), "--interval"),
        (&[&base[..], &["--interval", "soon"]].concat(), "--interval"),
        (&[&base[..], &["--log-level", "loud"]].concat(), "--log-level"),
        (&[&base[..], &["--log-format", "xml"]].concat(), "--log-format"),
        (&[&base[..], &["--keep-releases", "0"]].concat(), "--keep-releases"),
        (&[&base[..], &["--grace-period", "x"]].concat(), "--grace-period"),
        (&[&base[..], &["--hook-timeout", "0"]].concat(), "--hook-timeout"),
        (&[&base[..], &["--calver", "abc"]].concat(), "--calver"),
        (&[&base[..], &["--cache", "/tmp/cache"]].concat(), "--cache"),
        (&[&base[..], &["--notifier", "slack"]].concat(), "--notifier"),
        (&[&base[..], &["--workdir", "/nonexistent/dir"]].concat(), "--workdir"),
        (
            &[&base[..], &["--otlp-endpoint", "collector"]].concat(),
            "--otlp-endpoint",
        ),
        (
            &[&base[..], &["--otlp-endpoint", "host:99999"]].concat(),
            "--otlp-endpoint",
        ),
        (
            &["server", "--registry", "file:///x", "-p", "70000", "--", "sh"],
            "--port",
        ),
        (&["server", "--registry", "file:///x"], "COMMAND"),
        (
            &["server", "--registry", "file:///x", "--", "no-such-program-xyz"],
            "COMMAND",
        ),
        (&["assets", "--bogus"], "--bogus"),
        (
            &[
                "container",
                "--registry",
                "img://127.0.0.1:1/a/b",
                "-p",
                "8080",
                "--calver",
                "abc",
            ],
            "--calver",
        ),
        (
            &[
                "container",
                "--registry",
                "img://127.0.0.1:1/a/b",
                "-p",
                "8080",
                "--otlp-endpoint",
                "collector",
            ],
            "--otlp-endpoint",
        ),
        (
            &[
                "container",
                "--registry",
                "img://127.0.0.1:1/a/b",
                "-p",
                "8080",
                "--otlp-interval",
                "0",
            ],
            "--otlp-interval",
        ),
        (
            &[
                "container",
                "--registry",
                "img://127.0.0.1:1/a/b",
                "-p",
                "8080",
                "--slot",
                "blue",
            ],
            "--slot",
        ),
        (&[&base[..], &["--verify-key", "RWQnot-a-key"]].concat(), "--verify-key"),
        (
            &[&base[..], &["--verify-key", "@/nonexistent.pub"]].concat(),
            "--verify-key",
        ),
        (&[&base[..], &["--require-signature"]].concat(), "--require-signature"),
        (
            &[
                "server",
                "--registry",
                "file:///x",
                "--health-path",
                "health",
                "--",
                "sh",
            ],
            "--health-path",
        ),
        (
            &[
                "server",
                "--registry",
                "file:///x",
                "--health-path",
                "/h",
                "--ready-notify",
                "--",
                "sh",
            ],
            "--health-path",
        ),
        (
            &["server", "--registry", "file:///x", "--stop-timeout", "0", "--", "sh"],
            "--stop-timeout",
        ),
        (
            &["server", "--registry", "file:///x", "--health-soak", "5s", "--", "sh"],
            "--health-soak",
        ),
        (
            &[
                "server",
                "--registry",
                "file:///x",
                "--health-command",
                "true",
                "--",
                "sh",
            ],
            "--health-command",
        ),
        (
            &[
                "server",
                "--registry",
                "file:///x",
                "--health-path",
                "/h",
                "--health-interval",
                "0",
                "--",
                "sh",
            ],
            "--health-interval",
        ),
    ];
    for (args, flag) in cases {
        let (code, _, err) = run(dewy(dir.path()).args(*args));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: message does not name {flag}: {err}");
    }
    // DEWY_VERIFY_KEY: one key, or several separated by commas.
    let (code, _, err) = run(dewy(dir.path()).args(base).env("DEWY_VERIFY_KEY", "RWQgood,garbage"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--verify-key") && err.contains("`RWQgood`"), "{err}");
}

#[test]
fn flag_beats_env_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dewy.toml"),
        "registry = \"file:///from-file\"\ninterval = \"0\"\n",
    )
    .unwrap();
    // The file's bad interval is reported with its key.
    let (code, _, err) = run(dewy(dir.path()).args(["assets"]));
    assert_eq!(code, 2);
    assert!(err.contains("interval"), "{err}");
    // The environment overrides the file; its bad value is named too.
    let (code, _, err) = run(dewy(dir.path()).arg("assets").env("DEWY_INTERVAL", "never"));
    assert_eq!(code, 2);
    assert!(err.contains("`never`"), "env overrides file: {err}");
    // The flag overrides both.
    let (code, _, err) = run(dewy(dir.path())
        .args(["assets", "--interval", "nope"])
        .env("DEWY_INTERVAL", "never"));
    assert_eq!(code, 2);
    assert!(err.contains("`nope`"), "flag overrides env: {err}");
    // Unknown keys in the file are errors.
    std::fs::write(
        dir.path().join("dewy.toml"),
        "registry = \"file:///x\"\nregistery = \"typo\"\n",
    )
    .unwrap();
    let (code, _, err) = run(dewy(dir.path()).arg("assets"));
    assert_eq!(code, 2);
    assert!(err.contains("registery"), "{err}");
}

/// `dewy server` on the `file://` registry `reg`, holding 127.0.0.1:`port`,
/// checking every second.
fn server_cmd(app: &Path, reg: &Path, port: u16) -> Command {
    let mut cmd = dewy(app);
    cmd.args([
        "server",
        "--registry",
        &format!("file://{}", reg.display()),
        "-p",
        &format!("127.0.0.1:{port}"),
        "-i",
        "1",
    ]);
    cmd
}

/// Publishes the demo app as release `tag` (with a VERSION file and
/// `extra` files) into the `file://` registry at `reg`.
fn release(reg: &Path, demo: &[u8], tag: &str, extra: &[(&str, &[u8], u32)]) {
    let mut files: Vec<(&str, &[u8], u32)> = vec![("demo-app", demo, 0o755), ("VERSION", tag.as_bytes(), 0o644)];
    files.extend_from_slice(extra);
    dewy_testkit::publish(reg, tag, "demo_linux_amd64.tar.gz", &dewy_testkit::targz(&files));
}

/// SIGTERM to a `dewy` child; it must exit 0.
fn terminate(child: &mut std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(
        child.wait().unwrap().code(),
        Some(0),
        "dewy did not exit cleanly on SIGTERM"
    );
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn server_deploys_v1_then_v2_and_stops_on_sigterm() {
    let demo = std::fs::read(dewy_testkit::demo_app()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    let publish = |tag: &str| release(&reg, &demo, tag, &[]);
    publish("v1.0.0");
    let port = dewy_testkit::free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = server_cmd(&app, &reg, port)
        .args(["-f", "json"])
        .args(["--", "current/demo-app"])
        .env("GITHUB_TOKEN", "must-not-leak")
        .env("DEWY_ADMIN_TOKEN", "must-not-leak-admin")
        .env("DEWY_WEBHOOK_SECRET", "must-not-leak-webhook")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let body = || dewy_testkit::http_get(addr, "/").map(|(_, b)| b).unwrap_or_default();
    wait_for("v1", Duration::from_secs(30), || body().starts_with("version=v1.0.0"));
    publish("v2.0.0");
    wait_for("v2", Duration::from_secs(30), || {
        body().starts_with("version=v2.0.0 generation=2")
    });
    // SIGUSR1 restarts the application gracefully.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    wait_for("generation 3", Duration::from_secs(30), || {
        body().starts_with("version=v2.0.0 generation=3")
    });
    // `dewy rollback` while dewy runs: back to v1, restarted, pinned; a new
    // release waits until `dewy unpin`.
    let (code, out, err) = run(dewy(&app).arg("rollback"));
    assert_eq!(code, 0, "{out}{err}");
    wait_for("v1 again", Duration::from_secs(30), || {
        body().starts_with("version=v1.0.0")
    });
    publish("v3.0.0");
    std::thread::sleep(Duration::from_secs(3));
    assert!(body().starts_with("version=v1.0.0"), "pinned: {}", body());
    let (code, out, _) = run(dewy(&app).args(["status", "--json"]));
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["pinned"], "v1.0.0");
    assert!(
        status["pid"].as_u64().is_some() && status["generation"].as_u64() >= Some(4),
        "{status}"
    );
    // v1 is the oldest release: nothing before it to roll back to.
    assert!(status["previous_release"].is_null(), "{status}");
    let (code, _, err) = run(dewy(&app).args(["rollback", "--to", "v9.9.9"]));
    assert_eq!(code, 1);
    assert!(err.contains("v9.9.9") && err.contains("v1.0.0"), "{err}");
    let (code, _, _) = run(dewy(&app).arg("unpin"));
    assert_eq!(code, 0);
    wait_for("v3", Duration::from_secs(30), || body().starts_with("version=v3.0.0"));
    // The new generation serves before its readiness interval is over; a
    // SIGTERM before the deploy has committed undoes it (see docs/server.md).
    wait_for("v3 committed", Duration::from_secs(30), || {
        let (_, out, _) = run(dewy(&app).args(["status", "--json"]));
        let status: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        status["current_version"] == "v3.0.0" && status["deploying"].is_null()
    });
    let pid: i32 = body().split("pid=").nth(1).unwrap().trim().parse().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("must-not-leak"),
        "secrets (GITHUB_TOKEN, DEWY_ADMIN_TOKEN, DEWY_WEBHOOK_SECRET) stay out of the app's environment"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
        "the app was stopped"
    );
    // JSON logs: time, level, msg first, then fields.
    let cached = log
        .lines()
        .find(|l| l.contains("\"Cached artifact\""))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(cached.starts_with("{\"time\":\""), "{cached}");
    let v: serde_json::Value = serde_json::from_str(cached).unwrap();
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["cache_key"], "v1.0.0--demo_linux_amd64.tar.gz");
    let current = std::fs::read_to_string(app.join("current/VERSION")).unwrap();
    assert_eq!(current, "v3.0.0");

    // `dewy releases` lists them, the current one first and marked.
    let (code, out, err) = run(dewy(&app).args(["releases", "--json"]));
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "{out}");
    assert_eq!(list[0]["version"], "v3.0.0");
    assert_eq!(list[0]["current"], true);
    assert_eq!(list[1]["version"], "v2.0.0");
    assert_eq!(list[2]["version"], "v1.0.0");
    let (code, table, _) = run(dewy(&app).arg("releases"));
    assert_eq!(code, 0);
    assert!(
        table.lines().nth(1).unwrap().starts_with('*') && table.contains("v1.0.0"),
        "{table}"
    );
    // Without a running dewy, rollback works on the folder directly.
    let (code, out, _) = run(dewy(&app).args(["pin", "v2.0.0"]));
    assert_eq!(code, 0);
    assert!(out.contains("no running dewy"), "{out}");
    assert_eq!(std::fs::read_to_string(app.join("current/VERSION")).unwrap(), "v2.0.0");
}

/// dewy killed with SIGKILL at several points of a deploy, then started
/// again: `current` always points to a complete release, the next run
/// converges on the newest version, and no application process is left
/// behind.
#[test]
fn sigkill_during_deploys_converges_after_restart() {
    let demo = std::fs::read(dewy_testkit::demo_app()).unwrap();
    let padding: Vec<u8> = (0..6_000_000u32)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    let publish = |tag: &str| release(&reg, &demo, tag, &[("data.bin", &padding, 0o644)]);
    let port = dewy_testkit::free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let start = || {
        server_cmd(&app, &reg, port)
            .args(["-l", "error"])
            .args(["--", "current/demo-app"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(dewy_testkit::Reaped)
            .unwrap()
    };
    let body = || dewy_testkit::http_get(addr, "/").map(|(_, b)| b).unwrap_or_default();
    let app_pids = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == app)
                    && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
            })
            .collect()
    };
    publish("v1.0.0");
    let mut dewy_proc = start();
    wait_for("v1", Duration::from_secs(30), || body().starts_with("version=v1.0.0"));
    for (i, delay_ms) in [0u64, 10, 40, 120, 300].into_iter().enumerate() {
        let tag = format!("v1.1.{i}");
        publish(&tag);
        std::thread::sleep(Duration::from_millis(1000 + delay_ms));
        dewy_proc.kill().unwrap();
        dewy_proc.wait().unwrap();
        // `current` is always a complete release.
        let version = std::fs::read_to_string(app.join("current/VERSION")).unwrap();
        assert!(version.starts_with("v1."), "{version}");
        assert_eq!(
            std::fs::metadata(app.join("current/data.bin")).unwrap().len(),
            padding.len() as u64
        );
        // The application follows dewy (parent-death signal), leaving no orphan.
        wait_for("the app to stop after dewy was killed", Duration::from_secs(10), || {
            app_pids().is_empty() && dewy_testkit::http_get(addr, "/").is_err()
        });
        dewy_proc = start();
        wait_for(&tag, Duration::from_secs(30), || {
            body().starts_with(&format!("version={tag}"))
        });
    }
    terminate(&mut dewy_proc);
    let leftovers: Vec<_> = std::fs::read_dir(app.join("releases"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "staging folders left: {leftovers:?}");
    assert!(app_pids().is_empty());
}

/// With `--health-path`, a new release that runs but fails its health check
/// is stopped instead of replacing v1: v1 keeps serving, no request fails,
/// and a healthy v3 replaces it. (While it is being probed, the new
/// generation shares the socket, as under Server::Starter.)
#[test]
fn health_path_gates_a_restart() {
    let demo = std::fs::read(dewy_testkit::demo_app()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    let publish = |tag: &str, health: &str| {
        let env = format!("DEMO_HEALTH_STATUS={health}\n");
        release(&reg, &demo, tag, &[("demo.env", env.as_bytes(), 0o644)]);
    };
    publish("v1.0.0", "200");
    let port = dewy_testkit::free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = server_cmd(&app, &reg, port)
        .args([
            "--health-path",
            "/health",
            "--health-timeout",
            "2s",
            "--",
            "current/demo-app",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let body = || dewy_testkit::http_get(addr, "/").map(|(_, b)| b).unwrap_or_default();
    wait_for("v1", Duration::from_secs(30), || body().starts_with("version=v1.0.0"));
    publish("v2.0.0", "500");
    // Give dewy time to try v2 (once: a release that failed is not retried
    // until a newer one appears); every request succeeds.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let (status, b) = dewy_testkit::http_get(addr, "/").unwrap();
        assert_eq!(status, 200, "{b}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Between attempts only v1 serves, and `current` is v1.
    wait_for("v1 alone", Duration::from_secs(5), || {
        std::fs::read_to_string(app.join("current/VERSION")).is_ok_and(|v| v == "v1.0.0")
            && body().starts_with("version=v1.0.0 generation=1")
    });
    publish("v3.0.0", "200");
    wait_for("v3", Duration::from_secs(30), || body().starts_with("version=v3.0.0"));
    // A v4 that exits at start: v3 keeps answering every request.
    let env = "DEMO_EXIT_AT_START=1\n";
    release(&reg, &demo, "v4.0.0", &[("demo.env", env.as_bytes(), 0o644)]);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (status, b) = dewy_testkit::http_get(addr, "/").unwrap();
        assert_eq!(status, 200, "{b}");
        assert!(b.starts_with("version=v3.0.0"), "{b}");
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(log.contains("answered 500"), "the failure names the cause:\n{log}");
}

fn http(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

/// Parses Prometheus text exposition strictly enough to catch a malformed
/// line: every sample is `name{labels} value` with a `# TYPE` before it.
fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap().to_owned();
            assert!(
                matches!(
                    parts.next(),
                    Some("counter" | "gauge" | "histogram" | "summary" | "untyped")
                ),
                "{line}"
            );
            if line.ends_with(" histogram") {
                typed.insert(format!("{name} histogram"));
            }
            typed.insert(name);
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("malformed sample: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "bad labels: {line}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
                assert!(
                    !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                    "bad label: {line}"
                );
            }
        }
        // OpenMetrics: a counter `NAME` has samples `NAME_total`, a
        // histogram `NAME_bucket`, `NAME_sum` and `NAME_count`.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| typed.contains(&format!("{base} histogram")))
            .or_else(|| name.strip_suffix("_total").filter(|base| typed.contains(*base)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its # TYPE: {line}");
        samples.insert(
            series.to_owned(),
            value.parse::<f64>().unwrap_or_else(|_| panic!("bad value: {line}")),
        );
    }
    samples
}

/// The admin API: status over the owner-only socket, metrics, bearer-token
/// and webhook-signature refusals, and a webhook-triggered deploy that does
/// not wait for the (long) interval.
#[test]
fn admin_api_status_metrics_and_webhook() {
    use hmac::Mac;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    let site = |tag: &str| dewy_testkit::targz(&[("index.html", tag.as_bytes(), 0o644)]);
    dewy_testkit::publish(&reg, "v1.0.0", "site.tar.gz", &site("v1.0.0"));
    let port = dewy_testkit::free_port();
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = dewy(&app)
        .args([
            "assets",
            "--registry",
            &format!("file://{}?artifact=site.tar.gz", reg.display()),
            "-i",
            "300",
        ])
        .args([
            "--admin-port",
            &port.to_string(),
            "--admin-token",
            "t0ken",
            "--webhook-secret",
            "hook-secret",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    wait_for("v1", Duration::from_secs(30), || {
        std::fs::read_to_string(app.join("current/index.html")).is_ok_and(|v| v == "v1.0.0")
    });
    let sock = app.join(".dewy/admin.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);

    wait_for("status", Duration::from_secs(10), || {
        let (code, out, _) = run(dewy(&app).args(["status", "--json"]));
        code == 0 && serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|v| v["current_version"] == "v1.0.0")
    });
    let (code, out, _) = run(dewy(&app).arg("status"));
    assert_eq!(code, 0);
    assert!(out.contains("last_outcome") && out.contains("deployed"), "{out}");

    let (status, metrics) = http(admin, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    let before = parse_prometheus(&metrics);
    assert_eq!(before["dewy_deployments_total{command=\"assets\"}"], 1.0, "{metrics}");
    assert_eq!(before["dewy_downloads_total"], 1.0, "{metrics}");
    assert!(before["dewy_download_bytes_total"] > 0.0, "{metrics}");
    assert!(
        before["dewy_registry_requests_total{result=\"release\"}"] >= 1.0,
        "{metrics}"
    );
    assert!(before.keys().any(|k| k.starts_with("dewy_info{")), "{metrics}");
    for phase in ["download", "extract", "hooks", "start"] {
        let key = format!("dewy_deploy_phase_milliseconds_total{{phase=\"{phase}\"}}");
        assert!(before.contains_key(&key), "{key} missing:\n{metrics}");
    }
    assert!(
        before.contains_key("dewy_registry_http_requests_total{answer=\"not_modified\"}"),
        "{metrics}"
    );
    assert!(before.contains_key("dewy_registry_rate_limited_total"), "{metrics}");

    // Mutating calls over TCP need the token.
    assert_eq!(http(admin, "POST /api/check HTTP/1.0\r\n\r\n").0, 401);
    assert_eq!(
        http(admin, "POST /api/check HTTP/1.0\r\nAuthorization: Bearer wrong\r\n\r\n").0,
        401
    );
    assert_eq!(
        http(admin, "POST /api/check HTTP/1.0\r\nAuthorization: Bearer t0ken\r\n\r\n").0,
        202
    );
    // Let that check finish before v2 is published.
    wait_for("the requested check", Duration::from_secs(10), || {
        let (_, out, _) = run(dewy(&app).args(["status", "--json"]));
        serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|v| v["last_outcome"] == "skipped")
    });

    // A webhook with a bad signature is refused; a signed release event
    // deploys v2 at once although the interval is five minutes.
    dewy_testkit::publish(&reg, "v2.0.0", "site.tar.gz", &site("v2.0.0"));
    let body = r#"{"action":"published","release":{"tag_name":"v2.0.0"}}"#;
    let bad = format!(
        "POST /webhook/github HTTP/1.0\r\nX-GitHub-Event: release\r\nX-Hub-Signature-256: sha256={}\r\nContent-Length: {}\r\n\r\n{body}",
        "00".repeat(32),
        body.len()
    );
    assert_eq!(http(admin, &bad).0, 401);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read_to_string(app.join("current/index.html")).unwrap(),
        "v1.0.0"
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hook-secret").unwrap();
    mac.update(body.as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    let good = format!(
        "POST /webhook/github HTTP/1.0\r\nX-GitHub-Event: release\r\nX-Hub-Signature-256: sha256={sig}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(http(admin, &good).0, 202);
    wait_for("v2 by webhook", Duration::from_secs(10), || {
        std::fs::read_to_string(app.join("current/index.html")).is_ok_and(|v| v == "v2.0.0")
    });
    // The series move.
    wait_for("metrics after v2", Duration::from_secs(10), || {
        let after = parse_prometheus(&http(admin, "GET /metrics HTTP/1.0\r\n\r\n").1);
        after["dewy_deployments_total{command=\"assets\"}"] == 2.0
            && after["dewy_downloads_total"] == 2.0
            && after["dewy_ticks_total{outcome=\"deployed\"}"] == 2.0
            && after["dewy_deployment_duration_seconds_count{command=\"assets\"}"] == 2.0
            && after["dewy_deployment_duration_seconds_bucket{le=\"+Inf\",command=\"assets\"}"] == 2.0
            && after["dewy_deployment_duration_seconds_bucket{le=\"600.0\",command=\"assets\"}"] == 2.0
    });

    terminate(&mut child);
    assert!(!sock.exists(), "the socket is removed on shutdown");
}

/// With `--health-soak`, a release that turns unhealthy after it passed its
/// readiness check is rolled back, with no failed request from a client
/// running throughout, is not redeployed on the next ticks, and is replaced
/// when a newer release appears.
#[test]
fn unhealthy_release_during_soak_is_rolled_back() {
    let demo = std::fs::read(dewy_testkit::demo_app()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    release(&reg, &demo, "v1.0.0", &[]);
    let port = dewy_testkit::free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = server_cmd(&app, &reg, port)
        .args([
            "--health-path",
            "/health",
            "--health-soak",
            "3s",
            "--health-interval",
            "200ms",
        ])
        .args([
            "--after-deploy-hook",
            "echo \"$DEWY_VERSION rollback=${DEWY_ROLLBACK:-0}\" >> hooks.log",
            "--",
            "current/demo-app",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let body = || dewy_testkit::http_get(addr, "/").map(|(_, b)| b).unwrap_or_default();
    wait_for("v1", Duration::from_secs(30), || body().starts_with("version=v1.0.0"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match dewy_testkit::http_get(addr, "/") {
                    Ok((200, _)) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        })
    };
    release(
        &reg,
        &demo,
        "v2.0.0",
        &[("demo.env", b"DEMO_UNHEALTHY_AFTER_MS=1000\n", 0o644)],
    );
    wait_for("v2 to start", Duration::from_secs(30), || {
        body().starts_with("version=v2.0.0")
    });
    wait_for("the rollback to v1", Duration::from_secs(30), || {
        body().starts_with("version=v1.0.0")
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(body().starts_with("version=v1.0.0"), "v2 redeployed: {}", body());
    assert_eq!(std::fs::read_to_string(app.join("current/VERSION")).unwrap(), "v1.0.0");
    release(&reg, &demo, "v3.0.0", &[]);
    wait_for("v3", Duration::from_secs(30), || body().starts_with("version=v3.0.0"));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = client.join().unwrap();
    assert!(ok > 50, "the client ran: {ok}");
    assert!(failed.is_empty(), "{} failed requests: {failed:?}", failed.len());
    let hooks = std::fs::read_to_string(app.join("hooks.log")).unwrap();
    assert!(hooks.contains("v1.0.0 rollback=1"), "{hooks}");
    let history = std::fs::read_to_string(app.join(".dewy/history.jsonl")).unwrap();
    assert!(history.contains("failed its health check"), "{history}");
    // The bad record of v2 is in the cache; an operator can clear it.
    let (code, out, err) = run(dewy(&app).arg("clear-bad"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cleared 1 bad release records"), "{out}");
    terminate(&mut child);
}

/// Two apps sharing one cache folder (`DEWY_CACHEDIR`) each keep their own
/// `current`: neither redeploys the other's release every tick (Dewy did).
#[test]
fn a_fresh_host_deploys_the_previous_release_while_the_newest_is_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("reg"));
    std::fs::create_dir_all(&app).unwrap();
    let site = |v: &str| dewy_testkit::targz(&[("index.html", v.as_bytes(), 0o644)]);
    dewy_testkit::publish(&reg, "v1.0.0", "site.tar.gz", &site("v1.0.0"));
    // The newest release is being published: no artifact yet (grace period).
    std::fs::create_dir_all(reg.join("v1.1.0")).unwrap();
    std::fs::write(reg.join("v1.1.0/README.md"), "soon").unwrap();
    let log = dir.path().join("dewy.log");
    let mut child = dewy(&app)
        .args(["assets", "--registry", &format!("file://{}", reg.display()), "-i", "1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let served = |v: &str| std::fs::read_to_string(app.join("current/index.html")).is_ok_and(|x| x == v);
    wait_for("v1.0.0 deployed meanwhile", Duration::from_secs(30), || {
        served("v1.0.0")
    });
    std::thread::sleep(Duration::from_secs(2));
    dewy_testkit::publish(&reg, "v1.1.0", "site.tar.gz", &site("v1.1.0"));
    wait_for("v1.1.0 once complete", Duration::from_secs(30), || served("v1.1.0"));
    terminate(&mut child);
    let log = std::fs::read_to_string(&log).unwrap();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("deploying the newest complete release meanwhile"))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(
        said[0].contains("level=INFO") && said[0].contains("newest=v1.1.0") && said[0].contains("version=v1.0.0"),
        "{}",
        said[0]
    );
}

/// A host switching from Dewy with `DEWY_CACHEDIR`: Dewy's `current`
/// record is adopted, so the release in place is not deployed again.
#[test]
fn switching_from_dewy_with_a_shared_cache_dir_does_not_redeploy() {
    let dir = tempfile::tempdir().unwrap();
    let (app, reg, cache) = (dir.path().join("app"), dir.path().join("reg"), dir.path().join("cache"));
    let artifact = dewy_testkit::targz(&[("index.html", b"one", 0o644)]);
    dewy_testkit::publish(&reg, "v1.0.0", "site.tar.gz", &artifact);
    // What Dewy left: a release folder, `current`, and its cache.
    let release = app.join("releases/20250101T000000Z");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::write(release.join("index.html"), "one").unwrap();
    std::os::unix::fs::symlink(&release, app.join("current")).unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("v1.0.0--site.tar.gz"), &artifact).unwrap();
    std::fs::write(cache.join("current"), "v1.0.0--site.tar.gz").unwrap();
    let log = dir.path().join("dewy.log");
    let mut child = dewy(&app)
        .args([
            "assets",
            "--registry",
            &format!("file://{}", reg.display()),
            "-i",
            "1",
            "-l",
            "debug",
        ])
        .env("DEWY_CACHEDIR", &cache)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    wait_for("three checks", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.matches("Deploy skipped").count() >= 3 || l.contains("Create symlink"))
    });
    terminate(&mut child);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("Adopted Dewy's record of the release in place"), "{log}");
    assert!(!log.contains("Create symlink"), "redeployed:\n{log}");
    assert_eq!(std::fs::read_link(app.join("current")).unwrap(), release);
    assert_eq!(
        std::fs::read_to_string(cache.join("current")).unwrap(),
        "v1.0.0--site.tar.gz",
        "Dewy's record is left as it was"
    );
}

#[test]
fn two_apps_sharing_a_cache_do_not_redeploy_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("shared-cache");
    let mut children = Vec::new();
    let mut apps = Vec::new();
    for name in ["a", "b"] {
        let (app, reg) = (
            dir.path().join(format!("app-{name}")),
            dir.path().join(format!("reg-{name}")),
        );
        std::fs::create_dir_all(&app).unwrap();
        // Artifact keys are `<tag>--<artifact>`, shared on purpose by a
        // fleet of one app; different apps publish different artifact names.
        let artifact = format!("site-{name}.tar.gz");
        dewy_testkit::publish(
            &reg,
            "v1.0.0",
            &artifact,
            &dewy_testkit::targz(&[("index.html", name.as_bytes(), 0o644)]),
        );
        let child = dewy(&app)
            .args([
                "assets",
                "--registry",
                &format!("file://{}?artifact={artifact}", reg.display()),
                "-i",
                "1",
            ])
            .env("DEWY_CACHEDIR", &cache)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(dewy_testkit::Reaped)
            .unwrap();
        children.push(child);
        apps.push(app);
    }
    for (app, name) in apps.iter().zip(["a", "b"]) {
        wait_for(name, Duration::from_secs(30), || {
            std::fs::read_to_string(app.join("current/index.html")).is_ok_and(|v| v == name)
        });
    }
    std::thread::sleep(Duration::from_secs(4));
    for app in &apps {
        let history = std::fs::read_to_string(app.join(".dewy/history.jsonl")).unwrap();
        let deploys = history
            .lines()
            .filter(|l| l.contains("\"outcome\":\"deployed\""))
            .count();
        assert_eq!(deploys, 1, "redeployed:\n{history}");
    }
    for mut c in children {
        terminate(&mut c);
    }
}

/// `HTTP_PROXY`/`HTTPS_PROXY` reach dewy's HTTP clients: the GitHub API,
/// the asset download and the S3 cache go through a real forward proxy.
#[test]
fn requests_go_through_the_proxy_from_the_environment() {
    let proxy = dewy_testkit::ForwardProxy::start();
    let gh = dewy_testkit::github::FakeGithub::start();
    let site = dewy_testkit::targz(&[("index.html", b"one", 0o644)]);
    gh.add_release("v1.0.0", &[("site_linux_amd64.tar.gz", &site)]);
    let s3 = dewy_testkit::S3Server::start();
    s3.create_bucket("cache");
    let dir = tempfile::tempdir().unwrap();
    let mut child = dewy(dir.path())
        .args([
            "assets",
            "--registry",
            "ghr://o/r?artifact=site_linux_amd64.tar.gz",
            "-i",
            "1",
        ])
        .args(["--cache", &format!("s3://us-east-1/cache/c?endpoint={}", s3.endpoint)])
        .env("GITHUB_API_URL", gh.api_url())
        .env("HTTP_PROXY", &proxy.url)
        .env("HTTPS_PROXY", &proxy.url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let deployed = std::panic::catch_unwind(|| {
        wait_for("v1.0.0 through the proxy", Duration::from_secs(60), || {
            std::fs::read_to_string(dir.path().join("current/index.html")).is_ok_and(|v| v == "one")
        })
    });
    terminate(&mut child);
    deployed.unwrap();
    let seen = proxy.requests();
    let through = |addr: String| seen.iter().any(|r| r.contains(&addr));
    assert!(
        through(format!("http://{}/repos/o/r/releases", gh.api_addr())),
        "GitHub API: {seen:#?}"
    );
    assert!(
        through(format!("http://{}/", gh.storage_addr())),
        "asset download: {seen:#?}"
    );
    assert!(through(format!("{}/cache/c/", s3.endpoint)), "S3 cache: {seen:#?}");
    // The fake GitHub saw the proxy's Via header on the API requests.
    assert!(
        gh.requests()
            .iter()
            .any(|r| r.header("via").is_some_and(|v| v.contains("tinyproxy")))
    );
}

/// Dewy's spellings of the GitHub settings: `GITHUB_ENDPOINT` for the API
/// base and `GITHUB_ARTIFACT` for the artifact name.
#[test]
fn github_endpoint_and_artifact_variables_are_read_as_dewy_reads_them() {
    let gh = dewy_testkit::github::FakeGithub::start();
    let site = |v: &str| dewy_testkit::targz(&[("index.html", v.as_bytes(), 0o644)]);
    gh.add_release(
        "v1.0.0",
        &[
            ("site_linux_amd64.tar.gz", &site("site")),
            ("docs_linux_amd64.tar.gz", &site("docs")),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let mut child = dewy(dir.path())
        .args(["assets", "--registry", "ghr://o/r", "-i", "1"])
        .env("GITHUB_ENDPOINT", gh.api_url())
        .env("GITHUB_ARTIFACT", "docs_linux_amd64.tar.gz")
        .env_remove("GITHUB_API_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    wait_for("the artifact GITHUB_ARTIFACT names", Duration::from_secs(30), || {
        std::fs::read_to_string(dir.path().join("current/index.html")).is_ok_and(|v| v == "docs")
    });
    terminate(&mut child);
}

#[test]
fn assets_from_github_releases_with_a_token_that_never_leaks() {
    let gh = dewy_testkit::github::FakeGithub::start();
    gh.add_token("ghp_topsecret");
    gh.set_private(true);
    let site = |v: &str| dewy_testkit::targz(&[("index.html", v.as_bytes(), 0o644)]);
    gh.add_release("v1.0.0", &[("site_linux_amd64.tar.gz", &site("one"))]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dewy.log");
    let mut child = dewy(dir.path())
        .args([
            "assets",
            "--registry",
            "ghr://o/r?artifact=site_linux_amd64.tar.gz",
            "-i",
            "1",
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--after-deploy-hook",
            "env > hook-env.txt",
        ])
        .env("GITHUB_API_URL", gh.api_url())
        .env("GH_TOKEN", "ghp_topsecret")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let current = dir.path().join("current/index.html");
    wait_for("v1.0.0 from GitHub", Duration::from_secs(30), || {
        std::fs::read_to_string(&current).is_ok_and(|v| v == "one")
    });
    gh.add_release("v1.1.0", &[("site_linux_amd64.tar.gz", &site("two"))]);
    wait_for("v1.1.0 from GitHub", Duration::from_secs(30), || {
        std::fs::read_to_string(&current).is_ok_and(|v| v == "two")
    });
    // A few more checks with nothing new (however loaded the machine is).
    let polls = || gh.requests().iter().filter(|r| r.uri.contains("/releases?")).count();
    let seen = polls();
    wait_for("two more checks", Duration::from_secs(30), || polls() >= seen + 2);
    terminate(&mut child);
    let requests = gh.requests();
    assert!(
        requests
            .iter()
            .filter(|r| r.host == "storage")
            .all(|r| r.header("authorization").is_none())
    );
    let lists: Vec<_> = requests.iter().filter(|r| r.uri.contains("/releases?")).collect();
    assert!(lists.len() >= 4, "polled every second: {}", lists.len());
    assert!(
        lists.iter().filter(|r| r.status == 304).count() >= lists.len() - 3,
        "polls between releases are 304: {lists:#?}"
    );
    let deployments = gh.deployments();
    assert_eq!(deployments.len(), 2, "one deployment record per deploy");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("ghp_topsecret"), "the token reached the log");
    let env = std::fs::read_to_string(dir.path().join("hook-env.txt")).unwrap();
    assert!(
        !env.contains("ghp_topsecret"),
        "the token reached the hook's environment"
    );
}

#[test]
fn a_denied_bucket_is_one_error_line_and_no_credential_is_logged_even_at_debug() {
    let (s3, user) = dewy_testkit::S3Server::start_with_auth("fleet");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dewy.log");
    let mut child = dewy(dir.path())
        .args([
            "assets",
            "--registry",
            &format!("s3://us-east-1/fleet/releases?endpoint={}", s3.endpoint),
            "--cache",
            &format!("s3://us-east-1/fleet/cache?endpoint={}", s3.endpoint),
            "-i",
            "1",
            "--log-level",
            "debug",
        ])
        .env("AWS_ACCESS_KEY_ID", &user.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &user.secret)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("five failed checks", Duration::from_secs(60), || {
        read().matches("Dewy run failure").count() >= 5
    });
    terminate(&mut child);
    let log = read();
    for secret in [&user.key_id, &user.secret] {
        assert!(!log.contains(secret.as_str()), "a credential is in the log:\n{log}");
    }
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("level=ERROR")).collect();
    assert_eq!(
        errors.len(),
        1,
        "one ERROR line for an unchanged failure:\n{}",
        errors.join("\n")
    );
    assert!(
        errors[0].contains("Dewy run failure") && errors[0].contains("AccessDenied") && errors[0].len() < 600,
        "{}",
        errors[0]
    );
    assert!(
        log.contains("Dewy run failure (unchanged)"),
        "later ticks at DEBUG:\n{log}"
    );
}

#[test]
fn a_fleet_on_s3_downloads_each_release_once_and_a_new_host_still_deploys() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let s3 = dewy_testkit::S3Server::start();
    s3.create_bucket("fleet");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = dewy_store::open_store(
        &url::Url::parse(&format!("s3://us-east-1/fleet/?endpoint={}", s3.endpoint)).unwrap(),
        &dewy_store::CloudOptions {
            aws_credentials: Some(("test".into(), "test".into(), None)),
            ..Default::default()
        },
    )
    .unwrap()
    .store;
    let publish = |tag: &str, body: &str| {
        let data = dewy_testkit::targz(&[("index.html", body.as_bytes(), 0o644)]);
        rt.block_on(store.put(
            &format!("releases/{tag}/site_linux_amd64.tar.gz"),
            data,
            dewy_store::Precondition::Any,
        ))
        .unwrap();
    };
    publish("v1.0.0", "one");
    let registry = format!(
        "s3://us-east-1/fleet/releases?endpoint={}&artifact=site_linux_amd64.tar.gz",
        s3.endpoint
    );
    let cache = format!("s3://us-east-1/fleet/cache?endpoint={}&registry-ttl=2s", s3.endpoint);
    let dir = tempfile::tempdir().unwrap();
    let spawn = |name: &str| {
        let app = dir.path().join(name);
        std::fs::create_dir_all(&app).unwrap();
        let child = dewy(&app)
            .args([
                "assets",
                "--registry",
                &registry,
                "--cache",
                &cache,
                "-i",
                "1",
                "--log-format",
                "json",
            ])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(app.join("dewy.log")).unwrap())
            .spawn()
            .map(dewy_testkit::Reaped)
            .unwrap();
        (app, child)
    };
    let mut hosts = vec![spawn("host-a"), spawn("host-b")];
    let on = |app: &Path, body: &str| std::fs::read_to_string(app.join("current/index.html")).is_ok_and(|v| v == body);
    for (app, _) in &hosts {
        wait_for("v1.0.0 on every host", Duration::from_secs(60), || on(app, "one"));
    }
    publish("v1.1.0", "two");
    for (app, _) in &hosts {
        wait_for("v1.1.0 on every host", Duration::from_secs(60), || on(app, "two"));
    }
    // A host that joins later deploys too (the Go original's fresh assets
    // host found the fleet's `current` in the bucket and never deployed).
    hosts.push(spawn("host-c"));
    wait_for("v1.1.0 on the new host", Duration::from_secs(60), || {
        on(&hosts[2].0, "two")
    });
    let mut downloads = 0;
    for (app, child) in &mut hosts {
        terminate(child);
        let log = std::fs::read_to_string(app.join("dewy.log")).unwrap();
        downloads += log.matches("\"Artifact downloaded\"").count();
        assert!(log.contains("Registry result cache enabled"), "{log}");
    }
    assert_eq!(
        downloads, 2,
        "each release is downloaded from upstream once by the whole fleet"
    );

    // With no dewy running, `clear-bad` clears the fleet's records in the
    // bucket (and only those): named by `--cache`, or found in dewy.toml
    // the way `dewy assets` finds it.
    let bad = "cache/bad.v1.1.0--site_linux_amd64.tar.gz";
    std::fs::write(hosts[1].0.join("dewy.toml"), format!("cache = \"{cache}\"\n")).unwrap();
    for (app, args) in [
        (&hosts[0].0, vec!["clear-bad", "--cache", &cache]),
        (&hosts[1].0, vec!["clear-bad"]),
    ] {
        rt.block_on(store.put(bad, b"{}".to_vec(), dewy_store::Precondition::Any))
            .unwrap();
        let out = dewy(app)
            .args(&args)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.contains("cleared 1 bad release records in s3://"),
            "{args:?}: {stdout}"
        );
        assert_eq!(
            rt.block_on(store.get(bad)).unwrap(),
            None,
            "{args:?}: the record is gone"
        );
    }
    assert!(
        rt.block_on(store.get("cache/v1.1.0--site_linux_amd64.tar.gz"))
            .unwrap()
            .is_some(),
        "artifacts stay"
    );
}

/// An OTLP/HTTP collector: records each request's path, content type and
/// body, and answers 200 with an empty protobuf message.
/// Requests an [`otlp_collector`] received: (path, content type, body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>;

fn otlp_collector() -> (u16, Received) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut length, mut content_type) = (0usize, String::new());
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':') {
                            match k.to_ascii_lowercase().as_str() {
                                "content-length" => length = v.trim().parse().unwrap_or(0),
                                "content-type" => content_type = v.trim().to_owned(),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_owned();
                    seen.lock().unwrap().push((path, content_type, body));
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
                    );
                }
            });
        }
    });
    (port, got)
}

#[test]
fn metrics_are_pushed_over_otlp() {
    let (port, got) = otlp_collector();
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    dewy_testkit::publish(
        &reg,
        "v1.0.0",
        "site_linux_amd64.tar.gz",
        &dewy_testkit::targz(&[("index.html", b"one", 0o644)]),
    );
    let mut child = dewy(&app)
        .args(["assets", "--registry", &format!("file://{}", reg.display()), "-i", "1"])
        .args([
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{port}/v1/metrics"),
            "--otlp-interval",
            "1s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let contains = |body: &[u8], text: &str| body.windows(text.len()).any(|w| w == text.as_bytes());
    wait_for(
        "an OTLP export with the deploy counted",
        Duration::from_secs(30),
        || {
            got.lock()
                .unwrap()
                .iter()
                .any(|(_, _, body)| contains(body, "dewy_deployments_total") && contains(body, "v1.0.0"))
        },
    );
    terminate(&mut child);
    let got = got.lock().unwrap();
    let (path, content_type, body) = got.last().unwrap();
    assert_eq!(path, "/v1/metrics");
    assert_eq!(content_type, "application/x-protobuf");
    for name in [
        "dewy_ticks_total",
        "dewy_registry_http_requests_total",
        "dewy_deploy_phase_milliseconds_total",
        "service.name",
    ] {
        assert!(contains(body, name), "{name} missing from the export");
    }
}

/// A Dewy user's unit line: `--telemetry --otlp-endpoint localhost:PORT
/// --otlp-insecure` starts, pushes over OTLP/gRPC and serves `/metrics` on
/// the admin port 17539 or the next free one.
#[test]
fn dewy_telemetry_flags_push_over_otlp_grpc_and_serve_metrics() {
    let (port, names) = otlp_grpc_collector();
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    dewy_testkit::publish(
        &reg,
        "v1.0.0",
        "site_linux_amd64.tar.gz",
        &dewy_testkit::targz(&[("index.html", b"one", 0o644)]),
    );
    let log = dir.path().join("dewy.log");
    let mut child = dewy(&app)
        .args(["assets", "--registry", &format!("file://{}", reg.display()), "-i", "1"])
        .args([
            "--telemetry",
            "--otlp-endpoint",
            &format!("localhost:{port}"),
            "--otlp-insecure",
            "--otlp-interval",
            "1s",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    wait_for("an OTLP/gRPC export with the deploy", Duration::from_secs(30), || {
        let names = names.lock().unwrap();
        names.iter().any(|n| n == "dewy_deployments_total")
            && names.iter().any(|n| n == "dewy_deployment_duration_seconds")
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let admin: u16 = text
        .lines()
        .find(|l| l.contains("Admin API port bound successfully"))
        .and_then(|l| l.split("port=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no admin port in the log:\n{text}"));
    assert!((17539..17549).contains(&admin), "{admin}");
    let (status, body) = http(([127, 0, 0, 1], admin).into(), "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    assert!(body.contains("dewy_deployments_total{"), "{body}");
    terminate(&mut child);
}

#[test]
fn an_unreachable_otlp_collector_is_logged_once_and_no_notification_counts_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    dewy_testkit::publish(
        &reg,
        "v1.0.0",
        "site_linux_amd64.tar.gz",
        &dewy_testkit::targz(&[("index.html", b"one", 0o644)]),
    );
    let closed = dewy_testkit::free_port();
    let admin = dewy_testkit::free_port();
    let log = dir.path().join("dewy.log");
    let mut child = dewy(&app)
        .args(["assets", "--registry", &format!("file://{}", reg.display()), "-i", "1"])
        .args(["--admin-port", &admin.to_string()])
        .args([
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{closed}/v1/metrics"),
            "--otlp-interval",
            "300ms",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the OTLP failure logged", Duration::from_secs(30), || {
        text().contains("OTLP metrics push failed")
    });
    std::thread::sleep(Duration::from_secs(2));
    let (status, metrics) = dewy_testkit::http_get(([127, 0, 0, 1], admin).into(), "/metrics").unwrap();
    terminate(&mut child);
    let log = text();
    assert_eq!(log.matches("OTLP metrics push failed").count(), 1, "{log}");
    assert!(log.contains(&closed.to_string()), "the line names the endpoint: {log}");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("dewy_notifications_total{result=\"sent\"} 0"),
        "no notifier, nothing sent: {metrics}"
    );
}

/// `--verify-key`: only releases signed by a trusted key are deployed; a
/// refused one is recorded bad and not downloaded again; a signature
/// published after the artifact is waited for; two keys during a rotation.
#[test]
fn only_signed_releases_are_deployed() {
    use dewy_testkit::MinisignKey;
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("reg"));
    std::fs::create_dir_all(&app).unwrap();
    let (old, new) = (MinisignKey::generate(), MinisignKey::generate());
    let site = |v: &str| dewy_testkit::targz(&[("index.html", v.as_bytes(), 0o644)]);
    let publish = |tag: &str, data: &[u8], key: Option<&MinisignKey>| {
        dewy_testkit::publish(&reg, tag, "site.tar.gz", data);
        if let Some(key) = key {
            key.sign(&reg.join(tag).join("site.tar.gz"), &format!("site {tag}"), false);
        }
    };
    publish("v1.0.0", &site("v1.0.0"), Some(&old));
    let log = dir.path().join("dewy.log");
    let mut child = dewy(&app)
        .args(["assets", "--registry", &format!("file://{}", reg.display()), "-i", "1"])
        .args(["--grace-period", "4s", "--require-signature"])
        .arg("--verify-key")
        .arg(format!("@{}", old.public_file.display()))
        .args(["--verify-key", &new.public])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let log = || std::fs::read_to_string(&log).unwrap();
    let served = |v: &str| std::fs::read_to_string(app.join("current/index.html")).is_ok_and(|x| x == v);
    wait_for("v1.0.0, signed", Duration::from_secs(30), || served("v1.0.0"));
    let verified = log();
    let line = verified
        .lines()
        .find(|l| l.contains("Signature verified"))
        .expect("a verified line");
    assert!(
        line.contains("version=v1.0.0") && line.contains("site v1.0.0"),
        "{line}"
    );

    // Replaced after signing: refused once, recorded bad, never fetched again.
    publish("v1.1.0", &site("v1.1.0"), Some(&old));
    std::fs::write(reg.join("v1.1.0/site.tar.gz"), site("v1.1.0 from an attacker")).unwrap();
    wait_for("v1.1.0 refused", Duration::from_secs(30), || {
        log().contains("recorded as bad")
    });
    std::thread::sleep(Duration::from_secs(3));
    let text = log();
    assert!(served("v1.0.0"), "the running release stays");
    assert!(
        text.contains("refused the artifact of `v1.1.0`") && text.contains("bad signature"),
        "{text}"
    );
    let fetched = text
        .lines()
        .filter(|l| l.contains("Downloading artifact") && l.contains("v1.1.0"))
        .count();
    assert_eq!(fetched, 1, "refused once, not downloaded every tick: {text}");

    // Unsigned: waited for within the grace period, then refused.
    publish("v1.2.0", &site("v1.2.0"), None);
    wait_for("v1.2.0 refused without a signature", Duration::from_secs(30), || {
        log().contains("no signature: `site.tar.gz.minisig`")
    });
    assert!(served("v1.0.0"));

    // Signed with the next key: deployed.
    publish("v1.3.0", &site("v1.3.0"), Some(&new));
    wait_for("v1.3.0, signed by the new key", Duration::from_secs(30), || {
        served("v1.3.0")
    });
    terminate(&mut child);
    let text = log();
    let unsigned_refusals = text
        .lines()
        .filter(|l| l.contains("level=ERROR") && l.contains("v1.2.0"))
        .count();
    assert_eq!(unsigned_refusals, 1, "{text}");
    // Nothing refused ever reached the cache.
    let cache = std::fs::read_dir(app.join(".dewy/cache"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(
        cache
            .iter()
            .all(|n| !n.starts_with("v1.1.0--") && !n.starts_with("v1.2.0--")),
        "{cache:?}"
    );
}

/// `grpc://` end to end: a grpcio service answers, dewy deploys and reports
/// each attempt (a corrupt artifact with its error), waits out NOT_FOUND in
/// the grace period, and keeps the token out of logs and the hooks.
#[test]
fn assets_from_a_grpc_registry_service() {
    use dewy_testkit::{GrpcRegistry, GrpcTransport};
    let dir = tempfile::tempdir().unwrap();
    let (app, reg) = (dir.path().join("app"), dir.path().join("reg"));
    std::fs::create_dir_all(&app).unwrap();
    let service = GrpcRegistry::start(GrpcTransport::Plain, None);
    service.set_token(Some("grpc-s3cret"));
    let site = |v: &str| dewy_testkit::targz(&[("index.html", v.as_bytes(), 0o644)]);
    let publish = |tag: &str, data: &[u8]| {
        dewy_testkit::publish(&reg, tag, "site.tar.gz", data);
        let url = format!("file://{}/{tag}/site.tar.gz", reg.display());
        service.set_release(
            &format!("id-{tag}"),
            tag,
            &url,
            Some(&jiff::Timestamp::now().to_string()),
        );
    };
    publish("v1.0.0", &site("v1.0.0"));
    let log = dir.path().join("dewy.log");
    let env_dump = dir.path().join("hook-env.txt");
    let mut child = dewy(&app)
        .args([
            "assets",
            "--registry",
            &format!("grpc://{}?no-tls=true", service.addr),
            "-i",
            "1",
            "--log-level",
            "debug",
            "--after-deploy-hook",
            &format!("env > {}", env_dump.display()),
        ])
        .env("DEWY_GRPC_TOKEN", "grpc-s3cret")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dewy_testkit::Reaped)
        .unwrap();
    let served = |v: &str| std::fs::read_to_string(app.join("current/index.html")).is_ok_and(|x| x == v);
    wait_for("v1.0.0 from the service", Duration::from_secs(30), || served("v1.0.0"));
    wait_for("the report of v1.0.0", Duration::from_secs(10), || {
        !service.reports().is_empty()
    });
    let first = &service.reports()[0];
    assert_eq!(
        (&first["id"], &first["tag"], &first["command"]),
        (&"id-v1.0.0".into(), &"v1.0.0".into(), &"assets".into())
    );
    assert!(first["err"].is_null(), "{first}");

    // A corrupt artifact: not deployed, and the service is told why.
    publish("v1.1.0", b"this is not a tarball");
    wait_for("the failure report", Duration::from_secs(30), || {
        service.reports().iter().any(|r| r["tag"] == "v1.1.0")
    });
    let failure = service.reports().into_iter().find(|r| r["tag"] == "v1.1.0").unwrap();
    let err = failure["err"].as_str().expect("err is set on failure");
    assert!(err.contains("failed to extract the artifact of `v1.1.0`"), "{err}");
    assert!(served("v1.0.0"));

    // NOT_FOUND for a release created just now: the grace period, no error.
    service.set_not_found(Some(&jiff::Timestamp::now().to_string()));
    let before = std::fs::read_to_string(&log).unwrap().matches("level=ERROR").count();
    std::thread::sleep(Duration::from_secs(3));
    publish("v1.2.0", &site("v1.2.0"));
    wait_for("v1.2.0 once published", Duration::from_secs(30), || served("v1.2.0"));
    terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("level=ERROR").count(),
        before,
        "NOT_FOUND within the grace period is no error: {text}"
    );
    assert!(text.contains("msg=\"artifact not found\""), "{text}");
    assert!(!text.contains("grpc-s3cret"), "the token is never logged");
    let hook_env = std::fs::read_to_string(&env_dump).unwrap();
    assert!(!hook_env.contains("DEWY_GRPC_TOKEN"), "{hook_env}");
    assert!(
        service
            .requests()
            .iter()
            .all(|r| r["authorization"] == "Bearer grpc-s3cret")
    );
}

/// `dewy container` reads `dewy.toml` (or `--config`) and `DEWY_<KEY>`
/// below its flags, with the same checks and errors naming the key or the
/// flag.
#[test]
fn container_flags_come_from_dewy_toml_and_dewy_variables() {
    let dir = tempfile::tempdir().unwrap();
    let toml = |text: &str| std::fs::write(dir.path().join("dewy.toml"), text).unwrap();
    let base = "registry = \"img://127.0.0.1:1/acme/web\"\nport = [8080, \"8081:80\"]\n";
    toml(&format!("{base}runtime = \"nerdctl\"\n"));
    let refused = |cmd: &mut Command, says: &str| {
        let (code, _, err) = run(cmd);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(says), "expected `{says}` in: {err}");
    };
    // The file, then a variable over it, then a flag over both.
    refused(
        dewy(dir.path()).arg("container"),
        "invalid value `nerdctl` for --runtime",
    );
    refused(
        dewy(dir.path()).arg("container").env("DEWY_RUNTIME", "fromenv"),
        "invalid value `fromenv` for --runtime",
    );
    refused(
        dewy(dir.path())
            .args(["container", "--runtime", "fromflag"])
            .env("DEWY_RUNTIME", "fromenv"),
        "invalid value `fromflag` for --runtime",
    );
    toml(&format!("{base}replica = 2\n"));
    refused(dewy(dir.path()).arg("container"), "unknown key `replica`");
    toml(&format!("{base}replicas = \"many\"\n"));
    refused(dewy(dir.path()).arg("container"), "'--replicas <N>'");
    toml(&format!("{base}calver = \"abc\"\n"));
    refused(dewy(dir.path()).arg("container"), "--calver");
    // Another file named with --config; a missing one is named.
    std::fs::write(
        dir.path().join("other.toml"),
        format!("{base}otlp_endpoint = \"collector\"\n"),
    )
    .unwrap();
    refused(
        dewy(dir.path()).args(["container", "--config", "other.toml"]),
        "--otlp-endpoint",
    );
    refused(
        dewy(dir.path()).args(["container", "--config", "missing.toml"]),
        "`missing.toml`",
    );
}
