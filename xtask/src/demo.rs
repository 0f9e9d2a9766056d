//! `cargo xtask demo`: dewy's main job on the built-in `file://` registry
//! and the example app, offline, in about half a minute.
//!
//! Builds `dewy` and `demo-app`, publishes v1.0.0 of the app into
//! `target/demo/registry`, runs `dewy server` on it, keeps a client
//! requesting the app throughout, publishes v2.0.0 while it runs, shows the
//! switch, and stops dewy with SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{run, workspace_root};

fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad answer: {out:?}")));
    }
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or_default())
}

fn package(app: &Path, version: &str, registry: &Path) -> Result<()> {
    let dir = registry.join(version);
    std::fs::create_dir_all(&dir)?;
    let name = format!("demo-app_{}_{}.tar.gz", std::env::consts::OS, std::env::consts::ARCH);
    let tmp = dir.join(format!(".{name}.tmp"));
    let gz = flate2::write::GzEncoder::new(std::fs::File::create(&tmp)?, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_path_with_name(app, "demo-app")?;
    let mut h = tar::Header::new_gnu();
    h.set_size(version.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "VERSION", version.as_bytes())?;
    tar.into_inner()?.finish()?;
    // Published atomically: dewy never sees a half-written artifact.
    std::fs::rename(&tmp, dir.join(&name))?;
    println!("published {version} -> {}", dir.join(name).display());
    Ok(())
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub(crate) fn demo() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "-p", "dewy-cli", "-p", "demo-app"]))?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), std::path::PathBuf::from);
    let (dewy, app) = (target.join("debug/dewy"), target.join("debug/demo-app"));
    let root = target.join("demo");
    let _ = std::fs::remove_dir_all(&root);
    let (registry, appdir) = (root.join("registry"), root.join("app"));
    std::fs::create_dir_all(&appdir)?;
    package(&app, "v1.0.0", &registry)?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    println!(
        "\n$ cd {} && dewy server --registry file://{} --port 127.0.0.1:{port} --interval 2 -- current/demo-app\n",
        appdir.display(),
        registry.display()
    );
    let mut child = Command::new(&dewy)
        .current_dir(&appdir)
        .args([
            "server",
            "--registry",
            &format!("file://{}", registry.display()),
            "--port",
            &format!("127.0.0.1:{port}"),
            "--interval",
            "2",
        ])
        .args(["--", "current/demo-app"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .context("start dewy")?;
    let stderr = child.stderr.take().expect("piped");
    let logger = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            println!("  dewy | {line}");
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let result = (|| -> Result<()> {
        wait_until("v1.0.0 to serve", Duration::from_secs(60), || {
            get(addr).is_ok_and(|b| b.contains("v1.0.0"))
        })?;
        let client = {
            let (stop, ok, failed, seen) = (stop.clone(), ok.clone(), failed.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match get(addr) {
                        Ok(body) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            let version = body.split_whitespace().next().unwrap_or_default().to_owned();
                            let mut s = seen.lock().expect("seen");
                            if s.last() != Some(&version) {
                                println!("  client | now answering: {body}");
                                s.push(version);
                            }
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            println!("  client | FAILED: {e}");
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        std::thread::sleep(Duration::from_secs(2));
        package(&app, "v2.0.0", &registry)?;
        wait_until("v2.0.0 to serve", Duration::from_secs(60), || {
            seen.lock().expect("seen").iter().any(|v| v.contains("v2.0.0"))
        })?;
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::SeqCst);
        let _ = client.join();
        Ok(())
    })();
    stop.store(true, Ordering::SeqCst);
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let status = child.wait()?;
    let _ = logger.join();
    result?;
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("\nversions served: {}", seen.lock().expect("seen").join(" -> "));
    println!("requests: {ok} ok, {failed} failed; dewy exited with {status}");
    println!(
        "releases on disk: {}",
        std::fs::read_dir(appdir.join("releases"))?.count()
    );
    println!("current -> {}", std::fs::read_link(appdir.join("current"))?.display());
    if failed > 0 || !status.success() {
        bail!("the demo saw {failed} failed requests or dewy failed ({status})");
    }
    Ok(())
}
