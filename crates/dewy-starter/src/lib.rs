//! Zero-downtime restarts by holding the application's listening sockets.
//!
//! dewy binds the application's sockets once ([`Listeners::bind`]) and keeps
//! them open for as long as it runs. Each *generation* of the application
//! receives them as inherited file descriptors starting at 3, so a restart
//! never refuses a connection: the kernel keeps queueing connections on the
//! same sockets while one generation hands over to the next.
//!
//! # Protocols (public API: apps depend on them)
//!
//! - Server::Starter: `SERVER_STARTER_PORT=host:port=fd;...` in the same
//!   spelling Perl's `start_server` uses for the same `--port` values (`8000=3`
//!   for a bare port, `127.0.0.1:8000=3`, `/run/app.sock=3`), and
//!   `SERVER_STARTER_GENERATION=N`.
//! - systemd: `LISTEN_FDS=n`, `LISTEN_FDNAMES=name:name`, and `LISTEN_PID` set
//!   to the child's own pid. The pid is only known after fork, and setting an
//!   environment variable between fork and exec is not async-signal-safe, so
//!   the child is started through `/bin/sh -c 'LISTEN_PID=$$ exec "$0" "$@"'`,
//!   which execs the app in the same process: no race, no wrapper left.
//! - Readiness: with [`Readiness::Notify`] the child gets `NOTIFY_SOCKET` (a
//!   private datagram socket per generation) and is ready when it sends
//!   `READY=1`, as under systemd's `Type=notify`.
//!
//! # Readiness and its limits
//!
//! A restart starts generation N+1, waits until it is ready, and only then
//! sends the stop signal to generation N (default SIGTERM, then SIGKILL after
//! the stop timeout). Ready means, per [`Readiness`]:
//!
//! - `Notify`: `READY=1` arrived on the generation's own notify socket;
//! - `Http`: a GET of the health path answered 2xx. A probe through the shared
//!   port cannot tell the generations apart while the old one still accepts,
//!   so each generation gets one more inherited socket, a private loopback
//!   listener named `dewy-health` in `LISTEN_FDNAMES` and listed last in
//!   `SERVER_STARTER_PORT`; the probe connects there and so reaches the new
//!   generation only. An app that serves only the first socket it inherits
//!   (as most Server::Starter and listenfd apps do) is recognised on its first
//!   start, while it is alone on the sockets: after the survival interval it
//!   accepted a connection on its first socket but not the one waiting on
//!   the private socket. From then on generations are ready when they survive
//!   one second, and [`Supervisor::health_unverified`] tells the caller to
//!   check the health path through the app's port after the switch (dewy-core
//!   does, and rolls back on failure);
//! - `Alive`: the process is still running after the interval (what
//!   server-starter does).
//!
//! If the new generation exits or is not ready by the deadline, it is
//! stopped, the old one keeps serving, and [`Starter::restart`] returns an
//! [`Error`] naming the cause (exit status or signal, and the last lines of
//! its stderr).
//!
//! A generation that dies on its own is restarted with exponential backoff;
//! repeated crashes are reported as [`Event::CrashLoop`].
//!
//! The held TCP sockets are watched: when connections wait in the accept
//! queue for two seconds while no generation accepts them (an app declared
//! ready before it listens, a hung app), a warning names the generation and
//! the readiness options, and [`Event::AcceptQueueStalled`] is sent.
//!
//! Children run in their own process group; stopping signals the whole group.
//! Each child has `PR_SET_PDEATHSIG` set to SIGTERM, so a dewy killed with
//! SIGKILL leaves no orphan.
//!
//! # What this crate must never do
//!
//! Handle signals sent to dewy itself (dewy-cli does), close the listening
//! sockets while the [`Starter`] lives, or read dewy's environment: the child's
//! environment is exactly what the caller passes in [`StarterConfig::env`].
//!
//! This is the only dewy crate allowed `unsafe` (apart from one
//! `sync_file_range(2)` call in dewy-registry's downloader): the `pre_exec`
//! hook that places descriptors and sets the parent-death signal between fork
//! and exec, and one `getsockopt(TCP_INFO)` on a held listener for its accept
//! queue (no safe wrapper in nix or socket2). Every block says why it is
//! sound.

#![allow(unsafe_code)]
#![deny(missing_docs)]

mod listeners;
mod orphans;
mod process;
mod watch;

pub use listeners::{ListenSpec, Listeners, parse_ports};
pub use process::{Event, ExitInfo, GenerationInfo, Readiness, Starter, StarterConfig, http_status};

use std::path::PathBuf;

/// Errors of the starter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A `--port` value that does not parse.
    #[error("invalid port specification `{spec}`: {reason}")]
    InvalidPort {
        /// The value.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A socket could not be bound.
    #[error("failed to listen on `{spec}`")]
    Bind {
        /// The listener.
        spec: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The application could not be started.
    #[error("failed to start `{}`", command.display())]
    Spawn {
        /// The command.
        command: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The new generation exited before it was ready.
    #[error("generation {generation} exited before it was ready: {exit}{}", tail(stderr))]
    ExitedEarly {
        /// Its number.
        generation: u64,
        /// How it ended.
        exit: ExitInfo,
        /// Its last stderr lines.
        stderr: Vec<String>,
    },
    /// The new generation's leader exited while processes it started kept
    /// the listening sockets (it daemonized); they were stopped.
    #[error(
        "generation {generation} daemonized: its leader exited ({exit}) while processes {pids:?} kept the sockets; they were stopped. Run the app in the foreground"
    )]
    Daemonized {
        /// Its number.
        generation: u64,
        /// How the leader ended.
        exit: ExitInfo,
        /// The processes left holding the sockets.
        pids: Vec<u32>,
    },
    /// The new generation did not become ready in time.
    #[error("generation {generation} was not ready within {timeout:?}: {reason}{}", tail(stderr))]
    NotReady {
        /// Its number.
        generation: u64,
        /// The deadline.
        timeout: std::time::Duration,
        /// The last probe result.
        reason: String,
        /// Its last stderr lines.
        stderr: Vec<String>,
    },
    /// An operation needs a running generation.
    #[error("the application is not running")]
    NotRunning,
    /// The starter is shutting down.
    #[error("the starter is shutting down")]
    ShuttingDown,
    /// An operating-system call failed.
    #[error("failed to {op}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What dewy-core needs from whatever runs the application: dewy's own
/// [`Starter`], or an embedder's process manager.
#[async_trait::async_trait]
pub trait Supervisor: Send + Sync + std::fmt::Debug {
    /// Starts the application (first deploy) and waits until it is ready.
    async fn start(&self) -> Result<GenerationInfo, Error>;
    /// Replaces the running generation with a new one, gracefully; on
    /// failure the old one keeps serving.
    async fn restart(&self) -> Result<GenerationInfo, Error>;
    /// Stops the application gracefully.
    async fn stop(&self) -> Result<(), Error>;
    /// Whether it is running now.
    fn is_running(&self) -> bool;
    /// Whether the supervisor is itself restarting a crashed application
    /// (with backoff), so that dewy-core must not start it too.
    fn is_restarting(&self) -> bool {
        false
    }
    /// Whether the health path could not be checked before the switch (the
    /// app serves only its first socket), so that dewy-core checks it
    /// through the app's port after a restart.
    fn health_unverified(&self) -> bool {
        false
    }
    /// Events (starts, exits, crash loops), for logs and notifications.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event>;
    /// The generation serving now, when known.
    async fn current(&self) -> Option<GenerationInfo> {
        None
    }
}

#[async_trait::async_trait]
impl Supervisor for Starter {
    async fn start(&self) -> Result<GenerationInfo, Error> {
        Starter::start(self).await
    }
    async fn restart(&self) -> Result<GenerationInfo, Error> {
        Starter::restart(self).await
    }
    async fn stop(&self) -> Result<(), Error> {
        Starter::stop(self).await
    }
    fn is_running(&self) -> bool {
        Starter::is_running(self)
    }
    fn is_restarting(&self) -> bool {
        Starter::is_restarting(self)
    }
    fn health_unverified(&self) -> bool {
        Starter::health_unverified(self)
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        Starter::subscribe(self)
    }
    async fn current(&self) -> Option<GenerationInfo> {
        Starter::current(self).await
    }
}

fn tail(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last stderr lines:\n{}", lines.join("\n"))
    }
}
