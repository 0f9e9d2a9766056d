//! Generations of the application: spawning, readiness, stopping, crash
//! restarts.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, broadcast, mpsc, watch};

use crate::{Error, Listeners};

/// When a new generation counts as ready.
#[derive(Debug, Clone)]
pub enum Readiness {
    /// Still running after this long (server-starter's rule).
    Alive(Duration),
    /// Sent `READY=1` on `NOTIFY_SOCKET` within the timeout.
    Notify {
        /// Deadline.
        timeout: Duration,
    },
    /// Answered 2xx to `GET path` on its private probe socket within the
    /// timeout (see the crate docs for the limits).
    Http {
        /// The path, such as `/health`.
        path: String,
        /// Deadline.
        timeout: Duration,
    },
}

/// How to run the application.
#[derive(Debug, Clone)]
pub struct StarterConfig {
    /// The program (resolved through `PATH` when it has no slash, relative
    /// to `dir` otherwise, at each start, so a new release behind a symlink
    /// is picked up).
    pub command: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Its working directory.
    pub dir: PathBuf,
    /// Its complete environment (the starter adds only its protocol
    /// variables).
    pub env: Vec<(OsString, OsString)>,
    /// When a new generation is ready.
    pub readiness: Readiness,
    /// Signal that asks a generation to stop (SIGTERM by default).
    pub stop_signal: Signal,
    /// Time a generation gets to exit before SIGKILL.
    pub stop_timeout: Duration,
    /// First delay before restarting a crashed generation; doubled per
    /// crash up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest delay between crash restarts.
    pub backoff_max: Duration,
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitInfo {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Its status could not be read.
    Unknown,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit status {c}"),
            Self::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by signal {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
            Self::Unknown => f.write_str("unknown exit status"),
        }
    }
}

/// What happens to the application, for logs, notifications and metrics.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A generation was spawned.
    Started {
        /// Its number.
        generation: u64,
        /// Its pid.
        pid: u32,
    },
    /// A generation became ready and now serves.
    Ready {
        /// Its number.
        generation: u64,
        /// Its pid.
        pid: u32,
    },
    /// A generation exited; `expected` is false for a crash.
    Exited {
        /// Its number.
        generation: u64,
        /// Its pid.
        pid: u32,
        /// How.
        exit: ExitInfo,
        /// Whether dewy asked it to stop.
        expected: bool,
    },
    /// A crashed application will be restarted after `delay`.
    Restarting {
        /// The wait before the restart.
        delay: Duration,
    },
    /// The application crashed `crashes` times within a minute.
    CrashLoop {
        /// Crashes in the last minute.
        crashes: usize,
    },
    /// Connections have waited in the accept queue of the held sockets for
    /// a couple of seconds while no generation accepted them.
    AcceptQueueStalled {
        /// Connections waiting.
        queued: u64,
        /// The generation serving, if any.
        generation: Option<u64>,
    },
}

/// A generation that is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationInfo {
    /// Its number, from 1.
    pub generation: u64,
    /// Its pid.
    pub pid: u32,
}

#[derive(Debug, Clone)]
struct Gen {
    number: u64,
    pid: u32,
    exit: watch::Receiver<Option<ExitInfo>>,
    stderr: Arc<StdMutex<VecDeque<String>>>,
}

impl Gen {
    fn info(&self) -> GenerationInfo {
        GenerationInfo {
            generation: self.number,
            pid: self.pid,
        }
    }
    fn stderr_tail(&self) -> Vec<String> {
        self.stderr
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
    fn exited(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }
}

#[derive(Debug, Default)]
struct State {
    current: Option<Gen>,
    retiring: Vec<Gen>,
    next: u64,
    crashes: VecDeque<Instant>,
}

#[derive(Debug)]
struct Inner {
    config: StarterConfig,
    listeners: Listeners,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    exits: mpsc::UnboundedSender<u64>,
    running: AtomicBool,
    shutting_down: AtomicBool,
    /// Set by `stop`: cuts a readiness wait in flight short.
    stopping: watch::Sender<bool>,
    /// A crashed generation is being restarted with backoff.
    restarting: AtomicBool,
    /// The serving generation, readable without waiting for `state` (which
    /// a readiness wait holds).
    serving: StdMutex<Option<GenerationInfo>>,
    /// Inode numbers of the listeners, to find processes left holding them.
    socket_inodes: std::collections::HashSet<u64>,
    /// The app serves only the first socket it inherits (never the private
    /// `dewy-health` one): readiness follows the survival interval.
    first_socket_only: AtomicBool,
}

/// Runs generations of one application on a fixed set of listeners.
///
/// Cloning is cheap; all clones drive the same application.
#[derive(Debug, Clone)]
pub struct Starter {
    inner: Arc<Inner>,
}

const STDERR_LINES: usize = 20;

impl Starter {
    /// A starter for `config` on `listeners`. Must be called inside a tokio
    /// runtime (it spawns the crash supervisor).
    pub fn new(config: StarterConfig, listeners: Listeners) -> Self {
        crate::orphans::become_subreaper();
        let socket_inodes = crate::orphans::socket_inodes(listeners.iter().map(|(_, fd)| fd));
        let (events, _) = broadcast::channel(256);
        let (exits, exits_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            config,
            listeners,
            state: Mutex::new(State {
                next: 1,
                ..State::default()
            }),
            events,
            exits,
            running: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            stopping: watch::channel(false).0,
            restarting: AtomicBool::new(false),
            serving: StdMutex::new(None),
            socket_inodes,
            first_socket_only: AtomicBool::new(false),
        });
        tokio::spawn(supervise(Arc::downgrade(&inner), exits_rx));
        let reaping = Arc::downgrade(&inner);
        crate::orphans::spawn_reaper(move || reaping.strong_count() > 0);
        let (sample, report) = (Arc::downgrade(&inner), Arc::downgrade(&inner));
        tokio::spawn(crate::watch::watch(
            move || sample.upgrade().map(|inner| inner.queued()),
            move |queued| {
                if let Some(inner) = report.upgrade() {
                    inner.report_stall(queued);
                }
            },
        ));
        Self { inner }
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Whether a generation is running and serving.
    pub fn is_running(&self) -> bool {
        self.inner.running.load(Ordering::SeqCst)
    }

    /// The listeners.
    pub fn listeners(&self) -> &Listeners {
        &self.inner.listeners
    }

    /// Whether `--health-path` could not be probed before the switch because
    /// the app serves only its first socket; the caller checks the health
    /// path through the app's port instead.
    pub fn health_unverified(&self) -> bool {
        self.inner.first_socket_only.load(Ordering::SeqCst)
    }

    /// Whether a crashed generation is being restarted (with backoff) by
    /// the starter itself.
    pub fn is_restarting(&self) -> bool {
        self.inner.restarting.load(Ordering::SeqCst)
    }

    /// The generation serving now, if any. Answers at once, also while a
    /// new generation is being started.
    pub async fn current(&self) -> Option<GenerationInfo> {
        *self
            .inner
            .serving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the first generation (or returns the running one) and waits
    /// until it is ready.
    pub async fn start(&self) -> Result<GenerationInfo, Error> {
        let mut state = self.inner.state.lock().await;
        if let Some(cur) = &state.current
            && cur.exited().is_none()
        {
            return Ok(cur.info());
        }
        self.inner.start_locked(&mut state).await
    }

    /// Starts the next generation, waits until it is ready, then stops the
    /// previous one (in the background, signal then SIGKILL after the stop
    /// timeout). If the new generation fails, it is stopped, the previous one
    /// keeps serving, and the error names the cause.
    pub async fn restart(&self) -> Result<GenerationInfo, Error> {
        let mut state = self.inner.state.lock().await;
        if state.current.is_none() {
            return self.inner.start_locked(&mut state).await;
        }
        let new = self.inner.spawn_ready(&mut state).await?;
        let info = new.info();
        if let Some(old) = self.inner.set_current(&mut state, Some(new)) {
            state.retiring.push(old.clone());
            let inner = self.inner.clone();
            tokio::spawn(async move { inner.stop_gen(&old).await });
        }
        self.inner.running.store(true, Ordering::SeqCst);
        Ok(info)
    }

    /// Stops every generation gracefully (stop signal, then SIGKILL after the
    /// stop timeout) and waits for them. No crash restart happens afterwards.
    pub async fn stop(&self) -> Result<(), Error> {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        // A readiness wait in flight holds the state: end it first.
        let _ = self.inner.stopping.send(true);
        // The supervisor removes each generation from the state as it exits
        // and reports it as an expected exit.
        let gens: Vec<Gen> = {
            let state = self.inner.state.lock().await;
            self.inner.running.store(false, Ordering::SeqCst);
            state.current.iter().chain(state.retiring.iter()).cloned().collect()
        };
        // All at once: a shutdown takes one stop timeout, not one per
        // generation.
        let mut set = tokio::task::JoinSet::new();
        for g in gens {
            let inner = self.inner.clone();
            set.spawn(async move { inner.stop_gen(&g).await });
        }
        while set.join_next().await.is_some() {}
        // No process dewy started outlives it: descendants that left the
        // process group but still hold the sockets go too.
        self.inner.stop_leftovers(&[]).await;
        Ok(())
    }

    /// Pids of every generation still running (the serving one first).
    pub async fn pids(&self) -> Vec<u32> {
        live_pids(&*self.inner.state.lock().await)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last handle gone without `stop`: ask every generation to stop so
        // nothing is orphaned.
        if let Ok(state) = self.state.try_lock() {
            for g in state.current.iter().chain(state.retiring.iter()) {
                if g.exited().is_none() {
                    let _ = killpg(Pid::from_raw(g.pid as i32), self.config.stop_signal);
                }
            }
        }
    }
}

impl Inner {
    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Stops processes that hold the listeners but descend from no live
    /// generation (`live`, plus the current and retiring ones); returns
    /// their pids.
    async fn stop_leftovers(&self, live: &[u32]) -> Vec<u32> {
        let pids = {
            let inodes = self.socket_inodes.clone();
            let live = live.to_vec();
            tokio::task::spawn_blocking(move || crate::orphans::leftovers(&inodes, &live))
                .await
                .unwrap_or_default()
        };
        if !pids.is_empty() {
            tracing::error!(
                ?pids,
                "Processes left by an ended generation still hold the listening sockets; stopping them (the app daemonized: run it in the foreground)"
            );
            crate::orphans::stop(&pids, self.config.stop_signal, self.config.stop_timeout).await;
        }
        pids
    }

    /// Warns that connections wait unaccepted, naming the generation and
    /// the readiness options that would have held the switch back.
    fn report_stall(&self, queued: u64) {
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let serving = *self.serving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let generation = serving.map(|g| g.generation);
        let readiness = match &self.config.readiness {
            Readiness::Alive(d) => format!(
                "the app was declared ready after surviving {d:?}; use --ready-notify or --health-path so that it is declared ready once it accepts"
            ),
            Readiness::Notify { .. } => {
                "the app sent READY=1 but does not accept; send it once the sockets are served".to_owned()
            }
            Readiness::Http { .. } => {
                "the app answered its health path but does not accept on the shared socket".to_owned()
            }
        };
        tracing::warn!(
            queued,
            generation = generation.map_or_else(|| "none".to_owned(), |g| g.to_string()),
            pid = serving.map_or(0, |g| g.pid),
            stall = ?crate::watch::STALL,
            "Connections wait in the accept queue and no generation accepts them: {readiness}"
        );
        self.emit(Event::AcceptQueueStalled { queued, generation });
    }

    /// A connection to the first TCP listener (what a client does), if any.
    async fn connect_first_socket(&self) -> Option<tokio::net::TcpStream> {
        let addr = self.listeners.local_addr(0)?;
        let addr = if addr.ip().is_unspecified() {
            std::net::SocketAddr::new(
                if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                },
                addr.port(),
            )
        } else {
            addr
        };
        tokio::net::TcpStream::connect(addr).await.ok()
    }

    /// The app (alone on the sockets) accepted the connection waiting on its
    /// first socket but not the one waiting on the private socket.
    fn serves_only_first_socket(&self, private: Option<&std::net::TcpListener>) -> bool {
        use std::os::fd::AsFd;
        private
            .and_then(|l| crate::watch::accept_queue(l.as_fd()))
            .is_some_and(|n| n > 0)
            && self.queued() == 0
    }

    /// Connections waiting on the held TCP listeners.
    fn queued(&self) -> u64 {
        crate::watch::accept_queues(self.listeners.iter().map(|(_, fd)| fd))
    }

    /// Replaces the serving generation (and its snapshot); returns the old.
    fn set_current(&self, state: &mut State, gen_: Option<Gen>) -> Option<Gen> {
        *self.serving.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = gen_.as_ref().map(Gen::info);
        std::mem::replace(&mut state.current, gen_)
    }

    async fn start_locked(&self, state: &mut State) -> Result<GenerationInfo, Error> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let new = self.spawn_ready(state).await?;
        let info = new.info();
        self.set_current(state, Some(new));
        self.running.store(true, Ordering::SeqCst);
        Ok(info)
    }

    /// Spawns the next generation and waits until it is ready; stops it on
    /// failure.
    async fn spawn_ready(&self, state: &mut State) -> Result<Gen, Error> {
        let number = state.next;
        state.next += 1;
        let (gen_, probe) = self.spawn(number)?;
        match self.wait_ready(state, &gen_, probe).await {
            Ok(()) => {
                self.emit(Event::Ready {
                    generation: number,
                    pid: gen_.pid,
                });
                tracing::info!(generation = number, pid = gen_.pid, "Application generation ready");
                Ok(gen_)
            }
            Err(err) => {
                self.stop_gen(&gen_).await;
                Err(err)
            }
        }
    }

    fn spawn(&self, number: u64) -> Result<(Gen, Probe), Error> {
        let cfg = &self.config;
        let os = |op| move |source| Error::Os { op, source };
        // The probe channel of this generation.
        let mut private: Option<std::net::TcpListener> = None;
        let probe = match &cfg.readiness {
            Readiness::Alive(d) => Probe::Alive(*d),
            Readiness::Notify { timeout } => {
                let dir = tempfile::Builder::new()
                    .prefix("dewy-notify-")
                    .tempdir()
                    .map_err(os("create notify socket folder"))?;
                let path = dir.path().join("notify.sock");
                let sock = tokio::net::UnixDatagram::bind(&path).map_err(os("bind notify socket"))?;
                Probe::Notify {
                    sock,
                    path,
                    _dir: dir,
                    timeout: *timeout,
                }
            }
            // An app known to serve only its first socket gets no private
            // socket: the survival interval decides.
            Readiness::Http { .. } if self.first_socket_only.load(Ordering::SeqCst) => Probe::Alive(SURVIVAL),
            Readiness::Http { path, timeout } => {
                let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(os("bind private probe socket"))?;
                let addr = l.local_addr().map_err(os("read probe socket address"))?;
                private = Some(l);
                Probe::Http {
                    addr,
                    path: path.clone(),
                    timeout: *timeout,
                    private: None,
                }
            }
        };

        // Descriptors for the child: the listeners, then the private probe
        // socket. Each is duplicated above the target range first, so that
        // placing one at 3+i never overwrites another.
        let mut sources: Vec<(String, String, std::os::fd::BorrowedFd<'_>)> = self
            .listeners
            .iter()
            .enumerate()
            .map(|(i, (spec, fd))| (spec.starter_name(), format!("dewy{i}"), fd))
            .collect();
        if let Some(l) = &private {
            use std::os::fd::AsFd;
            sources.push((
                l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                "dewy-health".into(),
                l.as_fd(),
            ));
        }
        let count = sources.len() as i32;
        let mut high: Vec<OwnedFd> = Vec::with_capacity(sources.len());
        for (_, _, fd) in &sources {
            let raw = nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3 + count + 16)).map_err(|e| {
                Error::Os {
                    op: "duplicate listening socket",
                    source: e.into(),
                }
            })?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing
            // else owns.
            high.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        let mapping: Vec<(i32, i32)> = high
            .iter()
            .enumerate()
            .map(|(i, fd)| (fd.as_raw_fd(), 3 + i as i32))
            .collect();
        let starter_port: Vec<String> = sources
            .iter()
            .enumerate()
            .map(|(i, (name, _, _))| format!("{name}={}", 3 + i))
            .collect();
        let fdnames: Vec<&str> = sources.iter().map(|(_, n, _)| n.as_str()).collect();

        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
            .arg(&cfg.command)
            .args(&cfg.args)
            .current_dir(&cfg.dir)
            .env_clear()
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .env("SERVER_STARTER_PORT", starter_port.join(";"))
            .env("SERVER_STARTER_GENERATION", number.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::piped())
            .process_group(0);
        if count > 0 {
            cmd.env("LISTEN_FDS", count.to_string())
                .env("LISTEN_FDNAMES", fdnames.join(":"));
        } else {
            cmd.env_remove("LISTEN_FDS");
        }
        if let Probe::Notify { path, .. } = &probe {
            cmd.env("NOTIFY_SOCKET", path);
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls async-signal-safe functions (dup2, prctl, getppid,
        // kill, getpid) on values prepared before the fork; it allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                for &(from, to) in &mapping {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Stop with dewy even when dewy is killed with SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::kill(libc::getpid(), libc::SIGTERM);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            command: cfg.command.clone(),
            source,
        })?;
        drop(high);
        // dewy keeps its copy of the private socket while it probes, to
        // read its accept queue.
        let mut probe = probe;
        if let Probe::Http { private: kept, .. } = &mut probe {
            *kept = private;
        }
        let pid = child.id().unwrap_or(0);
        self.emit(Event::Started {
            generation: number,
            pid,
        });
        tracing::info!(generation = number, pid, command = %cfg.command.display(), "Started application generation");

        let stderr = Arc::new(StdMutex::new(VecDeque::with_capacity(STDERR_LINES)));
        if let Some(err) = child.stderr.take() {
            let tail = stderr.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(err).lines();
                let mut out = tokio::io::stderr();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = out.write_all(format!("{line}\n").as_bytes()).await;
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == STDERR_LINES {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            });
        }
        let (tx, rx) = watch::channel(None);
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(c), _) => ExitInfo::Code(c),
                        (None, Some(s)) => ExitInfo::Signal(s),
                        _ => ExitInfo::Unknown,
                    }
                }
                Err(_) => ExitInfo::Unknown,
            };
            let _ = tx.send(Some(exit));
            let _ = exits.send(number);
        });
        Ok((
            Gen {
                number,
                pid,
                exit: rx,
                stderr,
            },
            probe,
        ))
    }

    async fn wait_ready(&self, state: &State, gen_: &Gen, probe: Probe) -> Result<(), Error> {
        let mut exit = gen_.exit.clone();
        let exited = async move {
            loop {
                if let Some(e) = exit.borrow().clone() {
                    return e;
                }
                if exit.changed().await.is_err() {
                    return ExitInfo::Unknown;
                }
            }
        };
        let timeout = probe.timeout();
        let last = Arc::new(StdMutex::new(String::from("no answer")));
        // The first-socket check needs the app alone on the shared socket.
        let alone = live_pids(state).is_empty();
        let ready = probe.wait(last.clone(), alone.then_some(self));
        let mut stopping = self.stopping.subscribe();
        tokio::select! {
            () = async { drop(stopping.wait_for(|s| *s).await) } => Err(Error::ShuttingDown),
            e = exited => {
                // Give the stderr reader a moment to collect the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                // A leader that exits while its descendants keep the sockets
                // daemonized: those must not serve a rejected release.
                let live = live_pids(state);
                let left = self.stop_leftovers(&live).await;
                if !left.is_empty() {
                    return Err(Error::Daemonized { generation: gen_.number, exit: e, pids: left });
                }
                Err(Error::ExitedEarly { generation: gen_.number, exit: e, stderr: gen_.stderr_tail() })
            }
            r = tokio::time::timeout(timeout, ready) => match r {
                Ok(Ok(())) => match gen_.exited() {
                    None => Ok(()),
                    Some(e) => Err(Error::ExitedEarly { generation: gen_.number, exit: e, stderr: gen_.stderr_tail() }),
                },
                Ok(Err(reason)) => Err(Error::NotReady { generation: gen_.number, timeout, reason, stderr: gen_.stderr_tail() }),
                Err(_) => {
                    let reason = last.lock().map(|r| r.clone()).unwrap_or_default();
                    Err(Error::NotReady { generation: gen_.number, timeout, reason, stderr: gen_.stderr_tail() })
                }
            }
        }
    }

    /// Asks a generation to stop, waits up to the stop timeout, then kills
    /// its process group.
    async fn stop_gen(&self, gen_: &Gen) {
        let mut exit = gen_.exit.clone();
        if exit.borrow().is_some() {
            return;
        }
        let pgid = Pid::from_raw(gen_.pid as i32);
        let _ = killpg(pgid, self.config.stop_signal);
        let waited = tokio::time::timeout(self.config.stop_timeout, async {
            while exit.borrow().is_none() {
                if exit.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(generation = gen_.number, pid = gen_.pid, timeout = ?self.config.stop_timeout, "Application did not stop in time, killing it");
            let _ = killpg(pgid, Signal::SIGKILL);
            while exit.borrow().is_none() {
                if exit.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The readiness check of one generation.
enum Probe {
    Alive(Duration),
    Notify {
        sock: tokio::net::UnixDatagram,
        path: PathBuf,
        _dir: tempfile::TempDir,
        timeout: Duration,
    },
    Http {
        addr: std::net::SocketAddr,
        path: String,
        timeout: Duration,
        /// dewy's copy of the private socket, to read its accept queue.
        private: Option<std::net::TcpListener>,
    },
}

/// The survival interval: how long a generation must stay alive to count
/// as ready when nothing better can be probed.
const SURVIVAL: Duration = Duration::from_secs(1);

impl Probe {
    fn timeout(&self) -> Duration {
        match self {
            // The survival interval plus a margin: the deadline never fires
            // before the interval has passed.
            Self::Alive(d) => *d + Duration::from_secs(5),
            Self::Notify { timeout, .. } | Self::Http { timeout, .. } => *timeout,
        }
    }

    /// Waits until ready; `last` holds the latest reason it is not. With
    /// `alone` (no other generation serves), an `Http` probe also finds out
    /// whether the app serves the private socket at all.
    async fn wait(self, last: Arc<StdMutex<String>>, alone: Option<&Inner>) -> Result<(), String> {
        match self {
            Self::Alive(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Self::Notify { sock, .. } => {
                if let Ok(mut l) = last.lock() {
                    *l = "no READY=1 on NOTIFY_SOCKET".into();
                }
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
                    let msg = String::from_utf8_lossy(&buf[..n]);
                    if msg.lines().any(|l| l.trim() == "READY=1") {
                        return Ok(());
                    }
                }
            }
            Self::Http {
                addr, path, private, ..
            } => {
                let started = tokio::time::Instant::now();
                // Connections that wait to be accepted on each socket: the
                // private one, and (opened after the survival interval) the
                // app's own first socket.
                let _private_canary = tokio::net::TcpStream::connect(addr).await;
                let mut shared_canary = None;
                loop {
                    let reason = match http_status(addr, &path, Duration::from_secs(1)).await {
                        Ok(status) if (200..300).contains(&status) => return Ok(()),
                        Ok(status) => format!("GET {path} answered {status}"),
                        Err(e) => format!("GET {path} failed: {e}"),
                    };
                    tracing::debug!(%addr, %reason, "Readiness probe not passed yet");
                    if let Ok(mut l) = last.lock() {
                        *l = reason;
                    }
                    if let Some(inner) = alone
                        && started.elapsed() >= SURVIVAL
                    {
                        match &shared_canary {
                            None => shared_canary = Some(inner.connect_first_socket().await),
                            Some(_) if inner.serves_only_first_socket(private.as_ref()) => {
                                inner.first_socket_only.store(true, Ordering::SeqCst);
                                tracing::warn!(
                                    path,
                                    "The app serves only the first socket it inherits, not the private `dewy-health` one: readiness follows the survival interval, and the health path is checked through the app's port once the previous generation is told to stop"
                                );
                                return Ok(());
                            }
                            Some(_) => {}
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The status code of `GET path` on `addr` (HTTP/1.0, `Connection: close`),
/// with `timeout` for the connect and again for the answer. The one HTTP
/// probe of dewy: the readiness check here and dewy-core's health checks.
pub async fn http_status(addr: std::net::SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    let mut s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(timeout, s.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response"))??;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP response: {line:?}"),
            )
        })
}

/// Restarts crashed generations with exponential backoff.
async fn supervise(inner: std::sync::Weak<Inner>, mut exits: mpsc::UnboundedReceiver<u64>) {
    while let Some(number) = exits.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let mut state = inner.state.lock().await;
        let is_current = state.current.as_ref().is_some_and(|g| g.number == number);
        let gen_ = if is_current {
            inner.set_current(&mut state, None)
        } else {
            let pos = state.retiring.iter().position(|g| g.number == number);
            pos.map(|p| state.retiring.remove(p))
        };
        let Some(gen_) = gen_ else { continue };
        let exit = gen_.exited().unwrap_or(ExitInfo::Unknown);
        let crashed = is_current && !inner.shutting_down.load(Ordering::SeqCst);
        // Its workers or a detached child may outlive it with the sockets.
        let live = live_pids(&state);
        inner.stop_leftovers(&live).await;
        inner.emit(Event::Exited {
            generation: number,
            pid: gen_.pid,
            exit: exit.clone(),
            expected: !crashed,
        });
        if !crashed {
            tracing::debug!(generation = number, pid = gen_.pid, %exit, "Application generation exited");
            continue;
        }
        inner.running.store(false, Ordering::SeqCst);
        tracing::error!(generation = number, pid = gen_.pid, %exit, stderr = %gen_.stderr_tail().join("\n"), "Application exited unexpectedly");
        let now = Instant::now();
        state.crashes.push_back(now);
        while state
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            state.crashes.pop_front();
        }
        let crashes = state.crashes.len();
        if crashes >= 5 {
            inner.emit(Event::CrashLoop { crashes });
            tracing::error!(crashes, "Application is crash-looping");
        }
        drop(state);
        let mut delay = backoff(&inner.config, crashes);
        inner.restarting.store(true, Ordering::SeqCst);
        loop {
            inner.emit(Event::Restarting { delay });
            tracing::warn!(delay_ms = delay.as_millis() as u64, "Restarting crashed application");
            tokio::time::sleep(delay).await;
            let mut state = inner.state.lock().await;
            if inner.shutting_down.load(Ordering::SeqCst) || state.current.is_some() {
                break;
            }
            match inner.spawn_ready(&mut state).await {
                Ok(g) => {
                    inner.set_current(&mut state, Some(g));
                    inner.running.store(true, Ordering::SeqCst);
                    break;
                }
                Err(err) => {
                    tracing::error!(error = %err, "Restart of crashed application failed");
                    delay = (delay * 2).min(inner.config.backoff_max);
                }
            }
        }
        inner.restarting.store(false, Ordering::SeqCst);
    }
}

/// Pids of the generations that still run.
fn live_pids(state: &State) -> Vec<u32> {
    state
        .current
        .iter()
        .chain(state.retiring.iter())
        .filter(|g| g.exited().is_none())
        .map(|g| g.pid)
        .collect()
}

fn backoff(config: &StarterConfig, crashes: usize) -> Duration {
    let factor = 2u32.saturating_pow(crashes.saturating_sub(1).min(16) as u32);
    config.backoff_min.saturating_mul(factor).min(config.backoff_max)
}
