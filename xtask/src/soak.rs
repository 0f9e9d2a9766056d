//! `cargo xtask soak --minutes N`: the release `dewy` binary serves the demo
//! app under a load client while a new release is published every few
//! seconds; prints releases deployed, failed requests, and dewy's RSS and
//! open descriptors at the start and the end (goal: no growth).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::bench::{build_release, target_dir};

fn get(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(s, "GET / HTTP/1.0\r\nHost: soak\r\n\r\n").is_err() {
        return false;
    }
    let mut raw = String::new();
    s.read_to_string(&mut raw).is_ok() && (raw.starts_with("HTTP/1.1 200") || raw.starts_with("HTTP/1.0 200"))
}

/// (RSS in KiB, open descriptors) of `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

pub(crate) fn soak(args: &[String]) -> Result<()> {
    let minutes: f64 = match args {
        [flag, n, ..] if flag == "--minutes" => n.parse()?,
        [flag, ..] if flag.starts_with("--minutes=") => flag.trim_start_matches("--minutes=").parse()?,
        [] => 5.0,
        other => bail!("usage: cargo xtask soak [--minutes N], not {other:?}"),
    };
    let every = Duration::from_secs(3);
    build_release(&["-p", "dewy-cli", "-p", "demo-app"])?;
    let (dewy, demo) = (target_dir().join("release/dewy"), target_dir().join("release/demo-app"));
    let demo_bytes = std::fs::read(&demo)?;
    let work = tempfile::tempdir()?;
    let (app, reg) = (work.path().join("app"), work.path().join("registry"));
    std::fs::create_dir_all(&app)?;
    let publish = |n: u32| {
        let tag = format!("v1.0.{n}");
        let data = dewy_testkit::targz(&[("demo-app", &demo_bytes, 0o755), ("VERSION", tag.as_bytes(), 0o644)]);
        dewy_testkit::publish(&reg, &tag, "demo_linux_amd64.tar.gz", &data);
    };
    publish(0);
    let port = dewy_testkit::free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = std::process::Command::new(&dewy)
        .current_dir(&app)
        .args([
            "server",
            "--registry",
            &format!("file://{}", reg.display()),
            "-p",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "-i",
            "1",
            "--ready-notify",
            "--keep-releases",
            "3",
            "--log-level",
            "warn",
            "--",
            "current/demo-app",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(work.path().join("dewy.log"))?)
        .spawn()?;
    let started = Instant::now();
    while !get(addr) {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            bail!("dewy did not serve the first release");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the first deploy settle before the baseline.
    std::thread::sleep(Duration::from_secs(2));
    let start_usage = usage(child.id());
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if get(addr) {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut published = 0;
    // RSS over the run: a leak keeps climbing, allocator high-water marks
    // level off.
    let mut samples = vec![(0u64, start_usage.0)];
    let soak_start = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(every);
        published += 1;
        publish(published);
        let at = soak_start.elapsed().as_secs();
        if at >= samples.last().map_or(0, |s| s.0) + 30 {
            samples.push((at, usage(child.id()).0));
        }
    }
    std::thread::sleep(Duration::from_secs(4));
    let end_usage = usage(child.id());
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    let history = std::fs::read_to_string(app.join(".dewy/history.jsonl")).unwrap_or_default();
    let deployed = history.lines().filter(|l| l.contains("\"deployed\"")).count();
    let _ = nix_kill(child.id());
    let _ = child.wait();
    println!(
        "soak: {minutes} min, a release every {} s, interval 1 s",
        every.as_secs()
    );
    println!("releases published {}, deployed {deployed}", published + 1);
    println!(
        "requests ok {}, failed {}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    println!("dewy RSS: start {} KiB, end {} KiB", start_usage.0, end_usage.0);
    let series: Vec<String> = samples.iter().map(|(t, kib)| format!("{t}s {kib}")).collect();
    println!("dewy RSS every 30 s (KiB): {}", series.join(", "));
    println!("dewy open descriptors: start {}, end {}", start_usage.1, end_usage.1);
    if failed.load(Ordering::Relaxed) > 0 {
        bail!("requests failed during the soak");
    }
    let middle = samples[samples.len() / 2].1;
    if samples.len() >= 4 && end_usage.0 > middle * 3 / 2 {
        bail!(
            "RSS still climbing: {} KiB at the middle of the run, {} KiB at the end",
            middle,
            end_usage.0
        );
    }
    if end_usage.1 > start_usage.1 + 2 {
        bail!("open descriptors grew from {} to {}", start_usage.1, end_usage.1);
    }
    Ok(())
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

/// Writes `docs/reliability.md` from the rows the e2e scenarios recorded.
pub(crate) fn reliability_table() -> Result<()> {
    let dir = target_dir().join("tmp/e2e");
    let mut rows: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    if rows.is_empty() {
        bail!("no e2e results in {}", dir.display());
    }
    rows.sort();
    let mut out = String::from(
        "# Reliability\n\n\
         Generated by `cargo xtask test` from the end-to-end scenarios in\n\
         `dewy-cli/tests/e2e.rs`; do not edit by hand. Each scenario runs\n\
         the real `dewy server` binary with the demo app under a load client (one\n\
         request per connection, back to back) for the whole scenario, injects the\n\
         faults listed, and checks the state on disk afterwards.\n\n\
         | scenario | faults injected | requests ok | requests failed | checked |\n\
         |---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&r);
    }
    out.push_str(
        "\nThe soak (`cargo xtask soak --minutes N`) publishes a release every 3 s\n\
         under load and reports failed requests, RSS and open descriptors at the\n\
         start and the end; see docs/benchmarks.md.\n",
    );
    let path = crate::workspace_root().join("docs/reliability.md");
    std::fs::write(&path, out)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
