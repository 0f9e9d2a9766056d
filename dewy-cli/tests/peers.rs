//! `dewy server` with third-party servers that users already run, under a
//! load client: Perl's Starlet (Server::Starter protocol, prefork) and
//! Python's gunicorn (systemd `LISTEN_FDS`). Three releases in a row must
//! drop no request and leave no process behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use dewy_testkit::{Load, wait_for};

const STARLET_APP: &str = r#"my $v = do { local $/; open my $f, '<', 'current/VERSION' or die "VERSION: $!"; <$f> };
chomp $v;
sub { return [200, ['Content-Type' => 'text/plain'], ["version=$v pid=$$\n"]] };
"#;

const GUNICORN_APP: &str = r#"import os
VERSION = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "VERSION")).read().strip()
def app(environ, start_response):
    body = ("version=%s pid=%d\n" % (VERSION, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#;

/// Processes whose working directory is inside `dir`.
fn processes_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir)))
        .map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).replace('\0', " ")
        })
        .collect()
}

/// Runs `dewy server` on `command` and ships v1, v2, v3 of `app_file`
/// under load; returns the successful requests.
fn three_releases_under_load(app_file: (&str, &str), command: &[&str]) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let (app, registry) = (dir.path().join("app"), dir.path().join("registry"));
    std::fs::create_dir_all(&app).unwrap();
    let publish = |tag: &str| {
        let files: Vec<(&str, &[u8], u32)> = vec![
            (app_file.0, app_file.1.as_bytes(), 0o644),
            ("VERSION", tag.as_bytes(), 0o644),
        ];
        dewy_testkit::publish(&registry, tag, "app_linux_amd64.tar.gz", &dewy_testkit::targz(&files));
    };
    let port = dewy_testkit::free_port();
    let addr = ([127, 0, 0, 1], port).into();
    publish("v1.0.0");
    let mut dewy = Command::cargo_bin("dewy").unwrap();
    dewy.current_dir(&app)
        .env_remove("DEWY_LOG")
        .args(["server", "--registry"])
        .arg(format!("file://{}", registry.display()))
        // A bare port: IPv4 0.0.0.0, as start_server binds it.
        .args(["-p", &port.to_string(), "-i", "1", "--stop-timeout", "10s", "--"])
        .args(command)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut dewy = dewy_testkit::Reaped(dewy.spawn().unwrap());
    let served = |tag: &str| {
        dewy_testkit::http_get(addr, "/").is_ok_and(|(s, b)| s == 200 && b.starts_with(&format!("version={tag} ")))
    };
    wait_for("v1.0.0 served", Duration::from_secs(60), || served("v1.0.0"));
    let load = Load::start(addr);
    for tag in ["v2.0.0", "v3.0.0"] {
        publish(tag);
        wait_for(tag, Duration::from_secs(60), || load.version() == tag);
        // Let the old generation drain and exit under load.
        std::thread::sleep(Duration::from_secs(2));
    }
    let (ok, failed, errors) = load.finish();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dewy.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(dewy.wait().unwrap().code(), Some(0));
    assert_eq!(failed, 0, "failed requests: {:?}", &errors[..errors.len().min(5)]);
    assert!(ok > 50, "only {ok} requests succeeded");
    wait_for("no process left", Duration::from_secs(5), || {
        processes_in(&app).is_empty()
    });
    ok
}

fn have_perl_module(module: &str) -> bool {
    Command::new("perl")
        .args([&format!("-M{module}"), "-e", "1"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn starlet_serves_three_releases_without_a_failed_request() {
    assert!(
        have_perl_module("Starlet") && Path::new("/usr/bin/plackup").exists(),
        "Starlet is missing: `cargo xtask install-test-servers` installs Debian's starlet"
    );
    three_releases_under_load(
        ("app.psgi", STARLET_APP),
        &["plackup", "-s", "Starlet", "--max-workers=4", "current/app.psgi"],
    );
}

#[test]
fn gunicorn_serves_three_releases_without_a_failed_request() {
    let gunicorn: PathBuf = dewy_testkit::venv_dir().join("bin/gunicorn");
    assert!(
        gunicorn.exists(),
        "gunicorn is missing at {}: `cargo xtask install-test-servers` installs it",
        gunicorn.display()
    );
    let gunicorn = gunicorn.to_string_lossy().into_owned();
    three_releases_under_load(
        ("app.py", GUNICORN_APP),
        &[
            &gunicorn,
            "--chdir",
            "current",
            "--workers",
            "2",
            "--graceful-timeout",
            "5",
            "app:app",
        ],
    );
}
