//! Container mode: keeps `--replicas` containers of the newest image of an
//! `img://` registry running behind dewy's own TCP proxy.
//!
//! # Contract
//!
//! - A new image is rolled out one replica at a time: each new replica must
//!   answer its health check (`--health-path` on its own published port,
//!   200–399, within `--health-timeout`; without a path, a TCP connect)
//!   before it joins the proxy; then the old replicas leave the proxy, are
//!   drained (open connections counted, at most `--drain-time`) and only
//!   then stopped and removed. A replica that fails its check is removed,
//!   the old ones keep serving, and the release is recorded bad.
//! - Everything runs `HOST/REPO@sha256:…`, so a re-pushed tag is a new
//!   release.
//! - At start, the running containers the previous dewy had in rotation
//!   (recorded in `<workdir>/.dewy/replicas.json` whenever the rotation
//!   changes) are adopted into the proxy (a dewy restart neither drops nor
//!   restarts them); containers of a rollout or restart it did not finish
//!   are removed, never adopted unchecked. A replica that stopped is
//!   replaced at the next check.
//! - dewy stopping leaves the replicas running (the next dewy adopts them).
//! - After a rollout, the images dewy pulled beyond the `keep_images` most
//!   recent are removed with a plain `rmi` (never forced; images dewy did
//!   not pull are never touched).

#![deny(missing_docs)]

mod images;
pub mod proxy;
mod record;
pub mod runtime;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dewy_cache::{Cache, Key};
use dewy_notify::Notify;
use dewy_registry::{Registry, Release};

use crate::proxy::{Backend, Proxy};
use crate::runtime::{RunSpec, Runtime};

/// Why a container check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry could not answer.
    #[error("failed to get the current image from the registry")]
    Registry(#[source] dewy_registry::Error),
    /// A runtime command failed.
    #[error("`{command}` failed: {message}")]
    Command {
        /// The command.
        command: String,
        /// Its status and stderr.
        message: String,
    },
    /// The runtime is missing or answered something unusable.
    #[error("{0}")]
    Runtime(String),
    /// A new replica did not become healthy; it was removed and the old
    /// replicas keep serving.
    #[error("replica {replica} of `{tag}` failed its health check ({reason}); the running replicas keep serving")]
    Unhealthy {
        /// The release.
        tag: String,
        /// The replica's index.
        replica: usize,
        /// What the check saw.
        reason: String,
    },
    /// The cache (bad-release records) failed.
    #[error("cache operation failed")]
    Cache(#[source] dewy_cache::Error),
}

/// `--port PROXY[:CONTAINER]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    /// Where dewy listens.
    pub proxy: u16,
    /// The container's port; `None`: the image's single EXPOSEd port.
    pub container: Option<u16>,
}

impl std::str::FromStr for PortMapping {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))
        };
        match s.split_once(':') {
            Some((a, b)) => Ok(Self {
                proxy: port(a)?,
                container: Some(port(b)?),
            }),
            None => Ok(Self {
                proxy: port(s)?,
                container: None,
            }),
        }
    }
}

/// What container mode needs to know.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// The app name (`dewy.app` label, container names).
    pub app: String,
    /// Replicas to keep running.
    pub replicas: usize,
    /// The proxy ports.
    pub ports: Vec<PortMapping>,
    /// Where the proxies listen (`0.0.0.0` as Dewy, or an address).
    pub listen: std::net::IpAddr,
    /// The health path checked on each new replica.
    pub health_path: Option<String>,
    /// How long a new replica gets to become healthy.
    pub health_timeout: Duration,
    /// How long a retiring replica's connections may take to finish.
    pub drain_time: Duration,
    /// SIGTERM to SIGKILL when stopping a replica.
    pub stop_timeout: Duration,
    /// Extra `run` arguments.
    pub extra_args: Vec<String>,
    /// Arguments after the image.
    pub cmd: Vec<String>,
    /// A proxied connection idle this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Shell command run before each rollout (`sh -c`, in `workdir`); a
    /// failure is logged and notified, the rollout goes on (as Dewy).
    pub before_hook: Option<String>,
    /// Shell command run after each rollout.
    pub after_hook: Option<String>,
    /// The environment hooks get (secrets removed by the caller), before
    /// `DEWY_VERSION`, `DEWY_IMAGE` and `DEWY_APP`.
    pub hook_env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// Where hooks run.
    pub workdir: std::path::PathBuf,
    /// Hooks are killed after this.
    pub hook_timeout: Duration,
    /// Images dewy pulled that are kept after a rollout (the most recently
    /// pulled, besides those running); older ones are removed. 0 keeps all.
    pub keep_images: usize,
}

/// A replica in rotation.
#[derive(Debug, Clone)]
pub struct Replica {
    /// The container id.
    pub id: String,
    /// The image digest.
    pub digest: String,
    /// The release's tag.
    pub version: String,
}

/// What a check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The newest image runs on every replica.
    Current,
    /// The newest image was rolled out.
    Deployed {
        /// Its tag.
        tag: String,
    },
    /// The newest image is recorded bad.
    KnownBad {
        /// Its tag.
        tag: String,
    },
    /// Stopped replicas were replaced.
    Healed {
        /// How many.
        replaced: usize,
    },
}

/// The container-mode loop.
pub struct ContainerDeployer {
    registry: Arc<dyn Registry>,
    runtime: Runtime,
    cache: Arc<dyn Cache>,
    notify: Notify,
    config: ContainerConfig,
    proxies: Vec<(PortMapping, Arc<Proxy>)>,
    replicas: Mutex<Vec<Replica>>,
    /// The container port of each mapping, once known.
    container_ports: Mutex<Vec<u16>>,
    /// The image the replicas in rotation run.
    current: Mutex<Option<Image>>,
    lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ContainerDeployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerDeployer")
            .field("config", &self.config)
            .field("replicas", &self.replicas())
            .finish_non_exhaustive()
    }
}

/// The image replicas run: what starting one more needs.
#[derive(Debug, Clone)]
struct Image {
    /// The release's tag (`dewy.version`).
    tag: String,
    /// The manifest digest (`dewy.digest`).
    digest: String,
    /// `HOST/REPO@sha256:…`.
    reference: String,
}

impl Image {
    fn of(release: &Release) -> Self {
        Self {
            tag: release.tag.clone(),
            digest: release.id.clone(),
            reference: release.artifact_url.clone(),
        }
    }
}

/// The bad-release record key of an image release.
fn bad_key(release: &Release) -> Result<Key, Error> {
    let digest = release.id.trim_start_matches("sha256:");
    let artifact = format!("{}@sha256-{}", release.artifact_name, &digest[..digest.len().min(16)]);
    let key = Key::artifact(&release.tag, &artifact).map_err(Error::Cache)?;
    Ok(Key::bad(&key))
}

impl ContainerDeployer {
    /// Starts the proxies (one per mapping) and adopts the running
    /// replicas of `config.app`.
    pub async fn start(
        registry: Arc<dyn Registry>,
        runtime: Runtime,
        cache: Arc<dyn Cache>,
        notify: Notify,
        config: ContainerConfig,
    ) -> Result<Arc<Self>, Error> {
        // The ports are held first; connections wait in the backlog while
        // the running replicas are adopted, then flow.
        let mut proxies = Vec::new();
        let mut listeners = Vec::new();
        for m in &config.ports {
            let addr = SocketAddr::new(config.listen, m.proxy);
            let (proxy, listener) = Proxy::bind(addr, config.idle_timeout)
                .await
                .map_err(|e| Error::Runtime(format!("cannot listen on {addr} for the proxy: {e}")))?;
            proxies.push((*m, proxy));
            listeners.push(listener);
        }
        let this = Arc::new(Self {
            registry,
            runtime,
            cache,
            notify,
            container_ports: Mutex::new(Vec::new()),
            config,
            proxies,
            replicas: Mutex::new(Vec::new()),
            current: Mutex::new(None),
            lock: tokio::sync::Mutex::new(()),
        });
        let adopted = this.adopt().await;
        for ((m, proxy), listener) in this.proxies.iter().zip(listeners) {
            proxy.serve(listener);
            tracing::info!(proxy_port = m.proxy, "TCP proxy started");
        }
        this.remove_leftovers(adopted?).await;
        Ok(this)
    }

    /// The app name (`dewy.app` label).
    pub fn app(&self) -> &str {
        &self.config.app
    }

    /// The app's containers as the runtime sees them (running or not).
    pub async fn containers(&self) -> Result<Vec<runtime::Container>, Error> {
        self.runtime.managed(&self.config.app).await
    }

    /// The proxies, for status and metrics.
    pub fn proxies(&self) -> Vec<Arc<Proxy>> {
        self.proxies.iter().map(|(_, p)| p.clone()).collect()
    }

    /// The replicas in rotation.
    pub fn replicas(&self) -> Vec<Replica> {
        self.replicas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn pulled(&self) -> images::Pulled {
        images::Pulled::new(&self.config.workdir)
    }

    fn set_current(&self, image: &Image) {
        *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(image.clone());
    }

    fn current(&self) -> Option<Image> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Forgets every image recorded as bad (`dewy clear-bad`); the next
    /// check may roll them out again.
    pub async fn clear_bad(&self) -> Result<usize, Error> {
        let n = dewy_cache::delete_bad_records(self.cache.as_ref())
            .await
            .map_err(Error::Cache)?;
        tracing::info!(cleared = n, "Bad release records cleared");
        Ok(n)
    }

    /// Replaces every replica with a fresh one of the same image, as a
    /// rollout does (one at a time, each health-checked before it joins
    /// the proxy, then the old ones drained and removed). A new replica
    /// that fails removes the ones started so far and leaves the old ones
    /// serving; the image is not recorded as bad. Waits for a check in
    /// progress. Returns how many replicas run now.
    pub async fn restart(&self) -> Result<usize, Error> {
        let _guard = self.lock.lock().await;
        let image = self
            .current()
            .ok_or_else(|| Error::Runtime("no replica runs yet; nothing was restarted".into()))?;
        tracing::info!(tag = %image.tag, "Restarting the replicas");
        let count = self.replace_all(&image).await?;
        tracing::info!(tag = %image.tag, replicas = count, "Replicas restarted");
        self.notify
            .send(format!("Restarted `{count}` replicas of `{}`", image.tag));
        Ok(count)
    }

    /// Starts a new set of replicas of `image` one at a time, then
    /// retires the old set. On a failure the new ones are retired and the
    /// old ones keep serving.
    async fn replace_all(&self, image: &Image) -> Result<usize, Error> {
        let old = self.replicas();
        let mut new = Vec::new();
        for i in 0..self.config.replicas.max(1) {
            match self.start_replica(image, i).await {
                Ok(r) => new.push(r),
                Err(err) => {
                    for r in &new {
                        self.retire(&r.id).await;
                    }
                    return Err(err);
                }
            }
        }
        let count = new.len();
        self.set_replicas(new);
        self.set_current(image);
        for r in &old {
            self.retire(&r.id).await;
        }
        Ok(count)
    }

    /// The record of the replicas in rotation, for the next dewy.
    fn admitted(&self) -> record::Admitted {
        record::Admitted::new(&self.config.workdir)
    }

    /// The replicas in rotation now (each passed its health check); also
    /// recorded for the next dewy to adopt.
    fn set_replicas(&self, list: Vec<Replica>) {
        let ids: Vec<String> = list.iter().map(|r| r.id.clone()).collect();
        *self.replicas.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = list;
        self.admitted().save(&ids);
    }

    /// Running containers labelled for this app join the proxy: the ones
    /// the previous dewy had in rotation (`.dewy/replicas.json`), which
    /// passed their health check. Others are what a rollout or restart
    /// that dewy did not finish left (a replica perhaps never healthy, or
    /// an older image's): they are stopped and removed, and the next check
    /// rolls out again. Without a record (a first start, a lost workdir),
    /// the replicas of the most recently deployed image that answer a
    /// health probe now are adopted, else those of the next older image.
    async fn adopt(&self) -> Result<Vec<runtime::Container>, Error> {
        // Stopped ones (a crashed replica, a `run` cut short) are removed
        // with the leftovers.
        let (running, stopped): (Vec<runtime::Container>, Vec<runtime::Container>) = self
            .ours()
            .await?
            .into_iter()
            .partition(|c| c.running && !c.digest.is_empty());
        let admitted = self.admitted().load();
        let recorded: Vec<&runtime::Container> = running.iter().filter(|c| admitted.contains(&c.id)).collect();
        let (chosen, ports) = if running.is_empty() {
            (Vec::new(), Vec::new())
        } else if recorded.is_empty() {
            self.healthy_newest(&running).await
        } else {
            match self.ports_for("the adopted replicas", Some(&recorded[0].image)).await {
                Ok(ports) => (recorded.iter().map(|c| c.id.clone()).collect(), ports),
                Err(err) => {
                    tracing::warn!(error = %err, "Cannot adopt the running replicas; deploying anew");
                    (Vec::new(), Vec::new())
                }
            }
        };
        let mut adopted = Vec::new();
        for c in running.iter().filter(|c| chosen.contains(&c.id)) {
            match self.join(&c.id, &ports).await {
                Ok(()) => adopted.push(Replica {
                    id: c.id.clone(),
                    digest: c.digest.clone(),
                    version: c.version.clone(),
                }),
                Err(err) => tracing::warn!(container = %c.id, error = %err, "Cannot adopt a replica"),
            }
        }
        tracing::info!(count = adopted.len(), version = %adopted.first().map(|r| r.version.as_str()).unwrap_or(""), "Adopted running replicas");
        if let Some(c) = running.iter().find(|c| adopted.iter().any(|r| r.id == c.id))
            && !c.reference.is_empty()
        {
            self.set_current(&Image {
                tag: c.version.clone(),
                digest: c.digest.clone(),
                reference: c.reference.clone(),
            });
        }
        self.set_replicas(adopted);
        Ok(running
            .into_iter()
            .filter(|c| !chosen.contains(&c.id))
            .chain(stopped)
            .collect())
    }

    /// The app's containers that this dewy may adopt or remove: those
    /// started from this workdir (label `dewy.workdir`; containers of
    /// dewy versions without the label count as this workdir's). Another
    /// dewy with the same `--name` elsewhere keeps its own.
    async fn ours(&self) -> Result<Vec<runtime::Container>, Error> {
        let here = self.config.workdir.display().to_string();
        Ok(self
            .runtime
            .managed(&self.config.app)
            .await?
            .into_iter()
            .filter(|c| c.labels.get("dewy.workdir").is_none_or(|w| *w == here))
            .collect())
    }

    /// Stops and removes what [`Self::adopt`] left out.
    async fn remove_leftovers(&self, leftovers: Vec<runtime::Container>) {
        for c in leftovers {
            tracing::info!(container = %c.id, version = %c.version, state = %c.status, "Removing a replica that was not in rotation (stopped, or left by a rollout or restart a previous dewy did not finish)");
            if let Err(err) = self.runtime.stop_and_remove(&c.id, self.config.stop_timeout).await {
                tracing::warn!(container = %c.id, error = %err, "Could not remove a replica that was not in rotation");
            }
        }
    }

    /// Without a record of what was in rotation: the replicas of the most
    /// recently deployed image that answer a health probe, else of the
    /// next older image, and so on. Returns their ids and container ports.
    async fn healthy_newest(&self, running: &[runtime::Container]) -> (Vec<String>, Vec<u16>) {
        let mut digests: Vec<(&str, &str)> = Vec::new();
        let mut by_age: Vec<&runtime::Container> = running.iter().collect();
        by_age.sort_by(|a, b| b.deployed_at.cmp(&a.deployed_at));
        for c in by_age {
            if !digests.iter().any(|(d, _)| *d == c.digest) {
                digests.push((&c.digest, &c.image));
            }
        }
        for (digest, image) in digests {
            let ports = match self.ports_for("the adopted replicas", Some(image)).await {
                Ok(p) => p,
                Err(err) => {
                    tracing::warn!(error = %err, "Cannot adopt the running replicas");
                    continue;
                }
            };
            let mut healthy = Vec::new();
            for c in running.iter().filter(|c| c.digest == digest) {
                let probed = match self.runtime.host_port(&c.id, ports[0]).await {
                    Ok(port) => self.probe(port).await,
                    Err(e) => Err(e.to_string()),
                };
                match probed {
                    Ok(()) => healthy.push(c.id.clone()),
                    Err(why) => {
                        tracing::warn!(container = %c.id, version = %c.version, reason = %why, "Not adopting a replica that fails its health probe")
                    }
                }
            }
            if !healthy.is_empty() {
                return (healthy, ports);
            }
        }
        (Vec::new(), Vec::new())
    }

    /// The container port of each mapping: given, or the image's single
    /// EXPOSEd port. Learned once (from `image` or the adopted ones).
    async fn ports_for(&self, what: &str, image: Option<&str>) -> Result<Vec<u16>, Error> {
        let known = self
            .container_ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if !known.is_empty() {
            return Ok(known);
        }
        let needs_expose = self.config.ports.iter().any(|m| m.container.is_none());
        let exposed = match (needs_expose, image) {
            (true, Some(image)) => self.runtime.exposed_ports(image).await?,
            (true, None) => return Err(Error::Runtime(format!("{what}: container ports unknown"))),
            (false, _) => Vec::new(),
        };
        let mut out = Vec::new();
        for m in &self.config.ports {
            out.push(match m.container {
                Some(p) => p,
                None => match exposed.as_slice() {
                    [one] => *one,
                    [] => {
                        return Err(Error::Runtime(
                            "the image EXPOSEs no TCP port; give it as --port PROXY:CONTAINER".into(),
                        ));
                    }
                    many => {
                        return Err(Error::Runtime(format!(
                            "the image EXPOSEs several ports {many:?}; choose one with --port PROXY:CONTAINER"
                        )));
                    }
                },
            });
        }
        *self
            .container_ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = out.clone();
        Ok(out)
    }

    /// Adds container `id`'s published ports to the proxies.
    async fn join(&self, id: &str, container_ports: &[u16]) -> Result<(), Error> {
        let mut backends = Vec::new();
        for ((_, proxy), port) in self.proxies.iter().zip(container_ports) {
            let host = self.runtime.host_port(id, *port).await?;
            backends.push((proxy.clone(), Backend::new(id, ([127, 0, 0, 1], host).into())));
        }
        for (proxy, backend) in backends {
            proxy.add(backend);
        }
        Ok(())
    }

    /// Takes `id` out of the proxies, drains it, stops and removes it.
    async fn retire(&self, id: &str) {
        let backends: Vec<Arc<Backend>> = self.proxies.iter().flat_map(|(_, p)| p.remove(id)).collect();
        let left = proxy::drain(&backends, self.config.drain_time).await;
        if left > 0 {
            tracing::warn!(container = id, open = left, drain_time = ?self.config.drain_time, "Connections still open after the drain time; stopping the replica");
        }
        if let Err(err) = self.runtime.stop_and_remove(id, self.config.stop_timeout).await {
            tracing::warn!(container = id, error = %err, "Could not remove a retired replica");
        }
    }

    /// Starts replica `index` of `image`, waits for its health check,
    /// and puts it into the proxies. On failure it is removed.
    async fn start_replica(&self, image: &Image, index: usize) -> Result<Replica, Error> {
        let ports = self.ports_for(&image.tag, Some(&image.reference)).await?;
        let spec = RunSpec {
            image: image.reference.clone(),
            name: format!(
                "{}-{}-{index}",
                self.config.app,
                jiff::Timestamp::now().as_millisecond()
            ),
            labels: vec![
                ("dewy.managed".into(), "true".into()),
                ("dewy.app".into(), self.config.app.clone()),
                ("dewy.digest".into(), image.digest.clone()),
                ("dewy.version".into(), image.tag.clone()),
                ("dewy.replica".into(), index.to_string()),
                ("dewy.deployed_at".into(), jiff::Timestamp::now().to_string()),
                ("dewy.workdir".into(), self.config.workdir.display().to_string()),
            ],
            ports: ports.clone(),
            extra_args: self.config.extra_args.clone(),
            cmd: self.config.cmd.clone(),
        };
        let id = self.runtime.run(&spec).await?;
        let first = match self.runtime.host_port(&id, ports[0]).await {
            Ok(p) => p,
            Err(e) => {
                let _ = self.runtime.stop_and_remove(&id, Duration::from_secs(1)).await;
                return Err(e);
            }
        };
        if let Err(reason) = self.health(first).await {
            let _ = self.runtime.stop_and_remove(&id, Duration::from_secs(1)).await;
            return Err(Error::Unhealthy {
                tag: image.tag.clone(),
                replica: index,
                reason,
            });
        }
        if let Err(e) = self.join(&id, &ports).await {
            for (_, p) in &self.proxies {
                p.remove(&id);
            }
            let _ = self.runtime.stop_and_remove(&id, Duration::from_secs(1)).await;
            return Err(e);
        }
        tracing::info!(container = %id, version = %image.tag, replica = index, port = first, "Replica started and added to the proxy");
        Ok(Replica {
            id,
            digest: image.digest.clone(),
            version: image.tag.clone(),
        })
    }

    /// `GET --health-path` on the replica's port answers 200–399 (or, with
    /// no path, a TCP connect works) within the health timeout.
    async fn health(&self, port: u16) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.config.health_timeout;
        loop {
            let last = match self.probe(port).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{last} within {:?}", self.config.health_timeout));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn probe(&self, port: u16) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        let Some(path) = &self.config.health_path else {
            return Ok(());
        };
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&head[..n]);
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {path} answered {status}"))
        }
    }

    /// One check: the newest image, rolled out when new; stopped replicas
    /// replaced.
    pub async fn tick(&self) -> Result<Outcome, Error> {
        let _guard = self.lock.lock().await;
        let release = match self.registry.latest().await {
            Ok(r) => r,
            Err(e) => {
                // The registry is down or refuses: the replicas are kept
                // whole all the same.
                if let Err(err) = self.heal_current().await {
                    tracing::warn!(error = %err, "Could not replace a stopped replica");
                }
                return Err(Error::Registry(e));
            }
        };
        tracing::debug!(tag = %release.tag, digest = %release.id, "Found latest image");
        let running = self.replicas();
        if !running.is_empty() && running.iter().all(|r| r.digest == release.id) {
            return self.heal(&Image::of(&release)).await;
        }
        let bad = bad_key(&release)?;
        if self.cache.read(&bad).await.ok().flatten().is_some() {
            tracing::debug!(tag = %release.tag, "Deploy skipped: this image is recorded as bad");
            // The replicas keep the image they run, and stay whole.
            self.heal_current().await?;
            return Ok(Outcome::KnownBad { tag: release.tag });
        }
        self.roll_out(&release).await
    }

    /// Runs a deploy hook for `release`; failures are logged and notified.
    async fn hook(&self, stage: &str, command: Option<&String>, release: &Release) {
        let Some(command) = command else { return };
        let mut env = self.config.hook_env.clone();
        env.push(("DEWY_VERSION".into(), release.tag.clone().into()));
        env.push(("DEWY_IMAGE".into(), release.artifact_url.clone().into()));
        env.push(("DEWY_APP".into(), self.config.app.clone().into()));
        match dewy_core::run_hook(command, &self.config.workdir, &env, self.config.hook_timeout).await {
            Ok(o) if o.success() => {
                tracing::info!(command, stdout = %o.stdout, stderr = %o.stderr, duration = ?o.duration, "Execute hook");
            }
            Ok(o) => {
                tracing::error!(command, error = %o.failure(), exit_code = o.exit_code.unwrap_or(-1), "{stage} deploy hook failure");
                self.notify
                    .send_error(format!("{stage} deploy hook failure: {}", o.failure()));
            }
            Err(err) => {
                tracing::error!(command, error = %err, "{stage} deploy hook failure");
                self.notify
                    .send_error(format!("{stage} deploy hook could not run: {err}"));
            }
        }
    }

    async fn roll_out(&self, release: &Release) -> Result<Outcome, Error> {
        tracing::info!(tag = %release.tag, image = %release.artifact_url, "Pulling image");
        self.runtime.pull(&release.artifact_url).await?;
        self.pulled().record(&release.artifact_url);
        self.notify.send(format!("Pulled image for `{}`", release.tag));
        self.hook("Before", self.config.before_hook.as_ref(), release).await;
        let count = match self.replace_all(&Image::of(release)).await {
            Ok(n) => n,
            Err(err) => {
                if matches!(err, Error::Unhealthy { .. }) {
                    let reason = err.to_string();
                    if let Ok(key) = bad_key(release)
                        && let Err(e) = self.cache.write(&key, reason.as_bytes()).await
                    {
                        tracing::warn!(error = %e, "Could not record the bad image");
                    }
                }
                return Err(err);
            }
        };
        tracing::info!(tag = %release.tag, replicas = count, "Container deployed");
        self.hook("After", self.config.after_hook.as_ref(), release).await;
        self.pulled()
            .keep(&self.runtime, self.config.keep_images, &[release.artifact_url.as_str()])
            .await;
        self.notify.send_important(format!(
            "Container deployed successfully: `{}/{}` replicas of `{}`",
            count,
            self.config.replicas.max(1),
            release.tag
        ));
        Ok(Outcome::Deployed {
            tag: release.tag.clone(),
        })
    }

    /// [`Self::heal`] with the image the replicas in rotation run (known
    /// good: it passed its health checks), when one is known.
    async fn heal_current(&self) -> Result<Outcome, Error> {
        match self.current() {
            Some(image) => self.heal(&image).await,
            None => Ok(Outcome::Current),
        }
    }

    /// Replaces replicas that stopped (crashed, or killed by hand) and
    /// puts backends that failed a connection back once they answer. A
    /// replacement that fails leaves the others as they are and is tried
    /// again at the next check.
    async fn heal(&self, image: &Image) -> Result<Outcome, Error> {
        let states = self.ours().await?;
        let mut kept = Vec::new();
        let mut replaced = 0;
        let mut failure = None;
        let replicas = self.replicas();
        // Containers of this app and workdir that are not in rotation: a
        // `run` that finished after the check that started it was cut
        // short, a replica a runtime restarted under another id. Nothing
        // else starts containers between checks.
        let strays: Vec<runtime::Container> = states
            .iter()
            .filter(|c| !replicas.iter().any(|r| r.id == c.id))
            .cloned()
            .collect();
        if !strays.is_empty() {
            self.remove_leftovers(strays).await;
        }
        for (i, r) in replicas.iter().enumerate() {
            let alive = states.iter().any(|c| c.id == r.id && c.running);
            if alive {
                for (_, p) in &self.proxies {
                    for b in p.backends().iter().filter(|b| b.container == r.id && b.failed()) {
                        if self.probe(b.addr.port()).await.is_ok() {
                            p.remove(&r.id);
                            p.add(Backend::new(&r.id, b.addr));
                        }
                    }
                }
                kept.push(r.clone());
                continue;
            }
            tracing::warn!(container = %r.id, version = %r.version, "A replica stopped; replacing it");
            for (_, p) in &self.proxies {
                p.remove(&r.id);
            }
            let _ = self.runtime.stop_and_remove(&r.id, Duration::from_secs(1)).await;
            match self.start_replica(image, i).await {
                Ok(fresh) => {
                    self.notify
                        .send_error(format!("Replica of `{}` stopped and was replaced", r.version));
                    kept.push(fresh);
                    replaced += 1;
                }
                Err(err) => failure = Some(err),
            }
        }
        // Fewer replicas than asked (a smaller adoption, a failed
        // replacement): start the rest.
        if failure.is_none() {
            for i in kept.len()..self.config.replicas.max(1) {
                match self.start_replica(image, i).await {
                    Ok(fresh) => {
                        kept.push(fresh);
                        replaced += 1;
                    }
                    Err(err) => {
                        failure = Some(err);
                        break;
                    }
                }
            }
        }
        // More replicas than asked (`--replicas` lowered since they
        // started): the extra ones leave the proxy, drain and stop.
        while kept.len() > self.config.replicas.max(1) {
            let Some(extra) = kept.pop() else { break };
            tracing::info!(container = %extra.id, replicas = self.config.replicas.max(1), "Retiring a replica beyond --replicas");
            self.retire(&extra.id).await;
        }
        self.set_replicas(kept);
        self.set_current(image);
        match failure {
            Some(err) => Err(err),
            None if replaced == 0 => Ok(Outcome::Current),
            None => Ok(Outcome::Healed { replaced }),
        }
    }
}
