//! Runs a command under dewy-starter and restarts it N times, printing how
//! long each restart took from request to the new generation being ready.
//!
//! ```sh
//! cargo run --release -p dewy-starter --example restarter -- PORT RESTARTS INTERVAL_MS READINESS -- COMMAND [ARGS]
//! ```
//!
//! READINESS is `notify` or `alive:MS`. After the restarts it keeps serving
//! until its stdin closes. Used by `cargo xtask bench restart`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dewy_starter::{ListenSpec, Listeners, Readiness, Starter, StarterConfig};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args
        .iter()
        .position(|a| a == "--")
        .expect("usage: restarter PORT RESTARTS INTERVAL_MS READINESS -- COMMAND");
    let (opts, cmd) = (&args[..split], &args[split + 1..]);
    let port: u16 = opts[0].parse().expect("port");
    let restarts: u32 = opts[1].parse().expect("restarts");
    let interval = Duration::from_millis(opts[2].parse().expect("interval"));
    let readiness = match opts[3].as_str() {
        "notify" => Readiness::Notify {
            timeout: Duration::from_secs(30),
        },
        other => Readiness::Alive(Duration::from_millis(
            other.trim_start_matches("alive:").parse().expect("alive:MS"),
        )),
    };
    let listeners = Listeners::bind(&[ListenSpec::Addr(SocketAddr::from(([127, 0, 0, 1], port)))]).expect("bind");
    let starter = Starter::new(
        StarterConfig {
            command: cmd[0].clone().into(),
            args: cmd[1..].iter().map(Into::into).collect(),
            dir: std::env::current_dir().expect("cwd"),
            env: std::env::vars_os().collect(),
            readiness,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            stop_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        },
        listeners,
    );
    starter.start().await.expect("start");
    println!("ready");
    let mut times = Vec::new();
    for _ in 0..restarts {
        tokio::time::sleep(interval).await;
        let t = Instant::now();
        starter.restart().await.expect("restart");
        times.push(t.elapsed());
    }
    // Keep serving until stdin closes (the load generator has finished).
    println!("restarts done");
    let _ = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await;
    starter.stop().await.expect("stop");
    times.sort();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    let max = times.last().copied().unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    println!(
        "restarts={} median_ms={:.1} max_ms={:.1} peak_rss={rss}",
        times.len(),
        median.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
}
