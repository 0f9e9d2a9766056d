//! dewy-starter with real child processes: protocol variables compared
//! with Perl's `start_server`, readiness by each method, failures, crash
//! restarts, and zero failed requests across 20 restarts under load.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dewy_starter::{Error, Event, ListenSpec, Listeners, Readiness, Starter, StarterConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn config(command: &Path, env: &[(&str, &str)], readiness: Readiness) -> StarterConfig {
    let mut vars: Vec<(OsString, OsString)> = vec![("PATH".into(), std::env::var_os("PATH").unwrap_or_default())];
    vars.extend(env.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))));
    StarterConfig {
        command: command.to_path_buf(),
        args: vec![],
        dir: std::env::temp_dir(),
        env: vars,
        readiness,
        stop_signal: nix::sys::signal::Signal::SIGTERM,
        stop_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
    }
}

/// Readiness by `READY=1`, as the demo app sends it.
fn notify() -> Readiness {
    Readiness::Notify {
        timeout: Duration::from_secs(10),
    }
}

/// The demo app as version v1 under a starter on a fresh loopback port.
fn demo_v1(mut edit: impl FnMut(&mut StarterConfig)) -> (Starter, SocketAddr) {
    let (listeners, addr) = loopback();
    let mut cfg = config(&dewy_testkit::demo_app(), &[("APP_VERSION", "v1")], notify());
    edit(&mut cfg);
    (Starter::new(cfg, listeners), addr)
}

fn loopback() -> (Listeners, SocketAddr) {
    let port = dewy_testkit::free_port();
    let spec = ListenSpec::Addr(SocketAddr::from(([127, 0, 0, 1], port)));
    let l = Listeners::bind(&[spec]).unwrap();
    let addr = l.local_addr(0).unwrap();
    (l, addr)
}

async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

fn env_script(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let out = dir.join("env.txt");
    let script = dir.join("app.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"SERVER_STARTER_PORT=$SERVER_STARTER_PORT\nSERVER_STARTER_GENERATION=$SERVER_STARTER_GENERATION\nLISTEN_FDS=$LISTEN_FDS\nLISTEN_PID=$LISTEN_PID\nLISTEN_FDNAMES=$LISTEN_FDNAMES\nPID=$$\nFD3=$(readlink /proc/$$/fd/3)\" > {}.tmp && mv {0}.tmp {0}\nexec sleep 30\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (script, out)
}

fn parse_env(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn wait_file(path: &Path) -> String {
    for _ in 0..200 {
        if let Ok(t) = std::fs::read_to_string(path) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never appeared", path.display());
}

#[tokio::test]
async fn protocol_variables_match_start_server() {
    let dir = tempfile::tempdir().unwrap();
    let (script, out) = env_script(dir.path());
    let (listeners, addr) = loopback();
    let starter = Starter::new(
        config(&script, &[], Readiness::Alive(Duration::from_millis(200))),
        listeners,
    );
    let generation = starter.start().await.unwrap();
    let ours = parse_env(&wait_file(&out).await);
    assert_eq!(ours["SERVER_STARTER_PORT"], format!("{addr}=3"));
    assert_eq!(ours["SERVER_STARTER_GENERATION"], "1");
    assert_eq!(ours["LISTEN_FDS"], "1");
    assert_eq!(ours["LISTEN_FDNAMES"], "dewy0");
    assert_eq!(ours["LISTEN_PID"], ours["PID"], "LISTEN_PID is the child's own pid");
    assert_eq!(ours["PID"], generation.pid.to_string());
    assert!(
        ours["FD3"].starts_with("socket:"),
        "fd 3 is the socket: {}",
        ours["FD3"]
    );
    starter.stop().await.unwrap();

    // The same script under Perl's start_server: same variable names and
    // the same `host:port=fd` shape for the same --port value.
    std::fs::remove_file(&out).unwrap();
    let ss = dewy_testkit::StartServer::spawn(&script, &[], &[]);
    let theirs = parse_env(&wait_file(&out).await);
    let (their_addr, their_fd) = theirs["SERVER_STARTER_PORT"].rsplit_once('=').unwrap();
    assert_eq!(their_addr, format!("127.0.0.1:{}", ss.port));
    assert!(their_fd.parse::<u32>().is_ok());
    assert_eq!(theirs["SERVER_STARTER_GENERATION"], "1");
}

#[tokio::test]
async fn readiness_by_notify_and_http_and_failures_are_caught() {
    let app = dewy_testkit::demo_app();
    // Notify: ready when READY=1 arrives.
    let (starter, addr) = demo_v1(|_| {});
    starter.start().await.unwrap();
    let (status, body) = get(addr, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("version=v1 generation=1"), "{body}");
    starter.stop().await.unwrap();

    // Notify, but the app never says READY=1.
    let (listeners, _) = loopback();
    let starter = Starter::new(
        config(
            &app,
            &[("DEMO_NO_READY", "1")],
            Readiness::Notify {
                timeout: Duration::from_millis(800),
            },
        ),
        listeners,
    );
    let err = starter.start().await.unwrap_err();
    assert!(matches!(err, Error::NotReady { .. }), "{err}");
    assert!(!starter.is_running());

    // HTTP probe on the private socket: a new build that is alive but
    // answers 500 is caught, and the old generation keeps serving. The app
    // is started through a `current` symlink, as dewy does.
    let dir = tempfile::tempdir().unwrap();
    let bad_dir = dir.path().join("bad");
    std::fs::create_dir(&bad_dir).unwrap();
    let bad_app = bad_dir.join("demo-app");
    std::fs::copy(&app, &bad_app).unwrap();
    std::fs::write(bad_dir.join("demo.env"), "DEMO_HEALTH_STATUS=500\n").unwrap();
    let link = dir.path().join("current");
    std::os::unix::fs::symlink(&app, &link).unwrap();
    let (listeners, addr2) = loopback();
    let health = Readiness::Http {
        path: "/health".into(),
        timeout: Duration::from_millis(1500),
    };
    let starter = Starter::new(config(&link, &[("APP_VERSION", "v1")], health), listeners);
    assert_eq!(starter.start().await.unwrap().generation, 1);
    // Point `current` at the unhealthy build and restart.
    let tmp = dir.path().join("current.tmp");
    std::os::unix::fs::symlink(&bad_app, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    let err = starter.restart().await.unwrap_err();
    assert!(err.to_string().contains("answered 500"), "{err}");
    let (status, body) = get(addr2, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("generation=1"),
        "the old generation keeps serving: {body}"
    );
    starter.stop().await.unwrap();
}

#[tokio::test]
async fn a_generation_that_exits_at_start_is_reported_with_its_status_and_stderr() {
    let app = dewy_testkit::demo_app();
    let (listeners, _) = loopback();
    let starter = Starter::new(
        config(
            &app,
            &[("DEMO_EXIT_AT_START", "1")],
            Readiness::Alive(Duration::from_secs(2)),
        ),
        listeners,
    );
    let err = starter.start().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::ExitedEarly { .. }), "{text}");
    assert!(text.contains("exit status 3"), "{text}");
    assert!(
        text.contains("exiting at start as asked"),
        "stderr tail is included: {text}"
    );
}

#[tokio::test]
async fn an_app_that_ignores_sigterm_is_killed_after_the_timeout() {
    let app = dewy_testkit::demo_app();
    let (listeners, _) = loopback();
    let mut cfg = config(
        &app,
        &[("DEMO_IGNORE_TERM", "1")],
        Readiness::Alive(Duration::from_millis(300)),
    );
    cfg.stop_timeout = Duration::from_millis(500);
    let starter = Starter::new(cfg, listeners);
    let mut events = starter.subscribe();
    let g = starter.start().await.unwrap();
    let started = std::time::Instant::now();
    starter.stop().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(g.pid as i32), None).is_err(),
        "process is gone"
    );
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Exited { exit, expected, .. } => {
                assert!(expected);
                break exit;
            }
            _ => continue,
        }
    };
    assert_eq!(exit, dewy_starter::ExitInfo::Signal(9));
}

#[tokio::test]
async fn a_crashed_app_is_restarted_with_backoff() {
    let (starter, addr) = demo_v1(|_| {});
    let mut events = starter.subscribe();
    let g = starter.start().await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(g.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut saw_crash = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Exited { expected: false, .. } => saw_crash = true,
            Event::Ready { generation, .. } if saw_crash => {
                assert_eq!(generation, 2);
                break;
            }
            _ => {}
        }
    }
    assert!(starter.is_running());
    let (status, body) = get(addr, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("generation=2"), "{body}");
    starter.stop().await.unwrap();
}

/// One keep-alive client: many requests on one connection, reconnecting
/// when the server closes it politely (`Connection: close`).
async fn keepalive_client(addr: SocketAddr, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    'outer: while !stop.load(Ordering::SeqCst) {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            failed.fetch_add(1, Ordering::SeqCst);
            continue;
        };
        let mut reader = BufReader::new(stream);
        while !stop.load(Ordering::SeqCst) {
            if reader
                .get_mut()
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
            {
                failed.fetch_add(1, Ordering::SeqCst);
                continue 'outer;
            }
            let mut status = String::new();
            if reader.read_line(&mut status).await.unwrap_or(0) == 0 || !status.contains(" 200 ") {
                failed.fetch_add(1, Ordering::SeqCst);
                continue 'outer;
            }
            let (mut len, mut close) = (0usize, false);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).await.unwrap_or(0) == 0 {
                    failed.fetch_add(1, Ordering::SeqCst);
                    continue 'outer;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                close |= lower.starts_with("connection: close");
                if h == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).await.is_err() {
                failed.fetch_add(1, Ordering::SeqCst);
                continue 'outer;
            }
            ok.fetch_add(1, Ordering::SeqCst);
            if close {
                continue 'outer;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_restarts_under_load_drop_no_request() {
    let (starter, addr) = demo_v1(|cfg| cfg.stop_timeout = Duration::from_secs(10));
    starter.start().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(tokio::spawn(keepalive_client(
            addr,
            stop.clone(),
            ok.clone(),
            failed.clone(),
        )));
    }
    // New connections too: one request each.
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match get(addr, "/").await {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        starter.restart().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let g = starter.current().await.unwrap();
    assert_eq!(g.generation, 21);
    starter.stop().await.unwrap();
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert!(ok > 200, "load ran: {ok} requests");
    assert_eq!(failed, 0, "{failed} failed requests out of {}", ok + failed);
}

const ORPHAN_HELPER: &str = "DEWY_STARTER_ORPHAN_HELPER";

/// Not a test of its own: the body of the helper process of
/// `a_dewy_killed_with_sigkill_leaves_no_orphan`, acting as a dewy that
/// starts the demo app and then waits to be killed.
#[tokio::test]
async fn orphan_helper_process() {
    let Ok(pid_file) = std::env::var(ORPHAN_HELPER) else {
        return;
    };
    let (listeners, _) = loopback();
    let starter = Starter::new(config(&dewy_testkit::demo_app(), &[], notify()), listeners);
    let g = starter.start().await.unwrap();
    std::fs::write(format!("{pid_file}.tmp"), g.pid.to_string()).unwrap();
    std::fs::rename(format!("{pid_file}.tmp"), &pid_file).unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn a_dewy_killed_with_sigkill_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("app.pid");
    // Build the app first so the helper does not compile under a deadline.
    dewy_testkit::demo_app();
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "orphan_helper_process", "--nocapture"])
        .env(ORPHAN_HELPER, &pid_file)
        .spawn()
        .unwrap();
    let pid: i32 = wait_file(&pid_file).await.trim().parse().unwrap();
    let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    assert!(alive(pid));
    helper.kill().unwrap(); // SIGKILL
    helper.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid) && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the app {pid} outlived its killed supervisor"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Python server on the first inherited socket, started in the
/// background by a shell that then exits 0: the classic daemonizing app.
const DAEMONIZING: &str = r#"
python3 -c '
import http.server, os, socket
sock = socket.socket(fileno=3)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
s = http.server.HTTPServer(("", 0), H, bind_and_activate=False); s.socket = sock; s.serve_forever()
' &
echo $! > "$PIDFILE"
exit 0
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_daemonizing_app_is_refused_and_its_detached_child_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    let (listeners, addr) = loopback();
    let mut cfg = config(
        Path::new("/bin/sh"),
        &[("PIDFILE", pidfile.to_str().unwrap())],
        Readiness::Alive(Duration::from_secs(1)),
    );
    cfg.args = vec!["-c".into(), DAEMONIZING.into()];
    cfg.stop_timeout = Duration::from_secs(2);
    let starter = Starter::new(cfg, listeners);
    let err = starter.start().await.unwrap_err();
    let child: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    match &err {
        Error::Daemonized { pids, .. } => assert!(pids.contains(&child), "{err}"),
        other => panic!("expected Daemonized, got {other}"),
    }
    assert!(err.to_string().contains("foreground"), "{err}");
    // The detached child is gone (and reaped): nobody answers on the port
    // while the starter keeps holding it.
    assert!(
        !Path::new(&format!("/proc/{child}")).exists(),
        "pid {child} still exists"
    );
    let answered = tokio::time::timeout(Duration::from_secs(1), get(addr, "/")).await;
    assert!(!matches!(answered, Ok(Ok((200, _)))), "a stopped daemon answered");
    assert!(!starter.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_takes_one_stop_timeout_for_all_generations() {
    // Two generations that ignore SIGTERM: a restart leaves the first
    // retiring, then stop() must kill both within one stop timeout.
    let script = "trap '' TERM; exec python3 -c 'import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'";
    let (listeners, _) = loopback();
    let mut cfg = config(Path::new("/bin/sh"), &[], Readiness::Alive(Duration::from_millis(300)));
    cfg.args = vec!["-c".into(), script.into()];
    cfg.stop_timeout = Duration::from_secs(2);
    let starter = Starter::new(cfg, listeners);
    starter.start().await.unwrap();
    starter.restart().await.unwrap();
    assert_eq!(starter.pids().await.len(), 2);
    let started = std::time::Instant::now();
    starter.stop().await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "stop took {took:?} for two generations");
    assert!(starter.pids().await.is_empty());
}
