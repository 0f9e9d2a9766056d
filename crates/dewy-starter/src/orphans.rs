//! Processes the app left behind: descendants that outlived their
//! generation and still hold dewy's listening sockets (an app that
//! daemonizes, workers of a crashed master, a child that called `setsid`).
//!
//! dewy is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so such
//! descendants are re-parented to dewy rather than to init. They are found
//! by the sockets they hold: a process other than dewy that holds one of
//! the listeners and has no live generation among its ancestors is left
//! over, and is stopped (signal, then SIGKILL after the stop timeout).

use std::collections::{HashMap, HashSet};
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Makes this process the subreaper of its descendants. Fails only on
/// kernels without it (before 3.4); dewy then works as before.
pub(crate) fn become_subreaper() {
    if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %err, "Could not become a child subreaper; detached app processes may outlive dewy");
    }
}

/// Reaps, every time a child exits (and every 30 s), the processes that
/// were re-parented to dewy as its subreaper and have exited: a hook's
/// background job, a worker whose master died. Without it each would stay
/// a zombie for dewy's lifetime. Ends once `alive` says so (the starter
/// is gone).
pub(crate) fn spawn_reaper(alive: impl Fn() -> bool + Send + 'static) {
    tokio::spawn(async move {
        let mut chld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
        while alive() {
            match chld.as_mut() {
                Some(sig) => {
                    let _ = tokio::time::timeout(Duration::from_secs(30), sig.recv()).await;
                }
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
            let reaped = tokio::task::spawn_blocking(reap_adopted).await.unwrap_or(0);
            if reaped > 0 {
                tracing::debug!(reaped, "Reaped exited processes re-parented to dewy");
            }
        }
    });
}

/// Reaps dewy's exited children that dewy did not start. Everything the
/// starter and the hooks start leads its own process group and is reaped
/// by its owner; a zombie child in another process's group (not its own,
/// and not dewy's, where an embedding program's own children are) was
/// adopted. An adopted process that called `setsid` leads a group and is
/// left alone: it cannot be told from dewy's own. Returns how many were
/// reaped.
pub(crate) fn reap_adopted() -> usize {
    let me = std::process::id();
    let my_group = nix::unistd::getpgrp().as_raw() as u32;
    let mut reaped = 0;
    for (pid, stat) in processes() {
        if stat.state == 'Z' && stat.ppid == me && stat.pgrp != pid && stat.pgrp != my_group {
            let flags = Some(nix::sys::wait::WaitPidFlag::WNOHANG);
            if nix::sys::wait::waitpid(Pid::from_raw(pid as i32), flags).is_ok() {
                reaped += 1;
            }
        }
    }
    reaped
}

/// The inode numbers of `fds` (sockets), to recognise them in
/// `/proc/PID/fd`.
pub(crate) fn socket_inodes<'a>(fds: impl Iterator<Item = BorrowedFd<'a>>) -> HashSet<u64> {
    fds.filter_map(|fd| nix::sys::stat::fstat(fd).ok())
        .map(|st| st.st_ino)
        .collect()
}

/// The fields of `/proc/PID/stat` dewy reads.
struct ProcStat {
    /// `R`, `S`, `Z`, …
    state: char,
    ppid: u32,
    pgrp: u32,
}

/// `pid`'s state, parent and process group, or `None` when it is gone.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    Some(ProcStat {
        state: fields.next()?.chars().next()?,
        ppid: fields.next()?.parse().ok()?,
        pgrp: fields.next()?.parse().ok()?,
    })
}

/// Every process's parent, from `/proc/PID/stat`.
fn parents() -> HashMap<u32, u32> {
    processes().map(|(pid, stat)| (pid, stat.ppid)).collect()
}

/// Every process with its `/proc/PID/stat` fields.
fn processes() -> impl Iterator<Item = (u32, ProcStat)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
}

/// Whether `pid` holds a socket with one of `inodes`.
fn holds(pid: u32, inodes: &HashSet<u64>) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).ok().is_some_and(|target| {
            target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok())
                .is_some_and(|ino| inodes.contains(&ino))
        })
    })
}

/// Processes other than dewy that hold one of `inodes` and descend from
/// none of `live` (the generations still running).
pub(crate) fn leftovers(inodes: &HashSet<u64>, live: &[u32]) -> Vec<u32> {
    let me = std::process::id();
    let parents = parents();
    let descends_from_live = |mut pid: u32| {
        for _ in 0..64 {
            if live.contains(&pid) {
                return true;
            }
            match parents.get(&pid) {
                Some(&p) if p > 1 && p != me => pid = p,
                _ => return false,
            }
        }
        false
    };
    let mut out: Vec<u32> = parents
        .keys()
        .copied()
        .filter(|&pid| pid != me && !descends_from_live(pid) && holds(pid, inodes))
        .collect();
    out.sort_unstable();
    out
}

/// Stops `pids`: `signal`, then SIGKILL after `timeout`, reaping those that
/// are dewy's (adopted) children.
pub(crate) async fn stop(pids: &[u32], signal: Signal, timeout: Duration) {
    let alive = |pid: u32| {
        // Reap it if it is an adopted child that already exited.
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        proc_stat(pid).is_some_and(|s| s.state != 'Z')
    };
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| alive(p)) {
        if Instant::now() >= deadline {
            for &pid in pids.iter().filter(|&&p| alive(p)) {
                tracing::warn!(pid, "Left-over app process did not stop in time, killing it");
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            for &pid in pids {
                alive(pid);
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
