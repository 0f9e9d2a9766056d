//! A watch on the held sockets: connections that wait in the accept queue
//! while no generation accepts them (an app declared ready too early, a
//! hung app) are an outage that nothing else reports, since the kernel
//! keeps queueing instead of refusing.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// How often the queues are read.
const EVERY: Duration = Duration::from_millis(500);
/// How long connections must wait unaccepted before the warning.
pub(crate) const STALL: Duration = Duration::from_secs(2);

/// Connections waiting to be accepted on `fd`, when it is a listening TCP
/// socket (`TCP_INFO`: for a socket in LISTEN state the kernel reports the
/// accept queue length as `tcpi_unacked`, as `ss -l` shows it). A cheap
/// call on a descriptor dewy holds, whatever the number of connections on
/// the host.
pub(crate) fn accept_queue(fd: BorrowedFd<'_>) -> Option<u64> {
    const TCP_LISTEN: u8 = 10;
    // SAFETY: `tcp_info` is a plain C struct of integers, for which all
    // zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is an open descriptor borrowed for the call; `info` and
    // `len` are valid for writes of `len` bytes, and the kernel writes at
    // most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    (rc == 0 && info.tcpi_state == TCP_LISTEN).then_some(u64::from(info.tcpi_unacked))
}

/// The connections waiting on all of `fds` (those that are TCP listeners).
pub(crate) fn accept_queues<'a>(fds: impl IntoIterator<Item = BorrowedFd<'a>>) -> u64 {
    fds.into_iter().filter_map(accept_queue).sum()
}

/// Follows the queue: `Some(queued)` once it has stayed non-empty and not
/// shrunk for [`STALL`], then nothing until it drains again.
#[derive(Debug, Default)]
pub(crate) struct StallDetector {
    since: Option<(Instant, u64)>,
    reported: bool,
}

impl StallDetector {
    pub(crate) fn sample(&mut self, queued: u64, now: Instant) -> Option<u64> {
        match self.since {
            _ if queued == 0 => {
                self.since = None;
                self.reported = false;
                None
            }
            // It shrank: something accepts, start over.
            Some((_, before)) if queued < before => {
                self.since = Some((now, queued));
                None
            }
            Some((start, _)) if !self.reported && now.duration_since(start) >= STALL => {
                self.reported = true;
                Some(queued)
            }
            Some(_) => None,
            None => {
                self.since = Some((now, queued));
                None
            }
        }
    }
}

/// Samples `queued()` every half second until it returns `None` (the
/// starter is gone); reports stalls through `on_stall`.
pub(crate) async fn watch(mut queued: impl FnMut() -> Option<u64> + Send, mut on_stall: impl FnMut(u64) + Send) {
    let mut detector = StallDetector::default();
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(now) = queued() else { return };
        if let Some(stalled) = detector.sample(now, Instant::now()) {
            on_stall(stalled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_reported_once_per_episode_and_a_shrinking_queue_is_not_one() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut d = StallDetector::default();
        assert_eq!(d.sample(3, at(0)), None);
        assert_eq!(d.sample(3, at(1000)), None);
        assert_eq!(d.sample(4, at(2100)), Some(4));
        assert_eq!(d.sample(5, at(3000)), None, "once per episode");
        assert_eq!(d.sample(0, at(3500)), None);
        // Busy but served: the queue shrinks between samples.
        assert_eq!(d.sample(9, at(4000)), None);
        assert_eq!(d.sample(5, at(5000)), None);
        assert_eq!(d.sample(2, at(6000)), None);
        assert_eq!(d.sample(2, at(7000)), None);
        assert_eq!(d.sample(2, at(8100)), Some(2));
    }

    #[test]
    fn the_queue_of_a_listener_nobody_accepts_is_read() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        use std::os::fd::AsFd;
        assert_eq!(accept_queue(l.as_fd()), Some(0));
        let _c: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(accept_queue(l.as_fd()), Some(3));
        let client = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(accept_queue(client.as_fd()), None, "not a listener");
    }
}
