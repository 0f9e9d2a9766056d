//! Benchmarks that measure dewy against a peer in the same run and print the
//! ratio. Wall times are medians over several alternating rounds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{run, workspace_root};

pub(crate) const NAMES: &[&str] = &["archive"];

pub(crate) fn run_bench(name: Option<&str>, args: &[String]) -> Result<()> {
    match name {
        Some("archive") => archive(args),
        Some(other) => bail!("unknown benchmark `{other}`; known: {}", NAMES.join(", ")),
        None => bail!("name a benchmark: {}", NAMES.join(", ")),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Deterministic pseudo-random bytes (xorshift), mixed with runs of text so
/// the result compresses about 2:1 like a real binary.
fn semi_compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            out.extend_from_slice(b"symbol_table_entry_for_function_");
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

fn build_tree(root: &Path, scale: usize) -> Result<()> {
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::write(root.join("bin/app"), semi_compressible(80 * 1024 * 1024 * scale, 42))?;
    for i in 0..2000 {
        let dir = root.join(format!("assets/d{}", i % 40));
        std::fs::create_dir_all(&dir)?;
        let mut f = std::fs::File::create(dir.join(format!("file{i}.txt")))?;
        for line in 0..(50 + i % 200) {
            writeln!(
                f,
                "line {line} of file {i}: the quick brown fox jumps over the lazy dog"
            )?;
        }
    }
    Ok(())
}

fn peak_rss_kib(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kib="))
        .and_then(|v| v.trim().parse().ok())
}

fn time_cmd(cmd: &mut Command) -> Result<(Duration, String)> {
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((took, String::from_utf8_lossy(&out.stderr).into_owned()))
}

fn archive(args: &[String]) -> Result<()> {
    let scale: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("--scale="))
        .map_or(Ok(1), str::parse)?;
    let rounds: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("--rounds="))
        .map_or(Ok(5), str::parse)?;
    for tool in ["tar", "unzip", "zstd"] {
        if !crate::have(tool) {
            bail!("`{tool}` is needed as the peer of this benchmark (apt-get install tar unzip zstd)");
        }
    }
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "dewy-archive",
            "--example",
            "extract",
        ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let extract = target.join("release/examples/extract");

    let work = tempfile::tempdir()?;
    let tree = work.path().join("tree");
    eprintln!("building a reproducible tree (scale {scale})...");
    build_tree(&tree, scale)?;
    let tgz = work.path().join("app.tar.gz");
    let tzst = work.path().join("app.tar.zst");
    let zip = work.path().join("app.zip");
    run(Command::new("tar").arg("-C").arg(&tree).arg("-czf").arg(&tgz).arg("."))?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("--zstd")
        .arg("-cf")
        .arg(&tzst)
        .arg("."))?;
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && zip -q -r {} .", tree.display(), zip.display())))?;

    println!("format   archive MiB  dewy median  peer median  speed ratio (peer/dewy)  dewy peak RSS");
    let mut n = 0;
    for (label, file, peer) in [
        ("tar.gz", &tgz, "tar -xzf {a} -C {d}"),
        ("tar.zst", &tzst, "tar --zstd -xf {a} -C {d}"),
        ("zip", &zip, "unzip -q {a} -d {d}"),
    ] {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut rss = 0;
        for _ in 0..rounds {
            n += 1;
            let d = work.path().join(format!("ours{n}"));
            let (t, err) = time_cmd(Command::new(&extract).arg(file).arg(&d).env("DEWY_REPORT_RSS", "1"))?;
            rss = rss.max(peak_rss_kib(&err).unwrap_or(0));
            ours.push(t);
            std::fs::remove_dir_all(&d)?;
            let d = work.path().join(format!("peer{n}"));
            std::fs::create_dir_all(&d)?;
            let sh = peer
                .replace("{a}", &file.display().to_string())
                .replace("{d}", &d.display().to_string());
            let (t, _) = time_cmd(Command::new("sh").arg("-c").arg(&sh))?;
            theirs.push(t);
            std::fs::remove_dir_all(&d)?;
        }
        let (o, p) = (median(ours), median(theirs));
        println!(
            "{label:8} {:11.1}  {:>9.3} s  {:>9.3} s  {:>22.2}x  {:>10.1} MiB",
            std::fs::metadata(file)?.len() as f64 / 1048576.0,
            o.as_secs_f64(),
            p.as_secs_f64(),
            p.as_secs_f64() / o.as_secs_f64(),
            rss as f64 / 1024.0
        );
    }
    Ok(())
}
