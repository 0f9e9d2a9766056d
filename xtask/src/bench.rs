//! Benchmarks that measure dewy against a peer in the same run and print the
//! ratio. Wall times are medians over several alternating rounds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{run, workspace_root};

pub(crate) const NAMES: &[&str] = &[
    "archive",
    "download",
    "restart",
    "ghr-polling",
    "fleet",
    "proxy",
    "rollout",
];

pub(crate) fn run_bench(name: Option<&str>, args: &[String]) -> Result<()> {
    match name {
        Some("archive") => archive(args),
        Some("download") => download(args),
        Some("restart") => restart(args),
        Some("ghr-polling") => ghr_polling(args),
        Some("fleet") => fleet(args),
        Some("proxy") => proxy(args),
        Some("rollout") => crate::bench_rollout::rollout(args),
        Some(other) => bail!("unknown benchmark `{other}`; known: {}", NAMES.join(", ")),
        None => bail!("name a benchmark: {}", NAMES.join(", ")),
    }
}

/// The value of `--name=VALUE` in `args`, else `default`.
pub(crate) fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match args.iter().find_map(|a| a.strip_prefix(name)) {
        Some(v) => v.parse().with_context(|| format!("{name}{v}")),
        None => Ok(default),
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

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

pub(crate) fn build_release(args: &[&str]) -> Result<()> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["build", "--release", "--quiet"])
        .args(args))
}

/// Serves one file over HTTP/1.1 on 127.0.0.1 (std's `io::copy` from a file
/// to a socket uses sendfile, so the server is not the bottleneck).
fn serve_file(path: PathBuf) -> Result<std::net::SocketAddr> {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let path = path.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut reader = BufReader::new(stream.try_clone()?);
                let mut line = String::new();
                while reader.read_line(&mut line)? > 2 {
                    line.clear();
                }
                let mut file = std::fs::File::open(&path)?;
                let len = file.metadata()?.len();
                let mut out = stream;
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
                )?;
                std::io::copy(&mut file, &mut out)?;
                Ok(())
            });
        }
    });
    Ok(addr)
}

fn download(args: &[String]) -> Result<()> {
    let mib: u64 = flag(args, "--mib=", 1024)?;
    let rounds: usize = flag(args, "--rounds=", 5)?;
    if !crate::have("curl") {
        bail!("`curl` is needed as the peer of this benchmark (apt-get install curl)");
    }
    build_release(&["-p", "dewy-registry", "--example", "fetch"])?;
    let fetch = target_dir().join("release/examples/fetch");
    let work = tempfile::tempdir()?;
    let file = work.path().join("artifact.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file)?);
        let block = semi_compressible(1 << 20, 7);
        for _ in 0..mib {
            f.write_all(&block)?;
        }
        // On disk before the rounds, so its writeback does not compete
        // with the first rounds' writes.
        f.into_inner()?.sync_all()?;
    }
    let addr = serve_file(file.clone())?;
    let url = format!("http://{addr}/artifact.bin");
    let staging = work.path().join("staging");
    std::fs::create_dir_all(&staging)?;
    let out = work.path().join("curl.bin");
    let f = out.display();
    // curl alone keeps the file in the page cache and checks nothing;
    // dewy hashes while streaming and syncs before the file may enter the
    // cache (a crash must never leave a partial artifact under a final
    // name). The other peers add those guarantees to curl one at a time.
    let peers = [
        ("curl -o F", format!("curl -s -f -o {f} {url}")),
        ("curl -o F && sync F", format!("curl -s -f -o {f} {url} && sync {f}")),
        (
            "curl | tee F | sha256sum && sync F",
            format!("curl -s -f {url} | tee {f} | sha256sum >/dev/null && sync {f}"),
        ),
    ];
    let mut ours = Vec::new();
    let mut theirs: Vec<Vec<Timed>> = peers.iter().map(|_| Vec::new()).collect();
    let mut rss = 0u64;
    for _ in 0..rounds {
        let (t, err) = timed(Command::new(&fetch).arg(&url).arg(&staging).env("DEWY_REPORT_RSS", "1"))?;
        rss = rss.max(peak_rss_kib(&err).unwrap_or(0));
        ours.push(t);
        for ((_, sh), runs) in peers.iter().zip(&mut theirs) {
            runs.push(timed(Command::new("sh").arg("-c").arg(sh))?.0);
            std::fs::remove_file(&out)?;
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!("download of {mib} MiB from a local HTTP server on {cores} cores, median of {rounds} alternating rounds");
    println!(
        "{:<40} {:>8} {:>7} {:>11} {:>11} {:>12}",
        "", "wall s", "MiB/s", "client CPU", "server CPU", "machine CPU"
    );
    let row = |name: &str, runs: Vec<Timed>| -> Timed {
        let t = Timed::median(runs);
        println!(
            "{name:<40} {:>8.3} {:>7.0} {:>10.2}s {:>10.2}s {:>11.2}s",
            t.wall.as_secs_f64(),
            mib as f64 / t.wall.as_secs_f64(),
            t.cpu.as_secs_f64(),
            t.server_cpu.as_secs_f64(),
            t.machine_cpu.as_secs_f64()
        );
        t
    };
    let dewy = row("dewy (SHA-256 while streaming, fsync)", ours);
    let o = dewy.wall;
    let walls: Vec<Duration> = peers
        .iter()
        .zip(theirs)
        .map(|((name, _), runs)| row(name, runs).wall)
        .collect();
    // Client, server, and the kernel's writeback and interrupts share the
    // cores: dewy cannot finish before the machine's CPU work during its
    // run, spread perfectly over all cores, is done.
    let floor = dewy.machine_cpu.as_secs_f64() / cores as f64;
    println!(
        "CPU floor: the machine was busy {:.2} CPU s during dewy's run, at least {floor:.3} s of wall \
         on {cores} cores, so at most {:.2}x of curl -o F here",
        dewy.machine_cpu.as_secs_f64(),
        walls[0].as_secs_f64() / floor
    );
    for ((name, _), wall) in peers.iter().zip(walls).rev() {
        let goal = if *name == "curl -o F" { " (goal >= 0.9x)" } else { "" };
        println!(
            "throughput ratio dewy / {name}: {:.2}x{goal}",
            wall.as_secs_f64() / o.as_secs_f64()
        );
    }
    println!("dewy peak RSS: {:.1} MiB (goal < 32 MiB)", rss as f64 / 1024.0);
    Ok(())
}

/// Wall time and CPU time (user + system) of one command, the CPU this
/// process used meanwhile (its only busy thread is the file server), and
/// the busy time of the whole machine (kernel threads and interrupts too).
struct Timed {
    wall: Duration,
    cpu: Duration,
    server_cpu: Duration,
    machine_cpu: Duration,
}

impl Timed {
    /// The median of each figure on its own.
    fn median(runs: Vec<Timed>) -> Timed {
        let pick = |f: fn(&Timed) -> Duration| median(runs.iter().map(f).collect());
        Timed {
            wall: pick(|t| t.wall),
            cpu: pick(|t| t.cpu),
            server_cpu: pick(|t| t.server_cpu),
            machine_cpu: pick(|t| t.machine_cpu),
        }
    }
}

fn cpu_time(who: nix::sys::resource::UsageWho) -> Result<Duration> {
    let usage = nix::sys::resource::getrusage(who)?;
    let secs = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    Ok(secs(usage.user_time()) + secs(usage.system_time()))
}

/// Busy time of all CPUs since boot, from the `cpu` line of /proc/stat
/// (user, nice, system, irq, softirq, steal; in USER_HZ = 1/100 s).
fn machine_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| ticks.get(i)).sum();
    Ok(Duration::from_millis(busy * 10))
}

fn timed(cmd: &mut Command) -> Result<(Timed, String)> {
    use nix::sys::resource::UsageWho::{RUSAGE_CHILDREN, RUSAGE_SELF};
    let (children, own, machine) = (cpu_time(RUSAGE_CHILDREN)?, cpu_time(RUSAGE_SELF)?, machine_busy()?);
    let (wall, stderr) = time_cmd(cmd)?;
    let t = Timed {
        wall,
        cpu: cpu_time(RUSAGE_CHILDREN)? - children,
        server_cpu: cpu_time(RUSAGE_SELF)? - own,
        machine_cpu: machine_busy()? - machine,
    };
    Ok((t, stderr))
}

/// Runs wrk against `port` for `secs` and returns (requests, errors).
fn wrk(port: u16, secs: u64) -> Result<std::process::Child> {
    Ok(Command::new("wrk")
        .args([
            "-t2",
            "-c50",
            &format!("-d{secs}s"),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?)
}

fn wrk_result(child: std::process::Child) -> Result<(u64, u64, String)> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut errors = 0u64;
    if let Some(line) = text.lines().find(|l| l.contains("Socket errors")) {
        errors += line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum::<u64>();
    }
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        errors += line
            .split_whitespace()
            .last()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok((requests, errors, text))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn restart(args: &[String]) -> Result<()> {
    let restarts: u32 = flag(args, "--restarts=", 20)?;
    for tool in ["wrk", "start_server"] {
        if !crate::have(tool) {
            bail!("`{tool}` is needed for this benchmark (apt-get install wrk libserver-starter-perl)");
        }
    }
    build_release(&["-p", "dewy-starter", "--example", "restarter"])?;
    let restarter = target_dir().join("release/examples/restarter");
    // `--app=starlet`: Perl's Starlet (prefork PSGI server, Server::Starter
    // protocol) as the app of both, instead of the demo app.
    let starlet = args.iter().any(|a| a == "--app=starlet");
    let work = tempfile::tempdir()?;
    let (app, readiness, label): (Vec<std::ffi::OsString>, &str, &str) = if starlet {
        let psgi = work.path().join("app.psgi");
        std::fs::write(
            &psgi,
            "sub { [200, ['Content-Type' => 'text/plain'], [\"generation=$ENV{SERVER_STARTER_GENERATION} pid=$$\\n\"]] };\n",
        )?;
        (
            ["plackup", "-s", "Starlet", "--max-workers=4"]
                .iter()
                .map(Into::into)
                .chain([psgi.into_os_string()])
                .collect(),
            "alive:1000",
            "Starlet --max-workers=4 (drains on SIGTERM)",
        )
    } else {
        build_release(&["-p", "demo-app"])?;
        (
            vec![target_dir().join("release/demo-app").into_os_string()],
            "notify",
            "demo-app drains on SIGTERM",
        )
    };
    let interval_ms = 1000u64;
    let secs = (u64::from(restarts) + 3) * interval_ms / 1000 + 2;

    // dewy-starter, readiness by notification.
    let port = free_port()?;
    let mut ours = Command::new(&restarter)
        .args([
            &port.to_string(),
            &restarts.to_string(),
            &interval_ms.to_string(),
            readiness,
            "--",
        ])
        .args(&app)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdin = ours.stdin.take();
    let mut lines = std::io::BufReader::new(ours.stdout.take().expect("piped"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut lines, &mut first)?;
    let load = wrk(port, secs)?;
    let (our_requests, our_errors, _) = wrk_result(load)?;
    drop(stdin);
    let mut summary = String::new();
    std::io::Read::read_to_string(&mut lines, &mut summary)?;
    ours.wait()?;
    let summary = summary
        .lines()
        .filter(|l| l.starts_with("restarts="))
        .collect::<String>();

    // start_server --interval=1 with SIGHUP.
    let port = free_port()?;
    let ss = Command::new("start_server")
        .args([&format!("--port=127.0.0.1:{port}"), "--interval=1", "--"])
        .args(&app)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    let load = wrk(port, secs)?;
    let mut ss_times = Vec::new();
    for _ in 0..restarts {
        std::thread::sleep(Duration::from_millis(interval_ms));
        let t = Instant::now();
        Command::new("kill").args(["-HUP", &ss.id().to_string()]).status()?;
        // start_server declares the new generation after --interval (1 s).
        let before = crate::bench::generation_of(port);
        while crate::bench::generation_of(port) == before && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        ss_times.push(t.elapsed());
    }
    let (ss_requests, ss_errors, _) = wrk_result(load)?;
    Command::new("kill").args(["-TERM", &ss.id().to_string()]).status()?;
    let ss_median = median(ss_times);

    println!("{restarts} restarts under wrk -t2 -c50 on loopback ({label})");
    println!(
        "dewy-starter: {our_requests} requests, {our_errors} failed; {}",
        summary.trim()
    );
    println!(
        "start_server: {ss_requests} requests, {ss_errors} failed; median time to new generation serving {:.1} ms",
        ss_median.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// The generation answering on `port` right now (from the demo app's body).
pub(crate) fn generation_of(port: u16) -> String {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split("generation=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

fn archive(args: &[String]) -> Result<()> {
    let scale: usize = flag(args, "--scale=", 1)?;
    let rounds: usize = flag(args, "--rounds=", 5)?;
    let durable = args.iter().any(|a| a == "--durable");
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

    // Extract into memory (/dev/shm) when there is one: this measures the
    // extractors, not the disk's writeback of earlier rounds. `--durable`
    // measures on disk (the target folder's filesystem), where the files
    // must reach the platters before the command returns.
    let base = args
        .iter()
        .find_map(|a| a.strip_prefix("--dir=").map(PathBuf::from))
        .unwrap_or_else(|| {
            if durable {
                target.join("tmp")
            } else if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            }
        });
    std::fs::create_dir_all(&base)?;
    let work = tempfile::tempdir_in(&base)?;
    println!("working in {}", base.display());
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

    if durable {
        println!(
            "durable: dewy's --durable extraction against `<peer> && sync`; both on disk, page cache flushed before each run"
        );
        println!(
            "format   archive MiB  dewy durable  peer + sync  speed ratio (peer/dewy)  dewy not durable  dewy peak RSS"
        );
    } else {
        println!("format   archive MiB  dewy median  peer median  speed ratio (peer/dewy)  dewy peak RSS");
    }
    // Nothing of an earlier run may still be in writeback when a run starts.
    let settle = || -> Result<()> {
        Command::new("sync").status()?;
        Ok(())
    };
    let mut n = 0;
    for (label, file, peer) in [
        ("tar.gz", &tgz, "tar -xzf {a} -C {d}"),
        ("tar.zst", &tzst, "tar --zstd -xf {a} -C {d}"),
        ("zip", &zip, "unzip -q {a} -d {d}"),
    ] {
        let mut ours = Vec::new();
        let mut loose = Vec::new();
        let mut theirs = Vec::new();
        let mut rss = 0;
        for _ in 0..rounds {
            n += 1;
            let passes: &[bool] = if durable { &[true, false] } else { &[false] };
            for &d_mode in passes {
                let d = work.path().join(format!("ours{n}{d_mode}"));
                settle()?;
                let mut cmd = Command::new(&extract);
                if d_mode {
                    cmd.arg("--durable");
                }
                let (t, err) = time_cmd(cmd.arg(file).arg(&d).env("DEWY_REPORT_RSS", "1"))?;
                rss = rss.max(peak_rss_kib(&err).unwrap_or(0));
                if d_mode || !durable {
                    ours.push(t);
                } else {
                    loose.push(t);
                }
                std::fs::remove_dir_all(&d)?;
            }
            let d = work.path().join(format!("peer{n}"));
            std::fs::create_dir_all(&d)?;
            let mut sh = peer
                .replace("{a}", &file.display().to_string())
                .replace("{d}", &d.display().to_string());
            if durable {
                sh.push_str(" && sync");
            }
            settle()?;
            let (t, _) = time_cmd(Command::new("sh").arg("-c").arg(&sh))?;
            theirs.push(t);
            std::fs::remove_dir_all(&d)?;
        }
        let (o, p) = (median(ours), median(theirs));
        let mib = std::fs::metadata(file)?.len() as f64 / 1048576.0;
        let ratio = p.as_secs_f64() / o.as_secs_f64();
        if durable {
            println!(
                "{label:8} {mib:11.1}  {:>10.3} s  {:>9.3} s  {ratio:>22.2}x  {:>14.3} s  {:>10.1} MiB",
                o.as_secs_f64(),
                p.as_secs_f64(),
                median(loose).as_secs_f64(),
                rss as f64 / 1024.0
            );
        } else {
            println!(
                "{label:8} {mib:11.1}  {:>9.3} s  {:>9.3} s  {ratio:>22.2}x  {:>10.1} MiB",
                o.as_secs_f64(),
                p.as_secs_f64(),
                rss as f64 / 1024.0
            );
        }
    }
    Ok(())
}

/// 50 simulated hosts poll the fake GitHub every 10 s for a simulated hour
/// with no new release; then one release appears. Hosts poll at staggered
/// phases within the interval, in simulated-time order, against the real
/// HTTP fake; the peer is the Go original's polling (an unconditional list
/// of every page per tick), run in the same process for comparison.
fn ghr_polling(args: &[String]) -> Result<()> {
    let hosts: usize = flag(args, "--hosts=", 50)?;
    const INTERVAL_S: f64 = 10.0;
    const HOUR_TICKS: usize = 360;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let gh = dewy_testkit::github::FakeGithub::start();
    gh.add_token("ghp_fleet");
    gh.set_rate_limit(u64::MAX / 2, Duration::from_secs(7200));
    let art = "app_linux_amd64.tar.gz";
    for i in 0..30 {
        gh.add_release(&format!("v1.0.{i}"), &[(art, b"x")]);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let opts = dewy_registry::OpenOptions {
        github: dewy_registry::GithubEnv {
            token: Some("ghp_fleet".into()),
            api_url: Some(gh.api_url()),
            ..Default::default()
        },
        ..Default::default()
    };
    let url = format!("ghr://o/r?artifact={art}");
    let fleet: Vec<_> = (0..hosts)
        .map(|_| dewy_registry::open(&url, &opts))
        .collect::<Result<_, _>>()?;
    // Poll events in simulated time: host h polls at h/hosts*interval + k*interval.
    let phase = |h: usize| h as f64 / hosts as f64 * INTERVAL_S;
    let started = Instant::now();
    gh.clear_requests();
    rt.block_on(async {
        for k in 0..HOUR_TICKS {
            for reg in &fleet {
                let tag = reg.latest().await?.tag;
                anyhow::ensure!(tag == "v1.0.29", "tick {k}: chose {tag}");
            }
        }
        anyhow::Ok(())
    })?;
    let idle = gh.requests();
    let idle_counted = idle.iter().filter(|r| r.counted()).count();
    // The first poll of each host is a fresh answer (its cache is empty);
    // what matters is the steady state after it.
    let steady_counted = idle_counted.saturating_sub(hosts);

    // A release appears between two ticks, at a simulated moment in the middle
    // of the interval; each host sees it at its next poll.
    let appear_at = HOUR_TICKS as f64 * INTERVAL_S + INTERVAL_S / 2.0 + 0.01;
    gh.add_release("v1.1.0", &[(art, b"new")]);
    gh.clear_requests();
    let mut latest_pick = 0.0f64;
    let mut chosen = vec![false; hosts];
    rt.block_on(async {
        for k in HOUR_TICKS.. {
            let mut pending = false;
            for (h, reg) in fleet.iter().enumerate() {
                let t = k as f64 * INTERVAL_S + phase(h);
                if chosen[h] {
                    continue;
                }
                if t < appear_at {
                    pending = true;
                    continue;
                }
                if reg.latest().await?.tag == "v1.1.0" {
                    chosen[h] = true;
                    latest_pick = latest_pick.max(t - appear_at);
                } else {
                    pending = true;
                }
            }
            if !pending || k > HOUR_TICKS + 10 {
                break;
            }
        }
        anyhow::Ok(())
    })?;
    let release_cost = gh.requests().iter().filter(|r| r.counted()).count();
    let wall = started.elapsed();

    // The peer: Dewy's unconditional listing, one request per page per tick
    // (30 releases fit one page), for a few hosts over the same hour.
    let peer_hosts = 5usize;
    gh.clear_requests();
    for _ in 0..HOUR_TICKS {
        for _ in 0..peer_hosts {
            let (status, _) = dewy_testkit::http_get(gh.api_addr(), "/repos/o/r/releases?per_page=100")?;
            anyhow::ensure!(status == 200, "peer poll answered {status}");
        }
    }
    let peer_counted = gh.requests().iter().filter(|r| r.counted()).count();
    let peer_per_host = peer_counted as f64 / peer_hosts as f64;
    let ours_per_host = steady_counted as f64 / hosts as f64;

    println!("ghr polling: {hosts} hosts, {INTERVAL_S} s interval, one simulated hour, 30 releases");
    println!(
        "requests counting against the rate limit per host-hour while nothing changes: dewy {ours_per_host:.2} (goal 0), Go-style peer {peer_per_host:.0}"
    );
    println!(
        "  (dewy: {} requests, {} answered 304; plus {} first answers to fill the caches)",
        idle.len(),
        idle.iter().filter(|r| r.status == 304).count(),
        hosts
    );
    println!(
        "new release: counted requests for the whole fleet {release_cost}; every host chose it {latest_pick:.2} s after it appeared (goal <= {INTERVAL_S} s)"
    );
    println!(
        "hosts one 5,000/h token serves at this interval: dewy unlimited while idle, Go-style peer {:.0}",
        5000.0 / peer_per_host
    );
    println!("(wall time {:.1} s)", wall.as_secs_f64());
    anyhow::ensure!(
        steady_counted == 0,
        "dewy spent {steady_counted} counted requests while idle"
    );
    anyhow::ensure!(latest_pick <= INTERVAL_S, "slowest host took {latest_pick:.1} s");
    Ok(())
}

/// An upstream registry that counts when it is asked.
#[derive(Debug)]
struct Counting {
    inner: std::sync::Arc<dyn dewy_registry::Registry>,
    calls: std::sync::Mutex<Vec<Instant>>,
}

#[async_trait::async_trait]
impl dewy_registry::Registry for Counting {
    async fn latest(&self) -> Result<dewy_registry::Release, dewy_registry::Error> {
        self.calls.lock().expect("calls").push(Instant::now());
        self.inner.latest().await
    }
    async fn artifact_request(
        &self,
        release: &dewy_registry::Release,
    ) -> Result<dewy_registry::ArtifactRequest, dewy_registry::Error> {
        self.inner.artifact_request(release).await
    }
}

/// 20 dewy-core instances (assets mode, one process) share one S3 cache
/// (moto) with `registry-ttl=5s` in front of a counting registry; a release
/// is published; upstream calls per TTL window, upstream downloads per
/// release, and the time until every instance has the release are printed.
fn fleet(args: &[String]) -> Result<()> {
    use std::sync::Arc;
    let hosts: usize = flag(args, "--hosts=", 20)?;
    let mib: usize = flag(args, "--mib=", 32)?;
    const TTL: Duration = Duration::from_secs(5);
    const INTERVAL: Duration = Duration::from_secs(1);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let s3 = dewy_testkit::S3Server::start();
    s3.create_bucket("fleet");
    let work = tempfile::tempdir()?;
    let releases = work.path().join("releases");
    let publish = |tag: &str, seed: u64| -> Result<()> {
        let payload = semi_compressible(mib << 20, seed);
        let data = dewy_testkit::targz(&[("app.bin", &payload, 0o755)]);
        let tmp = work.path().join(format!(".{tag}"));
        std::fs::create_dir_all(&tmp)?;
        std::fs::write(tmp.join("app_linux_amd64.tar.gz"), data)?;
        std::fs::create_dir_all(&releases)?;
        std::fs::rename(&tmp, releases.join(tag))?;
        Ok(())
    };
    publish("v1.0.0", 1)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cloud = dewy_store::CloudOptions {
        aws_credentials: Some(("test".into(), "test".into(), None)),
        ..Default::default()
    };
    let opts = dewy_registry::OpenOptions {
        platform: dewy_registry::Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            libc: Some("gnu".into()),
        },
        ..Default::default()
    };
    let registry_url = format!("file://{}?artifact=app_linux_amd64.tar.gz", releases.display());
    let upstream = Arc::new(Counting {
        inner: dewy_registry::open(&registry_url, &opts)?,
        calls: std::sync::Mutex::new(Vec::new()),
    });
    let cache_url = url::Url::parse(&format!("s3://us-east-1/fleet/cache?endpoint={}", s3.endpoint))?;
    let mut deployers = Vec::new();
    let _runtime = rt.enter();
    for i in 0..hosts {
        let opened = dewy_store::open_store(&cache_url, &cloud)?;
        let root = work.path().join(format!("host{i}"));
        let local = dewy_cache::FileCache::open(root.join(".dewy/cache"))?;
        let cache = Arc::new(
            dewy_cache::cloud::CloudCache::new(opened.store.clone(), opened.prefix.clone(), local)
                .with_node(format!("host{i}:1"), Duration::from_secs(600)),
        );
        let shared = Arc::new(dewy_registry::SharedRegistry::new(
            upstream.clone(),
            opened.store,
            &opened.prefix,
            dewy_registry::SharedScope {
                registry_url: registry_url.clone(),
                scope: "linux|x86_64||".into(),
                scheme: dewy_registry::Scheme::SemVer,
                node: format!("host{i}:1"),
            },
            TTL,
        ));
        let notify = dewy_notify::Notify::new(Arc::new(dewy_notify::NullNotifier), Default::default(), true);
        let mut config = dewy_core::Config::new(dewy_core::Mode::Assets, root);
        config.interval = INTERVAL;
        deployers.push(Arc::new(dewy_core::Deployer::new(config, shared, cache, notify, None)?));
    }
    let on = |tag: &'static str| {
        let deployers = deployers.clone();
        async move {
            let mut n = 0;
            for d in &deployers {
                if d.status().await.current_version.as_deref() == Some(tag) {
                    n += 1;
                }
            }
            n
        }
    };
    rt.block_on(async {
        for (i, d) in deployers.iter().enumerate() {
            let d = d.clone();
            tokio::spawn(async move {
                // Staggered start, as real hosts are.
                tokio::time::sleep(INTERVAL.mul_f64(i as f64 / hosts as f64)).await;
                loop {
                    let _ = d.tick().await;
                    tokio::time::sleep(INTERVAL).await;
                }
            });
        }
        let warm = Instant::now();
        while on("v1.0.0").await < hosts {
            anyhow::ensure!(
                warm.elapsed() < Duration::from_secs(120),
                "the fleet did not deploy v1.0.0"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    })?;
    let downloads = |ds: &[Arc<dewy_core::Deployer>]| {
        ds.iter()
            .map(|d| d.metrics().downloads.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
    };
    let first_downloads = downloads(&deployers);
    // One download alone, for the goal.
    let single = {
        let started = Instant::now();
        let dl = dewy_registry::Downloader::new(Default::default())?;
        let release = rt.block_on(upstream.inner.latest())?;
        let staging = work.path().join("staging");
        std::fs::create_dir_all(&staging)?;
        rt.block_on(dl.fetch(&release, &staging, &dewy_registry::NoProgress))?;
        started.elapsed()
    };
    let published = Instant::now();
    publish("v1.1.0", 2)?;
    let all_have = rt.block_on(async {
        while on("v1.1.0").await < hosts {
            anyhow::ensure!(
                published.elapsed() < Duration::from_secs(120),
                "the fleet did not deploy v1.1.0"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(published.elapsed())
    })?;
    // Keep polling for a few more windows to count upstream calls per TTL.
    std::thread::sleep(TTL * 3);
    let calls = upstream.calls.lock().expect("calls").clone();
    let second_downloads = downloads(&deployers) - first_downloads;
    let windows: Vec<usize> = (0..6)
        .map(|w| {
            let from = published + TTL * w;
            calls.iter().filter(|t| **t >= from && **t < from + TTL).count()
        })
        .filter(|_| true)
        .collect();
    let windows = &windows[..(published.elapsed().as_secs_f64() / TTL.as_secs_f64()).floor().min(6.0) as usize];
    rt.shutdown_background();
    println!(
        "fleet: {hosts} dewy-core instances, one S3 cache (moto), registry-ttl {}s, interval {}s, {mib} MiB artifact",
        TTL.as_secs(),
        INTERVAL.as_secs()
    );
    println!("upstream registry calls per TTL window after the release: {windows:?} (goal: exactly 1 each)");
    println!(
        "upstream artifact downloads: first release {first_downloads}, new release {second_downloads} (goal: exactly 1)"
    );
    println!(
        "every instance had the new release {:.2} s after it was published (goal: under one TTL + one download = {:.2} s; one download alone took {:.2} s; ticks every {} s)",
        all_have.as_secs_f64(),
        (TTL + single).as_secs_f64(),
        single.as_secs_f64(),
        INTERVAL.as_secs()
    );
    println!(
        "peer: without the shared cache every instance asks upstream each tick ({} calls per window) and downloads itself ({hosts} downloads per release)",
        hosts as u64 * TTL.as_secs() / INTERVAL.as_secs()
    );
    anyhow::ensure!(
        windows.iter().all(|n| *n == 1),
        "upstream calls per window: {windows:?}"
    );
    anyhow::ensure!(
        first_downloads == 1 && second_downloads == 1,
        "downloads {first_downloads}/{second_downloads}"
    );
    Ok(())
}

/// Requests per second and the 99th percentile latency of a wrk run.
fn wrk_rate(port: u16, secs: u64) -> Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c32",
            "--latency",
            &format!("-d{secs}s"),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(str::trim)
        .and_then(|v| {
            let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
            let n: f64 = num.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => return None,
            })
        })
        .with_context(|| format!("no 99% latency in wrk's output:\n{text}"))?;
    Ok((rate, p99))
}

/// `cargo xtask bench proxy`: wrk through dewy's container proxy against
/// wrk straight to the replica it forwards to, alternating rounds, for two
/// replicas in podman: busybox httpd (a new connection per request) and
/// demo-app built static (keep-alive). Prints the requests/s ratio (goal
/// >= 0.8), the added p99 latency, and the proxy's peak RSS (goal < 32 MiB).
fn proxy(args: &[String]) -> Result<()> {
    let secs: u64 = flag(args, "--secs=", 5)?;
    let rounds: usize = flag(args, "--rounds=", 3)?;
    for tool in ["wrk", "podman", "docker-registry", "haproxy"] {
        if !crate::have(tool) {
            bail!("`{tool}` is needed for this benchmark (cargo xtask test installs it)");
        }
    }
    build_release(&["-p", "dewy-cli", "--bin", "dewy"])?;
    let demo = static_demo_app()?;
    let registry = dewy_testkit::ImageRegistry::start();
    let page = format!("version=v1.0.0 {}\n", "x".repeat(1024));
    registry.push_web_image("bench/web", "v1.0.0", &page, Some("ok"));
    registry.push_binary_image(
        "bench/keepalive",
        "v1.0.0",
        &demo,
        &["HOST=0.0.0.0", "PORT=8080", "APP_VERSION=v1.0.0"],
    );
    println!("proxy: wrk -t2 -c32 {secs}s x{rounds} rounds (medians), one replica in podman");
    for (label, repo) in [
        ("busybox httpd, a connection per request", "bench/web"),
        ("demo-app, keep-alive", "bench/keepalive"),
    ] {
        proxy_case(&registry, label, repo, secs, rounds)?;
    }
    Ok(())
}

/// HAProxy in TCP mode on `port`, forwarding to `127.0.0.1:backend` (two
/// threads, as many as the machine has cores); stopped on drop.
fn start_haproxy(dir: &Path, port: u16, backend: u16) -> Result<dewy_testkit::Reaped> {
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  nbthread 2\n  maxconn 4096\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend bench\n  bind 127.0.0.1:{port}\n  default_backend replica\n\
             backend replica\n  server r1 127.0.0.1:{backend}\n"
        ),
    )?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting haproxy (the peer; cargo xtask test installs it)")?;
    let haproxy = dewy_testkit::Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("haproxy did not listen on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(haproxy)
}

/// demo-app linked statically (it runs in an image with nothing else).
fn static_demo_app() -> Result<PathBuf> {
    let dir = target_dir().join("static");
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["build", "--release", "--quiet", "-p", "demo-app"])
        .args(["--target", "x86_64-unknown-linux-gnu", "--target-dir"])
        .arg(&dir))?;
    Ok(dir.join("x86_64-unknown-linux-gnu/release/demo-app"))
}

/// One `dewy container` in front of `repo`, measured against its replica.
fn proxy_case(registry: &dewy_testkit::ImageRegistry, label: &str, repo: &str, secs: u64, rounds: usize) -> Result<()> {
    let dewy = target_dir().join("release/dewy");
    let work = tempfile::tempdir()?;
    let app = format!("bench{}", std::process::id());
    let port = free_port()?;
    let mut cmd = Command::new(&dewy);
    for (k, v) in &registry.podman_env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .args(["container", "--registry", &format!("img://{}/{repo}", registry.host)])
        .args([
            "--runtime",
            "podman",
            "-p",
            &port.to_string(),
            "--listen",
            "127.0.0.1",
            "-n",
            &app,
        ])
        .args([
            "--health-path",
            "/health",
            "--stop-timeout",
            "1s",
            "-i",
            "60",
            "-l",
            "warn",
        ])
        .arg("-w")
        .arg(work.path())
        .stderr(std::fs::File::create(work.path().join("dewy.log"))?)
        .spawn()?;
    let result = (|| -> Result<()> {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !dewy_testkit::http_get(addr, "/").is_ok_and(|(s, _)| s == 200) {
            if Instant::now() > deadline {
                bail!(
                    "dewy did not serve: {}",
                    std::fs::read_to_string(work.path().join("dewy.log"))?
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let ids = registry
            .podman()
            .args(["ps", "-q", "--filter", &format!("label=dewy.app={app}")])
            .output()?;
        let id = String::from_utf8_lossy(&ids.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        let mapped = registry.podman().args(["port", &id, "8080/tcp"]).output()?;
        let direct: u16 = String::from_utf8_lossy(&mapped.stdout)
            .lines()
            .next()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.trim().parse().ok())
            .context("the replica's published port")?;
        // The peer: HAProxy in TCP mode in front of the same replica.
        let haproxy_port = free_port()?;
        let _haproxy = start_haproxy(work.path(), haproxy_port, direct)?;
        let (mut via, mut straight, mut peer) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            straight.push(wrk_rate(direct, secs)?);
            via.push(wrk_rate(port, secs)?);
            peer.push(wrk_rate(haproxy_port, secs)?);
        }
        let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let (rate_via, rate_direct) = (med(&via, |r| r.0), med(&straight, |r| r.0));
        let (p99_via, p99_direct) = (med(&via, |r| r.1), med(&straight, |r| r.1));
        let (rate_peer, p99_peer) = (med(&peer, |r| r.0), med(&peer, |r| r.1));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        let hwm_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        println!("{label}:");
        println!("  straight to the replica: {rate_direct:>10.0} req/s  p99 {p99_direct:.2} ms");
        println!("  through dewy's proxy:    {rate_via:>10.0} req/s  p99 {p99_via:.2} ms");
        println!("  through HAProxy (peer):  {rate_peer:>10.0} req/s  p99 {p99_peer:.2} ms");
        println!(
            "  ratio {:.2} (goal >= 0.8), added p99 {:.2} ms, dewy peak RSS {:.1} MiB (goal < 32)",
            rate_via / rate_direct,
            p99_via - p99_direct,
            hwm_kib as f64 / 1024.0
        );
        println!(
            "  peer: HAProxy's ratio {:.2}; dewy against HAProxy {:.2}",
            rate_peer / rate_direct,
            rate_via / rate_peer
        );
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    let ids = registry
        .podman()
        .args(["ps", "-aq", "--filter", &format!("label=dewy.app={app}")])
        .output()?;
    let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    if !ids.is_empty() {
        let _ = registry.podman().args(["rm", "-f"]).args(&ids).output();
    }
    result
}
