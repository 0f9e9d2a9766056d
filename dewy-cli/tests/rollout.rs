//! Staged rollouts (`--rollout`): ten real dewy processes in server mode,
//! each with its own app folder and demo app, sharing one bucket on moto
//! (S3) or fake-gcs-server (GCS). One host runs with its clock ten minutes
//! behind (libfaketime). Every host's JSON log is the event log the
//! assertions read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dewy_testkit::wait_for;

/// The skewed host's clock, behind the others.
const SKEW_SECS: i64 = 600;

/// Debian's libfaketime (package `faketime`).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

struct Host {
    id: String,
    dir: tempfile::TempDir,
    port: u16,
    skewed: bool,
    child: Option<Child>,
}

impl Host {
    fn app(&self) -> PathBuf {
        self.dir.path().join("app")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("dewy.log")
    }

    fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    fn serving(&self) -> Option<String> {
        let (status, body) = dewy_testkit::http_get(self.addr(), "/").ok()?;
        (status == 200).then(|| {
            body.split_whitespace()
                .find_map(|w| w.strip_prefix("version="))
                .unwrap_or_default()
                .to_owned()
        })
    }

    fn app_pid(&self) -> Option<i32> {
        let (_, body) = dewy_testkit::http_get(self.addr(), "/").ok()?;
        body.split_whitespace()
            .find_map(|w| w.strip_prefix("pid=")?.parse().ok())
    }

    /// The rollout lines of this host's log: (time in ms by the true
    /// clock, message, version).
    fn events(&self) -> Vec<(i64, String, String)> {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["msg"].as_str().is_some_and(|m| m.starts_with("Rollout")))
            .filter_map(|v| {
                let time: jiff::Timestamp = v["time"].as_str()?.parse().ok()?;
                let ms = time.as_millisecond() + if self.skewed { SKEW_SECS * 1000 } else { 0 };
                Some((
                    ms,
                    v["msg"].as_str()?.to_owned(),
                    v["version"].as_str().unwrap_or_default().to_owned(),
                ))
            })
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Fleet {
    registry: tempfile::TempDir,
    cache: String,
    env: Vec<(String, String)>,
    plan: String,
    demo: Vec<u8>,
    hosts: Vec<Host>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            if let Some(c) = &h.child {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for h in &mut self.hosts {
            if let Some(mut c) = h.child.take() {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Fleet {
    fn new(cache: String, env: Vec<(String, String)>, plan: &str, hosts: usize, skewed: Option<usize>) -> Self {
        let mut fleet = Self {
            registry: tempfile::tempdir().unwrap(),
            cache,
            env,
            plan: plan.to_owned(),
            demo: std::fs::read(dewy_testkit::demo_app()).unwrap(),
            hosts: Vec::new(),
        };
        for i in 0..hosts {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("app")).unwrap();
            fleet.hosts.push(Host {
                id: format!("host-{i}"),
                dir,
                port: dewy_testkit::free_port(),
                skewed: skewed == Some(i),
                child: None,
            });
        }
        for i in 0..hosts {
            fleet.start(i);
        }
        fleet
    }

    fn start(&mut self, i: usize) {
        let h = &self.hosts[i];
        let dewy = env!("CARGO_BIN_EXE_dewy");
        let mut cmd = Command::new(dewy);
        if h.skewed {
            // libfaketime preloaded into dewy itself (not the `faketime`
            // wrapper, whose child would outlive a kill of the wrapper).
            dewy_testkit::require("faketime");
            let lib = std::path::Path::new(FAKETIME_LIB);
            assert!(lib.exists(), "{FAKETIME_LIB} is missing: apt-get install faketime");
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME", format!("-{SKEW_SECS}s"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("DEWY_") || k.starts_with("AWS_") || k == "STORAGE_EMULATOR_HOST" {
                cmd.env_remove(k);
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(h.log_path())
            .unwrap();
        cmd.current_dir(h.app())
            .args([
                "server",
                "--registry",
                &format!("file://{}", self.registry.path().display()),
            ])
            .args(["--cache", &self.cache, "--rollout", &self.plan, "--host-id", &h.id])
            .args(["-p", &format!("127.0.0.1:{}", h.port), "-i", "1"])
            .args(["--health-path", "/health", "--health-timeout", "5s"])
            .args([
                "--before-deploy-hook",
                "if test -f slow; then touch in-hook; sleep 6; fi",
            ])
            .args(["--log-format", "json", "--", "current/demo-app"])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        self.hosts[i].child = Some(cmd.spawn().unwrap());
    }

    fn publish(&self, tag: &str, env: &str) {
        let mut files: Vec<(&str, &[u8], u32)> =
            vec![("demo-app", &self.demo, 0o755), ("VERSION", tag.as_bytes(), 0o644)];
        if !env.is_empty() {
            files.push(("demo.env", env.as_bytes(), 0o644));
        }
        dewy_testkit::publish(
            self.registry.path(),
            tag,
            "demo_linux_amd64.tar.gz",
            &dewy_testkit::targz(&files),
        );
    }

    fn live(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(|h| h.child.is_some())
    }

    fn all_serve(&self, tag: &str) -> bool {
        self.live().all(|h| h.serving().as_deref() == Some(tag))
    }

    fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|h| format!("== {}\n{}", h.id, h.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every host's rollout events for `tag`: (time, host, message).
    fn events(&self, tag: &str) -> Vec<(i64, String, String)> {
        let mut out: Vec<_> = self
            .hosts
            .iter()
            .flat_map(|h| {
                h.events()
                    .into_iter()
                    .filter(|(_, _, v)| v == tag)
                    .map(|(t, m, _)| (t, h.id.clone(), m))
            })
            .collect();
        out.sort();
        out
    }

    fn slot_holders(&self, tag: &str) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .events(tag)
            .into_iter()
            .filter(|(_, _, m)| m.starts_with("Rollout: slot taken"))
            .map(|(_, h, _)| h)
            .collect();
        hosts.dedup();
        hosts
    }

    /// `dewy fleet --json`: the hosts' heartbeats.
    fn fleet(&self) -> Vec<serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_dewy"))
            .args(["fleet", "--json", "--cache", &self.cache])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dewy fleet: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until every host wrote its heartbeat (the fleet's size sets
    /// the waves).
    fn wait_for_heartbeats(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let fleet = self.fleet();
            if fleet.len() == self.hosts.len() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "every heartbeat: {fleet:#?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `dewy rollout ACTION --release TAG` run from a folder with no dewy
    /// (another host, an operator's laptop).
    fn rollout(&self, action: &str, tag: &str) -> serde_json::Value {
        self.try_rollout(action, tag)
            .unwrap_or_else(|e| panic!("dewy rollout {action}: {e}"))
    }

    fn try_rollout(&self, action: &str, tag: &str) -> Result<serde_json::Value, String> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_dewy"))
            .args([
                "rollout",
                action,
                "--release",
                tag,
                "--cache",
                &self.cache,
                "--json",
                "-w",
            ])
            .arg(dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    }

    /// The state of `tag`'s rollout, once its record exists.
    fn state(&self, tag: &str) -> Option<String> {
        let record = self.try_rollout("status", tag).ok()?;
        record["state"].as_str().map(str::to_owned)
    }
}

/// The most slot holders at once, from the events: a slot is held from
/// "slot taken" to "baked" (or a failure).
fn most_at_once(events: &[(i64, String, String)]) -> usize {
    let mut held = std::collections::BTreeSet::new();
    let mut most = 0;
    for (_, host, msg) in events {
        if msg.starts_with("Rollout: slot taken") {
            held.insert(host.clone());
        } else if msg.starts_with("Rollout: baked") || msg.contains("counted against") {
            held.remove(host);
        }
        most = most.max(held.len());
    }
    most
}

fn s3_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A good release goes canary → waves with never more than max-parallel
/// hosts holding slots; a release failing its health check on the canary
/// halts there; pause and resume from another host; a crash while baking
/// halts the rollout and every host that took it goes back (auto-revert);
/// a slot holder SIGKILLed mid-deploy frees its slot after the lease;
/// abort sends hosts back. One host's clock is 10 minutes behind all along.
#[test]
fn ten_hosts_on_moto_canary_waves_halt_revert_and_operators() {
    let s3 = dewy_testkit::S3Server::start();
    s3.create_bucket("fleet");
    let cache = format!("s3://us-east-1/fleet/app?endpoint={}", s3.endpoint);
    let plan = "canary=1,bake=4s,max-parallel=30%,max-failures=1,auto-revert,lease=8s";
    let mut fleet = Fleet::new(cache, s3_env(), plan, 10, Some(9));
    fleet.wait_for_heartbeats();

    // v1: canary, then waves of 3 (30% of 10).
    fleet.publish("v1.0.0", "");
    wait_for("v1 baked on every host", Duration::from_secs(150), || {
        fleet
            .events("v1.0.0")
            .iter()
            .filter(|(_, _, m)| m.starts_with("Rollout: baked"))
            .count()
            == 10
    });
    assert!(fleet.all_serve("v1.0.0"));
    wait_for("v1's rollout complete", Duration::from_secs(10), || {
        fleet.state("v1.0.0").as_deref() == Some("complete")
    });
    let events = fleet.events("v1.0.0");
    let taken: Vec<_> = events
        .iter()
        .filter(|(_, _, m)| m.starts_with("Rollout: slot taken"))
        .collect();
    assert_eq!(taken.len(), 10, "{events:#?}");
    let canary = &taken[0].1;
    let canary_baked = events
        .iter()
        .find(|(_, h, m)| h == canary && m.starts_with("Rollout: baked"))
        .unwrap_or_else(|| panic!("the canary baked: {events:#?}"));
    assert!(
        taken[1].0 >= canary_baked.0,
        "nobody else deploys before the canary baked: {events:#?}"
    );
    assert_eq!(most_at_once(&events), 3, "{events:#?}");
    // The fleet as `dewy fleet` sees it: ten live hosts, the skewed one too.
    let hosts = fleet.fleet();
    assert_eq!(hosts.len(), 10, "{hosts:#?}");
    assert!(
        hosts.iter().all(|h| h["stale"] == false && h["version"] == "v1.0.0"),
        "{hosts:#?}"
    );

    // v2 fails its health check on the canary: halted, nobody else tries.
    fleet.publish("v2.0.0", "DEMO_HEALTH_STATUS=500\n");
    wait_for("v2 halted", Duration::from_secs(60), || {
        fleet.hosts.iter().any(|h| h.log().contains("Rollout halted"))
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(fleet.slot_holders("v2.0.0").len(), 1, "{:#?}", fleet.events("v2.0.0"));
    assert!(fleet.all_serve("v1.0.0"));
    let record = fleet.rollout("status", "v2.0.0");
    assert_eq!(record["state"], "halted", "{record:#}");
    assert_eq!(record["failures"], 1);

    // v3: an operator pauses while the canary deploys: it finishes, and
    // nobody else starts v3 until resumed.
    fleet.publish("v3.0.0", "");
    wait_for("v3's canary", Duration::from_secs(60), || {
        !fleet.slot_holders("v3.0.0").is_empty()
    });
    assert_eq!(fleet.rollout("pause", "v3.0.0")["state"], "paused");
    wait_for("v3's canary baked", Duration::from_secs(60), || {
        fleet
            .events("v3.0.0")
            .iter()
            .any(|(_, _, m)| m.starts_with("Rollout: baked"))
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        fleet.slot_holders("v3.0.0").len(),
        1,
        "paused: {:#?}",
        fleet.events("v3.0.0")
    );
    assert!(
        fleet.logs().contains("the rollout is paused (paused by"),
        "the waiting hosts say why"
    );
    assert_eq!(fleet.rollout("resume", "v3.0.0")["state"], "active");
    // A wave-1 host's app crashes while it bakes: the rollout halts and
    // every host that took v3 goes back to v1.
    let baking = |f: &Fleet| {
        f.events("v3.0.0")
            .iter()
            .filter(|(_, _, m)| m.starts_with("Rollout: deployed; baking"))
            .map(|(_, h, _)| h.clone())
            .nth(1)
    };
    wait_for("a wave-1 host baking", Duration::from_secs(60), || {
        baking(&fleet).is_some()
    });
    let victim = baking(&fleet).unwrap();
    let host = fleet.hosts.iter().find(|h| h.id == victim).unwrap();
    let pid = host.app_pid().expect("the victim's app answers");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for("v3 halted and reverted", Duration::from_secs(60), || {
        fleet.state("v3.0.0").as_deref() == Some("halted") && fleet.all_serve("v1.0.0")
    });
    let record = fleet.rollout("status", "v3.0.0");
    let phases: Vec<&str> = record["hosts"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s["phase"].as_str().unwrap())
        .collect();
    assert!(phases.iter().all(|p| *p == "reverted" || *p == "failed"), "{record:#}");
    assert_eq!(record["hosts"][&victim]["phase"], "failed", "{record:#}");
    assert!(
        record["hosts"][&victim]["error"]
            .as_str()
            .unwrap()
            .contains("crashed while baking")
    );

    // v4: the canary's deploy is slow; its dewy is SIGKILLed holding the
    // slot, which another host takes once the lease ran out.
    for h in &fleet.hosts {
        std::fs::write(h.app().join("slow"), "").unwrap();
    }
    fleet.publish("v4.0.0", "");
    wait_for("v4's first slot", Duration::from_secs(30), || {
        !fleet.slot_holders("v4.0.0").is_empty()
    });
    let first = fleet.slot_holders("v4.0.0")[0].clone();
    let i = fleet.hosts.iter().position(|h| h.id == first).unwrap();
    // Killed in its before-deploy hook (past the download, so no download
    // lock is left behind: that has its own test in dewy-cache).
    wait_for("the canary in its hook", Duration::from_secs(30), || {
        fleet.hosts[i].app().join("in-hook").exists()
    });
    let killed_at = Instant::now();
    fleet.hosts[i].kill();
    for h in &fleet.hosts {
        let _ = std::fs::remove_file(h.app().join("slow"));
    }
    wait_for("another host takes the canary slot", Duration::from_secs(30), || {
        fleet.slot_holders("v4.0.0").len() >= 2
    });
    assert!(
        killed_at.elapsed() >= Duration::from_secs(3),
        "the slot was taken only after the lease ({:?})",
        killed_at.elapsed()
    );
    assert!(fleet.logs().contains("a slot's lease ran out"), "the expiry is logged");
    // Abort once a wave after the canary started: everyone back on v1.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.slot_holders("v4.0.0").len() < 3 {
        assert!(
            Instant::now() < deadline,
            "v4 in its second wave: {:#?}\n{}",
            fleet.events("v4.0.0"),
            fleet
                .try_rollout("status", "v4.0.0")
                .map(|r| r.to_string())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fleet.rollout("abort", "v4.0.0")["state"], "aborted");
    wait_for("every host back on v1", Duration::from_secs(60), || {
        fleet.all_serve("v1.0.0")
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(fleet.all_serve("v1.0.0"), "{}", fleet.logs());

    // The skewed host took part like the others, and no lease ran out
    // except the killed host's.
    let expired = fleet.logs().matches("a slot's lease ran out").count();
    assert!(expired >= 1, "{}", fleet.logs());
    let skewed = &fleet.hosts[9];
    assert!(
        skewed
            .events()
            .iter()
            .any(|(_, m, v)| v == "v1.0.0" && m.starts_with("Rollout: baked")),
        "{}",
        skewed.log()
    );
    let all = fleet.logs();
    for line in all.lines().filter(|l| l.contains("a slot's lease ran out")) {
        assert!(
            line.contains(&format!("\"host\":\"{first}\"")),
            "only the killed host's slot expires: {line}"
        );
    }
}

/// The same protocol on GCS (fake-gcs-server, `ifGenerationMatch`): a
/// canary, then waves of two; a failing release halts on its canary.
#[test]
fn four_hosts_on_fake_gcs_canary_waves_and_halt() {
    let gcs = dewy_testkit::GcsServer::start();
    gcs.create_bucket("fleet");
    let env = vec![("STORAGE_EMULATOR_HOST".to_owned(), gcs.endpoint.clone())];
    let plan = "canary=1,bake=2s,max-parallel=2,lease=8s";
    let fleet = Fleet::new("gs://fleet/app".into(), env, plan, 4, None);
    fleet.wait_for_heartbeats();
    fleet.publish("v1.0.0", "");
    wait_for("v1 on every host", Duration::from_secs(120), || {
        fleet.all_serve("v1.0.0")
    });
    let events = fleet.events("v1.0.0");
    assert_eq!(fleet.slot_holders("v1.0.0").len(), 4, "{events:#?}");
    assert_eq!(most_at_once(&events), 2, "{events:#?}");
    fleet.publish("v2.0.0", "DEMO_EXIT_AT_START=1\n");
    wait_for("v2 halted", Duration::from_secs(60), || {
        fleet.state("v2.0.0").as_deref() == Some("halted")
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.slot_holders("v2.0.0").len(), 1, "{:#?}", fleet.events("v2.0.0"));
    assert!(fleet.all_serve("v1.0.0"));
}
