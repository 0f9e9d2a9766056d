//! The container runtime: the `docker` or `podman` command line, through
//! tokio processes (never a runtime socket).

use std::time::Duration;

use crate::Error;

/// `docker` or `podman`, with extra environment (such as
/// `CONTAINERS_CONF`) for every call.
#[derive(Debug, Clone)]
pub struct Runtime {
    program: String,
    env: Vec<(String, String)>,
}

/// A container dewy started (labelled `dewy.managed=true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The runtime's id.
    pub id: String,
    /// Whether it runs.
    pub running: bool,
    /// Its `dewy.digest` label.
    pub digest: String,
    /// Its `dewy.version` label.
    pub version: String,
    /// Its `dewy.deployed_at` label.
    pub deployed_at: String,
    /// When the container last started (Unix seconds), as the runtime says.
    pub started_at: Option<i64>,
    /// The image id it runs.
    pub image: String,
    /// The image reference it was started from (`HOST/REPO@sha256:…` for
    /// dewy's replicas).
    pub reference: String,
    /// Its name (without Docker's leading `/`).
    pub name: String,
    /// The runtime's state word (`running`, `exited`, …).
    pub status: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// `HOST/REPO@sha256:…`.
    pub image: String,
    /// The container name.
    pub name: String,
    /// Labels (`dewy.*` first).
    pub labels: Vec<(String, String)>,
    /// Container ports published on 127.0.0.1 at a random host port.
    pub ports: Vec<u16>,
    /// Extra `run` arguments (after `--` on dewy's command line).
    pub extra_args: Vec<String>,
    /// Arguments after the image (`--cmd`).
    pub cmd: Vec<String>,
}

impl Runtime {
    /// The runtime `program` (`docker` or `podman`); a missing one is an
    /// error naming it.
    pub fn new(program: &str, env: Vec<(String, String)>) -> Result<Self, Error> {
        if !matches!(program, "docker" | "podman") {
            return Err(Error::Runtime(format!(
                "unsupported runtime `{program}`: use docker or podman"
            )));
        }
        let found =
            std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()));
        if !found {
            return Err(Error::Runtime(format!(
                "the container runtime `{program}` is not on PATH"
            )));
        }
        Ok(Self {
            program: program.to_owned(),
            env,
        })
    }

    /// The program's name.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Runs the runtime's command line. A command is never killed because
    /// its caller went away (a check cut short by a signal, dewy exiting):
    /// a `run` or `rm` killed half-way can leave a container running that
    /// the runtime no longer lists. It finishes on its own, and what it
    /// leaves is swept up (see `ContainerDeployer`). Only a command still
    /// running after 10 minutes is killed.
    async fn run_cmd(&self, args: &[String]) -> Result<String, Error> {
        let failed = |message: String| Error::Command {
            command: format!("{} {}", self.program, args.join(" ")),
            message,
        };
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(args)
            .kill_on_drop(false)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(|e| failed(e.to_string()))?;
        let pid = child.id();
        let out = match tokio::time::timeout(Duration::from_secs(600), child.wait_with_output()).await {
            Ok(out) => out.map_err(|e| failed(e.to_string()))?,
            Err(_) => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
                return Err(failed("timed out after 10 minutes".into()));
            }
        };
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(Error::Command {
                command: format!("{} {}", self.program, args.first().map_or("", String::as_str)),
                message: format!("{}: {}", out.status, stderr.trim()),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Pulls `image`.
    pub async fn pull(&self, image: &str) -> Result<(), Error> {
        self.run_cmd(&Self::args(&["pull", "-q", image])).await.map(|_| ())
    }

    /// Removes the reference `image` (`rmi`, never forced: an image a
    /// container uses stays, one with other names only loses this one).
    pub async fn remove_image(&self, image: &str) -> Result<(), Error> {
        self.run_cmd(&Self::args(&["rmi", image])).await.map(|_| ())
    }

    /// The TCP ports `image` EXPOSEs.
    pub async fn exposed_ports(&self, image: &str) -> Result<Vec<u16>, Error> {
        let out = self
            .run_cmd(&Self::args(&[
                "image",
                "inspect",
                "--format",
                "{{json .Config.ExposedPorts}}",
                image,
            ]))
            .await?;
        let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let mut ports: Vec<u16> = json
            .as_object()
            .map(|o| {
                o.keys()
                    .filter_map(|k| k.strip_suffix("/tcp").and_then(|p| p.parse().ok()))
                    .collect()
            })
            .unwrap_or_default();
        ports.sort_unstable();
        Ok(ports)
    }

    /// Starts a container detached; returns its id.
    pub async fn run(&self, spec: &RunSpec) -> Result<String, Error> {
        let mut args = Self::args(&["run", "-d", "--name"]);
        args.push(spec.name.clone());
        for (k, v) in &spec.labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        for p in &spec.ports {
            args.push("-p".into());
            args.push(format!("127.0.0.1::{p}"));
        }
        args.extend(spec.extra_args.iter().cloned());
        args.push(spec.image.clone());
        args.extend(spec.cmd.iter().cloned());
        let out = self.run_cmd(&args).await?;
        Ok(out.lines().last().unwrap_or_default().to_owned())
    }

    /// The host port on 127.0.0.1 that `container_port` of `id` is
    /// published on.
    pub async fn host_port(&self, id: &str, container_port: u16) -> Result<u16, Error> {
        let out = self
            .run_cmd(&Self::args(&["port", id, &format!("{container_port}/tcp")]))
            .await?;
        out.lines()
            .filter_map(|l| l.rsplit(':').next()?.trim().parse().ok())
            .next()
            .ok_or_else(|| Error::Runtime(format!("no host port for {container_port}/tcp of {id}: `{out}`")))
    }

    /// Stops (SIGTERM, then SIGKILL after `timeout`) and removes `id`.
    pub async fn stop_and_remove(&self, id: &str, timeout: Duration) -> Result<(), Error> {
        let _ = self
            .run_cmd(&Self::args(&["stop", &format!("--time={}", timeout.as_secs()), id]))
            .await;
        self.run_cmd(&Self::args(&["rm", "-f", id])).await.map(|_| ())
    }

    /// The containers of `app` that dewy started, running or not.
    pub async fn managed(&self, app: &str) -> Result<Vec<Container>, Error> {
        let ids = self
            .run_cmd(&Self::args(&[
                "ps",
                "-a",
                "-q",
                "--no-trunc",
                "--filter",
                "label=dewy.managed=true",
                "--filter",
                &format!("label=dewy.app={app}"),
            ]))
            .await?;
        let mut out = Vec::new();
        for id in ids.lines().filter(|l| !l.is_empty()) {
            let Ok(line) = self
                .run_cmd(&Self::args(&[
                    "inspect",
                    "--format",
                    r#"{{.State.Running}}|{{index .Config.Labels "dewy.digest"}}|{{index .Config.Labels "dewy.version"}}|{{index .Config.Labels "dewy.deployed_at"}}|{{.State.StartedAt.Unix}}|{{.Image}}|{{.Config.Image}}|{{.Name}}|{{.State.Status}}|{{json .Config.Labels}}"#,
                    id,
                ]))
                .await
            else {
                continue; // removed meanwhile
            };
            // The labels' JSON comes last: it may hold `|`.
            let mut parts = line.splitn(10, '|');
            let mut next = || parts.next().unwrap_or_default().to_owned();
            out.push(Container {
                id: id.to_owned(),
                running: next() == "true",
                digest: next(),
                version: next(),
                deployed_at: next(),
                started_at: next().trim().parse().ok().filter(|t: &i64| *t > 0),
                image: next(),
                reference: next(),
                name: next().trim_start_matches('/').to_owned(),
                status: next(),
                labels: serde_json::from_str(&next()).unwrap_or_default(),
            });
        }
        Ok(out)
    }
}
