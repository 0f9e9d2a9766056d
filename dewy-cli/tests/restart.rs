//! Operator sequences around a restart of dewy, with the real binary and a
//! third-party-style app (Python's `http.server` serving only the first
//! socket it inherits from `SERVER_STARTER_PORT`): whatever happened while
//! dewy was down, the release `current` holds is served again, no folder is
//! added for a version already on disk, and dewy deletes only what it
//! created.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use dewy_testkit::{Load, Reaped, wait_for};

/// Serves `version=<VERSION>` on the first inherited socket only; exits 3
/// at once when its release holds a `CRASH` file.
const FIRST_SOCKET_APP: &str = r#"#!/usr/bin/env python3
import http.server, os, socket, sys
here = os.path.dirname(os.path.abspath(__file__))
version = open(os.path.join(here, "VERSION")).read().strip()
if os.path.exists(os.path.join(here, "CRASH")):
    sys.exit(3)
if os.path.exists(os.path.join(here, "SLOW")):
    import time
    time.sleep(float(open(os.path.join(here, "SLOW")).read()))
status = 500 if os.path.exists(os.path.join(here, "UNHEALTHY")) else 200
first = os.environ["SERVER_STARTER_PORT"].split(";")[0]
sock = socket.socket(fileno=int(first.rsplit("=", 1)[1]))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("version=%s\n" % version).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("", 0), Handler, bind_and_activate=False)
server.socket = sock
server.serve_forever()
"#;

struct World {
    _dir: tempfile::TempDir,
    app: PathBuf,
    registry: PathBuf,
    port: u16,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (app, registry) = (dir.path().join("app"), dir.path().join("registry"));
        std::fs::create_dir_all(&app).unwrap();
        std::fs::create_dir_all(&registry).unwrap();
        Self {
            _dir: dir,
            app,
            registry,
            port: dewy_testkit::free_port(),
        }
    }

    fn publish(&self, tag: &str, crash: bool) {
        self.publish_with(tag, if crash { &[("CRASH", b"")] } else { &[] });
    }

    fn publish_with(&self, tag: &str, extra: &[(&str, &[u8])]) {
        let mut files: Vec<(&str, &[u8], u32)> = vec![
            ("app", FIRST_SOCKET_APP.as_bytes(), 0o755),
            ("VERSION", tag.as_bytes(), 0o644),
        ];
        files.extend(extra.iter().map(|(n, b)| (*n, *b, 0o644)));
        dewy_testkit::publish(
            &self.registry,
            tag,
            "app_linux_amd64.tar.gz",
            &dewy_testkit::targz(&files),
        );
    }

    fn dewy(&self) -> Command {
        let mut cmd = Command::cargo_bin("dewy").unwrap();
        cmd.current_dir(&self.app);
        for (k, _) in std::env::vars() {
            if k.starts_with("DEWY_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    fn server(&self, extra: &[&str]) -> Reaped {
        Reaped(
            self.dewy()
                .args(["server", "--registry"])
                .arg(format!("file://{}", self.registry.display()))
                .args(["-p", &format!("127.0.0.1:{}", self.port), "-i", "1"])
                .args(extra)
                .args(["--", "current/app"])
                .stdout(Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(self.log_path())
                        .unwrap(),
                )
                .spawn()
                .unwrap(),
        )
    }

    fn log_path(&self) -> PathBuf {
        self.app.parent().unwrap().join("dewy.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn served(&self) -> String {
        let addr = ([127, 0, 0, 1], self.port).into();
        dewy_testkit::http_get(addr, "/")
            .map(|(_, b)| b.trim().to_owned())
            .unwrap_or_default()
    }

    fn wait_served(&self, version: &str, within: Duration) {
        let want = format!("version={version}");
        wait_for(&want, within, || self.served() == want);
    }

    fn status(&self) -> serde_json::Value {
        let out = self.dewy().args(["status", "--json"]).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    fn release_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.app.join("releases"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }
}

fn terminate(child: &mut Child) {
    signal(child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(child.wait().unwrap().code(), Some(0), "dewy exits 0 on SIGTERM");
}

fn kill9(child: &mut Child) {
    signal(child, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Within one survival interval (1 s by default) plus a margin.
const SERVES_WITHIN: Duration = Duration::from_secs(10);

#[test]
fn a_folder_pinned_while_dewy_was_stopped_is_served_when_it_starts() {
    let w = World::new();
    w.publish("v1.0.0", false);
    let mut dewy = w.server(&[]);
    w.wait_served("v1.0.0", Duration::from_secs(30));
    w.publish("v1.1.0", false);
    w.wait_served("v1.1.0", Duration::from_secs(30));
    terminate(&mut dewy);
    let out = w.dewy().arg("rollback").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = w.release_dirs();
    let mut dewy = w.server(&[]);
    w.wait_served("v1.0.0", SERVES_WITHIN);
    wait_for("ready", SERVES_WITHIN, || w.status()["is_running"] == true);
    let status = w.status();
    assert_eq!(status["pinned"], "v1.0.0", "{status}");
    assert_eq!(status["current_version"], "v1.0.0", "{status}");
    assert_eq!(w.release_dirs(), before, "a restart adds no release folder");
    terminate(&mut dewy);
}

#[test]
fn a_newer_release_recorded_bad_does_not_keep_the_app_down_after_a_kill() {
    let w = World::new();
    w.publish("v1.2.0", false);
    let mut dewy = w.server(&[]);
    w.wait_served("v1.2.0", Duration::from_secs(30));
    w.publish("v1.3.0", true);
    wait_for("v1.3.0 recorded bad", Duration::from_secs(30), || {
        w.status()["bad_release"]
            .as_str()
            .is_some_and(|b| b.starts_with("v1.3.0"))
    });
    assert_eq!(w.served(), "version=v1.2.0");
    let before = w.release_dirs();
    assert_eq!(before.len(), 1, "the failed release's folder is removed: {before:?}");
    kill9(&mut dewy);
    let mut dewy = w.server(&[]);
    w.wait_served("v1.2.0", SERVES_WITHIN);
    wait_for("a check after the restart", Duration::from_secs(10), || {
        w.status()["last_outcome"] == "known-bad"
    });
    let status = w.status();
    assert_eq!(status["current_version"], "v1.2.0", "{status}");
    assert_eq!(status["is_running"], true, "{status}");
    assert_eq!(w.release_dirs(), before);
    terminate(&mut dewy);
}

#[test]
fn abort_on_hook_failure_does_not_stop_the_start_from_disk() {
    let w = World::new();
    w.publish("v1.0.0", false);
    let mut dewy = w.server(&[]);
    w.wait_served("v1.0.0", Duration::from_secs(30));
    terminate(&mut dewy);
    let mut dewy = w.server(&["--before-deploy-hook", "exit 1", "--abort-on-hook-failure"]);
    w.wait_served("v1.0.0", SERVES_WITHIN);
    assert_eq!(w.release_dirs().len(), 1);
    terminate(&mut dewy);
}

#[test]
fn kills_at_random_moments_never_leave_the_app_down() {
    let w = World::new();
    w.publish("v1.0.0", false);
    let mut dewy = w.server(&[]);
    w.wait_served("v1.0.0", Duration::from_secs(30));
    // Kill dewy at staggered moments of deploys, rollbacks and pins; after
    // each start the release in place serves within one survival interval.
    for round in 1..=6u32 {
        let tag = format!("v1.{round}.0");
        match round % 3 {
            // A rollback may find nothing before the current release when
            // earlier deploys were killed before they committed.
            0 => drop(w.dewy().arg("rollback").output().unwrap()),
            1 => w.publish(&tag, false),
            _ => {
                let _ = w.dewy().arg("unpin").output().unwrap();
                w.publish(&tag, false);
            }
        }
        std::thread::sleep(Duration::from_millis(150 * u64::from(round)));
        kill9(&mut dewy);
        dewy = w.server(&[]);
        let current = std::fs::read_to_string(w.app.join("current/VERSION")).unwrap();
        w.wait_served(current.trim(), SERVES_WITHIN);
    }
    let dirs = w.release_dirs();
    let history = std::fs::read_to_string(w.app.join(".dewy/history.jsonl")).unwrap_or_default();
    let mut versions: Vec<String> = dirs
        .iter()
        .map(|d| std::fs::read_to_string(w.app.join("releases").join(d).join("VERSION")).unwrap())
        .collect();
    let n = versions.len();
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), n, "one folder per version: {dirs:?}\n{history}");
    terminate(&mut dewy);
}

#[test]
fn a_registry_inside_the_app_folder_is_refused_and_left_intact() {
    let w = World::new();
    for v in ["v1.0.0", "v1.1.0", "v1.2.0"] {
        dewy_testkit::publish(
            &w.app.join("releases"),
            v,
            "site.tar.gz",
            &dewy_testkit::targz(&[("index.html", v.as_bytes(), 0o644)]),
        );
    }
    let out = w
        .dewy()
        .args([
            "assets",
            "--registry",
            "file://./releases?artifact=site.tar.gz",
            "--keep-releases",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("releases") && err.contains(&*w.app.to_string_lossy()),
        "{err}"
    );
    assert_eq!(w.release_dirs(), ["v1.0.0", "v1.1.0", "v1.2.0"]);
}

#[test]
fn relative_file_registry_is_read_from_where_dewy_was_started() {
    let w = World::new();
    let site = w.app.parent().unwrap().join("site");
    dewy_testkit::publish(
        &site.join("rel"),
        "v1.0.0",
        "site.tar.gz",
        &dewy_testkit::targz(&[("index.html", b"v1", 0o644)]),
    );
    // Started in the parent folder with -w app: `./site/rel` is the
    // parent's, not the app folder's.
    let mut child = Reaped(
        w.dewy()
            .current_dir(w.app.parent().unwrap())
            .args(["assets", "--registry", "file://./site/rel", "-w", "app", "-i", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the platform-neutral site deployed", Duration::from_secs(20), || {
        std::fs::read_to_string(w.app.join("current/index.html")).is_ok_and(|s| s == "v1")
    });
    terminate(&mut child);
}

#[test]
fn a_second_dewy_on_the_same_folder_exits_naming_the_first() {
    let w = World::new();
    w.publish("v1.0.0", false);
    let mut first = w.server(&[]);
    w.wait_served("v1.0.0", Duration::from_secs(30));
    let out = w
        .dewy()
        .args(["server", "--registry"])
        .arg(format!("file://{}", w.registry.display()))
        .args(["-p", &dewy_testkit::free_port().to_string(), "--", "current/app"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");
    assert_eq!(w.served(), "version=v1.0.0", "the first dewy is untouched");
    terminate(&mut first);
}

#[test]
fn a_missing_config_file_is_named() {
    let w = World::new();
    let out = w
        .dewy()
        .args(["assets", "--registry", "file:///nowhere", "--config", "missing.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`missing.toml`") && err.contains("--config"), "{err}");
}

#[test]
fn sigterm_during_a_long_readiness_wait_ends_dewy_and_status_answers_meanwhile() {
    let w = World::new();
    // An app that needs an hour before it listens: the readiness wait would
    // last the whole hour.
    w.publish_with("v1.0.0", &[("SLOW", b"3600")]);
    let mut dewy = w.server(&["--health-path", "/", "--health-timeout", "1h", "--stop-timeout", "3s"]);
    wait_for(
        "the readiness wait of the deploy in flight",
        Duration::from_secs(30),
        || w.log().contains("Started application generation") && w.status()["deploying"] == "v1.0.0",
    );
    std::thread::sleep(Duration::from_secs(1));
    let asked = Instant::now();
    let status = w.status();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "status took {:?}",
        asked.elapsed()
    );
    assert_eq!(status["deploying"], "v1.0.0", "{status}");
    let sent = Instant::now();
    signal(&dewy, nix::sys::signal::Signal::SIGTERM);
    let code = dewy.wait().unwrap().code();
    let took = sent.elapsed();
    assert_eq!(code, Some(0));
    assert!(
        took < dewy_core::SHUTDOWN_GRACE + Duration::from_secs(3 + 2),
        "dewy took {took:?} to stop"
    );
    assert!(w.log().contains("Cancelling the deploy in flight"), "{}", w.log());
    // Nothing dewy started is left holding the port.
    std::net::TcpListener::bind(("127.0.0.1", w.port)).expect("the port is free again");
}

#[test]
fn connections_waiting_for_a_slow_app_are_reported() {
    let w = World::new();
    // Listens only after 8 s, long after the default readiness (alive
    // after 1 s) declared it ready.
    w.publish_with("v1.0.0", &[("SLOW", b"8")]);
    let mut dewy = w.server(&[]);
    wait_for("the start", Duration::from_secs(30), || {
        w.log().contains("Server started")
    });
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], w.port).into();
    let waiting: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    wait_for("the accept-queue warning", Duration::from_secs(6), || {
        w.log().contains("Connections wait in the accept queue")
    });
    let log = w.log();
    let line = log.lines().find(|l| l.contains("accept queue")).unwrap();
    assert!(
        line.contains("WARN") && line.contains("--ready-notify") && line.contains("generation=1"),
        "{line}"
    );
    // Once the app listens, it serves (this one-at-a-time app would wait
    // for a request on the idle connections: close them).
    drop(waiting);
    w.wait_served("v1.0.0", Duration::from_secs(15));
    terminate(&mut dewy);
}

#[test]
fn health_path_with_an_app_that_serves_only_its_first_socket() {
    let w = World::new();
    w.publish("v1.0.0", false);
    let started = Instant::now();
    let mut dewy = w.server(&["--health-path", "/"]);
    wait_for("the first start", Duration::from_secs(30), || {
        w.log().contains("Server started")
    });
    // Ready within the survival interval plus a probe, not the 30 s timeout.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        w.log().matches("serves only the first socket").count(),
        1,
        "{}",
        w.log()
    );
    w.wait_served("v1.0.0", SERVES_WITHIN);
    let load = Load::start(([127, 0, 0, 1], w.port).into());

    // A v2 that exits at start is never switched to and not retried.
    w.publish("v2.0.0", true);
    wait_for("v2 recorded bad", Duration::from_secs(30), || {
        w.status()["bad_release"]
            .as_str()
            .is_some_and(|b| b.starts_with("v2.0.0"))
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(load.version(), "v1.0.0");
    let failed_on_v2_crash = load.failed();
    assert_eq!(failed_on_v2_crash, 0, "a v2 that exits at start costs no request");
    let tries = w.log().matches("Restart server").count();
    assert_eq!(tries, 1, "v2 is tried once: {}", w.log());

    // A v3 whose health path answers 500: rolled back to v1 and recorded bad.
    w.publish_with("v3.0.0", &[("UNHEALTHY", b"")]);
    wait_for("v3 recorded bad", Duration::from_secs(30), || {
        w.status()["bad_release"]
            .as_str()
            .is_some_and(|b| b.starts_with("v3.0.0"))
    });
    wait_for("v1 serving again", Duration::from_secs(10), || {
        load.version() == "v1.0.0"
    });
    assert!(w.log().contains("through the app's port"), "{}", w.log());
    // v3 drains while v1 restarts: wait until its last answer is counted.
    let mut failed_through_v3 = load.failed();
    wait_for("v3 stopped answering", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_secs(2));
        let now = load.failed();
        std::mem::replace(&mut failed_through_v3, now) == now
    });

    // A good v4 deploys.
    w.publish("v4.0.0", false);
    wait_for("v4", Duration::from_secs(30), || load.version() == "v4.0.0");
    let spans = load.error_spans();
    let (ok, failed, errors) = load.finish();
    // Requests fail only inside v3's health window: its survival interval
    // (beside v1), the check through the port and the restart of v1
    // (docs/server.md): answered 500 by v3, or, in some runs on busy
    // cores, accepted and closed unanswered (an empty answer, or the
    // request's write refused with a reset: cause not found, see the
    // closing notes; the spans below give the times). Never refused (a
    // listener always holds the port), and nothing fails once v1 is back,
    // nor through the restart to v4.
    let closed_unanswered =
        |e: &str| e == "HTTP 0: " || e.starts_with("Broken pipe") || e.starts_with("Connection reset");
    let others: Vec<&String> = errors
        .iter()
        .filter(|e| !e.starts_with("HTTP 500: version=v3.0.0") && !closed_unanswered(e))
        .collect();
    assert!(
        others.is_empty(),
        "{others:?} ({failed} failed of {ok}):\n{spans}{}",
        w.log()
    );
    assert_eq!(
        failed,
        failed_through_v3,
        "failures after v3's window: {failed} failed of {ok}:\n{spans}{}",
        w.log()
    );
    assert!(ok > 0);
    terminate(&mut dewy);
}

/// The zombie children of `pid` (exited, not reaped).
fn zombies_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let fields: Vec<String> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().take(2).map(str::to_owned).collect())
            .unwrap_or_default();
        if fields.len() == 2 && fields[0] == "Z" && fields[1] == pid.to_string() {
            out.push(child);
        }
    }
    out
}

/// A hook's background job is re-parented to dewy (the subreaper) when the
/// hook's shell exits; when the job exits in turn, dewy reaps it, so no
/// zombie piles up per deploy.
#[test]
fn background_jobs_of_hooks_are_reaped_when_they_exit() {
    let w = World::new();
    w.publish("v1.0.0", false);
    let mut dewy = w.server(&[
        "--after-deploy-hook",
        "sleep 0.5 & sleep 0.5 & echo background-jobs-left",
    ]);
    w.wait_served("v1.0.0", SERVES_WITHIN);
    w.publish("v2.0.0", false);
    w.wait_served("v2.0.0", SERVES_WITHIN);
    assert!(w.log().matches("background-jobs-left").count() >= 2, "{}", w.log());
    // The jobs end 0.5 s after their hook; then none may stay a zombie.
    std::thread::sleep(Duration::from_secs(2));
    wait_for("no zombie child of dewy", Duration::from_secs(5), || {
        zombies_of(dewy.id()).is_empty()
    });
    terminate(&mut dewy);
}
