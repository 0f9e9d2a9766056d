//! `dewy container` with rootful podman (runc) and Debian's docker-registry:
//! rolling updates under load, a failing image that never gets traffic, a
//! re-pushed tag, adoption after SIGKILL, and a replica killed by hand.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use dewy_testkit::{ImageRegistry, Load};

/// Waits until `f` holds; a timeout fails with dewy's log.
fn wait_logged(what: &str, timeout: Duration, log: &std::path::Path, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; dewy's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `dewy container` child, killed when the test ends however it ends
/// (declared after [`Cleanup`], so it stops before the containers are
/// removed and cannot replace them).
struct Dewy(Child);

impl std::ops::Deref for Dewy {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Dewy {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Dewy {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A socket, Unix or TCP.
trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// Removes the app's containers and the images of this test's registry at
/// the end, whatever happened.
struct Cleanup(Vec<(String, std::path::PathBuf)>, String, String);

impl Cleanup {
    fn new(registry: &ImageRegistry, app: &str) -> Self {
        Self(registry.podman_env.clone(), app.to_owned(), registry.host.clone())
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut cmd = Command::new("podman");
        cmd.envs(self.0.iter().map(|(k, v)| (k, v)));
        let out = cmd
            .args(["ps", "-aq", "--filter", "label=dewy.managed=true"])
            .arg("--filter")
            .arg(format!("label=dewy.app={}", self.1))
            .output();
        let ids: Vec<String> = out
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect())
            .unwrap_or_default();
        if !ids.is_empty() {
            let mut rm = Command::new("podman");
            rm.envs(self.0.iter().map(|(k, v)| (k, v)));
            let _ = rm.args(["rm", "-f"]).args(&ids).output();
        }
        let mut images = Command::new("podman");
        images.envs(self.0.iter().map(|(k, v)| (k, v)));
        let images: Vec<String> = images
            .args(["images", "-q", "--filter"])
            .arg(format!("reference={}/*", self.2))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect())
            .unwrap_or_default();
        if !images.is_empty() {
            let mut rmi = Command::new("podman");
            rmi.envs(self.0.iter().map(|(k, v)| (k, v)));
            let _ = rmi.args(["rmi", "-f"]).args(&images).output();
        }
    }
}

/// One test's world: a registry, a workdir holding dewy's log, free proxy
/// and admin ports, and the cleanup of the app's containers and images.
struct Scene {
    registry: ImageRegistry,
    dir: tempfile::TempDir,
    app: String,
    proxy: u16,
    admin: u16,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
    cleanup: Cleanup,
}

impl Scene {
    /// A scene whose app is named `prefix` and this process's id.
    fn new(prefix: &str) -> Self {
        let registry = ImageRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let app = format!("{prefix}{}", std::process::id());
        let cleanup = Cleanup::new(&registry, &app);
        let (proxy, admin) = (dewy_testkit::free_port(), dewy_testkit::free_port());
        let log = dir.path().join("dewy.log");
        Self {
            registry,
            dir,
            app,
            proxy,
            admin,
            addr: ([127, 0, 0, 1], proxy).into(),
            log,
            cleanup,
        }
    }
}

/// Pushes a web image as `acme/web:TAG`, then drops the test's own local
/// name for it, so that the only name left is the one dewy pulls (and may
/// remove); returns the image id.
fn push_only_remote(registry: &ImageRegistry, tag: &str, body: &str, health: Option<&str>) -> String {
    registry.push_web_image("acme/web", tag, body, health);
    let name = format!("{}/acme/web:{tag}", registry.host);
    let out = registry
        .podman()
        .args(["image", "inspect", "--format", "{{.Id}}", &name])
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!id.is_empty(), "no image id for {name}");
    let out = registry.podman().args(["untag", &name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    id
}

/// Whether the local storage holds the image `id`.
fn image_exists(registry: &ImageRegistry, id: &str) -> bool {
    registry
        .podman()
        .args(["image", "exists", id])
        .status()
        .unwrap()
        .success()
}

/// The app's running containers.
fn replicas(registry: &ImageRegistry, app: &str) -> Vec<String> {
    let out = registry
        .podman()
        .args(["ps", "-q", "--no-trunc", "--filter", "label=dewy.managed=true"])
        .arg("--filter")
        .arg(format!("label=dewy.app={app}"))
        .output()
        .unwrap();
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids
}

fn dewy(
    registry: &ImageRegistry,
    app: &str,
    ports: (u16, u16),
    log: &std::path::Path,
    workdir: &std::path::Path,
) -> Dewy {
    dewy_via(
        registry,
        &registry.host,
        app,
        ports,
        log,
        workdir,
        &["--keep-images", "2"],
    )
}

/// SIGTERM to dewy, which must exit with status 0.
fn stop(dewy: &mut Dewy) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dewy.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(dewy.wait().unwrap().code(), Some(0));
}

/// The JSON of `GET path` on 127.0.0.1:`port`.
fn json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = dewy_testkit::http_get(([127, 0, 0, 1], port).into(), path).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `dewy container` polling the registry at `host` (the registry, or a
/// proxy in front of it).
fn dewy_via(
    registry: &ImageRegistry,
    host: &str,
    app: &str,
    (proxy, admin): (u16, u16),
    log: &std::path::Path,
    workdir: &std::path::Path,
    extra: &[&str],
) -> Dewy {
    let mut cmd = Command::cargo_bin("dewy").unwrap();
    for (k, v) in &registry.podman_env {
        cmd.env(k, v);
    }
    cmd.args(["container", "--registry", &format!("img://{host}/acme/web")])
        .args(["--runtime", "podman", "-p", &proxy.to_string()])
        .args(if extra.contains(&"--replicas") {
            &[][..]
        } else {
            &["--replicas", "2"][..]
        })
        .args([
            "--health-path",
            "/health",
            "--health-timeout",
            "15s",
            "--drain-time",
            "5s",
        ])
        .args(["--stop-timeout", "1s", "-i", "1", "--listen", "127.0.0.1", "-n", app])
        .args(["--admin-port", &admin.to_string()])
        .args(["--after-deploy-hook", "echo \"$DEWY_VERSION $DEWY_APP\" >> hooks.log"])
        .args(extra)
        .arg("-w")
        .arg(workdir)
        .current_dir(workdir)
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .map(Dewy)
        .unwrap()
}

#[test]
fn rolling_updates_adoption_and_healing_with_podman() {
    let Scene {
        registry,
        dir,
        app,
        proxy,
        admin,
        addr,
        log,
        cleanup: _cleanup,
    } = Scene::new("web");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let body = |v: &str| format!("version={v} \n");
    let v1 = push_only_remote(&registry, "v1.0.0", &body("v1.0.0"), Some("ok"));
    let mut child = dewy(&registry, &app, (proxy, admin), &log, dir.path());
    let serving = |v: &str| {
        dewy_testkit::http_get(addr, "/").is_ok_and(|(s, b)| s == 200 && b.starts_with(&format!("version={v}")))
    };
    wait_logged("v1 behind the proxy", Duration::from_secs(60), &log, || {
        serving("v1.0.0")
    });
    wait_logged("two v1 replicas", Duration::from_secs(30), &log, || {
        text().contains("Container deployed") && replicas(&registry, &app).len() == 2
    });
    // The status API and the metrics say the same.
    let status = json(admin, "/api/status");
    assert_eq!(status["replicas"].as_array().unwrap().len(), 2, "{status}");
    assert_eq!(status["current_version"], "v1.0.0");
    // Dewy's fields and its `/api/containers`.
    assert_eq!((&status["name"], &status["command"]), (&app.clone().into(), &2.into()));
    assert_eq!(status["proxy_backends"], 2, "{status}");
    // The status page: readable without script, both replicas serving.
    let (code, page) = dewy_testkit::http_get(([127, 0, 0, 1], admin).into(), "/").unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("<div class=\"big\" id=\"version\">v1.0.0</div>"),
        "{page}"
    );
    assert_eq!(page.matches(">serving<").count(), 2, "{page}");
    assert!(!page.contains("<script"), "{page}");
    let listed = json(admin, "/api/containers");
    let containers = listed["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2, "{listed}");
    for c in containers {
        assert_eq!(c["status"], "running", "{c}");
        assert!(c["ip_port"].as_str().unwrap().starts_with("127.0.0.1:"), "{c}");
        assert_eq!(c["labels"]["dewy.app"], app.as_str(), "{c}");
        assert!(c["name"].as_str().unwrap().starts_with(&app), "{c}");
        assert!(!c["deployed_at"].as_str().unwrap().is_empty(), "{c}");
    }
    assert_eq!(
        status["proxies"][0]["backends"].as_array().unwrap().len(),
        2,
        "{status}"
    );
    let (_, metrics) = dewy_testkit::http_get(([127, 0, 0, 1], admin).into(), "/metrics").unwrap();
    assert!(metrics.contains("dewy_container_replicas 2"), "{metrics}");
    assert!(
        metrics.contains("dewy_proxy_connections_total{proxy_port="),
        "{metrics}"
    );

    // v1 -> v2 under load: no request fails.
    let load = Load::start(addr);
    let v2 = push_only_remote(&registry, "v2.0.0", &body("v2.0.0"), Some("ok"));
    wait_logged("v2", Duration::from_secs(60), &log, || load.version() == "v2.0.0");
    wait_logged("the v1 replicas retired", Duration::from_secs(30), &log, || {
        replicas(&registry, &app).len() == 2 && text().matches("Container deployed").count() == 2
    });

    // A v3 whose health path is missing never gets traffic.
    let v3_bad = push_only_remote(&registry, "v3.0.0", &body("v3.0.0"), None);
    wait_logged("v3 refused", Duration::from_secs(60), &log, || {
        text().contains("failed its health check")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(load.version(), "v2.0.0");
    assert_eq!(replicas(&registry, &app).len(), 2, "the failed replica is removed");
    // Recorded bad: not tried again every second.
    let tries = text().matches("failed its health check").count();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(text().matches("failed its health check").count(), tries, "{}", text());
    // `dewy clear-bad -w DIR` while dewy runs (docs/container.md): v3 is
    // tried once more, fails again, and is recorded bad again.
    let out = Command::new(env!("CARGO_BIN_EXE_dewy"))
        .args(["clear-bad", "-w"])
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("cleared 1 bad release records"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_logged("v3 tried again", Duration::from_secs(60), &log, || {
        text().matches("failed its health check").count() == tries + 1
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        text().matches("failed its health check").count(),
        tries + 1,
        "{}",
        text()
    );
    assert_eq!(load.version(), "v2.0.0");

    // v3 pushed again, fixed: a new digest, so a new release.
    let v3 = push_only_remote(&registry, "v3.0.0", &body("v3.0.0"), Some("ok"));
    wait_logged("the fixed v3", Duration::from_secs(60), &log, || {
        load.version() == "v3.0.0"
    });
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{errors:?} of {ok}: {}", text());
    assert!(ok > 50);
    // The after hook ran once per rollout (once the old replicas are
    // gone), in the workdir.
    let hooks_log = dir.path().join("hooks.log");
    wait_logged("the v3 after hook", Duration::from_secs(30), &log, || {
        std::fs::read_to_string(&hooks_log).is_ok_and(|h| h.contains("v3.0.0"))
    });
    let hooks = std::fs::read_to_string(&hooks_log).unwrap();
    assert_eq!(
        hooks,
        format!("v1.0.0 {app}\nv2.0.0 {app}\nv3.0.0 {app}\n"),
        "{}",
        text()
    );
    // With --keep-images 2, the images of v1 and v2 went after the v3
    // rollout (pulled: v1, v2, the failing v3, the fixed v3); the two
    // most recently pulled stay.
    wait_logged("the old images removed", Duration::from_secs(30), &log, || {
        text().contains("removed=2")
    });
    assert!(
        !image_exists(&registry, &v1) && !image_exists(&registry, &v2),
        "{}",
        text()
    );
    assert!(image_exists(&registry, &v3) && image_exists(&registry, &v3_bad));
    let keep = text()
        .lines()
        .filter(|l| l.contains("Keep images"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(keep.len(), 3, "once per rollout: {keep:?}");
    assert!(keep.iter().all(|l| l.contains("count=2")), "{keep:?}");

    // dewy killed: the next one adopts the replicas and serves at once.
    wait_logged("the v2 replicas retired", Duration::from_secs(30), &log, || {
        replicas(&registry, &app).len() == 2
    });
    let before = replicas(&registry, &app);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(replicas(&registry, &app), before, "the replicas outlive dewy");
    let started = Instant::now();
    let mut child = dewy_via(
        &registry,
        &registry.host,
        &app,
        (proxy, admin),
        &log,
        dir.path(),
        &["--keep-images", "2", "--admin-token", "s3cret"],
    );
    wait_logged("serving again", Duration::from_secs(10), &log, || serving("v3.0.0"));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(replicas(&registry, &app), before, "adopted, none replaced: {}", text());

    // `dewy container list`: both replicas, their uptime, serving.
    let out = Command::new(env!("CARGO_BIN_EXE_dewy"))
        .args(["container", "list", "--runtime", "podman", "--name", &app, "-w"])
        .arg(dir.path())
        .envs(registry.podman_env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    for id in &before {
        let row = rows
            .iter()
            .find(|r| id.starts_with(r.split_whitespace().next().unwrap()));
        let cols: Vec<&str> = row
            .unwrap_or_else(|| panic!("{id} in {table}"))
            .split_whitespace()
            .collect();
        assert_eq!(cols[1], "running", "{table}");
        assert!(cols[2].ends_with('s') || cols[2].ends_with('m'), "uptime: {table}");
        assert_eq!((cols[3], cols[4]), ("serving", "v3.0.0"), "{table}");
    }

    // `POST /api/check` on the socket asks for a check at once; on the TCP
    // port only with the bearer `--admin-token`.
    let post = |mut s: Box<dyn ReadWrite>, path: &str, auth: &str| {
        use std::io::{Read, Write};
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: dewy\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    let socket = || Box::new(std::os::unix::net::UnixStream::connect(dir.path().join(".dewy/admin.sock")).unwrap());
    let tcp = || Box::new(std::net::TcpStream::connect(("127.0.0.1", admin)).unwrap());
    let answer = post(socket(), "/api/check", "");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    wait_logged("the requested check", Duration::from_secs(5), &log, || {
        text().contains("Check requested through the admin API")
    });
    for (auth, expected) in [
        ("", "HTTP/1.1 401"),
        ("Authorization: Bearer wrong\r\n", "HTTP/1.1 401"),
        ("Authorization: Bearer s3cret\r\n", "HTTP/1.1 202"),
    ] {
        let answer = post(tcp(), "/api/check", auth);
        assert!(answer.starts_with(expected), "{auth}: {answer}");
    }
    assert!(!text().contains("s3cret"), "the token is not logged");

    // `POST /api/restart`: every replica replaced by a fresh one of the
    // same image, one at a time, under load: no request fails.
    let load = Load::start(addr);
    let answer = post(socket(), "/api/restart", "");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("restarted 2 replicas"),
        "{answer}"
    );
    let after = replicas(&registry, &app);
    assert_eq!(after.len(), 2, "{}", text());
    assert!(after.iter().all(|id| !before.contains(id)), "{before:?} -> {after:?}");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{errors:?} of {ok}: {}", text());
    assert!(serving("v3.0.0"));
    let before = after;

    // Rollback and pin do not apply to container mode, and say so.
    let out = Command::new(env!("CARGO_BIN_EXE_dewy"))
        .args(["rollback", "-w"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("do not apply to container mode"),
        "{err}"
    );

    // A replica killed by hand is replaced.
    let victim = before[0].clone();
    registry.podman().args(["rm", "-f", &victim]).output().unwrap();
    wait_logged("the replacement", Duration::from_secs(60), &log, || {
        let now = replicas(&registry, &app);
        now.len() == 2 && !now.contains(&victim)
    });
    assert!(serving("v3.0.0"));
    stop(&mut child);
}

/// Registry faults (refused credentials, server errors, the registry down)
/// never touch the replicas: the current version keeps serving.
#[test]
fn registry_faults_keep_the_current_version_serving() {
    let Scene {
        mut registry,
        dir,
        app,
        proxy,
        admin,
        addr,
        log,
        cleanup: _cleanup,
    } = Scene::new("faults");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    registry.push_web_image("acme/web", "v1.0.0", "version=v1.0.0 \n", Some("ok"));
    let serving = || dewy_testkit::http_get(addr, "/").is_ok_and(|(s, b)| s == 200 && b.starts_with("version=v1.0.0"));
    // Dewy's telemetry flags work in container mode too: the container
    // metrics reach an OTLP/gRPC collector.
    let (collector, names) = common::otlp_grpc_collector();
    let endpoint = format!("127.0.0.1:{collector}");
    let telemetry = [
        "--telemetry",
        "--otlp-endpoint",
        &endpoint,
        "--otlp-insecure",
        "--otlp-interval",
        "1s",
    ];
    // A key from dewy.toml in the working directory takes effect.
    std::fs::write(dir.path().join("dewy.toml"), "keep_images = 5\n").unwrap();
    let mut first = dewy_via(
        &registry,
        &registry.host,
        &app,
        (proxy, admin),
        &log,
        dir.path(),
        &telemetry,
    );
    wait_logged("v1", Duration::from_secs(60), &log, || {
        serving() && text().contains("Container deployed") && replicas(&registry, &app).len() == 2
    });
    wait_logged("the images kept", Duration::from_secs(10), &log, || {
        text().contains("Keep images")
    });
    assert!(
        text()
            .lines()
            .any(|l| l.contains("Keep images") && l.contains("count=5")),
        "{}",
        text()
    );
    wait_logged("the container metrics over OTLP", Duration::from_secs(20), &log, || {
        let names = names.lock().unwrap();
        ["dewy_container_replicas", "dewy_proxy_connections_total"]
            .iter()
            .all(|n| names.iter().any(|m| m == n))
    });
    assert!(text().contains("Pushing metrics over OTLP"), "{}", text());
    first.kill().unwrap();
    first.wait().unwrap();
    let before = replicas(&registry, &app);

    // The next dewy polls through a proxy that answers 401, then 500s.
    let flaky =
        dewy_testkit::FlakyProxy::start(&format!("http://{}", registry.host), vec![401, 401, 500, 503, 500, 500]);
    let via = flaky.endpoint.trim_start_matches("http://").to_owned();
    registry.allow_insecure(&via);
    let mut second = dewy_via(&registry, &via, &app, (proxy, admin), &log, dir.path(), &[]);
    wait_logged("the proxy port", Duration::from_secs(10), &log, || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    let load = Load::start(addr);
    wait_logged("the faults", Duration::from_secs(30), &log, || flaky.connections() >= 6);
    wait_logged("the registry answering again", Duration::from_secs(30), &log, || {
        text().contains("Dewy run recovered")
    });
    assert!(text().contains("answered HTTP 401"), "{}", text());
    // Then the registry goes away altogether.
    registry.stop();
    wait_logged("the outage noticed", Duration::from_secs(30), &log, || {
        text().contains("OCI registry request for")
    });
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed, errors) = load.finish();
    assert!(ok > 0 && failed == 0, "{errors:?}: {}", text());
    assert_eq!(replicas(&registry, &app), before, "no replica was touched: {}", text());
    stop(&mut second);
}

/// dewy SIGKILLed while a new image's replica is still being checked: the
/// next dewy adopts the replicas that were in rotation (never the
/// unchecked one, which it removes), serves at once, tries the new image
/// again and records it bad; a replica of the running image killed by hand
/// is still replaced while the newest image is recorded bad.
#[test]
fn dewy_killed_mid_rollout_adopts_only_replicas_that_were_in_rotation() {
    let Scene {
        registry,
        dir,
        app,
        proxy,
        admin,
        addr,
        log,
        cleanup: _cleanup,
    } = Scene::new("mid");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let serving = |v: &str| {
        dewy_testkit::http_get(addr, "/").is_ok_and(|(s, b)| s == 200 && b.starts_with(&format!("version={v}")))
    };
    push_only_remote(&registry, "v1.0.0", "version=v1.0.0 \n", Some("ok"));
    let mut child = dewy(&registry, &app, (proxy, admin), &log, dir.path());
    wait_logged("two v1 replicas", Duration::from_secs(60), &log, || {
        serving("v1.0.0") && text().contains("Container deployed") && replicas(&registry, &app).len() == 2
    });
    let before = replicas(&registry, &app);
    // v2 has no health path: its first replica is checked for 15 s.
    push_only_remote(&registry, "v2.0.0", "version=v2.0.0 \n", None);
    wait_logged("a v2 replica being checked", Duration::from_secs(60), &log, || {
        replicas(&registry, &app).len() == 3
    });
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = dewy(&registry, &app, (proxy, admin), &log, dir.path());
    let started = Instant::now();
    wait_logged("serving again", Duration::from_secs(10), &log, || serving("v1.0.0"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    wait_logged(
        "the unchecked v2 replica removed",
        Duration::from_secs(30),
        &log,
        || text().contains("was not in rotation"),
    );
    let load = Load::start(addr);
    wait_logged("v2 tried again and recorded bad", Duration::from_secs(60), &log, || {
        text().contains("failed its health check")
    });
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{errors:?} of {ok}: {}", text());
    assert!(ok > 0);
    assert!(serving("v1.0.0"));
    assert_eq!(
        replicas(&registry, &app),
        before,
        "the v1 replicas kept, none restarted: {}",
        text()
    );

    // v2 is recorded bad; a v1 replica killed by hand is replaced by v1.
    registry.podman().args(["rm", "-f", &before[0]]).output().unwrap();
    wait_logged("the replacement", Duration::from_secs(60), &log, || {
        let now = replicas(&registry, &app);
        now.len() == 2 && !now.contains(&before[0])
    });
    assert!(serving("v1.0.0"));
    let status = json(admin, "/api/status");
    assert_eq!(status["current_version"], "v1.0.0", "{status}");

    // SIGTERM while a v3 replica is being checked: dewy stops at once
    // (the check is cut short); the next one, with --replicas 1, adopts
    // the v1 replicas, removes the v3 one, retires the extra v1 replica
    // and records v3 bad.
    push_only_remote(&registry, "v3.0.0", "version=v3.0.0 \n", None);
    wait_logged("a v3 replica being checked", Duration::from_secs(60), &log, || {
        replicas(&registry, &app).len() == 3
    });
    let stopping = Instant::now();
    stop(&mut child);
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "took {:?}",
        stopping.elapsed()
    );
    assert!(text().contains("check_cut_short=true"), "{}", text());
    let mut child = dewy_via(
        &registry,
        &registry.host,
        &app,
        (proxy, admin),
        &log,
        dir.path(),
        &["--replicas", "1"],
    );
    let started = Instant::now();
    wait_logged("serving again", Duration::from_secs(10), &log, || serving("v1.0.0"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let load = Load::start(addr);
    wait_logged("one v1 replica", Duration::from_secs(60), &log, || {
        replicas(&registry, &app).len() == 1 && text().contains("Retiring a replica beyond --replicas")
    });
    wait_logged("v3 recorded bad", Duration::from_secs(60), &log, || {
        text().matches("failed its health check").count() == 2
    });
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{errors:?} of {ok}: {}", text());
    assert!(serving("v1.0.0"));
    let one = replicas(&registry, &app);
    assert_eq!(one.len(), 1, "{}", text());

    // A container of this app and workdir that is not in rotation (say, a
    // `run` that finished after its check was cut short) is removed at
    // the next check; one started from another workdir is another dewy's
    // and stays.
    let out = registry
        .podman()
        .args(["inspect", "--format", "{{.Config.Image}}", &one[0]])
        .output()
        .unwrap();
    let image = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stray = |workdir: &str| {
        let out = registry
            .podman()
            .args(["run", "-d", "--label", "dewy.managed=true"])
            .args(["--label", &format!("dewy.app={app}")])
            .args(["--label", "dewy.digest=sha256:stray"])
            .args(["--label", &format!("dewy.workdir={workdir}")])
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let ours = stray(&dir.path().display().to_string());
    let theirs = stray("/srv/another-dewy");
    wait_logged("the stray container removed", Duration::from_secs(30), &log, || {
        !replicas(&registry, &app).contains(&ours)
    });
    let now = replicas(&registry, &app);
    assert!(
        now.contains(&theirs) && now.contains(&one[0]) && now.len() == 2,
        "{now:?}"
    );
    assert!(serving("v1.0.0"));
    stop(&mut child);
}
